// Softmax cross-entropy over a large vocabulary, with the gradient computed in the forward pass: CUDA kernels and
// their launchers (raw pointers). The Triton version (kernels/cross_entropy.py) is the specification: same math,
// same outputs, same edge cases.
//
// Math, per row of logits z (length V), target t, class weights w (1 without), smoothing ε, z-loss coefficient ζ,
// all in fp32 whatever the storage dtype (float32, float16, bfloat16):
//   softcap c       x = c·tanh(z/c) (Gemma 2), else x = z;  m = max_v x_v;  log s = log Σ_v exp(x_v − m);
//                   lse = m + log s;  p_v = exp((x_v − m) − log s)
//   loss            w_t·(1−ε)·((m − x_t) + log s) + (ε/V)·(W·lse − Σ_v w_v·x_v) + ζ·lse²   (W = Σ_v w_v)
//                   0 for an ignored row (t = ignore_index); NaN for a target that is neither ignore_index nor a
//                   class in [0, V) (it cannot be checked without a host sync; it is never read out of bounds)
//   d loss / d x_v  p_v·S − a_t·[v = t] − (ε/V)·w_v,  a_t = w_t·(1−ε),  S = a_t + R,  R = (ε/V)·W + 2ζ·lse;
//                   at the target fma(p_t, R, a_t·(p_t − 1) − c_t): the cross-entropy part first (p_t − 1 exact for
//                   p_t ≥ ½), since a confident row's gradient there is about R·p_t, whose low bits S would round off
//   d x / d z       1 − tanh²(z/c) with the softcap, as 4e/(1+e)² with e = exp(−2|z/c|) where |z/c| ≥ 0.55 (no
//                   cancellation where tanh → ±1, the capped logits that matter most), else 1 − tanh²
// The forward writes the gradient of the reduced loss for an incoming gradient of 1: each row's times
// keep/SCALARS[0] (SCALARS[0]: Σ w_t over kept rows for "mean", else 1; computed on the device by the caller).
// Reduction "none" recomputes the gradient in the backward (each row has its own incoming gradient); "mean" and
// "sum" scale the forward's buffer in place by the one incoming scalar, which is read on the device, so the
// kernel returns at once when it is 1.0 (loss.backward()) and nothing syncs the host.
//
// The reduction's bookkeeping, kernels/cross_entropy.py's scalars() and reduce_loss() for any number of rows:
//   SCALARS[0]      "mean": #{rows: t ≠ ignore_index} (out-of-range targets counted: their loss is NaN anyway), or
//                   with weights Σ w_t·keep over the rows, keep = [t ≠ ignore_index and 0 ≤ t < V], where a row
//                   left out adds w_0·0 (so a non-finite w_0 still makes the divisor NaN, as torch's gather did);
//                   else 1. SCALARS[1] = W = Σ_v w_v, or V without weights.
//   reduced loss    Σ_rows loss, divided by SCALARS[0] for "mean" (div.full.f32, the division Triton emits).
// Every sum is float64 in a fixed order (each thread its rows in order, then a fixed tree), rounded once to fp32:
// the counts are exact, the weighted sums within one fp32 rounding of the Triton kernel's. Up to kSumChunk rows
// one block does everything (one launch, what small calls need); above, one block per kSumChunk rows writes a
// float64 partial to a workspace the caller allocates and one block sums the partials in order (two launches).
//
// Saved for the backward (by the caller): "none": the logits, targets, weights, SCALARS, and per row m and log s
// (fp32, 8 bytes a row); "mean"/"sum": the gradient buffer only. m and log s are kept apart rather than as lse:
// x − m is exact for nearby values and log s is small, so p keeps the precision of torch's log_softmax, whereas
// lse itself is rounded at its (larger) magnitude.
//
// Roofline, bytes per call for rows × V logits of dtype size d: forward with the gradient reads the logits twice
// and writes the gradient once, 3·rows·V·d, of which the second read mostly hits L2 (below), so ≈ 2·rows·V·d from
// HBM; forward without the gradient rows·V·d; backward "none" 2·rows·V·d; the scaling kernel 0 for an incoming
// 1.0, else 2·rows·V·d. Per row: the target, loss, m and log s (≤ 20 bytes); the class weights (V fp32, L2-
// resident) are read per row only with weights and smoothing. Everything is memory bound but the softcap: the
// SASS has about 10 fp32 instructions an element in the first pass and 14 in the second (one accurate expf each),
// within the ~35 both passes together may spend on a 16-bit element at H100 bandwidth (128 lanes an SM a cycle);
// the softcap adds tanhf to both passes and its slope (another expf and a reciprocal) to the second, which makes
// that variant compute bound (MUFU and FMA pipes).
//
// Design, and why (the shapes are the constants below; ptxas -v: no spills, no local memory, sm_80 and sm_90a):
// - One block of kThreads threads per row, walking the vocabulary in chunks (online softmax: each thread keeps
//   its own running max and rescaled running sum, merged across the block once per row), so V is unbounded
//   (262144 and more) and only two block reductions happen per row. A thread rescales its sum only when its max
//   grows, which after the first chunks is rare: one expf per element.
// - 16-byte accesses, decided per row at run time: a row whose start is not 16-byte aligned (V = 50257 makes
//   most rows so) is split into a scalar head up to the first 16-byte boundary, a vectorized body and a scalar
//   tail, so odd vocabularies keep 128-bit accesses. The gradient pass needs the logits row and the gradient row
//   at the same offset within 16 bytes; where they are not (a logits row stride unlike the gradient's), that row
//   takes a scalar loop (a fallback, correct at any alignment). The class weights likewise: vector loads when
//   their column offset is 16-byte aligned, scalar loads otherwise.
// - kIters 16-byte loads a thread are issued before any is used (64 bytes a thread, 64 KB in flight per SM at two
//   512-thread blocks an SM), what HBM latency × bandwidth needs.
// - The second read of the row runs from its last chunk to its first: the chunks read last in the first pass are
//   the likeliest to still be in L2, where a forward walk would find the row's start evicted whenever the rows in
//   flight outgrow L2 (132 SMs × 2 rows × 256 KB for bf16 V = 128k). Its loads and the gradient's stores are
//   evict-first (ld/st.global.cs): read or written for the last time here, they should not push out of L2 the
//   rows other blocks are about to read again.
// - The target's term −a_t·[v = t] is not tested per element: the row loop writes p·S − c everywhere, and after a
//   barrier thread 0 (which loaded z_t at the row's start for the loss) rewrites the one element t with
//   fma(p_t, R, a_t·(p_t − 1) − c_t), the expression of the specification. x_t is loaded directly too.
// - −inf logits give p = 0; a row of −inf only gives NaN (0/0) as torch does; +inf gives NaN as torch does (inf −
//   inf); NaN logits propagate to the loss. A thread's sum is shifted by its max, or by 0 while that is −inf, so
//   no inf − inf appears unless an input holds +inf. Padding lanes are never computed at all, so nothing leaks
//   through the softcap.
// - Ignored rows: loss 0 and gradient exactly 0 (written without reading the logits again); m and log s are still
//   computed, as the specification returns them. All-ignored "mean" (divisor 0) still gives zero gradients here.
// - x = c·tanh(z·(1/c)) with CUDA's tanhf (2 ulp) and both products rounded on their own (no FMA contraction):
//   the first pass, the second pass and x_t then agree bit for bit on x, so the forward's statistics and the
//   gradient's p are consistent; it is also the expression torch evaluates for softcap·tanh(z / softcap) in fp32
//   (torch divides by a scalar through its reciprocal). expf and logf are the accurate ones (≈ 1 ulp), not
//   __expf: the gradient's p is compared element by element with torch's.
// - Deterministic: every reduction is a fixed tree (common.cuh's, and block_max below); no atomics.
// - Offsets are int64 (rows × V passes 2^31: 32k × 128k); columns are int (V < 2^30).
// - Options (weights, smoothing, z-loss, int32/int64 targets) are runtime arguments, uniform across a launch,
//   which keeps the template instances (and the build time) down; the kernels are templated on the logits'
//   dtype and on the softcap (tanhf in the inner loops).
// - The gradient is either a buffer of its own or the logits themselves (fastlm.cross_entropy's
//   inplace_backward): every element is read, in both passes, before the thread that reads it last writes it,
//   and no element is read after it is written (the target's x_t is loaded at the row's start), so writing over
//   the logits is safe. The two pointers are therefore not __restrict__ (which would promise the compiler they
//   never alias: undefined behaviour here, harmless only while it reloads nothing). Partial overlap is not safe.

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "launchers.h"

