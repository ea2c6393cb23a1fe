"""Helpers shared by the Triton op families: launch-size arithmetic and the description of every compiled
variant that the static kernel report (`python -m benchmarks.static`) compiles for sm_80 and sm_90a.

Each op-family module exports `static_specs()`: the list of `KernelSpec` its launchers may launch, so that the
report compiles exactly what ships and nothing is copied out of the library to be inspected.
"""

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class KernelSpec:
    """One compiled variant of a Triton kernel: what `triton.compile` needs to build it without a GPU."""

    name: str  # a readable label, e.g. "norm_fwd[rms, bf16, N<=1024]"
    fn: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type ("*bf16", "*fp32", "i32", "i64", "fp32", "constexpr")
    constexprs: dict  # constexpr argument name -> value
    num_warps: int
    # Arguments the JIT would specialise as divisible by 16 (pointers from torch's allocator, N % 16 == 0):
    # the report compiles the common fast case the same way the JIT does.
    divisible_by_16: tuple = field(default_factory=tuple)
    num_stages: Optional[int] = None  # software-pipelining depth, for kernels that pipeline loads (attention)




def interpreting() -> bool:
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


# Host-side launch arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr functions whose
# every host call goes through Triton's JIT wrapper (~3 µs each, several per launch; issue 15).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of 2 ≥ n (1 for n ≤ 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Tests set this to True so every output a launcher allocates starts as NaN (or the integer minimum): an element a
# kernel forgot to write then fails the comparison instead of passing on leftover memory.
POISON_OUTPUTS = False


def empty(shape, dtype, device):
    """Allocate a kernel output (NaN-filled when POISON_OUTPUTS is set)."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)


@triton.jit
def tanh_and_sech2(u):
    """(tanh u, 1 − tanh² u). Triton has no tanh that its interpreter also runs. For |u| ≥ 0.55, with
    e = exp(−2|u|) ≤ 1/3: tanh = ±(1 − e)/(1 + e) and 1 − tanh² = 4e/(1 + e)², neither of which cancels (the
    derivative from 1 − tanh² would lose everything where tanh → ±1, the capped logits that matter most);
    below, the odd Taylor series to u¹⁷ (truncation < 5e-9 relative, 1.2 ulp in fp32)."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    is_small = a < 0.55
    us = tl.where(is_small, u, 0.0)  # the series only where it is used: elsewhere u¹⁷ and its square overflow
    u2 = us * us
    p = 6404582.0 / 10854718875.0
    p = -929569.0 / 638512875.0 + u2 * p
    p = 21844.0 / 6081075.0 + u2 * p
    p = -1382.0 / 155925.0 + u2 * p
    p = 62.0 / 2835.0 + u2 * p
    p = -17.0 / 315.0 + u2 * p
    p = 2.0 / 15.0 + u2 * p
    p = -1.0 / 3.0 + u2 * p
    small = us + us * (u2 * p)
    th = tl.where(is_small, small, tl.where(u < 0, -big, big))
    sech2 = tl.where(is_small, 1.0 - small * small, 4.0 * e / ((1.0 + e) * (1.0 + e)))
    return th, sech2
