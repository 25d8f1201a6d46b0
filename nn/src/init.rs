//! Weight initialisation (T18), drawn from the (seed, "init", parameter name) stream so a
//! parameter's initial value depends on nothing but the seed and its name.

use crate::rng::{name_id, Stream};

/// U(−a, a) with a = sqrt(6/(fan_in+fan_out)).
pub fn xavier_uniform(seed: u64, name: &str, fan_in: usize, fan_out: usize) -> Vec<f32> {
    let a = (6.0 / (fan_in + fan_out) as f32).sqrt();
    let mut s = Stream::new(seed, "init", &[name_id(name)]);
    (0..fan_in * fan_out).map(|_| (2.0 * s.uniform() - 1.0) * a).collect()
}

/// N(0, 2/fan_in).
pub fn kaiming_normal(seed: u64, name: &str, fan_in: usize, fan_out: usize) -> Vec<f32> {
    let std = (2.0 / fan_in as f32).sqrt();
    let mut s = Stream::new(seed, "init", &[name_id(name)]);
    (0..fan_in * fan_out).map(|_| s.normal() * std).collect()
}

/// N(0, std²): GPT-2's initialisation (std 0.02, residual projections scaled by 1/√(2L)).
pub fn normal(seed: u64, name: &str, len: usize, std: f32) -> Vec<f32> {
    let mut s = Stream::new(seed, "init", &[name_id(name)]);
    (0..len).map(|_| s.normal() * std).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xavier_bounds_and_variance() {
        let w = xavier_uniform(1, "fc.weight", 300, 100);
        let a = (6.0f32 / 400.0).sqrt();
        assert!(w.iter().all(|v| v.abs() <= a));
        let var = w.iter().map(|v| (v * v) as f64).sum::<f64>() / w.len() as f64;
        // Var U(-a,a) = a²/3 = 2/(fan_in+fan_out)
        assert!((var - 2.0 / 400.0).abs() < 2e-4, "{var}");
    }

    #[test]
    fn kaiming_std_and_name_keying() {
        let w = kaiming_normal(1, "fc.weight", 256, 256);
        let var = w.iter().map(|v| (v * v) as f64).sum::<f64>() / w.len() as f64;
        assert!((var - 2.0 / 256.0).abs() < 3e-4, "{var}");
        assert_eq!(w, kaiming_normal(1, "fc.weight", 256, 256));
        assert_ne!(w[..4], kaiming_normal(1, "fc2.weight", 256, 256)[..4]);
    }
}