namespace fastlm {
namespace {

// Forward and backward: one block of kThreads per row, kBlocksPerSm resident per SM (64 registers a thread),
// each thread issuing kIters 16-byte loads a chunk; kScalarIters elements a thread a chunk in the scalar fallback.
constexpr int kThreads = 512;
constexpr int kBlocksPerSm = 2;
constexpr int kIters = 4;
constexpr int kScalarIters = 8;
// In-place scaling: blocks of kScaleThreads, kScaleBlocksPerSm an SM, looping over rows.
constexpr int kScaleThreads = 512;
constexpr int kScaleBlocksPerSm = 4;
// |z/c| from which the softcap's slope is 4e/(1+e)² rather than 1 − tanh².
constexpr float kSlopeSwitch = 0.55f;
// Widest row: columns and vector indices stay in int with room for a chunk past the end.
constexpr int64_t kMaxV = int64_t{1} << 30;
// The reduction's bookkeeping (scalars, reduced loss): blocks of kSumThreads threads, each thread with kSumUnroll
// loads in flight (8192 a block, as the Triton kernel's 16 warps); a block takes up to kSumChunk rows.
constexpr int kSumThreads = 512;
constexpr int kSumUnroll = 16;
constexpr int64_t kSumChunk = int64_t{1} << 16;

struct CeParams {
  const void* logits;     // (rows, V) in the logits' dtype, row stride stride_l, unit column stride
  const void* target;     // (rows,) int64 (target_int64) or int32 class indices
  const float* weight;    // (V,) fp32 class weights, or null
  const float* scalars;   // (2,) fp32: the reduction's divisor (Σ w_t over kept rows for "mean", else 1), W = Σ w_v
  const float* grad_out;  // (rows,) fp32 incoming gradient of each row's loss (backward only)
  float* loss;            // (rows,) fp32: each row's loss, unreduced and undivided (forward output)
  float* row_max;         // (rows,) fp32: m, the max of the (softcapped) row (forward output, backward input)
  float* log_s;           // (rows,) fp32: log Σ exp(x − m) (forward output, backward input)
  void* grad;             // (rows, V) in the logits' dtype, row stride stride_g; null: no gradient (forward)
  int64_t stride_l;       // logits row stride, elements
  int64_t stride_g;       // grad row stride, elements
  int64_t rows;
  int64_t ignore_index;
  int V;              // classes
  int cols;           // columns of logits and grad: the classes col0 .. col0 + cols − 1 (V and 0: whole rows; a
  int col0;           // vocabulary block in the backward of the low-memory linear cross-entropy)
  float keep_nll;     // 1 − ε, computed in double on the host and rounded once
  float smooth_v;     // ε / V, likewise; 0 without smoothing
  float z_loss;       // ζ
  float softcap;      // c (kernels with the softcap only)
  float inv_softcap;  // 1/c rounded in fp32, as torch's division by a scalar does
  bool target_int64;
  bool has_smoothing;
  bool has_z;
};

struct SumParams {
  const void* target;     // (rows,) int64 (target_int64) or int32 class indices (scalars)
  const float* weight;    // (V,) fp32 class weights, or null (scalars)
  const float* loss;      // (rows,) fp32 unreduced losses (reduce)
  const float* divisor;   // SCALARS[0], read for "mean" (reduce)
  float* out;             // (2,) SCALARS (scalars) or () the reduced loss (reduce)
  double* partials;       // (num_partials,) float64 per-block sums, or null (one block takes every row)
  int64_t rows;
  int64_t num_partials;
  int64_t ignore_index;
  int V;
  bool is_mean;
};

struct ScaleParams {
  void* grad;             // (rows, V) in its dtype, row stride stride_g: scaled in place
  const float* grad_out;  // (1,) fp32 incoming gradient of the reduced loss
  int64_t stride_g;
  int64_t rows;
  int V;
};

// ---------------------------------------------------------------------------------------------------------------
// Device helpers.

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

// A row of V elements of T split at 16-byte boundaries: [0, head) scalar, then nvec vectors of 16 bytes from
// column head, then [tail, V) scalar. The row pointer must be aligned to sizeof(T).
struct RowSplit {
  int head;
  int nvec;
  int tail;  // head + nvec · (16 / sizeof(T))
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* row, int V) {
  constexpr int kVE = 16 / static_cast<int>(sizeof(T));
  const int mis = static_cast<int>(reinterpret_cast<std::uintptr_t>(row) % 16) / static_cast<int>(sizeof(T));
  RowSplit s;
  s.head = min(V, (kVE - mis) % kVE);
  s.nvec = (V - s.head) / kVE;
  s.tail = s.head + s.nvec * kVE;
  return s;
}

// The column of the head or tail element that thread k handles, or −1 (fewer than 2·16/sizeof(T) such elements, so
// the first warp covers them).
__device__ __forceinline__ int scalar_col(const RowSplit& s, int k, int V) {
  if (k < s.head) return k;
  const int col = s.tail + (k - s.head);
  return col < V ? col : -1;
}

// common.cuh's aligned16 is host code; the kernels decide per row.
__device__ __forceinline__ bool aligned16_on_device(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

// One 16-byte access of N elements of T, evict-first (the row's last read, or a write read no sooner than the
// backward): ld/st.global.cs.
template <typename T, int N>
__device__ __forceinline__ Packed<T, N> load_packed_last(const T* p) {
  static_assert(N * sizeof(T) == 16, "one 16-byte access");
  const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
  Packed<T, N> r;
  r.w[0] = u.x;
  r.w[1] = u.y;
  r.w[2] = u.z;
  r.w[3] = u.w;
  return r;
}

template <typename T, int N>
__device__ __forceinline__ void store_floats_last(T* p, const float (&in)[N]) {
  static_assert(N * sizeof(T) == 16, "one 16-byte access");
  Vec<T, N> a;
#pragma unroll
  for (int j = 0; j < N; ++j) a.v[j] = from_float<T>(in[j]);
  __stcs(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&a));
}

// N fp32 class weights from p: 16-byte loads when `vec` (p 16-byte aligned), else one at a time.
template <int N>
__device__ __forceinline__ void load_weights(const float* p, bool vec, float (&out)[N]) {
  if constexpr (N % 4 == 0) {
    if (vec) {
      load_floats<N>(p, out);
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = p[j];
}

// The max of v over the block (kThreads threads); every thread gets it. smem holds kThreads / 32 floats. The
// first barrier keeps this call from overwriting what a previous reduction's readers have not read yet.
template <int kBlock>
__device__ __forceinline__ float block_max(float v, float* smem) {
  constexpr int kWarps = kBlock / 32;
  static_assert(kBlock % 32 == 0 && (kWarps & (kWarps - 1)) == 0, "a power-of-two number of whole warps");
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = smem[lane % kWarps];
#pragma unroll
  for (int offset = kWarps / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// x = c·tanh(z/c) with the softcap, else z; with `slope`, also dx/dz. Both products are rounded on their own, as
// torch rounds them, so every use of a logit (either pass, x_t) gets the same x.
template <bool kSoftcap>
__device__ __forceinline__ float capped(float z, const CeParams& p, float* slope) {
  if constexpr (kSoftcap) {
    const float u = __fmul_rn(z, p.inv_softcap);
    const float th = tanhf(u);
    if (slope != nullptr) {
      // 1 − tanh² = 4e/(1+e)², e = exp(−2|u|): no cancellation where tanh → ±1. Below the switch tanh² ≤ 0.25.
      const float a = fabsf(u);
      const float e = expf(-2.f * a);
      const float q = 1.f + e;
      *slope = a < kSlopeSwitch ? fmaf(-th, th, 1.f) : __fdividef(4.f * e, q * q);
    }
    return __fmul_rn(p.softcap, th);
  } else {
    return z;
  }
}

// The target of a row: its class, whether it is ignored, whether it is a class, and its weight (1 unless it is a
// weighted class).
struct RowTarget {
  int64_t t;
  bool ignored;
  bool in_range;
  float w_t;
};

__device__ __forceinline__ RowTarget row_target(const CeParams& p, int64_t row) {
  RowTarget r;
  r.t = p.target_int64 ? static_cast<const int64_t*>(p.target)[row]
                       : static_cast<int64_t>(static_cast<const int32_t*>(p.target)[row]);
  r.ignored = r.t == p.ignore_index;
  r.in_range = r.t >= 0 && r.t < p.V;
  r.w_t = p.weight != nullptr && r.in_range ? p.weight[r.t] : 1.f;
  return r;
}

// This thread's running softmax statistics over the elements it has seen.
struct RunningStats {
  float m;     // max so far, −inf before any other value
  float mref;  // the shift of s: m once m > −inf, 0 before (so a −inf element adds exp(−inf) = 0, not NaN)
  float s;     // Σ exp(x − mref)
  float swx;   // Σ w·x (smoothing only)
};

// Folds N logits z (columns col .. col + N − 1, their weights at w) into st.
template <bool kSoftcap, int N>
__device__ __forceinline__ void absorb(RunningStats& st, const float (&z)[N], const CeParams& p, const float* w,
                                       bool wvec) {
  float x[N];
  float mx = st.m;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    x[j] = capped<kSoftcap>(z[j], p, nullptr);
    mx = fmaxf(mx, x[j]);  // fmaxf skips NaN; a NaN logit still turns s into NaN below
  }
  if (mx > st.m) {
    st.s *= expf(st.m - mx);  // 0 when st.m was −inf
    st.m = mx;
    st.mref = mx;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) st.s += expf(x[j] - st.mref);
  if (p.has_smoothing) {
    if (w != nullptr) {
      float wv[N];
      load_weights<N>(w, wvec, wv);
#pragma unroll
      for (int j = 0; j < N; ++j) st.swx += wv[j] * x[j];
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) st.swx += x[j];
    }
  }
}

// First pass over a row: the block's m, s and Σ w·x, every thread getting them. smem: 2 · kThreads / 32 floats.
template <typename T, bool kSoftcap>
__device__ __forceinline__ void row_stats(const T* __restrict__ row, const CeParams& p, float* smem, float& m,
                                          float& s, float& swx) {
  constexpr int kVE = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunk = kThreads * kIters;  // vectors a chunk
  const int tid = static_cast<int>(threadIdx.x);
  const int V = p.V;
  const RowSplit sp = split_row(row, V);
  const float* w = p.has_smoothing ? p.weight : nullptr;
  const bool wvec = w != nullptr && aligned16_on_device(w + sp.head);
  RunningStats st{neg_inf(), 0.f, 0.f, 0.f};

  const int col = scalar_col(sp, tid, V);
  if (col >= 0) {
    const float z[1] = {to_float(row[col])};
    absorb<kSoftcap, 1>(st, z, p, w != nullptr ? w + col : nullptr, false);
  }
  for (int base = 0; base < sp.nvec; base += kChunk) {
    Packed<T, kVE> r[kIters];
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int vi = base + i * kThreads + tid;
      r[i] = vi < sp.nvec ? load_packed<kVE>(row + sp.head + vi * kVE) : zero_packed<T, kVE>();
    }
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int vi = base + i * kThreads + tid;
      if (vi < sp.nvec) {
        float z[kVE];
#pragma unroll
        for (int j = 0; j < kVE; ++j) z[j] = unpack(r[i], j);
        const int c = sp.head + vi * kVE;
        absorb<kSoftcap, kVE>(st, z, p, w != nullptr ? w + c : nullptr, wvec);
      }
    }
  }

  // Merge: shift every thread's sum to the block's max. A thread that saw only −inf (or nothing) adds 0 (NaN if
  // it saw a NaN); with +inf in the row, inf − inf makes s NaN, as torch's result is.
  m = block_max<kThreads>(st.m, smem);
  float sums[2] = {st.s * (st.m == neg_inf() ? 0.f : expf(st.m - m)), st.swx};
  group_sum<kThreads, 2>(sums, smem);
  s = sums[0];
  swx = sums[1];
}

// Per-row constants of the gradient: g_v = (fma(p_v, S, −c_v) · slope_v) · scale, S = a_t + R (R without a_t
// for the target's element, see fix_target).
struct GradRow {
  float m;
  float log_s;
  float S;
  float R;
  float scale;
};

__device__ __forceinline__ GradRow grad_row(const CeParams& p, float m, float log_s, float a_t, float scale) {
  GradRow g;
  g.m = m;
  g.log_s = log_s;
  g.R = 0.f;
  if (p.has_smoothing) g.R += p.smooth_v * p.scalars[1];
  if (p.has_z) g.R += 2.f * p.z_loss * (m + log_s);
  g.S = a_t + g.R;
  g.scale = scale;
  return g;
}

// One element of the gradient: sub is c_v = (ε/V)·w_v, or a_t + c_t at the target.
template <bool kSoftcap>
__device__ __forceinline__ float grad_value(float z, float sub, const GradRow& g, const CeParams& p) {
  float slope = 1.f;
  const float x = capped<kSoftcap>(z, p, &slope);
  // (x − m) − log s rather than x − lse: see the header.
  const float prob = expf((x - g.m) - g.log_s);
  float v = fmaf(prob, g.S, -sub);
  if constexpr (kSoftcap) v *= slope;
  return v * g.scale;
}

// Second pass: writes g_v for every column of the row, the target's included (without its −a_t, which
// fix_target adds), walking the chunks from the last to the first (see the header).
template <typename T, bool kSoftcap>
__device__ __forceinline__ void row_grad(const T* lrow, T* grow, const CeParams& p,
                                         const GradRow& g) {
  constexpr int kVE = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunk = kThreads * kIters;
  const int tid = static_cast<int>(threadIdx.x);
  const int V = p.cols;
  const float* w = p.has_smoothing && p.weight != nullptr ? p.weight + p.col0 : nullptr;
  const std::uintptr_t la = reinterpret_cast<std::uintptr_t>(lrow);
  const std::uintptr_t ga = reinterpret_cast<std::uintptr_t>(grow);
  if ((la ^ ga) % 16 == 0) {
    // Same offset within 16 bytes: one split serves both rows.
    const RowSplit sp = split_row(lrow, V);
    const bool wvec = w != nullptr && aligned16_on_device(w + sp.head);
    const int col = scalar_col(sp, tid, V);
    if (col >= 0) {
      const float c = p.smooth_v * (w != nullptr ? w[col] : 1.f);
      grow[col] = from_float<T>(grad_value<kSoftcap>(to_float(lrow[col]), c, g, p));
    }
    const int last = sp.nvec > 0 ? (sp.nvec - 1) / kChunk * kChunk : -1;
    for (int base = last; base >= 0; base -= kChunk) {
      Packed<T, kVE> r[kIters];
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int vi = base + i * kThreads + tid;
        r[i] = vi < sp.nvec ? load_packed_last<T, kVE>(lrow + sp.head + vi * kVE) : zero_packed<T, kVE>();
      }
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int vi = base + i * kThreads + tid;
        if (vi < sp.nvec) {
          const int c0 = sp.head + vi * kVE;
          float wv[kVE];
          if (w != nullptr) {
            load_weights<kVE>(w + c0, wvec, wv);
          } else {
#pragma unroll
            for (int j = 0; j < kVE; ++j) wv[j] = 1.f;
          }
          float out[kVE];
#pragma unroll
          for (int j = 0; j < kVE; ++j) out[j] = grad_value<kSoftcap>(unpack(r[i], j), p.smooth_v * wv[j], g, p);
          store_floats_last(grow + c0, out);
        }
      }
    }
  } else {
    // Scalar fallback: the two rows sit at different offsets within 16 bytes.
    constexpr int kChunkS = kThreads * kScalarIters;
    for (int base = (V - 1) / kChunkS * kChunkS; base >= 0; base -= kChunkS) {
      float z[kScalarIters];
#pragma unroll
      for (int i = 0; i < kScalarIters; ++i) {
        const int col = base + i * kThreads + tid;
        z[i] = col < V ? to_float(lrow[col]) : 0.f;
      }
#pragma unroll
      for (int i = 0; i < kScalarIters; ++i) {
        const int col = base + i * kThreads + tid;
        if (col < V) {
          const float c = p.smooth_v * (w != nullptr ? w[col] : 1.f);
          grow[col] = from_float<T>(grad_value<kSoftcap>(z[i], c, g, p));
        }
      }
    }
  }
}

