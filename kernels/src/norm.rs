//! Normalisation as plain loops over slices (T10, T11). Both normalise a (rows, cols)
//! matrix: LayerNorm each row over its columns, BatchNorm each column over the rows (the
//! batch, and for NHWC images also H and W). Statistics are accumulated in f64.

/// Σ f(a_c, b_c) over a row in f64, in 8 lanes: a fixed order, the same on every ISA.
#[inline(always)]
fn sum_f64(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64) -> f64 {
    let mut lanes = [0.0f64; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ac.remainder().iter().zip(bc.remainder()).map(|(&x, &y)| f(x, y)).sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            lanes[k] += f(x[k], y[k]);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

crate::multiversion! {
    /// LayerNorm of whole rows of x (cols wide): y = gamma·x̂ + beta with
    /// x̂ = (x − mean_r)/sqrt(var_r + eps). Writes x̂ and 1/sqrt(var + eps) per row for backward.
    pub fn layer_norm_forward / layer_norm_forward_on(
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        cols: usize,
        eps: f32,
        y: &mut [f32],
        xhat: &mut [f32],
        rstd: &mut [f32],
    ) {
        let rows = x.chunks_exact(cols).zip(y.chunks_exact_mut(cols)).zip(xhat.chunks_exact_mut(cols));
        for (((x, y), xhat), rstd) in rows.zip(rstd.iter_mut()) {
            let mean = sum_f64(x, x, |v, _| v as f64) / cols as f64;
            let var = sum_f64(x, x, |v, _| (v as f64 - mean) * (v as f64 - mean)) / cols as f64;
            let (m, rs) = (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32);
            *rstd = rs;
            for ((((y, h), &x), &g), &b) in y.iter_mut().zip(xhat.iter_mut()).zip(x).zip(gamma).zip(beta) {
                *h = (x - m) * rs;
                *y = g * *h + b;
            }
        }
    }
}

crate::multiversion! {
    /// LayerNorm backward of whole rows: dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) per row
    /// with dx̂ = dy·gamma; dgamma += Σ_r dy·x̂, dbeta += Σ_r dy (row by row, in order).
    pub fn layer_norm_backward / layer_norm_backward_on(
        dy: &[f32],
        xhat: &[f32],
        rstd: &[f32],
        gamma: &[f32],
        cols: usize,
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        let rows = dy.chunks_exact(cols).zip(xhat.chunks_exact(cols)).zip(dx.chunks_exact_mut(cols));
        for (((dy, h), dx), &rs) in rows.zip(rstd) {
            for ((((dx, &d), &h), &g), (dg, db)) in
                dx.iter_mut().zip(dy).zip(h).zip(gamma).zip(dgamma.iter_mut().zip(dbeta.iter_mut()))
            {
                *dg += d * h;
                *db += d;
                *dx = d * g; // dx̂ first
            }
            let mean_d = sum_f64(dx, dx, |d, _| d as f64) / cols as f64;
            let mean_dh = sum_f64(dx, h, |d, h| d as f64 * h as f64) / cols as f64;
            for (dx, &h) in dx.iter_mut().zip(h) {
                *dx = (rs as f64 * (*dx as f64 - mean_d - h as f64 * mean_dh)) as f32;
            }
        }
    }
}

crate::multiversion! {
    /// RMSNorm of whole rows of x (cols wide): y = gamma·x̂ with x̂ = x/sqrt(mean_r(x²) + eps)
    /// (no centring, no beta: LLaMA's norm). Writes x̂ and 1/sqrt(mean(x²) + eps) per row.
    pub fn rms_norm_forward / rms_norm_forward_on(
        x: &[f32],
        gamma: &[f32],
        cols: usize,
        eps: f32,
        y: &mut [f32],
        xhat: &mut [f32],
        rstd: &mut [f32],
    ) {
        let rows = x.chunks_exact(cols).zip(y.chunks_exact_mut(cols)).zip(xhat.chunks_exact_mut(cols));
        for (((x, y), xhat), rstd) in rows.zip(rstd.iter_mut()) {
            let mean_square = sum_f64(x, x, |a, b| a as f64 * b as f64) / cols as f64;
            let rs = (1.0 / (mean_square + eps as f64).sqrt()) as f32;
            *rstd = rs;
            for (((y, h), &x), &g) in y.iter_mut().zip(xhat.iter_mut()).zip(x).zip(gamma) {
                *h = x * rs;
                *y = g * *h;
            }
        }
    }
}

crate::multiversion! {
    /// RMSNorm backward of whole rows: dx = rstd·(dx̂ − x̂·mean(dx̂·x̂)) per row with
    /// dx̂ = dy·gamma; dgamma += Σ_r dy·x̂ (row by row, in order).
    pub fn rms_norm_backward / rms_norm_backward_on(
        dy: &[f32],
        xhat: &[f32],
        rstd: &[f32],
        gamma: &[f32],
        cols: usize,
        dx: &mut [f32],
        dgamma: &mut [f32],
    ) {
        let rows = dy.chunks_exact(cols).zip(xhat.chunks_exact(cols)).zip(dx.chunks_exact_mut(cols));
        for (((dy, h), dx), &rs) in rows.zip(rstd) {
            for ((((dx, &d), &h), &g), dg) in dx.iter_mut().zip(dy).zip(h).zip(gamma).zip(dgamma.iter_mut()) {
                *dg += d * h;
                *dx = d * g; // dx̂ first
            }
            let mean_dh = sum_f64(dx, h, |d, h| d as f64 * h as f64) / cols as f64;
            for (dx, &h) in dx.iter_mut().zip(h) {
                *dx = (rs as f64 * (*dx as f64 - h as f64 * mean_dh)) as f32;
            }
        }
    }
}

/// Per-column mean and biased variance over the rows.
pub fn column_stats(x: &[f32], rows: usize, cols: usize) -> (Vec<f64>, Vec<f64>) {
    let mut mean = vec![0.0f64; cols];
    for row in x.chunks_exact(cols).take(rows) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= rows.max(1) as f64);
    let mut var = vec![0.0f64; cols];
    for row in x.chunks_exact(cols).take(rows) {
        for ((s, &v), m) in var.iter_mut().zip(row).zip(&mean) {
            *s += (v as f64 - m).powi(2);
        }
    }
    var.iter_mut().for_each(|s| *s /= rows.max(1) as f64);
    (mean, var)
}

/// y = gamma·(x − mean_c)/sqrt(var_c + eps) + beta per column c, with the given statistics
/// (the batch's in training, the running ones at eval). Writes x̂.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_apply(
    x: &[f32],
    mean: &[f64],
    var: &[f64],
    gamma: &[f32],
    beta: &[f32],
    rows: usize,
    cols: usize,
    eps: f32,
    y: &mut [f32],
    xhat: &mut [f32],
) {
    let rstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps as f64).sqrt()).collect();
    for r in 0..rows {
        for c in 0..cols {
            let i = r * cols + c;
            let h = ((x[i] as f64 - mean[c]) * rstd[c]) as f32;
            xhat[i] = h;
            y[i] = gamma[c] * h + beta[c];
        }
    }
}

