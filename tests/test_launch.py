"""fastlm's direct Triton launch path (kernels/_launch.py) against Triton's own `kernel[grid](...)`.

The direct path must hand each kernel's launcher exactly the arguments Triton's `JITFunction.run` would, for the
same compiled kernel. Both need Triton's JIT, not its interpreter: the comparison runs in a subprocess (this file
run as a script) with TRITON_INTERPRET unset, over a stand-in driver (benchmarks.launch_cost) whose launchers record
what they are given, with the kernels compiled for sm_90a by Triton's own compiler on this CPU. The key's property
(two calls with one key get one specialization) is checked here against Triton's own binder.
"""

import collections
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parents[1]


def _calls():
    """[(name, call)]: launcher calls that reach every kind of Triton kernel fastlm has (each once compiled), with
    misaligned pointers (an element past a 16-byte boundary), a row count of 1 (an int Triton makes a constant) and
    module constants read by the kernel (attention's LN2, LOG2E)."""
    from fastlm.kernels import attention, cross_entropy, gated, norm, rotary

    bf16, f16 = dict(dtype=torch.bfloat16), dict(dtype=torch.float16)
    x, w = torch.randn(64, 1024, **bf16), torch.randn(1024, **bf16)
    skewed = torch.randn(64 * 1024 + 1, **bf16)[1:].view(64, 1024)  # 2 bytes past a 16-byte boundary
    one = torch.randn(1, 1024, **bf16)
    _, _, mean, rstd = norm.norm_fwd(x, w, w, None, 1e-5, False, 0.0)
    logits, target = torch.randn(64, 4096, **bf16), torch.randint(0, 4096, (64,))
    q, k, v = (torch.randn(1, 128, 4, 64, **f16) for _ in range(3))
    qd, kd, vd = torch.randn(2, 1, 4, 64, **f16), torch.randn(2, 1024, 2, 64, **f16), torch.randn(2, 1024, 2, 64, **f16)
    gate, up = torch.randn(64, 1024, **bf16), torch.randn(64, 1024, **bf16)
    xr, cos = torch.randn(1, 64, 8, 64, **bf16), torch.randn(64, 64, **bf16)

    def attention_fwd_bwd():
        out, lse = attention.attention_fwd(q, k, v, None, None, None, None, 0.125, None, 0, None)
        attention.attention_bwd(out, q, k, v, out, lse, None, None, None, None, None, 0.125, None, 0, None)

    def attention_bwd_atomic_dq():
        saved, attention.DQ_ATOMIC = attention.DQ_ATOMIC, True
        try:
            out, lse = attention.attention_fwd(q, k, v, None, None, None, None, 0.125, None, 0, None)
            attention.attention_bwd(out, q, k, v, out, lse, None, None, None, None, None, 0.125, None, 0, None,
                                    deterministic=False)
        finally:
            attention.DQ_ATOMIC = saved

    def cross_entropy_fwd_bwd():
        loss, row_max, log_s, sc, grad = cross_entropy.cross_entropy_fwd(logits, target, None, -100, 0.0, 0.0, None,
                                                                         "mean", True)
        cross_entropy.reduce_loss(loss, sc, True)
        cross_entropy.scalars(target, None, logits.shape[1], -100, "mean")  # (the forward formed its own above)
        cross_entropy.scale_grad(grad, torch.ones(()))
        cross_entropy.cross_entropy_bwd(logits, target, None, sc, row_max, log_s, torch.ones(64), -100, 0.0, 0.0,
                                        None)

    return [
        ("norm fwd", lambda: norm.norm_fwd(x, w, w, None, 1e-5, False, 0.0)),
        ("norm fwd, misaligned x", lambda: norm.norm_fwd(skewed, w, w, None, 1e-5, False, 0.0)),
        ("norm fwd, one row", lambda: norm.norm_fwd(one, w, None, one, 1e-5, True, 0.0)),
        ("norm bwd", lambda: norm.norm_bwd(x, x, w, mean, rstd, None, False, 0.0, True, True)),
        ("cross-entropy", cross_entropy_fwd_bwd),
        ("attention fwd+bwd", attention_fwd_bwd),
        ("attention bwd, atomic dQ", attention_bwd_atomic_dq),
        ("attention decode", lambda: attention.attention_fwd(qd, kd, vd, None, None, None, None, 0.125, None, 0,
                                                             None)),
        ("swiglu fwd+bwd", lambda: (gated.gated_fwd(gate, up, "silu"), gated.gated_bwd(gate, gate, up, "silu"))),
        ("rotary fwd", lambda: rotary.rotary_fwd(xr, cos, cos, False, False)),
    ]


