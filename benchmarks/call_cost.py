"""`python -m benchmarks.call_cost`: what a small call of each public op costs end to end on a CUDA GPU.

`benchmarks.overhead` times fastlm's host path on a CPU with the launches stubbed and `benchmarks.launch_cost`
Triton's launch path over a stand-in driver. This times the sum for real: each op of benchmarks/host_cases.py on
tiny bf16 CUDA tensors, forward and forward + backward, as the wall time per call of CALLS calls issued back to
back (one synchronize before and after). At these sizes a kernel runs in a few µs, so the time is the host's,
unless the host outruns the GPU (then it is the kernels'): what issue 15's targets (15 µs a forward, 40 a forward +
backward) are about, on the GPU itself. Columns: fastlm's triton backend through Triton's own launch path
(`kernels/_launch.py` off) and through the direct path (on, the default), fastlm's cuda backend, torch's own call
for the same work. Configurations alternate over ROUNDS rounds; each cell is the lowest round (the least
disturbed). A call that raises prints its error in its cell.

    python -m benchmarks.call_cost                 # prints the table
    python -m benchmarks.call_cost --out DIR       # and writes DIR/call_cost.md and DIR/call_cost.json
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

CALLS = 100
ROUNDS = 4
MODES = ("fwd", "fwd+bwd")
WHO = ("triton, Triton's launch path", "triton, direct launch", "cuda", "torch")


@contextlib.contextmanager
def _config(who):
    """Within it, calls run as `who`: the backend, and the direct launch path on or off."""
    import fastlm
    from fastlm.kernels import _launch

    saved = _launch.ENABLED
    _launch.ENABLED = who != WHO[0] and saved
    try:
        with fastlm.use_backend("cuda" if who == "cuda" else "triton"):
            yield
    finally:
        _launch.ENABLED = saved


def _time(step, calls, sync):
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def measure(ops=None, calls=CALLS, rounds=ROUNDS, device="cuda", done=None):
    """{(op, mode): {who: µs per call, or the error's text}}; `done(results so far)` after each op, so that a run
    cut short keeps what it finished. (device "cpu" runs the same flow on CPU tensors, for the tests; there the
    Triton kernels are interpreted, so both launch paths are Triton's.)"""
    import torch

    from benchmarks.host_cases import CASES, DIFFERENTIABLE, attention_case, call

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    builders = dict(CASES, attention=lambda **kw: attention_case(head_dim=32, **kw))  # the cuda kernels' least
    results = {}
    for op, build in builders.items():
        if ops and op not in ops:
            continue
        args, ours, theirs = build(device=device, dtype=torch.bfloat16)
        for mode in MODES:
            cells, steps = {}, {}
            for who in WHO:
                step = call(theirs if who == "torch" else ours, args, mode, DIFFERENTIABLE.get(op))
                try:
                    with _config(who):
                        for _ in range(3):  # compiles, fills caches
                            step()
                        sync()
                    steps[who] = step
                except Exception as e:  # noqa: BLE001 - the cell shows it; the other cells still run
                    cells[who] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
            best = {who: float("inf") for who in steps}
            for _ in range(rounds):
                for who, step in steps.items():
                    with _config(who):
                        best[who] = min(best[who], _time(step, calls, sync))
            cells.update(best)
            results[(op, mode)] = cells
        if done:
            done(results)
    return results


def table(results) -> str:
    lines = ["| op | mode | " + " | ".join(f"fastlm {w} (µs)" if w != "torch" else "torch (µs)" for w in WHO) + " |",
             "|---|---|" + "---|" * len(WHO)]
    for (op, mode), cells in results.items():
        shown = [f"{c:.1f}" if isinstance(c, float) else str(c) for c in (cells.get(w, "") for w in WHO)]
        lines.append(f"| {op} | {mode} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", nargs="*", help="ops of benchmarks/host_cases.py (default: all)")
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", type=Path, help="folder for call_cost.md and call_cost.json")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.call_cost needs a CUDA GPU (benchmarks.overhead and benchmarks.launch_cost run on a CPU)",
              file=sys.stderr)
        return 2
    import fastlm

    header = (f"Small calls end to end on {torch.cuda.get_device_name()}: wall µs per call, {args.calls} calls back "
              f"to back, the lowest of {args.rounds} rounds (fastlm {fastlm.__version__}, torch {torch.__version__})")

    def write(results):
        if not args.out:
            return
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "call_cost.md").write_text(f"{header}\n\n{table(results)}\n")
        rows = [dict(op=op, mode=mode, **cells) for (op, mode), cells in results.items()]
        (args.out / "call_cost.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                                 calls=args.calls, rounds=args.rounds, rows=rows),
                                                            indent=1))

    results = measure(args.ops, args.calls, args.rounds, done=write)
    print(f"{header}\n\n{table(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
