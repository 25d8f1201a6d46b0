//! The `lockstep` command line. Everything here is argument parsing and wiring; the work
//! lives in the library crates.

mod bench;
mod cluster;
mod image_grid;
mod plot;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lockstep_coordinator::RunWriter;
use lockstep_kernels::CpuBackend;
use lockstep_proto::job::Device;
use lockstep_proto::JobSpec;
use lockstep_worker::daemon::{run_daemon, DaemonOptions};
use lockstep_worker::log_tap;
use lockstep_worker::model_file::save_model;
use lockstep_worker::{run_training, NoReduce, RunEvent, RunOptions};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "lockstep", version, about = "Distributed data-parallel training")]
struct Cli {
    /// Compute threads (default: all cores; `local` divides them among its workers).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// QUIC congestion controller: bbr (the default: as fast as cubic on clean links, and
    /// it keeps its rate on links that lose packets at random) or cubic. `local` passes it
    /// to its workers.
    #[arg(long, global = true, env = "LOCKSTEP_CONGESTION", default_value = "bbr")]
    congestion: lockstep_collective::tls::Congestion,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct JobArgs {
    /// Job file (TOML).
    config: PathBuf,
    /// Run directory (default: runs/<name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override any job field: --set optim.lr=0.01 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// No progress bar (logs only).
    #[arg(long)]
    quiet: bool,
    /// cpu, cuda or cuda:N (overrides the job's `device`).
    #[arg(long)]
    device: Option<String>,
}

impl JobArgs {
    fn load(&self) -> Result<(JobSpec, PathBuf)> {
        let mut overrides = self.overrides.clone();
        if let Some(d) = &self.device {
            overrides.push(format!("device={d}"));
        }
        let spec = JobSpec::load(&self.config, &overrides)?;
        let dir = self.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(&spec.name));
        let _ = RUN_DIR.set(dir.clone());
        Ok((spec, dir))
    }
}

#[derive(clap::Args)]
struct CoordinatorArgs {
    /// Continue a run (its directory or a checkpoint file readable by every worker).
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Address to listen on (UDP), e.g. 0.0.0.0:7070.
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long, value_parser = parse_workers)]
    workers: usize,
    /// Host put in the join address (default: the listen IP).
    #[arg(long)]
    advertise: Option<String>,
    /// Cluster token file (default: the LOCKSTEP_TOKEN variable, else generate one and
    /// write it to RUN_DIR/token).
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[arg(long, default_value_t = 25.0)]
    bucket_mb: f64,
    /// Also write the join address to this file (atomically), for launchers whose workers
    /// wait for it (`worker --join-file`). It is always written to RUN_DIR/join.
    #[arg(long)]
    join_file: Option<PathBuf>,
    /// Write a Chrome-trace timeline of every rank to FILE.json.
    #[arg(long, value_name = "FILE.json")]
    trace: Option<PathBuf>,
    #[command(flatten)]
    job: JobArgs,
}

#[derive(clap::Args)]
struct WorkerArgs {
    /// lockstep://HOST:PORT#<certificate sha256>, as printed by the coordinator. Without
    /// it: --join-file, or MASTER_ADDR + MASTER_PORT + LOCKSTEP_FINGERPRINT.
    #[arg(long, env = "LOCKSTEP_JOIN")]
    join: Option<String>,
    /// Wait for this file to hold the join address (written by `coordinator --join-file`).
    #[arg(long, conflicts_with = "join")]
    join_file: Option<PathBuf>,
    /// The rank to take (a launcher's RANK); the coordinator refuses a duplicate.
    #[arg(long, env = "RANK")]
    rank: Option<usize>,
    /// The world size launched (WORLD_SIZE); must match the coordinator's --workers.
    #[arg(long, env = "WORLD_SIZE")]
    world_size: Option<usize>,
    /// This worker's index on its host (LOCAL_RANK); shown by `lockstep status`.
    #[arg(long, env = "LOCAL_RANK")]
    local_rank: Option<usize>,
    /// Cluster token file (default: the LOCKSTEP_TOKEN variable).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Exit after the first task instead of waiting for the next.
    #[arg(long)]
    once: bool,
    /// Local IP for the data-plane endpoint.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// IP announced to peers (default: the interface that reaches the coordinator).
    #[arg(long)]
    advertise: Option<IpAddr>,
    /// Seconds a collective may wait for a peer before failing.
    #[arg(long, default_value_t = 300)]
    collective_timeout: u64,
}

