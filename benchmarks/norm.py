"""LayerNorm and RMSNorm benchmark: fastlm's triton and cuda backends against torch eager, torch.compile and
Liger-Kernel, forward, backward and forward+backward, with and without the fused pre-norm residual add.

Memory bound, so the metric is GB/s against the measured copy bandwidth. Bytes per call, dtype size d, rows × N
activations (`work` below): forward reads x (+ residual) and the weight (+ bias) and writes y (+ residual_out);
backward reads dy, x (+ the gradient of residual_out) and the weight and writes dx and dw (+ db). The per-row
statistics (8 bytes a row) are left out.

The sweep is sized for the GPU session's budget (scripts/gpu_check.sh: all benchmarks within a few minutes, see
the counts below): torch.compile compiles every case anew (dynamic=False), a few seconds each, so the shapes are
few: every width at 16384 rows in bf16, a few in fp32, other row counts and the fused residual at a few widths.
"""

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import Case, Family, Provider

EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}  # the library's defaults, used by every provider
OPS = ("layer_norm", "rms_norm")
ROWS = 16384
WIDTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)  # bf16, both norms, ROWS rows
FP32_WIDTHS = (1024, 16384)  # fp32, both norms, ROWS rows
OTHER_ROWS = (4096, 32768)  # bf16, both norms, at OTHER_ROWS_WIDTH
OTHER_ROWS_WIDTH = 4096
RESIDUAL_WIDTHS = (1024, 8192)  # bf16, both norms, ROWS rows, residual add fused
# --quick (scripts/gpu_check.sh --op norm): the issue-15 shapes that matter most, one case each; the whole issue-15
# grid (both dtypes, three kinds, four shapes) is benchmarks/norm_sweep.py.
QUICK_CASES = (
    ("rms_norm", torch.bfloat16, 16384, 4096, False),
    ("layer_norm", torch.bfloat16, 16384, 4096, False),
    ("rms_norm", torch.bfloat16, 16384, 4096, True),
    ("rms_norm", torch.bfloat16, 4096, 1024, False),
    ("rms_norm", torch.bfloat16, 1024, 65536, False),
    ("layer_norm", torch.float32, 1024, 4096, False),
)
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3}


def _case(op, dtype, rows, n, residual=False):
    return Case(op, dtype, {"rows": rows, "N": n, "residual": residual})


def cases(quick: bool) -> list:
    """28 cases (6 with --quick); each runs 5 providers × 3 modes."""
    if quick:
        return [_case(op, dt, rows, n, residual=res) for op, dt, rows, n, res in QUICK_CASES]
    out = [_case(op, torch.bfloat16, ROWS, n) for op in OPS for n in WIDTHS]
    out += [_case(op, torch.float32, ROWS, n) for op in OPS for n in FP32_WIDTHS]
    out += [_case(op, torch.bfloat16, rows, OTHER_ROWS_WIDTH) for op in OPS for rows in OTHER_ROWS]
    out += [_case(op, torch.bfloat16, ROWS, n, residual=True) for op in OPS for n in RESIDUAL_WIDTHS]
    return out


def make_inputs(case: Case, device, gen):
    """x, weight (+ bias) (+ residual), all requiring grad, in the case's dtype; a gradient per output."""
    rows, n, dt = case.params["rows"], case.params["N"], case.dtype

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=dt)

    inputs = {"x": randn(rows, n), "weight": 1 + 0.1 * randn(n)}
    if case.op == "layer_norm":
        inputs["bias"] = 0.1 * randn(n)
    if case.params["residual"]:
        inputs["residual"] = randn(rows, n)
    for t in inputs.values():
        t.requires_grad_()
    grads = (randn(rows, n), randn(rows, n)) if case.params["residual"] else (randn(rows, n),)
    return inputs, grads


def work(case: Case, mode: str) -> int:
    """Bytes one call must move: each input read once, each output written once (see the header)."""
    rows, n, d = case.params["rows"], case.params["N"], case.dtype.itemsize
    act = rows * n * d
    res = case.params["residual"]
    params = 1 if case.op == "rms_norm" else 2  # weight (+ bias)
    fwd = act * (2 if res else 1) + params * n * d + act * (2 if res else 1)
    bwd = act * (3 if res else 2) + n * d + act + params * n * d
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


