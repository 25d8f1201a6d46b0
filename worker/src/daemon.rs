//! The worker daemon: joins a coordinator (pinning its certificate fingerprint, presenting
//! the cluster token), then runs the tasks it is assigned. With `once` it exits after its
//! first task; otherwise it waits for the next, and re-joins if the coordinator goes away.

use crate::model_file::save_model;
use crate::pipeline::{PipeReport, PipelineStage};
use crate::reducer::BucketReducer;
use crate::run::run_training_stage;
use crate::run::StepReport;
use crate::trainer::{GradReducer, NoReduce};
use crate::{Result, RunEvent, RunOptions, WorkerError};
use lockstep_collective::hier::HierComm;
use lockstep_collective::mesh::{connect_mesh, Channel, MeshPlan};
use lockstep_collective::pipe::QuicPipe;
use lockstep_collective::quic::{LinkAbort, QuicLink};
use lockstep_collective::shm::pipe::ShmPipe;
use lockstep_collective::shm::{ShmComm, ShmGroupSpec};
use lockstep_collective::tcp::TcpLink;
use lockstep_collective::tls::{
    endpoint, parse_join_address, pinned_client_config, resolve, server_config, AllowedPeers, Identity,
};
use lockstep_collective::topology::{Layout, Topology};
use lockstep_collective::{Communicator, RingComm, WireFormat};
use lockstep_kernels::{Backend, CpuBackend};
use lockstep_proto::job::Device;
use lockstep_proto::preempt::RESCALE;
use lockstep_proto::toolbox::{Dtype, InterHost, Transport};
use lockstep_proto::topology::Topology as RankTopology;
use lockstep_proto::wire::{
    read_frame, write_frame, AllReduceTiming, Assign, Task, ToCoordinator, ToWorker, PROTOCOL_VERSION,
};
use lockstep_proto::JobSpec;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// `lockstep://HOST:PORT#<sha256>`
    pub join: String,
    pub token: String,
    pub once: bool,
    /// Compute threads when the coordinator does not say (0 = all cores).
    pub threads: usize,
    /// Local IP for the data-plane endpoint (default: all interfaces).
    pub bind: IpAddr,
    /// IP announced to peers (default: the interface that reaches the coordinator).
    pub advertise: Option<IpAddr>,
    /// How long a collective may wait for a peer.
    pub collective_timeout: Duration,
    /// The rank, world size and host-local index a launcher started this worker as
    /// (RANK, WORLD_SIZE, LOCAL_RANK): the coordinator places it at that rank.
    pub launch_rank: Option<usize>,
    pub launch_world_size: Option<usize>,
    pub local_rank: Option<usize>,
}

fn net<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> WorkerError {
    move |e| WorkerError::Collective(format!("{what}: {e}"))
}

/// The address of the local interface that routes to `remote` (no packet is sent).
fn local_ip_towards(remote: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if remote.is_ipv4() { "0.0.0.0:0".parse().ok()? } else { "[::]:0".parse().ok()? };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(remote).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

/// What this worker process owns for its whole life: the network runtime, its data-plane
/// endpoint, identity and options.
struct Node<'a> {
    rt: &'a tokio::runtime::Runtime,
    data_ep: &'a quinn::Endpoint,
    allowed: &'a AllowedPeers,
    me: &'a Identity,
    /// TCP at the data-plane port's number, for TLS-over-TCP rings (None: could not bind).
    tcp: Option<&'a std::net::TcpListener>,
    opts: &'a DaemonOptions,
    /// The ring link of the running task: closed when the coordinator aborts the task or
    /// goes away, so a collective blocked on a dead peer fails now rather than at its timeout.
    active_link: ActiveLink,
    /// The running task's collective topology, for its summary.
    topology: std::sync::Mutex<String>,
}

type ActiveLink = std::sync::Arc<std::sync::Mutex<Option<LinkAbort>>>;

fn abort_active_link(active: &ActiveLink, reason: &str) {
    if let Some(link) = active.lock().ok().and_then(|mut l| l.take()) {
        tracing::warn!("closing the ring link: {reason}");
        link.abort(reason);
    }
}

struct Session {
    outbox: mpsc::UnboundedSender<ToCoordinator>,
    /// Behind a mutex only so the training closure (run on a rayon pool) may hold it.
    inbox: std::sync::Mutex<std_mpsc::Receiver<ToWorker>>,
}

impl Session {
    fn recv(&self, timeout: Option<Duration>) -> std::result::Result<ToWorker, std_mpsc::RecvTimeoutError> {
        let inbox = self.inbox.lock().map_err(|_| std_mpsc::RecvTimeoutError::Disconnected)?;
        match timeout {
            Some(t) => inbox.recv_timeout(t),
            None => inbox.recv().map_err(|_| std_mpsc::RecvTimeoutError::Disconnected),
        }
    }

