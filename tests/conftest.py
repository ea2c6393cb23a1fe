"""Shared test set-up: devices, backends, the tolerance rule of DESIGN.md and NaN-poisoned kernel outputs.

Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by
`make test`); GPU-only tests are marked `gpu` and skip with the reason.
"""

import contextlib
import fcntl
import gc
import json
import math
import os
import tempfile
import zlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastlm
from fastlm import _cuda, _util

# fastlm.kernels is the checkout's top-level kernels/ (setup.py's package_dir). Where the python in use has another
# checkout installed in editable mode, `import fastlm` finds this checkout's package (pytest's pythonpath) but
# fastlm.kernels that other checkout's: the tests would run one tree's ops on another's kernels, silently.
_KERNELS = os.path.realpath(os.path.dirname(fastlm.kernels.__file__))
_HERE = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir, "kernels"))
if _KERNELS != _HERE:
    raise RuntimeError(f"fastlm.kernels comes from {_KERNELS}, not this checkout's {_HERE}: install this checkout "
                       "(make setup), or use a python where fastlm is not installed from another checkout")

# Hooks for finishing the suite across device calls and not re-running a test that ended its xdist worker.
from _resume import (deselect_finished, pytest_configure, pytest_runtest_logreport,  # noqa: F401
                     pytest_runtest_setup, pytest_unconfigure)

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda") if HAS_GPU else torch.device("cpu")

# --- threads -----------------------------------------------------------------------------------------------------
# Each xdist worker gets its share of the CPUs for torch's intra-op threads. Left at torch's default, every worker
# runs as many threads as there are CPUs: with `make test`'s one worker per CPU, the wide CPU tensors' ops (the
# float64 references, the tolerance rule's sampled runs) had 2 × 2 threads on 2 cores, and the norm tests at
# N = 65536 took 69 s instead of 39 (2 workers, a 2-core CPU).
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    _cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _cpus // _XDIST_WORKERS))

# --- seeds -------------------------------------------------------------------------------------------------------
# Every random draw of a test comes from FASTLM_TEST_SEED (default 0): `seeded(offset)` for a test's own generators
# (distinct offsets, 0–999, for distinct draws in one test), and the global RNG reseeded before each test from the
# seed and the test's id, so a failure reproduces alone, in any order, with the seed it prints.
TEST_SEED = int(os.environ.get("FASTLM_TEST_SEED", "0"))


def seeded(offset=0):
    """The seed of one draw: FASTLM_TEST_SEED·1000 + offset. Seed 0 gives the offsets themselves."""
    if not 0 <= offset < 1000:
        raise ValueError(f"seed offset must be in [0, 1000), got {offset}")
    return TEST_SEED * 1000 + offset


def generator(offset=0):
    """A CPU torch.Generator for one draw of a test (see `seeded`)."""
    return torch.Generator().manual_seed(seeded(offset))


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    # Above 2^62, so never the seed of a `generator(offset)`.
    torch.manual_seed(2**62 + TEST_SEED * 2**32 + zlib.crc32(request.node.nodeid.encode()))


def pytest_report_header(config):
    return f"FASTLM_TEST_SEED={TEST_SEED} (every numerics test draws its inputs from it)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        # The variables a test's draws depend on: the seed, and the fuzz's example counts.
        env = " ".join(f"{name}={os.environ[name]}" for name in ("FASTLM_FUZZ_SCALE",) if name in os.environ)
        report.sections.append(("reproduce", f"FASTLM_TEST_SEED={TEST_SEED} {env + ' ' if env else ''}python -m pytest "
                                             f"'{item.nodeid}'"))


def poisoned_empty(shape, dtype, device):
    """fastlm._util.empty for the tests: every kernel output starts as NaN (the integer minimum for integer
    outputs), so an element a kernel forgets to write fails the comparison instead of passing on leftover memory."""
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)


@pytest.fixture(autouse=True, scope="session")
def _poison_outputs():
    # The library allocates every kernel output through the module attribute fastlm._util.empty.
    unpoisoned = _util.empty
    _util.empty = poisoned_empty
    yield
    _util.empty = unpoisoned


