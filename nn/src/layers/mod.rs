//! Layers. Each is a forward/backward pair: `forward` caches what `backward` needs (named
//! after what it holds), `backward` takes dL/dy, accumulates parameter gradients and
//! returns dL/dx.

mod activation;
mod attention;
mod conv;
mod conv1d;
mod conv_transpose;
mod dropout;
mod embedding;
mod layout;
mod linear;
mod lora;
mod mlp;
mod norm;
mod pool;
mod recurrent;
mod transformer;

pub use activation::Act;
pub use attention::{AttentionConfig, MultiHeadAttention};
pub use conv::Conv2d;
pub use conv1d::Conv1d;
pub use conv_transpose::ConvTranspose2d;
pub use dropout::Dropout;
pub use embedding::{sinusoid_table, Embedding, PositionalEncoding};
pub use layout::FileLayout;
pub use linear::Linear;
pub use lora::LoraLinear;
pub use mlp::{GeluMlp, SwiGlu};
pub use norm::{BatchNorm, LayerNorm};
pub use pool::{Flatten, Pool2d, PoolKind};
pub use recurrent::{Cell, Recurrent};
pub use transformer::{BlockConfig, BlockWeights, MlpKind, NormKind, NormOrder, TransformerBlock};

use crate::{Result, Tensor};
use lockstep_kernels::Backend;

/// A trainable tensor and its gradient, named for init streams and checkpoints.
pub struct Param<B: Backend> {
    pub name: String,
    pub shape: Vec<usize>,
    pub value: B::Buf,
    pub grad: B::Buf,
    /// Weight decay / L1 / L2 apply (false for biases and norm parameters by default, T20).
    pub decay: bool,
    /// Frozen parameters get no gradient, no optimizer state and no all-reduce traffic.
    pub trainable: bool,
    /// Its layout in files (PyTorch's) where that differs from memory.
    pub layout: FileLayout,
}

impl<B: Backend> Param<B> {
    pub fn new(be: &B, name: impl Into<String>, shape: &[usize], value: &[f32], decay: bool) -> Result<Self> {
        let n: usize = shape.iter().product();
        let name = name.into();
        if n != value.len() {
            return crate::shape_err("Param::new", format!("{name}: shape {shape:?} vs {} values", value.len()));
        }
        Ok(Self {
            name,
            shape: shape.to_vec(),
            value: be.upload(value)?,
            grad: be.zeros(n)?,
            decay,
            trainable: true,
            layout: FileLayout::Same,
        })
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The shape this parameter has in files.
    pub fn file_shape(&self) -> Vec<usize> {
        self.layout.file_shape(&self.shape)
    }
    /// `values` of this parameter's shape (its value, gradient or optimizer state) as a
    /// file tensor: (name-less) file shape and values in file order.
    pub fn to_file(&self, values: &[f32]) -> (Vec<usize>, Vec<f32>) {
        (self.file_shape(), self.layout.to_file(&self.shape, values))
    }
    /// A file tensor of this parameter, in memory order; `Err` names the shapes if the
    /// file's differs.
    pub fn from_file(&self, shape: &[usize], values: &[f32]) -> std::result::Result<Vec<f32>, String> {
        let want = self.file_shape();
        if shape != want.as_slice() || values.len() != self.numel() {
            return Err(format!("{} has shape {shape:?} in the file, the model expects {want:?}", self.name));
        }
        Ok(self.layout.from_file(&self.shape, values))
    }
}

/// Sums a few statistics across the data-parallel workers, inside forward or backward
/// (synchronised BatchNorm, T10). Every worker must call it the same number of times, in
/// the same order.
pub trait StatSync: Send + Sync {
    fn sum(&self, values: &mut [f64]) -> Result<()>;
}

/// A shared [`StatSync`] that a `ForwardCtx` can carry.
#[derive(Clone)]
pub struct StatSyncHandle(pub std::sync::Arc<dyn StatSync>);

impl std::fmt::Debug for StatSyncHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatSync")
    }
}

