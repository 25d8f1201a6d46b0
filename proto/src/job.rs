//! Job files: TOML deserialised into [`JobSpec`] with unknown keys rejected, then validated.
//! Every error names the key and, where the file has it, the line.

use crate::toolbox::{
    AugmentSpec, BlowupSpec, CollectiveSpec, DistillSpec, EarlyStopSpec, FinetuneSpec, ParallelSpec, PrecisionSpec,
    Resample,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot read job file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("job file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("job file {path}: bad --set {assignment:?}: {message}")]
    Override { path: PathBuf, assignment: String, message: String },
    #[error("job file {path}{}: `{key}` {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Invalid { path: PathBuf, key: String, line: Option<usize>, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Run name; the default output directory is `runs/<name>`.
    pub name: String,
    /// The one seed every random stream is derived from (T40).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N` (`--device` overrides).
    #[serde(default = "default_device")]
    pub device: String,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub train: TrainSpec,
    pub optim: OptimSpec,
    #[serde(default)]
    pub schedule: ScheduleSpec,
    /// Mixed precision (T25).
    #[serde(default)]
    pub precision: PrecisionSpec,
    /// Fine-tuning and LoRA (T37, T38).
    #[serde(default)]
    pub finetune: FinetuneSpec,
    /// Pipeline stages × data-parallel replicas (T42).
    #[serde(default)]
    pub parallel: ParallelSpec,
    /// How gradients travel between ranks.
    #[serde(default)]
    pub collective: CollectiveSpec,
    /// Knowledge distillation from a trained teacher (T39); off when absent.
    #[serde(default)]
    pub distill: Option<DistillSpec>,
}

fn default_seed() -> u64 {
    1234
}

fn default_device() -> String {
    "cpu".into()
}

/// Where a job computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}: expected cpu, cuda or cuda:N")),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Linear layers of `hidden` widths with `activation` and `dropout` between them.
    Mlp,
    /// An explicit list of `layers` over inputs of `input_shape` ([H, W, C] or [F]).
    Sequential,
    /// Decoder-only transformer language model: token + position embeddings, `blocks`
    /// transformer blocks of width `dim` with `heads` heads, a final LayerNorm and the
    /// vocabulary head. Trained on `context`-token windows of a `text` dataset.
    Gpt,
    /// Recurrent language model: embedding, `blocks` stacked LSTM or GRU layers (`cell`) of
    /// width `dim`, the vocabulary head.
    Rnn,
    /// A generative adversarial network (T43) on `idx` images of `input_shape`: the
    /// `generator` layers map `noise_dim` seeded normals to an image, the `discriminator`
    /// layers map an image to two logits (fake, real). Trained by alternating updates.
    Gan,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum NormOrderKind {
    /// LayerNorm before each sub-layer, inside the residual branch (GPT-2).
    #[default]
    PreLn,
    /// LayerNorm after each residual addition (the original transformer).
    PostLn,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum PositionalKind {
    #[default]
    Learned,
    Sinusoidal,
    /// Rotary embeddings inside attention (LLaMA): no position table at all.
    Rope,
}

/// How text becomes tokens.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    #[default]
    Char,
    Bpe,
}

fn default_vocab_size() -> usize {
    512
}

/// The normalisation inside GPT blocks (and the final one).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum BlockNorm {
    #[default]
    #[serde(rename = "layernorm", alias = "layer_norm")]
    LayerNorm,
    /// LLaMA's: x/rms(x)·gamma, no centring, no bias.
    #[serde(rename = "rmsnorm", alias = "rms_norm")]
    RmsNorm,
}

/// The MLP inside GPT blocks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum BlockMlp {
    /// GPT-2: fc2(GELU(fc1(x))).
    #[default]
    Gelu,
    /// LLaMA: down(SiLU(gate(x)) ⊙ up(x)).
    Swiglu,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CellKind {
    #[default]
    Lstm,
    Gru,
}

