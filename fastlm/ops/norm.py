"""LayerNorm and RMSNorm with the pre-norm residual add fused: argument checks, backend dispatch, torch.library
registration and autograd.

The math, the roofline and the kernel design are in kernels/norm.py (Triton) and csrc/norm.cu (CUDA C++); the
reference is fastlm.reference.layer_norm / rms_norm.

Flow: fastlm.layer_norm / fastlm.rms_norm check their arguments, flatten x to (rows, N) and pick a backend. The
torch backend is the reference, differentiated by autograd. The kernel backends go through two registered ops,
`fastlm::norm_fwd` and `fastlm::norm_bwd`, with fake implementations (shapes only) so torch.compile traces them
without graph breaks, and an autograd formula that calls `fastlm::norm_bwd`. Neither op reads a GPU value on the
host, so both can be captured in a CUDA graph.

Saved for backward: the normalized input (x, or residual_out when the residual was fused), weight, the per-row
mean (LayerNorm) and rstd.
"""

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from fastlm import _backend, _util, reference
from fastlm.kernels import norm as triton_norm
from fastlm.ops import _checks, _eager

_EMPTY = (0,)


def _or_empty(t, like):
    return t if t is not None else like.new_empty(_EMPTY)


@_eager.custom_op("fastlm::norm_fwd", mutates_args=())
def norm_fwd_op(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    eps: float,
    is_rms: bool,
    offset: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., N), read as rows (`_util.rows`) → y in x's shape, residual_out in x's shape or empty,
    mean (rows,) fp32 or empty, rstd (rows,) fp32."""
    y, residual_out, mean, rstd = _backend.launchers(backend, triton_norm).norm_fwd(x, weight, bias, residual, eps,
                                                                                    is_rms, offset)
    return y, _or_empty(residual_out, x), _or_empty(mean, rstd), rstd


@norm_fwd_op.register_fake
def _(x, weight, bias, residual, eps, is_rms, offset, backend):
    M = x.numel() // x.shape[-1]
    res_shape = x.shape if residual is not None else _EMPTY
    mean_shape = _EMPTY if is_rms else (M,)
    return (
        x.new_empty(x.shape),
        x.new_empty(res_shape),
        x.new_empty(mean_shape, dtype=torch.float32),
        x.new_empty((M,), dtype=torch.float32),
    )


@_eager.custom_op("fastlm::norm_bwd", mutates_args=())
def norm_bwd_op(
    dy: torch.Tensor,
    xin: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dres: Optional[torch.Tensor],
    is_rms: bool,
    offset: float,
    need_dw: bool,
    need_db: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ dx in xin's shape, dw (N,) or empty, db (N,) or empty; dw and db in the weight's dtype."""
    dx, dw, db = _backend.launchers(backend, triton_norm).norm_bwd(dy, xin, weight, None if is_rms else mean, rstd,
                                                                   dres, is_rms, offset, need_dw, need_db)
    wlike = weight if weight is not None else xin
    return dx, _or_empty(dw, wlike), _or_empty(db, wlike)


@norm_bwd_op.register_fake
def _(dy, xin, weight, mean, rstd, dres, is_rms, offset, need_dw, need_db, backend):
    N = xin.shape[-1]
    wlike = weight if weight is not None else xin
    dw_shape = (N,) if need_dw and weight is not None else _EMPTY
    return xin.new_empty(xin.shape), wlike.new_empty(dw_shape), wlike.new_empty((N,) if need_db else _EMPTY)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, is_rms, offset, backend = inputs
    _, residual_out, mean, rstd = output
    # Only y and residual_out carry gradients: autograd neither materializes zero gradients for the statistics (two
    # allocations and fills per backward) nor for an absent residual_out; `_backward` takes None for what is unused.
    ctx.mark_non_differentiable(mean, rstd, *(() if residual is not None else (residual_out,)))
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(residual_out if residual is not None else x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    # The kernels give db in the weight's dtype (x's without a weight); a float32 bias with no weight wants its own.
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.has_residual = residual is not None
    ctx.is_rms = is_rms
    ctx.offset = offset
    ctx.backend = backend


def _backward(ctx, dy, dresidual_out, dmean, drstd):
    xin, weight, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    if dy is None:
        # y unused, only residual_out = x + residual: nothing flows through the norm, so x and the residual get
        # residual_out's gradient and the weight and bias none (None, as autograd gives parameters off the path).
        return dresidual_out if need_x else None, None, None, dresidual_out if need_r else None, None, None, None, None
    dres = dresidual_out if ctx.has_residual else None
    dx, dw, db = norm_bwd_op(
        dy, xin, weight, mean, rstd, dres, ctx.is_rms, ctx.offset,
        bool(need_w), bool(need_b and ctx.has_bias), ctx.backend,
    )
    return (
        dx if need_x else None,
        dw if need_w else None,
        (db if db.dtype == ctx.bias_dtype else db.to(ctx.bias_dtype)) if need_b and ctx.has_bias else None,
        dx if need_r else None,
        None,
        None,
        None,
        None,
    )


norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, weight, bias, residual, eps, offset=0.0):
    _checks.tensor("x", x)
    shape = x.shape
    if not shape or shape[-1] == 0:
        raise ValueError(f"x must have a last dimension of size ≥ 1 to normalize over, got shape {tuple(shape)}")
    N = shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        _checks.tensor(name, p)
        if p.shape != (N,):
            _checks.shape(name, p, (N,), " (the size of x's last dimension)")
        _checks.same_device(name, p, "x", x)
        if p.dtype is not x.dtype and p.dtype is not torch.float32:
            raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {p.dtype}")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"weight and bias must have the same dtype, got {weight.dtype} and {bias.dtype}")
    if residual is not None:
        _checks.tensor("residual", residual)
        if residual.shape != shape:
            _checks.shape("residual", residual, shape, " (x's shape)")
        _checks.same_device("residual", residual, "x", x)
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype ({x.dtype}), got {residual.dtype}")
    _checks.non_negative("eps", eps)
    _checks.finite("offset", offset)


