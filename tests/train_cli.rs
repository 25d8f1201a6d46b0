//! `lockstep train` end to end: a real process, the shipped data, the run directory.

mod common;
use common::*;
use sha2::{Digest, Sha256};

#[test]
fn shipped_data_matches_sha256sums() {
    let data = repo().join("data");
    let sums = std::fs::read_to_string(data.join("SHA256SUMS")).expect("data/SHA256SUMS");
    let mut checked = 0;
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (want, name) = line.split_once("  ").expect("sha256sum line format");
        let bytes = std::fs::read(data.join(name)).unwrap_or_else(|e| panic!("data/{name}: {e}"));
        let got = format!("{:x}", Sha256::digest(&bytes));
        assert_eq!(got, want, "data/{name} does not match SHA256SUMS");
        checked += 1;
    }
    assert_eq!(checked, 5);
}

#[test]
fn train_writes_metrics_and_summary_and_learns() {
    let out_dir = temp_dir("train-learns");
    let out = run(bin()
        .args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"])
        .arg(&out_dir)
        .args(small_mnist(6000, 2)));
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = summary(&out_dir);
    assert_eq!(summary["steps"], 2 * (6000 / 128));
    assert_eq!(summary["params"], 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10);
    let acc = summary["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.85, "2 epochs on 6000 examples should pass 85% (chance is 10%), got {acc}");
    for key in ["wall_s", "examples_per_s", "test_loss"] {
        assert!(summary[key].as_f64().unwrap() > 0.0, "{key}");
    }
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let train: Vec<_> = lines.iter().filter(|l| l["kind"] == "train").collect();
    let eval: Vec<_> = lines.iter().filter(|l| l["kind"] == "eval").collect();
    assert_eq!(eval.len(), 2);
    assert_eq!(eval[1]["split"], "test");
    assert!(train.len() >= 18);
    for key in ["step", "epoch", "loss", "lr", "grad_norm", "examples_per_s"] {
        assert!(train[0].get(key).is_some(), "train line lacks {key}");
    }
    let first = train[0]["loss"].as_f64().unwrap();
    let last = train.last().unwrap()["loss"].as_f64().unwrap();
    assert!(last < first / 3.0, "loss should fall: {first} -> {last}");
}

#[test]
fn same_seed_is_bitwise_identical_and_seed_matters() {
    let hash = |name: &str, seed: u64| {
        let dir = temp_dir(name);
        let mut args = small_mnist(1024, 1);
        args.extend(["--set".into(), format!("seed={seed}")]);
        let out = run(bin().args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"]).arg(&dir).args(args));
        assert!(out.status.success(), "{}", stderr(&out));
        summary(&dir)["weight_hash"].as_str().unwrap().to_string()
    };
    let a = hash("seed-a", 7);
    let b = hash("seed-b", 7);
    let c = hash("seed-c", 8);
    assert_eq!(a, b, "same seed must give bitwise-identical weights");
    assert_ne!(a, c, "a different seed must give different weights");
}

#[test]
fn bad_configs_fail_cleanly_naming_the_problem() {
    let dir = temp_dir("bad-configs");
    let good = std::fs::read_to_string(repo().join("configs/mnist-mlp.toml")).unwrap();
    let cases = [
        (good.replace("epochs = 15", "epochs = 15\nepocs = 3"), "epocs"),
        (good.replace("batch_size = 128", "batch_size = \"big\""), "line"),
        (good.replace("lr = 0.001", "lr = -0.5"), "`optim.lr`"),
        (good.replace("dropout = 0.2", "dropout = 1.5"), "`model.dropout`"),
        (good.replace("kind = \"adamw\"", "kind = \"adamx\""), "adamx"),
        ("name = \"x\"\n[model\n".to_string(), "TOML parse error"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = run(bin().args(["train", "--quiet"]).arg(&path));
        assert!(!out.status.success(), "case {i} should fail");
        let err = stderr(&out);
        assert!(
            err.contains(needle) && err.contains(&format!("bad{i}.toml")),
            "case {i}: expected {needle:?} in:\n{err}"
        );
    }
    let out = run(bin().args(["train", "/nonexistent/job.toml"]));
    assert!(!out.status.success() && stderr(&out).contains("/nonexistent/job.toml"));
    let out = run(bin().args(["train", "configs/mnist-mlp.toml", "--set", "optim.nope=1"]));
    assert!(!out.status.success() && stderr(&out).contains("nope"));
}

#[test]
fn bad_data_files_fail_cleanly_naming_file_and_offset() {
    let src = repo().join("data/mnist");
    let copy_dataset = |name: &str| {
        let dir = temp_dir(name);
        for f in std::fs::read_dir(&src).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
        }
        dir
    };
    let train = |dir: &std::path::Path| {
        let out = run(bin()
            .args(["train", "configs/mnist-mlp.toml", "--quiet", "--set"])
            .arg(format!("data.dir={}", dir.display())));
        assert!(!out.status.success());
        stderr(&out)
    };

    // Truncated gzip.
    let dir = copy_dataset("truncated-gz");
    let labels = dir.join("t10k-labels-idx1-ubyte.gz");
    let bytes = std::fs::read(&labels).unwrap();
    std::fs::write(&labels, &bytes[..bytes.len() / 2]).unwrap();
    let err = train(&dir);
    assert!(err.contains("t10k-labels-idx1-ubyte.gz") && err.contains("byte offset"), "{err}");

    // Valid gzip of a truncated IDX payload.
    let dir = copy_dataset("truncated-idx");
    let labels = dir.join("t10k-labels-idx1-ubyte.gz");
    std::fs::remove_file(&labels).unwrap();
    let mut idx = vec![0u8, 0, 8, 1, 0, 0, 0x27, 0x10]; // 10000 labels declared
    idx.extend(vec![1u8; 500]);
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), &idx).unwrap();
    let err = train(&dir);
    assert!(err.contains("t10k-labels-idx1-ubyte: byte offset 508: truncated"), "{err}");

    // Wrong magic.
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), b"PK\x03\x04garbage").unwrap();
    let err = train(&dir);
    assert!(err.contains("byte offset 0: not an IDX file"), "{err}");

    // Missing directory.
    let err = train(std::path::Path::new("/nonexistent/mnist"));
    assert!(err.contains("/nonexistent/mnist"), "{err}");
}

