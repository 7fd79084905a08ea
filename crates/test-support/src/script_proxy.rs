//! A TCP proxy on a free loopback port in front of one Redis server that refuses some script
//! calls before they run, as the proxies of managed services do: ElastiCache Serverless
//! routes a call by the keys it declares and refuses one that declares none; a proxy that
//! spreads keys over shards reads keys of several slots together (`MGET`) but refuses a
//! script whose keys it cannot route together (`CROSSSLOT`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Which script calls a [`ScriptProxy`] refuses.
#[derive(Clone, Copy, Debug)]
pub enum Refuse {
    /// Calls that declare no key: `ERR Lua scripts without any input keys are not
    /// supported.`
    NoKey,
    /// Calls that declare no key, refused in words of the proxy's own (`ERR EVALSHA needs
    /// a key`), as another service may word it.
    NoKeyInOtherWords,
    /// Calls that declare no key, refused with an error code of the proxy's own (`NOKEYS
    /// EVALSHA needs a key`).
    NoKeyWithACodeOfItsOwn,
    /// Calls whose declared keys are in more than one slot: `CROSSSLOT`.
    KeysInSeveralSlots,
}

impl Refuse {
    /// The script Redis runs in place of a refused call, which answers the refusal: Redis
    /// itself answers, so that answers stay in the order of the calls.
    fn answer(self) -> &'static [u8] {
        match self {
            Refuse::NoKey => b"return redis.error_reply('ERR Lua scripts without any input keys are not supported.')",
            Refuse::NoKeyInOtherWords => b"return redis.error_reply('ERR EVALSHA needs a key')",
            Refuse::NoKeyWithACodeOfItsOwn => {
                b"return redis.error_reply('NOKEYS EVALSHA needs a key')"
            }
            Refuse::KeysInSeveralSlots => {
                b"return redis.error_reply('CROSSSLOT Keys in request don\\'t hash to the same slot')"
            }
        }
    }

    fn refuses(self, keys: &[Vec<u8>]) -> bool {
        match self {
            Refuse::NoKey | Refuse::NoKeyInOtherWords | Refuse::NoKeyWithACodeOfItsOwn => {
                keys.is_empty()
            }
            Refuse::KeysInSeveralSlots => {
                keys.windows(2).any(|pair| slot(&pair[0]) != slot(&pair[1]))
            }
        }
    }
}

/// Forwards every command to a Redis server but the script calls (`EVAL`, `EVALSHA`) its
/// rule refuses, which get the refusal a managed service's proxy answers.
pub struct ScriptProxy {
    addr: SocketAddr,
    stopped: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    passed: Arc<AtomicUsize>,
}

impl ScriptProxy {
    /// Forwards connections to the Redis server at `target`, refusing as `rule` says.
    pub fn start(target: SocketAddr, rule: Refuse) -> ScriptProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = ScriptProxy {
            addr: listener.local_addr().unwrap(),
            stopped: Arc::default(),
            refused: Arc::default(),
            passed: Arc::default(),
        };
        let (stop, refused, passed) = (
            proxy.stopped.clone(),
            proxy.refused.clone(),
            proxy.passed.clone(),
        );
        crate::tcp_pairs::accept_pairs(listener, target, stop, move |pair| {
            let (refused, passed) = (refused.clone(), passed.clone());
            let (client, server_side) = (pair.client, pair.server_side);
            std::thread::spawn(move || {
                forward_commands(client, server_side, rule, &refused, &passed)
            });
            let (mut server, mut client_side) = (pair.server, pair.client_side);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server, &mut client_side);
                let _ = client_side.shutdown(std::net::Shutdown::Both);
            });
        });
        proxy
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.addr.port())
    }

    /// Script calls refused so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    /// Script calls passed on so far.
    pub fn passed(&self) -> usize {
        self.passed.load(Ordering::SeqCst)
    }
}

impl Drop for ScriptProxy {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
        // Wakes the accepting thread, which then sees it is stopped.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Reads commands from `client` and writes them to `server`, a refused script call
/// replaced by the script that answers its refusal.
fn forward_commands(
    mut client: TcpStream,
    mut server: TcpStream,
    rule: Refuse,
    refused: &AtomicUsize,
    passed: &AtomicUsize,
) {
    let mut pending = Vec::new();
    let mut buffer = vec![0; 1 << 16];
    while let Ok(n) = client.read(&mut buffer) {
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buffer[..n]);
        let mut out = Vec::new();
        while let Some((command, used)) = next_command(&pending) {
            match script_keys(&command) {
                Some(keys) if rule.refuses(keys) => {
                    refused.fetch_add(1, Ordering::SeqCst);
                    out.extend(encode(&[b"EVAL", rule.answer(), b"0"]));
                }
                keys => {
                    if keys.is_some() {
                        passed.fetch_add(1, Ordering::SeqCst);
                    }
                    out.extend_from_slice(&pending[..used]);
                }
            }
            pending.drain(..used);
        }
        if server.write_all(&out).is_err() {
            break;
        }
    }
    let _ = server.shutdown(std::net::Shutdown::Both);
}

/// The first whole command in `bytes` (an array of bulk strings, as clients send them)
/// and how many bytes it takes, or none until it has all arrived.
fn next_command(bytes: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    let line = |from: usize| -> Option<(usize, usize)> {
        let end = from + bytes.get(from..)?.windows(2).position(|w| w == b"\r\n")?;
        let number = std::str::from_utf8(bytes.get(from + 1..end)?)
            .ok()?
            .parse()
            .ok()?;
        Some((number, end + 2))
    };
    let (count, mut at) = line(0)?;
    let mut command = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let (len, start) = line(at)?;
        command.push(bytes.get(start..start + len)?.to_vec());
        at = start + len + 2;
    }
    (bytes.len() >= at).then_some((command, at))
}

/// A script call's declared keys (`EVAL`/`EVALSHA script numkeys key...`), or none for any
/// other command.
fn script_keys(command: &[Vec<u8>]) -> Option<&[Vec<u8>]> {
    let name = command.first()?;
    if !(name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL")) {
        return None;
    }
    let count: usize = std::str::from_utf8(command.get(2)?).ok()?.parse().ok()?;
    command.get(3..3 + count)
}

fn encode(arguments: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", arguments.len()).into_bytes();
    for argument in arguments {
        out.extend(format!("${}\r\n", argument.len()).into_bytes());
        out.extend_from_slice(argument);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A key's slot, as Redis Cluster reckons it: CRC16 (XMODEM) of its hash tag, or of the
/// whole key, modulo 16384.
fn slot(key: &[u8]) -> u16 {
    let tag = key.iter().position(|&b| b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    let mut crc: u16 = 0;
    for &byte in tag.unwrap_or(key) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // As `CLUSTER KEYSLOT` answers.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        // CRC16-XMODEM of "123456789" is 0x31c3, which is below 16384.
        assert_eq!(slot(b"123456789"), 0x31c3);
    }
}