// After row_grad: element t gets fma(p_t, R, a_t·(p_t − 1) − c_t), the specification's expression. The barrier
// orders this store after the row loop's store of the same element by whichever thread wrote it. Called by every
// thread of the block (t in range: uniform across the block); z_t is valid in thread 0.
template <typename T, bool kSoftcap>
__device__ __forceinline__ void fix_target(T* grow, const RowTarget& rt, float z_t, float a_t, const GradRow& g,
                                           const CeParams& p) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const float c_t = p.smooth_v * (p.has_smoothing && p.weight != nullptr ? rt.w_t : 1.f);
    float slope = 1.f;
    const float x_t = capped<kSoftcap>(z_t, p, &slope);
    const float prob = expf((x_t - g.m) - g.log_s);
    float v = fmaf(prob, g.R, fmaf(a_t, prob - 1.f, -c_t));
    if constexpr (kSoftcap) v *= slope;
    grow[rt.t - p.col0] = from_float<T>(v * g.scale);
  }
}

// Zeros over a gradient row (an ignored row), without reading the logits.
template <typename T>
__device__ __forceinline__ void row_zero(T* grow, int V) {
  constexpr int kVE = 16 / static_cast<int>(sizeof(T));
  const int tid = static_cast<int>(threadIdx.x);
  const RowSplit sp = split_row(grow, V);
  const int col = scalar_col(sp, tid, V);
  if (col >= 0) grow[col] = from_float<T>(0.f);
  for (int vi = tid; vi < sp.nvec; vi += kThreads) {
    __stcs(reinterpret_cast<uint4*>(grow + sp.head + vi * kVE), make_uint4(0u, 0u, 0u, 0u));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Kernels. Grid: min(rows, INT_MAX) blocks of kThreads, each taking rows blockIdx.x, + gridDim.x, ...

// Forward: loss, m and log s per row, and with p.grad the gradient of the reduced loss for an incoming 1.
template <typename T, bool kSoftcap>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) ce_fwd_kernel(const CeParams p) {
  __shared__ float smem[2 * kThreads / 32];
  const T* logits = static_cast<const T*>(p.logits);  // (may be the gradient's own storage: no __restrict__)
  T* grad = static_cast<T*>(p.grad);
  const bool first = threadIdx.x == 0;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const RowTarget rt = row_target(p, row);
    const T* lrow = logits + row * p.stride_l;
    // x_t straight from its column, loaded now so that its latency hides behind the pass.
    const float z_t = first && rt.in_range ? to_float(lrow[rt.t]) : 0.f;
    float m;
    float s;
    float swx;
    row_stats<T, kSoftcap>(lrow, p, smem, m, s, swx);
    const float log_s = logf(s);
    const float a_t = rt.w_t * p.keep_nll;
    if (first) {
      const float x_t = capped<kSoftcap>(z_t, p, nullptr);
      const float lse = m + log_s;
      float loss = a_t * ((m - x_t) + log_s);
      if (p.has_smoothing) loss += p.smooth_v * (p.scalars[1] * lse - swx);
      if (p.has_z) loss += p.z_loss * lse * lse;
      p.loss[row] = rt.ignored ? 0.f : rt.in_range ? loss : quiet_nan();
      p.row_max[row] = m;
      p.log_s[row] = log_s;
    }
    if (grad != nullptr) {
      T* grow = grad + row * p.stride_g;
      if (rt.ignored) {
        row_zero(grow, p.cols);
        continue;
      }
      const GradRow g = grad_row(p, m, log_s, a_t, rt.in_range ? 1.f / p.scalars[0] : quiet_nan());
      row_grad<T, kSoftcap>(lrow, grow, p, g);
      if (rt.in_range) fix_target<T, kSoftcap>(grow, rt, z_t, a_t, g, p);
    }
  }
}

