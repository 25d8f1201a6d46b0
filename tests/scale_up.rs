//! Elastic scale-up on real processes: a `local --workers 2` run with `train.max_workers =
//! 3` admits a third worker that joins mid-run, re-forms on 3 workers from a checkpoint and
//! ends with the accuracy of an uninterrupted run.

mod common;
use common::*;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const JOB: [&str; 6] = ["--set", "train.epochs=2", "--set", "train.log_every=10", "--set", "data.test_limit=2000"];

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

/// The step of the newest `train` line in metrics.jsonl (0 before the first).
fn current_step(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0)
}

fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "{what} did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_worker_that_joins_mid_run_is_admitted_and_the_run_ends_on_three() {
    let whole = temp_dir("scale-whole");
    let mut child = start_local(&whole, &[]);
    assert!(wait_exit(&mut child, "the uninterrupted run").success());
    let want = summary(&whole)["test_accuracy"].as_f64().expect("accuracy");

    let dir = temp_dir("scale-up");
    let mut child = start_local(&dir, &["--set", "train.max_workers=3"]);
    let start = Instant::now();
    while current_step(&dir) < 50 {
        assert!(child.try_wait().expect("wait").is_none(), "the run ended before step 50");
        assert!(start.elapsed() < Duration::from_secs(120), "step 50 not reached");
        std::thread::sleep(Duration::from_millis(50));
    }
    let join = std::fs::read_to_string(dir.join("join")).expect("join address");
    let log = std::fs::File::create(dir.with_extension("third.log")).expect("log file");
    let mut third = bin()
        .args(["worker", "--once", "--join", join.trim(), "--token-file"])
        .arg(dir.join("token"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the third worker");
    let status = wait_exit(&mut child, "the scaled-up run");
    let coordinator_log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default();
    assert!(status.success(), "local failed:\n{}", std::fs::read_to_string(dir.with_extension("log")).unwrap());
    assert!(wait_exit(&mut third, "the third worker").success(), "the third worker failed");
    assert!(coordinator_log.contains("scaling up from 2 to 3 workers"), "{coordinator_log}");
    let s = summary(&dir);
    assert_eq!(s["world_size"], 3, "the run ends on 3 workers");
    let got = s["test_accuracy"].as_f64().expect("accuracy");
    println!("test accuracy: uninterrupted on 2 workers {want:.4}, scaled up to 3 {got:.4}");
    assert!((got - want).abs() <= 0.002, "accuracy {got} against {want} uninterrupted");
    let _ = std::fs::remove_dir_all(&whole);
    let _ = std::fs::remove_dir_all(&dir);
}
