//! Pipeline stages (T42) on threads: P stages × D replicas follow the unpipelined run's
//! loss step for step, with GPipe and with 1F1B.

use lockstep_collective::pipe::thread_pipes;
use lockstep_collective::thread::thread_group;
use lockstep_collective::WireFormat;
use lockstep_kernels::CpuBackend;
use lockstep_nn::data::{rank_slice, TokenWindows};
use lockstep_nn::rng::Stream;
use lockstep_proto::metrics::StageReport;
use lockstep_proto::JobSpec;
use lockstep_worker::pipeline::{PipeReport, PipelineStage};
use lockstep_worker::placement::place;
use lockstep_worker::reducer::BucketReducer;
use lockstep_worker::trainer::{GradReducer, NoReduce, Trainer};
use std::path::Path;
use std::sync::Arc;

const GPT: &str = r#"
name = "pipe"
seed = 11
[model]
kind = "gpt"
context = 16
dim = 32
heads = 4
blocks = 4
dropout = 0.1
[data]
kind = "text"
dir = "unused"
[train]
epochs = 1
batch_size = 16
[optim]
kind = "adamw"
lr = 0.003
clip_norm = 1.0
[parallel]
micro_batches = 4
"#;

const VOCAB: usize = 12;
const STEPS: usize = 6;

fn spec(stages: usize, schedule: &str) -> JobSpec {
    let sets = vec![format!("parallel.pipeline_stages={stages}"), format!("parallel.schedule=\"{schedule}\"")];
    JobSpec::parse(GPT, Path::new("pipe.toml"), &sets).unwrap()
}

fn data() -> Arc<TokenWindows> {
    let mut s = Stream::new(3, "tokens", &[]);
    // A learnable sequence: mostly t+1 mod VOCAB, sometimes random.
    let mut tokens = vec![0u32];
    for _ in 0..2000 {
        let last = *tokens.last().unwrap();
        tokens.push(if s.below(5) == 0 { s.below(VOCAB as u64) as u32 } else { (last + 1) % VOCAB as u32 });
    }
    Arc::new(TokenWindows::full(tokens, VOCAB, 16, 3))
}

fn batch(step: usize) -> Vec<u32> {
    (0..16u32).map(|i| (step as u32 * 37 + i * 11) % 500).collect()
}

fn unpipelined_losses() -> Vec<f64> {
    let data = data();
    let mut t = Trainer::new(CpuBackend::new(1), &spec(1, "gpipe"), 16, VOCAB, STEPS as u64).unwrap();
    (0..STEPS).map(|s| t.step(data.as_ref(), &batch(s), &mut NoReduce).unwrap().loss).collect()
}

/// Losses seen by every (stage, replica) of a P × D pipeline run, and each stage's report.
fn pipelined_losses(stages: usize, replicas: usize, schedule: &str) -> Vec<(usize, usize, Vec<f64>, StageReport)> {
    let data = data();
    let mut pipes: Vec<_> =
        (0..replicas).map(|_| thread_pipes(stages).into_iter().map(Some).collect::<Vec<_>>()).collect();
    let mut groups: Vec<_> =
        (0..stages).map(|_| thread_group(replicas).into_iter().map(Some).collect::<Vec<_>>()).collect();
    let mut handles = Vec::new();
    for d in 0..replicas {
        for s in 0..stages {
            let link = pipes[d][s].take().unwrap();
            let comm = groups[s][d].take().unwrap();
            let (data, spec) = (data.clone(), spec(stages, schedule));
            handles.push(std::thread::spawn(move || {
                let mut t = Trainer::new(CpuBackend::new(1), &spec, 16, VOCAB, STEPS as u64).unwrap();
                let (placement, _) = place(&t.model, &spec).unwrap();
                let stage = PipelineStage {
                    stage: s,
                    stages,
                    micro_batches: spec.parallel.micro_batches,
                    schedule: spec.parallel.schedule,
                    link: Box::new(link),
                    report: PipeReport::default(),
                };
                t.keep_stage(placement.stages[s].clone(), stage).unwrap();
                let sizes: Vec<Option<usize>> = t.model.params().iter().map(|p| Some(p.numel())).collect();
                let mut reducer: Box<dyn GradReducer<CpuBackend>> = if replicas > 1 {
                    Box::new(BucketReducer::new(Box::new(comm), &sizes, 1 << 20, WireFormat::F32, 0))
                } else {
                    Box::new(NoReduce)
                };
                let losses: Vec<f64> = (0..STEPS)
                    .map(|step| {
                        let global = batch(step);
                        t.step(data.as_ref(), rank_slice(&global, d, replicas), reducer.as_mut()).unwrap().loss
                    })
                    .collect();
                let eval = t.evaluate(data.as_ref()).unwrap();
                assert!(eval.loss.is_finite() && eval.accuracy > 0.0);
                (s, d, losses, t.pipeline.take().unwrap().report(0, d, Vec::new(), 0))
            }));
        }
    }
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn largest_relative_difference(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs()).fold(0.0, f64::max)
}

#[test]
fn pipelined_runs_follow_the_unpipelined_loss() {
    let reference = unpipelined_losses();
    assert!(reference[STEPS - 1] < reference[0], "it learns: {reference:?}");
    for (stages, replicas, schedule) in [(2, 1, "gpipe"), (2, 1, "1f1b"), (2, 2, "1f1b"), (4, 1, "1f1b")] {
        let runs = pipelined_losses(stages, replicas, schedule);
        for (s, d, losses, _) in &runs {
            let diff = largest_relative_difference(losses, &reference);
            eprintln!(
                "P={stages} D={replicas} {schedule} stage {s} replica {d}: largest relative difference {diff:.2e}"
            );
            assert!(diff < 1e-5, "P={stages} D={replicas} {schedule} stage {s}: {losses:?} vs {reference:?}");
        }
    }
}

#[test]
fn one_f_one_b_holds_fewer_micro_batches_than_gpipe() {
    let gpipe = pipelined_losses(4, 1, "gpipe");
    let one_f = pipelined_losses(4, 1, "1f1b");
    for s in 0..4 {
        let g = &gpipe.iter().find(|r| r.0 == s).unwrap().3;
        let o = &one_f.iter().find(|r| r.0 == s).unwrap().3;
        assert_eq!(g.peak_in_flight, 4);
        assert_eq!(o.peak_in_flight, 4 - s);
        if s > 0 {
            assert!(o.peak_stash_bytes < g.peak_stash_bytes, "stage {s}: {o:?} vs {g:?}");
        }
    }
}
