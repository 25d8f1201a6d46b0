//! `lockstep bench ...`: throughput with a reference measured in the same run, printed as
//! a ratio (this machine is noisy; absolute numbers alone mean little).

use anyhow::Result;
use clap::Subcommand;
use lockstep_kernels::{Backend, CpuBackend, Gemm};
use lockstep_nn::data::{Dataset, Examples, TokenWindows};
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
        /// Matmul precision of the step and of the reference GEMMs: fp32, bf16 or fp16.
        #[arg(long, default_value = "fp32")]
        precision: String,
    },
    /// GPT (4 layers, width 128, 4 heads, context 64) training step vs raw GEMM on its shapes.
    Gpt {
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 50)]
        steps: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Matmul precision of the step and of the reference GEMMs: fp32, bf16 or fp16.
        #[arg(long, default_value = "fp32")]
        precision: String,
    },
    /// All-reduce busbw across N local processes, vs memcpy and a plain TCP stream.
    Allreduce {
        #[arg(long, default_value_t = 2, value_parser = crate::parse_workers)]
        workers: usize,
        /// auto (shared memory on one host), shm, quic (a QUIC ring) or tcp (a TLS-over-TCP ring).
        #[arg(long, default_value = "auto", value_parser = parse_transport)]
        transport: lockstep_proto::toolbox::Transport,
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
        Which::Mlp { batch, steps, device, precision } => {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
            let run = Run { batch, steps, precision };
            match device.parse::<Device>().map_err(anyhow::Error::msg)? {
                Device::Cpu => bench_mlp(CpuBackend::new(threads), run),
                Device::Cuda(i) => bench_mlp(cuda(i)?, run),
            }
        }
        Which::Gpt { batch, steps, device, precision } => {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
            let run = Run { batch, steps, precision };
            match device.parse::<Device>().map_err(anyhow::Error::msg)? {
                Device::Cpu => bench_gpt(CpuBackend::new(threads), run),
                Device::Cuda(i) => bench_gpt(cuda(i)?, run),
            }
        }
        Which::Allreduce { workers, transport, sizes, iters } => {
            let sizes = if sizes.is_empty() { vec![1 << 20, 4 << 20, 16 << 20, 64 << 20] } else { sizes };
            crate::cluster::bench_allreduce(workers, transport, sizes, iters.max(1), 1)
        }
        Which::TcpSink { connect, bytes } => crate::cluster::tcp_sink(&connect, bytes),
    }
}

fn parse_transport(s: &str) -> Result<lockstep_proto::toolbox::Transport, String> {
    use lockstep_proto::toolbox::Transport;
    match s {
        "auto" => Ok(Transport::Auto),
        "shm" => Ok(Transport::Shm),
        "quic" => Ok(Transport::Quic),
        "tcp" => Ok(Transport::Tcp),
        other => Err(format!("unknown transport {other:?}: auto, shm, quic or tcp")),
    }
}

/// One core's memcpy bandwidth (bytes/s) on `bytes`-sized buffers: the median of `reps`.
pub fn memcpy_bandwidth(bytes: usize, reps: usize) -> f64 {
    let src = vec![1.0f32; bytes / 4];
    let mut dst = vec![0.0f32; bytes / 4];
    dst.copy_from_slice(&src); // fault the pages in
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    bytes as f64 / times[times.len() / 2]
}

