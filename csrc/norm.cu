// LayerNorm and RMSNorm, with the pre-norm residual add fused: CUDA kernels and their launchers (raw pointers).
//
// Math, per row of length N, all in fp32 whatever the storage dtype (float32, float16, bfloat16):
//   residual add  s = round_to_dtype(x + residual), stored as residual_out; the norm reads v = s, so the result
//                 is bit for bit the unfused `norm(x + residual)` computed from the rounded sum.
//   LayerNorm     mean = Σv/N, var = Σ(v − mean)²/N, rstd = 1/sqrt(var + eps), xhat = (v − mean)·rstd,
//                 y = xhat·w + b   (w = 1 without weight, b = 0 without bias)
//   RMSNorm       rstd = 1/sqrt(Σv²/N + eps), xhat = v·rstd, y = xhat·(offset + w)   (factor 1 without weight)
// Backward, with g = dy·w_eff (w_eff = w for LayerNorm, offset + w for RMSNorm, 1 without weight):
//   LayerNorm     dx = rstd·(g − (c1·xhat + c2)),  c1 = Σ(g·xhat)/N, c2 = Σg/N
//   RMSNorm       dx = rstd·(g − c1·xhat)
//   both          dx += d(residual_out) when given; dw = Σ_rows dy·xhat, db = Σ_rows dy (fp32 sums).
// Saved for backward (by the caller): the normalized input v (x, or residual_out), mean (LayerNorm) and rstd,
// fp32, 8 bytes a row.
//
// Roofline, bytes per call for dtype size d: forward reads x and writes y, 2·M·N·d (4·M·N·d with the residual:
// + residual read, + residual_out write); backward reads dy and v and writes dx, 3·M·N·d (+ M·N·d for the
// d(residual_out) read). The weight, the per-row statistics and the (G, N) fp32 partials of dw/db are small next
// to that once M ≫ G. Everything is memory bound: the target is the device's copy bandwidth.
//
// Design, and why (the shapes are the constants below; ptxas -v: no spills, no local memory, sm_80 and sm_90a):
// - 16-byte accesses. A thread moves V = 16/d consecutive elements per instruction when every row pointer, every
//   row stride, N and the weight are 16-byte aligned (checked at run time by the launcher); otherwise the same
//   kernels run with V = 1 and 8 elements a thread (a fallback: scalar accesses need a register per address).
// - Rows kept in registers, one read and one write per element. A group of kGroup threads owns a row, each
//   thread holding E elements; the group widens with N while E stays fixed, so registers stay bounded. Small
//   rows use one warp per row (shuffles only, no barrier) and several rows a block; wider rows a group of
//   warps, reduced through shared memory. E and the block size are chosen for about 64 KB of loads in flight per
//   SM, what HBM latency × bandwidth needs: forward E = 32 with 1024 threads per SM (16-bit) or 512 (fp32);
//   backward E = 32 (16-bit) or 16 (fp32) with one 512-thread block per SM and 128 registers a thread.
// - Statistics in registers are two-pass (mean first, then Σ(v − mean) and Σ(v − mean)² from the same
//   registers, the first correcting the mean's rounding): accurate where Σv² − N·mean² would cancel.
// - Wider rows (chunked path, any N: above 16384, or above 8192 for the fp32 backward, 4096 for the scalar
//   backward): the forward walks the row twice in chunks, statistics first (each thread keeps (count, mean, M2)
//   of its elements, merged per chunk and then across the block with Chan's formula), then normalizes; the
//   second read mostly hits L2. The backward first computes c1, c2 per row (one read of dy and v), then a 2-D
//   grid of (column tile × row range) blocks computes dx and the dw/db partials with each thread owning fixed
//   columns: 5 passes over memory instead of 3, traded for partials that need no per-row read-modify-write of a
//   global buffer at any N.
// - Backward registers: dy and v stay packed in their storage type while the row sums are reduced, and xhat and
//   g are recomputed on use; the weight and dres are re-read when needed rather than held.
// - dw/db without atomics: G = 2 per SM backward blocks each own a contiguous range of rows and write their fp32
//   column sums to their own row of a (G, N) workspace that the caller allocates (no cudaMalloc, no sync here);
//   a second kernel sums the G rows in a fixed order. No float atomics, no locks: deterministic. A thread's
//   columns never change across its rows, so its running sums live in its own shared-memory slots rather than in
//   registers, laid out so that a warp's accesses hit distinct banks.
// - Offsets are int64: M·N passes 2^31 (32k rows of 64k).
// - Flags (residual, weight, bias, RMS, dres, dw, db) are runtime arguments, uniform across a launch, which keeps
//   the number of template instances (and the build time) down; the kernels are templated on the data type T,
//   the weight type W (T or float), the access width V and the block shape.
// - Outputs must not alias inputs (the kernels read inputs through __restrict__ pointers).

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.cuh"
#include "launchers.h"

