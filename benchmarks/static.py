"""`python -m benchmarks.static`: the static kernel report, the one performance signal there is without a GPU.

It compiles every kernel fastlm ships, for every architecture it ships for, on a machine with no GPU, and reads
the machine code:
- Triton: every variant the launchers of fastlm.kernels launch. The launchers themselves are run (LAUNCHES: call
  shapes that reach every entry of their launch tables) on CPU tensors with Triton's JIT launch replaced by a
  recorder that binds each call as the JIT does (argument types, constexprs, divisible-by-16 attributes); each
  distinct variant is compiled by `triton.compile` with a `GPUTarget` for sm_80 and sm_90 (which Triton builds as
  sm_90a).
- CUDA C++: every csrc/*.cu for every architecture setup.py builds. Where setup.py's build object of the source
  is newer than csrc/ and setup.py (CI builds before the report runs), that object is read: it is exactly what
  ships, and nvcc takes minutes on these templates. Otherwise nvcc compiles it here with setup.py's own flags,
  one cubin per architecture, and `ptxas -v` adds the spill bytes.
Then `cuobjdump -res-usage` gives registers, shared memory and local memory (stack frame and local arrays) per
kernel, and the SASS (`cuobjdump -sass` of an object, `nvdisasm` of a cubin; the Triton kernels' code of an
architecture in batches, `disassemble`) the widest global load and store, local loads and stores (spills),
tensor-core instructions (HMMA; HGMMA is Hopper's wgmma), TMA loads, and setmaxnreg.

It prints one table and exits non-zero when any kernel fails to compile or uses local memory in a shipped config
(stack or local bytes, spill bytes, or LDL/STL instructions), when a variant built with WARP_SPEC lacks setmaxnreg
(Triton did not warp-specialize it), or when a 16-bit attention tile of 64 rows or more has no HGMMA on sm_90a
(WGMMA_TILE_ROWS) or a CUDA C++ kernel written on wgmma has none there (CUDA_WGMMA_KERNELS), naming each one.
Compiles run in a process pool of os.cpu_count() workers; it runs in CI after the tests.
"""

import argparse
import bisect
import functools
import importlib
import itertools
import multiprocessing
import os
import re
import runpy
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unittest.mock
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRITON_CAPS = (80, 90)  # compute capabilities the Triton kernels are compiled for; 90 builds sm_90a
TRITON_WARP_SIZE = 32
CSRC = REPO / "csrc"
BUILD_DIR = REPO / "build" / "cuda"  # where setup.py's ninja build leaves one object per source, <name>.o
NAME_WIDTH = 64  # kernel names longer than this are shortened in the table

TENSOR_CORE_OPS = ("HGMMA", "QGMMA", "IGMMA", "HMMA", "IMMA")
# Width in bits of a global load or store, by the SASS suffix that sets it; no suffix is 32 bits.
WIDTH_SUFFIXES = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


# ---------------------------------------------------------------------------------------------- reading cubins


def cuda_tool(name: str) -> str:
    """A CUDA binary tool (cuobjdump, nvdisasm) from the CUDA toolkit, else the copy that ships inside Triton."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", name).exists():
        return str(Path(home, "bin", name))
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name}: not in $CUDA_HOME/bin, in triton's backends/nvidia/bin, or on PATH")


def cuobjdump() -> str:
    return cuda_tool("cuobjdump")


def _width(suffixes: str) -> int:
    for part in suffixes.split("."):
        if part in WIDTH_SUFFIXES:
            return WIDTH_SUFFIXES[part]
    return 32


# The named barriers csrc/attention.cu's pingpong passes the turn between its consumer warp groups by (0 is
# __syncthreads', 1 the consumers' own).
TURN_BARRIERS = (2, 3)


def _no_sass() -> dict:
    """A kernel's SASS facts before any instruction is read."""
    return {"ld": 0, "st": 0, "ldl_stl": 0, "mma": set(), "tma": False, "ws": False, "overlap": False,
            "turns": False}


def parse_sass(text: str) -> dict:
    """Per kernel: widest global load and store (bits), local loads/stores, tensor-core ops, bulk tensor loads,
    setmaxnreg, and `overlap`: an exp2 (MUFU.EX2, the softmax) issued while a wgmma group may still be running, in
    program order between an HGMMA and the next wait for every group (WARPGROUP.DEPBAR.LE gsb0, 0x0). ptxas waits
    after each wgmma instead when it cannot prove the registers of one in flight untouched (its C7513/C7517
    notes), and the softmax then never overlaps a product. `turns`: a turn, in program order, that holds a block's
    two products: a BAR.SYNC on one of the pingpong's named barriers (TURN_BARRIERS), then an HGMMA with both
    operands in shared memory (S = Q·Kᵀ) and one with A from registers (O += P·V), then a BAR.ARV on one: a warp
    group that waits for its turn, issues its products, then hands the turn on. (Which barrier a group syncs on
    and which it arrives at are decided by predicates and branches, both groups' in one stream of code, so the
    pairing is not read here.)"""
    kernels, current, pending, turn = {}, None, False, None
    for line in text.splitlines():
        # cuobjdump heads each kernel "Function : name", nvdisasm ".text.name:"
        m = re.match(r"\s*Function : (\S+)", line) or re.match(r"\.text\.(\S+):\s*$", line)
        if m:
            current, pending, turn = kernels.setdefault(m.group(1), _no_sass()), False, None
            continue
        if current is None:
            continue
        barrier = re.search(r"\bBAR\.(SYNC|ARV)\b(?:\.[A-Z_]+)*\s+(0x[0-9a-f]+)", line)
        if barrier and int(barrier.group(2), 16) in TURN_BARRIERS:
            if barrier.group(1) == "SYNC":
                turn = turn or {"ss": False, "rs": False}  # the turn taken: the products issued in it
            else:
                current["turns"] |= bool(turn and turn["ss"] and turn["rs"])
                turn = None
        if re.search(r"\bHGMMA\b", line):
            if turn is not None:  # A from registers: "HGMMA.… Rd, Ra, gdesc[…]"; from shared memory: "Rd, gdesc[…]"
                turn["rs" if re.search(r"\bHGMMA\S*\s+R\d+,\s*R\d+,\s*gdesc", line) else "ss"] = True
            pending = True
        elif re.search(r"\bWARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b", line):
            pending = False
        elif pending and re.search(r"\bMUFU\.EX2\b", line):
            current["overlap"] = True
        for op, suffixes in re.findall(r"\b(LDGSTS|LDG|STG)((?:\.[A-Z0-9_]+)*)", line):
            key = "st" if op == "STG" else "ld"
            current[key] = max(current[key], _width(suffixes))
        current["ldl_stl"] += len(re.findall(r"\b(?:LDL|STL)\b", line))
        current["mma"].update(op for op in TENSOR_CORE_OPS if re.search(rf"\b{op}\b", line))
        current["tma"] |= bool(re.search(r"\bUTMALDG\b", line))
        current["ws"] |= bool(re.search(r"\bUSETMAXREG\b", line))  # warp groups trading registers: warp-specialized
    return kernels


