//! Sliding-window ops on NHWC images as plain loops over slices: im2col/col2im for
//! convolution and max/average pooling. The CPU backend calls these directly; the trait's
//! default methods call them through a host round trip until a backend has its own.

/// A window sliding over (H, W) images with C channels: kernel (kh, kw), stride, zero padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Window {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }
    /// Input row/column of output (oh, ow) at kernel tap (i, j), if inside the image.
    #[inline]
    fn tap(&self, oh: usize, ow: usize, i: usize, j: usize) -> Option<(usize, usize)> {
        let ih = (oh * self.stride + i).checked_sub(self.pad)?;
        let iw = (ow * self.stride + j).checked_sub(self.pad)?;
        (ih < self.h && iw < self.w).then_some((ih, iw))
    }
}

/// The one traversal every sliding-window op is built on: for each output position
/// `row` of `n` NHWC images (in output order) and each kernel tap `tap` (in (kh, kw)
/// order), calls `f(row, tap, Some(offset of that input pixel's channel 0))`, or
/// `f(row, tap, None)` where the tap falls in the zero padding.
fn for_each_patch(win: &Window, n: usize, mut f: impl FnMut(usize, usize, Option<usize>)) {
    let (oh_n, ow_n) = (win.out_h(), win.out_w());
    let mut row = 0;
    for img in 0..n {
        let base = img * win.h * win.w * win.c;
        for oh in 0..oh_n {
            for ow in 0..ow_n {
                for i in 0..win.kh {
                    for j in 0..win.kw {
                        let pixel = win.tap(oh, ow, i, j).map(|(ih, iw)| base + (ih * win.w + iw) * win.c);
                        f(row, i * win.kw + j, pixel);
                    }
                }
                row += 1;
            }
        }
    }
}

/// cols (N·OH·OW, KH·KW·cg) ← patches of channels [c0, c0+cg) of x (N, H, W, C).
/// Column order within a row is (kh, kw, c), matching a weight stored (OC, KH, KW, cg).
pub fn im2col(x: &[f32], win: &Window, n: usize, c0: usize, cg: usize, cols: &mut [f32]) {
    let row_len = win.kh * win.kw * cg;
    for_each_patch(win, n, |row, tap, pixel| {
        let dst = &mut cols[row * row_len + tap * cg..row * row_len + (tap + 1) * cg];
        match pixel {
            Some(p) => dst.copy_from_slice(&x[p + c0..p + c0 + cg]),
            None => dst.fill(0.0),
        }
    });
}

/// dx channels [c0, c0+cg) += the patches of dcols scattered back (the adjoint of im2col).
pub fn col2im(dcols: &[f32], win: &Window, n: usize, c0: usize, cg: usize, dx: &mut [f32]) {
    let row_len = win.kh * win.kw * cg;
    for_each_patch(win, n, |row, tap, pixel| {
        if let Some(p) = pixel {
            let src = &dcols[row * row_len + tap * cg..row * row_len + (tap + 1) * cg];
            dx[p + c0..p + c0 + cg].iter_mut().zip(src).for_each(|(d, s)| *d += s);
        }
    });
}

/// y (N, OH, OW, C) = max over each window of x; `argmax` holds the flat index into x of
/// each maximum (padding never wins: windows start inside the image).
pub fn max_pool_forward(x: &[f32], win: &Window, n: usize, y: &mut [f32], argmax: &mut [u32]) {
    let c = win.c;
    for_each_patch(win, n, |row, tap, pixel| {
        let (y, argmax) = (&mut y[row * c..(row + 1) * c], &mut argmax[row * c..(row + 1) * c]);
        if tap == 0 {
            y.fill(f32::NEG_INFINITY);
            argmax.fill(u32::MAX);
        }
        if let Some(p) = pixel {
            for ch in 0..c {
                if x[p + ch] > y[ch] || argmax[ch] == u32::MAX {
                    y[ch] = x[p + ch];
                    argmax[ch] = (p + ch) as u32;
                }
            }
        }
    });
}

/// dx[argmax[o]] += dy[o]: the gradient goes to the element that won (T7).
pub fn max_pool_backward(dy: &[f32], argmax: &[u32], dx: &mut [f32]) {
    for (&g, &i) in dy.iter().zip(argmax) {
        if i != u32::MAX {
            dx[i as usize] += g;
        }
    }
}

