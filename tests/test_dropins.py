"""The drop-ins: fastlm.flash_attn (flash-attn 2's functions), fastlm.functional (torch.nn.functional's), and every
op and module on meta tensors.

Signatures are checked against the spec (flash-attn's, written out here; torch's, read with inspect). Where a
drop-in runs the same kernel as the fastlm op it wraps, outputs and gradients must be bitwise equal; against
torch's own functions, or where the drop-in reaches the kernel by another path (the KV cache's varlen), the
tolerance rule of DESIGN.md applies.
"""

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as TF

import fastlm
import fastlm.functional as FF
from fastlm import reference
from fastlm.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from conftest import BACKENDS, DEVICE, HAS_GPU, assert_by_rule, generator, simulated_runs

DTYPE = torch.float16 if HAS_GPU else torch.float32  # the interpreter's fp16 is slow; fp32 covers the wrappers
META_BACKENDS = ("auto", "torch", "triton", "cuda")  # meta tensors run nothing: every backend, no GPU needed


def _randn(*shape, seed=0, dtype=DTYPE, scale=1.0):
    return (scale * torch.randn(shape, generator=generator(seed))).to(DEVICE, dtype)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


# ---------------------------------------------------------------------------------------------- signatures

_EMPTY = inspect.Parameter.empty
FLASH_SPECS = {
    flash_attn_func: [
        ("q", _EMPTY), ("k", _EMPTY), ("v", _EMPTY), ("dropout_p", 0.0), ("softmax_scale", None), ("causal", False),
        ("window_size", (-1, -1)), ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False),
        ("return_attn_probs", False),
    ],
    flash_attn_varlen_func: [
        ("q", _EMPTY), ("k", _EMPTY), ("v", _EMPTY), ("cu_seqlens_q", _EMPTY), ("cu_seqlens_k", _EMPTY),
        ("max_seqlen_q", _EMPTY), ("max_seqlen_k", _EMPTY), ("dropout_p", 0.0), ("softmax_scale", None),
        ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0), ("alibi_slopes", None),
        ("deterministic", False), ("return_attn_probs", False), ("block_table", None),
    ],
    flash_attn_with_kvcache: [
        ("q", _EMPTY), ("k_cache", _EMPTY), ("v_cache", _EMPTY), ("k", None), ("v", None), ("rotary_cos", None),
        ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None), ("cache_leftpad", None),
        ("block_table", None), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
        ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
        ("return_softmax_lse", False),
    ],
}


def _params(fn):
    params = list(inspect.signature(fn).parameters.values())
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params), f"{fn.__name__}: every parameter positional"
    return [(p.name, p.default) for p in params]


@pytest.mark.parametrize("fn", list(FLASH_SPECS), ids=lambda f: f.__name__)
def test_flash_attn_signatures(fn):
    assert _params(fn) == FLASH_SPECS[fn]


@pytest.mark.parametrize("name", ("layer_norm", "rms_norm", "cross_entropy"))
def test_functional_signatures_are_torchs(name):
    assert _params(getattr(FF, name)) == _params(getattr(TF, name))


def test_functional_sdpa_signature():
    # torch's is a builtin without an inspectable signature: its documented one.
    assert _params(FF.scaled_dot_product_attention) == [
        ("query", _EMPTY), ("key", _EMPTY), ("value", _EMPTY), ("attn_mask", None), ("dropout_p", 0.0),
        ("is_causal", False), ("scale", None), ("enable_gqa", False)]


def test_exports():
    assert fastlm.flash_attn.flash_attn_func is flash_attn_func and fastlm.functional is FF
    assert {"flash_attn", "functional"} <= set(fastlm.__all__)
    assert set(FF.__all__) == {"cross_entropy", "layer_norm", "rms_norm", "scaled_dot_product_attention"}


# ---------------------------------------------------------------------------------------------- flash_attn_func


