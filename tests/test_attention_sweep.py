"""The attention block-shape sweep (benchmarks/attention_sweep.py): its CPU-side pieces — the committed candidates,
the table patching, the choice of the best shape and the report. The timing itself needs a GPU."""

import json

import pytest

from benchmarks import attention_sweep as sweep
from fastlm.kernels import attention as A


def test_the_committed_candidates_are_grid_entries_that_fit():
    assert sweep.CANDIDATES_FILE.exists(), "run `python -m benchmarks.attention_sweep --static` and commit the file"
    found = json.loads(sweep.CANDIDATES_FILE.read_text())
    assert set(found) == set(sweep.TABLES)
    for kernel, by_dim in found.items():
        assert set(by_dim) == {str(d) for d in sweep.HEAD_DIMS}
        for dim, entries in by_dim.items():
            # A warp-specialized path may have no shape at a head dim (dkdv_ws spills at 128): then no table entry.
            assert entries or (kernel.endswith("_ws") and int(dim) not in sweep.table(A, kernel)), \
                f"no {kernel} candidate compiles without spills at head dim {dim}"
            for e in entries:
                assert tuple(e["config"]) in sweep.GRID[kernel]
                assert 0 < e["regs"] <= 255 and 0 <= e["shared"] <= sweep.MAX_SHARED_BYTES


def test_table_entry_sets_and_restores_the_launchers_table():
    before = A.DKDV_CONFIGS[False][128]
    with sweep.table_entry(A, "dkdv", 128, (64, 128, 8, 2)):
        assert A.DKDV_CONFIGS[False][128] == (64, 128, 8, 2)
    assert A.DKDV_CONFIGS[False][128] == before
    with pytest.raises(RuntimeError):
        with sweep.table_entry(A, "dkdv", 128, (64, 128, 8, 2)):
            raise RuntimeError("a failed launch")
    assert A.DKDV_CONFIGS[False][128] == before


def test_table_entry_forces_the_path_of_the_kernel_swept():
    before_tma, before = A.TMA, dict(A.DKDV_TMA_CONFIGS)
    with sweep.table_entry(A, "dkdv_tma", 256, (64, 32, 8, 1)):  # a head dim the table lacks
        assert A.DKDV_TMA_CONFIGS[256] == (64, 32, 8, 1)
        # the others as they were
        assert A.TMA == {"fwd": before_tma, "dkdv": True, "dq": before_tma, "fwd_ws": before_tma,
                         "dkdv_ws": False}
    assert A.DKDV_TMA_CONFIGS == before and A.TMA is before_tma
    # Each entry's own path, and the forward's warp-specialized variant only for fwd_ws (which needs fwd's).
    for kernel, forced in (("fwd", {"fwd": False, "fwd_ws": False}), ("fwd_tma", {"fwd": True, "fwd_ws": False}),
                           ("fwd_ws", {"fwd": True, "fwd_ws": True}), ("dkdv", {"dkdv": False, "dkdv_ws": False}),
                           ("dkdv_tma", {"dkdv": True, "dkdv_ws": False}), ("dkdv_ws", {"dkdv": True, "dkdv_ws": True}),
                           ("dkdv_atomic", {"dkdv": False, "dkdv_ws": False}),
                           ("dkdv_atomic_tma", {"dkdv": True, "dkdv_ws": False}),
                           ("dq", {"dq": False}), ("dq_tma", {"dq": True})):
        with sweep.table_entry(A, kernel, 128, (128, 64, 4, 2)):
            assert {k: A.TMA[k] for k in forced} == forced, kernel
            assert sweep.table(A, kernel)[128] == (128, 64, 4, 2)
            # The atomic dQ on for its entries only, off for every other backward entry (whose dQ kernel must run).
            assert A.DQ_ATOMIC == (None if kernel.startswith("fwd") else "atomic" in kernel), kernel
    assert A.TMA is before_tma and A.DQ_ATOMIC is None


def _row(case, kernel, config, ms, correct=True):
    return {"kind": "candidate", "case": case, "kernel": kernel, "head_dim": 128, "config": list(config), "ms": ms,
            "tflops": 1.0, "correct": correct}


