//! `lockstep eval`: the numbers of a trained model's test split equal the training
//! summary's, for model files, checkpoints, a CNN and a language model; bad inputs fail
//! with errors that name what is wrong.

mod common;
use common::*;
use std::path::Path;

fn eval_json(target: &Path, extra: &[&str]) -> serde_json::Value {
    let out = run(bin().arg("eval").arg(target).args(extra).arg("--json"));
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("eval --json prints JSON")
}

fn eval_error(target: &Path, extra: &[&str]) -> String {
    let out = run(bin().arg("eval").arg(target).args(extra));
    assert!(!out.status.success(), "eval should fail: {}", String::from_utf8_lossy(&out.stdout));
    stderr(&out)
}

fn train(config: &str, dir: &Path, args: &[String]) {
    let out = run(bin().args(["train", config, "--quiet", "--out"]).arg(dir).args(args));
    assert!(out.status.success(), "{}", stderr(&out));
}

/// An IDX split of `n` blank `side`×`side` images labelled 0..10 in turn.
fn write_idx_split(dir: &Path, prefix: &str, n: u32, side: u32) {
    let mut images = vec![0u8, 0, 8, 3];
    for d in [n, side, side] {
        images.extend(d.to_be_bytes());
    }
    images.extend(vec![7u8; (n * side * side) as usize]);
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
    let mut labels = vec![0u8, 0, 8, 1];
    labels.extend(n.to_be_bytes());
    labels.extend((0..n).map(|i| (i % 10) as u8));
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
}

#[test]
fn eval_of_a_classifier_equals_its_training_summary() {
    let dir = temp_dir("eval-mlp");
    train("configs/mnist-mlp.toml", &dir, &small_mnist(1536, 1));
    let s = summary(&dir);
    for target in [dir.clone(), dir.join("model.safetensors"), dir.join("checkpoints")] {
        let report = eval_json(&target, &[]);
        assert_eq!(report["loss"], s["test_loss"], "{}", target.display());
        assert_eq!(report["accuracy"], s["test_accuracy"], "{}", target.display());
        assert_eq!(report["examples"], 1000);
        let confusion = report["classes"]["confusion"].as_array().unwrap();
        let total: u64 = confusion.iter().flat_map(|r| r.as_array().unwrap()).map(|v| v.as_u64().unwrap()).sum();
        assert_eq!((confusion.len(), total), (10, 1000));
        assert_eq!(report["classes"]["macro_f1"], s["test_metrics"]["macro_f1"]);
    }
    let table = run(bin().arg("eval").arg(&dir));
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("precision") && table.contains("confusion") && table.contains("macro"), "{table}");

    // A model that does not fit the data: 4x4 images for a 784-input MLP.
    let small = temp_dir("eval-4x4");
    write_idx_split(&small, "train", 20, 4);
    write_idx_split(&small, "t10k", 10, 4);
    let err = eval_error(&dir, &["--data", small.to_str().unwrap()]);
    assert!(err.contains("fc0.weight") && err.contains("16 input features"), "{err}");
    // A missing split.
    std::fs::remove_file(small.join("t10k-images-idx3-ubyte")).unwrap();
    let err = eval_error(&dir, &["--data", small.to_str().unwrap()]);
    assert!(err.contains("t10k-images-idx3-ubyte"), "{err}");
    // No model there, and a file lockstep did not write.
    let err = eval_error(&small.join("nothing.safetensors"), &[]);
    assert!(err.contains("nothing.safetensors") && err.contains("no such model file"), "{err}");
    let foreign = small.join("foreign.safetensors");
    let header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}  "#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    bytes.extend(1.0f32.to_le_bytes());
    std::fs::write(&foreign, bytes).unwrap();
    let err = eval_error(&foreign, &[]);
    assert!(err.contains("not written by lockstep"), "{err}");
    let err = eval_error(&dir.join("job.toml"), &[]);
    assert!(err.contains("job.toml") && err.contains("not a valid safetensors"), "{err}");
}

#[test]
fn eval_of_a_cnn_and_a_language_model_equals_training() {
    let cnn = temp_dir("eval-cnn");
    train("configs/mnist-cnn.toml", &cnn, &small_mnist(512, 1));
    let report = eval_json(&cnn, &[]);
    let s = summary(&cnn);
    assert_eq!((&report["loss"], &report["accuracy"]), (&s["test_loss"], &s["test_accuracy"]));

    let gpt = temp_dir("eval-gpt");
    let sets = ["train.max_steps=6", "train.eval_every=0", "model.dim=32", "model.blocks=1", "data.val_fraction=0.01"];
    let args: Vec<String> = sets.iter().flat_map(|s| ["--set".to_string(), s.to_string()]).collect();
    train("configs/shakespeare-gpt.toml", &gpt, &args);
    let report = eval_json(&gpt, &[]);
    let s = summary(&gpt);
    assert_eq!(report["loss"], s["test_loss"]);
    let perplexity = report["perplexity"].as_f64().unwrap();
    assert!((perplexity - s["test_loss"].as_f64().unwrap().exp()).abs() < 1e-9, "{report}");
    assert!(report["classes"].is_null());
    // Another text has another vocabulary: refused, not evaluated with the wrong ids.
    let other = temp_dir("eval-other-text");
    std::fs::write(other.join("input.txt"), "xyz ".repeat(5000)).unwrap();
    let err = eval_error(&gpt, &["--data", other.to_str().unwrap()]);
    assert!(err.contains("vocabulary"), "{err}");
}
