"""Softmax cross-entropy: every backend against the float64 reference by the tolerance rule, torch's edge cases,
z-loss and softcap, the registered ops under torch.compile, the drop-in module and bad input."""

import importlib
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastlm
from fastlm import reference
from conftest import BACKENDS, DEVICE, assert_by_rule, generator, seeded, simulated_runs

REPO = Path(__file__).resolve().parent.parent

VS = (2, 3, 1000, 32000, 50257)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")
INDEX_DTYPES_T = (torch.int64, torch.int32)
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


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
def test_opcheck_inplace(backend):
    """The in-place op declares the mutation it makes (test_schema compares) and has a fake implementation; its
    autograd is an autograd.Function around it (torch.library registers none for a mutating op)."""
    logits, target, _ = _inputs((2, 3), 300, torch.float32)
    for reduction in ("mean", "none"):
        args = (logits.clone(), target.reshape(-1), None, -100, 0.1, 1e-4, 0.0, reduction, backend)
        torch.library.opcheck(torch.ops.fastlm.cross_entropy_fwd_inplace.default, args,
                              test_utils=("test_schema", "test_faketensor"))


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


# --- z-loss precision, memory, inplace_backward -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("weighted", (False, True))
@pytest.mark.parametrize("V", (1, 2, 50))
def test_z_loss_gradient_of_confident_rows(backend, V, weighted):
    """Every row confident (p_t rounds to 1 in fp32): the target's gradient is a_t·(p_t − 1) + 2ζ·lse·p_t ≈ 2ζ·lse,
    small next to a_t. Formed in that order it keeps fp32's relative precision; folding 2ζ·lse into a_t first
    (as the kernels once did) rounds it at the magnitude of a_t: 7e-4 relative error here at ζ = 1e-6."""
    g = generator(5)
    rows = 16
    logits = torch.randn(rows, V, generator=g)
    target = torch.randint(0, V, (rows,), generator=g)
    logits[torch.arange(rows), target] += 40.0
    weight = (torch.rand(V, generator=g) + 0.5).to(DEVICE) if weighted else None
    logits, target = logits.to(DEVICE), target.to(DEVICE)
    for z_loss in (1e-6, 1e-3):
        x = logits.clone().requires_grad_()
        loss = fastlm.cross_entropy(x, target, weight=weight, z_loss=z_loss, reduction="sum")
        loss.backward()
        x64 = logits.double().requires_grad_()
        ref = reference.cross_entropy(x64, target, weight.double() if weighted else None, z_loss=z_loss,
                                      reduction="sum")
        ref.backward()
        at = (torch.arange(rows, device=DEVICE), target)
        rel = ((x.grad[at].double() - x64.grad[at]).abs() / x64.grad[at].abs()).max().item()
        assert rel <= 8 * torch.finfo(torch.float32).eps, f"z_loss={z_loss}: target gradient relative error {rel:.2e}"
        assert abs(loss.item() - ref.item()) <= 8 * torch.finfo(torch.float32).eps * abs(ref.item())


class _Allocations(TorchDispatchMode):
    """Every tensor an op allocates (an output whose storage is none of its inputs' storages: views, in-place
    ops and aliases excluded) of at least `nbytes` bytes, as (op name, storage data_ptr)."""

    def __init__(self, nbytes):
        super().__init__()
        self.nbytes = nbytes
        self.big = []
        self.sized = []  # (op name, bytes, storage data_ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        seen = {a.untyped_storage().data_ptr() for a in flat_in}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().nbytes() >= self.nbytes:
                ptr = o.untyped_storage().data_ptr()
                if ptr not in seen:
                    self.big.append((str(func), ptr))
                    self.sized.append((str(func), o.untyped_storage().nbytes(), ptr))
                    seen.add(ptr)
        return out


