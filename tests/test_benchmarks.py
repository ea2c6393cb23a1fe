"""The benchmark suite and the static kernel report, as far as they run without a GPU: the no-GPU path, the byte
and rate arithmetic, a whole benchmark case on CPU tensors with the device timers stubbed, the result writers on
synthetic rows, and the static report compiling tiny Triton kernels for sm_90a and reading their machine code."""

import concurrent.futures
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is a folder of the repository, not part of the installed package
    sys.path.insert(0, str(REPO))

from benchmarks import attention, cross_entropy, harness, norm, static  # noqa: E402


# ---------------------------------------------------------------------------------------------- no GPU


def test_no_gpu_run_says_so_and_exits_zero():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "benchmarks"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert "no CUDA GPU" in first and "nothing is timed" in first
    assert "benchmarks/results" in proc.stdout  # either the committed tables' paths or "none committed yet"


def test_committed_results_picks_the_newest_per_family(tmp_path):
    for device, date in (("gpu-a", "2026-01-01T00:00:00+00:00"), ("gpu-b", "2026-03-01T00:00:00+00:00")):
        folder = tmp_path / device
        folder.mkdir()
        (folder / "norm.md").write_text(f"# norm on {device}\n")
        (folder / "norm.json").write_text(json.dumps({"meta": {"date": date, "device": device}, "rows": []}))
    (tmp_path / "gpu-a" / "attention.md").write_text("# attention\n")
    found = {name: (md.parent.name, date) for name, md, date, _ in harness.committed_results(tmp_path)}
    assert found == {"norm": ("gpu-b", "2026-03-01T00:00:00+00:00"), "attention": ("gpu-a", "")}
    assert harness.committed_results(tmp_path, {"softmax"}) == []


# ---------------------------------------------------------------------------------------------- arithmetic


def _norm_case(op, residual, rows=4, n=8, dtype=torch.bfloat16):
    return harness.Case(op, dtype, {"rows": rows, "N": n, "residual": residual})


def test_norm_bytes():
    # 4 × 8 bf16 activations are 64 bytes; a weight or bias row is 16.
    ln = _norm_case("layer_norm", residual=False)
    assert norm.work(ln, "fwd") == 64 + 2 * 16 + 64  # x, weight + bias read; y written
    assert norm.work(ln, "bwd") == 2 * 64 + 16 + 64 + 2 * 16  # dy, x, weight read; dx, dw, db written
    assert norm.work(ln, "fwd+bwd") == norm.work(ln, "fwd") + norm.work(ln, "bwd")
    rms = _norm_case("rms_norm", residual=True)
    assert norm.work(rms, "fwd") == 2 * 64 + 16 + 2 * 64  # x, residual, weight read; y, residual_out written
    assert norm.work(rms, "bwd") == 3 * 64 + 16 + 64 + 16  # dy, x, d residual_out, weight read; dx, dw written
    fp32 = _norm_case("rms_norm", residual=False, dtype=torch.float32)
    assert norm.work(fp32, "fwd") == 2 * norm.work(_norm_case("rms_norm", residual=False), "fwd")


def test_rates_and_rotation():
    assert harness.rate(10**9, 1.0, "bytes") == pytest.approx(1000.0)  # 1 GB in 1 ms is 1000 GB/s
    assert harness.rate(2 * 10**12, 2.0, "flops") == pytest.approx(1000.0)  # 2 TFLOP in 2 ms is 1000 TFLOP/s
    l2 = 50 * 2**20
    assert harness.input_set_count(16 * 2**20, l2) == 13  # ceil(4 × 50 / 16)
    assert harness.input_set_count(2**30, l2) == 1
    assert harness.input_set_count(1, l2) == harness.MAX_INPUT_SETS
    assert harness.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_rel_error(tmp_path):
    a = torch.tensor([3.0, 4.0])
    assert harness.rel_error([a], [a.clone()]) == 0.0
    assert harness.rel_error([a + torch.tensor([0.0, 0.5])], [a]) == pytest.approx(0.1)  # 0.5 / 5
    err = harness.rel_error([torch.tensor([float("nan"), 4.0])], [a])
    assert err == math.inf
    harness.write_json(tmp_path / "r.json", {}, [{"rel_err": err}])  # JSON has no infinity: it is written as text
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == [{"rel_err": "inf"}]


def test_norm_sweep_fits_the_gpu_budget():
    full, quick = norm.cases(quick=False), norm.cases(quick=True)
    assert len({c.label for c in full}) == len(full)
    # torch.compile compiles every case anew: a few seconds each, so the sweep stays at a few dozen cases.
    assert 20 <= len(full) <= 40 and len(quick) <= 6
    assert {c.params["N"] for c in full} >= set(norm.WIDTHS)
    assert {c.dtype for c in full} == {torch.bfloat16, torch.float32}
    assert any(c.params["residual"] for c in full) and any(c.op == "layer_norm" for c in full)


def _ce_case(rows=4, v=8, dtype=torch.bfloat16):
    return harness.Case("cross_entropy", dtype, {"rows": rows, "V": v})


def _lce_case(tokens=4, hidden=8, v=16):
    return harness.Case("linear_cross_entropy", torch.bfloat16, {"tokens": tokens, "hidden": hidden, "V": v})


def test_cross_entropy_bytes_and_linear_cross_entropy_flops():
    # 4 × 8 bf16 logits are 64 bytes: read once forward, the gradient written once backward.
    ce = _ce_case()
    assert cross_entropy.logits_bytes(ce) == 64
    assert [cross_entropy.ce_work(ce, m) for m in harness.MODES] == [64, 64, 128]
    assert cross_entropy.ce_work(_ce_case(dtype=torch.float32), "fwd+bwd") == 256
    big = _ce_case(16384, 131072)  # 4 GiB of bf16 logits, 8 GiB moved by the ideal fwd+bwd
    assert cross_entropy.ce_work(big, "fwd+bwd") == 2 * 16384 * 131072 * 2 == 8 * 2**30
    # 4 tokens, hidden 8, V 16: the logits matmul is 2 · 4 · 8 · 16 = 1024 FLOPs; backward twice that.
    lce = _lce_case()
    assert [cross_entropy.lce_work(lce, m) for m in harness.MODES] == [1024, 2048, 3072]
    assert cross_entropy.lce_work(_lce_case(16384, 4096, 131072), "fwd+bwd") == 6 * 16384 * 4096 * 131072
    assert cross_entropy.logits_bytes(_lce_case()) == 4 * 16 * 2
    # TARGETS.md's fused linear cross-entropy goal, 600 TFLOP/s at 16k tokens, 4096 hidden, 128k vocab, is a call
    # of 88 ms.
    work = cross_entropy.lce_work(_lce_case(16384, 4096, 131072), "fwd+bwd")
    assert harness.rate(work, 88.0, "flops") == pytest.approx(600, rel=0.01)


def test_cross_entropy_sweeps_fit_the_memory_cap_and_the_gpu_budget():
    cap = cross_entropy.MAX_LOGITS_BYTES
    # torch eager's fwd+bwd holds about 8 × the logits at its peak (see MAX_LOGITS_BYTES): it fits an 80 GB H100.
    assert 8 * cap <= 80e9
    grid = cross_entropy.ce_grid()
    full = cross_entropy.ce_cases(quick=False)
    assert full == [c for c in grid if cross_entropy.logits_bytes(c) <= cap]
    left_out = {(harness.DTYPE_NAMES[c.dtype], c.params["rows"], c.params["V"]) for c in grid if c not in full}
    assert left_out == {("bf16", 32768, 262144), ("fp32", 16384, 262144)}  # 16 GiB of logits each
    # torch.compile compiles every case anew: the two families stay at 17 cases (11 + 6) to fit the session.
    assert len(full) == 11 and {c.dtype for c in full} == {torch.bfloat16, torch.float32}
    assert sum(c.dtype == torch.float32 for c in full) == 2
    # The power-of-two grid, and issue 13's exact shape (8192 × 128256) so its targets are read off the sweep.
    assert {c.params["V"] for c in full} == set(cross_entropy.VOCABS) | {128256}
    assert {c.params["rows"] for c in full} == set(cross_entropy.ROWS) | {8192}
    lce = cross_entropy.lce_cases(quick=False)
    assert (8192, 4096, 128256) in {(c.params["tokens"], c.params["hidden"], c.params["V"]) for c in lce}
    assert len(lce) == 6 and all(cross_entropy.logits_bytes(c) <= cap for c in lce)
    assert {c.dtype for c in lce} == {torch.bfloat16}
    for family, cases in ((cross_entropy.FAMILY, full), (cross_entropy.LINEAR_FAMILY, lce)):
        assert len({c.label for c in cases}) == len(cases)
        quick = family.cases(True)
        assert 1 <= len(quick) <= 3 and max(map(cross_entropy.logits_bytes, quick)) <= 2**30
        assert all(c.op == family.name for c in cases + quick)


def test_cross_entropy_families_and_their_providers():
    assert cross_entropy.FAMILIES == (cross_entropy.FAMILY, cross_entropy.LINEAR_FAMILY)
    assert [(f.name, f.metric) for f in cross_entropy.FAMILIES] == [("cross_entropy", "bytes"),
                                                                     ("linear_cross_entropy", "flops")]
    for family in cross_entropy.FAMILIES:
        names = [p.name for p in family.providers]
        low_memory = ["fastlm-triton-low_memory", "fastlm-cuda-low_memory"] if family.name.startswith("linear") else []
        assert names == ["fastlm-triton", "fastlm-cuda", *low_memory, "torch", "torch.compile", "liger"]
        # Liger's cross-entropy overwrites the logits with their gradient: it must run after every other provider.
        assert family.reference == "torch" and names[-1] == "liger"
        assert {p.backend for p in family.providers if p.backend} == {"triton", "cuda"}
    cpu = torch.device("cpu")
    # The torch backend runs anywhere: the probe of both ops passes; the op a fastlm lacks is missing.
    assert cross_entropy.unavailable_reason("cross_entropy", "torch", cpu) == ""
    assert cross_entropy.unavailable_reason("linear_cross_entropy", "torch", cpu) == ""
    assert cross_entropy.unavailable_reason("softmax2", "triton", cpu) == "this fastlm has no softmax2"
    if not torch.cuda.is_available():
        assert "GPU" in cross_entropy.unavailable_reason("cross_entropy", "cuda", cpu)


class _InPlaceCrossEntropy(torch.autograd.Function):
    """A stand-in for Liger's cross-entropy: the forward writes the gradient into the logits."""

    @staticmethod
    def forward(ctx, logits, target):
        x = logits.detach().float().requires_grad_()
        with torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(x, target)
            (grad,) = torch.autograd.grad(loss, x)
        logits.copy_(grad)
        ctx.save_for_backward(logits)
        return loss.detach()

    @staticmethod
    def backward(ctx, dloss):
        (grad,) = ctx.saved_tensors
        return grad * dloss, None


def _family_on_cpu(family, stand_ins):
    """The family with every provider that runs on CPU tensors: fastlm through its torch backend, torch eager,
    and the stand-ins (name -> build) in place of the peers not installed here, last."""
    import fastlm

    fastlm_torch = harness.Provider("fastlm-triton", family.providers[0].build,
                                    context=lambda: fastlm.use_backend("torch"), backend="triton")
    eager = next(p for p in family.providers if p.name == "torch")
    providers = [fastlm_torch, eager] + [harness.Provider(name, build) for name, build in stand_ins.items()]
    return harness.Family(name=family.name, metric=family.metric, cases=None, providers=providers,
                          make_inputs=family.make_inputs, work=family.work, reference="torch", x_key=family.x_key,
                          tolerance=family.tolerance)


def test_cross_entropy_cases_run_on_cpu(cpu_timers, monkeypatch):
    import fastlm

    if not hasattr(fastlm, "linear_cross_entropy"):  # until the library has it: its reference, materialized
        monkeypatch.setattr(fastlm, "linear_cross_entropy", lambda h, w, t, **kw: torch.nn.functional.cross_entropy(
            (h @ w.T).float(), t, **kw), raising=False)
    # The in-place peer runs last, as Liger does: every other provider, and its own check (its first call), see
    # logits it has not overwritten yet, so all agree with the reference.
    in_place = {"liger": lambda case: lambda i: (_InPlaceCrossEntropy.apply(i["logits"], i["target"]),)}
    ce_family = _family_on_cpu(cross_entropy.FAMILY, in_place)
    lce_family = _family_on_cpu(cross_entropy.LINEAR_FAMILY, {})
    cpu = torch.device("cpu")
    for family, case in ((ce_family, _ce_case(16, 300, torch.float32)), (ce_family, _ce_case(16, 300)),
                         (lce_family, harness.Case("linear_cross_entropy", torch.float32,
                                                   {"tokens": 16, "hidden": 32, "V": 300}))):
        availability = {p.name: p.available() for p in family.providers}
        rows = harness.run_case(family, case, availability, cpu, l2_bytes=1024, ceiling=100.0)
        assert len(rows) == len(family.providers) * len(harness.MODES)
        for r in rows:
            assert r["status"] == "ok", (case.label, r["provider"], r["reason"])
            assert r["work"] == family.work(case, r["mode"])
            assert r["rate"] == pytest.approx(harness.rate(r["work"], r["ms"], family.metric))
        ours = next(r for r in rows if r["provider"] == "fastlm-triton" and r["mode"] == "fwd+bwd")
        assert ours["rel_err"] < family.tolerance[case.dtype]
        assert set(ours["vs"]) == {p.name for p in family.providers if not p.backend}
        assert ours["unit"] == harness.UNITS[family.metric][0]


# ---------------------------------------------------------------------------------------------- one case on CPU


@pytest.fixture
def cpu_timers(monkeypatch):
    """The device timers and memory counters replaced by host stand-ins, so a case runs on CPU tensors."""
    calls = []

    def bench(fn):
        calls.append("fwd-like")
        fn()
        return 2.0

    def bench_after(prepare, timed):
        calls.append("bwd")
        timed(prepare())
        return 4.0

    monkeypatch.setattr(harness, "_bench", bench)
    monkeypatch.setattr(harness, "_bench_after", bench_after)
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 164)
    return calls


