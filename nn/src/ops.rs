//! Tensor ops (T4): add, concat, stack, Hadamard product, matmul; each with its backward.
//! Shapes are checked here so a mismatch is a clear error, never a panic in a kernel.

use crate::{shape_err, Result, Tensor};
use lockstep_kernels::{Backend, Gemm};

fn same_shape<B: Backend>(op: &'static str, a: &Tensor<B>, b: &Tensor<B>) -> Result<()> {
    if a.shape != b.shape {
        return shape_err(op, format!("{:?} vs {:?}", a.shape, b.shape));
    }
    Ok(())
}

/// y = a + b (same shape). Backward: da = dy, db = dy.
pub fn add<B: Backend>(be: &B, a: &Tensor<B>, b: &Tensor<B>) -> Result<Tensor<B>> {
    same_shape("add", a, b)?;
    let mut y = a.duplicate(be)?;
    be.axpy(1.0, &b.buf, &mut y.buf)?;
    Ok(y)
}

/// y = a ⊙ b (same shape).
pub fn hadamard<B: Backend>(be: &B, a: &Tensor<B>, b: &Tensor<B>) -> Result<Tensor<B>> {
    same_shape("hadamard", a, b)?;
    let mut y = Tensor::zeros(be, &a.shape)?;
    be.mul(&a.buf, &b.buf, &mut y.buf)?;
    Ok(y)
}

/// Backward of y = a ⊙ b: (da, db) = (dy ⊙ b, dy ⊙ a).
pub fn hadamard_backward<B: Backend>(
    be: &B,
    a: &Tensor<B>,
    b: &Tensor<B>,
    dy: &Tensor<B>,
) -> Result<(Tensor<B>, Tensor<B>)> {
    same_shape("hadamard_backward", a, dy)?;
    Ok((hadamard(be, dy, b)?, hadamard(be, dy, a)?))
}

/// y = a·b for a (m,k), b (k,n).
pub fn matmul<B: Backend>(be: &B, a: &Tensor<B>, b: &Tensor<B>) -> Result<Tensor<B>> {
    if a.shape.len() != 2 || b.shape.len() != 2 || a.shape[1] != b.shape[0] {
        return shape_err("matmul", format!("{:?} · {:?}: need (m,k)·(k,n)", a.shape, b.shape));
    }
    let (m, k, n) = (a.shape[0], a.shape[1], b.shape[1]);
    let mut y = Tensor::zeros(be, &[m, n])?;
    be.matmul(&a.buf, &b.buf, &mut y.buf, Gemm::nn(m, k, n))?;
    Ok(y)
}

/// Backward of y = a·b: da = dy·bᵀ (m,k), db = aᵀ·dy (k,n).
pub fn matmul_backward<B: Backend>(
    be: &B,
    a: &Tensor<B>,
    b: &Tensor<B>,
    dy: &Tensor<B>,
) -> Result<(Tensor<B>, Tensor<B>)> {
    let (m, k, n) = (a.shape[0], a.shape[1], b.shape[1]);
    if dy.shape != [m, n] {
        return shape_err("matmul_backward", format!("dy {:?}, expected [{m}, {n}]", dy.shape));
    }
    let mut da = Tensor::zeros(be, &[m, k])?;
    be.matmul(&dy.buf, &b.buf, &mut da.buf, Gemm::nt(m, n, k))?;
    let mut db = Tensor::zeros(be, &[k, n])?;
    be.matmul(&a.buf, &dy.buf, &mut db.buf, Gemm::tn(k, m, n))?;
    Ok((da, db))
}

