// fastlm CUDA C++: what every op family shares.
//
// Host part (any C++ compiler, so bindings.cpp includes it too): the CUDA error check that turns a failed call
// into std::runtime_error (pybind11 raises it as RuntimeError), and the device check every launcher runs first,
// before it looks at a pointer, so that a machine without a GPU gets an error that says so instead of a crash;
// the dtype codes, and the launchers' small conversions (an int64 address to a pointer, to a stream).
//
// Launcher part (nvcc only, host code): the one dtype dispatch (a code to a type, for a generic lambda) and the
// one opt-in to more than 48 KB of dynamic shared memory.
//
// Device part (nvcc only): 16-byte vector loads and stores, fp32 conversions of float / __half / __nv_bfloat16,
// packed storage (values kept in their 16-bit storage type, two to a register, between loading and use), warp
// reductions, reductions over a group of warps through shared memory (sums of one or two floats), and Chan's merge
// of (count, mean, M2). All arithmetic of the kernels is fp32 whatever the storage dtype, hence loads that convert
// to float on the way in and stores that round on the way out.
//
// Determinism: every reduction here is a fixed tree (xor butterflies, then a fixed-order sum of the warps'
// partials), so the same inputs give the same bits on every run, and every lane of a group ends up holding the
// same bits (a butterfly adds the same two numbers in both partner lanes, and a + b == b + a exactly).

#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastlm {

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastlm._C: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err) + " (" + file + ":" + std::to_string(line) + ")");
  }
}

// Dtype codes of the launchers (exported as fastlm._C.DTYPE_FLOAT32 etc.), and the size of an element of each.
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// A type as a value: the launchers' dtype dispatch calls a generic lambda with Tag<T>{} and reads T back.
template <typename T>
struct Tag {
  using type = T;
};

}  // namespace fastlm

#define FASTLM_CUDA_CHECK(expr) ::fastlm::cuda_check((expr), #expr, __FILE__, __LINE__)

namespace fastlm {

// Throws a clear error when no device is usable (no driver, no GPU, CUDA_VISIBLE_DEVICES empty, bad index),
// else makes `device` current. Returns the device that was current before, for DeviceGuard to restore.
inline int ensure_device(int device) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // the failure is reported here; do not leave it to the next launch check
    throw std::runtime_error(std::string("fastlm._C: no CUDA device is visible: ") + cudaGetErrorString(err));
  }
  if (count == 0) {
    throw std::runtime_error("fastlm._C: no CUDA device is visible: cudaGetDeviceCount returned 0");
  }
  if (device < 0 || device >= count) {
    throw std::runtime_error("fastlm._C: CUDA device index " + std::to_string(device) + " is out of range (" +
                             std::to_string(count) + " visible)");
  }
  int previous = 0;
  FASTLM_CUDA_CHECK(cudaGetDevice(&previous));
  if (previous != device) FASTLM_CUDA_CHECK(cudaSetDevice(device));
  return previous;
}

// Launchers run on the tensors' device and then give the caller's current device back: torch reads the current
// device to place new tensors, so leaving it switched would move the user's next allocation.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device), previous_(ensure_device(device)) {}
  ~DeviceGuard() {
    if (previous_ != device_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_;
};

// A kernel launch reports a bad configuration only through cudaGetLastError; name the kernel in the error.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastlm._C: launching ") + kernel + " failed: " + cudaGetErrorName(err) +
                             ": " + cudaGetErrorString(err));
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// A device address as Python passes it (an int, 0 for an absent tensor) to a typed pointer, null for 0.
template <typename P>
P* ptr(int64_t address) {
  return reinterpret_cast<P*>(static_cast<std::uintptr_t>(address));
}

