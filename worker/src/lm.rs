//! Language models from a job spec (T30): the text dataset and the GPT / recurrent stacks.

use crate::{Result, WorkerError};
use lockstep_kernels::Backend;
use lockstep_nn::data::text::{split_text, BpeTokenizer, CharTokenizer, TextNormalization, TokenWindows, Tokenizer};
use lockstep_nn::data::Examples;
use lockstep_nn::init::{normal, xavier_uniform};
use lockstep_nn::layers::{
    AttentionConfig, BlockConfig, BlockWeights, Cell, Dropout, Embedding, LayerNorm, Linear, MlpKind, NormKind,
    NormOrder, PositionalEncoding, Recurrent, TransformerBlock,
};
use lockstep_nn::{Layer, Sequential};
use lockstep_proto::job::{
    BlockMlp, BlockNorm, CellKind, JobSpec, ModelSpec, NormOrderKind, PositionalKind, TokenizerKind,
};

/// GPT-2's init scale.
const INIT_STD: f32 = 0.02;

/// The tokenizer and the train / validation windows of a `text` dataset. A character
/// vocabulary is fitted on the whole (normalised) file so both splits encode; BPE merges
/// are learned on the training split only (any text encodes at the byte level). The split
/// is at the same character for both, and the tokenizer is saved with the model.
pub fn load_text(spec: &JobSpec) -> Result<(TokenWindows, TokenWindows, Tokenizer)> {
    let path = spec.data.dir.join(&spec.data.file);
    let raw =
        std::fs::read(&path).map_err(|source| WorkerError::Io { what: "data: reading", path: path.clone(), source })?;
    let raw = String::from_utf8(raw).map_err(|e| {
        WorkerError::Config(format!(
            "data: {} is not UTF-8 (byte offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })?;
    let text = TextNormalization { half_width: spec.data.half_width, lowercase: spec.data.lowercase }.apply(&raw);
    let (train_text, val_text) = split_text(&text, 1.0 - spec.data.val_fraction);
    let (train_chars, val_chars) = (train_text.chars().count(), val_text.chars().count());
    let tokenizer = match (spec.data.tokenizer, &spec.data.tokenizer_file) {
        (TokenizerKind::Char, _) => Tokenizer::Char(CharTokenizer::fit(&text)),
        (TokenizerKind::Bpe, Some(file)) => {
            let json = std::fs::read_to_string(file).map_err(|source| WorkerError::Io {
                what: "data.tokenizer_file: reading",
                path: file.clone(),
                source,
            })?;
            Tokenizer::Bpe(BpeTokenizer::from_json(&json, file)?)
        }
        (TokenizerKind::Bpe, None) => Tokenizer::Bpe(BpeTokenizer::train(train_text, spec.data.vocab_size)?),
    };
    let (train, val) = (tokenizer.encode(train_text)?, tokenizer.encode(val_text)?);
    tracing::info!(
        "text {}: {} characters; {} training / {} validation tokens ({:.3} / {:.3} characters per token)",
        path.display(),
        train_chars + val_chars,
        train.len(),
        val.len(),
        train_chars as f64 / train.len().max(1) as f64,
        val_chars as f64 / val.len().max(1) as f64,
    );
    let context = spec.model.context;
    let mut train = TokenWindows::full(train, tokenizer.vocab_size(), context, spec.data.stride);
    let mut val = TokenWindows::tiled(val, tokenizer.vocab_size(), context);
    // Limits count windows, as for images they count examples.
    if spec.data.train_limit > 0 {
        train.tokens.truncate(spec.data.train_limit * spec.data.stride + context);
    }
    if spec.data.test_limit > 0 {
        val.tokens.truncate(spec.data.test_limit * context + 1);
    }
    if train.is_empty() || val.is_empty() {
        return Err(WorkerError::Config(format!(
            "data: {} has {} training and {} validation tokens, too few for model.context = {context}",
            path.display(),
            train.tokens.len(),
            val.tokens.len()
        )));
    }
    Ok((train, val, tokenizer))
}

/// Decoder-only transformer: tok_emb + pos_emb → dropout → blocks h0..h{L-1} → ln_f → head.
/// Input (N, T) token ids, output (N, T, vocab) logits. With `positional = "rope"` there is
/// no pos_emb (attention rotates Q and K instead); `norm`, `mlp` and `bias` choose the
/// LLaMA-style parts.
pub fn build_gpt<B: Backend>(be: &B, spec: &JobSpec, vocab: usize) -> Result<Sequential<B>> {
    let m = &spec.model;
    let (d, seed) = (m.dim, spec.seed);
    let mut layers: Vec<Box<dyn Layer<B>>> = Vec::new();
    layers.push(Box::new(Embedding::new(
        be,
        "tok_emb",
        vocab,
        d,
        &normal(seed, "tok_emb.weight", vocab * d, INIT_STD),
    )?));
    let pos_emb = |table| -> Result<Box<dyn Layer<B>>> {
        let w = normal(seed, "pos_emb.weight", m.context * d, INIT_STD);
        Ok(Box::new(match table {
            PositionalKind::Learned => PositionalEncoding::learned(be, "pos_emb", m.context, d, &w)?,
            _ => PositionalEncoding::sinusoidal("pos_emb", m.context, d),
        }))
    };
    if m.positional != PositionalKind::Rope {
        layers.push(pos_emb(m.positional)?);
    }
    if m.dropout > 0.0 {
        layers.push(Box::new(Dropout::new("drop_emb", m.dropout, 0)));
    }
    let config = block_config(m);
    for i in 0..m.blocks {
        layers.push(Box::new(gpt_block(be, spec, &config, i)?));
    }
    if config.order == NormOrder::PreLn {
        // Post-LN blocks already end normalised.
        layers.push(match config.norm {
            NormKind::LayerNorm => Box::new(LayerNorm::new(be, "ln_f", d)?),
            NormKind::RmsNorm => Box::new(LayerNorm::rms(be, "ln_f", d)?),
        });
    }
    let head = normal(seed, "head.weight", vocab * d, INIT_STD);
    layers.push(Box::new(Linear::with_bias(be, "head", d, vocab, &head, m.bias)?));
    Ok(Sequential::new(layers))
}

/// The GPT blocks' shape from the job's model keys.
fn block_config(m: &ModelSpec) -> BlockConfig {
    let rope = (m.positional == PositionalKind::Rope).then_some(m.rope_base);
    let attention = AttentionConfig { rope, bias: m.bias, ..AttentionConfig::gpt(m.dim, m.heads, true, m.context) };
    let order = match m.norm_order {
        NormOrderKind::PreLn => NormOrder::PreLn,
        NormOrderKind::PostLn => NormOrder::PostLn,
    };
    let norm = match m.norm {
        BlockNorm::LayerNorm => NormKind::LayerNorm,
        BlockNorm::RmsNorm => NormKind::RmsNorm,
    };
    let mlp = match m.mlp {
        BlockMlp::Gelu => MlpKind::Gelu,
        BlockMlp::Swiglu => MlpKind::SwiGlu,
    };
    BlockConfig { attention, order, norm, mlp, hidden: m.mlp_width() }
}

/// Block `i`, its weights drawn from streams named after them. Residual projections are
/// scaled so the residual stream's variance does not grow with depth (GPT-2).
fn gpt_block<B: Backend>(be: &B, spec: &JobSpec, config: &BlockConfig, i: usize) -> Result<TransformerBlock<B>> {
    let (d, h, seed) = (spec.model.dim, config.hidden, spec.seed);
    let residual_std = INIT_STD / (2.0 * spec.model.blocks as f32).sqrt();
    let name = format!("h{i}");
    let w = |part: &str, len: usize, std: f32| normal(seed, &format!("{name}.{part}.weight"), len, std);
    let (qkv, attn_out) = (w("attn.qkv", 3 * d * d, INIT_STD), w("attn.out", d * d, residual_std));
    let (fc1, fc2, gate) = match config.mlp {
        MlpKind::Gelu => (w("fc1", h * d, INIT_STD), w("fc2", d * h, residual_std), Vec::new()),
        MlpKind::SwiGlu => {
            (w("mlp.up", h * d, INIT_STD), w("mlp.down", d * h, residual_std), w("mlp.gate", h * d, INIT_STD))
        }
    };
    let weights = BlockWeights { qkv: &qkv, attn_out: &attn_out, fc1: &fc1, fc2: &fc2, gate: &gate };
    Ok(TransformerBlock::new(be, &name, *config, weights)?)
}

/// Recurrent language model: tok_emb → `blocks` LSTM/GRU layers rnn0.. (dropout between)
/// → head. Input (N, T) token ids, output (N, T, vocab) logits.
pub fn build_rnn<B: Backend>(be: &B, spec: &JobSpec, vocab: usize) -> Result<Sequential<B>> {
    let m = &spec.model;
    let (d, seed) = (m.dim, spec.seed);
    let cell = match m.cell {
        CellKind::Lstm => Cell::Lstm,
        CellKind::Gru => Cell::Gru,
    };
    let gh = cell.gates() * d;
    let mut layers: Vec<Box<dyn Layer<B>>> = Vec::new();
    layers.push(Box::new(Embedding::new(be, "tok_emb", vocab, d, &normal(seed, "tok_emb.weight", vocab * d, 1.0))?));
    for i in 0..m.blocks {
        let name = format!("rnn{i}");
        let w_ih = xavier_uniform(seed, &format!("{name}.weight_ih"), d, gh);
        let w_hh = xavier_uniform(seed, &format!("{name}.weight_hh"), d, gh);
        layers.push(Box::new(Recurrent::new(be, &name, cell, d, d, m.context, &w_ih, &w_hh)?));
        if m.dropout > 0.0 {
            layers.push(Box::new(Dropout::new(&format!("drop{i}"), m.dropout, i as u64 + 1)));
        }
    }
    layers.push(Box::new(Linear::new(be, "head", d, vocab, &xavier_uniform(seed, "head.weight", d, vocab))?));
    Ok(Sequential::new(layers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_kernels::{CpuBackend, IGNORE_TARGET};
    use lockstep_nn::loss::softmax_cross_entropy;
    use lockstep_nn::{ForwardCtx, Tensor};

    fn tiny_gpt(be: &CpuBackend, order: &str) -> Sequential<CpuBackend> {
        let job = format!(
            "name = 't'\n[model]\nkind = 'gpt'\ncontext = 6\ndim = 8\nheads = 2\nblocks = 2\nnorm_order = '{order}'\n\
             [data]\nkind = 'text'\ndir = '.'\n[train]\nepochs = 1\nbatch_size = 2\n[optim]\nkind = 'adamw'\nlr = 0.01\n"
        );
        let spec = JobSpec::parse(&job, std::path::Path::new("t.toml"), &[]).unwrap();
        build_gpt(be, &spec, 7).unwrap()
    }

    #[test]
    fn gpt_logits_at_t_ignore_tokens_after_t() {
        let be = CpuBackend::new(1);
        for order in ["pre_ln", "post_ln"] {
            let mut gpt = tiny_gpt(&be, order);
            let tokens = [3., 1., 4., 1., 5., 6.];
            let logits = |gpt: &mut Sequential<CpuBackend>, x: &[f32]| {
                gpt.forward(&be, Tensor::from_slice(&be, &[1, 6], x).unwrap(), &ForwardCtx::default()).unwrap().buf
            };
            let base = logits(&mut gpt, &tokens);
            for t in 0..5 {
                let mut changed = tokens;
                changed[t + 1..].iter_mut().for_each(|v| *v = (*v + 2.0) % 7.0);
                let other = logits(&mut gpt, &changed);
                assert_eq!(base[..(t + 1) * 7], other[..(t + 1) * 7], "{order}: position {t} saw a later token");
                assert_ne!(base[(t + 1) * 7..], other[(t + 1) * 7..]);
            }
        }
    }

    #[test]
    fn gpt_padding_changes_neither_loss_nor_any_gradient() {
        let be = CpuBackend::new(1);
        let mut gpt = tiny_gpt(&be, "pre_ln");
        // Two sequences, the second padded after 3 tokens; its padded targets are ignored.
        let targets = [1, 4, 1, 5, 6, 2, 5, 2, 6, IGNORE_TARGET, IGNORE_TARGET, IGNORE_TARGET];
        let run = |gpt: &mut Sequential<CpuBackend>, pad: f32| {
            let x = [3., 1., 4., 1., 5., 6., 0., 5., 2., pad, pad, pad];
            let ctx = ForwardCtx { train: true, seq_lens: vec![6, 3], example_ids: vec![0, 1], ..Default::default() };
            gpt.zero_grad(&be).unwrap();
            let logits = gpt.forward(&be, Tensor::from_slice(&be, &[2, 6], &x).unwrap(), &ctx).unwrap();
            let out = softmax_cross_entropy(&be, &logits, &targets, None, 1.0).unwrap();
            gpt.backward(&be, out.grad).unwrap();
            let grads: Vec<Vec<f32>> = gpt.params().iter().map(|p| p.grad.clone()).collect();
            (out.loss_sum, grads)
        };
        let (loss_a, grads_a) = run(&mut gpt, 0.0);
        let (loss_b, grads_b) = run(&mut gpt, 6.0);
        assert_eq!(loss_a, loss_b, "padding changed the loss");
        for ((a, b), p) in grads_a.iter().zip(&grads_b).zip(gpt.params()) {
            assert_eq!(a, b, "padding changed the gradient of {}", p.name);
        }
        assert!(grads_a.iter().flatten().any(|&g| g != 0.0));
    }
}
