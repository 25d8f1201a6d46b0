use super::{cached, Act, ForwardCtx, Layer, Linear, Param};
use crate::{ops, Result, Tensor};
use lockstep_kernels::{Activation, Backend};

/// GPT-2's MLP on (…, D): fc2(GELU(fc1(x))), D → H → D (H = 4D in GPT-2).
pub struct GeluMlp<B: Backend> {
    name: String,
    pub fc1: Linear<B>,
    pub act: Act<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> GeluMlp<B> {
    /// `fc1` is (H, D), `fc2` (D, H), row-major.
    pub fn new(be: &B, name: &str, dim: usize, hidden: usize, fc1: &[f32], fc2: &[f32], bias: bool) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            fc1: Linear::with_bias(be, &format!("{name}.fc1"), dim, hidden, fc1, bias)?,
            act: Act::new(&format!("{name}.gelu"), Activation::Gelu, hidden),
            fc2: Linear::with_bias(be, &format!("{name}.fc2"), hidden, dim, fc2, bias)?,
        })
    }
}

impl<B: Backend> Layer<B> for GeluMlp<B> {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let h = self.fc1.forward(be, x, ctx)?; // (…, H)
        let h = self.act.forward(be, h, ctx)?;
        self.fc2.forward(be, h, ctx) // (…, D)
    }
    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let d = self.fc2.backward(be, dy)?;
        let d = self.act.backward(be, d)?;
        self.fc1.backward(be, d)
    }
    fn params(&self) -> Vec<&Param<B>> {
        let mut p = self.fc1.params();
        p.extend(self.fc2.params());
        p
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        let mut p = self.fc1.params_mut();
        p.extend(self.fc2.params_mut());
        p
    }
    fn flops_per_example(&self) -> u64 {
        self.fc1.flops_per_example() + self.act.flops_per_example() + self.fc2.flops_per_example()
    }
}

/// LLaMA's MLP on (…, D) (Shazeer 2020, "GLU variants"): down(SiLU(gate(x)) ⊙ up(x)),
/// D → H → D. Three weight matrices instead of two, so H ≈ 8D/3 matches GPT-2's 4D MLP
/// in parameters.
pub struct SwiGlu<B: Backend> {
    name: String,
    pub gate: Linear<B>,
    pub up: Linear<B>,
    pub silu: Act<B>,
    pub down: Linear<B>,
    /// SiLU(gate(x)) and up(x), (…, H): the two factors of the product.
    factors_cache: Option<(Tensor<B>, Tensor<B>)>,
}

impl<B: Backend> SwiGlu<B> {
    /// `gate` and `up` are (H, D), `down` (D, H), row-major.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        be: &B,
        name: &str,
        dim: usize,
        hidden: usize,
        gate: &[f32],
        up: &[f32],
        down: &[f32],
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            gate: Linear::with_bias(be, &format!("{name}.gate"), dim, hidden, gate, bias)?,
            up: Linear::with_bias(be, &format!("{name}.up"), dim, hidden, up, bias)?,
            silu: Act::new(&format!("{name}.silu"), Activation::Swish { beta: 1.0 }, hidden),
            down: Linear::with_bias(be, &format!("{name}.down"), hidden, dim, down, bias)?,
            factors_cache: None,
        })
    }
}

impl<B: Backend> Layer<B> for SwiGlu<B> {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let g = self.gate.forward(be, x.duplicate(be)?, ctx)?; // (…, H)
        let s = self.silu.forward(be, g, ctx)?; // SiLU(gate(x))
        let u = self.up.forward(be, x, ctx)?; // (…, H)
        let a = ops::hadamard(be, &s, &u)?;
        if ctx.train {
            self.factors_cache = Some((s, u));
        }
        self.down.forward(be, a, ctx) // (…, D)
    }
    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let (s, u) = cached(&mut self.factors_cache, &self.name)?;
        let da = self.down.backward(be, dy)?; // (…, H)
        let (ds, du) = ops::hadamard_backward(be, &s, &u, &da)?;
        let dg = self.silu.backward(be, ds)?;
        let dx = self.gate.backward(be, dg)?; // (…, D)
        ops::add(be, &dx, &self.up.backward(be, du)?) // x feeds both gate and up
    }
    fn params(&self) -> Vec<&Param<B>> {
        let mut p = self.gate.params();
        p.extend(self.up.params());
        p.extend(self.down.params());
        p
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        let mut p = self.gate.params_mut();
        p.extend(self.up.params_mut());
        p.extend(self.down.params_mut());
        p
    }
    fn flops_per_example(&self) -> u64 {
        let hidden = self.silu.flops_per_example();
        self.gate.flops_per_example() + self.up.flops_per_example() + self.down.flops_per_example() + 2 * hidden
    }
}

/// Gradient checks against finite differences (the checker is `crate::gradcheck`).
#[cfg(test)]
mod gradient_tests {
    use super::*;
    use crate::gradcheck::{check_layer, test_input as input};
    use lockstep_kernels::CpuBackend;

    fn w(n: usize, salt: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * salt).sin() * 0.5).collect()
    }

    #[test]
    fn swiglu_gradients_with_and_without_biases() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        for bias in [true, false] {
            let mut mlp = SwiGlu::new(&be, "mlp", 4, 6, &w(24, 0.37), &w(24, 0.53), &w(24, 0.29), bias).unwrap();
            assert_eq!(mlp.params().len(), if bias { 6 } else { 3 });
            check_layer(&be, &mut mlp, &[2, 3, 4], &input(24), &ctx);
        }
    }

    /// Known values: with one hidden unit, y = w_down·SiLU(w_gate·x)·(w_up·x).
    #[test]
    fn swiglu_known_value() {
        let be = CpuBackend::new(1);
        let mut mlp = SwiGlu::new(&be, "mlp", 1, 1, &[2.0], &[3.0], &[0.5], false).unwrap();
        let y = mlp.forward(&be, Tensor::from_slice(&be, &[1, 1], &[1.5]).unwrap(), &ForwardCtx::default()).unwrap();
        let g = 3.0f32;
        let want = 0.5 * (g / (1.0 + (-g).exp())) * 4.5;
        assert!((y.buf[0] - want).abs() < 1e-5, "{} vs {want}", y.buf[0]);
    }

    #[test]
    fn gelu_mlp_gradients_without_biases() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        let mut mlp = GeluMlp::new(&be, "mlp", 4, 6, &w(24, 0.37), &w(24, 0.53), false).unwrap();
        assert_eq!(mlp.params().len(), 2);
        check_layer(&be, &mut mlp, &[2, 3, 4], &input(24), &ctx);
    }
}
