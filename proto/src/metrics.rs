//! Records written to `metrics.jsonl` (one JSON object a line) and `summary.json`. The same
//! structs travel from workers to the coordinator.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainRecord {
    pub step: u64,
    pub epoch: u64,
    /// Mean loss over the global batch.
    #[serde(with = "json_float")]
    pub loss: f64,
    #[serde(with = "json_float")]
    pub lr: f64,
    /// Global gradient L2 norm before clipping.
    #[serde(with = "json_float")]
    pub grad_norm: f64,
    #[serde(with = "json_float")]
    pub examples_per_s: f64,
    /// T33: the L2 norm of each layer's batch-mean gradient, input side first.
    // No skip_serializing_if on records: they also travel as bincode, which needs every field.
    #[serde(default)]
    pub layer_grad_norms: Vec<LayerGradNorm>,
    /// Losses of a step's parts, by name: a GAN's `d_loss`, `g_loss`, `d_accuracy` (T43).
    #[serde(default)]
    pub parts: Vec<NamedValue>,
}

/// One named number of a step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NamedValue {
    pub name: String,
    #[serde(with = "json_float")]
    pub value: f64,
}

/// One layer's gradient L2 norm (all its parameters together).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerGradNorm {
    pub layer: String,
    #[serde(with = "json_float")]
    pub norm: f64,
}

/// f64 fields of metrics records: JSON has no NaN or infinity (serde_json would write
/// `null`, and a reader could not tell a NaN loss from a missing one), so in human-readable
/// formats a non-finite value is the string "NaN", "Infinity" or "-Infinity" (the tokens
/// Python's `json` module uses); numbers, those strings and `null` (older files) all read
/// back. Binary formats (bincode, between processes) carry the f64 as it is.
pub mod json_float {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        match (s.is_human_readable(), v.is_finite()) {
            (true, false) if v.is_nan() => s.serialize_str("NaN"),
            (true, false) if *v > 0.0 => s.serialize_str("Infinity"),
            (true, false) => s.serialize_str("-Infinity"),
            _ => s.serialize_f64(*v),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        Number(f64),
        Word(String),
        Null(()),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        if !d.is_human_readable() {
            return f64::deserialize(d);
        }
        match Text::deserialize(d)? {
            Text::Number(v) => Ok(v),
            Text::Null(()) => Ok(f64::NAN),
            Text::Word(w) => match w.as_str() {
                "NaN" => Ok(f64::NAN),
                "Infinity" => Ok(f64::INFINITY),
                "-Infinity" => Ok(f64::NEG_INFINITY),
                other => {
                    Err(serde::de::Error::custom(format!("expected a number, \"NaN\" or \"Infinity\", got {other:?}")))
                }
            },
        }
    }
}

/// A histogram of values in TensorBoard's terms: `bucket_counts[i]` values fell at or below
/// `bucket_limits[i]` and above the previous limit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Histogram {
    pub min: f64,
    pub max: f64,
    pub num: f64,
    pub sum: f64,
    pub sum_squares: f64,
    pub bucket_limits: Vec<f64>,
    pub bucket_counts: Vec<f64>,
}

