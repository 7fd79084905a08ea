//! A real HAProxy in TCP mode on free loopback ports, as a TCP load balancer in front of
//! a server under test: each listener forwards to one backend with its own `server`
//! options (`send-proxy`, `send-proxy-v2`), and the process is stopped with the value.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::free_port;

pub struct Haproxy {
    ports: Vec<u16>,
    child: Child,
    dir: PathBuf,
}

impl Haproxy {
    /// One listener per entry of `server_options`, each forwarding every connection to
    /// `backend` with those options on its `server` line, e.g. `"send-proxy-v2"`.
    /// Returns once every listener accepts; panics with the reason if HAProxy cannot start.
    pub fn tcp(backend: SocketAddr, server_options: &[&str]) -> Haproxy {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "test-haproxy-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ports: Vec<u16> = server_options.iter().map(|_| free_port()).collect();
        let mut config = String::from(
            "global\n    nbthread 1\n    maxconn 256\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n",
        );
        for (i, (port, options)) in ports.iter().zip(server_options).enumerate() {
            config.push_str(&format!(
                "listen balancer{i}\n    bind 127.0.0.1:{port}\n    \
                 server backend {backend} source 127.0.0.1 {options}\n"
            ));
        }
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, config).unwrap();
        let child = Command::new("haproxy")
            // -db: stay in the foreground, so the child is HAProxy itself.
            .args(["-db", "-q", "-f"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy must be installed (scripts/test installs it)");
        let mut haproxy = Haproxy { ports, child, dir };
        haproxy.wait_ready();
        haproxy
    }

    /// The address of listener `index` (in the order of `server_options`).
    pub fn addr(&self, index: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[index]))
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for &port in &self.ports {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("haproxy exited at start ({status})");
                }
                assert!(
                    Instant::now() < deadline,
                    "haproxy did not listen within 10 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