def test_the_best_shape_is_the_fastest_correct_one_over_every_case():
    a, b, c = (64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 3)
    results = [
        _row("x", "fwd", a, 2.0), _row("y", "fwd", a, 2.0),
        _row("x", "fwd", b, 1.0), _row("y", "fwd", b, 3.0),  # geometric mean 1.73: best
        _row("x", "fwd", c, 0.5, correct=False), _row("y", "fwd", c, 0.5, correct=False),  # wrong: never chosen
        {"kind": "candidate", "case": "x", "kernel": "dq", "head_dim": 128, "config": list(a), "ms": None,
         "correct": None, "error": "OutOfResources"},
    ]
    best = sweep.best_configs(results)
    assert best["fwd"][128][0] == list(b)
    assert abs(best["fwd"][128][1] - 3 ** 0.5) < 1e-9
    assert "dq" not in best


def test_a_shape_timed_on_fewer_cases_is_not_compared_unfairly():
    a, b = (64, 64, 4, 2), (128, 64, 8, 3)
    results = [_row("x", "fwd", a, 2.0), _row("y", "fwd", a, 2.0), _row("x", "fwd", b, 1.0)]  # b missed case y
    assert sweep.best_configs(results)["fwd"][128][0] == list(a)


def test_the_report_names_the_tables_to_paste_and_the_wrong_shapes():
    case = sweep.CASES[0]
    current = {k: {d: list(sweep.table(A, k).get(d, ())) for d in sweep.HEAD_DIMS} for k in sweep.TABLES}
    cur = tuple(current["fwd"][128])
    results = [_row(case[0], "fwd", cur, 2.0), _row(case[0], "fwd", (128, 128, 8, 3), 1.0),
               _row(case[0], "dkdv", (16, 64, 8, 1), 3.0), _row(case[0], "dkdv_tma", (128, 64, 8, 1), 2.0),
               _row(case[0], "fwd", (64, 32, 4, 2), 0.1, correct=False),
               {"kind": "peer", "case": case[0], "provider": "sdpa-cudnn", "mode": "fwd", "ms": 1.0, "tflops": 550.0}]
    text = sweep.report(results, current)
    assert "FWD_CONFIGS[False][128] = (128, 128, 8, 3)" in text
    assert "DKDV_TMA_CONFIGS[128] = (128, 64, 8, 1)" in text
    assert "dK/dV at head dim 128: the TMA path is faster (2.000 ms against 3.000)" in text
    assert "550 TFLOP/s" in text
    assert "(64, 32, 4, 2)" in text.split("Wrong results")[1]
    rate = sweep.flops(case, "fwd") / 1.0 / 1e9
    assert f"| {rate:.0f} |" in text


def test_the_report_weighs_the_warp_specialized_forward_against_the_faster_forward_path():
    """Per head dim: keep FWD_WS_CONFIGS[d] where the warp-specialized path beats both other forward paths (it
    needs FWD_TMA_CONFIGS[d] too), drop it where it loses; FWD_WS_DEFAULT True when any head dim keeps it."""
    case = sweep.CASES[0]
    current = {k: {d: list(sweep.table(A, k).get(d, ())) for d in sweep.HEAD_DIMS} for k in sweep.TABLES}
    rows = [_row(case[0], "fwd", (128, 32, 8, 2), 1.5), _row(case[0], "fwd_tma", (128, 128, 8, 3), 1.2),
            _row(case[0], "fwd_ws", (128, 128, 4, 2), 1.0)]
    text = sweep.report(rows, current)
    assert "takes 1.000 ms against 1.200 for fwd_tma: keep FWD_WS_CONFIGS[128] (and FWD_TMA_CONFIGS[128]" in text
    assert "FWD_WS_DEFAULT = True (head dims [128])" in text
    rows[0]["ms"] = 0.9  # the pointer path wins
    text = sweep.report(rows, current)
    assert "against 0.900 for fwd: drop FWD_WS_CONFIGS[128]" in text and "FWD_WS_DEFAULT = False" in text


