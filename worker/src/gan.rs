//! Generative adversarial networks (T43, `model.kind = "gan"`). A generator G maps seeded
//! normal noise to an image; a discriminator D maps an image to two logits (fake, real).
//! Softmax over two logits is the sigmoid of their difference, so the usual binary GAN
//! loss is the two-class cross-entropy, on the same fused kernel as every classifier.
//!
//! Both networks live in one layer stack [G | D] (`g.l*` then `d.l*`): checkpoints, model
//! files, weight hashes and the EMA cover both with no special case. Each step:
//!   1. D step: D on [real; G(z₁)] with targets [real; fake]; D's gradients are summed
//!      over ranks in D's own buckets; D's parameters move, G's do not.
//!   2. G step: D(G(z₂)) with target real (the non-saturating loss); the gradient flows
//!      back through D into G; G's gradients are summed in G's buckets (the run's
//!      reducer); G's parameters move, D's do not.
//!
//! Noise is a pure function of (run seed, step, phase, example id), so every rank draws
//! the noise of its own examples and a run reproduces bit for bit.

use crate::trainer::{backward_into, GradReducer, StepStats, Trainer};
use crate::{Result, WorkerError};
use lockstep_kernels::Backend;
use lockstep_nn::data::Examples;
use lockstep_nn::loss::softmax_cross_entropy;
use lockstep_nn::optim::{clip_factor, grad_sum_squares};
use lockstep_nn::rng::Stream;
use lockstep_nn::{ForwardCtx, Sequential, Tensor};
use lockstep_proto::JobSpec;
use std::ops::Range;
use std::time::Instant;

/// The discriminator's target classes.
pub const FAKE: u32 = 0;
pub const REAL: u32 = 1;

/// Which noise a forward draws: the D step's, the G step's, or the fixed evaluation noise.
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
pub enum Phase {
    Discriminator = 0,
    Generator = 1,
    Eval = 2,
}

/// Where G and D sit in the trainer's layer stack, and D's gradient reducer.
pub struct Gan<B: Backend> {
    /// Layers [0, g_layers) are G's, the rest D's.
    pub g_layers: usize,
    /// Parameters [0, g_params) of `model.params()` are G's, the rest D's.
    pub g_params: usize,
    pub noise_dim: usize,
    pub image_shape: Vec<usize>,
    /// D's reducer: a sibling of the run's (G's), over the same links.
    pub d_reducer: Box<dyn GradReducer<B>>,
}

/// The [G | D] stack of a GAN job and the shape of one image.
pub fn build_gan<B: Backend>(be: &B, spec: &JobSpec, features: usize) -> Result<(Sequential<B>, Vec<usize>)> {
    use crate::sequential::{build_layers, LayerList};
    let m = &spec.model;
    let image = m.input_shape.clone();
    if image.iter().product::<usize>() != features {
        return Err(WorkerError::Config(format!(
            "model.input_shape {image:?} does not hold the data's {features} values per image"
        )));
    }
    let noise = [m.noise_dim];
    let g = LayerList { key: "model.generator", layers: &m.generator, input_shape: &noise, prefix: "g." };
    let (mut layers, g_out) = build_layers(be, spec, g)?;
    if g_out != image {
        return Err(WorkerError::Config(format!(
            "model.generator outputs {g_out:?} per example; the images are {image:?}"
        )));
    }
    let d = LayerList { key: "model.discriminator", layers: &m.discriminator, input_shape: &image, prefix: "d." };
    let (d_layers, d_out) = build_layers(be, spec, d)?;
    if d_out != [2] {
        return Err(WorkerError::Config(format!(
            "model.discriminator outputs {d_out:?}; it must end in 2 logits (fake, real): linear out = 2"
        )));
    }
    // D's input gradient is what trains G.
    layers.extend(d_layers);
    let mut model = Sequential::new(layers);
    if let Some(first_d) = model.layers.get_mut(m.generator.len()) {
        first_d.set_input_grad(true);
    }
    Ok((model, image))
}

impl<B: Backend> Gan<B> {
    /// The GAN of a `[G | D]` stack built by `build_gan` (None for other models).
    pub fn of(spec: &JobSpec, model: &Sequential<B>) -> Option<Self> {
        if spec.model.kind != lockstep_proto::job::ModelKind::Gan {
            return None;
        }
        let g_layers = spec.model.generator.len();
        let g_params = model.layers[..g_layers].iter().map(|l| l.params().len()).sum();
        Some(Self {
            g_layers,
            g_params,
            noise_dim: spec.model.noise_dim,
            image_shape: spec.model.input_shape.clone(),
            d_reducer: Box::new(crate::NoReduce),
        })
    }

