"""Backend-neutral helpers that both kernel backends (kernels/ for Triton, fastlm/_cuda.py for CUDA C++) and the
ops layer use: output allocation, launch-size arithmetic and the device's SM count.

`empty` is the one allocator of every kernel output. Callers reach it as `_util.empty(...)` (the module
attribute, not an imported name), so a test can replace it for the whole library in one place: the test suite
swaps in a NaN-filling version so an element a kernel forgets to write fails the comparison (tests/conftest.py).
"""

import os

import torch


def empty(shape, dtype, device):
    """Allocate a kernel output (uninitialised: every element must be written by the kernel).

    The sizes go to torch.empty as separate ints: its argument parser takes those in about half the time of one
    tuple or torch.Size (~1 µs of a small call's host path per output)."""
    return torch.empty(*shape, dtype=dtype, device=device) if shape else torch.empty((), dtype=dtype, device=device)


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


def elementwise_rows(*tensors):
    """An elementwise kernel's operands, all of one shape, as it walks them: (operands, M, N, their row strides).
    All contiguous: one row of numel elements (stride numel), so programs never straddle the padding of short rows;
    otherwise the rows of the last dimension, each operand at its own stride (`rows`: a contiguous copy of one that
    cannot be read so). No view is made either way (each would cost ~1–3 µs of the host path)."""
    if all(t.is_contiguous() for t in tensors):
        n = tensors[0].numel()
        return tensors, 1, n, (n,) * len(tensors)
    pairs = [rows(t) for t in tensors]
    N = tensors[0].shape[-1] if tensors[0].dim() else 1
    return [p[0] for p in pairs], tensors[0].numel() // N, N, [p[1] for p in pairs]


def row_stride(t):
    """The stride between the rows of t read as (rows, N) over its last dimension, or None when t cannot be read so.

    The row kernels (norms, gated) walk M = numel / N rows at one stride with unit stride along a row, so they take
    t in its own shape, with no reshape (a view costs ~1–3 µs of host time, and one more autograd node each way),
    whenever its leading dimensions collapse to a single stride: contiguous tensors, row slices of a wider tensor,
    expanded (stride 0) gradients. Dimensions of size 1 have no stride that matters. One row (or none): N.
    """
    shape, strides = t.shape, t.stride()
    if not shape or (strides[-1] != 1 and shape[-1] != 1):
        return None
    step, span = None, 1
    for i in range(len(shape) - 2, -1, -1):
        size = shape[i]
        if size == 1:
            continue
        if step is None:
            step = strides[i]
        elif strides[i] != step * span:
            return None
        span *= size
    return shape[-1] if step is None else step


def rows(t):
    """(t, its row stride) when `row_stride` can read t as rows, else (a contiguous copy of t, N)."""
    stride = row_stride(t)
    if stride is None:
        t = t.contiguous()
        stride = t.shape[-1] if t.dim() else 1
    return t, stride


def flat(t):
    """t as a contiguous 1-D tensor: t itself when it already is one (no reshape call: ~1–2 µs each on the host)."""
    return t if t.dim() == 1 and t.is_contiguous() else t.reshape(-1).contiguous()


def as_2d(t):
    """t (..., N) as (rows, N): t itself when 2-D, else a reshape (a view where the strides allow)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def unit_stride_last(t):
    """t, or a contiguous copy when its last dimension is strided: the kernels take any other strides but need
    unit stride along the last (feature) dimension, and autograd hands out expanded (stride 0) gradients. A last
    dimension of size 1 has no stride that matters."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def size1_zero_strides(t):
    """t's strides, 0 for size-1 dimensions: never multiplied by a non-zero index, they must not cost a kernel its
    16-byte accesses (Triton's divisibility specialisation, the CUDA kernels' vector path)."""
    return [0 if n == 1 else st for n, st in zip(t.shape, t.stride())]


def bshd(t, heads_first):
    """A rotary operand's (shape, strides) in (batch, seq, heads, head_dim) order: seq and heads swapped when
    heads_first, with no view op (each costs ~1 µs of the host path); strides as size1_zero_strides."""
    shape, strides = tuple(t.shape), size1_zero_strides(t)
    if heads_first:
        return (shape[0], shape[2], shape[1], shape[3]), (strides[0], strides[2], strides[1], strides[3])
    return shape, strides


def table_strides(t):
    """A rotary cos/sin table's (batch, seq) strides (size1_zero_strides): a (seq, rot) table's batch stride is 0,
    one table for every sequence; no view op."""
    s = size1_zero_strides(t)
    return s[:2] if t.dim() == 3 else [0, s[0]]
