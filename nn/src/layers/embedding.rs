use super::{cached, ForwardCtx, Layer, Param};
use crate::{shape_err, Result, Tensor};
use lockstep_kernels::Backend;

/// Token ids -> vectors (T13). The input holds ids as f32 values (exact below 2^24);
/// backward accumulates dy into the rows that were used (a sparse gradient) and returns no
/// input gradient: ids are not differentiable.
pub struct Embedding<B: Backend> {
    name: String,
    pub vocab: usize,
    pub dim: usize,
    pub table: Param<B>, // (vocab, dim)
    /// The ids of the last training forward and the input shape.
    ids_cache: Option<(Vec<u32>, Vec<usize>)>,
}

impl<B: Backend> Embedding<B> {
    pub fn new(be: &B, name: &str, vocab: usize, dim: usize, table: &[f32]) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            vocab,
            dim,
            table: Param::new(be, format!("{name}.weight"), &[vocab, dim], table, false)?,
            ids_cache: None,
        })
    }
}

impl<B: Backend> Layer<B> for Embedding<B> {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let raw = x.to_vec(be)?;
        let mut ids = Vec::with_capacity(raw.len());
        for (i, &v) in raw.iter().enumerate() {
            if v < 0.0 || v.fract() != 0.0 || v as usize >= self.vocab {
                return shape_err(
                    "Embedding::forward",
                    format!("{}: id {v} at position {i} is not in 0..{}", self.name, self.vocab),
                );
            }
            ids.push(v as u32);
        }
        let mut shape = x.shape.clone();
        shape.push(self.dim);
        let mut y = Tensor::zeros(be, &shape)?; // (..., dim)
        be.embedding_forward(&self.table.value, &ids, self.dim, &mut y.buf)?;
        if ctx.train {
            self.ids_cache = Some((ids, x.shape));
        }
        Ok(y)
    }
    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let (ids, shape) = cached(&mut self.ids_cache, &self.name)?;
        if self.table.trainable {
            be.embedding_backward(&dy.buf, &ids, self.dim, &mut self.table.grad)?;
        }
        Tensor::zeros(be, &shape)
    }
    fn params(&self) -> Vec<&Param<B>> {
        vec![&self.table]
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        vec![&mut self.table]
    }
}

/// Adds a position code to (N, T, D) inputs (T14): fixed sinusoidal
/// PE[t, 2i] = sin(t/10000^(2i/D)), PE[t, 2i+1] = cos(t/10000^(2i/D)), or learned (a
/// (max_len, D) parameter).
pub struct PositionalEncoding<B: Backend> {
    name: String,
    pub max_len: usize,
    pub dim: usize,
    /// The learned table, or None for sinusoidal.
    pub learned: Option<Param<B>>,
    sinusoid: Vec<f32>,
    /// (N, T) of the last training forward.
    shape_cache: Option<(usize, usize)>,
}

/// The sinusoidal table (max_len, dim).
pub fn sinusoid_table(max_len: usize, dim: usize) -> Vec<f32> {
    let mut pe = vec![0.0; max_len * dim];
    for t in 0..max_len {
        for i in 0..dim {
            let angle = t as f64 / 10000f64.powf((2 * (i / 2)) as f64 / dim as f64);
            pe[t * dim + i] = if i % 2 == 0 { angle.sin() } else { angle.cos() } as f32;
        }
    }
    pe
}

impl<B: Backend> PositionalEncoding<B> {
    pub fn sinusoidal(name: &str, max_len: usize, dim: usize) -> Self {
        Self {
            name: name.to_string(),
            max_len,
            dim,
            learned: None,
            sinusoid: sinusoid_table(max_len, dim),
            shape_cache: None,
        }
    }
    pub fn learned(be: &B, name: &str, max_len: usize, dim: usize, init: &[f32]) -> Result<Self> {
        let p = Param::new(be, format!("{name}.weight"), &[max_len, dim], init, false)?;
        Ok(Self { name: name.to_string(), max_len, dim, learned: Some(p), sinusoid: Vec::new(), shape_cache: None })
    }
}

