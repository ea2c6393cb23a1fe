"""`python -m benchmarks.overhead`: what each public op costs on the host, with the kernel launches stubbed out.

A small call is all host work: argument checks, the backend choice, the custom op's dispatch, autograd's graph, the
launcher's own arithmetic and allocations. On an H200 a 16.8 MB norm forward that eager PyTorch finishes in ~11 µs
took fastlm 140–240 µs, nearly all of it here. This benchmark times that path on a CPU, where it runs exactly as on
a GPU: the triton backend's launchers run in full (shapes, grids, output allocation) and only the kernel launch
itself is replaced by a no-op (Triton's interpreter entry point), on tiny CPU tensors. Next to each op it times
torch's own eager call on the same tensors (its dispatch, and a few microseconds of real CPU work at these sizes),
the cost a user pays today.

Targets (issue 15): ≤ 15 µs per forward, ≤ 40 µs per forward + backward.

One check runs here and not on a GPU: cross_entropy and linear_cross_entropy read CPU targets to refuse an
out-of-range class (fastlm/ops/cross_entropy.py, `_check_target_values`; on a GPU that read would sync). It is
about 4 µs of their CPU path on a 2-core CPU, so their rows overstate a GPU's host path by about that much.

Where a measured table sends `auto` to torch's own kernel (the H200's: SDPA's backends for attention, eager
F.layer_norm / F.rms_norm for the norms), a user pays fastlm's checks and route on top of torch's call: the
"fastlm auto" column times that path (NATIVE_ROUTES), to be read against the torch column beside it.

It is a pytest-benchmark file, so its statistics, JSON (`--benchmark-json`), `--benchmark-save` and
`--benchmark-compare` work as usual for tracking the host cost between commits:

    python -m benchmarks.overhead                      # runs the cases, prints a table of medians in µs
    python -m benchmarks.overhead --benchmark-save=x   # any pytest / pytest-benchmark option is passed on
    TRITON_INTERPRET=1 python -m pytest benchmarks/overhead.py --benchmark-only

The cuda backend's host path is timed the same way with the extension stubbed (`stubbed_extension`): every
fastlm._C launcher a no-op, its size queries answered, the device checks told the extension can run, so that
fastlm/_cuda.py's checks, pointer and stride extraction and workspace allocation run as on a GPU. Its attention
case takes float16 and head dim 32 (the CUDA kernels take 16-bit inputs and head dims from 32).
"""

import os

# Before any Triton kernel is defined: the launchers must build interpreter kernels, whose launch is stubbed.
os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import fastlm  # noqa: E402
from benchmarks import host_cases  # noqa: E402
from benchmarks.host_cases import CASES, DIFFERENTIABLE, call as _call  # noqa: E402

FWD_TARGET_US = 15.0
FWD_BWD_TARGET_US = 40.0
MODES = ("fwd", "fwd+bwd")

# The cases the cuda backend's stub times differently (its kernels' dtypes and head dims).
CUDA_CASES = {"attention": lambda: host_cases.attention_case(dtype=torch.float16, head_dim=32)}
# `auto`'s routes to torch's own kernels (fastlm._backend.NATIVE), as the H200's measured table takes them: the
# op's checks, the route's own test of the call, then torch's kernel. On CPU tensors `auto` would pick the reference,
# so the `native_route` fixture makes resolve take these names (after asking the op's test, as on a GPU).
NATIVE_ROUTES = {"layer_norm": "torch:eager", "rms_norm": "torch:eager", "rms_norm+residual": "torch:eager",
                 "attention": "torch:sdpa-flash"}
# Attention's route tests a call with torch's own SDPAParams check only for 16-bit inputs (float32 is refused
# before it): the route is timed in bfloat16, as a training step calls it.
AUTO_CASES = {"attention": lambda: host_cases.attention_case(dtype=torch.bfloat16)}
WHO = ("fastlm-triton", "fastlm-cuda", "fastlm-auto", "torch")


class _StubExtension:
    """fastlm._C with nothing behind it: launchers do nothing, size queries give the smallest valid answers. Its
    constants are the built extension's where there is one, else these (csrc/launchers.h's values)."""

    DTYPE_FLOAT32, DTYPE_FLOAT16, DTYPE_BFLOAT16 = 0, 1, 2
    ATTN_DTYPES = (1, 2)
    ATTN_HEAD_DIMS = (32, 64, 96, 128, 256)
    ATTN_MAX_TOKENS, ATTN_MAX_GRID, ATTN_WINDOW_INF = 1 << 30, 65535, 1 << 40
    GATED_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}

    def __init__(self):
        try:
            from fastlm import _C
        except ImportError:
            return
        for name in ("DTYPE_FLOAT32", "DTYPE_FLOAT16", "DTYPE_BFLOAT16", "ATTN_DTYPES", "ATTN_HEAD_DIMS",
                     "ATTN_MAX_TOKENS", "ATTN_MAX_GRID", "ATTN_WINDOW_INF", "GATED_ACTIVATIONS"):
            setattr(self, name, getattr(_C, name))

    def compiled_archs(self):
        return [80, 90]

    def attention_decode_splits(self, *args):
        return 1

    def __getattr__(self, name):
        if name.endswith("_numel"):
            return lambda *args: 0
        return lambda *args: None


