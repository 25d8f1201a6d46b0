use super::{cached, ForwardCtx, Layer};
use crate::rng::{uniform_of, Stream};
use crate::{Result, Tensor};
use lockstep_kernels::Backend;
use rayon::prelude::*;

/// Inverted dropout (T9): in training keep each unit with probability 1−p and scale it by
/// 1/(1−p); identity at eval. The mask of row i is drawn from the stream
/// (seed, "dropout", layer, step, global example id), so it does not depend on the rank.
pub struct Dropout<B: Backend> {
    name: String,
    pub p: f32,
    layer_id: u64,
    /// The scaled keep-mask (0 or 1/(1−p)) applied in forward, reused in backward.
    mask_cache: Option<Tensor<B>>,
}

impl<B: Backend> Dropout<B> {
    pub fn new(name: &str, p: f32, layer_id: u64) -> Self {
        Self { name: name.to_string(), p, layer_id, mask_cache: None }
    }
}

impl<B: Backend> Layer<B> for Dropout<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        if !ctx.train || self.p == 0.0 {
            self.mask_cache = None;
            return Ok(x);
        }
        // One mask stream per example, covering all of it ((F), (T, D) or (H, W, C)).
        let rows = x.shape.first().copied().unwrap_or(0);
        let cols = x.numel() / rows.max(1);
        if ctx.example_ids.len() != rows {
            return crate::shape_err(
                "Dropout::forward",
                format!("{} examples but {} example ids", rows, ctx.example_ids.len()),
            );
        }
        let keep_scale = 1.0 / (1.0 - self.p);
        // Each example's stream is its own (counter-based Philox), so the rows are drawn in
        // parallel with the same bits on any number of threads (serial, this was 8% of an
        // MNIST-MLP step with the other core idle).
        let mut mask = vec![0.0f32; rows * cols];
        let (p, layer_id, step, seed) = (self.p, self.layer_id, ctx.step, ctx.seed);
        mask.par_chunks_mut(cols.max(1)).zip(ctx.example_ids.par_iter()).for_each(|(row, &example)| {
            let mut stream = Stream::new(seed, "dropout", &[layer_id, step, example]);
            let mut words = [0u32; 256];
            for piece in row.chunks_mut(words.len()) {
                let words = &mut words[..piece.len()];
                stream.fill_u32(words);
                for (m, &word) in piece.iter_mut().zip(words.iter()) {
                    *m = if uniform_of(word) >= p { keep_scale } else { 0.0 };
                }
            }
        });
        let mask = Tensor::from_vec(be, &x.shape, mask)?;
        let mut y = Tensor::zeros(be, &x.shape)?;
        be.mul(&x.buf, &mask.buf, &mut y.buf)?;
        self.mask_cache = Some(mask);
        Ok(y)
    }

    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        if self.p == 0.0 {
            return Ok(dy);
        }
        let mask = cached(&mut self.mask_cache, &self.name)?;
        let mut dx = Tensor::zeros(be, &dy.shape)?;
        be.mul(&dy.buf, &mask.buf, &mut dx.buf)?;
        Ok(dx)
    }
}

/// Gradient checks against finite differences, and known values (the checker is
/// `crate::gradcheck`).
#[cfg(test)]
mod gradient_tests {
    use crate::gradcheck::{check_layer, test_input as input};
    use crate::layers::Dropout;

    use crate::{ForwardCtx, Layer, Tensor};
    use lockstep_kernels::CpuBackend;

    #[test]
    fn dropout_gradient_and_scaling() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, seed: 3, step: 5, example_ids: vec![10, 11, 12, 13], ..Default::default() };
        check_layer(&be, &mut Dropout::new("drop", 0.3, 0), &[4, 6], &input(24), &ctx);

        // Inverted scaling: kept units are x/(1−p), dropped are 0, the mean is preserved.
        let mut drop = Dropout::new("drop", 0.25, 0);
        let rows = 2000;
        let ids: Vec<u64> = (0..rows as u64).collect();
        let x = Tensor::from_slice(&be, &[rows, 50], &vec![1.0; rows * 50]).unwrap();
        let y = drop
            .forward(
                &be,
                x.duplicate(&be).unwrap(),
                &ForwardCtx { train: true, seed: 1, step: 0, example_ids: ids, ..Default::default() },
            )
            .unwrap();
        assert!(y.buf.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        let kept = y.buf.iter().filter(|&&v| v > 0.0).count() as f64 / y.buf.len() as f64;
        assert!((kept - 0.75).abs() < 0.01, "{kept}");
        let mean = y.buf.iter().map(|&v| v as f64).sum::<f64>() / y.buf.len() as f64;
        assert!((mean - 1.0).abs() < 0.015, "{mean}");
        // Eval mode is the identity.
        let y = drop.forward(&be, x.duplicate(&be).unwrap(), &ForwardCtx::default()).unwrap();
        assert_eq!(y.buf, x.buf);
        // The same example at the same step gets the same mask wherever it is in the batch.
        let a = drop
            .forward(
                &be,
                x.duplicate(&be).unwrap(),
                &ForwardCtx { train: true, seed: 1, step: 0, example_ids: (0..2000).collect(), ..Default::default() },
            )
            .unwrap();
        let b = drop
            .forward(
                &be,
                x.duplicate(&be).unwrap(),
                &ForwardCtx {
                    train: true,
                    seed: 1,
                    step: 0,
                    example_ids: (0..2000).rev().collect(),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(a.buf[..50], b.buf[1999 * 50..]);
    }
}
