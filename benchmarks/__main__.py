"""`python -m benchmarks [--op NAME] [--quick] [--out DIR]`: time every op family on the GPU.

Each module of this package that defines FAMILY (a harness.Family), or FAMILIES (several), adds them; --op picks
one. Results go to benchmarks/results/<device>/ (or --out DIR): <family>.json, .md and .png, and dispatch.json, the backend the
library's `auto` dispatch should pick per op, measured in this run. Without a GPU nothing is timed: the newest
committed results are printed instead, and the exit status is 0.
"""

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

import torch

import benchmarks
from benchmarks import harness

SUPPORT_MODULES = {"harness", "static"}  # modules of the package that are not benchmark families


def families() -> dict:
    found = {}
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in SUPPORT_MODULES:
            continue
        module = importlib.import_module(f"benchmarks.{info.name}")
        # A module declares one family (FAMILY) or several (FAMILIES).
        for family in getattr(module, "FAMILIES", None) or (getattr(module, "FAMILY", None),):
            if isinstance(family, harness.Family):
                found[family.name] = family
    return found


def show_committed(names) -> None:
    found = harness.committed_results(harness.RESULTS_ROOT, names)
    rel = harness.RESULTS_ROOT.relative_to(harness.REPO)
    if not found:
        print(f"No benchmark results have been committed yet under {rel}/.")
        return
    for name, md, date, device in found:
        print(f"\n===== {md.relative_to(harness.REPO)} ({device}, {date or 'undated'}) =====\n")
        print(md.read_text())


def main(argv=None) -> int:
    known = families()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=sorted(known), help="benchmark one family only (default: all)")
    parser.add_argument("--quick", action="store_true", help="a few cases per family, to check the suite runs")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device>/)")
    args = parser.parse_args(argv)
    selected = [known[args.op]] if args.op else list(known.values())

    if not torch.cuda.is_available():
        print("fastlm benchmarks: no CUDA GPU here, so nothing is timed; the newest committed results follow.")
        show_committed({f.name for f in selected})
        return 0

    from tqdm import tqdm

    device = torch.device("cuda", torch.cuda.current_device())
    meta = harness.run_metadata(device, args.quick)
    out_dir = args.out or harness.RESULTS_ROOT / meta["device_slug"]
    meta["ceilings"] = harness.measure_ceilings(selected, device)
    print(f"fastlm benchmarks on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}); ceilings "
          + ", ".join(f"{harness.UNITS[k][1]} {v:.0f} {harness.UNITS[k][0]}" for k, v in meta["ceilings"].items())
          + f"; writing to {out_dir}", flush=True)
    total = sum(len(f.cases(args.quick)) * len(f.providers) for f in selected)
    choices, report = {}, []
    with tqdm(total=total, unit="run", file=sys.stderr, mininterval=1 if sys.stderr.isatty() else 15) as bar:
        for family in selected:
            start = time.perf_counter()
            rows, fam_meta, choice = harness.run_family(family, args.quick, out_dir, meta, device, bar)
            choices.update(choice)
            report.append(f"\n{family.name}: {len(rows)} rows in {time.perf_counter() - start:.0f} s, written to "
                          f"{out_dir}/{family.name}.{{json,md,png}}")
            report += ["  " + line for line in harness.summarize(family, rows)]
            for op, modes in fam_meta["dispatch"].items():
                report.append(f"  faster fastlm backend, {op}: "
                              + ", ".join(f"{m} {d.get('winner', d.get('reason'))}" for m, d in modes.items()))
    print("\n".join(report))
    if choices:
        table = harness.merge_dispatch(out_dir / "dispatch.json", choices)
        print(f"dispatch.json: {table}")
    else:
        print("dispatch.json not written: no op had both fastlm backends measured in this run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
