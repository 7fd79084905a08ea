//! A connection whose client takes none of what is written to it for a while is dropped.
//!
//! hyper times out reading a request head, never writing an answer: a client that
//! pipelines requests and never reads, or pauses a download, would hold its connection
//! (and a `max_connections` slot) for ever once the socket's buffers fill. Like nginx's
//! `send_timeout`, the limit is on a write that makes no progress at all, not on a slow
//! one: any write that goes through starts the wait again. The kernel says a socket is
//! writable again only once a good part of its send buffer has drained, so a reader
//! slower than that drains in the limit counts as making none (as with nginx).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// `io`, whose writes fail with `TimedOut` once one has waited `limit` without progress.
pub(super) struct SendTimeout<I> {
    io: I,
    limit: Duration,
    /// Made at the first stall and reused (a stall is rare: the kernel's send buffer
    /// takes whole answers); `armed` while a write waits.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<I> SendTimeout<I> {
    pub(super) fn new(io: I, limit: Duration) -> Self {
        SendTimeout {
            io,
            limit,
            timer: None,
            armed: false,
        }
    }

    /// After a write, flush or shutdown answered: progress disarms, waiting arms (once)
    /// and fails when the wait has lasted `limit`.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        let deadline = Instant::now() + self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took nothing of the answer within server.request_timeout",
        )))
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for SendTimeout<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for SendTimeout<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.watch(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// The far end of a small in-memory pipe that nobody reads.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_the_limit_fails_and_progress_restarts_the_wait() {
        let (near, mut far) = tokio::io::duplex(16);
        let mut io = SendTimeout::new(near, Duration::from_secs(30));
        io.write_all(&[0; 16]).await.unwrap();
        let started = Instant::now();
        // 29s in, the client takes a byte: the stalled write goes on and waits 30s more.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(29)).await;
            let mut byte = [0; 1];
            tokio::io::AsyncReadExt::read_exact(&mut far, &mut byte)
                .await
                .unwrap();
            far
        });
        let error = io.write_all(&[0; 2]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(59));
        drop(reader.await.unwrap());
    }
}
