"""SwiGLU and GeGLU, the gated activations of the transformer MLP, forward and backward fused: Triton kernels and
their launchers.

Math, elementwise in fp32 whatever the storage dtype, with g = gate, u = up and dh the gradient of h:
  SwiGLU        h = silu(g)·u = g·σ(g)·u
                silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
  GeGLU "tanh"  h = gelu(g)·u,  gelu(g) = ½·g·(1 + t),  t = tanh(u'),  u' = k·(g + c·g³),  k = √(2/π), c = 0.044715
                gelu'(g) = ½·(1 + t) + ½·g·(1 − t²)·k·(1 + 3c·g²)
  GeGLU "none"  gelu(g) = g·Φ(g),  Φ(g) = ½·(1 + erf(g/√2));  gelu'(g) = Φ(g) + g·φ(g),  φ(g) = exp(−g²/2)/√(2π)
  backward      dg = dh·u·act'(g),  du = dh·act(g)
Saved for backward: nothing but the inputs g and u; the backward recomputes the activation (a few exps are cheaper
than writing an activation and reading it back).

Numerics: σ and 1 − σ = σ(−g) both come from er = e/(1 + e), e = exp(−|g|) ≤ 1 (σ = 1 − er or er), so neither
overflows nor cancels, at any g. Likewise GELU's (1 + t)/2 = 1 − er or er and 1 − t² = 4·er·(1 − er) with
e = exp(−2|u'|) for |u'| ≥ 0.55 (1 − t² would cancel where t → ±1, 1 + t in the negative tail), the odd series
below. act(g)·u is then g·s·u with s = act(g)/g, two roundings after s: fp32 evaluations of these compositions
(torch's included) land up to ~2 ulp from the exact value. Each output is rounded once, to the inputs' dtype.

Roofline, bytes per element for dtype size d: forward reads g and u and writes h, 3d; backward reads dh, g and u and
writes dg and du, 5d. Against a few exps and divisions per element, memory bound on any GPU: the goal is the
device's copy bandwidth.

Design:
- Operands come in the caller's shape (..., N) and are walked as rows with unit column stride and any row stride,
  so the two halves of a fused gate-up projection (`x.chunk(2, -1)`) are read in place, without a copy. When every
  operand is contiguous the launcher walks them as one row of rows·N elements (`fastlm._util.elementwise_rows`),
  so short or odd rows leave no lanes idle.
- A program moves one [BLOCK_M, BLOCK_N] tile of TILE elements per operand: 16 a thread at 8 warps, two 16-byte
  accesses per 16-bit operand (four for fp32), issued before any is used. Rows shorter than TILE stack BLOCK_M to
  a tile. 16-byte accesses come from the JIT's divisibility-by-16 specialisation of the pointers, the row strides
  and N (torch's allocations and the usual widths); other shapes run the same code with narrower accesses.
- Offsets are int64, columns too: a collapsed row passes 2^31 elements.
"""

import triton
import triton.language as tl

from fastlm import _util
from fastlm._util import cdiv, elementwise_rows, next_pow2
from ._common import tanh_and_sech2
from . import _launch

