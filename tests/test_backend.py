"""The backend switch: names, nesting, the environment variable, explicit backends that cannot run, and auto."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastlm
from fastlm import _backend, _cuda, _dispatch_table
from conftest import HAS_GPU


def test_use_backend_nests_and_restores():
    start = fastlm.get_backend()
    with fastlm.use_backend("torch"):
        assert fastlm.get_backend() == "torch"
        with fastlm.use_backend("triton"):
            assert fastlm.get_backend() == "triton"
        assert fastlm.get_backend() == "torch"
    assert fastlm.get_backend() == start


def test_set_backend_and_bad_names():
    start = fastlm.get_backend()
    try:
        fastlm.set_backend("torch")
        assert fastlm.get_backend() == "torch"
    finally:
        fastlm.set_backend(start)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastlm.set_backend("tpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastlm.use_backend("fast"):
            pass


def test_environment_variable():
    env = dict(os.environ, FASTLM_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", "import fastlm; print(fastlm.get_backend())"], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["FASTLM_BACKEND"] = "nonsense"
    bad = subprocess.run([sys.executable, "-c", "import fastlm"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "backend must be one of" in bad.stderr


def test_auto_sends_cpu_tensors_to_the_reference():
    with fastlm.use_backend("auto"):
        assert _backend.resolve("rms_norm", torch.device("cpu"), torch.float32) == "torch"
        x = torch.randn(3, 8)
        torch.testing.assert_close(fastlm.rms_norm(x), fastlm.reference.rms_norm(x))


@pytest.mark.skipif(HAS_GPU, reason="checks the error raised where there is no GPU")
def test_explicit_cuda_backend_without_gpu_says_why():
    ok, why = _cuda.available()
    assert not ok and why
    with fastlm.use_backend("cuda"):
        with pytest.raises(fastlm.BackendUnavailable, match="backend 'cuda' cannot run this call"):
            fastlm.layer_norm(torch.randn(2, 8))


def test_explicit_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fastlm.use_backend("triton"):
        with pytest.raises(fastlm.BackendUnavailable, match="TRITON_INTERPRET=1"):
            fastlm.rms_norm(torch.randn(2, 8))


def test_kernel_backends_refuse_float64_and_auto_falls_back():
    with fastlm.use_backend("triton"):
        with pytest.raises(fastlm.BackendUnavailable, match="float32, float16 or bfloat16"):
            fastlm.rms_norm(torch.randn(2, 8, dtype=torch.float64, device="cuda" if HAS_GPU else "cpu"))
    with fastlm.use_backend("torch"):
        x = torch.randn(2, 8, dtype=torch.float64)
        assert fastlm.rms_norm(x).dtype == torch.float64


@pytest.mark.gpu
def test_gpu_auto_falls_back_once_with_a_warning():
    x = torch.randn(2, 8, dtype=torch.float64, device="cuda")
    _backend._warned.clear()
    with fastlm.use_backend("auto"):
        with pytest.warns(UserWarning, match="falling back to the torch reference"):
            fastlm.rms_norm(x)
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            fastlm.rms_norm(x)
        assert not [w for w in again if "falling back" in str(w.message)], "the fallback is said once only"
    with fastlm.use_backend("auto"):  # a bf16 call: the first route of this GPU's order that can take it
        order = _dispatch_table.preferred("rms_norm", torch.cuda.get_device_name(x.device))
        assert _backend.resolve("rms_norm", x.device, torch.bfloat16) in order


# auto's picks on a GPU with a measured table (the H200's: torch's norm, the cuda cross-entropy, SDPA's cuDNN
# attention) and on one without (triton, then cuda).
AUTO_PICKS = {"NVIDIA H200": ["torch:eager", "cuda", "torch:sdpa-cudnn", "torch:sdpa-cudnn"],
              "NVIDIA A100-SXM4-80GB": ["triton"] * 3 + ["cuda"]}


@pytest.mark.parametrize("gpu", AUTO_PICKS)
@pytest.mark.parametrize("setting", ["auto", "triton"])
def test_choosing_a_backend_for_cuda_tensors_traces_without_graph_breaks(monkeypatch, setting, gpu):
    """What torch.compile traces when an op gets CUDA tensors: the backend choice must be a constant of the trace
    (no string-returning device query, no branch on a callable, no warning). No GPU is needed: the device's name
    and the extension's availability are answered from fastlm's own per-device caches, filled here as a GPU
    would fill them, so the trace takes exactly the path it takes on the GPU."""
    assert (gpu in _dispatch_table.MEASURED) == (gpu == "NVIDIA H200"), "the tables changed: update AUTO_PICKS"
    monkeypatch.setitem(_backend._device_names, 0, gpu)
    monkeypatch.setitem(_cuda._availability, 0, (True, ""))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda = torch.device("cuda", 0)

    def picks(dtype):
        chosen = [_backend.resolve(op, cuda, dtype) for op in ("rms_norm", "cross_entropy")]
        chosen.append(_backend.resolve("attention", cuda, dtype, unsupported=lambda backend: None))
        if setting == "auto":  # an op's refusal of the first candidate: auto moves on to the next
            chosen.append(_backend.resolve("attention", cuda, dtype,
                                           unsupported=lambda backend: "no" if backend == "triton" else None))
        return chosen

    def choose(x):
        return x + sum(len(name) for name in picks(x.dtype))

    torch._dynamo.reset()
    with fastlm.use_backend(setting):
        assert picks(torch.float32) == (AUTO_PICKS[gpu] if setting == "auto" else ["triton"] * 3)
        explained = torch._dynamo.explain(choose)(torch.zeros(2))
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(choose, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(torch.zeros(2)), choose(torch.zeros(2)), rtol=0, atol=0)
