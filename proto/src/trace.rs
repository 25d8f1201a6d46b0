//! Timeline spans (`--trace FILE.json`): what each rank's threads did when, written as a
//! Chrome trace (the JSON "Trace Event Format" that Perfetto and chrome://tracing open).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum SpanKind {
    Forward,
    Backward,
    /// One gradient bucket's ring all-reduce, on the communication thread.
    AllReduce,
    /// Waiting for the all-reduces still in flight after backward (exposed communication).
    AllReduceWait,
    Optimizer,
    Eval,
    Checkpoint,
}

impl SpanKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Backward => "backward",
            Self::AllReduce => "all-reduce",
            Self::AllReduceWait => "all-reduce wait",
            Self::Optimizer => "optimizer",
            Self::Eval => "eval",
            Self::Checkpoint => "checkpoint",
        }
    }

    /// The thread a span runs on: communication has its own.
    pub fn thread(self) -> &'static str {
        match self {
            Self::AllReduce => "communication",
            _ => "compute",
        }
    }
}

/// One span; times in microseconds since the Unix epoch (wall clock, so ranks on one
/// machine line up exactly and ranks on NTP-synced hosts to about a millisecond).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct TraceSpan {
    pub kind: SpanKind,
    pub step: u64,
    /// The bucket of an all-reduce (0 otherwise).
    pub detail: u32,
    pub start_us: u64,
    pub dur_us: u64,
}

/// The Chrome trace of every rank's spans: one process per rank (named "rank R (host)"),
/// one thread per [`SpanKind::thread`], times relative to the earliest span.
pub fn chrome_trace(ranks: &[(usize, String, Vec<TraceSpan>)]) -> serde_json::Value {
    let origin = ranks.iter().flat_map(|(_, _, s)| s.iter().map(|s| s.start_us)).min().unwrap_or(0);
    let mut events = Vec::new();
    for (rank, host, spans) in ranks {
        events.push(serde_json::json!({
            "ph": "M", "name": "process_name", "pid": rank, "tid": 0,
            "args": { "name": format!("rank {rank} ({host})") }
        }));
        events.push(serde_json::json!({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": { "sort_index": rank }}));
        for (tid, thread) in ["compute", "communication"].iter().enumerate() {
            events.push(serde_json::json!({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": { "name": thread }}));
        }
        for s in spans {
            let tid = usize::from(s.kind.thread() == "communication");
            let mut args = serde_json::json!({ "step": s.step });
            if s.kind == SpanKind::AllReduce {
                args["bucket"] = s.detail.into();
            }
            events.push(serde_json::json!({
                "ph": "X", "name": s.kind.name(), "cat": s.kind.thread(), "pid": rank, "tid": tid,
                "ts": s.start_us - origin, "dur": s.dur_us, "args": args
            }));
        }
    }
    serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chrome_trace_has_named_processes_threads_and_relative_times() {
        let span = |kind, start_us| TraceSpan { kind, step: 3, detail: 1, start_us, dur_us: 5 };
        let trace = chrome_trace(&[
            (0, "a".into(), vec![span(SpanKind::Forward, 1_000), span(SpanKind::AllReduce, 1_010)]),
            (1, "b".into(), vec![span(SpanKind::Backward, 1_002)]),
        ]);
        let events = trace["traceEvents"].as_array().unwrap();
        let complete: Vec<_> = events.iter().filter(|e| e["ph"] == "X").collect();
        assert_eq!(complete.len(), 3);
        assert_eq!(complete[0]["ts"], 0);
        assert_eq!(complete[1]["tid"], 1);
        assert_eq!(complete[1]["args"]["bucket"], 1);
        assert_eq!(complete[2]["pid"], 1);
        assert_eq!(complete[2]["ts"], 2);
        assert!(events.iter().any(|e| e["name"] == "process_name" && e["args"]["name"] == "rank 1 (b)"));
    }
}
