"""The backend switch: which implementation of an op runs.

Backends:
  "triton"  the Triton kernels in fastlm.kernels (CUDA tensors; CPU tensors too under TRITON_INTERPRET=1),
  "cuda"    the CUDA C++ kernels in fastlm._C (CUDA tensors, extension built),
  "torch"   the pure-PyTorch reference in fastlm.reference (any device, any floating dtype),
  "auto"    (default) CUDA tensors go to the implementation measured fastest for the op on this device
            (fastlm._dispatch_table): a fastlm kernel backend, or torch's own kernel for the calls it covers
            (NATIVE: "torch:eager" is F.layer_norm / F.rms_norm, "torch:sdpa-cudnn" and "torch:sdpa-flash" are
            SDPA with that backend first), so that `auto` never loses to what the user already has. CPU tensors
            go to "torch". "auto" never fails where the reference can serve: when no kernel can run a call, it
            falls back and says so once.

The choice is read from, in order: the innermost `use_backend(...)` block, `set_backend(...)`, the environment
variable FASTLM_BACKEND at import, "auto". An explicitly chosen backend that cannot run a call raises
`BackendUnavailable` saying which and why; it never silently falls back.
"""

import contextlib
import os
import threading
import warnings

import torch

from fastlm import _cuda, _dispatch_table
from fastlm._util import interpreting

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
    if dtype not in KERNEL_DTYPES:
        return f"the cuda kernels take float32, float16 or bfloat16, not {dtype}"
    if device.type != "cuda":
        ok, why = _cuda.available()
        return why if not ok else f"the cuda backend needs CUDA tensors, got a {device.type} tensor"
    ok, why = _cuda.available(device)
    return None if ok else why


_REASONS = {"triton": _triton_reason, "cuda": _cuda_reason}

# torch's own kernels that `auto` may route an op to (never chosen by name: only from a measured table), each a
# name the benchmark's peer of the same computation carries (benchmarks/harness.py, Provider.native).
NATIVE = {
    "layer_norm": ("torch:eager",),
    "rms_norm": ("torch:eager",),
    "attention": ("torch:sdpa-cudnn", "torch:sdpa-flash"),
    "attention_decode": ("torch:sdpa-cudnn", "torch:sdpa-flash"),
}


def _native_reason(op: str, name: str, device: torch.device, dtype: torch.dtype):
    if name not in NATIVE.get(op, ()):
        return f"torch has no kernel {name!r} for {op}"
    if device.type != "cuda":
        return f"{name} is taken for CUDA tensors only"
    if dtype not in KERNEL_DTYPES:
        return f"{name} is taken for float32, float16 and bfloat16 only"
    return None


def launchers(backend: str, triton_module):
    """A kernel backend's launchers for one op: `triton_module` (kernels/<op>.py) for "triton", fastlm._cuda for
    "cuda". Both follow the launcher contract (docs/DESIGN.md): the same function names and signatures, tensors
    and plain values in, freshly allocated outputs out."""
    return triton_module if backend == "triton" else _cuda


_warned = set()


def say_once(key, message, stacklevel=3):
    """Warn the first time `key` occurs; never while torch.compile traces (a warning is a side effect Dynamo
    cannot put in a graph: it would break the graph)."""
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(message, stacklevel=stacklevel + 1)


def device_index(device: torch.device) -> int:
    """The CUDA device's index (the current device for a bare "cuda"); torch.compile folds it to a constant."""
    return device.index if device.index is not None else torch.cuda.current_device()


_device_names: dict = {}


@torch.compiler.assume_constant_result
def device_name(index: int) -> str:
    """torch.cuda.get_device_name, asked once per device. Under torch.compile the name is a constant of the
    trace (a string-returning call cannot be a graph node), so choosing a backend never breaks a graph."""
    name = _device_names.get(index)
    if name is None:
        name = _device_names[index] = torch.cuda.get_device_name(index)
    return name


def _why_not(op, backend, device, dtype, unsupported):
    why = unsupported(backend) if unsupported is not None else None
    if why:
        return why
    if backend.startswith("torch:"):
        return _native_reason(op, backend, device, dtype)
    return _REASONS[backend](device, dtype)


def resolve(op: str, device: torch.device, dtype: torch.dtype, unsupported=None) -> str:
    """The backend that runs `op` on tensors of this device and dtype.

    `unsupported(backend)`: the op's own reason why that kernel backend cannot take this call (a shape or an
    argument its kernels do not cover), or None when it can. Under "auto" it is also asked about torch's own
    kernels ("torch:..." names, see NATIVE) that the measured table puts first: an op that has such a path must
    say which calls it covers (every other op's NATIVE entry is empty, so they are never chosen).

    Traceable by torch.compile without a graph break: the device queries are constants of the trace
    (`device_name`, `_cuda.available`), and nothing here warns while tracing.
    """
    name = get_backend()
    if name == "torch":
        return name
    if name != "auto":
        why = _why_not(op, name, device, dtype, unsupported)
        if why:
            raise BackendUnavailable(f"fastlm.{op}: backend {name!r} cannot run this call: {why}")
        return name
    if device.type != "cuda":
        return "torch"
    reasons = []
    for candidate in _dispatch_table.preferred(op, device_name(device_index(device))):
        why = _why_not(op, candidate, device, dtype, unsupported)
        if not why:
            return candidate
        reasons.append(f"{candidate}: {why}")
    message = f"fastlm.{op}: falling back to the torch reference ({'; '.join(reasons)})"
    say_once(message, message)
    return "torch"
