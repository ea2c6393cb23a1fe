"""Rotary position embedding: argument checks, backend dispatch, torch.library registration and autograd.

The math, the roofline and the kernel design are in kernels/rotary.py (Triton) and csrc/rotary.cu (CUDA C++);
the reference is fastlm.reference.rotary_embedding.

Flow: fastlm.rotary_embedding checks its arguments, gives x a unit feature stride and cos/sin unit feature
strides and equal strides (copies only where they lack them; expanded and sliced tables are taken as they are),
and picks a backend. The torch backend is the reference, differentiated by autograd. The kernel backends go
through one registered op, `fastlm::rotary_embedding`, which calls the backend's `rotary_fwd` or, with
backward=True, `rotary_bwd` (the transpose of the rotation; kernels.rotary and fastlm._cuda share the
signatures). Its autograd formula is the same op with backward flipped, so gradients of any order work, and a
fake implementation lets torch.compile trace it without graph breaks. Nothing reads a GPU value on the host.

cos and sin are buffers (a function of the positions): they get no gradient on any backend.
Saved for backward: cos and sin.
"""

import torch

from fastlm import _backend, _util, reference
from fastlm.kernels import rotary as triton_rotary
from fastlm.ops import _checks, _eager

MAX_TOKENS = 2**31 - 1  # batch · seq: the kernels index tokens with 32-bit integers


@_eager.custom_op("fastlm::rotary_embedding", mutates_args=())
def rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, heads_first: bool,
              backward: bool, backend: str) -> torch.Tensor:
    """x (batch, seq, heads, head_dim), or (batch, heads, seq, head_dim) when heads_first → the rotated x, same
    shape, contiguous; backward applies the transpose (the gradient). cos, sin (seq, rot) or (batch or 1, seq,
    rot), unit feature stride, equal strides."""
    impl = _backend.launchers(backend, triton_rotary)
    launcher = impl.rotary_bwd if backward else impl.rotary_fwd
    return launcher(x, cos, sin, interleaved, heads_first)


@rotary_op.register_fake
def _(x, cos, sin, interleaved, heads_first, backward, backend):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, cos, sin, interleaved, heads_first, backward, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.args = (interleaved, heads_first, not backward, backend)


def _backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    # The kernels take any strides but a unit feature stride; autograd may hand out an expanded gradient.
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    return rotary_op(dy, cos, sin, *ctx.args), None, None, None, None, None, None


rotary_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, cos, sin, heads_first):
    _checks.tensor("x", x)
    if x.dim() != 4:
        layout = "(batch, heads, seq, head_dim)" if heads_first else "(batch, seq, heads, head_dim)"
        raise ValueError(f"x must be 4-D {layout}, got shape {tuple(x.shape)}")
    batch, seqlen = x.shape[0], x.shape[2 if heads_first else 1]
    head_dim = x.shape[-1]
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.tensor(name, t)
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
        if t.dim() not in (2, 3) or t.shape[-2] != seqlen or (t.dim() == 3 and t.shape[0] not in (1, batch)):
            raise ValueError(f"{name} must have shape (seq, rot) or (batch, seq, rot) with seq = {seqlen} and batch "
                             f"= {batch} or 1 (x's), got {tuple(t.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if sin.dtype != cos.dtype:
        raise TypeError(f"sin must have cos's dtype ({cos.dtype}), got {sin.dtype}")
    rot = cos.shape[-1]
    if rot < 2 or rot % 2 or rot > head_dim:
        raise ValueError(f"cos and sin's last dimension (the rotated features) must be even, ≥ 2 and ≤ head_dim "
                         f"({head_dim}), got {rot}")
    _checks.same_device("cos", cos, "x", x)
    _checks.same_device("sin", sin, "x", x)


def _kernel_unsupported(x, cos, heads_first):
    tokens = x.shape[0] * x.shape[2 if heads_first else 1]
    rot = cos.shape[-1]

    def unsupported(backend):
        if tokens > MAX_TOKENS:
            return f"the rotary kernels take fewer than 2^31 tokens (batch · seq), got {tokens}"
        if backend == "triton" and rot > triton_rotary.MAX_ROT:
            return f"the triton rotary kernel rotates at most {triton_rotary.MAX_ROT} features, got {rot}"
        return None

    return unsupported


def rotary_embedding(x, cos, sin, *, interleaved=False, heads_first=False):
    """Rotary position embedding (RoPE) of x by the angles whose cosines and sines are cos and sin.

    x: (batch, seq, heads, head_dim), or (batch, heads, seq, head_dim) with heads_first=True (Hugging Face's
    layout); float32, float16 or bfloat16 (float64 runs on the torch backend); any strides.
    cos, sin: (seq, rot) or (batch, seq, rot) (a batch of 1 serves every sequence), in Hugging Face's full-width
    form, cos = cat(freqs, freqs).cos() for rotate-half; x's dtype or float32 (then the math is float32 and the
    result x's dtype); any strides (expanded and sliced tables are read in place). rot is even and ≤ head_dim: the
    first rot features of each head rotate (partial rotary), the rest pass through unchanged.
    interleaved=False is rotate-half (Llama, Qwen, Mistral, Gemma):
        out[..., :rot] = x[..., :rot]·cos + rotate_half(x[..., :rot])·sin,  rotate_half(v) = cat(−v₂, v₁);
    interleaved=True rotates adjacent pairs (GPT-J): (x[2i], x[2i+1]), with cos and sin repeated per pair.

    Returns a new tensor of x's shape and dtype (contiguous in x's layout). Differentiable in x; the backward is
    the same kernel applying the transposed rotation (sin negated). cos and sin are treated as constants (buffers):
    they never receive a gradient, even when they require one.
    """
    _check(x, cos, sin, heads_first)
    interleaved, heads_first = bool(interleaved), bool(heads_first)
    # Meta tensors (shapes only: model init on meta, FSDP) take the reference's shapes under every backend.
    backend = "torch" if x.device.type == "meta" else _backend.resolve(
        "rotary_embedding", x.device, x.dtype, unsupported=_kernel_unsupported(x, cos, heads_first))
    if backend == "torch":
        return reference.rotary_embedding(x, cos.detach(), sin.detach(), interleaved, heads_first)
    cos, sin = _util.unit_stride_last(cos), _util.unit_stride_last(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return rotary_op(_util.unit_stride_last(x), cos, sin, interleaved, heads_first, False, backend)
