//! Losses (T3). Each returns the loss **summed** over examples and writes the gradient of
//! that sum times `grad_scale` (the data-parallel step divides by the global batch once,
//! after the all-reduce).

use crate::{shape_err, Result, Tensor};
use lockstep_kernels::{Backend, IGNORE_TARGET};

/// Sum of the loss, number of correct argmax predictions (classification) and dL/d(output).
#[derive(Debug)]
pub struct LossOutput<B: Backend> {
    pub loss_sum: f64,
    pub correct: usize,
    pub grad: Tensor<B>,
}

/// Fused, numerically stable softmax cross-entropy on logits (B, C) with optional per-class
/// weights: loss_i = w[t_i]·(−log softmax(z_i)[t_i]). Rows whose target is `IGNORE_TARGET`
/// (padding, T29) add no loss and get a zero gradient.
pub fn softmax_cross_entropy<B: Backend>(
    be: &B,
    logits: &Tensor<B>,
    targets: &[u32],
    class_weights: Option<&[f32]>,
    grad_scale: f32,
) -> Result<LossOutput<B>> {
    let (rows, classes) = logits.rows_cols();
    if targets.len() != rows {
        return shape_err("softmax_cross_entropy", format!("{rows} rows, {} targets", targets.len()));
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= classes && t != IGNORE_TARGET) {
        return shape_err("softmax_cross_entropy", format!("target {t} >= {classes} classes"));
    }
    if class_weights.is_some_and(|w| w.len() != classes) {
        return shape_err("softmax_cross_entropy", format!("class weights need {classes} entries"));
    }
    let mut grad = Tensor::zeros(be, &logits.shape)?;
    let (loss_sum, correct) =
        be.softmax_cross_entropy(&logits.buf, targets, class_weights, &mut grad.buf, rows, classes, grad_scale)?;
    Ok(LossOutput { loss_sum, correct, grad })
}

/// Mean squared error with the 0.5 convention: loss = 0.5·Σ (y − o)², so dL/do = o − y.
pub fn mse<B: Backend>(be: &B, output: &Tensor<B>, target: &Tensor<B>, grad_scale: f32) -> Result<LossOutput<B>> {
    if output.shape != target.shape {
        return shape_err("mse", format!("output {:?} vs target {:?}", output.shape, target.shape));
    }
    let mut grad = output.duplicate(be)?;
    be.axpy(-1.0, &target.buf, &mut grad.buf)?; // o − y
    let loss_sum = 0.5 * be.sum_squares(&grad.buf)?;
    be.scale(&mut grad.buf, grad_scale)?;
    Ok(LossOutput { loss_sum, correct: 0, grad })
}

/// Binary cross-entropy on logits z with targets y in [0,1], stable form
/// max(z,0) − z·y + log(1 + e^−|z|); dL/dz = σ(z) − y. `pos_weight`/`neg_weight` weight
/// the positive and negative terms (class imbalance, T28). Small (B, C), done on the host.
pub fn bce_with_logits<B: Backend>(
    be: &B,
    logits: &Tensor<B>,
    targets: &[f32],
    class_weights: Option<[f32; 2]>,
    grad_scale: f32,
) -> Result<LossOutput<B>> {
    if targets.len() != logits.numel() {
        return shape_err("bce_with_logits", format!("{} logits, {} targets", logits.numel(), targets.len()));
    }
    let [neg_w, pos_w] = class_weights.unwrap_or([1.0, 1.0]);
    let z = logits.to_vec(be)?;
    let mut grad = Vec::with_capacity(z.len());
    let mut loss_sum = 0.0f64;
    let mut correct = 0;
    for (&z, &y) in z.iter().zip(targets) {
        let w = y * pos_w + (1.0 - y) * neg_w;
        let l = z.max(0.0) - z * y + (-z.abs()).exp().ln_1p();
        loss_sum += (w * l) as f64;
        let p = 1.0 / (1.0 + (-z).exp());
        grad.push(w * (p - y) * grad_scale);
        if (z > 0.0) == (y > 0.5) {
            correct += 1;
        }
    }
    Ok(LossOutput { loss_sum, correct, grad: Tensor::from_slice(be, &logits.shape, &grad)? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_input_gradient;
    use lockstep_kernels::CpuBackend;

    fn logits() -> Vec<f32> {
        (0..15).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.4).collect()
    }

    #[test]
    fn softmax_ce_gradient_matches_finite_differences() {
        let be = CpuBackend::new(1);
        let targets = [0u32, 4, 2];
        for weights in [None, Some(&[1.0f32, 2.0, 0.5, 1.0, 3.0][..])] {
            check_input_gradient(&be, &[3, 5], &logits(), |be, x| {
                let out = softmax_cross_entropy(be, x, &targets, weights, 1.0)?;
                Ok((out.loss_sum, out.grad))
            });
        }
    }

    #[test]
    fn mse_gradient_and_value() {
        let be = CpuBackend::new(1);
        let target = Tensor::from_slice(&be, &[3, 5], &(0..15).map(|i| i as f32 * 0.1).collect::<Vec<_>>()).unwrap();
        check_input_gradient(&be, &[3, 5], &logits(), |be, x| {
            let out = mse(be, x, &target, 1.0)?;
            Ok((out.loss_sum, out.grad))
        });
        let o = Tensor::from_slice(&be, &[2], &[1.0, 3.0]).unwrap();
        let y = Tensor::from_slice(&be, &[2], &[0.0, 1.0]).unwrap();
        assert_eq!(mse(&be, &o, &y, 1.0).unwrap().loss_sum, 0.5 * (1.0 + 4.0));
    }

    #[test]
    fn bce_gradient_value_and_stability() {
        let be = CpuBackend::new(1);
        let y: Vec<f32> = (0..15).map(|i| (i % 3 == 0) as u8 as f32).collect();
        for w in [None, Some([1.0, 20.0])] {
            check_input_gradient(&be, &[15], &logits(), |be, x| {
                let out = bce_with_logits(be, x, &y, w, 1.0)?;
                Ok((out.loss_sum, out.grad))
            });
        }
        // z = 0 -> ln 2 whatever y; a huge logit stays finite.
        let z = Tensor::from_slice(&be, &[3], &[0.0, 500.0, -500.0]).unwrap();
        let out = bce_with_logits(&be, &z, &[1.0, 0.0, 0.0], None, 1.0).unwrap();
        assert!((out.loss_sum - (2f64.ln() + 500.0)).abs() < 1e-4, "{}", out.loss_sum);
    }

    #[test]
    fn bad_targets_are_errors() {
        let be = CpuBackend::new(1);
        let z = Tensor::from_slice(&be, &[3, 5], &logits()).unwrap();
        assert!(softmax_cross_entropy(&be, &z, &[0, 1], None, 1.0).is_err());
        assert!(softmax_cross_entropy(&be, &z, &[0, 1, 9], None, 1.0).unwrap_err().to_string().contains("target 9"));
    }
}
