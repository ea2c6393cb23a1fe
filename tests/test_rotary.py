"""Rotary position embedding: every backend, forward and gradient, against the float64 reference by the tolerance
rule (PyTorch's own being the eager composition in the tested dtype, Hugging Face's for rotate-half); both layouts,
both conventions, partial rotary, every form and stride of the tables, the registered op, torch.compile and bad
input."""

import pytest
import torch

import fastlm
from fastlm import _cuda, reference
from conftest import BACKENDS, DEVICE, assert_by_rule, generator

CPU_DTYPES = (torch.float32, torch.float16)
# (head_dim, rot, table form): full, partial, a rotation narrower than a 16-byte access, a wider head.
CASES = ((16, 16, "seq"), (24, 8, "batch"), (10, 6, "batch1"), (64, 64, "batch"))


def _table(batch, seqlen, rot, interleaved, form, seed=0, dtype=torch.float32):
    """Real rotary tables: angles position·10000^(−2i/rot), full width (rotate-half: cat(freqs, freqs); interleaved:
    each frequency twice in a row). form "seq": (seq, rot); "batch1": (1, seq, rot); "batch": (batch, seq, rot),
    each sequence at its own random offset (as packed or left-padded batches have)."""
    inv = 1.0 / 10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    rows = batch if form == "batch" else 1
    start = torch.randint(0, 1000, (rows, 1), generator=generator(seed)).double()
    freqs = (start + torch.arange(seqlen, dtype=torch.float64))[..., None] * inv  # (rows, seq, rot/2)
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    if form == "seq":
        cos, sin = cos[0], sin[0]
    return cos.to(DEVICE), sin.to(DEVICE)


def _x(batch, seqlen, heads, head_dim, heads_first, dtype, seed=0):
    shape = (batch, heads, seqlen, head_dim) if heads_first else (batch, seqlen, heads, head_dim)
    g = generator(seed)
    return torch.randn(shape, generator=g).to(dtype).to(DEVICE), torch.randn(shape, generator=g).to(dtype).to(DEVICE)


def _torch(x, cos, sin, interleaved, heads_first):
    """PyTorch's own, in x's dtype: the eager composition Hugging Face's models write (tables cast to x's dtype)."""
    rot = cos.shape[-1]
    c = cos.to(x.dtype).unsqueeze(-3 if heads_first else -2)
    s = sin.to(x.dtype).unsqueeze(-3 if heads_first else -2)
    xr = x[..., :rot]
    if interleaved:
        rotated = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((xr * c + rotated * s, x[..., rot:]), dim=-1)


def _run(fn, x, dy):
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf)
    out.backward(dy)
    return out.detach(), leaf.grad


