use super::{cached, ForwardCtx, Layer, Param};
use crate::{shape_err, Result, Tensor};
use lockstep_kernels::{Backend, Gemm};

/// Which recurrent cell (T17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// Gates [i f g o]: c = f⊙c_prev + i⊙g, h = o⊙tanh(c).
    Lstm,
    /// Gates [r z n]: h = (1−z)⊙n + z⊙h_prev.
    Gru,
}

impl Cell {
    pub fn gates(self) -> usize {
        match self {
            Cell::Lstm => 4,
            Cell::Gru => 3,
        }
    }
}

/// A recurrent layer over (N, T, In) -> (N, T, H), zero initial state, trained by
/// backpropagation through time. Parameters are named and shaped as PyTorch's `nn.LSTM` /
/// `nn.GRU`: weight_ih (G·H, In), weight_hh (G·H, H), bias_ih, bias_hh (G·H).
///
/// The input projection of all T steps is one GEMM; each step adds h_{t−1}·W_hhᵀ (a GEMM)
/// and runs the cell's point-wise part (`Backend::lstm_forward` / `gru_forward`).
pub struct Recurrent<B: Backend> {
    name: String,
    pub cell: Cell,
    pub input: usize,
    pub hidden: usize,
    /// Longest sequence (for the FLOP count only).
    pub max_len: usize,
    pub weight_ih: Param<B>,
    pub weight_hh: Param<B>,
    pub bias_ih: Param<B>,
    pub bias_hh: Param<B>,
    cache: Option<RecurrentCache<B>>,
    input_grad: bool,
}

/// Per time step: what backward needs.
struct StepCache<B: Backend> {
    h_prev: B::Buf, // (N, H)
    gates: B::Buf,  // (N, G·H), activated
    /// LSTM: c_prev and c (N, H). GRU: the hidden projection hp (N, 3H) in `c`.
    c_prev: B::Buf,
    c: B::Buf,
}

struct RecurrentCache<B: Backend> {
    x: Tensor<B>, // (N, T, In)
    steps: Vec<StepCache<B>>,
}

impl<B: Backend> Recurrent<B> {
    /// `w_ih` (G·H, In) and `w_hh` (G·H, H) row-major. Biases start at zero except the LSTM
    /// forget gate's, at 1, so early training does not forget everything (Jozefowicz 2015).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        be: &B,
        name: &str,
        cell: Cell,
        input: usize,
        hidden: usize,
        max_len: usize,
        w_ih: &[f32],
        w_hh: &[f32],
    ) -> Result<Self> {
        let gh = cell.gates() * hidden;
        let mut b_ih = vec![0.0; gh];
        if cell == Cell::Lstm {
            b_ih[hidden..2 * hidden].fill(1.0);
        }
        Ok(Self {
            name: name.to_string(),
            cell,
            input,
            hidden,
            max_len,
            weight_ih: Param::new(be, format!("{name}.weight_ih"), &[gh, input], w_ih, true)?,
            weight_hh: Param::new(be, format!("{name}.weight_hh"), &[gh, hidden], w_hh, true)?,
            bias_ih: Param::new(be, format!("{name}.bias_ih"), &[gh], &b_ih, false)?,
            bias_hh: Param::new(be, format!("{name}.bias_hh"), &[gh], &vec![0.0; gh], false)?,
            cache: None,
            input_grad: true,
        })
    }
}

