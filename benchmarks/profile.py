"""`python -m benchmarks.profile`: each provider's kernels under Nsight Compute (ncu), on the GPU, in one call.

The benchmark families say how fast each provider is; this says why. For an op family's headline cases it runs
every provider's forward and backward once under ncu and reads, per kernel: its time, the SM and memory
throughput as fractions of the chip's peak, DRAM throughput, the tensor pipes' activity, achieved occupancy,
registers, the L2 hit rate and the warp stall reasons that cost the most. fastlm's kernels and the peers (SDPA's
cuDNN and FlashAttention-2 backends, eager PyTorch, torch.compile, Liger) are read the same way in the same run, so
a gap in the timing tables comes with its cause: a tensor pipe idle half the time, a kernel short of DRAM
bandwidth, warps stalled on a barrier.

    python -m benchmarks.profile --op attention --out DIR      # ncu over the driver below; DIR/profile_<op>.*
    python -m benchmarks.profile --op norm --cases 0 2 --out DIR

How. ncu runs this module again as its target (`--run`) with profiling off from the start
(`--profile-from-start off`). The driver builds each provider's call with the family's own inputs and contexts
(benchmarks/<family>.py), runs every call once to warm up (Triton compiles, cuDNN plans, torch.compile), then for
each (provider, mode) turns the profiler on (cudaProfilerStart), launches a marker (torch.cuda._sleep's
spin_kernel), makes the call and turns the profiler off again; a backward's forward runs while it is off. The
units it profiled, in order, go to a JSON file beside the report, and each marker row of ncu's CSV starts the next
unit. ncu replays each kernel for its metric passes with the caches flushed between them (its defaults) and the
clocks left alone (`--clock-control none`: the machine's ncu was seen working so). The report is exported as CSV
(`--page raw --print-units base`) and summarized (parse_csv, unit_rows, markdown).

The metrics come from ncu's standard sections (SECTIONS), whose names every ncu has; which raw metrics a section
holds differs between versions, so the summary picks its columns by name patterns (METRICS) and leaves a cell
empty where the report has no such column.

Writes DIR/profile_<op>.csv (ncu's export), DIR/profile_<op>.json (the units and their kernels' figures) and
DIR/profile_<op>.md. Exit status: 0 done, 1 ncu or the driver failed, 2 nothing to profile here (no GPU, no ncu).
"""

import argparse
import csv
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ncu's sections (their names are stable across versions; --list-sections prints them).
SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats",
            "WarpStateStats")
# Raw metrics asked for by name on top of the sections: the tensor pipes' activity (wgmma's and mma.sync's), which
# not every version's ComputeWorkloadAnalysis holds. A name this ncu does not know makes it refuse the run; the
# run is then made again without them (the report says so).
EXTRA_METRICS = ("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
                 "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active")
# Per family: the quick cases profiled (indices into family.cases(quick=True)), and the providers left out: they
# launch many kernels or compile every shape, and their time is not what this report is for.
CASES = {"attention": (0,), "attention_decode": (1,), "norm": (0, 2, 4), "cross_entropy": (1,),
         "linear_cross_entropy": (0,)}
SKIP_PROVIDERS = {"sdpa-math", "sdpa-efficient", "flex"}
PROFILED_MODES = ("fwd", "bwd")
MARKER = "spin_kernel"  # torch.cuda._sleep's kernel: each unit's first row in the report
MARKER_CYCLES = 1000
BUDGET_S = 240  # the ncu run, at most

# The summary's columns: (title, how to read it from a kernel's raw metrics). A pattern takes the first column whose
# name matches; "max:" the largest of all that match. Values in base units (ns, bytes, %).
METRICS = (
    ("µs", r"^gpu__time_duration\.sum$"),
    ("SM %", r"^sm__throughput\.avg\.pct_of_peak_sustained_elapsed$"),
    ("memory %", r"^gpu__compute_memory_throughput\.avg\.pct_of_peak_sustained_elapsed$"),
    ("DRAM %", r"^(gpu__)?dram__throughput\.avg\.pct_of_peak_sustained_elapsed$"),
    ("tensor %", r"max:^sm__(pipe_tensor|inst_executed_pipe_tensor)\w*\.avg\.pct_of_peak_sustained_active$"),
    ("occupancy %", r"^sm__warps_active\.avg\.pct_of_peak_sustained_active$"),
    ("regs", r"^launch__registers_per_thread$"),
    ("L2 hit %", r"^lts__t_sector_hit_rate\.pct$"),
)
# Warp stall reasons: cycles a warp spends stalled per issued instruction, by reason (WarpStateStats), under either
# of the names ncu versions give them.
STALL = re.compile(r"^smsp__(?:average_warps_issue_stalled|average_warp_latency_issue_stalled|"
                   r"pcsamp_warps_issue_stalled)_(\w+?)(?:_per_issue_active\.ratio|\.ratio|\.sum)?$")