def _same(a, b) -> bool:
    return a is b or (type(a) is type(b) and a == b)


@triton.jit
def _probe_kernel(X, s, n, BLOCK: tl.constexpr):
    """Does nothing: the launcher's arguments are the point. Called by the convention (runtime values
    positionally, constexprs by keyword) with scalars that look equal to Python and not to Triton."""
    pass


@triton.jit
def _probe_against(X, s, BLOCK: tl.constexpr):
    """Does nothing; called against the convention (a constexpr positionally, a runtime value by keyword)."""
    pass


def _probe_calls():
    """[(name, call)] of the probe kernels through _launch.launch: 2.0, 2 and True for one float parameter (fp32,
    i32, u1 to Triton), ints 1, 16, 17, 2³¹ and 2⁶³ (a constant, i32 divisible or not, i64, u64), a constexpr 16,
    32, 1, True and 1.0 by keyword; and the calls against the convention, with constexprs 16 and 32."""
    from fastlm.kernels import _launch

    x = torch.empty(64)
    calls = [(f"probe s={s!r}", lambda s=s: _launch.launch(_probe_kernel, (1,), x, s, 3, BLOCK=16))
             for s in (2.0, 2, True)]
    calls += [(f"probe n={n}", lambda n=n: _launch.launch(_probe_kernel, (2, 3), x, 1.0, n, BLOCK=16))
              for n in (1, 16, 17, 2**31, 2**63)]
    calls += [(f"probe BLOCK={b!r}", lambda b=b: _launch.launch(_probe_kernel, (1, 1, 2), x[1:], 1.0, 3, BLOCK=b))
              for b in (16, 32, 1, True, 1.0)]
    calls += [(f"against BLOCK={b}", lambda b=b: _launch.launch(_probe_against, (1,), x, 1.0, b)) for b in (16, 32)]
    calls += [("against s by keyword", lambda: _launch.launch(_probe_against, (1,), x, s=2.0, BLOCK=16))]
    return calls


def compare_paths() -> dict:
    """Runs _calls() and _probe_calls() with every `_launch.launch` made three times: through Triton's path, once
    more through fastlm's (which may fill its cache), and once again, as every later call runs; asserts the
    launcher got the same compiled kernel and arguments the first and the last time, the last through the direct
    path unless the call is one the direct path leaves to Triton. Returns {kernel name: [launches compared,
    compiled variants, launches that took the direct path]}."""
    from benchmarks import launch_cost
    from triton.knobs import HookChain

    launched = []
    launch_cost._install_driver(launched)
    from fastlm.kernels import _launch

    assert _launch.ENABLED, "the direct path is off (FASTLM_TRITON_DIRECT=0, or another Triton version)"
    real, seen = _launch.launch, collections.defaultdict(list)

    def empty_chains(hooks):
        return all(type(h) is HookChain and not h.calls for h in hooks)

    def both(kernel, grid, *args, **kwargs):
        try:
            _launch.ENABLED = False
            del launched[:]
            real(kernel, grid, *args, **kwargs)
            (h1, a1), = launched
        finally:
            _launch.ENABLED = True
        real(kernel, grid, *args, **kwargs)
        del launched[:]
        real(kernel, grid, *args, **kwargs)
        (h2, a2), = launched
        name = kernel.__name__
        direct = a2[6:9] == (None, None, None)
        if direct:
            assert _launch.key(kernel, 0, args, kwargs) in _launch._cache, name
        else:
            assert empty_chains(a2[7:9]) and id(kernel) in _launch._TRITON_ONLY, name
        assert h1 == h2, f"{name}: another compiled kernel"
        assert a1[:6] == a2[:6], f"{name}: grid, stream, function or metadata differ: {a1[:6]} {a2[:6]}"
        assert empty_chains(a1[7:9])
        assert len(a1) == len(a2) and all(_same(x, y) for x, y in zip(a1[9:], a2[9:])), \
            f"{name}: arguments differ: {a1[9:]} {a2[9:]}"
        seen[name].append((h1, direct))

    _launch.launch = both
    try:
        for _, call in _calls() + _probe_calls():
            call()
    finally:
        _launch.launch = real
    return {name: [len(runs), len({h for h, _ in runs}), sum(d for _, d in runs)] for name, runs in seen.items()}


