"""Pure-PyTorch references: the math every kernel is checked against, and the `torch` backend.

Each reference computes in float32 (float64 when given float64, which is how the tests build the exact answer)
and returns its result in the input's dtype. Plain differentiable PyTorch: autograd gives the gradients.
"""

import torch


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _residual_add(x, residual):
    """The pre-norm residual add: rounded to x's dtype, as the unfused `x + residual` would be."""
    if residual is None:
        return x, None
    s = (x.to(_compute_dtype(x)) + residual.to(_compute_dtype(x))).to(x.dtype)
    return s, s


def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None):
    """y = (v − mean(v)) / sqrt(var(v) + eps) · weight + bias over the last dim, v = x (+ residual).

    Returns y, or (y, residual_out) when residual is given."""
    v, residual_out = _residual_add(x, residual)
    ct = _compute_dtype(x)
    vf = v.to(ct)
    mean = vf.mean(-1, keepdim=True)
    # One correction step: the mean of what is left after subtracting the first estimate. It removes the
    # rounding of a float32 sum of large values (rows with a large common offset).
    mean = mean + (vf - mean).mean(-1, keepdim=True)
    var = (vf - mean).square().mean(-1, keepdim=True)
    y = (vf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    y = y.to(x.dtype)
    return y if residual is None else (y, residual_out)


def rms_norm(x, weight=None, eps=1e-6, residual=None, offset=0.0):
    """y = v / sqrt(mean(v²) + eps) · (offset + weight) over the last dim, v = x (+ residual).

    Returns y, or (y, residual_out) when residual is given."""
    v, residual_out = _residual_add(x, residual)
    ct = _compute_dtype(x)
    vf = v.to(ct)
    y = vf * torch.rsqrt(vf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (offset + weight.to(ct))
    y = y.to(x.dtype)
    return y if residual is None else (y, residual_out)
