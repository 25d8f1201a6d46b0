use super::{cached, ForwardCtx, Layer, Param};
use crate::{shape_err, Result, Tensor};
use lockstep_kernels::Backend;

/// LayerNorm over the last dimension (T11): each example (or position) is normalised over
/// its features, then scaled by gamma and shifted by beta. Without beta it is RMSNorm
/// (Zhang & Sennrich 2019; LLaMA): y = gamma·x/rms(x), rms(x) = sqrt(mean(x²) + eps), no
/// centring; cheaper, and in LLaMA-style blocks as good.
pub struct LayerNorm<B: Backend> {
    name: String,
    pub features: usize,
    pub eps: f32,
    pub gamma: Param<B>,
    /// None: RMSNorm.
    pub beta: Option<Param<B>>,
    /// x̂ (rows, features), 1/sqrt(var + eps) or 1/rms (rows), and the input's shape.
    xhat_rstd_cache: Option<(B::Buf, B::Buf, Vec<usize>)>,
}

impl<B: Backend> LayerNorm<B> {
    pub fn new(be: &B, name: &str, features: usize) -> Result<Self> {
        let mut norm = Self::rms(be, name, features)?;
        norm.beta = Some(Param::new(be, format!("{name}.bias"), &[features], &vec![0.0; features], false)?);
        Ok(norm)
    }

    /// RMSNorm: no centring, no beta.
    pub fn rms(be: &B, name: &str, features: usize) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            features,
            eps: 1e-5,
            gamma: Param::new(be, format!("{name}.weight"), &[features], &vec![1.0; features], false)?,
            beta: None,
            xhat_rstd_cache: None,
        })
    }
}

impl<B: Backend> Layer<B> for LayerNorm<B> {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let (rows, cols) = x.rows_cols();
        if cols != self.features {
            return shape_err(
                "LayerNorm::forward",
                format!("{}: input {:?}, expected last dim {}", self.name, x.shape, self.features),
            );
        }
        let mut y = Tensor::zeros(be, &x.shape)?; // (rows, D)
        let (mut xhat, mut rstd) = (be.zeros(rows * cols)?, be.zeros(rows)?);
        let (gamma, eps) = (&self.gamma.value, self.eps);
        match &self.beta {
            Some(beta) => {
                be.layer_norm_forward(&x.buf, gamma, &beta.value, rows, cols, eps, &mut y.buf, &mut xhat, &mut rstd)?
            }
            None => be.rms_norm_forward(&x.buf, gamma, rows, cols, eps, &mut y.buf, &mut xhat, &mut rstd)?,
        }
        if ctx.train {
            self.xhat_rstd_cache = Some((xhat, rstd, x.shape.clone()));
        }
        Ok(y)
    }
    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let (xhat, rstd, shape) = cached(&mut self.xhat_rstd_cache, &self.name)?;
        let cols = self.features;
        let rows = dy.numel() / cols;
        let mut dx = Tensor::zeros(be, &shape)?;
        let (gamma, dgamma) = (&self.gamma.value, &mut self.gamma.grad);
        match &mut self.beta {
            Some(beta) => {
                be.layer_norm_backward(&dy.buf, &xhat, &rstd, gamma, rows, cols, &mut dx.buf, dgamma, &mut beta.grad)?
            }
            None => be.rms_norm_backward(&dy.buf, &xhat, &rstd, gamma, rows, cols, &mut dx.buf, dgamma)?,
        }
        Ok(dx)
    }
    fn params(&self) -> Vec<&Param<B>> {
        std::iter::once(&self.gamma).chain(&self.beta).collect()
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        std::iter::once(&mut self.gamma).chain(&mut self.beta).collect()
    }
    fn flops_per_example(&self) -> u64 {
        let per_feature = if self.beta.is_some() { 8 } else { 4 };
        per_feature * self.features as u64
    }
}

/// BatchNorm over the batch (T10): each channel (the last dimension; for NHWC images the
/// statistics cover N, H and W) is normalised with the batch mean and variance in training
/// and with running estimates (momentum 0.1, unbiased variance, as PyTorch) at eval.
/// Statistics are per worker in data-parallel training.
pub struct BatchNorm<B: Backend> {
    name: String,
    pub channels: usize,
    pub eps: f32,
    pub momentum: f64,
    pub gamma: Param<B>,
    pub beta: Param<B>,
    pub running_mean: Vec<f64>,
    pub running_var: Vec<f64>,
    /// Statistics over the global batch of all data-parallel workers (SyncBatchNorm)
    /// instead of this worker's share; needs `ForwardCtx::stat_sync` to take effect.
    pub sync: bool,
    /// x̂, the batch variance used to make it, the input shape, the global row count and
    /// the sync handle of the forward (backward sums through the same one).
    cache: Option<BatchNormCache<B>>,
}

