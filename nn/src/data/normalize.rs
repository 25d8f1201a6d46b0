//! Input normalisation (T26). Statistics are fitted on the training split only and then
//! applied unchanged to every split.

use super::Dataset;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalization {
    None,
    /// (x − min)/(max − min) to [0, 1], min/max over all training values.
    MinMax,
    /// (x − mean)/std with the mean and std of all training values (one scalar pair, as is
    /// usual for images: per-pixel statistics blow up on pixels that are always 0).
    ZScore,
    /// Each row divided by its L2 norm (no fitted statistics).
    L2,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalizer {
    pub kind: Normalization,
    pub shift: f32,
    pub scale: f32,
}

impl Normalizer {
    pub fn fit(kind: Normalization, train: &Dataset) -> Self {
        let x = &train.x;
        let (shift, scale) = match kind {
            Normalization::None | Normalization::L2 => (0.0, 1.0),
            Normalization::MinMax => {
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                (min, if max > min { 1.0 / (max - min) } else { 1.0 })
            }
            Normalization::ZScore => {
                let n = x.len().max(1) as f64;
                let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                (mean as f32, if var > 0.0 { (1.0 / var.sqrt()) as f32 } else { 1.0 })
            }
        };
        Self { kind, shift, scale }
    }

    /// The raw value of each normalised value of `x`; None for L2 (a row's norm is gone).
    pub fn invert(&self, x: &[f32]) -> Option<Vec<f32>> {
        match self.kind {
            Normalization::None => Some(x.to_vec()),
            Normalization::L2 => None,
            _ => Some(x.iter().map(|&v| v / self.scale + self.shift).collect()),
        }
    }

    /// `apply` on bare rows of `features` values.
    pub fn apply_rows(&self, x: &mut [f32], features: usize) {
        let mut data = Dataset { features, classes: 0, y: Vec::new(), x: x.to_vec() };
        self.apply(&mut data);
        x.copy_from_slice(&data.x);
    }

    pub fn apply(&self, data: &mut Dataset) {
        match self.kind {
            Normalization::None => {}
            Normalization::L2 => {
                for row in data.x.chunks_exact_mut(data.features) {
                    let norm = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
                    if norm > 0.0 {
                        let inv = (1.0 / norm) as f32;
                        row.iter_mut().for_each(|v| *v *= inv);
                    }
                }
            }
            _ => data.x.iter_mut().for_each(|v| *v = (*v - self.shift) * self.scale),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(x: Vec<f32>) -> Dataset {
        Dataset { features: 2, classes: 1, y: vec![0; x.len() / 2], x }
    }

    #[test]
    fn minmax_zscore_l2_known_values() {
        let train = ds(vec![0.0, 10.0, 5.0, 5.0]);
        let mut t = train.clone();
        Normalizer::fit(Normalization::MinMax, &train).apply(&mut t);
        assert_eq!(t.x, vec![0.0, 1.0, 0.5, 0.5]);

        let z = Normalizer::fit(Normalization::ZScore, &train);
        let mut t = train.clone();
        z.apply(&mut t);
        let mean: f32 = t.x.iter().sum::<f32>() / 4.0;
        let var: f32 = t.x.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5);
        // Test split uses the training statistics, not its own.
        let mut test = ds(vec![5.0, 15.0]);
        z.apply(&mut test);
        assert!((test.x[0]).abs() < 1e-6 && (test.x[1] - 10.0 / 12.5f32.sqrt()).abs() < 1e-5);

        let mut t = ds(vec![3.0, 4.0, 0.0, 0.0]);
        Normalizer::fit(Normalization::L2, &t.clone()).apply(&mut t);
        assert_eq!(t.x, vec![0.6, 0.8, 0.0, 0.0]);
    }
}
