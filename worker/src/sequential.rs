//! A `sequential` model from its layer list: shapes are inferred layer by layer, and every
//! layer's output shape, parameter count and receptive field (T6) are logged.

use crate::{Result, WorkerError};
use lockstep_kernels::{Activation, Backend, Window};
use lockstep_nn::init::{kaiming_normal, xavier_uniform};
use lockstep_nn::layers::{
    Act, BatchNorm, Conv1d, Conv2d, ConvTranspose2d, Dropout, Flatten, LayerNorm, Linear, Pool2d, PoolKind,
};
use lockstep_nn::{Layer, Sequential};
use lockstep_proto::job::{JobSpec, LayerSpec};

/// Builds the layers of `spec.model.layers`; the last must produce `classes` outputs.
pub fn build_sequential<B: Backend>(be: &B, spec: &JobSpec, classes: usize) -> Result<Sequential<B>> {
    let list =
        LayerList { key: "model.layers", layers: &spec.model.layers, input_shape: &spec.model.input_shape, prefix: "" };
    let (layers, shape) = build_layers(be, spec, list)?;
    if shape != [classes] {
        return Err(WorkerError::Config(format!(
            "model.layers: the last layer outputs {shape:?}; the data has {classes} classes"
        )));
    }
    Ok(Sequential::new(layers))
}

/// A list of layer specs to build: the job key it came from (for errors), the shape of
/// one input and the prefix of its layers' names.
pub struct LayerList<'a> {
    pub key: &'a str,
    pub layers: &'a [LayerSpec],
    pub input_shape: &'a [usize],
    pub prefix: &'a str,
}

/// Built layers, in order.
pub type Layers<B> = Vec<Box<dyn Layer<B>>>;

/// The layers of `list`, named `{prefix}l{i}`, and the shape of one output example.
pub fn build_layers<B: Backend>(be: &B, spec: &JobSpec, list: LayerList<'_>) -> Result<(Layers<B>, Vec<usize>)> {
    let mut at = Cursor { shape: list.input_shape.to_vec(), rf: 1, jump: 1 };
    let mut layers: Vec<Box<dyn Layer<B>>> = Vec::new();
    tracing::info!("{:<4} {:<12} {:>16} {:>10} {:>6}", "#", list.key, "output", "params", "rf");
    for (i, layer) in list.layers.iter().enumerate() {
        let bad = |e: LayerError| match e {
            LayerError::Spec(msg) => WorkerError::Config(format!("{}[{i}] ({layer:?}): {msg}", list.key)),
            LayerError::Backend(e) => WorkerError::Nn(e),
        };
        let last = i + 1 == list.layers.len();
        let name = format!("{}l{i}", list.prefix);
        let built = build_layer(be, spec, &mut at, (i, &name, layer, last)).map_err(bad)?;
        let params: usize = built.params().iter().map(|p| p.numel()).sum();
        let kind: String = format!("{layer:?}").chars().take_while(|c| c.is_alphanumeric()).collect();
        tracing::info!("{:<4} {:<12} {:>16} {:>10} {:>6}", i, kind, format!("{:?}", at.shape), params, at.rf);
        layers.push(built);
    }
    Ok((layers, at.shape))
}

/// Where the layer list has got to: the per-example shape ([H, W, C], [L, C] or [F]), the
/// receptive field and how many input pixels one output step moves.
struct Cursor {
    shape: Vec<usize>,
    rf: usize,
    jump: usize,
}

impl Cursor {
    /// A window of `kernel` with `stride` grows the receptive field.
    fn strided(&mut self, kernel: usize, stride: usize) {
        self.rf += (kernel - 1) * self.jump;
        self.jump *= stride;
    }

    fn image(&self) -> std::result::Result<(usize, usize, usize), String> {
        match self.shape[..] {
            [h, w, c] => Ok((h, w, c)),
            _ => Err(format!("needs an image input [H, W, C], got {:?}", self.shape)),
        }
    }

