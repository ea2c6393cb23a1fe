"""Softmax cross-entropy: every backend against the float64 reference by the tolerance rule, torch's edge cases,
z-loss and softcap, the registered ops under torch.compile, the drop-in module and bad input."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import reference
from conftest import BACKENDS, DEVICE, assert_by_rule, generator, seeded, simulated_runs

VS = (2, 3, 1000, 32000, 50257)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")
OPTIONS = {
    "plain": {},
    "smoothing": dict(label_smoothing=0.1),
    "weight+smoothing": dict(weight=True, label_smoothing=0.2),
    "z_loss": dict(z_loss=1e-3),
    "softcap+smoothing": dict(softcap=3.0, label_smoothing=0.05),
    "everything": dict(weight=True, label_smoothing=0.1, z_loss=1e-4, softcap=5.0, ignore_index=7),
}


def _inputs(shape, V, dtype, ignore_index=-100, seed=0, index_dtype=torch.int64):
    g = generator(seed)  # seed: this draw's offset under FASTLM_TEST_SEED
    logits = (4 * torch.randn(*shape, V, generator=g)).to(dtype)
    target = torch.randint(0, V, shape, generator=g)
    target.view(-1)[::4] = ignore_index  # every fourth row ignored
    weight = torch.rand(V, generator=g) + 0.5
    return logits.to(DEVICE), target.to(index_dtype).to(DEVICE), weight.to(DEVICE)


def _torch_impl(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean", z_loss=0.0,
                softcap=None):
    """PyTorch's own cross-entropy, composed with torch ops for softcap and z-loss; classes in dim 1 for torch."""
    z = softcap * torch.tanh(logits / softcap) if softcap is not None else logits
    V = z.shape[-1]
    z2, t = z.reshape(-1, V), target.reshape(-1).long()
    loss = F.cross_entropy(z2, t, weight=weight.to(z.dtype) if weight is not None else None,
                           ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(z2, -1).square() * (t != ignore_index)
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    keep = t != ignore_index
    denom = weight.to(z.dtype)[torch.where(keep, t, 0)][keep].sum() if weight is not None else keep.sum()
    return loss.sum() / denom


def check(logits, target, class_weight=None, **kw):
    """Loss and gradient of fastlm against the float64 reference by the rule. torch's loss is taken in float32
    (fastlm's loss is float32 by contract, so the bar is torch at float32), its gradient in the logits' dtype."""
    kw = dict(kw)
    w = class_weight if kw.pop("weight", False) else None
    reduction = kw.get("reduction", "mean")
    g = generator(1)
    go = torch.randn(target.shape, generator=g).to(DEVICE) if reduction == "none" else torch.tensor(1.7, device=DEVICE)

    x = logits.detach().clone().requires_grad_()
    loss = fastlm.cross_entropy(x, target, weight=w, **kw)
    assert loss.dtype == torch.float32
    loss.backward(go)

    x64 = logits.detach().double().requires_grad_()
    ref = reference.cross_entropy(x64, target, w.double() if w is not None else None, **kw)
    ref.backward(go.double())

    def theirs():
        xt = logits.detach().clone().requires_grad_()
        _torch_impl(xt, target, w, **kw).backward(go.to(logits.dtype) if reduction == "none" else go)
        return _torch_impl(logits.detach().float(), target, w, **kw), xt.grad

    (t32, t_grad), sims = theirs(), simulated_runs(theirs)  # PyTorch's error, as run and sampled (conftest)
    assert_by_rule("loss", loss.detach(), ref.detach(), t32, samples=[s[0] for s in sims])
    assert x.grad.dtype == logits.dtype
    assert_by_rule("dlogits", x.grad, x64.grad, t_grad, samples=[s[1] for s in sims])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", VS)
def test_matches_reference(backend, V, dtype, reduction):
    rows = (2, 3) if V < 32000 else (3,)
    logits, target, _ = _inputs(rows, V, dtype)
    check(logits, target, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("V", (3, 1000, 9000))
def test_options(backend, V, option, reduction):
    kw = dict(OPTIONS[option])
    if kw.get("ignore_index", -100) >= V:
        kw.pop("ignore_index")  # V = 3: class 7 does not exist; keep the default
    # 32 rows: the rule compares maxima of errors that are ~1 ulp each, and over a handful of rows torch's own
    # maximum swings several-fold from one seed to the next; over a few dozen it settles.
    logits, target, weight = _inputs((32,), V, torch.float32, ignore_index=kw.get("ignore_index", -100))
    check(logits, target, weight, reduction=reduction, **kw)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_every_row_ignored(backend):
    logits, target, weight = _inputs((4,), 50, torch.float32)
    target.fill_(-100)
    for reduction, expect in (("mean", float("nan")), ("sum", 0.0)):
        x = logits.clone().requires_grad_()
        loss = fastlm.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)
        torch_loss = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(loss, torch_loss, equal_nan=True)
        assert torch.isnan(loss) if expect != expect else loss.item() == expect
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))  # torch's gradient here too, "mean" included


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_infinities_and_huge_logits(backend):
    logits, target, _ = _inputs((6,), 5000, torch.float32, ignore_index=-1)
    logits[0, :4000] = float("-inf")  # a masked vocabulary: fine while the target is unmasked
    target[0] = 4500
    logits[1] = logits[1] * 1e4  # huge magnitudes: exp must not overflow
    target[1] = 7
    logits[2, 10] = float("inf")  # +inf: torch gives NaN
    target[2] = 3
    logits[3, 5] = float("-inf")  # the target itself at −inf: loss +inf
    target[3] = 5
    logits[4] = float("-inf")  # the whole row at −inf: NaN
    target[4] = 0
    loss = fastlm.cross_entropy(logits, target, reduction="none")
    expect = F.cross_entropy(logits, target.long(), reduction="none")
    sims = simulated_runs(lambda: F.cross_entropy(logits, target.long(), reduction="none"))
    assert torch.equal(torch.isnan(loss), torch.isnan(expect)), (loss, expect)
    assert torch.equal(torch.isinf(loss), torch.isinf(expect)), (loss, expect)
    finite = torch.isfinite(expect)
    ref = reference.cross_entropy(logits.double(), target, reduction="none")
    assert_by_rule("finite losses", loss[finite], ref[finite], expect[finite], samples=[s[finite] for s in sims])
    # An ignored row holding +inf: loss 0, as torch; gradient exactly 0 (torch's is NaN there, through
    # log_softmax's backward of the inf, while it calls the row ignored).
    y = logits[2:3].clone().requires_grad_()
    ignored = torch.full((1,), -1, device=DEVICE)
    loss_ignored = fastlm.cross_entropy(y, ignored, ignore_index=-1, reduction="sum", label_smoothing=0.1)
    loss_ignored.backward()
    assert loss_ignored.item() == 0.0 and torch.equal(y.grad, torch.zeros_like(y))
    x = logits[:2].clone().requires_grad_()
    fastlm.cross_entropy(x, target[:2]).backward()
    x64 = logits[:2].double().requires_grad_()
    reference.cross_entropy(x64, target[:2]).backward()
    def theirs():
        xt = logits[:2].clone().requires_grad_()
        F.cross_entropy(xt, target[:2].long()).backward()
        return xt.grad

    assert_by_rule("dlogits, masked and huge rows", x.grad, x64.grad, theirs(), samples=simulated_runs(theirs))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_int32_targets_3d_and_non_contiguous(backend):
    logits, target, _ = _inputs((2, 3), 700, torch.float32, index_dtype=torch.int32)
    check(logits, target)
    wide = torch.randn(2, 3, 900, device=DEVICE)
    wide[..., :700] = logits
    check(wide[..., :700], target, reduction="none")  # row stride 900, taken as is
    check(logits.transpose(0, 1), target.transpose(0, 1), reduction="sum")  # rows permuted: copied
    flat, every_other = logits.reshape(6, 700), torch.randint(0, 700, (12,), device=DEVICE)[::2]
    check(flat, every_other, reduction="none")  # a strided 1-D target


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_loss_without_gradient_and_second_backward(backend):
    logits, target, _ = _inputs((4,), 100, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fastlm.cross_entropy(logits, target), F.cross_entropy(logits, target))
    if backend != "torch":
        x = logits.clone().requires_grad_()
        loss = fastlm.cross_entropy(x, target) * 2
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="can run once per forward"):
            loss.backward()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_module_is_drop_in(backend):
    logits, target, weight = _inputs((4,), 30, torch.float32)
    ours = fastlm.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1, reduction="sum")
    theirs = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1, reduction="sum")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    torch.testing.assert_close(ours(logits, target), theirs(logits, target))
    images = torch.randn(2, 30, 3, 5, device=DEVICE)  # torch's (N, C, d1, d2) layout
    labels = torch.randint(0, 30, (2, 3, 5), device=DEVICE)
    torch.testing.assert_close(ours(images, labels), theirs(images, labels))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dynamic", (False, True))
