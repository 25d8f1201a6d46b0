//! Multi-process tests: real `lockstep` processes over loopback QUIC.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A short data-parallel job: 12 steps of the MNIST MLP with dropout.
fn short_job() -> Vec<String> {
    let mut args = small_mnist(1536, 1);
    args.extend(["--set".into(), "train.log_every=3".into()]);
    args
}

fn weights(dir: &Path) -> std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> {
    lockstep_nn::checkpoint::load_tensors(&dir.join("model.safetensors")).expect("model.safetensors")
}

/// (max over tensors of ‖a − b‖₂/‖b‖₂, max element |a − b|).
fn weight_diff(
    got: &std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>,
    reference: &std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>,
) -> (f64, f64) {
    let (mut max_tensor_rel, mut max_abs) = (0f64, 0f64);
    for (name, (shape, want)) in reference {
        let (gshape, g) = &got[name];
        assert_eq!(gshape, shape, "{name}");
        let (mut diff2, mut norm2) = (0f64, 0f64);
        for (a, b) in g.iter().zip(want) {
            let d = (*a as f64) - (*b as f64);
            diff2 += d * d;
            norm2 += (*b as f64) * (*b as f64);
            max_abs = max_abs.max(d.abs());
        }
        max_tensor_rel = max_tensor_rel.max((diff2 / norm2.max(1e-30)).sqrt());
    }
    (max_tensor_rel, max_abs)
}

fn local(name: &str, workers: usize, extra: &[&str]) -> std::path::PathBuf {
    let dir = temp_dir(name);
    let out = run(bin()
        .args(["local", "--workers", &workers.to_string(), "configs/mnist-mlp.toml", "--quiet", "--out"])
        .arg(&dir)
        .args(short_job())
        .args(extra));
    assert!(out.status.success(), "local --workers {workers} failed:\n{}", stderr(&out));
    dir
}

#[test]
fn data_parallel_ranks_agree_and_world_sizes_match() {
    let single = temp_dir("dp-single");
    let out = run(bin().args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"]).arg(&single).args(short_job()));
    assert!(out.status.success(), "{}", stderr(&out));
    let reference = weights(&single);

    for workers in [2usize, 4] {
        // Small buckets so several all-reduces overlap with backward.
        let dir = local(&format!("dp-{workers}"), workers, &["--bucket-mb", "0.5"]);
        let s = summary(&dir);
        assert_eq!(s["world_size"], workers);
        assert_eq!(s["steps"], 12);
        assert_eq!(s["collective"], format!("shm: {workers} ranks on 1 host"), "auto picks shared memory");
        let hashes: Vec<&str> =
            s["rank_weight_hashes"].as_array().unwrap().iter().map(|h| h.as_str().unwrap()).collect();
        assert_eq!(hashes.len(), workers);
        assert!(hashes.iter().all(|h| *h == hashes[0]), "ranks differ: {hashes:?}");

        // Relative difference per tensor: ‖w_W − w_1‖₂ / ‖w_1‖₂. The summation order of the
        // gradient differs with W (one k=128 GEMM vs partial sums added by the ring), so
        // bits differ; the models must agree to floating-point accuracy.
        let (max_tensor_rel, max_abs) = weight_diff(&weights(&dir), &reference);
        println!("world {workers} vs 1 process: max per-tensor relative diff {max_tensor_rel:.3e}, max element abs diff {max_abs:.3e}");
        assert!(
            max_tensor_rel < 1e-5,
            "world {workers}: weights differ from 1 process by {max_tensor_rel:e} (relative, per tensor)"
        );
        assert!(max_abs < 1e-5, "world {workers}: an element differs by {max_abs:e}");
    }
}

#[test]
fn same_world_and_seed_is_bitwise_identical() {
    let a = summary(&local("repro-a", 2, &[]));
    let b = summary(&local("repro-b", 2, &[]));
    assert_eq!(a["weight_hash"], b["weight_hash"]);
    assert_eq!(a["test_loss"], b["test_loss"]);
}

/// The two network rings sum in the same order: QUIC and TLS-over-TCP runs of one job end
/// with the same bits, and the summary names the link.
#[test]
fn tcp_and_quic_rings_give_the_same_weights() {
    let quic = summary(&local("ring-quic", 3, &["--set", "collective.transport=\"quic\""]));
    let tcp = summary(&local("ring-tcp", 3, &["--set", "collective.transport=\"tcp\""]));
    assert_eq!(quic["collective"], "ring: 3 ranks on 1 hosts, quic");
    assert_eq!(tcp["collective"], "ring: 3 ranks on 1 hosts, tcp");
    assert_eq!(quic["weight_hash"], tcp["weight_hash"], "quic and tcp rings differ");
    assert_eq!(tcp["steps"], 12);
}

/// A `lockstep coordinator` process on a free port; returns it and its join address.
fn start_coordinator(dir: &Path, token_file: &Path) -> (Child, String) {
    start_coordinator_of(dir, token_file, 1, &[])
}

/// A coordinator for `workers` workers; it logs to DIR/coordinator.log itself.
fn start_coordinator_of(dir: &Path, token_file: &Path, workers: usize, extra: &[&str]) -> (Child, String) {
    let mut child = bin()
        .args(["coordinator", "--listen", "127.0.0.1:0", "--workers", &workers.to_string()])
        .args(["configs/mnist-mlp.toml", "--quiet", "--out"])
        .arg(dir)
        .arg("--token-file")
        .arg(token_file)
        .args(short_job())
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("coordinator.stderr")).unwrap())
        .spawn()
        .expect("start coordinator");
    let mut line = String::new();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    reader.read_line(&mut line).unwrap();
    // Keep draining stdout so the coordinator's last lines have a reader.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let join = line.trim().strip_prefix("join address: ").expect("join address line").to_string();
    (child, join)
}