    fn window(&self, kernel: usize, stride: usize, pad: usize) -> std::result::Result<Window, String> {
        let (h, w, c) = self.image()?;
        if kernel == 0 || stride == 0 || kernel > h + 2 * pad || kernel > w + 2 * pad {
            return Err(format!("kernel {kernel} stride {stride} padding {pad} does not fit {h}x{w}"));
        }
        Ok(Window { h, w, c, kh: kernel, kw: kernel, stride, pad })
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Why a layer of the list could not be built: its spec does not fit where it stands, or
/// the backend failed to hold its parameters.
#[derive(Debug)]
enum LayerError {
    Spec(String),
    Backend(lockstep_nn::NnError),
}

impl From<String> for LayerError {
    fn from(msg: String) -> Self {
        Self::Spec(msg)
    }
}

impl From<&str> for LayerError {
    fn from(msg: &str) -> Self {
        Self::Spec(msg.to_string())
    }
}

impl From<lockstep_nn::NnError> for LayerError {
    fn from(e: lockstep_nn::NnError) -> Self {
        Self::Backend(e)
    }
}

type Built<B> = std::result::Result<Box<dyn Layer<B>>, LayerError>;

/// Layer `i` (`last` if it is the output layer) named `name`, moving the cursor past it.
fn build_layer<B: Backend>(
    be: &B,
    spec: &JobSpec,
    at: &mut Cursor,
    (i, name, layer, last): (usize, &str, &LayerSpec, bool),
) -> Built<B> {
    let act = |a: Activation, at: &Cursor| -> Built<B> { Ok(Box::new(Act::new(name, a, at.numel()))) };
    match *layer {
        LayerSpec::Conv2d { out_channels, kernel, stride, padding, groups } => {
            conv2d(be, spec, at, name, [out_channels, kernel, stride, padding, groups])
        }
        LayerSpec::Conv1d { out_channels, kernel, stride, padding, groups } => {
            conv1d(be, spec, at, name, [out_channels, kernel, stride, padding, groups])
        }
        LayerSpec::ConvTranspose2d { out_channels, kernel, stride, padding } => {
            conv_transpose2d(be, spec, at, name, [out_channels, kernel, stride, padding])
        }
        LayerSpec::MaxPool2d { kernel, stride, padding } | LayerSpec::AvgPool2d { kernel, stride, padding } => {
            let stride = stride.unwrap_or(kernel);
            let win = at.window(kernel, stride, padding)?;
            at.strided(kernel, stride);
            at.shape = vec![win.out_h(), win.out_w(), win.c];
            let kind = if matches!(layer, LayerSpec::MaxPool2d { .. }) { PoolKind::Max } else { PoolKind::Average };
            Ok(Box::new(Pool2d::new(name, kind, win)))
        }
        LayerSpec::Flatten => {
            at.shape = vec![at.numel()];
            Ok(Box::new(Flatten::new(name)))
        }
        LayerSpec::Reshape { ref shape } => {
            if shape.is_empty() || shape.contains(&0) || shape.iter().product::<usize>() != at.numel() {
                return Err(format!("shape {shape:?} does not hold the {} values of {:?}", at.numel(), at.shape).into());
            }
            at.shape = shape.clone();
            Ok(Box::new(Flatten::reshape(name, shape)))
        }
        LayerSpec::Linear { out } => linear(be, spec, at, name, out, last),
        LayerSpec::LayerNorm => Ok(Box::new(LayerNorm::new(be, name, *at.shape.last().unwrap_or(&1))?)),
        LayerSpec::BatchNorm => {
            let mut bn = BatchNorm::new(be, name, *at.shape.last().unwrap_or(&1))?;
            bn.sync = spec.model.sync_batch_norm;
            Ok(Box::new(bn))
        }
        LayerSpec::Dropout { p } if !(0.0..1.0).contains(&p) => Err("p must be in [0, 1)".into()),
        LayerSpec::Dropout { p } => Ok(Box::new(Dropout::new(name, p, i as u64))),
        LayerSpec::Relu => act(Activation::Relu, at),
        LayerSpec::LeakyRelu => act(Activation::LeakyRelu { slope: spec.model.leaky_slope }, at),
        LayerSpec::Sigmoid => act(Activation::Sigmoid, at),
        LayerSpec::Tanh => act(Activation::Tanh, at),
        LayerSpec::Silu => act(Activation::Swish { beta: 1.0 }, at),
        LayerSpec::Gelu => act(Activation::Gelu, at),
    }
}

fn check_groups(c: usize, out_channels: usize, groups: usize) -> std::result::Result<(), String> {
    if groups == 0 || !c.is_multiple_of(groups) || !out_channels.is_multiple_of(groups) || out_channels == 0 {
        return Err(format!("{c} input and {out_channels} output channels must both divide into {groups} groups"));
    }
    Ok(())
}

/// `[out_channels, kernel, stride, padding, groups]`.
fn conv2d<B: Backend>(
    be: &B,
    spec: &JobSpec,
    at: &mut Cursor,
    name: &str,
    [oc, kernel, stride, padding, groups]: [usize; 5],
) -> Built<B> {
    let win = at.window(kernel, stride, padding)?;
    check_groups(win.c, oc, groups)?;
    let w = kaiming_normal(spec.seed, &format!("{name}.weight"), kernel * kernel * win.c / groups, oc);
    at.strided(kernel, stride);
    at.shape = vec![win.out_h(), win.out_w(), oc];
    Ok(Box::new(Conv2d::new(be, name, win, oc, groups, &w)?))
}

/// Over sequences [L, C]: `[out_channels, kernel, stride, padding, groups]`.
fn conv1d<B: Backend>(
    be: &B,
    spec: &JobSpec,
    at: &mut Cursor,
    name: &str,
    [oc, kernel, stride, padding, groups]: [usize; 5],
) -> Built<B> {
    let [length, c] = at.shape[..] else {
        return Err(format!("needs a sequence input [L, C], got {:?}", at.shape).into());
    };
    if kernel == 0 || stride == 0 || kernel > length + 2 * padding {
        return Err(format!("kernel {kernel} stride {stride} padding {padding} does not fit length {length}").into());
    }
    check_groups(c, oc, groups)?;
    let w = kaiming_normal(spec.seed, &format!("{name}.weight"), kernel * c / groups, oc);
    let conv = Conv1d::new(be, name, (length, c), oc, kernel, stride, padding, groups, &w)?;
    at.strided(kernel, stride);
    at.shape = vec![conv.out_length(), oc];
    Ok(Box::new(conv))
}

/// `[out_channels, kernel, stride, padding]`: an upsampling layer.
fn conv_transpose2d<B: Backend>(
    be: &B,
    spec: &JobSpec,
    at: &mut Cursor,
    name: &str,
    [oc, kernel, stride, padding]: [usize; 4],
) -> Built<B> {
    let (h, w, c) = at.image()?;
    let size = |s| ConvTranspose2d::<B>::output_size(s, kernel, stride, padding);
    let (Some(oh), Some(ow)) = (size(h), size(w)) else {
        return Err(format!("kernel {kernel} stride {stride} padding {padding} gives an empty output").into());
    };
    if kernel == 0 || stride == 0 || oc == 0 {
        return Err("kernel, stride and out_channels must be > 0".into());
    }
    let weight = kaiming_normal(spec.seed, &format!("{name}.weight"), kernel * kernel * c, oc);
    // The receptive field in input pixels shrinks by the stride.
    at.jump = (at.jump / stride).max(1);
    at.shape = vec![oh, ow, oc];
    Ok(Box::new(ConvTranspose2d::new(be, name, (h, w, c), oc, kernel, stride, padding, &weight)?))
}

/// Kaiming-normal init, Xavier-uniform for the output layer.
fn linear<B: Backend>(be: &B, spec: &JobSpec, at: &mut Cursor, name: &str, out: usize, is_output: bool) -> Built<B> {
    let [fan_in] = at.shape[..] else {
        return Err(format!("needs a flat input [F], got {:?}: add a flatten layer", at.shape).into());
    };
    let wname = format!("{name}.weight");
    let w = if is_output {
        xavier_uniform(spec.seed, &wname, fan_in, out)
    } else {
        kaiming_normal(spec.seed, &wname, fan_in, out)
    };
    at.shape = vec![out];
    Ok(Box::new(Linear::new(be, name, fan_in, out, &w)?))
}
