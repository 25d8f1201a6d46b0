use super::{cached, ForwardCtx, Layer, Param};
use crate::{shape_err, Result, Tensor};
use lockstep_kernels::Backend;

/// LayerNorm over the last dimension (T11): each example (or position) is normalised over
/// its features, then scaled by gamma and shifted by beta.
pub struct LayerNorm<B: Backend> {
    name: String,
    pub features: usize,
    pub eps: f32,
    pub gamma: Param<B>,
    pub beta: Param<B>,
    /// x̂ (rows, features) and 1/sqrt(var + eps) (rows).
    xhat_rstd_cache: Option<(B::Buf, B::Buf, Vec<usize>)>,
}

impl<B: Backend> LayerNorm<B> {
    pub fn new(be: &B, name: &str, features: usize) -> Self {
        Self {
            name: name.to_string(),
            features,
            eps: 1e-5,
            gamma: Param::new(be, format!("{name}.weight"), &[features], &vec![1.0; features], false),
            beta: Param::new(be, format!("{name}.bias"), &[features], &vec![0.0; features], false),
            xhat_rstd_cache: None,
        }
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
        let mut y = Tensor::zeros(be, &x.shape);
        let (mut xhat, mut rstd) = (be.zeros(rows * cols), be.zeros(rows));
        be.layer_norm_forward(
            &x.buf,
            &self.gamma.value,
            &self.beta.value,
            rows,
            cols,
            self.eps,
            &mut y.buf,
            &mut xhat,
            &mut rstd,
        );
        if ctx.train {
            self.xhat_rstd_cache = Some((xhat, rstd, x.shape.clone()));
        }
        Ok(y)
    }
    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let (xhat, rstd, shape) = cached(&mut self.xhat_rstd_cache, &self.name)?;
        let cols = self.features;
        let rows = dy.numel() / cols;
        let mut dx = Tensor::zeros(be, &shape);
        be.layer_norm_backward(
            &dy.buf,
            &xhat,
            &rstd,
            &self.gamma.value,
            rows,
            cols,
            &mut dx.buf,
            &mut self.gamma.grad,
            &mut self.beta.grad,
        );
        Ok(dx)
    }
    fn params(&self) -> Vec<&Param<B>> {
        vec![&self.gamma, &self.beta]
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        vec![&mut self.gamma, &mut self.beta]
    }
    fn flops_per_example(&self) -> u64 {
        8 * self.features as u64
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
    /// x̂ and the batch variance used to make it.
    xhat_var_cache: Option<(B::Buf, Vec<f64>, Vec<usize>)>,
}

impl<B: Backend> BatchNorm<B> {
    pub fn new(be: &B, name: &str, channels: usize) -> Self {
        Self {
            name: name.to_string(),
            channels,
            eps: 1e-5,
            momentum: 0.1,
            gamma: Param::new(be, format!("{name}.weight"), &[channels], &vec![1.0; channels], false),
            beta: Param::new(be, format!("{name}.bias"), &[channels], &vec![0.0; channels], false),
            running_mean: vec![0.0; channels],
            running_var: vec![1.0; channels],
            xhat_var_cache: None,
        }
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
        let (mean, var) = if ctx.train {
            let (mean, var) = be.column_stats(&x.buf, rows, cols);
            let unbias = if rows > 1 { rows as f64 / (rows - 1) as f64 } else { 1.0 };
            for c in 0..cols {
                self.running_mean[c] = (1.0 - self.momentum) * self.running_mean[c] + self.momentum * mean[c];
                self.running_var[c] = (1.0 - self.momentum) * self.running_var[c] + self.momentum * var[c] * unbias;
            }
            (mean, var)
        } else {
            (self.running_mean.clone(), self.running_var.clone())
        };
        let mut y = Tensor::zeros(be, &x.shape);
        let mut xhat = be.zeros(rows * cols);
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
        );
        if ctx.train {
            self.xhat_var_cache = Some((xhat, var, x.shape.clone()));
        }
        Ok(y)
    }
    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let (xhat, var, shape) = cached(&mut self.xhat_var_cache, &self.name)?;
        let cols = self.channels;
        let rows = dy.numel() / cols;
        let mut dx = Tensor::zeros(be, &shape);
        be.batch_norm_backward(
            &dy.buf,
            &xhat,
            &var,
            &self.gamma.value,
            rows,
            cols,
            self.eps,
            &mut dx.buf,
            &mut self.gamma.grad,
            &mut self.beta.grad,
        );
        Ok(dx)
    }
    fn params(&self) -> Vec<&Param<B>> {
        vec![&self.gamma, &self.beta]
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        vec![&mut self.gamma, &mut self.beta]
    }
    fn flops_per_example(&self) -> u64 {
        4 * self.channels as u64
    }
}
