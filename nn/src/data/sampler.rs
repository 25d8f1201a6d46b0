//! The epoch sampler (T31). Epoch e's order is `permutation(seed, e)`; global batch s is
//! positions [s·B, (s+1)·B) of it; rank r of W takes the contiguous slice
//! [r·B/W, (r+1)·B/W). The global batch never depends on W, so every world size trains on
//! the same examples in the same steps.

use super::BalancedOrder;
use crate::rng::permutation;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remainder {
    /// The N mod B examples left at the end of an epoch are not used that epoch.
    Drop,
    /// The last batch is completed with examples from the start of the epoch's order, so
    /// every example is seen (those few twice).
    Pad,
}

#[derive(Debug, Clone)]
pub struct EpochSampler {
    pub len: usize,
    pub global_batch: usize,
    pub seed: u64,
    pub remainder: Remainder,
    /// Re-balanced epochs (T28): the order comes from here and `len` is ignored.
    pub balance: Option<BalancedOrder>,
}

impl EpochSampler {
    /// Positions in one epoch's order.
    fn epoch_len(&self) -> usize {
        self.balance.as_ref().map_or(self.len, BalancedOrder::len)
    }

    pub fn steps_per_epoch(&self) -> usize {
        match self.remainder {
            Remainder::Drop => self.epoch_len() / self.global_batch,
            Remainder::Pad => self.epoch_len().div_ceil(self.global_batch),
        }
    }

    pub fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        match &self.balance {
            Some(balance) => balance.epoch_order(self.seed, epoch),
            None => permutation(self.seed, epoch, self.len),
        }
    }

    /// Dataset indices of global batch `step_in_epoch` of the epoch with `order`.
    pub fn global_batch(&self, order: &[u32], step_in_epoch: usize) -> Vec<u32> {
        let start = step_in_epoch * self.global_batch;
        (start..start + self.global_batch).map(|pos| order[pos % order.len()]).collect()
    }
}

/// Rank `rank`'s contiguous share of a global batch. Shares differ by at most one example
/// when W does not divide B.
pub fn rank_slice(batch: &[u32], rank: usize, world: usize) -> &[u32] {
    let b = batch.len();
    &batch[rank * b / world..(rank + 1) * b / world]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn seen_counts(sampler: &EpochSampler, world: usize, epoch: u64) -> (HashMap<u32, usize>, Vec<Vec<u32>>) {
        let order = sampler.epoch_order(epoch);
        let mut counts = HashMap::new();
        let mut per_rank = vec![Vec::new(); world];
        for s in 0..sampler.steps_per_epoch() {
            let batch = sampler.global_batch(&order, s);
            let mut rejoined = Vec::new();
            for (r, slot) in per_rank.iter_mut().enumerate() {
                let part = rank_slice(&batch, r, world);
                rejoined.extend_from_slice(part);
                slot.extend_from_slice(part);
            }
            assert_eq!(rejoined, batch, "rank slices must tile the global batch in order");
            for i in batch {
                *counts.entry(i).or_insert(0) += 1;
            }
        }
        (counts, per_rank)
    }

    #[test]
    fn drop_remainder_disjoint_and_covering_for_w_1_to_4() {
        let s = EpochSampler { len: 103, global_batch: 10, seed: 9, remainder: Remainder::Drop, balance: None };
        assert_eq!(s.steps_per_epoch(), 10);
        for world in 1..=4 {
            let (counts, per_rank) = seen_counts(&s, world, 2);
            assert_eq!(counts.len(), 100);
            assert!(counts.values().all(|&c| c == 1));
            // ranks are pairwise disjoint
            for a in 0..world {
                for b in a + 1..world {
                    assert!(per_rank[a].iter().all(|i| !per_rank[b].contains(i)));
                }
            }
            // the 3 dropped examples are the last 3 of the epoch's order
            let order = s.epoch_order(2);
            assert!(order[100..].iter().all(|i| !counts.contains_key(i)));
        }
    }

    #[test]
    fn pad_remainder_sees_every_example() {
        let s = EpochSampler { len: 103, global_batch: 10, seed: 9, remainder: Remainder::Pad, balance: None };
        assert_eq!(s.steps_per_epoch(), 11);
        for world in 1..=4 {
            let (counts, _) = seen_counts(&s, world, 0);
            assert_eq!(counts.len(), 103);
            assert_eq!(counts.values().filter(|&&c| c == 2).count(), 7); // 110 - 103 padded
            let order = s.epoch_order(0);
            assert!(order[..7].iter().all(|i| counts[i] == 2));
        }
    }

    #[test]
    fn global_batch_independent_of_world_and_epochs_differ() {
        let s = EpochSampler { len: 50, global_batch: 8, seed: 1, remainder: Remainder::Drop, balance: None };
        let order = s.epoch_order(0);
        let b = s.global_batch(&order, 3);
        let by_3: Vec<u32> = (0..3).flat_map(|r| rank_slice(&b, r, 3).to_vec()).collect();
        assert_eq!(b, by_3);
        assert_eq!(rank_slice(&b, 0, 3).len() + rank_slice(&b, 1, 3).len() + rank_slice(&b, 2, 3).len(), 8);
        assert_ne!(s.epoch_order(0), s.epoch_order(1));
    }
}
