"""Offsets past 2³¹ elements: every op, every kernel backend.

A kernel that forms an element offset in 32 bits (a row index times a row stride, a head index times a head stride,
a block start times a token stride) reads and writes the wrong memory once a tensor passes 2³¹ elements. Three
kinds of test guard against it:

- A static check on CPU: every Triton kernel is lowered to Triton IR (no GPU, no PTX), and every product with a
  stride argument must be 64-bit. Cheap (a second per kernel family) and exact about where each offset is formed;
  it cannot see the CUDA C++ kernels, which take int64 strides from the launcher.
- Real tensors past 2³¹ on CPU, under the interpreter: a view whose token or head stride is 2²⁷ to 2³⁰ elements
  reaches past 2³¹ from a buffer whose pages are only touched where the view lies (CPU memory is committed on first
  touch), so a few hundred kilobytes stand for gigabytes. The kernel must give bitwise what it gives on a
  contiguous copy.
- GPU tests (marked `gpu`) on tensors of 2.1–2.7·10⁹ elements, for each op and kernel backend: rows on both sides of
  the 2³¹ boundary and the last rows against the float64 reference computed on just those rows (each checked
  quantity depends only on them: gradients come from an incoming gradient that is zero elsewhere). At most about
  32 GiB each, freed after each test. (rotary_embedding's and the gated activations' are in their own files,
  tests/test_rotary.py and tests/test_gated.py, as test_gpu_over_2_31_elements.)
"""

import gc
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import _util, reference
from fastlm.kernels import attention as triton_attention
from fastlm.kernels import cross_entropy as triton_ce
from fastlm.kernels import gated as triton_gated
from fastlm.kernels import norm as triton_norm
from fastlm.kernels import rotary as triton_rotary
from conftest import BACKENDS, DEVICE, HAS_GPU, assert_by_rule, generator, poisoned_empty, seeded

TWO31 = 2 ** 31
TRITON = BACKENDS[:1]  # the triton param (skipped without a GPU or the interpreter)
KERNEL_BACKENDS = BACKENDS[:-1]  # triton and cuda


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()
    if HAS_GPU:
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------- static check (CPU)
#
# Triton IR names every SSA value after the Python variable it comes from, and keeps the integer width of every
# product. The rule: an `arith.muli` (or `arith.shli`) on i32 operands, one of which derives from a stride argument
# (a kernel argument named stride_*, or N where a row length serves as the stride of a (G, N) buffer), is an
# offset product in 32 bits, unless its other operand is an index inside a tile (derived only from tl.arange and
# constants: the attention launchers keep tile rows × token stride below 2³¹, see kernels/attention.py). Values
# loaded from memory (cu_seqlens) end a derivation: what matters is how the loaded value is multiplied, which the
# rule sees at the product.

STRIDE_ARG = re.compile(r"^(stride\w*|N)$")
TILE_OPS = ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "arith.extsi", "arith.extui", "arith.trunci",
            "arith.addi", "arith.subi", "arith.muli", "arith.shli")
