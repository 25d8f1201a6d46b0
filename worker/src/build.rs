//! Job spec -> model, optimizer, schedule, data.

use crate::{Result, WorkerError};
use lockstep_kernels::{Activation, Backend};
use lockstep_nn::data::text::Tokenizer;
use lockstep_nn::data::{load_idx_split, Dataset, Examples, Normalization, Normalizer};
use lockstep_nn::init::{kaiming_normal, xavier_uniform};
use lockstep_nn::layers::{Act, Dropout, Linear};
use lockstep_nn::optim::{OptimizerConfig, Rule};
use lockstep_nn::schedule::{Decay, Schedule};
use lockstep_nn::{Layer, Sequential};
use lockstep_proto::job::{
    ActivationKind, DatasetKind, InitKind, JobSpec, ModelKind, Normalize, OptimizerKind, ScheduleKind,
};

pub fn activation(spec: &JobSpec) -> Activation {
    let m = &spec.model;
    match m.activation {
        ActivationKind::Sigmoid => Activation::Sigmoid,
        ActivationKind::Tanh => Activation::Tanh,
        ActivationKind::Relu => Activation::Relu,
        ActivationKind::LeakyRelu => Activation::LeakyRelu { slope: m.leaky_slope },
        ActivationKind::Silu => Activation::Swish { beta: 1.0 },
        ActivationKind::Swish => Activation::Swish { beta: m.swish_beta },
        ActivationKind::Gelu => Activation::Gelu,
    }
}

/// The MLP of the spec: [Linear → activation → dropout?]* → Linear (logits).
/// Init (T18) `auto`: Kaiming normal before ReLU-family activations, Xavier uniform before
/// sigmoid/tanh and for the output layer.
pub fn build_mlp<B: Backend>(be: &B, spec: &JobSpec, features: usize, classes: usize) -> Result<Sequential<B>> {
    let act = activation(spec);
    let saturating = matches!(spec.model.activation, ActivationKind::Sigmoid | ActivationKind::Tanh);
    let mut widths = vec![features];
    widths.extend(&spec.model.hidden);
    widths.push(classes);
    let mut layers: Vec<Box<dyn Layer<B>>> = Vec::new();
    let n_linear = widths.len() - 1;
    for (i, pair) in widths.windows(2).enumerate() {
        let (fan_in, fan_out) = (pair[0], pair[1]);
        let name = format!("fc{i}");
        let is_output = i + 1 == n_linear;
        let kaiming = match spec.model.init {
            InitKind::Auto => !saturating && !is_output,
            InitKind::KaimingNormal => true,
            InitKind::XavierUniform => false,
        };
        let wname = format!("{name}.weight");
        let w = if kaiming {
            kaiming_normal(spec.seed, &wname, fan_in, fan_out)
        } else {
            xavier_uniform(spec.seed, &wname, fan_in, fan_out)
        };
        layers.push(Box::new(Linear::new(be, &name, fan_in, fan_out, &w)?));
        if !is_output {
            let act_name = format!("act{i}");
            if spec.model.activation == ActivationKind::Swish && spec.model.swish_learnable_beta {
                layers.push(Box::new(Act::learnable_swish(be, &act_name, spec.model.swish_beta, fan_out)?));
            } else {
                layers.push(Box::new(Act::new(&act_name, act, fan_out)));
            }
            if spec.model.dropout > 0.0 {
                layers.push(Box::new(Dropout::new(&format!("drop{i}"), spec.model.dropout, i as u64)));
            }
        }
    }
    Ok(Sequential::new(layers))
}

/// The model of the spec and the shape of one input example.
pub fn build_model<B: Backend>(
    be: &B,
    spec: &JobSpec,
    features: usize,
    classes: usize,
) -> Result<(Sequential<B>, Vec<usize>)> {
    let (mut model, input_shape) = build_base_model(be, spec, features, classes)?;
    if let Some(lora) = &spec.finetune.lora {
        crate::finetune::add_lora(be, spec, lora, &mut model)?;
    }
    Ok((model, input_shape))
}

fn build_base_model<B: Backend>(
    be: &B,
    spec: &JobSpec,
    features: usize,
    classes: usize,
) -> Result<(Sequential<B>, Vec<usize>)> {
    match spec.model.kind {
        ModelKind::Mlp => Ok((build_mlp(be, spec, features, classes)?, vec![features])),
        ModelKind::Gpt => Ok((crate::lm::build_gpt(be, spec, classes)?, vec![spec.model.context])),
        ModelKind::Rnn => Ok((crate::lm::build_rnn(be, spec, classes)?, vec![spec.model.context])),
        ModelKind::Gan => crate::gan::build_gan(be, spec, features),
        ModelKind::Sequential => {
            let shape = &spec.model.input_shape;
            if shape.iter().product::<usize>() != features {
                return Err(WorkerError::Config(format!(
                    "model.input_shape {shape:?} has {} values but the data has {features} features per example",
                    shape.iter().product::<usize>()
                )));
            }
            Ok((build_sequential(be, spec, classes)?, shape.clone()))
        }
    }
}

pub use crate::sequential::build_sequential;

pub fn optimizer_config(spec: &JobSpec) -> OptimizerConfig {
    let o = &spec.optim;
    let (rule, extra_l2) = match o.kind {
        OptimizerKind::Sgd => (Rule::Sgd, o.weight_decay),
        OptimizerKind::Momentum => (Rule::Momentum { mu: o.momentum }, o.weight_decay),
        OptimizerKind::Nesterov => (Rule::Nesterov { mu: o.momentum }, o.weight_decay),
        // PyTorch's Adam weight_decay is an L2 penalty; AdamW's is decoupled.
        OptimizerKind::Adam => (Rule::Adam { beta1: o.beta1, beta2: o.beta2, eps: o.eps }, o.weight_decay),
        OptimizerKind::Adamw => {
            (Rule::AdamW { beta1: o.beta1, beta2: o.beta2, eps: o.eps, weight_decay: o.weight_decay }, 0.0)
        }
    };
    OptimizerConfig { rule, l1: o.l1, l2: o.l2 + extra_l2, decay_biases: o.decay_biases }
}

