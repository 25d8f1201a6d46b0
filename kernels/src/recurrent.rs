//! Point-wise parts of the LSTM and GRU cells (T17), one time step over a batch of rows.
//! The matrix products around them (input and hidden projections) are GEMMs done by the
//! layer. Gate order follows PyTorch: LSTM [i f g o], GRU [r z n].

use crate::fast_math::{sigmoid, tanh};

/// LSTM step. pre (N, 4H): x·W_ihᵀ + b_ih + h·W_hhᵀ + b_hh. Writes the activated gates
/// (N, 4H), c = f⊙c_prev + i⊙g and h = o⊙tanh(c), both (N, H).
pub fn lstm_forward(pre: &[f32], c_prev: &[f32], gates: &mut [f32], c: &mut [f32], h: &mut [f32], hidden: usize) {
    for (row, (pre, act)) in pre.chunks_exact(4 * hidden).zip(gates.chunks_exact_mut(4 * hidden)).enumerate() {
        for j in 0..hidden {
            let k = row * hidden + j;
            let (i, f, g, o) =
                (sigmoid(pre[j]), sigmoid(pre[hidden + j]), tanh(pre[2 * hidden + j]), sigmoid(pre[3 * hidden + j]));
            (act[j], act[hidden + j], act[2 * hidden + j], act[3 * hidden + j]) = (i, f, g, o);
            c[k] = f * c_prev[k] + i * g;
            h[k] = o * tanh(c[k]);
        }
    }
}

/// LSTM step backward. `dh` (N, H) is the total gradient of h; `dc` holds dL/dc from the
/// step after on entry and dL/dc_prev on exit. Writes d(pre) (N, 4H).
pub fn lstm_backward(
    gates: &[f32],
    c_prev: &[f32],
    c: &[f32],
    dh: &[f32],
    dc: &mut [f32],
    dpre: &mut [f32],
    hidden: usize,
) {
    let rows = dh.len() / hidden.max(1);
    for r in 0..rows {
        let act = &gates[r * 4 * hidden..][..4 * hidden];
        let d = &mut dpre[r * 4 * hidden..][..4 * hidden];
        for j in 0..hidden {
            let k = r * hidden + j;
            let (i, f, g, o) = (act[j], act[hidden + j], act[2 * hidden + j], act[3 * hidden + j]);
            let tc = tanh(c[k]);
            let dct = dc[k] + dh[k] * o * (1.0 - tc * tc); // through h = o·tanh(c)
            d[j] = dct * g * i * (1.0 - i);
            d[hidden + j] = dct * c_prev[k] * f * (1.0 - f);
            d[2 * hidden + j] = dct * i * (1.0 - g * g);
            d[3 * hidden + j] = dh[k] * tc * o * (1.0 - o);
            dc[k] = dct * f;
        }
    }
}

/// GRU step. xp, hp (N, 3H) are the input and hidden projections (with their biases):
/// r = σ(xp_r + hp_r), z = σ(xp_z + hp_z), n = tanh(xp_n + r⊙hp_n), h = (1−z)⊙n + z⊙h_prev.
/// Writes the gates [r z n] (N, 3H) and h (N, H).
pub fn gru_forward(xp: &[f32], hp: &[f32], h_prev: &[f32], gates: &mut [f32], h: &mut [f32], hidden: usize) {
    let rows = h_prev.len() / hidden.max(1);
    for row in 0..rows {
        let (x, p, g) = (&xp[row * 3 * hidden..], &hp[row * 3 * hidden..], &mut gates[row * 3 * hidden..]);
        for j in 0..hidden {
            let r = sigmoid(x[j] + p[j]);
            let z = sigmoid(x[hidden + j] + p[hidden + j]);
            let n = tanh(x[2 * hidden + j] + r * p[2 * hidden + j]);
            (g[j], g[hidden + j], g[2 * hidden + j]) = (r, z, n);
            let k = row * hidden + j;
            h[k] = (1.0 - z) * n + z * h_prev[k];
        }
    }
}

/// GRU step backward from dh (N, H): d(xp), d(hp) (N, 3H) and the direct part of
/// dh_prev (z⊙dh; the part through hp is the layer's GEMM).
#[allow(clippy::too_many_arguments)]
pub fn gru_backward(
    gates: &[f32],
    hp: &[f32],
    h_prev: &[f32],
    dh: &[f32],
    dxp: &mut [f32],
    dhp: &mut [f32],
    dh_prev: &mut [f32],
    hidden: usize,
) {
    let rows = dh.len() / hidden.max(1);
    for row in 0..rows {
        let base = row * 3 * hidden;
        for j in 0..hidden {
            let k = row * hidden + j;
            let (r, z, n) = (gates[base + j], gates[base + hidden + j], gates[base + 2 * hidden + j]);
            let dn = dh[k] * (1.0 - z);
            let dz = dh[k] * (h_prev[k] - n);
            let dan = dn * (1.0 - n * n); // pre-activation of n
            let dr = dan * hp[base + 2 * hidden + j];
            let dar = dr * r * (1.0 - r);
            let daz = dz * z * (1.0 - z);
            (dxp[base + j], dxp[base + hidden + j], dxp[base + 2 * hidden + j]) = (dar, daz, dan);
            (dhp[base + j], dhp[base + hidden + j], dhp[base + 2 * hidden + j]) = (dar, daz, dan * r);
            dh_prev[k] = dh[k] * z;
        }
    }
}
