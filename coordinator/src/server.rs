//! The coordinator's QUIC server. Each incoming connection is handled by its own task: a
//! malformed frame, a wrong token or a wrong protocol version closes that connection only.

use crate::{CoordError, Result, RunWriter};
use lockstep_collective::tls::{endpoint, server_config, Identity};
use lockstep_proto::wire::{
    read_frame, tokens_equal, write_frame, AllReduceTiming, Assign, PeerInfo, Task, ToCoordinator, ToWorker,
    PROTOCOL_VERSION,
};
use lockstep_proto::{JobSpec, Summary};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A worker that has presented the right token.
pub struct WorkerConn {
    pub conn: Connection,
    send: SendStream,
    recv: RecvStream,
    pub host: String,
    pub pid: u32,
    pub data_addr: String,
    pub fingerprint: String,
}

pub struct Coordinator {
    endpoint: Endpoint,
    pub identity: Identity,
    /// `lockstep://HOST:PORT#<sha256>`: what workers pass to `--join`.
    pub join_address: String,
    joined: mpsc::UnboundedReceiver<WorkerConn>,
}

impl Coordinator {
    /// Listens on `listen`; `advertise_host` is the host name put in the join address
    /// (default: the listen IP, or 127.0.0.1 when listening on all interfaces).
    pub fn bind(listen: SocketAddr, advertise_host: Option<String>, token: String) -> Result<Self> {
        let identity = Identity::generate().map_err(|e| CoordError::Net(e.to_string()))?;
        Self::bind_with(listen, advertise_host, token, identity)
    }

