// Segmented LoRA on the GPU (Punica SGMV semantics, the same as `kernels::lora`): for each segment
// of contiguous rows that share an adapter slot, y[rows] += scale * (x[rows] A^T) B^T, with an
// optional DoRA per-output factor, y = g * (y + delta).
//
// Two kernels per step and site group, both driven by per-step metadata shared by every layer:
//   meta[0] = number of segments; then per segment s: meta[1 + 3s] = first row, meta[2 + 3s] = end
//   row (exclusive), meta[3 + 3s] = slot.
// and by a per-(layer, site) table of `SlotSite` records, one per slot of the device pool. The
// launch grids depend only on the slot count, the shapes and the split count, never on how many
// segments a step has or which slots they use, so a captured CUDA graph stays valid across steps.
//
// Shrink (`lora_shrink_*`): v_part[site][split][row][j] = sum over this split's slice of k of
//   x[row, k] * A[j, k]. Split-K: few rows per segment means few outputs per adapter, so the
//   reduction over in_features is what parallelises. Sites that share x (q/k/v; gate/up) run in
//   one launch (grid z), so x is read once from DRAM. Ranks differ per slot: a block only loops
//   over its slot's rank, no padded work.
// Expand (`lora_expand_*`): t[row][j] = sum over splits of v_part (a fixed order: deterministic),
//   then y[row, o] = g[o] * (y[row, o] + scale * sum_j t[row][j] * B[o, j]).
//
// Storage T is float, __half or __nv_bfloat16 for x, y, A and B; all accumulation is in f32.

#include "common.cuh"

// One adapter slot's weights for one site. Mirrors `kernels::cuda::SlotSite` (repr C, 32 bytes).
struct SlotSite {
  u64 a;      // device address of A, [rank, in_features] row-major, in T
  u64 b;      // device address of B, [out_features, rank] row-major, in T
  u64 dora;   // device address of g, [out_features] f32, or 0 for none
  u32 rank;   // 0: no delta (a DoRA factor still applies)
  float scale;
};

constexpr int WARPS = 8;
constexpr int THREADS = WARPS * 32;
// Rows of a segment that share one pass over a weight row (registers hold one accumulator each).
constexpr int SHRINK_ROWS = 4;
constexpr int EXPAND_ROWS = 8;

