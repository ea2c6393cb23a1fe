"""The tests' own machinery: what the tolerance rule's SimulatedRounding does to the operations it sees
(docs/TOLERANCE.md), the interpreter's conversions to bfloat16 (conftest's _bfloat16_rounded_to_nearest) and its
patching of triton.language (_language_patched_once_a_launch), the command a failed test prints to replay it, and
the lock the GPU's largest tests take turns by."""

import math
import re
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import conftest
from conftest import HAS_GPU, RHO, SimulatedRounding, generator


def _values(n=4096, offset=0):
    """float32 values of random sign with magnitudes spread evenly over 2⁻⁸ .. 2⁸ (no subnormal in any dtype)."""
    gen = generator(offset)
    sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    return sign * torch.exp2(torch.rand(n, generator=gen) * 16 - 8)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
def test_conversions_are_left_alone(dtype):
    """A conversion is correctly rounded on every platform: the mode leaves it exact, to a narrower dtype, a wider
    one, or the same (docs/TOLERANCE.md: two implementations differ there only through their inputs)."""
    x = _values()
    with SimulatedRounding(1):
        narrow, back, same = x.to(dtype), x.double().float(), x.to(dtype, copy=True)
    assert torch.equal(narrow, x.to(dtype)) and torch.equal(same, narrow) and torch.equal(back, x)


def test_a_pointwise_result_moves_by_at_most_rho_units():
    """A product is z·(1 + ρ·u·e), itself rounded: within (ρ + 1)·u relative of the plain result, and moved."""
    x, y = _values(), _values(offset=1)
    with SimulatedRounding(3):
        z = x * y
    rel = ((z.double() - (x * y).double()) / (x * y).double()).abs()
    u = torch.finfo(torch.float32).eps / 2
    assert RHO * u / 4 < rel.max().item() <= (RHO + 1) * u


def test_a_sum_moves_by_its_pairwise_rounding_bound():
    """A matmul's dot products of K terms are s + ρ·u·(|s|·e₁ + √((⌈log₂K⌉ + 1)·Σt²)·e₂): within that bound of
    the plain result, and moved by a sizable part of it somewhere."""
    K = 512
    a, b = _values(16 * K).view(16, K), _values(K * 8, offset=1).view(K, 8)
    with SimulatedRounding(4):
        c = a @ b
    plain = (a @ b).double()  # the same float32 product outside the mode: c − plain is the perturbation
    u = torch.finfo(torch.float32).eps / 2
    bound = RHO * u * (plain.abs() + ((math.ceil(math.log2(K)) + 1) * (a.double() ** 2 @ b.double() ** 2)).sqrt())
    moved = (c.double() - plain).abs() / bound
    # The perturbed sum is itself rounded to float32, by up to u·|s|: 1/ρ of the bound's first term.
    assert moved.max().item() <= 1 + 1 / RHO and moved.max().item() > 0.25


@triton.jit
def _convert(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n).to(Y.dtype.element_ty), mask=offs < n)


@pytest.mark.skipif(HAS_GPU, reason="a property of the tests' interpreter (conftest's _bfloat16_rounded_to_nearest)")
@pytest.mark.parametrize("src", (torch.float32, torch.float16, torch.float64, torch.int32), ids=str)
def test_interpreter_rounds_to_bfloat16_as_the_gpu_does(src):
    """A kernel's conversion to bfloat16 rounds to the nearest, ties to even, as the GPU's cvt.rn and torch do:
    bit for bit against torch, on random values (integers up to ±2¹⁰, float64 by way of float32 as torch rounds it)
    and on the halfway cases (where dropping the low bits, Triton's own interpreter's way, rounds half of them
    otherwise), their neighbours, ±0, ±inf and NaN."""
    x = _values(1024) * (4 if src == torch.int32 else 1)
    if src == torch.float32:
        halfway = (x.view(torch.int32) & ~0xFFFF) | 0x8000  # exactly between two bfloat16 values
        special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])
        x = torch.cat([x, *(t.view(torch.float32) for t in (halfway, halfway + 1, halfway - 1)), special])
    x = x.to(src).contiguous()
    n = x.numel()
    y = torch.empty(n, dtype=torch.bfloat16)
    _convert[(1,)](x, y, n, BLOCK=triton.next_power_of_2(n))
    expect = x.to(torch.bfloat16)
    same = (y.view(torch.int16) == expect.view(torch.int16)) | (torch.isnan(y) & torch.isnan(expect))
    assert same.all(), f"{(~same).sum().item()} of {n} conversions differ from torch's"