/// One layer of a `sequential` model. Images are NHWC.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerSpec {
    Conv2d {
        out_channels: usize,
        kernel: usize,
        #[serde(default = "one_usize")]
        stride: usize,
        #[serde(default)]
        padding: usize,
        #[serde(default = "one_usize")]
        groups: usize,
    },
    /// Over sequences [L, C]; output [L_out, out_channels].
    Conv1d {
        out_channels: usize,
        kernel: usize,
        #[serde(default = "one_usize")]
        stride: usize,
        #[serde(default)]
        padding: usize,
        #[serde(default = "one_usize")]
        groups: usize,
    },
    /// Transposed convolution (upsampling), images [H, W, C] (T8).
    ConvTranspose2d {
        out_channels: usize,
        kernel: usize,
        #[serde(default = "one_usize")]
        stride: usize,
        #[serde(default)]
        padding: usize,
    },
    MaxPool2d {
        kernel: usize,
        /// Default: the kernel size.
        stride: Option<usize>,
        #[serde(default)]
        padding: usize,
    },
    AvgPool2d {
        kernel: usize,
        stride: Option<usize>,
        #[serde(default)]
        padding: usize,
    },
    Flatten,
    /// Each example to `shape` (as many values), e.g. [7, 7, 64] after a linear layer.
    Reshape {
        shape: Vec<usize>,
    },
    Linear {
        out: usize,
    },
    /// Normalises each example (position) over its last dimension.
    LayerNorm,
    /// Normalises each channel (last dimension) over the batch (and H, W).
    BatchNorm,
    Relu,
    LeakyRelu,
    Sigmoid,
    Tanh,
    Silu,
    Gelu,
    Dropout {
        p: f32,
    },
}

