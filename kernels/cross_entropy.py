"""Softmax cross-entropy over a large vocabulary, with the gradient computed in the forward pass: Triton kernels
and their launchers.

Math, per row of logits z (length V), target t, class weights w (1 without), smoothing ε, z-loss coefficient ζ:
  softcap c       x = c·tanh(z/c) (Gemma 2), else x = z;   lse = log Σ_v exp(x_v);   p = exp(x − lse)
  loss            w_t·(1−ε)·(lse − x_t) + (ε/V)·Σ_v w_v·(lse − x_v) + ζ·lse²      (0 for an ignored row)
  d loss / d x_v  w_t·(1−ε)·(p_v − [v = t]) + (ε/V)·(W·p_v − w_v) + 2ζ·lse·p_v    (W = Σ_v w_v; at the target
                  the first term is formed before the others are added: a confident row's p_t − 1 → 0)
  d x / d z       1 − (x/c)²  with the softcap
Reduction "mean" divides by Σ w_t over the rows that are not ignored (torch's rule, smoothing included; all rows
ignored gives 0/0 = NaN, as torch does); "sum" and "none" by 1. The divisor is computed on the device from the
targets before the main kernel writes any gradient, so the forward writes the finished gradient (no host sync):
by a one-program launch before it, or, without class weights, by the main kernel itself (OWN_SCALARS): then a
forward is one launch for "none" and two for "sum" and for a small call's "mean" (the main kernel and the
reduction's), where it was two and three.

Backward: the gradient of the logits is the buffer the forward wrote times the incoming gradient. For "mean"
and "sum" that is one scalar, almost always 1.0 (loss.backward()): the scaling kernel reads it on the device and
returns at once when it is 1, so a training step moves the logits twice (read once in the forward's first pass,
read again and the gradient written in its second pass, which mostly hits L2 because a program's row was just
read). "none" multiplies each row by its own incoming gradient.

Roofline: V·rows·(dtype size) read twice (the second read mostly from L2) and written once for the gradient;
everything else is per row. Memory: one gradient buffer, the size of the logits; the caller's logits are never
written (writing the gradient into them silently corrupts anything else that reads them).

Design: one program per row walks the vocabulary in BLOCK_V chunks (online softmax: a running max and a
rescaled running sum), so V is unbounded (262144 and more); with PROGRAMS_PER_SM, fewer programs each take rows a
grid apart, which bounds the rows in flight (see there). The gradient pass walks the row backwards (see
_write_grad_row). An out-of-range target that is not ignore_index
cannot be checked without a host sync: its row's loss and gradient are NaN, and nothing is read out of bounds.
"""

import torch
import triton
import triton.language as tl

from fastlm import _util
from ._common import tanh_and_sech2
from . import _launch

BLOCK_V = 4096  # chunk of the vocabulary a program holds at once: 8 fp32 values a thread at 16 warps
NUM_WARPS = 16
# The forward's grid: None, a program per row (as many rows in flight as fit the SMs: 2 an SM at 16 warps and
# 50-60 registers a thread, the register file's limit); or k, k programs an SM, each taking rows k·SMs apart. The
# gradient pass rereads its row, from L2 only while the rows in flight times a row (250 KB at bf16 V = 128k: ~66
# MB at 2 an SM on 132 SMs) stay well under L2 (60 MiB on the H200, as torch reports it; 50 MB on an H100):
# fewer rows in flight keep the reread in L2, at the cost of fewer bytes in flight. 16-bit logits only (_persistent).
# Not timed: the sweep's --tune weighs it (benchmarks/cross_entropy_sweep.py); its variants compile without spills
# at every option set (at 32 warps the loop spills: 64 registers a thread).
PROGRAMS_PER_SM = None
SCALE_BLOCK = 4096
# Without class weights the forward kernel forms the two device scalars itself (OWN_SCALARS), so that no scalars
# launch precedes it: W is V, and the divisor 1, or for "mean" the count of rows not ignored, which every program
# counts from all the targets, COUNT_BLOCK at a time. That redundant read (programs × rows × the index size, from
# L2 after the first program's) is allowed up to OWN_COUNT_BYTES, so only small calls count for themselves (a
# program a row: up to 724 int64 or 1024 int32 targets), where a launch costs more than the kernel's work; larger
# "mean" calls keep the scalars launch. From first principles, not timed: a launch is ~2-4 µs of GPU time between
# kernels and ~5-10 µs of host time (benchmarks.launch_cost); one COUNT_BLOCK of targets is one L2 round trip
# (< 1 µs) at the start of each program.
OWN_COUNT_BYTES = 4 << 20
OWN_COUNT_BLOCK = 2048


