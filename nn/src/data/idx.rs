//! IDX files (the MNIST format), plain or gzip-compressed. Header: two zero bytes, a type
//! byte (0x08 = u8), the number of dimensions, then each dimension as a big-endian u32.
//! Every error names the file and the byte offset where the problem is.

use super::Dataset;
use crate::{NnError, Result};
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

fn data_err<T>(path: &Path, offset: u64, message: impl Into<String>) -> Result<T> {
    Err(NnError::Data { path: path.to_path_buf(), offset, message: message.into() })
}

/// Counts the compressed bytes the decoder has pulled, to place a gzip error.
struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// The decompressed bytes of `path` (gzip is recognised by its magic bytes).
fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|source| NnError::Io { path: path.to_path_buf(), source })?;
    if raw.len() < 2 || raw[..2] != [0x1f, 0x8b] {
        return Ok(raw);
    }
    let mut decoder = GzDecoder::new(CountingReader { inner: &raw[..], count: 0 });
    let mut out = Vec::new();
    if let Err(e) = decoder.read_to_end(&mut out) {
        let at = decoder.get_ref().count;
        return data_err(
            path,
            at,
            format!(
                "corrupt or truncated gzip data (near compressed byte {at}, {} bytes decompressed): {e}",
                out.len()
            ),
        );
    }
    Ok(out)
}

/// Parses an IDX file of unsigned bytes.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let bytes = read_bytes(path)?;
    parse_idx(&bytes, path)
}

/// Parses IDX bytes; `path` names the source in errors (offsets are into the IDX bytes).
pub fn parse_idx(bytes: &[u8], path: &Path) -> Result<IdxArray> {
    if bytes.len() < 4 {
        return data_err(path, bytes.len() as u64, "file ends inside the 4-byte IDX magic");
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return data_err(
            path,
            0,
            format!("not an IDX file: magic starts {:02x} {:02x}, expected 00 00", bytes[0], bytes[1]),
        );
    }
    if bytes[2] != 0x08 {
        return data_err(path, 2, format!("IDX data type 0x{:02x} unsupported (only 0x08, unsigned byte)", bytes[2]));
    }
    let ndims = bytes[3] as usize;
    if ndims == 0 {
        return data_err(path, 3, "IDX file declares 0 dimensions");
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return data_err(
            path,
            bytes.len() as u64,
            format!("file ends inside the header ({ndims} dimensions need {header} bytes)"),
        );
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| u32::from_be_bytes([bytes[4 + 4 * i], bytes[5 + 4 * i], bytes[6 + 4 * i], bytes[7 + 4 * i]]) as usize)
        .collect();
    let expected = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let Some(expected) = expected else {
        return data_err(path, 4, format!("dimensions {dims:?} overflow"));
    };
    let found = bytes.len() - header;
    if found < expected {
        return data_err(path, bytes.len() as u64, format!("truncated: dimensions {dims:?} need {expected} data bytes after the {header}-byte header, found {found}"));
    }
    if found > expected {
        return data_err(
            path,
            (header + expected) as u64,
            format!("{} unexpected bytes after the data of dimensions {dims:?}", found - expected),
        );
    }
    Ok(IdxArray { dims, data: bytes[header..].to_vec() })
}

/// `dir/{prefix}-{kind}-idx{n}-ubyte(.gz)`, whichever exists.
fn find_file(dir: &Path, prefix: &str, kind: &str, n: u8) -> Result<PathBuf> {
    let base = format!("{prefix}-{kind}-idx{n}-ubyte");
    for name in [format!("{base}.gz"), base.clone()] {
        let path = dir.join(&name);
        if path.exists() {
            return Ok(path);
        }
    }
    Err(NnError::Io {
        path: dir.join(format!("{base}.gz")),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("neither {base}.gz nor {base} in {}", dir.display()),
        ),
    })
}

/// Loads an MNIST-layout split (`prefix` = "train" or "t10k") from `dir`. Pixels are
/// returned as raw 0..255 values in f32; normalisation is a separate, fitted step.
pub fn load_idx_split(dir: &Path, prefix: &str) -> Result<Dataset> {
    let images_path = find_file(dir, prefix, "images", 3)?;
    let labels_path = find_file(dir, prefix, "labels", 1)?;
    let images = read_idx(&images_path)?;
    let labels = read_idx(&labels_path)?;
    if images.dims.len() < 2 {
        return data_err(&images_path, 3, format!("images need at least 2 dimensions, found {:?}", images.dims));
    }
    if labels.dims.len() != 1 {
        return data_err(&labels_path, 3, format!("labels need 1 dimension, found {:?}", labels.dims));
    }
    if images.dims[0] != labels.dims[0] {
        return data_err(
            &labels_path,
            4,
            format!("{} labels for {} images in {}", labels.dims[0], images.dims[0], images_path.display()),
        );
    }
    let features = images.dims[1..].iter().product();
    let classes = labels.data.iter().copied().max().map_or(0, |m| m as usize + 1);
    Ok(Dataset {
        features,
        classes,
        x: images.data.iter().map(|&p| p as f32).collect(),
        y: labels.data.iter().map(|&l| l as u32).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn parses_good_file() {
        let a = parse_idx(&idx(&[2, 3], &[1, 2, 3, 4, 5, 6]), Path::new("x")).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn errors_name_file_and_offset() {
        let p = Path::new("images.idx");
        let err = |b: &[u8]| parse_idx(b, p).unwrap_err().to_string();
        assert!(err(&[0, 0]).contains("byte offset 2"));
        assert!(err(&[1, 0, 8, 1]).contains("byte offset 0: not an IDX file"));
        assert!(err(&[0, 0, 0x0d, 1]).contains("byte offset 2"));
        assert!(err(&[0, 0, 8, 2, 0, 0, 0, 2]).contains("byte offset 8: file ends inside the header"));
        let e = err(&idx(&[2, 3], &[1, 2, 3]));
        assert!(e.starts_with("images.idx: byte offset 15: truncated") && e.contains("need 6"), "{e}");
        assert!(err(&idx(&[2], &[1, 2, 3])).contains("byte offset 10: 1 unexpected bytes"));
    }

    #[test]
    fn corrupt_gzip_is_reported_with_offset() {
        use flate2::{write::GzEncoder, Compression};
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("lockstep-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(&idx(&[100], &(0..100).collect::<Vec<u8>>())).unwrap();
        let gz = enc.finish().unwrap();
        let good = dir.join("good.gz");
        std::fs::write(&good, &gz).unwrap();
        assert_eq!(read_idx(&good).unwrap().dims, vec![100]);
        let truncated = dir.join("truncated.gz");
        std::fs::write(&truncated, &gz[..gz.len() / 2]).unwrap();
        let e = read_idx(&truncated).unwrap_err().to_string();
        assert!(e.contains("truncated.gz") && e.contains("byte offset") && e.contains("gzip"), "{e}");
        let mut flipped = gz.clone();
        let n = flipped.len();
        flipped[n - 6] ^= 0xff; // inside the CRC32 trailer
        let bad = dir.join("flipped.gz");
        std::fs::write(&bad, &flipped).unwrap();
        assert!(read_idx(&bad).unwrap_err().to_string().contains("flipped.gz"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
