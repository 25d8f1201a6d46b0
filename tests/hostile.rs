//! Bad input from outside, sent to real processes: a bad flag, assignments no real
//! coordinator would send (from a fake one speaking the real protocol), a bad namespace
//! name. Each gets a clear error naming what is wrong; the process does not panic and, for
//! a daemon, goes on serving.

mod common;
use common::*;
use lockstep_collective::tls::{endpoint, server_config, Identity};
use lockstep_proto::toolbox::Transport;
use lockstep_proto::wire::{read_frame, write_frame, Assign, PeerInfo, Task, ToCoordinator, ToWorker};
use std::process::Stdio;
use std::time::Duration;

#[test]
fn zero_workers_is_refused_with_a_message() {
    for args in [
        &["coordinator", "--listen", "127.0.0.1:0", "--workers", "0", "configs/mnist-mlp.toml"][..],
        &["local", "--workers", "0", "configs/mnist-mlp.toml"],
        &["bench", "allreduce", "--workers", "0"],
    ] {
        let out = run(bin().args(args));
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains("must be at least 1"), "{args:?}: {}", stderr(&out));
    }
}

fn peer(rank: usize) -> PeerInfo {
    PeerInfo { rank, data_addr: "127.0.0.1:9".into(), fingerprint: "00".repeat(32), host_id: "h".into() }
}

fn bench_assign(rank: usize, world: usize, peers: Vec<PeerInfo>, sizes: Vec<u64>, iters: usize) -> ToWorker {
    ToWorker::Assign(Assign {
        rank,
        world,
        seed: 1,
        peers,
        group_secret: "ab".repeat(32),
        task: Task::BenchAllReduce { sizes, iters, transport: Transport::Auto },
    })
}

#[test]
fn a_daemon_refuses_bad_assignments_and_serves_on() {
    let dir = temp_dir("hostile-assign");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let me = Identity::generate().expect("identity");
    let ep = {
        let _guard = rt.enter();
        endpoint("127.0.0.1:0".parse().expect("addr"), server_config(&me, None).expect("tls")).expect("endpoint")
    };
    let join = format!("lockstep://127.0.0.1:{}#{}", ep.local_addr().expect("addr").port(), me.fingerprint);
    let log = dir.join("daemon.log");
    let mut daemon = bin()
        .args(["worker", "--join", &join])
        .env("LOCKSTEP_TOKEN", "t")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start worker");
    rt.block_on(async {
        let conn = tokio::time::timeout(Duration::from_secs(20), async { ep.accept().await.expect("incoming").await })
            .await
            .expect("the worker connects")
            .expect("handshake");
        let (mut send, mut recv) = conn.accept_bi().await.expect("control stream");
        let hello: ToCoordinator = read_frame(&mut recv).await.expect("hello");
        assert!(matches!(hello, ToCoordinator::Hello { .. }), "{hello:?}");
        write_frame(&mut send, &ToWorker::Welcome { worker_id: 1 }).await.expect("welcome");
        let bad = [
            (bench_assign(3, 2, vec![peer(0), peer(1)], vec![1024], 1), "bad assignment: rank 3 of world 2"),
            (bench_assign(0, 2, vec![], vec![1024], 1), "with 0 peers"),
            (bench_assign(0, 0, vec![], vec![1024], 1), "of world 0"),
            (bench_assign(0, 2, vec![peer(1), peer(0)], vec![1024], 1), "not in rank order"),
            (bench_assign(0, 1, vec![peer(0)], vec![1 << 40], 1), "at most"),
        ];
        for (assign, want) in bad {
            write_frame(&mut send, &assign).await.expect("assign");
            match tokio::time::timeout(Duration::from_secs(20), read_frame::<_, ToCoordinator>(&mut recv)).await {
                Ok(Ok(ToCoordinator::Failed { error, .. })) => assert!(error.contains(want), "{want:?} in {error}"),
                other => panic!("expected Failed naming {want:?}, got {other:?}"),
            }
        }
        // iters = 0 is taken as 1: an answer, not a division of an empty list.
        write_frame(&mut send, &bench_assign(0, 1, vec![peer(0)], vec![4096], 0)).await.expect("assign");
        match tokio::time::timeout(Duration::from_secs(20), read_frame::<_, ToCoordinator>(&mut recv)).await {
            Ok(Ok(ToCoordinator::BenchResult { results, .. })) => assert_eq!(results.len(), 1),
            other => panic!("expected a BenchResult, got {other:?}"),
        }
    });
    let alive = daemon.try_wait().expect("try_wait").is_none();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("panicked"), "{text}");
    assert!(alive, "the daemon went on after the bad assignments:\n{text}");
}

#[test]
fn linkem_refuses_a_non_ascii_namespace_name() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep-linkem"))
        .args(["--delay-ms", "1", "nämespace=10.9.9.1", "b=10.9.9.2"])
        .output()
        .expect("start lockstep-linkem");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("nämespace") && err.contains("ASCII"), "{err}");
}
