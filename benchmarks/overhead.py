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

The cuda backend's launchers need a GPU even to be called, so only the triton backend's host path is timed here.
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


def _attention_case():
    q, k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    return ((q, k, v), lambda q, k, v: fastlm.attention(q, k, v, causal=True),
            lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=True).transpose(1, 2))


CASES = {
    "layer_norm": lambda: _norm_case(False, False),
    "rms_norm": lambda: _norm_case(True, False),
    "rms_norm+residual": lambda: _norm_case(True, True),
    "cross_entropy": _cross_entropy_case,
    "linear_cross_entropy": _linear_cross_entropy_case,
    "attention": _attention_case,
}


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


def _call(fn, args, mode):
    """A no-argument callable: the forward (inputs that need no gradient), or forward + backward."""
    if mode == "fwd":
        return lambda: fn(*args)
    leaves = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]

    def step():
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return step


@pytest.mark.parametrize("who", ("fastlm", "torch"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", list(CASES))
def test_host_path(benchmark, stubbed_launches, op, mode, who):
    args, ours, theirs = CASES[op]()
    benchmark.group = f"{op} {mode}"
    benchmark.extra_info.update(op=op, mode=mode, who=who)
    benchmark(_call(ours if who == "fastlm" else theirs, args, mode))


def table(results: dict) -> str:
    """Markdown: per op and mode, the medians in µs of fastlm's host path and torch's call, and the target."""
    rows = {}
    for bench in results["benchmarks"]:
        info = bench["extra_info"]
        rows.setdefault((info["op"], info["mode"]), {})[info["who"]] = bench["stats"]["median"] * 1e6
    lines = ["| op | mode | fastlm host path (µs) | torch eager call (µs) | target (µs) | within |",
             "|---|---|---|---|---|---|"]
    for (op, mode), by in rows.items():
        target = FWD_TARGET_US if mode == "fwd" else FWD_BWD_TARGET_US
        ours = by.get("fastlm")
        ok = "yes" if ours is not None and ours <= target else "no"
        lines.append(f"| {op} | {mode} | {ours:.1f} | {by.get('torch', float('nan')):.1f} | {target:.0f} | {ok} |")
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
