//! Step guards: dynamic loss scaling for fp16 (T25), loss blow-up detection (T36) and the
//! EMA of the weights (T23). Each sees only all-reduced values, so every rank decides alike.

use crate::Result;
use lockstep_kernels::Backend;
use lockstep_nn::Param;
use lockstep_proto::toolbox::BlowupSpec;
use std::collections::VecDeque;

/// Dynamic loss scaling: the loss gradient is multiplied by `scale` so small fp16 gradients
/// do not flush to zero. A step whose gradients overflow (inf/NaN) is skipped and the scale
/// halved; after `growth_interval` good steps in a row it is doubled.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    pub scale: f32,
    pub growth_interval: u64,
    pub good_steps: u64,
}

impl LossScaler {
    pub fn new(scale: f32, growth_interval: u64) -> Self {
        Self { scale, growth_interval, good_steps: 0 }
    }

    /// Records a step's outcome; false means skip its update. At scale 1 there is nothing
    /// left to lower: the step is applied (and the blow-up guard judges it).
    pub fn update(&mut self, grads_finite: bool) -> bool {
        if !grads_finite && self.scale > 1.0 {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            self.scale = (self.scale * 2.0).min(f32::MAX / 4.0);
            self.good_steps = 0;
        }
        true
    }
}

/// What the blow-up guard found wrong with a step. Either way its update is not applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Alarm {
    /// One batch far out of line with the recent ones: skip it and go on.
    Outlier(String),
    /// The run is diverging (NaN/inf, or a sustained rise): `train.blowup.action` decides.
    Divergence(String),
}

impl Alarm {
    pub fn why(&self) -> &str {
        match self {
            Alarm::Outlier(why) | Alarm::Divergence(why) => why,
        }
    }
}

/// Watches the loss and gradient norm of every step before its update is applied.
#[derive(Debug, Clone)]
pub struct BlowupGuard {
    spec: BlowupSpec,
    losses: VecDeque<f64>,
    grad_norms: VecDeque<f64>,
    /// The lowest windowed mean loss seen.
    lowest_mean: f64,
}

/// Steps of history before a single-step spike can be called.
const MIN_SPIKE_HISTORY: usize = 5;
/// MAD × this estimates the standard deviation of normally distributed values.
const MAD_TO_SIGMA: f64 = 1.4826;

fn mean(v: &VecDeque<f64>) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut sorted: Vec<f64> = values.collect();
    if sorted.is_empty() {
        return 0.0;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        0.5 * (sorted[mid - 1] + sorted[mid])
    }
}

impl BlowupGuard {
    pub fn new(spec: BlowupSpec) -> Self {
        Self { spec, losses: VecDeque::new(), grad_norms: VecDeque::new(), lowest_mean: f64::INFINITY }
    }

    /// None if the step looks healthy (and it joins the window); otherwise what is wrong,
    /// with the likely cause. An alarming step stays out of the window.
    pub fn check(&mut self, loss: f64, grad_norm: f64, lr: f32) -> Option<Alarm> {
        if self.spec.action == lockstep_proto::toolbox::BlowupAction::Off {
            return None;
        }
        let alarm = if !loss.is_finite() || !grad_norm.is_finite() {
            Some(Alarm::Divergence(format!("the loss is {loss} (gradient norm {grad_norm:.3e})")))
        } else {
            self.spike(loss).map(Alarm::Outlier).or_else(|| self.rise().map(Alarm::Divergence))
        };
        if let Some(alarm) = alarm {
            let cause = self.cause(grad_norm, lr);
            return Some(match alarm {
                Alarm::Outlier(what) => Alarm::Outlier(format!("{what}; likely cause: {cause}")),
                Alarm::Divergence(what) => Alarm::Divergence(format!("{what}; likely cause: {cause}")),
            });
        }
        self.record(loss, grad_norm);
        None
    }

    /// A single loss far above the recent ones: over `factor` × their median, and above it
    /// by more than `spread` robust standard deviations and by more than `min_jump`.
    fn spike(&self, loss: f64) -> Option<String> {
        if self.losses.len() < self.spec.window.min(MIN_SPIKE_HISTORY) {
            return None;
        }
        let center = median(self.losses.iter().copied());
        let sigma = MAD_TO_SIGMA * median(self.losses.iter().map(|l| (l - center).abs()));
        let margin = (self.spec.spread * sigma).max(self.spec.min_jump);
        (loss > self.spec.factor * center && loss - center > margin).then(|| {
            format!(
                "the loss jumped to {loss:.4}, over {}× the median of the last {} steps ({center:.4}, robust std {sigma:.4})",
                self.spec.factor,
                self.losses.len()
            )
        })
    }

