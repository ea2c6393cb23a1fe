"""fastlm.attention and fastlm.scaled_dot_product_attention against the float64 reference, by DESIGN.md's rule (factor
2 on the output and LSE, 3 on dQ, dK, dV); PyTorch's own precision is the reference computed in the tested dtype.

On CPU the Triton kernels run through the interpreter in fp32 and fp16 (its bf16 dot is broken) at small sizes;
the GPU cases add bf16 and the longer sequences, head dims and GQA ratios of the issue.
"""

import functools
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fastlm
from fastlm import reference
from fastlm.kernels import attention as triton_attention
from tests.conftest import (BACKENDS, DEVICE, HAS_GPU, assert_by_rule, attention_flash_form, flash_form_samples,
                            generator, sdpa_flash_form, simulated_runs)

CPU_DTYPES = (torch.float32, torch.float16)
GPU_DTYPES = (torch.bfloat16, torch.float16)

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, window, softcap)
CPU_CASES = [
    (2, 17, 17, 2, 2, 32, False, (-1, -1), 0.0),
    (1, 70, 100, 4, 1, 64, True, (-1, -1), 0.0),  # MQA, seqlen_q < seqlen_k
    (1, 64, 40, 8, 1, 80, True, (-1, -1), 0.0),  # GQA 8, seqlen_q > seqlen_k: the first 24 queries see nothing
    (2, 1, 97, 2, 2, 96, True, (-1, -1), 0.0),  # one query over a longer cache (decode)
    (1, 64, 64, 2, 2, 256, False, (-1, -1), 0.0),
    (1, 80, 80, 2, 1, 128, False, (16, 8), 10.0),  # window both sides and softcap
    (1, 65, 65, 2, 2, 16, True, (8, -1), 0.0),  # causal sliding window
    (1, 33, 47, 2, 2, 112, False, (-1, -1), 5.0),
]
HEADS = ((2, 8, 8), (1, 8, 2), (1, 16, 2))  # (batch, heads, kv_heads): GQA ratios 1, 4, 8
MASKS = ((False, (-1, -1), 0.0), (True, (-1, -1), 0.0), (True, (64, -1), 30.0))
SEQLENS = ((1, 1024), (17, 17), (97, 255), (128, 128), (255, 97), (1024, 1024))
# Every head dim meets every seqlen pair once, the GQA ratio and the mask rotating: 36 cases.
GPU_CASES = [
    (HEADS[(i + j) % 3][0], sq, sk, *HEADS[(i + j) % 3][1:], d, *MASKS[(i + 2 * j) % 3])
    for i, d in enumerate((32, 64, 80, 96, 128, 256))
    for j, (sq, sk) in enumerate(SEQLENS)
]


def _inputs(shape_q, shape_k, dtype, seed=0):
    gen = generator(seed)  # seed: this draw's offset under FASTLM_TEST_SEED
    q = torch.randn(shape_q, generator=gen).to(DEVICE, dtype)
    k = torch.randn(shape_k, generator=gen).to(DEVICE, dtype)
    v = torch.randn(shape_k, generator=gen).to(DEVICE, dtype)
    return q, k, v


def _grads(fn, tensors, out_grad, lse_grad=None):
    """Run fn on leaf copies of `tensors`: (out, lse, *grads) for the loss Σ out·g (+ Σ lse·gl)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out, lse = fn(*leaves)
    loss = (out.to(out_grad.dtype) * out_grad).sum()
    if lse_grad is not None:
        finite = torch.isfinite(lse)
        loss = loss + (torch.where(finite, lse, 0).to(lse_grad.dtype) * lse_grad).sum()
    loss.backward()
    return (out.detach(), lse.detach(), *(t.grad for t in leaves))


def _check_all(got, ref, base, label, sims=()):
    """`sims`: the baseline's runs under simulated rounding (conftest.simulated_runs), PyTorch's error sampled."""
    names = ("out", "lse", "dq", "dk", "dv")
    for i, (name, g, r, b) in enumerate(zip(names, got, ref, base)):
        samples = [s[i] for s in sims]
        if name == "lse":
            # −inf where a query sees nothing: the same rows in all three, compared on the finite ones.
            empty_rows = torch.isneginf(r.cpu())
            assert torch.equal(torch.isneginf(g.cpu()), empty_rows), f"{label}: lse −inf rows differ"
            g, b, *samples = (torch.where(empty_rows, 0.0, t.cpu().float()) for t in (g, b, *samples))
            r = torch.where(empty_rows, 0.0, r.cpu())
        assert torch.isfinite(g).all(), f"{label}: {name} has non-finite values"
        assert_by_rule(f"{label} {name}", g, r, b, factor=3.0 if name.startswith("d") else 2.0, samples=samples)


def _compare(q, k, v, backend, *, lse_in_loss=False, **kw):
    """fastlm.attention under `backend` against the float64 reference and the reference in q's dtype."""
    scale = q.shape[-1] ** -0.5
    gen = generator(1)
    out_shape = q.shape
    g = torch.randn(out_shape, generator=gen).to(DEVICE, q.dtype)
    lse_shape = (q.shape[1], q.shape[0]) if kw.get("cu_seqlens_q") is not None else (q.shape[0], q.shape[2],
                                                                                      q.shape[1])
    gl = torch.randn(lse_shape, generator=gen).to(DEVICE, torch.float32) if lse_in_loss else None
    left, right = reference.attention_window(kw.get("causal", False), kw.get("window", (-1, -1)))
    cu = (kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k"))

    def ours(q_, k_, v_):
        with fastlm.use_backend(backend):
            return fastlm.attention(q_, k_, v_, return_lse=True, **kw)

    def ref(q_, k_, v_, upcast=True):
        return reference.attention_masked(q_, k_, v_, scale, left, right, kw.get("softcap", 0.0), *cu,
                                          upcast=upcast)

    got = _grads(ours, (q, k, v), g, gl)
    exact = _grads(ref, [t.double() for t in (q, k, v)], g.double(), gl.double() if gl is not None else None)

    def baseline():
        return _grads(lambda *t: ref(*t, upcast=False), (q, k, v), g, gl)

    def flash_form():
        return _grads(lambda *t: attention_flash_form(*t, scale, left, right, kw.get("softcap", 0.0), *cu), (q, k, v),
                      g, gl)

    # Three simulated runs of each form: every output here has hundreds of elements or more, whose largest error is
    # already a steady statistic (conftest.ROUNDING_SAMPLES is for outputs of a few elements).
    sims = simulated_runs(baseline, samples=3) + flash_form_samples(flash_form, q.dtype, samples=3)
    _check_all(got, exact, baseline(), f"{backend}", sims)
    return got


@pytest.mark.parametrize("varlen", (False, True), ids=("dense", "varlen"))
def test_flash_form_baseline_computes_attention(varlen):
    """The rule's second PyTorch baseline (conftest.attention_flash_form, FlashAttention's rounding) computes
    attention: in float32, where its roundings to the input dtype are exact, it is as accurate as the math form
    by the rule, outputs and gradients (the LSE in the loss) over GQA, a two-sided window with queries that see
    nothing, softcap, and packed sequences with tokens outside every sequence."""
    q, k, v = _inputs((1, 40, 4, 32), (1, 30, 2, 32), torch.float32)
    left, right, softcap, cu = 12, -3, 5.0, (None, None)  # key j ≤ query i − 13: queries 0–12 see none
    if varlen:
        q, k, v = q[0], k[0], v[0]
        cu = tuple(torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in ((2, 17, 36), (0, 9, 27)))
        left, right = None, 0
    g = torch.randn(q.shape, generator=generator(1)).to(DEVICE)
    gl = torch.randn((q.shape[1], q.shape[0]) if varlen else (1, 4, 40), generator=generator(2)).to(DEVICE)

    def run(fn, dtype=torch.float32):
        return _grads(lambda *t: fn(*t, 32 ** -0.5, left, right, softcap, *cu), [t.to(dtype) for t in (q, k, v)],
                      g.to(dtype), gl.to(dtype))

    flash, exact = run(attention_flash_form), run(reference.attention_masked, torch.float64)
    assert torch.isneginf(flash[1]).any(), "the case has queries that see no key"

    def math_form():
        return run(lambda *t: reference.attention_masked(*t, upcast=False))

    _check_all(flash, exact, math_form(), "flash form", simulated_runs(math_form, samples=3))


def _case_id(c):
    b, sq, sk, h, hk, d, causal, window, softcap = c
    return f"b{b}-q{sq}-k{sk}-h{h}/{hk}-d{d}" + ("-causal" if causal else "") + (
        f"-w{window[0]}.{window[1]}" if window != (-1, -1) else "") + (f"-cap{softcap:g}" if softcap else "")


CASES = GPU_CASES if HAS_GPU else CPU_CASES
DTYPES = GPU_DTYPES if HAS_GPU else CPU_DTYPES


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, dtype, backend):
    b, sq, sk, h, hk, d, causal, window, softcap = case
    if backend == "triton" and triton_attention.attention_unsupported(torch.empty(0, d, dtype=dtype), None, None, None,
                                                                      None, 0.0):
        with pytest.raises(fastlm.BackendUnavailable, match="head dims up to"):
            fastlm.attention(*_inputs((b, sq, h, d), (b, sk, hk, d), dtype))
        return
    if backend == "cuda":
        from fastlm import _cuda

        q, k, _ = _inputs((b, sq, h, d), (b, sk, hk, d), dtype)
        left, right = reference.attention_window(causal, window)
        why = _cuda.attention_unsupported(q, k, None, left, right, softcap)
        if why:
            pytest.skip(f"cuda backend: {why}")
    q, k, v = _inputs((b, sq, h, d), (b, sk, hk, d), dtype)
    _compare(q, k, v, backend, causal=causal, window=window, softcap=softcap)


def _varlen(lens_q, lens_k, h, hk, d, dtype, outside_q=(0, 0), outside_k=(0, 0)):
    """Packed sequences; outside_q/k = (tokens before the first sequence, tokens after the last)."""
    cu_q = torch.tensor([outside_q[0], *(outside_q[0] + torch.tensor(lens_q).cumsum(0)).tolist()],
                        dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([outside_k[0], *(outside_k[0] + torch.tensor(lens_k).cumsum(0)).tolist()],
                        dtype=torch.int32, device=DEVICE)
    q, k, v = _inputs((sum(lens_q) + sum(outside_q), h, d), (sum(lens_k) + sum(outside_k), hk, d), dtype, seed=3)
    return q, k, v, dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))


