//! Learning-rate schedules (T22), all composable with linear warmup.

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decay {
    Constant,
    /// lr0 · gamma^⌊t/step_size⌋
    Step {
        step_size: u64,
        gamma: f32,
    },
    /// lr0 · rate^(t/decay_steps)
    Exponential {
        rate: f32,
        decay_steps: u64,
    },
    /// lr0 − (t/T)(lr0 − min_lr)
    Linear {
        min_lr: f32,
    },
    /// min_lr + ½(lr0 − min_lr)(1 + cos(π t/T))
    Cosine {
        min_lr: f32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub base_lr: f32,
    pub decay: Decay,
    /// Linear warmup from `warmup_start_lr` to `base_lr` over the first `warmup_steps`.
    pub warmup_steps: u64,
    pub warmup_start_lr: f32,
    /// Total steps of the run (T of linear and cosine counts from the end of warmup).
    pub total_steps: u64,
}

impl Schedule {
    /// Learning rate at 0-based `step`.
    pub fn lr(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            let frac = step as f64 / self.warmup_steps as f64;
            return (self.warmup_start_lr as f64 + frac * (self.base_lr - self.warmup_start_lr) as f64) as f32;
        }
        let t = (step - self.warmup_steps) as f64;
        let horizon = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let frac = (t / horizon).min(1.0);
        let lr0 = self.base_lr as f64;
        let lr = match self.decay {
            Decay::Constant => lr0,
            Decay::Step { step_size, gamma } => lr0 * (gamma as f64).powi((t as u64 / step_size) as i32),
            Decay::Exponential { rate, decay_steps } => lr0 * (rate as f64).powf(t / decay_steps as f64),
            Decay::Linear { min_lr } => lr0 - frac * (lr0 - min_lr as f64),
            Decay::Cosine { min_lr } => {
                min_lr as f64 + 0.5 * (lr0 - min_lr as f64) * (1.0 + (std::f64::consts::PI * frac).cos())
            }
        };
        lr as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(decay: Decay, warmup: u64) -> Schedule {
        Schedule { base_lr: 0.1, decay, warmup_steps: warmup, warmup_start_lr: 0.001, total_steps: 110 }
    }

    fn close(a: f32, b: f64) -> bool {
        (a as f64 - b).abs() < 1e-7
    }

    #[test]
    fn warmup_hits_exact_values() {
        let s = sched(Decay::Constant, 10);
        assert!(close(s.lr(0), 0.001));
        assert!(close(s.lr(5), 0.001 + 0.5 * 0.099));
        assert!(close(s.lr(9), 0.001 + 0.9 * 0.099));
        assert!(close(s.lr(10), 0.1));
        assert!(close(s.lr(1000), 0.1));
    }

    #[test]
    fn decays_hit_hand_computed_values() {
        let s = sched(Decay::Step { step_size: 30, gamma: 0.5 }, 0);
        assert!(close(s.lr(29), 0.1) && close(s.lr(30), 0.05) && close(s.lr(65), 0.025));
        let s = sched(Decay::Exponential { rate: 0.5, decay_steps: 20 }, 0);
        assert!(close(s.lr(20), 0.05) && close(s.lr(10), 0.1 * 0.5f64.sqrt()));
        // After 10 warmup steps, T = 100.
        let s = sched(Decay::Linear { min_lr: 0.01 }, 10);
        assert!(close(s.lr(10), 0.1) && close(s.lr(60), 0.055) && close(s.lr(110), 0.01) && close(s.lr(500), 0.01));
        let s = sched(Decay::Cosine { min_lr: 0.0 }, 10);
        assert!(close(s.lr(10), 0.1) && close(s.lr(60), 0.05) && close(s.lr(110), 0.0));
        assert!(close(s.lr(35), 0.05 * (1.0 + (std::f64::consts::PI / 4.0).cos())));
    }
}
