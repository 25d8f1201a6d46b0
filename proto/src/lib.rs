//! lockstep-proto: the job spec (TOML <-> validated serde structs) and the records that
//! travel between workers, the coordinator and the run directory.

pub mod fuzz;
pub mod job;
pub mod metrics;
pub mod wire;

pub use job::{JobError, JobSpec};
pub use metrics::{EvalRecord, MetricsLine, Summary, TrainRecord};