namespace fastlm {

// Forward shapes. Rows up to kFwdRegisterMaxN (vectorized) or kFwdScalarRegisterMaxN (V = 1) stay in registers,
// kFwdElems or kScalarElems elements a thread; wider rows take the chunked kernel.
constexpr int kFwdRegisterMaxN = 16384;
constexpr int kFwdScalarRegisterMaxN = 8192;
constexpr int kFwdElems = 32;
constexpr int kScalarElems = 8;
// Backward shapes: blocks of kBwdThreads, one resident per SM (128 registers a thread), each thread holding
// kBwd16Elems elements (16-bit data), kBwd32Elems (fp32) or kScalarElems (V = 1), so 64 KB of dy and v (32 KB
// scalar) in flight per SM. The widest rows kept in registers follow; wider rows take the chunked kernels.
constexpr int kBwdThreads = 512;
constexpr int kBwd16Elems = 32;
constexpr int kBwd32Elems = 16;
constexpr int kBwd16RegisterMaxN = kBwdThreads * kBwd16Elems;
constexpr int kBwd32RegisterMaxN = kBwdThreads * kBwd32Elems;
constexpr int kBwdScalarRegisterMaxN = kBwdThreads * kScalarElems;
// Chunked forward and the backward row-coefficient kernel: one block of kChunkThreads per row, taking
// kChunkThreads × E elements at a time (E = kChunkElems, or kScalarElems for V = 1). Backward column kernel:
// tiles of kColThreads × E columns.
constexpr int kChunkThreads = 512;
constexpr int kChunkElems = 16;
constexpr int kColThreads = 256;
// Backward blocks (workspace rows) per SM. The column kernel's grid is (tiles × G), sized to about
// kColBlocksPerSm blocks per SM.
constexpr int kPartialsPerSm = 2;
constexpr int kColBlocksPerSm = 4;
// dw/db reduction: a block sums 32 columns over G rows, kFinalizeSlices rows at a time.
constexpr int kFinalizeSlices = 16;

// Blocks of `threads` that must fit on an SM together, for __launch_bounds__: 1024 threads for the vectorized
// 16-bit forward (64 registers a thread, 32 elements: 64 KB of loads in flight per SM), 512 otherwise (128
// registers): fp32 moves twice the bytes per element, and scalar accesses need a register per element address.
template <typename T, int V>
constexpr int fwd_min_blocks(int threads) {
  const int target = sizeof(T) == 4 || V == 1 ? 512 : 1024;
  return target > threads ? target / threads : 1;
}
constexpr int bwd_min_blocks(int threads) { return 512 > threads ? 512 / threads : 1; }

struct NormFwdParams {
  const void* x;         // (M, N), row stride x_stride
  const void* residual;  // (M, N), row stride residual_stride, or null
  const void* weight;    // (N,) of W, or null
  const void* bias;      // (N,) of W, or null (LayerNorm only)
  void* y;               // (M, N), row stride y_stride
  void* residual_out;    // (M, N), row stride residual_out_stride; non-null iff residual is
  float* mean;           // (M,) fp32; null for RMSNorm
  float* rstd;           // (M,) fp32
  int64_t x_stride;
  int64_t residual_stride;
  int64_t y_stride;
  int64_t residual_out_stride;
  int64_t M;
  int N;
  float eps;
  float offset;  // RMSNorm's weight offset (1 for Gemma)
  float inv_n;   // 1/N, rounded on the host
  bool is_rms;
};

struct NormBwdParams {
  const void* dy;      // (M, N), row stride dy_stride
  const void* xin;     // (M, N), row stride xin_stride: the normalized input (x, or residual_out)
  const void* weight;  // (N,) of W, or null
  const float* mean;   // (M,) fp32; null for RMSNorm
  const float* rstd;   // (M,) fp32
  const void* dres;    // (M, N), row stride dres_stride: gradient of residual_out, or null
  void* dx;            // (M, N), row stride dx_stride
  float* dw_part;      // (G, N) fp32 workspace rows: block g's Σ dy·xhat; null when dw is not wanted
  float* db_part;      // (G, N) fp32 workspace rows: block g's Σ dy; null when db is not wanted
  float* row_coef;     // (M, 2) fp32 workspace: c1, c2 per row (chunked path only)
  int64_t dy_stride;
  int64_t xin_stride;
  int64_t dres_stride;
  int64_t dx_stride;
  int64_t M;
  int N;
  int G;                 // backward blocks along the rows, = workspace rows per partial
  int64_t rows_per_block;  // block g owns rows [g·rows_per_block, min((g+1)·rows_per_block, M)), never empty
  float offset;
  float inv_n;    // 1/N, rounded on the host
  uint32_t zero;  // 0: see opaque() in common.cuh
  bool is_rms;
};

struct FinalizeParams {
  const float* part[2];  // (G, N) fp32 partials of dw and of db; a null entry is skipped
  void* out[2];          // (N,) of W: dw, db
  int G;
  int N;
};

// ---------------------------------------------------------------------------------------------------------------
// Forward, rows in registers. Block = kRows groups of kGroup threads, one row per group; thread `lane` of a group
// holds the row's elements (i·kGroup + lane)·V + [0, V) for i < kIters, so a warp's accesses are contiguous.
// The forward's epilogue, shared by both forward kernels: y[row, col + j] = (v[j] − mean)·rstd·w_eff[j] + b[j] for
// j < V, with w_eff = w (+ offset for RMSNorm), 1 without weight, and b = 0 without bias; one rounding to T.
// I is the column's type (int or int64_t, as the caller indexes), so the address arithmetic is the caller's own.
// The pointers are __restrict__ (outputs never alias inputs): the register kernel's code is then what it was with
// the epilogue written inline; the chunked kernel takes 2 more registers at V = 1 (80 of its 128, no spills).
template <int V, typename T, typename W, typename I>
__device__ __forceinline__ void store_normalized(const NormFwdParams& p, const W* __restrict__ weight,
                                                 const W* __restrict__ bias, T* __restrict__ y, int64_t row, I col,
                                                 const float (&v)[V], float mean, float rstd) {
  float w[V];
  float b[V];
  if (weight != nullptr) {
    load_floats<V>(weight + col, w);
#pragma unroll
    for (int j = 0; j < V; ++j) w[j] += p.is_rms ? p.offset : 0.f;
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) w[j] = 1.f;
  }
  if (bias != nullptr) {
    load_floats<V>(bias + col, b);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) b[j] = 0.f;
  }
  float out[V];
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = (v[j] - mean) * rstd * w[j] + b[j];
  store_floats<V>(y + row * p.y_stride + col, out);
}

// kRows > 1 only with kGroup == 32 (warp reductions, no barrier), so a warp past the last row may stop early.
template <typename T, typename W, int V, int kGroup, int kRows, int kIters>
__global__ void __launch_bounds__(kGroup* kRows, fwd_min_blocks<T, V>(kGroup* kRows))
    norm_fwd_kernel(const NormFwdParams p) {
  static_assert(kRows == 1 || kGroup == 32, "several rows a block only with one warp a row");
  __shared__ float smem[kGroup > 32 ? 2 * kGroup * kRows / 32 : 1];
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ residual = static_cast<const T*>(p.residual);
  const W* __restrict__ weight = static_cast<const W*>(p.weight);
  const W* __restrict__ bias = static_cast<const W*>(p.bias);
  T* __restrict__ y = static_cast<T*>(p.y);
  T* __restrict__ residual_out = static_cast<T*>(p.residual_out);
  const int N = p.N;
  const int lane = static_cast<int>(threadIdx.x) % kGroup;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / kGroup; row < p.M;
       row += static_cast<int64_t>(gridDim.x) * kRows) {
    float v[kIters][V];
    // Every load of the row is issued before any is used: the bytes in flight hide the latency.
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int col = (i * kGroup + lane) * V;
      if (col < N) {
        load_floats<V>(x + row * p.x_stride + col, v[i]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[i][j] = 0.f;
      }
    }
    if (residual != nullptr) {
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int col = (i * kGroup + lane) * V;
        if (col < N) {
          float r[V];
          load_floats<V>(residual + row * p.residual_stride + col, r);
#pragma unroll
          for (int j = 0; j < V; ++j) v[i][j] = round_to<T>(v[i][j] + r[j]);
          store_floats<V>(residual_out + row * p.residual_out_stride + col, v[i]);
        }
      }
    }

    // LayerNorm: the mean, then the sums of d = v − mean and d² in one more reduction (corrected two-pass): Σd
    // removes the rounding of the first mean (rows with a large common offset), Σd² gives the variance without
    // the cancellation of Σv² − N·mean². RMSNorm: Σv² alone.
    float mean = 0.f;
    if (!p.is_rms) {
      float s[1] = {0.f};
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
#pragma unroll
        for (int j = 0; j < V; ++j) s[0] += v[i][j];  // padding holds 0
      }
      group_sum<kGroup, 1>(s, smem);
      mean = s[0] * p.inv_n;
    }
    float q[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      if ((i * kGroup + lane) * V < N) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = v[i][j] - mean;
          q[0] += d;
          q[1] += d * d;
        }
      }
    }
    group_sum<kGroup, 2>(q, smem);
    float var = q[1] * p.inv_n;
    if (!p.is_rms) {
      const float shift = q[0] * p.inv_n;
      mean += shift;
      var = fmaxf(var - shift * shift, 0.f);
    }
    const float rstd = rsqrtf(var + p.eps);
    if (lane == 0) {
      if (p.mean != nullptr) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }

