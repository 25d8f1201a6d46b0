//! Test hosts over a real network: network namespaces made by scripts/netns-cluster.sh, a
//! coordinator in one and workers in others, started by scripts/launch.sh. Needs root (CI
//! is); where namespaces cannot be made the tests say why and pass without running.

mod common;

use common::{repo, summary};
use std::path::{Path, PathBuf};
use std::process::Command;

fn script(name: &str) -> PathBuf {
    repo().join("scripts").join(name)
}

/// Why namespaces cannot be used here, if they cannot.
fn netns_unavailable(probe: &str) -> Option<String> {
    let made = Command::new("ip").args(["netns", "add", probe]).output();
    match made {
        Err(e) => Some(format!("`ip` is not available: {e}")),
        Ok(out) if !out.status.success() => {
            Some(format!("cannot create a network namespace: {}", String::from_utf8_lossy(&out.stderr).trim()))
        }
        Ok(_) => {
            let _ = Command::new("ip").args(["netns", "del", probe]).status();
            None
        }
    }
}

/// N test hosts `<prefix>0..` on `<subnet>.1..`; torn down on drop.
struct Cluster {
    prefix: String,
}

impl Cluster {
    fn up(prefix: &str, subnet: &str, n: usize, impairment: &[&str]) -> Self {
        let out = Command::new("bash")
            .arg(script("netns-cluster.sh"))
            .args(["up", &n.to_string(), "--prefix", prefix, "--subnet", subnet])
            .args(impairment)
            .env("LINKEM", env!("CARGO_BIN_EXE_lockstep-linkem"))
            .output()
            .expect("run netns-cluster.sh");
        assert!(out.status.success(), "netns-cluster.sh up failed:\n{}", String::from_utf8_lossy(&out.stderr));
        eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim());
        Self { prefix: prefix.to_string() }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script("netns-cluster.sh")).args(["down", "--prefix", &self.prefix]).status();
    }
}

fn temp(name: &str) -> PathBuf {
    common::temp_dir(name)
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write file");
}

/// The end-to-end test: mnist-mlp with the coordinator in one namespace and three
/// workers in three others, every link 20 ms one way and losing 0.5% of packets, started
/// by launch.sh from a hostfile (ssh replaced by `ip netns exec` through --rsh).
#[test]
fn mnist_trains_across_namespaces_with_delay_and_loss() {
    if let Some(why) = netns_unavailable("lsaprobe") {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let _cluster = Cluster::up("lsa", "10.77.1", 4, &["--delay", "20", "--loss", "0.5"]);
    let dir = temp("netns-mnist");
    let hostfile = dir.join("hosts");
    write(&hostfile, "# coordinator only\nlsa0 slots=0 addr=10.77.1.1\nlsa1 addr=10.77.1.2\nlsa2 addr=10.77.1.3\nlsa3 addr=10.77.1.4\n");
    let out_dir = dir.join("run");
    let out = Command::new("bash")
        .arg(script("launch.sh"))
        .args(["--hostfile", hostfile.to_str().unwrap(), "--rsh", script("netns-rsh.sh").to_str().unwrap()])
        .args(["--bin", env!("CARGO_BIN_EXE_lockstep"), "--workdir", repo().to_str().unwrap()])
        .args(["--out", out_dir.to_str().unwrap(), "--logs", dir.join("logs").to_str().unwrap()])
        // BBR: with random loss, Cubic reads every drop as congestion (see tls::Congestion).
        .args(["--worker-args", "--threads 1 --congestion bbr", "--coordinator-args", "--congestion bbr"])
        .args(["--", "configs/mnist-mlp.toml", "--trace", out_dir.join("trace.json").to_str().unwrap()])
        .args(["--set", "train.epochs=3", "--set", "train.batch_size=256", "--set", "optim.lr=0.002"])
        .current_dir(repo())
        .output()
        .expect("run launch.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "launch.sh failed:\n{stderr}");
    let s = summary(&out_dir);
    let accuracy = s["test_accuracy"].as_f64().unwrap();
    eprintln!(
        "netns run: {} steps in {:.1} s, {:.0} examples/s, test accuracy {:.2}%",
        s["steps"],
        s["wall_s"].as_f64().unwrap(),
        s["examples_per_s"].as_f64().unwrap(),
        accuracy * 100.0
    );
    assert_eq!(s["world_size"], 3);
    assert!(accuracy >= 0.975, "test accuracy {accuracy} below 97.5%");
    // Delay and loss change the timing, never the numbers: the same job on loopback, in the
    // same topology (a QUIC ring of 3; on one host `auto` would pick shared memory and sum
    // in another order), ends with the same weights, bit for bit.
    let loopback = dir.join("loopback");
    let out = common::run(common::bin().args(["local", "--workers", "3", "--quiet", "--out"]).arg(&loopback).args([
        "configs/mnist-mlp.toml",
        "--set",
        "collective.transport=\"quic\"",
        "--set",
        "train.epochs=3",
        "--set",
        "train.batch_size=256",
        "--set",
        "optim.lr=0.002",
    ]));
    assert!(out.status.success(), "{}", common::stderr(&out));
    let reference = summary(&loopback);
    eprintln!("loopback run: {:.0} examples/s", reference["examples_per_s"].as_f64().unwrap());
    assert_eq!(s["weight_hash"], reference["weight_hash"], "lossy-network and loopback runs differ");
    // Ranks follow the hostfile: rank r ran on host lsa<r+1>.
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("trace.json")).unwrap()).unwrap();
    for rank in 0..3 {
        let want = format!("rank {rank} (lsa{})", rank + 1);
        assert!(
            trace["traceEvents"].as_array().unwrap().iter().any(|e| e["args"]["name"] == want.as_str()),
            "no process named {want:?} in the trace"
        );
    }
}

