#!/usr/bin/env bash
# Everything a lent GPU machine is for, in calls of the device tool (each under its 10-minute limit). Two uses:
#
# 1. The whole check: print the machine, install fastlm offline into the machine's python3 (building the CUDA
#    extension with nvcc), check the direct Triton launch path against Triton's own (off for the rest if it
#    fails), run the whole test suite on the GPU (pytest-xdist `-n 8 --dist load`, TESTS_DIST to change, and
#    pytest-timeout `--timeout 150`, by its thread method under xdist, when importable; never -x, so the counts
#    are complete), run the benchmark suite, the static kernel report, and compute-sanitizer on a small norm and
#    attention script; then record
#    benchmarks/results/<device-slug>/gpu_check.json (commit, date, device, the test counts and seconds from
#    pytest's closing line, tests_interrupted, bench_complete) and pack the results.
#      Usage: scripts/gpu_check.sh [STEP...]   STEP: info install launch tests host bench static sanitizer record
#             profile (default: all but profile, in order; record also runs after any call that ran tests or bench)
#      PROFILE_OPS="attention norm" scripts/gpu_check.sh install profile   hardware counters of each provider's
#             kernels, by Nsight Compute (benchmarks/profile.py), into the results folder as profile_<op>.{md,json,csv}
#      BENCH_ARGS="--quick" scripts/gpu_check.sh install bench    extra arguments for `python -m benchmarks`
#      BENCH_OPS="norm cross_entropy" scripts/gpu_check.sh bench   only these benchmark families (default: all)
#      TESTS_ARGS="tests/test_attention.py" TESTS_S=300 scripts/gpu_check.sh tests   a part of the suite, a budget
#      TESTS_RESUME=1 scripts/gpu_check.sh tests   only the tests an earlier call on this machine did not finish
#    The tests step ends at its budget with SIGINT, as Ctrl-C: pytest still prints the failures so far and the
#    counts (~2,100 tests now against the 1,221 of the 5-minute H200 run: 420 s may not be enough; a next call
#    with TESTS_RESUME=1 runs the rest, and the record adds the counts).
#    The tests (~5 min on an H200) and the full benchmark sweep do not fit one call: run
#    `info install launch tests static sanitizer` and `install bench` as two calls back to back (the second keeps
#    the first's launch verdict: DIRECT_VERDICT). The results folder (/tmp/fastlm-results) outlives a call while the
#    machine stays warm, and the record keeps what an earlier call on the same machine and commit recorded, so the
#    second call's tarball holds the whole record.
#
# 2. The tuning loop for one op family, in one call (target: under 2 minutes):
#      Usage: scripts/gpu_check.sh --op NAME   NAME: norm cross_entropy linear_cross_entropy attention
#                                                     attention_decode e2e e2e_hf
#    installs and builds, runs that op's tests (with xdist `--dist load` when importable), benchmarks its --quick
#    cases against the peers (into a folder of their own, so they never mix with a full run's results), profiles
#    each provider's kernels on the op's headline case under Nsight Compute with what time is left (opprofile:
#    time, throughputs, tensor pipes, occupancy, stall reasons per kernel; benchmarks/profile.py), and prints the
#    ratio table (fastlm backend vs each peer, per case and mode) last.
#
# Each step runs under its own `timeout`, cut to what is left of the whole budget, so one hang cannot eat the
# call; a failing step does not stop the next. The bench step runs each family in a process of its own, within
# what is left of the step less BENCH_FLOOR_S for each family after it, and never more than BENCH_FAMILY_MAX_S: a
# family that overruns is cut alone (keeping the cases it finished, written after each one) without leaving the
# later ones nothing, and every family that finishes adds its entries to dispatch.json. Within a family, a provider
# that fails or breaks the CUDA context costs its own cells (benchmarks/harness.py, IsolatedRun).
# Writes to $OUT (the device tool brings back at most 8 files): one log per step, and results.tar.gz holding
# <device-slug>/{<op>.json,<op>.md,<op>.png,dispatch.json,gpu_check.json,tolerance.jsonl,test_times.json}, to untar
# into benchmarks/results/ (tolerance.jsonl: every tolerance-rule comparison of the tests step, its error and bound;
# test_times.json: each test file's seconds in the tests step, slowest first)
# (with --op: op-results.tar.gz, the quick results, not for committing).
# Liger-Kernel, a benchmark peer, is installed from .whl/*.whl when the call carries it (scripts/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."

