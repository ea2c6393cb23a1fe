"""`fastlm.flash_attn`: drop-ins for flash-attn 2's functions, with their names, positional order and defaults.

    from fastlm.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    # in place of: from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

The module is named after the package it stands in for, so swapping the import is the whole change. Every call
runs fastlm.attention on the current backend, with flash-attn's conventions (fastlm's own): layout
(batch, seqlen, heads, head_dim) or packed (total, heads, head_dim) with int32 cu_seqlens; causal aligned
bottom-right; window_size=(left, right) with −1 unbounded; softcap > 0 caps the scores (≤ 0 turns it off, as in
flash-attn); GQA/MQA; the LSE (batch, heads, seqlen_q), or (heads, total_q) for varlen, natural log, float32.
flash_attn_func and flash_attn_varlen_func are differentiable; flash_attn_with_kvcache is not (nor is
flash-attn's). fastlm also takes float32 (flash-attn: float16 and bfloat16) and head dims 1 to 256.

Not supported, each raising NotImplementedError saying so: dropout_p > 0, alibi_slopes, return_attn_probs=True
(flash-attn then returns (out, softmax_lse, S_dmask); fastlm has no S_dmask to give: use fastlm.attention(...,
return_lse=True) for the LSE), block_table (paged caches), and for the KV cache cache_batch_idx and cache_leftpad.
The KV cache's rotary_cos/rotary_sin run on fastlm.rotary_embedding (where this installation has it).
`deterministic` is passed on (True: a bitwise repeatable backward, without the atomic dQ); `num_splits` is accepted
and ignored (a performance hint).
"""

import numbers

import torch

import fastlm
from fastlm.ops.attention import attention as _attention

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]


def _refuse(fn, **given):
    for name, value in given.items():
        if name == "dropout_p":
            if value != 0.0:
                raise NotImplementedError(f"{fn}: dropout_p > 0 (attention dropout) is not supported by fastlm; "
                                          f"got {value} (pass 0.0, as for evaluation)")
        elif name == "return_attn_probs":
            if value:
                raise NotImplementedError(
                    f"{fn}: return_attn_probs=True (flash-attn's (out, softmax_lse, S_dmask)) is not supported by "
                    "fastlm: it has no attention probabilities to return; fastlm.attention(..., return_lse=True) "
                    "gives the LSE")
        elif value is not None:
            raise NotImplementedError(f"{fn}: {name} is not supported by fastlm (pass None)")