#[derive(clap::Args)]
struct SampleArgs {
    /// The model file written by a run (runs/<name>/model.safetensors).
    checkpoint: PathBuf,
    #[arg(long, default_value = "\n")]
    prompt: String,
    /// Tokens to generate (characters for a character model).
    #[arg(long, default_value_t = 300)]
    tokens: usize,
    /// Softmax temperature; 0 picks the most likely character every time.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample among the k most likely characters only (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Recompute the whole window for every token instead of keeping each attention
    /// layer's keys and values (same text, slower; for comparison).
    #[arg(long)]
    no_kv_cache: bool,
    /// GAN models: where to write the PNG grid of generated images.
    #[arg(long, value_name = "FILE.png", default_value = "samples.png")]
    out: PathBuf,
    /// GAN models: images to generate.
    #[arg(long, default_value_t = 64)]
    count: usize,
    /// GAN models: classify the generated images with this classifier model file and
    /// report how many it is confident about.
    #[arg(long, value_name = "MODEL")]
    classifier: Option<PathBuf>,
    /// The probability of its top class at which the classifier counts as confident.
    #[arg(long, default_value_t = 0.9)]
    confidence: f32,
}

#[derive(Subcommand)]
enum Command {
    /// Train in this process (no network).
    Train {
        #[command(flatten)]
        job: JobArgs,
        /// Continue a run: its directory (the newest checkpoint in DIR/checkpoints) or one
        /// checkpoint file.
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
        /// Stop after this many steps as if preempted, writing a checkpoint (for testing).
        #[arg(long, hide = true)]
        stop_after: Option<u64>,
        /// Write a Chrome-trace timeline (forward, backward, optimizer) to FILE.json.
        #[arg(long, value_name = "FILE.json")]
        trace: Option<PathBuf>,
    },
    /// A coordinator and N worker processes on this machine (shared memory between them).
    Local {
        #[arg(long, default_value_t = 2, value_parser = parse_workers)]
        workers: usize,
        /// Continue a run (its directory or a checkpoint file), on any number of workers.
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
        /// Gradient bucket size in MiB.
        #[arg(long, default_value_t = 25.0)]
        bucket_mb: f64,
        /// Write a Chrome-trace timeline of every rank to FILE.json.
        #[arg(long, value_name = "FILE.json")]
        trace: Option<PathBuf>,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Wait for N workers to join, train the job on them, shut them down.
    Coordinator(CoordinatorArgs),
    /// A worker daemon: joins a coordinator and runs what it is assigned.
    Worker(WorkerArgs),
    /// The live state of a run: one row per rank (host, state, step, last heartbeat,
    /// examples/s, share of time in communication).
    Status {
        /// The coordinator's join address, lockstep://HOST:PORT#<sha256>.
        #[arg(long, required_unless_present = "run_dir")]
        coordinator: Option<String>,
        /// A run directory: its `join` and `token` files give the address and the token.
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Cluster token file (default: RUN_DIR/token, or the LOCKSTEP_TOKEN variable).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Loss, accuracy and learning-rate curves of a run as a PNG.
    Plot {
        /// The run directory (its metrics.jsonl).
        run_dir: PathBuf,
        /// Output file (default: RUN_DIR/curves.png).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Generate text from a trained language model (its model.safetensors).
    Sample(SampleArgs),
    /// Evaluate a trained model on its dataset's test split, without training: loss and
    /// accuracy, per-class precision/recall/F1 and the confusion matrix (classifiers),
    /// perplexity (language models).
    Eval {
        /// A model.safetensors, a checkpoint file, or a directory holding either (a run
        /// directory, its best/ or checkpoints/).
        model: PathBuf,
        /// A job file whose [data] section replaces the one the model was trained with.
        config: Option<PathBuf>,
        /// Evaluate on this dataset directory instead.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fold a LoRA model's adapters into its weights (W + alpha/r·B·A) and write a plain model.
    MergeLora {
        /// A model.safetensors trained with `finetune.lora`.
        model: PathBuf,
        /// Where to write the merged model.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Benchmarks that print a ratio against a reference measured in the same run.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

/// The run directory of this command, once known: a failed run's last line names its
/// newest checkpoint and the command that resumes from it.
static RUN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Every step allocates and frees the same activation-sized buffers. glibc serves blocks
/// over its mmap threshold (128 KiB at start) with fresh mappings, so each step paid page
/// faults and kernel zeroing for them (~6 % of a GPT step); kept in the heap (up to the
/// 32 MiB cap glibc allows) the next step reuses the same pages, as PyTorch's caching
/// allocator does.
fn keep_freed_buffers_in_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() {
    keep_freed_buffers_in_the_heap();
    lockstep_proto::preempt::install();
    let Err(err) = real_main() else { return };
    if let Some(signal) = lockstep_proto::preempt::requested() {
        // Stopped on purpose: say where the work is and how to go on from it.
        eprintln!("stopped by signal {signal}: {}", lockstep_proto::error_text(err.as_ref()));
        if let Some(checkpoint) = preempted_checkpoint(&err) {
            eprintln!("resume with: {}", resume_command(&checkpoint));
        }
        std::process::exit(lockstep_proto::preempt::exit_code(signal));
    }
    eprintln!("error: {}", lockstep_proto::error_text(err.as_ref()));
    let newest = RUN_DIR.get().and_then(|dir| lockstep_worker::pipeline_launch::resolve_resume(dir).ok());
    if let Some(checkpoint) = newest {
        eprintln!(
            "newest checkpoint: {}; resume with: {}",
            checkpoint.display(),
            resume_command(&checkpoint.display().to_string())
        );
    }
    std::process::exit(1);
}

/// The checkpoint a preempted run wrote, if the error is a preemption.
fn preempted_checkpoint(err: &anyhow::Error) -> Option<String> {
    err.chain().find_map(|e| {
        if let Some(lockstep_coordinator::CoordError::Preempted { checkpoint, .. }) = e.downcast_ref() {
            return checkpoint.clone();
        }
        match e.downcast_ref() {
            Some(lockstep_worker::WorkerError::Preempted { checkpoint, .. }) => checkpoint.clone(),
            _ => None,
        }
    })
}

/// This process's command line with `--resume CHECKPOINT` in place of any earlier one.
fn resume_command(checkpoint: &str) -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--resume") {
        args.drain(i..(i + 2).min(args.len()));
    }
    args.retain(|a| !a.starts_with("--resume="));
    args.push("--resume".into());
    args.push(checkpoint.into());
    args.iter()
        .map(
            |a| {
                if a.contains(|c: char| c.is_whitespace() || "\"'$".contains(c)) {
                    format!("'{a}'")
                } else {
                    a.clone()
                }
            },
        )
        .collect::<Vec<_>>()
        .join(" ")
}

/// A worker count: at least 1.
pub(crate) fn parse_workers(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?} is not a worker count: {e}")),
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    // `eval` prints a report on stdout; its build log would only bury it.
    init_logging(if matches!(cli.command, Command::Eval { .. }) { "warn" } else { "info" });
    lockstep_collective::tls::set_congestion(cli.congestion);
    let threads = cli.threads.unwrap_or_else(cores).max(1);
    match cli.command {
        Command::Train { job, resume, stop_after, trace } => train(&job, resume, stop_after, trace, threads),
        Command::Local { workers, resume, bucket_mb, trace, job } => {
            let (spec, dir) = job.load()?;
            log_to_file(&dir.join("coordinator.log"))?;
            let per_worker = cli.threads.map_or((cores() / workers).max(1), |t| t.max(1));
            cluster::run_local(cluster::LocalRun {
                spec,
                resume,
                workers,
                dir: &dir,
                threads_per_worker: per_worker,
                bucket_bytes: (bucket_mb * (1 << 20) as f64) as u64,
                progress: !job.quiet,
                trace,
                join_file: None,
            })
        }
        Command::Coordinator(args) => coordinator(args, cli.threads.unwrap_or(0)),
        Command::Worker(args) => worker(args, threads),
        Command::MergeLora { model, output } => {
            let merged = lockstep_worker::finetune::merge_lora_file(&model, &output)
                .with_context(|| format!("merging the LoRA adapters of {}", model.display()))?;
            println!("merged {} adapters ({}) into {}", merged.len(), merged.join(", "), output.display());
            Ok(())
        }
        Command::Sample(args) => sample(args, threads),
        Command::Eval { model, config, data, json } => eval(&model, config, data, json, threads),
        Command::Bench { which } => bench::run(which, threads),
        Command::Status { coordinator, run_dir, token_file, json } => {
            cluster::print_status(coordinator, run_dir.as_deref(), token_file.as_deref(), json)
        }
        Command::Plot { run_dir, output } => {
            let output = output.unwrap_or_else(|| run_dir.join("curves.png"));
            plot::plot_run(&run_dir, &output)?;
            println!("{}", output.display());
            Ok(())
        }
    }
}

/// Two outputs under one RUST_LOG filter (default `level`): stderr, and the tap that feeds
/// the per-rank log files (RUN_DIR/logs/rank-R.log, RUN_DIR/coordinator.log).
fn init_logging(level: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()))
        // Colour only for a person at a terminal: stderr that `local` or launch.sh sends to a
        // log file must stay plain text.
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                // Log lines and the progress bar take turns on the terminal.
                .with_writer(|| lockstep_coordinator::run_writer::BelowBar(std::io::stderr())),
        )
        .with(tracing_subscriber::fmt::layer().with_ansi(false).with_writer(|| log_tap::TapWriter))
        .init();
}

