#!/usr/bin/env bash
# The "any seed passes" check of the tolerance rule (docs/TOLERANCE.md, issue 9): runs tests for
# FASTLM_TEST_SEED = FIRST..LAST, one pytest process per seed, and prints each seed's closing line and failures;
# exits non-zero when any seed failed. Without TRITON_INTERPRET set, it is set as `make test` sets it (1 on a
# machine without a GPU).
#
#   scripts/seed_sweep.sh 1 20                                  # the numerics test files, seeds 1..20
#   scripts/seed_sweep.sh 1 20 tests/test_norm.py -k float32    # any pytest selection
#
# Logs: one file per seed under ${SWEEP_DIR:-/tmp/fastlm-seed-sweep}.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
first=${1:?first seed}; last=${2:?last seed}; shift 2
if [ $# -eq 0 ]; then
    set -- tests/test_norm.py tests/test_cross_entropy.py tests/test_attention.py tests/test_gated.py \
        tests/test_rotary.py tests/test_models.py
fi
export TRITON_INTERPRET=${TRITON_INTERPRET-$("$PY" -c "import torch; print(0 if torch.cuda.is_available() else 1)")}
dir=${SWEEP_DIR:-/tmp/fastlm-seed-sweep}
mkdir -p "$dir"
failed_seeds=()
for seed in $(seq "$first" "$last"); do
    log="$dir/seed-$seed.log"
    FASTLM_TEST_SEED=$seed "$PY" -m pytest -q -p no:cacheprovider "$@" > "$log" 2>&1
    rc=$?
    echo "seed $seed: $(tail -n 1 "$log")"
    if [ $rc -ne 0 ]; then
        failed_seeds+=("$seed")
        grep -E "^(FAILED|ERROR) " "$log" | sed 's/^/    /'
    fi
done
if [ ${#failed_seeds[@]} -gt 0 ]; then
    echo "seeds with failures: ${failed_seeds[*]} (logs in $dir)"
    exit 1
fi
echo "every seed $first..$last passed (logs in $dir)"