#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int col = (i * kGroup + lane) * V;
      if (col < N) store_normalized<V>(p, weight, bias, y, row, col, v[i], mean, rstd);
    }
  }
}

// Forward, any N: one block per row, two passes over kChunk-element chunks (thread t owns elements
// base + (i·kThreads + t)·V + [0, V) of each chunk). Pass 1 writes residual_out and gathers statistics; pass 2
// reads the normalized input again (residual_out, written by this same thread, or x) and writes y. No
// __restrict__ here: pass 2 reads what pass 1 wrote.
template <typename T, typename W, int V, int kThreads, int kIters>
__global__ void __launch_bounds__(kThreads, fwd_min_blocks<T, V>(kThreads))
    norm_fwd_chunked_kernel(const NormFwdParams p) {
  constexpr int kChunk = kThreads * kIters * V;
  __shared__ float smem[3 * kThreads / 32];
  const T* x = static_cast<const T*>(p.x);
  const T* residual = static_cast<const T*>(p.residual);
  const W* weight = static_cast<const W*>(p.weight);
  const W* bias = static_cast<const W*>(p.bias);
  T* y = static_cast<T*>(p.y);
  T* residual_out = static_cast<T*>(p.residual_out);
  const int64_t N = p.N;
  const int t = static_cast<int>(threadIdx.x);

  for (int64_t row = blockIdx.x; row < p.M; row += gridDim.x) {
    // This thread's statistics: RMSNorm keeps Σv² in m2; LayerNorm keeps (count, mean, M2).
    float n = 0.f;
    float mean = 0.f;
    float m2 = 0.f;
    for (int64_t base = 0; base < N; base += kChunk) {
      float v[kIters][V];
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int64_t col = base + static_cast<int64_t>(i * kThreads + t) * V;
        if (col < N) {
          load_floats<V>(x + row * p.x_stride + col, v[i]);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) v[i][j] = 0.f;
        }
      }
      if (residual != nullptr) {
#pragma unroll
        for (int i = 0; i < kIters; ++i) {
          const int64_t col = base + static_cast<int64_t>(i * kThreads + t) * V;
          if (col < N) {
            float r[V];
            load_floats<V>(residual + row * p.residual_stride + col, r);
#pragma unroll
            for (int j = 0; j < V; ++j) v[i][j] = round_to<T>(v[i][j] + r[j]);
            store_floats<V>(residual_out + row * p.residual_out_stride + col, v[i]);
          }
        }
      }
      if (p.is_rms) {
#pragma unroll
        for (int i = 0; i < kIters; ++i) {
#pragma unroll
          for (int j = 0; j < V; ++j) m2 += v[i][j] * v[i][j];
        }
      } else {
        float cnt = 0.f;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < kIters; ++i) {
          if (base + static_cast<int64_t>(i * kThreads + t) * V < N) cnt += static_cast<float>(V);
#pragma unroll
          for (int j = 0; j < V; ++j) s += v[i][j];
        }
        if (cnt > 0.f) {
          const float cm = __fdividef(s, cnt);
          float q = 0.f;
#pragma unroll
          for (int i = 0; i < kIters; ++i) {
            if (base + static_cast<int64_t>(i * kThreads + t) * V < N) {
#pragma unroll
              for (int j = 0; j < V; ++j) {
                const float d = v[i][j] - cm;
                q += d * d;
              }
            }
          }
          chan_merge(n, mean, m2, cnt, cm, q);
        }
      }
    }
    if (p.is_rms) {
      m2 = block_sum<kThreads>(m2, smem);
      mean = 0.f;
    } else {
      block_chan_merge<kThreads>(n, mean, m2, smem);
    }
    const float rstd = rsqrtf(m2 * p.inv_n + p.eps);
    if (t == 0) {
      if (p.mean != nullptr) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }

    const T* src = residual != nullptr ? residual_out + row * p.residual_out_stride : x + row * p.x_stride;
    for (int64_t base = 0; base < N; base += kChunk) {
      float v[kIters][V];
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int64_t col = base + static_cast<int64_t>(i * kThreads + t) * V;
        if (col < N) load_floats<V>(src + col, v[i]);
      }
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int64_t col = base + static_cast<int64_t>(i * kThreads + t) * V;
        if (col < N) store_normalized<V>(p, weight, bias, y, row, col, v[i], mean, rstd);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward. Running dw/db sums live in shared memory: dw's slots, then db's, each a (kE/S, kThreads) array of
// S-float slots (S = 4 when a thread's columns come in runs of V ≥ 4, else 1); slot (i·V/S + q, t) holds elements
// q·S .. q·S + S − 1 of thread t's access i. Only thread t touches its slots until a final barrier, so updates
// need no synchronization, and consecutive threads hit consecutive addresses (no bank conflicts). db's slots sit
// at a fixed distance after dw's (reserved even when dw is not wanted) so one register addresses both.

template <int V>
constexpr int slot_width() {
  return V >= 4 ? 4 : 1;
}

template <int V, int kThreads>
__device__ __forceinline__ float* acc_slot(float* acc, int t, int i, int q) {
  constexpr int S = slot_width<V>();
  return acc + ((i * (V / S) + q) * kThreads + t) * S;
}

template <int S>
__device__ __forceinline__ void slot_add(float* slot, const float* v) {
  if constexpr (S == 4) {
    float4 a = *reinterpret_cast<float4*>(slot);
    a.x += v[0];
    a.y += v[1];
    a.z += v[2];
    a.w += v[3];
    *reinterpret_cast<float4*>(slot) = a;
  } else {
    *slot += v[0];
  }
}

// acc[thread t's access i] += v.
template <int V, int kThreads>
__device__ __forceinline__ void acc_add(float* acc, int t, int i, const float (&v)[V]) {
  constexpr int S = slot_width<V>();
#pragma unroll
  for (int q = 0; q < V / S; ++q) slot_add<S>(acc_slot<V, kThreads>(acc, t, i, q), v + q * S);
}

// v = acc[thread t's access i].
template <int V, int kThreads>
__device__ __forceinline__ void acc_get(float* acc, int t, int i, float (&v)[V]) {
  constexpr int S = slot_width<V>();
#pragma unroll
  for (int q = 0; q < V / S; ++q) {
    const float* slot = acc_slot<V, kThreads>(acc, t, i, q);
#pragma unroll
    for (int k = 0; k < S; ++k) v[q * S + k] = slot[k];
  }
}