    fn g(&self) -> Range<usize> {
        0..self.g_layers
    }

    fn d(&self, model: &Sequential<B>) -> Range<usize> {
        self.g_layers..model.layers.len()
    }

    /// Each reducer's share of `sizes` (every parameter's, None if frozen): (G's, D's).
    pub fn split_sizes(&self, sizes: &[Option<usize>]) -> (Vec<Option<usize>>, Vec<Option<usize>>) {
        let keep = |mine: bool, s: &Option<usize>| if mine { *s } else { None };
        let g = sizes.iter().enumerate().map(|(i, s)| keep(i < self.g_params, s)).collect();
        let d = sizes.iter().enumerate().map(|(i, s)| keep(i >= self.g_params, s)).collect();
        (g, d)
    }
}

/// The blow-up guard (T36) of a job: a GAN's losses rise and fall against each other by
/// design (G's loss climbs while D wins), which the guard would read as a divergence, so a
/// GAN is watched for non-finite losses only (`gan_step`).
pub fn blowup_spec(spec: &JobSpec) -> lockstep_proto::toolbox::BlowupSpec {
    let mut blowup = spec.train.blowup.clone();
    if spec.model.kind == lockstep_proto::job::ModelKind::Gan {
        blowup.action = lockstep_proto::toolbox::BlowupAction::Off;
    }
    blowup
}

/// `noise_dim` normals for each of `ids`, from (seed, step, phase, id): (N, noise_dim).
pub fn noise(seed: u64, step: u64, phase: Phase, ids: &[u64], noise_dim: usize) -> Vec<f32> {
    let mut z = Vec::with_capacity(ids.len() * noise_dim);
    for &id in ids {
        let mut stream = Stream::new(seed, "gan.noise", &[step, phase as u64, id]);
        z.extend((0..noise_dim).map(|_| stream.normal()));
    }
    z
}

/// G's images for the noise of `ids`: (N, image...). `train` runs G in training mode.
pub fn generate<B: Backend>(
    be: &B,
    model: &mut Sequential<B>,
    spec: &JobSpec,
    (step, phase): (u64, Phase),
    ids: &[u64],
    train: bool,
) -> Result<Tensor<B>> {
    let m = &spec.model;
    let z = noise(spec.seed, step, phase, ids, m.noise_dim);
    let z = Tensor::from_slice(be, &[ids.len(), m.noise_dim], &z)?; // (N, noise_dim)
    let ctx = ForwardCtx { train, seed: spec.seed, step, example_ids: ids.to_vec(), ..Default::default() };
    Ok(model.forward_layers(be, 0..m.generator.len(), z, &ctx)?)
}

/// Rows of `a` then rows of `b`, on the device: (Na + Nb, ...).
fn stack_rows<B: Backend>(be: &B, a: &Tensor<B>, b: &Tensor<B>) -> Result<Tensor<B>> {
    let (la, lb) = (be.len(&a.buf), be.len(&b.buf));
    let mut buf = be.zeros(la + lb)?;
    be.copy_range(&a.buf, 0, &mut buf, 0, la)?;
    be.copy_range(&b.buf, 0, &mut buf, la, lb)?;
    let mut shape = a.shape.clone();
    shape[0] += b.shape[0];
    Ok(Tensor { shape, buf })
}

/// What the D step reports: its loss and accuracy over the global batch, and its wait.
struct DStep {
    loss: f64,
    accuracy: f64,
    comm_wait_s: f64,
}

impl<B: Backend> Trainer<B> {
    /// One GAN step on this rank's `local` examples: D, then G (see the module comment).
    pub(crate) fn gan_step(
        &mut self,
        gan: &mut Gan<B>,
        data: &dyn Examples,
        local: &[u32],
        reducer: &mut dyn GradReducer<B>,
    ) -> Result<StepStats> {
        crate::trace::set_step(self.global_step);
        let d = self.discriminator_step(gan, data, local)?;
        let mut stats = self.generator_step(gan, local, reducer)?;
        if !(d.loss.is_finite() && stats.loss.is_finite() && stats.grad_norm.is_finite()) {
            return Err(WorkerError::Stopped(format!(
                "GAN diverged at step {}: D loss {}, G loss {}, G gradient norm {}",
                self.global_step - 1,
                d.loss,
                stats.loss,
                stats.grad_norm
            )));
        }
        stats.comm_wait_s += d.comm_wait_s;
        stats.parts = vec![("d_loss", d.loss), ("g_loss", stats.loss), ("d_accuracy", d.accuracy)];
        Ok(stats)
    }

