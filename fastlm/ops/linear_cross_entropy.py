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
from 8 chunks, and 4 chunks at that shape are 512 MiB of logits each.

low_memory=True chunks the vocabulary for d(weight) instead, so that nothing accumulates across chunks:
  pass 1   token chunks over the whole vocabulary, as above but without d(weight): the row statistics and loss,
           and (for "mean"/"sum") each chunk's gradient turned into its rows of d(hidden) (complete per chunk)
  pass 2   vocabulary blocks of LOW_MEMORY_BLOCK_BYTES of logits over all T tokens: the block's logits (the
           whole rows' statistics are known now), their gradient written over them by the cross-entropy's
           backward kernel on that block of columns, and the block's rows of d(weight) = gradᵀ·hidden, one matmul
           summed in fp32 inside and rounded once: as accurate as eager's (and the default's) d(weight)
FLOPs 8·T·H·V (the logits are made twice: 1.33× the default's matmul work). "none" runs both passes in its
backward. Memory beyond the inputs, at issue 13's shape (T 8192, H 4096, V 128256, bf16; MiB = 2²⁰ bytes):
  pass 1   one CHUNK_BYTES token chunk (256) + d(hidden) (T·H·d: 64) + row statistics (12 B a token: 0.1)  = 320
  pass 2   d(weight) (V·H·d: 1002) + d(hidden) (64) + one block (T × 4096 columns × d: 64)
           + the rows' incoming gradients (4 B a token: 0.03) + row statistics (0.1)                      = 1130
so the peak, 1130 MiB = 1.10 GiB, is the gradients themselves (1066 MiB) and one block of logits. The block width
is LOW_MEMORY_BLOCK_BYTES / (T·d), rounded down to a multiple of 128 columns, so the block stays about that size
at any T up to 2¹⁸ bf16 tokens (past that, narrower blocks of the same size). The default keeps speed (6·T·H·V) at the
cost of the fp32 accumulator; which is the better default is for measurements on a GPU to decide (issue 13).
"""

from typing import Optional

import torch

from fastlm import _backend, _util, reference
from fastlm.kernels import cross_entropy as triton_ce
from fastlm.ops import _checks, _eager
from fastlm.ops.cross_entropy import (_check_options, _check_target_and_weight, _check_target_values,
                                      _no_zero_grads, _reduce, cross_entropy_scale_grad_op)

CHUNK_BYTES = 256 << 20  # logits bytes per chunk: small next to the (tokens, V) logits, large enough for cuBLAS
MAX_CHUNKS = 64  # and never so many chunks that launch overhead shows
DW_BLOCK_BYTES = 256 << 20  # fp32 d(weight) accumulator bytes per block (its own allocation)
LOW_MEMORY_BLOCK_BYTES = 64 << 20  # low_memory: logits bytes of a vocabulary block (tokens × its columns)


def _chunk_rows(tokens, V, itemsize):
    rows = max(1, CHUNK_BYTES // max(1, V * itemsize))
    return max(rows, -(-tokens // MAX_CHUNKS))


def _acc_mm(block, a, b):
    """block[2] (fp32) += a @ b, accumulated in fp32 whatever a and b are; the first product becomes the
    accumulator (no zero-filled buffer: a memset of V·H·4 bytes saved, 2 GiB at issue 13's shape)."""
    acc = block[2]
    if acc is None:
        if a.dtype == torch.float32:
            block[2] = torch.mm(a, b)
        elif a.is_cuda:
            block[2] = torch.mm(a, b, out_dtype=torch.float32)  # cuBLAS: half inputs, fp32 output and sum
        else:
            block[2] = torch.mm(a.float(), b.float())
    elif a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _chunks(hidden, weight, bias, tokens, step):
    """(first token, last + 1, hidden's rows, their logits) per chunk of `step` tokens; hidden itself when one
    chunk holds every token (no slicing: a small call's host path)."""
    if step >= tokens:
        yield 0, tokens, hidden, torch.nn.functional.linear(hidden, weight, bias)
        return
    for start in range(0, tokens, step):
        h = hidden[start:start + step]
        yield start, start + step, h, torch.nn.functional.linear(h, weight, bias)


def _dw_blocks(weight):
    """The fp32 d(weight) accumulator as [first row, last row + 1, None] of at most DW_BLOCK_BYTES each (one
    block, the whole (V, H), for fp32 weights: it is the result); the first chunk's product fills each in."""
    V, H = weight.shape
    if weight.dtype == torch.float32:
        return [[0, V, None]]
    step = max(1, DW_BLOCK_BYTES // max(1, 4 * H))
    return [[v0, min(V, v0 + step), None] for v0 in range(0, V, step)]


def _finish_dw(blocks, dtype):
    """The (V, H) d(weight) in `dtype` from the fp32 blocks, which the list gives up: each is rounded and freed
    before the next is read, so at most one block exists in both precisions."""
    parts = []
    while blocks:
        acc = blocks.pop(0)[2]
        parts.append(acc.to(dtype))
        del acc
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _lce_pass(hidden, weight, bias, target, class_weight, sc, args, backend, compute, saved=None, dweight=True):
    """One pass over the token chunks.

    Without `saved` (the forward): the losses and row statistics, and, when `compute`, the gradients of the
    reduced loss for an incoming gradient of 1. With saved = (incoming gradient per row, row max, log-sum) (the
    backward of "none"): the gradients for those incoming gradients. Gradients: d(hidden), d(weight), d(bias) in
    the dtypes of hidden, weight and bias (d(weight) and d(bias) summed in fp32 across chunks; None, with
    dweight False: the low-memory path makes them in its own pass)."""
    ignore_index, smoothing, z_loss, softcap, reduction = args
    tokens = hidden.shape[0]
    # One chunk holds every token: its results are the results (no buffers to copy them into).
    step = _chunk_rows(tokens, weight.shape[0], hidden.element_size())
    whole = step >= tokens
    f32 = dict(dtype=torch.float32, device=hidden.device)
    stats = [torch.empty(tokens, **f32) for _ in range(3)] if saved is None and not whole else None  # loss, max, log
    # Row-major whatever hidden's layout (empty_like would copy a transposed one's strides): the chunks' mm writes
    # rows of it, and the backward's in-place scaling kernel takes rows with unit column stride.
    dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if compute and not whole else None
    blocks = _dw_blocks(weight) if compute and dweight else None
    db = torch.zeros(weight.shape[:1], **f32) if compute and dweight and bias is not None else None
    ce = _backend.launchers(backend, triton_ce)
    for start, end, h, logits in _chunks(hidden, weight, bias, tokens, step):
        t = target if whole else target[start:end]
        # The gradient goes over the chunk's logits (out=logits): one chunk buffer, not two.
        if saved is None:
            loss, row_max, log_s, _, grad = ce.cross_entropy_fwd(
                logits, t, class_weight, ignore_index, smoothing, z_loss, softcap, reduction, compute, sc=sc,
                out=logits)
            if whole:
                stats = [loss, row_max, log_s]
            else:
                for dst, src in zip(stats, (loss, row_max, log_s)):
                    dst[start:end] = src
        else:
            go, row_max, log_s = saved if whole else (x[start:end] for x in saved)
            grad = ce.cross_entropy_bwd(
                logits, t, class_weight, sc, row_max, log_s, go, ignore_index, smoothing, z_loss, softcap, out=logits)
        del logits
        if compute:
            if whole:
                dh = torch.mm(grad, weight)
            else:
                torch.mm(grad, weight, out=dh[start:end])
            for block in blocks or ():
                v0, v1 = block[0], block[1]
                _acc_mm(block, grad.t() if v1 - v0 == grad.shape[1] else grad[:, v0:v1].t(), h)
            if db is not None:
                db += grad.sum(0, dtype=torch.float32)
        del grad
    dw = _finish_dw(blocks, weight.dtype) if blocks is not None else None
    if db is not None:
        db = db.to(bias.dtype)
    return stats, dh, dw, db


def _vocab_columns(tokens, V, itemsize):
    """Columns of a vocabulary block of the low-memory pass: its (tokens, columns) logits about
    LOW_MEMORY_BLOCK_BYTES, a multiple of 128 columns where that many fit (whole 16-byte vectors, matmul tiles)."""
    cols = max(1, LOW_MEMORY_BLOCK_BYTES // max(1, tokens * itemsize))
    return min(V, cols // 128 * 128 if cols >= 128 else cols)


def _dweight_pass(hidden, weight, bias, target, class_weight, sc, args, backend, go, row_max, log_s):
    """The low-memory path's d(weight) and d(bias): one pass over vocabulary blocks, each block's logits made for
    every token (the whole rows' statistics are known), their gradient written over them, and the block's rows of
    d(weight) made by one matmul over all the tokens: summed in fp32 inside the matmul and rounded once, as eager's.
    go (tokens,) fp32: each row's incoming gradient (for "mean"/"sum" in the forward, 1 / the divisor)."""
    ignore_index, smoothing, z_loss, softcap, _ = args
    tokens, V = hidden.shape[0], weight.shape[0]
    ce = _backend.launchers(backend, triton_ce)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    db = torch.empty(weight.shape[:1], dtype=bias.dtype, device=bias.device) if bias is not None else None
    step = _vocab_columns(tokens, V, hidden.element_size())
    for v0 in range(0, V, step):
        v1 = min(V, v0 + step)
        logits = torch.nn.functional.linear(hidden, weight[v0:v1], bias[v0:v1] if bias is not None else None)
        grad = ce.cross_entropy_bwd(logits, target, class_weight, sc, row_max, log_s, go, ignore_index, smoothing,
                                    z_loss, softcap, out=logits, col0=v0, classes=V)
        del logits
        torch.mm(grad.t(), hidden, out=dw[v0:v1])
        if db is not None:
            db[v0:v1] = grad.sum(0, dtype=torch.float32)
        del grad
    return dw, db


def _lce(hidden, weight, bias, target, class_weight, sc, args, backend, compute, saved, low_memory):
    """The passes of either path: _lce_pass alone, or (low_memory) _lce_pass for the statistics and d(hidden),
    then _dweight_pass. Returns (loss, row max, log-sum) (the forward's; None with saved), dh, dw, db."""
    stats, dh, dw, db = _lce_pass(hidden, weight, bias, target, class_weight, sc, args, backend, compute, saved,
                                  dweight=not low_memory)
    if compute and low_memory:
        if saved is None:  # "mean"/"sum": the gradient of the reduced loss for an incoming 1, as the forward kernel
            go = torch.reciprocal(sc[:1]).expand(hidden.shape[0]).contiguous()
            row_max, log_s = stats[1], stats[2]
        else:
            go, row_max, log_s = saved
        dw, db = _dweight_pass(hidden, weight, bias, target, class_weight, sc, args, backend, go, row_max, log_s)
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
    low_memory: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (tokens, H), weight (V, H) → loss; for "mean"/"sum" with compute_grad: d(hidden), d(weight),
    d(bias) in their operands' dtypes for an incoming gradient of 1 (else empty); row max, log-sum (tokens,) and
    the (2,) scalars."""
    args = (ignore_index, label_smoothing, z_loss, softcap or None, reduction)
    sc = _backend.launchers(backend, triton_ce).scalars(target, class_weight, weight.shape[0], ignore_index, reduction)
    compute = compute_grad and reduction != "none"
    (loss, row_max, log_s), dh, dw, db = _lce(hidden, weight, bias, target, class_weight, sc, args, backend, compute,
                                              None, low_memory)
    return (_reduce(loss, sc, reduction, backend), *(g if g is not None else _empty(hidden) for g in (dh, dw, db)),
            row_max, log_s, sc)


@linear_cross_entropy_fwd_op.register_fake
def _(hidden, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap, reduction,
      compute_grad, low_memory, backend):
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
    low_memory: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduction "none": recompute the chunks with each row's incoming gradient → d(hidden), d(weight), d(bias)
    (empty without a bias) in their operands' dtypes."""
    args = (ignore_index, label_smoothing, z_loss, softcap or None, "none")
    saved = (grad_output.to(torch.float32), row_max, log_s)
    _, dh, dw, db = _lce(hidden, weight, bias, target, class_weight, sc, args, backend, True, saved, low_memory)
    return dh, dw, db if db is not None else _empty(hidden)


@linear_cross_entropy_bwd_op.register_fake
def _(hidden, weight, target, bias, class_weight, sc, row_max, log_s, grad_output, ignore_index, label_smoothing,
      z_loss, softcap, low_memory, backend):
    return (hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            bias.new_empty(weight.shape[:1]) if bias is not None else hidden.new_empty((0,)))


def _lce_setup_context(ctx, inputs, output):
    (hidden, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap, reduction, _,
     low_memory, backend) = inputs
    _, dh, dw, db, row_max, log_s, sc = output
    _no_zero_grads(ctx, output[1:])  # no zeros the size of d(weight) and d(hidden) for the unused outputs
    ctx.none = reduction == "none"
    ctx.backend = backend
    ctx.used = False
    if ctx.none:
        ctx.save_for_backward(hidden, weight, target, bias, class_weight, sc, row_max, log_s)
        ctx.args = (ignore_index, label_smoothing, z_loss, softcap, low_memory, backend)
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
        return (None,) * 13
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
    return (dh, dw, None, db if db.numel() else None, None, None, None, None, None, None, None, None, None)


linear_cross_entropy_fwd_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


def linear_cross_entropy(hidden, weight, target, bias=None, *, class_weight=None, ignore_index=-100,
                         label_smoothing=0.0, reduction="mean", z_loss=0.0, softcap=None, low_memory=False):
    """cross_entropy(hidden @ weight.T + bias, target, ...) without materializing the (tokens, V) logits.

    hidden (..., H) float32, float16 or bfloat16; weight (V, H) and bias (V,) or None in hidden's dtype; target
    (...) int64 or int32; class_weight (V,) per-class loss weights (cross_entropy's `weight`, renamed here because
    `weight` is the projection). Other keywords as fastlm.cross_entropy. Gradients for hidden, weight and bias;
    d(weight) and d(bias) accumulate in fp32 across token chunks and are rounded to their dtype once. Memory: see
    the module docstring (one chunk of logits, the fp32 d(weight) accumulator, the gradients themselves). Out-of-
    range targets as fastlm.cross_entropy.
    Under autocast, hidden, weight and bias are cast to the autocast dtype first, as autocast would cast them for
    the `hidden @ weight.T` this replaces (fp32 master weights with bf16 activations work); the loss stays fp32.

    low_memory=True: no fp32 d(weight) accumulator. The logits are made a second time, in vocabulary blocks over
    all the tokens, and each block's rows of d(weight) come from one matmul (8·tokens·H·V FLOPs instead of 6·, as
    accurate as the default). Extra memory: the gradients themselves, one LOW_MEMORY_BLOCK_BYTES block of logits
    and a CHUNK_BYTES token chunk before d(weight) exists (see the module docstring).
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
                                         reduction, z_loss, softcap, low_memory)
    return _linear_cross_entropy(hidden, weight, target, bias, class_weight, ignore_index, label_smoothing,
                                 reduction, z_loss, softcap, low_memory)


def _linear_cross_entropy(hidden, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction,
                          z_loss, softcap, low_memory=False):
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
    h = _util.as_2d(hidden)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    cw = class_weight.float().contiguous() if class_weight is not None else None
    loss = linear_cross_entropy_fwd_op(
        h, weight, _util.flat(target), bias, cw, ignore_index, float(label_smoothing), float(z_loss),
        float(softcap or 0.0), reduction, compute_grad, bool(low_memory), backend,
    )[0]
    return loss.view(target.shape) if reduction == "none" else loss