TOP_STALLS = 3


# ---------------------------------------------------------------------------------------------- reading the report


def parse_csv(text: str) -> list:
    """ncu's `--page raw --csv` export: one dict per profiled kernel, in launch order, {column: value}. Lines before
    the header (ncu's ==PROF== notes) are skipped; a units row (its ID cell empty) right after the header is
    dropped; numbers with thousands separators become floats, other cells stay strings."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    reader = csv.reader(io.StringIO("\n".join(lines[start:])))
    header = next(reader)
    rows = []
    for cells in reader:
        if len(cells) != len(header):
            break  # past the table (a trailing note)
        row = dict(zip(header, cells))
        if not row.get("ID", "").strip():
            continue  # the units row
        rows.append({k: _number(v) for k, v in row.items()})
    return rows


def _number(cell: str):
    text = cell.strip().replace(",", "")
    try:
        return float(text)
    except ValueError:
        return cell


def kernel_name(row: dict) -> str:
    return str(row.get("Kernel Name") or row.get("Function Name") or "?")


def _pick(row: dict, pattern: str):
    if pattern.startswith("max:"):
        values = [v for k, v in row.items() if re.search(pattern[4:], k) and isinstance(v, float)]
        return max(values) if values else None
    return next((v for k, v in row.items() if re.search(pattern, k) and isinstance(v, float)), None)


def kernel_figures(row: dict) -> dict:
    """One kernel's summary: its name, METRICS by title (µs from ns) and its TOP_STALLS largest stall reasons."""
    out = {"kernel": kernel_name(row)}
    for title, pattern in METRICS:
        value = _pick(row, pattern)
        out[title] = value / 1e3 if (title == "µs" and value is not None) else value
    stalls = {}
    for column, value in row.items():
        m = STALL.match(column)
        if m and isinstance(value, float) and m.group(1) not in ("selected", "not_issued"):  # issued, not stalled
            stalls[m.group(1)] = max(stalls.get(m.group(1), 0.0), value)
    out["stalls"] = sorted(stalls.items(), key=lambda kv: -kv[1])[:TOP_STALLS]
    return out


def unit_rows(rows: list, units: list) -> list:
    """The report's kernels grouped by unit: each MARKER row starts the next of `units` (the driver's list of the
    units it profiled, in order). [{**unit, "kernels": [kernel_figures...]}]; rows before the first marker, and
    markers past the list, are dropped (none are expected)."""
    out, current = [], None
    for row in rows:
        if MARKER in kernel_name(row):
            current = dict(units[len(out)], kernels=[]) if len(out) < len(units) else None
            if current is not None:
                out.append(current)
            continue
        if current is not None:
            current["kernels"].append(kernel_figures(row))
    return out


def _cell(value, digits=1) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _short(name: str, width: int = 60) -> str:
    name = re.sub(r"\(.*$", "", name)  # no parameter list
    return name if len(name) <= width else name[: width - 1] + "…"


def markdown(op: str, meta: dict, units: list, failed: list) -> str:
    titles = [t for t, _ in METRICS]
    lines = [f"# profile: {op} on {meta.get('device', '?')}", "",
             f"{meta.get('date', '')} · ncu {meta.get('ncu', '?')} · commit {meta.get('commit', '?')} · sections "
             f"{', '.join(SECTIONS)}; caches flushed between passes, clocks not locked.", "",
             "Per kernel of each call: time under the profiler, throughputs as % of the chip's peak, the tensor "
             "pipes' busiest % of active cycles, achieved occupancy, registers a thread, L2 hit rate, and the "
             f"{TOP_STALLS} costliest warp stall reasons (cycles a warp stalls per issued instruction).", ""]
    for case in dict.fromkeys(u["case"] for u in units):
        lines += [f"## {case}", "", "| provider | mode | kernel | " + " | ".join(titles) + " | stalls |",
                  "|" + "---|" * (len(titles) + 4)]
        for unit in (u for u in units if u["case"] == case):
            total = sum(k["µs"] or 0.0 for k in unit["kernels"])
            lines.append(f"| **{unit['provider']}** | {unit['mode']} | *all {len(unit['kernels'])}* | "
                         f"{_cell(total)} |" + " |" * len(titles))
            for k in unit["kernels"]:
                stalls = ", ".join(f"{name} {value:.1f}" for name, value in k["stalls"])
                lines.append(f"| | | {_short(k['kernel'])} | " + " | ".join(_cell(k[t]) for t in titles)
                             + f" | {stalls} |")
        lines.append("")
    if failed:
        lines += ["## Not profiled", ""] + [f"- {f['case']}: {f['provider']} {f['mode']}: {f['why']}" for f in failed]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- the driver


