"""Attention in Triton: FlashAttention-2-style forward and backward.

Math. For a query row q_i and the keys k_j it may see (mask below), the score is z_ij = scale·q_i·k_j, capped to
s_ij = c·tanh(z_ij / c) when a softcap c > 0 is set (s = z otherwise). With P_ij = exp(s_ij − lse_i) and
lse_i = log Σ_j exp(s_ij), the output is O_i = Σ_j P_ij v_j. A row that sees no key has O_i = 0, lse_i = −inf.
Backward, with D_i = Σ_d dO_id·O_id − dlse_i (the LSE's own gradient folds into D):
  dV_j = Σ_i P_ij dO_i,   dP_ij = dO_i·v_j,   dS_ij = P_ij (dP_ij − D_i),   dZ = dS · (1 − tanh²) with a softcap,
  dQ_i = scale Σ_j dZ_ij k_j,   dK_j = scale Σ_i dZ_ij q_i.
With GQA (Hq query heads over Hk kv heads), query head h reads kv head h // (Hq/Hk), and dK, dV of a kv head sum
over its group.

Mask. Positions are aligned bottom-right: with off = seqlen_k − seqlen_q (per sequence), key j is visible to query
i when j ≥ i + off − window_left and j ≤ i + off + window_right, each bound only when given. Causal is
window_right = 0; torch SDPA's top-left causal is window_right = seqlen_q − seqlen_k (may be negative).

Roofline. Forward 4·Sq·Sk·D FLOPs per (batch, head) (two matmuls), halved by a causal mask; backward 2.5× that
(five matmuls: S and dP recomputed, dV, dK, dQ; the deterministic backward computes S and dP twice, once per
kernel — seven in all).
Reads are O(S·D) per head: attention at these sizes is bound by the tensor cores. Decode (a short query side over a
KV cache) is the opposite: K and V, 2·B·Hk·Sk·D·2 bytes read once per kv head by the split-KV kernel, for
4·B·Hq·Sq·Sk·D FLOPs, Sq·Hq/Hk ≤ 64 FLOPs a byte: bound by memory bandwidth.

Design.
- Forward: one program per (block of BLOCK_M queries, batch·head); keys in BLOCK_N blocks with the online softmax in
  exp2 (scale·log2 e folded into the scores). The key range is split in three loops: blocks the mask partly covers
  (left edge, right edge and the sequence's end) apply it, the blocks in between run without one, and blocks the
  mask empties are never visited. On Hopper (TMA, below) the K and V tiles come by TMA through tensor descriptors
  of the kv head's rows made in the kernel (FWD_TMA_CONFIGS: 128 × 128 tiles, the Triton tutorial's Hopper shape,
  fit without spills at head dim 128; the pointer path's per-element addresses fit 128 × 32).
  A warp-specialized variant of the Hopper path (WARP_SPEC, FWD_WS_CONFIGS; off by default until timed): Triton's
  Hopper warp specialization splits the program into a producer warp group issuing the K/V TMA loads and two
  consumer warp groups doing the wgmma and softmax, FlashAttention-3's structure. It needs one key loop (the mask
  then applies to every block), Q by TMA and no early exit, so it serves dense calls only. The dK/dV kernel has
  one too (DKDV_WS_CONFIGS: head dim 64; at 128 every shape Triton partitions spills): one loop over the group's
  query heads × query blocks, Q and dO through descriptors over (heads, rows, head dim), K and V by TMA.
- Backward: by default three kernels and no atomics, so gradients are bitwise repeatable: a preprocess for D, one
  program per (key block, batch·kv head) that accumulates dK and dV over every query block of every query head of
  its group, and one program per (query block, batch·head) that accumulates dQ. The S and dP matmuls are done in
  both (seven matmuls instead of FlashAttention-2's five with atomic dQ): the price of determinism without atomics.
  The five-matmul form is there too, off until timed (DQ_ATOMIC): the dK/dV kernel also forms dS·K for each query
  block and adds it into a zero-filled fp32 dQ accumulator with atomic adds (scaled and cast once after), and the
  dQ kernel is not launched; calls that ask for determinism (deterministic=True, torch.use_deterministic_algorithms)
  never take it.
  The dK/dV kernel has two paths. Through pointers it forms the scores keys × queries (Sᵀ = K·Qᵀ) with K, V, dK
  and dV in registers, which leaves room for 16-query blocks at head dim 128. On Hopper (TMA, below) it reads Q and
  dO tiles by TMA through tensor descriptors made in the kernel for each head's rows (rows past the sequence and
  columns past the head dim arrive as zeros: no per-element pointers or masks) and forms S = Q·Kᵀ, so that K and V
  are wgmma's B operand, kept in shared memory for the whole loop, and Pᵀ, dSᵀ pass through shared memory to feed
  dV and dK: 128-query blocks fit at head dim 128 without spills. The dQ kernel's Hopper path reads K and V tiles
  by TMA likewise (DQ_TMA_CONFIGS: 128 × 64 where the pointer path fits 64 × 64).
- Decode (split-KV, "flash-decoding"), for fp16/bf16 when a kv head's rows, max seqlen q × Hq/Hk, are at most
  DECODE_MAX_ROWS: _attn_decode_kernel runs one program per (split of the keys, kv head, batch entry) whose tile
  rows are the (query position, q head of the group) pairs r = position·(Hq/Hk) + g, so each K/V block is read
  once for the whole group (the general kernel re-reads it per q head, and at batch 1 has Hq programs only). The
  key blocks the rows see (the union of their windows, `_key_range` over all the sequence's queries) are cut into
  `splits` runs of whole blocks, each run keeping the masked-edge / unmasked-middle / masked-edge loops by
  clamping their bounds into it. The host picks `splits` (decode_splits) from B·Hk, the keys a row may see and the
  SM count: DECODE_PROGRAMS_PER_SM programs per SM, no split under DECODE_MIN_SPLIT_KEYS keys, at most
  DECODE_MAX_SPLITS. One split writes out and lse itself; with more, every split writes every row's fp32 partial
  (o normalized, lse in log2 units; 0 and −inf when it saw nothing) to a workspace, and
  _attn_decode_combine_kernel merges each row's splits in split order (lse = log2 Σ 2^lse_s, out =
  Σ 2^(lse_s − lse)·o_s), a fixed order: bitwise repeatable. The LSE it writes is the general kernel's (natural
  log, (B, Hq, Sq) or (Hq, Tq)), so the backward is unchanged. csrc/attention.cu has the same design.
- Variable length: `cu_seqlens` offsets (int32, batch + 1) locate each packed sequence; the grid covers the longest
  and programs past a sequence's end return at once. The kernels clamp every offset into [0, packed tokens] and
  each sequence's end to at least its start (`_seq_bounds`; the launchers pass the totals in place of the
  lengths), so offsets the host cannot check (on the GPU) never make a kernel touch memory outside its tensors.
  Packed tokens outside every sequence (before cu_seqlens[0], from cu_seqlens[-1]) get out 0, LSE −inf and zero
  dq/dk/dv, written by the programs of the first and last sequences (`_outside_edges`, `_fill_rows`).
- Head dims up to 256 of any size: tiles are padded to a power of two ≥ 16 and the extra columns masked.
- Offsets. Packed tokens × heads × dims passes 2³¹, and so can one long sequence's rows × its token stride, or a
  head index × a head-major layout's head stride: every product of an index with a stride that is not bounded by
  a tile is int64 — batch, sequence start and head (`_offset`), and a block's first row (the forward, delta, the
  dK/dV key block and the loops' block starts) or the rows themselves (dQ). Offsets inside a tile (its rows ×
  the token stride, head-dim columns) and block steps stay int32: a tile has at most MAX_TILE_ROWS rows, and the
  launchers copy the (absurd) views whose token stride is not below 2³¹ / MAX_TILE_ROWS (contiguous layouts always
  are: heads × head dim ≤ 65535 × 256 < 2²⁴). Positions within a sequence stay int32.
  tests/test_large_offsets.py checks this rule on the Triton IR of every kernel. The int64 arithmetic costs a few
  registers, which tipped ptxas into spilling at a few shapes; the epilogues therefore form their pointers and
  masks after the loops (nothing kept live through them), and fp32 dK/dV at head dim 16 takes 32-query blocks.
- Grid: axes 1 and 2 (heads, batch) are limited to 65535 by CUDA, so a larger batch is launched in chunks.
- Configurations: fixed per head-dim tile and dtype (CONFIGS below), each compiled by the static report for sm_80
  and sm_90a without spills. They are not yet tuned on a GPU (no measurement exists).
"""

import torch
import triton
import triton.language as tl

from fastlm import _util
from fastlm._util import cdiv, next_pow2, num_sms
from ._common import tanh_and_sech2
from . import _launch

# The kernels work in base 2 (exp2/log2): scores are scaled by log2(e) and the LSE converted back by ln(2).
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ---------------------------------------------------------------------------------------------- shared pieces


@triton.jit
def _seq_bounds(CU, b, n, VARLEN: tl.constexpr):
    """(first packed index, length) of sequence b: from the offsets when VARLEN, else (0, n). With VARLEN, n is
    the packed token total and the offsets are clamped into [0, n], the end to at least the start, so that no
    content of cu_seqlens (past the tokens, negative, decreasing) makes a kernel touch memory outside its tensors:
    a sequence then covers [start, start + length) ⊆ [0, n)."""
    if VARLEN:
        first = tl.minimum(tl.maximum(tl.load(CU + b), 0), n)
        last = tl.minimum(tl.maximum(tl.load(CU + b + 1), first), n)
        start = first.to(tl.int64)
        length = last - first
    else:
        start = tl.zeros((), dtype=tl.int64)
        length = n
    return start, length


