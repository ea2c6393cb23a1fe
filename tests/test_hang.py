"""benchmarks/hang.py: a sweep unit that never finishes ends its process, writing its row marked hung, and the sweep
goes on in a new process that skips what the earlier ones wrote. Toy sweeps (no GPU, no torch in the children)."""

import json
import time

from benchmarks import hang

UNITS = ("a", "b", "c", "d")


def _toy_sweep(jsonl, slow, limit_s, budget_s, done):
    """A sweep of UNITS: each writes a row; unit `slow` never finishes (a hung kernel)."""
    finished = {r["unit"] for r in done}
    with open(jsonl, "a") as sink:

        def emit(row):
            sink.write(json.dumps(row) + "\n")
            sink.flush()

        watchdog = hang.Watchdog(limit_s, emit)
        for unit in UNITS:
            if unit in finished:
                continue
            with watchdog.unit({"unit": unit}):
                if unit == slow:
                    time.sleep(600)
            emit({"unit": unit, "ms": 1.0})


def test_a_hung_unit_costs_its_limit_and_the_sweep_goes_on(tmp_path):
    jsonl = tmp_path / "sweep.jsonl"
    jsonl.write_text(json.dumps({"unit": "an earlier sweep's row"}) + "\n")  # not this sweep's: ignored
    logged = []
    start = time.monotonic()
    rows = hang.resumable(_toy_sweep, (str(jsonl), "b", 1.0), jsonl, 120.0, log=logged.append)
    assert time.monotonic() - start < 60
    assert [r["unit"] for r in rows] == list(UNITS)
    hung = rows[1]
    assert hung["ms"] is None and hung["correct"] is None and hung["error"].startswith("hung: no result after 1 s")
    assert all(r["ms"] == 1.0 for r in rows if r["unit"] != "b")
    assert logged == ["a unit hung or broke the process's CUDA context (its row says which): going on in a new "
                      "process"]


def test_a_sweep_without_a_hang_runs_in_one_process(tmp_path):
    jsonl = tmp_path / "sweep.jsonl"
    logged = []
    rows = hang.resumable(_toy_sweep, (str(jsonl), None, 30.0), jsonl, 120.0, log=logged.append)
    assert [(r["unit"], r["ms"]) for r in rows] == [(u, 1.0) for u in UNITS] and logged == []


def test_the_budget_bounds_the_restarts(tmp_path):
    """Every unit hangs: the sweep stops when its budget is spent rather than restarting for ever."""
    jsonl = tmp_path / "sweep.jsonl"
    logged = []
    start = time.monotonic()
    hang.resumable(_toy_every_unit_hangs, (str(jsonl),), jsonl, 2.5, log=logged.append)
    assert time.monotonic() - start < 30
    assert logged[-1] == "time budget spent: stopping"


def _toy_every_unit_hangs(jsonl, budget_s, done):
    _toy_sweep(jsonl, UNITS[len(done)], 1.0, budget_s, done)


def _toy_sweep_that_ignores_its_watchdog(jsonl, budget_s, done):
    time.sleep(600)


def test_a_child_past_its_budget_is_ended(tmp_path, monkeypatch):
    monkeypatch.setattr(hang, "GRACE_S", 1.0)
    logged = []
    start = time.monotonic()
    hang.resumable(_toy_sweep_that_ignores_its_watchdog, (str(tmp_path / "sweep.jsonl"),), tmp_path / "sweep.jsonl",
                   1.0, log=logged.append)
    assert time.monotonic() - start < 30
    assert logged == ["the sweep's process ran 1 s past its budget: ended"]


def test_a_timer_that_fires_as_its_unit_ends_does_nothing():
    """The unit is over (its result row written or about to be): the timer neither writes a hung row nor exits."""
    written = []
    watchdog = hang.Watchdog(1.0, written.append)
    watchdog._fire({"unit": "a"}, {"over": True})
    assert written == []


def test_rows_after_passes_over_a_cut_row_and_appending_starts_a_new_line(tmp_path):
    path = tmp_path / "sweep.jsonl"
    path.write_text('{"unit": "old"}\n{"unit": "a"}\n{"unit": "b", "ms"')  # a process killed mid-row
    with hang.append_rows(path) as sink:
        sink.write(json.dumps({"unit": "c"}) + "\n")
    assert hang.rows_after(path, 1) == [{"unit": "a"}, {"unit": "c"}]
    assert hang.line_count(path) == 4