_DEF = re.compile(r"^\s*(%[\w$.-]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_LOC_DEF = re.compile(r"^(#loc\d*)\s*=\s*loc\((.*)\)\s*$")


def _strip_loc(rest):
    return re.sub(r"\s*loc\(#loc\d*\)\s*\{?\s*$", "", rest)


def _operands_and_type(rest):
    """(operand names, result type) of an op's text after its name: operands come before the ` : ` of the types."""
    rest = _strip_loc(rest)
    head, _, types = rest.partition(" : ")
    names = [re.sub(r"#\d+$", "", n) for n in re.findall(r"%[\w$.-]+(?:#\d+)?", head)]
    return names, types.split(",")[-1].strip()


def _loc_resolver(text):
    locs = dict(m.groups() for m in map(_LOC_DEF.match, text.splitlines()) if m)

    def where(ref, depth=0):
        body = locs.get(ref)
        if body is None or depth > 20:
            return "?"
        m = re.match(r'"([^"]+)":(\d+)', body)
        if m:
            return f"{Path(m.group(1)).name}:{m.group(2)}"
        m = re.match(r"callsite\((#loc\d*) at (#loc\d*)\)", body)
        if m:
            return f"{where(m.group(1), depth + 1)} (from {where(m.group(2), depth + 1)})"
        m = re.search(r"(#loc\d*)", body)
        return where(m.group(1), depth + 1) if m else "?"

    return where


def thirty_two_bit_stride_products(ttir):
    """The i32 products with a stride in Triton IR text: [(value name, source location)]. Also checks that the IR
    was understood (pointer arithmetic found), so a format change fails loudly rather than passing."""
    defs, leaves = {}, {}
    m = re.search(r"tt\.func public @\w+\((.*?)\)\s*attributes", ttir, re.S)
    assert m, "no kernel signature in the IR"
    for name in re.findall(r"(%[\w$.-]+):\s*[^,]+?(?=,\s*%|$)", m.group(1)):
        leaves[name] = bool(STRIDE_ARG.match(name[1:]))
    n_addptr = 0
    for line in ttir.splitlines():
        for iv in re.findall(r"scf\.for (%[\w$.-]+) =", line):
            leaves[iv] = False
        for arg, init in re.findall(r"(%[\w$.-]+) = (%[\w$.-]+)", line.partition("iter_args(")[2]):
            defs[arg] = ("iter_arg", [init], "", "")
        d = _DEF.match(line)
        if not d or "scf.for" in d.group(2):
            continue
        name, op, rest = d.groups()
        operands, rtype = _operands_and_type(rest)
        loc = re.search(r"loc\((#loc\d*)\)", rest)
        defs[name] = (op, operands, rtype, loc.group(1) if loc else "")
        n_addptr += op == "tt.addptr"
    assert n_addptr > 0, "no tt.addptr in the IR: its text format is not what this check reads"

    memo = {}

    def from_stride(v, depth=0):
        if v in leaves:
            return leaves[v]
        if v in memo or depth > 500:
            return memo.get(v, False)
        memo[v] = False  # cycles (loop-carried values) count as not derived while being resolved
        op, operands, _, _ = defs.get(v, ("?", [], "", ""))
        memo[v] = op != "tt.load" and any(from_stride(o, depth + 1) for o in operands)
        return memo[v]

    bounded = {}

    def in_tile(v, depth=0):  # derived only from tl.arange and constants (through shape and integer ops)
        if v in leaves or depth > 500:
            return False
        if v not in bounded:
            bounded[v] = False
            op, operands, _, _ = defs.get(v, ("?", [], "", ""))
            bounded[v] = op in ("tt.make_range", "arith.constant") or (
                op in TILE_OPS and all(in_tile(o, depth + 1) for o in operands))
        return bounded[v]

    where = _loc_resolver(ttir)
    found = []
    for name, (op, operands, rtype, loc) in defs.items():
        if op in ("arith.muli", "arith.shli") and re.search(r"\bi32\b|xi32>", rtype):
            strided = [o for o in operands if from_stride(o)]
            others = [o for o in operands if o not in strided]
            if strided and not (len(strided) == 1 and all(in_tile(o) for o in others)):
                found.append((name, where(loc)))
    return found


def _representative_variants(variants):
    """Per kernel function and memory path (pointers or TMA), its variants with the fewest and the most flags on
    (dense causal / varlen with every option, for attention): the offset arithmetic of every code path, without
    compiling each block shape. Only variants whose stride arguments the JIT typed as runtime i32 (none
    specialised to the constant 1 by a degenerate shape, none i64): the case the rule is about."""
    by_fn = {}
    for v in variants:
        by_fn.setdefault((v.fn, bool(v.constexprs.get("USE_TMA"))), []).append(v)
    chosen = []
    for fn, group in by_fn.items():
        strided = [v for v in group if all(ty == "i32" for n, ty in v.signature.items() if STRIDE_ARG.match(n))]
        assert strided, f"every recorded variant of {fn[0].__name__} has a stride argument that is not a runtime i32"

        def flags_on(v):
            return sum(val is True for val in v.constexprs.values())

        lo, hi = min(strided, key=flags_on), max(strided, key=flags_on)
        chosen += [lo] if lo is hi else [lo, hi]
    return chosen


def _ttir(variant):
    """Triton IR of one variant after Triton's own IR passes (inlined, canonicalized), for sm_80: the first compile
    stage only, as triton.compile runs it."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 80, 32)
    backend = CUDABackend(target)
    src = ASTSource(fn=variant.fn, signature=variant.signature, constexprs=variant.constexprs, attrs=variant.attrs)
    options = backend.parse_options(dict(variant.options))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    stages = {}
    backend.add_stages(stages, options, src.language)
    return str(stages["ttir"](module, {}))


def _check_modules(module_names):
    """Run in a fresh process without the interpreter (its @triton.jit objects cannot be compiled): prints one line
    per violation, and 'checked N kernels'. The variants are the static report's: what the launchers launch."""
    from benchmarks import static

    sources = {name.rsplit(".", 1)[-1] + ".py" for name in module_names}
    variants = [v for v in static.triton_variants() if v.source in sources]
    assert {v.source for v in variants} == sources, f"no variants recorded for {sources - {v.source for v in variants}}"
    n = 0
    for variant in _representative_variants(variants):
        for name, where in thirty_two_bit_stride_products(_ttir(variant)):
            print(f"VIOLATION {variant.name}: {name} = a 32-bit product with a stride, at {where}")
        n += 1
    print(f"checked {n} kernels")


KERNEL_MODULES = ("fastlm.kernels.norm", "fastlm.kernels.cross_entropy", "fastlm.kernels.attention",
                  "fastlm.kernels.rotary", "fastlm.kernels.gated")


def test_triton_offset_products_are_64_bit():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, __file__, "--check-ir", *KERNEL_MODULES], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "checked" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    violations = [line for line in proc.stdout.splitlines() if line.startswith("VIOLATION")]
    assert not violations, "\n".join(violations)


def test_the_ir_check_sees_a_32_bit_offset():
    # The rule on a hand-written fragment: a row index times a stride in i32 is reported; the same in i64 is not,
    # nor a tile's own row index (tl.arange) times the stride.
    ir_text = """
  tt.func public @k(%X: !tt.ptr<f32> loc("X"(#loc)),
                    %stride_x: i32 loc("stride_x"(#loc))) attributes {noinline = false} {
    %pid = tt.get_program_id x : i32 loc(#loc1)
    %off = arith.muli %pid, %stride_x : i32 loc(#loc2)
    %p = tt.addptr %X, %off : !tt.ptr<f32>, i32 loc(#loc3)
    %pid64 = arith.extsi %pid : i32 to i64 loc(#loc4)
    %s64 = arith.extsi %stride_x : i32 to i64 loc(#loc4)
    %off64 = arith.muli %pid64, %s64 : i64 loc(#loc5)
    %p64 = tt.addptr %X, %off64 : !tt.ptr<f32>, i64 loc(#loc6)
    %r = tt.make_range {end = 16 : i32, start = 0 : i32} : tensor<16xi32> loc(#loc8)
    %sv = tt.splat %stride_x : i32 -> tensor<16xi32> loc(#loc8)
    %roff = arith.muli %r, %sv : tensor<16xi32> loc(#loc8)
    %ps = tt.splat %p64 : !tt.ptr<f32> -> tensor<16x!tt.ptr<f32>> loc(#loc8)
    %pr = tt.addptr %ps, %roff : tensor<16x!tt.ptr<f32>>, tensor<16xi32> loc(#loc8)
    tt.return loc(#loc7)
  } loc(#loc)
#loc2 = loc("kernel.py":12:5)
"""
    assert thirty_two_bit_stride_products(ir_text) == [("%off", "kernel.py:12")]


# --------------------------------------------------------------------------------------- strided views past 2³¹


def _view_in(buf, shape, strides, offset, g):
    """A random view of buf (only its own elements are written, so only their pages are touched)."""
    v = buf.as_strided(shape, strides, offset)
    v.copy_(torch.randn(shape, generator=g).to(buf.dtype))
    return v


def _same(name, got, want):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not got.isnan().any(), f"{name}: NaN (an element the kernel did not write, or a wrong read)"
    assert torch.equal(got, want), f"{name}: differs from the comparison run by {(got - want).abs().max().item()}"


def _attention_run(q, k, v, do, varlen, lens):
    """Forward and backward through the Triton launchers: (out, lse, dq, dk, dv)."""
    if varlen:
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=q.device)
        extra = (cu, cu, max(lens), max(lens))
    else:
        extra = (None, None, q.shape[1], k.shape[1])
    scale = q.shape[-1] ** -0.5
    out, lse = triton_attention.attention_fwd(q, k, v, *extra, scale, 7, 0, None)
    dq, dk, dv = triton_attention.attention_bwd(do, q, k, v, out, lse, None, *extra, scale, 7, 0, None)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("backend", TRITON, indirect=True)
