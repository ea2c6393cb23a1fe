// Rotary position embedding (RoPE), forward and backward in one kernel: CUDA kernel and launcher (raw pointers).
//
// Math, per token and head, over the first rot features of head_dim (the rest are copied unchanged), in fp32
// whatever the storage dtype (float32, float16, bfloat16; cos and sin in float32 or x's dtype). The features
// form rot/2 pairs (p, q): (i, i + rot/2) rotate-half (Llama, Qwen, Mistral, Gemma), (2i, 2i + 1) interleaved
// (GPT-J). cos and sin are full-width, one value per feature (Hugging Face's form):
//   forward   out_p = x_p·cos_p − x_q·sin_p,   out_q = x_q·cos_q + x_p·sin_q
//   backward  the transpose: dx_p = dy_p·cos_p + dy_q·sin_q,   dx_q = dy_q·cos_q − dy_p·sin_p
// (the rotation with sin negated when cos_p = cos_q and sin_p = sin_q, as in every real table; the transpose is
// exact for any table). Nothing is saved for backward but cos and sin, which take no gradient.
//
// Roofline, bytes per element of x for dtype size d: read x, write out: 2d, forward and backward alike; cos and
// sin are read once per token for all of a block's heads.
//
// Design (the same as kernels/rotary.py's):
// - x and out through (batch, seq, head) strides with a unit feature stride, so Hugging Face's (batch, heads, seq,
//   head_dim) layout and strided views are read in place; cos and sin through (batch, seq) strides, batch stride 0
//   for one table shared by the batch.
// - A token is owned by `lanes` threads (a power of two, one per chunk of V pairs, up to the block); a block takes
//   kThreads / lanes tokens and a range of heads (the launcher splits the heads so the grid fills the device even
//   at decode's few tokens). A thread loads its chunk's cos and sin once, then walks the block's heads two at a
//   time (both heads' loads issued before either is used), then copies its share of the pass-through features.
// - A chunk is V pairs: rotate-half, V features at i and V at i + rot/2; interleaved, 2V consecutive features.
//   16-byte accesses (V = 16 / d) when the pointers are 16-byte aligned and rot/2 (rotate-half) or rot
//   (interleaved), head_dim and every stride are multiples of V (and cos/sin's strides of their own access
//   width); otherwise V = 1, one element an access.
// - Offsets are int64; tokens (batch·seq) and heads stay below 2^31.
// - out must not alias x (__restrict__).

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.cuh"
#include "launchers.h"

namespace fastlm {
namespace {

constexpr int kThreads = 128;
constexpr int kBlocksPerSm = 16;  // resident 128-thread blocks an SM can hold (2048 threads)
constexpr int kWaves = 2;         // the head split aims at this many full waves of blocks
constexpr int kMaxGridY = 65535;

struct RotaryParams {
  const void* x;    // (batch, seq, heads, head_dim) through x_stride, feature stride 1
  const void* cos;  // (batch or 1, seq, rot) through cos_stride, feature stride 1; sin likewise, same strides
  const void* sin;
  void* out;  // like x, through out_stride
  int64_t x_stride[3];    // batch, seq, head
  int64_t out_stride[3];  // batch, seq, head
  int64_t cos_stride[2];  // batch (0: one table for every sequence), seq
  uint32_t tokens;  // batch · seq, below 2^31
  uint32_t seqlen;
  int heads;
  int heads_per_block;
  int half;         // rot / 2
  int rot;
  int chunks;       // chunks of V pairs a token: half / V (rotate-half), ceil(rot / 2V) (interleaved)
  int pass_chunks;  // (head_dim − rot) / V
  int lanes_log2;   // threads a token: 1 << lanes_log2
  bool backward;    // apply the transpose
};

// A chunk as pairs: the V first elements and the V second elements of its pairs, from the two V-element accesses
// a and b (rotate-half: a holds the firsts, b the seconds; interleaved: a ++ b holds (first, second) pairs).
template <bool kInterleaved, int V>
__device__ __forceinline__ void split_pairs(const float (&a)[V], const float (&b)[V], float (&first)[V],
                                            float (&second)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if constexpr (kInterleaved) {
      first[k] = 2 * k < V ? a[2 * k] : b[2 * k - V];
      second[k] = 2 * k + 1 < V ? a[2 * k + 1] : b[2 * k + 1 - V];
    } else {
      first[k] = a[k];
      second[k] = b[k];
    }
  }
}

// The inverse of split_pairs.
template <bool kInterleaved, int V>
__device__ __forceinline__ void merge_pairs(const float (&first)[V], const float (&second)[V], float (&a)[V],
                                            float (&b)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if constexpr (kInterleaved) {
      (2 * k < V ? a[2 * k] : b[2 * k - V]) = first[k];
      (2 * k + 1 < V ? a[2 * k + 1] : b[2 * k + 1 - V]) = second[k];
    } else {
      a[k] = first[k];
      b[k] = second[k];
    }
  }
}

