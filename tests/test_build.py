"""The CUDA extension fastlm._C: it was built (where nvcc exists and FASTLM_BUILD_CUDA is not 0), it imports, it
reports the device code it carries, and on a machine without a GPU every way into it fails with an error that
says why, before any pointer is touched, instead of crashing. CI runs these without a GPU."""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from fastlm import _cuda


def _nvcc():
    """The nvcc setup.py would use (same search order)."""
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").exists():
            return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


if os.environ.get("FASTLM_BUILD_CUDA", "1") == "0":
    NOT_BUILT = "FASTLM_BUILD_CUDA=0: the CUDA extension is not built"
elif _nvcc() is None:
    NOT_BUILT = "nvcc not found: the CUDA extension is not built"
else:
    NOT_BUILT = None

needs_build = pytest.mark.skipif(NOT_BUILT is not None, reason=NOT_BUILT or "")
without_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: this checks the GPU-less path")


def _expected_archs():
    """SM numbers the build targets: FASTLM_CUDA_ARCHS as setup.py reads it ("90a" is sm_90 code), else 80, 90."""
    return {int(a.rstrip("a")) for a in os.environ.get("FASTLM_CUDA_ARCHS", "80 90a").split()}


@needs_build
def test_extension_is_built_and_imports():
    info = _cuda.build_info()
    assert info["built"], f"nvcc is at {_nvcc()} but fastlm._C does not import: {info['error']}"
    assert info["error"] is None
    from fastlm import _C

    assert callable(_C.norm_fwd) and callable(_C.norm_bwd)


CE_LAUNCHERS = ("cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_scale_grad")


@needs_build
def test_cross_entropy_launchers_exist():
    from fastlm import _C

    for name in CE_LAUNCHERS:
        assert callable(getattr(_C, name, None)), f"fastlm._C has no {name}"
        assert getattr(_C, name).__doc__, f"fastlm._C.{name} has no docstring"


@needs_build
def test_compiled_archs():
    from fastlm import _C

    archs = _C.compiled_archs()
    assert _expected_archs() <= set(archs), f"compiled for {archs}, expected {sorted(_expected_archs())}"
    assert _cuda.build_info()["archs"] == list(archs)


@needs_build
def test_cuda_runtime_version():
    from fastlm import _C

    version = _C.cuda_runtime_version()
    assert re.fullmatch(r"\d+\.\d+", version), version
    assert _cuda.build_info()["cuda_runtime"] == version


@pytest.mark.skipif(NOT_BUILT is None, reason="the extension is expected to be built here")
def test_unbuilt_extension_is_reported():
    info = _cuda.build_info()
    if info["built"]:
        pytest.skip("a fastlm._C from an earlier build is installed")
    ok, why = _cuda.available()
    assert not ok and "fastlm._C" in why
    assert info == {"built": False, "archs": [], "cuda_runtime": None, "error": why}


@without_gpu
def test_available_says_why_without_gpu():
    ok, why = _cuda.available()
    assert ok is False
    assert why and ("GPU" in why or "fastlm._C" in why), why


def _cpu_norm_args(is_rms):
    M, N = 4, 64
    x = torch.randn(M, N)
    return dict(
        x=x,
        weight=torch.ones(N),
        bias=None if is_rms else torch.zeros(N),
        residual=None,
        eps=1e-5,
        is_rms=is_rms,
        offset=0.0,
    )


@without_gpu
@pytest.mark.parametrize("is_rms", [False, True])
def test_norm_fwd_without_gpu_raises(is_rms):
    with pytest.raises((RuntimeError, ValueError), match="GPU|CUDA|fastlm._C"):
        _cuda.norm_fwd(**_cpu_norm_args(is_rms))


@without_gpu
def test_norm_bwd_without_gpu_raises():
    M, N = 4, 64
    xin = torch.randn(M, N)
    with pytest.raises((RuntimeError, ValueError), match="GPU|CUDA|fastlm._C"):
        _cuda.norm_bwd(torch.randn(M, N), xin, torch.ones(N), torch.zeros(M), torch.ones(M), None, False, 0.0,
                       True, True)


# The launcher contract (docs/DESIGN.md): for every op, kernels/<op>.py and fastlm._cuda expose the same launcher
# names with the same parameters, so the op layer calls either through _backend.launchers(backend, module).
LAUNCHERS = {
    "norm": ("norm_fwd", "norm_bwd"),
    "cross_entropy": ("cross_entropy_fwd", "cross_entropy_bwd", "scale_grad", "scalars", "reduce_loss"),
    "attention": ("attention_fwd", "attention_bwd", "attention_unsupported"),
    "rotary": ("rotary_fwd", "rotary_bwd"),
    "gated": ("gated_fwd", "gated_bwd"),
}


@pytest.mark.parametrize("op", sorted(LAUNCHERS))
def test_both_backends_expose_one_launcher_signature(op):
    import importlib
    import inspect

    triton_module = importlib.import_module(f"fastlm.kernels.{op}")
    for name in LAUNCHERS[op]:
        want = list(inspect.signature(getattr(triton_module, name)).parameters)
        got = list(inspect.signature(getattr(_cuda, name)).parameters)
        assert got == want, f"{name}: fastlm._cuda takes {got}, kernels/{op}.py takes {want}"