impl Histogram {
    /// `buckets` equal-width buckets spanning [min, max] of `values` (non-finite values
    /// are left out; an empty input gives one empty bucket).
    pub fn of(values: &[f32], buckets: usize) -> Self {
        let buckets = buckets.max(1);
        let (mut min, mut max, mut num, mut sum, mut sum_squares) = (f64::INFINITY, f64::NEG_INFINITY, 0.0, 0.0, 0.0);
        for &v in values.iter().filter(|v| v.is_finite()) {
            let v = v as f64;
            min = min.min(v);
            max = max.max(v);
            num += 1.0;
            sum += v;
            sum_squares += v * v;
        }
        if num == 0.0 {
            return Self {
                min: 0.0,
                max: 0.0,
                num,
                sum,
                sum_squares,
                bucket_limits: vec![0.0],
                bucket_counts: vec![0.0],
            };
        }
        let width = (max - min) / buckets as f64;
        let bucket_limits: Vec<f64> =
            (1..=buckets).map(|i| if i == buckets { max } else { min + width * i as f64 }).collect();
        let mut bucket_counts = vec![0.0; buckets];
        for &v in values.iter().filter(|v| v.is_finite()) {
            let i = if width > 0.0 { (((v as f64 - min) / width) as usize).min(buckets - 1) } else { 0 };
            bucket_counts[i] += 1.0;
        }
        Self { min, max, num, sum, sum_squares, bucket_limits, bucket_counts }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalRecord {
    pub step: u64,
    pub epoch: u64,
    pub split: String,
    #[serde(with = "json_float")]
    pub loss: f64,
    #[serde(with = "json_float")]
    pub accuracy: f64,
    /// Confusion matrix, precision/recall/F1 (T32); classifiers only.
    #[serde(default)]
    pub classes: Option<crate::classification::ClassMetrics>,
    /// Evaluated with the EMA weights (T23).
    #[serde(default)]
    pub ema: bool,
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
    /// Parameters that train (frozen and LoRA-base parameters excluded, T37/T38).
    #[serde(default)]
    pub trainable_params: usize,
    /// T34: forward + backward FLOPs per example (3 × forward).
    #[serde(default)]
    pub train_flops_per_example: u64,
    /// The peak MFU is stated against, per worker, and where it comes from.
    #[serde(default)]
    pub peak_gflops: f64,
    #[serde(default)]
    pub peak_source: String,
    /// Model FLOPs utilisation: achieved training FLOP/s over world × peak.
    #[serde(default)]
    pub mfu: f64,
    /// Updates skipped (fp16 overflow or loss blow-up).
    #[serde(default)]
    pub skipped_steps: u64,
    /// The final loss scale (1 without dynamic scaling).
    #[serde(default)]
    pub loss_scale: f64,
    /// Classification metrics of the last evaluation (T32).
    #[serde(default)]
    pub test_metrics: Option<crate::classification::ClassMetrics>,
    /// Early stopping: the best evaluation (its model is in RUN_DIR/best).
    #[serde(default)]
    pub best: Option<BestRecord>,
    /// Pipeline runs: this rank's stage report.
    #[serde(default)]
    pub pipeline: Option<StageReport>,
    /// Pipeline runs (coordinator's summary): every rank's stage report.
    #[serde(default)]
    pub pipeline_stages: Vec<StageReport>,
    /// How the gradients travelled, e.g. "shm: 4 ranks on 1 host" (`collective.transport`).
    #[serde(default)]
    pub collective: String,
    /// Optimizer state this rank holds: about 1/W of the whole under `parallel.zero`.
    #[serde(default)]
    pub optimizer_state_bytes: u64,
    /// Summed-gradient buffers this rank's reducer holds (0 for one process).
    #[serde(default)]
    pub gradient_buffer_bytes: u64,
}

/// One pipeline stage's measurements over a run (T42).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageReport {
    pub rank: usize,
    pub stage: usize,
    pub replica: usize,
    pub layers: Vec<String>,
    pub params: usize,
    pub schedule: String,
    pub micro_batches: usize,
    /// Seconds computing forwards and backwards.
    pub busy_s: f64,
    /// Seconds of the pipelined part of the steps.
    pub pipeline_s: f64,
    /// 1 − busy / pipelined time: the share of the schedule this stage sat idle.
    pub bubble_fraction: f64,
    /// Largest bytes of micro-batch inputs held for backward at once.
    pub peak_stash_bytes: usize,
    pub peak_in_flight: usize,
    /// The process's peak resident memory (VmHWM), bytes.
    pub peak_rss_bytes: u64,
}

/// The best evaluation early stopping has seen (T24).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BestRecord {
    pub step: u64,
    pub metric: String,
    pub value: f64,
    pub stopped_early: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_survive_json_and_bincode() {
        let record = TrainRecord {
            step: 3,
            epoch: 0,
            loss: f64::NAN,
            lr: 1e-3,
            grad_norm: f64::INFINITY,
            examples_per_s: f64::NEG_INFINITY,
            layer_grad_norms: vec![LayerGradNorm { layer: "fc0".into(), norm: f64::NAN }],
            parts: vec![NamedValue { name: "d_loss".into(), value: f64::NAN }],
        };
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.contains(r#""loss":"NaN""#) && json.contains(r#""grad_norm":"Infinity""#), "{json}");
        let back: TrainRecord = serde_json::from_str(&json).unwrap();
        assert!(back.loss.is_nan() && back.grad_norm == f64::INFINITY && back.examples_per_s == f64::NEG_INFINITY);
        assert!(back.layer_grad_norms[0].norm.is_nan());
        // Older files wrote null.
        let old: TrainRecord =
            serde_json::from_str(r#"{"step":1,"epoch":0,"loss":null,"lr":0.1,"grad_norm":2.5,"examples_per_s":1}"#)
                .unwrap();
        assert!(old.loss.is_nan() && old.grad_norm == 2.5);
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&record, config).unwrap();
        let (wire, _): (TrainRecord, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert!(wire.loss.is_nan() && wire.grad_norm == f64::INFINITY);
    }
    use super::Histogram;

    #[test]
    fn histogram_counts_and_moments() {
        let h = Histogram::of(&[0.0, 1.0, 2.0, 3.0, 4.0, f32::NAN], 4);
        assert_eq!((h.min, h.max, h.num, h.sum, h.sum_squares), (0.0, 4.0, 5.0, 10.0, 30.0));
        assert_eq!(h.bucket_limits, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(h.bucket_counts, vec![1.0, 1.0, 1.0, 2.0]);
        let flat = Histogram::of(&[2.5; 3], 8);
        assert_eq!(flat.bucket_counts.iter().sum::<f64>(), 3.0);
        assert_eq!(Histogram::of(&[], 8).num, 0.0);
    }
}