# The budget, in seconds: the whole script, and the most each step may take of what is left.
BUDGET_S=570
INFO_S=30
INSTALL_S=300
TESTS_S=${TESTS_S:-420}  # the whole suite took 312 s on an H200 with -n 8 --dist loadfile (1,221 tests then)
# How xdist shares the tests out. Not loadfile, which runs a file whole on one worker: the Triton kernels are
# compiled on first use, and by a count of the distinct specializations each file launches (the CPU suite under a
# recorder, 2026-12-02) test_attention.py alone needs 232 (0.6-2.6 s each for sm_90a on a 2-core CPU, 2.3-10 min
# serially), test_norm.py 413, the fuzz 210 (1,325 in all): one worker would bound the step. `load` spreads them
# over the 8 (a variant two workers need at once is compiled twice, on 16 cores). test_times.json says how it went.
TESTS_DIST=${TESTS_DIST:-load}
OP_TESTS_S=150  # --op: one op's tests
OP_BENCH_S=240  # --op: one family's --quick cases
BENCH_S=500  # 300 for norm and the cross-entropy families, plus attention ~145 s and attention_decode ~51 s (estimates)
STATIC_S=120
LAUNCH_S=150  # benchmarks.launch_check: ~15 small kernels compiled on a cold cache, each call run three times
HOST_S=150  # benchmarks.call_cost: 8 ops × 2 modes × 4 configurations × 4 rounds of 100 calls (~20 s), and
           # compiling the kernels of its tiny calls on a fresh machine (written after each op: a cut keeps them)
SANITIZER_S=90
OP_PROFILE_S=150  # --op: ncu over the op's headline case, every provider's forward and backward (what is left)
PROFILE_S=300  # the profile step: PROFILE_OPS one after another
RESERVE_S=10  # kept back for packing the results
BENCH_FLOOR_S=30  # the bench step keeps at least this for each benchmark family still to run
BENCH_FAMILY_MAX_S=200  # the most one benchmark family may take, so that one overrunning cannot starve the rest

OUT=${OUT:-/tmp/gpu_check_out}
PY=${PY:-python3}
RESULTS=${RESULTS:-/tmp/fastlm-results}  # the full run's results, <device-slug>/... inside
OP_RESULTS=${OP_RESULTS:-/tmp/fastlm-op-results}  # --op's quick results
DIRECT_VERDICT=${DIRECT_VERDICT:-/tmp/fastlm-direct-launch}  # "<commit> ok|off": the launch check's verdict here
TESTS_DONE=${TESTS_DONE:-/tmp/fastlm-tests-done}  # the node ids of the tests finished on this machine
JUNIT_ROOT=${JUNIT_ROOT:-/tmp/fastlm-junit}  # <commit>/<epoch>.xml: pytest's JUnit report of each tests call
START=$(date +%s)
OP=""
if [ "${1:-}" = "--op" ]; then
    OP=${2:-}
    case "$OP" in
        norm | cross_entropy | linear_cross_entropy | attention | attention_decode | e2e | e2e_hf) ;;
        *)
            echo "usage: $0 --op NAME, NAME one of norm cross_entropy linear_cross_entropy attention" \
                "attention_decode e2e e2e_hf (got '$OP')" >&2
            exit 2
            ;;
    esac
    STEPS=(install launch optests opbench opprofile)
