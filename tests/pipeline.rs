//! Pipeline model parallelism (T42) through `lockstep local`: real worker processes, the
//! QUIC data plane between stages, the placement checked and printed before any worker
//! starts.

mod common;

use common::{bin, run, small_mnist, stderr, summary, temp_dir};
use std::collections::BTreeMap;
use std::path::Path;

/// A small GPT on Tiny Shakespeare: 4 blocks, dropout on, clipping on, 24 steps.
fn small_gpt() -> Vec<String> {
    [
        "model.dim=32",
        "model.context=32",
        "model.dropout=0.1",
        "train.max_steps=24",
        "train.log_every=4",
        "train.eval_every=0",
        "train.batch_size=16",
        "data.val_fraction=0.01",
        "parallel.micro_batches=4",
    ]
    .iter()
    .flat_map(|s| ["--set".to_string(), s.to_string()])
    .collect()
}

fn train_losses(dir: &Path) -> BTreeMap<u64, f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

fn local(dir: &Path, workers: usize, extra: &[&str]) -> std::process::Output {
    let mut cmd = bin();
    cmd.args(["local", "--quiet", "--workers", &workers.to_string(), "configs/shakespeare-gpt.toml", "--out"])
        .arg(dir)
        .args(small_gpt());
    for s in extra {
        cmd.args(["--set", s]);
    }
    run(&mut cmd)
}

#[test]
fn pipelined_gpt_follows_the_unpipelined_loss_on_2_and_4_processes() {
    let root = temp_dir("pipeline");
    let reference = root.join("p1");
    assert!(local(&reference, 1, &[]).status.success());
    let want = train_losses(&reference);
    assert_eq!(want.len(), 6);
    let cases: [(&str, usize, &[&str]); 4] = [
        ("p2-gpipe", 2, &["parallel.pipeline_stages=2"]),
        // An explicit placement (a different split from the balanced one) and 1F1B.
        (
            "p2-explicit-1f1b",
            2,
            &[
                "parallel.pipeline_stages=2",
                "parallel.schedule=\"1f1b\"",
                "parallel.placement=[[\"tok_emb\",\"pos_emb\",\"drop_emb\",\"h0\"],[\"h1\",\"h2\",\"h3\",\"ln_f\",\"head\"]]",
            ],
        ),
        ("p2-d2-1f1b", 4, &["parallel.pipeline_stages=2", "parallel.schedule=\"1f1b\""]),
        // On one host the links are shared memory; this keeps the QUIC links tested too.
        ("p2-d2-quic", 4, &["parallel.pipeline_stages=2", "collective.transport=\"quic\""]),
    ];
    for (name, workers, sets) in cases {
        let dir = root.join(name);
        let out = local(&dir, workers, sets);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let got = train_losses(&dir);
        let worst = want.iter().map(|(k, w)| (got[k] - w).abs() / w.abs()).fold(0.0, f64::max);
        eprintln!("{name}: largest relative loss difference over {} logged steps: {worst:.2e}", want.len());
        assert!(worst < 1e-5, "{name}: {got:?} vs {want:?}");
        let s = summary(&dir);
        let stages = s["pipeline_stages"].as_array().unwrap();
        assert_eq!(stages.len(), workers, "a report per rank");
        assert_eq!(s["params"], summary(&reference)["params"], "the stages hold the whole model");
        assert!(dir.join("model.safetensors").is_file(), "stage weights merged");
        assert!(dir.join("checkpoints/stage-1").is_dir(), "checkpoints hold every stage");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("placement") && stdout.contains("FLOPs/example"), "the placement is printed: {stdout}");
    }
    // 1F1B keeps fewer micro-batches in flight than GPipe on the first stage (4 vs 2).
    let in_flight = |name: &str| summary(&root.join(name))["pipeline_stages"][0]["peak_in_flight"].as_u64().unwrap();
    assert_eq!((in_flight("p2-gpipe"), in_flight("p2-explicit-1f1b")), (4, 2));
}

