"""`fastlm.functional`: drop-ins for torch.nn.functional, with its names, signatures and layouts.

    import fastlm.functional as F          # in place of: import torch.nn.functional as F
    y = F.layer_norm(x, (4096,), w, b)
    y = F.rms_norm(x, x.shape[-1:], w)                         # eps=None: the machine epsilon of x's dtype
    loss = F.cross_entropy(logits, target, ignore_index=-100)  # (N, C), (C,) or (N, C, d1, ...), classes in dim 1
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)

Each function takes torch's arguments in torch's order with torch's defaults, and runs fastlm's op
(fastlm.layer_norm, fastlm.rms_norm, fastlm.cross_entropy, fastlm.scaled_dot_product_attention) on the current
backend. Differences from torch, all deliberate:
- A `normalized_shape` of several dimensions is normalized as one flattened last dimension (the kernels normalize
  over the last dimension); the input's trailing dimensions and the parameters are reshaped (a view where the
  strides allow, else a copy, never a different answer).
- cross_entropy's loss is float32 whatever the logits' dtype (as fastlm.cross_entropy and fastlm.nn.CrossEntropyLoss);
  torch gives it in the logits' dtype. Class-probability targets (a floating-point target of the input's shape),
  which the kernels do not take, go to torch's own F.cross_entropy, with a warning the first time, and then give
  torch's dtype. The legacy `size_average` and `reduce` map to `reduction` exactly as torch maps them (with
  torch's deprecation warning).
- Shape errors are ValueError (fastlm's convention) where torch raises RuntimeError.
"""

import math

import torch

from fastlm import _backend
from fastlm.ops.attention import scaled_dot_product_attention as _sdpa
from fastlm.ops.cross_entropy import cross_entropy as _cross_entropy
from fastlm.ops.norm import layer_norm as _layer_norm
from fastlm.ops.norm import rms_norm as _rms_norm

__all__ = ["cross_entropy", "layer_norm", "rms_norm", "scaled_dot_product_attention"]


def _normalized_shape(normalized_shape):
    if isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
        return (normalized_shape,)
    try:
        shape = tuple(normalized_shape)
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}") from None
    if not shape or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
        raise TypeError(f"normalized_shape must be an int or a non-empty sequence of ints, got {normalized_shape!r}")
    return shape


def _flatten(input, normalized_shape, params):
    """input (..., *normalized_shape) → (..., prod), the parameters (normalized_shape) → (prod,)."""
    shape = _normalized_shape(normalized_shape)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    k = len(shape)
    if input.dim() < k or tuple(input.shape[input.dim() - k:]) != shape:
        raise ValueError(f"input's trailing dimensions must be normalized_shape {shape}, got shape "
                         f"{tuple(input.shape)}")
    flat = []
    for name, p in params:
        if p is not None:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
            if tuple(p.shape) != shape:
                raise ValueError(f"{name} must have shape normalized_shape {shape}, got {tuple(p.shape)}")
            p = p.reshape(-1) if k != 1 else p
        flat.append(p)
    if k != 1:
        input = input.reshape(*input.shape[:input.dim() - k], math.prod(shape))
    return input, flat


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """torch.nn.functional.layer_norm on fastlm.layer_norm: LayerNorm over the trailing `normalized_shape`
    dimensions of input, weight and bias of that shape or None."""
    x, (w, b) = _flatten(input, normalized_shape, (("weight", weight), ("bias", bias)))
    return _layer_norm(x, w, b, eps).reshape(input.shape)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """torch.nn.functional.rms_norm on fastlm.rms_norm; eps=None means torch.finfo(input.dtype).eps, as torch."""
    x, (w,) = _flatten(input, normalized_shape, (("weight", weight),))
    if eps is None:
        eps = torch.finfo(input.dtype).eps if input.dtype.is_floating_point else 0.0  # fastlm rejects the dtype
    return _rms_norm(x, w, eps).reshape(input.shape)


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                  label_smoothing=0.0):
    """torch.nn.functional.cross_entropy on fastlm.cross_entropy, in torch's layouts: input (C,) with target (),
    (N, C) with (N,), or (N, C, d1, ..., dk) with (N, d1, ..., dk), the classes in dim 1 (moved last, which
    copies the logits when k ≥ 1; an (N, C) input is used in place). The loss is float32."""
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if isinstance(target, torch.Tensor) and target.dtype.is_floating_point:
        _backend.say_once("functional.cross_entropy: class probabilities",
                          "fastlm.functional.cross_entropy: class-probability targets (a floating-point target) are "
                          "not covered by the fastlm kernels; using torch's cross_entropy", stacklevel=2)
        return torch.nn.functional.cross_entropy(input, target, weight=weight, ignore_index=ignore_index,
                                                 reduction=reduction, label_smoothing=label_smoothing)
    logits = input.movedim(1, -1) if input.dim() > 2 else input
    return _cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                          reduction=reduction)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention: fastlm.scaled_dot_product_attention (its layout
    (batch, heads, seqlen, head_dim), its top-left causal alignment; a dense attn_mask or dropout go to torch's
    own SDPA, said once)."""
    return _sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                 enable_gqa=enable_gqa)