def test_compiles_without_graph_breaks(backend, dynamic):
    import torch._dynamo

    torch._dynamo.reset()
    head = torch.nn.Linear(16, 300).to(DEVICE)
    h = torch.randn(6, 16, device=DEVICE)
    t = torch.randint(0, 300, (6,), device=DEVICE)
    loss_fn = lambda h, t: fastlm.cross_entropy(head(h), t, z_loss=1e-4, label_smoothing=0.1) * 3.0  # noqa: E731
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    loss = compiled(h, t)
    loss.backward()
    got = head.weight.grad.clone()
    head.weight.grad = None
    expect = loss_fn(h, t)
    expect.backward()
    torch.testing.assert_close(loss, expect)
    torch.testing.assert_close(got, head.weight.grad)


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
def test_opcheck(backend):
    logits, target, _ = _inputs((6,), 300, torch.float32)
    args = (logits.requires_grad_(), target, None, -100, 0.1, 0.0, 0.0, "mean", True, backend)
    # The backward scales the forward's gradient buffer in place (that is how the logits move twice, not four
    # times), which opcheck's AOT-dispatch test does not model; real torch.compile with AOTAutograd, static and
    # dynamic, is exercised by test_compiles_without_graph_breaks.
    torch.library.opcheck(torch.ops.fastlm.cross_entropy_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_bad_input():
    logits = torch.randn(4, 10)
    target = torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match="target must hold class indices as int64 or int32"):
        fastlm.cross_entropy(logits, target.float())
    with pytest.raises(ValueError, match="target must have shape \\(4,\\)"):
        fastlm.cross_entropy(logits, target[:3])
    with pytest.raises(ValueError, match="weight must have shape \\(10,\\)"):
        fastlm.cross_entropy(logits, target, weight=torch.ones(9))
    with pytest.raises(ValueError, match="label_smoothing must be a finite number ≥ 0"):
        fastlm.cross_entropy(logits, target, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="label_smoothing must be in \\[0, 1\\]"):
        fastlm.cross_entropy(logits, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastlm.cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="softcap must be > 0"):
        fastlm.cross_entropy(logits, target, softcap=0.0)
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        fastlm.cross_entropy(target, target)
    with pytest.raises(ValueError, match="z_loss must be a finite number ≥ 0"):
        fastlm.cross_entropy(logits, target, z_loss=-1.0)