def _same_run(ours, theirs, tensors, grad_seed=9):
    """ours(*leaves) and theirs(*leaves) give the same output and the same gradients, bit for bit."""
    results = []
    for fn in (ours, theirs):
        leaves = _leaves(*tensors)
        out = fn(*leaves)
        g = torch.randn(out.shape, generator=generator(grad_seed)).to(out)
        (out * g).sum().backward()
        results.append((out.detach(), *(t.grad for t in leaves)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), f"{name} differs"


FLASH_OPTIONS = [
    dict(),
    dict(causal=True),
    dict(causal=True, window_size=(5, -1), softmax_scale=0.3),
    dict(window_size=(4, 3), softcap=8.0),
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("opts", FLASH_OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_flash_attn_func_is_fastlm_attention(opts, backend):
    q, k, v = _randn(2, 11, 4, 32), _randn(2, 15, 2, 32, seed=1), _randn(2, 15, 2, 32, seed=2)
    kw = dict(causal=opts.get("causal", False), scale=opts.get("softmax_scale"),
              window=opts.get("window_size", (-1, -1)), softcap=opts.get("softcap", 0.0))

    _same_run(lambda *t: flash_attn_func(*t, **opts), lambda *t: fastlm.attention(*t, **kw), (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS[-1:], indirect=True)
def test_flash_attn_func_positional_order(backend):
    """Positional arguments land where flash-attn puts them; a negative softcap is off, as in flash-attn."""
    q, k, v = _randn(1, 6, 2, 16), _randn(1, 9, 1, 16, seed=1), _randn(1, 9, 1, 16, seed=2)
    got = flash_attn_func(q, k, v, 0.0, 0.2, True, (3, 0), -1.0, None, True, False)
    want = fastlm.attention(q, k, v, scale=0.2, causal=True, window=(3, 0), softcap=0.0)
    assert torch.equal(got, want)
    cu = torch.tensor([0, 6], dtype=torch.int32, device=DEVICE)
    cuk = torch.tensor([0, 9], dtype=torch.int32, device=DEVICE)
    got = flash_attn_varlen_func(q[0], k[0], v[0], cu, cuk, 6, 9, 0.0, 0.2, True, (3, 0), 2.0, None, False, False,
                                 None)
    want = fastlm.attention(q[0], k[0], v[0], scale=0.2, causal=True, window=(3, 0), softcap=2.0, cu_seqlens_q=cu,
                            cu_seqlens_k=cuk, max_seqlen_q=6, max_seqlen_k=9)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_flash_attn_varlen_func_is_fastlm_attention(causal, backend):
    lens_q, lens_k = [3, 0, 9, 5], [7, 4, 9, 0]
    cu_q = torch.tensor([0, 3, 3, 12, 17], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 7, 11, 20, 20], dtype=torch.int32, device=DEVICE)
    q, k, v = _randn(17, 4, 32), _randn(20, 1, 32, seed=1), _randn(20, 1, 32, seed=2)
    var = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))

    _same_run(lambda *t: flash_attn_varlen_func(*t, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                softcap=4.0),
              lambda *t: fastlm.attention(*t, causal=causal, softcap=4.0, **var), (q, k, v))


def test_lse_layouts_are_flash_attns():
    """fastlm.attention's LSE, which the drop-ins return, in flash-attn's layouts: (batch, heads, seqlen_q) and
    (heads, total_q) for varlen."""
    q, k = _randn(2, 5, 3, 16), _randn(2, 7, 3, 16, seed=1)
    assert fastlm.attention(q, k, k, return_lse=True)[1].shape == (2, 3, 5)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    assert fastlm.attention(q.reshape(10, 3, 16), k[:, :5].reshape(10, 3, 16), k[:, :5].reshape(10, 3, 16),
                            cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=6, max_seqlen_k=6,
                            return_lse=True)[1].shape == (3, 10)


# ---------------------------------------------------------------------------------------------- not supported

_Q, _K = torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16)
_CU = torch.tensor([0, 4], dtype=torch.int32)
_TABLE = torch.zeros(1, 1, dtype=torch.int32)
_SEQLENS = torch.zeros(1, dtype=torch.int32)


