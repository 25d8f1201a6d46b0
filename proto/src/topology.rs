//! Where a rank sits in a job (T42): rank r is stage r mod P of data-parallel replica
//! r div P. Computed once from (rank, world, stages) and passed down, so no crate
//! re-derives the arithmetic.

/// A rank's place: its stage in the pipeline (P = 1 without one) and its data-parallel
/// replica, with its neighbours in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub rank: usize,
    pub world: usize,
    pub stages: usize,
}

impl Topology {
    /// `Err` names what does not fit: no stage, a rank outside the world, or a world the
    /// stages do not divide.
    pub fn new(rank: usize, world: usize, stages: usize) -> Result<Self, String> {
        if stages == 0 || world == 0 || rank >= world {
            return Err(format!("rank {rank} of world {world} with {stages} pipeline stages"));
        }
        if !world.is_multiple_of(stages) {
            return Err(format!("{world} workers do not divide into {stages} pipeline stages"));
        }
        Ok(Self { rank, world, stages })
    }

    pub fn stage(&self) -> usize {
        self.rank % self.stages
    }
    pub fn replica(&self) -> usize {
        self.rank / self.stages
    }
    pub fn replicas(&self) -> usize {
        self.world / self.stages
    }
    /// The rank holding `stage` of `replica`.
    pub fn rank_of(&self, stage: usize, replica: usize) -> usize {
        replica * self.stages + stage
    }
    /// The next and previous stage of this replica (around the ring of its stages).
    pub fn pipe_next(&self) -> usize {
        self.rank_of((self.stage() + 1) % self.stages, self.replica())
    }
    pub fn pipe_prev(&self) -> usize {
        self.rank_of((self.stage() + self.stages - 1) % self.stages, self.replica())
    }
    /// The same stage of the next and previous replica (the stage's data-parallel ring).
    pub fn ring_next(&self) -> usize {
        self.rank_of(self.stage(), (self.replica() + 1) % self.replicas())
    }
    pub fn ring_prev(&self) -> usize {
        self.rank_of(self.stage(), (self.replica() + self.replicas() - 1) % self.replicas())
    }
    /// The ranks of this stage's data-parallel ring, in replica order.
    pub fn stage_ranks(&self) -> Vec<usize> {
        (0..self.replicas()).map(|r| self.rank_of(self.stage(), r)).collect()
    }
    /// The ranks of this replica's pipeline, in stage order.
    pub fn replica_ranks(&self) -> Vec<usize> {
        (0..self.stages).map(|s| self.rank_of(s, self.replica())).collect()
    }
    /// Whether ranks `a` and `b` hold the same stage (and so, after a step, equal weights).
    pub fn same_stage(stages: usize, a: usize, b: usize) -> bool {
        a % stages.max(1) == b % stages.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_stages_of_replicas() {
        // 2 stages x 3 replicas: rank 3 is stage 1 of replica 1.
        let t = Topology::new(3, 6, 2).unwrap();
        assert_eq!((t.stage(), t.replica(), t.replicas()), (1, 1, 3));
        assert_eq!((t.pipe_next(), t.pipe_prev()), (2, 2));
        assert_eq!((t.ring_next(), t.ring_prev()), (5, 1));
        assert_eq!(t.stage_ranks(), [1, 3, 5]);
        assert_eq!(t.replica_ranks(), [2, 3]);
        let solo = Topology::new(0, 1, 1).unwrap();
        assert_eq!((solo.pipe_next(), solo.ring_next(), solo.stage_ranks()), (0, 0, vec![0]));
        assert!(Topology::same_stage(2, 1, 5) && !Topology::same_stage(2, 0, 5));
    }

    #[test]
    fn what_does_not_fit_is_an_error() {
        assert!(Topology::new(0, 3, 2).unwrap_err().contains("3 workers do not divide into 2"));
        assert!(Topology::new(4, 4, 1).is_err());
        assert!(Topology::new(0, 4, 0).is_err());
        assert!(Topology::new(0, 0, 1).is_err());
    }
}