impl<B: Backend> Layer<B> for Recurrent<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let [n, t, i] = x.shape[..] else {
            return shape_err("Recurrent::forward", format!("{}: input {:?}, expected [N, T, In]", self.name, x.shape));
        };
        if i != self.input {
            return shape_err(
                "Recurrent::forward",
                format!("{}: input {:?}, expected In {}", self.name, x.shape, self.input),
            );
        }
        let (h, gh) = (self.hidden, self.cell.gates() * self.hidden);
        // xp (N·T, G·H) = x·W_ihᵀ + b_ih for every step at once.
        let mut xp = be.zeros(n * t * gh)?;
        be.matmul(&x.buf, &self.weight_ih.value, &mut xp, Gemm::nt(n * t, i, gh))?;
        be.add_row_vector(&mut xp, &self.bias_ih.value, n * t, gh)?;
        let mut y = Tensor::zeros(be, &[n, t, h])?;
        let (mut h_prev, mut c_prev) = (be.zeros(n * h)?, be.zeros(n * h)?);
        let mut steps = Vec::with_capacity(if ctx.train { t } else { 0 });
        for step in 0..t {
            let mut pre = be.zeros(n * gh)?; // xp at this step, (N, G·H)
            be.copy_columns(&xp, t * gh, step * gh, &mut pre, gh, 0, gh, n, false)?;
            let mut hp = be.zeros(n * gh)?; // h_{t−1}·W_hhᵀ + b_hh
            be.matmul(&h_prev, &self.weight_hh.value, &mut hp, Gemm::nt(n, h, gh))?;
            be.add_row_vector(&mut hp, &self.bias_hh.value, n, gh)?;
            let (mut gates, mut h_next) = (be.zeros(n * gh)?, be.zeros(n * h)?);
            // LSTM: the cell state c; GRU: hp, which its backward needs.
            let second = match self.cell {
                Cell::Lstm => {
                    be.axpy(1.0, &hp, &mut pre)?;
                    let mut c = be.zeros(n * h)?;
                    be.lstm_forward(&pre, &c_prev, &mut gates, &mut c, &mut h_next, h)?;
                    c
                }
                Cell::Gru => {
                    be.gru_forward(&pre, &hp, &h_prev, &mut gates, &mut h_next, h)?;
                    hp
                }
            };
            be.copy_columns(&h_next, h, 0, &mut y.buf, t * h, step * h, h, n, false)?;
            let h_done = std::mem::replace(&mut h_prev, h_next);
            let cache = match self.cell {
                Cell::Lstm => {
                    let mut c = be.zeros(n * h)?;
                    be.copy(&second, &mut c)?;
                    StepCache { h_prev: h_done, gates, c_prev: std::mem::replace(&mut c_prev, second), c }
                }
                Cell::Gru => StepCache { h_prev: h_done, gates, c_prev: be.zeros(0)?, c: second },
            };
            if ctx.train {
                steps.push(cache);
            }
        }
        if ctx.train {
            self.cache = Some(RecurrentCache { x, steps });
        }
        Ok(y)
    }

    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let RecurrentCache { x, steps } = cached(&mut self.cache, &self.name)?;
        let [n, t, i] = x.shape[..] else {
            return shape_err("Recurrent::backward", format!("{}: cached input {:?}", self.name, x.shape));
        };
        if dy.shape != [n, t, self.hidden] {
            return shape_err("Recurrent::backward", format!("{}: dy {:?}", self.name, dy.shape));
        }
        let (h, gh) = (self.hidden, self.cell.gates() * self.hidden);
        let mut dxp = be.zeros(n * t * gh)?; // d(input projection), (N, T·G·H)
        let (mut dh_next, mut dc) = (be.zeros(n * h)?, be.zeros(n * h)?);
        for (step, cache) in steps.iter().enumerate().rev() {
            let mut dh = be.zeros(n * h)?; // dy at this step + what flows back from step+1
            be.copy_columns(&dy.buf, t * h, step * h, &mut dh, h, 0, h, n, false)?;
            be.axpy(1.0, &dh_next, &mut dh)?;
            let mut dhp = be.zeros(n * gh)?;
            let mut dh_direct = be.zeros(n * h)?;
            match self.cell {
                Cell::Lstm => {
                    be.lstm_backward(&cache.gates, &cache.c_prev, &cache.c, &dh, &mut dc, &mut dhp, h)?;
                    be.copy_columns(&dhp, gh, 0, &mut dxp, t * gh, step * gh, gh, n, false)?;
                }
                Cell::Gru => {
                    let mut dxp_t = be.zeros(n * gh)?;
                    be.gru_backward(
                        &cache.gates,
                        &cache.c,
                        &cache.h_prev,
                        &dh,
                        &mut dxp_t,
                        &mut dhp,
                        &mut dh_direct,
                        h,
                    )?;
                    be.copy_columns(&dxp_t, gh, 0, &mut dxp, t * gh, step * gh, gh, n, false)?;
                }
            }
            if self.weight_hh.trainable {
                // dW_hh (G·H, H) += dhpᵀ (G·H, N) · h_prev (N, H)
                be.matmul(&dhp, &cache.h_prev, &mut self.weight_hh.grad, Gemm::tn(gh, n, h).accumulate())?;
            }
            if self.bias_hh.trainable {
                be.sum_rows(&dhp, &mut self.bias_hh.grad, n, gh, true)?;
            }
            // dh_prev (N, H) = dhp (N, G·H) · W_hh (G·H, H) [+ z⊙dh for the GRU]
            be.matmul(
                &dhp,
                &self.weight_hh.value,
                &mut dh_direct,
                Gemm::nn(n, gh, h).accumulate_if(self.cell == Cell::Gru),
            )?;
            dh_next = dh_direct;
        }
        if self.weight_ih.trainable {
            // dW_ih (G·H, In) += dxpᵀ (G·H, N·T) · x (N·T, In)
            be.matmul(&dxp, &x.buf, &mut self.weight_ih.grad, Gemm::tn(gh, n * t, i).accumulate())?;
        }
        if self.bias_ih.trainable {
            be.sum_rows(&dxp, &mut self.bias_ih.grad, n * t, gh, true)?;
        }
        if !self.input_grad {
            return Tensor::zeros(be, &[0]);
        }
        let mut dx = Tensor::zeros(be, &x.shape)?; // (N·T, In) = dxp · W_ih
        be.matmul(&dxp, &self.weight_ih.value, &mut dx.buf, Gemm::nn(n * t, gh, i))?;
        Ok(dx)
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.input_grad = needed;
    }
    fn params(&self) -> Vec<&Param<B>> {
        vec![&self.weight_ih, &self.weight_hh, &self.bias_ih, &self.bias_hh]
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        vec![&mut self.weight_ih, &mut self.weight_hh, &mut self.bias_ih, &mut self.bias_hh]
    }
    /// Both projections (2·G·H·(In + H)) and the point-wise cell (~10 per gate value) per
    /// step, times the longest sequence.
    fn flops_per_example(&self) -> u64 {
        let (i, h, g) = (self.input as u64, self.hidden as u64, self.cell.gates() as u64);
        self.max_len as u64 * (2 * g * h * (i + h) + 10 * g * h)
    }
}