def parse_res_usage(text: str) -> dict:
    """Per kernel: registers, stack, shared and local bytes, from `cuobjdump -res-usage`."""
    out = {}
    for name, body in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", text):
        fields = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", body))
        out[name] = {"regs": int(fields.get("REG", 0)), "stack": int(fields.get("STACK", 0)),
                     "shared": int(fields.get("SHARED", 0)), "local": int(fields.get("LOCAL", 0))}
    return out


def parse_ptxas_spills(text: str) -> dict:
    """Per kernel: spill bytes (stores + loads), from `ptxas -v`."""
    out = {}
    pattern = (r"Function properties for (\S+)\s*\n\s*\d+ bytes stack frame, (\d+) bytes spill stores, "
               r"(\d+) bytes spill loads")
    for name, stores, loads in re.findall(pattern, text):
        out[name] = int(stores) + int(loads)
    return out


def inspect_binary(path: Path) -> dict:
    """{arch: {kernel: resources and SASS facts}} from one cuobjdump call. A fat binary (an object with code for
    several architectures) is split by its "arch = sm_XX" headers; a plain cubin comes back under the key None."""
    proc = subprocess.run([cuobjdump(), "-res-usage", "-sass", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {path.name}: {proc.stderr.strip()[:500]}")
    parts = re.split(r"^Fatbin elf code:\s*$", proc.stdout, flags=re.M)
    sections = [(None, proc.stdout)] if len(parts) == 1 else []
    for part in parts[1:]:
        m = re.search(r"^arch = (\S+)", part, flags=re.M)
        sections.append((m.group(1) if m else None, part))
    out = {}
    for arch, text in sections:
        sass = parse_sass(text)
        out[arch] = {name: dict(res, **sass.get(name, _no_sass())) for name, res in parse_res_usage(text).items()}
    return out


def _run_tool(name: str, *args) -> str:
    proc = subprocess.run([cuda_tool(name), *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed: {proc.stderr.strip()[:500]}")
    return proc.stdout


def resource_usage(cubin: bytes) -> dict:
    """parse_res_usage's {kernel: resources} of one plain cubin, from `cuobjdump -res-usage`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.cubin")
        path.write_bytes(cubin)
        return parse_res_usage(_run_tool("cuobjdump", "-res-usage", path))


def inspect_cubin(path: Path) -> dict:
    """inspect_binary's {kernel: facts} for one plain cubin (not a fat binary), read in about two thirds of the time:
    the resources from `cuobjdump -res-usage` and the SASS from `nvdisasm --no-dataflow`. cuobjdump's -sass runs
    nvdisasm with its dataflow analysis (register liveness comments the report never reads), which costs ~0.2 s of
    a call's ~0.7 s."""
    facts = parse_sass(_run_tool("nvdisasm", "--print-code", "--no-dataflow", path))
    resources = parse_res_usage(_run_tool("cuobjdump", "-res-usage", path))
    return {name: dict(r, **facts.get(name, _no_sass())) for name, r in resources.items()}


def text_sections(elf: bytes) -> dict:
    """{section name: bytes} of an ELF64 file's code sections (.text.<function>): a cubin's machine code."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ValueError("not an ELF64 file")
    (shoff,), (shentsize, shnum, shstrndx) = struct.unpack_from("<Q", elf, 0x28), struct.unpack_from("<HHH", elf, 0x3A)
    # Section header: name, type, flags, addr, offset, size, link, info, addralign, entsize.
    headers = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]

    def name(at):
        return elf[names + at:elf.index(b"\0", names + at)].decode()

    return {name(h[0]): elf[h[4]:h[4] + h[5]] for h in headers if name(h[0]).startswith(".text.")}


def disassemble(arch: str, codes: list) -> list:
    """parse_sass's facts for each of `codes` (the raw machine code of one kernel each, all for `arch`, e.g.
    "sm_90a"), from one nvdisasm run over them all. nvdisasm takes about 0.3 s to start whatever it reads (most of
    a small kernel's time), so the report hands it its kernels of an architecture in a few batches instead of one
    cubin each: raw code (--binary) decodes to the same instructions as the cubin, its branch targets as addresses
    instead of labels, and with instructions of 16 bytes from sm_70 on, each kernel is the address range it was
    placed at."""
    starts = list(itertools.accumulate((len(c) for c in codes), initial=0))
    if any(len(c) % 16 or not c for c in codes):
        raise ValueError("a kernel's code is not a whole number of 16-byte instructions")
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp, "code.bin")
        blob.write_bytes(b"".join(codes))
        text = _run_tool("nvdisasm", "--binary", arch.replace("sm_", "SM"), "--print-code", "--no-dataflow", blob)
    lines, current = [], -1
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]+)\*/", line)
        if m:
            at = bisect.bisect_right(starts, int(m.group(1), 16)) - 1
            if at != current:  # a kernel's first instruction: parse_sass's heading for it
                lines.append(f".text.{at}:")
                current = at
        lines.append(line)
    facts = parse_sass("\n".join(lines))
    missing = [i for i in range(len(codes)) if str(i) not in facts]
    if missing:
        raise RuntimeError(f"nvdisasm printed no instructions of {len(missing)} of the {len(codes)} kernels")
    return [facts[str(i)] for i in range(len(codes))]


def problems(row: dict) -> list:
    """Why a kernel fails the report: a compile error, any local memory or spill, a warp-specialized build that is
    not, or an attention tile that should multiply on wgmma and does not (expects_wgmma)."""
    if row.get("error"):
        return [row["error"]]
    why = []
    if row["stack"] or row["local"]:
        why.append(f"local memory: {row['stack']} B stack, {row['local']} B local")
    if row.get("spill_bytes"):
        why.append(f"{row['spill_bytes']} B spilled")
    if row["ldl_stl"]:
        why.append(f"{row['ldl_stl']} local loads/stores (LDL/STL)")
    if row.get("warp_spec") and not row.get("ws"):
        why.append("WARP_SPEC set, but Triton did not warp-specialize the loop (no setmaxnreg in the SASS)")
    if row.get("wgmma_expected") and "HGMMA" not in row["mma"]:
        why.append("a 16-bit attention tile of 64 rows or more on sm_90a without wgmma (no HGMMA in the SASS: "
                   f"{'+'.join(sorted(row['mma'])) or 'no tensor-core instruction'} instead)")
    missing = [op for op, fact in (("UTMALDG", "tma"), ("USETMAXREG", "ws")) if not row.get(fact)]
    if row.get("ws_expected") and missing:
        why.append(f"written warp-specialized on TMA, but its SASS lacks the UTMALDG/USETMAXREG pair (no "
                   f"{' and no '.join(missing)})")
    if row.get("overlap_expected") and not row.get("overlap"):
        why.append("built to overlap the softmax with a wgmma in flight, but no exp2 runs while one may (ptxas "
                   "serialized the wgmma pipeline: see its C7513/C7517 notes)")
    if row.get("turns_expected") and not row.get("turns"):
        why.append("built for pingpong, but no turn holds a block's S and P·V HGMMAs between a BAR.SYNC and a "
                   f"BAR.ARV on the turn barriers {TURN_BARRIERS}")
    return why


# Hopper's wgmma multiplies 64 rows a warp group, so a 16-bit tl.dot whose tile has 64 rows or more should become
# HGMMA on sm_90a; Triton falls back to Ampere's mma.sync (HMMA) when a layout, a shape or a register budget keeps it
# from wgmma, at a fraction of the rate. Per attention kernel, the constexprs that set the rows of its dots' tiles
# (the dK/dV kernel's dots take either side of the score tile as M: K·Qᵀ, dSᵀ·Q, and with the atomic dQ, dS·K).
# Tiles under 64 rows (the short-query forward, decode's small query groups, head dim 256's small blocks) cannot
# use wgmma and are left alone.
WGMMA_TILE_ROWS = {"_attn_fwd_kernel": ("BLOCK_M",), "_attn_decode_kernel": ("BLOCK_M",),
                   "_attn_bwd_dq_kernel": ("BLOCK_M",), "_attn_bwd_dkdv_kernel": ("BLOCK_M", "BLOCK_N")}
WGMMA_MIN_ROWS = 64


def expects_wgmma(variant, cap: int) -> bool:
    """Whether the report requires HGMMA of this variant built for compute capability `cap` (WGMMA_TILE_ROWS)."""
    rows = WGMMA_TILE_ROWS.get(getattr(variant.fn, "__name__", ""))
    first_ptr = next((ty for ty in variant.signature.values() if ty.startswith("*")), "")
    return (rows is not None and cap >= 90 and first_ptr in ("*fp16", "*bf16")
            and max(variant.constexprs.get(n, 0) for n in rows) >= WGMMA_MIN_ROWS)


# ---------------------------------------------------------------------------------------------- Triton: recording
#
# The launchers are the specification of what ships. `recording()` replaces JITFunction.run (what `kernel[grid](...)`
# calls) with a recorder that binds the call exactly as Triton's JIT does (its own binder and `_pack_args`: the
# signature types, ints equal to 1 specialised as constexprs, the divisible-by-16 attributes of pointers and ints)
# and, instead of compiling and launching, keeps (kernel, signature, constexprs, attributes, launch options). Then
# the real launchers run on small CPU tensors over the call shapes of LAUNCHES, without Triton's interpreter, so
# they take their GPU configurations. They never read device values (no host syncs by design), so the garbage the
# outputs hold is never looked at.

CPU_SMS = 4  # what fastlm._util.num_sms answers for a CPU tensor: it sets a few programs-per-SM counts below


@dataclass(eq=False)
class Variant:
    """One compiled variant of a Triton kernel, as its launcher launches it: what `triton.compile` needs to build it
    without a GPU."""

    source: str  # the kernels module's file, e.g. "norm.py"
    fn: object  # the JITFunction
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "i64", "fp32", "constexpr")
    constexprs: dict  # argument name -> value, for every "constexpr" of the signature (ints of 1 included)
    attrs: dict  # {(argument position,): [["tt.divisibility", 16]], ...}: the JIT's specialisation attributes
    options: dict  # launch options the launcher passed: num_warps, num_stages
    name: str = ""

    @property
    def num_warps(self):
        return self.options.get("num_warps", 4)  # Triton's default

    @property
    def num_stages(self):
        return self.options.get("num_stages")

    def caps(self) -> tuple:
        """The compute capabilities this variant ships for: TRITON_CAPS, but a Hopper path (USE_TMA: tensor
        descriptors, chosen by its launcher on compute capability 9 and up) only for 90."""
        return tuple(c for c in TRITON_CAPS if c >= 90) if self.constexprs.get("USE_TMA") else TRITON_CAPS

    def aligned(self) -> tuple:
        """Arguments the JIT specialised as divisible by 16."""
        return tuple(self.fn.arg_names[path[0]] for path, attr in self.attrs.items()
                     if ["tt.divisibility", 16] in attr)

    def key(self) -> tuple:
        return (self.fn, tuple(self.signature.items()), repr(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())), repr(sorted(self.options.items())))

    def __reduce__(self):  # for the pool's workers: the kernel by reference (module and name), the rest as data
        return (_variant, (self.fn.module, self.fn.__name__, self.source, self.signature, self.constexprs, self.attrs,
                           self.options, self.name))


def _variant(module, fn_name, *rest):
    return Variant(rest[0], getattr(importlib.import_module(module), fn_name), *rest[1:])


# Launch options of JITFunction.run that are not kernel launch options (the JIT sets them itself).
_NOT_OPTIONS = ("debug", "instrumentation_mode")


@contextmanager
def recording(source: str = None):
    """Within it, `kernel[grid](*args, **kwargs)` of any @triton.jit kernel binds its arguments as the JIT does and
    appends a Variant to the yielded list instead of compiling and launching (duplicates kept once, in order)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("recording needs compiled @triton.jit functions: unset TRITON_INTERPRET before importing "
                           "the kernels")
    # The binder specialises the same way for every CUDA target (sm_80 and sm_90 alike).
    backend = make_backend(GPUTarget("cuda", TRITON_CAPS[-1], TRITON_WARP_SIZE))
    binders, found, seen = {}, [], set()

    def record(fn, *args, grid, warmup, **kwargs):
        binder = binders.get(fn)
        if binder is None:
            binder = binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
        bound_args, specialization, _ = binder(*args, **kwargs)
        _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, kwargs)
        names = fn.arg_names
        v = Variant(source or f"{fn.module.rsplit('.', 1)[-1]}.py", fn, signature,
                    {names[path[0]]: value for path, value in constexprs.items()}, attrs,
                    {k: val for k, val in kwargs.items() if k not in names and k not in _NOT_OPTIONS})
        if v.key() not in seen:
            seen.add(v.key())
            found.append(v)
        return None

    with unittest.mock.patch.object(JITFunction, "run", record):
        yield found


def _fmt_const(name, value):
    return name if value is True else f"{name}={value}"


def _extras(v: Variant) -> dict:
    """What else may tell two variants apart: {feature: its text in a name}."""
    out = {("ptr", n): f"{n}:{ty[1:]}" for n, ty in v.signature.items() if ty.startswith("*")}
    out.update({("type", n): f"{n}:{ty}" for n, ty in v.signature.items() if ty[0] in "iu"})
    aligned = set(v.aligned())
    out.update({("div", n): f"{n}%16" for n, ty in v.signature.items() if ty[0] in "*iu" and n not in aligned})
    out.update({("opt", k): f"{k}={val}" for k, val in v.options.items()})
    return out


def name_variants(variants: list) -> None:
    """Name each variant: its kernel, the dtype of its first pointer, and the constexprs that differ between the
    variants of that kernel (a flag by its name when on; an int the JIT specialised as 1 as name=1). Variants that
    this leaves alike get what tells them apart: other pointers' dtypes (X:bf16), int types (n:i64), arguments
    not divisible by 16 (n%16), launch options (num_stages=3)."""
    by_fn = {}
    for v in variants:
        by_fn.setdefault(v.fn, []).append(v)
    for fn, group in by_fn.items():
        base = re.sub(r"_kernel$", "", fn.__name__.lstrip("_"))
        consts = [{n: val for n, val in v.constexprs.items()} for v in group]
        varying = [n for n in fn.arg_names if len({repr(c.get(n, "-")) for c in consts}) > 1]
        first_ptr = next((n for n, ty in group[0].signature.items() if ty.startswith("*")), None)
        alike = {}
        for v, c in zip(group, consts):
            parts = [v.signature[first_ptr][1:]] if first_ptr and v.signature[first_ptr].startswith("*") else []
            parts += [_fmt_const(n, c[n]) for n in varying if n in c and c[n] is not False]
            alike.setdefault(", ".join(parts), []).append(v)
        for head, same in alike.items():
            extras = [_extras(v) for v in same]
            keys = list(dict.fromkeys(k for e in extras for k in e))
            differ = [k for k in keys if len({e.get(k, "") for e in extras}) > 1]
            for i, (v, e) in enumerate(zip(same, extras)):
                parts = [head] if head else []
                parts += [e[k] for k in differ if k in e]
                v.name = f"{base}[{', '.join(parts)}]"
            taken = {}
            for v in same:  # alike in everything named: numbered (not expected)
                taken[v.name] = taken.get(v.name, 0) + 1
                if taken[v.name] > 1:
                    v.name += f" #{taken[v.name]}"


# ---------------------------------------------------------------------------------------------- Triton: call shapes
#
# Per kernels module, the launcher calls whose launches the report compiles: chosen so that every entry of the
# module's launch tables is launched, each kernel with its options off and on, with realistic layouts (contiguous
# tensors, or the views the ops take: strided gate/up halves, packed varlen), so the JIT types every argument as it
# would on the GPU. Small sizes: nothing is computed, only bound.


def _launch_norm(found: list) -> None:
    import torch

    from fastlm.kernels import norm as K

    M = 1000  # rows: ≥ 2 programs for every block shape, not a multiple of 16 (a token count need not be)
    widest = max(K.MAX_FUSED_N, *K.BWD_MAX_FUSED_N.values())
    widths = [1 << k for k in range(widest.bit_length())] + [2 * widest]  # each fused block, then the chunked path
    # bf16 with an fp32 weight (mixed-precision training), fp32; and a bf16 weight for the Σ kernel's bf16 output.
    for xdt, wdt, ns in ((torch.bfloat16, torch.float32, widths), (torch.float32, torch.float32, widths),
                         (torch.bfloat16, torch.bfloat16, [K.SUM_BLOCK_N])):
        for is_rms in (False, True):
            for n in ns:
                x, res, dy, dres = (torch.empty(M, n, dtype=xdt) for _ in range(4))
                w = torch.empty(n, dtype=wdt)
                b = None if is_rms else torch.empty(n, dtype=wdt)
                _, res_out, mean, rstd = K.norm_fwd(x, w, b, res, 1e-5, is_rms, 0.0)
                K.norm_bwd(dy, res_out, w, mean, rstd, dres, is_rms, 0.0, True, not is_rms)


def _launch_cross_entropy(found: list) -> None:
    import torch

    from fastlm.kernels import cross_entropy as K

    rows, V = 64, 1024
    weight = torch.empty(V, dtype=torch.float32)
    for dt in (torch.bfloat16, torch.float32):
        logits = torch.empty(rows, V, dtype=dt)
        target = torch.empty(rows, dtype=torch.int64)
        loss, row_max, log_s, sc, grad = K.cross_entropy_fwd(logits, target, weight, -100, 0.1, 1e-4, 30.0, "mean",
                                                             True)
        K.cross_entropy_fwd(logits, target, None, -100, 0.1, 1e-4, 30.0, "mean", True)  # OWN_SCALARS: the count
        K.cross_entropy_bwd(logits, target, weight, sc, row_max, log_s, torch.empty(rows), -100, 0.1, 1e-4, 30.0)
        K.scale_grad(grad, torch.empty(1))
        for mean in (True, False):
            K.reduce_loss(loss, sc, mean)
    for idx in (torch.int64, torch.int32):
        for w in (weight, None):
            K.scalars(torch.empty(rows, dtype=idx), w, V, -100, "mean")


def attention_call(dtype, head_dim: int, kind: str, rows: int = None, atomic_dq: bool = False) -> None:
    """One attention call of the report's, forward (and backward where the kind has one) on CPU tensors:
    - "causal": dense (2, 64) causal, 4 query heads over 2 kv heads, forward and backward;
    - "dense", "dense window": the same without a mask, and with a window on both sides and a softcap (the
      warp-specialized paths' other flag sets); "window": a window on both sides without a softcap;
    - "all": packed varlen (40 + 24 tokens), a window on both sides and a softcap, backward with dlse;
    - "decode", "decode all": 16 query positions (5 q heads a kv head: too many rows for split-KV), dense causal
      and varlen with every option, forward;
    - "splitkv", "splitkv all", "splitkv all one": the split-KV decode kernel for a kv head's `rows` query rows,
      dense causal and varlen with every option over 600+ keys (several splits), and varlen over a few keys (one).
    atomic_dq: the backward's dK/dV kernel adds dQ atomically (DQ_ATOMIC) and no dQ kernel runs."""
    import torch

    from fastlm.kernels import attention as K

    group = 2
    wl, wr, softcap, varlen, backward = None, 0, None, kind.endswith(("all", "all one")), False
    if varlen:
        wl, wr, softcap = 8, 4, 30.0
    if kind == "causal":
        q_lens = k_lens = [64, 64]
        backward = True
    elif kind in ("dense", "dense window", "window"):
        q_lens = k_lens = [64, 64]
        backward = True
        if kind != "dense":
            wl, wr, softcap = 8, 4, (30.0 if kind == "dense window" else None)
        else:
            wr = None
    elif kind == "all":
        q_lens = k_lens = [40, 24]
        backward = True
    elif kind == "decode":
        q_lens, k_lens, group = [16, 16], [64, 64], 5
    elif kind == "decode all":
        q_lens, k_lens, group = [14, 2], [64, 48], 5
    elif kind.startswith("splitkv"):
        seqlen_q, group = (1, rows) if rows < 16 else (rows // 2, 2)
        q_lens = [seqlen_q] * (1 if kind == "splitkv" else 2)
        k_lens = [64, 48] if kind.endswith("one") else [640] * len(q_lens)
        if kind == "splitkv all":
            wl = 600
    else:
        raise ValueError(kind)
    Hk = 2
    Hq = Hk * group
    if varlen:
        cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32) for lens in (q_lens, k_lens))
        q = torch.empty(sum(q_lens), Hq, head_dim, dtype=dtype)
        k, v = (torch.empty(sum(k_lens), Hk, head_dim, dtype=dtype) for _ in range(2))
        extra = (cu_q, cu_k, max(q_lens), max(k_lens))
    else:
        q = torch.empty(len(q_lens), q_lens[0], Hq, head_dim, dtype=dtype)
        k, v = (torch.empty(len(k_lens), k_lens[0], Hk, head_dim, dtype=dtype) for _ in range(2))
        extra = (None, None, None, None)
    scale = head_dim ** -0.5
    out, lse = K.attention_fwd(q, k, v, *extra, scale, wl, wr, softcap)
    if backward:
        dlse = torch.empty_like(lse) if varlen else None
        saved, K.DQ_ATOMIC = K.DQ_ATOMIC, atomic_dq
        try:
            K.attention_bwd(torch.empty_like(out), q, k, v, out, lse, dlse, *extra, scale, wl, wr, softcap,
                            deterministic=not atomic_dq)
        finally:
            K.DQ_ATOMIC = saved


def _launch_attention(found: list) -> None:
    import torch

    from fastlm.kernels import attention as K

    for fp32 in (False, True):
        dtype = torch.float32 if fp32 else torch.bfloat16
        for head_dim in K.FWD_CONFIGS[fp32]:
            for kind in ("causal", "all"):
                attention_call(dtype, head_dim, kind)
                attention_call(dtype, head_dim, kind, atomic_dq=True)  # the dK/dV kernel with the atomic dQ
            if fp32:
                continue  # the short-query and split-KV paths are 16-bit only
            if K.block_d(head_dim) in {**K.DKDV_TMA_CONFIGS, **K.FWD_TMA_CONFIGS, **K.DQ_TMA_CONFIGS}:  # Hopper paths
                saved = K.TMA
                # Every Hopper path (dense calls warp-specialized where FWD_WS_CONFIGS / DKDV_WS_CONFIGS have
                # the head dim), then the dense calls' plain Hopper paths.
                no_ws = {"fwd": True, "dkdv": True, "dq": True, "fwd_ws": False, "dkdv_ws": False}
                try:
                    for tma, kinds in ((True, ("causal", "all", "dense", "dense window")), (no_ws, ("causal",))):
                        K.TMA = tma
                        for kind in kinds:
                            attention_call(dtype, head_dim, kind)
                    K.TMA = no_ws  # the Hopper dK/dV path with the atomic dQ
                    # A DKDV_ATOMIC_TMA_DENSE_ONLY entry's calls: dense without a softcap, a window on both sides
                    # its widest flag set (its "all" call keeps the three-kernel backward).
                    dense_only = K.block_d(head_dim) in K.DKDV_ATOMIC_TMA_DENSE_ONLY
                    for kind in ("causal", "all", *(("dense", "window") if dense_only else ())):
                        attention_call(dtype, head_dim, kind, atomic_dq=True)
                finally:
                    K.TMA = saved
            for kind in ("decode", "decode all"):
                attention_call(dtype, head_dim, kind)
            for block_m in K.DECODE_CONFIGS[K.block_d(head_dim)]:
                # A tile of block_m rows (4 for 16: one query position, as in token-by-token decoding; and 16,
                # speculative decoding's few positions), several splits and one.
                for rows in ((4, block_m) if block_m == 16 else (block_m,)):
                    for kind in ("splitkv", "splitkv all", "splitkv all one"):
                        attention_call(dtype, head_dim, kind, rows)


def _launch_gated(found: list) -> None:
    import torch

    from fastlm.kernels import gated as K

    M = 24
    widths = [1 << k for k in range(K.MIN_BLOCK_N.bit_length() - 1, K.TILE.bit_length())] + [2 * K.TILE]
    for dt in (torch.bfloat16, torch.float32):
        for act in K.ACTIVATIONS:
            # The halves of a fused gate-up projection (row stride 2N): each row width's tile; then contiguous
            # operands, which the launcher views as one row.
            halves = [torch.empty(M, 2 * n, dtype=dt) for n in widths]
            pairs = [(b[:, :n], b[:, n:]) for b, n in zip(halves, widths)]
            pairs.append((torch.empty(M, K.TILE, dtype=dt), torch.empty(M, K.TILE, dtype=dt)))
            for gate, up in pairs:
                K.gated_fwd(gate, up, act)
                K.gated_bwd(torch.empty(gate.shape, dtype=dt), gate, up, act)


def _launch_rotary(found: list) -> None:
    import torch

    from fastlm.kernels import rotary as K

    for xdt, cdt in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32)):
        for interleaved in (False, True):
            for k in range(K.MIN_BLOCK_HALF.bit_length() - 1, (K.MAX_ROT // 2).bit_length()):
                rot = 2 << k  # every rotation tile; head dim 64 (a pass-through part) or the rotation
                x = torch.empty(2, 16, 4, max(rot, 64), dtype=xdt)
                cos, sin = (torch.empty(16, rot, dtype=cdt) for _ in range(2))
                K.rotary_fwd(x, cos, sin, interleaved, False)
                K.rotary_bwd(x, cos, sin, interleaved, False)


LAUNCHES = {"attention.py": _launch_attention, "cross_entropy.py": _launch_cross_entropy, "gated.py": _launch_gated,
            "norm.py": _launch_norm, "rotary.py": _launch_rotary}


def record(launch, source: str = None) -> list:
    """The variants `launch(found)` launches (named)."""
    with recording(source) as found:
        launch(found)
    name_variants(found)
    return found


@functools.lru_cache(maxsize=None)
def _all_variants() -> tuple:
    variants = []
    for source, launch in LAUNCHES.items():
        variants += record(launch, source)
    return tuple(variants)


def triton_variants(pattern: str = None) -> list:
    """Every variant the launchers launch over LAUNCHES's calls, named; with `pattern`, those whose name matches."""
    return [v for v in _all_variants() if pattern is None or re.search(pattern, v.name)]


def compile_triton(variant: Variant, cap: int, disassembled: bool = True) -> dict:
    """Compile one variant for one architecture and read its cubin (runs in a pool worker). With disassembled=False
    the row carries the kernel's machine code ("code") in place of its SASS facts, for `run` to disassemble with
    the others (disassemble_rows)."""
    return compile_variant(variant, cap, disassembled=disassembled)


def compile_cubin(variant: Variant, cap: int):
    """triton.compile's kernel (its .asm["cubin"], .metadata) of a Variant for compute capability `cap`: no GPU
    needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=variant.fn, signature=variant.signature, constexprs=variant.constexprs, attrs=variant.attrs)
    return triton.compile(src, target=GPUTarget("cuda", cap, TRITON_WARP_SIZE), options=dict(variant.options))


def compile_variant(variant: Variant, cap: int, source: str = None, disassembled: bool = True) -> dict:
    """Compile a Variant for compute capability `cap` (compile_cubin) and read its cubin: one row of the report
    (registers, shared and local memory, spills, load widths, tensor-core instructions)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    row = {"source": source or variant.source, "kernel": variant.name, "arch": sm_arch_from_capability(cap),
           "warp_spec": bool(variant.constexprs.get("WARP_SPEC")), "wgmma_expected": expects_wgmma(variant, cap)}
    start = time.perf_counter()
    try:
        compiled = compile_cubin(variant, cap)
        found = resource_usage(compiled.asm["cubin"])
        if len(found) != 1:
            raise RuntimeError(f"expected one kernel in the cubin, found {sorted(found)}")
        (name, facts), = found.items()
        code = text_sections(compiled.asm["cubin"]).get(f".text.{name}")
        if code is None:
            raise RuntimeError(f"the cubin has no .text.{name} section")
        # Triton's shared memory is dynamic, so the cubin's static SHARED misses it; the compiler's metadata has it.
        facts["shared"] = max(facts["shared"], int(compiled.metadata.shared))
        row.update(facts, warps=variant.num_warps)
        if disassembled:
            row.update(disassemble(row["arch"], [code])[0])
        else:
            row["code"] = code
    except Exception as e:  # noqa: BLE001 - a compile error is a result of the report, named in its table
        row["error"] = _error(e)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]


DISASSEMBLY_BATCH_BYTES = 2 << 20  # of machine code a disassembly job: ~0.3 s of nvdisasm's start to ~2 s of work


def disassemble_rows(pool, rows: list) -> None:
    """Give the rows that carry their kernel's code (compile_triton(..., disassembled=False)) their SASS facts:
    per architecture, in batches of about DISASSEMBLY_BATCH_BYTES of code, disassembled in the pool. A batch
    nvdisasm fails on fails each of its rows."""
    batches = []
    for arch in sorted({r["arch"] for r in rows if "code" in r}):
        batch, size = [], 0
        for r in (r for r in rows if "code" in r and r["arch"] == arch):
            batch.append(r)
            size += len(r["code"])
            if size >= DISASSEMBLY_BATCH_BYTES:
                batches.append(batch)
                batch, size = [], 0
        batches += [batch] if batch else []
    futures = [(batch, pool.submit(disassemble, batch[0]["arch"], [r.pop("code") for r in batch]))
               for batch in batches]
    for batch, future in futures:
        try:
            facts = future.result()
        except Exception as e:  # noqa: BLE001 - named in the table, as a compile error is
            for r in batch:
                r["error"] = _error(e)
            continue
        for r, f in zip(batch, facts):
            r.update(f)


# ---------------------------------------------------------------------------------------------- CUDA C++


def setup_build() -> dict:
    """nvcc, its flags and the architectures, as setup.py builds fastlm._C.

    setup.py runs setup() when executed, so it is executed here with setuptools.setup stubbed out, and its own
    `ninja_file` writes the build rules, from which the compile flags are read: the report compiles with exactly
    what the build uses."""
    import setuptools

    with unittest.mock.patch.object(setuptools, "setup", lambda **kwargs: None):
        ns = runpy.run_path(str(REPO / "setup.py"), run_name="fastlm_setup")
    nvcc = ns["find_nvcc"]()
    archs = os.environ.get("FASTLM_CUDA_ARCHS", ns["DEFAULT_ARCHS"]).split()
    if nvcc is None:
        return {"nvcc": None, "archs": archs, "cflags": []}
    with tempfile.TemporaryDirectory() as tmp:
        rules = ns["ninja_file"](nvcc, tmp, str(Path(tmp, "_C.so")), archs)
    m = re.search(r"^cflags = (.*)$", rules, flags=re.M)
    if not m:
        raise RuntimeError("setup.py's ninja_file no longer writes a `cflags = ...` line; update setup_build()")
    return {"nvcc": nvcc, "archs": archs, "cflags": shlex.split(m.group(1))}


def demangle(names) -> dict:
    """Mangled -> readable, shortened: no return type, no parameter list."""
    names = list(names)
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    readable = names
    if tool and names:
        proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
        if proc.returncode == 0 and len(proc.stdout.splitlines()) == len(names):
            readable = proc.stdout.splitlines()
    return {m: _shorten(r) for m, r in zip(names, readable)}


# Spellings shortened in CUDA kernel names, so that the template arguments that tell the variants apart fit.
SHORT_NAMES = ((r"\b__nv_bfloat16\b", "bf16"), (r"\b__half\b", "fp16"), (r"\bfloat\b", "fp32"),
               (r"\bfastlm::", ""), (r"\(anonymous namespace\)::", ""))


def _shorten(name: str) -> str:
    name = re.sub(r"^void ", "", name)
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    for pattern, short in SHORT_NAMES:
        name = re.sub(pattern, short, name)
    return name if len(name) <= NAME_WIDTH else name[: NAME_WIDTH - 1] + "…"


# The CUDA C++ kernels written on wgmma: their sm_90a builds must hold HGMMA (a build that lost it, by a guard or
# an architecture macro, would run the kernel's trap instead).
CUDA_WGMMA_KERNELS = ("attn_fwd_wgmma_kernel", "attn_fwd_ws_kernel", "attn_bwd_dkdv_wgmma_kernel",
                      "attn_bwd_dq_wgmma_kernel")
# Of those, the variants whose softmax must run while a product is in flight (parse_sass's `overlap`): the forward
# with its last template argument, kOverlap, true, and the warp-specialized forward.
CUDA_OVERLAP_KERNELS = re.compile(r"\battn_fwd_wgmma_kernel<[^<>]*, true>|\battn_fwd_ws_kernel\b")
# The warp-specialized kernels: their sm_90a builds must load by TMA (UTMALDG) and move registers between warp
# groups (USETMAXREG), or they are not what they were written to be.
CUDA_WS_KERNELS = ("attn_fwd_ws_kernel",)
# Of those, the pingpong builds (kPingpong, the last template argument): their products issued within a turn
# (parse_sass's `turns`).
CUDA_PINGPONG_KERNELS = re.compile(r"\battn_fwd_ws_kernel<[^<>]*, true>")


def _cuda_rows(base: dict, found: dict, spills: dict, seconds: float) -> list:
    names = demangle(found)
    hopper = base["arch"] == "sm_90a"
    return [dict(base, kernel=names[k], spill_bytes=spills.get(k), seconds=seconds,
                 wgmma_expected=hopper and any(w in names[k] for w in CUDA_WGMMA_KERNELS),
                 overlap_expected=hopper and bool(CUDA_OVERLAP_KERNELS.search(names[k])),
                 ws_expected=hopper and any(w in names[k] for w in CUDA_WS_KERNELS),
                 turns_expected=hopper and bool(CUDA_PINGPONG_KERNELS.search(names[k])), **facts)
            for k, facts in sorted(found.items())]


def compile_cuda(source: str, arch: str, nvcc: str, cflags: list) -> list:
    """Compile one .cu for one architecture to a cubin and read every kernel in it (runs in a pool worker)."""
    start = time.perf_counter()
    base = {"source": Path(source).name, "arch": f"sm_{arch}"}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "out.cubin")
        cmd = [nvcc, *cflags, "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-cubin", "-Xptxas", "-v",
               source, "-o", str(cubin)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "error" in ln.lower()]
            return [dict(base, kernel="(compile)", error=" | ".join(lines[:3])[:400] or proc.stderr.strip()[:400],
                         seconds=round(time.perf_counter() - start, 2))]
        spills = parse_ptxas_spills(proc.stderr + proc.stdout)
        found = inspect_cubin(cubin)
    return _cuda_rows(base, found, spills, round(time.perf_counter() - start, 2))


