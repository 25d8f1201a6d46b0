// lockstep CUDA kernels: every non-GEMM op of the Backend trait. Compiled once at start by
// NVRTC for the device's architecture. Reductions write per-block partials that the host
// sums in block order, so results do not depend on scheduling (no float atomics).

#define BLOCK 256

// Activation ids (match cuda/mod.rs).
#define ACT_IDENTITY 0
#define ACT_SIGMOID 1
#define ACT_TANH 2
#define ACT_RELU 3
#define ACT_LEAKY 4
#define ACT_SWISH 5
#define ACT_GELU 6

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float act_fwd(int act, float p, float x) {
    switch (act) {
        case ACT_SIGMOID: return sigmoidf_(x);
        case ACT_TANH: return tanhf(x);
        case ACT_RELU: return x > 0.0f ? x : 0.0f;
        case ACT_LEAKY: return x > 0.0f ? x : p * x;
        case ACT_SWISH: return x * sigmoidf_(p * x);
        case ACT_GELU: {
            float u = 0.7978846f * (x + 0.044715f * x * x * x);
            return 0.5f * x * (1.0f + tanhf(u));
        }
        default: return x;
    }
}

// d act/dx, and d act/d p in *dp (Swish beta).
__device__ __forceinline__ float act_bwd(int act, float p, float x, float* dp) {
    *dp = 0.0f;
    switch (act) {
        case ACT_SIGMOID: { float s = sigmoidf_(x); return s * (1.0f - s); }
        case ACT_TANH: { float t = tanhf(x); return 1.0f - t * t; }
        case ACT_RELU: return x > 0.0f ? 1.0f : 0.0f;
        case ACT_LEAKY: return x > 0.0f ? 1.0f : p;
        case ACT_SWISH: {
            float s = sigmoidf_(p * x);
            float ds = s * (1.0f - s);
            *dp = x * x * ds;
            return s + p * x * ds;
        }
        case ACT_GELU: {
            float u = 0.7978846f * (x + 0.044715f * x * x * x);
            float t = tanhf(u);
            float du = 0.7978846f * (1.0f + 3.0f * 0.044715f * x * x);
            return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
        }
        default: return 1.0f;
    }
}

// Block-wide sum in shared memory; returns the total in thread 0.
__device__ double block_sum(double v) {
    __shared__ double s[BLOCK];
    s[threadIdx.x] = v;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
        __syncthreads();
    }
    return s[0];
}

extern "C" __global__ void fill(float* x, float v, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = v;
}

extern "C" __global__ void add_row_vector(float* x, const float* bias, int rows, int cols) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows * cols) x[i] += bias[i % cols];
}

// out[c] (+)= sum_r x[r, c]; one thread per column, rows summed in order.
extern "C" __global__ void sum_rows(const float* x, float* out, int rows, int cols, int accumulate) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int r = 0; r < rows; r++) s += x[r * cols + c];
    out[c] = accumulate ? out[c] + s : s;
}

extern "C" __global__ void act_forward(int act, float p, const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = act_fwd(act, p, x[i]);
}

// dx (+)= act'(x) dy; partial[block] = sum of d act/dp * dy over the block.
extern "C" __global__ void act_backward(int act, float p, const float* x, const float* dy, float* dx, int n,
                                        int accumulate, double* partial) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    double dp_sum = 0.0;
    if (i < n) {
        float dp;
        float d = act_bwd(act, p, x[i], &dp);
        dx[i] = accumulate ? dx[i] + d * dy[i] : d * dy[i];
        dp_sum = (double)(dp * dy[i]);
    }
    double total = block_sum(dp_sum);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

extern "C" __global__ void axpy(float alpha, const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += alpha * x[i];
}

extern "C" __global__ void scale(float* x, float alpha, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= alpha;
}

extern "C" __global__ void mul(const float* a, const float* b, float* out, int n, int accumulate) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = accumulate ? out[i] + a[i] * b[i] : a[i] * b[i];
}

extern "C" __global__ void sum_squares(const float* x, int n, double* partial) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    double v = i < n ? (double)x[i] * (double)x[i] : 0.0;
    double total = block_sum(v);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

