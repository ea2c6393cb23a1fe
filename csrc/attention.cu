// Attention forward on tensor cores: a FlashAttention-2 kernel, and a flash-decoding (split-KV) kernel with its
// combine kernel, for fp16 and bf16 at head dims 32, 64, 96, 128 and 256, with GQA/MQA, varlen (cu_seqlens),
// sliding windows on either side (causal is window_right = 0) and the softcap. The launcher attention_fwd picks
// the kernel; fastlm/_cuda.py checks the tensors and allocates the decode workspace. The Triton kernel
// (kernels/attention.py) and fastlm/reference.py follow the same specification.
//
// Math, per (batch b, query head h, kv head h / (Hq/Hk)), positions within the sequence, Sq_b queries, Sk_b keys,
// off = Sk_b − Sq_b:
//   visible(i, j)   j ≥ i + off − window_left (no bound when None) and j ≤ i + off + window_right (likewise)
//   s_ij            scale·q_i·k_j, or with the softcap c: c·tanh(scale·q_i·k_j / c)
//   lse_i           log Σ_{visible j} exp(s_ij) (natural log, fp32; −inf when no key is visible)
//   out_i           Σ_{visible j} exp(s_ij − lse_i)·v_j (0 exactly when no key is visible)
// computed in one pass over key blocks with the online softmax in base 2: t = s·log2(e) (the scale and log2(e)
// are one factor, mult, rounded once on the host; with the softcap mult = c·log2(e) and the tanh argument is
// q·k·(scale/c)), m = running max of t, l = Σ 2^(t − m), O = Σ 2^(t − m)·v; a new block with max m' rescales l
// and O by 2^(m − m'). At the end out = O / l and lse = (m + log2 l)·ln 2. p = 2^(t − m) is rounded to the input
// dtype for the P·V product (as FlashAttention does); l sums the unrounded fp32 p; all accumulation is fp32.
//
// Roofline. FLOPs 4·b·Hq·Sq·Sk·D (two matmuls), about half that under a causal mask and Sq = Sk (the skipped key
// blocks are never loaded or multiplied). Forward kernel: HBM bytes ≈ 2·b·Hq·Sq·D·2 (Q in, O out) +
// 2·b·Hk·Sk·D·2 (K and V, once when they stay in L2 across the query blocks of a head) + 4·b·Hq·Sq (lse); with
// Hk = Hq and Sq = Sk = S that is S/2 FLOPs a byte (2048 at S = 4096), far above the ridge (H100 datasheet:
// ~990 TFLOP/s dense fp16 over 3.35 TB/s ≈ 300): compute bound, and mma.sync (not Hopper's wgmma) keeps it
// below the H100 tensor-core peak. From L2 each
// CTA re-reads K and V once per 128 query rows: 2·kBlockN·D·2 bytes per 4·128·kBlockN·D FLOPs, 128 FLOPs a byte.
// Decode kernel: K and V are read once per (batch, kv head) whatever the group size, 2·b·Hk·Sk·D·2 bytes, for
// 4·b·Hq·Sq·Sk·D FLOPs: Sq·Hq/Hk ≤ 16 FLOPs a byte, memory bound; the split partials add
// 2·b·Hk·rows·splits·(D + 1)·4 bytes (written once, read once by the combine), small next to K and V when each
// split covers ≥ kMinSplitKeys keys.
//
// Design, and why (configurations below; static report: no spills, no local memory, sm_80 and sm_90a):
// - Forward (attn_fwd_kernel): FlashAttention-2's split: one CTA per (block of kBlockM query rows, query head,
//   batch entry), each warp owns 16 query rows (one mma row tile), so the softmax statistics of a row never leave
//   its quad of lanes (two shuffles a row for the max; the running sums stay per lane until the end). K and V
//   blocks of kBlockN keys go global → shared by cp.async (16 bytes, L2 only) in two stages: block n + 1 loads
//   while block n is multiplied. Operands come out of shared memory by ldmatrix (.trans for V, so V needs no
//   transposed copy), products by mma.sync.m16n8k16 (fp16/bf16 in, fp32 accumulate), and P is turned from the
//   accumulator layout of S into the A operand of P·V in registers (the C fragment of two 8-key tiles is exactly
//   the A fragment of one 16-key slice). O stays in registers; the epilogue divides by l, rounds, and stores
//   whole 16-byte pieces of rows through shared memory.
//   kBlockM = 128 rows (8 warps) for D ≤ 128, so each K/V block loaded serves 128 query rows; kBlockN = 128 keys
//   for D ≤ 64 and 64 for D = 96, 128 (S and O together stay within the 255 registers); D = 256 takes 64 rows
//   (4 warps) and 32 keys, and re-reads Q from shared memory instead of holding 64 more registers of fragments.
//   Shared memory ≤ 99 KB a CTA in every configuration (the Q tile shares the second stage where Q sits in
//   registers), so one build runs on sm_80 to sm_90 including the 99 KB sm_86/sm_89 parts.
// - Tiles are stored with a pitch of D + 8 elements: an odd number of 16-byte chunks, so the 8 rows one ldmatrix
//   phase reads fall in 8 different bank groups at every D (96 included), at a cost of 8 elements a row.
// - Masking: key blocks outside the union of the rows' visible ranges are not visited at all; a visited block is
//   masked element by element only when some (row, key) pair in it is not visible (the boundary blocks: the
//   sequence end, the causal diagonal, the window edges); interior blocks take no mask code. In positions, key j
//   is visible to row i iff j < Sk_b and lo ≤ j − i ≤ hi, one subtraction and two compares.
// - Rows with no visible key: the running max stays −inf and its shift is taken as 0, so every p and every
//   rescale factor is 2^−inf = 0 (never inf − inf); l = 0 then gives out = 0 and lse = −inf exactly. Keys past
//   the sequence end are zero-filled by cp.async (source size 0), so their scores are finite before the mask
//   and their V rows are 0: nothing NaN enters the products.
// - Query blocks are scheduled last-first: under a causal mask the last blocks have the most keys, and starting
//   them first shortens the tail of the grid.
// - Decode (attn_decode_kernel), taken when max_seqlen_q · Hq/Hk ≤ 16 (one mma row tile holds every (query,
//   head-of-the-group) pair of a kv head, so each K/V byte is loaded once for the whole group): one CTA per (key
//   split, kv head, batch entry) of 4 warps. The keys the rows may see (the union of their windows) are cut into
//   16-key tiles, the tiles into `splits` contiguous runs, and inside a run the warps take tiles round-robin, each
//   warp through its own cp.async pipeline of 2 to 4 stages with no block barrier; the warps' (m, l, O) are then
//   merged in warp order through shared memory. The number of splits is chosen on the host from b·Hk, the keys a
//   row may see (Sk, or the window's width) and the SM count: enough CTAs for kDecodeCtasPerSm per SM, no split
//   under kMinSplitKeys keys, at most kMaxSplits. With one split the CTA writes out and lse itself; otherwise each
//   split writes its normalized fp32 partial (o_s, lse_s in log2 units) to the workspace, every split and row
//   always (−inf and 0 when it saw nothing), and attn_combine_kernel merges them in split order:
//   lse = log Σ 2^lse_s, out = Σ 2^(lse_s − lse)·o_s. Fixed orders everywhere (warps, splits, lanes' butterfly
//   sums) make the results bitwise repeatable.
// - Varlen offsets are read on the device and clamped into [0, total tokens], non-decreasing, so no cu_seqlens
//   content makes a kernel read or write outside the tensors; max_seqlen_q/k are host upper bounds that only size
//   the grids. Positions stay below 2^30 (checked on the host), so differences of positions are ints; windows are
//   clamped to ±2^40 (None is +2^40), and the per-row bounds lo, hi to ±(2^30 + 1), which changes no answer.
// - The softcap is a template parameter (tanhf only in those instances); the accurate tanhf, as its approximate
//   form's 2^−11 relative error times c = 30 or 50 would move scores by more than 16-bit inputs do.
// - Raw pointers with (batch, token, head) strides in elements: any layout whose rows are 16-byte aligned is
//   read in place (q, k, v views of a packed qkv tensor included); fastlm/_cuda.py copies the others.

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <cuda.h>  // CUtensorMap (a type only: nothing of the driver library is linked)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled, reached through the runtime

#include "common.cuh"
#include "launchers.h"

namespace fastlm {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Shapes. Every tile lives in shared memory with rows of D + 8 elements: the row pitch is an odd number of 16-byte
// chunks, so the 8 row addresses of one ldmatrix phase (and the 8 rows a quad group writes) fall in 8 different
// bank groups, whatever D is (32, 64, 96, 128, 256), without a swizzle.

constexpr int kMma = 16;  // rows of an mma.m16n8k16 A tile: the query rows of a warp

// The forward kernel: one CTA per (block of kBlockM query rows, batch, query head); kWarps = kBlockM / 16, each warp
// owns 16 query rows. Keys stream through two stages of (K, V) tiles of kBlockN rows. Up to D = 128 the Q tile is
// read once into registers (D/16 A fragments), so it shares its shared memory with the second stage; at D = 256
// the fragments would take 64 more registers next to the 128 of the O accumulator, so Q stays in shared memory
// and is re-read by ldmatrix for every key block.
template <int D>
struct FwdConfig {
  static constexpr int kBlockM = D <= 128 ? 128 : 64;
  static constexpr int kBlockN = D <= 64 ? 128 : (D <= 128 ? 64 : 32);
  static constexpr bool kQInRegs = D <= 128;
  static constexpr int kWarps = kBlockM / kMma;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kPitch = D + 8;                              // elements between tile rows
  static constexpr int kTileElems = kBlockN * kPitch;               // one K or V tile
  static constexpr int kStageBytes = 2 * kTileElems * 2;            // K then V, 16-bit elements
  static constexpr int kQBytes = kBlockM * kPitch * 2;
  static constexpr int kQOffset = kQInRegs ? kStageBytes : 2 * kStageBytes;  // in stage 1, or after the stages
  static constexpr int kSmemBytes = kQInRegs ? 2 * kStageBytes : 2 * kStageBytes + kQBytes;
  static_assert(kBlockM * kPitch * 2 <= kStageBytes, "the Q tile (and the output staging) must fit in one stage");
};

// The decode kernel: one CTA per (split of the keys, batch, kv head), kDecodeWarps warps. The CTA's query rows are
// the (query, head of the group) pairs of that kv head, at most 16 (one mma row tile); each warp walks its own
// key tiles of kDecodeKeys keys through kStages private stages, then the warps' partial softmaxes are merged.
constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kDecodeKeys = 16;
constexpr int kDecodeSmemTarget = 72 * 1024;  // stages are added while the stages of all warps fit in this

template <int D>
struct DecodeConfig {
  static constexpr int kPitch = D + 8;
  static constexpr int kTileElems = kDecodeKeys * kPitch;
  static constexpr int kStageBytes = 2 * kTileElems * 2;  // K then V
  static constexpr int kFit = kDecodeSmemTarget / (kDecodeWarps * kStageBytes);
  static constexpr int kStages = kFit < 2 ? 2 : (kFit > 4 ? 4 : kFit);
  static constexpr int kWarpBytes = kStages * kStageBytes;
  static constexpr int kQBytes = kMma * kPitch * 2;
  static constexpr bool kQInRegs = D <= 128;  // as in the forward kernel
  static constexpr int kSmemBytes = kDecodeWarps * kWarpBytes + kQBytes;
  // The warps' partial results for the merge: O (16 × (D + 4) floats) then m and l (16 each), in the warp's own
  // stage memory once its loads are done.
  static constexpr int kRedPitch = D + 4;
  static_assert(kMma * kRedPitch * 4 + 2 * kMma * 4 <= kWarpBytes, "the merge buffers must fit a warp's stages");
};

// The combine kernel: one warp per query row, kCombineWarps rows a CTA; at most kMaxSplits splits.
constexpr int kCombineWarps = 4;
constexpr int kMaxSplits = 128;
// A split covers at least this many keys (kDecodeWarps · kDecodeKeys · 4: four tiles a warp), so the pipeline's
// fill and the merge stay small next to the streaming.
constexpr int kMinSplitKeys = 256;
// Splits are added until the decode grid has this many CTAs per SM: two decode CTAs fit an SM (registers and
// shared memory) on A100 and H100 at D ≤ 128, so this is about one full wave.
constexpr int kDecodeCtasPerSm = 2;

// Token positions and counts stay below 2^30, so differences of positions fit an int with room to spare; window
// sizes are clamped to ±kWindowInf (None is +kWindowInf), far beyond any position. launchers.h holds the values
// (Python reads them from the module), as it does the head dims (AttnHeadDims) and the grid limit.
constexpr int64_t kMaxTokens = kAttnMaxTokens;
constexpr int64_t kWindowInf = kAttnWindowInf;
constexpr int64_t kDiffClamp = (int64_t{1} << 30) + 1;

constexpr float kLn2 = 0.6931471805599453f;

struct AttnParams {
  const void* q;     // (B, Sq, Hq, D) or varlen (Tq, Hq, D); unit stride along D
  const void* k;     // (B, Sk, Hk, D) or varlen (Tk, Hk, D)
  const void* v;     // like k
  void* out;         // like q, in q's dtype
  float* lse;        // (B, Hq, Sq) or varlen (Hq, Tq) fp32: element b·lse_sb + h·lse_sh + token
  const int* cu_q;   // (B + 1,) int32 offsets of each sequence's queries in the packed tokens; null: not varlen
  const int* cu_k;   // (B + 1,) likewise for the keys
  float* ws_o;       // decode with splits: (B, Hk, rows, splits, D) fp32 partial outputs, each normalized
  float* ws_lse;     // decode with splits: (B, Hk, rows, splits) fp32 partial log-sum-exp, log2 units
  // Strides in elements: batch (0 for varlen), token, head.
  int64_t q_sb, q_ss, q_sh;
  int64_t k_sb, k_ss, k_sh;
  int64_t v_sb, v_ss, v_sh;
  int64_t o_sb, o_ss, o_sh;
  int64_t lse_sb, lse_sh;
  int64_t window_left;   // clamped to [−kWindowInf, kWindowInf]; None is kWindowInf
  int64_t window_right;  // likewise
  int seqlen_q;          // not varlen: Sq (varlen: the host's upper bound, unused on the device)
  int seqlen_k;          // not varlen: Sk
  int total_q;           // varlen: Tq, the clamp for the offsets read from cu_q
  int total_k;           // varlen: Tk
  int heads_k;
  int group;             // Hq / Hk: query head h reads kv head h / group
  int rows;              // decode: max_seqlen_q · group, the CTA's query rows (≤ 16)
  int splits;            // decode: splits of each (batch, kv head)'s keys; 1 writes out and lse directly
  float mult;            // log2(e)·scale, or log2(e)·softcap with the softcap: scores in log2 units
  float softcap_pre;     // scale / softcap (softcap kernels only)
};

// ---------------------------------------------------------------------------------------------------------------
// Device helpers: PTX wrappers.

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global → shared, bypassing L1 (each byte is read once per CTA). A row past the sequence's end copies 0
// bytes and zero-fills: padded keys then give finite scores (masked) and V rows of 0, so 0 · V stays 0.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a · b for one m16n8k16 tile, 16-bit inputs, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 2^x on the MUFU unit; 2^−inf = +0.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two floats rounded to T, the first in the low half: the register layout of an mma operand pair.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t u;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&u, &h, 4);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &h, 4);
  }
  return u;
}

__device__ __forceinline__ int clamp_diff(int64_t d) {
  return static_cast<int>(d < -kDiffClamp ? -kDiffClamp : (d > kDiffClamp ? kDiffClamp : d));
}

// ---------------------------------------------------------------------------------------------------------------
// Device helpers: sequences and masks.

// Where batch entry b's queries and keys are: the token offset of its first query and key (0 when not varlen: the
// batch stride places it) and the lengths. Offsets read from cu_seqlens are clamped into [0, total] and made
// non-decreasing, so no input makes a kernel read or write outside the tensors.
struct Seq {
  int64_t q_start;
  int64_t k_start;
  int sq;
  int sk;
};

__device__ __forceinline__ Seq seq_of(const AttnParams& p, int b) {
  if (p.cu_q == nullptr) return Seq{0, 0, p.seqlen_q, p.seqlen_k};
  const int q0 = min(max(__ldg(p.cu_q + b), 0), p.total_q);
  const int q1 = min(max(__ldg(p.cu_q + b + 1), q0), p.total_q);
  const int k0 = min(max(__ldg(p.cu_k + b), 0), p.total_k);
  const int k1 = min(max(__ldg(p.cu_k + b + 1), k0), p.total_k);
  return Seq{q0, k0, q1 - q0, k1 - k0};
}

