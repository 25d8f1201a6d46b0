//! The launcher's side of pipeline runs (T42): before any worker starts, the world is
//! checked to divide into stages × replicas and the placement is computed and described;
//! after the run, the stages' weight files are merged into one model.safetensors; on
//! `--resume`, the newest step that every stage has a checkpoint of is found.

use crate::checkpoint_dir::{checkpoint_path, list_checkpoints};
use crate::{build, pipeline, placement, Result, WorkerError};
use lockstep_kernels::CpuBackend;
use lockstep_nn::checkpoint::{load_metadata, load_tensors, to_safetensors_with_metadata, write_atomic, FileTensor};
use lockstep_proto::JobSpec;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Checks that a pipeline job fits `workers` workers: they divide into stages × replicas
/// (and match `parallel.data_parallel` if it is set), and the job does not ask for
/// re-forming after a failure, which pipeline runs cannot do yet.
pub fn check_world(spec: &JobSpec, workers: usize) -> Result<()> {
    let p = &spec.parallel;
    let stages = p.pipeline_stages;
    if stages <= 1 {
        return Ok(());
    }
    if !workers.is_multiple_of(stages) {
        return Err(WorkerError::Config(format!(
            "parallel.pipeline_stages = {stages} does not divide the {workers} workers (world = stages × replicas)"
        )));
    }
    if p.data_parallel > 0 && p.data_parallel * stages != workers {
        return Err(WorkerError::Config(format!(
            "parallel.pipeline_stages = {stages} × parallel.data_parallel = {} is {} workers, but the run has {workers}",
            p.data_parallel,
            p.data_parallel * stages
        )));
    }
    if spec.train.min_workers > 0 || spec.train.max_workers > 0 {
        return Err(WorkerError::Config(
            "pipeline runs cannot re-form yet (train.min_workers, train.max_workers); they can --resume".into(),
        ));
    }
    Ok(())
}

/// For a pipeline job on `workers` workers: `check_world`, then the placement the workers
/// will compute (the same function on the same model), described for the user. None for a
/// job without stages.
pub fn describe_placement(spec: &JobSpec, workers: usize) -> Result<Option<String>> {
    check_world(spec, workers)?;
    let p = &spec.parallel;
    if p.pipeline_stages <= 1 {
        return Ok(None);
    }
    let data = build::load_data(spec)?;
    let (model, _) = build::build_model(&CpuBackend::new(1), spec, data.train.features(), data.train.classes())?;
    pipeline::check_supported(&model)?;
    let (placement, costs) = placement::place(&model, spec)?;
    let how = if p.placement.is_empty() { "balanced by FLOPs and parameters" } else { "explicit" };
    Ok(Some(format!(
        "pipeline: {} stages × {} replicas, {:?}, {} micro-batches; placement {how}:\n{}",
        p.pipeline_stages,
        workers / p.pipeline_stages,
        p.schedule,
        p.micro_batches,
        placement.describe(&costs)
    )))
}

/// Stage `s`'s weight file in the run directory `dir`.
pub fn stage_model_path(dir: &Path, stage: usize) -> PathBuf {
    dir.join(format!("model.safetensors.stage-{stage}"))
}

/// Merges `model.safetensors.stage-S` (S = 0..stages) in `dir` into `model.safetensors`
/// (with stage 0's header: the job and vocabulary) and removes the parts.
pub fn merge_stage_models(dir: &Path, stages: usize) -> Result<()> {
    if stages <= 1 {
        return Ok(());
    }
    let target = dir.join("model.safetensors");
    let metadata = load_metadata(&stage_model_path(dir, 0))?;
    let mut tensors: Vec<FileTensor> = Vec::new();
    for s in 0..stages {
        let mut stage: Vec<_> = load_tensors(&stage_model_path(dir, s))?.into_iter().collect();
        stage.sort_by(|a, b| a.0.cmp(&b.0));
        tensors.extend(stage.into_iter().map(|(name, (shape, values))| (name, shape, values)));
    }
    write_atomic(&target, &to_safetensors_with_metadata(&tensors, Some(metadata))?)?;
    for s in 0..stages {
        let part = stage_model_path(dir, s);
        std::fs::remove_file(&part).map_err(|source| WorkerError::Io { what: "removing", path: part, source })?;
    }
    tracing::info!("merged {stages} stage weight files into {}", target.display());
    Ok(())
}

