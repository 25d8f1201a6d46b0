//! The training toolbox at the Trainer level, on in-memory data: fp16 loss scaling (T25),
//! fine-tuning and LoRA (T37, T38), EMA evaluation (T23), class weights (T28).

use lockstep_kernels::{Backend, CpuBackend};
use lockstep_nn::data::Dataset;
use lockstep_nn::rng::Stream;
use lockstep_proto::JobSpec;
use lockstep_worker::trainer::{NoReduce, Skip, Trainer};
use std::path::Path;

const BASE: &str = r#"
name = "toolbox"
seed = 5
[model]
kind = "mlp"
hidden = [32, 16]
[data]
kind = "idx"
dir = "unused"
[train]
epochs = 1
batch_size = 32
[optim]
kind = "adamw"
lr = 0.01
"#;

fn spec(sets: &[&str]) -> JobSpec {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    JobSpec::parse(BASE, Path::new("toolbox.toml"), &sets).unwrap()
}

/// 4 classes, each a Gaussian blob around its own mean: learnable in a few steps.
fn data() -> Dataset {
    let mut s = Stream::new(9, "data", &[]);
    let y: Vec<u32> = (0..256).map(|_| s.below(4) as u32).collect();
    let x =
        y.iter().flat_map(|&c| (0..20).map(move |f| if f % 4 == c as usize { 2.0 } else { 0.0 })).collect::<Vec<f32>>();
    let x = x.into_iter().map(|v| v + 0.5 * s.normal()).collect();
    Dataset { features: 20, classes: 4, x, y }
}

fn weights(t: &Trainer<CpuBackend>) -> Vec<f32> {
    t.model.params().iter().flat_map(|p| t.be.download(&p.value).unwrap()).collect()
}

fn batch(step: usize) -> Vec<u32> {
    ((step * 32 % 256) as u32..(step * 32 % 256 + 32) as u32).collect()
}

#[test]
fn fp16_overflow_skips_the_step_and_halves_the_scale_then_grows_it_back() {
    // 2^24 times a loss gradient of order 1 is far above fp16's 65504: the scaled gradient
    // operand of the first backward matmul rounds to inf.
    let s = spec(&["precision.compute=\"fp16\"", "precision.loss_scale=16777216.0", "precision.growth_interval=3"]);
    let data = data();
    let mut t = Trainer::new(CpuBackend::new(1), &s, 20, 4, 100).unwrap();
    let before = weights(&t);
    let stats = t.step(&data, &batch(0), &mut NoReduce).unwrap();
    assert_eq!(stats.skipped, Some(Skip::Overflow));
    assert!(!stats.grad_norm.is_finite());
    assert_eq!(t.loss_scaler.as_ref().unwrap().scale, 8_388_608.0, "halved");
    assert_eq!(weights(&t), before, "a skipped step leaves the weights alone");
    assert_eq!(t.optimizer.step, 0, "and the optimizer's step count (Adam bias correction)");
    // Keep stepping: the scale falls until the gradients fit, then updates apply.
    let mut applied = 0;
    for step in 1..40 {
        if t.step(&data, &batch(step), &mut NoReduce).unwrap().skipped.is_none() {
            applied += 1;
        }
    }
    let scale = t.loss_scaler.as_ref().unwrap().scale;
    assert!(applied > 20, "{applied} updates applied");
    assert!(scale <= 262_144.0, "the scale came down (at least 6 halvings) until the gradients fit: {scale}");
    assert_ne!(weights(&t), before);
    // Growth: 3 good steps in a row double the scale.
    let mut scaler = t.loss_scaler.clone().unwrap();
    let start = scaler.scale;
    scaler.good_steps = 0;
    for _ in 0..3 {
        assert!(scaler.update(true));
    }
    assert_eq!(scaler.scale, 2.0 * start);
}

