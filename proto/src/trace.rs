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

/// Where the compute threads' wait for gradients went, over the steps every rank traced:
/// shares of the summed step time (first forward start to last optimizer end, over ranks).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CommBreakdown {
    pub steps: usize,
    /// Communication after the last rank finished backward: what overlapping did not hide.
    pub exposed: f64,
    /// Ranks waiting for slower ones to finish backward, averaged over ranks: imbalance, not
    /// communication (a `comm` share counts both).
    pub imbalance: f64,
}

/// The [`CommBreakdown`] of wall-clock-aligned spans of two or more ranks; None if no step
/// has a forward, backward, wait and optimizer span on every rank.
pub fn comm_breakdown(ranks: &[(usize, String, Vec<TraceSpan>)]) -> Option<CommBreakdown> {
    use std::collections::BTreeMap;
    if ranks.len() < 2 {
        return None;
    }
    // step -> per rank [forward start, backward end, wait end, optimizer end]
    let mut steps: BTreeMap<u64, Vec<[Option<u64>; 4]>> = BTreeMap::new();
    for (r, (_, _, spans)) in ranks.iter().enumerate() {
        for s in spans {
            let (slot, at) = match s.kind {
                SpanKind::Forward => (0, s.start_us),
                SpanKind::Backward => (1, s.start_us + s.dur_us),
                SpanKind::AllReduceWait => (2, s.start_us + s.dur_us),
                SpanKind::Optimizer => (3, s.start_us + s.dur_us),
                _ => continue,
            };
            let times = &mut steps.entry(s.step).or_insert_with(|| vec![[None; 4]; ranks.len()])[r][slot];
            // A step's first forward (micro-batches: several) and last end of everything else.
            *times = Some(match (*times, slot) {
                (Some(t), 0) => t.min(at),
                (Some(t), _) => t.max(at),
                (None, _) => at,
            });
        }
    }
    let (mut total, mut exposed, mut imbalance, mut counted) = (0.0, 0.0, 0.0, 0);
    for per_rank in steps.values() {
        let Some(times) =
            per_rank.iter().map(|t| t.iter().copied().collect::<Option<Vec<u64>>>()).collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        let column = |i: usize| times.iter().map(move |t| t[i]);
        let last_backward = column(1).max().unwrap_or(0);
        let start = column(0).min().unwrap_or(0);
        let end = column(3).max().unwrap_or(0);
        total += end.saturating_sub(start) as f64;
        exposed += column(2).max().unwrap_or(0).saturating_sub(last_backward) as f64;
        imbalance += column(1).map(|b| (last_backward - b) as f64).sum::<f64>() / times.len() as f64;
        counted += 1;
    }
    (counted > 0 && total > 0.0).then(|| CommBreakdown {
        steps: counted,
        exposed: exposed / total,
        imbalance: imbalance / total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rank 1 ends backward 10 µs after rank 0; the wait ends 10 µs after that on both, then
    /// the update; each step runs 100 µs: 10% exposed, imbalance (10 + 0) / 2 = 5%.
    #[test]
    fn the_breakdown_separates_exposed_communication_from_imbalance() {
        let span = |kind, step, start_us, dur_us| TraceSpan { kind, step, detail: 0, start_us, dur_us };
        let rank = |late: u64| -> Vec<TraceSpan> {
            (0..3u64)
                .flat_map(|step| {
                    let t = step * 1_000;
                    [
                        span(SpanKind::Forward, step, t, 30),
                        span(SpanKind::Backward, step, t + 30, 40 + late),
                        span(SpanKind::AllReduceWait, step, t + 70 + late, 20 - late),
                        span(SpanKind::Optimizer, step, t + 100 - 10, 10),
                    ]
                })
                .collect()
        };
        let ranks = [(0, "a".to_string(), rank(0)), (1, "a".to_string(), rank(10))];
        let b = comm_breakdown(&ranks).unwrap();
        assert_eq!(b.steps, 3);
        assert!((b.exposed - 0.10).abs() < 1e-12, "{b:?}");
        assert!((b.imbalance - 0.05).abs() < 1e-12, "{b:?}");
        assert_eq!(comm_breakdown(&ranks[..1]), None, "one rank: nothing to compare");
    }

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