# --- GPU only ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("V", (128256, 262144))
def test_gpu_large_vocab_bf16(backend, V):
    logits, target, weight = _inputs((64,), V, torch.bfloat16)
    check(logits, target)
    check(logits, target, weight, weight=True, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_out_of_range_cpu_targets_are_refused_naming_target(backend):
    logits, target, _ = _inputs((6,), 10, torch.float32)
    hidden, weight = torch.randn(6, 4), torch.randn(10, 4)
    for bad in (10, -3):
        t = target.clone()
        t[4] = bad
        with pytest.raises(ValueError, match=rf"target must hold class indices in \[0, 10\).*target\[4\] is {bad}"):
            fastlm.cross_entropy(logits, t)
        with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 10\)"):
            fastlm.linear_cross_entropy(hidden, weight, t)
    t = target.clone()
    t[4] = -100
    assert torch.isfinite(fastlm.cross_entropy(logits, t))  # ignore_index is not out of range


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_gpu_out_of_range_target_gives_nan(backend):
    logits, target, _ = _inputs((8,), 1000, torch.bfloat16)
    target[1] = 5000
    target[2] = -3
    x = logits.clone().requires_grad_()
    loss = fastlm.cross_entropy(x, target, reduction="none")
    loss.sum().backward()
    torch.cuda.synchronize()
    assert torch.isnan(loss[1]) and torch.isnan(loss[2]) and torch.isfinite(loss[3:]).all()
    assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[3:]).all()


# --- fused linear cross-entropy -----------------------------------------------------------------------------------------


