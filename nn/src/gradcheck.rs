//! Central finite-difference checks (T1). The scalar is L = Σ r ⊙ y for a fixed
//! pseudo-random r (or the loss itself), summed in f64 on the host. Each entry must satisfy
//! |analytic − numeric| / max(|analytic|, |numeric|, 2e-2) < 1e-3. The numeric derivative
//! uses the 5-point stencil (8(L(x+h) − L(x−h)) − (L(x+2h) − L(x−2h)))/12h, whose O(h⁴)
//! truncation lets h = 1e-2 stay large enough for f32 rounding to be negligible.

use crate::{ForwardCtx, Layer, Result, Tensor};
use lockstep_kernels::Backend;

pub const F32_REL_TOL: f64 = 1e-3;
pub const H: f32 = 1e-2;

/// Relative error with a floor on the denominator: the forward runs in f32, so the
/// numeric estimate itself carries an absolute noise of about ε_f32·|L|/h ≈ 1e-5; gradients
/// smaller than 2e-2 are therefore held to an absolute 2e-5 instead of a relative 1e-3.
fn rel_err(a: f64, n: f64) -> f64 {
    (a - n).abs() / a.abs().max(n.abs()).max(2e-2)
}

/// The 5-point central difference of `f` at offset 0 with step `h`.
fn five_point(h: f32, mut f: impl FnMut(f32) -> f64) -> f64 {
    (8.0 * (f(h) - f(-h)) - (f(2.0 * h) - f(-2.0 * h))) / (12.0 * h as f64)
}

fn projection(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i as f32 * 0.618 + 0.1).fract() - 0.5) * 2.0).collect()
}

fn project(y: &[f32], r: &[f32]) -> f64 {
    y.iter().zip(r).map(|(&y, &r)| y as f64 * r as f64).sum()
}

/// Checks a scalar function's input gradient: `f` returns (L, dL/dx).
pub fn check_input_gradient<B: Backend>(
    be: &B,
    shape: &[usize],
    x: &[f32],
    f: impl Fn(&B, &Tensor<B>) -> Result<(f64, Tensor<B>)>,
) {
    let input = Tensor::from_slice(be, shape, x).unwrap();
    let (_, grad) = f(be, &input).expect("forward");
    let grad = grad.to_vec(be).unwrap();
    for i in 0..x.len() {
        let numeric = five_point(H, |d| {
            let mut xd = x.to_vec();
            xd[i] += d;
            f(be, &Tensor::from_slice(be, shape, &xd).unwrap()).expect("forward").0
        });
        let e = rel_err(grad[i] as f64, numeric);
        assert!(e < F32_REL_TOL, "dL/dx[{i}]: analytic {} numeric {numeric} rel err {e:.2e}", grad[i]);
    }
}

/// Checks a layer's dL/dx and every parameter gradient against central differences.
pub fn check_layer<B: Backend>(be: &B, layer: &mut dyn Layer<B>, shape: &[usize], x: &[f32], ctx: &ForwardCtx) {
    check_layer_step(be, layer, shape, x, ctx, true, H);
}

/// As `check_layer`, with step `h`; `check_input = false` checks parameter gradients only
/// (for inputs that are not differentiable, such as token ids). Deep stacks of smooth
/// layers (no kinks within ±2h) use a larger h: the f32 rounding noise of the numeric
/// estimate falls as 1/h.
pub fn check_layer_step<B: Backend>(
    be: &B,
    layer: &mut dyn Layer<B>,
    shape: &[usize],
    x: &[f32],
    ctx: &ForwardCtx,
    check_input: bool,
    h: f32,
) {
    let input = Tensor::from_slice(be, shape, x).unwrap();
    let y = layer.forward(be, input, ctx).expect("forward");
    let r = projection(y.numel());
    for p in layer.params_mut() {
        be.fill(&mut p.grad, 0.0).unwrap();
    }
    let dx = layer.backward(be, Tensor::from_slice(be, &y.shape, &r).unwrap()).expect("backward").to_vec(be).unwrap();
    let eval = |layer: &mut dyn Layer<B>, x: &[f32]| -> f64 {
        let y = layer.forward(be, Tensor::from_slice(be, shape, x).unwrap(), ctx).expect("forward");
        project(&y.to_vec(be).unwrap(), &r)
    };
    for i in (0..x.len()).filter(|_| check_input) {
        let numeric = five_point(h, |d| {
            let mut xd = x.to_vec();
            xd[i] += d;
            eval(layer, &xd)
        });
        let e = rel_err(dx[i] as f64, numeric);
        assert!(e < F32_REL_TOL, "{}: dL/dx[{i}] analytic {} numeric {numeric} rel err {e:.2e}", layer.name(), dx[i]);
    }
    let n_params = layer.params().len();
    for pi in 0..n_params {
        let (name, analytic, value, trainable) = {
            let p = &layer.params()[pi];
            (p.name.clone(), be.download(&p.grad).unwrap(), be.download(&p.value).unwrap(), p.trainable)
        };
        if !trainable {
            assert!(analytic.iter().all(|&g| g == 0.0), "{name} is frozen but got a gradient");
            continue;
        }
        for i in 0..value.len() {
            let numeric = five_point(h, |d| {
                let mut v = value.clone();
                v[i] += d;
                layer.params_mut()[pi].value = be.upload(&v).unwrap();
                eval(layer, x)
            });
            layer.params_mut()[pi].value = be.upload(&value).unwrap();
            let e = rel_err(analytic[i] as f64, numeric);
            assert!(e < F32_REL_TOL, "{name}[{i}]: analytic {} numeric {numeric} rel err {e:.2e}", analytic[i]);
        }
    }
}

/// Test inputs kept at least 0.05 away from 0 so ReLU-family kinks are never straddled by ±h.
pub fn test_input(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = ((i * 7919 % 101) as f32 / 101.0 - 0.5) * 3.0;
            if v.abs() < 0.05 {
                v + 0.1
            } else {
                v
            }
        })
        .collect()
}