template <int V, int kIters, int kThreads>
__device__ __forceinline__ void acc_zero(float* acc, int t) {
  constexpr int S = slot_width<V>();
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
#pragma unroll
    for (int q = 0; q < V / S; ++q) {
      float* slot = acc_slot<V, kThreads>(acc, t, i, q);
#pragma unroll
      for (int k = 0; k < S; ++k) slot[k] = 0.f;
    }
  }
}

// Dynamic shared memory of a backward block: dw's slots, then db's (see above).
inline int acc_bytes(bool has_dw, bool has_db, int threads, int elems) {
  return (has_db ? 2 : has_dw ? 1 : 0) * threads * elems * static_cast<int>(sizeof(float));
}

// w_eff = unpack(w, j) + w_add: w_add is the RMSNorm offset, 0 for LayerNorm, and 1 without weight, where w is
// zero (also past the row's end, where dy is zero anyway).
__device__ __forceinline__ float weight_add(bool has_weight, bool is_rms, float offset) {
  return !has_weight ? 1.f : (is_rms ? offset : 0.f);
}

template <int V, typename W>
__device__ __forceinline__ Packed<W, V> load_weight(const W* weight, int64_t col, int64_t N) {
  return weight != nullptr && col < N ? load_packed<V>(weight + col) : zero_packed<W, V>();
}

// Backward, rows in registers. Block b (of G) owns rows [b·rows_per_block, min((b+1)·rows_per_block, M)); its
// kRows groups of kGroup threads take kRows rows at a time, with the forward's column layout. dy and v stay in
// registers in their storage type (half the registers of fp32 for 16-bit data) while the row sums are reduced;
// xhat and g are recomputed from them on each use, and the weight is re-read (an L1 hit) rather than held. At
// the end the groups' sums are added in order into group 0's slots and group 0 writes the block's workspace row.
// Every group runs the same number of iterations (a group past the block's last row computes on zeros and
// stores nothing) because the reductions of kGroup > 32 use block barriers. Dynamic shared memory: acc_bytes.
template <typename T, typename W, int V, int kGroup, int kRows, int kIters>
__global__ void __launch_bounds__(kGroup* kRows, bwd_min_blocks(kGroup* kRows)) norm_bwd_kernel(const NormBwdParams p) {
  constexpr int kThreads = kGroup * kRows;
  constexpr int kE = kIters * V;
  constexpr int S = slot_width<V>();
  extern __shared__ float4 acc_smem[];
  __shared__ float red[kGroup > 32 ? 2 * kThreads / 32 : 1];
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const T* __restrict__ xin = static_cast<const T*>(p.xin);
  const W* __restrict__ weight = static_cast<const W*>(p.weight);
  const float* __restrict__ mean = p.mean;
  const float* __restrict__ rstd = p.rstd;
  const T* __restrict__ dres = static_cast<const T*>(p.dres);
  T* __restrict__ dx = static_cast<T*>(p.dx);
  const int N = p.N;
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % kGroup;
  const int grp = t / kGroup;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int rows_here = static_cast<int>(std::min(p.rows_per_block, p.M - start));  // 32-bit: fewer registers
  const bool has_dw = p.dw_part != nullptr;
  const bool has_db = p.db_part != nullptr;
  const float w_add = weight_add(weight != nullptr, p.is_rms, p.offset);
  float* dw_acc = reinterpret_cast<float*>(acc_smem);
  float* db_acc = dw_acc + kE * kThreads;
  if (has_dw) acc_zero<V, kIters, kThreads>(dw_acc, t);
  if (has_db) acc_zero<V, kIters, kThreads>(db_acc, t);

  for (int r0 = 0; r0 < rows_here; r0 += kRows) {
    const bool valid = r0 + grp < rows_here;
    const int64_t row = start + r0 + grp;
    Packed<T, V> rdy[kIters];
    Packed<T, V> rx[kIters];
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int col = (i * kGroup + lane) * V;
      if (valid && col < N) {
        rdy[i] = load_packed<V>(dy + row * p.dy_stride + col);
        rx[i] = load_packed<V>(xin + row * p.xin_stride + col);
      } else {
        rdy[i] = zero_packed<T, V>();
        rx[i] = zero_packed<T, V>();
      }
    }
    const float rs = valid ? rstd[row] : 0.f;
    const float mu = valid && mean != nullptr ? mean[row] : 0.f;

    float s[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int col = (i * kGroup + lane) * V;
      const Packed<W, V> w = load_weight<V>(weight, col, N);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float g = unpack(rdy[i], j) * (unpack(w, j) + w_add);          // padding: dy = 0
        const float xh = col < N ? (unpack(rx[i], j) - mu) * rs : 0.f;
        s[0] += g * xh;
        s[1] += g;
      }
    }
    group_sum<kGroup, 2>(s, red);
    const float c1 = s[0] * p.inv_n;
    const float c2 = p.is_rms ? 0.f : s[1] * p.inv_n;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      opaque(rdy[i], p.zero);
      opaque(rx[i], p.zero);
    }

    // dx, and the dw/db sums (here rather than before the reduction, where the reduction's own registers are
    // live; rows past the end and padding would add zeros).
    if (valid) {
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int col = (i * kGroup + lane) * V;
        if (col < N) {
          // Kept packed until used: converted early, the weight and dres of every access would be live at once.
          const Packed<W, V> w = load_weight<V>(weight, col, N);
          const Packed<T, V> r =
              dres != nullptr ? load_packed<V>(dres + row * p.dres_stride + col) : zero_packed<T, V>();
          float out[V];
#pragma unroll
          for (int q = 0; q < V / S; ++q) {
            float d[S];
            float dxh[S];
#pragma unroll
            for (int k = 0; k < S; ++k) {
              const int j = q * S + k;
              d[k] = unpack(rdy[i], j);
              const float xh = (unpack(rx[i], j) - mu) * rs;
              out[j] = unpack(r, j) + rs * (d[k] * (unpack(w, j) + w_add) - (c1 * xh + c2));
              dxh[k] = d[k] * xh;
            }
            if (has_dw) slot_add<S>(acc_slot<V, kThreads>(dw_acc, t, i, q), dxh);
            if (has_db) slot_add<S>(acc_slot<V, kThreads>(db_acc, t, i, q), d);
          }
          store_floats<V>(dx + row * p.dx_stride + col, out);
        }
      }
    }
  }

  if constexpr (kRows > 1) {
    __syncthreads();
    if (grp == 0) {
      for (int r = 1; r < kRows; ++r) {
#pragma unroll
        for (int i = 0; i < kIters; ++i) {
          float v[V];
          if (has_dw) {
            acc_get<V, kThreads>(dw_acc, r * kGroup + t, i, v);
            acc_add<V, kThreads>(dw_acc, t, i, v);
          }
          if (has_db) {
            acc_get<V, kThreads>(db_acc, r * kGroup + t, i, v);
            acc_add<V, kThreads>(db_acc, t, i, v);
          }
        }
      }
    }
  }
  if (grp == 0) {
    const int64_t part_row = static_cast<int64_t>(blockIdx.x) * N;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int col = (i * kGroup + lane) * V;
      if (col < N) {
        float v[V];
        if (has_dw) {
          acc_get<V, kThreads>(dw_acc, t, i, v);
          store_floats<V>(p.dw_part + part_row + col, v);
        }
        if (has_db) {
          acc_get<V, kThreads>(db_acc, t, i, v);
          store_floats<V>(p.db_part + part_row + col, v);
        }
      }
    }
  }
}

