//! What a run shows about itself: TensorBoard event files (read back with the real
//! `tensorboard` package), the Chrome trace, per-rank logs, the PNG plot, the live status
//! table and the gradient-health warning.

mod common;

use common::{bin, run, small_mnist, stderr, temp_dir};
use std::path::Path;
use std::process::Command;

fn metrics_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Reads the run's event files with TensorBoard's own EventAccumulator and prints, as JSON,
/// the scalars (tag -> [[step, value]]) and the histograms (tag -> [[step, num, min, max]]).
const READ_EVENTS: &str = r#"
import json, sys
from tensorboard.backend.event_processing import event_accumulator as ea
acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
acc.Reload()
tags = acc.Tags()
print(json.dumps({
    "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
    "histograms": {t: [[e.step, e.histogram_value.num, e.histogram_value.min, e.histogram_value.max]
                       for e in acc.Histograms(t)] for t in tags["histograms"]},
}))
"#;

fn tensorboard_events(dir: &Path) -> Option<serde_json::Value> {
    let probe = Command::new("python3").args(["-c", "import tensorboard"]).output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        // CI installs tensorboard and sets this, so there a missing package fails the test.
        assert!(
            std::env::var_os("LOCKSTEP_REQUIRE_TENSORBOARD").is_none(),
            "the tensorboard Python package is required (LOCKSTEP_REQUIRE_TENSORBOARD is set)"
        );
        eprintln!("SKIPPED the TensorBoard check: `import tensorboard` fails (pip install tensorboard)");
        return None;
    }
    let out = Command::new("python3").args(["-c", READ_EVENTS]).arg(dir).output().expect("run python3");
    assert!(out.status.success(), "reading the event files: {}", String::from_utf8_lossy(&out.stderr));
    Some(serde_json::from_slice(&out.stdout).expect("reader prints JSON"))
}

/// The PNG's size and how many pixels have each of the plot's series colours.
fn png_series_pixels(path: &Path) -> ((u32, u32), [usize; 4]) {
    let img = image::open(path).expect("a PNG that decodes").to_rgb8();
    let colours = [[0, 0, 255], [255, 0, 0], [0, 255, 0], [255, 0, 255]]; // train, test, accuracy, lr
    let mut counts = [0; 4];
    for p in img.pixels() {
        if let Some(i) = colours.iter().position(|c| *c == p.0) {
            counts[i] += 1;
        }
    }
    (img.dimensions(), counts)
}

