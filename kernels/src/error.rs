//! What a backend op can fail with. Every op returns [`Result`]: a backend without a kernel
//! says so with the op's name instead of going through the host behind the caller's back.

/// The error every [`crate::Backend`] op returns.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// This backend has no kernel for the op.
    #[error("{op} is not supported on the {backend} backend")]
    Unsupported { op: &'static str, backend: String },
    /// An operand is too short for the shape the op was given: a bug in the caller.
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
    /// The device (driver, cuBLAS, an allocation) failed while running the op.
    #[error("{op} on {device}")]
    Device {
        op: &'static str,
        device: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub type Result<T> = std::result::Result<T, KernelError>;

/// `Err(Shape)` unless `buf_len` holds at least `need` values; `what` names the operand.
pub fn need_len(op: &'static str, what: &str, buf_len: usize, need: usize) -> Result<()> {
    if buf_len < need {
        return Err(KernelError::Shape {
            op,
            detail: format!("{what} holds {buf_len} values, the shape needs {need}"),
        });
    }
    Ok(())
}

/// `Err(Shape)` unless `rows` is a range of the `m` rows of a product.
pub fn check_row_range(rows: std::ops::Range<usize>, m: usize) -> Result<()> {
    if rows.start > rows.end || rows.end > m {
        return Err(KernelError::Shape { op: "matmul_rows", detail: format!("rows {rows:?} of a product with {m}") });
    }
    Ok(())
}