// Backward, chunked path, step 1: c1 = Σ(g·xhat)/N and c2 = Σg/N of each row (one block per row, one pass).
template <typename T, typename W, int V, int kThreads, int kIters>
__global__ void __launch_bounds__(kThreads, bwd_min_blocks(kThreads)) norm_bwd_row_coef_kernel(const NormBwdParams p) {
  constexpr int kChunk = kThreads * kIters * V;
  __shared__ float red[2 * kThreads / 32];
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const T* __restrict__ xin = static_cast<const T*>(p.xin);
  const W* __restrict__ weight = static_cast<const W*>(p.weight);
  const int64_t N = p.N;
  const int t = static_cast<int>(threadIdx.x);
  const float w_add = weight_add(weight != nullptr, p.is_rms, p.offset);

  for (int64_t row = blockIdx.x; row < p.M; row += gridDim.x) {
    const float rs = p.rstd[row];
    const float mu = p.mean != nullptr ? p.mean[row] : 0.f;
    float s1 = 0.f;
    float s2 = 0.f;
    for (int64_t base = 0; base < N; base += kChunk) {
      Packed<T, V> rdy[kIters];
      Packed<T, V> rx[kIters];
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int64_t col = base + static_cast<int64_t>(i * kThreads + t) * V;
        if (col < N) {
          rdy[i] = load_packed<V>(dy + row * p.dy_stride + col);
          rx[i] = load_packed<V>(xin + row * p.xin_stride + col);
        }
      }
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int64_t col = base + static_cast<int64_t>(i * kThreads + t) * V;
        if (col < N) {
          const Packed<W, V> w = load_weight<V>(weight, col, N);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float g = unpack(rdy[i], j) * (unpack(w, j) + w_add);
            s1 += g * ((unpack(rx[i], j) - mu) * rs);
            s2 += g;
          }
        }
      }
    }
    block_sum2<kThreads>(s1, s2, red);
    if (t == 0) {
      p.row_coef[2 * row] = s1 * p.inv_n;
      p.row_coef[2 * row + 1] = p.is_rms ? 0.f : s2 * p.inv_n;
    }
  }
}

// Backward, chunked path, step 2: grid (column tiles, G row ranges). Each thread owns kIters·V columns of its
// tile and walks the rows of its block's range, writing dx and adding to its own dw/db slots; no barrier at all.
// Dynamic shared memory: (wanted partials) · kThreads · kIters · V floats.
template <typename T, typename W, int V, int kThreads, int kIters>
__global__ void __launch_bounds__(kThreads, bwd_min_blocks(kThreads)) norm_bwd_cols_kernel(const NormBwdParams p) {
  constexpr int kE = kIters * V;
  constexpr int kTile = kThreads * kE;
  extern __shared__ float4 acc_smem[];
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const T* __restrict__ xin = static_cast<const T*>(p.xin);
  const W* __restrict__ weight = static_cast<const W*>(p.weight);
  const float* __restrict__ mean = p.mean;
  const float* __restrict__ rstd = p.rstd;
  const float* __restrict__ row_coef = p.row_coef;
  const T* __restrict__ dres = static_cast<const T*>(p.dres);
  T* __restrict__ dx = static_cast<T*>(p.dx);
  const int64_t N = p.N;
  const int t = static_cast<int>(threadIdx.x);
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t start = static_cast<int64_t>(blockIdx.y) * p.rows_per_block;
  const int64_t end = std::min(start + p.rows_per_block, p.M);
  const bool has_dw = p.dw_part != nullptr;
  const bool has_db = p.db_part != nullptr;
  const float w_add = weight_add(weight != nullptr, p.is_rms, p.offset);
  float* dw_acc = reinterpret_cast<float*>(acc_smem);
  float* db_acc = dw_acc + kE * kThreads;
  if (has_dw) acc_zero<V, kIters, kThreads>(dw_acc, t);
  if (has_db) acc_zero<V, kIters, kThreads>(db_acc, t);

  for (int64_t row = start; row < end; ++row) {
    const float rs = rstd[row];
    const float mu = mean != nullptr ? mean[row] : 0.f;
    const float c1 = row_coef[2 * row];
    const float c2 = row_coef[2 * row + 1];
    Packed<T, V> rdy[kIters];
    Packed<T, V> rx[kIters];
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int64_t col = col0 + static_cast<int64_t>(i * kThreads + t) * V;
      if (col < N) {
        rdy[i] = load_packed<V>(dy + row * p.dy_stride + col);
        rx[i] = load_packed<V>(xin + row * p.xin_stride + col);
      } else {
        rdy[i] = zero_packed<T, V>();
        rx[i] = zero_packed<T, V>();
      }
    }
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int64_t col = col0 + static_cast<int64_t>(i * kThreads + t) * V;
      float d[V];
      float xh[V];
      float out[V];
      const Packed<W, V> w = load_weight<V>(weight, col, N);
      const Packed<T, V> r =
          dres != nullptr && col < N ? load_packed<V>(dres + row * p.dres_stride + col) : zero_packed<T, V>();
#pragma unroll
      for (int j = 0; j < V; ++j) {
        d[j] = unpack(rdy[i], j);
        xh[j] = col < N ? (unpack(rx[i], j) - mu) * rs : 0.f;
        out[j] = unpack(r, j) + rs * (d[j] * (unpack(w, j) + w_add) - (c1 * xh[j] + c2));
      }
      if (col < N) store_floats<V>(dx + row * p.dx_stride + col, out);
      if (has_db) acc_add<V, kThreads>(db_acc, t, i, d);
#pragma unroll
      for (int j = 0; j < V; ++j) d[j] *= xh[j];
      if (has_dw) acc_add<V, kThreads>(dw_acc, t, i, d);
    }
  }

  const int64_t part_row = static_cast<int64_t>(blockIdx.y) * N;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int64_t col = col0 + static_cast<int64_t>(i * kThreads + t) * V;
    if (col < N) {
      float v[V];
      if (has_dw) {
        acc_get<V, kThreads>(dw_acc, t, i, v);
        store_floats<V>(p.dw_part + part_row + col, v);
      }
      if (has_db) {
        acc_get<V, kThreads>(db_acc, t, i, v);
        store_floats<V>(p.db_part + part_row + col, v);
      }
    }
  }
}