def test_a_case_runs_every_provider_and_mode(cpu_timers):
    eager = norm._eager

    def scaled(case):
        fn = eager(case)
        return lambda i: tuple(1.5 * o for o in fn(i))

    def broken(case):
        raise ValueError("this provider cannot take N=64")

    providers = [
        harness.Provider("ours", eager, backend="triton"),
        harness.Provider("ours-wrong", scaled, backend="cuda"),
        harness.Provider("torch", eager),
        harness.Provider("broken", broken),
        harness.Provider("absent", eager, lambda: (False, "not installed")),
    ]
    family = harness.Family(name="norm", metric="bytes", cases=None, providers=providers,
                            make_inputs=norm.make_inputs, work=norm.work, reference="torch", x_key="N",
                            tolerance=norm.TOLERANCE)
    case = _norm_case("rms_norm", residual=True, rows=16, n=64, dtype=torch.float32)
    availability = {p.name: p.available() for p in providers}
    rows = harness.run_case(family, case, availability, torch.device("cpu"), l2_bytes=64 * 1024, ceiling=100.0)
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert len(rows) == len(providers) * len(harness.MODES)
    assert cpu_timers.count("bwd") == 3  # one backward timing per provider that ran (ours, ours-wrong, torch)

    ok = by[("ours", "bwd")]
    assert ok["status"] == "ok" and ok["ms"] == 4.0 and ok["rel_err"] == 0.0
    assert ok["rate"] == pytest.approx(norm.work(case, "bwd") / 4e6)
    assert ok["frac_of_ceiling"] == pytest.approx(ok["rate"] / 100.0)
    assert ok["peak_mem_bytes"] == 64
    assert ok["input_sets"] == 16  # x, residual, 2 gradients: 16 KiB + the weight a set; 4 × 64 KiB of "L2" 
    assert ok["vs"] == {"torch": 1.0, "broken": "error", "absent": "missing"}
    assert by[("ours", "fwd")]["ms"] == 2.0

    wrong = by[("ours-wrong", "fwd")]
    assert wrong["status"] == "mismatch" and wrong["rel_err"] == pytest.approx(0.5, rel=1e-3)
    assert wrong["vs"] == {}  # a kernel that computes something else gets no ratio
    assert by[("broken", "fwd")]["status"] == "error" and "N=64" in by[("broken", "fwd")]["reason"]
    assert by[("absent", "fwd+bwd")]["status"] == "missing" and by[("absent", "fwd+bwd")]["ms"] is None


# ---------------------------------------------------------------------------------------------- isolation


def _test_meta(**extra):
    return dict({"date": "2026-01-01T00:00:00+00:00", "device": "Test CPU", "device_slug": "test-cpu",
                 "torch": "2.x", "cuda": None, "triton": "3.6.0", "fastlm": "0.1.0", "git_commit": "abc1234",
                 "liger_kernel": "missing", "quick": False, "l2_bytes": 64 * 1024,
                 "ceilings": {"bytes": 100.0, "flops": 10.0}}, **extra)


def _norm_family(name, providers, cases):
    return harness.Family(name=name, metric="bytes", cases=lambda quick: cases, providers=providers,
                          make_inputs=norm.make_inputs, work=norm.work, reference="torch", x_key="N",
                          tolerance=norm.TOLERANCE)