class _LivePeak(TorchDispatchMode):
    """The peak of the bytes held by tensors the ops under it create, on any device (the CPU has no allocator
    statistics): each new storage counts from its op until the last tensor on it that the mode saw is collected.
    Storages of the inputs present before the mode are not counted. Run the computation directly, without
    autograd, whose graph holds tensors that Python does not."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage data_ptr → [bytes, tensors alive]
        self.held = self.peak = 0

    def _drop(self, ptr):
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.held -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for o in torch.utils._pytree.tree_leaves(out):
            if not isinstance(o, torch.Tensor) or o.untyped_storage().nbytes() == 0:
                continue
            ptr = o.untyped_storage().data_ptr()
            if ptr not in self.live:
                if ptr in inputs:
                    continue  # a view or an in-place result of something older than the mode
                self.live[ptr] = [o.untyped_storage().nbytes(), 0]
                self.held += self.live[ptr][0]
                self.peak = max(self.peak, self.held)
            self.live[ptr][1] += 1
            weakref.finalize(o, self._drop, ptr)
        return out


def _logits_from_matmul(rows, H, V, dtype, seed=6):
    """Non-leaf logits (rows, V) = h @ W.T with h and W leaves (smaller than the logits where H < rows)."""
    g = generator(seed)
    h = torch.randn(rows, H, generator=g).to(dtype).to(DEVICE).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5 * 3).to(dtype).to(DEVICE).requires_grad_()
    return h, w


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_one_logits_sized_allocation(backend, reduction, dtype):
    """Forward and backward together allocate one logits-sized tensor, the gradient the kernel writes, and it is
    the gradient autograd hands on: logits.grad itself for a leaf (autograd takes it rather than copying it), the
    incoming gradient of the matmul's backward for logits made by one. (Autograd once also materialized a
    logits-sized tensor of zeros for the gradient buffer, an output of the forward op that no loss used.)"""
    rows, V = 12, 300
    nbytes = rows * V * dtype.itemsize
    logits, target, _ = _inputs((rows,), V, dtype)
    go = torch.randn(rows, device=DEVICE) if reduction == "none" else torch.tensor(1.0, device=DEVICE)
    x = logits.clone().requires_grad_()
    with _Allocations(nbytes) as seen:
        fastlm.cross_entropy(x, target, reduction=reduction, z_loss=1e-4).backward(go)
    assert len(seen.big) == 1, seen.big
    assert x.grad.untyped_storage().data_ptr() == seen.big[0][1], "logits.grad is a copy of the kernel's buffer"

    h, w = _logits_from_matmul(rows, 4, V, dtype)
    z = h @ w.T
    with _Allocations(nbytes) as seen:
        fastlm.cross_entropy(z, target, reduction=reduction, z_loss=1e-4).backward(go)
    assert len(seen.big) == 1, seen.big
    assert h.grad is not None and w.grad is not None


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_inplace_backward_matches_and_allocates_nothing(backend, reduction, dtype):
    rows, V, H = 12, 300, 4
    target = _inputs((3, 4), V, dtype)[1]
    go = torch.randn(3, 4, generator=generator(7)).to(DEVICE) if reduction == "none" else torch.tensor(
        1.7, device=DEVICE)
    kw = dict(reduction=reduction, z_loss=1e-4, label_smoothing=0.1, softcap=20.0)
    out = []
    for inplace in (False, True):
        h, w = _logits_from_matmul(rows, H, V, dtype)
        h = h.detach().view(3, 4, H).requires_grad_()
        z = h @ w.T  # (3, 4, V) logits: matmul's fold of the leading dimensions, not a view
        dz = []
        z.register_hook(lambda g: dz.append(g.clone()))  # a hook is no hold on the logits
        with _Allocations(rows * V * dtype.itemsize) as seen:
            loss = fastlm.cross_entropy(z, target, inplace_backward=inplace, **kw)
            loss.backward(go)
        assert len([b for b in seen.big if b[0] != "aten.clone.default"]) == (0 if inplace else 1), seen.big
        out.append((loss.detach(), h.grad, w.grad, dz[0]))
    (loss, dh, dw, dz), (loss_i, dh_i, dw_i, dz_i) = out
    assert torch.equal(loss, loss_i)
    if reduction != "none":  # the same kernel, buffer and scaling, only the buffer's place differs
        assert torch.equal(dh_i, dh) and torch.equal(dw_i, dw)
        return
    # "none": each row scaled by its incoming gradient after the gradient's rounding (in place) rather than before
    # it (recomputed out of place), as "mean" and "sum" scale by an incoming gradient other than 1: by the rule.
    logits = (h.detach() @ w.detach().T).detach()
    x64 = logits.double().requires_grad_()
    reference.cross_entropy(x64, target, **kw).backward(go.double())

    def theirs():
        xt = logits.clone().requires_grad_()
        _torch_impl(xt, target, **kw).backward(go.to(dtype))
        return xt.grad

    assert_by_rule("dlogits, in place", dz_i, x64.grad, theirs(), samples=simulated_runs(theirs))


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
def test_inplace_backward_writes_over_the_logits_only_when_safe(backend):
    rows, V = 6, 50
    h, w = _logits_from_matmul(rows, 8, V, torch.float32)
    target = _inputs((rows,), V, torch.float32)[1]

    def refused(logits, target=target):
        with pytest.raises(ValueError, match="writes the gradient over the logits, but the logits are still needed"):
            fastlm.cross_entropy(logits, target, inplace_backward=True)

    refused(torch.randn(rows, V, device=DEVICE, requires_grad=True))  # a leaf: the caller's own data
    refused(torch.tanh(h @ w.T))  # tanh saved its output for its backward
    refused((h @ w.T).exp())  # so did exp
    refused(torch.softmax(h @ w.T, -1))  # and softmax
    refused((h @ w.T).view(2, 3, V), target.view(2, 3))  # a view
    z = h @ w.T
    first_rows = z[:2]  # viewed: the view reads the same memory
    refused(z)
    del first_rows
    z = h @ w.T
    squares = z.pow(2)  # a consumer that saved its input for its backward
    refused(z)
    del squares
    z = h @ w.T
    alias = z.detach()  # an alias of the memory
    refused(z)
    del alias
    z = h @ w.T
    z.retain_grad()  # z.grad would be the same memory
    refused(z)

    # Nothing else holds these: the gradient goes over them, and equals the out-of-place one.
    z = 3.0 * torch.tanh((h @ w.T) / 3.0)  # a softcap's final multiplication saves nothing
    before = z.detach().clone()
    fastlm.cross_entropy(z, target, inplace_backward=True).backward()
    dh = h.grad.clone()
    h.grad = w.grad = None
    fastlm.cross_entropy(3.0 * torch.tanh((h @ w.T) / 3.0), target).backward()
    assert torch.equal(dh, h.grad)
    assert not torch.equal(z.detach(), before)  # the logits now hold the gradient, as documented

    # Without a gradient to compute nothing is written; non-contiguous logits are copied first.
    z = h @ w.T
    before = z.detach().clone()
    with torch.no_grad():
        fastlm.cross_entropy(z, target, inplace_backward=True)
    z_t = (w @ h.T).detach().requires_grad_().t()  # a leaf, but not contiguous: its copy takes the gradient
    loss = fastlm.cross_entropy(z_t * 1.0, target, inplace_backward=True)
    assert torch.equal(z.detach(), before)
    loss.backward()
    with pytest.raises(RuntimeError, match="can run once per forward"):
        z = h @ w.T * 1.0
        loss = fastlm.cross_entropy(z, target, inplace_backward=True) * 2
        loss.backward(retain_graph=True)
        loss.backward()
    with pytest.raises(TypeError, match="inplace_backward must be a bool"):
        fastlm.cross_entropy(h @ w.T, target, inplace_backward=1)


# --- GPU only ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("V", (128256, 262144))
def test_gpu_large_vocab_bf16(backend, V):
    logits, target, weight = _inputs((64,), V, torch.bfloat16)
    check(logits, target)
    check(logits, target, weight, weight=True, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)


def _peak_extra(fn):
    """Bytes fn allocates at its peak beyond what was allocated before it (the CUDA caching allocator's count)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
def test_gpu_peak_memory_is_one_gradient_buffer(backend):
    """Issue 13's target: forward + backward allocate one logits-sized buffer (the gradient, which becomes
    logits.grad); with inplace_backward none (beyond the matmul's own gradients that made the logits)."""
    rows, V, H = 4096, 32000, 64
    L = rows * V * 2
    slack = 16 << 20  # per-row statistics, scalars, the allocator's rounding
    logits, target, _ = _inputs((rows,), V, torch.bfloat16)
    x = logits.clone().requires_grad_()
    extra = _peak_extra(lambda: fastlm.cross_entropy(x, target).backward())
    assert extra <= L + slack, f"{extra / L:.2f} logits-sized buffers"
    h, w = _logits_from_matmul(rows, H, V, torch.bfloat16)
    z = h @ w.T
    extra = _peak_extra(lambda: fastlm.cross_entropy(z, target, inplace_backward=True).backward())
    assert extra <= (rows * H + V * H) * 2 + slack, f"{extra / L:.2f} logits-sized buffers"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
def test_gpu_linear_peak_memory_is_bounded(backend):
    """The fused linear cross-entropy's peak: the fp32 d(weight) accumulator, one chunk of logits, d(hidden),
    d(weight) in bf16, and the blocks' overlap (see fastlm/ops/linear_cross_entropy.py), never the logits."""
    lce = importlib.import_module("fastlm.ops.linear_cross_entropy")
    tokens, H, V = 8192, 1024, 32000
    hidden, weight, _, target = _lce_inputs(tokens, H, V, torch.bfloat16, bias=False)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    extra = _peak_extra(lambda: fastlm.linear_cross_entropy(h, w, target).backward())
    bound = V * H * 4 + min(lce.CHUNK_BYTES, tokens * V * 2) + tokens * H * 2 + V * H * 2 + (64 << 20)
    assert extra <= bound, f"{extra / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
def test_gpu_linear_low_memory_peak_is_the_gradients_and_one_block(backend):
    """low_memory's peak (issue 13: at most a tenth of eager's): d(weight) and d(hidden) themselves and one
    vocabulary block of logits, or, before d(weight) exists, one token chunk; no fp32 d(weight)."""
    lce = importlib.import_module("fastlm.ops.linear_cross_entropy")
    tokens, H, V = 8192, 1024, 32000
    hidden, weight, _, target = _lce_inputs(tokens, H, V, torch.bfloat16, bias=False)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    fastlm.linear_cross_entropy(h, w, target, low_memory=True).backward()  # cuBLAS's workspace, before measuring
    h.grad = w.grad = None
    extra = _peak_extra(lambda: fastlm.linear_cross_entropy(h, w, target, low_memory=True).backward())
    grads = V * H * 2 + tokens * H * 2
    bound = grads + max(lce.LOW_MEMORY_BLOCK_BYTES, min(lce.CHUNK_BYTES, tokens * V * 2)) + (16 << 20)
    assert extra <= bound, f"{extra / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_out_of_range_cpu_targets_are_refused_naming_target(backend):
    logits, target, _ = _inputs((6,), 10, torch.float32)
    hidden, weight = torch.randn(6, 4), torch.randn(10, 4)
    for index_dtype in (torch.int64, torch.int32):
        for bad in (10, -3, 2**31 - 1, -2**31):
            t = target.to(index_dtype)
            t[4] = bad
            with pytest.raises(ValueError,
                               match=rf"target must hold class indices in \[0, 10\).*target\[4\] is {bad}"):
                fastlm.cross_entropy(logits, t)
            with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 10\)"):
                fastlm.linear_cross_entropy(hidden, weight, t)
        t = target.to(index_dtype)
        t[4] = -100
        assert torch.isfinite(fastlm.cross_entropy(logits, t))  # ignore_index is not out of range
        t = target.clamp(min=0).to(index_dtype)  # (_inputs ignores some rows by -100)
        assert torch.isfinite(fastlm.cross_entropy(logits, t, ignore_index=2**40))  # past the index dtype
        t[4] = 2**31 - 1  # an ignore_index anywhere in the index dtype's range is not out of range either
        assert torch.isfinite(fastlm.cross_entropy(logits, t, ignore_index=2**31 - 1))


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
def test_out_of_range_cpu_targets_are_refused_without_numpy(backend, monkeypatch):
    """The check reads targets through numpy where it can; torch's own ops where numpy is missing."""
    def no_numpy(self):
        raise RuntimeError("Numpy is not available")

    monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)
    logits, target, _ = _inputs((6,), 10, torch.float32)
    t = target.clone()
    t[4] = 10
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 10\).*target\[4\] is 10"):
        fastlm.cross_entropy(logits, t)
    assert torch.isfinite(fastlm.cross_entropy(logits, target))


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
def test_scale_grad_takes_any_one_element_incoming_gradient(backend):
    """The backward of "mean"/"sum" scales the forward's gradient by the incoming gradient, a tensor of one element
    in any shape and strides (0-d from loss.backward(), (1,), a strided view; float64 converted), exactly as torch
    multiplies; more than one element is refused."""
    launchers = fastlm.kernels.cross_entropy if backend == "triton" else importlib.import_module("fastlm._cuda")
    g = torch.randn(3, 7, generator=generator(11)).to(DEVICE)
    for go in (torch.tensor(1.5), torch.tensor([1.5]), torch.full((1, 1), 1.5), torch.tensor([0.0, 1.5])[1:],
               torch.tensor(1.5, dtype=torch.float64), torch.tensor(1.0)):
        assert torch.equal(launchers.scale_grad(g.clone(), go.to(DEVICE)), g * go.item()), go
    with pytest.raises(ValueError, match="one element|1 elements"):
        launchers.scale_grad(g.clone(), torch.ones(2, device=DEVICE))


