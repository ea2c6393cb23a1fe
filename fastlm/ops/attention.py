"""Attention: argument checks, backend dispatch, torch.library registration and autograd.

The math, the roofline and the kernel design are in kernels/attention.py (Triton) and csrc/attention.cu (CUDA C++);
the reference is fastlm.reference.attention_masked.

Two entry points:
- `fastlm.attention(q, k, v, ...)`: flash-attn's conventions, layout (batch, seqlen, heads, head_dim), packed
  variable-length batches, causal aligned bottom-right, sliding window, softcap, GQA, the LSE on request.
- `fastlm.scaled_dot_product_attention(...)`: a drop-in for torch's, in its (batch, heads, seqlen, head_dim) layout
  and its top-left causal convention. What the kernels do not cover (a dense mask, dropout) goes to torch's SDPA.

Internally a window is in bounded form: (window_left, window_right), each an int or None (unbounded); causal is
window_right = 0 (see fastlm.reference.attention_visible). Two registered ops carry it:
`fastlm::attention_fwd` → (out, lse) and `fastlm::attention_bwd` → (dq, dk, dv), with fake implementations so
torch.compile traces them without graph breaks, and an autograd formula. The cuda backend runs the CUDA C++ forward
(and its split-KV decode kernel for short queries over long keys) and the Triton backward, which shares its LSE
convention, or its own wgmma backward where fastlm._cuda.ATTN_HOPPER_BWD is on (Hopper, head dims 64 and 128, no
softcap). No op reads a GPU value on the host: varlen callers pass the maxima of the sequence lengths.

Saved for backward: q, k, v, out, lse (fp32, one float a query row and head) and the offsets.
"""

from typing import Optional

import torch
import torch.nn.functional as F
import torch.nn.attention as _attn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastlm import _backend, _util, reference
from fastlm.kernels import attention as triton_attention
from fastlm.ops import _checks, _eager

# The public limit: the largest head dim the op takes. Both kernel backends' tables reach it (block_d(256) in
# kernels/attention.py, the head dims of csrc/attention.cu); float32 stops lower (attention_unsupported says so).
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------- registered ops


@_eager.custom_op("fastlm::attention_fwd", mutates_args=())
def attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    window_left: Optional[int],
    window_right: Optional[int],
    softcap: float,
    backend: str,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """→ out (q's shape, contiguous), lse fp32 (B, Hq, Sq) or (Hq, Tq) with cu_seqlens. `deterministic` is for the
    backward (saved by the autograd formula)."""
    return _backend.launchers(backend, triton_attention).attention_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap)


def _lse_shape(q, cu_seqlens_q):
    if cu_seqlens_q is not None:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


@attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap,
      backend, deterministic):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32)