def _native_unsupported(x, weight, bias, offset):
    def unsupported(backend):
        if not backend.startswith("torch:"):
            return None
        if any(p is not None and p.dtype != x.dtype for p in (weight, bias)):
            return "torch's fused norms take the weight and bias in x's dtype"
        if offset != 0:
            return "torch's rms_norm has no offset (offset + weight would be rounded to the weight's dtype first)"
        return None

    return unsupported


def _native(x, weight, bias, residual, eps, is_rms):
    """torch's own fused norm (`auto` routes here where the benchmark measured it fastest): the residual added
    unfused, as a user without fastlm writes it. Outside autocast, which would run layer_norm in float32 and
    return float32 where fastlm returns x's dtype."""
    h = x + residual if residual is not None else x
    shape = (x.shape[-1],)
    with torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else _no_context:
        y = F.rms_norm(h, shape, weight, eps) if is_rms else F.layer_norm(h, shape, weight, bias, eps)
    return y if residual is None else (y, h)


_no_context = contextlib.nullcontext()


def _norm(op, x, weight, bias, residual, eps, is_rms, offset):
    # Meta tensors (shapes only: model init on meta, FSDP) take the reference's shapes under every backend.
    backend = "torch" if x.device.type == "meta" else _backend.resolve(op, x.device, x.dtype,
                                                                       _native_unsupported(x, weight, bias, offset))
    if backend == "torch":
        if is_rms:
            return reference.rms_norm(x, weight, eps, residual, offset)
        return reference.layer_norm(x, weight, bias, eps, residual)
    if backend == "torch:eager":
        return _native(x, weight, bias, residual, eps, is_rms)
    # The kernels read weight and bias at unit stride: a strided or expanded one (torch.randn(1).expand(N)) is
    # made contiguous here, or they would read the wrong elements. x and residual go in their own shapes (the
    # launchers read them as rows at one stride, copying only those whose leading dimensions do not collapse), and
    # y comes back in x's.
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    # One that does not is copied here rather than in the launcher, so that the copy is what the backward saves and
    # reads (else the forward and the backward would each copy it).
    if not x.is_contiguous() and _util.row_stride(x) is None:
        x = x.contiguous()
    y, residual_out, _, _ = norm_fwd_op(x, weight, bias, residual, float(eps), is_rms, float(offset), backend)
    return y if residual is None else (y, residual_out)


def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None):
    """LayerNorm over the last dimension of x, with an optional fused residual add.

    x: (..., N) float32, float16 or bfloat16 (float64 runs on the torch backend); weight, bias: (N,) in x's dtype
    or float32, or None; residual: like x, or None. Statistics in float32; the output has x's dtype.
    Returns y, or (y, residual_out) with residual_out = x + residual and y = LayerNorm(residual_out).
    """
    _check(x, weight, bias, residual, eps)
    return _norm("layer_norm", x, weight, bias, residual, eps, False, 0.0)


def rms_norm(x, weight=None, eps=1e-6, residual=None, offset=0.0):
    """RMSNorm over the last dimension: y = x / sqrt(mean(x²) + eps) · (offset + weight).

    offset=1.0 is Gemma's form (weights stored as a deviation from 1). Otherwise as `layer_norm`.
    Returns y, or (y, residual_out) when residual is given.
    """
    _check(x, weight, None, residual, eps, offset)
    return _norm("rms_norm", x, weight, None, residual, eps, True, offset)