@pytest.mark.parametrize("call,match", [
    (lambda: flash_attn_func(_Q, _K, _K, dropout_p=0.1), "dropout_p"),
    (lambda: flash_attn_func(_Q, _K, _K, alibi_slopes=torch.ones(2)), "alibi_slopes"),
    (lambda: flash_attn_func(_Q, _K, _K, return_attn_probs=True), "return_attn_probs"),
    (lambda: flash_attn_varlen_func(_Q[0], _K[0], _K[0], _CU, _CU, 4, 4, dropout_p=0.5), "dropout_p"),
    (lambda: flash_attn_varlen_func(_Q[0], _K[0], _K[0], _CU, _CU, 4, 4, alibi_slopes=torch.ones(2)), "alibi"),
    (lambda: flash_attn_varlen_func(_Q[0], _K[0], _K[0], _CU, _CU, 4, 4, return_attn_probs=True), "return_attn"),
    (lambda: flash_attn_varlen_func(_Q[0], _K[0], _K[0], _CU, _CU, 4, 4, block_table=_TABLE), "block_table"),
    (lambda: flash_attn_with_kvcache(_Q, _K, _K, cache_seqlens=_SEQLENS, cache_batch_idx=_SEQLENS),
     "cache_batch_idx"),
    (lambda: flash_attn_with_kvcache(_Q, _K, _K, cache_seqlens=_SEQLENS, cache_leftpad=_SEQLENS), "cache_leftpad"),
    (lambda: flash_attn_with_kvcache(_Q, _K, _K, cache_seqlens=_SEQLENS, block_table=_TABLE), "block_table"),
    (lambda: flash_attn_with_kvcache(_Q, _K, _K, alibi_slopes=torch.ones(2)), "alibi_slopes"),
], ids=["func-dropout", "func-alibi", "func-probs", "varlen-dropout", "varlen-alibi", "varlen-probs",
        "varlen-block-table", "kv-batch-idx", "kv-leftpad", "kv-block-table", "kv-alibi"])
def test_unsupported_arguments_say_so(call, match):
    with pytest.raises(NotImplementedError, match=match):
        call()


@pytest.mark.parametrize("call,error,match", [
    (lambda: flash_attn_with_kvcache(_Q, _K, _K, k=_K), ValueError, "together"),
    (lambda: flash_attn_with_kvcache(_Q, _K, _K, k=_K, v=_K), ValueError, "cache_seqlens is required"),
    (lambda: flash_attn_with_kvcache(_Q, _K, _K, k=_K[:, :2], v=_K[:, :2], cache_seqlens=3), ValueError,
     "does not fit"),
    (lambda: flash_attn_with_kvcache(_Q, _K, _K, cache_seqlens=torch.zeros(2, dtype=torch.int32)), ValueError,
     r"\(batch,\)"),
    (lambda: flash_attn_with_kvcache(_Q, _K, _K, cache_seqlens=torch.zeros(1)), TypeError, "int32"),
    (lambda: flash_attn_with_kvcache(_Q, _K, _K, cache_seqlens=1.0), TypeError, "cache_seqlens"),
    (lambda: flash_attn_with_kvcache(_Q, _K, _K[:, :, :1]), ValueError, "same shape"),
    (lambda: flash_attn_with_kvcache(_Q, torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16)), ValueError,
     "cache_batch_idx"),
    (lambda: flash_attn_with_kvcache(_Q, _K, _K, k=_K[:, :1, :1], v=_K[:, :1, :1], cache_seqlens=0), ValueError,
     "seqlen_new"),
    (lambda: flash_attn_with_kvcache(_Q, _K, _K, k=_K[:, :1].half(), v=_K[:, :1].half(), cache_seqlens=0),
     TypeError, "dtype"),
    (lambda: flash_attn_with_kvcache(_Q, _K, _K, rotary_cos=torch.ones(4, 8), rotary_sin=torch.ones(4, 8),
                                     cache_seqlens=0), ValueError, "k and v must be given"),
    (lambda: flash_attn_with_kvcache(_Q, _K, _K, _K[:, :1], _K[:, :1], torch.ones(4, 8), cache_seqlens=0),
     ValueError, "together"),
    (lambda: flash_attn_with_kvcache(_Q, _K, _K, _K[:, :1], _K[:, :1], torch.ones(4, 9), torch.ones(4, 9),
                                     cache_seqlens=0), ValueError, "rotary dim"),
], ids=["k-without-v", "k-without-seqlens", "int-overflow", "seqlens-shape", "seqlens-dtype", "seqlens-kind",
        "cache-shapes", "cache-batch", "k-shape", "k-dtype", "rotary-without-k", "rotary-cos-alone",
        "rotary-too-wide"])
def test_kvcache_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------- KV cache


def _cache(B, S, Hk, D, seed, layout="contiguous"):
    if layout == "heads-major":  # (B, H, S, D) storage, as transformers keeps it: the packed view is a copy
        return _randn(B, Hk, S, D, seed=seed).transpose(1, 2)
    return _randn(B, S, Hk, D, seed=seed)


