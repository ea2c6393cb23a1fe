"""`python -m benchmarks.launch_check`: does fastlm's direct Triton launch path (kernels/_launch.py) compute what
Triton's own launch path computes, on this GPU? Exit 0 when it does, 1 (saying why) when it does not (or raises, or
hangs), 2 without a CUDA GPU, 3 when the check itself could not run (Triton's own path failed: nothing is known).

Every Triton kernel call of fastlm goes through the direct path, written against Triton 3.6's JITFunction.run and
tested on a CPU only with a stand-in driver (tests/test_launch.py): should it be wrong on a real GPU, every
Triton kernel would fail or compute garbage, and a lent GPU's session would learn nothing else. scripts/gpu_check.sh
runs this first and, on a failure, turns the path off (FASTLM_TRITON_DIRECT=0) for everything after it.

How: a set of small calls covering the kernels' argument kinds (pointers, ints of both classes, floats, None,
constexprs, 1-valued ints, unaligned views; norms with and without a residual, cross-entropy with weights and
ignored rows, SwiGLU, rotary, the attention forward and decode) runs three times on the triton backend:
with the direct path off (Triton's own path only: it compiles and launches), then on (the first launch of each
pattern still takes Triton's path, and the direct path caches it), then on again (every launch direct). The
third run's outputs and gradients must equal the first's bit for bit (the kernels are deterministic: no float
atomics on these calls).
"""

import itertools
import os
import sys


def _calls(device):
    """[(name, fn)]: fn() → a list of tensors, the outputs and gradients of one small call."""
    import torch

    import fastlm

    drawn = itertools.count()

    def randn(*shape, dtype=torch.bfloat16, grad=False):  # each input its own seed: no two alike
        g = torch.Generator(device=device).manual_seed(next(drawn))
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_(grad)

    def with_grads(fn, *inputs):
        def run():
            leaves = [t.detach().requires_grad_() for t in inputs]
            out = fn(*leaves)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            return [o.detach() for o in outs] + [t.grad for t in leaves]
        return run

    x, r, w, b = randn(37, 1000), randn(37, 1000), randn(1000), randn(1000)
    wide = randn(3, 20001)
    logits, target = randn(29, 3001), torch.randint(0, 3001, (29,), device=device)
    target[::7] = -100
    class_weight = torch.rand(3001, device=device)
    gate, up = randn(5, 333), randn(5, 333)
    q, k, v = randn(2, 130, 4, 64), randn(2, 130, 2, 64), randn(2, 130, 2, 64)
    cos, sin = randn(130, 32, dtype=torch.float32), randn(130, 32, dtype=torch.float32)
    cache_k, cache_v, q1 = randn(3, 700, 2, 128), randn(3, 700, 2, 128), randn(3, 1, 8, 128)
    return [
        ("layer_norm", with_grads(lambda x, w, b: fastlm.layer_norm(x, w, b), x, w, b)),
        ("rms_norm + residual", with_grads(lambda x, r, w: fastlm.rms_norm(x, w, residual=r), x, r, w)),
        ("rms_norm, a strided view", with_grads(lambda x: fastlm.rms_norm(x[:, 1:999]), x)),
        ("rms_norm, chunked rows", with_grads(lambda x: fastlm.rms_norm(x), wide)),
        ("cross_entropy", with_grads(lambda z: fastlm.cross_entropy(z, target, weight=class_weight,
                                                                    label_smoothing=0.1), logits)),
        ("swiglu", with_grads(fastlm.swiglu, gate, up)),
        ("rotary_embedding", with_grads(lambda x: fastlm.rotary_embedding(x, cos, sin), q)),
        # The forward only: the backward's three kernels would add a minute of compiling on a cold cache.
        ("attention, causal GQA", lambda: [fastlm.attention(q, k, v, causal=True)]),
        ("attention, decode", lambda: [fastlm.attention(q1, cache_k, cache_v, causal=True)]),
    ]


# Exit statuses: 0 the paths agree, 1 the direct path differs, raises or hangs, 2 no CUDA GPU, 3 the check could
# not run (Triton's own path failed or hung, an import failed, ...): nothing said about the direct path.
DIFFERS, NO_GPU, NOT_RUN = 1, 2, 3
HANG_S = 120.0  # each of the first two passes over the calls (compiles included)
DIRECT_HANG_S = 30.0  # one call on the direct path (compiled by then)


def check(device="cuda", log=print, hang_s=None, direct_hang_s=None) -> list:
    """The names of the calls whose direct-path results differ from Triton's own path's (or raise), [] when none
    do. Runs every call three times under the triton backend (module docstring). Errors of the first two runs
    (Triton's own path, then the caching one) propagate: they say nothing about the direct path. hang_s: the
    limit of each of the first two passes, direct_hang_s of each call of the third; one that outruns it ends the
    process (NOT_RUN for the first two, DIFFERS for the third)."""
    import torch

    import fastlm
    from benchmarks import hang
    from fastlm.kernels import _launch

    if not _launch.ENABLED:
        log(f"the direct path is off here (Triton {__import__('triton').__version__}, FASTLM_TRITON_DIRECT="
            f"{os.environ.get('FASTLM_TRITON_DIRECT', 'unset')}): nothing to check")
        return []

    def said(exit_code, what, seconds=hang_s):
        return hang.Watchdog(seconds, lambda row: log(f"{what} did not finish in {seconds:g} s"), exit_code)

    bad = []
    with fastlm.use_backend("triton"):
        calls = _calls(device)
        first = {}
        _launch.ENABLED = False
        try:
            with said(NOT_RUN, "Triton's own path").unit({}):
                for name, fn in calls:  # Triton's own path only
                    first[name] = fn()
                torch.cuda.synchronize(device)
        finally:
            _launch.ENABLED = True
        with said(NOT_RUN, "the run that caches the direct launches").unit({}):
            for name, fn in calls:  # the direct path caches each pattern at its first launch
                fn()
            torch.cuda.synchronize(device)
        cached = len(_launch._cache)
        for name, fn in calls:  # every launch direct
            try:
                with said(DIFFERS, f"{name} on the direct path", direct_hang_s).unit({}):
                    again = fn()
                    torch.cuda.synchronize(device)
            except Exception as e:  # noqa: BLE001 - a launch the direct path breaks is the finding
                bad.append(name)
                log(f"{name}: the direct path raised {type(e).__name__}: {e}")
                continue
            same = len(again) == len(first[name]) and all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(again, first[name]))
            if not same:
                bad.append(name)
                log(f"{name}: the direct path's results differ from Triton's own path's")
    log(f"{len(calls)} calls, {cached} direct launch patterns cached: "
        + ("the direct path agrees with Triton's own" if not bad else f"{len(bad)} differ: {', '.join(bad)}"))
    if cached == 0:
        log("no launch went through the direct path: the check checked nothing")
        bad.append("(no direct launches)")
    return bad


def main() -> int:
    try:
        import torch

        if not torch.cuda.is_available():
            print("launch_check: no CUDA GPU here; the direct path runs only on one")
            return NO_GPU
        return DIFFERS if check(hang_s=HANG_S, direct_hang_s=DIRECT_HANG_S) else 0
    except Exception as e:  # noqa: BLE001 - any failure outside the direct path's own runs
        print(f"launch_check: the check could not run ({type(e).__name__}: {e}); nothing is known of the direct "
              "path")
        return NOT_RUN


if __name__ == "__main__":
    sys.exit(main())