def test_isolated_run_survives_providers_that_raise_die_or_break_the_context(cpu_timers, monkeypatch, tmp_path):
    """Each failure costs its own cells: a provider that raises, one whose process dies (os._exit, as a crash in
    native code would), one after which the CUDA context is broken (stood in for by the context check) and one
    that hangs (killed at UNIT_TIMEOUT_S); the later providers, cases and families still run, in fresh workers,
    and are written."""
    eager = norm._eager
    context = {"broken": False}  # set in the worker by "poisons"; a fresh worker, forked from here, starts clean

    def raises(case):
        raise ValueError("this provider cannot take the case")

    def dies(case):
        def fn(inputs):
            os._exit(3)

        return fn

    def poisons(case):
        fn = eager(case)

        def run(inputs):
            context["broken"] = True
            return fn(inputs)

        return run

    def hangs(case):
        def fn(inputs):
            time.sleep(600)

        return fn

    def scaled(case):
        fn = eager(case)
        return lambda i: tuple(1.5 * o for o in fn(i))

    def context_error(device):
        return "AcceleratorError: CUDA error: device-side assert triggered" if context["broken"] else ""

    monkeypatch.setattr(harness, "_context_error", context_error)
    monkeypatch.setattr(harness, "UNIT_TIMEOUT_S", 5)
    first = _norm_family("first", [
        harness.Provider("torch", eager),
        harness.Provider("raises", raises),
        harness.Provider("dies", dies),
        harness.Provider("poisons", poisons),
        harness.Provider("ours", eager, backend="triton"),
        harness.Provider("ours-wrong", scaled, backend="cuda"),
        harness.Provider("absent", eager, lambda: (False, "not installed")),
    ], [_norm_case("rms_norm", residual=True, rows=16, n=64, dtype=torch.float32),
        _norm_case("layer_norm", residual=False, rows=8, n=32, dtype=torch.float32)])
    second = _norm_family("second", [harness.Provider("torch", eager), harness.Provider("hangs", hangs),
                                     harness.Provider("ours", eager, backend="triton")],
                          [_norm_case("rms_norm", residual=False, rows=4, n=16, dtype=torch.float32)])

    # This process has used torch's CPU thread pool (as pytest's earlier tests do): the workers forked from it
    # must not hang on the pool they inherit.
    torch.randn(256, 256) @ torch.randn(256, 256)
    run = harness.IsolatedRun([first, second], quick=False, out_dir=tmp_path, meta=_test_meta(),
                              device=torch.device("cpu"))
    results = run.finish()
    assert [family.name for family, *_ in results] == ["first", "second"]
    # Per case of the first family: one worker until "dies", one for "poisons", one for the rest; then "hangs".
    assert run.workers == 6

    rows = results[0][1]
    assert len(rows) == 2 * 7 * len(harness.MODES)
    for case in first.cases(False):
        by = {(r["provider"], r["mode"]): r for r in rows if r["params"] == case.params and r["op"] == case.op}
        for mode in harness.MODES:
            raised, died, poisoned = by[("raises", mode)], by[("dies", mode)], by[("poisons", mode)]
            assert raised["status"] == "error" and "cannot take the case" in raised["reason"]
            assert died["status"] == "error" and "worker process died (exit status 3)" in died["reason"]
            assert poisoned["status"] == "error" and poisoned["ms"] is None
            assert "CUDA context broke" in poisoned["reason"] and "device-side assert" in poisoned["reason"]
            ours = by[("ours", mode)]
            # Measured in a fresh worker, and still checked: the reference's outputs were recomputed there.
            assert ours["status"] == "ok" and ours["ms"] == (4.0 if mode == "bwd" else 2.0)
            assert ours["rel_err"] == 0.0
            assert ours["vs"] == {"torch": 1.0, "raises": "error", "dies": "error", "poisons": "error",
                                  "absent": "missing"}
            wrong = by[("ours-wrong", mode)]
            assert wrong["status"] == "mismatch" and wrong["rel_err"] == pytest.approx(0.5, rel=1e-3)
            assert by[("torch", mode)]["status"] == "ok" and by[("absent", mode)]["status"] == "missing"

    later = {r["provider"]: r for r in results[1][1] if r["mode"] == "fwd"}
    assert later["hangs"]["status"] == "error" and "UNIT_TIMEOUT_S (5 s)" in later["hangs"]["reason"]
    assert later["ours"]["status"] == "ok" and later["ours"]["rel_err"] == 0.0
    assert later["ours"]["vs"] == {"torch": 1.0, "hangs": "error"}

    for family, family_rows, meta, _ in results:
        saved = json.loads((tmp_path / f"{family.name}.json").read_text())
        assert saved["meta"]["complete"] is True and saved["rows"] == json.loads(json.dumps(family_rows))
        assert (tmp_path / f"{family.name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "first.md").read_text()
    assert "dies (error, 6 rows): its worker process died (exit status 3); the cells after it ran in a fresh" in md
    assert "raises (error, 6 rows): ValueError: this provider cannot take the case" in md
    assert "hangs (error, 3 rows): it ran longer than UNIT_TIMEOUT_S" in (tmp_path / "second.md").read_text()


def test_isolated_run_without_a_gpu_measures_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    family = _norm_family("first", [harness.Provider("torch", norm._eager)], [_norm_case("rms_norm", False)])
    run = harness.IsolatedRun([family], quick=False, out_dir=tmp_path)
    assert run.start() is None and run.finish() == [] and run.workers == 1
    assert list(tmp_path.iterdir()) == []


def test_a_provider_that_breaks_its_availability_check_is_missing(monkeypatch, tmp_path, cpu_timers):
    def killer():
        os.kill(os.getpid(), signal.SIGKILL)

    family = _norm_family("first", [harness.Provider("torch", norm._eager), harness.Provider("killer", norm._eager,
                                                                                            killer)],
                          [_norm_case("rms_norm", False, dtype=torch.float32)])
    results = harness.IsolatedRun([family], quick=False, out_dir=tmp_path, meta=_test_meta(),
                                  device=torch.device("cpu")).finish()
    by = {r["provider"]: r for r in results[0][1] if r["mode"] == "fwd"}
    assert by["torch"]["status"] == "ok"
    assert by["killer"]["status"] == "missing" and "killed by SIGKILL" in by["killer"]["reason"]
    assert results[0][2]["providers"]["killer"]["available"] is False


# ---------------------------------------------------------------------------------------------- writers


def _synthetic_rows():
    """Two cases; triton twice as fast as torch on the first, cuda faster than triton on the second."""
    family = norm.FAMILY
    providers = {p.name: p for p in family.providers}
    rows = []
    for n, times in ((1024, {"fastlm-triton": 1.0, "fastlm-cuda": 1.25, "torch": 2.0, "torch.compile": 1.5}),
                     (4096, {"fastlm-triton": 2.0, "fastlm-cuda": 1.0, "torch": 3.0, "torch.compile": 4.0})):
        case = _norm_case("layer_norm", residual=False, rows=16384, n=n)
        case_rows = []
        for name, ms in times.items():
            for mode in harness.MODES:
                work = family.work(case, mode)
                r = harness.rate(work, ms, "bytes")
                case_rows.append(harness._row(family, case, providers[name], mode, ms=ms, rate=r,
                                              frac_of_ceiling=r / 3000.0, peak_mem_bytes=3 * 2**20))
        for mode in harness.MODES:
            case_rows.append(harness._row(family, case, providers["liger"], mode, status="missing",
                                          reason="liger_kernel not importable"))
        harness.add_ratios(case_rows, family.providers)
        rows += case_rows
    meta = {"date": "2026-01-01T00:00:00+00:00", "device": "Test GPU", "torch": "2.x", "cuda": "13.0",
            "triton": "3.6.0", "fastlm": "0.1.0", "git_commit": "abc1234", "liger_kernel": "missing",
            "ceiling": 3000.0, "quick": False}
    return family, meta, rows


def test_ratios_and_dispatch_on_synthetic_rows(tmp_path):
    family, meta, rows = _synthetic_rows()
    first = next(r for r in rows if r["provider"] == "fastlm-triton" and r["params"]["N"] == 1024)
    assert first["vs"] == {"torch": 2.0, "torch.compile": 1.5, "liger": "missing"}
    choice, details = harness.dispatch_summary(rows, family.providers)
    # Over the two cases: triton 1.0 / 2.0 against cuda 1.25 / 1.0 and torch's own norm (the "torch" peer, which
    # is auto's "torch:eager" route) 2.0 / 3.0; geometric means of time over the best sqrt(1 · 2) = 1.41 for triton,
    # sqrt(1.25 · 1) = 1.12 for cuda, sqrt(2 · 3) = 2.45 for torch: cuda, then triton, then torch.
    order = ["cuda", "triton", "torch:eager"]
    assert choice == {"layer_norm": {"fwd": "cuda", "bwd": "cuda", "fwd+bwd": "cuda", "order": order}}
    assert details["layer_norm"]["fwd"]["wins"] == {"triton": 1, "cuda": 1, "torch:eager": 0}
    assert details["layer_norm"]["fwd+bwd"]["order"] == order
    path = tmp_path / "dispatch.json"
    path.write_text(json.dumps({"cross_entropy": {"fwd": "triton"}}))
    merged = harness.merge_dispatch(path, choice)
    assert json.loads(path.read_text()) == merged == dict(choice, cross_entropy={"fwd": "triton"})


def test_torchs_own_kernel_goes_first_where_it_was_measured_fastest():
    family, meta, rows = _synthetic_rows()
    for r in rows:
        if r["provider"] == "torch":
            r["ms"] = 0.5  # torch's fused norm faster than both fastlm backends on every case
    choice, details = harness.dispatch_summary(rows, family.providers)
    assert choice["layer_norm"]["order"][0] == "torch:eager"
    assert choice["layer_norm"]["fwd+bwd"] == "torch:eager"
    assert details["layer_norm"]["fwd+bwd"]["wins"]["torch:eager"] == 2


def test_markdown_json_and_plot_on_synthetic_rows(tmp_path):
    family, meta, rows = _synthetic_rows()
    paths = harness.write_results(tmp_path, family, meta, rows)
    assert [p.name for p in paths] == ["norm.json", "norm.md", "norm.png"]

    saved = json.loads(paths[0].read_text())
    assert saved["meta"]["device"] == "Test GPU" and len(saved["rows"]) == len(rows)

    md = paths[1].read_text()
    assert md.startswith("# norm: Test GPU")
    assert "**3000 GB/s**" in md
    fwd = md.split("## fwd (GB/s)")[1].split("##")[0]
    header = next(line for line in fwd.splitlines() if line.startswith("| op"))
    assert header.split(" | ")[5:] == ["fastlm-triton", "fastlm-cuda", "torch", "torch.compile", "liger",
                                       "vs torch", "vs torch.compile", "vs liger |"]
    row = next(line for line in fwd.splitlines() if "| 1024 |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    triton_gbps = harness.rate(norm.work(_norm_case("layer_norm", False, 16384, 1024), "fwd"), 1.0, "bytes")
    assert cells[:5] == ["layer_norm", "bf16", "16384", "1024", "no"]
    assert cells[5] == f"{triton_gbps:.0f} ({triton_gbps / 3000:.0%})"
    assert cells[9] == "missing"
    assert cells[10:] == ["2.00 / 1.60", "1.50 / 1.20", "– / –"]  # torch 2.0 ms over triton 1.0 and cuda 1.25
    assert "liger (missing, 6 rows): liger_kernel not importable" in md
    assert "| layer_norm | bf16 | 16384 | 4096 | no | 3 | 3 | 3 | 3 | missing |" in md  # peak MiB

    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[2].stat().st_size > 10_000


def test_markdown_says_what_auto_ran_on_the_device():
    """A family with a provider on the `auto` backend (e2e's) says in its header what auto tried per op on the run's
    device: the dispatch table's order where it has one (the H200's), the default order otherwise."""
    import dataclasses

    family, meta, rows = _synthetic_rows()
    assert "`auto` on this device" not in harness.markdown(family, meta, rows)  # explicit backends only
    providers = [dataclasses.replace(p, backend="auto") if p.name == "fastlm-triton" else p for p in family.providers]
    family = dataclasses.replace(family, providers=providers)
    assert "`auto` on this device" not in harness.markdown(family, meta, rows)  # a run that did not record it
    md = harness.markdown(family, dict(meta, auto_orders=harness.auto_orders("Test GPU")), rows)
    assert "`auto` on this device tried, per op, first to last" in md and "other ops triton > cuda." in md
    meta = dict(meta, device="NVIDIA H200", auto_orders=harness.auto_orders("NVIDIA H200"))
    md = harness.markdown(family, meta, rows)
    assert "attention torch:sdpa-cudnn > torch:sdpa-flash > cuda > triton;" in md
    assert "rms_norm torch:eager > cuda > triton;" in md


def test_ratio_table_from_written_results(tmp_path, capsys):
    from benchmarks.__main__ import main

    family, meta, rows = _synthetic_rows()
    mismatch = next(r for r in rows if r["provider"] == "fastlm-cuda" and r["params"]["N"] == 4096
                    and r["mode"] == "bwd")
    mismatch.update(status="mismatch", vs={})
    harness.write_json(tmp_path / "norm.json", dict(meta, quick=True, complete=True), rows)
    assert main(["--ratios", str(tmp_path), "--op", "norm"]) == 0
    out = capsys.readouterr().out
    assert "norm on Test GPU (2026-01-01T00:00:00+00:00, quick subset): peer time / fastlm time" in out
    lines = out.splitlines()
    assert "| case | mode | fastlm | vs torch | vs torch.compile | vs liger |" in lines
    # torch 2.0 ms and torch.compile 1.5 ms over triton's 1.0 and cuda's 1.25; Liger not installed.
    assert "| layer_norm bf16 rows=16384 N=1024 residual=no | fwd | fastlm-triton | 2.00 | 1.50 | missing |" in lines
    assert "| layer_norm bf16 rows=16384 N=1024 residual=no | fwd | fastlm-cuda | 1.60 | 1.20 | missing |" in lines
    assert "| layer_norm bf16 rows=16384 N=4096 residual=no | bwd | fastlm-cuda | mismatch | mismatch | mismatch |" \
        in lines
    assert sum(line.startswith("| layer_norm") for line in lines) == 2 * 3 * 2  # cases × modes × fastlm backends
    assert any("vs torch: ×" in line for line in lines)  # the geometric means follow the table
    assert main(["--ratios", str(tmp_path / "none"), "--op", "norm"]) == 1


# ---------------------------------------------------------------------------------------------- gpu_check.sh


def _gpu_check_env(tmp_path, **extra):
    """The environment of a gpu_check.sh run inside a test: its results, logs and machine-state files (the tests'
    done list, the launch verdict) under tmp_path, never the real ones of the GPU run that may be running this
    suite, and none of that run's own settings (TESTS_RESUME, FASTLM_TRITON_DIRECT)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TESTS_RESUME", "FASTLM_TRITON_DIRECT", "FASTLM_TESTS_DONE", "FASTLM_TESTS_RESUME")}
    env.update(OUT=str(tmp_path / "out"), RESULTS=str(tmp_path / "results"),
               TESTS_DONE=str(tmp_path / "tests-done"), DIRECT_VERDICT=str(tmp_path / "direct-verdict"),
               JUNIT_ROOT=str(tmp_path / "junit"), CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


H200_SUMMARY = "25 failed, 1167 passed, 25 skipped, 70 warnings, 4 errors in 311.95s (0:05:11)"


def test_pytest_summary_lines():
    log = (f"===== tests (at most 420 s) =====\n.....F...\nFAILED tests/test_a.py::test_b - 3 passed in 2s\n"
           f"{H200_SUMMARY}\n")
    assert harness.pytest_summary(log) == {"passed": 1167, "failed": 25, "errors": 4, "skipped": 25,
                                           "seconds": 311.95, "line": H200_SUMMARY}
    assert harness.pytest_summary("==================== 3 passed, 1 error in 0.52s ====================\n") == {
        "passed": 3, "failed": 0, "errors": 1, "skipped": 0, "seconds": 0.52, "line": "3 passed, 1 error in 0.52s"}
    assert harness.pytest_summary("\x1b[32m12 passed\x1b[0m, 1 xfailed in 3.00s\n")["passed"] == 12
    assert harness.pytest_summary("no tests ran in 0.01s")["passed"] == 0
    # Cut off before its closing line (the step's timeout): nothing to report, not a count from a test's output.
    assert harness.pytest_summary("FAILED tests/test_a.py::test_b - 3 passed in 2s\n....") is None
    assert harness.pytest_summary("captured stdout\n3 passed in 2s\n" + "F\n" * 30) is None


def _family_results(folder, names, **meta):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        harness.write_json(folder / f"{name}.json", dict({"complete": True, "quick": False}, **meta), [])


def test_gpu_check_record(tmp_path):
    folder = tmp_path / "nvidia-h200"
    names = ["norm", "attention"]
    assert not harness.bench_complete(folder, names)
    _family_results(folder, names[:1])
    assert not harness.bench_complete(folder, names)  # attention did not finish
    _family_results(folder, names[1:], complete=False)
    assert not harness.bench_complete(folder, names)
    _family_results(folder, names[1:], quick=True)
    assert not harness.bench_complete(folder, names)  # a --quick run is not the full run
    _family_results(folder, names[1:])
    assert harness.bench_complete(folder, names) and not harness.bench_complete(folder, [])

    log = tmp_path / "tests.log"
    log.write_text(f"...\n{H200_SUMMARY}\n")
    path = harness.write_gpu_check(tmp_path, log, names, device="NVIDIA H200", commit="bfeb9b1")
    assert path == folder / "gpu_check.json"
    record = json.loads(path.read_text())
    assert record.pop("date").startswith("20")
    assert record == {"commit": "bfeb9b1", "device": "NVIDIA H200", "passed": 1167, "failed": 25, "errors": 4,
                      "skipped": 25, "seconds": 311.95, "tests_interrupted": False, "bench_complete": True,
                      "pytest_summary": H200_SUMMARY}
    # Stopped at the step's budget (SIGINT): the counts of the tests that ran, marked as such.
    log.write_text("..F..\n!!!!!!!!!!!!!!!!!!!! KeyboardInterrupt !!!!!!!!!!!!!!!!!!!!\n"
                   "FAILED tests/test_a.py::test_b - AssertionError\n1 failed, 151 passed, 76 skipped in 44.53s\n")
    interrupted = json.loads(harness.write_gpu_check(tmp_path, log, names, device="NVIDIA H200",
                                                     commit="bfeb9b1").read_text())
    assert (interrupted["passed"], interrupted["failed"], interrupted["tests_interrupted"]) == (151, 1, True)
    log.write_text(f"...\n{H200_SUMMARY}\n")  # the whole run again, for the carry-over below
    harness.write_gpu_check(tmp_path, log, names, device="NVIDIA H200", commit="bfeb9b1")
    # A second call on the same machine that ran no tests: the first call's counts stay, bench_complete is anew.
    (folder / "norm.json").unlink()
    record = json.loads(harness.write_gpu_check(tmp_path, None, names, device="NVIDIA H200",
                                                commit="bfeb9b1").read_text())
    assert record["passed"] == 1167 and record["seconds"] == 311.95 and record["bench_complete"] is False
    # Another commit: nothing carried over.
    record = json.loads(harness.write_gpu_check(tmp_path, None, names, device="NVIDIA H200",
                                                commit="c0ffee1").read_text())
    assert record["passed"] is None and record["pytest_summary"] is None and record["commit"] == "c0ffee1"


def test_gpu_check_record_adds_a_resumed_calls_counts(tmp_path):
    """A call that resumed the suite (TESTS_RESUME=1: only the tests an interrupted call left) adds its counts to the
    earlier call's record of the same commit and device; its own interruption is what the record says."""
    names = ["norm"]
    log = tmp_path / "tests.log"
    log.write_text("..F..\n!!!!!!!!!!!!!!!!!!!! KeyboardInterrupt !!!!!!!!!!!!!!!!!!!!\n"
                   "1 failed, 151 passed, 76 skipped in 420.10s\n")
    harness.write_gpu_check(tmp_path, log, names, device="NVIDIA H200", commit="bfeb9b1")
    log.write_text("....\n2 failed, 900 passed, 3 skipped, 1 error in 200.00s\n")
    record = json.loads(harness.write_gpu_check(tmp_path, log, names, device="NVIDIA H200", commit="bfeb9b1",
                                                resumed=True).read_text())
    assert (record["passed"], record["failed"], record["errors"], record["skipped"]) == (1051, 3, 1, 79)
    assert record["seconds"] == 620.1 and record["tests_interrupted"] is False
    assert record["pytest_summary"] == ("1 failed, 151 passed, 76 skipped in 420.10s + resumed: 2 failed, 900 passed, "
                                        "3 skipped, 1 error in 200.00s")
    # Another commit's record is not added to.
    record = json.loads(harness.write_gpu_check(tmp_path, log, names, device="NVIDIA H200", commit="c0ffee1",
                                                resumed=True).read_text())
    assert record["passed"] == 900


@pytest.mark.parametrize("resume,commit", [(False, "abc1234"), (True, "abc1234"), (True, "c0ffee1")])
def test_gpu_check_resumes_the_tests_an_earlier_call_left(tmp_path, resume, commit):
    """TESTS_RESUME=1 hands pytest the list of finished tests to skip and keeps it, when it is this commit's; a
    fresh tests step, or a resume at another commit, starts a new list (the whole suite runs). The tolerance log
    (FASTLM_TOL_LOG, packed with the results) is added to by a resumed call and started afresh otherwise."""
    stub = tmp_path / "python"
    stub.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        case "$*" in
          *" pytest "*) echo "$FASTLM_TESTS_DONE $FASTLM_TESTS_RESUME" > {tmp_path / "env"};
                        echo '{{"name": "now"}}' >> "$FASTLM_TOL_LOG"
                        echo "1 passed in 0.01s"; exit 0 ;;
        esac
        exit 1
    """))
    stub.chmod(0o755)
    done = tmp_path / "done"
    earlier = "# commit abc1234\ntests/test_a.py::test_b\n"
    done.write_text(earlier)
    tol_log = tmp_path / "results" / "unknown-device" / "tolerance.jsonl"  # the stand-in python names no device
    tol_log.parent.mkdir(parents=True)
    tol_log.write_text('{"name": "earlier"}\n')
    env = _gpu_check_env(tmp_path, PY=str(stub), TESTS_DONE=str(done), TESTS_RESUME="1" if resume else "0",
                         FASTLM_COMMIT=commit)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "tests"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    resumed = resume and commit == "abc1234"
    assert (tmp_path / "env").read_text().split() == [str(done), "1" if resumed else "0"]
    assert done.read_text() == (earlier if resumed else f"# commit {commit}\n")
    assert ("the whole suite runs" in proc.stdout) == (resume and not resumed)
    assert [json.loads(line)["name"] for line in tol_log.read_text().splitlines()] == (
        ["earlier", "now"] if resumed else ["now"])


def test_per_file_seconds_reads_pytests_own_junit_reports(tmp_path):
    """The per-file times come from the reports pytest itself writes (functions, a class, parameters, a package
    folder), summed over several reports (a resumed call's), slowest file first; an unreadable report (a call cut
    before pytest wrote it) is passed over, and no test at all gives None."""
    pkg = tmp_path / "tests"
    pkg.mkdir()
    (pkg / "test_slow.py").write_text(textwrap.dedent("""\
        import time

        import pytest


        @pytest.mark.parametrize("t", [0.0, 0.3])
        def test_sleeps(t):
            time.sleep(t)


        class TestGroup:
            def test_quick(self):
                pass
    """))
    (pkg / "test_quick.py").write_text("def test_nothing():\n    pass\n")
    reports = []
    for i, target in enumerate(("tests/test_slow.py", "tests/test_quick.py")):
        reports.append(tmp_path / f"{i}.xml")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                               "-p", "no:randomly", f"--junitxml={reports[-1]}", target], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    (tmp_path / "cut.xml").write_text("<testsuites><testsuite")
    times = harness.per_file_seconds([*reports, tmp_path / "cut.xml", tmp_path / "absent.xml"])
    assert [(f["file"], f["tests"]) for f in times["files"]] == [("tests/test_slow.py", 3), ("tests/test_quick.py", 1)]
    slow = times["files"][0]
    assert slow["longest"] == "tests/test_slow.py::test_sleeps[0.3]" and 0.3 <= slow["longest_seconds"] < 30
    assert times["tests"] == 4 and times["seconds"] == pytest.approx(sum(f["seconds"] for f in times["files"]))
    assert harness.per_file_seconds([tmp_path / "cut.xml"]) is None
    assert harness.write_test_times(tmp_path / "results", [tmp_path / "cut.xml"], device="NVIDIA H200") is None
    path = harness.write_test_times(tmp_path / "results", reports, device="NVIDIA H200")
    assert path == tmp_path / "results" / "nvidia-h200" / "test_times.json"
    assert json.loads(path.read_text())["files"][0]["file"] == "tests/test_slow.py"


@pytest.mark.parametrize("resume", [False, True])
def test_gpu_check_records_each_test_files_seconds(tmp_path, resume):
    """The tests step has pytest write a JUnit report under this commit's folder (a fresh call empties it first, a
    resumed one adds to it), and the record sums the reports into test_times.json, packed with the results. A
    stand-in python plays pytest (writing a report at the path it is given) and runs everything else for real."""
    stub = tmp_path / "python"
    stub.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        case "$*" in
          *" pytest "*)
            for a in "$@"; do case "$a" in --junitxml=*) report=${{a#--junitxml=}} ;; esac; done
            echo '<testsuites><testsuite name="pytest"><testcase classname="tests.test_now" name="test_a" time="2.5"/>'\
'</testsuite></testsuites>' > "$report"
            echo "1 passed in 2.50s"; exit 0 ;;
        esac
        exec {sys.executable} "$@"
    """))
    stub.chmod(0o755)
    earlier = tmp_path / "junit" / "abc1234" / "1.xml"
    earlier.parent.mkdir(parents=True)
    earlier.write_text('<testsuites><testsuite name="pytest"><testcase classname="tests.test_before" name="test_b" '
                       'time="1.0"/></testsuite></testsuites>')
    (tmp_path / "tests-done").write_text("# commit abc1234\n")
    env = _gpu_check_env(tmp_path, PY=str(stub), FASTLM_COMMIT="abc1234", TESTS_RESUME="1" if resume else "0")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "tests"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    times = json.loads((tmp_path / "results" / "no-cuda-gpu" / "test_times.json").read_text())
    assert [f["file"] for f in times["files"]] == (["tests/test_now.py", "tests/test_before.py"] if resume
                                                   else ["tests/test_now.py"])
    assert "the slowest test files (seconds): tests/test_now.py 2" in proc.stdout, proc.stdout
    listing = subprocess.run(["tar", "-tzf", str(tmp_path / "out" / "results.tar.gz")], capture_output=True,
                             text=True).stdout
    assert "./no-cuda-gpu/test_times.json" in listing.split()


