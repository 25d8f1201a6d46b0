//! The launcher's side of pipeline runs (T42): the placement is computed, checked and
//! printed before any worker starts, and the stages' weight files are merged into one
//! model.safetensors after the run.

use anyhow::{bail, Context, Result};
use lockstep_kernels::CpuBackend;
use lockstep_proto::JobSpec;
use std::path::Path;

/// For a pipeline job on `workers` workers: checks the world divides into stages ×
/// replicas and the placement is valid, and prints it. Nothing for other jobs.
pub fn check_and_print_placement(spec: &JobSpec, workers: usize) -> Result<()> {
    let p = &spec.parallel;
    let stages = p.pipeline_stages;
    if stages <= 1 {
        return Ok(());
    }
    if !workers.is_multiple_of(stages) {
        bail!("parallel.pipeline_stages = {stages} does not divide the {workers} workers (world = stages × replicas)");
    }
    if p.data_parallel > 0 && p.data_parallel * stages != workers {
        bail!(
            "parallel.pipeline_stages = {stages} × parallel.data_parallel = {} is {} workers, but the run has {workers}",
            p.data_parallel,
            p.data_parallel * stages
        );
    }
    if spec.train.min_workers > 0 {
        bail!("pipeline runs cannot re-form after a failure yet (train.min_workers); they can --resume");
    }
    let data = lockstep_worker::build::load_data(spec).context("loading the data to size the model")?;
    let (model, _) =
        lockstep_worker::build::build_model(&CpuBackend::new(1), spec, data.train.features(), data.train.classes())?;
    lockstep_worker::pipeline::check_supported(&model)?;
    let (placement, costs) = lockstep_worker::placement::place(&model, spec)?;
    let how = if p.placement.is_empty() { "balanced by FLOPs and parameters" } else { "explicit" };
    let replicas = workers / stages;
    let text = format!(
        "pipeline: {stages} stages × {replicas} replicas, {:?}, {} micro-batches; placement {how}:\n{}",
        p.schedule,
        p.micro_batches,
        placement.describe(&costs)
    );
    // On stdout for the user, and in coordinator.log (at info level) for the record.
    print!("{text}");
    tracing::debug!("{text}");
    Ok(())
}

/// Merges `model.safetensors.stage-S` (S = 0..stages) in `dir` into `model.safetensors`
/// (stage 0's header: the job and vocabulary) and removes the parts.
pub fn merge_stage_models(dir: &Path, stages: usize) -> Result<()> {
    if stages <= 1 {
        return Ok(());
    }
    let target = dir.join("model.safetensors");
    let part = |s: usize| dir.join(format!("model.safetensors.stage-{s}"));
    let metadata = lockstep_nn::checkpoint::load_metadata(&part(0))?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for s in 0..stages {
        let mut stage: Vec<_> = lockstep_nn::checkpoint::load_tensors(&part(s))?.into_iter().collect();
        stage.sort_by(|a, b| a.0.cmp(&b.0));
        tensors.extend(stage.into_iter().map(|(name, (shape, values))| (name, shape, values)));
    }
    let bytes = lockstep_nn::checkpoint::to_safetensors_with_metadata(&tensors, Some(metadata))?;
    lockstep_nn::checkpoint::write_atomic(&target, &bytes)?;
    for s in 0..stages {
        std::fs::remove_file(part(s)).with_context(|| format!("removing {}", part(s).display()))?;
    }
    tracing::info!("merged {stages} stage weight files into {}", target.display());
    Ok(())
}

/// The newest step every stage has a checkpoint of, in `checkpoints/stage-S/`: the path of
/// stage 0's file (each stage reads the same step from its own directory).
pub fn resolve_stage_checkpoint(checkpoints: &Path) -> Result<std::path::PathBuf> {
    let mut common: Option<std::collections::BTreeSet<u64>> = None;
    let mut stages = 0;
    while checkpoints.join(format!("stage-{stages}")).is_dir() {
        let dir = checkpoints.join(format!("stage-{stages}"));
        let steps: std::collections::BTreeSet<u64> =
            lockstep_worker::train_state::list_checkpoints(&dir)?.into_iter().map(|(s, _)| s).collect();
        common = Some(match common {
            Some(c) => c.intersection(&steps).copied().collect(),
            None => steps,
        });
        stages += 1;
    }
    let step = common.and_then(|c| c.last().copied()).ok_or_else(|| {
        anyhow::anyhow!("--resume: no step has a checkpoint of every stage in {}", checkpoints.display())
    })?;
    let file = lockstep_worker::train_state::checkpoint_path(&checkpoints.join("stage-0"), step);
    tracing::info!("resuming all {stages} stages from step {step}");
    Ok(std::path::absolute(file)?)
}
