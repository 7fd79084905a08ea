//! A TCP proxy in front of one Redis server that refuses some script calls before they
//! run, as the proxies of managed services do: ElastiCache Serverless routes a call by the
//! keys it declares and refuses one that declares none; a proxy that spreads keys over
//! shards refuses one whose keys it cannot route together (`CROSSSLOT`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Which script calls the proxy refuses.
#[derive(Clone, Copy)]
pub(super) enum Refuse {
    /// Calls that declare no key: `ERR Lua scripts without any input keys are not
    /// supported.`
    NoKey,
    /// Calls whose declared keys are in more than one slot: `CROSSSLOT`.
    KeysInSeveralSlots,
}

impl Refuse {
    /// The script Redis runs in place of a refused call, which answers the refusal: Redis
    /// itself answers, so that answers stay in the order of the calls.
    fn answer(self) -> &'static [u8] {
        match self {
            Refuse::NoKey => b"return redis.error_reply('ERR Lua scripts without any input keys are not supported.')",
            Refuse::KeysInSeveralSlots => b"return redis.error_reply('CROSSSLOT Keys in request don\\'t hash to the same slot')",
        }
    }

    fn refuses(self, keys: &[Vec<u8>]) -> bool {
        match self {
            Refuse::NoKey => keys.is_empty(),
            Refuse::KeysInSeveralSlots => {
                keys.windows(2).any(|pair| slot(&pair[0]) != slot(&pair[1]))
            }
        }
    }
}

/// A key's slot, as Redis Cluster reckons it (CRC16 of its hash tag, or of the key).
fn slot(key: &[u8]) -> u16 {
    let tag = key.iter().position(|&b| b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tag.unwrap_or(key)) % 16384
}

/// A TCP proxy in front of one Redis server that passes every command on but the script
/// calls (`EVAL`/`EVALSHA`) its rule refuses.
pub(super) struct ScriptProxy {
    pub(super) port: u16,
    /// Script calls refused.
    pub(super) refused: Arc<AtomicUsize>,
    /// Script calls passed on.
    pub(super) passed: Arc<AtomicUsize>,
}

impl ScriptProxy {
    pub(super) async fn start(server: u16, rule: Refuse) -> ScriptProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = ScriptProxy {
            port: listener.local_addr().unwrap().port(),
            refused: Arc::default(),
            passed: Arc::default(),
        };
        let (refused, passed) = (proxy.refused.clone(), proxy.passed.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", server)).await
                else {
                    continue;
                };
                let (refused, passed) = (refused.clone(), passed.clone());
                tokio::spawn(async move {
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = upstream.into_split();
                    let upward = tokio::spawn(async move {
                        let mut pending = Vec::new();
                        let mut buffer = vec![0; 1 << 16];
                        while let Ok(n) = client_read.read(&mut buffer).await {
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
                            if server_write.write_all(&out).await.is_err() {
                                break;
                            }
                        }
                    });
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    upward.abort();
                });
            }
        });
        proxy
    }

    pub(super) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// The first whole command in `bytes` (an array of bulk strings, as clients send them)
/// and how many bytes it takes, or none until it has all arrived.
fn next_command(bytes: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    let line = |from: usize| -> Option<(usize, usize)> {
        let end = from + bytes.get(from..)?.windows(2).position(|w| w == b"\r\n")?;
        let number = std::str::from_utf8(&bytes[from + 1..end])
            .ok()?
            .parse()
            .ok()?;
        Some((number, end + 2))
    };
    let (count, mut at) = line(0)?;
    let mut command = Vec::with_capacity(count);
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
