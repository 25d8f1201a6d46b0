//! Value checks of a job that serde cannot express; each returns the offending dotted key
//! and why. Here rather than in `job` so that `job` (the spec's types) and `toolbox` (the
//! toolbox's types) do not depend on each other.

use crate::job::*;

impl JobSpec {
    /// Value checks serde cannot express. Returns the offending dotted key and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        fn check(ok: bool, key: &str, msg: &str) -> Result<(), (String, String)> {
            if ok {
                Ok(())
            } else {
                Err((key.to_string(), msg.to_string()))
            }
        }
        check(!self.name.trim().is_empty(), "name", "must not be empty")?;
        check(!self.name.contains(['/', '\\']), "name", "must not contain path separators")?;
        check(self.device.parse::<Device>().is_ok(), "device", "must be cpu, cuda or cuda:N")?;
        check(self.model.hidden.iter().all(|&h| h > 0), "model.hidden", "widths must be > 0")?;
        if self.model.kind == ModelKind::Sequential {
            check(!self.model.layers.is_empty(), "model.layers", "a sequential model needs layers")?;
            check(
                matches!(self.model.input_shape.len(), 1 | 3) && self.model.input_shape.iter().all(|&d| d > 0),
                "model.input_shape",
                "must be [H, W, C] or [F] with positive sizes",
            )?;
        }
        if self.model.kind == ModelKind::Gan {
            self.check_gan()?;
        }
        let language_model = matches!(self.model.kind, ModelKind::Gpt | ModelKind::Rnn);
        if language_model {
            self.check_language_model()?;
        }
        check(
            language_model == (self.data.kind == DatasetKind::Text),
            "data.kind",
            "gpt and rnn models train on `text` data; mlp and sequential models on `idx` data",
        )?;
        check(self.data.val_fraction > 0.0 && self.data.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")?;
        check(self.data.stride > 0, "data.stride", "must be > 0")?;
        if self.data.tokenizer == TokenizerKind::Bpe && self.data.tokenizer_file.is_none() {
            let size = self.data.vocab_size;
            check((257..=1 << 20).contains(&size), "data.vocab_size", "must be in 257..=1048576 (256 bytes + merges)")?;
        }
        check((0.0..1.0).contains(&self.model.dropout), "model.dropout", "must be in [0, 1)")?;
        check(self.model.leaky_slope.is_finite(), "model.leaky_slope", "must be finite")?;
        check(self.model.swish_beta.is_finite(), "model.swish_beta", "must be finite")?;
        check(self.train.epochs > 0, "train.epochs", "must be > 0")?;
        check(self.train.batch_size > 0, "train.batch_size", "must be > 0")?;
        check(self.train.accumulate > 0, "train.accumulate", "must be >= 1")?;
        self.check_reproducible()?;
        check(
            self.train.batch_size >= self.train.accumulate,
            "train.accumulate",
            "must not exceed train.batch_size (every micro-batch holds an example)",
        )?;
        check(self.train.log_every > 0, "train.log_every", "must be > 0")?;
        let o = &self.optim;
        check(o.lr.is_finite() && o.lr > 0.0, "optim.lr", "must be a positive number")?;
        check((0.0..1.0).contains(&o.momentum), "optim.momentum", "must be in [0, 1)")?;
        check((0.0..1.0).contains(&o.beta1), "optim.beta1", "must be in [0, 1)")?;
        check((0.0..1.0).contains(&o.beta2), "optim.beta2", "must be in [0, 1)")?;
        check(o.eps > 0.0, "optim.eps", "must be > 0")?;
        check(o.weight_decay >= 0.0, "optim.weight_decay", "must be >= 0")?;
        check(o.l1 >= 0.0, "optim.l1", "must be >= 0")?;
        check(o.l2 >= 0.0, "optim.l2", "must be >= 0")?;
        check(o.clip_norm >= 0.0, "optim.clip_norm", "must be >= 0 (0 = off)")?;
        let s = &self.schedule;
        check(s.warmup_start_lr >= 0.0, "schedule.warmup_start_lr", "must be >= 0")?;
        check(s.min_lr >= 0.0 && s.min_lr <= o.lr, "schedule.min_lr", "must be in [0, optim.lr]")?;
        check(s.step_size > 0, "schedule.step_size", "must be > 0")?;
        check(s.decay_steps > 0, "schedule.decay_steps", "must be > 0")?;
        check(s.gamma > 0.0 && s.gamma <= 1.0, "schedule.gamma", "must be in (0, 1]")?;
        check(s.rate > 0.0 && s.rate <= 1.0, "schedule.rate", "must be in (0, 1]")?;
        toolbox(self)
    }

    /// What a GPT or RNN language model needs of `[model]`.
    fn check_language_model(&self) -> Result<(), (String, String)> {
        let m = &self.model;
        check(m.context > 0, "model.context", "a language model needs context > 0 tokens")?;
        check(m.dim > 0, "model.dim", "a language model needs dim > 0")?;
        check(m.blocks > 0, "model.blocks", "a language model needs at least one block")?;
        if m.kind == ModelKind::Gpt {
            check(m.heads > 0 && m.dim.is_multiple_of(m.heads), "model.heads", "must be > 0 and divide model.dim")?;
            if m.positional == PositionalKind::Rope {
                let even = (m.dim / m.heads.max(1)).is_multiple_of(2);
                check(even, "model.positional", "rope rotates pairs: dim / heads must be even")?;
                check(m.rope_base.is_finite() && m.rope_base > 1.0, "model.rope_base", "must be a number > 1")?;
            }
        }
        Ok(())
    }

    /// What a GAN needs: both networks, an image shape, and none of the training modes
    /// built around one model's single loss.
    fn check_gan(&self) -> Result<(), (String, String)> {
        let m = &self.model;
        let why = "is not supported with model.kind = \"gan\"";
        check(!m.generator.is_empty(), "model.generator", "a GAN needs generator layers")?;
        check(!m.discriminator.is_empty(), "model.discriminator", "a GAN needs discriminator layers")?;
        check(m.noise_dim > 0, "model.noise_dim", "must be > 0")?;
        check(
            m.discriminator_lr_scale.is_finite() && m.discriminator_lr_scale > 0.0,
            "model.discriminator_lr_scale",
            "must be > 0",
        )?;
        check(
            matches!(m.input_shape.len(), 1 | 3) && m.input_shape.iter().all(|&d| d > 0),
            "model.input_shape",
            "a GAN needs the image shape [H, W, C] or [F]",
        )?;
        check(self.parallel.pipeline_stages == 1, "parallel.pipeline_stages", why)?;
        check(self.parallel.zero == 0, "parallel.zero", why)?;
        check(self.train.reproducible == Reproducible::SameWorldSize, "train.reproducible", why)?;
        check(self.train.accumulate == 1, "train.accumulate", why)?;
        check(self.distill.is_none(), "distill", why)?;
        check(self.finetune.lora.is_none() && self.finetune.init_from.is_none(), "finetune", why)?;
        check(!self.precision.scaling(), "precision.loss_scale", why)?;
        check(self.data.resample == crate::toolbox::Resample::None, "data.resample", why)?;
        Ok(())
    }

    /// What `train.reproducible = "any-world-size"` needs of the rest of the job.
    fn check_reproducible(&self) -> Result<(), (String, String)> {
        if self.train.reproducible != crate::job::Reproducible::AnyWorldSize {
            return Ok(());
        }
        let check = |ok: bool, key: &str, msg: &str| if ok { Ok(()) } else { Err((key.to_string(), msg.to_string())) };
        let why = "is not supported with train.reproducible = \"any-world-size\"";
        check(self.train.micro_shards >= 1, "train.micro_shards", "must be >= 1")?;
        check(
            self.train.batch_size >= self.train.micro_shards,
            "train.micro_shards",
            "must not exceed train.batch_size (every shard holds an example)",
        )?;
        check(self.train.accumulate == 1, "train.accumulate", "must be 1: the micro-shards split the batch")?;
        check(self.parallel.pipeline_stages == 1, "parallel.pipeline_stages", why)?;
        check(!self.model.sync_batch_norm, "model.sync_batch_norm", why)?;
        Ok(())
    }
}