@_eager.custom_op("fastlm::attention_bwd", mutates_args=())
def attention_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    window_left: Optional[int],
    window_right: Optional[int],
    softcap: float,
    backend: str,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ dq, dk, dv (contiguous, the shapes and dtypes of q, k, v). Both kernel backends use the Triton backward,
    but the cuda backend's takes its wgmma backward where fastlm._cuda.ATTN_HOPPER_BWD is on and the call is one it
    has (it is always bitwise repeatable); deterministic: bitwise repeatable (no atomic dQ)."""
    launchers = triton_attention
    if backend == "cuda":
        from fastlm import _cuda

        if _cuda.ATTN_HOPPER_BWD and _cuda.attention_bwd_unsupported(q, softcap) is None:
            launchers = _cuda
    return launchers.attention_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, scale, window_left, window_right, softcap, deterministic)


@attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
      window_right, softcap, backend, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, backend, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, left, right, softcap, backend, deterministic)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    # The kernels index dlse as lse is laid out; autograd may hand it over expanded (stride 0) from a sum.
    dlse = dlse.contiguous() if dlse is not None else None
    # Deterministic as the forward's call asked, or as torch.use_deterministic_algorithms asks now (it may be turned
    # on around the backward alone).
    *args, deterministic = ctx.args
    dq, dk, dv = attention_bwd_op(_util.unit_stride_last(dout), q, k, v, out, lse, dlse, cu_q, cu_k, *args,
                                  deterministic or torch.are_deterministic_algorithms_enabled())
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- checks


def _int_arg(name, value):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _check_qkv(q, k, v, varlen):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, t)
    for name, t in (("k", k), ("v", v)):
        _checks.same_device(name, t, "q", q)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype ({q.dtype}), got {t.dtype}")
    layout = "(total_tokens, heads, head_dim) with cu_seqlens" if varlen else "(batch, seqlen, heads, head_dim)"
    ndim = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    D = q.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"q and k must have the same head_dim, got {D} and {k.shape[-1]}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {D}")
    hq, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"the number of q heads ({hq}) must be a multiple of the number of k/v heads ({hk})")


def _check_cu(name, cu, q, batch=None):
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 ≥ 2 offsets, got shape {tuple(cu.shape)}")
    if batch is not None and cu.numel() != batch + 1:
        raise ValueError(f"{name} must have as many offsets as cu_seqlens_q ({batch + 1}), got {cu.numel()}")
    _checks.same_device(name, cu, "q", q)
    return cu.contiguous()


def _check_cu_values(name, cu, total, max_seqlen, max_name):
    """The offsets' values, where reading them costs no device sync (CPU offsets): 0 ≤ cu[0] ≤ … ≤ cu[-1] ≤ total,
    and no sequence longer than max_seqlen. Offsets on a GPU are not read here: that would sync with the device."""
    if cu.device.type != "cpu" or torch.compiler.is_compiling():  # a value read is a graph break when tracing
        return
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) < 0 or bool((lengths < 0).any()) or int(cu[-1]) > total:
        raise ValueError(f"{name} must be non-decreasing offsets from ≥ 0 to ≤ the {total} packed tokens, got "
                         f"{cu.tolist()}")
    if lengths.numel() and int(lengths.max()) > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is shorter than the longest sequence in {name} "
                         f"({int(lengths.max())})")


def _positive_int(name, value):
    value = _int_arg(name, value)
    if not value >= 1:
        raise ValueError(f"{name} must be ≥ 1 (the longest sequence's length), got {value}")
    return value


def _check_window(window):
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a pair (left, right) of ints, -1 for unbounded, got {window!r}")
    return tuple(_int_arg(f"window[{i}]", w) for i, w in enumerate(window))


def _check_scale(scale, head_dim):
    if scale is None:
        return head_dim ** -0.5
    return _checks.finite("scale", scale)


# ---------------------------------------------------------------------------------------------- dispatch


# torch's SDPA backends that `auto` may route a call to (fastlm._backend.NATIVE), by the table's names, and torch's
# own test of whether that backend takes a call.
_SDPA_BACKENDS = {"torch:sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "torch:sdpa-flash": SDPBackend.FLASH_ATTENTION}
_SDPA_CAN_USE = {"torch:sdpa-cudnn": "can_use_cudnn_attention", "torch:sdpa-flash": "can_use_flash_attention"}


def _sdpa_causal(q, k, right):
    """SDPA's is_causal for this call, or None when SDPA has no mask equal to fastlm's: fastlm's causal mask is
    aligned bottom-right (query i sees keys j ≤ i + Sk − Sq + right), SDPA's top-left (j ≤ i)."""
    sq, sk = q.shape[1], k.shape[1]
    if right is None or right >= sq - 1:
        return False  # no key is hidden from any query (a decode step's causal mask, say)
    if right + sk - sq == 0:
        return True
    return None


def _native_reason(name, q, k, v, cu_q, left, right, softcap, need_lse, deterministic):
    """Why torch's SDPA with the backend `name` cannot compute this call exactly as fastlm defines it, or None."""
    if need_lse:
        return "SDPA does not return the log-sum-exp"
    if deterministic:
        return "deterministic: SDPA's flash backward is not bitwise repeatable"
    if cu_q is not None:
        return "SDPA has no variable-length form"
    if softcap:
        return "SDPA has no softcap"
    if left is not None:
        return "SDPA has no sliding window"
    causal = _sdpa_causal(q, k, right)
    if causal is None:
        return "SDPA's causal mask is aligned top-left: it covers causal calls with as many queries as keys"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return "SDPA's flash and cuDNN backends take float16 and bfloat16"
    if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") != q.dtype:
        return "under autocast to another dtype SDPA would compute in that dtype and return it"
    if torch.compiler.is_compiling():
        return "under torch.compile the fastlm kernels are traced (a graph holds one implementation)"
    key = _sdpa_key(name, q, k, v, causal)
    try:
        return _SDPA_VERDICTS[key]
    except KeyError:
        pass
    try:
        params = torch.backends.cuda.SDPAParams(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 0.0,
                                                causal, q.shape[2] != k.shape[2])
        ok = getattr(torch.backends.cuda, _SDPA_CAN_USE[name])(params)
    except Exception as e:  # noqa: BLE001 - an API this torch lacks: the route is not taken
        return f"cannot ask torch whether {name} takes this call ({type(e).__name__})"
    why = None if ok else f"torch's {name} backend does not take this call (dtype, head dim or shape)"
    _remember(key, why)
    return why


