//! Data: IDX files, in-memory datasets, normalisation (T26) and the epoch sampler (T31).

pub mod idx;
pub mod normalize;
pub mod sampler;
pub mod text;

pub use idx::{load_idx_split, read_idx, IdxArray};
pub use normalize::{Normalization, Normalizer};
pub use sampler::{rank_slice, EpochSampler, Remainder};

/// A classification dataset held in memory: rows of `features` f32 values and a label each.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub features: usize,
    pub classes: usize,
    pub x: Vec<f32>, // (N, features)
    pub y: Vec<u32>, // (N)
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.y.len()
    }
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Rows `indices` as a (len, features) batch and their labels.
    pub fn gather(&self, indices: &[u32]) -> (Vec<f32>, Vec<u32>) {
        let mut x = Vec::with_capacity(indices.len() * self.features);
        let mut y = Vec::with_capacity(indices.len());
        for &i in indices {
            let i = i as usize;
            x.extend_from_slice(&self.x[i * self.features..(i + 1) * self.features]);
            y.push(self.y[i]);
        }
        (x, y)
    }

    /// The first `n` examples (all if n == 0 or n >= len).
    pub fn truncate(&mut self, n: usize) {
        if n > 0 && n < self.len() {
            self.x.truncate(n * self.features);
            self.y.truncate(n);
        }
    }
}