@needs_build
@without_gpu
def test_launchers_check_the_device_before_any_pointer():
    # Null pointers on purpose: the device check must come first and raise, not dereference them.
    from fastlm import _C

    M, N, f32 = 4, 64, 0
    calls = {
        "norm_fwd": lambda: _C.norm_fwd(0, N, 0, 0, 0, 0, 0, N, 0, 0, 0, 0, M, N, f32, f32, 1e-5, False, 0.0, 0, 0),
        "norm_bwd": lambda: _C.norm_bwd(0, N, 0, N, 0, 0, 0, 0, 0, 0, N, 0, 0, 0, 0, M, N, f32, f32, True, 0.0, 0, 0),
        "norm_bwd_num_partials": lambda: _C.norm_bwd_num_partials(M, N, 0),
        "norm_bwd_workspace_numel": lambda: _C.norm_bwd_workspace_numel(M, N, True, True, 0),
        "attention_hopper_supported": lambda: _C.attention_hopper_supported(64, False, 0),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="no CUDA device is visible"):
            call()


@without_gpu
def test_attention_hopper_path_is_not_offered_without_a_gpu():
    # The wgmma forward's question answers False (it raises nothing) wherever the kernel cannot run.
    for device in ("cpu", "cuda", torch.device("cuda", 0)):
        for head_dim in (64, 128, 96):
            for backward in (False, True):
                assert _cuda.attention_hopper_supported(head_dim, device, backward) is False


@pytest.mark.gpu
def test_attention_hopper_path_is_offered_on_compute_capability_9_0_only():
    # The default build holds sm_90a code (setup.py's DEFAULT_ARCHS), so a 9.0 GPU runs the wgmma forward at head
    # dims 64, 128 and 256 and the wgmma backward at 64 and 128, and no other GPU or head dim does.
    hopper = torch.cuda.get_device_capability() == (9, 0)
    for head_dim in (32, 64, 96, 128, 256):
        assert _cuda.attention_hopper_supported(head_dim, "cuda") is (hopper and head_dim in (64, 128, 256)), head_dim
        assert _cuda.attention_hopper_supported(head_dim, "cuda", backward=True) is (hopper and head_dim in (64, 128))


def _cpu_ce_args(index_dtype=torch.int64, weight=True):
    rows, V = 4, 50
    logits = torch.randn(rows, V)
    target = torch.randint(0, V, (rows,), dtype=index_dtype)
    return logits, target, torch.rand(V) + 0.5 if weight else None


@without_gpu
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_without_gpu_raises(index_dtype, reduction):
    logits, target, weight = _cpu_ce_args(index_dtype)
    with pytest.raises(RuntimeError, match="fastlm's cuda backend cannot run: .*(GPU|fastlm._C)"):
        _cuda.cross_entropy_fwd(logits, target, weight, -100, 0.1, 1e-4, 30.0, reduction, True)
    rows = logits.shape[0]
    with pytest.raises(RuntimeError, match="fastlm's cuda backend cannot run: .*(GPU|fastlm._C)"):
        _cuda.cross_entropy_bwd(logits, target, weight, torch.ones(2), torch.zeros(rows), torch.zeros(rows),
                                torch.ones(rows), -100, 0.1, 1e-4, 30.0)
    with pytest.raises(RuntimeError, match="fastlm's cuda backend cannot run: .*(GPU|fastlm._C)"):
        _cuda.scale_grad(torch.randn_like(logits), torch.tensor(2.0))


@needs_build
@without_gpu
def test_cross_entropy_launchers_check_the_device_before_any_pointer():
    # Dummy pointers on purpose (null, and a bogus non-null address): the device check must come first and raise.
    from fastlm import _C

    rows, V, bf16 = 4, 50, 2
    for p in (0, 0x1000):
        calls = {
            "cross_entropy_fwd": lambda: _C.cross_entropy_fwd(p, V, p, True, 0, p, p, p, p, p, V, rows, V, bf16, -100,
                                                              0.1, 0.0, 0.0, 0, 0),
            "cross_entropy_bwd": lambda: _C.cross_entropy_bwd(p, V, p, False, p, p, p, p, p, p, V, rows, V, V, 0,
                                                              bf16, -100, 0.0, 1e-4, 30.0, 0, 0),
            "cross_entropy_scale_grad": lambda: _C.cross_entropy_scale_grad(p, V, p, rows, V, bf16, 0, 0),
        }
        assert set(calls) == set(CE_LAUNCHERS)
        for name, call in calls.items():
            with pytest.raises(RuntimeError, match="no CUDA device is visible"):
                call()


@pytest.fixture
def recorded_extension(monkeypatch):
    """fastlm._cuda's launchers run in full on CPU tensors against an extension that records each launcher's
    arguments (the first call of each) and launches nothing: what the CUDA kernels would be given, checked without
    a GPU."""
    from benchmarks.overhead import _StubExtension, install_stub

    calls = {}

    class Recording(_StubExtension):
        def __getattr__(self, name):
            if name.endswith("_numel"):
                return lambda *args: 0
            return lambda *args: calls.setdefault(name, args) and None

    install_stub(monkeypatch, Recording())
    return calls