def _assert_outside_rows(got, kw):
    """Tokens outside every sequence (issue 11): out 0, lse −inf, dq 0 for queries; dk = dv = 0 for keys."""
    out, lse, dq, dk, dv = got
    (q0, q1), (k0, k1) = (kw[n][[0, -1]].tolist() for n in ("cu_seqlens_q", "cu_seqlens_k"))
    for name, t, lo, hi in (("out", out, q0, q1), ("dq", dq, q0, q1), ("dk", dk, k0, k1), ("dv", dv, k0, k1)):
        for part in (t[:lo], t[hi:]):
            assert torch.equal(part, torch.zeros_like(part)), f"{name}: a token outside every sequence is not 0"
    assert torch.isneginf(lse[:, :q0]).all() and torch.isneginf(lse[:, q1:]).all(), "lse outside: not −inf"


VARLEN_LENS = ([0, 1, 17, 40, 5], [3, 1, 30, 40, 0])  # empty query side, one token, ragged, empty key side


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_varlen(causal, dtype, backend):
    q, k, v, kw = _varlen(*VARLEN_LENS, 2, 1, 64, dtype)
    if backend == "cuda":
        from fastlm import _cuda

        why = _cuda.attention_unsupported(q, k, kw["cu_seqlens_q"], None, 0 if causal else None, 0.0)
        if why:
            pytest.skip(f"cuda backend: {why}")
    out, lse, dq, dk, dv = _compare(q, k, v, backend, causal=causal, **kw)
    assert lse.shape == (2, q.shape[0])
    # The last sequence has no keys: its queries get 0 output and 0 gradient; the first has no queries: its keys
    # get 0 gradient.
    last = slice(q.shape[0] - VARLEN_LENS[0][-1], q.shape[0])
    assert torch.equal(out[last], torch.zeros_like(out[last]))
    assert torch.equal(dq[last], torch.zeros_like(dq[last]))
    assert torch.equal(dk[:3], torch.zeros_like(dk[:3])) and torch.equal(dv[:3], torch.zeros_like(dv[:3]))


# (tokens before, after) the sequences, for q and for k: a tail past the longest sequence (40) and past the
# forward's programs × block (2 × 32 rows in the interpreter), so the programs must stride over it.
OUTSIDE = (((3, 0), (0, 2)), ((0, 101), (0, 0)), ((5, 70), (4, 90)))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("outside", OUTSIDE, ids=("heads", "long-q-tail", "both"))
def test_varlen_tokens_outside_every_sequence(outside, dtype, backend):
    """Offsets that start past 0 and end before the packed total (issue 11): the kernels write those rows (out 0,
    lse −inf, zero gradients) themselves; the rest matches the reference, which returns the full packed size."""
    q, k, v, kw = _varlen(*VARLEN_LENS, 2, 1, 64, dtype, *outside)
    if backend == "cuda":
        from fastlm import _cuda

        why = _cuda.attention_unsupported(q, k, kw["cu_seqlens_q"], None, 0, 0.0)
        if why:
            pytest.skip(f"cuda backend: {why}")
    got = _compare(q, k, v, backend, causal=True, lse_in_loss=True, **kw)
    assert got[1].shape == (2, q.shape[0])
    _assert_outside_rows(got, kw)


# The forward and dK/dV kernels' two paths (kernels/attention.py: TMA): head dims their Hopper paths have
# configurations for, GQA and MQA, queries that see nothing, windows, softcap; varlen below.
TMA_PATH_CASES = [c for c in CPU_CASES if c[5] <= 128 and c[1] > 1]


def _force_tma_paths(monkeypatch, tma):
    if tma and HAS_GPU and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the kernels' TMA paths need compute capability 9 or more")
    monkeypatch.setattr(triton_attention, "TMA", tma)


# The Hopper paths without the forward's warp-specialized variant (TMA per kernel), and with it (True: dense calls
# at head dims of FWD_WS_CONFIGS take it).
TMA_NO_WS = {"fwd": True, "dkdv": True, "dq": True, "fwd_ws": False, "dkdv_ws": False}


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("tma", (False, TMA_NO_WS, True), ids=("pointers", "tma", "tma_ws"))
@pytest.mark.parametrize("case", TMA_PATH_CASES, ids=_case_id)
def test_tma_paths_match_reference(case, tma, backend, monkeypatch):
    """The forward and dK/dV kernels through each of their paths against the reference by the rule (the
    interpreter runs them all; a GPU of compute capability 9 or more takes TMA by default, pointers only when
    forced, the warp-specialized forward only when forced or FWD_WS_DEFAULT)."""
    _force_tma_paths(monkeypatch, tma)
    b, sq, sk, h, hk, d, causal, window, softcap = case
    dtype = GPU_DTYPES[0] if HAS_GPU else torch.float16
    q, k, v = _inputs((b, sq, h, d), (b, sk, hk, d), dtype)
    _compare(q, k, v, backend, causal=causal, window=window, softcap=softcap)


# The cuda backend's forward on wgmma (csrc/attention.cu's attn_fwd_wgmma_kernel; off by default:
# fastlm._cuda.ATTN_HOPPER): the GPU cases at the head dims it has (64, 128, 256) that take the forward kernel (more
# than 16 query rows a kv head), and six more: a window on both sides with queries fewer than keys, a softcap
# with ragged 128-row blocks, head dim 256 with a softcap (Gemma 2's), and three with many key blocks and no window
# (~1000 CTAs, several waves of them; causal with more keys than queries, the last block ragged; and not causal), so
# that both K/V stages turn over several times in each form.
HOPPER_CASES = [c for c in GPU_CASES if c[5] in (64, 128, 256) and c[1] * c[3] // c[4] > 16] + [
    (4, 2048, 2048, 16, 4, 128, True, (-1, -1), 0.0),  # ~1000 CTAs: several waves, 16 key blocks
    (1, 300, 520, 4, 2, 128, False, (16, 8), 0.0),
    (2, 130, 129, 2, 2, 64, True, (-1, -1), 5.0),
    (1, 200, 200, 4, 2, 256, True, (-1, -1), 50.0),
    (1, 384, 1000, 4, 2, 128, True, (-1, -1), 0.0),
    (2, 150, 600, 2, 1, 64, False, (-1, -1), 0.0),
]


# A first run of the wgmma kernels in a child process: a kernel that faults (an illegal address, a bad descriptor)
# kills the CUDA context of the process that launched it, and a kernel that never finishes (an mbarrier phase
# nobody completes) blocks it; under xdist every later test of that worker would fail with it. The child runs the
# forward at every head dim it has, in the forms named (fastlm._cuda.ATTN_HOPPER_FWD), and with "bwd" the backward
# at its two, with masks, GQA, a softcap (forward) and varlen; the tests launch the kernels in this process only
# after it came back clean. The warp-specialized forward has probes of its own ("ws", and "pingpong" for its
# consumer warp groups taking turns), so that a fault or a hang of its pipeline or of the turns cannot keep the other
# kernels from being tested.
WGMMA_PROBE = """
import sys
import torch, fastlm
from fastlm import _cuda
forms, backward = sys.argv[1].split(","), sys.argv[2] == "bwd"
_cuda.ATTN_HOPPER = True
gen = torch.Generator().manual_seed(0)
def randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=gen).to("cuda", dtype)
cu = torch.tensor([0, 0, 1, 140, 300], dtype=torch.int32, device="cuda")
with fastlm.use_backend("cuda"):
    for form in forms:
        _cuda.ATTN_HOPPER_FWD = form
        for d in ((64, 128) if form in ("ws", "pingpong") else (64, 128, 256)):
            for causal, window, softcap in ((False, (-1, -1), 0.0), (True, (-1, -1), 0.0), (False, (16, 8), 30.0)):
                for sq, sk in ((300, 257), (70, 700), (300, 40)):  # many key blocks; causal blocks with none
                    for dt in (torch.bfloat16, torch.float16):
                        fastlm.attention(randn(2, sq, 4, d, dtype=dt), randn(2, sk, 2, d, dtype=dt),
                                         randn(2, sk, 2, d, dtype=dt), causal=causal, window=window, softcap=softcap)
            fastlm.attention(randn(300, 4, d), randn(300, 2, d), randn(300, 2, d), causal=True, cu_seqlens_q=cu,
                             cu_seqlens_k=cu, max_seqlen_q=160, max_seqlen_k=160)
    _cuda.ATTN_HOPPER_FWD = "overlap"
    if backward:
        _cuda.ATTN_HOPPER_BWD = True
        for d in (64, 128):
            for causal, window in ((False, (-1, -1)), (True, (-1, -1)), (False, (16, 8))):
                q, k, v = (randn(2, n, h, d).requires_grad_() for n, h in ((300, 4), (257, 2), (257, 2)))
                fastlm.attention(q, k, v, causal=causal, window=window).sum().backward()
            q, k, v = (randn(300, h, d).requires_grad_() for h in (4, 2, 2))
            fastlm.attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=160,
                             max_seqlen_k=160).sum().backward()
torch.cuda.synchronize()
print("clean")
"""
# The probes: which forward forms each runs, and whether it runs the backward.
WGMMA_PROBES = {"main": ("serial,overlap", "bwd"), "ws": ("ws", "-"), "pingpong": ("pingpong", "-")}


# The child's time limit: it imports torch and fastlm and runs ~100 small calls of a built extension (seconds). Below
# the GPU loop's per-test limit (pytest-timeout, 150 s in scripts/gpu_check.sh), so that a kernel that hangs fails
# the first wgmma test of a worker with this message, once: the verdict is kept for the worker's later tests, where a
# test killed by pytest-timeout would leave none and every later test would start the child again.
WGMMA_PROBE_TIMEOUT_S = 120


