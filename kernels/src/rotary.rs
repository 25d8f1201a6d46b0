//! Rotary position embedding (RoPE, Su et al. 2021; LLaMA): each head's query and key are
//! rotated in pairs of dimensions by angles that grow with the position, so the score
//! q_i·k_j depends on positions only through i − j. Pairs are (c, c + d_k/2) (the
//! "rotate half" layout of GPT-NeoX and Hugging Face LLaMA); pair c turns by
//! position · base^(−2c/d_k).

/// Which rows and columns of a (rows, 3D) [Q | K | V] buffer to rotate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rotary {
    /// Positions per sequence: row r is at position `offset + r % t`.
    pub t: usize,
    pub offset: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Frequency base (10000 in RoPE and LLaMA).
    pub base: f32,
}

impl Rotary {
    /// cos and sin of every (position, pair), (t, d_k/2) each, computed in f64.
    pub fn table(&self) -> RotaryTable {
        let half = self.head_dim / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(self.t * half), Vec::with_capacity(self.t * half));
        for p in 0..self.t {
            for c in 0..half {
                let freq = (self.base as f64).powf(-2.0 * c as f64 / self.head_dim as f64);
                let angle = (self.offset + p) as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RotaryTable { cos, sin }
    }
}

/// The angles of a [`Rotary`], (t, d_k/2) each.
pub struct RotaryTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// Rotates Q and K of every row of `qkv` (3D wide, whole sequences) in place: by +angle in
/// the forward, by −angle (`inverse`) to carry dL/d(rotated) back to dL/d(unrotated), since
/// the rotation is orthogonal and its transpose is its inverse. V is left alone.
pub fn rotate(qkv: &mut [f32], rot: &Rotary, inverse: bool) {
    rotate_with(qkv, rot, &rot.table(), inverse)
}

/// [`rotate`] with the angles computed once for many calls (`Rotary::table`).
pub fn rotate_with(qkv: &mut [f32], rot: &Rotary, table: &RotaryTable, inverse: bool) {
    let (d, half) = (rot.heads * rot.head_dim, rot.head_dim / 2);
    let sign = if inverse { -1.0 } else { 1.0 };
    for (r, row) in qkv.chunks_exact_mut(3 * d).enumerate() {
        let p = r % rot.t.max(1);
        let (cos, sin) = (&table.cos[p * half..][..half], &table.sin[p * half..][..half]);
        for head in row[..2 * d].chunks_exact_mut(rot.head_dim) {
            let (x1, x2) = head.split_at_mut(half);
            for (((a, b), &c), &s) in x1.iter_mut().zip(x2.iter_mut()).zip(cos).zip(sin) {
                let s = sign * s;
                (*a, *b) = (*a * c - *b * s, *b * c + *a * s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qkv(rows: usize, d: usize) -> Vec<f32> {
        (0..rows * 3 * d).map(|i| ((i as f32) * 0.71).sin()).collect()
    }

    #[test]
    fn inverse_undoes_the_rotation_and_v_is_untouched() {
        let rot = Rotary { t: 5, offset: 3, heads: 2, head_dim: 6, base: 10000.0 };
        let x = qkv(10, 12);
        let mut y = x.clone();
        rotate(&mut y, &rot, false);
        assert_ne!(x, y);
        for (a, b) in x.chunks_exact(36).zip(y.chunks_exact(36)) {
            assert_eq!(a[24..], b[24..], "V changed");
        }
        rotate(&mut y, &rot, true);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    /// The defining property: q_i·k_j depends on i − j only, so shifting both positions
    /// leaves every score unchanged.
    #[test]
    fn scores_depend_on_relative_position_only() {
        let (heads, dk) = (1, 8);
        let d = heads * dk;
        let x = qkv(2, d); // row 0 supplies q, row 1 supplies k
        let score = |pi: usize, pj: usize| {
            let rot_at = |p| Rotary { t: 1, offset: p, heads, head_dim: dk, base: 10000.0 };
            let (mut qi, mut kj) = (x[..3 * d].to_vec(), x[3 * d..].to_vec());
            rotate(&mut qi, &rot_at(pi), false);
            rotate(&mut kj, &rot_at(pj), false);
            (0..d).map(|c| qi[c] as f64 * kj[d + c] as f64).sum::<f64>()
        };
        for (i, j) in [(5, 2), (7, 7), (3, 9)] {
            let (a, b) = (score(i, j), score(i + 40, j + 40));
            assert!((a - b).abs() < 1e-4, "({i},{j}): {a} vs shifted {b}");
        }
        assert!((score(5, 2) - score(6, 2)).abs() > 1e-3, "the score ignores position");
    }

    /// Position 0 is the identity; position 1 turns pair 0 by exactly 1 radian.
    #[test]
    fn known_angles() {
        let rot = Rotary { t: 2, offset: 0, heads: 1, head_dim: 4, base: 10000.0 };
        let mut x = vec![0.0; 2 * 12];
        for row in x.chunks_exact_mut(12) {
            row[0] = 1.0; // pair 0 of q is (x[0], x[2]) = (1, 0)
        }
        rotate(&mut x, &rot, false);
        assert_eq!(x[..4], [1.0, 0.0, 0.0, 0.0]);
        assert!((x[12] - 1f32.cos()).abs() < 1e-7 && (x[14] - 1f32.sin()).abs() < 1e-7, "{:?}", &x[12..16]);
    }
}