def _family(op: str):
    from benchmarks.__main__ import families

    found = families()
    if op not in found:
        raise SystemExit(f"unknown op family {op!r}; one of {', '.join(sorted(found))}")
    return found[op]


def _cases(family, indices):
    quick = family.cases(True)
    return [quick[i] for i in indices if 0 <= i < len(quick)]


def left_out(provider, case) -> str:
    """Why `provider` is not profiled on `case` ("" when it is): SKIP_PROVIDERS, the family's own skip rule (the
    benchmark leaves it out too), or not available here."""
    if provider.name in SKIP_PROVIDERS:
        return "left out of profiles (many kernels, or a compile per shape)"
    why = provider.skip(case)
    if why:
        return why
    ok, reason = provider.available()
    return "" if ok else (reason or "not available")


def drive(family, indices, units_path: Path, device="cuda") -> int:
    """Under ncu: warm every (case, provider, mode) up, then profile each once between cudaProfilerStart/Stop,
    after a marker kernel. Writes the profiled units, in order, and the ones that could not run, to units_path."""
    import torch

    from benchmarks import harness

    device = torch.device(device)
    modes = [m for m in PROFILED_MODES if m in family.modes]
    profiled, failed = [], []
    for case in _cases(family, indices):
        gen = torch.Generator(device=device)
        gen.manual_seed(0)
        inputs, grad_outputs = family.make_inputs(case, device, gen)
        runs = []  # (provider, mode, prepare, timed) of the calls that warmed up
        for provider in family.providers:
            why = left_out(provider, case)
            if why:
                failed += [dict(case=case.label, provider=provider.name, mode=m, why=why) for m in modes]
                continue
            for mode in modes:
                try:
                    with provider.context():
                        prepare, timed = harness._mode_callables(mode, provider.build(case),
                                                                 [(inputs, grad_outputs)])
                        timed(prepare() if prepare else None)  # warm-up
                        torch.cuda.synchronize()
                    runs.append((provider, mode, prepare, timed))
                except Exception as e:  # noqa: BLE001 - a provider that cannot run this is a row, not the end
                    failed.append(dict(case=case.label, provider=provider.name, mode=mode, why=harness._reason(e)))
                    torch.cuda.synchronize()
        for provider, mode, prepare, timed in runs:
            try:
                with provider.context():
                    state = prepare() if prepare else None
                    torch.cuda.synchronize()
                    torch.cuda.cudart().cudaProfilerStart()
                    try:
                        torch.cuda._sleep(MARKER_CYCLES)
                        timed(state)
                        torch.cuda.synchronize()
                    finally:
                        torch.cuda.cudart().cudaProfilerStop()
                profiled.append(dict(case=case.label, provider=provider.name, mode=mode))
            except Exception as e:  # noqa: BLE001
                failed.append(dict(case=case.label, provider=provider.name, mode=mode, why=harness._reason(e)))
        del inputs, grad_outputs
        torch.cuda.empty_cache()
    units_path.write_text(json.dumps({"profiled": profiled, "failed": failed}, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------- the ncu run


def find_ncu():
    """ncu on PATH, else the newest under the usual install folders, else None."""
    found = shutil.which("ncu")
    if found:
        return found
    candidates = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu") + glob.glob("/usr/local/cuda*/bin/ncu")
                        + glob.glob("/usr/local/cuda*/nsight-compute*/ncu"))
    return candidates[-1] if candidates else None


def ncu_commands(ncu: str, report: Path, op: str, indices, units: Path, extra_metrics=EXTRA_METRICS) -> tuple:
    """(the profiling command, the export command)."""
    profile = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--target-processes", "all",
               "--force-overwrite", "--export", str(report)]
    for section in SECTIONS:
        profile += ["--section", section]
    if extra_metrics:
        profile += ["--metrics", ",".join(extra_metrics)]
    profile += [sys.executable, "-m", "benchmarks.profile", "--run", "--op", op, "--cases",
                *map(str, indices), "--units", str(units)]
    export = [ncu, "--import", f"{report}.ncu-rep", "--page", "raw", "--csv", "--print-units", "base"]
    return profile, export


