"""`python -m benchmarks.attention_sweep`: the Triton attention kernels' block shapes, chosen by measurement in one
GPU call (issue 12).

The block shapes of kernels/attention.py (FWD_CONFIGS, DKDV_CONFIGS, DQ_CONFIGS: (BLOCK_M, BLOCK_N, num_warps,
num_stages) per head-dim tile) were chosen without a GPU, as the largest that compile without spills. On an H200
the kernels ran at 225–262 TFLOP/s forward and ~100 backward (b4 s4096 h32 d128): the dK/dV kernel's 16-row query
block at d128 feeds wgmma tiles a quarter of their natural height. Measurement decides; GPU time is scarce, so the
work is split:

1. On a CPU (`--static`, no GPU): every candidate of GRID is compiled for sm_90a through the static report's
   compiler (`benchmarks.static.compile_variant`), with a causal mask, as the launcher launches it with the
   candidate in its table (the report's recorder on the report's causal call); a candidate that spills, uses
   local memory, needs more shared memory than an H100/H200 block may have (227 KB), or fails to compile is
   dropped. The survivors, with their registers and shared memory, go to CANDIDATES_FILE
   (committed), so the GPU spends no time on configurations that cannot win.
2. On the GPU (default): for each case of CASES and each kernel, every candidate for the case's head dim is put in
   the launcher's table and the op is timed (`triton.testing.do_bench` medians: the forward for a forward shape,
   the backward alone on a retained graph for a backward one: delta + dK/dV + dQ, with the other kernels at their
   current shapes), then checked: out, and the gradients for a backward shape, against an fp32 math reference,
   within 3× the error of SDPA's flash backend plus 1e-3 (a configuration that computes a wrong number is marked,
   never chosen). Kernels are swept in the order fwd, dkdv,
   dq, and a kernel's best shape stays in its table while the next is swept. SDPA's flash and cuDNN backends are
   timed on the same tensors. Results are appended to `<out>/attention_sweep.jsonl` as they come (a run cut by its
   time budget keeps what it measured), and `<out>/attention_sweep.md` gives TFLOP/s per case and the tables to
   paste into kernels/attention.py: per kernel and head dim, the candidate with the best geometric-mean time over
   the cases of that head dim.

    python -m benchmarks.attention_sweep --static            # CPU: refresh CANDIDATES_FILE (minutes)
    python -m benchmarks.attention_sweep --static --kernels dkdv_tma   # CPU: one kernel's candidates only
    python -m benchmarks.attention_sweep --kernels fwd fwd_tma         # GPU: only these kernels, in this order
    python -m benchmarks.attention_sweep --out DIR           # GPU: one call, --budget-s seconds at most (480)
    python -m benchmarks.attention_sweep --decode            # GPU: the split-KV decode kernel's shape and split rule

On the GPU the candidates are first compiled in parallel (`precompile`: --workers spawned processes fill Triton's
on-disk cache, since each compile takes seconds on one core; at most PRECOMPILE_SHARE of the budget), then timed one
by one in a child process under a watchdog (benchmarks/hang.py): most of these kernels have never run on a GPU, and
one that hangs costs its unit's limit (its row says "hung", it is never chosen) and a new process that goes on from
the rows written so far, not the rest of the sweep. The decode sweep runs the same way.

The forward and dK/dV kernels have a Hopper path each (TMA loads, kernels/attention.py TMA): swept as kernels
fwd_tma and dkdv_tma with the paths forced on (fwd and dkdv with them forced off), and the report says per head dim
which path is faster, to keep or drop its FWD_TMA_CONFIGS / DKDV_TMA_CONFIGS entry. The forward's Hopper path also
has a warp-specialized variant (FWD_WS_CONFIGS, off by default): swept as fwd_ws, and the report says per head dim
whether to set FWD_WS_DEFAULT. The dK/dV kernel with the atomic dQ (FlashAttention-2's five-matmul backward, no dQ
kernel; off by default) is swept as dkdv_atomic and dkdv_atomic_tma, and the report says whether to set
DQ_ATOMIC_DEFAULT.

FLOPs as benchmarks/attention.py counts them: forward 4·b·h·s²·d, halved when causal; backward 2.5× that.
"""

import argparse
import itertools
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from benchmarks import hang

