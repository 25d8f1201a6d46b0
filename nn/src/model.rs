//! A sequential stack of layers.

use crate::{ForwardCtx, Layer, Param, Result, Tensor};
use lockstep_kernels::Backend;
use std::ops::Range;

/// Called by `backward_with_hook` with (index of a parameter in `params()`, the parameter,
/// the range of its gradient that is final): see [`Layer::backward_in_pieces`].
pub type GradsReadyHook<'a, B> = dyn FnMut(usize, &Param<B>, Range<usize>) -> Result<()> + 'a;

pub struct Sequential<B: Backend> {
    pub layers: Vec<Box<dyn Layer<B>>>,
}

impl<B: Backend> Sequential<B> {
    /// The first layer is told not to compute the gradient of its input (the data).
    pub fn new(mut layers: Vec<Box<dyn Layer<B>>>) -> Self {
        if let Some(first) = layers.first_mut() {
            first.set_input_grad(false);
        }
        Self { layers }
    }

    pub fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        self.forward_layers(be, 0..self.layers.len(), x, ctx)
    }

    /// Forward through `layers` alone (one network of a GAN held in one stack).
    pub fn forward_layers(
        &mut self,
        be: &B,
        layers: Range<usize>,
        x: Tensor<B>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor<B>> {
        let mut h = x;
        for layer in &mut self.layers[layers] {
            h = layer.forward(be, h, ctx)?;
        }
        Ok(h)
    }

    pub fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        self.backward_with_hook(be, dy, &mut |_, _, _| Ok(()))
    }

    /// Backward that calls `grads_ready(param_index, param, range)` as soon as a piece of a
    /// parameter's gradient is final (last layer first; a large weight in pieces), so a
    /// data-parallel reducer can start sending it while the rest still computes.
    /// `param_index` is the parameter's position in `params()`.
    pub fn backward_with_hook(
        &mut self,
        be: &B,
        dy: Tensor<B>,
        grads_ready: &mut GradsReadyHook<'_, B>,
    ) -> Result<Tensor<B>> {
        self.backward_layers(be, 0..self.layers.len(), dy, usize::MAX, grads_ready)
    }

    /// `backward_with_hook` through `layers` alone, large gradients in pieces of about
    /// `piece` values (see [`Layer::backward_in_pieces`]); the hook's indices are still
    /// positions in the whole stack's `params()`.
    pub fn backward_layers(
        &mut self,
        be: &B,
        layers: Range<usize>,
        dy: Tensor<B>,
        piece: usize,
        grads_ready: &mut GradsReadyHook<'_, B>,
    ) -> Result<Tensor<B>> {
        let mut first_index: Vec<usize> = Vec::with_capacity(self.layers.len());
        let mut count = 0;
        for layer in &self.layers {
            first_index.push(count);
            count += layer.params().len();
        }
        let mut d = dy;
        for (i, layer) in self.layers.iter_mut().enumerate().skip(layers.start).take(layers.len()).rev() {
            d = layer.backward_in_pieces(be, d, piece, &mut |j, param, range| {
                grads_ready(first_index[i] + j, param, range)
            })?;
        }
        Ok(d)
    }

    pub fn params(&self) -> Vec<&Param<B>> {
        self.layers.iter().flat_map(|l| l.params()).collect()
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        self.layers.iter_mut().flat_map(|l| l.params_mut()).collect()
    }

    /// Every layer's non-parameter state (BatchNorm running statistics), by name.
    pub fn buffers(&self) -> Vec<(String, Vec<f64>)> {
        self.layers.iter().flat_map(|l| l.buffers()).collect()
    }

    /// Restores one buffer; false if no layer has it (or its length differs).
    pub fn load_buffer(&mut self, name: &str, values: &[f64]) -> bool {
        self.layers.iter_mut().any(|l| l.load_buffer(name, values))
    }

    pub fn param_count(&self) -> usize {
        self.params().iter().map(|p| p.numel()).sum()
    }

    pub fn flops_per_example(&self) -> u64 {
        self.layers.iter().map(|l| l.flops_per_example()).sum()
    }

    pub fn zero_grad(&mut self, be: &B) -> Result<()> {
        for p in self.params_mut() {
            be.fill(&mut p.grad, 0.0)?;
        }
        Ok(())
    }

    /// FNV-1a over every parameter's bits, in order: equal hashes = bitwise-equal weights.
    pub fn weight_hash(&self, be: &B) -> Result<u64> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for p in self.params() {
            for v in be.download(&p.value)? {
                for b in v.to_bits().to_le_bytes() {
                    h ^= b as u64;
                    h = h.wrapping_mul(0x0100_0000_01b3);
                }
            }
        }
        Ok(h)
    }
}
