//! T33: per-layer gradient norms and histograms of a logged step, and the warnings for
//! vanishing or exploding gradients.

use crate::{Result, Trainer};
use lockstep_kernels::Backend;
use lockstep_proto::{Histogram, LayerGradNorm};

/// A layer's name and the histogram of its gradient values.
pub(crate) type LayerHistogram = (String, Histogram);

/// T33 bounds on the first/last layer gradient-norm ratio beyond which a warning is logged.
const VANISHING_RATIO: f64 = 1e-3;
const EXPLODING_RATIO: f64 = 1e3;
const HISTOGRAM_BUCKETS: usize = 30;

/// T33: each layer's gradient L2 norm (its parameters together, named by the parameter
/// name up to the last dot) of the batch-mean gradient, and with `histograms` the
/// distribution of its gradient values. The gradients hold sums over `targets`.
pub(crate) fn layer_grad_stats<B: Backend>(
    trainer: &Trainer<B>,
    targets: f64,
    histograms: bool,
) -> Result<(Vec<LayerGradNorm>, Vec<LayerHistogram>)> {
    let mut layers: Vec<(String, Vec<f32>)> = Vec::new();
    for p in trainer.model.params().into_iter().filter(|p| p.trainable) {
        let layer = p.name.rsplit_once('.').map_or(p.name.as_str(), |(layer, _)| layer);
        let grad: Vec<f32> = trainer.be.download(&p.grad)?.iter().map(|g| (*g as f64 / targets) as f32).collect();
        match layers.last_mut() {
            Some((name, values)) if name == layer => values.extend(grad),
            _ => layers.push((layer.to_string(), grad)),
        }
    }
    let norms = layers
        .iter()
        .map(|(layer, g)| LayerGradNorm {
            layer: layer.clone(),
            norm: g.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt(),
        })
        .collect();
    let hists = if histograms {
        layers.iter().map(|(layer, g)| (layer.clone(), Histogram::of(g, HISTOGRAM_BUCKETS))).collect()
    } else {
        Vec::new()
    };
    Ok((norms, hists))
}

/// The first layer's gradient norm over the last layer's (T33), if both are non-zero.
pub fn grad_norm_ratio(norms: &[LayerGradNorm]) -> Option<f64> {
    let (first, last) = (norms.first()?.norm, norms.last()?.norm);
    (norms.len() >= 2 && first.is_finite() && last > 0.0).then(|| first / last)
}

pub(crate) fn warn_on_gradient_health(step: u64, norms: &[LayerGradNorm]) {
    let Some(ratio) = grad_norm_ratio(norms) else { return };
    let (first, last) = (&norms[0], &norms[norms.len() - 1]);
    if ratio < VANISHING_RATIO {
        tracing::warn!(
            "step {step}: vanishing gradients: {} has gradient norm {:.3e}, {:.1e} times the {:.3e} of {} \
             (deep sigmoid/tanh stacks, bad init or no normalization are the usual causes)",
            first.layer,
            first.norm,
            ratio,
            last.norm,
            last.layer
        );
    } else if ratio > EXPLODING_RATIO {
        tracing::warn!(
            "step {step}: exploding gradients: {} has gradient norm {:.3e}, {:.1e} times the {:.3e} of {} \
             (lower optim.lr, set optim.clip_norm, or check the init)",
            first.layer,
            first.norm,
            ratio,
            last.norm,
            last.layer
        );
    }
}
