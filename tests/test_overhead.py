"""The host-overhead benchmark (`python -m benchmarks.overhead`) runs and reports every op; its numbers are read by
people, never asserted here (timing targets belong to the benchmarks, not to unit tests)."""

import subprocess
import sys

from benchmarks import overhead


def test_overhead_benchmark_reports_every_op_and_mode(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.overhead", "--benchmark-min-rounds=3", "--benchmark-max-time=0.001",
         "--benchmark-warmup=off"],
        capture_output=True, text=True, timeout=300, cwd=overhead.Path(overhead.__file__).parent.parent)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "µs" not in line]
    reported = {tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows}
    assert reported == {(op, mode) for op in overhead.CASES for mode in overhead.MODES}
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")]
        op, triton_us, cuda_us, auto, torch_us = cells[1], float(cells[3]), float(cells[4]), cells[5], float(cells[6])
        assert triton_us > 0 and cuda_us > 0 and torch_us > 0
        # auto's route to torch's own kernel, for the ops that have one (the H200's measured table takes them).
        if op in overhead.NATIVE_ROUTES:
            assert auto.endswith(f"({overhead.NATIVE_ROUTES[op]})") and float(auto.split()[0]) > 0, row
        else:
            assert auto == "–", row