template <int V>
__device__ __forceinline__ void zero(float (&v)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = 0.f;
}

template <typename T, typename C, int V, bool kInterleaved>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams p) {
  const int lanes = 1 << p.lanes_log2;
  const int lane = static_cast<int>(threadIdx.x) & (lanes - 1);
  // tokens and seqlen are below 2^31: a 32-bit division (a 64-bit one is a call).
  const uint32_t t = blockIdx.x * static_cast<uint32_t>(kThreads >> p.lanes_log2) +
                     (threadIdx.x >> p.lanes_log2);
  if (t >= p.tokens) return;
  const uint32_t bu = t / p.seqlen;
  const int64_t b = bu;
  const int64_t s = t - bu * p.seqlen;
  const T* __restrict__ x = static_cast<const T*>(p.x) + b * p.x_stride[0] + s * p.x_stride[1];
  T* __restrict__ out = static_cast<T*>(p.out) + b * p.out_stride[0] + s * p.out_stride[1];
  const int64_t c_off = b * p.cos_stride[0] + s * p.cos_stride[1];
  const C* __restrict__ cos = static_cast<const C*>(p.cos) + c_off;
  const C* __restrict__ sin = static_cast<const C*>(p.sin) + c_off;
  const int h_begin = static_cast<int>(blockIdx.y) * p.heads_per_block;
  const int h_end = min(p.heads, h_begin + p.heads_per_block);

  for (int j = lane; j < p.chunks; j += lanes) {
    const int pa = kInterleaved ? 2 * j * V : j * V;  // the chunk's two accesses, in features
    const int pb = kInterleaved ? pa + V : pa + p.half;
    const bool has_b = !kInterleaved || pb < p.rot;  // interleaved: the last chunk may have its a half only
    float ca[V], cb[V], sa[V], sb[V];
    load_floats<V>(cos + pa, ca);
    load_floats<V>(sin + pa, sa);
    if (has_b) {
      load_floats<V>(cos + pb, cb);
      load_floats<V>(sin + pb, sb);
    } else {
      zero(cb);
      zero(sb);
    }
    // cos and sin at each pair's first (c1, s1) and second (c2, s2) element.
    float c1[V], c2[V], s1[V], s2[V];
    split_pairs<kInterleaved>(ca, cb, c1, c2);
    split_pairs<kInterleaved>(sa, sb, s1, s2);
    if (p.backward) {
      // The transpose: out_p = x_p·c_p + x_q·s_q, out_q = x_q·c_q − x_p·s_p.
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float tmp = s1[k];
        s1[k] = -s2[k];
        s2[k] = -tmp;
      }
    }
    for (int h = h_begin; h < h_end; h += 2) {
      const bool second_head = h + 1 < h_end;
      float xa[2][V], xb[2][V];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        zero(xa[u]);
        zero(xb[u]);
        if (u == 0 || second_head) {
          const T* xh = x + static_cast<int64_t>(h + u) * p.x_stride[2];
          load_floats<V>(xh + pa, xa[u]);
          if (has_b) load_floats<V>(xh + pb, xb[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        if (u == 1 && !second_head) break;
        float x1[V], x2[V], o1[V], o2[V];
        split_pairs<kInterleaved>(xa[u], xb[u], x1, x2);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          o1[k] = x1[k] * c1[k] - x2[k] * s1[k];
          o2[k] = x2[k] * c2[k] + x1[k] * s2[k];
        }
        merge_pairs<kInterleaved>(o1, o2, xa[u], xb[u]);
        T* oh = out + static_cast<int64_t>(h + u) * p.out_stride[2];
        store_floats<V>(oh + pa, xa[u]);
        if (has_b) store_floats<V>(oh + pb, xb[u]);
      }
    }
  }

  // The pass-through features [rot, head_dim), copied in their storage type.
  for (int j = lane; j < p.pass_chunks; j += lanes) {
    const int pos = p.rot + j * V;
    for (int h = h_begin; h < h_end; ++h) {
      const Vec<T, V> v = *reinterpret_cast<const Vec<T, V>*>(x + static_cast<int64_t>(h) * p.x_stride[2] + pos);
      *reinterpret_cast<Vec<T, V>*>(out + static_cast<int64_t>(h) * p.out_stride[2] + pos) = v;
    }
  }
}

// Calls f(Tag<T>, Tag<C>) for x's dtype code and the cos/sin dtype code; C is float or T.
template <typename F>
void dispatch_types(int dtype, int cdtype, F&& f) {
  const bool c32 = cdtype == kFloat32;
  if (cdtype != kFloat32 && cdtype != dtype) {
    throw std::invalid_argument("fastlm._C: rotary: cos and sin must be float32 or x's dtype");
  }
  dispatch_dtype(dtype, [&](auto t) {
    if (c32) {
      f(t, Tag<float>{});
    } else {
      f(t, t);
    }
  });
}

