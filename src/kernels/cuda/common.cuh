// Shared device helpers of ampserve's fused kernels: f32/f16/bf16 loads and stores (all math in
// f32), the counter-based dropout mask (bit-identical to `kernels::keep_bits` on the CPU), and
// block reductions (warp shuffles, then one value per warp through shared memory).
//
// Launch contract of every row kernel: one block per row, blockDim.x a multiple of 32 and at
// most 1024, threads loop over the row with stride blockDim.x (rows of any length).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

typedef unsigned long long u64;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
// Round to nearest even, as the `half` crate's from_f32 on the CPU.
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The 24 random bits of element i under seed: the splitmix64 finaliser of seed + i * golden.
__device__ __forceinline__ uint32_t keep_bits(u64 seed, u64 i) {
  u64 z = seed + i * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return (uint32_t)(z >> 40);
}

// A dropout mask as kernel parameters. threshold >= 2^24 keeps everything (no dropout: the
// launchers pass threshold 2^24 and scale 1).
struct DropParams {
  u64 seed;
  uint32_t threshold;
  float scale;
};

__device__ __forceinline__ float drop_factor(const DropParams &m, u64 i) {
  if (m.threshold >= (1u << 24)) return m.scale;
  return keep_bits(m.seed, i) < m.threshold ? m.scale : 0.0f;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block, returned to every thread. Every thread of the block must call it (it
// synchronises). The leading barrier lets consecutive calls reuse the shared slots.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float sh[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  v = lane < nw ? sh[lane] : 0.0f;
  return warp_sum(v);
}

__device__ __forceinline__ double block_sum_d(double v) {
  __shared__ double shd[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum_d(v);
  __syncthreads();
  if (lane == 0) shd[wid] = v;
  __syncthreads();
  v = lane < nw ? shd[lane] : 0.0;
  return warp_sum_d(v);
}

__device__ __forceinline__ float block_max(float v) {
  __shared__ float shm[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shm[wid] = v;
  __syncthreads();
  v = lane < nw ? shm[lane] : -INFINITY;
  return warp_max(v);
}

// Column sums of a (rows, n) row-major matrix f(r, j), f32 accumulation, deterministic: block
// (32, 32), block x covers columns [32 * blockIdx.x, +32), threadIdx.y strides over the rows,
// then the 32 partial sums of a column are added in a fixed order through shared memory.
// Returns the column's sum in thread (x, 0); `col` is -1 for threads past the last column.
template <typename F>
__device__ __forceinline__ float column_sum(size_t rows, size_t n, F f, long long *col) {
  __shared__ float part[32][33];
  const size_t j = (size_t)blockIdx.x * 32 + threadIdx.x;
  float acc = 0.0f;
  if (j < n)
    for (size_t r = threadIdx.y; r < rows; r += blockDim.y) acc += f(r, j);
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.y == 0)
    for (int k = 0; k < (int)blockDim.y; ++k) total += part[k][threadIdx.x];
  *col = j < n ? (long long)j : -1;
  return total;
}

#define FOR_ROW(j, d) for (int j = threadIdx.x; j < (d); j += blockDim.x)

// Instantiation helpers: NAME_f32 / _f16 / _bf16 over one or two element types.
#define EACH_T(M) M(f32, float) M(f16, __half) M(bf16, __nv_bfloat16)
#define EACH_T2(M)                                                                  \
  M(f32, float, f32, float) M(f32, float, f16, __half) M(f32, float, bf16, __nv_bfloat16) \
  M(f16, __half, f32, float) M(f16, __half, f16, __half)                             \
  M(f16, __half, bf16, __nv_bfloat16) M(bf16, __nv_bfloat16, f32, float)             \
  M(bf16, __nv_bfloat16, f16, __half) M(bf16, __nv_bfloat16, bf16, __nv_bfloat16)
