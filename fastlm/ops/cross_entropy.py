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

Memory: one logits-sized gradient buffer, which autograd hands on as it is (logits.grad itself for a leaf: it
steals a returned gradient nothing else holds; the incoming gradient of the backward of the op that made the
logits otherwise). Only the loss is a differentiable output of the op: autograd would otherwise materialize a
gradient of zeros the size of every other output, the returned gradient buffer included, which was a second
logits-sized allocation. Because "mean"/"sum" scale the buffer in place, their backward can run once per forward
(a second backward with retain_graph=True raises).

inplace_backward=True writes the gradient over the logits instead (`fastlm::cross_entropy_fwd_inplace`, which
declares the mutation; torch.library gives a mutating op no autograd formula, so an autograd.Function calls it),
after `_check_inplace` has refused logits whose values something else may still read (a leaf, a view, viewed or
aliased memory, logits saved for backward by another op, retain_grad). Eager only: under torch.compile the
out-of-place op is traced.

Fused linear cross-entropy: fastlm/ops/linear_cross_entropy.py (re-exported at the end of this module).
"""

from typing import Optional

import torch

from fastlm import _backend, _util, reference
from fastlm.kernels import cross_entropy as triton_ce
from fastlm.ops import _checks, _eager

REDUCTIONS = ("none", "mean", "sum")
INDEX_DTYPES = (torch.int64, torch.int32)


def _reduce(loss_rows, sc, reduction, backend):
    """The reduced loss from the (rows,) fp32 losses and the device scalars: the backend's reduce_loss (one small
    launch, a fixed-order float64 sum)."""
    if reduction == "none":
        return loss_rows
    return _backend.launchers(backend, triton_ce).reduce_loss(loss_rows, sc, reduction == "mean")


@_eager.custom_op("fastlm::cross_entropy_fwd", mutates_args=())
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
    loss, row_max, log_s, sc, grad = _backend.launchers(backend, triton_ce).cross_entropy_fwd(
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap or None, reduction,
        compute_grad and reduction != "none",
    )
    grad = grad if grad is not None else logits.new_empty((0,))
    return _reduce(loss, sc, reduction, backend), grad, row_max, log_s, sc


@cross_entropy_fwd_op.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, compute_grad, backend):
    rows = logits.shape[0]
    f32 = dict(dtype=torch.float32)
    loss = logits.new_empty((rows,) if reduction == "none" else (), **f32)
    grad = logits.new_empty(logits.shape if compute_grad and reduction != "none" else (0,))
    return loss, grad, logits.new_empty((rows,), **f32), logits.new_empty((rows,), **f32), logits.new_empty((2,), **f32)


@_eager.custom_op("fastlm::cross_entropy_bwd", mutates_args=())
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
    return _backend.launchers(backend, triton_ce).cross_entropy_bwd(
        logits, target, weight, sc, row_max, log_s, grad_output, ignore_index, label_smoothing, z_loss, softcap or None)


@cross_entropy_bwd_op.register_fake
def _(logits, target, weight, sc, row_max, log_s, grad_output, ignore_index, label_smoothing, z_loss, softcap,
      backend):
    return torch.empty_like(logits)


@_eager.custom_op("fastlm::cross_entropy_scale_grad", mutates_args=("grad",))
def cross_entropy_scale_grad_op(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> None:
    """Reductions "mean" and "sum": scale the forward's gradient (rows, V) in place by the incoming gradient."""
    _backend.launchers(backend, triton_ce).scale_grad(grad, grad_output)


@cross_entropy_scale_grad_op.register_fake
def _(grad, grad_output, backend):
    return None


def _no_zero_grads(ctx, outputs):
    """Only the loss is differentiable. Autograd would otherwise hand the backward a gradient of zeros for every
    other output it returned, materialized at that output's shape: for the (rows, V) gradient buffer, a second
    logits-sized allocation (non-differentiable outputs included, unless materializing is off)."""
    ctx.mark_non_differentiable(*outputs)
    ctx.set_materialize_grads(False)


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, _, backend = inputs
    _, grad, row_max, log_s, sc = output
    _no_zero_grads(ctx, output[1:])
    ctx.none = reduction == "none"
    if ctx.none:
        ctx.save_for_backward(logits, target, weight, sc, row_max, log_s)
        ctx.args = (ignore_index, label_smoothing, z_loss, softcap, backend)
    else:
        ctx.save_for_backward(grad)
    ctx.backend = backend
    ctx.used = False