// Varlen query tokens outside every sequence, before the first (cu_q[0] > 0) and after the last (cu_q[B] < Tq):
// queries that see no key, so out 0 and lse −inf, as a row with no visible key (issue 11). The CTAs of the first
// and the last sequence write them, for the heads [h0, h0 + n_heads): CTA `cta` of the `ctas` along grid x takes
// the rows cta, cta + ctas, …, so the range is covered whatever its length (it may pass max_seqlen_q). Called by
// every thread before the kernel's early return and its first barrier; no host sync, no memset of the output.
// The range ends come from seq_of's clamped offsets (the grid holds the whole batch: no chunked launches here).
template <int D>
__device__ __forceinline__ void write_outside_rows(const AttnParams& p, const Seq& seq, int b, int cta, int ctas,
                                                   int h0, int n_heads) {
  if (p.cu_q == nullptr) return;
  constexpr int kChunks = D / 8;  // 16-byte pieces of a row (out's rows are 16-byte aligned: check_rows16)
  const int64_t lo[2] = {0, seq.q_start + seq.sq};
  const int64_t hi[2] = {b == 0 ? seq.q_start : 0, b == static_cast<int>(gridDim.z) - 1 ? int64_t{p.total_q} : 0};
  const int threads = static_cast<int>(blockDim.x);
  const int tid = static_cast<int>(threadIdx.x);
  for (int part = 0; part < 2; ++part) {
    const int64_t first = lo[part] + cta;
    if (first >= hi[part]) continue;
    const int64_t n_rows = (hi[part] - first + ctas - 1) / ctas;  // this CTA's rows of the range
    const int64_t per_row = static_cast<int64_t>(n_heads) * (kChunks + 1);  // the row pieces, and one lse each
    for (int64_t e = tid; e < n_rows * per_row; e += threads) {
      const int64_t row = first + (e / per_row) * ctas;
      const int piece = static_cast<int>(e % per_row);
      if (piece < n_heads * kChunks) {
        const int h = h0 + piece / kChunks;
        __half* out = static_cast<__half*>(p.out) + row * p.o_ss + h * p.o_sh + (piece % kChunks) * 8;
        *reinterpret_cast<uint4*>(out) = make_uint4(0u, 0u, 0u, 0u);
      } else {
        const int h = h0 + piece - n_heads * kChunks;
        p.lse[h * p.lse_sh + row] = neg_inf();
      }
    }
  }
}

// Key j is visible to query i iff j < sk and lo_d ≤ j − i ≤ hi_d, with lo_d = (sk − sq) − window_left and
// hi_d = (sk − sq) + window_right, clamped (positions differ by less than 2^30, so the clamp changes no answer).
struct Band {
  int lo_d;
  int hi_d;
};

__device__ __forceinline__ Band band_of(const AttnParams& p, const Seq& s) {
  const int64_t off = static_cast<int64_t>(s.sk) - s.sq;
  return Band{clamp_diff(off - p.window_left), clamp_diff(off + p.window_right)};
}

// The keys [lo, hi) that some query row in [i_first, i_last] may see; empty when hi ≤ lo.
__device__ __forceinline__ void key_range(const AttnParams& p, const Seq& s, int i_first, int i_last, int& lo,
                                          int& hi) {
  const int64_t off = static_cast<int64_t>(s.sk) - s.sq;
  const int64_t sk = s.sk;
  const int64_t a = i_first + off - p.window_left;
  const int64_t z = i_last + off + p.window_right + 1;
  const int64_t lo64 = a < 0 ? 0 : (a > sk ? sk : a);
  lo = static_cast<int>(lo64);
  hi = static_cast<int>(z < lo64 ? lo64 : (z > sk ? sk : z));
}

// Whether every key of [n0, n0 + n) is visible to every row of [i_first, i_last]: then the tile needs no mask.
__device__ __forceinline__ bool tile_unmasked(const Band& band, int sk, int n0, int n, int i_first, int i_last) {
  return n0 + n <= sk && n0 - i_last >= band.lo_d && n0 + n - 1 - i_first <= band.hi_d;
}

// ---------------------------------------------------------------------------------------------------------------
// Device helpers: warp-level tiles. Fragment layouts of mma.m16n8k16 (lane = 4·g + t): A holds rows g and g + 8,
// columns 2t, 2t + 1 (+ 8); B holds column g, rows 2t, 2t + 1 (+ 8); C holds rows g and g + 8, columns 2t, 2t + 1.

// A 16 × D tile of 16-bit rows (pitch kPitch elements, at shared address `tile`) as D/16 A fragments.
template <int D, int kPitch>
__device__ __forceinline__ void load_a_frags(uint32_t (&a)[D / 16][4], uint32_t tile, int lane) {
  const uint32_t base = tile + static_cast<uint32_t>(((lane & 15) * kPitch + ((lane >> 4) << 3)) * 2);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(a[kk], base + kk * 32);
}

// The A fragments of Q a warp keeps in registers: all D/16, or none (a placeholder) when it re-reads them.
template <int D, bool kQInRegs>
constexpr int q_frag_count() {
  return kQInRegs ? D / 16 : 1;
}

// s = Q · K^T for the warp's 16 query rows and kN keys: K rows (keys) of D elements at shared address k_tile. One
// ldmatrix.x4 gives the B fragments of two 8-key column tiles for one 16-wide slice of D. Q comes from qf, or, when
// it is not kept in registers, from the warp's 16 rows at shared address q_rows.
template <typename T, int D, int kN, int kPitch, bool kQInRegs>
__device__ __forceinline__ void warp_qk(float (&s)[kN / 8][4], const uint32_t (&qf)[q_frag_count<D, kQInRegs>()][4],
                                        uint32_t q_rows, uint32_t k_tile, int lane) {
  const int key = (lane & 7) + ((lane >> 4) << 3);
  const int col = ((lane >> 3) & 1) << 3;
  const uint32_t base = k_tile + static_cast<uint32_t>((key * kPitch + col) * 2);
#pragma unroll
  for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
  }
  const uint32_t q_base = q_rows + static_cast<uint32_t>(((lane & 15) * kPitch + ((lane >> 4) << 3)) * 2);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    if constexpr (kQInRegs) {
#pragma unroll
      for (int e = 0; e < 4; ++e) a[e] = qf[kk][e];
    } else {
      ldmatrix_x4(a, q_base + kk * 32);
    }
#pragma unroll
    for (int n = 0; n < kN / 16; ++n) {
      uint32_t b[4];
      ldmatrix_x4(b, base + static_cast<uint32_t>((n * 16 * kPitch + kk * 16) * 2));
      mma_16816<T>(s[2 * n], a, b[0], b[1]);
      mma_16816<T>(s[2 * n + 1], a, b[2], b[3]);
    }
  }
}

// o += P · V for the warp's 16 rows: P as kN/16 A fragments over the keys, V rows (keys) of D elements at shared
// address v_tile, read transposed so that a B fragment holds one column of V (one d) over 16 keys.
template <typename T, int D, int kN, int kPitch>
__device__ __forceinline__ void warp_pv(float (&o)[D / 8][4], const uint32_t (&pf)[kN / 16][4], uint32_t v_tile,
                                        int lane) {
  const int key = (lane & 7) + (((lane >> 3) & 1) << 3);
  const int col = (lane >> 4) << 3;
  const uint32_t base = v_tile + static_cast<uint32_t>((key * kPitch + col) * 2);
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, base + static_cast<uint32_t>((kk * 16 * kPitch + n * 16) * 2));
      mma_16816<T>(o[2 * n], pf[kk], b[0], b[1]);
      mma_16816<T>(o[2 * n + 1], pf[kk], b[2], b[3]);
    }
  }
}

// Raw q·k to log2 units: s·scale·log2(e), or with the softcap tanh(s·scale/c)·c·log2(e) (c·tanh(scale·s/c) in
// natural units). Accurate tanhf: the approximate tanh's 2^−11 relative error, times a softcap of 30 or 50, would
// move scores by more than the 16-bit inputs do.
template <bool kSoftcap, int kN>
__device__ __forceinline__ void to_log2_scores(float (&s)[kN / 8][4], const AttnParams& p) {
#pragma unroll
  for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = s[nt][e];
      if constexpr (kSoftcap) x = tanhf(x * p.softcap_pre);
      s[nt][e] = x * p.mult;
    }
  }
}

// −inf for the scores of keys not visible: key n0 + column, rows i0 (C elements 0, 1) and i1 (elements 2, 3).
template <int kN>
__device__ __forceinline__ void mask_scores(float (&s)[kN / 8][4], const Band& band, int sk, int n0, int i0,
                                            int i1, int lane) {
  const int c0 = n0 + ((lane & 3) << 1);
#pragma unroll
  for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = c0 + nt * 8 + (e & 1);
      const int d = j - (e < 2 ? i0 : i1);
      if (j >= sk || d < band.lo_d || d > band.hi_d) s[nt][e] = neg_inf();
    }
  }
}

// One step of the online softmax for the thread's two rows: m is the running max (log2 units, −inf before any
// visible key), l this thread's share of the running sum (its columns only; the quad's shares are added once at
// the end). s becomes p = 2^(s − m), and alpha the factor that moves each row's earlier terms to the new max (the
// output's rescale, rescale_rows: separate so that the wgmma forward can rescale after the previous block's P·V,
// still running while this runs, has landed). A row that has seen only masked keys shifts by 0 instead of −inf,
// so that its p and its rescale factor are 2^−inf = 0 and never NaN.
template <int kN>
__device__ __forceinline__ void softmax_rows(float (&s)[kN / 8][4], float (&m)[2], float (&l)[2],
                                             float (&alpha)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = m[r];
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float shift = mx == neg_inf() ? 0.f : mx;
    alpha[r] = exp2_approx(m[r] - shift);
    m[r] = mx;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) {
      s[nt][2 * r] = exp2_approx(s[nt][2 * r] - shift);
      s[nt][2 * r + 1] = exp2_approx(s[nt][2 * r + 1] - shift);
      sum += s[nt][2 * r] + s[nt][2 * r + 1];
    }
    l[r] = l[r] * alpha[r] + sum;
  }
}

// The unnormalized output's rows times their factors (C elements 0, 1 are row 0, elements 2, 3 row 1).
template <int D>
__device__ __forceinline__ void rescale_rows(float (&o)[D / 8][4], const float (&alpha)[2]) {
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nt][e] *= alpha[e >> 1];
  }
}

// softmax_rows, then the output rescaled at once.
template <int kN, int D>
__device__ __forceinline__ void online_softmax(float (&s)[kN / 8][4], float (&o)[D / 8][4], float (&m)[2],
                                               float (&l)[2]) {
  float alpha[2];
  softmax_rows<kN>(s, m, l, alpha);
  rescale_rows<D>(o, alpha);
}

