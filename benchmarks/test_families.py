"""The GPU benchmark families as pytest-benchmark tests: `pytest benchmarks --benchmark-only`.

`python -m benchmarks` writes tables for reading; this file times the same cells under pytest-benchmark, so that a
regression shows in its usual tool: statistics per test, `--benchmark-json`, `--benchmark-save` and
`--benchmark-compare` between commits.

    pytest benchmarks --benchmark-only                                      # every family, quick cases
    pytest benchmarks --benchmark-only --benchmark-save=before              # saved under .benchmarks/
    pytest benchmarks --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%
    FASTLM_BENCH_FULL=1 pytest benchmarks --benchmark-only                  # every case of every family
    pytest benchmarks --benchmark-only -k "norm/ and fastlm-triton"         # one family, one provider

One test per family × case × provider × mode (the modes the family times), with the id
`family/case label/provider/mode`, the label's spaces turned to dashes; the tests of one case and mode share a
benchmark group, so the providers are compared side by side. The cases are each family's quick set
(`python -m benchmarks --quick`) unless FASTLM_BENCH_FULL=1. Without a CUDA GPU every test skips ("needs a CUDA
GPU"), and with TRITON_INTERPRET=1 too (Triton would interpret its kernels); a provider that is not installed or
cannot run here (Liger, the cuda backend without its extension) skips with its reason, and so does one that leaves
the case out (Provider.skip).

What one round times is what `python -m benchmarks` times, built from the harness's own pieces: the inputs
(harness.input_sets: the same seeded draws, rotating through several L2 caches' worth of input sets), the provider's
build and context, and the mode's step (harness._mode_callables: fwd, bwd after an untimed forward, or fwd+bwd).
Each round's untimed setup runs, for bwd, the forward whose graph the round's backward consumes, then flushes the
L2 (harness.l2_flusher); the round times the step with CUDA events, one recorded just before it and one just after.

Timing with CUDA events: pytest-benchmark times a round as timer() after the call minus timer() before it, and a test
may bring its own timer (`@pytest.mark.benchmark(timer=...)`). Here timer() records a CUDA event and returns it as a
stamp; subtracting two stamps waits for the later event and gives the seconds between them on the GPU. So every
statistic pytest-benchmark reports (min, median, IQR, outliers, its comparisons) is of GPU time, measured as
triton.testing.do_bench and the harness measure it. A timer that synchronizes and returns time.perf_counter() would
be simpler, but it adds the host's launch path and a synchronization's latency to every round: several µs, which on
kernels of a few to a few tens of µs (the quick norm cases) is a large share of the number and would hide a kernel
regression in host noise (the host path has its own benchmark, benchmarks/overhead.py). With the events, host time
counts only where the GPU waits for the host, as in a real step.

Rounds: pytest-benchmark's own options decide how many: enough to fill `--benchmark-max-time` (default 1 s), at
least `--benchmark-min-rounds` (default 5); before them, one untimed call builds the provider (torch.compile,
autotuning) and warm-up rounds fill harness.WARMUP_MS. Each provider is built once per case and kept for its modes.
The quick set is under 200 tests: at the default, about a second each plus the torch.compile and flex builds, so several
minutes (an estimate: not yet run on a GPU); `--benchmark-max-time=0.2` shortens it.

`extra_info` of every benchmark (in `--benchmark-json`): family, case (its label), op, dtype, params, provider,
backend, mode, work (bytes or FLOPs of one call: the family's `work`), unit (GB/s or TFLOP/s), rate (at the median
time) and rate_best (at the minimum), input_sets and timer.

Not done here, unlike `python -m benchmarks`: no check of the outputs against the family's reference provider, no
ceiling (copy bandwidth, matmul rate) nor peak memory, and no worker process: a provider that raises fails its
test, and one that breaks the CUDA context (a device-side assert) fails its test while every later test skips
saying so, since nothing more can run in this process.
"""

import gc
import math
import os
import time

import pytest
import torch

from benchmarks import harness
from benchmarks.__main__ import families

FULL = os.environ.get("FASTLM_BENCH_FULL", "") not in ("", "0")
NO_GPU = "needs a CUDA GPU (none visible to torch)"
ESTIMATE_ROUNDS = 5  # rounds timed by the wall clock to size the warm-up and the measured rounds


class _Stamp:
    """A point on the GPU's timeline: a CUDA event recorded on the current stream. A later stamp minus an earlier one
    waits for the later event and gives the seconds between the two, as the GPU measured them."""

    __slots__ = ("event",)

    def __init__(self):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, earlier: "_Stamp") -> float:
        self.event.synchronize()
        return earlier.event.elapsed_time(self.event) / 1e3


def cuda_event_timer() -> _Stamp:
    """pytest-benchmark's timer for these tests: (timer() after the call) − (timer() before) is GPU seconds."""
    return _Stamp()


def _skip_reason() -> str:
    if not torch.cuda.is_available():
        return NO_GPU
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: the Triton kernels would run in Triton's interpreter; unset it to time them"
    return ""


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "-"),
    pytest.mark.benchmark(timer=cuda_event_timer),
]


def cell_id(family, case, provider, mode) -> str:
    return f"{family.name}/{case.label.replace(' ', '-')}/{provider.name}/{mode}"


