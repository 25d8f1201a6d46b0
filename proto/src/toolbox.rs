//! Job-file sections of the training toolbox (T23–T38): precision, fine-tuning, LoRA, EMA,
//! early stopping, blow-up handling, class imbalance and augmentation. Every field has a
//! default that turns its technique off, so older job files keep their meaning.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Pipeline schedule (T42).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum PipeSchedule {
    /// All forwards of the step's micro-batches, then all backwards.
    #[default]
    Gpipe,
    /// One forward, one backward in the steady state: at most P − s micro-batches in flight
    /// on stage s.
    #[serde(rename = "1f1b")]
    OneFOneB,
}

/// How the ranks' gradients travel (`collective.transport`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Shared memory between ranks of one host, QUIC between hosts; hierarchical when
    /// several hosts each have several ranks.
    #[default]
    Auto,
    /// Shared memory only: every rank must be on one host.
    Shm,
    /// A QUIC ring over every rank, wherever it is.
    Quic,
    /// A TLS-over-TCP ring over every rank, wherever it is.
    Tcp,
}

/// The network link between hosts under `transport = "auto"` (`collective.inter_host`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum InterHost {
    /// QUIC: keeps its rate on links that lose packets (BBR), the safe default.
    #[default]
    Quic,
    /// TLS 1.3 over TCP, same pinned certificates: several times QUIC's rate on clean links.
    Tcp,
}

impl std::fmt::Display for InterHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InterHost::Quic => "quic",
            InterHost::Tcp => "tcp",
        })
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Auto => "auto",
            Transport::Shm => "shm",
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        })
    }
}

/// `[collective]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct CollectiveSpec {
    #[serde(default)]
    pub transport: Transport,
    #[serde(default)]
    pub inter_host: InterHost,
}

/// `[parallel]` (T42): world = pipeline_stages × data_parallel. Rank r is stage r mod P of
/// replica r div P.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParallelSpec {
    #[serde(default = "one_usize")]
    pub pipeline_stages: usize,
    /// Replicas of the pipeline (0 = world / pipeline_stages).
    #[serde(default)]
    pub data_parallel: usize,
    /// Micro-batches per step and replica.
    #[serde(default = "default_micro_batches")]
    pub micro_batches: usize,
    #[serde(default)]
    pub schedule: PipeSchedule,
    /// Layer names of each stage; empty = balanced automatically by FLOPs and parameters.
    #[serde(default)]
    pub placement: Vec<Vec<String>>,
    /// ZeRO stage of the data-parallel group: 0 = every rank holds the whole optimizer
    /// state; 1 = each rank holds the state of its 1/W shard of the parameters (gradients
    /// reduce-scattered, shards updated, parameters all-gathered); 2 = also the reduced
    /// gradients only as shards, the bucket buffers recycled.
    #[serde(default)]
    pub zero: u8,
}

impl Default for ParallelSpec {
    fn default() -> Self {
        Self {
            pipeline_stages: 1,
            data_parallel: 0,
            micro_batches: default_micro_batches(),
            schedule: PipeSchedule::Gpipe,
            placement: Vec::new(),
            zero: 0,
        }
    }
}

fn one_usize() -> usize {
    1
}
fn default_micro_batches() -> usize {
    4
}

/// Number formats for matmul compute and for gradients on the wire (T25).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    #[default]
    Fp32,
    Bf16,
    Fp16,
}

/// `[precision]` (T25): matmul operands and outputs in `compute`, fp32 master weights,
/// fp32 accumulation; dynamic loss scaling when `compute = "fp16"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrecisionSpec {
    #[serde(default)]
    pub compute: Dtype,
    /// Initial loss scale for fp16 (dynamic: halved on inf/NaN, doubled after
    /// `growth_interval` good steps). Ignored for fp32/bf16 unless `dynamic_scaling` is set.
    #[serde(default = "default_loss_scale")]
    pub loss_scale: f32,
    #[serde(default = "default_growth_interval")]
    pub growth_interval: u64,
    /// Force dynamic loss scaling on (it is on by default only for fp16).
    #[serde(default)]
    pub dynamic_scaling: bool,
    /// Gradients travel in this format in the all-reduce (bf16/fp16 halve the bytes).
    #[serde(default)]
    pub allreduce: Dtype,
}

impl Default for PrecisionSpec {
    fn default() -> Self {
        Self {
            compute: Dtype::Fp32,
            loss_scale: default_loss_scale(),
            growth_interval: default_growth_interval(),
            dynamic_scaling: false,
            allreduce: Dtype::Fp32,
        }
    }
}

impl PrecisionSpec {
    /// Dynamic loss scaling is on for fp16 compute (or when forced).
    pub fn scaling(&self) -> bool {
        self.compute == Dtype::Fp16 || self.dynamic_scaling
    }
}

fn default_loss_scale() -> f32 {
    65536.0
}
fn default_growth_interval() -> u64 {
    2000
}

/// Knowledge distillation (T39): the student also learns the teacher's softened outputs.
/// loss = alpha·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha)·CE(labels).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistillSpec {
    /// The teacher's `model.safetensors` (written by `lockstep train`): its own
    /// architecture, rebuilt from the file and run forward only on every rank.
    pub teacher: PathBuf,
    #[serde(default = "default_distill_temperature")]
    pub temperature: f32,
    #[serde(default = "default_distill_alpha")]
    pub alpha: f32,
}