/// y = mean over each KH·KW window (zero padding counts toward the mean).
pub fn avg_pool_forward(x: &[f32], win: &Window, n: usize, y: &mut [f32]) {
    let (c, taps) = (win.c, win.kh * win.kw);
    for_each_patch(win, n, |row, tap, pixel| {
        let y = &mut y[row * c..(row + 1) * c];
        if tap == 0 {
            y.fill(0.0);
        }
        if let Some(p) = pixel {
            y.iter_mut().zip(&x[p..p + c]).for_each(|(y, x)| *y += x);
        }
        if tap + 1 == taps {
            y.iter_mut().for_each(|y| *y /= taps as f32);
        }
    });
}

/// dx += dy/(KH·KW) spread over each window.
pub fn avg_pool_backward(dy: &[f32], win: &Window, n: usize, dx: &mut [f32]) {
    let (c, inv) = (win.c, 1.0 / (win.kh * win.kw) as f32);
    for_each_patch(win, n, |row, _, pixel| {
        if let Some(p) = pixel {
            dx[p..p + c].iter_mut().zip(&dy[row * c..(row + 1) * c]).for_each(|(d, g)| *d += g * inv);
        }
    });
}

/// dst[r, d0..d0+k] (+)= src[r, s0..s0+k] for every row r: moves a block of columns
/// between row-major matrices of different widths (grouped convolution).
#[allow(clippy::too_many_arguments)]
pub fn copy_columns(
    src: &[f32],
    src_w: usize,
    s0: usize,
    dst: &mut [f32],
    dst_w: usize,
    d0: usize,
    k: usize,
    rows: usize,
    accumulate: bool,
) {
    for r in 0..rows {
        let s = &src[r * src_w + s0..r * src_w + s0 + k];
        let d = &mut dst[r * dst_w + d0..r * dst_w + d0 + k];
        if accumulate {
            d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
        } else {
            d.copy_from_slice(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn im2col_known_patch_and_adjoint() {
        // 1 image 3x3, 1 channel, 2x2 kernel, stride 1, pad 0 -> 4 patches of 4.
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let win = Window { h: 3, w: 3, c: 1, kh: 2, kw: 2, stride: 1, pad: 0 };
        let mut cols = vec![0.0; 16];
        im2col(&x, &win, 1, 0, 1, &mut cols);
        assert_eq!(&cols[..4], &[1., 2., 4., 5.]);
        assert_eq!(&cols[12..], &[5., 6., 8., 9.]);
        // <im2col(x), r> = <x, col2im(r)> for any r.
        let r: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut back = vec![0.0; 9];
        col2im(&r, &win, 1, 0, 1, &mut back);
        let lhs: f32 = cols.iter().zip(&r).map(|(a, b)| a * b).sum();
        let rhs: f32 = x.iter().zip(&back).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-4);
        // Padding 1, stride 2 on 3x3: outputs 2x2, first patch has zeros from padding.
        let win = Window { pad: 1, stride: 2, ..win };
        assert_eq!((win.out_h(), win.out_w()), (2, 2));
        let mut cols = vec![9.0; 16];
        im2col(&x, &win, 1, 0, 1, &mut cols);
        assert_eq!(&cols[..4], &[0., 0., 0., 1.]);
    }

    #[test]
    fn pooling_known_values() {
        let x = vec![1., 5., 3., 2., 0., 7., 4., 6., 8.]; // 3x3, 1 channel
        let win = Window { h: 3, w: 3, c: 1, kh: 2, kw: 2, stride: 1, pad: 0 };
        let (mut y, mut am) = (vec![0.0; 4], vec![0u32; 4]);
        max_pool_forward(&x, &win, 1, &mut y, &mut am);
        assert_eq!(y, vec![5., 7., 6., 8.]);
        assert_eq!(am, vec![1, 5, 7, 8]);
        let mut dx = vec![0.0; 9];
        max_pool_backward(&[1., 2., 3., 4.], &am, &mut dx);
        assert_eq!(dx, vec![0., 1., 0., 0., 0., 2., 0., 3., 4.]);
        let mut y = vec![0.0; 4];
        avg_pool_forward(&x, &win, 1, &mut y);
        assert_eq!(y, vec![2.0, 3.75, 3.0, 5.25]);
    }
}
