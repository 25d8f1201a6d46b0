//! The fuzz targets' seed corpus (fuzz/corpus/<target>/), replayed on stable through the same
//! entry points as `cargo +nightly fuzz run <target>`, with truncations and bit flips of
//! every seed: none may panic.

use std::path::Path;

fn replay(target: &str, entry: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut seeds = 0;
    for file in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let bytes = std::fs::read(file.unwrap().path()).unwrap();
        entry(&bytes);
        // A sample of truncations and single-bit flips (every byte would be slow on 8 MB).
        let stride = (bytes.len() / 200).max(1);
        for cut in (0..bytes.len()).step_by(stride) {
            entry(&bytes[..cut]);
            let mut flipped = bytes.clone();
            flipped[cut] ^= 1 << (cut % 8);
            entry(&flipped);
        }
        seeds += 1;
    }
    assert!(seeds > 0, "no seeds in {}", dir.display());
}

#[test]
fn fuzz_seed_corpus_replays_without_panics() {
    replay("frame", lockstep_proto::fuzz::frame);
    replay("job", lockstep_proto::fuzz::job);
    replay("idx", lockstep_nn::fuzz::idx);
    replay("checkpoint", lockstep_nn::fuzz::checkpoint);
    replay("assign", lockstep_worker::fuzz::assign);
    replay("pipe", lockstep_worker::fuzz::pipe);
}