// P rounded to T as the A fragments of P · V: columns 16·kk .. 16·kk + 15 are C tiles 2·kk and 2·kk + 1.
template <typename T, int kN>
__device__ __forceinline__ void p_frags(uint32_t (&pf)[kN / 16][4], const float (&s)[kN / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {
    pf[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
    pf[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
    pf[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pf[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// Copies tiles of kRows rows of D 16-bit elements (row r at src + r·stride, one stride for every tile) into shared
// memory (pitch D + 8) with kThreads threads, 16 bytes a cp.async: the threads form kChunks-wide rows of a pass,
// a thread always copies the same column of rows r0, r0 + kRowsPerPass, ... Its offsets are computed once, so a
// tile costs one 64-bit add and a select per 16 bytes. Rows from `valid` on are zero-filled; their source address
// is `fallback` (any valid address; nothing is read from it).
template <int kRows, int D, int kThreads>
struct TileCopy {
  static constexpr int kChunks = D / 8;
  static constexpr int kRowsPerPass = kThreads / kChunks;
  static constexpr int kPasses = (kRows + kRowsPerPass - 1) / kRowsPerPass;
  static_assert(kRowsPerPass >= 1, "a pass covers at least one row");
  int r0;          // this thread's first row; kRows (copies nothing) for threads past the last whole row of a pass
  uint32_t soff;   // byte offset of (r0, its column) in the shared tile
  int64_t goff;    // element offset of (r0, its column) from the tile's first row
  int64_t step;    // kRowsPerPass rows, in elements

  __device__ __forceinline__ TileCopy(int tid, int64_t stride) {
    const int col = (tid % kChunks) * 8;
    r0 = tid < kRowsPerPass * kChunks ? tid / kChunks : kRows;
    soff = static_cast<uint32_t>((r0 * (D + 8) + col) * 2);
    goff = r0 * stride + col;
    step = kRowsPerPass * stride;
  }

  __device__ __forceinline__ void operator()(uint32_t dst, const __half* src, int valid, const void* fallback) const {
#pragma unroll
    for (int it = 0; it < kPasses; ++it) {
      const int r = r0 + it * kRowsPerPass;
      if ((kRows % kRowsPerPass == 0 && kThreads % kChunks == 0) || r < kRows) {
        const bool ok = r < valid;
        const void* g = ok ? static_cast<const void*>(src + goff + it * step) : fallback;
        cp_async16(dst + soff + static_cast<uint32_t>(it * kRowsPerPass * (D + 8) * 2), g, ok);
      }
    }
  }
};

// A warp's 16 rows of a D-column fp32 accumulator in mma's C layout go to global memory through the warp's own 16
// rows of `staging` (pitch D + 8; the caller has every other use of them behind a barrier), so that the global
// stores are whole 16-byte pieces of rows. stage_rows writes rows g + 8·r of the thread (times mul, rounded to T);
// flush_rows stores the 16 rows at dst (row i at dst + i·row_stride), rows from `valid` on left out.
template <typename T, int D>
__device__ __forceinline__ void stage_rows(T* staging, const float (&acc)[D / 8][4], int r, float mul, int lane) {
  const int g = lane >> 2;
  const int t2 = (lane & 3) << 1;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    const uint32_t w = pack2<T>(acc[nt][2 * r] * mul, acc[nt][2 * r + 1] * mul);
    memcpy(staging + (g + 8 * r) * (D + 8) + nt * 8 + t2, &w, 4);
  }
}

template <typename T, int D>
__device__ __forceinline__ void flush_rows(const T* staging, T* dst, int64_t row_stride, int valid, int lane) {
  __syncwarp();
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int it = 0; it < kMma * kChunks / 32; ++it) {
    const int c = lane + it * 32;
    const int r = c / kChunks;
    const int col = (c % kChunks) * 8;
    if (r < valid) {
      const uint4 piece = *reinterpret_cast<const uint4*>(staging + r * (D + 8) + col);
      *reinterpret_cast<uint4*>(dst + r * row_stride + col) = piece;
    }
  }
}

// Both row sets of the thread times `mul`, stored; the staging rows are free again on return.
template <typename T, int D>
__device__ __forceinline__ void store_warp_rows(T* staging, T* dst, int64_t row_stride, const float (&acc)[D / 8][4],
                                                float mul, int valid, int lane) {
  stage_rows<T, D>(staging, acc, 0, mul, lane);
  stage_rows<T, D>(staging, acc, 1, mul, lane);
  flush_rows<T, D>(staging, dst, row_stride, valid, lane);
  __syncwarp();
}

// The forward kernels' epilogue for a warp's 16 query rows (rows 16·warp on of the CTA's, staged in rows 16·warp on
// of `staging`): O / l, and the rows' lse. (Not through stage_rows and flush_rows: it is the FlashAttention-2
// kernel's own epilogue, kept instruction for instruction as that kernel was measured on the GPU.)
template <typename T, int D>
__device__ __forceinline__ void write_rows(const AttnParams& p, const Seq& seq, T* staging, const float (&o)[D / 8][4],
                                           const float (&m)[2], float (&l)[2], int b, int h, int m0, int m_last,
                                           int warp, int lane) {
  constexpr int kPitch = D + 8;
  T* stage = staging + warp * kMma * kPitch;
  const int g = lane >> 2;
  const int t2 = (lane & 3) << 1;
  const int i0 = m0 + warp * kMma + g;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    // A row that saw no visible key has l = 0: its output is exactly 0 and its lse −inf.
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      const uint32_t w = pack2<T>(o[nt][2 * r] * inv, o[nt][2 * r + 1] * inv);
      memcpy(stage + (g + 8 * r) * kPitch + nt * 8 + t2, &w, 4);
    }
    const int i = i0 + 8 * r;
    if ((lane & 3) == 0 && i <= m_last) {
      p.lse[b * p.lse_sb + h * p.lse_sh + seq.q_start + i] = l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : neg_inf();
    }
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + b * p.o_sb + (seq.q_start + m0 + warp * kMma) * p.o_ss + h * p.o_sh;
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int it = 0; it < kMma * kChunks / 32; ++it) {
    const int c = lane + it * 32;
    const int r = c / kChunks;
    const int col = (c % kChunks) * 8;
    if (m0 + warp * kMma + r <= m_last) {
      *reinterpret_cast<uint4*>(out + r * p.o_ss + col) = *reinterpret_cast<const uint4*>(stage + r * kPitch + col);
    }
  }
}

// What a CTA over one block of query rows works on (the forward kernels and the backward's dQ kernel: grid
// (query blocks, Hq, B), the heaviest blocks, the last ones under a causal mask, first): its head and batch entry
// and its first row m0 of the sequence (the constructor; m0 ≥ seq.sq: the CTA has no rows), then, from locate(),
// its last row, the kv head, the band, the blocks of kN keys [n_begin, n_end) some row may see, and the pointers
// to its rows and to its kv head's keys (16-bit rows: the element type only sets byte offsets, so one pointer type
// serves fp16 and bf16). The forward kernels write the varlen rows outside every sequence in between (kOutside).
template <int D, int kRows, int kN, bool kOutside>
struct QueryBlock {
  int h, b, m0;
  Seq seq;
  int m_last, hk, n_begin, n_end;
  Band band;
  const __half* q;  // row m0
  const __half* k;  // the sequence's first key
  const __half* v;

  __device__ __forceinline__ explicit QueryBlock(const AttnParams& p) {
    h = static_cast<int>(blockIdx.y);
    b = static_cast<int>(blockIdx.z);
    seq = seq_of(p, b);
    if constexpr (kOutside) {
      write_outside_rows<D>(p, seq, b, static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x), h, 1);
    }
    m0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * kRows;
  }

  __device__ __forceinline__ void locate(const AttnParams& p) {
    m_last = min(m0 + kRows, seq.sq) - 1;
    hk = h / p.group;
    band = band_of(p, seq);
    int key_lo, key_hi;
    key_range(p, seq, m0, m_last, key_lo, key_hi);
    n_begin = key_lo / kN;
    n_end = key_hi > key_lo ? (key_hi + kN - 1) / kN : n_begin;
    q = static_cast<const __half*>(p.q) + b * p.q_sb + (seq.q_start + m0) * p.q_ss + h * p.q_sh;
    k = static_cast<const __half*>(p.k) + b * p.k_sb + seq.k_start * p.k_ss + hk * p.k_sh;
    v = static_cast<const __half*>(p.v) + b * p.v_sb + seq.k_start * p.v_ss + hk * p.v_sh;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Forward kernel (FlashAttention-2): grid (query blocks, Hq, B), the heaviest query blocks (the last ones, under a
// causal mask) first.

template <typename T, int D, bool kSoftcap>
__global__ void __launch_bounds__(FwdConfig<D>::kThreads, 1) attn_fwd_kernel(const AttnParams p) {
  using C = FwdConfig<D>;
  constexpr int kN = C::kBlockN;
  constexpr int kPitch = C::kPitch;
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  const int lane = tid & 31;
  QueryBlock<D, C::kBlockM, kN, true> blk(p);
  if (blk.m0 >= blk.seq.sq) return;
  blk.locate(p);
  const Seq& seq = blk.seq;
  const int h = blk.h, b = blk.b, m0 = blk.m0, m_last = blk.m_last, n_begin = blk.n_begin, n_end = blk.n_end;
  const Band band = blk.band;
  const __half *q = blk.q, *k = blk.k, *v = blk.v;
  const uint32_t stage0 = smem_u32(smem);
  auto k_tile = [&](int stage) { return stage0 + static_cast<uint32_t>(stage * C::kStageBytes); };
  auto v_tile = [&](int stage) { return k_tile(stage) + static_cast<uint32_t>(C::kTileElems * 2); };
  const TileCopy<kN, D, C::kThreads> copy_k(tid, p.k_ss);
  const TileCopy<kN, D, C::kThreads> copy_v(tid, p.v_ss);
  auto load_kv = [&](int stage, int nb) {
    const int n0 = nb * kN;
    copy_k(k_tile(stage), k + n0 * p.k_ss, seq.sk - n0, p.k);
    copy_v(v_tile(stage), v + n0 * p.v_ss, seq.sk - n0, p.v);
  };

  // Q goes to stage 1 (free until the first prefetch) or its own place, the first K/V block to stage 0.
  const uint32_t q_rows = stage0 + static_cast<uint32_t>(C::kQOffset + warp * kMma * kPitch * 2);
  TileCopy<C::kBlockM, D, C::kThreads>(tid, p.q_ss)(stage0 + C::kQOffset, q, m_last + 1 - m0, p.q);
  cp_async_commit();
  if (n_begin < n_end) load_kv(0, n_begin);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
  uint32_t qf[q_frag_count<D, C::kQInRegs>()][4];
  if constexpr (C::kQInRegs) {
    load_a_frags<D, kPitch>(qf, q_rows, lane);
    __syncthreads();
  }

  float o[D / 8][4];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nt][e] = 0.f;
  }
  float m[2] = {neg_inf(), neg_inf()};
  float l[2] = {0.f, 0.f};
  const int i0 = m0 + warp * kMma + (lane >> 2);

  for (int nb = n_begin; nb < n_end; ++nb) {
    const int stage = (nb - n_begin) & 1;
    if (nb + 1 < n_end) load_kv(stage ^ 1, nb + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    float s[kN / 8][4];
    warp_qk<T, D, kN, kPitch, C::kQInRegs>(s, qf, q_rows, k_tile(stage), lane);
    to_log2_scores<kSoftcap, kN>(s, p);
    const int n0 = nb * kN;
    if (!tile_unmasked(band, seq.sk, n0, kN, m0, m_last)) mask_scores<kN>(s, band, seq.sk, n0, i0, i0 + 8, lane);
    online_softmax<kN, D>(s, o, m, l);
    uint32_t pf[kN / 16][4];
    p_frags<T, kN>(pf, s);
    warp_pv<T, D, kN, kPitch>(o, pf, v_tile(stage), lane);
    __syncthreads();
  }

  write_rows<T, D>(p, seq, reinterpret_cast<T*>(smem), o, m, l, b, h, m0, m_last, warp, lane);
}

// ---------------------------------------------------------------------------------------------------------------
// Hopper forward kernel (attn_fwd_wgmma_kernel, sm_90a): the same algorithm, masks and epilogue as attn_fwd_kernel,
// with both products on wgmma (warpgroup-wide asynchronous MMA, 64 rows a warp group) instead of mma.sync. Off
// unless the caller asks for it (fastlm/_cuda.py's ATTN_HOPPER, until the benchmark has timed it against the
// FlashAttention-2 kernel on the GPU), for head dims 64, 128 and 256, on devices of compute capability 9.0 in a
// build with sm_90a code (attention_hopper_supported).
//
// - Two warp groups (256 threads), 64 query rows each: kBlockM = 128, kBlockN = 128 keys a block (64 at D = 256,
//   where O alone is 128 fp32 registers a thread). Warp w holds
//   rows 16·w + lane/4 (+ 8) of the CTA's 128, as in attn_fwd_kernel, because wgmma's m64nNk16 accumulator gives
//   each warp of the group 16 rows in exactly mma.m16n8k16's C layout (an 8-column tile after another), and its A
//   operand from registers takes mma.m16n8k16's A layout: the masking, the online softmax, P's conversion to A
//   fragments and the epilogue are attn_fwd_kernel's own helpers.
// - S = Q·Kᵀ: Q (A) and K (B) from shared memory, both K-major (head dim contiguous), D/16 instructions of
//   m64n128k16. O += P·V: P (A) from registers, V (B) from shared memory MN-major (its head dim contiguous, keys
//   the reduction): the transposed-B form, kBlockN/16 instructions of m64nDk16. Each product is one commit group.
//   Two forms of the loop (the kOverlap template argument; fastlm/_cuda.py's ATTN_HOPPER_FWD picks one until
//   the benchmark has timed both):
//   - serial: each product waited for before its result is read; only the two warp groups, and the cp.async
//     prefetch of the next block, overlap the softmax with the tensor cores.
//   - overlapped (FlashAttention-3's intra-warpgroup pipelining): S = Q·K(j)ᵀ and O += P(j − 1)·V(j − 1) issued back
//     to back, the softmax of block j computed while the second runs, O rescaled once it has landed. V runs a
//     block behind K in the stages, and the loop's P·V wait opens the next iteration (see the kernel). Registers:
//     P of the previous block stays live through the softmax (kBlockN/4 more): 167, 222 and 254 at D = 64, 128,
//     256 against 164, 186 and 206, no spills. The static report requires an exp2 between an HGMMA and the next
//     wait for all groups in these builds' SASS (ptxas otherwise moves the wait above the softmax).
// - Tiles in shared memory in wgmma's 128-byte swizzle (swizzled_offset): a tile of R rows is D/64 column blocks of
//   R rows × 128 bytes, and 16-byte chunk c of row r is stored at chunk c XOR (r mod 8) of its row: the 8 rows of a
//   1024-byte atom spread over all 32 banks, for cp.async's writes and wgmma's reads alike. Descriptors
//   (wgmma_desc): K-major, 1024 bytes between 8-row groups (the leading offset is unused), one instruction's 16
//   columns inside a 128-byte row (32 bytes further each step, the next column block after 4 steps); MN-major (V),
//   1024 bytes between 8-key groups, R·128 bytes between 64-column blocks (unused, 0, at D = 64), 2048 bytes (16
//   keys) further each step.
//   These are the layouts and descriptors Triton 3.6 builds for the same tiles (its compiled attention runs on the
//   H200): the static_asserts below hold the constants it emits.
// - cp.async (16 bytes, zero-filled past the sequence) fills two stages of (K, V) and the Q tile; a thread's
//   copies are made visible to wgmma (the async proxy) by fence.proxy.async before the block's barrier.
// - Shared memory: Q 128·D·2 bytes + 2 stages × 2 tiles × kBlockN·D·2 + 1024 (the base rounded up to a 1024-byte
//   atom): 161 KB at D = 128, 81 KB at D = 64; 193 KB at D = 256 with its 64-key blocks (sm_90's 227 KB a block).
//   Registers: S kBlockN/2 + O D/2 + P kBlockN/4 fp32/b32.
template <int D>
struct WgmmaFwdConfig {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = D > 128 ? 64 : 128;  // D = 256: S 32 fp32 next to O's 128
  static constexpr int kWarps = kBlockM / kMma;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kQBytes = kBlockM * D * 2;
  static constexpr int kTileBytes = kBlockN * D * 2;  // one K or V tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kSmemBytes = kQBytes + 2 * kStageBytes + 1024;
  static_assert(D % 64 == 0, "the swizzled tiles are whole 64-column (128-byte) blocks");
  static_assert(kQBytes % 1024 == 0 && kTileBytes % 1024 == 0, "every swizzled tile starts on a 1024-byte atom");
  static_assert(kBlockM * (D + 8) * 2 <= kQBytes + 2 * kStageBytes, "the epilogue's staging fits");
  static_assert(kBlockM * (D + 8) * 2 <= kQBytes + kTileBytes,
                "the epilogue's staging ends before the first V tile (the overlapped loop's last P·V may still read V)");
};

// Whether the Hopper kernels exist for head dim D: the forward's, and the backward's (whose dK and dV accumulators
// would not fit the registers at 256).
constexpr bool hopper_head_dim(int64_t d) { return d == 64 || d == 128 || d == 256; }
constexpr bool hopper_bwd_head_dim(int64_t d) { return d == 64 || d == 128; }
constexpr bool ws_head_dim(int64_t d) { return d == 64 || d == 128; }  // the warp-specialized forward's

// Byte offset of 16-byte chunk `chunk` (columns 8·chunk .. 8·chunk + 7) of row r in a swizzled tile of `rows` rows.
constexpr uint32_t swizzled_offset(int rows, int r, int chunk) {
  return static_cast<uint32_t>((chunk / 8) * rows * 128 + r * 128 + (((chunk % 8) ^ (r % 8)) << 4));
}

// The 128-byte swizzle as wgmma applies it to a shared address (byte offset bits 4–6 XOR bits 7–9), which the
// layout above must equal inside a 1024-byte-aligned column block.
constexpr uint32_t swizzle128(uint32_t offset) { return offset ^ (((offset >> 7) & 7u) << 4); }
static_assert(swizzled_offset(128, 0, 0) == swizzle128(0) &&
                  swizzled_offset(128, 5, 3) == swizzle128(5 * 128 + 3 * 16) &&
                  swizzled_offset(128, 13, 7) == swizzle128(13 * 128 + 7 * 16) &&
                  swizzled_offset(64, 9, 10) == 64 * 128 + swizzle128(9 * 128 + 2 * 16),
              "the tile layout is the 128-byte swizzle, column block after column block");

// A wgmma shared-memory matrix descriptor: start address, leading and stride byte offsets (16-byte units, 14 bits
// each), the 128-byte swizzle (mode 1 in bits 62–63), base offset 0 (every atom is 1024-byte aligned).
__host__ __device__ constexpr uint64_t wgmma_desc(uint32_t addr, uint32_t leading, uint32_t stride) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>((leading >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((stride >> 4) & 0x3FFFu) << 32) | (uint64_t{1} << 62);
}
// Triton 3.6 at sm_90a, for a 128 × 128 16-bit tile at shared address 0: 4611686293305294848 for a K-major operand
// (Q, K), 4611686293372403712 for the MN-major B of P·V (V).
static_assert(wgmma_desc(0, 0, 1024) == 4611686293305294848ull, "K-major descriptor");
static_assert(wgmma_desc(0, 128 * 128, 1024) == 4611686293372403712ull, "MN-major descriptor");

// Copies a tile of kRows rows of D 16-bit elements (row r at src + r·stride) into the swizzled layout with kThreads
// threads, 16 bytes a cp.async, as TileCopy does for the padded one: a thread copies one chunk column of rows
// r0, r0 + kRowsPerPass, …; kRowsPerPass is a multiple of 8, so every row a thread copies has the same r mod 8
// and its swizzled offset moves by a whole number of rows each pass. Rows from `valid` on are zero-filled.
template <int kRows, int D, int kThreads>
struct SwizzledTileCopy {
  static constexpr int kChunks = D / 8;
  static constexpr int kRowsPerPass = kThreads / kChunks;
  static constexpr int kPasses = kRows / kRowsPerPass;
  static_assert(kThreads % kChunks == 0 && kRowsPerPass % 8 == 0 && kRows % kRowsPerPass == 0,
                "whole rows a pass, whole 8-row swizzle atoms a pass, whole passes a tile");
  int r0;
  uint32_t soff;
  int64_t goff;
  int64_t step;

  __device__ __forceinline__ SwizzledTileCopy(int tid, int64_t stride) {
    const int chunk = tid % kChunks;
    r0 = tid / kChunks;
    soff = swizzled_offset(kRows, r0, chunk);
    goff = r0 * stride + chunk * 8;
    step = kRowsPerPass * stride;
  }

  __device__ __forceinline__ void operator()(uint32_t dst, const __half* src, int valid, const void* fallback) const {
#pragma unroll
    for (int it = 0; it < kPasses; ++it) {
      const bool ok = r0 + it * kRowsPerPass < valid;
      const void* g = ok ? static_cast<const void*>(src + goff + it * step) : fallback;
      cp_async16(dst + soff + static_cast<uint32_t>(it * kRowsPerPass * 128), g, ok);
    }
  }
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FASTLM_WGMMA 1

// The shared address of the dynamic shared memory rounded up to a 1024-byte swizzle atom (the kernels' kSmemBytes
// reserve the 1024 bytes): the swizzle is a function of the address, so every tile starts on an atom.
__device__ __forceinline__ uint32_t atom_base(const unsigned char* smem) {
  return (smem_u32(smem) + 1023u) & ~1023u;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Writes to shared memory by the generic proxy (cp.async, st.shared) become visible to wgmma's reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Pins wgmma's register operands at this point for the compiler (its volatile asm keep their order): after a wait,
// no read of the accumulators moves above it; before wgmma.fence, no write to them or to A's registers moves below.
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
  }
}

template <int N>
__device__ __forceinline__ void fence_operands(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[j][e])::"memory");
  }
}

// The accumulator operands of one instruction: 32 or 64 fp32 registers, d[j][e] the e-th of 8-column tile j.
#define FASTLM_WGMMA_D32                                                                                            \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29," \
  "%30,%31}"
#define FASTLM_WGMMA_D64                                                                                            \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29," \
  "%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,"    \
  "%57,%58,%59,%60,%61,%62,%63}"
#define FASTLM_WGMMA_TILE(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define FASTLM_WGMMA_ACC32                                                                                          \
  FASTLM_WGMMA_TILE(0), FASTLM_WGMMA_TILE(1), FASTLM_WGMMA_TILE(2), FASTLM_WGMMA_TILE(3), FASTLM_WGMMA_TILE(4),     \
      FASTLM_WGMMA_TILE(5), FASTLM_WGMMA_TILE(6), FASTLM_WGMMA_TILE(7)
#define FASTLM_WGMMA_ACC64                                                                                          \
  FASTLM_WGMMA_ACC32, FASTLM_WGMMA_TILE(8), FASTLM_WGMMA_TILE(9), FASTLM_WGMMA_TILE(10), FASTLM_WGMMA_TILE(11),     \
      FASTLM_WGMMA_TILE(12), FASTLM_WGMMA_TILE(13), FASTLM_WGMMA_TILE(14), FASTLM_WGMMA_TILE(15)
// The element types of the instruction: ".f16.f16" or ".bf16.bf16".
#define FASTLM_WGMMA_D128                                                                                            \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,"      \
  "%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,"     \
  "%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,"     \
  "%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,"     \
  "%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}"
#define FASTLM_WGMMA_ACC128                                                                                         \
  FASTLM_WGMMA_ACC64, FASTLM_WGMMA_TILE(16), FASTLM_WGMMA_TILE(17), FASTLM_WGMMA_TILE(18), FASTLM_WGMMA_TILE(19),   \
      FASTLM_WGMMA_TILE(20), FASTLM_WGMMA_TILE(21), FASTLM_WGMMA_TILE(22), FASTLM_WGMMA_TILE(23),                   \
      FASTLM_WGMMA_TILE(24), FASTLM_WGMMA_TILE(25), FASTLM_WGMMA_TILE(26), FASTLM_WGMMA_TILE(27),                   \
      FASTLM_WGMMA_TILE(28), FASTLM_WGMMA_TILE(29), FASTLM_WGMMA_TILE(30), FASTLM_WGMMA_TILE(31)
#define FASTLM_WGMMA_SS64(TY)                                                                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\nwgmma.mma_async.sync.aligned.m64n64k16.f32" TY " "      \
               FASTLM_WGMMA_D32 ", %32, %33, p, 1, 1, 0, 0;\n}\n"                                                   \
               : FASTLM_WGMMA_ACC32                                                                                 \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))
