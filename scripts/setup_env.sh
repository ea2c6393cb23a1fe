#!/usr/bin/env bash
# Create or refresh .venv and install fastlm into it, with its CUDA extension where nvcc is found.
# Called by `make test` and `make bench`; safe to run again (pip and ninja skip what is up to date).
# The venv sees the machine's own site-packages, so a CUDA build of torch that the machine's Python already has
# is reused instead of replaced by the pinned CPU build (requirements.txt lines tagged "torch-stack").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
    echo "fastlm: creating $VENV"
    "$PY" -m venv --system-site-packages "$VENV"
fi
# --system-site-packages shows the base interpreter's packages only; where $PY is itself a virtualenv (the GPU
# machines' python3 is), its packages are listed to .venv by a .pth file.
"$PY" scripts/parent_env.py "$VENV"
VPY="$VENV/bin/python"

reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
if "$VPY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "fastlm: reusing this machine's CUDA build of torch $("$VPY" -c 'import torch; print(torch.__version__)')"
    grep -v "torch-stack" requirements.txt > "$reqs"
else
    cp requirements.txt "$reqs"
fi
if ! "$VPY" -m pip install --quiet --disable-pip-version-check -r "$reqs"; then
    # A machine that cannot reach a package index (the lent GPU machines cannot download) may hold every
    # dependency in versions of its own: go on with those, saying which differ; stop if one is missing.
    echo "fastlm: pip could not install the pinned versions; checking what this machine has" >&2
    "$VPY" scripts/check_pins.py "$reqs"
fi
"$VPY" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
"$VPY" - <<'PYEOF'
import fastlm
print(f"fastlm {fastlm.__version__}: {fastlm.build_info()}")
PYEOF
