"""Softmax cross-entropy: argument checks, backend dispatch, torch.library registration and autograd.

The math, the roofline and the kernel design are in kernels/cross_entropy.py; the reference is
fastlm.reference.cross_entropy.

Flow: fastlm.cross_entropy checks its arguments, flattens logits to (rows, V) and targets to (rows,), and picks a
backend. The torch backend is the reference, differentiated by autograd. The kernel backends go through
`fastlm::cross_entropy_fwd`, which returns the reduced loss and, for "mean" and "sum" when the logits need a
gradient, the finished gradient of the loss computed in the same pass for an incoming gradient of 1; the autograd
formula scales that buffer in place by the incoming gradient (`fastlm::cross_entropy_scale_grad`, a no-op on the
device when it is 1.0, as loss.backward() gives). For "none" each row has its own incoming gradient, so the
backward (`fastlm::cross_entropy_bwd`) recomputes the gradient from the logits and the forward's row statistics
in one pass instead. Nothing syncs the host: the "mean" divisor is a device tensor.

Memory: one logits-sized gradient buffer. Because "mean"/"sum" scale it in place, their backward can run once
per forward (a second backward with retain_graph=True raises).
"""

from typing import Optional

import torch

from fastlm import _backend, reference
from fastlm.kernels import cross_entropy as triton_ce
from fastlm.ops import _checks

REDUCTIONS = ("none", "mean", "sum")
INDEX_DTYPES = (torch.int64, torch.int32)


def _reduce(loss_rows, sc, reduction):
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / sc[0] if reduction == "mean" else total


@torch.library.custom_op("fastlm::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: str,
    compute_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, V) logits, (rows,) target → loss (() or (rows,) for "none", fp32); grad (rows, V) in logits' dtype
    for "mean"/"sum" when compute_grad (else empty); row max, row log-sum (rows,) and the (2,) device scalars, which
    the backward of "none" recomputes the gradient from. softcap 0 means none."""
    loss, row_max, log_s, sc, grad = triton_ce.cross_entropy_fwd(
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap or None, reduction,
        compute_grad and reduction != "none",
    )
    grad = grad if grad is not None else logits.new_empty((0,))
    return _reduce(loss, sc, reduction), grad, row_max, log_s, sc


@cross_entropy_fwd_op.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, compute_grad, backend):
    rows = logits.shape[0]
    f32 = dict(dtype=torch.float32)
    loss = logits.new_empty((rows,) if reduction == "none" else (), **f32)
    grad = logits.new_empty(logits.shape if compute_grad and reduction != "none" else (0,))
    return loss, grad, logits.new_empty((rows,), **f32), logits.new_empty((rows,), **f32), logits.new_empty((2,), **f32)


@torch.library.custom_op("fastlm::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    sc: torch.Tensor,
    row_max: torch.Tensor,
    log_s: torch.Tensor,
    grad_output: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    backend: str,
) -> torch.Tensor:
    """Reduction "none": the gradient (rows, V), each row's times its incoming gradient, from the logits."""
    return triton_ce.cross_entropy_bwd(logits, target, weight, sc, row_max, log_s, grad_output, ignore_index,
                                       label_smoothing, z_loss, softcap or None)


@cross_entropy_bwd_op.register_fake
def _(logits, target, weight, sc, row_max, log_s, grad_output, ignore_index, label_smoothing, z_loss, softcap,
      backend):
    return torch.empty_like(logits)


@torch.library.custom_op("fastlm::cross_entropy_scale_grad", mutates_args=("grad",))
def cross_entropy_scale_grad_op(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> None:
    """Reductions "mean" and "sum": scale the forward's gradient (rows, V) in place by the incoming gradient."""
    triton_ce.scale_grad(grad, grad_output)


@cross_entropy_scale_grad_op.register_fake
def _(grad, grad_output, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, _, backend = inputs
    _, grad, row_max, log_s, sc = output
    ctx.none = reduction == "none"
    if ctx.none:
        ctx.save_for_backward(logits, target, weight, sc, row_max, log_s)
        ctx.args = (ignore_index, label_smoothing, z_loss, softcap, backend)
    else:
        ctx.save_for_backward(grad)
    ctx.backend = backend
    ctx.used = False


def _backward(ctx, dloss, *_):
    if ctx.none:
        logits, target, weight, sc, row_max, log_s = ctx.saved_tensors
        grad = torch.ops.fastlm.cross_entropy_bwd(logits, target, weight, sc, row_max, log_s, dloss.contiguous(),
                                                  *ctx.args)
    else:
        if ctx.used:
            raise RuntimeError("fastlm.cross_entropy: the backward scales its gradient buffer in place and can run "
                               "once per forward; recompute the loss instead of retain_graph=True")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        torch.ops.fastlm.cross_entropy_scale_grad(grad, dloss, ctx.backend)
    return grad, None, None, None, None, None, None, None, None, None


cross_entropy_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check(logits, target, weight, ignore_index, label_smoothing, reduction, z_loss, softcap):
    _checks.tensor("logits", logits)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a last (class) dimension of size ≥ 1, got shape {tuple(logits.shape)}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"target must hold class indices as int64 or int32, got {target.dtype} (class probabilities "
                        "as targets are not supported)")
    _checks.shape("target", target, logits.shape[:-1], " (logits' shape without the class dimension)")
    _checks.same_device("target", target, "logits", logits)
    V = logits.shape[-1]
    if weight is not None:
        _checks.tensor("weight", weight)
        _checks.shape("weight", weight, (V,), " (one weight per class)")
        _checks.same_device("weight", weight, "logits", logits)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _checks.non_negative("label_smoothing", label_smoothing)
    if label_smoothing > 1:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _checks.non_negative("z_loss", z_loss)
    if softcap is not None and _checks.finite("softcap", softcap) <= 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                  z_loss=0.0, softcap=None):
    """Softmax cross-entropy, as torch.nn.functional.cross_entropy with class-index targets, plus z_loss and softcap.

    logits (..., V) float32, float16 or bfloat16; target (...) int64 or int32; weight (V,) class weights or None.
    z_loss adds z_loss · logsumexp(row)² per kept row (PaLM); softcap replaces the logits by
    softcap · tanh(logits / softcap) before the softmax (Gemma 2). The loss is float32 whatever the logits' dtype.
    When the logits need a gradient it is computed in the forward pass into a buffer of its own (the logits are
    never written).
    """
    _check(logits, target, weight, ignore_index, label_smoothing, reduction, z_loss, softcap)
    V = logits.shape[-1]
    backend = _backend.resolve("cross_entropy", logits.device, logits.dtype, unsupported=_unsupported)
    if backend == "torch":
        return reference.cross_entropy(logits, target, weight, ignore_index, label_smoothing, reduction, z_loss,
                                       softcap)
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    w = weight.float().contiguous() if weight is not None else None
    loss = torch.ops.fastlm.cross_entropy_fwd(
        x, target.reshape(-1), w, ignore_index, float(label_smoothing), float(z_loss),
        float(softcap or 0.0), reduction, compute_grad, backend,
    )[0]
    return loss.view(target.shape) if reduction == "none" else loss


def _unsupported(name):
    # The CUDA C++ cross-entropy kernel has not landed yet: say so instead of failing inside it.
    if name == "cuda":
        return "the cuda backend has no cross-entropy kernel yet"
    return None
