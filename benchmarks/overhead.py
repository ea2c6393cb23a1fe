"""`python -m benchmarks.overhead`: what each public op costs on the host, with the kernel launches stubbed out.

A small call is all host work: argument checks, the backend choice, the custom op's dispatch, autograd's graph, the
launcher's own arithmetic and allocations. On an H200 a 16.8 MB norm forward that eager PyTorch finishes in ~11 µs
took fastlm 140–240 µs, nearly all of it here. This benchmark times that path on a CPU, where it runs exactly as on
a GPU: the triton backend's launchers run in full (shapes, grids, output allocation) and only the kernel launch
itself is replaced by a no-op (Triton's interpreter entry point), on tiny CPU tensors. Next to each op it times
torch's own eager call on the same tensors (its dispatch, and a few microseconds of real CPU work at these sizes),
the cost a user pays today.

Targets (issue 15): ≤ 15 µs per forward, ≤ 40 µs per forward + backward.

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
import torch.nn.functional as F  # noqa: E402

import fastlm  # noqa: E402

FWD_TARGET_US = 15.0
FWD_BWD_TARGET_US = 40.0
MODES = ("fwd", "fwd+bwd")


def _norm_case(is_rms, residual):
    x = torch.randn(4, 64)
    w, b, r = torch.randn(64), torch.randn(64), torch.randn(4, 64)

    def ours(x, w, b, r):
        if is_rms:
            return fastlm.rms_norm(x, w, residual=r if residual else None)
        return fastlm.layer_norm(x, w, b, residual=r if residual else None)

    def theirs(x, w, b, r):
        h = x + r if residual else x
        y = F.rms_norm(h, (64,), w, 1e-6) if is_rms else F.layer_norm(h, (64,), w, b)
        return (y, h) if residual else y

    return (x, w, b, r), ours, theirs


def _cross_entropy_case():
    logits, target = torch.randn(4, 64), torch.randint(0, 64, (4,))
    return ((logits, target), lambda l, t: fastlm.cross_entropy(l, t), lambda l, t: F.cross_entropy(l, t))


def _linear_cross_entropy_case():
    h, w, target = torch.randn(4, 32), torch.randn(64, 32), torch.randint(0, 64, (4,))
    return ((h, w, target), lambda h, w, t: fastlm.linear_cross_entropy(h, w, t),
            lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t))


def _attention_case(dtype=torch.float32, head_dim=16):
    q, k, v = (torch.randn(1, 8, 2, head_dim, dtype=dtype) for _ in range(3))
    return ((q, k, v), lambda q, k, v: fastlm.attention(q, k, v, causal=True),
            lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=True).transpose(1, 2))


def _swiglu_case():
    gate, up = torch.randn(4, 64), torch.randn(4, 64)
    return (gate, up), lambda g, u: fastlm.swiglu(g, u), lambda g, u: F.silu(g) * u


def _rotary_case(dtype=torch.float32):
    x = torch.randn(1, 8, 2, 16, dtype=dtype)
    angles = torch.randn(8, 8)
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))

    def theirs(x, cos, sin):  # Hugging Face's apply_rotary_pos_emb, in x's (batch, seq, heads, dim) layout
        rotated = torch.cat([-x[..., 8:], x[..., :8]], -1)
        return x * cos[:, None] + rotated * sin[:, None]

    return (x, cos, sin), lambda x, c, s: fastlm.rotary_embedding(x, c, s), theirs


CASES = {
    "layer_norm": lambda: _norm_case(False, False),
    "rms_norm": lambda: _norm_case(True, False),
    "rms_norm+residual": lambda: _norm_case(True, True),
    "cross_entropy": _cross_entropy_case,
    "linear_cross_entropy": _linear_cross_entropy_case,
    "attention": _attention_case,
    "swiglu": _swiglu_case,
    "rotary_embedding": _rotary_case,
}


# The cases the cuda backend's stub times differently (its kernels' dtypes and head dims).
CUDA_CASES = {"attention": lambda: _attention_case(torch.float16, 32)}
WHO = ("fastlm-triton", "fastlm-cuda", "torch")


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


# Ops whose later floating-point arguments are constants (rotary's cos and sin tables): how many lead that need a
# gradient in the forward + backward case.
DIFFERENTIABLE = {"rotary_embedding": 1}


def _call(fn, args, mode, differentiable=None):
    """A no-argument callable: the forward (inputs that need no gradient), or forward + backward (the first
    `differentiable` floating-point arguments, all of them by default, require a gradient)."""
    if mode == "fwd":
        return lambda: fn(*args)
    n = len(args) if differentiable is None else differentiable
    leaves = [a.clone().requires_grad_() if a.is_floating_point() and i < n else a for i, a in enumerate(args)]

    def step():
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return step


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", list(CASES))
def test_host_path(benchmark, stubbed_launches, request, op, mode, who):
    if who == "fastlm-cuda":
        request.getfixturevalue("stubbed_extension")
    args, ours, theirs = (CUDA_CASES.get(op, CASES[op]) if who == "fastlm-cuda" else CASES[op])()
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
    lines = ["| op | mode | fastlm-triton host path (µs) | fastlm-cuda host path (µs) | torch eager call (µs) "
             "| target (µs) | within |",
             "|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for (op, mode), by in rows.items():
        target = FWD_TARGET_US if mode == "fwd" else FWD_BWD_TARGET_US
        ours = [by.get(w) for w in WHO[:2]]
        ok = "yes" if all(t is not None and t <= target for t in ours) else "no"
        cells = " | ".join(f"{t if t is not None else nan:.1f}" for t in ours)
        lines.append(f"| {op} | {mode} | {cells} | {by.get('torch', nan):.1f} | {target:.0f} | {ok} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
