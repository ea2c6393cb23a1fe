"""`python -m benchmarks.static`: the static kernel report, the one performance signal there is without a GPU.

It compiles every kernel fastlm ships, for every architecture it ships for, on a machine with no GPU, and reads
the machine code:
- Triton: every `KernelSpec` that a module of fastlm.kernels lists in `static_specs()` (each variant its launchers
  may launch), through `triton.compile` with a `GPUTarget` for sm_80 and sm_90 (which Triton builds as sm_90a),
  with the divisible-by-16 specialisation the JIT would give the spec's aligned arguments.
- CUDA C++: every csrc/*.cu for every architecture setup.py builds. Where setup.py's build object of the source
  is newer than csrc/ and setup.py (CI builds before the report runs), that object is read: it is exactly what
  ships, and nvcc takes minutes on these templates. Otherwise nvcc compiles it here with setup.py's own flags,
  one cubin per architecture, and `ptxas -v` adds the spill bytes.
Then `cuobjdump -res-usage -sass` gives registers, shared memory and local memory (stack frame and local arrays)
per kernel, and the SASS the widest global load and store, local loads and stores (spills), and tensor-core
instructions (HMMA; HGMMA is Hopper's wgmma).

It prints one table and exits non-zero when any kernel fails to compile or uses local memory in a shipped config
(stack or local bytes, spill bytes, or LDL/STL instructions), naming each one. Compiles run in a process pool of
os.cpu_count() workers; it runs in CI after the tests.
"""

import argparse
import functools
import importlib
import multiprocessing
import os
import pkgutil
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import unittest.mock
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRITON_CAPS = (80, 90)  # compute capabilities the Triton kernels are compiled for; 90 builds sm_90a
TRITON_WARP_SIZE = 32
KERNEL_PACKAGE = "fastlm.kernels"
CSRC = REPO / "csrc"
BUILD_DIR = REPO / "build" / "cuda"  # where setup.py's ninja build leaves one object per source, <name>.o
NAME_WIDTH = 64  # kernel names longer than this are shortened in the table

TENSOR_CORE_OPS = ("HGMMA", "QGMMA", "IGMMA", "HMMA", "IMMA")
# Width in bits of a global load or store, by the SASS suffix that sets it; no suffix is 32 bits.
WIDTH_SUFFIXES = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


# ---------------------------------------------------------------------------------------------- reading cubins


