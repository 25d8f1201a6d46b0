//! Cost accounting (T34) and the data/parameter rule of thumb (T35).

use crate::trainer::Trainer;
use crate::Result;
use lockstep_kernels::{Backend, Gemm};
use std::time::Instant;

/// FLOPs of a training step per example and the peak they are measured against.
pub struct CostModel {
    pub forward_flops_per_example: u64,
    /// Forward + backward ≈ 3 × forward (the backward pass computes two matmuls per forward
    /// matmul: the input and the weight gradients).
    pub train_flops_per_example: u64,
    pub peak_gflops: f64,
    /// Where the peak comes from: the job, or a matmul measured on this backend.
    pub peak_source: String,
}

const PEAK_N: usize = 512;

impl CostModel {
    /// The peak is `stated_peak_gflops`, or measured here when `measure` is set (only the
    /// rank that reports does: the others would measure a CPU it shares with them).
    pub fn new<B: Backend>(trainer: &Trainer<B>, stated_peak_gflops: f64, measure: bool) -> Result<Self> {
        let forward = trainer.model.flops_per_example();
        let (peak_gflops, peak_source) = if stated_peak_gflops > 0.0 {
            (stated_peak_gflops, "stated in train.peak_gflops".to_string())
        } else if measure {
            (measure_matmul_gflops(&trainer.be)?, format!("measured: best of 5 {PEAK_N}³ matmuls on this backend"))
        } else {
            (0.0, "not measured on this rank".to_string())
        };
        Ok(Self { forward_flops_per_example: forward, train_flops_per_example: 3 * forward, peak_gflops, peak_source })
    }

    pub fn log_start(&self, trainable_params: usize) {
        tracing::info!(
            "cost: {trainable_params} trainable parameters, {} forward FLOPs/example ({} per training example), peak {:.1} GFLOP/s per worker ({})",
            self.forward_flops_per_example,
            self.train_flops_per_example,
            self.peak_gflops,
            self.peak_source
        );
    }

    /// Model FLOPs utilisation: achieved training FLOP/s over the peak of `world` workers.
    pub fn mfu(&self, examples_per_s: f64, world: usize) -> f64 {
        if self.peak_gflops <= 0.0 {
            return 0.0;
        }
        let achieved = examples_per_s * self.train_flops_per_example as f64;
        achieved / (self.peak_gflops * 1e9 * world.max(1) as f64).max(1.0)
    }
}

/// Sustained GFLOP/s of an n³ matmul (2n³ FLOPs), best of 5 after 100 ms of warm-up.
pub fn measure_matmul_gflops<B: Backend>(be: &B) -> Result<f64> {
    let n = PEAK_N;
    let a = be.upload(&vec![0.5; n * n])?;
    let b = be.upload(&vec![0.25; n * n])?;
    let mut c = be.zeros(n * n)?;
    // Warm up for 100 ms first: one cold call left the worker threads asleep and the clock
    // low, and the "peak" came out below what training then achieved (MFU 103%).
    let warm = Instant::now();
    while warm.elapsed() < std::time::Duration::from_millis(100) {
        be.matmul(&a, &b, &mut c, Gemm::nn(n, n, n))?;
        be.check()?;
    }
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        be.matmul(&a, &b, &mut c, Gemm::nn(n, n, n))?;
        be.check()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best.max(1e-9) / 1e9)
}

/// The T35 rule of thumb: fewer than this many training examples (tokens) per parameter
/// invites overfitting.
pub const MIN_TARGETS_PER_PARAM: f64 = 10.0;

/// The warning text when `targets` per parameter is under the rule of thumb.
pub fn data_per_param_warning(targets: usize, params: usize, unit: &str) -> Option<String> {
    let ratio = targets as f64 / params.max(1) as f64;
    (ratio < MIN_TARGETS_PER_PARAM).then(|| {
        format!(
            "{targets} training {unit} for {params} parameters: {ratio:.3} per parameter, under the rule of thumb of \
             {MIN_TARGETS_PER_PARAM}; expect overfitting: use more data, a smaller model, or regularisation \
             (dropout, weight decay, augmentation, early stopping)"
        )
    })
}

pub fn warn_on_data_per_param(targets: usize, params: usize, unit: &str) {
    if let Some(warning) = data_per_param_warning(targets, params, unit) {
        tracing::warn!("{warning}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_per_param_rule_of_thumb() {
        let w = data_per_param_warning(60_000, 669_706, "examples").unwrap();
        assert!(w.contains("0.090 per parameter"), "{w}");
        assert!(data_per_param_warning(1_000_000, 100_000, "tokens").is_none(), "10 per parameter is enough");
        assert!(data_per_param_warning(999_999, 100_000, "tokens").is_some());
    }

    #[test]
    fn mfu_is_achieved_over_peak() {
        let c = CostModel {
            forward_flops_per_example: 1_000_000,
            train_flops_per_example: 3_000_000,
            peak_gflops: 100.0,
            peak_source: "stated".into(),
        };
        // 10k ex/s × 3 MFLOP = 30 GFLOP/s: 30% of one 100 GFLOP/s worker, 15% of two.
        assert!((c.mfu(10_000.0, 1) - 0.3).abs() < 1e-12);
        assert!((c.mfu(10_000.0, 2) - 0.15).abs() < 1e-12);
    }
}
