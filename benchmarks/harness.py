"""The machinery every benchmark family shares: what is timed and how, the device's ceilings measured in the same
run, peak memory, result rows, and the JSON / markdown / PNG writers.

A family (`benchmarks/<op>.py`) declares a `Family`: its cases (shape, dtype, variant), its providers (fastlm's
backends and the peers users would otherwise pick), how to draw one set of inputs, and how many bytes (or FLOPs)
one call must move. Everything else lives here, so adding an op family is a short file.

What is timed, for every provider on every case (`MODES`):
  fwd      the forward of a training step: the inputs require grad, so each provider records its autograd graph
           and saves what its backward needs, exactly as it would in training.
  bwd      the backward alone: `torch.autograd.grad(outputs, inputs, grad_outputs)` on a graph that an untimed
           forward built just before (CUDA events around the backward only), so the time holds the backward
           kernels (dX and the dW/dB reductions) and autograd's own bookkeeping, and no forward.
  fwd+bwd  both: from the inputs to the gradient of every input that requires grad.
A family may time fewer modes (`Family.modes`): an inference-only family times fwd alone, on inputs that do not
require grad.
fwd and fwd+bwd are the median of `triton.testing.do_bench` (events around each call, warm-up first, L2 flushed
before each call); bwd is timed the same way by `_bench_after`, which leaves the forward out. The calls rotate
among several input sets whose total size is at least ROTATE_L2_MULTIPLE times the L2 cache, so a small case is
not timed out of a warm cache. Before timing, each provider's outputs and gradients are
compared with the family's reference provider on the same inputs; a provider that disagrees is still timed, but
its rows say "mismatch" and no ratio or dispatch decision uses them.

Peak memory (`peak_mem_bytes`): for one call of the mode, `torch.cuda.max_memory_allocated()` after
`reset_peak_memory_stats()`, minus what was allocated just before the call (the inputs, and for bwd the graph):
the extra memory that call needs.

Ceilings, measured at the start of the run: the copy bandwidth (a device-to-device copy of COPY_BYTES, counting
bytes read plus bytes written) for memory-bound families, the bf16 matmul rate (MATMUL_SIZE cubed) for
compute-bound ones. Each row reports its achieved rate and its fraction of that ceiling.

Failures are results: a provider that raises, runs out of memory, dies or breaks the CUDA context (a device-side
assert, an illegal memory access) gets rows that say "error" or "oom" with the reason, and the run goes on. A
run of the suite (`IsolatedRun`) does all its GPU work in a worker process and forks a fresh one after a failure
that could spoil the next cells; see there.
"""

import contextlib
import importlib
import datetime
import itertools
import json
import math
import platform
import re
import signal
import statistics
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

# Every default of the suite, in one place.
MODES = ("fwd", "bwd", "fwd+bwd")
WARMUP_MS = 10  # do_bench warm-up budget per timing
REP_MS = 40  # do_bench measuring budget per timing; the median of the calls that fit is reported
ROTATE_L2_MULTIPLE = 4  # input sets rotate until together they are at least this many L2 caches
MAX_INPUT_SETS = 32
COPY_BYTES = 1 << 30  # the copy-bandwidth probe copies 1 GiB (2 GiB of traffic)
MATMUL_SIZE = 8192  # the matmul-rate probe multiplies two bf16 MATMUL_SIZE² matrices
ERROR_CHUNK = 1 << 26  # elements per step of the relative-error reduction, which bounds its temporary memory
MIN_PLOT_POINTS = 3  # a series needs this many x values to get a panel in the plot
# The longest one provider may take on one case (or one availability check) before its worker is killed: a hang
# costs its cells alone. Far above a normal cell (a torch.compile build, ~30 s), below gpu_check.sh's 200-s cap on
# a whole family.
UNIT_TIMEOUT_S = 150
# torch's CPU threads in a benchmark worker, as in torch's DataLoader workers: a forked process inherits a dead
# OpenMP thread pool from a parent that used one, and its first parallel CPU op would hang. The work is on the GPU.
WORKER_CPU_THREADS = 1
REPO = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO / "benchmarks" / "results"

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
UNITS = {"bytes": ("GB/s", "copy bandwidth"), "flops": ("TFLOP/s", "bf16 matmul rate")}


@dataclass
class Case:
    """One benchmarked configuration of an op."""

    op: str  # the op as the library's dispatch names it, e.g. "rms_norm"
    dtype: torch.dtype
    params: dict  # shape and variant, e.g. {"rows": 16384, "N": 4096, "residual": False}; keys become columns

    @property
    def label(self) -> str:
        return " ".join([self.op, DTYPE_NAMES[self.dtype]] + [f"{k}={v}" for k, v in self.params.items()])


@dataclass
class Provider:
    """One implementation of the family's ops."""

    name: str  # column name in the tables, e.g. "fastlm-triton", "torch.compile", "liger"
    # case -> fn(inputs) -> tuple of outputs. Raises (any exception) when it cannot run the case; the rows then
    # say "error" with the message.
    build: Callable[[Case], Callable[[dict], tuple]]
    # () -> (usable, why not). A provider that is not usable here is reported as "missing" with the reason.
    available: Callable[[], tuple] = lambda: (True, "")
    # Entered around everything the harness does with this provider (build, check, every timed call).
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # The fastlm backend this provider runs ("triton", "cuda"), or None for a peer. fastlm rows get the ratio
    # against every peer, and the backends are compared for the dispatch table.
    backend: Optional[str] = None
    # For a peer that computes exactly what `auto` runs when the dispatch table routes the op to torch's own
    # kernel: that route's name (fastlm._backend.NATIVE, e.g. "torch:eager"). Such peers compete with the fastlm
    # backends in the dispatch table, so that `auto` never loses to them.
    native: Optional[str] = None
    # case -> why this provider leaves the case out (a peer that would not fit in memory, say), or "" to run it.
    # Its rows then say "skipped" with the reason.
    skip: Callable[[Case], str] = lambda case: ""


@dataclass
class Family:
    """What a benchmarks/<op>.py module declares (as FAMILY)."""

    name: str  # output file stem and the value of --op, e.g. "norm"
    metric: str  # "bytes" (memory bound: GB/s vs copy bandwidth) or "flops" (TFLOP/s vs matmul rate)
    cases: Callable[[bool], list]  # quick -> [Case]
    providers: list  # [Provider], in table column order
    # (case, device, generator) -> (inputs, grad_outputs): a dict of tensors (those the gradients are taken of
    # have requires_grad set), and one gradient per output, in output order.
    make_inputs: Callable
    work: Callable[[Case, str], int]  # (case, mode) -> bytes or FLOPs of one call
    reference: str  # the provider every other is checked against
    x_key: str  # the case parameter on the plot's x axis
    tolerance: dict  # dtype -> largest relative error against the reference before a row says "mismatch"
    notes: tuple = ()  # lines for the markdown header: how the peers are called, what the bytes count
    modes: tuple = MODES  # the modes timed, a subset of MODES in its order


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def rate(work: int, ms: float, metric: str) -> float:
    """GB/s (metric "bytes") or TFLOP/s (metric "flops") of `work` done in `ms` milliseconds."""
    scale = 1e6 if metric == "bytes" else 1e9
    return work / (ms * scale)


