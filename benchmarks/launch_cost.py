"""`python -m benchmarks.launch_cost`: what a Triton launch costs on the host, per kernel launch, on a CPU.

`benchmarks.overhead` stubs every launch out. This times the rest of a Triton launch two ways: through Triton's own
`JITFunction.run` (binding the arguments, specializing them: types, 16-byte alignment of pointers and ints; the
kernel cache's key and lookup; the launch metadata; the call of the compiled kernel's launcher), and through
fastlm's direct path (kernels/_launch.py: its own cache key, then the launcher). Everything runs as on a GPU except
below Triton: a stand-in driver answers the device, stream and target queries (an sm_90a target, so the kernels are
compiled for Hopper once, here, by Triton's own compiler), loads no binary and has a launcher that does nothing, so
the C launcher's argument packing and the driver's cuLaunchKernel (the same both ways) are not counted.

Each of fastlm's Triton launchers in LAUNCHES runs on small CPU tensors three times: through Triton's path, through
the direct path, and with `JITFunction.run` replaced by a no-op (which the direct path then defers to). The
differences, divided by the launches the call makes, are each path's cost per launch. Run it in its own process (it
installs the stand-in driver; TRITON_INTERPRET must be unset, since the interpreter replaces the JIT):

    python -m benchmarks.launch_cost                # every launcher
    python -m benchmarks.launch_cost --ops norm_fwd # some
"""

import argparse
import os
import sys
import timeit


def _install_driver(launched: list = None):
    """Makes a stand-in driver Triton's active one. Its launcher does nothing, or, given `launched`, appends
    (the compiled kernel's hash, the launcher's arguments) to it."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return 0, 0, 32, 0, 1024  # module, function, registers, spills, max threads

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132}

    class Driver:
        utils = Utils()

        def __init__(self):
            if launched is None:
                self.launcher_cls = lambda src, metadata: (lambda *args: None)
            else:
                self.launcher_cls = lambda src, metadata: (lambda *args: launched.append((metadata.hash, args)))

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

    driver.set_active(Driver())


LAUNCHES = ("norm_fwd", "norm_bwd", "cross_entropy_fwd", "attention_fwd", "gated_fwd", "rotary_fwd")


def _launchers():
    """name → call, for each of LAUNCHES. Small shapes: the host path does not depend on the size."""
    import torch

    from fastlm.kernels import attention, cross_entropy, gated, norm, rotary

    bf16 = dict(dtype=torch.bfloat16)
    x, w = torch.randn(64, 1024, **bf16), torch.randn(1024, **bf16)
    _, _, mean, rstd = norm.norm_fwd(x, w, w, None, 1e-5, False, 0.0)
    logits, target = torch.randn(64, 4096, **bf16), torch.randint(0, 4096, (64,))
    q, k, v = (torch.randn(1, 256, 8, 64, **bf16) for _ in range(3))
    gate, up = torch.randn(64, 1024, **bf16), torch.randn(64, 1024, **bf16)
    xr, cos = torch.randn(1, 64, 8, 64, **bf16), torch.randn(64, 64, **bf16)
    return {
        "norm_fwd": lambda: norm.norm_fwd(x, w, w, None, 1e-5, False, 0.0),
        "norm_bwd": lambda: norm.norm_bwd(x, x, w, mean, rstd, None, False, 0.0, True, True),
        "cross_entropy_fwd": lambda: cross_entropy.cross_entropy_fwd(logits, target, None, -100, 0.0, 0.0, None,
                                                                     "mean", True),
        "attention_fwd": lambda: attention.attention_fwd(q, k, v, None, None, None, None, 0.125, None, None, None),
        "gated_fwd": lambda: gated.gated_fwd(gate, up, "silu"),
        "rotary_fwd": lambda: rotary.rotary_fwd(xr, cos, cos, False, False),
    }


def _launches(call) -> int:
    """How many kernel launches one call makes (every fastlm launcher launches through kernels/_launch.py)."""
    from fastlm.kernels import _launch

    count = []
    real = _launch.launch
    _launch.launch = lambda *args, **kwargs: count.append(1) or real(*args, **kwargs)
    try:
        call()
    finally:
        _launch.launch = real
    return len(count)


def _best(fn, number=2000, repeat=10):
    for _ in range(number):
        fn()
    return min(timeit.Timer(fn).timeit(number) / number * 1e6 for _ in range(repeat))


def measure(ops=None):
    """[(name, µs through Triton's launch path, µs through fastlm's direct path, µs with launches stubbed,
    launches, µs per launch each way)]."""
    from triton.runtime.jit import JITFunction

    from fastlm.kernels import _launch

    rows = []
    calls = _launchers()
    for name in LAUNCHES:
        if ops and name not in ops:
            continue
        call = calls[name]
        launches = _launches(call)  # (compiles its kernels once, cached on disk as any Triton compile; fills the
        #                             direct path's cache)
        saved = _launch.ENABLED
        try:
            _launch.ENABLED = False
            triton_path = _best(call)
            _launch.ENABLED = True
            direct = _best(call)
        finally:
            _launch.ENABLED = saved
        real = JITFunction.run
        JITFunction.run = lambda self, *args, **kwargs: None  # _launch.launch then goes through it: no launch at all
        try:
            stubbed = _best(call)
        finally:
            JITFunction.run = real
        rows.append((name, triton_path, direct, stubbed, launches, (triton_path - stubbed) / launches,
                     (direct - stubbed) / launches))
    return rows


def table(rows) -> str:
    lines = ["| launcher | through Triton's launch path (µs) | through fastlm's direct path (µs) | launches stubbed "
             "(µs) | launches | Triton's path per launch (µs) | direct path per launch (µs) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {t:.1f} | {d:.1f} | {s:.1f} | {k} | {pt:.1f} | {pd:.1f} |" for n, t, d, s, k, pt, pd in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", nargs="*", help="launchers to time (default: all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 replaces Triton's JIT by its interpreter: unset it", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    _install_driver()
    print(table(measure(args.ops)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
