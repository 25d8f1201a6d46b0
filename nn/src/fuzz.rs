//! Fuzz entry points, shared by the cargo-fuzz targets in `fuzz/` and the corpus replay
//! test: each must return (Ok or Err) on any input, never panic or hang.

use std::path::Path;

/// An IDX file (MNIST layout, optionally gzip-compressed).
pub fn idx(data: &[u8]) {
    let _ = crate::data::idx::parse_idx(data, Path::new("fuzz.idx"));
}

/// A safetensors file: tensors (with the CRC check) and the header metadata, including the
/// numbers a checkpoint keeps there.
pub fn checkpoint(data: &[u8]) {
    let path = Path::new("fuzz.safetensors");
    let _ = crate::checkpoint::parse_all(data, path);
    if let Ok(meta) = crate::checkpoint::parse_metadata(data, path) {
        for key in ["lockstep.step", "lockstep.optimizer_step"] {
            let _ = meta.get(key).map(|v| v.parse::<u64>());
        }
        let _ = crate::data::text::Tokenizer::from_metadata(&meta, path);
    }
}