#[test]
fn a_local_run_writes_tensorboard_events_a_trace_rank_logs_and_a_plot() {
    let dir = temp_dir("observe");
    let trace = dir.join("trace.json");
    let out = run(bin()
        .env("RUST_LOG", "info")
        .args(["local", "--workers", "2", "configs/mnist-mlp.toml", "--quiet", "--out"])
        .arg(&dir)
        .arg("--trace")
        .arg(&trace)
        .args(small_mnist(2000, 2)));
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = metrics_lines(&dir);
    let train: Vec<_> = lines.iter().filter(|l| l["kind"] == "train").collect();
    let steps = common::summary(&dir)["steps"].as_u64().unwrap();

    // T33 in metrics.jsonl: every logged step has each layer's gradient norm.
    for l in &train {
        let layers: Vec<&str> =
            l["layer_grad_norms"].as_array().unwrap().iter().map(|n| n["layer"].as_str().unwrap()).collect();
        assert_eq!(layers, ["fc0", "fc1", "fc2"], "{l}");
        assert!(l["layer_grad_norms"][0]["norm"].as_f64().unwrap() > 0.0);
    }

    // TensorBoard reads every scalar and histogram, with the values metrics.jsonl has.
    if let Some(events) = tensorboard_events(&dir) {
        let loss = events["scalars"]["train/loss"].as_array().unwrap();
        assert_eq!(loss.len(), train.len());
        for (tb, line) in loss.iter().zip(&train) {
            assert_eq!(tb[0], line["step"]);
            let (a, b) = (tb[1].as_f64().unwrap(), line["loss"].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-6 * b.abs(), "TensorBoard loss {a} vs metrics.jsonl {b}");
        }
        for tag in ["train/lr", "train/grad_norm", "train/examples_per_s", "test/accuracy", "grad_norm/fc0"] {
            assert!(!events["scalars"][tag].as_array().unwrap().is_empty(), "no {tag} in TensorBoard");
        }
        // One gradient histogram per layer per logged step, over all its values
        // (fc0: 784 x 512 weights + 512 biases).
        let fc0 = events["histograms"]["grad/fc0"].as_array().unwrap();
        assert_eq!(fc0.len(), train.len());
        assert_eq!(fc0[0][1].as_f64().unwrap(), (784.0 * 512.0) + 512.0);
        assert!(fc0[0][2].as_f64().unwrap() < 0.0 && fc0[0][3].as_f64().unwrap() > 0.0);
        assert_eq!(events["histograms"]["grad/fc2"][0][1].as_f64().unwrap(), 512.0 * 10.0 + 10.0);
    }

    // The trace: both ranks, each step's forward, backward and optimizer in order on the
    // compute thread, the bucket all-reduce on the communication thread inside the step.
    let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    for rank in 0..2u64 {
        let spans = |name: &str| -> Vec<(u64, u64, u64)> {
            events
                .iter()
                .filter(|e| e["ph"] == "X" && e["pid"] == rank && e["name"] == name)
                .map(|e| (e["args"]["step"].as_u64().unwrap(), e["ts"].as_u64().unwrap(), e["dur"].as_u64().unwrap()))
                .collect()
        };
        let (forward, backward, optimizer, all_reduce) =
            (spans("forward"), spans("backward"), spans("optimizer"), spans("all-reduce"));
        assert_eq!(forward.len() as u64, steps, "rank {rank}");
        assert_eq!((backward.len(), optimizer.len()), (forward.len(), forward.len()));
        // On one host the 2.7 MB model is cut into buckets of a quarter of it at most.
        let buckets = all_reduce.len() / forward.len();
        assert!(buckets >= 4 && all_reduce.len() == buckets * forward.len(), "{} all-reduces", all_reduce.len());
        for i in 0..forward.len() {
            let (f, b, o) = (forward[i], backward[i], optimizer[i]);
            assert!(f.0 == b.0 && b.0 == o.0, "step numbers differ: {f:?} {b:?} {o:?}");
            assert!(f.1 + f.2 <= b.1 && b.1 + b.2 <= o.1, "rank {rank} step {}: out of order", f.0);
            // Each bucket's all-reduce starts during or after backward and ends before the update.
            for a in all_reduce.iter().filter(|a| a.0 == f.0) {
                assert!(a.1 >= b.1 && a.1 + a.2 <= o.1 + 1, "rank {rank} step {}: all-reduce {a:?} outside", f.0);
            }
            assert_eq!(all_reduce.iter().filter(|a| a.0 == f.0).count(), buckets, "rank {rank} step {}", f.0);
        }
        assert!(events
            .iter()
            .any(|e| e["name"] == "thread_name" && e["pid"] == rank && e["args"]["name"] == "communication"));
    }

    // Per-rank log files, forwarded by the workers; the coordinator's own log.
    let rank0 = std::fs::read_to_string(dir.join("logs/rank-0.log")).expect("logs/rank-0.log");
    assert!(rank0.contains("checkpoint"), "{rank0}");
    assert!(std::fs::read_to_string(dir.join("coordinator.log")).unwrap().contains("all ranks hold identical"));
    // No colour codes in any log file: the workers' stderr goes to worker-<i>.log.
    let logs = std::fs::read_dir(&dir).unwrap().chain(std::fs::read_dir(dir.join("logs")).unwrap());
    let mut checked = 0;
    for path in logs.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "log")) {
        let text = std::fs::read(&path).unwrap();
        assert!(!text.contains(&0x1b), "{} holds ANSI escape codes", path.display());
        checked += 1;
    }
    assert!(checked >= 4, "worker-0/1.log, coordinator.log and the rank logs: {checked}");

    // The plot: a 1200x1000 PNG with every curve drawn.
    let png = dir.join("curves.png");
    let out = run(bin().arg("plot").arg(&dir).arg("-o").arg(&png));
    assert!(out.status.success(), "{}", stderr(&out));
    let (size, counts) = png_series_pixels(&png);
    assert_eq!(size, (1200, 1000));
    assert!(counts.iter().all(|&c| c > 50), "a curve is missing: pixels per series colour {counts:?}");
    // A run directory without metrics is a clear error.
    let empty = temp_dir("observe-empty");
    let out = run(bin().arg("plot").arg(&empty));
    assert!(!out.status.success() && stderr(&out).contains("metrics.jsonl"), "{}", stderr(&out));
}

