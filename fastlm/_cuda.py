"""The thin tensor-to-pointer layer over the CUDA C++ extension `fastlm._C` (csrc/).

fastlm._C never links libtorch: its launchers take raw device pointers, sizes, row strides in elements, dtype
codes, the device index and the stream handle. This module checks what they cannot (device, dtype, shape, unit
column stride: a kernel trusts them and would otherwise read out of bounds), allocates the backward's fp32
workspace with torch (the caching allocator, so no sync), and passes torch's current stream. Importing it never
fails and does no GPU work; `available()` says why the extension cannot run, and every entry point raises
RuntimeError with that reason.

Every op's launchers here have the names, parameters and returns of the Triton launchers in kernels/<op>.py (the
launcher contract, docs/DESIGN.md; tests/test_build.py compares the signatures): tensors and plain values in,
outputs allocated here with `fastlm._util.empty` (so the tests' NaN-poisoning covers them) and returned. That
includes the cross-entropy reduction's bookkeeping (`scalars`, `reduce_loss`), which has its own CUDA kernels:
neither backend borrows the other's. The constants of the C++ side (dtype codes, attention's dtypes, head dims and
limits, the activation codes) are read from fastlm._C's attributes, declared once in csrc/launchers.h.

Attention: `attention_unsupported` says (host check only) whether the CUDA kernels can take a call, for the op
layer's dispatch; `attention_fwd` chooses the FlashAttention-2 kernel or, for short query sides, the split-KV
decode kernel, whose fp32 workspace it allocates here. The backward is the Triton one for both backends.

Roofline and kernel design: csrc/norm.cu, csrc/cross_entropy.cu, csrc/attention.cu, csrc/rotary.cu, csrc/gated.cu.
"""

from __future__ import annotations

import functools

import torch

from fastlm import _util

_NOT_BUILT = "fastlm._C is not built (nvcc was not found at install time, or FASTLM_BUILD_CUDA=0)"

_ext = None
_ext_error = None
_loaded = False
_arch_reasons: dict[int, str] = {}

# The C++ side's constants, read from fastlm._C's module attributes when it loads (csrc/launchers.h is their one
# source; nothing here copies them). Every use comes after _require/available, which load the extension.
_DTYPE_CODES: dict = {}  # torch dtype -> the launchers' dtype code
_ATTN_DTYPES: tuple = ()  # the torch dtypes the attention kernels take
_ATTN_HEAD_DIMS: tuple = ()
_ATTN_MAX_TOKENS = _ATTN_MAX_GRID = _ATTN_WINDOW_INF = 0  # token count bound, grid y/z limit, "unbounded" window
_ACTIVATIONS: dict = {}  # gated activation name -> code


def _read_constants(ext):
    global _ATTN_DTYPES, _ATTN_HEAD_DIMS, _ATTN_MAX_TOKENS, _ATTN_MAX_GRID, _ATTN_WINDOW_INF
    _DTYPE_CODES.update({torch.float32: ext.DTYPE_FLOAT32, torch.float16: ext.DTYPE_FLOAT16,
                         torch.bfloat16: ext.DTYPE_BFLOAT16})
    _ATTN_DTYPES = tuple(d for d, code in _DTYPE_CODES.items() if code in tuple(ext.ATTN_DTYPES))
    _ATTN_HEAD_DIMS = tuple(ext.ATTN_HEAD_DIMS)
    _ATTN_MAX_TOKENS, _ATTN_MAX_GRID, _ATTN_WINDOW_INF = ext.ATTN_MAX_TOKENS, ext.ATTN_MAX_GRID, ext.ATTN_WINDOW_INF
    _ACTIVATIONS.update(dict(ext.GATED_ACTIVATIONS))


def _load():
    # Lazily, so that importing fastlm never pays for (or fails on) the extension.
    global _ext, _ext_error, _loaded
    if not _loaded:
        try:
            from fastlm import _C

            _read_constants(_C)
            _ext = _C
        except ModuleNotFoundError as e:
            _ext_error = _NOT_BUILT if e.name == "fastlm._C" else f"fastlm._C failed to import: {e}"
        except Exception as e:  # a broken build: undefined symbol, another Python's ABI
            _ext_error = f"fastlm._C failed to import: {e}"
        _loaded = True
    return _ext, _ext_error


