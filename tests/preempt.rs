//! Preemption: SIGTERM/SIGINT to a running `train` or `local` finishes the current step,
//! writes a checkpoint, stops every worker and exits with 128 + the signal; `--resume`
//! from that checkpoint ends with the weights of a run that was never stopped.

mod common;
use common::*;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn job() -> Vec<String> {
    ["train.epochs=3", "data.test_limit=1000", "train.log_every=10"]
        .iter()
        .flat_map(|s| ["--set".to_string(), s.to_string()])
        .collect()
}

fn start(args: &[&str], dir: &Path) -> Child {
    bin()
        .args(args)
        .args(["configs/mnist-mlp.toml", "--quiet", "--out"])
        .arg(dir)
        .args(job())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.with_extension("err")).expect("stderr file"))
        .spawn()
        .expect("start lockstep")
}

/// Waits until metrics.jsonl has a train line at or past `step`.
fn wait_for_step(dir: &Path, step: u64, child: &mut Child) {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
        let newest = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["step"].as_u64())
            .max()
            .unwrap_or(0);
        if newest >= step {
            return;
        }
        assert!(child.try_wait().expect("try_wait").is_none(), "the run ended before step {step}");
        assert!(started.elapsed() < Duration::from_secs(120), "step {step} not reached");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = std::process::Command::new("kill").args([sig, &child.id().to_string()]).status().expect("kill").success();
    assert!(ok);
}

/// Processes whose command line names `dir` (the run's workers), other than `except`.
fn processes_of(dir: &Path, except: u32) -> Vec<u32> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|&pid| pid != except && pid != std::process::id())
        .filter(|pid| {
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()).contains(&dir)
        })
        .collect()
}

/// Stops a run with `sig` after `step`; returns the checkpoint it names for resuming.
fn preempt(args: &[&str], dir: &Path, step: u64, sig: &str, code: i32) -> String {
    let mut child = start(args, dir);
    wait_for_step(dir, step, &mut child);
    signal(&child, sig);
    let pid = child.id();
    let status = child.wait().expect("wait");
    let err = std::fs::read_to_string(dir.with_extension("err")).unwrap_or_default();
    assert_eq!(status.code(), Some(code), "exit status after {sig}:\n{err}");
    let resume = err.lines().find_map(|l| l.strip_prefix("resume with: ")).unwrap_or_else(|| panic!("{err}"));
    let checkpoint = resume.rsplit(' ').next().expect("a checkpoint").to_string();
    assert!(Path::new(&checkpoint).is_file(), "{checkpoint}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(processes_of(dir, pid), Vec::<u32>::new(), "no worker of the run is left");
    checkpoint
}

fn finish(args: &[&str], dir: &Path, resume: Option<&str>) -> String {
    let mut cmd = bin();
    cmd.args(args).args(["configs/mnist-mlp.toml", "--quiet", "--out"]).arg(dir).args(job());
    if let Some(r) = resume {
        cmd.args(["--resume", r]);
    }
    let out = run(&mut cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    summary(dir)["weight_hash"].as_str().expect("hash").to_string()
}

#[test]
fn sigterm_stops_local_in_step_and_resume_is_bit_identical() {
    let args = ["local", "--workers", "2"];
    let (stopped, whole) = (temp_dir("preempt-local"), temp_dir("preempt-local-whole"));
    let checkpoint = preempt(&args, &stopped, 300, "-TERM", 143);
    assert_eq!(finish(&args, &stopped, Some(&checkpoint)), finish(&args, &whole, None));
}

#[test]
fn sigterm_and_sigint_stop_train_and_resume_is_bit_identical() {
    let args = ["train"];
    let whole = temp_dir("preempt-train-whole");
    let want = finish(&args, &whole, None);
    for (sig, code) in [("-TERM", 143), ("-INT", 130)] {
        let stopped = temp_dir(&format!("preempt-train{sig}"));
        let checkpoint = preempt(&args, &stopped, 200, sig, code);
        assert_eq!(finish(&args, &stopped, Some(&checkpoint)), want, "{sig}");
    }
}

#[test]
fn a_second_signal_ends_the_run_at_once() {
    let dir = temp_dir("preempt-twice");
    let mut child = start(&["local", "--workers", "2"], &dir);
    wait_for_step(&dir, 50, &mut child);
    signal(&child, "-TERM");
    signal(&child, "-TERM");
    let pid = child.id();
    let started = Instant::now();
    let status = child.wait().expect("wait");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!(status.code(), Some(143));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(processes_of(&dir, pid), Vec::<u32>::new(), "the workers were killed with it");
}