/// The newest step every stage has a checkpoint of, in `checkpoints/stage-S/`: the path of
/// stage 0's file (each stage reads the same step from its own directory).
pub fn resolve_stage_checkpoint(checkpoints: &Path) -> Result<PathBuf> {
    let mut common: Option<BTreeSet<u64>> = None;
    let mut stages = 0;
    while checkpoints.join(format!("stage-{stages}")).is_dir() {
        let dir = checkpoints.join(format!("stage-{stages}"));
        let steps: BTreeSet<u64> = list_checkpoints(&dir)?.into_iter().map(|(s, _)| s).collect();
        common = Some(match common {
            Some(c) => c.intersection(&steps).copied().collect(),
            None => steps,
        });
        stages += 1;
    }
    let step = common.and_then(|c| c.last().copied()).ok_or_else(|| WorkerError::BadFile {
        path: checkpoints.into(),
        reason: "--resume: no step has a checkpoint of every stage here".into(),
    })?;
    tracing::info!("resuming all {stages} stages from step {step}");
    absolute(checkpoint_path(&checkpoints.join("stage-0"), step))
}

/// What `--resume PATH` continues from, made absolute (the workers may run elsewhere): the
/// checkpoint file given, or a run directory's newest checkpoint (for a pipeline run, the
/// newest step every stage has).
pub fn resolve_resume(path: &Path) -> Result<PathBuf> {
    let checkpoints = path.join("checkpoints");
    if path.is_dir() && checkpoints.join("stage-0").is_dir() {
        return resolve_stage_checkpoint(&checkpoints);
    }
    if path.is_file() {
        return absolute(path.to_path_buf());
    }
    match list_checkpoints(&checkpoints)?.pop() {
        Some((_, newest)) => absolute(newest),
        None => {
            Err(WorkerError::BadFile { path: path.into(), reason: "--resume: no checkpoint in checkpoints/".into() })
        }
    }
}