@pytest.fixture(autouse=True, scope="session")
def _interpreter_descriptor_reduce():
    """Triton 3.6's interpreter has no TMA reduce (`tensor_descriptor.atomic_add`, which the attention backward's
    atomic dQ uses on its Hopper path; the interpreter runs that path only where tests force it): emulated here as
    the elementwise fp32 atomic add of the tile's elements inside the descriptor, which is what the hardware's
    reduce-add computes (elements outside it skipped). Only ADD is emulated; nothing is installed where Triton has
    its own."""
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if hasattr(builder, "create_descriptor_reduce"):
        yield
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"the tests' interpreter emulates only the TMA reduce-add, not {kind}")
        ptrs, mask = desc.materialize_pointers(indices)
        return self.create_atomic_rmw(ir.ATOMIC_OP.FADD, ptrs, value, mask, ir.MEM_SEMANTIC.RELAXED,
                                      ir.MEM_SYNC_SCOPE.GPU)

    builder.create_descriptor_reduce = create_descriptor_reduce
    yield
    del builder.create_descriptor_reduce


def _language_modules(fn):
    """The triton.language modules a function sees, as the interpreter's _patch_lang finds them."""
    import triton.language as tl

    return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}


@pytest.fixture(autouse=True, scope="session")
def _language_patched_once_a_launch():
    """Triton 3.6's interpreter patches triton.language (every builtin of tl, tl.tensor, tl.math and tl.core rebound
    to an interpreter function, about 1.5 ms on this project's CPU machines) when a kernel starts, and again on every
    call of a @triton.jit helper inside it (InterpretedFunction.__call__), while the kernel's patch is in place: the
    helper's patch binds the same attributes to equivalent functions of the same builder, and nothing undoes it (the
    kernel's restore puts the originals back over it). Without that repeat the whole suite took 806 s instead of
    955 (2 workers on a 2-core CPU; test_fuzz_kvcache[triton] 17.0 → 6.4 s). Here a helper called inside a running
    kernel skips it when every language module the helper sees is one the kernel's patch covered; anything else (the
    kernel's own patch, a helper seeing another module, a helper called outside a kernel) goes to Triton's, and the
    kernel's restore is Triton's own. A helper's patch that goes through adds its modules to what the running kernel
    covers: triton.language's own @jit functions (tl.sum, tl.max, tl.cdiv) see triton.language.core where the
    project's kernels see triton.language, and were patched again on every call (2104 patches in 78 launches of one
    linear cross-entropy test, 4.2 of its 44 s); Triton's patch is never undone within the kernel, so once is enough.
    Nothing changes on a GPU."""
    from triton.runtime import interpreter

    real_patch, real_call = interpreter._patch_lang, interpreter.GridExecutor.__call__
    running = []  # per kernel running: [the language modules it sees, whether its own patch is in place]

    def patch_lang(fn):
        if running and running[-1][1] and _language_modules(fn) <= running[-1][0]:
            return None  # (InterpretedFunction.__call__ drops what it returns)
        scope = real_patch(fn)
        if running:
            if running[-1][1]:
                running[-1][0] |= _language_modules(fn)
            running[-1][1] = True
        return scope

    def call(self, *args, **kwargs):
        running.append([_language_modules(self.fn), False])
        try:
            return real_call(self, *args, **kwargs)
        finally:
            running.pop()

    interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_lang, call
    yield
    interpreter._patch_lang, interpreter.GridExecutor.__call__ = real_patch, real_call


@pytest.fixture(autouse=True, scope="session")
def _interpreter_dtypes_looked_up_once():
    """The interpreter's _get_np_dtype builds a dict of 20 numpy dtypes on every call, about 17 µs; it is called for
    almost every operation of every program (111845 times, 1.9 s, in one linear cross-entropy test). Here each
    Triton scalar type's answer is kept after its first call: the same numpy dtype, element type for element type
    (a block's is its element type's, a pointer's and a block of pointers' uint64, as Triton's own gives)."""
    import triton.language as tl
    from triton.runtime import interpreter

    real = interpreter._get_np_dtype
    known = {}

    def get_np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(scalar, tl.pointer_type):
            return real(scalar)
        found = known.get(scalar)
        if found is None:
            found = known[scalar] = real(scalar)
        return found

    interpreter._get_np_dtype = get_np_dtype
    yield
    interpreter._get_np_dtype = real


DOT_CHUNK = 16  # the k of an fp16/bf16 tensor-core instruction (mma m16n8k16; wgmma k16)


