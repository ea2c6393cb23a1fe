"""Cross-entropy and fused linear cross-entropy benchmarks: fastlm's triton and cuda backends against torch eager,
torch.compile and Liger-Kernel, forward, backward and forward+backward, reduction "mean". Two families, both
listed in FAMILIES (FAMILY is the first, for a caller that reads one family a module).

cross_entropy (memory bound: GB/s against the measured copy bandwidth). Bytes per call, as TARGETS.md counts the
ideal, for (rows, V) logits of dtype size d, L = rows·V·d: the forward reads the logits once (L); forward+backward
reads them once and writes their gradient once (2·L); the backward alone is the difference, the gradient written
once (L). The targets (8 bytes a row) and the loss are left out. The incoming gradient is 1.0, as loss.backward()
gives: fastlm and Liger write the finished gradient in the forward, so their backward only checks that scalar
(no pass over the logits) and their bwd rows are not a bandwidth; the comparable row is fwd+bwd.

linear_cross_entropy (compute bound: TFLOP/s against the measured bf16 matmul rate). hidden (tokens, H) and the
head's weight (V, H), no bias: 2·tokens·H·V FLOPs forward (the logits), 4·tokens·H·V backward (d hidden and
d weight), 6·tokens·H·V forward+backward, whatever an implementation does on top (the fused ones compute the
gradients in their forward, so their fwd row does the work of fwd+bwd and is credited 2·tokens·H·V; compare
fwd+bwd).

The sweeps are sized for the GPU session (scripts/gpu_check.sh runs every benchmark in a few minutes): torch.compile
compiles every case anew, a few seconds each, and the largest cases move tens of GB a call in torch eager, so
the shapes are few. A case is left out when its logits exceed MAX_LOGITS_BYTES, the most that leaves room on an
80 GB H100 for torch eager's float32 copies (see there): that leaves out rows 32768 × V 262144 in bf16 and
rows 16384 × V 262144 in fp32, 16 GiB of logits each.
"""

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import Case, Family, Provider

REDUCTION = "mean"
IGNORE_INDEX = -100  # torch's default, passed explicitly to the peers that take it positionally
# torch eager's fwd+bwd on bf16 logits of L bytes holds about 6·L more at its peak (the float32 copy, its
# log-softmax, and in the backward the float32 gradient twice), next to the inputs (L) and the reference's kept
# gradient (L): 8·L, which must fit in 80 GB. 2**33 bytes (64 GiB for 8·L) is the largest power of two that does.
MAX_LOGITS_BYTES = 1 << 33

ROWS = (4096, 16384, 32768)  # bf16: every (rows, V) whose logits fit MAX_LOGITS_BYTES
VOCABS = (32000, 131072, 262144)  # Llama 2's 32000; Llama 3's 128256 and Gemma's 256000 rounded up to powers of 2
FP32_ROWS = (16384,)  # fp32 at fewer shapes: these rows, every V that fits
QUICK_CE = ((torch.bfloat16, 4096, 32000), (torch.bfloat16, 4096, 131072), (torch.float32, 4096, 32000))
# Issue 13's measured shapes, exactly (Llama 3's vocabulary, 8192 tokens), so its targets are read off the sweep.
ISSUE_CE = ((torch.bfloat16, 8192, 128256),)

# (tokens, hidden, V), bf16: both token counts and vocabularies at hidden 4096, and the largest at hidden 2048.
LCE_SHAPES = ((4096, 4096, 32000), (4096, 4096, 131072), (16384, 4096, 32000), (16384, 4096, 131072),
              (16384, 2048, 131072), (8192, 4096, 128256))  # the last: issue 13's measured shape
QUICK_LCE = ((4096, 2048, 32000),)

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3}
PROBE_SHAPE = (4, 64)  # (rows, V) of the one tiny call that asks a fastlm backend whether it can run the op


# ---------------------------------------------------------------------------------------------- cases and work