else
    STEPS=("$@")
    [ ${#STEPS[@]} -eq 0 ] && STEPS=(info install launch tests host bench static sanitizer record)
fi
SUMMARY=()
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

# run_step NAME CAP_S COMMAND: run COMMAND, output to $OUT/NAME.log, within min(CAP_S, what is left), with
# STEP_DEADLINE (epoch seconds) in its environment; print the log's last TAIL_LINES lines. At the limit the
# command gets STEP_SIGNAL (TERM unless the step says otherwise), then KILL 15 s later. The pytest steps say INT:
# pytest (and xdist's controller) take it as Ctrl-C and still print the failures so far and the counts line,
# where TERM leaves a log of dots (tried on CPU with -n 2).
run_step() {
    local name=$1 cap=$2 cmd=$3
    local left=$((START + BUDGET_S - RESERVE_S - $(date +%s)))
    local limit=$((cap < left ? cap : left))
    STEP_RC=""
    if [ "$limit" -le 5 ]; then
        SUMMARY+=("$(printf '%-10s skipped: the budget is spent' "$name")")
        return
    fi
    echo "===== $name (at most ${limit} s) =====" | tee "$OUT/$name.log"
    local t0 rc took verdict
    t0=$(date +%s)
    STEP_DEADLINE=$((t0 + limit)) timeout -s "${STEP_SIGNAL:-TERM}" --kill-after=15 "$limit" bash -c "$cmd" \
        >>"$OUT/$name.log" 2>&1
    rc=$?
    STEP_RC=$rc
    took=$(($(date +%s) - t0))
    verdict="ok"
    [ $rc -ne 0 ] && verdict="FAILED (exit $rc)"
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && verdict="TIMED OUT after ${limit} s"
    SUMMARY+=("$(printf '%-10s %-26s %4d s   %s.log' "$name" "$verdict" "$took" "$name")")
    echo "----- $name: $verdict in ${took} s; the end of $name.log:"
    tail -n "${TAIL_LINES:-15}" "$OUT/$name.log"
}

want() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

# The pytest arguments for one op family's tests (--op).
op_tests() {
    case "$1" in
        norm) echo "tests/test_norm.py" ;;
        cross_entropy) echo "tests/test_cross_entropy.py -k 'not linear'" ;;
        linear_cross_entropy) echo "tests/test_cross_entropy.py -k linear" ;;
        attention | attention_decode) echo "tests/test_attention.py" ;;
        e2e) echo "tests/test_models.py tests/test_benchmarks.py -k 'not test_benchmarks or e2e'" ;;
        e2e_hf) echo "tests/test_integrations.py" ;;
    esac
}

# The device's results folder name, as the benchmarks name it.
device_slug() {
    $PY -c "import torch; from benchmarks.harness import slug; print(slug(torch.cuda.get_device_name()))" \
        2>/dev/null || echo unknown-device
}

# pytest's parallel and timeout options, for the plugins this python has (DIST: loadfile or load). With xdist the
# timeout ends a test by its thread method: the worker dumps its stacks and exits, xdist reports that test as
# crashed and starts a new worker, and the suite goes on. The default (signal) method raises in the test's thread,
# which never happens while that thread waits in C for a hung kernel: the step would sit until its budget (tried
# on a CPU with a test spinning in C, -n 2: thread method 9 s and every other test run; signal method killed at 50 s
# with no summary). Without xdist the signal method stays: a thread timeout would end the whole run.
pytest_options() {
    local opts="" method=signal
    $PY -c "import xdist" 2>/dev/null && opts="-n 8 --dist $1" && method=thread
    $PY -c "import pytest_timeout" 2>/dev/null && opts="$opts --timeout 150 --timeout-method=$method"
    echo "$opts"
}

if compgen -G ".whl/*.whl" >/dev/null; then
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        echo "carried wheels installed into /tmp/site: $(ls .whl | tr '\n' ' ')"
    else
        echo "the wheels in .whl/ failed to install; the peers they hold will show as missing"
    fi
fi

if want info; then
    cat >/tmp/gpu_info.py <<'PYEOF'
import importlib.metadata
import sys

import torch
import triton

print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}),",
      f"triton {triton.__version__}")
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
try:
    import liger_kernel  # noqa: F401

    print("liger-kernel", importlib.metadata.version("liger-kernel"))
except ImportError as e:
    print(f"liger-kernel: not importable ({e}); carry its wheel in .whl/ to benchmark it")
PYEOF
    TAIL_LINES=40 run_step info "$INFO_S" "nvidia-smi; nvcc --version | tail -n 2; \
        compute-sanitizer --version | head -n 2; $PY /tmp/gpu_info.py"
fi

want install && TAIL_LINES=8 run_step install "$INSTALL_S" "
    $PY -m pip install --no-build-isolation --no-deps -e . && $PY -c 'import fastlm; print(fastlm.build_info())'"

