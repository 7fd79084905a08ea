//! Where log lines go: a bounded queue drained to stderr by a thread of its own, so that
//! no request ever waits on a slow log reader (a stalled log shipper, a container log
//! driver under disk pressure, journald throttling).
//!
//! When the queue is full a line is dropped and counted
//! (`reset_gateway_log_lines_dropped_total`). The draining thread writes a warning with
//! the count before the next line it manages to write, so the log itself says where lines
//! are missing; it writes that warning straight to the sink, where it cannot be dropped.
//! Lines that cannot be written at all (the reader of stderr is gone) are counted too.

use std::io::{BufWriter, Stderr, Write};
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
    let drain = Drain {
        // Lines are flushed at the end of each batch the thread takes from the queue.
        out: BufWriter::with_capacity(64 * 1024, std::io::stderr()),
        format,
        reported: 0,
        buffered: 0,
    };
    let (writer, worker) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(queue_lines)
        .thread_name("log-writer")
        .finish(drain);
    DROPPED.set(writer.error_counter()).ok()?;
    let _ = INSTALLED.set(writer.clone());
    Some((writer, LogSink { _worker: worker }))
}

/// The draining end: stderr, with a warning of the lines dropped since the last.
struct Drain {
    out: BufWriter<Stderr>,
    format: LogFormat,
    /// Drops already told of.
    reported: u64,
    /// Lines in `out`'s buffer, not yet known to be written.
    buffered: u64,
}

impl Drain {
    /// The lines in the buffer (and `more`) are lost: counted, and the error goes no
    /// further (nobody is left to read it).
    fn lost(&mut self, more: u64) {
        UNWRITTEN.fetch_add(self.buffered + more, Ordering::Relaxed);
        self.buffered = 0;
    }
}

impl Write for Drain {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let dropped = dropped_lines();
        if dropped > self.reported {
            let notice = notice(self.format, dropped - self.reported, dropped);
            self.reported = dropped;
            if self.out.write_all(notice.as_bytes()).is_err() {
                self.lost(1);
                return Ok(line.len());
            }
        }
        // Flushed here rather than inside write_all, so that the lines known to be buffered
        // are the ones a failed flush loses.
        if self.out.buffer().len() + line.len() > self.out.capacity() {
            self.flush()?;
        }
        match self.out.write_all(line) {
            Ok(()) => self.buffered += 1,
            Err(_) => self.lost(1),
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.out.flush() {
            Ok(()) => self.buffered = 0,
            Err(_) => self.lost(0),
        }
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