struct BatchNormCache<B: Backend> {
    xhat: B::Buf,
    var: Vec<f64>,
    shape: Vec<usize>,
    global_rows: f64,
    sync: Option<super::StatSyncHandle>,
}

impl<B: Backend> BatchNorm<B> {
    pub fn new(be: &B, name: &str, channels: usize) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            channels,
            eps: 1e-5,
            momentum: 0.1,
            gamma: Param::new(be, format!("{name}.weight"), &[channels], &vec![1.0; channels], false)?,
            beta: Param::new(be, format!("{name}.bias"), &[channels], &vec![0.0; channels], false)?,
            running_mean: vec![0.0; channels],
            running_var: vec![1.0; channels],
            sync: false,
            cache: None,
        })
    }
}

impl<B: Backend> Layer<B> for BatchNorm<B> {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let (rows, cols) = x.rows_cols();
        if cols != self.channels {
            return shape_err(
                "BatchNorm::forward",
                format!("{}: input {:?}, expected last dim {}", self.name, x.shape, self.channels),
            );
        }
        let sync = ctx.stat_sync.clone().filter(|_| self.sync && ctx.train);
        let mut global_rows = rows as f64;
        let (mean, var) = if ctx.train {
            let (mut mean, mut var) = be.column_stats(&x.buf, rows, cols)?;
            if let Some(handle) = &sync {
                // [rows, Σx, Σx²] summed over workers, then the global mean and variance.
                let mut sums = vec![rows as f64];
                sums.extend(mean.iter().map(|m| m * rows as f64));
                sums.extend(mean.iter().zip(&var).map(|(m, v)| (v + m * m) * rows as f64));
                handle.0.sum(&mut sums)?;
                global_rows = sums[0];
                for c in 0..cols {
                    mean[c] = sums[1 + c] / global_rows;
                    var[c] = (sums[1 + cols + c] / global_rows - mean[c] * mean[c]).max(0.0);
                }
            }
            let rows = global_rows as usize;
            let unbias = if rows > 1 { rows as f64 / (rows - 1) as f64 } else { 1.0 };
            for c in 0..cols {
                self.running_mean[c] = (1.0 - self.momentum) * self.running_mean[c] + self.momentum * mean[c];
                self.running_var[c] = (1.0 - self.momentum) * self.running_var[c] + self.momentum * var[c] * unbias;
            }
            (mean, var)
        } else {
            (self.running_mean.clone(), self.running_var.clone())
        };
        let mut y = Tensor::zeros(be, &x.shape)?;
        let mut xhat = be.zeros(rows * cols)?;
        be.batch_norm_apply(
            &x.buf,
            &mean,
            &var,
            &self.gamma.value,
            &self.beta.value,
            rows,
            cols,
            self.eps,
            &mut y.buf,
            &mut xhat,
        )?;
        if ctx.train {
            self.cache = Some(BatchNormCache { xhat, var, shape: x.shape.clone(), global_rows, sync });
        }
        Ok(y)
    }
    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let BatchNormCache { xhat, var, shape, global_rows, sync } = cached(&mut self.cache, &self.name)?;
        let cols = self.channels;
        let rows = dy.numel() / cols;
        let (mut sum_d, mut sum_dh) = be.batch_norm_backward_sums(
            &dy.buf,
            &xhat,
            &self.gamma.value,
            rows,
            cols,
            &mut self.gamma.grad,
            &mut self.beta.grad,
        )?;
        if let Some(handle) = &sync {
            let mut sums = [sum_d, sum_dh].concat();
            handle.0.sum(&mut sums)?;
            (sum_d, sum_dh) = (sums[..cols].to_vec(), sums[cols..].to_vec());
        }
        let mean_d: Vec<f64> = sum_d.iter().map(|s| s / global_rows).collect();
        let mean_dh: Vec<f64> = sum_dh.iter().map(|s| s / global_rows).collect();
        let mut dx = Tensor::zeros(be, &shape)?;
        be.batch_norm_backward_dx(
            &dy.buf,
            &xhat,
            &var,
            &self.gamma.value,
            (&mean_d, &mean_dh),
            rows,
            cols,
            self.eps,
            &mut dx.buf,
        )?;
        Ok(dx)
    }
    fn params(&self) -> Vec<&Param<B>> {
        vec![&self.gamma, &self.beta]
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        vec![&mut self.gamma, &mut self.beta]
    }
    fn buffers(&self) -> Vec<(String, Vec<f64>)> {
        vec![
            (format!("{}.running_mean", self.name), self.running_mean.clone()),
            (format!("{}.running_var", self.name), self.running_var.clone()),
        ]
    }
    fn load_buffer(&mut self, name: &str, values: &[f64]) -> bool {
        let target = match name.strip_prefix(self.name.as_str()) {
            Some(".running_mean") => &mut self.running_mean,
            Some(".running_var") => &mut self.running_var,
            _ => return false,
        };
        if target.len() != values.len() {
            return false;
        }
        target.copy_from_slice(values);
        true
    }
    fn flops_per_example(&self) -> u64 {
        4 * self.channels as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{StatSync, StatSyncHandle};
    use lockstep_kernels::CpuBackend;
    use std::sync::{Arc, Barrier, Mutex};

    /// Two threads standing in for two workers: each adds its values, waits, reads the total.
    struct TwoThreadSum {
        total: Mutex<Vec<f64>>,
        barrier: Barrier,
    }

    impl StatSync for TwoThreadSum {
        fn sum(&self, values: &mut [f64]) -> crate::Result<()> {
            {
                let mut t = self.total.lock().unwrap();
                if t.len() != values.len() {
                    *t = vec![0.0; values.len()];
                }
                t.iter_mut().zip(values.iter()).for_each(|(a, b)| *a += b);
            }
            self.barrier.wait();
            values.copy_from_slice(&self.total.lock().unwrap());
            if self.barrier.wait().is_leader() {
                self.total.lock().unwrap().clear();
            }
            self.barrier.wait();
            Ok(())
        }
    }

    fn run(
        be: &CpuBackend,
        bn: &mut BatchNorm<CpuBackend>,
        x: &[f32],
        dy: &[f32],
        ctx: &ForwardCtx,
    ) -> (Vec<f32>, Vec<f32>) {
        let rows = x.len() / 3;
        let y = bn.forward(be, Tensor::from_slice(be, &[rows, 3], x).unwrap(), ctx).unwrap();
        let dx = bn.backward(be, Tensor::from_slice(be, &[rows, 3], dy).unwrap()).unwrap();
        (y.buf, dx.buf)
    }

    #[test]
    fn sync_batch_norm_over_two_workers_equals_one_batch_norm_over_the_whole_batch() {
        let be = CpuBackend::new(1);
        let x: Vec<f32> = (0..8 * 3).map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.3 + (i % 3) as f32).collect();
        let dy: Vec<f32> = (0..8 * 3).map(|i| ((i as f32) * 0.7).sin()).collect();
        let train = ForwardCtx { train: true, ..Default::default() };
        let mut whole = BatchNorm::new(&be, "bn", 3).unwrap();
        let (y_all, dx_all) = run(&be, &mut whole, &x, &dy, &train);

        let shared = Arc::new(TwoThreadSum { total: Mutex::new(Vec::new()), barrier: Barrier::new(2) });
        let halves: Vec<_> = [(0usize, false), (1, false), (0, true), (1, true)]
            .into_iter()
            .map(|(half, sync)| {
                let (x, dy, shared) = (x[half * 12..][..12].to_vec(), dy[half * 12..][..12].to_vec(), shared.clone());
                (half, sync, x, dy, shared)
            })
            .collect();
        for sync in [false, true] {
            let threads: Vec<_> = halves
                .iter()
                .filter(|h| h.1 == sync)
                .cloned()
                .map(|(half, _, x, dy, shared)| {
                    std::thread::spawn(move || {
                        let be = CpuBackend::new(1);
                        let mut bn = BatchNorm::new(&be, "bn", 3).unwrap();
                        bn.sync = sync;
                        let ctx =
                            ForwardCtx { train: true, stat_sync: Some(StatSyncHandle(shared)), ..Default::default() };
                        let out = run(&be, &mut bn, &x, &dy, &ctx);
                        (half, out, bn.gamma.grad.clone(), bn.running_mean.clone())
                    })
                })
                .collect();
            let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let mut max_diff = 0.0f32;
            for (half, (y, dx), _, _) in &results {
                for (a, b) in y.iter().chain(dx).zip(y_all[half * 12..][..12].iter().chain(&dx_all[half * 12..][..12]))
                {
                    max_diff = max_diff.max((a - b).abs());
                }
            }
            if sync {
                assert!(max_diff < 1e-5, "synchronised halves differ from the whole batch by {max_diff}");
                // Both workers keep the same (global) running statistics.
                assert_eq!(results[0].3, results[1].3);
                for (a, b) in results[0].3.iter().zip(&whole.running_mean) {
                    assert!((a - b).abs() < 1e-9, "running mean {a} vs {b}");
                }
            } else {
                assert!(max_diff > 1e-2, "per-worker statistics should differ from the whole batch ({max_diff})");
            }
        }
    }
}