fn absolute(path: PathBuf) -> Result<PathBuf> {
    std::path::absolute(&path).map_err(|source| WorkerError::Io { what: "resolving", path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_nn::checkpoint::to_safetensors;

    /// A fresh directory under the system's temp dir, removed when dropped.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("lockstep-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn gpt(sets: &[&str]) -> JobSpec {
        let text = std::fs::read_to_string("../configs/shakespeare-gpt.toml").unwrap();
        let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        sets.push("data.dir=\"../data/tinyshakespeare\"".into());
        JobSpec::parse(&text, Path::new("shakespeare-gpt.toml"), &sets).unwrap()
    }

    #[test]
    fn the_world_must_divide_into_stages_and_replicas() {
        assert!(check_world(&gpt(&[]), 3).is_ok(), "no stages: any world");
        let two = gpt(&["parallel.pipeline_stages=2"]);
        assert!(check_world(&two, 4).is_ok());
        let err = check_world(&two, 3).unwrap_err().to_string();
        assert!(err.contains("does not divide the 3 workers"), "{err}");
        let err = check_world(&gpt(&["parallel.pipeline_stages=2", "parallel.data_parallel=3"]), 4).unwrap_err();
        assert!(err.to_string().contains("is 6 workers, but the run has 4"), "{err}");
        let err = check_world(&gpt(&["parallel.pipeline_stages=2", "train.min_workers=2"]), 4).unwrap_err();
        assert!(err.to_string().contains("cannot re-form"), "{err}");
    }

    #[test]
    fn the_placement_is_described_before_any_worker_starts() {
        assert_eq!(describe_placement(&gpt(&[]), 2).unwrap(), None);
        let text = describe_placement(&gpt(&["parallel.pipeline_stages=2"]), 4).unwrap().unwrap();
        assert!(text.starts_with("pipeline: 2 stages × 2 replicas"), "{text}");
        assert!(text.contains("balanced by FLOPs and parameters") && text.contains("tok_emb"), "{text}");
        let err = describe_placement(&gpt(&["parallel.pipeline_stages=2"]), 5).unwrap_err();
        assert!(err.to_string().contains("does not divide"), "{err}");
    }

    #[test]
    fn stage_files_merge_into_one_model_with_stage_zeros_header() {
        let dir = Scratch::new("merge-stages");
        let header = std::collections::HashMap::from([("lockstep.job".to_string(), "name = \"x\"".to_string())]);
        let stage0 = vec![("a.weight".to_string(), vec![2], vec![1.0, 2.0])];
        let stage1 = vec![("b.weight".to_string(), vec![1], vec![3.0]), ("b.bias".to_string(), vec![1], vec![4.0])];
        let bytes0 = to_safetensors_with_metadata(&stage0, Some(header.clone())).unwrap();
        write_atomic(&stage_model_path(&dir.0, 0), &bytes0).unwrap();
        write_atomic(&stage_model_path(&dir.0, 1), &to_safetensors(&stage1).unwrap()).unwrap();
        merge_stage_models(&dir.0, 2).unwrap();
        let merged = dir.0.join("model.safetensors");
        let tensors = load_tensors(&merged).unwrap();
        assert_eq!(tensors.len(), 3);
        assert_eq!(tensors["b.bias"], (vec![1], vec![4.0]));
        assert_eq!(load_metadata(&merged).unwrap()["lockstep.job"], header["lockstep.job"]);
        assert!(!stage_model_path(&dir.0, 0).exists() && !stage_model_path(&dir.0, 1).exists(), "parts removed");
    }

    #[test]
    fn resume_finds_the_newest_step_every_stage_has() {
        let dir = Scratch::new("resume-stages");
        let checkpoints = dir.0.join("checkpoints");
        for (stage, steps) in [(0, vec![10, 20, 30]), (1, vec![10, 20])] {
            let stage_dir = checkpoints.join(format!("stage-{stage}"));
            std::fs::create_dir_all(&stage_dir).unwrap();
            for step in steps {
                std::fs::write(checkpoint_path(&stage_dir, step), b"").unwrap();
            }
        }
        let want = std::path::absolute(checkpoint_path(&checkpoints.join("stage-0"), 20)).unwrap();
        assert_eq!(resolve_resume(&dir.0).unwrap(), want, "stage 1 has no step 30");
        std::fs::remove_file(checkpoint_path(&checkpoints.join("stage-1"), 20)).unwrap();
        std::fs::remove_file(checkpoint_path(&checkpoints.join("stage-1"), 10)).unwrap();
        let err = resolve_resume(&dir.0).unwrap_err().to_string();
        assert!(err.contains("no step has a checkpoint of every stage"), "{err}");
    }

    #[test]
    fn resume_takes_a_file_as_given_or_a_run_directorys_newest_checkpoint() {
        let dir = Scratch::new("resume-plain");
        let err = resolve_resume(&dir.0).unwrap_err().to_string();
        assert!(err.contains("no checkpoint in checkpoints/"), "{err}");
        let checkpoints = dir.0.join("checkpoints");
        std::fs::create_dir_all(&checkpoints).unwrap();
        for step in [5, 50, 7] {
            std::fs::write(checkpoint_path(&checkpoints, step), b"").unwrap();
        }
        assert_eq!(resolve_resume(&dir.0).unwrap(), checkpoint_path(&checkpoints, 50));
        let file = checkpoint_path(&checkpoints, 7);
        assert_eq!(resolve_resume(&file).unwrap(), file);
    }
}