fn cuda(i: usize) -> Result<lockstep_kernels::cuda::CudaBackend> {
    lockstep_kernels::cuda::CudaBackend::new(i).map_err(|e| anyhow::anyhow!("device cuda:{i} is not usable: {e}"))
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

const GPT_JOB: &str = r#"
name = "bench-gpt"
seed = 1
[model]
kind = "gpt"
context = 64
dim = 128
heads = 4
blocks = 4
[data]
kind = "text"
dir = "unused"
[train]
epochs = 1
batch_size = 32
[optim]
kind = "adamw"
lr = 0.001
"#;

/// A GEMM of one training step: (rows, in) × (in, out), run forward and twice backward.
type GemmShape = (usize, usize, usize);

/// One model benchmark's settings.
struct Run {
    batch: usize,
    steps: usize,
    precision: String,
}

impl Run {
    fn spec(&self, job: &str) -> Result<JobSpec> {
        let sets = [format!("train.batch_size={}", self.batch), format!("precision.compute={:?}", self.precision)];
        Ok(JobSpec::parse(job, Path::new("<bench>"), &sets)?)
    }
}

fn bench_mlp<B: Backend>(be: B, run: Run) -> Result<()> {
    let (spec, batch) = (run.spec(MLP_JOB)?, run.batch);
    let widths = [784usize, 512, 512, 10];
    let n = batch * 8;
    let mut rng = Stream::new(1, "bench", &[]);
    let data = Dataset {
        features: 784,
        classes: 10,
        x: (0..n * 784).map(|_| rng.normal()).collect(),
        y: (0..n).map(|_| rng.below(10) as u32).collect(),
    };
    let shapes: Vec<GemmShape> = widths.windows(2).map(|w| (batch, w[0], w[1])).collect();
    let title = format!("bench mlp: 784-512-512-10, batch {batch}, AdamW, {}", run.precision);
    bench_model(be, &spec, &data, &shapes, run.steps, &title, 1)
}

fn bench_gpt<B: Backend>(be: B, run: Run) -> Result<()> {
    let (spec, batch) = (run.spec(GPT_JOB)?, run.batch);
    let (t, d, vocab) = (64usize, 128usize, 65usize);
    let mut rng = Stream::new(1, "bench", &[]);
    let tokens: Vec<u32> = (0..batch * 8 * t + 1).map(|_| rng.below(vocab as u64) as u32).collect();
    let data = TokenWindows::full(tokens, vocab, t, t);
    let rows = batch * t;
    let mut shapes: Vec<GemmShape> = Vec::new();
    for _ in 0..4 {
        shapes.extend([(rows, d, 3 * d), (rows, d, d), (rows, d, 4 * d), (rows, 4 * d, d)]);
    }
    shapes.push((rows, d, vocab));
    let title = format!(
        "bench gpt: 4 layers, width 128, 4 heads, context 64, vocab 65, batch {batch}, AdamW, {}",
        run.precision
    );
    bench_model(be, &spec, &data, &shapes, run.steps, &title, t)
}

/// Times training steps of `spec`'s model against exactly its GEMMs, interleaved in rounds.
/// `tokens_per_example` > 1 also reports tokens/s.
fn bench_model<B: Backend>(
    be: B,
    spec: &JobSpec,
    data: &dyn Examples,
    shapes: &[GemmShape],
    steps: usize,
    title: &str,
    tokens_per_example: usize,
) -> Result<()> {
    let batch = spec.train.batch_size;
    let device_name = be.name();
    let mut trainer = Trainer::new(be, spec, data.features(), data.classes(), steps as u64)?;
    let batches: Vec<Vec<u32>> = (0..8).map(|b| ((b * batch) as u32..((b + 1) * batch) as u32).collect()).collect();
    let warmup = steps / 10 + 2;
    for b in batches.iter().take(warmup.min(8)) {
        trainer.step(data, b, &mut NoReduce)?;
    }
    // Forward + backward ≈ 3 × forward FLOPs (the model's own count, attention included).
    let model_flops_per_step = 3.0 * trainer.model.flops_per_example() as f64 * batch as f64;
    let gemm_flops_per_step: f64 = shapes.iter().map(|&(m, k, n)| 3.0 * 2.0 * (m * k * n) as f64).sum();
    let (mut gemm_secs, mut step_secs, mut peaks) = (Vec::new(), Vec::new(), Vec::new());
    let threads = rayon::current_num_threads();
    // Interleave rounds of both so machine noise hits them alike.
    let rounds = 5;
    for _ in 0..rounds {
        let t = Instant::now();
        for s in 0..steps / rounds {
            trainer.step(data, &batches[s % 8], &mut NoReduce)?;
        }
        step_secs.push(t.elapsed().as_secs_f64() / (steps / rounds) as f64);
        gemm_secs.push(time_raw_gemms(&trainer.be, shapes, steps / rounds)?);
        peaks.push(lockstep_kernels::peak::peak_flops(threads));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (step_s, gemm_s) = (median(&mut step_secs), median(&mut gemm_secs));
    let isa = peaks[0].1;
    let peak = median(&mut peaks.iter().map(|p| p.0).collect());
    let achieved = model_flops_per_step / step_s;
    let raw = gemm_flops_per_step / gemm_s;
    println!("{title}, {device_name}, {steps} steps");
    let rate = if tokens_per_example > 1 {
        format!("{:9.0} tokens/s", (batch * tokens_per_example) as f64 / step_s)
    } else {
        format!("{:9.0} examples/s", batch as f64 / step_s)
    };
    println!("  training step   {:8.3} ms   {rate}   {:6.1} GFLOP/s", step_s * 1e3, achieved / 1e9);
    println!("  raw gemm (ref)  {:8.3} ms                        {:6.1} GFLOP/s", gemm_s * 1e3, raw / 1e9);
    println!("  ratio achieved/raw gemm FLOP/s: {:.3}", achieved / raw);
    // The machine's own limit, measured in the same rounds (an FMA loop on the widest
    // vectors, every thread): a CPU peak for the CPU backend.
    if device_name.starts_with("cpu") {
        let share = |flops: f64| 100.0 * flops / peak;
        println!(
            "  machine peak    {:6.1} GFLOP/s (FMA loop, {threads} threads, {}): step {:.1}%, raw gemm {:.1}% of peak",
            peak / 1e9,
            isa.name(),
            share(achieved),
            share(raw)
        );
    }
    // The raw GEMMs are exactly the step's: the rest of the step is everything else
    // (attention's loops, norms, activations, the optimizer, allocation).
    let outside = (step_s - gemm_s).max(0.0);
    println!("  outside the GEMMs: {:.3} ms, {:.1}% of the step", outside * 1e3, 100.0 * outside / step_s);
    Ok(())
}

/// Seconds per step for exactly the GEMM calls of one training step of `shapes`.
fn time_raw_gemms<B: Backend>(be: &B, shapes: &[GemmShape], reps: usize) -> anyhow::Result<f64> {
    let mut bufs: Vec<_> = shapes
        .iter()
        .map(|&(rows, i, o)| {
            let x = be.upload(&vec![0.5f32; rows * i])?;
            let weight = be.upload(&vec![0.25f32; o * i])?;
            Ok((x, weight, be.zeros(rows * o)?, be.zeros(o * i)?, be.zeros(rows * i)?))
        })
        .collect::<anyhow::Result<_>>()?;
    be.check()?; // the device is idle before timing starts
    let t = Instant::now();
    for _ in 0..reps {
        for (&(rows, i, o), (x, weight, y, dw, dx)) in shapes.iter().zip(bufs.iter_mut()) {
            be.matmul(x, weight, y, Gemm::nt(rows, i, o))?; // y = x·Wᵀ
            be.matmul(y, x, dw, Gemm::tn(o, rows, i).accumulate())?; // dW = dyᵀ·x
            be.matmul(y, weight, dx, Gemm::nn(rows, o, i))?; // dx = dy·W
        }
    }
    be.check()?; // waits for the device
    std::hint::black_box(&bufs);
    Ok(t.elapsed().as_secs_f64() / reps as f64)
}