// dw and db: column sums of the (G, N) partials. Block (blockIdx.x, blockIdx.y): 32 columns of output
// blockIdx.y (0: dw, 1: db); warp s sums rows s, s + kFinalizeSlices, ... (a warp reads 128 contiguous bytes),
// then the kFinalizeSlices sums are added in order. Fixed order: deterministic.
template <typename W>
__global__ void __launch_bounds__(32 * kFinalizeSlices) norm_bwd_finalize_kernel(const FinalizeParams p) {
  // A select, not p.part[blockIdx.y]: indexing a kernel parameter array at run time copies it to local memory.
  const float* __restrict__ part = blockIdx.y == 0 ? p.part[0] : p.part[1];
  W* __restrict__ out = static_cast<W*>(blockIdx.y == 0 ? p.out[0] : p.out[1]);
  if (part == nullptr) return;
  __shared__ float sums[kFinalizeSlices][33];
  const int tx = static_cast<int>(threadIdx.x) % 32;
  const int slice = static_cast<int>(threadIdx.x) / 32;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  float s = 0.f;
  if (col < p.N) {
#pragma unroll 4
    for (int g = slice; g < p.G; g += kFinalizeSlices) s += part[static_cast<int64_t>(g) * p.N + col];
  }
  sums[slice][tx] = s;
  __syncthreads();
  if (slice == 0 && col < p.N) {
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < kFinalizeSlices; ++k) total += sums[k][tx];
    out[col] = from_float<W>(total);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers.

namespace {

// Calls f(Tag<T>, Tag<W>) for the data type and weight type codes; W is T or float.
template <typename F>
void dispatch_types(int dtype, int wdtype, F&& f) {
  dispatch_dtype(dtype, [&](auto t) {
    if (wdtype == kFloat32) {
      f(t, Tag<float>{});
    } else {
      f(t, t);
    }
  });
}

void check_dtypes(int dtype, int wdtype) {
  dispatch_dtype(dtype, [](auto) {});
  if (wdtype != dtype && wdtype != kFloat32) {
    throw std::invalid_argument("fastlm._C: the weight dtype must be the data dtype or float32 (code " +
                                std::to_string(wdtype) + " with data code " + std::to_string(dtype) + ")");
  }
}

// Largest grid.x we launch; the row kernels loop over rows past it.
constexpr int64_t kMaxGridX = INT_MAX;

template <typename T, typename W, int V, int kGroup, int kRows, int kE>
void launch_fwd_rows(const NormFwdParams& p, cudaStream_t stream) {
  static_assert(kE % V == 0, "elements a thread must be a whole number of accesses");
  const int64_t blocks = std::min(ceil_div(p.M, kRows), kMaxGridX);
  norm_fwd_kernel<T, W, V, kGroup, kRows, kE / V><<<static_cast<unsigned>(blocks), kGroup * kRows, 0, stream>>>(p);
  check_launch("norm_fwd_kernel");
}

// Forward shapes by N. Vectorized: 8 and 16 elements a thread for the smallest rows (one warp a row, 4 rows a
// block), then 32 with the group widening; scalar: 8 elements a thread throughout. Each step covers twice the
// previous N, so at least half of the threads' slots hold data.
template <typename T, typename W, int V>
void launch_fwd(const NormFwdParams& p, cudaStream_t stream) {
  const int N = p.N;
  if constexpr (V > 1) {
    if (N <= 256) return launch_fwd_rows<T, W, V, 32, 4, 8>(p, stream);
    if (N <= 512) return launch_fwd_rows<T, W, V, 32, 4, 16>(p, stream);
    if (N <= 1024) return launch_fwd_rows<T, W, V, 32, 4, kFwdElems>(p, stream);
    if (N <= 2048) return launch_fwd_rows<T, W, V, 64, 1, kFwdElems>(p, stream);
    if (N <= 4096) return launch_fwd_rows<T, W, V, 128, 1, kFwdElems>(p, stream);
    if (N <= 8192) return launch_fwd_rows<T, W, V, 256, 1, kFwdElems>(p, stream);
    static_assert(512 * kFwdElems == kFwdRegisterMaxN, "the widest shape covers kFwdRegisterMaxN");
    if (N <= kFwdRegisterMaxN) return launch_fwd_rows<T, W, V, 512, 1, kFwdElems>(p, stream);
  } else {
    if (N <= 256) return launch_fwd_rows<T, W, V, 32, 4, kScalarElems>(p, stream);
    if (N <= 512) return launch_fwd_rows<T, W, V, 64, 1, kScalarElems>(p, stream);
    if (N <= 1024) return launch_fwd_rows<T, W, V, 128, 1, kScalarElems>(p, stream);
    if (N <= 2048) return launch_fwd_rows<T, W, V, 256, 1, kScalarElems>(p, stream);
    if (N <= 4096) return launch_fwd_rows<T, W, V, 512, 1, kScalarElems>(p, stream);
    static_assert(1024 * kScalarElems == kFwdScalarRegisterMaxN, "the widest shape covers the maximum");
    if (N <= kFwdScalarRegisterMaxN) return launch_fwd_rows<T, W, V, 1024, 1, kScalarElems>(p, stream);
  }
  constexpr int kE = V > 1 ? kChunkElems : kScalarElems;
  const int64_t blocks = std::min(p.M, kMaxGridX);
  norm_fwd_chunked_kernel<T, W, V, kChunkThreads, kE / V>
      <<<static_cast<unsigned>(blocks), kChunkThreads, 0, stream>>>(p);
  check_launch("norm_fwd_chunked_kernel");
}

// Launches kernel with `smem` bytes of dynamic shared memory, opting in above the default limit.
template <typename Kernel>
void launch_with_smem(Kernel kernel, const char* name, dim3 grid, int threads, int smem, cudaStream_t stream,
                      const NormBwdParams& p) {
  opt_in_smem(kernel, smem, name);
  kernel<<<grid, threads, smem, stream>>>(p);
  check_launch(name);
}

template <typename T, typename W, int V, int kGroup, int kRows, int kE>
void launch_bwd_rows(const NormBwdParams& p, cudaStream_t stream) {
  static_assert(kE % V == 0, "whole accesses a thread");
  const int smem = acc_bytes(p.dw_part != nullptr, p.db_part != nullptr, kGroup * kRows, kE);
  launch_with_smem(norm_bwd_kernel<T, W, V, kGroup, kRows, kE / V>, "norm_bwd_kernel", dim3(p.G), kGroup * kRows,
                   smem, stream, p);
}

// Backward shapes by N: kBwdThreads threads a block, the group widening with N while the rows a block takes at
// a time shrink; E elements a thread (fewer for the smallest rows). Wider rows than the last shape take the
// chunked path (bwd_register_max_n).
template <typename T, typename W, int V>
void launch_bwd_rows_by_n(const NormBwdParams& p, cudaStream_t stream) {
  const int N = p.N;
  constexpr int kE = V == 1 ? kScalarElems : sizeof(T) == 2 ? kBwd16Elems : kBwd32Elems;
  static_assert(kBwdThreads == 512, "the shapes below have 512 threads");
  if constexpr (V > 1) {
    if (N <= 32 * 8) return launch_bwd_rows<T, W, V, 32, 16, 8>(p, stream);
    if constexpr (kE > 16) {
      if (N <= 32 * 16) return launch_bwd_rows<T, W, V, 32, 16, 16>(p, stream);
    }
  }
  if (N <= 32 * kE) return launch_bwd_rows<T, W, V, 32, 16, kE>(p, stream);
  if (N <= 64 * kE) return launch_bwd_rows<T, W, V, 64, 8, kE>(p, stream);
  if (N <= 128 * kE) return launch_bwd_rows<T, W, V, 128, 4, kE>(p, stream);
  if (N <= 256 * kE) return launch_bwd_rows<T, W, V, 256, 2, kE>(p, stream);
  return launch_bwd_rows<T, W, V, 512, 1, kE>(p, stream);
}

template <typename T, typename W, int V>
void launch_bwd_chunked(const NormBwdParams& p, cudaStream_t stream) {
  constexpr int kE = V > 1 ? kChunkElems : kScalarElems;
  const int64_t blocks = std::min(p.M, kMaxGridX);
  norm_bwd_row_coef_kernel<T, W, V, kChunkThreads, kE / V>
      <<<static_cast<unsigned>(blocks), kChunkThreads, 0, stream>>>(p);
  check_launch("norm_bwd_row_coef_kernel");
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, kColThreads * kE)), static_cast<unsigned>(p.G));
  const int smem = acc_bytes(p.dw_part != nullptr, p.db_part != nullptr, kColThreads, kE);
  launch_with_smem(norm_bwd_cols_kernel<T, W, V, kColThreads, kE / V>, "norm_bwd_cols_kernel", grid, kColThreads,
                   smem, stream, p);
}

