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
- N ≤ MAX_FUSED_N: a program holds a [BLOCK_M, BLOCK_N] tile of whole rows in registers, one read and one write
  per element. Small rows are packed BLOCK_M to a program so each program still moves ~TILE elements.
- N > MAX_FUSED_N (up to and past 65536): one program per row walks it in BLOCK_N chunks twice: statistics
  first (LayerNorm merges per-chunk mean and M2 with Chan's formula, which stays accurate where E[x²]−E[x]²
  cancels), then normalize. The second read mostly hits L2. Keeping a 64k row in registers would spill.
- Backward: G programs (about 2 per SM) each own a contiguous range of rows, so dw/db accumulate in fp32
  registers (or, for chunked rows, in the program's own row of the fp32 partial buffer) without atomics or locks,
  and the result is deterministic; the G partial rows are summed once at the end.
- Offsets are int64: rows × N passes 2^31 at 32k rows × 64k. Row indices of the kernels that keep rows in
  registers stay int32 (int64 ones cost up to 18 registers there): their launchers refuse a row count whose
  programs would index past 2^31 − 1, which only a degenerate (~2^31, tiny N) input reaches.
"""

import torch
import triton
import triton.language as tl

from ._common import KernelSpec, empty, next_pow2, num_sms

MAX_FUSED_N = 8192  # widest row kept whole in registers: 16 fp32 values a thread per tensor at 16 warps
CHUNK_N = 4096  # chunk of a wider row
TILE = 4096  # elements a program handles per step when rows are short
PARTIALS_PER_SM = 2


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
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        if IS_RMS:
            w = w + offset
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rows_per_prog, BLOCK_M):
        rows = pid * rows_per_prog + r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < M
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
def _bwd_chunk(DY, XIN, W, row, stride_dy, stride_x, cols, mask, mean, rstd, offset, IS_RMS: tl.constexpr,
               HAS_W: tl.constexpr):
    """One chunk of a row for the chunked backward: dy, v, xhat (0 on padding) and g = dy·w_eff, in fp32."""
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(XIN + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (v - mean) * rstd, 0.0)
    g = dy
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            w = w + offset
        g = dy * w
    return dy, v, xhat, g


@triton.jit
def _norm_bwd_chunked_kernel(
    DY,  # (M, N) gradient of y
    XIN,  # (M, N) the normalized input
    W,  # (N,) weight (unused unless HAS_W)
    MEAN,  # (M,) fp32 (unused for RMSNorm)
    RSTD,  # (M,) fp32
    DRES,  # (M, N) gradient of residual_out (unused unless HAS_DRES)
    DX,  # (M, N) output
    DW_PART,  # (G, N) fp32, zero-filled: this program accumulates into its own row (unused unless HAS_DW)
    DB_PART,  # (G, N) fp32, zero-filled (unused unless HAS_DB)
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
    BLOCK_N: tl.constexpr,  # chunk width
):
    pid = tl.program_id(0)
    cols0 = tl.arange(0, BLOCK_N)
    part = pid.to(tl.int64) * N
    for i in range(0, rows_per_prog):
        row = pid.to(tl.int64) * rows_per_prog + i
        if row < M:
            rstd = tl.load(RSTD + row)
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(MEAN + row)
            c1 = 0.0
            c2 = 0.0
            for start in range(0, N, BLOCK_N):
                cols = start + cols0
                mask = cols < N
                dy, v, xhat, g = _bwd_chunk(DY, XIN, W, row, stride_dy, stride_x, cols, mask, mean, rstd, offset,
                                            IS_RMS, HAS_W)
                if IS_RMS:
                    c1 += tl.sum(g * v)  # as in _norm_bwd_kernel: v, not xhat, for accuracy
                else:
                    c1 += tl.sum(g * xhat)
                c2 += tl.sum(g)
            c1 = c1 / N
            c2 = c2 / N
            if IS_RMS:
                c1 = c1 * rstd * rstd * rstd
            for start in range(0, N, BLOCK_N):
                cols = start + cols0
                mask = cols < N
                dy, v, xhat, g = _bwd_chunk(DY, XIN, W, row, stride_dy, stride_x, cols, mask, mean, rstd, offset,
                                            IS_RMS, HAS_W)
                if IS_RMS:
                    dx = g * rstd - v * c1
                else:
                    dx = (g - (xhat * c1 + c2)) * rstd
                if HAS_DRES:
                    dx += tl.load(DRES + row * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
                # Each element of this program's partial row is read and written by the thread that owns it in
                # this layout, at every row: no other program touches the row, so no atomics are needed.
                if HAS_DW:
                    p = DW_PART + part + cols
                    tl.store(p, tl.load(p, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if HAS_DB:
                    p = DB_PART + part + cols
                    tl.store(p, tl.load(p, mask=mask, other=0.0) + dy, mask=mask)


def _fused_config(N, backward=False):
    """(BLOCK_M, BLOCK_N, num_warps) for rows kept whole, at most 16 warps: ~16 values a thread per tensor in the
    forward; in the backward, which holds five tiles (dy, v, g, and the dw and db accumulators) at once, half the
    forward's tile at 4 values a thread (8 a thread spilled on sm_90a in the static report)."""
    block_n = next_pow2(N)
    block_m = max(1, min((TILE // 2 if backward else TILE) // block_n, 64))
    per_thread = 4 if backward else 16
    num_warps = max(1, min(16, block_m * block_n // (32 * per_thread)))
    return block_m, block_n, num_warps


def _chunked_config():
    return CHUNK_N, 8


def _fused(N):
    return N <= MAX_FUSED_N


def _check_rows(M, end):
    """The fused kernels index rows in int32, up to `end` (their programs' last row, masked past M)."""
    if end >= 2**31:
        raise ValueError(f"the triton norm kernels index rows in int32: {M} rows are too many for rows of this width")


def norm_fwd(x, weight, bias, residual, eps, is_rms, offset):
    """Forward of LayerNorm (is_rms False) or RMSNorm (is_rms True) over the rows of x.

    x: (M, N) with column stride 1; weight, bias: (N,) or None; residual: (M, N) like x, or None.
    Returns y (M, N), residual_out (M, N) or None, mean (M,) fp32 or None (RMSNorm), rstd (M,) fp32.
    """
    M, N = x.shape
    if _fused(N):
        block_m = _fused_config(N)[0]
        _check_rows(M, triton.cdiv(M, block_m) * block_m)
    y = empty((M, N), x.dtype, x.device)
    residual_out = empty((M, N), x.dtype, x.device) if residual is not None else None
    mean = None if is_rms else empty((M,), torch.float32, x.device)
    rstd = empty((M,), torch.float32, x.device)
    if M == 0:
        return y, residual_out, mean, rstd
    dummy = rstd  # stands in for absent pointers; never dereferenced (its HAS_* flag is off)
    args = (
        x,
        residual if residual is not None else x,
        weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        y,
        residual_out if residual_out is not None else y,
        mean if mean is not None else dummy,
        rstd,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        y.stride(0),
        residual_out.stride(0) if residual_out is not None else 0,
        M,
        N,
        float(eps),
        float(offset),
    )
    flags = dict(IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None)
    if _fused(N):
        block_m, block_n, num_warps = _fused_config(N)
        grid = (triton.cdiv(M, block_m),)
        _norm_fwd_kernel[grid](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    else:
        block_n, num_warps = _chunked_config()
        _norm_fwd_chunked_kernel[(M,)](*args, **flags, BLOCK_N=block_n, num_warps=num_warps)
    return y, residual_out, mean, rstd


def norm_bwd(dy, xin, weight, mean, rstd, dres, is_rms, offset, need_dw, need_db):
    """Backward of norm_fwd.

    dy, xin, dres: (M, N) with column stride 1 (dres, the gradient of residual_out, may be None);
    weight (N,) or None; mean (M,) or None; rstd (M,). Returns dx (M, N), dw (N,) in weight's dtype or None,
    db (N,) in weight's dtype or None.
    """
    M, N = dy.shape
    need_dw = need_dw and weight is not None
    wdtype = weight.dtype if weight is not None else xin.dtype
    fused = _fused(N)
    if fused:
        block_m, block_n, num_warps = _fused_config(N, backward=True)
    else:
        block_m, (block_n, num_warps) = 1, _chunked_config()
    programs = max(1, min(triton.cdiv(M, block_m), PARTIALS_PER_SM * num_sms(xin.device)))
    rows_per_prog = max(1, triton.cdiv(triton.cdiv(M, programs), block_m)) * block_m
    programs = max(1, triton.cdiv(M, rows_per_prog))
    if fused:
        _check_rows(M, programs * rows_per_prog)
    dx = empty((M, N), xin.dtype, xin.device)
    # The fused kernel writes every element of its partial row; the chunked kernel accumulates into it (and with
    # no rows nothing runs, so the sums must start at zero).
    part = empty if fused and M > 0 else (lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device))
    dw_part = part((programs, N), torch.float32, xin.device) if need_dw else None
    db_part = part((programs, N), torch.float32, xin.device) if need_db else None
    if M > 0:
        dummy = rstd
        args = (
            dy,
            xin,
            weight if weight is not None else dummy,
            mean if mean is not None else dummy,
            rstd,
            dres if dres is not None else dy,
            dx,
            dw_part if need_dw else dummy,
            db_part if need_db else dummy,
            dy.stride(0),
            xin.stride(0),
            dres.stride(0) if dres is not None else 0,
            dx.stride(0),
            M,
            N,
            rows_per_prog,
            float(offset),
        )
        flags = dict(IS_RMS=is_rms, HAS_W=weight is not None, HAS_DW=need_dw, HAS_DB=need_db, HAS_DRES=dres is not None)
        if fused:
            _norm_bwd_kernel[(programs,)](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        else:
            _norm_bwd_chunked_kernel[(programs,)](*args, **flags, BLOCK_N=block_n, num_warps=num_warps)
    dw = dw_part.sum(0).to(wdtype) if need_dw else None
    db = db_part.sum(0).to(wdtype) if need_db else None
    return dx, dw, db


def static_specs():
    """Every variant the launchers above may launch, for the static kernel report: each launch config (block
    shape and warps, which is what sets register pressure), with every optional input on, for bf16 with an fp32
    weight (the mixed-precision training case) and for fp32."""
    specs = []
    widths = [1 << k for k in range(MAX_FUSED_N.bit_length())]
    for dt, wdt in (("bf16", "fp32"), ("fp32", "fp32")):
        for is_rms in (False, True):
            kind = "rms" if is_rms else "ln"
            common_fwd = {
                "X": f"*{dt}", "R": f"*{dt}", "W": f"*{wdt}", "B": f"*{wdt}", "Y": f"*{dt}", "RES_OUT": f"*{dt}",
                "MEAN": "*fp32", "RSTD": "*fp32", "stride_x": "i32", "stride_r": "i32", "stride_y": "i32",
                "stride_ro": "i32", "M": "i32", "N": "i32", "eps": "fp32", "offset": "fp32",
            }
            common_bwd = {
                "DY": f"*{dt}", "XIN": f"*{dt}", "W": f"*{wdt}", "MEAN": "*fp32", "RSTD": "*fp32", "DRES": f"*{dt}",
                "DX": f"*{dt}", "DW_PART": "*fp32", "DB_PART": "*fp32", "stride_dy": "i32", "stride_x": "i32",
                "stride_dres": "i32", "stride_dx": "i32", "M": "i32", "N": "i32", "rows_per_prog": "i32",
                "offset": "fp32",
            }
            fwd_flags = dict(IS_RMS=is_rms, HAS_W=True, HAS_B=not is_rms, HAS_RES=True)
            bwd_flags = dict(IS_RMS=is_rms, HAS_W=True, HAS_DW=True, HAS_DB=not is_rms, HAS_DRES=True)
            aligned = ("X", "R", "Y", "RES_OUT", "DY", "XIN", "DRES", "DX", "stride_x", "stride_r", "stride_y",
                       "stride_ro", "stride_dy", "stride_dres", "stride_dx", "N")
            for n in widths:
                for fn, common, flags, tag in (
                    (_norm_fwd_kernel, common_fwd, fwd_flags, "fwd"),
                    (_norm_bwd_kernel, common_bwd, bwd_flags, "bwd"),
                ):
                    bm, bn, nw = _fused_config(n, backward=tag == "bwd")
                    const = dict(flags, BLOCK_M=bm, BLOCK_N=bn)
                    sig = dict(common, **{k: "constexpr" for k in const})
                    # Rows narrower than 16 elements never have N or the row strides divisible by 16.
                    div = tuple(a for a in aligned if a in sig and (n >= 16 or not (a == "N" or a.startswith("stride"))))
                    specs.append(KernelSpec(f"norm_{tag}[{kind},{dt},N<={bn},M{bm}]", fn, sig, const, nw, div))
            bn, nw = _chunked_config()
            for fn, common, flags, tag in (
                (_norm_fwd_chunked_kernel, common_fwd, fwd_flags, "fwd"),
                (_norm_bwd_chunked_kernel, common_bwd, bwd_flags, "bwd"),
            ):
                const = dict(flags, BLOCK_N=bn)
                sig = dict(common, **{k: "constexpr" for k in const})
                specs.append(KernelSpec(f"norm_{tag}_chunked[{kind},{dt},chunk {bn}]", fn, sig, const, nw,
                                        tuple(a for a in aligned if a in sig)))
    return specs