    fn ctx(&self, ids: Vec<u64>) -> ForwardCtx {
        ForwardCtx { train: true, seed: self.spec.seed, step: self.global_step, example_ids: ids, ..Default::default() }
    }

    /// D on this rank's real images and as many fakes; D's gradients reduced in its own
    /// buckets; D's parameters updated with its learning rate.
    fn discriminator_step(&mut self, gan: &mut Gan<B>, data: &dyn Examples, local: &[u32]) -> Result<DStep> {
        self.model.zero_grad(&self.be)?;
        let n = local.len();
        let mut scalars = [0.0; 3]; // loss sum, targets, correct
        if n > 0 {
            let ids: Vec<u64> = local.iter().map(|&i| i as u64).collect();
            let batch = self.gather(data, local);
            let real = self.input(n, &batch.x)?; // (n, H, W, C)
            let fake =
                generate(&self.be, &mut self.model, &self.spec, (self.global_step, Phase::Discriminator), &ids, true)?;
            let both = stack_rows(&self.be, &real, &fake)?; // (2n, H, W, C)
                                                            // The fakes' ids follow the data's, so dropout masks differ from the reals'.
            let offset = data.len() as u64;
            let ctx = self.ctx(ids.iter().copied().chain(ids.iter().map(|i| i + offset)).collect());
            let logits = self.model.forward_layers(&self.be, gan.d(&self.model), both, &ctx)?; // (2n, 2)
            let targets: Vec<u32> = [REAL, FAKE].iter().flat_map(|&t| std::iter::repeat_n(t, n)).collect();
            let out = softmax_cross_entropy(&self.be, &logits, &targets, None, 1.0)?;
            scalars = [out.loss_sum, 2.0 * n as f64, out.correct as f64];
            gan.d_reducer.stage_scalars(&scalars);
            let d_layers = gan.d(&self.model);
            backward_into(&self.be, &mut self.model, d_layers, out.grad, gan.d_reducer.as_mut())?;
        } else {
            gan.d_reducer.stage_scalars(&scalars);
            gan.d_reducer.grads_ready(&self.be, 0, &self.model.params())?;
        }
        let waiting = Instant::now();
        let mut params = self.model.params_mut();
        gan.d_reducer.finish_grads(&self.be, &mut params, &mut scalars)?;
        let comm_wait_s = waiting.elapsed().as_secs_f64();
        let targets = scalars[1].max(1.0);
        let grad_norm = grad_sum_squares(&self.be, &params[gan.g_params..])?.sqrt() / targets;
        let scale = clip_factor(grad_norm, self.spec.optim.clip_norm) / targets;
        let lr = self.schedule.lr(self.global_step) * self.spec.model.discriminator_lr_scale;
        let all = gan.g_params..params.len();
        self.optimizer.update_range(&self.be, &mut params, all, lr, scale as f32)?;
        Ok(DStep { loss: scalars[0] / targets, accuracy: scalars[2] / targets, comm_wait_s })
    }

    /// D(G(z)) with target real; the gradient through D into G, reduced in G's buckets
    /// (the run's reducer, which also carries the stop/checkpoint votes); G updated.
    fn generator_step(
        &mut self,
        gan: &mut Gan<B>,
        local: &[u32],
        reducer: &mut dyn GradReducer<B>,
    ) -> Result<StepStats> {
        // D's gradients of its own step are spent; those of this backward are not used.
        self.model.zero_grad(&self.be)?;
        let n = local.len();
        let [stop_vote, checkpoint_vote] = self.votes();
        let mut scalars = [0.0, 0.0, stop_vote, checkpoint_vote];
        if n > 0 {
            let ids: Vec<u64> = local.iter().map(|&i| i as u64).collect();
            let fake =
                generate(&self.be, &mut self.model, &self.spec, (self.global_step, Phase::Generator), &ids, true)?;
            let ctx = self.ctx(ids);
            let logits = self.model.forward_layers(&self.be, gan.d(&self.model), fake, &ctx)?; // (n, 2)
            let out = softmax_cross_entropy(&self.be, &logits, &vec![REAL; n], None, 1.0)?;
            (scalars[0], scalars[1]) = (out.loss_sum, n as f64);
            reducer.stage_scalars(&scalars);
            let d_fake = self.model.backward_layers(
                &self.be,
                gan.d(&self.model),
                out.grad,
                usize::MAX,
                &mut |_, _, _| Ok(()),
            )?;
            backward_into(&self.be, &mut self.model, gan.g(), d_fake, reducer)?;
        } else {
            reducer.stage_scalars(&scalars);
            reducer.grads_ready(&self.be, 0, &self.model.params())?;
        }
        let waiting = Instant::now();
        let mut params = self.model.params_mut();
        reducer.finish_grads(&self.be, &mut params, &mut scalars)?;
        let comm_wait_s = waiting.elapsed().as_secs_f64();
        let squared_norm = grad_sum_squares(&self.be, &params[..gan.g_params])?;
        drop(params);
        let mut stats = self.apply_update_of(0..gan.g_params, [scalars[0], scalars[1]], squared_norm, comm_wait_s)?;
        stats.stop_requested = scalars[2] > 0.5;
        stats.checkpoint_requested = scalars[3] > 0.5;
        Ok(stats)
    }