    fn try_recv(&self) -> std::result::Result<ToWorker, std_mpsc::TryRecvError> {
        self.inbox.lock().map_err(|_| std_mpsc::TryRecvError::Disconnected)?.try_recv()
    }
}

pub fn run_daemon(opts: &DaemonOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("lockstep-net")
        .build()
        .map_err(net("starting the network runtime"))?;
    let (coord_addr, coord_fp) = parse_join_address(&opts.join)?;
    let coord = resolve(&coord_addr)?;
    let identity = Identity::generate().map_err(net("certificate"))?;
    let allowed = AllowedPeers::default();
    let data_ep = {
        let _guard = rt.enter();
        let server = server_config(&identity, Some(allowed.clone())).map_err(net("tls"))?;
        endpoint(SocketAddr::new(opts.bind, 0), server).map_err(net("data-plane endpoint"))?
    };
    let data_port = data_ep.local_addr().map_err(net("data-plane endpoint"))?.port();
    let tcp = lockstep_collective::tcp::listen(SocketAddr::new(opts.bind, data_port))
        .inspect_err(|e| tracing::warn!("no TCP listener at port {data_port} ({e}): tcp rings cannot form here"))
        .ok();
    let advertise = opts.advertise.or_else(|| local_ip_towards(coord)).unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let data_addr = SocketAddr::new(advertise, data_port).to_string();
    let node = Node {
        rt: &rt,
        data_ep: &data_ep,
        allowed: &allowed,
        me: &identity,
        tcp: tcp.as_ref(),
        opts,
        active_link: Default::default(),
        topology: Default::default(),
    };
    let result = node.join_and_serve(coord, &coord_fp, &coord_addr, &data_addr);
    // Close the connections properly so the coordinator sees us leave at once.
    data_ep.close(0u32.into(), b"worker exiting");
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), data_ep.wait_idle()).await }).ok();
    result
}

