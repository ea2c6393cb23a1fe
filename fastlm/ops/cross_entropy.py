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

from fastlm import _backend, _cuda, reference
from fastlm.kernels import cross_entropy as triton_ce
from fastlm.ops import _checks

REDUCTIONS = ("none", "mean", "sum")
INDEX_DTYPES = (torch.int64, torch.int32)


def _impl(backend):
    """The kernel backend's launchers: kernels/cross_entropy.py and fastlm._cuda share their signatures."""
    return triton_ce if backend == "triton" else _cuda


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
    loss, row_max, log_s, sc, grad = _impl(backend).cross_entropy_fwd(
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
    return _impl(backend).cross_entropy_bwd(logits, target, weight, sc, row_max, log_s, grad_output, ignore_index,
                                            label_smoothing, z_loss, softcap or None)


@cross_entropy_bwd_op.register_fake
def _(logits, target, weight, sc, row_max, log_s, grad_output, ignore_index, label_smoothing, z_loss, softcap,
      backend):
    return torch.empty_like(logits)


@torch.library.custom_op("fastlm::cross_entropy_scale_grad", mutates_args=("grad",))
def cross_entropy_scale_grad_op(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> None:
    """Reductions "mean" and "sum": scale the forward's gradient (rows, V) in place by the incoming gradient."""
    _impl(backend).scale_grad(grad, grad_output)


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
    _check_target_and_weight(target, logits.shape[:-1], logits.shape[-1], weight, "weight", logits, "logits",
                             " (logits' shape without the class dimension)")
    _check_options(ignore_index, label_smoothing, reduction, z_loss, softcap)
    _check_target_values(target, logits.shape[-1], ignore_index)


def _check_target_and_weight(target, rows_shape, V, weight, weight_name, ref, ref_name, rows_why):
    """target (rows_shape) of class indices and class weights (V,), on ref's device. Kinds, dtypes and shapes
    first, devices last: one mistake gives one error on every device."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"target must hold class indices as int64 or int32, got {target.dtype} (class probabilities "
                        "as targets are not supported)")
    _checks.shape("target", target, rows_shape, rows_why)
    if weight is not None:
        _checks.tensor(weight_name, weight)
        _checks.shape(weight_name, weight, (V,), " (one weight per class)")
    _checks.same_device("target", target, ref_name, ref)
    if weight is not None:
        _checks.same_device(weight_name, weight, ref_name, ref)


def _check_target_values(target, V, ignore_index):
    """Targets on the CPU are read (no sync there): each must be in [0, V) or ignore_index. On a GPU they are not
    read (a sync per call); there an out-of-range target gives its row a NaN loss and gradient on every backend."""
    if target.device.type != "cpu" or target.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= V))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0]) if target.dim() == 1 else tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"target must hold class indices in [0, {V}) or ignore_index ({ignore_index}); "
                         f"target[{first}] is {int(target[bad][0])}")


def _check_options(ignore_index, label_smoothing, reduction, z_loss, softcap):
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
    Out-of-range targets: each target must be in [0, V) or equal ignore_index. Targets on the CPU are checked
    (ValueError naming the first bad one); on a GPU they are not read, since that would synchronize the host with the
    device, and a row with an out-of-range target gets a NaN loss (and NaN gradient) on every backend, so a mean
    over it is NaN.
    """
    _check(logits, target, weight, ignore_index, label_smoothing, reduction, z_loss, softcap)
    V = logits.shape[-1]
    # Meta tensors (shapes only) take the reference's shapes under every backend.
    backend = "torch" if logits.device.type == "meta" else _backend.resolve("cross_entropy", logits.device,
                                                                             logits.dtype)
    if backend == "torch":
        return reference.cross_entropy(logits, target, weight, ignore_index, label_smoothing, reduction, z_loss,
                                       softcap)
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    w = weight.float().contiguous() if weight is not None else None
    loss = torch.ops.fastlm.cross_entropy_fwd(
        x, target.reshape(-1).contiguous(), w, ignore_index, float(label_smoothing), float(z_loss),
        float(softcap or 0.0), reduction, compute_grad, backend,
    )[0]
    return loss.view(target.shape) if reduction == "none" else loss


# --- fused linear cross-entropy ---------------------------------------------------------------------------------------
#
# loss = cross_entropy(hidden @ weight.T + bias, target) without ever holding the (tokens, V) logits: the tokens go
# through in chunks; each chunk's logits (chunk, V) are made by one matmul, the cross-entropy kernel writes their
# gradient into a second chunk buffer, and two more matmuls turn it into d(hidden) for the chunk and a term of
# d(weight), accumulated in fp32 across chunks (d(bias) likewise). FLOPs: 6·tokens·H·V for forward+backward, the
# same as the unfused composition; memory: two chunk buffers, the fp32 d(weight) accumulator, and no logits.
# "mean"/"sum" finish every gradient in the forward pass (the mean divisor of the whole batch is known up front
# on the device), and the backward multiplies them by the incoming gradient; "none" saves the row statistics and
# recomputes the chunks in the backward, where each row's incoming gradient is known.

CHUNK_BYTES = 256 << 20  # logits bytes per chunk: small next to the (tokens, V) logits, large enough for cuBLAS
MAX_CHUNKS = 64  # and never so many chunks that launch overhead shows


def _chunk_rows(tokens, V, itemsize):
    rows = max(1, CHUNK_BYTES // max(1, V * itemsize))
    return max(rows, -(-tokens // MAX_CHUNKS))


def _acc_mm(acc, a, b):
    """acc (fp32) += a @ b, accumulated in fp32 whatever a and b are."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # cuBLAS: half inputs, fp32 output and sum
    else:
        acc.addmm_(a.float(), b.float())


def _chunks(hidden, weight, bias, tokens):
    step = _chunk_rows(tokens, weight.shape[0], hidden.element_size())
    for start in range(0, tokens, step):
        h = hidden[start:start + step]
        yield start, start + step, h, torch.nn.functional.linear(h, weight, bias)


def _lce_pass(hidden, weight, bias, target, class_weight, sc, args, backend, compute, saved=None):
    """One pass over the token chunks.

    Without `saved` (the forward): the losses and row statistics, and, when `compute`, the gradients of the
    reduced loss for an incoming gradient of 1. With saved = (incoming gradient per row, row max, log-sum) (the
    backward of "none"): the gradients for those incoming gradients. Gradients: d(hidden) in hidden's dtype,
    d(weight) and d(bias) in fp32."""
    ignore_index, smoothing, z_loss, softcap, reduction = args
    tokens = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    stats = [torch.empty(tokens, **f32) for _ in range(3)] if saved is None else None  # loss, row max, log-sum
    dh = torch.empty_like(hidden) if compute else None
    dw = torch.zeros(weight.shape, **f32) if compute else None
    db = torch.zeros(weight.shape[:1], **f32) if compute and bias is not None else None
    for start, end, h, logits in _chunks(hidden, weight, bias, tokens):
        t = target[start:end]
        if saved is None:
            loss, row_max, log_s, _, grad = _impl(backend).cross_entropy_fwd(
                logits, t, class_weight, ignore_index, smoothing, z_loss, softcap, reduction, compute, sc=sc)
            for dst, src in zip(stats, (loss, row_max, log_s)):
                dst[start:end] = src
        else:
            go, row_max, log_s = (x[start:end] for x in saved)
            grad = _impl(backend).cross_entropy_bwd(logits, t, class_weight, sc, row_max, log_s, go, ignore_index,
                                                    smoothing, z_loss, softcap)
        del logits
        if compute:
            torch.mm(grad, weight, out=dh[start:end])
            _acc_mm(dw, grad.t(), h)
            if db is not None:
                db += grad.sum(0, dtype=torch.float32)
    return stats, dh, dw, db


def _empty(like):
    return like.new_empty((0,))


@torch.library.custom_op("fastlm::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor],
    class_weight: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: str,
    compute_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (tokens, H), weight (V, H) → loss; for "mean"/"sum" with compute_grad: d(hidden), fp32 d(weight),
    fp32 d(bias) for an incoming gradient of 1 (else empty); row max, log-sum (tokens,) and the (2,) scalars."""
    args = (ignore_index, label_smoothing, z_loss, softcap or None, reduction)
    sc = triton_ce.scalars(target, class_weight, weight.shape[0], ignore_index, reduction)
    compute = compute_grad and reduction != "none"
    (loss, row_max, log_s), dh, dw, db = _lce_pass(hidden, weight, bias, target, class_weight, sc, args, backend,
                                                   compute)
    return (_reduce(loss, sc, reduction), *(g if g is not None else _empty(hidden) for g in (dh, dw, db)),
            row_max, log_s, sc)


@linear_cross_entropy_fwd_op.register_fake
def _(hidden, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap, reduction,
      compute_grad, backend):
    tokens = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    grads = compute_grad and reduction != "none"
    return (
        hidden.new_empty((tokens,) if reduction == "none" else (), **f32),
        hidden.new_empty(hidden.shape if grads else (0,)),
        hidden.new_empty(weight.shape if grads else (0,), **f32),
        hidden.new_empty(weight.shape[:1] if grads and bias is not None else (0,), **f32),
        hidden.new_empty((tokens,), **f32),
        hidden.new_empty((tokens,), **f32),
        hidden.new_empty((2,), **f32),
    )


@torch.library.custom_op("fastlm::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor],
    class_weight: Optional[torch.Tensor],
    sc: torch.Tensor,
    row_max: torch.Tensor,
    log_s: torch.Tensor,
    grad_output: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduction "none": recompute the chunks with each row's incoming gradient → d(hidden), fp32 d(weight),
    fp32 d(bias) (empty without a bias)."""
    args = (ignore_index, label_smoothing, z_loss, softcap or None, "none")
    saved = (grad_output.to(torch.float32), row_max, log_s)
    _, dh, dw, db = _lce_pass(hidden, weight, bias, target, class_weight, sc, args, backend, True, saved)
    return dh, dw, db if db is not None else _empty(hidden)


@linear_cross_entropy_bwd_op.register_fake
def _(hidden, weight, target, bias, class_weight, sc, row_max, log_s, grad_output, ignore_index, label_smoothing,
      z_loss, softcap, backend):
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty(hidden.shape), hidden.new_empty(weight.shape, **f32),
            hidden.new_empty(weight.shape[:1] if bias is not None else (0,), **f32))


def _lce_setup_context(ctx, inputs, output):
    (hidden, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap, reduction, _,
     backend) = inputs
    _, dh, dw, db, row_max, log_s, sc = output
    ctx.none = reduction == "none"
    ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
    if ctx.none:
        ctx.save_for_backward(hidden, weight, target, bias, class_weight, sc, row_max, log_s)
        ctx.args = (ignore_index, label_smoothing, z_loss, softcap, backend)
    else:
        ctx.save_for_backward(dh, dw, db)


def _lce_backward(ctx, dloss, *_):
    if ctx.none:
        hidden, weight, target, bias, class_weight, sc, row_max, log_s = ctx.saved_tensors
        dh, dw, db = torch.ops.fastlm.linear_cross_entropy_bwd(hidden, weight, target, bias, class_weight, sc,
                                                               row_max, log_s, dloss.contiguous(), *ctx.args)
    else:
        dh, dw, db = ctx.saved_tensors
        # The incoming gradient is a device scalar: multiplying costs a pass over the gradients, never a sync.
        dh, dw, db = dh * dloss.to(dh.dtype), dw * dloss, db * dloss
    wdtype, bdtype = ctx.dtypes
    return (dh, dw.to(wdtype), None, db.to(bdtype) if bdtype is not None else None,
            None, None, None, None, None, None, None, None)


linear_cross_entropy_fwd_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


def linear_cross_entropy(hidden, weight, target, bias=None, *, class_weight=None, ignore_index=-100,
                         label_smoothing=0.0, reduction="mean", z_loss=0.0, softcap=None):
    """cross_entropy(hidden @ weight.T + bias, target, ...) without materializing the (tokens, V) logits.

    hidden (..., H) float32, float16 or bfloat16; weight (V, H) and bias (V,) or None in hidden's dtype; target
    (...) int64 or int32; class_weight (V,) per-class loss weights (cross_entropy's `weight`, renamed here because
    `weight` is the projection). Other keywords as fastlm.cross_entropy. Gradients for hidden, weight and bias;
    d(weight) and d(bias) accumulate in fp32 across token chunks. Out-of-range targets as fastlm.cross_entropy.
    Under autocast, hidden, weight and bias are cast to the autocast dtype first, as autocast would cast them for
    the `hidden @ weight.T` this replaces (fp32 master weights with bf16 activations work); the loss stays fp32.
    """
    _checks.tensor("hidden", hidden)
    _checks.tensor("weight", weight)
    device_type = hidden.device.type
    # is_autocast_enabled raises for a device type autocast does not know (meta).
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if isinstance(bias, torch.Tensor) else bias
        with torch.autocast(device_type, enabled=False):
            return _linear_cross_entropy(hidden, weight, target, bias, class_weight, ignore_index, label_smoothing,
                                         reduction, z_loss, softcap)
    return _linear_cross_entropy(hidden, weight, target, bias, class_weight, ignore_index, label_smoothing,
                                 reduction, z_loss, softcap)


def _linear_cross_entropy(hidden, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction,
                          z_loss, softcap):
    if hidden.dim() == 0:
        raise ValueError("hidden must have a last (feature) dimension, got a 0-d tensor")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must have shape (V, {H}) (vocabulary × hidden's last dimension), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.dtype != hidden.dtype:
            raise TypeError(f"{name} must have hidden's dtype ({hidden.dtype}), got {p.dtype}")
    if bias is not None:
        _checks.shape("bias", bias, weight.shape[:1], " (one per vocabulary entry)")
    V = weight.shape[0]
    _check_target_and_weight(target, hidden.shape[:-1], V, class_weight, "class_weight", hidden, "hidden",
                             " (hidden's shape without the feature dimension)")
    _checks.same_device("weight", weight, "hidden", hidden)
    if bias is not None:
        _checks.same_device("bias", bias, "hidden", hidden)
    _check_options(ignore_index, label_smoothing, reduction, z_loss, softcap)
    _check_target_values(target, V, ignore_index)
    backend = "torch" if hidden.device.type == "meta" else _backend.resolve("linear_cross_entropy", hidden.device,
                                                                             hidden.dtype)
    if backend == "torch":
        return reference.linear_cross_entropy(hidden, weight, target, bias, class_weight, ignore_index,
                                              label_smoothing, reduction, z_loss, softcap)
    h = hidden.reshape(-1, H)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    cw = class_weight.float().contiguous() if class_weight is not None else None
    loss = torch.ops.fastlm.linear_cross_entropy_fwd(
        h, weight, target.reshape(-1).contiguous(), bias, cw, ignore_index, float(label_smoothing), float(z_loss),
        float(softcap or 0.0), reduction, compute_grad, backend,
    )[0]
    return loss.view(target.shape) if reduction == "none" else loss
