"""The eager host path (fastlm/ops/_eager.py): a kernel call outside torch.compile skips the dispatcher, and gives
exactly what the registered op gives, forward and backward, on every kernel backend that runs here."""

import pytest
import torch

import fastlm
from fastlm.ops import _eager
from conftest import DEVICE, generator, kernel_backends


def _case(name):
    """(function of float leaves, the leaves) for one op, small shapes crossing the kernels' block edges."""
    g = generator()
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if name == "layer_norm":
        return (lambda x, w, b, r: fastlm.layer_norm(x, w, b, residual=r)), (rand(5, 40), rand(40), rand(40),
                                                                             rand(5, 40))
    if name == "rms_norm":
        return (lambda x, w: fastlm.rms_norm(x, w, offset=1.0)), (rand(3, 2, 24), rand(24))
    if name == "swiglu":
        return fastlm.swiglu, (rand(4, 48), rand(4, 48))
    if name == "geglu":
        return fastlm.geglu, (rand(4, 48), rand(4, 48))
    if name == "rotary":
        cos, sin = rand(6, 8), rand(6, 8)
        return (lambda x: fastlm.rotary_embedding(x, cos, sin)), (rand(2, 6, 3, 12),)
    if name == "attention":
        # deterministic: bitwise comparable on a GPU whatever DQ_ATOMIC_DEFAULT (an atomic dQ is not repeatable)
        return ((lambda q, k, v: fastlm.attention(q, k, v, causal=True, deterministic=True)),
                (rand(1, 40, 4, 16), rand(1, 40, 2, 16), rand(1, 40, 2, 16)))
    if name == "cross_entropy":
        target = torch.randint(0, 50, (6,), generator=g)
        return (lambda x: fastlm.cross_entropy(x, target, label_smoothing=0.1)), (rand(6, 50),)
    if name == "cross_entropy_none":
        target = torch.randint(0, 50, (6,), generator=g)
        return (lambda x: fastlm.cross_entropy(x, target, reduction="none", z_loss=1e-3)), (rand(6, 50),)
    if name == "linear_cross_entropy":
        target = torch.randint(0, 50, (6,), generator=g)
        return (lambda h, w: fastlm.linear_cross_entropy(h, w, target)), (rand(6, 24), rand(50, 24))
    raise KeyError(name)


OPS = ("layer_norm", "rms_norm", "swiglu", "geglu", "rotary", "attention", "cross_entropy", "cross_entropy_none",
       "linear_cross_entropy")


