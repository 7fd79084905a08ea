//! What the proxies share: accepting connections on a loopback listener and connecting each
//! to the proxied server.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A client's connection and the one made for it to the proxied server, each with a clone
/// for the other direction.
pub(crate) struct Pair {
    pub(crate) client: TcpStream,
    pub(crate) client_side: TcpStream,
    pub(crate) server: TcpStream,
    pub(crate) server_side: TcpStream,
}

/// On a thread of its own: accepts connections on `listener` until `stopped` (checked at
/// each accept), connects each to `target`, both without Nagle's delay, and hands the pair
/// to `each`. A connection the server refuses is dropped.
pub(crate) fn accept_pairs(
    listener: TcpListener,
    target: SocketAddr,
    stopped: Arc<AtomicBool>,
    each: impl Fn(Pair) + Send + 'static,
) {
    std::thread::spawn(move || {
        for client in listener.incoming() {
            if stopped.load(Ordering::Relaxed) {
                return;
            }
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(target) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (Ok(client_side), Ok(server_side)) = (client.try_clone(), server.try_clone())
            else {
                continue;
            };
            each(Pair {
                client,
                client_side,
                server,
                server_side,
            });
        }
    });
}