def test_direct_path_hands_the_launcher_what_triton_does():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLM_TRITON_DIRECT")}
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"_norm_fwd_kernel", "_norm_bwd_kernel", "_sum_partials_kernel", "_ce_fwd_kernel", "_ce_bwd_kernel",
                "_ce_bwd_scale_kernel", "_ce_scalars_kernel", "_ce_reduce_kernel", "_attn_fwd_kernel",
                "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_decode_kernel",
                "_attn_decode_combine_kernel", "_gated_fwd_kernel", "_gated_bwd_kernel", "_rotary_kernel"}
    assert expected <= set(seen), expected - set(seen)
    # Every fastlm launcher follows the convention: all its launches take the direct path.
    assert all(direct == launches for name, (launches, _, direct) in seen.items() if name in expected), seen
    # Norm's forward as _calls() makes it (with its stats for the backward, again aligned, misaligned, one row):
    # three compiled variants, the misaligned x one of its own.
    assert seen["_norm_fwd_kernel"] == [4, 3, 4]
    # The probe, 13 launches, all direct: the 3 scalar types are 3 kernels; the 5 ints 4 more (17 with s=1.0 is
    # the s=2.0 kernel); the constexprs 16, 32 and 1 three more (Triton's own cache key takes 1, True and 1.0 as
    # one kernel; the direct path keeps them apart, and gets that same kernel for each).
    assert seen["_probe_kernel"] == [13, 10, 13]
    assert seen["_probe_against"] == [3, 2, 0]  # against the convention: Triton's own path every time


def _spec_kernel():
    """A JITFunction (made directly: under the interpreter @triton.jit makes interpreted functions) with a pointer,
    an int, a float, a bool and an argument of any type, and a constexpr."""
    from triton.runtime.jit import JITFunction

    def spec_probe(p, i, f, b, a, C):
        pass

    spec_probe.__annotations__ = {"C": "tl.constexpr"}
    return JITFunction(spec_probe)


