//! Autoregressive sampling from a language model: temperature and top-k, drawn from the
//! (seed, "sample", position) stream so a seed reproduces a sample exactly.

use crate::model_file::LoadedModel;
use crate::{Result, WorkerError};
use lockstep_kernels::Backend;
use lockstep_nn::rng::Stream;
use lockstep_nn::{ForwardCtx, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct SampleOptions {
    pub tokens: usize,
    /// Logits are divided by it; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
}

/// Picks the next token from one row of logits.
pub fn pick(logits: &[f32], opts: &SampleOptions, stream: &mut Stream) -> u32 {
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    // Most likely first; ties by id, so the order is total and reproducible.
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    if opts.temperature <= 0.0 {
        return order[0];
    }
    let k = if opts.top_k == 0 { order.len() } else { opts.top_k.min(order.len()) };
    let kept = &order[..k];
    let max = logits[kept[0] as usize];
    let weights: Vec<f64> =
        kept.iter().map(|&i| (((logits[i as usize] - max) / opts.temperature) as f64).exp()).collect();
    let mut u = stream.uniform() as f64 * weights.iter().sum::<f64>();
    for (&id, w) in kept.iter().zip(&weights) {
        if u < *w {
            return id;
        }
        u -= w;
    }
    kept[k - 1]
}

/// Continues `prompt` by `opts.tokens` characters, calling `emit` with each new one.
pub fn generate<B: Backend>(
    be: &B,
    loaded: &mut LoadedModel<B>,
    prompt: &str,
    opts: &SampleOptions,
    emit: &mut dyn FnMut(char),
) -> Result<String> {
    let vocab = loaded.vocab.as_ref().ok_or_else(|| WorkerError::Config("the model has no vocabulary".into()))?;
    let mut ids = vocab.encode(prompt).map_err(|e| WorkerError::Config(format!("--prompt: {e}")))?;
    if ids.is_empty() {
        return Err(WorkerError::Config("--prompt must not be empty".into()));
    }
    let (context, classes) = (loaded.spec.model.context, vocab.vocab_size());
    let ctx = ForwardCtx { train: false, ..Default::default() };
    let mut out = String::new();
    for position in 0..opts.tokens {
        let window = &ids[ids.len().saturating_sub(context)..]; // the last `context` tokens
        let x: Vec<f32> = window.iter().map(|&i| i as f32).collect();
        let logits = loaded.model.forward(be, Tensor::from_slice(be, &[1, window.len()], &x)?, &ctx)?;
        let logits = logits.to_vec(be)?;
        let last = &logits[(window.len() - 1) * classes..window.len() * classes];
        let mut stream = Stream::new(opts.seed, "sample", &[position as u64]);
        let next = pick(last, opts, &mut stream);
        ids.push(next);
        let c = vocab.decode(&[next]);
        out.push_str(&c);
        c.chars().for_each(&mut *emit);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_and_temperature() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut s = Stream::new(1, "sample", &[0]);
        let greedy = SampleOptions { tokens: 1, temperature: 0.0, top_k: 0, seed: 1 };
        assert_eq!(pick(&logits, &greedy, &mut s), 1);
        // top-k = 2 never picks tokens 0 or 3, and picks both 1 and 2 over many draws.
        let top2 = SampleOptions { temperature: 1.0, top_k: 2, ..greedy };
        let mut seen = [0usize; 4];
        for i in 0..2000 {
            seen[pick(&logits, &top2, &mut Stream::new(7, "sample", &[i])) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[3], 0);
        // p(1)/p(2) = e^0.1 ≈ 1.105: token 1 is drawn about 52.5% of the time.
        let share = seen[1] as f64 / 2000.0;
        assert!((share - 0.525).abs() < 0.04, "{share}");
        // A very low temperature is greedy in effect.
        let cold = SampleOptions { temperature: 1e-3, top_k: 0, ..greedy };
        assert!((0..100).all(|i| pick(&logits, &cold, &mut Stream::new(3, "sample", &[i])) == 1));
    }
}