    /// `bind` with a given identity (a restarted coordinator keeps its fingerprint).
    pub fn bind_with(
        listen: SocketAddr,
        advertise_host: Option<String>,
        token: String,
        identity: Identity,
    ) -> Result<Self> {
        let server = server_config(&identity, None).map_err(|e| CoordError::Net(e.to_string()))?;
        let endpoint = endpoint(listen, server).map_err(|e| CoordError::Net(format!("listening on {listen}: {e}")))?;
        let local = endpoint.local_addr().map_err(|e| CoordError::Net(e.to_string()))?;
        let host = advertise_host.unwrap_or_else(|| {
            if local.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                local.ip().to_string()
            }
        });
        let join_address = format!("lockstep://{host}:{}#{}", local.port(), identity.fingerprint);
        let (tx, joined) = mpsc::unbounded_channel();
        let accept_ep = endpoint.clone();
        tokio::spawn(async move {
            let mut next_id = 0u64;
            while let Some(incoming) = accept_ep.accept().await {
                next_id += 1;
                let (tx, token) = (tx.clone(), token.clone());
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(incoming, &token, next_id)).await {
                        Ok(Ok(worker)) => {
                            tracing::info!(%remote, host = %worker.host, pid = worker.pid, "worker joined");
                            let _ = tx.send(worker);
                        }
                        Ok(Err(e)) => tracing::warn!(%remote, "rejected connection: {e}"),
                        Err(_) => tracing::warn!(%remote, "rejected connection: no Hello within {HANDSHAKE_TIMEOUT:?}"),
                    }
                });
            }
        });
        Ok(Self { endpoint, identity, join_address, joined })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint.local_addr().map_err(|e| CoordError::Net(e.to_string()))
    }

    /// Re-forming a group: waits up to `grace` for `max` workers, then takes what has
    /// joined if that is at least `min`; otherwise keeps waiting until `timeout`.
    pub async fn rendezvous_elastic(
        &mut self,
        min: usize,
        max: usize,
        grace: Duration,
        timeout: Duration,
    ) -> Result<Vec<WorkerConn>> {
        let start = tokio::time::Instant::now();
        let mut workers = Vec::with_capacity(max);
        while workers.len() < max {
            let deadline = if workers.len() >= min { start + grace } else { start + timeout };
            match tokio::time::timeout_at(deadline, self.joined.recv()).await {
                Ok(Some(w)) => workers.push(w),
                Ok(None) => return Err(CoordError::Net("accept loop stopped".into())),
                Err(_) if workers.len() >= min => break,
                Err(_) => {
                    return Err(CoordError::Run(format!(
                        "only {} workers re-joined within {timeout:?}; the job needs at least {min}",
                        workers.len()
                    )))
                }
            }
        }
        tracing::info!("group re-formed with {} workers", workers.len());
        Ok(workers)
    }

    /// Waits until `n` workers have joined (or `timeout` passes).
    pub async fn rendezvous(&mut self, n: usize, timeout: Duration) -> Result<Vec<WorkerConn>> {
        let mut workers = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + timeout;
        while workers.len() < n {
            match tokio::time::timeout_at(deadline, self.joined.recv()).await {
                Ok(Some(w)) => {
                    tracing::info!("{}/{} workers joined", workers.len() + 1, n);
                    workers.push(w);
                }
                Ok(None) => return Err(CoordError::Net("accept loop stopped".into())),
                Err(_) => {
                    return Err(CoordError::Run(format!(
                        "only {} of {n} workers joined within {timeout:?}",
                        workers.len()
                    )))
                }
            }
        }
        Ok(workers)
    }

    /// Trains `spec` on `workers` (rank = position), writing metrics through `writer`.
    pub async fn run_train(
        &mut self,
        workers: Vec<WorkerConn>,
        spec: &JobSpec,
        threads: usize,
        bucket_bytes: u64,
        resume: Option<&std::path::Path>,
        writer: &mut RunWriter,
    ) -> Result<Summary> {
        let weights_path = Some(writer.dir().join("model.safetensors").display().to_string());
        let checkpoint_dir = Some(writer.dir().join("checkpoints").display().to_string());
        let resume_path = resume.map(|p| p.display().to_string());
        let task =
            Task::Train { job_toml: spec.to_toml(), threads, bucket_bytes, weights_path, checkpoint_dir, resume_path };
        let mut group = Group::assign(workers, spec.seed, task).await?;
        let mut result = supervise_train(&mut group, writer).await;
        if let Err(CoordError::Run(first)) = &result {
            // One failure brings the others (the ranks waiting on a dead or frozen peer):
            // gather them so the message says who stopped and in which collective.
            let others = group.other_failures(Duration::from_secs(2)).await;
            if !others.is_empty() {
                result = Err(CoordError::Run(format!("{first}; then {}", others.join("; "))));
            }
        }
        group.finish(&result).await;
        result
    }

    /// Times ring all-reduces of `sizes` bytes on `workers`; returns rank 0's timings.
    pub async fn run_bench(
        &mut self,
        workers: Vec<WorkerConn>,
        sizes: Vec<u64>,
        iters: usize,
    ) -> Result<Vec<AllReduceTiming>> {
        let mut group = Group::assign(workers, 0, Task::BenchAllReduce { sizes, iters }).await?;
        let result = async {
            loop {
                match group.next().await? {
                    (0, ToCoordinator::BenchResult { results, .. }) => return Ok(results),
                    (_, ToCoordinator::BenchResult { .. }) => {}
                    (rank, other) => return Err(unexpected(rank, &other)),
                }
            }
        }
        .await;
        group.finish(&result).await;
        result
    }
}