TILE = 4096  # elements of each operand a program moves
NUM_WARPS = 8
MIN_BLOCK_N = 16  # narrower rows are padded to this: one variant for every row under 16 elements
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}  # these kernels' ACT codes (csrc/gated.cu has its own)

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_C = tl.constexpr(0.044715)
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _activation(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32 for ACT 0 (silu), 1 (gelu, tanh approximation), 2 (gelu, erf)."""
    if ACT == 0:
        e = tl.exp(-tl.abs(g))
        er = e / (1.0 + e)  # σ(−|g|)
        pos = g >= 0
        sig = tl.where(pos, 1.0 - er, er)
        sig_neg = tl.where(pos, er, 1.0 - er)  # 1 − σ(g) = σ(−g)
        return g * sig, sig + g * sig * sig_neg
    elif ACT == 1:
        u = _SQRT_2_OVER_PI * (g + _GELU_C * g * g * g)
        # s = (1 + t)/2 and 1 − t² from er = e/(1 + e), e = exp(−2|u|): s = 1 − er (u > 0) or er (u < 0), and
        # 1 − t² = 4·er·(1 − er), one division, no cancellation at either end; the odd series of
        # kernels._common.tanh_and_sech2 below |u| = 0.55, where e is not small enough.
        t, sech2_small = tanh_and_sech2(u)
        e = tl.exp(-2.0 * tl.abs(u))
        er = e / (1.0 + e)
        small = tl.abs(u) < 0.55
        s = tl.where(small, 0.5 + 0.5 * t, tl.where(u > 0, 1.0 - er, er))
        sech2 = tl.where(small, sech2_small, 4.0 * er * (1.0 - er))
        return g * s, s + (0.5 * _SQRT_2_OVER_PI) * g * sech2 * (1.0 + (3.0 * _GELU_C) * g * g)
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * _SQRT_HALF))
        return g * cdf, cdf + g * (tl.exp(-0.5 * g * g) * _INV_SQRT_2PI)


@triton.jit
def _tile(pid, M, N, tiles_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile: int64 row offsets [BLOCK_M, 1], int64 columns [1, BLOCK_N] and the mask."""
    pid_m = pid // tiles_n
    pid_n = pid - pid_m * tiles_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    return rows.to(tl.int64)[:, None], cols[None, :], mask


@triton.jit
def _gated_fwd_kernel(
    G,  # (M, N) gate, row stride stride_g, column stride 1
    U,  # (M, N) up, the gate's dtype
    H,  # (M, N) output h = act(g)·u, the gate's dtype
    stride_g,
    stride_u,
    stride_h,
    M,
    N,
    tiles_n,  # column tiles per row: cdiv(N, BLOCK_N)
    ACT: tl.constexpr,  # 0 silu, 1 gelu (tanh), 2 gelu (erf)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), M, N, tiles_n, BLOCK_M, BLOCK_N)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _activation(g, ACT)
    tl.store(H + rows * stride_h + cols, (a * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    DH,  # (M, N) gradient of h
    G,  # (M, N) gate
    U,  # (M, N) up
    DG,  # (M, N) output: gradient of the gate
    DU,  # (M, N) output: gradient of up
    stride_dh,
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    M,
    N,
    tiles_n,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), M, N, tiles_n, BLOCK_M, BLOCK_N)
    dh = tl.load(DH + rows * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _activation(g, ACT)
    tl.store(DG + rows * stride_dg + cols, (dh * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * stride_du + cols, (dh * a).to(DU.dtype.element_ty), mask=mask)


def _config(N):
    """(BLOCK_M, BLOCK_N): whole rows up to TILE wide, several to a tile when short."""
    block_n = min(max(next_pow2(N), MIN_BLOCK_N), TILE)
    return TILE // block_n, block_n


def _run(kernel, operands, activation):
    operands, M, N, strides = elementwise_rows(*operands)
    block_m, block_n = _config(N)
    tiles_n = cdiv(N, block_n)
    grid = (cdiv(M, block_m) * tiles_n,)
    _launch.launch(kernel, grid, *operands, *strides, M, N, tiles_n, ACT=ACTIVATIONS[activation], BLOCK_M=block_m,
                   BLOCK_N=block_n, num_warps=NUM_WARPS)


def gated_fwd(gate, up, activation):
    """h = act(gate)·up. gate, up: one shape (..., N) and dtype, read as rows (`_util.rows`: in place at their row
    strides, or a contiguous copy); activation "silu", "gelu_tanh" or "gelu". Returns h in gate's shape and dtype,
    contiguous."""
    h = _util.empty(gate.shape, gate.dtype, gate.device)
    if h.numel() > 0:
        _run(_gated_fwd_kernel, (gate, up, h), activation)
    return h


def gated_bwd(dh, gate, up, activation):
    """Backward of gated_fwd: dh, gate, up of one shape, read as gated_fwd reads its operands. Returns (dgate, dup)
    in gate's shape and dtype, contiguous."""
    dgate = _util.empty(gate.shape, gate.dtype, gate.device)
    dup = _util.empty(gate.shape, gate.dtype, gate.device)
    if dgate.numel() > 0:
        _run(_gated_bwd_kernel, (dh, gate, up, dgate, dup), activation)
    return dgate, dup
