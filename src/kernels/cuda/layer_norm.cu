// Layer norm over the last dim (rows of d), tutorial form (unbiased std + eps) or standard form
// (sqrt(biased var + eps)); the CUDA twin of src/kernels/layer_norm.rs. alpha and beta are f32.
#include "common.cuh"

// Row statistics: mean and the inverse denominator; std (tutorial form only) for the backward.
template <typename T>
__device__ __forceinline__ void row_stats(const T *xr, int d, float eps, int tutorial, float *mean,
                                          float *inv, float *stdv) {
  float s = 0.0f;
  FOR_ROW(j, d) s += to_f(xr[j]);
  const float m = block_sum(s) / (float)d;
  float ss = 0.0f;
  FOR_ROW(j, d) {
    const float c = to_f(xr[j]) - m;
    ss += c * c;
  }
  ss = block_sum(ss);
  *mean = m;
  if (tutorial) {
    const float sd = sqrtf(ss / ((float)d - 1.0f));
    *inv = 1.0f / (sd + eps);
    *stdv = sd;
  } else {
    *inv = 1.0f / sqrtf(ss / (float)d + eps);
    *stdv = 0.0f;
  }
}

template <typename T, typename O>
__device__ void ln_fwd(const T *x, const float *alpha, const float *beta, O *y, int d, float eps,
                       int tutorial) {
  const size_t row = blockIdx.x;
  const T *xr = x + row * d;
  O *yr = y + row * d;
  float mean, inv, sd;
  row_stats(xr, d, eps, tutorial, &mean, &inv, &sd);
  FOR_ROW(j, d) yr[j] = from_f<O>((to_f(xr[j]) - mean) * inv * alpha[j] + beta[j]);
}

// dx (in x's dtype) for one row per block; stats[2 * row] = mean, stats[2 * row + 1] = inv for
// the parameter-gradient kernel.
template <typename T, typename G>
__device__ void ln_bwd(const T *x, const float *alpha, const G *dy, T *dx, float *stats, int d,
                       float eps, int tutorial) {
  const size_t row = blockIdx.x;
  const T *xr = x + row * d;
  const G *gr = dy + row * d;
  T *dr = dx + row * d;
  float mean, inv, sd;
  row_stats(xr, d, eps, tutorial, &mean, &inv, &sd);
  float sg = 0.0f, sgc = 0.0f;
  FOR_ROW(j, d) {
    const float ga = to_f(gr[j]) * alpha[j];
    sg += ga;
    sgc += ga * (to_f(xr[j]) - mean);
  }
  const float nf = (float)d;
  const float mean_g = block_sum(sg) / nf;
  const float gc = block_sum(sgc);
  if (tutorial) {
    // dx = (g - mean(g)) / den - c * <g, c> / (den^2 (D - 1) std)
    const float k2 = sd > 0.0f ? gc * inv * inv / ((nf - 1.0f) * sd) : 0.0f;
    FOR_ROW(j, d) {
      const float ga = to_f(gr[j]) * alpha[j];
      const float c = to_f(xr[j]) - mean;
      dr[j] = from_f<T>((ga - mean_g) * inv - c * k2);
    }
  } else {
    // xhat = c * inv; dx = inv * (g - mean(g) - xhat * mean(g * xhat))
    const float k2 = gc * inv * inv / nf;
    FOR_ROW(j, d) {
      const float ga = to_f(gr[j]) * alpha[j];
      const float c = to_f(xr[j]) - mean;
      dr[j] = from_f<T>(inv * (ga - mean_g - c * k2));
    }
  }
  if (threadIdx.x == 0) {
    stats[2 * row] = mean;
    stats[2 * row + 1] = inv;
  }
}

// dalpha[j] = sum_r dy[r, j] * (x[r, j] - mean_r) * inv_r, dbeta[j] = sum_r dy[r, j] (f32).
// Block (32, 32); grid.x = ceil(d / 32).
template <typename T, typename G>
__device__ void ln_param_grads(const T *x, const G *dy, const float *stats, float *dalpha,
                               float *dbeta, size_t rows, int d) {
  long long j;
  const float da = column_sum(
      rows, (size_t)d,
      [&](size_t r, size_t c) {
        return to_f(dy[r * d + c]) * (to_f(x[r * d + c]) - stats[2 * r]) * stats[2 * r + 1];
      },
      &j);
  __syncthreads();
  const float db = column_sum(
      rows, (size_t)d, [&](size_t r, size_t c) { return to_f(dy[r * d + c]); }, &j);
  if (threadIdx.y == 0 && j >= 0) {
    dalpha[j] = da;
    dbeta[j] = db;
  }
}

#define LN(TN, T, ON, O)                                                                        \
  extern "C" __global__ void layer_norm_fwd_##TN##_##ON(const T *x, const float *alpha,         \
                                                        const float *beta, O *y, int d,         \
                                                        float eps, int tutorial) {              \
    ln_fwd<T, O>(x, alpha, beta, y, d, eps, tutorial);                                         \
  }                                                                                             \
  extern "C" __global__ void layer_norm_bwd_##TN##_##ON(const T *x, const float *alpha,         \
                                                        const O *dy, T *dx, float *stats,       \
                                                        int d, float eps, int tutorial) {       \
    ln_bwd<T, O>(x, alpha, dy, dx, stats, d, eps, tutorial);                                   \
  }                                                                                             \
  extern "C" __global__ void layer_norm_param_grads_##TN##_##ON(                                \
      const T *x, const O *dy, const float *stats, float *dalpha, float *dbeta, size_t rows,    \
      int d) {                                                                                  \
    ln_param_grads<T, O>(x, dy, stats, dalpha, dbeta, rows, d);                                \
  }
EACH_T2(LN)