@functools.lru_cache(maxsize=None)
def _wgmma_probe(which: str = "main") -> str:
    """"" when the child ran the probe's kernels cleanly, else what it printed (the tail), or that it hung."""
    try:
        proc = subprocess.run([sys.executable, "-c", WGMMA_PROBE, *WGMMA_PROBES[which]],
                              cwd=Path(__file__).resolve().parents[1], env=dict(os.environ), capture_output=True,
                              text=True, timeout=WGMMA_PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        tail = e.stderr or e.stdout or b""
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return f"still running after {WGMMA_PROBE_TIMEOUT_S} s (a kernel that hangs?), killed: {tail[-1500:]}"
    if proc.returncode == 0 and proc.stdout.strip().endswith("clean"):
        return ""
    return f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"


def test_wgmma_probe_reports_a_hang_once(monkeypatch):
    """A child that outlives WGMMA_PROBE_TIMEOUT_S is a verdict (kept), not an exception each test would meet anew;
    each probe has its own verdict."""
    calls = []

    def run(cmd, **kw):
        calls.append((cmd[-2:], kw["timeout"]))
        raise subprocess.TimeoutExpired(cmd, kw["timeout"], stderr=b"launching attn_fwd_ws_kernel")

    monkeypatch.setattr(subprocess, "run", run)
    _wgmma_probe.cache_clear()
    try:
        first, second, ws = _wgmma_probe("main"), _wgmma_probe("main"), _wgmma_probe("ws")
    finally:
        _wgmma_probe.cache_clear()
    assert first == second == ws and first.startswith("still running after 120 s") and "attn_fwd_ws" in first
    assert calls == [(["serial,overlap", "bwd"], WGMMA_PROBE_TIMEOUT_S), (["ws", "-"], WGMMA_PROBE_TIMEOUT_S)]
    assert WGMMA_PROBE_TIMEOUT_S < 150


def _force_cuda_hopper(monkeypatch, head_dim, probe="main"):
    """Turns the wgmma forward on where it runs (compute capability 9.0), and checks that it does run there and ran
    cleanly in a child process first (WGMMA_PROBE)."""
    from fastlm import _cuda

    if not HAS_GPU or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma forward kernel runs on compute capability 9.0 only")
    assert _cuda.attention_hopper_supported(head_dim, DEVICE), "a 9.0 GPU, and the build has no sm_90a code"
    failed = _wgmma_probe(probe)
    if failed:
        pytest.fail(f"the wgmma kernels failed in a child process, so they are not launched here: {failed}")
    monkeypatch.setattr(_cuda, "ATTN_HOPPER", True)


def _kernels_run(fn) -> set:
    """The names of the CUDA kernels fn() launches (torch's profiler): that a call took the kernel it is meant to."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


# The forward forms (fastlm._cuda.ATTN_HOPPER_FWD): the kernel each must launch, and its last template argument
# (kOverlap of the wgmma kernel, kPingpong of the warp-specialized one).
HOPPER_FORMS = {"overlap": ("attn_fwd_wgmma_kernel", True), "serial": ("attn_fwd_wgmma_kernel", False),
                "ws": ("attn_fwd_ws_kernel", False), "pingpong": ("attn_fwd_ws_kernel", True)}
WS_FORMS = ("ws", "pingpong")  # the warp-specialized kernel's: head dims 64 and 128, each with a probe of its own


def _launched_form(names, form) -> bool:
    """Whether one of the kernel names (the profiler's, demangled or not) is the form's kernel with its last template
    argument: "attn_fwd_ws_kernel<__nv_bfloat16, 128, false, true>(…)" or "…attn_fwd_ws_kernelI…Lb0ELb1EEEv…"."""
    kernel, last = HOPPER_FORMS[form]
    flag = "true" if last else "false"
    demangled = re.compile(rf"{kernel}<[^<>]*, {flag}>")
    mangled = re.compile(rf"{kernel}I\w*?Lb[01]ELb{int(last)}EEEv")
    return any(demangled.search(n) or mangled.search(n) for n in names)


def test_ws_protocol_model_holds_and_catches_its_mutations():
    # The warp-specialized forward's synchronization (mbarrier stages, the pingpong's turns) in every interleaving,
    # 0-6 key blocks; each protocol bug the model lists must be caught (scripts/ws_protocol_model.py).
    proc = subprocess.run([sys.executable, "scripts/ws_protocol_model.py"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("every property holds") == 7 and proc.stdout.count("caught:") == 4, proc.stdout


def test_launched_form_reads_the_last_template_argument():
    # The names the profiler may give (demangled, as CUPTI reports them, or mangled, as cuobjdump lists them): each
    # form's kernel and template argument, never another form's.
    ns = "fastlm::(anonymous namespace)::"
    prefix = "_ZN6fastlm45_GLOBAL__N__a7d8d062_12_attention_cu_797f6fdb"
    names = {
        "pingpong": [f"void {ns}attn_fwd_ws_kernel<__nv_bfloat16, 128, false, true>({ns}AttnParams, CUtensorMap_st)",
                     f"{prefix}18attn_fwd_ws_kernelI6__halfLi64ELb1ELb1EEEvNS0_10AttnParamsE14CUtensorMap_stS4_S4_"],
        "ws": [f"void {ns}attn_fwd_ws_kernel<__half, 64, true, false>({ns}AttnParams, CUtensorMap_st)",
               f"{prefix}18attn_fwd_ws_kernelI13__nv_bfloat16Li128ELb0ELb0EEEvNS0_10AttnParamsE14CUtensorMap_st"],
        "overlap": [f"void {ns}attn_fwd_wgmma_kernel<__half, 256, false, true>({ns}AttnParams)",
                    f"{prefix}21attn_fwd_wgmma_kernelI6__halfLi128ELb0ELb1EEEvNS0_10AttnParamsE"],
        "serial": [f"void {ns}attn_fwd_wgmma_kernel<__nv_bfloat16, 64, true, false>({ns}AttnParams)",
                   f"{prefix}21attn_fwd_wgmma_kernelI13__nv_bfloat16Li64ELb1ELb0EEEvNS0_10AttnParamsE"],
    }
    other = [f"void {ns}attn_fwd_kernel<__nv_bfloat16, 128, true>({ns}AttnParams)"]
    for form in HOPPER_FORMS:
        for name in names[form]:
            assert [f for f in HOPPER_FORMS if _launched_form({name}, f)] == [form], name
        assert not _launched_form(other, form)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[1:2], indirect=True)
@pytest.mark.parametrize("form", list(HOPPER_FORMS))
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", HOPPER_CASES, ids=_case_id)
def test_cuda_wgmma_forward_matches_reference(case, dtype, form, backend, monkeypatch):
    """Every Hopper forward (ATTN_HOPPER_FWD): the wgmma kernel's serial loop and its loop whose softmax runs while
    the previous block's P·V does, and the warp-specialized TMA kernel (head dims 64 and 128) with and without its
    consumer warp groups in pingpong; each call is checked to have launched that kernel."""
    from fastlm import _cuda

    b, sq, sk, h, hk, d, causal, window, softcap = case
    if form in WS_FORMS and d not in (64, 128):
        pytest.skip("the warp-specialized forward has head dims 64 and 128 (others take the overlapped kernel)")
    _force_cuda_hopper(monkeypatch, d, form if form in WS_FORMS else "main")
    monkeypatch.setattr(_cuda, "ATTN_HOPPER_FWD", form)
    q, k, v = _inputs((b, sq, h, d), (b, sk, hk, d), dtype)
    with fastlm.use_backend(backend):
        names = _kernels_run(lambda: fastlm.attention(q, k, v, causal=causal, window=window, softcap=softcap))
    assert _launched_form(names, form), sorted(names)
    _compare(q, k, v, backend, causal=causal, window=window, softcap=softcap)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[1:2], indirect=True)
@pytest.mark.parametrize("layout", ["packed_qkv", "heads_first", "expanded_k"])
def test_cuda_wgmma_ws_forward_strided_layouts(layout, backend, monkeypatch):
    """The warp-specialized forward's TMA maps over the strides of views users pass: q, k, v sliced from one packed
    (B, S, 3, H, D) projection, and (B, H, S, D) tensors transposed, give the bits of the same kernel on contiguous
    copies (which the rule checks); a K expanded over its heads (stride 0, which no TMA map takes) runs on the
    overlapped cp.async kernel instead, with that kernel's bits."""
    from fastlm import _cuda

    _force_cuda_hopper(monkeypatch, 128, "ws")
    monkeypatch.setattr(_cuda, "ATTN_HOPPER_FWD", "ws")
    gen = generator(0)
    b, s, h, d = 2, 700, 4, 128
    if layout == "packed_qkv":
        q, k, v = torch.randn(b, s, 3, h, d, generator=gen).to(DEVICE, torch.bfloat16).unbind(2)
    elif layout == "heads_first":
        q, k, v = (torch.randn(b, h, s, d, generator=gen).to(DEVICE, torch.bfloat16).transpose(1, 2)
                   for _ in range(3))
    else:
        q, v = (torch.randn(b, s, h, d, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
        k = torch.randn(b, s, 1, d, generator=gen).to(DEVICE, torch.bfloat16).expand(b, s, h, d)
    names = _kernels_run(lambda: fastlm.attention(q, k, v, causal=True))
    want = "attn_fwd_wgmma_kernel" if layout == "expanded_k" else "attn_fwd_ws_kernel"
    assert any(want in n for n in names), sorted(names)
    got = fastlm.attention(q, k, v, causal=True)
    if layout == "expanded_k":
        monkeypatch.setattr(_cuda, "ATTN_HOPPER_FWD", "overlap")
    assert torch.equal(got, fastlm.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True))
    _compare(q, k, v, backend, causal=True, window=(-1, -1), softcap=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[1:2], indirect=True)
@pytest.mark.parametrize("case", [c for c in HOPPER_CASES if c[5] in (64, 128)], ids=_case_id)
def test_cuda_wgmma_pingpong_is_the_ws_kernel_in_turns(case, backend, monkeypatch):
    """The pingpong orders when the two consumer warp groups issue their products, not what they compute: its out
    and LSE are the warp-specialized kernel's bits, every case (one key block, odd and even counts, causal blocks
    with none)."""
    from fastlm import _cuda

    b, sq, sk, h, hk, d, causal, window, softcap = case
    _force_cuda_hopper(monkeypatch, d, "ws")
    _force_cuda_hopper(monkeypatch, d, "pingpong")
    q, k, v = _inputs((b, sq, h, d), (b, sk, hk, d), torch.bfloat16)
    got = {}
    for form in WS_FORMS:
        monkeypatch.setattr(_cuda, "ATTN_HOPPER_FWD", form)
        def call():
            return fastlm.attention(q, k, v, causal=causal, window=window, softcap=softcap, return_lse=True)

        names = _kernels_run(call)
        assert _launched_form(names, form), (form, sorted(names))
        got[form] = call()
    for a, b_ in zip(got["ws"], got["pingpong"]):
        assert torch.equal(a, b_)


def _wgmma_backward_only(monkeypatch):
    """The wgmma backward on, and the Triton backward made to fail: a call that fell back to it would pass unseen."""
    from fastlm import _cuda

    def not_here(*args, **kwargs):
        raise AssertionError("the call took the Triton backward, not the wgmma one")

    monkeypatch.setattr(_cuda, "ATTN_HOPPER_BWD", True)
    monkeypatch.setattr(triton_attention, "attention_bwd", not_here)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[1:2], indirect=True)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", [c for c in HOPPER_CASES if not c[-1] and c[5] <= 128], ids=_case_id)
def test_cuda_wgmma_backward_matches_reference(case, dtype, backend, monkeypatch):
    """dQ, dK and dV of the wgmma backward (with the wgmma forward) by the rule, and twice the same bits."""
    b, sq, sk, h, hk, d, causal, window, softcap = case
    _force_cuda_hopper(monkeypatch, d)
    _wgmma_backward_only(monkeypatch)
    q, k, v = _inputs((b, sq, h, d), (b, sk, hk, d), dtype)
    first = _compare(q, k, v, backend, causal=causal, window=window, lse_in_loss=True)
    again = _compare(q, k, v, backend, causal=causal, window=window, lse_in_loss=True)
    assert all(torch.equal(x, y) for x, y in zip(first, again)), "the wgmma backward is not bitwise repeatable"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[1:2], indirect=True)
@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("outside", OUTSIDE[-1:], ids=("both",))
def test_cuda_wgmma_backward_varlen(outside, head_dim, backend, monkeypatch):
    """Varlen through the wgmma backward: an empty query side, one token, a sequence with no keys, and tokens
    outside every sequence (their dq, dk, dv exactly 0)."""
    _force_cuda_hopper(monkeypatch, head_dim)
    _wgmma_backward_only(monkeypatch)
    q, k, v, kw = _varlen(*VARLEN_LENS, 4, 2, head_dim, GPU_DTYPES[0], *outside)
    got = _compare(q, k, v, backend, causal=True, lse_in_loss=True, **kw)
    _assert_outside_rows(got, kw)


def test_cuda_backend_backward_route(monkeypatch):
    """The cuda backend's backward takes the wgmma one only with ATTN_HOPPER_BWD on and a call it has (no softcap,
    where attention_bwd_unsupported says None); the Triton backward otherwise, and always for the triton backend."""
    from fastlm import _cuda
    from fastlm.ops.attention import attention_bwd_op

    taken = []
    monkeypatch.setattr(_cuda, "attention_bwd", lambda *a: taken.append("cuda") or ("cuda",) * 3)
    monkeypatch.setattr(triton_attention, "attention_bwd", lambda *a: taken.append("triton") or ("triton",) * 3)
    monkeypatch.setattr(_cuda, "attention_bwd_unsupported", lambda q, softcap: "softcap" if softcap else None)
    t = torch.zeros(1, 4, 1, 64)
    lse = torch.zeros(1, 1, 4)

    def route(backend, softcap):
        taken.clear()
        attention_bwd_op(t, t, t, t, t, lse, None, None, None, 4, 4, 0.125, None, 0, softcap, backend, False)
        return taken[0]

    monkeypatch.setattr(_cuda, "ATTN_HOPPER_BWD", False)
    assert [route("cuda", 0.0), route("triton", 0.0)] == ["triton", "triton"]
    monkeypatch.setattr(_cuda, "ATTN_HOPPER_BWD", True)
    assert [route("cuda", 0.0), route("cuda", 30.0), route("triton", 0.0)] == ["cuda", "triton", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[1:2], indirect=True)
@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("outside", OUTSIDE[-1:], ids=("both",))
def test_cuda_wgmma_forward_varlen(outside, head_dim, backend, monkeypatch):
    """Varlen through the wgmma forward: an empty query side, one token, ragged lengths, a sequence with no keys,
    and tokens outside every sequence (out 0, lse −inf)."""
    _force_cuda_hopper(monkeypatch, head_dim)
    q, k, v, kw = _varlen(*VARLEN_LENS, 4, 2, head_dim, GPU_DTYPES[0], *outside)
    got = _compare(q, k, v, backend, causal=True, lse_in_loss=True, **kw)
    _assert_outside_rows(got, kw)


@pytest.mark.parametrize("case", [c for c in TMA_PATH_CASES if triton_attention.block_d(c[5]) in
                                  triton_attention.FWD_WS_CONFIGS], ids=_case_id)
def test_warp_specialized_paths_are_the_three_loop_paths(case, monkeypatch):
    """The warp-specialized forward walks the key range in one loop with the mask on every block, and the
    warp-specialized dK/dV one loop over the group's heads × query blocks likewise, where the other paths skip
    the mask for the blocks it cannot touch: the same blocks in the same order, so the same bits in the
    interpreter, out, LSE, dq, dk and dv (on a GPU the reference test above checks them by the rule). Windows,
    softcap, GQA, MQA and queries that see nothing included."""
    if HAS_GPU:
        pytest.skip("bitwise only where both run the same instructions: the interpreter")
    b, sq, sk, h, hk, d, causal, window, softcap = case
    q, k, v = _inputs((b, sq, h, d), (b, sk, hk, d), torch.float16)
    gen = generator(1)
    g_out = torch.randn(q.shape, generator=gen).to(torch.float16)
    results = []
    for tma in (TMA_NO_WS, True):
        monkeypatch.setattr(triton_attention, "TMA", tma)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with fastlm.use_backend("triton"):
            out, lse = fastlm.attention(*leaves, causal=causal, window=window, softcap=softcap, return_lse=True)
        out.backward(g_out)
        results.append([out.detach(), lse, *(t.grad for t in leaves)])
    for name, a, b_ in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b_), name


