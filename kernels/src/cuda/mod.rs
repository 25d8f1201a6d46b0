//! The CUDA backend: GEMMs through cuBLAS, every other op a kernel of `kernels.cu`, compiled
//! once at start by NVRTC for the device's architecture. cudarc is built with
//! `dynamic-loading`, so this compiles and the binary runs without CUDA; `available()`
//! checks for a usable device first (cudarc panics when the libraries are missing).
//!
//! Every op returns the driver's error for its launch or copy at once; a fault inside a
//! kernel surfaces at the next synchronisation (`check()`, which the trainer calls after
//! every step, or a download). Ops this backend has no kernel for answer
//! `KernelError::Unsupported` with their name: nothing goes through the host silently.

use crate::{Activation, AttentionDims, Backend, KernelError, MatmulPrecision, Result, Rotary, UpdateRule, Window};
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use std::sync::Arc;

const KERNELS_CU: &str = include_str!("kernels.cu");
const BLOCK: u32 = 256;

/// Why CUDA cannot be used here, or Ok with the device's name.
pub fn available(ordinal: usize) -> std::result::Result<String, String> {
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
    pub fn new(ordinal: usize) -> std::result::Result<Self, String> {
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
        Ok(Self { ordinal, name: format!("cuda:{ordinal} ({name}, sm_{major}{minor})"), stream, blas, k })
    }

    /// The driver's error `e` of op `op`, with the device named.
    fn device_err<E: std::error::Error + Send + Sync + 'static>(&self, op: &'static str, e: E) -> KernelError {
        KernelError::Device { op, device: self.name.clone(), source: Box::new(e) }
    }

    fn unsupported(&self, op: &'static str) -> KernelError {
        KernelError::Unsupported { op, backend: self.name.clone() }
    }

    /// Sum of per-block f64 partials, added on the host in block order (deterministic).
    fn sum_partials(&self, op: &'static str, partial: &CudaSlice<f64>) -> Result<f64> {
        Ok(self.stream.clone_dtoh(partial).map_err(|e| self.device_err(op, e))?.iter().sum())
    }

    /// out (+)= a ⊙ b.
    fn mul_into(
        &self,
        op: &'static str,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<()> {
        let (n, acc) = (out.len() as i32, accumulate as i32);
        let mut l = self.stream.launch_builder(&self.k.mul);
        l.arg(a).arg(b).arg(out).arg(&n).arg(&acc);
        // SAFETY: element-wise over n.
        unsafe { l.launch(grid(n as usize)) }.map(drop).map_err(|e| self.device_err(op, e))
    }

    /// A buffer of `len` f64 zeros for per-block partial sums.
    fn partials(&self, op: &'static str, len: usize) -> Result<CudaSlice<f64>> {
        self.stream.alloc_zeros::<f64>(len).map_err(|e| self.device_err(op, e))
    }
}

/// Trait methods that answer `KernelError::Unsupported` with their own name.
macro_rules! unsupported {
    ($($op:ident($($arg:ty),*) -> $ret:ty;)*) => {
        $(
            #[allow(clippy::too_many_arguments)]
            fn $op(&self, $(_: $arg),*) -> Result<$ret> {
                Err(self.unsupported(stringify!($op)))
            }
        )*
    };
}

