// Paged causal attention with grouped-query heads on the GPU (the semantics of
// `kernels::attention::paged_attention`), flash-decoding style, plus the KV write.
//
// Cache layout (both pools): [num_blocks][block_size][n_kv_heads][head_dim] in T, so a step's
// K or V projection row is copied into its slot as one contiguous run.
//
// Per-step row metadata, built once per step and shared by every layer:
//   pos[i]   position of row i in its sequence (it attends to positions 0..=pos[i]); ROW_NONE for
//            a row in no sequence (left untouched);
//   table[i] offset into `blocks` of row i's block table (logical block j of its sequence is
//            physical block blocks[table[i] + j]).
//
// `paged_attention_partial`: grid (rows, n_kv_heads, partitions), block ATTN_THREADS. Partition c
// covers keys [c * PART, (c + 1) * PART) of the row's context. One block serves every query head
// of its KV head (GQA), so each K and V row is read once per (row, KV head). It writes an online-
// softmax partial per query head: running max m, sum l and the unnormalised weighted sum of V.
// `paged_attention_reduce`: grid (rows, n_heads), block head_dim: merges the partials. The
// partition count is a launch parameter fixed by the caller (from the longest context it serves),
// so launch grids do not change from step to step.

#include "common.cuh"

constexpr u32 ROW_NONE = 0xffffffffu;
constexpr int ATTN_THREADS = 128;
constexpr int ATTN_WARPS = ATTN_THREADS / 32;
// Keys per partition; scores of one partition for every query head of the block live in shared
// memory: n_rep * PART floats.
constexpr int PART = 256;