fn worker(join: &str, token_file: &Path) -> Command {
    let mut cmd = bin();
    cmd.args(["worker", "--once", "--join", join, "--token-file"]).arg(token_file);
    cmd
}

fn wait_ok(mut child: Child, what: &str, dir: &Path) {
    for _ in 0..1200 {
        if let Some(status) = child.try_wait().unwrap() {
            let log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default();
            assert!(status.success(), "{what} exited with {status}:\n{log}");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("{what} did not finish");
}

#[test]
fn wrong_token_is_rejected_on_both_sides_and_service_continues() {
    let dir = temp_dir("wrong-token");
    let good = dir.join("good-token");
    let bad = dir.join("bad-token");
    std::fs::write(&good, "correct-horse").unwrap();
    std::fs::write(&bad, "battery-staple").unwrap();
    let (coord, join) = start_coordinator(&dir, &good);

    let out = run(&mut worker(&join, &bad));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("rejected this worker: wrong cluster token"), "worker side:\n{err}");

    let out = run(&mut worker(&join, &good));
    assert!(out.status.success(), "good worker:\n{}", stderr(&out));
    wait_ok(coord, "coordinator", &dir);
    let log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap();
    assert!(log.contains("wrong cluster token"), "coordinator side:\n{log}");
    assert_eq!(summary(&dir)["steps"], 12);
}

#[test]
fn worker_pinning_another_fingerprint_refuses_to_connect() {
    let dir = temp_dir("wrong-fp");
    let token = dir.join("token");
    std::fs::write(&token, "t").unwrap();
    let (mut coord, join) = start_coordinator(&dir, &token);
    let (addr, fp) = join.split_once('#').unwrap();
    let flipped: String = fp.chars().rev().collect();
    let out = run(&mut worker(&format!("{addr}#{flipped}"), &token));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("fingerprint mismatch") && err.contains(&flipped), "{err}");
    assert!(err.contains(&format!("it presented {fp}")), "the typed error names what the coordinator presented: {err}");
    let _ = coord.kill();
}

