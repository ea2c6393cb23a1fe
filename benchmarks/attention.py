"""Attention benchmarks: fastlm's triton and cuda backends against PyTorch's SDPA backends (flash, cuDNN,
memory-efficient, math), each forced with `torch.nn.attention.sdpa_kernel`, and FlexAttention. Two families, both
listed in FAMILIES (FAMILY is the first, for a caller that reads one family a module).

attention (training; compute bound: TFLOP/s against the measured bf16 matmul rate). For b sequences of s_q queries
and s_k keys, h query heads of dimension d, as TARGETS.md counts them: the forward is 4·b·h·s_q·s_k·d FLOPs (two
matmuls, QKᵀ and PV, 2 FLOPs a multiply-add), halved when causal (the masked half is not work, whether or not an
implementation skips it); the backward 2.5× the forward (five matmuls: S = QKᵀ again, dP, dV, dQ and dK);
forward+backward 3.5×. Every provider is credited the same FLOPs for a case, so its TFLOP/s is a speed, not a
count of what it computed (the math backend computes the masked half too; its rate is lower for it).
  Sweep: bf16, 16384 tokens a batch (batch = 16384 / seqlen) at seqlen 512 to 16384, hidden 2048 split into
  heads of dimension 64 (32 heads) or 128 (16 heads), causal and not: 24 cases, three modes each.

attention_decode (inference; memory bound: GB/s against the measured copy bandwidth). One new token a sequence
(seqlen_q 1, not causal: it sees the whole cache), GQA with 32 query heads and 8 KV heads of dimension 128, bf16,
batch 1 to 64, KV length 1k to 128k. Bytes per call: the KV cache read once, 2·b·s_k·h_kv·d·2, plus q read and
the output written, 2·b·h_q·d·2. The forward alone is timed (`Family.modes`), on inputs that do not require grad.
  Sweep: batch × KV length, less the combinations whose KV cache exceeds MAX_KV_CACHE_BYTES (16 GiB; that drops
  batch 64 at 128k, 32 GiB): 15 cases.

Layouts. fastlm takes (batch, seqlen, heads, head_dim) (flash-attn's layout), and the inputs are made so. SDPA and
FlexAttention take (batch, heads, seqlen, head_dim): they get `.transpose(1, 2)` views of the same tensors (no
copy; the layout a model has after splitting its projections into heads) and their output is transposed back,
so every provider sees the same inputs and returns the same shape. GQA (decode) goes to SDPA and FlexAttention
as `enable_gqa=True` on the 8-head K and V, never as an expanded copy; a backend that refuses it says "error"
with torch's reason.

Which peer runs where. The math backend computes in float32 for bf16 inputs (torch's default) and materializes
the b·h·s_q·s_k scores, several copies at its peak: it is skipped (rows "skipped", with the reason) where that
float32 score matrix exceeds MATH_MAX_SCORES_BYTES (2 GiB), which leaves it 10 of the 24 cases (seqlen ≤ 1024 at
head dim 64, ≤ 2048 at head dim 128). The memory-efficient backend, the slowest fused one, runs at
EFFICIENT_SEQLENS (4096 and 16384: 8 cases). FlexAttention is `torch.compile(flex_attention)`, compiled anew
per case (dynamic=False), the causal block mask made once per case when the provider is built, outside the timed
calls; each shape costs a compile of its forward and backward kernels, so it runs on FLEX_CASES only (head dim 128
at seqlen 16384, causal and not; in decode, batch 16 at 32k). fastlm, sdpa-flash and sdpa-cudnn run every case.
Correctness: every provider's output (and, in training, the gradients of q, k and v) is checked against
sdpa-flash on the same inputs, within TOLERANCE (relative Frobenius error).

Run time (an estimate; neither family has run on an H100 yet): `estimated_seconds` models what the harness does
for each (case, provider, mode): triton's do_bench makes 1 + 5 calls to size its loops, then fills WARMUP_MS and
REP_MS (at least one call each), and one more call measures peak memory, so a mode costs about
7·t + max(t, 10 ms) + max(t, 40 ms) for a call of t ms (bwd's t includes the untimed forward before it), plus
EST_MODE_OVERHEAD_S. The call times come from assumed H100 rates (EST_TFLOPS, EST_GBPS: below the published
numbers, so that part errs long), plus a set-up per case and provider (one fwd+bwd, and compiles: about 10 s a
shape for FlexAttention, 0.5 s of cuDNN graph builds), a compile per (head dim, causal) variant of fastlm's Triton
kernels (8 s; they have fixed configurations, no autotuning), and 15 s of process start, imports and probes.
That gives about 149 s for attention (the timed modes and set-ups 82 s, FlexAttention's two compiles 20 s,
fastlm's four Triton variants 32 s, start 15 s) and about 51 s for attention_decode; --quick (2 cases each)
about 37 s and 21 s. The tests check the estimate against ATTENTION_BUDGET_S (150 s) and DECODE_BUDGET_S (60 s).
The compile costs are the guesses most likely to be off: the first H100 run's `setup_s` per row is what to
correct EST_ with.
"""

