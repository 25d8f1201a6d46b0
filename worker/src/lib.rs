//! lockstep-worker: builds a model replica from a job spec and runs training steps. The
//! same `Trainer` serves `lockstep train` (one process) and the worker daemon (one rank of
//! many, with a gradient all-reduce between backward and the update).

pub mod build;
pub mod checkpoint_dir;
pub mod cost;
pub mod daemon;
pub mod distill;
pub mod early_stop;
pub mod eval;
pub mod evaluation;
pub mod finetune;
pub mod fuzz;
pub mod gan;
mod grad_health;
pub mod guards;
pub mod lm;
pub mod log_tap;
pub mod model_file;
pub mod pipeline;
pub mod pipeline_launch;
pub mod placement;
pub mod reducer;
pub mod reproducible;
pub mod run;
pub mod sample;
mod sequential;
pub mod trace;
pub mod train_state;
pub mod trainer;
pub mod zero;

pub use grad_health::grad_norm_ratio;
pub use run::{run_training, ReducerFactory, RunEvent, RunOptions};
pub use trainer::{GradReducer, NoReduce, StepStats, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Nn(#[from] lockstep_nn::NnError),
    /// A backend op failed: a device error, or an op the backend has no kernel for.
    #[error(transparent)]
    Kernel(#[from] lockstep_kernels::KernelError),
    /// The job asks for something that cannot be done (a field's value, a combination).
    #[error("{0}")]
    Config(String),
    /// A job (from a file's header, a checkpoint or the coordinator) that does not parse.
    #[error(transparent)]
    Job(#[from] lockstep_proto::job::JobError),
    /// The pipeline placement of the job does not fit the model.
    #[error(transparent)]
    Placement(#[from] crate::placement::PlacementError),
    /// A file that is not what it should be: a model, checkpoint or dataset.
    #[error("{}: {reason}", path.display())]
    BadFile { path: std::path::PathBuf, reason: String },
    /// Reading or writing `path` (`what` it is) failed.
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: std::path::PathBuf, source: std::io::Error },
    #[error("collective: {0}")]
    Collective(String),
    /// A collective operation or the set-up of a link failed.
    #[error("collective: {0}")]
    Comm(#[from] lockstep_collective::CollectiveError),
    /// A collective failed in training step `step`.
    #[error("collective: step {step}: {source}")]
    CommAtStep { step: u64, source: lockstep_collective::CollectiveError },
    /// A broken invariant of lockstep itself, reported instead of a panic.
    #[error("internal error (a bug in lockstep): {0}")]
    Internal(String),
    #[error("training stopped: {0}")]
    Stopped(String),
    /// Stopped by SIGTERM/SIGINT after `step`, with a checkpoint (resume with --resume).
    #[error("preempted by signal {signal} after step {step}")]
    Preempted { step: u64, signal: i32, checkpoint: Option<String> },
    #[error("device: {0}")]
    Device(String),
    /// A peer presented a certificate other than the one pinned: the wrong peer, or a
    /// man in the middle. Never retried.
    #[error("refusing {peer}: certificate fingerprint mismatch: pinned {pinned}, it presented {presented}")]
    PeerIdentity { peer: String, pinned: String, presented: String },
}

pub type Result<T> = std::result::Result<T, WorkerError>;

/// Runs a task on a device backend, turning a panic inside the device libraries into the
/// task's `WorkerError::Device`, so the run fails with the reason and a daemon stays up for
/// the next task. Backend ops report their own failures as `KernelError`s (an allocation
/// that runs out of memory is one); this is the net under code that is not ours.
pub fn device_task<T, E: From<WorkerError>>(
    task: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(task)).unwrap_or_else(|panic| {
        let reason = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("the device backend panicked");
        Err(WorkerError::Device(reason.to_string()).into())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_backend_panic_becomes_the_task_error() {
        let failed = super::device_task(|| -> super::Result<()> { panic!("cuda:0 (H200): cuBLAS handle lost") });
        let err = failed.unwrap_err().to_string();
        assert!(err.starts_with("device: cuda:0") && err.contains("handle lost"), "{err}");
        assert_eq!(super::device_task(|| Ok::<_, super::WorkerError>(3)).unwrap(), 3);
    }
}