#define FASTLM_WGMMA_SS128(TY)                                                                                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\nwgmma.mma_async.sync.aligned.m64n128k16.f32" TY " "     \
               FASTLM_WGMMA_D64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                                   \
               : FASTLM_WGMMA_ACC64                                                                                 \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))
#define FASTLM_WGMMA_RS64(TY)                                                                                       \
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32" TY " " FASTLM_WGMMA_D32                                 \
               ", {%32,%33,%34,%35}, %36, 1, 1, 1, 1;\n"                                                            \
               : FASTLM_WGMMA_ACC32                                                                                 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))
#define FASTLM_WGMMA_RS128(TY)                                                                                      \
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32" TY " " FASTLM_WGMMA_D64                                \
               ", {%64,%65,%66,%67}, %68, 1, 1, 1, 1;\n"                                                            \
               : FASTLM_WGMMA_ACC64                                                                                 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))
#define FASTLM_WGMMA_RS256(TY)                                                                                      \
  asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32" TY " " FASTLM_WGMMA_D128                               \
               ", {%128,%129,%130,%131}, %132, 1, 1, 1, 1;\n"                                                       \
               : FASTLM_WGMMA_ACC128                                                                                \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))

// d (64 × N, fp32) = A·B, + d when `accumulate`: A (64 × 16) and B (N × 16) K-major in shared memory.
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  static_assert(N == 64 || N == 128, "instances for 64 and 128 columns");
  if constexpr (N == 64 && std::is_same_v<T, __half>) {
    FASTLM_WGMMA_SS64(".f16.f16");
  } else if constexpr (N == 64) {
    FASTLM_WGMMA_SS64(".bf16.bf16");
  } else if constexpr (std::is_same_v<T, __half>) {
    FASTLM_WGMMA_SS128(".f16.f16");
  } else {
    FASTLM_WGMMA_SS128(".bf16.bf16");
  }
}

// d (64 × N, fp32) += A·B: A (64 × 16) from registers in mma.m16n8k16's A layout per warp, B (16 × N) MN-major in
// shared memory (N contiguous: the transposed-B form).
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  static_assert(N == 64 || N == 128 || N == 256, "instances for head dims 64, 128 and 256");
  if constexpr (N == 64 && std::is_same_v<T, __half>) {
    FASTLM_WGMMA_RS64(".f16.f16");
  } else if constexpr (N == 64) {
    FASTLM_WGMMA_RS64(".bf16.bf16");
  } else if constexpr (N == 128 && std::is_same_v<T, __half>) {
    FASTLM_WGMMA_RS128(".f16.f16");
  } else if constexpr (N == 128) {
    FASTLM_WGMMA_RS128(".bf16.bf16");
  } else if constexpr (std::is_same_v<T, __half>) {
    FASTLM_WGMMA_RS256(".f16.f16");
  } else {
    FASTLM_WGMMA_RS256(".bf16.bf16");
  }
}

// acc (64 × kN) = A·Bᵀ over the head dim, issued as one commit group (not waited for): A the warp group's 64 rows
// (a_row0 on) of a swizzled tile of kRowsA rows, B a swizzled tile of kN rows, both K-major (the head dim
// contiguous): S = Q·Kᵀ, dP = dO·Vᵀ, Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ.
template <typename T, int D, int kRowsA, int kN>
__device__ __forceinline__ void issue_abt(float (&acc)[kN / 8][4], uint32_t a_tile, int a_row0, uint32_t b_tile) {
  fence_operands(acc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t col = static_cast<uint32_t>((kk % 4) * 32);  // 16 columns of a 128-byte row
    const uint64_t a = wgmma_desc(a_tile + (kk / 4) * kRowsA * 128 + a_row0 * 128 + col, 0, 1024);
    const uint64_t b = wgmma_desc(b_tile + (kk / 4) * kN * 128 + col, 0, 1024);
    wgmma_ss<T, kN>(acc, a, b, kk > 0);
  }
  wgmma_commit();
}

// acc (64 × D) += A·B, issued as one commit group: A (64 × kK) as kK/16 register fragments, B a swizzled tile of
// kK rows × D (its D columns contiguous, MN-major: the transposed B): O += P·V, dQ += dS·K, dV += Pᵀ·dO,
// dK += dSᵀ·Q.
template <typename T, int D, int kK>
__device__ __forceinline__ void issue_ab(float (&acc)[D / 8][4], uint32_t (&frags)[kK / 16][4], uint32_t b_tile) {
  // Rescales and packs are register writes the compiler could otherwise sink past wgmma.fence.
  fence_operands(acc);
  fence_operands(frags);
  wgmma_fence();
  // The next 64-column block of B is kK rows further; at D = 64 there is none (unused, 0 as Triton has it).
  constexpr uint32_t kLeading = D > 64 ? kK * 128 : 0;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    wgmma_rs<T, D>(acc, frags[kk], wgmma_desc(b_tile + kk * 16 * 128, kLeading, 1024));
  }
  wgmma_commit();
}

// Waits until at most N of this warp group's commit groups are pending (they complete in order).
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// issue_abt, then its result.
template <typename T, int D, int kRowsA, int kN>
__device__ __forceinline__ void warpgroup_abt(float (&acc)[kN / 8][4], uint32_t a_tile, int a_row0, uint32_t b_tile) {
  issue_abt<T, D, kRowsA, kN>(acc, a_tile, a_row0, b_tile);
  wgmma_wait<0>();
  fence_operands(acc);
}

// issue_ab, then its result.
template <typename T, int D, int kK>
__device__ __forceinline__ void warpgroup_ab(float (&acc)[D / 8][4], uint32_t (&frags)[kK / 16][4], uint32_t b_tile) {
  issue_ab<T, D, kK>(acc, frags, b_tile);
  wgmma_wait<0>();
  fence_operands(acc);
}
#endif  // sm_90a

#ifdef FASTLM_WGMMA
// A Hopper forward's per-thread state and steps for its warp group's 64 rows (thread rows i0, i0 + 8): the output,
// the softmax's running max and sum, the scores (then P, fp32) of the last block, P packed as the A operand of its
// P·V, and the rescale factors. attn_fwd_wgmma_kernel's loops and attn_fwd_ws_kernel's share it; they differ only
// in how the tiles arrive and are released. kRowsA: the rows of the Q tile the warp group's rows sit in.
template <typename T, int D, int kN, int kRowsA, bool kSoftcap>
struct ForwardRows {
  float o[D / 8][4];
  float m[2] = {neg_inf(), neg_inf()};
  float l[2] = {0.f, 0.f};
  float s[kN / 8][4];       // the scores, then P (fp32) of the block whose softmax ran last
  float alpha[2];           // and its rescale factors for O
  uint32_t pf[kN / 16][4];  // P of the previous block, the A operand of its P·V
  const AttnParams& p;
  const Band band;
  const int sk, m0, m_last, i0, lane;

  __device__ __forceinline__ ForwardRows(const AttnParams& p_, const Band& band_, int sk_, int m0_, int m_last_,
                                         int i0_, int lane_)
      : p(p_), band(band_), sk(sk_), m0(m0_), m_last(m_last_), i0(i0_), lane(lane_) {
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[nt][e] = 0.f;
    }
  }

  // S = Q·K(nb)ᵀ for the warp group's rows (a_row0 on), issued with no P·V in flight (issue_scores), then waited
  // for (wait_first_scores); scores_of does both.
  __device__ __forceinline__ void issue_scores(uint32_t q_tile, int a_row0, uint32_t k_tile) {
    issue_abt<T, D, kRowsA, kN>(s, q_tile, a_row0, k_tile);
  }

  __device__ __forceinline__ void wait_first_scores() {
    wgmma_wait<0>();
    fence_operands(s);
  }

  __device__ __forceinline__ void scores_of(uint32_t q_tile, int a_row0, uint32_t k_tile) {
    issue_scores(q_tile, a_row0, k_tile);
    wait_first_scores();
  }

  // Block nb's scores (landed in s) in log2 units, masked where the mask reaches into the block, and their softmax:
  // P in s, the running max and sum updated, alpha the factors that move O to the new max.
  __device__ __forceinline__ void softmax(int nb) {
    to_log2_scores<kSoftcap, kN>(s, p);
    const int n0 = nb * kN;
    if (!tile_unmasked(band, sk, n0, kN, m0, m_last)) mask_scores<kN>(s, band, sk, n0, i0, i0 + 8, lane);
    softmax_rows<kN>(s, m, l, alpha);
  }

  // O to the new max and P packed for its P·V (O and P's registers free: no P·V in flight).
  __device__ __forceinline__ void stage_pv() {
    rescale_rows<D>(o, alpha);
    p_frags<T, kN>(pf, s);
  }

  // The overlapped step: S = Q·K(nb)ᵀ and the staged O += P·V (V's tile v_tile) issued back to back (issue_pair),
  // then S waited for (wait_scores). The warp-specialized kernel's pingpong hands its turn over between the two.
  __device__ __forceinline__ void issue_pair(uint32_t q_tile, int a_row0, uint32_t k_tile, uint32_t v_tile) {
    issue_abt<T, D, kRowsA, kN>(s, q_tile, a_row0, k_tile);
    issue_ab<T, D, kN>(o, pf, v_tile);
  }

  __device__ __forceinline__ void wait_scores() {
    wgmma_wait<1>();  // S (the older group) has landed; P·V may still run
    fence_operands(s);
  }

  __device__ __forceinline__ void issue_overlapped(uint32_t q_tile, int a_row0, uint32_t k_tile, uint32_t v_tile) {
    issue_pair(q_tile, a_row0, k_tile, v_tile);
    wait_scores();
  }

  // The P·V in flight has landed: O and P's registers are the program's again.
  __device__ __forceinline__ void wait_pv() {
    wgmma_wait<0>();
    fence_operands(o);
    fence_operands(pf);  // P's registers stay P's until the product that reads them has landed
  }

  // O += P·V of the staged P, waited for.
  __device__ __forceinline__ void pv(uint32_t v_tile) { warpgroup_ab<T, D, kN>(o, pf, v_tile); }
};
#endif  // FASTLM_WGMMA

// Grid (query blocks, Hq, B) as attn_fwd_kernel's, the heaviest query blocks first. kOverlap: the loop form (see
// WgmmaFwdConfig's notes), serial or with a block's softmax overlapping the previous block's P·V.
template <typename T, int D, bool kSoftcap, bool kOverlap>
__global__ void __launch_bounds__(WgmmaFwdConfig<D>::kThreads, 1) attn_fwd_wgmma_kernel(const AttnParams p) {
#ifdef FASTLM_WGMMA
  using C = WgmmaFwdConfig<D>;
  constexpr int kN = C::kBlockN;
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t base = atom_base(smem);
  unsigned char* aligned = smem + (base - smem_u32(smem));

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  const int lane = tid & 31;
  QueryBlock<D, C::kBlockM, kN, true> blk(p);
  if (blk.m0 >= blk.seq.sq) return;
  blk.locate(p);
  const Seq& seq = blk.seq;
  const int h = blk.h, b = blk.b, m0 = blk.m0, m_last = blk.m_last, n_begin = blk.n_begin, n_end = blk.n_end;
  const Band band = blk.band;
  const __half *q = blk.q, *k = blk.k, *v = blk.v;
  const uint32_t q_tile = base;
  auto k_tile = [&](int stage) { return base + static_cast<uint32_t>(C::kQBytes + stage * C::kStageBytes); };
  auto v_tile = [&](int stage) { return k_tile(stage) + static_cast<uint32_t>(C::kTileBytes); };
  const SwizzledTileCopy<kN, D, C::kThreads> copy_k(tid, p.k_ss);
  const SwizzledTileCopy<kN, D, C::kThreads> copy_v(tid, p.v_ss);
  auto load_k = [&](int stage, int nb) { copy_k(k_tile(stage), k + nb * kN * p.k_ss, seq.sk - nb * kN, p.k); };
  auto load_v = [&](int stage, int nb) { copy_v(v_tile(stage), v + nb * kN * p.v_ss, seq.sk - nb * kN, p.v); };
  SwizzledTileCopy<C::kBlockM, D, C::kThreads>(tid, p.q_ss)(q_tile, q, m_last + 1 - m0, p.q);
  cp_async_commit();
  if (n_begin < n_end) {
    load_k(0, n_begin);
    if constexpr (!kOverlap) load_v(0, n_begin);
  }
  cp_async_commit();

  const int wg = warp / 4;
  ForwardRows<T, D, kN, C::kBlockM, kSoftcap> r(p, band, seq.sk, m0, m_last, m0 + warp * kMma + (lane >> 2), lane);

  if constexpr (!kOverlap) {
    for (int nb = n_begin; nb < n_end; ++nb) {
      const int stage = (nb - n_begin) & 1;
      if (nb + 1 < n_end) {
        load_k(stage ^ 1, nb + 1);
        load_v(stage ^ 1, nb + 1);
      }
      cp_async_commit();
      cp_async_wait<1>();  // Q and this block's K and V are in (the next block's may still be on their way)
      fence_proxy_async();
      __syncthreads();
      r.scores_of(q_tile, 64 * wg, k_tile(stage));
      r.softmax(nb);
      r.stage_pv();
      r.pv(v_tile(stage));
      __syncthreads();  // every read of this stage is done before the next iteration's prefetch overwrites it
    }
    // With no key block at all the Q copy may still be in flight, into memory the staging below reuses.
    cp_async_wait<0>();
    __syncthreads();
  } else {
    // V runs a block behind K, and each block's softmax runs while the previous block's P·V is on the tensor
    // cores. The iteration of block nb (after the first):
    //   wait for P(nb − 2)·V(nb − 2); a barrier: every warp group is done with K(nb − 1) and V(nb − 2);
    //   prefetch K(nb + 1) and V(nb) into their stages; wait for K(nb) and V(nb − 1); a barrier;
    //   O rescaled and P(nb − 1) packed (the last iteration's softmax); issue S = Q·K(nb)ᵀ, then
    //   O += P(nb − 1)·V(nb − 1); wait for S alone; the scores and softmax of block nb, with P·V in flight.
    // The wait for P·V opens the next iteration rather than closing this one: ptxas hoists a wgmma wait to the top
    // of its basic block, so a wait placed after the softmax would run before it (no overlap; the static report
    // checks the SASS for it). The first block (no P·V before it) and the last P·V are peeled off the loop, so
    // that every product is waited for on every path: ptxas serializes the wgmma pipeline (C7513) when a product
    // issued under a condition is waited for under another.
    auto prefetch = [&](int nb) {  // and wait for Q, K(nb), V(nb − 1)
      const int stage = (nb - n_begin) & 1;
      if (nb + 1 < n_end) load_k(stage ^ 1, nb + 1);
      load_v(stage, nb);
      cp_async_commit();
      cp_async_wait<1>();
      fence_proxy_async();
      __syncthreads();
    };
    if (n_begin < n_end) {
      prefetch(n_begin);
      r.scores_of(q_tile, 64 * wg, k_tile(0));
      r.softmax(n_begin);
      for (int nb = n_begin + 1; nb < n_end; ++nb) {
        const int stage = (nb - n_begin) & 1;
        r.wait_pv();
        __syncthreads();  // K(nb − 1) and V(nb − 2) are read by every warp group: their stages may be refilled
        prefetch(nb);
        r.stage_pv();
        r.issue_overlapped(q_tile, 64 * wg, k_tile(stage), v_tile(stage ^ 1));
        r.softmax(nb);
      }
      r.wait_pv();
      cp_async_wait<0>();  // V of the last block
      fence_proxy_async();
      __syncthreads();
      r.stage_pv();
      // No barrier after it: the staging below ends before the first V tile (static_assert in WgmmaFwdConfig), and
      // every read of Q and K was waited for before the barrier above.
      r.pv(v_tile((n_end - 1 - n_begin) & 1));
    } else {
      cp_async_wait<0>();  // the Q copy: the staging below reuses its memory
      __syncthreads();
    }
  }
  write_rows<T, D>(p, seq, reinterpret_cast<T*>(aligned), r.o, r.m, r.l, b, h, m0, m_last, warp, lane);
#else
  __trap();  // built for an architecture without wgmma: the launcher never starts it there
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Warp-specialized Hopper forward (attn_fwd_ws_kernel, sm_90a, head dims 64 and 128, dense calls): FlashAttention-3's
// structure on the overlapped loop above. A producer warp group loads Q, K and V by TMA (one thread issues
// cp.async.bulk.tensor copies into the 128-byte-swizzled tiles, completion counted in bytes on mbarriers) and gives
// its registers away (setmaxnreg); two consumer warp groups of 64 query rows run the overlapped loop (S and the
// previous block's P·V issued back to back, the softmax while P·V runs) with their own pace: a stage is handed
// over by mbarriers, full (the producer's bytes landed) and empty (every consumer warp is done reading it), so the
// two warp groups never wait on each other, unlike the cp.async kernel's block-wide barriers. kPingpong adds
// FlashAttention-3's pingpong: the two groups take turns issuing their products (named barriers 2 and 3), so that
// one group's softmax overlaps the other's matrix products. Off unless fastlm/_cuda.py's ATTN_HOPPER_FWD is "ws" or
// "pingpong" (until the benchmark has timed them); the launcher takes the overlapped cp.async kernel for a call it
// cannot map (varlen, head dim 256, strides or addresses TMA cannot take).
//
// - Tensor maps (host, attention_fwd): q, k, v as 4-D (head dim, heads, tokens, batch) with their own strides,
//   boxes of 64 columns (128 bytes: the swizzle's width) × 1 head × the tile's rows × 1; rows past the sequence
//   (the map's token bound is the dense length) arrive as zeros, as the cp.async kernels' zero-fill gives them.
// - Stages: two of K and two of V. The producer's order is Q, K(0), then per block t: K(t + 1) (into the stage
//   S(t − 1) released), V(t) (into the stage P·V(t − 2) released): V runs a block behind K, as the consumers use it.
// - Barriers (8 bytes each, after the tiles): q_full, k_full[2], v_full[2] (count 1: the producer's
//   arrive.expect_tx; the TMA's bytes complete the phase), k_empty[2], v_empty[2] (count 8: one arrive per
//   consumer warp after its wgmma wait). A stage's n-th use waits for phase parity n & 1.
// - Registers: 384 threads at launch (168 a thread); the producer drops to kProducerRegs, the consumers rise to
//   kConsumerRegs (2 · 128 · 240 + 128 · 24 = 384 · 168).
template <int D>
struct WsFwdConfig {
  static constexpr int kBlockM = 128;  // two consumer warp groups of 64 rows
  static constexpr int kBlockN = 128;
  static constexpr int kThreads = 384;  // producer warp group, then the two consumer warp groups
  static constexpr int kConsumerWarps = 8;
  static constexpr int kProducerRegs = 24;  // the producer's code keeps to R0-R3 (its values are uniform)
  static constexpr int kConsumerRegs = 240;
  static constexpr int kQBytes = kBlockM * D * 2;
  static constexpr int kTileBytes = kBlockN * D * 2;
  static constexpr int kTilesBytes = kQBytes + 4 * kTileBytes;  // Q, K stages 0 and 1, V stages 0 and 1
  static constexpr int kBarriers = 9;
  static constexpr int kSmemBytes = kTilesBytes + kBarriers * 8 + 1024;
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  static_assert(128 + kConsumerWarps * 32 == kThreads && kConsumerWarps * kMma == kBlockM,
                "a producer warp group, then consumer warps of 16 rows each");
  static_assert(2 * 128 * kConsumerRegs + 128 * kProducerRegs <= 384 * 168, "the launch's registers hold the split");
  static_assert(kBlockM * (D + 8) * 2 <= kQBytes + 2 * kTileBytes, "the epilogue's staging fits Q and K's stages");
};

#ifdef FASTLM_WGMMA  // the warp-specialized kernel's own helpers
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// One arrival that also says how many bytes the phase still waits for (the TMA copies' complete_tx).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// Blocks until the phase of the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// A box of the 4-D map (column c, head h, row r, batch b) into shared memory at dst, counted on bar.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap& map, int c, int h, int r, int b,
                                         uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(c), "r"(h), "r"(r), "r"(b), "r"(bar)
      : "memory");
}

