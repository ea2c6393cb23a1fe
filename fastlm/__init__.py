"""fastlm: fused Triton and CUDA C++ kernels for training transformer language models in PyTorch.

Three ways in: drop-in modules (`fastlm.nn.LayerNorm` for `torch.nn.LayerNorm`), the functional API
(`fastlm.layer_norm(...)`, `fastlm.attention(...)`), and the backend switch (`fastlm.use_backend("triton")`).
"""

__version__ = "0.1.0"

from fastlm import flash_attn, functional, nn
from fastlm._backend import BACKENDS, BackendUnavailable, get_backend, set_backend, use_backend
from fastlm.ops import (attention, cross_entropy, geglu, layer_norm, linear_cross_entropy, rms_norm, rotary_embedding,
                        scaled_dot_product_attention, swiglu)
from fastlm.integrations import patch, unpatch


def __getattr__(name):
    """`fastlm.models` on first use, without `import fastlm.models` (it is imported lazily: `import fastlm` does not
    need it)."""
    if name == "models":
        import importlib

        return importlib.import_module("fastlm.models")  # also binds fastlm.models: this runs once
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")


def build_info() -> dict:
    """What this installation can run: the CUDA extension's build (compiled archs, CUDA runtime) and the backend."""
    from fastlm import _cuda

    return {"backend": get_backend(), "cuda_extension": _cuda.build_info()}


__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "attention",
    "build_info",
    "cross_entropy",
    "flash_attn",
    "functional",
    "geglu",
    "get_backend",
    "layer_norm",
    "linear_cross_entropy",
    "models",
    "nn",
    "patch",
    "rms_norm",
    "rotary_embedding",
    "scaled_dot_product_attention",
    "set_backend",
    "swiglu",
    "unpatch",
    "use_backend",
]
