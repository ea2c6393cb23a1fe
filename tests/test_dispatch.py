"""`auto`'s routing (fastlm._backend.resolve with fastlm._dispatch_table): the measured order per op and device,
torch's own kernels ("torch:eager", "torch:sdpa-*") for the calls they cover and only those, and what those routes
compute. The device is faked (a CUDA device on a machine without one): resolve only asks its name."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from fastlm import _backend, _cuda, _dispatch_table, reference
from conftest import assert_by_rule, generator, simulated_runs

attention_op = importlib.import_module("fastlm.ops.attention")  # fastlm.ops.attention is also the function
norm_op = importlib.import_module("fastlm.ops.norm")

CUDA = torch.device("cuda", 0)


@pytest.fixture
def measured(monkeypatch):
    """A fake GPU named "Test GPU" with its measured table; the kernel backends count as available on it."""
    monkeypatch.setattr(_backend, "device_index", lambda device: 0)
    monkeypatch.setattr(_backend, "device_name", lambda index: "Test GPU")
    monkeypatch.setitem(_backend._REASONS, "cuda", lambda device, dtype: None)
    monkeypatch.setattr(_cuda, "attention_unsupported", lambda *args: None)
    # torch's own test of whether an SDPA backend takes a call says no for CPU tensors: yes here, unless a test
    # says otherwise.
    monkeypatch.setattr(torch.backends.cuda, "can_use_cudnn_attention", lambda params, debug=False: True)
    monkeypatch.setattr(torch.backends.cuda, "can_use_flash_attention", lambda params, debug=False: True)
    monkeypatch.setattr(attention_op, "_SDPA_VERDICTS", {})  # torch's verdicts, as the patched tests give them
    table = {}
    monkeypatch.setitem(_dispatch_table.MEASURED, "Test GPU", table)
    return table


def _norm_resolve(x_dtype, w_dtype, op="rms_norm", offset=0.0):
    x = torch.empty(2, 8, dtype=x_dtype)
    w = torch.empty(8, dtype=w_dtype)
    return _backend.resolve(op, CUDA, x_dtype, norm_op._native_unsupported(x, w, None, offset))


def test_auto_takes_torchs_own_norm_where_it_was_measured_fastest(measured):
    measured["rms_norm"] = ["torch:eager", "cuda", "triton"]
    assert _norm_resolve(torch.bfloat16, torch.bfloat16) == "torch:eager"
    # A float32 weight on bf16 x: torch's fused norm wants one dtype, so the next measured choice runs.
    assert _norm_resolve(torch.bfloat16, torch.float32) == "cuda"
    # Gemma's offset: torch's rms_norm has none (offset + weight rounded in bf16 would differ from fastlm's).
    assert _norm_resolve(torch.bfloat16, torch.bfloat16, offset=1.0) == "cuda"


def test_every_measured_table_names_real_routes():
    """Each device's table (copied by hand from a benchmark run, or interim from another harness) names only ops
    that resolve a backend, each implementation once, torch's own only where the op has that route, and at least
    one fastlm kernel backend: a call torch's kernel cannot take goes to a kernel, not to the reference."""
    ops = {"attention", "attention_decode", "layer_norm", "rms_norm", "cross_entropy", "linear_cross_entropy",
           "swiglu", "geglu", "rotary_embedding"}
    for device, table in _dispatch_table.MEASURED.items():
        for op, order in table.items():
            assert op in ops, (device, op)
            assert len(set(order)) == len(order), (device, op)
            assert all(name in ("triton", "cuda") or name in _backend.NATIVE.get(op, ()) for name in order), (
                device, op, order)
            assert {"triton", "cuda"} & set(order), (device, op)


def test_the_h200_table_routes_what_was_measured_fastest(measured, monkeypatch):
    """On an H200, without a benchmark run yet: the interim table sends norms to torch's eager kernels and
    attention to SDPA's cuDNN backend (1.9-4.8x faster there when measured), the calls SDPA cannot take to the
    cuda kernels, cross-entropy to the cuda backend; ops it does not list keep the default order."""
    monkeypatch.setattr(_backend, "device_name", lambda index: "NVIDIA H200")
    assert _norm_resolve(torch.bfloat16, torch.bfloat16) == "torch:eager"
    assert _norm_resolve(torch.bfloat16, torch.bfloat16, "layer_norm") == "torch:eager"
    q = torch.empty(1, 32, 4, 64, dtype=torch.bfloat16)
    k = torch.empty(1, 32, 2, 64, dtype=torch.bfloat16)
    assert _attention_resolve(q, k, k, right=0) == "torch:sdpa-cudnn"
    assert _attention_resolve(q, k, k, right=0, softcap=30.0) == "cuda"
    assert _attention_resolve(q[:, :1], k, k) == "torch:sdpa-flash"  # decoding: FA2 measured ahead there
    assert _backend.resolve("cross_entropy", CUDA, torch.bfloat16) == "cuda"
    assert _backend.resolve("swiglu", CUDA, torch.bfloat16) == _dispatch_table.UNMEASURED_ORDER[0]