def _interpreter_floats(handle):
    """An interpreter tensor's values as numbers: bfloat16 is held as uint16 bit patterns, a float32's high half."""
    if handle.dtype.is_bf16():
        return (handle.data.astype(np.uint32) << 16).view(np.float32)
    return handle.data


def _dot_in_fixed_order(real):
    """The interpreter's tl.dot with its sums in one fixed order, whatever the tile: the shared dimension in chunks
    of DOT_CHUNK, each chunk's products (in the accumulator's dtype) added as a pairwise tree, the chunks added in
    sequence, then the accumulator added (as Triton's own does). Every element's rounding depends on its row of a
    and its column of b alone; the shape of the sum is a tensor core's (a short tree per instruction, instructions
    in sequence), so the error stays what the tolerance rule's tree-like model expects (docs/TOLERANCE.md, Limits).
    fp8 operands keep Triton's own (no test multiplies fp8). bfloat16 operands, which the interpreter keeps as their
    bit patterns in uint16 (Triton's own dot multiplies those integers), are read as the numbers they encode."""

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:
            return real(self, a, b, d, input_precision, max_num_imprecise_acc)
        from triton.runtime.interpreter import TensorHandle

        acc = d.data.dtype
        x, y = (_interpreter_floats(t).astype(acc) for t in (a, b))
        out = None
        for k0 in range(0, x.shape[-1], DOT_CHUNK):
            terms = x[..., :, k0:k0 + DOT_CHUNK, None] * y[..., None, k0:k0 + DOT_CHUNK, :]  # (..., M, k, N)
            while terms.shape[-2] > 1:
                half = terms.shape[-2] // 2
                pairs = terms[..., :half, :] + terms[..., half:2 * half, :]
                terms = np.concatenate([pairs, terms[..., 2 * half:, :]], axis=-2) if terms.shape[-2] % 2 else pairs
            out = terms[..., 0, :] if out is None else out + terms[..., 0, :]
        return TensorHandle(out + d.data, d.dtype.scalar)

    return create_dot


@pytest.fixture(autouse=True, scope="session")
def _tile_independent_dot():
    """Triton 3.6's interpreter computes tl.dot with np.matmul, that is with the machine's BLAS, whose rounding of
    an element depends on the matrix's shape: the first 16 rows of a 64 × 64 fp16 product, computed alone, differ
    from the same rows of the whole in 156 of 1024 elements with OpenBLAS's Haswell kernel (its choice on an AMD
    EPYC of this project's CPU machines) or its Zen kernel, in none with its SkylakeX kernel, and a single row (a gemv)
    differs with every kernel. Tests that assert two differently tiled kernels give the same bits (the atomic dQ,
    16 query rows a program, against the dQ kernel's 64), or that a backward's recomputed scores equal the
    forward's, then passed on one CPU and failed on another (5 tests, on a fresh machine's `make test`). Here
    every dot adds its products in one order whatever the tile (_dot_in_fixed_order), on any CPU, as a GPU's
    matrix instructions treat an element wherever it sits in a tile: what those tests assume. The suite's time
    did not change measurably (489 s against 476 s, within this machine's run-to-run spread). Nothing changes on
    a GPU, where the interpreter is not used."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    real = builder.create_dot
    builder.create_dot = _dot_in_fixed_order(real)
    yield
    builder.create_dot = real


def _bfloat16_to_nearest(real):
    """The interpreter's cast to bfloat16 from any other type rounded to the nearest, ties to even (as torch's
    conversion and a GPU's cvt.rn; integers and float64 by way of float32, as torch converts them); every other
    cast is Triton's own."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar != tl.bfloat16:
            # In numpy (a torch op here would show in the tests' dispatch modes as the kernel's own): the high
            # half, plus one where the low half is above 0x8000 or exactly 0x8000 with the high half odd; NaN as
            # torch's 0x7FC0.
            wide = np.asarray(src.data).astype(np.float32)
            bits = wide.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return TensorHandle(np.where(np.isnan(wide), np.uint16(0x7FC0), rounded).astype(np.uint16), tl.bfloat16)
        return real(self, src, dst_type)

    return cast_impl


