//! Normalisation as plain loops over slices (T10, T11). Both normalise a (rows, cols)
//! matrix: LayerNorm each row over its columns, BatchNorm each column over the rows (the
//! batch, and for NHWC images also H and W). Statistics are accumulated in f64.

/// y = gamma·x̂ + beta with x̂ = (x − mean_r)/sqrt(var_r + eps) per row r. Writes x̂ and
/// 1/sqrt(var + eps) for backward.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    rows: usize,
    cols: usize,
    eps: f32,
    y: &mut [f32],
    xhat: &mut [f32],
    rstd: &mut [f32],
) {
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        let rs = (1.0 / (var + eps as f64).sqrt()) as f32;
        rstd[r] = rs;
        for c in 0..cols {
            let h = (row[c] - mean as f32) * rs;
            xhat[r * cols + c] = h;
            y[r * cols + c] = gamma[c] * h + beta[c];
        }
    }
}

/// dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) per row with dx̂ = dy·gamma;
/// dgamma += Σ_r dy·x̂, dbeta += Σ_r dy.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    rows: usize,
    cols: usize,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    for r in 0..rows {
        let (dyr, hr) = (&dy[r * cols..(r + 1) * cols], &xhat[r * cols..(r + 1) * cols]);
        let (mut mean_d, mut mean_dh) = (0.0f64, 0.0f64);
        for c in 0..cols {
            let d = (dyr[c] * gamma[c]) as f64;
            mean_d += d;
            mean_dh += d * hr[c] as f64;
            dgamma[c] += dyr[c] * hr[c];
            dbeta[c] += dyr[c];
        }
        mean_d /= cols as f64;
        mean_dh /= cols as f64;
        for c in 0..cols {
            let d = (dyr[c] * gamma[c]) as f64;
            dx[r * cols + c] = (rstd[r] as f64 * (d - mean_d - hr[c] as f64 * mean_dh)) as f32;
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