    /// The GAN's evaluation on the test split: D's loss and accuracy on the real test
    /// images and as many fakes from fixed noise (the same at every evaluation).
    pub(crate) fn evaluate_gan(&mut self, gan: &Gan<B>, data: &dyn Examples) -> Result<crate::trainer::Evaluation> {
        let (mut loss, mut correct, mut targets) = (0.0, 0usize, 0usize);
        let indices: Vec<u32> = (0..data.len() as u32).collect();
        for chunk in indices.chunks(crate::evaluation::eval_chunk_len(data)) {
            let ids: Vec<u64> = chunk.iter().map(|&i| i as u64).collect();
            let real = self.input(chunk.len(), &data.gather(chunk).x)?;
            let fake = generate(&self.be, &mut self.model, &self.spec, (0, Phase::Eval), &ids, false)?;
            let ctx = ForwardCtx { train: false, seed: self.spec.seed, ..Default::default() };
            for (images, target) in [(real, REAL), (fake, FAKE)] {
                let logits = self.model.forward_layers(&self.be, gan.d(&self.model), images, &ctx)?;
                let out = softmax_cross_entropy(&self.be, &logits, &vec![target; chunk.len()], None, 1.0)?;
                (loss, correct, targets) = (loss + out.loss_sum, correct + out.correct, targets + chunk.len());
            }
        }
        let n = targets.max(1) as f64;
        Ok(crate::trainer::Evaluation { loss: loss / n, accuracy: correct as f64 / n, targets, classes: None })
    }
}

/// Images drawn from a trained generator, in raw pixel units (the data's, before
/// normalisation): (count, image...).
pub struct Generated {
    pub image_shape: Vec<usize>,
    pub pixels: Vec<f32>,
}

impl Generated {
    pub fn count(&self) -> usize {
        self.pixels.len() / self.image_shape.iter().product::<usize>().max(1)
    }
}

/// `count` images from the GAN model file `path`, noise from `seed` (eval mode), mapped
/// back from the normalised space the GAN was trained in to raw pixels.
pub fn sample_images<B: Backend>(be: &B, path: &std::path::Path, count: usize, seed: u64) -> Result<Generated> {
    let mut loaded = crate::model_file::load_model(be, path)?;
    if loaded.spec.model.kind != lockstep_proto::job::ModelKind::Gan {
        return Err(WorkerError::BadFile { path: path.into(), reason: "not a GAN (model.kind is not \"gan\")".into() });
    }
    let (normalizer, _) = crate::build::image_normalizer(&loaded.spec)?;
    let spec = JobSpec { seed, ..loaded.spec.clone() };
    let mut pixels = Vec::with_capacity(count * spec.model.input_shape.iter().product::<usize>());
    let ids: Vec<u64> = (0..count as u64).collect();
    for chunk in ids.chunks(256) {
        let images = generate(be, &mut loaded.model, &spec, (0, Phase::Eval), chunk, false)?;
        let normalised = be.download(&images.buf)?;
        let raw = normalizer
            .invert(&normalised)
            .ok_or_else(|| WorkerError::Config("data.normalize = \"l2\" cannot be undone: no pixels to draw".into()))?;
        pixels.extend(raw);
    }
    Ok(Generated { image_shape: spec.model.input_shape.clone(), pixels })
}

