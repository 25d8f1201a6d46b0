//! lockstep-coordinator: rendezvous, rank assignment, the run directory (metrics sink) and
//! the supervision of a group of workers over the QUIC control plane.

pub mod elastic;
pub mod run_writer;
pub mod server;
pub mod status;
pub mod tensorboard;

pub use elastic::{ElasticRun, Recovery, RestartPolicy};
pub use run_writer::RunWriter;
pub use server::{Coordinator, TrainOptions, WorkerConn};
pub use status::StatusBoard;

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("network: {0}")]
    Net(String),
    /// A TLS identity, endpoint or link of the collective layer failed.
    #[error("network: {0}")]
    Comm(#[from] lockstep_collective::CollectiveError),
    /// A record of the run directory does not serialise.
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("run failed: {0}")]
    Run(String),
    /// The launcher could not recover the run (find its checkpoint, start a worker).
    #[error("recovering the run: {0}")]
    Launcher(#[source] elastic::LauncherError),
    /// A rank stopped the run on purpose (a loss blow-up, a refusal): nothing to recover.
    #[error("run stopped: {0}")]
    Stopped(String),
    /// Every rank stopped after `step` with a checkpoint because workers are waiting to
    /// join: the group re-forms larger from it.
    #[error("re-forming larger after step {step}")]
    Rescale { step: u64, checkpoint: Option<String> },
    /// Every rank stopped after `step` (SIGTERM/SIGINT) and the checkpoint was written.
    #[error("preempted after step {step}{}", checkpoint.as_ref().map(|c| format!(": checkpoint {c}")).unwrap_or_default())]
    Preempted { step: u64, checkpoint: Option<String> },
}

pub type Result<T> = std::result::Result<T, CoordError>;

/// A fresh random cluster token (128 bits, hex) from the OS.
pub fn generate_token() -> Result<String> {
    random_hex::<16>()
}

/// 32 random bytes (hex): a group's shared-memory secret.
pub fn generate_secret() -> Result<String> {
    random_hex::<32>()
}

fn random_hex<const N: usize>() -> Result<String> {
    let mut bytes = [0u8; N];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| CoordError::Io { what: "reading /dev/urandom for a token".into(), source })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