// Dynamic shared memory: q as f32 [n_rep][head_dim], then scores [n_rep][PART].
// Partials: m, l: [rows][n_heads][partitions]; acc: [rows][n_heads][partitions][head_dim].
template <typename T>
__device__ void attention_partial(const T* __restrict__ q, const T* __restrict__ k_cache,
                                  const T* __restrict__ v_cache, const u32* __restrict__ pos,
                                  const u32* __restrict__ table, const u32* __restrict__ blocks, u32 n_heads,
                                  u32 n_kv_heads, u32 head_dim, u32 block_size, float scale, float* __restrict__ m_out,
                                  float* __restrict__ l_out, float* __restrict__ acc_out) {
  extern __shared__ float shared[];
  const u32 row = blockIdx.x, g = blockIdx.y, part = blockIdx.z, parts = gridDim.z;
  const u32 p = pos[row];
  if (p == ROW_NONE) return;
  const u32 n_rep = n_heads / n_kv_heads;
  const u32 t0 = part * PART;
  const u32 t1 = min(t0 + PART, p + 1);
  const size_t part_base = (size_t(row) * n_heads + g * n_rep) * parts + part;  // head r adds r * parts
  if (t0 > p) {
    for (u32 r = threadIdx.x; r < n_rep; r += ATTN_THREADS) {
      m_out[part_base + r * parts] = -INFINITY;
      l_out[part_base + r * parts] = 0.f;
    }
    return;
  }
  float* qs = shared;                      // [n_rep][head_dim]
  float* scores = shared + n_rep * head_dim;  // [n_rep][PART]
  for (u32 idx = threadIdx.x; idx < n_rep * head_dim; idx += ATTN_THREADS)
    qs[idx] = to_f32(q[(size_t(row) * n_heads + g * n_rep) * head_dim + idx]) * scale;
  __syncthreads();

  const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const u32* btab = blocks + table[row];
  const size_t slot_stride = size_t(n_kv_heads) * head_dim;
  for (u32 t = t0 + warp; t < t1; t += ATTN_WARPS) {
    const T* key = k_cache + (size_t(btab[t / block_size]) * block_size + t % block_size) * slot_stride + g * head_dim;
    for (u32 r = 0; r < n_rep; ++r) {
      float s = 0.f;
      for (u32 d = lane; d < head_dim; d += 32) s = fmaf(qs[r * head_dim + d], to_f32(key[d]), s);
      s = warp_sum(s);
      if (lane == 0) scores[r * PART + (t - t0)] = s;
    }
  }
  __syncthreads();

  // One warp per query head: max, exponentials, sum.
  for (u32 r = warp; r < n_rep; r += ATTN_WARPS) {
    float mx = -INFINITY;
    for (u32 t = lane; t < t1 - t0; t += 32) mx = fmaxf(mx, scores[r * PART + t]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (u32 t = lane; t < t1 - t0; t += 32) {
      const float e = __expf(scores[r * PART + t] - mx);
      scores[r * PART + t] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      m_out[part_base + r * parts] = mx;
      l_out[part_base + r * parts] = sum;
    }
  }
  __syncthreads();

  // Weighted sum of V: each thread owns (head, dim) outputs; threads of one head read a V row
  // contiguously.
  for (u32 idx = threadIdx.x; idx < n_rep * head_dim; idx += ATTN_THREADS) {
    const u32 r = idx / head_dim, d = idx % head_dim;
    float acc = 0.f;
    for (u32 t = t0; t < t1; ++t) {
      const T* val =
          v_cache + (size_t(btab[t / block_size]) * block_size + t % block_size) * slot_stride + g * head_dim;
      acc = fmaf(scores[r * PART + (t - t0)], to_f32(val[d]), acc);
    }
    acc_out[(part_base + r * parts) * head_dim + d] = acc;
  }
}

template <typename T>
__device__ void attention_reduce(const u32* __restrict__ pos, u32 n_heads, u32 head_dim, u32 parts,
                                 const float* __restrict__ m_in, const float* __restrict__ l_in,
                                 const float* __restrict__ acc_in, T* __restrict__ out) {
  const u32 row = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  if (pos[row] == ROW_NONE || d >= head_dim) return;
  const size_t base = (size_t(row) * n_heads + h) * parts;
  float mx = -INFINITY;
  for (u32 c = 0; c < parts; ++c) mx = fmaxf(mx, m_in[base + c]);
  float l = 0.f, acc = 0.f;
  for (u32 c = 0; c < parts; ++c) {
    if (l_in[base + c] == 0.f) continue;  // a partition past the row's context
    const float w = __expf(m_in[base + c] - mx);
    l = fmaf(l_in[base + c], w, l);
    acc = fmaf(acc_in[(base + c) * head_dim + d], w, acc);
  }
  out[(size_t(row) * n_heads + h) * head_dim + d] = from_f32<T>(acc / l);
}

// grid (rows), block ATTN_THREADS: copies row i's K and V ([n_kv_heads * head_dim] each) into
// slot pos[i] of its sequence.
template <typename T>
__device__ void kv_write(const T* __restrict__ k, const T* __restrict__ v, const u32* __restrict__ pos,
                         const u32* __restrict__ table, const u32* __restrict__ blocks, u32 width, u32 block_size,
                         T* __restrict__ k_cache, T* __restrict__ v_cache) {
  const u32 row = blockIdx.x, p = pos[row];
  if (p == ROW_NONE) return;
  const size_t slot = size_t(blocks[table[row] + p / block_size]) * block_size + p % block_size;
  for (u32 e = threadIdx.x; e < width; e += ATTN_THREADS) {
    k_cache[slot * width + e] = k[size_t(row) * width + e];
    v_cache[slot * width + e] = v[size_t(row) * width + e];
  }
}

#define ATTENTION_KERNELS(SUFFIX, T)                                                                         \
  extern "C" __global__ void __launch_bounds__(ATTN_THREADS) paged_attention_partial_##SUFFIX(              \
      const T* q, const T* k_cache, const T* v_cache, const u32* pos, const u32* table, const u32* blocks,  \
      u32 n_heads, u32 n_kv_heads, u32 head_dim, u32 block_size, float scale, float* m, float* l,           \
      float* acc) {                                                                                          \
    attention_partial<T>(q, k_cache, v_cache, pos, table, blocks, n_heads, n_kv_heads, head_dim, block_size, \
                         scale, m, l, acc);                                                                  \
  }                                                                                                          \
  extern "C" __global__ void paged_attention_reduce_##SUFFIX(const u32* pos, u32 n_heads, u32 head_dim,      \
                                                             u32 parts, const float* m, const float* l,      \
                                                             const float* acc, T* out) {                     \
    attention_reduce<T>(pos, n_heads, head_dim, parts, m, l, acc, out);                                      \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(ATTN_THREADS)                                                 \
      kv_write_##SUFFIX(const T* k, const T* v, const u32* pos, const u32* table, const u32* blocks,         \
                        u32 width, u32 block_size, T* k_cache, T* v_cache) {                                 \
    kv_write<T>(k, v, pos, table, blocks, width, block_size, k_cache, v_cache);                              \
  }

ATTENTION_KERNELS(f32, float)
ATTENTION_KERNELS(f16, __half)
ATTENTION_KERNELS(bf16, __nv_bfloat16)