/// Gradient checks against finite differences, and known values (the checker is
/// `crate::gradcheck`).
#[cfg(test)]
mod gradient_tests {
    use crate::gradcheck::{check_layer, test_input as input};
    use crate::layers::{BatchNorm, LayerNorm};

    use crate::{ForwardCtx, Layer, Tensor};
    use lockstep_kernels::CpuBackend;

    #[test]
    fn layer_norm_and_batch_norm_gradients() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        let mut ln = LayerNorm::new(&be, "ln", 6).unwrap();
        ln.gamma.value = (0..6).map(|i| 0.5 + i as f32 * 0.2).collect();
        ln.beta.as_mut().unwrap().value = (0..6).map(|i| i as f32 * 0.1).collect();
        check_layer(&be, &mut ln, &[4, 6], &input(24), &ctx);
        let mut bn = BatchNorm::new(&be, "bn", 3).unwrap();
        bn.gamma.value = vec![0.7, 1.3, -0.4];
        bn.beta.value = vec![0.1, 0.0, -0.2];
        check_layer(&be, &mut bn, &[2, 2, 2, 3], &input(24), &ctx);
    }

    #[test]
    fn rms_norm_gradients_and_known_values() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        let mut rms = LayerNorm::rms(&be, "rms", 6).unwrap();
        rms.gamma.value = (0..6).map(|i| 0.5 + i as f32 * 0.2).collect();
        check_layer(&be, &mut rms, &[4, 6], &input(24), &ctx);
        // (3, 4): mean square 12.5, so y = gamma·x/sqrt(12.5 + eps).
        let mut rms = LayerNorm::rms(&be, "rms", 2).unwrap();
        let y = rms.forward(&be, Tensor::from_slice(&be, &[1, 2], &[3., 4.]).unwrap(), &ctx).unwrap();
        let r = (12.5f32 + 1e-5).sqrt();
        assert!((y.buf[0] - 3.0 / r).abs() < 1e-6 && (y.buf[1] - 4.0 / r).abs() < 1e-6, "{:?}", y.buf);
    }

    #[test]
    fn batch_norm_statistics_train_and_eval() {
        let be = CpuBackend::new(1);
        let mut bn = BatchNorm::new(&be, "bn", 2).unwrap();
        let x = Tensor::from_slice(&be, &[4, 2], &[1., 10., 2., 20., 3., 30., 4., 40.]).unwrap();
        let y = bn.forward(&be, x.duplicate(&be).unwrap(), &ForwardCtx { train: true, ..Default::default() }).unwrap();
        // Column 0 is 1..4: mean 2.5, biased var 1.25.
        assert!((y.buf[0] - (-1.5 / (1.25f32 + 1e-5).sqrt())).abs() < 1e-5);
        let mean: f32 = y.buf.iter().step_by(2).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6);
        // Running stats move 10% toward the batch (unbiased variance 5/3 for column 0).
        assert!((bn.running_mean[0] - 0.25).abs() < 1e-12);
        assert!((bn.running_var[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-12);
        // Eval uses the running statistics.
        let y = bn.forward(&be, x, &ForwardCtx::default()).unwrap();
        let want = (1.0 - 0.25) / (bn.running_var[0] + 1e-5).sqrt();
        assert!((y.buf[0] as f64 - want).abs() < 1e-5);
    }
}