fn default_distill_temperature() -> f32 {
    4.0
}
fn default_distill_alpha() -> f32 {
    0.9
}

/// `[finetune]` (T37, T38): start from a trained model and adapt part of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSpec {
    /// A `model.safetensors` (or a training checkpoint directory) whose weights initialise
    /// the model; parameters are matched by name and shape.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Re-initialise the output layer instead of loading it (a new task or class count).
    #[serde(default)]
    pub replace_head: bool,
    /// Layers (by name, or name prefix followed by '.') whose parameters are frozen: no
    /// gradient, no optimiser state, no all-reduce bytes.
    #[serde(default)]
    pub freeze: Vec<String>,
    /// Per-group learning rates: the lr of the listed layers is multiplied by `lr_scale`.
    #[serde(default)]
    pub lr_groups: Vec<LrGroup>,
    #[serde(default)]
    pub lora: Option<LoraSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LrGroup {
    pub layers: Vec<String>,
    pub lr_scale: f32,
}

/// LoRA adapters (T38): W + (alpha/rank)·B·A on the listed Linear layers; only A and B train.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    pub layers: Vec<String>,
    pub rank: usize,
    #[serde(default = "default_lora_alpha")]
    pub alpha: f32,
}

fn default_lora_alpha() -> f32 {
    16.0
}

/// Whether layer `layer` is named by `pattern`: equal, or `pattern` is a dotted prefix.
pub fn layer_matches(pattern: &str, layer: &str) -> bool {
    layer == pattern || layer.strip_prefix(pattern).is_some_and(|rest| rest.starts_with('.'))
}

/// The metric early stopping watches (T24).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum StopMetric {
    /// Evaluation loss, lower is better.
    #[default]
    Loss,
    /// Evaluation accuracy, higher is better.
    Accuracy,
    /// Macro F1 (T32), higher is better.
    F1,
}

/// `train.early_stop` (T24).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopSpec {
    #[serde(default)]
    pub metric: StopMetric,
    /// Evaluations without improvement before training stops.
    pub patience: usize,
    /// An improvement smaller than this does not count.
    #[serde(default)]
    pub min_delta: f64,
}

/// What to do on a loss blow-up (T36).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum BlowupAction {
    /// Stop the run on a divergence, with a diagnosis; the weights stay those before the
    /// bad step. Single outlier batches are skipped either way.
    #[default]
    Stop,
    /// Skip the update of a diverging step too and go on (at most `max_skips` in a row).
    Skip,
    /// Detect nothing.
    Off,
}

/// `train.blowup` (T36). A step's loss is an *outlier* when it is over `factor` times the
/// median of the last `window` losses **and** above that median by more than both
/// `spread` robust standard deviations (1.4826 × MAD) and `min_jump` (an absolute floor, in
/// loss units: near a loss of 0 a noisy batch is easily 10× the median, yet no divergence).
/// An outlier's update is skipped; `max_skips` outliers in a row are a divergence. A NaN or
/// infinite loss or gradient norm, or a windowed mean that rose `factor`-fold and by more
/// than `min_jump` over its lowest, is a divergence: `action` says what happens then.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BlowupSpec {
    #[serde(default)]
    pub action: BlowupAction,
    #[serde(default = "default_blowup_window")]
    pub window: usize,
    #[serde(default = "default_blowup_factor")]
    pub factor: f64,
    #[serde(default = "default_max_skips")]
    pub max_skips: usize,
    #[serde(default = "default_blowup_min_jump")]
    pub min_jump: f64,
    #[serde(default = "default_blowup_spread")]
    pub spread: f64,
}

impl Default for BlowupSpec {
    fn default() -> Self {
        Self {
            action: BlowupAction::Stop,
            window: default_blowup_window(),
            factor: default_blowup_factor(),
            max_skips: default_max_skips(),
            min_jump: default_blowup_min_jump(),
            spread: default_blowup_spread(),
        }
    }
}

fn default_blowup_window() -> usize {
    50
}
fn default_blowup_factor() -> f64 {
    4.0
}
fn default_max_skips() -> usize {
    10
}
fn default_blowup_min_jump() -> f64 {
    1.0
}
fn default_blowup_spread() -> f64 {
    6.0
}

/// Sampler re-balancing (T28).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Resample {
    #[default]
    None,
    /// Every class drawn as often as the largest (minority examples repeat).
    Oversample,
    /// Every class drawn as often as the smallest (a fresh majority subset each epoch).
    Undersample,
}

/// `data.augment` (T27): seeded per (seed, epoch, example), images only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AugmentSpec {
    /// Random translation by up to this many pixels in each direction (zero fill).
    #[serde(default)]
    pub shift: usize,
    /// Random horizontal flip with probability 1/2.
    #[serde(default)]
    pub flip: bool,
}

impl AugmentSpec {
    pub fn enabled(&self) -> bool {
        self.shift > 0 || self.flip
    }
}

#[cfg(test)]
mod tests {
    use super::layer_matches;

    #[test]
    fn layer_patterns_match_whole_dotted_prefixes() {
        assert!(layer_matches("fc1", "fc1"));
        assert!(layer_matches("block0", "block0.attn"));
        assert!(!layer_matches("fc1", "fc10"));
        assert!(!layer_matches("fc1.x", "fc1"));
    }
}