# fastlm's direct Triton launch path (kernels/_launch.py), checked against Triton's own on this GPU before anything
# relies on it (benchmarks/launch_check.py: exit 1 the paths differ, 2 no GPU, 3 the check could not run). Should
# it compute anything else, every later step runs with it off. The verdict is kept in DIRECT_VERDICT for this
# commit, so later calls on the machine follow it without checking again; a cut, no GPU or a check that could not
# run says nothing either way and leaves the path on.
# The code's identity: FASTLM_COMMIT, else git's, else (a copy without .git, as the device tool makes) a hash of the
# sources, so that a verdict or a done list never outlives an edit between calls.
source_hash() {
    find fastlm kernels csrc tests benchmarks scripts setup.py -type f \( -name '*.py' -o -name '*.cu' \
        -o -name '*.cuh' -o -name '*.h' -o -name '*.cpp' -o -name '*.sh' \) 2>/dev/null | LC_ALL=C sort \
        | xargs cat | sha1sum | cut -c1-12
}
COMMIT=${FASTLM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "tree-$(source_hash)")}
VERDICT=$([ -f "$DIRECT_VERDICT" ] && awk -v c="$COMMIT" '$1 == c {print $2}' "$DIRECT_VERDICT")
if [ "$VERDICT" = off ]; then
    export FASTLM_TRITON_DIRECT=0
    SUMMARY+=("!!!!! direct launch path off (FASTLM_TRITON_DIRECT=0): its check failed on this machine")
fi
if want launch; then
    if [ -n "$VERDICT" ]; then
        SUMMARY+=("$(printf '%-10s checked earlier on this machine and commit: %s' launch "$VERDICT")")
    else
        TAIL_LINES=12 run_step launch "$LAUNCH_S" "$PY -m benchmarks.launch_check"
        case "$STEP_RC" in
            0) echo "$COMMIT ok" >"$DIRECT_VERDICT" ;;
            1)
                echo "$COMMIT off" >"$DIRECT_VERDICT"
                export FASTLM_TRITON_DIRECT=0
                echo "!!!!! the direct Triton launch path failed its check: FASTLM_TRITON_DIRECT=0 from here on"
                SUMMARY+=("!!!!! direct launch path off (FASTLM_TRITON_DIRECT=0): read launch.log")
                ;;
        esac
    fi
fi

# Each test the suite finishes is written to TESTS_DONE (tests/_resume.py); TESTS_RESUME=1 runs only the tests not
# in it, so a second call finishes a suite the first cut at its budget (the record adds the two calls' counts).
# The list starts with the commit it belongs to: a resume at another commit runs the whole suite.
RESUMED=0
if want tests; then
    if [ "${TESTS_RESUME:-0}" = 1 ] && [ "$(head -n 1 "$TESTS_DONE" 2>/dev/null)" = "# commit $COMMIT" ]; then
        RESUMED=1
    else
        [ "${TESTS_RESUME:-0}" = 1 ] && echo "TESTS_RESUME=1, but no tests of commit $COMMIT are recorded as done" \
            "here: the whole suite runs"
        echo "# commit $COMMIT" >"$TESTS_DONE"
    fi
    # Every comparison of the tolerance rule, one JSON line each (docs/TOLERANCE.md, FASTLM_TOL_LOG): the margins
    # on the GPU, packed with the results; a resumed call appends to its first call's.
    TOL_LOG="$RESULTS/$(device_slug)/tolerance.jsonl"
    mkdir -p "$(dirname "$TOL_LOG")"
    [ "$RESUMED" = 1 ] || rm -f "$TOL_LOG"
    # Each test's seconds (JUnit XML, one report a call, this commit's only): the record sums them per file into
    # test_times.json: how long each file took (under --dist loadfile, the slowest file bounds the step).
    [ "$RESUMED" = 1 ] || rm -rf "$JUNIT_ROOT"
    mkdir -p "$JUNIT_ROOT/$COMMIT"
    STEP_SIGNAL=INT TAIL_LINES=40 run_step tests "$TESTS_S" "FASTLM_TESTS_DONE=$TESTS_DONE \
        FASTLM_TESTS_RESUME=$RESUMED FASTLM_TOL_LOG=$TOL_LOG $PY -m pytest -q -rfE --durations=15 \
        --junitxml=$JUNIT_ROOT/$COMMIT/$(date +%s).xml $(pytest_options "$TESTS_DIST") ${TESTS_ARGS:-}"
fi

# Small calls end to end (issue 15's host targets, on the GPU): triton through Triton's launch path and the direct
# one, cuda, torch; into the results folder beside the benchmark families.
want host && TAIL_LINES=25 run_step host "$HOST_S" "$PY -m benchmarks.call_cost --out $RESULTS/$(device_slug)"

if want optests; then
    STEP_SIGNAL=INT TAIL_LINES=30 run_step optests "$OP_TESTS_S" \
        "$PY -m pytest -q -rfE $(pytest_options load) $(op_tests "$OP")"
fi