#[test]
fn cnn_config_trains_and_reports_receptive_fields() {
    let dir = temp_dir("cnn");
    let mut cmd = bin();
    cmd.env("RUST_LOG", "info")
        .args(["train", "configs/mnist-cnn.toml", "--quiet", "--out"])
        .arg(&dir)
        .args(small_mnist(1536, 1));
    let out = run(&mut cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    // The layer table: the second conv sees a 14x14 patch of the input (5 + 1 + 4·2).
    assert!(
        err.lines().any(|l| l.contains("Conv2d") && l.contains("[14, 14, 64]") && l.trim_end().ends_with("14")),
        "{err}"
    );
    let s = summary(&dir);
    assert_eq!(s["params"], 857738);
    assert!(s["test_accuracy"].as_f64().unwrap() > 0.6, "{s}");
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["kind"] == "train")
        .map(|l| l["loss"].as_f64().unwrap())
        .collect();
    assert!(losses.last().unwrap() < &(losses[0] / 2.0), "loss should fall: {losses:?}");
}

#[test]
fn invalid_layer_lists_fail_before_training() {
    let dir = temp_dir("bad-layers");
    let good = std::fs::read_to_string(repo().join("configs/mnist-cnn.toml")).unwrap();
    let cases = [
        // A convolution after flatten has no image to slide over.
        (
            good.replace(
                "{ type = \"flatten\" },",
                "{ type = \"flatten\" },\n  { type = \"conv2d\", out_channels = 4, kernel = 3 },",
            ),
            "model.layers[7]",
        ),
        // 32 channels do not split into 3 groups.
        (
            good.replace(
                "out_channels = 64, kernel = 5, padding = 2",
                "out_channels = 64, kernel = 5, padding = 2, groups = 3",
            ),
            "groups",
        ),
        // The logits must match the 10 classes.
        (good.replace("{ type = \"linear\", out = 10 },", "{ type = \"linear\", out = 7 },"), "10 classes"),
        // input_shape must match the data's 784 features.
        (good.replace("input_shape = [28, 28, 1]", "input_shape = [28, 28, 3]"), "784 features"),
        (good.replace("{ type = \"relu\" },", "{ type = \"relux\" },"), "relux"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = run(bin().args(["train", "--quiet"]).arg(&path));
        assert!(!out.status.success(), "case {i} should fail");
        let err = stderr(&out);
        assert!(err.contains(needle), "case {i}: expected {needle:?} in:\n{err}");
    }
}

#[test]
fn stop_and_resume_equals_an_uninterrupted_run_bit_for_bit() {
    // 2 epochs of 8 steps: dropout, AdamW and a cosine schedule all depend on the step.
    let args = || {
        let mut a = small_mnist(1024, 2);
        a.extend(["--set".into(), "train.checkpoint_every=3".into()]);
        a
    };
    let whole = temp_dir("resume-whole");
    let out = run(bin().args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"]).arg(&whole).args(args()));
    assert!(out.status.success(), "{}", stderr(&out));

    let parts = temp_dir("resume-parts");
    // Stop inside the first epoch (step 5), then resume from the run directory.
    let out = run(bin()
        .args(["train", "configs/mnist-mlp.toml", "--quiet", "--stop-after", "5", "--out"])
        .arg(&parts)
        .args(args()));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(summary(&parts)["steps"], 5);
    let checkpoints: Vec<String> = std::fs::read_dir(parts.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(checkpoints.contains(&"step-00000005.safetensors".to_string()), "{checkpoints:?}");
    let out = run(bin()
        .args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"])
        .arg(&parts)
        .args(args())
        .arg("--resume")
        .arg(&parts));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(summary(&parts)["steps"], 16);
    assert_eq!(
        summary(&parts)["weight_hash"],
        summary(&whole)["weight_hash"],
        "resumed run differs from the uninterrupted one"
    );
    // Only the newest 3 checkpoints are kept (steps 12, 15 and the final 16).
    let mut kept: Vec<String> = std::fs::read_dir(parts.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    kept.sort();
    assert_eq!(kept, ["step-00000012.safetensors", "step-00000015.safetensors", "step-00000016.safetensors"]);

    // A bit-flipped or truncated checkpoint is refused, naming the file; nothing panics.
    let last = parts.join("checkpoints/step-00000016.safetensors");
    let mut bytes = std::fs::read(&last).unwrap();
    let middle = bytes.len() * 3 / 4;
    bytes[middle] ^= 0x04;
    std::fs::write(&last, &bytes).unwrap();
    let resume_last = || {
        run(bin()
            .args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"])
            .arg(&parts)
            .args(args())
            .arg("--resume")
            .arg(&last))
    };
    let out = resume_last();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("step-00000016.safetensors") && stderr(&out).contains("checksum"),
        "{}",
        stderr(&out)
    );
    bytes[middle] ^= 0x04;
    std::fs::write(&last, &bytes[..bytes.len() / 2]).unwrap();
    let out = run(bin()
        .args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"])
        .arg(&parts)
        .args(args())
        .arg("--resume")
        .arg(&last));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("step-00000016.safetensors"), "{}", stderr(&out));
}

#[test]
fn killing_the_trainer_while_it_writes_checkpoints_never_leaves_a_torn_one() {
    // A checkpoint every step, so a kill at any moment is likely inside a write; each time
    // the newest checkpoint left must load and resume.
    let dir = temp_dir("kill-while-writing");
    let args = || {
        let mut a = small_mnist(60000, 1);
        a.extend([
            "--set".into(),
            "train.checkpoint_every=1".into(),
            "--set".into(),
            "train.keep_checkpoints=2".into(),
        ]);
        a
    };
    for round in 0..4u64 {
        let mut cmd = bin();
        cmd.args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"]).arg(&dir).args(args());
        if round > 0 {
            cmd.arg("--resume").arg(&dir);
        }
        let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        let checkpoints = dir.join("checkpoints");
        let count = || std::fs::read_dir(&checkpoints).map(|d| d.count()).unwrap_or(0);
        let start = std::time::Instant::now();
        while count() < 2 {
            assert!(start.elapsed() < std::time::Duration::from_secs(120), "no checkpoints written");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // A different moment inside the write cycle each round.
        std::thread::sleep(std::time::Duration::from_millis(37 * round + 11));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // The newest complete checkpoint resumes for one more step.
        let out = run(bin()
            .args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"])
            .arg(&dir)
            .args(args())
            .args(["--resume"])
            .arg(&dir)
            .args(["--stop-after", "0"])); // one step, then stop
        let err = stderr(&out);
        assert!(!err.contains("checksum") && !err.contains("not a valid safetensors"), "round {round}: {err}");
        assert!(out.status.success(), "round {round}: {err}");
        // Temporary files of killed writes are cleaned up by the next write.
        let leftovers: Vec<_> = std::fs::read_dir(&checkpoints)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "round {round}: {leftovers:?}");
    }
}
