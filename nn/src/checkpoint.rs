//! Weights on disk as safetensors (little-endian f32, tensor names as the parameters are
//! named: `fc0.weight`, ...), so PyTorch's `safetensors` loads them. Files are written to a
//! temporary name, fsynced, renamed into place and the directory fsynced: a crash leaves
//! either the old file or the new one, never a torn one.

use crate::{NnError, Param, Result};
use lockstep_kernels::Backend;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically (temp file + fsync + rename + directory fsync).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| NnError::Io { path: path.to_path_buf(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

/// One tensor of a file: its name, shape and values (row-major, in the file's layout).
pub type FileTensor = (String, Vec<usize>, Vec<f32>);

/// Serialises named f32 tensors to safetensors bytes.
pub fn to_safetensors(tensors: &[FileTensor]) -> Result<Vec<u8>> {
    to_safetensors_with_metadata(tensors, None)
}

/// The same with string metadata in the header (`__metadata__`), e.g. the job and vocabulary.
pub fn to_safetensors_with_metadata(
    tensors: &[FileTensor],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    serialize(tensors, &[], metadata)
}

/// f32 tensors, f64 tensors (exact state such as running statistics) and metadata.
pub fn serialize(
    tensors: &[FileTensor],
    tensors_f64: &[(String, Vec<usize>, Vec<f64>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes_f64: Vec<Vec<u8>> =
        tensors_f64.iter().map(|(_, _, data)| data.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    let mut named: Vec<(&str, &[u8])> = tensors.iter().map(|(n, _, d)| (n.as_str(), bytemuck_f32(d))).collect();
    named.extend(tensors_f64.iter().zip(&bytes_f64).map(|((n, _, _), b)| (n.as_str(), b.as_slice())));
    let mut metadata = metadata.unwrap_or_default();
    metadata.insert(CRC_KEY.to_string(), format!("{:08x}", data_crc(named)));
    let metadata = Some(metadata);
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    for (name, shape, data) in tensors {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytemuck_f32(data));
        views.push((name.clone(), view.map_err(|e| NnError::Invalid(format!("tensor {name}: {e}")))?));
    }
    for ((name, shape, _), bytes) in tensors_f64.iter().zip(&bytes_f64) {
        let view = TensorView::new(Dtype::F64, shape.clone(), bytes);
        views.push((name.clone(), view.map_err(|e| NnError::Invalid(format!("tensor {name}: {e}")))?));
    }
    safetensors::serialize(views, metadata).map_err(|e| NnError::Invalid(format!("safetensors: {e}")))
}

fn bytemuck_f32(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the target is little-endian.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

/// Saves every parameter's value, with optional header metadata.
pub fn save_weights<B: Backend>(
    be: &B,
    params: &[&Param<B>],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    write_atomic(path, &to_safetensors_with_metadata(&file_tensors(be, params)?, metadata)?)
}

/// Every parameter's value as a file tensor (PyTorch's layout): (name, shape, values).
pub fn file_tensors<B: Backend>(be: &B, params: &[&Param<B>]) -> Result<Vec<FileTensor>> {
    params
        .iter()
        .map(|p| {
            let (shape, values) = p.to_file(&be.download(&p.value)?);
            Ok((p.name.clone(), shape, values))
        })
        .collect()
}

/// The header metadata of a safetensors file (empty if it has none).
pub fn load_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = std::fs::read(path).map_err(|source| NnError::Io { path: path.to_path_buf(), source })?;
    parse_metadata(&bytes, path)
}

/// The header metadata of safetensors `bytes` read from `path` (named in errors).
pub fn parse_metadata(bytes: &[u8], path: &Path) -> Result<HashMap<String, String>> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| NnError::Data {
        path: path.to_path_buf(),
        offset: 0,
        message: format!("not a valid safetensors file: {e}"),
    })?;
    Ok(header.metadata().clone().unwrap_or_default())
}

/// Copies file tensors into `params` by name (from PyTorch's layout); a missing tensor or a
/// shape mismatch is an error naming the tensor and the file.
pub fn load_into<B: Backend>(be: &B, params: &mut [&mut Param<B>], tensors: &TensorMap, path: &Path) -> Result<()> {
    for p in params.iter_mut() {
        let bad = |message: String| NnError::Data { path: path.to_path_buf(), offset: 0, message };
        let (shape, values) = tensors.get(&p.name).ok_or_else(|| bad(format!("no tensor {}", p.name)))?;
        p.value = be.upload(&p.from_file(shape, values).map_err(bad)?)?;
    }
    Ok(())
}

/// Named tensors read from disk: name -> (shape, values).
pub type TensorMap = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Header key of the CRC-32 over every tensor's bytes: safetensors itself has no checksum,
/// and a flipped bit in the data would otherwise load silently.
pub const CRC_KEY: &str = "lockstep.crc32";

/// CRC-32 of (name, bytes) pairs taken in name order.
fn data_crc<'a>(mut named: Vec<(&'a str, &'a [u8])>) -> u32 {
    named.sort_by(|a, b| a.0.cmp(b.0));
    let mut crc = crc32fast::Hasher::new();
    for (name, bytes) in named {
        crc.update(name.as_bytes());
        crc.update(bytes);
    }
    crc.finalize()
}

/// F64 tensors read from disk: name -> (shape, values).
pub type TensorMapF64 = HashMap<String, (Vec<usize>, Vec<f64>)>;

/// Reads every f32 tensor of a safetensors file. A corrupt file is an error naming the
/// file and what is wrong.
pub fn load_tensors(path: &Path) -> Result<TensorMap> {
    Ok(load_all(path)?.0)
}

/// Every f32 and f64 tensor of a safetensors file; any other dtype is an error.
pub fn load_all(path: &Path) -> Result<(TensorMap, TensorMapF64)> {
    let bytes = std::fs::read(path).map_err(|source| NnError::Io { path: path.to_path_buf(), source })?;
    parse_all(&bytes, path)
}

/// Every f32 and f64 tensor of safetensors `bytes` read from `path`, checksum verified.
pub fn parse_all(bytes: &[u8], path: &Path) -> Result<(TensorMap, TensorMapF64)> {
    let bad = |message: String| NnError::Data { path: path.to_path_buf(), offset: 0, message };
    let st =
        safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let tensors = st.tensors();
    if let Some(want) = header.metadata().as_ref().and_then(|m| m.get(CRC_KEY)) {
        let got = format!("{:08x}", data_crc(tensors.iter().map(|(n, v)| (n.as_str(), v.data())).collect()));
        if *want != got {
            return Err(bad(format!("checksum mismatch (header {want}, data {got}): the file is corrupt")));
        }
    }
    let (mut f32s, mut f64s) = (HashMap::new(), HashMap::new());
    for (name, view) in tensors {
        let shape = view.shape().to_vec();
        match view.dtype() {
            Dtype::F32 => {
                let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                f32s.insert(name, (shape, values.collect()));
            }
            Dtype::F64 => {
                let values = view.data().chunks_exact(8).map(|b| {
                    let mut le = [0u8; 8];
                    le.copy_from_slice(b);
                    f64::from_le_bytes(le)
                });
                f64s.insert(name, (shape, values.collect()));
            }
            other => return Err(bad(format!("tensor {name} is {other:?}, expected F32 or F64"))),
        }
    }
    Ok((f32s, f64s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_kernels::CpuBackend;

    #[test]
    fn round_trip_and_corruption() {
        let be = CpuBackend::new(1);
        let dir = std::env::temp_dir().join(format!("lockstep-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = Param::new(&be, "fc0.weight", &[2, 3], &[1., 2., 3., 4., 5., 6.], true).unwrap();
        let b = Param::new(&be, "fc0.bias", &[2], &[-1., 0.5], false).unwrap();
        let path = dir.join("model.safetensors");
        save_weights(&be, &[&a, &b], None, &path).unwrap();
        let t = load_tensors(&path).unwrap();
        assert_eq!(t["fc0.weight"], (vec![2, 3], vec![1., 2., 3., 4., 5., 6.]));
        assert_eq!(t["fc0.bias"], (vec![2], vec![-1., 0.5]));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x10; // one bit of fc0.bias
        std::fs::write(&path, &bytes).unwrap();
        let err = load_tensors(&path).unwrap_err().to_string();
        assert!(err.contains("model.safetensors") && err.contains("checksum mismatch"), "{err}");
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = load_tensors(&path).unwrap_err().to_string();
        assert!(err.contains("model.safetensors") && err.contains("not a valid safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
