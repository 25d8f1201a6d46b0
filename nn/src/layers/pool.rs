use super::{cached, ForwardCtx, Layer};
use crate::{Result, Tensor};
use lockstep_kernels::{Backend, Window};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    Average,
}

/// Max or average pooling on NHWC tensors (T7). Max backward routes each output's
/// gradient to the input element that won; average spreads it over the window.
pub struct Pool2d<B: Backend> {
    name: String,
    pub kind: PoolKind,
    pub win: Window,
    /// Batch size and, for max pooling, the winning input index of each output (u32 bits).
    argmax_cache: Option<(usize, Option<B::Buf>)>,
}

impl<B: Backend> Pool2d<B> {
    pub fn new(name: &str, kind: PoolKind, win: Window) -> Self {
        Self { name: name.to_string(), kind, win, argmax_cache: None }
    }
    pub fn output_shape(&self, n: usize) -> [usize; 4] {
        [n, self.win.out_h(), self.win.out_w(), self.win.c]
    }
}

impl<B: Backend> Layer<B> for Pool2d<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let w = &self.win;
        let n = super::image_batch("Pool2d::forward", &self.name, &x, w)?;
        let mut y = Tensor::zeros(be, &self.output_shape(n))?;
        let argmax = match self.kind {
            PoolKind::Max => {
                let mut argmax = be.zeros(y.numel())?;
                be.max_pool_forward(&x.buf, w, n, &mut y.buf, &mut argmax)?;
                Some(argmax)
            }
            PoolKind::Average => {
                be.avg_pool_forward(&x.buf, w, n, &mut y.buf)?;
                None
            }
        };
        if ctx.train {
            self.argmax_cache = Some((n, argmax));
        }
        Ok(y)
    }

    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let (n, argmax) = cached(&mut self.argmax_cache, &self.name)?;
        let w = self.win;
        let mut dx = Tensor::zeros(be, &[n, w.h, w.w, w.c])?;
        match argmax {
            Some(argmax) => be.max_pool_backward(&dy.buf, &argmax, &mut dx.buf)?,
            None => be.avg_pool_backward(&dy.buf, &w, n, &mut dx.buf)?,
        }
        Ok(dx)
    }

    fn flops_per_example(&self) -> u64 {
        (self.win.out_h() * self.win.out_w() * self.win.c * self.win.kh * self.win.kw) as u64
    }
}

/// (N, d1, d2, ...) -> (N, d1·d2·...). NHWC data is already contiguous per example, so
/// only the shape changes.
/// Flattens each example to [F], or (`reshape`) gives it another shape of as many values:
/// the values stay where they are, only the shape changes.
pub struct Flatten {
    name: String,
    /// The per-example shape of the output; empty: flat.
    example_shape: Vec<usize>,
    input_shape_cache: Option<Vec<usize>>,
}

impl Flatten {
    pub fn new(name: &str) -> Self {
        Self { name: name.to_string(), example_shape: Vec::new(), input_shape_cache: None }
    }

    /// Each example to `example_shape` (e.g. [F] to [H, W, C]).
    pub fn reshape(name: &str, example_shape: &[usize]) -> Self {
        Self { example_shape: example_shape.to_vec(), ..Self::new(name) }
    }
}

impl<B: Backend> Layer<B> for Flatten {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward(&mut self, _be: &B, mut x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let n = *x.shape.first().unwrap_or(&0);
        let features = x.numel().checked_div(n).unwrap_or(0);
        if !self.example_shape.is_empty() && self.example_shape.iter().product::<usize>() != features {
            let detail = format!("{}: {:?} to {:?} per example", self.name, x.shape, self.example_shape);
            return Err(crate::NnError::Shape { op: "reshape", detail });
        }
        if ctx.train {
            self.input_shape_cache = Some(x.shape.clone());
        }
        x.shape = match self.example_shape.is_empty() {
            true => vec![n, features],
            false => [&[n][..], &self.example_shape].concat(),
        };
        Ok(x)
    }
    fn backward(&mut self, _be: &B, mut dy: Tensor<B>) -> Result<Tensor<B>> {
        dy.shape = cached(&mut self.input_shape_cache, &self.name)?;
        Ok(dy)
    }
}

/// Gradient checks against finite differences, and known values (the checker is
/// `crate::gradcheck`).
#[cfg(test)]
mod gradient_tests {
    use crate::gradcheck::{check_layer, test_input as input};
    use crate::layers::{Flatten, Pool2d, PoolKind};

    use crate::ForwardCtx;
    use lockstep_kernels::{CpuBackend, Window};

    #[test]
    fn pooling_and_flatten_gradients() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        let win = Window { h: 4, w: 4, c: 3, kh: 2, kw: 2, stride: 2, pad: 0 };
        check_layer(&be, &mut Pool2d::new("max", PoolKind::Max, win), &[2, 4, 4, 3], &input(96), &ctx);
        check_layer(&be, &mut Pool2d::new("avg", PoolKind::Average, win), &[2, 4, 4, 3], &input(96), &ctx);
        let overlapping = Window { kh: 3, kw: 3, stride: 1, pad: 1, ..win };
        check_layer(&be, &mut Pool2d::new("avg", PoolKind::Average, overlapping), &[2, 4, 4, 3], &input(96), &ctx);
        check_layer(&be, &mut Flatten::new("flat"), &[2, 2, 2, 3], &input(24), &ctx);
        check_layer(&be, &mut Flatten::reshape("reshape", &[2, 2, 3]), &[2, 12], &input(24), &ctx);
    }
}
