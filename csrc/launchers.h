// fastlm._C's launchers: the one declaration of everything bindings.cpp exposes, and the constants Python reads
// back from the module (bindings.cpp exports them with m.attr; fastlm/_cuda.py must not keep copies).
//
// The contract (see bindings.cpp's header): tensors cross as raw device addresses (int64, 0 for an absent tensor),
// sizes, row strides in elements, dtype codes (common.cuh: 0 float32, 1 float16, 2 bfloat16), the device index and
// the stream handle (an int). A launcher checks that a device is visible before it touches a pointer, checks its
// arguments (std::invalid_argument: ValueError), never allocates and never synchronizes: outputs and workspaces
// come from the caller, and kernels are only enqueued on `stream`.
//
// Each .cu file defines its launchers with qualified names (`void fastlm::norm_fwd(...) { ... }`) after including
// this header, so a definition that does not match its declaration here is a compile error, not an overload the
// bindings would never call or an undefined symbol at import.
//
// Host C++ only (bindings.cpp is compiled without nvcc's device pass): no CUDA types here.

#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace fastlm {

// ---------------------------------------------------------------------------------------------------------------
// Constants shared with Python (exported as module attributes; see bindings.cpp).

// Head dims the attention kernels are compiled for (one instance each); attention takes dtype codes 1 and 2 only.
using AttnHeadDims = std::integer_sequence<int, 32, 64, 96, 128, 256>;
// Token positions and counts of an attention call stay below this (positions' differences fit an int).
constexpr int64_t kAttnMaxTokens = int64_t{1} << 30;
// Attention windows are clamped to ±kAttnWindowInf (None is +kAttnWindowInf), far beyond any position.
constexpr int64_t kAttnWindowInf = int64_t{1} << 40;
// Batch entries and query heads index the attention grids' y and z dimensions.
constexpr int64_t kAttnMaxGrid = 65535;

// The gated activations' codes (gated_fwd / gated_bwd `activation`; kernels/gated.py's ACTIVATIONS).
enum Activation : int { kSilu = 0, kGeluTanh = 1, kGelu = 2 };

// ---------------------------------------------------------------------------------------------------------------
// Build information (norm.cu).

// SM architectures of the device code in this binary, e.g. {80, 90}.
std::vector<int> compiled_archs();
// Version of the CUDA runtime linked in, e.g. "13.0" (no GPU needed).
std::string cuda_runtime_version();

// ---------------------------------------------------------------------------------------------------------------
// LayerNorm / RMSNorm (norm.cu). (M, N) operands by pointer and row stride, unit column stride.

// Forward with the residual add fused: y = norm(x + residual)·w + b; writes residual_out = x + residual (given iff
// residual is), mean (LayerNorm only; 0 for RMSNorm) and rstd. May be 0: residual and residual_out together,
// weight, bias (LayerNorm only). wdtype: the weight's and bias's dtype code, dtype's or float32. offset: RMSNorm's
// weight offset (w_eff = offset + w).
void norm_fwd(int64_t x, int64_t x_stride, int64_t residual, int64_t residual_stride, int64_t weight, int64_t bias,
              int64_t y, int64_t y_stride, int64_t residual_out, int64_t residual_out_stride, int64_t mean,
              int64_t rstd, int64_t M, int64_t N, int dtype, int wdtype, double eps, bool is_rms, double offset,
              int device, int64_t stream);
// G, the number of fp32 partial rows of dw (and of db) that norm_bwd sums for (M, N) on this device.
int64_t norm_bwd_num_partials(int64_t M, int64_t N, int device);
// float32 elements of norm_bwd's workspace: the wanted (G, N) partials of dw and db, plus (M, 2) row coefficients.
int64_t norm_bwd_workspace_numel(int64_t M, int64_t N, bool need_dw, bool need_db, int device);
// Backward: writes dx (also the residual's gradient), and dw / db (weight's dtype) when non-zero. May be 0: weight,
// mean (RMSNorm), dres (the incoming gradient of residual_out), dw, db (LayerNorm only). workspace: at least
// norm_bwd_workspace_numel floats, any contents.
void norm_bwd(int64_t dy, int64_t dy_stride, int64_t xin, int64_t xin_stride, int64_t weight, int64_t mean,
              int64_t rstd, int64_t dres, int64_t dres_stride, int64_t dx, int64_t dx_stride, int64_t dw, int64_t db,
              int64_t workspace, int64_t workspace_numel, int64_t M, int64_t N, int dtype, int wdtype, bool is_rms,
              double offset, int device, int64_t stream);

