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
initialization, seconds). A unit that breaks the process's CUDA context (an illegal memory access: every later
unit would fail too) writes its row and ends the process the same way (`context_broken`).

benchmarks.harness.IsolatedRun does the same for the benchmark families, with a process per provider failure.
"""

import json
import multiprocessing
import os
import sys
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
    row, marked hung) and the process exits with `exit_code` (HUNG_EXIT). None seconds: no limit (a sweep run in
    process). A unit that ends as its timer fires is either finished (no hung row) or hung (no result row): the
    two decide under one lock."""

    def __init__(self, seconds: Optional[float], on_hang: Callable[[dict], None], exit_code: int = HUNG_EXIT):
        self.seconds = seconds
        self.on_hang = on_hang
        self.exit_code = exit_code
        self._lock = threading.Lock()

    @contextmanager
    def unit(self, row: dict):
        if self.seconds is None:
            yield
            return
        state = {"over": False}
        timer = threading.Timer(self.seconds, self._fire, args=(row, state))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            with self._lock:  # after this, a timer that fires finds the unit over and does nothing
                state["over"] = True
            timer.cancel()

    def _fire(self, row, state):
        with self._lock:
            if state["over"]:
                return
            try:
                self.on_hang(dict(row, ms=None, correct=None, error=f"hung: no result after {self.seconds:g} s "
                                                                    "(the sweep went on in a new process)"))
            finally:
                end_process(self.exit_code)


def end_process(code: int = HUNG_EXIT):
    """os._exit(code) after flushing the log (os._exit skips the interpreter's flushing), from any thread."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream: nothing to keep
            pass
    os._exit(code)


def rows_after(path: Path, line: int) -> list:
    """The JSON rows of `path` from line number `line` on (the rows this sweep wrote), [] when it does not exist.
    A line that is not JSON (a row cut short by a killed process) is passed over."""
    if not path.exists():
        return []
    rows = []
    with path.open() as f:
        for i, text in enumerate(f):
            if i >= line and text.strip():
                try:
                    rows.append(json.loads(text))
                except ValueError:
                    pass
    return rows


def append_rows(path: Path):
    """`path` opened for appending rows, a line each: after a newline, should a killed process have left its last
    row without one."""
    cut = False
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
    sink = path.open("a")
    if cut:
        sink.write("\n")
    return sink


def context_broken() -> bool:
    """Whether this process's CUDA context is unusable (a sticky error: an illegal memory access, a device-side
    assert), after which every later unit of the process would fail: the sweep should go on in a new one."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return False
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return False
    except Exception:  # noqa: BLE001 - whatever CUDA raises, the context is gone
        return True


def end_if_context_broken():
    """After a unit that raised, its row written: when it broke the CUDA context, end the process as the watchdog
    does, so that `resumable` goes on in a new one."""
    if context_broken():
        end_process(HUNG_EXIT)


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
        log("a unit hung or broke the process's CUDA context (its row says which): going on in a new process")
    return rows_after(jsonl, first)