def _within_one_fp32_rounding(a, b):
    """Equal, or one fp32 step apart (two float64 sums in different orders, each rounded once); NaN matches NaN."""
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    both_nan = a.isnan() & b.isnan()
    step = torch.nextafter(a, torch.full_like(a, float("inf"))) - a
    ok = both_nan | (a == b) | ((a - b).abs() <= step.abs())
    assert bool(ok.all()), (a, b)


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("option", ("plain", "everything"))
@pytest.mark.parametrize("per_sm", (1, 3))
def test_persistent_forward_grid_gives_the_same_bits(backend, option, per_sm, monkeypatch):
    """PROGRAMS_PER_SM: fewer programs than rows, each walking rows a grid apart (rows not a multiple of the
    grid: some programs take one row more), give every row's loss, statistics and gradient bit for bit as a program
    a row does; a grid wider than the rows is cut to them. (Interpreter: 4 SMs.)"""
    ce = fastlm.kernels.cross_entropy
    kw = dict(OPTIONS[option])
    ignore_index = kw.pop("ignore_index", -100)
    logits, target, weight = _inputs((23,), 300, torch.float16, ignore_index=ignore_index, seed=9)
    args = (logits, target, weight if kw.pop("weight", False) else None, ignore_index,
            kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0), kw.get("softcap"), "mean", True)
    assert ce.PROGRAMS_PER_SM is None
    grids = []
    real = ce._fwd_programs
    monkeypatch.setattr(ce, "_fwd_programs", lambda *a: grids.append(real(*a)) or grids[-1])
    one_a_row = ce.cross_entropy_fwd(*args)
    monkeypatch.setattr(ce, "PROGRAMS_PER_SM", per_sm)
    walking = ce.cross_entropy_fwd(*args)
    assert grids == [23, 4 * per_sm]
    for name, a, b in zip(("loss", "max", "log_s", "scalars", "grad"), one_a_row, walking):
        assert torch.equal(a, b), name
    monkeypatch.setattr(ce, "PROGRAMS_PER_SM", 8)  # 32 programs for 23 rows: 23
    assert torch.equal(ce.cross_entropy_fwd(*args)[4], one_a_row[4]) and grids[-1] == 23


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("index_dtype,per_sm", [(torch.int64, None), (torch.int32, 1)], ids=str)
def test_forward_forms_its_own_scalars(backend, index_dtype, per_sm, monkeypatch):
    """Without class weights the forward kernel forms the device scalars itself (OWN_SCALARS), with no launch
    before it: every output (loss, statistics, scalars, gradient) bit for bit as with the scalars launch's, for
    each reduction and option, a program a row or walking rows (per_sm), a count over one block of targets or
    several (OWN_COUNT_BLOCK), rows ignored and out of range; a "mean" call past OWN_COUNT_BYTES, class weights,
    given scalars (a linear cross-entropy chunk's) or no rows keep the scalars launch."""
    ce = fastlm.kernels.cross_entropy
    monkeypatch.setattr(ce, "PROGRAMS_PER_SM", per_sm)
    launched = []
    real_launch = ce._launch.launch
    monkeypatch.setattr(ce._launch, "launch", lambda kernel, *a, **kw: launched.append(kernel.__name__)
                        or real_launch(kernel, *a, **kw))
    blocks = (ce.OWN_COUNT_BLOCK, 8)  # one block of targets, or three
    for option in ("plain", "everything"):
        kw = dict(OPTIONS[option])
        ignore_index = kw.pop("ignore_index", -100)
        kw.pop("weight", None)
        logits, target, weight = _inputs((21,), 40, torch.bfloat16, ignore_index=ignore_index, seed=11,
                                         index_dtype=index_dtype)  # every fourth row ignored
        target[7] = 40  # out of range, not ignored: a NaN row
        for reduction in REDUCTIONS:
            args = (logits, target, None, ignore_index, kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0),
                    kw.get("softcap"), reduction, True)
            given = ce.cross_entropy_fwd(*args, sc=ce.scalars(target, None, 40, ignore_index, reduction))
            for block in blocks:
                monkeypatch.setattr(ce, "OWN_COUNT_BLOCK", block)
                launched.clear()
                own = ce.cross_entropy_fwd(*args)
                assert launched == ["_ce_fwd_kernel"], (option, reduction)
                for name, a, b in zip(("loss", "max", "log_s", "scalars", "grad"), own, given):
                    assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()), name
                assert own[0][7].isnan() and own[4][7].isnan().all()
    args = (logits, target, None, 7, 0.0, 0.0, None, "mean", True)
    expected = ce.cross_entropy_fwd(*args)
    for weight_, budget, sc in ((None, 0, None), (weight, ce.OWN_COUNT_BYTES, None),
                                (None, ce.OWN_COUNT_BYTES, ce.scalars(target, None, 40, 7, "mean"))):
        monkeypatch.setattr(ce, "OWN_COUNT_BYTES", budget)
        launched.clear()
        out = ce.cross_entropy_fwd(*args[:2], weight_, *args[3:], sc=sc)
        assert launched == (["_ce_scalars_kernel"] if sc is None else []) + ["_ce_fwd_kernel"]
        if weight_ is None:
            assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(out, expected))
    launched.clear()
    empty = ce.cross_entropy_fwd(logits[:0], target[:0], None, -100, 0.0, 0.0, None, "mean", True)
    assert launched == ["_ce_scalars_kernel"] and empty[3].tolist() == [0.0, 40.0]