// A tile of `rows` rows × D: D/64 boxes of 64 columns, column block after column block (the swizzled layout).
template <int D, int kRows>
__device__ __forceinline__ void tma_tile(uint32_t dst, const CUtensorMap& map, int h, int r, int b, uint32_t bar) {
#pragma unroll
  for (int cb = 0; cb < D / 64; ++cb) tma_load(dst + cb * kRows * 128, map, cb * 64, h, r, b, bar);
}

template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// The 256 consumer threads alone (named barrier 1; 0 is __syncthreads').
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }
#endif  // FASTLM_WGMMA

template <typename T, int D, bool kSoftcap, bool kPingpong>
__global__ void __launch_bounds__(WsFwdConfig<D>::kThreads, 1)
    attn_fwd_ws_kernel(const AttnParams p, const __grid_constant__ CUtensorMap map_q,
                       const __grid_constant__ CUtensorMap map_k, const __grid_constant__ CUtensorMap map_v) {
#ifdef FASTLM_WGMMA
  using C = WsFwdConfig<D>;
  constexpr int kN = C::kBlockN;
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t base = atom_base(smem);
  unsigned char* aligned = smem + (base - smem_u32(smem));

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  const int lane = tid & 31;
  QueryBlock<D, C::kBlockM, kN, false> blk(p);
  if (blk.m0 >= blk.seq.sq) return;
  blk.locate(p);
  const int h = blk.h, b = blk.b, m0 = blk.m0, n_begin = blk.n_begin, n_end = blk.n_end, hk = blk.hk;
  const uint32_t q_tile = base;
  auto k_tile = [&](int stage) { return base + static_cast<uint32_t>(C::kQBytes + stage * C::kTileBytes); };
  auto v_tile = [&](int stage) { return base + static_cast<uint32_t>(C::kQBytes + (2 + stage) * C::kTileBytes); };
  const uint32_t bars = base + C::kTilesBytes;
  const uint32_t q_full = bars;
  auto k_full = [&](int stage) { return bars + 8u * (1 + stage); };
  auto v_full = [&](int stage) { return bars + 8u * (3 + stage); };
  auto k_empty = [&](int stage) { return bars + 8u * (5 + stage); };
  auto v_empty = [&](int stage) { return bars + 8u * (7 + stage); };
  if (tid == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < 2; ++s) {
      mbar_init(k_full(s), 1);
      mbar_init(v_full(s), 1);
      mbar_init(k_empty(s), C::kConsumerWarps);
      mbar_init(v_empty(s), C::kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const int blocks = n_end - n_begin;

  if (warp < 4) {  // the producer warp group: one thread issues every copy
    setmaxnreg_dec<C::kProducerRegs>();
    if (tid == 0) {
      // Dense rows: the maps' token coordinate is the position in the sequence (q_start = k_start = 0).
      mbar_arrive_expect_tx(q_full, C::kQBytes);
      tma_tile<D, C::kBlockM>(q_tile, map_q, h, m0, b, q_full);
      if (blocks > 0) {
        mbar_arrive_expect_tx(k_full(0), C::kTileBytes);
        tma_tile<D, kN>(k_tile(0), map_k, hk, n_begin * kN, b, k_full(0));
      }
      for (int t = 0; t < blocks; ++t) {
        if (t + 1 < blocks) {  // K(t + 1) into the stage S(t − 1) read
          const int s = (t + 1) & 1;
          if (t + 1 >= 2) mbar_wait(k_empty(s), (((t + 1) >> 1) - 1) & 1);
          mbar_arrive_expect_tx(k_full(s), C::kTileBytes);
          tma_tile<D, kN>(k_tile(s), map_k, hk, (n_begin + t + 1) * kN, b, k_full(s));
        }
        const int s = t & 1;  // V(t) into the stage P·V(t − 2) read
        if (t >= 2) mbar_wait(v_empty(s), ((t >> 1) - 1) & 1);
        mbar_arrive_expect_tx(v_full(s), C::kTileBytes);
        tma_tile<D, kN>(v_tile(s), map_v, hk, (n_begin + t) * kN, b, v_full(s));
      }
    }
    return;
  }

  // The consumers: warp group cw of rows 64·cw …; warps numbered 0..7 among the consumers for the masks and
  // the epilogue (their rows 16·cwarp + lane/4, + 8).
  setmaxnreg_inc<C::kConsumerRegs>();
  const int cwarp = warp - 4;
  const int cw = cwarp / 4;
  const Seq& seq = blk.seq;
  const int m_last = blk.m_last;
  ForwardRows<T, D, kN, C::kBlockM, kSoftcap> r(p, blk.band, seq.sk, m0, m_last, m0 + cwarp * kMma + (lane >> 2),
                                                lane);
  auto release = [&](uint32_t bar) {  // this warp is done reading a stage (after its wgmma wait)
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };
  // Pingpong (kPingpong): the warp groups take turns at the tensor cores. Warp group cw waits for its turn at named
  // barrier 2 + cw (its 128 threads' bar.sync and the other group's 128 arrivals) before it issues a block's
  // products, and passes the turn (bar.arrive at 3 − cw) once they are issued, so that one group's softmax runs
  // while the other's products run (FlashAttention-3's pingpong). Each group takes one turn per key block (the
  // last P·V, waited for at once, takes none) and both walk the same blocks. Group 0's first turn needs no handover
  // and group 1 does not pass its last, so every bar.sync meets exactly one handover, turns strictly alternate (a
  // group cannot arrive twice at a barrier before the other has synced there), and no arrival is pending at exit.
  // scripts/ws_protocol_model.py explores every interleaving of these turns with the mbarrier stages.
  // (Immediate barrier ids: with an id in a register ptxas reserves all 16 barriers.)
  auto take_turn = [&](bool first) {
    if constexpr (kPingpong) {
      if (cw == 0) {
        if (!first) asm volatile("bar.sync 2, 256;\n" ::: "memory");
      } else {
        asm volatile("bar.sync 3, 256;\n" ::: "memory");
      }
    }
  };
  auto pass_turn = [&](bool last) {
    if constexpr (kPingpong) {
      if (cw == 0) {
        asm volatile("bar.arrive 3, 256;\n" ::: "memory");
      } else if (!last) {
        asm volatile("bar.arrive 2, 256;\n" ::: "memory");
      }
    }
  };
  mbar_wait(q_full, 0);  // also when there is no key block: the staging below overwrites Q's tile
  if (blocks > 0) {
    mbar_wait(k_full(0), 0);
    take_turn(true);
    r.issue_scores(q_tile, 64 * cw, k_tile(0));
    pass_turn(blocks == 1);
    r.wait_first_scores();
    release(k_empty(0));
    r.softmax(n_begin);
    for (int t = 1; t < blocks; ++t) {
      const int st = t & 1;
      r.wait_pv();  // P·V(t − 2), issued by the last iteration (none at t = 1)
      if (t >= 2) release(v_empty(st));  // (t − 2) & 1 = t & 1
      r.stage_pv();
      mbar_wait(k_full(st), (t >> 1) & 1);
      mbar_wait(v_full(st ^ 1), ((t - 1) >> 1) & 1);
      take_turn(false);
      r.issue_pair(q_tile, 64 * cw, k_tile(st), v_tile(st ^ 1));
      pass_turn(t + 1 == blocks);
      r.wait_scores();
      release(k_empty(st));
      r.softmax(n_begin + t);
    }
    r.wait_pv();
    r.stage_pv();
    mbar_wait(v_full((blocks - 1) & 1), ((blocks - 1) >> 1) & 1);
    r.pv(v_tile((blocks - 1) & 1));
  }
  consumers_sync();  // both consumer warp groups are done with Q and K's stages, which the staging overwrites
  write_rows<T, D>(p, seq, reinterpret_cast<T*>(aligned), r.o, r.m, r.l, b, h, m0, m_last, cwarp, lane);
#else
  __trap();  // built for an architecture without wgmma: the launcher never starts it there
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Hopper backward kernels (sm_90a, head dims 64 and 128, no softcap): FlashAttention-2's backward on wgmma, with no
// atomics (bitwise repeatable): a preprocess for delta, one kernel for dK and dV, one for dQ. Off unless the caller
// asks for it (fastlm/_cuda.py's ATTN_HOPPER_BWD, until the benchmark has timed it against the Triton backward);
// fastlm/ops/attention.py sends the cuda backend's backward here when it is on and the call is supported.
//
// Math (log2 units, t = s·mult as in the forward; lse2 = lse·log2(e), +inf for a row that saw no key):
//   P = 2^(t − lse2)      dP = dO·Vᵀ      delta_i = Σ_d dO_id·O_id − dlse_i      dS = P ∘ (dP − delta)
//   dV = Σ_heads of the group Pᵀ·dO      dK = scale·Σ dSᵀ·Q      dQ = scale·dS·K
// (dlse: the gradient of the returned lse, which adds P_ij·dlse_i to dS_ij.)
//
// - attn_bwd_delta_kernel: one thread per (query row, head), 16-byte loads of dO and O; delta has lse's layout.
// - attn_bwd_dkdv_wgmma_kernel: one CTA per (128 keys, kv head, batch entry), two warp groups of 64 keys. K and V
//   stay in shared memory; the loop walks the group's query heads × the 64-query blocks that may see these keys,
//   Q, dO, lse and delta through two cp.async stages. Per block, each warp group forms Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ
//   (64 × 64, K and V its A from shared memory, Q and dO K-major B), then dV += Pᵀ·dO and dK += dSᵀ·Q with Pᵀ and
//   dSᵀ from registers and Q, dO as the transposed (MN-major) B: the same swizzled tiles serve both products, as
//   V does in the forward. Keys are the rows, queries the columns, so the mask here is the forward's transposed.
//   Queries past the sequence arrive as zero rows (Q, dO, lse, delta all 0): their P is finite and their dO and Q
//   rows 0, so they add nothing to dV or dK.
// - attn_bwd_dq_wgmma_kernel: one CTA per (128 queries, query head, batch entry), two warp groups of 64 rows, Q
//   and dO in shared memory, key blocks of 64 through two stages. S = Q·Kᵀ and dP = dO·Vᵀ from shared memory,
//   the forward's mask, then dQ += dS·K with K as the transposed B. Keys past the sequence are zero rows and
//   masked.
// - Registers at D = 128: dK and dV 64 fp32 each, Sᵀ and dPᵀ 32 each, the two fragment sets 16 each; dQ 64 with
//   S and dP 32 each. Shared memory: dK/dV 2·128·D·2 + 2 stages × (2·64·D·2 + 1024: lse and delta padded to a
//   swizzle atom, so the next stage's tiles start on one) + 1024 bytes (131 KB at D = 128), dQ 2·128·D·2 +
//   2 stages × 2·64·D·2 + 1024 (129 KB).
template <int D>
struct WgmmaBwdConfig {
  static constexpr int kThreads = 256;  // two warp groups
  // dK/dV: 128 keys a CTA, 64 queries a block.
  static constexpr int kKeys = 128;
  static constexpr int kQueries = 64;
  static constexpr int kKVTileBytes = kKeys * D * 2;
  static constexpr int kQTileBytes = kQueries * D * 2;
  // Q, dO, then lse and delta in a 1024-byte slot: every tile must start on a swizzle atom (1024 bytes), since the
  // swizzle wgmma applies is a function of the address.
  static constexpr int kDkdvStageBytes = 2 * kQTileBytes + 1024;
  static constexpr int kDkdvSmemBytes = 2 * kKVTileBytes + 2 * kDkdvStageBytes + 1024;
  // dQ: 128 queries a CTA, 64 keys a block.
  static constexpr int kRows = 128;
  static constexpr int kKeyBlock = 64;
  static constexpr int kRowTileBytes = kRows * D * 2;
  static constexpr int kKeyTileBytes = kKeyBlock * D * 2;
  static constexpr int kDqStageBytes = 2 * kKeyTileBytes;
  static constexpr int kDqSmemBytes = 2 * kRowTileBytes + 2 * kDqStageBytes + 1024;
  static_assert(kKeys * (D + 8) * 2 <= 2 * kKVTileBytes && kRows * (D + 8) * 2 <= 2 * kRowTileBytes + kDqStageBytes,
                "the epilogues' staging fits");
  static_assert(2 * kQueries * 4 <= 1024, "lse and delta fit their slot");
  static_assert(kKVTileBytes % 1024 == 0 && kQTileBytes % 1024 == 0 && kDkdvStageBytes % 1024 == 0 &&
                    kRowTileBytes % 1024 == 0 && kKeyTileBytes % 1024 == 0 && kDqStageBytes % 1024 == 0,
                "every swizzled tile starts on a 1024-byte atom");
};

struct AttnBwdParams {
  AttnParams f;        // q, k, v, out (the forward's), lse, cu_seqlens, strides, windows, lengths, group, mult
  const void* dout;    // the output's gradient, with out's strides (f.o_*)
  const float* dlse;   // the lse's gradient, lse's layout; null for none
  float* delta;        // lse's layout
  void* dq;            // q's shape, strides dq_sb (0 for varlen), dq_ss, dq_sh
  void* dk;            // k's shape, strides dk_*
  void* dv;            // k's shape, strides dk_* too
  int64_t dq_sb, dq_ss, dq_sh;
  int64_t dk_sb, dk_ss, dk_sh;
  int64_t rows;        // rows of dout and out: B·Sq, or Tq for varlen
  float scale;
};

#ifdef FASTLM_WGMMA  // the backward kernels' own helpers (their sm_80 builds are a trap and use none)
// 4 bytes global → shared (a zero when !valid).
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

// lse in log2 units for 2^(t − lse2): a row that saw no key (lse −inf) gets +inf, so its P is 0, never NaN.
__device__ __forceinline__ float lse_log2(float lse) {
  return lse == neg_inf() ? __int_as_float(0x7f800000) : lse * 1.4426950408889634f;
}
#endif  // FASTLM_WGMMA

template <typename T, int D>
__global__ void __launch_bounds__(256) attn_bwd_delta_kernel(const AttnBwdParams p) {
  const int h = static_cast<int>(blockIdx.y);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.rows) return;
  const bool varlen = p.f.cu_q != nullptr;
  const int64_t b = varlen ? 0 : row / p.f.seqlen_q;
  const int64_t s = varlen ? row : row % p.f.seqlen_q;
  const int64_t at = b * p.f.o_sb + s * p.f.o_ss + h * p.f.o_sh;
  const T* o = static_cast<const T*>(p.f.out) + at;
  const T* dout = static_cast<const T*>(p.dout) + at;
  float acc = 0.f;
#pragma unroll
  for (int c = 0; c < D / 8; ++c) {
    float x[8], y[8];
    load_floats<8>(o + c * 8, x);
    load_floats<8>(dout + c * 8, y);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc = fmaf(x[e], y[e], acc);
  }
  const int64_t l = b * p.f.lse_sb + h * p.f.lse_sh + s;
  p.delta[l] = acc - (p.dlse != nullptr ? p.dlse[l] : 0.f);
}

// −inf for the scores of (key, query) pairs not visible, in the transposed layout of the dK/dV kernel: the
// thread's rows are keys j0 (elements 0, 1) and j1 (2, 3), its columns queries m0 + column.
template <int kN>
__device__ __forceinline__ void mask_scores_t(float (&s)[kN / 8][4], const Band& band, int sk, int sq, int m0, int j0,
                                              int j1, int lane) {
  const int c0 = m0 + ((lane & 3) << 1);
#pragma unroll
  for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = c0 + nt * 8 + (e & 1);
      const int j = e < 2 ? j0 : j1;
      const int d = j - i;
      if (j >= sk || i >= sq || d < band.lo_d || d > band.hi_d) s[nt][e] = neg_inf();
    }
  }
}

