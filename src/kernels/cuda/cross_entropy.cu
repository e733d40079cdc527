// Label-smoothed cross-entropy with an ignore index, the CUDA twin of
// src/kernels/cross_entropy.rs: a row kernel (log-sum-exp and loss per row), a one-block finish
// (mean over the non-pad rows, deterministic) and a fused gradient kernel.
#include "common.cuh"

// lse[r] and loss[r] for every row (one block per row); pad rows get 0 and 0. A target outside
// [0, V) gives a NaN loss (the CPU kernel fails with TargetOutOfRange; a device kernel cannot
// without a host sync, so the NaN reaches the loss and the scaler's overflow check instead).
template <typename T>
__device__ void ce_rows(const T *x, const uint32_t *t, float *lse, float *loss, int v, uint32_t pad,
                        float eps) {
  const size_t row = blockIdx.x;
  const uint32_t tr = t[row];
  if (tr == pad) {
    if (threadIdx.x == 0) {
      lse[row] = 0.0f;
      loss[row] = 0.0f;
    }
    return;
  }
  const T *xr = x + row * v;
  float mx = -INFINITY;
  FOR_ROW(j, v) mx = fmaxf(mx, to_f(xr[j]));
  mx = block_max(mx);
  float se = 0.0f, sx = 0.0f;
  FOR_ROW(j, v) {
    const float c = to_f(xr[j]);
    se += expf(c - mx);
    sx += c;
  }
  se = block_sum(se);
  sx = block_sum(sx);
  if (threadIdx.x == 0) {
    const float l = mx + logf(se);
    lse[row] = l;
    if (tr >= (uint32_t)v) {
      loss[row] = NAN;
    } else {
      const float nll = l - to_f(xr[tr]);
      const float smooth = l - sx / (float)v;
      loss[row] = (1.0f - eps) * nll + eps * smooth;
    }
  }
}

// out[0] = sum(loss) / n_valid (0 when every row is pad), accumulated in f64 in a fixed order;
// n_valid[0] = the number of non-pad rows. One block.
extern "C" __global__ void cross_entropy_finish(const float *loss, const uint32_t *t, size_t n,
                                                uint32_t pad, float *out, float *n_valid) {
  double s = 0.0;
  float c = 0.0f;
  for (size_t r = threadIdx.x; r < n; r += blockDim.x) {
    if (t[r] != pad) {
      s += (double)loss[r];
      c += 1.0f;
    }
  }
  s = block_sum_d(s);
  c = block_sum(c);
  if (threadIdx.x == 0) {
    out[0] = c > 0.0f ? (float)(s / (double)c) : 0.0f;
    n_valid[0] = c;
  }
}

// dlogits = grad * (softmax - smoothed one-hot) / n_valid, zero on pad rows; in the logits' dtype.
template <typename T>
__device__ void ce_bwd(const T *x, const uint32_t *t, const float *lse, const float *n_valid,
                       const float *grad, T *dx, int v, uint32_t pad, float eps) {
  const size_t row = blockIdx.x;
  const uint32_t tr = t[row];
  const T *xr = x + row * v;
  T *dr = dx + row * v;
  const float nv = n_valid[0];
  if (tr == pad || nv == 0.0f) {
    FOR_ROW(j, v) dr[j] = from_f<T>(0.0f);
    return;
  }
  const float coef = grad[0] / nv;
  const float off = eps / (float)v;
  const float on = 1.0f - eps;
  const float l = lse[row];
  FOR_ROW(j, v) {
    float g = coef * (expf(to_f(xr[j]) - l) - off);
    if ((uint32_t)j == tr) g -= coef * on;
    dr[j] = from_f<T>(g);
  }
}

#define CE(TN, T)                                                                               \
  extern "C" __global__ void cross_entropy_rows_##TN(const T *x, const uint32_t *t, float *lse,  \
                                                     float *loss, int v, uint32_t pad,           \
                                                     float eps) {                                \
    ce_rows<T>(x, t, lse, loss, v, pad, eps);                                                   \
  }                                                                                              \
  extern "C" __global__ void cross_entropy_bwd_##TN(const T *x, const uint32_t *t,              \
                                                    const float *lse, const float *n_valid,      \
                                                    const float *grad, T *dx, int v,             \
                                                    uint32_t pad, float eps) {                   \
    ce_bwd<T>(x, t, lse, n_valid, grad, dx, v, pad, eps);                                       \
  }
EACH_T(CE)
