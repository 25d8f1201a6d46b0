use super::{ForwardCtx, Layer, Param};
use crate::{shape_err, Result, Tensor};
use lockstep_kernels::{Backend, Window};

/// 1-D convolution over sequences (N, L, C) (T6): a `Conv2d` on (N, 1, L', C) images,
/// where the sequence is zero-padded to L' = L + 2·pad first (a 2-D window pads both
/// axes, and a height-1 image must not be padded). The weight is (OC, 1, K, C/groups) in memory,
/// PyTorch's (OC, C/groups, K) in files.
pub struct Conv1d<B: Backend> {
    pub length: usize,
    pub channels: usize,
    pub pad: usize,
    pub conv: super::Conv2d<B>,
}

impl<B: Backend> Conv1d<B> {
    /// Sequences of `length` steps with `channels` channels.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        be: &B,
        name: &str,
        (length, channels): (usize, usize),
        out_channels: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
        groups: usize,
        weight: &[f32],
    ) -> Result<Self> {
        let win = Window { h: 1, w: length + 2 * pad, c: channels, kh: 1, kw: kernel, stride, pad: 0 };
        let mut conv = super::Conv2d::new(be, name, win, out_channels, groups, weight)?;
        conv.weight.layout = super::FileLayout::ChannelsFirst1d;
        Ok(Self { length, channels, pad, conv })
    }

    pub fn out_length(&self) -> usize {
        self.conv.win.out_w()
    }
}

impl<B: Backend> Layer<B> for Conv1d<B> {
    fn name(&self) -> &str {
        self.conv.name()
    }

    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        if x.shape.len() != 3 || x.shape[1..] != [self.length, self.channels] {
            return shape_err(
                "Conv1d::forward",
                format!("{}: input {:?}, expected [N, {}, {}]", self.name(), x.shape, self.length, self.channels),
            );
        }
        let n = x.shape[0];
        let (row, padded_row) = (self.length * self.channels, self.conv.win.w * self.channels);
        let mut padded = Tensor::zeros(be, &[n, 1, self.conv.win.w, self.channels])?;
        be.copy_columns(&x.buf, row, 0, &mut padded.buf, padded_row, self.pad * self.channels, row, n, false)?;
        let y = self.conv.forward(be, padded, ctx)?; // (N, 1, L_out, OC)
        let shape = vec![n, self.out_length(), self.conv.out_channels];
        Ok(Tensor { shape, buf: y.buf })
    }

    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let n = dy.shape.first().copied().unwrap_or(0);
        let shape = vec![n, 1, self.out_length(), self.conv.out_channels];
        let d_padded = self.conv.backward(be, Tensor { shape, buf: dy.buf })?;
        if d_padded.numel() == 0 {
            return Ok(d_padded); // the first layer: no input gradient
        }
        let (row, padded_row) = (self.length * self.channels, self.conv.win.w * self.channels);
        let mut dx = Tensor::zeros(be, &[n, self.length, self.channels])?;
        be.copy_columns(&d_padded.buf, padded_row, self.pad * self.channels, &mut dx.buf, row, 0, row, n, false)?;
        Ok(dx)
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.conv.set_input_grad(needed);
    }
    fn params(&self) -> Vec<&Param<B>> {
        self.conv.params()
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        self.conv.params_mut()
    }
    fn flops_per_example(&self) -> u64 {
        self.conv.flops_per_example()
    }
}

/// Gradient checks against finite differences, and known values (the checker is
/// `crate::gradcheck`).
#[cfg(test)]
mod gradient_tests {
    use crate::gradcheck::{check_layer, test_input as input};

    use crate::layers::Conv1d;
    use crate::{ForwardCtx, Layer, Tensor};
    use lockstep_kernels::CpuBackend;

    #[test]
    fn conv1d_gradients_and_known_values() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        // (N=2, L=5, C=2) -> kernel 3, stride 2, pad 1, 2 groups: (2, 3, 4).
        let w: Vec<f32> = (0..4 * 3).map(|i| ((i as f32) * 0.43).sin() * 0.5).collect();
        let mut conv = Conv1d::new(&be, "c1", (5, 2), 4, 3, 2, 1, 2, &w).unwrap();
        assert_eq!(conv.out_length(), 3);
        check_layer(&be, &mut conv, &[2, 5, 2], &input(20), &ctx);
        // A moving sum: kernel [1, 1, 1], pad 1 over [1, 2, 3, 4] gives [3, 6, 9, 7].
        let mut sum = Conv1d::new(&be, "sum", (4, 1), 1, 3, 1, 1, 1, &[1.0, 1.0, 1.0]).unwrap();
        let y = sum
            .forward(&be, Tensor::from_slice(&be, &[1, 4, 1], &[1., 2., 3., 4.]).unwrap(), &ForwardCtx::default())
            .unwrap();
        assert_eq!(y.shape, vec![1, 4, 1]);
        assert_eq!(y.buf, vec![3., 6., 9., 7.]);
    }
}