def check_against_reference(x, cos, sin, dy, interleaved=False, heads_first=False):
    out, dx = _run(lambda v: fastlm.rotary_embedding(v, cos, sin, interleaved=interleaved, heads_first=heads_first),
                   x, dy)
    ref = _run(lambda v: reference.rotary_embedding(v, cos.double(), sin.double(), interleaved, heads_first),
               x.double(), dy.double())
    theirs = _run(lambda v: _torch(v, cos, sin, interleaved, heads_first), x, dy)
    assert out.is_contiguous()  # (dx follows the leaf's strides: autograd's gradient layout contract)
    assert_by_rule("out", out, ref[0], theirs[0])
    assert_by_rule("dx", dx, ref[1], theirs[1])
    rot = cos.shape[-1]
    assert torch.equal(out[..., rot:], x[..., rot:]), "the features past rot must pass through unchanged"
    assert torch.equal(dx[..., rot:], dy[..., rot:])
    return out, dx


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("heads_first", (False, True), ids=("bshd", "bhsd"))
@pytest.mark.parametrize("interleaved", (False, True), ids=("half", "interleaved"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}-rot{c[1]}-{c[2]}")
def test_matches_reference(backend, case, interleaved, heads_first, dtype):
    head_dim, rot, form = case
    x, dy = _x(2, 5, 3, head_dim, heads_first, dtype)
    cos, sin = _table(2, 5, rot, interleaved, form)
    check_against_reference(x, cos, sin, dy, interleaved, heads_first)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("interleaved", (False, True), ids=("half", "interleaved"))
def test_tables_in_x_dtype(backend, interleaved):
    # Hugging Face hands the tables over in the activations' dtype.
    x, dy = _x(2, 7, 2, 32, True, torch.float16, seed=1)
    cos, sin = _table(2, 7, 32, interleaved, "batch", seed=1, dtype=torch.float16)
    check_against_reference(x, cos, sin, dy, interleaved, heads_first=True)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("interleaved", (False, True), ids=("half", "interleaved"))
def test_any_table_exact_transpose(backend, interleaved):
    # Tables that are not rotations (cos_p ≠ cos_q, random values): the output is still x·cos + rotate(x)·sin per
    # feature, and the gradient the exact transpose of that map.
    x, dy = _x(2, 6, 3, 20, False, torch.float32, seed=2)
    g = generator(3)
    cos, sin = (torch.randn(6, 14, generator=g).to(DEVICE) for _ in range(2))
    check_against_reference(x, cos, sin, dy, interleaved)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("heads_first", (False, True), ids=("bshd", "bhsd"))
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_matches_hugging_face(backend, heads_first, dtype):
    """Rotate-half is Hugging Face's convention: transformers' own apply_rotary_pos_emb (Llama's), in float64 as the
    reference and in the tested dtype as the peer, with its (batch, seq, head_dim) tables in x's dtype."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch, seqlen, head_dim = 2, 9, 32
    q, dq = _x(batch, seqlen, 4, head_dim, heads_first, dtype, seed=4)
    k, _ = _x(batch, seqlen, 2, head_dim, heads_first, dtype, seed=5)
    cos, sin = _table(batch, seqlen, head_dim, False, "batch", seed=6, dtype=dtype)
    dim = 1 if heads_first else 2
    q64, k64 = apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double(), unsqueeze_dim=dim)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=dim)
    torch.testing.assert_close(reference.rotary_embedding(q.double(), cos.double(), sin.double(), False, heads_first),
                               q64, rtol=1e-14, atol=1e-14)
    assert_by_rule("q", fastlm.rotary_embedding(q, cos, sin, heads_first=heads_first), q64, q_hf)
    assert_by_rule("k", fastlm.rotary_embedding(k, cos, sin, heads_first=heads_first), k64, k_hf)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("interleaved", (False, True), ids=("half", "interleaved"))
def test_strided_tables_and_x(backend, interleaved):
    batch, seqlen, heads, head_dim, rot = 2, 6, 3, 24, 16
    x, dy = _x(batch, seqlen, heads, head_dim, False, torch.float32, seed=7)
    cos, sin = _table(batch, seqlen, rot, interleaved, "seq", seed=7)
    # Tables sliced out of a wider cache (row stride rot + 5), expanded over the batch (batch stride 0), and a sin
    # whose strides differ from cos's (both are then copied).
    wide_cos = torch.cat((cos, torch.randn(seqlen, 5, device=DEVICE)), dim=-1)[:, :rot]
    wide_sin = torch.cat((sin, torch.randn(seqlen, 5, device=DEVICE)), dim=-1)[:, :rot]
    assert not wide_cos.is_contiguous()
    check_against_reference(x, wide_cos, wide_sin, dy, interleaved)
    check_against_reference(x, cos.expand(batch, seqlen, rot), sin.expand(batch, seqlen, rot), dy, interleaved)
    check_against_reference(x, wide_cos, sin, dy, interleaved)
    # A table with a non-unit feature stride (copied).
    check_against_reference(x, cos.t().contiguous().t(), sin.t().contiguous().t(), dy, interleaved)
    # x: a slice of wider heads (odd strides), the (batch, heads, seq, head_dim) view of a (batch, seq, heads,
    # head_dim) projection (Hugging Face's q), and a non-unit feature stride (copied).
    big = torch.randn(batch, seqlen, heads, head_dim + 3, device=DEVICE)
    check_against_reference(big[..., :head_dim], cos, sin, dy, interleaved)
    check_against_reference(x.transpose(1, 2), cos, sin, dy.transpose(1, 2).contiguous(), interleaved,
                            heads_first=True)
    check_against_reference(x.transpose(2, 3).contiguous().transpose(2, 3), cos, sin, dy, interleaved)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_many_heads_and_tokens(backend):
    # More tokens than one program's block and more heads than one program's range, in both layouts.
    for heads_first in (False, True):
        x, dy = _x(3, 70, 9, 16, heads_first, torch.float32, seed=8)
        cos, sin = _table(3, 70, 16, False, "batch", seed=8)
        check_against_reference(x, cos, sin, dy, heads_first=heads_first)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_tables_get_no_gradient(backend):
    x, dy = _x(1, 4, 2, 8, False, torch.float32, seed=9)
    cos, sin = _table(1, 4, 8, False, "seq", seed=9)
    cos.requires_grad_()
    sin.requires_grad_()
    xl = x.clone().requires_grad_()
    fastlm.rotary_embedding(xl, cos, sin).backward(dy)
    assert xl.grad is not None and cos.grad is None and sin.grad is None


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_expanded_gradient_and_double_backward(backend):
    x, _ = _x(2, 3, 2, 12, True, torch.float32, seed=10)
    cos, sin = _table(2, 3, 12, False, "batch", seed=10)
    xl = x.clone().requires_grad_()
    out = fastlm.rotary_embedding(xl, cos, sin, heads_first=True)
    (dx,) = torch.autograd.grad(out.sum(), xl, create_graph=True)  # the incoming gradient is expanded (stride 0)
    ref = x.double().requires_grad_()
    reference.rotary_embedding(ref, cos.double(), sin.double(), False, True).sum().backward()
    torch.testing.assert_close(dx.double(), ref.grad, rtol=1e-6, atol=1e-6)
    # The gradient's own gradient: d(dx·v)/d(dy) is the forward rotation of v.
    dy = torch.ones_like(out, requires_grad=True)
    (dx,) = torch.autograd.grad(out, xl, dy, create_graph=True)
    v = torch.randn_like(x)
    (ddy,) = torch.autograd.grad(dx, dy, v)
    torch.testing.assert_close(ddy, reference.rotary_embedding(v, cos, sin, False, True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_empty(backend):
    cos, sin = torch.randn(3, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE)
    for shape in ((0, 3, 2, 8), (2, 3, 0, 8)):
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        out = fastlm.rotary_embedding(x, cos, sin)
        assert out.shape == shape
        out.sum().backward()
        assert x.grad.shape == shape
    out = fastlm.rotary_embedding(torch.randn(2, 0, 2, 8, device=DEVICE), cos[:0], sin[:0])
    assert out.shape == (2, 0, 2, 8)


def test_meta():
    x = torch.empty(2, 4, 3, 16, device="meta")
    out = fastlm.rotary_embedding(x, torch.empty(3, 8, device="meta"), torch.empty(3, 8, device="meta"),
                                  heads_first=True)
    assert out.shape == x.shape and out.device.type == "meta"


# --- registered op, torch.compile -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("interleaved", (False, True), ids=("half", "interleaved"))
@pytest.mark.parametrize("heads_first", (False, True), ids=("bshd", "bhsd"))
def test_opcheck(backend, interleaved, heads_first):
    x, _ = _x(2, 4, 3, 12, heads_first, torch.float32, seed=11)
    cos, sin = _table(2, 4, 8, interleaved, "batch", seed=11)
    for backward in (False, True):
        torch.library.opcheck(torch.ops.fastlm.rotary_embedding.default,
                              (x.clone().requires_grad_(), cos, sin, interleaved, heads_first, backward, backend))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_compiles_without_graph_breaks(backend):
    import torch._dynamo

    torch._dynamo.reset()

    def rope(q, k, cos, sin):
        q = fastlm.rotary_embedding(q, cos, sin, heads_first=True)
        k = fastlm.rotary_embedding(k, cos[..., :8], sin[..., :8], interleaved=True, heads_first=True)
        return (q * 2).sum(-1) + k.sum(-1)

    q, _ = _x(2, 5, 4, 16, True, torch.float32, seed=12)
    k, _ = _x(2, 5, 4, 16, True, torch.float32, seed=13)
    cos, sin = _table(2, 5, 16, False, "batch", seed=12)
    q.requires_grad_()
    compiled = torch.compile(rope, fullgraph=True, backend="aot_eager")
    y = compiled(q, k, cos, sin)
    y.sum().backward()
    gq = q.grad.clone()
    q.grad = None
    ey = rope(q, k, cos, sin)
    ey.sum().backward()
    torch.testing.assert_close(y, ey)
    torch.testing.assert_close(gq, q.grad)


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input():
    x = torch.randn(2, 5, 3, 16)
    cos, sin = torch.randn(5, 16), torch.randn(5, 16)
    rope = fastlm.rotary_embedding
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        rope([1.0], cos, sin)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        rope(torch.ones(2, 5, 3, 16, dtype=torch.int64), cos, sin)
    with pytest.raises(ValueError, match="x must be 4-D"):
        rope(torch.randn(5, 3, 16), cos, sin)
    with pytest.raises(ValueError, match="cos must have shape \\(seq, rot\\) or \\(batch, seq, rot\\) with seq = 5"):
        rope(x, torch.randn(4, 16), sin)
    with pytest.raises(ValueError, match="with seq = 3"):
        rope(x, cos, sin, heads_first=True)  # x read as (batch, heads, seq, head_dim): seq is 3
    with pytest.raises(ValueError, match="batch = 2 or 1"):
        rope(x, torch.randn(3, 5, 16), torch.randn(3, 5, 16))
    with pytest.raises(ValueError, match="sin must have cos's shape"):
        rope(x, cos, torch.randn(5, 8))
    with pytest.raises(TypeError, match="sin must have cos's dtype"):
        rope(x.half(), cos, sin.half())
    with pytest.raises(TypeError, match="cos must have x's dtype \\(torch.float32\\) or float32"):
        rope(x, cos.half(), sin.half())
    with pytest.raises(ValueError, match="must be even, ≥ 2 and ≤ head_dim \\(16\\), got 7"):
        rope(x, torch.randn(5, 7), torch.randn(5, 7))
    with pytest.raises(ValueError, match="got 18"):
        rope(x, torch.randn(5, 18), torch.randn(5, 18))
    with pytest.raises(ValueError, match="cos is on meta"):
        rope(x, cos.to("meta"), sin)
    with pytest.raises(TypeError, match="sin must be a torch.Tensor"):
        rope(x, cos, None)


# --- the CUDA launcher without a GPU ---------------------------------------------------------------------------------

built = pytest.mark.skipif(not _cuda.build_info()["built"], reason="fastlm._C is not built")
without_gpu = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="a CUDA GPU is visible: this checks the GPU-less path")


@built
@without_gpu
def test_launcher_checks_the_device_before_any_pointer():
    # Every argument of the binding, dummy pointers (null and bogus) on purpose: the device check comes first.
    from fastlm import _C

    for p in (0, 0x1000):
        with pytest.raises(RuntimeError, match="no CUDA device is visible"):
            _C.rotary(p, [96, 96, 32], p, p, [0, 16], p, [96, 96, 32], 2, 5, 3, 32, 16, 2, 0, False, False, 0, 0)
    assert _C.rotary.__doc__


@without_gpu
def test_cuda_launchers_without_gpu_raise():
    x, cos = torch.randn(2, 5, 3, 16), torch.randn(5, 16)
    with pytest.raises(RuntimeError, match="fastlm's cuda backend cannot run"):
        _cuda.rotary_fwd(x, cos, cos, False, False)
    with pytest.raises(RuntimeError, match="fastlm's cuda backend cannot run"):
        _cuda.rotary_bwd(x, cos, cos, True, False)


# --- GPU only: bf16 at model shapes, huge tensors --------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("heads_first", (False, True), ids=("bshd", "bhsd"))
@pytest.mark.parametrize("interleaved", (False, True), ids=("half", "interleaved"))
@pytest.mark.parametrize("rot, table_dtype", ((128, torch.float32), (128, torch.bfloat16), (64, torch.float32)),
                         ids=("rot128-fp32", "rot128-bf16", "rot64-fp32"))
def test_gpu_bf16(backend, rot, table_dtype, interleaved, heads_first):
    x, dy = _x(4, 1024, 16, 128, heads_first, torch.bfloat16, seed=14)
    cos, sin = _table(4, 1024, rot, interleaved, "batch", seed=14, dtype=table_dtype)
    check_against_reference(x, cos, sin, dy, interleaved, heads_first)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
def test_gpu_decode(backend):
    # One token a sequence (a KV-cache step): the launcher splits the heads to fill the device.
    x, dy = _x(8, 1, 32, 128, True, torch.bfloat16, seed=15)
    cos, sin = _table(8, 1, 128, False, "batch", seed=15)
    check_against_reference(x, cos, sin, dy, heads_first=True)


@pytest.mark.gpu
@pytest.mark.large_memory
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("heads_first", (False, True), ids=("bshd", "bhsd"))
def test_gpu_over_2_31_elements(backend, heads_first):
    # 2^19 + 1 tokens × 32 heads × 128 = 2^31 + 4096 elements: any 32-bit offset overflows (with heads_first, the
    # last heads start past 2^31). The last tokens of the last heads are compared with the reference.
    seqlen, heads, head_dim = (1 << 19) + 1, 32, 128
    x, _ = _x(1, seqlen, heads, head_dim, heads_first, torch.bfloat16, seed=16)
    cos, sin = _table(1, seqlen, head_dim, False, "seq", seed=16)
    x.requires_grad_()
    out = fastlm.rotary_embedding(x, cos, sin, heads_first=heads_first)
    out.backward(out.detach())
    tail = slice(seqlen - 3, seqlen)
    pick = (lambda t: t[:, -2:, tail]) if heads_first else (lambda t: t[:, tail, -2:])
    xt = pick(x.detach())
    ct, st = cos[tail], sin[tail]
    ref = reference.rotary_embedding(xt.double(), ct.double(), st.double(), False, heads_first)
    assert_by_rule("out[tail]", pick(out.detach()), ref, _torch(xt, ct, st, False, heads_first))
    # dx of dy = out is the inverse rotation of the rotated x: x again, up to the rounding of out.
    dx_ref = reference.rotary_embedding(pick(out.detach()).double(), ct.double(), -st.double(), False, heads_first)
    assert_by_rule("dx[tail]", pick(x.grad), dx_ref, _torch(pick(out.detach()), ct, -st, False, heads_first))
    del x, out
    torch.cuda.empty_cache()