def test_the_report_weighs_the_atomic_dq_against_the_three_kernel_backward():
    """Per head dim, the faster atomic entry against the faster of dkdv and dkdv_tma (whole backward times each);
    DQ_ATOMIC_DEFAULT True when it wins anywhere."""
    case = sweep.CASES[0]
    current = {k: {d: list(sweep.table(A, k).get(d, ())) for d in sweep.HEAD_DIMS} for k in sweep.TABLES}
    rows = [_row(case[0], "dkdv", (16, 64, 8, 1), 3.0), _row(case[0], "dkdv_tma", (128, 64, 8, 1), 2.0),
            _row(case[0], "dkdv_atomic", (16, 64, 8, 1), 2.5), _row(case[0], "dkdv_atomic_tma", (64, 64, 8, 1), 1.5)]
    text = sweep.report(rows, current)
    assert "DKDV_ATOMIC_TMA_CONFIGS[128] = (64, 64, 8, 1)" in text
    assert "atomic dQ at head dim 128: dkdv_atomic_tma takes 1.500 ms against 2.000 for the three-kernel backward " \
           "(dkdv_tma): faster" in text
    assert "DQ_ATOMIC_DEFAULT = True (faster at head dims [128]" in text
    rows[3]["ms"] = 2.2
    text = sweep.report(rows, current)
    assert "dkdv_atomic_tma takes 2.200 ms against 2.000 for the three-kernel backward (dkdv_tma): slower" in text
    assert "the pointer variant is faster" not in text and "DQ_ATOMIC_DEFAULT = False" in text
    rows[2]["ms"] = 1.8  # the pointer variant wins over both its Hopper variant and the three-kernel backward
    rows.append(_row(case[0], "dq", (64, 64, 8, 2), 1.9))  # a dq entry's time is a whole backward too
    text = sweep.report(rows, current)
    assert "the pointer variant is faster (1.800 ms against 2.200): drop DKDV_ATOMIC_TMA_CONFIGS[128]" in text
    assert "dkdv_atomic takes 1.800 ms against 1.900 for the three-kernel backward (dq): faster" in text