/// `lockstep train`: this process, on the job's device.
fn train(
    job: &JobArgs,
    resume: Option<PathBuf>,
    stop_after: Option<u64>,
    trace: Option<PathBuf>,
    threads: usize,
) -> Result<()> {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().context("building the thread pool")?;
    let (spec, dir) = job.load()?;
    log_to_file(&dir.join("logs").join("rank-0.log"))?;
    if trace.is_some() {
        lockstep_worker::trace::start();
    }
    let resume = resume.map(|r| lockstep_worker::pipeline_launch::resolve_resume(&r)).transpose()?;
    let opts = RunOptions { checkpoint_dir: Some(dir.join("checkpoints")), resume, stop_after, ..Default::default() };
    let progress = !job.quiet;
    match spec.device() {
        Device::Cpu => train_single(CpuBackend::new(threads), &spec, &dir, progress, opts, trace.as_deref()),
        Device::Cuda(i) => {
            let be = lockstep_kernels::cuda::CudaBackend::new(i)
                .map_err(|e| anyhow::anyhow!("device cuda:{i} is not usable: {e}"))?;
            tracing::info!("training on {}", lockstep_kernels::Backend::name(&be));
            lockstep_worker::device_task(|| train_single(be, &spec, &dir, progress, opts, trace.as_deref()))
        }
    }
}