// Backward of reduction "none": the gradient recomputed from the logits, m and log s, times each row's incoming
// gradient.
template <typename T, bool kSoftcap>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) ce_bwd_kernel(const CeParams p) {
  const T* logits = static_cast<const T*>(p.logits);  // (may be the gradient's own storage: no __restrict__)
  T* grad = static_cast<T*>(p.grad);

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const RowTarget rt = row_target(p, row);
    T* grow = grad + row * p.stride_g;
    if (rt.ignored) {
      row_zero(grow, p.cols);
      continue;
    }
    const T* lrow = logits + row * p.stride_l;
    // The target's column, when this block of columns holds it (uniform across the block, like rt).
    const bool has_t = rt.in_range && rt.t >= p.col0 && rt.t - p.col0 < p.cols;
    const float z_t = threadIdx.x == 0 && has_t ? to_float(lrow[rt.t - p.col0]) : 0.f;
    const float a_t = rt.w_t * p.keep_nll;
    const GradRow g =
        grad_row(p, p.row_max[row], p.log_s[row], a_t, rt.in_range ? p.grad_out[row] : quiet_nan());
    row_grad<T, kSoftcap>(lrow, grow, p, g);
    if (has_t) fix_target<T, kSoftcap>(grow, rt, z_t, a_t, g, p);
  }
}