def _lce_inputs(tokens, H, V, dtype, bias=True, seed=3):
    g = generator(seed)
    hidden = torch.randn(tokens, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 3).to(dtype)
    b = (0.5 * torch.randn(V, generator=g)).to(dtype) if bias else None
    target = torch.randint(0, V, (tokens,), generator=g)
    target[::5] = -100
    to = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    return to(hidden), to(weight), to(b), to(target)


def check_linear(hidden, weight, bias, target, **kw):
    reduction = kw.get("reduction", "mean")
    g = generator(2)
    go = torch.randn(target.shape, generator=g).to(DEVICE) if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    leaves = lambda ts, f=lambda t: t: [f(t).detach().clone().requires_grad_() if t is not None else None  # noqa: E731
                                        for t in ts]
    ours = leaves((hidden, weight, bias))
    loss = fastlm.linear_cross_entropy(ours[0], ours[1], target, ours[2], **kw)
    loss.backward(go)
    exact = leaves((hidden, weight, bias), lambda t: t.double())
    cw = kw.pop("class_weight", None)
    ref = reference.linear_cross_entropy(exact[0], exact[1], target, exact[2], cw.double() if cw is not None else None,
                                         **kw)
    ref.backward(go.double())
    def theirs():
        t = leaves((hidden, weight, bias))
        _torch_impl(F.linear(*t), target, cw, **kw).backward(go.to(hidden.dtype) if reduction == "none" else go)
        # torch's own loss as users compute it: the projection in the tested dtype, the cross-entropy in float32.
        t32 = _torch_impl(F.linear(hidden, weight, bias).float(), target, cw, **kw)
        return [t32] + [a.grad if a is not None else None for a in t]

    t_out, sims = theirs(), simulated_runs(theirs)  # PyTorch's error, as run and sampled (conftest)
    assert_by_rule("loss", loss.detach(), ref.detach(), t_out[0], samples=[s[0] for s in sims])
    for i, (name, a, r) in enumerate(zip(("dhidden", "dweight", "dbias"), ours, exact), start=1):
        if a is not None:
            assert a.grad.dtype == a.dtype
            assert_by_rule(name, a.grad, r.grad, t_out[i], samples=[s[i] for s in sims])


@pytest.fixture
def small_chunks(monkeypatch):
    # A few hundred bytes of logits a chunk: many chunks and an odd remainder even at test sizes.
    # The module, not the function fastlm.ops re-exports under the same name.
    monkeypatch.setattr(importlib.import_module("fastlm.ops.cross_entropy"), "CHUNK_BYTES", 7 * 50 * 4)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("option", ("plain", "smoothing", "everything"))
