//! Fuzz entry points, shared by the cargo-fuzz targets in `fuzz/` and the corpus replay
//! test: each must return (Ok or Err) on any input, never panic or hang.

use crate::wire::{decode_payload, ToCoordinator, ToWorker};
use std::path::Path;

/// A frame payload from the network, as either side decodes it.
pub fn frame(data: &[u8]) {
    let _ = decode_payload::<ToCoordinator>(data);
    let _ = decode_payload::<ToWorker>(data);
}

/// A job file, with and without a `--set` override.
pub fn job(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::JobSpec::parse(text, Path::new("fuzz.toml"), &[]);
        let _ = crate::JobSpec::parse(text, Path::new("fuzz.toml"), &["train.epochs=2".to_string()]);
    }
}

#[cfg(test)]
mod tests {
    use crate::trace::{SpanKind, TraceSpan};
    use crate::wire::{encode_frame, Assign, PeerInfo, Task, ToCoordinator, ToWorker, PROTOCOL_VERSION};

    /// Real messages of both directions, as frame payloads (the 4-byte length removed).
    fn seed_payloads() -> Vec<(&'static str, Vec<u8>)> {
        let hello = ToCoordinator::Hello {
            version: PROTOCOL_VERSION,
            token: "token".into(),
            host: "host".into(),
            host_id: "host/boot/net:1".into(),
            pid: 42,
            data_addr: "127.0.0.1:7000".into(),
            fingerprint: "ab".repeat(32),
            rank: Some(1),
            world_size: Some(2),
            local_rank: Some(0),
        };
        let assign = ToWorker::Assign(Assign {
            rank: 1,
            world: 2,
            seed: 7,
            peers: vec![PeerInfo {
                rank: 0,
                data_addr: "127.0.0.1:7001".into(),
                fingerprint: "cd".repeat(32),
                host_id: "h".into(),
            }],
            group_secret: "ef".repeat(32),
            task: Task::Train {
                job_toml: "name = \"x\"".into(),
                threads: 1,
                bucket_bytes: 1 << 20,
                weights_path: Some("/tmp/w".into()),
                checkpoint_dir: None,
                resume_path: None,
                trace: true,
            },
        });
        let status_query = ToCoordinator::StatusQuery { version: PROTOCOL_VERSION, token: "token".into() };
        let progress = ToCoordinator::Progress { rank: 1, step: 10, examples_per_s: 100.0, comm_share: 0.5 };
        let span = TraceSpan { kind: SpanKind::AllReduce, step: 3, detail: 1, start_us: 10, dur_us: 5 };
        let trace = ToCoordinator::Trace { rank: 0, spans: vec![span; 3] };
        let payload = |frame: Vec<u8>| frame[4..].to_vec();
        vec![
            ("hello", payload(encode_frame(&hello).unwrap())),
            (
                "ready",
                payload(
                    encode_frame(&ToCoordinator::Ready { rank: 0, init_weight_hash: 9, total_steps: 100 }).unwrap(),
                ),
            ),
            ("assign", payload(encode_frame(&assign).unwrap())),
            ("abort", payload(encode_frame(&ToWorker::Abort { reason: "r".into() }).unwrap())),
            ("status-query", payload(encode_frame(&status_query).unwrap())),
            ("progress", payload(encode_frame(&progress).unwrap())),
            ("trace", payload(encode_frame(&trace).unwrap())),
        ]
    }

    #[test]
    fn seed_frames_decode_and_mutations_do_not_panic() {
        for (name, bytes) in seed_payloads() {
            super::frame(&bytes);
            for cut in 0..bytes.len() {
                super::frame(&bytes[..cut]); // every truncation
            }
            let mut flipped = bytes.clone();
            for i in 0..flipped.len() {
                flipped[i] ^= 0xff;
                super::frame(&flipped);
                flipped[i] ^= 0xff;
            }
            assert!(!bytes.is_empty(), "{name}");
        }
    }

    /// Writes the seed corpus of the `frame` fuzz target:
    /// `cargo test -p lockstep-proto -- --ignored write_frame_corpus`.
    #[test]
    #[ignore]
    fn write_frame_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seed_payloads() {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}
