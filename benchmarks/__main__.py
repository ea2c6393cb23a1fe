"""`python -m benchmarks [--op NAME] [--quick] [--out DIR]`: time every op family on the GPU.

Each module of this package that defines FAMILY (a harness.Family), or FAMILIES (several), adds them; --op picks
one. Results go to benchmarks/results/<device>/ (or --out DIR): <family>.json, .md and .png, and dispatch.json, the
backend the library's `auto` dispatch should pick per op, measured in this run. Without a GPU nothing is timed: the
newest committed results are printed instead, and the exit status is 0.

The GPU work runs in a worker process (harness.IsolatedRun): a provider that raises, dies or breaks the CUDA context
costs its own cells, which say error with the reason, and the run goes on in a fresh worker.

`python -m benchmarks --ratios DIR [--op NAME]` times nothing: it prints, from the results in DIR, each fastlm
backend's time ratio against each peer, per case and mode.
"""

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

import benchmarks
from benchmarks import harness

# Modules of the package that are not benchmark families. overhead must not even be imported here: it sets
# TRITON_INTERPRET=1 for the rest of the process, and every fastlm Triton kernel defined after that would run in
# Triton's interpreter. test_* modules are pytest files (test_families.py times these families under pytest).
SUPPORT_MODULES = {"harness", "static", "overhead", "profile"}


def families() -> dict:
    found = {}
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda m: m.name):
        if info.name.startswith(("_", "test_")) or info.name in SUPPORT_MODULES:
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


def show_ratios(folder: Path, selected) -> int:
    """The ratio tables of the selected families' results in `folder`; 1 when there are none."""
    found = 0
    for family in selected:
        path = folder / f"{family.name}.json"
        if not path.exists():
            continue
        saved = json.loads(path.read_text())
        meta, rows = saved.get("meta", {}), saved.get("rows", [])
        found += 1
        state = (", quick subset" if meta.get("quick") else "") + (
            ", incomplete" if meta.get("complete") is False else "")
        print(f"\n{family.name} on {meta.get('device', '?')} ({meta.get('date', 'undated')}{state}): "
              "peer time / fastlm time, > 1: fastlm faster\n")
        print("\n".join(harness.ratio_table(family, rows)))
        print("\n".join("  " + line for line in harness.summarize(family, rows)))
    if not found:
        print(f"no results of {', '.join(f.name for f in selected)} in {folder}")
        return 1
    return 0


def main(argv=None) -> int:
    known = families()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=sorted(known), help="benchmark one family only (default: all)")
    parser.add_argument("--quick", action="store_true", help="a few cases per family, to check the suite runs")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device>/)")
    parser.add_argument("--ratios", type=Path, metavar="DIR",
                        help="time nothing: print the fastlm-vs-peer ratio table of the results in DIR")
    args = parser.parse_args(argv)
    selected = [known[args.op]] if args.op else list(known.values())
    if args.ratios is not None:
        return show_ratios(args.ratios, selected)

    # This process never touches CUDA (a broken context could not be undone here): the worker that IsolatedRun
    # forks finds the GPU, or says there is none.
    run = harness.IsolatedRun(selected, args.quick, args.out)
    try:
        meta = run.start()
        if meta is None:
            print("fastlm benchmarks: no CUDA GPU here, so nothing is timed; the newest committed results follow.")
            show_committed({f.name for f in selected})
            return 0

        import tqdm

        tqdm.tqdm.monitor_interval = 0  # no monitor thread in the process that forks the workers
        print(f"fastlm benchmarks on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}); ceilings "
              + ", ".join(f"{harness.UNITS[k][1]} {v:.0f} {harness.UNITS[k][0]}" for k, v in meta["ceilings"].items())
              + f"; writing to {run.out_dir}", flush=True)
        total = sum(len(f.cases(args.quick)) * len(f.providers) for f in selected)
        start = time.perf_counter()
        with tqdm.tqdm(total=total, unit="run", file=sys.stderr, mininterval=1 if sys.stderr.isatty() else 15) as bar:
            results = run.finish(bar)
    finally:
        run.close()
    choices, report = {}, []
    for family, rows, fam_meta, choice in results:
        choices.update(choice)
        report.append(f"\n{family.name}: {len(rows)} rows, written to {run.out_dir}/{family.name}.{{json,md,png}}")
        report += ["  " + line for line in harness.summarize(family, rows)]
        for op, modes in fam_meta["dispatch"].items():
            report.append(f"  faster fastlm backend, {op}: "
                          + ", ".join(f"{m} {d.get('winner', d.get('reason'))}" for m, d in modes.items()))
    print("\n".join(report))
    print(f"\n{len(results)} families in {time.perf_counter() - start:.0f} s; {run.workers} worker process"
          + ("es" if run.workers != 1 else "") + " (a fresh one after each failure that could spoil the next)")
    if choices:
        table = harness.merge_dispatch(run.out_dir / "dispatch.json", choices)
        print(f"dispatch.json: {table}")
        orders = {op: entry["order"] for op, entry in sorted(table.items()) if "order" in entry}
        print(f"for fastlm/_dispatch_table.py: MEASURED[{meta['device']!r}] = {orders!r}")
    else:
        print("dispatch.json not written: no op had two implementations (fastlm backends, or torch's own kernel) "
              "measured in this run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