extern "C" __global__ void add_sign(float alpha, const float* src, float* dst, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] += src[i] > 0.0f ? alpha : (src[i] < 0.0f ? -alpha : 0.0f);
}

// One block per row. loss[row] = w_t * (log sum exp(z - max) - (z_t - max)); correct[row] = argmax == t.
extern "C" __global__ void softmax_cross_entropy(const float* logits, const unsigned int* targets,
                                                 const float* class_weights, int has_weights, float* dlogits,
                                                 double* loss, int* correct, int classes, float grad_scale) {
    int row = blockIdx.x;
    const float* z = logits + (size_t)row * classes;
    float* d = dlogits + (size_t)row * classes;
    if (targets[row] == 0xFFFFFFFFu) {  // IGNORE_TARGET: padding adds no loss and no gradient
        for (int c = threadIdx.x; c < classes; c += blockDim.x) d[c] = 0.0f;
        if (threadIdx.x == 0) { loss[row] = 0.0; correct[row] = 0; }
        return;
    }
    __shared__ float s_max[BLOCK];
    __shared__ int s_arg[BLOCK];
    __shared__ float s_sum[BLOCK];
    float m = -INFINITY;
    int arg = 0;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) {
        if (z[c] > m) { m = z[c]; arg = c; }
    }
    s_max[threadIdx.x] = m;
    s_arg[threadIdx.x] = arg;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            float o = s_max[threadIdx.x + stride];
            int oa = s_arg[threadIdx.x + stride];
            // Ties go to the lower index, as on the CPU.
            if (o > s_max[threadIdx.x] || (o == s_max[threadIdx.x] && oa < s_arg[threadIdx.x])) {
                s_max[threadIdx.x] = o;
                s_arg[threadIdx.x] = oa;
            }
        }
        __syncthreads();
    }
    float mx = s_max[0];
    float sum = 0.0f;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) sum += expf(z[c] - mx);
    s_sum[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) s_sum[threadIdx.x] += s_sum[threadIdx.x + stride];
        __syncthreads();
    }
    float total = s_sum[0];
    int t = (int)targets[row];
    float w = has_weights ? class_weights[t] : 1.0f;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) {
        float p = expf(z[c] - mx) / total;
        d[c] = (p - (c == t ? 1.0f : 0.0f)) * w * grad_scale;
    }
    if (threadIdx.x == 0) {
        loss[row] = (double)(w * (logf(total) - (z[t] - mx)));
        correct[row] = s_arg[0] == t ? 1 : 0;
    }
}

extern "C" __global__ void softmax(const float* logits, float* probs, int classes) {
    int row = blockIdx.x;
    const float* z = logits + (size_t)row * classes;
    float* p = probs + (size_t)row * classes;
    __shared__ float s[BLOCK];
    float m = -INFINITY;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) m = fmaxf(m, z[c]);
    s[threadIdx.x] = m;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) s[threadIdx.x] = fmaxf(s[threadIdx.x], s[threadIdx.x + stride]);
        __syncthreads();
    }
    float mx = s[0];
    __syncthreads();
    float sum = 0.0f;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) sum += expf(z[c] - mx);
    s[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
        __syncthreads();
    }
    float total = s[0];
    for (int c = threadIdx.x; c < classes; c += blockDim.x) p[c] = expf(z[c] - mx) / total;
}

extern "C" __global__ void sgd_step(float* w, const float* g, float lr, float grad_scale, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) w[i] -= lr * (grad_scale * g[i]);
}

extern "C" __global__ void momentum_step(float* w, const float* g, float* v, float lr, float grad_scale, float mu,
                                         int nesterov, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = grad_scale * g[i];
    v[i] = mu * v[i] + gi;
    w[i] -= nesterov ? lr * (gi + mu * v[i]) : lr * v[i];
}

extern "C" __global__ void adam_step(float* w, const float* g, float* m, float* v, float lr, float grad_scale,
                                     float beta1, float beta2, float eps, float step_size, float inv_sqrt_bc2,
                                     float decay, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = grad_scale * g[i];
    m[i] = beta1 * m[i] + (1.0f - beta1) * gi;
    v[i] = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    w[i] -= step_size * m[i] / (sqrtf(v[i]) * inv_sqrt_bc2 + eps) + lr * decay * w[i];
}