def _arch_reason(ext, index: int) -> str:
    # sm_80 code runs on every 8.x GPU; the sm_90a build only on 9.0 (arch-specific features). Without this
    # check, a launch on another GPU fails with CUDA's "no kernel image is available".
    if index not in _arch_reasons:
        major, minor = torch.cuda.get_device_capability(index)
        archs = list(ext.compiled_archs())
        if major < 9:
            ok = any(a // 10 == major and a % 10 <= minor for a in archs)
        else:
            ok = major * 10 + minor in archs
        why = ""
        if not ok:
            have = ", ".join(f"sm_{a}" for a in archs) or "no architecture"
            why = (f"fastlm._C has device code for {have}, not for {torch.cuda.get_device_name(index)} "
                   f"(sm_{major}{minor}); rebuild it with FASTLM_CUDA_ARCHS naming this GPU's architecture")
        _arch_reasons[index] = why
    return _arch_reasons[index]


def available(device=None) -> tuple[bool, str]:
    """(True, "") when fastlm._C is importable and can run on `device` (default: the current CUDA device);
    otherwise (False, why). Never raises. Under torch.compile the answer is a constant of the trace."""
    if device is not None:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type != "cuda":
            ok, why = _available_on(-1)
            return (False, f"{device} is not a CUDA device") if ok else (ok, why)
    return _available_on(-1 if device is None or device.index is None else device.index)


_availability: dict = {}


@torch.compiler.assume_constant_result
def _available_on(index: int) -> tuple[bool, str]:
    # index -1: the current device. Asked once per device: the answer cannot change within a process.
    if index not in _availability:
        _availability[index] = _ask_available(index)
    return _availability[index]


def _ask_available(index: int) -> tuple[bool, str]:
    ext, err = _load()
    if ext is None:
        return False, err
    try:
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        why = _arch_reason(ext, torch.cuda.current_device() if index < 0 else index)
    except Exception as e:
        return False, f"cannot query the CUDA device: {e}"
    return (False, why) if why else (True, "")


def build_info() -> dict:
    """{"built": bool, "archs": [80, 90] or [], "cuda_runtime": "13.0" or None, "error": str or None}."""
    ext, err = _load()
    if ext is None:
        return {"built": False, "archs": [], "cuda_runtime": None, "error": err}
    return {"built": True, "archs": list(ext.compiled_archs()), "cuda_runtime": ext.cuda_runtime_version(), "error": None}


def _require(name, t):
    ok, why = available(t.device if t.is_cuda else None)
    if not ok:
        raise RuntimeError(f"fastlm's cuda backend cannot run: {why}")
    if not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor, got one on {t.device}")
    return _ext


def _same_device(name, t, ref):
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}, not on {ref.device} like the input; all must share one device")


