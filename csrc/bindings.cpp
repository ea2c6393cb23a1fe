// fastlm._C: the pybind11 module over the CUDA launchers.
//
// Tensors cross as raw device pointers (int, 0 for an absent tensor), sizes, row strides in elements, dtype codes
// (0 float32, 1 float16, 2 bfloat16), the device index and the stream (the cudaStream_t handle as an int, from
// torch.cuda.current_stream(device).cuda_stream). No libtorch: one build serves any torch version and compiles
// where nvcc is installed without a GPU. fastlm/_cuda.py is the only caller; it checks shapes and devices and
// allocates outputs and workspaces, so the launchers never allocate nor synchronize.
//
// Errors: every launcher first checks that a CUDA device is visible (RuntimeError "no CUDA device is visible"
// before any pointer is touched); a bad argument raises ValueError (std::invalid_argument); a CUDA error raises
// RuntimeError. The GIL is released while a launcher runs: launches are asynchronous, and another Python thread
// may feed another stream meanwhile.
//
// Every launcher is declared once, in launchers.h (with what it computes and which pointers may be 0), and defined
// by qualified name in its .cu file: a signature that drifts fails to compile instead of leaving an undefined symbol.
// The constants Python needs from the C++ side (dtype codes, what the attention kernels take, the activation codes)
// are module attributes, set below, so fastlm/_cuda.py keeps no copies.
//
// This file is compiled as host C++ (nvcc -x c++): no device code here, and no torch headers.

#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common.cuh"
#include "launchers.h"

namespace py = pybind11;

