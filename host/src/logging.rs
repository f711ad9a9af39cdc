//! Logging that never blocks or stops forwarding.
//!
//! Log lines go through a bounded queue to a thread of their own (tracing-appender's
//! non-blocking writer) that writes them to standard error. When the queue is full (standard
//! error is a pipe nobody reads, a slow terminal), lines are dropped and counted; when a write
//! fails (a full disk, a reader that went away), the line is dropped and counted too, never a
//! panic. `edgebridge_log_lines_dropped_total{reason}` exposes both.

use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Lines the queue holds before new ones are dropped.
pub const QUEUE_LINES: usize = 10_000;

static WRITE_ERRORS: AtomicU64 = AtomicU64::new(0);
static QUEUE_FULL: OnceLock<ErrorCounter> = OnceLock::new();

/// Lines dropped because the queue was full.
pub fn dropped_full() -> u64 {
    QUEUE_FULL.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Lines dropped because writing them failed.
pub fn dropped_write_errors() -> u64 {
    WRITE_ERRORS.load(Ordering::Relaxed)
}

/// Standard error, whose failures are counted instead of returned: the writer thread goes on
/// with the next line.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().write_all(buf).is_err() {
            WRITE_ERRORS.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// The writer for the log subscriber; keep the guard until the process ends (dropping it
/// flushes what is queued, waiting about a second at most).
pub fn non_blocking_stderr() -> (tracing_appender::non_blocking::NonBlocking, WorkerGuard) {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("edgebridge-log")
        .finish(Stderr);
    let _ = QUEUE_FULL.set(writer.error_counter());
    (writer, guard)
}