def test_an_unmeasured_op_or_device_keeps_the_default_order(measured):
    assert _norm_resolve(torch.bfloat16, torch.bfloat16, "layer_norm") == _dispatch_table.UNMEASURED_ORDER[0]


def test_a_torch_route_is_taken_only_for_ops_that_have_one(measured):
    measured["cross_entropy"] = ["torch:eager", "cuda"]
    assert _backend.resolve("cross_entropy", CUDA, torch.bfloat16) == "cuda"
    measured["rms_norm"] = ["torch:sdpa-cudnn", "triton"]  # a name that is not rms_norm's
    assert _norm_resolve(torch.bfloat16, torch.bfloat16) == "triton"


def test_an_explicit_backend_never_takes_a_torch_route(measured):
    measured["rms_norm"] = ["torch:eager", "cuda"]
    with _backend.use_backend("triton"):
        assert _norm_resolve(torch.bfloat16, torch.bfloat16) == "triton"


def _attention_resolve(q, k, v, cu=None, left=None, right=None, softcap=0.0, need_lse=False, deterministic=False):
    unsupported = attention_op._kernel_unsupported(q, k, v, cu, left, right, softcap, need_lse, deterministic)
    op = "attention_decode" if q.shape[1] <= 16 else "attention"
    return _backend.resolve(op, CUDA, q.dtype, unsupported)


@pytest.mark.parametrize("what, kwargs, covered", [
    ("causal, as many queries as keys", dict(right=0), True),
    ("not causal", dict(), True),
    ("the log-sum-exp asked for", dict(right=0, need_lse=True), False),
    ("a sliding window", dict(left=16, right=0), False),
    ("softcap", dict(softcap=30.0), False),
    ("deterministic", dict(deterministic=True), False),
])
def test_sdpa_takes_the_attention_calls_it_covers(measured, what, kwargs, covered):
    measured["attention"] = ["torch:sdpa-cudnn", "triton", "cuda"]
    q = k = v = torch.empty(1, 32, 4, 64, dtype=torch.bfloat16)
    assert _attention_resolve(q, k, v, **kwargs) == ("torch:sdpa-cudnn" if covered else "triton"), what


def test_sdpa_takes_causal_calls_only_when_both_alignments_agree(measured):
    measured["attention_decode"] = ["torch:sdpa-flash", "triton"]
    k = torch.empty(1, 40, 4, 64, dtype=torch.bfloat16)
    # Four queries at the end of 40 keys, causal bottom-right (fastlm's): query i sees keys ≤ 36 + i; SDPA's
    # top-left causal would let it see i + 1. No SDPA mask is equal: not covered.
    q4 = torch.empty(1, 4, 4, 64, dtype=torch.bfloat16)
    assert _attention_resolve(q4, k, k, right=0) == "triton"
    assert _attention_resolve(q4, k, k) == "torch:sdpa-flash"
    # One query (a decode step): its causal mask hides nothing, so SDPA without a mask is the same call.
    q1 = torch.empty(1, 1, 4, 64, dtype=torch.bfloat16)
    assert _attention_resolve(q1, k, k, right=0) == "torch:sdpa-flash"
    assert attention_op._sdpa_causal(q1, k, 0) is False and attention_op._sdpa_causal(q4, k, 0) is None


def test_sdpa_is_taken_only_where_torch_says_its_backend_runs(measured, monkeypatch):
    measured["attention"] = ["torch:sdpa-cudnn", "cuda", "triton"]
    q = k = v = torch.empty(1, 32, 4, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.backends.cuda, "can_use_cudnn_attention", lambda params, debug=False: False)
    assert _attention_resolve(q, k, v, right=0) == "cuda"
    monkeypatch.setattr(torch.backends.cuda, "can_use_cudnn_attention", lambda params, debug=False: True)
    # float32: flash and cuDNN take 16-bit inputs only (SDPA would fall back to its math backend).
    q32 = torch.empty(1, 32, 4, 64)
    assert _attention_resolve(q32, q32, q32, right=0) == "cuda"


