//! Hierarchical all-reduce: several ranks on each of several hosts. Inside a host the
//! ranks reduce-scatter over shared memory (local rank l then holds slice l of the host's
//! sum), slice l is all-reduced between hosts on the ring of every host's local rank l —
//! so every local rank drives its share of the network —, and the host all-gathers.
//! Each slice is summed once per host and once around its ring, then copied: every rank
//! ends with identical bits.

use crate::ring::WireFormat;
use crate::shm::ShmComm;
use crate::{CollectiveError, Communicator, Result};

pub struct HierComm {
    /// The ranks of this host.
    pub local: ShmComm,
    /// The ring of this local index across hosts (None with one host).
    pub inter: Option<Box<dyn Communicator>>,
    /// (host index, local index) of every rank of the group; this rank.
    locations: Vec<(usize, usize)>,
    rank: usize,
}

impl HierComm {
    /// `inter` is ordered by host: its rank h is this local index on host h.
    pub fn new(
        local: ShmComm,
        inter: Option<Box<dyn Communicator>>,
        locations: Vec<(usize, usize)>,
        rank: usize,
    ) -> Self {
        Self { local, inter, locations, rank }
    }

    fn reduce(
        &mut self,
        buf: &mut [f32],
        inter_reduce: impl FnOnce(&mut dyn Communicator, &mut [f32], usize) -> Result<()>,
    ) -> Result<()> {
        self.local.reduce_scatter(buf)?;
        let slice = self.local.slice(buf.len());
        if let Some(inter) = self.inter.as_mut() {
            let start = slice.start;
            inter_reduce(inter.as_mut(), &mut buf[slice], start)?;
        }
        self.local.all_gather(buf)
    }
}

impl Communicator for HierComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.locations.len()
    }
    fn set_beside_compute(&mut self, beside: bool) {
        self.local.set_beside_compute(beside);
        if let Some(inter) = self.inter.as_mut() {
            inter.set_beside_compute(beside);
        }
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.reduce(buf, |inter, slice, _| inter.all_reduce_sum(slice))
    }
    fn all_reduce_sum_as(&mut self, buf: &mut [f32], format: WireFormat, half_len: usize) -> Result<()> {
        // Inside the host values stay f32; between hosts the slice's share of the 16-bit
        // prefix travels in `format`.
        self.reduce(buf, |inter, slice, start| {
            let half = half_len.saturating_sub(start).min(slice.len());
            inter.all_reduce_sum_as(slice, format, half)
        })
    }
    /// Root's local rank broadcasts on its ring between hosts, then every host from that
    /// local rank.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        let Some(&(root_host, root_local)) = self.locations.get(root) else {
            return Err(CollectiveError::Protocol(format!("broadcast root {root} of {} ranks", self.locations.len())));
        };
        if self.locations[self.rank].1 == root_local {
            if let Some(inter) = self.inter.as_mut() {
                inter.broadcast(buf, root_host)?;
            }
        }
        self.local.broadcast(buf, root_local)
    }
}