// The cudaStream_t handle as Python passes it (torch's stream.cuda_stream, an int).
inline cudaStream_t as_stream(int64_t stream) {
  return reinterpret_cast<cudaStream_t>(static_cast<std::uintptr_t>(stream));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fastlm

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace fastlm {

// Calls f(Tag<T>{}) for the dtype code: T is float, __half or __nv_bfloat16 (kWithFloat32 false: the 16-bit
// types only, and f is never instantiated for float). Any other code throws std::invalid_argument (ValueError);
// `who` names the kernels in that message when they take a subset ("the attention kernels").
template <bool kWithFloat32 = true, typename F>
void dispatch_dtype(int dtype, F&& f, const char* who = nullptr) {
  switch (dtype) {
    case kFloat32:
      if constexpr (kWithFloat32) {
        f(Tag<float>{});
        return;
      }
      break;
    case kFloat16:
      f(Tag<__half>{});
      return;
    case kBFloat16:
      f(Tag<__nv_bfloat16>{});
      return;
    default:
      break;
  }
  throw std::invalid_argument(std::string("fastlm._C: ") +
                              (who != nullptr ? std::string(who) + " take dtype code " : "dtype code must be ") +
                              (kWithFloat32 ? "0 (float32), 1 (float16) or 2 (bfloat16)" : "1 (float16) or 2 (bfloat16)") +
                              ", got " + std::to_string(dtype));
}

// Dynamic shared memory a block gets without asking (cudaFuncAttributeMaxDynamicSharedMemorySize).
constexpr int kDefaultSmemBytes = 48 * 1024;

// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device: above the default 48 KB it
// must be asked for, per kernel; a GPU that offers a block less than that (sm_86 and sm_89: 99 KB) gets an error
// that names the kernel instead of a failed launch.
template <typename K>
void opt_in_smem(K kernel, int bytes, const char* name) {
  if (bytes <= kDefaultSmemBytes) return;
  int device = 0;
  int optin = 0;
  FASTLM_CUDA_CHECK(cudaGetDevice(&device));
  FASTLM_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > optin) {
    throw std::invalid_argument(std::string("fastlm._C: ") + name + " needs " + std::to_string(bytes) +
                                " bytes of shared memory a block; this GPU offers " + std::to_string(optin));
  }
  FASTLM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// N elements of T loaded or stored by one instruction; N * sizeof(T) is at most 16 bytes here, the widest
// access sm_80 and sm_90 have.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Rounds v to T and back: the value a tensor of dtype T would hold.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// Elements per access when N consecutive T are moved: as many as fit in 16 bytes, never more than N.
template <typename T, int N>
constexpr int access_elems() {
  return (16 / static_cast<int>(sizeof(T))) < N ? (16 / static_cast<int>(sizeof(T))) : N;
}

// out[i] = float(p[i]), i < N. p must be aligned to the access size: access_elems<T, N>() * sizeof(T) bytes
// (16 bytes for a vectorized kernel, sizeof(T) for N == 1). N float weights behind N bf16 inputs take two 16-byte
// loads, never one 32-byte load that would need 32-byte alignment.
template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  constexpr int kA = access_elems<T, N>();
  static_assert(N % kA == 0, "N must be a multiple of the access width");
#pragma unroll
  for (int i = 0; i < N / kA; ++i) {
    const Vec<T, kA> a = reinterpret_cast<const Vec<T, kA>*>(p)[i];
#pragma unroll
    for (int j = 0; j < kA; ++j) out[i * kA + j] = to_float(a.v[j]);
  }
}

// p[i] = T(in[i]) rounded to nearest even, i < N; same alignment rule as load_floats.
template <int N, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  constexpr int kA = access_elems<T, N>();
  static_assert(N % kA == 0, "N must be a multiple of the access width");
#pragma unroll
  for (int i = 0; i < N / kA; ++i) {
    Vec<T, kA> a;
#pragma unroll
    for (int j = 0; j < kA; ++j) a.v[j] = from_float<T>(in[i * kA + j]);
    reinterpret_cast<Vec<T, kA>*>(p)[i] = a;
  }
}

// V consecutive elements of T kept in their storage type as 32-bit words (a float a word, two 16-bit elements a
// word, a lone 16-bit element in the low half): half the registers of fp32 for 16-bit data.
template <typename T, int V>
struct Packed {
  static_assert(V == 1 || V * sizeof(T) % 16 == 0, "one element or whole 16-byte accesses");
  static constexpr int kWords = (V * static_cast<int>(sizeof(T)) + 3) / 4;
  uint32_t w[kWords];
};

// Loads with 16-byte accesses (p 16-byte aligned) or, for one element, one access of its size.
template <int V, typename T>
__device__ __forceinline__ Packed<T, V> load_packed(const T* p) {
  Packed<T, V> r;
  if constexpr (V * sizeof(T) >= 16) {
#pragma unroll
    for (int k = 0; k < Packed<T, V>::kWords / 4; ++k) {
      const uint4 u = reinterpret_cast<const uint4*>(p)[k];
      r.w[4 * k] = u.x;
      r.w[4 * k + 1] = u.y;
      r.w[4 * k + 2] = u.z;
      r.w[4 * k + 3] = u.w;
    }
  } else if constexpr (sizeof(T) == 4) {
    r.w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else {
    r.w[0] = *reinterpret_cast<const unsigned short*>(p);
  }
  return r;
}

template <typename T, int V>
__device__ __forceinline__ Packed<T, V> zero_packed() {
  Packed<T, V> r;
#pragma unroll
  for (int k = 0; k < Packed<T, V>::kWords; ++k) r.w[k] = 0u;  // +0.0 in every dtype
  return r;
}

// Element j as float.
template <typename T, int V>
__device__ __forceinline__ float unpack(const Packed<T, V>& r, int j) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(r.w[j]);
  } else {
    const uint32_t word = r.w[j / 2];
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return __uint_as_float(j % 2 ? word & 0xffff0000u : word << 16);
    } else {
      const __half2 h = *reinterpret_cast<const __half2*>(&word);
      return j % 2 ? __high2float(h) : __low2float(h);
    }
  }
}

