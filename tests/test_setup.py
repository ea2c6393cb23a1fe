"""The set-up of `make test` and `make bench` (scripts/setup_env.sh) where pip cannot install the pins: a machine that
cannot reach a package index (the lent GPU machines cannot download) goes on with the versions it has, saying which
differ, and stops, naming it, when a pinned package is missing altogether (scripts/check_pins.py)."""

import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MISSING = "fastlm-test-no-such-package"


def _requirements(*extra):
    return "\n".join([
        "# a comment line",
        f"pytest=={metadata.version('pytest')}   # the installed version: nothing to say",
        "numpy==0.0.1          # another version than this machine's",
        "",
        *extra,
    ]) + "\n"


def _check(tmp_path, text):
    path = tmp_path / "requirements.txt"
    path.write_text(text)
    return subprocess.run([sys.executable, str(REPO / "scripts" / "check_pins.py"), str(path)], capture_output=True,
                          text=True, timeout=60)


def test_check_pins_names_the_versions_that_differ_and_fails_on_a_missing_package(tmp_path):
    proc = _check(tmp_path, _requirements())
    assert proc.returncode == 0, proc.stderr
    assert f"numpy {metadata.version('numpy')} here, 0.0.1 pinned" in proc.stderr
    assert "pytest" not in proc.stderr and proc.stdout == ""
    proc = _check(tmp_path, _requirements(f"{MISSING}==1.0"))
    assert proc.returncode == 1
    assert f"not installed and not installable now: {MISSING}" in proc.stderr and "numpy" in proc.stderr
    exact = _check(tmp_path, f"pytest=={metadata.version('pytest')}\n")
    assert exact.returncode == 0 and exact.stderr == ""


def test_check_pins_reads_only_exact_pins():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import check_pins
    finally:
        sys.path.pop(0)
    text = "torch==2.13.0  # torch-stack\nnumpy>=2\n-e .\n# x==1\n  wheel == 0.45.1\nfoo==1.0;python_version<'4'\n"
    assert check_pins.pins(text) == [("torch", "2.13.0"), ("wheel", "0.45.1"), ("foo", "1.0")]


@pytest.mark.parametrize("case", ["online", "offline", "offline-missing"])
def test_setup_goes_on_offline_with_what_the_machine_has(tmp_path, case):
    """The script runs for real in a copy of the repository whose .venv python is a stand-in: pip's install of the
    requirements fails as it does without an index ('offline'), everything else runs with this Python."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("setup_env.sh", "check_pins.py", "parent_env.py"):
        shutil.copy(REPO / "scripts" / name, repo / "scripts" / name)
    (repo / "requirements.txt").write_text(_requirements(*([f"{MISSING}==1.0"] if case == "offline-missing" else [])))
    log = tmp_path / "calls.log"
    venv_python = repo / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "$*" >> {log}
        if [ "$1 $2 $3" = "-m pip install" ]; then
            case " $* " in
              *" -r "*) {"exit 0" if case == "online" else 'echo "ERROR: No matching distribution found" >&2; exit 1'} ;;
            esac
            exit 0
        fi
        [ "$1" = "-c" ] && exit 1  # no CUDA build of torch here
        [ "$1" = "-" ] && {{ cat > /dev/null; echo "fastlm stand-in"; exit 0; }}
        exec {sys.executable} "$@"
    """))
    venv_python.chmod(0o755)
    proc = subprocess.run(["bash", str(repo / "scripts" / "setup_env.sh")], capture_output=True, text=True,
                          timeout=120)
    calls = log.read_text().splitlines()
    installed_fastlm = any(c.startswith("-m pip install") and c.endswith("-e .") for c in calls)
    if case == "online":
        assert proc.returncode == 0, proc.stderr
        assert "checking what this machine has" not in proc.stderr and installed_fastlm
    elif case == "offline":
        assert proc.returncode == 0, proc.stderr
        assert "pip could not install the pinned versions" in proc.stderr, proc.stderr
        assert "numpy" in proc.stderr and installed_fastlm and "fastlm stand-in" in proc.stdout
    else:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert MISSING in proc.stderr and not installed_fastlm


def _purelib(python):
    """The site-packages directory of the environment that `python` belongs to."""
    return subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_a_venv_made_from_a_venv_sees_its_packages(tmp_path):
    """`python -m venv --system-site-packages` from a virtualenv's python shows the base interpreter's packages only
    (checked first, so this test fails should Python change that); parent_env.py lists the parent's too, after the
    child's own, and is idempotent. The GPU machines' python3 is such a virtualenv, with their CUDA build of torch."""
    parent, child = tmp_path / "parent", tmp_path / "child"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(parent)], check=True, timeout=120)
    parent_python = parent / "bin" / "python"
    purelib = _purelib(parent_python)
    (Path(purelib) / "fastlm_parent_marker.py").write_text("WHERE = 'parent'\n")
    subprocess.run([str(parent_python), "-m", "venv", "--without-pip", "--system-site-packages", str(child)],
                   check=True, timeout=120)
    child_python = str(child / "bin" / "python")
    probe = [child_python, "-c", "import fastlm_parent_marker as m; print(m.WHERE)"]
    assert subprocess.run(probe, capture_output=True, text=True).returncode != 0  # what setup_env.sh ran into
    for _ in range(2):
        proc = subprocess.run([str(parent_python), str(REPO / "scripts" / "parent_env.py"), str(child)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "also sees" in proc.stdout, proc.stdout + proc.stderr
    assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "parent"
    # The child's own packages come first: one of the same name there wins.
    child_purelib = _purelib(child_python)
    (Path(child_purelib) / "fastlm_parent_marker.py").write_text("WHERE = 'child'\n")
    assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "child"
    pth = Path(child_purelib) / "_fastlm_parent_env.pth"
    # Run by the child's own python (an activated .venv) nothing changes.
    subprocess.run([child_python, str(REPO / "scripts" / "parent_env.py"), str(child)], check=True, timeout=60)
    assert pth.read_text().split() == [purelib]


def test_xdist_workers_share_the_cpus_among_their_torch_threads():
    """`make test` runs a worker per CPU: each worker's torch takes its share of the CPUs (tests/conftest.py), not
    torch's default of a thread per CPU in every worker, which oversubscribed them (docs/DESIGN.md, Testing)."""
    import os

    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers == 1:
        pytest.skip("runs in one pytest process: torch keeps its default threads")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert torch.get_num_threads() == max(1, cpus // workers)
