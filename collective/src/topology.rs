//! Which algorithm and transports a group uses, decided from the ranks' host identities
//! the same way on every rank (and by the coordinator, which reports it).

use lockstep_proto::toolbox::{InterHost, Transport};
use lockstep_proto::wire::PeerInfo;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One rank: nothing to reduce.
    Solo,
    /// A ring over every rank on the network link.
    Ring,
    /// Every rank on one host: shared memory.
    Shm,
    /// Several hosts with the same number (≥ 2) of ranks each: reduce-scatter in shared
    /// memory, one network ring per local index between hosts, all-gather in shared memory.
    Hierarchical,
}

/// The hosts of a group and their ranks, hosts in order of their lowest rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub layout: Layout,
    pub hosts: Vec<Vec<usize>>,
    /// The network link of the rings (Ring, Hierarchical).
    pub link: InterHost,
}

impl Topology {
    /// The layout `transport` asks for over `peers` (rank i is `peers[i]`); `inter_host`
    /// is the network link under `Auto`.
    pub fn plan(peers: &[PeerInfo], transport: Transport, inter_host: InterHost) -> Result<Self, String> {
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
            Transport::Quic | Transport::Tcp => Layout::Ring,
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
        let link = match transport {
            Transport::Quic => InterHost::Quic,
            Transport::Tcp => InterHost::Tcp,
            Transport::Auto | Transport::Shm => inter_host,
        };
        Ok(Self { layout, hosts, link })
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
            Layout::Ring => format!("ring: {ranks} ranks on {} hosts, {}", self.hosts.len(), self.link),
            Layout::Shm => format!("shm: {ranks} ranks on 1 host"),
            Layout::Hierarchical => format!(
                "hierarchical: {} hosts x {} ranks, shm inside each host, {} {} rings between",
                self.hosts.len(),
                self.hosts[0].len(),
                self.hosts[0].len(),
                self.link
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
        let plan = |h: &[&str], t| Topology::plan(&peers(h), t, InterHost::Quic);
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
        let tcp = plan(&["a", "a", "a"], Transport::Tcp).unwrap();
        assert_eq!((tcp.layout, tcp.link), (Layout::Ring, InterHost::Tcp));
        let hier_tcp = Topology::plan(&peers(&["a", "b", "a", "b"]), Transport::Auto, InterHost::Tcp).unwrap();
        assert_eq!((&hier_tcp.layout, hier_tcp.link), (&Layout::Hierarchical, InterHost::Tcp));
        assert!(hier_tcp.describe().contains("2 tcp rings between"), "{}", hier_tcp.describe());
    }
}