#[test]
fn status_lists_every_rank_of_a_live_four_worker_run() {
    let dir = temp_dir("status");
    let mut run_cmd = bin();
    run_cmd
        .args(["local", "--workers", "4", "configs/mnist-mlp.toml", "--quiet", "--out"])
        .arg(&dir)
        .args(small_mnist(4000, 1000))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut live = run_cmd.spawn().expect("start lockstep local");
    // Poll until every rank reports progress (the group forms within seconds).
    let mut table = String::new();
    for _ in 0..120 {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let out = bin().args(["status", "--run-dir"]).arg(&dir).output().unwrap();
        table = String::from_utf8_lossy(&out.stdout).into_owned();
        if table.lines().filter(|l| l.contains("training")).count() == 5 {
            break; // the header line and four rank rows
        }
    }
    let json = bin().args(["status", "--json", "--run-dir"]).arg(&dir).output().unwrap();
    let wrong_token = bin()
        .args(["status", "--coordinator", std::fs::read_to_string(dir.join("join")).unwrap_or_default().trim()])
        .env("LOCKSTEP_TOKEN", "not-the-token")
        .output()
        .unwrap();
    let _ = live.kill();
    let _ = live.wait();
    eprintln!("{table}");
    assert!(table.starts_with("job mnist-mlp: training;"), "{table}");
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(rows.len(), 4, "{table}");
    for (rank, row) in rows.iter().enumerate() {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[0], rank.to_string(), "{row}");
        assert_eq!(cols[3], "training", "{row}");
        assert!(cols[4].parse::<u64>().unwrap() > 0, "{row}");
        assert!(row.ends_with('%'), "{row}");
    }
    let status: serde_json::Value = serde_json::from_slice(&json.stdout).expect("status --json");
    for r in status["ranks"].as_array().unwrap() {
        assert!(r["since_heard_s"].as_f64().unwrap() < 5.0, "{r}");
        assert!(r["examples_per_s"].as_f64().unwrap() > 0.0, "{r}");
        let comm = r["comm_share"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&comm), "{r}");
    }
    assert!(!wrong_token.status.success());
    assert!(String::from_utf8_lossy(&wrong_token.stderr).contains("wrong cluster token"));
}

#[test]
fn vanishing_gradients_are_named_in_a_warning() {
    // Twelve sigmoid layers: each multiplies the backward signal by at most 1/4.
    let dir = temp_dir("vanishing");
    let out = run(bin()
        .env("RUST_LOG", "warn")
        .args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"])
        .arg(&dir)
        .args(["--set", "model.hidden=[32,32,32,32,32,32,32,32,32,32,32,32]", "--set", "model.activation=\"sigmoid\""])
        .args(["--set", "model.dropout=0.0", "--set", "train.max_steps=10"])
        .args(small_mnist(1000, 1)));
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("vanishing gradients: fc0 has gradient norm"), "{err}");
    let ratio = metrics_lines(&dir)
        .iter()
        .find(|l| l["kind"] == "train")
        .map(|l| {
            let norms = l["layer_grad_norms"].as_array().unwrap();
            norms[0]["norm"].as_f64().unwrap() / norms[norms.len() - 1]["norm"].as_f64().unwrap()
        })
        .unwrap();
    assert!(ratio < 1e-3, "first/last gradient norm ratio {ratio}");
}

#[test]
fn a_run_whose_loss_turns_nan_still_plots_and_keeps_the_spike() {
    let dir = temp_dir("nan-plot");
    // SGD at lr 1e4 with the guard off: the loss overflows to NaN within a few steps and
    // the run goes on to its end.
    let out = run(bin()
        .args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"])
        .arg(&dir)
        .args(small_mnist(1280, 1))
        .args([
            "--set",
            "optim.kind=\"sgd\"",
            "--set",
            "optim.lr=10000.0",
            "--set",
            "optim.clip_norm=0.0",
            "--set",
            "train.log_every=1",
            "--set",
            "train.blowup.action=\"off\"",
        ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics.jsonl");
    assert!(text.contains(r#""loss":"NaN""#), "a NaN loss is written as \"NaN\", not null");
    for field in ["loss", "grad_norm", "accuracy"] {
        assert!(!text.contains(&format!("\"{field}\":null")), "{field} is never written as null");
    }
    let png = dir.join("curves.png");
    let out = run(bin().arg("plot").arg(&dir).arg("-o").arg(&png));
    assert!(out.status.success(), "plot: {}", stderr(&out));
    assert!(png.is_file());
}