def test_linear_matches_composition(backend, small_chunks, reduction, dtype, option):
    kw = dict(OPTIONS[option])
    # 253 tokens (36 chunks of 7 and a remainder of 1): over fewer tokens the maximum of ~1-ulp matmul errors,
    # torch's included, swings two-fold from one seed to the next and the rule measures noise.
    hidden, weight, bias, target = _lce_inputs(253, 32, 50, dtype)
    if kw.pop("weight", False):
        kw["class_weight"] = torch.rand(50, device=DEVICE) + 0.5
    if "ignore_index" in kw:
        target[target == -100] = kw["ignore_index"]
    check_linear(hidden, weight, bias, target, reduction=reduction, **kw)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_linear_without_bias_3d_and_frozen_weight(backend, small_chunks):
    hidden, weight, _, target = _lce_inputs(24, 16, 40, torch.float32, bias=False)
    check_linear(hidden.reshape(4, 6, 16), weight, None, target.reshape(4, 6), reduction="sum")
    h = hidden.clone().requires_grad_()
    fastlm.linear_cross_entropy(h, weight, target).backward()  # weight frozen: only d(hidden)
    h64 = hidden.double().requires_grad_()
    reference.linear_cross_entropy(h64, weight.double(), target).backward()
    def theirs():
        ht = hidden.clone().requires_grad_()
        F.cross_entropy(F.linear(ht, weight), target).backward()
        return ht.grad

    assert_by_rule("dhidden", h.grad, h64.grad, theirs(), samples=simulated_runs(theirs))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_linear_under_autocast(backend):
    """fp32 hidden and weight under bf16 autocast: run as autocast runs the matmul it replaces (bf16 operands, the
    loss in fp32), gradients back in fp32. Reference: float64 on the bf16-rounded operands."""
    hidden, weight, _, target = _lce_inputs(253, 32, 50, torch.float32, bias=False)
    ours = (hidden.clone().requires_grad_(), weight.clone().requires_grad_())
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = fastlm.linear_cross_entropy(*ours, target)
    loss.backward()

    def theirs():
        t = (hidden.clone().requires_grad_(), weight.clone().requires_grad_())
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            torch_loss = F.cross_entropy(F.linear(*t), target)
        torch_loss.backward()
        return torch_loss.detach(), t[0].grad, t[1].grad

    t_out, sims = theirs(), simulated_runs(theirs)
    exact = (hidden.bfloat16().double().requires_grad_(), weight.bfloat16().double().requires_grad_())
    ref = reference.linear_cross_entropy(*exact, target)
    ref.backward()
    assert loss.dtype == torch.float32
    assert_by_rule("loss", loss.detach(), ref.detach(), t_out[0], samples=[s[0] for s in sims])
    for i, (name, a, r) in enumerate(zip(("dhidden", "dweight"), ours, exact), start=1):
        assert a.grad.dtype == torch.float32
        assert_by_rule(name, a.grad, r.grad, t_out[i], samples=[s[i] for s in sims])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_linear_module_loads_a_linear_head(backend):
    torch.manual_seed(seeded(4))
    head = torch.nn.Linear(16, 30, bias=True).to(DEVICE)
    loss_fn = fastlm.nn.LinearCrossEntropyLoss(16, 30, bias=True, label_smoothing=0.1).to(DEVICE)
    loss_fn.load_state_dict(head.state_dict())
    hidden = torch.randn(9, 16, device=DEVICE)
    target = torch.randint(0, 30, (9,), device=DEVICE)
    torch.testing.assert_close(loss_fn(hidden, target), F.cross_entropy(head(hidden), target, label_smoothing=0.1))
    torch.testing.assert_close(loss_fn.logits(hidden), head(hidden))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_linear_compiles_without_graph_breaks(backend, small_chunks):
    import torch._dynamo

    torch._dynamo.reset()
    loss_fn = fastlm.nn.LinearCrossEntropyLoss(16, 30, z_loss=1e-4).to(DEVICE)
    hidden = torch.randn(9, 16, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 30, (9,), device=DEVICE)
    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(hidden, target)
    loss.backward()
    got = hidden.grad.clone()
    hidden.grad = None
    expect = loss_fn(hidden, target)
    expect.backward()
    torch.testing.assert_close(loss, expect)
    torch.testing.assert_close(got, hidden.grad)


def test_linear_bad_input():
    hidden, weight, bias, target = _lce_inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="weight must have shape \\(V, 8\\)"):
        fastlm.linear_cross_entropy(hidden, weight[:, :7], target)
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        fastlm.linear_cross_entropy(hidden, weight.half(), target)
    with pytest.raises(ValueError, match="bias must have shape \\(10,\\)"):
        fastlm.linear_cross_entropy(hidden, weight, target, bias[:9])
    with pytest.raises(ValueError, match="class_weight must have shape \\(10,\\)"):
        fastlm.linear_cross_entropy(hidden, weight, target, class_weight=torch.ones(9, device=hidden.device))
    # Shapes before devices: a wrong shape on another device is reported as the wrong shape, on every device.
    for bad in (torch.ones(9, device="meta"), target[:3].to("meta")):
        name = "class_weight" if bad.dtype.is_floating_point else "target"
        args = (target, bad) if name == "class_weight" else (bad, None)
        with pytest.raises(ValueError, match=f"{name} must have shape"):
            fastlm.linear_cross_entropy(hidden, weight, args[0], class_weight=args[1])
        with pytest.raises(ValueError, match=f"{name.replace('class_', '')} must have shape"):
            fastlm.cross_entropy(hidden @ weight.T, args[0], weight=args[1])
    with pytest.raises(ValueError, match="class_weight is on meta"):
        fastlm.linear_cross_entropy(hidden, weight, target, class_weight=torch.ones(10, device="meta"))
    with pytest.raises(TypeError, match="target must hold class indices"):
        fastlm.linear_cross_entropy(hidden, weight, target.float())
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastlm.linear_cross_entropy(hidden, weight, target, reduction="mean ")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gpu_linear_bf16(backend, reduction):
    hidden, weight, bias, target = _lce_inputs(4096, 1024, 32000, torch.bfloat16)
    check_linear(hidden, weight, bias, target, reduction=reduction, label_smoothing=0.1, softcap=30.0)
