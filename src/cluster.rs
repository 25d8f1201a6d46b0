//! `lockstep local`, `lockstep coordinator`, `lockstep worker` and `bench allreduce`:
//! wiring of the coordinator and worker crates to processes.

use anyhow::{bail, Context, Result};
use lockstep_collective::tls::Identity;
use lockstep_coordinator::{generate_token, Coordinator, ElasticRun, RunWriter, WorkerConn};
use lockstep_proto::JobSpec;
use lockstep_worker::pipeline_launch::{self, resolve_resume};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

pub const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(120);

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting tokio")
}

/// Makes `data.dir` absolute so worker processes find it whatever their working directory.
pub fn absolutize_data_dir(spec: &mut JobSpec) {
    if spec.data.dir.is_relative() {
        if let Ok(abs) = std::fs::canonicalize(&spec.data.dir) {
            spec.data.dir = abs;
        }
    }
}

pub fn write_token(dir: &Path, token: &str) -> Result<PathBuf> {
    let path = dir.join("token");
    write_file_atomic(&path, token, 0o600)?;
    Ok(path)
}

/// Writes `text` to a temporary file created with `mode`, then renames it to `path`: a
/// reader polling for the file (a launched worker) never sees it half written, and a
/// secret is never readable by others, not even for a moment.
pub fn write_file_atomic(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", path.display()))
}

