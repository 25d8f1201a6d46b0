//! `lockstep bench ...`: throughput with a reference measured in the same run, printed as
//! a ratio (this machine is noisy; absolute numbers alone mean little).

use anyhow::Result;
use clap::Subcommand;
use lockstep_kernels::{Backend, CpuBackend};
use lockstep_nn::data::Dataset;
use lockstep_nn::rng::Stream;
use lockstep_proto::job::Device;
use lockstep_proto::JobSpec;
use lockstep_worker::{NoReduce, Trainer};
use std::path::Path;
use std::time::Instant;

#[derive(Subcommand)]
pub enum Which {
    /// MLP 784-512-512-10 training step vs raw GEMM on the same shapes.
    Mlp {
        #[arg(long, default_value_t = 128)]
        batch: usize,
        #[arg(long, default_value_t = 200)]
        steps: usize,
        /// cpu or cuda[:N]: the reference GEMMs run on the same device.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Ring all-reduce busbw over QUIC across N local processes vs a plain TCP stream.
    Allreduce {
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Message sizes in bytes (repeatable; default 1, 4, 16 and 64 MiB).
        #[arg(long = "size")]
        sizes: Vec<u64>,
        #[arg(long, default_value_t = 10)]
        iters: usize,
    },
    /// (internal) the receiving process of the TCP reference stream.
    #[command(hide = true)]
    TcpSink {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        bytes: usize,
    },
}

pub fn run(which: Which, threads: usize) -> Result<()> {
    match which {
        Which::Mlp { batch, steps, device } => {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
            match device.parse::<Device>().map_err(anyhow::Error::msg)? {
                Device::Cpu => bench_mlp(CpuBackend::new(threads), batch, steps),
                Device::Cuda(i) => {
                    let be = lockstep_kernels::cuda::CudaBackend::new(i)
                        .map_err(|e| anyhow::anyhow!("device cuda:{i} is not usable: {e}"))?;
                    bench_mlp(be, batch, steps)
                }
            }
        }
        Which::Allreduce { workers, sizes, iters } => {
            let sizes = if sizes.is_empty() { vec![1 << 20, 4 << 20, 16 << 20, 64 << 20] } else { sizes };
            crate::cluster::bench_allreduce(workers, sizes, iters.max(1), 1)
        }
        Which::TcpSink { connect, bytes } => crate::cluster::tcp_sink(&connect, bytes),
    }
}

const MLP_JOB: &str = r#"
name = "bench-mlp"
seed = 1
[model]
kind = "mlp"
hidden = [512, 512]
[data]
kind = "idx"
dir = "unused"
[train]
epochs = 1
batch_size = 128
[optim]
kind = "adamw"
lr = 0.001
"#;

fn bench_mlp<B: Backend>(be: B, batch: usize, steps: usize) -> Result<()> {
    let spec = JobSpec::parse(MLP_JOB, Path::new("<bench>"), &[format!("train.batch_size={batch}")])?;
    let widths = [784usize, 512, 512, 10];
    let n = batch * 8;
    let mut rng = Stream::new(1, "bench", &[]);
    let data = Dataset {
        features: 784,
        classes: 10,
        x: (0..n * 784).map(|_| rng.normal()).collect(),
        y: (0..n).map(|_| rng.below(10) as u32).collect(),
    };
    let device_name = be.name();
    let mut trainer = Trainer::new(be, &spec, 784, 10, steps as u64)?;
    let batches: Vec<Vec<u32>> = (0..8).map(|b| ((b * batch) as u32..((b + 1) * batch) as u32).collect()).collect();
    let warmup = steps / 10 + 2;
    for b in batches.iter().take(warmup.min(8)) {
        trainer.step(&data, b, &mut NoReduce)?;
    }

    // The GEMMs one step executes per Linear (in→out): y = x·Wᵀ, dW = dyᵀ·x, dx = dy·W.
    let gemm_flops_per_step: f64 = widths.windows(2).map(|w| 3.0 * 2.0 * (batch * w[0] * w[1]) as f64).sum();
    let mut gemm_secs = Vec::new();
    let mut step_secs = Vec::new();
    // Interleave rounds of both so machine noise hits them alike.
    let rounds = 5;
    for _ in 0..rounds {
        let t = Instant::now();
        for s in 0..steps / rounds {
            trainer.step(&data, &batches[s % 8], &mut NoReduce)?;
        }
        step_secs.push(t.elapsed().as_secs_f64() / (steps / rounds) as f64);
        gemm_secs.push(time_raw_gemms(&trainer.be, &widths, batch, steps / rounds));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let step_s = median(&mut step_secs);
    let gemm_s = median(&mut gemm_secs);
    let achieved = gemm_flops_per_step / step_s;
    let raw = gemm_flops_per_step / gemm_s;
    println!("bench mlp: 784-512-512-10, batch {batch}, AdamW, {device_name}, {steps} steps");
    println!(
        "  training step   {:8.3} ms   {:9.0} examples/s   {:6.1} GFLOP/s",
        step_s * 1e3,
        batch as f64 / step_s,
        achieved / 1e9
    );
    println!("  raw gemm (ref)  {:8.3} ms                          {:6.1} GFLOP/s", gemm_s * 1e3, raw / 1e9);
    println!("  ratio achieved/raw gemm FLOP/s: {:.3}", achieved / raw);
    Ok(())
}

/// Seconds per step for exactly the GEMM calls of one MLP training step.
fn time_raw_gemms<B: Backend>(be: &B, widths: &[usize], batch: usize, reps: usize) -> f64 {
    let mut bufs: Vec<_> = widths
        .windows(2)
        .map(|w| {
            let (i, o) = (w[0], w[1]);
            let x = be.upload(&vec![0.5f32; batch * i]);
            let weight = be.upload(&vec![0.25f32; o * i]);
            (x, weight, be.zeros(batch * o), be.zeros(o * i), be.zeros(batch * i))
        })
        .collect();
    let _ = be.check(); // the device is idle before timing starts
    let t = Instant::now();
    for _ in 0..reps {
        for (w, (x, weight, y, dw, dx)) in widths.windows(2).zip(bufs.iter_mut()) {
            let (i, o) = (w[0], w[1]);
            be.matmul(x, weight, y, batch, i, o, false, true, false);
            be.matmul(y, x, dw, o, batch, i, true, false, true);
            be.matmul(y, weight, dx, batch, o, i, false, false, false);
        }
    }
    let _ = be.check(); // waits for the device
    std::hint::black_box(&bufs);
    t.elapsed().as_secs_f64() / reps as f64
}
