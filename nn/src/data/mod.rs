//! Data: IDX files, in-memory datasets, normalisation (T26) and the epoch sampler (T31).

pub mod augment;
pub mod bpe;
pub mod idx;
pub mod imbalance;
pub mod normalize;
pub mod sampler;
pub mod text;

pub use idx::{load_idx_split, read_idx, IdxArray};
pub use imbalance::{balanced_class_weights, class_counts, BalancedOrder, Rebalance};
pub use normalize::{Normalization, Normalizer};
pub use sampler::{rank_slice, EpochSampler, Remainder};
pub use text::TokenWindows;

/// One batch as the model takes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// (B, features): pixels, or token ids stored as f32.
    pub x: Vec<f32>,
    /// (B · targets per example); `IGNORE_TARGET` marks padding (T29).
    pub y: Vec<u32>,
    /// Valid length of each sequence; empty when every example is full length.
    pub seq_lens: Vec<usize>,
}

/// A source of training or evaluation examples, addressed by index.
pub trait Examples: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Values per example in `Batch::x`.
    fn features(&self) -> usize;
    /// Number of classes (the vocabulary size of a language model).
    fn classes(&self) -> usize;
    fn gather(&self, indices: &[u32]) -> Batch;
    /// One label per example, for classification data (class balancing reads them).
    fn labels(&self) -> Option<&[u32]> {
        None
    }
    /// Distinct training targets: examples, or tokens of a text (T35's data/parameter ratio).
    fn distinct_targets(&self) -> usize {
        self.len()
    }
}

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

    /// The first `n` examples (all if n == 0 or n >= len).
    pub fn truncate(&mut self, n: usize) {
        if n > 0 && n < self.len() {
            self.x.truncate(n * self.features);
            self.y.truncate(n);
        }
    }
}

impl Examples for Dataset {
    fn len(&self) -> usize {
        self.y.len()
    }
    fn features(&self) -> usize {
        self.features
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn labels(&self) -> Option<&[u32]> {
        Some(&self.y)
    }
    /// Rows `indices` as a (len, features) batch and their labels.
    fn gather(&self, indices: &[u32]) -> Batch {
        let mut x = Vec::with_capacity(indices.len() * self.features);
        let mut y = Vec::with_capacity(indices.len());
        for &i in indices {
            let i = i as usize;
            x.extend_from_slice(&self.x[i * self.features..(i + 1) * self.features]);
            y.push(self.y[i]);
        }
        Batch { x, y, seq_lens: Vec::new() }
    }
}