impl Node<'_> {
    fn join_and_serve(&self, coord: SocketAddr, coord_fp: &str, coord_addr: &str, data_addr: &str) -> Result<()> {
        let opts = self.opts;
        loop {
            let joining = Self::join(self.data_ep, self.me, coord, coord_fp, opts, data_addr, &self.active_link);
            let session = match self.rt.block_on(joining) {
                Ok(s) => s,
                // A refusal or a pinning failure will not fix itself: report it and stop.
                Err(e @ (WorkerError::Stopped(_) | WorkerError::Config(_) | WorkerError::PeerIdentity { .. })) => {
                    return Err(e)
                }
                Err(e) if opts.once => return Err(e),
                Err(e) => {
                    tracing::warn!("cannot join {}: {e}; retrying in 2 s", opts.join);
                    std::thread::sleep(Duration::from_secs(2));
                    continue;
                }
            };
            tracing::info!(coordinator = %coord_addr, data = %data_addr, "joined");
            // A run that ends with Shutdown is over; a connection the coordinator closes (it
            // is re-forming the group after a failure, or restarting) is re-joined, --once or
            // not: a --once worker leaves only when it cannot reach the coordinator any more.
            match self.serve(&session) {
                Ok(true) if opts.once => return Ok(()),
                // A daemon outlives runs: back to joining, for the next job.
                Ok(true) => tracing::info!("run finished; waiting for the next job"),
                Ok(false) => tracing::info!("coordinator closed the connection; re-joining"),
                Err(e @ (WorkerError::Stopped(_) | WorkerError::Preempted { .. })) => return Err(e),
                Err(e) if opts.once => return Err(e),
                Err(e) => tracing::warn!("task failed: {e}; re-joining"),
            }
        }
    }

    async fn join(
        ep: &quinn::Endpoint,
        me: &Identity,
        coord: SocketAddr,
        coord_fp: &str,
        opts: &DaemonOptions,
        data_addr: &str,
        active_link: &ActiveLink,
    ) -> Result<Session> {
        let (cfg, mismatch) = pinned_client_config(me, coord_fp).map_err(net("tls"))?;
        let conn =
            ep.connect_with(cfg, coord, "lockstep").map_err(net("connect"))?.await.map_err(|e| {
                match mismatch.presented() {
                    Some(presented) => WorkerError::PeerIdentity {
                        peer: format!("coordinator {coord}"),
                        pinned: coord_fp.to_string(),
                        presented,
                    },
                    None => WorkerError::Collective(format!("connecting to coordinator {coord}: {e}")),
                }
            })?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(net("control stream"))?;
        let hello = ToCoordinator::Hello {
            version: PROTOCOL_VERSION,
            token: opts.token.clone(),
            host: lockstep_proto::hostname(),
            host_id: lockstep_proto::host_id(),
            pid: std::process::id(),
            data_addr: data_addr.to_string(),
            fingerprint: me.fingerprint.clone(),
            rank: opts.launch_rank,
            world_size: opts.launch_world_size,
            local_rank: opts.local_rank,
        };
        write_frame(&mut send, &hello).await.map_err(net("sending Hello"))?;
        match read_frame::<_, ToWorker>(&mut recv).await {
            Ok(ToWorker::Welcome { .. }) => {}
            Ok(ToWorker::Rejected { reason }) => {
                conn.close(0u32.into(), b"rejected");
                return Err(WorkerError::Stopped(format!("coordinator {coord} rejected this worker: {reason}")));
            }
            Ok(other) => return Err(WorkerError::Collective(format!("expected Welcome, got {other:?}"))),
            Err(e) => return Err(WorkerError::Collective(format!("coordinator {coord} closed the connection: {e}"))),
        }
        let (outbox, mut out_rx) = mpsc::unbounded_channel::<ToCoordinator>();
        tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                if let Err(e) = write_frame(&mut send, &msg).await {
                    tracing::warn!("control stream: {e}");
                    break;
                }
            }
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
        });
        let (in_tx, inbox) = std_mpsc::channel();
        let active_link = active_link.clone();
        tokio::spawn(async move {
            while let Ok(msg) = read_frame::<_, ToWorker>(&mut recv).await {
                if let ToWorker::Abort { reason } = &msg {
                    abort_active_link(&active_link, &format!("coordinator aborted the task: {reason}"));
                }
                if let ToWorker::Preempt { signal } = &msg {
                    tracing::warn!("the coordinator was told to stop (signal {signal}): stopping after this step");
                    lockstep_proto::preempt::request(*signal);
                }
                if let ToWorker::Rescale = &msg {
                    tracing::info!("workers are waiting to join: checkpointing after this step to re-form larger");
                    lockstep_proto::preempt::request(lockstep_proto::preempt::RESCALE);
                }
                if in_tx.send(msg).is_err() {
                    break;
                }
            }
            abort_active_link(&active_link, "the coordinator connection closed");
            drop(conn);
        });
        Ok(Session { outbox, inbox: std::sync::Mutex::new(inbox) })
    }

    /// Runs assigned tasks until the coordinator ends the run (Ok(true)) or the connection
    /// ends (Ok(false)).
    fn serve(&self, session: &Session) -> Result<bool> {
        let opts = self.opts;
        loop {
            let Ok(msg) = session.recv(None) else { return Ok(false) };
            match msg {
                ToWorker::Assign(assign) => {
                    let rank = assign.rank;
                    let result = self.run_task(session, &assign);
                    crate::log_tap::stop_capture();
                    match &result {
                        Err(WorkerError::Preempted { step, checkpoint, .. }) => {
                            let checkpoint = checkpoint.clone();
                            let _ = session.outbox.send(ToCoordinator::Preempted { rank, step: *step, checkpoint });
                        }
                        Err(e) => {
                            tracing::error!(rank, "task failed: {e}");
                            let _ = session.outbox.send(ToCoordinator::Failed { rank, error: e.to_string() });
                        }
                        Ok(()) => {}
                    }
                    let rescaled = matches!(result, Err(WorkerError::Preempted { signal, .. }) if signal == RESCALE);
                    let succeeded = result.is_ok();
                    if let Err(e @ WorkerError::Preempted { .. }) = result {
                        // Let the report reach the coordinator, then stop this process (or,
                        // after a rescale, re-join for the larger group).
                        let _ = session.recv(Some(Duration::from_secs(10)));
                        if !rescaled {
                            return Err(e);
                        }
                        lockstep_proto::preempt::clear_rescale();
                    }
                    self.allowed.write().map_err(|_| WorkerError::Collective("peer set poisoned".into()))?.clear();
                    if let Ok(mut active) = self.active_link.lock() {
                        active.take(); // the link itself closed with the task
                    }
                    if rescaled {
                        return Ok(false);
                    }
                    if opts.once && succeeded {
                        // Wait (briefly) for the coordinator's Shutdown so the last reports land.
                        return Ok(matches!(session.recv(Some(Duration::from_secs(30))), Ok(ToWorker::Shutdown)));
                    }
                }
                ToWorker::Shutdown => return Ok(true),
                // Placement refusals (a RANK taken, a WORLD_SIZE that disagrees) come after
                // Welcome; like a refusal at the door they will not fix themselves.
                ToWorker::Rejected { reason } => {
                    return Err(WorkerError::Stopped(format!("the coordinator refused this worker: {reason}")))
                }
                ToWorker::Abort { reason } => tracing::warn!("abort outside a task: {reason}"),
                other => tracing::debug!("ignoring {other:?} outside a task"),
            }
        }
    }

    /// This rank's communicator (None at world size 1): shared memory between the ranks
    /// of one host, a QUIC ring between hosts, hierarchical when several hosts each have
    /// several ranks (`collective.transport`).
    fn build_comm(
        &self,
        assign: &Assign,
        transport: Transport,
        inter_host: InterHost,
    ) -> Result<Option<Box<dyn Communicator>>> {
        let topology = Topology::plan(&assign.peers, transport, inter_host).map_err(WorkerError::Config)?;
        self.set_topology(assign.rank, topology.describe());
        let rank = assign.rank;
        let comm: Box<dyn Communicator> = match topology.layout {
            Layout::Solo => return Ok(None),
            Layout::Ring => {
                let (ring, abort) = self.network_ring(topology.link, assign, rank, &assign.peers)?;
                self.set_active(abort);
                ring
            }
            Layout::Shm => {
                let local = self.shm_group(assign, "host", rank, (0..assign.world).collect())?;
                self.set_active(LinkAbort::default().with_shm(local.abort_handle()));
                Box::new(local)
            }
            Layout::Hierarchical => Box::new(self.hierarchical(assign, &topology)?),
        };
        Ok(Some(comm))
    }

    fn set_topology(&self, rank: usize, description: String) {
        if rank == 0 {
            tracing::info!("collective topology: {description}");
        }
        if let Ok(mut t) = self.topology.lock() {
            *t = description;
        }
    }

    fn set_active(&self, abort: LinkAbort) {
        if let Ok(mut active) = self.active_link.lock() {
            *active = Some(abort);
        }
    }

    /// A ring over `peers` on `link`, this rank being `peers[index]` (ring rank `index`),
    /// with what aborts it.
    fn network_ring(
        &self,
        link: InterHost,
        assign: &Assign,
        index: usize,
        peers: &[lockstep_proto::wire::PeerInfo],
    ) -> Result<(Box<dyn Communicator>, LinkAbort)> {
        let world = peers.len();
        match link {
            InterHost::Quic => {
                let link = self.quic_ring(index, peers)?;
                let abort = link.abort_handle();
                Ok((Box::new(RingComm { link, rank: index, world }), abort))
            }
            InterHost::Tcp => {
                let listener = self.tcp.ok_or_else(|| {
                    WorkerError::Collective("collective link tcp: this worker has no TCP listener (see its log)".into())
                })?;
                let secret = assign.group_secret.as_bytes();
                let timeout = self.opts.collective_timeout;
                let link = TcpLink::connect(listener, self.me, secret, index, peers, timeout)?;
                let abort = LinkAbort::default().with_tcp(link.abort_handle()?);
                Ok((Box::new(RingComm { link, rank: index, world }), abort))
            }
        }
    }

    /// A QUIC ring over `peers`, this rank being `peers[index]`.
    fn quic_ring(&self, index: usize, peers: &[lockstep_proto::wire::PeerInfo]) -> Result<QuicLink> {
        let timeout = self.opts.collective_timeout;
        self.rt
            .block_on(QuicLink::connect(self.data_ep, self.allowed, self.me, index, peers, timeout))
            .map_err(WorkerError::Comm)
    }

    /// This rank's place in the shared-memory group `ranks` (global ranks, in order).
    fn shm_group(&self, assign: &Assign, group: &str, rank: usize, ranks: Vec<usize>) -> Result<ShmComm> {
        let member = ranks.iter().position(|&r| r == rank).ok_or_else(|| {
            WorkerError::Collective(format!("rank {rank} is not in shared-memory group {group} {ranks:?}"))
        })?;
        let sub_len = lockstep_collective::shm::sub_len_for(ranks.len());
        let spec = ShmGroupSpec {
            secret: assign.group_secret.as_bytes().to_vec(),
            group: group.to_string(),
            member,
            ranks,
            timeout: self.opts.collective_timeout,
            sub_len,
        };
        Ok(ShmComm::connect(&spec)?)
    }

    /// Shared memory inside this host, one QUIC ring per local index between hosts.
    fn hierarchical(&self, assign: &Assign, topology: &Topology) -> Result<HierComm> {
        let rank = assign.rank;
        let locate =
            |r: usize| topology.locate(r).ok_or_else(|| WorkerError::Collective(format!("rank {r} is on no host")));
        let (host, local_index) = locate(rank)?;
        let local = self.shm_group(assign, &format!("host{host}"), rank, topology.hosts[host].clone())?;
        let ring_peers: Vec<_> = topology.hosts.iter().map(|h| assign.peers[h[local_index]].clone()).collect();
        let (inter, abort) = self.network_ring(topology.link, assign, host, &ring_peers)?;
        self.set_active(abort.with_shm(local.abort_handle()));
        let locations = (0..assign.world).map(locate).collect::<Result<Vec<_>>>()?;
        Ok(HierComm::new(local, Some(inter), locations, rank))
    }

    /// A pipeline rank's links (T42), set up together on the data endpoint: the ring of its
    /// stage's data-parallel replicas (None with one replica) and the ring of its replica's
    /// stages. Rank r is stage r mod P of replica r div P.
    fn build_pipeline_links(
        &self,
        assign: &Assign,
        spec: &JobSpec,
    ) -> Result<(Option<Box<dyn Communicator>>, PipelineStage)> {
        let place = PipelinePlace::of(assign, spec)?;
        let (quic_pipe, quic_ring) = self.quic_pipeline_links(assign, &place)?;
        let timeout = self.opts.collective_timeout;
        let mut abort = LinkAbort::default();
        let pipe: Box<dyn lockstep_collective::pipe::PipeLink> = match quic_pipe {
            Some(pipe) => {
                abort = abort.with_connections(pipe.connections().to_vec());
                Box::new(pipe)
            }
            None => {
                let secret = assign.group_secret.as_bytes();
                let pipe = ShmPipe::connect(secret, assign.rank, place.at.pipe_next(), place.at.pipe_prev(), timeout)?;
                abort = abort.with_shm_pipe(pipe.abort_handle());
                Box::new(pipe)
            }
        };
        let comm: Option<Box<dyn Communicator>> = match quic_ring {
            Some(link) => {
                abort = abort.with_connections(link.connections().to_vec());
                Some(Box::new(RingComm { link, rank: place.at.replica(), world: place.at.replicas() }))
            }
            None if place.ring_on_shm => {
                let group = format!("stage{}", place.at.stage());
                let local = self.shm_group(assign, &group, assign.rank, place.at.stage_ranks())?;
                abort = abort.with_shm(local.abort_handle());
                Some(Box::new(local))
            }
            None => None,
        };
        self.set_active(abort);
        self.set_topology(assign.rank, place.describe());
        let (stage, replica, stages, replicas) =
            (place.at.stage(), place.at.replica(), place.at.stages, place.at.replicas());
        let (pipe_on_shm, ring_on_shm) = (place.pipe_on_shm, place.ring_on_shm);
        tracing::info!(stage, replica, stages, replicas, pipe_on_shm, ring_on_shm, "pipeline links up");
        let stage = PipelineStage {
            stage,
            stages,
            // Accumulation (T41) on a pipeline is more micro-batches per optimizer step: their
            // gradients already add up in place and are reduced once at the end.
            micro_batches: spec.parallel.micro_batches * spec.train.accumulate,
            schedule: spec.parallel.schedule,
            link: pipe,
            report: PipeReport::default(),
        };
        Ok((comm, stage))
    }

    /// The pipeline links that go over QUIC (set up together on the data endpoint): the
    /// stage link unless it is on shared memory, the stage ring if it has one off it.
    fn quic_pipeline_links(
        &self,
        assign: &Assign,
        place: &PipelinePlace,
    ) -> Result<(Option<QuicPipe>, Option<QuicLink>)> {
        let ring_via_quic = place.at.replicas() > 1 && !place.ring_on_shm;
        let mut plan = MeshPlan { dial: Vec::new(), expect: Vec::new() };
        if !place.pipe_on_shm {
            plan.dial.push((place.at.pipe_next(), Channel::Pipe));
            plan.expect.push((place.at.pipe_prev(), Channel::Pipe));
        }
        if ring_via_quic {
            plan.dial.push((place.at.ring_next(), Channel::Ring));
            plan.expect.push((place.at.ring_prev(), Channel::Ring));
        }
        if plan.dial.is_empty() {
            return Ok((None, None));
        }
        let timeout = self.opts.collective_timeout;
        let setup = async {
            let (mut dialed, mut accepted, dial_ep) =
                connect_mesh(self.data_ep, self.allowed, self.me, assign.rank, &assign.peers, &plan, timeout).await?;
            let mut pop = || match (dialed.pop(), accepted.pop()) {
                (Some(next), Some(prev)) => Ok((next, prev)),
                _ => Err(lockstep_collective::CollectiveError::Link("pipeline setup returned no links".into())),
            };
            // In reverse order of the plan: the ring, then the stage link.
            let ring = if ring_via_quic { Some(pop()?) } else { None };
            let pipe = if place.pipe_on_shm { None } else { Some(pop()?) };
            let ring = ring.map(|(next, prev)| QuicLink::from_mesh(next, prev, dial_ep.clone(), timeout));
            let pipe = pipe.map(|(next, prev)| QuicPipe::from_mesh(next, prev, dial_ep, timeout));
            Ok::<_, lockstep_collective::CollectiveError>((pipe, ring))
        };
        Ok(self.rt.block_on(setup)?)
    }

    fn run_task(&self, session: &Session, assign: &Assign) -> Result<()> {
        let checked_spec = check_task(assign)?;
        let opts = self.opts;
        let (rank, world) = (assign.rank, assign.world);
        match &assign.task {
            Task::Train { threads, bucket_bytes, weights_path, checkpoint_dir, resume_path, trace, .. } => {
                let spec = checked_spec
                    .ok_or_else(|| WorkerError::Internal("check_task passed a training task without a job".into()))?;
                let threads = if *threads > 0 { *threads } else { opts.threads };
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .map_err(|e| WorkerError::Config(format!("thread pool: {e}")))?;
                let (comm, stage) = if spec.parallel.pipeline_stages > 1 {
                    let (comm, stage) = self.build_pipeline_links(assign, &spec)?;
                    (comm, Some(stage))
                } else {
                    (self.build_comm(assign, spec.collective.transport, spec.collective.inter_host)?, None)
                };
                let job = TrainJob {
                    spec: &spec,
                    rank,
                    world,
                    bucket_bytes: *bucket_bytes as usize,
                    weights_path: weights_path.as_deref(),
                    checkpoint_dir: checkpoint_dir.as_deref(),
                    resume_path: resume_path.as_deref(),
                };
                crate::log_tap::start_capture();
                if *trace {
                    crate::trace::start();
                }
                let summary = pool.install(|| match spec.device() {
                    Device::Cpu => train_on(CpuBackend::new(pool.current_num_threads()), job, comm, stage, session),
                    #[cfg(feature = "cuda")]
                    Device::Cuda(i) => {
                        let be = lockstep_kernels::cuda::CudaBackend::new(i).map_err(WorkerError::Device)?;
                        crate::device_task(|| train_on(be, job, comm, stage, session))
                    }
                    #[cfg(not(feature = "cuda"))]
                    Device::Cuda(_) => Err(WorkerError::Device("this build has no CUDA support".into())),
                });
                let spans = crate::trace::finish();
                let mut summary = summary.inspect_err(|_| forward_logs(session, rank))?;
                summary.collective = self.topology.lock().map(|t| t.clone()).unwrap_or_default();
                // Chunks of 20k spans (about 0.7 MB) stay far below the frame limit.
                for chunk in spans.chunks(20_000) {
                    let _ = session.outbox.send(ToCoordinator::Trace { rank, spans: chunk.to_vec() });
                }
                forward_logs(session, rank);
                crate::log_tap::stop_capture();
                session
                    .outbox
                    .send(ToCoordinator::Done { rank, summary })
                    .map_err(|_| WorkerError::Stopped("coordinator connection closed".into()))?;
                Ok(())
            }
            Task::BenchAllReduce { sizes, iters, transport } => {
                let mut comm = self.build_comm(assign, *transport, InterHost::Quic)?;
                let results = sizes
                    .iter()
                    .map(|&bytes| time_all_reduce(&mut comm, bytes, (*iters).max(1)))
                    .collect::<Result<Vec<_>>>()?;
                session
                    .outbox
                    .send(ToCoordinator::BenchResult { rank, results })
                    .map_err(|_| WorkerError::Stopped("coordinator connection closed".into()))?;
                Ok(())
            }
        }
    }
}