#ifdef FASTLM_WGMMA
// The queries [lo, hi) that may see some key of [n_first, n_last]; empty when hi ≤ lo.
__device__ __forceinline__ void query_range(const AttnParams& p, const Seq& s, int n_first, int n_last, int& lo,
                                            int& hi) {
  const int64_t off = static_cast<int64_t>(s.sk) - s.sq;
  const int64_t sq = s.sq;
  const int64_t a = n_first - off - p.window_right;
  const int64_t z = n_last - off + p.window_left + 1;
  const int64_t lo64 = a < 0 ? 0 : (a > sq ? sq : a);
  lo = static_cast<int>(lo64);
  hi = static_cast<int>(z < lo64 ? lo64 : (z > sq ? sq : z));
}
#endif  // FASTLM_WGMMA

template <typename T, int D>
__global__ void __launch_bounds__(WgmmaBwdConfig<D>::kThreads, 1) attn_bwd_dkdv_wgmma_kernel(const AttnBwdParams p) {
#ifdef FASTLM_WGMMA
  using C = WgmmaBwdConfig<D>;
  constexpr int kM = C::kQueries;
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t base = atom_base(smem);
  unsigned char* aligned = smem + (base - smem_u32(smem));
  const AttnParams& f = p.f;

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int wg = warp / 4;
  const int hk = static_cast<int>(blockIdx.y);
  const int b = static_cast<int>(blockIdx.z);
  const Seq seq = seq_of(f, b);
  const int n0 = static_cast<int>(blockIdx.x) * C::kKeys;
  if (n0 >= seq.sk) return;
  const int n_last = min(n0 + C::kKeys, seq.sk) - 1;
  const Band band = band_of(f, seq);
  int q_lo, q_hi;
  query_range(f, seq, n0, n_last, q_lo, q_hi);
  const int m_begin = q_lo / kM;
  const int blocks = q_hi > q_lo ? (q_hi + kM - 1) / kM - m_begin : 0;
  const int steps = blocks * f.group;  // (query head of the group, query block), head-major

  const __half* k = static_cast<const __half*>(f.k) + b * f.k_sb + (seq.k_start + n0) * f.k_ss + hk * f.k_sh;
  const __half* v = static_cast<const __half*>(f.v) + b * f.v_sb + (seq.k_start + n0) * f.v_ss + hk * f.v_sh;
  const uint32_t k_tile = base;
  const uint32_t v_tile = base + C::kKVTileBytes;
  auto q_tile = [&](int st) { return base + static_cast<uint32_t>(2 * C::kKVTileBytes + st * C::kDkdvStageBytes); };
  auto do_tile = [&](int st) { return q_tile(st) + static_cast<uint32_t>(C::kQTileBytes); };
  auto lse_at = [&](int st) { return q_tile(st) + static_cast<uint32_t>(2 * C::kQTileBytes); };
  auto delta_at = [&](int st) { return lse_at(st) + static_cast<uint32_t>(kM * 4); };
  const SwizzledTileCopy<kM, D, C::kThreads> copy_q(tid, f.q_ss);
  const SwizzledTileCopy<kM, D, C::kThreads> copy_do(tid, f.o_ss);
  auto load_step = [&](int st, int step) {
    const int h = hk * f.group + step / blocks;
    const int m = (m_begin + step % blocks) * kM;
    const int64_t row0 = seq.q_start + m;
    copy_q(q_tile(st), static_cast<const __half*>(f.q) + b * f.q_sb + row0 * f.q_ss + h * f.q_sh, seq.sq - m, f.q);
    copy_do(do_tile(st), static_cast<const __half*>(p.dout) + b * f.o_sb + row0 * f.o_ss + h * f.o_sh, seq.sq - m,
            p.dout);
    if (tid < 2 * kM) {  // lse then delta, one float a thread
      const int r = tid % kM;
      const float* src = (tid < kM ? f.lse : p.delta) + b * f.lse_sb + h * f.lse_sh + row0 + r;
      cp_async4((tid < kM ? lse_at(st) : delta_at(st)) + r * 4, m + r < seq.sq ? src : f.lse, m + r < seq.sq);
    }
  };
  SwizzledTileCopy<C::kKeys, D, C::kThreads>(tid, f.k_ss)(k_tile, k, n_last + 1 - n0, f.k);
  SwizzledTileCopy<C::kKeys, D, C::kThreads>(tid, f.v_ss)(v_tile, v, n_last + 1 - n0, f.v);
  if (steps > 0) load_step(0, 0);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nt][e] = dv[nt][e] = 0.f;
  }
  const int j0 = n0 + warp * kMma + (lane >> 2);  // the thread's keys j0 and j0 + 8
  const int c0 = (lane & 3) << 1;                 // its first column (query) in each 8-column tile

  for (int step = 0; step < steps; ++step) {
    const int st = step & 1;
    if (step + 1 < steps) load_step(st ^ 1, step + 1);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();
    const int m = (m_begin + step % blocks) * kM;
    const float* lse_s = reinterpret_cast<const float*>(aligned + (lse_at(st) - base));
    const float* delta_s = reinterpret_cast<const float*>(aligned + (delta_at(st) - base));

    // Sᵀ and dPᵀ in two commit groups, so that dPᵀ multiplies while Pᵀ is formed.
    float s[kM / 8][4];   // Sᵀ, then Pᵀ
    float dp[kM / 8][4];  // dPᵀ, then dSᵀ
    issue_abt<T, D, C::kKeys, kM>(s, k_tile, 64 * wg, q_tile(st));
    issue_abt<T, D, C::kKeys, kM>(dp, v_tile, 64 * wg, do_tile(st));
    wgmma_wait<1>();
    fence_operands(s);
    to_log2_scores<false, kM>(s, f);
    if (!tile_unmasked(band, seq.sk, n0, C::kKeys, m, m + kM - 1) || m + kM > seq.sq) {
      mask_scores_t<kM>(s, band, seq.sk, seq.sq, m, j0, j0 + 8, lane);
    }
#pragma unroll
    for (int nt = 0; nt < kM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = exp2_approx(s[nt][e] - lse_log2(lse_s[nt * 8 + c0 + (e & 1)]));
    }
    uint32_t pf[kM / 16][4], dsf[kM / 16][4];
    p_frags<T, kM>(pf, s);
    wgmma_wait<0>();
    fence_operands(dp);
#pragma unroll
    for (int nt = 0; nt < kM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[nt][e] = s[nt][e] * (dp[nt][e] - delta_s[nt * 8 + c0 + (e & 1)]);
    }
    p_frags<T, kM>(dsf, dp);
    // dV and dK: independent products, issued back to back, one wait.
    issue_ab<T, D, kM>(dv, pf, do_tile(st));
    issue_ab<T, D, kM>(dk, dsf, q_tile(st));
    wgmma_wait<0>();
    fence_operands(dv);
    fence_operands(dk);
    __syncthreads();  // every read of this stage is done before the next prefetch overwrites it
  }
  cp_async_wait<0>();
  __syncthreads();
  T* staging = reinterpret_cast<T*>(aligned) + warp * kMma * (D + 8);
  const int64_t row = seq.k_start + n0 + warp * kMma;
  const int valid = n_last - n0 - warp * kMma + 1;
  store_warp_rows<T, D>(staging, static_cast<T*>(p.dk) + b * p.dk_sb + row * p.dk_ss + hk * p.dk_sh, p.dk_ss, dk,
                        p.scale, valid, lane);
  store_warp_rows<T, D>(staging, static_cast<T*>(p.dv) + b * p.dk_sb + row * p.dk_ss + hk * p.dk_sh, p.dk_ss, dv,
                        1.f, valid, lane);
#else
  __trap();  // built for an architecture without wgmma: the launcher never starts it there
#endif
}

template <typename T, int D>
__global__ void __launch_bounds__(WgmmaBwdConfig<D>::kThreads, 1) attn_bwd_dq_wgmma_kernel(const AttnBwdParams p) {
#ifdef FASTLM_WGMMA
  using C = WgmmaBwdConfig<D>;
  constexpr int kN = C::kKeyBlock;
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t base = atom_base(smem);
  unsigned char* aligned = smem + (base - smem_u32(smem));
  const AttnParams& f = p.f;

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int wg = warp / 4;
  QueryBlock<D, C::kRows, kN, false> blk(f);
  if (blk.m0 >= blk.seq.sq) return;
  blk.locate(f);
  const Seq& seq = blk.seq;
  const int h = blk.h, b = blk.b, m0 = blk.m0, m_last = blk.m_last, n_begin = blk.n_begin, n_end = blk.n_end;
  const Band band = blk.band;
  const int64_t row0 = seq.q_start + m0;
  const __half *k = blk.k, *v = blk.v;
  const uint32_t q_tile = base;
  const uint32_t do_tile = base + C::kRowTileBytes;
  auto k_tile = [&](int st) { return base + static_cast<uint32_t>(2 * C::kRowTileBytes + st * C::kDqStageBytes); };
  auto v_tile = [&](int st) { return k_tile(st) + static_cast<uint32_t>(C::kKeyTileBytes); };
  const SwizzledTileCopy<kN, D, C::kThreads> copy_k(tid, f.k_ss);
  const SwizzledTileCopy<kN, D, C::kThreads> copy_v(tid, f.v_ss);
  auto load_kv = [&](int st, int nb) {
    const int n = nb * kN;
    copy_k(k_tile(st), k + n * f.k_ss, seq.sk - n, f.k);
    copy_v(v_tile(st), v + n * f.v_ss, seq.sk - n, f.v);
  };
  SwizzledTileCopy<C::kRows, D, C::kThreads>(tid, f.q_ss)(q_tile, blk.q, m_last + 1 - m0, f.q);
  SwizzledTileCopy<C::kRows, D, C::kThreads>(tid, f.o_ss)(
      do_tile, static_cast<const __half*>(p.dout) + b * f.o_sb + row0 * f.o_ss + h * f.o_sh, m_last + 1 - m0, p.dout);
  cp_async_commit();
  if (n_begin < n_end) load_kv(0, n_begin);
  cp_async_commit();

  // The thread's two rows: their lse (log2 units) and delta; rows past the sequence take P = 0.
  const int i0 = m0 + warp * kMma + (lane >> 2);
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = i0 + 8 * r;
    const int64_t at = b * f.lse_sb + h * f.lse_sh + seq.q_start + i;
    lse2[r] = i <= m_last ? lse_log2(f.lse[at]) : __int_as_float(0x7f800000);
    delta[r] = i <= m_last ? p.delta[at] : 0.f;
  }
  float dq[D / 8][4];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[nt][e] = 0.f;
  }

  for (int nb = n_begin; nb < n_end; ++nb) {
    const int st = (nb - n_begin) & 1;
    if (nb + 1 < n_end) load_kv(st ^ 1, nb + 1);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();
    // S and dP in two commit groups, so that dP multiplies while P is formed.
    float s[kN / 8][4];   // S, then P
    float dp[kN / 8][4];  // dP, then dS
    issue_abt<T, D, C::kRows, kN>(s, q_tile, 64 * wg, k_tile(st));
    issue_abt<T, D, C::kRows, kN>(dp, do_tile, 64 * wg, v_tile(st));
    wgmma_wait<1>();
    fence_operands(s);
    to_log2_scores<false, kN>(s, f);
    const int n = nb * kN;
    if (!tile_unmasked(band, seq.sk, n, kN, m0, m_last)) mask_scores<kN>(s, band, seq.sk, n, i0, i0 + 8, lane);
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = exp2_approx(s[nt][e] - lse2[e >> 1]);
    }
    wgmma_wait<0>();
    fence_operands(dp);
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[nt][e] = s[nt][e] * (dp[nt][e] - delta[e >> 1]);
    }
    uint32_t dsf[kN / 16][4];
    p_frags<T, kN>(dsf, dp);
    warpgroup_ab<T, D, kN>(dq, dsf, k_tile(st));
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();
  store_warp_rows<T, D>(reinterpret_cast<T*>(aligned) + warp * kMma * (D + 8),
                        static_cast<T*>(p.dq) + b * p.dq_sb + (row0 + warp * kMma) * p.dq_ss + h * p.dq_sh, p.dq_ss,
                        dq, p.scale, m_last - m0 - warp * kMma + 1, lane);
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Decode kernel (flash-decoding): grid (splits, Hk, B). Row r of the CTA's 16 is query r / group of head
// hk·group + r % group: consecutive rows are consecutive heads of one token, contiguous in q and out.

