//! A TCP proxy on a free loopback port that delays every byte by a fixed time each way,
//! so that a server on this machine answers as one a network away does: a round trip takes
//! twice the delay, and bytes sent back to back stay back to back. The delay can be
//! changed while connections run (a network that slows down), for bytes that arrive after.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

pub struct DelayProxy {
    addr: SocketAddr,
    stopped: Arc<AtomicBool>,
    delay: Arc<AtomicU64>,
}

impl DelayProxy {
    /// Forwards connections to `target`, each way `delay` late.
    pub fn start(target: SocketAddr, delay: Duration) -> DelayProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stopped = Arc::new(AtomicBool::new(false));
        let delay = Arc::new(AtomicU64::new(nanos(delay)));
        let each = delay.clone();
        crate::tcp_pairs::accept_pairs(listener, target, stopped.clone(), move |pair| {
            forward_late(pair.client, pair.server_side, each.clone());
            forward_late(pair.server, pair.client_side, each.clone());
        });
        DelayProxy {
            addr,
            stopped,
            delay,
        }
    }

    /// Delays what arrives from now on by `delay` each way, on every connection.
    pub fn set_delay(&self, delay: Duration) {
        self.delay.store(nanos(delay), Ordering::Relaxed);
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.addr.port())
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
        // Wakes the accepting thread, which then sees it is stopped.
        let _ = TcpStream::connect(self.addr);
    }
}

fn nanos(delay: Duration) -> u64 {
    u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX)
}

/// Copies what `from` sends to `to`, each chunk `delay` after it arrived: one thread reads
/// and stamps, another writes when due (in the order read), so the delay is not added once
/// per chunk.
fn forward_late(mut from: TcpStream, mut to: TcpStream, delay: Arc<AtomicU64>) {
    let (chunks, due) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let late = Duration::from_nanos(delay.load(Ordering::Relaxed));
                    if chunks
                        .send((Instant::now() + late, buffer[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        for (at, chunk) in due {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            if to.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