def _kernels_launched(monkeypatch):
    """A list that the names of the Triton kernels launched from here on are appended to."""
    names = []
    real = triton_attention._launch.launch

    def spy(kernel, grid, *args, **kwargs):
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        names.append(name)
        if name == "_attn_bwd_dkdv_kernel":
            names.append(("dkdv", kwargs.get("USE_TMA"), kwargs.get("ATOMIC_DQ")))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(triton_attention._launch, "launch", spy)
    return names


def _grads_of(q, k, v, g, backend, **kw):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with fastlm.use_backend(backend):
        out = fastlm.attention(*leaves, **kw)
    out.backward(g)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("tma", (False, TMA_NO_WS), ids=("pointers", "tma"))
@pytest.mark.parametrize("case", TMA_PATH_CASES[1:], ids=_case_id)
def test_atomic_dq_backward(case, tma, backend, monkeypatch):
    """The five-matmul backward (DQ_ATOMIC: dQ added atomically by the dK/dV kernel, no dQ kernel) through both
    dK/dV paths. In the interpreter the programs run in key-block order, which is the order the dQ kernel sums the
    key blocks in, and a dot rounds an element alike in either tiling (conftest's _tile_independent_dot), so dq,
    dk and dv are the bits of the three-kernel backward (a dropped or doubled block, a missing mask or scale fails
    it); on a GPU the adds' order varies, and the reference test checks it by the rule. GQA, MQA, windows, softcap
    and padded head dims (80, 112) included."""
    _force_tma_paths(monkeypatch, tma)
    b, sq, sk, h, hk, d, causal, window, softcap = case
    dtype = GPU_DTYPES[0] if HAS_GPU else torch.float16
    q, k, v = _inputs((b, sq, h, d), (b, sk, hk, d), dtype)
    kw = dict(causal=causal, window=window, softcap=softcap)
    names = _kernels_launched(monkeypatch)
    monkeypatch.setattr(triton_attention, "DQ_ATOMIC", True)
    if HAS_GPU:
        _compare(q, k, v, backend, **kw)
        assert "_attn_bwd_dq_kernel" not in names
        return
    g = torch.randn(q.shape, generator=generator(3)).to(DEVICE, dtype)
    atomic = _grads_of(q, k, v, g, backend, **kw)
    tile = triton_attention.block_d(d)
    hopper = bool(tma) and tile in triton_attention.DKDV_ATOMIC_TMA_CONFIGS and d % 4 == 0
    if hopper and softcap and tile in triton_attention.DKDV_ATOMIC_TMA_DENSE_ONLY:  # its entry is not for this call
        assert ("dkdv", True, False) in names and "_attn_bwd_dq_kernel" in names
    else:
        assert ("dkdv", hopper, True) in names and "_attn_bwd_dq_kernel" not in names
    monkeypatch.setattr(triton_attention, "DQ_ATOMIC", False)
    names.clear()
    plain = _grads_of(q, k, v, g, backend, **kw)
    assert "_attn_bwd_dq_kernel" in names
    for name, a, b_ in zip(("dq", "dk", "dv"), atomic, plain):
        assert torch.equal(a, b_), name


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("tma", (False, TMA_NO_WS), ids=("pointers", "tma"))
def test_atomic_dq_keys_past_the_end_with_a_very_negative_lse(tma, backend, monkeypatch):
    """The last key block's zero rows past the sequence pass the unmasked loop as visible, with P = exp(−lse): a
    row whose scores are all near −20 (logits are shift-invariant: a legitimate input) puts ~10⁷ there, which a
    16-bit dS cannot hold; dK and dV never store those rows, but dQ would take inf · 0 = NaN from them. Non-causal,
    a partial last key block: the atomic dQ equals the dQ kernel's, finite."""
    _force_tma_paths(monkeypatch, tma)
    dtype = GPU_DTYPES[0] if HAS_GPU else torch.float16
    q, k, v = _inputs((1, 40, 2, 64), (1, 40, 2, 64), dtype)
    q[..., 0], k[..., 0] = 8.0, -20.0  # every score about 8 · (−20) / 8 = −20
    monkeypatch.setattr(triton_attention, "DQ_ATOMIC", True)
    if HAS_GPU:  # against the reference by the rule (the adds' order varies on a GPU)
        got = _compare(q, k, v, backend)
        assert all(torch.isfinite(t).all() for t in got[2:])
        return
    g = torch.randn(q.shape, generator=generator(6)).to(DEVICE, dtype)
    atomic = _grads_of(q, k, v, g, backend)
    plain = _grads_of(q, k, v, g, backend, deterministic=True)
    for name, a, b_ in zip(("dq", "dk", "dv"), atomic, plain):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b_), name


