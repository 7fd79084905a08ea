//! Where log lines go: a bounded queue drained to stderr by a thread of its own, so that
//! no request ever waits on a slow log reader (a stalled log shipper, a container log
//! driver under disk pressure, journald throttling).
//!
//! When the queue is full a line is dropped and counted
//! (`reset_gateway_log_lines_dropped_total`). The draining thread writes a warning with
//! the count before the next line it manages to write, so the log itself says where lines
//! are missing; it writes that warning straight to the sink, where it cannot be dropped.
//! Lines that cannot be written at all (the reader of stderr is gone) are counted too.

use std::io::{Stderr, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

use crate::config::LogFormat;

/// The process's drop counter, once the sink is installed.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// The sink's writer, kept once the sink is installed with the JSON format and the
/// gateway's subscriber: access lines are then written into it directly (`json_line.rs`).
static INSTALLED: OnceLock<NonBlocking> = OnceLock::new();
static ACCESS: OnceLock<NonBlocking> = OnceLock::new();

/// Access lines go straight to the sink from now on, bypassing the subscriber's formatter.
pub(super) fn write_access_lines_directly() {
    if let Some(writer) = INSTALLED.get() {
        let _ = ACCESS.set(writer.clone());
    }
}

/// Where access lines are written directly, when they are.
pub(super) fn access_writer() -> Option<NonBlocking> {
    ACCESS.get().cloned()
}

/// Lines taken from the queue that stderr would not take (its reader has gone).
static UNWRITTEN: AtomicU64 = AtomicU64::new(0);

/// Lines dropped because the log sink did not keep up, or could not be written.
pub fn dropped_lines() -> u64 {
    let queue = DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64);
    queue + UNWRITTEN.load(Ordering::Relaxed)
}

/// Keeps the draining thread; dropping it writes out what is queued (for at most about a
/// second, so that a stalled sink cannot hold up the exit).
#[must_use = "dropping it stops the log"]
pub struct LogSink {
    _worker: WorkerGuard,
}

/// The writer the subscriber formats into, and the sink that keeps it drained. `None`
/// when a sink already exists (a second `init` in one process).
pub(super) fn install(format: LogFormat, queue_lines: usize) -> Option<(NonBlocking, LogSink)> {
    if DROPPED.get().is_some() {
        return None;
    }
    // Lines are flushed at the end of each batch the thread takes from the queue.
    let drain = Drain::new(std::io::stderr(), format, dropped_lines, &UNWRITTEN);
    let (writer, worker) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(queue_lines)
        .thread_name("log-writer")
        .finish(drain);
    DROPPED.set(writer.error_counter()).ok()?;
    let _ = INSTALLED.set(writer.clone());
    Some((writer, LogSink { _worker: worker }))
}

/// The draining end: stderr, with a warning of the lines dropped since the last warning
/// that reached it. Lines are gathered in a buffer of its own and written at the end of
/// each batch (or when it is full); a write that fails (a full disk) loses the buffer,
/// counted, rather than keeping it to write late (`BufWriter` keeps it, and its lines
/// would appear long after the warning that counted them lost).
struct Drain<W: Write = Stderr> {
    out: W,
    buffer: Vec<u8>,
    /// Where each warning in `buffer` starts.
    warnings: Vec<usize>,
    /// A failed write left a line cut short in `out`: the next write ends it first, so
    /// the line after it stays whole.
    cut_line: bool,
    format: LogFormat,
    /// Drops told of by the warnings in `buffer` and before.
    reported: u64,
    /// Drops told of by the warnings known to be written: a warning lost with the buffer
    /// told nobody, so the next one counts from here.
    reported_out: u64,
    /// Every line dropped so far ([`dropped_lines`]).
    dropped: fn() -> u64,
    /// Where the lines it could not write are counted (`UNWRITTEN`).
    unwritten: &'static AtomicU64,
}

/// How much the sink gathers before it writes.
const BUFFER_BYTES: usize = 64 * 1024;

impl<W: Write> Drain<W> {
    fn new(out: W, format: LogFormat, dropped: fn() -> u64, unwritten: &'static AtomicU64) -> Self {
        Drain {
            out,
            buffer: Vec::with_capacity(BUFFER_BYTES),
            warnings: Vec::new(),
            cut_line: false,
            format,
            reported: 0,
            reported_out: 0,
            dropped,
            unwritten,
        }
    }

