//! Fault injection on real `lockstep local` runs: a worker killed (SIGKILL) or frozen
//! (SIGSTOP) mid-run.

mod common;
use common::*;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// SplitMix64: a well-mixed draw from a small seed.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn start_local(dir: &Path, extra: &[&str]) -> Child {
    bin()
        .args(["local", "--workers", "4", "configs/mnist-mlp.toml", "--quiet", "--out"])
        .arg(dir)
        .args(["--set", "train.checkpoint_every=100"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.with_extension("log")).expect("log file"))
        .spawn()
        .expect("start lockstep local")
}

fn worker_pid(dir: &Path, i: usize) -> String {
    std::fs::read_to_string(dir.join(format!("worker-{i}.pid"))).expect("worker pid file").trim().to_string()
}

fn signal(pid: &str, sig: &str) {
    let ok = std::process::Command::new("kill").args([sig, pid]).status().expect("kill").success();
    assert!(ok, "kill {sig} {pid}");
}

#[test]
fn a_killed_worker_is_replaced_and_the_run_ends_as_if_nothing_happened() {
    // No recovery keys: `local` replaces a dead worker by default and the group goes on
    // from the newest checkpoint at its full size, so the final weights are those of a run
    // that was never interrupted, bit for bit.
    let whole = temp_dir("kill-whole");
    let mut child = start_local(&whole, &["--set", "train.epochs=4"]);
    assert!(wait_exit(&mut child, Duration::from_secs(300)).success());
    let want = summary(&whole)["weight_hash"].clone();
    // Which worker and when, drawn from a fixed list of seeds so failures reproduce.
    for seed in [7u64, 11, 20] {
        let worker = splitmix64(seed) as usize % 4;
        let kill_at = 120 + splitmix64(seed + 1) % 900; // steps: before and after the first checkpoints
        let dir = temp_dir(&format!("kill-{seed}"));
        let mut child = start_local(&dir, &["--set", "train.epochs=4"]);
        wait_for_step(&dir, kill_at, &mut child);
        signal(&worker_pid(&dir, worker), "-KILL");
        let status = wait_exit(&mut child, Duration::from_secs(300));
        let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
        assert!(status.success(), "seed {seed}: run failed after killing worker {worker} at step {kill_at}:\n{log}");
        assert!(log.contains("re-forming the group"), "seed {seed}: no recovery logged:\n{log}");
        let s = summary(&dir);
        let accuracy = s["test_accuracy"].as_f64().unwrap();
        println!(
            "seed {seed}: killed worker {worker} at step {kill_at}: world {} at the end, accuracy {accuracy}, hash {}",
            s["world_size"], s["weight_hash"]
        );
        assert_eq!(s["world_size"], 4, "the dead worker was replaced");
        assert!(accuracy >= 0.978, "seed {seed}: accuracy {accuracy}");
        assert_eq!(s["weight_hash"], want, "seed {seed}: the recovered run ends with other weights");
    }
}

#[test]
fn a_frozen_worker_is_named_within_the_heartbeat_timeout_and_the_run_stops_cleanly() {
    let dir = temp_dir("sigstop");
    // Restarts off: this test is about naming the frozen rank and stopping cleanly.
    let mut child = start_local(&dir, &["--set", "train.epochs=3", "--set", "train.max_restarts=0"]);
    wait_for_step(&dir, 150, &mut child);
    let pid = worker_pid(&dir, 1);
    signal(&pid, "-STOP");
    let stopped_at = Instant::now();
    // min_workers = 0: the run must stop, with an error naming the frozen rank, within the
    // heartbeat timeout (10 s) + 5 s.
    let status = wait_exit(&mut child, Duration::from_secs(60));
    let waited = stopped_at.elapsed();
    // Usually gone already: `local` kills its workers when the run fails.
    let _ = std::process::Command::new("kill").args(["-CONT", &pid]).stderr(Stdio::null()).status();
    let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
    assert!(!status.success(), "the run should have stopped");
    println!("frozen worker detected and run stopped after {waited:?}");
    assert!(waited < Duration::from_secs(15 + 5), "took {waited:?} (process exit included)");
    let error = log.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    // The frozen rank is the one whose connection is lost; its neighbours name the step and
    // the collective they were in when their link to it failed.
    assert!(error.contains("lost rank"), "the error should name the frozen rank: {error}");
    // ("all-reduce of gradient bucket N" or "of the loss scalars": wherever it froze.)
    assert!(error.contains("all-reduce of ") && error.contains("step "), "{error}");
}

/// Processes whose command line mentions `dir` and that hold a shared-memory segment of
/// lockstep's (a memfd: it shows as `/memfd:lockstep-allreduce (deleted)` in /proc).
fn segment_holders(dir: &Path) -> Vec<u32> {
    let dir = dir.to_string_lossy().into_owned();
    let mut holders = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(&dir) {
            continue;
        }
        let fds = std::fs::read_dir(entry.path().join("fd")).into_iter().flatten().flatten();
        if fds
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|t| t.to_string_lossy().contains("memfd:lockstep"))
        {
            holders.push(pid);
        }
    }
    holders
}

#[test]
fn a_worker_killed_in_a_shared_memory_all_reduce_is_named_and_leaves_no_segment() {
    let dir = temp_dir("shm-kill");
    let mut child = start_local(&dir, &["--set", "train.epochs=3", "--set", "train.max_restarts=0"]);
    wait_for_step(&dir, 100, &mut child);
    let holders = segment_holders(&dir);
    assert_eq!(holders.len(), 4, "all four workers map the segment: {holders:?}");
    assert!(std::fs::read_dir("/dev/shm")
        .map_or(true, |d| d.flatten().all(|e| !e.file_name().to_string_lossy().contains("lockstep"))));
    let pid = worker_pid(&dir, 2);
    signal(&pid, "-KILL");
    let killed_at = Instant::now();
    let status = wait_exit(&mut child, Duration::from_secs(60));
    let waited = killed_at.elapsed();
    let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
    assert!(!status.success(), "max_restarts = 0: the run stops");
    assert!(waited < Duration::from_secs(15), "took {waited:?}");
    let error = log.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(error.contains("exited") || error.contains("lost rank"), "names the dead rank: {error}");
    println!("killed worker named after {waited:?}: {error}");
    assert_eq!(segment_holders(&dir), Vec::<u32>::new(), "no process of the run holds a segment");
    assert!(std::fs::read_dir("/dev/shm")
        .map_or(true, |d| d.flatten().all(|e| !e.file_name().to_string_lossy().contains("lockstep"))));
}
