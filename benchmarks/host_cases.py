"""The small calls that time each public op's host path, shared by `benchmarks.overhead` (on a CPU, launches stubbed)
and `benchmarks.call_cost` (on a GPU, end to end). Each case builder returns (args, ours, theirs): the inputs,
fastlm's call and torch's own for the same work, on tiny tensors (the host path does not depend on the size).
Importing this module imports fastlm: `benchmarks.overhead` sets TRITON_INTERPRET first.
"""

import torch
import torch.nn.functional as F

import fastlm


def _randn(*shape, device, dtype):
    return torch.randn(*shape, device=device, dtype=dtype)


def _norm_case(is_rms, residual, device="cpu", dtype=torch.float32):
    x, r = (_randn(4, 64, device=device, dtype=dtype) for _ in range(2))
    w, b = (_randn(64, device=device, dtype=dtype) for _ in range(2))

    def ours(x, w, b, r):
        if is_rms:
            return fastlm.rms_norm(x, w, residual=r if residual else None)
        return fastlm.layer_norm(x, w, b, residual=r if residual else None)

    def theirs(x, w, b, r):
        h = x + r if residual else x
        y = F.rms_norm(h, (64,), w, 1e-6) if is_rms else F.layer_norm(h, (64,), w, b)
        return (y, h) if residual else y

    return (x, w, b, r), ours, theirs


def _cross_entropy_case(device="cpu", dtype=torch.float32):
    logits, target = _randn(4, 64, device=device, dtype=dtype), torch.randint(0, 64, (4,), device=device)
    return ((logits, target), lambda l, t: fastlm.cross_entropy(l, t), lambda l, t: F.cross_entropy(l, t))


def _linear_cross_entropy_case(device="cpu", dtype=torch.float32):
    h, w = _randn(4, 32, device=device, dtype=dtype), _randn(64, 32, device=device, dtype=dtype)
    target = torch.randint(0, 64, (4,), device=device)
    return ((h, w, target), lambda h, w, t: fastlm.linear_cross_entropy(h, w, t),
            lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t))


def attention_case(device="cpu", dtype=torch.float32, head_dim=16):
    q, k, v = (_randn(1, 8, 2, head_dim, device=device, dtype=dtype) for _ in range(3))
    return ((q, k, v), lambda q, k, v: fastlm.attention(q, k, v, causal=True),
            lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=True).transpose(1, 2))


def _swiglu_case(device="cpu", dtype=torch.float32):
    gate, up = (_randn(4, 64, device=device, dtype=dtype) for _ in range(2))
    return (gate, up), lambda g, u: fastlm.swiglu(g, u), lambda g, u: F.silu(g) * u


def _rotary_case(device="cpu", dtype=torch.float32):
    x = _randn(1, 8, 2, 16, device=device, dtype=dtype)
    angles = torch.randn(8, 8, device=device)
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))

    def theirs(x, cos, sin):  # Hugging Face's apply_rotary_pos_emb, in x's (batch, seq, heads, dim) layout
        rotated = torch.cat([-x[..., 8:], x[..., :8]], -1)
        return x * cos[:, None] + rotated * sin[:, None]

    return (x, cos, sin), lambda x, c, s: fastlm.rotary_embedding(x, c, s), theirs


# op → builder(device="cpu", dtype=torch.float32) → (args, ours, theirs)
CASES = {
    "layer_norm": lambda **kw: _norm_case(False, False, **kw),
    "rms_norm": lambda **kw: _norm_case(True, False, **kw),
    "rms_norm+residual": lambda **kw: _norm_case(True, True, **kw),
    "cross_entropy": _cross_entropy_case,
    "linear_cross_entropy": _linear_cross_entropy_case,
    "attention": attention_case,
    "swiglu": _swiglu_case,
    "rotary_embedding": _rotary_case,
}

# Ops whose later floating-point arguments are constants (rotary's cos and sin tables): how many lead that need a
# gradient in the forward + backward case.
DIFFERENTIABLE = {"rotary_embedding": 1}


def call(fn, args, mode, differentiable=None):
    """A no-argument callable: the forward (inputs that need no gradient), or forward + backward (the first
    `differentiable` floating-point arguments, all of them by default, require a gradient)."""
    if mode == "fwd":
        return lambda: fn(*args)
    n = len(args) if differentiable is None else differentiable
    leaves = [a.clone().requires_grad_() if a.is_floating_point() and i < n else a for i, a in enumerate(args)]

    def step():
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return step