#[test]
fn half_precision_training_tracks_fp32() {
    let data = data();
    let mut losses = Vec::new();
    for compute in ["fp32", "bf16", "fp16"] {
        let s = spec(&[&format!("precision.compute=\"{compute}\"")]);
        let mut t = Trainer::new(CpuBackend::new(1), &s, 20, 4, 100).unwrap();
        for step in 0..30 {
            let stats = t.step(&data, &batch(step), &mut NoReduce).unwrap();
            // fp16 starts at a loss scale of 65536 and may skip a few steps finding its level.
            let allowed = compute == "fp16" && stats.skipped == Some(Skip::Overflow) && step < 8;
            assert!(stats.skipped.is_none() || allowed, "{compute} step {step}: {:?}", stats.skipped);
        }
        let eval = t.evaluate(&data).unwrap();
        losses.push((compute, eval.loss, eval.accuracy));
    }
    let (_, fp32_loss, fp32_acc) = losses[0];
    assert!(fp32_acc > 0.95, "{losses:?}");
    for &(compute, loss, acc) in &losses[1..] {
        assert!(
            (acc - fp32_acc).abs() < 0.03 && (loss - fp32_loss).abs() < 0.1 * fp32_loss.max(0.05),
            "{compute}: {losses:?}"
        );
    }
    if lockstep_kernels::isa::bf16_unit().is_some() {
        assert_ne!(losses[1].1, fp32_loss, "bf16 really rounds");
    } else {
        assert_eq!(losses[1].1, fp32_loss, "without AMX or AVX512-BF16, bf16 computes in fp32");
        println!("this CPU has no bf16 unit: bf16 ran as fp32");
    }
}

#[test]
fn frozen_layers_get_no_update_no_state_and_no_reducer_slot() {
    let s = spec(&["finetune.freeze=[\"fc0\"]", "finetune.lr_groups=[{layers=[\"fc1\"],lr_scale=0.0}]"]);
    let data = data();
    let mut t = Trainer::new(CpuBackend::new(1), &s, 20, 4, 10).unwrap();
    let value = |t: &Trainer<CpuBackend>, name: &str| {
        t.model.params().iter().find(|p| p.name == name).map(|p| t.be.download(&p.value).unwrap()).unwrap()
    };
    let (fc0, fc1, fc2) = (value(&t, "fc0.weight"), value(&t, "fc1.weight"), value(&t, "fc2.weight"));
    for step in 0..3 {
        t.step(&data, &batch(step), &mut NoReduce).unwrap();
    }
    assert_eq!(value(&t, "fc0.weight"), fc0, "frozen");
    assert_eq!(value(&t, "fc1.weight"), fc1, "lr scale 0");
    assert_ne!(value(&t, "fc2.weight"), fc2, "trained");
    let params = t.model.params();
    for (p, (m, v)) in params.iter().zip(&t.optimizer.state) {
        let expect = if p.name.starts_with("fc0") { 0 } else { p.numel() };
        assert_eq!((t.be.len(m), t.be.len(v)), (expect, expect), "{} optimizer state", p.name);
    }
    let err = Trainer::new(CpuBackend::new(1), &spec(&["finetune.freeze=[\"conv9\"]"]), 20, 4, 10).err().unwrap();
    assert!(err.to_string().contains("no layer named \"conv9\""), "{err}");
}

