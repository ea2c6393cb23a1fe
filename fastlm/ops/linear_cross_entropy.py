"""Fused linear cross-entropy: argument checks, backend dispatch, torch.library registration and autograd.

loss = cross_entropy(hidden @ weight.T + bias, target) without ever holding the (tokens, V) logits: the tokens go
through in chunks; each chunk's logits (chunk, V) are made by one matmul, the cross-entropy kernel writes their
gradient over them (the chunk's logits are needed by nothing else), and two more matmuls turn it into d(hidden)
for the chunk and a term of d(weight), accumulated in fp32 across chunks (d(bias) likewise). FLOPs:
6·tokens·H·V for forward+backward, the same as the unfused composition. "mean"/"sum" finish every gradient in the
forward pass (the mean divisor of the whole batch is known up front on the device), and the backward scales them
in place by the incoming gradient (the cross-entropy's scaling kernel: nothing when it is 1.0, no host sync);
"none" saves the row statistics and recomputes the chunks in the backward, where each row's incoming gradient is
known.

Memory beyond the inputs, for tokens T, hidden H, vocabulary V, element size d (weights and activations):
  one chunk buffer       CHUNK_BYTES of logits (its gradient is written over it)
  d(hidden)              T·H·d, the result
  d(weight)              V·H·4 in fp32 while the chunks accumulate, in blocks of at most DW_BLOCK_BYTES each
                         (fp32 weights: that is the result itself); at the end each block is rounded to the
                         weight's dtype and freed before the next, so the fp32 and the rounded copies overlap by
                         one block, and the rounded blocks are joined into the (V, H) result (V·H·d). Peak:
                         about V·H·4 + max(CHUNK_BYTES, DW_BLOCK_BYTES·d/4) + T·H·d, then V·H·2d while joining.
  row statistics         12 bytes a token
Nothing else is logits-sized: autograd gets no zero gradients for the op's other outputs, the backward scales in
place, and the dtype conversion happens once, in the forward.

Why the fp32 d(weight) (V·H·4: 2 GiB at 128256 × 4096, issue 13's shape; issue 13 asks for at most 1.17 GiB in
all): with the logits made once (6·T·H·V FLOPs), every token chunk adds a term to every row of d(weight), so the
sum is held for the whole (V, H) at once. Holding it in bf16 instead, as Liger does, rounds it once per chunk:
measured on CPU (T 8192, H 256, V 2048, bf16 inputs, error against float64, relative Frobenius norm), one fp32 sum
rounded once (eager) errs 1.7e-3, bf16 sums of 2, 4, 8, 16 chunks 2.0e-3, 2.6e-3, 3.5e-3, 4.8e-3: past 2× eager's
from 8 chunks, and 4 chunks at that shape are 512 MiB of logits each. Chunking the vocabulary instead (each
d(weight) block complete after one pass over the tokens) needs every row's log-sum-exp first, so the logits are
made twice (8·T·H·V, 1.33× the FLOPs). Memory, speed and d(weight)'s accuracy cannot all meet issue 13's targets
at once; this op keeps speed and accuracy.
"""

from typing import Optional

import torch

from fastlm import _backend, reference
from fastlm.kernels import cross_entropy as triton_ce
from fastlm.ops import _checks, _eager
from fastlm.ops.cross_entropy import (_check_options, _check_target_and_weight, _check_target_values,
                                      _no_zero_grads, _reduce, cross_entropy_scale_grad_op)

CHUNK_BYTES = 256 << 20  # logits bytes per chunk: small next to the (tokens, V) logits, large enough for cuBLAS
MAX_CHUNKS = 64  # and never so many chunks that launch overhead shows
DW_BLOCK_BYTES = 256 << 20  # fp32 d(weight) accumulator bytes per block (its own allocation)


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


