//! Per-rank log files: the process's log lines, captured while a task runs and forwarded to
//! the coordinator (which writes RUN_DIR/logs/rank-R.log), or written to a file directly.
//! The binary installs [`TapWriter`] as a second `tracing` output beside stderr.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Beyond this many bytes waiting to be forwarded, lines are dropped (and counted).
const MAX_BUFFERED: usize = 4 << 20;

static CAPTURING: AtomicBool = AtomicBool::new(false);
static BUFFER: Mutex<(String, usize)> = Mutex::new((String::new(), 0));
static FILE: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Starts keeping log lines for [`drain`].
pub fn start_capture() {
    if let Ok(mut b) = BUFFER.lock() {
        *b = (String::new(), 0);
    }
    CAPTURING.store(true, Ordering::Relaxed);
}

pub fn stop_capture() {
    CAPTURING.store(false, Ordering::Relaxed);
}

/// The lines captured since the last call.
pub fn drain() -> String {
    let Ok(mut b) = BUFFER.lock() else { return String::new() };
    let (mut text, dropped) = std::mem::take(&mut *b);
    if dropped > 0 {
        text.push_str(&format!("[{dropped} bytes of log lines dropped: the coordinator did not keep up]\n"));
    }
    text
}

/// Also appends every log line to `path` from now on.
pub fn write_to_file(path: &std::path::Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    if let Ok(mut f) = FILE.lock() {
        *f = Some(file);
    }
    Ok(())
}

/// A `tracing_subscriber` writer: `fmt::layer().with_ansi(false).with_writer(|| TapWriter)`.
pub struct TapWriter;

impl Write for TapWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if CAPTURING.load(Ordering::Relaxed) {
            if let Ok(mut b) = BUFFER.lock() {
                if b.0.len() + bytes.len() <= MAX_BUFFERED {
                    b.0.push_str(&String::from_utf8_lossy(bytes));
                } else {
                    b.1 += bytes.len();
                }
            }
        }
        if let Ok(mut f) = FILE.lock() {
            if let Some(file) = f.as_mut() {
                let _ = file.write_all(bytes);
            }
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_only_while_started_and_drains_once() {
        let _ = TapWriter.write(b"before\n");
        start_capture();
        let _ = TapWriter.write(b"one\n");
        let _ = TapWriter.write(b"two\n");
        assert_eq!(drain(), "one\ntwo\n");
        assert_eq!(drain(), "");
        stop_capture();
        let _ = TapWriter.write(b"after\n");
        assert_eq!(drain(), "");
    }
}
