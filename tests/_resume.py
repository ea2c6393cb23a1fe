"""Hooks of the test suite (imported by tests/conftest.py) for running it on a lent GPU whose calls have a time limit.

Finishing the suite across device calls (scripts/gpu_check.sh, TESTS_RESUME): FASTLM_TESTS_DONE names a file of the
node ids this machine's runs have finished, one a line, appended as each test ends (its teardown report, or a
failure report: a worker that crashed or timed out leaves no teardown) by the process that gathers the reports
(xdist's controller, or pytest alone). With FASTLM_TESTS_RESUME=1 the tests it names are deselected, so a run cut at
its budget goes on where it stopped; a test cut in the middle runs again. The list is frozen at the start (a copy,
FASTLM_TESTS_SKIP): every xdist worker, a replacement for a crashed one included, must collect the same tests, or
xdist's scheduler fails.

Under xdist a test that ends its worker (pytest-timeout's thread method, a crash) is not run again: --dist loadfile
hands the rest of its file, the crashed test included, to another worker, which would hang on it again (tried with a
test that sleeps past its timeout). The controller lists such tests in FASTLM_TESTS_CRASHED and the workers skip
them. (--dist load, gpu_check.sh's default, hands on only the tests after it.)
"""

import os
import shutil
import tempfile

import pytest

_TESTS_DONE = os.environ.get("FASTLM_TESTS_DONE")
_done_sink = None
_own_temp = None  # the crashed-tests file this process made (no FASTLM_TESTS_DONE): removed at the end


def pytest_configure(config):
    global _done_sink, _own_temp
    if hasattr(config, "workerinput"):
        return  # an xdist worker: it reads what the controller set up
    if _TESTS_DONE or config.pluginmanager.hasplugin("xdist"):
        if _TESTS_DONE:
            crashed = _TESTS_DONE + ".crashed"
            open(crashed, "w").close()
        else:
            handle, crashed = tempfile.mkstemp(prefix="fastlm-tests-crashed-")
            os.close(handle)
            _own_temp = crashed
        os.environ["FASTLM_TESTS_CRASHED"] = crashed  # the workers, started after this, inherit it
    os.environ.pop("FASTLM_TESTS_SKIP", None)
    if not _TESTS_DONE:
        return
    if os.environ.get("FASTLM_TESTS_RESUME") == "1" and os.path.exists(_TESTS_DONE):
        shutil.copyfile(_TESTS_DONE, _TESTS_DONE + ".skip")
        os.environ["FASTLM_TESTS_SKIP"] = _TESTS_DONE + ".skip"
    _done_sink = open(_TESTS_DONE, "a")  # noqa: SIM115 - open for the session, closed at its end


def pytest_unconfigure(config):
    global _done_sink, _own_temp
    if _done_sink is not None:
        _done_sink.close()
        _done_sink = None
    if _own_temp is not None:
        os.unlink(_own_temp)
        _own_temp = None


def pytest_runtest_logreport(report):
    if report.when == "???" and os.environ.get("FASTLM_TESTS_CRASHED"):  # xdist's report of a worker that died
        with open(os.environ["FASTLM_TESTS_CRASHED"], "a") as f:
            f.write(report.nodeid + "\n")
    if _done_sink is not None and (report.when == "teardown" or report.failed):
        _done_sink.write(report.nodeid + "\n")
        _done_sink.flush()


def pytest_runtest_setup(item):
    crashed = os.environ.get("FASTLM_TESTS_CRASHED")
    if crashed and os.path.exists(crashed) and os.path.getsize(crashed):
        with open(crashed) as f:
            if item.nodeid in f.read().splitlines():
                pytest.skip("this test ended its xdist worker earlier in this run (a timeout or a crash): not run "
                            "again")


def deselect_finished(config, items):
    """From pytest_collection_modifyitems: drop the tests of the frozen list (FASTLM_TESTS_SKIP), if any."""
    skip = os.environ.get("FASTLM_TESTS_SKIP")
    if skip and os.path.exists(skip):
        with open(skip) as f:
            done = set(f.read().splitlines())
        finished = [item for item in items if item.nodeid in done]
        if finished:
            config.hook.pytest_deselected(items=finished)
            items[:] = [item for item in items if item.nodeid not in done]
