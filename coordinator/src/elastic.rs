//! Training that survives losing workers: when a run fails (a worker died or got stuck) and
//! the job allows it (`train.max_restarts`, `train.min_workers`), the group is re-formed
//! from the workers that re-join and the run continues from its newest checkpoint, on any
//! world size.

use crate::server::{Coordinator, TrainOptions, WorkerConn};
use crate::{CoordError, Result, RunWriter};
use lockstep_proto::{JobSpec, Summary};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a re-forming group waits for the full count before going on with fewer.
pub const REFORM_GRACE: Duration = Duration::from_secs(15);

/// An error of the launcher's side of recovery (finding checkpoints, starting processes).
pub type LauncherError = Box<dyn std::error::Error + Send + Sync>;

/// What the launcher provides the loop: checkpoints (their layout is the worker crate's)
/// and, when it owns its workers' processes, replacements for dead ones.
pub trait Recovery {
    /// The checkpoint a user's `--resume PATH` names.
    fn resolve(&self, requested: &Path) -> std::result::Result<PathBuf, LauncherError>;
    /// The newest checkpoint the run has written, if any.
    fn newest_checkpoint(&self) -> Option<PathBuf>;
    /// Starts a replacement for each owned worker that has exited; how many. Daemons
    /// re-join by themselves: a launcher that owns none starts none.
    fn replace_dead(&mut self) -> std::result::Result<usize, LauncherError>;
}

/// Which failures re-form the group, how often, and down to how many workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartPolicy {
    pub max_restarts: usize,
    /// The group re-forms with at least this many workers (the full size unless
    /// `train.min_workers` allows fewer).
    pub min_workers: usize,
    pub full_size: usize,
    pub restarts: usize,
}

impl RestartPolicy {
    pub fn of(spec: &JobSpec, full_size: usize) -> Self {
        let min_workers = if spec.train.min_workers > 0 { spec.train.min_workers } else { full_size };
        Self { max_restarts: spec.train.max_restarts, min_workers, full_size, restarts: 0 }
    }

    /// After the run failed with `e`: `Err(e)` if the run ends with it (a preemption or a
    /// deliberate stop is not a failure to recover from; the restarts may be spent), else
    /// one more restart is counted.
    pub fn on_failure(&mut self, e: CoordError) -> Result<CoordError> {
        match e {
            e @ (CoordError::Preempted { .. } | CoordError::Stopped(_)) => Err(e),
            e if self.restarts >= self.max_restarts => Err(e),
            e => {
                self.restarts += 1;
                Ok(e)
            }
        }
    }
}

/// The per-run settings `train_elastic` passes to every (re-)formed group.
pub struct ElasticRun<'a> {
    pub threads: usize,
    pub bucket_bytes: u64,
    pub trace: Option<&'a Path>,
    /// The user's `--resume`, resolved through `Recovery::resolve` after the rendezvous.
    pub resume: Option<&'a Path>,
    /// The number of workers the run was started with.
    pub workers: usize,
    pub rendezvous_timeout: Duration,
}

impl Coordinator {
    /// Trains on `joined`, re-forming the group after each recoverable failure (see
    /// [`RestartPolicy`]). Returns the summary and the number of re-formations.
    pub async fn train_elastic(
        &mut self,
        mut joined: Vec<WorkerConn>,
        spec: &JobSpec,
        run: &ElasticRun<'_>,
        writer: &mut RunWriter,
        recovery: &mut dyn Recovery,
    ) -> Result<(Summary, usize)> {
        // Resolved only now, after the rendezvous: until the workers re-joined, a rank of an
        // interrupted run may still have been writing (and pruning) checkpoints.
        let mut resume = run.resume.map(|r| recovery.resolve(r)).transpose().map_err(CoordError::Launcher)?;
        let mut policy = RestartPolicy::of(spec, run.workers);
        loop {
            let world = joined.len();
            let opts = TrainOptions {
                threads: run.threads,
                bucket_bytes: run.bucket_bytes,
                resume: resume.as_deref(),
                trace: run.trace,
            };
            let e = match self.run_train(joined, spec, opts, writer).await {
                Ok(summary) => return Ok((summary, policy.restarts)),
                Err(CoordError::Rescale { step, checkpoint }) => {
                    // Not a failure: the group grows, from the checkpoint every rank wrote.
                    let target = (world + self.pending_count()).min(spec.train.max_workers);
                    tracing::info!("scaling up from {world} to {target} workers after step {step}");
                    self.status.set_state(format!("scaling up to {target} workers after step {step}"));
                    resume = checkpoint.map(PathBuf::from).or_else(|| resume.take());
                    joined = self.rendezvous_elastic(target, target, REFORM_GRACE, run.rendezvous_timeout).await?;
                    continue;
                }
                Err(e) => policy.on_failure(e)?,
            };
            // The newest checkpoint of this run, else whatever the run started from.
            resume = recovery.newest_checkpoint().or_else(|| resume.take());
            let from = resume.as_ref().map_or("the start".to_string(), |p| p.display().to_string());
            tracing::warn!(
                "run failed on {world} workers: {e}; re-forming the group (restart {} of {}) from {from}",
                policy.restarts,
                policy.max_restarts
            );
            self.status.set_state(format!("re-forming after: {e}"));
            // Owned workers that died are replaced, so the group can re-form at full size;
            // it waits for all of them, or for `min_workers` after the grace period.
            recovery.replace_dead().map_err(CoordError::Launcher)?;
            let (min, max) = (policy.min_workers, policy.full_size.max(spec.train.max_workers));
            joined = self.rendezvous_elastic(min, max, REFORM_GRACE, run.rendezvous_timeout).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped MLP job with `sets` applied.
    fn spec(sets: &[&str]) -> JobSpec {
        let text = std::fs::read_to_string("../configs/mnist-mlp.toml").unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        JobSpec::parse(&text, Path::new("mnist-mlp.toml"), &sets).unwrap()
    }

    #[test]
    fn a_failure_re_forms_until_the_restarts_are_spent() {
        let mut policy = RestartPolicy::of(&spec(&["train.max_restarts=2"]), 4);
        assert_eq!(policy.min_workers, 4, "without min_workers the group re-forms at full size");
        for restart in 1..=2 {
            let kept = policy.on_failure(CoordError::Run("rank 1 died".into())).unwrap();
            assert_eq!(kept.to_string(), "run failed: rank 1 died");
            assert_eq!(policy.restarts, restart);
        }
        let last = policy.on_failure(CoordError::Run("rank 2 died".into())).unwrap_err();
        assert_eq!(last.to_string(), "run failed: rank 2 died");
        assert_eq!(policy.restarts, 2);
    }

    #[test]
    fn a_preemption_or_a_deliberate_stop_ends_the_run_at_once() {
        let mut policy = RestartPolicy::of(&spec(&["train.max_restarts=5", "train.min_workers=2"]), 4);
        assert_eq!(policy.min_workers, 2);
        let stop = policy.on_failure(CoordError::Stopped("loss blew up".into())).unwrap_err();
        assert!(matches!(stop, CoordError::Stopped(_)));
        let preempted = policy.on_failure(CoordError::Preempted { step: 7, checkpoint: None }).unwrap_err();
        assert!(matches!(preempted, CoordError::Preempted { step: 7, .. }));
        assert_eq!(policy.restarts, 0, "neither counts as a restart");
    }
}
