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
    # A target outside [0, V) (other than ignore_index) gives that row a NaN loss, as the kernels do: checking it
    # on a GPU would sync (the ops layer refuses such targets when they are on the CPU).
    bad = keep & ((t < 0) | (t >= V))
    tk = torch.where(keep & ~bad, t, torch.zeros_like(t))
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
    loss = torch.where(bad, torch.full_like(loss, float("nan")), loss)
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


def attention_visible(seqlen_q, seqlen_k, window_left, window_right, device):
    """(seqlen_q, seqlen_k) bool: may query i see key j. Positions are aligned bottom-right (the last query sees
    the last key, as a KV cache needs): with off = seqlen_k − seqlen_q, j is visible when
    j ≥ i + off − window_left and j ≤ i + off + window_right; None bounds nothing. Causal is window_right = 0."""
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    off = seqlen_k - seqlen_q
    visible = torch.ones((seqlen_q, seqlen_k), dtype=torch.bool, device=device)
    if window_left is not None:
        visible &= j >= i + off - window_left
    if window_right is not None:
        visible &= j <= i + off + window_right
    return visible


def _attention_dense(q, k, v, scale, window_left, window_right, softcap, ct):
    # q (B, Sq, Hq, D), k and v (B, Sk, Hk, D) → out (B, Sq, Hq, D) in q's dtype, lse (B, Hq, Sq) fp32.
    B, Sq, Hq, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    qf = q.to(ct).transpose(1, 2)
    kf = k.to(ct).transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)
    vf = v.to(ct).transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    visible = attention_visible(Sq, Sk, window_left, window_right, q.device)
    row_any = visible.any(-1, keepdim=True)
    # Rows that see nothing get zero output and zero gradient; softmax never sees an all −inf row (no NaN).
    s = torch.where(row_any, s.masked_fill(~visible, float("-inf")), 0.0)
    p = torch.where(row_any, torch.softmax(s, dim=-1), 0.0)
    lse = torch.where(row_any, torch.logsumexp(s, dim=-1, keepdim=True), float("-inf")).squeeze(-1)
    out = (p.to(vf.dtype) @ vf).transpose(1, 2)
    return out.to(q.dtype), lse.to(torch.float32 if ct != torch.float64 else ct)


def attention_masked(q, k, v, scale, window_left=None, window_right=None, softcap=0.0, cu_seqlens_q=None,
                     cu_seqlens_k=None, upcast=True):
    """Softmax attention with the window in its bounded form (None = unbounded; see `attention_visible`).

    Dense: q (B, Sq, Hq, D), k and v (B, Sk, Hk, D), Hk dividing Hq (query head h reads kv head h // (Hq/Hk)).
    Varlen: q (Tq, Hq, D), k and v (Tk, Hk, D), packed sequences with int32 offsets cu_seqlens_q/k (B + 1,).
    Score s = scale·q·k, capped to softcap·tanh(s/softcap) when softcap > 0. Returns out in q's dtype and the
    natural-log LSE (B, Hq, Sq) or (Hq, Tq), −inf for a query that sees no key (its output row is 0).
    Packed tokens outside every sequence (before cu[0] > 0, after cu[-1] < T) are such queries: output 0, LSE −inf,
    and zero gradients (also for such keys). Offsets must be valid here (0 ≤ cu[0] ≤ … ≤ cu[-1] ≤ T).
    upcast=False computes in the input dtype: PyTorch's own precision, the baseline of the tolerance rule.
    Varlen reads the offsets on the host (a sync): this is the reference, not a kernel."""
    ct = _compute_dtype(q) if upcast else q.dtype
    if cu_seqlens_q is None:
        return _attention_dense(q, k, v, scale, window_left, window_right, softcap, ct)
    lse_dtype = torch.float32 if ct != torch.float64 else ct
    return attention_per_sequence(lambda *qkv: _attention_dense(*qkv, scale, window_left, window_right, softcap, ct),
                                  q, k, v, cu_seqlens_q, cu_seqlens_k, lse_dtype)