def test_cuda_glue_gives_row_operands_at_their_row_strides(recorded_extension):
    """The norm and gated launchers take (..., N) tensors: pointers and row strides of the tensors themselves where
    their rows lie at one stride (a row slice; an expanded gradient at stride 0), of a contiguous copy otherwise;
    outputs contiguous at stride N; M = numel / N rows (one row of numel for all-contiguous gated operands)."""
    calls = recorded_extension
    wide = torch.randn(2, 3, 56)
    x, residual, w = wide[..., :40], torch.randn(2, 3, 40), torch.randn(40)
    y, residual_out, mean, rstd = _cuda.norm_fwd(x, w, None, residual, 1e-5, True, 0.0)
    a = calls.pop("norm_fwd")
    assert y.shape == residual_out.shape == x.shape and y.is_contiguous() and mean is None and rstd.shape == (6,)
    assert (a[0], a[1], a[2], a[3]) == (x.data_ptr(), 56, residual.data_ptr(), 40)
    assert (a[6], a[7], a[8], a[9], a[12], a[13]) == (y.data_ptr(), 40, residual_out.data_ptr(), 40, 6, 40)
    swapped = torch.randn(3, 2, 40).transpose(0, 1)  # leading dimensions do not collapse: a copy is read
    _cuda.norm_fwd(swapped, w, None, None, 1e-5, True, 0.0)
    a = calls.pop("norm_fwd")
    assert a[0] != swapped.data_ptr() and a[1] == 40 and (a[2], a[3]) == (0, 0)

    dy = torch.randn(40).expand(2, 3, 40)  # the gradient of a sum: every row the same memory
    dx, dw, _ = _cuda.norm_bwd(dy, residual_out, w, None, rstd, None, True, 0.0, True, False)
    a = calls.pop("norm_bwd")
    assert dx.shape == x.shape and dx.is_contiguous() and dw.shape == (40,)
    assert (a[0], a[1], a[2], a[3]) == (dy.data_ptr(), 0, residual_out.data_ptr(), 40)
    assert (a[9], a[10], a[15], a[16]) == (dx.data_ptr(), 40, 6, 40)

    gate, up = torch.randn(2, 3, 80).chunk(2, dim=-1)  # a fused projection's halves: rows at stride 80
    h = _cuda.gated_fwd(gate, up, "silu")
    a = calls.pop("gated_fwd")
    assert h.shape == gate.shape and h.is_contiguous()
    assert a[:8] == (gate.data_ptr(), 80, up.data_ptr(), 80, h.data_ptr(), 40, 6, 40)
    g, u = torch.randn(2, 3, 40), torch.randn(2, 3, 40)
    dg, du = _cuda.gated_bwd(torch.randn(2, 3, 40), g, u, "silu")
    a = calls.pop("gated_bwd")
    assert a[10:12] == (1, 240) and (a[2], a[4]) == (g.data_ptr(), u.data_ptr())  # all contiguous: one row


@pytest.mark.parametrize("hopper, form, mode", [(False, "ws", 0), (True, "serial", 1), (True, "overlap", 2),
                                                (True, "ws", 3), (True, "pingpong", 4)])
def test_attention_launcher_asks_for_the_forward_the_switches_name(recorded_extension, monkeypatch, hopper, form,
                                                                   mode):
    """attention_fwd's `hopper` argument: 0 for the FlashAttention-2 kernel, 1 for the wgmma kernel's serial loop,
    2 for its loop with the softmax overlapping P·V, 3 for the warp-specialized TMA kernel, 4 for that kernel in
    pingpong (ATTN_HOPPER, ATTN_HOPPER_FWD); an unknown form is refused before anything launches (the launcher refuses any other value
    too; test_cuda_wgmma_forward_matches_reference runs every form on a GPU)."""
    calls = recorded_extension
    monkeypatch.setattr(_cuda, "ATTN_HOPPER", hopper)
    monkeypatch.setattr(_cuda, "ATTN_HOPPER_FWD", form)
    q, k, v = (torch.randn(1, 40, 2, 64, dtype=torch.bfloat16) for _ in range(3))
    out, lse = _cuda.attention_fwd(q, k, v, None, None, None, None, 0.125, None, 0, None)
    a = calls.pop("attention_fwd")
    assert out.shape == q.shape and lse.shape == (1, 2, 40)
    assert a[:5] == (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr())
    assert a[-3] == mode and type(a[-3]) is int
    monkeypatch.setattr(_cuda, "ATTN_HOPPER", True)
    monkeypatch.setattr(_cuda, "ATTN_HOPPER_FWD", "cooperative")
    with pytest.raises(ValueError, match="ATTN_HOPPER_FWD must be one of"):
        _cuda.attention_fwd(q, k, v, None, None, None, None, 0.125, None, 0, None)
    assert "attention_fwd" not in calls