@pytest.mark.parametrize("varlen", (False, True), ids=("dense", "varlen"))
@pytest.mark.parametrize("layout", ("long_rows", "far_heads", "huge_token_stride"))
def test_attention_views_reaching_past_2_31(layout, varlen, backend):
    """q, k, v and dO are views of one buffer that reach past 2³¹ elements, causal with a window of 7, GQA 3:1:
      long_rows          token stride 2²⁴ − 16 (the most the kernels take in place): rows 128 and up of the
                         sequences lie past 2³¹ (the overflow that the H200 hit with 2·10⁶-token sequences);
      far_heads          head-major planes 2³⁰ + 2¹⁰ apart: query head 2 starts past 2³¹;
      huge_token_stride  token stride 2²⁵, which the launchers copy (a tile's rows would be 2³¹ apart).
    float16: the interpreter's dot takes it (not bfloat16), and it halves the address space the buffer reserves."""
    dtype = torch.float16
    D, Hq, Hk = 16, 3, 1
    g = generator(1)
    if layout == "far_heads":
        S, lens, token, head = 40, [25, 15], D, (1 << 30) + (1 << 10)
        # Head-major planes, each holding S tokens of q, then of k, v and dO (k and v use plane 0 only).
        starts = (0, S * D, 2 * S * D, 3 * S * D)
        numel = (Hq - 1) * head + 4 * S * D
    elif layout == "long_rows":
        S, lens, token, head = 160, [150, 10], (1 << 24) - 16, D
    else:
        S, lens, token, head = 70, [40, 30], 1 << 25, D
    if layout != "far_heads":
        # A token's row holds q's heads, then k's, v's and dO's.
        starts = (0, Hq * D, (Hq + Hk) * D, (Hq + 2 * Hk) * D)
        numel = (S - 1) * token + (2 * Hq + 2 * Hk) * D
    assert numel > TWO31
    buf = torch.empty(numel, dtype=dtype, device=DEVICE)

    def view(i, heads):
        shape, strides = ((S, heads, D), (token, head, 1)) if varlen else ((1, S, heads, D), (0, token, head, 1))
        return _view_in(buf, shape, strides, starts[i], g)

    q, k, v, do = view(0, Hq), view(1, Hk), view(2, Hk), view(3, Hq)
    got = _attention_run(q, k, v, do, varlen, lens)
    want = _attention_run(*(t.contiguous() for t in (q, k, v, do)), varlen, lens)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        _same(name, a, b)