def tensor_bytes(*collections) -> int:
    total = 0
    for c in collections:
        for t in c.values() if isinstance(c, dict) else c:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def input_set_count(set_bytes: int, l2_bytes: int) -> int:
    """How many input sets to rotate among so that together they are ≥ ROTATE_L2_MULTIPLE L2 caches."""
    return max(1, min(MAX_INPUT_SETS, math.ceil(ROTATE_L2_MULTIPLE * l2_bytes / max(1, set_bytes))))


def rel_error(got, ref) -> float:
    """Largest ‖got − ref‖ / ‖ref‖ over paired tensors, in fp32, in chunks; inf when got holds NaN or inf."""
    worst = 0.0
    for a, b in zip(got, ref):
        if a is None or b is None:
            continue
        a, b = a.detach().reshape(-1), b.detach().reshape(-1)
        num = torch.zeros((), dtype=torch.float64, device=b.device)
        den = torch.zeros((), dtype=torch.float64, device=b.device)
        for i in range(0, b.numel(), ERROR_CHUNK):
            ac, bc = a[i : i + ERROR_CHUNK].float(), b[i : i + ERROR_CHUNK].float()
            num += (ac - bc).double().square().sum()
            den += bc.double().square().sum()
        err = math.sqrt(num.item()) / max(math.sqrt(den.item()), 1e-30)
        if not math.isfinite(err):
            return math.inf
        worst = max(worst, err)
    return worst


def measure_copy_gbps(device) -> float:
    src = torch.randn(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return rate(2 * COPY_BYTES, ms, "bytes")


def measure_matmul_tflops(device) -> float:
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=torch.bfloat16)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b)
    return rate(2 * MATMUL_SIZE**3, ms, "flops")


def _bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _command(*args) -> Optional[str]:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def auto_orders(device_name: str) -> dict:
    """What a provider with backend "auto" runs on this device: fastlm/_dispatch_table.py's order per op (the
    implementations it tries first to last), and "other ops" for the default order of the ops it does not list."""
    from fastlm import _dispatch_table

    table = _dispatch_table.MEASURED.get(device_name, {})
    ops = set(table) | {op for op, parent in _dispatch_table.FALLBACK.items() if parent in table}
    return {**{op: list(_dispatch_table.preferred(op, device_name)) for op in sorted(ops)},
            "other ops": list(_dispatch_table.UNMEASURED_ORDER)}


def auto_line(meta: dict) -> Optional[str]:
    """The markdown header's line saying what `auto` ran in this run, from the run's metadata (None for a run
    recorded before the metadata had it)."""
    orders = meta.get("auto_orders")
    if not orders:
        return None
    return ("`auto` on this device tried, per op, first to last (fastlm/_dispatch_table.py at the run's commit): "
            + "; ".join(f"{op} {' > '.join(order)}" for op, order in orders.items()) + ".")