def _check_kvcache(backend, *, seqlens, n, causal=True, window=(-1, -1), softcap=0.0, Sq=None, layout="contiguous",
                   B=3, S=24, Hq=4, Hk=2, D=32):
    """Append n new keys at `seqlens` (a list: the tensor form; an int; None), then compare the cache (new rows in
    place, all else untouched) and out/LSE (each row against attention over its filled keys)."""
    Sq = n if Sq is None else Sq
    k_cache, v_cache = _cache(B, S, Hk, D, 1, layout), _cache(B, S, Hk, D, 2, layout)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = _randn(B, Sq, Hq, D, seed=3)
    k, v = (_randn(B, n, Hk, D, seed=4), _randn(B, n, Hk, D, seed=5)) if n else (None, None)
    arg = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE) if isinstance(seqlens, list) else seqlens
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=arg, causal=causal,
                                       window_size=window, softcap=softcap, return_softmax_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    rows = seqlens if isinstance(seqlens, list) else [S - n if seqlens is None else seqlens] * B
    for b, start in enumerate(rows):
        end = start + n
        for name, cache, before, new in (("k", k_cache, before_k, k), ("v", v_cache, before_v, v)):
            if new is not None:
                assert torch.equal(cache[b, start:end], new[b]), f"row {b}: {name} not appended at {start}"
            untouched = torch.ones(S, dtype=torch.bool, device=DEVICE)
            untouched[start:end] = new is None
            assert torch.equal(cache[b, untouched], before[b, untouched]), f"row {b}: {name} cache overwritten"
        kb, vb = k_cache[b:b + 1, :end], v_cache[b:b + 1, :end]
        kw = dict(causal=causal, window=window, softcap=softcap)
        ref_out, ref_lse = reference.attention(*(t.double() for t in (q[b:b + 1], kb, vb)), return_lse=True, **kw)

        def theirs():
            return reference.attention_masked(q[b:b + 1], kb, vb, D ** -0.5,
                                              *reference.attention_window(causal, window), softcap, upcast=False)

        (base_out, base_lse), sims = theirs(), simulated_runs(theirs)
        if backend == "torch":  # the reference on both sides: bitwise equal
            dense_out, dense_lse = fastlm.attention(q[b:b + 1], kb, vb, return_lse=True, **kw)
            assert torch.equal(out[b:b + 1], dense_out) and torch.equal(lse[b:b + 1], dense_lse)
        assert_by_rule(f"row {b} out", out[b:b + 1], ref_out, base_out, samples=[s[0] for s in sims])
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse[b:b + 1]).cpu(), finite.cpu()), f"row {b}: −inf LSE rows differ"
        assert_by_rule(f"row {b} lse", torch.where(finite, lse[b:b + 1], 0), torch.where(finite, ref_lse, 0),
                       torch.where(finite, base_lse, 0), samples=[torch.where(finite, s[1], 0) for s in sims])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", [
    dict(seqlens=[0, 7, 20], n=3),  # per-row offsets, prefill of 3: empty, middle, up to the end of the cache
    dict(seqlens=[5, 0, 23], n=1),  # one-token decode
    dict(seqlens=[4, 9, 1], n=2, causal=False, window=(3, 1), softcap=5.0),
    dict(seqlens=[6, 2, 10], n=0, Sq=2),  # no append: attend over what is there
    dict(seqlens=[3, 11, 8], n=2, layout="heads-major"),  # a cache that is not packed-viewable: copied
    dict(seqlens=9, n=2),  # an int: every row alike
    dict(seqlens=None, n=0, Sq=3),  # None: the whole cache
], ids=["ragged-prefill", "decode", "window-softcap", "no-append", "heads-major", "int", "none"])
def test_kvcache(case, backend):
    _check_kvcache(backend, **case)


def _rope(x, cos, sin, positions, interleaved):
    """flash-attn's apply_rotary_emb (written out here, in float64) at per-token positions (batch, seq)."""
    rot = 2 * cos.shape[1]
    c, s = (t.double()[positions][:, :, None, :] for t in (cos, sin))
    xr = x[..., :rot].double()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, -1)
        out = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1)
    return torch.cat((out, x[..., rot:].double()), -1)


