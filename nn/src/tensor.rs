//! A tensor is a backend buffer plus a row-major shape.

use crate::{shape_err, Result};
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
    pub fn zeros(be: &B, shape: &[usize]) -> Result<Self> {
        Ok(Self { shape: shape.to_vec(), buf: be.zeros(shape.iter().product())? })
    }

    /// `data` uploaded as a tensor of `shape`, which it must fill exactly.
    pub fn from_slice(be: &B, shape: &[usize], data: &[f32]) -> Result<Self> {
        if shape.iter().product::<usize>() != data.len() {
            return shape_err("Tensor::from_slice", format!("shape {shape:?} vs {} values", data.len()));
        }
        Ok(Self { shape: shape.to_vec(), buf: be.upload(data)? })
    }

    /// As `from_slice`, taking the host vector (no copy on a host backend).
    pub fn from_vec(be: &B, shape: &[usize], data: Vec<f32>) -> Result<Self> {
        if shape.iter().product::<usize>() != data.len() {
            return shape_err("Tensor::from_vec", format!("shape {shape:?} vs {} values", data.len()));
        }
        Ok(Self { shape: shape.to_vec(), buf: be.upload_vec(data)? })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn to_vec(&self, be: &B) -> Result<Vec<f32>> {
        Ok(be.download(&self.buf)?)
    }

    /// Rows and columns when viewed as a matrix (all leading dims, last dim).
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = *self.shape.last().unwrap_or(&1);
        (self.numel() / cols.max(1), cols)
    }

    pub fn duplicate(&self, be: &B) -> Result<Self> {
        Ok(Self { shape: self.shape.clone(), buf: be.duplicate(&self.buf)? })
    }
}