// r ^= zero, where zero is 0 at run time but not provably so to the compilers (a kernel argument). Afterwards
// elements unpacked from r are computed anew instead of reusing (and keeping alive, in twice the registers) the
// floats unpacked before: NVVM and ptxas would otherwise merge the two unpackings.
template <typename T, int V>
__device__ __forceinline__ void opaque(Packed<T, V>& r, uint32_t zero) {
#pragma unroll
  for (int k = 0; k < Packed<T, V>::kWords; ++k) r.w[k] ^= zero;
}

// Sum over each aligned group of kWidth lanes (a power of two ≤ 32); every lane of the group gets the result.
template <int kWidth = 32>
__device__ __forceinline__ float warp_sum(float v) {
  static_assert(kWidth >= 1 && kWidth <= 32 && (kWidth & (kWidth - 1)) == 0, "kWidth: a power of two ≤ 32");
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums K floats over each group of kGroup consecutive threads of the block (kGroup a power of two; the block is
// a whole number of groups). kGroup ≤ 32 stays inside a warp and needs no barrier, so a warp may leave early.
// kGroup > 32 goes through `smem` (K floats per warp of the block) and two __syncthreads, so every thread of the
// block must make the same sequence of calls; the first barrier keeps a call from overwriting what the
// previous call's readers have not read yet. Every thread of a group gets the group's sums.
template <int kGroup, int K>
__device__ __forceinline__ void group_sum(float (&v)[K], float* smem) {
  static_assert((kGroup & (kGroup - 1)) == 0, "kGroup must be a power of two");
  constexpr int kWidth = kGroup < 32 ? kGroup : 32;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum<kWidth>(v[k]);
  if constexpr (kGroup > 32) {
    constexpr int kWarps = kGroup / 32;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int lane = static_cast<int>(threadIdx.x) % 32;
    __syncthreads();
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) smem[warp * K + k] = v[k];
    }
    __syncthreads();
    const int first = warp - warp % kWarps;
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = warp_sum<kWarps>(smem[(first + lane % kWarps) * K + k]);
  }
}

// The sum of one float over the whole block (kThreads threads, a power of two); smem holds kThreads / 32 floats.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* smem) {
  float s[1] = {v};
  group_sum<kThreads, 1>(s, smem);
  return s[0];
}

// The sums of two floats over the whole block; smem holds 2 * kThreads / 32 floats.
template <int kThreads>
__device__ __forceinline__ void block_sum2(float& a, float& b, float* smem) {
  float s[2] = {a, b};
  group_sum<kThreads, 2>(s, smem);
  a = s[0];
  b = s[1];
}

// Chan et al.'s merge of the statistics of two disjoint sets: (n, mean, m2) absorbs (nb, mean_b, m2b), where m2 is
// the sum of squared deviations from the set's mean. Exact up to rounding whatever the data's offset, unlike
// Σx² − n·mean². Either side may be empty (n == 0); merging into an empty side copies exactly. Otherwise the
// weight nb/total uses the fast division (2 ulp): it only scales the correction terms, and the IEEE division's
// slow-path call would cost registers around it.
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb, float mean_b, float m2b) {
  if (nb == 0.f) return;
  if (n == 0.f) {
    n = nb;
    mean = mean_b;
    m2 = m2b;
    return;
  }
  const float total = n + nb;
  const float delta = mean_b - mean;
  const float frac = __fdividef(nb, total);
  mean += delta * frac;
  m2 += m2b + delta * delta * n * frac;
  n = total;
}

// Chan's merge over the whole block (kThreads threads). A down-shuffle tree gives lane 0 of each warp its warp's
// statistics; then every thread merges the warps' results in the same order, so all threads hold the same bits.
// smem holds 3 * kThreads / 32 floats.
template <int kThreads>
__device__ __forceinline__ void block_chan_merge(float& n, float& mean, float& m2, float* smem) {
  constexpr int kWarps = kThreads / 32;
  static_assert(kThreads % 32 == 0, "whole warps");
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float nb = __shfl_down_sync(0xffffffffu, n, offset);
    const float mb = __shfl_down_sync(0xffffffffu, mean, offset);
    const float qb = __shfl_down_sync(0xffffffffu, m2, offset);
    chan_merge(n, mean, m2, nb, mb, qb);
  }
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  __syncthreads();
  if (lane == 0) {
    smem[3 * warp] = n;
    smem[3 * warp + 1] = mean;
    smem[3 * warp + 2] = m2;
  }
  __syncthreads();
  n = 0.f;
  mean = 0.f;
  m2 = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) chan_merge(n, mean, m2, smem[3 * w], smem[3 * w + 1], smem[3 * w + 2]);
}

}  // namespace fastlm

#endif  // __CUDACC__
