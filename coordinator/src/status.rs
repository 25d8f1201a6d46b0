//! The live state behind `lockstep status`: the run and one row per rank, updated by the
//! coordinator as messages arrive and read by the status endpoint.

use lockstep_proto::wire::{ClusterStatus, RankStatus};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone)]
pub struct StatusBoard {
    inner: Arc<Mutex<Board>>,
}

struct Board {
    started: Instant,
    status: ClusterStatus,
    /// When the coordinator last heard from each rank.
    last_heard: Vec<Instant>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        let board = Board { started: Instant::now(), status: ClusterStatus::default(), last_heard: Vec::new() };
        Self { inner: Arc::new(Mutex::new(board)) }
    }
}

impl StatusBoard {
    fn with(&self, f: impl FnOnce(&mut Board)) {
        if let Ok(mut board) = self.inner.lock() {
            f(&mut board);
        }
    }

    pub fn set_job(&self, name: &str, total_steps: u64) {
        self.with(|b| {
            b.status.job = name.to_string();
            b.status.total_steps = total_steps;
        });
    }

    pub fn set_state(&self, state: impl Into<String>) {
        let state = state.into();
        self.with(|b| b.status.state = state);
    }

    /// A new group: rank i is `members[i]` = (host, pid).
    pub fn set_group(&self, members: &[(String, u32)]) {
        self.with(|b| {
            let now = Instant::now();
            b.status.ranks = members
                .iter()
                .enumerate()
                .map(|(rank, (host, pid))| RankStatus {
                    rank,
                    host: host.clone(),
                    pid: *pid,
                    state: "joined".into(),
                    ..Default::default()
                })
                .collect();
            b.last_heard = vec![now; members.len()];
        });
    }

    /// Any message from `rank` is a sign of life.
    pub fn heard(&self, rank: usize) {
        self.with(|b| {
            if let Some(t) = b.last_heard.get_mut(rank) {
                *t = Instant::now();
            }
        });
    }

    pub fn progress(&self, rank: usize, step: u64, examples_per_s: f64, comm_share: f64) {
        self.with(|b| {
            if let Some(r) = b.status.ranks.get_mut(rank) {
                r.state = "training".into();
                r.step = r.step.max(step);
                // NaN: this report does not carry the rate (a logged step's record).
                if examples_per_s.is_finite() {
                    r.examples_per_s = examples_per_s;
                }
                if comm_share.is_finite() {
                    r.comm_share = comm_share;
                }
            }
        });
    }

    pub fn set_rank_state(&self, rank: usize, state: &str) {
        self.with(|b| {
            if let Some(r) = b.status.ranks.get_mut(rank) {
                r.state = state.to_string();
            }
        });
    }

    pub fn snapshot(&self) -> ClusterStatus {
        let Ok(b) = self.inner.lock() else { return ClusterStatus::default() };
        let mut status = b.status.clone();
        status.uptime_s = b.started.elapsed().as_secs_f64();
        for (row, heard) in status.ranks.iter_mut().zip(&b.last_heard) {
            row.since_heard_s = heard.elapsed().as_secs_f64();
        }
        status
    }
}

/// The status as a table, for `lockstep status`.
pub fn render(status: &ClusterStatus) -> String {
    let step = status.ranks.iter().map(|r| r.step).max().unwrap_or(0);
    let mut out = format!(
        "job {}: {}; step {step}/{}; {} ranks; coordinator up {:.0} s\n",
        if status.job.is_empty() { "-" } else { &status.job },
        status.state,
        status.total_steps,
        status.ranks.len(),
        status.uptime_s
    );
    out += &format!(
        "{:>4}  {:<16} {:>8}  {:<9} {:>8}  {:>14}  {:>10}  {:>5}\n",
        "rank", "host", "pid", "state", "step", "last heartbeat", "examples/s", "comm"
    );
    for r in &status.ranks {
        out += &format!(
            "{:>4}  {:<16} {:>8}  {:<9} {:>8}  {:>12.1} s  {:>10.0}  {:>4.0}%\n",
            r.rank,
            r.host,
            r.pid,
            r.state,
            r.step,
            r.since_heard_s,
            r.examples_per_s,
            r.comm_share * 100.0
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_tracks_ranks_and_renders_a_row_each() {
        let board = StatusBoard::default();
        board.set_job("mnist-mlp", 100);
        board.set_state("training");
        board.set_group(&[("a".into(), 11), ("b".into(), 12)]);
        board.progress(1, 40, 512.0, 0.25);
        board.set_rank_state(0, "lost");
        let s = board.snapshot();
        assert_eq!(s.ranks.len(), 2);
        assert_eq!((s.ranks[1].step, s.ranks[1].state.as_str()), (40, "training"));
        assert_eq!(s.ranks[0].state, "lost");
        let table = render(&s);
        assert!(table.starts_with("job mnist-mlp: training; step 40/100; 2 ranks"), "{table}");
        let row = table.lines().find(|l| l.trim_start().starts_with("1 ")).unwrap();
        assert!(row.contains(" b ") && row.contains("512") && row.contains("25%"), "{row}");
    }
}