def _ncu_version(ncu: str) -> str:
    try:
        out = subprocess.run([ncu, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    m = re.search(r"Version\s+(\S+)", out)
    return m.group(1) if m else "?"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def refused_metric(log: str) -> bool:
    """Whether ncu stopped because it does not know a metric it was asked for."""
    return bool(re.search(r"failed to find metric|invalid metric|unknown metric", log, re.IGNORECASE))


def _run(cmd, budget_s: float) -> tuple:
    """(output, exit status) of cmd within budget_s seconds (124 when cut)."""
    try:
        # Inductor compiles in-process (no worker processes for ncu to follow into: torch.compile providers).
        env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_COMPILE_THREADS="1")
        proc = subprocess.run(cmd, cwd=REPO, timeout=max(budget_s, 1.0), capture_output=True, text=True, env=env)
        return proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        parts = [p.decode(errors="replace") if isinstance(p, bytes) else p for p in (e.stdout, e.stderr) if p]
        return "".join(parts) + f"\nncu run cut at {budget_s:.0f} s", 124


def profile(op: str, indices, out: Path, budget_s: float = BUDGET_S) -> int:
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.profile: no CUDA GPU here; nothing to profile", file=sys.stderr)
        return 2
    ncu = find_ncu()
    if ncu is None:
        print("benchmarks.profile: no ncu (Nsight Compute) on PATH or under /opt/nvidia, /usr/local/cuda*",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        report, units_path = Path(tmp, "report"), Path(tmp, "units.json")
        extra = EXTRA_METRICS
        while True:
            cmd, export = ncu_commands(ncu, report, op, indices, units_path, extra)
            print("$", " ".join(cmd), flush=True)
            log, rc = _run(cmd, budget_s - (time.time() - start))
            if extra and not Path(f"{report}.ncu-rep").exists() and refused_metric(log):
                print(f"benchmarks.profile: this ncu refused {', '.join(extra)}; again without them", flush=True)
                extra = ()
                continue
            break
        (out / f"profile_{op}.log").write_text(log)
        if not Path(f"{report}.ncu-rep").exists() or not units_path.exists():
            print(log[-3000:], file=sys.stderr)
            print(f"benchmarks.profile: ncu wrote no report (exit {rc}); see profile_{op}.log", file=sys.stderr)
            return 1
        exported = subprocess.run(export, capture_output=True, text=True, timeout=300)
        text = exported.stdout
        units = json.loads(units_path.read_text())
    (out / f"profile_{op}.csv").write_text(text)
    grouped = unit_rows(parse_csv(text), units["profiled"])
    meta = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "ncu": _ncu_version(ncu), "commit": _commit(), "seconds": round(time.time() - start, 1),
            "ncu_exit": rc, "extra_metrics": list(extra)}
    (out / f"profile_{op}.json").write_text(json.dumps({"meta": meta, "units": grouped,
                                                        "failed": units["failed"]}, indent=1))
    md = markdown(op, meta, grouped, units["failed"])
    (out / f"profile_{op}.md").write_text(md)
    print(md)
    print(f"benchmarks.profile: {len(grouped)} calls profiled in {meta['seconds']} s (ncu exit {rc}); "
          f"{out}/profile_{op}.{{md,json,csv,log}}")
    return 0 if rc == 0 and len(grouped) == len(units["profiled"]) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", required=True, help="the op family (benchmarks/<family>.py)")
    parser.add_argument("--cases", type=int, nargs="*", default=None,
                        help="indices into the family's quick cases (default: CASES)")
    parser.add_argument("--out", type=Path, default=Path("profile-results"))
    parser.add_argument("--budget-s", type=float, default=BUDGET_S)
    parser.add_argument("--run", action="store_true", help="be ncu's target (the driver)")
    parser.add_argument("--units", type=Path, help="with --run: where to write the profiled units")
    args = parser.parse_args(argv)
    indices = args.cases if args.cases is not None else CASES.get(args.op, (0,))
    if args.run:
        return drive(_family(args.op), indices, args.units)
    return profile(args.op, indices, args.out, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