/// `Err((key, why))` unless `ok`.
fn check(ok: bool, key: &str, msg: &str) -> Result<(), (String, String)> {
    if ok {
        Ok(())
    } else {
        Err((key.to_string(), msg.to_string()))
    }
}

/// Checks of `[parallel]`: pipeline stages, micro-batches, placement and ZeRO.
fn check_parallel(spec: &JobSpec) -> Result<(), (String, String)> {
    let par = &spec.parallel;
    check(par.pipeline_stages >= 1, "parallel.pipeline_stages", "must be >= 1")?;
    check(par.micro_batches >= 1, "parallel.micro_batches", "must be >= 1")?;
    check(
        par.placement.is_empty() || par.placement.len() == par.pipeline_stages,
        "parallel.placement",
        "must list one array of layer names per pipeline stage",
    )?;
    check(par.zero <= 2, "parallel.zero", "must be 0, 1 or 2")?;
    if par.zero > 0 {
        let why = "is not supported with parallel.zero > 0";
        check(par.pipeline_stages == 1, "parallel.pipeline_stages", why)?;
        check(spec.train.reproducible == crate::job::Reproducible::SameWorldSize, "train.reproducible", why)?;
        check(
            spec.precision.allreduce == crate::toolbox::Dtype::Fp32,
            "precision.allreduce",
            "must be fp32 with parallel.zero > 0",
        )?;
    }
    if par.pipeline_stages > 1 {
        check(
            spec.train.batch_size >= par.micro_batches * spec.train.accumulate * par.data_parallel.max(1),
            "parallel.micro_batches",
            "needs train.batch_size >= micro_batches × train.accumulate × data_parallel (every micro-batch non-empty)",
        )?;
        check(!spec.model.sync_batch_norm, "model.sync_batch_norm", "is not supported with pipeline stages")?;
    }
    Ok(())
}