/// The address a worker joins: `--join`/LOCKSTEP_JOIN, else the contents of `--join-file`
/// (waited for: the coordinator may not have written it yet), else MASTER_ADDR and
/// MASTER_PORT (a launcher's variables) with the coordinator's certificate fingerprint from
/// LOCKSTEP_FINGERPRINT: the fingerprint is what lets the worker trust the coordinator.
pub fn worker_join_address(join: Option<String>, join_file: Option<&Path>) -> Result<String> {
    if let Some(join) = join {
        return Ok(join);
    }
    if let Some(path) = join_file {
        let deadline = std::time::Instant::now() + JOIN_FILE_WAIT;
        loop {
            match std::fs::read_to_string(path) {
                Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading join file {}", path.display())),
            }
            if std::time::Instant::now() > deadline {
                bail!("join file {} did not appear within {JOIN_FILE_WAIT:?}", path.display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (var("MASTER_ADDR"), var("MASTER_PORT")) {
        (Some(addr), Some(port)) => {
            let port: u16 = port.parse().with_context(|| format!("MASTER_PORT={port:?} is not a port number"))?;
            let fingerprint = var("LOCKSTEP_FINGERPRINT").with_context(|| {
                format!(
                    "MASTER_ADDR={addr} and MASTER_PORT={port} are set, but LOCKSTEP_FINGERPRINT is not: a worker \
                     only joins a coordinator whose certificate it can pin (the part after '#' of its join address)"
                )
            })?;
            let host = if addr.contains(':') && !addr.starts_with('[') { format!("[{addr}]") } else { addr };
            Ok(format!("lockstep://{host}:{port}#{fingerprint}"))
        }
        _ => bail!(
            "no coordinator given: pass --join, --join-file, or set MASTER_ADDR, MASTER_PORT and LOCKSTEP_FINGERPRINT"
        ),
    }
}

const JOIN_FILE_WAIT: Duration = Duration::from_secs(600);

/// `lockstep status`: asks the coordinator for its status table.
pub fn print_status(
    coordinator: Option<String>,
    run_dir: Option<&Path>,
    token_file: Option<&Path>,
    json: bool,
) -> Result<()> {
    let join = match (coordinator, run_dir) {
        (Some(c), _) => c,
        (None, Some(dir)) => {
            let path = dir.join("join");
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading {} (is a coordinator running there?)", path.display()))?
                .trim()
                .to_string()
        }
        (None, None) => bail!("pass --coordinator ADDR or --run-dir DIR"),
    };
    let token_file = token_file.map(Path::to_path_buf).or_else(|| {
        let candidate = run_dir?.join("token");
        (std::env::var_os("LOCKSTEP_TOKEN").is_none() && candidate.exists()).then_some(candidate)
    });
    let token = read_token(token_file.as_deref())?;
    let rt = runtime()?;
    let status = rt.block_on(lockstep_coordinator::server::query_status(&join, &token))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", lockstep_coordinator::status::render(&status));
    }
    Ok(())
}

pub fn read_token(path: Option<&Path>) -> Result<String> {
    match path {
        Some(p) => Ok(std::fs::read_to_string(p)
            .with_context(|| format!("reading token file {}", p.display()))?
            .trim()
            .to_string()),
        None => std::env::var("LOCKSTEP_TOKEN").context("no --token-file given and LOCKSTEP_TOKEN is not set"),
    }
}

/// N `lockstep worker --once` child processes joined to `join`, logging to `dir/worker-i.log`.
pub struct LocalWorkers {
    children: Vec<tokio::process::Child>,
    logs: Vec<PathBuf>,
    join: String,
    token_file: PathBuf,
    threads: usize,
    /// The cores each worker is bound to (empty: not bound).
    cores: Vec<Vec<usize>>,
}

/// The cores this process may run on, in order (empty if they cannot be read).
fn allowed_cores() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// Disjoint cores for `n` workers of `threads` threads each, as Open MPI binds its ranks
/// (`--bind-to core`): unbound, the scheduler sometimes leaves two ranks of a shared-memory
/// all-reduce on one core, and 4 MiB at n = 2 then took 0.48 ms instead of 0.25, run to run.
/// None when the workers' threads outnumber the cores (oversubscribed: the scheduler must
/// be free to move them).
fn core_plan(n: usize, threads: usize, allowed: &[usize]) -> Vec<Vec<usize>> {
    if n < 2 || threads == 0 || n * threads > allowed.len() {
        return Vec::new();
    }
    allowed.chunks(threads).take(n).map(|c| c.to_vec()).collect()
}

impl LocalWorkers {
    pub fn spawn(n: usize, join: &str, token_file: &Path, threads: usize, dir: &Path) -> Result<Self> {
        let logs: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("worker-{i}.log"))).collect();
        let cores = core_plan(n, threads, &allowed_cores());
        if !cores.is_empty() {
            tracing::info!("workers bound to cores {cores:?}");
        }
        let mut workers = Self {
            children: Vec::new(),
            logs,
            join: join.to_string(),
            token_file: token_file.to_path_buf(),
            threads,
            cores,
        };
        for i in 0..n {
            let child = workers.start(i, false)?;
            workers.children.push(child);
        }
        Ok(workers)
    }

    /// Starts worker `i` (appending to its log when it replaces a dead one).
    fn start(&self, i: usize, replacement: bool) -> Result<tokio::process::Child> {
        let exe = std::env::current_exe().context("locating the lockstep binary")?;
        let log_path = &self.logs[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(replacement)
            .write(true)
            .truncate(!replacement)
            .open(log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = tokio::process::Command::new(&exe);
        if let Some(cores) = self.cores.get(i) {
            // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays inside it.
            let set = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                cores.iter().for_each(|&c| libc::CPU_SET(c, &mut set));
                set
            };
            // SAFETY: between fork and exec the child only makes one async-signal-safe
            // system call; the binding is inherited through exec by every thread it starts.
            unsafe {
                command.pre_exec(move || {
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                    Ok(())
                });
            }
        }
        let child = command
            .args(["worker", "--once", "--join", &self.join, "--threads", &self.threads.to_string(), "--token-file"])
            .arg(&self.token_file)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .env("LOCKSTEP_CONGESTION", lockstep_collective::tls::congestion().to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            // Their own process group: a Ctrl-C at the terminal reaches `local`, which
            // stops the run in step (every worker after the same step, a checkpoint),
            // instead of every process at once.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting worker {i}"))?;
        if let Some(pid) = child.id() {
            lockstep_proto::preempt::register_child(pid);
            // For operators (and the fault-injection tests): which process is which worker.
            let dir = log_path.parent().unwrap_or(Path::new("."));
            let pid_path = dir.join(format!("worker-{i}.pid"));
            std::fs::write(&pid_path, pid.to_string()).with_context(|| format!("writing {}", pid_path.display()))?;
        }
        Ok(child)
    }

    /// Starts a new worker in the place of each one that has exited; how many.
    pub fn replace_dead(&mut self) -> Result<usize> {
        let mut replaced = 0;
        for i in 0..self.children.len() {
            let pid = self.children[i].id();
            if let Ok(Some(status)) = self.children[i].try_wait() {
                if let Some(pid) = pid {
                    lockstep_proto::preempt::forget_child(pid);
                }
                tracing::warn!("worker {i} exited ({status}); starting a replacement");
                self.children[i] = self.start(i, true)?;
                replaced += 1;
            }
        }
        Ok(replaced)
    }

    /// Resolves when any child exits, with its index and status.
    pub async fn first_exit(&mut self) -> (usize, std::io::Result<std::process::ExitStatus>) {
        let waits = self.children.iter_mut().enumerate().map(|(i, c)| Box::pin(async move { (i, c.wait().await) }));
        futures_select_all(waits).await
    }

    fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.logs[i]).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// Waits for every child; an unsuccessful exit is an error naming the worker and its
    /// log, unless `lost_ok` (the run recovered from losing workers).
    pub async fn wait_all(&mut self, timeout: Duration, lost_ok: bool) -> Result<()> {
        for (i, child) in self.children.iter_mut().enumerate() {
            match tokio::time::timeout(timeout, child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) if lost_ok => tracing::warn!("worker {i} exited with {status} (lost during the run)"),
                Ok(Ok(status)) => bail!("worker {i} exited with {status}; log {}", self.logs[i].display()),
                Ok(Err(e)) => bail!("worker {i}: {e}"),
                Err(_) => {
                    let _ = child.kill().await;
                    if !lost_ok {
                        bail!("worker {i} did not exit within {timeout:?}; killed");
                    }
                    tracing::warn!("worker {i} did not exit within {timeout:?} (lost during the run); killed");
                }
            }
        }
        Ok(())
    }

    pub async fn kill_all(&mut self) {
        for c in &mut self.children {
            let _ = c.kill().await;
        }
    }
}

/// `select_all` over boxed futures without pulling in the futures crate.
async fn futures_select_all<F: std::future::Future + Unpin>(futures: impl Iterator<Item = F>) -> F::Output {
    let mut futures: Vec<F> = futures.collect();
    std::future::poll_fn(move |cx| {
        for f in futures.iter_mut() {
            if let std::task::Poll::Ready(v) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(v);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Rendezvous while watching local children: a worker that dies first is reported at once.
async fn rendezvous_local(coord: &mut Coordinator, n: usize, workers: &mut LocalWorkers) -> Result<Vec<WorkerConn>> {
    tokio::select! {
        joined = coord.rendezvous(n, RENDEZVOUS_TIMEOUT) => Ok(joined?),
        (i, status) = workers.first_exit() => {
            bail!("worker {i} exited ({status:?}) before the group formed:\n{}", workers.log_tail(i))
        }
    }
}

pub struct LocalRun<'a> {
    pub spec: JobSpec,
    /// A checkpoint to continue from (any world size).
    pub resume: Option<PathBuf>,
    pub workers: usize,
    pub dir: &'a Path,
    pub threads_per_worker: usize,
    pub bucket_bytes: u64,
    pub progress: bool,
    /// Write a Chrome trace of every rank here.
    pub trace: Option<PathBuf>,
    /// Also write the join address here (RUN_DIR/join is always written).
    pub join_file: Option<PathBuf>,
}

/// Writes the join address to RUN_DIR/join (for `lockstep status --run-dir`) and to
/// `extra`, if given (for launchers).
fn publish_join_address(dir: &Path, join: &str, extra: Option<&Path>) -> Result<()> {
    write_file_atomic(&dir.join("join"), join, 0o644)?;
    if let Some(path) = extra {
        write_file_atomic(path, join, 0o644)?;
    }
    Ok(())
}

/// Recovery for a run this process launched: checkpoints in its run directory, and
/// replacements for its own dead worker processes (`local`; none for daemons).
struct LauncherRecovery<'a> {
    dir: &'a Path,
    workers: Option<&'a mut LocalWorkers>,
}

impl lockstep_coordinator::Recovery for LauncherRecovery<'_> {
    fn resolve(&self, requested: &Path) -> std::result::Result<PathBuf, lockstep_coordinator::elastic::LauncherError> {
        Ok(resolve_resume(requested)?)
    }
    fn newest_checkpoint(&self) -> Option<PathBuf> {
        resolve_resume(self.dir).ok()
    }
    fn replace_dead(&mut self) -> std::result::Result<usize, lockstep_coordinator::elastic::LauncherError> {
        match self.workers.as_deref_mut() {
            Some(workers) => Ok(workers.replace_dead()?),
            None => Ok(0),
        }
    }
}

/// The elastic settings of `run`.
fn elastic_run<'a>(run: &'a LocalRun<'_>) -> ElasticRun<'a> {
    ElasticRun {
        threads: run.threads_per_worker,
        bucket_bytes: run.bucket_bytes,
        trace: run.trace.as_deref(),
        resume: run.resume.as_deref(),
        workers: run.workers,
        rendezvous_timeout: RENDEZVOUS_TIMEOUT,
    }
}

/// A pipeline job's placement, on stdout for the user and in coordinator.log (at debug
/// level) for the record, before any worker starts.
fn print_placement(spec: &JobSpec, workers: usize) -> Result<()> {
    if let Some(text) = pipeline_launch::describe_placement(spec, workers)? {
        print!("{text}");
        tracing::debug!("{text}");
    }
    Ok(())
}

/// `lockstep local`: a coordinator here and N worker processes over loopback QUIC.
pub fn run_local(run: LocalRun<'_>) -> Result<()> {
    let rt = runtime()?;
    let mut spec = run.spec.clone();
    absolutize_data_dir(&mut spec);
    print_placement(&spec, run.workers)?;
    let mut writer = RunWriter::open(run.dir, &spec, run.progress, run.resume.is_some())?;
    let token = generate_token()?;
    let token_file = write_token(run.dir, &token)?;
    let summary = rt.block_on(async {
        let mut coord = Coordinator::bind("127.0.0.1:0".parse()?, None, token)?;
        tracing::info!(join = %coord.join_address, "coordinator listening");
        publish_join_address(run.dir, &coord.join_address, run.join_file.as_deref())?;
        let mut workers =
            LocalWorkers::spawn(run.workers, &coord.join_address, &token_file, run.threads_per_worker, run.dir)?;
        let result = async {
            let joined = rendezvous_local(&mut coord, run.workers, &mut workers).await?;
            let mut recovery = LauncherRecovery { dir: run.dir, workers: Some(&mut workers) };
            let (summary, restarts) =
                coord.train_elastic(joined, &spec, &elastic_run(&run), &mut writer, &mut recovery).await?;
            workers.wait_all(Duration::from_secs(30), restarts > 0).await?;
            Ok::<_, anyhow::Error>(summary)
        }
        .await;
        if result.is_err() {
            workers.kill_all().await;
        }
        result.with_context(|| format!("worker logs are in {}", run.dir.display()))
    })?;
    pipeline_launch::merge_stage_models(run.dir, spec.parallel.pipeline_stages)?;
    writer.finish(&summary)?;
    Ok(())
}

pub struct CoordinatorRun<'a> {
    pub spec: JobSpec,
    pub resume: Option<PathBuf>,
    pub listen: SocketAddr,
    pub advertise: Option<String>,
    pub workers: usize,
    pub token_file: Option<&'a Path>,
    pub dir: &'a Path,
    pub threads_per_worker: usize,
    pub bucket_bytes: u64,
    pub progress: bool,
    pub trace: Option<PathBuf>,
    pub join_file: Option<PathBuf>,
}

/// `lockstep coordinator`: waits for N workers to join, runs the job, shuts them down.
pub fn run_coordinator(run: CoordinatorRun<'_>) -> Result<()> {
    let rt = runtime()?;
    print_placement(&run.spec, run.workers)?;
    let mut writer = RunWriter::open(run.dir, &run.spec, run.progress, run.resume.is_some())?;
    let token = match run.token_file {
        Some(p) => read_token(Some(p))?,
        // A launcher hands the token over in the environment (never on a command line).
        None if std::env::var_os("LOCKSTEP_TOKEN").is_some() => read_token(None)?,
        None => {
            let t = generate_token()?;
            let path = write_token(run.dir, &t)?;
            eprintln!("cluster token written to {}", path.display());
            t
        }
    };
    let summary = rt.block_on(async {
        // The identity lives in the run directory: a coordinator restarted with --resume
        // keeps the fingerprint its workers pinned, and they re-join it.
        let identity_path = run.dir.join("coordinator.identity");
        let identity = if identity_path.exists() {
            Identity::load(&identity_path)?
        } else {
            let id = Identity::generate()?;
            id.save(&identity_path)?;
            id
        };
        let mut coord = Coordinator::bind_with(run.listen, run.advertise.clone(), token, identity)?;
        publish_join_address(run.dir, &coord.join_address, run.join_file.as_deref())?;
        {
            use std::io::Write;
            let mut out = std::io::stdout();
            let _ = writeln!(out, "join address: {}", coord.join_address).and_then(|_| out.flush());
        }
        eprintln!(
            "waiting for {} workers: lockstep worker --join '{}' --token-file <token>",
            run.workers, coord.join_address
        );
        let joined = coord.rendezvous(run.workers, Duration::from_secs(24 * 3600)).await?;
        let local = LocalRun {
            spec: run.spec.clone(),
            resume: run.resume.clone(),
            workers: run.workers,
            dir: run.dir,
            threads_per_worker: run.threads_per_worker,
            bucket_bytes: run.bucket_bytes,
            progress: run.progress,
            trace: run.trace.clone(),
            join_file: None,
        };
        let mut recovery = LauncherRecovery { dir: run.dir, workers: None };
        let (summary, _) =
            coord.train_elastic(joined, &run.spec, &elastic_run(&local), &mut writer, &mut recovery).await?;
        Ok::<_, anyhow::Error>(summary)
    })?;
    let stages = run.spec.parallel.pipeline_stages;
    if (0..stages).all(|s| pipeline_launch::stage_model_path(run.dir, s).exists()) {
        pipeline_launch::merge_stage_models(run.dir, stages)?;
    } else if stages > 1 {
        tracing::warn!("the stage weight files are on the workers' machines (no shared run directory): not merged");
    }
    writer.finish(&summary)?;
    Ok(())
}

/// `lockstep bench allreduce`: all-reduce busbw across N local processes, next to one
/// core's memcpy and a plain TCP stream between two local processes, measured in the same
/// run.
pub fn bench_allreduce(
    workers: usize,
    transport: lockstep_proto::toolbox::Transport,
    sizes: Vec<u64>,
    iters: usize,
    threads: usize,
) -> Result<()> {
    let rt = runtime()?;
    let dir = std::env::temp_dir().join(format!("lockstep-bench-{}", std::process::id()));
    let token = generate_token()?;
    let token_file = write_token(&dir, &token)?;
    let timings = rt.block_on(async {
        let mut coord = Coordinator::bind("127.0.0.1:0".parse()?, None, token)?;
        let mut children = LocalWorkers::spawn(workers, &coord.join_address, &token_file, threads, &dir)?;
        let joined = rendezvous_local(&mut coord, workers, &mut children).await?;
        let timings = coord.run_bench(joined, sizes.clone(), iters, transport).await?;
        children.wait_all(Duration::from_secs(30), false).await?;
        Ok::<_, anyhow::Error>(timings)
    })?;
    let tcp = rt.block_on(tcp_stream_throughput(64 << 20, 8))?;
    let memcpy = crate::bench::memcpy_bandwidth(64 << 20, 10);
    println!(
        "bench allreduce: transport {transport} ({} on one host), {workers} processes, slowest rank's median of {iters}",
        match transport {
            _ if workers == 1 => "no links",
            lockstep_proto::toolbox::Transport::Quic => "quic ring",
            lockstep_proto::toolbox::Transport::Tcp => "tls-over-tcp ring",
            _ => "shared memory",
        }
    );
    println!("  memcpy, one core, 64 MiB: {:.2} GB/s", memcpy / 1e9);
    println!("  plain TCP stream between two local processes: {:.2} GB/s", tcp / 1e9);
    println!(
        "  {:>10} {:>10} {:>11} {:>11} {:>12} {:>10}",
        "bytes", "median ms", "algbw GB/s", "busbw GB/s", "busbw/memcpy", "busbw/tcp"
    );
    for t in &timings {
        let algbw = t.bytes as f64 / t.median_s;
        let busbw = algbw * 2.0 * (workers as f64 - 1.0) / workers as f64;
        println!(
            "  {:>10} {:>10.3} {:>11.3} {:>11.3} {:>12.3} {:>10.3}",
            t.bytes,
            t.median_s * 1e3,
            algbw / 1e9,
            busbw / 1e9,
            busbw / memcpy,
            busbw / tcp
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Bytes/s of one TCP stream to a child process (`lockstep bench tcp-sink`) that reads
/// everything and acknowledges with one byte.
async fn tcp_stream_throughput(bytes: usize, reps: usize) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args(["bench", "tcp-sink", "--connect", &addr.to_string(), "--bytes", &(bytes * reps).to_string()])
        .kill_on_drop(true)
        .spawn()?;
    let (mut stream, _) = listener.accept().await?;
    stream.set_nodelay(true)?;
    let buf = vec![7u8; bytes];
    // One untimed round trip warms the connection.
    let start = std::time::Instant::now();
    for _ in 0..reps {
        stream.write_all(&buf).await?;
    }
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack).await?;
    let secs = start.elapsed().as_secs_f64();
    child.wait().await?;
    Ok((bytes * reps) as f64 / secs)
}

/// The child side of `tcp_stream_throughput`.
pub fn tcp_sink(connect: &str, bytes: usize) -> Result<()> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(connect)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = stream.read(&mut buf[..left.min(1 << 20)])?;
        if n == 0 {
            bail!("stream ended with {left} bytes to go");
        }
        left -= n;
    }
    stream.write_all(&[1])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::core_plan;

    #[test]
    fn workers_get_disjoint_cores_only_when_they_fit() {
        assert_eq!(core_plan(2, 1, &[0, 1]), vec![vec![0], vec![1]]);
        assert_eq!(core_plan(2, 2, &[0, 2, 4, 6, 8]), vec![vec![0, 2], vec![4, 6]], "in the allowed set's order");
        assert!(core_plan(4, 1, &[0, 1]).is_empty(), "4 ranks on 2 cores stay free to move");
        assert!(core_plan(1, 2, &[0, 1]).is_empty(), "one worker: nothing to keep apart");
        assert!(core_plan(2, 1, &[]).is_empty(), "unknown cores: unbound");
    }
}
