//! lockstep-worker: builds a model replica from a job spec and runs training steps. The
//! same `Trainer` serves `lockstep train` (one process) and the worker daemon (one rank of
//! many, with a gradient all-reduce between backward and the update).

pub mod build;
pub mod cost;
pub mod daemon;
pub mod early_stop;
pub mod eval;
pub mod finetune;
pub mod guards;
pub mod lm;
pub mod log_tap;
pub mod model_file;
pub mod pipeline;
pub mod placement;
pub mod reducer;
pub mod run;
pub mod sample;
pub mod trace;
pub mod train_state;
pub mod trainer;

pub use run::{run_training, ReducerFactory, RunEvent, RunOptions};
pub use trainer::{GradReducer, NoReduce, StepStats, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Nn(#[from] lockstep_nn::NnError),
    #[error("{0}")]
    Config(String),
    #[error("collective: {0}")]
    Collective(String),
    #[error("training stopped: {0}")]
    Stopped(String),
    /// Stopped by SIGTERM/SIGINT after `step`, with a checkpoint (resume with --resume).
    #[error("preempted by signal {signal} after step {step}")]
    Preempted { step: u64, signal: i32, checkpoint: Option<String> },
    #[error("device: {0}")]
    Device(String),
}

pub type Result<T> = std::result::Result<T, WorkerError>;
