//! lockstep-proto: the job spec (TOML <-> validated serde structs) and the records that
//! travel between workers, the coordinator and the run directory.

pub mod classification;
mod error_text;
pub mod fuzz;
pub mod job;
pub mod metrics;
pub mod preempt;
pub mod toolbox;
pub mod topology;
pub mod trace;
mod validate;
pub mod wire;

pub use error_text::error_text;
pub use job::{JobError, JobSpec};
pub use metrics::{EvalRecord, Histogram, LayerGradNorm, MetricsLine, NamedValue, Summary, TrainRecord};

/// This machine's name, as shown in status tables, traces and file names: `HOSTNAME` if set
/// (launchers and test hosts set it per namespace), else the kernel's host name.
/// This process's host identity, as NCCL's host hash: ranks with equal ids can share
/// memory. The hostname and boot id name the machine; the network namespace is part of it
/// because the abstract Unix sockets the shared-memory handshake uses are per namespace
/// (and so that the netns test hosts are different hosts).
pub fn host_id() -> String {
    use std::os::unix::fs::MetadataExt;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let netns = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).unwrap_or(0);
    format!("{}/{}/net:{netns}", hostname(), boot.trim())
}

pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