// "mean"/"sum" backward: grad *= grad_out[0] in place, nothing at all when it is 1.0 (decided on the device, so no
// host sync). Grid: up to kScaleBlocksPerSm blocks an SM, looping over rows, so that the common no-op launches few.
template <typename T>
__global__ void __launch_bounds__(kScaleThreads) ce_scale_grad_kernel(const ScaleParams p) {
  constexpr int kVE = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunk = kScaleThreads * kIters;
  const float go = *p.grad_out;
  if (go == 1.f) return;
  T* grad = static_cast<T*>(p.grad);
  const int tid = static_cast<int>(threadIdx.x);
  const int V = p.V;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    T* grow = grad + row * p.stride_g;
    const RowSplit sp = split_row(grow, V);
    const int col = scalar_col(sp, tid, V);
    if (col >= 0) grow[col] = from_float<T>(to_float(grow[col]) * go);
    for (int base = 0; base < sp.nvec; base += kChunk) {
      Packed<T, kVE> r[kIters];
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int vi = base + i * kScaleThreads + tid;
        r[i] = vi < sp.nvec ? load_packed_last<T, kVE>(grow + sp.head + vi * kVE) : zero_packed<T, kVE>();
      }
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int vi = base + i * kScaleThreads + tid;
        if (vi < sp.nvec) {
          float out[kVE];
#pragma unroll
          for (int j = 0; j < kVE; ++j) out[j] = unpack(r[i], j) * go;
          store_floats_last(grow + sp.head + vi * kVE, out);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The reduction's bookkeeping (see the header): float64 sums in a fixed order.

// The sum over the block (kSumThreads threads) of one double; every thread gets it, in the same bits (xor
// butterflies, then every thread adds the warps' sums in warp order). smem holds kSumThreads / 32 doubles; the first
// barrier keeps this call from overwriting what a previous call's readers have not read yet.
__device__ __forceinline__ double block_sum_f64(double v, double* smem) {
  constexpr int kWarps = kSumThreads / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double total = 0.0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += smem[w];
  return total;
}

// This thread's sum of term(i) over i in [begin, end) with i ≡ begin + threadIdx.x (mod kSumThreads), in order of i;
// kSumUnroll terms are loaded before any is added, so that many loads a thread are in flight.
template <typename Term>
__device__ __forceinline__ double thread_sum(int64_t begin, int64_t end, Term term) {
  double acc = 0.0;
  for (int64_t base = begin + threadIdx.x; base < end; base += int64_t{kSumThreads} * kSumUnroll) {
    double v[kSumUnroll];
#pragma unroll
    for (int i = 0; i < kSumUnroll; ++i) {
      const int64_t r = base + static_cast<int64_t>(i) * kSumThreads;
      v[i] = r < end ? term(r) : 0.0;
    }
#pragma unroll
    for (int i = 0; i < kSumUnroll; ++i) {
      if (base + static_cast<int64_t>(i) * kSumThreads < end) acc += v[i];
    }
  }
  return acc;
}

// Row r's term of the "mean" divisor: [t ≠ ignore_index], or with weights w_t·keep (w_0·0 for a row left out).
template <typename TI>
__device__ __forceinline__ double divisor_term(const SumParams& p, int64_t r) {
  const int64_t t = static_cast<const TI*>(p.target)[r];
  if (p.weight == nullptr) return t != p.ignore_index ? 1.0 : 0.0;
  const bool keep = t != p.ignore_index && t >= 0 && t < p.V;
  return static_cast<double>(p.weight[keep ? t : 0]) * (keep ? 1.0 : 0.0);
}

// Σ over this block's rows [b·kSumChunk, (b + 1)·kSumChunk) of the divisor's terms (kDivisor, TI the target's type)
// or of the losses (TI unused), into partials[b].
template <typename TI, bool kDivisor>
__global__ void __launch_bounds__(kSumThreads) ce_partials_kernel(const SumParams p) {
  __shared__ double red[kSumThreads / 32];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kSumChunk;
  const int64_t end = begin + kSumChunk < p.rows ? begin + kSumChunk : p.rows;
  double s;
  if constexpr (kDivisor) {
    s = thread_sum(begin, end, [&](int64_t r) { return divisor_term<TI>(p, r); });
  } else {
    s = thread_sum(begin, end, [&](int64_t r) { return static_cast<double>(p.loss[r]); });
  }
  s = block_sum_f64(s, red);
  if (threadIdx.x == 0) p.partials[blockIdx.x] = s;
}

// One block: SCALARS = (divisor, W), from the rows themselves or, with partials, from their sums in order.
template <typename TI>
__global__ void __launch_bounds__(kSumThreads) ce_scalars_kernel(const SumParams p) {
  __shared__ double red[kSumThreads / 32];
  float divisor = 1.f;
  if (p.is_mean) {
    double s;
    if (p.partials != nullptr) {
      s = thread_sum(0, p.num_partials, [&](int64_t b) { return p.partials[b]; });
    } else {
      s = thread_sum(0, p.rows, [&](int64_t r) { return divisor_term<TI>(p, r); });
    }
    divisor = static_cast<float>(block_sum_f64(s, red));  // counts exact below 2^24 rows, one rounding above
  }
  float total = static_cast<float>(p.V);  // V rounded once to fp32, as torch.full did
  if (p.weight != nullptr) {
    const double w = thread_sum(0, p.V, [&](int64_t v) { return static_cast<double>(p.weight[v]); });
    total = static_cast<float>(block_sum_f64(w, red));
  }
  if (threadIdx.x == 0) {
    p.out[0] = divisor;
    p.out[1] = total;
  }
}

// a / b as Triton's fp32 division compiles (div.full.f32: ≤ 2 ulp, full range), so the reduced loss matches the
// Triton kernel's bits.
__device__ __forceinline__ float div_full(float a, float b) {
  float r;
  asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// One block: the reduced loss, Σ loss (from the rows, or the partials' sums in order) rounded once, / divisor.
__global__ void __launch_bounds__(kSumThreads) ce_reduce_kernel(const SumParams p) {
  __shared__ double red[kSumThreads / 32];
  double s;
  if (p.partials != nullptr) {
    s = thread_sum(0, p.num_partials, [&](int64_t b) { return p.partials[b]; });
  } else {
    s = thread_sum(0, p.rows, [&](int64_t r) { return static_cast<double>(p.loss[r]); });
  }
  s = block_sum_f64(s, red);
  if (threadIdx.x == 0) {
    float total = static_cast<float>(s);
    if (p.is_mean) total = div_full(total, *p.divisor);
    *p.out = total;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers.

void check_dtype(int dtype) {
  dispatch_dtype(dtype, [](auto) {});
}

void check_rows(int64_t rows, int64_t V) {
  if (rows < 0) throw std::invalid_argument("fastlm._C: rows must be ≥ 0, got " + std::to_string(rows));
  if (V < 1 || V > kMaxV) {
    throw std::invalid_argument("fastlm._C: V must be in [1, 2^30], got " + std::to_string(V));
  }
}

// A pointer the kernels dereference: non-null and aligned to its element.
void check_ptr(const char* name, int64_t address, int64_t bytes) {
  if (address == 0) throw std::invalid_argument(std::string("fastlm._C: ") + name + " is null");
  if (address % bytes != 0) {
    throw std::invalid_argument(std::string("fastlm._C: ") + name + " is not aligned to its " +
                                std::to_string(bytes) + "-byte elements");
  }
}

void check_out_stride(const char* name, int64_t stride, int64_t rows, int64_t V) {
  if (rows > 1 && stride < V) {
    throw std::invalid_argument(std::string("fastlm._C: ") + name + " rows overlap: row stride " +
                                std::to_string(stride) + " < V = " + std::to_string(V));
  }
}

// The scalar options shared by the forward and the backward, checked and rounded once.
CeParams ce_params(int64_t logits, int64_t logits_stride, int64_t target, bool target_int64, int64_t weight,
                   int64_t scalars, int64_t rows, int64_t V, int dtype, int64_t ignore_index, double smoothing,
                   double z_loss, double softcap) {
  if (!(smoothing >= 0.0 && smoothing <= 1.0)) {
    throw std::invalid_argument("fastlm._C: smoothing must be in [0, 1], got " + std::to_string(smoothing));
  }
  if (!(z_loss >= 0.0 && std::isfinite(z_loss))) {
    throw std::invalid_argument("fastlm._C: z_loss must be finite and ≥ 0, got " + std::to_string(z_loss));
  }
  if (!(softcap >= 0.0 && std::isfinite(softcap))) {
    throw std::invalid_argument("fastlm._C: softcap must be finite and > 0, or 0 for none, got " +
                                std::to_string(softcap));
  }
  check_ptr("logits", logits, dtype_size(dtype));
  check_ptr("target", target, target_int64 ? 8 : 4);
  if (weight != 0) check_ptr("weight", weight, 4);
  check_ptr("scalars", scalars, 4);
  if (rows > 1 && logits_stride < 0) {
    throw std::invalid_argument("fastlm._C: the logits row stride must be ≥ 0, got " + std::to_string(logits_stride));
  }
  CeParams p{};
  p.logits = ptr<const void>(logits);
  p.target = ptr<const void>(target);
  p.weight = ptr<const float>(weight);
  p.scalars = ptr<const float>(scalars);
  p.stride_l = logits_stride;
  p.rows = rows;
  p.ignore_index = ignore_index;
  p.V = static_cast<int>(V);
  p.cols = p.V;
  p.col0 = 0;
  // As the Triton launcher: 1 − ε and ε/V in double, rounded once to fp32.
  p.keep_nll = static_cast<float>(1.0 - smoothing);
  p.smooth_v = static_cast<float>(smoothing / static_cast<double>(V));
  p.z_loss = static_cast<float>(z_loss);
  p.softcap = softcap > 0.0 ? static_cast<float>(softcap) : 1.f;
  p.inv_softcap = 1.f / p.softcap;
  p.target_int64 = target_int64;
  p.has_smoothing = smoothing > 0.0;
  p.has_z = z_loss > 0.0;
  return p;
}

unsigned row_grid(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, INT_MAX)); }

// Partial sums the bookkeeping needs for `rows` rows: 0 when one block takes them all.
int64_t sum_partials(int64_t rows) { return rows > kSumChunk ? ceil_div(rows, kSumChunk) : 0; }

// The bookkeeping's common checks: a workspace of sum_partials(rows) doubles where needed.
SumParams sum_params(int64_t rows, int64_t workspace, int64_t workspace_numel) {
  if (rows < 0) throw std::invalid_argument("fastlm._C: rows must be ≥ 0, got " + std::to_string(rows));
  SumParams p{};
  p.rows = rows;
  p.num_partials = sum_partials(rows);
  if (p.num_partials > INT_MAX) throw std::invalid_argument("fastlm._C: too many rows: " + std::to_string(rows));
  if (p.num_partials > 0) {
    if (workspace_numel < p.num_partials) {
      throw std::invalid_argument("fastlm._C: the workspace holds " + std::to_string(workspace_numel) +
                                  " doubles, " + std::to_string(p.num_partials) + " are needed");
    }
    check_ptr("workspace", workspace, 8);
    p.partials = ptr<double>(workspace);
  }
  return p;
}

}  // namespace
}  // namespace fastlm

// ---------------------------------------------------------------------------------------------------------------
// The launchers of launchers.h, defined by qualified name: a signature unlike the declaration does not compile.

void fastlm::cross_entropy_fwd(int64_t logits, int64_t logits_stride, int64_t target, bool target_int64, int64_t weight,
                       int64_t scalars, int64_t loss, int64_t row_max, int64_t log_s, int64_t grad,
                       int64_t grad_stride, int64_t rows, int64_t V, int dtype, int64_t ignore_index,
                       double smoothing, double z_loss, double softcap, int device, int64_t stream) {
  const DeviceGuard guard(device);
  check_dtype(dtype);
  check_rows(rows, V);
  if (rows == 0) return;  // before the pointer checks: an empty tensor may have a null data pointer
  CeParams p = ce_params(logits, logits_stride, target, target_int64, weight, scalars, rows, V, dtype, ignore_index,
                         smoothing, z_loss, softcap);
  check_ptr("loss", loss, 4);
  check_ptr("row_max", row_max, 4);
  check_ptr("log_s", log_s, 4);
  if (grad != 0) {
    check_ptr("grad", grad, dtype_size(dtype));
    check_out_stride("grad", grad_stride, rows, V);
  }
  p.loss = ptr<float>(loss);
  p.row_max = ptr<float>(row_max);
  p.log_s = ptr<float>(log_s);
  p.grad = ptr<void>(grad);
  p.stride_g = grad_stride;
  const cudaStream_t s = as_stream(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (softcap > 0.0) {
      ce_fwd_kernel<T, true><<<row_grid(rows), kThreads, 0, s>>>(p);
    } else {
      ce_fwd_kernel<T, false><<<row_grid(rows), kThreads, 0, s>>>(p);
    }
    check_launch("ce_fwd_kernel");
  });
}