def _rows(name, t, ref, M=None, N=None, dtype=None, out=False):
    """A (M, N) operand: unit column stride, any row stride (rows must not overlap when written)."""
    _same_device(name, t, ref)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, N), got shape {tuple(t.shape)}")
    if M is not None and tuple(t.shape) != (M, N):
        raise ValueError(f"{name} must have shape {(M, N)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.dtype not in _DTYPE_CODES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    rows, n = t.shape
    if n > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit column stride, got strides {t.stride()}")
    if out and rows > 1 and t.stride(0) < n:
        raise ValueError(f"{name} is an output and its rows overlap (strides {t.stride()})")
    return rows, n


def _operand(name, t, ref, shape=None, dtype=None):
    """An operand on ref's device, in `shape` and `dtype` when given, of a kernel dtype."""
    _same_device(name, t, ref)
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.dtype not in _DTYPE_CODES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _row_operand(name, t, ref, shape=None, dtype=None):
    """A (..., N) operand (`_operand`) read as rows (`_util.rows`: itself at its row stride, or a contiguous
    copy): (the tensor read, its row stride)."""
    _operand(name, t, ref, shape, dtype)
    return _util.rows(t)


def _vector(name, t, ref, n, dtype=None):
    """A (n,) operand: contiguous."""
    _same_device(name, t, ref)
    if tuple(t.shape) != (n,):
        raise ValueError(f"{name} must have shape {(n,)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")


def _weight_code(x, N, named):
    """Dtype code of the weight-like tensors given (weight, bias, dw, db): one dtype, x's or float32."""
    wdtype = None
    for name, t in named:
        if t is None:
            continue
        _vector(name, t, x, N)
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
        if wdtype is not None and t.dtype != wdtype:
            raise TypeError(f"{' and '.join(n for n, u in named if u is not None)} must share one dtype")
        wdtype = t.dtype
    return _DTYPE_CODES[wdtype if wdtype is not None else x.dtype]


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # CUDA builds of torch only


def _stream(t):
    """torch's current stream on t's device, as the handle the launchers take. The raw query (what Inductor's
    generated code calls) builds no Stream object: a few µs less on every launch."""
    if _raw_stream is not None:
        return _raw_stream(t.device.index)
    return torch.cuda.current_stream(t.device).cuda_stream


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _stride(t):
    return 0 if t is None else t.stride(0)


def _row_stats(mean, rstd, ref, M, is_rms):
    # The per-row statistics: mean only for LayerNorm, rstd always, both (rows,) float32 on ref's device.
    if is_rms != (mean is None):
        raise ValueError("mean must be None for RMSNorm and a (rows,) float32 tensor for LayerNorm")
    if mean is not None:
        _vector("mean", mean, ref, M, torch.float32)
    _vector("rstd", rstd, ref, M, torch.float32)


def norm_fwd(x, weight, bias, residual, eps: float, is_rms: bool, offset: float):
    """LayerNorm (is_rms False) or RMSNorm forward; the signature and returns of kernels/norm.py's norm_fwd.

    x: (..., N), read as M rows at one stride (`_util.rows`); weight, bias: (N,) contiguous, x's dtype or float32, or
    None; residual: x's shape and dtype (its own row stride), or None. Returns y and residual_out (None without a
    residual) in x's shape, contiguous; mean (M,) fp32 or None (RMSNorm), rstd (M,) fp32.
    """
    ext = _require("x", x)
    x, sx = _row_operand("x", x, x)
    N = x.shape[-1]
    M = x.numel() // N if N else 0
    residual, sr = _row_operand("residual", residual, x, x.shape, x.dtype) if residual is not None else (None, 0)
    if is_rms and bias is not None:
        raise ValueError("RMSNorm takes no bias")
    wcode = _weight_code(x, N, (("weight", weight), ("bias", bias)))
    y = _util.empty(x.shape, x.dtype, x.device)
    residual_out = _util.empty(x.shape, x.dtype, x.device) if residual is not None else None
    mean = None if is_rms else _util.empty((M,), torch.float32, x.device)
    rstd = _util.empty((M,), torch.float32, x.device)
    if M > 0 and N > 0:
        ext.norm_fwd(
            x.data_ptr(), sx, _ptr(residual), sr, _ptr(weight), _ptr(bias),
            y.data_ptr(), N, _ptr(residual_out), N if residual is not None else 0, _ptr(mean), rstd.data_ptr(),
            M, N, _DTYPE_CODES[x.dtype], wcode, float(eps), bool(is_rms), float(offset),
            x.device.index, _stream(x)
        )
    return y, residual_out, mean, rstd


def norm_bwd(dy, xin, weight, mean, rstd, dres, is_rms: bool, offset: float, need_dw: bool, need_db: bool):
    """Backward of norm_fwd; the signature and returns of kernels/norm.py's norm_bwd.

    dy, xin (the normalized input: x, or residual_out), dres (gradient of residual_out, or None): (..., N) in one
    shape, each M rows at its own stride as norm_fwd reads x; weight: (N,) or None; mean: (M,) fp32 (None for
    RMSNorm); rstd: (M,) fp32. Returns dx in xin's shape, contiguous, dw (N,) in the weight's dtype or None (not
    wanted, or no weight), db (N,) or None (not wanted).
    """
    ext = _require("xin", xin)
    xin, sx = _row_operand("xin", xin, xin)
    N = xin.shape[-1]
    M = xin.numel() // N if N else 0
    dy, sdy = _row_operand("dy", dy, xin, xin.shape, xin.dtype)
    dres, sdres = _row_operand("dres", dres, xin, xin.shape, xin.dtype) if dres is not None else (None, 0)
    if is_rms and need_db:
        raise ValueError("RMSNorm has no bias gradient")
    wcode = _weight_code(xin, N, (("weight", weight),))
    _row_stats(mean, rstd, xin, M, is_rms)
    wdtype = weight.dtype if weight is not None else xin.dtype
    dx = _util.empty(xin.shape, xin.dtype, xin.device)
    dw = _util.empty((N,), wdtype, xin.device) if need_dw and weight is not None else None
    db = _util.empty((N,), wdtype, xin.device) if need_db else None
    if M == 0 or N == 0:
        # Sums over no rows: the kernels launch nothing, so the zeros come from here.
        for t in (dw, db):
            if t is not None:
                t.zero_()
        return dx, dw, db
    index = xin.device.index
    numel = ext.norm_bwd_workspace_numel(M, N, dw is not None, db is not None, index)
    workspace = torch.empty(numel, dtype=torch.float32, device=xin.device)
    ext.norm_bwd(
        dy.data_ptr(), sdy, xin.data_ptr(), sx, _ptr(weight), _ptr(mean), rstd.data_ptr(),
        _ptr(dres), sdres, dx.data_ptr(), N, _ptr(dw), _ptr(db),
        workspace.data_ptr(), numel, M, N, _DTYPE_CODES[xin.dtype], wcode, bool(is_rms), float(offset),
        index, _stream(xin)
    )
    return dx, dw, db


# --- softmax cross-entropy --------------------------------------------------------------------------------------------

_INDEX_DTYPES = (torch.int64, torch.int32)
_REDUCTIONS = ("none", "mean", "sum")


def _class_weight(weight, ref, V):
    """The per-class weight: (V,) float32 on ref's device, or None; returned contiguous."""
    if weight is None:
        return None
    _same_device("weight", weight, ref)
    if weight.dtype != torch.float32:
        raise TypeError(f"weight must have dtype {torch.float32}, got {weight.dtype}")
    if tuple(weight.shape) != (V,):
        raise ValueError(f"weight must have shape {(V,)}, got {tuple(weight.shape)}")
    return weight.contiguous()


def _ce_inputs(logits, target, weight, classes=None):
    """The checks of what both cross-entropy kernels read: (rows, V) logits with unit column stride (any row
    stride), (rows,) int64 or int32 targets, (V,) fp32 class weights or None. Returns (ext, rows, V, target,
    weight), the two vectors made contiguous (a copy of rows or V elements at most, where a view is strided).
    With `classes`, the logits are a block of columns of rows of that many classes, and V is `classes`."""
    ext = _require("logits", logits)
    rows, V = _rows("logits", logits, logits)
    if classes is not None and V > 0:
        V = classes
    if V == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    _same_device("target", target, logits)
    if target.dtype not in _INDEX_DTYPES:
        raise TypeError(f"target must hold class indices as int64 or int32, got {target.dtype}")
    if tuple(target.shape) != (rows,):
        raise ValueError(f"target must have shape {(rows,)}, got {tuple(target.shape)}")
    return ext, rows, V, target.contiguous(), _class_weight(weight, logits, V)


def _row_vector(name, t, ref, rows):
    """A (rows,) fp32 vector from any tensor of rows elements (an incoming gradient): contiguous fp32."""
    _same_device(name, t, ref)
    if t.numel() != rows:
        raise ValueError(f"{name} must have {rows} elements, got shape {tuple(t.shape)}")
    t = _util.flat(t)
    return t if t.dtype == torch.float32 else t.float()


def cross_entropy_fwd(logits, target, weight, ignore_index, smoothing, z_loss, softcap, reduction, compute_grad,
                      sc=None, out=None):
    """Rows of logits (rows, V) with column stride 1, target (rows,), weight (V,) fp32 or None.

    Returns loss (rows,) fp32 (unreduced; divide the sum by sc[0] for "mean"), row_max and log_s (rows,) fp32,
    sc (2,) fp32, and grad (rows, V) in logits' dtype, the gradient of the reduced loss for an incoming gradient
    of 1, or None when compute_grad is False. `sc` may be given: the scalars of a larger batch these rows are a
    chunk of (fused linear cross-entropy), so the mean divides by the whole batch's divisor. `out` (rows, V) in
    logits' dtype may be given for the gradient (with compute_grad), the logits themselves included (the kernel
    reads each element before the same thread writes it; see csrc/cross_entropy.cu).
    """
    ext, rows, V, target, weight = _ce_inputs(logits, target, weight)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if sc is None:
        sc = scalars(target, weight, V, ignore_index, reduction)
    else:
        _vector("sc", sc, logits, 2, torch.float32)
    device = logits.device
    loss = _util.empty((rows,), torch.float32, device)
    row_max = _util.empty((rows,), torch.float32, device)
    log_s = _util.empty((rows,), torch.float32, device)
    if out is not None and compute_grad:
        _rows("out", out, logits, rows, V, logits.dtype, out=True)
        grad = out
    else:
        grad = _util.empty((rows, V), logits.dtype, device) if compute_grad else None
    if rows > 0:
        ext.cross_entropy_fwd(
            logits.data_ptr(), logits.stride(0), target.data_ptr(), target.dtype == torch.int64, _ptr(weight),
            sc.data_ptr(), loss.data_ptr(), row_max.data_ptr(), log_s.data_ptr(), _ptr(grad), _stride(grad),
            rows, V, _DTYPE_CODES[logits.dtype], int(ignore_index), float(smoothing), float(z_loss),
            float(softcap or 0.0), device.index, _stream(logits),
        )
    return loss, row_max, log_s, sc, grad


def cross_entropy_bwd(logits, target, weight, sc, row_max, log_s, grad_output, ignore_index, smoothing, z_loss,
                      softcap, out=None, col0=0, classes=None):
    """Gradient of the unreduced loss ("none"): grad_output (rows,) times each row's gradient, recomputed from the
    logits and the forward's row statistics in one pass. Returns grad (rows, width) in logits' dtype: `out` when
    given (as in cross_entropy_fwd, the logits themselves included). logits (rows, width) may be the columns
    col0 .. col0 + width − 1 of rows of `classes` classes (as the Triton launcher)."""
    ext, rows, V, target, weight = _ce_inputs(logits, target, weight, classes)
    width = logits.shape[1]
    if not 0 <= col0 <= V - width:
        raise ValueError(f"a block of {width} columns from column {col0} does not fit in {V} classes")
    _vector("sc", sc, logits, 2, torch.float32)
    _vector("row_max", row_max, logits, rows, torch.float32)
    _vector("log_s", log_s, logits, rows, torch.float32)
    go = _row_vector("grad_output", grad_output, logits, rows)
    if out is not None:
        _rows("out", out, logits, rows, width, logits.dtype, out=True)
        grad = out
    else:
        grad = _util.empty((rows, width), logits.dtype, logits.device)
    if rows > 0:
        ext.cross_entropy_bwd(
            logits.data_ptr(), logits.stride(0), target.data_ptr(), target.dtype == torch.int64, _ptr(weight),
            sc.data_ptr(), row_max.data_ptr(), log_s.data_ptr(), go.data_ptr(), grad.data_ptr(), grad.stride(0),
            rows, V, width, int(col0), _DTYPE_CODES[logits.dtype], int(ignore_index), float(smoothing), float(z_loss),
            float(softcap or 0.0), logits.device.index, _stream(logits),
        )
    return grad


def scale_grad(grad, grad_output):
    """Scale the forward's gradient (rows, V) in place by the incoming gradient of the reduced loss, a one-element
    tensor; the kernel skips the work on the device when it is 1.0. Returns grad."""
    ext = _require("grad", grad)
    rows, V = _rows("grad", grad, grad, out=True)
    go = _row_vector("grad_output", grad_output, grad, 1)
    if rows > 0 and V > 0:
        ext.cross_entropy_scale_grad(grad.data_ptr(), grad.stride(0), go.data_ptr(), rows, V,
                                     _DTYPE_CODES[grad.dtype], grad.device.index, _stream(grad))
    return grad


def _ce_workspace(ext, rows, device):
    """The float64 partial sums the reduction's bookkeeping needs above one block of rows (None and 0 below)."""
    numel = ext.cross_entropy_reduce_workspace_numel(rows)
    return (_util.empty((numel,), torch.float64, device) if numel > 0 else None), numel


def scalars(target, weight, V, ignore_index, reduction):
    """As kernels/cross_entropy.py's scalars: (2,) fp32 on the device, the divisor of the reduced loss (Σ w_t over
    kept rows for "mean", else 1) and W = Σ_v w_v (V without weights); target (rows,) int64 or int32, weight (V,)
    fp32 or None. Float64 sums rounded once, any number of rows: one launch up to 65536 rows, two above (with a
    float64 workspace); no host sync."""
    ext = _require("target", target)
    if target.dtype not in _INDEX_DTYPES:
        raise TypeError(f"target must hold class indices as int64 or int32, got {target.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    target = _util.flat(target)
    rows, V = target.numel(), int(V)
    weight = _class_weight(weight, target, V)
    mean = reduction == "mean"
    device = target.device
    sc = _util.empty((2,), torch.float32, device)
    workspace, numel = _ce_workspace(ext, rows, device) if mean else (None, 0)
    ext.cross_entropy_scalars(target.data_ptr(), target.dtype == torch.int64, _ptr(weight), sc.data_ptr(),
                              _ptr(workspace), numel, rows, V, int(ignore_index), mean, device.index, _stream(target))
    return sc


def reduce_loss(loss, sc, mean):
    """As kernels/cross_entropy.py's reduce_loss: the reduced loss, () fp32: Σ loss (rows,) fp32 in float64 in a
    fixed order, rounded once, divided by sc[0] when `mean`. Any number of rows: one launch up to 65536 rows, two
    above (with a float64 workspace); no host sync."""
    ext = _require("loss", loss)
    if loss.dtype != torch.float32:
        raise TypeError(f"loss must have dtype {torch.float32}, got {loss.dtype}")
    loss = _util.flat(loss)
    rows = loss.numel()
    if mean:
        _vector("sc", sc, loss, 2, torch.float32)
    device = loss.device
    out = _util.empty((), torch.float32, device)
    workspace, numel = _ce_workspace(ext, rows, device)
    ext.cross_entropy_reduce(loss.data_ptr(), sc.data_ptr() if mean else 0, out.data_ptr(), _ptr(workspace), numel,
                             rows, bool(mean), device.index, _stream(loss))
    return out


# --- attention -------------------------------------------------------------------------------------------------------

# The forward kernel on Hopper's wgmma (csrc/attention.cu: attn_fwd_wgmma_kernel; head dims 64, 128 and 256,
# compute capability 9.0, a build with sm_90a code): off until the benchmark has timed it against the FlashAttention-2
# kernel on such a GPU (benchmarks/attention.py's cuda-wgmma provider); tests force it to check it there.
ATTN_HOPPER = False
# Which Hopper forward runs when ATTN_HOPPER is on, until the benchmark has timed them (its fastlm-cuda-wgmma peer
# runs this default; fastlm-cuda-wgmma-serial, -ws and -pingpong the others):
#   "overlap": attn_fwd_wgmma_kernel with each key block's softmax overlapping the previous block's P·V on the
#              tensor cores (FlashAttention-3's intra-warpgroup pipelining; 222 registers at head dim 128, 186 serial);
#   "serial":  the same kernel with the two products and the softmax in turn;
#   "ws":      attn_fwd_ws_kernel, FlashAttention-3's warp specialization: a producer warp group loading Q, K and V
#              by TMA, two consumer warp groups running the overlapped loop at their own pace (mbarriers, no
#              block-wide barriers); head dims 64 and 128, dense calls with TMA-addressable strides (others take
#              "overlap");
#   "pingpong": the same kernel with FlashAttention-3's pingpong: its two consumer warp groups take turns issuing
#              their products (named barriers), so that one group's softmax runs while the other's products do.
ATTN_HOPPER_FWD = "overlap"
_HOPPER_FWD_MODES = {"serial": 1, "overlap": 2, "ws": 3, "pingpong": 4}
# The backward on wgmma (attention_bwd: attn_bwd_*_wgmma_kernel, the same GPUs, head dims 64 and 128, no softcap;
# bitwise repeatable, no atomics): the cuda backend's backward when on (fastlm/ops/attention.py), the Triton
# backward otherwise. Off until timed against it, as ATTN_HOPPER.
ATTN_HOPPER_BWD = False


def attention_hopper_supported(head_dim: int, device, backward: bool = False) -> bool:
    """Whether attention_fwd runs the wgmma forward kernel (when ATTN_HOPPER) for this head dim on `device`
    (64, 128, 256), or, with backward=True, whether attention_bwd can run (64, 128). Asked of the extension once per
    (head dim, direction, device): the backward's route asks on every call."""
    device = torch.device(device)
    if device.type != "cuda" or not available(device)[0]:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _hopper_supported(int(head_dim), bool(backward), index)


@functools.lru_cache(maxsize=None)
def _hopper_supported(head_dim: int, backward: bool, index: int) -> bool:
    return bool(_ext.attention_hopper_supported(head_dim, backward, index))


def attention_unsupported(q, k, cu_seqlens_q, window_left, window_right, softcap) -> str | None:
    """None when attention_fwd can take this call, else why not (a host check: no GPU work).

    The CUDA kernels take float16 and bfloat16 (tensor cores), head dims 32, 64, 96, 128 and 256, GQA/MQA,
    varlen, sliding windows (any ints, negative included) and the softcap; sequences shorter than 2^30 tokens.
    """
    ok, why = available(q.device)
    if not ok:
        return why
    if q.dtype not in _ATTN_DTYPES:
        return f"the cuda attention kernels take float16 and bfloat16 (tensor cores), got {q.dtype}"
    if k.dtype != q.dtype:
        return f"the cuda attention kernels take q, k and v of one dtype, got {q.dtype} and {k.dtype}"
    head_dim = q.shape[-1]
    if head_dim not in _ATTN_HEAD_DIMS:
        dims = ", ".join(str(d) for d in _ATTN_HEAD_DIMS[:-1]) + f" and {_ATTN_HEAD_DIMS[-1]}"
        return f"the cuda attention kernels take head dims {dims}, got {head_dim}"
    tokens_dim = 0 if cu_seqlens_q is not None else 1
    if q.dim() > tokens_dim and k.dim() > tokens_dim:
        longest = max(q.shape[tokens_dim], k.shape[tokens_dim])
        if longest >= _ATTN_MAX_TOKENS:
            return f"the cuda attention kernels take fewer than 2^30 tokens a sequence, got {longest}"
    if cu_seqlens_q is None and q.dim() == 4 and q.shape[0] > _ATTN_MAX_GRID:
        return f"the cuda attention kernels take a batch of at most {_ATTN_MAX_GRID}, got {q.shape[0]}"
    if cu_seqlens_q is not None and cu_seqlens_q.numel() - 1 > _ATTN_MAX_GRID:
        return f"the cuda attention kernels take at most {_ATTN_MAX_GRID} sequences, got {cu_seqlens_q.numel() - 1}"
    if q.dim() >= 2 and q.shape[-2] > _ATTN_MAX_GRID:
        return f"the cuda attention kernels take at most {_ATTN_MAX_GRID} query heads, got {q.shape[-2]}"
    if softcap is not None and softcap < 0:
        return f"softcap must be ≥ 0 (0 for none), got {softcap}"
    return None


def _attn_operand(name, t, ref, dims):
    """q, k or v: `dims`-D, on ref's device, ref's dtype, unit stride along the head dim. Returned 16-byte aligned
    (base and strides), as the kernels' 16-byte copies need: a view that is not gets a contiguous copy."""
    _same_device(name, t, ref)
    if t.dim() != dims:
        layout = "(batch, seq, heads, head_dim)" if dims == 4 else "(tokens, heads, head_dim)"
        raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have dtype {ref.dtype} like q, got {t.dtype}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along the head dim, got strides {t.stride()}")
    if t.numel() > 0 and (t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:-1])):
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _row_strides(t, varlen):
    """The (batch, token, head) strides the attention launchers take: batch 0 for a varlen (tokens, heads, dim)."""
    return [0, *t.stride()[:2]] if varlen else list(t.stride()[:3])


