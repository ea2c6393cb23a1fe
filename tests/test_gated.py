"""SwiGLU and GeGLU: every backend, forward and both gradients, against the float64 reference by the tolerance rule
(PyTorch's own being the F.silu / F.gelu composition in the tested dtype); strides, the registered ops,
torch.compile and bad input."""

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import _cuda, reference
from conftest import BACKENDS, DEVICE, assert_by_rule, generator

CPU_DTYPES = (torch.float32, torch.float16)
ACTS = ("swiglu", "geglu_tanh", "geglu_none")
# (3, 5, 33): odd rows, not 16-byte aligned; (4, 256): aligned rows; (2, 4100): rows wider than a program's tile.
SHAPES = ((7,), (3, 5, 33), (4, 256), (2, 4100))


def _fastlm(act):
    if act == "swiglu":
        return fastlm.swiglu
    approximate = act.split("_")[1]
    return lambda g, u: fastlm.geglu(g, u, approximate=approximate)


def _reference(act):
    if act == "swiglu":
        return reference.swiglu
    approximate = act.split("_")[1]
    return lambda g, u: reference.geglu(g, u, approximate)


def _torch(act):
    """PyTorch's own, in the tested dtype: the unfused composition."""
    if act == "swiglu":
        return lambda g, u: F.silu(g) * u
    approximate = act.split("_")[1]
    return lambda g, u: F.gelu(g, approximate=approximate) * u


def _inputs(shape, dtype, seed=0):
    """Gates spread over both tails of the activations (σ → 0 and 1, tanh → ±1), up and dh around 1."""
    g = generator(seed)
    gate = (3 * torch.randn(shape, generator=g)).to(dtype)
    up = torch.randn(shape, generator=g).to(dtype)
    dh = torch.randn(shape, generator=g).to(dtype)
    return gate.to(DEVICE), up.to(DEVICE), dh.to(DEVICE)


def _run(fn, gate, up, dh):
    g = gate.detach().clone().requires_grad_()
    u = up.detach().clone().requires_grad_()
    h = fn(g, u)
    h.backward(dh)
    return h.detach(), g.grad, u.grad


def check_against_reference(act, gate, up, dh):
    h, dg, du = _run(_fastlm(act), gate, up, dh)
    ref = _run(_reference(act), gate.double(), up.double(), dh.double())
    theirs = _run(_torch(act), gate, up, dh)
    for name, out, r, t in zip(("h", "dgate", "dup"), (h, dg, du), ref, theirs):
        assert out.dtype == gate.dtype, f"{name}: dtype {out.dtype}, expected {gate.dtype}"
        assert_by_rule(name, out, r, t)
    return h


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_matches_reference(backend, act, shape, dtype):
    h = check_against_reference(act, *_inputs(shape, dtype))
    assert h.shape == shape and h.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("act", ACTS)
def test_tails(backend, act):
    # Far out on both sides, where σ(g) or 1 − σ(g) underflows and tanh rounds to ±1: no overflow, no NaN.
    gate = torch.tensor([-1e4, -200.0, -88.0, -30.0, -9.0, -0.3, -1e-20, 0.0, 1e-20, 0.3, 9.0, 30.0, 88.0, 200.0, 1e4],
                        device=DEVICE)
    up = torch.linspace(-2, 2, gate.numel(), device=DEVICE)
    h = check_against_reference(act, gate, up, torch.ones_like(gate))
    assert torch.isfinite(h).all()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("act", ACTS)
def test_strided_inputs(backend, act):
    # The halves of a fused gate-up projection: rows of stride 2N, read in place.
    fused, _, dh = _inputs((3, 4, 2 * 40), torch.float32, seed=1)
    gate, up = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    check_against_reference(act, gate, up, dh[..., :40])
    # A transposed gate (column stride ≠ 1: copied) with a contiguous up.
    g2, u2, d2 = _inputs((24, 16), torch.float32, seed=2)
    check_against_reference(act, g2.t().contiguous().t(), u2, d2)
    # up broadcast along the rows (row stride 0); its gradient sums the rows.
    g3, u3, d3 = _inputs((5, 48), torch.float32, seed=3)
    check_against_reference(act, g3, u3[:1].expand(5, 48), d3)
    # Leading dimensions that do not collapse to one row stride (copied), next to a contiguous up.
    g4, u4, d4 = _inputs((3, 4, 40), torch.float32, seed=4)
    swapped = g4.transpose(0, 1).contiguous().transpose(0, 1)
    assert fastlm._util.row_stride(swapped) is None
    check_against_reference(act, swapped, u4, d4)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("act", ACTS)
def test_only_some_gradients(backend, act):
    gate, up, dh = _inputs((4, 64), torch.float32, seed=4)
    for frozen in ("gate", "up"):
        leaves = [t.detach().clone().requires_grad_(name != frozen) for name, t in (("gate", gate), ("up", up))]
        exact = [t.double().requires_grad_(name != frozen) for name, t in (("gate", gate), ("up", up))]
        theirs = [t.detach().clone().requires_grad_(name != frozen) for name, t in (("gate", gate), ("up", up))]
        _fastlm(act)(*leaves).backward(dh)
        _reference(act)(*exact).backward(dh.double())
        _torch(act)(*theirs).backward(dh)
        for name, ours, ref, t in zip(("dgate", "dup"), leaves, exact, theirs):
            assert (ours.grad is None) == (name == "d" + frozen)
            if ours.grad is not None:
                assert_by_rule(name, ours.grad, ref.grad, t.grad)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_empty(backend):
    for shape in ((0, 8), (3, 0), (0,)):
        g = torch.randn(shape, device=DEVICE, requires_grad=True)
        h = fastlm.swiglu(g, torch.randn(shape, device=DEVICE))
        assert h.shape == shape
        h.sum().backward()
        assert g.grad.shape == shape


