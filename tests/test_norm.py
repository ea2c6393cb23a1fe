"""LayerNorm and RMSNorm: every backend, forward and all gradients, against the float64 reference by the
tolerance rule; shapes, strides, the drop-in modules, the registered ops and bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import reference
from conftest import BACKENDS, DEVICE, assert_by_rule, generator, seeded, simulated_runs

NS = (1, 7, 97, 1000, 4097, 65536)
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FEATURES = ("plain", "affine", "affine+residual")


def _inputs(shape, dtype, features, is_rms, wdtype=None, seed=0):
    """Fresh random inputs (never constant); weight around 1 and bias around 0, as trained models have them.
    `seed` is the draw's offset under FASTLM_TEST_SEED (conftest.seeded): distinct draws in a test, distinct offsets."""
    g = generator(seed)
    N = shape[-1]
    wdtype = wdtype or dtype
    x = torch.randn(shape, generator=g).to(dtype)
    weight = bias = residual = None
    if features != "plain":
        weight = (1 + 0.5 * torch.randn(N, generator=g)).to(wdtype)
        if not is_rms:
            bias = (0.5 * torch.randn(N, generator=g)).to(wdtype)
    if features == "affine+residual":
        residual = torch.randn(shape, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    dres = torch.randn(shape, generator=g).to(dtype) if residual is not None else None
    to = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    return to(x), to(weight), to(bias), to(residual), to(dy), to(dres)


def _run(fn, x, weight, bias, residual, dy, dres, **kw):
    """Call fn with leaf copies of the inputs, backprop dy (and dres into residual_out); outputs and grads."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias, residual)]
    out = fn(*leaves, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    grads_in = (dy, dres)[: len(outs)]
    torch.autograd.backward(outs, grads_in)
    return [o.detach() for o in outs], [t.grad if t is not None else None for t in leaves]


def _fastlm(is_rms, eps, offset):
    if is_rms:
        return lambda x, w, b, r: fastlm.rms_norm(x, w, eps=eps, residual=r, offset=offset)
    return lambda x, w, b, r: fastlm.layer_norm(x, w, b, eps=eps, residual=r)


def _reference(is_rms, eps, offset):
    if is_rms:
        return lambda x, w, b, r: reference.rms_norm(x, w, eps, r, offset)
    return lambda x, w, b, r: reference.layer_norm(x, w, b, eps, r)


def _torch(is_rms, eps, offset):
    """PyTorch's own implementation in the tested dtype: the unfused add, then F.layer_norm / F.rms_norm with
    the weight in x's dtype (torch's composite rms_norm would promote a float32 weight's output to float32)."""

    def fn(x, w, b, r):
        v = x + r if r is not None else x
        wt = w.to(x.dtype) if w is not None else None
        bt = b.to(x.dtype) if b is not None else None
        if is_rms:
            y = F.rms_norm(v, v.shape[-1:], (offset + wt) if wt is not None else None, eps)
        else:
            y = F.layer_norm(v, v.shape[-1:], wt, bt, eps)
        return (y, v) if r is not None else y

    return fn


def check_against_reference(x, weight, bias, residual, dy, dres, is_rms, eps=1e-5, offset=0.0):
    outs, grads = _run(_fastlm(is_rms, eps, offset), x, weight, bias, residual, dy, dres)
    up = lambda t: t.double() if t is not None else None  # noqa: E731
    ref_outs, ref_grads = _run(_reference(is_rms, eps, offset), up(x), up(weight), up(bias), up(residual),
                               up(dy), up(dres))
    t_outs, t_grads = _run(_torch(is_rms, eps, offset), x, weight, bias, residual, dy, dres)
    # PyTorch's computation again under simulated rounding: its error, sampled (conftest, docs/TOLERANCE.md).
    sims = simulated_runs(lambda: _run(_torch(is_rms, eps, offset), x, weight, bias, residual, dy, dres))
    for i, (name, o, r, t) in enumerate(zip(("y", "residual_out"), outs, ref_outs, t_outs)):
        assert_by_rule(name, o, r, t, samples=[s[0][i] for s in sims])
    for i, (name, gr, r, t) in enumerate(zip(("dx", "dweight", "dbias", "dresidual"), grads, ref_grads, t_grads)):
        assert (gr is None) == (r is None), f"{name}: present {gr is not None}, expected {r is not None}"
        if gr is not None:
            assert gr.dtype == (weight.dtype if name in ("dweight", "dbias") else x.dtype)
            assert_by_rule(name, gr, r, t.to(gr.dtype), samples=[s[1][i].to(gr.dtype) for s in sims])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("is_rms", (False, True), ids=("layer_norm", "rms_norm"))
def test_matches_reference(backend, is_rms, N, dtype, features):
    shape = (2, 3, N) if N < 65536 else (2, 2, N)
    # Half-precision activations with float32 parameters, the mixed-precision training layout, in the fused case.
    wdtype = torch.float32 if features == "affine+residual" and dtype != torch.float32 else dtype
    offset = 1.0 if is_rms and features == "affine+residual" else 0.0
    check_against_reference(*_inputs(shape, dtype, features, is_rms, wdtype), is_rms=is_rms, offset=offset)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("N", (97, 5000, 9000))
@pytest.mark.parametrize("is_rms", (False, True), ids=("layer_norm", "rms_norm"))
def test_many_rows_and_one_row(backend, is_rms, N):
    # Many rows: each backward program accumulates the weight gradient over many rows (the chunked path, N > 8192,
    # through its partial buffer); one row: a single program.
    rows = 300 if N < 8192 else 20
    check_against_reference(*_inputs((rows, N), torch.float32, "affine+residual", is_rms), is_rms=is_rms)
    check_against_reference(*_inputs((1, N), torch.float16, "affine", is_rms, seed=1), is_rms=is_rms)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("is_rms", (False, True), ids=("layer_norm", "rms_norm"))
@pytest.mark.parametrize("view", ("strided", "expanded"))
def test_strided_and_expanded_parameters(backend, is_rms, view):
    """A weight or bias that is a view (every other element; one value expanded) gives exactly what its contiguous
    copy gives, forward and backward (the kernels read parameters at unit stride: a view was read wrongly)."""
    N = 24
    x = torch.randn(5, N, device=DEVICE, requires_grad=True)
    bases = [torch.randn(2 * N if view == "strided" else 1, device=DEVICE, requires_grad=True)
             for _ in range(1 if is_rms else 2)]
    views = [b[::2] if view == "strided" else b.expand(N) for b in bases]
    copies = [v.detach().clone().requires_grad_() for v in views]
    op = (lambda x, p: fastlm.rms_norm(x, p[0])) if is_rms else (lambda x, p: fastlm.layer_norm(x, p[0], p[1]))
    dy = torch.randn(5, N, device=DEVICE)
    out = op(x, views)
    out.backward(dy)
    dx = x.grad.clone()
    x.grad = None
    expected = op(x, copies)
    expected.backward(dy)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(dx, x.grad, rtol=0, atol=0)
    for base, leaf in zip(bases, copies):
        want = torch.zeros_like(base)
        if view == "strided":
            want[::2] = leaf.grad
        else:
            want = leaf.grad.sum().reshape(1)
        torch.testing.assert_close(base.grad, want)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("is_rms", (False, True), ids=("layer_norm", "rms_norm"))
def test_non_contiguous_inputs(backend, is_rms):
    x, weight, bias, residual, dy, dres = _inputs((6, 200), torch.float32, "affine+residual", is_rms)
    wide = torch.randn(6, 260, device=DEVICE)
    wide[:, :200] = x
    padded_rows = wide[:, :200]  # row stride 260: taken as is
    transposed = x.t().contiguous().t()  # column stride 6: copied
    for xv in (padded_rows, transposed):
        assert not xv.is_contiguous()
        check_against_reference(xv, weight, bias, residual, dy, dres, is_rms=is_rms)
    check_against_reference(x, weight, bias, residual.t().contiguous().t(), dy.t().contiguous().t(), dres,
                            is_rms=is_rms)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("is_rms", (False, True), ids=("layer_norm", "rms_norm"))
def test_three_dimensional_layouts(backend, is_rms):
    """(batch, seq, N) inputs go to the launchers in their own shape: a row slice of a wider tensor whose leading
    dimensions collapse (read in place at its row stride), leading dimensions that do not collapse (copied), and
    dimensions of size 1 with arbitrary strides. The outputs come back in x's shape."""
    x, weight, bias, residual, dy, dres = _inputs((2, 3, 40), torch.float32, "affine+residual", is_rms)
    wide = torch.randn(2, 3, 56, device=DEVICE)
    wide[..., :40] = x
    sliced = wide[..., :40]
    swapped = x.transpose(0, 1).contiguous().transpose(0, 1)
    odd_unit = torch.randn(1, 6, 1, 40, device=DEVICE).as_strided((1, 6, 1, 40), (7, 40, 3, 1))
    assert fastlm._util.row_stride(sliced) == 56 and fastlm._util.row_stride(swapped) is None
    for xv, r, g in ((sliced, residual, dy), (swapped, residual.transpose(0, 1).contiguous().transpose(0, 1), dy),
                     (x, residual, dy.transpose(0, 1).contiguous().transpose(0, 1))):
        check_against_reference(xv, weight, bias, r, g, dres, is_rms=is_rms)
    shape4 = odd_unit.shape
    check_against_reference(odd_unit, weight, bias, residual.reshape(shape4), dy.reshape(shape4),
                            dres.reshape(shape4), is_rms=is_rms)


def test_row_stride():
    """Which tensors the row kernels read as rows in place, and at which stride."""
    row_stride = fastlm._util.row_stride
    assert row_stride(torch.empty(4, 8)) == 8
    assert row_stride(torch.empty(2, 3, 8)) == 8
    assert row_stride(torch.empty(2, 3, 16)[..., :8]) == 16
    assert row_stride(torch.empty(5, 16)[:, :8].unsqueeze(0)) == 16
    assert row_stride(torch.empty(8).expand(5, 8)) == 0
    assert row_stride(torch.empty(1, 8).expand(2, 3, 8)) == 0
    assert row_stride(torch.empty(8)) == 8
    assert row_stride(torch.empty(3, 2, 8).transpose(0, 1)) is None  # leading dimensions do not collapse
    assert row_stride(torch.empty(8, 4).t()) is None  # strided along the row
    assert row_stride(torch.empty(4, 1).expand(4, 8)) is None


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_large_magnitudes_and_eps(backend):
    # A large common offset: E[x²] − E[x]² would cancel catastrophically; the kernels' statistics must not.
    x, weight, bias, residual, dy, dres = _inputs((4, 9000), torch.float32, "affine", False)
    check_against_reference(x + 1000.0, weight, bias, residual, dy, dres, is_rms=False, eps=0.0)
    x, weight, bias, residual, dy, dres = _inputs((4, 700), torch.float32, "affine", False, seed=1)
    check_against_reference(x * 1e-3 + 50.0, weight, bias, residual, dy, dres, is_rms=False, eps=1e-2)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_zero_rows(backend):
    x = torch.randn(0, 3, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    y = fastlm.rms_norm(x, w)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_only_some_gradients(backend):
    # Frozen weight, gradient only for x; and a graph where only residual_out is used downstream.
    x, weight, bias, residual, dy, dres = _inputs((5, 300), torch.float32, "affine+residual", False)
    xr = x.clone().requires_grad_()
    y = fastlm.layer_norm(xr, weight, bias)
    y.backward(dy)
    ref_x = x.double().requires_grad_()
    reference.layer_norm(ref_x, weight.double(), bias.double()).backward(dy.double())
    assert torch.allclose(xr.grad.double(), ref_x.grad, atol=1e-5)
    xr.grad = None
    _, res_out = fastlm.layer_norm(xr, weight, bias, residual=residual)
    res_out.backward(dres)
    assert torch.allclose(xr.grad, dres, atol=0)
    # With y unused, the weight and bias are off the gradient's path: None, as in PyTorch's own composition (an
    # optimizer skips a None gradient; a zero one would still move the parameter through momentum or decay).
    w, b, r = (t.clone().requires_grad_() for t in (weight, bias, residual))
    xr.grad = None
    _, res_out = fastlm.layer_norm(xr, w, b, residual=r)
    res_out.backward(dres)
    assert w.grad is None and b.grad is None
    assert torch.equal(xr.grad, dres) and torch.equal(r.grad, dres)


# --- drop-in modules -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(elementwise_affine=False), dict(bias=False), dict(eps=1e-3)],
    ids=("default", "no-affine", "no-bias", "eps"),
)
def test_layernorm_module_is_drop_in(backend, kwargs):
    torch.manual_seed(seeded(1))
    ours = fastlm.nn.LayerNorm((4, 32), **kwargs).to(DEVICE)
    theirs = torch.nn.LayerNorm((4, 32), **kwargs).to(DEVICE)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    x = torch.randn(3, 5, 4, 32, device=DEVICE)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    theirs.load_state_dict(ours.state_dict())
    y, res = ours(x, residual=x)
    torch.testing.assert_close(y, theirs(x + x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res, x + x)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("eps", (None, 1e-6))
@pytest.mark.parametrize("affine", (True, False))
def test_rmsnorm_module_is_drop_in(backend, eps, affine):
    torch.manual_seed(seeded(2))
    ours = fastlm.nn.RMSNorm(48, eps=eps, elementwise_affine=affine).to(DEVICE)
    theirs = torch.nn.RMSNorm(48, eps=eps, elementwise_affine=affine).to(DEVICE)
    if affine:
        with torch.no_grad():
            theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(7, 48, device=DEVICE)
    torch.testing.assert_close(ours(x), theirs(x))
    # In half precision torch rounds along the way and fastlm once at the end: judge both by the rule.
    exact = copy.deepcopy(theirs).double()(x.double())
    half = theirs.half()
    assert_by_rule("y fp16", ours.half()(x.half()), exact, half(x.half()),
                   samples=simulated_runs(lambda: half(x.half()).detach()))


def test_gemma_offset_module():
    m = fastlm.nn.RMSNorm(16, offset=1.0)
    with torch.no_grad():
        m.weight.normal_()
    x = torch.randn(3, 16)
    torch.testing.assert_close(m(x), reference.rms_norm(x, m.weight, torch.finfo(x.dtype).eps, offset=1.0))
    assert "offset=1.0" in repr(m)


# --- registered ops, torch.compile ----------------------------------------------------------------------------------


def _op_args(is_rms, backend):
    x, weight, bias, residual, _, _ = _inputs((4, 96), torch.float32, "affine+residual", is_rms)
    return (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_() if bias is not None else None,
            residual.requires_grad_(), 1e-5, is_rms, 0.0, backend)


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("is_rms", (False, True), ids=("layer_norm", "rms_norm"))
def test_opcheck(backend, is_rms):
    # torch.library's own check: schema, fake (meta) implementation, autograd registration, no aliasing.
    torch.library.opcheck(torch.ops.fastlm.norm_fwd.default, _op_args(is_rms, backend))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_compiles_without_graph_breaks(backend):
    import torch._dynamo

    torch._dynamo.reset()
    norm1 = fastlm.nn.RMSNorm(64, offset=1.0).to(DEVICE)
    norm2 = fastlm.nn.LayerNorm(64).to(DEVICE)

    def block(x, h):
        y, h = norm1(x, residual=h)
        return norm2(torch.relu(y) * 2, residual=h)

    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    h = torch.randn(4, 64, device=DEVICE)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y, res = compiled(x, h)
    (y.sum() + res.sum()).backward()
    ey, eres = block(x.detach(), h)
    torch.testing.assert_close(y, ey)
    torch.testing.assert_close(res, eres)


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", (fastlm.layer_norm, fastlm.rms_norm), ids=("layer_norm", "rms_norm"))
def test_bad_input(fn):
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        fn(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fn([[1.0, 2.0]])
    with pytest.raises(ValueError, match="weight must have shape \\(8,\\)"):
        fn(x, torch.ones(7))
    with pytest.raises(ValueError, match="weight is on meta"):
        fn(x, torch.ones(8, device="meta"))
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        fn(x.half(), torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="residual must have shape \\(4, 8\\)"):
        fn(x, residual=torch.randn(4, 9))
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        fn(x, residual=torch.randn(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="eps must be a finite number ≥ 0"):
        fn(x, eps=-1e-5)
    with pytest.raises(ValueError, match="last dimension of size ≥ 1"):
        fn(torch.randn(4, 0))
    with pytest.raises(ValueError, match="last dimension"):
        fn(torch.tensor(1.0))


def test_bias_dtype_must_match_weight():
    with pytest.raises(TypeError, match="weight and bias must have the same dtype"):
        fastlm.layer_norm(torch.randn(2, 8).half(), torch.ones(8), torch.zeros(8).half())


# --- GPU only: bf16 at scale, huge tensors, CUDA graphs, inductor -------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("N", (512, 4096, 8192, 16384, 65536))
@pytest.mark.parametrize("is_rms", (False, True), ids=("layer_norm", "rms_norm"))
def test_gpu_bf16_large(backend, is_rms, N):
    rows = max(1, (1 << 24) // N)
    check_against_reference(*_inputs((rows, N), torch.bfloat16, "affine+residual", is_rms, torch.float32),
                            is_rms=is_rms, offset=1.0 if is_rms else 0.0)


@pytest.mark.gpu
@pytest.mark.large_memory
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("is_rms", (False, True), ids=("layer_norm", "rms_norm"))
def test_gpu_over_2_31_elements(backend, is_rms):
    # 32768 × 65537 > 2^31 elements: any 32-bit offset overflows. Compare the last rows to the reference.
    M, N = 32768, 65537
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    y = fastlm.rms_norm(x, w) if is_rms else fastlm.layer_norm(x, w)
    tail = slice(M - 4, M)
    ref = reference.rms_norm(x[tail].double(), w.double(), 1e-6) if is_rms else reference.layer_norm(
        x[tail].double(), w.double())
    t = F.rms_norm(x[tail], (N,), w, 1e-6) if is_rms else F.layer_norm(x[tail], (N,), w)
    assert_by_rule("y[last rows]", y[tail], ref, t)
    del x, y
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
def test_gpu_cuda_graph_capture(backend):
    norm = fastlm.nn.RMSNorm(1024).cuda()
    x = torch.randn(64, 1024, device="cuda", requires_grad=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            norm(x).sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = norm(x)
        y.sum().backward()
    x.data.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, reference.rms_norm(x.detach(), norm.weight.detach(), torch.finfo(x.dtype).eps))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
def test_gpu_inductor_fullgraph(backend):
    import torch._dynamo

    torch._dynamo.reset()
    norm = fastlm.nn.LayerNorm(256).cuda()
    f = torch.compile(lambda x, h: norm(x, residual=h), fullgraph=True)
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    h = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    y, r = f(x, h)
    y.float().sum().backward()
    ey, er = norm(x.detach(), residual=h)
    torch.testing.assert_close(y, ey)
    torch.testing.assert_close(r, er)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_float32_bias_without_weight(backend):
    # The functional form allows a bias alone; its gradient keeps the bias's dtype, not x's.
    x, _, _, _, dy, _ = _inputs((3, 40), torch.float16, "plain", False)
    b = torch.randn(40, device=DEVICE, requires_grad=True)
    fastlm.layer_norm(x, None, b).backward(dy)
    assert b.grad.dtype == torch.float32
    torch.testing.assert_close(b.grad, dy.float().sum(0), rtol=1e-3, atol=1e-3)


# --- the backward's launch configurations (issue 15) -----------------------------------------------------------------


def _bwd_branch_shapes():
    """(rows, N, dtype) hitting each branch of the Triton backward's launch table: rows packed BLOCK_M to a program
    (several tiles a program, the last one partial), one row a tile at 8 and 16 warps, the widest fused row (two
    stages), the first wide row (row statistics, then column programs over several row ranges, the last shorter and
    its column block partial); 16- and 32-bit elements, whose tiles differ."""
    from fastlm.kernels import norm as triton_norm

    shapes = []
    for dtype in (torch.float16, torch.float32):
        elem = torch.finfo(dtype).bits // 8
        widest = triton_norm.BWD_MAX_FUSED_N[elem]
        seen = set()
        for n in (3, 40, 300, 1500, 2100, 4000, widest):
            config = triton_norm._bwd_fused_config(n, elem)
            if config[1:] in seen and n != widest:
                continue
            seen.add(config[1:])
            block_m = config[0]
            # More tiles than the programs (4 SMs under the interpreter) take at once, and a partial last tile.
            shapes.append((block_m * 2 * 8 * 3 + 1 if block_m > 1 else 37, n, dtype))
        shapes.append((37, widest + 1, dtype))
    return shapes


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("rows,N,dtype", _bwd_branch_shapes(), ids=lambda p: str(p).replace("torch.", ""))
@pytest.mark.parametrize("is_rms", (False, True), ids=("layer_norm", "rms_norm"))
def test_backward_launch_branches(backend, is_rms, rows, N, dtype):
    wdtype = torch.float32 if dtype != torch.float32 else dtype
    check_against_reference(*_inputs((rows, N), dtype, "affine+residual", is_rms, wdtype, seed=3), is_rms=is_rms,
                            offset=1.0 if is_rms else 0.0)


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("N", (300, 9000), ids=("fused", "wide"))
@pytest.mark.parametrize("is_rms", (False, True), ids=("layer_norm", "rms_norm"))
def test_backward_without_weight_or_residual(backend, is_rms, N):
    # HAS_W, HAS_DW, HAS_DB and HAS_DRES off in both backward paths; then a bias alone (HAS_DB without HAS_DW).
    x, _, _, _, dy, _ = _inputs((21, N), torch.float32, "plain", is_rms, seed=4)
    check_against_reference(x, None, None, None, dy, None, is_rms=is_rms)
    if not is_rms:
        b = (0.5 * torch.randn(N, generator=generator(5))).to(DEVICE)

        def grads(fn, x, b):
            x, b = x.clone().requires_grad_(), b.clone().requires_grad_()
            fn(x, b).backward(dy.to(x.dtype))
            return x.grad, b.grad

        out = grads(lambda x, b: fastlm.layer_norm(x, None, b), x, b)
        ref = grads(lambda x, b: reference.layer_norm(x, None, b), x.double(), b.double())
        torch_fn = lambda: grads(lambda x, b: F.layer_norm(x, (N,), None, b), x, b)  # noqa: E731
        sims = simulated_runs(torch_fn)
        for i, name in enumerate(("dx", "dbias")):
            assert_by_rule(name, out[i], ref[i], torch_fn()[i], samples=[s[i] for s in sims])


def test_backward_static_report_covers_the_launch_table():
    """The static report's norm variants (its recorder, on the launchers over benchmarks/static.py's call shapes)
    include every backward config the launcher can pick (so the report checks every shipped config for spills):
    each fused config for every row width up to the threshold, per element size, and the wide-row kernels."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fastlm.kernels import norm as triton_norm

    repo = Path(__file__).resolve().parent.parent
    code = ("import json; from benchmarks import static; print(json.dumps([[v.fn.__name__, v.signature['DY'], "
            "v.constexprs, v.num_warps] for v in static.record(static._launch_norm) "
            "if v.fn.__name__ in ('_norm_bwd_kernel', '_norm_bwd_cols_kernel')]))")
    # Recording needs compiled @triton.jit functions: a fresh Python without the interpreter.
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="0"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    recorded = json.loads(proc.stdout.splitlines()[-1])
    for dt, elem in (("*bf16", 2), ("*fp32", 4)):
        fused = {(c["BLOCK_M"], c["BLOCK_N"], w, c["NUM_STAGES"]) for name, d, c, w in recorded
                 if name == "_norm_bwd_kernel" and d == dt and c["IS_RMS"] and c["HAS_W"] and c["HAS_DRES"]}
        picked = set()
        for n in range(1, triton_norm.BWD_MAX_FUSED_N[elem] + 1):
            bm, bn, nw, per_sm, st = triton_norm._bwd_fused_config(n, elem)
            assert bm * bn >= n and (bm & (bm - 1)) == 0 and per_sm >= 1 and 2 <= st <= triton_norm.BWD_MAX_STAGES
            picked.add((bm, bn, nw, st))
        assert picked == fused
        bn, nw, st = triton_norm._bwd_cols_config(elem)
        assert any(name == "_norm_bwd_cols_kernel" and d == dt and (c["BLOCK_N"], w, c["NUM_STAGES"]) == (bn, nw, st)
                   for name, d, c, w in recorded)