@triton.jit
def _softcapped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """(x, dx/dz): x = softcap·tanh(z/softcap) with its derivative 1 − tanh², or (z, 1)."""
    x = z
    dx = tl.full(z.shape, 1.0, tl.float32)
    if HAS_SOFTCAP:
        th, dx = tanh_and_sech2(z / softcap)
        x = softcap * th
    return x, dx


@triton.jit
def _row_target(TARGET, WEIGHT, row, V, ignore_index, HAS_WEIGHT: tl.constexpr):
    """The row's target, whether it is ignored, whether it is a class, and its weight w_t."""
    t = tl.load(TARGET + row).to(tl.int64)
    ignored = t == ignore_index
    in_range = (t >= 0) & (t < V)
    w_t = 1.0
    if HAS_WEIGHT:
        w_t = tl.load(WEIGHT + tl.where(in_range, t, 0))
    return t, ignored, in_range, w_t


@triton.jit
def _count_kept(TARGET, rows, ignore_index, BLOCK: tl.constexpr):
    """"mean"'s divisor without class weights: the count of the rows whose target is not ignore_index (out-of-range
    ones included: their loss is NaN anyway), as fp32 (exact below 2^24 rows, one rounding above)."""
    offs = tl.arange(0, BLOCK)
    count = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, rows, BLOCK):
        r = start + offs
        mask = r < rows
        t = tl.load(TARGET + r, mask=mask, other=0).to(tl.int64)
        count += (mask & (t != ignore_index)).to(tl.int32)
    return tl.sum(count, 0).to(tl.float32)