/// Gradient checks against finite differences, and known values (the checker is
/// `crate::gradcheck`).
#[cfg(test)]
mod gradient_tests {
    use crate::gradcheck::{check_layer, test_input as input};

    use crate::layers::{Cell, Recurrent};
    use crate::{ForwardCtx, Layer, Tensor};
    use lockstep_kernels::CpuBackend;

    fn recurrent(cell: Cell) -> Recurrent<CpuBackend> {
        let be = CpuBackend::new(1);
        let g = cell.gates();
        let w_ih: Vec<f32> = (0..g * 3 * 2).map(|i| ((i as f32) * 0.41).sin() * 0.7).collect();
        let w_hh: Vec<f32> = (0..g * 3 * 3).map(|i| ((i as f32) * 0.23).cos() * 0.6).collect();
        let mut r = Recurrent::new(&be, "rnn", cell, 2, 3, 4, &w_ih, &w_hh).unwrap();
        r.bias_hh.value = (0..g * 3).map(|i| (i as f32 * 0.7).sin() * 0.2).collect();
        r
    }

    #[test]
    fn lstm_and_gru_gradients_through_time() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        for cell in [Cell::Lstm, Cell::Gru] {
            // (N=2, T=4, In=2): dx, dW_ih, dW_hh and both biases through four steps of BPTT.
            check_layer(&be, &mut recurrent(cell), &[2, 4, 2], &input(16), &ctx);
        }
    }

    #[test]
    fn recurrent_outputs_are_causal_and_match_a_hand_step() {
        let be = CpuBackend::new(1);
        // One GRU step by hand: h = (1−z)·n with h_prev = 0.
        let mut gru = Recurrent::new(&be, "gru", Cell::Gru, 1, 1, 2, &[0.5, -0.3, 0.8], &[0.2, 0.1, -0.4]).unwrap();
        let y = gru
            .forward(&be, Tensor::from_slice(&be, &[1, 2, 1], &[1.0, -2.0]).unwrap(), &ForwardCtx::default())
            .unwrap();
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        let (r, z) = (sig(0.5), sig(-0.3));
        let n = (0.8 + r * 0.0f32).tanh();
        assert!((y.buf[0] - (1.0 - z) * n).abs() < 1e-6, "{} vs {}", y.buf[0], (1.0 - z) * n);
        for cell in [Cell::Lstm, Cell::Gru] {
            let mut rnn = recurrent(cell);
            let x = input(8);
            let y = rnn.forward(&be, Tensor::from_slice(&be, &[1, 4, 2], &x).unwrap(), &ForwardCtx::default()).unwrap();
            let mut later = x.clone();
            later[4..].iter_mut().for_each(|v| *v += 1.0); // change steps 2 and 3
            let y2 =
                rnn.forward(&be, Tensor::from_slice(&be, &[1, 4, 2], &later).unwrap(), &ForwardCtx::default()).unwrap();
            assert_eq!(y.buf[..6], y2.buf[..6], "{cell:?}: steps 0-1 saw the future");
            assert_ne!(y.buf[6..], y2.buf[6..]);
        }
    }
}