    /// A sustained rise: the windowed mean `factor` × and `min_jump` over its lowest.
    fn rise(&self) -> Option<String> {
        let w = self.spec.window;
        let window_mean = mean(&self.losses);
        let risen =
            window_mean > self.spec.factor * self.lowest_mean && window_mean - self.lowest_mean > self.spec.min_jump;
        (self.losses.len() >= w && risen).then(|| {
            format!(
                "the loss is rising: its mean over the last {w} steps is {window_mean:.4}, {:.1}× its lowest ({:.4})",
                window_mean / self.lowest_mean,
                self.lowest_mean
            )
        })
    }

    fn record(&mut self, loss: f64, grad_norm: f64) {
        self.losses.push_back(loss);
        self.grad_norms.push_back(grad_norm);
        if self.losses.len() > self.spec.window {
            self.losses.pop_front();
            self.grad_norms.pop_front();
        }
        if self.losses.len() >= self.spec.window {
            self.lowest_mean = self.lowest_mean.min(mean(&self.losses));
        }
    }

    fn cause(&self, grad_norm: f64, lr: f32) -> String {
        let typical = mean(&self.grad_norms);
        if !grad_norm.is_finite() || (!self.grad_norms.is_empty() && grad_norm > self.spec.factor * typical) {
            format!(
                "exploding gradients (norm {grad_norm:.3e}, typically {typical:.3e}): set optim.clip_norm, lower optim.lr or add warmup"
            )
        } else {
            format!("the learning rate ({lr:e}) is too high: lower optim.lr or add schedule.warmup_steps")
        }
    }
}

/// EMA of the weights (T23): v_t = β·v_{t−1} + (1 − β)·θ_t from v_0 = 0, read with the bias
/// correction v_t / (1 − β^t). Kept on the backend, one buffer per parameter.
pub struct Ema<B: Backend> {
    pub decay: f64,
    pub updates: u64,
    pub shadow: Vec<B::Buf>,
}

impl<B: Backend> Ema<B> {
    pub fn new(be: &B, decay: f64, params: &[&Param<B>]) -> Result<Self> {
        let shadow = params.iter().map(|p| be.zeros(p.numel())).collect::<std::result::Result<_, _>>()?;
        Ok(Self { decay, updates: 0, shadow })
    }

    pub fn update(&mut self, be: &B, params: &[&mut Param<B>]) -> Result<()> {
        for (v, p) in self.shadow.iter_mut().zip(params) {
            be.scale(v, self.decay as f32)?;
            be.axpy((1.0 - self.decay) as f32, &p.value, v)?;
        }
        self.updates += 1;
        Ok(())
    }

