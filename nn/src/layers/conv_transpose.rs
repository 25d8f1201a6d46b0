use super::{cached, ForwardCtx, Layer, Param};
use crate::{shape_err, Result, Tensor};
use lockstep_kernels::{Backend, Gemm, Window};

/// Transposed 2-D convolution on NHWC tensors (T8): the adjoint of a convolution, used to
/// upsample. Input (N, H, W, Cin), output (N, OH, OW, OC) with OH = (H−1)·stride − 2·pad + k.
///
/// `out_win` is the convolution that maps the *output* back to the input (its out_h() = H),
/// so forward is that convolution's backward-data pass and vice versa:
///   forward:  cols = x·W (N·H·W, K·K·OC), y = col2im(cols) + b
///   backward: dcols = im2col(dy), dW += xᵀ·dcols, dx = dcols·Wᵀ
/// The weight is (Cin, KH, KW, OC) in memory, PyTorch's (Cin, OC, KH, KW) in files.
pub struct ConvTranspose2d<B: Backend> {
    name: String,
    pub in_channels: usize,
    /// The output geometry: h, w, c = OH, OW, OC with the kernel, stride and padding.
    pub out_win: Window,
    pub weight: Param<B>, // (Cin, KH, KW, OC)
    pub bias: Param<B>,   // (OC)
    /// The input (N·H·W, Cin): backward needs it for dW.
    input_cache: Option<Tensor<B>>,
    input_grad: bool,
}

impl<B: Backend> ConvTranspose2d<B> {
    /// Input images (h, w, in_channels); `weight` has Cin·K·K·OC values.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        be: &B,
        name: &str,
        (h, w, in_channels): (usize, usize, usize),
        out_channels: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
        weight: &[f32],
    ) -> Result<Self> {
        let out_win = Window {
            h: (h - 1) * stride + kernel - 2 * pad,
            w: (w - 1) * stride + kernel - 2 * pad,
            c: out_channels,
            kh: kernel,
            kw: kernel,
            stride,
            pad,
        };
        Ok(Self {
            name: name.to_string(),
            in_channels,
            out_win,
            weight: Param {
                layout: super::FileLayout::ChannelsFirst,
                ..Param::new(be, format!("{name}.weight"), &[in_channels, kernel, kernel, out_channels], weight, true)?
            },
            bias: Param::new(be, format!("{name}.bias"), &[out_channels], &vec![0.0; out_channels], false)?,
            input_cache: None,
            input_grad: true,
        })
    }

    /// Output size of a transposed convolution, or None when it would be empty.
    pub fn output_size(size: usize, kernel: usize, stride: usize, pad: usize) -> Option<usize> {
        ((size.checked_sub(1)? * stride + kernel).checked_sub(2 * pad)).filter(|&s| s > 0)
    }

    fn taps(&self) -> usize {
        self.out_win.kh * self.out_win.kw * self.out_win.c
    }
}