async fn handshake(incoming: quinn::Incoming, token: &str, worker_id: u64) -> std::result::Result<WorkerConn, String> {
    let conn = incoming.await.map_err(|e| format!("handshake: {e}"))?;
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| format!("no control stream: {e}"))?;
    let hello: ToCoordinator = match read_frame(&mut recv).await {
        Ok(m) => m,
        Err(e) => {
            conn.close(1u32.into(), b"malformed frame");
            return Err(format!("bad first frame: {e}"));
        }
    };
    let ToCoordinator::Hello { version, token: presented, host, pid, data_addr, fingerprint } = hello else {
        conn.close(1u32.into(), b"expected Hello");
        return Err("first message was not Hello".into());
    };
    let refusal = if version != PROTOCOL_VERSION {
        Some(format!("protocol version {version}; this coordinator speaks {PROTOCOL_VERSION}"))
    } else if !tokens_equal(&presented, token) {
        Some("wrong cluster token".to_string())
    } else {
        None
    };
    if let Some(reason) = refusal {
        let _ = write_frame(&mut send, &ToWorker::Rejected { reason: reason.clone() }).await;
        let _ = send.finish();
        // Let the worker read the refusal before the connection goes.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        conn.close(2u32.into(), reason.as_bytes());
        return Err(format!("{reason} (worker {host} pid {pid})"));
    }
    write_frame(&mut send, &ToWorker::Welcome { worker_id }).await.map_err(|e| e.to_string())?;
    Ok(WorkerConn { conn, send, recv, host, pid, data_addr, fingerprint })
}

fn unexpected(rank: usize, msg: &ToCoordinator) -> CoordError {
    CoordError::Protocol(format!("unexpected message from rank {rank}: {msg:?}"))
}

/// An assigned group: a send stream per rank and one inbox fed by a reader task per rank.
struct Group {
    sends: Vec<SendStream>,
    conns: Vec<Connection>,
    hosts: Vec<String>,
    inbox: mpsc::UnboundedReceiver<(usize, std::result::Result<ToCoordinator, String>)>,
}

impl Group {
    async fn assign(workers: Vec<WorkerConn>, seed: u64, task: Task) -> Result<Self> {
        let world = workers.len();
        let peers: Vec<PeerInfo> = workers
            .iter()
            .enumerate()
            .map(|(rank, w)| PeerInfo { rank, data_addr: w.data_addr.clone(), fingerprint: w.fingerprint.clone() })
            .collect();
        let (tx, inbox) = mpsc::unbounded_channel();
        let mut sends = Vec::new();
        let mut conns = Vec::new();
        let mut hosts = Vec::new();
        for (rank, w) in workers.into_iter().enumerate() {
            let WorkerConn { conn, mut send, mut recv, host, .. } = w;
            let assign = ToWorker::Assign(Assign { rank, world, seed, peers: peers.clone(), task: task.clone() });
            write_frame(&mut send, &assign)
                .await
                .map_err(|e| CoordError::Net(format!("assigning rank {rank}: {e}")))?;
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    match read_frame::<_, ToCoordinator>(&mut recv).await {
                        Ok(msg) => {
                            if tx.send((rank, Ok(msg))).is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send((rank, Err(e.to_string())));
                            break;
                        }
                    }
                }
            });
            sends.push(send);
            conns.push(conn);
            hosts.push(host);
        }
        tracing::info!(world, "group assigned");
        Ok(Self { sends, conns, hosts, inbox })
    }

    /// The next message from any rank. A lost connection or a `Failed` is an error naming the rank.
    async fn next(&mut self) -> Result<(usize, ToCoordinator)> {
        match self.inbox.recv().await {
            Some((rank, Ok(ToCoordinator::Failed { error, .. }))) => {
                Err(CoordError::Run(format!("rank {rank} ({}) failed: {error}", self.hosts[rank])))
            }
            Some((rank, Ok(msg))) => Ok((rank, msg)),
            Some((rank, Err(e))) => Err(CoordError::Run(format!("lost rank {rank} ({}): {e}", self.hosts[rank]))),
            None => Err(CoordError::Run("all worker connections closed".into())),
        }
    }

    /// Failures reported within `window` after the first one, as text.
    async fn other_failures(&mut self, window: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + window;
        let mut found = Vec::new();
        while let Ok(Some((rank, msg))) = tokio::time::timeout_at(deadline, self.inbox.recv()).await {
            match msg {
                Ok(ToCoordinator::Failed { error, .. }) => found.push(format!("rank {rank} failed: {error}")),
                Err(e) => found.push(format!("lost rank {rank} ({}): {e}", self.hosts[rank])),
                Ok(_) => {}
            }
        }
        found
    }

    async fn broadcast(&mut self, msg: &ToWorker) {
        for (rank, send) in self.sends.iter_mut().enumerate() {
            if let Err(e) = write_frame(send, msg).await {
                tracing::debug!(rank, "could not send {msg:?}: {e}");
            }
        }
    }

    /// Tells every worker the run is over (Shutdown) or aborted (Abort) and closes the
    /// connections. After an Abort the workers re-join: the coordinator may re-form the
    /// group from the survivors, or it exits and the workers find it gone.
    async fn finish<T>(&mut self, result: &Result<T>) {
        match result {
            Ok(_) => self.broadcast(&ToWorker::Shutdown).await,
            Err(e) => self.broadcast(&ToWorker::Abort { reason: e.to_string() }).await,
        }
        for send in &mut self.sends {
            let _ = send.finish();
        }
        // Give the workers a moment to read the last message and close their side.
        let all_closed = async {
            for conn in &self.conns {
                conn.closed().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), all_closed).await;
    }
}