/// launch.sh under Slurm's and Open MPI's variables: one task per namespace, as `srun` or
/// `mpirun` would start them, meeting through the shared run directory.
#[test]
fn launch_reads_slurm_and_mpirun_rank_variables() {
    if let Some(why) = netns_unavailable("lsbprobe") {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let _cluster = Cluster::up("lsb", "10.77.2", 3, &[]);
    let dir = temp("netns-launchers");
    let launchers = [
        ("slurm", ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID"]),
        (
            "mpirun",
            ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_MCA_ess_base_jobid"],
        ),
    ];
    for (launcher, [rank_var, size_var, local_var, job_var]) in launchers {
        let out_dir = dir.join(launcher);
        let trace = out_dir.join("trace.json");
        // Started in reverse, so the workers wait for the coordinator's join file.
        let tasks: Vec<_> = (0..3)
            .rev()
            .map(|rank| {
                let mut task = Command::new("ip");
                task.args(["netns", "exec", &format!("lsb{rank}"), "bash"])
                    .arg(script("launch.sh"))
                    .args(["--bin", env!("CARGO_BIN_EXE_lockstep"), "--out", out_dir.to_str().unwrap()])
                    .args(["--worker-args", "--threads 1", "--port", "7171"])
                    .args(["--", "configs/mnist-mlp.toml", "--trace", trace.to_str().unwrap()])
                    .args(["--set", "train.max_steps=20", "--set", "data.train_limit=4000"])
                    .args(["--set", "data.test_limit=500"])
                    // One launcher's run goes over TLS-over-TCP rings between the hosts.
                    .args([
                        "--set",
                        if launcher == "mpirun" { "collective.inter_host=\"tcp\"" } else { "data.test_limit=500" },
                    ])
                    .env(rank_var, rank.to_string())
                    .env(size_var, "3")
                    .env(local_var, "0")
                    .env(job_var, "4242")
                    .env("MASTER_ADDR", "10.77.2.1")
                    .env("HOSTNAME", format!("lsb{rank}"))
                    .env("RUST_LOG", "warn")
                    .env_remove("LOCKSTEP_TOKEN")
                    .current_dir(repo());
                (rank, task.spawn().expect("start launch.sh"))
            })
            .collect();
        for (rank, task) in tasks {
            let out = task.wait_with_output().expect("wait for launch.sh");
            assert!(out.status.success(), "{launcher}: task {rank} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        let s = summary(&out_dir);
        assert_eq!((s["world_size"].as_u64(), s["steps"].as_u64()), (Some(3), Some(20)), "{launcher}");
        let link = if launcher == "mpirun" { "tcp" } else { "quic" };
        assert_eq!(s["collective"], format!("ring: 3 ranks on 3 hosts, {link}"), "{launcher}");
        // Each task became the rank its launcher variables said, on its own host.
        let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
        for rank in 0..3 {
            let want = format!("rank {rank} (lsb{rank})");
            assert!(
                trace["traceEvents"].as_array().unwrap().iter().any(|e| e["args"]["name"] == want.as_str()),
                "{launcher}: no process named {want:?} in the trace"
            );
        }
    }
}