fn one_usize() -> usize {
    1
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ActivationKind {
    Sigmoid,
    Tanh,
    Relu,
    LeakyRelu,
    Silu,
    Swish,
    Gelu,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InitKind {
    /// Kaiming for ReLU-family activations, Xavier for sigmoid/tanh (T18).
    Auto,
    XavierUniform,
    KaimingNormal,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub kind: ModelKind,
    /// Hidden layer widths of the MLP.
    #[serde(default)]
    pub hidden: Vec<usize>,
    /// Sequential models: the shape of one example, [H, W, C] for images or [F].
    #[serde(default)]
    pub input_shape: Vec<usize>,
    /// Sequential models: the layers, in order. The last layer's outputs are the logits.
    #[serde(default)]
    pub layers: Vec<LayerSpec>,
    #[serde(default = "default_activation")]
    pub activation: ActivationKind,
    /// LeakyReLU negative slope.
    #[serde(default = "default_leaky_slope")]
    pub leaky_slope: f32,
    /// Swish beta (initial value when learnable).
    #[serde(default = "one")]
    pub swish_beta: f32,
    #[serde(default)]
    pub swish_learnable_beta: bool,
    /// Inverted dropout probability after each hidden activation (T9).
    #[serde(default)]
    pub dropout: f32,
    #[serde(default = "default_init")]
    pub init: InitKind,
    /// Language models: tokens per training window (and the longest sequence).
    #[serde(default)]
    pub context: usize,
    /// Language models: embedding / hidden width.
    #[serde(default)]
    pub dim: usize,
    /// GPT: attention heads (dim must divide by it).
    #[serde(default = "default_heads")]
    pub heads: usize,
    /// GPT: transformer blocks; RNN: stacked recurrent layers.
    #[serde(default)]
    pub blocks: usize,
    #[serde(default)]
    pub norm_order: NormOrderKind,
    #[serde(default)]
    pub positional: PositionalKind,
    /// GPT, positional = "rope": the rotation's frequency base.
    #[serde(default = "default_rope_base")]
    pub rope_base: f32,
    /// GPT: "layernorm" or "rmsnorm".
    #[serde(default)]
    pub norm: BlockNorm,
    /// GPT: "gelu" or "swiglu".
    #[serde(default)]
    pub mlp: BlockMlp,
    /// GPT: the MLP's hidden width; 0 = 4·dim for gelu, and for swiglu 8·dim/3 rounded up
    /// to a multiple of 8 (about the same parameters with its third matrix).
    #[serde(default)]
    pub mlp_hidden: usize,
    /// GPT: biases in the attention and MLP projections and the head (false in LLaMA).
    #[serde(default = "yes")]
    pub bias: bool,
    #[serde(default)]
    pub cell: CellKind,
    /// BatchNorm statistics over the global batch of all data-parallel workers
    /// (SyncBatchNorm) instead of each worker's share (T10).
    #[serde(default)]
    pub sync_batch_norm: bool,
    /// GAN: normal noise values per generated image (the generator's input).
    #[serde(default = "default_noise_dim")]
    pub noise_dim: usize,
    /// GAN: the generator's layers, [noise_dim] to an image of `input_shape`.
    #[serde(default)]
    pub generator: Vec<LayerSpec>,
    /// GAN: the discriminator's layers, an image to 2 logits (fake, real).
    #[serde(default)]
    pub discriminator: Vec<LayerSpec>,
    /// GAN: the discriminator's learning rate as a multiple of the generator's.
    #[serde(default = "one")]
    pub discriminator_lr_scale: f32,
}

fn default_noise_dim() -> usize {
    64
}

fn default_rope_base() -> f32 {
    10000.0
}
fn yes() -> bool {
    true
}

impl ModelSpec {
    /// The GPT MLP's hidden width (`mlp_hidden`, or its default for `mlp`).
    pub fn mlp_width(&self) -> usize {
        match (self.mlp_hidden, self.mlp) {
            (0, BlockMlp::Gelu) => 4 * self.dim,
            (0, BlockMlp::Swiglu) => (8 * self.dim).div_ceil(3).next_multiple_of(8),
            (width, _) => width,
        }
    }
}

fn default_heads() -> usize {
    4
}

fn default_activation() -> ActivationKind {
    ActivationKind::Relu
}
fn default_leaky_slope() -> f32 {
    0.01
}
fn one() -> f32 {
    1.0
}
fn default_init() -> InitKind {
    InitKind::Auto
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    /// IDX files (MNIST layout) in `data.dir`.
    Idx,
    /// One UTF-8 text file (`data.dir`/`data.file`), character-tokenized (T30).
    Text,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    None,
    MinMax,
    ZScore,
    L2,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Remainder {
    /// The last partial global batch of an epoch is dropped.
    Drop,
    /// The last partial global batch is filled from the start of the epoch's permutation.
    Pad,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    pub kind: DatasetKind,
    /// Directory of the dataset; relative paths are resolved against the working directory.
    pub dir: PathBuf,
    #[serde(default = "default_normalize")]
    pub normalize: Normalize,
    #[serde(default = "default_remainder")]
    pub remainder: Remainder,
    /// Use only the first N training examples (0 = all). For quick runs and tests.
    #[serde(default)]
    pub train_limit: usize,
    /// Use only the first N test examples (0 = all).
    #[serde(default)]
    pub test_limit: usize,
    /// Text: the file inside `dir`.
    #[serde(default = "default_text_file")]
    pub file: String,
    /// Text: the last fraction of the characters is the validation split.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Text: a training window starts every `stride` tokens.
    #[serde(default = "one_usize")]
    pub stride: usize,
    /// Text: map full-width forms to half-width before tokenizing.
    #[serde(default)]
    pub half_width: bool,
    /// Text: lower-case before tokenizing.
    #[serde(default)]
    pub lowercase: bool,
    /// Text: "char" (one token per character) or "bpe" (byte-level BPE, T30).
    #[serde(default)]
    pub tokenizer: TokenizerKind,
    /// Text, bpe: the vocabulary size its merges are learned to, on the training split.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Text, bpe: load this `tokenizer.json` (e.g. GPT-2's) instead of learning one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_file: Option<PathBuf>,
    /// Images: keep only these labels, renumbered 0.. in this order (a task on a subset of
    /// the classes, T37). Empty: all labels.
    #[serde(default)]
    pub labels: Vec<u32>,
    /// Images: a binary task, this label (after `labels`) against the rest: 1 and 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_positive: Option<u32>,
    /// Binary task: keep a seeded subset of the positives so that they are this fraction of
    /// each split (0 = keep all). Builds an imbalanced task (T28).
    #[serde(default)]
    pub positive_fraction: f64,
    /// Re-balance classes in the sampler (T28).
    #[serde(default)]
    pub resample: Resample,
    /// Seeded image augmentation (T27).
    #[serde(default)]
    pub augment: AugmentSpec,
}

fn default_text_file() -> String {
    "input.txt".into()
}
fn default_val_fraction() -> f64 {
    0.1
}

fn default_normalize() -> Normalize {
    Normalize::ZScore
}
fn default_remainder() -> Remainder {
    Remainder::Drop
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    pub epochs: usize,
    /// Global batch size: the sum over data-parallel ranks.
    pub batch_size: usize,
    /// Gradient accumulation (T41): each step runs this many micro-batches of
    /// `batch_size / accumulate`, sums their gradients locally and all-reduces once, during
    /// the last one's backward (DDP's `no_sync`). The global batch stays `batch_size`.
    #[serde(default = "default_accumulate")]
    pub accumulate: usize,
    /// `any-world-size`: the same seed and global batch give bit-identical weights on any
    /// number of data-parallel workers (fixed micro-shards, an exact reduction).
    #[serde(default)]
    pub reproducible: Reproducible,
    /// The number of shards the global batch is cut into in `any-world-size` mode,
    /// whatever the world size; at most this many data-parallel workers take part.
    #[serde(default = "default_micro_shards")]
    pub micro_shards: usize,
    /// Stop after this many steps (0 = run all epochs).
    #[serde(default)]
    pub max_steps: usize,
    /// A `train` line in metrics.jsonl every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// Evaluate every this many steps (0 = at the end of each epoch).
    #[serde(default)]
    pub eval_every: usize,
    /// Write a training checkpoint every this many steps (0 = only at the end).
    #[serde(default)]
    pub checkpoint_every: usize,
    /// Also write one whenever this many minutes of training passed since the last
    /// (0 = off): a dead worker or a crash loses minutes, not the run. Rank 0's clock
    /// decides, and every rank checkpoints at the same step.
    #[serde(default = "default_checkpoint_minutes")]
    pub checkpoint_minutes: f64,
    /// Checkpoints kept (the newest).
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// When a worker dies, re-form the group from the survivors (and any replacement that
    /// joins) if at least this many remain, and continue from the last checkpoint.
    /// 0: a dead worker stops the run.
    #[serde(default)]
    pub min_workers: usize,
    /// Elastic scale-up: a worker that joins a running job is admitted at the next step
    /// (a checkpoint), and the group re-forms with up to this many workers. 0: off.
    #[serde(default)]
    pub max_workers: usize,
    /// Group re-formations allowed in one run.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: usize,
    /// EMA of the weights with this decay (T23); 0 = off.
    #[serde(default)]
    pub ema_decay: f64,
    /// Evaluate with the (bias-corrected) EMA weights instead of the raw ones.
    #[serde(default)]
    pub eval_ema: bool,
    /// Stop when the evaluation metric stops improving; the best model is kept (T24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stop: Option<EarlyStopSpec>,
    /// Loss blow-up detection (T36).
    #[serde(default)]
    pub blowup: BlowupSpec,
    /// Per-class loss weights (T28); empty = all 1.
    #[serde(default)]
    pub class_weights: Vec<f32>,
    /// Loss weights n/(classes·n_c) from the training split's class counts (T28).
    #[serde(default)]
    pub balanced_class_weights: bool,
    /// Peak FLOP/s (in GFLOP/s) that MFU is stated against (T34); 0 = measure the
    /// backend's matmul at start.
    #[serde(default)]
    pub peak_gflops: f64,
}

fn default_checkpoint_minutes() -> f64 {
    10.0
}

fn default_accumulate() -> usize {
    1
}

fn default_micro_shards() -> usize {
    8
}

/// How much a run's bits may depend on its world size.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum Reproducible {
    /// Bit for bit across reruns of the same world size; other world sizes agree to
    /// float rounding (their gradient sums run in another order).
    #[default]
    #[serde(rename = "default")]
    SameWorldSize,
    /// Bit for bit on any world size, at a cost (see README).
    #[serde(rename = "any-world-size")]
    AnyWorldSize,
}

fn default_max_restarts() -> usize {
    3
}

fn default_keep_checkpoints() -> usize {
    3
}

fn default_log_every() -> usize {
    50
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Sgd,
    Momentum,
    Nesterov,
    Adam,
    Adamw,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimSpec {
    pub kind: OptimizerKind,
    pub lr: f32,
    #[serde(default = "default_momentum")]
    pub momentum: f32,
    #[serde(default = "default_beta1")]
    pub beta1: f32,
    #[serde(default = "default_beta2")]
    pub beta2: f32,
    #[serde(default = "default_eps")]
    pub eps: f32,
    /// AdamW's decoupled weight decay.
    #[serde(default)]
    pub weight_decay: f32,
    /// L2 penalty lambda: grad += lambda·w (T20).
    #[serde(default)]
    pub l2: f32,
    /// L1 penalty lambda: grad += lambda·sign(w) (T20).
    #[serde(default)]
    pub l1: f32,
    /// Apply decay/penalties to biases and norm parameters too (off by default, T20).
    #[serde(default)]
    pub decay_biases: bool,
    /// Clip by global L2 norm (0 = off, T21).
    #[serde(default)]
    pub clip_norm: f32,
}

fn default_momentum() -> f32 {
    0.9
}
fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.999
}
fn default_eps() -> f32 {
    1e-8
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    #[default]
    Constant,
    Step,
    Exponential,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    #[serde(default)]
    pub kind: ScheduleKind,
    /// Linear warmup from `warmup_start_lr` to lr over this many steps.
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default)]
    pub warmup_start_lr: f32,
    /// Floor for linear and cosine.
    #[serde(default)]
    pub min_lr: f32,
    /// Step decay: multiply by `gamma` every `step_size` steps.
    #[serde(default = "default_step_size")]
    pub step_size: u64,
    #[serde(default = "default_gamma")]
    pub gamma: f32,
    /// Exponential: lr0 · rate^(step/decay_steps).
    #[serde(default = "default_rate")]
    pub rate: f32,
    #[serde(default = "default_step_size")]
    pub decay_steps: u64,
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
            warmup_start_lr: 0.0,
            min_lr: 0.0,
            step_size: default_step_size(),
            gamma: default_gamma(),
            rate: default_rate(),
            decay_steps: default_step_size(),
        }
    }
}

