//! The blow-up guard (T36) against real loss traces: every shipped config's per-step
//! losses, recorded from real runs (`scripts/loss-trace.py`), replayed through the guard
//! with its default settings. A healthy run must raise no alarm; the same traces with a
//! divergence induced must be caught.

use lockstep_proto::toolbox::BlowupSpec;
use lockstep_worker::guards::{Alarm, BlowupGuard};
use std::path::PathBuf;

struct Trace {
    name: String,
    /// (loss, grad_norm) of each step, in order.
    steps: Vec<(f64, f64)>,
}

fn traces() -> Vec<Trace> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/loss_traces");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).expect("tests/loss_traces").map(|e| e.expect("dir entry").path()).collect();
    files.sort();
    files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("trace file");
            let steps = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| {
                    let mut fields = l.split_whitespace().map(|f| f.parse::<f64>().expect("a number"));
                    (fields.next().expect("loss"), fields.next().expect("grad_norm"))
                })
                .collect();
            Trace { name: path.file_stem().expect("name").to_string_lossy().into_owned(), steps }
        })
        .collect()
}

/// Replays `steps` through a default guard; the first alarm and its step.
fn replay(steps: &[(f64, f64)]) -> Option<(usize, Alarm)> {
    let mut guard = BlowupGuard::new(BlowupSpec::default());
    steps.iter().enumerate().find_map(|(i, &(loss, norm))| guard.check(loss, norm, 1e-3).map(|a| (i, a)))
}

/// Where a run under the default `action = "stop"` would stop: at a divergence, or at
/// more than `max_skips` outliers in a row (as `run.rs` does).
fn stop_step(steps: &[(f64, f64)]) -> Option<usize> {
    let spec = BlowupSpec::default();
    let mut guard = BlowupGuard::new(spec.clone());
    let mut in_row = 0;
    for (i, &(loss, norm)) in steps.iter().enumerate() {
        match guard.check(loss, norm, 1e-3) {
            None => in_row = 0,
            Some(Alarm::Divergence(_)) => return Some(i),
            Some(Alarm::Outlier(_)) => {
                in_row += 1;
                if in_row > spec.max_skips {
                    return Some(i);
                }
            }
        }
    }
    None
}

#[test]
fn every_shipped_config_has_traces_from_several_seeds() {
    let traces = traces();
    for config in ["mnist-mlp", "mnist-cnn", "shakespeare-gpt", "shakespeare-lstm"] {
        let seeds = traces.iter().filter(|t| t.name.starts_with(&format!("{config}-seed"))).count();
        assert!(seeds >= 2, "{config}: {seeds} recorded traces");
    }
}

#[test]
fn healthy_runs_raise_no_alarm() {
    let traces = traces();
    let mut steps = 0;
    for t in &traces {
        assert!(t.steps.len() >= 400, "{}: only {} steps", t.name, t.steps.len());
        if let Some((step, alarm)) = replay(&t.steps) {
            panic!("{}: false alarm at step {}: {alarm:?}", t.name, step + 1);
        }
        steps += t.steps.len();
    }
    eprintln!("{} traces, {steps} steps, no alarm", traces.len());
}

/// Divergences induced into every trace at several points: each must be caught, as a
/// divergence (NaN, a sustained rise) or as an outlier (one wild batch).
#[test]
fn induced_divergences_are_caught() {
    for t in traces() {
        let n = t.steps.len();
        for at in [n / 4, n / 2, n - 100] {
            let (loss, norm) = t.steps[at];
            let with = |tail: &dyn Fn(usize, f64, f64) -> (f64, f64)| {
                let mut steps = t.steps.clone();
                for (i, s) in steps.iter_mut().enumerate().skip(at) {
                    *s = tail(i - at, s.0, s.1);
                }
                replay(&steps)
            };
            // NaN loss: a divergence at that very step.
            let nan = with(&|k, l, g| if k == 0 { (f64::NAN, f64::NAN) } else { (l, g) });
            assert!(matches!(nan, Some((s, Alarm::Divergence(_))) if s == at), "{} NaN at {at}: {nan:?}", t.name);
            // One wild batch: 2.3 → 40 in the manner of a corrupted batch.
            let spike = with(&|k, l, g| if k == 0 { (10.0 * loss.max(2.3) + 10.0, 50.0 * norm) } else { (l, g) });
            assert!(matches!(spike, Some((s, Alarm::Outlier(_))) if s == at), "{} spike at {at}: {spike:?}", t.name);
            // Divergence by too high a learning rate: the loss grows 5% a step from here.
            let rise = with(&|k, l, g| ((l + 0.5) * 1.05f64.powi(k as i32), g * 1.05f64.powi(k as i32)));
            let (step, _) = rise.unwrap_or_else(|| panic!("{}: a 5%/step rise from {at} is not caught", t.name));
            assert!(step >= at && step < at + 100, "{}: rise from {at} caught at {step}", t.name);
            let mut rising = t.steps.clone();
            for (k, s) in rising.iter_mut().skip(at).enumerate() {
                *s = ((s.0 + 0.5) * 1.05f64.powi(k as i32), s.1);
            }
            let stop = stop_step(&rising).unwrap_or_else(|| panic!("{}: a run rising from {at} never stops", t.name));
            assert!(stop < at + 100, "{}: a run rising from {at} stops only at {stop}", t.name);
            // A single wild batch alone never stops the run.
            let mut one_spike = t.steps.clone();
            one_spike[at] = (10.0 * loss.max(2.3) + 10.0, norm);
            assert_eq!(stop_step(&one_spike), None, "{}: one outlier at {at} stopped the run", t.name);
        }
    }
}