@triton.jit
def _write_grad_row(
    base, gbase, WEIGHT, t, ignored, m, log_s, w_t, scale, width, col0, keep_nll, smooth_v, z_loss, softcap,
    weight_sum, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Write scale · dloss/dlogits for one row, reading its logits once more: the `width` columns at base and
    gbase, which are the classes col0, col0 + 1, ... (the whole row: width V, col0 0; a vocabulary block of it for
    the low-memory linear cross-entropy).

    dloss/dx_v = p_v·S − a_t·[v = t] − (ε/V)·w_v with a_t = w_t(1 − ε), S = a_t + R and R = (ε/V)·W + 2ζ·lse:
    the form of torch's log_softmax backward, one fused multiply-add per element before the subtraction. At the
    target the cross-entropy part is formed first, a_t·(p_t − 1) (exact p_t − 1 where p_t ≥ ½), and R·p_t added
    after: folding R into S first would round it at the magnitude of a_t, and where the row is confident
    (p_t → 1) the gradient is about R·p_t alone, so its low bits would be lost."""
    a_t = w_t * keep_nll
    R = 0.0
    if HAS_SMOOTHING:
        R += smooth_v * weight_sum
    if HAS_Z:
        R += 2.0 * z_loss * (m + log_s)
    S = a_t + R
    cols0 = tl.arange(0, BLOCK_V)
    t_col = t - col0  # the target's column in this block (outside [0, width) when it is not in the block)
    # From the last chunk to the first: after the forward's first pass the chunks it read last are the likeliest
    # to still be in L2; walking forward would find the row's start evicted first whenever the rows in flight
    # outgrow L2 (2 programs an SM × 132 SMs × 250 KB for a bf16 row of 128k classes is ~66 MB, against 60 MiB
    # of L2 on the H200, and the gradient's stores pass through it too). This read and the gradient's store are
    # the row's last: evict-first, so that they do not push out the rows other programs are about to read again.
    # (The CUDA kernel does the same.) Elements are independent here, so the order changes no bit.
    chunks = tl.cdiv(width, BLOCK_V)
    for k in range(0, chunks):
        cols = (chunks - 1 - k) * BLOCK_V + cols0
        mask = cols < width
        x, dcap = _softcapped(tl.load(base + cols, mask=mask, other=0.0, eviction_policy="evict_first")
                              .to(tl.float32), softcap, HAS_SOFTCAP)
        # (x − m) − log s rather than x − lse: x − m is exact for nearby values and log s is small, so p keeps
        # the precision of torch's log_softmax; lse itself is rounded at its (larger) magnitude.
        p = tl.exp((x - m) - log_s)
        c = 0.0
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                c = smooth_v * tl.load(WEIGHT + col0 + cols, mask=mask, other=0.0)
            else:
                c = smooth_v
        is_t = cols == t_col
        g = tl.fma(p, tl.where(is_t, R, S), tl.where(is_t, a_t * (p - 1.0), 0.0) - c)
        if HAS_SOFTCAP:
            g = g * dcap
        # An ignored row's gradient is exactly 0, whatever its logits hold (inf or NaN would survive a product).
        g = tl.where(ignored, 0.0, g * scale)
        tl.store(gbase + cols, g.to(gbase.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit
def _ce_fwd_kernel(
    LOGITS,  # (rows, V) logits, column stride 1
    TARGET,  # (rows,) int32 or int64 class indices
    WEIGHT,  # (V,) fp32 class weights (unused unless HAS_WEIGHT)
    SCALARS,  # (2,) fp32 on the device: the reduction's divisor (Σ w_t over kept rows for "mean", else 1), and
    #           W = Σ_v w_v (V without weights): device values, so computing them never syncs the host. An input,
    #           or with OWN_SCALARS an output (program 0 stores it; no program reads it)
    LOSS,  # (rows,) fp32 output: each row's loss, unreduced and undivided
    MAX,  # (rows,) fp32 output: the row's max m (of the softcapped logits)
    LOG_S,  # (rows,) fp32 output: log Σ exp(x − m); lse = m + log s, kept apart for precision
    GRAD,  # (rows, V) output: d(reduced loss)/d logits for an incoming 1, logits' dtype (unless COMPUTE_GRAD)
    stride_l,
    stride_g,
    rows,  # (read with PERSISTENT or MEAN only)
    V,
    ignore_index,
    keep_nll,  # 1 − ε, computed on the host in double so the kernel rounds it once
    smooth_v,  # ε / V, likewise
    z_loss,  # ζ
    softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PERSISTENT: tl.constexpr = False,  # program p takes rows p, p + programs, ... (else the grid is a program a row)
    OWN_SCALARS: tl.constexpr = False,  # no class weights: the kernel forms SCALARS itself (see _own_scalars)
    MEAN: tl.constexpr = False,  # with OWN_SCALARS: the divisor is the count of rows not ignored (else 1)
    COUNT_BLOCK: tl.constexpr = OWN_COUNT_BLOCK,
):
    pid = tl.program_id(0)
    divisor = tl.full((), 1.0, tl.float32)
    weight_sum = tl.full((), 0.0, tl.float32) + V  # V rounded once to fp32, as the scalars kernel does
    if OWN_SCALARS:
        # What _ce_scalars_kernel would have stored, formed by every program from the targets (no launch before
        # this one); program 0 stores it for the reduction and the backward, which read SCALARS.
        if MEAN:
            divisor = _count_kept(TARGET, rows, ignore_index, COUNT_BLOCK)
        if pid == 0:
            tl.store(SCALARS, divisor)
            tl.store(SCALARS + 1, weight_sum)
    if PERSISTENT:  # (a loop around the row keeps more registers live: only where PROGRAMS_PER_SM asks for it)
        # The row as an int64 base plus an int32 step count (the interpreter runs loops over Python ints, which
        # would meet the int32 strides in 32 bits); the launcher never makes more programs than rows.
        programs = tl.num_programs(0)
        first = pid.to(tl.int64)
        for i in range(0, tl.cdiv(rows - pid, programs)):
            _ce_fwd_row(LOGITS, TARGET, WEIGHT, SCALARS, divisor, weight_sum, LOSS, MAX, LOG_S, GRAD, stride_l,
                        stride_g, first + i * programs, V, ignore_index, keep_nll, smooth_v, z_loss, softcap,
                        HAS_WEIGHT, HAS_SMOOTHING, HAS_Z, HAS_SOFTCAP, COMPUTE_GRAD, BLOCK_V, OWN_SCALARS)
    else:
        _ce_fwd_row(LOGITS, TARGET, WEIGHT, SCALARS, divisor, weight_sum, LOSS, MAX, LOG_S, GRAD, stride_l, stride_g,
                    pid.to(tl.int64), V, ignore_index, keep_nll, smooth_v, z_loss, softcap, HAS_WEIGHT, HAS_SMOOTHING,
                    HAS_Z, HAS_SOFTCAP, COMPUTE_GRAD, BLOCK_V, OWN_SCALARS)


@triton.jit
def _ce_fwd_row(
    LOGITS, TARGET, WEIGHT, SCALARS, divisor, weight_sum, LOSS, MAX, LOG_S, GRAD, stride_l, stride_g, row, V,
    ignore_index, keep_nll, smooth_v, z_loss, softcap, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    OWN_SCALARS: tl.constexpr,
):
    """_ce_fwd_kernel's work for one row (int64). SCALARS' two values: divisor and weight_sum with OWN_SCALARS,
    else read from SCALARS where they are used (not held through the row's loop)."""
    t, ignored, in_range, w_t = _row_target(TARGET, WEIGHT, row, V, ignore_index, HAS_WEIGHT)
    cols0 = tl.arange(0, BLOCK_V)
    base = LOGITS + row * stride_l
    m = -float("inf")  # running max
    s = 0.0  # running Σ exp(x − m)
    x_t = 0.0
    sum_wx = 0.0  # Σ_v w_v·x_v, for smoothing
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = cols < V
        x, _ = _softcapped(tl.load(base + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        x = tl.where(mask, x, -float("inf"))  # padding lanes carry no probability, softcap or not
        m_new = tl.maximum(m, tl.max(x, 0))
        # A chunk (or row) of −inf so far keeps m_new = −inf: guard the inf − inf in both rescalings.
        alpha = tl.where(m_new == -float("inf"), 0.0, tl.exp(m - m_new))
        e = tl.where(x == -float("inf"), 0.0, tl.exp(x - m_new))
        s = s * alpha + tl.sum(e, 0)
        m = m_new
        x_t += tl.sum(tl.where(cols == t, x, 0.0), 0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(WEIGHT + cols, mask=mask, other=0.0)
                sum_wx += tl.sum(tl.where(mask, w * x, 0.0), 0)
            else:
                sum_wx += tl.sum(tl.where(mask, x, 0.0), 0)
    log_s = tl.log(s)
    lse = m + log_s
    if not OWN_SCALARS:
        weight_sum = tl.load(SCALARS + 1)
    loss = w_t * keep_nll * ((m - x_t) + log_s)
    if HAS_SMOOTHING:
        loss += smooth_v * (weight_sum * lse - sum_wx)
    if HAS_Z:
        loss += z_loss * lse * lse
    nan = float("nan")
    # Ignored rows give 0 (whatever their logits), a target that is neither a class nor ignore_index gives NaN
    # (loss and gradient).
    keep = tl.where(in_range, 1.0, nan)
    tl.store(LOSS + row, tl.where(ignored, 0.0, loss * keep))
    tl.store(MAX + row, m)
    tl.store(LOG_S + row, log_s)
    if COMPUTE_GRAD:
        if not OWN_SCALARS:
            divisor = tl.load(SCALARS)
        _write_grad_row(base, GRAD + row * stride_g, WEIGHT, t, ignored, m, log_s, w_t, keep / divisor, V,
                        0, keep_nll, smooth_v, z_loss, softcap, weight_sum,
                        HAS_WEIGHT, HAS_SMOOTHING, HAS_Z, HAS_SOFTCAP, BLOCK_V)


@triton.jit
def _ce_bwd_kernel(
    LOGITS,  # (rows, V) logits
    TARGET,  # (rows,) class indices
    WEIGHT,  # (V,) fp32 class weights (unused unless HAS_WEIGHT)
    SCALARS,  # (2,) fp32: divisor and W, as in the forward
    MAX,  # (rows,) fp32 from the forward
    LOG_S,  # (rows,) fp32 from the forward
    GRAD_OUT,  # (rows,) fp32 incoming gradient of each row's loss
    GRAD,  # (rows, width) output, logits' dtype
    stride_l,
    stride_g,
    V,  # classes
    width,  # columns of LOGITS and GRAD: the classes col0 .. col0 + width − 1 (V and 0 for whole rows)
    col0,
    ignore_index,
    keep_nll,
    smooth_v,
    z_loss,
    softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t, ignored, in_range, w_t = _row_target(TARGET, WEIGHT, row, V, ignore_index, HAS_WEIGHT)
    scale = tl.where(ignored, 0.0, tl.where(in_range, tl.load(GRAD_OUT + row), float("nan")))
    _write_grad_row(LOGITS + row * stride_l, GRAD + row * stride_g, WEIGHT, t, ignored, tl.load(MAX + row),
                    tl.load(LOG_S + row), w_t, scale, width, col0, keep_nll, smooth_v, z_loss, softcap,
                    tl.load(SCALARS + 1),
                    HAS_WEIGHT, HAS_SMOOTHING, HAS_Z, HAS_SOFTCAP, BLOCK_V)


@triton.jit
def _ce_bwd_scale_kernel(
    GRAD,  # (rows, V) the forward's gradient, scaled in place
    GRAD_OUT,  # fp32, one element (any shape): the incoming gradient of the reduced loss
    stride_g,
    V,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    go = tl.load(GRAD_OUT)
    # loss.backward() hands 1.0: nothing to do, and deciding it here costs no host sync.
    if go != 1.0:
        base = GRAD + row * stride_g
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            g = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(base + cols, (g * go).to(GRAD.dtype.element_ty), mask=mask)


# The scalars and the reduced loss are each one single-program launch (in place of 2–6 small torch ops a call),
# below ONE_PROGRAM_ROWS rows. One program streams rows·8 bytes of targets (rows·4 of losses) in ONE_PROGRAM_BLOCK
# chunks, each about one DRAM latency (~1 µs) with its 16 loads a thread in flight: 65536 rows are 8 chunks, a
# few µs, about what the torch ops cost in launches (estimates, not measured). Above it the one program grows
# linearly (1M rows: 128 chunks, ~100 µs, a sizable share of a small-V main kernel over those rows), so the torch
# ops, spread over the device, take over.
ONE_PROGRAM_ROWS = 1 << 16
ONE_PROGRAM_BLOCK = 8192
ONE_PROGRAM_WARPS = 16


@triton.jit
def _ce_scalars_kernel(
    TARGET,  # (rows,) int32 or int64 class indices
    WEIGHT,  # (V,) fp32 class weights (unused unless HAS_WEIGHT)
    SCALARS,  # (2,) fp32 output: the divisor of the reduced loss, W = Σ_v w_v (V without weights)
    rows,
    V,
    ignore_index,
    MEAN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program. "mean": the count of rows whose target is not ignore_index (out-of-range ones included: their
    loss is NaN anyway), or with weights Σ w_t over the kept rows whose target is a class, in float64 and rounded
    once (every row left out, ignored or out of range, adds w_0·0, as torch's gather-and-mask did, so a
    non-finite w_0 still makes the divisor NaN when a row is left out); else 1. W: Σ_v w_v in float64 rounded
    once, or V."""
    offs = tl.arange(0, BLOCK)
    divisor = tl.full((), 1.0, tl.float32)
    if MEAN:
        if HAS_WEIGHT:
            acc = tl.zeros((BLOCK,), tl.float64)
            for start in range(0, rows, BLOCK):
                r = start + offs
                mask = r < rows
                t = tl.load(TARGET + r, mask=mask, other=0).to(tl.int64)
                keep = (t != ignore_index) & (t >= 0) & (t < V)
                w = tl.load(WEIGHT + tl.where(keep, t, 0), mask=mask, other=0.0).to(tl.float64)
                acc += w * keep.to(tl.float64)
            divisor = tl.sum(acc, 0).to(tl.float32)
        else:
            divisor = _count_kept(TARGET, rows, ignore_index, BLOCK)
    total = tl.full((), 0.0, tl.float32) + V  # V rounded once to fp32, as torch.full did
    if HAS_WEIGHT:
        wacc = tl.zeros((BLOCK,), tl.float64)
        for start in range(0, V, BLOCK):
            cols = start + offs
            wacc += tl.load(WEIGHT + cols, mask=cols < V, other=0.0).to(tl.float64)
        total = tl.sum(wacc, 0).to(tl.float32)
    tl.store(SCALARS, divisor)
    tl.store(SCALARS + 1, total)


@triton.jit
def _ce_reduce_kernel(
    LOSS,  # (rows,) fp32 unreduced losses
    SCALARS,  # (2,) fp32: the divisor for "mean"
    OUT,  # () fp32 output: the reduced loss
    rows,
    MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program, a fixed order (deterministic): Σ loss in float64, rounded once, divided by the divisor for
    "mean". NaN and inf propagate as in a sum."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, rows, BLOCK):
        r = start + offs
        acc += tl.load(LOSS + r, mask=r < rows, other=0.0).to(tl.float64)
    total = tl.sum(acc, 0).to(tl.float32)
    if MEAN:
        total = total / tl.load(SCALARS)
    tl.store(OUT, total)


def _scalars_torch(target, weight, V, ignore_index, reduction):
    """scalars() in plain tensor ops, for many rows (see ONE_PROGRAM_ROWS)."""
    device = target.device
    if reduction != "mean":
        divisor = torch.ones(1, dtype=torch.float32, device=device)
    elif weight is None:
        divisor = (target != ignore_index).sum(dtype=torch.float32).reshape(1)
    else:
        keep = (target != ignore_index) & (target >= 0) & (target < V)
        safe = torch.where(keep, target, torch.zeros_like(target))
        divisor = (weight.double()[safe] * keep).sum().float().reshape(1)
    # Summed in float64 (V values, negligible work), so W carries one rounding into every gradient element.
    total = weight.double().sum().float().reshape(1) if weight is not None else torch.full(
        (1,), float(V), dtype=torch.float32, device=device)
    return torch.cat([divisor, total])


def scalars(target, weight, V, ignore_index, reduction):
    """(2,) fp32 on the device: the divisor of the reduced loss (Σ w_t over kept rows for "mean", else 1) and
    W = Σ_v w_v (V without weights); target (rows,) contiguous, weight (V,) contiguous fp32 or None. One
    single-program kernel launch (the torch ops above ONE_PROGRAM_ROWS rows); no host sync either way. Float64
    sums are rounded once to fp32."""
    rows = target.numel()
    if rows > ONE_PROGRAM_ROWS:
        return _scalars_torch(target, weight, V, ignore_index, reduction)
    sc = _util.empty((2,), torch.float32, target.device)
    _launch.launch(_ce_scalars_kernel, (1,), target, weight if weight is not None else sc, sc, rows, V, ignore_index,
                   MEAN=reduction == "mean", HAS_WEIGHT=weight is not None, BLOCK=ONE_PROGRAM_BLOCK,
                   num_warps=ONE_PROGRAM_WARPS)
    return sc


def reduce_loss(loss, sc, mean):
    """The reduced loss, () fp32: Σ loss (rows,) fp32 contiguous, divided by sc[0] when `mean`. One
    single-program launch (float64 sum, fixed order); torch's sum and division above ONE_PROGRAM_ROWS rows."""
    rows = loss.numel()
    if rows > ONE_PROGRAM_ROWS:
        total = loss.sum()
        return total / sc[0] if mean else total
    out = _util.empty((), torch.float32, loss.device)
    _launch.launch(_ce_reduce_kernel, (1,), loss, sc, out, rows, MEAN=mean, BLOCK=ONE_PROGRAM_BLOCK,
                   num_warps=ONE_PROGRAM_WARPS)
    return out


def _persistent(dtype):
    """Whether the forward's programs walk rows (PROGRAMS_PER_SM, 16-bit logits: at fp32 the loop's registers spill
    with every option set, and fp32 logits over a vocabulary that outgrows L2 are rare)."""
    return PROGRAMS_PER_SM is not None and dtype != torch.float32


def _fwd_programs(rows, dtype, device):
    """The forward's grid: a program per row, or with _persistent PROGRAMS_PER_SM an SM, each walking rows."""
    return min(rows, PROGRAMS_PER_SM * _util.num_sms(device)) if _persistent(dtype) else rows


def _flags(weight, smoothing, z_loss, softcap):
    return dict(HAS_WEIGHT=weight is not None, HAS_SMOOTHING=smoothing > 0, HAS_Z=z_loss > 0,
                HAS_SOFTCAP=softcap is not None, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)


def _constants(V, smoothing, z_loss, softcap):
    # 1 − ε and ε/V in double on the host, rounded once when the kernel takes them as fp32.
    return 1.0 - smoothing, smoothing / V, float(z_loss), float(softcap or 1.0)


def cross_entropy_fwd(logits, target, weight, ignore_index, smoothing, z_loss, softcap, reduction, compute_grad,
                      sc=None, out=None):
    """Rows of logits (rows, V) with column stride 1, target (rows,), weight (V,) fp32 or None.

    Returns loss (rows,) fp32 (unreduced; divide the sum by sc[0] for "mean"), row_max and log_s (rows,) fp32,
    sc (2,) fp32, and grad (rows, V) in logits' dtype, the gradient of the reduced loss for an incoming gradient
    of 1, or None when compute_grad is False. `sc` may be given: the scalars of a larger batch these rows are a
    chunk of (fused linear cross-entropy), so the mean divides by the whole batch's divisor. `out` (rows, V) in
    logits' dtype, column stride 1, may be given for the gradient (with compute_grad), the logits themselves
    included: each element is read before it is written, by the same program.
    """
    rows, V = logits.shape
    programs = _fwd_programs(rows, logits.dtype, logits.device) if rows > 0 else 0
    own = sc is None and _own_scalars(weight, reduction, rows, programs, target)
    if own:
        sc = _util.empty((2,), torch.float32, logits.device)
    elif sc is None:
        sc = scalars(target, weight, V, ignore_index, reduction)
    loss = _util.empty((rows,), torch.float32, logits.device)
    row_max = _util.empty((rows,), torch.float32, logits.device)
    log_s = _util.empty((rows,), torch.float32, logits.device)
    if out is not None and compute_grad:
        grad = _out(out, logits)
    else:
        grad = _util.empty((rows, V), logits.dtype, logits.device) if compute_grad else None
    if rows > 0:
        _launch.launch(_ce_fwd_kernel, (programs,),
            logits, target, weight if weight is not None else sc, sc, loss, row_max, log_s,
            grad if grad is not None else logits, logits.stride(0), grad.stride(0) if grad is not None else 0,
            rows, V, ignore_index, *_constants(V, smoothing, z_loss, softcap), COMPUTE_GRAD=compute_grad,
            PERSISTENT=_persistent(logits.dtype), OWN_SCALARS=own, MEAN=own and reduction == "mean",
            COUNT_BLOCK=OWN_COUNT_BLOCK,
            **_flags(weight, smoothing, z_loss, softcap),
        )
    return loss, row_max, log_s, sc, grad


def _own_scalars(weight, reduction, rows, programs, target):
    """Whether the forward kernel forms the scalars itself (OWN_SCALARS): no class weights, rows to launch for,
    and for "mean" a redundant count within OWN_COUNT_BYTES."""
    if weight is not None or rows == 0:
        return False
    return reduction != "mean" or programs * rows * target.element_size() <= OWN_COUNT_BYTES


def _out(out, logits):
    rows, V = logits.shape
    if tuple(out.shape) != (rows, V) or out.dtype != logits.dtype or (V > 1 and out.stride(1) != 1):
        raise ValueError(f"out must be ({rows}, {V}) {logits.dtype} with column stride 1, got {tuple(out.shape)} "
                         f"{out.dtype} strides {out.stride()}")
    return out


def cross_entropy_bwd(logits, target, weight, sc, row_max, log_s, grad_output, ignore_index, smoothing, z_loss,
                      softcap, out=None, col0=0, classes=None):
    """Gradient of the unreduced loss ("none"): grad_output (rows,) times each row's gradient, recomputed from the
    logits and the forward's row statistics in one pass. Returns grad (rows, width) in logits' dtype: `out` when
    given (as in cross_entropy_fwd, the logits themselves included).

    logits (rows, width) may be a block of the classes: columns col0 .. col0 + width − 1 of rows of `classes`
    (default: width, the whole rows). row_max, log_s and sc are then the whole rows' (cross_entropy_fwd's), weight
    is all `classes` of it, and the gradient is the block's columns of the whole rows' gradient."""
    rows, width = logits.shape
    V = width if classes is None else classes
    if not 0 <= col0 <= V - width:
        raise ValueError(f"a block of {width} columns from column {col0} does not fit in {V} classes")
    grad = _out(out, logits) if out is not None else _util.empty((rows, width), logits.dtype, logits.device)
    if rows > 0:
        go = _util.flat(grad_output)  # (rows,) contiguous, even from an expanded scalar
        go = go if go.dtype == torch.float32 else go.float()
        _launch.launch(_ce_bwd_kernel, (rows,),
            logits, target, weight if weight is not None else sc, sc, row_max, log_s, go, grad, logits.stride(0),
            grad.stride(0), V, width, col0, ignore_index, *_constants(V, smoothing, z_loss, softcap),
            **_flags(weight, smoothing, z_loss, softcap),
        )
    return grad


def scale_grad(grad, grad_output):
    """Scale the forward's gradient (rows, V) in place by the incoming gradient of the reduced loss, a one-element
    tensor; the kernel skips the work on the device when it is 1.0. Returns grad."""
    rows, V = grad.shape
    if rows > 0:
        if grad_output.numel() != 1:
            raise ValueError(f"grad_output must have one element, got shape {tuple(grad_output.shape)}")
        # Its one element is at its address whatever its shape and strides: no reshape (~1 µs of the host path).
        go = grad_output if grad_output.dtype == torch.float32 else grad_output.float()
        _launch.launch(_ce_bwd_scale_kernel, (rows,), grad, go, grad.stride(0), V, BLOCK_V=SCALE_BLOCK,
                       num_warps=NUM_WARPS)
    return grad
