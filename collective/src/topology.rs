//! Which algorithm and transports a group uses, decided from the ranks' host identities
//! the same way on every rank (and by the coordinator, which reports it).

use lockstep_proto::toolbox::Transport;
use lockstep_proto::wire::PeerInfo;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One rank: nothing to reduce.
    Solo,
    /// A QUIC ring over every rank.
    Ring,
    /// Every rank on one host: shared memory.
    Shm,
    /// Several hosts with the same number (≥ 2) of ranks each: reduce-scatter in shared
    /// memory, one QUIC ring per local index between hosts, all-gather in shared memory.
    Hierarchical,
}

/// The hosts of a group and their ranks, hosts in order of their lowest rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub layout: Layout,
    pub hosts: Vec<Vec<usize>>,
}

impl Topology {
    /// The layout `transport` asks for over `peers` (rank i is `peers[i]`).
    pub fn plan(peers: &[PeerInfo], transport: Transport) -> Result<Self, String> {
        let mut hosts: Vec<(String, Vec<usize>)> = Vec::new();
        for (rank, p) in peers.iter().enumerate() {
            match hosts.iter_mut().find(|(id, _)| *id == p.host_id) {
                Some((_, ranks)) => ranks.push(rank),
                None => hosts.push((p.host_id.clone(), vec![rank])),
            }
        }
        let hosts: Vec<Vec<usize>> = hosts.into_iter().map(|(_, r)| r).collect();
        let per_host = hosts.first().map_or(0, Vec::len);
        let even = hosts.iter().all(|h| h.len() == per_host);
        let layout = match transport {
            _ if peers.len() <= 1 => Layout::Solo,
            Transport::Quic => Layout::Ring,
            Transport::Shm if hosts.len() == 1 => Layout::Shm,
            Transport::Shm => {
                return Err(format!(
                    "collective.transport = \"shm\" needs every rank on one host; these {} ranks are on {} hosts",
                    peers.len(),
                    hosts.len()
                ))
            }
            Transport::Auto if hosts.len() == 1 => Layout::Shm,
            Transport::Auto if even && per_host >= 2 => Layout::Hierarchical,
            Transport::Auto => Layout::Ring,
        };
        Ok(Self { layout, hosts })
    }

    /// (host index, local index) of `rank`.
    pub fn locate(&self, rank: usize) -> Option<(usize, usize)> {
        self.hosts.iter().enumerate().find_map(|(h, ranks)| ranks.iter().position(|&r| r == rank).map(|l| (h, l)))
    }

    /// One line for logs and summary.json, e.g. "hierarchical: 2 hosts x 2 ranks, shm inside, quic between".
    pub fn describe(&self) -> String {
        let ranks: usize = self.hosts.iter().map(Vec::len).sum();
        match self.layout {
            Layout::Solo => "solo: 1 rank".into(),
            Layout::Ring => format!("ring: {ranks} ranks on {} hosts, quic", self.hosts.len()),
            Layout::Shm => format!("shm: {ranks} ranks on 1 host"),
            Layout::Hierarchical => format!(
                "hierarchical: {} hosts x {} ranks, shm inside each host, {} quic rings between",
                self.hosts.len(),
                self.hosts[0].len(),
                self.hosts[0].len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(hosts: &[&str]) -> Vec<PeerInfo> {
        hosts
            .iter()
            .enumerate()
            .map(|(rank, h)| PeerInfo {
                rank,
                data_addr: String::new(),
                fingerprint: String::new(),
                host_id: h.to_string(),
            })
            .collect()
    }

    #[test]
    fn layouts_follow_the_hosts() {
        let plan = |h: &[&str], t| Topology::plan(&peers(h), t);
        assert_eq!(plan(&["a"], Transport::Auto).unwrap().layout, Layout::Solo);
        assert_eq!(plan(&["a", "a", "a"], Transport::Auto).unwrap().layout, Layout::Shm);
        assert_eq!(plan(&["a", "a", "a"], Transport::Quic).unwrap().layout, Layout::Ring);
        assert_eq!(plan(&["a", "b"], Transport::Auto).unwrap().layout, Layout::Ring);
        assert_eq!(plan(&["a", "a", "b"], Transport::Auto).unwrap().layout, Layout::Ring);
        let hier = plan(&["a", "b", "a", "b"], Transport::Auto).unwrap();
        assert_eq!(hier.layout, Layout::Hierarchical);
        assert_eq!(hier.hosts, vec![vec![0, 2], vec![1, 3]]);
        assert_eq!(hier.locate(3), Some((1, 1)));
        let err = plan(&["a", "b"], Transport::Shm).unwrap_err();
        assert!(err.contains("2 hosts"), "{err}");
    }
}