def _dw_blocks(weight):
    """The fp32 d(weight) accumulator as [(first row, last row + 1, zeros)] of at most DW_BLOCK_BYTES each (one
    block, the whole (V, H), for fp32 weights: it is the result)."""
    V, H = weight.shape
    f32 = dict(dtype=torch.float32, device=weight.device)
    if weight.dtype == torch.float32:
        return [(0, V, torch.zeros((V, H), **f32))]
    step = max(1, DW_BLOCK_BYTES // max(1, 4 * H))
    return [(v0, min(V, v0 + step), torch.zeros((min(V, v0 + step) - v0, H), **f32)) for v0 in range(0, V, step)]


def _finish_dw(blocks, dtype):
    """The (V, H) d(weight) in `dtype` from the fp32 blocks, which the list gives up: each is rounded and freed
    before the next is read, so at most one block exists in both precisions."""
    parts = []
    while blocks:
        acc = blocks.pop(0)[2]
        parts.append(acc.to(dtype))
        del acc
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _lce_pass(hidden, weight, bias, target, class_weight, sc, args, backend, compute, saved=None):
    """One pass over the token chunks.

    Without `saved` (the forward): the losses and row statistics, and, when `compute`, the gradients of the
    reduced loss for an incoming gradient of 1. With saved = (incoming gradient per row, row max, log-sum) (the
    backward of "none"): the gradients for those incoming gradients. Gradients: d(hidden), d(weight), d(bias) in
    the dtypes of hidden, weight and bias (d(weight) and d(bias) summed in fp32 across chunks)."""
    ignore_index, smoothing, z_loss, softcap, reduction = args
    tokens = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    stats = [torch.empty(tokens, **f32) for _ in range(3)] if saved is None else None  # loss, row max, log-sum
    # Row-major whatever hidden's layout (empty_like would copy a transposed one's strides): the chunks' mm writes
    # rows of it, and the backward's in-place scaling kernel takes rows with unit column stride.
    dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if compute else None
    blocks = _dw_blocks(weight) if compute else None
    db = torch.zeros(weight.shape[:1], **f32) if compute and bias is not None else None
    for start, end, h, logits in _chunks(hidden, weight, bias, tokens):
        t = target[start:end]
        # The gradient goes over the chunk's logits (out=logits): one chunk buffer, not two.
        if saved is None:
            loss, row_max, log_s, _, grad = _backend.launchers(backend, triton_ce).cross_entropy_fwd(
                logits, t, class_weight, ignore_index, smoothing, z_loss, softcap, reduction, compute, sc=sc,
                out=logits)
            for dst, src in zip(stats, (loss, row_max, log_s)):
                dst[start:end] = src
        else:
            go, row_max, log_s = (x[start:end] for x in saved)
            grad = _backend.launchers(backend, triton_ce).cross_entropy_bwd(
                logits, t, class_weight, sc, row_max, log_s, go, ignore_index, smoothing, z_loss, softcap, out=logits)
        del logits
        if compute:
            torch.mm(grad, weight, out=dh[start:end])
            for v0, v1, acc in blocks:
                _acc_mm(acc, grad[:, v0:v1].t(), h)
            if db is not None:
                db += grad.sum(0, dtype=torch.float32)
        del grad
    dw = _finish_dw(blocks, weight.dtype) if compute else None
    if db is not None:
        db = db.to(bias.dtype)
    return stats, dh, dw, db


def _empty(like):
    return like.new_empty((0,))


@_eager.custom_op("fastlm::linear_cross_entropy_fwd", mutates_args=())
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
    """hidden (tokens, H), weight (V, H) → loss; for "mean"/"sum" with compute_grad: d(hidden), d(weight),
    d(bias) in their operands' dtypes for an incoming gradient of 1 (else empty); row max, log-sum (tokens,) and
    the (2,) scalars."""
    args = (ignore_index, label_smoothing, z_loss, softcap or None, reduction)
    sc = _backend.launchers(backend, triton_ce).scalars(target, class_weight, weight.shape[0], ignore_index, reduction)
    compute = compute_grad and reduction != "none"
    (loss, row_max, log_s), dh, dw, db = _lce_pass(hidden, weight, bias, target, class_weight, sc, args, backend,
                                                   compute)
    return (_reduce(loss, sc, reduction, backend), *(g if g is not None else _empty(hidden) for g in (dh, dw, db)),
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
        weight.new_empty(weight.shape if grads else (0,)),
        (bias if bias is not None else hidden).new_empty(weight.shape[:1] if grads and bias is not None else (0,)),
        hidden.new_empty((tokens,), **f32),
        hidden.new_empty((tokens,), **f32),
        hidden.new_empty((2,), **f32),
    )


@_eager.custom_op("fastlm::linear_cross_entropy_bwd", mutates_args=())
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
    """Reduction "none": recompute the chunks with each row's incoming gradient → d(hidden), d(weight), d(bias)
    (empty without a bias) in their operands' dtypes."""
    args = (ignore_index, label_smoothing, z_loss, softcap or None, "none")
    saved = (grad_output.to(torch.float32), row_max, log_s)
    _, dh, dw, db = _lce_pass(hidden, weight, bias, target, class_weight, sc, args, backend, True, saved)
    return dh, dw, db if db is not None else _empty(hidden)


@linear_cross_entropy_bwd_op.register_fake
def _(hidden, weight, target, bias, class_weight, sc, row_max, log_s, grad_output, ignore_index, label_smoothing,
      z_loss, softcap, backend):
    return (hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            bias.new_empty(weight.shape[:1]) if bias is not None else hidden.new_empty((0,)))


def _lce_setup_context(ctx, inputs, output):
    (hidden, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap, reduction, _,
     backend) = inputs
    _, dh, dw, db, row_max, log_s, sc = output
    _no_zero_grads(ctx, output[1:])  # no zeros the size of d(weight) and d(hidden) for the unused outputs
    ctx.none = reduction == "none"
    ctx.backend = backend
    ctx.used = False
    if ctx.none:
        ctx.save_for_backward(hidden, weight, target, bias, class_weight, sc, row_max, log_s)
        ctx.args = (ignore_index, label_smoothing, z_loss, softcap, backend)
    else:
        ctx.save_for_backward(dh, dw, db)


def _scale(g, dloss, backend):
    """g *= dloss in place (nothing on the device when it is 1.0): the cross-entropy's scaling kernel, which
    multiplies in fp32 and rounds once, on g seen as rows."""
    if not g.numel():
        return
    if not g.is_contiguous():
        raise RuntimeError("fastlm.linear_cross_entropy: a gradient buffer is not contiguous")  # the kernel's rows
    cross_entropy_scale_grad_op(g.view(-1, g.shape[-1]), dloss, backend)


def _lce_backward(ctx, dloss, *_):
    if dloss is None:
        return (None,) * 12
    if ctx.none:
        hidden, weight, target, bias, class_weight, sc, row_max, log_s = ctx.saved_tensors
        dh, dw, db = linear_cross_entropy_bwd_op(hidden, weight, target, bias, class_weight, sc,
                                                               row_max, log_s, dloss.contiguous(), *ctx.args)
    else:
        if ctx.used:
            raise RuntimeError("fastlm.linear_cross_entropy: the backward scales its gradients in place and can "
                               "run once per forward; recompute the loss instead of retain_graph=True")
        ctx.used = True
        dh, dw, db = ctx.saved_tensors
        for g in (dh, dw, db):
            _scale(g, dloss, ctx.backend)
    return (dh, dw, None, db if db.numel() else None, None, None, None, None, None, None, None, None)


linear_cross_entropy_fwd_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


def linear_cross_entropy(hidden, weight, target, bias=None, *, class_weight=None, ignore_index=-100,
                         label_smoothing=0.0, reduction="mean", z_loss=0.0, softcap=None):
    """cross_entropy(hidden @ weight.T + bias, target, ...) without materializing the (tokens, V) logits.

    hidden (..., H) float32, float16 or bfloat16; weight (V, H) and bias (V,) or None in hidden's dtype; target
    (...) int64 or int32; class_weight (V,) per-class loss weights (cross_entropy's `weight`, renamed here because
    `weight` is the projection). Other keywords as fastlm.cross_entropy. Gradients for hidden, weight and bias;
    d(weight) and d(bias) accumulate in fp32 across token chunks and are rounded to their dtype once. Memory: see
    the module docstring (one chunk of logits, the fp32 d(weight) accumulator, the gradients themselves). Out-of-
    range targets as fastlm.cross_entropy.
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
    loss = linear_cross_entropy_fwd_op(
        h, weight, target.reshape(-1).contiguous(), bias, cw, ignore_index, float(label_smoothing), float(z_loss),
        float(softcap or 0.0), reduction, compute_grad, backend,
    )[0]
    return loss.view(target.shape) if reduction == "none" else loss