def _ce_case(dtype, rows, v):
    return Case("cross_entropy", dtype, {"rows": rows, "V": v})


def _lce_case(tokens, hidden, v):
    return Case("linear_cross_entropy", torch.bfloat16, {"tokens": tokens, "hidden": hidden, "V": v})


def logits_bytes(case: Case) -> int:
    """Bytes of the (rows, V) logits: the input of cross_entropy, the tensor eager linear_cross_entropy makes."""
    rows = case.params["rows"] if case.op == "cross_entropy" else case.params["tokens"]
    return rows * case.params["V"] * case.dtype.itemsize


def ce_grid() -> list:
    """Every cross_entropy case of the sweep before the memory cap: bf16 at every rows × V, fp32 at FP32_ROWS."""
    return ([_ce_case(torch.bfloat16, rows, v) for rows in ROWS for v in VOCABS]
            + [_ce_case(torch.float32, rows, v) for rows in FP32_ROWS for v in VOCABS]
            + [_ce_case(*c) for c in ISSUE_CE])


def ce_cases(quick: bool) -> list:
    """11 cases (3 with --quick): 9 bf16, 2 fp32; each runs 5 providers × 3 modes."""
    if quick:
        return [_ce_case(*c) for c in QUICK_CE]
    return [c for c in ce_grid() if logits_bytes(c) <= MAX_LOGITS_BYTES]


def lce_cases(quick: bool) -> list:
    """6 cases (1 with --quick); each runs 5 providers × 3 modes."""
    return [_lce_case(*shape) for shape in (QUICK_LCE if quick else LCE_SHAPES)]


def ce_work(case: Case, mode: str) -> int:
    """Bytes one call must move: the logits read once forward, their gradient written once backward."""
    logits = logits_bytes(case)
    return {"fwd": logits, "bwd": logits, "fwd+bwd": 2 * logits}[mode]


def lce_work(case: Case, mode: str) -> int:
    """FLOPs of one call: the logits matmul forward, the d hidden and d weight matmuls backward."""
    p = case.params
    matmul = 2 * p["tokens"] * p["hidden"] * p["V"]
    return {"fwd": matmul, "bwd": 2 * matmul, "fwd+bwd": 3 * matmul}[mode]


# ---------------------------------------------------------------------------------------------- inputs


def _loss_grad(device):
    # What loss.backward() gives: the fused implementations special-case it (no pass over their gradient).
    return (torch.ones((), device=device, dtype=torch.float32),)


def ce_inputs(case: Case, device, gen):
    """(rows, V) logits in the case's dtype, requiring grad, and int64 targets, none ignored."""
    rows, v = case.params["rows"], case.params["V"]
    logits = torch.randn((rows, v), generator=gen, device=device, dtype=case.dtype).requires_grad_()
    target = torch.randint(0, v, (rows,), generator=gen, device=device)
    return {"logits": logits, "target": target}, _loss_grad(device)