def test_scalar_and_meta():
    g, u = torch.tensor(1.5), torch.tensor(-2.0)
    torch.testing.assert_close(fastlm.swiglu(g, u), F.silu(g) * u)
    m = fastlm.geglu(torch.empty(4, 8, device="meta"), torch.empty(4, 8, device="meta"))
    assert m.shape == (4, 8) and m.device.type == "meta"


# --- registered ops, torch.compile ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("activation", ("silu", "gelu_tanh", "gelu"))
def test_opcheck(backend, activation):
    gate, up, dh = _inputs((4, 40), torch.float32, seed=5)
    torch.library.opcheck(torch.ops.fastlm.gated_fwd.default,
                          (gate.requires_grad_(), up.requires_grad_(), activation, backend))
    torch.library.opcheck(torch.ops.fastlm.gated_bwd.default,
                          (dh, gate.detach(), up.detach(), activation, backend))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_compiles_without_graph_breaks(backend):
    import torch._dynamo

    torch._dynamo.reset()

    def mlp(x, w):
        gate, up = (x @ w).chunk(2, dim=-1)
        return fastlm.swiglu(gate, up) + fastlm.geglu(gate, up, approximate="none")

    x = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, 64, device=DEVICE)
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    y = compiled(x, w)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ey = mlp(x, w)
    ey.sum().backward()
    torch.testing.assert_close(y, ey)
    torch.testing.assert_close(gx, x.grad)


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", (fastlm.swiglu, fastlm.geglu), ids=("swiglu", "geglu"))
def test_bad_input(fn):
    g = torch.randn(4, 8)
    with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
        fn([1.0], g)
    with pytest.raises(TypeError, match="up must be a floating-point tensor"):
        fn(g, torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="up must have shape \\(4, 8\\)"):
        fn(g, torch.randn(4, 9))
    with pytest.raises(TypeError, match="up must have gate's dtype"):
        fn(g, g.half())
    with pytest.raises(ValueError, match="up is on meta"):
        fn(g, torch.randn(4, 8, device="meta"))


def test_bad_approximate():
    with pytest.raises(ValueError, match="approximate must be one of"):
        fastlm.geglu(torch.randn(2), torch.randn(2), approximate="erf")


# --- the CUDA launchers without a GPU ---------------------------------------------------------------------------------

built = pytest.mark.skipif(not _cuda.build_info()["built"], reason="fastlm._C is not built")
without_gpu = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="a CUDA GPU is visible: this checks the GPU-less path")


@built
@without_gpu
def test_launchers_check_the_device_before_any_pointer():
    # Every argument of the bindings, dummy pointers (null and bogus) on purpose: the device check comes first.
    from fastlm import _C

    M, N, bf16, silu = 4, 64, 2, 0
    for p in (0, 0x1000):
        for call in (lambda: _C.gated_fwd(p, N, p, N, p, N, M, N, bf16, silu, 0, 0),
                     lambda: _C.gated_bwd(p, N, p, N, p, N, p, N, p, N, M, N, bf16, silu, 0, 0)):
            with pytest.raises(RuntimeError, match="no CUDA device is visible"):
                call()
    assert _C.gated_fwd.__doc__ and _C.gated_bwd.__doc__


@without_gpu
def test_cuda_launchers_without_gpu_raise():
    gate, up = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="fastlm's cuda backend cannot run"):
        _cuda.gated_fwd(gate, up, "silu")
    with pytest.raises(RuntimeError, match="fastlm's cuda backend cannot run"):
        _cuda.gated_bwd(gate, gate, up, "gelu_tanh")


# --- GPU only: bf16, huge tensors -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", ((4096, 11008), (8192, 14336 // 8 + 3)), ids=str)
def test_gpu_bf16(backend, act, shape):
    check_against_reference(act, *_inputs(shape, torch.bfloat16, seed=6))
    fused, _, dh = _inputs((shape[0], 2 * shape[1]), torch.bfloat16, seed=7)
    check_against_reference(act, *fused.chunk(2, dim=-1), dh[:, :shape[1]])


@pytest.mark.gpu
@pytest.mark.large_memory
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("layout", ("contiguous", "fused"))
def test_gpu_over_2_31_elements(backend, layout):
    # 2^31 + 2^16 elements of each operand: any 32-bit offset overflows. Contiguous operands are walked as one row
    # (64-bit columns); the halves of a fused projection as rows of stride 2N (64-bit row offsets). The last rows
    # are compared with the reference.
    M, N = (1 << 15) + 1, 1 << 16
    if layout == "contiguous":
        leaf = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gate, up = leaf, torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    else:
        leaf = torch.randn(M, 2 * N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gate, up = leaf.chunk(2, dim=-1)
    h = fastlm.swiglu(gate, up)
    tail = slice(M - 3, M)
    g, u = gate[tail].detach(), up[tail].detach()
    assert_by_rule("h[last rows]", h[tail], reference.swiglu(g.double(), u.double()), F.silu(g) * u)
    h.backward(torch.ones_like(h))
    ref = g.double().requires_grad_()
    reference.swiglu(ref, u.double()).sum().backward()
    t = g.clone().requires_grad_()
    (F.silu(t) * u).sum().backward()
    assert_by_rule("dgate[last rows]", leaf.grad[tail, :N], ref.grad, t.grad)
    del leaf, gate, up, h
    torch.cuda.empty_cache()