def _run(name, grad):
    fn, leaves = _case(name)
    leaves = [t.requires_grad_(grad) for t in leaves]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    if not grad:
        return [o.detach() for o in outs]
    cotangents = [torch.randn(o.shape, generator=generator(1)) for o in outs]
    torch.autograd.backward(outs, cotangents)
    return [o.detach() for o in outs] + [t.grad for t in leaves]


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", [p for p in kernel_backends()], indirect=True)
def test_the_eager_path_gives_what_the_registered_op_gives(backend, op, grad, monkeypatch):
    monkeypatch.setattr(_eager, "DISPATCH_ALWAYS", True)
    registered = _run(op, grad)
    monkeypatch.setattr(_eager, "DISPATCH_ALWAYS", False)
    direct = _run(op, grad)
    assert len(direct) == len(registered)
    for i, (a, b) in enumerate(zip(direct, registered)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert not a.isnan().any(), f"output {i} holds NaN: an element was left unwritten"
        assert torch.equal(a, b), f"output {i} differs between the eager path and the registered op"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", [p for p in kernel_backends()], indirect=True)
def test_eager_calls_never_go_through_the_dispatcher(backend, op, monkeypatch):
    """The ops that mutate an argument (cross-entropy's in-place scaling of its gradient buffer) included: their
    direct call bumps the version counters as the registration would."""

    def refuse(*args):
        raise AssertionError("an eager call went through the registered op")

    ops = _kernel_ops()
    assert len(ops) == 13, sorted(ops)  # every fastlm::* op (a new one must be found here too)
    for kernel_op in ops.values():
        monkeypatch.setattr(kernel_op, "registered", refuse)
    _run(op, grad=True)


def _kernel_ops():
    """Every KernelOp the library defines, by its registered name (they are module globals of fastlm.ops.*)."""
    import importlib
    import pkgutil

    import fastlm.ops

    found = {}
    for info in pkgutil.iter_modules(fastlm.ops.__path__):
        module = importlib.import_module(f"fastlm.ops.{info.name}")
        for value in vars(module).values():
            if isinstance(value, _eager.KernelOp):
                found[value.registered.name()] = value
    return found


def test_what_must_see_the_operator_gets_it(monkeypatch):
    """Dispatch modes, tensor subclasses and mutating ops go through the registered op."""
    calls = []

    @_eager.custom_op("fastlm_test::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        calls.append("impl")
        return x * 2

    twice.register_fake(lambda x: torch.empty_like(x))
    twice.register_autograd(lambda ctx, g: g * 2)
    seen = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.ones(3, requires_grad=True)
    y = twice(x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0)) and not seen
    with Record():
        twice(torch.ones(3))
    assert "fastlm_test.twice.default" in seen
    assert calls == ["impl", "impl"]
    assert type(y.grad_fn).__name__ == "fastlm_test_twice_functionBackward"  # the eager path recorded it


def test_a_parameter_wrapping_a_tensor_subclass_gets_the_registered_op():
    from torch.testing._internal.two_tensor import TwoTensor

    plain = torch.nn.Parameter(torch.ones(2))
    wrapped = torch.nn.Parameter(TwoTensor(torch.ones(2), torch.ones(2)))
    assert _eager._plain((plain, 1.0, None))
    assert not _eager._plain((torch.ones(2), wrapped))  # a DTensor or quantized parameter looks like this


def test_a_mutating_op_bumps_the_version_counter_as_registered(monkeypatch):
    """A kernel writes through a pointer, which moves no version counter: the op's call must move it, on the direct
    path as the registration does, so that autograd refuses a backward through the overwritten values."""

    @_eager.custom_op("fastlm_test::add_one_", mutates_args=("x",))
    def add_one_(y: torch.Tensor, x: torch.Tensor) -> None:
        with torch.autograd._unsafe_preserve_version_counter(x):  # as a kernel's write: no bump of its own
            x.add_(1)

    for dispatch in (True, False):
        monkeypatch.setattr(_eager, "DISPATCH_ALWAYS", dispatch)
        x = torch.zeros(3)
        before = x._version
        with torch.no_grad():
            add_one_(torch.ones(1), x)
        assert torch.equal(x, torch.ones(3)) and x._version > before, dispatch
        out = torch.ones(3, requires_grad=True).exp()  # exp saves its output for its backward
        with torch.no_grad():
            add_one_(torch.ones(1), out)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.parametrize("backend", [p for p in kernel_backends()], indirect=True)
def test_jit_trace_records_the_registered_op(backend):
    g = generator()
    x, w = torch.randn(4, 32, generator=g), torch.randn(32, generator=g)
    traced = torch.jit.trace(lambda x, w: fastlm.rms_norm(x, w), (x, w))
    assert "fastlm::norm_fwd" in str(traced.graph)
    x2 = torch.randn(6, 32, generator=g)
    assert torch.equal(traced(x2, w), fastlm.rms_norm(x2, w))


@pytest.mark.parametrize("backend", [p for p in kernel_backends()], indirect=True)
def test_a_lazily_negated_view_is_read_negated(backend):
    """A tensor with its negative bit set holds its values unnegated; the direct path would hand the launchers the
    raw memory, so such a tensor goes to the registered op, whose dispatch materializes it."""
    base = torch.randn(4, 8, device=DEVICE)
    x = torch._neg_view(base)
    assert x.is_neg() and not _eager._plain((x,))
    torch.testing.assert_close(fastlm.rms_norm(x), fastlm.rms_norm(-base), rtol=0, atol=0)


_FIRST_CALL_COMPILED = """
import sys
import torch
import fastlm

def step(x, w, b, r, gate, up, q, k, v, cos, sin, logits, target, h, W):
    y, res = fastlm.layer_norm(x, w, b, residual=r)
    out = y.sum() + res.sum() + fastlm.rms_norm(x, w).sum()
    out = out + fastlm.swiglu(gate, up).sum() + fastlm.geglu(gate, up).sum()
    out = out + fastlm.rotary_embedding(q, cos, sin).sum() + fastlm.attention(q, k, v, causal=True).sum()
    return out + fastlm.cross_entropy(logits, target) + fastlm.linear_cross_entropy(h, W, target)

device = sys.argv[2]
leaf = lambda *shape, dtype=torch.float32: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
# the cuda backend's attention takes 16-bit inputs only (float32 on the CPU, for the interpreter)
half = torch.bfloat16 if device.startswith("cuda") else torch.float32
args = [leaf(4, 64), leaf(64), leaf(64), leaf(4, 64), leaf(4, 64), leaf(4, 64), leaf(1, 8, 4, 32, dtype=half),
        leaf(1, 8, 2, 32, dtype=half), leaf(1, 8, 2, 32, dtype=half), torch.randn(8, 32, device=device),
        torch.randn(8, 32, device=device), leaf(6, 50), torch.randint(0, 50, (6,), device=device), leaf(6, 24),
        leaf(50, 24)]
with fastlm.use_backend(sys.argv[1]):
    # inductor where it makes GPU code; on the CPU it would compile C++ for minutes, and the trace is the same
    backend = "inductor" if device.startswith("cuda") else "aot_eager"
    torch.compile(step, fullgraph=True, backend=backend)(*args).backward()
print("compiled")
"""


@pytest.mark.parametrize("backend", kernel_backends())
def test_an_op_first_called_inside_torch_compile(backend):
    """A fresh process whose first call of every op is inside torch.compile's trace (a model compiled before any
    eager step; inductor on a GPU, aot_eager on the CPU): the registered op must already be known, or Dynamo guards
    on its lazily set OpOverload and fails (it did, for rotary_embedding, in a compiled Llama step run alone). In
    the suite's own process an earlier test has always called the ops, so this runs in a fresh one."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FIRST_CALL_COMPILED, backend, str(DEVICE)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
