"""Rotary position embedding (RoPE), forward and backward in one kernel: Triton kernel and launchers.

Math, per token and head, over the first rot features of head_dim (the rest pass through unchanged), in fp32
whatever the storage dtype. The features form rot/2 pairs (p, q): (i, i + rot/2) in the rotate-half layout
(Llama, Qwen, Mistral, Gemma: Hugging Face's), (2i, 2i + 1) interleaved (GPT-J). cos and sin are full-width, one
value per feature (Hugging Face's form, cos = cat(freqs, freqs).cos()), so
  forward   out_p = x_p·cos_p − x_q·sin_p,   out_q = x_q·cos_q + x_p·sin_q
  backward  the transpose of that map:  dx_p = dy_p·cos_p + dy_q·sin_q,   dx_q = dy_q·cos_q − dy_p·sin_p
which, with cos_p = cos_q and sin_p = sin_q (every real rotary table), is the same rotation with sin negated; the
kernel applies the exact transpose, so the gradient is right for any cos and sin. cos and sin take no gradient
(they are buffers). Nothing is saved for backward but cos and sin.

Roofline, bytes per element of x for dtype size d: read x, write out, 2d, forward and backward alike. cos and sin
(2·rot values a token, fp32 or x's dtype) are read once per program for all its heads: 1/heads of that again,
noise at 8 or more heads.

Design:
- x is (batch, seq, heads, head_dim) through three strides (batch, seq, head) and a unit feature stride, so both
  layouts (heads_first is Hugging Face's (batch, heads, seq, head_dim)) and strided views are read in place; cos
  and sin through (batch, seq) strides, the batch stride 0 when one table serves the whole batch (expanded
  views cost nothing).
- A program takes BLOCK_T tokens and a range of heads: it loads the tokens' cos and sin once ([BLOCK_T,
  BLOCK_HALF] tiles, kept in registers), then walks its heads, a [BLOCK_T, rot] tile of x per head (two half tiles
  in the rotate-half layout; one tile split into even and odd features when interleaved), then the pass-through
  features in chunks of the same width. The launcher splits the heads into as many ranges as it takes to give the
  device ~PROGRAMS_PER_SM programs an SM (decode's few tokens still fill it).
- TILE = BLOCK_T·BLOCK_HALF = 1024 (BLOCK_T ≤ 64): 8 values a thread per tile at 4 warps; the four cos/sin tiles,
  two of x and two of output stay under ~120 registers at every width (static report: no spills). 16-byte accesses
  come from the JIT's divisibility-by-16 specialisation of the pointers, strides and rot/2 (the usual head dims).
- Offsets are int64 (batch · seq · heads · head_dim passes 2^31); tokens (batch · seq) stay below 2^31.
"""

import triton
import triton.language as tl

from fastlm import _util
from fastlm._util import cdiv, next_pow2, num_sms
from . import _launch

TILE = 1024  # token × pair elements of each tile
NUM_WARPS = 4
MIN_BLOCK_HALF = 4  # narrower rotations are padded to this
MAX_BLOCK_T = 64  # tokens a program: narrow rotations at a full TILE (128, 256 tokens) took 113–182 registers
MAX_ROT = 1024  # widest rotation the kernels take (BLOCK_HALF ≤ 512)
PROGRAMS_PER_SM = 16
MAX_GRID_Y = 65535