import contextlib
import importlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import harness
from benchmarks.harness import Case, Family, Provider

TOKENS = 16384  # batch × seqlen of every training case
HIDDEN = 2048  # heads × head_dim of every training case
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
QUICK = ((4096, 128, True), (1024, 64, False))  # (seqlen, head_dim, causal)

DECODE_BATCHES = (1, 4, 16, 64)
DECODE_KV_LENS = (1024, 8192, 32768, 131072)
DECODE_HEADS_Q = 32
DECODE_HEADS_KV = 8
DECODE_HEAD_DIM = 128
# (batch, kv length): issue 12's two decode targets (GQA 32/8, d128), the cases `scripts/gpu_check.sh --op
# attention_decode` times; batch 1 × 64k is outside the full sweep's grid.
QUICK_DECODE = ((1, 65536), (16, 8192))
MAX_KV_CACHE_BYTES = 16 << 30

# The math backend's float32 score matrix, b·h·s_q·s_k·4 bytes: its fwd+bwd holds about five such (the scores, the
# probabilities, the causal mask's copy, and their two gradients), 10 GiB at this cap.
MATH_MAX_SCORES_BYTES = 2 << 30
EFFICIENT_SEQLENS = (4096, 16384)  # the memory-efficient backend, the slowest fused one, at these only
WGMMA_SEQLENS = (4096, 8192)  # the cuda backend's wgmma forward (fastlm-cuda-wgmma), at these only
# The other Hopper forwards (fastlm._cuda.ATTN_HOPPER_FWD): the wgmma kernel's serial loop (fastlm-cuda-wgmma-serial)
# and the warp-specialized TMA kernel without and with its pingpong (fastlm-cuda-wgmma-ws, -pingpong), beside the
# overlapped loop at (seqlen, head_dim, causal): the quick run's headline case.
WGMMA_FORM_CASES = {(4096, 128, True)}
FLEX_CASES = {(16384, 128)}  # (seqlen, head_dim): both causal and not
FLEX_DECODE_CASES = {(16, 32768)}  # (batch, kv length)

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3}
REFERENCE = "sdpa-flash"
PROBE_SHAPE = (1, 128, 2, 64)  # (batch, seqlen, heads, head_dim) of the tiny call that asks a fastlm backend
PROBE_DECODE_KV = 512  # KV length of the decode probe: one query against it, DECODE_HEADS_* heads of DECODE_HEAD_DIM

