// The decoder's kernels around its matmuls, for the model on the GPU: row gather (token
// embeddings, logit rows), RMSNorm with the residual add folded in, rotary embedding,
// silu(gate)·up, bias add, and a hash fill for random-weight benchmark models. Storage in T
// (f32, f16, bf16), arithmetic in f32, each stored value rounded to T once.
#include "common.cuh"

#define ROW_THREADS 256

// out[r] = src[idx[r]], rows of `width`. Grid: one block per output row.
template <typename T>
__device__ void gather_rows(const T* src, const u32* idx, u32 width, T* out) {
  const T* s = src + size_t(idx[blockIdx.x]) * width;
  T* o = out + size_t(blockIdx.x) * width;
  for (u32 i = threadIdx.x; i < width; i += blockDim.x) o[i] = s[i];
}

// Sum over the ROW_THREADS threads of a block; every thread gets the total.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[ROW_THREADS / 32];
  __shared__ float total;
  v = warp_sum(v);
  const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < ROW_THREADS / 32 ? partial[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// With `delta`: x[r] += delta[r] (stored back in T, the residual stream). Then
// out[r] = x[r] / sqrt(mean(x[r]²) + eps) · w, the mean over the stored (rounded) values as
// transformers computes it. Grid: one block of ROW_THREADS per row.
template <typename T>
__device__ void residual_rms_norm(T* x, const T* delta, const float* w, u32 width, float eps, T* out) {
  T* xr = x + size_t(blockIdx.x) * width;
  const T* dr = delta ? delta + size_t(blockIdx.x) * width : nullptr;
  T* o = out + size_t(blockIdx.x) * width;
  float squares = 0.f;
  for (u32 i = threadIdx.x; i < width; i += ROW_THREADS) {
    float v = to_f32(xr[i]);
    if (dr) {
      const T sum = from_f32<T>(v + to_f32(dr[i]));
      xr[i] = sum;
      v = to_f32(sum);
    }
    squares = fmaf(v, v, squares);
  }
  const float inv = 1.f / sqrtf(block_sum(squares) / float(width) + eps);
  // Each thread reads back only the elements it wrote above.
  for (u32 i = threadIdx.x; i < width; i += ROW_THREADS) o[i] = from_f32<T>(to_f32(xr[i]) * inv * w[i]);
}

// "rotate_half" rotary embedding of every head of every row, in place: for j < half,
// a = x[j], b = x[j + half] become a·cos − b·sin and b·cos + a·sin, with the angles of the row's
// position from tables [positions][half]. Grid: one block per row.
template <typename T>
__device__ void rope(T* x, const u32* pos, const float* cos_table, const float* sin_table, u32 n_heads, u32 half) {
  T* row = x + size_t(blockIdx.x) * n_heads * 2 * half;
  const float* c = cos_table + size_t(pos[blockIdx.x]) * half;
  const float* s = sin_table + size_t(pos[blockIdx.x]) * half;
  for (u32 i = threadIdx.x; i < n_heads * half; i += blockDim.x) {
    const u32 j = i % half;
    T* head = row + size_t(i / half) * 2 * half;
    const float a = to_f32(head[j]), b = to_f32(head[j + half]);
    head[j] = from_f32<T>(a * c[j] - b * s[j]);
    head[j + half] = from_f32<T>(b * c[j] + a * s[j]);
  }
}

// gate[i] = silu(gate[i]) · up[i] (transformers' order: x · sigmoid(x), then the product).
template <typename T>
__device__ void silu_mul(T* gate, const T* up, u64 n) {
  for (u64 i = u64(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += u64(gridDim.x) * blockDim.x) {
    const float g = to_f32(gate[i]);
    gate[i] = from_f32<T>(g / (1.f + expf(-g)) * to_f32(up[i]));
  }
}

// y[r, o] += bias[o] over `rows` rows of `width`.
template <typename T>
__device__ void add_bias(T* y, const T* bias, u64 rows, u32 width) {
  const u64 n = rows * width;
  for (u64 i = u64(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += u64(gridDim.x) * blockDim.x)
    y[i] = from_f32<T>(to_f32(y[i]) + to_f32(bias[i % width]));
}

// out[i] = scale · u, u uniform in [-1, 1) from a hash of (seed, i): the same values for the same
// seed whatever the launch shape.
template <typename T>
__device__ void fill_uniform(T* out, u64 n, u32 seed, float scale) {
  for (u64 i = u64(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += u64(gridDim.x) * blockDim.x) {
    u64 h = (i + 1) * 0x9E3779B97F4A7C15ull ^ (u64(seed) << 32 | seed);
    h ^= h >> 30;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 27;
    h *= 0x94D049BB133111EBull;
    h ^= h >> 31;
    const float u = float(h >> 40) * (1.f / 16777216.f);
    out[i] = from_f32<T>(scale * (2.f * u - 1.f));
  }
}

#define MODEL_KERNELS(SUFFIX, T)                                                                            \
  extern "C" __global__ void gather_rows_##SUFFIX(const T* src, const u32* idx, u32 width, T* out) {       \
    gather_rows<T>(src, idx, width, out);                                                                  \
  }                                                                                                        \
  extern "C" __global__ void __launch_bounds__(ROW_THREADS)                                                \
      residual_rms_norm_##SUFFIX(T* x, const T* delta, const float* w, u32 width, float eps, T* out) {     \
    residual_rms_norm<T>(x, delta, w, width, eps, out);                                                    \
  }                                                                                                        \
  extern "C" __global__ void rope_##SUFFIX(T* x, const u32* pos, const float* cos_table,                   \
                                           const float* sin_table, u32 n_heads, u32 half) {                \
    rope<T>(x, pos, cos_table, sin_table, n_heads, half);                                                  \
  }                                                                                                        \
  extern "C" __global__ void silu_mul_##SUFFIX(T* gate, const T* up, u64 n) { silu_mul<T>(gate, up, n); }   \
  extern "C" __global__ void add_bias_##SUFFIX(T* y, const T* bias, u64 rows, u32 width) {                 \
    add_bias<T>(y, bias, rows, width);                                                                     \
  }                                                                                                        \
  extern "C" __global__ void fill_uniform_##SUFFIX(T* out, u64 n, u32 seed, float scale) {                 \
    fill_uniform<T>(out, n, seed, scale);                                                                  \
  }

MODEL_KERNELS(f32, float)
MODEL_KERNELS(f16, __half)
MODEL_KERNELS(bf16, __nv_bfloat16)
