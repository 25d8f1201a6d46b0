//! lockstep-nn: tensors, layers (each a forward/backward pair), losses, optimizers,
//! learning-rate schedules, the counter-based RNG and data loading.

pub mod checkpoint;
pub mod data;
pub mod fuzz;
pub mod gradcheck;
pub mod init;
pub mod layers;
pub mod loss;
pub mod model;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod schedule;
pub mod tensor;

pub use layers::{ForwardCtx, Layer, Param};
pub use model::Sequential;
pub use tensor::Tensor;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NnError {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{path}: byte offset {offset}: {message}")]
    Data { path: PathBuf, offset: u64, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    /// The hook `Sequential::backward_with_hook` was given failed; its caller holds why.
    #[error("the gradient-ready hook failed")]
    HookFailed,
    /// A backend op failed (a device error, an op the backend has no kernel for).
    #[error(transparent)]
    Kernel(#[from] lockstep_kernels::KernelError),
}

pub type Result<T> = std::result::Result<T, NnError>;

pub(crate) fn shape_err<T>(op: &'static str, detail: impl Into<String>) -> Result<T> {
    Err(NnError::Shape { op, detail: detail.into() })
}