/// The median of `iters` all-reduces of `bytes`, each after a barrier. Untimed warm-up
/// calls come first, as in nccl-tests (-w 5): page faults on first touch and the start-up
/// of the other processes stay out.
fn time_all_reduce(comm: &mut Option<Box<dyn Communicator>>, bytes: u64, iters: usize) -> Result<AllReduceTiming> {
    const WARMUP: usize = 5;
    let mut buf = vec![1.0f32; (bytes / 4) as usize];
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + WARMUP {
        if let Some(c) = comm.as_mut() {
            c.barrier()?;
        }
        let t = Instant::now();
        if let Some(c) = comm.as_mut() {
            c.all_reduce_sum(&mut buf)?;
        }
        if i >= WARMUP {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(AllReduceTiming { bytes, median_s: times[times.len() / 2] })
}

/// Where a pipeline rank sits (its `Topology`) and which of its links can use shared memory.
struct PipelinePlace {
    at: RankTopology,
    pipe_on_shm: bool,
    ring_on_shm: bool,
}

impl PipelinePlace {
    fn of(assign: &Assign, spec: &JobSpec) -> Result<Self> {
        let at =
            RankTopology::new(assign.rank, assign.world, spec.parallel.pipeline_stages).map_err(WorkerError::Config)?;
        // Shared memory where every rank of the link's ring is on this host (the same
        // answer on each of them), QUIC otherwise.
        let transport = spec.collective.transport;
        let on_this_host = |ranks: &[usize]| {
            let here = &assign.peers[at.rank].host_id;
            !matches!(transport, Transport::Quic | Transport::Tcp)
                && ranks.iter().all(|&r| assign.peers[r].host_id == *here)
        };
        let pipe_on_shm = on_this_host(&at.replica_ranks());
        let ring_on_shm = at.replicas() > 1 && on_this_host(&at.stage_ranks());
        if transport == Transport::Shm && !(pipe_on_shm && (at.replicas() == 1 || ring_on_shm)) {
            return Err(WorkerError::Config(
                "collective.transport = \"shm\" needs every rank of a pipeline on one host".into(),
            ));
        }
        Ok(Self { at, pipe_on_shm, ring_on_shm })
    }

    fn describe(&self) -> String {
        let kind = |shm: bool| if shm { "shm" } else { "quic" };
        format!(
            "pipeline: {} stages x {} replicas, stage links {}, stage rings {}",
            self.at.stages,
            self.at.replicas(),
            kind(self.pipe_on_shm),
            if self.at.replicas() > 1 { kind(self.ring_on_shm) } else { "none" }
        )
    }
}

/// The largest message `BenchAllReduce` may ask for (the worker allocates it).
const MAX_BENCH_BYTES: u64 = 1 << 30;

/// An `Assign` is from the authenticated coordinator, but a bug there must not become a
/// panic here: the rank is in the world, and the peer list is that world, in rank order.
fn check_assign(assign: &Assign) -> Result<()> {
    let (rank, world, peers) = (assign.rank, assign.world, assign.peers.len());
    let in_order = assign.peers.iter().enumerate().all(|(i, p)| p.rank == i);
    if world == 0 || rank >= world || peers != world || !in_order {
        return Err(WorkerError::Config(format!(
            "bad assignment: rank {rank} of world {world} with {peers} peers{}",
            if in_order { "" } else { " (not in rank order)" }
        )));
    }
    Ok(())
}

/// Everything about an `Assign` that can be checked before a connection is made or memory
/// is taken: the rank and peer list, the job (returned, parsed), its pipeline placement,
/// the benchmark sizes. The fuzz target `assign` runs it on arbitrary frames.
pub fn check_task(assign: &Assign) -> Result<Option<JobSpec>> {
    check_assign(assign)?;
    match &assign.task {
        Task::Train { job_toml, .. } => {
            let spec = JobSpec::parse(job_toml, std::path::Path::new("<assigned job>"), &[])?;
            if spec.parallel.pipeline_stages > 1 {
                PipelinePlace::of(assign, &spec)?;
            }
            Ok(Some(spec))
        }
        Task::BenchAllReduce { sizes, .. } => match sizes.iter().find(|&&b| b > MAX_BENCH_BYTES) {
            Some(bytes) => Err(WorkerError::Config(format!(
                "bench all-reduce of {bytes} bytes: at most {MAX_BENCH_BYTES} a message"
            ))),
            None => Ok(None),
        },
    }
}

/// What one training task needs besides the backend.
#[derive(Clone, Copy)]
struct TrainJob<'a> {
    spec: &'a JobSpec,
    rank: usize,
    world: usize,
    bucket_bytes: usize,
    weights_path: Option<&'a str>,
    checkpoint_dir: Option<&'a str>,
    resume_path: Option<&'a str>,
}

/// Trains on backend `be`, reporting to the coordinator through `session`.
fn train_on<B: Backend>(
    be: B,
    job: TrainJob<'_>,
    comm: Option<Box<dyn Communicator>>,
    stage: Option<PipelineStage>,
    session: &Session,
) -> Result<lockstep_proto::Summary> {
    let TrainJob { spec, rank, world, bucket_bytes, weights_path, checkpoint_dir, resume_path } = job;
    let make_reducer: crate::ReducerFactory<'_, B> = Box::new(move |sizes| {
        Ok(match comm {
            Some(comm) => {
                Box::new(BucketReducer::new(comm, sizes, bucket_bytes, wire_format(spec), spec.parallel.zero))
                    as Box<dyn GradReducer<B>>
            }
            None => Box::new(NoReduce),
        })
    });
    let outbox = session.outbox.clone();
    let mut window = ProgressWindow::new();
    let mut on_event = |event: RunEvent| -> Result<()> {
        let send = |m| outbox.send(m).map_err(|_| WorkerError::Stopped("coordinator connection closed".into()));
        match event {
            RunEvent::Start { init_weight_hash, total_steps, .. } => {
                send(ToCoordinator::Ready { rank, init_weight_hash, total_steps })?;
                wait_for_start(session)?;
            }
            RunEvent::Step { step, examples, step_s, comm_wait_s, report, .. } => {
                if let Some(r) = report {
                    let StepReport { record, weight_hash, grad_histograms } = r;
                    send(ToCoordinator::Step { rank, record, weight_hash, grad_histograms })?;
                }
                if let Some((examples_per_s, comm_share)) = window.add(examples, step_s, comm_wait_s) {
                    send(ToCoordinator::Progress { rank, step, examples_per_s, comm_share })?;
                    forward_logs(session, rank);
                }
                check_abort(session)?;
            }
            RunEvent::Eval(record) => {
                if rank == 0 {
                    send(ToCoordinator::Eval { rank, record })?;
                }
            }
        }
        Ok(())
    };
    let opts = RunOptions {
        rank,
        world,
        checkpoint_dir: checkpoint_dir.map(Into::into),
        resume: resume_path.map(Into::into),
        stop_after: None,
    };
    let (summary, trainer) = run_training_stage(be, spec, opts, stage, make_reducer, &mut on_event)?;
    match (&trainer.pipeline, weights_path) {
        // Each stage's first replica writes its stage's weights; the launcher merges them.
        (Some(p), Some(path)) if rank < p.stages() => {
            save_model(&trainer, std::path::Path::new(&format!("{path}.stage-{}", p.index())))?;
        }
        (None, Some(path)) if rank == 0 => save_model(&trainer, std::path::Path::new(path))?,
        _ => {}
    }
    Ok(summary)
}

