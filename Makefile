# The two commands of the README. Each does the whole set-up on a fresh machine (scripts/setup_env.sh), then runs.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: test bench static setup clean

setup:
	bash scripts/setup_env.sh

# Tests: the Triton kernels run through Triton's interpreter on CPU tensors where there is no GPU.
test: setup
	TRITON_INTERPRET=$${TRITON_INTERPRET-$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
		$(PY) -m pytest $(PYTEST_ARGS)
	$(PY) -m benchmarks.static

# Benchmarks: times every op on the GPU; without one, says so and prints the latest committed results.
bench: setup
	$(PY) -m benchmarks

static: setup
	$(PY) -m benchmarks.static

clean:
	rm -rf build .venv *.egg-info fastlm/_C*.so