// ---------------------------------------------------------------------------------------------------------------
// Softmax cross-entropy (cross_entropy.cu). (rows, V) logits with unit column stride; target (rows,) int64
// (target_int64) or int32; weight (V,) fp32 class weights or 0; scalars (2,) fp32 device values (the reduction's
// divisor, W = Σ_v w_v), from cross_entropy_scalars.

// Forward: writes loss, row_max, log_s ((rows,) fp32) and, when grad is non-zero, the gradient of the reduced loss
// for an incoming gradient of 1 (logits' dtype; grad may be the logits themselves). softcap 0 means none.
void cross_entropy_fwd(int64_t logits, int64_t logits_stride, int64_t target, bool target_int64, int64_t weight,
                       int64_t scalars, int64_t loss, int64_t row_max, int64_t log_s, int64_t grad,
                       int64_t grad_stride, int64_t rows, int64_t V, int dtype, int64_t ignore_index,
                       double smoothing, double z_loss, double softcap, int device, int64_t stream);
// Backward for reduction "none": grad = grad_out[row]·d loss_row / d logits, recomputed from the logits, row_max
// and log_s; grad_out (rows,) fp32.
// logits and grad hold `cols` columns, the classes col0 .. col0 + cols − 1 of V (V and 0: whole rows).
void cross_entropy_bwd(int64_t logits, int64_t logits_stride, int64_t target, bool target_int64, int64_t weight,
                       int64_t scalars, int64_t row_max, int64_t log_s, int64_t grad_out, int64_t grad,
                       int64_t grad_stride, int64_t rows, int64_t V, int64_t cols, int64_t col0, int dtype,
                       int64_t ignore_index, double smoothing, double z_loss, double softcap, int device,
                       int64_t stream);
// "mean"/"sum" backward: grad *= grad_out[0] (one fp32 device value) in place; nothing on the device when it is 1.
void cross_entropy_scale_grad(int64_t grad, int64_t grad_stride, int64_t grad_out, int64_t rows, int64_t V,
                              int dtype, int device, int64_t stream);
// float64 elements of the workspace cross_entropy_scalars and cross_entropy_reduce need for `rows` rows: 0 when
// one block takes them all (one launch), else one partial sum per block of rows (two launches).
int64_t cross_entropy_reduce_workspace_numel(int64_t rows);
// Writes scalars (2,) fp32: [0] the divisor of the reduced loss ("mean" (is_mean): the count of rows whose target
// is not ignore_index, or with weights Σ w_t over those whose target is a class, in float64 rounded once; else 1),
// [1] W = Σ_v w_v in float64 rounded once, or V without weights. weight may be 0. workspace (is_mean only; else
// may be 0): cross_entropy_reduce_workspace_numel(rows) doubles, any contents (0 when that is 0).
void cross_entropy_scalars(int64_t target, bool target_int64, int64_t weight, int64_t scalars, int64_t workspace,
                           int64_t workspace_numel, int64_t rows, int64_t V, int64_t ignore_index, bool is_mean,
                           int device, int64_t stream);
// Writes out () fp32: Σ loss ((rows,) fp32) in float64 in a fixed order, rounded once, divided by scalars[0] when
// is_mean. scalars may be 0 unless is_mean. workspace as for cross_entropy_scalars.
void cross_entropy_reduce(int64_t loss, int64_t scalars, int64_t out, int64_t workspace, int64_t workspace_numel,
                          int64_t rows, bool is_mean, int device, int64_t stream);

// ---------------------------------------------------------------------------------------------------------------
// Attention forward (attention.cu): fp16/bf16, AttnHeadDims, GQA, varlen, sliding windows, softcap.

// 0 when attention_fwd should run the forward kernel, else the decode kernel's number of key splits (1: no
// workspace). window_left / window_right: nullopt for unbounded.
int64_t attention_decode_splits(int64_t batch, int64_t heads_q, int64_t heads_k, int64_t head_dim,
                                int64_t max_seqlen_q, int64_t max_seqlen_k, std::optional<int64_t> window_left,
                                std::optional<int64_t> window_right, int device);
// float32 elements of the decode workspace for num_splits > 1; 0 otherwise.
int64_t attention_workspace_numel(int64_t batch, int64_t heads_q, int64_t heads_k, int64_t head_dim,
                                  int64_t max_seqlen_q, int64_t num_splits);