/// Rates for the status table, reported at most every `PROGRESS_EVERY`.
struct ProgressWindow {
    started: Instant,
    examples: usize,
    busy_s: f64,
    comm_wait_s: f64,
}

const PROGRESS_EVERY: Duration = Duration::from_millis(500);

impl ProgressWindow {
    fn new() -> Self {
        Self { started: Instant::now(), examples: 0, busy_s: 0.0, comm_wait_s: 0.0 }
    }

    /// Adds a step; once a window is full, returns (examples/s, share of step time spent
    /// waiting on communication) and starts the next.
    fn add(&mut self, examples: usize, step_s: f64, comm_wait_s: f64) -> Option<(f64, f64)> {
        self.examples += examples;
        self.busy_s += step_s;
        self.comm_wait_s += comm_wait_s;
        let elapsed = self.started.elapsed();
        if elapsed < PROGRESS_EVERY {
            return None;
        }
        let rates = (self.examples as f64 / elapsed.as_secs_f64(), self.comm_wait_s / self.busy_s.max(1e-9));
        *self = Self::new();
        Some(rates)
    }
}

/// Sends the log lines captured since the last call (RUN_DIR/logs/rank-R.log).
fn forward_logs(session: &Session, rank: usize) {
    let text = crate::log_tap::drain();
    if !text.is_empty() {
        let _ = session.outbox.send(ToCoordinator::Log { rank, text });
    }
}

