//! Parameters in files are in PyTorch's layout, so `load_state_dict` takes lockstep's
//! files as they are. Only convolution weights differ from memory: the NHWC kernels want
//! the channel axis last, PyTorch puts it second. The transpose happens here, at the file
//! boundary, and nowhere else.

/// How a parameter's file layout relates to its memory layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileLayout {
    /// The same (Linear, embeddings, norms, recurrent cells, biases).
    #[default]
    Same,
    /// Memory (A, KH, KW, B), file (A, B, KH, KW): Conv2d (OC, KH, KW, C) ↔ PyTorch
    /// (OC, C, KH, KW); ConvTranspose2d (Cin, KH, KW, OC) ↔ PyTorch (Cin, OC, KH, KW).
    ChannelsFirst,
    /// Memory (OC, 1, K, C), file (OC, C, K): Conv1d, a Conv2d over height-1 images.
    ChannelsFirst1d,
}

impl FileLayout {
    /// The file shape of a tensor of memory shape `shape`.
    pub fn file_shape(self, shape: &[usize]) -> Vec<usize> {
        match (self, shape) {
            (Self::ChannelsFirst, &[a, kh, kw, b]) => vec![a, b, kh, kw],
            (Self::ChannelsFirst1d, &[a, 1, k, b]) => vec![a, b, k],
            _ => shape.to_vec(),
        }
    }

    /// `values` of memory shape `shape`, reordered for the file.
    pub fn to_file(self, shape: &[usize], values: &[f32]) -> Vec<f32> {
        match (self, shape) {
            (Self::Same, _) | (_, [_]) => values.to_vec(),
            (_, &[a, kh, kw, b]) => permute_inner(values, a, kh * kw, b),
            _ => values.to_vec(),
        }
    }

    /// File `values` (already checked to have `file_shape(shape)`), reordered for memory.
    pub fn from_file(self, shape: &[usize], values: &[f32]) -> Vec<f32> {
        match (self, shape) {
            (Self::Same, _) | (_, [_]) => values.to_vec(),
            (_, &[a, kh, kw, b]) => permute_inner(values, a, b, kh * kw),
            _ => values.to_vec(),
        }
    }
}

/// For each of `outer` blocks, the (rows, cols) matrix transposed to (cols, rows).
fn permute_inner(values: &[f32], outer: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for o in 0..outer {
        let (src, dst) = (&values[o * rows * cols..][..rows * cols], &mut out[o * rows * cols..][..rows * cols]);
        for r in 0..rows {
            for c in 0..cols {
                dst[c * rows + r] = src[r * cols + c];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_weight_round_trips_in_pytorch_order() {
        // Memory (OC=2, KH=1, KW=2, C=3): value = 100·oc + 10·kw + c.
        let shape = [2, 1, 2, 3];
        let memory: Vec<f32> = (0..2)
            .flat_map(|oc| (0..2).flat_map(move |kw| (0..3).map(move |c| (100 * oc + 10 * kw + c) as f32)))
            .collect();
        let file = FileLayout::ChannelsFirst.to_file(&shape, &memory);
        assert_eq!(FileLayout::ChannelsFirst.file_shape(&shape), [2, 3, 1, 2]);
        // File (OC, C, KH, KW): c varies slower than kw.
        assert_eq!(file[..6], [0., 10., 1., 11., 2., 12.]);
        assert_eq!(file[6], 100.);
        assert_eq!(FileLayout::ChannelsFirst.from_file(&shape, &file), memory);
        assert_eq!(FileLayout::ChannelsFirst1d.file_shape(&shape), [2, 3, 2]);
        assert_eq!(FileLayout::ChannelsFirst1d.to_file(&shape, &memory), file);
        assert_eq!(FileLayout::Same.to_file(&shape, &memory), memory);
    }
}