@pytest.fixture(autouse=True, scope="session")
def _bfloat16_rounded_to_nearest():
    """Triton 3.6's interpreter converts float32 to bfloat16 by dropping the low 16 bits (rounding toward zero;
    float16 goes through float32 the same way; integers and float64 it turns into garbage, their bits taken as
    bfloat16's), where a GPU's cvt.rn rounds to the nearest. So every bfloat16 a kernel stored under the
    interpreter, an output, a P or dS tile before a dot, was up to one ulp smaller in magnitude than on the GPU,
    always in the same direction: a bias no rounding model allows, found as a bfloat16 attention output one ulp low
    in every element (the values identical, so the exact output is a value itself). Here those conversions round
    as the hardware does. Nothing changes on a GPU."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    real = builder.cast_impl
    builder.cast_impl = _bfloat16_to_nearest(real)
    yield
    builder.cast_impl = real


# --- tests of tens of GiB ----------------------------------------------------------------------------------------
# scripts/gpu_check.sh runs the suite in 8 xdist workers, a file each at a time. The tests marked large_memory (a
# tensor past 2³¹ elements and its gradients: 8–32 GiB each) sit in different files, so several could run at once
# and together pass the GPU's memory, failing themselves and the ordinary tests beside them. They take turns.
LARGE_MEMORY_LOCK = os.path.join(tempfile.gettempdir(), "fastlm-large-memory-tests.lock")


@contextlib.contextmanager
def one_at_a_time(path=LARGE_MEMORY_LOCK):
    """An exclusive lock on `path` across processes for the block (released when the process ends, too)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _large_memory_tests_take_turns(request):
    """A large_memory test holds the lock while it runs; afterwards its worker gives its cached blocks back to the
    device, so the next one finds the memory free."""
    if "large_memory" not in request.keywords or not HAS_GPU:
        yield
        return
    with one_at_a_time():
        try:
            yield
        finally:
            gc.collect()
            torch.cuda.empty_cache()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)
    deselect_finished(config, items)


def kernel_backends():
    """The kernel backends that can run here, each a pytest param; the others skip saying why."""
    params = []
    triton_ok = HAS_GPU or _util.interpreting()
    params.append(pytest.param("triton", marks=[] if triton_ok else pytest.mark.skip(
        reason="triton backend needs a GPU or TRITON_INTERPRET=1")))
    ok, why = _cuda.available()
    params.append(pytest.param("cuda", marks=[] if ok else pytest.mark.skip(reason=f"cuda backend: {why}")))
    return params


BACKENDS = kernel_backends() + ["torch"]


def one_ulp(dtype, magnitude):
    """One rounding step of `dtype` at `magnitude`: the spacing of representable numbers there."""
    if magnitude == 0:
        return 0.0
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


# --- the tolerance rule (docs/TOLERANCE.md) ----------------------------------------------------------------------
# PyTorch's own error is measured on its float32 computation as it runs, and on ROUNDING_SAMPLES re-runs of the same
# computation with every floating-point operation given one more random rounding error (SimulatedRounding): the
# worst of these is the error a correct implementation of the same math may make, whatever its order of operations,
# and it is never 0 by luck. The kernel passes when its error is at most `factor` times that, plus one ulp of the
# output's dtype at the output's magnitude (the final rounding of an output that the others got exactly right).
ROUNDING_SAMPLES = 8
RHO = 4.0  # the extra error of one arithmetic operation, in units of u: up to 2 ulps

_aten = torch.ops.aten
# Composite ops with sums inside: run as their decompositions, so that the sums are seen (and perturbed) one by one.
_DECOMPOSE = (
    "_softmax.default", "_log_softmax.default", "_softmax_backward_data.default", "_log_softmax_backward_data.default",
    "native_layer_norm.default", "native_layer_norm_backward.default", "logsumexp.default", "nll_loss_forward.default",
    "nll_loss_backward.default", "embedding_dense_backward.default", "_fused_rms_norm.default",
    "_fused_rms_norm_backward.default", "linalg_vector_norm.default", "mse_loss.default",
)
# Pointwise ops that do not round (copies, selections, sign changes, comparisons, constructors).
_EXACT = ("neg", "abs", "clone", "where", "masked_fill", "masked_fill_", "copy_", "copy", "relu", "relu_", "sign",
          "maximum", "minimum", "clamp", "clamp_", "clamp_min", "clamp_max", "fill", "fill_", "zero_", "zeros_like",
          "ones_like", "full_like", "empty_like", "lift_fresh_copy", "alias", "detach", "lift_fresh", "isnan",
          "isinf", "isfinite", "real", "logical_not", "bitwise_not", "positive")