@pytest.mark.parametrize("backend", TRITON, indirect=True)
@pytest.mark.parametrize("N", (96, 8200), ids=("rows_in_registers", "chunked_rows"))
@pytest.mark.parametrize("is_rms", (False, True), ids=("layer_norm", "rms_norm"))
def test_norm_rows_reaching_past_2_31(is_rms, N, backend):
    """x, the residual, dy and d(residual_out) are rows 2²⁸ + 64 elements apart in one buffer, so row 8 starts past
    2³¹: forward and backward against the same launchers on contiguous copies."""
    M, stride = 9, (1 << 28) + 64
    dtype = torch.float16
    g = generator(2)
    buf = torch.empty((M - 1) * stride + 4 * N, dtype=dtype, device=DEVICE)
    x, r, dy, dres = (_view_in(buf, (M, N), (stride, 1), i * N, g) for i in range(4))
    w = (1 + 0.5 * torch.randn(N, generator=g)).to(dtype).to(DEVICE)
    b = None if is_rms else (0.5 * torch.randn(N, generator=g)).to(dtype).to(DEVICE)

    def run(x, r, dy, dres):
        y, ro, mean, rstd = triton_norm.norm_fwd(x, w, b, r, 1e-5, is_rms, 0.0)
        dx, dw, db = triton_norm.norm_bwd(dy, ro, w, mean, rstd, dres, is_rms, 0.0, True, not is_rms)
        return [t for t in (y, ro, mean, rstd, dx, dw, db) if t is not None]

    got = run(x, r, dy, dres)
    want = run(*(t.contiguous() for t in (x, r, dy, dres)))
    for name, a, c in zip(("y", "residual_out", "mean/rstd", "rstd/dx", "dx/dw", "dw/db", "db"), got, want):
        _same(name, a, c)


@pytest.mark.parametrize("backend", TRITON, indirect=True)
def test_norm_refuses_row_indices_past_int32(backend):
    """The norm kernels that keep rows in registers index rows in int32: 2³¹ rows of one element (4 GiB of address
    space, never touched) are refused before anything is allocated or launched, forward and backward."""
    x = torch.empty(TWO31, 1, dtype=torch.float16, device=DEVICE)
    rstd = torch.empty(TWO31, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="int32"):
        triton_norm.norm_fwd(x, None, None, None, 1e-5, True, 0.0)
    with pytest.raises(ValueError, match="int32"):
        triton_norm.norm_bwd(x, x, None, None, rstd, None, True, 0.0, False, False)


@pytest.mark.parametrize("backend", TRITON, indirect=True)
@pytest.mark.parametrize("per_sm", (None, 1), ids=("a program a row", "persistent"))
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_cross_entropy_rows_reaching_past_2_31(reduction, per_sm, backend, monkeypatch):
    """Logits rows 2²⁸ + 64 elements apart, the last past 2³¹: loss and gradient (the forward's, scaled in place by
    an incoming 1.5, for "mean"; the backward kernel's for "none") against a contiguous copy; the forward's grid a
    program a row, and programs walking rows (PROGRAMS_PER_SM)."""
    monkeypatch.setattr(triton_ce, "PROGRAMS_PER_SM", per_sm)
    rows, V, stride = 9, 1000, (1 << 28) + 64
    g = generator(3)
    buf = torch.empty((rows - 1) * stride + V, dtype=torch.float16, device=DEVICE)
    logits = _view_in(buf, (rows, V), (stride, 1), 0, g)
    target = torch.randint(0, V, (rows,), generator=g).to(DEVICE)
    target[3] = -100
    go = torch.randn(rows, generator=g).to(DEVICE)

    def run(z):
        loss, m, log_s, sc, grad = triton_ce.cross_entropy_fwd(z, target, None, -100, 0.1, 1e-4, 30.0, reduction,
                                                               reduction != "none")
        if reduction == "none":
            grad = triton_ce.cross_entropy_bwd(z, target, None, sc, m, log_s, go, -100, 0.1, 1e-4, 30.0)
        else:
            grad = triton_ce.scale_grad(grad, torch.tensor([1.5], device=DEVICE))
        return loss, m, log_s, grad

    for name, a, c in zip(("loss", "max", "log_s", "grad"), run(logits), run(logits.contiguous())):
        _same(name, a, c)


@pytest.mark.parametrize("backend", TRITON, indirect=True)
@pytest.mark.parametrize("activation", ("silu", "gelu_tanh", "gelu"))
def test_gated_rows_reaching_past_2_31(activation, backend):
    """gate, up and dh are rows 2²⁸ + 64 elements apart in one buffer, so row 8 starts past 2³¹: h, dgate and dup
    against the same launchers on contiguous copies (which they walk as one row)."""
    M, N, stride = 9, 200, (1 << 28) + 64
    g = generator(4)
    buf = torch.empty((M - 1) * stride + 3 * N, dtype=torch.float16, device=DEVICE)
    gate, up, dh = (_view_in(buf, (M, N), (stride, 1), i * N, g) for i in range(3))

    def run(gate, up, dh):
        return (triton_gated.gated_fwd(gate, up, activation), *triton_gated.gated_bwd(dh, gate, up, activation))

    for name, a, c in zip(("h", "dgate", "dup"), run(gate, up, dh), run(*(t.contiguous() for t in (gate, up, dh)))):
        _same(name, a, c)