def test_torchs_verdict_on_a_sdpa_route_is_asked_once_per_kind_of_call(measured, monkeypatch):
    """`auto` keeps torch's can_use_* verdict for a call and asks again when anything the verdict reads differs:
    sizes, strides, dtype, whether a gradient is recorded, the backend's global switch. A stale verdict would send
    a call to a backend that cannot run it, or keep one from a backend the user switched back on."""
    measured["attention"] = ["torch:sdpa-flash", "triton"]
    asked = []

    def can_use(params, debug=False):  # as on an sm86-89 GPU for some head dims: not for training
        training = torch.is_grad_enabled() and params.query.requires_grad
        asked.append((tuple(params.query.shape), params.query.stride(), training))
        return not training

    monkeypatch.setattr(torch.backends.cuda, "can_use_flash_attention", can_use)
    q = k = v = torch.empty(1, 32, 4, 64, dtype=torch.bfloat16)
    for _ in range(3):
        assert _attention_resolve(q, k, v, right=0) == "torch:sdpa-flash"
    assert len(asked) == 1
    # Another kind of call: each is asked once.
    wide = torch.empty(1, 32, 8, 64, dtype=torch.bfloat16)[:, :, :4]  # q's shape, other strides
    grad = q.clone().requires_grad_()
    others = [(wide, k, v), (torch.empty(1, 48, 4, 64, dtype=torch.bfloat16),) * 3, (q.half(), k.half(), v.half())]
    for args in others:
        for _ in range(2):
            assert _attention_resolve(*args, right=0) == "torch:sdpa-flash"
    assert len(asked) == 1 + len(others)
    for _ in range(2):
        assert _attention_resolve(grad, k, v, right=0) == "triton"
    assert len(asked) == 2 + len(others)
    with torch.no_grad():  # no gradient recorded: q's kind of call, whose verdict is kept
        assert _attention_resolve(grad, k, v, right=0) == "torch:sdpa-flash"
    assert len(asked) == 2 + len(others)
    # The user switches the flash backend off: asked again (torch's own check then says no).
    monkeypatch.setattr(torch.backends.cuda, "can_use_flash_attention", lambda params, debug=False: bool(
        asked.append("off")) or torch.backends.cuda.flash_sdp_enabled())
    was = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        assert _attention_resolve(q, k, v, right=0) == "triton"
    finally:
        torch.backends.cuda.enable_flash_sdp(was)
    assert asked[-1] == "off"
    assert _attention_resolve(q, k, v, right=0) == "torch:sdpa-flash"  # the first verdict again, switched on


def test_the_sdpa_verdicts_stay_bounded(measured, monkeypatch):
    """Shapes that never repeat (a KV cache growing a token a step) must not grow the verdicts without end."""
    measured["attention_decode"] = ["torch:sdpa-flash", "triton"]
    monkeypatch.setattr(attention_op, "_SDPA_VERDICTS_MAX", 8)
    q = torch.empty(1, 1, 4, 64, dtype=torch.bfloat16)
    for n in range(1, 30):
        kv = torch.empty(1, n, 4, 64, dtype=torch.bfloat16)
        assert _attention_resolve(q, kv, kv, right=0) == "torch:sdpa-flash"
        assert 1 <= len(attention_op._SDPA_VERDICTS) <= 8


def test_a_decode_call_takes_the_training_order_when_decode_was_not_measured(measured):
    measured["attention"] = ["cuda", "triton"]
    q1, k = torch.empty(1, 1, 4, 64, dtype=torch.bfloat16), torch.empty(1, 40, 4, 64, dtype=torch.bfloat16)
    assert _attention_resolve(q1, k, k) == "cuda"


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("is_rms", [False, True])
def test_the_torch_norm_route_computes_the_norm(is_rms, residual):
    g = generator()
    x, r = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    res = r if residual else None
    got = norm_op._native(x, w, None if is_rms else b, res, 1e-5, is_rms)

    def torch_norm(x=x, w=w, b=b, r=res):
        if is_rms:
            return reference.rms_norm(x, w, 1e-5, r)
        return reference.layer_norm(x, w, b, 1e-5, r)

    exact = torch_norm(*(t.double() if t is not None else None for t in (x, w, b, res)))
    theirs, sims = torch_norm(), simulated_runs(torch_norm, samples=3)
    as_tuple = (lambda o: o) if residual else (lambda o: (o,))
    for i, (a, e, t) in enumerate(zip(as_tuple(got), as_tuple(exact), as_tuple(theirs))):
        assert_by_rule(f"output {i}", a, e, t, samples=[as_tuple(sim)[i] for sim in sims])


