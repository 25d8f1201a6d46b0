//! The training toolbox end to end through the binary: early stopping (T24), blow-up
//! detection (T36), the data/parameter warning (T35), cost accounting (T34), the
//! imbalanced binary task's metrics (T28, T32) and transfer learning with frozen layers and
//! LoRA on two workers (T37, T38).

mod common;

use common::{bin, run, small_mnist, stderr, summary, temp_dir};

fn sets(pairs: &[&str]) -> Vec<String> {
    pairs.iter().flat_map(|p| ["--set".to_string(), p.to_string()]).collect()
}

#[test]
fn early_stopping_keeps_the_best_model_and_stops_when_the_loss_rises() {
    let dir = temp_dir("early-stop");
    // 256 examples, a 670k-parameter MLP, no dropout, a high constant lr: it overfits and
    // the test loss turns up after a few epochs. The T35 warning fires on the way.
    let out = run(bin()
        .args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"])
        .arg(&dir)
        .args(small_mnist(256, 60))
        .args(sets(&[
            "model.dropout=0.0",
            "train.batch_size=64",
            "schedule.kind=\"constant\"",
            "schedule.warmup_steps=0",
            "optim.lr=0.003",
            "train.early_stop={metric=\"loss\",patience=3}",
        ])));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("per parameter, under the rule of thumb of 10"), "T35 warning: {}", stderr(&out));
    let s = summary(&dir);
    let (steps, best) = (s["steps"].as_u64().unwrap(), &s["best"]);
    assert!(best["stopped_early"].as_bool().unwrap(), "{s}");
    assert!(steps < 60 * 4, "stopped before the 240 planned steps: {steps}");
    let best_step = best["step"].as_u64().unwrap();
    assert_eq!(best_step + 3 * 4, steps, "3 evaluations (one per 4-step epoch) without improvement");
    assert!(s["test_loss"].as_f64().unwrap() > best["value"].as_f64().unwrap(), "the loss rose after the best");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("best/best.json")).unwrap()).unwrap();
    assert_eq!(meta["step"].as_u64(), Some(best_step));
    assert!(dir.join("best/model.safetensors").is_file());
    // Cost accounting in summary.json (T34): 3 × forward FLOPs, a positive peak and MFU.
    assert_eq!(s["train_flops_per_example"].as_u64(), s["flops_per_example"].as_u64().map(|f| 3 * f));
    assert!(s["peak_gflops"].as_f64().unwrap() > 0.0 && s["mfu"].as_f64().unwrap() > 0.0, "{s}");
}

#[test]
fn a_loss_blow_up_stops_the_run_with_a_diagnosis_and_keeps_the_weights() {
    let dir = temp_dir("blowup");
    let out = run(bin()
        .args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"])
        .arg(&dir)
        .args(small_mnist(2560, 3))
        .args(sets(&["optim.kind=\"sgd\"", "optim.lr=3.0", "optim.clip_norm=0.0", "schedule.warmup_steps=0"])));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("loss blow-up at step"), "{err}");
    assert!(
        err.contains("likely cause") && (err.contains("exploding gradients") || err.contains("learning rate")),
        "{err}"
    );
    // The weights before the bad update are in a checkpoint, readable and finite.
    let checkpoint = std::fs::read_dir(dir.join("checkpoints")).unwrap().next().expect("a checkpoint").unwrap().path();
    let tensors = lockstep_nn::checkpoint::load_tensors(&checkpoint).unwrap();
    assert!(tensors["fc0.weight"].1.iter().all(|v| v.is_finite()));
}

#[test]
fn imbalanced_binary_task_reports_f1_at_three_thresholds() {
    let dir = temp_dir("imbalanced");
    let out = run(bin().args(["train", "configs/mnist-imbalanced.toml", "--quiet", "--out"]).arg(&dir).args(sets(&[
        "data.train_limit=20000",
        "data.test_limit=4000",
        "train.epochs=1",
    ])));
    assert!(out.status.success(), "{}", stderr(&out));
    let m = &summary(&dir)["test_metrics"];
    let confusion: Vec<Vec<u64>> = serde_json::from_value(m["confusion"].clone()).unwrap();
    let (negatives, positives) = (confusion[0].iter().sum::<u64>(), confusion[1].iter().sum::<u64>());
    let ratio = negatives as f64 / positives as f64;
    assert!((19.0..21.5).contains(&ratio), "about 1:20: {negatives} vs {positives}");
    let b = &m["binary"];
    let prior = b["prior_threshold"].as_f64().unwrap();
    assert!((prior - 1.0 / 21.0).abs() < 0.005, "minority/(minority+majority) of the training split: {prior}");
    let best = b["best_f1"].as_f64().unwrap();
    for key in ["f1_at_half", "f1_at_prior"] {
        assert!(b[key].as_f64().unwrap() <= best + 1e-12, "{key} cannot beat the PR-curve optimum: {b}");
    }
    assert!(best > 0.8, "{b}");
    let f1_pos = m["f1"][1].as_f64().unwrap();
    assert!((f1_pos - b["f1_at_half"].as_f64().unwrap()).abs() < 0.01, "argmax = threshold 0.5: {m}");
}

#[test]
fn transfer_frozen_and_lora_move_fewer_bytes_and_lora_merges() {
    let dir = temp_dir("transfer");
    let out = run(std::process::Command::new("bash")
        .arg("scripts/transfer.sh")
        .arg(&dir)
        .args(sets(&[
            "data.train_limit=20000",
            "data.test_limit=2000",
            "train.epochs=1",
            "schedule.warmup_steps=5",
            "optim.lr=0.003",
        ]))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("LOCKSTEP", env!("CARGO_BIN_EXE_lockstep"))
        .env("RUST_LOG", "warn"));
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    let s = |mode: &str| summary(&dir.join(mode));
    let (frozen, lora, full) = (s("frozen"), s("lora"), s("full"));
    let field = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    assert!(field(&frozen, "trainable_params") < field(&lora, "trainable_params"));
    assert!(field(&lora, "trainable_params") < field(&full, "trainable_params") / 10);
    assert_eq!(field(&frozen, "allreduce_bytes_per_step"), 4 * field(&frozen, "trainable_params"));
    assert!(field(&lora, "allreduce_bytes_per_step") < field(&full, "allreduce_bytes_per_step") / 10);
    // 76 fine-tuning steps on 5 new classes (chance 20%); the full runs reach 97% / 94%.
    for v in [&frozen, &lora, &full] {
        assert!(v["test_accuracy"].as_f64().unwrap() > 0.6, "{v}");
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("merged 2 adapters"));
    assert!(dir.join("lora/merged.safetensors").is_file());
}