def _attn_window(w):
    return None if w is None else max(-_ATTN_WINDOW_INF, min(_ATTN_WINDOW_INF, int(w)))


def attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
                  softcap):
    """Attention forward on torch's current stream; the signature and returns of kernels/attention.py's
    attention_fwd: (out, lse).

    Not varlen (cu_seqlens_q None): q (B, Sq, Hq, D), k and v (B, Sk, Hk, D), any strides with the head dim
    contiguous; returns out (B, Sq, Hq, D) contiguous in q's dtype and lse (B, Hq, Sq) fp32; max_seqlen_q/k are
    Sq/Sk. Varlen: q (Tq, Hq, D), k and v (Tk, Hk, D), cu_seqlens_q/k (B + 1,) int32 offsets on the device;
    out (Tq, Hq, D), lse (Hq, Tq); max_seqlen_q/k are host upper bounds of the lengths (no device value is read).
    Key j (a position within its sequence) is visible to query i iff j ≥ i + Sk − Sq − window_left and
    j ≤ i + Sk − Sq + window_right (None: no bound); a query that sees no key gets out 0 and lse −inf. softcap 0
    or None: off, else scores softcap·tanh(scale·q·k / softcap). max_seqlen_q · Hq / Hk ≤ 16 takes the decode
    kernel (keys split across CTAs, then combined); everything else the FlashAttention-2 kernel, or its wgmma form
    where ATTN_HOPPER and attention_hopper_supported (the form ATTN_HOPPER_FWD names).
    """
    ext = _require("q", q)
    if q.dtype not in _ATTN_DTYPES:
        raise TypeError(f"q must be float16 or bfloat16, got {q.dtype}")
    varlen = cu_seqlens_q is not None
    if (cu_seqlens_k is not None) != varlen:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    dims = 3 if varlen else 4
    q = _attn_operand("q", q, q, dims)
    k = _attn_operand("k", k, q, dims)
    v = _attn_operand("v", v, q, dims)
    *lead_q, heads_q, head_dim = q.shape
    *lead_k, heads_k, head_dim_k = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if head_dim_k != head_dim:
        raise ValueError(f"q and k must share the head dim, got {head_dim} and {head_dim_k}")
    if head_dim not in _ATTN_HEAD_DIMS:
        raise ValueError(f"the cuda attention kernels take head dims {_ATTN_HEAD_DIMS}, got {head_dim}")
    if heads_k == 0 or heads_q % heads_k:
        raise ValueError(f"q's heads ({heads_q}) must be a multiple of k's heads ({heads_k})")
    if varlen:
        total_q, total_k = lead_q[0], lead_k[0]
        batch = cu_seqlens_q.numel() - 1
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            _same_device(name, cu, q)
            if cu.dtype != torch.int32:
                raise TypeError(f"{name} must be int32, got {cu.dtype}")
            if cu.dim() != 1 or cu.numel() != batch + 1 or batch < 0:
                raise ValueError(f"{name} must be 1-D with batch + 1 = {batch + 1} offsets, got {tuple(cu.shape)}")
            if cu.numel() > 1 and cu.stride(0) != 1:
                raise ValueError(f"{name} must be contiguous, got stride {cu.stride()}")
        max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
        out_shape, lse_shape = (total_q, heads_q, head_dim), (heads_q, total_q)
    else:
        batch, max_seqlen_q = lead_q
        if lead_k[0] != batch:
            raise ValueError(f"k must have q's batch {batch}, got shape {tuple(k.shape)}")
        max_seqlen_k = lead_k[1]
        total_q, total_k = max_seqlen_q, max_seqlen_k  # the kernels read them only to clamp varlen offsets
        out_shape, lse_shape = (batch, max_seqlen_q, heads_q, head_dim), (batch, heads_q, max_seqlen_q)
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k), ("q's tokens", total_q),
                    ("k's tokens", total_k)):
        if not 0 <= n < _ATTN_MAX_TOKENS:
            raise ValueError(f"{name} must be in [0, 2^30), got {n}")
    # 16-byte aligned (the caching allocator's blocks are), as the kernels' 16-byte stores need.
    out = _util.empty(out_shape, q.dtype, q.device)
    lse = _util.empty(lse_shape, torch.float32, q.device)
    if batch == 0 or total_q == 0 or heads_q == 0 or max_seqlen_q == 0:
        return out, lse
    index = q.device.index
    window_left, window_right = _attn_window(window_left), _attn_window(window_right)
    splits = ext.attention_decode_splits(batch, heads_q, heads_k, head_dim, max_seqlen_q, max_seqlen_k, window_left,
                                         window_right, index)
    numel = ext.attention_workspace_numel(batch, heads_q, heads_k, head_dim, max_seqlen_q, splits)
    workspace = torch.empty(numel, dtype=torch.float32, device=q.device) if numel > 0 else None
    ext.attention_fwd(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), _ptr(cu_seqlens_q),
        _ptr(cu_seqlens_k), *(_row_strides(t, varlen) for t in (q, k, v, out)), batch, heads_q,
        heads_k, head_dim, max_seqlen_q, max_seqlen_k, total_q, total_k, _DTYPE_CODES[q.dtype], float(scale),
        window_left, window_right, float(softcap or 0.0), _ptr(workspace), numel, splits,
        _hopper_fwd_mode() if ATTN_HOPPER else 0, index, _stream(q),
    )
    return out, lse