pub fn schedule(spec: &JobSpec, total_steps: u64) -> Schedule {
    let s = &spec.schedule;
    let decay = match s.kind {
        ScheduleKind::Constant => Decay::Constant,
        ScheduleKind::Step => Decay::Step { step_size: s.step_size, gamma: s.gamma },
        ScheduleKind::Exponential => Decay::Exponential { rate: s.rate, decay_steps: s.decay_steps },
        ScheduleKind::Linear => Decay::Linear { min_lr: s.min_lr },
        ScheduleKind::Cosine => Decay::Cosine { min_lr: s.min_lr },
    };
    Schedule {
        base_lr: spec.optim.lr,
        decay,
        warmup_steps: s.warmup_steps,
        warmup_start_lr: s.warmup_start_lr,
        total_steps,
    }
}

/// The training and evaluation examples of a job, and the tokenizer of a text dataset.
pub struct LoadedData {
    pub train: Box<dyn Examples>,
    pub test: Box<dyn Examples>,
    pub vocab: Option<Tokenizer>,
}

pub fn load_data(spec: &JobSpec) -> Result<LoadedData> {
    Ok(match spec.data.kind {
        DatasetKind::Idx => {
            let (train, test) = load_images(spec)?;
            LoadedData { train: Box::new(train), test: Box::new(test), vocab: None }
        }
        DatasetKind::Text => {
            let (train, test, vocab) = crate::lm::load_text(spec)?;
            LoadedData { train: Box::new(train), test: Box::new(test), vocab: Some(vocab) }
        }
    })
}

/// Loss weights (T28): explicit, balanced from the training split's class counts, or none.
pub fn class_weights(spec: &JobSpec, counts: &[usize]) -> Result<Option<Vec<f32>>> {
    let t = &spec.train;
    if !t.class_weights.is_empty() {
        if t.class_weights.len() != counts.len() {
            return Err(crate::WorkerError::Config(format!(
                "train.class_weights has {} entries; the data has {} classes",
                t.class_weights.len(),
                counts.len()
            )));
        }
        return Ok(Some(t.class_weights.clone()));
    }
    if t.balanced_class_weights {
        let weights = lockstep_nn::data::balanced_class_weights(counts);
        tracing::info!("class counts {counts:?}: balanced loss weights {weights:?}");
        return Ok(Some(weights));
    }
    Ok(None)
}

/// Binary tasks: minority / (minority + majority) of the training labels (T28).
pub fn prior_threshold(train: &dyn Examples) -> Option<f64> {
    let labels = train.labels()?;
    let counts = lockstep_nn::data::class_counts(labels, train.classes());
    (counts.len() == 2).then(|| counts[0].min(counts[1]) as f64 / labels.len().max(1) as f64)
}

/// IDX train and test splits, normalised with statistics of the training split.
pub fn load_images(spec: &JobSpec) -> Result<(Dataset, Dataset)> {
    let (mut train, mut test) = load_raw_images(spec)?;
    let norm = Normalizer::fit(normalization(spec), &train);
    norm.apply(&mut train);
    norm.apply(&mut test);
    Ok((train, test))
}

/// The normaliser a job's images were trained with (fitted on its training split) and
/// its class count: what maps generated or outside images into a model's input space.
pub fn image_normalizer(spec: &JobSpec) -> Result<(Normalizer, usize)> {
    let (train, _) = load_raw_images(spec)?;
    Ok((Normalizer::fit(normalization(spec), &train), train.classes))
}

fn normalization(spec: &JobSpec) -> Normalization {
    match spec.data.normalize {
        Normalize::None => Normalization::None,
        Normalize::MinMax => Normalization::MinMax,
        Normalize::ZScore => Normalization::ZScore,
        Normalize::L2 => Normalization::L2,
    }
}

/// The IDX splits with the job's label selection and limits, not yet normalised.
fn load_raw_images(spec: &JobSpec) -> Result<(Dataset, Dataset)> {
    let dir = &spec.data.dir;
    let mut train = load_idx_split(dir, "train")?;
    let mut test = load_idx_split(dir, "t10k")?;
    if train.features != test.features {
        return Err(WorkerError::Config(format!(
            "{}: train examples have {} features, test examples {}",
            dir.display(),
            train.features,
            test.features
        )));
    }
    train.truncate(spec.data.train_limit);
    test.truncate(spec.data.test_limit);
    let classes = train.classes.max(test.classes);
    train.classes = classes;
    test.classes = classes;
    let d = &spec.data;
    for (split, set) in [("train", &mut train), ("test", &mut test)] {
        if !d.labels.is_empty() {
            if let Some(missing) = d.labels.iter().find(|&&l| l as usize >= set.classes) {
                return Err(WorkerError::Config(format!(
                    "data.labels: label {missing} is not in {} (labels 0..{})",
                    dir.display(),
                    set.classes
                )));
            }
            set.select_labels(&d.labels);
        }
        if let Some(positive) = d.binary_positive {
            set.one_vs_rest(positive);
            if d.positive_fraction > 0.0 {
                set.subsample_positives(d.positive_fraction, spec.seed, split);
            }
        }
        if set.is_empty() {
            return Err(WorkerError::Config(format!("data: no {split} examples left after data.labels / limits")));
        }
    }
    Ok((train, test))
}
