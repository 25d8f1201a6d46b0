use super::{cached, ForwardCtx, Layer, Param};
use crate::{Result, Tensor};
use lockstep_kernels::{Activation, Backend};

/// An element-wise activation (T2). Swish may carry a learnable beta (a 1-element param).
pub struct Act<B: Backend> {
    name: String,
    pub activation: Activation,
    /// Learnable Swish beta; when set it overrides the beta in `activation`.
    pub beta: Option<Param<B>>,
    /// The pre-activation input x: every derivative here is a function of x.
    input_cache: Option<Tensor<B>>,
    features: usize,
}

impl<B: Backend> Act<B> {
    pub fn new(name: &str, activation: Activation, features: usize) -> Self {
        Self { name: name.to_string(), activation, beta: None, input_cache: None, features }
    }

    /// Swish x·sigmoid(beta·x) with beta trained.
    pub fn learnable_swish(be: &B, name: &str, beta: f32, features: usize) -> Result<Self> {
        let mut act = Self::new(name, Activation::Swish { beta }, features);
        act.beta = Some(Param::new(be, format!("{name}.beta"), &[1], &[beta], false)?);
        Ok(act)
    }

    fn current(&self, be: &B) -> Result<Activation> {
        Ok(match &self.beta {
            Some(p) => Activation::Swish { beta: be.download(&p.value)?[0] },
            None => self.activation,
        })
    }
}

impl<B: Backend> Layer<B> for Act<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let mut y = Tensor::zeros(be, &x.shape)?;
        be.activation_forward(self.current(be)?, &x.buf, &mut y.buf)?;
        if ctx.train {
            self.input_cache = Some(x);
        }
        Ok(y)
    }

    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let x = cached(&mut self.input_cache, &self.name)?;
        let act = self.current(be)?;
        let mut dx = Tensor::zeros(be, &x.shape)?;
        let dbeta = be.activation_backward(act, &x.buf, &dy.buf, &mut dx.buf, false)?;
        if let Some(p) = self.beta.as_mut().filter(|p| p.trainable) {
            let g = be.download(&p.grad)?[0] + dbeta;
            p.grad = be.upload(&[g])?;
        }
        Ok(dx)
    }

    fn params(&self) -> Vec<&Param<B>> {
        self.beta.iter().collect()
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        self.beta.iter_mut().collect()
    }
    fn flops_per_example(&self) -> u64 {
        self.features as u64
    }
}

/// Gradient checks against finite differences, and known values (the checker is
/// `crate::gradcheck`).
#[cfg(test)]
mod gradient_tests {
    use crate::gradcheck::{check_layer, test_input as input};
    use crate::layers::Act;

    use crate::ForwardCtx;
    use lockstep_kernels::{Activation, CpuBackend};

    #[test]
    fn activation_gradients() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        for act in [
            Activation::Sigmoid,
            Activation::Tanh,
            Activation::Relu,
            Activation::LeakyRelu { slope: 0.1 },
            Activation::Swish { beta: 1.0 },
            Activation::Swish { beta: 1.7 },
            Activation::Gelu,
        ] {
            check_layer(&be, &mut Act::new("act", act, 6), &[4, 6], &input(24), &ctx);
        }
        // Learnable beta: its gradient is checked as a parameter.
        check_layer(&be, &mut Act::learnable_swish(&be, "swish", 0.8, 6).unwrap(), &[4, 6], &input(24), &ctx);
    }
}
