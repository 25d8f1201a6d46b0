//! Classification metrics (T32): confusion matrix, per-class and macro precision, recall
//! and F1; for binary tasks F1 at 0.5, at the prior threshold (T28) and at the threshold
//! that maximises F1 along the precision-recall curve.

use serde::{Deserialize, Serialize};

/// Metrics of one evaluation of a classifier.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassMetrics {
    /// `confusion[t][p]`: examples of true class t predicted as p (argmax).
    pub confusion: Vec<Vec<u64>>,
    pub precision: Vec<f64>,
    pub recall: Vec<f64>,
    pub f1: Vec<f64>,
    pub macro_precision: f64,
    pub macro_recall: f64,
    pub macro_f1: f64,
    #[serde(default)]
    pub binary: Option<BinaryMetrics>,
}

/// Binary task (class 1 positive) at three decision thresholds on p(positive).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BinaryMetrics {
    pub f1_at_half: f64,
    /// minority / (minority + majority) of the training split (T28).
    pub prior_threshold: f64,
    pub f1_at_prior: f64,
    /// The threshold with the highest F1 along the PR curve of this split.
    pub best_threshold: f64,
    pub best_f1: f64,
    /// Area under the PR curve (average precision).
    pub average_precision: f64,
}

/// Precision, recall and F1 from counts; 0 where a ratio is 0/0.
pub fn prf(tp: u64, fp: u64, fn_: u64) -> (f64, f64, f64) {
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let (p, r) = (ratio(tp, tp + fp), ratio(tp, tp + fn_));
    let f1 = if p + r == 0.0 { 0.0 } else { 2.0 * p * r / (p + r) };
    (p, r, f1)
}

impl ClassMetrics {
    pub fn from_confusion(confusion: Vec<Vec<u64>>) -> Self {
        let k = confusion.len();
        let (mut precision, mut recall, mut f1) = (Vec::new(), Vec::new(), Vec::new());
        for (c, row) in confusion.iter().enumerate() {
            let tp = row[c];
            let fp: u64 = confusion.iter().enumerate().filter(|&(t, _)| t != c).map(|(_, r)| r[c]).sum();
            let fn_: u64 = row.iter().enumerate().filter(|&(p, _)| p != c).map(|(_, n)| n).sum();
            let (p, r, f) = prf(tp, fp, fn_);
            precision.push(p);
            recall.push(r);
            f1.push(f);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / k.max(1) as f64;
        Self {
            macro_precision: mean(&precision),
            macro_recall: mean(&recall),
            macro_f1: mean(&f1),
            confusion,
            precision,
            recall,
            f1,
            binary: None,
        }
    }
}

/// F1 of "positive when score ≥ threshold".
pub fn f1_at(scores: &[f32], positive: &[bool], threshold: f64) -> f64 {
    let (mut tp, mut fp, mut fn_) = (0, 0, 0);
    for (&s, &y) in scores.iter().zip(positive) {
        match ((s as f64) >= threshold, y) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            (false, false) => {}
        }
    }
    prf(tp, fp, fn_).2
}

/// The PR curve swept over every distinct score: (threshold with the best F1, that F1,
/// average precision Σ (R_n − R_{n−1})·P_n).
pub fn best_f1_threshold(scores: &[f32], positive: &[bool]) -> (f64, f64, f64) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let total_pos = positive.iter().filter(|&&p| p).count() as u64;
    let (mut tp, mut fp) = (0u64, 0u64);
    let (mut best, mut best_threshold, mut ap, mut last_recall) = (0.0, 1.0, 0.0, 0.0);
    let mut i = 0;
    while i < order.len() {
        // All examples with this score switch to positive together.
        let threshold = scores[order[i]];
        while i < order.len() && scores[order[i]] == threshold {
            if positive[order[i]] {
                tp += 1
            } else {
                fp += 1
            }
            i += 1;
        }
        let (p, r, f1) = prf(tp, fp, total_pos - tp);
        ap += (r - last_recall) * p;
        last_recall = r;
        if f1 > best {
            (best, best_threshold) = (f1, threshold as f64);
        }
    }
    (best_threshold, best, ap)
}

impl BinaryMetrics {
    /// `scores`: p(positive) per example; `prior_threshold` from the training split.
    pub fn of(scores: &[f32], positive: &[bool], prior_threshold: f64) -> Self {
        let (best_threshold, best_f1, average_precision) = best_f1_threshold(scores, positive);
        Self {
            f1_at_half: f1_at(scores, positive, 0.5),
            prior_threshold,
            f1_at_prior: f1_at(scores, positive, prior_threshold),
            best_threshold,
            best_f1,
            average_precision,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_class_and_macro_from_a_known_confusion_matrix() {
        // Rows true, columns predicted (3 classes, 20 examples).
        let m = ClassMetrics::from_confusion(vec![vec![5, 1, 0], vec![2, 6, 2], vec![0, 0, 4]]);
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        close(m.precision[0], 5.0 / 7.0);
        close(m.recall[0], 5.0 / 6.0);
        close(m.precision[1], 6.0 / 7.0);
        close(m.recall[1], 0.6);
        close(m.precision[2], 4.0 / 6.0);
        close(m.recall[2], 1.0);
        close(m.f1[1], 2.0 * (6.0 / 7.0) * 0.6 / (6.0 / 7.0 + 0.6));
        close(m.macro_f1, (m.f1[0] + m.f1[1] + m.f1[2]) / 3.0);
        close(m.macro_recall, (5.0 / 6.0 + 0.6 + 1.0) / 3.0);
    }

    #[test]
    fn empty_class_gives_zero_not_nan() {
        let m = ClassMetrics::from_confusion(vec![vec![3, 0], vec![0, 0]]);
        assert_eq!((m.precision[1], m.recall[1], m.f1[1]), (0.0, 0.0, 0.0));
    }

    #[test]
    fn best_threshold_is_found_on_the_pr_curve() {
        // Positives score 0.3 and 0.35; negatives 0.1, 0.2 and 0.4 (one negative above them).
        let scores = [0.1, 0.2, 0.3, 0.35, 0.4];
        let positive = [false, false, true, true, false];
        assert_eq!(f1_at(&scores, &positive, 0.5), 0.0, "nothing is called positive at 0.5");
        let (threshold, f1, ap) = best_f1_threshold(&scores, &positive);
        // At 0.3: tp 2, fp 1 → P 2/3, R 1, F1 0.8; no threshold does better.
        assert!((threshold - 0.3).abs() < 1e-7);
        assert!((f1 - 0.8).abs() < 1e-12);
        // AP: recall steps at 0.35 (P 1/2, R 1/2) and 0.3 (P 2/3, R 1): 0.25 + 1/3.
        assert!((ap - (0.25 + 1.0 / 3.0)).abs() < 1e-12, "{ap}");
        let b = BinaryMetrics::of(&scores, &positive, 0.25);
        assert!((b.f1_at_prior - 0.8).abs() < 1e-12);
    }
}
