//! The CUDA backend: GEMMs through cuBLAS, every other op a kernel of `kernels.cu`, compiled
//! once at start by NVRTC for the device's architecture. cudarc is built with
//! `dynamic-loading`, so this compiles and the binary runs without CUDA; `available()`
//! checks for a usable device first (cudarc panics when the libraries are missing).
//!
//! The `Backend` ops are infallible, like the CPU's. A driver error is recorded instead
//! (the first one sticks, as in CUDA itself) and `check()` reports it; the trainer calls
//! `check()` after every step.

use crate::{Activation, Backend, UpdateRule};
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use std::sync::{Arc, Mutex};

const KERNELS_CU: &str = include_str!("kernels.cu");
const BLOCK: u32 = 256;

/// Why CUDA cannot be used here, or Ok with the device's name.
pub fn available(ordinal: usize) -> Result<String, String> {
    let probe = std::panic::catch_unwind(|| {
        // SAFETY: only asks the dynamic loader whether the driver library can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("the CUDA driver library (libcuda.so) is not installed".to_string());
        }
        let count = CudaContext::device_count().map_err(|e| format!("no CUDA device: {e}"))?;
        if ordinal >= count as usize {
            return Err(format!("cuda:{ordinal} requested but {count} device(s) present"));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("cuda:{ordinal}: {e}"))?;
        ctx.name().map_err(|e| e.to_string())
    });
    probe.unwrap_or_else(|_| Err("loading the CUDA libraries failed".to_string()))
}

struct Kernels {
    _module: Arc<CudaModule>,
    fill: CudaFunction,
    add_row_vector: CudaFunction,
    sum_rows: CudaFunction,
    act_forward: CudaFunction,
    act_backward: CudaFunction,
    axpy: CudaFunction,
    scale: CudaFunction,
    mul: CudaFunction,
    sum_squares: CudaFunction,
    add_sign: CudaFunction,
    softmax_cross_entropy: CudaFunction,
    softmax: CudaFunction,
    sgd_step: CudaFunction,
    momentum_step: CudaFunction,
    adam_step: CudaFunction,
}

pub struct CudaBackend {
    pub ordinal: usize,
    name: String,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    /// The first driver error of any op since the last `check()`.
    error: Mutex<Option<String>>,
}

// SAFETY: the cuBLAS handle is only used through &self methods that enqueue on the one
// stream this backend owns; cudarc's handle is not tied to the creating thread.
unsafe impl Send for CudaBackend {}
unsafe impl Sync for CudaBackend {}

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u32).div_ceil(BLOCK).max(1), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

fn act_code(act: Activation) -> (i32, f32) {
    match act {
        Activation::Identity => (0, 0.0),
        Activation::Sigmoid => (1, 0.0),
        Activation::Tanh => (2, 0.0),
        Activation::Relu => (3, 0.0),
        Activation::LeakyRelu { slope } => (4, slope),
        Activation::Swish { beta } => (5, beta),
        Activation::Gelu => (6, 0.0),
    }
}

impl CudaBackend {
    /// Opens device `ordinal`, compiles the kernels for its architecture and sets up cuBLAS.
    pub fn new(ordinal: usize) -> Result<Self, String> {
        let name = available(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| e.to_string())?;
        let (major, minor) = ctx.compute_capability().map_err(|e| e.to_string())?;
        let opts =
            CompileOptions { options: vec![format!("--gpu-architecture=sm_{major}{minor}")], ..Default::default() };
        let ptx = compile_ptx_with_opts(KERNELS_CU, opts).map_err(|e| format!("compiling kernels.cu: {e}"))?;
        let module = ctx.load_module(ptx).map_err(|e| e.to_string())?;
        let f = |n: &str| module.load_function(n).map_err(|e| format!("kernel {n}: {e}"));
        let k = Kernels {
            fill: f("fill")?,
            add_row_vector: f("add_row_vector")?,
            sum_rows: f("sum_rows")?,
            act_forward: f("act_forward")?,
            act_backward: f("act_backward")?,
            axpy: f("axpy")?,
            scale: f("scale")?,
            mul: f("mul")?,
            sum_squares: f("sum_squares")?,
            add_sign: f("add_sign")?,
            softmax_cross_entropy: f("softmax_cross_entropy")?,
            softmax: f("softmax")?,
            sgd_step: f("sgd_step")?,
            momentum_step: f("momentum_step")?,
            adam_step: f("adam_step")?,
            _module: module,
        };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS: {e}"))?;
        Ok(Self {
            ordinal,
            name: format!("cuda:{ordinal} ({name}, sm_{major}{minor})"),
            stream,
            blas,
            k,
            error: Mutex::new(None),
        })
    }