def _softcap(softcap):
    # flash-attn turns the softcap off for any value ≤ 0; fastlm.attention takes 0 for off and refuses negatives.
    if isinstance(softcap, numbers.Real) and not isinstance(softcap, bool) and softcap < 0:
        return 0.0
    return softcap


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn.flash_attn_func: q (batch, seqlen_q, heads, head_dim), k, v (batch, seqlen_k, kv_heads,
    head_dim) → out (q's shape and dtype). See the module's docstring for what is not supported."""
    _refuse("flash_attn_func", dropout_p=dropout_p, alibi_slopes=alibi_slopes, return_attn_probs=return_attn_probs)
    return _attention(q, k, v, causal=causal, scale=softmax_scale, window=window_size, softcap=_softcap(softcap),
                      deterministic=deterministic)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn.flash_attn_varlen_func: packed q (total_q, heads, head_dim), k, v (total_k, kv_heads, head_dim),
    int32 offsets cu_seqlens_q/k (batch + 1,) and host-int maxima → out (q's shape and dtype)."""
    _refuse("flash_attn_varlen_func", dropout_p=dropout_p, alibi_slopes=alibi_slopes,
            return_attn_probs=return_attn_probs, block_table=block_table)
    return _attention(q, k, v, causal=causal, scale=softmax_scale, window=window_size, softcap=_softcap(softcap),
                      cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                      max_seqlen_k=max_seqlen_k, deterministic=deterministic)


def _check_cache(q, k_cache, v_cache, k, v, cache_seqlens):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, heads, head_dim), got shape {tuple(t.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"k_cache must have q's batch size ({q.shape[0]}), got {k_cache.shape[0]} (a cache with "
                         "other rows would need cache_batch_idx, which is not supported)")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values to append) or both be None")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[0] != q.shape[0] or t.shape[2:] != k_cache.shape[2:]:
                raise ValueError(f"{name} must be (batch, seqlen_new, kv_heads, head_dim) = (q's batch, any, "
                                 f"k_cache's heads and head_dim), got {tuple(t.shape)}")
            if t.dtype != k_cache.dtype:
                raise TypeError(f"{name} must have k_cache's dtype ({k_cache.dtype}), got {t.dtype}")
            if t.device != k_cache.device:
                raise ValueError(f"{name} is on {t.device} but k_cache is on {k_cache.device}")
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required with k and v: it says where in the cache they go")
    if cache_seqlens is None:
        return
    seqlen_new = k.shape[1] if k is not None else 0
    if isinstance(cache_seqlens, torch.Tensor):
        if cache_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cache_seqlens must be an int or an int32 (or int64) tensor, got {cache_seqlens.dtype}")
        if tuple(cache_seqlens.shape) != (q.shape[0],):
            raise ValueError(f"cache_seqlens must have shape (batch,) = ({q.shape[0]},), got "
                             f"{tuple(cache_seqlens.shape)}")
        if cache_seqlens.device != k_cache.device:
            raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but k_cache is on {k_cache.device}")
        if k_cache.shape[0] * k_cache.shape[1] >= 2**31:
            raise ValueError(f"a cache of {k_cache.shape[0]} × {k_cache.shape[1]} positions needs 64-bit offsets; "
                             "the varlen offsets are int32")
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= k_cache.shape[1] - seqlen_new:
            raise ValueError(f"cache_seqlens={cache_seqlens} with {seqlen_new} new keys does not fit a cache of "
                             f"{k_cache.shape[1]} positions")
    else:
        raise TypeError(f"cache_seqlens must be an int, a (batch,) int32 tensor or None, got "
                        f"{type(cache_seqlens).__name__}")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash_attn.flash_attn_with_kvcache: incremental decoding over a preallocated cache.

    q (batch, seqlen_q, heads, head_dim); k_cache, v_cache (batch, seqlen_cache, kv_heads, head_dim); k, v
    (batch, seqlen_new, kv_heads, head_dim) or None; cache_seqlens an int, a (batch,) int32 tensor of per-row
    lengths, or None (every row holds seqlen_cache keys; k and v must then be None). rotary_cos, rotary_sin
    (seqlen_ro, rotary_dim / 2): the new keys are rotated at their positions before they are written, and q at
    the same positions (causal or local) or at cache_seqlens (otherwise), as flash-attn does; rotary_interleaved
    picks GPT-J pairs (True, flash-attn's default) or rotate-half (False).
    With k and v, they are written into the caches in place at positions cache_seqlens … cache_seqlens +
    seqlen_new − 1 of each row (a scatter on the device; the caller keeps them inside the cache, as flash-attn
    requires: out of range is an indexing error). Then each row's q attends over that row's first
    cache_seqlens + seqlen_new keys, causal aligned bottom-right (the last query sees the last key).
    Returns out (q's shape and dtype), and (out, softmax_lse (batch, heads, seqlen_q) float32) with
    return_softmax_lse. Runs without autograd (flash-attn's has no backward either); nothing reads cache_seqlens
    on the host (the torch backend's reference does, reading the offsets: it is not a kernel).

    How per-row lengths reach the kernels: fastlm.attention has no per-row key length for a dense batch, so a
    tensor cache_seqlens goes through its varlen path. Packed offsets cannot skip the unused tail of each cache row,
    so that tail becomes a sequence of its own with no queries: cu_seqlens_k = [0, L_0, S, S + L_1, 2S, …, B·S] and
    cu_seqlens_q = [0, Sq, Sq, 2Sq, 2Sq, …, B·Sq] (built on the device), max_seqlen_k = S, the cache size. The
    packed keys are a view of the cache when its rows are evenly spaced (a (batch, seqlen_cache, …) cache whose
    batch stride is seqlen_cache times its sequence stride, such as a contiguous one); any other layout is copied
    first, each call. An int cache_seqlens (every row alike) attends over the cache's first rows directly.
    """
    _refuse("flash_attn_with_kvcache", cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
            block_table=block_table, alibi_slopes=alibi_slopes)
    _check_cache(q, k_cache, v_cache, k, v, cache_seqlens)
    rotary = _check_rotary(q, k, rotary_cos, rotary_sin)
    with torch.no_grad():
        if rotary:
            q, k = _apply_rotary(q, k, rotary_cos, rotary_sin, cache_seqlens, causal or tuple(window_size) != (-1, -1),
                                 rotary_interleaved)
        return _with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, softcap,
                             return_softmax_lse)


def _check_rotary(q, k, rotary_cos, rotary_sin):
    if rotary_cos is None and rotary_sin is None:
        return False
    if getattr(fastlm, "rotary_embedding", None) is None:
        raise NotImplementedError("flash_attn_with_kvcache: rotary_cos/rotary_sin need fastlm.rotary_embedding, which "
                                  "this installation lacks")
    if rotary_cos is None or rotary_sin is None:
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if k is None:
        raise ValueError("rotary_cos/rotary_sin rotate the new keys: k and v must be given with them (as flash-attn)")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (seqlen_ro, rotary_dim / 2)")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if rotary_cos.shape != rotary_sin.shape:
        raise ValueError(f"rotary_cos and rotary_sin must have the same shape, got {tuple(rotary_cos.shape)} and "
                         f"{tuple(rotary_sin.shape)}")
    if 2 * rotary_cos.shape[1] > q.shape[-1]:
        raise ValueError(f"the rotary dim (2 × {rotary_cos.shape[1]}) must be ≤ head_dim ({q.shape[-1]})")
    return True


def _apply_rotary(q, k, cos_table, sin_table, cache_seqlens, positional_q, interleaved):
    """flash-attn's rotary for the KV cache: the new keys at positions cache_seqlens, cache_seqlens + 1, …; the
    queries likewise when causal or local, else all at position cache_seqlens. The tables' rows are gathered on
    the device (positions ≥ seqlen_ro are an indexing error) and widened to fastlm.rotary_embedding's full-width
    form: each frequency repeated per pair (interleaved, GPT-J) or the halves concatenated (rotate-half, NeoX)."""
    B = q.shape[0]
    start = (cache_seqlens.long() if isinstance(cache_seqlens, torch.Tensor)
             else torch.full((B,), cache_seqlens, dtype=torch.long, device=q.device))[:, None]

    def rotate(x, positions):
        c, s = cos_table[positions], sin_table[positions]  # (batch, seq, rotary_dim / 2)
        if interleaved:
            c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        else:
            c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
        return fastlm.rotary_embedding(x, c, s, interleaved=bool(interleaved))

    k = rotate(k, start + torch.arange(k.shape[1], device=q.device))
    q_pos = start + torch.arange(q.shape[1], device=q.device) if positional_q else start.expand(B, q.shape[1])
    return rotate(q, q_pos), k


def _with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, softcap,
                  return_softmax_lse):
    opts = dict(causal=causal, scale=softmax_scale, window=window_size, softcap=_softcap(softcap), return_lse=True)
    B, Sq, Hq, D = q.shape
    S = k_cache.shape[1]
    n = k.shape[1] if k is not None else 0
    if cache_seqlens is None:
        out, lse = _attention(q, k_cache, v_cache, **opts)
    elif isinstance(cache_seqlens, int):
        end = cache_seqlens + n
        if k is not None:
            k_cache[:, cache_seqlens:end] = k
            v_cache[:, cache_seqlens:end] = v
        out, lse = _attention(q, k_cache[:, :end], v_cache[:, :end], **opts)
    else:
        device = k_cache.device
        if k is not None:
            rows = torch.arange(B, device=device)[:, None]
            pos = cache_seqlens.long()[:, None] + torch.arange(n, device=device)
            k_cache.index_put_((rows, pos), k)
            v_cache.index_put_((rows, pos), v)
        starts = torch.arange(B, device=device, dtype=torch.int32) * S
        ends = starts + cache_seqlens.to(torch.int32) + n
        cu_k = torch.cat((torch.stack((starts, ends), 1).reshape(-1), starts.new_full((1,), B * S)))
        cu_q = (torch.arange(2 * B + 1, device=device, dtype=torch.int32) + 1) // 2 * Sq
        Hk = k_cache.shape[2]
        out, lse = _attention(q.reshape(B * Sq, Hq, D), k_cache.reshape(B * S, Hk, D),
                              v_cache.reshape(B * S, Hk, D), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=Sq,
                              max_seqlen_k=S, **opts)
        out = out.reshape(B, Sq, Hq, D)
        lse = lse.reshape(Hq, B, Sq).permute(1, 0, 2).contiguous()
    return (out, lse) if return_softmax_lse else out