struct DeviceLimits {
  int sms;
  int smem_optin;  // bytes of shared memory a block may opt in to
};

DeviceLimits device_limits(int device) {
  DeviceLimits d{};
  FASTLM_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
  FASTLM_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  d.sms = std::max(d.sms, 1);
  return d;
}

// Widest row the backward keeps in registers for this dtype and access width on this device: the register
// kernel's shared memory (both partials) must fit a block.
int bwd_register_max_n(bool vec, int dtype, const DeviceLimits& d) {
  const int max_n = !vec ? kBwdScalarRegisterMaxN : dtype == kFloat32 ? kBwd32RegisterMaxN : kBwd16RegisterMaxN;
  const int elems = !vec ? kScalarElems : dtype == kFloat32 ? kBwd32Elems : kBwd16Elems;
  const int smem = acc_bytes(true, true, kBwdThreads, elems) + 2 * kBwdThreads / 32 * 4;
  return d.smem_optin >= smem ? max_n : 0;
}

// G: blocks along the rows (= workspace rows per partial), at most one per row. Rows up to kBwd16RegisterMaxN:
// kPartialsPerSm per SM, the register path's grid (also when a row that wide takes the chunked path, so that the
// count does not depend on dtype or alignment). Wider rows: the column kernel's grid is (tiles × G), so G is
// what brings it to about kColBlocksPerSm blocks per SM.
int64_t num_partials(int64_t M, int64_t N, const DeviceLimits& d) {
  if (M <= 0 || N <= 0) return 0;
  int64_t g = static_cast<int64_t>(kPartialsPerSm) * d.sms;
  if (N > kBwd16RegisterMaxN) {
    const int64_t tiles = ceil_div(N, kColThreads * kChunkElems);
    g = std::min<int64_t>(ceil_div(static_cast<int64_t>(kColBlocksPerSm) * d.sms, tiles), 65535);
  }
  g = std::max<int64_t>(1, std::min(g, M));
  // Whole blocks of rows_per_block rows: the kernels then need no 64-bit division, and no block is empty.
  return ceil_div(M, ceil_div(M, g));
}

// The partials wanted, then (M, 2) row coefficients for the chunked path: reserved whatever the path (8 bytes a
// row, never touched by the register path), so that the size depends on neither dtype nor alignment.
int64_t workspace_numel(int64_t M, int64_t N, bool need_dw, bool need_db, const DeviceLimits& d) {
  const int64_t parts = (need_dw ? 1 : 0) + (need_db ? 1 : 0);
  return parts * num_partials(M, N, d) * N + 2 * M;
}

void check_sizes(int64_t M, int64_t N) {
  if (M < 0 || N < 0) {
    throw std::invalid_argument("fastlm._C: M and N must be ≥ 0, got M=" + std::to_string(M) +
                                ", N=" + std::to_string(N));
  }
  if (N > INT_MAX / 2) throw std::invalid_argument("fastlm._C: N=" + std::to_string(N) + " is too large for a row");
}

// A (M, N) operand allows V-wide accesses when its base is 16-byte aligned and so is every row (stride % V == 0;
// a single row has no stride to speak of).
bool rows_aligned(const void* p, int64_t stride, int64_t M, int V) {
  return p == nullptr || (aligned16(p) && (M <= 1 || stride % V == 0));
}

}  // namespace
}  // namespace fastlm

// ---------------------------------------------------------------------------------------------------------------
// The launchers of launchers.h, defined by qualified name: a signature unlike the declaration does not compile.

void fastlm::norm_fwd(int64_t x, int64_t x_stride, int64_t residual, int64_t residual_stride, int64_t weight, int64_t bias,
              int64_t y, int64_t y_stride, int64_t residual_out, int64_t residual_out_stride, int64_t mean,
              int64_t rstd, int64_t M, int64_t N, int dtype, int wdtype, double eps, bool is_rms, double offset,
              int device, int64_t stream) {
  const DeviceGuard guard(device);
  check_dtypes(dtype, wdtype);
  check_sizes(M, N);
  if (M == 0 || N == 0) return;  // before the pointer checks: an empty tensor may have a null data pointer
  if (x == 0 || y == 0 || rstd == 0) throw std::invalid_argument("fastlm._C: norm_fwd needs x, y and rstd");
  if ((residual == 0) != (residual_out == 0)) {
    throw std::invalid_argument("fastlm._C: norm_fwd: residual_out is given iff residual is");
  }
  if (is_rms && (mean != 0 || bias != 0)) {
    throw std::invalid_argument("fastlm._C: norm_fwd: RMSNorm takes no mean output and no bias");
  }
  if (!is_rms && mean == 0) throw std::invalid_argument("fastlm._C: norm_fwd: LayerNorm needs the mean output");

  NormFwdParams p{};
  p.x = ptr<const void>(x);
  p.residual = ptr<const void>(residual);
  p.weight = ptr<const void>(weight);
  p.bias = ptr<const void>(bias);
  p.y = ptr<void>(y);
  p.residual_out = ptr<void>(residual_out);
  p.mean = ptr<float>(mean);
  p.rstd = ptr<float>(rstd);
  p.x_stride = x_stride;
  p.residual_stride = residual_stride;
  p.y_stride = y_stride;
  p.residual_out_stride = residual_out_stride;
  p.M = M;
  p.N = static_cast<int>(N);
  p.eps = static_cast<float>(eps);
  p.offset = static_cast<float>(offset);
  p.inv_n = 1.f / static_cast<float>(N);
  p.is_rms = is_rms;

  const int V = 16 / dtype_size(dtype);
  const bool vec = N % V == 0 && rows_aligned(p.x, x_stride, M, V) &&
                   rows_aligned(p.residual, residual_stride, M, V) && rows_aligned(p.y, y_stride, M, V) &&
                   rows_aligned(p.residual_out, residual_out_stride, M, V) && rows_aligned(p.weight, 0, 1, V) &&
                   rows_aligned(p.bias, 0, 1, V);
  const cudaStream_t s = as_stream(stream);
  dispatch_types(dtype, wdtype, [&](auto t, auto w) {
    using T = typename decltype(t)::type;
    using W = typename decltype(w)::type;
    if (vec) {
      launch_fwd<T, W, static_cast<int>(16 / sizeof(T))>(p, s);
    } else {
      launch_fwd<T, W, 1>(p, s);
    }
  });
}