async fn supervise_train(group: &mut Group, writer: &mut RunWriter) -> Result<Summary> {
    let world = group.sends.len();
    // 1. Identical initial weights on every rank, then start.
    let mut init = BTreeMap::new();
    while init.len() < world {
        match group.next().await? {
            (rank, ToCoordinator::Ready { init_weight_hash, .. }) => {
                init.insert(rank, init_weight_hash);
            }
            (rank, other) => return Err(unexpected(rank, &other)),
        }
    }
    let first = init[&0];
    if let Some((rank, h)) = init.iter().find(|(_, &h)| h != first) {
        return Err(CoordError::Run(format!(
            "rank {rank} built different initial weights ({h:016x} vs rank 0's {first:016x})"
        )));
    }
    tracing::info!(hash = format!("{first:016x}"), "all ranks hold identical initial weights");
    group.broadcast(&ToWorker::Start).await;

    // 2. Reports until every rank is done; weight hashes compared at every logged step.
    let mut step_hashes: BTreeMap<u64, Vec<(usize, u64)>> = BTreeMap::new();
    let mut summaries: BTreeMap<usize, Summary> = BTreeMap::new();
    while summaries.len() < world {
        match group.next().await? {
            (0, ToCoordinator::Progress { step, .. }) => writer.progress(step),
            (_, ToCoordinator::Progress { .. }) => {}
            (rank, ToCoordinator::Step { record, weight_hash, .. }) => {
                let step = record.step;
                if rank == 0 {
                    writer.train(record)?;
                }
                let seen = step_hashes.entry(step).or_default();
                seen.push((rank, weight_hash));
                if seen.len() == world {
                    if let Some((r, h)) = seen.iter().find(|(_, h)| *h != seen[0].1) {
                        return Err(CoordError::Run(format!(
                            "ranks diverged at step {step}: rank {r} has weight hash {h:016x}, rank {} has {:016x}",
                            seen[0].0, seen[0].1
                        )));
                    }
                    step_hashes.remove(&step);
                }
            }
            (0, ToCoordinator::Eval { record, .. }) => writer.eval(record)?,
            (_, ToCoordinator::Eval { .. }) => {}
            (rank, ToCoordinator::Done { summary, .. }) => {
                summaries.insert(rank, summary);
            }
            (rank, other) => return Err(unexpected(rank, &other)),
        }
    }
    let hashes: Vec<String> = summaries.values().map(|s| s.weight_hash.clone()).collect();
    if hashes.iter().any(|h| *h != hashes[0]) {
        return Err(CoordError::Run(format!("final weights differ across ranks: {hashes:?}")));
    }
    let mut summary = summaries.remove(&0).ok_or_else(|| CoordError::Run("no summary from rank 0".into()))?;
    summary.world_size = world;
    summary.rank_weight_hashes = hashes;
    Ok(summary)
}