def install_stub(monkeypatch, stub):
    """fastlm._cuda's launchers call `stub` (a _StubExtension) instead of fastlm._C, for CPU tensors, on stream 0.
    The constants _cuda reads from the extension when it loads come from the stub, into fresh containers that the
    monkeypatch puts back afterwards."""
    from fastlm import _cuda

    for name in ("_DTYPE_CODES", "_ACTIVATIONS"):
        monkeypatch.setattr(_cuda, name, {})
    for name in ("_ATTN_DTYPES", "_ATTN_HEAD_DIMS", "_ATTN_MAX_TOKENS", "_ATTN_MAX_GRID", "_ATTN_WINDOW_INF"):
        monkeypatch.setattr(_cuda, name, getattr(_cuda, name))
    _cuda._read_constants(stub)
    monkeypatch.setattr(_cuda, "_require", lambda name, t: stub)
    monkeypatch.setattr(_cuda, "_stream", lambda t: 0)


@pytest.fixture
def stubbed_extension(monkeypatch):
    """The cuda backend's launchers (fastlm/_cuda.py) run in full on CPU tensors; the extension does nothing."""
    from fastlm import _backend, _cuda

    install_stub(monkeypatch, _StubExtension())
    monkeypatch.setattr(_cuda, "available", lambda device=None: (True, ""))
    monkeypatch.setitem(_backend._REASONS, "cuda", lambda device, dtype: None)
    with fastlm.use_backend("cuda"):
        yield


@pytest.fixture(scope="module")
def stubbed_launches():
    """Every Triton kernel launch does nothing; everything before it runs as it would on a GPU."""
    from triton.runtime.interpreter import InterpretedFunction

    real = InterpretedFunction.run
    InterpretedFunction.run = lambda self, *args, **kwargs: None
    torch.set_num_threads(1)
    try:
        with fastlm.use_backend("triton"):
            yield
    finally:
        InterpretedFunction.run = real


@pytest.fixture
def native_route(monkeypatch, request):
    """`auto` takes the op's route to torch's kernel (NATIVE_ROUTES) on CPU tensors: resolve asks the op's own test
    of the route, as it does on a GPU, and takes the route whatever it says (torch's CUDA-only tests say no here)."""
    from fastlm import _backend

    name = NATIVE_ROUTES[request.node.callspec.params["op"]]

    def resolve(op, device, dtype, unsupported=None):
        if unsupported is not None:
            unsupported(name)
        return name

    monkeypatch.setattr(_backend, "resolve", resolve)
    with fastlm.use_backend("auto"):
        yield


def _cases():
    return [pytest.param(op, mode, who, id=f"{op}-{mode}-{who}") for op in CASES for mode in MODES for who in WHO
            if who != "fastlm-auto" or op in NATIVE_ROUTES]


@pytest.mark.parametrize("op,mode,who", _cases())
def test_host_path(benchmark, stubbed_launches, request, op, mode, who):
    if who == "fastlm-cuda":
        request.getfixturevalue("stubbed_extension")
    elif who == "fastlm-auto":
        request.getfixturevalue("native_route")
    cases = {"fastlm-cuda": CUDA_CASES, "fastlm-auto": AUTO_CASES}.get(who, {})
    args, ours, theirs = cases.get(op, CASES[op])()
    benchmark.group = f"{op} {mode}"
    benchmark.extra_info.update(op=op, mode=mode, who=who)
    benchmark(_call(theirs if who == "torch" else ours, args, mode, DIFFERENTIABLE.get(op)))


def table(results: dict) -> str:
    """Markdown: per op and mode, the medians in µs of fastlm's host path on each backend and of torch's call, and
    the target."""
    rows = {}
    for bench in results["benchmarks"]:
        info = bench["extra_info"]
        rows.setdefault((info["op"], info["mode"]), {})[info["who"]] = bench["stats"]["median"] * 1e6
    lines = ["| op | mode | fastlm-triton host path (µs) | fastlm-cuda host path (µs) | fastlm auto → torch's kernel "
             "(µs) | torch eager call (µs) | target (µs) | within |",
             "|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for (op, mode), by in rows.items():
        target = FWD_TARGET_US if mode == "fwd" else FWD_BWD_TARGET_US
        ours = [by.get(w) for w in WHO[:2]]
        ok = "yes" if all(t is not None and t <= target for t in ours) else "no"
        cells = " | ".join(f"{t if t is not None else nan:.1f}" for t in ours)
        auto = f"{by['fastlm-auto']:.1f} ({NATIVE_ROUTES[op]})" if "fastlm-auto" in by else "–"
        lines.append(f"| {op} | {mode} | {cells} | {auto} | {by.get('torch', nan):.1f} | {target:.0f} | {ok} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # This is a pytest session of its own, not an xdist worker: started from one (the test suite under xdist, as
    # gpu_check.sh runs it), the inherited PYTEST_XDIST_WORKER makes pytest-benchmark disable itself and refuse
    # --benchmark-only.
    for name in [n for n in os.environ if n.startswith("PYTEST_XDIST_")]:
        del os.environ[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "overhead.json"
        code = pytest.main([__file__, "-q", "-p", "no:cacheprovider", "--benchmark-only",
                            f"--benchmark-json={out}", "--benchmark-columns=min,median,iqr,rounds",
                            "--benchmark-sort=name", *argv])
        if code == 0 and out.exists():
            print(table(json.loads(out.read_text())))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
