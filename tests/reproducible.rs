//! `train.reproducible = "any-world-size"`: one weight hash on 1, 2 and 4 workers (real
//! processes: `train`, then `local --workers N`), for an MLP with dropout and a 2-block GPT.

mod common;
use common::*;

/// The weight hash of `config` with `sets` after training on `workers` workers (1: `train`).
fn weight_hash(name: &str, config: &str, sets: &[&str], workers: usize) -> String {
    let dir = temp_dir(&format!("reproducible-{name}-{workers}"));
    let mut cmd = bin();
    match workers {
        1 => cmd.args(["train", config]),
        n => cmd.args(["local", "--workers", &n.to_string(), config]),
    };
    cmd.args(["--quiet", "--out"]).arg(&dir).args(["--set", "train.reproducible=\"any-world-size\""]);
    for set in sets {
        cmd.args(["--set", set]);
    }
    let out = run(&mut cmd);
    assert!(out.status.success(), "{name} on {workers} workers:\n{}", stderr(&out));
    let hash = summary(&dir)["weight_hash"].as_str().expect("weight_hash").to_string();
    let _ = std::fs::remove_dir_all(&dir);
    hash
}

fn same_bits_on_1_2_and_4_workers(name: &str, config: &str, sets: &[&str]) {
    let hashes: Vec<String> = [1, 2, 4].iter().map(|&w| weight_hash(name, config, sets, w)).collect();
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{name}: weight hashes on 1, 2, 4 workers: {hashes:?}");
}

#[test]
fn an_mlp_with_dropout_trains_to_the_same_bits_on_any_world_size() {
    let sets = ["model.dropout=0.1", "train.max_steps=50", "data.test_limit=500", "train.micro_shards=8"];
    same_bits_on_1_2_and_4_workers("mlp", "configs/mnist-mlp.toml", &sets);
}

#[test]
fn a_two_block_gpt_trains_to_the_same_bits_on_any_world_size() {
    let sets = [
        "model.blocks=2",
        "model.dim=64",
        "model.dropout=0.1",
        "train.max_steps=50",
        "train.eval_every=0",
        "data.test_limit=64",
        "train.batch_size=16",
    ];
    same_bits_on_1_2_and_4_workers("gpt", "configs/shakespeare-gpt.toml", &sets);
}