void fastlm::cross_entropy_bwd(int64_t logits, int64_t logits_stride, int64_t target, bool target_int64, int64_t weight,
                       int64_t scalars, int64_t row_max, int64_t log_s, int64_t grad_out, int64_t grad,
                       int64_t grad_stride, int64_t rows, int64_t V, int64_t cols, int64_t col0, int dtype,
                       int64_t ignore_index, double smoothing, double z_loss, double softcap, int device,
                       int64_t stream) {
  const DeviceGuard guard(device);
  check_dtype(dtype);
  check_rows(rows, V);
  if (cols < 1 || col0 < 0 || col0 > V - cols) {
    throw std::invalid_argument("fastlm._C: a block of " + std::to_string(cols) + " columns from column " +
                                std::to_string(col0) + " does not fit in V = " + std::to_string(V));
  }
  if (rows == 0) return;
  CeParams p = ce_params(logits, logits_stride, target, target_int64, weight, scalars, rows, V, dtype, ignore_index,
                         smoothing, z_loss, softcap);
  p.cols = static_cast<int>(cols);
  p.col0 = static_cast<int>(col0);
  check_ptr("row_max", row_max, 4);
  check_ptr("log_s", log_s, 4);
  check_ptr("grad_out", grad_out, 4);
  check_ptr("grad", grad, dtype_size(dtype));
  check_out_stride("grad", grad_stride, rows, cols);
  p.row_max = ptr<float>(row_max);
  p.log_s = ptr<float>(log_s);
  p.grad_out = ptr<const float>(grad_out);
  p.grad = ptr<void>(grad);
  p.stride_g = grad_stride;
  const cudaStream_t s = as_stream(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (softcap > 0.0) {
      ce_bwd_kernel<T, true><<<row_grid(rows), kThreads, 0, s>>>(p);
    } else {
      ce_bwd_kernel<T, false><<<row_grid(rows), kThreads, 0, s>>>(p);
    }
    check_launch("ce_bwd_kernel");
  });
}