# Run with TRITON_INTERPRET unset (compiled kernels): the own-scalars forward's Triton IR, and a control's.
_OWN_SCALARS_IR = r"""
import json, re, torch
from benchmarks import static
from fastlm.kernels import cross_entropy as ce

logits, target = torch.empty(64, 1024, dtype=torch.bfloat16), torch.empty(64, dtype=torch.int64)
result = {}
for name, weight, reduction in (("own mean", None, "mean"), ("own sum", None, "sum"),
                                ("weights", torch.empty(1024), "mean")):
    with static.recording() as found:
        ce.cross_entropy_fwd(logits, target, weight, -100, 0.1, 1e-4, 30.0, reduction, True)
    (v,) = [v for v in found if v.fn is ce._ce_fwd_kernel]
    ir = static.compile_cubin(v, 90).asm["ttir"]
    loads = stores = 0
    for line in ir.splitlines():
        if "tt.func" in line:  # (value names restart in each function; the IR names arguments)
            derived = {"%SCALARS"}  # the argument and every pointer made from it
        m = re.match(r"\s*(%[\w#]+) = (\S+) (%[\w#]+)?", line)
        if m:  # (a name is reused once its region closes: each definition replaces the last)
            made_from = m.group(2) in ("tt.addptr", "tt.splat", "tt.broadcast", "tt.bitcast") and m.group(3)
            (derived.add if made_from in derived else derived.discard)(m.group(1))
        m = re.search(r"tt\.(load|store) (%[\w#]+)", line)
        if m and m.group(2) in derived:
            loads += m.group(1) == "load"
            stores += m.group(1) == "store"
    result[name] = [loads, stores]
print(json.dumps(result))
"""


