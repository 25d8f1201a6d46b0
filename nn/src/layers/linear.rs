use super::{cached, ForwardCtx, Layer, Param, PieceReady};
use crate::{shape_err, Result, Tensor};
use lockstep_kernels::{Backend, Gemm};

/// y = x·Wᵀ + b (T5), or y = x·Wᵀ without a bias (`Linear::without_bias`, LLaMA-style
/// blocks). W is stored (out, in) as in PyTorch, so checkpoints map one to one.
pub struct Linear<B: Backend> {
    name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub weight: Param<B>,       // (out, in)
    pub bias: Option<Param<B>>, // (out)
    /// The layer input, (B, in): backward needs it for dW.
    input_cache: Option<Tensor<B>>,
    input_grad: bool,
    /// This forward's place among a step's micro-batches (`ForwardCtx::micro_batch`).
    micro_batch: Option<(usize, usize)>,
    /// Earlier micro-batches' (x, dy), whose dW waits for the last one (`weight_grad`).
    deferred: Vec<(Tensor<B>, Tensor<B>)>,
}

impl<B: Backend> Linear<B> {
    /// `weight` is (out, in) row-major; the bias starts at zero.
    pub fn new(be: &B, name: &str, in_features: usize, out_features: usize, weight: &[f32]) -> Result<Self> {
        let mut layer = Self::without_bias(be, name, in_features, out_features, weight)?;
        layer.bias = Some(Param::new(be, format!("{name}.bias"), &[out_features], &vec![0.0; out_features], false)?);
        Ok(layer)
    }

    /// `new` or `without_bias`, as `bias` says.
    pub fn with_bias(be: &B, name: &str, inputs: usize, outputs: usize, weight: &[f32], bias: bool) -> Result<Self> {
        match bias {
            true => Self::new(be, name, inputs, outputs, weight),
            false => Self::without_bias(be, name, inputs, outputs, weight),
        }
    }

    /// y = x·Wᵀ: no bias parameter at all (nothing to store, decay or all-reduce).
    pub fn without_bias(be: &B, name: &str, in_features: usize, out_features: usize, weight: &[f32]) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            in_features,
            out_features,
            weight: Param::new(be, format!("{name}.weight"), &[out_features, in_features], weight, true)?,
            bias: None,
            input_cache: None,
            input_grad: true,
            micro_batch: None,
            deferred: Vec::new(),
        })
    }
}

