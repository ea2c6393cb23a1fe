"""Which kernel backend `auto` picks for each op on each GPU: filled from measurements, never from a guess.

MEASURED maps a device name (as torch.cuda.get_device_name prints it) to {op: [fastest, ..., slowest]}, the
implementations in the order `auto` tries them: the fastlm backends "triton" and "cuda", and torch's own kernels
for the calls they cover ("torch:eager", "torch:sdpa-cudnn", "torch:sdpa-flash"; fastlm._backend.NATIVE), which
`auto` passes over for a call they cannot take (a window, varlen, softcap, mixed dtypes). It is copied from the
"order" of each op in `benchmarks/results/<device>/dispatch.json`, which `python -m benchmarks` writes from the
forward+backward timings of the same run. A device or op with no measurement yet uses UNMEASURED_ORDER: the
triton backend first, because it is the one whose every kernel CI runs through the interpreter.
"""

MEASURED = {}

UNMEASURED_ORDER = ("triton", "cuda")


# An op without an entry of its own takes its parent's: decode calls the training attention's order.
FALLBACK = {"attention_decode": "attention"}


def preferred(op: str, device_name: str):
    table = MEASURED.get(device_name, {})
    order = table.get(op)
    if order is None and op in FALLBACK:
        order = table.get(FALLBACK[op])
    return tuple(order if order is not None else UNMEASURED_ORDER)
