//! lockstep-proto: the job spec (TOML <-> validated serde structs) and the records that
//! travel between workers, the coordinator and the run directory.

pub mod classification;
pub mod fuzz;
pub mod job;
pub mod metrics;
pub mod toolbox;
pub mod trace;
pub mod wire;

pub use job::{JobError, JobSpec};
pub use metrics::{EvalRecord, Histogram, LayerGradNorm, MetricsLine, Summary, TrainRecord};

/// This machine's name, as shown in status tables, traces and file names: `HOSTNAME` if set
/// (launchers and test hosts set it per namespace), else the kernel's host name.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
