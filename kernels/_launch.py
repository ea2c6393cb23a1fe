"""`launch(kernel, grid, *args, **kwargs)`: a Triton launch with a third of `kernel[grid](*args, **kwargs)`'s host
work, the same kernel and the same launcher call.

Triton's `JITFunction.run` spends 9-23 µs of Python per launch (`benchmarks.launch_cost`): it binds every argument
to the signature, specializes each one in C (type, 16-byte alignment of pointers, ints divisible by 16 or equal to
1), turns that list and the options into a string key, looks the compiled kernel up, builds the launch metadata and
calls the kernel's launcher. fastlm's launchers call the same few kernels with the same keyword arguments millions
of times, so this module keeps, per call pattern, what that work decides, and on later calls goes straight to the
launcher with exactly the arguments `run` would give it.

The cache key must separate every call that Triton's specialization separates, or a launch would run a kernel
compiled for other arguments (say, one that assumes a 16-byte-aligned pointer). The calling convention makes that
checkable: the kernel's runtime parameters come positionally and only its constexprs and launch options by
keyword. The key holds the kernel, the current device, the keyword arguments by name, value and type (1, 1.0 and
True are equal in Python but not to Triton), and for each positional argument a value that determines Triton's
specialization of it: a tensor's dtype and whether its address is a multiple of 16; an int's range class (i32, i64,
u64), whether it is divisible by 16 and whether it is 1 (Triton makes a 1 a constant); a marker for a float, a
bool or None. So two calls with equal keys get equal specializations, hence the same compiled kernel. (The key may
separate more than Triton does; that costs only a second cache entry.) Positional arguments are keyed by class,
so a kernel's keys stay few however its sizes vary; keyword values are keyed exactly, which is why runtime values
must not come by keyword. A kernel called against the convention (a constexpr positionally, a runtime parameter
by keyword: found when its first call is cached) takes Triton's own path from then on, as does any argument type
the key does not cover (a TMA descriptor, a numpy scalar, an int no Triton type holds), and every call while a
launch hook is installed, Triton's debug mode or instrumentation is on, the kernel has pre-run hooks, or the grid
is not a tuple. The module-level constants a kernel read are checked on every launch, as Triton does.

The first call of each pattern runs Triton's own `run` (which compiles if needed and launches), then binds the
arguments once more with the kernel's own binder to learn what follows the positional arguments in the launcher's
argument list (the constexprs and defaults, fixed by the key). Launch hooks: Triton passes its (empty) hook chains
and launch metadata to the launcher, which calls the chains; this passes None for both, which the launcher skips:
the same effect. Guarded to the Triton version it was written against (`requirements.txt` pins it);
FASTLM_TRITON_DIRECT=0 turns it off. tests/test_launch.py checks, on a CPU with a stand-in driver, that both paths
hand the launcher the same arguments for every fastlm launcher and that the key never merges two specializations.
"""

import os

import torch
import triton
from triton import knobs
from triton.knobs import HookChain
from triton.runtime import driver
from triton.runtime.jit import JITFunction

VERSIONS = ("3.6.0",)  # the Triton versions whose launch path this reproduces (read from their jit.py)
ENABLED = triton.__version__ in VERSIONS and os.environ.get("FASTLM_TRITON_DIRECT", "1") != "0"

# The launch path this reproduces. Where something replaced it (the static report's recorder, a benchmark's stub),
# that runs instead; if it was replaced when this module was imported, the direct path stays off.
_RUN = JITFunction.run if (JITFunction.run.__module__, JITFunction.run.__qualname__) == ("triton.runtime.jit",
                                                                                          "JITFunction.run") else None
# key → (launcher, function handle, packed metadata, arguments after the positional ones, compiled kernel, the
# JITFunction: keys hold its id, which stays its own while the entry keeps it alive; hashing a JITFunction takes a lock)
_cache = {}
_MISSING = object()
_TRITON_ONLY = {}  # id → kernel, for kernels called against the convention (module docstring): Triton's path
_I32, _I64 = 2**31, 2**63
_DTYPES = {d: 2 + 2 * i for i, d in enumerate(sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)},
                                                      key=str))}  # dtype → an even int ≥ 2


def _direct_ok(kernel):
    """No launch hook installed (Triton's default: empty hook chains; also None), no debug mode, no
    instrumentation, no pre-run hooks: what the direct path assumes."""
    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return ((enter is None or type(enter) is HookChain and not enter.calls)
            and (leave is None or type(leave) is HookChain and not leave.calls)
            and not runtime.debug and not kernel.debug and not kernel.pre_run_hooks
            and not knobs.compilation.instrumentation_mode)


def key(kernel, device, args, kwargs):
    """The cache key of a call (module docstring), or None when an argument is of a type the key does not cover.
    Flat, of small ints where it can be (a tuple's hash is not cached: every lookup rehashes it): the kernel, the
    device, the keyword arguments' count, names, values and types, then one element per positional argument, whose kind
    its value tells apart: an int gives -1 for 1 (a constant to Triton), a bool for i32 (divisible by 16 or not),
    a pair of bools for i64/u64 (divisible, below 2⁶³); a float, a bool or None its type; a pointer an int ≥ 2
    from its dtype and whether its address is 16-byte aligned."""
    k = [id(kernel), device, len(kwargs), *kwargs, *kwargs.values(), *map(type, kwargs.values())]
    append = k.append
    for a in args:
        t = type(a)
        if t is int:
            if -_I32 <= a < _I32:
                append(-1 if a == 1 else not a & 15)
            elif -_I64 <= a < 2 * _I64:
                append((not a & 15, a < _I64))
            else:
                return None  # no Triton int type holds it: Triton's path raises its own error
        elif t is float or t is bool or a is None:
            append(t)
        else:  # Triton takes anything with a data_ptr as a pointer
            try:
                append(_DTYPES[a.dtype] + (not a.data_ptr() & 15))
            except (AttributeError, KeyError):
                return None
    return tuple(k)


def launch(kernel, grid, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)` with less host work (module docstring). grid: a tuple of 1 to 3 ints.
    Returns the compiled kernel, as `kernel[grid](...)` does."""
    if not (ENABLED and type(kernel) is JITFunction and JITFunction.run is _RUN and type(grid) is tuple
            and id(kernel) not in _TRITON_ONLY and _direct_ok(kernel)):
        return kernel[grid](*args, **kwargs)  # also where JITFunction.run is replaced (the static report's recorder)
    active = driver.active
    device = active.get_current_device()
    k = key(kernel, device, args, kwargs)
    entry = _cache.get(k) if k is not None else None
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        if k is not None and compiled is not None:
            params = kernel.params
            if (any(p.is_constexpr for p in params[:len(args)])
                    or any(not p.is_constexpr for p in params if p.name in kwargs)):
                _TRITON_ONLY[id(kernel)] = kernel  # against the convention: the key would not separate its calls
            else:
                bound = kernel.device_caches[device][4](*args, **kwargs)[0]
                _cache[k] = (compiled.run, compiled.function, compiled.packed_metadata,
                             tuple(bound.values())[len(args):], compiled, kernel)
        return compiled
    run, function, packed, tail, compiled, _ = entry
    for (name, _), (value, where) in kernel.used_global_vals.items():  # as Triton checks them on every launch
        if where.get(name, _MISSING) != value:
            return kernel[grid](*args, **kwargs)  # which raises Triton's own error
    n = len(grid)
    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, active.get_current_stream(device), function,
        packed, None, None, None, *args, *tail)
    return compiled
