// Elementwise epilogues with the counter-based dropout mask, the CUDA twins of
// src/kernels/{bias_act,dropout,residual}.rs: every kernel is grid-stride over the flat
// (row-major) element index i, which is also the mask's index.
#include "common.cuh"

#define GRID_STRIDE(i, n)                                                                  \
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                 \
       i += (size_t)blockDim.x * gridDim.x)

// out = dropout(act(y + b[i % n])), in y's dtype.
template <typename T>
__device__ void bias_act_fwd(const T *y, const T *b, T *out, size_t len, size_t n, int relu,
                             DropParams dp) {
  GRID_STRIDE(i, len) {
    float z = to_f(y[i]) + to_f(b[i % n]);
    if (relu) z = fmaxf(z, 0.0f);
    out[i] = from_f<T>(z * drop_factor(dp, i));
  }
}

// dy = g * act'(.) * factor: with ReLU, res > 0 exactly where the unit was active and kept,
// and there the factor is the dropout scale (or 1); relu'(0) = 0 as in PyTorch.
template <typename T>
__device__ void bias_act_bwd(const T *g, const T *res, T *dy, size_t len, int relu,
                             DropParams dp) {
  GRID_STRIDE(i, len) {
    const float gi = to_f(g[i]);
    float f;
    if (relu)
      f = to_f(res[i]) > 0.0f ? dp.scale : 0.0f;
    else
      f = drop_factor(dp, i);
    dy[i] = from_f<T>(gi * f);
  }
}

// Column sums of x (rows, n) in f32, stored in T: the bias gradient. Block (32, 32).
template <typename T>
__device__ void col_sum(const T *x, T *out, size_t rows, size_t n) {
  long long j;
  const float s = column_sum(rows, n, [&](size_t r, size_t c) { return to_f(x[r * n + c]); }, &j);
  if (threadIdx.y == 0 && j >= 0) out[j] = from_f<T>(s);
}

// y = x * factor, with a dtype change (the plain dropout, and the residual's sublayer gradient).
template <typename T, typename O>
__device__ void dropout_k(const T *x, O *y, size_t len, DropParams dp) {
  GRID_STRIDE(i, len) y[i] = from_f<O>(to_f(x[i]) * drop_factor(dp, i));
}

// out = x + sub * factor, into the f32 residual stream.
template <typename T>
__device__ void residual_fwd(const float *x, const T *sub, float *out, size_t len, DropParams dp) {
  GRID_STRIDE(i, len) out[i] = x[i] + to_f(sub[i]) * drop_factor(dp, i);
}

#define EPI1(TN, T)                                                                             \
  extern "C" __global__ void bias_act_fwd_##TN(const T *y, const T *b, T *out, size_t len,      \
                                               size_t n, int relu, DropParams dp) {             \
    bias_act_fwd<T>(y, b, out, len, n, relu, dp);                                              \
  }                                                                                             \
  extern "C" __global__ void bias_act_bwd_##TN(const T *g, const T *res, T *dy, size_t len,     \
                                               int relu, DropParams dp) {                       \
    bias_act_bwd<T>(g, res, dy, len, relu, dp);                                                \
  }                                                                                             \
  extern "C" __global__ void col_sum_##TN(const T *x, T *out, size_t rows, size_t n) {          \
    col_sum<T>(x, out, rows, n);                                                               \
  }                                                                                             \
  extern "C" __global__ void residual_fwd_##TN(const float *x, const T *sub, float *out,        \
                                               size_t len, DropParams dp) {                     \
    residual_fwd<T>(x, sub, out, len, dp);                                                     \
  }
EACH_T(EPI1)

#define EPI2(TN, T, ON, O)                                                                      \
  extern "C" __global__ void dropout_##TN##_##ON(const T *x, O *y, size_t len, DropParams dp) { \
    dropout_k<T, O>(x, y, len, dp);                                                            \
  }
EACH_T2(EPI2)
