"""tests/_resume.py, the suite's hooks for a lent GPU's time-limited calls: finished tests are recorded and a resumed
run deselects them; under xdist a test that ends its worker is not run again. Each case runs a pytest of its own."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _env(tmp_path, done, resume):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLM_TESTS_")}
    return dict(env, FASTLM_TESTS_DONE=str(done), FASTLM_TESTS_RESUME="1" if resume else "0")


def test_the_suite_records_finished_tests_and_resumes_after_them(tmp_path):
    """On this suite itself: the finished tests' node ids are written as they end, and with
    FASTLM_TESTS_RESUME=1 those tests are deselected."""
    done = tmp_path / "done"
    ids = ["tests/test_hang.py::test_a_timer_that_fires_as_its_unit_ends_does_nothing",
           "tests/test_attention_sweep.py::test_table_entry_sets_and_restores_the_launchers_table"]
    run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ids]
    first = subprocess.run(run[:-1], cwd=REPO, env=_env(tmp_path, done, False), capture_output=True, text=True,
                           timeout=300)
    assert "1 passed" in first.stdout and done.read_text().splitlines() == ids[:1], first.stdout
    second = subprocess.run(run, cwd=REPO, env=_env(tmp_path, done, True), capture_output=True, text=True,
                            timeout=300)
    assert "1 passed, 1 deselected" in second.stdout, second.stdout
    assert done.read_text().splitlines() == ids


@pytest.mark.skipif(not (importlib.util.find_spec("xdist") and importlib.util.find_spec("pytest_timeout")),
                    reason="needs pytest-xdist and pytest-timeout (the GPU machine has both)")
@pytest.mark.parametrize("dist", ["loadfile", "load"])
def test_under_xdist_a_test_that_ends_its_worker_runs_once_and_a_resumed_run_collects_alike(tmp_path, dist):
    """A test past its timeout ends its worker (thread method); --dist loadfile hands its file, that test
    included, to the next worker, which skips it rather than hang again (--dist load, gpu_check's tests step, hands
    on only the tests after it, so it is reported once, failed). A resumed run in which a worker ends
    keeps one collection for every worker (the frozen list), where xdist's scheduler would fail."""
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from _resume import (deselect_finished, pytest_configure, pytest_runtest_logreport,  # noqa: F401
                             pytest_runtest_setup, pytest_unconfigure)


        def pytest_collection_modifyitems(config, items):
            deselect_finished(config, items)
    """))
    (tmp_path / "test_file.py").write_text(textwrap.dedent("""\
        import time


        def test_first():
            pass


        def test_sleeps_past_its_timeout():
            time.sleep(120)


        def test_after():
            pass


        def test_last():
            pass
    """))
    done = tmp_path / "done"
    run = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-n", "2", "--dist", dist,
           "--timeout", "3", "--timeout-method=thread", "test_file.py"]
    first = subprocess.run(run, cwd=tmp_path, env=_env(tmp_path, done, False), capture_output=True, text=True,
                           timeout=120)
    out = first.stdout
    skipped = ", 1 skipped" if dist == "loadfile" else ""  # the re-handed crashed test, skipped
    assert f"1 failed, 3 passed{skipped} in" in out and ("ended its xdist worker earlier" in out) == bool(skipped), out
    assert out.count("crashed while running") <= 2, out  # the failure, once (its summary line may repeat it)
    assert (tmp_path / "done.crashed").read_text().split() == ["test_file.py::test_sleeps_past_its_timeout"]
    # Resumed, with only the first test done: the sleeper ends a worker again, the replacement collects alike.
    done.write_text("test_file.py::test_first\n")
    second = subprocess.run(run, cwd=tmp_path, env=_env(tmp_path, done, True), capture_output=True, text=True,
                            timeout=120)
    assert "INTERNALERROR" not in second.stdout + second.stderr, second.stdout + second.stderr
    assert f"1 failed, 2 passed{skipped} in" in second.stdout, second.stdout
