//! Helpers for end-to-end tests that start the real `lockstep` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd.env("RUST_LOG", "warn");
    cmd
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh temporary directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lockstep-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("start lockstep");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "lockstep panicked:\n{stderr}");
    out
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn summary(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).expect("summary.json parses")
}

/// Arguments for a short MNIST run: `examples` training examples, `epochs` epochs.
pub fn small_mnist(examples: usize, epochs: usize) -> Vec<String> {
    [
        "--set".to_string(),
        format!("data.train_limit={examples}"),
        "--set".into(),
        "data.test_limit=1000".into(),
        "--set".into(),
        format!("train.epochs={epochs}"),
        "--set".into(),
        "train.log_every=5".into(),
        "--set".into(),
        "schedule.warmup_steps=10".into(),
    ]
    .to_vec()
}

/// The step of the newest `train` line in metrics.jsonl (0 before the first).
pub fn current_step(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Waits until metrics.jsonl has a `train` line at or past `step`; the run must be alive.
pub fn wait_for_step(dir: &Path, step: u64, child: &mut Child) {
    let start = Instant::now();
    while current_step(dir) < step {
        assert!(child.try_wait().unwrap().is_none(), "run ended before step {step}");
        assert!(start.elapsed() < Duration::from_secs(300), "step {step} not reached");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The exit status of `child`, waited for up to `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < limit, "lockstep local did not finish within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