# Sums: the op applied to the squared operands gives Σ t² over each output element's terms.
_SUMS = ("sum", "mean", "mm", "bmm", "addmm", "baddbmm", "dot", "mv", "addmv", "cumsum")
# Scatters that add into their destination: name → (the out-of-place op, destination and source positions, position of
# the `accumulate` flag or None when the op always adds).
_ACCUMULATE = {"index_put": ("index_put", 0, 2, 3), "index_put_": ("index_put", 0, 2, 3),
               "_index_put_impl_": ("index_put", 0, 2, 3), "_unsafe_index_put": ("_unsafe_index_put", 0, 2, 3),
               "_unsafe_masked_index_put_accumulate": ("_unsafe_masked_index_put_accumulate", 0, 3, None),
               "scatter_add": ("scatter_add", 0, 3, None), "scatter_add_": ("scatter_add", 0, 3, None),
               "index_add": ("index_add", 0, 3, None), "index_add_": ("index_add", 0, 3, None)}


def _resolve(names):
    found = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(_aten, packet, None)
        if op is not None and (not overload or hasattr(op, overload)):
            found.add(getattr(op, overload) if overload else op)
    return found


class SimulatedRounding(TorchDispatchMode):
    """Runs a torch computation with one more random rounding error at each floating-point operation (Monte Carlo
    arithmetic), so that the run's error samples what any correct implementation of the same math may err by:

      a pointwise result z             becomes  z·(1 + ρ·u·e)            (ρ = RHO)
      a sum s of K terms t (sum, mean, var_mean, a matmul's dot products, scatter-adds)
                                       becomes  s + ρ·u·(|s|·e₁ + √((⌈log₂K⌉ + 1)·Σt²)·e₂)

    with e, e₁, e₂ independent and uniform in [−1, 1], u the unit roundoff of the result's dtype. The sum's term is the
    rounding of a pairwise (tree) summation, the order of every kernel and of torch's reductions: each of its
    ⌈log₂K⌉ levels rounds partial sums whose squares add up to about Σt² when the terms' signs are mixed, and the
    last ones round at the size of the sum |s| when they are not. Ops that do not round (copies, selections, max) are
    left alone, and so are conversions between dtypes: they are correctly rounded on every platform, so two
    implementations differ there only through their inputs. Composite ops (softmax, layer_norm, ...) run as their
    decompositions so that their sums are seen."""

    decompose = None

    def __init__(self, seed):
        super().__init__()
        self.seed = seed
        self.generators, self.buffers = {}, {}
        if SimulatedRounding.decompose is None:
            from torch._decomp import decomposition_table

            cls = SimulatedRounding
            cls.decompose = {op: decomposition_table[op] for op in _resolve(_DECOMPOSE) if op in decomposition_table}
            cls.exact, cls.sums = _resolve(_EXACT), _resolve(_SUMS)
            cls.accumulate = {getattr(_aten, name): where for name, where in _ACCUMULATE.items()
                              if hasattr(_aten, name) and hasattr(_aten, where[0])}

    def _noise(self, like, scale):
        """scale·e, e uniform in [−1, 1] in float32, shaped like `like`: successive slices of a buffer of draws from
        this run's generator (one torch.rand per op would cost more than most of the ops)."""
        n = like.numel()
        buffer, used = self.buffers.get(like.device, (None, 0))
        if buffer is None or used + n > buffer.numel():
            g = self.generators.get(like.device)
            if g is None:
                g = self.generators[like.device] = torch.Generator(like.device).manual_seed(self.seed)
            buffer, used = torch.rand(max(n, 1 << 20), generator=g, device=like.device).mul_(2).sub_(1), 0
        self.buffers[like.device] = (buffer, used + n)
        return buffer[used:used + n].view(like.shape) * scale

    def _decomposed(self, func, args, kwargs):
        """func run as its decomposition under this mode; the op itself where the decomposition fails or returns
        something else than the op would (another dtype: a later op expecting the op's own outputs would fail)."""
        real = func(*args, **kwargs)
        try:
            with self:
                out = self.decompose[func](*args, **kwargs)
        except Exception:  # noqa: BLE001 - any failure: keep the op's own result
            return real
        if isinstance(real, tuple) and isinstance(out, tuple):
            out = tuple(out)  # decompositions return named tuples (torch.return_types); the ops plain ones

        def meta(result):
            items = result if isinstance(result, tuple) else (result,)
            return [(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t) for t in items]

        return out if meta(out) == meta(real) else real

    def _sum_noise(self, s, sq, k):
        """The extra rounding of a k-term sum s whose terms' squares add up to sq (see the class docstring)."""
        u = torch.finfo(s.dtype).eps / 2
        depth = math.ceil(math.log2(max(k, 1))) + 1
        return self._noise(s, RHO * u) * s.abs() + self._noise(s, RHO * u) * (depth * sq.clamp_min(0)).sqrt()

    def _perturbed_moments(self, func, name, args, kwargs, out):
        """var_mean and var (what layer_norm's decomposition calls): the mean, a sum of the K terms x/K, and the
        variance, a sum of the K terms (x − mean)²/K, each perturbed as a sum."""
        bound = dict(zip((a.name for a in func._schema.arguments), args), **kwargs)
        x, dim = args[0], bound.get("dim")
        keep = bool(bound.get("keepdim", False))
        var = out[0] if name == "var_mean" else out
        k = max(1, x.numel() // max(1, var.numel()))
        mean = torch.mean(x, dim=dim, keepdim=True)
        centered = (x - mean) ** 2
        var = var + self._sum_noise(var, torch.mean(centered * centered, dim=dim, keepdim=keep) / k, k).to(var.dtype)
        if name == "var":
            return var
        m = out[1]
        return var, m + self._sum_noise(m, torch.mean(x * x, dim=dim, keepdim=keep) / k, k).to(m.dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.decompose:
            return self._decomposed(func, args, kwargs)
        packet = func.overloadpacket
        name = packet.__name__
        squares = None
        if packet in self.sums:
            squares = _sum_of_squares(func, name, args, kwargs)
        elif packet in self.accumulate:
            squares = _accumulated_squares(func, self.accumulate[packet], args, kwargs)
        out = func(*args, **kwargs)
        if name in ("var_mean", "var") and args[0].is_floating_point():
            return self._perturbed_moments(func, name, args, kwargs, out)
        if name.startswith("_foreach_") and name.rstrip("_")[len("_foreach_"):] not in _EXACT + ("norm",):
            for t in (out if out is not None else args[0]):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    u = torch.finfo(t.dtype).eps / 2
                    t.mul_(1 + self._noise(t, RHO * u).to(t.dtype))
            return out
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.numel() == 0:
            return out
        u = torch.finfo(out.dtype).eps / 2
        inplace = func._schema.is_mutable
        if squares is not None:
            noise = self._sum_noise(out, *squares).to(out.dtype)
            return out.add_(noise) if inplace else out + noise
        if torch.Tag.pointwise in func.tags and packet not in self.exact:
            factor = (1 + self._noise(out, RHO * u)).to(out.dtype)
            return out.mul_(factor) if inplace else out * factor
        return out


def _sum_of_squares(func, name, args, kwargs):
    """(Σt² over each output element's terms, K the number of terms) of a sum-like op, from the squared operands."""
    if name in ("sum", "mean"):
        x = args[0]
        if not x.is_floating_point():
            return None
        sq = func(x * x, *args[1:], **kwargs)
        k = max(1, x.numel() // max(1, sq.numel()))
        return (sq / k if name == "mean" else sq), k  # mean: the terms are x/K, Σ(x/K)² = mean(x²)/K
    if name == "cumsum":
        x, dim = args[0], args[1]
        return func(x * x, *args[1:], **kwargs), x.shape[dim]
    if name in ("mm", "bmm", "dot", "mv"):
        a, b = args[:2]
        return func(a * a, b * b), a.shape[-1]
    if name in ("addmm", "baddbmm", "addmv"):
        c, a, b = args[:3]
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        return func(c * c, a * a, b * b, beta=beta * beta, alpha=alpha * alpha), a.shape[-1] + 1
    return None


def _accumulated_squares(func, where, args, kwargs):
    """(Σt², the largest number of terms) of a scatter that adds: index_put with accumulate, scatter_add, ..."""
    op_name, dst, src, flag = where
    if not (isinstance(args[dst], torch.Tensor) and args[dst].is_floating_point()):
        return None
    if flag is not None and not (args[flag] if len(args) > flag else kwargs.get("accumulate", False)):
        return None  # index_put that overwrites: exact
    op = getattr(_aten, op_name).default
    n = flag + 1 if flag is not None else len(args)
    squared, ones = list(args[:n]), list(args[:n])
    squared[dst], squared[src] = args[dst] * args[dst], args[src] * args[src]
    ones[dst], ones[src] = torch.ones_like(args[dst]), torch.ones_like(args[src])
    kw = {k: v for k, v in kwargs.items() if k not in ("accumulate", "unsafe")}
    if "alpha" in kw:
        kw["alpha"] = kw["alpha"] ** 2
    sq = op(*squared, **kw)
    kw.pop("alpha", None)
    return sq, int(op(*ones, **kw).max().item())


def simulated_runs(fn, samples=ROUNDING_SAMPLES):
    """fn() run `samples` times under SimulatedRounding, each with its own seed drawn from FASTLM_TEST_SEED."""
    runs = []
    for i in range(samples):
        with SimulatedRounding(seeded(990 + i % 10) + 1_000_000 * (i // 10)):
            runs.append(fn())
    return runs


# --- PyTorch's attention in FlashAttention's form -------------------------------------------------------------------
# The rule's baseline for attention is the reference computed in the input dtype (PyTorch's math backend). Its
# backward forms δ = Σⱼ Pⱼ·dPⱼ and keeps dS unrounded, so it cancels where the true gradient is exactly 0 (identical
# keys: dq = 0), and its error there, and so the bound, is ~1e-7 or 0. PyTorch's other attention backends (SDPA's
# flash and cuDNN) and every FlashAttention-style kernel compute those outputs in another, equally correct form:
# scores and probabilities in float32, P rounded to the input dtype for P·V, δ = Σ_d dO·O from the output as
# rounded, and dS rounded to the input dtype for the dQ and dK matmuls. That leaves about one rounding of the terms
# where the math form leaves none. The attention tests take PyTorch's error as the larger of the two forms'
# for inputs narrower than float32 (docs/TOLERANCE.md, "Attention: PyTorch's two forms").


class _FlashFormCore(torch.autograd.Function):
    """softmax(s)·v with FlashAttention's rounding: s (…, Sq, Sk) float32 scores, −inf where masked, 0 in rows that
    see nothing (row_any False); v (…, Sk, D) float32 holding values of `dtype`. Returns out in `dtype` and the LSE
    in float32 (−inf for rows that see nothing).

    Forward as FlashAttention-2 computes it: the unnormalized P̃ = exp(s − m) (m the row's max: its running max
    when the row is one block of keys) rounded to `dtype` for P̃·V, the sum ℓ = Σ P̃ in float32 unrounded, out =
    (P̃·V)/ℓ rounded once. Backward as it computes it: P = exp(s − lse) recomputed, dS = P·(dP − δ + dlse) in
    float32 with δ = Σ dO·out from the rounded output, and dV = P (rounded to `dtype`)ᵀ·dO."""

    @staticmethod
    def forward(ctx, s, v, row_any, dtype):
        m = s.amax(dim=-1, keepdim=True) if s.shape[-1] else s.new_zeros((*s.shape[:-1], 1))  # no keys: no max
        p_tilde = torch.exp(s - m)
        sum_p = p_tilde.sum(dim=-1, keepdim=True)
        out = torch.where(row_any, (p_tilde.to(dtype).float() @ v) / sum_p, 0.0).to(dtype)
        lse = torch.where(row_any, m + torch.log(sum_p), float("-inf"))
        ctx.save_for_backward(s, lse, v, out, row_any)
        ctx.dtype = dtype
        return out, lse.squeeze(-1)

    @staticmethod
    def backward(ctx, dout, dlse):
        s, lse, v, out, row_any = ctx.saved_tensors
        p = torch.where(row_any, torch.exp(s - lse), 0.0)
        do = dout.float()
        delta = (do * out.float()).sum(-1, keepdim=True)
        ds = p * (do @ v.transpose(-1, -2) - delta + dlse.unsqueeze(-1))
        dv = p.to(ctx.dtype).float().transpose(-1, -2) @ do
        return ds, dv, None, None


class _RoundGradient(torch.autograd.Function):
    """The identity, whose backward rounds the gradient to `dtype` (FlashAttention's dS before the dQ, dK matmuls)."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype).float(), None


def _flash_form_dense(q, k, v, scale, window_left, window_right, softcap):
    from fastlm import reference

    B, Sq, Hq, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    qf = q.float().transpose(1, 2)
    kf, vf = (t.float().transpose(1, 2).repeat_interleave(Hq // Hk, dim=1) for t in (k, v))
    s = _RoundGradient.apply((qf @ kf.transpose(-1, -2)) * scale, q.dtype)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    visible = reference.attention_visible(Sq, Sk, window_left, window_right, q.device)
    row_any = visible.any(-1, keepdim=True)
    s = torch.where(row_any, s.masked_fill(~visible, float("-inf")), 0.0)
    out, lse = _FlashFormCore.apply(s, vf, row_any, q.dtype)
    return out.transpose(1, 2), lse


def attention_flash_form(q, k, v, scale, window_left=None, window_right=None, softcap=0.0, cu_seqlens_q=None,
                         cu_seqlens_k=None):
    """reference.attention_masked(..., upcast=False)'s contract (out in q's dtype, LSE float32, the same layouts,
    varlen included), computed in FlashAttention's form (above)."""
    from fastlm import reference

    def dense(q_, k_, v_):
        return _flash_form_dense(q_, k_, v_, scale, window_left, window_right, softcap)

    if cu_seqlens_q is None:
        return dense(q, k, v)
    return reference.attention_per_sequence(dense, q, k, v, cu_seqlens_q, cu_seqlens_k, torch.float32)


def sdpa_flash_form(q, k, v, is_causal=False, scale=None, enable_gqa=False):
    """attention_flash_form called as F.scaled_dot_product_attention is: its layout (batch, heads, seqlen,
    head_dim) and its causal alignment, top-left (key j ≤ query i: the bounded form's right edge at sq − sk); fewer
    kv heads are always read as enable_gqa reads them."""
    sq, sk = q.shape[-2], k.shape[-2]
    out, _ = attention_flash_form(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  q.shape[-1] ** -0.5 if scale is None else scale, None, sq - sk if is_causal else None)
    return out.transpose(1, 2)


def flash_form_samples(flash_form, dtype, samples=ROUNDING_SAMPLES):
    """The FlashAttention form's share of PyTorch's error for attention's tests: `flash_form()` (a function like the
    math-form baseline it stands beside) as run and `samples` times under simulated rounding, for inputs narrower
    than float32; nothing in float32, where the form rounds nothing to the input dtype and the math form's samples
    alone keep the rule's resolution (docs/TOLERANCE.md)."""
    if dtype == torch.float32:
        return []
    return [flash_form()] + simulated_runs(flash_form, samples=samples)


def assert_by_rule(name, out, ref, torch_out, factor=2.0, samples=()):
    """DESIGN.md's rule (docs/TOLERANCE.md): max|out − ref| ≤ factor · E_torch + one ulp of out's dtype at max|ref|.

    ref is computed in float64 from upcast inputs; torch_out is PyTorch's own implementation in the tested dtype;
    samples are that implementation's outputs under SimulatedRounding (`simulated_runs`). E_torch is the largest
    max|t − ref| over torch_out and the samples.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == torch_out.dtype, f"{name}: dtype {out.dtype} != torch's {torch_out.dtype}"
    if ref.numel() == 0:
        return
    ref = ref.double().cpu()
    err = (out.double().cpu() - ref).abs().max().item()
    torch_err = (torch_out.double().cpu() - ref).abs().max().item()
    sampled_err = max(((s.double().cpu() - ref).abs().max().item() for s in samples), default=0.0)
    atol = one_ulp(out.dtype, ref.abs().max().item())
    bound = factor * max(torch_err, sampled_err) + atol
    if os.environ.get("FASTLM_TOL_LOG"):  # one JSON line per comparison, to read the margins (docs/TOLERANCE.md)
        with open(os.environ["FASTLM_TOL_LOG"], "a") as f:
            f.write(json.dumps(dict(test=os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0], name=name,
                                    seed=TEST_SEED, err=err, torch_err=torch_err, sampled_err=sampled_err,
                                    samples=len(samples), ulp=atol, factor=factor, ref_max=ref.abs().max().item(),
                                    numel=ref.numel(), dtype=str(out.dtype))) + "\n")
    assert err <= bound, (f"{name}: max error {err:.3g} > {factor}·max({torch_err:.3g} torch, {sampled_err:.3g} "
                          f"simulated ×{len(samples)}) + {atol:.3g} (1 ulp) [FASTLM_TEST_SEED={TEST_SEED}]")


@pytest.fixture
def backend(request):
    with fastlm.use_backend(request.param):
        yield request.param
