//! Timeline recording for `--trace`: spans from this process's compute and communication
//! threads, kept in memory until the task ends. Off (one relaxed atomic load per span) unless
//! a task asked for it.

use lockstep_proto::trace::{SpanKind, TraceSpan};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// About 80 MB of spans; a longer run keeps its first `MAX_SPANS` (and says so).
const MAX_SPANS: usize = 2_000_000;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// The step the compute thread is in, for spans of the communication thread.
static STEP: AtomicU64 = AtomicU64::new(0);
static SPANS: Mutex<Vec<TraceSpan>> = Mutex::new(Vec::new());

/// Starts recording (dropping anything recorded before).
pub fn start() {
    if let Ok(mut spans) = SPANS.lock() {
        spans.clear();
    }
    ENABLED.store(true, Ordering::Relaxed);
}

/// Stops recording and returns the spans.
pub fn finish() -> Vec<TraceSpan> {
    ENABLED.store(false, Ordering::Relaxed);
    SPANS.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default()
}

pub fn set_step(step: u64) {
    STEP.store(step, Ordering::Relaxed);
}

fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// A span that records itself when dropped (if recording is on).
pub struct SpanGuard {
    kind: SpanKind,
    detail: u32,
    start_us: u64,
    started: Instant,
}

pub fn span(kind: SpanKind) -> Option<SpanGuard> {
    span_detail(kind, 0)
}

pub fn span_detail(kind: SpanKind, detail: u32) -> Option<SpanGuard> {
    ENABLED.load(Ordering::Relaxed).then(|| SpanGuard { kind, detail, start_us: unix_us(), started: Instant::now() })
}

impl Drop for SpanGuard {
    fn drop(&mut self) {
        let span = TraceSpan {
            kind: self.kind,
            step: STEP.load(Ordering::Relaxed),
            detail: self.detail,
            start_us: self.start_us,
            dur_us: self.started.elapsed().as_micros() as u64,
        };
        if let Ok(mut spans) = SPANS.lock() {
            if spans.len() < MAX_SPANS {
                spans.push(span);
            } else if spans.len() == MAX_SPANS {
                tracing::warn!("trace: {MAX_SPANS} spans recorded; the rest of the run is not traced");
                spans.push(span); // once past the limit: the warning is not repeated
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorder is process-wide and other tests train concurrently, so this test finds
    /// its own spans by their `detail` tags.
    #[test]
    fn spans_are_recorded_only_while_enabled() {
        const MINE: [u32; 3] = [0xF00D_0001, 0xF00D_0002, 0xF00D_0003];
        let mine = |spans: Vec<TraceSpan>| -> Vec<TraceSpan> {
            spans.into_iter().filter(|s| MINE.contains(&s.detail)).collect()
        };
        drop(span_detail(SpanKind::Forward, MINE[0])); // not recording: nothing kept
        start();
        {
            let _outer = span_detail(SpanKind::Backward, MINE[1]);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        drop(span_detail(SpanKind::AllReduce, MINE[2]));
        let spans = mine(finish());
        assert_eq!(spans.len(), 2, "{spans:?}");
        assert_eq!((spans[0].kind, spans[0].detail), (SpanKind::Backward, MINE[1]));
        assert!(spans[0].dur_us >= 2000, "{:?}", spans[0]);
        assert_eq!((spans[1].kind, spans[1].detail), (SpanKind::AllReduce, MINE[2]));
        assert!(spans[1].start_us >= spans[0].start_us + spans[0].dur_us);
        drop(span_detail(SpanKind::Forward, MINE[0]));
        assert!(mine(finish()).is_empty());
    }
}
