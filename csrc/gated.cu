// SwiGLU and GeGLU, the gated activations of the transformer MLP, forward and backward fused: CUDA kernels and
// their launchers (raw pointers).
//
// Math, elementwise in fp32 whatever the storage dtype (float32, float16, bfloat16), g = gate, u = up:
//   SwiGLU        h = silu(g)·u = g·σ(g)·u;   silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
//   GeGLU "tanh"  gelu(g) = ½·g·(1 + t), t = tanh(k·(g + c·g³)), k = √(2/π), c = 0.044715
//                 gelu'(g) = ½·(1 + t) + ½·g·(1 − t²)·k·(1 + 3c·g²)
//   GeGLU "none"  gelu(g) = g·Φ(g);   gelu'(g) = Φ(g) + g·φ(g)   (Φ, φ: the standard normal CDF and density)
//   backward      dg = dh·u·act'(g),  du = dh·act(g)
// Saved for backward (by the caller): the inputs g and u only; the backward recomputes the activation.
//
// Numerics (as kernels/gated.py): σ = 1 − er or er with er = e/(1 + e), e = exp(−|g|) ≤ 1 (no overflow, no
// cancellation at any g); where |u| ≥ 0.55, (1 + t)/2 = 1 − er or er and 1 − t² = 4·er·(1 − er) with
// e = exp(−2|u|) (1 − t² would cancel where t → ±1, 1 + t in GELU's negative tail); Φ from normcdff, accurate in
// both tails. Accurate expf, tanhf and normcdff, not the fast intrinsics: the kernels are memory bound, the
// arithmetic is free. The one division, 1/(1 + e) with 1 + e in [1, 2], is a reciprocal refined by one Newton step
// (≤ 1 ulp): IEEE division's slow-path call would cost registers around it (8 bytes spilled in the scalar SwiGLU
// backward). Outputs are rounded once to the inputs' dtype.
//
// Roofline, bytes per element for dtype size d: forward reads g and u and writes h, 3d; backward reads dh, g and u
// and writes dg and du, 5d. Memory bound: the target is the device's copy bandwidth.
//
// Design (the same as kernels/gated.py's, which has the reasons at length):
// - Operands (M, N) with unit column stride and any row stride (the halves of a fused gate-up projection are read
//   in place); the caller views all-contiguous operands as one row (1, M·N) (kernels.gated.rows_view).
// - A block of kThreads threads is split into rows of `lanes` threads (a power of two, as many as a row's
//   16-byte chunks need, up to the whole block), so short rows stack several to a block and long rows take a
//   block per kThreads·E elements; thread `lane` of a row moves the chunks (a·lanes + lane)·V, a < E/V, so a
//   warp's accesses are contiguous. E = 16 elements a thread per operand (two 16-byte accesses for 16-bit data,
//   four for fp32), all issued before any is used, kept packed in their storage type until then; stores are
//   16-byte PTX stores (store_packed).
// - 16-byte accesses when every pointer is 16-byte aligned and N and the row strides are multiples of V = 16 / d;
//   otherwise the same kernels with V = 1 (8 elements a thread).
// - Offsets are int64 (a collapsed row passes 2^31 elements). A block per tile, fewer than 2^31 tiles (checked;
//   that is 2^43 elements), so the tile's row and column come from a 32-bit division, not a 64-bit one's call.
// - Outputs must not alias inputs (__restrict__).

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "launchers.h"