def read_cuda_object(source: str, obj: str, archs: list) -> list:
    """Read every kernel, for every shipped architecture, from the object setup.py's build made of one .cu (runs
    in a pool worker). ptxas's spill counts are not in an object; its LDL/STL and stack show spills instead."""
    start = time.perf_counter()
    found = inspect_binary(Path(obj))
    rows = []
    for arch in archs:
        base = {"source": Path(source).name, "arch": f"sm_{arch}"}
        if f"sm_{arch}" not in found:
            rows.append(dict(base, kernel="(build)", error=f"{Path(obj).name} holds no sm_{arch} code "
                             f"(it has {sorted(a for a in found if a)})"))
            continue
        rows += _cuda_rows(base, found[f"sm_{arch}"], {}, round(time.perf_counter() - start, 2))
    return rows


def fresh_build_object(source: Path):
    """The object setup.py's ninja build made of `source`, if it is newer than everything in csrc/ and setup.py
    (so it was built from these sources with these flags); else None."""
    obj = BUILD_DIR / f"{source.name}.o"
    if not obj.exists():
        return None
    inputs = [p for p in CSRC.iterdir() if p.is_file()] + [REPO / "setup.py"]
    return obj if obj.stat().st_mtime >= max(p.stat().st_mtime for p in inputs) else None