def cuobjdump() -> str:
    """cuobjdump from the CUDA toolkit, else the copy that ships inside Triton."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", "cuobjdump").exists():
        return str(Path(home, "bin", "cuobjdump"))
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("cuobjdump")
    if found:
        return found
    raise FileNotFoundError("cuobjdump: not in $CUDA_HOME/bin, in triton's backends/nvidia/bin, or on PATH")


def _width(suffixes: str) -> int:
    for part in suffixes.split("."):
        if part in WIDTH_SUFFIXES:
            return WIDTH_SUFFIXES[part]
    return 32


def parse_sass(text: str) -> dict:
    """Per kernel: widest global load and store (bits), local loads/stores, tensor-core ops, bulk tensor loads."""
    kernels, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), {"ld": 0, "st": 0, "ldl_stl": 0, "mma": set(), "tma": False})
            continue
        if current is None:
            continue
        for op, suffixes in re.findall(r"\b(LDGSTS|LDG|STG)((?:\.[A-Z0-9_]+)*)", line):
            key = "st" if op == "STG" else "ld"
            current[key] = max(current[key], _width(suffixes))
        current["ldl_stl"] += len(re.findall(r"\b(?:LDL|STL)\b", line))
        current["mma"].update(op for op in TENSOR_CORE_OPS if re.search(rf"\b{op}\b", line))
        current["tma"] |= bool(re.search(r"\bUTMALDG\b", line))
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
        empty = {"ld": 0, "st": 0, "ldl_stl": 0, "mma": set(), "tma": False}
        out[arch] = {name: dict(res, **sass.get(name, empty)) for name, res in parse_res_usage(text).items()}
    return out


def problems(row: dict) -> list:
    """Why a kernel fails the report: a compile error, or any local memory or spill."""
    if row.get("error"):
        return [row["error"]]
    why = []
    if row["stack"] or row["local"]:
        why.append(f"local memory: {row['stack']} B stack, {row['local']} B local")
    if row.get("spill_bytes"):
        why.append(f"{row['spill_bytes']} B spilled")
    if row["ldl_stl"]:
        why.append(f"{row['ldl_stl']} local loads/stores (LDL/STL)")
    return why


# ---------------------------------------------------------------------------------------------- Triton


def kernel_modules() -> list:
    """Names of the modules of fastlm.kernels that list their variants (`static_specs`)."""
    package = importlib.import_module(KERNEL_PACKAGE)
    names = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
        if hasattr(module, "static_specs"):
            names.append(module.__name__)
    return names


@functools.lru_cache(maxsize=None)
def _specs(module_name: str) -> list:
    return importlib.import_module(module_name).static_specs()


def divisibility_attrs(spec) -> dict:
    """The JIT's encoding of "this argument is divisible by 16" (triton 3.6: BaseBackend.parse_attr of the "D"
    specialisation), keyed by the argument's position."""
    names = spec.fn.arg_names
    unknown = [a for a in spec.divisible_by_16 if a not in names]
    if unknown:
        raise ValueError(f"divisible_by_16 names arguments the kernel does not have: {unknown}")
    return {(names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible_by_16}


def compile_triton(module_name: str, index: int, cap: int) -> dict:
    """Compile one spec for one architecture and read its cubin (runs in a pool worker)."""
    return compile_spec(_specs(module_name)[index], cap, module_name.rsplit(".", 1)[-1] + ".py")


def compile_spec(spec, cap: int, source: str) -> dict:
    """Compile a KernelSpec for compute capability `cap` with triton.compile (no GPU needed) and read its cubin:
    one row of the report (registers, shared and local memory, spills, load widths, tensor-core instructions)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler import ASTSource

    row = {"source": source, "kernel": spec.name, "arch": sm_arch_from_capability(cap)}
    start = time.perf_counter()
    try:
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                        attrs=divisibility_attrs(spec))
        options = {"num_warps": spec.num_warps}
        # Pipelined kernels (attention) set their software-pipelining depth; others leave Triton's default.
        if getattr(spec, "num_stages", None) is not None:
            options["num_stages"] = spec.num_stages
        compiled = triton.compile(src, target=GPUTarget("cuda", cap, TRITON_WARP_SIZE), options=options)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp, "kernel.cubin")
            cubin.write_bytes(compiled.asm["cubin"])
            found = inspect_binary(cubin)[None]
        if len(found) != 1:
            raise RuntimeError(f"expected one kernel in the cubin, found {sorted(found)}")
        facts = next(iter(found.values()))
        # Triton's shared memory is dynamic, so the cubin's static SHARED misses it; the compiler's metadata has it.
        facts["shared"] = max(facts["shared"], int(compiled.metadata.shared))
        row.update(facts, warps=spec.num_warps)
    except Exception as e:  # noqa: BLE001 - a compile error is a result of the report, named in its table
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


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


def _cuda_rows(base: dict, found: dict, spills: dict, seconds: float) -> list:
    names = demangle(found)
    return [dict(base, kernel=names[k], spill_bytes=spills.get(k), seconds=seconds, **facts)
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
        found = inspect_binary(cubin)[None]
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
        mma += " (TMA)"
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
    for module_name in kernel_modules():
        for i, spec in enumerate(_specs(module_name)):
            if pattern is None or re.search(pattern, spec.name):
                jobs += [(compile_triton, (module_name, i, cap)) for cap in TRITON_CAPS]
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
    rows.sort(key=lambda r: (r["source"].endswith(".py"), r["source"], r["kernel"], r["arch"]))
    return rows, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, help="worker processes (default: os.cpu_count())")
    parser.add_argument("--filter", help="only kernels (Triton spec names) or .cu files matching this regex")
    parser.add_argument("--recompile-cuda", action="store_true",
                        help="compile csrc/*.cu with nvcc even where setup.py's build objects are up to date")
    args = parser.parse_args(argv)
    # Under Triton's interpreter @triton.jit makes functions that cannot be compiled; the pool's workers inherit this.
    os.environ["TRITON_INTERPRET"] = "0"
    start = time.perf_counter()
    rows, notes = run(args.jobs, args.filter, args.recompile_cuda)
    print(table(rows))
    for note in notes:
        print(f"note: {note}")
    failing = [(r, problems(r)) for r in rows if problems(r)]
    print(f"\n{len(rows)} kernel builds ({sum(r['source'].endswith('.py') for r in rows)} Triton, "
          f"{sum(r['source'].endswith('.cu') for r in rows)} CUDA C++) in {time.perf_counter() - start:.0f} s; "
          f"{len(failing)} failing")
    for r, why in failing:
        print(f"FAIL {r['source']} {r['kernel']} {r['arch']}: {'; '.join(why)}")
    return 1 if failing or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