@pytest.mark.skipif(getattr(fastlm, "rotary_embedding", None) is None, reason="no fastlm.rotary_embedding here")
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("interleaved", (True, False), ids=("gptj", "neox"))
@pytest.mark.parametrize("causal", (True, False), ids=("causal", "full"))
def test_kvcache_rotary(causal, interleaved, backend):
    """rotary_cos/sin: the new keys rotated at cache_seqlens + i before they are written; q at those positions
    when causal, else all at cache_seqlens (flash-attn's rule); partial rotary (rotary_dim 16 of head_dim 32)."""
    B, S, H, Hk, D, n = 3, 20, 4, 2, 32, 2
    k_cache, v_cache = _randn(B, S, Hk, D, seed=1), _randn(B, S, Hk, D, seed=2)
    q, k, v = _randn(B, n, H, D, seed=3), _randn(B, n, Hk, D, seed=4), _randn(B, n, Hk, D, seed=5)
    angles = torch.arange(S, dtype=torch.float32)[:, None] * (0.3 ** torch.arange(8, dtype=torch.float32))
    cos, sin = angles.cos().to(DEVICE, DTYPE), angles.sin().to(DEVICE, DTYPE)
    seqlens = [0, 7, 18]
    arg = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    before_k = k_cache.clone()
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, arg, causal=causal,
                                  rotary_interleaved=interleaved)
    start = arg.long()[:, None]
    k_pos = start + torch.arange(n, device=DEVICE)
    q_pos = k_pos if causal else start.expand(B, n)
    k_rot, q_rot = _rope(k, cos, sin, k_pos, interleaved), _rope(q, cos, sin, q_pos, interleaved)
    tol = dict(rtol=1e-5, atol=1e-5) if DTYPE == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for b, s0 in enumerate(seqlens):
        torch.testing.assert_close(k_cache[b, s0:s0 + n].double(), k_rot[b], **tol)  # rotated, then written
        torch.testing.assert_close(v_cache[b, s0:s0 + n], v[b], rtol=0, atol=0)  # values never rotate
        assert torch.equal(k_cache[b, :s0], before_k[b, :s0])
        keys = torch.cat((before_k[b:b + 1, :s0].double(), k_rot[b:b + 1]), 1)
        want = reference.attention(q_rot[b:b + 1], keys, v_cache[b:b + 1, :s0 + n].double(), causal=causal)
        torch.testing.assert_close(out[b:b + 1].double(), want, **tol)


def test_kvcache_offsets(monkeypatch):
    """A tensor cache_seqlens reaches fastlm.attention's varlen path: each cache row's filled part a sequence, its
    unused tail a sequence with no queries, the maxima the query length and the cache size."""
    seen = {}
    real = fastlm.flash_attn._attention

    def spy(q, k, v, **kw):
        seen.update(kw, k_shape=tuple(k.shape))
        return real(q, k, v, **kw)

    monkeypatch.setattr(fastlm.flash_attn, "_attention", spy)
    q, kc = _randn(2, 1, 2, 16), _randn(2, 10, 2, 16, seed=1)
    seqlens = torch.tensor([3, 8], dtype=torch.int32, device=DEVICE)
    with fastlm.use_backend("torch"):
        flash_attn_with_kvcache(q, kc, kc.clone(), _randn(2, 1, 2, 16), _randn(2, 1, 2, 16), cache_seqlens=seqlens,
                                causal=True)
    assert seen["cu_seqlens_k"].tolist() == [0, 4, 10, 19, 20] and seen["cu_seqlens_k"].dtype == torch.int32
    assert seen["cu_seqlens_q"].tolist() == [0, 1, 1, 2, 2] and seen["cu_seqlens_q"].dtype == torch.int32
    assert (seen["max_seqlen_q"], seen["max_seqlen_k"], seen["k_shape"]) == (1, 10, (20, 2, 16))


@pytest.mark.parametrize("backend", META_BACKENDS)
def test_kvcache_on_meta_reads_nothing_on_the_host(backend):
    """On meta tensors nothing can be read on the host (.item(), .tolist(), int() raise): the append and the offsets
    are device work only, under every backend."""
    q, k = torch.empty(3, 2, 4, 16, device="meta"), torch.empty(3, 2, 2, 16, device="meta")
    caches = torch.empty(3, 20, 2, 16, device="meta"), torch.empty(3, 20, 2, 16, device="meta")
    seqlens = torch.empty(3, dtype=torch.int32, device="meta")
    with fastlm.use_backend(backend):
        out, lse = flash_attn_with_kvcache(q, *caches, k, k, cache_seqlens=seqlens, causal=True,
                                           return_softmax_lse=True)
    assert out.shape == q.shape and lse.shape == (3, 4, 2) and lse.dtype == torch.float32


