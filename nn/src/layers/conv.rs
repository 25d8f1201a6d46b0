use super::{cached, ForwardCtx, Layer, Param};
use crate::{shape_err, Result, Tensor};
use lockstep_kernels::{Backend, Gemm, Window};

/// 2-D convolution on NHWC tensors (T6): stride, zero padding, groups. The weight is (OC, KH, KW, C/groups) in
/// memory, PyTorch's (OC, C/groups, KH, KW) in files; each group is one GEMM over im2col rows, so a whole batch is a
/// single (N·OH·OW, KH·KW·Cg) × (KH·KW·Cg, OC/groups) product.
pub struct Conv2d<B: Backend> {
    name: String,
    pub win: Window,
    pub out_channels: usize,
    pub groups: usize,
    pub weight: Param<B>, // (OC, KH, KW, Cg)
    pub bias: Param<B>,   // (OC)
    /// im2col rows of each group, (N·OH·OW, KH·KW·Cg): backward needs them for dW.
    cols_cache: Option<(usize, Vec<B::Buf>)>,
    input_grad: bool,
}

impl<B: Backend> Conv2d<B> {
    /// `win` describes the input image (h, w, c) and the kernel; `weight` has
    /// OC·KH·KW·(C/groups) values.
    pub fn new(be: &B, name: &str, win: Window, out_channels: usize, groups: usize, weight: &[f32]) -> Result<Self> {
        let cg = win.c / groups;
        Ok(Self {
            name: name.to_string(),
            win,
            out_channels,
            groups,
            weight: Param {
                layout: super::FileLayout::ChannelsFirst,
                ..Param::new(be, format!("{name}.weight"), &[out_channels, win.kh, win.kw, cg], weight, true)?
            },
            bias: Param::new(be, format!("{name}.bias"), &[out_channels], &vec![0.0; out_channels], false)?,
            cols_cache: None,
            input_grad: true,
        })
    }

    pub fn output_shape(&self, n: usize) -> [usize; 4] {
        [n, self.win.out_h(), self.win.out_w(), self.out_channels]
    }

    fn dims(&self) -> (usize, usize, usize) {
        let cg = self.win.c / self.groups;
        (cg, self.win.kh * self.win.kw * cg, self.out_channels / self.groups)
    }
}

