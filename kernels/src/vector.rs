//! Element-wise kernels of the CPU backend, each one body compiled per ISA
//! ([`multiversion!`](crate::multiversion)) and called per chunk from the backend's rayon
//! loops. The bits are the same on every ISA (see [`crate::isa`]); the tests check it.

use crate::fast_math::{exp, tanh};
use crate::multiversion;

const GELU_C: f32 = 0.797_884_6; // sqrt(2/pi)

/// GELU, tanh approximation: 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(GELU_C * (x + 0.044715 * x * x * x)))
}

#[inline(always)]
pub fn gelu_derivative(x: f32) -> f32 {
    let t = tanh(GELU_C * (x + 0.044715 * x * x * x));
    let du = GELU_C * (1.0 + 3.0 * 0.044715 * x * x);
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
}

multiversion! {
    /// y = SiLU/Swish(x) = x·sigmoid(beta·x).
    pub fn swish_forward / swish_forward_on(x: &[f32], y: &mut [f32], beta: f32) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x / (1.0 + exp(-beta * x));
        }
    }
}

multiversion! {
    /// dx = Swish'(x)·dy (or dx += it with `accumulate`); returns d(loss)/d(beta) =
    /// Σ x²·s(1 − s)·dy, summed in 8 f64 lanes (a fixed order on every ISA).
    pub fn swish_backward / swish_backward_on(x: &[f32], dy: &[f32], dx: &mut [f32], beta: f32, accumulate: bool) -> f64 {
        // One element's (dx, dbeta) terms.
        let terms = |x: f32, dy: f32| {
            let s = 1.0 / (1.0 + exp(-beta * x));
            let ds = s * (1.0 - s);
            ((s + beta * x * ds) * dy, x * x * ds * dy)
        };
        let mut lanes = [0.0f64; 8];
        let (dx8, x8, dy8) = (dx.chunks_exact_mut(8), x.chunks_exact(8), dy.chunks_exact(8));
        let mut tail = 0.0f64;
        for ((dx, &x), &dy) in dx8.into_remainder().iter_mut().zip(x8.remainder()).zip(dy8.remainder()) {
            let (d, db) = terms(x, dy);
            *dx = if accumulate { *dx + d } else { d };
            tail += db as f64;
        }
        let n8 = x.len() / 8 * 8;
        for ((dx, x), dy) in dx[..n8].chunks_exact_mut(8).zip(x.chunks_exact(8)).zip(dy.chunks_exact(8)) {
            for k in 0..8 {
                let (d, db) = terms(x[k], dy[k]);
                dx[k] = if accumulate { dx[k] + d } else { d };
                lanes[k] += db as f64;
            }
        }
        lanes.iter().sum::<f64>() + tail
    }
}

multiversion! {
    /// y = GELU(x).
    pub fn gelu_forward / gelu_forward_on(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = gelu(x);
        }
    }
}

multiversion! {
    /// dx = GELU'(x)·dy, or dx += it with `accumulate`.
    pub fn gelu_backward / gelu_backward_on(x: &[f32], dy: &[f32], dx: &mut [f32], accumulate: bool) {
        if accumulate {
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                *dx += gelu_derivative(x) * dy;
            }
        } else {
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                *dx = gelu_derivative(x) * dy;
            }
        }
    }
}

/// Adam's per-step constants (PyTorch's form, `CpuBackend::optimizer_step`).
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// lr / (1 − β1ᵗ)
    pub step_size: f32,
    /// 1 / sqrt(1 − β2ᵗ)
    pub inv_sqrt_bc2: f32,
    /// lr·wd of AdamW's decoupled decay.
    pub decay: f32,
    /// Multiplies every gradient first (1 / loss scale, 1 / global count).
    pub grad_scale: f32,
}

multiversion! {
    /// One Adam(W) update of w with its moments m and v, in one pass.
    pub fn adam_update / adam_update_on(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: AdamStep) {
        for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = k.grad_scale * g;
            *m = k.beta1 * *m + (1.0 - k.beta1) * g;
            *v = k.beta2 * *v + (1.0 - k.beta2) * g * g;
            *w -= k.step_size * *m / (v.sqrt() * k.inv_sqrt_bc2 + k.eps) + k.decay * *w;
        }
    }
}

