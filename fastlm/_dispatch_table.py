"""Which kernel backend `auto` picks for each op on each GPU: filled from measurements, never from a guess.

MEASURED maps a device name (as torch.cuda.get_device_name prints it) to {op: [faster backend, other backend]}.
It is copied from `benchmarks/results/<device>/dispatch.json`, which `python -m benchmarks` writes from the
forward+backward timings of the same run. A device or op with no measurement yet uses UNMEASURED_ORDER: the
triton backend first, because it is the one whose every kernel CI runs through the interpreter.
"""

MEASURED = {}

UNMEASURED_ORDER = ("triton", "cuda")


def preferred(op: str, device_name: str):
    return tuple(MEASURED.get(device_name, {}).get(op, UNMEASURED_ORDER))