def test_key_never_merges_two_specializations():
    """Calls with one key get one specialization from Triton's binder (what picks the compiled kernel), over
    pointers of several dtypes and alignments, ints at every boundary Triton draws (1, divisibility by 16, the i32,
    i64 and u64 ranges), floats, bools and None in each position, and constexprs and options."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from fastlm.kernels import _launch

    fn = _spec_kernel()
    binder = create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32)))
    base = torch.empty(64, dtype=torch.float32)
    pointers = [base, base[1:], base[4:], base.to(torch.bfloat16), base.to(torch.bfloat16)[1:],
                base.to(torch.bfloat16)[8:], base.to(torch.int64)]
    ints = [0, 1, 2, 15, 16, 17, -1, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -2**31, -2**31 - 16,
            2**32, 2**63 - 16, 2**63 - 1, 2**63, 2**64 - 16]
    scalars = [0.0, 1.0, 16.0, True, False, None]
    values = pointers + ints + scalars
    groups = collections.defaultdict(set)
    for p, i, f, b, a, (c, warps) in itertools.product(pointers[:3] + [None], ints, [1.0, 1], [True, 1], values,
                                                       [(1, 4), (2, 4), (1, 8)]):
        kwargs = dict(C=c, num_warps=warps)
        args = (p, i, f, b, a)
        k = _launch.key(fn, 0, args, kwargs)
        assert k is not None
        _, spec, options = binder(*args, **kwargs)
        groups[k].add((repr(spec), repr(sorted(options.items()))))
    merged = {k: s for k, s in groups.items() if len(s) > 1}
    assert not merged, next(iter(merged.values()))
    assert len(groups) > 1000  # the product above reached many distinct keys
    assert _launch.key(fn, 0, (base, 1, 1.0, True, object()), {"C": 1}) is None  # a type the key does not cover
    for n in (2**64, -2**63 - 1):  # ints no Triton type holds (its binder raises): Triton's path, not a key
        assert _launch.key(fn, 0, (base, n, 1.0, True, None), {"C": 1}) is None
    # Keyword values equal to Python but not to Triton get keys of their own.
    keys = {_launch.key(fn, 0, (base, 1, 1.0, True, None), {"C": c}) for c in (1, True, 1.0)}
    assert len(keys) == 3


# ---------------------------------------------------------------------------------------------- benchmarks.launch_check


def test_launch_check_compares_the_direct_runs_with_tritons_own(monkeypatch):
    """The check's logic on CPU (stand-in calls, no kernels): a call whose direct-path results equal Triton's own
    passes; one whose results differ, and one that raises on the direct path, are named; so is a run in which no
    launch was cached (nothing was checked). The real comparison is the GPU test below."""
    from benchmarks import launch_check
    from fastlm.kernels import _launch

    monkeypatch.setattr(_launch, "ENABLED", True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(_launch, "_cache", {"a pattern": None})
    runs = collections.Counter()

    def call(name, direct_value=1.0, direct_raises=False):
        def fn():
            runs[name] += 1
            if runs[name] == 1:
                assert not _launch.ENABLED  # the first run: Triton's own path only
                return [torch.ones(3)]
            if runs[name] == 3 and direct_raises:
                raise RuntimeError("bad launch")
            return [torch.full((3,), direct_value if runs[name] == 3 else 1.0)]
        return fn

    calls = [("same", call("same")), ("differs", call("differs", 2.0)), ("raises", call("raises", direct_raises=True))]
    monkeypatch.setattr(launch_check, "_calls", lambda device: calls)
    logged = []
    assert launch_check.check("cpu", log=logged.append) == ["differs", "raises"]
    assert runs == {"same": 3, "differs": 3, "raises": 3} and _launch.ENABLED
    assert "raises: the direct path raised RuntimeError: bad launch" in logged
    assert logged[-1] == "3 calls, 1 direct launch patterns cached: 2 differ: differs, raises"
    monkeypatch.setattr(_launch, "_cache", {})
    runs.clear()
    calls = [("same", call("same"))]
    assert launch_check.check("cpu", log=logged.append) == ["(no direct launches)"]
    # A failure on Triton's own path says nothing about the direct path: it propagates (main: exit NOT_RUN).
    calls = [("fails on Triton's path", lambda: 1 / 0)]
    with pytest.raises(ZeroDivisionError):
        launch_check.check("cpu", log=logged.append)
    assert _launch.ENABLED


def test_gpu_direct_launch_path_computes_what_tritons_own_does():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible to torch)")
    from benchmarks import launch_check
    from fastlm.kernels import _launch

    if not _launch.ENABLED:
        pytest.skip(f"the direct path is off here (Triton {triton.__version__} or FASTLM_TRITON_DIRECT=0)")
    assert launch_check.check("cuda") == []


if __name__ == "__main__":
    print(json.dumps(compare_paths()))