def run_metadata(device, quick: bool) -> dict:
    """Where and with what the run happened; the ceilings are added by the caller once measured."""
    import triton

    props = torch.cuda.get_device_properties(device)
    name = torch.cuda.get_device_name(device)
    commit = _command("git", "rev-parse", "--short", "HEAD")
    if commit and _command("git", "status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    driver = _command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "device_slug": slug(name),
        "capability": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count,
        "l2_bytes": props.L2_cache_size,
        "memory_bytes": props.total_memory,
        "driver": driver.splitlines()[0] if driver else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "fastlm": _version("fastlm"),
        "git_commit": commit,
        "liger_kernel": _version("liger-kernel"),
        "quick": quick,
        "auto_orders": auto_orders(name),
        "timing": {"do_bench": "median", "warmup_ms": WARMUP_MS, "rep_ms": REP_MS,
                   "rotate_l2_multiple": ROTATE_L2_MULTIPLE},
    }


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _grad_inputs(inputs: dict) -> list:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def _differentiable(outputs, grad_outputs):
    """The outputs autograd can differentiate, each with its gradient."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    return [o for o, _ in pairs], [g for _, g in pairs]


def _forward_backward(fn, inputs, grad_outputs):
    outs = fn(inputs)
    o, g = _differentiable(outs, grad_outputs)
    ins = _grad_inputs(inputs)
    grads = torch.autograd.grad(o, ins, g) if ins else ()
    return [t.detach() for t in outs], list(grads)


def _mode_callables(mode: str, fn, sets):
    """(prepare, timed) for `mode`, rotating through the input sets: the timed part is timed(prepare()), where
    prepare is None (nothing to prepare) or, for bwd, the forward that builds the graph the backward consumes."""
    turn = itertools.cycle(range(len(sets)))
    prepared = [(inputs, _grad_inputs(inputs), gos) for inputs, gos in sets]
    if mode == "fwd":

        def timed(_):
            fn(prepared[next(turn)][0])

        return None, timed

    if mode == "bwd":

        def prepare():
            inputs, ins, gos = prepared[next(turn)]
            outs, grads = _differentiable(fn(inputs), gos)
            return outs, ins, grads

        def timed(state):
            torch.autograd.grad(*state)

        return prepare, timed

    def timed(_):
        inputs, ins, gos = prepared[next(turn)]
        outs, grads = _differentiable(fn(inputs), gos)
        torch.autograd.grad(outs, ins, grads)

    return None, timed


def _bench_after(prepare, timed) -> float:
    """Median ms of timed(prepare()) with prepare untimed, the way do_bench times a call: L2 flushed before each
    call, CUDA events around the timed part alone, warm-up and repeat counts that fill WARMUP_MS and REP_MS of
    wall time (as do_bench's do, its estimate including the cache flush; here the untimed forward too).

    This times the backward: each call consumes a graph that a fresh, untimed forward built just before, as in
    training. (A graph built once and kept with retain_graph=True would serve too, but torch.compile donates its
    saved buffers to the backward and refuses retain_graph.)"""
    flush = l2_flusher()

    def run(n):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            state = prepare()
            flush()
            start.record()
            timed(state)
            end.record()
            del state
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]

    run(1)
    start = time.perf_counter()
    run(5)
    per_call_ms = max((time.perf_counter() - start) * 1e3 / 5, 1e-3)
    run(max(1, int(WARMUP_MS / per_call_ms)))
    return statistics.median(run(max(1, int(REP_MS / per_call_ms))))


def l2_flusher():
    """A no-argument callable that evicts the L2 cache as do_bench does before each call (it zeroes a buffer larger
    than the L2, allocated here once): _bench_after's flush, and benchmarks/test_families.py's."""
    import triton.runtime

    driver = triton.runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()
    return lambda: driver.clear_cache(cache)


def _measure(mode: str, fn, sets) -> tuple:
    """(median ms, peak extra bytes) of one mode."""
    prepare, timed = _mode_callables(mode, fn, sets)
    ms = _bench(lambda: timed(None)) if prepare is None else _bench_after(prepare, timed)
    state = prepare() if prepare is not None else None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    timed(state)
    torch.cuda.synchronize()
    return ms, torch.cuda.max_memory_allocated() - before


def _row(family: Family, case: Case, provider: Provider, mode: str, **fields) -> dict:
    row = {
        "family": family.name,
        "op": case.op,
        "dtype": DTYPE_NAMES[case.dtype],
        "params": dict(case.params),
        "provider": provider.name,
        "mode": mode,
        "status": "ok",
        "reason": "",
        "ms": None,
        "work": family.work(case, mode),
        "unit": UNITS[family.metric][0],
        "rate": None,
        "frac_of_ceiling": None,
        "peak_mem_bytes": None,
        "rel_err": None,
        "input_sets": None,
        "setup_s": None,
        "vs": {},
    }
    row.update(fields)
    return row


def run_case(family: Family, case: Case, availability: dict, device, l2_bytes: int, ceiling: float, progress=None):
    """Every provider on one case, in this process: rows for every (provider, mode), with the ratios of fastlm's
    rows filled in. (A run of the suite goes through `IsolatedRun`, which runs the same steps in a worker process.)"""
    sets = input_sets(family, case, device, l2_bytes)
    rows, reference = [], None
    # The reference runs first, so that every other provider is checked against it.
    for provider in run_order(family):
        if progress is not None:
            progress.set_postfix_str(f"{case.label} · {provider.name}", refresh=False)
        provider_rows, outputs = provider_cells(family, case, provider, availability[provider.name],
                                                lambda: (sets, reference), ceiling)
        rows += provider_rows
        if provider.name == family.reference:
            reference = outputs
        if progress is not None:
            progress.update(1)
    del sets, reference
    torch.cuda.empty_cache()
    return finish_case(family, rows)


def input_sets(family: Family, case: Case, device, l2_bytes: int) -> list:
    """The case's input sets, drawn from a generator seeded by the case's label (so a fresh process draws the same
    ones), as many as rotate through ROTATE_L2_MULTIPLE L2 caches."""
    gen = torch.Generator(device=device)
    gen.manual_seed(zlib.crc32(case.label.encode()))
    sets = [family.make_inputs(case, device, gen)]
    n_sets = input_set_count(tensor_bytes(*sets[0]), l2_bytes)
    sets += [family.make_inputs(case, device, gen) for _ in range(n_sets - 1)]
    return sets


def run_order(family: Family) -> list:
    """The providers in the order a case runs them: the reference first, then the family's order."""
    return sorted(family.providers, key=lambda p: p.name != family.reference)


def provider_cells(family, case, provider, availability: tuple, inputs, ceiling):
    """(rows, outputs) of one provider on one case: missing or skipped rows, or the measured ones. `inputs()` gives
    (input sets, the reference's outputs or None); it is called only when the provider runs."""
    usable, why = availability
    skip = provider.skip(case) if usable else ""
    if not usable:
        return [_row(family, case, provider, m, status="missing", reason=why) for m in family.modes], None
    if skip:
        return [_row(family, case, provider, m, status="skipped", reason=skip) for m in family.modes], None
    sets, reference = inputs()
    return _run_provider(family, case, provider, sets, reference, ceiling)


def finish_case(family: Family, rows: list) -> list:
    """A case's rows with the ratios filled in, in the family's provider order and MODES order."""
    add_ratios(rows, family.providers)
    order = {p.name: i for i, p in enumerate(family.providers)}
    return sorted(rows, key=lambda r: (order[r["provider"]], MODES.index(r["mode"])))


def reference_outputs(family: Family, case: Case, sets) -> Optional[list]:
    """The reference provider's outputs and gradients on the first input set, untimed, or None when it cannot give
    them: what a fresh worker needs to check the providers after a restart in the middle of a case."""
    provider = next(p for p in family.providers if p.name == family.reference)
    try:
        with provider.context():
            outs, grads = _forward_backward(provider.build(case), *sets[0])
        return outs + grads
    except Exception:  # noqa: BLE001 - no reference: the later rows go unchecked, as when the reference fails
        return None


def _run_provider(family, case, provider, sets, reference, ceiling):
    """Rows for every mode, and the provider's outputs and gradients on the first input set (kept only for the
    reference, which the other providers are then checked against)."""
    rows, kept = [], None
    try:
        with provider.context():
            t0 = time.perf_counter()
            fn = provider.build(case)
            outs, grads = _forward_backward(fn, *sets[0])
            torch.cuda.synchronize()
            setup_s = round(time.perf_counter() - t0, 2)
            err = rel_error(outs + grads, reference) if reference is not None else None
            mismatch = err is not None and err > family.tolerance[case.dtype]
            kept = outs + grads if provider.name == family.reference else None
            del outs, grads
            for mode in family.modes:
                try:
                    ms, peak = _measure(mode, fn, sets)
                    work = family.work(case, mode)
                    achieved = rate(work, ms, family.metric)
                    rows.append(_row(family, case, provider, mode, status="mismatch" if mismatch else "ok",
                                     reason=f"relative error {err:.2e} against {family.reference}" if mismatch
                                     else "", ms=ms, rate=achieved, frac_of_ceiling=achieved / ceiling,
                                     peak_mem_bytes=peak, rel_err=err, input_sets=len(sets), setup_s=setup_s))
                except torch.cuda.OutOfMemoryError as e:
                    rows.append(_row(family, case, provider, mode, status="oom", reason=_reason(e)))
                except Exception as e:  # noqa: BLE001 - one failing mode must not end the sweep
                    rows.append(_row(family, case, provider, mode, status="error", reason=_reason(e)))
                torch.cuda.empty_cache()
    except torch.cuda.OutOfMemoryError as e:
        rows = [_row(family, case, provider, m, status="oom", reason=_reason(e)) for m in family.modes]
    except Exception as e:  # noqa: BLE001 - a provider that cannot run this case is a result, not a crash
        rows = [_row(family, case, provider, m, status="error", reason=_reason(e)) for m in family.modes]
    return rows, kept


def add_ratios(rows, providers):
    """Fill each fastlm row's `vs`: peer time / fastlm time (> 1: fastlm is faster), or the peer's status."""
    ours = {p.name for p in providers if p.backend}
    peers = [p.name for p in providers if not p.backend]
    by = {(r["provider"], r["mode"]): r for r in rows}
    for r in rows:
        if r["provider"] in ours and r["status"] == "ok":
            for peer in peers:
                other = by.get((peer, r["mode"]))
                if other is None:
                    r["vs"][peer] = "missing"
                elif other["status"] == "ok":
                    r["vs"][peer] = round(other["ms"] / r["ms"], 4)
                else:
                    r["vs"][peer] = other["status"]


def _case_key(row) -> tuple:
    return (row["op"], row["dtype"], tuple(row["params"].items()))


def dispatch_summary(rows, providers, modes=MODES) -> tuple:
    """What `auto` should run, per op and mode: the fastlm backends and the peers that are torch's own route for the
    op (Provider.native) ranked by geometric-mean time relative to the per-case best, over the cases where every
    one of them ran and agreed with the reference.

    Returns ({op: {mode: fastest, ..., "order": [fastest, ..., slowest by forward+backward, or by the last mode
    measured]}}, {op: {mode: details}}); a candidate that ran none of an op's cases (a peer missing here) is left
    out of its ranking, and a family with fewer than two candidates has nothing to choose."""
    candidates = {p.name: p.backend or p.native for p in providers if p.backend or p.native}
    choice, details = {}, {}
    if len(candidates) < 2:
        return choice, details
    for op in dict.fromkeys(r["op"] for r in rows):
        for mode in modes:
            times = {}
            for r in rows:
                if r["op"] == op and r["mode"] == mode and r["provider"] in candidates and r["status"] == "ok":
                    times.setdefault(_case_key(r), {})[r["provider"]] = r["ms"]
            # A candidate that ran no case here (a peer missing on this machine) is left out, not the cases.
            ran = [name for name in candidates if any(name in t for t in times.values())]
            complete = [t for t in times.values() if len(t) == len(ran)]
            if len(ran) < 2 or not complete:
                details.setdefault(op, {})[mode] = {"cases": 0, "reason": "no case where two or more candidates "
                                                                          "all ran"}
                continue
            logs = {name: 0.0 for name in ran}
            wins = {candidates[name]: 0 for name in ran}
            for t in complete:
                best = min(t.values())
                for name, ms in t.items():
                    logs[name] += math.log(ms / best)
                wins[candidates[min(t, key=t.get)]] += 1
            geo = {candidates[n]: round(math.exp(v / len(complete)), 4) for n, v in logs.items()}
            # The fastlm backends this mode could not rank (one missing here) still follow, so that `auto` tries
            # them where the ranked ones cannot take a call rather than falling back to the reference.
            order = sorted(geo, key=geo.get) + [p.backend for p in providers if p.backend and p.backend not in geo]
            choice.setdefault(op, {})[mode] = order[0]
            choice[op]["order"] = order
            details.setdefault(op, {})[mode] = {"winner": order[0], "order": order, "cases": len(complete),
                                                "geomean_time_vs_best": geo, "wins": wins}
    return choice, details


def summarize(family: Family, rows) -> list:
    """Per mode and fastlm backend: how close to the ceiling, and the speed-up over each peer (geometric mean and
    worst case), as lines of text."""
    lines = []
    ceiling = UNITS[family.metric][1]
    peers = [p.name for p in family.providers if not p.backend]
    for mode in family.modes:
        for p in (p for p in family.providers if p.backend):
            mine = [r for r in rows if r["provider"] == p.name and r["mode"] == mode]
            ok = [r for r in mine if r["status"] == "ok"]
            if not ok:
                states = sorted({r["status"] for r in mine}) or ["no rows"]
                lines.append(f"{mode:8} {p.name:14} {'/'.join(states)}")
                continue
            fracs = sorted(r["frac_of_ceiling"] for r in ok)
            parts = [f"{mode:8} {p.name:14} {len(ok)}/{len(mine)} ok; of {ceiling}: median "
                     f"{fracs[len(fracs) // 2]:.0%}, min {fracs[0]:.0%}"]
            for peer in peers:
                ratios = [r["vs"][peer] for r in ok if isinstance(r["vs"].get(peer), float)]
                if ratios:
                    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
                    parts.append(f"vs {peer}: ×{geo:.2f} geomean, ×{min(ratios):.2f} min")
                else:
                    parts.append(f"vs {peer} {next(iter({r['vs'].get(peer, 'missing') for r in ok}))}")
            lines.append("; ".join(parts))
    return lines


def ratio_table(family: Family, rows) -> list:
    """A markdown table, as lines: for every case and mode, each fastlm backend's ratio against each peer (peer time
    / fastlm time, > 1: fastlm faster), or the status of whichever side did not give a time."""
    ours = [p.name for p in family.providers if p.backend]
    peers = [p.name for p in family.providers if not p.backend]
    by = {(_case_key(r), r["provider"], r["mode"]): r for r in rows}
    lines = ["| case | mode | fastlm | " + " | ".join(f"vs {p}" for p in peers) + " |", "|" + "---|" * (3 + len(peers))]
    for key in _cases_in_order(rows):
        label = " ".join([key[0], key[1]] + [f"{k}={_format_param(v)}" for k, v in key[2]])
        for mode in family.modes:
            for name in ours:
                r = by.get((key, name, mode))
                if r is None:
                    continue
                if r["status"] == "ok":
                    cells = [r["vs"].get(p, "missing") for p in peers]
                    cells = [f"{v:.2f}" if isinstance(v, (int, float)) else str(v) for v in cells]
                else:
                    cells = [r["status"]] * len(peers)
                lines.append(f"| {label} | {mode} | {name} | " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------------------------- writers


def _json_safe(obj):
    """JSON has no NaN or infinity (a kernel that wrote NaN has an infinite error): those become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: Path, meta: dict, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    text = json.dumps(_json_safe({"meta": meta, "rows": rows}), indent=1, allow_nan=False, default=str)
    tmp.write_text(text + "\n")
    tmp.replace(path)


def merge_dispatch(path: Path, choice: dict) -> dict:
    """Update `dispatch.json` with this family's ops, keeping the entries other families wrote."""
    table = json.loads(path.read_text()) if path.exists() else {}
    table.update(choice)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def _format_rate(row) -> str:
    if row is None:
        return ""
    if row["status"] in ("ok", "mismatch"):
        cell = f"{row['rate']:.0f} ({row['frac_of_ceiling']:.0%})"
        return cell + " (!)" if row["status"] == "mismatch" else cell
    return row["status"]


def _format_param(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _cases_in_order(rows) -> list:
    return list(dict.fromkeys(_case_key(r) for r in rows))


def markdown(family: Family, meta: dict, rows: list) -> str:
    unit, ceiling_name = UNITS[family.metric]
    ceiling = meta["ceiling"]
    providers = [p.name for p in family.providers]
    ours = [p.name for p in family.providers if p.backend]
    peers = [p.name for p in family.providers if not p.backend]
    by = {(_case_key(r), r["provider"], r["mode"]): r for r in rows}
    keys = _cases_in_order(rows)
    param_names = list(rows[0]["params"]) if rows else []
    out = [
        f"# {family.name}: {meta['device']}",
        "",
        f"{meta['date']} · torch {meta['torch']} (CUDA {meta['cuda']}) · triton {meta['triton']} · "
        f"fastlm {meta['fastlm']} (git {meta['git_commit'] or 'unknown'}) · liger-kernel {meta['liger_kernel']}"
        + (" · **quick subset**" if meta.get("quick") else "")
        + (" · **incomplete: the run stopped before its last case**" if meta.get("complete") is False else ""),
        "",
        f"Measured {ceiling_name} in this run: **{ceiling:.0f} {unit}**. Cells: achieved {unit} and, in brackets, "
        f"its fraction of that. Ratios: peer time / fastlm time (> 1: fastlm faster), for "
        f"{' / '.join(ours)}. `missing`: the provider is not installed here; `error` / `oom`: it failed on the case; "
        "`skipped`: the family leaves it out of the case; "
        "`(!)`: its outputs or gradients disagree with the reference (reasons in the JSON).",
        "",
    ]
    auto = auto_line(meta) if any(p.backend == "auto" for p in family.providers) else None
    notes = [*family.notes, *([auto] if auto else [])]
    out += [f"- {n}" for n in notes] + ([""] if notes else [])
    out += ["## Summary", "", "```"] + summarize(family, rows) + ["```", ""]
    head = ["op", "dtype"] + param_names
    for mode in family.modes:
        out += [f"## {mode} ({unit})", ""]
        cols = head + providers + [f"vs {p}" for p in peers]
        out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for key in keys:
            cells = [key[0], key[1]] + [_format_param(v) for _, v in key[2]]
            cells += [_format_rate(by.get((key, p, mode))) for p in providers]
            for peer in peers:
                ratios = []
                for name in ours:
                    r = by.get((key, name, mode))
                    v = r["vs"].get(peer) if r else None
                    ratios.append(f"{v:.2f}" if isinstance(v, float) else "–")
                cells.append(" / ".join(ratios))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    peak_mode = family.modes[-1]
    out += [f"## Peak extra memory, {peak_mode} (MiB)", ""]
    cols = head + providers
    out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for key in keys:
        cells = [key[0], key[1]] + [_format_param(v) for _, v in key[2]]
        for p in providers:
            r = by.get((key, p, peak_mode))
            ok = r is not None and r["peak_mem_bytes"] is not None
            cells.append(f"{r['peak_mem_bytes'] / 2**20:.0f}" if ok else (r["status"] if r else ""))
        out.append("| " + " | ".join(cells) + " |")
    problems = {}
    for r in rows:
        if r["status"] != "ok" and r["reason"]:
            problems.setdefault((r["provider"], r["status"], r["reason"]), 0)
            problems[(r["provider"], r["status"], r["reason"])] += 1
    if problems:
        out += ["", "## Missing and failing", ""]
        out += [f"- {p} ({s}, {n} rows): {why}" for (p, s, why), n in problems.items()]
    return "\n".join(out) + "\n"


def write_plot(path: Path, family: Family, meta: dict, rows: list) -> None:
    """Achieved rate against the x parameter, one line per provider; one row of panels per series (op, dtype and
    the other parameters), one column per mode; the dashed line is the measured ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit, ceiling_name = UNITS[family.metric]

    def series_key(r):
        return (r["op"], r["dtype"], tuple((k, v) for k, v in r["params"].items() if k != family.x_key))

    xs = {}
    for r in rows:
        xs.setdefault(series_key(r), set()).add(r["params"][family.x_key])
    series = [k for k, v in xs.items() if len(v) >= MIN_PLOT_POINTS] or list(xs)
    modes = family.modes
    fig, axes = plt.subplots(len(series), len(modes), figsize=(5 * len(modes), 3.2 * len(series)), squeeze=False)
    for i, key in enumerate(series):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for p in family.providers:
                pts = sorted((r["params"][family.x_key], r["rate"]) for r in rows
                             if series_key(r) == key and r["provider"] == p.name and r["mode"] == mode
                             and r["status"] == "ok")
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p.name)
            ax.axhline(meta["ceiling"], color="gray", linestyle="--", linewidth=1, label=ceiling_name)
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_xlabel(family.x_key)
            ax.set_ylabel(unit)
            extra = " ".join(f"{k}={_format_param(v)}" for k, v in key[2])
            ax.set_title(f"{key[0]} {key[1]} {extra} · {mode}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"fastlm {family.name} on {meta['device']} ({meta['date'][:10]})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_results(out_dir: Path, family: Family, meta: dict, rows: list) -> list:
    """<family>.json, .md and .png in out_dir; returns their paths."""
    paths = [out_dir / f"{family.name}.{ext}" for ext in ("json", "md", "png")]
    write_json(paths[0], meta, rows)
    paths[1].write_text(markdown(family, meta, rows))
    write_plot(paths[2], family, meta, rows)
    return paths


# ---------------------------------------------------------------------------------------------- running


class IsolatedRun:
    """A run of the suite whose GPU work happens in worker processes, so that a provider that fails costs its own
    cells and nothing else.

    Why processes: a provider can break the CUDA context of its process (a device-side assert, an illegal memory
    access), after which every CUDA call there fails, and nothing in the process can undo it. So this process, the
    coordinator, never touches CUDA (not even torch.cuda.is_available(), which initializes the driver). It forks a
    worker that does all the device work one unit at a time: the device's metadata and ceilings, each provider's
    availability check, and each provider on each case. The worker sends each unit's result as the unit ends, and
    after each unit it synchronizes the device: when the context is broken, that unit's rows say error (with the
    CUDA message) and the worker exits. When a worker exits that way, dies (a signal, os._exit, a crash in native
    code) or spends more than UNIT_TIMEOUT_S on one unit (it is then killed), the coordinator records the error for
    the unit that was running, forks a fresh worker at the next unit, and goes on: the later providers, cases and
    families still run and are written.

    Cost: one worker serves the whole run while nothing fails, so a clean run pays one fork; a fresh worker (a
    fork, then its own CUDA initialization, a few seconds) is paid once per failure. A worker that starts in the
    middle of a case draws the same inputs (their generator is seeded by the case's label) and recomputes the
    reference's outputs, untimed, so the providers after the failure are still checked against it.

    The coordinator writes the results: <family>.json and .md after every case (meta complete: false), so that a
    run cut short keeps what it measured, then .json, .md and .png at the family's end, with the dispatch choice.
    Fork, not spawn: the worker inherits the families (their providers are closures, which do not pickle) and the
    results so far.
    """

    def __init__(self, families, quick: bool, out_dir: Optional[Path] = None, *, meta: Optional[dict] = None,
                 device=None):
        self.families = list(families)
        self.quick = quick
        self.out_dir = Path(out_dir) if out_dir is not None else None
        # Given (with "ceilings" and "l2_bytes"; tests on CPU), or measured by the first unit, in the worker.
        self.meta = meta
        self.device = torch.device(device) if device is not None else None  # None: the worker's CUDA device
        self.cases = [family.cases(quick) for family in self.families]
        # A unit: ("setup",), ("probe", family index, provider), ("case", family index, case index, provider).
        self.units = [("setup",)] if meta is None else []
        for fi, family in enumerate(self.families):
            self.units += [("probe", fi, p.name) for p in family.providers]
            for ci in range(len(self.cases[fi])):
                self.units += [("case", fi, ci, p.name) for p in run_order(family)]
        self.availability = [{} for _ in self.families]  # per family: provider -> (usable, why not)
        self.cells = {}  # (family index, case index) -> {provider: its rows}
        self.rows = [[] for _ in self.families]  # per family: the rows of its finished cases
        self.results = []  # (family, rows, meta, dispatch choice) of each finished family, in order
        self.workers = 0  # worker processes started so far
        self.progress = None
        self._done = 0  # units finished (they finish in order)
        self._proc = self._conn = None
        self._exiting = False  # the worker said it would exit after its last unit
        self._clock = time.perf_counter()  # when the current family began
        # The worker's own state: the case whose input sets it holds, the sets, the reference's outputs.
        self._case = self._sets = self._reference = None

    # ------------------------------------------------------------------ the coordinator's side

    def start(self) -> Optional[dict]:
        """The run's metadata with the measured ceilings, or None when there is no CUDA GPU; the work goes on in
        the background until finish()."""
        try:
            self._run_until(1 if self.meta is None else 0)
        except BaseException:
            self.close()
            raise
        if self.meta is None:
            self.close()
            return None
        if self.out_dir is None:
            self.out_dir = RESULTS_ROOT / self.meta["device_slug"]
        if self._done <= 1:
            self._clock = time.perf_counter()
        return self.meta

    def finish(self, progress=None) -> list:
        """Every unit run and written; returns [(family, rows, meta, dispatch choice)] (empty without a GPU)."""
        if self.start() is None:
            return []
        self.progress = progress
        try:
            self._run_until(len(self.units))
        finally:
            self.close()
        return self.results

    def _run_until(self, stop: int) -> None:
        from multiprocessing import connection

        while self._done < stop:
            if self._proc is None:
                self._fork()
            ready = connection.wait([self._conn, self._proc.sentinel], timeout=UNIT_TIMEOUT_S)
            if self._conn in ready or self._conn.poll():  # a message, or the end of the pipe
                try:
                    message = self._conn.recv()
                except (EOFError, OSError):
                    self._worker_gone(f"its worker process died ({self._exit_text()})")
                    continue
                if message[0] == "start":
                    self._show(message[1])
                else:
                    _, idx, payload, exiting = message
                    self._record(idx, payload)
                    self._done = idx + 1
                    self._exiting = exiting
                    self._publish(idx)
            elif ready:  # the worker ended, and a process it started still holds the pipe open
                self._worker_gone(f"its worker process died ({self._exit_text()})")
            else:
                self._proc.kill()
                self._worker_gone(f"it ran longer than UNIT_TIMEOUT_S ({UNIT_TIMEOUT_S} s); its worker was killed")

    def _fork(self) -> None:
        import multiprocessing

        context = multiprocessing.get_context("fork")
        receive, send = context.Pipe(duplex=False)
        # Not a daemon: a daemonic process may not start processes of its own (a provider's compile workers, say).
        self._proc = context.Process(target=self._work, args=(send, self._done),
                                     name=f"fastlm-benchmark-worker-{self.workers}")
        self._proc.start()
        send.close()  # the worker holds the only writing end: its exit ends the pipe
        self._conn = receive
        self._exiting = False
        self.workers += 1

    def _exit_text(self) -> str:
        self._proc.join(timeout=30)
        code = self._proc.exitcode
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"

    def _worker_gone(self, why: str) -> None:
        """The worker ended: unless it said it would, the unit it was running failed with `why`."""
        self._proc.join(timeout=30)
        if self._proc.is_alive():  # its pipe closed, but it does not end
            self._proc.kill()
            self._proc.join()
        self._conn.close()
        self._proc = self._conn = None
        if not self._exiting and self._done < len(self.units):
            idx = self._done
            self._record(idx, self._failure(idx, why))
            self._done = idx + 1
            self._publish(idx)
        self._exiting = False

    def close(self) -> None:
        """End the worker: the one that finished its units is waited for, any other is killed."""
        if self._proc is None:
            return
        if self._done >= len(self.units) or self._exiting:
            self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()
        self._proc = self._conn = None

    def _failure(self, idx: int, why: str):
        """The result of a unit whose worker died or was killed while running it."""
        unit = self.units[idx]
        if unit[0] == "setup":
            raise RuntimeError(f"the benchmark worker could not measure the device: {why} (its traceback, if it "
                               "printed one, is above)")
        if unit[0] == "probe":
            return False, f"its availability check ended the benchmark worker: {why}"
        family, case, provider = self._unit_objects(unit)
        return [_row(family, case, provider, m, status="error", reason=f"{why}; the cells after it ran in a fresh "
                     "worker") for m in family.modes]

    def _show(self, idx: int) -> None:
        unit = self.units[idx]
        if self.progress is not None and unit[0] == "case":
            _, case, provider = self._unit_objects(unit)
            self.progress.set_postfix_str(f"{case.label} · {provider.name}", refresh=False)

    def _publish(self, idx: int) -> None:
        """What the coordinator does when a unit ends: count it, and write the case's or the family's results when
        it was their last unit."""
        unit = self.units[idx]
        if unit[0] == "setup":
            return
        fi, family = unit[1], self.families[unit[1]]
        if unit[0] == "case":
            if self.progress is not None:
                self.progress.update(1)
            if self._ends(idx, 3):
                cells = self.cells[unit[1:3]]
                self.rows[fi] += finish_case(family, [r for p in family.providers for r in cells.get(p.name, ())])
                meta = dict(self._family_meta(fi), complete=False)
                write_json(self.out_dir / f"{family.name}.json", meta, self.rows[fi])
                (self.out_dir / f"{family.name}.md").write_text(markdown(family, meta, self.rows[fi]))
        if self._ends(idx, 2):
            rows = self.rows[fi]
            choice, details = dispatch_summary(rows, family.providers, family.modes)
            meta = dict(self._family_meta(fi), complete=True, dispatch=details,
                        seconds=round(time.perf_counter() - self._clock, 1))
            self._clock = time.perf_counter()
            write_results(self.out_dir, family, meta, rows)
            self.results.append((family, rows, meta, choice))

    def _ends(self, idx: int, depth: int) -> bool:
        """Whether unit idx is the last of its family (depth 2) or of its case (depth 3)."""
        unit = self.units[idx]
        if len(unit) <= depth:  # the setup unit; or, for depth 3, a probe
            return False
        nxt = self.units[idx + 1] if idx + 1 < len(self.units) else ()
        return nxt[1:depth] != unit[1:depth]

    def _family_meta(self, fi: int) -> dict:
        family, availability = self.families[fi], self.availability[fi]
        return dict(self.meta, family=family.name, ceiling=self.meta["ceilings"][family.metric],
                    providers={p.name: {"available": ok, "reason": why} for p in family.providers
                               for ok, why in [availability.get(p.name, (False, "not checked"))]})

    # ------------------------------------------------------------------ both sides

    def _record(self, idx: int, payload) -> None:
        unit = self.units[idx]
        if unit[0] == "setup":
            self.meta = payload
        elif unit[0] == "probe":
            self.availability[unit[1]][unit[2]] = payload
        else:
            self.cells.setdefault(unit[1:3], {})[unit[3]] = payload

    def _unit_objects(self, unit) -> tuple:
        family = self.families[unit[1]]
        return family, self.cases[unit[1]][unit[2]], next(p for p in family.providers if p.name == unit[3])

    # ------------------------------------------------------------------ the worker's side

    def _work(self, conn, start: int) -> None:
        """The worker (a forked process): the units from `start` on, each result sent as soon as it is known."""
        _die_with_parent()
        torch.set_num_threads(WORKER_CPU_THREADS)
        for idx in range(start, len(self.units)):
            conn.send(("start", idx))
            payload, exiting = self._execute(idx)
            self._record(idx, payload)
            conn.send(("done", idx, payload, exiting))
            if exiting:
                break
        conn.close()

    def _device(self):
        if self.device is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        return self.device

    def _execute(self, idx: int) -> tuple:
        """(the unit's result, whether this worker must exit after it: no GPU, or a broken CUDA context)."""
        unit = self.units[idx]
        if unit[0] == "setup":
            meta = self._setup()
            return meta, meta is None
        if unit[0] == "probe":
            provider = next(p for p in self.families[unit[1]].providers if p.name == unit[2])
            try:
                usable, why = provider.available()
            except Exception as e:  # noqa: BLE001 - a peer that cannot even be probed is missing, with the reason
                usable, why = False, _reason(e)
            broken = _context_error(self._device())
            if broken:
                usable, why = False, f"its availability check broke the CUDA context ({broken})"
            return (usable, why), bool(broken)
        family, case, provider = self._unit_objects(unit)
        fi, ci = unit[1], unit[2]
        try:
            rows, outputs = provider_cells(family, case, provider, self.availability[fi][provider.name],
                                           lambda: self._inputs(fi, ci), self.meta["ceilings"][family.metric])
        except Exception as e:  # noqa: BLE001 - making the inputs (or the family's skip rule) failed: this cell's error
            status = "oom" if isinstance(e, torch.cuda.OutOfMemoryError) else "error"
            rows = [_row(family, case, provider, m, status=status, reason=_reason(e)) for m in family.modes]
            outputs = None
        if provider.name == family.reference:
            self._reference = outputs
        broken = _context_error(self._device())
        if broken:  # this worker exits: nothing to free, and freeing would fail
            return [_broken(r, broken) for r in rows], True
        if self._ends(idx, 3):
            self._drop_case()
        return rows, False

    def _setup(self) -> Optional[dict]:
        if not torch.cuda.is_available():
            return None
        if getattr(torch.cuda, "_is_in_bad_fork", lambda: False)():
            raise RuntimeError("CUDA was initialized in the benchmark coordinator before it forked this worker, so "
                               "the worker cannot use it: the coordinator must leave CUDA alone")
        device = self._device()
        meta = run_metadata(device, self.quick)
        meta["ceilings"] = measure_ceilings(self.families, device)
        return meta

    def _inputs(self, fi: int, ci: int) -> tuple:
        """(input sets, reference outputs) of the case, made on first use in this worker."""
        if self._case != (fi, ci):
            self._drop_case()
            family, case = self.families[fi], self.cases[fi][ci]
            self._sets = input_sets(family, case, self._device(), self.meta["l2_bytes"])
            self._case = (fi, ci)
            reference = self.cells.get((fi, ci), {}).get(family.reference)
            if reference and reference[0]["status"] == "ok":  # it ran in an earlier worker: its outputs again
                self._reference = reference_outputs(family, case, self._sets)
        return self._sets, self._reference

    def _drop_case(self) -> None:
        had = self._sets is not None
        self._case = self._sets = self._reference = None
        if had and self._device().type == "cuda":
            torch.cuda.empty_cache()


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so that a coordinator killed mid-run (a timeout)
    leaves no worker holding the GPU."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _context_error(device) -> str:
    """'' while the device's CUDA context works, else why not: after a device-side assert or an illegal memory
    access, synchronizing (as every later CUDA call) fails."""
    if torch.device(device).type != "cuda":
        return ""
    try:
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - any failure here means the context cannot be trusted
        return _reason(e)
    return ""


def _broken(row: dict, why: str) -> dict:
    """A row of the provider during whose run the CUDA context broke: an error, its measurements dropped."""
    if row["status"] in ("missing", "skipped"):  # it did not run: not its doing
        return row
    reason = f"the CUDA context broke during its run ({why}); the cells after it ran in a fresh worker"
    if row["status"] in ("error", "oom") and row["reason"]:
        reason = f"{row['reason']} ({reason})"
    return dict(row, status="error", reason=reason, ms=None, rate=None, frac_of_ceiling=None, peak_mem_bytes=None,
                rel_err=None)


def measure_ceilings(families, device) -> dict:
    ceilings = {}
    if any(f.metric == "bytes" for f in families):
        ceilings["bytes"] = measure_copy_gbps(device)
    if any(f.metric == "flops" for f in families):
        ceilings["flops"] = measure_matmul_tflops(device)
    torch.cuda.empty_cache()
    return ceilings


# ---------------------------------------------------------------------------------------------- no GPU


def committed_results(root: Path = RESULTS_ROOT, families=None) -> list:
    """The newest committed markdown table per family: [(family, md path, date, device)], newest first."""
    newest = {}
    for md in sorted(root.glob("*/*.md")):
        name = md.stem
        if families is not None and name not in families:
            continue
        date, device = "", md.parent.name
        meta_path = md.with_suffix(".json")
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text()).get("meta", {})
                date, device = meta.get("date", ""), meta.get("device", device)
            except (json.JSONDecodeError, AttributeError):
                pass
        if name not in newest or date > newest[name][2]:
            newest[name] = (name, md, date, device)
    return sorted(newest.values(), key=lambda t: t[2], reverse=True)



# ---------------------------------------------------------------------------------------------- gpu_check.json

_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)\b")
_PYTEST_SECONDS = re.compile(r" in ([0-9]+(?:\.[0-9]+)?)s\b")
GPU_CHECK_COUNTS = ("passed", "failed", "errors", "skipped")
PYTEST_TAIL_LINES = 20  # pytest's closing line is its last; a few lines of warnings at exit may follow it


def _pytest_tail(text: str) -> list:
    """The last PYTEST_TAIL_LINES non-blank lines of pytest's output: where its closing lines are."""
    return [line for line in text.splitlines() if line.strip()][-PYTEST_TAIL_LINES:]


def pytest_summary(text: str) -> Optional[dict]:
    """The counts of pytest's closing line in `text` (its output), e.g. "25 failed, 1167 passed, 25 skipped, 70
    warnings, 4 errors in 311.95s (0:05:11)", bare (-q) or between "=" rules: {passed, failed, errors, skipped:
    ints, 0 when absent; seconds; line}, or None when there is no such line (pytest was cut off before its end).
    Only the last lines count: a test's own output, earlier in the log, may hold a nested run's summary."""
    for line in reversed(_pytest_tail(text)):
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip().strip("=").strip()
        seconds = _PYTEST_SECONDS.search(line)
        if not seconds or not re.match(r"(\d+ [a-z]+\b|no tests ran)", line):
            continue
        counts = dict.fromkeys(GPU_CHECK_COUNTS, 0)
        for n, what in _PYTEST_COUNT.findall(line[: seconds.start()]):
            key = "errors" if what.startswith("error") else what
            if key in counts:
                counts[key] += int(n)
        return dict(counts, seconds=float(seconds.group(1)), line=line)
    return None


def bench_complete(folder: Path, names) -> bool:
    """True when `folder` holds the results of every named family from a full run (not --quick) that reached the
    family's end."""
    names = list(names)
    for name in names:
        try:
            meta = json.loads((folder / f"{name}.json").read_text())["meta"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if meta.get("complete") is not True or meta.get("quick") is not False:
            return False
    return bool(names)


def gpu_check_record(pytest_output: Optional[str], *, commit: Optional[str], device: str, bench_done: bool,
                     date: Optional[str] = None) -> dict:
    """What scripts/gpu_check.sh writes to gpu_check.json: the commit, date and device; the test counts and
    seconds from pytest's closing line (None where the tests did not run or were cut off); tests_interrupted,
    whether that line closes a run stopped at the step's budget (SIGINT: the counts are of the tests that ran);
    bench_complete."""
    counts = pytest_summary(pytest_output) if pytest_output else None
    record = {"commit": commit, "date": date or datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "device": device}
    record.update({k: counts[k] if counts else None for k in GPU_CHECK_COUNTS + ("seconds",)})
    record.update(tests_interrupted=any(re.search(r"KeyboardInterrupt|Interrupted:", line)
                                        for line in _pytest_tail(pytest_output)) if counts else None)
    record.update(bench_complete=bench_done, pytest_summary=counts["line"] if counts else None)
    return record


def write_gpu_check(results_root: Path, pytest_log: Optional[Path], family_names, *, device: str,
                    commit: Optional[str], resumed: bool = False) -> Path:
    """results_root/<device slug>/gpu_check.json from the tests' log (None: the tests did not run in this call)
    and the benchmark results beside it; returns its path.

    The tests and the full benchmark sweep take two calls of the device tool. A record already there from the same
    device and commit (an earlier call on the same machine) lends the test counts this call lacks; bench_complete is
    always judged anew from the results present. `resumed`: this call's tests went on where an earlier call's
    stopped (gpu_check.sh TESTS_RESUME=1, which runs only the tests not yet finished on the machine), so its counts
    and seconds are added to the earlier record's, and tests_interrupted is this call's."""
    folder = Path(results_root) / slug(device)
    path = folder / "gpu_check.json"
    output = Path(pytest_log).read_text(errors="replace") if pytest_log and Path(pytest_log).exists() else None
    record = gpu_check_record(output, commit=commit, device=device,
                              bench_done=bench_complete(folder, family_names))
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        earlier = {}
    same = (earlier.get("commit"), earlier.get("device")) == (commit, device)
    if record["pytest_summary"] is None and same:
        record.update({k: earlier.get(k) for k in GPU_CHECK_COUNTS + ("seconds", "pytest_summary",
                                                                       "tests_interrupted")})
    elif resumed and same and earlier.get("pytest_summary"):
        record.update({k: (earlier.get(k) or 0) + record[k] for k in GPU_CHECK_COUNTS + ("seconds",)})
        record["pytest_summary"] = f"{earlier['pytest_summary']} + resumed: {record['pytest_summary']}"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def per_file_seconds(junit_paths) -> Optional[dict]:
    """Each test file's share of a test run, from pytest's JUnit XML reports (scripts/gpu_check.sh's tests step
    writes one a call; a resumed call's adds to the first's): {"tests", "seconds", "files": [{"file", "tests",
    "seconds", "longest", "longest_seconds"}, the slowest file first]}, or None when no report holds a test. Under
    `--dist loadfile` a file runs whole on one worker, so no tests step ends before its slowest file: these numbers
    say whether another distribution would save device time. Unreadable reports (a call cut before pytest wrote
    its own) are passed over."""
    import xml.etree.ElementTree as ElementTree

    files = {}
    for path in junit_paths:
        try:
            root = ElementTree.parse(path).getroot()
        except (OSError, ElementTree.ParseError):
            continue
        for case in root.iter("testcase"):
            parts = case.get("classname", "").split(".")
            module = next((i for i, part in enumerate(parts) if part.startswith("test_")), len(parts) - 1)
            name = "/".join(parts[: module + 1]) + ".py"
            test = "::".join([name, *parts[module + 1:], case.get("name", "")])
            seconds = float(case.get("time") or 0.0)
            entry = files.setdefault(name, {"file": name, "tests": 0, "seconds": 0.0, "longest": None,
                                            "longest_seconds": -1.0})
            entry["tests"] += 1
            entry["seconds"] += seconds
            if seconds > entry["longest_seconds"]:
                entry["longest"], entry["longest_seconds"] = test, seconds
    if not files:
        return None
    ordered = sorted(files.values(), key=lambda f: f["seconds"], reverse=True)
    for entry in ordered:
        entry["seconds"], entry["longest_seconds"] = round(entry["seconds"], 2), round(entry["longest_seconds"], 2)
    return {"tests": sum(f["tests"] for f in ordered), "seconds": round(sum(f["seconds"] for f in ordered), 2),
            "files": ordered}


def write_test_times(results_root: Path, junit_paths, *, device: str) -> Optional[Path]:
    """results_root/<device slug>/test_times.json from `per_file_seconds(junit_paths)`; its path, or None (and nothing
    written) when the reports hold no test."""
    times = per_file_seconds(junit_paths)
    if times is None:
        return None
    folder = Path(results_root) / slug(device)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "test_times.json"
    path.write_text(json.dumps(times, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- provider helpers


def importable(*modules):
    """A Provider.available check: (True, "") when every module imports, else (False, why)."""
    def check():
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception as e:  # noqa: BLE001 - any import failure makes the provider missing, with its reason
                return False, f"{module} not importable ({type(e).__name__}: {e})"
        return True, ""

    return check


def fastlm_context(backend):
    """A Provider.context: the block runs under fastlm.use_backend(backend)."""
    def enter():
        import fastlm

        return fastlm.use_backend(backend)

    return enter


def sweep_main(prog: str, doc: str, family, tune_help: str, argv=None, after=None) -> int:
    """The command line of a one-call GPU sweep (benchmarks/norm_sweep.py, cross_entropy_sweep.py): --tune, --out,
    --cases, --peers; `family(tune, case_filter, peers)` makes the Family; it runs isolated (IsolatedRun), then
    each family's summary and table are printed, and `after(rows, out_dir, tune)` runs on its rows."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--tune", action="store_true", help=tune_help)
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device>/)")
    parser.add_argument("--cases", default="", help="only cases whose label matches this regex")
    parser.add_argument("--peers", default=None, help="comma-separated peers to keep (default: all)")
    args = parser.parse_args(argv)
    peers = None if args.peers is None else set(args.peers.split(","))
    fam = family(args.tune, args.cases, peers)
    run = IsolatedRun([fam], False, args.out)
    start = time.perf_counter()
    try:
        meta = run.start()
        if meta is None:
            print(f"{prog.split('.')[-1]}: no CUDA GPU here, nothing timed")
            return 0
        print(f"{fam.name} on {meta['device']}: {len(fam.cases(False))} cases × {len(fam.providers)} providers; "
              + ", ".join(f"{UNITS[k][1]} {v:.0f} {UNITS[k][0]}" for k, v in meta["ceilings"].items())
              + f"; writing to {run.out_dir}", flush=True)
        results = run.finish(None)
    finally:
        run.close()
    for f, rows, _, _ in results:
        print(f"\n{f.name}: {len(rows)} rows in {time.perf_counter() - start:.0f} s, {run.out_dir}/{f.name}.md")
        print("\n".join("  " + line for line in summarize(f, rows)))
        md = Path(run.out_dir, f"{f.name}.md")
        if md.exists():
            print(md.read_text())
        if after:
            after(rows, run.out_dir, args.tune)
    return 0


def constants_context(module: str, values: dict, backend: str, on_change=None):
    """A Provider.context for tuning sweeps: the block runs under fastlm.use_backend(backend) with the constants of
    the module `module` (e.g. "fastlm.kernels.norm") set to `values`, put back afterwards. `on_change()` runs after
    each change (to clear caches made from the old values)."""

    @contextlib.contextmanager
    def enter():
        import fastlm

        target = importlib.import_module(module)
        saved = {k: getattr(target, k) for k in values}
        try:
            for k, v in values.items():
                setattr(target, k, v)
            if on_change:
                on_change()
            with fastlm.use_backend(backend):
                yield
        finally:
            for k, v in saved.items():
                setattr(target, k, v)
            if on_change:
                on_change()

    return enter


def fastlm_unavailable_reason(op: str, backend: str, probe) -> str:
    """Why fastlm's `backend` cannot run `op`, or "" when it can: fastlm not importable, the op not in this fastlm,
    the CUDA extension not usable, or the backend raising BackendUnavailable on `probe()`, a tiny call of the op.
    Any other failure is left to the benchmark case, whose rows then say "error" with it."""
    try:
        import fastlm
    except Exception as e:  # noqa: BLE001 - any import failure makes the provider missing, with its reason
        return f"fastlm not importable ({type(e).__name__}: {e})"
    if not hasattr(fastlm, op):
        return f"this fastlm has no {op}"
    if backend == "cuda":
        from fastlm import _cuda

        ok, why = _cuda.available()
        if not ok:
            return why
    try:
        with fastlm.use_backend(backend):
            probe()
    except fastlm.BackendUnavailable as e:
        return str(e)
    except Exception:  # noqa: BLE001 - not a missing backend but a failing one: the case rows say "error" with it
        return ""
    return ""