namespace fastlm {
namespace {

constexpr int kThreads = 256;
constexpr int kVecElems = 16;    // elements a thread per operand and tile, 16-byte accesses
constexpr int kScalarElems = 8;  // likewise, one element an access
// Blocks an SM must hold at once, for __launch_bounds__: up to 128 registers a thread (the fp32 backward takes ~80;
// at 64 it spilled). Without a minimum ptxas spilled 4 bytes of the scalar GeGLU forward at 48 registers.
constexpr int kMinBlocks = 2;

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluC = 0.044715f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

struct GatedParams {
  const void* dh;  // (M, N) gradient of h (backward only)
  const void* gate;
  const void* up;
  void* out0;  // forward: h; backward: d(gate)
  void* out1;  // backward: d(up)
  int64_t dh_stride;
  int64_t gate_stride;
  int64_t up_stride;
  int64_t out0_stride;
  int64_t out1_stride;
  int64_t M;
  int64_t N;
  uint32_t col_tiles;  // tiles along a row: ceil(N / (lanes·E))
  int64_t tiles;       // row tiles × col_tiles, below 2^31: one block each
  int lanes_log2;     // threads a row: 1 << lanes_log2
};

// 1/d for d in [1, 2]: the approximate reciprocal (2 ulp) refined by one Newton step, without a call.
__device__ __forceinline__ float rcp(float d) {
  const float r = __fdividef(1.f, d);
  return fmaf(r, fmaf(-d, r, 1.f), r);
}

// act(g), and act'(g) in *grad when kGrad.
template <int kAct, bool kGrad>
__device__ __forceinline__ float activation(float g, float* grad) {
  if constexpr (kAct == kSilu) {
    const float e = expf(-fabsf(g));
    const float er = e * rcp(1.f + e);  // σ(−|g|)
    const float sig = g >= 0.f ? 1.f - er : er;
    if constexpr (kGrad) {
      const float sig_neg = g >= 0.f ? er : 1.f - er;  // 1 − σ(g)
      *grad = sig + g * sig * sig_neg;
    }
    return g * sig;
  } else if constexpr (kAct == kGeluTanh) {
    // s = (1 + t)/2 = 1 − er (u > 0) or er (u < 0) and 1 − t² = 4·er·(1 − er), er = e/(1 + e), e = exp(−2|u|);
    // tanhf below |u| = 0.55, where e is not small and neither form cancels.
    const float u = kSqrt2OverPi * (g + kGeluC * g * g * g);
    const float e = expf(-2.f * fabsf(u));
    const float er = e * rcp(1.f + e);
    const bool small = fabsf(u) < 0.55f;
    const float t = tanhf(u);
    const float s = small ? 0.5f + 0.5f * t : (u > 0.f ? 1.f - er : er);
    if constexpr (kGrad) {
      const float sech2 = small ? 1.f - t * t : 4.f * er * (1.f - er);
      *grad = s + (0.5f * kSqrt2OverPi) * g * sech2 * (1.f + (3.f * kGeluC) * g * g);
    }
    return g * s;
  } else {
    const float cdf = normcdff(g);
    if constexpr (kGrad) *grad = cdf + g * (expf(-0.5f * g * g) * kInvSqrt2Pi);
    return g * cdf;
  }
}

__device__ __forceinline__ unsigned short bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned short bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// p[j] = T(v[j]) for j < V, rounded to nearest even, as one 16-byte store (V·sizeof(T) = 16, p 16-byte aligned)
// or, for V = 1, one element. In PTX: NVVM split these kernels' 16-byte stores (through store_floats, or a uint4)
// into 16- and 32-bit ones, though it keeps the loads whole.
template <int V, typename T>
__device__ __forceinline__ void store_packed(T* p, const float (&v)[V]) {
  if constexpr (V == 1) {
    *p = from_float<T>(v[0]);
  } else {
    static_assert(V * sizeof(T) == 16, "whole 16-byte stores");
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (sizeof(T) == 4) {
        w[k] = __float_as_uint(v[k]);
      } else {
        w[k] = static_cast<uint32_t>(bits(from_float<T>(v[2 * k]))) |
               (static_cast<uint32_t>(bits(from_float<T>(v[2 * k + 1]))) << 16);
      }
    }
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
  }
}

// This block's tile, for this thread: its row (≥ M when the thread has none) and the tile's first column; the
// thread's chunks are col0 + (a·lanes + lane)·V.
__device__ __forceinline__ void tile_of(const GatedParams& p, int64_t span, int64_t& row, int64_t& col0) {
  const uint32_t row_tile = blockIdx.x / p.col_tiles;
  row = static_cast<int64_t>(row_tile) * (kThreads >> p.lanes_log2) + (static_cast<int>(threadIdx.x) >> p.lanes_log2);
  col0 = static_cast<int64_t>(blockIdx.x - row_tile * p.col_tiles) * span;
}

template <typename T, int V, int kAct>
__global__ void __launch_bounds__(kThreads, kMinBlocks) gated_fwd_kernel(const GatedParams p) {
  constexpr int kA = (V > 1 ? kVecElems : kScalarElems) / V;  // accesses a thread per operand
  const int lanes = 1 << p.lanes_log2;
  const int lane = static_cast<int>(threadIdx.x) & (lanes - 1);
  int64_t row, col0;
  tile_of(p, static_cast<int64_t>(lanes) * V * kA, row, col0);
  if (row >= p.M) return;
  const T* __restrict__ gate = static_cast<const T*>(p.gate) + row * p.gate_stride;
  const T* __restrict__ up = static_cast<const T*>(p.up) + row * p.up_stride;
  T* __restrict__ h = static_cast<T*>(p.out0) + row * p.out0_stride;
  Packed<T, V> g[kA];
  Packed<T, V> u[kA];
#pragma unroll
  for (int a = 0; a < kA; ++a) {
    const int64_t col = col0 + static_cast<int64_t>(a * lanes + lane) * V;
    if (col < p.N) {
      g[a] = load_packed<V>(gate + col);
      u[a] = load_packed<V>(up + col);
    }
  }
#pragma unroll
  for (int a = 0; a < kA; ++a) {
    const int64_t col = col0 + static_cast<int64_t>(a * lanes + lane) * V;
    if (col < p.N) {
      float out[V];
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = activation<kAct, false>(unpack(g[a], j), nullptr) * unpack(u[a], j);
      store_packed<V>(h + col, out);
    }
  }
}

template <typename T, int V, int kAct>
__global__ void __launch_bounds__(kThreads, kMinBlocks) gated_bwd_kernel(const GatedParams p) {
  constexpr int kA = (V > 1 ? kVecElems : kScalarElems) / V;
  const int lanes = 1 << p.lanes_log2;
  const int lane = static_cast<int>(threadIdx.x) & (lanes - 1);
  int64_t row, col0;
  tile_of(p, static_cast<int64_t>(lanes) * V * kA, row, col0);
  if (row >= p.M) return;
  const T* __restrict__ dh = static_cast<const T*>(p.dh) + row * p.dh_stride;
  const T* __restrict__ gate = static_cast<const T*>(p.gate) + row * p.gate_stride;
  const T* __restrict__ up = static_cast<const T*>(p.up) + row * p.up_stride;
  T* __restrict__ dgate = static_cast<T*>(p.out0) + row * p.out0_stride;
  T* __restrict__ dup = static_cast<T*>(p.out1) + row * p.out1_stride;
  Packed<T, V> d[kA];
  Packed<T, V> g[kA];
  Packed<T, V> u[kA];
#pragma unroll
  for (int a = 0; a < kA; ++a) {
    const int64_t col = col0 + static_cast<int64_t>(a * lanes + lane) * V;
    if (col < p.N) {
      d[a] = load_packed<V>(dh + col);
      g[a] = load_packed<V>(gate + col);
      u[a] = load_packed<V>(up + col);
    }
  }
#pragma unroll
  for (int a = 0; a < kA; ++a) {
    const int64_t col = col0 + static_cast<int64_t>(a * lanes + lane) * V;
    if (col < p.N) {
      float dg[V];
      float du[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float da;
        const float act = activation<kAct, true>(unpack(g[a], j), &da);
        const float dy = unpack(d[a], j);
        dg[j] = dy * unpack(u[a], j) * da;
        du[j] = dy * act;
      }
      store_packed<V>(dgate + col, dg);
      store_packed<V>(dup + col, du);
    }
  }
}

// An (M, N) operand allows V-wide accesses when its base is 16-byte aligned and so is every row.
bool rows_aligned(const void* p, int64_t stride, int64_t M, int V) {
  return p == nullptr || (aligned16(p) && (M <= 1 || stride % V == 0));
}

// Fills the tiling of p for access width V: lanes a row, tiles along and across rows.
void plan(GatedParams& p, int V) {
  const int elems = V > 1 ? kVecElems : kScalarElems;
  const int64_t accesses = ceil_div(ceil_div(p.N, V), elems / V);  // a row's threads if each took a full share
  int lanes_log2 = 0;
  while ((1 << lanes_log2) < kThreads && (int64_t{1} << lanes_log2) < accesses) ++lanes_log2;
  p.lanes_log2 = lanes_log2;
  const int64_t col_tiles = ceil_div(p.N, (int64_t{1} << lanes_log2) * elems);
  p.tiles = ceil_div(p.M, kThreads >> lanes_log2) * col_tiles;
  if (p.tiles > INT_MAX) {
    throw std::invalid_argument("fastlm._C: gated: " + std::to_string(p.M) + " × " + std::to_string(p.N) +
                                " elements need more than 2^31 blocks");
  }
  p.col_tiles = static_cast<uint32_t>(col_tiles);
}

// Calls f(Tag<T>, integral_constant<int, kAct>) for the dtype and activation codes (launchers.h's Activation).
template <typename F>
void dispatch(int dtype, int act, F&& f) {
  dispatch_dtype(dtype, [&](auto tag) {
    switch (act) {
      case kSilu:
        return f(tag, std::integral_constant<int, kSilu>{});
      case kGeluTanh:
        return f(tag, std::integral_constant<int, kGeluTanh>{});
      case kGelu:
        return f(tag, std::integral_constant<int, kGelu>{});
      default:
        throw std::invalid_argument("fastlm._C: unknown activation code " + std::to_string(act));
    }
  });
}

void check_sizes(int64_t M, int64_t N) {
  if (M < 0 || N < 0) {
    throw std::invalid_argument("fastlm._C: M and N must be ≥ 0, got M=" + std::to_string(M) +
                                ", N=" + std::to_string(N));
  }
}

void launch(GatedParams& p, bool backward, int dtype, int act, cudaStream_t stream) {
  const int V = 16 / dtype_size(dtype);
  const bool vec = p.N % V == 0 && rows_aligned(p.dh, p.dh_stride, p.M, V) &&
                   rows_aligned(p.gate, p.gate_stride, p.M, V) && rows_aligned(p.up, p.up_stride, p.M, V) &&
                   rows_aligned(p.out0, p.out0_stride, p.M, V) && rows_aligned(p.out1, p.out1_stride, p.M, V);
  plan(p, vec ? V : 1);
  const unsigned blocks = static_cast<unsigned>(p.tiles);
  dispatch(dtype, act, [&](auto t, auto a) {
    using T = typename decltype(t)::type;
    constexpr int kAct = decltype(a)::value;
    constexpr int kV = static_cast<int>(16 / sizeof(T));
    if (backward) {
      if (vec) {
        gated_bwd_kernel<T, kV, kAct><<<blocks, kThreads, 0, stream>>>(p);
      } else {
        gated_bwd_kernel<T, 1, kAct><<<blocks, kThreads, 0, stream>>>(p);
      }
      check_launch("gated_bwd_kernel");
    } else {
      if (vec) {
        gated_fwd_kernel<T, kV, kAct><<<blocks, kThreads, 0, stream>>>(p);
      } else {
        gated_fwd_kernel<T, 1, kAct><<<blocks, kThreads, 0, stream>>>(p);
      }
      check_launch("gated_fwd_kernel");
    }
  });
}

}  // namespace
}  // namespace fastlm