void fastlm::cross_entropy_scale_grad(int64_t grad, int64_t grad_stride, int64_t grad_out, int64_t rows, int64_t V,
                              int dtype, int device, int64_t stream) {
  const DeviceGuard guard(device);
  check_dtype(dtype);
  check_rows(rows, V);
  if (rows == 0) return;
  check_ptr("grad", grad, dtype_size(dtype));
  check_ptr("grad_out", grad_out, 4);
  check_out_stride("grad", grad_stride, rows, V);
  ScaleParams p{};
  p.grad = ptr<void>(grad);
  p.grad_out = ptr<const float>(grad_out);
  p.stride_g = grad_stride;
  p.rows = rows;
  p.V = static_cast<int>(V);
  int sms = 0;
  FASTLM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = std::min<int64_t>(rows, static_cast<int64_t>(std::max(sms, 1)) * kScaleBlocksPerSm);
  const cudaStream_t s = as_stream(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    ce_scale_grad_kernel<T><<<static_cast<unsigned>(blocks), kScaleThreads, 0, s>>>(p);
    check_launch("ce_scale_grad_kernel");
  });
}

int64_t fastlm::cross_entropy_reduce_workspace_numel(int64_t rows) {
  if (rows < 0) throw std::invalid_argument("fastlm._C: rows must be ≥ 0, got " + std::to_string(rows));
  return sum_partials(rows);
}

