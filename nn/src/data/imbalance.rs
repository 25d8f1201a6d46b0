//! Class subsets and class imbalance (T28): picking labels, one-vs-rest tasks, a seeded
//! minority subsample, balanced loss weights and over/under-sampled epoch orders.

use super::Dataset;
use crate::rng::{shuffle, Stream};

impl Dataset {
    /// Keeps the rows whose label is in `labels`, renumbered to its position there.
    pub fn select_labels(&mut self, labels: &[u32]) {
        let position = |y: u32| labels.iter().position(|&l| l == y);
        self.retain_rows(|_, y| position(y).is_some());
        for y in &mut self.y {
            *y = position(*y).unwrap_or(0) as u32;
        }
        self.classes = labels.len();
    }

    /// A binary task: label `positive` becomes 1, every other label 0.
    pub fn one_vs_rest(&mut self, positive: u32) {
        for y in &mut self.y {
            *y = (*y == positive) as u32;
        }
        self.classes = 2;
    }

    /// Keeps a seeded subset of the positives (label 1) so they make up `fraction` of the
    /// rows; the negatives all stay. `split` names the stream so splits draw differently.
    pub fn subsample_positives(&mut self, fraction: f64, seed: u64, split: &str) {
        let negatives = self.y.iter().filter(|&&y| y == 0).count() as f64;
        let keep = (fraction * negatives / (1.0 - fraction)).round() as usize;
        let mut positives: Vec<usize> = (0..self.len()).filter(|&i| self.y[i] == 1).collect();
        shuffle(&mut Stream::new(seed, "positive-subsample", &[crate::rng::name_id(split)]), &mut positives);
        let mut kept = vec![false; self.len()];
        for &i in positives.iter().take(keep) {
            kept[i] = true;
        }
        self.retain_rows(|i, y| y == 0 || kept[i]);
    }

    /// Examples per class.
    pub fn class_counts(&self) -> Vec<usize> {
        class_counts(&self.y, self.classes)
    }

    fn retain_rows(&mut self, keep: impl Fn(usize, u32) -> bool) {
        let f = self.features;
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for (i, &label) in self.y.iter().enumerate() {
            if keep(i, label) {
                x.extend_from_slice(&self.x[i * f..(i + 1) * f]);
                y.push(label);
            }
        }
        (self.x, self.y) = (x, y);
    }
}

/// How many of `labels` fall in each of `classes` classes.
pub fn class_counts(labels: &[u32], classes: usize) -> Vec<usize> {
    let mut counts = vec![0; classes];
    for &y in labels {
        counts[y as usize] += 1;
    }
    counts
}

/// Loss weights n / (classes · n_c): every class contributes equally to the loss (classes
/// without examples get weight 0).
pub fn balanced_class_weights(counts: &[usize]) -> Vec<f32> {
    let n: usize = counts.iter().sum();
    let k = counts.len() as f64;
    counts.iter().map(|&c| if c == 0 { 0.0 } else { (n as f64 / (k * c as f64)) as f32 }).collect()
}

/// How an epoch re-balances classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebalance {
    /// Every class appears as often as the largest; minority examples repeat.
    Oversample,
    /// Every class appears as often as the smallest; each epoch draws a new majority subset.
    Undersample,
}

/// A re-balanced epoch: dataset indices grouped by class, drawn per epoch from the
/// (seed, "rebalance", epoch) stream, then shuffled together.
#[derive(Debug, Clone)]
pub struct BalancedOrder {
    pub mode: Rebalance,
    /// Dataset indices of each class.
    pub by_class: Vec<Vec<u32>>,
}

impl BalancedOrder {
    pub fn new(mode: Rebalance, labels: &[u32], classes: usize) -> Self {
        let mut by_class = vec![Vec::new(); classes];
        for (i, &y) in labels.iter().enumerate() {
            by_class[y as usize].push(i as u32);
        }
        by_class.retain(|c| !c.is_empty());
        Self { mode, by_class }
    }

