"""Shared test set-up: devices, backends, the tolerance rule of DESIGN.md and NaN-poisoned kernel outputs.

Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by
`make test`); GPU-only tests are marked `gpu` and skip with the reason.
"""

import math

import pytest
import torch

import fastlm
from fastlm import _cuda
from fastlm.kernels import _common

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda") if HAS_GPU else torch.device("cpu")


@pytest.fixture(autouse=True, scope="session")
def _poison_outputs():
    # Every kernel output starts as NaN, so an element a kernel forgets to write fails the comparison.
    _common.POISON_OUTPUTS = True
    yield
    _common.POISON_OUTPUTS = False


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)


def kernel_backends():
    """The kernel backends that can run here, each a pytest param; the others skip saying why."""
    params = []
    triton_ok = HAS_GPU or _common.interpreting()
    params.append(pytest.param("triton", marks=[] if triton_ok else pytest.mark.skip(
        reason="triton backend needs a GPU or TRITON_INTERPRET=1")))
    ok, why = _cuda.available()
    params.append(pytest.param("cuda", marks=[] if ok else pytest.mark.skip(reason=f"cuda backend: {why}")))
    return params


BACKENDS = kernel_backends() + ["torch"]


def one_ulp(dtype, magnitude):
    """One rounding step of `dtype` at `magnitude`: the spacing of representable numbers there."""
    if magnitude == 0:
        return 0.0
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


def assert_by_rule(name, out, ref, torch_out, factor=2.0):
    """DESIGN.md's rule: max|out − ref| ≤ factor · max|torch_out − ref| + one ulp of out's dtype at |ref|.

    ref is computed in float64 from upcast inputs; torch_out is PyTorch's own implementation in the tested dtype.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == torch_out.dtype, f"{name}: dtype {out.dtype} != torch's {torch_out.dtype}"
    if ref.numel() == 0:
        return
    ref = ref.double().cpu()
    err = (out.double().cpu() - ref).abs().max().item()
    torch_err = (torch_out.double().cpu() - ref).abs().max().item()
    atol = one_ulp(out.dtype, ref.abs().max().item())
    bound = factor * torch_err + atol
    assert err <= bound, f"{name}: max error {err:.3g} > {factor}·{torch_err:.3g} (torch) + {atol:.3g} (1 ulp)"


@pytest.fixture
def backend(request):
    with fastlm.use_backend(request.param):
        yield request.param