@pytest.mark.gpu
def test_gpu_kvcache_never_syncs():
    q, k = _randn(4, 1, 8, 64), _randn(4, 1, 2, 64, seed=1)
    caches = _randn(4, 256, 2, 64, seed=2), _randn(4, 256, 2, 64, seed=3)
    seqlens = torch.tensor([0, 17, 100, 255], dtype=torch.int32, device="cuda")
    flash_attn_with_kvcache(q, *caches, k, k, cache_seqlens=seqlens, causal=True)  # warm-up: compile, autotune
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flash_attn_with_kvcache(q, *caches, k, k, cache_seqlens=seqlens, causal=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------------- fastlm.functional


def _norm_run(fn, tensors, dy):
    leaves = _leaves(*tensors)
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("shape,normalized", [((3, 5, 16), (16,)), ((2, 3, 4, 8), (4, 8)), ((6, 2, 3, 4), (2, 3, 4))],
                         ids=["1-dim", "2-dims", "3-dims"])
@pytest.mark.parametrize("op", ("layer_norm", "rms_norm"))
def test_functional_norms(op, shape, normalized, backend):
    """Bitwise fastlm.layer_norm/rms_norm over the flattened trailing dims (gradients in the parameters' shapes),
    and torch's F by the rule (float64 torch as the reference)."""
    x = _randn(*shape, scale=2.0)
    params = [1 + 0.3 * _randn(*normalized, seed=1), 0.3 * _randn(*normalized, seed=2)]
    lead = shape[:len(shape) - len(normalized)]
    dy = _randn(*shape, seed=3)
    if op == "layer_norm":
        ours = lambda x_, w_, b_: FF.layer_norm(x_, normalized, w_, b_, 1e-4)  # noqa: E731
        direct = lambda x_, w_, b_: fastlm.layer_norm(x_.reshape(*lead, -1), w_.reshape(-1), b_.reshape(-1),  # noqa
                                                      1e-4).reshape(shape)
        theirs = lambda x_, w_, b_: TF.layer_norm(x_, normalized, w_, b_, 1e-4)  # noqa: E731
    else:
        eps = torch.finfo(x.dtype).eps  # F.rms_norm's eps=None, pinned for the float64 reference
        params = params[:1]
        ours = lambda x_, w_: FF.rms_norm(x_, list(normalized), w_)  # noqa: E731
        direct = lambda x_, w_: fastlm.rms_norm(x_.reshape(*lead, -1), w_.reshape(-1), eps).reshape(shape)  # noqa
        theirs = lambda x_, w_: TF.rms_norm(x_, list(normalized), w_, eps)  # noqa: E731
    got = _norm_run(ours, (x, *params), dy)
    same = _norm_run(direct, (x, *params), dy)
    exact = _norm_run(theirs, [t.double() for t in (x, *params)], dy)
    base = _norm_run(theirs, (x, *params), dy)
    sims = simulated_runs(lambda: _norm_run(theirs, (x, *params), dy))  # PyTorch's error, sampled (conftest)
    names = ("y", "dx", "dweight", "dbias")
    for name, a, c in zip(names, got, same):
        assert torch.equal(a, c), f"{name} differs from fastlm's own op"
    for i, (name, a, r, t) in enumerate(zip(names, got, exact, base)):
        assert a.shape == r.shape, name
        assert_by_rule(name, a, r, t, factor=2.0 if name == "y" else 3.0, samples=[s[i] for s in sims])


@pytest.mark.parametrize("backend", BACKENDS[-1:], indirect=True)
def test_functional_norms_strided_input(backend):
    """A multi-dim normalized_shape over a non-contiguous input: reshaped by copy, same answer."""
    x = _randn(4, 8, 6, 5).transpose(1, 3)  # (4, 5, 6, 8), trailing dims not viewable as one
    w = _randn(6, 8, seed=1)
    assert torch.equal(FF.layer_norm(x, (6, 8), w), FF.layer_norm(x.contiguous(), (6, 8), w))
    assert torch.equal(FF.rms_norm(x, (6, 8), w, 1e-5), fastlm.rms_norm(x.reshape(4, 5, 48), w.reshape(-1), 1e-5
                                                                        ).reshape(4, 5, 6, 8))


def test_functional_norm_bad_input():
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="normalized_shape"):
        FF.layer_norm(x, (3, 5))
    with pytest.raises(ValueError, match="weight must have shape"):
        FF.rms_norm(x, (3, 4), torch.ones(12))
    with pytest.raises(TypeError, match="normalized_shape"):
        FF.layer_norm(x, ())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("layout", ("unbatched", "batched", "spatial"))
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_functional_cross_entropy(layout, reduction, backend):
    """torch's layouts, classes in dim 1: bitwise fastlm.cross_entropy on the classes-last logits, and torch's
    F.cross_entropy by the rule (its loss taken in float32: fastlm's is float32)."""
    C = 37
    shape = {"unbatched": (C,), "batched": (6, C), "spatial": (2, C, 3, 4)}[layout]
    x = _randn(*shape, scale=3.0)
    tshape = () if layout == "unbatched" else (shape[0], *shape[2:])
    t = torch.randint(0, C, tshape, generator=generator(1)).to(DEVICE)
    if t.dim():
        t.view(-1)[::3] = 5  # some rows ignored
    w = torch.rand(C, generator=generator(2)).to(DEVICE) + 0.5
    kw = dict(weight=w, ignore_index=5, reduction=reduction, label_smoothing=0.1)
    gen = generator(3)
    go = torch.randn(tshape, generator=gen).to(DEVICE) if reduction == "none" else torch.tensor(1.3, device=DEVICE)

    def run(fn, xin, wt):
        leaf = xin.detach().clone().requires_grad_()
        if fn is None:
            loss = fastlm.cross_entropy(leaf.movedim(1, -1) if leaf.dim() > 2 else leaf, t, **kw)
        else:
            loss = fn(leaf, t, **dict(kw, weight=wt))
        loss.backward(go.to(loss.dtype))
        return [loss.detach(), leaf.grad]

    def theirs():  # torch's loss in float32 (fastlm's is float32), its gradient in the logits' dtype
        return [run(TF.cross_entropy, x.float(), w)[0], run(TF.cross_entropy, x, w.to(x.dtype))[1]]

    loss, dx = run(FF.cross_entropy, x, w)
    same_loss, same_dx = run(None, x, w)
    exact, exact_dx = run(TF.cross_entropy, x.double(), w.double())
    base, sims = theirs(), simulated_runs(theirs)
    assert loss.dtype == torch.float32 and loss.shape == exact.shape
    assert torch.equal(loss, same_loss) and torch.equal(dx, same_dx)
    assert_by_rule("loss", loss, exact, base[0], samples=[s[0] for s in sims])
    assert_by_rule("dx", dx, exact_dx, base[1], samples=[s[1] for s in sims])


