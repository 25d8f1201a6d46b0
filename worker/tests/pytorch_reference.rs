//! lockstep against PyTorch, in the manner of llm.c's test_gpt2.c. The fixture
//! (`fixtures/pytorch_reference.safetensors`, written by `scripts/pytorch_reference.py`)
//! holds, for a small MLP, a CNN (conv, transposed conv, pooling), a 2-block GPT and an
//! LSTM: PyTorch's weights in PyTorch's layout, inputs, logits, loss, every gradient, the
//! weights after one AdamW step and the losses of three steps, computed in float64. Each
//! model is built here from the job in the fixture's header, loaded through the same file
//! boundary as model files (`Param::from_file`), and checked.
//!
//! Errors are relative to the tensor's scale: max|lockstep − PyTorch| / max|PyTorch|.

use lockstep_kernels::{Backend, CpuBackend};
use lockstep_nn::checkpoint::{load_metadata, load_tensors, TensorMap};
use lockstep_nn::loss::softmax_cross_entropy;
use lockstep_nn::optim::Optimizer;
use lockstep_nn::{ForwardCtx, Sequential, Tensor};
use lockstep_proto::JobSpec;
use lockstep_worker::build;
use std::path::Path;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pytorch_reference.safetensors");

/// Tolerances: forward and gradients in f32 against an f64 reference; the optimizer step
/// on PyTorch's own gradients; the loss after three steps on lockstep's gradients.
const FORWARD_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-5;
const STEP_TOL: f64 = 1e-5;
const LOSS_TOL: f64 = 1e-5;

struct Reference {
    tensors: TensorMap,
    key: &'static str,
}

impl Reference {
    fn get(&self, what: &str) -> &(Vec<usize>, Vec<f32>) {
        let name = format!("{}.{what}", self.key);
        self.tensors.get(&name).unwrap_or_else(|| panic!("fixture has no {name}"))
    }
}

/// max|a − b| / max|b| (b the reference).
fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, &v| m.max(v.abs() as f64)).max(1e-12);
    let diff = a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
    let err = relative_error(got, want);
    eprintln!("  {what:<28} relative error {err:.2e}");
    assert!(err < tol, "{what}: relative error {err:.3e} over {tol:.0e}");
    err
}

/// The model of `key`'s job with PyTorch's initial weights.
fn model(be: &CpuBackend, r: &Reference, spec: &JobSpec) -> (Sequential<CpuBackend>, Vec<usize>) {
    let (features, classes) = match r.key {
        "mlp" => (12, 5),
        "cnn" => (128, 10),
        "gpt" => (8, 11),
        _ => (6, 7),
    };
    let (mut model, input_shape) = build::build_model(be, spec, features, classes).expect("build");
    for p in model.params_mut() {
        let (shape, values) = r.get(&format!("param.{}", p.name));
        p.value = p.from_file(shape, values).expect("PyTorch's shape");
    }
    (model, input_shape)
}

/// Forward + cross-entropy (mean over targets) + backward; returns the loss and logits.
fn forward_backward(
    be: &CpuBackend,
    model: &mut Sequential<CpuBackend>,
    input: (&[usize], &[f32]),
    y: &[u32],
) -> (f64, Vec<f32>) {
    let ctx = ForwardCtx { train: true, ..Default::default() };
    model.zero_grad(be).unwrap();
    let logits = model.forward(be, Tensor::from_slice(be, input.0, input.1).unwrap(), &ctx).expect("forward");
    let values = be.download(&logits.buf).unwrap();
    let out = softmax_cross_entropy(be, &logits, y, None, 1.0 / y.len() as f32).expect("loss");
    model.backward(be, out.grad).expect("backward");
    (out.loss_sum / y.len() as f64, values)
}

fn check_model(key: &'static str) -> f64 {
    let be = CpuBackend::new(1);
    let tensors = load_tensors(Path::new(FIXTURE)).expect("fixture");
    let jobs: serde_json::Value =
        serde_json::from_str(&load_metadata(Path::new(FIXTURE)).unwrap()["jobs"]).expect("jobs in the header");
    let spec = JobSpec::parse(jobs[key].as_str().unwrap(), Path::new("fixture.toml"), &[]).expect("job");
    let r = Reference { tensors, key };
    let (mut model, input_shape) = model(&be, &r, &spec);
    let x = &r.get("x").1;
    let y: Vec<u32> = r.get("y").1.iter().map(|&v| v as u32).collect();
    let rows = x.len() / input_shape.iter().product::<usize>();
    let shape = [&[rows][..], &input_shape].concat();
    let input = (shape.as_slice(), x.as_slice());
    eprintln!("{key}:");
    let mut worst = 0f64;

    // Forward and loss.
    let (loss, logits) = forward_backward(&be, &mut model, input, &y);
    worst = worst.max(check("logits", &logits, &r.get("logits").1, FORWARD_TOL));
    worst = worst.max(check("loss", &[loss as f32], &r.get("loss").1, FORWARD_TOL));
    // Every gradient, in PyTorch's layout.
    for p in model.params() {
        let (_, want) = r.get(&format!("grad.{}", p.name));
        let got = p.to_file(&be.download(&p.grad).unwrap()).1;
        worst = worst.max(check(&format!("grad {}", p.name), &got, want, GRAD_TOL));
    }
    // One AdamW step on PyTorch's gradients: the optimizer alone.
    let mut optimizer = Optimizer::new(&be, build::optimizer_config(&spec), &model.params()).unwrap();
    for p in model.params_mut() {
        let (shape, values) = r.get(&format!("grad.{}", p.name));
        p.grad = p.from_file(shape, values).unwrap();
    }
    optimizer.step(&be, &mut model.params_mut(), spec.optim.lr).unwrap();
    for p in model.params() {
        let (_, want) = r.get(&format!("after.{}", p.name));
        let got = p.to_file(&be.download(&p.value).unwrap()).1;
        worst = worst.max(check(&format!("after step {}", p.name), &got, want, STEP_TOL));
    }
    // Three steps from the start on lockstep's own gradients: the losses follow PyTorch's.
    let (mut model, _) = self::model(&be, &r, &spec);
    let mut optimizer = Optimizer::new(&be, build::optimizer_config(&spec), &model.params()).unwrap();
    let mut losses = Vec::new();
    for _ in 0..3 {
        let (loss, _) = forward_backward(&be, &mut model, input, &y);
        losses.push(loss as f32);
        optimizer.step(&be, &mut model.params_mut(), spec.optim.lr).unwrap();
    }
    worst = worst.max(check("losses of 3 steps", &losses, &r.get("losses").1, LOSS_TOL));
    eprintln!("{key}: largest relative error {worst:.2e}");
    worst
}

#[test]
fn mlp_matches_pytorch() {
    check_model("mlp");
}

#[test]
fn cnn_with_transposed_conv_matches_pytorch() {
    check_model("cnn");
}

#[test]
fn two_block_gpt_matches_pytorch() {
    check_model("gpt");
}

#[test]
fn lstm_matches_pytorch() {
    check_model("lstm");
}