def _remember(key, why):
    if len(_SDPA_VERDICTS) >= _SDPA_VERDICTS_MAX:
        _SDPA_VERDICTS.clear()
    _SDPA_VERDICTS[key] = why


# torch's verdict on whether an SDPA backend takes a call, by what that verdict depends on (_sdpa_key), so that the
# `auto` route asks once per kind of call rather than on every step (building SDPAParams and running the backend's
# constraints: ~3 µs and more of a call's host path). A backend that raised on a call torch said it takes (cuDNN's
# "No execution plans support the graph", raised while it builds its graph for a shape: pytorch/pytorch#140930,
# #122695) gets that error as its verdict: `auto` passes over the route for such calls from then on, so the error
# is paid once, not every step. Bounded: a run whose shapes never repeat (a KV cache growing by a token a step) would
# otherwise grow it without end; when full it starts over (a failed route is then tried, and fails, once more).
_SDPA_VERDICTS: dict = {}
_SDPA_VERDICTS_MAX = 4096
_SDP_ENABLED = {"torch:sdpa-cudnn": getattr(torch._C, "_get_cudnn_sdp_enabled", None),
                "torch:sdpa-flash": getattr(torch._C, "_get_flash_sdp_enabled", None)}
_current_cuda_device = getattr(torch._C, "_cuda_getDevice", None)


def _sdpa_key(name, q, k, v, causal):
    """Everything torch's can_use_cudnn_attention / can_use_flash_attention read (the constraints in aten's
    transformers/cuda/sdp_utils.cpp): the three tensors' sizes, strides, dtype and device, whether a gradient will
    be recorded (grad mode and requires_grad), the causal flag, the backend's global switch
    (torch.backends.cuda.enable_*_sdp), and the current CUDA device, whose properties the hardware checks read.
    (Deterministic algorithms, the other global they read, keep every call off these routes before they are asked;
    fastlm passes no mask, no dropout and no nested tensor.)"""
    enabled = _SDP_ENABLED[name]
    return (name, q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device, causal,
            torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
            enabled() if enabled is not None else None,
            _current_cuda_device() if q.is_cuda and _current_cuda_device is not None else None)


def _kernel_unsupported(q, k, v, cu_q, left, right, softcap, need_lse, deterministic):
    def unsupported(backend):
        if backend.startswith("torch:"):
            return _native_reason(backend, q, k, v, cu_q, left, right, softcap, need_lse, deterministic)
        return _backend.launchers(backend, triton_attention).attention_unsupported(q, k, cu_q, left, right, softcap)

    return unsupported


def _sdp_switches():
    """[(is enabled, enable, backend)] for each of SDPA's backends, from torch's own table of their flags (the one
    `sdpa_kernel` walks), or None where this torch lacks it."""
    names = getattr(_attn, "_backend_names", None)
    try:
        return [(getattr(torch._C, f"_get_{flag}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{flag}"),
                 getattr(SDPBackend, member)) for flag, member in names.items()]
    except (AttributeError, TypeError):
        return None


# SDPA's backend switches, set directly around the routed call: `sdpa_kernel` does the same (every other backend
# off, then the previous flags back) through a generator context manager, a list and a dict, 12 µs a call on a
# 2-core CPU against ~3 µs for the fifteen flag calls; on the `auto` route every call of a training step pays it.
_SDP_SWITCHES = _sdp_switches()