namespace {

// A std::integer_sequence as a Python tuple of ints.
template <int... Vs>
py::tuple int_tuple(std::integer_sequence<int, Vs...>) {
  return py::make_tuple(Vs...);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlm CUDA C++ kernels (raw-pointer launchers; use them through fastlm._cuda)";

  // Constants of the C++ side (launchers.h, common.cuh), for fastlm/_cuda.py.
  m.attr("DTYPE_FLOAT32") = static_cast<int>(fastlm::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(fastlm::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(fastlm::kBFloat16);
  m.attr("ATTN_DTYPES") = py::make_tuple(static_cast<int>(fastlm::kFloat16), static_cast<int>(fastlm::kBFloat16));
  m.attr("ATTN_HEAD_DIMS") = int_tuple(fastlm::AttnHeadDims{});
  m.attr("ATTN_MAX_TOKENS") = fastlm::kAttnMaxTokens;
  m.attr("ATTN_MAX_GRID") = fastlm::kAttnMaxGrid;
  m.attr("ATTN_WINDOW_INF") = fastlm::kAttnWindowInf;
  py::dict activations;
  activations["silu"] = static_cast<int>(fastlm::kSilu);
  activations["gelu_tanh"] = static_cast<int>(fastlm::kGeluTanh);
  activations["gelu"] = static_cast<int>(fastlm::kGelu);
  m.attr("GATED_ACTIVATIONS") = activations;

  m.def("compiled_archs", &fastlm::compiled_archs,
        "SM architectures of the device code in this binary, e.g. [80, 90].");
  m.def("cuda_runtime_version", &fastlm::cuda_runtime_version, "Version of the CUDA runtime linked in, e.g. '13.0'.");

  m.def("norm_fwd", &fastlm::norm_fwd,
        "LayerNorm / RMSNorm forward with the residual add fused. (M, N) operands by pointer and row stride; "
        "0 for an absent one. Writes y, residual_out (iff residual), mean (LayerNorm) and rstd.",
        py::arg("x"), py::arg("x_stride"), py::arg("residual"), py::arg("residual_stride"), py::arg("weight"),
        py::arg("bias"), py::arg("y"), py::arg("y_stride"), py::arg("residual_out"), py::arg("residual_out_stride"),
        py::arg("mean"), py::arg("rstd"), py::arg("M"), py::arg("N"), py::arg("dtype"), py::arg("wdtype"),
        py::arg("eps"), py::arg("is_rms"), py::arg("offset"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());

  m.def("norm_bwd_num_partials", &fastlm::norm_bwd_num_partials,
        "G, the number of fp32 partial rows of dw (and of db) that norm_bwd sums for (M, N) on this device.",
        py::arg("M"), py::arg("N"), py::arg("device"), py::call_guard<py::gil_scoped_release>());

  m.def("norm_bwd_workspace_numel", &fastlm::norm_bwd_workspace_numel,
        "float32 elements of the workspace norm_bwd needs: the (G, N) partials of dw and db that are wanted, plus "
        "(M, 2) row coefficients for rows too wide for registers.",
        py::arg("M"), py::arg("N"), py::arg("need_dw"), py::arg("need_db"), py::arg("device"),
        py::call_guard<py::gil_scoped_release>());

  m.def("norm_bwd", &fastlm::norm_bwd,
        "LayerNorm / RMSNorm backward. Writes dx (= the residual's gradient too), and dw / db (weight's dtype) "
        "when their pointers are non-zero, using `workspace` (norm_bwd_workspace_numel floats, any contents).",
        py::arg("dy"), py::arg("dy_stride"), py::arg("xin"), py::arg("xin_stride"), py::arg("weight"),
        py::arg("mean"), py::arg("rstd"), py::arg("dres"), py::arg("dres_stride"), py::arg("dx"),
        py::arg("dx_stride"), py::arg("dw"), py::arg("db"), py::arg("workspace"), py::arg("workspace_numel"),
        py::arg("M"), py::arg("N"), py::arg("dtype"), py::arg("wdtype"), py::arg("is_rms"), py::arg("offset"),
        py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def("cross_entropy_fwd", &fastlm::cross_entropy_fwd,
        "Softmax cross-entropy forward over (rows, V) logits (unit column stride). target: (rows,) int64 or int32; "
        "weight: (V,) fp32 or 0; scalars: (2,) fp32 device values (divisor, Σ w). Writes loss, row_max, log_s "
        "((rows,) fp32) and, when grad is non-zero, the gradient of the reduced loss for an incoming 1 (logits' "
        "dtype). softcap 0 means none.",
        py::arg("logits"), py::arg("logits_stride"), py::arg("target"), py::arg("target_int64"), py::arg("weight"),
        py::arg("scalars"), py::arg("loss"), py::arg("row_max"), py::arg("log_s"), py::arg("grad"),
        py::arg("grad_stride"), py::arg("rows"), py::arg("V"), py::arg("dtype"), py::arg("ignore_index"),
        py::arg("smoothing"), py::arg("z_loss"), py::arg("softcap"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());

  m.def("cross_entropy_bwd", &fastlm::cross_entropy_bwd,
        "Softmax cross-entropy backward for reduction 'none': grad = grad_out[row] · dloss_row/dlogits, recomputed "
        "from the logits and the forward's row_max and log_s; logits and grad may hold a block of cols columns, "
        "the classes col0 .. col0 + cols - 1 of V.",
        py::arg("logits"), py::arg("logits_stride"), py::arg("target"), py::arg("target_int64"), py::arg("weight"),
        py::arg("scalars"), py::arg("row_max"), py::arg("log_s"), py::arg("grad_out"), py::arg("grad"),
        py::arg("grad_stride"), py::arg("rows"), py::arg("V"), py::arg("cols"), py::arg("col0"), py::arg("dtype"),
        py::arg("ignore_index"),
        py::arg("smoothing"), py::arg("z_loss"), py::arg("softcap"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());

  m.def("cross_entropy_scale_grad", &fastlm::cross_entropy_scale_grad,
        "Scales the (rows, V) gradient in place by grad_out[0] (one fp32 device value); a no-op on the device when "
        "it is 1.0.",
        py::arg("grad"), py::arg("grad_stride"), py::arg("grad_out"), py::arg("rows"), py::arg("V"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def("cross_entropy_reduce_workspace_numel", &fastlm::cross_entropy_reduce_workspace_numel,
        "float64 elements of the workspace cross_entropy_scalars ('mean') and cross_entropy_reduce need for `rows` "
        "rows: 0 when one block takes them all (one launch), else one partial sum per block of rows.",
        py::arg("rows"), py::call_guard<py::gil_scoped_release>());

  m.def("cross_entropy_scalars", &fastlm::cross_entropy_scalars,
        "Writes the (2,) fp32 reduction scalars: [0] the divisor ('mean' (is_mean): the count of rows whose target "
        "is not ignore_index, or with weights Σ w_t over those whose target is a class, float64 rounded once; else "
        "1), [1] W = Σ_v w_v (float64 rounded once) or V. target: (rows,) int64 or int32; weight: (V,) fp32 or 0; "
        "workspace: cross_entropy_reduce_workspace_numel(rows) doubles for 'mean', else 0.",
        py::arg("target"), py::arg("target_int64"), py::arg("weight"), py::arg("scalars"), py::arg("workspace"),
        py::arg("workspace_numel"), py::arg("rows"), py::arg("V"), py::arg("ignore_index"), py::arg("is_mean"),
        py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def("cross_entropy_reduce", &fastlm::cross_entropy_reduce,
        "Writes the reduced loss, () fp32: Σ loss ((rows,) fp32) in float64, fixed order, rounded once, divided by "
        "scalars[0] when is_mean (scalars may be 0 otherwise). workspace: cross_entropy_reduce_workspace_numel(rows) "
        "doubles.",
        py::arg("loss"), py::arg("scalars"), py::arg("out"), py::arg("workspace"), py::arg("workspace_numel"),
        py::arg("rows"), py::arg("is_mean"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());

  m.def("attention_decode_splits", &fastlm::attention_decode_splits,
        "How attention_fwd should run a call of this shape: 0 for the forward kernel, else the number of key splits "
        "of the decode kernel (1: no workspace, no combine). Decode takes max_seqlen_q · heads_q / heads_k ≤ 16 "
        "where its shared memory fits the device; splits are chosen from batch · heads_k, the keys a query may see "
        "and the SM count (no device reads).",
        py::arg("batch"), py::arg("heads_q"), py::arg("heads_k"), py::arg("head_dim"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("window_left"), py::arg("window_right"), py::arg("device"),
        py::call_guard<py::gil_scoped_release>());

  m.def("attention_workspace_numel", &fastlm::attention_workspace_numel,
        "float32 elements of the decode workspace for num_splits > 1 (partial outputs and log-sum-exps of every "
        "split); 0 otherwise.",
        py::arg("batch"), py::arg("heads_q"), py::arg("heads_k"), py::arg("head_dim"), py::arg("max_seqlen_q"),
        py::arg("num_splits"), py::call_guard<py::gil_scoped_release>());

  m.def("attention_fwd", &fastlm::attention_fwd,
        "Attention forward (fp16/bf16, head dims 32, 64, 96, 128, 256; GQA; varlen through cu_seqlens (int32, "
        "0 for none); sliding window (None: unbounded); softcap 0 means none). Writes out (q's layout, q's dtype) "
        "and lse (fp32). Strides are (batch, token, head) in elements, the head dim contiguous. num_splits from "
        "attention_decode_splits; workspace: attention_workspace_numel floats when it is > 1. hopper: 0 for the "
        "FlashAttention-2 forward kernel, 1 (serial loop) or 2 (softmax overlapping P·V) for the kernel on wgmma "
        "where attention_hopper_supported (the FlashAttention-2 kernel elsewhere), 3 for the warp-specialized TMA "
        "kernel where it takes the call (dense, head dims 64 and 128; else as 2), 4 the same with its consumer warp "
        "groups in pingpong.",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
        py::arg("out_strides"), py::arg("batch"), py::arg("heads_q"), py::arg("heads_k"), py::arg("head_dim"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("total_q"), py::arg("total_k"), py::arg("dtype"),
        py::arg("scale"), py::arg("window_left"), py::arg("window_right"), py::arg("softcap"), py::arg("workspace"),
        py::arg("workspace_numel"), py::arg("num_splits"), py::arg("hopper"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());

  m.def("attention_bwd", &fastlm::attention_bwd,
        "Attention backward on wgmma (compute capability 9.0, head dims 64 and 128, no softcap): dq, dk, dv from "
        "dout (out's strides), the forward's out and lse, and dlse (0 for none); delta: a float32 workspace of lse's "
        "shape. Varlen tokens outside every sequence are not written.",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dlse"),
        py::arg("delta"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
        py::arg("out_strides"), py::arg("dq_strides"), py::arg("dk_strides"), py::arg("batch"), py::arg("heads_q"),
        py::arg("heads_k"), py::arg("head_dim"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
        py::arg("total_q"), py::arg("total_k"), py::arg("dtype"), py::arg("scale"), py::arg("window_left"),
        py::arg("window_right"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def("attention_hopper_supported", &fastlm::attention_hopper_supported,
        "Whether attention_fwd(hopper=1, 2, 3 or 4) runs the wgmma forward kernel for this head dim on this device "
        "(backward=False), or attention_bwd can run (backward=True): compute capability 9.0, a build with sm_90a "
        "code, head dims 64, 128 and (forward) 256.",
        py::arg("head_dim"), py::arg("backward"), py::arg("device"), py::call_guard<py::gil_scoped_release>());

  m.def("rotary", &fastlm::rotary,
        "Rotary position embedding of x (batch, seq, heads, head_dim) over its first rot features (the rest copied) "
        "into out. Strides in elements: x and out (batch, seq, head), feature stride 1; cos and sin (batch, seq) "
        "(batch 0: one table), feature stride 1, one dtype (cdtype: float32 or x's). backward applies the "
        "transpose (the gradient).",
        py::arg("x"), py::arg("x_strides"), py::arg("cos"), py::arg("sin"), py::arg("cos_strides"), py::arg("out"),
        py::arg("out_strides"), py::arg("batch"), py::arg("seqlen"), py::arg("heads"), py::arg("head_dim"),
        py::arg("rot"), py::arg("dtype"), py::arg("cdtype"), py::arg("interleaved"), py::arg("backward"),
        py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def("gated_fwd", &fastlm::gated_fwd,
        "h = act(gate)·up over (M, N) operands (unit column stride, row strides in elements). activation: 0 silu "
        "(SwiGLU), 1 gelu tanh, 2 gelu erf (GeGLU).",
        py::arg("gate"), py::arg("gate_stride"), py::arg("up"), py::arg("up_stride"), py::arg("h"),
        py::arg("h_stride"), py::arg("M"), py::arg("N"), py::arg("dtype"), py::arg("activation"), py::arg("device"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def("gated_bwd", &fastlm::gated_bwd,
        "Backward of gated_fwd: writes dgate = dh·up·act'(gate) and dup = dh·act(gate).",
        py::arg("dh"), py::arg("dh_stride"), py::arg("gate"), py::arg("gate_stride"), py::arg("up"),
        py::arg("up_stride"), py::arg("dgate"), py::arg("dgate_stride"), py::arg("dup"), py::arg("dup_stride"),
        py::arg("M"), py::arg("N"), py::arg("dtype"), py::arg("activation"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
}