#[test]
fn garbage_and_oversized_frames_close_only_that_connection() {
    use lockstep_collective::tls::{client_config, endpoint, parse_join_address, resolve, server_config, Identity};
    let dir = temp_dir("garbage");
    let token = dir.join("token");
    std::fs::write(&token, "t").unwrap();
    let (coord, join) = start_coordinator(&dir, &token);
    let (addr, fp) = parse_join_address(&join).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let me = Identity::generate().unwrap();
        let ep = endpoint("127.0.0.1:0".parse().unwrap(), server_config(&me, None).unwrap()).unwrap();
        for payload in [vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8], u32::MAX.to_le_bytes().to_vec()] {
            let conn = ep
                .connect_with(client_config(&me, &fp).unwrap(), resolve(&addr).unwrap(), "lockstep")
                .unwrap()
                .await
                .unwrap();
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            send.write_all(&payload).await.unwrap();
            let _ = send.finish();
            let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
                .await
                .expect("coordinator closes the connection");
            assert!(reason.to_string().contains("malformed frame"), "{reason}");
        }
    });
    // The coordinator still serves a real worker.
    let out = run(&mut worker(&join, &token));
    assert!(out.status.success(), "{}", stderr(&out));
    wait_ok(coord, "coordinator", &dir);
    let log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap();
    assert!(log.contains("exceeds the") && log.contains("bad first frame"), "{log}");
}

#[test]
fn daemon_without_once_outlives_the_run() {
    let dir = temp_dir("daemon");
    let token = dir.join("token");
    std::fs::write(&token, "t").unwrap();
    let (coord, join) = start_coordinator(&dir, &token);
    let log = dir.join("daemon.log");
    let mut daemon = bin()
        .args(["worker", "--join", &join, "--token-file"])
        .arg(&token)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_ok(coord, "coordinator", &dir);
    // The run is over and the coordinator gone; the daemon waits for the next job.
    let mut waiting = false;
    for _ in 0..50 {
        if std::fs::read_to_string(&log).unwrap_or_default().contains("waiting for the next job") {
            waiting = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let alive = daemon.try_wait().unwrap().is_none();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(waiting && alive, "daemon should outlive the run (alive: {alive}):\n{text}");
}

/// An MLP with BatchNorm, as a job file in `dir`.
fn batch_norm_job(dir: &Path, sync: bool) -> std::path::PathBuf {
    let path = dir.join(format!("bn-{sync}.toml"));
    let data = repo().join("data/mnist");
    let job = format!(
        r#"name = "bn"
[model]
kind = "sequential"
input_shape = [784]
sync_batch_norm = {sync}
layers = [{{ type = "linear", out = 64 }}, {{ type = "batch_norm" }}, {{ type = "relu" }}, {{ type = "linear", out = 10 }}]
[data]
kind = "idx"
dir = "{}"
train_limit = 1536
test_limit = 500
[train]
epochs = 1
batch_size = 128
log_every = 4
[optim]
kind = "momentum"
lr = 0.05
"#,
        data.display()
    );
    std::fs::write(&path, job).expect("write job");
    path
}

#[test]
fn sync_batch_norm_matches_one_process_and_per_worker_statistics_do_not() {
    let dir = temp_dir("syncbn");
    let train = |args: &[&str], job: &Path, out: &str| {
        let out_dir = dir.join(out);
        let o = run(bin().args(args).arg(job).args(["--quiet", "--out"]).arg(&out_dir));
        assert!(o.status.success(), "{args:?} failed:\n{}", stderr(&o));
        weights(&out_dir)
    };
    let (sync_job, local_job) = (batch_norm_job(&dir, true), batch_norm_job(&dir, false));
    let single = train(&["train"], &sync_job, "single");
    let synced = train(&["local", "--workers", "2"], &sync_job, "sync");
    let per_worker = train(&["local", "--workers", "2"], &local_job, "per-worker");
    // SGD, not Adam: l0.bias (and the weights of pixels that are constant over a batch)
    // feed BatchNorm, which removes them, so their true gradient is 0 and they hold only
    // rounding noise, which Adam would scale up to full-size steps. l0.bias itself stays a
    // tensor of noise around 0, so relative differences on it mean nothing: left out.
    let mut single = single;
    single.remove("l0.bias"); // differences are taken over the reference's tensors
    let (sync_rel, _) = weight_diff(&synced, &single);
    let (local_rel, _) = weight_diff(&per_worker, &single);
    println!(
        "2 workers vs 1 process after 12 steps: SyncBatchNorm {sync_rel:.3e}, per-worker BatchNorm {local_rel:.3e}"
    );
    assert!(sync_rel < 1e-5, "SyncBatchNorm differs from one process by {sync_rel:e}");
    assert!(local_rel > 10.0 * sync_rel && local_rel > 1e-4, "per-worker statistics should differ: {local_rel:e}");
}

#[test]
fn resume_on_another_world_size_continues_the_same_epoch() {
    // 1 process for 5 steps, then 2 worker processes from its checkpoint to step 12: the
    // global batches are a function of (seed, epoch, step) only, so the result matches an
    // uninterrupted single-process run to floating-point accuracy.
    let whole = temp_dir("resume-world-whole");
    let out = run(bin().args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"]).arg(&whole).args(short_job()));
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = temp_dir("resume-world");
    let out = run(bin()
        .args(["train", "configs/mnist-mlp.toml", "--quiet", "--stop-after", "5", "--out"])
        .arg(&dir)
        .args(short_job()));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(bin()
        .args(["local", "--workers", "2", "configs/mnist-mlp.toml", "--quiet", "--out"])
        .arg(&dir)
        .args(short_job())
        .arg("--resume")
        .arg(&dir));
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&dir);
    assert_eq!((s["steps"].as_u64(), s["world_size"].as_u64()), (Some(12), Some(2)));
    let (rel, abs) = weight_diff(&weights(&dir), &weights(&whole));
    println!(
        "1 process → resumed on 2 workers vs uninterrupted: max per-tensor relative diff {rel:.3e}, abs {abs:.3e}"
    );
    assert!(rel < 1e-5, "resumed on 2 workers differs by {rel:e}");
    // The metrics file holds both parts: steps 3 (first part) and 12 (after the resume).
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"step\":3,") && metrics.contains("\"step\":12,"), "{metrics}");
}