template <typename T, int D, bool kSoftcap>
__global__ void __launch_bounds__(kDecodeThreads, 1) attn_decode_kernel(const AttnParams p) {
  using C = DecodeConfig<D>;
  constexpr int kPitch = C::kPitch;
  constexpr int kStages = C::kStages;
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int split = static_cast<int>(blockIdx.x);
  const int hk = static_cast<int>(blockIdx.y);
  const int b = static_cast<int>(blockIdx.z);
  const Seq seq = seq_of(p, b);
  // Tokens outside every sequence, for the group's q heads (with splits too: the combine writes only the
  // sequences' rows).
  write_outside_rows<D>(p, seq, b, split, static_cast<int>(gridDim.x), hk * p.group, p.group);
  if (seq.sq == 0) return;
  const int G = p.group;
  const int valid_rows = min(p.rows, seq.sq * G);  // rows r < valid_rows have a query (r / G < sq)
  const Band band = band_of(p, seq);
  int key_lo, key_hi;
  key_range(p, seq, 0, seq.sq - 1, key_lo, key_hi);
  // Tiles of kDecodeKeys keys from key_lo rounded down, shared out among the splits in contiguous runs and, inside
  // a split, among the warps round-robin.
  const int first = key_lo - key_lo % kDecodeKeys;
  const int n_tiles = key_hi > key_lo ? (key_hi - first + kDecodeKeys - 1) / kDecodeKeys : 0;
  const int per_split = (n_tiles + p.splits - 1) / p.splits;
  const int t_begin = min(split * per_split, n_tiles) + warp;
  const int t_end = min((split + 1) * per_split, n_tiles);
  const int n_mine = t_begin < t_end ? (t_end - t_begin + kDecodeWarps - 1) / kDecodeWarps : 0;

  const __half* qbase = static_cast<const __half*>(p.q) + b * p.q_sb + seq.q_start * p.q_ss;
  const __half* k = static_cast<const __half*>(p.k) + b * p.k_sb + seq.k_start * p.k_ss + hk * p.k_sh;
  const __half* v = static_cast<const __half*>(p.v) + b * p.v_sb + seq.k_start * p.v_ss + hk * p.v_sh;
  unsigned char* wsmem = smem + warp * C::kWarpBytes;
  const uint32_t wbase = smem_u32(wsmem);
  const uint32_t q_tile = smem_u32(smem + kDecodeWarps * C::kWarpBytes);

  // The Q rows, gathered over heads (rows past valid_rows zero-filled).
  {
    constexpr int kChunks = D / 8;
    for (int c = tid; c < kMma * kChunks; c += kDecodeThreads) {
      const int r = c / kChunks;
      const int col = (c % kChunks) * 8;
      const bool ok = r < valid_rows;
      const void* g = ok ? static_cast<const void*>(qbase + (r / G) * p.q_ss + (hk * G + r % G) * p.q_sh + col)
                         : p.q;
      cp_async16(q_tile + static_cast<uint32_t>((r * kPitch + col) * 2), g, ok);
    }
    cp_async_commit();
  }
  const TileCopy<kDecodeKeys, D, 32> copy_k(lane, p.k_ss);
  const TileCopy<kDecodeKeys, D, 32> copy_v(lane, p.v_ss);
  auto load_kv = [&](int stage, int mine) {
    const int n0 = first + (t_begin + mine * kDecodeWarps) * kDecodeKeys;
    const uint32_t kt = wbase + static_cast<uint32_t>(stage * C::kStageBytes);
    copy_k(kt, k + n0 * p.k_ss, seq.sk - n0, p.k);
    copy_v(kt + C::kTileElems * 2, v + n0 * p.v_ss, seq.sk - n0, p.v);
  };
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < n_mine) load_kv(st, st);
    cp_async_commit();
  }
  cp_async_wait<kStages - 1>();  // the Q group, the oldest
  __syncthreads();
  uint32_t qf[q_frag_count<D, C::kQInRegs>()][4];
  if constexpr (C::kQInRegs) load_a_frags<D, kPitch>(qf, q_tile, lane);

  float o[D / 8][4];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nt][e] = 0.f;
  }
  float m[2] = {neg_inf(), neg_inf()};
  float l[2] = {0.f, 0.f};
  const int g = lane >> 2;
  const int i0 = g / G;
  const int i1 = (g + 8) / G;

  for (int mine = 0; mine < n_mine; ++mine) {
    const int stage = mine % kStages;
    if (mine + kStages - 1 < n_mine) load_kv((mine + kStages - 1) % kStages, mine + kStages - 1);
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncwarp();
    const uint32_t kt = wbase + static_cast<uint32_t>(stage * C::kStageBytes);
    float s[kDecodeKeys / 8][4];
    warp_qk<T, D, kDecodeKeys, kPitch, C::kQInRegs>(s, qf, q_tile, kt, lane);
    to_log2_scores<kSoftcap, kDecodeKeys>(s, p);
    const int n0 = first + (t_begin + mine * kDecodeWarps) * kDecodeKeys;
    if (!tile_unmasked(band, seq.sk, n0, kDecodeKeys, 0, seq.sq - 1)) {
      mask_scores<kDecodeKeys>(s, band, seq.sk, n0, i0, i1, lane);
    }
    online_softmax<kDecodeKeys, D>(s, o, m, l);
    uint32_t pf[kDecodeKeys / 16][4];
    p_frags<T, kDecodeKeys>(pf, s);
    warp_pv<T, D, kDecodeKeys, kPitch>(o, pf, kt + static_cast<uint32_t>(C::kTileElems * 2), lane);
    __syncwarp();
  }

  // Each warp leaves (m, l, O unnormalized) in its own stage memory; then every thread merges, warp 0 first, a
  // run of columns of one row.
  cp_async_wait<0>();
  __syncwarp();
  float* red_o = reinterpret_cast<float*>(wsmem);
  float* red_m = red_o + kMma * C::kRedPitch;
  float* red_l = red_m + kMma;
  const int t2 = (lane & 3) << 1;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      *reinterpret_cast<float2*>(red_o + (g + 8 * r) * C::kRedPitch + nt * 8 + t2) =
          make_float2(o[nt][2 * r], o[nt][2 * r + 1]);
    }
    if ((lane & 3) == 0) {
      red_m[g + 8 * r] = m[r];
      red_l[g + 8 * r] = l[r];
    }
  }
  __syncthreads();

  constexpr int kParts = kDecodeThreads / kMma;  // threads per row
  constexpr int kCols = D / kParts;              // columns per thread, a multiple of 4
  static_assert(kCols % 4 == 0, "whole 4-column groups");
  const int r = tid / kParts;
  const int col0 = (tid % kParts) * kCols;
  if (r >= valid_rows) return;
  float mw[kDecodeWarps];
  float mx = neg_inf();
#pragma unroll
  for (int w = 0; w < kDecodeWarps; ++w) {
    mw[w] = reinterpret_cast<const float*>(smem + w * C::kWarpBytes)[kMma * C::kRedPitch + r];
    mx = fmaxf(mx, mw[w]);
  }
  float cw[kDecodeWarps];
  float lsum = 0.f;
#pragma unroll
  for (int w = 0; w < kDecodeWarps; ++w) {
    const float* rw = reinterpret_cast<const float*>(smem + w * C::kWarpBytes);
    cw[w] = mx == neg_inf() ? 0.f : exp2_approx(mw[w] - mx);
    lsum += cw[w] * rw[kMma * C::kRedPitch + kMma + r];
  }
  const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
  const int i = r / G;
  const int h = hk * G + r % G;
  const int64_t ws_row = ((static_cast<int64_t>(b) * p.heads_k + hk) * p.rows + r) * p.splits + split;
#pragma unroll
  for (int c4 = 0; c4 < kCols; c4 += 4) {
    float val[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float acc = 0.f;
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) {
        acc += cw[w] * reinterpret_cast<const float*>(smem + w * C::kWarpBytes)[r * C::kRedPitch + col0 + c4 + e];
      }
      val[e] = acc * inv;
    }
    if (p.splits == 1) {
      store_floats<4>(static_cast<T*>(p.out) + b * p.o_sb + (seq.q_start + i) * p.o_ss + h * p.o_sh + col0 + c4,
                      val);
    } else {
      store_floats<4>(p.ws_o + ws_row * D + col0 + c4, val);
    }
  }
  if (col0 == 0) {
    if (p.splits == 1) {
      p.lse[b * p.lse_sb + h * p.lse_sh + seq.q_start + i] = lsum > 0.f ? (mx + log2f(lsum)) * kLn2 : neg_inf();
    } else {
      p.ws_lse[ws_row] = lsum > 0.f ? mx + log2f(lsum) : neg_inf();
    }
  }
}

// Merges the splits of each query row in split order (bitwise repeatable): lse = log Σ_s 2^(lse_s), out =
// Σ_s 2^(lse_s − lse) · o_s. One warp per row of the decode kernel's (B, Hk, rows) grid.
template <typename T, int D>
__global__ void __launch_bounds__(kCombineWarps * 32) attn_combine_kernel(const AttnParams p, int64_t n_rows) {
  __shared__ float weights[kCombineWarps][kMaxSplits];
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + warp;
  if (row >= n_rows) return;
  const int r = static_cast<int>(row % p.rows);
  const int hk = static_cast<int>(row / p.rows % p.heads_k);
  const int b = static_cast<int>(row / p.rows / p.heads_k);
  const Seq seq = seq_of(p, b);
  const int G = p.group;
  if (r >= min(p.rows, seq.sq * G)) return;
  const int S = p.splits;
  const float* lse_s = p.ws_lse + row * S;
  float lv[kMaxSplits / 32];
  float mx = neg_inf();
#pragma unroll
  for (int k = 0; k < kMaxSplits / 32; ++k) {
    const int s = lane + 32 * k;
    lv[k] = s < S ? lse_s[s] : neg_inf();
    mx = fmaxf(mx, lv[k]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kMaxSplits / 32; ++k) {
    const float w = mx == neg_inf() ? 0.f : exp2_approx(lv[k] - mx);
    weights[warp][lane + 32 * k] = w;
    sum += w;
  }
  sum = warp_sum(sum);
  __syncwarp();
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  constexpr int kPer = D / 32;
  float acc[kPer];
#pragma unroll
  for (int c = 0; c < kPer; ++c) acc[c] = 0.f;
  const float* o_s = p.ws_o + row * S * D;
  for (int s = 0; s < S; ++s) {
    const float w = weights[warp][s];
#pragma unroll
    for (int c = 0; c < kPer; ++c) acc[c] += w * o_s[s * D + lane + 32 * c];
  }
  const int i = r / G;
  const int h = hk * G + r % G;
  T* out = static_cast<T*>(p.out) + b * p.o_sb + (seq.q_start + i) * p.o_ss + h * p.o_sh;
#pragma unroll
  for (int c = 0; c < kPer; ++c) out[lane + 32 * c] = from_float<T>(acc[c] * inv);
  if (lane == 0) p.lse[b * p.lse_sb + h * p.lse_sh + seq.q_start + i] = sum > 0.f ? (mx + log2f(sum)) * kLn2 : neg_inf();
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers.

// Calls f(Tag<T>) for the dtype code, T __half or __nv_bfloat16 (tensor cores: no float32 instance).
template <typename F>
void dispatch_half(int dtype, F&& f) {
  dispatch_dtype<false>(dtype, f, "the attention kernels");
}

// "32, 64, 96, 128 and 256": launchers.h's AttnHeadDims, for the error message.
template <int... Ds>
std::string head_dims_text(std::integer_sequence<int, Ds...>) {
  const int dims[] = {Ds...};
  std::string text;
  for (size_t i = 0; i < sizeof...(Ds); ++i) {
    text += (i == 0 ? "" : i + 1 == sizeof...(Ds) ? " and " : ", ") + std::to_string(dims[i]);
  }
  return text;
}

template <typename F, int... Ds>
bool dispatch_in(int64_t d, F& f, std::integer_sequence<int, Ds...>) {
  return ((d == Ds ? (f(std::integral_constant<int, Ds>{}), true) : false) || ...);
}

// Calls f(integral_constant<int, D>) for the head dim, one of launchers.h's AttnHeadDims.
template <typename F>
void dispatch_head_dim(int64_t d, F&& f) {
  if (!dispatch_in(d, f, AttnHeadDims{})) {
    throw std::invalid_argument("fastlm._C: the attention kernels take head dims " + head_dims_text(AttnHeadDims{}) +
                                ", got " + std::to_string(d));
  }
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("fastlm._C: " + what);
}

// Rows of D 16-bit elements copied with 16-byte accesses: the base address and every stride but the unit one must
// keep 16-byte alignment.
void check_rows16(const char* name, int64_t address, const std::vector<int64_t>& strides) {
  require(address != 0, std::string(name) + " is null");
  require(address % 16 == 0, std::string(name) + " must be 16-byte aligned");
  require(strides.size() == 3, std::string(name) + "_strides must be (batch, token, head)");
  for (const int64_t s : strides) {
    require(s % 8 == 0, std::string(name) + " strides must be multiples of 8 elements (16 bytes), got " +
                            std::to_string(s));
  }
}

int64_t clamp_window(const std::optional<int64_t>& w) {
  if (!w.has_value()) return kWindowInf;
  return std::min(std::max(*w, -kWindowInf), kWindowInf);
}

// Query rows of a decode CTA, or 0 when the call takes the forward kernel.
int64_t decode_rows(int64_t heads_q, int64_t heads_k, int64_t max_seqlen_q) {
  const int64_t rows = max_seqlen_q * (heads_q / heads_k);
  return rows >= 1 && rows <= kMma ? rows : 0;
}

int sm_count(int device) {
  int sms = 0;
  FASTLM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max(sms, 1);
}

// Whether the wgmma forward kernel runs on `device` (current): compute capability 9.0 exactly (sm_90a code runs
// there only) and a build whose code for it is the kernel, not its trap. cudaFuncAttributes cannot tell sm_90 code
// from sm_90a code (binaryVersion is 90 for both, and FASTLM_CUDA_ARCHS may name plain 90), but the code the
// driver loaded can: the kernel proper takes 160 registers or more (static report), the trap a handful. Asked
// once a device: the answer cannot change while the process lives.
constexpr int kMaxDevices = 64;
constexpr int kWgmmaMinRegs = 64;

bool hopper_kernels_run(int device) {
  static std::atomic<int> known[kMaxDevices];  // 0 not asked yet, 1 yes, 2 no
  if (device < 0 || device >= kMaxDevices) return false;
  int answer = known[device].load(std::memory_order_relaxed);
  if (answer == 0) {
    int major = 0, minor = 0;
    FASTLM_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    FASTLM_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    bool ok = major == 9 && minor == 0;
    if (ok) {
      cudaFuncAttributes attr{};
      const cudaError_t err = cudaFuncGetAttributes(&attr, attn_fwd_wgmma_kernel<__half, 64, false, true>);
      if (err != cudaSuccess) cudaGetLastError();  // no code for this device: an error to clear, not to report later
      ok = err == cudaSuccess && attr.binaryVersion == 90 && attr.numRegs >= kWgmmaMinRegs;
    }
    answer = ok ? 1 : 2;
    known[device].store(answer, std::memory_order_relaxed);
  }
  return answer == 1;
}

// The warp-specialized forward's TMA maps. cuTensorMapEncodeTiled is a driver function: reached through the runtime
// (cudaGetDriverEntryPointByVersion), once, so that nothing links the driver library.
using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                                             &found);
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();  // no such entry point: an error to clear, the caller falls back
      return EncodeTiled{nullptr};
    }
    return reinterpret_cast<EncodeTiled>(ptr);
  }();
  return fn;
}

// A 4-D map of a dense (batch, tokens, heads, head dim) tensor at `ptr` with (batch, token, head) strides in
// elements (the head dim contiguous): dims (head dim, heads, tokens, batch), boxes of 64 columns × 1 head × `rows`
// × 1 in the 128-byte swizzle, zeros past the bounds. False when TMA cannot address it (an address not 16-byte
// aligned, a stride that is not a positive multiple of 16 bytes below 2^40, or the driver refuses): the caller
// then takes the cp.async kernel.
bool make_tma_map(CUtensorMap& map, int64_t ptr, int dtype, int64_t head_dim, int64_t heads, int64_t tokens,
                  int64_t batch, const std::vector<int64_t>& strides, int rows) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr || ptr % 16 != 0 || strides.size() != 3 || tokens <= 0 || batch <= 0 || heads <= 0) {
    return false;
  }
  const int64_t sb = strides[0], ss = strides[1], sh = strides[2];
  for (const int64_t st : {sh, ss, sb}) {
    if (st <= 0 || (st * 2) % 16 != 0 || st * 2 >= (int64_t{1} << 40)) return false;
  }
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(tokens), static_cast<cuuint64_t>(batch)};
  const cuuint64_t byte_strides[3] = {static_cast<cuuint64_t>(sh * 2), static_cast<cuuint64_t>(ss * 2),
                                      static_cast<cuuint64_t>(sb * 2)};
  const cuuint32_t box[4] = {64, 1, static_cast<cuuint32_t>(rows), 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  const CUresult r =
      encode(&map, dtype == kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
             reinterpret_cast<void*>(ptr), dims, byte_strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

void check_heads(int64_t heads_q, int64_t heads_k) {
  require(heads_k >= 1 && heads_q >= 1 && heads_q % heads_k == 0,
          "heads_q must be a positive multiple of heads_k, got " + std::to_string(heads_q) + " and " +
              std::to_string(heads_k));
  require(heads_q <= kAttnMaxGrid, "at most 65535 query heads, got " + std::to_string(heads_q));
}

// The launchers' checks of the call's scalars (dtype, head dim, heads, sizes, scale, softcap).
void check_call(int64_t cu_seqlens_q, int64_t cu_seqlens_k, int64_t batch, int64_t heads_q, int64_t heads_k,
                int64_t head_dim, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t total_q, int64_t total_k,
                int dtype, double scale, double softcap) {
  dispatch_half(dtype, [](auto) {});
  dispatch_head_dim(head_dim, [](auto) {});
  check_heads(heads_q, heads_k);
  const bool varlen = cu_seqlens_q != 0;
  require((cu_seqlens_k != 0) == varlen, "cu_seqlens_q and cu_seqlens_k must be given together");
  require(batch >= 0 && batch <= kAttnMaxGrid, "batch must be in [0, 65535], got " + std::to_string(batch));
  require(max_seqlen_q >= 0 && max_seqlen_q < kMaxTokens && max_seqlen_k >= 0 && max_seqlen_k < kMaxTokens,
          "max_seqlen_q and max_seqlen_k must be in [0, 2^30)");
  require(total_q >= 0 && total_q < kMaxTokens && total_k >= 0 && total_k < kMaxTokens,
          "total_q and total_k must be in [0, 2^30)");
  require(std::isfinite(scale), "scale must be finite");
  require(softcap >= 0.0 && std::isfinite(softcap), "softcap must be finite and > 0, or 0 for none");
}

// The pointer checks and the kernel parameters both launchers share (all but the decode kernel's rows and
// splits); false when the call has nothing to compute (no batch entry, no query).
bool fill_params(AttnParams& p, int64_t q, int64_t k, int64_t v, int64_t out, int64_t lse, int64_t cu_seqlens_q,
                 int64_t cu_seqlens_k, const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
                 const std::vector<int64_t>& v_strides, const std::vector<int64_t>& out_strides, int64_t batch,
                 int64_t heads_q, int64_t heads_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t total_q,
                 int64_t total_k, double scale, const std::optional<int64_t>& window_left,
                 const std::optional<int64_t>& window_right, double softcap) {
  const bool varlen = cu_seqlens_q != 0;
  if (batch == 0 || max_seqlen_q == 0 || total_q == 0) return false;
  // With no keys at all nothing reads k or v (every row is empty), so they may be null; the kernels still write
  // the zero rows and −inf.
  const bool any_keys = max_seqlen_k > 0 && total_k > 0;
  check_rows16("q", q, q_strides);
  check_rows16("out", out, out_strides);
  if (any_keys) {
    check_rows16("k", k, k_strides);
    check_rows16("v", v, v_strides);
  } else {
    require(k_strides.size() == 3 && v_strides.size() == 3, "k_strides and v_strides must be (batch, token, head)");
  }
  require(lse != 0 && lse % 4 == 0, "lse must be a non-null, 4-byte aligned float32 pointer");
  if (varlen) require(cu_seqlens_q % 4 == 0 && cu_seqlens_k % 4 == 0, "cu_seqlens must be int32 pointers");

  p.q = ptr<const void>(q);
  p.k = ptr<const void>(any_keys ? k : q);
  p.v = ptr<const void>(any_keys ? v : q);
  p.out = ptr<void>(out);
  p.lse = ptr<float>(lse);
  p.cu_q = ptr<const int>(cu_seqlens_q);
  p.cu_k = ptr<const int>(cu_seqlens_k);
  const int64_t sb = varlen ? 0 : 1;  // a varlen batch entry is placed by its token offset, not a batch stride
  p.q_sb = q_strides[0] * sb;
  p.q_ss = q_strides[1];
  p.q_sh = q_strides[2];
  p.k_sb = k_strides[0] * sb;
  p.k_ss = k_strides[1];
  p.k_sh = k_strides[2];
  p.v_sb = v_strides[0] * sb;
  p.v_ss = v_strides[1];
  p.v_sh = v_strides[2];
  p.o_sb = out_strides[0] * sb;
  p.o_ss = out_strides[1];
  p.o_sh = out_strides[2];
  p.lse_sb = varlen ? 0 : heads_q * max_seqlen_q;
  p.lse_sh = varlen ? total_q : max_seqlen_q;
  p.window_left = clamp_window(window_left);
  p.window_right = clamp_window(window_right);
  p.seqlen_q = static_cast<int>(max_seqlen_q);
  p.seqlen_k = any_keys ? static_cast<int>(max_seqlen_k) : 0;
  p.total_q = static_cast<int>(total_q);
  p.total_k = any_keys ? static_cast<int>(total_k) : 0;
  p.heads_k = static_cast<int>(heads_k);
  p.group = static_cast<int>(heads_q / heads_k);
  // In double, rounded once: log2(e)·scale, or with the softcap log2(e)·c and the prescale scale / c.
  p.mult = static_cast<float>((softcap > 0.0 ? softcap : scale) * 1.4426950408889634);
  p.softcap_pre = softcap > 0.0 ? static_cast<float>(scale / softcap) : 0.f;
  return true;
}

}  // namespace
}  // namespace fastlm