// Eight consecutive elements from p (16-byte aligned when `vec`), as floats.
template <typename T> __device__ __forceinline__ void load8(const T* p, bool vec, float out[8]) {
  if (vec) {
    if (sizeof(T) == 4) {
      const float4 lo = reinterpret_cast<const float4*>(p)[0];
      const float4 hi = reinterpret_cast<const float4*>(p)[1];
      out[0] = lo.x; out[1] = lo.y; out[2] = lo.z; out[3] = lo.w;
      out[4] = hi.x; out[5] = hi.y; out[6] = hi.z; out[7] = hi.w;
    } else {
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < 8; ++e) out[e] = to_f32(h[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = to_f32(p[e]);
  }
}

// grid (splits, n_slots, sites), block THREADS. `split_len` is a multiple of 8.
// v_part: [sites][splits][rows][r_max] f32; only the entries of segment rows and j < rank are
// written (expand reads no others).
template <typename T>
__device__ void shrink(const T* __restrict__ x, u32 rows, u32 in_features, const u32* __restrict__ meta,
                       const SlotSite* __restrict__ table, u32 n_slots, float* __restrict__ v_part,
                       u32 r_max, u32 split_len) {
  const u32 seg = blockIdx.y;
  if (seg >= meta[0]) return;
  const u32 start = meta[1 + 3 * seg], end = meta[2 + 3 * seg], slot = meta[3 + 3 * seg];
  const u32 site = blockIdx.z, split = blockIdx.x, splits = gridDim.x;
  const SlotSite w = table[site * n_slots + slot];
  const u32 k0 = split * split_len;
  const u32 k1 = min(k0 + split_len, in_features);
  if (w.rank == 0 || k0 >= in_features) {
    // Still define this split's partial sums: expand adds every split.
    for (u32 i = start + threadIdx.x / 32; i < end; i += WARPS)
      for (u32 j = threadIdx.x % 32; j < w.rank; j += 32)
        v_part[((size_t(site) * splits + split) * rows + i) * r_max + j] = 0.f;
    return;
  }
  const T* a = reinterpret_cast<const T*>(w.a);
  // Vector loads need every row 16-byte aligned: aligned bases and rows a multiple of 16 bytes.
  const bool vec = (in_features * sizeof(T)) % 16 == 0 && w.a % 16 == 0 && u64(x) % 16 == 0;
  const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (u32 j = warp; j < w.rank; j += WARPS) {
    const T* arow = a + size_t(j) * in_features;
    for (u32 i0 = start; i0 < end; i0 += SHRINK_ROWS) {
      const u32 n = min(u32(SHRINK_ROWS), end - i0);
      float acc[SHRINK_ROWS] = {0.f, 0.f, 0.f, 0.f};
      for (u32 k = k0 + lane * 8; k < k1; k += 32 * 8) {
        if (k + 8 <= k1) {
          float av[8];
          load8(arow + k, vec, av);
#pragma unroll
          for (int r = 0; r < SHRINK_ROWS; ++r) {
            if (r < n) {
              float xv[8];
              load8(x + size_t(i0 + r) * in_features + k, vec, xv);
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[r] = fmaf(xv[e], av[e], acc[r]);
            }
          }
        } else {
          for (u32 kk = k; kk < k1; ++kk) {
            const float av = to_f32(arow[kk]);
#pragma unroll
            for (int r = 0; r < SHRINK_ROWS; ++r)
              if (r < n) acc[r] = fmaf(to_f32(x[size_t(i0 + r) * in_features + kk]), av, acc[r]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < SHRINK_ROWS; ++r) {
        const float s = warp_sum(acc[r]);
        if (lane == 0 && r < n) v_part[((size_t(site) * splits + split) * rows + i0 + r) * r_max + j] = s;
      }
    }
  }
}

// grid (ceil(out_features / THREADS), n_slots), block THREADS, dynamic shared memory
// EXPAND_ROWS * r_max floats. `site` selects this site's slice of v_part (sites of one shrink
// launch are expanded by separate launches because their outputs and widths differ).
template <typename T>
__device__ void expand(T* __restrict__ y, u32 rows, u32 out_features, const u32* __restrict__ meta,
                       const SlotSite* __restrict__ table, u32 n_slots, const float* __restrict__ v_part,
                       u32 r_max, u32 splits, u32 site) {
  extern __shared__ float t[];  // [EXPAND_ROWS][r_max]
  const u32 seg = blockIdx.y;
  if (seg >= meta[0]) return;
  const u32 start = meta[1 + 3 * seg], end = meta[2 + 3 * seg], slot = meta[3 + 3 * seg];
  const SlotSite w = table[slot];
  const u32 o = blockIdx.x * THREADS + threadIdx.x;
  const T* b = reinterpret_cast<const T*>(w.b);
  const float* g = reinterpret_cast<const float*>(w.dora);
  const bool vec = (w.rank * sizeof(T)) % 16 == 0 && w.b % 16 == 0;
  const float* vp = v_part + size_t(site) * splits * rows * r_max;
  for (u32 i0 = start; i0 < end; i0 += EXPAND_ROWS) {
    const u32 n = min(u32(EXPAND_ROWS), end - i0);
    __syncthreads();
    for (u32 idx = threadIdx.x; idx < n * w.rank; idx += THREADS) {
      const u32 r = idx / w.rank, j = idx % w.rank;
      float s = 0.f;
      for (u32 c = 0; c < splits; ++c) s += vp[(size_t(c) * rows + i0 + r) * r_max + j];
      t[r * r_max + j] = s;
    }
    __syncthreads();
    if (o >= out_features) continue;
    float acc[EXPAND_ROWS] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const T* brow = b + size_t(o) * w.rank;
    u32 j = 0;
    for (; j + 8 <= w.rank; j += 8) {
      float bv[8];
      load8(brow + j, vec, bv);
#pragma unroll
      for (int r = 0; r < EXPAND_ROWS; ++r)
        if (r < n)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[r] = fmaf(t[r * r_max + j + e], bv[e], acc[r]);
    }
    for (; j < w.rank; ++j) {
      const float bv = to_f32(brow[j]);
#pragma unroll
      for (int r = 0; r < EXPAND_ROWS; ++r)
        if (r < n) acc[r] = fmaf(t[r * r_max + j], bv, acc[r]);
    }
    const float go = g ? g[o] : 1.f;
#pragma unroll
    for (int r = 0; r < EXPAND_ROWS; ++r) {
      if (r < n) {
        T* yo = y + size_t(i0 + r) * out_features + o;
        const float v = to_f32(*yo) + w.scale * acc[r];
        *yo = from_f32<T>(g ? go * v : v);
      }
    }
  }
}

#define LORA_KERNELS(SUFFIX, T)                                                                          \
  extern "C" __global__ void __launch_bounds__(THREADS)                                                  \
      lora_shrink_##SUFFIX(const T* x, u32 rows, u32 in_features, const u32* meta, const SlotSite* table, \
                           u32 n_slots, float* v_part, u32 r_max, u32 split_len) {                       \
    shrink<T>(x, rows, in_features, meta, table, n_slots, v_part, r_max, split_len);                     \
  }                                                                                                      \
  extern "C" __global__ void __launch_bounds__(THREADS)                                                  \
      lora_expand_##SUFFIX(T* y, u32 rows, u32 out_features, const u32* meta, const SlotSite* table,      \
                           u32 n_slots, const float* v_part, u32 r_max, u32 splits, u32 site) {          \
    expand<T>(y, rows, out_features, meta, table, n_slots, v_part, r_max, splits, site);                 \
  }

LORA_KERNELS(f32, float)
LORA_KERNELS(f16, __half)
LORA_KERNELS(bf16, __nv_bfloat16)