def _backward(ctx, dloss, *_):
    if dloss is None:  # the loss is not in the graph being differentiated
        return (None,) * 10
    if ctx.none:
        logits, target, weight, sc, row_max, log_s = ctx.saved_tensors
        grad = cross_entropy_bwd_op(logits, target, weight, sc, row_max, log_s, dloss.contiguous(),
                                                  *ctx.args)
    else:
        if ctx.used:
            raise RuntimeError("fastlm.cross_entropy: the backward scales its gradient buffer in place and can run "
                               "once per forward; recompute the loss instead of retain_graph=True")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        cross_entropy_scale_grad_op(grad, dloss, ctx.backend)
    return grad, None, None, None, None, None, None, None, None, None


cross_entropy_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --- inplace_backward: the gradient written over the logits ---------------------------------------------------------


@_eager.custom_op("fastlm::cross_entropy_fwd_inplace", mutates_args=("logits",))
def cross_entropy_fwd_inplace_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous logits (..., V), target (rows,) → loss (fp32, () or (rows,) for "none") and the (2,) device
    scalars; the gradient of the loss for an incoming gradient of 1 (each row's own for "none") is written over
    the logits, which the op therefore mutates."""
    x = logits.view(-1, logits.shape[-1])
    loss, _, _, sc, _ = _backend.launchers(backend, triton_ce).cross_entropy_fwd(
        x, target, weight, ignore_index, label_smoothing, z_loss, softcap or None, reduction, True, out=x)
    return _reduce(loss, sc, reduction, backend), sc


@cross_entropy_fwd_inplace_op.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, backend):
    f32 = dict(dtype=torch.float32)
    return logits.new_empty(target.shape if reduction == "none" else (), **f32), logits.new_empty((2,), **f32)


class _CrossEntropyInplace(torch.autograd.Function):
    """The autograd of `fastlm::cross_entropy_fwd_inplace`: torch.library registers no autograd formula for an op
    that mutates its input, so the mutating op is called below this Function. It is the eager path only
    (cross_entropy traces the out-of-place op under torch.compile). The op bumps the logits' version counter, so
    anything that saved them before (refused by _check_inplace anyway) fails its backward instead of reading the
    gradient as logits."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, backend):
        loss, _ = cross_entropy_fwd_inplace_op(logits, target, weight, ignore_index, label_smoothing,
                                                             z_loss, softcap, reduction, backend)
        ctx.save_for_backward(logits)  # the gradient now; saved at the version the op left
        ctx.none = reduction == "none"
        ctx.backend = backend
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, dloss):
        if ctx.used:
            raise RuntimeError("fastlm.cross_entropy: with inplace_backward=True the backward scales the gradient "
                               "held in the logits in place and can run once per forward; recompute the loss "
                               "instead of retain_graph=True")
        ctx.used = True
        grad = ctx.saved_tensors[0].detach()
        g2 = grad.view(-1, grad.shape[-1])
        if ctx.none:
            g2.mul_(dloss.reshape(-1, 1).to(torch.float32))  # each row by its own incoming gradient, in place
        else:
            cross_entropy_scale_grad_op(g2, dloss, ctx.backend)
        return grad, None, None, None, None, None, None, None, None