def test_own_scalars_forward_never_reads_them():
    """Program 0 stores the scalars the own-scalars forward forms; no program may read them back, since on a GPU
    the programs run at once (the interpreter runs program 0 first, so a read there would pass). The kernel compiled
    for sm_90a (no GPU needed): its Triton IR loads nothing through SCALARS and stores it twice, for "mean" and
    "sum"; with class weights (the scalars launch's path, the control) it loads both values."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _OWN_SCALARS_IR], cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {"own mean": [0, 2], "own sum": [0, 2], "weights": [2, 0]}, found


@pytest.mark.parametrize("backend", BACKENDS[:1], indirect=True)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES_T, ids=str)
@pytest.mark.parametrize("rows,V", [(0, 5), (1, 1), (37, 10), (8192 + 5, 8192 + 3)])
def test_scalars_kernel_matches_the_torch_ops(backend, index_dtype, rows, V, monkeypatch):
    """The one-program scalars (divisor, W) against the torch ops they replace, and the reduced loss against
    torch's sum and division: counts exact, float64 sums within one fp32 rounding; targets ignored, in range
    and out of range (excluded from the weighted divisor, counted in the plain one, as before); a non-finite
    weight makes W (and, at w_0, gathered for the rows left out and multiplied by 0, the divisor) NaN or inf as
    before. Above
    ONE_PROGRAM_ROWS the torch ops themselves run."""
    ce = fastlm.kernels.cross_entropy
    g = generator(3)
    target = torch.randint(0, V, (rows,), generator=g)
    if rows >= 37:
        target[::5] = -100
        target[3], target[11] = V + 2, -7  # out of range, not ignored
    target = target.to(index_dtype).to(DEVICE)
    weight = (torch.rand(V, generator=g) + 0.5).to(DEVICE)
    for w in (None, weight):
        for reduction in REDUCTIONS:
            ours = ce.scalars(target, w, V, -100, reduction)
            theirs = ce._scalars_torch(target, w, V, -100, reduction)
            _within_one_fp32_rounding(ours, theirs)
            if w is None or reduction != "mean":
                assert torch.equal(ours, theirs)
            loss = torch.randn(rows, generator=g).abs().to(DEVICE)
            if reduction != "none":
                mean = reduction == "mean"
                red = ce.reduce_loss(loss, ours, mean)
                assert red.shape == () and red.dtype == torch.float32
                expect = loss.double().sum() / (ours[0].double() if mean else 1.0)
                if rows == 0 and mean:
                    assert red.isnan()  # 0/0, as torch
                else:
                    torch.testing.assert_close(red.double(), expect, rtol=4 * 2.0**-24, atol=0)
    if rows >= 37:
        bad = weight.clone()
        bad[0] = float("nan")  # gathered for the ignored and out-of-range rows, times 0: NaN, as before
        bad[1] = float("inf")
        ours, theirs = ce.scalars(target, bad, V, -100, "mean"), ce._scalars_torch(target, bad, V, -100, "mean")
        assert ours[0].isnan() and theirs[0].isnan() and ours[1].isnan() and theirs[1].isnan()
        bad[0] = 1.0
        ours, theirs = ce.scalars(target, bad, V, -100, "mean"), ce._scalars_torch(target, bad, V, -100, "mean")
        assert torch.equal(ours[1], theirs[1]) and ours[1] == float("inf")
        nan_loss = torch.ones(rows, device=DEVICE)
        nan_loss[5] = float("nan")
        assert ce.reduce_loss(nan_loss, ours, False).isnan()
        monkeypatch.setattr(ce, "ONE_PROGRAM_ROWS", 4)  # the torch ops' path for many rows
        _within_one_fp32_rounding(ce.scalars(target, weight, V, -100, "mean"),
                                  ce._scalars_torch(target, weight, V, -100, "mean"))
        sc = ce.scalars(target, None, V, -100, "mean")
        assert torch.equal(ce.reduce_loss(loss, sc, True), loss.sum() / sc[0])


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


def check_linear(hidden, weight, bias, target, low_memory=False, **kw):
    reduction = kw.get("reduction", "mean")
    g = generator(2)
    go = torch.randn(target.shape, generator=g).to(DEVICE) if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    leaves = lambda ts, f=lambda t: t: [f(t).detach().clone().requires_grad_() if t is not None else None  # noqa: E731
                                        for t in ts]
    ours = leaves((hidden, weight, bias))
    loss = fastlm.linear_cross_entropy(ours[0], ours[1], target, ours[2], low_memory=low_memory, **kw)
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
    lce = importlib.import_module("fastlm.ops.linear_cross_entropy")
    monkeypatch.setattr(lce, "CHUNK_BYTES", 7 * 50 * 4)
    # And the fp32 d(weight) accumulator in blocks of 6 rows of H = 32 (50 = 8 blocks and a remainder of 2).
    monkeypatch.setattr(lce, "DW_BLOCK_BYTES", 6 * 32 * 4)


# low_memory (its own d(weight) pass over vocabulary blocks) in float32 with every option, and in float16 with all
# of them at once: the rounding behaviour is the default path's, already covered in both dtypes. "sum" only with
# every option: it differs from "mean" by the divisor alone (1 for "sum"), which "everything" (class weights and
# ignored rows, where the mean's divisor is a weighted count) takes in each dtype and path, "mean" and "none" in
# every case.
LINEAR_CASES = [(dtype, option, False) for dtype in (torch.float32, torch.float16)
                for option in ("plain", "smoothing", "everything")]
LINEAR_CASES += [(torch.float32, option, True) for option in ("plain", "smoothing", "everything")]
LINEAR_CASES += [(torch.float16, "everything", True)]
LINEAR_CASES = [(d, o, lm, r) for d, o, lm in LINEAR_CASES for r in REDUCTIONS if r != "sum" or o == "everything"]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype, option, low_memory, reduction", LINEAR_CASES,
                         ids=[f"{d}-{o}" + ("-low_memory" if lm else "") + f"-{r}" for d, o, lm, r in LINEAR_CASES])
def test_linear_matches_composition(backend, small_chunks, monkeypatch, reduction, dtype, option, low_memory):
    # low_memory's vocabulary blocks: 34 columns of the 253 tokens in either dtype: 50 = a block and a remainder of
    # 16. Each block runs the backward kernel over every token: under the interpreter more blocks cost seconds each
    # and test nothing more.
    lce = importlib.import_module("fastlm.ops.linear_cross_entropy")
    monkeypatch.setattr(lce, "LOW_MEMORY_BLOCK_BYTES", 34 * 253 * dtype.itemsize)
    kw = dict(OPTIONS[option], low_memory=low_memory)
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
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_linear_with_a_transposed_hidden_and_a_scaled_loss(backend, small_chunks, reduction):
    """hidden a transposed view, the loss's incoming gradient not 1: d(hidden) must not take hidden's layout for
    the in-place scaling kernel, which walks rows (found by the fuzz tests: dhidden off by 0.6). Layout alone
    changes nothing: the same numbers as with a row-major copy of hidden."""
    hidden, weight, _, target = _lce_inputs(24, 16, 40, torch.float32, bias=False)
    go = torch.full((24,), 0.7, device=DEVICE) if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    grads = []
    for h0 in (hidden.t().contiguous().t(), hidden.contiguous()):
        h = h0.detach().requires_grad_()
        fastlm.linear_cross_entropy(h, weight, target, reduction=reduction).backward(go)
        grads.append(h.grad)
    assert not grads[0].isnan().any()
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


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


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_allocations_are_bounded(backend, reduction, monkeypatch):
    """What the fused linear cross-entropy allocates, op by op inside its chunk loop (the pass run directly, so a
    dispatch mode sees it): nothing the size of the (tokens, V) logits; chunks of logits at most CHUNK_BYTES (the
    gradient written over them, so one a chunk), fp32 d(weight) blocks at most DW_BLOCK_BYTES, and above those
    only the results. Then, through autograd: the backward of "mean"/"sum" allocates nothing of the gradients'
    size (it scales them in place; no zeros for the op's other outputs), and "none" only its recomputed results."""
    lce = importlib.import_module("fastlm.ops.linear_cross_entropy")
    tokens, H, V = 96, 8, 200
    dtype = torch.bfloat16
    monkeypatch.setattr(lce, "CHUNK_BYTES", 16 * V * 2)  # 16 rows: 6 chunks
    monkeypatch.setattr(lce, "DW_BLOCK_BYTES", 40 * H * 4)  # 40 rows: 5 blocks
    hidden, weight, bias, target = _lce_inputs(tokens, H, V, dtype)
    logits_bytes = tokens * V * 2
    sc = fastlm.kernels.cross_entropy.scalars(target, None, V, -100, "mean")
    with _Allocations(1) as seen:
        stats, dh, dw, db = lce._lce_pass(hidden, weight, bias, target, None, sc, (-100, 0.1, 1e-4, None, "mean"),
                                          fastlm._backend.get_backend(), True)
    results = {t.untyped_storage().data_ptr() for t in (dh, dw, db)}
    sizes = sorted(((op, n) for op, n, ptr in seen.sized if ptr not in results), key=lambda x: -x[1])
    big = [(op, n) for op, n in sizes if n > 16 * V * 2]
    # The CPU's fp32 upcasts of a chunk's operands for the accumulation (_acc_mm: a CUDA matmul takes bf16 in
    # and sums in fp32) are the only ones above a chunk here.
    assert all(op == "aten._to_copy.default" and n <= 16 * V * 4 for op, n in big), big
    assert max(n for _, n in sizes) < logits_bytes / 2
    assert dw.dtype == weight.dtype and db.dtype == bias.dtype and dh.dtype == hidden.dtype
    # The fp32 blocks: each the first chunk's product (no zero-filled buffer), then accumulated in place.
    assert len([op for op, n, _ in seen.sized if n == 40 * H * 4 and "mm" in op]) == 5, seen.sized
    assert not [op for op, n, _ in seen.sized if n == 40 * H * 4 and "zeros" in op]

    ours = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = fastlm.linear_cross_entropy(ours[0], ours[1], target, ours[2], reduction=reduction, label_smoothing=0.1)
    go = torch.randn(tokens, device=DEVICE) if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    with _Allocations(min(tokens * H, V * H) * 2) as seen:
        loss.backward(go)
    ops = [op for op, *_ in seen.sized]
    if reduction == "none":
        assert ops == ["fastlm.linear_cross_entropy_bwd.default"] * 2, ops  # its d(hidden) and d(weight)
    else:
        assert ops == [], ops
    # (The numerics of these paths, blocks and chunks included: test_linear_matches_composition.)
    assert all(a.grad.dtype == a.dtype and torch.isfinite(a.grad).all() for a in ours)


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("option", ("plain", "everything"))
def test_backward_of_column_blocks_is_the_whole_rows_backward(backend, dtype, option):
    """cross_entropy_bwd on a block of columns (col0, classes: low_memory's vocabulary blocks) writes exactly those
    columns of the whole rows' gradient, bit for bit: the target's column inside the block or not, ignored rows
    (zeros) and an out-of-range target (a NaN row) included, at odd block offsets and widths (unaligned rows)."""
    launch = fastlm._backend.launchers(backend, fastlm.kernels.cross_entropy)
    kw = dict(OPTIONS[option])
    rows, V = 11, 300
    ignore_index = kw.pop("ignore_index", -100)
    logits, target, weight = _inputs((rows,), V, dtype, ignore_index=ignore_index)
    weight = weight if kw.pop("weight", False) else None
    target[3] = V + 4  # neither a class nor ignored
    args = (ignore_index, kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0), kw.get("softcap"))
    sc = launch.scalars(target, weight, V, ignore_index, "none")
    _, row_max, log_s, _, _ = launch.cross_entropy_fwd(logits, target, weight, *args, "none", False, sc=sc)
    go = torch.randn(rows, generator=generator(5)).to(DEVICE)
    whole = launch.cross_entropy_bwd(logits, target, weight, sc, row_max, log_s, go, *args)
    assert torch.isnan(whole[3]).all() and not torch.isnan(whole[torch.arange(rows) != 3]).any()
    for c0, c1 in ((0, 1), (0, 97), (97, 211), (211, 300), (5, 13), (299, 300)):
        block = logits[:, c0:c1].contiguous()
        got = launch.cross_entropy_bwd(block, target, weight, sc, row_max, log_s, go, *args, col0=c0, classes=V)
        assert torch.equal(got.nan_to_num(7.0), whole[:, c0:c1].nan_to_num(7.0)), (c0, c1)
        over = launch.cross_entropy_bwd(block, target, weight, sc, row_max, log_s, go, *args, out=block, col0=c0,
                                        classes=V)
        assert over.data_ptr() == block.data_ptr() and torch.equal(over.nan_to_num(7.0), got.nan_to_num(7.0))
    with pytest.raises(ValueError, match="does not fit in 300 classes"):
        launch.cross_entropy_bwd(logits[:, :50].contiguous(), target, weight, sc, row_max, log_s, go, *args,
                                 col0=251, classes=V)


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_low_memory_allocates_no_fp32_dweight(backend, reduction, monkeypatch):
    """low_memory's allocations, op by op (the passes run directly, so a dispatch mode sees them): above a token
    chunk or a vocabulary block of logits, only the results; nothing fp32 the size of d(weight)'s rows, and no
    zeros (nothing accumulates: each block of d(weight) is one matmul's output)."""
    lce = importlib.import_module("fastlm.ops.linear_cross_entropy")
    tokens, H, V = 96, 8, 200
    dtype = torch.bfloat16
    monkeypatch.setattr(lce, "CHUNK_BYTES", 16 * V * 2)  # 16 rows: 6 token chunks
    monkeypatch.setattr(lce, "LOW_MEMORY_BLOCK_BYTES", 40 * tokens * 2)  # 40 columns: 5 vocabulary blocks
    hidden, weight, bias, target = _lce_inputs(tokens, H, V, dtype)
    sc = fastlm.kernels.cross_entropy.scalars(target, None, V, -100, reduction)
    args = (-100, 0.1, 1e-4, None, reduction)
    saved = None
    if reduction == "none":
        stats = lce._lce(hidden, weight, bias, target, None, sc, args, fastlm._backend.get_backend(), False, None,
                         True)[0]
        saved = (torch.randn(tokens, device=DEVICE), stats[1], stats[2])
    with _Allocations(1) as seen:
        _, dh, dw, db = lce._lce(hidden, weight, bias, target, None, sc, args, fastlm._backend.get_backend(), True,
                                 saved, True)
    results = {t.untyped_storage().data_ptr() for t in (dh, dw, db)}
    others = [(op, n) for op, n, ptr in seen.sized if ptr not in results]
    assert max(n for _, n in others) <= max(16 * V * 2, 40 * tokens * 2), sorted(others, key=lambda x: -x[1])[:3]
    assert not [op for op, _ in others if "zeros" in op], others
    assert dw.dtype == weight.dtype and db.dtype == bias.dtype and dh.dtype == hidden.dtype
    assert all(torch.isfinite(g).all() for g in (dh, dw, db))


