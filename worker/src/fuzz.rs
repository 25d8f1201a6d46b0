//! Fuzz entry points of the worker's side, shared by the cargo-fuzz targets in `fuzz/` and
//! the corpus replay test: each must return (Ok or Err) on any input, never panic, hang or
//! allocate what a frame merely claims.

use lockstep_proto::wire::{decode_payload, ToWorker};

/// A frame from the coordinator as the worker takes it: decoded, and an `Assign` checked
/// as `run_task` checks it before connecting anywhere (rank, peers, job, pipeline
/// placement, benchmark sizes).
pub fn assign(data: &[u8]) {
    if let Ok(ToWorker::Assign(assign)) = decode_payload::<ToWorker>(data) {
        let _ = crate::daemon::check_task(&assign);
    }
}

/// A pipeline link frame (sequence number, shape, values), as both links read it.
pub fn pipe(data: &[u8]) {
    let _ = lockstep_collective::pipe::decode_frame(data, 0);
    let _ = lockstep_collective::pipe::decode_frame(data, 1);
}

#[cfg(test)]
mod tests {
    use lockstep_proto::wire::{encode_frame, Assign, PeerInfo, Task, ToWorker};

    fn peers(world: usize) -> Vec<PeerInfo> {
        let peer = |rank| PeerInfo {
            rank,
            data_addr: format!("127.0.0.1:{}", 7000 + rank),
            fingerprint: "ab".repeat(32),
            host_id: "host/boot/net:1".into(),
        };
        (0..world).map(peer).collect()
    }

    fn assign(rank: usize, world: usize, task: Task) -> Assign {
        Assign { rank, world, seed: 7, peers: peers(world), group_secret: "ef".repeat(32), task }
    }

    fn train(job: &str) -> Task {
        Task::Train {
            job_toml: job.into(),
            threads: 1,
            bucket_bytes: 1 << 20,
            weights_path: None,
            checkpoint_dir: Some("/tmp/ckpt".into()),
            resume_path: None,
            trace: false,
        }
    }

    const JOB: &str = "name = 'x'\n[model]\nkind = 'mlp'\nhidden = [8]\n[data]\nkind = 'idx'\ndir = 'd'\n\
                       [train]\nepochs = 1\nbatch_size = 4\n[optim]\nkind = 'sgd'\nlr = 0.1\n";

    fn pipeline_job(stages: usize) -> String {
        format!("{JOB}[parallel]\npipeline_stages = {stages}\n")
    }

    /// Payloads (frame without its length prefix) of real assignments.
    fn assign_seeds() -> Vec<(&'static str, Vec<u8>)> {
        let bench = Task::BenchAllReduce { sizes: vec![4096, 1 << 20], iters: 3, transport: Default::default() };
        let seeds = [
            ("train", assign(1, 2, train(JOB))),
            ("pipeline", assign(3, 4, train(&pipeline_job(2)))),
            ("bench", assign(0, 2, bench)),
        ];
        seeds.into_iter().map(|(name, a)| (name, encode_frame(&ToWorker::Assign(a)).unwrap()[4..].to_vec())).collect()
    }

    fn pipe_seeds() -> Vec<(&'static str, Vec<u8>)> {
        let values: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        vec![
            ("activation", lockstep_collective::pipe::encode(0, &[2, 3], &values)),
            ("gradient", lockstep_collective::pipe::encode(1, &[6], &values)),
            ("empty", lockstep_collective::pipe::encode(0, &[0, 4], &[])),
        ]
    }

    #[test]
    fn seed_assignments_pass_and_bad_ones_are_refused_by_name() {
        for (name, payload) in assign_seeds() {
            let ToWorker::Assign(a) = lockstep_proto::wire::decode_payload(&payload).unwrap() else { panic!() };
            assert!(crate::daemon::check_task(&a).is_ok(), "{name}");
        }
        let refused = |a: Assign| crate::daemon::check_task(&a).unwrap_err().to_string();
        assert!(refused(assign(2, 2, train(JOB))).contains("rank 2 of world 2"));
        assert!(refused(assign(0, 3, train(&pipeline_job(2)))).contains("3 workers do not divide into 2"));
        let huge = Task::BenchAllReduce { sizes: vec![u64::MAX], iters: 1, transport: Default::default() };
        assert!(refused(assign(0, 1, huge)).contains("at most"));
        assert!(refused(assign(0, 1, train("name = "))).contains("<assigned job>"));
    }

    #[test]
    fn pipe_frames_decode_and_bad_headers_are_refused_before_allocating() {
        let (shape, values) = lockstep_collective::pipe::decode_frame(&pipe_seeds()[0].1, 0).unwrap();
        assert_eq!((shape, values.len()), (vec![2, 3], 6));
        // A header claiming 2^30 values with 24 bytes behind it: an error, no 4 GiB buffer.
        let mut claim = lockstep_collective::pipe::encode(0, &[1 << 15, 1 << 15], &[]);
        claim.extend([0u8; 24]);
        let err = lockstep_collective::pipe::decode_frame(&claim, 0).unwrap_err().to_string();
        assert!(err.contains("needs 4294967296 bytes"), "{err}");
        let err = lockstep_collective::pipe::decode_frame(&pipe_seeds()[1].1, 0).unwrap_err().to_string();
        assert!(err.contains("expected message 0"), "{err}");
        let mut many_dims = 0u64.to_le_bytes().to_vec();
        many_dims.extend(9u32.to_le_bytes());
        let err = lockstep_collective::pipe::decode_frame(&many_dims, 0).unwrap_err().to_string();
        assert!(err.contains("9 dims"), "{err}");
    }

    /// Writes the seed corpora of the `assign` and `pipe` fuzz targets:
    /// `cargo test -p lockstep-worker -- --ignored write_worker_corpora`.
    #[test]
    #[ignore]
    fn write_worker_corpora() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        for (target, seeds) in [("assign", assign_seeds()), ("pipe", pipe_seeds())] {
            std::fs::create_dir_all(root.join(target)).unwrap();
            for (name, bytes) in seeds {
                std::fs::write(root.join(target).join(name), bytes).unwrap();
            }
        }
    }
}
