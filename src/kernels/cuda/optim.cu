// The optimizer step over ALL parameter tensors in two launches, with no host round trip
// between them: `grad_stats` (global sum of squares in f64 + found_inf + the clip factor) writes
// a small device buffer that `adam_multi` (Adam/AdamW over f32 master weights) reads; the
// update is skipped on the device when the step overflowed. The host reads the buffer once per
// step (for the loss scaler and the logged grad norm).
//
// Both take a table of u64 (uploaded once per step, since the gradients are new tensors every
// step), K tensors and C chunks of CHUNK elements:
//   table[0*K + k] param ptr, [1*K + k] grad ptr, [2*K + k] m ptr, [3*K + k] v ptr,
//   [4*K + k] element count, [5*K + k] the gradient's dtype (0 f32, 1 f16, 2 bf16: gradients
//   are read as they are, no cast launch), then [6*K + c] = (k << 32) | (chunk index in tensor k).
// One block per chunk.
#include "common.cuh"

#define CHUNK 65536

// The state buffer (f64): what the host reads once per step.
#define ST_SUMSQ 0     // sum of squares of all (scaled) gradients
#define ST_LOSS 1      // the loss value
#define ST_FOUND_INF 2 // 1.0 when the sum or the loss is inf/NaN: the update is skipped
#define ST_FACTOR 3    // the factor the gradients are multiplied by: inv_scale * clip
#define ST_LEN 4

__device__ __forceinline__ void chunk_of(const u64 *table, int K, int c, int *k, size_t *start,
                                         size_t *end) {
  const u64 e = table[6 * (size_t)K + c];
  *k = (int)(e >> 32);
  const size_t len = (size_t)table[4 * (size_t)K + *k];
  *start = (size_t)(e & 0xffffffffULL) * CHUNK;
  *end = min(*start + (size_t)CHUNK, len);
}

__device__ __forceinline__ float load_grad(const void *g, u64 dtype, size_t i) {
  if (dtype == 1) return __half2float(((const __half *)g)[i]);
  if (dtype == 2) return __bfloat162float(((const __nv_bfloat16 *)g)[i]);
  return ((const float *)g)[i];
}

// partials: C doubles; counter: one u32, 0 on entry, reset to 0 by the last block.
// The last block to finish (threadfence + atomic ticket, as in CUDA's threadFenceReduction
// sample) adds the partials in chunk order, so the sum does not depend on block scheduling.
extern "C" __global__ void grad_stats(const u64 *table, int K, int C, const float *loss,
                                      double *partials, unsigned int *counter, double *state,
                                      double inv_scale, double max_norm) {
  int k;
  size_t start, end;
  chunk_of(table, K, blockIdx.x, &k, &start, &end);
  const void *g = (const void *)table[(size_t)K + k];
  const u64 gdt = table[5 * (size_t)K + k];
  double s = 0.0;
  for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const double x = (double)load_grad(g, gdt, i);
    s += x * x;
  }
  s = block_sum_d(s);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = s;
    __threadfence();
    const unsigned int ticket = atomicAdd(counter, 1u);
    last = ticket == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  double t = 0.0;
  for (int c = threadIdx.x; c < C; c += blockDim.x) t += __ldcg(&partials[c]);
  t = block_sum_d(t);
  if (threadIdx.x == 0) {
    const double lv = (double)loss[0];
    const bool inf = !isfinite(t) || !isfinite(lv);
    // The same f64 formulas as the host: grad_norm = sqrt(ss) * inv_scale, and
    // clip_coef = min(max_norm / (norm + 1e-6), 1) (1 when clipping is off).
    const double norm = sqrt(t) * inv_scale;
    double clip = 1.0;
    if (max_norm > 0.0 && isfinite(norm)) clip = fmin(max_norm / (norm + 1e-6), 1.0);
    state[ST_SUMSQ] = t;
    state[ST_LOSS] = lv;
    state[ST_FOUND_INF] = inf ? 1.0 : 0.0;
    state[ST_FACTOR] = inv_scale * clip;
    *counter = 0u;
  }
}

// The Adam scalars of one step (the host's `Coefs`), passed by value.
struct AdamCoefs {
  float b1, b2, c1, c2, eps, l2, decay, step_size, inv_sqrt_bc2;
};

// p, m, v updated in place with PyTorch's formulas (the same order of f32 operations as the CPU
// kernel `Coefs::step`): g = grad * gs + l2 * p; m = b1 m + c1 g; v = b2 v + c2 g^2;
// p = p * decay - step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps). gs = state[ST_FACTOR].
extern "C" __global__ void adam_multi(const u64 *table, int K, const double *state, AdamCoefs a) {
  if (state[ST_FOUND_INF] != 0.0) return;
  const float gs = (float)state[ST_FACTOR];
  int k;
  size_t start, end;
  chunk_of(table, K, blockIdx.x, &k, &start, &end);
  float *p = (float *)table[k];
  const void *g = (const void *)table[(size_t)K + k];
  const u64 gdt = table[5 * (size_t)K + k];
  float *m = (float *)table[2 * (size_t)K + k];
  float *v = (float *)table[3 * (size_t)K + k];
  for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float pi = p[i];
    const float gi = __fadd_rn(__fmul_rn(load_grad(g, gdt, i), gs), __fmul_rn(a.l2, pi));
    const float mi = __fadd_rn(__fmul_rn(a.b1, m[i]), __fmul_rn(a.c1, gi));
    const float vi = __fadd_rn(__fmul_rn(a.b2, v[i]), __fmul_rn(__fmul_rn(a.c2, gi), gi));
    m[i] = mi;
    v[i] = vi;
    const float denom = __fadd_rn(__fmul_rn(sqrtf(vi), a.inv_sqrt_bc2), a.eps);
    p[i] = __fsub_rn(__fmul_rn(pi, a.decay), __fdiv_rn(__fmul_rn(a.step_size, mi), denom));
  }
}