int64_t fastlm::norm_bwd_num_partials(int64_t M, int64_t N, int device) {
  const DeviceGuard guard(device);
  check_sizes(M, N);
  return num_partials(M, N, device_limits(device));
}

int64_t fastlm::norm_bwd_workspace_numel(int64_t M, int64_t N, bool need_dw, bool need_db, int device) {
  const DeviceGuard guard(device);
  check_sizes(M, N);
  return workspace_numel(M, N, need_dw, need_db, device_limits(device));
}

void fastlm::norm_bwd(int64_t dy, int64_t dy_stride, int64_t xin, int64_t xin_stride, int64_t weight, int64_t mean,
              int64_t rstd, int64_t dres, int64_t dres_stride, int64_t dx, int64_t dx_stride, int64_t dw, int64_t db,
              int64_t workspace, int64_t workspace_numel_given, int64_t M, int64_t N, int dtype, int wdtype,
              bool is_rms, double offset, int device, int64_t stream) {
  const DeviceGuard guard(device);
  check_dtypes(dtype, wdtype);
  check_sizes(M, N);
  if (M == 0 || N == 0) return;  // the caller zero-fills dw and db (sums over no rows)
  if (dy == 0 || xin == 0 || dx == 0 || rstd == 0) {
    throw std::invalid_argument("fastlm._C: norm_bwd needs dy, xin, dx and rstd");
  }
  if (is_rms && (mean != 0 || db != 0)) {
    throw std::invalid_argument("fastlm._C: norm_bwd: RMSNorm takes no mean and has no bias gradient");
  }
  if (!is_rms && mean == 0) throw std::invalid_argument("fastlm._C: norm_bwd: LayerNorm needs the mean");

  const DeviceLimits limits = device_limits(device);
  const int64_t G = num_partials(M, N, limits);
  const int64_t needed = workspace_numel(M, N, dw != 0, db != 0, limits);
  if (workspace_numel_given < needed || (needed > 0 && workspace == 0)) {
    throw std::invalid_argument("fastlm._C: norm_bwd: the workspace holds " + std::to_string(workspace_numel_given) +
                                " floats, " + std::to_string(needed) + " are needed");
  }

  NormBwdParams p{};
  p.dy = ptr<const void>(dy);
  p.xin = ptr<const void>(xin);
  p.weight = ptr<const void>(weight);
  p.mean = ptr<const float>(mean);
  p.rstd = ptr<const float>(rstd);
  p.dres = ptr<const void>(dres);
  p.dx = ptr<void>(dx);
  float* ws = ptr<float>(workspace);
  const int64_t parts = (dw != 0 ? 1 : 0) + (db != 0 ? 1 : 0);
  p.dw_part = dw != 0 ? ws : nullptr;
  p.db_part = db != 0 ? ws + (dw != 0 ? G * N : 0) : nullptr;
  p.row_coef = ws + parts * G * N;
  p.dy_stride = dy_stride;
  p.xin_stride = xin_stride;
  p.dres_stride = dres_stride;
  p.dx_stride = dx_stride;
  p.M = M;
  p.N = static_cast<int>(N);
  p.G = static_cast<int>(G);
  p.rows_per_block = ceil_div(M, G);
  if (p.rows_per_block > INT_MAX) throw std::invalid_argument("fastlm._C: norm_bwd: too many rows");
  p.offset = static_cast<float>(offset);
  p.inv_n = 1.f / static_cast<float>(N);
  p.zero = 0;
  p.is_rms = is_rms;

  const int V = 16 / dtype_size(dtype);
  const bool vec = N % V == 0 && rows_aligned(p.dy, dy_stride, M, V) && rows_aligned(p.xin, xin_stride, M, V) &&
                   rows_aligned(p.dres, dres_stride, M, V) && rows_aligned(p.dx, dx_stride, M, V) &&
                   rows_aligned(p.weight, 0, 1, V) && (ws == nullptr || aligned16(ws));
  const bool chunked = N > bwd_register_max_n(vec, dtype, limits);
  const cudaStream_t s = as_stream(stream);
  dispatch_types(dtype, wdtype, [&](auto t, auto w) {
    using T = typename decltype(t)::type;
    using W = typename decltype(w)::type;
    constexpr int kV = static_cast<int>(16 / sizeof(T));
    if (chunked) {
      if (vec) {
        launch_bwd_chunked<T, W, kV>(p, s);
      } else {
        launch_bwd_chunked<T, W, 1>(p, s);
      }
    } else if (vec) {
      launch_bwd_rows_by_n<T, W, kV>(p, s);
    } else {
      launch_bwd_rows_by_n<T, W, 1>(p, s);
    }
    if (dw != 0 || db != 0) {
      FinalizeParams f{};
      f.part[0] = p.dw_part;
      f.part[1] = p.db_part;
      f.out[0] = ptr<void>(dw);
      f.out[1] = ptr<void>(db);
      f.G = p.G;
      f.N = p.N;
      const dim3 grid(static_cast<unsigned>(ceil_div(N, 32)), 2);
      norm_bwd_finalize_kernel<W><<<grid, 32 * kFinalizeSlices, 0, s>>>(f);
      check_launch("norm_bwd_finalize_kernel");
    }
  });
}

// The SM architectures of the device code in this binary, from nvcc's __CUDA_ARCH_LIST__ (e.g. 800,900). It lives
// in a .cu file because setup.py compiles bindings.cpp without the -gencode flags, where nvcc reports its default
// architecture instead.
std::vector<int> fastlm::compiled_archs() {
#if defined(__CUDA_ARCH_LIST__)
  const int list[] = {__CUDA_ARCH_LIST__};
  std::vector<int> archs;
  for (const int a : list) archs.push_back(a / 10);
  return archs;
#elif defined(FASTLM_CUDA_ARCHS)
  return std::vector<int>{FASTLM_CUDA_ARCHS};
#else
  return {};
#endif
}

// "13.0" for CUDA 13.0: the runtime linked statically into this module (no GPU needed to ask). Beside
// compiled_archs as the module's other piece of build information.
std::string fastlm::cuda_runtime_version() {
  int version = 0;
  FASTLM_CUDA_CHECK(cudaRuntimeGetVersion(&version));
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}
