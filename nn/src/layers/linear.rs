use super::{cached, ForwardCtx, Layer, Param};
use crate::{shape_err, Result, Tensor};
use lockstep_kernels::{Backend, Gemm};

/// y = x·Wᵀ + b (T5). W is stored (out, in) as in PyTorch, so checkpoints map one to one.
pub struct Linear<B: Backend> {
    name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub weight: Param<B>, // (out, in)
    pub bias: Param<B>,   // (out)
    /// The layer input, (B, in): backward needs it for dW.
    input_cache: Option<Tensor<B>>,
    input_grad: bool,
}

impl<B: Backend> Linear<B> {
    /// `weight` is (out, in) row-major; the bias starts at zero.
    pub fn new(be: &B, name: &str, in_features: usize, out_features: usize, weight: &[f32]) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            in_features,
            out_features,
            weight: Param::new(be, format!("{name}.weight"), &[out_features, in_features], weight, true)?,
            bias: Param::new(be, format!("{name}.bias"), &[out_features], &vec![0.0; out_features], false)?,
            input_cache: None,
            input_grad: true,
        })
    }
}

impl<B: Backend> Layer<B> for Linear<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let (rows, cols) = x.rows_cols();
        if cols != self.in_features {
            return shape_err(
                "Linear::forward",
                format!("{}: input {:?}, expected last dim {}", self.name, x.shape, self.in_features),
            );
        }
        let mut shape = x.shape.clone();
        *shape.last_mut().unwrap_or(&mut 0) = self.out_features;
        let mut y = Tensor::zeros(be, &shape)?; // (B, out)
        be.matmul(&x.buf, &self.weight.value, &mut y.buf, Gemm::nt(rows, self.in_features, self.out_features))?;
        be.add_row_vector(&mut y.buf, &self.bias.value, rows, self.out_features)?;
        if ctx.train {
            self.input_cache = Some(x);
        }
        Ok(y)
    }

    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let x = cached(&mut self.input_cache, &self.name)?; // (B, in)
        let (rows, _) = x.rows_cols();
        if dy.numel() != rows * self.out_features {
            return shape_err("Linear::backward", format!("{}: dy {:?}", self.name, dy.shape));
        }
        let (i, o) = (self.in_features, self.out_features);
        if self.weight.trainable {
            // dW (out,in) += dyᵀ (out,B) · x (B,in)
            be.matmul(&dy.buf, &x.buf, &mut self.weight.grad, Gemm::tn(o, rows, i).accumulate())?;
        }
        if self.bias.trainable {
            be.sum_rows(&dy.buf, &mut self.bias.grad, rows, o, true)?; // db (out) += Σ_rows dy
        }
        if !self.input_grad {
            return Tensor::zeros(be, &[0]);
        }
        let mut dx = Tensor::zeros(be, &x.shape)?; // dx (B,in) = dy (B,out) · W (out,in)
        be.matmul(&dy.buf, &self.weight.value, &mut dx.buf, Gemm::nn(rows, o, i))?;
        Ok(dx)
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.input_grad = needed;
    }
    fn params(&self) -> Vec<&Param<B>> {
        vec![&self.weight, &self.bias]
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        vec![&mut self.weight, &mut self.bias]
    }
    fn flops_per_example(&self) -> u64 {
        let (i, o) = (self.in_features as u64, self.out_features as u64);
        o * i + o * (i - 1) + o // matmul + bias add
    }
}

/// Gradient checks against finite differences, and known values (the checker is
/// `crate::gradcheck`).
#[cfg(test)]
mod gradient_tests {
    use crate::gradcheck::{check_layer, test_input as input};
    use crate::layers::Linear;

    use crate::ForwardCtx;
    use lockstep_kernels::CpuBackend;

    #[test]
    fn linear_gradients() {
        let be = CpuBackend::new(1);
        let w: Vec<f32> = (0..12).map(|i| ((i as f32) * 0.77).sin()).collect();
        let mut layer = Linear::new(&be, "fc", 4, 3, &w).unwrap();
        layer.bias.value = vec![0.1, -0.2, 0.3];
        check_layer(&be, &mut layer, &[5, 4], &input(20), &ForwardCtx { train: true, ..Default::default() });
    }
}
