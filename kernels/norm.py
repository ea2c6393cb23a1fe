"""LayerNorm and RMSNorm, with the pre-norm residual add fused: Triton kernels and their launchers.

Math, per row v of length N (all in fp32 whatever the storage dtype):
  residual add    s = round_to_dtype(x + residual), stored as residual_out; the norm then reads v = s, so the
                  result equals the unfused `y = norm(x + residual)` in x's dtype bit for bit in its input.
  LayerNorm       mean = Σv/N, var = Σ(v-mean)²/N, rstd = 1/sqrt(var+eps), xhat = (v-mean)·rstd, y = xhat·w + b
  RMSNorm         rstd = 1/sqrt(Σv²/N + eps), xhat = v·rstd, y = xhat·(offset + w)   (offset = 1: Gemma's form)
Backward, with g = dy·w_eff (w_eff = w, or offset + w for RMSNorm, or 1 without weight):
  LayerNorm       dx = rstd·(g − (xhat·mean(g·xhat) + mean(g)))
  RMSNorm         dx = rstd·(g − xhat·mean(g·xhat)) = rstd·g − v·rstd³·mean(g·v) (the form computed)
  both            dx += d(residual_out) when the residual was fused; d(residual) = dx;
                  dw = Σ_rows dy·xhat, db = Σ_rows dy (fp32 partials per program, then one reduction).
Saved for backward: the normalized input v (x, or residual_out), mean (LayerNorm) and rstd: 8 bytes a row.

Roofline (bytes per element, dtype size d): forward reads x and writes y: 2d (4d with the residual: + residual
read, + residual_out write); backward reads dy and v and writes dx: 3d (+d for d(residual_out)). The weight and the
per-row statistics are noise next to that for rows ≥ a few thousand. Everything is memory bound; the goal is the
copy bandwidth of the device.

Design:
- Forward, N ≤ MAX_FUSED_N: a program holds a [BLOCK_M, BLOCK_N] tile of whole rows in registers, one read and
  one write per element. Small rows are packed BLOCK_M to a program so each program still moves ~TILE elements.
- Forward, N > MAX_FUSED_N (up to and past 65536): one program per row walks it in BLOCK_N chunks twice: statistics
  first (LayerNorm merges per-chunk mean and M2 with Chan's formula, which stays accurate where E[x²]−E[x]²
  cancels), then normalize. The second read mostly hits L2. Keeping a 64k row in registers would spill.
- Backward, rows up to BWD_MAX_FUSED_N: G programs (what fits an SM at once, times the SMs) each own a contiguous
  range of rows, so dw/db accumulate in fp32 registers without atomics or locks, and the result is deterministic;
  the G partial rows are summed once at the end (_sum_partials_kernel, which also casts to the parameter's dtype).
  Bandwidth is a matter of bytes in flight: an H200 needs ~5 MB in flight (4.8 TB/s × ~1 µs), ~36 KB per SM. A
  program's row loop is a dependence chain (load dy and v, two cross-warp reductions with barriers, store dx), so
  without overlap an SM has a tile in flight only while it waits for it, and none while it reduces: the old
  kernel (at most 2 programs an SM, 1 for N = 8192 at 128 registers; one tile of dy and v, 8–32 KB, in flight
  each, none during the reductions; 64-bit accesses for 16-bit rows up to 2048) was far below it. Now
  the loop is software-pipelined (tl.range num_stages: cp.async copies of the next NUM_STAGES − 1 tiles of dy, v
  and dres into shared memory, no registers held), sized so an SM keeps ~BWD_IN_FLIGHT_BYTES in flight through
  the reductions, and every thread's share of a tile is a 16-byte vector per tensor (128-bit accesses).
- Backward, wider rows: a row that does not fit a program's registers would have to be read twice and its dw
  partial kept in memory (read-modify-written at every row: far more traffic than the row itself). Instead one
  kernel computes each row's two reductions (mean(g·xhat), mean(g)), then programs over (column block × row
  range) compute dx with no cross-thread reduction at all, their dw/db partials in registers. Cost: dy and v are
  read twice (5 passes over the data against 3), the price of rows wider than registers without grid-wide sync.
- Offsets are int64: rows × N passes 2^31 at 32k rows × 64k. Row indices of the kernels that keep rows in
  registers stay int32 (int64 ones cost up to 18 registers there): their launchers refuse a row count whose
  programs would index past 2^31 − 1, which only a degenerate (~2^31, tiny N) input reaches.
"""