@pytest.mark.parametrize("backend", TRITON, indirect=True)
@pytest.mark.parametrize("interleaved", (False, True), ids=("rotate_half", "interleaved"))
@pytest.mark.parametrize("layout", ("far_batches", "far_heads"))
def test_rotary_reaching_past_2_31(layout, interleaved, backend):
    """x and dy (batch, seq, heads, head_dim) are views whose batch stride is 2³⁰ + 64 elements (far_batches) or
    whose head stride is 2²⁸ + 64 (far_heads), so the last batch entry or head starts past 2³¹; 24 of 32 features
    rotate, the rest pass through. Forward and backward against the same launchers on contiguous copies."""
    S, D, rot = 5, 32, 24
    if layout == "far_batches":
        B, H = 3, 2
        strides, dy_at = ((1 << 30) + 64, H * D, D, 1), S * H * D  # dy after x in each batch entry's block
    else:
        B, H = 2, 9
        strides, dy_at = (S * D, D, (1 << 28) + 64, 1), B * S * D  # dy after x in each head's block
    shape = (B, S, H, D)
    g = generator(5)
    buf = torch.empty(sum((n - 1) * st for n, st in zip(shape, strides)) + 1 + dy_at, dtype=torch.float16,
                      device=DEVICE)
    x, dy = (_view_in(buf, shape, strides, at, g) for at in (0, dy_at))
    cos, sin = (torch.randn(S, rot, generator=g).to(DEVICE) for _ in range(2))

    def run(x, dy):
        return (triton_rotary.rotary_fwd(x, cos, sin, interleaved, False),
                triton_rotary.rotary_bwd(dy, cos, sin, interleaved, False))

    for name, a, c in zip(("out", "dx"), run(x, dy), run(x.contiguous(), dy.contiguous())):
        _same(name, a, c)


# --------------------------------------------------------------------------------------- launch limits (CPU)