fn coordinator(args: CoordinatorArgs, threads_per_worker: usize) -> Result<()> {
    let CoordinatorArgs { resume, listen, workers, advertise, token_file, bucket_mb, join_file, trace, job } = args;
    let (mut spec, dir) = job.load()?;
    log_to_file(&dir.join("coordinator.log"))?;
    cluster::absolutize_data_dir(&mut spec);
    cluster::run_coordinator(cluster::CoordinatorRun {
        spec,
        resume,
        listen,
        advertise,
        workers,
        token_file: token_file.as_deref(),
        dir: &dir,
        threads_per_worker,
        bucket_bytes: (bucket_mb * (1 << 20) as f64) as u64,
        progress: !job.quiet,
        trace,
        join_file,
    })
}

fn worker(args: WorkerArgs, threads: usize) -> Result<()> {
    let WorkerArgs {
        join,
        join_file,
        rank,
        world_size,
        local_rank,
        token_file,
        once,
        bind,
        advertise,
        collective_timeout,
    } = args;
    let join = cluster::worker_join_address(join, join_file.as_deref())?;
    let token = cluster::read_token(token_file.as_deref())?;
    if let (Some(r), Some(w)) = (rank, world_size) {
        if r >= w {
            anyhow::bail!("RANK={r} is not below WORLD_SIZE={w}");
        }
    }
    let opts = DaemonOptions {
        join,
        launch_rank: rank,
        launch_world_size: world_size,
        local_rank,
        token,
        once,
        threads,
        bind,
        advertise,
        collective_timeout: Duration::from_secs(collective_timeout),
    };
    run_daemon(&opts).map_err(Into::into)
}

