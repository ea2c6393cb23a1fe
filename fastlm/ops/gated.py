"""SwiGLU and GeGLU, the gated activations of the transformer MLP: argument checks, backend dispatch,
torch.library registration and autograd.

The math, the roofline and the kernel design are in kernels/gated.py (Triton) and csrc/gated.cu (CUDA C++); the
references are fastlm.reference.swiglu / geglu.

Flow: fastlm.swiglu / fastlm.geglu check their arguments and pick a backend; gate and up go to the launchers in
their own shape, read as rows (in place wherever the leading dimensions collapse to one stride, so the halves of
a fused gate-up projection are not copied; no view op either way). The
torch backend is the reference, differentiated by autograd. The kernel backends go through two registered ops,
`fastlm::gated_fwd` and `fastlm::gated_bwd`, each calling the backend's launcher of the same name (kernels.gated
and fastlm._cuda share their signatures), with fake implementations so torch.compile traces them without graph
breaks, and an autograd formula that calls `fastlm::gated_bwd`. Nothing reads a GPU value on the host.

Saved for backward: gate and up (the activation is recomputed).
"""

import torch

from fastlm import _backend, reference
from fastlm.kernels import gated as triton_gated
from fastlm.ops import _checks, _eager

GELU_APPROXIMATIONS = ("tanh", "none")


@_eager.custom_op("fastlm::gated_fwd", mutates_args=())
def gated_fwd_op(gate: torch.Tensor, up: torch.Tensor, activation: str, backend: str) -> torch.Tensor:
    """gate and up of one shape → h = act(gate)·up in that shape, contiguous. activation: "silu", "gelu_tanh",
    "gelu"."""
    return _backend.launchers(backend, triton_gated).gated_fwd(gate, up, activation)


@gated_fwd_op.register_fake
def _(gate, up, activation, backend):
    return gate.new_empty(gate.shape)


@_eager.custom_op("fastlm::gated_bwd", mutates_args=())
def gated_bwd_op(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """→ d(gate), d(up) in gate's shape and dtype, contiguous."""
    return _backend.launchers(backend, triton_gated).gated_bwd(dh, gate, up, activation)


@gated_bwd_op.register_fake
def _(dh, gate, up, activation, backend):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    gate, up, activation, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation
    ctx.backend = backend


def _backward(ctx, dh):
    gate, up = ctx.saved_tensors
    # Any layout: the launchers read dh as rows, copying an expanded or strided one autograd may hand out.
    dgate, dup = gated_bwd_op(dh, gate, up, ctx.activation, ctx.backend)
    need_gate, need_up = ctx.needs_input_grad[:2]
    return dgate if need_gate else None, dup if need_up else None, None, None


gated_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check(gate, up):
    _checks.tensor("gate", gate)
    _checks.tensor("up", up)
    _checks.shape("up", up, gate.shape, " (gate's shape)")
    if up.dtype != gate.dtype:
        raise TypeError(f"up must have gate's dtype ({gate.dtype}), got {up.dtype}")
    _checks.same_device("up", up, "gate", gate)


def _gated(op, gate, up, activation):
    # Meta tensors (shapes only: model init on meta, FSDP) take the reference's shapes under every backend.
    backend = "torch" if gate.device.type == "meta" else _backend.resolve(op, gate.device, gate.dtype)
    if backend == "torch":
        if activation == "silu":
            return reference.swiglu(gate, up)
        return reference.geglu(gate, up, "tanh" if activation == "gelu_tanh" else "none")
    return gated_fwd_op(gate, up, activation, backend)


def swiglu(gate, up):
    """SwiGLU's gating: silu(gate) · up, elementwise (Llama, Mistral, Qwen MLPs: down(swiglu(gate(x), up(x)))).

    gate, up: one shape, float32, float16 or bfloat16 (float64 runs on the torch backend), one device; any strides
    (the halves of a fused gate-up projection, `h.chunk(2, -1)`, are read in place). Computed in float32, rounded
    once; the result has the inputs' dtype and shape and is contiguous. Differentiable in both inputs, the backward
    fused (it recomputes the activation rather than saving it).
    """
    _check(gate, up)
    return _gated("swiglu", gate, up, "silu")


def geglu(gate, up, approximate="tanh"):
    """GeGLU's gating: gelu(gate, approximate) · up, elementwise (Gemma's MLP uses approximate="tanh").

    approximate: "tanh" (torch.nn.functional.gelu's tanh approximation) or "none" (the exact, erf form). Otherwise
    as `swiglu`.
    """
    _check(gate, up)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    return _gated("geglu", gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")