/// What a classifier makes of generated images.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub images: usize,
    /// Images whose most likely class has probability >= the threshold.
    pub confident: usize,
    pub threshold: f32,
    /// Images per predicted class.
    pub per_class: Vec<usize>,
    pub mean_confidence: f64,
}

/// Runs the classifier model file `classifier` (trained by lockstep on images of the same
/// shape) on `images`, normalised as its own training data was.
pub fn classify<B: Backend>(
    be: &B,
    classifier: &std::path::Path,
    images: &Generated,
    threshold: f32,
) -> Result<Verdict> {
    let metadata = lockstep_nn::checkpoint::load_metadata(classifier)?;
    let header = metadata.get(crate::model_file::JOB_KEY).ok_or_else(|| WorkerError::BadFile {
        path: classifier.into(),
        reason: "no lockstep.job in the header: not written by lockstep train".into(),
    })?;
    let spec = JobSpec::parse(header, classifier, &[])?;
    let (normalizer, classes) = crate::build::image_normalizer(&spec)?;
    let features: usize = images.image_shape.iter().product();
    let mut loaded = crate::model_file::load_model_for(be, classifier, Some((features, classes)))?;
    let input_shape = match spec.model.kind {
        lockstep_proto::job::ModelKind::Sequential => spec.model.input_shape.clone(),
        _ => vec![features],
    };
    if input_shape.iter().product::<usize>() != features {
        return Err(WorkerError::Config(format!(
            "{} takes inputs {input_shape:?}; the images are {:?}",
            classifier.display(),
            images.image_shape
        )));
    }
    let mut verdict =
        Verdict { images: images.count(), confident: 0, threshold, per_class: vec![0; classes], mean_confidence: 0.0 };
    let ctx = ForwardCtx { train: false, ..Default::default() };
    for chunk in images.pixels.chunks(256 * features) {
        let rows = chunk.len() / features;
        let mut x = chunk.to_vec();
        normalizer.apply_rows(&mut x, features);
        let input = Tensor::from_slice(be, &[&[rows][..], &input_shape].concat(), &x)?;
        let logits = loaded.model.forward(be, input, &ctx)?; // (rows, classes)
        let mut probs = be.zeros(rows * classes)?;
        be.softmax(&logits.buf, &mut probs, rows, classes)?;
        for row in be.download(&probs)?.chunks(classes) {
            let (class, p) =
                row.iter().enumerate().fold((0, 0.0f32), |best, (c, &p)| if p > best.1 { (c, p) } else { best });
            verdict.per_class[class] += 1;
            verdict.confident += usize::from(p >= threshold);
            verdict.mean_confidence += p as f64;
        }
    }
    verdict.mean_confidence /= verdict.images.max(1) as f64;
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_kernels::CpuBackend;
    use lockstep_nn::data::Dataset;

    /// A small GAN over 12-value "images": G 4 -> 8 -> 12, D 12 -> 6 -> 2.
    fn trainer() -> Trainer<CpuBackend> {
        let text = r#"
name = "gan-test"
seed = 3
[model]
kind = "gan"
input_shape = [12]
noise_dim = 4
leaky_slope = 0.2
generator = [{ type = "linear", out = 8 }, { type = "relu" }, { type = "linear", out = 12 }, { type = "sigmoid" }]
discriminator = [{ type = "linear", out = 6 }, { type = "leaky_relu" }, { type = "linear", out = 2 }]
[data]
kind = "idx"
dir = "unused"
[train]
epochs = 1
batch_size = 8
[optim]
kind = "adam"
lr = 0.01
beta1 = 0.5
"#;
        let spec = JobSpec::parse(text, std::path::Path::new("gan.toml"), &[]).unwrap();
        Trainer::new(CpuBackend::new(1), &spec, 12, 2, 10).unwrap()
    }

    fn data() -> Dataset {
        let mut s = Stream::new(1, "gan-test-data", &[]);
        Dataset { features: 12, classes: 1, x: (0..32 * 12).map(|_| s.uniform()).collect(), y: vec![0; 32] }
    }

    fn values(t: &Trainer<CpuBackend>, range: Range<usize>) -> Vec<Vec<f32>> {
        t.model.params()[range].iter().map(|p| p.value.clone()).collect()
    }

    #[test]
    fn each_update_moves_its_own_network_only() {
        let (mut t, data) = (trainer(), data());
        let mut gan = t.gan.take().unwrap();
        let (g, d) = (0..gan.g_params, gan.g_params..t.model.params().len());
        assert_eq!((g.len(), d.len()), (4, 4), "two linear layers each");
        let local: Vec<u32> = (0..8).collect();
        let (g0, d0) = (values(&t, g.clone()), values(&t, d.clone()));
        t.discriminator_step(&mut gan, &data, &local).unwrap();
        let (g1, d1) = (values(&t, g.clone()), values(&t, d.clone()));
        assert_eq!(g0, g1, "the discriminator's step moved the generator");
        assert!(d0.iter().zip(&d1).all(|(a, b)| a != b), "every discriminator tensor moves");
        let mut reducer = crate::NoReduce;
        let stats = t.generator_step(&mut gan, &local, &mut reducer).unwrap();
        let (g2, d2) = (values(&t, g.clone()), values(&t, d.clone()));
        assert_eq!(d1, d2, "the generator's step moved the discriminator");
        assert!(g1.iter().zip(&g2).all(|(a, b)| a != b), "every generator tensor moves");
        assert_eq!(t.global_step, 1);
        assert!(stats.loss.is_finite() && stats.grad_norm > 0.0, "{stats:?}");
        // One step counted for Adam's bias correction, not two.
        assert_eq!(t.optimizer.step, 1);
    }

    /// The generator's loss, D(G(z)) against "real", summed over the batch of `ids`.
    fn generator_loss(t: &mut Trainer<CpuBackend>, gan: &Gan<CpuBackend>, ids: &[u64]) -> f64 {
        let fake = generate(&t.be, &mut t.model, &t.spec, (0, Phase::Generator), ids, true).unwrap();
        let ctx = ForwardCtx { train: true, ..Default::default() };
        let logits = t.model.forward_layers(&t.be, gan.d(&t.model), fake, &ctx).unwrap();
        softmax_cross_entropy(&t.be, &logits, &vec![REAL; ids.len()], None, 1.0).unwrap().loss_sum
    }

    #[test]
    fn the_generator_gradient_through_the_discriminator_matches_finite_differences() {
        let mut t = trainer();
        let gan = t.gan.take().unwrap();
        let ids: Vec<u64> = (0..6).collect();
        // Analytic: backward through D into G, as generator_step does.
        t.model.zero_grad(&t.be).unwrap();
        let fake = generate(&t.be, &mut t.model, &t.spec, (0, Phase::Generator), &ids, true).unwrap();
        let ctx = ForwardCtx { train: true, ..Default::default() };
        let logits = t.model.forward_layers(&t.be, gan.d(&t.model), fake, &ctx).unwrap();
        let out = softmax_cross_entropy(&t.be, &logits, &vec![REAL; ids.len()], None, 1.0).unwrap();
        let d_fake =
            t.model.backward_layers(&t.be, gan.d(&t.model), out.grad, usize::MAX, &mut |_, _, _| Ok(())).unwrap();
        t.model.backward_layers(&t.be, gan.g(), d_fake, usize::MAX, &mut |_, _, _| Ok(())).unwrap();
        let analytic: Vec<Vec<f32>> = t.model.params()[..gan.g_params].iter().map(|p| p.grad.clone()).collect();
        let h = 1e-2f32;
        for (param, grads) in analytic.iter().enumerate() {
            for i in (0..grads.len()).step_by(7) {
                let mut at = |delta: f32| {
                    t.model.params_mut()[param].value[i] += delta;
                    let loss = generator_loss(&mut t, &gan, &ids);
                    t.model.params_mut()[param].value[i] -= delta;
                    loss
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
                let err = (numeric - grads[i] as f64).abs();
                assert!(
                    err < 2e-3 + 2e-2 * numeric.abs(),
                    "param {param}[{i}]: analytic {} numeric {numeric}",
                    grads[i]
                );
            }
        }
    }

    #[test]
    fn noise_is_a_function_of_seed_step_phase_and_example() {
        let a = noise(1, 5, Phase::Generator, &[3, 4], 8);
        assert_eq!(a, noise(1, 5, Phase::Generator, &[3, 4], 8));
        assert_eq!(a[8..], noise(1, 5, Phase::Generator, &[4], 8)[..], "an example's noise is its own");
        assert_ne!(a, noise(1, 5, Phase::Discriminator, &[3, 4], 8));
        assert_ne!(a, noise(1, 6, Phase::Generator, &[3, 4], 8));
        assert_ne!(a, noise(2, 5, Phase::Generator, &[3, 4], 8));
        let mean = a.iter().sum::<f32>() / 16.0;
        assert!(mean.abs() < 1.0 && a.iter().all(|v| v.is_finite()));
    }
}