bool multiples(const std::vector<int64_t>& strides, int v) {
  return std::all_of(strides.begin(), strides.end(), [v](int64_t s) { return s % v == 0; });
}

}  // namespace
}  // namespace fastlm

// ---------------------------------------------------------------------------------------------------------------
// The launcher of launchers.h, defined by qualified name: a signature unlike the declaration does not compile.

void fastlm::rotary(int64_t x, std::vector<int64_t> x_strides, int64_t cos, int64_t sin, std::vector<int64_t> cos_strides,
            int64_t out, std::vector<int64_t> out_strides, int64_t batch, int64_t seqlen, int64_t heads,
            int64_t head_dim, int64_t rot, int dtype, int cdtype, bool interleaved, bool backward, int device,
            int64_t stream) {
  const DeviceGuard guard(device);
  if (x_strides.size() != 3 || out_strides.size() != 3 || cos_strides.size() != 2) {
    throw std::invalid_argument("fastlm._C: rotary takes 3 strides of x and out (batch, seq, head), 2 of cos");
  }
  if (batch < 0 || seqlen < 0 || heads < 0 || head_dim < 0) {
    throw std::invalid_argument("fastlm._C: rotary: sizes must be ≥ 0");
  }
  if (rot < 2 || rot % 2 != 0 || rot > head_dim) {
    throw std::invalid_argument("fastlm._C: rotary: rot must be even, ≥ 2 and ≤ head_dim, got " +
                                std::to_string(rot));
  }
  const int64_t tokens = batch * seqlen;
  if (tokens > INT_MAX || heads > INT_MAX || head_dim > INT_MAX / 2) {
    throw std::invalid_argument("fastlm._C: rotary: batch·seq, heads and head_dim must stay below 2^31");
  }
  if (tokens == 0 || heads == 0) return;  // before the pointer checks: an empty tensor may have a null pointer
  if (x == 0 || cos == 0 || sin == 0 || out == 0) {
    throw std::invalid_argument("fastlm._C: rotary needs x, cos, sin and out");
  }

  RotaryParams p{};
  p.x = ptr<const void>(x);
  p.cos = ptr<const void>(cos);
  p.sin = ptr<const void>(sin);
  p.out = ptr<void>(out);
  for (int i = 0; i < 3; ++i) {
    p.x_stride[i] = x_strides[i];
    p.out_stride[i] = out_strides[i];
  }
  p.cos_stride[0] = cos_strides[0];
  p.cos_stride[1] = cos_strides[1];
  p.tokens = static_cast<uint32_t>(tokens);
  p.seqlen = static_cast<uint32_t>(seqlen);
  p.heads = static_cast<int>(heads);
  p.half = static_cast<int>(rot / 2);
  p.rot = static_cast<int>(rot);
  p.backward = backward;

  const int V = 16 / dtype_size(dtype);
  const int Vc = 16 / dtype_size(cdtype);
  const bool vec = (interleaved ? rot % V : p.half % V) == 0 && head_dim % V == 0 && aligned16(p.x) &&
                   aligned16(p.out) && aligned16(p.cos) && aligned16(p.sin) && multiples(x_strides, V) &&
                   multiples(out_strides, V) && multiples(cos_strides, Vc);
  const int v = vec ? V : 1;
  p.chunks = static_cast<int>(interleaved ? ceil_div(rot, 2 * v) : p.half / v);
  p.pass_chunks = static_cast<int>((head_dim - rot) / v);
  int lanes_log2 = 0;
  while ((1 << lanes_log2) < kThreads && (1 << lanes_log2) < p.chunks) ++lanes_log2;
  p.lanes_log2 = lanes_log2;

  int sms = 0;
  FASTLM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t token_blocks = ceil_div(tokens, kThreads >> lanes_log2);
  const int64_t target = static_cast<int64_t>(std::max(sms, 1)) * kBlocksPerSm * kWaves;
  const int64_t groups = std::max<int64_t>(1, std::min({heads, int64_t{kMaxGridY}, ceil_div(target, token_blocks)}));
  p.heads_per_block = static_cast<int>(ceil_div(heads, groups));
  const dim3 grid(static_cast<unsigned>(token_blocks), static_cast<unsigned>(ceil_div(heads, p.heads_per_block)));

  const cudaStream_t s = as_stream(stream);
  dispatch_types(dtype, cdtype, [&](auto t, auto c) {
    using T = typename decltype(t)::type;
    using C = typename decltype(c)::type;
    constexpr int kV = static_cast<int>(16 / sizeof(T));
    if (interleaved) {
      if (vec) {
        rotary_kernel<T, C, kV, true><<<grid, kThreads, 0, s>>>(p);
      } else {
        rotary_kernel<T, C, 1, true><<<grid, kThreads, 0, s>>>(p);
      }
    } else if (vec) {
      rotary_kernel<T, C, kV, false><<<grid, kThreads, 0, s>>>(p);
    } else {
      rotary_kernel<T, C, 1, false><<<grid, kThreads, 0, s>>>(p);
    }
    check_launch("rotary_kernel");
  });
}
