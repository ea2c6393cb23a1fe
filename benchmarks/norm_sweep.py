"""`python -m benchmarks.norm_sweep [--tune] [--out DIR]`: the norm cases of issue 15 on a GPU, in one call.

Default: fastlm (triton, cuda) against torch eager, torch.compile and Liger on every case the issue names:
{RMSNorm, LayerNorm, residual + RMSNorm} × {bf16, fp32} × (16384×4096, 4096×1024, 1024×4096, 1024×65536),
forward, backward and forward+backward, each as a fraction of the measured copy bandwidth, with the ratios to the
peers (the benchmark harness: L2 flushed, inputs rotated, outputs checked against torch). bf16 first, so a run cut
short keeps the main cases. Writes <out>/norm_sweep.{json,md,png}.

--tune: the Triton backward's launch table (kernels/norm.py, the BWD_* constants) under alternative values, each a
provider of its own ("tune:<name>", a peer: its ratio > 1 means the shipped table is faster), backward only, on a
few cases. Writes <out>/norm_tune.{json,md,png}. Pick the fastest per case and update the table.

--cases REGEX keeps the cases whose label matches; --peers NAME,... keeps only those peers (default: all).
Meant for one call of the device tool, e.g. `python3 -m benchmarks.norm_sweep --out $OUT/sweep` (a few minutes:
torch.compile builds each case anew).
"""

import dataclasses
import re
import sys

import torch

from benchmarks import harness
from benchmarks import norm as bench_norm

SHAPES = ((16384, 4096), (4096, 1024), (1024, 4096), (1024, 65536))
KINDS = (("rms_norm", False), ("layer_norm", False), ("rms_norm", True))

# name -> the kernels/norm.py constants it changes (the rest as shipped)
TUNE_VARIANTS = {
    "inflight32k": {"BWD_IN_FLIGHT_BYTES": 32 * 1024},
    "inflight128k": {"BWD_IN_FLIGHT_BYTES": 128 * 1024, "BWD_MAX_STAGES": 6},
    "stages2": {"BWD_MAX_STAGES": 2},
    "warps8": {"BWD_MAX_WARPS": 8},  # rows of 4096 bf16 at 8 warps, 16 values a thread, 2 programs an SM
    "small4w": {"BWD_SMALL_WARPS": 4},  # short rows: 4-warp programs, 4 an SM
    "pps1": {"BWD_PROGRAMS_PER_SM": {1: 8, 2: 8, 4: 4, 8: 1, 16: 1, 32: 1}},
    "vec2": {"BWD_VECTORS": 2},
    "cols16": {"BWD_COLS_PROGRAMS_PER_SM": 16},
    "cols4": {"BWD_COLS_PROGRAMS_PER_SM": 4},
    "cols8w": {"BWD_COLS_WARPS": 8},
    "fused_to_4096": {"BWD_MAX_FUSED_N": {2: 4096, 4: 4096}},  # rows over 4096 through the two-kernel path
}
TUNE_CASES = (("rms_norm", torch.bfloat16, 16384, 4096, False), ("layer_norm", torch.bfloat16, 16384, 4096, False),
              ("rms_norm", torch.bfloat16, 4096, 1024, False), ("rms_norm", torch.bfloat16, 16384, 8192, False),
              ("rms_norm", torch.bfloat16, 1024, 65536, False), ("rms_norm", torch.float32, 16384, 4096, False),
              ("layer_norm", torch.float32, 4096, 8192, True))


def sweep_cases() -> list:
    return [harness.Case(op, dtype, {"rows": rows, "N": n, "residual": res})
            for dtype in (torch.bfloat16, torch.float32) for rows, n in SHAPES for op, res in KINDS]


def tune_cases() -> list:
    return [harness.Case(op, dt, {"rows": rows, "N": n, "residual": res}) for op, dt, rows, n, res in TUNE_CASES]


def _clear_plans():
    from fastlm.kernels import norm as triton_norm

    triton_norm._bwd_plan.cache_clear()  # plans made from the table being replaced


def family(tune: bool, case_filter: str, peers) -> harness.Family:
    cases = tune_cases() if tune else sweep_cases()
    if case_filter:
        cases = [c for c in cases if re.search(case_filter, c.label)]
    base = bench_norm.FAMILY
    providers = [p for p in base.providers if p.backend or p.name == base.reference or peers is None or p.name in peers]
    if tune:
        providers = [p for p in providers if p.name in ("fastlm-triton", base.reference)]
        for name, values in TUNE_VARIANTS.items():
            available = bench_norm._fastlm_available("triton")
            providers.append(harness.Provider(f"tune:{name}", bench_norm._fastlm, available, harness.constants_context(
                "fastlm.kernels.norm", values, "triton", _clear_plans)))
    return dataclasses.replace(base, name="norm_tune" if tune else "norm_sweep", cases=lambda quick: cases,
                               providers=providers, modes=("bwd",) if tune else base.modes)


def main(argv=None) -> int:
    return harness.sweep_main("python -m benchmarks.norm_sweep", __doc__, family,
                              "time the backward's launch-table variants", argv)


if __name__ == "__main__":
    sys.exit(main())