/// (outer, axis, inner) sizes of `shape` split at `axis`.
fn split_at(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

/// Concatenation along `axis`: every other dimension must agree; that axis grows.
pub fn concat<B: Backend>(be: &B, parts: &[&Tensor<B>], axis: usize) -> Result<Tensor<B>> {
    let first = parts.first().ok_or(crate::NnError::Shape { op: "concat", detail: "no tensors".into() })?;
    if axis >= first.shape.len() {
        return shape_err("concat", format!("axis {axis} out of range for {:?}", first.shape));
    }
    for p in parts {
        let mut a = p.shape.clone();
        let mut b = first.shape.clone();
        if a.len() != b.len() {
            return shape_err("concat", format!("{:?} vs {:?}", p.shape, first.shape));
        }
        a[axis] = 0;
        b[axis] = 0;
        if a != b {
            return shape_err("concat", format!("{:?} vs {:?} differ outside axis {axis}", p.shape, first.shape));
        }
    }
    let mut shape = first.shape.clone();
    shape[axis] = parts.iter().map(|p| p.shape[axis]).sum();
    let (outer, total, inner) = split_at(&shape, axis);
    let mut y = Tensor::zeros(be, &shape)?;
    let mut offset = 0;
    for p in parts {
        let width = p.shape[axis] * inner;
        for o in 0..outer {
            be.copy_range(&p.buf, o * width, &mut y.buf, o * total * inner + offset, width)?;
        }
        offset += width;
    }
    Ok(y)
}

/// Backward of concat: dy split back into the parts' shapes.
pub fn concat_backward<B: Backend>(
    be: &B,
    dy: &Tensor<B>,
    part_sizes: &[usize],
    axis: usize,
) -> Result<Vec<Tensor<B>>> {
    let (outer, total, inner) = split_at(&dy.shape, axis);
    if part_sizes.iter().sum::<usize>() != total {
        return shape_err("concat_backward", format!("parts {part_sizes:?} do not sum to {total}"));
    }
    let mut grads = Vec::new();
    let mut offset = 0;
    for &size in part_sizes {
        let mut shape = dy.shape.clone();
        shape[axis] = size;
        let mut g = Tensor::zeros(be, &shape)?;
        for o in 0..outer {
            be.copy_range(&dy.buf, o * total * inner + offset, &mut g.buf, o * size * inner, size * inner)?;
        }
        offset += size * inner;
        grads.push(g);
    }
    Ok(grads)
}

/// Stack along a new `axis`: all shapes equal; the result has one more dimension.
pub fn stack<B: Backend>(be: &B, parts: &[&Tensor<B>], axis: usize) -> Result<Tensor<B>> {
    let first = parts.first().ok_or(crate::NnError::Shape { op: "stack", detail: "no tensors".into() })?;
    if axis > first.shape.len() {
        return shape_err("stack", format!("axis {axis} out of range for {:?}", first.shape));
    }
    if let Some(p) = parts.iter().find(|p| p.shape != first.shape) {
        return shape_err("stack", format!("{:?} vs {:?}", p.shape, first.shape));
    }
    // Stacking is concat of parts viewed with a size-1 axis inserted.
    let views: Vec<Tensor<B>> = parts
        .iter()
        .map(|p| {
            let mut shape = p.shape.clone();
            shape.insert(axis, 1);
            Ok(Tensor { shape, buf: p.duplicate(be)?.buf })
        })
        .collect::<Result<_>>()?;
    concat(be, &views.iter().collect::<Vec<_>>(), axis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_kernels::CpuBackend;

    fn t(shape: &[usize], data: &[f32]) -> Tensor<CpuBackend> {
        Tensor::from_slice(&CpuBackend::new(1), shape, data).unwrap()
    }

    #[test]
    fn ops_give_known_values() {
        let be = CpuBackend::new(1);
        let a = t(&[2, 2], &[1., 2., 3., 4.]);
        let b = t(&[2, 2], &[5., 6., 7., 8.]);
        assert_eq!(add(&be, &a, &b).unwrap().buf, vec![6., 8., 10., 12.]);
        assert_eq!(hadamard(&be, &a, &b).unwrap().buf, vec![5., 12., 21., 32.]);
        assert_eq!(matmul(&be, &a, &b).unwrap().buf, vec![19., 22., 43., 50.]);
        let c0 = concat(&be, &[&a, &b], 0).unwrap();
        assert_eq!((c0.shape.clone(), c0.buf), (vec![4, 2], vec![1., 2., 3., 4., 5., 6., 7., 8.]));
        let c1 = concat(&be, &[&a, &b], 1).unwrap();
        assert_eq!((c1.shape.clone(), c1.buf.clone()), (vec![2, 4], vec![1., 2., 5., 6., 3., 4., 7., 8.]));
        let parts = concat_backward(&be, &c1, &[2, 2], 1).unwrap();
        assert_eq!(parts[0].buf, a.buf);
        assert_eq!(parts[1].buf, b.buf);
        let s = stack(&be, &[&a, &b], 0).unwrap();
        assert_eq!(s.shape, vec![2, 2, 2]);
        assert_eq!(s.buf, vec![1., 2., 3., 4., 5., 6., 7., 8.]);
        let s2 = stack(&be, &[&a, &b], 2).unwrap();
        assert_eq!(s2.shape, vec![2, 2, 2]);
        assert_eq!(s2.buf, vec![1., 5., 2., 6., 3., 7., 4., 8.]);
    }

    #[test]
    fn shape_mismatches_are_errors() {
        let be = CpuBackend::new(1);
        let a = t(&[2, 2], &[1., 2., 3., 4.]);
        let b = t(&[2, 3], &[0.; 6]);
        let c = t(&[3, 2], &[0.; 6]);
        assert!(add(&be, &a, &b).unwrap_err().to_string().contains("[2, 2] vs [2, 3]"));
        assert!(hadamard(&be, &a, &b).is_err());
        assert!(matmul(&be, &a, &c).unwrap_err().to_string().contains("matmul"));
        assert!(concat(&be, &[&a, &b], 0).is_err()); // differ outside axis 0
        assert!(concat(&be, &[&a, &b], 1).is_ok());
        assert!(concat(&be, &[&a], 5).is_err());
        assert!(stack(&be, &[&a, &b], 0).is_err());
    }

    #[test]
    fn matmul_and_hadamard_backward_match_finite_differences() {
        let be = CpuBackend::new(1);
        let a = t(&[3, 4], &(0..12).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>());
        let b = t(&[4, 2], &(0..8).map(|i| (i as f32 * 0.71).cos()).collect::<Vec<_>>());
        let r = t(&[3, 2], &(0..6).map(|i| (i as f32 * 1.3).sin()).collect::<Vec<_>>());
        let (da, db) = matmul_backward(&be, &a, &b, &r).unwrap();
        let loss = |a: &Tensor<CpuBackend>, b: &Tensor<CpuBackend>| -> f64 {
            let y = matmul(&be, a, b).unwrap();
            y.buf.iter().zip(&r.buf).map(|(y, r)| (*y as f64) * (*r as f64)).sum()
        };
        let h = 1e-3;
        for i in 0..12 {
            let (mut ap, mut am) = (a.duplicate(&be).unwrap(), a.duplicate(&be).unwrap());
            ap.buf[i] += h;
            am.buf[i] -= h;
            let num = (loss(&ap, &b) - loss(&am, &b)) / (2.0 * h as f64);
            assert!((num - da.buf[i] as f64).abs() < 1e-3, "da[{i}] {num} vs {}", da.buf[i]);
        }
        for i in 0..8 {
            let (mut bp, mut bm) = (b.duplicate(&be).unwrap(), b.duplicate(&be).unwrap());
            bp.buf[i] += h;
            bm.buf[i] -= h;
            let num = (loss(&a, &bp) - loss(&a, &bm)) / (2.0 * h as f64);
            assert!((num - db.buf[i] as f64).abs() < 1e-3, "db[{i}]");
        }
        let a2 = t(&[2], &[2.0, -3.0]);
        let b2 = t(&[2], &[0.5, 4.0]);
        let dy = t(&[2], &[1.0, 2.0]);
        let (ga, gb) = hadamard_backward(&be, &a2, &b2, &dy).unwrap();
        assert_eq!((ga.buf, gb.buf), (vec![0.5, 8.0], vec![2.0, -6.0]));
    }
}