@pytest.mark.parametrize("causal", [False, True])
def test_the_sdpa_route_computes_attention_in_fastlms_layout(causal):
    g = generator()
    q = torch.randn(2, 24, 4, 16, generator=g)
    k, v = torch.randn(2, 24, 2, 16, generator=g), torch.randn(2, 24, 2, 16, generator=g)
    got = attention_op._sdpa(q, k, v, 0.3, 0 if causal else None, "torch:sdpa-flash")
    torch_attention = lambda q=q, k=k, v=v: reference.attention(q, k, v, causal=causal, scale=0.3)  # noqa: E731
    exact = torch_attention(q.double(), k.double(), v.double())
    assert_by_rule("out", got, exact, torch_attention(), samples=simulated_runs(torch_attention, samples=3))
    # Exactly torch's own call in torch's layout: the route only transposes.
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         scale=0.3, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def _sdp_flags():
    return [enabled() for enabled, _, _ in attention_op._SDP_SWITCHES]


@pytest.mark.parametrize("fails", [False, True])
def test_the_sdpa_route_enables_only_its_backend_and_restores_the_flags(monkeypatch, fails):
    assert attention_op._SDP_SWITCHES is not None, "this torch's SDPA flags table is read directly (_sdp_switches)"
    switches = attention_op._SDP_SWITCHES
    before = _sdp_flags()
    # A state unlike the default (math off, cuDNN on), so that restoring it is not restoring the defaults.
    for (_, enable, backend), on in zip(switches, before):
        enable(backend != torch.nn.attention.SDPBackend.MATH)
    seen = []

    def sdpa(*args, **kwargs):
        seen.append({backend: enabled() for enabled, _, backend in switches})
        if fails:
            raise RuntimeError("no kernel")
        return torch.zeros_like(args[0])

    monkeypatch.setattr(attention_op.F, "scaled_dot_product_attention", sdpa)
    q = torch.randn(1, 4, 2, 8)
    try:
        state = _sdp_flags()
        if fails:
            with pytest.raises(RuntimeError, match="no kernel"):
                attention_op._sdpa(q, q, q, 0.3, None, "torch:sdpa-cudnn")
        else:
            assert attention_op._sdpa(q, q, q, 0.3, None, "torch:sdpa-cudnn").shape == q.shape
        assert seen == [{backend: backend == torch.nn.attention.SDPBackend.CUDNN_ATTENTION
                         for _, _, backend in switches}]
        assert _sdp_flags() == state
    finally:
        for (_, enable, _), on in zip(switches, before):
            enable(on)
    assert _sdp_flags() == before


def test_a_sdpa_route_that_fails_at_run_time_passes_the_call_on(measured, monkeypatch, recwarn):
    """cuDNN's SDPA can refuse at run time a call torch said it takes ("No execution plans support the graph"):
    `auto` then runs the call on the table's next route, says so once, and sends later calls of that shape there
    directly; other shapes still try cuDNN. Out of memory is not passed on."""
    if not _backend._triton_reason(torch.device("cpu"), torch.float16) is None:
        pytest.skip("the next route here is the triton backend, on CPU tensors through the interpreter")
    measured["attention"] = ["torch:sdpa-cudnn", "triton"]
    # resolve as on the GPU: the table's order, each route asked whether it takes the call.
    monkeypatch.setattr(_backend, "resolve", lambda op, device, dtype, unsupported=None: next(
        name for name in measured["attention"] if not unsupported(name)))
    monkeypatch.setattr(_backend, "_warned", set())  # said once per process: once in this test too
    calls = []

    def cudnn_that_fails(q, k, v, **kwargs):
        calls.append(tuple(q.shape))
        if q.shape[2] == 24:
            raise RuntimeError("cuDNN Frontend error: [cudnn_frontend] Error: No execution plans support the graph.")
        return torch.zeros_like(q)

    monkeypatch.setattr(attention_op.F, "scaled_dot_product_attention", cudnn_that_fails)
    g = generator()
    q, k, v = (torch.randn(1, 24, 2, 16, generator=g, dtype=torch.float16) for _ in range(3))
    for _ in range(2):
        got = attention_op.attention(q, k, v, causal=True)
    with _backend.use_backend("triton"):
        want = attention_op.attention(q, k, v, causal=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert calls == [(1, 2, 24, 16)]  # tried once; the second call went to the kernels directly
    said = [str(w.message) for w in recwarn if "raised on a call it said it takes" in str(w.message)]
    assert len(said) == 1 and "No execution plans support the graph" in said[0]
    # Another shape still takes cuDNN.
    q8 = q[:, :8].contiguous()
    assert torch.equal(attention_op.attention(q8, q8, q8, causal=True), torch.zeros_like(q8))
    # Out of memory is the caller's to see.
    monkeypatch.setattr(attention_op.F, "scaled_dot_product_attention",
                        lambda *a, **kw: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        attention_op.attention(q8, q8, q8, causal=True)