fn default_step_size() -> u64 {
    1000
}
fn default_gamma() -> f32 {
    0.1
}
fn default_rate() -> f32 {
    0.96
}

impl JobSpec {
    /// Reads, applies `--set key=value` overrides, parses and validates a job file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, JobError> {
        let text = std::fs::read_to_string(path).map_err(|source| JobError::Read { path: path.into(), source })?;
        Self::parse(&text, path, overrides)
    }

    /// Parses job text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Self, JobError> {
        let text = apply_overrides(text, path, overrides)?;
        let spec: JobSpec =
            toml::from_str(&text).map_err(|e| JobError::Parse { path: path.into(), message: e.to_string() })?;
        if let Err((key, message)) = spec.validate() {
            let line = line_of_key(&text, &key);
            return Err(JobError::Invalid { path: path.into(), key, line, message });
        }
        Ok(spec)
    }

    /// The validated device (`validate` guarantees it parses).
    pub fn device(&self) -> Device {
        self.device.parse().unwrap_or(Device::Cpu)
    }

    /// Canonical TOML of the resolved spec (written next to every run).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

/// Applies `key.path=value` assignments to the TOML text, keeping its layout so that line
/// numbers in later errors still point into the user's file. A value that does not parse as
/// TOML is taken as a string (so `--set data.dir=/tmp/x` works unquoted).
fn apply_overrides(text: &str, path: &Path, overrides: &[String]) -> Result<String, JobError> {
    if overrides.is_empty() {
        return Ok(text.to_string());
    }
    // Malformed text is reported by the `toml` parser; toml_edit only ever sees valid TOML
    // (its document builder can panic on some malformed files, see `guarded`).
    toml::from_str::<toml::Table>(text).map_err(|e| JobError::Parse { path: path.into(), message: e.to_string() })?;
    let mut doc: toml_edit::DocumentMut = guarded(|| text.parse::<toml_edit::DocumentMut>())
        .ok_or_else(|| JobError::Parse { path: path.into(), message: PARSER_PANIC.into() })?
        .map_err(|e| JobError::Parse { path: path.into(), message: e.to_string() })?;
    for assignment in overrides {
        let bad = |message: &str| JobError::Override {
            path: path.into(),
            assignment: assignment.clone(),
            message: message.to_string(),
        };
        let (key, raw) = assignment.split_once('=').ok_or_else(|| bad("expected key=value"))?;
        let parts: Vec<&str> = key.trim().split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad("empty key segment"));
        }
        let value: toml_edit::Value = raw.trim().parse().unwrap_or_else(|_| toml_edit::Value::from(raw.trim()));
        let mut table = doc.as_table_mut();
        for part in &parts[..parts.len() - 1] {
            let entry = table.entry(part).or_insert(toml_edit::table());
            table = entry.as_table_mut().ok_or_else(|| bad(&format!("`{part}` is not a table")))?;
        }
        table.insert(parts[parts.len() - 1], toml_edit::value(value));
    }
    Ok(doc.to_string())
}

