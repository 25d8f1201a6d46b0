//! Elastic scale-up on real processes: a `local --workers 2` run with `train.max_workers =
//! 3` admits a third worker that joins mid-run, re-forms on 3 workers from a checkpoint and
//! ends with the accuracy of an uninterrupted run. Both run in the any-world-size mode, so
//! "the same accuracy" is exact whatever step the third worker arrives at: the same weights.

mod common;
use common::*;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);

const JOB: [&str; 6] =
    ["--set", "train.epochs=1", "--set", "train.log_every=10", "--set", "train.reproducible=\"any-world-size\""];

fn start_local(dir: &Path, extra: &[&str]) -> Child {
    bin()
        .args(["local", "--workers", "2", "configs/mnist-mlp.toml", "--quiet", "--out"])
        .arg(dir)
        .args(JOB)
        .args(extra)
        .env("RUST_LOG", "info") // coordinator.log then records the scale-up
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.with_extension("log")).expect("log file"))
        .spawn()
        .expect("start lockstep local")
}

#[test]
fn a_worker_that_joins_mid_run_is_admitted_and_the_run_ends_on_three() {
    let whole = temp_dir("scale-whole");
    let mut child = start_local(&whole, &[]);
    assert!(wait_exit(&mut child, LIMIT).success());
    let want = summary(&whole);

    let dir = temp_dir("scale-up");
    let mut child = start_local(&dir, &["--set", "train.max_workers=3"]);
    wait_for_step(&dir, 50, &mut child);
    let join = std::fs::read_to_string(dir.join("join")).expect("join address");
    let log = std::fs::File::create(dir.with_extension("third.log")).expect("log file");
    let mut third = bin()
        .args(["worker", "--once", "--join", join.trim(), "--token-file"])
        .arg(dir.join("token"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the third worker");
    let status = wait_exit(&mut child, LIMIT);
    let coordinator_log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default();
    assert!(status.success(), "local failed:\n{}", std::fs::read_to_string(dir.with_extension("log")).unwrap());
    assert!(wait_exit(&mut third, LIMIT).success(), "the third worker failed");
    assert!(coordinator_log.contains("scaling up from 2 to 3 workers"), "{coordinator_log}");
    let s = summary(&dir);
    assert_eq!(s["world_size"], 3, "the run ends on 3 workers");
    println!(
        "test accuracy: uninterrupted on 2 workers {}, scaled up to 3 {}",
        want["test_accuracy"], s["test_accuracy"]
    );
    assert_eq!(s["test_accuracy"], want["test_accuracy"]);
    assert_eq!(s["weight_hash"], want["weight_hash"], "the same weights as the uninterrupted run");
    let _ = std::fs::remove_dir_all(&whole);
    let _ = std::fs::remove_dir_all(&dir);
}