def _hopper_fwd_mode() -> int:
    mode = _HOPPER_FWD_MODES.get(ATTN_HOPPER_FWD)
    if mode is None:
        raise ValueError(f"fastlm._cuda.ATTN_HOPPER_FWD must be one of {sorted(_HOPPER_FWD_MODES)}, got "
                         f"{ATTN_HOPPER_FWD!r}")
    return mode


def attention_bwd_unsupported(q, softcap) -> str | None:
    """None when attention_bwd (the wgmma backward) can take a call with these inputs, else why not."""
    if softcap:
        return "the wgmma backward has no softcap"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the wgmma backward takes float16 and bfloat16, got {q.dtype}"
    if not attention_hopper_supported(q.shape[-1], q.device, backward=True):
        return "the wgmma backward runs at head dims 64 and 128 on compute capability 9.0 (sm_90a code)"
    return None


def attention_bwd(do, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                  window_left, window_right, softcap, deterministic=True):
    """kernels/attention.py's attention_bwd on wgmma: dq, dk, dv (contiguous, q's and k's shapes and dtype) for
    attention_fwd's out and lse, from do (and dlse, lse's shape, when the lse is used). Always deterministic (no
    atomics). Only where attention_bwd_unsupported says None (the launcher refuses another GPU or head dim itself;
    the softcap it never sees)."""
    ext = _require("q", q)
    if softcap:
        raise ValueError("the wgmma backward has no softcap")
    varlen = cu_seqlens_q is not None
    dims = 3 if varlen else 4
    q = _attn_operand("q", q, q, dims)
    k = _attn_operand("k", k, q, dims)
    v = _attn_operand("v", v, q, dims)
    # out and dout contiguous (the kernels read dout with out's strides) and 16-byte aligned (a contiguous view may
    # start anywhere in its storage: copied then, as _attn_operand copies q, k and v).
    out, do = (t.contiguous() for t in (out, do.to(out.dtype)))
    out, do = (t.clone() if t.data_ptr() % 16 else t for t in (out, do))
    lse = lse.contiguous()
    dlse = dlse.float().contiguous() if dlse is not None else None
    *lead_q, heads_q, head_dim = q.shape
    *lead_k, heads_k, _ = k.shape
    if varlen:
        batch, (total_q,), (total_k,) = cu_seqlens_q.numel() - 1, lead_q, lead_k
        max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    else:
        (batch, max_seqlen_q), (_, max_seqlen_k) = lead_q, lead_k
        total_q, total_k = max_seqlen_q, max_seqlen_k
    # Varlen tokens outside every sequence, and keys when no query exists, are not written: they start at 0 (for
    # varlen, a memset of the three gradients, where the Triton backward writes those rows itself).
    fill = torch.zeros if varlen or max_seqlen_q == 0 else torch.empty
    dq = fill(q.shape, dtype=q.dtype, device=q.device)
    dk = fill(k.shape, dtype=k.dtype, device=k.device)
    dv = fill(v.shape, dtype=v.dtype, device=v.device)
    if batch == 0 or q.numel() == 0:
        return dq, dk, dv
    delta = torch.empty_like(lse)
    ext.attention_bwd(
        do.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), _ptr(dlse),
        delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), _ptr(cu_seqlens_q), _ptr(cu_seqlens_k),
        *(_row_strides(t, varlen) for t in (q, k, v, out, dq, dk)), batch, heads_q, heads_k, head_dim,
        max_seqlen_q, max_seqlen_k, total_q, total_k, _DTYPE_CODES[q.dtype], float(scale),
        _attn_window(window_left), _attn_window(window_right), q.device.index, _stream(q),
    )
    return dq, dk, dv