@triton.jit
def _rows_times_b(A, B, C, ROWS: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    r, k, n = tl.arange(0, ROWS), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(A + r[:, None] * K + k[None, :])
    b = tl.load(B + k[:, None] * N + n[None, :])
    tl.store(C + r[:, None] * N + n[None, :], tl.dot(a, b))


@pytest.mark.skipif(HAS_GPU, reason="a property of the tests' interpreter (conftest's _tile_independent_dot)")
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_interpreter_dot_rounds_an_element_alike_in_every_tiling(dtype):
    """What the bitwise atomic-dQ tests above rest on: in the tests' interpreter the first 16 rows of a 64-row
    product, computed as a 16-row tile, are the bits of the same rows of the 64-row tile, on any CPU (with the
    interpreter's own np.matmul they differ in about 15% of the elements under OpenBLAS's Haswell kernel); and
    the product is the product, within float32 summation error of the exact one (bfloat16 too, which Triton's own
    interpreter dot gets wrong)."""
    a = torch.randn(64, 64, generator=generator(11)).to(DEVICE, dtype)
    b = torch.randn(64, 32, generator=generator(12)).to(DEVICE, dtype)
    whole, part = (torch.full((rows, 32), float("nan"), device=DEVICE) for rows in (64, 16))
    _rows_times_b[(1,)](a, b, whole, ROWS=64, K=64, N=32)
    _rows_times_b[(1,)](a, b, part, ROWS=16, K=64, N=32)
    assert torch.equal(part, whole[:16])
    exact = a[:16].double() @ b.double()
    assert (part.double() - exact).abs().max() <= 64 * 2.0 ** -24 * (a[:16].double().abs() @ b.double().abs()).max()


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
def test_atomic_dq_varlen_and_rows_outside(backend, monkeypatch):
    """Varlen through the atomic dQ: every sequence's dq by the rule against the reference, and the packed tokens
    outside every sequence, which no key block reaches, keep the accumulator's zeros."""
    monkeypatch.setattr(triton_attention, "DQ_ATOMIC", True)
    names = _kernels_launched(monkeypatch)
    q, k, v, kw = _varlen(*VARLEN_LENS, 2, 1, 32, DTYPES[-1], (5, 7), (4, 9))
    got = _compare(q, k, v, backend, causal=True, **kw)
    assert "_attn_bwd_dq_kernel" not in names
    _assert_outside_rows(got, kw)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
def test_gpu_deterministic_backward_is_repeatable_with_atomics_on(backend, monkeypatch):
    """Issue 12's race test: with the atomic dQ forced on, deterministic=True still gives the same bits 100 times
    (GQA, causal, bf16, d128: thousands of programs whose order varies run to run)."""
    monkeypatch.setattr(triton_attention, "DQ_ATOMIC", True)
    q, k, v = _inputs((2, 1024, 8, 128), (2, 1024, 2, 128), torch.bfloat16)
    g = torch.randn(q.shape, generator=generator(7)).to(DEVICE, q.dtype)
    first = _grads_of(q, k, v, g, backend, causal=True, deterministic=True)
    for _ in range(100):
        again = _grads_of(q, k, v, g, backend, causal=True, deterministic=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_atomic_dq_path_choice(monkeypatch):
    """Which backward a call gets: never the atomic dQ when deterministic; its Hopper variant where its table has
    the head-dim tile and the fp32 accumulator's rows can be TMA-aligned (head dim a multiple of 4), and, for a
    tile of DKDV_ATOMIC_TMA_DENSE_ONLY, the call is dense without a softcap (else the three-kernel backward's Hopper
    paths); else its pointer variant where that table has the tile, else the three-kernel backward;
    DQ_ATOMIC_DEFAULT decides when DQ_ATOMIC is None."""
    def choose(deterministic, dtype, head_dim, tma, plain=True):
        return triton_attention._atomic_dq(deterministic, dtype, head_dim, tma, plain)

    monkeypatch.setattr(triton_attention, "DQ_ATOMIC", True)
    monkeypatch.setitem(triton_attention.DKDV_ATOMIC_TMA_CONFIGS, 64, (128, 64, 8, 1))
    monkeypatch.setitem(triton_attention.DKDV_ATOMIC_TMA_CONFIGS, 256, (64, 32, 8, 1))
    monkeypatch.setitem(triton_attention.DKDV_ATOMIC_CONFIGS[False], 16, (32, 128, 8, 1))
    monkeypatch.setitem(triton_attention.DKDV_ATOMIC_CONFIGS[False], 256, (16, 32, 8, 1))
    monkeypatch.delitem(triton_attention.DKDV_ATOMIC_TMA_CONFIGS, 128, raising=False)
    monkeypatch.delitem(triton_attention.DKDV_ATOMIC_CONFIGS[True], 32, raising=False)
    monkeypatch.setattr(triton_attention, "DKDV_ATOMIC_TMA_DENSE_ONLY", {256})
    assert choose(True, torch.float16, 64, True) == (False, True)
    assert choose(False, torch.float16, 64, True) == (True, True)
    assert choose(False, torch.float16, 64, True, plain=False) == (True, True)  # 64 is not dense-only
    assert choose(False, torch.float16, 60, True) == (True, True)
    assert choose(False, torch.float16, 64, False) == (True, False)
    assert choose(False, torch.float16, 6, True) == (True, False)  # 24-byte fp32 rows: the pointer variant
    assert choose(False, torch.float16, 256, True) == (True, True)
    assert choose(False, torch.float16, 256, True, plain=False) == (False, True)  # varlen or softcap: 3 kernels
    assert choose(False, torch.float16, 256, False, plain=False) == (True, False)  # no Hopper path: pointers
    if 128 in triton_attention.DKDV_ATOMIC_CONFIGS[False]:
        assert choose(False, torch.float16, 128, True) == (True, False)
    assert choose(False, torch.float32, 32, False) == (False, False)
    monkeypatch.setattr(triton_attention, "DQ_ATOMIC", False)
    assert choose(False, torch.float16, 64, True) == (False, True)
    monkeypatch.setattr(triton_attention, "DQ_ATOMIC", None)
    for default in (False, True):
        monkeypatch.setattr(triton_attention, "DQ_ATOMIC_DEFAULT", default)
        assert choose(False, torch.float16, 64, True) == (default, True)


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("varlen", (False, True), ids=("dense", "varlen"))
@pytest.mark.parametrize("softcap", (0.0, 5.0), ids=("plain", "softcap"))
def test_atomic_dq_dense_only_hopper_entry(varlen, softcap, backend, monkeypatch):
    """A DKDV_ATOMIC_TMA_DENSE_ONLY head dim (128: its Hopper shape spills with varlen or a softcap) takes the
    Hopper atomic variant for dense calls without a softcap only; the other calls keep the three-kernel backward
    on its Hopper paths. Checked at the launch, and by the bits of the three-kernel backward in the interpreter
    (by the rule on a GPU)."""
    if 128 not in triton_attention.DKDV_ATOMIC_TMA_DENSE_ONLY:
        pytest.fail("the tables no longer have a dense-only Hopper entry at head dim 128: update this test")
    _force_tma_paths(monkeypatch, TMA_NO_WS)
    monkeypatch.setattr(triton_attention, "DQ_ATOMIC", True)
    names = _kernels_launched(monkeypatch)
    dtype = GPU_DTYPES[0] if HAS_GPU else torch.float16
    if varlen:
        q, k, v, kw = _varlen((37, 64), (37, 64), 2, 1, 128, dtype, (20, 5), (20, 5))
        kw["causal"] = True
    else:
        q, k, v = _inputs((1, 70, 2, 128), (1, 70, 1, 128), dtype)
        kw = dict(causal=True)
    if softcap:
        kw["softcap"] = softcap
    atomic = not varlen and not softcap

    def check_path():
        assert ("dkdv", True, atomic) in names and ("_attn_bwd_dq_kernel" in names) != atomic

    if HAS_GPU:
        _compare(q, k, v, backend, **kw)
        check_path()
        return
    g = torch.randn(q.shape, generator=generator(8)).to(DEVICE, dtype)
    atomic_grads = _grads_of(q, k, v, g, backend, **kw)
    check_path()
    plain = _grads_of(q, k, v, g, backend, deterministic=True, **kw)
    for name, a, b_ in zip(("dq", "dk", "dv"), atomic_grads, plain):
        assert torch.equal(a, b_), name


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("how", ("argument", "torch", "torch backward"))
def test_deterministic_calls_never_add_dq_atomically(how, backend, monkeypatch):
    """deterministic=True, or torch.use_deterministic_algorithms(True), keeps the three-kernel backward (bitwise
    repeatable) even where the atomic dQ is forced on."""
    monkeypatch.setattr(triton_attention, "DQ_ATOMIC", True)
    names = _kernels_launched(monkeypatch)
    q, k, v = _inputs((1, 40, 2, 32), (1, 40, 1, 32), DTYPES[-1])
    g = torch.randn(q.shape, generator=generator(4)).to(DEVICE, q.dtype)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    try:
        if how == "torch":
            torch.use_deterministic_algorithms(True)
        with fastlm.use_backend(backend):
            out = fastlm.attention(*leaves, causal=True, deterministic=how == "argument")
        if how == "torch backward":
            torch.use_deterministic_algorithms(True)  # around the backward alone
        out.backward(g)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert "_attn_bwd_dq_kernel" in names
    names.clear()
    _grads_of(q, k, v, g, backend, causal=True)
    assert "_attn_bwd_dq_kernel" not in names


def test_tma_scratch_allocator_is_installed_for_one_launch_only():
    """The Hopper paths' descriptors need Triton's scratch allocator: installed around their launches (and only
    theirs), put back after, and a caller's own allocator (triton.set_allocator) left in place."""
    from triton.runtime import _allocation

    before = _allocation._allocator.get()
    try:
        _allocation._allocator.set(_allocation.NullAllocator())
        with triton_attention._Scratch(torch.device("cpu")) as scratch:
            assert _allocation._allocator.get() is scratch
            assert scratch(256, 128, None).numel() == 256
        assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
        with triton_attention._Scratch(torch.device("cpu"), active=False):
            assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)

        def mine(size, alignment, stream):
            return torch.empty(size, dtype=torch.int8)

        _allocation._allocator.set(mine)
        with triton_attention._Scratch(torch.device("cpu")):
            assert _allocation._allocator.get() is mine
        assert _allocation._allocator.get() is mine
    finally:
        _allocation._allocator.set(before)


def test_tma_path_choice(monkeypatch):
    """When the dK/dV kernel may take its TMA path: 16-bit inputs at a head dim of DKDV_TMA_CONFIGS whose rows TMA
    can address (16-byte aligned base and strides, no stride 0 over several entries); never when TMA is False; by
    default only on a device of compute capability 9 or more. The forward's and dQ's are the same rule on K and V;
    TMA may also be set per kernel."""
    choose = triton_attention._dkdv_tma
    q = torch.zeros(2, 8, 4, 64, dtype=torch.float16)
    monkeypatch.setattr(triton_attention, "TMA", True)
    assert choose(q, q, 64, False)
    assert not choose(q.float(), q.float(), 64, False)  # fp32: the pointer path
    assert not choose(torch.zeros(2, 8, 4, 256, dtype=torch.float16), q, 256, False)  # no table entry
    wide = torch.zeros(2, 8, 4, 72, dtype=torch.float16)[..., :64]  # heads 144 bytes apart: 16-aligned
    assert choose(wide, wide, 64, False)
    odd = torch.zeros(2, 8, 4, 66, dtype=torch.float16)[..., :64]  # heads 132 bytes apart: not
    assert not choose(odd, odd, 64, False)
    assert not choose(q, torch.zeros(1, 1, 1, 64, dtype=torch.float16).expand(2, 8, 4, 64), 64, False)
    assert not choose(q[..., 1:33], q[..., 1:33], 32, False)  # a base 2 bytes past alignment
    packed = torch.zeros(30, 4, 64, dtype=torch.float16)
    assert choose(packed, packed, 64, True)
    monkeypatch.setattr(triton_attention, "TMA", False)
    assert not choose(q, q, 64, False)
    monkeypatch.setattr(triton_attention, "TMA", None)
    assert choose(q, q, 64, False) is False  # CPU tensors: no compute capability 9
    monkeypatch.setattr(triton_attention, "TMA", True)
    assert triton_attention._tma_path("fwd", q, q, 64, False) and triton_attention._tma_path("dq", q, q, 64, False)
    assert not triton_attention._tma_path("fwd", q, odd, 64, False)
    monkeypatch.setattr(triton_attention, "TMA", {"dkdv": False, "dq": True})  # per kernel; fwd decides per call
    assert not choose(q, q, 64, False) and triton_attention._tma_path("dq", q, q, 64, False)
    assert not triton_attention._tma_path("fwd", q, q, 64, False)  # CPU tensors
    # The warp-specialized forward: its own table (head dims 64 and 128), forced like the others; by default (TMA
    # None) only with FWD_WS_DEFAULT, even where the other Hopper paths are taken (compute capability 9).
    monkeypatch.setattr(triton_attention, "TMA", True)
    assert triton_attention._tma_path("fwd_ws", q, q, 64, False)
    assert not triton_attention._tma_path("fwd_ws", wide[..., :32], wide[..., :32], 32, False)  # no table entry
    monkeypatch.setattr(triton_attention, "TMA", None)
    monkeypatch.setattr(triton_attention, "_INTERPRETED", False)
    monkeypatch.setattr(triton_attention._util, "capability", lambda device: (9, 0))
    assert triton_attention._tma_path("fwd", q, q, 64, False) and not triton_attention._tma_path("fwd_ws", q, q, 64,
                                                                                              False)
    monkeypatch.setattr(triton_attention, "FWD_WS_DEFAULT", True)
    assert triton_attention._tma_path("fwd_ws", q, q, 64, False)


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("tma", (False, True), ids=("pointers", "tma"))
def test_tma_paths_keep_packed_neighbours_apart(tma, backend, monkeypatch):
    """Varlen through both paths with NaN in every token outside the sequences and in the query-side gradient's
    rows there: a block that runs past its sequence's end must not read the next sequence or the padding (the TMA
    paths' descriptors end at the sequence: those rows arrive as zeros)."""
    _force_tma_paths(monkeypatch, tma)
    dtype = GPU_DTYPES[0] if HAS_GPU else torch.float16
    q, k, v, kw = _varlen(*VARLEN_LENS, 2, 1, 64, dtype, (5, 70), (4, 90))
    (q0, q1), (k0, k1) = (kw[n][[0, -1]].tolist() for n in ("cu_seqlens_q", "cu_seqlens_k"))
    for t, lo, hi in ((q, q0, q1), (k, k0, k1), (v, k0, k1)):
        t[:lo] = float("nan")
        t[hi:] = float("nan")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with fastlm.use_backend(backend):
        out = fastlm.attention(*leaves, causal=True, **kw)
    g = torch.randn(out.shape, generator=generator(2)).to(DEVICE, dtype)
    g[:q0] = float("nan")
    g[q1:] = float("nan")
    out.backward(g)
    for name, t, lo, hi in (("dq", leaves[0], q0, q1), ("dk", leaves[1], k0, k1), ("dv", leaves[2], k0, k1)):
        assert torch.isfinite(t.grad[lo:hi]).all(), f"{name}: NaN leaked into a sequence"
        assert torch.equal(t.grad[:lo], torch.zeros_like(t.grad[:lo])) and torch.equal(
            t.grad[hi:], torch.zeros_like(t.grad[hi:])), f"{name}: a token outside every sequence is not 0"
    # And the same numbers as the inputs without the NaN (the rows outside are never read).
    clean = [torch.where(torch.isnan(t), 0.0, t).detach().requires_grad_() for t in (q, k, v)]
    with fastlm.use_backend(backend):
        out_clean = fastlm.attention(*clean, causal=True, **kw)
    out_clean.backward(torch.where(torch.isnan(g), 0.0, g))
    for t, c in zip(leaves, clean):
        torch.testing.assert_close(t.grad, c.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("atomic", (False, True), ids=("three-kernel", "atomic-dq"))
def test_varlen_outside_tokens_with_batches_in_chunks(atomic, backend, monkeypatch):
    """Chunked launches (grid axis 2 lowered to 2): only the launch holding the call's first sequence writes the
    tokens before it, only the one holding the last those after it, with the call's packed totals; the bits of
    one launch, forward and backward (the atomic dQ's accumulator too: on a GPU its adds' order varies, so
    there it is compared by the rule's reference tests instead)."""
    if atomic and HAS_GPU:
        pytest.skip("bitwise only where the atomic adds run in a fixed order: the interpreter")
    monkeypatch.setattr(triton_attention, "DQ_ATOMIC", atomic)
    dtype = DTYPES[-1]
    q, k, v, kw = _varlen([3, 0, 17, 9, 5], [4, 6, 20, 0, 8], 2, 1, 32, dtype, (4, 40), (2, 3))
    do = torch.randn(q.shape, generator=generator(6)).to(DEVICE, dtype)
    args = (kw["cu_seqlens_q"], kw["cu_seqlens_k"], kw["max_seqlen_q"], kw["max_seqlen_k"], 32 ** -0.5, None, 0,
            None)

    def run():
        out, lse = triton_attention.attention_fwd(q, k, v, *args)
        return (out, lse, *triton_attention.attention_bwd(do, q, k, v, out, lse, None, *args,
                                                          deterministic=not atomic))

    want = run()
    monkeypatch.setattr(triton_attention, "MAX_GRID_YZ", 2)
    got = run()
    for a, b in zip(got, want):
        assert not a.isnan().any()
        assert torch.equal(a, b)
    _assert_outside_rows(got, kw)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_lse_gradient(backend):
    """The LSE is differentiable: a loss using it gets dS += P·dlse (folded into the backward's D)."""
    dtype = DTYPES[-1]
    q, k, v = _inputs((1, 40, 4, 64), (1, 56, 2, 64), dtype)
    _compare(q, k, v, backend, causal=True, lse_in_loss=True)
    qv, kv_, vv, kw = _varlen([7, 30], [20, 30], 2, 1, 32, dtype)
    _compare(qv, kv_, vv, backend, causal=True, lse_in_loss=True, **kw)


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
def test_rows_that_see_nothing(backend):
    """Queries whose window holds no key: output exactly 0, LSE −inf, every gradient finite and their dQ 0."""
    q, k, v = _inputs((1, 40, 2, 32), (1, 10, 2, 32), torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with fastlm.use_backend(backend):
        out, lse = fastlm.attention(*leaves, causal=True, return_lse=True)
    out.sum().backward()
    assert torch.equal(out[:, :30], torch.zeros_like(out[:, :30]))
    assert torch.isneginf(lse[:, :, :30]).all() and torch.isfinite(lse[:, :, 30:]).all()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert torch.equal(leaves[0].grad[:, :30], torch.zeros_like(leaves[0].grad[:, :30]))


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
def test_deterministic_backward_is_bitwise_repeatable(backend):
    q, k, v, kw = _varlen([33, 50, 9], [33, 64, 20], 4, 1, 32, DTYPES[-1])
    g = torch.randn(q.shape, generator=generator(5)).to(DEVICE, q.dtype)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with fastlm.use_backend(backend):
            out = fastlm.attention(*leaves, causal=True, window=(20, -1), deterministic=True, **kw)
        (out * g).sum().backward()
        runs.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_strided_inputs_and_default_scale():
    """Head-major views (SDPA's layout transposed) run in place; a non-unit head-dim stride is copied. Both give
    the bits of contiguous inputs; the default scale is head_dim^−½."""
    q, k, v = _inputs((2, 4, 33, 32), (2, 4, 47, 32), torch.float32)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    wide = torch.zeros((2, 47, 4, 64), device=DEVICE)
    wide[..., ::2] = kt
    kernel = "triton" if (HAS_GPU or fastlm._util.interpreting()) else "torch"
    with fastlm.use_backend(kernel):
        out = fastlm.attention(qt, kt, vt, causal=True)
        out_contig = fastlm.attention(qt.contiguous(), kt.contiguous(), vt.contiguous(), causal=True)
        out_strided = fastlm.attention(qt, wide[..., ::2], vt, causal=True)
    ref = reference.attention(qt.double(), kt.double(), vt.double(), causal=True)

    def baseline():
        return reference.attention_masked(qt, kt, vt, 32 ** -0.5, None, 0, upcast=False)[0]

    assert_by_rule("strided", out, ref, baseline(), samples=simulated_runs(baseline, samples=3))
    assert torch.equal(out, out_contig) and torch.equal(out, out_strided)


# ---------------------------------------------------------------------------------------------- the SDPA drop-in


def _sdpa_math(*args, **kw):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kw)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("sq,sk", ((33, 33), (17, 50), (50, 17)), ids=("square", "q<k", "q>k"))
@pytest.mark.parametrize("is_causal", (False, True), ids=("full", "causal"))
def test_sdpa_dropin_matches_torch(sq, sk, is_causal, backend):
    """torch's layout and its top-left causal alignment, GQA through enable_gqa, an explicit scale."""
    dtype = DTYPES[-1]
    q, k, v = _inputs((2, 4, sq, 64), (2, 2, sk, 64), dtype)
    if backend == "cuda":
        from fastlm import _cuda

        why = _cuda.attention_unsupported(q.transpose(1, 2), k.transpose(1, 2), None, None,
                                          sq - sk if is_causal else None, 0.0)
        if why:
            pytest.skip(f"cuda backend: {why}")
    g = torch.randn(q.shape, generator=generator(2)).to(DEVICE, dtype)
    kw = dict(is_causal=is_causal, scale=0.1, enable_gqa=True)

    def ours(*t):
        with fastlm.use_backend(backend):
            return fastlm.scaled_dot_product_attention(*t, **kw), torch.zeros(())

    def theirs(*t):
        return _sdpa_math(*t, **kw), torch.zeros(())

    def flash_form(*t):
        return sdpa_flash_form(*t, **kw), torch.zeros(())

    got = _grads(ours, (q, k, v), g)
    exact = _grads(theirs, [t.double() for t in (q, k, v)], g.double())
    base = _grads(theirs, (q, k, v), g)
    sims = simulated_runs(lambda: _grads(theirs, (q, k, v), g), samples=3) + flash_form_samples(
        lambda: _grads(flash_form, (q, k, v), g), dtype, samples=3)  # thousands of elements each
    for i, name in zip((0, 2, 3, 4), ("out", "dq", "dk", "dv")):
        assert_by_rule(f"sdpa {name}", got[i], exact[i], base[i], factor=3.0 if name != "out" else 2.0,
                       samples=[s[i] for s in sims])


def test_sdpa_dropin_falls_back_for_a_mask_and_says_so():
    q, k, v = _inputs((1, 2, 8, 16), (1, 2, 8, 16), torch.float32)
    mask = torch.rand(8, 8, device=DEVICE) > 0.3
    mask[:, 0] = True
    with pytest.warns(UserWarning, match="attn_mask"):
        got = fastlm.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        fastlm.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_sdpa_dropin_refuses_mismatched_heads_without_enable_gqa():
    q, k, v = _inputs((1, 4, 8, 16), (1, 2, 8, 16), torch.float32)
    with pytest.raises(ValueError, match="enable_gqa"):
        fastlm.scaled_dot_product_attention(q, k, v)


# ---------------------------------------------------------------------------------------------- bad input


def _bad(**over):
    q, k, v = (torch.randn(shape) for shape in ((1, 8, 4, 32), (1, 8, 2, 32), (1, 8, 2, 32)))
    args = dict(q=q, k=k, v=v)
    args.update({key: val for key, val in over.items() if key in args})
    kw = {key: val for key, val in over.items() if key not in args}
    return lambda: fastlm.attention(args["q"], args["k"], args["v"], **kw)


@pytest.mark.parametrize("call,error,match", [
    (_bad(k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16)), ValueError, "head_dim"),
    (_bad(k=torch.randn(1, 8, 3, 32), v=torch.randn(1, 8, 3, 32)), ValueError, "multiple"),
    (_bad(v=torch.randn(1, 9, 2, 32)), ValueError, "same shape"),
    (_bad(q=torch.randn(1, 8, 4, 300), k=torch.randn(1, 8, 2, 300), v=torch.randn(1, 8, 2, 300)), ValueError,
     "between 1 and 256"),
    (_bad(k=torch.randn(1, 8, 2, 32, dtype=torch.float16)), TypeError, "dtype"),
    (_bad(q=torch.randn(8, 4, 32)), ValueError, "4-D"),
    (_bad(q=torch.randn(1, 8, 4, 32, dtype=torch.float64).to(torch.int32)), TypeError, "floating"),
    (_bad(window=(3,)), TypeError, "window"),
    (_bad(softcap=-1.0), ValueError, "softcap"),
    (_bad(q=torch.randn(8, 4, 32), k=torch.randn(8, 2, 32), v=torch.randn(8, 2, 32),
          cu_seqlens_q=torch.tensor([0, 8]), cu_seqlens_k=torch.tensor([0, 8]), max_seqlen_q=8, max_seqlen_k=8),
     TypeError, "int32"),
    (_bad(q=torch.randn(8, 4, 32), k=torch.randn(8, 2, 32), v=torch.randn(8, 2, 32),
          cu_seqlens_q=torch.tensor([0, 4, 8], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32),
          max_seqlen_q=8, max_seqlen_k=8), ValueError, "offsets"),
    (_bad(q=torch.randn(8, 4, 32), k=torch.randn(8, 2, 32), v=torch.randn(8, 2, 32),
          cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)),
     ValueError, "max_seqlen"),
    (_bad(q=torch.randn(8, 4, 32), k=torch.randn(8, 2, 32), v=torch.randn(8, 2, 32),
          cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "together"),
], ids=["head-dims", "heads-not-divisible", "k-v-shapes", "head-dim-300", "dtype", "rank", "int-dtype",
        "window", "softcap", "cu-dtype", "cu-length", "max-seqlen", "cu-pair"])
def test_bad_input_is_refused_before_any_kernel(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_sdpa_head_dim_mismatch_names_query_and_key():
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"query and key must have the same head dim.*query \(1, 2, 4, 16\) and key "
                                         r"\(1, 2, 4, 8\)"):
        fastlm.scaled_dot_product_attention(q, k, k)


def _bad_varlen(cu, total=10, max_q=8, max_k=8):
    cu = torch.tensor(cu, dtype=torch.int32)
    q, k = torch.randn(total, 2, 16), torch.randn(total, 1, 16)
    return lambda: fastlm.attention(q, k, k, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_q,
                                    max_seqlen_k=max_k)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("call,match", [
    (_bad_varlen([0, 4, 12]), "≤ the 10 packed tokens"),  # past the tokens: it corrupted the heap
    (_bad_varlen([-2, 4, 10]), "from ≥ 0"),  # a negative start: likewise
    (_bad_varlen([0, 6, 4, 10]), "non-decreasing"),  # garbage on triton, a wrong shape on the reference
    (_bad_varlen([0, 4, 10], max_q=0), "max_seqlen_q must be ≥ 1"),  # returned uninitialized memory
    (_bad_varlen([0, 4, 10], max_k=5), "max_seqlen_k=5 is shorter than the longest sequence"),
], ids=["past-the-end", "negative-start", "decreasing", "max-seqlen-0", "max-seqlen-short"])
def test_bad_offsets_on_the_host_are_refused(backend, call, match):
    """Offsets on the CPU are read (no sync there) and refused on every backend."""
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------- compile, GPU


@pytest.mark.parametrize("dynamic", (False, True), ids=("static", "dynamic"))
def test_compiles_without_graph_breaks(dynamic):
    torch._dynamo.reset()
    backend = "triton" if (HAS_GPU or fastlm._util.interpreting()) else "torch"
    q, k, v = _inputs((1, 16, 2, 32), (1, 24, 1, 32), torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def step(q_, k_, v_):
        out, lse = fastlm.attention(q_, k_, v_, causal=True, window=(8, -1), return_lse=True)
        return out.sum() + lse.sum()

    with fastlm.use_backend(backend):
        explained = torch._dynamo.explain(step)(*leaves)
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
        compiled(*leaves).backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    with fastlm.use_backend(backend):
        step(*leaves).backward()
    for a, b in zip(got, (t.grad for t in leaves)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_opcheck():
    q, k, v = _inputs((1, 16, 2, 32), (1, 16, 2, 32), torch.float32)
    if not (HAS_GPU or fastlm._util.interpreting()):
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, None, 16, 16, 0.2, None, 0, 0.0,
            "triton", False)
    torch.library.opcheck(torch.ops.fastlm.attention_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:2], indirect=True)
def test_gpu_long_sequences_bf16(backend):
    q, k, v = _inputs((2, 4096, 16, 128), (2, 4096, 4, 128), torch.bfloat16)
    _compare(q, k, v, backend, causal=True)


@pytest.mark.gpu
@pytest.mark.large_memory
def test_gpu_offsets_past_2_to_the_31():
    """A packed batch whose q holds more than 2³¹ elements: sequence starts × strides need int64."""
    tokens, h, d = 2 ** 31 // (8 * 128) + 4096, 8, 128
    q = torch.randn((tokens, h, d), device="cuda", dtype=torch.bfloat16)
    k = v = torch.randn((tokens, 1, d), device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, tokens - 256, tokens], dtype=torch.int32, device="cuda")
    with fastlm.use_backend("triton"):
        out = fastlm.attention(q, k, v, causal=True, window=(64, -1), cu_seqlens_q=cu, cu_seqlens_k=cu,
                               max_seqlen_q=tokens - 256, max_seqlen_k=tokens - 256)
    tail = slice(tokens - 256, tokens)
    ref = reference.attention(q[None, tail].double(), k[None, tail].double(), v[None, tail].double(), causal=True,
                              window=(64, -1))[0]
    base = reference.attention_masked(q[None, tail], k[None, tail], v[None, tail], d ** -0.5, 64, 0,
                                      upcast=False)[0][0]
    assert_by_rule("tail sequence", out[tail], ref, base)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:2], indirect=True)  # the kernel backends