# ---------------------------------------------------------------------------------------------- providers


def _fastlm_available(backend):
    def check():
        try:
            import fastlm
        except Exception as e:  # noqa: BLE001 - any import failure makes the provider missing, with its reason
            return False, f"fastlm not importable ({type(e).__name__}: {e})"
        if backend == "cuda":
            from fastlm import _cuda

            return _cuda.available()
        return True, ""

    return check


def _fastlm(case):
    import fastlm

    eps = EPS[case.op]
    if case.op == "layer_norm":

        def fn(i):
            return _tuple(fastlm.layer_norm(i["x"], i["weight"], i["bias"], eps=eps, residual=i.get("residual")))

    else:

        def fn(i):
            return _tuple(fastlm.rms_norm(i["x"], i["weight"], eps=eps, residual=i.get("residual")))

    return fn


def _eager(case):
    """What a user writes without fastlm: torch's norm, the residual added unfused before it."""
    n, eps = case.params["N"], EPS[case.op]
    if case.op == "layer_norm":

        def norm(v, i):
            return F.layer_norm(v, (n,), i["weight"], i["bias"], eps)

    else:

        def norm(v, i):
            return F.rms_norm(v, (n,), i["weight"], eps)

    if case.params["residual"]:

        def fn(i):
            s = i["x"] + i["residual"]
            return norm(s, i), s

    else:

        def fn(i):
            return (norm(i["x"], i),)

    return fn


def _compiled(case):
    # Dynamo keeps its compiled variants on the code object, which every case shares: without a reset, after
    # torch's recompile limit the later cases would silently run eager.
    torch._dynamo.reset()
    return torch.compile(_eager(case), dynamic=False, fullgraph=True)


def _liger(case):
    from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    eps = EPS[case.op]
    # casting_mode "llama" is Liger's default; in_place=False because in place its backward overwrites dy, which
    # the harness reuses on every timed call.
    if case.op == "layer_norm":
        # Liger has no fused residual LayerNorm: a Liger user adds the residual unfused, as here.
        def fn(i):
            s = i["x"] + i["residual"] if "residual" in i else i["x"]
            y = LigerLayerNormFunction.apply(s, i["weight"], i["bias"], eps)
            return (y, s) if "residual" in i else (y,)

    elif case.params["residual"]:

        def fn(i):
            return tuple(LigerFusedAddRMSNormFunction.apply(i["x"], i["residual"], i["weight"], eps, 0.0, "llama",
                                                            False))

    else:

        def fn(i):
            return (LigerRMSNormFunction.apply(i["x"], i["weight"], eps, 0.0, "llama", False),)

    return fn


FAMILY = Family(
    name="norm",
    metric="bytes",
    cases=cases,
    providers=[
        Provider("fastlm-triton", _fastlm, _fastlm_available("triton"), harness.fastlm_context("triton"), backend="triton"),
        Provider("fastlm-cuda", _fastlm, _fastlm_available("cuda"), harness.fastlm_context("cuda"), backend="cuda"),
        Provider("torch", _eager, native="torch:eager"),  # what `auto` runs on the "torch:eager" route
        Provider("torch.compile", _compiled),
        Provider("liger", _liger, harness.importable("liger_kernel.ops.fused_add_rms_norm", "liger_kernel.ops.layer_norm",
                                                          "liger_kernel.ops.rms_norm")),
    ],
    make_inputs=make_inputs,
    work=work,
    reference="torch",
    x_key="N",
    tolerance=TOLERANCE,
    notes=(
        "torch: `F.layer_norm` / `F.rms_norm`; with the residual, the unfused `s = x + residual`, then the norm of s, "
        "returning (y, s).",
        "torch.compile: that same function, compiled anew per case with `fullgraph=True, dynamic=False`, default "
        "mode.",
        "liger: `LigerLayerNormFunction` (residual added unfused first), `LigerRMSNormFunction`, "
        "`LigerFusedAddRMSNormFunction`; casting_mode 'llama', in_place=False.",
        "Weights and biases in x's dtype. Bytes: forward reads x (+ residual), weight (+ bias), writes y "
        "(+ residual_out); backward reads dy, x (+ d residual_out), weight, writes dx, dw (+ db).",
    ),
)