#[test]
fn lora_trains_only_adapters_and_merges_into_the_same_function() {
    let dir = std::env::temp_dir().join(format!("lockstep-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = data();
    // A base model, trained a little and saved.
    let mut base = Trainer::new(CpuBackend::new(1), &spec(&[]), 20, 4, 10).unwrap();
    for step in 0..5 {
        base.step(&data, &batch(step), &mut NoReduce).unwrap();
    }
    let base_path = dir.join("base.safetensors");
    lockstep_worker::model_file::save_model(&base, &base_path).unwrap();
    let lora = spec(&[
        &format!("finetune.init_from={:?}", base_path.display().to_string()),
        "finetune.lora={layers=[\"fc0\",\"fc1\"],rank=4,alpha=8}",
    ]);
    let mut t = Trainer::new(CpuBackend::new(1), &lora, 20, 4, 10).unwrap();
    assert_eq!(
        t.evaluate(&data).unwrap(),
        base.evaluate(&data).unwrap(),
        "B = 0: the adapted model starts as the base"
    );
    let trainable: Vec<String> = t.model.params().iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    assert_eq!(trainable, ["fc0.lora_a", "fc0.lora_b", "fc1.lora_a", "fc1.lora_b", "fc2.weight", "fc2.bias"]);
    let frozen_before = t.model.params().iter().find(|p| p.name == "fc0.weight").map(|p| p.value.clone()).unwrap();
    for step in 0..10 {
        t.step(&data, &batch(step), &mut NoReduce).unwrap();
    }
    assert_eq!(t.model.params().iter().find(|p| p.name == "fc0.weight").unwrap().value, frozen_before);
    let lora_path = dir.join("lora.safetensors");
    lockstep_worker::model_file::save_model(&t, &lora_path).unwrap();
    let merged_path = dir.join("merged.safetensors");
    let merged = lockstep_worker::finetune::merge_lora_file(&lora_path, &merged_path).unwrap();
    assert_eq!(merged.len(), 2);
    // The merged file is a plain model (no adapters in its job) with the same outputs.
    let plain = spec(&[&format!("finetune.init_from={:?}", merged_path.display().to_string())]);
    let mut m = Trainer::new(CpuBackend::new(1), &plain, 20, 4, 10).unwrap();
    assert!(m.model.params().iter().all(|p| !p.name.contains("lora")));
    let (a, b) = (t.evaluate(&data).unwrap(), m.evaluate(&data).unwrap());
    assert!((a.loss - b.loss).abs() < 1e-5 && a.accuracy == b.accuracy, "{a:?} vs {b:?}");
    let err = lockstep_worker::finetune::merge_lora_file(&merged_path, &dir.join("again.safetensors")).unwrap_err();
    assert!(err.to_string().contains("no LoRA adapters"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ema_evaluation_uses_the_average_and_restores_the_weights() {
    let s = spec(&["train.ema_decay=0.9", "train.eval_ema=true"]);
    let data = data();
    let mut t = Trainer::new(CpuBackend::new(1), &s, 20, 4, 10).unwrap();
    for step in 0..6 {
        t.step(&data, &batch(step), &mut NoReduce).unwrap();
    }
    let before = weights(&t);
    let raw = t.evaluate(&data).unwrap();
    let ema = t.evaluate_ema(&data).unwrap();
    assert_eq!(weights(&t), before, "the training weights are back");
    assert_ne!(raw.loss, ema.loss);
    // The EMA evaluation is the evaluation of the corrected average, loaded by hand.
    let averaged = t.ema.as_ref().unwrap().corrected(&t.be).unwrap();
    for (p, avg) in t.model.params_mut().into_iter().zip(averaged) {
        p.value = avg;
    }
    assert_eq!(t.evaluate(&data).unwrap(), ema);
}

#[test]
fn class_weights_scale_each_class_loss() {
    let data = data();
    let mut plain = Trainer::new(CpuBackend::new(1), &spec(&[]), 20, 4, 10).unwrap();
    let mut weighted = Trainer::new(CpuBackend::new(1), &spec(&[]), 20, 4, 10).unwrap();
    weighted.class_weights = Some(vec![2.0; 4]);
    let a = plain.step(&data, &batch(0), &mut NoReduce).unwrap();
    let b = weighted.step(&data, &batch(0), &mut NoReduce).unwrap();
    assert!((b.loss - 2.0 * a.loss).abs() < 1e-9 * a.loss.abs(), "{} vs 2 x {}", b.loss, a.loss);
}

#[test]
fn an_outlier_batch_is_caught_before_its_update_and_skipped() {
    let mut data = data();
    // Examples 160..192 (the batch of step 5) are corrupted: features × 1000.
    for v in &mut data.x[160 * 20..192 * 20] {
        *v *= 1000.0;
    }
    let s = spec(&["train.blowup={action=\"skip\",window=20}"]);
    let mut t = Trainer::new(CpuBackend::new(1), &s, 20, 4, 100).unwrap();
    for step in 0..5 {
        assert_eq!(t.step(&data, &batch(step), &mut NoReduce).unwrap().skipped, None, "step {step}");
    }
    let before = weights(&t);
    let stats = t.step(&data, &batch(5), &mut NoReduce).unwrap();
    let Some(Skip::Blowup(alarm)) = &stats.skipped else { panic!("not caught: {stats:?}") };
    assert!(matches!(alarm, lockstep_worker::guards::Alarm::Outlier(_)), "one bad batch is an outlier: {alarm:?}");
    let why = alarm.why();
    assert!(why.contains("jumped") && why.contains("exploding gradients"), "{why}");
    assert_eq!(weights(&t), before, "the outlier batch changed nothing");
    assert_eq!(t.step(&data, &batch(6), &mut NoReduce).unwrap().skipped, None, "training goes on");
}

#[test]
fn a_checkpoint_carries_the_ema_and_the_loss_scale() {
    let dir = std::env::temp_dir().join(format!("lockstep-ema-ckpt-{}", std::process::id()));
    let s = spec(&["train.ema_decay=0.9", "precision.compute=\"fp16\"", "precision.loss_scale=4096.0"]);
    let data = data();
    let mut continuous = Trainer::new(CpuBackend::new(1), &s, 20, 4, 10).unwrap();
    let mut first = Trainer::new(CpuBackend::new(1), &s, 20, 4, 10).unwrap();
    for step in 0..3 {
        continuous.step(&data, &batch(step), &mut NoReduce).unwrap();
        first.step(&data, &batch(step), &mut NoReduce).unwrap();
    }
    let path = lockstep_worker::train_state::save_checkpoint(&first, &dir, 1).unwrap();
    let mut resumed = Trainer::new(CpuBackend::new(1), &s, 20, 4, 10).unwrap();
    lockstep_worker::train_state::restore_checkpoint(&mut resumed, &path).unwrap();
    for step in 3..6 {
        continuous.step(&data, &batch(step), &mut NoReduce).unwrap();
        resumed.step(&data, &batch(step), &mut NoReduce).unwrap();
    }
    assert_eq!(weights(&resumed), weights(&continuous));
    assert_eq!(resumed.loss_scaler, continuous.loss_scaler);
    let (a, b) = (resumed.ema.as_ref().unwrap(), continuous.ema.as_ref().unwrap());
    assert_eq!(a.updates, b.updates);
    assert_eq!(a.corrected(&resumed.be).unwrap(), b.corrected(&continuous.be).unwrap());
    std::fs::remove_dir_all(&dir).ok();
}

/// 50 steps at a global batch of 128, as k micro-batches of 128/k (T41), with dropout.
fn accumulated_run(k: usize) -> (Vec<f32>, Vec<f64>) {
    let s = spec(&["train.batch_size=128", &format!("train.accumulate={k}"), "model.dropout=0.1"]);
    let data = data();
    let mut t = Trainer::new(CpuBackend::new(1), &s, 20, 4, 50).unwrap();
    let batch = |step: usize| -> Vec<u32> { (0..128u32).map(|i| (step as u32 * 128 + i * 7) % 256).collect() };
    let losses = (0..50).map(|step| t.step(&data, &batch(step), &mut NoReduce).unwrap().loss).collect();
    (weights(&t), losses)
}

#[test]
fn accumulating_four_micro_batches_is_one_step_of_the_whole_batch() {
    let (w1, l1) = accumulated_run(1);
    let (w4, l4) = accumulated_run(4);
    // The same gradients summed in another order: equal to float rounding, not bit for bit.
    let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(b.abs()).max(1e-3);
    let loss_diff = l1.iter().zip(&l4).map(|(&a, &b)| rel(a, b)).fold(0.0, f64::max);
    // Weights: the largest difference against the weights' own scale (their RMS), since a
    // weight near zero has no meaningful relative error (GEMM blockings differ by ISA, and so
    // does the rounding: AVX2 gave 1.02e-4 relative on a weight of ~1e-3, AVX-512 less).
    let rms = (w1.iter().map(|&w| (w as f64).powi(2)).sum::<f64>() / w1.len() as f64).sqrt();
    let weight_diff = w1.iter().zip(&w4).map(|(&a, &b)| (a as f64 - b as f64).abs()).fold(0.0, f64::max) / rms;
    println!(
        "k=4 vs k=1 after 50 steps: max difference {weight_diff:.2e} of the weights' RMS, {loss_diff:.2e} relative (losses)"
    );
    assert!(weight_diff < 1e-5 && loss_diff < 1e-5, "{weight_diff:e} {loss_diff:e}");
    assert!(l4[49] < 0.5 * l4[0], "it trains: {} → {}", l4[0], l4[49]);
    // More micro-batches than examples is refused before anything runs.
    let sets = ["train.batch_size=128".to_string(), "train.accumulate=129".to_string()];
    let err = JobSpec::parse(BASE, Path::new("toolbox.toml"), &sets).unwrap_err().to_string();
    assert!(err.contains("train.accumulate"), "{err}");
}

#[test]
fn an_accumulated_fp16_step_checks_and_scales_the_loss_once() {
    // 4 micro-batches, each overflowing: still one skipped step and one halving, not four.
    let s = spec(&["precision.compute=\"fp16\"", "precision.loss_scale=16777216.0", "train.accumulate=4"]);
    let data = data();
    let mut t = Trainer::new(CpuBackend::new(1), &s, 20, 4, 100).unwrap();
    let before = weights(&t);
    let stats = t.step(&data, &batch(0), &mut NoReduce).unwrap();
    assert_eq!(stats.skipped, Some(Skip::Overflow));
    assert_eq!(t.loss_scaler.as_ref().unwrap().scale, 8_388_608.0, "halved once");
    assert_eq!(weights(&t), before);
    // With a scale that fits, the accumulated step applies and carries the scale through.
    let s = spec(&["precision.compute=\"fp16\"", "precision.loss_scale=1024.0", "train.accumulate=4"]);
    let mut t = Trainer::new(CpuBackend::new(1), &s, 20, 4, 100).unwrap();
    let stats = t.step(&data, &batch(0), &mut NoReduce).unwrap();
    assert_eq!((stats.skipped, stats.loss_scale), (None, 1024.0));
    assert!(stats.grad_norm.is_finite() && stats.loss.is_finite());
}