/// What a forward pass needs to know besides its input.
#[derive(Debug, Clone, Default)]
pub struct ForwardCtx {
    /// Training mode: dropout active, caches kept for backward.
    pub train: bool,
    pub seed: u64,
    pub step: u64,
    /// Global dataset index of each row, so per-example randomness (dropout, augmentation)
    /// is keyed by the example, never by the rank that processes it (T40).
    pub example_ids: Vec<u64>,
    /// Valid length of each sequence of the batch (T29); positions at or after it are
    /// padding that attention never attends to. Empty: every sequence is full length.
    pub seq_lens: Vec<usize>,
    /// Set in data-parallel training: synchronised BatchNorm sums its statistics through it.
    pub stat_sync: Option<StatSyncHandle>,
    /// (index, count) of this forward among the micro-batches of one optimizer step
    /// (gradient accumulation, whose backwards run in the same order); None otherwise. A
    /// layer may defer part of its parameter gradients to the last micro-batch's backward.
    pub micro_batch: Option<(usize, usize)>,
    /// Incremental decoding with a KV cache (sampling): x is one sequence's positions
    /// `from..from + T`, and the attention layers hold the keys and values of positions
    /// 0..from from earlier calls (Some(0) starts a new sequence). None: x starts at
    /// position 0 and nothing is cached across calls.
    pub decode_from: Option<usize>,
}

/// Told by [`Layer::backward_in_pieces`] which values of which parameter's gradient are final.
pub type PieceReady<'a, B> = dyn FnMut(usize, &Param<B>, std::ops::Range<usize>) -> Result<()> + 'a;

pub trait Layer<B: Backend>: Send {
    fn name(&self) -> &str;
    /// y = f(x). Takes x by value so a layer that needs it in backward keeps it without a copy.
    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>>;
    /// dL/dx from dL/dy; parameter gradients are accumulated (+=).
    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>>;
    /// `backward` that calls `ready(j, param, range)` as soon as `range` of the layer's
    /// j-th parameter's gradient is final, so a data-parallel reducer can send it while the
    /// rest still computes; a layer that can cuts a large gradient into pieces of at most
    /// about `piece` values (`usize::MAX`: whole). Each parameter's pieces come in order and
    /// end at its length. The default reports every parameter whole, once backward is done.
    fn backward_in_pieces(
        &mut self,
        be: &B,
        dy: Tensor<B>,
        _piece: usize,
        ready: &mut PieceReady<'_, B>,
    ) -> Result<Tensor<B>> {
        let dx = self.backward(be, dy)?;
        for (j, p) in self.params().into_iter().enumerate() {
            ready(j, p, 0..p.numel())?;
        }
        Ok(dx)
    }
    fn params(&self) -> Vec<&Param<B>> {
        Vec::new()
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        Vec::new()
    }
    /// State that is not a parameter but that a checkpoint must keep (BatchNorm's running
    /// statistics), by name.
    fn buffers(&self) -> Vec<(String, Vec<f64>)> {
        Vec::new()
    }
    /// Restores a buffer returned by `buffers`; false if the name is not this layer's or
    /// the length differs.
    fn load_buffer(&mut self, _name: &str, _values: &[f64]) -> bool {
        false
    }
    /// Whether backward must compute dL/dx. The model's first layer is told no (nothing
    /// consumes the gradient of the data), which saves a GEMM; it then returns an empty dx.
    fn set_input_grad(&mut self, _needed: bool) {}
    /// Forward FLOPs for one example (T34): a (M,K)x(K,N) matmul is M·K·N multiplies plus
    /// M·N·(K−1) adds.
    fn flops_per_example(&self) -> u64 {
        0
    }
}

/// Takes the cached tensor or reports that backward ran without a training forward.
pub(crate) fn cached<T>(cache: &mut Option<T>, layer: &str) -> Result<T> {
    cache.take().ok_or_else(|| crate::NnError::Invalid(format!("{layer}: backward called without a training forward")))
}

/// Checks that `x` is a batch of (H, W, C) images as `win` expects; returns the batch size.
pub(crate) fn image_batch<B: Backend>(
    op: &'static str,
    layer: &str,
    x: &Tensor<B>,
    win: &lockstep_kernels::Window,
) -> Result<usize> {
    if x.shape.len() != 4 || x.shape[1..] != [win.h, win.w, win.c] {
        return crate::shape_err(
            op,
            format!("{layer}: input {:?}, expected [N, {}, {}, {}]", x.shape, win.h, win.w, win.c),
        );
    }
    Ok(x.shape[0])
}
