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
"""

import contextlib
import importlib
import datetime
import itertools
import json
import math
import platform
import re
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
    import triton.runtime

    driver = triton.runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()

    def run(n):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            state = prepare()
            driver.clear_cache(cache)
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
    """Every provider on one case: rows for every (provider, mode), with the ratios of fastlm's rows filled in."""
    gen = torch.Generator(device=device)
    gen.manual_seed(zlib.crc32(case.label.encode()))
    sets = [family.make_inputs(case, device, gen)]
    n_sets = input_set_count(tensor_bytes(*sets[0]), l2_bytes)
    sets += [family.make_inputs(case, device, gen) for _ in range(n_sets - 1)]
    rows, reference = [], None
    # The reference runs first, so that every other provider is checked against it.
    for provider in sorted(family.providers, key=lambda p: p.name != family.reference):
        if progress is not None:
            progress.set_postfix_str(f"{case.label} · {provider.name}", refresh=False)
        usable, why = availability[provider.name]
        skip = provider.skip(case) if usable else ""
        if not usable:
            rows += [_row(family, case, provider, m, status="missing", reason=why) for m in family.modes]
        elif skip:
            rows += [_row(family, case, provider, m, status="skipped", reason=skip) for m in family.modes]
        else:
            provider_rows, outputs = _run_provider(family, case, provider, sets, reference, ceiling)
            rows += provider_rows
            if provider.name == family.reference:
                reference = outputs
        if progress is not None:
            progress.update(1)
    del sets, reference
    torch.cuda.empty_cache()
    add_ratios(rows, family.providers)
    order = {p.name: i for i, p in enumerate(family.providers)}
    return sorted(rows, key=lambda r: (order[r["provider"]], MODES.index(r["mode"])))


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
    """Which fastlm backend was faster, per op and mode: the one with the lowest geometric-mean time relative to the
    per-case best, over the cases where every backend ran and agreed with the reference.

    Returns ({op: {mode: backend}}, {op: {mode: details}}); a family with one backend has nothing to choose."""
    backends = {p.name: p.backend for p in providers if p.backend}
    choice, details = {}, {}
    if len(backends) < 2:
        return choice, details
    for op in dict.fromkeys(r["op"] for r in rows):
        for mode in modes:
            times = {}
            for r in rows:
                if r["op"] == op and r["mode"] == mode and r["provider"] in backends and r["status"] == "ok":
                    times.setdefault(_case_key(r), {})[r["provider"]] = r["ms"]
            complete = [t for t in times.values() if len(t) == len(backends)]
            if not complete:
                details.setdefault(op, {})[mode] = {"cases": 0, "reason": "no case where every backend ran"}
                continue
            logs = {name: 0.0 for name in backends}
            wins = {backends[name]: 0 for name in backends}
            for t in complete:
                best = min(t.values())
                for name, ms in t.items():
                    logs[name] += math.log(ms / best)
                wins[backends[min(t, key=t.get)]] += 1
            geo = {backends[n]: round(math.exp(v / len(complete)), 4) for n, v in logs.items()}
            winner = min(geo, key=geo.get)
            choice.setdefault(op, {})[mode] = winner
            details.setdefault(op, {})[mode] = {"winner": winner, "cases": len(complete),
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
    out += [f"- {n}" for n in family.notes] + ([""] if family.notes else [])
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


def run_family(family: Family, quick: bool, out_dir: Path, meta: dict, device, progress=None) -> tuple:
    """Every case of the family, written to out_dir; returns (rows, meta, dispatch choice). The JSON and the
    markdown are rewritten after each case, so a run cut short keeps what it measured."""
    cases = family.cases(quick)
    availability = {}
    for p in family.providers:
        try:
            availability[p.name] = p.available()
        except Exception as e:  # noqa: BLE001 - a peer that cannot even be probed is missing, with the reason
            availability[p.name] = (False, _reason(e))
    meta = dict(meta, family=family.name, ceiling=meta["ceilings"][family.metric],
                providers={p.name: {"available": ok, "reason": why} for p, (ok, why) in
                           ((p, availability[p.name]) for p in family.providers)})
    rows = []
    for case in cases:
        rows += run_case(family, case, availability, device, meta["l2_bytes"], meta["ceiling"], progress)
        write_json(out_dir / f"{family.name}.json", dict(meta, complete=False), rows)
        (out_dir / f"{family.name}.md").write_text(markdown(family, dict(meta, complete=False), rows))
    choice, details = dispatch_summary(rows, family.providers, family.modes)
    meta.update(complete=True, dispatch=details)
    write_results(out_dir, family, meta, rows)
    return rows, meta, choice


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
