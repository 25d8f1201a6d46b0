//! The `lockstep` command line. Everything here is argument parsing and wiring; the work
//! lives in the library crates.

mod bench;
mod run_dir;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lockstep_kernels::CpuBackend;
use lockstep_proto::JobSpec;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "lockstep", version, about = "Distributed data-parallel training")]
struct Cli {
    /// Compute threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train in this process (no network).
    Train {
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

fn real_main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().context("building the thread pool")?;
    match cli.command {
        Command::Train { config, out, overrides, quiet } => {
            let spec = JobSpec::load(&config, &overrides)?;
            let dir = out.unwrap_or_else(|| PathBuf::from("runs").join(&spec.name));
            run_dir::train_single(CpuBackend::new(threads), &spec, &dir, !quiet)
        }
        Command::Bench { which } => bench::run(which, threads),
    }
}