    /// Writes the buffer out; on failure counts the lines it could not write as dropped
    /// (the error goes no further: nobody is left to read it).
    fn write_buffer(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        // The end of a line cut short by the last failed write, in front of the rest.
        let ending = usize::from(self.cut_line);
        if self.cut_line {
            self.buffer.insert(0, b'\n');
            self.warnings.iter_mut().for_each(|at| *at += 1);
        }
        let mut written = 0;
        let failed = loop {
            if written == self.buffer.len() {
                break false;
            }
            match self.out.write(&self.buffer[written..]) {
                Ok(0) => break true,
                Ok(n) => written += n,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        let failed = failed || self.out.flush().is_err();
        if failed {
            // Whole lines not written, and one cut short, less the warnings among them
            // (and less the ending of an earlier cut line, no line of its own).
            let unwritten = &self.buffer[written.max(ending)..];
            let lines = memchr::memchr_iter(b'\n', unwritten).count() as u64;
            let warnings = self.warnings.iter().filter(|at| **at + 1 > written).count() as u64;
            self.unwritten
                .fetch_add(lines.saturating_sub(warnings), Ordering::Relaxed);
            self.reported = self.reported_out;
            // Nothing written: a line cut before is still cut.
            if written > 0 {
                self.cut_line = self.buffer[written - 1] != b'\n';
            }
        } else {
            self.reported_out = self.reported;
            self.cut_line = false;
        }
        self.buffer.clear();
        self.warnings.clear();
    }
}

impl<W: Write> Write for Drain<W> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let dropped = (self.dropped)();
        if dropped > self.reported {
            let notice = notice(self.format, dropped - self.reported, dropped);
            self.reported = dropped;
            self.warnings.push(self.buffer.len());
            self.buffer.extend_from_slice(notice.as_bytes());
        }
        if self.buffer.len() + line.len() > BUFFER_BYTES {
            self.write_buffer();
        }
        self.buffer.extend_from_slice(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.write_buffer();
        Ok(())
    }
}

const NOTICE: &str = "log lines dropped: the log sink did not keep up";
const TARGET: &str = "reset_gateway::telemetry";

/// The warning, shaped like the subscriber's own lines in `format`.
fn notice(format: LogFormat, dropped: u64, dropped_total: u64) -> String {
    let now = super::timestamp(std::time::SystemTime::now());
    match format {
        LogFormat::Json => format!(
            "{{\"timestamp\":\"{now}\",\"level\":\"WARN\",\"message\":\"{NOTICE}\",\
             \"dropped\":{dropped},\"dropped_total\":{dropped_total},\"target\":\"{TARGET}\"}}\n"
        ),
        LogFormat::Text => format!(
            "{now}  WARN {TARGET}: {NOTICE} dropped={dropped} dropped_total={dropped_total}\n"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    /// A disk that fills up (at once, or after `room` more bytes) and is freed again.
    #[derive(Clone, Default)]
    struct Disk {
        full: Arc<AtomicBool>,
        room: Arc<Mutex<Option<usize>>>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Disk {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let mut room = self.room.lock().unwrap();
            if self.full.load(Ordering::Relaxed) || *room == Some(0) {
                return Err(std::io::Error::other("no space left on device"));
            }
            let n = room.map_or(bytes.len(), |room| room.min(bytes.len()));
            *room = room.map(|room| room - n);
            self.written.lock().unwrap().extend_from_slice(&bytes[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    static QUEUE_DROPS: AtomicU64 = AtomicU64::new(0);
    static LOST: AtomicU64 = AtomicU64::new(0);

    fn drops() -> u64 {
        QUEUE_DROPS.load(Ordering::Relaxed) + LOST.load(Ordering::Relaxed)
    }

    #[test]
    fn a_warning_lost_on_a_full_disk_is_counted_in_the_next_one() {
        let disk = Disk::default();
        let mut drain = Drain::new(disk.clone(), LogFormat::Json, drops, &LOST);
        let before = drops();
        QUEUE_DROPS.fetch_add(5, Ordering::Relaxed);
        disk.full.store(true, Ordering::Relaxed);
        // The warning of 5 and the line after it are buffered, and lost with the flush.
        drain.write_all(b"{\"line\":1}\n").unwrap();
        drain.flush().unwrap();
        assert!(disk.written.lock().unwrap().is_empty());
        disk.full.store(false, Ordering::Relaxed);
        drain.write_all(b"{\"line\":2}\n").unwrap();
        drain.flush().unwrap();
        let written = String::from_utf8(disk.written.lock().unwrap().clone()).unwrap();
        let warning: serde_json::Value =
            serde_json::from_str(written.lines().next().unwrap()).unwrap();
        // The 5 the queue dropped and the line lost on the full disk: none was told of.
        assert_eq!(
            warning["dropped"].as_u64(),
            Some(drops() - before),
            "{written}"
        );
        assert_eq!(drops() - before, 6);
        assert_eq!(written.lines().nth(1), Some("{\"line\":2}"));
    }

    #[test]
    fn a_line_cut_short_by_a_full_disk_leaves_the_next_lines_whole() {
        let disk = Disk::default();
        static CUT_LOST: AtomicU64 = AtomicU64::new(0);
        let mut drain = Drain::new(disk.clone(), LogFormat::Json, || 0, &CUT_LOST);
        *disk.room.lock().unwrap() = Some(15);
        drain.write_all(b"{\"line\":1}\n").unwrap();
        drain.write_all(b"{\"line\":2}\n").unwrap();
        drain.flush().unwrap();
        // Still full at the next batch, and a flush with nothing to write.
        drain.write_all(b"{\"line\":3}\n").unwrap();
        drain.flush().unwrap();
        drain.flush().unwrap();
        *disk.room.lock().unwrap() = None;
        drain.write_all(b"{\"line\":4}\n").unwrap();
        drain.flush().unwrap();
        let written = String::from_utf8(disk.written.lock().unwrap().clone()).unwrap();
        assert_eq!(written, "{\"line\":1}\n{\"li\n{\"line\":4}\n");
        // The cut line and the one written onto a full disk, not the ending added.
        assert_eq!(CUT_LOST.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn the_notice_is_a_json_line_like_the_others() {
        let line = notice(LogFormat::Json, 12, 40);
        assert!(line.ends_with('\n'));
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["level"], "WARN");
        assert_eq!(json["message"], NOTICE);
        assert_eq!(
            (json["dropped"].as_u64(), json["dropped_total"].as_u64()),
            (Some(12), Some(40))
        );
        let text = notice(LogFormat::Text, 12, 40);
        assert!(
            text.contains("WARN") && text.contains("dropped=12"),
            "{text}"
        );
    }
}