def test_gpu_check_bench_step_keeps_what_the_tests_and_host_steps_wrote(tmp_path):
    """The bench step starts a fresh sweep (an earlier call's family results go) but keeps the tests step's record,
    tolerance log and test times and the host step's call costs: the tests and the benchmarks take two calls, and
    the second call's tarball must hold all of it. A stand-in python that fails everything plays the machine."""
    stub = tmp_path / "python"
    stub.write_text("#!/bin/bash\nexit 1\n")
    stub.chmod(0o755)
    folder = tmp_path / "results" / "unknown-device"  # the stand-in names no device
    folder.mkdir(parents=True)
    kept = ["gpu_check.json", "tolerance.jsonl", "test_times.json", "call_cost.json", "call_cost.md"]
    for name in [*kept, "norm.json", "norm.md", "dispatch.json"]:
        (folder / name).write_text("{}")
    subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "bench"], cwd=REPO,
                   env=_gpu_check_env(tmp_path, PY=str(stub)), capture_output=True, text=True, timeout=120)
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept)


def test_gpu_check_script_records_and_packs_without_a_gpu(tmp_path):
    script = REPO / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    (out / "tests.log").write_text(f"===== tests =====\n{H200_SUMMARY}\n")
    env = _gpu_check_env(tmp_path, PY=sys.executable, FASTLM_COMMIT="abc1234")
    proc = subprocess.run(["bash", str(script), "record"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((results / "no-cuda-gpu" / "gpu_check.json").read_text())
    assert (record["commit"], record["device"], record["passed"], record["bench_complete"]) == (
        "abc1234", "no CUDA GPU", 1167, False)
    listing = subprocess.run(["tar", "-tzf", str(out / "results.tar.gz")], capture_output=True, text=True).stdout
    assert "./no-cuda-gpu/gpu_check.json" in listing.split()
    bad = subprocess.run(["bash", str(script), "--op", "softmax"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "NAME one of norm" in bad.stderr


def test_gpu_check_interrupts_an_overrunning_test_step_so_pytest_reports(tmp_path):
    """At its time limit the tests step gets SIGINT, which pytest (and xdist's controller) take as Ctrl-C, still
    printing the failures so far and the counts: TERM would leave a log of dots from a whole 15-minute lease. A
    stand-in for python that traps INT plays pytest."""
    stub = tmp_path / "python"
    stub.write_text(textwrap.dedent("""\
        #!/bin/bash
        case " $* " in *" pytest "*) ;; *) exit 1 ;; esac
        trap 'echo "stand-in pytest: interrupted"; exit 2' INT
        echo "stand-in pytest: started"
        sleep 30 & wait
        echo "stand-in pytest: ran to its end"
    """))
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = _gpu_check_env(tmp_path, PY=str(stub), TESTS_S="6")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "tests"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    log = (out / "tests.log").read_text()
    assert "stand-in pytest: interrupted" in log and "ran to its end" not in log, log
    assert "TIMED OUT after 6 s" in proc.stdout, proc.stdout


@pytest.mark.parametrize("xdist", [True, False])
def test_gpu_check_times_tests_out_by_thread_under_xdist(tmp_path, xdist):
    """Under xdist a test over its time limit ends by pytest-timeout's thread method (its worker exits, xdist
    replaces it and the suite goes on): the signal method waits for the test's thread to come back from C, which
    a hung kernel never does. Without xdist the signal method stays (a thread timeout would end the whole run). A
    stand-in python answers the plugin probes and records pytest's arguments."""
    stub = tmp_path / "python"
    stub.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        case "$*" in
          *"import xdist"*) exit {0 if xdist else 1} ;;
          *"import pytest_timeout"*) exit 0 ;;
          *" pytest "*) echo "$*" > {tmp_path / "args"}; echo "1 passed in 0.01s"; exit 0 ;;
        esac
        exit 1
    """))
    stub.chmod(0o755)
    env = _gpu_check_env(tmp_path, PY=str(stub))
    subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "tests"], cwd=REPO, env=env,
                   capture_output=True, text=True, timeout=60)
    args = (tmp_path / "args").read_text().split()
    assert "--timeout" in args and args[args.index("--timeout") + 1] == "150"
    assert f"--timeout-method={'thread' if xdist else 'signal'}" in args, args
    assert ("-n" in args) == xdist, args
    assert (args[args.index("--dist") + 1] == "load") if xdist else "--dist" not in args, args


@pytest.mark.parametrize("verdict", [0, 1, 2, 3])
def test_gpu_check_turns_the_direct_launch_path_off_when_its_check_fails(tmp_path, verdict):
    """The launch step runs benchmarks.launch_check. A failure (exit 1) turns the direct path off for the steps
    after it (FASTLM_TRITON_DIRECT=0) and, through DIRECT_VERDICT, for later calls on the machine at this commit,
    which do not check again (nor after a pass); no GPU (2) or a check that could not run (3) leaves the path on and
    records nothing. A stand-in python plays the check and records what pytest's environment says."""
    stub = tmp_path / "python"
    stub.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        case "$*" in
          *"benchmarks.launch_check"*) echo checked >> {tmp_path / "checks"}; exit {verdict} ;;
          *" pytest "*) echo "${{FASTLM_TRITON_DIRECT:-unset}}" > {tmp_path / "direct"}; echo "1 passed in 0.01s";
                        exit 0 ;;
        esac
        exit 1
    """))
    stub.chmod(0o755)
    record = tmp_path / "direct-verdict"
    env = _gpu_check_env(tmp_path, PY=str(stub), DIRECT_VERDICT=str(record), FASTLM_COMMIT="abc1234")
    script = ["bash", str(REPO / "scripts" / "gpu_check.sh")]

    def call(*steps, commit="abc1234"):
        (tmp_path / "direct").unlink(missing_ok=True)
        proc = subprocess.run(script + list(steps), cwd=REPO, env=dict(env, FASTLM_COMMIT=commit),
                              capture_output=True, text=True, timeout=60)
        return proc.stdout, (tmp_path / "direct").read_text().strip()

    out, direct = call("launch", "tests")
    off = verdict == 1
    assert direct == ("0" if off else "unset"), out
    assert ("direct launch path off" in out) == off
    assert (record.read_text() if record.exists() else None) == {0: "abc1234 ok\n", 1: "abc1234 off\n"}.get(verdict)
    # A later call on the same machine and commit keeps the verdict; it checks again only where there is none.
    out, direct = call("launch", "tests")
    assert direct == ("0" if off else "unset")
    assert (tmp_path / "checks").read_text().count("checked") == (1 if verdict in (0, 1) else 2)
    # Another commit's verdict is not this one's.
    out, direct = call("tests", commit="c0ffee1")
    assert direct == "unset"


def test_gpu_check_names_a_copy_without_git_by_its_sources(tmp_path):
    """The device tool's copy of the tree has no .git: the commit that keys the launch verdict (and the tests' done
    list) is then a hash of the sources, which an edit changes."""
    import shutil

    copy = tmp_path / "copy"
    for part in ("scripts", "fastlm", "kernels"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    stub = tmp_path / "python"
    stub.write_text("#!/bin/bash\ncase \"$*\" in *benchmarks.launch_check*) exit 0 ;; esac\nexit 1\n")
    stub.chmod(0o755)
    verdict = tmp_path / "verdict"
    env = _gpu_check_env(tmp_path, PY=str(stub), DIRECT_VERDICT=str(verdict), GIT_DIR=str(tmp_path / "no-git"))
    env.pop("FASTLM_COMMIT", None)

    def name():
        verdict.unlink(missing_ok=True)
        subprocess.run(["bash", str(copy / "scripts" / "gpu_check.sh"), "launch"], cwd=copy, env=env,
                       capture_output=True, text=True, timeout=60)
        return verdict.read_text().split()[0]

    first = name()
    assert first.startswith("tree-") and name() == first
    with (copy / "kernels" / "norm.py").open("a") as f:
        f.write("# an edit\n")
    assert name() != first


# ---------------------------------------------------------------------------------------------- static report


def test_parsers_on_cuobjdump_and_ptxas_text():
    sass = textwrap.dedent("""
        Function : _Z1fPf
        /*0040*/  LDG.E.128.CONSTANT R8, desc[UR4][R2.64] ;
        /*0050*/  LDG.E.U16 R9, desc[UR4][R4.64] ;
        /*0060*/  STL [R1], R9 ;
        /*0070*/  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0080*/  STG.E.64 desc[UR4][R4.64], R10 ;
        Function : _Z1gPf
        /*0010*/  LDG.E R2, desc[UR4][R2.64] ;
        /*0020*/  STG.E.U16 desc[UR4][R4.64], R2 ;
        Function : _Z1hPf
        /*0010*/  USETMAXREG.TRY R4, 0xe8 ;
        /*0020*/  UTMALDG.2D [UR8], [UR4] ;
    """)
    facts = static.parse_sass(sass)
    assert facts["_Z1fPf"] == {"ld": 128, "st": 64, "ldl_stl": 1, "mma": {"HGMMA"}, "tma": False, "ws": False,
                               "overlap": False, "turns": False}
    assert facts["_Z1hPf"]["tma"] and facts["_Z1hPf"]["ws"]
    assert facts["_Z1gPf"]["ld"] == 32 and facts["_Z1gPf"]["st"] == 16 and facts["_Z1gPf"]["ldl_stl"] == 0
    res = static.parse_res_usage(" Function _Z1fPf:\n  REG:40 STACK:16 SHARED:256 LOCAL:0 CONSTANT[0]:400\n")
    assert res == {"_Z1fPf": {"regs": 40, "stack": 16, "shared": 256, "local": 0}}
    ptxas = ("ptxas info    : Function properties for _Z1fPf\n"
             "    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads\n")
    assert static.parse_ptxas_spills(ptxas) == {"_Z1fPf": 20}
    row = dict(res["_Z1fPf"], **facts["_Z1fPf"], spill_bytes=20)
    assert static.problems(row) == ["local memory: 16 B stack, 0 B local", "20 B spilled",
                                    "1 local loads/stores (LDL/STL)"]
    assert static.problems({"error": "ptxas failed"}) == ["ptxas failed"]
    # A variant built to be warp-specialized that Triton left alone fails the report.
    clean = dict(res["_Z1fPf"], stack=0, ldl_stl=0, kernel="attn_fwd[bf16]", warp_spec=True)
    assert static.problems(dict(clean, ws=True)) == []
    assert "did not warp-specialize" in static.problems(dict(clean, ws=False))[0]
    assert static._shorten("void fastlm::norm_fwd_kernel<__nv_bfloat16, float, 4>(fastlm::NormFwdParams)") == \
        "norm_fwd_kernel<bf16, fp32, 4>"


def test_parser_on_nvdisasm_text():
    # nvdisasm (the report's reader of Triton's cubins) heads a kernel with its section's label, not "Function :".
    sass = textwrap.dedent("""
        //--------------------- .text._attn_fwd_kernel        --------------------------
        	.section	.text._attn_fwd_kernel,"ax",@progbits
        .text._attn_fwd_kernel:
                /*0340*/              @!P0 LDG.E.128 R4, desc[UR18][R8.64] ;
                /*0a30*/                   LDGSTS.E.64 [R3], desc[UR18][R8.64], !PT ;
                /*0b00*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
                /*0c00*/                   STG.E.U16 desc[UR4][R4.64], R2 ;
    """)
    assert static.parse_sass(sass) == {"_attn_fwd_kernel": {"ld": 128, "st": 16, "ldl_stl": 0, "mma": {"HGMMA"},
                                                            "tma": False, "ws": False, "overlap": False,
                                                            "turns": False}}


def test_report_disassembles_in_batches_per_architecture(monkeypatch):
    # disassemble_rows gives each row carrying code the facts of its own code, from batches of one architecture
    # of about DISASSEMBLY_BATCH_BYTES; a batch nvdisasm fails on fails its rows alone; rows without code are left.
    calls = []

    def disassemble(arch, codes):
        calls.append((arch, [len(c) for c in codes]))
        if b"bad" in codes:
            raise RuntimeError("nvdisasm failed: bad code")
        return [{"ld": len(c), "arch_read": arch} for c in codes]

    monkeypatch.setattr(static, "disassemble", disassemble)
    monkeypatch.setattr(static, "DISASSEMBLY_BATCH_BYTES", 100)
    rows = [{"arch": "sm_90a", "code": b"x" * 60}, {"arch": "sm_80", "code": b"x" * 16},
            {"arch": "sm_90a", "error": "E"}, {"arch": "sm_90a", "code": b"x" * 48},
            {"arch": "sm_90a", "code": b"x" * 32}, {"arch": "sm_80", "code": b"bad"}]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        static.disassemble_rows(pool, rows)
    assert calls == [("sm_80", [16, 3]), ("sm_90a", [60, 48]), ("sm_90a", [32])]
    assert [r.get("ld") for r in rows] == [60, None, None, 48, 32, None]
    assert all(r["arch_read"] == r["arch"] for r in rows if "ld" in r)
    assert rows[1]["error"] == rows[5]["error"] == "RuntimeError: nvdisasm failed: bad code"
    assert rows[2] == {"arch": "sm_90a", "error": "E"} and not any("code" in r for r in rows)


def _attn_variant(kernel, dtype="bf16", **constexprs):
    return static.Variant("attention.py", types.SimpleNamespace(__name__=kernel), {"Q": f"*{dtype}", "n": "i32"},
                          constexprs, {}, {})


def test_static_report_wants_wgmma_of_hopper_attention_tiles():
    # A 16-bit attention tile of 64 rows or more, built for sm_90a, must multiply on wgmma (HGMMA).
    assert static.expects_wgmma(_attn_variant("_attn_fwd_kernel", BLOCK_M=128, BLOCK_N=64), 90)
    assert static.expects_wgmma(_attn_variant("_attn_bwd_dkdv_kernel", BLOCK_M=16, BLOCK_N=128), 90)
    assert static.expects_wgmma(_attn_variant("_attn_decode_kernel", "fp16", BLOCK_M=64), 90)
    # Not on Ampere, not below 64 rows (wgmma's M), not in fp32, not in kernels without a dot.
    assert not static.expects_wgmma(_attn_variant("_attn_fwd_kernel", BLOCK_M=128, BLOCK_N=64), 80)
    assert not static.expects_wgmma(_attn_variant("_attn_fwd_kernel", BLOCK_M=16, BLOCK_N=32), 90)
    assert not static.expects_wgmma(_attn_variant("_attn_bwd_dkdv_kernel", BLOCK_M=16, BLOCK_N=32), 90)
    assert not static.expects_wgmma(_attn_variant("_attn_bwd_dq_kernel", "fp32", BLOCK_M=128), 90)
    assert not static.expects_wgmma(_attn_variant("_attn_bwd_delta_kernel", BLOCK_M=128), 90)
    row = {"stack": 0, "local": 0, "ldl_stl": 0, "mma": {"HMMA"}, "wgmma_expected": True}
    assert "without wgmma" in static.problems(row)[0] and "HMMA instead" in static.problems(row)[0]
    assert static.problems(dict(row, mma={"HGMMA", "HMMA"})) == []
    assert static.problems(dict(row, wgmma_expected=False)) == []



def test_static_report_wants_wgmma_of_cuda_kernels_written_on_it():
    # csrc's wgmma kernels must hold HGMMA in their sm_90a builds (their sm_80 builds are a trap); no other kernel.
    facts = {"stack": 0, "local": 0, "ldl_stl": 0, "mma": {"HMMA"}}
    names = {"attn_fwd_wgmma_kernel<bf16, 128, true, false>": facts, "attn_fwd_kernel<bf16, 128, true>": facts}
    rows = {r["arch"]: r for arch in ("sm_80", "sm_90a")
            for r in static._cuda_rows({"source": "attention.cu", "arch": arch}, names, {}, 0.0)
            if "wgmma" in r["kernel"]}
    assert rows["sm_90a"]["wgmma_expected"] and not rows["sm_80"]["wgmma_expected"]
    assert "without wgmma" in static.problems(rows["sm_90a"])[0]
    assert static.problems(dict(rows["sm_90a"], mma={"HGMMA"})) == []
    others = static._cuda_rows({"source": "attention.cu", "arch": "sm_90a"}, names, {}, 0.0)
    assert [r["wgmma_expected"] for r in others if "wgmma" not in r["kernel"]] == [False]


def _required_of(names, fact, kernels):
    """The report's rows of `names` (kernel → SASS facts, `fact` missing) on sm_80 and sm_90a: `fact` must be
    required of exactly `kernels` on sm_90a and of none on sm_80; a row fails exactly where it is required, and
    passes once it holds. Returns the sm_90a rows."""
    for arch in ("sm_80", "sm_90a"):
        rows = static._cuda_rows({"source": "attention.cu", "arch": arch}, names, {}, 0.0)
        assert [r["kernel"] for r in rows if r[f"{fact}_expected"]] == (kernels if arch == "sm_90a" else [])
        for r in rows:
            assert bool(static.problems(r)) == r[f"{fact}_expected"]
            assert static.problems(dict(r, **{fact: True})) == []
    return rows


def test_static_report_wants_the_overlapped_wgmma_forward_to_overlap():
    # parse_sass's overlap: an exp2 while a wgmma group may run (after an HGMMA, before the wait for all groups).
    def kernel(*ops):
        return "Function : k\n" + "".join(f"  /*{i:04x}*/  {op} ;\n" for i, op in enumerate(ops))

    overlapped = kernel("HGMMA.64x128x16.F32.BF16 R88, gdesc[UR20], R88, gsb0", "WARPGROUP.ARRIVE",
                        "HGMMA.64x128x16.F32.BF16 R24, R180, gdesc[UR20].tnspB, R24, gsb0",
                        "WARPGROUP.DEPBAR.LE gsb0, 0x1", "MUFU.EX2 R3, R3", "WARPGROUP.DEPBAR.LE gsb0, 0x0")
    serial = kernel("HGMMA.64x128x16.F32.BF16 R88, gdesc[UR20], R88, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x0",
                    "MUFU.EX2 R3, R3", "HGMMA.64x128x16.F32.BF16 R24, R180, gdesc[UR20].tnspB, R24, gsb0",
                    "WARPGROUP.DEPBAR.LE gsb0, 0x0", "MUFU.EX2 R4, R4")
    assert static.parse_sass(overlapped)["k"]["overlap"] and not static.parse_sass(serial)["k"]["overlap"]
    # Required of csrc's forward built with kOverlap (its last template argument) on sm_90a, of no other build.
    facts = {"stack": 0, "local": 0, "ldl_stl": 0, "mma": {"HGMMA"}, "overlap": False}
    names = {f"attn_fwd_wgmma_kernel<__nv_bfloat16, 128, {softcap}, {overlap}>(AttnParams)": facts
             for softcap in ("false", "true") for overlap in ("false", "true")}
    names["attn_bwd_dq_wgmma_kernel<__half, 128>(AttnBwdParams)"] = facts
    rows = _required_of(names, "overlap", ["attn_fwd_wgmma_kernel<bf16, 128, false, true>",
                                           "attn_fwd_wgmma_kernel<bf16, 128, true, true>"])
    assert "serialized" in static.problems(dict(rows[-1], overlap=False))[0]
    # The warp-specialized forward: HGMMA, the overlap, TMA loads and setmaxnreg, on sm_90a.
    ws = static._cuda_rows({"source": "attention.cu", "arch": "sm_90a"},
                           {"attn_fwd_ws_kernel<__half, 64, false>(AttnParams, CUtensorMap)": facts}, {}, 0.0)[0]
    assert ws["wgmma_expected"] and ws["overlap_expected"] and ws["ws_expected"]
    assert static.problems(dict(ws, overlap=True, tma=True, ws=True)) == []
    assert "UTMALDG/USETMAXREG" in " ".join(static.problems(dict(ws, overlap=True, tma=True, ws=False)))
    assert len(static.problems(dict(ws, mma=set(), overlap=False, tma=False, ws=False))) == 3


def test_static_report_wants_the_pingpong_forward_to_take_turns():
    # parse_sass's turns: between a BAR.SYNC on barrier 2 or 3 (the turn taken) and a BAR.ARV on one (passed), a
    # block's S (both operands in shared memory) and P·V (A from registers) HGMMAs. Both groups' predicated syncs
    # come one after the other in the SASS, as ptxas lays them out.
    def kernel(*ops):
        return "Function : k\n" + "".join(f"  /*{i:04x}*/  {op} ;\n" for i, op in enumerate(ops))

    s = "HGMMA.64x128x16.F32.BF16 R88, gdesc[UR24], RZ, !UPT"
    pv = "HGMMA.64x128x16.F32.BF16 R24, R180, gdesc[UR20].tnspB, R24, gsb0"
    turns = kernel("@P5 BAR.SYNC.DEFER_BLOCKING 0x3, 0x100", "@!P5 BAR.SYNC.DEFER_BLOCKING 0x2, 0x100",
                   "WARPGROUP.ARRIVE", s, pv, "@!P5 BRA 0x5470", "BAR.ARV 0x2, 0x100", "BRA 0x5490",
                   "BAR.ARV 0x3, 0x100", "WARPGROUP.DEPBAR.LE gsb0, 0x1")
    assert static.parse_sass(turns)["k"]["turns"]
    for ops in ((s, pv, "BAR.ARV 0x2, 0x100"),  # no turn taken
                ("BAR.SYNC.DEFER_BLOCKING 0x2, 0x100", "BAR.ARV 0x3, 0x100", s, pv),  # issued after the turn passed
                ("BAR.SYNC.DEFER_BLOCKING 0x2, 0x100", s, "BAR.ARV 0x3, 0x100", pv),  # P·V drifted past the pass
                ("BAR.SYNC.DEFER_BLOCKING 0x2, 0x100", pv, "BAR.ARV 0x3, 0x100", s),  # S drifted past it
                ("BAR.SYNC.DEFER_BLOCKING 0x0", s, pv, "BAR.ARV 0x1, 0x100"),  # __syncthreads' and other barriers
                ("BAR.SYNC.DEFER_BLOCKING 0x2, 0x100", s, pv)):  # never passed
        assert not static.parse_sass(kernel(*ops))["k"]["turns"], ops
    # Required of the warp-specialized forward built with kPingpong (its last template argument) on sm_90a only.
    facts = {"stack": 0, "local": 0, "ldl_stl": 0, "mma": {"HGMMA"}, "overlap": True, "tma": True, "ws": True,
             "turns": False}
    names = {f"attn_fwd_ws_kernel<__half, 128, {softcap}, {pingpong}>(AttnParams, CUtensorMap)": facts
             for softcap in ("false", "true") for pingpong in ("false", "true")}
    row = _required_of(names, "turns", ["attn_fwd_ws_kernel<fp16, 128, false, true>",
                                        "attn_fwd_ws_kernel<fp16, 128, true, true>"])[-1]
    assert "pingpong" in static.problems(row)[0] and "(2, 3)" in static.problems(row)[0]


TINY_KERNELS = '''
import torch
import triton
import triton.language as tl


@triton.jit
def _scale_rows_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 0) / N + 1e-6)
    tl.store(Y + offs, (x * r).to(Y.dtype.element_ty), mask=offs < N)


def scale_rows(x, block, num_warps):
    y = torch.empty_like(x)
    _scale_rows_kernel[(1,)](x, y, x.numel(), BLOCK=block, num_warps=num_warps)
    return y


def launch(found):
    x = torch.empty(4096, dtype=torch.bfloat16)
    scale_rows(x, 1024, 4)  # fits
    scale_rows(x, 16384, 1)  # 16384 fp32 values held by one warp: 512 a thread, far past the 255 registers there are
    scale_rows(x, 1024, 4)  # the same variant again: recorded once
'''


COMPILE_TINY = '''
import json, pathlib, sys

import fastlm_tiny_kernels as tiny
from triton.backends.nvidia.compiler import sm_arch_from_capability

from benchmarks import static

tmp, caps = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
tiny_variants = static.record(tiny.launch, "tiny.py")
norm = next(v for v in static.triton_variants() if v.source == "norm.py" and v.num_warps >= 4)
rows = [static.compile_triton(v, cap) for v in tiny_variants for cap in caps]
rows.append(static.compile_triton(norm, 90))
# The tiny variants' SASS facts at every architecture the report builds for, read as nvdisasm reads each cubin (an
# ELF file), and as the report reads them: the code of an architecture's kernels disassembled in one batch.
from_cubins, batched = [], []
for cap in static.TRITON_CAPS:
    cubins = [static.compile_cubin(v, cap).asm["cubin"] for v in tiny_variants]
    for i, cubin in enumerate(cubins):
        path = tmp / f"{cap}-{i}.cubin"
        path.write_bytes(cubin)
        (facts,) = static.inspect_cubin(path).values()
        from_cubins.append({key: facts[key] for key in static._no_sass()})
    codes = [next(iter(static.text_sections(cubin).values())) for cubin in cubins]
    batched += static.disassemble(sm_arch_from_capability(cap), codes)
print(json.dumps([len(tiny_variants), [v.aligned() for v in tiny_variants], norm.name, rows, from_cubins, batched],
                 default=sorted))
'''


def _compile_triton(path, caps):
    """The static report's recorder on the tiny module's launcher and on fastlm's launchers, then
    static.compile_triton on (tiny variants at each capability, one norm variant with ≥ 4 warps), and the tiny
    variants' SASS facts read from their cubins and from a batch (COMPILE_TINY), in a fresh Python without
    TRITON_INTERPRET: `make test` runs pytest under Triton's interpreter, whose @triton.jit functions cannot be
    compiled (nor recorded)."""
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(path), str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", COMPILE_TINY, str(path), json.dumps(caps)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_static_report_reads_compiled_triton_kernels(tmp_path):
    (tmp_path / "fastlm_tiny_kernels.py").write_text(TINY_KERNELS)
    n_tiny, aligned, norm_name, (fits, spills, shipped), from_cubins, batched = _compile_triton(tmp_path, (90,))
    # Recorded as the JIT binds the launch: the pointers and N = 4096 divisible by 16, one variant per config.
    assert n_tiny == 2 and aligned == [["X", "Y", "N"]] * 2
    assert "error" not in fits, fits.get("error")
    assert fits["source"] == "tiny.py" and fits["arch"] == "sm_90a" and fits["warps"] == 4
    assert 0 < fits["regs"] <= 255
    assert fits["ld"] == 128 and fits["st"] == 128  # the divisible-by-16 hint gives 16-byte accesses
    assert fits["stack"] == fits["local"] == fits["ldl_stl"] == 0 and static.problems(fits) == []

    assert spills["ldl_stl"] > 0 and spills["stack"] > 0
    assert any("LDL/STL" in why for why in static.problems(spills))

    # One variant the norm launchers ship, found the way the report finds it.
    assert "error" not in shipped, shipped.get("error")
    assert shipped["source"] == "norm.py" and shipped["kernel"] == norm_name and norm_name.startswith("norm_")
    assert shipped["regs"] > 0 and shipped["local"] == 0

    # The report disassembles an architecture's kernels in batches (static.disassemble, raw code end to end): each
    # kernel's facts there are those read from its own cubin, at sm_80 and sm_90a, and they tell the two apart.
    assert batched == from_cubins and len(batched) == 2 * len(static.TRITON_CAPS)
    assert from_cubins[0]["ldl_stl"] == 0 < from_cubins[1]["ldl_stl"] and from_cubins[0]["ld"] == 128


def test_static_report_uses_setup_py_flags():
    build = static.setup_build()
    assert build["archs"] == os.environ.get("FASTLM_CUDA_ARCHS", "80 90a").split()
    if build["nvcc"] is not None:
        assert "-O3" in build["cflags"] and "-std=c++17" in build["cflags"]


def test_every_family_is_discovered():
    from benchmarks.__main__ import families

    assert {"norm", "cross_entropy", "linear_cross_entropy"} <= set(families())


# ---------------------------------------------------------------------------------------------- attention


def _attn_case(seqlen=256, head_dim=8, causal=False, tokens=1024, hidden=16, dtype=torch.bfloat16):
    case = attention._case(seqlen, head_dim, causal, tokens=tokens, hidden=hidden)
    return harness.Case(case.op, dtype, case.params)


def _decode_case(batch=2, kv=1000, heads_q=4, heads_kv=2, head_dim=8):
    return harness.Case("attention_decode", torch.bfloat16, {"batch": batch, "seqlen_q": 1, "seqlen_k": kv,
                                                             "heads_q": heads_q, "heads_kv": heads_kv,
                                                             "head_dim": head_dim})


def test_attention_flops_and_decode_bytes():
    # 1024 tokens in sequences of 256 (batch 4), 2 heads of dimension 8: 4 · 4 · 2 · 256 · 256 · 8 = 2**24 FLOPs.
    case = _attn_case()
    assert attention.batch_of(case) == 4 and case.params["heads"] == 2
    assert [attention.attention_flops(case, m) for m in harness.MODES] == [2**24, 41943040, 58720256]  # ×1, 2.5, 3.5
    assert [attention.attention_flops(_attn_case(causal=True), m) for m in harness.MODES] == [2**23, 20971520,
                                                                                             29360128]
    # seqlen 16k, head dim 128 (16 heads), batch 1: 4 · 16 · 16384² · 128 = 2**41; TARGETS.md's 550 TFLOP/s is 4 ms.
    big = attention._case(16384, 128, False)
    assert attention.attention_flops(big, "fwd") == 2**41
    assert harness.rate(2**41, 4.0, "flops") == pytest.approx(549.8, rel=1e-3)
    # The math backend's float32 scores at that shape: 16 heads · 16384² · 4 bytes = 16 GiB.
    assert attention.math_scores_bytes(big) == 16 * 2**30
    # batch 2 of 1000 cached tokens, 2 KV heads of dimension 8, bf16: K and V are 2 · 2 · 1000 · 2 · 8 · 2 = 128000
    # bytes; q and the output 2 · (2 · 1 · 4 · 8 · 2) = 256.
    dec = _decode_case()
    assert attention.kv_cache_bytes(dec) == 128000
    assert attention.decode_bytes(dec, "fwd") == 128256
    with pytest.raises(ValueError, match="forward only"):
        attention.decode_bytes(dec, "bwd")
    full = attention._decode_case(64, 32768)  # 8 GiB of KV cache, 1 MiB of q and output
    assert attention.decode_bytes(full, "fwd") == 8 * 2**30 + 2**20


def test_attention_sweeps_fit_the_memory_caps_and_the_budget():
    full = attention.attention_cases(quick=False)
    assert len(full) == 24 and len({c.label for c in full}) == 24
    assert {c.params["seqlen"] for c in full} == set(attention.SEQLENS) == {512, 1024, 2048, 4096, 8192, 16384}
    assert {(c.params["head_dim"], c.params["heads"]) for c in full} == {(64, 32), (128, 16)}
    assert {c.params["causal"] for c in full} == {False, True} and {c.dtype for c in full} == {torch.bfloat16}
    assert all(attention.batch_of(c) * c.params["seqlen"] == 16384 for c in full)
    providers = {p.name: p for p in attention.FAMILY.providers}
    # The math backend runs where its float32 scores fit 2 GiB: seqlen ≤ 1024 at head dim 64, ≤ 2048 at 128.
    math_runs = {(c.params["seqlen"], c.params["head_dim"]) for c in full if not providers["sdpa-math"].skip(c)}
    assert math_runs == {(512, 64), (1024, 64), (512, 128), (1024, 128), (2048, 128)}
    assert all(attention.math_scores_bytes(c) <= attention.MATH_MAX_SCORES_BYTES for c in full
               if not providers["sdpa-math"].skip(c))
    skipped = next(c for c in full if providers["sdpa-math"].skip(c))
    assert "GiB" in providers["sdpa-math"].skip(skipped)
    assert sum(not providers["flex"].skip(c) for c in full) == 2
    assert sum(not providers["sdpa-efficient"].skip(c) for c in full) == 8  # EFFICIENT_SEQLENS: 4096 and 16384
    for name in ("fastlm-triton", "fastlm-cuda", "sdpa-flash", "sdpa-cudnn"):
        assert not any(providers[name].skip(c) for c in full)

    grid, dec = attention.decode_grid(), attention.decode_cases(quick=False)
    assert dec == [c for c in grid if attention.kv_cache_bytes(c) <= 16 * 2**30]
    assert [(c.params["batch"], c.params["seqlen_k"]) for c in grid if c not in dec] == [(64, 131072)]  # 32 GiB
    assert len(dec) == 15 and max(map(attention.kv_cache_bytes, dec)) == 8 * 2**30
    assert all(c.params["seqlen_q"] == 1 and (c.params["heads_q"], c.params["heads_kv"]) == (32, 8) for c in dec)

    # The run-time model (an estimate) fits the family budgets; the quick subsets are 2 cases each and cheaper.
    for family, budget in ((attention.FAMILY, attention.ATTENTION_BUDGET_S),
                           (attention.DECODE_FAMILY, attention.DECODE_BUDGET_S)):
        quick = family.cases(True)
        assert 2 <= len(quick) <= 3 and all(c.op == family.name for c in quick + family.cases(False))
        assert attention.estimated_seconds(family, quick=True) < attention.estimated_seconds(family) <= budget
    assert attention.ATTENTION_BUDGET_S <= 150
    # One mode whose call takes 100 ms: 1 + 5 sizing calls, one warm-up, one timed, one for peak memory.
    assert attention._mode_s(100.0) == pytest.approx(0.9 + attention.EST_MODE_OVERHEAD_S)
    assert attention._mode_s(0.01) == pytest.approx(0.05007 + attention.EST_MODE_OVERHEAD_S)


def test_attention_families_and_their_providers():
    assert attention.FAMILIES == (attention.FAMILY, attention.DECODE_FAMILY)
    assert [(f.name, f.metric, f.modes) for f in attention.FAMILIES] == [
        ("attention", "flops", harness.MODES), ("attention_decode", "bytes", ("fwd",))]
    sdpa = ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient"]
    assert [p.name for p in attention.FAMILY.providers] == ["fastlm-triton", "fastlm-cuda", "fastlm-cuda-wgmma",
                                                            "fastlm-cuda-wgmma-serial", "fastlm-cuda-wgmma-ws",
                                                            "fastlm-cuda-wgmma-pingpong", *sdpa, "sdpa-math", "flex"]
    assert [p.name for p in attention.DECODE_FAMILY.providers] == ["fastlm-triton", "fastlm-cuda"] + sdpa + ["flex"]
    for family in attention.FAMILIES:
        assert family.reference == "sdpa-flash"
        assert [p.backend for p in family.providers if p.backend] == ["triton", "cuda"]
    cpu = torch.device("cpu")
    assert attention.unavailable_reason("torch", cpu) == ""
    assert attention.unavailable_reason("torch", cpu, decode=True) == ""
    if not torch.cuda.is_available():
        assert "GPU" in attention.unavailable_reason("cuda", cpu)
        assert next(p for p in attention.FAMILY.providers if p.name == "sdpa-flash").available() == (
            False, "no CUDA GPU")
    # The cuda backend's wgmma forward and backward: peers (the dispatch table's "cuda" stays the default path),
    # timed at WGMMA_SEQLENS (the overlapped forward loop) and WGMMA_FORM_CASES (the serial loop, the
    # warp-specialized kernel with and without its pingpong) only, with ATTN_HOPPER, ATTN_HOPPER_BWD and the form set inside their contexts and
    # restored after.
    import fastlm
    from fastlm import _cuda

    for name, form, timed in (("fastlm-cuda-wgmma", "overlap", lambda s, d, c: s in attention.WGMMA_SEQLENS),
                              ("fastlm-cuda-wgmma-serial", "serial", lambda s, d, c: (s, d, c) == (4096, 128, True)),
                              ("fastlm-cuda-wgmma-ws", "ws", lambda s, d, c: (s, d, c) == (4096, 128, True)),
                              ("fastlm-cuda-wgmma-pingpong", "pingpong",
                               lambda s, d, c: (s, d, c) == (4096, 128, True))):
        wgmma = next(p for p in attention.FAMILY.providers if p.name == name)
        assert wgmma.backend is None and wgmma.native is None
        assert [(c.params["seqlen"], c.params["head_dim"], c.params["causal"]) for c in attention.attention_cases(False)
                if not wgmma.skip(c)] == [(s, d, causal) for d in attention.HEAD_DIMS for causal in (False, True)
                                          for s in attention.SEQLENS if timed(s, d, causal)]
        assert [c for c in attention.attention_cases(True) if not wgmma.skip(c)] == [
            c for c in attention.attention_cases(True) if c.params["seqlen"] == 4096]
        assert "4096" in wgmma.skip(_attn_case(512, 64, True))
        before = _cuda.ATTN_HOPPER, _cuda.ATTN_HOPPER_BWD, _cuda.ATTN_HOPPER_FWD
        _cuda.ATTN_HOPPER_FWD = "elsewhere"
        try:
            with wgmma.context():
                assert _cuda.ATTN_HOPPER is _cuda.ATTN_HOPPER_BWD is True and fastlm.get_backend() == "cuda"
                assert _cuda.ATTN_HOPPER_FWD == form
            assert (_cuda.ATTN_HOPPER, _cuda.ATTN_HOPPER_BWD, _cuda.ATTN_HOPPER_FWD) == (*before[:2], "elsewhere")
        finally:
            _cuda.ATTN_HOPPER_FWD = before[2]
        if not torch.cuda.is_available():
            assert wgmma.available()[0] is False and "GPU" in wgmma.available()[1]


def _attention_family_on_cpu(family):
    """The family as it runs on CPU tensors: both fastlm providers through the torch backend; the SDPA backends
    that have a CPU kernel (flash, math) usable; the others as their availability says (no GPU: missing);
    FlexAttention left to its skip rule."""
    import fastlm

    providers = [dataclasses.replace(p, context=lambda: fastlm.use_backend("torch")) if p.backend else p
                 for p in family.providers]
    cpu_ok = {"fastlm-triton", "fastlm-cuda", "sdpa-flash", "sdpa-math"}
    availability = {p.name: (True, "") if p.name in cpu_ok else p.available() for p in providers}
    return dataclasses.replace(family, providers=providers), availability


def test_attention_cases_run_on_cpu(cpu_timers, monkeypatch):
    family, availability = _attention_family_on_cpu(attention.FAMILY)
    cpu = torch.device("cpu")
    for case in (_attn_case(128, 16, True, tokens=256, hidden=32),
                 _attn_case(64, 8, False, tokens=128, hidden=16, dtype=torch.float32)):
        rows = harness.run_case(family, case, availability, cpu, l2_bytes=1024, ceiling=100.0)
        assert len(rows) == len(family.providers) * len(harness.MODES)
        by = {(r["provider"], r["mode"]): r for r in rows}
        for name in ("fastlm-triton", "fastlm-cuda", "sdpa-flash", "sdpa-math"):
            for mode in harness.MODES:
                r = by[(name, mode)]
                assert r["status"] == "ok", (case.label, name, r["reason"])
                assert r["work"] == attention.attention_flops(case, mode) and r["unit"] == "TFLOP/s"
                assert r["rate"] == pytest.approx(harness.rate(r["work"], r["ms"], "flops"))
                if name != "sdpa-flash":
                    assert r["rel_err"] < family.tolerance[case.dtype]
        if not torch.cuda.is_available():
            assert by[("sdpa-cudnn", "fwd")]["status"] == "missing"
        assert by[("flex", "bwd")]["status"] == "skipped" and "FlexAttention" in by[("flex", "bwd")]["reason"]
        ours = by[("fastlm-triton", "fwd+bwd")]
        assert set(ours["vs"]) == {"fastlm-cuda-wgmma", "fastlm-cuda-wgmma-serial", "fastlm-cuda-wgmma-ws",
                                   "fastlm-cuda-wgmma-pingpong", "sdpa-flash", "sdpa-cudnn",
                                   "sdpa-efficient", "sdpa-math",
                                   "flex"}
        assert ours["vs"]["flex"] == "skipped" and isinstance(ours["vs"]["sdpa-math"], float)
    # A case whose scores exceed the math backend's cap: its rows say skipped, with the sizes.
    monkeypatch.setattr(attention, "MATH_MAX_SCORES_BYTES", 1024)
    rows = harness.run_case(family, _attn_case(64, 8, False, tokens=128, hidden=16), availability, cpu,
                            l2_bytes=1024, ceiling=100.0)
    math_rows = [r for r in rows if r["provider"] == "sdpa-math"]
    assert [r["status"] for r in math_rows] == ["skipped"] * 3 and "MATH_MAX_SCORES_BYTES" in math_rows[0]["reason"]


def test_attention_decode_case_runs_on_cpu_forward_only(cpu_timers, tmp_path):
    family, availability = _attention_family_on_cpu(attention.DECODE_FAMILY)
    case = _decode_case(batch=2, kv=300, heads_q=8, heads_kv=2, head_dim=16)
    rows = harness.run_case(family, case, availability, torch.device("cpu"), l2_bytes=1024, ceiling=100.0)
    assert {r["mode"] for r in rows} == {"fwd"} and len(rows) == len(family.providers)
    assert cpu_timers.count("bwd") == 0
    by = {r["provider"]: r for r in rows}
    for name in ("fastlm-triton", "fastlm-cuda", "sdpa-flash"):
        assert by[name]["status"] == "ok", (name, by[name]["reason"])
        assert by[name]["work"] == attention.decode_bytes(case, "fwd") and by[name]["unit"] == "GB/s"
    assert by["fastlm-triton"]["rel_err"] < family.tolerance[torch.bfloat16]
    assert by["flex"]["status"] == "skipped"
    choice, _ = harness.dispatch_summary(rows, family.providers, family.modes)
    assert set(choice["attention_decode"]) == {"fwd", "order"}
    ran = {"triton", "cuda", "torch:sdpa-flash", "torch:sdpa-cudnn"} & {
        (p.backend or p.native) for p in family.providers if by[p.name]["status"] == "ok"}
    assert set(choice["attention_decode"]["order"]) == ran and {"triton", "cuda", "torch:sdpa-flash"} <= ran

    meta = {"date": "2026-01-01T00:00:00+00:00", "device": "Test GPU", "torch": "2.x", "cuda": "13.0",
            "triton": "3.6.0", "fastlm": "0.1.0", "git_commit": "abc1234", "liger_kernel": "missing",
            "ceiling": 3000.0, "quick": False}
    paths = harness.write_results(tmp_path, family, meta, rows)
    md = paths[1].read_text()
    assert "## fwd (GB/s)" in md and "## bwd" not in md and "## Peak extra memory, fwd (MiB)" in md
    assert "flex (skipped, 1 rows): FlexAttention compiles every shape anew" in md
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_families_are_discovered_and_need_a_gpu():
    from benchmarks.__main__ import families

    assert {"attention", "attention_decode"} <= set(families())
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    for op in ("attention", "attention_decode"):
        proc = subprocess.run([sys.executable, "-m", "benchmarks", "--op", op], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "no CUDA GPU" in proc.stdout.splitlines()[0]


# ---------------------------------------------------------------------------------------------- end to end


def test_e2e_flops_cases_and_providers():
    from benchmarks import e2e

    gpt2, llama = e2e.cases(quick=False)
    assert [c.params for c in (gpt2, llama)] == [{"model": "gpt2-124m", "batch": 16, "seq": 1024},
                                                 {"model": "llama-1b", "batch": 4, "seq": 2048}]
    assert [c.params["model"] for c in e2e.cases(quick=True)] == ["gpt2-124m"]
    assert {c.dtype for c in (gpt2, llama)} == {torch.bfloat16} and gpt2.op == llama.op == "train_step"
    # GPT-2 small: 123,532,032 matmul parameters (85M in the blocks, the tied 50257 × 768 head counted), 6 FLOPs
    # each per token, and causal attention's 6 · 12 layers · 12 heads · 64 · 1024 per token; 16384 tokens a step.
    per_token = 6 * 123_532_032 + 6 * 12 * 12 * 64 * 1024
    assert e2e.work(gpt2, "fwd") == per_token * 16 * 1024
    # Llama 3.2 1B: 16 layers of 2048 · (32 + 2·8) · 64 + 2048² attention and 3 · 2048 · 8192 MLP, the 128256 head.
    matmul = 16 * (2048 * 48 * 64 + 2048 * 2048 + 3 * 2048 * 8192) + 128256 * 2048
    assert e2e.work(llama, "fwd") == (6 * matmul + 6 * 16 * 32 * 64 * 2048) * 4 * 2048
    # 64 TFLOP a Llama step: at 400 TFLOP/s (about half an H100's bf16 rate), 160 ms and 51k tokens/s.
    assert harness.rate(e2e.work(llama, "fwd"), 160.0, "flops") == pytest.approx(400, rel=0.01)

    family = e2e.FAMILY
    assert family.modes == ("fwd",) and family.metric == "flops" and family.reference == "torch"
    names = [p.name for p in family.providers]
    assert names == ["fastlm", "torch", "torch.compile", "hf", "liger"]  # liger last: it patches transformers
    assert [p.name for p in family.providers if p.backend] == ["fastlm"]
    from benchmarks.__main__ import families

    assert families()["e2e"] is family


def test_e2e_cases_fit_their_models_and_the_eager_twin_refuses_longer_sequences():
    """GPT-2's learned position table has block_size rows: a longer sequence made the eager twin's embedding gather
    read out of bounds (a device-side assert on the H200 that ended the whole benchmark run)."""
    from benchmarks import e2e
    import fastlm
    from fastlm.models import GPT, GPTConfig

    for case in e2e.cases(quick=False) + e2e.cases(quick=True):
        config = e2e.model_config(case.params["model"])
        assert case.params["seq"] <= config.block_size, case.label
        assert e2e.tokens(case) == {"gpt2-124m": 16384, "llama-1b": 8192}[case.params["model"]]
    for config in (GPTConfig.gpt2_tiny(), GPTConfig.llama_tiny()):
        model = GPT(config)
        twin = e2e.EagerGPT.from_gpt(model)
        idx = torch.randint(0, config.vocab_size, (1, config.block_size + 1))
        message = f"positions up to {config.block_size + 1} exceed block_size {config.block_size}"
        with fastlm.use_backend("torch"):
            with pytest.raises(ValueError, match=message):
                model(idx, idx)
            with pytest.raises(ValueError, match=message):
                twin(idx, idx)
            with pytest.raises(ValueError, match=message):
                twin.logits(idx)


def test_e2e_eager_twin_and_labels_match_the_model():
    from benchmarks import e2e
    import fastlm
    from fastlm.models import GPT, GPTConfig

    for config in (GPTConfig.gpt2_tiny(init_std=0.1), GPTConfig.llama_tiny(init_std=0.1)):
        torch.manual_seed(0)
        model = GPT(config)
        twin = e2e.EagerGPT.from_gpt(model)
        assert twin.state_dict().keys() == model.state_dict().keys()
        assert (twin.lm_head.weight is twin.wte.weight) == config.tie_embeddings
        idx = torch.randint(0, config.vocab_size, (2, 16))
        targets = torch.randint(0, config.vocab_size, (2, 16))
        targets[:, -1] = e2e.IGNORE_INDEX
        with fastlm.use_backend("torch"), torch.no_grad():
            torch.testing.assert_close(twin(idx, targets), model(idx, targets))
            # Hugging Face's loss on hf_labels(targets): position t predicts labels[t + 1], the same pairs as ours.
            logits = model(idx, all_logits=True)
            labels = e2e.hf_labels(targets)
            shifted = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            torch.testing.assert_close(shifted, model(idx, targets))


def test_e2e_case_runs_on_cpu(cpu_timers, monkeypatch):
    """The family's case machinery on CPU at tiny sizes: fastlm (its reference backend here) and the eager twin, a
    training step each, checked against each other, every row filled."""
    from benchmarks import e2e
    from fastlm.models import GPTConfig

    monkeypatch.setattr(e2e, "DEVICE", "cpu")
    monkeypatch.setattr(e2e, "model_config", lambda name: (GPTConfig.gpt2_tiny() if name.startswith("gpt2")
                                                           else GPTConfig.llama_tiny()))
    providers = [p for p in e2e.FAMILY.providers if p.name in ("fastlm", "torch")]
    family = harness.Family(name="e2e", metric="flops", cases=None, providers=providers,
                            make_inputs=e2e.make_inputs, work=e2e.work, reference="torch", x_key="seq",
                            tolerance=e2e.TOLERANCE, modes=e2e.FAMILY.modes)
    for model in ("gpt2-124m", "llama-1b"):
        case = e2e._case(model, batch=2, seq=16)
        availability = {p.name: p.available() for p in providers}
        rows = harness.run_case(family, case, availability, torch.device("cpu"), l2_bytes=1024, ceiling=100.0)
        assert [(r["provider"], r["mode"], r["status"]) for r in rows] == [("fastlm", "fwd", "ok"),
                                                                          ("torch", "fwd", "ok")]
        ours = rows[0]
        assert ours["work"] == e2e.model_config(model).train_flops_per_token(16) * 2 * 16
        assert ours["rel_err"] < e2e.TOLERANCE[torch.bfloat16] and ours["vs"] == {"torch": 1.0}
        table = e2e.tokens_per_second(rows)
        assert [(m, p) for m, p, *_ in table] == [(model, "fastlm"), (model, "torch")]
        assert table[0][2] == pytest.approx(2 * 16 / 2e-3)  # 32 tokens in the stubbed 2 ms


# ---------------------------------------------------------------------------------------------- pytest-benchmark


def test_families_as_pytest_benchmarks_collect_every_cell_and_skip_without_a_gpu():
    """benchmarks/test_families.py (`pytest benchmarks --benchmark-only`): one test per family × case × provider ×
    mode, the quick cases unless FASTLM_BENCH_FULL=1, and without a GPU every one skips saying so."""
    from benchmarks.__main__ import families

    # Not PYTEST_XDIST_WORKER either: inherited from an xdist worker (gpu_check.sh runs the suite under xdist), it
    # makes pytest-benchmark disable itself in the child and refuse --benchmark-only.
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTLM_BENCH_FULL", "PYTEST_ADDOPTS") and not k.startswith("PYTEST_XDIST_")}
    env["CUDA_VISIBLE_DEVICES"] = ""

    def pytest_run(*args, **extra_env):
        return subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_families.py", "-q", "-p",
                               "no:cacheprovider", *args], cwd=REPO, env=dict(env, **extra_env), capture_output=True,
                              text=True, timeout=300)

    def expected(quick):
        return {f"benchmarks/test_families.py::test_family[{f.name}/{c.label.replace(' ', '-')}/{p.name}/{m}]"
                for f in families().values() for c in f.cases(quick) for p in f.providers for m in f.modes}

    def node_ids(proc):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return [line for line in proc.stdout.splitlines() if "::test_family[" in line]

    quick = node_ids(pytest_run("--collect-only"))
    assert len(quick) == len(set(quick)) and set(quick) == expected(quick=True)
    assert {"norm", "cross_entropy", "attention", "e2e"} <= {i.split("[")[1].split("/")[0] for i in quick}
    full = node_ids(pytest_run("--collect-only", FASTLM_BENCH_FULL="1"))
    assert len(full) == len(set(full)) and set(full) == expected(quick=False) and len(full) > len(quick)

    ran = pytest_run("--benchmark-only", "-rs")
    summary = harness.pytest_summary(ran.stdout)
    assert ran.returncode == 0 and summary is not None, ran.stdout + ran.stderr
    assert summary["skipped"] == len(quick), summary
    assert summary["passed"] == summary["failed"] == summary["errors"] == 0, summary
    assert f"SKIPPED [{len(quick)}] benchmarks/test_families.py" in ran.stdout
    assert "needs a CUDA GPU" in ran.stdout


def test_launch_cost_times_triton_launches_without_a_gpu():
    """`python -m benchmarks.launch_cost` runs fastlm's Triton launchers through Triton's real launch path (a
    stand-in driver below it), through fastlm's direct path and with launches stubbed, and reports the three per
    launcher; numbers are for people."""
    from benchmarks import launch_cost

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ops = ["gated_fwd", "norm_fwd"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.launch_cost", "--ops", *ops], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "µs" not in line]
    assert sorted(r[0].strip() for r in rows) == sorted(ops)
    assert all(len(r) == 7 and min(map(float, r[1:4])) > 0 and int(r[4]) == 1 for r in rows)
    assert set(ops) <= set(launch_cost.LAUNCHES)
    blocked = subprocess.run([sys.executable, "-m", "benchmarks.launch_cost"], cwd=REPO,
                             env=dict(env, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=120)
    assert blocked.returncode == 2 and "unset it" in blocked.stderr


def test_call_cost_runs_every_configuration_and_needs_a_gpu_to_report():
    """`python -m benchmarks.call_cost` times small calls end to end on a GPU (numbers for people). Its flow, on
    CPU tensors here: every configuration gets a cell, a time or the error that stopped it (the cuda backend,
    which has no GPU here), and the direct launch path's switch is put back; the command itself refuses to run
    without a GPU."""
    import torch

    from benchmarks import call_cost
    from fastlm.kernels import _launch

    enabled = _launch.ENABLED
    results = call_cost.measure(["swiglu"], calls=1, rounds=1, device="cpu")
    assert _launch.ENABLED == enabled
    assert set(results) == {("swiglu", mode) for mode in call_cost.MODES}
    for cells in results.values():
        assert set(cells) == set(call_cost.WHO)
        timed = [w for w in call_cost.WHO if w != "cuda" or torch.cuda.is_available()]
        assert all(isinstance(cells[w], float) and cells[w] > 0 for w in timed)
        if not torch.cuda.is_available():
            assert cells["cuda"].startswith("BackendUnavailable")
    assert "| swiglu | fwd+bwd |" in call_cost.table(results)
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "-m", "benchmarks.call_cost"], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr


def test_cross_entropy_sweep_runs_every_option_on_cpu(cpu_timers):
    """benchmarks.cross_entropy_sweep's option cases run through the harness on CPU tensors (fastlm through its
    torch backend): every provider agrees with the reference under each option, weights and ignored targets
    reach the inputs, reduction "none" gets a gradient per row; and the option table divides by the plain case."""
    from benchmarks import cross_entropy_sweep as sweep

    fam = sweep.family(False, "", None)
    assert [p.name for p in fam.providers] == ["fastlm-triton", "fastlm-cuda", "torch", "liger"]
    assert {c.params["option"] for c in fam.cases(False)} == set(sweep.OPTIONS)
    on_cpu = _family_on_cpu(fam, {})
    on_cpu = dataclasses.replace(on_cpu, modes=fam.modes)
    cpu, gen = torch.device("cpu"), torch.Generator().manual_seed(0)
    for option in sweep.OPTIONS:
        case = harness.Case("cross_entropy", torch.float32, {"rows": 16, "V": 300, "option": option})
        inputs, grads = sweep.make_inputs(case, cpu, gen)
        assert ("weight" in inputs) == (option == "weight")
        assert (inputs["target"] == cross_entropy.IGNORE_INDEX).any() == (option == "ignore")
        assert grads[0].shape == ((16,) if option == "none" else ())
        availability = {p.name: p.available() for p in on_cpu.providers}
        rows = harness.run_case(on_cpu, case, availability, cpu, l2_bytes=1024, ceiling=100.0)
        assert len(rows) == len(on_cpu.providers) * len(fam.modes)
        for r in rows:
            assert r["status"] == "ok", (option, r["provider"], r["reason"])
        ours = next(r for r in rows if r["provider"] == "fastlm-triton" and r["mode"] == "fwd+bwd")
        assert ours["rel_err"] < fam.tolerance[torch.float32], option
    rows = [{"provider": p, "mode": "fwd+bwd", "status": "ok", "params": {"rows": 8, "V": 32, "option": o}, "ms": ms}
            for p, o, ms in (("fastlm-triton", "plain", 2.0), ("fastlm-triton", "softcap", 2.4),
                             ("fastlm-cuda", "z_loss", 1.0), ("torch", "softcap", 9.0))]
    assert sweep.option_ratios(rows) == [("fastlm-triton", 8, 32, "softcap", pytest.approx(1.2))]
    assert "| fastlm-triton | 8 | 32 | softcap | 1.200 | no |" in sweep.option_table(rows)


def test_cross_entropy_tune_variants_set_the_kernel_constants_and_put_them_back():
    from benchmarks import cross_entropy_sweep as sweep
    from fastlm.kernels import cross_entropy as triton_ce

    fam = sweep.family(True, "", None)
    names = ("BLOCK_V", "NUM_WARPS", "PROGRAMS_PER_SM")
    shipped = {n: getattr(triton_ce, n) for n in names}
    tuned = [p for p in fam.providers if p.name.startswith("tune:")]
    assert [p.name[5:] for p in tuned] == list(sweep.TUNE_VARIANTS) and fam.modes == ("fwd+bwd",)
    for p in tuned:
        with p.context():
            values = dict(shipped, **sweep.TUNE_VARIANTS[p.name[5:]])
            assert {n: getattr(triton_ce, n) for n in names} == values
            assert triton_ce._flags(None, 0.0, 0.0, None)["BLOCK_V"] == values["BLOCK_V"]  # read at launch time
            per_sm = values["PROGRAMS_PER_SM"]
            assert triton_ce._fwd_programs(10**6, torch.bfloat16, torch.device("cpu")) == (
                10**6 if per_sm is None else 4 * per_sm)
            assert triton_ce._fwd_programs(10**6, torch.float32, torch.device("cpu")) == 10**6
        assert {n: getattr(triton_ce, n) for n in names} == shipped
    assert {c.params["option"] for c in fam.cases(False)} == {"plain"}


@pytest.mark.parametrize("name", ["norm_sweep", "cross_entropy_sweep"])
def test_sweeps_without_a_gpu_say_so_and_exit_zero(name, capsys):
    """The one-call GPU sweeps share harness.sweep_main: without a GPU they time nothing, say so, and exit 0 (so a
    script that runs them never fails on a CPU machine)."""
    import importlib

    if torch.cuda.is_available():
        pytest.skip("this checks the no-GPU path")
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.main(["--tune"]) == 0 and module.main([]) == 0
    assert capsys.readouterr().out.count(f"{name}: no CUDA GPU here, nothing timed") == 2


# ---------------------------------------------------------------------------------------------- benchmarks.profile

NCU_CSV = textwrap.dedent('''\
    ==PROF== Connected to process 4242 (/usr/bin/python3)
    "ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","gpu__time_duration.sum","sm__throughput.avg.pct_of_peak_sustained_elapsed","sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active","sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active","launch__registers_per_thread","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio","smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio"
    "","","","","","","","ns","%","%","%","register/thread","inst","inst","inst","inst"
    "0","4242","python3","h","spin_kernel","1","7","2,000","0.5","0","0","16","0","0","1.0","0"
    "1","4242","python3","h","attn_fwd_wgmma_kernel","1","7","1,234,000","71.5","2.0","63.25","218","0.8","0.1","0.5","2.5"
    "2","4242","python3","h","spin_kernel","1","7","2,000","0.5","0","0","16","0","0","1.0","0"
    "3","4242","python3","h","attn_bwd_delta_kernel","1","7","40,000","20","0","0","32","0","3.5","0.2","0"
    "4","4242","python3","h","attn_bwd_dq_wgmma_kernel","1","7","900,000","60","1","55","168","1.5","0.3","n/a","0.9"
    ==PROF== Disconnected from process 4242
    ''')


def test_profile_reads_ncus_csv_into_units():
    from benchmarks import profile

    rows = profile.parse_csv(NCU_CSV)
    assert [profile.kernel_name(r) for r in rows] == ["spin_kernel", "attn_fwd_wgmma_kernel", "spin_kernel",
                                                      "attn_bwd_delta_kernel", "attn_bwd_dq_wgmma_kernel"]
    assert rows[1]["gpu__time_duration.sum"] == 1234000.0 and rows[4]["smsp__average_warps_issue_stalled_wait_"
                                                                       "per_issue_active.ratio"] == "n/a"
    units = [{"case": "c", "provider": "fastlm-cuda-wgmma", "mode": "fwd"},
             {"case": "c", "provider": "fastlm-cuda-wgmma", "mode": "bwd"}]
    grouped = profile.unit_rows(rows, units)
    assert [(u["mode"], [k["kernel"] for k in u["kernels"]]) for u in grouped] == [
        ("fwd", ["attn_fwd_wgmma_kernel"]), ("bwd", ["attn_bwd_delta_kernel", "attn_bwd_dq_wgmma_kernel"])]
    fwd = grouped[0]["kernels"][0]
    assert fwd["µs"] == 1234.0 and fwd["SM %"] == 71.5 and fwd["tensor %"] == 63.25 and fwd["regs"] == 218.0
    assert fwd["DRAM %"] is None  # no such column in this report: an empty cell, not a zero
    assert fwd["stalls"] == [("math_pipe_throttle", 2.5), ("barrier", 0.8), ("wait", 0.5)]
    assert [s for s, _ in grouped[1]["kernels"][1]["stalls"]] == ["barrier", "math_pipe_throttle",
                                                                   "long_scoreboard"]  # "n/a" is no value
    # More markers than units (none expected) add nothing; no header at all reads as no rows.
    assert profile.unit_rows(rows, units[:1]) == grouped[:1] and profile.parse_csv("==PROF== error\n") == []
    md = profile.markdown("attention", {"device": "NVIDIA H200"}, grouped,
                          [{"case": "c", "provider": "flex", "mode": "fwd", "why": "left out"}])
    assert "| **fastlm-cuda-wgmma** | bwd | *all 2* | 940.0 |" in md
    assert "| | | attn_fwd_wgmma_kernel | 1234.0 | 71.5 |" in md and "math_pipe_throttle 2.5" in md
    assert "## Not profiled" in md and "flex fwd: left out" in md


def test_profile_runs_the_driver_under_ncu_with_profiling_off_from_the_start(tmp_path):
    from benchmarks import profile

    cmd, export = profile.ncu_commands("/x/ncu", tmp_path / "r", "norm", [0, 2], tmp_path / "u.json")
    assert cmd[:3] == ["/x/ncu", "--profile-from-start", "off"] and "--clock-control" in cmd
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--section"] == list(profile.SECTIONS)
    assert cmd[cmd.index("--export") + 1] == str(tmp_path / "r")
    assert cmd[-11:-2] == [sys.executable, "-m", "benchmarks.profile", "--run", "--op", "norm", "--cases", "0", "2"]
    assert cmd[-2:] == ["--units", str(tmp_path / "u.json")]
    assert export == ["/x/ncu", "--import", f"{tmp_path / 'r'}.ncu-rep", "--page", "raw", "--csv",
                      "--print-units", "base"]
    if not torch.cuda.is_available():
        assert profile.main(["--op", "attention", "--out", str(tmp_path)]) == 2


def test_profile_driver_brackets_each_call_with_the_profiler_and_a_marker(tmp_path, monkeypatch):
    """The driver on CPU tensors, the CUDA calls it makes recorded: every unit's call, and only it, between a
    cudaProfilerStart and Stop, after the marker; the backward's forward outside; a provider that raises becomes a
    'not profiled' entry and the rest go on."""
    from benchmarks import profile

    events = []

    class Cudart:
        def cudaProfilerStart(self):
            events.append("start")

        def cudaProfilerStop(self):
            events.append("stop")

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart())
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: events.append("marker"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def make_inputs(case, device, gen):
        x = torch.randn(4, 8, generator=gen, device=device, requires_grad=True)
        return {"x": x}, [torch.ones(4, 8)]

    def good(case):
        def fn(i):
            events.append("call")
            return (i["x"] * 2,)
        return fn

    def bad(case):
        def fn(i):
            raise RuntimeError("no kernel for this")
        return fn

    fam = harness.Family("toy", "bytes", lambda quick: [harness.Case("toy", torch.float32, {"n": 8})],
                         [harness.Provider("ours", good), harness.Provider("broken", bad),
                          harness.Provider("flex", good), harness.Provider("far", good, skip=lambda c: "too big")],
                         make_inputs, lambda case, mode: 1, "ours", "n", {torch.float32: 1e-5})
    units = tmp_path / "units.json"
    assert profile.drive(fam, [0], units, device="cpu") == 0
    got = json.loads(units.read_text())
    assert [(u["provider"], u["mode"]) for u in got["profiled"]] == [("ours", "fwd"), ("ours", "bwd")]
    assert {(f["provider"], f["mode"], f["why"].split(":")[0]) for f in got["failed"]} == {
        ("broken", "fwd", "RuntimeError"), ("broken", "bwd", "RuntimeError"),
        ("flex", "fwd", "left out of profiles (many kernels, or a compile per shape)"),
        ("flex", "bwd", "left out of profiles (many kernels, or a compile per shape)"),
        ("far", "fwd", "too big"), ("far", "bwd", "too big")}
    # Warm-ups (fwd, then bwd's forward) first; then fwd's call profiled; bwd's forward outside, its backward in.
    assert events == ["call", "call", "start", "marker", "call", "stop", "call", "start", "marker", "stop"]


def test_gpu_check_op_call_ends_with_a_profile_of_the_op(tmp_path):
    """`--op NAME` runs benchmarks.profile last, into the op's results folder (packed into op-results.tar.gz), with
    the time its step has left; the whole check runs it only when asked (the profile step). A stand-in python
    records its arguments and plays every step's success."""
    calls = tmp_path / "calls"
    stub = tmp_path / "python"
    stub.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "$*" >> {calls}
        case "$*" in *device_name*) echo stub-device ;; esac
        exit 0
        """))
    stub.chmod(0o755)
    env = _gpu_check_env(tmp_path, PY=str(stub), OP_RESULTS=str(tmp_path / "op"), FASTLM_COMMIT="abc1234")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--op", "norm"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    profiled = [line.split() for line in calls.read_text().splitlines() if "benchmarks.profile" in line]
    assert len(profiled) == 1
    args = profiled[0]
    assert args[:4] == ["-m", "benchmarks.profile", "--op", "norm"]
    assert args[args.index("--out") + 1] == str(tmp_path / "op" / "stub-device")
    assert 0 < int(args[args.index("--budget-s") + 1]) <= 150
    assert "opprofile" in proc.stdout
    calls.unlink()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "bench"], cwd=REPO,
                          env=dict(env, BENCH_OPS="norm"), capture_output=True, text=True, timeout=120)
    assert "benchmarks.profile" not in calls.read_text()


def test_profile_wrapper_end_to_end_with_a_stand_in_ncu(tmp_path, monkeypatch):
    """profile() with a stand-in ncu that refuses the extra tensor metrics, then profiles (writing a report and the
    driver's units) and exports NCU_CSV: the run is made again without them, and the CSV, JSON and markdown come
    out grouped by unit."""
    from benchmarks import profile

    fake = tmp_path / "ncu"
    units = json.dumps({"profiled": [{"case": "c", "provider": "fastlm-cuda-wgmma", "mode": "fwd"},
                                     {"case": "c", "provider": "fastlm-cuda-wgmma", "mode": "bwd"}],
                        "failed": [{"case": "c", "provider": "flex", "mode": "fwd", "why": "left out"}]})
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, pathlib
        args = sys.argv[1:]
        if "--version" in args:
            print("NVIDIA (R) Nsight Compute Command Line Profiler\\nVersion 2025.3.1.0 (build 1)")
        elif "--import" in args:
            sys.stdout.write({NCU_CSV!r})
        elif "--metrics" in args:
            print("==ERROR== Failed to find metric sm__pipe_tensor_op_gmma_cycles_active"); sys.exit(1)
        else:
            pathlib.Path(args[args.index("--export") + 1] + ".ncu-rep").write_text("report")
            pathlib.Path(args[args.index("--units") + 1]).write_text({units!r})
        """))
    fake.chmod(0o755)
    monkeypatch.setattr(profile, "find_ncu", lambda: str(fake))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    out = tmp_path / "out"
    assert profile.profile("attention", [0], out, budget_s=60) == 0
    result = json.loads((out / "profile_attention.json").read_text())
    assert result["meta"]["extra_metrics"] == [] and result["meta"]["ncu"] == "2025.3.1.0"
    assert [(u["mode"], len(u["kernels"])) for u in result["units"]] == [("fwd", 1), ("bwd", 2)]
    assert result["failed"][0]["provider"] == "flex"
    assert (out / "profile_attention.csv").read_text() == NCU_CSV
    assert "attn_bwd_dq_wgmma_kernel" in (out / "profile_attention.md").read_text()
    assert profile.refused_metric("==ERROR== Failed to find metric x") and not profile.refused_metric("ok")
    cmd, _ = profile.ncu_commands("/x/ncu", tmp_path / "r", "norm", [0], tmp_path / "u.json")
    assert cmd[cmd.index("--metrics") + 1] == ",".join(profile.EXTRA_METRICS)
    assert "--metrics" not in profile.ncu_commands("/x/ncu", tmp_path / "r", "norm", [0], tmp_path / "u.json",
                                                   extra_metrics=())[0]