def test_the_measurement_loop_runs_end_to_end_on_cpu(tmp_path, monkeypatch):
    """The GPU loop on CPU tensors (the triton backend in the interpreter, do_bench replaced by a fixed time):
    every candidate gets a row, a correct one, and the report and the JSON lines are written. float16: the
    interpreter's bfloat16 dot is broken."""
    import torch
    import triton.testing

    if not A._INTERPRETED:
        pytest.skip("runs the triton kernels through the interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: (fn(), 1.0)[1])
    case = ("tiny causal", 1, 20, 2, 1, 16, True)
    candidates = {"fwd": {"16": [{"config": [32, 32, 4, 1], "regs": 1, "shared": 0}]}}
    results = sweep.measure(tmp_path, 600.0, candidates, log=lambda *a: None, device="cpu", cases=(case,),
                            dtype=torch.float16)
    rows = [r for r in results if r.get("kind") == "candidate"]
    assert {(r["kernel"], tuple(r["config"])) for r in rows} >= {
        ("fwd", (32, 32, 4, 1)), ("fwd_tma", tuple(A.FWD_TMA_CONFIGS[16])), ("dkdv", tuple(A.DKDV_CONFIGS[False][16])),
        ("dkdv_tma", tuple(A.DKDV_TMA_CONFIGS[16])), ("dq", tuple(A.DQ_CONFIGS[False][16])),
        ("dq_tma", tuple(A.DQ_TMA_CONFIGS[16])), ("dkdv_atomic", tuple(A.DKDV_ATOMIC_CONFIGS[False][16])),
        ("dkdv_atomic_tma", tuple(A.DKDV_ATOMIC_TMA_CONFIGS[16]))}
    assert all(r["correct"] for r in rows), [r.get("why") or r.get("error") for r in rows]
    assert (tmp_path / "attention_sweep.md").exists()
    assert len((tmp_path / "attention_sweep.jsonl").read_text().splitlines()) == len(results)
    assert A.FWD_CONFIGS[False][16] == tuple(results[0]["current"]["fwd"][16])  # the tables restored


def test_the_decode_sweep_runs_and_restores_the_tables_on_cpu(tmp_path, monkeypatch):
    """The decode sweep's loop on CPU (small cases, the interpreter, a fixed timer): a row per grid point and
    case, each correct, the peer timed, and the decode settings put back. float16: the interpreter's bfloat16 dot
    is broken."""
    import torch
    import triton.testing

    if not A._INTERPRETED:
        pytest.skip("runs the triton kernels through the interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(sweep, "DECODE_CASES", (("b1 x 40", 1, 40),))
    monkeypatch.setattr(sweep, "DECODE_GRID", [((32, 4, 3), 2, 128)])
    before = (A.DECODE_CONFIGS[128][16], A.DECODE_PROGRAMS_PER_SM, A.DECODE_MIN_SPLIT_KEYS)
    rows = sweep.decode_sweep(tmp_path, 600.0, log=lambda *a: None, device="cpu", dtype=torch.float16)
    assert [r["kind"] for r in rows] == ["peer", "candidate"]
    assert rows[1]["correct"], rows[1]
    assert (A.DECODE_CONFIGS[128][16], A.DECODE_PROGRAMS_PER_SM, A.DECODE_MIN_SPLIT_KEYS) == before


TINY_CASE = ("tiny causal", 1, 20, 2, 1, 16, True)
TWO_FWD = {"fwd": {"16": [{"config": [32, 32, 4, 1], "regs": 1, "shared": 0},
                          {"config": [16, 16, 4, 1], "regs": 1, "shared": 0}]}}
HANGS, BREAKS = (32, 32, 4, 1), (16, 16, 4, 1)
FOUR_FWD = {"fwd": {"16": [{"config": list(c), "regs": 1, "shared": 0} for c in (HANGS, BREAKS, (64, 64, 4, 1))]}}


def _troubled_sweep(out_dir, budget_s, done):
    """A child of the sweep on CPU (benchmarks.hang.resumable's target): do_bench a fixed time; the forward at
    HANGS never finishes, as a hung kernel would not, and the one at BREAKS raises as a kernel that broke the CUDA
    context does (context_broken says so in this stand-in)."""
    import time

    import torch
    import triton.testing

    from benchmarks import hang

    triton.testing.do_bench = lambda fn: (fn(), 1.0)[1]
    hang.context_broken = lambda: sweep.table(A, "fwd")[16] == BREAKS  # (sdpa-cudnn's CPU failure breaks nothing)
    timer = sweep._time_pair

    def time_pair(*args, **kwargs):
        config = sweep.table(A, "fwd")[16]
        if config == HANGS:
            time.sleep(600)
        if config == BREAKS:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return timer(*args, **kwargs)

    sweep._time_pair = time_pair
    sweep.measure(out_dir, budget_s, FOUR_FWD, log=lambda *a: None, device="cpu", cases=(TINY_CASE,),
                  dtype=torch.float16, kernels=["fwd"], done=done, hang_s=10.0)


def test_a_hung_or_broken_candidate_is_marked_and_the_sweep_goes_on(tmp_path):
    """The measurement in child processes under the watchdog (as main runs it): the candidate that hangs and the
    one that breaks the CUDA context each get a row saying so and are never chosen; the candidates after them are
    timed by new processes, which neither re-time an earlier process's candidates nor its peers."""
    from benchmarks import hang

    if not A._INTERPRETED:
        pytest.skip("runs the triton kernels through the interpreter (TRITON_INTERPRET=1)")
    shipped = tuple(A.FWD_CONFIGS[False][16])
    assert shipped not in (HANGS, BREAKS), "the stand-in troubles must not hit the shipped shape"
    jsonl = tmp_path / "attention_sweep.jsonl"
    logged = []
    rows = hang.resumable(_troubled_sweep, (tmp_path,), jsonl, 300.0, log=logged.append)
    candidates = [(tuple(r["config"]), r.get("correct"), (r.get("error") or "")[:10]) for r in rows
                  if r.get("kind") == "candidate"]
    assert candidates == [(shipped, True, ""), (HANGS, None, "hung: no r"), (BREAKS, None, "RuntimeErr"),
                          ((64, 64, 4, 1), True, "")]
    assert logged == ["a unit hung or broke the process's CUDA context (its row says which): going on in a new "
                      "process"] * 2
    assert [r["kind"] for r in rows].count("meta") == 1
    assert len([r for r in rows if r.get("kind") == "peer" and r["provider"] == "sdpa-flash"]) == 2  # fwd, bwd
    assert tuple(sweep.best_configs(rows)["fwd"][16][0]) in {shipped, (64, 64, 4, 1)}
    text = sweep.report(rows, {k: {int(d): c for d, c in by.items()} for k, by in rows[0]["current"].items()})
    tables, troubles = text.split("Tables")[1].split("Errors, hangs and unchecked results")
    assert str(HANGS) not in tables and str(HANGS) in troubles and "illegal memory access" in troubles


def test_measure_takes_an_earlier_process_rows_as_measured(tmp_path, monkeypatch):
    """`done` rows are not timed again: their candidates keep their results (the best of them stays in the
    table for the next kernel), and the returned rows hold them."""
    import torch
    import triton.testing

    if not A._INTERPRETED:
        pytest.skip("runs the triton kernels through the interpreter (TRITON_INTERPRET=1)")
    from fastlm import _backend

    calls = []  # the fastlm kernels' timings: (the forward's table entry) each
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: (
        calls.append(sweep.table(A, "fwd")[16]) if _backend.get_backend() == "triton" else None, fn(), 1.0)[2])
    shipped = list(A.FWD_CONFIGS[False][16])
    done = [{"kind": "meta", "current": {}},
            {"kind": "candidate", "case": TINY_CASE[0], "kernel": "fwd", "head_dim": 16, "config": shipped,
             "ms": 2.0, "correct": True}]
    rows = sweep.measure(tmp_path, 600.0, TWO_FWD, log=lambda *a: None, device="cpu", cases=(TINY_CASE,),
                         dtype=torch.float16, kernels=["fwd"], done=done)
    timed = [(tuple(r["config"]), r["ms"]) for r in rows if r.get("kind") == "candidate"]
    assert timed == [(tuple(shipped), 2.0), ((32, 32, 4, 1), 1.0), ((16, 16, 4, 1), 1.0)]
    assert calls == [(32, 32, 4, 1), (16, 16, 4, 1)]  # the shipped shape, timed by the earlier process, is not
    assert [r["kind"] for r in rows].count("meta") == 1


def test_the_decode_sweep_takes_an_earlier_process_rows_as_measured(tmp_path, monkeypatch):
    import torch
    import triton.testing

    if not A._INTERPRETED:
        pytest.skip("runs the triton kernels through the interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(sweep, "DECODE_CASES", (("b1 x 40", 1, 40),))
    monkeypatch.setattr(sweep, "DECODE_GRID", [((32, 4, 3), 2, 128), ((64, 4, 3), 2, 128)])
    done = [{"kind": "peer", "case": "b1 x 40", "provider": "sdpa-flash", "ms": 3.0, "gb_s": 1.0},
            {"kind": "candidate", "case": "b1 x 40", "config": [32, 4, 3], "programs_per_sm": 2,
             "min_split_keys": 128, "ms": None, "correct": None, "error": "hung: no result after 90 s"}]
    rows = sweep.decode_sweep(tmp_path, 600.0, log=lambda *a: None, device="cpu", dtype=torch.float16, done=done)
    assert rows[:2] == done and len(rows) == 3
    assert rows[2]["config"] == [64, 4, 3] and rows[2]["correct"], rows[2]
    written = [json.loads(line) for line in (tmp_path / "decode_sweep.jsonl").read_text().splitlines()]
    assert written == rows[2:]  # only the new row: the peer is not timed again
