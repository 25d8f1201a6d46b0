use super::{cached, ForwardCtx, Layer, Param};
use crate::{shape_err, Result, Tensor};
use lockstep_kernels::{Backend, Gemm};

/// LoRA (T38): a frozen layer y = base(x) plus a trained low-rank branch,
/// y = base(x) + (alpha/r)·(x·Aᵀ)·Bᵀ with A (r, in) and B (out, r). B starts at zero, so
/// the adapted model starts exactly at the base model. Only A and B get gradients,
/// optimiser state and all-reduce traffic.
pub struct LoraLinear<B: Backend> {
    name: String,
    base: Box<dyn Layer<B>>,
    pub in_features: usize,
    pub out_features: usize,
    pub rank: usize,
    /// alpha / r.
    pub scaling: f32,
    pub a: Param<B>, // (r, in)
    pub b: Param<B>, // (out, r)
    /// The layer input x (B, in): dA needs it.
    input_cache: Option<Tensor<B>>,
    /// The down-projection h = x·Aᵀ (B, r): dB needs it.
    down_cache: Option<Tensor<B>>,
    input_grad: bool,
}

impl<B: Backend> LoraLinear<B> {
    /// Wraps `base`, a Linear layer (its `weight` is (out, in)); freezes its parameters.
    /// `a_init` is A's initial value (r·in values); B is zero.
    pub fn new(be: &B, mut base: Box<dyn Layer<B>>, rank: usize, alpha: f32, a_init: &[f32]) -> Result<Self> {
        let name = base.name().to_string();
        let (out_features, in_features) = match base.params().iter().find(|p| p.name.ends_with(".weight")) {
            Some(w) if w.shape.len() == 2 => (w.shape[0], w.shape[1]),
            _ => return shape_err("LoraLinear::new", format!("{name}: LoRA needs a Linear layer (a 2-D weight)")),
        };
        if a_init.len() != rank * in_features {
            return shape_err("LoraLinear::new", format!("{name}: A init has {} values", a_init.len()));
        }
        for p in base.params_mut() {
            p.trainable = false;
        }
        Ok(Self {
            a: Param::new(be, format!("{name}.lora_a"), &[rank, in_features], a_init, false)?,
            b: Param::new(be, format!("{name}.lora_b"), &[out_features, rank], &vec![0.0; out_features * rank], false)?,
            name,
            base,
            in_features,
            out_features,
            rank,
            scaling: alpha / rank as f32,
            input_cache: None,
            down_cache: None,
            input_grad: true,
        })
    }
}

impl<B: Backend> Layer<B> for LoraLinear<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let (rows, cols) = x.rows_cols();
        if cols != self.in_features {
            return shape_err("LoraLinear::forward", format!("{}: input {:?}", self.name, x.shape));
        }
        let (i, o, r) = (self.in_features, self.out_features, self.rank);
        let mut down = Tensor::zeros(be, &[rows, r])?; // h (B, r) = x (B, in) · Aᵀ
        be.matmul(&x.buf, &self.a.value, &mut down.buf, Gemm::nt(rows, i, r))?;
        let mut up = Tensor::zeros(be, &[rows, o])?; // (B, out) = h · Bᵀ
        be.matmul(&down.buf, &self.b.value, &mut up.buf, Gemm::nt(rows, r, o))?;
        let input = if ctx.train { Some(x.duplicate(be)?) } else { None };
        let mut y = self.base.forward(be, x, ctx)?; // (B, out) = x·Wᵀ + b
        be.axpy(self.scaling, &up.buf, &mut y.buf)?;
        if ctx.train {
            self.input_cache = input;
            self.down_cache = Some(down);
        }
        Ok(y)
    }

    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let x = cached(&mut self.input_cache, &self.name)?; // (B, in)
        let down = cached(&mut self.down_cache, &self.name)?; // (B, r)
        let (rows, _) = x.rows_cols();
        let (i, o, r) = (self.in_features, self.out_features, self.rank);
        let mut dy_scaled = dy.duplicate(be)?; // s·dy (B, out)
        be.scale(&mut dy_scaled.buf, self.scaling)?;
        // dB (out, r) += (s·dy)ᵀ · h
        be.matmul(&dy_scaled.buf, &down.buf, &mut self.b.grad, Gemm::tn(o, rows, r).accumulate())?;
        let mut d_down = Tensor::zeros(be, &[rows, r])?; // dh (B, r) = s·dy · B
        be.matmul(&dy_scaled.buf, &self.b.value, &mut d_down.buf, Gemm::nn(rows, o, r))?;
        // dA (r, in) += dhᵀ · x
        be.matmul(&d_down.buf, &x.buf, &mut self.a.grad, Gemm::tn(r, rows, i).accumulate())?;
        let mut dx = self.base.backward(be, dy)?; // dy · W (frozen: no dW)
        if self.input_grad {
            // dx (B, in) += dh · A
            be.matmul(&d_down.buf, &self.a.value, &mut dx.buf, Gemm::nn(rows, r, i).accumulate())?;
        }
        Ok(dx)
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.input_grad = needed;
        self.base.set_input_grad(needed);
    }
    fn params(&self) -> Vec<&Param<B>> {
        let mut params = self.base.params();
        params.extend([&self.a, &self.b]);
        params
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        let mut params = self.base.params_mut();
        params.extend([&mut self.a, &mut self.b]);
        params
    }
    fn flops_per_example(&self) -> u64 {
        let (i, o, r) = (self.in_features as u64, self.out_features as u64, self.rank as u64);
        // base + x·Aᵀ + h·Bᵀ + the add
        self.base.flops_per_example() + r * i + r * (i - 1) + o * r + o * (r - 1) + o
    }
}

