"""The backend switch: which implementation of an op runs.

Backends:
  "triton"  the Triton kernels in fastlm.kernels (CUDA tensors; CPU tensors too under TRITON_INTERPRET=1),
  "cuda"    the CUDA C++ kernels in fastlm._C (CUDA tensors, extension built),
  "torch"   the pure-PyTorch reference in fastlm.reference (any device, any floating dtype),
  "auto"    (default) CUDA tensors go to the kernel backend measured faster for the op on this device
            (fastlm._dispatch_table), CPU tensors to "torch". "auto" never fails where the reference can serve:
            when the kernel backends cannot run a call, it falls back and says so once.

The choice is read from, in order: the innermost `use_backend(...)` block, `set_backend(...)`, the environment
variable FASTLM_BACKEND at import, "auto". An explicitly chosen backend that cannot run a call raises
`BackendUnavailable` saying which and why; it never silently falls back.
"""

import contextlib
import os
import threading
import warnings

import torch

from fastlm import _dispatch_table
from fastlm.kernels._common import interpreting

BACKENDS = ("auto", "triton", "cuda", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this call (no GPU, extension not built, unsupported dtype or shape)."""


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_default = _check_name(os.environ.get("FASTLM_BACKEND", "auto").strip().lower() or "auto")
_local = threading.local()


def set_backend(name: str) -> None:
    """Set the process-wide backend ("auto", "triton", "cuda" or "torch")."""
    global _default
    _default = _check_name(name)


def get_backend() -> str:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else _default


@contextlib.contextmanager
def use_backend(name: str):
    """Run the block with the given backend (thread-local, nests)."""
    _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _triton_reason(device: torch.device, dtype: torch.dtype):
    """Why the triton backend cannot run on this device and dtype, or None when it can."""
    if dtype not in KERNEL_DTYPES:
        return f"the triton kernels take float32, float16 or bfloat16, not {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got a {device.type} tensor"


def _cuda_reason(device: torch.device, dtype: torch.dtype):
    from fastlm import _cuda

    if dtype not in KERNEL_DTYPES:
        return f"the cuda kernels take float32, float16 or bfloat16, not {dtype}"
    if device.type != "cuda":
        ok, why = _cuda.available()
        return why if not ok else f"the cuda backend needs CUDA tensors, got a {device.type} tensor"
    ok, why = _cuda.available(device)
    return None if ok else why


_REASONS = {"triton": _triton_reason, "cuda": _cuda_reason}
_warned = set()


def _say_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def resolve(op: str, device: torch.device, dtype: torch.dtype, unsupported=None) -> str:
    """The backend that runs `op` on tensors of this device and dtype.

    `unsupported(backend)`: the op's own reason why that kernel backend cannot take this call (a shape or an
    argument its kernels do not cover), or None when it can.
    """
    unsupported = unsupported or (lambda backend: None)
    name = get_backend()
    if name == "torch":
        return name
    if name != "auto":
        why = unsupported(name) or _REASONS[name](device, dtype)
        if why:
            raise BackendUnavailable(f"fastlm.{op}: backend {name!r} cannot run this call: {why}")
        return name
    if device.type != "cuda":
        return "torch"
    reasons = []
    for candidate in _dispatch_table.preferred(op, torch.cuda.get_device_name(device)):
        why = unsupported(candidate) or _REASONS[candidate](device, dtype)
        if why is None:
            return candidate
        reasons.append(f"{candidate}: {why}")
    _say_once((op, dtype, tuple(reasons)), f"fastlm.{op}: falling back to the torch reference ({'; '.join(reasons)})")
    return "torch"