    /// Examples each class contributes to an epoch.
    fn per_class(&self) -> usize {
        let sizes = self.by_class.iter().map(Vec::len);
        match self.mode {
            Rebalance::Oversample => sizes.max().unwrap_or(0),
            Rebalance::Undersample => sizes.min().unwrap_or(0),
        }
    }

    /// Length of one epoch.
    pub fn len(&self) -> usize {
        self.per_class() * self.by_class.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The epoch's order: each class's examples shuffled and cycled (oversampling: every
    /// example of a class appears ⌊m/n_c⌋ or ⌈m/n_c⌉ times) or cut (undersampling) to m,
    /// then everything shuffled.
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<u32> {
        let mut stream = Stream::new(seed, "rebalance", &[epoch]);
        let m = self.per_class();
        let mut order = Vec::with_capacity(self.len());
        for class in &self.by_class {
            let mut pool = class.clone();
            let mut drawn: Vec<u32> = Vec::with_capacity(m);
            while drawn.len() < m {
                shuffle(&mut stream, &mut pool);
                drawn.extend(pool.iter().take(m - drawn.len()));
            }
            order.extend(drawn);
        }
        shuffle(&mut stream, &mut order);
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(labels: &[u32], classes: usize) -> Dataset {
        Dataset { features: 1, classes, x: (0..labels.len()).map(|i| i as f32).collect(), y: labels.to_vec() }
    }

    #[test]
    fn select_labels_keeps_and_renumbers() {
        let mut d = toy(&[0, 5, 7, 5, 2], 10);
        d.select_labels(&[5, 7]);
        assert_eq!((d.x.clone(), d.y.clone(), d.classes), (vec![1.0, 2.0, 3.0], vec![0, 1, 0], 2));
    }

    #[test]
    fn positives_are_subsampled_to_the_fraction_with_a_seed() {
        let labels: Vec<u32> = (0..1000).map(|i| (i % 10 == 3) as u32).collect(); // 100 positives
        let mut d = toy(&labels, 2);
        d.subsample_positives(1.0 / 21.0, 7, "train");
        assert_eq!(d.class_counts(), vec![900, 45]); // 900/20 = 45 positives: 1:20
        let mut again = toy(&labels, 2);
        again.subsample_positives(1.0 / 21.0, 7, "train");
        assert_eq!(d.x, again.x, "same seed, same subset");
        let mut other = toy(&labels, 2);
        other.subsample_positives(1.0 / 21.0, 8, "train");
        assert_ne!(d.x, other.x, "another seed, another subset");
    }

    #[test]
    fn balanced_weights_equalise_class_mass() {
        let w = balanced_class_weights(&[900, 45, 0]);
        assert!((w[0] * 900.0 - w[1] * 45.0).abs() < 1e-3);
        assert!((w[0] - 945.0 / (3.0 * 900.0)).abs() < 1e-6);
        assert_eq!(w[2], 0.0);
    }

    #[test]
    fn oversampling_repeats_the_minority_and_undersampling_cuts_the_majority() {
        let labels: Vec<u32> = (0..105).map(|i| (i >= 100) as u32).collect(); // 100 vs 5
        let over = BalancedOrder::new(Rebalance::Oversample, &labels, 2);
        let order = over.epoch_order(1, 0);
        assert_eq!(order.len(), 200);
        let minority = order.iter().filter(|&&i| i >= 100).count();
        assert_eq!(minority, 100);
        for i in 100..105u32 {
            assert_eq!(order.iter().filter(|&&j| j == i).count(), 20, "each minority example 20 times");
        }
        let mut majority: Vec<u32> = order.iter().copied().filter(|&i| i < 100).collect();
        majority.sort();
        assert_eq!(majority, (0..100).collect::<Vec<_>>(), "every majority example exactly once");
        let under = BalancedOrder::new(Rebalance::Undersample, &labels, 2);
        let (e0, e1) = (under.epoch_order(1, 0), under.epoch_order(1, 1));
        assert_eq!(e0.len(), 10);
        assert_eq!(e0.iter().filter(|&&i| i >= 100).count(), 5);
        assert_ne!(e0, e1, "a new majority subset each epoch");
        assert_eq!(e0, under.epoch_order(1, 0), "seeded");
    }
}
