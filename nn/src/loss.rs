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

/// How a student learns from a teacher (knowledge distillation, Hinton et al. 2015; T39).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Distillation {
    /// Both distributions are softened by it: softmax(z / T).
    pub temperature: f32,
    /// Weight of the teacher term; 1 − alpha weighs the labels.
    pub alpha: f32,
}

/// Knowledge distillation on logits (B, C):
/// loss_i = α·T²·KL(softmax(t_i/T) ‖ softmax(z_i/T)) + (1 − α)·CE(z_i, y_i). The T² keeps the soft term's gradient, α·T·(p_s − p_t), on the
/// scale of the hard one as T grows. Rows with `IGNORE_TARGET` add nothing. The soft term
/// is small (B, C) work done on the host; the hard one is the backend's fused CE.
pub fn distillation_loss<B: Backend>(
    be: &B,
    student: &Tensor<B>,
    teacher: &Tensor<B>,
    targets: &[u32],
    class_weights: Option<&[f32]>,
    d: Distillation,
    grad_scale: f32,
) -> Result<LossOutput<B>> {
    if student.shape != teacher.shape {
        return shape_err("distillation_loss", format!("student {:?} vs teacher {:?}", student.shape, teacher.shape));
    }
    let hard = softmax_cross_entropy(be, student, targets, class_weights, grad_scale * (1.0 - d.alpha))?;
    let (rows, classes) = student.rows_cols();
    let (z, t) = (student.to_vec(be)?, teacher.to_vec(be)?);
    let mut soft_grad = vec![0.0f32; z.len()];
    let mut kl_sum = 0.0f64;
    let inv_t = 1.0 / d.temperature as f64;
    for r in (0..rows).filter(|&r| targets[r] != IGNORE_TARGET) {
        let row = r * classes..(r + 1) * classes;
        let (log_ps, log_pt) = (log_softmax(&z[row.clone()], inv_t), log_softmax(&t[row.clone()], inv_t));
        for ((g, lps), lpt) in soft_grad[row].iter_mut().zip(&log_ps).zip(&log_pt) {
            let pt = lpt.exp();
            kl_sum += pt * (lpt - lps);
            // d(T²·KL)/dz = T·(p_s − p_t)
            *g = (d.alpha as f64 * d.temperature as f64 * (lps.exp() - pt) * grad_scale as f64) as f32;
        }
    }
    let mut grad = hard.grad;
    be.axpy(1.0, &Tensor::from_slice(be, &student.shape, &soft_grad)?.buf, &mut grad.buf)?;
    let soft = d.alpha as f64 * (d.temperature as f64).powi(2) * kl_sum;
    Ok(LossOutput { loss_sum: (1.0 - d.alpha as f64) * hard.loss_sum + soft, correct: hard.correct, grad })
}

/// log softmax(z·scale) of one row, in f64.
fn log_softmax(z: &[f32], scale: f64) -> Vec<f64> {
    let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 * scale));
    let log_sum = z.iter().map(|&v| (v as f64 * scale - max).exp()).sum::<f64>().ln();
    z.iter().map(|&v| v as f64 * scale - max - log_sum).collect()
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

    /// The distillation loss against finite differences at several temperatures and
    /// mixes; a padded row adds nothing; a student equal to the teacher has KL 0.
    #[test]
    fn distillation_gradient_and_values() {
        let be = CpuBackend::new(1);
        let teacher: Vec<f32> = (0..15).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.9).collect();
        let teacher = Tensor::from_slice(&be, &[3, 5], &teacher).unwrap();
        for (temperature, alpha) in [(1.0, 0.5), (4.0, 0.9), (2.0, 1.0)] {
            let d = Distillation { temperature, alpha };
            for targets in [[0u32, 4, 2], [1, IGNORE_TARGET, 3]] {
                check_input_gradient(&be, &[3, 5], &logits(), |be, x| {
                    let out = distillation_loss(be, x, &teacher, &targets, None, d, 1.0)?;
                    Ok((out.loss_sum, out.grad))
                });
            }
        }
        // alpha = 1 and the student equals the teacher: loss 0, gradient 0.
        let d = Distillation { temperature: 3.0, alpha: 1.0 };
        let out = distillation_loss(&be, &teacher, &teacher, &[0, 1, 2], None, d, 1.0).unwrap();
        assert!(out.loss_sum.abs() < 1e-12 && out.grad.buf.iter().all(|g| g.abs() < 1e-7), "{out:?}");
        // alpha = 0 is plain cross-entropy.
        let d = Distillation { temperature: 3.0, alpha: 0.0 };
        let x = Tensor::from_slice(&be, &[3, 5], &logits()).unwrap();
        let out = distillation_loss(&be, &x, &teacher, &[0, 1, 2], None, d, 1.0).unwrap();
        let ce = softmax_cross_entropy(&be, &x, &[0, 1, 2], None, 1.0).unwrap();
        assert_eq!((out.loss_sum, out.grad.buf), (ce.loss_sum, ce.grad.buf));
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