@triton.jit
def _double(x):
    return x + x


@triton.jit
def _quadruple(X, Y, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, _double(_double(tl.load(X + offs))))


@pytest.mark.skipif(HAS_GPU, reason="a property of the tests' interpreter (conftest's _language_patched_once_a_launch)")
def test_interpreter_patches_the_language_once_a_launch(monkeypatch):
    """A launch patches triton.language once, not again at each call of a helper (Triton's own interpreter patches
    7 times here: the kernel, then 3 programs × 2 calls of _double); the helpers compute as before, and after the
    launch the language is Triton's own again."""
    from triton.runtime import interpreter

    scopes = []
    real_init = interpreter._LangPatchScope.__init__
    monkeypatch.setattr(interpreter._LangPatchScope, "__init__", lambda self: (scopes.append(self), real_init(self))[1])
    language = (tl.load, tl.arange, tl.core.tensor.__add__, tl.math.exp)
    x = torch.arange(48, dtype=torch.float32)
    y = torch.full_like(x, float("nan"))
    _quadruple[(3,)](x, y, BLOCK=16)
    assert torch.equal(y, 4 * x)
    assert len(scopes) == 1
    assert (tl.load, tl.arange, tl.core.tensor.__add__, tl.math.exp) == language


@pytest.mark.parametrize("scale", (None, "3"), ids=("plain", "fuzz_scale"))
def test_a_failure_says_how_to_replay_it(scale, monkeypatch):
    """A failed test's report gets a "reproduce" section: the command with every variable its draws depend on (the
    seed, and FASTLM_FUZZ_SCALE where set: the fuzz's example counts)."""
    if scale is None:
        monkeypatch.delenv("FASTLM_FUZZ_SCALE", raising=False)
    else:
        monkeypatch.setenv("FASTLM_FUZZ_SCALE", scale)
    report = types.SimpleNamespace(failed=True, sections=[])
    hook = conftest.pytest_runtest_makereport(types.SimpleNamespace(nodeid="tests/test_x.py::test_y[a]"), None)
    next(hook)
    with pytest.raises(StopIteration):
        hook.send(types.SimpleNamespace(get_result=lambda: report))
    env = f"FASTLM_TEST_SEED={conftest.TEST_SEED}" + (f" FASTLM_FUZZ_SCALE={scale}" if scale else "")
    assert report.sections == [("reproduce", f"{env} python -m pytest 'tests/test_x.py::test_y[a]'")]


def test_large_memory_tests_take_turns_across_processes(tmp_path):
    """conftest.one_at_a_time, the lock of the tests marked large_memory: while another process (an xdist worker)
    holds it, taking it waits, and it is taken as soon as that process lets go."""
    path = str(tmp_path / "lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys\n"
         f"f = open({path!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    acquired = threading.Event()

    def take():
        with conftest.one_at_a_time(path):
            acquired.set()

    try:
        assert holder.stdout.readline().strip() == "held"
        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        assert not acquired.wait(0.5), "took the lock while another process held it"
        holder.stdin.write("\n")  # let go
        holder.stdin.flush()
        assert acquired.wait(60), "did not take the lock once it was free"
        taker.join(60)
    finally:
        holder.kill()
        holder.wait(60)


def test_the_largest_gpu_tests_are_marked_to_take_turns():
    """Every GPU test past 2³¹ elements (their names say so) carries large_memory."""
    root = Path(__file__).resolve().parent
    found = 0
    for path in sorted(root.glob("test_*.py")):
        text = path.read_text()
        for match in re.finditer(r"((?:@.*\n)+)def (test_gpu\w*(?:2_31|2_to_the_31)\w*)\(", text):
            assert "@pytest.mark.large_memory" in match.group(1), f"{path.name}::{match.group(2)}"
            found += 1
    assert found >= 9
