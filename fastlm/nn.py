"""Drop-in modules: `fastlm.nn.LayerNorm` for `torch.nn.LayerNorm`, `fastlm.nn.RMSNorm` for `torch.nn.RMSNorm`,
`fastlm.nn.CrossEntropyLoss` for `torch.nn.CrossEntropyLoss`.

Each subclasses the torch module it replaces, so the constructor arguments, parameter names, state_dict keys,
initialisation and repr are torch's own: a state dict saved from one loads into the other and gives the same
output. Only `forward` changes: it runs fastlm's kernels and also takes an optional `residual`, in which case it
returns `(y, residual_out)` with the add fused (`residual_out = x + residual`, `y = norm(residual_out)`).
A multi-dimensional `normalized_shape` is normalized as one flattened last dimension.
"""

import math

import torch

from fastlm.ops.cross_entropy import cross_entropy as _cross_entropy
from fastlm.ops.cross_entropy import linear_cross_entropy as _linear_cross_entropy
from fastlm.ops import norm as _norm


def _flatten_last(x, normalized_shape):
    k = len(normalized_shape)
    if tuple(x.shape[x.dim() - k:]) != tuple(normalized_shape):
        raise ValueError(
            f"input's trailing dimensions must be normalized_shape {tuple(normalized_shape)}, got shape {tuple(x.shape)}"
        )
    return x.reshape(*x.shape[: x.dim() - k], math.prod(normalized_shape)) if k != 1 else x


def _flat(p):
    return p.reshape(-1) if p is not None else None


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, input, residual=None):
        x = _flatten_last(input, self.normalized_shape)
        r = _flatten_last(residual, self.normalized_shape) if residual is not None else None
        out = _norm.layer_norm(x, _flat(self.weight), _flat(self.bias), self.eps, r)
        if residual is None:
            return out.view(input.shape)
        return out[0].view(input.shape), out[1].view(input.shape)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm, plus `offset` (keyword only): the weight is used as `offset + weight` (Gemma: 1.0)."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *, offset=0.0):
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self.offset = float(offset)

    def forward(self, input, residual=None):
        # eps=None means the machine epsilon of the input's dtype, as in torch.nn.functional.rms_norm.
        eps = self.eps if self.eps is not None else torch.finfo(input.dtype).eps
        x = _flatten_last(input, self.normalized_shape)
        r = _flatten_last(residual, self.normalized_shape) if residual is not None else None
        out = _norm.rms_norm(x, _flat(self.weight), eps, r, self.offset)
        if residual is None:
            return out.view(input.shape)
        return out[0].view(input.shape), out[1].view(input.shape)

    def extra_repr(self):
        base = super().extra_repr()
        return base if self.offset == 0.0 else f"{base}, offset={self.offset}"


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss (class-index targets) on fastlm's kernels, plus keyword-only `z_loss` and
    `softcap` (see fastlm.cross_entropy). The loss is float32 whatever the logits' dtype. Input layouts are
    torch's: (C,), (N, C) or (N, C, d1, ...) with the classes in dim 1 (the last layout is moved to classes-last
    and copied; a language model's (tokens, vocab) logits need no copy)."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, z_loss=0.0, softcap=None):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = float(z_loss)
        self.softcap = softcap

    def forward(self, input, target):
        if input.dim() > 2:
            input = input.movedim(1, -1)
        return _cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            reduction=self.reduction, z_loss=self.z_loss, softcap=self.softcap,
        )


class LinearCrossEntropyLoss(torch.nn.Module):
    """A language model's output projection and its loss in one: `forward(hidden, target)` is
    cross_entropy(hidden @ weight.T + bias, target) computed in token chunks, never holding the (tokens, V)
    logits (fastlm.linear_cross_entropy). `logits(hidden)` gives the logits for inference. The parameters are a
    torch.nn.Linear(in_features, vocab_size)'s (`weight` (V, H), `bias`), so an existing head's state dict loads.
    Keywords as fastlm.cross_entropy; `class_weight` is its per-class `weight`; `low_memory` as
    fastlm.linear_cross_entropy's."""

    def __init__(self, in_features, vocab_size, bias=False, *, class_weight=None, ignore_index=-100,
                 label_smoothing=0.0, reduction="mean", z_loss=0.0, softcap=None, low_memory=False, device=None,
                 dtype=None):
        super().__init__()
        head = torch.nn.Linear(in_features, vocab_size, bias=bias, device=device, dtype=dtype)
        self.weight = head.weight
        self.bias = head.bias
        self.register_buffer("class_weight", class_weight)
        self.in_features, self.vocab_size = in_features, vocab_size
        self.ignore_index, self.label_smoothing, self.reduction = ignore_index, label_smoothing, reduction
        self.z_loss, self.softcap, self.low_memory = z_loss, softcap, low_memory

    def forward(self, hidden, target):
        return _linear_cross_entropy(
            hidden, self.weight, target, self.bias, class_weight=self.class_weight, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, reduction=self.reduction, z_loss=self.z_loss, softcap=self.softcap,
            low_memory=self.low_memory,
        )

    def logits(self, hidden):
        z = torch.nn.functional.linear(hidden, self.weight, self.bias)
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap is not None else z

    def extra_repr(self):
        return f"in_features={self.in_features}, vocab_size={self.vocab_size}, bias={self.bias is not None}"