CANDIDATES_FILE = Path(__file__).resolve().parent / "attention_sweep_candidates.json"
# fwd_tma, dkdv_tma, dq_tma: the kernels' Hopper paths (FWD_TMA_CONFIGS, DKDV_TMA_CONFIGS, DQ_TMA_CONFIGS: tables of
# their own, keyed by head dim only: 16-bit inputs), swept with that kernel's path forced on, as fwd, dkdv and dq
# are with it forced off (A.TMA per kernel: the other kernels keep theirs); the report gives both best times and
# says which path is faster per head dim.
# fwd_ws, dkdv_ws: the forward's and dK/dV's warp-specialized Hopper paths (FWD_WS_CONFIGS, DKDV_WS_CONFIGS, dense
# calls), swept with them forced on over their kernel's Hopper path (fwd_tma and dkdv_tma are swept with them
# forced off); the report says per head dim whether each beats the faster of its kernel's other two paths.
# dkdv_atomic, dkdv_atomic_tma: the dK/dV kernel with the atomic dQ (DKDV_ATOMIC_CONFIGS, DKDV_ATOMIC_TMA_CONFIGS;
# A.DQ_ATOMIC forced on, and off for every other dkdv and dq entry), by pointers and on its Hopper path; no dQ
# kernel runs, so its time is the whole backward as theirs is, and the report says whether to set
# DQ_ATOMIC_DEFAULT (per head dim, the faster atomic entry against the fastest three-kernel backward measured).
# A DKDV_ATOMIC_TMA_DENSE_ONLY head dim's Hopper entry serves dense calls without a softcap only, which is what every
# case here is; the static report then checks the pasted shape with those calls' flags.
TABLES = {"fwd": "FWD_CONFIGS", "fwd_tma": "FWD_TMA_CONFIGS", "fwd_ws": "FWD_WS_CONFIGS", "dkdv": "DKDV_CONFIGS",
          "dkdv_tma": "DKDV_TMA_CONFIGS", "dkdv_ws": "DKDV_WS_CONFIGS", "dkdv_atomic": "DKDV_ATOMIC_CONFIGS",
          "dkdv_atomic_tma": "DKDV_ATOMIC_TMA_CONFIGS", "dq": "DQ_CONFIGS", "dq_tma": "DQ_TMA_CONFIGS"}
SPEC_PREFIX = {kernel: {"fwd": "attn_fwd", "dkdv": "attn_bwd_dkdv", "dq": "attn_bwd_dq"}[kernel.split("_")[0]]
               for kernel in TABLES}
WS_KERNELS = ("fwd", "dkdv")  # the kernels with a warp-specialized path


def _base(kernel) -> str:
    """The kernel a sweep entry times: "fwd" for fwd, fwd_tma and fwd_ws."""
    return kernel.split("_")[0]


def _hopper_table(kernel) -> bool:
    """Whether the entry's table is keyed by head dim only (16-bit inputs): the Hopper paths'."""
    return kernel.endswith(("_tma", "_ws"))


def _atomic(kernel) -> bool:
    """Whether the entry times the dK/dV kernel with the atomic dQ (A.DQ_ATOMIC on; off for the other backward
    entries)."""
    return "_atomic" in kernel


def _forced_paths(kernel) -> dict:
    """A.TMA's entries that time `kernel`'s path: its Hopper path on for *_tma and *_ws, off otherwise; its
    kernel's warp-specialized path on only for *_ws."""
    base = _base(kernel)
    forced = {base: _hopper_table(kernel)}
    if base in WS_KERNELS:
        forced[f"{base}_ws"] = kernel.endswith("_ws")
    return forced
HEAD_DIMS = (64, 128)
# (BLOCK_M, BLOCK_N, num_warps, num_stages). For dK/dV, BLOCK_M is the inner (query) block and BLOCK_N its own key
# block; for dQ, BLOCK_M its own query block and BLOCK_N the inner (key) block.
GRID = {
    "fwd": list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))),
    "fwd_tma": list(itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4))),
    # Triton 3.6 warp-specializes the loop at 4 warps (a producer and two consumer groups: 12), not at 8; dK/dV at
    # 64-query blocks, not 128.
    "fwd_ws": list(itertools.product((128,), (64, 128), (4,), (2, 3, 4))),
    "dkdv_ws": list(itertools.product((32, 64), (32, 64, 128), (4,), (1, 2, 3))),
    "dkdv": list(itertools.product((16, 32, 64), (64, 128), (4, 8), (1, 2, 3))),
    "dkdv_tma": list(itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3))),
    "dkdv_atomic": list(itertools.product((16, 32, 64), (32, 64, 128), (4, 8), (1, 2))),
    "dkdv_atomic_tma": list(itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3))),
    "dq": list(itertools.product((64, 128), (16, 32, 64), (4, 8), (1, 2, 3))),
    "dq_tma": list(itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3))),
}
MAX_SHARED_BYTES = 227 * 1024  # the most dynamic shared memory one block may use on sm_90
# (name, batch, seqlen, q heads, kv heads, head dim, causal): the cases of TARGETS.md and issue 12.
CASES = (
    ("b4 s4096 h32 d128 causal", 4, 4096, 32, 32, 128, True),
    ("b4 s4096 h32 d128", 4, 4096, 32, 32, 128, False),
    ("b4 s4096 h32/8 d128 causal", 4, 4096, 32, 8, 128, True),
    ("b8 s2048 h16 d64 causal", 8, 2048, 16, 16, 64, True),
    ("b16 s1024 h32 d64", 16, 1024, 32, 32, 64, False),
)
ERROR_FACTOR = 3.0
ERROR_FLOOR = 1e-3
PRECOMPILE_SHARE = 0.4  # of the budget, at most, for compiling the candidates in parallel before the timing


# ---------------------------------------------------------------------------------------------- CPU: candidates