# The run-time model (see the header). Assumed H100 rates, on the slow side of the published ones (TARGETS.md):
# TFLOP/s forward and backward; GB/s of a decode forward; a call is never shorter than EST_MIN_CALL_MS.
EST_TFLOPS = {"fastlm-triton": (250, 180), "fastlm-cuda": (300, 180), "fastlm-cuda-wgmma": (300, 180),
              "fastlm-cuda-wgmma-serial": (300, 180), "fastlm-cuda-wgmma-ws": (300, 180),
              "fastlm-cuda-wgmma-pingpong": (300, 180),
              "sdpa-flash": (300, 250), "sdpa-cudnn": (450, 350), "sdpa-efficient": (150, 90), "sdpa-math": (25, 25),
              "flex": (250, 180)}
EST_DENSE = {"sdpa-math"}  # computes the masked half of a causal case too
EST_GBPS = 1500
EST_MIN_CALL_MS = 0.03
EST_SETUP_S = {"flex": 10.0, "sdpa-cudnn": 0.5}  # per case and provider; the others EST_SETUP_DEFAULT_S
EST_SETUP_DEFAULT_S = 0.1
EST_VARIANT_S = {"attention": 8.0, "attention_decode": 3.0}  # fastlm's Triton kernels, per variant (see variants)
EST_MODE_OVERHEAD_S = 0.03  # per (case, provider, mode): Python, synchronizations, the allocator's cache emptied
EST_CASE_S = 0.2  # per case: its inputs drawn, the reference's outputs kept and compared
EST_START_S = 15.0  # per family: the process, imports, the ceiling's probe, the providers' probes
ATTENTION_BUDGET_S = 150
DECODE_BUDGET_S = 60


# ---------------------------------------------------------------------------------------------- cases and work


def _case(seqlen, head_dim, causal, tokens=TOKENS, hidden=HIDDEN):
    return Case("attention", torch.bfloat16, {"seqlen": seqlen, "tokens": tokens, "heads": hidden // head_dim,
                                              "head_dim": head_dim, "causal": causal})


def _decode_case(batch, kv_len):
    return Case("attention_decode", torch.bfloat16, {"batch": batch, "seqlen_q": 1, "seqlen_k": kv_len,
                                                     "heads_q": DECODE_HEADS_Q, "heads_kv": DECODE_HEADS_KV,
                                                     "head_dim": DECODE_HEAD_DIM})


def attention_cases(quick: bool) -> list:
    """24 cases (2 with --quick); each runs 8 providers × 3 modes, less the skipped peers."""
    if quick:
        return [_case(*c) for c in QUICK]
    return [_case(s, d, causal) for d in HEAD_DIMS for causal in (False, True) for s in SEQLENS]


def batch_of(case: Case) -> int:
    return case.params["tokens"] // case.params["seqlen"]


