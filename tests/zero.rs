//! ZeRO stages 1 and 2 (`parallel.zero`, T41) on real processes (`local --workers N`):
//! the weights of the unsharded run of the same world size, bit for bit; optimizer state
//! per rank 1/W of the whole; checkpoints that are the unsharded run's and resume on any
//! world size, sharded or not.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Trains mnist-mlp (AdamW, every step clipped, dropout) on `workers` workers with ZeRO `stage`,
/// in buckets of 1 MiB (four of them: the shards cut several buckets); returns the run
/// directory. `extra` adds `--set`s or a `--resume`.
fn train(name: &str, workers: usize, stage: u8, extra: &[&str]) -> PathBuf {
    let dir = temp_dir(&format!("zero-{name}"));
    let mut cmd = bin();
    match workers {
        1 => cmd.args(["train", "configs/mnist-mlp.toml"]),
        n => cmd.args(["local", "--workers", &n.to_string(), "--bucket-mb", "1", "configs/mnist-mlp.toml"]),
    };
    cmd.args(["--quiet", "--out"]).arg(&dir);
    // A clip bound under the gradient norm: every step is clipped, so the clip factor (from the
    // norm summed over shards) must come out as the unsharded run's.
    let sets = ["train.max_steps=100", "data.test_limit=500", "train.checkpoint_every=50", "optim.clip_norm=0.05"];
    for set in sets {
        cmd.args(["--set", set]);
    }
    cmd.args(["--set", &format!("parallel.zero={stage}")]).args(extra);
    let out = run(&mut cmd);
    assert!(out.status.success(), "{name}: {workers} workers, zero {stage}:\n{}", stderr(&out));
    dir
}

fn field(dir: &Path, key: &str) -> serde_json::Value {
    summary(dir)[key].clone()
}

/// Every tensor of checkpoint `step` of run `dir`: weights and optimizer moments.
fn checkpoint_tensors(dir: &Path, step: u64) -> lockstep_nn::checkpoint::TensorMap {
    let path = dir.join("checkpoints").join(format!("step-{step:08}.safetensors"));
    lockstep_nn::checkpoint::load_all(&path).expect("checkpoint loads").0
}

#[test]
fn zero_keeps_the_unsharded_weights_and_shards_the_optimizer_state() {
    for workers in [2, 4] {
        let plain = train(&format!("plain-{workers}"), workers, 0, &[]);
        let full_state = field(&plain, "optimizer_state_bytes").as_u64().expect("bytes");
        assert!(full_state > 5_000_000, "AdamW state of a 670k-parameter MLP: {full_state} bytes");
        for stage in [1, 2] {
            let sharded = train(&format!("z{stage}-{workers}"), workers, stage, &[]);
            assert_eq!(
                field(&sharded, "weight_hash"),
                field(&plain, "weight_hash"),
                "{workers} workers, zero {stage}: the weights after 100 steps differ from the unsharded run's"
            );
            let state = field(&sharded, "optimizer_state_bytes").as_u64().expect("bytes");
            let share = state as f64 / full_state as f64;
            assert!(
                (share - 1.0 / workers as f64).abs() < 0.01,
                "{workers} workers, zero {stage}: {share} of the state"
            );
            let _ = std::fs::remove_dir_all(&sharded);
        }
        let _ = std::fs::remove_dir_all(&plain);
    }
}

#[test]
fn a_zero_checkpoint_is_the_unsharded_one_and_resumes_on_one_and_three_workers() {
    let plain = train("ckpt-plain", 2, 0, &[]);
    let sharded = train("ckpt-z1", 2, 1, &[]);
    // The file a ZeRO-1 run writes holds the same weights and moments as the unsharded run's.
    let (a, b) = (checkpoint_tensors(&plain, 50), checkpoint_tensors(&sharded, 50));
    assert!(a.keys().any(|k| k.starts_with("optim.exp_avg_sq.")), "moments in the checkpoint: {:?}", a.keys());
    assert_eq!(a, b, "step-50 checkpoints of the unsharded and the ZeRO-1 run");
    let from_step_50 = |dir: &Path| dir.join("checkpoints").join(format!("step-{:08}.safetensors", 50));
    let resume = |dir: &Path| ["--resume".to_string(), from_step_50(dir).display().to_string()];
    // One worker (no shards), and three workers sharded or not, from either file.
    let single = train("resume-1", 1, 1, &resume(&sharded).each_ref().map(String::as_str));
    assert_eq!(field(&single, "steps"), 100);
    let three_sharded = train("resume-3-z1", 3, 1, &resume(&sharded).each_ref().map(String::as_str));
    let three_plain = train("resume-3-plain", 3, 0, &resume(&plain).each_ref().map(String::as_str));
    assert_eq!(field(&three_sharded, "steps"), 100);
    assert_eq!(
        field(&three_sharded, "weight_hash"),
        field(&three_plain, "weight_hash"),
        "resumed on 3 workers: ZeRO-1 from the ZeRO checkpoint vs unsharded from the unsharded one"
    );
    let accuracy = |dir: &Path| field(dir, "test_accuracy").as_f64().expect("accuracy");
    assert!(accuracy(&single) > 0.85 && accuracy(&three_sharded) > 0.85, "resumed runs still learn");
    for dir in [plain, sharded, single, three_sharded, three_plain] {
        let _ = std::fs::remove_dir_all(dir);
    }
}
