//! The data-plane mesh takes a peer's rank from the certificate it pinned, never from the
//! hello: a peer (with a certificate the group admits) that claims another rank's channel
//! is refused, naming both ranks.

use lockstep_collective::mesh::{connect_mesh, Channel, MeshPlan};
use lockstep_collective::tls::{endpoint, server_config, AllowedPeers, Identity};
use lockstep_proto::wire::PeerInfo;
use std::time::Duration;

#[test]
fn a_peer_claiming_another_ranks_channel_is_refused() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let ids: Vec<Identity> = (0..3).map(|_| Identity::generate().unwrap()).collect();
        let allowed: Vec<AllowedPeers> = (0..3).map(|_| AllowedPeers::default()).collect();
        let server = |rank: usize| server_config(&ids[rank], Some(allowed[rank].clone())).unwrap();
        let eps: Vec<_> = (0..3).map(|rank| endpoint("127.0.0.1:0".parse().unwrap(), server(rank)).unwrap()).collect();
        let peers: Vec<PeerInfo> = (0..3)
            .map(|rank| PeerInfo {
                rank,
                data_addr: eps[rank].local_addr().unwrap().to_string(),
                fingerprint: ids[rank].fingerprint.clone(),
                host_id: "h".into(),
            })
            .collect();
        let timeout = Duration::from_secs(10);
        // Rank 0 expects rank 1 on the ring and admits rank 2 (for the pipe). Rank 2 dials
        // the ring channel saying it is rank 1, with its own certificate.
        let victim_plan = MeshPlan { dial: vec![], expect: vec![(1, Channel::Ring), (2, Channel::Pipe)] };
        let liar_plan = MeshPlan { dial: vec![(0, Channel::Ring)], expect: vec![] };
        let victim = connect_mesh(&eps[0], &allowed[0], &ids[0], 0, &peers, &victim_plan, timeout);
        let liar = async {
            // Let the victim admit the certificates before dialing.
            tokio::time::sleep(Duration::from_millis(200)).await;
            connect_mesh(&eps[2], &allowed[2], &ids[2], 1, &peers, &liar_plan, timeout).await
        };
        let (victim, _liar) = tokio::join!(victim, liar);
        let err = victim.err().expect("the victim must refuse the connection").to_string();
        assert!(err.contains("certificate of rank Some(2) claimed rank 1"), "{err}");
    });
}