# --- rotary embedding ------------------------------------------------------------------------------------------------


def _rotary(x, cos, sin, interleaved, heads_first, backward):
    ext = _require("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D, got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"x must have unit feature stride, got strides {x.stride()}")
    (batch, seqlen, heads, head_dim), x_strides = _util.bshd(x, heads_first)
    for name, t in (("cos", cos), ("sin", sin)):
        _same_device(name, t, x)
        if t.dim() not in (2, 3) or t.shape[-2] != seqlen or (t.dim() == 3 and t.shape[0] not in (1, batch)):
            raise ValueError(f"{name} must have shape (seq, rot) or (batch or 1, seq, rot) with seq {seqlen} and "
                             f"batch {batch}, got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit feature stride, got strides {t.stride()}")
    if cos.shape != sin.shape or cos.dtype != sin.dtype:
        raise ValueError(f"cos and sin must have one shape and dtype, got {tuple(cos.shape)} {cos.dtype} and "
                         f"{tuple(sin.shape)} {sin.dtype}")
    rot = cos.shape[-1]
    if rot < 2 or rot % 2 or rot > head_dim:
        raise ValueError(f"cos's last dimension (rot) must be even, ≥ 2 and ≤ head_dim {head_dim}, got {rot}")
    cos_strides = _util.table_strides(cos)
    if cos_strides != _util.table_strides(sin):
        raise ValueError(f"cos and sin must have equal strides, got {cos.stride()} and {sin.stride()}")
    out = _util.empty(x.shape, x.dtype, x.device)
    if out.numel() == 0:
        return out
    ext.rotary(
        x.data_ptr(), x_strides[:3], cos.data_ptr(), sin.data_ptr(), cos_strides, out.data_ptr(),
        _util.bshd(out, heads_first)[1][:3], batch, seqlen, heads, head_dim, rot, _DTYPE_CODES[x.dtype],
        _DTYPE_CODES[cos.dtype], bool(interleaved), bool(backward), x.device.index, _stream(x),
    )
    return out


def rotary_fwd(x, cos, sin, interleaved, heads_first):
    """As kernels/rotary.py's rotary_fwd: x (batch, seq, heads, head_dim), or (batch, heads, seq, head_dim) when
    heads_first, unit feature stride; cos, sin (seq, rot) or (batch or 1, seq, rot), unit feature stride, one dtype
    (float32 or x's) and equal strides. Returns out: x's shape (contiguous) and dtype."""
    return _rotary(x, cos, sin, interleaved, heads_first, False)


def rotary_bwd(dy, cos, sin, interleaved, heads_first):
    """Backward of rotary_fwd (the transpose of the rotation): dy like x. Returns dx, contiguous."""
    return _rotary(dy, cos, sin, interleaved, heads_first, True)


# --- gated activations (SwiGLU, GeGLU) -------------------------------------------------------------------------------


def _gated_operands(activation, named):
    """Operands of one shape and dtype, read as rows (`_util.elementwise_rows`); returns (ext, the activation's
    code)."""
    ref_name, ref = named[0]
    ext = _require(ref_name, ref)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
    _operand(ref_name, ref, ref)
    for name, t in named[1:]:
        _operand(name, t, ref, ref.shape, ref.dtype)
    return ext, _ACTIVATIONS[activation]


def gated_fwd(gate, up, activation):
    """As kernels/gated.py's gated_fwd: h = act(gate)·up for gate and up of one shape and dtype, read as rows;
    activation "silu", "gelu_tanh" or "gelu". Returns h in gate's shape, contiguous."""
    ext, code = _gated_operands(activation, (("gate", gate), ("up", up)))
    h = _util.empty(gate.shape, gate.dtype, gate.device)
    if h.numel() > 0:
        (g, u, hv), M, N, (sg, su, sh) = _util.elementwise_rows(gate, up, h)
        ext.gated_fwd(g.data_ptr(), sg, u.data_ptr(), su, hv.data_ptr(), sh, M, N,
                       _DTYPE_CODES[gate.dtype], code, gate.device.index, _stream(gate))
    return h


def gated_bwd(dh, gate, up, activation):
    """As kernels/gated.py's gated_bwd: (dgate, dup), each in gate's shape and dtype, contiguous."""
    ext, code = _gated_operands(activation, (("gate", gate), ("up", up), ("dh", dh)))
    dgate = _util.empty(gate.shape, gate.dtype, gate.device)
    dup = _util.empty(gate.shape, gate.dtype, gate.device)
    if dgate.numel() > 0:
        (d, g, u, dg, du), M, N, (sd, sg, su, sdg, sdu) = _util.elementwise_rows(dh, gate, up, dgate, dup)
        ext.gated_bwd(d.data_ptr(), sd, g.data_ptr(), sg, u.data_ptr(), su, dg.data_ptr(), sdg, du.data_ptr(), sdu,
                       M, N, _DTYPE_CODES[gate.dtype], code,
                       gate.device.index, _stream(gate))
    return dgate, dup

