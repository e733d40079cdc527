// dropout(softmax(scores * scale + mask)) over the last dim, the CUDA twin of
// src/kernels/softmax.rs. scores and the outputs are contiguous (rows of d); the f32 additive
// mask is addressed through its broadcast strides (`Bcast`), so a (B, 1, 1|Tq, Tk) mask is read
// in place, never expanded.
#include "common.cuh"

#define FULLY_MASKED (-1.0e4f)
#define MAX_LEAD 6

// The mask's addressing: the scores' leading dims (all but the last, innermost last) and the
// mask's strides over them (0 where broadcast), its last-dim stride and its start offset.
struct Bcast {
  uint32_t nd;
  uint32_t dims[MAX_LEAD];
  uint32_t strides[MAX_LEAD];
  uint32_t last;
  uint32_t start;
};

__device__ __forceinline__ const float *mask_row(const float *mask, const Bcast &b, size_t row) {
  size_t off = b.start;
  size_t r = row;
  for (int k = (int)b.nd - 1; k >= 0; --k) {
    off += (r % b.dims[k]) * (size_t)b.strides[k];
    r /= b.dims[k];
  }
  return mask + off;
}

// Row max of z = s * scale + m and of the mask alone, then the sum of exp(z - max): what every
// kernel here needs to produce the probabilities of a row. Returns false for a fully masked row
// (uniform probabilities).
template <typename S>
__device__ __forceinline__ bool row_softmax_stats(const S *sr, const float *mr, uint32_t ms, int d,
                                                  float scale, float *mx, float *inv_sum) {
  float zmax = -INFINITY, mmax = -INFINITY;
  FOR_ROW(j, d) {
    const float m = mr[(size_t)j * ms];
    zmax = fmaxf(zmax, to_f(sr[j]) * scale + m);
    mmax = fmaxf(mmax, m);
  }
  zmax = block_max(zmax);
  mmax = block_max(mmax);
  if (mmax <= FULLY_MASKED) return false;
  float s = 0.0f;
  FOR_ROW(j, d) s += expf(to_f(sr[j]) * scale + mr[(size_t)j * ms] - zmax);
  s = block_sum(s);
  *mx = zmax;
  *inv_sum = 1.0f / s;
  return true;
}

template <typename S>
__device__ __forceinline__ float prob(const S *sr, const float *mr, uint32_t ms, int j, float scale,
                                      bool live, float mx, float inv_sum, int d) {
  if (!live) return 1.0f / (float)d;
  return expf(to_f(sr[j]) * scale + mr[(size_t)j * ms] - mx) * inv_sum;
}

template <typename S, typename O>
__device__ void softmax_fwd(const S *s, const float *mask, Bcast b, O *y, int d, float scale,
                            DropParams dp) {
  const size_t row = blockIdx.x;
  const S *sr = s + row * d;
  const float *mr = mask_row(mask, b, row);
  O *yr = y + row * d;
  float mx = 0.0f, inv = 0.0f;
  const bool live = row_softmax_stats(sr, mr, b.last, d, scale, &mx, &inv);
  FOR_ROW(j, d) {
    const float p = prob(sr, mr, b.last, j, scale, live, mx, inv, d);
    yr[j] = from_f<O>(p * drop_factor(dp, row * d + j));
  }
}

// Without dropout: dscores = scale * y * (dy - sum(y * dy)) from the saved output y.
template <typename Y, typename O>
__device__ void softmax_bwd(const Y *y, const Y *g, O *dx, int d, float scale) {
  const size_t row = blockIdx.x;
  const Y *yr = y + row * d;
  const Y *gr = g + row * d;
  O *dr = dx + row * d;
  float dot = 0.0f;
  FOR_ROW(j, d) dot += to_f(yr[j]) * to_f(gr[j]);
  dot = block_sum(dot);
  FOR_ROW(j, d) {
    const float yj = to_f(yr[j]);
    dr[j] = from_f<O>(scale * yj * (to_f(gr[j]) - dot));
  }
}

// With dropout: recompute the undropped y from the scores, g = dy * factor,
// dscores = scale * y * (g - sum(y * g)), in the scores' dtype.
template <typename S, typename G>
__device__ void softmax_drop_bwd(const S *s, const float *mask, Bcast b, const G *g, S *dx, int d,
                                 float scale, DropParams dp) {
  const size_t row = blockIdx.x;
  const S *sr = s + row * d;
  const float *mr = mask_row(mask, b, row);
  const G *gr = g + row * d;
  S *dr = dx + row * d;
  float mx = 0.0f, inv = 0.0f;
  const bool live = row_softmax_stats(sr, mr, b.last, d, scale, &mx, &inv);
  float dot = 0.0f;
  FOR_ROW(j, d) {
    const float p = prob(sr, mr, b.last, j, scale, live, mx, inv, d);
    dot += p * (to_f(gr[j]) * drop_factor(dp, row * d + j));
  }
  dot = block_sum(dot);
  FOR_ROW(j, d) {
    const float p = prob(sr, mr, b.last, j, scale, live, mx, inv, d);
    const float gj = to_f(gr[j]) * drop_factor(dp, row * d + j);
    dr[j] = from_f<S>(scale * p * (gj - dot));
  }
}

#define SOFTMAX(TN, T, ON, O)                                                                    \
  extern "C" __global__ void masked_softmax_fwd_##TN##_##ON(const T *s, const float *mask,       \
                                                            Bcast b, O *y, int d, float scale,   \
                                                            DropParams dp) {                     \
    softmax_fwd<T, O>(s, mask, b, y, d, scale, dp);                                             \
  }                                                                                              \
  extern "C" __global__ void masked_softmax_bwd_##TN##_##ON(const T *y, const T *g, O *dx, int d, \
                                                            float scale) {                       \
    softmax_bwd<T, O>(y, g, dx, d, scale);                                                      \
  }                                                                                              \
  extern "C" __global__ void masked_softmax_drop_bwd_##TN##_##ON(                                \
      const T *s, const float *mask, Bcast b, const O *g, T *dx, int d, float scale,             \
      DropParams dp) {                                                                           \
    softmax_drop_bwd<T, O>(s, mask, b, g, dx, d, scale, dp);                                    \
  }
EACH_T2(SOFTMAX)