#[test]
fn a_restarted_coordinator_resumes_and_its_daemons_rejoin() {
    let dir = temp_dir("coord-restart");
    let token = dir.join("token");
    std::fs::write(&token, "restart-token").unwrap();
    // A fixed port, so the restarted coordinator is where the daemons look for it.
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let coordinator = |resume: bool, log: &str| {
        let mut cmd = bin();
        cmd.args(["coordinator", "--listen", &listen, "--workers", "2", "configs/mnist-mlp.toml", "--quiet", "--out"])
            .arg(&dir)
            .arg("--token-file")
            .arg(&token)
            .args(["--set", "train.epochs=1", "--set", "train.checkpoint_every=20", "--set", "train.log_every=10"])
            .args(["--set", "data.test_limit=1000"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join(log)).unwrap());
        if resume {
            cmd.arg("--resume").arg(&dir);
        }
        let mut child = cmd.spawn().expect("start coordinator");
        let mut line = String::new();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        reader.read_line(&mut line).unwrap();
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        (child, line.trim().strip_prefix("join address: ").expect("join address").to_string())
    };
    let (mut first, join) = coordinator(false, "coordinator-1.log");
    let daemons: Vec<Child> = (0..2)
        .map(|i| {
            bin()
                .args(["worker", "--join", &join, "--threads", "1", "--token-file"])
                .arg(&token)
                .stderr(std::fs::File::create(dir.join(format!("daemon-{i}.log"))).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    // Let it pass a checkpoint, then kill the coordinator outright.
    let checkpoints = dir.join("checkpoints");
    let start = std::time::Instant::now();
    while std::fs::read_dir(&checkpoints).map(|d| d.count()).unwrap_or(0) < 2 {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoints");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let (second, join_again) = coordinator(true, "coordinator-2.log");
    assert_eq!(join, join_again, "the restarted coordinator must keep its address and fingerprint");
    let mut second = second;
    let status = (0..1200)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            second.try_wait().unwrap()
        })
        .unwrap_or_else(|| {
            let _ = second.kill();
            panic!("restarted coordinator did not finish")
        });
    for mut d in daemons {
        let _ = d.kill();
        let _ = d.wait();
    }
    let log = std::fs::read_to_string(dir.join("coordinator-2.log")).unwrap_or_default();
    assert!(status.success(), "restarted coordinator failed:\n{log}");
    let s = summary(&dir);
    assert_eq!((s["steps"].as_u64(), s["world_size"].as_u64()), (Some(468), Some(2)), "{s}");
    assert!(s["test_accuracy"].as_f64().unwrap() > 0.9, "{s}");
}

/// Workers started by a launcher take the rank it gave them (RANK), whatever order they join
/// in; a duplicate rank or a wrong WORLD_SIZE is refused with the reason; MASTER_ADDR,
/// MASTER_PORT and LOCKSTEP_FINGERPRINT stand in for --join.
#[test]
fn launcher_ranks_are_honoured_and_conflicts_refused() {
    let dir = temp_dir("launch-ranks");
    let token = dir.join("token-file");
    std::fs::write(&token, "launch-token").unwrap();
    let trace = dir.join("trace.json");
    let (coord, join) = start_coordinator_of(&dir, &token, 2, &["--trace", trace.to_str().unwrap()]);
    let launched = |rank: &str, world: &str, host: &str| {
        let mut cmd = worker(&join, &token);
        cmd.env("RANK", rank).env("WORLD_SIZE", world).env("HOSTNAME", host);
        cmd
    };
    let first = launched("1", "2", "host-a").spawn().unwrap();
    let log = dir.join("coordinator.log");
    for _ in 0..300 {
        if std::fs::read_to_string(&log).unwrap_or_default().contains("1/2 workers joined") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let duplicate = run(&mut launched("1", "2", "host-c"));
    assert!(!duplicate.status.success());
    assert!(stderr(&duplicate).contains("RANK=1 is taken by the worker on host-a"), "{}", stderr(&duplicate));
    let wrong_world = run(&mut launched("0", "3", "host-d"));
    assert!(stderr(&wrong_world).contains("launched with WORLD_SIZE=3, but this coordinator runs 2 workers"));
    // Rank 0 joins last, through the launcher variables instead of --join.
    let (addr, fingerprint) = join.trim_start_matches("lockstep://").split_once('#').unwrap();
    let (host, port) = addr.rsplit_once(':').unwrap();
    let second = bin()
        .args(["worker", "--once", "--token-file"])
        .arg(&token)
        .env("MASTER_ADDR", host)
        .env("MASTER_PORT", port)
        .env("LOCKSTEP_FINGERPRINT", fingerprint)
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("HOSTNAME", "host-b")
        .spawn()
        .unwrap();
    wait_ok(coord, "coordinator", &dir);
    for mut w in [first, second] {
        assert!(w.wait().unwrap().success());
    }
    let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let names: Vec<&str> = trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "process_name")
        .map(|e| e["args"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["rank 0 (host-b)", "rank 1 (host-a)"]);
    // Without a fingerprint, MASTER_ADDR alone is refused: pinning is not optional.
    let out = run(bin()
        .args(["worker", "--once", "--token-file"])
        .arg(&token)
        .env("MASTER_ADDR", host)
        .env("MASTER_PORT", port)
        .env_remove("LOCKSTEP_FINGERPRINT"));
    assert!(stderr(&out).contains("LOCKSTEP_FINGERPRINT is not"), "{}", stderr(&out));
}