const PARSER_PANIC: &str = "the TOML parser (toml_edit) failed on this file; check it for stray bytes or \
                            duplicate keys";

/// Runs a toml_edit parse, turning a panic into None. toml_edit 0.23.10 panics ("all items
/// have spans") on some malformed files (found by the `job` fuzz target; the input is in
/// fuzz/corpus/job/regression-toml-edit-span-panic): a bad job file must be an error.
fn guarded<T>(parse: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)).ok()
}

/// 1-based line of the dotted `key` in `text`, if the key is written there.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let doc = guarded(|| toml_edit::Document::parse(text))?.ok()?;
    let mut item = doc.as_item();
    for part in key.split('.') {
        item = item.get(part)?;
    }
    let span = item.span()?;
    Some(text[..span.start].matches('\n').count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
seed = 7
[model]
kind = "mlp"
hidden = [16]
[data]
kind = "idx"
dir = "data/mnist"
[train]
epochs = 1
batch_size = 8
[optim]
kind = "adamw"
lr = 0.001
"#;

    fn parse(text: &str, sets: &[&str]) -> Result<JobSpec, JobError> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        JobSpec::parse(text, Path::new("job.toml"), &sets)
    }

    #[test]
    fn good_file_parses_with_defaults() {
        let spec = parse(GOOD, &[]).unwrap();
        assert_eq!(spec.seed, 7);
        assert_eq!(spec.model.activation, ActivationKind::Relu);
        assert_eq!(spec.schedule.kind, ScheduleKind::Constant);
        assert_eq!(spec.optim.beta2, 0.999);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = GOOD.replace("epochs = 1", "epochs = 1\nepoch = 3");
        let err = parse(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("epoch") && err.contains("line 12"), "{err}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let text = GOOD.replace("batch_size = 8", "batch_size = \"eight\"");
        let err = parse(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("line 12") && err.contains("batch_size"), "{err}");
    }

    #[test]
    fn bad_value_names_key_and_line() {
        let text = GOOD.replace("lr = 0.001", "lr = -1.0");
        let err = parse(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("`optim.lr`") && err.contains("line 15"), "{err}");
    }

    #[test]
    fn overrides_set_any_field() {
        let spec = parse(GOOD, &["optim.lr=0.5", "data.dir=/tmp/other", "schedule.kind=cosine", "seed=9"]).unwrap();
        assert_eq!(spec.optim.lr, 0.5);
        assert_eq!(spec.data.dir, PathBuf::from("/tmp/other"));
        assert_eq!(spec.schedule.kind, ScheduleKind::Cosine);
        assert_eq!(spec.seed, 9);
        let err = parse(GOOD, &["train.epochs=0"]).unwrap_err().to_string();
        assert!(err.contains("train.epochs"), "{err}");
        let err = parse(GOOD, &["nonsense"]).unwrap_err().to_string();
        assert!(err.contains("key=value"), "{err}");
        let err = parse(GOOD, &["optim.bogus=1"]).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn broken_toml_is_an_error() {
        let err = parse("name = \n[model", &[]).unwrap_err().to_string();
        assert!(err.contains("line"), "{err}");
    }
}