// ---------------------------------------------------------------------------------------------------------------
// The launchers of launchers.h, defined by qualified name: a signature unlike the declaration does not compile.

void fastlm::gated_fwd(int64_t gate, int64_t gate_stride, int64_t up, int64_t up_stride, int64_t h, int64_t h_stride,
               int64_t M, int64_t N, int dtype, int activation, int device, int64_t stream) {
  const DeviceGuard guard(device);
  check_sizes(M, N);
  if (M == 0 || N == 0) return;  // before the pointer checks: an empty tensor may have a null data pointer
  if (gate == 0 || up == 0 || h == 0) throw std::invalid_argument("fastlm._C: gated_fwd needs gate, up and h");
  GatedParams p{};
  p.gate = ptr<const void>(gate);
  p.up = ptr<const void>(up);
  p.out0 = ptr<void>(h);
  p.gate_stride = gate_stride;
  p.up_stride = up_stride;
  p.out0_stride = h_stride;
  p.M = M;
  p.N = N;
  launch(p, false, dtype, activation, as_stream(stream));
}

void fastlm::gated_bwd(int64_t dh, int64_t dh_stride, int64_t gate, int64_t gate_stride, int64_t up, int64_t up_stride,
               int64_t dgate, int64_t dgate_stride, int64_t dup, int64_t dup_stride, int64_t M, int64_t N, int dtype,
               int activation, int device, int64_t stream) {
  const DeviceGuard guard(device);
  check_sizes(M, N);
  if (M == 0 || N == 0) return;
  if (dh == 0 || gate == 0 || up == 0 || dgate == 0 || dup == 0) {
    throw std::invalid_argument("fastlm._C: gated_bwd needs dh, gate, up, dgate and dup");
  }
  GatedParams p{};
  p.dh = ptr<const void>(dh);
  p.gate = ptr<const void>(gate);
  p.up = ptr<const void>(up);
  p.out0 = ptr<void>(dgate);
  p.out1 = ptr<void>(dup);
  p.dh_stride = dh_stride;
  p.gate_stride = gate_stride;
  p.up_stride = up_stride;
  p.out0_stride = dgate_stride;
  p.out1_stride = dup_stride;
  p.M = M;
  p.N = N;
  launch(p, true, dtype, activation, as_stream(stream));
}