    fn record<T, E: std::fmt::Display>(&self, what: &str, r: Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                if let Ok(mut slot) = self.error.lock() {
                    slot.get_or_insert_with(|| format!("{what}: {e}"));
                }
                None
            }
        }
    }

    /// Sum of per-block f64 partials, added on the host in block order (deterministic).
    fn sum_partials(&self, partial: &CudaSlice<f64>) -> f64 {
        self.record("reading partial sums", self.stream.clone_dtoh(partial)).map_or(0.0, |v| v.iter().sum())
    }
}

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn check(&self) -> Result<(), String> {
        let sync = self.stream.synchronize();
        let mut slot = self.error.lock().map_err(|_| "error slot poisoned".to_string())?;
        if let Some(e) = slot.take() {
            return Err(e);
        }
        sync.map_err(|e| e.to_string())
    }

    // Allocation failure has no buffer to return: it unwinds with the device and the size
    // named, and `lockstep_worker::device_task` turns that into the task's error (the
    // process and the daemon go on).
    fn zeros(&self, len: usize) -> Self::Buf {
        match self.stream.alloc_zeros::<f32>(len) {
            Ok(b) => b,
            Err(e) => panic!("{}: allocating {len} floats failed: {e}", self.name),
        }
    }
    fn upload(&self, data: &[f32]) -> Self::Buf {
        match self.stream.clone_htod(data) {
            Ok(b) => b,
            Err(e) => panic!("{}: uploading {} floats failed: {e}", self.name, data.len()),
        }
    }
    // A failed copy is recorded for `check()` (which fails the step); until then the
    // caller gets a buffer of the right length full of NaN, never a short one it would
    // index past, nor plausible numbers.
    fn download(&self, buf: &Self::Buf) -> Vec<f32> {
        self.record("download", self.stream.clone_dtoh(buf)).unwrap_or_else(|| vec![f32::NAN; buf.len()])
    }
    fn len(&self, buf: &Self::Buf) -> usize {
        buf.len()
    }
    fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf) {
        self.record("copy", self.stream.memcpy_dtod(src, dst));
    }
    fn fill(&self, buf: &mut Self::Buf, value: f32) {
        let n = buf.len() as i32;
        let mut b = self.stream.launch_builder(&self.k.fill);
        b.arg(buf).arg(&value).arg(&n);
        // SAFETY: arguments match the kernel's signature; n bounds every access.
        self.record("fill", unsafe { b.launch(grid(n as usize)) });
    }
    fn copy_range(&self, src: &Self::Buf, src_off: usize, dst: &mut Self::Buf, dst_off: usize, len: usize) {
        let from = src.slice(src_off..src_off + len);
        let mut to = dst.slice_mut(dst_off..dst_off + len);
        self.record("copy_range", self.stream.memcpy_dtod(&from, &mut to));
    }

    fn matmul(&self, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf, g: crate::Gemm) {
        let crate::Gemm { m, k, n, trans_a, trans_b, accumulate } = g;
        if m == 0 || n == 0 {
            return;
        }
        // Row-major C (m,n) = op(A)·op(B) is column-major Cᵀ (n,m) = op(B)ᵀ·op(A)ᵀ.
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let cfg = GemmConfig {
            transa: op(trans_b),
            transb: op(trans_a),
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: 1.0f32,
            lda: if trans_b { k } else { n } as i32,
            ldb: if trans_a { m } else { k } as i32,
            beta: if accumulate { 1.0 } else { 0.0 },
            ldc: n as i32,
        };
        // SAFETY: the leading dimensions and sizes describe buffers of at least m·k, k·n, m·n.
        self.record("cublasSgemm", unsafe { self.blas.gemm(cfg, b, a, c) });
    }

    fn add_row_vector(&self, x: &mut Self::Buf, bias: &Self::Buf, rows: usize, cols: usize) {
        let (r, c) = (rows as i32, cols as i32);
        let mut l = self.stream.launch_builder(&self.k.add_row_vector);
        l.arg(x).arg(bias).arg(&r).arg(&c);
        // SAFETY: x holds rows·cols values and bias cols.
        self.record("add_row_vector", unsafe { l.launch(grid(rows * cols)) });
    }

    fn sum_rows(&self, x: &Self::Buf, out: &mut Self::Buf, rows: usize, cols: usize, accumulate: bool) {
        let (r, c, acc) = (rows as i32, cols as i32, accumulate as i32);
        let mut l = self.stream.launch_builder(&self.k.sum_rows);
        l.arg(x).arg(out).arg(&r).arg(&c).arg(&acc);
        // SAFETY: one thread per column, bounded by cols.
        self.record("sum_rows", unsafe { l.launch(grid(cols)) });
    }

    fn activation_forward(&self, act: Activation, x: &Self::Buf, y: &mut Self::Buf) {
        let (code, p) = act_code(act);
        let n = x.len() as i32;
        let mut l = self.stream.launch_builder(&self.k.act_forward);
        l.arg(&code).arg(&p).arg(x).arg(y).arg(&n);
        // SAFETY: element-wise over n.
        self.record("act_forward", unsafe { l.launch(grid(n as usize)) });
    }

    fn activation_backward(
        &self,
        act: Activation,
        x: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> f32 {
        let (code, p) = act_code(act);
        let n = x.len() as i32;
        let cfg = grid(n as usize);
        let Some(mut partial) = self.record("alloc", self.stream.alloc_zeros::<f64>(cfg.grid_dim.0 as usize)) else {
            return 0.0;
        };
        let acc = accumulate as i32;
        let mut l = self.stream.launch_builder(&self.k.act_backward);
        l.arg(&code).arg(&p).arg(x).arg(dy).arg(dx).arg(&n).arg(&acc).arg(&mut partial);
        // SAFETY: element-wise over n; one partial per block.
        self.record("act_backward", unsafe { l.launch(cfg) });
        self.sum_partials(&partial) as f32
    }

    fn axpy(&self, alpha: f32, x: &Self::Buf, y: &mut Self::Buf) {
        let n = y.len() as i32;
        let mut l = self.stream.launch_builder(&self.k.axpy);
        l.arg(&alpha).arg(x).arg(y).arg(&n);
        // SAFETY: element-wise over n.
        self.record("axpy", unsafe { l.launch(grid(n as usize)) });
    }
    fn scale(&self, x: &mut Self::Buf, alpha: f32) {
        let n = x.len() as i32;
        let mut l = self.stream.launch_builder(&self.k.scale);
        l.arg(x).arg(&alpha).arg(&n);
        // SAFETY: element-wise over n.
        self.record("scale", unsafe { l.launch(grid(n as usize)) });
    }
    fn mul(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf) {
        let (n, acc) = (out.len() as i32, 0i32);
        let mut l = self.stream.launch_builder(&self.k.mul);
        l.arg(a).arg(b).arg(out).arg(&n).arg(&acc);
        // SAFETY: element-wise over n.
        self.record("mul", unsafe { l.launch(grid(n as usize)) });
    }
    fn mul_acc(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf) {
        let (n, acc) = (out.len() as i32, 1i32);
        let mut l = self.stream.launch_builder(&self.k.mul);
        l.arg(a).arg(b).arg(out).arg(&n).arg(&acc);
        // SAFETY: element-wise over n.
        self.record("mul_acc", unsafe { l.launch(grid(n as usize)) });
    }
    fn sum_squares(&self, x: &Self::Buf) -> f64 {
        let n = x.len() as i32;
        let cfg = grid(n as usize);
        let Some(mut partial) = self.record("alloc", self.stream.alloc_zeros::<f64>(cfg.grid_dim.0 as usize)) else {
            return 0.0;
        };
        let mut l = self.stream.launch_builder(&self.k.sum_squares);
        l.arg(x).arg(&n).arg(&mut partial);
        // SAFETY: one partial per block.
        self.record("sum_squares", unsafe { l.launch(cfg) });
        self.sum_partials(&partial)
    }
    fn add_sign(&self, alpha: f32, src: &Self::Buf, dst: &mut Self::Buf) {
        let n = dst.len() as i32;
        let mut l = self.stream.launch_builder(&self.k.add_sign);
        l.arg(&alpha).arg(src).arg(dst).arg(&n);
        // SAFETY: element-wise over n.
        self.record("add_sign", unsafe { l.launch(grid(n as usize)) });
    }

    fn softmax_cross_entropy(
        &self,
        logits: &Self::Buf,
        targets: &[u32],
        class_weights: Option<&[f32]>,
        dlogits: &mut Self::Buf,
        rows: usize,
        classes: usize,
        grad_scale: f32,
    ) -> (f64, usize) {
        if rows == 0 {
            return (0.0, 0);
        }
        let Some(t) = self.record("upload targets", self.stream.clone_htod(targets)) else { return (f64::NAN, 0) };
        let weights = class_weights.unwrap_or(&[0.0]);
        let Some(w) = self.record("upload class weights", self.stream.clone_htod(weights)) else {
            return (f64::NAN, 0);
        };
        let Some(mut loss) = self.record("alloc", self.stream.alloc_zeros::<f64>(rows)) else { return (f64::NAN, 0) };
        let Some(mut correct) = self.record("alloc", self.stream.alloc_zeros::<i32>(rows)) else {
            return (f64::NAN, 0);
        };
        let (has_w, c) = (class_weights.is_some() as i32, classes as i32);
        let mut l = self.stream.launch_builder(&self.k.softmax_cross_entropy);
        l.arg(logits)
            .arg(&t)
            .arg(&w)
            .arg(&has_w)
            .arg(dlogits)
            .arg(&mut loss)
            .arg(&mut correct)
            .arg(&c)
            .arg(&grad_scale);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: one block per row; each block reads `classes` logits of its row.
        self.record("softmax_cross_entropy", unsafe { l.launch(cfg) });
        let loss = self.record("read loss", self.stream.clone_dtoh(&loss)).unwrap_or_default();
        let correct = self.record("read correct", self.stream.clone_dtoh(&correct)).unwrap_or_default();
        (loss.iter().sum(), correct.iter().filter(|&&c| c != 0).count())
    }

    fn softmax(&self, logits: &Self::Buf, probs: &mut Self::Buf, rows: usize, classes: usize) {
        if rows == 0 {
            return;
        }
        let c = classes as i32;
        let mut l = self.stream.launch_builder(&self.k.softmax);
        l.arg(logits).arg(probs).arg(&c);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: one block per row.
        self.record("softmax", unsafe { l.launch(cfg) });
    }

    fn optimizer_step(
        &self,
        rule: UpdateRule,
        lr: f32,
        grad_scale: f32,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        state1: &mut Self::Buf,
        state2: &mut Self::Buf,
    ) {
        let n = param.len() as i32;
        let cfg = grid(n as usize);
        let launched = match rule {
            UpdateRule::Sgd => {
                let mut l = self.stream.launch_builder(&self.k.sgd_step);
                l.arg(param).arg(grad).arg(&lr).arg(&grad_scale).arg(&n);
                // SAFETY: element-wise over n.
                unsafe { l.launch(cfg) }
            }
            UpdateRule::Momentum { mu, nesterov } => {
                let nest = nesterov as i32;
                let mut l = self.stream.launch_builder(&self.k.momentum_step);
                l.arg(param).arg(grad).arg(state1).arg(&lr).arg(&grad_scale).arg(&mu).arg(&nest).arg(&n);
                // SAFETY: element-wise over n; state1 has n values.
                unsafe { l.launch(cfg) }
            }
            UpdateRule::Adam { beta1, beta2, eps, step, decoupled_decay } => {
                let step_size = lr / (1.0 - beta1.powi(step as i32));
                let inv_sqrt_bc2 = 1.0 / (1.0 - beta2.powi(step as i32)).sqrt();
                let mut l = self.stream.launch_builder(&self.k.adam_step);
                l.arg(param)
                    .arg(grad)
                    .arg(state1)
                    .arg(state2)
                    .arg(&lr)
                    .arg(&grad_scale)
                    .arg(&beta1)
                    .arg(&beta2)
                    .arg(&eps)
                    .arg(&step_size)
                    .arg(&inv_sqrt_bc2)
                    .arg(&decoupled_decay)
                    .arg(&n);
                // SAFETY: element-wise over n; both moment buffers have n values.
                unsafe { l.launch(cfg) }
            }
        };
        self.record("optimizer_step", launched);
    }
}