def _static_row(job):
    """Compile one candidate for sm_90a (a worker of --static): the static report's row for it. The candidate is put
    in the launcher's table and the report's bf16 causal call at this head dim is recorded (benchmarks.static):
    the variant compiled is the one the launcher launches with that table."""
    kernel, head_dim, config = job
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    from benchmarks import static
    from fastlm.kernels import attention as A

    fn = {"fwd": A._attn_fwd_kernel, "dkdv": A._attn_bwd_dkdv_kernel,
          "dq": A._attn_bwd_dq_kernel}[_base(kernel)]
    with table_entry(A, kernel, head_dim, tuple(config)):
        found = static.record(lambda _: static.attention_call(torch.bfloat16, head_dim, "causal",
                                                              atomic_dq=_atomic(kernel)), "attention.py")
    found = [v for v in found if v.fn is fn]
    if len(found) != 1:
        return {"kernel": f"{SPEC_PREFIX[kernel]}[bf16, d{head_dim}, causal]",
                "error": f"the causal call launched {len(found)} variants of {fn.__name__}"}
    return static.compile_variant(found[0], 90)


def usable(row) -> bool:
    """A candidate the GPU should time: it compiled, with no local memory or spills, and its shared memory fits."""
    from benchmarks import static

    return not static.problems(row) and row.get("shared", 0) <= MAX_SHARED_BYTES


def static_candidates(jobs=None, log=print, kernels=None) -> dict:
    """{kernel: {head_dim: [{"config": [...], "regs": r, "shared": s}, ...]}} for every usable candidate of GRID
    (of the named kernels only, when given)."""
    kernels = [k for k in GRID if kernels is None or k in kernels]
    work = [(k, d, c) for k in kernels for d in HEAD_DIMS for c in GRID[k]]
    out = {k: {str(d): [] for d in HEAD_DIMS} for k in kernels}
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        for (kernel, head_dim, config), row in zip(work, pool.map(_static_row, work)):
            ok = usable(row)
            log(f"{kernel} d{head_dim} {config}: {'ok' if ok else 'dropped'} "
                f"(regs {row.get('regs')}, smem {row.get('shared')}, {row.get('error') or ''})")
            if ok:
                out[kernel][str(head_dim)].append({"config": list(config), "regs": row["regs"],
                                                   "shared": row["shared"]})
    log(f"{len(work)} candidates compiled in {time.perf_counter() - start:.0f} s")
    return out


# ---------------------------------------------------------------------------------------------- the tables


def table(module, kernel) -> dict:
    """The launcher's table of `kernel` for 16-bit inputs: {head dim tile: config}."""
    found = getattr(module, TABLES[kernel])
    return found if _hopper_table(kernel) else found[False]


@contextmanager
def table_entry(module, kernel, head_dim, config):
    """Put `config` in the launcher's table for 16-bit inputs at this head dim for the block, with that
    kernel's path forced (_forced_paths; A.TMA per kernel) and, for a backward entry, the atomic dQ on or off
    (_atomic); restore all after."""
    entries = table(module, kernel)
    old, old_tma, old_atomic = entries.get(head_dim), module.TMA, module.DQ_ATOMIC
    entries[head_dim] = tuple(config)
    per_kernel = dict(old_tma) if isinstance(old_tma, dict) else {k: old_tma for k in ("fwd", "dkdv", "dq",
                                                                                        "fwd_ws", "dkdv_ws")}
    module.TMA = dict(per_kernel, **_forced_paths(kernel))
    if _base(kernel) != "fwd":
        module.DQ_ATOMIC = _atomic(kernel)
    try:
        yield
    finally:
        module.TMA = old_tma
        module.DQ_ATOMIC = old_atomic
        if old is None:
            del entries[head_dim]
        else:
            entries[head_dim] = old


def flops(case, mode) -> float:
    _, b, s, h, _, d, causal = case
    fwd = 4.0 * b * h * s * s * d / (2 if causal else 1)
    return fwd * (2.5 if mode == "bwd" else 1.0)


def best_configs(results) -> dict:
    """{kernel: {head_dim: (config, geometric-mean ms)}}: per kernel and head dim, the correct candidate with the
    lowest geometric-mean time over the cases of that head dim that timed every candidate it is compared with."""
    times = {}
    for r in results:
        if r.get("kind") != "candidate" or not r.get("correct") or r.get("ms") is None:
            continue
        times.setdefault((r["kernel"], r["head_dim"]), {}).setdefault(tuple(r["config"]), {})[r["case"]] = r["ms"]
    best = {}
    for (kernel, head_dim), by_config in times.items():
        all_cases = set().union(*(set(c) for c in by_config.values()))
        complete = {cfg: c for cfg, c in by_config.items() if set(c) == all_cases}
        scored = {cfg: math.exp(sum(math.log(v) for v in c.values()) / len(c)) for cfg, c in complete.items()}
        if scored:
            cfg = min(scored, key=scored.get)
            best.setdefault(kernel, {})[head_dim] = (list(cfg), scored[cfg])
    return best