void fastlm::cross_entropy_scalars(int64_t target, bool target_int64, int64_t weight, int64_t scalars,
                                   int64_t workspace, int64_t workspace_numel, int64_t rows, int64_t V,
                                   int64_t ignore_index, bool is_mean, int device, int64_t stream) {
  const DeviceGuard guard(device);
  check_rows(rows, V);
  SumParams p = sum_params(is_mean ? rows : 0, workspace, workspace_numel);  // only "mean" reads the rows
  p.rows = rows;
  if (rows > 0 && is_mean) check_ptr("target", target, target_int64 ? 8 : 4);  // empty: may be null
  if (weight != 0) check_ptr("weight", weight, 4);
  check_ptr("scalars", scalars, 4);
  p.target = ptr<const void>(target);
  p.weight = ptr<const float>(weight);
  p.out = ptr<float>(scalars);
  p.ignore_index = ignore_index;
  p.V = static_cast<int>(V);
  p.is_mean = is_mean;
  const cudaStream_t s = as_stream(stream);
  auto launch = [&](auto index) {
    using TI = decltype(index);
    if (p.num_partials > 0) {
      ce_partials_kernel<TI, true><<<static_cast<unsigned>(p.num_partials), kSumThreads, 0, s>>>(p);
      check_launch("ce_partials_kernel");
    }
    ce_scalars_kernel<TI><<<1, kSumThreads, 0, s>>>(p);
    check_launch("ce_scalars_kernel");
  };
  if (target_int64) {
    launch(int64_t{0});
  } else {
    launch(int{0});
  }
}

void fastlm::cross_entropy_reduce(int64_t loss, int64_t scalars, int64_t out, int64_t workspace,
                                  int64_t workspace_numel, int64_t rows, bool is_mean, int device, int64_t stream) {
  const DeviceGuard guard(device);
  SumParams p = sum_params(rows, workspace, workspace_numel);
  if (rows > 0) check_ptr("loss", loss, 4);  // empty: may be null
  if (is_mean) check_ptr("scalars", scalars, 4);
  check_ptr("out", out, 4);
  p.loss = ptr<const float>(loss);
  p.divisor = ptr<const float>(scalars);
  p.out = ptr<float>(out);
  p.is_mean = is_mean;
  const cudaStream_t s = as_stream(stream);
  if (p.num_partials > 0) {
    ce_partials_kernel<float, false><<<static_cast<unsigned>(p.num_partials), kSumThreads, 0, s>>>(p);
    check_launch("ce_partials_kernel");
  }
  ce_reduce_kernel<<<1, kSumThreads, 0, s>>>(p);
  check_launch("ce_reduce_kernel");
}