import functools

import torch
import triton
import triton.language as tl

from fastlm import _util
from fastlm._util import cdiv, next_pow2, num_sms
from . import _launch

MAX_FUSED_N = 8192  # widest row kept whole in registers: 16 fp32 values a thread per tensor at 16 warps
CHUNK_N = 4096  # chunk of a wider row
TILE = 4096  # elements a program handles per step when rows are short


@triton.jit
def _norm_fwd_kernel(
    X,  # (M, N) input, row stride stride_x, column stride 1
    R,  # (M, N) residual, x's dtype (unused unless HAS_RES)
    W,  # (N,) weight, x's dtype or fp32 (unused unless HAS_W)
    B,  # (N,) bias (unused unless HAS_B)
    Y,  # (M, N) output, x's dtype
    RES_OUT,  # (M, N) x + residual, x's dtype (unused unless HAS_RES)
    MEAN,  # (M,) fp32 (unused for RMSNorm)
    RSTD,  # (M,) fp32
    stride_x,
    stride_r,
    stride_y,
    stride_ro,
    M,
    N,
    eps,
    offset,  # added to the weight of RMSNorm
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # ≥ N: whole rows
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    v = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (v + r).to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + rows64 * stride_ro + cols[None, :], s, mask=mask)
        v = s.to(tl.float32)
    if IS_RMS:
        rstd = tl.rsqrt(tl.sum(v * v, axis=1) / N + eps)
        xhat = v * rstd[:, None]
    else:
        mean = tl.sum(v, axis=1) / N
        vc = tl.where(mask, v - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(vc * vc, axis=1) / N + eps)
        xhat = vc * rstd[:, None]
        tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        if IS_RMS:
            w = w + offset
        xhat = xhat * w[None, :]
    if HAS_B:
        xhat = xhat + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], xhat.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_chunked_kernel(
    X,  # (M, N) input
    R,  # (M, N) residual (unused unless HAS_RES)
    W,  # (N,) weight (unused unless HAS_W)
    B,  # (N,) bias (unused unless HAS_B)
    Y,  # (M, N) output
    RES_OUT,  # (M, N) x + residual (unused unless HAS_RES)
    MEAN,  # (M,) fp32 (unused for RMSNorm)
    RSTD,  # (M,) fp32
    stride_x,
    stride_r,
    stride_y,
    stride_ro,
    M,
    N,
    eps,
    offset,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr,  # chunk width; one program per row
):
    row = tl.program_id(0).to(tl.int64)
    cols0 = tl.arange(0, BLOCK_N)
    mean = 0.0
    acc = 0.0  # Σv² for RMSNorm, M2 = Σ(v-mean)² for LayerNorm
    for start in range(0, N, BLOCK_N):
        cols = start + cols0
        mask = cols < N
        v = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            s = (v + r).to(RES_OUT.dtype.element_ty)
            tl.store(RES_OUT + row * stride_ro + cols, s, mask=mask)
            v = s.to(tl.float32)
        if IS_RMS:
            acc += tl.sum(v * v)
        else:
            count = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            seen = start * 1.0  # elements merged so far (a float, as the merge weights are)
            chunk_mean = tl.sum(v) / count
            d = tl.where(mask, v - chunk_mean, 0.0)
            delta = chunk_mean - mean
            total = seen + count
            mean += delta * (count / total)
            acc += tl.sum(d * d) + delta * delta * (seen * count / total)
    rstd = tl.rsqrt(acc / N + eps)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    if HAS_RES:
        # The second pass re-reads residual_out, which other threads of this program may have written.
        tl.debug_barrier()
    for start in range(0, N, BLOCK_N):
        cols = start + cols0
        mask = cols < N
        if HAS_RES:
            v = tl.load(RES_OUT + row * stride_ro + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            v = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            xhat = v * rstd
        else:
            xhat = (v - mean) * rstd
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if IS_RMS:
                w = w + offset
            xhat = xhat * w
        if HAS_B:
            xhat = xhat + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, xhat.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    DY,  # (M, N) gradient of y
    XIN,  # (M, N) the normalized input (x, or residual_out)
    W,  # (N,) weight (unused unless HAS_W)
    MEAN,  # (M,) fp32 (unused for RMSNorm)
    RSTD,  # (M,) fp32
    DRES,  # (M, N) gradient of residual_out (unused unless HAS_DRES)
    DX,  # (M, N) output: gradient of x (and of the residual)
    DW_PART,  # (G, N) fp32 output: this program's partial Σ dy·xhat (unused unless HAS_DW)
    DB_PART,  # (G, N) fp32 output: this program's partial Σ dy (unused unless HAS_DB)
    stride_dy,
    stride_x,
    stride_dres,
    stride_dx,
    M,
    N,
    rows_per_prog,  # a multiple of BLOCK_M
    offset,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_DRES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # ≥ N: whole rows
    NUM_STAGES: tl.constexpr,  # tiles of dy, v (and dres) in flight: Triton pipelines the loop's loads with cp.async
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        if IS_RMS:
            w = w + offset
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # The software pipeline keeps the next NUM_STAGES − 1 tiles' loads in flight (into shared memory, costing no
    # registers) while this tile's row reductions, whose barriers would otherwise leave the memory system idle, run.
    for r0 in tl.range(row_start, row_end, BLOCK_M, num_stages=NUM_STAGES):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        v = tl.load(XIN + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        if IS_RMS:
            xhat = v * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (v - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        if IS_RMS:
            # rstd·g − v·rstd³·mean(g·v): the same value as rstd·(g − xhat·mean(g·xhat)) with fewer roundings
            # before the cancellation (short rows, where xhat² ≈ 1, lose the most there).
            c1 = tl.sum(g * v, axis=1) / N
            dx = g * rstd[:, None] - v * (c1 * rstd * rstd * rstd)[:, None]
        else:
            c1 = tl.sum(g * xhat, axis=1) / N
            c2 = tl.sum(g, axis=1) / N
            dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(DRES + rows64 * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw_acc += dy * xhat
        if HAS_DB:
            db_acc += dy
    if HAS_DW:
        tl.store(DW_PART + pid.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if HAS_DB:
        tl.store(DB_PART + pid.to(tl.int64) * N + cols, tl.sum(db_acc, axis=0), mask=col_mask)


@triton.jit
def _norm_bwd_row_stats_kernel(
    DY,  # (M, N) gradient of y
    XIN,  # (M, N) the normalized input
    W,  # (N,) weight (unused unless HAS_W)
    MEAN,  # (M,) fp32 (unused for RMSNorm)
    RSTD,  # (M,) fp32
    C1,  # (M,) fp32 output: mean(g·xhat), times rstd for RMSNorm (mean(g·v)·rstd³, see _norm_bwd_kernel)
    C2,  # (M,) fp32 output: mean(g) (unused for RMSNorm)
    stride_dy,
    stride_x,
    N,
    offset,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_N: tl.constexpr,  # chunk width; one program per row
    NUM_STAGES: tl.constexpr,  # chunks in flight
):
    """First kernel of the wide-row backward: a row's two reductions. Per-lane partial sums across the chunks, one
    cross-thread reduction at the end, so the chunk loop is pure streaming."""
    row = tl.program_id(0).to(tl.int64)
    cols0 = tl.arange(0, BLOCK_N)
    rstd = tl.load(RSTD + row)
    mean = 0.0
    if not IS_RMS:
        mean = tl.load(MEAN + row)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in tl.range(0, N, BLOCK_N, num_stages=NUM_STAGES):
        cols = start + cols0
        mask = cols < N
        g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(XIN + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if IS_RMS:
                w = w + offset
            g = g * w
        if IS_RMS:
            acc1 += g * v
        else:
            acc1 += g * tl.where(mask, (v - mean) * rstd, 0.0)
            acc2 += g
    c1 = tl.sum(acc1, axis=0) / N
    if IS_RMS:
        c1 = c1 * rstd * rstd * rstd
    else:
        tl.store(C2 + row, tl.sum(acc2, axis=0) / N)
    tl.store(C1 + row, c1)


@triton.jit
def _norm_bwd_cols_kernel(
    DY,  # (M, N) gradient of y
    XIN,  # (M, N) the normalized input
    W,  # (N,) weight (unused unless HAS_W)
    MEAN,  # (M,) fp32 (unused for RMSNorm)
    RSTD,  # (M,) fp32
    C1,  # (M,) fp32, from _norm_bwd_row_stats_kernel
    C2,  # (M,) fp32 (unused for RMSNorm)
    DRES,  # (M, N) gradient of residual_out (unused unless HAS_DRES)
    DX,  # (M, N) output
    DW_PART,  # (S, N) fp32 output: this row range's partial Σ dy·xhat over its columns (unused unless HAS_DW)
    DB_PART,  # (S, N) fp32 output (unused unless HAS_DB)
    stride_dy,
    stride_x,
    stride_dres,
    stride_dx,
    M,
    N,
    rows_per_prog,
    offset,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_DRES: tl.constexpr,
    BLOCK_N: tl.constexpr,  # columns of a program
    NUM_STAGES: tl.constexpr,  # rows in flight (Triton's software pipelining of the loop's loads)
):
    """Second kernel of the wide-row backward: program (c, s) owns columns [c·BLOCK_N, (c+1)·BLOCK_N) of the rows of
    range s. With the row reductions known, every element is independent: no cross-thread reduction in the loop,
    the dw/db partials of its columns stay in registers, and the loop's loads are pipelined NUM_STAGES rows deep."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    s = tl.program_id(1).to(tl.int64)
    row_start = s * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        if IS_RMS:
            w = w + offset
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # The row as row_start (int64) + i: the interpreter runs the loop over Python ints, which would meet the i32
    # strides in 32 bits.
    for i in tl.range(0, row_end - row_start, num_stages=NUM_STAGES):
        row = row_start + i
        dy = tl.load(DY + row * stride_dy + cols, mask=col_mask, other=0.0).to(tl.float32)
        v = tl.load(XIN + row * stride_x + cols, mask=col_mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        c1 = tl.load(C1 + row)
        g = dy
        if HAS_W:
            g = dy * w
        if IS_RMS:
            xhat = v * rstd
            dx = g * rstd - v * c1
        else:
            mean = tl.load(MEAN + row)
            c2 = tl.load(C2 + row)
            xhat = tl.where(col_mask, (v - mean) * rstd, 0.0)
            dx = (g - (xhat * c1 + c2)) * rstd
        if HAS_DRES:
            dx += tl.load(DRES + row * stride_dres + cols, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=col_mask)
        if HAS_DW:
            dw_acc += dy * xhat
        if HAS_DB:
            db_acc += dy
    if HAS_DW:
        tl.store(DW_PART + s * N + cols, dw_acc, mask=col_mask)
    if HAS_DB:
        tl.store(DB_PART + s * N + cols, db_acc, mask=col_mask)


@triton.jit
def _sum_partials_kernel(
    DW_PART,  # (G, N) fp32 (unused unless HAS_DW)
    DB_PART,  # (G, N) fp32 (unused unless HAS_DB)
    DW,  # (N,) output, the weight's dtype (unused unless HAS_DW)
    DB,  # (N,) output (unused unless HAS_DB)
    G,
    N,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """dw = Σ_g DW_PART[g], db likewise, in a fixed order (deterministic), cast to the parameter's dtype: one launch
    for both instead of a sum and a cast each."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g0 in tl.range(0, G, BLOCK_G, num_stages=NUM_STAGES):
        gs = g0 + tl.arange(0, BLOCK_G)
        mask = (gs < G)[:, None] & col_mask[None, :]
        offs = gs.to(tl.int64)[:, None] * N + cols[None, :]
        if HAS_DW:
            dw += tl.load(DW_PART + offs, mask=mask, other=0.0)
        if HAS_DB:
            db += tl.load(DB_PART + offs, mask=mask, other=0.0)
    if HAS_DW:
        tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    if HAS_DB:
        tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_mask)


def _fused_config(N):
    """(BLOCK_M, BLOCK_N, num_warps) of the forward for rows kept whole, at most 16 warps, ~16 values a thread per
    tensor; small rows packed BLOCK_M to a program."""
    block_n = next_pow2(N)
    block_m = max(1, min(TILE // block_n, 64))
    num_warps = max(1, min(16, block_m * block_n // (32 * 16)))
    return block_m, block_n, num_warps


def _chunked_config():
    return CHUNK_N, 8


def _fused(N):
    return N <= MAX_FUSED_N


# ---- backward launch table (benchmarks/norm_sweep.py varies these on a GPU) ----
# They are read through the cached _bwd_plan: whatever changes them at run time must call _bwd_plan.cache_clear()
# (benchmarks/norm_sweep.py --tune does).
# Rows kept whole (N ≤ BWD_MAX_FUSED_N[element size]): a thread holds BWD_VECTORS 16-byte vectors of each tensor per
# tile, so every load is 128 bits wide; rows narrower than a BWD_SMALL_WARPS-warp tile are packed BLOCK_M to a
# program; up to BWD_MAX_WARPS warps cover a wide row (past that a thread holds more). BWD_PROGRAMS_PER_SM[warps]
# programs per SM (what their registers allow: ≤ 65536 / (32·warps·programs) each, checked by the static report),
# and each keeps NUM_STAGES − 1 tiles of dy, v and dres in flight, as many as make the SM's bytes in flight reach
# BWD_IN_FLIGHT_BYTES, within BWD_SMEM_BYTES of shared memory a program (A100: 163 KB a block at most).
BWD_VECTORS = 1
BWD_SMALL_WARPS = 8
BWD_MAX_WARPS = 16
BWD_MAX_BLOCK_M = 512
BWD_PROGRAMS_PER_SM = {1: 8, 2: 8, 4: 4, 8: 2, 16: 1, 32: 1}
BWD_IN_FLIGHT_BYTES = 64 * 1024
BWD_SMEM_BYTES = 144 * 1024
BWD_MAX_STAGES = 4
BWD_MAX_FUSED_N = {2: 8192, 4: 8192}
# Wider rows: a row-statistics kernel (one program per row, BWD_STATS_WARPS warps over CHUNK_N chunks,
# BWD_STATS_STAGES deep), then programs over (BLOCK_N columns × a range of rows), BWD_COLS_WARPS warps holding
# BWD_COLS_VECTORS 16-byte vectors a thread, about BWD_COLS_PROGRAMS_PER_SM of them per SM, each walking at least
# BWD_COLS_MIN_ROWS rows, BWD_COLS_STAGES deep.
BWD_STATS_WARPS = 8
BWD_STATS_STAGES = 3
BWD_COLS_WARPS = 4
BWD_COLS_VECTORS = 1
BWD_COLS_PROGRAMS_PER_SM = 8
BWD_COLS_MIN_ROWS = 16
BWD_COLS_STAGES = 4
# The final Σ over the partial rows: BLOCK_G partial rows × BLOCK_N columns per step (N / 32 programs: 128 for
# N = 4096), SUM_STAGES steps in flight.
SUM_BLOCK_G, SUM_BLOCK_N, SUM_WARPS, SUM_STAGES = 32, 32, 4, 3


def _bwd_fused_config(N, elem_size):
    """(BLOCK_M, BLOCK_N, num_warps, programs per SM, NUM_STAGES) of the fused backward."""
    per_thread = BWD_VECTORS * max(1, 16 // elem_size)
    block_n = next_pow2(N)
    small_tile = per_thread * 32 * BWD_SMALL_WARPS
    if block_n >= small_tile:
        block_m, num_warps = 1, min(BWD_MAX_WARPS, block_n // (32 * per_thread))
    else:
        block_m, num_warps = min(BWD_MAX_BLOCK_M, small_tile // block_n), BWD_SMALL_WARPS
    per_sm = BWD_PROGRAMS_PER_SM.get(num_warps, 1)
    tile_bytes = 3 * block_m * block_n * elem_size  # dy, v, dres
    ahead = cdiv(BWD_IN_FLIGHT_BYTES, tile_bytes * per_sm)
    stages = max(2, min(BWD_MAX_STAGES, 1 + ahead, BWD_SMEM_BYTES // tile_bytes))
    return block_m, block_n, num_warps, per_sm, stages


def _bwd_cols_config(elem_size):
    """(BLOCK_N, num_warps, NUM_STAGES) of the wide-row backward's column kernel."""
    return BWD_COLS_VECTORS * max(1, 16 // elem_size) * 32 * BWD_COLS_WARPS, BWD_COLS_WARPS, BWD_COLS_STAGES


def _bwd_fused(N, elem_size):
    return N <= BWD_MAX_FUSED_N.get(elem_size, MAX_FUSED_N)


def _check_rows(M, end):
    """The fused kernels index rows in int32, up to `end` (their programs' last row, masked past M)."""
    if end >= 2**31:
        raise ValueError(f"the triton norm kernels index rows in int32: {M} rows are too many for rows of this width")


def norm_fwd(x, weight, bias, residual, eps, is_rms, offset):
    """Forward of LayerNorm (is_rms False) or RMSNorm (is_rms True) over the rows of x.

    x: (..., N), read as M rows at one stride (`_util.rows`: a 2-D (M, N) with column stride 1, or any shape whose
    leading dimensions collapse so; otherwise a contiguous copy is read); weight, bias: (N,) or None; residual: like
    x (its own row stride), or None. Returns y and residual_out (None without a residual) in x's shape, contiguous;
    mean (M,) fp32 or None (RMSNorm), rstd (M,) fp32.
    """
    x, sx = _util.rows(x)
    shape, dtype, device = x.shape, x.dtype, x.device
    N = shape[-1]
    M = x.numel() // N if N else 0
    fused = _fused(N)
    if fused:
        block_m, block_n, num_warps = _fused_config(N)
        _check_rows(M, cdiv(M, block_m) * block_m)
    y = _util.empty(shape, dtype, device)
    rstd = _util.empty((M,), torch.float32, device)
    mean = None if is_rms else _util.empty((M,), torch.float32, device)
    if residual is not None:
        residual, sr = _util.rows(residual)
        residual_out = _util.empty(shape, dtype, device)
    else:
        sr, residual_out = 0, None
    if M == 0:
        return y, residual_out, mean, rstd
    dummy = rstd  # stands in for absent pointers; never dereferenced (its HAS_* flag is off)
    has_res = residual is not None
    args = (x, residual if has_res else x, weight if weight is not None else dummy,
            bias if bias is not None else dummy, y, residual_out if has_res else y,
            mean if mean is not None else dummy, rstd, sx, sr, N, N if has_res else 0, M, N, float(eps),
            float(offset))
    if fused:
        _launch.launch(_norm_fwd_kernel, (cdiv(M, block_m),), *args, IS_RMS=is_rms, HAS_W=weight is not None,
                       HAS_B=bias is not None, HAS_RES=has_res, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    else:
        block_n, num_warps = _chunked_config()
        _launch.launch(_norm_fwd_chunked_kernel, (M,), *args, IS_RMS=is_rms, HAS_W=weight is not None,
                       HAS_B=bias is not None, HAS_RES=has_res, BLOCK_N=block_n, num_warps=num_warps)
    return y, residual_out, mean, rstd


# How these kernels run, fixed when they were defined (@triton.jit makes interpreted functions under
# TRITON_INTERPRET=1): read once, not from the environment on every call.
_INTERPRETED = not isinstance(_sum_partials_kernel, triton.runtime.JITFunction)


@functools.lru_cache(maxsize=1024)
def _bwd_plan(M, N, elem, sms, interpreted):
    """The backward's launch plan for M rows of N elements of `elem` bytes on `sms` SMs: (fused, BLOCK_M, BLOCK_N,
    num_warps, NUM_STAGES, programs, rows a program, column blocks, the Σ kernel's BLOCK_N). Cached: it is the same
    for every step of a training run, and its arithmetic is a few µs of every call's host path. Computed from the
    BWD_* table: whatever changes the table (benchmarks/norm_sweep.py --tune) clears the cache."""
    fused = _bwd_fused(N, elem)
    block_m = col_blocks = 1
    if fused:
        block_m, block_n, num_warps, per_sm, stages = _bwd_fused_config(N, elem)
        programs = max(1, min(cdiv(M, block_m), per_sm * sms))
        rows_per_prog = max(1, cdiv(cdiv(M, programs), block_m)) * block_m
        programs = max(1, cdiv(M, rows_per_prog))
        _check_rows(M, programs * rows_per_prog)
    else:
        block_n, num_warps, stages = _bwd_cols_config(elem)
        col_blocks = cdiv(N, block_n)
        programs = cdiv(BWD_COLS_PROGRAMS_PER_SM * sms, col_blocks)
        programs = max(1, min(cdiv(M, BWD_COLS_MIN_ROWS), programs))
        rows_per_prog = max(1, cdiv(M, programs))
        programs = max(1, cdiv(M, rows_per_prog))
    # Under the interpreter a program costs ~20 ms whatever its size: wide Σ blocks there, same code.
    sum_block_n = max(SUM_BLOCK_N, min(next_pow2(N), 4096)) if interpreted else SUM_BLOCK_N
    return fused, block_m, block_n, num_warps, stages, programs, rows_per_prog, col_blocks, sum_block_n


def norm_bwd(dy, xin, weight, mean, rstd, dres, is_rms, offset, need_dw, need_db):
    """Backward of norm_fwd.

    dy, xin, dres: (..., N) in one shape, each M rows at its own stride as norm_fwd reads x (dres, the gradient
    of residual_out, may be None); weight (N,) or None; mean (M,) or None; rstd (M,). Returns dx in xin's shape,
    contiguous, dw (N,) in weight's dtype or None, db (N,) in weight's dtype or None.
    """
    xin, sx = _util.rows(xin)
    dy, sdy = _util.rows(dy)
    shape, device = xin.shape, xin.device
    N = shape[-1]
    M = xin.numel() // N if N else 0
    has_w = weight is not None
    need_dw = need_dw and has_w
    wdtype = weight.dtype if has_w else xin.dtype
    fused, block_m, block_n, num_warps, stages, programs, rows_per_prog, col_blocks, sum_block_n = _bwd_plan(
        M, N, xin.element_size(), num_sms(device), _INTERPRETED)
    dx = _util.empty(shape, xin.dtype, device)
    if M == 0:
        zeros = lambda: torch.zeros(N, dtype=wdtype, device=device)  # noqa: E731
        return dx, zeros() if need_dw else None, zeros() if need_db else None
    # Every program writes every element of its partial rows (all N columns of row `pid`).
    dummy = rstd
    dw_part = _util.empty((programs, N), torch.float32, device) if need_dw else dummy
    db_part = _util.empty((programs, N), torch.float32, device) if need_db else dummy
    dres, sdres = _util.rows(dres) if dres is not None else (None, 0)
    w_arg = weight if has_w else dummy
    mean_arg = mean if mean is not None else dummy
    tail = (dres if dres is not None else dy, dx, dw_part, db_part, sdy, sx, sdres, N, M, N, rows_per_prog,
            float(offset))
    if fused:
        _launch.launch(_norm_bwd_kernel, (programs,), dy, xin, w_arg, mean_arg, rstd, *tail, IS_RMS=is_rms,
                       HAS_W=has_w, HAS_DW=need_dw, HAS_DB=need_db, HAS_DRES=dres is not None, BLOCK_M=block_m,
                       BLOCK_N=block_n, NUM_STAGES=stages, num_warps=num_warps)
    else:
        c1 = torch.empty(M, dtype=torch.float32, device=device)
        c2 = torch.empty(M, dtype=torch.float32, device=device) if not is_rms else dummy
        _launch.launch(_norm_bwd_row_stats_kernel, (M,), dy, xin, w_arg, mean_arg, rstd, c1, c2, sdy, sx, N,
                       float(offset), IS_RMS=is_rms, HAS_W=has_w, BLOCK_N=CHUNK_N, NUM_STAGES=BWD_STATS_STAGES,
                       num_warps=BWD_STATS_WARPS)
        _launch.launch(_norm_bwd_cols_kernel, (col_blocks, programs), dy, xin, w_arg, mean_arg, rstd, c1, c2, *tail,
                       IS_RMS=is_rms, HAS_W=has_w, HAS_DW=need_dw, HAS_DB=need_db, HAS_DRES=dres is not None,
                       BLOCK_N=block_n, NUM_STAGES=stages, num_warps=num_warps)
    if not (need_dw or need_db):
        return dx, None, None
    dw = _util.empty((N,), wdtype, device) if need_dw else None
    db = _util.empty((N,), wdtype, device) if need_db else None
    _launch.launch(_sum_partials_kernel, (cdiv(N, sum_block_n),),
        dw_part, db_part, dw if need_dw else dummy, db if need_db else dummy, programs, N, HAS_DW=need_dw,
        HAS_DB=need_db, BLOCK_G=SUM_BLOCK_G, BLOCK_N=sum_block_n, NUM_STAGES=SUM_STAGES, num_warps=SUM_WARPS)
    return dx, dw, db