def test_gpu_inductor_and_cuda_graph(backend):
    """fastlm's kernels compiled by inductor give the eager call's bits, and replay in a CUDA graph. On one kernel
    backend: `auto` may route the eager call to SDPA, which a compiled graph never takes (another algorithm)."""
    q, k, v = _inputs((2, 512, 8, 64), (2, 512, 8, 64), torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def step(q_, k_, v_):
        return fastlm.attention(q_, k_, v_, causal=True).float().square().sum()

    compiled = torch.compile(step, fullgraph=True)
    compiled(*leaves).backward()
    eager = [t.clone().detach().requires_grad_() for t in (q, k, v)]
    step(*eager).backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            out = fastlm.attention(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fastlm.attention(q, k, v, causal=True)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(out, fastlm.attention(q, k, v, causal=True), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- split-KV decode
#
# Short query sides in 16-bit dtypes take the split-KV kernel (kernels/attention.py, _attn_decode_kernel and its
# combine): a kv head's (query position, q head) pairs packed into one tile, the keys cut into splits. The
# interpreter's sizes are far below DECODE_MIN_SPLIT_KEYS, so the tests lower it to get several splits.

DECODE_DTYPES = GPU_DTYPES if HAS_GPU else (torch.float16,)  # fp32 keeps the general kernel
# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, window, softcap)
DECODE_CASES = [
    (2, 1, 97, 8, 2, 64, True, (-1, -1), 0.0),  # GQA 4: 4 rows a kv head
    (1, 4, 100, 8, 2, 128, True, (30, -1), 0.0),  # 4 queries × 4 heads = 16 rows, causal sliding window
    (2, 1, 64, 4, 1, 96, False, (-1, -1), 10.0),  # MQA, padded head dim, softcap
    (1, 2, 70, 16, 1, 16, True, (-1, -1), 0.0),  # 32 rows: a 32-row tile
    (1, 8, 40, 16, 2, 32, True, (-1, -1), 0.0),  # 64 rows: a 64-row tile
    (1, 1, 90, 2, 2, 256, False, (40, 4), 0.0),  # no GQA, head dim 256, window both sides (41 keys: 2 splits)
    (1, 5, 3, 4, 2, 32, True, (-1, -1), 0.0),  # seqlen_q > seqlen_k: the first two queries see nothing
    (1, 3, 90, 6, 2, 80, False, (40, 0), 5.0),  # window's right edge at the diagonal, softcap, head dim 80
]


@pytest.fixture
def decode_splits_seen(monkeypatch):
    """Lowers the minimum keys a split (so the interpreter's short caches get several splits) and records the
    number of splits of each decode launch."""
    seen = []
    real = triton_attention.decode_splits

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(triton_attention, "DECODE_MIN_SPLIT_KEYS", 16)
    monkeypatch.setattr(triton_attention, "decode_splits", spy)
    return seen


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("dtype", DECODE_DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=_case_id)
def test_decode_split_kv(case, dtype, backend, decode_splits_seen):
    """Forward (out, lse) and a backward through it (which reads that lse) against the float64 reference."""
    b, sq, sk, h, hk, d, causal, window, softcap = case
    q, k, v = _inputs((b, sq, h, d), (b, sk, hk, d), dtype)
    _compare(q, k, v, backend, causal=causal, window=window, softcap=softcap, lse_in_loss=True)
    assert len(decode_splits_seen) == 1, "the short query side did not take the split-KV decode kernel"
    if sk >= 40:
        assert decode_splits_seen[0] > 1, decode_splits_seen


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
def test_decode_one_split_writes_directly(backend, monkeypatch):
    """With one split (the default minimum keys a split at this cache length) the decode kernel writes out and
    lse itself: no workspace, no combine."""
    seen = []
    real = triton_attention.decode_splits
    monkeypatch.setattr(triton_attention, "decode_splits", lambda *a: seen.append(real(*a)) or seen[-1])
    q, k, v = _inputs((2, 2, 8, 64), (2, 97, 2, 64), DECODE_DTYPES[-1])
    _compare(q, k, v, backend, causal=True)
    assert seen == [1]


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_decode_varlen(causal, backend, decode_splits_seen):
    """Packed sequences with 0 to 3 queries (12 rows a kv head at GQA 4) over caches of 0 to 60 keys."""
    q, k, v, kw = _varlen([1, 0, 3, 2, 1], [40, 5, 0, 60, 17], 4, 1, 64, DECODE_DTYPES[-1])
    out, lse, *_ = _compare(q, k, v, backend, causal=causal, window=(40, -1) if causal else (-1, -1), **kw)
    assert decode_splits_seen and decode_splits_seen[0] > 1
    seq2 = slice(1, 4)  # no keys: output 0, lse −inf
    assert torch.equal(out[seq2], torch.zeros_like(out[seq2])) and torch.isneginf(lse[:, seq2]).all()


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("splits", ("one", "several"))
def test_decode_varlen_tokens_outside_every_sequence(splits, backend, decode_splits_seen, monkeypatch):
    """The split-KV decode kernel writes the tokens before and after the sequences (issue 11) itself, with one
    split and with several (the combine writes only the sequences' rows): 50 query tokens after 3 sequences of
    at most 3 queries, keys before and after too."""
    if splits == "one":
        monkeypatch.setattr(triton_attention, "DECODE_MIN_SPLIT_KEYS", 1 << 20)
    q, k, v, kw = _varlen([1, 3, 2], [40, 0, 60], 4, 1, 64, DECODE_DTYPES[-1], (2, 50), (3, 20))
    got = _compare(q, k, v, backend, causal=True, lse_in_loss=True, **kw)
    assert decode_splits_seen and (decode_splits_seen[0] > 1) == (splits == "several"), decode_splits_seen
    _assert_outside_rows(got, kw)


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
def test_decode_is_bitwise_repeatable(backend, monkeypatch):
    """The combine merges the splits in a fixed order: two runs with several splits give the same bits."""
    q, k, v = _inputs((1, 1, 8, 32), (1, 200, 2, 32), DECODE_DTYPES[-1])
    monkeypatch.setattr(triton_attention, "DECODE_MIN_SPLIT_KEYS", 16)
    with fastlm.use_backend(backend):
        runs = [fastlm.attention(q, k, v, causal=True, return_lse=True) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def _clamped(cu, total):
    """What the kernels make of offsets: each clamped into [0, total], each end at least its start."""
    out = [min(max(cu[0], 0), total)]
    for c in cu[1:]:
        out.append(min(max(c, out[-1]), total))
    return out


# (cu_seqlens_q, cu_seqlens_k, tokens q, tokens k, max_seqlen_q, max_seqlen_k): offsets past the tokens, negative,
# decreasing; each sequence's clamped range still covers every token, so every output element is written.
BAD_OFFSETS = [
    ([0, 1, 5], [0, 40, 200], 2, 50, 1, 48),  # decode: both ends past the tokens
    ([-3, 1, 2], [-5, 20, 50], 2, 50, 1, 48),  # decode: negative starts
    ([0, 1, 2], [0, 30, 10], 2, 30, 1, 48),  # decode: decreasing keys (the second sequence sees none)
    ([0, 4, 40], [0, 6, 99], 30, 30, 30, 30),  # the general kernels: past the tokens
    ([-7, 10, 30], [0, 25, 20], 30, 25, 30, 30),  # negative, decreasing
]


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("case", BAD_OFFSETS, ids=("decode-past", "decode-negative", "decode-decreasing",
                                                    "past", "negative-decreasing"))
def test_bad_device_offsets_stay_inside_the_tensors(case, backend, monkeypatch):
    """Offsets that the host cannot check (on a GPU they are not read back) are clamped by the kernels: q, k, v are
    views in the middle of a buffer whose other elements are 10⁴, which any read outside them would carry into
    the outputs; the outputs equal those of the clamped offsets, forward and backward."""
    monkeypatch.setattr(triton_attention, "DECODE_MIN_SPLIT_KEYS", 16)
    cu_q, cu_k, tq, tk, max_q, max_k = case
    dtype, h, hk, d = DECODE_DTYPES[-1], 4, 2, 32
    gen = generator(7)

    def inside(tokens, heads):
        buf = torch.full((3 * tokens, heads, d), 1e4, dtype=dtype, device=DEVICE)
        view = buf[tokens:2 * tokens]
        view.copy_(torch.randn(view.shape, generator=gen).to(dtype))
        return view

    q, k, v, do = inside(tq, h), inside(tk, hk), inside(tk, hk), inside(tq, h)

    def run(cq, ck):
        cq, ck = (torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in (cq, ck))
        args = (cq, ck, max_q, max_k, d ** -0.5, None, 0, None)
        out, lse = triton_attention.attention_fwd(q, k, v, *args)
        return (out, lse, *triton_attention.attention_bwd(do, q, k, v, out, lse, None, *args))

    got = run(cu_q, cu_k)
    want = run(_clamped(cu_q, tq), _clamped(cu_k, tk))
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert not g.isnan().any(), f"{name}: unwritten elements"
        assert g.abs().masked_fill(torch.isneginf(g), 0).max() < 100, f"{name}: read the buffer around the inputs"
        assert torch.equal(g, w), f"{name}: differs from the clamped offsets' result"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("shape", ((1, 1, 8192), (16, 1, 1024), (4, 4, 3000)), ids=("b1-k8k", "b16-k1k", "b4-q4"))
def test_gpu_decode_split_kv_gqa_32_8(shape, backend):
    """The issue's decode shapes (GQA 32/8, head dim 128, bf16) at shorter caches, with the default split rule."""
    b, sq, sk = shape
    q, k, v = _inputs((b, sq, 32, 128), (b, sk, 8, 128), torch.bfloat16)
    _compare(q, k, v, backend, causal=True)


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("varlen", (False, True), ids=("dense", "varlen"))
def test_decode_batches_past_the_grid_limit_launch_in_chunks(varlen, backend, monkeypatch):
    """Grid axis 2 (the batch) stops at 65535: lowered to 2, five sequences take three launches of the decode
    kernel and of its combine, each on its own slice of the workspace, and give the bits of one launch."""
    monkeypatch.setattr(triton_attention, "DECODE_MIN_SPLIT_KEYS", 16)
    dtype = DECODE_DTYPES[-1]
    if varlen:
        q, k, v, kw = _varlen([1, 2, 0, 1, 2], [40, 33, 5, 0, 64], 2, 1, 32, dtype)
        extra = (kw["cu_seqlens_q"], kw["cu_seqlens_k"], kw["max_seqlen_q"], kw["max_seqlen_k"])
    else:
        q, k, v = _inputs((5, 2, 2, 32), (5, 64, 1, 32), dtype)
        extra = (None, None, 2, 64)

    def run():
        return triton_attention.attention_fwd(q, k, v, *extra, 32 ** -0.5, None, 0, None)

    want = run()
    monkeypatch.setattr(triton_attention, "MAX_GRID_YZ", 2)
    got = run()
    for a, b in zip(got, want):
        assert torch.equal(a.nan_to_num(neginf=-1e30), b.nan_to_num(neginf=-1e30))


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
def test_decode_heads_past_2_31_elements(backend, monkeypatch):
    """A head-major q whose heads are 2³⁰ + 2¹⁰ elements apart: the decode tile's third row (q head 2) starts past
    2³¹, which the kernel's per-row int64 offsets must reach (the buffer's pages are touched only where q lies)."""
    monkeypatch.setattr(triton_attention, "DECODE_MIN_SPLIT_KEYS", 16)
    d, head = 16, (1 << 30) + (1 << 10)
    buf = torch.empty(2 * head + d, dtype=torch.float16, device=DEVICE)
    q = buf.as_strided((1, 1, 3, d), (d, d, head, 1))
    q.copy_(torch.randn(q.shape, generator=generator(8)).to(q.dtype))
    _, k, v = _inputs((1, 1, 3, d), (1, 70, 1, d), torch.float16, seed=9)
    args = (None, None, 1, 70, d ** -0.5, None, 0, None)
    got = triton_attention.attention_fwd(q, k, v, *args)
    want = triton_attention.attention_fwd(q.contiguous(), k, v, *args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
