"""Backend-neutral helpers that both kernel backends (kernels/ for Triton, fastlm/_cuda.py for CUDA C++) and the
ops layer use: output allocation, launch-size arithmetic and the device's SM count.

`empty` is the one allocator of every kernel output. Callers reach it as `_util.empty(...)` (the module
attribute, not an imported name), so a test can replace it for the whole library in one place: the test suite
swaps in a NaN-filling version so an element a kernel forgets to write fails the comparison (tests/conftest.py).
"""

import os

import torch


def empty(shape, dtype, device):
    """Allocate a kernel output (uninitialised: every element must be written by the kernel)."""
    return torch.empty(shape, dtype=dtype, device=device)


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1: CPU tensors, no GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_sm_counts: dict = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (asked once per device); a small fixed count under the interpreter,
    where a program's cost is its Python overhead and more programs only cost time."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        count = _sm_counts.get(index)
        if count is None:
            count = _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return count
    return 4


_capabilities: dict = {}


def capability(device: torch.device) -> tuple:
    """The CUDA device's compute capability (asked once per device); (0, 0) for any other device."""
    if device.type != "cuda":
        return (0, 0)
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capabilities.get(index)
    if cap is None:
        cap = _capabilities[index] = torch.cuda.get_device_capability(index)
    return cap


# Host-side launch arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr functions whose
# every host call goes through Triton's JIT wrapper (~3 µs each, several per launch; issue 15).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of 2 ≥ n (1 for n ≤ 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def rows_view(*tensors):
    """(rows, N) operands of an elementwise kernel as it walks them: viewed as one row (1, rows·N) when all are
    contiguous, so that programs never straddle the padding of short rows; otherwise as given."""
    if all(t.is_contiguous() for t in tensors):
        return [t.view(1, -1) for t in tensors]
    return list(tensors)


def unit_stride_last(t):
    """t, or a contiguous copy when its last dimension is strided: the kernels take any other strides but need
    unit stride along the last (feature) dimension, and autograd hands out expanded (stride 0) gradients. A last
    dimension of size 1 has no stride that matters."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()