// Writes out (q's layout and dtype) and lse (fp32). Strides are (batch, token, head) in elements. May be 0:
// cu_seqlens_q and cu_seqlens_k together (not varlen), k and v when there are no keys, workspace unless
// num_splits > 1. softcap 0 means none. hopper: 0 for the FlashAttention-2 forward kernel; 1 and 2 for the one on
// wgmma (attn_fwd_wgmma_kernel) where attention_hopper_supported says it exists, 1 its serial loop, 2 its loop with
// each block's softmax overlapping the previous block's P·V (the FlashAttention-2 kernel where it does not exist);
// 3 for the warp-specialized TMA kernel (attn_fwd_ws_kernel) where it takes the call (dense, head dims 64 and 128,
// TMA-addressable), else as 2; 4 as 3 with its two consumer warp groups in pingpong.
void attention_fwd(int64_t q, int64_t k, int64_t v, int64_t out, int64_t lse, int64_t cu_seqlens_q,
                   int64_t cu_seqlens_k, std::vector<int64_t> q_strides, std::vector<int64_t> k_strides,
                   std::vector<int64_t> v_strides, std::vector<int64_t> out_strides, int64_t batch, int64_t heads_q,
                   int64_t heads_k, int64_t head_dim, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t total_q,
                   int64_t total_k, int dtype, double scale, std::optional<int64_t> window_left,
                   std::optional<int64_t> window_right, double softcap, int64_t workspace, int64_t workspace_numel,
                   int64_t num_splits, int hopper, int device, int64_t stream);
// The gradients of attention_fwd's out (and lse, when dlse is not 0) on wgmma (attn_bwd_*_wgmma_kernel, no softcap,
// where attention_hopper_supported): dq (q's shape), dk and dv (k's shape, dk_strides for both), delta a float32
// workspace of lse's shape. dout has out's strides. Varlen tokens outside every sequence are not written.
void attention_bwd(int64_t dout, int64_t q, int64_t k, int64_t v, int64_t out, int64_t lse, int64_t dlse,
                   int64_t delta, int64_t dq, int64_t dk, int64_t dv, int64_t cu_seqlens_q, int64_t cu_seqlens_k,
                   std::vector<int64_t> q_strides, std::vector<int64_t> k_strides, std::vector<int64_t> v_strides,
                   std::vector<int64_t> out_strides, std::vector<int64_t> dq_strides,
                   std::vector<int64_t> dk_strides, int64_t batch, int64_t heads_q, int64_t heads_k,
                   int64_t head_dim, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t total_q, int64_t total_k,
                   int dtype, double scale, std::optional<int64_t> window_left,
                   std::optional<int64_t> window_right, int device, int64_t stream);
// Whether attention_fwd(hopper=1, 2, 3 or 4) runs the wgmma forward kernel for this head dim on this device (backward
// false), or attention_bwd can run (true): compute capability 9.0, a build with sm_90a code, head dim 64, 128 or
// (forward) 256.
bool attention_hopper_supported(int64_t head_dim, bool backward, int device);

// ---------------------------------------------------------------------------------------------------------------
// Rotary position embedding (rotary.cu).

// out = x rotated over its first rot features (the rest copied); x and out (batch, seq, heads, head_dim) with
// (batch, seq, head) strides; cos and sin (batch, seq) strides (batch stride 0: one table), dtype cdtype (float32
// or dtype's). backward applies the transpose. No pointer may be 0 (unless the call is empty).
void rotary(int64_t x, std::vector<int64_t> x_strides, int64_t cos, int64_t sin, std::vector<int64_t> cos_strides,
            int64_t out, std::vector<int64_t> out_strides, int64_t batch, int64_t seqlen, int64_t heads,
            int64_t head_dim, int64_t rot, int dtype, int cdtype, bool interleaved, bool backward, int device,
            int64_t stream);

// ---------------------------------------------------------------------------------------------------------------
// Gated activations, SwiGLU and GeGLU (gated.cu). (M, N) operands, unit column stride; activation: Activation.

// h = act(gate)·up. No pointer may be 0 (unless the call is empty).
void gated_fwd(int64_t gate, int64_t gate_stride, int64_t up, int64_t up_stride, int64_t h, int64_t h_stride,
               int64_t M, int64_t N, int dtype, int activation, int device, int64_t stream);
// dgate = dh·up·act'(gate), dup = dh·act(gate). No pointer may be 0 (unless the call is empty).
void gated_bwd(int64_t dh, int64_t dh_stride, int64_t gate, int64_t gate_stride, int64_t up, int64_t up_stride,
               int64_t dgate, int64_t dgate_stride, int64_t dup, int64_t dup_stride, int64_t M, int64_t N, int dtype,
               int activation, int device, int64_t stream);

}  // namespace fastlm