impl<B: Backend> Layer<B> for Conv2d<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let w = &self.win;
        let n = super::image_batch("Conv2d::forward", &self.name, &x, w)?;
        let (cg, kk, ocg) = self.dims();
        let m = n * w.out_h() * w.out_w();
        let oc = self.out_channels;
        let mut y = Tensor::zeros(be, &self.output_shape(n))?; // (N, OH, OW, OC)
        let mut all_cols = Vec::with_capacity(self.groups);
        for g in 0..self.groups {
            let mut cols = be.zeros(m * kk)?; // (N·OH·OW, KH·KW·Cg)
            be.im2col(&x.buf, w, n, g * cg, cg, &mut cols)?;
            if self.groups == 1 {
                be.matmul(&cols, &self.weight.value, &mut y.buf, Gemm::nt(m, kk, oc))?;
            } else {
                let mut w_g = be.zeros(ocg * kk)?;
                be.copy_range(&self.weight.value, g * ocg * kk, &mut w_g, 0, ocg * kk)?;
                let mut y_g = be.zeros(m * ocg)?;
                be.matmul(&cols, &w_g, &mut y_g, Gemm::nt(m, kk, ocg))?;
                be.copy_columns(&y_g, ocg, 0, &mut y.buf, oc, g * ocg, ocg, m, false)?;
            }
            all_cols.push(cols);
        }
        be.add_row_vector(&mut y.buf, &self.bias.value, m, oc)?;
        if ctx.train {
            self.cols_cache = Some((n, all_cols));
        }
        Ok(y)
    }

    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let (n, all_cols) = cached(&mut self.cols_cache, &self.name)?;
        let w = self.win;
        let (cg, kk, ocg) = self.dims();
        let m = n * w.out_h() * w.out_w();
        let oc = self.out_channels;
        if dy.numel() != m * oc {
            return shape_err("Conv2d::backward", format!("{}: dy {:?}", self.name, dy.shape));
        }
        if self.bias.trainable {
            be.sum_rows(&dy.buf, &mut self.bias.grad, m, oc, true)?;
        }
        let dx_shape = if self.input_grad { vec![n, w.h, w.w, w.c] } else { vec![0] };
        let mut dx = Tensor::zeros(be, &dx_shape)?;
        for (g, cols) in all_cols.iter().enumerate() {
            // This group's slice of dy (N·OH·OW, OC/groups) and of W (OC/groups, KH·KW·Cg).
            let range = g * ocg * kk;
            let dy_g = if self.groups == 1 {
                None
            } else {
                let mut dy_g = be.zeros(m * ocg)?;
                be.copy_columns(&dy.buf, oc, g * ocg, &mut dy_g, ocg, 0, ocg, m, false)?;
                Some(dy_g)
            };
            let dy_g = dy_g.as_ref().unwrap_or(&dy.buf);
            if self.weight.trainable {
                // dW_g += dy_gᵀ · cols
                if self.groups == 1 {
                    be.matmul(dy_g, cols, &mut self.weight.grad, Gemm::tn(oc, m, kk).accumulate())?;
                } else {
                    let mut dw_g = be.zeros(ocg * kk)?;
                    be.copy_range(&self.weight.grad, range, &mut dw_g, 0, ocg * kk)?;
                    be.matmul(dy_g, cols, &mut dw_g, Gemm::tn(ocg, m, kk).accumulate())?;
                    be.copy_range(&dw_g, 0, &mut self.weight.grad, range, ocg * kk)?;
                }
            }
            if !self.input_grad {
                continue;
            }
            // dcols = dy_g · W_g, scattered back onto the input channels of the group.
            let mut dcols = be.zeros(m * kk)?;
            if self.groups == 1 {
                be.matmul(dy_g, &self.weight.value, &mut dcols, Gemm::nn(m, oc, kk))?;
            } else {
                let mut w_g = be.zeros(ocg * kk)?;
                be.copy_range(&self.weight.value, range, &mut w_g, 0, ocg * kk)?;
                be.matmul(dy_g, &w_g, &mut dcols, Gemm::nn(m, ocg, kk))?;
            }
            be.col2im(&dcols, &w, n, g * cg, cg, &mut dx.buf)?;
        }
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
        let (_, kk, _) = self.dims();
        let outputs = (self.win.out_h() * self.win.out_w() * self.out_channels) as u64;
        outputs * (kk as u64 + kk as u64 - 1) + outputs
    }
}

/// Gradient checks against finite differences, and known values (the checker is
/// `crate::gradcheck`).
#[cfg(test)]
mod gradient_tests {
    use crate::gradcheck::{check_layer, test_input as input};
    use crate::layers::Conv2d;

    use crate::{ForwardCtx, Layer, Tensor};
    use lockstep_kernels::{CpuBackend, Window};

    #[test]
    fn conv2d_gradients_stride_padding_groups() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        for (stride, pad, groups, oc) in [(1, 0, 1, 3), (2, 1, 1, 2), (1, 1, 2, 4)] {
            let win = Window { h: 5, w: 4, c: 2, kh: 3, kw: 2, stride, pad };
            let n_w = oc * 3 * 2 * (2 / groups);
            let w: Vec<f32> = (0..n_w).map(|i| ((i as f32) * 0.71).sin() * 0.5).collect();
            let mut conv = Conv2d::new(&be, "conv", win, oc, groups, &w).unwrap();
            conv.bias.value = (0..oc).map(|i| i as f32 * 0.1).collect();
            check_layer(&be, &mut conv, &[2, 5, 4, 2], &input(2 * 5 * 4 * 2), &ctx);
        }
    }

    #[test]
    fn conv2d_matches_a_direct_convolution() {
        // 1 image 4x4x1, 3x3 kernel of ones, pad 1: each output is the sum of its neighbourhood.
        let be = CpuBackend::new(1);
        let win = Window { h: 4, w: 4, c: 1, kh: 3, kw: 3, stride: 1, pad: 1 };
        let mut conv = Conv2d::new(&be, "conv", win, 1, 1, &[1.0; 9]).unwrap();
        let x: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let y = conv.forward(&be, Tensor::from_slice(&be, &[1, 4, 4, 1], &x).unwrap(), &ForwardCtx::default()).unwrap();
        assert_eq!(y.shape, vec![1, 4, 4, 1]);
        assert_eq!(y.buf[0], 0. + 1. + 4. + 5.);
        assert_eq!(y.buf[5], (0..3).flat_map(|r| (0..3).map(move |c| (r * 4 + c) as f32)).sum::<f32>());
    }
}