impl<B: Backend> Layer<B> for PositionalEncoding<B> {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward(&mut self, be: &B, mut x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let [n, t, d] = x.shape[..] else {
            return shape_err(
                "PositionalEncoding::forward",
                format!("{}: input {:?}, expected [N, T, D]", self.name, x.shape),
            );
        };
        let first = ctx.decode_from.unwrap_or(0); // position of x's first row
        if d != self.dim || first + t > self.max_len {
            return shape_err(
                "PositionalEncoding::forward",
                format!(
                    "{}: input {:?} from position {first} vs max_len {}, dim {}",
                    self.name, x.shape, self.max_len, self.dim
                ),
            );
        }
        // x viewed as (N, T·D) plus rows first..first+T of the table broadcast over N.
        let mut code = be.zeros(t * d)?;
        match &self.learned {
            Some(p) => be.copy_range(&p.value, first * d, &mut code, 0, t * d)?,
            None => code = be.upload(&self.sinusoid[first * d..(first + t) * d])?,
        }
        be.add_row_vector(&mut x.buf, &code, n, t * d)?;
        if ctx.train {
            self.shape_cache = Some((n, t));
        }
        Ok(x)
    }
    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let (n, t) = cached(&mut self.shape_cache, &self.name)?;
        let d = self.dim;
        if let Some(p) = self.learned.as_mut().filter(|p| p.trainable) {
            let mut sum = be.zeros(t * d)?;
            be.sum_rows(&dy.buf, &mut sum, n, t * d, false)?; // dP[:T] += Σ_n dy
            let mut grad_t = be.zeros(t * d)?;
            be.copy_range(&p.grad, 0, &mut grad_t, 0, t * d)?;
            be.axpy(1.0, &sum, &mut grad_t)?;
            be.copy_range(&grad_t, 0, &mut p.grad, 0, t * d)?;
        }
        Ok(dy)
    }
    fn params(&self) -> Vec<&Param<B>> {
        self.learned.iter().collect()
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        self.learned.iter_mut().collect()
    }
}

/// Gradient checks against finite differences, and known values (the checker is
/// `crate::gradcheck`).
#[cfg(test)]
mod gradient_tests {
    use crate::gradcheck::{check_layer, check_layer_step, test_input as input, H};
    use crate::layers::{sinusoid_table, Embedding, PositionalEncoding};

    use crate::{ForwardCtx, Layer, Tensor};
    use lockstep_kernels::CpuBackend;

    #[test]
    fn embedding_and_positional_encoding_gradients() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        let table: Vec<f32> = (0..5 * 3).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut emb = Embedding::new(&be, "emb", 5, 3, &table).unwrap();
        // Repeated ids: their gradients must add up in the same row.
        check_layer_step(&be, &mut emb, &[2, 3], &[0., 4., 4., 1., 0., 4.], &ctx, false, H);
        let y = emb.forward(&be, Tensor::from_slice(&be, &[1, 2], &[2., 0.]).unwrap(), &ForwardCtx::default()).unwrap();
        assert_eq!(y.shape, vec![1, 2, 3]);
        assert_eq!(y.buf, [&table[6..9], &table[0..3]].concat());
        assert!(emb
            .forward(&be, Tensor::from_slice(&be, &[1], &[5.]).unwrap(), &ctx)
            .unwrap_err()
            .to_string()
            .contains("id 5"));

        let init: Vec<f32> = (0..4 * 3).map(|i| (i as f32 * 0.9).cos() * 0.1).collect();
        check_layer(
            &be,
            &mut PositionalEncoding::learned(&be, "pos", 4, 3, &init).unwrap(),
            &[2, 3, 3],
            &input(18),
            &ctx,
        );
        check_layer(&be, &mut PositionalEncoding::sinusoidal("pos", 4, 3), &[2, 3, 3], &input(18), &ctx);
        // PE[t, 2i] = sin(t/10000^(2i/D)), PE[t, 2i+1] = cos(...): known values at D = 4.
        let pe = sinusoid_table(3, 4);
        assert_eq!(&pe[..4], &[0.0, 1.0, 0.0, 1.0]);
        assert!((pe[4] - 1f32.sin()).abs() < 1e-7 && (pe[5] - 1f32.cos()).abs() < 1e-7);
        assert!((pe[6] - 0.01f32.sin()).abs() < 1e-7 && (pe[7] - 0.01f32.cos()).abs() < 1e-7);
    }
}
