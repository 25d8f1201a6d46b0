//! Records written to `metrics.jsonl` (one JSON object a line) and `summary.json`. The same
//! structs travel from workers to the coordinator.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainRecord {
    pub step: u64,
    pub epoch: u64,
    /// Mean loss over the global batch.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
    pub examples_per_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalRecord {
    pub step: u64,
    pub epoch: u64,
    pub split: String,
    pub loss: f64,
    pub accuracy: f64,
}

/// One line of metrics.jsonl, tagged by `kind`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricsLine {
    Train(TrainRecord),
    Eval(EvalRecord),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub name: String,
    pub world_size: usize,
    pub steps: u64,
    pub wall_s: f64,
    pub examples_per_s: f64,
    pub params: usize,
    pub flops_per_example: u64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    /// FNV-1a hash of every weight's bits: equal hashes = bitwise-identical models.
    pub weight_hash: String,
    /// Fraction of exactly-zero decay-eligible weights (L1 report, T20).
    pub sparsity: f64,
    /// Every rank's final weight hash (filled in by the coordinator; all equal).
    #[serde(default)]
    pub rank_weight_hashes: Vec<String>,
    /// Gradient bytes all-reduced per step by each rank (0 for one process).
    #[serde(default)]
    pub allreduce_bytes_per_step: u64,
}