def test_functional_cross_entropy_legacy_reduction_arguments():
    x, t = _randn(5, 7), torch.randint(0, 7, (5,), generator=generator(1)).to(DEVICE)
    for size_average, reduce, reduction in ((None, False, "none"), (False, None, "sum"), (True, True, "mean")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation warning, as torch gives it
            got = FF.cross_entropy(x, t, size_average=size_average, reduce=reduce)
        assert torch.equal(got, fastlm.cross_entropy(x, t, reduction=reduction))


def test_functional_cross_entropy_class_probabilities_fall_back_to_torch():
    x = _randn(4, 6)
    p = torch.softmax(_randn(4, 6, seed=1), -1)
    with pytest.warns(UserWarning, match="class-probability"):
        got = FF.cross_entropy(x, p, label_smoothing=0.1)
    assert torch.equal(got, TF.cross_entropy(x, p, label_smoothing=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        FF.cross_entropy(x, p)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_functional_sdpa_is_fastlm_sdpa(backend):
    q, k, v = _randn(2, 4, 9, 16), _randn(2, 2, 13, 16, seed=1), _randn(2, 2, 13, 16, seed=2)
    kw = dict(is_causal=True, scale=0.25, enable_gqa=True)
    _same_run(lambda *t: FF.scaled_dot_product_attention(*t, **kw),
              lambda *t: fastlm.scaled_dot_product_attention(*t, **kw), (q, k, v))
    assert torch.equal(FF.scaled_dot_product_attention(q, k, v, None, 0.0, False, None, True),
                       fastlm.scaled_dot_product_attention(q, k, v, enable_gqa=True))


# ---------------------------------------------------------------------------------------------- meta tensors
#
# Nothing runs on meta tensors: every op gives the shapes and dtypes it gives on a real device, under every backend
# (named kernel backends included), and autograd through them works, so models initialize on meta (FSDP).


def _on(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def _meta_cases():
    x, w, t = torch.randn(3, 5, 8), torch.randn(8), torch.randint(0, 8, (3, 5))
    W = torch.randn(11, 8)
    q, k = torch.randn(2, 6, 4, 16), torch.randn(2, 9, 2, 16)
    cu_q = torch.tensor([0, 4, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 9], dtype=torch.int32)
    return {
        "layer_norm": ((x, w, w), lambda x_, w_, b_: fastlm.layer_norm(x_, w_, b_)),
        "rms_norm+residual": ((x, w, x), lambda x_, w_, r_: fastlm.rms_norm(x_, w_, residual=r_, offset=1.0)),
        "cross_entropy": ((x, t), lambda x_, t_: fastlm.cross_entropy(x_, t_, label_smoothing=0.1)),
        "cross_entropy-none": ((x, t), lambda x_, t_: fastlm.cross_entropy(x_, t_, reduction="none")),
        "linear_cross_entropy": ((x, W, t), lambda x_, W_, t_: fastlm.linear_cross_entropy(x_, W_, t_)),
        "linear_cross_entropy-none": ((x, W, t, W[:, 0]), lambda x_, W_, t_, b_: fastlm.linear_cross_entropy(
            x_, W_, t_, b_, reduction="none")),
        "attention": ((q, k, k), lambda q_, k_, v_: fastlm.attention(q_, k_, v_, causal=True, return_lse=True)),
        "attention-varlen": ((q[0], k[0], k[0], cu_q, cu_k), lambda q_, k_, v_, cq, ck: fastlm.attention(
            q_, k_, v_, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=4, max_seqlen_k=5, return_lse=True)),
        "sdpa": ((q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2)), lambda q_, k_, v_:
                 fastlm.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)),
        "flash_attn_func": ((q, k, k), lambda q_, k_, v_: flash_attn_func(q_, k_, v_, causal=True)),
        "functional.layer_norm": ((x, w.repeat(5).reshape(5, 8)), lambda x_, w_: FF.layer_norm(x_, (5, 8), w_)),
        "functional.cross_entropy": ((x.transpose(1, 2), t), lambda x_, t_: FF.cross_entropy(x_, t_)),
    }


def _flat_outputs(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("backend", META_BACKENDS)
@pytest.mark.parametrize("case", list(_meta_cases()))
def test_meta_tensors(case, backend):
    args, fn = _meta_cases()[case]
    with fastlm.use_backend("torch"):
        real = _flat_outputs(fn(*args))
    meta_args = [a.to("meta") for a in args]
    leaves = [a.requires_grad_() if a.is_floating_point() else a for a in meta_args]
    with fastlm.use_backend(backend):
        out = _flat_outputs(fn(*leaves))
        for o, r in zip(out, real, strict=True):
            assert o.device.type == "meta" and o.shape == r.shape and o.dtype == r.dtype, (o, r)
        loss = sum(o.float().sum() for o in out if o.requires_grad)
        loss.backward()
    for a, m in zip(args, leaves):
        if m.is_floating_point():
            assert m.grad is not None and m.grad.shape == a.shape and m.grad.device.type == "meta"


@pytest.mark.parametrize("backend", META_BACKENDS)
def test_meta_modules(backend):
    """fastlm.nn's modules built with device="meta", called, and differentiated; then materialized with
    to_empty and reset_parameters, as FSDP does."""
    x = torch.randn(2, 3, 16, device="meta", requires_grad=True)
    t = torch.zeros(2, 3, dtype=torch.long, device="meta")
    modules = [fastlm.nn.LayerNorm(16, device="meta"), fastlm.nn.RMSNorm(16, device="meta", offset=1.0),
               fastlm.nn.LayerNorm((3, 16), device="meta")]
    with fastlm.use_backend(backend):
        for m in modules:
            y = m(x)
            assert y.shape == x.shape and y.device.type == "meta"
            y.sum().backward()
        y, r = modules[1](x, residual=x)
        assert y.shape == r.shape == x.shape
        loss = fastlm.nn.CrossEntropyLoss(weight=torch.ones(16, device="meta"), label_smoothing=0.1)(x.movedim(2, 1),
                                                                                                  t)
        assert loss.shape == () and loss.device.type == "meta"
        head = fastlm.nn.LinearCrossEntropyLoss(16, 50, bias=True, device="meta", reduction="none")
        loss = head(x, t)
        assert loss.shape == (2, 3) and loss.device.type == "meta"
        loss.sum().backward()
        assert head.weight.grad.shape == (50, 16) and head.bias.grad.shape == (50,)
        assert head.logits(x).shape == (2, 3, 50)
    for m in modules:
        m.to_empty(device="cpu")
        m.reset_parameters()
        assert all(p.device.type == "cpu" for p in m.parameters())
        assert torch.equal(m.weight, torch.ones_like(m.weight))  # torch's init
