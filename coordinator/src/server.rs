//! The coordinator's QUIC server. Each incoming connection is handled by its own task: a
//! malformed frame, a wrong token or a wrong protocol version closes that connection only.

use crate::{CoordError, Result, RunWriter, StatusBoard};
use lockstep_collective::tls::{endpoint, server_config, Identity};
use lockstep_proto::toolbox::Transport;
use lockstep_proto::topology::Topology;
use lockstep_proto::trace::TraceSpan;
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

/// How a group runs a training job, besides the job itself.
#[derive(Debug, Clone, Copy)]
pub struct TrainOptions<'a> {
    /// Compute threads per worker (0: the worker's own default).
    pub threads: usize,
    pub bucket_bytes: u64,
    /// Every rank restores this checkpoint first.
    pub resume: Option<&'a std::path::Path>,
    /// Write a Chrome trace of every rank here.
    pub trace: Option<&'a std::path::Path>,
}

/// A worker that has presented the right token.
pub struct WorkerConn {
    pub conn: Connection,
    send: SendStream,
    recv: RecvStream,
    pub host: String,
    pub host_id: String,
    pub pid: u32,
    pub data_addr: String,
    pub fingerprint: String,
    /// RANK / WORLD_SIZE / LOCAL_RANK the worker was launched with, if any.
    pub requested_rank: Option<usize>,
    pub world_size: Option<usize>,
    pub local_rank: Option<usize>,
}

impl WorkerConn {
    /// Refuses this worker with `reason` (it reports the reason and stops).
    async fn reject(mut self, reason: &str) {
        tracing::warn!(host = %self.host, pid = self.pid, "refusing worker: {reason}");
        let _ = write_frame(&mut self.send, &ToWorker::Rejected { reason: reason.to_string() }).await;
        let _ = self.send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.closed()).await;
    }
}

pub struct Coordinator {
    endpoint: Endpoint,
    pub identity: Identity,
    /// `lockstep://HOST:PORT#<sha256>`: what workers pass to `--join`.
    pub join_address: String,
    joined: mpsc::UnboundedReceiver<WorkerConn>,
    /// Workers that joined a running job (scale-up), held for the next re-formation.
    pending: Vec<WorkerConn>,
    /// What `lockstep status` is told.
    pub status: StatusBoard,
}

/// Admitting workers that join a running job (elastic scale-up): while the group has
/// `room` for more (`train.max_workers`), a joiner is held and every rank is asked to stop
/// after its current step with a checkpoint; the run then re-forms, larger, from it.
struct Admission<'a> {
    joined: &'a mut mpsc::UnboundedReceiver<WorkerConn>,
    waiting: &'a mut Vec<WorkerConn>,
    room: usize,
}

/// The next worker to admit; never resolves while there is no room.
async fn next_joiner(admission: &mut Option<Admission<'_>>) -> WorkerConn {
    match admission {
        Some(a) if a.waiting.len() < a.room => match a.joined.recv().await {
            Some(w) => w,
            None => std::future::pending().await,
        },
        _ => std::future::pending().await,
    }
}

impl Coordinator {
    /// Listens on `listen`; `advertise_host` is the host name put in the join address
    /// (default: the listen IP, or 127.0.0.1 when listening on all interfaces).
    pub fn bind(listen: SocketAddr, advertise_host: Option<String>, token: String) -> Result<Self> {
        let identity = Identity::generate()?;
        Self::bind_with(listen, advertise_host, token, identity)
    }

