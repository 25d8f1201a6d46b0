//! Knowledge distillation (T39): the teacher of a `[distill]` job, rebuilt from its model
//! file with its own architecture and run forward only, on every data-parallel rank, on
//! the same (augmented) batch as the student.

use crate::model_file::load_model_for;
use crate::{Result, WorkerError};
use lockstep_kernels::Backend;
use lockstep_nn::loss::Distillation;
use lockstep_nn::{ForwardCtx, Sequential, Tensor};
use lockstep_proto::job::{JobSpec, ModelKind};

pub struct Teacher<B: Backend> {
    model: Sequential<B>,
    /// One example as the teacher takes it ([H, W, C] for a sequential image model); None:
    /// the student's shape.
    input_shape: Option<Vec<usize>>,
    pub loss: Distillation,
}

impl<B: Backend> Teacher<B> {
    /// The job's teacher, or None without a `[distill]` section. A classifier teacher is
    /// built for the student's data: `features` inputs, `classes` outputs.
    pub fn load(be: &B, spec: &JobSpec, features: usize, classes: usize) -> Result<Option<Self>> {
        let Some(d) = &spec.distill else { return Ok(None) };
        let path = &d.teacher;
        let loaded = load_model_for(be, path, Some((features, classes)))
            .map_err(|e| WorkerError::Config(format!("distill.teacher: {e} (train the teacher first)")))?;
        let (mine, theirs) = (&spec.data, &loaded.spec.data);
        if (mine.kind, mine.normalize) != (theirs.kind, theirs.normalize) {
            return Err(WorkerError::Config(format!(
                "distill.teacher: {} was trained on {:?} data normalised {:?}, this job's is {:?} normalised {:?}",
                path.display(),
                theirs.kind,
                theirs.normalize,
                mine.kind,
                mine.normalize
            )));
        }
        let input_shape =
            (loaded.spec.model.kind == ModelKind::Sequential).then(|| loaded.spec.model.input_shape.clone());
        tracing::info!(
            "distilling from {} ({} parameters), temperature {}, alpha {}",
            path.display(),
            loaded.model.params().iter().map(|p| p.numel()).sum::<usize>(),
            d.temperature,
            d.alpha
        );
        let loss = Distillation { temperature: d.temperature, alpha: d.alpha };
        Ok(Some(Self { model: loaded.model, input_shape, loss }))
    }

    /// The teacher's logits for the student's input batch `x` (rows, ...), at eval (no
    /// dropout, running BatchNorm statistics, nothing cached).
    pub fn logits(&mut self, be: &B, x: &Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let rows = x.shape.first().copied().unwrap_or(0);
        let per_example = x.numel() / rows.max(1);
        let mut shape = vec![rows];
        match &self.input_shape {
            Some(own) if own.iter().product::<usize>() == per_example => shape.extend(own),
            Some(own) => {
                return Err(WorkerError::Config(format!(
                    "distill.teacher takes examples of shape {own:?}, the data has {per_example} values per example"
                )))
            }
            None => shape.extend(&x.shape[1..]),
        }
        let input = Tensor { shape, buf: be.duplicate(&x.buf)? };
        let eval = ForwardCtx { train: false, seq_lens: ctx.seq_lens.clone(), ..Default::default() };
        Ok(self.model.forward(be, input, &eval)?)
    }
}
