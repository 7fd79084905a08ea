//! A stand-in sentinel on a free loopback port: one that names whatever address it is told
//! to (say a replica, as a sentinel that has not heard of a failover does), or one that
//! accepts connections and never answers (a sentinel on a host that went away). It counts
//! the connections it gets, so a test sees how often it was asked.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct FakeSentinel {
    port: u16,
    connections: Arc<AtomicUsize>,
    questions: Arc<AtomicUsize>,
    stopped: Arc<AtomicBool>,
}

impl FakeSentinel {
    /// A sentinel that names `127.0.0.1:<port>` as the master of any name, and answers
    /// `+OK` to every other command.
    pub fn naming(port: u16) -> FakeSentinel {
        Self::start(Some(("127.0.0.1".to_owned(), port, Duration::ZERO)))
    }

    /// A sentinel that names `127.0.0.1:<port>`, each time only after `delay` (a sentinel
    /// on a slow or distant host).
    pub fn naming_after(port: u16, delay: Duration) -> FakeSentinel {
        Self::start(Some(("127.0.0.1".to_owned(), port, delay)))
    }

    /// A sentinel that names `host:port` (anything at all, as a broken or hostile one
    /// might) as the master of any name.
    pub fn naming_host(host: &str, port: u16) -> FakeSentinel {
        Self::start(Some((host.to_owned(), port, Duration::ZERO)))
    }

    /// A sentinel that accepts connections and never answers.
    pub fn silent() -> FakeSentinel {
        Self::start(None)
    }

    fn start(names: Option<(String, u16, Duration)>) -> FakeSentinel {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let questions = Arc::new(AtomicUsize::new(0));
        let stopped = Arc::new(AtomicBool::new(false));
        let (count, asked, stop) = (connections.clone(), questions.clone(), stopped.clone());
        std::thread::spawn(move || {
            // Silent connections are kept open, unanswered, until the sentinel goes.
            let mut held = Vec::new();
            for stream in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                count.fetch_add(1, Ordering::Relaxed);
                match names.clone() {
                    Some(named) => {
                        let asked = asked.clone();
                        std::thread::spawn(move || answer(stream, named, &asked));
                    }
                    None => held.push(stream),
                }
            }
        });
        FakeSentinel {
            port,
            connections,
            questions,
            stopped,
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Connections it has accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// `SENTINEL` commands it has answered so far, over every connection.
    pub fn questions(&self) -> usize {
        self.questions.load(Ordering::Relaxed)
    }
}

impl Drop for FakeSentinel {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
        // Wakes the accepting thread so it sees the flag and ends.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Answers each command (a RESP array of bulk strings) on `stream` until it closes.
fn answer(stream: TcpStream, (host, port, delay): (String, u16, Duration), asked: &AtomicUsize) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    while let Some(command) = read_command(&mut reader) {
        let reply = if command
            .first()
            .is_some_and(|c| c.eq_ignore_ascii_case("sentinel"))
        {
            std::thread::sleep(delay);
            asked.fetch_add(1, Ordering::Relaxed);
            let port = port.to_string();
            format!(
                "*2\r\n${}\r\n{host}\r\n${}\r\n{port}\r\n",
                host.len(),
                port.len()
            )
        } else {
            "+OK\r\n".to_owned()
        };
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// One command's words, or none once the stream ends or holds something else.
fn read_command(reader: &mut impl BufRead) -> Option<Vec<String>> {
    let count: usize = read_line(reader)?.strip_prefix('*')?.parse().ok()?;
    (0..count)
        .map(|_| {
            let len: usize = read_line(reader)?.strip_prefix('$')?.parse().ok()?;
            let mut word = vec![0; len + 2];
            reader.read_exact(&mut word).ok()?;
            word.truncate(len);
            String::from_utf8(word).ok()
        })
        .collect()
}

fn read_line(reader: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    (reader.read_line(&mut line).ok()? > 0).then(|| line.trim_end().to_owned())
}
