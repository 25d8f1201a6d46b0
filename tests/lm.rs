//! Language models end to end: the GPT and LSTM configs train, `lockstep sample` reads the
//! model file back, and data-parallel GPT matches one process.

mod common;
use common::*;
use std::path::Path;

/// A tiny GPT on Tiny Shakespeare: 1 block of width 32, context 16, 24 steps.
fn tiny_gpt() -> Vec<&'static str> {
    vec![
        "--set",
        "model.dim=32",
        "--set",
        "model.heads=2",
        "--set",
        "model.blocks=1",
        "--set",
        "model.context=16",
        "--set",
        "train.batch_size=16",
        "--set",
        "train.max_steps=24",
        "--set",
        "train.log_every=4",
        "--set",
        "train.eval_every=0",
        "--set",
        "data.test_limit=64",
        "--set",
        "schedule.warmup_steps=4",
    ]
}

fn train_loss(dir: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().expect("loss"))
        .collect()
}

fn sample(model: &Path, extra: &[&str]) -> std::process::Output {
    run(bin().arg("sample").arg(model).args(["--tokens", "40", "--seed", "7"]).args(extra))
}

#[test]
fn gpt_trains_samples_and_two_workers_match_one_process() {
    let single = temp_dir("gpt-single");
    let out =
        run(bin().args(["train", "configs/shakespeare-gpt.toml", "--quiet", "--out"]).arg(&single).args(tiny_gpt()));
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&single);
    let losses = train_loss(&single);
    // Starts near ln 65 = 4.17 (uniform over the vocabulary) and falls.
    assert!((losses[0] - 65f64.ln()).abs() < 0.6, "first loss {}", losses[0]);
    assert!(losses.last().unwrap() < &(losses[0] - 0.5), "loss did not fall: {losses:?}");
    assert!(s["test_loss"].as_f64().unwrap() < 3.6, "validation loss {}", s["test_loss"]);

    // Sampling: the prompt, then exactly 40 characters, the same for the same seed.
    let model = single.join("model.safetensors");
    let a = sample(&model, &["--prompt", "ROMEO:"]);
    assert!(a.status.success(), "{}", stderr(&a));
    let text = String::from_utf8(a.stdout.clone()).expect("utf-8");
    assert!(text.starts_with("ROMEO:"), "{text:?}");
    assert_eq!(text.trim_end_matches('\n').chars().count(), "ROMEO:".len() + 40, "{text:?}");
    assert_eq!(sample(&model, &["--prompt", "ROMEO:"]).stdout, a.stdout, "same seed, different text");
    let greedy = sample(&model, &["--prompt", "ROMEO:", "--temperature", "0"]);
    assert!(greedy.status.success());
    // A character outside the vocabulary is a clear error, not a panic.
    let bad = sample(&model, &["--prompt", "ROMEO§"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("'§' at position 5"), "{}", stderr(&bad));

    // Data parallel: the per-target mean over the global batch makes 2 workers equal 1.
    let dp = temp_dir("gpt-dp");
    let out = run(bin()
        .args(["local", "--workers", "2", "configs/shakespeare-gpt.toml", "--quiet", "--out"])
        .arg(&dp)
        .args(tiny_gpt()));
    assert!(out.status.success(), "{}", stderr(&out));
    let a = lockstep_nn::checkpoint::load_tensors(&model).unwrap();
    let b = lockstep_nn::checkpoint::load_tensors(&dp.join("model.safetensors")).unwrap();
    let (mut worst, mut worst_name) = (0f64, String::new());
    for (name, (_, want)) in &a {
        if name.ends_with("attn.qkv.bias") {
            // Its key third has a true gradient of exactly 0 (q·b_k shifts a whole softmax
            // row), so Adam turns rounding noise there into full-size steps.
            continue;
        }
        let got = &b[name].1;
        let diff: f64 = got.iter().zip(want).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = want.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
        if diff / norm.max(1e-30) > worst {
            (worst, worst_name) = (diff / norm.max(1e-30), name.clone());
        }
    }
    println!("GPT, 2 workers vs 1 process: max per-tensor relative diff {worst:.3e} ({worst_name})");
    assert!(worst < 1e-5, "2 workers differ from 1 process by {worst:e} ({worst_name})");
}

