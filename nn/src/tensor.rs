//! A tensor is a backend buffer plus a row-major shape.

use lockstep_kernels::Backend;

pub struct Tensor<B: Backend> {
    pub shape: Vec<usize>,
    pub buf: B::Buf,
}

impl<B: Backend> std::fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{:?}", self.shape)
    }
}

impl<B: Backend> Tensor<B> {
    pub fn zeros(be: &B, shape: &[usize]) -> Self {
        Self { shape: shape.to_vec(), buf: be.zeros(shape.iter().product()) }
    }

    /// Panics if `data` does not fill `shape`: callers build both from the same source.
    pub fn from_slice(be: &B, shape: &[usize], data: &[f32]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "Tensor::from_slice: shape {shape:?} vs {} values",
            data.len()
        );
        Self { shape: shape.to_vec(), buf: be.upload(data) }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn to_vec(&self, be: &B) -> Vec<f32> {
        be.download(&self.buf)
    }

    /// Rows and columns when viewed as a matrix (all leading dims, last dim).
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = *self.shape.last().unwrap_or(&1);
        (self.numel() / cols.max(1), cols)
    }

    pub fn duplicate(&self, be: &B) -> Self {
        let mut buf = be.zeros(self.numel());
        be.copy(&self.buf, &mut buf);
        Self { shape: self.shape.clone(), buf }
    }
}