if want opbench; then
    SLUG=$(device_slug)
    rm -rf "$OP_RESULTS" && mkdir -p "$OP_RESULTS/$SLUG"
    TAIL_LINES=30 run_step opbench "$OP_BENCH_S" "$PY -m benchmarks --op $OP --quick --out $OP_RESULTS/$SLUG"
fi

# Nsight Compute over each provider's kernels (benchmarks/profile.py): the op's own folder with --op, the results
# folder (committed with the benchmark results) for the profile step. Each run gets what is left of its step.
if want opprofile; then
    case "$OP" in
        attention | attention_decode | norm | cross_entropy | linear_cross_entropy)
            SLUG=${SLUG:-$(device_slug)}
            mkdir -p "$OP_RESULTS/$SLUG"
            TAIL_LINES=30 run_step opprofile "$OP_PROFILE_S" "$PY -m benchmarks.profile --op $OP \
                --out $OP_RESULTS/$SLUG --budget-s \$((STEP_DEADLINE - \$(date +%s) - 20))"
            ;;
    esac
fi

if want profile; then
    SLUG=$(device_slug)
    mkdir -p "$RESULTS/$SLUG"
    TAIL_LINES=30 run_step profile "$PROFILE_S" "rc=0; for op in ${PROFILE_OPS:-attention norm cross_entropy}; do
        left=\$((STEP_DEADLINE - \$(date +%s) - 20))
        if [ \$left -le 30 ]; then echo \"profile \$op: no time left\"; rc=1; continue; fi
        $PY -m benchmarks.profile --op \$op --out $RESULTS/$SLUG --budget-s \$left || rc=1
    done; exit \$rc"
fi

if want bench; then
    SLUG=$(device_slug)
    # A fresh sweep: the family results of an earlier call go; what the tests and host steps wrote stays (the
    # record gpu_check.json, tolerance.jsonl, test_times.json, call_cost.*), so this call's tarball holds it too.
    mkdir -p "$RESULTS/$SLUG" && find "$RESULTS/$SLUG" -maxdepth 1 -type f ! -name gpu_check.json \
        ! -name tolerance.jsonl ! -name test_times.json ! -name "call_cost.*" -delete
    cat >/tmp/bench_families.sh <<'SHEOF'