    /// The bias-corrected averages, v_t / (1 − β^t), in parameter order.
    pub fn corrected(&self, be: &B) -> Result<Vec<B::Buf>> {
        let correction = 1.0 - self.decay.powi(self.updates.min(i32::MAX as u64) as i32);
        self.shadow
            .iter()
            .map(|v| {
                let mut out = be.zeros(be.len(v))?;
                be.copy(v, &mut out)?;
                if correction > 0.0 {
                    be.scale(&mut out, (1.0 / correction) as f32)?;
                }
                Ok(out)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_kernels::CpuBackend;
    use lockstep_proto::toolbox::BlowupAction;

    #[test]
    fn loss_scale_halves_on_overflow_and_doubles_after_good_steps() {
        let mut s = LossScaler::new(1024.0, 3);
        assert!(!s.update(false));
        assert_eq!(s.scale, 512.0);
        assert!(s.update(true) && s.update(true));
        assert_eq!(s.scale, 512.0);
        assert!(s.update(true));
        assert_eq!(s.scale, 1024.0, "doubled after 3 good steps");
        let mut floor = LossScaler::new(1.0, 100);
        assert!(floor.update(false), "at scale 1 the step goes to the blow-up guard");
    }

    fn guard(action: BlowupAction) -> BlowupGuard {
        BlowupGuard::new(BlowupSpec { action, window: 5, factor: 4.0, max_skips: 3, ..BlowupSpec::default() })
    }

    #[test]
    fn nan_spike_and_rise_are_caught_with_a_cause() {
        let mut g = guard(BlowupAction::Stop);
        for l in [2.3, 2.2, 2.1, 2.0, 1.9] {
            assert_eq!(g.check(l, 1.0, 0.1), None);
        }
        let nan = g.check(f64::NAN, f64::NAN, 0.1).unwrap();
        assert!(matches!(nan, Alarm::Divergence(_)), "{nan:?}");
        assert!(nan.why().contains("NaN") && nan.why().contains("exploding gradients"), "{nan:?}");
        let spike = g.check(40.0, 1.1, 0.1).unwrap();
        assert!(matches!(spike, Alarm::Outlier(_)), "{spike:?}");
        assert!(spike.why().contains("jumped") && spike.why().contains("learning rate"), "{spike:?}");
        let spike_big_grad = g.check(40.0, 50.0, 0.1).unwrap();
        assert!(spike_big_grad.why().contains("exploding"), "{spike_big_grad:?}");
        // A slow climb: no single step is an outlier, but the mean ends 4x its lowest.
        let mut caught = None;
        let mut loss = 1.9;
        for _ in 0..60 {
            loss *= 1.1;
            if let Some(alarm) = g.check(loss, 1.0, 0.1) {
                caught = Some(alarm);
                break;
            }
        }
        let alarm = caught.expect("a 4-fold rise is caught");
        assert!(matches!(alarm, Alarm::Divergence(_)) && alarm.why().contains("rising"), "{alarm:?}");
        assert!(guard(BlowupAction::Off).check(f64::NAN, 0.0, 0.1).is_none());
    }

    #[test]
    fn a_noisy_batch_of_a_converged_model_is_no_alarm() {
        // The shipped mnist-cnn run that the old guard stopped: losses near 0.006, then 0.0757.
        let mut g = BlowupGuard::new(BlowupSpec::default());
        for step in 0..50 {
            let loss = 0.006 + 0.004 * ((step as f64 * 1.7).sin());
            assert_eq!(g.check(loss, 0.5, 1e-3), None);
        }
        assert_eq!(g.check(0.0757, 2.0, 1e-3), None, "12x the median, but only 0.07 above it");
        // A real jump of a converged model still is one.
        assert!(matches!(g.check(3.5, 40.0, 1e-3), Some(Alarm::Outlier(_))));
        // A rise of the mean from 0.006 to 0.03 is noise, not a divergence.
        for step in 0..200 {
            let loss = 0.03 + 0.01 * ((step as f64 * 0.9).sin());
            assert_eq!(g.check(loss, 0.5, 1e-3), None, "step {step}");
        }
    }

    #[test]
    fn a_jump_is_judged_against_the_spread_of_recent_losses() {
        let spec = BlowupSpec { min_jump: 0.0, ..BlowupSpec::default() };
        // Widely spread losses (1..9): 40 is 4x their median and within 6 robust sigmas.
        let mut wide = BlowupGuard::new(spec.clone());
        for step in 0..50 {
            assert_eq!(wide.check(1.0 + (step % 9) as f64, 1.0, 1e-3), None);
        }
        assert_eq!(wide.check(21.0, 1.0, 1e-3), None, "4.2x the median, 2.5 robust sigmas");
        // Tight losses around 5: the same 21 is far out.
        let mut tight = BlowupGuard::new(spec);
        for step in 0..50 {
            assert_eq!(tight.check(5.0 + 0.01 * (step % 3) as f64, 1.0, 1e-3), None);
        }
        assert!(matches!(tight.check(21.0, 1.0, 1e-3), Some(Alarm::Outlier(_))));
    }

    #[test]
    fn ema_matches_the_closed_form_with_bias_correction() {
        let be = CpuBackend::new(1);
        let mut p = Param::new(&be, "w", &[2], &[0.0, 0.0], true).unwrap();
        let mut ema = Ema::new(&be, 0.9, &[&p]).unwrap();
        let thetas = [[1.0f32, -2.0], [3.0, 0.5], [2.0, 4.0]];
        for t in &thetas {
            p.value = t.to_vec();
            ema.update(&be, &[&mut p]).unwrap();
        }
        // v3 = 0.1·(0.81·θ1 + 0.9·θ2 + θ3); corrected by 1/(1 − 0.9³).
        let corrected = ema.corrected(&be).unwrap();
        for (i, &got) in corrected[0].iter().enumerate() {
            let v = 0.1 * (0.81 * thetas[0][i] as f64 + 0.9 * thetas[1][i] as f64 + thetas[2][i] as f64);
            let want = v / (1.0 - 0.9f64.powi(3));
            let got = got as f64;
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        // Constant weights: the corrected EMA is those weights from the first step on.
        let mut c = Param::new(&be, "c", &[1], &[5.0], true).unwrap();
        let mut ema = Ema::new(&be, 0.999, &[&c]).unwrap();
        for _ in 0..3 {
            ema.update(&be, &[&mut c]).unwrap();
            assert!((ema.corrected(&be).unwrap()[0][0] - 5.0).abs() < 1e-4);
        }
    }
}
