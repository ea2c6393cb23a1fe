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


def cross_entropy(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean", z_loss=0.0,
                  softcap=None):
    """Softmax cross-entropy over the last dim of logits (..., V) with targets (...), as
    torch.nn.functional.cross_entropy for the arguments the two share, plus:
      z_loss   adds z_loss · logsumexp(row)² to each kept row's loss (PaLM), reduced like the rest;
      softcap  replaces the logits by softcap · tanh(logits / softcap) first (Gemma 2).
    The loss is float32 (float64 for float64 logits) whatever the logits' dtype."""
    ct = _compute_dtype(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V).to(ct)
    t = target.reshape(-1).long()
    keep = t != ignore_index
    # An ignored row contributes nothing, its gradient included: zero its logits first, or an inf in it would
    # reach the gradient as NaN through log_softmax's backward (which torch's own cross_entropy lets happen).
    z = torch.where(keep[:, None], z, torch.zeros_like(z))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, -1)  # not z − logsumexp(z): that rounds at the magnitude of the logsumexp
    tk = torch.where(keep, t, torch.zeros_like(t))
    w = weight.to(ct) if weight is not None else None
    w_t = w[tk] if w is not None else torch.ones_like(tk, dtype=ct)
    nll = -logp.gather(1, tk[:, None])[:, 0] * w_t
    loss = (1 - label_smoothing) * nll
    if label_smoothing > 0:
        smooth = -(logp * w).sum(-1) if w is not None else -logp.sum(-1)
        loss = loss + label_smoothing / V * smooth
    if z_loss > 0:
        loss = loss + z_loss * torch.logsumexp(z, -1).square()
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (w_t * keep).sum()


def linear_cross_entropy(hidden, weight, target, bias=None, class_weight=None, ignore_index=-100,
                         label_smoothing=0.0, reduction="mean", z_loss=0.0, softcap=None):
    """cross_entropy(hidden @ weight.T + bias, target, ...), the logits materialized: hidden (..., H), weight
    (V, H), bias (V,) or None, class_weight (V,) or None."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return cross_entropy(logits, target, class_weight, ignore_index, label_smoothing, reduction, z_loss, softcap)