@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
def test_linear_low_memory_peak_is_the_gradients_and_one_block(backend, monkeypatch):
    """The peak of what the forward pass of "mean" holds at once (_LivePeak, on any device), at issue 13's
    proportions scaled down (V·H·d of d(weight) ≫ the chunks): low_memory's is d(weight) and d(hidden) themselves,
    one block of logits (or before d(weight) exists one token chunk) and per-row vectors, as the module docstring
    plans; the default's includes the fp32 d(weight) accumulator."""
    lce = importlib.import_module("fastlm.ops.linear_cross_entropy")
    tokens, H, V = 128, 64, 3000
    d = 2
    monkeypatch.setattr(lce, "CHUNK_BYTES", 32 * V * d)  # 32 token rows: 4 chunks
    monkeypatch.setattr(lce, "LOW_MEMORY_BLOCK_BYTES", 256 * tokens * d)  # 256 columns: 12 blocks (V = 3000)
    monkeypatch.setattr(lce, "DW_BLOCK_BYTES", 1000 * H * 4)
    hidden, weight, _, target = _lce_inputs(tokens, H, V, torch.bfloat16, bias=False)
    sc = fastlm.kernels.cross_entropy.scalars(target, None, V, -100, "mean")
    args = (-100, 0.0, 0.0, None, "mean")
    peaks = {}
    for low_memory in (False, True):
        with _LivePeak() as seen:
            grads = lce._lce(hidden, weight, None, target, None, sc, args, fastlm._backend.get_backend(), True, None,
                             low_memory)[1:3]
        peaks[low_memory] = seen.peak
        assert all(torch.isfinite(g).all() for g in grads)
    gradients = V * H * d + tokens * H * d
    plan = gradients + max(lce.LOW_MEMORY_BLOCK_BYTES, lce.CHUNK_BYTES) + 64 * tokens  # 64 B a row: its vectors
    assert gradients < peaks[True] <= plan, (peaks, gradients, plan)
    assert peaks[False] >= V * H * 4 + tokens * H * d, peaks  # the fp32 accumulator


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS[:-1], indirect=True)
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gpu_linear_bf16(backend, reduction):
    hidden, weight, bias, target = _lce_inputs(4096, 1024, 32000, torch.bfloat16)
    check_linear(hidden, weight, bias, target, reduction=reduction, label_smoothing=0.1, softcap=30.0)