def attention_flops(case: Case, mode: str) -> int:
    """FLOPs credited to one call: 4·b·h·s²·d forward, halved when causal; backward 2.5×, fwd+bwd 3.5×."""
    p = case.params
    fwd = 4 * batch_of(case) * p["heads"] * p["seqlen"] * p["seqlen"] * p["head_dim"]
    if p["causal"]:
        fwd //= 2
    return {"fwd": fwd, "bwd": fwd * 5 // 2, "fwd+bwd": fwd * 7 // 2}[mode]


def math_scores_bytes(case: Case) -> int:
    """Bytes of the float32 scores the math backend materializes, b·h·s_q·s_k·4."""
    p = case.params
    return batch_of(case) * p["heads"] * p["seqlen"] * p["seqlen"] * 4


def kv_cache_bytes(case: Case) -> int:
    """Bytes of K and V together, 2·b·s_k·h_kv·d·(dtype size)."""
    p = case.params
    return 2 * p["batch"] * p["seqlen_k"] * p["heads_kv"] * p["head_dim"] * case.dtype.itemsize


def decode_grid() -> list:
    """Every decode case before the memory cap."""
    return [_decode_case(b, s) for b in DECODE_BATCHES for s in DECODE_KV_LENS]


def decode_cases(quick: bool) -> list:
    """15 cases (2 with --quick); each runs 6 providers, forward only, less the skipped peers."""
    if quick:
        return [_decode_case(*c) for c in QUICK_DECODE]
    return [c for c in decode_grid() if kv_cache_bytes(c) <= MAX_KV_CACHE_BYTES]


def decode_bytes(case: Case, mode: str) -> int:
    """Bytes one decode call must move: K and V read once, q read once, the output written once."""
    if mode != "fwd":
        raise ValueError(f"attention_decode times the forward only, not {mode!r}")
    p = case.params
    q_and_out = 2 * p["batch"] * p["seqlen_q"] * p["heads_q"] * p["head_dim"] * case.dtype.itemsize
    return kv_cache_bytes(case) + q_and_out


# ---------------------------------------------------------------------------------------------- inputs


def attention_inputs(case: Case, device, gen):
    """q, k, v of shape (batch, seqlen, heads, head_dim), random normal, requiring grad; the output's gradient."""
    p = case.params
    shape = (batch_of(case), p["seqlen"], p["heads"], p["head_dim"])

    def randn():
        return torch.randn(shape, generator=gen, device=device, dtype=case.dtype)

    q, k, v = randn(), randn(), randn()
    return {"q": q.requires_grad_(), "k": k.requires_grad_(), "v": v.requires_grad_()}, (randn(),)


def decode_inputs(case: Case, device, gen):
    """q (batch, 1, heads_q, head_dim) and the KV cache k, v (batch, seqlen_k, heads_kv, head_dim), random normal,
    not requiring grad; no output gradient (forward only)."""
    p = case.params

    def randn(seqlen, heads):
        return torch.randn((p["batch"], seqlen, heads, p["head_dim"]), generator=gen, device=device,
                           dtype=case.dtype)

    inputs = {"q": randn(p["seqlen_q"], p["heads_q"]), "k": randn(p["seqlen_k"], p["heads_kv"]),
              "v": randn(p["seqlen_k"], p["heads_kv"])}
    return inputs, ()


# ---------------------------------------------------------------------------------------------- providers


def _causal(case: Case) -> bool:
    return case.params.get("causal", False)


def _gqa(case: Case) -> bool:
    p = case.params
    return p.get("heads_q", p.get("heads")) != p.get("heads_kv", p.get("heads"))


def _probe(device, decode: bool):
    """One tiny call of fastlm.attention under the current backend: a causal training call with a gradient, or a
    decode call (one query against a KV cache, GQA)."""
    import fastlm

    if decode:
        q = torch.zeros((1, 1, DECODE_HEADS_Q, DECODE_HEAD_DIM), device=device, dtype=torch.bfloat16)
        kv = torch.zeros((1, PROBE_DECODE_KV, DECODE_HEADS_KV, DECODE_HEAD_DIM), device=device, dtype=torch.bfloat16)
        return fastlm.attention(q, kv, kv)
    q = torch.zeros(PROBE_SHAPE, device=device, dtype=torch.bfloat16, requires_grad=True)
    return fastlm.attention(q, q, q, causal=True)


def unavailable_reason(backend: str, device, decode: bool = False) -> str:
    """Why fastlm's `backend` cannot run attention on `device`, or "" when it can (harness.fastlm_unavailable_reason
    with a tiny training or decode call)."""
    return harness.fastlm_unavailable_reason("attention", backend, lambda: _probe(device, decode))


def _fastlm_available(backend, decode):
    def check():
        why = unavailable_reason(backend, torch.device("cuda"), decode)
        return not why, why

    return check


def _fastlm(case):
    import fastlm

    causal = _causal(case)

    def fn(i):
        return (fastlm.attention(i["q"], i["k"], i["v"], causal=causal),)

    return fn


def _cuda_wgmma_available():
    from fastlm import _cuda

    ok, why = _fastlm_available("cuda", False)()
    if ok and not _cuda.attention_hopper_supported(HEAD_DIMS[0], torch.device("cuda")):
        return False, "the wgmma forward kernel needs compute capability 9.0 and a build with sm_90a code"
    return ok, why


def _cuda_wgmma_context(form="overlap"):
    """The cuda backend with ATTN_HOPPER and ATTN_HOPPER_BWD on, and the Hopper forward ATTN_HOPPER_FWD = form."""

    @contextlib.contextmanager
    def context():
        from fastlm import _cuda

        before = _cuda.ATTN_HOPPER, _cuda.ATTN_HOPPER_BWD, _cuda.ATTN_HOPPER_FWD
        _cuda.ATTN_HOPPER = _cuda.ATTN_HOPPER_BWD = True
        _cuda.ATTN_HOPPER_FWD = form
        try:
            with harness.fastlm_context("cuda")():
                yield
        finally:
            _cuda.ATTN_HOPPER, _cuda.ATTN_HOPPER_BWD, _cuda.ATTN_HOPPER_FWD = before

    return context


def _cuda_wgmma_skip(case):
    if case.params["seqlen"] not in WGMMA_SEQLENS:
        return f"timed at seqlen {', '.join(map(str, WGMMA_SEQLENS))} only (the run's time budget)"
    return ""


def _cuda_wgmma_form_skip(case):
    if (case.params["seqlen"], case.params["head_dim"], case.params["causal"]) not in WGMMA_FORM_CASES:
        return (f"timed at (seqlen, head_dim, causal) in {sorted(WGMMA_FORM_CASES)} only (the run's time budget), "
                "beside fastlm-cuda-wgmma's overlapped loop")
    return ""


def _heads_first(i):
    """SDPA's and FlexAttention's (batch, heads, seqlen, head_dim) views of the inputs."""
    return i["q"].transpose(1, 2), i["k"].transpose(1, 2), i["v"].transpose(1, 2)


def _sdpa(case):
    causal, gqa = _causal(case), _gqa(case)

    def fn(i):
        out = F.scaled_dot_product_attention(*_heads_first(i), is_causal=causal, enable_gqa=gqa)
        return (out.transpose(1, 2),)

    return fn


def _sdpa_available(backend):
    """Usable when a tiny causal call on inputs requiring grad runs on the GPU with only this backend allowed."""

    def check():
        if not torch.cuda.is_available():
            return False, "no CUDA GPU"
        q = torch.zeros((1, 2, 128, 64), device="cuda", dtype=torch.bfloat16, requires_grad=True)
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
        except RuntimeError as e:
            return False, f"SDPA {backend.name} cannot run here ({str(e).strip().splitlines()[0][:200]})"
        return True, ""

    return check


def _sdpa_context(backend):
    return lambda: sdpa_kernel(backend)


def _math_skip(case):
    scores = math_scores_bytes(case)
    if scores <= MATH_MAX_SCORES_BYTES:
        return ""
    return (f"its float32 scores, b·h·s²·4 = {scores / 2**30:.0f} GiB, exceed MATH_MAX_SCORES_BYTES "
            f"({MATH_MAX_SCORES_BYTES / 2**30:.0f} GiB)")


def _efficient_skip(case):
    if case.op == "attention_decode" or case.params["seqlen"] in EFFICIENT_SEQLENS:
        return ""
    return f"timed at seqlen {', '.join(map(str, EFFICIENT_SEQLENS))} only, to keep the family within its time budget"


def _flex_available():
    try:
        importlib.import_module("torch.nn.attention.flex_attention")
    except Exception as e:  # noqa: BLE001 - any import failure makes the provider missing, with its reason
        return False, f"torch.nn.attention.flex_attention not importable ({type(e).__name__}: {e})"
    return True, ""


def _causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _flex(case):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # A fresh compile per case: Dynamo keeps its variants on the code object every case shares, and past torch's
    # recompile limit a later case would silently run eager.
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    gqa = _gqa(case)
    mask = None
    if _causal(case):
        s = case.params["seqlen"]
        mask = create_block_mask(_causal_mask, None, None, s, s,
                                 device=torch.device("cuda", torch.cuda.current_device()))

    def fn(i):
        return (compiled(*_heads_first(i), block_mask=mask, enable_gqa=gqa).transpose(1, 2),)

    return fn


def _flex_skip(case):
    if case.op == "attention_decode":
        key, cases, what = (case.params["batch"], case.params["seqlen_k"]), FLEX_DECODE_CASES, "(batch, kv length)"
    else:
        key, cases, what = (case.params["seqlen"], case.params["head_dim"]), FLEX_CASES, "(seqlen, head_dim)"
    if key in cases:
        return ""
    return (f"FlexAttention compiles every shape anew (about 10 s): timed at {what} in {sorted(cases)} only, to "
            "keep the family within its time budget")


def _providers(decode):
    def sdpa(name, backend, **kw):
        return Provider(name, _sdpa, _sdpa_available(backend), _sdpa_context(backend), **kw)

    out = [
        Provider("fastlm-triton", _fastlm, _fastlm_available("triton", decode), harness.fastlm_context("triton"),
                 backend="triton"),
        Provider("fastlm-cuda", _fastlm, _fastlm_available("cuda", decode), harness.fastlm_context("cuda"),
                 backend="cuda"),
        # What `auto` runs when the table puts torch's SDPA first (fastlm.ops.attention._sdpa): the same call.
        sdpa("sdpa-flash", SDPBackend.FLASH_ATTENTION, native="torch:sdpa-flash"),
        sdpa("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION, native="torch:sdpa-cudnn"),
        sdpa("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION, skip=_efficient_skip),
    ]
    if not decode:
        # The cuda backend with its forward and backward on wgmma (fastlm._cuda.ATTN_HOPPER, ATTN_HOPPER_BWD: off by
        # default until these rows say they win): a peer, so that the dispatch table's "cuda" stays what users get.
        # Its Hopper forwards (ATTN_HOPPER_FWD): the overlapped loop as fastlm-cuda-wgmma, the serial loop and the
        # warp-specialized kernel (without and with its pingpong) beside it on the headline case, to say which to keep.
        out[2:2] = [Provider("fastlm-cuda-wgmma", _fastlm, _cuda_wgmma_available, _cuda_wgmma_context("overlap"),
                             skip=_cuda_wgmma_skip)] + [
            Provider(f"fastlm-cuda-wgmma-{form}", _fastlm, _cuda_wgmma_available, _cuda_wgmma_context(form),
                     skip=_cuda_wgmma_form_skip) for form in ("serial", "ws", "pingpong")]
        out.append(sdpa("sdpa-math", SDPBackend.MATH, skip=_math_skip))
    out.append(Provider("flex", _flex, _flex_available, skip=_flex_skip))
    return out


# ---------------------------------------------------------------------------------------------- run-time estimate


def _call_ms(family: Family, case: Case, provider: str) -> dict:
    """Assumed H100 time of one timed call per mode, in ms; bwd's includes the untimed forward before it."""
    if family.metric == "bytes":
        return {"fwd": max(family.work(case, "fwd") / (EST_GBPS * 1e6), EST_MIN_CALL_MS)}
    dense = Case(case.op, case.dtype, dict(case.params, causal=False)) if provider in EST_DENSE else case
    fwd_rate, bwd_rate = EST_TFLOPS[provider]
    fwd = max(family.work(dense, "fwd") / (fwd_rate * 1e9), EST_MIN_CALL_MS)
    both = fwd + max(family.work(dense, "bwd") / (bwd_rate * 1e9), EST_MIN_CALL_MS)
    return {"fwd": fwd, "bwd": both, "fwd+bwd": both}


def _mode_s(ms: float) -> float:
    """Wall seconds the harness spends timing one mode whose timed call takes `ms` (see the header)."""
    return (7 * ms + max(ms, harness.WARMUP_MS) + max(ms, harness.REP_MS)) / 1e3 + EST_MODE_OVERHEAD_S


def variants(cases) -> set:
    """The kernel variants fastlm's Triton backend compiles for these cases: one per (head_dim, causal)."""
    return {(c.params["head_dim"], _causal(c)) for c in cases}


def estimated_seconds(family: Family, quick: bool = False) -> float:
    """Estimated wall time of the family on an H100 (an estimate, see the header)."""
    cases = family.cases(quick)
    total = EST_START_S + EST_VARIANT_S[family.name] * len(variants(cases))
    for case in cases:
        total += EST_CASE_S
        for p in family.providers:
            if p.skip(case):
                continue
            ms = _call_ms(family, case, p.name)
            total += EST_SETUP_S.get(p.name, EST_SETUP_DEFAULT_S) + ms[family.modes[-1]] / 1e3
            total += sum(_mode_s(ms[m]) for m in family.modes)
    return total


# ---------------------------------------------------------------------------------------------- families


FAMILY = Family(
    name="attention",
    metric="flops",
    cases=attention_cases,
    providers=_providers(decode=False),
    make_inputs=attention_inputs,
    work=attention_flops,
    reference=REFERENCE,
    x_key="seqlen",
    tolerance=TOLERANCE,
    notes=(
        "fastlm: `fastlm.attention(q, k, v, causal=...)` on (batch, seqlen, heads, head_dim) inputs, default "
        "scale 1/√head_dim; batch = tokens / seqlen.",
        "sdpa-*: `F.scaled_dot_product_attention` with one backend forced by `sdpa_kernel`, on `.transpose(1, 2)` "
        "views of the same tensors (no copy), its output transposed back. sdpa-math computes in float32 for bf16 "
        f"and is skipped where its float32 scores exceed {MATH_MAX_SCORES_BYTES >> 30} GiB.",
        "flex: `torch.compile(flex_attention, dynamic=False, fullgraph=True)`, compiled anew per case, causal by a "
        f"block mask made once per case outside the timed calls; timed at (seqlen, head_dim) in {sorted(FLEX_CASES)}"
        " only (a compile per shape).",
        "bf16 random normal q, k, v and output gradient; outputs and the q, k, v gradients checked against "
        f"{REFERENCE}. FLOPs: 4·b·h·s²·d forward, halved when causal; backward 2.5×, fwd+bwd 3.5×; the same for "
        "every provider, whatever it computes.",
    ),
)

DECODE_FAMILY = Family(
    name="attention_decode",
    metric="bytes",
    cases=decode_cases,
    providers=_providers(decode=True),
    make_inputs=decode_inputs,
    work=decode_bytes,
    reference=REFERENCE,
    x_key="seqlen_k",
    tolerance=TOLERANCE,
    modes=("fwd",),
    notes=(
        "One query a sequence against a KV cache, not causal; GQA, 32 query heads on 8 KV heads of dimension 128; "
        f"bf16; KV caches over {MAX_KV_CACHE_BYTES >> 30} GiB left out. Forward only, inputs not requiring grad.",
        "fastlm: `fastlm.attention(q, k, v)` on (batch, seqlen, heads, head_dim) inputs (its cuda backend takes its "
        "split-KV decode kernel here). sdpa-*: `F.scaled_dot_product_attention(..., enable_gqa=True)`, one backend "
        "forced by `sdpa_kernel`, on `.transpose(1, 2)` views; the KV heads are never expanded. flex: compiled "
        f"`flex_attention(..., enable_gqa=True)`, at (batch, kv length) in {sorted(FLEX_DECODE_CASES)} only.",
        f"Bytes: K and V read once (2·b·s_k·h_kv·d·2) plus q and the output. Checked against {REFERENCE}.",
    ),
)

FAMILIES = (FAMILY, DECODE_FAMILY)