impl<B: Backend> Linear<B> {
    /// dW (out,in) += dyᵀ (out,B) · x (B,in). Under gradient accumulation with micro-batches
    /// of few rows the product waits for the last micro-batch and runs once over all their
    /// rows: one pass over dW instead of one per micro-batch (at 16 rows a micro-batch the
    /// k passes over the MLP's 1.6 MB dW cost more than the products). It waits only while
    /// the rows it keeps stay under half the weight's size.
    /// dW in row blocks of about `piece` values when it holds two or more, each handed on
    /// as soon as it is done: the last layer backward reaches is the first of the model,
    /// often its largest, and its all-reduce would otherwise wait for its whole product.
    fn weight_grad(
        &mut self,
        be: &B,
        (x, dy): (Tensor<B>, Tensor<B>),
        piece: usize,
        ready: &mut PieceReady<'_, B>,
    ) -> Result<()> {
        let (i, o) = (self.in_features, self.out_features);
        let rows = x.rows_cols().0;
        if let Some((index, count)) = self.micro_batch {
            if index + 1 < count && rows * count * (i + o) <= i * o / 2 {
                self.deferred.push((x, dy));
                return Ok(());
            }
        }
        let dw = Gemm::tn(o, rows, i).accumulate();
        let pieces = o * i / piece.max(1);
        if self.deferred.is_empty() && pieces < 2 {
            be.matmul(&dy.buf, &x.buf, &mut self.weight.grad, dw)?;
            return ready(0, &self.weight, 0..o * i);
        }
        if self.deferred.is_empty() {
            let block = o.div_ceil(pieces);
            for start in (0..o).step_by(block) {
                let end = (start + block).min(o);
                be.matmul_rows(&dy.buf, &x.buf, &mut self.weight.grad, dw, start..end)?;
                ready(0, &self.weight, start * i..end * i)?;
            }
            return Ok(());
        }
        let mut pending = std::mem::take(&mut self.deferred);
        pending.push((x, dy));
        let total: usize = pending.iter().map(|(x, _)| x.rows_cols().0).sum();
        let (mut xs, mut dys) = (Tensor::zeros(be, &[total, i])?, Tensor::zeros(be, &[total, o])?);
        let mut row = 0;
        for (x, dy) in &pending {
            let n = x.rows_cols().0;
            be.copy_range(&x.buf, 0, &mut xs.buf, row * i, n * i)?;
            be.copy_range(&dy.buf, 0, &mut dys.buf, row * o, n * o)?;
            row += n;
        }
        be.matmul(&dys.buf, &xs.buf, &mut self.weight.grad, Gemm::tn(o, total, i).accumulate())?;
        ready(0, &self.weight, 0..o * i)
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
        // y (B, out) = bias + x·Wᵀ: the GEMM accumulates onto the broadcast bias (no zero-fill,
        // no second pass for the bias).
        let (buf, accumulate) = match &self.bias {
            Some(bias) => (be.repeat_rows(&bias.value, rows)?, true),
            None => (be.zeros(rows * self.out_features)?, false),
        };
        let mut y = Tensor { shape, buf };
        let gemm = Gemm::nt(rows, self.in_features, self.out_features).accumulate_if(accumulate);
        be.matmul(&x.buf, &self.weight.value, &mut y.buf, gemm)?;
        if ctx.train {
            self.input_cache = Some(x);
            self.micro_batch = ctx.micro_batch;
            if ctx.micro_batch.is_none_or(|(index, _)| index == 0) {
                self.deferred.clear(); // a new step (or one that failed part-way)
            }
        }
        Ok(y)
    }

    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        self.backward_in_pieces(be, dy, usize::MAX, &mut |_, _, _| Ok(()))
    }

    /// db, then dx, then dW (in row blocks of about `piece` values when it holds two or
    /// more), each reported as it is done; a deferred dW and a frozen weight once, whole.
    fn backward_in_pieces(
        &mut self,
        be: &B,
        dy: Tensor<B>,
        piece: usize,
        ready: &mut PieceReady<'_, B>,
    ) -> Result<Tensor<B>> {
        let x = cached(&mut self.input_cache, &self.name)?; // (B, in)
        let (rows, _) = x.rows_cols();
        if dy.numel() != rows * self.out_features {
            return shape_err("Linear::backward", format!("{}: dy {:?}", self.name, dy.shape));
        }
        let (i, o) = (self.in_features, self.out_features);
        if let Some(bias) = self.bias.as_mut() {
            if bias.trainable {
                be.sum_rows(&dy.buf, &mut bias.grad, rows, o, true)?; // db (out) += Σ_rows dy
            }
            ready(1, bias, 0..o)?;
        }
        let dx = if self.input_grad {
            let mut dx = Tensor::zeros(be, &x.shape)?; // dx (B,in) = dy (B,out) · W (out,in)
            be.matmul(&dy.buf, &self.weight.value, &mut dx.buf, Gemm::nn(rows, o, i))?;
            dx
        } else {
            Tensor::zeros(be, &[0])?
        };
        if self.weight.trainable {
            self.weight_grad(be, (x, dy), piece, ready)?;
        } else {
            ready(0, &self.weight, 0..o * i)?;
        }
        Ok(dx)
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.input_grad = needed;
    }
    fn params(&self) -> Vec<&Param<B>> {
        std::iter::once(&self.weight).chain(&self.bias).collect()
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        std::iter::once(&mut self.weight).chain(&mut self.bias).collect()
    }
    fn flops_per_example(&self) -> u64 {
        let (i, o) = (self.in_features as u64, self.out_features as u64);
        o * i + o * (i - 1) + o * self.bias.is_some() as u64 // matmul + bias add
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
        layer.bias.as_mut().unwrap().value = vec![0.1, -0.2, 0.3];
        check_layer(&be, &mut layer, &[5, 4], &input(20), &ForwardCtx { train: true, ..Default::default() });
    }

    /// Asked for pieces of a third of the weight, a weight reports its gradient in row
    /// blocks, in order and covering it once, after the bias; the pieces add up to the
    /// gradient of one product.
    #[test]
    fn a_large_weight_gradient_comes_in_ordered_pieces_equal_to_one_product() {
        use crate::{Layer, Tensor};
        use lockstep_kernels::{Backend, Gemm};
        let be = CpuBackend::new(2);
        let (rows, i, o) = (4, 96, 61);
        let w: Vec<f32> = (0..o * i).map(|v| ((v as f32) * 0.013).sin()).collect();
        let x: Vec<f32> = (0..rows * i).map(|v| ((v as f32) * 0.07).cos()).collect();
        let dy: Vec<f32> = (0..rows * o).map(|v| ((v as f32) * 0.11).sin()).collect();
        let mut layer = Linear::new(&be, "fc", i, o, &w).unwrap();
        let ctx = ForwardCtx { train: true, ..Default::default() };
        layer.forward(&be, Tensor::from_slice(&be, &[rows, i], &x).unwrap(), &ctx).unwrap();
        let mut seen = Vec::new();
        let dy_t = Tensor::from_slice(&be, &[rows, o], &dy).unwrap();
        layer
            .backward_in_pieces(&be, dy_t, o * i / 3, &mut |j, _, range| {
                seen.push((j, range));
                Ok(())
            })
            .unwrap();
        assert_eq!(seen[0], (1, 0..o), "the bias first, whole");
        let weight: Vec<_> = seen[1..].iter().map(|(j, r)| (*j, r.clone())).collect();
        assert_eq!(weight.len(), 3, "{weight:?}");
        assert!(weight.iter().all(|(j, r)| *j == 0 && r.start % i == 0 && r.end % i == 0));
        assert_eq!(weight.first().map(|w| w.1.start), Some(0));
        assert_eq!(weight.last().map(|w| w.1.end), Some(o * i));
        assert!(weight.windows(2).all(|p| p[0].1.end == p[1].1.start), "in order, no gap: {weight:?}");
        let mut want = vec![0.0; o * i];
        be.matmul(&dy, &x, &mut want, Gemm::tn(o, rows, i)).unwrap();
        for (g, w) in layer.weight.grad.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
        }
    }

    /// Under accumulation the first micro-batch's dW waits; after the last one dW is the
    /// whole batch's, and dx is each micro-batch's own all along.
    #[test]
    fn a_deferred_weight_gradient_is_the_whole_batch_one_after_the_last_micro_batch() {
        use crate::{Layer, Tensor};
        let be = CpuBackend::new(1);
        let (rows, features) = (3, 32);
        let w: Vec<f32> = (0..features * features).map(|i| ((i as f32) * 0.37).sin()).collect();
        let x = input(2 * rows * features);
        let dy: Vec<f32> = (0..2 * rows * features).map(|i| ((i as f32) * 0.11).cos()).collect();
        let run = |layer: &mut Linear<CpuBackend>, r: std::ops::Range<usize>, micro| {
            let ctx = ForwardCtx { train: true, micro_batch: micro, ..Default::default() };
            let n = r.len();
            let xt = Tensor::from_slice(&be, &[n, features], &x[r.start * features..r.end * features]).unwrap();
            layer.forward(&be, xt, &ctx).unwrap();
            let dyt = Tensor::from_slice(&be, &[n, features], &dy[r.start * features..r.end * features]).unwrap();
            layer.backward(&be, dyt).unwrap().buf
        };
        let mut whole = Linear::new(&be, "fc", features, features, &w).unwrap();
        let dx_whole = run(&mut whole, 0..2 * rows, None);
        let mut split = Linear::new(&be, "fc", features, features, &w).unwrap();
        let dx_first = run(&mut split, 0..rows, Some((0, 2)));
        assert!(split.weight.grad.iter().all(|&g| g == 0.0), "the first micro-batch's dW waits");
        assert!(split.bias.as_ref().unwrap().grad.iter().any(|&g| g != 0.0), "db does not wait");
        let dx_second = run(&mut split, rows..2 * rows, Some((1, 2)));
        assert_eq!([dx_first, dx_second].concat(), dx_whole);
        for (a, b) in split.weight.grad.iter().zip(&whole.weight.grad) {
            assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
