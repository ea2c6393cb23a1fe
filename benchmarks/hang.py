"""Sweeps that survive a kernel which never finishes.

A sweep times candidate configurations of kernels that have never run on a GPU (warp-specialized and TMA paths,
the split-KV decode). One that hangs blocks its process in C inside a synchronize, where no Python exception can
reach it, and a sweep run in one process would then sit until the device call's limit ends it, losing every
candidate after it. So the sweeps' GPU loops run in a child process (`resumable`) under a `Watchdog`: each unit
(one candidate on one case) is armed with a limit; past it, a timer thread writes the unit's row, marked hung,
to the sweep's JSON lines and ends the process with HUNG_EXIT (the timer needs only the GIL, which a thread waiting
on the GPU releases). The parent then starts a new child, which reads the rows written so far, skips the units they
cover (the hung one included: it is never timed again nor chosen) and goes on, until the sweep ends or its budget
is spent. A clean sweep pays one child; each hang costs its limit and a child's start (imports and CUDA
initialization, seconds).

benchmarks.harness.IsolatedRun does the same for the benchmark families, with a process per provider failure.
"""

import json
import multiprocessing
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

HUNG_EXIT = 75  # a child's exit status when its watchdog ended it
UNIT_LIMIT_S = 90.0  # one unit: a candidate's compile on a cold cache (seconds) and its do_bench timings
GRACE_S = 30.0  # past the budget, a child still running is killed


class Watchdog:
    """`with watchdog.unit(row):` arms a timer for `seconds`; when it fires, `on_hang(row)` runs (writing the
    row, marked hung) and the process exits with HUNG_EXIT. None seconds: no limit (a sweep run in process)."""

    def __init__(self, seconds: Optional[float], on_hang: Callable[[dict], None]):
        self.seconds = seconds
        self.on_hang = on_hang

    @contextmanager
    def unit(self, row: dict):
        if self.seconds is None:
            yield
            return
        timer = threading.Timer(self.seconds, self._fire, args=(row,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _fire(self, row):
        try:
            self.on_hang(dict(row, ms=None, correct=None,
                              error=f"hung: no result after {self.seconds:g} s (the sweep went on in a new process)"))
        finally:
            os._exit(HUNG_EXIT)


def rows_after(path: Path, line: int) -> list:
    """The JSON rows of `path` from line number `line` on (the rows this sweep wrote), [] when it does not exist."""
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(text) for i, text in enumerate(f) if i >= line and text.strip()]


def line_count(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open() as f:
        return sum(1 for _ in f)


def resumable(target: Callable, args: tuple, jsonl: Path, budget_s: float, log=print) -> list:
    """Run `target(*args, budget_s=..., done=rows)` in a spawned child process until it ends other than by its
    watchdog, or the budget is spent; each new child gets the rows the sweep has written to `jsonl` so far
    (`done`) and what is left of the budget. Returns every row the sweep wrote."""
    first = line_count(jsonl)
    deadline = time.monotonic() + budget_s
    context = multiprocessing.get_context("spawn")
    children = 0
    while True:
        left = deadline - time.monotonic()
        if children and left < 1:
            log("time budget spent: stopping")
            break
        child = context.Process(target=target, args=args, kwargs=dict(budget_s=left, done=rows_after(jsonl, first)))
        child.start()
        # The child keeps to its budget between units and its watchdog within one; should neither work (a thread
        # that never gives the GIL back), it is ended at the budget and a grace period.
        child.join(timeout=max(left, 0.0) + GRACE_S)
        children += 1
        if child.exitcode is None:
            child.kill()
            child.join()
            log(f"the sweep's process ran {GRACE_S:.0f} s past its budget: ended")
            break
        if child.exitcode != HUNG_EXIT:
            if child.exitcode:
                log(f"the sweep's process exited with status {child.exitcode}")
            break
        log("a unit hung (its row says which): going on in a new process")
    return rows_after(jsonl, first)