/// Checks of the toolbox keys; returns the offending dotted key and why.
fn toolbox(spec: &JobSpec) -> Result<(), (String, String)> {
    let p = &spec.precision;
    check(p.loss_scale.is_finite() && p.loss_scale >= 1.0, "precision.loss_scale", "must be a finite number >= 1")?;
    check(p.growth_interval > 0, "precision.growth_interval", "must be > 0")?;
    let t = &spec.train;
    check((0.0..1.0).contains(&t.ema_decay), "train.ema_decay", "must be in [0, 1) (0 = off)")?;
    check(!t.eval_ema || t.ema_decay > 0.0, "train.eval_ema", "needs train.ema_decay > 0")?;
    if let Some(e) = &t.early_stop {
        check(e.patience > 0, "train.early_stop.patience", "must be > 0")?;
        check(e.min_delta >= 0.0, "train.early_stop.min_delta", "must be >= 0")?;
    }
    check(t.blowup.window >= 2, "train.blowup.window", "must be >= 2")?;
    check(t.blowup.factor > 1.0, "train.blowup.factor", "must be > 1")?;
    check(t.blowup.min_jump >= 0.0, "train.blowup.min_jump", "must be >= 0")?;
    check(t.blowup.spread >= 0.0, "train.blowup.spread", "must be >= 0")?;
    check(t.checkpoint_minutes.is_finite() && t.checkpoint_minutes >= 0.0, "train.checkpoint_minutes", "must be >= 0")?;
    check(t.class_weights.iter().all(|w| w.is_finite() && *w >= 0.0), "train.class_weights", "must be >= 0")?;
    check(
        t.class_weights.is_empty() || !t.balanced_class_weights,
        "train.balanced_class_weights",
        "cannot be combined with explicit train.class_weights",
    )?;
    check(t.peak_gflops >= 0.0 && t.peak_gflops.is_finite(), "train.peak_gflops", "must be >= 0")?;
    let d = &spec.data;
    check((0.0..1.0).contains(&d.positive_fraction), "data.positive_fraction", "must be in [0, 1)")?;
    check(
        d.positive_fraction == 0.0 || d.binary_positive.is_some(),
        "data.positive_fraction",
        "needs data.binary_positive",
    )?;
    let mut seen = std::collections::HashSet::new();
    check(d.labels.iter().all(|l| seen.insert(*l)), "data.labels", "lists a label twice")?;
    if let Some(positive) = d.binary_positive {
        let classes = if d.labels.is_empty() { u32::MAX } else { d.labels.len() as u32 };
        check(positive < classes, "data.binary_positive", "is not one of the (renumbered) labels")?;
    }
    check_parallel(spec)?;
    if let Some(d) = &spec.distill {
        check(d.temperature.is_finite() && d.temperature > 0.0, "distill.temperature", "must be > 0")?;
        check((0.0..=1.0).contains(&d.alpha), "distill.alpha", "must be in [0, 1]")?;
        check(spec.parallel.pipeline_stages == 1, "distill", "is not supported with pipeline stages")?;
    }
    let f = &spec.finetune;
    for g in &f.lr_groups {
        check(g.lr_scale.is_finite() && g.lr_scale >= 0.0, "finetune.lr_groups", "lr_scale must be >= 0")?;
        check(!g.layers.is_empty(), "finetune.lr_groups", "each group needs layers")?;
    }
    if let Some(l) = &f.lora {
        check(l.rank > 0, "finetune.lora.rank", "must be > 0")?;
        check(!l.layers.is_empty(), "finetune.lora.layers", "must name at least one Linear layer")?;
        check(l.alpha.is_finite() && l.alpha > 0.0, "finetune.lora.alpha", "must be > 0")?;
    }
    Ok(())
}