def report(results, current, cases=CASES) -> str:
    """Markdown: each case's best rate per kernel next to the current table's and SDPA's; the tables to paste."""
    lines = ["# Triton attention block-shape sweep", ""]
    peers = {(r["case"], r["provider"], r["mode"]): r for r in results if r.get("kind") == "peer"}
    lines += ["| case | kernel | current ms | best ms | best config | best TFLOP/s | sdpa-flash | sdpa-cudnn |",
              "|---|---|---|---|---|---|---|---|"]
    for case in cases:
        for kernel in TABLES:
            rows = [r for r in results if r.get("kind") == "candidate" and r["case"] == case[0]
                    and r["kernel"] == kernel and r.get("correct") and r.get("ms") is not None]
            if not rows:
                continue
            cur = [r for r in rows if tuple(r["config"]) == tuple(current[kernel].get(case[5]) or ())]
            top = min(rows, key=lambda r: r["ms"])
            mode = "fwd" if kernel.startswith("fwd") else "bwd"
            peer = [peers.get((case[0], p, mode)) for p in ("sdpa-flash", "sdpa-cudnn")]
            fmt = lambda r: f"{r['tflops']:.0f} TFLOP/s" if r and r.get("tflops") else "–"  # noqa: E731
            current_ms = f"{cur[0]['ms']:.3f}" if cur else "–"
            lines.append(f"| {case[0]} | {kernel} | {current_ms} | {top['ms']:.3f} | {tuple(top['config'])} "
                         f"| {flops(case, mode) / top['ms'] / 1e9:.0f} | {fmt(peer[0])} | {fmt(peer[1])} |")
    lines += ["", "Tables for kernels/attention.py (16-bit inputs; the dkdv and dq times are the whole backward):", ""]
    best = best_configs(results)
    for kernel, by_dim in best.items():
        for head_dim, (cfg, ms) in sorted(by_dim.items()):
            key = f"[{head_dim}]" if _hopper_table(kernel) else f"[False][{head_dim}]"
            lines.append(f"- {TABLES[kernel]}{key} = {tuple(cfg)}  (geometric mean {ms:.3f} ms)")
    for kernel, label in (("fwd", "forward"), ("dkdv", "dK/dV"), ("dq", "dQ")):
        for head_dim in sorted(set(best.get(kernel, {})) & set(best.get(f"{kernel}_tma", {}))):
            ptr, tma = best[kernel][head_dim][1], best[f"{kernel}_tma"][head_dim][1]
            verdict = "keep" if tma < ptr else "drop"
            lines.append(f"- {label} at head dim {head_dim}: the {'TMA' if tma < ptr else 'pointer'} path is faster "
                         f"({tma:.3f} ms against {ptr:.3f}): {verdict} {TABLES[kernel + '_tma']}[{head_dim}]")
    # Each warp-specialized path against the faster of its kernel's other two paths, per head dim; it runs only
    # where the kernel's Hopper table has the head dim too, and its *_WS_DEFAULT is one flag for all head dims.
    for base in WS_KERNELS:
        ws_kernel, name = f"{base}_ws", TABLES[f"{base}_ws"]
        kept = []
        for head_dim in sorted(best.get(ws_kernel, {})):
            ws = best[ws_kernel][head_dim][1]
            others = {k: best[k][head_dim][1] for k in (base, f"{base}_tma") if head_dim in best.get(k, {})}
            if not others:
                continue
            rival = min(others, key=others.get)
            if ws < others[rival]:
                kept.append(head_dim)
            lines.append(f"- {ws_kernel} at head dim {head_dim}: the warp-specialized path takes {ws:.3f} ms against "
                         f"{others[rival]:.3f} for {rival}: "
                         + (f"keep {name}[{head_dim}] (and {TABLES[base + '_tma']}[{head_dim}], which it needs)"
                            if ws < others[rival] else f"drop {name}[{head_dim}]"))
        if ws_kernel in best:
            lines.append(f"- {name.replace('_CONFIGS', '_DEFAULT')} = {bool(kept)}"
                         + (f" (head dims {kept})" if kept else ""))
    # The atomic dQ (whole backward each) against the fastest three-kernel backward measured (every dkdv and dq
    # entry times the whole backward; the dq entries run with the dK/dV shape already swept in place), per head dim.
    wins = []
    for head_dim in sorted(set(best.get("dkdv_atomic", {})) | set(best.get("dkdv_atomic_tma", {}))):
        atomic = {k: best[k][head_dim][1] for k in ("dkdv_atomic", "dkdv_atomic_tma") if head_dim in best.get(k, {})}
        plain = {k: best[k][head_dim][1] for k in ("dkdv", "dkdv_tma", "dkdv_ws", "dq", "dq_tma")
                 if head_dim in best.get(k, {})}
        if len(atomic) == 2 and atomic["dkdv_atomic"] < atomic["dkdv_atomic_tma"]:
            # The launcher takes the Hopper variant wherever its table has the head dim (and DKDV_TMA_CONFIGS too).
            lines.append(f"- atomic dQ at head dim {head_dim}: the pointer variant is faster "
                         f"({atomic['dkdv_atomic']:.3f} ms against {atomic['dkdv_atomic_tma']:.3f}): drop "
                         f"DKDV_ATOMIC_TMA_CONFIGS[{head_dim}]")
        if not plain:
            continue
        a, p = min(atomic, key=atomic.get), min(plain, key=plain.get)
        if atomic[a] < plain[p]:
            wins.append(head_dim)
        lines.append(f"- atomic dQ at head dim {head_dim}: {a} takes {atomic[a]:.3f} ms against {plain[p]:.3f} for "
                     f"the three-kernel backward ({p}): " + ("faster" if atomic[a] < plain[p] else "slower")
                     + (f" (the Hopper variant needs DKDV_TMA_CONFIGS[{head_dim}] kept too)"
                        if a == "dkdv_atomic_tma" and atomic[a] < plain[p] else ""))
    if wins or any(k in best for k in ("dkdv_atomic", "dkdv_atomic_tma")):
        lines.append(f"- DQ_ATOMIC_DEFAULT = {bool(wins)}" + (f" (faster at head dims {wins}; drop the atomic "
                                                               "tables' entries of the others)" if wins else ""))
    wrong = [r for r in results if r.get("kind") == "candidate" and r.get("correct") is False]
    if wrong:
        lines += ["", "Wrong results (never chosen):"]
        lines += [f"- {r['case']} {r['kernel']} {tuple(r['config'])}: {r.get('why')}" for r in wrong]
    failed = [r for r in results if r.get("kind") == "candidate" and r.get("correct") is None]
    if failed:
        lines += ["", "Errors, hangs and unchecked results (never chosen):"]
        lines += [f"- {r['case']} {r['kernel']} {tuple(r['config'])}: {r.get('error') or r.get('why')}"
                  for r in failed]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- GPU: measurement