/// Lanes of the reductions below: a fixed order, the same on every ISA.
const LANES: usize = 8;

/// Max of x in `LANES` lanes.
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for k in 0..LANES {
            lanes[k] = lanes[k].max(c[k]);
        }
    }
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

/// Σ x in `LANES` lanes.
#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for k in 0..LANES {
            lanes[k] += c[k];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Σ x·y in `LANES` lanes.
#[inline(always)]
fn dot_lanes(x: &[f32], y: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let (xc, yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let tail: f32 = xc.remainder().iter().zip(yc.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in xc.zip(yc) {
        for k in 0..LANES {
            lanes[k] += a[k] * b[k];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

multiversion! {
    /// Σ x² in f64, in 32 lanes (four AVX-512 or eight AVX2 accumulators, so the adds do
    /// not wait on each other) summed in a fixed order: the same bits on every ISA.
    pub fn sum_squares / sum_squares_on(x: &[f32]) -> f64 {
        const WIDE: usize = 32;
        let mut lanes = [0.0f64; WIDE];
        let chunks = x.chunks_exact(WIDE);
        let tail: f64 = chunks.remainder().iter().map(|&v| v as f64 * v as f64).sum();
        for c in chunks {
            for k in 0..WIDE {
                lanes[k] += c[k] as f64 * c[k] as f64;
            }
        }
        lanes.iter().sum::<f64>() + tail
    }
}

multiversion! {
    /// Softmax of row[..visible] in place (scaled logits in, probabilities out); the rest
    /// of the row becomes exactly 0 (masked keys).
    pub fn softmax_row / softmax_row_on(row: &mut [f32], visible: usize) {
        let (seen, masked) = row.split_at_mut(visible);
        masked.fill(0.0);
        let max = max_lanes(seen);
        for v in seen.iter_mut() {
            *v = exp(*v - max);
        }
        let inv = 1.0 / sum_lanes(seen);
        seen.iter_mut().for_each(|v| *v *= inv);
    }
}

multiversion! {
    /// Softmax backward of one row in place, scaled: dp[j] ← scale·p_j (dp_j − Σ_k p_k dp_k)
    /// over the visible keys; the rest becomes 0.
    pub fn softmax_backward_row / softmax_backward_row_on(p: &[f32], dp: &mut [f32], visible: usize, scale: f32) {
        let (seen, masked) = dp.split_at_mut(visible);
        masked.fill(0.0);
        let weighted = dot_lanes(&p[..visible], seen);
        for (d, &p) in seen.iter_mut().zip(p) {
            *d = p * (*d - weighted) * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::same_bits;

    fn wave(n: usize, salt: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + salt).sin() * 6.0).collect()
    }

    #[test]
    fn gelu_matches_its_definition_and_is_the_same_on_every_isa() {
        let x = wave(1003, 0.1);
        let mut y = vec![0.0; x.len()];
        gelu_forward(&x, &mut y);
        for (&x, &y) in x.iter().zip(&y) {
            let want = 0.5 * x as f64 * (1.0 + (0.797_884_560_8 * (x as f64 + 0.044715 * (x as f64).powi(3))).tanh());
            assert!((y as f64 - want).abs() < 1e-6 * (1.0 + want.abs()), "gelu({x}) = {y}, want {want}");
        }
        same_bits("gelu forward", |isa| {
            let mut y = vec![0.0; x.len()];
            gelu_forward_on(isa, &x, &mut y);
            y
        });
        let dy = wave(1003, 2.0);
        same_bits("gelu backward", |isa| {
            let mut dx = vec![0.5; x.len()];
            gelu_backward_on(isa, &x, &dy, &mut dx, true);
            dx
        });
    }

    /// SiLU against f64 and its derivatives against central differences, on every ISA.
    #[test]
    fn swish_matches_f64_and_is_the_same_on_every_isa() {
        let (x, dy, beta) = (wave(1003, 0.3), wave(1003, 2.0), 1.7f32);
        let mut y = vec![0.0; x.len()];
        swish_forward(&x, &mut y, beta);
        let f = |x: f64, b: f64| x / (1.0 + (-b * x).exp());
        for (&x, &y) in x.iter().zip(&y) {
            let want = f(x as f64, beta as f64);
            assert!((y as f64 - want).abs() < 1e-6 * (1.0 + want.abs()), "swish({x}) = {y}, want {want}");
        }
        let mut dx = vec![0.0; x.len()];
        let dbeta = swish_backward(&x, &dy, &mut dx, beta, false);
        let (h, b) = (1e-4, beta as f64);
        let mut want_dbeta = 0.0;
        for ((&x, &dy), &dx) in x.iter().zip(&dy).zip(&dx) {
            let x = x as f64;
            let want = (f(x + h, b) - f(x - h, b)) / (2.0 * h) * dy as f64;
            assert!((dx as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "dx at {x}: {dx} vs {want}");
            want_dbeta += (f(x, b + h) - f(x, b - h)) / (2.0 * h) * dy as f64;
        }
        assert!((dbeta - want_dbeta).abs() < 1e-3 * (1.0 + want_dbeta.abs()), "dbeta {dbeta} vs {want_dbeta}");
        same_bits("swish forward", |isa| {
            let mut y = vec![0.0; x.len()];
            swish_forward_on(isa, &x, &mut y, beta);
            y
        });
        same_bits("swish backward", |isa| {
            let mut dx = vec![0.5; x.len()];
            let dbeta = swish_backward_on(isa, &x, &dy, &mut dx, beta, true);
            [dx, vec![dbeta as f32]].concat()
        });
    }

    #[test]
    fn sum_squares_is_exact_to_f64_rounding_and_the_same_on_every_isa() {
        for n in [0usize, 1, 31, 32, 33, 1000] {
            let x = wave(n, n as f32);
            let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            let got = sum_squares(&x);
            assert!((got - want).abs() <= 1e-12 * want.max(1.0), "n = {n}: {got} vs {want}");
            same_bits("sum of squares", |isa| {
                let bits = sum_squares_on(isa, &x).to_bits();
                vec![f32::from_bits(bits as u32), f32::from_bits((bits >> 32) as u32)]
            });
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_mask_exactly_and_are_the_same_on_every_isa() {
        for visible in [0usize, 1, 7, 8, 9, 64] {
            let logits = wave(64, visible as f32);
            let mut p = logits.clone();
            softmax_row(&mut p, visible);
            if visible > 0 {
                let z: f64 = logits[..visible].iter().map(|&v| (v as f64).exp()).sum();
                for j in 0..visible {
                    let want = (logits[j] as f64).exp() / z;
                    assert!((p[j] as f64 - want).abs() < 1e-6, "visible {visible} p[{j}]");
                }
            }
            assert!(p[visible..].iter().all(|&v| v == 0.0));
            same_bits("softmax row", |isa| {
                let mut p = logits.clone();
                softmax_row_on(isa, &mut p, visible);
                p
            });
            let dp0 = wave(64, 3.0);
            same_bits("softmax backward row", |isa| {
                let mut dp = dp0.clone();
                softmax_backward_row_on(isa, &p, &mut dp, visible, 0.5);
                dp
            });
        }
    }

    #[test]
    fn adam_update_is_the_same_on_every_isa() {
        let k = AdamStep {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step_size: 1e-3 / 0.1,
            inv_sqrt_bc2: 1.0 / 0.001f32.sqrt(),
            decay: 1e-5,
            grad_scale: 0.5,
        };
        let g = wave(777, 1.0);
        same_bits("adam", |isa| {
            let (mut w, mut m, mut v) =
                (wave(777, 0.0), wave(777, 4.0), wave(777, 5.0).iter().map(|x| x * x).collect::<Vec<f32>>());
            adam_update_on(isa, &mut w, &g, &mut m, &mut v, k);
            [w, m, v].concat()
        });
    }
}