// ---------------------------------------------------------------------------------------------------------------
// The launchers of launchers.h, defined by qualified name: a signature unlike the declaration does not compile.

int64_t fastlm::attention_decode_splits(int64_t batch, int64_t heads_q, int64_t heads_k, int64_t head_dim,
                                int64_t max_seqlen_q, int64_t max_seqlen_k, std::optional<int64_t> window_left,
                                std::optional<int64_t> window_right, int device) {
  const DeviceGuard guard(device);
  check_heads(heads_q, heads_k);
  int smem = 0;
  dispatch_head_dim(head_dim, [&](auto dim) { smem = DecodeConfig<decltype(dim)::value>::kSmemBytes; });
  if (decode_rows(heads_q, heads_k, max_seqlen_q) == 0 || batch < 1 || max_seqlen_k < 1) return 0;
  // The forward kernel fits every supported GPU (≤ 99 KB); the decode kernel at D = 256 does not (140 KB), and
  // where it does not the forward kernel serves.
  int optin = 0;
  FASTLM_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (smem > optin) return 0;
  // The keys one (batch, kv head) may have to read: all of them, or the band of a window on both sides.
  int64_t keys = max_seqlen_k;
  if (window_left.has_value() && window_right.has_value()) {
    keys = std::min(keys, std::max<int64_t>(1, max_seqlen_q + clamp_window(window_left) + clamp_window(window_right)));
  }
  const int64_t ctas = batch * heads_k;
  const int64_t want = (static_cast<int64_t>(kDecodeCtasPerSm) * sm_count(device) + ctas - 1) / ctas;
  const int64_t useful = (keys + kMinSplitKeys - 1) / kMinSplitKeys;
  return std::max<int64_t>(1, std::min<int64_t>({want, useful, kMaxSplits}));
}

int64_t fastlm::attention_workspace_numel(int64_t batch, int64_t heads_q, int64_t heads_k, int64_t head_dim,
                                  int64_t max_seqlen_q, int64_t num_splits) {
  check_heads(heads_q, heads_k);
  if (num_splits <= 1) return 0;
  return batch * heads_k * decode_rows(heads_q, heads_k, max_seqlen_q) * num_splits * (head_dim + 1);
}

bool fastlm::attention_hopper_supported(int64_t head_dim, bool backward, int device) {
  const DeviceGuard guard(device);
  return (backward ? hopper_bwd_head_dim(head_dim) : hopper_head_dim(head_dim)) && hopper_kernels_run(device);
}

void fastlm::attention_fwd(int64_t q, int64_t k, int64_t v, int64_t out, int64_t lse, int64_t cu_seqlens_q,
                   int64_t cu_seqlens_k, std::vector<int64_t> q_strides, std::vector<int64_t> k_strides,
                   std::vector<int64_t> v_strides, std::vector<int64_t> out_strides, int64_t batch, int64_t heads_q,
                   int64_t heads_k, int64_t head_dim, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t total_q,
                   int64_t total_k, int dtype, double scale, std::optional<int64_t> window_left,
                   std::optional<int64_t> window_right, double softcap, int64_t workspace, int64_t workspace_numel,
                   int64_t num_splits, int hopper, int device, int64_t stream) {
  const DeviceGuard guard(device);
  check_call(cu_seqlens_q, cu_seqlens_k, batch, heads_q, heads_k, head_dim, max_seqlen_q, max_seqlen_k, total_q,
             total_k, dtype, scale, softcap);
  require(num_splits >= 0 && num_splits <= kMaxSplits, "num_splits must be in [0, 128]");
  require(hopper >= 0 && hopper <= 4, "hopper must be 0, 1, 2, 3 or 4, got " + std::to_string(hopper));
  const int64_t rows = decode_rows(heads_q, heads_k, max_seqlen_q);
  require(num_splits == 0 || rows > 0, "the decode kernel (num_splits ≥ 1) takes max_seqlen_q · heads_q / heads_k ≤ 16");
  require(rows == 0 || batch * heads_k * rows <= INT_MAX, "too many (batch, kv head, row) triples for one grid");
  AttnParams p{};
  if (!fill_params(p, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, q_strides, k_strides, v_strides, out_strides,
                   batch, heads_q, heads_k, max_seqlen_q, max_seqlen_k, total_q, total_k, scale, window_left,
                   window_right, softcap)) {
    return;
  }
  if (num_splits > 1) {
    require(workspace != 0 && workspace % 16 == 0, "the decode workspace must be a 16-byte aligned pointer");
    require(workspace_numel >= attention_workspace_numel(batch, heads_q, heads_k, head_dim, max_seqlen_q, num_splits),
            "the decode workspace is smaller than attention_workspace_numel");
  }
  p.rows = static_cast<int>(rows);
  p.splits = static_cast<int>(std::max<int64_t>(num_splits, 1));
  const cudaStream_t s = as_stream(stream);
  const bool capped = softcap > 0.0;

  dispatch_half(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_head_dim(head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if constexpr (hopper_head_dim(D)) {
        if (num_splits == 0 && hopper != 0 && hopper_kernels_run(device)) {
          if constexpr (ws_head_dim(D)) {
            CUtensorMap maps[3];
            if (hopper >= 3 && cu_seqlens_q == 0 &&
                make_tma_map(maps[0], q, dtype, D, heads_q, max_seqlen_q, batch, q_strides, WsFwdConfig<D>::kBlockM) &&
                make_tma_map(maps[1], k, dtype, D, heads_k, max_seqlen_k, batch, k_strides, WsFwdConfig<D>::kBlockN) &&
                make_tma_map(maps[2], v, dtype, D, heads_k, max_seqlen_k, batch, v_strides, WsFwdConfig<D>::kBlockN)) {
              using C = WsFwdConfig<D>;
              const bool pingpong = hopper == 4;
              const auto kernel = capped ? (pingpong ? attn_fwd_ws_kernel<T, D, true, true>
                                                     : attn_fwd_ws_kernel<T, D, true, false>)
                                         : (pingpong ? attn_fwd_ws_kernel<T, D, false, true>
                                                     : attn_fwd_ws_kernel<T, D, false, false>);
              opt_in_smem(kernel, C::kSmemBytes, "attn_fwd_ws_kernel");
              const dim3 grid(static_cast<unsigned>((max_seqlen_q + C::kBlockM - 1) / C::kBlockM),
                              static_cast<unsigned>(heads_q), static_cast<unsigned>(batch));
              kernel<<<grid, C::kThreads, C::kSmemBytes, s>>>(p, maps[0], maps[1], maps[2]);
              check_launch("attn_fwd_ws_kernel");
              return;
            }
          }
          using C = WgmmaFwdConfig<D>;
          const bool overlap = hopper >= 2;  // "ws", "pingpong" where the warp-specialized kernel cannot take the call
          const auto kernel = capped ? (overlap ? attn_fwd_wgmma_kernel<T, D, true, true>
                                                : attn_fwd_wgmma_kernel<T, D, true, false>)
                                     : (overlap ? attn_fwd_wgmma_kernel<T, D, false, true>
                                                : attn_fwd_wgmma_kernel<T, D, false, false>);
          opt_in_smem(kernel, C::kSmemBytes, "attn_fwd_wgmma_kernel");
          const dim3 grid(static_cast<unsigned>((max_seqlen_q + C::kBlockM - 1) / C::kBlockM),
                          static_cast<unsigned>(heads_q), static_cast<unsigned>(batch));
          kernel<<<grid, C::kThreads, C::kSmemBytes, s>>>(p);
          check_launch("attn_fwd_wgmma_kernel");
          return;
        }
      }
      if (num_splits == 0) {
        using C = FwdConfig<D>;
        const auto kernel = capped ? attn_fwd_kernel<T, D, true> : attn_fwd_kernel<T, D, false>;
        opt_in_smem(kernel, C::kSmemBytes, "attn_fwd_kernel");
        const dim3 grid(static_cast<unsigned>((max_seqlen_q + C::kBlockM - 1) / C::kBlockM),
                        static_cast<unsigned>(heads_q), static_cast<unsigned>(batch));
        kernel<<<grid, C::kThreads, C::kSmemBytes, s>>>(p);
        check_launch("attn_fwd_kernel");
        return;
      }
      using C = DecodeConfig<D>;
      if (num_splits > 1) {
        p.ws_o = ptr<float>(workspace);
        p.ws_lse = p.ws_o + batch * heads_k * rows * num_splits * head_dim;
      }
      const auto kernel = capped ? attn_decode_kernel<T, D, true> : attn_decode_kernel<T, D, false>;
      opt_in_smem(kernel, C::kSmemBytes, "attn_decode_kernel");
      const dim3 grid(static_cast<unsigned>(p.splits), static_cast<unsigned>(heads_k), static_cast<unsigned>(batch));
      kernel<<<grid, kDecodeThreads, C::kSmemBytes, s>>>(p);
      check_launch("attn_decode_kernel");
      if (num_splits > 1) {
        const int64_t n_rows = batch * heads_k * rows;  // < 2^31 · kCombineWarps: checked above
        const unsigned blocks = static_cast<unsigned>((n_rows + kCombineWarps - 1) / kCombineWarps);
        attn_combine_kernel<T, D><<<blocks, kCombineWarps * 32, 0, s>>>(p, n_rows);
        check_launch("attn_combine_kernel");
      }
    });
  });
}

void fastlm::attention_bwd(int64_t dout, int64_t q, int64_t k, int64_t v, int64_t out, int64_t lse, int64_t dlse,
                           int64_t delta, int64_t dq, int64_t dk, int64_t dv, int64_t cu_seqlens_q,
                           int64_t cu_seqlens_k, std::vector<int64_t> q_strides, std::vector<int64_t> k_strides,
                           std::vector<int64_t> v_strides, std::vector<int64_t> out_strides,
                           std::vector<int64_t> dq_strides, std::vector<int64_t> dk_strides, int64_t batch,
                           int64_t heads_q, int64_t heads_k, int64_t head_dim, int64_t max_seqlen_q,
                           int64_t max_seqlen_k, int64_t total_q, int64_t total_k, int dtype, double scale,
                           std::optional<int64_t> window_left, std::optional<int64_t> window_right, int device,
                           int64_t stream) {
  const DeviceGuard guard(device);
  check_call(cu_seqlens_q, cu_seqlens_k, batch, heads_q, heads_k, head_dim, max_seqlen_q, max_seqlen_k, total_q,
             total_k, dtype, scale, 0.0);
  require(hopper_bwd_head_dim(head_dim) && hopper_kernels_run(device),
          "the wgmma backward runs at head dims 64 and 128 on compute capability 9.0 with sm_90a code "
          "(attention_hopper_supported)");
  AttnBwdParams p{};
  if (!fill_params(p.f, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, q_strides, k_strides, v_strides, out_strides,
                   batch, heads_q, heads_k, max_seqlen_q, max_seqlen_k, total_q, total_k, scale, window_left,
                   window_right, 0.0)) {
    return;
  }
  check_rows16("dout", dout, out_strides);
  check_rows16("dq", dq, dq_strides);
  require(delta != 0 && delta % 4 == 0 && dlse % 4 == 0, "delta (and dlse) must be 4-byte aligned float32 pointers");
  const bool varlen = cu_seqlens_q != 0;
  const int64_t sb = varlen ? 0 : 1;
  p.dout = ptr<const void>(dout);
  p.dlse = ptr<const float>(dlse);
  p.delta = ptr<float>(delta);
  p.dq = ptr<void>(dq);
  p.dq_sb = dq_strides[0] * sb;
  p.dq_ss = dq_strides[1];
  p.dq_sh = dq_strides[2];
  p.rows = varlen ? total_q : batch * max_seqlen_q;
  p.scale = static_cast<float>(scale);
  const bool any_keys = p.f.seqlen_k > 0;
  if (any_keys) {
    check_rows16("dk", dk, dk_strides);
    check_rows16("dv", dv, dk_strides);
    p.dk = ptr<void>(dk);
    p.dv = ptr<void>(dv);
    p.dk_sb = dk_strides[0] * sb;
    p.dk_ss = dk_strides[1];
    p.dk_sh = dk_strides[2];
  }
  const cudaStream_t s = as_stream(stream);
  dispatch_half(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_head_dim(head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if constexpr (hopper_bwd_head_dim(D)) {
        using C = WgmmaBwdConfig<D>;
        const dim3 delta_grid(static_cast<unsigned>((p.rows + 255) / 256), static_cast<unsigned>(heads_q));
        attn_bwd_delta_kernel<T, D><<<delta_grid, 256, 0, s>>>(p);
        check_launch("attn_bwd_delta_kernel");
        if (any_keys) {
          opt_in_smem(attn_bwd_dkdv_wgmma_kernel<T, D>, C::kDkdvSmemBytes, "attn_bwd_dkdv_wgmma_kernel");
          const dim3 grid(static_cast<unsigned>((max_seqlen_k + C::kKeys - 1) / C::kKeys),
                          static_cast<unsigned>(heads_k), static_cast<unsigned>(batch));
          attn_bwd_dkdv_wgmma_kernel<T, D><<<grid, C::kThreads, C::kDkdvSmemBytes, s>>>(p);
          check_launch("attn_bwd_dkdv_wgmma_kernel");
        }
        opt_in_smem(attn_bwd_dq_wgmma_kernel<T, D>, C::kDqSmemBytes, "attn_bwd_dq_wgmma_kernel");
        const dim3 grid(static_cast<unsigned>((max_seqlen_q + C::kRows - 1) / C::kRows),
                        static_cast<unsigned>(heads_q), static_cast<unsigned>(batch));
        attn_bwd_dq_wgmma_kernel<T, D><<<grid, C::kThreads, C::kDqSmemBytes, s>>>(p);
        check_launch("attn_bwd_dq_wgmma_kernel");
      }
    });
  });
}
