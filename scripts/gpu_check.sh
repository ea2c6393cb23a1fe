#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call of the device tool (under its 10-minute limit): print the
# machine, install fastlm offline into the machine's python3 (building the CUDA extension with nvcc), run the full
# test suite on the GPU, run the benchmark suite, the static kernel report, and compute-sanitizer on a small norm
# and attention script. Each step runs under its own `timeout`, cut to what is left of the whole budget, so one hang cannot eat
# the call; a failing step does not stop the next.
#
# Usage: scripts/gpu_check.sh [STEP...]   STEP: info install tests bench static sanitizer (default: all, in order)
#        BENCH_ARGS="--quick" scripts/gpu_check.sh install bench    extra arguments for `python -m benchmarks`
#        BENCH_OPS="norm cross_entropy" scripts/gpu_check.sh bench   only these benchmark families (default: all)
# The bench step runs each family in a process of its own, within what is left of the step less BENCH_FLOOR_S for
# each family after it, and never more than BENCH_FAMILY_MAX_S: a family that overruns is cut alone (keeping the
# cases it finished, written after each one) without leaving the later ones nothing, and every family that
# finishes adds its entries to dispatch.json. The whole sweep needs most of a call: after install and tests, run
# the bench step in a call of its own.
# Writes to $OUT (the device tool brings back at most 8 files): one log per step, and results.tar.gz holding
# <device-slug>/{<op>.json,<op>.md,<op>.png,dispatch.json}, to untar into benchmarks/results/.
# Liger-Kernel, a benchmark peer, is installed from .whl/*.whl when the call carries it (scripts/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."

# The budget, in seconds: the whole script, and the most each step may take of what is left.
BUDGET_S=570
INFO_S=30
INSTALL_S=300
TESTS_S=240
BENCH_S=500  # 300 for norm and the cross-entropy families, plus attention ~145 s and attention_decode ~51 s (estimates)
STATIC_S=120
SANITIZER_S=90
RESERVE_S=10  # kept back for packing the results
BENCH_FLOOR_S=30  # the bench step keeps at least this for each benchmark family still to run
BENCH_FAMILY_MAX_S=200  # the most one benchmark family may take, so that one overrunning cannot starve the rest

OUT=${OUT:-/tmp/gpu_check_out}
PY=python3
RESULTS=/tmp/fastlm-results
START=$(date +%s)
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(info install tests bench static sanitizer)
SUMMARY=()
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

# run_step NAME CAP_S COMMAND: run COMMAND, output to $OUT/NAME.log, within min(CAP_S, what is left), with
# STEP_DEADLINE (epoch seconds) in its environment; print the log's last TAIL_LINES lines.
run_step() {
    local name=$1 cap=$2 cmd=$3
    local left=$((START + BUDGET_S - RESERVE_S - $(date +%s)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -le 5 ]; then
        SUMMARY+=("$(printf '%-10s skipped: the budget is spent' "$name")")
        return
    fi
    echo "===== $name (at most ${limit} s) =====" | tee "$OUT/$name.log"
    local t0 rc took verdict
    t0=$(date +%s)
    STEP_DEADLINE=$((t0 + limit)) timeout --kill-after=10 "$limit" bash -c "$cmd" >>"$OUT/$name.log" 2>&1
    rc=$?
    took=$(($(date +%s) - t0))
    verdict="ok"
    [ $rc -ne 0 ] && verdict="FAILED (exit $rc)"
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && verdict="TIMED OUT after ${limit} s"
    SUMMARY+=("$(printf '%-10s %-26s %4d s   %s.log' "$name" "$verdict" "$took" "$name")")
    echo "----- $name: $verdict in ${took} s; the end of $name.log:"
    tail -n "${TAIL_LINES:-15}" "$OUT/$name.log"
}

want() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

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

want tests && TAIL_LINES=25 run_step tests "$TESTS_S" "$PY -m pytest -x -q"

if want bench; then
    SLUG=$($PY -c "import torch; from benchmarks.harness import slug; print(slug(torch.cuda.get_device_name()))") \
        || SLUG=unknown-device
    rm -rf "$RESULTS" && mkdir -p "$RESULTS/$SLUG"
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
    tar -czf "$OUT/results.tar.gz" -C "$RESULTS" . &&
        echo "results.tar.gz: $(cd "$RESULTS" && find . -type f | sort | tr '\n' ' ')"
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

echo
echo "===== gpu_check: $(($(date +%s) - START)) s of ${BUDGET_S} s; in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
printf '%s\n' "${SUMMARY[@]}"