def _inputs(case, device, dtype=None):
    import torch

    dtype = dtype or torch.bfloat16
    _, b, s, h, hk, d, causal = case
    g = torch.Generator(device=device).manual_seed(0)  # the same inputs for every candidate of a case
    make = lambda heads: torch.randn(b, s, heads, d, device=device, dtype=dtype, generator=g)  # noqa: E731
    q, k, v = make(h), make(hk), make(hk)
    do = torch.randn(b, s, h, d, device=device, dtype=dtype, generator=g)
    return q, k, v, do


def _reference(case, q, k, v, do):
    """fp32 math on the same inputs: out and the gradients, for the error check (computed one batch entry at a
    time, so the fp32 scores of one sequence are all it holds)."""
    import torch
    import torch.nn.functional as F

    causal = case[6]
    outs, grads = [], []
    for i in range(q.shape[0]):
        qi, ki, vi = (t[i:i + 1].float().transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
        o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, enable_gqa=True)
        o.backward(do[i:i + 1].float().transpose(1, 2))
        outs.append(o.detach().transpose(1, 2))
        grads.append([t.grad.transpose(1, 2) for t in (qi, ki, vi)])
    return torch.cat(outs), [torch.cat([g[j] for g in grads]) for j in range(3)]


def _rel(a, b) -> float:
    return float((a.float() - b).norm() / b.norm().clamp_min(1e-30))


def _sdpa(case, q, k, v, backend):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=case[6], enable_gqa=True).transpose(1, 2)
    return fn


def _time_pair(fn, q, k, v, do, forward=True, backward=True):
    """(forward ms or None, backward ms or None, out, grads or None): do_bench medians of what is asked; the
    backward on a retained graph."""
    import torch
    from triton.testing import do_bench

    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    fwd_ms = bwd_ms = grads = None
    if forward:
        with torch.no_grad():
            fwd_ms = do_bench(lambda: fn(*leaves))
    out = fn(*leaves)
    if backward:
        grads = torch.autograd.grad(out, leaves, do, retain_graph=True)
        bwd_ms = do_bench(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True))
    return fwd_ms, bwd_ms, out.detach(), grads