def attention_per_sequence(dense, q, k, v, cu_seqlens_q, cu_seqlens_k, lse_dtype):
    """Varlen attention as `dense` (q, k, v of one sequence, batch 1 → out, lse) run on each packed sequence: out
    (Tq, Hq, D) and LSE (Hq, Tq) in lse_dtype, with tokens outside every sequence given output 0 and LSE −inf.
    Reads the offsets on the host."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    Tq, Hq = q.shape[0], q.shape[1]

    def outside(n):  # n query tokens outside every sequence
        return (q.new_zeros((n, *q.shape[1:])),
                torch.full((Hq, n), float("-inf"), dtype=lse_dtype, device=q.device))

    head, tail = outside(cq[0]), outside(Tq - cq[-1])
    outs, lses = [head[0]], [head[1]]
    for b in range(len(cq) - 1):
        o, lse = dense(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]])
        outs.append(o[0])
        lses.append(lse[0])
    outs.append(tail[0])
    lses.append(tail[1])
    return torch.cat(outs, 0), torch.cat(lses, 1)


def attention_window(causal, window):
    """The public (causal, window=(left, right)) pair, −1 (any negative) meaning unbounded as in flash-attn, in
    the bounded form: (window_left or None, window_right or None); causal bounds the right side at 0."""
    left, right = window
    left = None if left < 0 else int(left)
    right = None if right < 0 else int(right)
    if causal:
        right = 0
    return left, right


def attention(q, k, v, causal=False, scale=None, window=(-1, -1), softcap=0.0, cu_seqlens_q=None,
              cu_seqlens_k=None, return_lse=False):
    """The reference of fastlm.attention: same arguments, same conventions (see fastlm.ops.attention)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = attention_masked(q, k, v, scale, *attention_window(causal, window), softcap, cu_seqlens_q,
                                cu_seqlens_k)
    return (out, lse) if return_lse else out


def rotary_embedding(x, cos, sin, interleaved=False, heads_first=False):
    """Rotary position embedding over the first rot = cos.shape[-1] features of each head; the rest pass through.

    x (batch, seq, heads, head_dim), or (batch, heads, seq, head_dim) with heads_first; cos, sin (seq, rot) or
    (batch or 1, seq, rot) in Hugging Face's full-width form. With x_r = x[..., :rot]:
      out[..., :rot] = x_r · cos + rotate(x_r) · sin,
    rotate-half (interleaved False: Llama, Qwen, Mistral, Gemma): rotate(x_r) = cat(−x_r[rot/2:], x_r[:rot/2]);
    interleaved (GPT-J): rotate(x_r)[2i] = −x_r[2i+1], rotate(x_r)[2i+1] = x_r[2i].
    Computed in float32 (float64 for float64 x), rounded once to x's dtype; the pass-through features are copied."""
    ct = _compute_dtype(x)
    rot = cos.shape[-1]
    # Broadcast (seq, rot) or (batch, seq, rot) against x's layout: a unit heads dimension next to seq.
    c = cos.to(ct).unsqueeze(-3 if heads_first else -2)
    s = sin.to(ct).unsqueeze(-3 if heads_first else -2)
    xr = x[..., :rot].to(ct)
    if interleaved:
        rotated = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    out = (xr * c + rotated * s).to(x.dtype)
    return torch.cat((out, x[..., rot:]), dim=-1)


def swiglu(gate, up):
    """silu(gate) · up, computed in float32 (float64 for float64 inputs), rounded once to the inputs' dtype."""
    ct = _compute_dtype(gate)
    return (torch.nn.functional.silu(gate.to(ct)) * up.to(ct)).to(gate.dtype)


def geglu(gate, up, approximate="tanh"):
    """gelu(gate, approximate) · up ("tanh" or "none"), computed in float32 (float64 for float64 inputs), rounded
    once to the inputs' dtype."""
    ct = _compute_dtype(gate)
    return (torch.nn.functional.gelu(gate.to(ct), approximate=approximate) * up.to(ct)).to(gate.dtype)