    /// `bind` with a given identity (a restarted coordinator keeps its fingerprint).
    pub fn bind_with(
        listen: SocketAddr,
        advertise_host: Option<String>,
        token: String,
        identity: Identity,
    ) -> Result<Self> {
        let server = server_config(&identity, None)?;
        let endpoint = endpoint(listen, server).map_err(|e| CoordError::Net(format!("listening on {listen}: {e}")))?;
        let local =
            endpoint.local_addr().map_err(|source| CoordError::Io { what: "the endpoint's address".into(), source })?;
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
        let status = StatusBoard::default();
        status.set_state("waiting for workers");
        let board = status.clone();
        tokio::spawn(async move {
            let mut next_id = 0u64;
            while let Some(incoming) = accept_ep.accept().await {
                next_id += 1;
                let (tx, token, board) = (tx.clone(), token.clone(), board.clone());
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(incoming, &token, next_id, &board)).await {
                        Ok(Ok(None)) => tracing::debug!(%remote, "answered a status query"),
                        Ok(Ok(Some(worker))) => {
                            tracing::info!(%remote, host = %worker.host, pid = worker.pid, "worker joined");
                            let _ = tx.send(worker);
                        }
                        Ok(Err(e)) => tracing::warn!(%remote, "rejected connection: {e}"),
                        Err(_) => tracing::warn!(%remote, "rejected connection: no Hello within {HANDSHAKE_TIMEOUT:?}"),
                    }
                });
            }
        });
        Ok(Self { endpoint, identity, join_address, joined, pending: Vec::new(), status })
    }

    /// Workers admitted during the run, waiting for the next re-formation.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint.local_addr().map_err(|source| CoordError::Io { what: "the endpoint's address".into(), source })
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
        // Workers admitted during the last run (scale-up) are the first of the new group.
        let mut workers = std::mem::take(&mut self.pending);
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
        Ok(place_by_rank(workers))
    }

    /// Waits until `n` workers have joined (or `timeout` passes) and returns them in rank
    /// order: a worker launched with a rank (RANK) gets it, the others fill the free ranks in
    /// join order. A worker whose rank is out of range or taken, or whose WORLD_SIZE is not
    /// `n`, is refused (with the reason) and the wait goes on.
    pub async fn rendezvous(&mut self, n: usize, timeout: Duration) -> Result<Vec<WorkerConn>> {
        let mut workers: Vec<WorkerConn> = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + timeout;
        while workers.len() < n {
            match tokio::time::timeout_at(deadline, self.joined.recv()).await {
                Ok(Some(w)) => {
                    if let Some(reason) = placement_conflict(&w, &workers, n) {
                        w.reject(&reason).await;
                        continue;
                    }
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
        Ok(place_by_rank(workers))
    }

    /// Trains `spec` on `workers` (rank = position), writing metrics through `writer`.
    pub async fn run_train(
        &mut self,
        workers: Vec<WorkerConn>,
        spec: &JobSpec,
        opts: TrainOptions<'_>,
        writer: &mut RunWriter,
    ) -> Result<Summary> {
        let TrainOptions { threads, bucket_bytes, resume, trace } = opts;
        let weights_path = Some(writer.dir().join("model.safetensors").display().to_string());
        let checkpoint_dir = Some(writer.dir().join("checkpoints").display().to_string());
        let resume_path = resume.map(|p| p.display().to_string());
        let task = Task::Train {
            job_toml: spec.to_toml(),
            threads,
            bucket_bytes,
            weights_path,
            checkpoint_dir,
            resume_path,
            trace: trace.is_some(),
        };
        self.status.set_state("starting");
        let world = workers.len();
        let mut group = Group::assign(workers, spec.seed, task, self.status.clone()).await?;
        let stages = spec.parallel.pipeline_stages.max(1);
        let room = spec.train.max_workers.saturating_sub(world);
        let admission = (room > 0).then_some(Admission { joined: &mut self.joined, waiting: &mut self.pending, room });
        let mut result = supervise_train(&mut group, writer, trace, stages, admission).await;
        self.status.set_state(match &result {
            Ok(_) => "finished".to_string(),
            Err(e) => format!("failed: {e}"),
        });
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

    /// Times all-reduces of `sizes` bytes on `workers` over `transport`; for each size the
    /// slowest rank's median (a collective is done when its last rank is).
    pub async fn run_bench(
        &mut self,
        workers: Vec<WorkerConn>,
        sizes: Vec<u64>,
        iters: usize,
        transport: Transport,
    ) -> Result<Vec<AllReduceTiming>> {
        let world = workers.len();
        let task = Task::BenchAllReduce { sizes, iters, transport };
        let mut group = Group::assign(workers, 0, task, self.status.clone()).await?;
        let result = async {
            let mut slowest: Vec<AllReduceTiming> = Vec::new();
            for _ in 0..world {
                match group.next().await? {
                    (_, ToCoordinator::BenchResult { results, .. }) => {
                        if slowest.is_empty() {
                            slowest = results;
                        } else {
                            for (s, r) in slowest.iter_mut().zip(results) {
                                s.median_s = s.median_s.max(r.median_s);
                            }
                        }
                    }
                    (rank, other) => return Err(unexpected(rank, &other)),
                }
            }
            Ok(slowest)
        }
        .await;
        group.finish(&result).await;
        result
    }
}

/// Why `w` cannot join a group of `n` that already holds `placed`, if it cannot.
fn placement_conflict(w: &WorkerConn, placed: &[WorkerConn], n: usize) -> Option<String> {
    if let Some(size) = w.world_size.filter(|&size| size != n) {
        return Some(format!("launched with WORLD_SIZE={size}, but this coordinator runs {n} workers"));
    }
    let rank = w.requested_rank?;
    if rank >= n {
        return Some(format!("launched as RANK={rank}, but ranks run from 0 to {}", n - 1));
    }
    placed.iter().find(|p| p.requested_rank == Some(rank)).map(|p| {
        format!("RANK={rank} is taken by the worker on {} (pid {}); each worker needs its own RANK", p.host, p.pid)
    })
}

/// Rank order: workers launched with a rank take it (as far as the group is large enough);
/// the others fill the remaining places in join order.
fn place_by_rank(workers: Vec<WorkerConn>) -> Vec<WorkerConn> {
    let n = workers.len();
    let mut slots: Vec<Option<WorkerConn>> = (0..n).map(|_| None).collect();
    let mut rest = Vec::new();
    let mut ranked: Vec<WorkerConn> = Vec::new();
    for w in workers {
        if w.requested_rank.is_some() {
            ranked.push(w);
        } else {
            rest.push(w);
        }
    }
    // A re-formed (smaller) group keeps the launch order of the survivors.
    ranked.sort_by_key(|w| w.requested_rank);
    for w in ranked {
        let want = w.requested_rank.unwrap_or(0);
        if want < n && slots[want].is_none() {
            slots[want] = Some(w);
        } else {
            rest.insert(0, w);
        }
    }
    let mut rest = rest.into_iter();
    slots.into_iter().filter_map(|slot| slot.or_else(|| rest.next())).collect()
}

/// The first exchange on a new connection: a worker's Hello (Some(worker)) or a status
/// query, answered here (None).
async fn handshake(
    incoming: quinn::Incoming,
    token: &str,
    worker_id: u64,
    board: &StatusBoard,
) -> std::result::Result<Option<WorkerConn>, String> {
    let conn = incoming.await.map_err(|e| format!("handshake: {e}"))?;
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| format!("no control stream: {e}"))?;
    let hello: ToCoordinator = match read_frame(&mut recv).await {
        Ok(m) => m,
        Err(e) => {
            conn.close(1u32.into(), b"malformed frame");
            return Err(format!("bad first frame: {e}"));
        }
    };
    let (version, presented) = match &hello {
        ToCoordinator::Hello { version, token, .. } | ToCoordinator::StatusQuery { version, token } => {
            (*version, token.clone())
        }
        _ => {
            conn.close(1u32.into(), b"expected Hello");
            return Err("first message was not Hello".into());
        }
    };
    let (host, pid) = match &hello {
        ToCoordinator::Hello { host, pid, .. } => (host.clone(), *pid),
        _ => ("status client".to_string(), 0),
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
    let ToCoordinator::Hello { data_addr, fingerprint, rank, world_size, local_rank, host_id, .. } = hello else {
        write_frame(&mut send, &ToWorker::Status(board.snapshot())).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        return Ok(None);
    };
    write_frame(&mut send, &ToWorker::Welcome { worker_id }).await.map_err(|e| e.to_string())?;
    Ok(Some(WorkerConn {
        conn,
        send,
        recv,
        host,
        host_id,
        pid,
        data_addr,
        fingerprint,
        requested_rank: rank,
        world_size,
        local_rank,
    }))
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
    status: StatusBoard,
}

impl Group {
    async fn assign(workers: Vec<WorkerConn>, seed: u64, task: Task, status: StatusBoard) -> Result<Self> {
        let world = workers.len();
        let peers: Vec<PeerInfo> = workers
            .iter()
            .enumerate()
            .map(|(rank, w)| PeerInfo {
                rank,
                data_addr: w.data_addr.clone(),
                fingerprint: w.fingerprint.clone(),
                host_id: w.host_id.clone(),
            })
            .collect();
        status.set_group(&workers.iter().map(|w| (w.host.clone(), w.pid)).collect::<Vec<_>>());
        // One secret per group formation: a worker of an earlier group cannot attach.
        let group_secret = crate::generate_secret()?;
        let (tx, inbox) = mpsc::unbounded_channel();
        let mut sends = Vec::new();
        let mut conns = Vec::new();
        let mut hosts = Vec::new();
        for (rank, w) in workers.into_iter().enumerate() {
            let WorkerConn { conn, mut send, mut recv, host, .. } = w;
            let assign = ToWorker::Assign(Assign {
                rank,
                world,
                seed,
                peers: peers.clone(),
                group_secret: group_secret.clone(),
                task: task.clone(),
            });
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
        Ok(Self { sends, conns, hosts, inbox, status })
    }

    /// The next message from any rank. A lost connection or a `Failed` is an error naming the rank.
    async fn next(&mut self) -> Result<(usize, ToCoordinator)> {
        match self.inbox.recv().await {
            Some((rank, Ok(ToCoordinator::Failed { error, .. }))) => {
                self.status.set_rank_state(rank, "failed");
                let what = format!("rank {rank} ({}) failed: {error}", self.hosts[rank]);
                // `WorkerError::Stopped` (a loss blow-up, a refusal): on purpose, not a fault.
                if error.starts_with("training stopped: ") {
                    Err(CoordError::Stopped(what))
                } else {
                    Err(CoordError::Run(what))
                }
            }
            Some((rank, Ok(msg))) => {
                self.status.heard(rank);
                Ok((rank, msg))
            }
            Some((rank, Err(e))) => {
                self.status.set_rank_state(rank, "lost");
                Err(CoordError::Run(format!("lost rank {rank} ({}): {e}", self.hosts[rank])))
            }
            None => Err(CoordError::Run("all worker connections closed".into())),
        }
    }

    /// `next`, but before each message and every 100 ms without one it checks whether this
    /// process was asked to stop (SIGTERM/SIGINT) and, once, tells every worker to stop
    /// after its current step (checked before waiting, not only when the wait times out:
    /// a fast run reports more often than every 100 ms and would never stop). A
    /// worker joining with room to admit it (`admission`) asks for the same stop, once, as a
    /// `Rescale` (`rescaling` is set).
    async fn next_or_preempt(
        &mut self,
        told: &mut bool,
        admission: &mut Option<Admission<'_>>,
        rescaling: &mut bool,
    ) -> Result<(usize, ToCoordinator)> {
        loop {
            if let (false, Some(signal)) = (*told, lockstep_proto::preempt::requested()) {
                tracing::warn!("signal {signal}: every rank stops after its current step, with a checkpoint");
                self.broadcast(&ToWorker::Preempt { signal }).await;
                *told = true;
            }
            let joined = tokio::select! {
                msg = self.next() => return msg,
                w = next_joiner(admission) => Some(w),
                _ = tokio::time::sleep(Duration::from_millis(100)) => None,
            };
            if let Some(w) = joined {
                tracing::info!(host = %w.host, pid = w.pid, "a worker joined the running job: admitting it at the next step");
                if let Some(a) = admission.as_mut() {
                    a.waiting.push(w);
                }
                if !*told {
                    self.broadcast(&ToWorker::Rescale).await;
                    (*told, *rescaling) = (true, true);
                }
            }
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

/// `stages` > 1: a pipeline, where rank r holds stage r mod stages and weight hashes are
/// compared among the replicas of each stage.
async fn supervise_train(
    group: &mut Group,
    writer: &mut RunWriter,
    trace: Option<&std::path::Path>,
    stages: usize,
    mut admission: Option<Admission<'_>>,
) -> Result<Summary> {
    start_when_identical(group, writer).await?;
    let mut reports = Reports::new(group.sends.len(), stages);
    let mut rescaling = false;
    while reports.summaries.len() < reports.world {
        let next = group.next_or_preempt(&mut reports.told_to_stop, &mut admission, &mut rescaling).await;
        let taken = next.and_then(|(rank, message)| reports.take(group, writer, rank, message));
        match taken {
            Err(CoordError::Preempted { step, checkpoint }) if rescaling => {
                return Err(CoordError::Rescale { step, checkpoint })
            }
            other => other?,
        }
    }
    reports.into_summary(group, writer, trace)
}

/// Waits for every rank's Ready, checks that all built identical initial weights, and
/// starts them.
async fn start_when_identical(group: &mut Group, writer: &mut RunWriter) -> Result<()> {
    let job = writer.job_name().to_string();
    let mut init = BTreeMap::new();
    while init.len() < group.sends.len() {
        match group.next().await? {
            (rank, ToCoordinator::Ready { init_weight_hash, total_steps, .. }) => {
                if rank == 0 {
                    group.status.set_job(&job, total_steps);
                    writer.set_total_steps(total_steps);
                }
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
    group.status.set_state("training");
    Ok(())
}

/// What the ranks report during a run, until every rank is done.
struct Reports {
    world: usize,
    stages: usize,
    spans: Vec<Vec<TraceSpan>>,
    /// Weight hashes of a logged step, until every rank has sent its own.
    step_hashes: BTreeMap<u64, Vec<(usize, u64)>>,
    summaries: BTreeMap<usize, Summary>,
    told_to_stop: bool,
    preempted: BTreeMap<usize, (u64, Option<String>)>,
}

impl Reports {
    fn new(world: usize, stages: usize) -> Self {
        Self {
            world,
            stages,
            spans: vec![Vec::new(); world],
            step_hashes: BTreeMap::new(),
            summaries: BTreeMap::new(),
            told_to_stop: false,
            preempted: BTreeMap::new(),
        }
    }

    /// One message from `rank`: progress, metrics, logs, traces, its summary, or its stop.
    fn take(&mut self, group: &mut Group, writer: &mut RunWriter, rank: usize, message: ToCoordinator) -> Result<()> {
        match message {
            ToCoordinator::Preempted { step, checkpoint, .. } => {
                // Every rank stops after the same step; wait for all, so that the
                // checkpoint is complete before the workers are shut down.
                self.preempted.insert(rank, (step, checkpoint));
                if self.preempted.len() == self.world {
                    let checkpoint = self.preempted.values().find_map(|(_, c)| c.clone());
                    return Err(CoordError::Preempted { step, checkpoint });
                }
            }
            ToCoordinator::Progress { step, examples_per_s, comm_share, .. } => {
                group.status.progress(rank, step, examples_per_s, comm_share);
                if rank == 0 {
                    writer.progress(step);
                }
            }
            ToCoordinator::Trace { spans, .. } => self.spans[rank].extend(spans),
            ToCoordinator::Log { text, .. } => writer.rank_log(rank, &text)?,
            ToCoordinator::Step { record, weight_hash, grad_histograms, .. } => {
                let step = record.step;
                group.status.progress(rank, step, f64::NAN, f64::NAN);
                if rank == 0 {
                    writer.train(record, &grad_histograms)?;
                }
                self.compare_hashes(step, rank, weight_hash)?;
            }
            ToCoordinator::Eval { record, .. } if rank == 0 => writer.eval(record)?,
            ToCoordinator::Eval { .. } => {}
            ToCoordinator::Done { summary, .. } => {
                group.status.set_rank_state(rank, "done");
                self.summaries.insert(rank, summary);
            }
            other => return Err(unexpected(rank, &other)),
        }
        Ok(())
    }

    /// Once every rank has reported `step`: the replicas of each stage hold equal weights.
    fn compare_hashes(&mut self, step: u64, rank: usize, weight_hash: u64) -> Result<()> {
        let seen = self.step_hashes.entry(step).or_default();
        seen.push((rank, weight_hash));
        if seen.len() < self.world {
            return Ok(());
        }
        for (r, h) in seen.iter() {
            if let Some((r0, h0)) = seen.iter().find(|(r0, _)| Topology::same_stage(self.stages, *r0, *r)) {
                if h != h0 {
                    return Err(CoordError::Run(format!(
                        "ranks diverged at step {step}: rank {r} has weight hash {h:016x}, rank {r0} has {h0:016x}"
                    )));
                }
            }
        }
        self.step_hashes.remove(&step);
        Ok(())
    }

    /// Rank 0's summary with every rank's final hash (equal within a stage) and the stage
    /// reports; the trace of every rank written.
    fn into_summary(
        mut self,
        group: &Group,
        writer: &mut RunWriter,
        trace: Option<&std::path::Path>,
    ) -> Result<Summary> {
        let hashes: Vec<String> = self.summaries.values().map(|s| s.weight_hash.clone()).collect();
        // Every rank's final hash against its stage's first replica's.
        let first_replica = |r: usize| Topology::new(r, self.world, self.stages).map_or(0, |t| t.rank_of(t.stage(), 0));
        if hashes.iter().enumerate().any(|(r, h)| *h != hashes[first_replica(r)]) {
            return Err(CoordError::Run(format!("final weights differ across the replicas of a stage: {hashes:?}")));
        }
        let pipeline_stages: Vec<_> = self.summaries.values().filter_map(|s| s.pipeline.clone()).collect();
        if let Some(path) = trace {
            let ranks: Vec<(usize, String, Vec<TraceSpan>)> =
                self.spans.into_iter().enumerate().map(|(rank, s)| (rank, group.hosts[rank].clone(), s)).collect();
            writer.write_trace(path, &ranks)?;
        }
        let mut summary = self.summaries.remove(&0).ok_or_else(|| CoordError::Run("no summary from rank 0".into()))?;
        summary.world_size = self.world;
        summary.rank_weight_hashes = hashes;
        if !pipeline_stages.is_empty() {
            // Rank 0 holds stage 0 only: the model is the sum of one replica's stages.
            summary.params = pipeline_stages.iter().filter(|s| s.replica == 0).map(|s| s.params).sum();
        }
        summary.pipeline_stages = pipeline_stages;
        Ok(summary)
    }
}

/// `lockstep status`: connects to the coordinator at `join` (pinning its certificate), asks
/// for its status and returns it.
pub async fn query_status(join: &str, token: &str) -> Result<lockstep_proto::wire::ClusterStatus> {
    use lockstep_collective::tls::{client_config, parse_join_address, resolve};
    let net = |e: &dyn std::fmt::Display| CoordError::Net(e.to_string());
    let (addr, fingerprint) = parse_join_address(join).map_err(|e| net(&e))?;
    let remote = resolve(&addr).map_err(|e| net(&e))?;
    let me = Identity::generate().map_err(|e| net(&e))?;
    let local: SocketAddr = if remote.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().map_err(|e| net(&e))?;
    let ep = endpoint(local, server_config(&me, None).map_err(|e| net(&e))?).map_err(|e| net(&e))?;
    let exchange = async {
        let cfg = client_config(&me, &fingerprint).map_err(|e| net(&e))?;
        let conn = ep
            .connect_with(cfg, remote, "lockstep")
            .map_err(|e| net(&e))?
            .await
            .map_err(|e| CoordError::Net(format!("connecting to coordinator {addr}: {e}")))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| net(&e))?;
        let query = ToCoordinator::StatusQuery { version: PROTOCOL_VERSION, token: token.to_string() };
        write_frame(&mut send, &query).await.map_err(|e| net(&e))?;
        let reply = read_frame::<_, ToWorker>(&mut recv).await;
        conn.close(0u32.into(), b"status read");
        match reply {
            Ok(ToWorker::Status(status)) => Ok(status),
            Ok(ToWorker::Rejected { reason }) => Err(CoordError::Run(format!("coordinator {addr} refused: {reason}"))),
            Ok(other) => Err(CoordError::Protocol(format!("expected a status, got {other:?}"))),
            Err(e) => Err(CoordError::Net(format!("reading the status from {addr}: {e}"))),
        }
    };
    let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange).await.unwrap_or_else(|_| {
        Err(CoordError::Net(format!("coordinator {addr} did not answer within {HANDSHAKE_TIMEOUT:?}")))
    });
    ep.close(0u32.into(), b"done");
    result
}