fn wait_for_start(session: &Session) -> Result<()> {
    loop {
        match session.recv(None) {
            Ok(ToWorker::Start) => return Ok(()),
            Ok(ToWorker::Abort { reason }) => {
                return Err(WorkerError::Stopped(format!("aborted by the coordinator: {reason}")))
            }
            Ok(ToWorker::Shutdown) | Err(_) => {
                return Err(WorkerError::Stopped("coordinator ended the run before it started".into()))
            }
            Ok(_) => {}
        }
    }
}

fn check_abort(session: &Session) -> Result<()> {
    match session.try_recv() {
        Ok(ToWorker::Abort { reason }) => Err(WorkerError::Stopped(format!("aborted by the coordinator: {reason}"))),
        Ok(ToWorker::Shutdown) | Err(std_mpsc::TryRecvError::Disconnected) => {
            Err(WorkerError::Stopped("coordinator ended the run".into()))
        }
        _ => Ok(()),
    }
}

/// The all-reduce wire format a job asks for (T25).
fn wire_format(spec: &JobSpec) -> WireFormat {
    match spec.precision.allreduce {
        Dtype::Fp32 => WireFormat::F32,
        Dtype::Bf16 => WireFormat::Bf16,
        Dtype::Fp16 => WireFormat::F16,
    }
}