/// The device buffer, as the `unsupported!` list spells it.
type Buf = CudaSlice<f32>;

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;

    fn name(&self) -> String {
        self.name.clone()
    }
    fn len(&self, buf: &Self::Buf) -> usize {
        buf.len()
    }

    fn check(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| self.device_err("synchronize", e))
    }

    fn zeros(&self, len: usize) -> Result<Self::Buf> {
        self.stream.alloc_zeros::<f32>(len).map_err(|e| self.device_err("zeros", e))
    }
    fn upload(&self, data: &[f32]) -> Result<Self::Buf> {
        self.stream.clone_htod(data).map_err(|e| self.device_err("upload", e))
    }
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>> {
        self.stream.clone_dtoh(buf).map_err(|e| self.device_err("download", e))
    }
    fn upload_into(&self, data: &[f32], buf: &mut Self::Buf, offset: usize) -> Result<()> {
        crate::need_len("upload_into", "the buffer", buf.len(), offset + data.len())?;
        let mut part = buf.slice_mut(offset..offset + data.len());
        self.stream.memcpy_htod(data, &mut part).map_err(|e| self.device_err("upload_into", e))
    }
    fn download_into(&self, buf: &Self::Buf, offset: usize, out: &mut [f32]) -> Result<()> {
        crate::need_len("download_into", "the buffer", buf.len(), offset + out.len())?;
        let part = buf.slice(offset..offset + out.len());
        self.stream.memcpy_dtoh(&part, out).map_err(|e| self.device_err("download_into", e))
    }
    fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf) -> Result<()> {
        self.stream.memcpy_dtod(src, dst).map_err(|e| self.device_err("copy", e))
    }
    fn duplicate(&self, src: &Self::Buf) -> Result<Self::Buf> {
        self.stream.clone_dtod(src).map_err(|e| self.device_err("duplicate", e))
    }
    fn fill(&self, buf: &mut Self::Buf, value: f32) -> Result<()> {
        let n = buf.len() as i32;
        let mut b = self.stream.launch_builder(&self.k.fill);
        b.arg(buf).arg(&value).arg(&n);
        // SAFETY: arguments match the kernel's signature; n bounds every access.
        unsafe { b.launch(grid(n as usize)) }.map(drop).map_err(|e| self.device_err("fill", e))
    }
    fn copy_range(
        &self,
        src: &Self::Buf,
        src_off: usize,
        dst: &mut Self::Buf,
        dst_off: usize,
        len: usize,
    ) -> Result<()> {
        crate::need_len("copy_range", "src", src.len(), src_off + len)?;
        crate::need_len("copy_range", "dst", dst.len(), dst_off + len)?;
        let from = src.slice(src_off..src_off + len);
        let mut to = dst.slice_mut(dst_off..dst_off + len);
        self.stream.memcpy_dtod(&from, &mut to).map_err(|e| self.device_err("copy_range", e))
    }

    fn set_matmul_precision(&mut self, precision: MatmulPrecision) -> Result<()> {
        match precision {
            MatmulPrecision::Fp32 => Ok(()),
            MatmulPrecision::Bf16 => Err(self.unsupported("matmul in bf16")),
            MatmulPrecision::Fp16 => Err(self.unsupported("matmul in fp16")),
        }
    }

    fn matmul(&self, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf, g: crate::Gemm) -> Result<()> {
        let crate::Gemm { m, k, n, trans_a, trans_b, accumulate, precision } = g;
        match precision.unwrap_or(MatmulPrecision::Fp32) {
            MatmulPrecision::Fp32 => {}
            MatmulPrecision::Bf16 => return Err(self.unsupported("matmul in bf16")),
            MatmulPrecision::Fp16 => return Err(self.unsupported("matmul in fp16")),
        }
        crate::need_len("matmul", "a", a.len(), m * k)?;
        crate::need_len("matmul", "b", b.len(), k * n)?;
        crate::need_len("matmul", "c", c.len(), m * n)?;
        if m == 0 || n == 0 {
            return Ok(());
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
        // SAFETY: the lengths checked above cover m·k, k·n and m·n values.
        unsafe { self.blas.gemm(cfg, b, a, c) }.map_err(|e| self.device_err("matmul (cublasSgemm)", e))
    }

    fn matmul_rows(
        &self,
        a: &Self::Buf,
        b: &Self::Buf,
        c: &mut Self::Buf,
        g: crate::Gemm,
        rows: std::ops::Range<usize>,
    ) -> Result<()> {
        let crate::Gemm { m, k, n, trans_a, trans_b, accumulate, precision } = g;
        if precision.unwrap_or(MatmulPrecision::Fp32) != MatmulPrecision::Fp32 {
            return Err(self.unsupported("matmul_rows in half precision"));
        }
        crate::check_row_range(rows.clone(), m)?;
        crate::need_len("matmul_rows", "a", a.len(), m * k)?;
        crate::need_len("matmul_rows", "b", b.len(), k * n)?;
        crate::need_len("matmul_rows", "c", c.len(), m * n)?;
        if rows.is_empty() || n == 0 {
            return Ok(());
        }
        // As `matmul`, on views: op(a)'s rows start at column `rows.start` of a stored (k, m)
        // (leading dimension m), or at its row `rows.start` when a is stored (m, k).
        let (a_rows, ldb) = if trans_a { (a.slice(rows.start..), m) } else { (a.slice(rows.start * k..), k) };
        let mut c_rows = c.slice_mut(rows.start * n..rows.end * n);
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let cfg = GemmConfig {
            transa: op(trans_b),
            transb: op(trans_a),
            m: n as i32,
            n: rows.len() as i32,
            k: k as i32,
            alpha: 1.0f32,
            lda: if trans_b { k } else { n } as i32,
            ldb: ldb as i32,
            beta: if accumulate { 1.0 } else { 0.0 },
            ldc: n as i32,
        };
        // SAFETY: the lengths checked above cover every value the strided views reach.
        unsafe { self.blas.gemm(cfg, b, &a_rows, &mut c_rows) }.map_err(|e| self.device_err("matmul_rows", e))
    }

    fn repeat_rows(&self, row: &Self::Buf, rows: usize) -> Result<Self::Buf> {
        let cols = self.len(row);
        let mut out = self.zeros(rows * cols)?;
        self.add_row_vector(&mut out, row, rows, cols)?;
        Ok(out)
    }

    fn add_row_vector(&self, x: &mut Self::Buf, bias: &Self::Buf, rows: usize, cols: usize) -> Result<()> {
        let (r, c) = (rows as i32, cols as i32);
        let mut l = self.stream.launch_builder(&self.k.add_row_vector);
        l.arg(x).arg(bias).arg(&r).arg(&c);
        // SAFETY: x holds rows·cols values and bias cols.
        unsafe { l.launch(grid(rows * cols)) }.map(drop).map_err(|e| self.device_err("add_row_vector", e))
    }

    fn sum_rows(&self, x: &Self::Buf, out: &mut Self::Buf, rows: usize, cols: usize, accumulate: bool) -> Result<()> {
        let (r, c, acc) = (rows as i32, cols as i32, accumulate as i32);
        let mut l = self.stream.launch_builder(&self.k.sum_rows);
        l.arg(x).arg(out).arg(&r).arg(&c).arg(&acc);
        // SAFETY: one thread per column, bounded by cols.
        unsafe { l.launch(grid(cols)) }.map(drop).map_err(|e| self.device_err("sum_rows", e))
    }

    fn activation_forward(&self, act: Activation, x: &Self::Buf, y: &mut Self::Buf) -> Result<()> {
        let (code, p) = act_code(act);
        let n = x.len() as i32;
        let mut l = self.stream.launch_builder(&self.k.act_forward);
        l.arg(&code).arg(&p).arg(x).arg(y).arg(&n);
        // SAFETY: element-wise over n.
        unsafe { l.launch(grid(n as usize)) }.map(drop).map_err(|e| self.device_err("activation_forward", e))
    }

    fn activation_backward(
        &self,
        act: Activation,
        x: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<f32> {
        const OP: &str = "activation_backward";
        let (code, p) = act_code(act);
        let n = x.len() as i32;
        let cfg = grid(n as usize);
        let mut partial = self.partials(OP, cfg.grid_dim.0 as usize)?;
        let acc = accumulate as i32;
        let mut l = self.stream.launch_builder(&self.k.act_backward);
        l.arg(&code).arg(&p).arg(x).arg(dy).arg(dx).arg(&n).arg(&acc).arg(&mut partial);
        // SAFETY: element-wise over n; one partial per block.
        unsafe { l.launch(cfg) }.map_err(|e| self.device_err(OP, e))?;
        Ok(self.sum_partials(OP, &partial)? as f32)
    }

    fn axpy(&self, alpha: f32, x: &Self::Buf, y: &mut Self::Buf) -> Result<()> {
        let n = y.len() as i32;
        let mut l = self.stream.launch_builder(&self.k.axpy);
        l.arg(&alpha).arg(x).arg(y).arg(&n);
        // SAFETY: element-wise over n.
        unsafe { l.launch(grid(n as usize)) }.map(drop).map_err(|e| self.device_err("axpy", e))
    }
    fn scale(&self, x: &mut Self::Buf, alpha: f32) -> Result<()> {
        let n = x.len() as i32;
        let mut l = self.stream.launch_builder(&self.k.scale);
        l.arg(x).arg(&alpha).arg(&n);
        // SAFETY: element-wise over n.
        unsafe { l.launch(grid(n as usize)) }.map(drop).map_err(|e| self.device_err("scale", e))
    }
    fn mul(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf) -> Result<()> {
        self.mul_into("mul", a, b, out, false)
    }
    fn mul_acc(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf) -> Result<()> {
        self.mul_into("mul_acc", a, b, out, true)
    }
    fn sum_squares(&self, x: &Self::Buf) -> Result<f64> {
        const OP: &str = "sum_squares";
        let n = x.len() as i32;
        let cfg = grid(n as usize);
        let mut partial = self.partials(OP, cfg.grid_dim.0 as usize)?;
        let mut l = self.stream.launch_builder(&self.k.sum_squares);
        l.arg(x).arg(&n).arg(&mut partial);
        // SAFETY: one partial per block.
        unsafe { l.launch(cfg) }.map_err(|e| self.device_err(OP, e))?;
        self.sum_partials(OP, &partial)
    }
    fn add_sign(&self, alpha: f32, src: &Self::Buf, dst: &mut Self::Buf) -> Result<()> {
        let n = dst.len() as i32;
        let mut l = self.stream.launch_builder(&self.k.add_sign);
        l.arg(&alpha).arg(src).arg(dst).arg(&n);
        // SAFETY: element-wise over n.
        unsafe { l.launch(grid(n as usize)) }.map(drop).map_err(|e| self.device_err("add_sign", e))
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
    ) -> Result<(f64, usize)> {
        const OP: &str = "softmax_cross_entropy";
        if rows == 0 {
            return Ok((0.0, 0));
        }
        let dev = |e| self.device_err(OP, e);
        let t = self.stream.clone_htod(targets).map_err(dev)?;
        let w = self.stream.clone_htod(class_weights.unwrap_or(&[0.0])).map_err(dev)?;
        let mut loss = self.partials(OP, rows)?;
        let mut correct = self.stream.alloc_zeros::<i32>(rows).map_err(dev)?;
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
        unsafe { l.launch(cfg) }.map_err(dev)?;
        let correct = self.stream.clone_dtoh(&correct).map_err(dev)?;
        Ok((self.sum_partials(OP, &loss)?, correct.iter().filter(|&&c| c != 0).count()))
    }

    fn softmax(&self, logits: &Self::Buf, probs: &mut Self::Buf, rows: usize, classes: usize) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let c = classes as i32;
        let mut l = self.stream.launch_builder(&self.k.softmax);
        l.arg(logits).arg(probs).arg(&c);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: one block per row.
        unsafe { l.launch(cfg) }.map(drop).map_err(|e| self.device_err("softmax", e))
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
    ) -> Result<()> {
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
        launched.map(drop).map_err(|e| self.device_err("optimizer_step", e))
    }

    // ---- ops without a CUDA kernel yet: each says so by name ----
    unsupported! {
        softmax_backward(&Buf, &Buf, &mut Buf, usize, usize) -> ();
        im2col(&Buf, &Window, usize, usize, usize, &mut Buf) -> ();
        col2im(&Buf, &Window, usize, usize, usize, &mut Buf) -> ();
        max_pool_forward(&Buf, &Window, usize, &mut Buf, &mut Buf) -> ();
        max_pool_backward(&Buf, &Buf, &mut Buf) -> ();
        avg_pool_forward(&Buf, &Window, usize, &mut Buf) -> ();
        avg_pool_backward(&Buf, &Window, usize, &mut Buf) -> ();
        copy_columns(&Buf, usize, usize, &mut Buf, usize, usize, usize, usize, bool) -> ();
        layer_norm_forward(&Buf, &Buf, &Buf, usize, usize, f32, &mut Buf, &mut Buf, &mut Buf) -> ();
        layer_norm_backward(&Buf, &Buf, &Buf, &Buf, usize, usize, &mut Buf, &mut Buf, &mut Buf) -> ();
        column_stats(&Buf, usize, usize) -> (Vec<f64>, Vec<f64>);
        rms_norm_forward(&Buf, &Buf, usize, usize, f32, &mut Buf, &mut Buf, &mut Buf) -> ();
        rms_norm_backward(&Buf, &Buf, &Buf, &Buf, usize, usize, &mut Buf, &mut Buf) -> ();
        batch_norm_apply(&Buf, &[f64], &[f64], &Buf, &Buf, usize, usize, f32, &mut Buf, &mut Buf) -> ();
        batch_norm_backward_sums(&Buf, &Buf, &Buf, usize, usize, &mut Buf, &mut Buf) -> (Vec<f64>, Vec<f64>);
        batch_norm_backward_dx(&Buf, &Buf, &[f64], &Buf, (&[f64], &[f64]), usize, usize, f32, &mut Buf) -> ();
        attention_forward(&Buf, &mut Buf, &mut Buf, &AttentionDims, &[usize]) -> ();
        attention_backward(&Buf, &Buf, &Buf, &mut Buf, &AttentionDims, &[usize]) -> ();
        rotary(&mut Buf, &Rotary, bool) -> ();
        attention_cached(&Buf, usize, usize, &mut Buf, usize, usize) -> ();
        lstm_forward(&Buf, &Buf, &mut Buf, &mut Buf, &mut Buf, usize) -> ();
        lstm_backward(&Buf, &Buf, &Buf, &Buf, &mut Buf, &mut Buf, usize) -> ();
        gru_forward(&Buf, &Buf, &Buf, &mut Buf, &mut Buf, usize) -> ();
        gru_backward(&Buf, &Buf, &Buf, &Buf, &mut Buf, &mut Buf, &mut Buf, usize) -> ();
        embedding_forward(&Buf, &[u32], usize, &mut Buf) -> ();
        embedding_backward(&Buf, &[u32], usize, &mut Buf) -> ();
    }
}