# Each family in its own process, within what is left of the step less FLOOR_S for each family after it and a
# few seconds for timeout's kill grace.
set -u
ops=${BENCH_OPS:-$($PY -c "from benchmarks.__main__ import families; print(' '.join(families()))")} || exit 1
set -- $ops
rc=0
while [ $# -gt 0 ]; do
    cap=$((STEP_DEADLINE - $(date +%s) - FLOOR_S * ($# - 1) - 10))
    [ "$cap" -gt "$FAMILY_MAX_S" ] && cap=$FAMILY_MAX_S
    if [ "$cap" -le 5 ]; then
        echo "===== benchmark $1: skipped, the step's time is spent"
        rc=1
    else
        echo "===== benchmark $1 (at most $cap s)"
        timeout --kill-after=5 "$cap" $PY -m benchmarks --op "$1" --out "$RESULTS_DIR" $BENCH_ARGS
        status=$?
        if [ $status -ne 0 ]; then
            rc=$status
            echo "===== benchmark $1: exit $status$([ $status -eq 124 ] && echo ", cut at $cap s")"
        fi
    fi
    shift
done
exit $rc
SHEOF
    TAIL_LINES=40 run_step bench "$BENCH_S" "PY=$PY RESULTS_DIR=$RESULTS/$SLUG BENCH_ARGS='${BENCH_ARGS:-}' \
        BENCH_OPS='${BENCH_OPS:-}' FLOOR_S=$BENCH_FLOOR_S FAMILY_MAX_S=$BENCH_FAMILY_MAX_S bash /tmp/bench_families.sh"
fi

want static && TAIL_LINES=25 run_step static "$STATIC_S" "$PY -m benchmarks.static"

if want sanitizer; then
    cat >/tmp/sanitize_norm.py <<'PYEOF'
# Every norm kernel path (rows kept whole, chunked rows; with and without the residual) on both kernel backends,
# forward and backward, on shapes that no block size divides.
import torch

import fastlm
from fastlm import _cuda

backends = ["triton"] + (["cuda"] if _cuda.available()[0] else [])
print("backends:", backends, "" if "cuda" in backends else f"(cuda: {_cuda.available()[1]})")
g = torch.Generator(device="cuda").manual_seed(0)
for backend in backends:
    with fastlm.use_backend(backend):
        for rows, n in ((37, 1000), (3, 70001)):
            for residual in (False, True):
                x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
                w = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
                b = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
                r = torch.randn_like(x).requires_grad_() if residual else None
                for op, args in ((fastlm.layer_norm, (x, w, b)), (fastlm.rms_norm, (x, w))):
                    try:
                        out = op(*args, residual=r)
                    except fastlm.BackendUnavailable as e:
                        print(f"{backend} {op.__name__} {rows}x{n}: {e}")
                        continue
                    outs = out if isinstance(out, tuple) else (out,)
                    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
# Attention: ragged packed sequences (an empty one, one token), GQA, causal with a window, a head dim that is not a
# power of two, forward and backward; the cuda backend's decode path (one query over a long cache) too.
lens = [0, 1, 77, 130]
cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device="cuda")
for backend in backends:
    with fastlm.use_backend(backend):
        for d in (64, 96, 128):
            q = torch.randn(sum(lens), 4, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
            k = torch.randn(sum(lens), 2, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
            v = torch.randn_like(k).requires_grad_()
            try:
                out = fastlm.attention(q, k, v, causal=True, window=(50, -1), cu_seqlens_q=cu, cu_seqlens_k=cu,
                                       max_seqlen_q=max(lens), max_seqlen_k=max(lens))
                out.backward(torch.randn_like(out))
                q1 = torch.randn(3, 1, 8, d, device="cuda", dtype=torch.bfloat16, generator=g)
                kv = torch.randn(3, 3001, 2, d, device="cuda", dtype=torch.bfloat16, generator=g)
                fastlm.attention(q1, kv, kv, causal=True)
            except fastlm.BackendUnavailable as e:
                print(f"{backend} attention d{d}: {e}")
torch.cuda.synchronize()
print("the norm and attention kernels ran under compute-sanitizer")
PYEOF
    TAIL_LINES=20 run_step sanitizer "$SANITIZER_S" "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer \
        --tool memcheck --error-exitcode 1 --print-limit 20 $PY /tmp/sanitize_norm.py"
fi

# The record: gpu_check.json beside the results (benchmarks/harness.py, write_gpu_check), from this call's
# tests.log and the benchmark results present, keeping what an earlier call on this machine and commit recorded.
if [ -z "$OP" ] && { want record || want tests || want bench; }; then
    echo "===== record"
    FASTLM_COMMIT=$COMMIT RESUMED=$RESUMED $PY - "$RESULTS" "$OUT/tests.log" "$JUNIT_ROOT/$COMMIT" <<'PYEOF'
import json
import os
import sys
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.__main__ import families

results, log = Path(sys.argv[1]), Path(sys.argv[2])
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
commit = os.environ["FASTLM_COMMIT"]  # the script's COMMIT: FASTLM_COMMIT, git's, or the sources' hash
path = harness.write_gpu_check(results, log if log.exists() else None, families(), device=device, commit=commit,
                               resumed=os.environ.get("RESUMED") == "1")
print(f"{path}: {path.read_text()}", end="")
times = harness.write_test_times(results, sorted(Path(sys.argv[3]).glob("*.xml")), device=device)
if times:
    print(f"{times}: the slowest test files (seconds): " + ", ".join(
        f"{f['file']} {f['seconds']:.0f}" for f in json.loads(times.read_text())["files"][:5]))
PYEOF
fi

if [ -n "$OP" ]; then
    [ -d "$OP_RESULTS" ] && tar -czf "$OUT/op-results.tar.gz" -C "$OP_RESULTS" .
elif [ -d "$RESULTS" ] && [ -n "$(find "$RESULTS" -type f)" ]; then
    tar -czf "$OUT/results.tar.gz" -C "$RESULTS" . &&
        echo "results.tar.gz: $(cd "$RESULTS" && find . -type f | sort | tr '\n' ' ')"
fi

echo
echo "===== gpu_check: $(($(date +%s) - START)) s of ${BUDGET_S} s; in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
printf '%s\n' "${SUMMARY[@]}"
if [ -n "$OP" ]; then
    echo
    echo "===== $OP: fastlm against the peers (--quick cases; peer time / fastlm time, > 1: fastlm faster)"
    $PY -m benchmarks --ratios "$OP_RESULTS/${SLUG:-$(device_slug)}" --op "$OP"
fi