@triton.jit
def _query_program(CU_Q, CU_K, seqlen_q, seqlen_k, group, VARLEN: tl.constexpr):
    """A program over one query head (grid axis 1) of one sequence (axis 2): its head, kv head, batch index
    (int64, for offsets) and the bounds of its queries and keys."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, VARLEN)
    k_start, k_len = _seq_bounds(CU_K, b, seqlen_k, VARLEN)
    return h, h // group, b.to(tl.int64), q_start, q_len, k_start, k_len


@triton.jit
def _fill_rows(P, stride_s, L, lo, hi, value, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_D: tl.constexpr, HAS_L: tl.constexpr):
    """Zero the packed rows [lo, hi) of one head (P at that head's token 0, token stride stride_s) and, with HAS_L,
    set its LSE row L[lo:hi] to `value`. Program i along grid axis 0 takes the blocks of BLOCK_M rows i, i + n,
    i + 2n, … (n programs): the axis covers a range of any length. lo, hi are int64 packed indices."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_mask(offs_d, HEAD_D, BLOCK_D)
    zero = tl.zeros((BLOCK_M, BLOCK_D), dtype=P.dtype.element_ty)
    in_tile = offs_m[:, None] * stride_s + offs_d[None, :]  # int32 (the header's rule), formed outside the loop
    for r0 in range(lo + tl.program_id(0) * BLOCK_M, hi, tl.num_programs(0) * BLOCK_M):
        ok = offs_m < hi - r0
        tl.store(P + r0 * stride_s + in_tile, zero, mask=ok[:, None] & d_ok[None, :])
        if HAS_L:
            tl.store(L + r0 + offs_m, tl.full((BLOCK_M,), value, tl.float32), mask=ok)


@triton.jit
def _outside_edges(b, first_end, last_end, n, edges):
    """The packed rows outside every sequence that the programs of sequence b write (varlen): [0, first_end)
    before the first sequence when b is the launch's first and it holds the call's first (edges bit 0), and
    [last_end, n) after the last sequence when b is the launch's last and it holds the call's last (bit 1).
    first_end, last_end: sequence b's clamped start and end. → (head lo, head hi, tail lo, tail hi), int64; the
    ranges other programs get are empty. A query there gets out 0 and LSE −inf (it sees no key) and dq 0, a key
    dk = dv = 0: written by the kernels themselves (no memset of the whole output, no host sync)."""
    zero = tl.zeros((), dtype=tl.int64)
    total = zero + n  # n and edges may arrive as constexpr (the JIT specialises ints equal to 1)
    flags = tl.zeros((), dtype=tl.int32) + edges
    head = tl.where((b == 0) & ((flags & 1) != 0), first_end, zero)
    tail = tl.where((b == tl.num_programs(2) - 1) & ((flags & 2) != 0), last_end, total)
    return zero, head, tail, total


@triton.jit
def _fill_outside_q(O, LSE, h, b, stride_os, stride_oh, stride_lh, q_start, q_len, seqlen_q, edges,
                    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Query head h's packed rows outside every sequence (varlen; see _outside_edges): out 0, LSE −inf. Called
    where little else is live (a program's early exit, or after its stores): ahead of the main loop it kept values
    live across it and made ptxas spill."""
    h0, h1, t0, t1 = _outside_edges(b, q_start, q_start + q_len, seqlen_q, edges)
    Oh = O + h.to(tl.int64) * stride_oh
    Lh = LSE + h.to(tl.int64) * stride_lh
    _fill_rows(Oh, stride_os, Lh, h0, h1, float("-inf"), HEAD_D, BLOCK_M, BLOCK_D, True)
    _fill_rows(Oh, stride_os, Lh, t0, t1, float("-inf"), HEAD_D, BLOCK_M, BLOCK_D, True)


@triton.jit
def _offset(b64, token, head, stride_b, stride_s, stride_h):
    """b·stride_b + token·stride_s + head·stride_h in int64 (token is int64: a packed index, or a sequence's start
    plus the program's first row; head an int32 index)."""
    return b64 * stride_b + token * stride_s + head.to(tl.int64) * stride_h


@triton.jit
def _lse_log2(lse):
    """The LSE in log2 units for the backward's P = exp2(s2 − lse2). A row that saw nothing has lse = −inf; +inf
    makes its P exactly 0 (its scores are −inf anyway)."""
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _head_mask(offs_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Which head-dim columns exist: a constant all-true mask when the tile is the head dim, so that loads keep
    their full vector width."""
    if HEAD_D == BLOCK_D:
        ok = tl.full((BLOCK_D,), 1, tl.int1)
    else:
        ok = offs_d < HEAD_D
    return ok


@triton.jit
def _scores(qk, scale2, softcap, HAS_SOFTCAP: tl.constexpr):
    """Scores in log2 units and dS/dZ from raw q·k (fp32). scale2 = scale·log2 e (scale alone with a softcap,
    whose log2 e is applied after the tanh)."""
    if HAS_SOFTCAP:
        th, sech2 = tanh_and_sech2(qk * (scale2 / softcap))
        s2 = th * (softcap * LOG2E)
    else:
        s2 = qk * scale2
        sech2 = s2
    return s2, sech2


@triton.jit
def _visible(rows, cols, seqlen_k, diag, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(rows, cols) bool: key col exists and the window lets query row see it (positions in the sequence)."""
    vis = cols[None, :] < seqlen_k
    if HAS_RIGHT:
        vis = vis & (cols[None, :] <= rows[:, None] + diag + window_right)
    if HAS_LEFT:
        vis = vis & (cols[None, :] >= rows[:, None] + diag - window_left)
    return vis


@triton.jit
def _key_range(r0, r1, seqlen_k, diag, window_left, window_right, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """For queries r0..r1 (inclusive): key blocks [lo, hi) that any of them sees, and inside it the blocks
    [full_lo, full_hi) that all of them see whole (no mask). Block starts are multiples of BLOCK_N."""
    lo = tl.full((), 0, tl.int32)
    hi = seqlen_k
    full_lo = lo
    full_end = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(r0 + diag - window_left, 0) // BLOCK_N * BLOCK_N
        full_lo = (tl.maximum(r1 + diag - window_left, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(hi, r1 + diag + window_right + 1)
        full_end = tl.minimum(full_end, r0 + diag + window_right + 1)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_range(c0, c1, seqlen_q, diag, window_left, window_right, BLOCK_M: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """For keys c0..c1 (inclusive): query blocks [lo, hi) where any query sees one of them, and inside it the blocks
    [full_lo, full_hi) whose every query exists and sees all of them. Block starts are multiples of BLOCK_M."""
    lo = tl.full((), 0, tl.int32)
    hi = seqlen_q
    full_lo = lo
    full_end = seqlen_q
    if HAS_RIGHT:  # j ≤ i + diag + right  ⇔  i ≥ j − diag − right
        lo = tl.maximum(c0 - diag - window_right, 0) // BLOCK_M * BLOCK_M
        full_lo = (tl.maximum(c1 - diag - window_right, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    if HAS_LEFT:  # j ≥ i + diag − left  ⇔  i ≤ j − diag + left
        hi = tl.minimum(hi, c1 - diag + window_left + 1)
        full_end = tl.minimum(full_end, c0 - diag + window_left + 1)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.maximum(full_end, 0) // BLOCK_M * BLOCK_M, full_lo)
    return lo, full_lo, full_hi, hi


# ---------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, K, V, stride_ks, stride_vs, start, end, rows, seqlen_k, diag, scale2, softcap,
    window_left, window_right,
    HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False, WARP_SPEC: tl.constexpr = False,
):
    """Online softmax over the key blocks [start, end): the running (acc, row sum l_i, row max m_i) in log2 units.
    K and V: the kv head's first key row (pointers), or with USE_TMA its tensor descriptors (_head_rows)."""
    if USE_TMA:
        acc, l_i, m_i = _fwd_blocks_tma(acc, l_i, m_i, q, K, V, start, end, rows, seqlen_k, diag, scale2, softcap,
                                        window_left, window_right, BLOCK_N, MASKED, HAS_LEFT, HAS_RIGHT,
                                        HAS_SOFTCAP, DOT_PRECISION, WARP_SPEC)
    else:
        acc, l_i, m_i = _fwd_blocks_ptr(acc, l_i, m_i, q, K, V, stride_ks, stride_vs, start, end, rows, seqlen_k,
                                        diag, scale2, softcap, window_left, window_right, HEAD_D, BLOCK_N, BLOCK_D,
                                        MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _softmax_update(s2, m_i, l_i, MASKED: tl.constexpr):
    """One key block of the online softmax, scores s2 in log2 units (−inf where masked): its probabilities p, the
    factor alpha that rescales what was accumulated, and the new row sum and row max. (The caller adds p·V to
    acc·alpha: the pointer path loads V only now, after the scores are spent.)"""
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    if MASKED:  # a row with nothing visible yet keeps m = −inf: subtract 0 instead (exp2(−inf) = 0, no NaN)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(s2 - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _fwd_blocks_tma(
    acc, l_i, m_i, q, k_desc, v_desc, start, end, rows, seqlen_k, diag, scale2, softcap, window_left, window_right,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, WARP_SPEC: tl.constexpr = False,
):
    """_fwd_blocks on Hopper: K and V tiles by TMA (keys past the sequence arrive as zero rows, masked as before)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPEC):
        k = k_desc.load([start_n, 0])
        s2, _ = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), scale2, softcap, HAS_SOFTCAP)
        if MASKED:
            vis = _visible(rows, start_n + offs_n, seqlen_k, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            s2 = tl.where(vis, s2, float("-inf"))
        p, alpha, l_i, m_i = _softmax_update(s2, m_i, l_i, MASKED)
        v = v_desc.load([start_n, 0])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _fwd_blocks_ptr(
    acc, l_i, m_i, q, K, V, stride_ks, stride_vs, start, end, rows, seqlen_k, diag, scale2, softcap,
    window_left, window_right,
    HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """_fwd_blocks through pointers."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_mask(offs_d, HEAD_D, BLOCK_D)
    k_ptrs = K + start.to(tl.int64) * stride_ks + offs_n[None, :] * stride_ks + offs_d[:, None]  # (BLOCK_D, BLOCK_N)
    v_ptrs = V + start.to(tl.int64) * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_ptrs, mask=d_ok[:, None] & (cols[None, :] < seqlen_k), other=0.0)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        s2, _ = _scores(tl.dot(q, k, input_precision=DOT_PRECISION), scale2, softcap, HAS_SOFTCAP)
        if MASKED:
            vis = _visible(rows, cols, seqlen_k, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            s2 = tl.where(vis, s2, float("-inf"))
        p, alpha, l_i, m_i = _softmax_update(s2, m_i, l_i, MASKED)
        # V loaded after the softmax: loaded with the scores live, it spilled an fp32 variant.
        if MASKED:
            v = tl.load(v_ptrs, mask=d_ok[None, :] & (cols[:, None] < seqlen_k), other=0.0)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,  # q (B, Sq, Hq, D) | (Tq, Hq, D); k, v (B, Sk, Hk, D) | (Tk, Hk, D); o like q; lse fp32
    CU_Q, CU_K,  # (B + 1,) int32 sequence offsets when VARLEN (unused otherwise)
    stride_qb, stride_qs, stride_qh,  # element strides; the head-dim stride is 1 for every tensor
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,  # lse (B, Hq, Sq): Hq·Sq, Sq; varlen (Hq, Tq): 0, Tq. Its sequence stride is 1.
    seqlen_q, seqlen_k,  # dense lengths, or with VARLEN the packed token totals (the offsets' bounds)
    group,  # query heads per kv head
    edges,  # with VARLEN: bit 0 this launch holds the first sequence, bit 1 the last (see _outside_edges)
    scale2, softcap, window_left, window_right,  # see _scores and _visible
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr = False,
):
    start_m = tl.program_id(0) * BLOCK_M
    h, hk, b64, q_start, q_len, k_start, k_len = _query_program(CU_Q, CU_K, seqlen_q, seqlen_k, group, VARLEN)
    tl.static_assert(not (WARP_SPEC and VARLEN), "the warp-specialized path is for dense calls")
    if not WARP_SPEC:  # (dense only: every program has rows)
        if start_m >= q_len:
            if VARLEN:  # query tokens outside every sequence: out 0, lse −inf (every program takes its share)
                _fill_outside_q(O, LSE, h, tl.program_id(2), stride_os, stride_oh, stride_lh, q_start, q_len,
                                seqlen_q, edges, HEAD_D, BLOCK_M, BLOCK_D)
            return
    diag = k_len - q_len
    # 64-bit offsets: the kv head's first key (and below, this block's first query).
    Kh = K + _offset(b64, k_start, hk, stride_kb, stride_ks, stride_kh)
    Vh = V + _offset(b64, k_start, hk, stride_vb, stride_vs, stride_vh)

    offs_m = tl.arange(0, BLOCK_M)
    rows = start_m + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    if WARP_SPEC:  # Q by TMA too, from the head's first row (rows past q_len arrive as zeros, as masked below)
        q_desc = tl.make_tensor_descriptor(Q + _offset(b64, q_start, h, stride_qb, stride_qs, stride_qh),
                                           shape=[q_len, HEAD_D], strides=[stride_qs, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        q = q_desc.load([start_m, 0])
    else:
        Qm = Q + _offset(b64, q_start + start_m, h, stride_qb, stride_qs, stride_qh)
        io_mask = (rows < q_len)[:, None] & _head_mask(offs_d, HEAD_D, BLOCK_D)[None, :]
        q = tl.load(Qm + offs_m[:, None] * stride_qs + offs_d[None, :], mask=io_mask, other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    r1 = tl.minimum(start_m + BLOCK_M, q_len) - 1
    lo, full_lo, full_hi, hi = _key_range(start_m, r1, k_len, diag, window_left, window_right, BLOCK_N,
                                          HAS_LEFT, HAS_RIGHT)
    Ka, Va = _head_rows(Kh, Vh, k_len, stride_ks, stride_vs, HEAD_D, BLOCK_N, BLOCK_D, USE_TMA)
    if WARP_SPEC:
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, Ka, Va, stride_ks, stride_vs, lo, hi, rows, k_len, diag,
                                    scale2, softcap, window_left, window_right, HEAD_D, BLOCK_N, BLOCK_D, True,
                                    HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION, USE_TMA, True)
    else:
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, Ka, Va, stride_ks, stride_vs, lo, full_lo, rows, k_len, diag,
                                    scale2, softcap, window_left, window_right, HEAD_D, BLOCK_N, BLOCK_D, True,
                                    HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION, USE_TMA)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, Ka, Va, stride_ks, stride_vs, full_lo, full_hi, rows, k_len,
                                    diag, scale2, softcap, window_left, window_right, HEAD_D, BLOCK_N, BLOCK_D, False,
                                    HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION, USE_TMA)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, Ka, Va, stride_ks, stride_vs, full_hi, hi, rows, k_len, diag,
                                    scale2, softcap, window_left, window_right, HEAD_D, BLOCK_N, BLOCK_D, True,
                                    HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION, USE_TMA)

    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    lse = tl.where(empty_row, float("-inf"), (m_i + tl.math.log2(tl.where(empty_row, 1.0, l_i))) * LN2)
    # The output's pointers and row mask are formed only now: kept from the prologue, they stay live through the
    # loops (the mask in predicate registers), which made ptxas spill at some shapes.
    Om = O + _offset(b64, q_start + start_m, h, stride_ob, stride_os, stride_oh)
    Lh = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start
    out_ok = offs_m < q_len - start_m
    tl.store(Om + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=out_ok[:, None] & _head_mask(offs_d, HEAD_D, BLOCK_D)[None, :])
    tl.store(Lh + rows, lse, mask=out_ok)
    if VARLEN:  # as at the early exit above, for the programs that did not take it
        _fill_outside_q(O, LSE, h, tl.program_id(2), stride_os, stride_oh, stride_lh, q_start, q_len, seqlen_q,
                        edges, HEAD_D, BLOCK_M, BLOCK_D)


# ---------------------------------------------------------------------------------------------- decode (split-KV)


@triton.jit
def _attn_decode_kernel(
    Q, K, V, O, LSE,  # as _attn_fwd_kernel
    WS_O, WS_L,  # with splits: (B, Hk, n_rows, splits, HEAD_D) fp32 partial outputs, (B, Hk, n_rows, splits) lse2
    CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k,  # dense lengths, or with VARLEN the packed token totals (the offsets' bounds)
    group, n_rows, splits,  # q heads per kv head; rows = max seqlen q · group (≤ BLOCK_M); key splits
    scale2, softcap, window_left, window_right,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ONE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (split of the keys, kv head, batch entry). Its rows are the (query position, q head of the
    group) pairs r = position·group + g of the kv head, so each K/V block is loaded once for the whole group.
    Packed query tokens outside every sequence are _attn_fill_outside_kernel's (written here, their code made
    ptxas spill in the all-options variants)."""
    split = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, VARLEN)
    k_start, k_len = _seq_bounds(CU_K, b, seqlen_k, VARLEN)
    if q_len <= 0:
        return
    diag = k_len - q_len
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    pos = offs_m // group  # query position of each row (in the sequence)
    g = offs_m % group  # its q head within the group
    row_ok = (offs_m < n_rows) & (pos < q_len)
    h0 = hk * group
    # Per-row offsets in int64: a head index times a head stride need not fit 32 bits (head-major layouts).
    q_rows = pos.to(tl.int64) * stride_qs + g.to(tl.int64) * stride_qh
    Qh = Q + _offset(b64, q_start, h0, stride_qb, stride_qs, stride_qh)
    q = tl.load(Qh + q_rows[:, None] + offs_d[None, :],
                mask=row_ok[:, None] & _head_mask(offs_d, HEAD_D, BLOCK_D)[None, :], other=0.0)
    Kh = K + _offset(b64, k_start, hk, stride_kb, stride_ks, stride_kh)
    Vh = V + _offset(b64, k_start, hk, stride_vb, stride_vs, stride_vh)

    # The key blocks the rows see, [lo, hi), cut into `splits` runs of whole blocks; this program's run [a, e)
    # keeps the three loops' split (masked edge, unmasked middle, masked edge) by clamping their bounds into it.
    lo, full_lo, full_hi, hi = _key_range(0, q_len - 1, k_len, diag, window_left, window_right, BLOCK_N,
                                          HAS_LEFT, HAS_RIGHT)
    per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), splits) * BLOCK_N
    a = tl.minimum(lo + split * per_split, hi)
    e = tl.minimum(a + per_split, hi)
    m_lo = tl.minimum(tl.maximum(full_lo, a), e)
    m_hi = tl.minimum(tl.maximum(full_hi, m_lo), e)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, Kh, Vh, stride_ks, stride_vs, a, m_lo, pos, k_len, diag, scale2,
                                softcap, window_left, window_right, HEAD_D, BLOCK_N, BLOCK_D, True, HAS_LEFT,
                                HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, Kh, Vh, stride_ks, stride_vs, m_lo, m_hi, pos, k_len, diag, scale2,
                                softcap, window_left, window_right, HEAD_D, BLOCK_N, BLOCK_D, False, HAS_LEFT,
                                HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, Kh, Vh, stride_ks, stride_vs, m_hi, e, pos, k_len, diag, scale2,
                                softcap, window_left, window_right, HEAD_D, BLOCK_N, BLOCK_D, True, HAS_LEFT,
                                HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)

    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    lse2 = tl.where(empty_row, float("-inf"), m_i + tl.math.log2(tl.where(empty_row, 1.0, l_i)))
    # Pointers and masks formed after the loops (see _attn_fwd_kernel's epilogue).
    offs_m = tl.arange(0, BLOCK_M)
    pos = offs_m // group
    g = offs_m % group
    d_ok = _head_mask(offs_d, HEAD_D, BLOCK_D)
    if ONE_SPLIT:
        out_ok = (offs_m < n_rows) & (pos < q_len)
        o_rows = pos.to(tl.int64) * stride_os + g.to(tl.int64) * stride_oh
        Oh = O + _offset(b64, q_start, h0, stride_ob, stride_os, stride_oh)
        tl.store(Oh + o_rows[:, None] + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=out_ok[:, None] & d_ok[None, :])
        l_off = b64 * stride_lb + (h0 + g).to(tl.int64) * stride_lh + q_start + pos
        tl.store(LSE + l_off, lse2 * LN2, mask=out_ok)
    else:
        # Every row below n_rows of every split, whether it saw keys or not: the combine reads them all.
        ws_ok = offs_m < n_rows
        w_row = (b64 * tl.num_programs(1) + hk) * n_rows * splits + split  # row 0 of this split, in rows of D
        ws_rows = w_row + offs_m * splits
        tl.store(WS_L + ws_rows, lse2, mask=ws_ok)
        tl.store(WS_O + ws_rows[:, None] * HEAD_D + offs_d[None, :], out, mask=ws_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_decode_combine_kernel(
    O, LSE, WS_O, WS_L, CU_Q,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, group, n_rows, splits,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_TILE: tl.constexpr, VARLEN: tl.constexpr,
):
    """One program per (row, kv head, batch entry): lse2 = log2 Σ_s 2^lse2_s, out = Σ_s 2^(lse2_s − lse2)·o_s over
    the splits, SPLIT_TILE at a time in split order (a fixed order: bitwise repeatable)."""
    r = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, VARLEN)
    pos = r // group
    if pos >= q_len:
        return
    h = hk * group + r % group
    w_row = ((b64 * tl.num_programs(1) + hk) * n_rows + r) * splits
    offs_s = tl.arange(0, SPLIT_TILE)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_mask(offs_d, HEAD_D, BLOCK_D)
    m = tl.full((), float("-inf"), tl.float32)
    for s0 in range(0, splits, SPLIT_TILE):
        lse_s = tl.load(WS_L + w_row + s0 + offs_s, mask=s0 + offs_s < splits, other=float("-inf"))
        m = tl.maximum(m, tl.max(lse_s, 0))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for s0 in range(0, splits, SPLIT_TILE):
        s_ok = s0 + offs_s < splits
        w = tl.math.exp2(tl.load(WS_L + w_row + s0 + offs_s, mask=s_ok, other=float("-inf")) - m_use)
        o = tl.load(WS_O + (w_row + s0 + offs_s)[:, None] * HEAD_D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                    other=0.0)
        l += tl.sum(w, 0)
        acc += tl.sum(w[:, None] * o, 0)
    empty_row = l == 0.0
    out = acc / tl.where(empty_row, 1.0, l)
    lse = tl.where(empty_row, float("-inf"), (m_use + tl.math.log2(tl.where(empty_row, 1.0, l))) * LN2)
    Oh = O + _offset(b64, q_start + pos, h, stride_ob, stride_os, stride_oh)
    tl.store(Oh + offs_d, out.to(O.dtype.element_ty), mask=d_ok)
    tl.store(LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + pos, lse)


# ---------------------------------------------------------------------------------------------- backward


@triton.jit
def _attn_fill_outside_kernel(
    O, LSE, CU_Q,  # out (Tq, Hq, D), lse (Hq, Tq); the launch's (nb + 1,) offsets
    stride_os, stride_oh, stride_lh,
    nb, seqlen_q, edges,  # sequences in the launch; the packed total; bit 0 first sequence here, bit 1 the last
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The decode path's packed query tokens outside every sequence (varlen): out 0, LSE −inf, for query head
    program_id(1); programs along axis 0 stride over the rows (_fill_rows). A launch of its own: inside the decode
    kernel this code made ptxas spill."""
    h = tl.program_id(1)
    zero = tl.zeros((), dtype=tl.int64)
    total = zero + seqlen_q
    flags = tl.zeros((), dtype=tl.int32) + edges
    first, _ = _seq_bounds(CU_Q, 0, seqlen_q, True)
    last, last_len = _seq_bounds(CU_Q, nb - 1, seqlen_q, True)
    head_hi = tl.where((flags & 1) != 0, first, zero)
    tail_lo = tl.where((flags & 2) != 0, last + last_len, total)
    Oh = O + h.to(tl.int64) * stride_oh
    Lh = LSE + h.to(tl.int64) * stride_lh
    _fill_rows(Oh, stride_os, Lh, zero, head_hi, float("-inf"), HEAD_D, BLOCK_M, BLOCK_D, True)
    _fill_rows(Oh, stride_os, Lh, tail_lo, total, float("-inf"), HEAD_D, BLOCK_M, BLOCK_D, True)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DLSE, DELTA,  # o, do like q (contiguous, dense or packed); dlse, delta like lse (fp32)
    CU_Q,
    stride_ob, stride_os, stride_oh,
    stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh,
    seqlen_q,  # dense length, or with VARLEN the packed token total
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """delta_i = Σ_d dO_id·O_id − dlse_i, fp32."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    b64 = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    rows = start_m + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < q_len) & _head_mask(offs_d, HEAD_D, BLOCK_D)[None, :]
    Om = O + _offset(b64, q_start + start_m, h, stride_ob, stride_os, stride_oh)
    DOm = DO + _offset(b64, q_start + start_m, h, stride_db, stride_ds, stride_dh)
    o = tl.load(Om + offs_m[:, None] * stride_os + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOm + offs_m[:, None] * stride_ds + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    lse_off = b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + rows
    out_ok = offs_m < q_len - start_m  # a fresh mask, as in the forward's epilogue
    if HAS_DLSE:
        delta -= tl.load(DLSE + lse_off, mask=out_ok, other=0.0)
    tl.store(DELTA + lse_off, delta, mask=out_ok)


@triton.jit
def _bwd_dkdv_blocks(
    dk, dv, k, v, Q, DO, L, DELTA, DQA, h, stride_qs, stride_ds, stride_as, start, end, cols, seqlen_q, seqlen_k, diag,
    scale2, softcap, window_left, window_right,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """Accumulate dK, dV (BLOCK_N, BLOCK_D) of the keys `cols` over the query blocks [start, end) of one head.
    Q and DO: the head's first query row (pointers), or with USE_TMA its tensor descriptors (_head_rows). With
    ATOMIC_DQ also add each query block's dS·K into the fp32 dQ accumulator DQA: the head's first row (row stride
    stride_as), or with USE_TMA a tensor descriptor over the sequence's (heads, rows, head dim), indexed by the
    query head h. seqlen_k: the masked loops' key limit (the sequence's keys with ATOMIC_DQ, else no limit: see
    _attn_bwd_dkdv_kernel)."""
    if USE_TMA:
        dk, dv = _bwd_dkdv_blocks_tma(dk, dv, k, v, Q, DO, L, DELTA, DQA, h, start, end, cols, seqlen_q, seqlen_k,
                                      diag, scale2, softcap, window_left, window_right, BLOCK_M, BLOCK_D, MASKED,
                                      HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION, ATOMIC_DQ)
    else:
        dk, dv = _bwd_dkdv_blocks_ptr(dk, dv, k, v, Q, DO, L, DELTA, DQA, stride_qs, stride_ds, stride_as, start,
                                      end, cols, seqlen_q, seqlen_k, diag, scale2, softcap, window_left,
                                      window_right, HEAD_D, BLOCK_M, BLOCK_D, MASKED, HAS_LEFT, HAS_RIGHT,
                                      HAS_SOFTCAP, DOT_PRECISION, ATOMIC_DQ)
    return dk, dv


@triton.jit
def _add_dq(block, stride_as, rows_ok, ds, k, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """dQ += dS·K for one query block (ds: (BLOCK_M, BLOCK_N), queries × keys, in the inputs' dtype) by fp32 atomic
    adds into the accumulator from `block`, a pointer to the block's first row (row stride stride_as); rows_ok
    (BLOCK_M,) masks rows past the sequence, or None. Unscaled: the launcher scales the sum once, as the dQ kernel
    does. The adds' order varies from run to run, and so does the rounding: not bitwise repeatable
    (deterministic=True never takes this path). The tile's addresses are made here from one pointer carried
    through the loop, not carried as a tile of pointers (two registers an element)."""
    BLOCK_M: tl.constexpr = ds.shape[0]
    dq = tl.dot(ds, k, input_precision=DOT_PRECISION)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = _head_mask(offs_d, HEAD_D, BLOCK_D)[None, :]
    if rows_ok is not None:
        mask = mask & rows_ok[:, None]
    tl.atomic_add(block + offs_m[:, None] * stride_as + offs_d[None, :], dq, mask=mask, sem="relaxed")


@triton.jit
def _bwd_dkdv_blocks_ptr(
    dk, dv, k, v, Q, DO, L, DELTA, DQA, stride_qs, stride_ds, stride_as, start, end, cols, seqlen_q, seqlen_k, diag,
    scale2, softcap, window_left, window_right,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
):
    """_bwd_dkdv_blocks through pointers, scores formed keys × queries (K and V held in registers)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_mask(offs_d, HEAD_D, BLOCK_D)
    q_ptrs = Q + start.to(tl.int64) * stride_qs + offs_m[:, None] * stride_qs + offs_d[None, :]  # (BLOCK_M, BLOCK_D)
    do_ptrs = DO + start.to(tl.int64) * stride_ds + offs_m[:, None] * stride_ds + offs_d[None, :]
    dqa = DQA + start.to(tl.int64) * stride_as  # the dQ accumulator's rows of the query block
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        if MASKED:
            row_ok = rows < seqlen_q
            q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(L + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
            lse = tl.load(L + rows)
            delta = tl.load(DELTA + rows)
        lse2 = _lse_log2(lse)
        s2t, sech2t = _scores(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION), scale2, softcap,
                              HAS_SOFTCAP)  # (BLOCK_N, BLOCK_M): keys × queries
        if MASKED:
            vis = _visible(rows, cols, seqlen_k, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            s2t = tl.where(tl.trans(vis), s2t, float("-inf"))
        pt = tl.math.exp2(s2t - lse2[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        if HAS_SOFTCAP:
            dst = dst * sech2t
        dst = dst.to(q.dtype)  # once, for dK and the atomic dQ (no fp32 tile kept for the second)
        dk += tl.dot(dst, q, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            _add_dq(dqa, stride_as, row_ok if MASKED else None, tl.trans(dst), k, HEAD_D, BLOCK_D, DOT_PRECISION)
            dqa += BLOCK_M * stride_as
        q_ptrs += BLOCK_M * stride_qs
        do_ptrs += BLOCK_M * stride_ds
    return dk, dv


@triton.jit
def _bwd_dkdv_blocks_tma(
    dk, dv, k, v, q_desc, do_desc, L, DELTA, dqa_desc, h, start, end, cols, seqlen_q, seqlen_k, diag, scale2,
    softcap, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
):
    """_bwd_dkdv_blocks on Hopper: the Q and dO tiles come by TMA (rows past the sequence and head-dim columns past
    HEAD_D arrive as zeros), and the scores are formed queries × keys, S = Q·Kᵀ, so that K and V are wgmma's B
    operand, held in shared memory for the whole loop; Pᵀ and dSᵀ go through shared memory to feed dV and dK.
    Without per-element pointers and with K and V out of the registers, a 128-query block fits at head dim 128
    (the pointer path's transposed form fits 16)."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        dk, dv, ds = _dkdv_step(dk, dv, k, v, q_desc.load([start_m, 0]), do_desc.load([start_m, 0]), L, DELTA,
                                rows, cols, seqlen_q, seqlen_k, diag, scale2, softcap, window_left, window_right,
                                MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)
        if ATOMIC_DQ:
            # One TMA reduce-add of the tile (from shared memory; rows past the sequence and columns past the head
            # dim are outside the descriptor and skipped), FlashAttention-3's way: no per-element addresses.
            dq = tl.dot(ds, k, input_precision=DOT_PRECISION)
            dqa_desc.atomic_add([h, start_m, 0], dq.reshape(1, BLOCK_M, BLOCK_D))
    return dk, dv


@triton.jit
def _dkdv_step(
    dk, dv, k, v, q, do, L, DELTA, rows, cols, seqlen_q, seqlen_k, diag, scale2, softcap, window_left, window_right,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One query block of the Hopper dK/dV loops: scores queries × keys, S = Q·Kᵀ; P from the LSE; dV += Pᵀ·dO,
    dS = P ∘ (dO·Vᵀ − D), dK += dSᵀ·Q (L and DELTA: the head's first query row of LSE and D). Returns dK, dV and
    dS in the inputs' dtype (for an atomic dQ)."""
    if MASKED:
        row_ok = rows < seqlen_q
        lse = tl.load(L + rows, mask=row_ok, other=float("inf"))  # p = 0 for the zero rows past the end
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    else:
        lse = tl.load(L + rows)
        delta = tl.load(DELTA + rows)
    s2, sech2 = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), scale2, softcap,
                        HAS_SOFTCAP)  # (BLOCK_M, BLOCK_N): queries × keys
    if MASKED:
        vis = _visible(rows, cols, seqlen_k, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        s2 = tl.where(vis, s2, float("-inf"))
    p = tl.math.exp2(s2 - _lse_log2(lse)[:, None])
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * sech2
    ds = ds.to(q.dtype)  # once, for dK and an atomic dQ
    dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
    return dk, dv, ds


@triton.jit
def _bwd_dkdv_ws(
    dk, dv, k, v, Qb, DOb, Lb, Db, hk, group, lo, hi, cols, seqlen_q, diag, scale2, softcap, window_left,
    window_right, stride_qs, stride_qh, stride_ds, stride_dh, stride_lh,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The dK/dV loop warp-specialized (dense calls; Qb, DOb, Lb, Db the batch entry's Q, dO, LSE and D): one loop
    over the group's query heads × the query blocks [lo, hi), every block masked, Q and dO tiles by TMA through
    descriptors over (heads, rows, head dim). The same blocks in the same order as the three loops per head of the
    other paths, so the same sums. Triton partitions only such a loop (see FWD_WS_CONFIGS)."""
    heads = tl.num_programs(1) * group
    q_desc = tl.make_tensor_descriptor(Qb, shape=[heads, seqlen_q, HEAD_D], strides=[stride_qh, stride_qs, 1],
                                       block_shape=[1, BLOCK_M, BLOCK_D])
    do_desc = tl.make_tensor_descriptor(DOb, shape=[heads, seqlen_q, HEAD_D], strides=[stride_dh, stride_ds, 1],
                                        block_shape=[1, BLOCK_M, BLOCK_D])
    offs_m = tl.arange(0, BLOCK_M)
    blocks = tl.cdiv(hi - lo, BLOCK_M)
    for it in tl.range(0, group * blocks, warp_specialize=True):
        g = it // blocks
        start_m = lo + (it - g * blocks) * BLOCK_M
        h = hk * group + g
        q = q_desc.load([h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        do = do_desc.load([h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        head = h.to(tl.int64) * stride_lh
        dk, dv, _ = _dkdv_step(dk, dv, k, v, q, do, Lb + head, Db + head, start_m + offs_m, cols, seqlen_q,
                               2147483647, diag, scale2, softcap, window_left, window_right, True, HAS_LEFT,
                               HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)
    return dk, dv


@triton.jit
def _head_rows(A, B, n, stride_a, stride_b, HEAD_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
               USE_TMA: tl.constexpr):
    """What a loop reads two tensors' rows of one head through (Q and dO in the dK/dV kernel, K and V in the
    forward): the pointers A and B to the head's first row, or with USE_TMA tensor descriptors of the head's
    (n, HEAD_D) rows in BLOCK_R × BLOCK_D tiles, made here on the device (16-byte aligned rows: the launcher
    checks); rows past n and columns past HEAD_D then arrive as zeros."""
    if USE_TMA:
        rows = tl.maximum(n, 1)  # an empty sequence reads nothing, but a descriptor's sizes must be positive
        a_desc = tl.make_tensor_descriptor(A, shape=[rows, HEAD_D], strides=[stride_a, 1],
                                           block_shape=[BLOCK_R, BLOCK_D])
        b_desc = tl.make_tensor_descriptor(B, shape=[rows, HEAD_D], strides=[stride_b, 1],
                                           block_shape=[BLOCK_R, BLOCK_D])
        return a_desc, b_desc
    else:
        return A, B


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,  # q, do (.., Hq, D); k, v, dk, dv (.., Hk, D); lse, delta fp32 like the forward
    DQA,  # with ATOMIC_DQ the fp32 dQ accumulator (.., Hq, D), zero-filled, unscaled (else unused)
    CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,  # do
    stride_gb, stride_gs, stride_gh,  # dk and dv (allocated alike)
    stride_ab, stride_as, stride_ah,  # the dQ accumulator
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, group,  # dense lengths, or with VARLEN the packed token totals
    edges,  # as _attn_fwd_kernel's
    scale2, softcap, scale, window_left, window_right,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr = False,
    ATOMIC_DQ: tl.constexpr = False,
):
    tl.static_assert(not (WARP_SPEC and VARLEN), "the warp-specialized path is for dense calls")
    tl.static_assert(not (WARP_SPEC and ATOMIC_DQ), "the warp-specialized path has no atomic dQ")
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, VARLEN)
    k_start, k_len = _seq_bounds(CU_K, b, seqlen_k, VARLEN)
    if VARLEN:  # key tokens outside every sequence: dk = dv = 0 (before the return below)
        h0, h1, t0, t1 = _outside_edges(b, k_start, k_start + k_len, seqlen_k, edges)
        DKh = DK + hk.to(tl.int64) * stride_gh
        DVh = DV + hk.to(tl.int64) * stride_gh
        _fill_rows(DKh, stride_gs, DKh, h0, h1, 0.0, HEAD_D, BLOCK_N, BLOCK_D, False)
        _fill_rows(DKh, stride_gs, DKh, t0, t1, 0.0, HEAD_D, BLOCK_N, BLOCK_D, False)
        _fill_rows(DVh, stride_gs, DVh, h0, h1, 0.0, HEAD_D, BLOCK_N, BLOCK_D, False)
        _fill_rows(DVh, stride_gs, DVh, t0, t1, 0.0, HEAD_D, BLOCK_N, BLOCK_D, False)
    start_n = pid_n * BLOCK_N
    if not WARP_SPEC:  # (dense only: every program has keys)
        if start_n >= k_len:
            return
    diag = k_len - q_len
    b64 = b.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    cols = start_n + offs_n
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < k_len) & _head_mask(offs_d, HEAD_D, BLOCK_D)[None, :]
    if WARP_SPEC:  # K and V by TMA too (keys past the sequence arrive as zeros, as masked below)
        k_desc, v_desc = _head_rows(K + _offset(b64, k_start, hk, stride_kb, stride_ks, stride_kh),
                                    V + _offset(b64, k_start, hk, stride_vb, stride_vs, stride_vh), k_len,
                                    stride_ks, stride_vs, HEAD_D, BLOCK_N, BLOCK_D, True)
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
    else:
        Kn = K + _offset(b64, k_start + start_n, hk, stride_kb, stride_ks, stride_kh)
        Vn = V + _offset(b64, k_start + start_n, hk, stride_vb, stride_vs, stride_vh)
        k = tl.load(Kn + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(Vn + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    c1 = tl.minimum(start_n + BLOCK_N, k_len) - 1
    lo, full_lo, full_hi, hi = _query_range(start_n, c1, q_len, diag, window_left, window_right, BLOCK_M,
                                            HAS_LEFT, HAS_RIGHT)
    # Keys past the sequence's end (last block) must not pass as visible in the unmasked loop: their rows of dk
    # and dv are never stored, so they only need to stay finite, which zero-filled k and v ensure. Not so for an
    # atomic dQ, which every key of the block feeds: P there is exp(−lse), unbounded, and dS can round to inf
    # (inf · 0 = NaN in dS·K). So with ATOMIC_DQ a partial last block walks all its query blocks masked, keys past
    # the end masked too (key_end; without it a constant, which the compiler folds away).
    key_end = 2147483647
    if ATOMIC_DQ:
        key_end = k_len
        partial = start_n + BLOCK_N > k_len
        full_lo = tl.where(partial, hi, full_lo)
        full_hi = tl.where(partial, hi, full_hi)
    if ATOMIC_DQ and USE_TMA:
        # The accumulator by TMA: one descriptor over the sequence's (query heads, rows, head dim), made once, not
        # per head (a descriptor rewritten while the previous head's reduces may still read it would race); 16-byte
        # aligned rows and heads, which the launcher checks (head dim a multiple of 4).
        dqa_desc = tl.make_tensor_descriptor(DQA + b64 * stride_ab + q_start * stride_as,
                                             shape=[tl.num_programs(1) * group, tl.maximum(q_len, 1), HEAD_D],
                                             strides=[stride_ah, stride_as, 1], block_shape=[1, BLOCK_M, BLOCK_D])
    if WARP_SPEC:
        dk, dv = _bwd_dkdv_ws(dk, dv, k, v, Q + b64 * stride_qb, DO + b64 * stride_db, LSE + b64 * stride_lb,
                              DELTA + b64 * stride_lb, hk, group, lo, hi, cols, q_len, diag, scale2, softcap,
                              window_left, window_right, stride_qs, stride_qh, stride_ds, stride_dh, stride_lh,
                              HEAD_D, BLOCK_M, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)
    else:
        for g in range(0, group):
            h = hk * group + g
            Qh = Q + _offset(b64, q_start, h, stride_qb, stride_qs, stride_qh)
            DOh = DO + _offset(b64, q_start, h, stride_db, stride_ds, stride_dh)
            Lh = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start
            Dh = DELTA + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start
            if ATOMIC_DQ and USE_TMA:
                DQAh = dqa_desc
            else:
                DQAh = DQA + _offset(b64, q_start, h, stride_ab, stride_as, stride_ah)
            Qa, DOa = _head_rows(Qh, DOh, q_len, stride_qs, stride_ds, HEAD_D, BLOCK_M, BLOCK_D, USE_TMA)
            dk, dv = _bwd_dkdv_blocks(dk, dv, k, v, Qa, DOa, Lh, Dh, DQAh, h, stride_qs, stride_ds, stride_as,
                                      lo, full_lo, cols, q_len, key_end, diag, scale2, softcap, window_left,
                                      window_right, HEAD_D, BLOCK_M, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                      DOT_PRECISION, USE_TMA, ATOMIC_DQ)
            dk, dv = _bwd_dkdv_blocks(dk, dv, k, v, Qa, DOa, Lh, Dh, DQAh, h, stride_qs, stride_ds, stride_as,
                                      full_lo, full_hi, cols, q_len, key_end, diag, scale2, softcap, window_left,
                                      window_right, HEAD_D, BLOCK_M, BLOCK_D, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                      DOT_PRECISION, USE_TMA, ATOMIC_DQ)
            dk, dv = _bwd_dkdv_blocks(dk, dv, k, v, Qa, DOa, Lh, Dh, DQAh, h, stride_qs, stride_ds, stride_as,
                                      full_hi, hi, cols, q_len, key_end, diag, scale2, softcap, window_left,
                                      window_right, HEAD_D, BLOCK_M, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                      DOT_PRECISION, USE_TMA, ATOMIC_DQ)
    g_off = _offset(b64, k_start + start_n, hk, stride_gb, stride_gs, stride_gh) + offs_n[:, None] * stride_gs \
        + offs_d[None, :]
    tl.store(DK + g_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_blocks(
    dq, q, do, lse2, delta, K, V, stride_ks, stride_vs, start, end, rows, seqlen_k, diag, scale2, softcap,
    window_left, window_right,
    HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Accumulate dQ (BLOCK_M, BLOCK_D) of the queries `rows` over the key blocks [start, end). K and V: the kv
    head's first key row (pointers), or with USE_TMA its tensor descriptors (_head_rows)."""
    if USE_TMA:
        dq = _bwd_dq_blocks_tma(dq, q, do, lse2, delta, K, V, start, end, rows, seqlen_k, diag, scale2, softcap,
                                window_left, window_right, BLOCK_N, MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                DOT_PRECISION)
    else:
        dq = _bwd_dq_blocks_ptr(dq, q, do, lse2, delta, K, V, stride_ks, stride_vs, start, end, rows, seqlen_k, diag,
                                scale2, softcap, window_left, window_right, HEAD_D, BLOCK_N, BLOCK_D, MASKED,
                                HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)
    return dq


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k, v, s_raw, rows, cols, seqlen_k, diag, scale2, softcap, window_left,
             window_right, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of dQ from the raw scores q·kᵀ: P from the LSE, dS = P ∘ (dO·Vᵀ − D), dQ += dS·K."""
    s2, sech2 = _scores(s_raw, scale2, softcap, HAS_SOFTCAP)
    if MASKED:
        vis = _visible(rows, cols, seqlen_k, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        s2 = tl.where(vis, s2, float("-inf"))
    p = tl.math.exp2(s2 - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * sech2
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _bwd_dq_blocks_tma(
    dq, q, do, lse2, delta, k_desc, v_desc, start, end, rows, seqlen_k, diag, scale2, softcap, window_left,
    window_right, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """_bwd_dq_blocks on Hopper: K and V tiles by TMA (keys past the sequence arrive as zero rows, masked)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
        dq = _dq_step(dq, q, do, lse2, delta, k, v, tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), rows,
                      start_n + offs_n, seqlen_k, diag, scale2, softcap, window_left, window_right, MASKED, HAS_LEFT,
                      HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_blocks_ptr(
    dq, q, do, lse2, delta, K, V, stride_ks, stride_vs, start, end, rows, seqlen_k, diag, scale2, softcap,
    window_left, window_right,
    HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """_bwd_dq_blocks through pointers."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_mask(offs_d, HEAD_D, BLOCK_D)
    k_ptrs = K + start.to(tl.int64) * stride_ks + offs_n[:, None] * stride_ks + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
    v_ptrs = V + start.to(tl.int64) * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :]
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_mask = (cols[:, None] < seqlen_k) & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        dq = _dq_step(dq, q, do, lse2, delta, k, v, tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), rows,
                      cols, seqlen_k, diag, scale2, softcap, window_left, window_right, MASKED, HAS_LEFT, HAS_RIGHT,
                      HAS_SOFTCAP, DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,  # dq allocated like q's contiguous layout
    CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_gb, stride_gs, stride_gh,  # dq
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, group,  # dense lengths, or with VARLEN the packed token totals
    edges,  # as _attn_fwd_kernel's
    scale2, softcap, scale, window_left, window_right,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    h, hk, b64, q_start, q_len, k_start, k_len = _query_program(CU_Q, CU_K, seqlen_q, seqlen_k, group, VARLEN)
    if VARLEN:  # query tokens outside every sequence: dq = 0 (before the return below)
        h0, h1, t0, t1 = _outside_edges(tl.program_id(2), q_start, q_start + q_len, seqlen_q, edges)
        DQh = DQ + h.to(tl.int64) * stride_gh
        _fill_rows(DQh, stride_gs, DQh, h0, h1, 0.0, HEAD_D, BLOCK_M, BLOCK_D, False)
        _fill_rows(DQh, stride_gs, DQh, t0, t1, 0.0, HEAD_D, BLOCK_M, BLOCK_D, False)
    if start_m >= q_len:
        return
    diag = k_len - q_len
    offs_m = tl.arange(0, BLOCK_M)
    rows = start_m + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    io_mask = row_ok[:, None] & _head_mask(offs_d, HEAD_D, BLOCK_D)[None, :]
    # The rows in int64 here rather than an int64 block offset plus int32 rows as in the forward: of the two
    # formulations, this one is what ptxas compiles without spills at every shape of this kernel.
    rows64 = rows.to(tl.int64)[:, None]
    q = tl.load(Q + _offset(b64, q_start, h, stride_qb, stride_qs, stride_qh) + rows64 * stride_qs + offs_d[None, :],
                mask=io_mask, other=0.0)
    do = tl.load(DO + _offset(b64, q_start, h, stride_db, stride_ds, stride_dh) + rows64 * stride_ds + offs_d[None, :],
                 mask=io_mask, other=0.0)
    l_off = b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + rows
    lse = tl.load(LSE + l_off, mask=row_ok, other=float("inf"))
    lse2 = _lse_log2(lse)
    delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)
    Kh = K + _offset(b64, k_start, hk, stride_kb, stride_ks, stride_kh)
    Vh = V + _offset(b64, k_start, hk, stride_vb, stride_vs, stride_vh)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    r1 = tl.minimum(start_m + BLOCK_M, q_len) - 1
    lo, full_lo, full_hi, hi = _key_range(start_m, r1, k_len, diag, window_left, window_right, BLOCK_N,
                                          HAS_LEFT, HAS_RIGHT)
    Ka, Va = _head_rows(Kh, Vh, k_len, stride_ks, stride_vs, HEAD_D, BLOCK_N, BLOCK_D, USE_TMA)
    dq = _bwd_dq_blocks(dq, q, do, lse2, delta, Ka, Va, stride_ks, stride_vs, lo, full_lo, rows, k_len, diag, scale2,
                        softcap, window_left, window_right, HEAD_D, BLOCK_N, BLOCK_D, True, HAS_LEFT, HAS_RIGHT,
                        HAS_SOFTCAP, DOT_PRECISION, USE_TMA)
    dq = _bwd_dq_blocks(dq, q, do, lse2, delta, Ka, Va, stride_ks, stride_vs, full_lo, full_hi, rows, k_len, diag,
                        scale2, softcap, window_left, window_right, HEAD_D, BLOCK_N, BLOCK_D, False, HAS_LEFT,
                        HAS_RIGHT, HAS_SOFTCAP, DOT_PRECISION, USE_TMA)
    dq = _bwd_dq_blocks(dq, q, do, lse2, delta, Ka, Va, stride_ks, stride_vs, full_hi, hi, rows, k_len, diag, scale2,
                        softcap, window_left, window_right, HEAD_D, BLOCK_N, BLOCK_D, True, HAS_LEFT, HAS_RIGHT,
                        HAS_SOFTCAP, DOT_PRECISION, USE_TMA)
    tl.store(DQ + _offset(b64, q_start, h, stride_gb, stride_gs, stride_gh) + rows64 * stride_gs + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=io_mask)


# ---------------------------------------------------------------------------------------------- launchers

# Block shapes per head-dim tile (a power of two ≥ 16) for 16-bit inputs, and for fp32 inputs (twice the bytes a
# tile, fp32 matmuls): (BLOCK_M, BLOCK_N, num_warps, num_stages). The dK/dV kernel's BLOCK_M is its inner (query)
# block and BLOCK_N its own key block; the dQ kernel's BLOCK_M is its own query block and BLOCK_N the inner one.
# Chosen without a GPU: for each, the largest candidate that compiles without spills for sm_80 and sm_90a, with a
# causal mask and with every option on (the static report checks every entry). Not yet tuned by measurement. The
# dK/dV kernel keeps dK, dV, K and V resident: it fits only with small query blocks and without software
# pipelining (num_stages 1; at 2 the same blocks spill).
FWD_CONFIGS = {
    False: {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 32, 8, 2), 256: (64, 32, 8, 2)},
    True: {16: (32, 32, 4, 1), 32: (16, 32, 4, 1), 64: (32, 32, 4, 1), 128: (32, 16, 8, 1)},
}
DKDV_CONFIGS = {
    False: {16: (32, 128, 8, 1), 32: (32, 128, 8, 1), 64: (32, 128, 8, 1), 128: (16, 64, 8, 1), 256: (16, 32, 8, 1)},
    True: {16: (32, 32, 4, 1), 32: (16, 32, 4, 1), 64: (16, 16, 8, 1), 128: (16, 16, 8, 1)},
}
DQ_CONFIGS = {
    False: {16: (128, 32, 8, 2), 32: (128, 32, 8, 2), 64: (128, 32, 8, 2), 128: (64, 64, 8, 2), 256: (32, 32, 8, 1)},
    True: {16: (32, 32, 4, 1), 32: (64, 32, 4, 1), 64: (16, 32, 4, 1), 128: (16, 16, 4, 1)},
}
# The dK/dV kernel's Hopper path (_bwd_dkdv_blocks_tma: Q and dO by TMA, K and V in shared memory), 16-bit inputs:
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim tile as above. Head dims without an entry take the pointer
# path. Chosen without a GPU: at d128 the 128-query, 64-key block with 8 warps is the one of the sweep's grid that
# compiles without spills (a 128 × 64 wgmma tile over two warpgroups, where the pointer path's is 16 × 64); not yet
# timed (benchmarks/attention_sweep.py times both paths).
DKDV_TMA_CONFIGS = {16: (128, 64, 8, 2), 32: (128, 64, 8, 2), 64: (128, 64, 8, 1), 128: (128, 64, 8, 1)}
# The forward kernel's Hopper path (_fwd_blocks_tma: K and V tiles by TMA), 16-bit inputs, as FWD_CONFIGS. Chosen
# without a GPU: the Triton tutorial's Hopper shape (128 queries × 128 keys, 8 warps) where it compiles without
# spills (static report); not yet timed.
FWD_TMA_CONFIGS = {16: (128, 128, 8, 3), 32: (128, 128, 8, 3), 64: (128, 128, 8, 3), 128: (128, 128, 8, 3)}
# The forward's warp-specialized Hopper path (WARP_SPEC: FlashAttention-3's structure, by Triton's Hopper warp
# specialization: a producer warp group issues the TMA loads of K and V, two consumer warp groups run the wgmma
# and softmax, with registers moved to the consumers (setmaxnreg); num_warps 4 becomes 12). Triton 3.6 partitions
# only a kernel with one key loop, no early return and Q read by TMA (found by compiling for sm_90a: with three
# loops, or Q by pointer, or the early exit, its pass fails; with 8 warps it leaves the loop alone), so this path
# walks the key range in one loop with the mask applied to every block (bitwise the same result: the unmasked
# middle blocks' mask is all true) and is for dense calls only (a varlen program may lie past its sequence). No
# spills, 168 registers, shared 131 KB (d64, 3 stages) and 180 KB (d128, 2 stages; 3 would need 246 KB) by the
# static report. Not yet timed: off unless FWD_WS_DEFAULT or TMA turns it on (the sweep times it as fwd_ws).
FWD_WS_CONFIGS = {64: (128, 128, 4, 3), 128: (128, 128, 4, 2)}
FWD_WS_DEFAULT = False
# The dK/dV kernel's warp-specialized Hopper path (WARP_SPEC: a producer warp group loading the Q and dO tiles by
# TMA, two consumer warp groups doing the four matmuls), as DKDV_TMA_CONFIGS. The same conditions as the forward's:
# one loop (the group's query heads × query blocks, flattened; 3-D descriptors over heads), K and V by TMA, no early
# exit, 4 warps; dense calls only. Compiled for sm_90a (the sweep's --static): Triton partitions it at 64-query
# blocks (not 32 or 128; 32 queries × 64 keys in one stage too) and 64 keys; at head dim 64 without spills (82 KB in
# 3 stages, every flag set), at head dim 128 every such shape spills (8-216 B of stack), so only head dim 64 has
# an entry. Not yet timed: off unless DKDV_WS_DEFAULT or TMA turns it on (the sweep times it as dkdv_ws).
DKDV_WS_CONFIGS = {64: (64, 64, 4, 3)}
DKDV_WS_DEFAULT = False
# The dQ kernel's Hopper path (_bwd_dq_blocks_tma: K and V tiles by TMA), 16-bit inputs, as DQ_CONFIGS. Chosen
# without a GPU like DKDV_TMA_CONFIGS (static report: no spills); not yet timed.
DQ_TMA_CONFIGS = {16: (128, 64, 8, 2), 32: (128, 64, 8, 2), 64: (128, 64, 8, 2), 128: (128, 64, 8, 2)}
# Whether the forward, dK/dV and dQ kernels take their Hopper paths: None decides per call (a device of compute
# capability ≥ 9, 16-bit inputs, an entry in the path's table, rows TMA can address: _tma_path); True or False force
# it where it can run (the interpreter included: the tests run both paths); or a dict of those per kernel ("fwd",
# "dkdv", "dq", and "fwd_ws": the forward's warp-specialized variant of its Hopper path, FWD_WS_CONFIGS, which
# also needs "fwd"; a kernel missing from it decides per call), as the sweep sets it to time one kernel's paths.
# "dkdv_ws" likewise for dK/dV. True forces the warp-specialized paths too (where FWD_WS_CONFIGS and
# DKDV_WS_CONFIGS have the head dim, for dense calls); {"fwd": True, "dkdv": True, "dq": True, "fwd_ws": False,
# "dkdv_ws": False} forces the Hopper paths without them.
TMA = None
# The backward's dQ by fp32 atomic adds (FlashAttention-2's five-matmul backward): the dK/dV kernel adds each query
# block's dS·K into a zero-filled fp32 accumulator of q's shape, scaled and cast once at the end, and the dQ kernel
# (which recomputes S and dP: two of the seven matmuls) is not launched. Memory: the accumulator, 4 bytes an element
# of q. Not bitwise repeatable (the adds' order varies), so deterministic=True (or
# torch.use_deterministic_algorithms) never takes it. DQ_ATOMIC None decides per call by DQ_ATOMIC_DEFAULT (off
# until the sweep times it: benchmarks/attention_sweep.py's dkdv_atomic and dkdv_atomic_tma); True or False force
# it for calls that are not deterministic (the tests run both). The warp-specialized dK/dV path has no atomic
# variant.
DQ_ATOMIC = None
DQ_ATOMIC_DEFAULT = False
# The dK/dV kernel's block shapes with the atomic dQ, as DKDV_CONFIGS (pointer path, per fp32 flag) and
# DKDV_TMA_CONFIGS (Hopper path): the dS·K product and its (BLOCK_M, head dim) fp32 tile are live on top of the
# plain kernel's, so some of its shapes spill. A head dim without an entry in either takes the three-kernel
# backward; a Hopper call whose head dim only the pointer table has takes the pointer path's atomic variant.
# Chosen without a GPU: the plain tables' shape, or the next smaller one, where it compiles without spills for
# sm_80 and sm_90a (the Hopper path: sm_90a) with every flag set (the static report compiles each). The Hopper path
# adds the tile by TMA reduce (no per-element addresses). At head dim 128 no Hopper shape fits every flag set (the
# dQ product's 64 fp32 registers a thread on top of dK and dV; the product in two halves of the head dim spilled
# more): the 128-query, 64-key block with 8 warps compiles without spills for dense calls without a softcap, causal
# or not, windowed or not (253-255 registers), and spills 16-32 bytes of stack with varlen or a causal softcap. So
# its entry is for those dense calls only (DKDV_ATOMIC_TMA_DENSE_ONLY: the other calls on Hopper keep the
# three-kernel backward, elsewhere they take the pointer variant): the benchmark's and most training's case. fp32
# head dims 32 and 128 have no entry (every shape spills).
# Not yet timed (the sweep times both as dkdv_atomic and dkdv_atomic_tma).
DKDV_ATOMIC_CONFIGS = {
    False: {16: (32, 128, 8, 1), 32: (32, 128, 8, 1), 64: (32, 64, 8, 1), 128: (16, 64, 8, 1), 256: (16, 32, 8, 1)},
    True: {16: (32, 16, 4, 1), 64: (16, 16, 4, 1)},
}
DKDV_ATOMIC_TMA_CONFIGS = {16: (128, 64, 8, 2), 32: (128, 64, 8, 2), 64: (128, 64, 8, 1), 128: (128, 64, 8, 1)}
DKDV_ATOMIC_TMA_DENSE_ONLY = {128}  # head-dim tiles whose Hopper entry is for dense calls without a softcap
# Short query sides (decode over a KV cache): 16-row query blocks instead of 128 mostly empty ones.
DECODE_MAX_SEQLEN_Q = 16
DECODE_FWD_CONFIGS = {16: (16, 32, 4, 2), 32: (16, 32, 4, 2), 64: (16, 32, 4, 2), 128: (16, 32, 4, 2),
                      256: (16, 32, 4, 2)}
# Split-KV decode (_attn_decode_kernel + _attn_decode_combine_kernel), taken for 16-bit inputs when a kv head's
# rows, max seqlen q × (Hq/Hk) (query positions × the q heads of its group), fit one tile of DECODE_MAX_ROWS: the
# tile is BLOCK_M = max(16, next power of two ≥ rows) (tl.dot's smallest M), and K/V are read once per kv head.
# Per head-dim tile: (BLOCK_N, num_warps, num_stages). Memory bound: a program streams BLOCK_N keys of K and V,
# 2·BLOCK_N·D·2 bytes a block (16 KB at D ≥ 32, 8 KB at D = 16), in 3 stages (48 KB of shared memory: four
# programs fit an H200 SM's 228 KB, three an A100's 164 KB) with 4 warps. Bytes in flight: H200's ~4.8 TB/s over
# ~1 µs of latency is ~36 KB an SM, which two blocks ahead per program, several programs an SM, cover. With 16
# rows the scores and P are a 16 × BLOCK_N tile and O a 16 × D fp32 tile. From first principles only (not yet
# measured on a GPU): the static report checks each for spills, local memory and 16-byte loads.
DECODE_CONFIGS = {
    16: {16: (64, 4, 3), 32: (64, 4, 3), 64: (128, 4, 3)},
    32: {16: (128, 4, 3), 32: (128, 4, 3), 64: (128, 8, 3)},
    64: {16: (64, 4, 3), 32: (64, 4, 3), 64: (64, 8, 3)},
    128: {16: (32, 4, 3), 32: (32, 4, 3), 64: (32, 8, 3)},
    256: {16: (16, 4, 3), 32: (16, 4, 3)},  # a 64-row tile spills at head dim 256
}
DECODE_MAX_ROWS = max(max(table) for table in DECODE_CONFIGS.values())
DECODE_INTERPRET_CONFIG = (16, 4, 1)
# The number of splits: enough programs for DECODE_PROGRAMS_PER_SM per SM (B·Hk programs per split), no split
# under DECODE_MIN_SPLIT_KEYS keys (the keys a row may see: Sk, or Sq + the left window), at most
# DECODE_MAX_SPLITS. Tests lower DECODE_MIN_SPLIT_KEYS to get several splits at the interpreter's sizes.
DECODE_PROGRAMS_PER_SM = 4
DECODE_MIN_SPLIT_KEYS = 256
DECODE_MAX_SPLITS = 128
COMBINE_SPLIT_TILE = 16  # splits the combine loads at once (a (16, D) fp32 tile)
COMBINE_WARPS = 4
# The decode path's fill of packed tokens outside every sequence (_attn_fill_outside_kernel): programs a query head
# along axis 0 (they stride over the rows), rows a store, warps.
FILL_PROGRAMS = 4
FILL_BLOCK_M = 16
FILL_WARPS = 4
# fp32 stops at head dim 128: no fp32 block shape above it compiles without spills (see the static report).
FP32_MAX_HEAD_DIM = 128
# Under the interpreter a program's cost is its Python overhead per block: one small shape that still crosses
# block boundaries in the tests' short sequences.
INTERPRET_CONFIG = (32, 32, 4, 1)
DELTA_BLOCK_M = 64


def _delta_warps(dtype, block_d):
    """Warps of the delta kernel: its two (DELTA_BLOCK_M, block_d) fp32 tiles in registers; 8 warps from 32 KB of
    them (fp32 at head dim 128 spilled 8 bytes with 4 warps on sm_90a)."""
    return 8 if DELTA_BLOCK_M * block_d * (4 if dtype == torch.float32 else 2) >= 32768 else 4
# The most rows (queries or keys) a tile spans in any configuration: a token stride below 2³¹ / MAX_TILE_ROWS keeps
# the offsets inside every tile in int32 (see the module's header); the launchers copy a view that has a larger one.
MAX_TILE_ROWS = max(max(c[0], c[1]) for table in (FWD_CONFIGS[False], FWD_CONFIGS[True], DKDV_CONFIGS[False],
                                                  DKDV_CONFIGS[True], DQ_CONFIGS[False], DQ_CONFIGS[True],
                                                  DECODE_FWD_CONFIGS, DKDV_TMA_CONFIGS, FWD_TMA_CONFIGS,
                                                  DQ_TMA_CONFIGS, FWD_WS_CONFIGS, DKDV_WS_CONFIGS,
                                                  DKDV_ATOMIC_CONFIGS[False], DKDV_ATOMIC_CONFIGS[True],
                                                  DKDV_ATOMIC_TMA_CONFIGS)
                    for c in table.values())
MAX_TILE_ROWS = max(MAX_TILE_ROWS, DECODE_MAX_ROWS,
                    *(c[0] for table in DECODE_CONFIGS.values() for c in table.values()))
MAX_TILE_ROWS = max(MAX_TILE_ROWS, DELTA_BLOCK_M, *INTERPRET_CONFIG[:2])
# CUDA's limit on grid axes 1 and 2, which carry the heads and the batch: a larger batch is launched in chunks, and
# more heads than this are refused (no model has them).
MAX_GRID_YZ = 65535


# How these kernels run, fixed when they were defined (@triton.jit makes interpreted functions under
# TRITON_INTERPRET=1): read once, not from the environment on every launch.
_INTERPRETED = not isinstance(_attn_fwd_kernel, triton.runtime.JITFunction)


def block_d(head_dim: int) -> int:
    """The head-dim tile: a power of two ≥ 16 (tl.dot's smallest K), the columns past head_dim masked."""
    return max(16, next_pow2(head_dim))


def attention_unsupported(q, k, cu_seqlens_q, window_left, window_right, softcap):
    """None when attention_fwd can take this call, else why not (a host check; fastlm._cuda's function of the same
    name answers for the CUDA kernels). The Triton kernels take every call the op layer admits except float32 above
    head dim FP32_MAX_HEAD_DIM (the interpreter follows the GPU)."""
    dtype, head_dim = q.dtype, q.shape[-1]
    if dtype == torch.float32 and head_dim > FP32_MAX_HEAD_DIM:
        return (f"float32 attention takes head dims up to {FP32_MAX_HEAD_DIM} (got {head_dim}): larger fp32 tiles "
                "spill registers; use bfloat16 or float16")
    return None


def _config(table, dtype, head_dim, tma_table=None):
    """A kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages): from its Hopper table when it takes that path."""
    if _INTERPRETED:
        return INTERPRET_CONFIG
    if tma_table is not None:
        return tma_table[block_d(head_dim)]
    return table[dtype == torch.float32][block_d(head_dim)]


def _dot_precision(dtype):
    # fp32 inputs get fp32 products (tf32 would lose to torch's fp32 matmul); 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(t, varlen):
    """(batch, sequence, head) element strides of a (B, S, H, D) tensor, or of a packed (T, H, D) one (batch 0)."""
    s = t.stride()  # one call (each stride(i) is a call of its own: ~20 a launch)
    return (0, s[0], s[1]) if varlen else s[:3]


def _lse_strides(lse, varlen):
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """(batch, max seqlen q, max seqlen k, q heads, kv heads, head dim, varlen)."""
    varlen = cu_seqlens_q is not None
    if varlen:
        return cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k, q.shape[1], k.shape[1], q.shape[2], True
    return q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], False


def _mask_args(scale, window_left, window_right, softcap, Sq, Sk):
    """The kernels' scalar arguments (scale2, softcap, window_left, window_right: a tuple, passed positionally, as
    the direct launch path keys keyword arguments by value) and flag arguments (a dict of constexprs) for a window
    in bounded form (None = unbounded) and a softcap.

    The kernels add the window to positions in int32 (i + seqlen_k − seqlen_q ± window): a window is clamped to
    ±(Sq + Sk), which changes no answer (j − i − (seqlen_k − seqlen_q) lies in (−Sk, Sq) for every pair) and keeps
    those sums far from 2³¹ whatever int the caller passed."""
    scale2 = scale if softcap else scale * LOG2E.value
    bound = Sq + Sk

    def clamp(w):
        return max(-bound, min(bound, int(w or 0)))

    return (
        (float(scale2), float(softcap or 1.0), clamp(window_left), clamp(window_right)),
        dict(HAS_LEFT=window_left is not None, HAS_RIGHT=window_right is not None, HAS_SOFTCAP=bool(softcap)),
    )


def _tile_rows_fit(t, varlen):
    """t (or a contiguous copy of it, when its token stride is 2³¹ / MAX_TILE_ROWS or more): the in-tile offsets
    row × token stride then fit int32."""
    stride = t.stride(0) if varlen else t.stride(1)
    return t if abs(stride) * MAX_TILE_ROWS < 2**31 else t.contiguous()


def _check_heads(Hq):
    if Hq > MAX_GRID_YZ:
        raise ValueError(f"the triton attention kernels take at most {MAX_GRID_YZ} query heads (a grid axis), "
                         f"got {Hq}")


def _batch_chunks(B, varlen, cu_q, cu_k, tensors):
    """(batch entries, cu_q, cu_k, edges, tensors) for each run of at most MAX_GRID_YZ batch entries (one launch
    each). Varlen keeps the packed tensors (the kernels get the whole call's packed totals) and slices the offsets,
    from which the kernels read absolute token indices; edges says whether the run holds the call's first sequence
    (bit 0) and its last (bit 1), whose programs write the tokens before and after every sequence. A dense batch
    slices every tensor (all batch-first) and passes the lse chunk as the unused offsets (edges unused)."""
    if B <= MAX_GRID_YZ:
        yield (B, cu_q, cu_k, 3, tensors) if varlen else (B, tensors[-1], tensors[-1], 3, tensors)
        return
    for b0 in range(0, B, MAX_GRID_YZ):
        b1 = min(B, b0 + MAX_GRID_YZ)
        edges = (1 if b0 == 0 else 0) | (2 if b1 == B else 0)
        if varlen:
            yield b1 - b0, cu_q[b0:b1 + 1], cu_k[b0:b1 + 1], edges, tensors
        else:
            chunk = tuple(t[b0:b1] for t in tensors)
            yield b1 - b0, chunk[-1], chunk[-1], edges, chunk


def _decode_rows(Sq, Hq, Hk, D, dtype):
    """A kv head's rows for the split-KV decode kernel (Sq · Hq/Hk), or None when it does not apply."""
    rows = Sq * (Hq // Hk)
    fits = _decode_block_m(rows) in DECODE_CONFIGS[block_d(D)]
    return rows if dtype != torch.float32 and fits else None


def _decode_block_m(rows):
    return max(16, next_pow2(rows))  # tl.dot's smallest M is 16


def _decode_config(head_dim, block_m):
    """(BLOCK_N, num_warps, num_stages) of the decode kernel for this head dim and row tile."""
    return DECODE_INTERPRET_CONFIG if _INTERPRETED else DECODE_CONFIGS[block_d(head_dim)][block_m]


def decode_splits(batch, kv_heads, keys, block_n, device):
    """How many runs the decode kernel cuts a kv head's visible keys into (see DECODE_PROGRAMS_PER_SM)."""
    # Rounded down: a split's work is uniform, so programs past a whole number of waves would add a second,
    # mostly empty one (B = 16, Hk = 8 on 132 SMs: 4 splits, 512 programs, rather than 5 and 640).
    want = DECODE_PROGRAMS_PER_SM * num_sms(device) // max(1, batch * kv_heads)
    by_keys = max(1, keys // DECODE_MIN_SPLIT_KEYS)
    return max(1, min(want, by_keys, cdiv(max(keys, 1), block_n), DECODE_MAX_SPLITS))


def _decode_fwd(q, k, v, out, lse, B, Sq, Sk, Hq, Hk, D, varlen, cu_seqlens_q, cu_seqlens_k, n_q, n_k, args, flags):
    """The split-KV forward: one program per (split, kv head, batch entry); with several splits each writes its
    partial to a workspace and the combine kernel merges them, with one it writes out and lse itself."""
    group = Hq // Hk
    rows = Sq * group
    BLOCK_M = _decode_block_m(rows)
    BLOCK_N, num_warps, num_stages = _decode_config(D, BLOCK_M)
    keys = min(Sk, Sq + max(0, args[2])) if flags["HAS_LEFT"] else Sk  # args: (scale2, softcap, left, right)
    splits = decode_splits(B, Hk, keys, BLOCK_N, q.device)
    one = splits == 1
    if not one:
        ws_o = _util.empty((B, Hk, rows, splits, D), torch.float32, q.device)
        ws_l = _util.empty((B, Hk, rows, splits), torch.float32, q.device)
    b0 = 0
    for nb, cu_q, cu_k, edges, (q_, k_, v_, out_, lse_) in _batch_chunks(B, varlen, cu_seqlens_q, cu_seqlens_k,
                                                                         (q, k, v, out, lse)):
        wo, wl = (out_, lse_) if one else (ws_o[b0:b0 + nb], ws_l[b0:b0 + nb])
        out_strides, lse_strides = _strides(out_, varlen), _lse_strides(lse_, varlen)
        _launch.launch(_attn_decode_kernel, (splits, Hk, nb),
            q_, k_, v_, out_, lse_, wo, wl, cu_q, cu_k, *_strides(q_, varlen), *_strides(k_, varlen),
            *_strides(v_, varlen), *out_strides, *lse_strides, n_q, n_k, group, rows, splits, *args,
            HEAD_D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d(D), VARLEN=varlen, ONE_SPLIT=one,
            DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages, **flags,
        )
        if not one:
            _launch.launch(_attn_decode_combine_kernel, (rows, Hk, nb),
                out_, lse_, wo, wl, cu_q, *out_strides, *lse_strides, n_q, group, rows, splits,
                HEAD_D=D, BLOCK_D=block_d(D), SPLIT_TILE=COMBINE_SPLIT_TILE, VARLEN=varlen, num_warps=COMBINE_WARPS,
            )
        if varlen and edges:
            _launch.launch(_attn_fill_outside_kernel, (FILL_PROGRAMS, Hq),
                out_, lse_, cu_q, out_strides[1], out_strides[2], lse_strides[1], nb, n_q, edges,
                HEAD_D=D, BLOCK_M=FILL_BLOCK_M, BLOCK_D=block_d(D), num_warps=FILL_WARPS,
            )
        b0 += nb


def attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
                  softcap):
    """q (B, Sq, Hq, D), k, v (B, Sk, Hk, D), or packed (T, H, D) with int32 cu_seqlens (B + 1,) and host-int
    maxima; head-dim stride 1. Returns out (contiguous, q's shape and dtype) and lse fp32 (B, Hq, Sq) or (Hq, Tq)."""
    B, Sq, Sk, Hq, Hk, D, varlen = _shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out = _util.empty(q.shape, q.dtype, q.device)
    lse = _util.empty((Hq, q.shape[0]) if varlen else (B, Hq, Sq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    _check_heads(Hq)
    q, k, v = (_tile_rows_fit(t, varlen) for t in (q, k, v))
    args, flags = _mask_args(scale, window_left, window_right, softcap, Sq, Sk)
    # The kernels' length arguments: dense lengths, or the packed totals that bound varlen offsets.
    n_q, n_k = (q.shape[0], k.shape[0]) if varlen else (Sq, Sk)
    if _decode_rows(Sq, Hq, Hk, D, q.dtype) is not None:
        _decode_fwd(q, k, v, out, lse, B, Sq, Sk, Hq, Hk, D, varlen, cu_seqlens_q, cu_seqlens_k, n_q, n_k, args,
                    flags)
        return out, lse
    short = Sq <= DECODE_MAX_SEQLEN_Q and q.dtype != torch.float32 and not _INTERPRETED
    tma = not short and _tma_path("fwd", k, v, D, varlen)
    ws = tma and not varlen and _tma_path("fwd_ws", q, k, D, varlen)  # Q by TMA too
    if short:
        BLOCK_M, BLOCK_N, num_warps, num_stages = DECODE_FWD_CONFIGS[block_d(D)]
    else:
        BLOCK_M, BLOCK_N, num_warps, num_stages = _config(FWD_CONFIGS, q.dtype, D, FWD_WS_CONFIGS if ws else
                                                          FWD_TMA_CONFIGS if tma else None)
    for nb, cu_q, cu_k, edges, (q_, k_, v_, out_, lse_) in _batch_chunks(B, varlen, cu_seqlens_q, cu_seqlens_k,
                                                                         (q, k, v, out, lse)):
        with _Scratch(q.device, tma):
            _launch.launch(_attn_fwd_kernel, (cdiv(Sq, BLOCK_M), Hq, nb),
                q_, k_, v_, out_, lse_, cu_q, cu_k, *_strides(q_, varlen), *_strides(k_, varlen),
                *_strides(v_, varlen), *_strides(out_, varlen), *_lse_strides(lse_, varlen), n_q, n_k, Hq // Hk,
                edges, *args, HEAD_D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d(D), VARLEN=varlen,
                DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages, USE_TMA=tma,
                WARP_SPEC=ws, **flags,
            )
    return out, lse


def _tma_rows(t, varlen):
    """Whether TMA can address t's (token, head_dim) rows from any head's first row: a 16-byte aligned base and
    batch, token and head strides in whole 16-byte units (the descriptor's row stride and every head's base), none
    of them 0 where that dimension has more than one entry (an expanded gradient: the pointer path takes it)."""
    size = t.element_size()
    sizes = (1, *t.shape[:2]) if varlen else t.shape[:3]
    return t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 and (s > 0 or n <= 1)
                                          for s, n in zip(_strides(t, varlen), sizes))


_TMA_TABLES = {"fwd": FWD_TMA_CONFIGS, "dkdv": DKDV_TMA_CONFIGS, "dq": DQ_TMA_CONFIGS,
               "fwd_ws": FWD_WS_CONFIGS, "dkdv_ws": DKDV_WS_CONFIGS}  # (updated in place)


def _tma_path(kernel, a, b, head_dim, varlen):
    """Whether `kernel` ("fwd", "dkdv", "dq", "fwd_ws", "dkdv_ws") takes its Hopper path for this call (see TMA): a
    and b the tensors it reads by TMA (Q and dO for dK/dV, K and V for the forward and dQ; Q and K for fwd_ws, whose
    K and V "fwd" has checked; K and V for dkdv_ws, whose Q and dO "dkdv" has)."""
    if a.dtype == torch.float32 or block_d(head_dim) not in _TMA_TABLES[kernel]:
        return False
    force = TMA.get(kernel) if isinstance(TMA, dict) else TMA
    if force is None:
        if (_INTERPRETED or _util.capability(a.device)[0] < 9 or (kernel == "fwd_ws" and not FWD_WS_DEFAULT)
                or (kernel == "dkdv_ws" and not DKDV_WS_DEFAULT)):
            return False
    elif not force:
        return False
    return _tma_rows(a, varlen) and _tma_rows(b, varlen)


def _dkdv_tma(q, do, head_dim, varlen):
    return _tma_path("dkdv", q, do, head_dim, varlen)


def _atomic_dq(deterministic, dtype, head_dim, tma, plain):
    """(atomic, tma): whether the backward adds dQ atomically from the dK/dV kernel (see DQ_ATOMIC), and then
    whether that kernel takes its Hopper path (`tma`: the plain kernel's choice), by the atomic tables' entries;
    `plain`: a dense call without a softcap (what a DKDV_ATOMIC_TMA_DENSE_ONLY entry needs)."""
    if deterministic or not (DQ_ATOMIC_DEFAULT if DQ_ATOMIC is None else DQ_ATOMIC):
        return False, tma
    tile = block_d(head_dim)
    if tma and tile in DKDV_ATOMIC_TMA_CONFIGS and head_dim % 4 == 0:
        # (the accumulator is contiguous fp32: its rows are 16-byte aligned for TMA when the head dim is a multiple
        # of 4, which q's own 16-bit rows being TMA-aligned does not imply for a strided q)
        if plain or tile not in DKDV_ATOMIC_TMA_DENSE_ONLY:
            return True, True
        # A Hopper call its dense-only entry cannot take keeps the three-kernel backward's Hopper paths: the
        # pointer variant's small blocks would likely be slower there, and the sweep, which sets
        # DQ_ATOMIC_DEFAULT, times dense calls without a softcap only.
        return False, tma
    if tile in DKDV_ATOMIC_CONFIGS[dtype == torch.float32]:
        return True, False
    return False, tma


class _Scratch:
    """Triton's allocator for the global scratch of in-kernel tensor descriptors (128 bytes a descriptor and
    program), from torch's caching allocator on the launch's device: installed for one launch of a kernel's Hopper
    path (`active`), unless the caller installed one of their own (triton.set_allocator); nothing otherwise."""

    def __init__(self, device, active=True):
        self.device = device
        self.active = active
        self.token = None

    def __call__(self, size, alignment, stream):
        return torch.empty(size, dtype=torch.int8, device=self.device)

    def __enter__(self):
        if not self.active:
            return self
        from triton.runtime import _allocation

        if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            self.token = _allocation._allocator.set(self)
        return self

    def __exit__(self, *exc):
        if self.token is not None:
            from triton.runtime import _allocation

            _allocation._allocator.reset(self.token)
            self.token = None


def attention_bwd(do, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                  window_left, window_right, softcap, deterministic=True):
    """Gradients of attention_fwd's out (and lse, when dlse is given): dq like q, dk, dv like k and v (contiguous).
    do has out's shape with head-dim stride 1; dlse lse's shape, fp32, or None. deterministic: no atomics, bitwise
    repeatable; else dQ may be added atomically (DQ_ATOMIC)."""
    B, Sq, Sk, Hq, Hk, D, varlen = _shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    dq = _util.empty(q.shape, q.dtype, q.device)
    dk = _util.empty(k.shape, k.dtype, k.device)
    dv = _util.empty(v.shape, v.dtype, v.device)
    if k.numel() == 0:
        return dq.zero_(), dk, dv
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    _check_heads(Hq)
    do, q, k, v, out = (_tile_rows_fit(t, varlen) for t in (do, q, k, v, out))
    delta = _util.empty(lse.shape, torch.float32, q.device)
    BD = block_d(D)
    (scale2, cap, left, right), flags = _mask_args(scale, window_left, window_right, softcap, Sq, Sk)
    bwd_args = (scale2, cap, float(scale), left, right)  # the backward kernels take the unscaled scale too
    n_q, n_k = (q.shape[0], k.shape[0]) if varlen else (Sq, Sk)  # see attention_fwd
    common = dict(HEAD_D=D, BLOCK_D=BD, VARLEN=varlen, DOT_PRECISION=_dot_precision(q.dtype), **flags)
    atomic, dkdv_tma = _atomic_dq(deterministic, q.dtype, D, _dkdv_tma(q, do, D, varlen),
                                  not varlen and not flags["HAS_SOFTCAP"])
    dkdv_ws = dkdv_tma and not atomic and not varlen and _tma_path("dkdv_ws", k, v, D, varlen)  # K, V by TMA too
    if atomic:
        dkdv_config = _config(DKDV_ATOMIC_CONFIGS, q.dtype, D, DKDV_ATOMIC_TMA_CONFIGS if dkdv_tma else None)
    else:
        dkdv_config = _config(DKDV_CONFIGS, q.dtype, D, DKDV_WS_CONFIGS if dkdv_ws else
                              DKDV_TMA_CONFIGS if dkdv_tma else None)
    if not atomic:  # (the dQ kernel runs only without the atomic dQ)
        dq_tma = _tma_path("dq", k, v, D, varlen)
        dq_config = _config(DQ_CONFIGS, q.dtype, D, DQ_TMA_CONFIGS if dq_tma else None)
    # The atomic dQ's accumulator (zero-filled: rows no key block reaches keep dQ = 0, packed tokens outside every
    # sequence included); else the dK/dV kernel gets dk in its place, unused.
    dqa = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic else dk
    tensors = (q, k, v, do, out, dq, dk, dv, dqa, delta, dlse if dlse is not None else lse, lse)
    for nb, cu_q, cu_k, edges, (q_, k_, v_, do_, out_, dq_, dk_, dv_, dqa_, delta_, dlse_, lse_) in _batch_chunks(
            B, varlen, cu_seqlens_q, cu_seqlens_k, tensors):
        lse_strides = _lse_strides(lse_, varlen)
        _launch.launch(_attn_bwd_delta_kernel, (cdiv(Sq, DELTA_BLOCK_M), Hq, nb),
            out_, do_, dlse_, delta_, cu_q, *_strides(out_, varlen), *_strides(do_, varlen), *lse_strides, n_q,
            HEAD_D=D, BLOCK_M=DELTA_BLOCK_M, BLOCK_D=BD, VARLEN=varlen, HAS_DLSE=dlse is not None,
            num_warps=_delta_warps(q.dtype, BD),
        )
        qkv_strides = (*_strides(q_, varlen), *_strides(k_, varlen), *_strides(v_, varlen), *_strides(do_, varlen))
        BLOCK_M, BLOCK_N, num_warps, num_stages = dkdv_config
        with _Scratch(q.device, dkdv_tma):
            _launch.launch(_attn_bwd_dkdv_kernel, (cdiv(Sk, BLOCK_N), Hk, nb),
                q_, k_, v_, do_, lse_, delta_, dk_, dv_, dqa_, cu_q, cu_k, *qkv_strides, *_strides(dk_, varlen),
                *_strides(dqa_, varlen), *lse_strides, n_q, n_k, Hq // Hk, edges, *bwd_args, BLOCK_M=BLOCK_M,
                BLOCK_N=BLOCK_N, num_warps=num_warps, num_stages=num_stages, USE_TMA=dkdv_tma, WARP_SPEC=dkdv_ws,
                ATOMIC_DQ=atomic, **common,
            )
        if atomic:
            continue
        BLOCK_M, BLOCK_N, num_warps, num_stages = dq_config
        with _Scratch(q.device, dq_tma):
            _launch.launch(_attn_bwd_dq_kernel, (cdiv(Sq, BLOCK_M), Hq, nb),
                q_, k_, v_, do_, lse_, delta_, dq_, cu_q, cu_k, *qkv_strides, *_strides(dq_, varlen), *lse_strides,
                n_q, n_k, Hq // Hk, edges, *bwd_args, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                num_warps=num_warps, num_stages=num_stages, USE_TMA=dq_tma, **common,
            )
    if atomic:
        torch.mul(dqa, scale, out=dq)  # scaled once and rounded once, as the dQ kernel stores its sum
    return dq, dk, dv