# ---------------------------------------------------------------------------------------------- report


def _fmt_row(row: dict) -> list:
    if row.get("error"):
        return [row["source"], row["kernel"], row["arch"]] + [""] * 8 + ["FAIL"]
    mma = "+".join(sorted(row["mma"])) or "-"
    if row.get("tma"):
        mma += (" (TMA, WS, PP)" if row.get("turns") else " (TMA, WS)") if row.get("ws") else " (TMA)"
    local = row["stack"] + row["local"]
    spill = str(row["ldl_stl"]) + (f" / {row['spill_bytes']} B" if row.get("spill_bytes") else "")
    return [row["source"], row["kernel"], row["arch"], str(row.get("warps", "")), str(row["regs"]),
            str(row["shared"]), str(local), spill, str(row["ld"] or "-"), str(row["st"] or "-"), mma,
            "FAIL" if problems(row) else "ok"]


def table(rows: list) -> str:
    head = ["source", "kernel", "arch", "warps", "regs", "smem B", "local B", "LDL/STL", "ld bits", "st bits",
            "tensor cores", ""]
    body = [_fmt_row(r) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = "  ".join
    out = [line(h.ljust(w) for h, w in zip(head, widths)), line("-" * w for w in widths)]
    out += [line(str(c).ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(out)


def collect_jobs(pattern: str = None, recompile_cuda: bool = False) -> tuple:
    """([(worker function, args)], notes): what to compile or read, after the optional name filter."""
    jobs, notes = [], []
    sources = [s for s in sorted(CSRC.glob("*.cu")) if pattern is None or re.search(pattern, s.name)]
    build = setup_build() if sources else None
    for source in sources:
        obj = None if recompile_cuda else fresh_build_object(source)
        if obj is not None:
            jobs.append((read_cuda_object, (str(source), str(obj), build["archs"])))
            notes.append(f"{source.name}: read from {obj.relative_to(REPO)}, setup.py's build of the current sources "
                         "(--recompile-cuda compiles it here instead, with ptxas's spill counts)")
        elif build["nvcc"] is None:
            notes.append(f"{source.name}: not compiled: no nvcc (setup.py's find_nvcc) and no fresh build object")
        else:
            jobs += [(compile_cuda, (str(source), a, build["nvcc"], build["cflags"])) for a in build["archs"]]
            notes.append(f"{source.name}: compiled here by nvcc with setup.py's flags (no build object newer than "
                         "csrc/ and setup.py)")
    for variant in triton_variants(pattern):
        jobs += [(compile_triton, (variant, cap, False)) for cap in variant.caps()]
    return jobs, notes


def run(jobs: int = None, pattern: str = None, recompile_cuda: bool = False) -> tuple:
    """Compile and inspect everything; returns (rows, notes)."""
    work, notes = collect_jobs(pattern, recompile_cuda)
    rows = []
    context = multiprocessing.get_context("spawn")  # fresh workers: no torch or CUDA state inherited by fork
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1, mp_context=context) as pool:
        # The CUDA jobs come first: each is one long nvcc or cuobjdump run, the Triton ones are many short ones.
        for future in [pool.submit(fn, *args) for fn, args in work]:
            result = future.result()
            rows += result if isinstance(result, list) else [result]
        disassemble_rows(pool, rows)
    rows.sort(key=lambda r: (r["source"].endswith(".py"), r["source"], r["kernel"], r["arch"]))
    return rows, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, help="worker processes (default: os.cpu_count())")
    parser.add_argument("--filter", help="only kernels (Triton variant names) or .cu files matching this regex")
    parser.add_argument("--list", action="store_true", help="list the Triton variants (source, name, warps, stages, "
                        "arguments not divisible by 16) without compiling anything")
    parser.add_argument("--recompile-cuda", action="store_true",
                        help="compile csrc/*.cu with nvcc even where setup.py's build objects are up to date")
    args = parser.parse_args(argv)
    # Under Triton's interpreter @triton.jit makes functions that cannot be compiled; the pool's workers inherit this.
    os.environ["TRITON_INTERPRET"] = "0"
    if args.list:
        variants = triton_variants(args.filter)
        for v in variants:
            unaligned = [n for n, ty in v.signature.items() if ty[0] in "*iu" and n not in v.aligned()]
            print(f"{v.source}  {v.name}  warps {v.num_warps}, stages {v.num_stages or 'default'}, "
                  f"not divisible by 16: {', '.join(unaligned) or '-'}")
        print(f"{len(variants)} Triton variants")
        return 0
    start = time.perf_counter()
    rows, notes = run(args.jobs, args.filter, args.recompile_cuda)
    print(table(rows))
    for note in notes:
        print(f"note: {note}")
    failing = [(r, problems(r)) for r in rows if problems(r)]
    print(f"\n{len(rows)} kernel builds ({sum(r['source'].endswith('.py') for r in rows)} Triton, "
          f"{sum(r['source'].endswith('.cu') for r in rows)} CUDA C++) in {time.perf_counter() - start:.0f} s; "
          f"{len(failing)} failing")
    wanted = [r for r in rows if r.get("wgmma_expected")]
    print(f"wgmma: {sum('HGMMA' in r.get('mma', ()) for r in wanted)} of the {len(wanted)} sm_90a attention builds "
          f"with tiles of {WGMMA_MIN_ROWS} rows or more have HGMMA")
    wanted = [r for r in rows if r.get("overlap_expected")]
    print(f"overlap: {sum(bool(r.get('overlap')) for r in wanted)} of the {len(wanted)} wgmma builds made to overlap "
          "their softmax with a product in flight do")
    wanted = [r for r in rows if r.get("turns_expected")]
    print(f"pingpong: {sum(bool(r.get('turns')) for r in wanted)} of the {len(wanted)} pingpong builds issue their "
          "products within a turn")
    for r, why in failing:
        print(f"FAIL {r['source']} {r['kernel']} {r['arch']}: {'; '.join(why)}")
    return 1 if failing or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