@triton.jit
def _pairs(v, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """[BLOCK_T, 2·BLOCK_HALF] → its even and odd columns, two [BLOCK_T, BLOCK_HALF] tiles."""
    return tl.split(tl.reshape(v, [BLOCK_T, BLOCK_HALF, 2]))


# Sizes that are often 1 (decode's one token, one head a program) stay runtime values: one compiled variant serves
# every call, the one the static report compiles.
@triton.jit(do_not_specialize=("seqlen", "tokens", "heads", "heads_per_prog", "backward"))
def _rotary_kernel(
    X,  # x (batch, seq, heads, head_dim) through the strides below, feature stride 1
    COS,  # (batch or 1, seq, rot), feature stride 1; fp32 or x's dtype
    SIN,  # like COS
    OUT,  # like x (its own strides), x's dtype
    stride_xb,
    stride_xs,
    stride_xh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_cb,  # cos/sin batch stride: 0 when one table serves every sequence
    stride_cs,
    seqlen,
    tokens,  # batch · seqlen
    heads,
    heads_per_prog,
    half,  # rot / 2
    n_pass,  # head_dim − rot: features copied unchanged
    backward,  # 0 forward; 1 the transpose (the gradient)
    INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens a program
    BLOCK_HALF: tl.constexpr,  # ≥ half, a power of two
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < tokens
    b = (t // seqlen).to(tl.int64)
    s = (t % seqlen).to(tl.int64)
    x_tok = (b * stride_xb + s * stride_xs)[:, None]  # [BLOCK_T, 1]
    o_tok = (b * stride_ob + s * stride_os)[:, None]
    c_tok = (b * stride_cb + s * stride_cs)[:, None]

    # cos and sin at each pair's first feature (c1, s1) and second (c2, s2), [BLOCK_T, BLOCK_HALF] fp32.
    if INTERLEAVED:
        cols = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        mask = t_mask[:, None] & (cols < 2 * half)
        c1, c2 = _pairs(tl.load(COS + c_tok + cols, mask=mask, other=0.0).to(tl.float32), BLOCK_T, BLOCK_HALF)
        s1, s2 = _pairs(tl.load(SIN + c_tok + cols, mask=mask, other=0.0).to(tl.float32), BLOCK_T, BLOCK_HALF)
    else:
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        mask = t_mask[:, None] & (cols < half)
        c1 = tl.load(COS + c_tok + cols, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + c_tok + half + cols, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + c_tok + cols, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + c_tok + half + cols, mask=mask, other=0.0).to(tl.float32)
    if backward:
        # The transpose: out_p = x_p·c_p + x_q·s_q, out_q = x_q·c_q − x_p·s_p.
        s1, s2 = -s2, -s1

    pcols = tl.arange(0, 2 * BLOCK_HALF)[None, :]
    h0 = tl.program_id(1) * heads_per_prog
    for i in range(0, heads_per_prog):
        h = h0 + i
        if h < heads:
            xp = X + x_tok + h.to(tl.int64) * stride_xh
            op = OUT + o_tok + h.to(tl.int64) * stride_oh
            if INTERLEAVED:
                x1, x2 = _pairs(tl.load(xp + cols, mask=mask, other=0.0).to(tl.float32), BLOCK_T, BLOCK_HALF)
                out = tl.reshape(tl.join(x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), [BLOCK_T, 2 * BLOCK_HALF])
                tl.store(op + cols, out.to(OUT.dtype.element_ty), mask=mask)
            else:
                x1 = tl.load(xp + cols, mask=mask, other=0.0).to(tl.float32)
                x2 = tl.load(xp + half + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(op + cols, (x1 * c1 - x2 * s1).to(OUT.dtype.element_ty), mask=mask)
                tl.store(op + half + cols, (x2 * c2 + x1 * s2).to(OUT.dtype.element_ty), mask=mask)
            for p in range(0, n_pass, 2 * BLOCK_HALF):
                pmask = t_mask[:, None] & (p + pcols < n_pass)
                v = tl.load(xp + 2 * half + p + pcols, mask=pmask)
                tl.store(op + 2 * half + p + pcols, v, mask=pmask)


def _config(rot):
    """(BLOCK_T, BLOCK_HALF) for a rotation of rot features."""
    block_half = max(next_pow2(rot // 2), MIN_BLOCK_HALF)
    return min(TILE // block_half, MAX_BLOCK_T), block_half


def _rotary(x, cos, sin, interleaved, heads_first, backward):
    if cos.stride() != sin.stride():
        raise ValueError(f"cos and sin must have equal strides, got {cos.stride()} and {sin.stride()}")
    out = _util.empty(x.shape, x.dtype, x.device)
    (batch, seqlen, heads, head_dim), x_strides = _util.bshd(x, heads_first)
    out_strides = _util.bshd(out, heads_first)[1]
    rot = cos.shape[-1]
    tokens = batch * seqlen
    if out.numel() == 0:
        return out
    # (seq, rot) and (1, seq, rot): batch stride 0, one table for every sequence.
    cos_b, cos_s = _util.table_strides(cos)
    block_t, block_half = _config(rot)
    tiles = cdiv(tokens, block_t)
    groups = max(1, min(heads, MAX_GRID_Y, cdiv(PROGRAMS_PER_SM * num_sms(x.device), tiles)))
    heads_per_prog = cdiv(heads, groups)
    groups = cdiv(heads, heads_per_prog)
    _launch.launch(_rotary_kernel, (tiles, groups),
        x, cos, sin, out, *x_strides[:3], *out_strides[:3], cos_b, cos_s, seqlen, tokens, heads,
        heads_per_prog, rot // 2, head_dim - rot, int(backward), INTERLEAVED=interleaved,
        BLOCK_T=block_t, BLOCK_HALF=block_half, num_warps=NUM_WARPS,
    )
    return out


def rotary_fwd(x, cos, sin, interleaved, heads_first):
    """Rotate x (batch, seq, heads, head_dim), or (batch, heads, seq, head_dim) when heads_first, unit feature
    stride, by cos and sin: (seq, rot) or (batch or 1, seq, rot), unit feature stride, one dtype (fp32 or x's),
    equal strides, rot even and ≤ min(head_dim, MAX_ROT). Returns out, x's shape (contiguous) and dtype."""
    return _rotary(x, cos, sin, interleaved, heads_first, False)


def rotary_bwd(dy, cos, sin, interleaved, heads_first):
    """Backward of rotary_fwd: dy like x. Returns dx, dy's shape (contiguous) and dtype."""
    return _rotary(dy, cos, sin, interleaved, heads_first, True)
