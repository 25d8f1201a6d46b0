//! Every `Backend` op on CUDA against the CPU reference. Without a usable device the test
//! prints why and passes (CI has no GPU; `scripts/gpu-check.sh` runs it where there is one).
#![cfg(feature = "cuda")]

use lockstep_kernels::cuda::{available, CudaBackend};
use lockstep_kernels::{Activation, Backend, CpuBackend, Gemm, KernelError, UpdateRule};

/// fp32 tolerance: GEMMs and reductions sum in a different order than the CPU.
const TOL: f32 = 1e-4;

fn data(n: usize, salt: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(salt) >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 4.0
        })
        .collect()
}

fn close(what: &str, gpu: &[f32], cpu: &[f32]) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let tol = TOL * c.abs().max(1.0);
        assert!((g - c).abs() <= tol, "{what}[{i}]: cuda {g} vs cpu {c}");
    }
}

fn device() -> Option<CudaBackend> {
    match available(0) {
        Err(reason) => {
            println!("skipping CUDA parity tests: {reason}");
            None
        }
        Ok(_) => Some(CudaBackend::new(0).expect("a device that probes as available must open")),
    }
}

#[test]
fn every_op_matches_the_cpu_reference() {
    let Some(gpu) = device() else { return };
    let cpu = CpuBackend::new(2);
    println!("comparing {} against {}", gpu.name(), cpu.name());

    // matmul, all transposes, plain and accumulating.
    let (m, k, n) = (67, 129, 33);
    let a = data(m * k, 1);
    let b = data(k * n, 2);
    for ta in [false, true] {
        for tb in [false, true] {
            for acc in [false, true] {
                let init = data(m * n, 3);
                let (mut cc, mut gc) = (init.clone(), gpu.upload(&init).unwrap());
                cpu.matmul(&a, &b, &mut cc, Gemm { trans_a: ta, trans_b: tb, ..Gemm::nn(m, k, n) }.accumulate_if(acc))
                    .unwrap();
                gpu.matmul(
                    &gpu.upload(&a).unwrap(),
                    &gpu.upload(&b).unwrap(),
                    &mut gc,
                    Gemm { trans_a: ta, trans_b: tb, ..Gemm::nn(m, k, n) }.accumulate_if(acc),
                )
                .unwrap();
                close(&format!("matmul ta={ta} tb={tb} acc={acc}"), &gpu.download(&gc).unwrap(), &cc);
                // Rows 9..40 alone (a weight gradient in pieces), on strided device views.
                let g = Gemm { trans_a: ta, trans_b: tb, ..Gemm::nn(m, k, n) }.accumulate_if(acc);
                let (mut cc, mut gc) = (init.clone(), gpu.upload(&init).unwrap());
                cpu.matmul_rows(&a, &b, &mut cc, g, 9..40).unwrap();
                gpu.matmul_rows(&gpu.upload(&a).unwrap(), &gpu.upload(&b).unwrap(), &mut gc, g, 9..40).unwrap();
                close(&format!("matmul_rows ta={ta} tb={tb} acc={acc}"), &gpu.download(&gc).unwrap(), &cc);
            }
        }
    }
    // Into and out of part of an existing buffer.
    let mut part = gpu.upload(&data(50, 4)).unwrap();
    gpu.upload_into(&[1.0, 2.0, 3.0], &mut part, 10).unwrap();
    let mut back = [0.0; 4];
    gpu.download_into(&part, 9, &mut back).unwrap();
    assert_eq!(&back[1..], &[1.0, 2.0, 3.0]);

    let (rows, cols) = (37, 300);
    let x = data(rows * cols, 4);
    let bias = data(cols, 5);
    let (mut cx, mut gx) = (x.clone(), gpu.upload(&x).unwrap());
    cpu.add_row_vector(&mut cx, &bias, rows, cols).unwrap();
    gpu.add_row_vector(&mut gx, &gpu.upload(&bias).unwrap(), rows, cols).unwrap();
    close("add_row_vector", &gpu.download(&gx).unwrap(), &cx);

    for acc in [false, true] {
        let (mut co, mut go) = (bias.clone(), gpu.upload(&bias).unwrap());
        cpu.sum_rows(&x, &mut co, rows, cols, acc).unwrap();
        gpu.sum_rows(&gpu.upload(&x).unwrap(), &mut go, rows, cols, acc).unwrap();
        close("sum_rows", &gpu.download(&go).unwrap(), &co);
    }

    let dy = data(rows * cols, 6);
    for act in [
        Activation::Identity,
        Activation::Sigmoid,
        Activation::Tanh,
        Activation::Relu,
        Activation::LeakyRelu { slope: 0.1 },
        Activation::Swish { beta: 1.3 },
        Activation::Gelu,
    ] {
        let (mut cy, mut gy) = (vec![0.0; x.len()], gpu.zeros(x.len()).unwrap());
        cpu.activation_forward(act, &x, &mut cy).unwrap();
        gpu.activation_forward(act, &gpu.upload(&x).unwrap(), &mut gy).unwrap();
        close(&format!("{act:?} forward"), &gpu.download(&gy).unwrap(), &cy);
        let (mut cdx, mut gdx) = (vec![0.0; x.len()], gpu.zeros(x.len()).unwrap());
        let cb = cpu.activation_backward(act, &x, &dy, &mut cdx, false).unwrap();
        let gb =
            gpu.activation_backward(act, &gpu.upload(&x).unwrap(), &gpu.upload(&dy).unwrap(), &mut gdx, false).unwrap();
        close(&format!("{act:?} backward"), &gpu.download(&gdx).unwrap(), &cdx);
        close(&format!("{act:?} dbeta"), &[gb], &[cb]);
    }

    let (mut cy, mut gy) = (dy.clone(), gpu.upload(&dy).unwrap());
    cpu.axpy(0.7, &x, &mut cy).unwrap();
    gpu.axpy(0.7, &gpu.upload(&x).unwrap(), &mut gy).unwrap();
    close("axpy", &gpu.download(&gy).unwrap(), &cy);
    cpu.scale(&mut cy, -1.5).unwrap();
    gpu.scale(&mut gy, -1.5).unwrap();
    close("scale", &gpu.download(&gy).unwrap(), &cy);
    cpu.mul_acc(&x, &dy, &mut cy).unwrap();
    gpu.mul_acc(&gpu.upload(&x).unwrap(), &gpu.upload(&dy).unwrap(), &mut gy).unwrap();
    close("mul_acc", &gpu.download(&gy).unwrap(), &cy);
    cpu.mul(&x, &dy, &mut cy).unwrap();
    gpu.mul(&gpu.upload(&x).unwrap(), &gpu.upload(&dy).unwrap(), &mut gy).unwrap();
    close("mul", &gpu.download(&gy).unwrap(), &cy);
    cpu.add_sign(0.25, &x, &mut cy).unwrap();
    gpu.add_sign(0.25, &gpu.upload(&x).unwrap(), &mut gy).unwrap();
    close("add_sign", &gpu.download(&gy).unwrap(), &cy);
    let (cs, gs) = (cpu.sum_squares(&x).unwrap(), gpu.sum_squares(&gpu.upload(&x).unwrap()).unwrap());
    assert!((cs - gs).abs() <= 1e-9 * cs, "sum_squares: {gs} vs {cs}");
    let mut g_fill = gpu.zeros(5).unwrap();
    gpu.fill(&mut g_fill, 2.5).unwrap();
    assert_eq!(gpu.download(&g_fill).unwrap(), vec![2.5; 5]);
    let mut g_dst = gpu.zeros(10).unwrap();
    gpu.copy_range(&gpu.upload(&x).unwrap(), 3, &mut g_dst, 2, 5).unwrap();
    assert_eq!(gpu.download(&g_dst).unwrap()[2..7], x[3..8]);

    // Softmax cross-entropy (with and without class weights) and softmax.
    let classes = 10;
    let logits: Vec<f32> = data(rows * classes, 7).iter().map(|v| v * 3.0).collect();
    let targets: Vec<u32> = (0..rows as u32).map(|i| i % classes as u32).collect();
    let weights: Vec<f32> = (0..classes).map(|c| 0.5 + c as f32 * 0.1).collect();
    for w in [None, Some(&weights[..])] {
        let (mut cd, mut gd) = (vec![0.0; logits.len()], gpu.zeros(logits.len()).unwrap());
        let (cl, cc) = cpu.softmax_cross_entropy(&logits, &targets, w, &mut cd, rows, classes, 0.5).unwrap();
        let (gl, gc) =
            gpu.softmax_cross_entropy(&gpu.upload(&logits).unwrap(), &targets, w, &mut gd, rows, classes, 0.5).unwrap();
        assert!((cl - gl).abs() <= 1e-4 * cl.abs().max(1.0), "softmax CE loss: {gl} vs {cl}");
        assert_eq!(cc, gc, "softmax CE correct count");
        close("softmax CE grad", &gpu.download(&gd).unwrap(), &cd);
    }
    let (mut cp, mut gp) = (vec![0.0; logits.len()], gpu.zeros(logits.len()).unwrap());
    cpu.softmax(&logits, &mut cp, rows, classes).unwrap();
    gpu.softmax(&gpu.upload(&logits).unwrap(), &mut gp, rows, classes).unwrap();
    close("softmax", &gpu.download(&gp).unwrap(), &cp);

    // Optimizer updates, three steps each.
    let w0 = data(1000, 8);
    let g = data(1000, 9);
    for rule in [
        UpdateRule::Sgd,
        UpdateRule::Momentum { mu: 0.9, nesterov: false },
        UpdateRule::Momentum { mu: 0.9, nesterov: true },
        UpdateRule::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 1, decoupled_decay: 0.01 },
    ] {
        let (mut cw, mut cs1, mut cs2) = (w0.clone(), vec![0.0; 1000], vec![0.0; 1000]);
        let (mut gw, mut gs1, mut gs2) = (gpu.upload(&w0).unwrap(), gpu.zeros(1000).unwrap(), gpu.zeros(1000).unwrap());
        let gg = gpu.upload(&g).unwrap();
        for step in 1..=3 {
            let rule = match rule {
                UpdateRule::Adam { beta1, beta2, eps, decoupled_decay, .. } => {
                    UpdateRule::Adam { beta1, beta2, eps, step, decoupled_decay }
                }
                r => r,
            };
            cpu.optimizer_step(rule, 0.01, 0.5, &mut cw, &g, &mut cs1, &mut cs2).unwrap();
            gpu.optimizer_step(rule, 0.01, 0.5, &mut gw, &gg, &mut gs1, &mut gs2).unwrap();
        }
        close(&format!("{rule:?}"), &gpu.download(&gw).unwrap(), &cw);
    }
    gpu.check().expect("no device fault");
}

#[test]
fn an_op_without_a_kernel_says_so_by_name() {
    let Some(gpu) = device() else { return };
    let (x, mut y) = (gpu.upload(&[1.0; 8]).unwrap(), gpu.zeros(8).unwrap());
    let err = gpu.embedding_forward(&x, &[0, 1], 4, &mut y).unwrap_err();
    assert!(matches!(err, KernelError::Unsupported { op: "embedding_forward", .. }), "{err}");
    assert!(err.to_string().starts_with("embedding_forward is not supported on the cuda:0"), "{err}");
}