@pytest.mark.parametrize("backend", TRITON, indirect=True)
@pytest.mark.parametrize("varlen", (False, True), ids=("dense", "varlen"))
def test_attention_batches_past_the_grid_limit_launch_in_chunks(varlen, backend, monkeypatch):
    """Grid axes 1 and 2 (heads, batch) stop at 65535: a larger batch goes in several launches. The limit is
    lowered to 2 here so that five sequences take three launches, which must give what one launch gives."""
    g = generator(4)
    lens = [5, 0, 33, 1, 20]
    dtype = torch.float32
    # Two query heads over one kv head: within the lowered limit, which also bounds the heads.
    if varlen:
        q, do = (torch.randn(sum(lens), 2, 16, generator=g).to(dtype).to(DEVICE) for _ in range(2))
        k, v = (torch.randn(sum(lens), 1, 16, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    else:
        q, do = (torch.randn(5, 33, 2, 16, generator=g).to(dtype).to(DEVICE) for _ in range(2))
        k, v = (torch.randn(5, 20, 1, 16, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    want = _attention_run(q, k, v, do, varlen, lens)
    monkeypatch.setattr(triton_attention, "MAX_GRID_YZ", 2)
    got = _attention_run(q, k, v, do, varlen, lens)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        if name == "lse":  # rows that see no key have −inf
            a, b = a.nan_to_num(neginf=-1e30), b.nan_to_num(neginf=-1e30)
        _same(name, a, b)
    q3, do3 = (torch.cat([t, t[..., :1, :]], -2) for t in (q, do))
    with pytest.raises(ValueError, match="at most 2 query heads"):
        _attention_run(q3, k, v, do3, varlen, lens)


@pytest.mark.parametrize("backend", TRITON, indirect=True)
@pytest.mark.parametrize("window", ((2**31 - 1, 2**31 - 1), (3, 2**31 - 1), (2**31 - 1, 0), (2**40, 2**33)))
def test_attention_windows_near_the_int32_range(window, backend):
    """Window sizes up to and past 2³¹ − 1 mean the same as unbounded sides: the kernels add them to positions in
    int32, which must not wrap."""
    g = generator(5)
    q = torch.randn(2, 37, 2, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(2, 45, 2, 16, generator=g).to(DEVICE) for _ in range(2))
    big = 2**31 - 1
    same = tuple(-1 if w >= big else w for w in window)
    got = fastlm.attention(q, k, v, window=window)
    want = fastlm.attention(q, k, v, window=same)
    _same("out", got, want)


# --------------------------------------------------------------------------------------- GPU: real sizes
#
# Sizes derive from LIMIT (2³¹), so that the same tests can be dry-run small; GPU, ATTN_DTYPE and DECODE_WINDOW
# likewise (the interpreter needs float16 for attention's dots).

LIMIT = TWO31
GPU = torch.device("cuda")
ATTN_DTYPE = torch.bfloat16
DECODE_WINDOW = 4096


def _free():
    gc.collect()
    if HAS_GPU:
        torch.cuda.empty_cache()


def _cuda_gen(offset):
    return torch.Generator(device=GPU).manual_seed(seeded(offset))


def _randn(shape, dtype, offset, scale=1.0):
    """A random tensor on the GPU drawn in its own dtype (no float32 copy of a 4 GiB tensor)."""
    t = torch.empty(shape, device=GPU, dtype=dtype)
    t.normal_(0.0, scale, generator=_cuda_gen(offset))
    return t


def _rows_around(boundary, total, n=16):
    """Indices: n rows on each side of `boundary` (the row where offsets pass 2³¹), and the last n rows."""
    idx = list(range(max(0, boundary - n), min(total, boundary + n))) + list(range(max(0, total - n), total))
    return torch.tensor(sorted(set(idx)), device=GPU)


def _zero_but(shape, rows, dtype, offset):
    """An incoming gradient that is zero except on `rows` (random there): the checked gradients then depend only
    on those rows, whose reference is small."""
    g = torch.zeros(shape, device=GPU, dtype=dtype)
    g[rows] = torch.randn((len(rows), *shape[1:]), device=GPU, generator=_cuda_gen(offset)).to(dtype)
    return g


@pytest.mark.gpu
@pytest.mark.large_memory
@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
@pytest.mark.parametrize("N", (4096, 20480), ids=("rows_in_registers", "chunked_rows"))
@pytest.mark.parametrize("is_rms", (False, True), ids=("layer_norm", "rms_norm"))
def test_gpu_norm_past_2_31(is_rms, N, backend):
    """(rows × N) bf16 > 2³¹ with the residual fused, forward and backward: y, residual_out, dx (= d residual), dw
    and db of the rows around the 2³¹ boundary and of the last rows (dy and d(residual_out) are zero elsewhere, so
    dw and db sum only those rows). About 32 GiB (eight 4 GiB tensors)."""
    M = LIMIT // N + 256
    dtype = torch.bfloat16
    x = _randn((M, N), dtype, 10).requires_grad_()
    r = _randn((M, N), dtype, 11).requires_grad_()
    w = (1 + 0.5 * torch.randn(N, device=GPU, generator=_cuda_gen(12))).to(dtype).requires_grad_()
    b = None if is_rms else (0.5 * torch.randn(N, device=GPU, generator=_cuda_gen(13))).to(dtype).requires_grad_()
    rows = _rows_around(LIMIT // N, M)
    if is_rms:
        y, ro = fastlm.rms_norm(x, w, eps=1e-6, residual=r)
    else:
        y, ro = fastlm.layer_norm(x, w, b, eps=1e-5, residual=r)
    dy, dres = _zero_but((M, N), rows, dtype, 14), _zero_but((M, N), rows, dtype, 15)
    params = (w,) if is_rms else (w, b)
    dx, dr, *dp = torch.autograd.grad((y, ro), (x, r, *params), (dy, dres))
    got = dict(y=y[rows].detach(), residual_out=ro[rows].detach(), dx=dx[rows], dresidual=dr[rows],
               **{f"d{n}": d for n, d in zip(("w", "b"), dp)})
    quiet = [i for i in (0, 1, M // 2, M // 2 + 1) if i not in set(rows.tolist())]  # rows with dy = dres = 0
    assert not dx[quiet].any(), "dx of rows whose incoming gradients are 0 is not 0"
    xs, rs, dys, dress = x.detach()[rows], r.detach()[rows], dy[rows], dres[rows]
    del x, r, y, ro, dy, dres, dx, dr
    _free()

    def grads(x_, r_, w_, b_, fn):  # y, residual_out and the gradients of (x, residual, weight[, bias])
        leaves = [t.detach().clone().requires_grad_() for t in (x_, r_, w_) + ((b_,) if b_ is not None else ())]
        y_, ro_ = fn(*leaves)
        g = torch.autograd.grad((y_, ro_), leaves, (dys.to(y_.dtype), dress.to(y_.dtype)))
        return y_.detach(), ro_.detach(), g

    def ref_fn(x_, r_, w_, *b_):
        if is_rms:
            return reference.rms_norm(x_, w_, 1e-6, r_)
        return reference.layer_norm(x_, w_, b_[0], 1e-5, r_)

    def torch_fn(x_, r_, w_, *b_):
        s = x_ + r_
        return (F.rms_norm(s, (N,), w_, 1e-6) if is_rms else F.layer_norm(s, (N,), w_, b_[0], 1e-5)), s

    bb = b.detach() if b is not None else None
    ry, rro, rg = grads(xs.double(), rs.double(), w.detach().double(), bb.double() if bb is not None else None, ref_fn)
    ty, tro, tg = grads(xs, rs, w.detach(), bb, torch_fn)
    assert_by_rule("y", got["y"], ry, ty)
    assert_by_rule("residual_out", got["residual_out"], rro, tro)
    assert_by_rule("dx", got["dx"], rg[0], tg[0])
    assert_by_rule("dresidual", got["dresidual"], rg[1], tg[1])
    assert_by_rule("dw", got["dw"], rg[2], tg[2])
    if not is_rms:
        assert_by_rule("db", got["db"], rg[3], tg[3])


def _ce_rows_check(loss, grad, logits, target, rows, go, scale, reduction):
    """Loss ("none") and gradient rows against the float64 reference on those rows."""
    z = logits[rows]
    t = target[rows]
    z64 = z.double().requires_grad_()
    ref = reference.cross_entropy(z64, t, reduction="none")
    (ref * go[rows].double()).sum().mul(scale).backward()
    zt = z.clone().requires_grad_()
    tl_ = F.cross_entropy(zt, t, reduction="none")
    (tl_ * go[rows].to(tl_.dtype)).sum().mul(scale).backward()
    if reduction == "none":
        assert_by_rule("loss", loss[rows], ref.detach(), F.cross_entropy(z.float(), t, reduction="none"))
    assert_by_rule("dlogits", grad[rows], z64.grad, zt.grad)


@pytest.mark.gpu
@pytest.mark.large_memory
@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gpu_cross_entropy_past_2_31(reduction, backend):
    """(tokens × 128256) bf16 logits > 2³¹: the forward's gradient scaled by the backward ("mean", incoming 1.7)
    and the backward kernel ("none", incoming gradient zero except on the checked rows), rows around the 2³¹
    boundary and the last rows against the reference. About 12 GiB."""
    V = 128256
    rows_total = LIMIT // V + 64
    logits = _randn((rows_total, V), torch.bfloat16, 20, scale=2.0)
    target = torch.randint(0, V, (rows_total,), device=GPU, generator=_cuda_gen(21))
    rows = _rows_around(LIMIT // V, rows_total)
    x = logits.clone().requires_grad_()
    loss = fastlm.cross_entropy(x, target, reduction=reduction)
    if reduction == "none":
        go = _zero_but((rows_total,), rows, torch.float32, 22)
        loss.backward(go)
        scale = 1.0
    else:
        go = torch.ones(rows_total, device=GPU)
        loss.backward(torch.tensor(1.7, device=GPU))
        scale = 1.7 / rows_total
    grad = x.grad
    del x
    _ce_rows_check(loss.detach(), grad, logits, target, rows, go, scale, reduction)
    if reduction == "mean":
        per_row = fastlm.cross_entropy(logits, target, reduction="none")
        torch.testing.assert_close(loss.detach(), per_row.double().mean().float(), rtol=1e-5, atol=0)


@pytest.mark.gpu
@pytest.mark.large_memory
@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gpu_linear_cross_entropy_past_2_31(reduction, backend):
    """tokens × vocab > 2³¹ (never materialized: chunks of logits): losses ("none"), d(hidden) of the checked rows,
    and d(weight), which with an incoming gradient zero elsewhere ("none") sums only those rows."""
    T, H, V = LIMIT // 128256 + 64, 512, 128256
    hidden = _randn((T, H), torch.bfloat16, 30)
    weight = _randn((V, H), torch.bfloat16, 31, scale=3 / H**0.5)
    target = torch.randint(0, V, (T,), device=GPU, generator=_cuda_gen(32))
    rows = _rows_around(LIMIT // V, T)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = fastlm.linear_cross_entropy(h, w, target, reduction=reduction)
    if reduction == "none":
        go = _zero_but((T,), rows, torch.float32, 33)
        loss.backward(go)
        scale = 1.0
    else:
        go = torch.ones(T, device=GPU)
        loss.backward()
        scale = 1.0 / T

    def run(hh, ww, ct):
        hh = hh.detach().to(ct).requires_grad_()
        ww = ww.detach().to(ct).requires_grad_()
        if ct == torch.float64:
            per_row = reference.linear_cross_entropy(hh, ww, target[rows], reduction="none")
        else:
            per_row = F.cross_entropy(F.linear(hh, ww).float(), target[rows], reduction="none")
        (per_row * go[rows].to(per_row.dtype)).sum().mul(scale).backward()
        return per_row.detach(), hh.grad, ww.grad

    ref_loss, ref_dh, ref_dw = run(hidden[rows], weight, torch.float64)
    t_loss, t_dh, t_dw = run(hidden[rows], weight, torch.bfloat16)
    if reduction == "none":
        assert_by_rule("loss", loss.detach()[rows], ref_loss, t_loss)
        assert_by_rule("dweight", w.grad, ref_dw, t_dw)
    assert_by_rule("dhidden", h.grad[rows], ref_dh, t_dh)


def _attn_region_check(name, q, k, v, out, lse_rows, dq, dk, dv, do, a, b, window):
    """Queries [a, b) of one sequence (q, k, v, out, dq, dk, dv, do: its (S, H, D) views; lse_rows: (Hq, b − a)),
    keys [a − window, b): the reference on that sub-problem (bottom-right alignment makes its mask the original
    one) against the kernels' rows. dO is zero outside [a, b), so dK and dV of those keys come from these queries
    alone."""
    k0 = max(0, a - window)
    sub = [t[None, lo:b] for t, lo in ((q, a), (k, k0), (v, k0), (do, a))]
    scale = q.shape[-1] ** -0.5

    def run(ct, upcast):
        leaves = [t.detach().to(ct).requires_grad_() for t in sub[:3]]
        o, l_ = reference.attention_masked(*leaves, scale, window, 0, upcast=upcast)
        grads = torch.autograd.grad(o, leaves, sub[3].to(o.dtype))
        return o[0].detach(), l_[0].detach(), [g[0] for g in grads]

    ro, rl, rg = run(torch.float64, True)
    to, tl_, tg = run(q.dtype, False)
    assert_by_rule(f"{name} out", out[a:b], ro, to)
    assert_by_rule(f"{name} lse", lse_rows, rl, tl_)
    assert_by_rule(f"{name} dq", dq[a:b], rg[0], tg[0], factor=3.0)
    assert_by_rule(f"{name} dk", dk[k0:b], rg[1], tg[1], factor=3.0)
    assert_by_rule(f"{name} dv", dv[k0:b], rg[2], tg[2], factor=3.0)


@pytest.mark.gpu
@pytest.mark.large_memory
@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
@pytest.mark.parametrize("layout", ("varlen", "batch", "head_major"))
def test_gpu_attention_past_2_31(layout, backend):
    """q > 2³¹ bf16 elements, causal with a 64-key window (so that 2·10⁶-token sequences cost milliseconds), GQA
    8:1 or 8:2, forward and backward (the cuda backend's forward is CUDA C++, its backward Triton's):
      varlen      packed (2^21 + 512, 8, 128): one sequence of all but 256 tokens, then a 256-token one; rows ×
                  token stride of the long sequence pass 2³¹ (the H200 failure);
      batch       (3, 2^20 + 256, 8, 128): the third batch entry starts past 2³¹;
      head_major  (1, S, 8, 128) views of (1, 8, S, 128) tensors, S = 2³¹ / (7 · 128) + 256: head 7 starts past 2³¹.
    Checked: the last 128 queries of the long sequence and the whole short one (varlen), the last 128 queries of
    the last entry (batch, head_major), and the keys they see. At most about 25 GiB."""
    D, W = 128, 64
    dtype = ATTN_DTYPE
    if layout == "varlen":
        T = LIMIT // (8 * D) + 512
        q = _randn((T, 8, D), dtype, 40)
        k, v = _randn((T, 1, D), dtype, 41), _randn((T, 1, D), dtype, 42)
        cu = torch.tensor([0, T - 256, T], dtype=torch.int32, device=GPU)
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T - 256, max_seqlen_k=T - 256)
        regions = [(T - 256 - 128, T - 256), (T - 256, T)]  # packed token ranges, each within one sequence
        starts = [0, T - 256]
    elif layout == "batch":
        B, S = 3, LIMIT // (2 * 8 * D) + 256
        q = _randn((B, S, 8, D), dtype, 40)
        k, v = _randn((B, S, 2, D), dtype, 41), _randn((B, S, 2, D), dtype, 42)
        kw = {}
        regions, starts = [(S - 128, S)], [0]
    else:
        S = LIMIT // (7 * D) + 256
        q = _randn((1, 8, S, D), dtype, 40).transpose(1, 2)
        k, v = (_randn((1, 2, S, D), dtype, o).transpose(1, 2) for o in (41, 42))
        kw = {}
        regions, starts = [(S - 128, S)], [0]
    assert q.numel() > LIMIT
    qg, kg, vg = (t.requires_grad_() for t in (q, k, v))
    out, lse = fastlm.attention(qg, kg, vg, causal=True, window=(W, -1), return_lse=True, **kw)
    # dO: random on the checked query rows, zero elsewhere.
    do = torch.zeros_like(out)
    last = (lambda t: t) if layout == "varlen" else (lambda t: t[-1])
    for a, b in regions:
        last(do)[a:b] = torch.randn_like(last(do)[a:b])
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), do)
    lse = lse.detach() if layout == "varlen" else lse.detach()[-1]  # (Hq, tokens of the checked sequences)
    for (a, b), s0 in zip(regions, starts):
        def seq(t, s0=s0):  # the checked sequence, (S, H, D)
            return last(t.detach())[s0:]
        _attn_region_check(f"{layout}[{a}:{b}]", seq(q), seq(k), seq(v), seq(out), lse[:, a:b], seq(dq), seq(dk),
                           seq(dv), seq(do), a - s0, b - s0, W)


@pytest.mark.gpu
@pytest.mark.large_memory
@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_gpu_decode_past_2_31(backend):
    """Decode over a KV cache past 2³¹ elements: q (2, 4, 32, 128), k and v (2, 2^20 + 4096, 8, 128) bf16, causal
    with a 4096-key window, so the keys read by batch entry 1 lie past 2³¹ (the cuda backend splits them across
    CTAs and combines the splits). Forward only. About 9 GiB."""
    B, Sq, D, W = 2, 4, 128, DECODE_WINDOW
    Sk = LIMIT // (B * 8 * D) + W
    q = _randn((B, Sq, 32, D), ATTN_DTYPE, 50)
    k, v = _randn((B, Sk, 8, D), ATTN_DTYPE, 51), _randn((B, Sk, 8, D), ATTN_DTYPE, 52)
    assert k.numel() > LIMIT and (2 * Sk - Sq - W) * 8 * D > LIMIT  # batch 1's first visible key lies past it
    out, lse = fastlm.attention(q, k, v, causal=True, window=(W, -1), return_lse=True)
    k0 = Sk - Sq - W  # the first key any of the queries sees
    scale = D ** -0.5
    ref_o, ref_l = reference.attention_masked(q.double(), k[:, k0:].double(), v[:, k0:].double(), scale, W, 0)
    t_o, t_l = reference.attention_masked(q, k[:, k0:], v[:, k0:], scale, W, 0, upcast=False)
    assert_by_rule("out", out, ref_o, t_o)
    assert_by_rule("lse", lse, ref_l.float(), t_l.float())
    assert _util.empty is poisoned_empty  # outputs the kernels forgot would be NaN and fail above


if __name__ == "__main__" and sys.argv[1:2] == ["--check-ir"]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: a folder of the repository
    _check_modules(sys.argv[2:])
