//! Autoregressive sampling from a language model: temperature and top-k, drawn from the
//! (seed, "sample", position) stream so a seed reproduces a sample exactly.
//!
//! The model sees a window of at most `context` tokens. When a new token would overflow it,
//! the window restarts at the last `context / 2` tokens (a context shift, as llama.cpp
//! does) rather than sliding by one: with a KV cache a slide would invalidate every cached
//! key (all positions move), while a shift costs one prefill of half a window per
//! `context / 2` tokens. Both modes use the same windows, so they sample the same text.

use crate::model_file::LoadedModel;
use crate::{Result, WorkerError};
use lockstep_kernels::Backend;
use lockstep_nn::rng::Stream;
use lockstep_nn::{ForwardCtx, Tensor};
use lockstep_proto::job::ModelKind;

#[derive(Debug, Clone, Copy)]
pub struct SampleOptions {
    pub tokens: usize,
    /// Logits are divided by it; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
    /// GPT models keep each layer's keys and values, so a new token costs one position's
    /// forward (O(context) attention) instead of the whole window's.
    pub kv_cache: bool,
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

/// Continues `prompt` by `opts.tokens` tokens, calling `emit` with each new character.
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
    let kv_cache = opts.kv_cache && loaded.spec.model.kind == ModelKind::Gpt;
    let mut start = ids.len().saturating_sub(context); // the window is ids[start..]
    let mut cached = 0; // positions of the window the KV cache holds
    let mut pending = Vec::new(); // tokens not yet printed
    let mut out = String::new();
    for position in 0..opts.tokens {
        if ids.len() - start > context {
            (start, cached) = (ids.len() - (context / 2).max(1), 0); // context shift
        }
        let window = &ids[start..];
        let (x, from) = match kv_cache {
            true => (&window[cached..], Some(cached)),
            false => (window, None),
        };
        let ctx = ForwardCtx { train: false, decode_from: from, ..Default::default() };
        let x_ids: Vec<f32> = x.iter().map(|&i| i as f32).collect();
        let logits = loaded.model.forward(be, Tensor::from_slice(be, &[1, x.len()], &x_ids)?, &ctx)?;
        let logits = logits.to_vec(be)?; // (1, new, vocab)
        let last = &logits[(x.len() - 1) * classes..x.len() * classes];
        cached = window.len();
        let mut stream = Stream::new(opts.seed, "sample", &[position as u64]);
        let next = pick(last, opts, &mut stream);
        ids.push(next);
        pending.push(next);
        let text = vocab.decode(&pending);
        // A byte-level token may end inside a character: wait for the rest of it (at most
        // 4 bytes, so 4 tokens), then emit the whole character.
        if !text.ends_with('\u{FFFD}') || pending.len() >= 4 || position + 1 == opts.tokens {
            out.push_str(&text);
            text.chars().for_each(&mut *emit);
            pending.clear();
        }
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
        let greedy = SampleOptions { tokens: 1, temperature: 0.0, top_k: 0, seed: 1, kv_cache: false };
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

    /// A GPT-2 block stack and a LLaMA one, neither trained: sampling 40 characters past a
    /// context of 8 (five context shifts) gives the same text with and without the KV cache.
    #[test]
    fn kv_cache_samples_the_same_text() {
        use lockstep_kernels::CpuBackend;
        use lockstep_nn::data::text::{CharTokenizer, Tokenizer};
        use lockstep_proto::job::JobSpec;
        let be = CpuBackend::new(1);
        let llama = "positional = 'rope'\nnorm = 'rmsnorm'\nmlp = 'swiglu'\nbias = false\n";
        for extra in ["", llama] {
            let job = format!(
                "name = 't'\n[model]\nkind = 'gpt'\ncontext = 8\ndim = 16\nheads = 2\nblocks = 2\n{extra}\
                 [data]\nkind = 'text'\ndir = '.'\n[train]\nepochs = 1\nbatch_size = 2\n[optim]\nkind = 'adamw'\nlr = 0.01\n"
            );
            let spec = JobSpec::parse(&job, std::path::Path::new("t.toml"), &[]).unwrap();
            let vocab = Tokenizer::Char(CharTokenizer::fit("abcdefghij \n"));
            let model = crate::lm::build_gpt(&be, &spec, vocab.vocab_size()).unwrap();
            let mut loaded = LoadedModel { spec, model, vocab: Some(vocab) };
            let mut sample = |kv_cache| {
                let opts = SampleOptions { tokens: 40, temperature: 1.0, top_k: 0, seed: 5, kv_cache };
                generate(&be, &mut loaded, "abc", &opts, &mut |_| {}).unwrap()
            };
            let (with, without) = (sample(true), sample(false));
            assert_eq!(with.chars().count(), 40);
            assert_eq!(with, without, "{extra}");
            assert!(with.chars().collect::<std::collections::HashSet<_>>().len() > 3, "{with:?}");
        }
    }
}
