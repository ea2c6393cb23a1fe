"""Which kernel backend `auto` picks for each op on each GPU: filled from measurements, never from a guess.

MEASURED maps a device name (as torch.cuda.get_device_name prints it) to {op: [fastest, ..., slowest]}, the
implementations in the order `auto` tries them: the fastlm backends "triton" and "cuda", and torch's own kernels
for the calls they cover ("torch:eager", "torch:sdpa-cudnn", "torch:sdpa-flash"; fastlm._backend.NATIVE), which
`auto` passes over for a call they cannot take (a window, varlen, softcap, mixed dtypes). It is copied from the
"order" of each op in `benchmarks/results/<device>/dispatch.json`, which `python -m benchmarks` writes from the
forward+backward timings of the same run. A device or op with no measurement yet uses UNMEASURED_ORDER: the
triton backend first, because it is the one whose every kernel CI runs through the interpreter.

Until the suite has run on a device, its entry may come from side-by-side measurements of the same calls on that
device by another harness, each cited where it is used: real timings, older than the kernels they judged, so the
first `python -m benchmarks` run there replaces the entry whole.
"""

MEASURED = {
    # Interim, until the benchmark suite runs on an H200: `do_bench` medians (bf16, torch 2.11, triton 3.6) of an
    # independent harness run on 2026-11-29, in the session of the project's first GPU run
    # (../shared/gpu-runs/h200-2026-11-29), filed with issues 12, 13 and 15 (../shared/TARGETS.md): forward +
    # backward, decode forward only. fastlm's kernels have changed since (norm backward, host path, attention
    # paths), untimed: the order below is what was measured, so `auto` routes to what won then. (Under
    # torch.compile attention takes the fastlm kernels, cuda first: a graph holds one implementation, and the
    # SDPA routes are eager only.)
    "NVIDIA H200": {
        # b4 s4096 h32 d128 (causal, non-causal, 8 KV heads) and b8 s2048 h16 d64 causal, TFLOP/s fwd+bwd: cuDNN
        # 501 / 593 / 516 / 327, FA2 293 / 314 / 288 / 223, fastlm-cuda 121 / 123 / 119 / 170, fastlm-triton
        # 118 / 124 / 119 / 156.
        "attention": ["torch:sdpa-cudnn", "torch:sdpa-flash", "cuda", "triton"],
        # One query, GQA 32/8, d128, GB/s of K and V: batch 16 × 8k keys FA2 3874, cuda 3234, triton 1306; batch
        # 1 × 64k keys FA2 2995, cuda 2902, triton 107 (cuDNN's decode was not measured).
        "attention_decode": ["torch:sdpa-flash", "cuda", "triton"],
        # 16384 × 4096 (and 1024 × 65536 for RMSNorm), ms fwd+bwd: eager 0.308 / 0.456, fastlm-cuda 0.875 /
        # 0.705, fastlm-triton 0.766 / 0.940; LayerNorm eager 0.336, cuda 1.063, triton 1.153; residual add +
        # RMSNorm eager 0.553, cuda 0.986, triton 1.221.
        "layer_norm": ["torch:eager", "cuda", "triton"],
        "rms_norm": ["torch:eager", "cuda", "triton"],
        # 8192 × 128256, ms fwd+bwd: cuda 2.09, triton 2.93 (eager bf16 4.61; torch has no route here).
        "cross_entropy": ["cuda", "triton"],
        # 8192 tokens × 4096 × 128256, ms fwd+bwd: triton 46.4, cuda 51.2.
        "linear_cross_entropy": ["triton", "cuda"],
    },
}

UNMEASURED_ORDER = ("triton", "cuda")


# An op without an entry of its own takes its parent's: decode calls the training attention's order.
FALLBACK = {"attention_decode": "attention"}


def preferred(op: str, device_name: str):
    table = MEASURED.get(device_name, {})
    order = table.get(op)
    if order is None and op in FALLBACK:
        order = table.get(FALLBACK[op])
    return tuple(order if order is not None else UNMEASURED_ORDER)
