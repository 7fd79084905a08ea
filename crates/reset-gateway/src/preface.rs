//! Telling an HTTP/2 cleartext client (prior knowledge) from an HTTP/1.1 one: read the
//! connection's first bytes once, then hand them back to whichever protocol serves it.
//!
//! Peeking instead would leave a partial preface in the socket's buffer, readable but not
//! growing, so the only way to wait for more would be polling; reading owns the bytes, and
//! each wait is one readiness wake-up from the kernel.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface a cleartext (h2c prior knowledge) client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How much one read may take at first: usually the whole request head of an HTTP/1.1
/// client, so serving it costs no extra read.
const FIRST_READ: usize = 2048;

/// Which protocol the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Reads from `io` until the bytes received either are the whole HTTP/2 preface or stop
/// matching it, and returns the protocol with the connection, those bytes put back in
/// front. A connection that closes first is an `UnexpectedEof` error.
pub async fn read_protocol<I: AsyncRead + Unpin>(io: I) -> io::Result<(Protocol, Rewind<I>)> {
    read_protocol_after(io, BytesMut::with_capacity(FIRST_READ)).await
}

/// [`read_protocol`] on a connection of which `read` was already read (what followed a
/// PROXY protocol header): those bytes are looked at first, and handed back first.
pub async fn read_protocol_after<I: AsyncRead + Unpin>(
    mut io: I,
    mut read: BytesMut,
) -> io::Result<(Protocol, Rewind<I>)> {
    let protocol = loop {
        let n = read.len().min(H2_PREFACE.len());
        if read[..n] != H2_PREFACE[..n] {
            break Protocol::Http1;
        }
        if n == H2_PREFACE.len() {
            break Protocol::Http2;
        }
        if read.capacity() == read.len() {
            read.reserve(FIRST_READ);
        }
        if io.read_buf(&mut read).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    };
    Ok((protocol, Rewind::new(read, io)))
}

/// An I/O whose first reads return bytes already read from it.
#[derive(Debug)]
pub struct Rewind<I> {
    read: BytesMut,
    inner: I,
}

impl<I> Rewind<I> {
    /// `inner`, whose first reads return `read`.
    pub fn new(read: BytesMut, inner: I) -> Self {
        Rewind { read, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        if self.read.is_empty() {
            // Give the buffer's memory back for the connection's remaining life.
            self.read = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    async fn sniff(chunks: &[&[u8]]) -> (Protocol, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(64);
        let sent: Vec<u8> = chunks.concat();
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for chunk in chunks {
                client.write_all(&chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
        });
        let (protocol, mut rewound) = read_protocol(server).await.unwrap();
        let mut replayed = Vec::new();
        rewound.read_to_end(&mut replayed).await.unwrap();
        writer.await.unwrap();
        assert_eq!(replayed, sent, "every byte is handed back, in order");
        (protocol, replayed)
    }

    #[tokio::test]
    async fn the_preface_in_pieces_is_http2_and_is_handed_back_whole() {
        let (first, rest) = H2_PREFACE.split_at(5);
        let (middle, last) = rest.split_at(10);
        let (protocol, _) = sniff(&[first, middle, last, b"\0\0\0\x04"]).await;
        assert_eq!(protocol, Protocol::Http2);
    }

    #[tokio::test]
    async fn anything_else_is_http1_as_soon_as_it_differs() {
        for start in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"PUT / HTTP/1.1\r\n\r\n",
            b"PRI * HTTP/1.1\r\n\r\n",
        ] {
            let (protocol, _) = sniff(&[start]).await;
            assert_eq!(protocol, Protocol::Http1, "{start:?}");
        }
    }

    #[tokio::test]
    async fn a_connection_closed_early_is_an_error() {
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        let error = read_protocol(server).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Counts the reads asked of the connection underneath.
    struct Counted<I> {
        inner: I,
        polls: Arc<AtomicUsize>,
    }

    impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_the_rest_of_a_preface_costs_no_work() {
        let (mut client, server) = tokio::io::duplex(64);
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = Counted {
            inner: server,
            polls: polls.clone(),
        };
        let reader = tokio::spawn(read_protocol(counted));
        client.write_all(&H2_PREFACE[..7]).await.unwrap();
        // A minute on the paused clock: any timer the reader armed to look again would fire
        // thousands of times here.
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        client.write_all(&H2_PREFACE[7..]).await.unwrap();
        let (protocol, _) = reader.await.unwrap().unwrap();
        assert_eq!(protocol, Protocol::Http2);
        let polls = polls.load(Ordering::Relaxed);
        assert!(polls <= 4, "{polls} reads for a preface sent in two pieces");
    }
}