def _sdpa(q, k, v, scale, right, name):
    """torch's SDPA with the measured backend alone (its test passed in _native_reason), on fastlm's
    (batch, seqlen, heads, head_dim) layout. Only `name`'s backend is enabled during the call, and every flag is
    restored afterwards, also when it raises (as `sdpa_kernel` does, which is used where the flags' table is
    missing). The backward needs no flags: it is the chosen backend's own."""
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    kwargs = dict(is_causal=_sdpa_causal(q, k, right), scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    only = _SDPA_BACKENDS[name]
    if _SDP_SWITCHES is None:
        with sdpa_kernel(only):
            return F.scaled_dot_product_attention(*args, **kwargs).transpose(1, 2)
    was = [enabled() for enabled, _, _ in _SDP_SWITCHES]
    try:
        for _, enable, backend in _SDP_SWITCHES:
            enable(backend == only)
        out = F.scaled_dot_product_attention(*args, **kwargs)
    finally:
        for (_, enable, _), on in zip(_SDP_SWITCHES, was):
            enable(on)
    return out.transpose(1, 2)


def _attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, need_lse=True, deterministic=False):
    """Dispatch the checked call: → (out, lse), lse None when need_lse is False and torch's SDPA ran it. Calls
    with a short query side (≤ DECODE_MAX_SEQLEN_Q: decoding over a KV cache) are looked up in the measured
    dispatch table as "attention_decode". deterministic: a bitwise repeatable backward, also asked for by
    torch.use_deterministic_algorithms(True)."""
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    if q.device.type == "meta":
        # Shapes only (model init on meta, FSDP), under every backend: the registered op's fake and autograd give
        # them (the reference would read varlen offsets on the host). LSE dtype as the reference's for float64.
        out, lse = attention_fwd_op(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, "triton",
                                    deterministic)
        return out, lse.to(torch.float64) if q.dtype == torch.float64 else lse
    op = "attention_decode" if max_q <= triton_attention.DECODE_MAX_SEQLEN_Q else "attention"
    backend = _backend.resolve(op, q.device, q.dtype,
                               unsupported=_kernel_unsupported(q, k, v, cu_q, left, right, softcap, need_lse,
                                                               deterministic))
    if backend == "torch":
        return reference.attention_masked(q, k, v, scale, left, right, softcap, cu_q, cu_k)
    if backend in _SDPA_BACKENDS:
        try:
            return _sdpa(q, k, v, scale, right, backend), None
        except RuntimeError as e:
            # Out of memory, or a CUDA error (the context is gone): no other route would do better; say so.
            if isinstance(e, (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError))):
                raise
            # A backend that fails at run time on a call torch said it takes (the forward's graph build): the
            # call goes to the next route of the table, and so do later calls of its shape, said once. (A failure
            # in SDPA's backward cannot be rerouted: the forward has run; it is torch's own, as without fastlm.)
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            _remember(_sdpa_key(backend, q, k, v, _sdpa_causal(q, k, right)),
                      f"{backend} failed on a call of this kind earlier ({why})")
            _backend.say_once(f"sdpa failed {backend} {why}", f"fastlm.attention: torch's {backend} raised on a "
                              f"call it said it takes ({why}); such calls take the next route", stacklevel=4)
            return _attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, need_lse,
                              deterministic)
    q, k, v = (_util.unit_stride_last(t) for t in (q, k, v))
    return attention_fwd_op(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, backend,
                            deterministic)


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0, cu_seqlens_q=None,
              cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, return_lse=False, deterministic=False):
    """Softmax attention, FlashAttention's conventions.

    q (batch, seqlen_q, heads, head_dim); k, v (batch, seqlen_k, kv_heads, head_dim), kv_heads dividing heads
    (GQA, MQA: query head h reads kv head h // (heads / kv_heads)). head_dim 1 to 256; fp16, bf16 or fp32 (fp64 on
    the torch backend).
    Variable length: with cu_seqlens_q and cu_seqlens_k (int32 (batch + 1,) offsets) q is packed
    (total_q, heads, head_dim) and k, v (total_k, kv_heads, head_dim); sequence b attends only within itself, and
    max_seqlen_q, max_seqlen_k (host ints, at least the longest sequence) are required so nothing syncs. Packed
    tokens in no sequence (before cu_seqlens[0] or from cu_seqlens[-1]) get output 0, LSE −inf and zero gradients.
    causal: query i sees key j when j ≤ i + seqlen_k − seqlen_q (bottom-right, FlashAttention ≥ 2.1).
    window=(left, right): query i sees keys i + off − left … i + off + right, off = seqlen_k − seqlen_q; −1
    unbounded. softcap > 0: scores become softcap·tanh(score/softcap) before the softmax. scale defaults to
    head_dim^−½. A query that sees no key gets output 0 (and −inf LSE, zero gradients).
    Returns out (q's shape and dtype), and with return_lse the natural-log LSE (batch, heads, seqlen_q) fp32
    ((heads, total_q) for varlen), differentiable.
    deterministic: True gives gradients that are bitwise repeatable: no atomic adds in the backward (the
    Triton backward's atomic dQ, when kernels/attention.py's DQ_ATOMIC_DEFAULT turns it on), and `auto` kept off
    torch's SDPA (whose flash backward is not repeatable) where the measured table would route the call there.
    torch.use_deterministic_algorithms(True) asks for the same.
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    _check_qkv(q, k, v, varlen)
    left, right = reference.attention_window(causal, _check_window(window))
    scale = _check_scale(scale, q.shape[-1])
    softcap = _checks.non_negative("softcap", softcap)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
        cu_q = _check_cu("cu_seqlens_q", cu_seqlens_q, q)
        cu_k = _check_cu("cu_seqlens_k", cu_seqlens_k, q, batch=cu_q.numel() - 1)
        if max_seqlen_q is None or max_seqlen_k is None:
            raise ValueError("max_seqlen_q and max_seqlen_k (host ints ≥ the longest sequence) are required with "
                             "cu_seqlens: reading them from the offsets would sync with the device")
        max_q = _positive_int("max_seqlen_q", max_seqlen_q)
        max_k = _positive_int("max_seqlen_k", max_seqlen_k)
        _check_cu_values("cu_seqlens_q", cu_q, q.shape[0], max_q, "max_seqlen_q")
        _check_cu_values("cu_seqlens_k", cu_k, k.shape[0], max_k, "max_seqlen_k")
        out, lse = _attention(q, k, v, cu_q, cu_k, int(max_q), int(max_k), scale, left, right, softcap, return_lse,
                              deterministic)
    else:
        out, lse = _attention(q, k, v, None, None, q.shape[1], k.shape[1], scale, left, right, softcap, return_lse,
                              deterministic)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """A drop-in for torch.nn.functional.scaled_dot_product_attention: (batch, heads, seqlen, head_dim), causal
    aligned top-left (query i sees keys j ≤ i) as torch does. A dense attn_mask, dropout, other ranks or head dims
    above 256 go to torch's own SDPA, with a warning the first time each reason occurs."""
    why = None
    if attn_mask is not None:
        why = "an attn_mask"
    elif dropout_p != 0.0:
        why = "dropout"
    elif not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
        why = "inputs that are not 4-D (batch, heads, seqlen, head_dim)"
    elif query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same head dim (their last dimension), got query "
                         f"{tuple(query.shape)} and key {tuple(key.shape)}")
    elif query.shape[-1] > MAX_HEAD_DIM or query.shape[-1] != value.shape[-1]:
        why = f"head dims other than q = k = v ≤ {MAX_HEAD_DIM}"
    if why is not None:
        _backend.say_once(why, f"fastlm.scaled_dot_product_attention: {why} is not covered by the fastlm kernels; "
                          "using torch's scaled_dot_product_attention", stacklevel=2)
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                                dropout_p=dropout_p, is_causal=is_causal,
                                                                scale=scale, enable_gqa=enable_gqa)
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"query has {query.shape[1]} heads and key {key.shape[1]}: pass enable_gqa=True for "
                         "grouped-query attention")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    _check_qkv(q, k, v, False)
    sq, sk = q.shape[1], k.shape[1]
    right = sq - sk if is_causal else None  # top-left: j ≤ i, i.e. j ≤ i + (sk − sq) + (sq − sk)
    out, _ = _attention(q, k, v, None, None, sq, sk, _check_scale(scale, q.shape[-1]), None, right, 0.0, False)
    return out.transpose(1, 2)