fn sample(args: SampleArgs, threads: usize) -> Result<()> {
    if lockstep_worker::model_file::is_gan(&args.checkpoint)? {
        return image_grid::sample_gan(&args.checkpoint, &args, threads);
    }
    let SampleArgs { checkpoint, prompt, tokens, temperature, top_k, seed, no_kv_cache, .. } = args;
    if !(temperature >= 0.0 && temperature.is_finite()) {
        anyhow::bail!("--temperature must be a finite number >= 0, got {temperature}");
    }
    let be = CpuBackend::new(threads);
    let mut loaded = lockstep_worker::model_file::load_model(&be, &checkpoint)
        .with_context(|| format!("loading {}", checkpoint.display()))?;
    let opts = lockstep_worker::sample::SampleOptions { tokens, temperature, top_k, seed, kv_cache: !no_kv_cache };
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{prompt}")?;
    let started = std::time::Instant::now();
    lockstep_worker::sample::generate(&be, &mut loaded, &prompt, &opts, &mut |c| {
        let _ = write!(stdout, "{c}").and_then(|_| stdout.flush());
    })?;
    writeln!(stdout)?;
    let seconds = started.elapsed().as_secs_f64();
    let cache = if no_kv_cache { "off" } else { "on" };
    tracing::info!("{tokens} tokens in {seconds:.3} s: {:.1} tokens/s (KV cache {cache})", tokens as f64 / seconds);
    Ok(())
}

fn eval(model: &Path, config: Option<PathBuf>, data: Option<PathBuf>, json: bool, threads: usize) -> Result<()> {
    let config = config.map(|c| JobSpec::load(&c, &[])).transpose()?;
    let data = lockstep_worker::eval::EvalData { config, dir: data };
    let report = lockstep_worker::eval::evaluate_model_file(CpuBackend::new(threads), model, &data)
        .with_context(|| format!("evaluating {}", model.display()))?;
    match json {
        true => println!("{}", serde_json::to_string_pretty(&report)?),
        false => print!("{}", report.to_table()),
    }
    Ok(())
}

/// Appends this process's log lines to `path` (a per-rank or coordinator log file).
fn log_to_file(path: &Path) -> Result<()> {
    log_tap::write_to_file(path).with_context(|| format!("opening log file {}", path.display()))
}

/// `lockstep train`: one process, world size 1.
fn train_single<B: lockstep_kernels::Backend>(
    be: B,
    spec: &JobSpec,
    dir: &Path,
    progress: bool,
    opts: RunOptions,
    trace: Option<&Path>,
) -> Result<()> {
    let mut writer = RunWriter::open(dir, spec, progress, opts.resume.is_some())?;
    let mut on_event = |event: RunEvent| -> lockstep_worker::Result<()> {
        let written = match event {
            RunEvent::Start { total_steps, params, flops_per_example, .. } => {
                writer.start(total_steps, params, flops_per_example);
                Ok(())
            }
            RunEvent::Step { step, report, .. } => match report {
                Some(r) => writer.train(r.record, &r.grad_histograms),
                None => {
                    writer.progress(step);
                    Ok(())
                }
            },
            RunEvent::Eval(record) => writer.eval(record),
        };
        written.map_err(|e| lockstep_worker::WorkerError::Stopped(e.to_string()))
    };
    let (summary, trainer) = run_training(be, spec, opts, Box::new(|_| Ok(Box::new(NoReduce))), &mut on_event)?;
    save_model(&trainer, &dir.join("model.safetensors"))?;
    if let Some(path) = trace {
        let spans = lockstep_worker::trace::finish();
        writer.write_trace(path, &[(0, lockstep_proto::hostname(), spans)])?;
    }
    writer.finish(&summary)?;
    Ok(())
}