/// Gradient checks against finite differences, and known values (the checker is
/// `crate::gradcheck`).
#[cfg(test)]
mod gradient_tests {
    use crate::gradcheck::{check_layer, test_input as input};
    use crate::layers::{Linear, LoraLinear};

    use crate::{ForwardCtx, Layer, Tensor};
    use lockstep_kernels::CpuBackend;

    #[test]
    fn lora_gradients_and_merge() {
        let be = CpuBackend::new(1);
        let (i, o, r) = (4, 3, 2);
        let w: Vec<f32> = (0..12).map(|k| ((k as f32) * 0.77).sin()).collect();
        let mut base = Linear::new(&be, "fc", i, o, &w).unwrap();
        base.bias.as_mut().unwrap().value = vec![0.1, -0.2, 0.3];
        let a: Vec<f32> = (0..r * i).map(|k| ((k as f32) * 1.3).cos() * 0.5).collect();
        let mut lora = LoraLinear::new(&be, Box::new(base), r, 4.0, &a).unwrap();
        let ctx = ForwardCtx { train: true, ..Default::default() };
        // B starts at zero: the adapted layer is exactly the base layer.
        let y0 = lora
            .forward(&be, Tensor::from_slice(&be, &[5, i], &input(20)).unwrap(), &ctx)
            .unwrap()
            .to_vec(&be)
            .unwrap();
        let plain = Linear::new(&be, "fc", i, o, &w).unwrap().forward(
            &be,
            Tensor::from_slice(&be, &[5, i], &input(20)).unwrap(),
            &ctx,
        );
        let mut plain_y = plain.unwrap().to_vec(&be).unwrap();
        for (v, b) in plain_y.iter_mut().zip([0.1, -0.2, 0.3].iter().cycle()) {
            *v += b;
        }
        assert_eq!(y0, plain_y);
        lora.b.value = (0..o * r).map(|k| ((k as f32) * 0.41).sin()).collect();
        check_layer(&be, &mut lora, &[5, i], &input(20), &ctx);
        // Folding W + s·B·A gives the same outputs.
        let y = lora
            .forward(&be, Tensor::from_slice(&be, &[5, i], &input(20)).unwrap(), &ctx)
            .unwrap()
            .to_vec(&be)
            .unwrap();
        let mut merged_w = w.clone();
        for out in 0..o {
            for inp in 0..i {
                let ba: f32 = (0..r).map(|k| lora.b.value[out * r + k] * a[k * i + inp]).sum();
                merged_w[out * i + inp] += lora.scaling * ba;
            }
        }
        let mut merged = Linear::new(&be, "fc", i, o, &merged_w).unwrap();
        merged.bias.as_mut().unwrap().value = vec![0.1, -0.2, 0.3];
        let ym = merged
            .forward(&be, Tensor::from_slice(&be, &[5, i], &input(20)).unwrap(), &ctx)
            .unwrap()
            .to_vec(&be)
            .unwrap();
        for (a, b) in y.iter().zip(&ym) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
