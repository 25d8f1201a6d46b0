//! Job spec -> model, optimizer, schedule, data.

use crate::{Result, WorkerError};
use lockstep_kernels::Window;
use lockstep_kernels::{Activation, Backend};
use lockstep_nn::data::text::CharTokenizer;
use lockstep_nn::data::{load_idx_split, Dataset, Examples, Normalization, Normalizer};
use lockstep_nn::init::{kaiming_normal, xavier_uniform};
use lockstep_nn::layers::{
    Act, BatchNorm, Conv1d, Conv2d, ConvTranspose2d, Dropout, Flatten, LayerNorm, Linear, Pool2d, PoolKind,
};
use lockstep_nn::optim::{OptimizerConfig, Rule};
use lockstep_nn::schedule::{Decay, Schedule};
use lockstep_nn::{Layer, Sequential};
use lockstep_proto::job::{
    ActivationKind, DatasetKind, InitKind, JobSpec, LayerSpec, ModelKind, Normalize, OptimizerKind, ScheduleKind,
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
pub fn build_mlp<B: Backend>(be: &B, spec: &JobSpec, features: usize, classes: usize) -> Sequential<B> {
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
        layers.push(Box::new(Linear::new(be, &name, fan_in, fan_out, &w)));
        if !is_output {
            let act_name = format!("act{i}");
            if spec.model.activation == ActivationKind::Swish && spec.model.swish_learnable_beta {
                layers.push(Box::new(Act::learnable_swish(be, &act_name, spec.model.swish_beta, fan_out)));
            } else {
                layers.push(Box::new(Act::new(&act_name, act, fan_out)));
            }
            if spec.model.dropout > 0.0 {
                layers.push(Box::new(Dropout::new(&format!("drop{i}"), spec.model.dropout, i as u64)));
            }
        }
    }
    Sequential::new(layers)
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
        ModelKind::Mlp => Ok((build_mlp(be, spec, features, classes), vec![features])),
        ModelKind::Gpt => Ok((crate::lm::build_gpt(be, spec, classes), vec![spec.model.context])),
        ModelKind::Rnn => Ok((crate::lm::build_rnn(be, spec, classes), vec![spec.model.context])),
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

/// A `sequential` model: shapes are inferred layer by layer; every layer's output shape,
/// parameter count and receptive field (T6) are logged. The last layer must produce
/// `classes` outputs.
pub fn build_sequential<B: Backend>(be: &B, spec: &JobSpec, classes: usize) -> Result<Sequential<B>> {
    let mut shape = spec.model.input_shape.clone(); // per example: [H, W, C] or [F]
    let (mut rf, mut jump) = (1usize, 1usize); // receptive field and input pixels per output step
    let mut layers: Vec<Box<dyn Layer<B>>> = Vec::new();
    let n_layers = spec.model.layers.len();
    tracing::info!("{:<4} {:<12} {:>16} {:>10} {:>6}", "#", "layer", "output", "params", "rf");
    for (i, layer) in spec.model.layers.iter().enumerate() {
        let bad = |msg: String| WorkerError::Config(format!("model.layers[{i}] ({layer:?}): {msg}"));
        let image = |shape: &[usize]| match shape {
            [h, w, c] => Ok((*h, *w, *c)),
            _ => Err(bad(format!("needs an image input [H, W, C], got {shape:?}"))),
        };
        let window = |shape: &[usize], kernel: usize, stride: usize, pad: usize| -> Result<Window> {
            let (h, w, c) = image(shape)?;
            if kernel == 0 || stride == 0 || kernel > h + 2 * pad || kernel > w + 2 * pad {
                return Err(bad(format!("kernel {kernel} stride {stride} padding {pad} does not fit {h}x{w}")));
            }
            Ok(Window { h, w, c, kh: kernel, kw: kernel, stride, pad })
        };
        let name = format!("l{i}");
        let built: Box<dyn Layer<B>> = match *layer {
            LayerSpec::Conv2d { out_channels, kernel, stride, padding, groups } => {
                let win = window(&shape, kernel, stride, padding)?;
                if groups == 0 || win.c % groups != 0 || out_channels % groups != 0 || out_channels == 0 {
                    return Err(bad(format!(
                        "{} input and {out_channels} output channels must both divide into {groups} groups",
                        win.c
                    )));
                }
                let fan_in = kernel * kernel * win.c / groups;
                let w = kaiming_normal(spec.seed, &format!("{name}.weight"), fan_in, out_channels);
                rf += (kernel - 1) * jump;
                jump *= stride;
                shape = vec![win.out_h(), win.out_w(), out_channels];
                Box::new(Conv2d::new(be, &name, win, out_channels, groups, &w))
            }
            LayerSpec::Conv1d { out_channels, kernel, stride, padding, groups } => {
                let [length, c] = shape[..] else {
                    return Err(bad(format!("needs a sequence input [L, C], got {shape:?}")));
                };
                if kernel == 0 || stride == 0 || kernel > length + 2 * padding {
                    return Err(bad(format!(
                        "kernel {kernel} stride {stride} padding {padding} does not fit length {length}"
                    )));
                }
                if groups == 0 || c % groups != 0 || out_channels % groups != 0 || out_channels == 0 {
                    return Err(bad(format!(
                        "{c} input and {out_channels} output channels must both divide into {groups} groups"
                    )));
                }
                let fan_in = kernel * c / groups;
                let w = kaiming_normal(spec.seed, &format!("{name}.weight"), fan_in, out_channels);
                let conv = Conv1d::new(be, &name, (length, c), out_channels, kernel, stride, padding, groups, &w);
                rf += (kernel - 1) * jump;
                jump *= stride;
                shape = vec![conv.out_length(), out_channels];
                Box::new(conv)
            }
            LayerSpec::ConvTranspose2d { out_channels, kernel, stride, padding } => {
                let (h, w, c) = image(&shape)?;
                let size = |s| ConvTranspose2d::<B>::output_size(s, kernel, stride, padding);
                let (Some(oh), Some(ow)) = (size(h), size(w)) else {
                    return Err(bad(format!(
                        "kernel {kernel} stride {stride} padding {padding} gives an empty output"
                    )));
                };
                if kernel == 0 || stride == 0 || out_channels == 0 {
                    return Err(bad("kernel, stride and out_channels must be > 0".into()));
                }
                let weight = kaiming_normal(spec.seed, &format!("{name}.weight"), kernel * kernel * c, out_channels);
                // An upsampling layer: the receptive field in input pixels shrinks by the stride.
                jump = (jump / stride).max(1);
                shape = vec![oh, ow, out_channels];
                Box::new(ConvTranspose2d::new(be, &name, (h, w, c), out_channels, kernel, stride, padding, &weight))
            }
            LayerSpec::MaxPool2d { kernel, stride, padding } | LayerSpec::AvgPool2d { kernel, stride, padding } => {
                let stride = stride.unwrap_or(kernel);
                let win = window(&shape, kernel, stride, padding)?;
                rf += (kernel - 1) * jump;
                jump *= stride;
                shape = vec![win.out_h(), win.out_w(), win.c];
                let kind = if matches!(layer, LayerSpec::MaxPool2d { .. }) { PoolKind::Max } else { PoolKind::Average };
                Box::new(Pool2d::new(&name, kind, win))
            }
            LayerSpec::Flatten => {
                shape = vec![shape.iter().product()];
                Box::new(Flatten::new(&name))
            }
            LayerSpec::Linear { out } => {
                let [fan_in] = shape[..] else {
                    return Err(bad(format!("needs a flat input [F], got {shape:?}: add a flatten layer")));
                };
                let is_output = i + 1 == n_layers;
                let wname = format!("{name}.weight");
                let w = if is_output {
                    xavier_uniform(spec.seed, &wname, fan_in, out)
                } else {
                    kaiming_normal(spec.seed, &wname, fan_in, out)
                };
                shape = vec![out];
                Box::new(Linear::new(be, &name, fan_in, out, &w))
            }
            LayerSpec::LayerNorm => Box::new(LayerNorm::new(be, &name, *shape.last().unwrap_or(&1))),
            LayerSpec::BatchNorm => {
                let mut bn = BatchNorm::new(be, &name, *shape.last().unwrap_or(&1));
                bn.sync = spec.model.sync_batch_norm;
                Box::new(bn)
            }
            LayerSpec::Dropout { p } => {
                if !(0.0..1.0).contains(&p) {
                    return Err(bad("p must be in [0, 1)".into()));
                }
                Box::new(Dropout::new(&name, p, i as u64))
            }
            LayerSpec::Relu => Box::new(Act::new(&name, Activation::Relu, shape.iter().product())),
            LayerSpec::LeakyRelu => Box::new(Act::new(
                &name,
                Activation::LeakyRelu { slope: spec.model.leaky_slope },
                shape.iter().product(),
            )),
            LayerSpec::Sigmoid => Box::new(Act::new(&name, Activation::Sigmoid, shape.iter().product())),
            LayerSpec::Tanh => Box::new(Act::new(&name, Activation::Tanh, shape.iter().product())),
            LayerSpec::Silu => Box::new(Act::new(&name, Activation::Swish { beta: 1.0 }, shape.iter().product())),
            LayerSpec::Gelu => Box::new(Act::new(&name, Activation::Gelu, shape.iter().product())),
        };
        let params: usize = built.params().iter().map(|p| p.numel()).sum();
        let kind = format!("{layer:?}").split([' ', '{']).next().unwrap_or("").to_string();
        tracing::info!("{:<4} {:<12} {:>16} {:>10} {:>6}", i, kind, format!("{shape:?}"), params, rf);
        layers.push(built);
    }
    if shape != [classes] {
        return Err(WorkerError::Config(format!(
            "model.layers: the last layer outputs {shape:?}; the data has {classes} classes"
        )));
    }
    Ok(Sequential::new(layers))
}

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
    pub vocab: Option<CharTokenizer>,
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

/// Binary tasks: minority / (minority + majority) of the training labels (T28).
pub fn prior_threshold(train: &dyn Examples) -> Option<f64> {
    let labels = train.labels()?;
    let counts = lockstep_nn::data::class_counts(labels, train.classes());
    (counts.len() == 2).then(|| counts[0].min(counts[1]) as f64 / labels.len().max(1) as f64)
}

/// IDX train and test splits, normalised with statistics of the training split.
pub fn load_images(spec: &JobSpec) -> Result<(Dataset, Dataset)> {
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
    let kind = match spec.data.normalize {
        Normalize::None => Normalization::None,
        Normalize::MinMax => Normalization::MinMax,
        Normalize::ZScore => Normalization::ZScore,
        Normalize::L2 => Normalization::L2,
    };
    let norm = Normalizer::fit(kind, &train);
    norm.apply(&mut train);
    norm.apply(&mut test);
    Ok((train, test))
}