/// BatchNorm backward, first half: per channel Σ γ·dy and Σ γ·dy·x̂ (returned; a
/// synchronised BatchNorm sums them across workers), and dγ += Σ dy·x̂, dβ += Σ dy.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward_sums(
    dy: &[f32],
    xhat: &[f32],
    gamma: &[f32],
    rows: usize,
    cols: usize,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> (Vec<f64>, Vec<f64>) {
    let (mut sum_d, mut sum_dh) = (vec![0.0f64; cols], vec![0.0f64; cols]);
    for r in 0..rows {
        for c in 0..cols {
            let i = r * cols + c;
            let d = (dy[i] * gamma[c]) as f64;
            sum_d[c] += d;
            sum_dh[c] += d * xhat[i] as f64;
            dgamma[c] += dy[i] * xhat[i];
            dbeta[c] += dy[i];
        }
    }
    (sum_d, sum_dh)
}

/// BatchNorm backward, second half, with the batch means of γ·dy and γ·dy·x̂:
/// dx = rstd·(γ·dy − mean(γ·dy) − x̂·mean(γ·dy·x̂)).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward_dx(
    dy: &[f32],
    xhat: &[f32],
    var: &[f64],
    gamma: &[f32],
    mean_d: &[f64],
    mean_dh: &[f64],
    rows: usize,
    cols: usize,
    eps: f32,
    dx: &mut [f32],
) {
    for r in 0..rows {
        for c in 0..cols {
            let i = r * cols + c;
            let rstd = 1.0 / (var[c] + eps as f64).sqrt();
            let d = (dy[i] * gamma[c]) as f64;
            dx[i] = (rstd * (d - mean_d[c] - xhat[i] as f64 * mean_dh[c])) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::same_bits;

    fn wave(n: usize, salt: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.61 + salt).sin() * 3.0 + salt).collect()
    }

    #[test]
    fn layer_norm_matches_f64_and_is_the_same_on_every_isa() {
        let (rows, cols, eps) = (5, 37, 1e-5f32);
        let (x, gamma, beta, dy) = (wave(rows * cols, 0.5), wave(cols, 1.0), wave(cols, 2.0), wave(rows * cols, 3.0));
        let forward = |isa| {
            let (mut y, mut xhat, mut rstd) = (vec![0.0; rows * cols], vec![0.0; rows * cols], vec![0.0; rows]);
            layer_norm_forward_on(isa, &x, &gamma, &beta, cols, eps, &mut y, &mut xhat, &mut rstd);
            (y, xhat, rstd)
        };
        let (y, xhat, rstd) = forward(crate::isa::current());
        for r in 0..rows {
            let row: Vec<f64> = x[r * cols..][..cols].iter().map(|&v| v as f64).collect();
            let mean = row.iter().sum::<f64>() / cols as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cols as f64;
            for c in 0..cols {
                let want = gamma[c] as f64 * (row[c] - mean) / (var + eps as f64).sqrt() + beta[c] as f64;
                assert!((y[r * cols + c] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()), "y[{r},{c}]");
            }
        }
        same_bits("layer norm forward", |isa| {
            let (y, xhat, rstd) = forward(isa);
            [y, xhat, rstd].concat()
        });
        same_bits("layer norm backward", |isa| {
            let (mut dx, mut dg, mut db) = (vec![0.0; rows * cols], vec![0.25; cols], vec![0.5; cols]);
            layer_norm_backward_on(isa, &dy, &xhat, &rstd, &gamma, cols, &mut dx, &mut dg, &mut db);
            [dx, dg, db].concat()
        });
    }

    #[test]
    fn rms_norm_matches_f64_and_is_the_same_on_every_isa() {
        let (rows, cols, eps) = (5, 37, 1e-5f32);
        let (x, gamma, dy) = (wave(rows * cols, 0.5), wave(cols, 1.0), wave(rows * cols, 3.0));
        let forward = |isa| {
            let (mut y, mut xhat, mut rstd) = (vec![0.0; rows * cols], vec![0.0; rows * cols], vec![0.0; rows]);
            rms_norm_forward_on(isa, &x, &gamma, cols, eps, &mut y, &mut xhat, &mut rstd);
            (y, xhat, rstd)
        };
        let (y, xhat, rstd) = forward(crate::isa::current());
        for r in 0..rows {
            let row: Vec<f64> = x[r * cols..][..cols].iter().map(|&v| v as f64).collect();
            let rms = (row.iter().map(|v| v * v).sum::<f64>() / cols as f64 + eps as f64).sqrt();
            for c in 0..cols {
                let want = gamma[c] as f64 * row[c] / rms;
                assert!((y[r * cols + c] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()), "y[{r},{c}]");
            }
        }
        same_bits("rms norm forward", |isa| {
            let (y, xhat, rstd) = forward(isa);
            [y, xhat, rstd].concat()
        });
        same_bits("rms norm backward", |isa| {
            let (mut dx, mut dg) = (vec![0.0; rows * cols], vec![0.25; cols]);
            rms_norm_backward_on(isa, &dy, &xhat, &rstd, &gamma, cols, &mut dx, &mut dg);
            [dx, dg].concat()
        });
    }
}