def _storage_refs(t):
    """References to t's storage: every tensor that shares it (views, detached aliases, a copy of the tensor an
    op saved for its backward) holds one. The temporary storage object made to ask adds one, taken off here."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1


def _check_inplace(logits):
    """Whether the gradient may be written over these logits: raises ValueError naming the reason where their
    values may still be needed. No host sync: the checks read autograd's and the allocator's bookkeeping only.

    Refused: a leaf (the caller's own tensor; its .grad would alias it), a view or a tensor with views or
    detached aliases (its storage is shared: something else reads it), one saved for the backward of an op that
    already ran (the op that produced it and saved its output, as tanh, exp, sigmoid, softmax and log_softmax do,
    or one that consumed it and saved its input, as pow or a matmul with a weight that needs a gradient do), and
    one that retains its gradient (its .grad would alias it)."""
    why = None
    if logits.is_leaf:
        why = ("they are a leaf tensor that requires grad (the caller's own data, and their .grad would be the "
               "same memory)")
    elif logits._base is not None:
        why = ("they are a view of another tensor, which shares their memory (pass the logits themselves: "
               "cross_entropy takes (..., V) logits with (...) targets, no flattening needed)")
    elif logits.retains_grad:
        why = "they retain their gradient (retain_grad()), which would be the same memory"
    elif logits._use_count() > 1 or _storage_refs(logits) > 1:
        # _use_count: references to the tensor itself (a view's base link, an op that saved it as its input);
        # storage: other tensors on the same memory (views, detached aliases, a saved output's copy).
        why = ("something else holds them: a view or detached alias of them, an op that saved them for its "
               "backward (the op that produced them, if it differentiates from its output as tanh, exp, sigmoid, "
               "softmax and log_softmax do; an op that consumed them and saved its input, as pow or a matmul do)")
    if why:
        raise ValueError("fastlm.cross_entropy(inplace_backward=True) writes the gradient over the logits, but "
                         f"the logits are still needed: {why}. Pass inplace_backward=False (the default), or "
                         "give the loss a tensor nothing else holds (e.g. the output of the head's matmul or of "
                         "a final scalar multiplication such as a softcap's).")


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
    # Read through numpy where it can view the tensor: its four elementwise ops on a small batch cost ~3 µs on a
    # 2-core CPU against ~7 µs for torch's dispatch of the same (about a third of a CPU call's host path). A
    # subclass (a FakeTensor) or a functorch wrapper keeps torch's ops, which say what they can.
    values = target
    if type(target) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(target):
        try:
            values = target.numpy()
        except RuntimeError:  # torch without numpy
            pass
    if ((values != ignore_index) & ((values < 0) | (values >= V))).any():
        bad = (target != ignore_index) & ((target < 0) | (target >= V))
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
                  z_loss=0.0, softcap=None, inplace_backward=False):
    """Softmax cross-entropy, as torch.nn.functional.cross_entropy with class-index targets, plus z_loss and softcap.

    logits (..., V) float32, float16 or bfloat16; target (...) int64 or int32; weight (V,) class weights or None.
    z_loss adds z_loss · logsumexp(row)² per kept row (PaLM); softcap replaces the logits by
    softcap · tanh(logits / softcap) before the softmax (Gemma 2). The loss is float32 whatever the logits' dtype.
    When the logits need a gradient it is computed in the forward pass into a buffer of its own (the logits are
    never written): the one logits-sized allocation of forward and backward, which becomes logits.grad (a leaf)
    or flows on into the backward of the op that made the logits.
    inplace_backward=True (kernel backends): the gradient is written over the logits instead, no allocation at
    all. Safe where nothing else needs the logits' values, which is checked when the call is made: logits that
    are a leaf, a view, viewed or aliased by another tensor, saved for backward by another op (the op that
    produced them and differentiates from its output, as tanh, exp or softmax do; an op that consumed them
    before this call and saved them) or that retain their gradient raise ValueError saying which, instead of
    giving silently wrong gradients. What the check cannot see is a use after the call: after it the logits
    tensor holds the gradient, so read nothing from it (compute any other loss or metric on the logits before
    this call, or on a copy). Logits that are not contiguous are copied first (safe, nothing saved); without a
    gradient to compute (no_grad, or logits that do not require grad) nothing is written; under torch.compile
    the out-of-place op is traced instead (the check needs real tensors).
    Out-of-range targets: each target must be in [0, V) or equal ignore_index. Targets on the CPU are checked
    (ValueError naming the first bad one); on a GPU they are not read, since that would synchronize the host with the
    device, and a row with an out-of-range target gets a NaN loss (and NaN gradient) on every backend, so a mean
    over it is NaN.
    """
    _check(logits, target, weight, ignore_index, label_smoothing, reduction, z_loss, softcap)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    # Meta tensors (shapes only) take the reference's shapes under every backend.
    backend = "torch" if logits.device.type == "meta" else _backend.resolve("cross_entropy", logits.device,
                                                                             logits.dtype)
    if backend == "torch":
        return reference.cross_entropy(logits, target, weight, ignore_index, label_smoothing, reduction, z_loss,
                                       softcap)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    w = weight.float().contiguous() if weight is not None else None
    if inplace_backward and compute_grad and not torch.compiler.is_compiling():
        if logits.is_contiguous():
            _check_inplace(logits)
        else:
            logits = logits.contiguous()  # a copy of our own: nothing else holds it
        loss = _CrossEntropyInplace.apply(
            logits, _util.flat(target), w, ignore_index, float(label_smoothing), float(z_loss),
            float(softcap or 0.0), reduction, backend,
        )
        return loss.view(target.shape) if reduction == "none" else loss
    x = _util.unit_stride_last(_util.as_2d(logits))
    loss = cross_entropy_fwd_op(
        x, _util.flat(target), w, ignore_index, float(label_smoothing), float(z_loss),
        float(softcap or 0.0), reduction, compute_grad, backend,
    )[0]
    return loss.view(target.shape) if reduction == "none" else loss


# Fused linear cross-entropy has its own op file; re-exported here, where callers have imported it from. Imported
# last: it builds on this module's checks and launchers.
from fastlm.ops.linear_cross_entropy import linear_cross_entropy  # noqa: E402