def lce_inputs(case: Case, device, gen):
    """hidden (tokens, H) and weight (V, H) in bf16, both requiring grad, scaled so the logits have unit variance;
    int64 targets, none ignored."""
    p = case.params
    hidden = torch.randn((p["tokens"], p["hidden"]), generator=gen, device=device, dtype=case.dtype)
    weight = torch.randn((p["V"], p["hidden"]), generator=gen, device=device, dtype=case.dtype)
    weight.mul_(p["hidden"] ** -0.5)
    target = torch.randint(0, p["V"], (p["tokens"],), generator=gen, device=device)
    return ({"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(), "target": target},
            _loss_grad(device))


# ---------------------------------------------------------------------------------------------- providers


def _probe(op: str, device):
    """One tiny call of fastlm.<op> with a gradient, under the current backend."""
    import fastlm

    rows, v = PROBE_SHAPE
    target = torch.zeros(rows, dtype=torch.int64, device=device)
    if op == "cross_entropy":
        logits = torch.zeros((rows, v), device=device, dtype=torch.bfloat16, requires_grad=True)
        return fastlm.cross_entropy(logits, target, reduction=REDUCTION)
    hidden = torch.zeros((rows, v), device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.zeros((v, v), device=device, dtype=torch.bfloat16, requires_grad=True)
    return fastlm.linear_cross_entropy(hidden, weight, target, reduction=REDUCTION)


def unavailable_reason(op: str, backend: str, device) -> str:
    """Why fastlm's `backend` cannot run `op` on `device`, or "" when it can (harness.fastlm_unavailable_reason with
    a tiny call with a gradient)."""
    return harness.fastlm_unavailable_reason(op, backend, lambda: _probe(op, device))


def _fastlm_available(op, backend):
    def check():
        why = unavailable_reason(op, backend, torch.device("cuda"))
        return not why, why

    return check


def _fastlm_ce(case):
    import fastlm

    def fn(i):
        return (fastlm.cross_entropy(i["logits"], i["target"], reduction=REDUCTION),)

    return fn


def _fastlm_lce(case, low_memory=False):
    import fastlm

    def fn(i):
        return (fastlm.linear_cross_entropy(i["hidden"], i["weight"], i["target"], reduction=REDUCTION,
                                            low_memory=low_memory),)

    return fn


def _fastlm_lce_low_memory(case):
    return _fastlm_lce(case, low_memory=True)


def _eager_ce(case):
    """What a user writes without fastlm: the loss in float32, the logits upcast for it."""

    def fn(i):
        return (F.cross_entropy(i["logits"].float(), i["target"], reduction=REDUCTION),)

    return fn


def _eager_lce(case):
    """The unfused composition: the bf16 logits materialized, then the float32 loss of them."""

    def fn(i):
        return (F.cross_entropy((i["hidden"] @ i["weight"].T).float(), i["target"], reduction=REDUCTION),)

    return fn


def _compiled(eager):
    def build(case):
        # Dynamo keeps its compiled variants on the code object, which every case shares: without a reset, after
        # torch's recompile limit the later cases would silently run eager.
        torch._dynamo.reset()
        return torch.compile(eager(case), dynamic=False, fullgraph=True)

    return build


def _liger_ce(case):
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

    # Liger's forward writes the gradient into the logits in place (its memory saving). What is timed: the call on
    # the harness's logits as they are, no copy inside the timed region (a copy is not what Liger's users pay).
    # The correctness check is the first call, on fresh logits; every later call runs on logits that an earlier
    # call overwrote with its gradient: finite values, and the same work, since the kernel's loads, exps and
    # stores do not depend on the values. Liger runs after every other provider of the case (it is last in the
    # list, and the harness runs the reference first, then the list in order), so no one else sees those logits.
    # Positional: weight, ignore_index, lse_square_scale (z-loss), label_smoothing, reduction, softcap, and no
    # z-loss, accuracy or predicted-token outputs. Its loss is in the logits' dtype; upcast to float32 like the
    # others (one scalar).
    def fn(i):
        out = LigerCrossEntropyFunction.apply(i["logits"], i["target"], None, IGNORE_INDEX, 0.0, 0.0, REDUCTION,
                                              None, False, False, False)
        return (out[0].float(),)

    return fn


def _liger_lce(case):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    # Positional: bias, ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap,
    # return_z_loss, accum_dtype (None, Liger's default: d weight accumulated in the weight's dtype). It leaves
    # its inputs as they are (the gradients go to buffers of their own).
    def fn(i):
        out = LigerFusedLinearCrossEntropyFunction.apply(i["hidden"], i["weight"], i["target"], None, None,
                                                         IGNORE_INDEX, 0.0, 0.0, REDUCTION, None, False, None)
        return (out[0].float(),)

    return fn


def _providers(op, build_fastlm, eager, liger, liger_module, build_low_memory=None):
    # low_memory (linear CE's opt-in) runs as a column of its own per backend, outside the dispatch table (which
    # ranks the backends' default path): issue 13 weighs its memory against its time.
    variants = [("", build_fastlm, "triton", "triton"), ("", build_fastlm, "cuda", "cuda")]
    if build_low_memory is not None:
        variants += [("-low_memory", build_low_memory, b, None) for b in ("triton", "cuda")]
    return [
        *(Provider(f"fastlm-{b}{suffix}", build, _fastlm_available(op, b), harness.fastlm_context(b), backend=ranked)
          for suffix, build, b, ranked in variants),
        Provider("torch", eager),
        Provider("torch.compile", _compiled(eager)),
        Provider("liger", liger, harness.importable(liger_module)),  # last: see _liger_ce
    ]


FAMILY = Family(
    name="cross_entropy",
    metric="bytes",
    cases=ce_cases,
    providers=_providers("cross_entropy", _fastlm_ce, _eager_ce, _liger_ce, "liger_kernel.ops.cross_entropy"),
    make_inputs=ce_inputs,
    work=ce_work,
    reference="torch",
    x_key="V",
    tolerance=TOLERANCE,
    notes=(
        "fastlm: `fastlm.cross_entropy(logits, target)`, reduction 'mean', float32 loss; its forward writes the "
        "gradient, the backward scales it by the incoming gradient.",
        "torch: `F.cross_entropy(logits.float(), target)`, the float32 loss users ask for; torch.compile: that "
        "function, compiled anew per case with `fullgraph=True, dynamic=False`, default mode.",
        "liger: `LigerCrossEntropyFunction`, which writes the gradient into the logits in place: timed on the "
        "logits as they are, no copy timed; the check is on fresh logits.",
        "Random normal logits, int64 targets, none ignored; incoming gradient 1.0 (loss.backward()). Bytes: "
        "forward reads the logits once, backward writes the gradient once, fwd+bwd both (the ideal). fastlm and "
        "liger finish the gradient in the forward, so their bwd is a check of the incoming gradient and its GB/s "
        "is not a bandwidth: compare fwd+bwd.",
    ),
)

LINEAR_FAMILY = Family(
    name="linear_cross_entropy",
    metric="flops",
    cases=lce_cases,
    providers=_providers("linear_cross_entropy", _fastlm_lce, _eager_lce, _liger_lce,
                         "liger_kernel.ops.fused_linear_cross_entropy", _fastlm_lce_low_memory),
    make_inputs=lce_inputs,
    work=lce_work,
    reference="torch",
    x_key="V",
    tolerance=TOLERANCE,
    notes=(
        "fastlm: `fastlm.linear_cross_entropy(hidden, weight, target)`, reduction 'mean', no bias: the logits are "
        "never materialized; fastlm-*-low_memory: the same with `low_memory=True` (no fp32 d weight: the logits "
        "made again in vocabulary blocks, 8·tokens·hidden·V FLOPs; the table counts 6· for every provider).",
        "torch: `F.cross_entropy((hidden @ weight.T).float(), target)`, the bf16 logits materialized; "
        "torch.compile: that function, compiled anew per case with `fullgraph=True, dynamic=False`, default mode.",
        "liger: `LigerFusedLinearCrossEntropyFunction`, its defaults (accum_dtype None: d weight accumulated in "
        "bf16).",
        "bf16 hidden and weight, logits of unit variance, int64 targets, none ignored; incoming gradient 1.0. "
        "FLOPs: 2·tokens·hidden·V forward, 4· backward, 6· fwd+bwd. fastlm and liger compute the gradients in "
        "the forward, so their fwd row does the fwd+bwd work and their bwd row is a check of the incoming "
        "gradient: compare fwd+bwd.",
    ),
)

FAMILIES = (FAMILY, LINEAR_FAMILY)
