"""Helpers shared by the Triton op families: Triton device functions. The backend-neutral host helpers (output
allocation, launch arithmetic) are in fastlm/_util.py. The static kernel report (benchmarks/static.py) finds what
to compile by running the launchers.
"""

import triton
import triton.language as tl


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