def _warm(jobs):
    """Compile candidates into Triton's on-disk cache (a spawned worker of `precompile`): each job runs the op
    forward and backward once on a small input of its case's layout, which the JIT specialises as the case's own
    (the same dtypes, head counts, head dim and mask; lengths and strides divisible by 16 alike)."""
    import torch

    import fastlm
    from fastlm.kernels import attention as A

    done = 0
    with fastlm.use_backend("triton"):
        for kernel, case, config in jobs:
            _, _, _, h, hk, d, causal = case
            q, k, v = (torch.randn(1, 256, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for n in (h, hk, hk))
            try:
                with table_entry(A, kernel, d, config):
                    fastlm.attention(q, k, v, causal=causal).sum().backward()
                torch.cuda.synchronize()
                done += 1
            except Exception:  # noqa: BLE001 - measure() records the error when it meets this config
                pass
    return done


def precompile(candidates: dict, workers: int, log=print, kernels=None, limit_s=None) -> None:
    """Every candidate of every case's variant compiled in parallel before the timing starts (compiles are
    single-threaded and take seconds each; the GPU machine has 16 cores). Each job also runs its kernels once:
    past `limit_s` (a hung kernel, or more compiling than the budget allows) the workers are ended and the rest
    compile as they are timed, under measure's watchdog."""
    import multiprocessing
    import multiprocessing.connection

    variants = {(c[3], c[4], c[5], c[6]): c for c in CASES}  # one case per distinct specialisation
    jobs = [(kernel, case, tuple(entry["config"])) for case in variants.values() for kernel in kernels or TABLES
            for entry in candidates.get(kernel, {}).get(str(case[5]), [])]
    if not jobs or workers < 1:
        return
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    counts = context.Queue()
    # A process per chunk rather than a pool: a worker that dies (a crash in a compile) or hangs is seen as such
    # and ended at the limit, where a pool's map would wait for its result.
    procs = [context.Process(target=_warm_into, args=(jobs[i::workers], counts)) for i in range(workers)]
    for proc in procs:
        proc.start()
    deadline = None if limit_s is None else time.monotonic() + limit_s
    waiting = {proc.sentinel: proc for proc in procs}
    while waiting:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = multiprocessing.connection.wait(list(waiting), timeout=left)
        if not ready:
            break
        for sentinel in ready:
            waiting.pop(sentinel).join()
    for proc in waiting.values():
        proc.kill()
        proc.join()
    done = 0
    while not counts.empty():
        done += counts.get()
    cut = f"; {len(waiting)} of {workers} workers ended at the {limit_s:.0f} s limit (their candidates compile as " \
          "they are timed)" if waiting else ""
    log(f"precompiled {done} of {len(jobs)} candidate variants in {time.perf_counter() - start:.0f} s{cut}")


def _warm_into(jobs, counts):
    counts.put(_warm(jobs))


def _measure_child(out_dir, candidates, kernels, budget_s, done):
    """measure() in a process of its own, under the watchdog (benchmarks.hang.resumable's target)."""
    measure(out_dir, budget_s, candidates, kernels=kernels, done=done, hang_s=hang.UNIT_LIMIT_S)


def _decode_child(out_dir, budget_s, done):
    decode_sweep(out_dir, budget_s, done=done, hang_s=hang.UNIT_LIMIT_S)


def measure(out_dir: Path, budget_s: float, candidates: dict, log=print, device="cuda", cases=CASES,
            dtype=None, kernels=None, done=None, hang_s=None) -> list:
    """Times every candidate of every case (bf16 unless `dtype`: the tables serve both 16-bit dtypes); see the
    module docstring. Returns this sweep's rows. `done`: the rows an earlier process of the same sweep wrote
    (benchmarks.hang.resumable): the units they cover are not timed again, their results are used as if just
    measured. `hang_s`: each unit's limit (benchmarks.hang.Watchdog; None: no limit)."""
    import torch
    from torch.nn.attention import SDPBackend

    import fastlm
    from fastlm.kernels import attention as A

    device = torch.device(device)
    deadline = time.monotonic() + budget_s
    out_dir.mkdir(parents=True, exist_ok=True)
    sink = hang.append_rows(out_dir / "attention_sweep.jsonl")
    results = list(done or ())
    finished = {(r["case"], r["kernel"], tuple(r["config"])): r for r in results if r.get("kind") == "candidate"}

    def emit(row):
        results.append(row)
        sink.write(json.dumps(row) + "\n")
        sink.flush()

    watchdog = hang.Watchdog(hang_s, emit)
    dims = sorted({c[5] for c in cases} | set(HEAD_DIMS))
    current = {k: {d: list(table(A, k)[d]) for d in dims if d in table(A, k)} for k in TABLES}
    if not any(r.get("kind") == "meta" for r in results):
        emit({"kind": "meta", "device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
              "torch": torch.__version__,
              "triton": __import__("triton").__version__, "current": current})
    ours = lambda q, k, v, causal: fastlm.attention(q, k, v, causal=causal)  # noqa: E731
    for case in cases:
        if time.monotonic() > deadline:
            log("time budget spent: stopping")
            break
        name, causal, head_dim = case[0], case[6], case[5]
        q, k, v, do = _inputs(case, device, dtype)
        ref_out, ref_grads = _reference(case, q, k, v, do)
        bounds = {}
        for provider, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                                  ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
            earlier = [r for r in results
                       if r.get("kind") == "peer" and r["case"] == name and r["provider"] == provider]
            if earlier:  # timed by an earlier process of this sweep
                if provider == "sdpa-flash" and earlier[0].get("errors"):
                    errs = earlier[0]["errors"]
                    bounds = {"out": errs[0], "grads": max(errs[1:])}
                continue
            try:
                with watchdog.unit({"kind": "peer", "case": name, "provider": provider, "mode": "fwd"}):
                    f_ms, b_ms, out, grads = _time_pair(_sdpa(case, q, k, v, backend), q, k, v, do)
                    errs = [_rel(out, ref_out)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
            except Exception as e:  # noqa: BLE001 - a peer that cannot run this case is a result
                emit({"kind": "peer", "case": name, "provider": provider, "mode": "fwd", "error": str(e)[:200]})
                hang.end_if_context_broken()
                continue
            if provider == "sdpa-flash":
                bounds = {"out": errs[0], "grads": max(errs[1:])}
            for mode, ms in (("fwd", f_ms), ("bwd", b_ms)):
                emit({"kind": "peer", "case": name, "provider": provider, "mode": mode, "ms": ms,
                      "tflops": flops(case, mode) / ms / 1e9, "errors": errs})
        with fastlm.use_backend("triton"):
            for kernel in kernels or TABLES:
                options = [c["config"] for c in candidates.get(kernel, {}).get(str(head_dim), [])]
                shipped = current[kernel].get(head_dim)
                options = ([shipped] if shipped else []) + [c for c in options if c != shipped]
                timed = []
                for config in options:
                    if time.monotonic() > deadline:
                        break
                    row = {"kind": "candidate", "case": name, "kernel": kernel, "head_dim": head_dim,
                           "config": list(config)}
                    earlier = finished.get((name, kernel, tuple(config)))
                    if earlier is not None:  # an earlier process of this sweep timed it, or it hung there
                        if earlier.get("correct") and earlier.get("ms") is not None:
                            timed.append((earlier["ms"], tuple(config)))
                        continue
                    forward = kernel.startswith("fwd")  # a forward shape is timed forward only, a backward one backward
                    with table_entry(A, kernel, head_dim, config):
                        try:
                            with watchdog.unit(row):
                                f_ms, b_ms, out, grads = _time_pair(lambda q, k, v: ours(q, k, v, causal), q, k, v,
                                                                    do, forward=forward, backward=not forward)
                                # Inside the unit: the forward's last launch is only waited for here.
                                errs = [_rel(out, ref_out)] + [_rel(g, r) for g, r in zip(grads or (), ref_grads)]
                        except Exception as e:  # noqa: BLE001 - out of resources, a compile error: a result
                            emit(dict(row, ms=None, correct=None, error=f"{type(e).__name__}: {str(e)[:200]}"))
                            hang.end_if_context_broken()
                            continue
                    limit = (ERROR_FACTOR * bounds.get("out", 0) + ERROR_FLOOR,
                             ERROR_FACTOR * bounds.get("grads", 0) + ERROR_FLOOR)
                    ms = f_ms if forward else b_ms
                    # Without sdpa-flash's errors on this case (it failed or hung) there is no bound: unchecked,
                    # never chosen, and not called wrong.
                    ok = (errs[0] <= limit[0] and max(errs[1:], default=0.0) <= limit[1]) if bounds else None
                    emit(dict(row, ms=ms, tflops=flops(case, "fwd" if forward else "bwd") / ms / 1e9,
                              correct=ok, errors=errs,
                              why=None if ok else f"errors {errs} over {limit}" if bounds else
                              "unchecked: no sdpa-flash errors on this case to bound them"))
                    if ok:
                        timed.append((ms, tuple(config)))
                    log(f"{name} {kernel} {tuple(config)}: {ms:.3f} ms "
                        + {True: "ok", False: "WRONG", None: "unchecked"}[ok])
                if timed:  # the next kernel is swept with this one's best shape in place (this case only)
                    table(A, kernel)[head_dim] = tuple(min(timed)[1])
            for kernel in TABLES:  # back to the shipped tables for the next case
                if head_dim in current[kernel]:
                    table(A, kernel)[head_dim] = tuple(current[kernel][head_dim])
                else:
                    table(A, kernel).pop(head_dim, None)
        del q, k, v, do, ref_out, ref_grads
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sink.close()
    (out_dir / "attention_sweep.md").write_text(report(results, current, cases))
    return results


# The split-KV decode kernel (kernels/attention.py, DECODE_CONFIGS[128][16]: (BLOCK_N, num_warps, num_stages) for a
# 16-row tile at head dim 128, and the split rule's DECODE_PROGRAMS_PER_SM and DECODE_MIN_SPLIT_KEYS), timed on
# issue 12's two decode cases: one new token a sequence, GQA 32/8, d128, bf16. GB/s of K and V read.
DECODE_CASES = (("b1 x 64k", 1, 65536), ("b16 x 8k", 16, 8192))
DECODE_GRID = [(cfg, per_sm, min_keys) for cfg in ((32, 4, 3), (64, 4, 3), (32, 4, 4), (64, 4, 4), (64, 8, 3))
               for per_sm in (2, 4, 8) for min_keys in (128, 256, 512)]


def decode_sweep(out_dir: Path, budget_s: float, log=print, device="cuda", dtype=None, done=None,
                 hang_s=None) -> list:
    """Every DECODE_GRID point on DECODE_CASES, checked against SDPA's flash backend on the same tensors; appends
    to `<out>/decode_sweep.jsonl` and returns the sweep's rows (decode_summary gives the best per case). `done`
    and `hang_s` as measure's."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    import fastlm
    from fastlm.kernels import attention as A

    dtype = dtype or torch.bfloat16
    deadline = time.monotonic() + budget_s
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = list(done or ())
    finished = {(r["case"], tuple(r["config"]), r["programs_per_sm"], r["min_split_keys"]) for r in rows
                if r.get("kind") == "candidate"}
    saved = (A.DECODE_CONFIGS[128][16], A.DECODE_PROGRAMS_PER_SM, A.DECODE_MIN_SPLIT_KEYS)
    with hang.append_rows(out_dir / "decode_sweep.jsonl") as sink:

        def emit(row):
            rows.append(row)
            sink.write(json.dumps(row) + "\n")
            sink.flush()

        watchdog = hang.Watchdog(hang_s, emit)
        inputs = {}
        for name, b, sk in DECODE_CASES:
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(b, 1, 32, 128, device=device, dtype=dtype, generator=g)
            k = torch.randn(b, sk, 8, 128, device=device, dtype=dtype, generator=g)
            v = torch.randn(b, sk, 8, 128, device=device, dtype=dtype, generator=g)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                sdpa = lambda: F.scaled_dot_product_attention(  # noqa: E731
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True).transpose(1, 2)
                ref = sdpa()
                if not any(r.get("kind") == "peer" and r["case"] == name for r in rows):
                    ms = do_bench(sdpa)
                    emit({"kind": "peer", "case": name, "provider": "sdpa-flash", "ms": ms,
                          "gb_s": 2 * k.numel() * 2 / ms / 1e6})
            inputs[name] = (q, k, v, ref)
        try:
            for cfg, per_sm, min_keys in DECODE_GRID:
                if time.monotonic() > deadline:
                    log("time budget spent: stopping")
                    break
                A.DECODE_CONFIGS[128][16], A.DECODE_PROGRAMS_PER_SM, A.DECODE_MIN_SPLIT_KEYS = cfg, per_sm, min_keys
                for name, (q, k, v, ref) in inputs.items():
                    if (name, tuple(cfg), per_sm, min_keys) in finished:  # an earlier process timed it (or hung)
                        continue
                    row = {"kind": "candidate", "case": name, "config": list(cfg), "programs_per_sm": per_sm,
                           "min_split_keys": min_keys}
                    try:
                        with fastlm.use_backend("triton"), watchdog.unit(row):
                            out = fastlm.attention(q, k, v)
                            ms = do_bench(lambda: fastlm.attention(q, k, v))
                            err = _rel(out, ref.float())
                        row.update(ms=ms, gb_s=2 * k.numel() * 2 / ms / 1e6, rel_err_vs_flash=err,
                                   correct=err <= 1e-2)
                    except Exception as e:  # noqa: BLE001 - a config that cannot run is a result
                        row.update(ms=None, correct=None, error=f"{type(e).__name__}: {str(e)[:200]}")
                    emit(row)
                    log(f"decode {name} {cfg} per_sm={per_sm} min_keys={min_keys}: "
                        f"{row.get('gb_s') or 0:.0f} GB/s {'ok' if row.get('correct') else row.get('error', 'WRONG')}")
                    if "error" in row:
                        hang.end_if_context_broken()
        finally:
            A.DECODE_CONFIGS[128][16], A.DECODE_PROGRAMS_PER_SM, A.DECODE_MIN_SPLIT_KEYS = saved
    return rows


def decode_summary(rows, log=print) -> None:
    """The best correct grid point per decode case, against sdpa-flash's bandwidth."""
    for name, _, _ in DECODE_CASES:
        ok = [r for r in rows if r["kind"] == "candidate" and r["case"] == name and r.get("correct")]
        peer = next((r for r in rows if r["kind"] == "peer" and r["case"] == name), None)
        if ok:
            top = max(ok, key=lambda r: r["gb_s"])
            log(f"best {name}: {top['gb_s']:.0f} GB/s at {tuple(top['config'])}, {top['programs_per_sm']} programs "
                f"a SM, {top['min_split_keys']} keys a split"
                + (f" (sdpa-flash {peer['gb_s']:.0f} GB/s)" if peer and peer.get("gb_s") else ""))
        else:
            log(f"best {name}: no correct grid point measured")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--static", action="store_true", help="CPU: compile GRID for sm_90a, write CANDIDATES_FILE")
    parser.add_argument("--jobs", type=int, help="--static: worker processes (default: os.cpu_count())")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "."), "attention_sweep"))
    parser.add_argument("--budget-s", type=float, default=480.0, help="GPU: stop timing after this many seconds")
    parser.add_argument("--workers", type=int, default=8, help="GPU: processes compiling candidates before timing")
    parser.add_argument("--decode", action="store_true", help="GPU: sweep the split-KV decode kernel instead")
    parser.add_argument("--kernels", nargs="+", choices=list(GRID),
                        help="only these kernels: --static replaces their candidates in CANDIDATES_FILE; on the GPU "
                             "only they are timed, in the order given (default: all, in TABLES' order)")
    args = parser.parse_args(argv)
    if args.static:
        found = static_candidates(args.jobs, kernels=args.kernels)
        if args.kernels and CANDIDATES_FILE.exists():
            found = dict(json.loads(CANDIDATES_FILE.read_text()), **found)
        found = {k: found[k] for k in GRID if k in found}
        CANDIDATES_FILE.write_text(json.dumps(found, indent=1) + "\n")
        print(f"wrote {CANDIDATES_FILE}: " + ", ".join(f"{k} d{d}: {len(v)}" for k, by in found.items()
                                                         for d, v in by.items()))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("attention_sweep: no CUDA GPU here; `--static` prepares the candidates on a CPU")
        return 2
    # The timing runs in child processes under a watchdog (benchmarks.hang): a candidate that hangs costs its limit
    # and a restart, not the rest of the sweep.
    if args.decode:
        rows = hang.resumable(_decode_child, (args.out,), args.out / "decode_sweep.jsonl", args.budget_s)
        decode_summary(rows)
        return 0 if any(r.get("kind") == "candidate" for r in rows) else 1
    candidates = json.loads(CANDIDATES_FILE.read_text()) if CANDIDATES_FILE.exists() else {}
    start = time.monotonic()
    precompile(candidates, args.workers, kernels=args.kernels, limit_s=PRECOMPILE_SHARE * args.budget_s)
    rows = hang.resumable(_measure_child, (args.out, candidates, args.kernels), args.out / "attention_sweep.jsonl",
                          args.budget_s - (time.monotonic() - start))
    meta = next((r for r in rows if r.get("kind") == "meta"), None)
    if meta is None:
        print("attention_sweep: nothing was measured")
        return 1
    # The report of every process's rows (the last child writes the same when it ends the sweep itself).
    current = {k: {int(d): c for d, c in by.items()} for k, by in meta["current"].items()}
    text = report(rows, current)
    (args.out / "attention_sweep.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