def cells(full: bool = FULL) -> list:
    """(family, case, provider, mode) of every test, in the order `python -m benchmarks` runs them: per family and
    case, the providers in harness.run_order (the reference first; Liger, which patches other libraries, last)."""
    out = []
    for family in families().values():
        for case in family.cases(not full):
            for provider in harness.run_order(family):
                out += [(family, case, provider, mode) for mode in family.modes]
    return out


CELLS = cells()

# What the tests of one case share, kept until the next case or provider: the device and its L2 flush, each
# provider's availability (per family), the case's input sets, the provider's built callable, and whether an
# earlier test broke the CUDA context.
_state = {"available": {}, "case": None, "sets": None, "built": None, "fn": None, "flush": None, "broken": None}


def _device():
    return torch.device("cuda", torch.cuda.current_device())


def _drop(*keys) -> None:
    had = any(_state[k] is not None for k in keys)
    for k in keys:
        _state[k] = None
    if had:
        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    _drop("fn", "built", "sets", "case", "flush")


def _availability(family, provider) -> tuple:
    key = (family.name, provider.name)
    if key not in _state["available"]:
        try:
            _state["available"][key] = provider.available()
        except Exception as e:  # noqa: BLE001 - a provider that cannot even be probed is missing, as in the harness
            _state["available"][key] = (False, harness._reason(e))
    return _state["available"][key]


def _sets(family, case) -> list:
    key = (family.name, case.label)
    if _state["case"] != key:
        _drop("fn", "built", "sets")
        device = _device()
        l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
        _state["sets"] = harness.input_sets(family, case, device, l2_bytes)
        _state["case"] = key
    return _state["sets"]


def _built(family, case, provider, sets):
    """The provider's callable for the case, built once (inside its context) and run once, untimed, forward and
    backward: a compile or an autotune happens here."""
    key = (family.name, case.label, provider.name)
    if _state["built"] != key:
        _drop("fn", "built")
        fn = provider.build(case)
        harness._forward_backward(fn, *sets[0])
        torch.cuda.synchronize()
        _state["fn"], _state["built"] = fn, key
    return _state["fn"]


def _round_counts(setup, target, teardown, config) -> tuple:
    """(warm-up rounds, measured rounds): one untimed round, then a few by the wall clock, synchronized after each
    as the timed rounds are; warm-up fills harness.WARMUP_MS, and the rounds --benchmark-max-time, at least
    --benchmark-min-rounds."""

    def one():
        args, kwargs = setup()
        target(*args, **kwargs)
        torch.cuda.synchronize()
        teardown(*args, **kwargs)

    one()
    start = time.perf_counter()
    for _ in range(ESTIMATE_ROUNDS):
        one()
    per_round = max((time.perf_counter() - start) / ESTIMATE_ROUNDS, 1e-6)
    max_time = float(config.getoption("benchmark_max_time"))
    min_rounds = int(config.getoption("benchmark_min_rounds"))
    warmup = max(1, math.ceil(harness.WARMUP_MS / 1e3 / per_round))
    return warmup, max(min_rounds, math.ceil(max_time / per_round))


def _time(benchmark, config, family, case, provider, mode) -> None:
    sets = _sets(family, case)
    with provider.context():
        fn = _built(family, case, provider, sets)
        if _state["flush"] is None:
            _state["flush"] = harness.l2_flusher()
        flush = _state["flush"]
        prepare, timed = harness._mode_callables(mode, fn, sets)

        def setup():
            state = prepare() if prepare is not None else None
            flush()
            return ([state],), {}

        def target(box):
            timed(box[0])

        def teardown(box):
            box.clear()  # bwd's graph (or a forward's outputs) goes now, not when the next round's setup is done

        warmup, rounds = _round_counts(setup, target, teardown, config)
        benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds, warmup_rounds=warmup)
    benchmark.extra_info["input_sets"] = len(sets)
    if benchmark.stats is not None:  # None under --benchmark-disable
        stats = benchmark.stats.stats
        work = family.work(case, mode)
        benchmark.extra_info["rate"] = harness.rate(work, stats.median * 1e3, family.metric)
        benchmark.extra_info["rate_best"] = harness.rate(work, stats.min * 1e3, family.metric)


@pytest.mark.parametrize("cell", [pytest.param(c, id=cell_id(*c)) for c in CELLS])
def test_family(benchmark, request, cell):
    family, case, provider, mode = cell
    benchmark.group = f"{family.name} {case.label} {mode}"
    benchmark.extra_info.update(
        family=family.name, case=case.label, op=case.op, dtype=harness.DTYPE_NAMES[case.dtype],
        params=dict(case.params), provider=provider.name, backend=provider.backend, mode=mode,
        work=family.work(case, mode), unit=harness.UNITS[family.metric][0],
        timer="CUDA events around each call, the L2 flushed before it")
    if _state["broken"]:
        pytest.skip(_state["broken"])
    usable, why = _availability(family, provider)
    if not usable:
        pytest.skip(f"{provider.name} missing: {why}")
    skip = provider.skip(case)
    if skip:
        pytest.skip(f"{provider.name} leaves this case out: {skip}")
    try:
        _time(benchmark, request.config, family, case, provider, mode)
    except Exception:
        broken = harness._context_error(_device())
        if broken:
            _state["broken"] = (f"the CUDA context broke in {request.node.name} ({broken}); nothing more can run in "
                                "this process")
            _state.update(case=None, sets=None, built=None, fn=None, flush=None)  # nothing to free, and freeing fails
        else:
            _drop("fn", "built")  # a half-built provider is not kept for the next mode
        raise
