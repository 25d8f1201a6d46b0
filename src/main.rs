//! The `lockstep` command line. Everything here is argument parsing and wiring; the work
//! lives in the library crates.

mod bench;
mod cluster;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lockstep_coordinator::RunWriter;
use lockstep_kernels::CpuBackend;
use lockstep_proto::job::Device;
use lockstep_proto::JobSpec;
use lockstep_worker::daemon::{run_daemon, DaemonOptions};
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
        Ok((spec, dir))
    }
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
    },
    /// A coordinator and N worker processes on this machine, over loopback QUIC.
    Local {
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Continue a run (its directory or a checkpoint file), on any number of workers.
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
        /// Gradient bucket size in MiB.
        #[arg(long, default_value_t = 25.0)]
        bucket_mb: f64,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Wait for N workers to join, train the job on them, shut them down.
    Coordinator {
        /// Continue a run (its directory or a checkpoint file readable by every worker).
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
        /// Address to listen on (UDP), e.g. 0.0.0.0:7070.
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        workers: usize,
        /// Host put in the join address (default: the listen IP).
        #[arg(long)]
        advertise: Option<String>,
        /// Cluster token file (default: generate one and write it to the run directory).
        #[arg(long)]
        token_file: Option<PathBuf>,
        #[arg(long, default_value_t = 25.0)]
        bucket_mb: f64,
        #[command(flatten)]
        job: JobArgs,
    },
    /// A worker daemon: joins a coordinator and runs what it is assigned.
    Worker {
        /// lockstep://HOST:PORT#<certificate sha256>, as printed by the coordinator.
        #[arg(long)]
        join: String,
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
    },
    /// Generate text from a trained language model (its model.safetensors).
    Sample {
        /// The model file written by a run (runs/<name>/model.safetensors).
        checkpoint: PathBuf,
        #[arg(long, default_value = "\n")]
        prompt: String,
        /// Characters to generate.
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
    },
    /// Benchmarks that print a ratio against a reference measured in the same run.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() {
    if let Err(err) = real_main() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn real_main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(cores).max(1);
    match cli.command {
        Command::Train { job, resume, stop_after } => {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().context("building the thread pool")?;
            let (spec, dir) = job.load()?;
            let resume = resume.map(|r| cluster::resolve_checkpoint(&r)).transpose()?;
            let opts =
                RunOptions { checkpoint_dir: Some(dir.join("checkpoints")), resume, stop_after, ..Default::default() };
            match spec.device() {
                Device::Cpu => train_single(CpuBackend::new(threads), &spec, &dir, !job.quiet, opts),
                Device::Cuda(i) => {
                    let be = lockstep_kernels::cuda::CudaBackend::new(i)
                        .map_err(|e| anyhow::anyhow!("device cuda:{i} is not usable: {e}"))?;
                    tracing::info!("training on {}", lockstep_kernels::Backend::name(&be));
                    train_single(be, &spec, &dir, !job.quiet, opts)
                }
            }
        }
        Command::Local { workers, resume, bucket_mb, job } => {
            if workers == 0 {
                anyhow::bail!("--workers must be at least 1");
            }
            let (spec, dir) = job.load()?;
            let per_worker = cli.threads.map_or((cores() / workers).max(1), |t| t.max(1));
            cluster::run_local(cluster::LocalRun {
                spec,
                resume,
                workers,
                dir: &dir,
                threads_per_worker: per_worker,
                bucket_bytes: (bucket_mb * (1 << 20) as f64) as u64,
                progress: !job.quiet,
            })
        }
        Command::Coordinator { resume, listen, workers, advertise, token_file, bucket_mb, job } => {
            let (mut spec, dir) = job.load()?;
            cluster::absolutize_data_dir(&mut spec);
            cluster::run_coordinator(cluster::CoordinatorRun {
                spec,
                resume,
                listen,
                advertise,
                workers,
                token_file: token_file.as_deref(),
                dir: &dir,
                threads_per_worker: cli.threads.unwrap_or(0),
                bucket_bytes: (bucket_mb * (1 << 20) as f64) as u64,
                progress: !job.quiet,
            })
        }
        Command::Worker { join, token_file, once, bind, advertise, collective_timeout } => {
            let token = cluster::read_token(token_file.as_deref())?;
            let opts = DaemonOptions {
                join,
                token,
                once,
                threads,
                bind,
                advertise,
                collective_timeout: Duration::from_secs(collective_timeout),
            };
            run_daemon(&opts).map_err(Into::into)
        }
        Command::Sample { checkpoint, prompt, tokens, temperature, top_k, seed } => {
            if !(temperature >= 0.0 && temperature.is_finite()) {
                anyhow::bail!("--temperature must be a finite number >= 0, got {temperature}");
            }
            let be = CpuBackend::new(threads);
            let mut loaded = lockstep_worker::model_file::load_model(&be, &checkpoint)
                .with_context(|| format!("loading {}", checkpoint.display()))?;
            let opts = lockstep_worker::sample::SampleOptions { tokens, temperature, top_k, seed };
            let mut stdout = std::io::stdout().lock();
            write!(stdout, "{prompt}")?;
            lockstep_worker::sample::generate(&be, &mut loaded, &prompt, &opts, &mut |c| {
                let _ = write!(stdout, "{c}").and_then(|_| stdout.flush());
            })?;
            writeln!(stdout)?;
            Ok(())
        }
        Command::Bench { which } => bench::run(which, threads),
    }
}

/// `lockstep train`: one process, world size 1.
fn train_single<B: lockstep_kernels::Backend>(
    be: B,
    spec: &JobSpec,
    dir: &Path,
    progress: bool,
    opts: RunOptions,
) -> Result<()> {
    let mut writer = RunWriter::open(dir, spec, progress, opts.resume.is_some())?;
    let mut on_event = |event: RunEvent| -> lockstep_worker::Result<()> {
        let written = match event {
            RunEvent::Start { total_steps, params, flops_per_example, .. } => {
                writer.start(total_steps, params, flops_per_example);
                Ok(())
            }
            RunEvent::Step { step, record, .. } => match record {
                Some((record, _)) => writer.train(record),
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
    writer.finish(&summary)?;
    Ok(())
}