#[test]
fn bad_placements_are_errors_before_any_worker_starts() {
    let root = temp_dir("pipeline-bad");
    let cases: [(&str, usize, &[&str]); 5] = [
        ("but the model has only 9 layers", 16, &["parallel.pipeline_stages=16"]),
        ("does not divide", 3, &["parallel.pipeline_stages=2"]),
        (
            "\"h1\" is missing",
            2,
            &["parallel.pipeline_stages=2", "parallel.placement=[[\"tok_emb\",\"pos_emb\",\"drop_emb\",\"h0\"],[\"h2\",\"h3\",\"ln_f\",\"head\"]]"],
        ),
        (
            "\"h0\" is listed twice",
            2,
            &["parallel.pipeline_stages=2", "parallel.placement=[[\"tok_emb\",\"pos_emb\",\"drop_emb\",\"h0\"],[\"h0\",\"h1\",\"h2\",\"h3\",\"ln_f\",\"head\"]]"],
        ),
        ("no layer named \"h9\"", 2, &["parallel.pipeline_stages=2", "parallel.placement=[[\"h9\"],[\"head\"]]"]),
    ];
    // A model with BatchNorm cannot be pipelined (the recompute would update its statistics twice).
    let dir = root.join("batch-norm");
    let out = run(bin()
        .args(["local", "--quiet", "--workers", "2", "configs/mnist-cnn.toml", "--out"])
        .arg(&dir)
        .args(["--set", "parallel.pipeline_stages=2", "--set", "train.max_steps=1"])
        .args(["--set", "model.layers=[{type=\"flatten\"},{type=\"batch_norm\"},{type=\"linear\",out=10}]"]));
    assert!(!out.status.success() && stderr(&out).contains("do not support BatchNorm"), "{}", stderr(&out));
    assert!(!dir.join("worker-0.log").exists());
    for (i, (message, workers, sets)) in cases.into_iter().enumerate() {
        let dir = root.join(format!("case-{i}"));
        let out = local(&dir, workers, sets);
        assert!(!out.status.success(), "{message}");
        assert!(stderr(&out).contains(message), "want {message:?} in: {}", stderr(&out));
        assert!(!dir.join("worker-0.log").exists(), "{message}: a worker was started");
    }
}

#[test]
fn a_pipeline_resumes_every_stage_from_its_checkpoint_bit_for_bit() {
    let root = temp_dir("pipeline-resume");
    let full = root.join("full");
    let sets = ["parallel.pipeline_stages=2", "parallel.schedule=\"1f1b\"", "train.checkpoint_every=12"];
    assert!(local(&full, 2, &sets).status.success());
    // A run stopped after step 12: only the step-12 checkpoints of both stages survive.
    let stopped = root.join("stopped");
    for s in 0..2 {
        let dir = stopped.join(format!("checkpoints/stage-{s}"));
        std::fs::create_dir_all(&dir).unwrap();
        let name = "step-00000012.safetensors";
        std::fs::copy(full.join(format!("checkpoints/stage-{s}/{name}")), dir.join(name)).unwrap();
    }
    let resumed = root.join("resumed");
    let mut cmd = bin();
    cmd.args(["local", "--quiet", "--workers", "2", "configs/shakespeare-gpt.toml", "--resume"])
        .arg(&stopped)
        .arg("--out")
        .arg(&resumed)
        .args(small_gpt());
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = run(&mut cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let (a, b) = (train_losses(&full), train_losses(&resumed));
    assert_eq!(b.keys().copied().collect::<Vec<_>>(), [16, 20, 24], "the resumed run starts after step 12");
    for step in [16, 20, 24] {
        assert_eq!(a[&step].to_bits(), b[&step].to_bits(), "step {step}: {} vs {}", a[&step], b[&step]);
    }
    assert_eq!(summary(&full)["rank_weight_hashes"], summary(&resumed)["rank_weight_hashes"], "every stage's weights");
}

#[test]
fn a_pipelined_classifier_reports_the_same_class_metrics() {
    let root = temp_dir("pipeline-classes");
    let run_mlp = |name: &str, workers: usize, stages: usize| {
        let dir = root.join(name);
        let out = run(bin()
            .args(["local", "--quiet", "--workers", &workers.to_string(), "configs/mnist-mlp.toml", "--out"])
            .arg(&dir)
            .args(small_mnist(512, 1))
            .args(["--set", &format!("parallel.pipeline_stages={stages}")]));
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        summary(&dir)
    };
    let plain = run_mlp("plain", 1, 1);
    let piped = run_mlp("p2", 2, 2);
    let confusion = &piped["test_metrics"]["confusion"];
    assert!(confusion.is_array(), "the pipelined summary has the class metrics: {piped}");
    assert_eq!(confusion, &plain["test_metrics"]["confusion"]);
    assert_eq!(piped["test_accuracy"], plain["test_accuracy"]);
    let macro_f1 = |s: &serde_json::Value| s["test_metrics"]["macro_f1"].as_f64().unwrap();
    assert!((macro_f1(&piped) - macro_f1(&plain)).abs() < 1e-12);
}
