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
        triton_us, cuda_us, torch_us = (float(cell) for cell in row.split("|")[3:6])
        assert triton_us > 0 and cuda_us > 0 and torch_us > 0