impl<B: Backend> Layer<B> for ConvTranspose2d<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let ow = self.out_win;
        if x.shape.len() != 4 || x.shape[1..] != [ow.out_h(), ow.out_w(), self.in_channels] {
            return shape_err(
                "ConvTranspose2d::forward",
                format!(
                    "{}: input {:?}, expected [N, {}, {}, {}]",
                    self.name,
                    x.shape,
                    ow.out_h(),
                    ow.out_w(),
                    self.in_channels
                ),
            );
        }
        let n = x.shape[0];
        let rows = n * ow.out_h() * ow.out_w();
        let mut cols = be.zeros(rows * self.taps())?; // (N·H·W, KH·KW·OC) = x · W
        be.matmul(&x.buf, &self.weight.value, &mut cols, Gemm::nn(rows, self.in_channels, self.taps()))?;
        let mut y = Tensor::zeros(be, &[n, ow.h, ow.w, ow.c])?; // (N, OH, OW, OC)
        be.col2im(&cols, &ow, n, 0, ow.c, &mut y.buf)?;
        be.add_row_vector(&mut y.buf, &self.bias.value, n * ow.h * ow.w, ow.c)?;
        if ctx.train {
            self.input_cache = Some(x);
        }
        Ok(y)
    }

    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let x = cached(&mut self.input_cache, &self.name)?;
        let ow = self.out_win;
        let n = x.shape[0];
        if dy.shape != [n, ow.h, ow.w, ow.c] {
            return shape_err("ConvTranspose2d::backward", format!("{}: dy {:?}", self.name, dy.shape));
        }
        let rows = n * ow.out_h() * ow.out_w();
        if self.bias.trainable {
            be.sum_rows(&dy.buf, &mut self.bias.grad, n * ow.h * ow.w, ow.c, true)?;
        }
        let mut dcols = be.zeros(rows * self.taps())?; // (N·H·W, KH·KW·OC)
        be.im2col(&dy.buf, &ow, n, 0, ow.c, &mut dcols)?;
        let taps = self.taps();
        if self.weight.trainable {
            // dW (Cin, KH·KW·OC) += xᵀ (Cin, N·H·W) · dcols
            be.matmul(&x.buf, &dcols, &mut self.weight.grad, Gemm::tn(self.in_channels, rows, taps).accumulate())?;
        }
        if !self.input_grad {
            return Tensor::zeros(be, &[0]);
        }
        let mut dx = Tensor::zeros(be, &x.shape)?; // (N·H·W, Cin) = dcols · Wᵀ
        be.matmul(&dcols, &self.weight.value, &mut dx.buf, Gemm::nt(rows, taps, self.in_channels))?;
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
    /// The GEMM (2·Cin·taps per input pixel) plus the bias over the output.
    fn flops_per_example(&self) -> u64 {
        let ow = self.out_win;
        let pixels = (ow.out_h() * ow.out_w()) as u64;
        pixels * 2 * (self.in_channels * self.taps()) as u64 + (ow.h * ow.w * ow.c) as u64
    }
}

/// Gradient checks against finite differences, and known values (the checker is
/// `crate::gradcheck`).
#[cfg(test)]
mod gradient_tests {
    use crate::gradcheck::{check_layer, test_input as input};
    use crate::layers::Conv2d;
    use crate::layers::ConvTranspose2d;
    use crate::{ForwardCtx, Layer, Tensor};
    use lockstep_kernels::CpuBackend;

    #[test]
    fn transposed_conv_gradients_and_adjointness() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        // (N=2, 3x3, Cin=2) -> stride 2, kernel 3, pad 1: (2, 5x5, OC=3).
        let w: Vec<f32> = (0..2 * 3 * 3 * 3).map(|i| ((i as f32) * 0.31).sin() * 0.5).collect();
        let mut up = ConvTranspose2d::new(&be, "up", (3, 3, 2), 3, 3, 2, 1, &w).unwrap();
        assert_eq!((up.out_win.h, up.out_win.w), (5, 5));
        assert_eq!(ConvTranspose2d::<CpuBackend>::output_size(3, 3, 2, 1), Some(5));
        check_layer(&be, &mut up, &[2, 3, 3, 2], &input(36), &ctx);
        // A transposed conv is the adjoint of the conv with the same weights:
        // <convT(x), y> = <x, conv(y)> for the bias-free layers.
        let conv_w: Vec<f32> = {
            // conv weight (OC=2, KH, KW, Cg=3) from the transposed one (Cin=2, KH, KW, OC=3)
            w.clone()
        };
        let mut conv = Conv2d::new(&be, "down", up.out_win, 2, 1, &conv_w).unwrap();
        let x = input(18); // (1, 3, 3, 2)
        let y: Vec<f32> = (0..75).map(|i| ((i as f32) * 0.77).cos()).collect(); // (1, 5, 5, 3)
        let t = up.forward(&be, Tensor::from_slice(&be, &[1, 3, 3, 2], &x).unwrap(), &ForwardCtx::default()).unwrap();
        let c = conv.forward(&be, Tensor::from_slice(&be, &[1, 5, 5, 3], &y).unwrap(), &ForwardCtx::default()).unwrap();
        let lhs: f64 = t.buf.iter().zip(&y).map(|(a, b)| (a * b) as f64).sum();
        let rhs: f64 = x.iter().zip(&c.buf).map(|(a, b)| (a * b) as f64).sum();
        assert!((lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
    }
}