#[test]
fn lstm_and_gru_language_models_train() {
    for cell in ["lstm", "gru"] {
        let dir = temp_dir(&format!("rnn-{cell}"));
        let out = run(bin()
            .args(["train", "configs/shakespeare-lstm.toml", "--quiet", "--out"])
            .arg(&dir)
            .args(["--set", &format!("model.cell={cell}"), "--set", "model.dim=48", "--set", "model.context=16"])
            .args(["--set", "train.max_steps=40", "--set", "train.log_every=5", "--set", "train.eval_every=0"])
            .args(["--set", "schedule.warmup_steps=5", "--set", "optim.lr=0.01"])
            .args(["--set", "data.test_limit=64", "--set", "train.batch_size=16"]));
        assert!(out.status.success(), "{cell}: {}", stderr(&out));
        let losses = train_loss(&dir);
        assert!(losses.last().unwrap() < &(losses[0] - 0.5), "{cell}: loss did not fall: {losses:?}");
    }
}

/// The LLaMA-style config (RMSNorm, RoPE, SwiGLU, no biases) trains, its model file has no
/// bias or position table, and sampling 200 characters (context 16: many context shifts)
/// prints the same text with and without the KV cache.
#[test]
fn llama_trains_and_samples_the_same_text_with_and_without_the_kv_cache() {
    let dir = temp_dir("llama");
    let out =
        run(bin().args(["train", "configs/shakespeare-llama.toml", "--quiet", "--out"]).arg(&dir).args(tiny_gpt()));
    assert!(out.status.success(), "{}", stderr(&out));
    let losses = train_loss(&dir);
    assert!(losses.last().unwrap() < &(losses[0] - 0.5), "loss did not fall: {losses:?}");
    let model = dir.join("model.safetensors");
    let tensors = lockstep_nn::checkpoint::load_tensors(&model).unwrap();
    assert!(tensors.keys().all(|n| !n.ends_with(".bias") && !n.starts_with("pos_emb")), "{:?}", tensors.keys());
    assert!(tensors.contains_key("h0.mlp.gate.weight"));
    let long = |extra: &[&str]| {
        let args = ["--tokens", "200", "--seed", "3", "--prompt", "KING:"];
        run(bin().env("RUST_LOG", "info").arg("sample").arg(&model).args(args).args(extra))
    };
    let (cached, full) = (long(&[]), long(&["--no-kv-cache"]));
    assert!(cached.status.success() && full.status.success(), "{}{}", stderr(&cached), stderr(&full));
    assert_eq!(String::from_utf8_lossy(&cached.stdout), String::from_utf8_lossy(&full.stdout));
    assert!(stderr(&cached).contains("KV cache on") && stderr(&full).contains("KV cache off"));
}

/// Byte-level BPE (T30): the merges are learned on the training split and saved in the
/// model file, which `sample` and `eval` read back; the prompt may hold characters the
/// training text never had.
#[test]
fn a_bpe_gpt_trains_saves_its_tokenizer_and_samples() {
    let dir = temp_dir("bpe");
    let sets = ["--set", "data.tokenizer=bpe", "--set", "data.vocab_size=300"];
    let out = run(bin()
        .args(["train", "configs/shakespeare-gpt.toml", "--quiet", "--out"])
        .arg(&dir)
        .args(tiny_gpt())
        .args(sets));
    assert!(out.status.success(), "{}", stderr(&out));
    let model = dir.join("model.safetensors");
    let meta = lockstep_nn::checkpoint::load_metadata(&model).unwrap();
    assert!(meta.contains_key("lockstep.tokenizer") && !meta.contains_key("lockstep.vocab"), "{:?}", meta.keys());
    let tensors = lockstep_nn::checkpoint::load_tensors(&model).unwrap();
    assert_eq!(tensors["tok_emb.weight"].0, vec![300, 32], "vocabulary size");
    let a = sample(&model, &["--prompt", "ROMEO§ 🦀"]);
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(String::from_utf8(a.stdout).unwrap().starts_with("ROMEO§ 🦀"));
    let eval = run(bin().arg("eval").arg(&model).arg("--json"));
    assert!(eval.status.success(), "{}", stderr(&eval));
}
