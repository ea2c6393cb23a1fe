# The two commands of the README. Each does the whole set-up on a fresh machine (scripts/setup_env.sh), then runs.
PY := .venv/bin/python
PYTEST_ARGS ?=
# The suite runs in one pytest-xdist worker per CPU (at most 8: each holds its own torch and Triton), shared out test
# by test as the GPU loop runs it (scripts/gpu_check.sh). PYTEST_WORKERS=0 runs it in pytest's own process.
PYTEST_WORKERS ?= auto

.PHONY: test bench static setup clean

setup:
	bash scripts/setup_env.sh

# Tests: the Triton kernels run through Triton's interpreter on CPU tensors where there is no GPU.
test: setup
	TRITON_INTERPRET=$${TRITON_INTERPRET-$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
		$(PY) -m pytest -n $(PYTEST_WORKERS) --maxprocesses 8 --dist load $(PYTEST_ARGS)
	$(PY) -m benchmarks.static

# Benchmarks: times every op on the GPU; without one, says so and prints the latest committed results.
bench: setup
	$(PY) -m benchmarks

static: setup
	$(PY) -m benchmarks.static

clean:
	rm -rf build .venv *.egg-info fastlm/_C*.so
