"""The host path of a kernel call: registered ops for torch.compile, a direct call for eager PyTorch.

Every kernel of fastlm is a `torch.library.custom_op` with a fake implementation and an autograd formula, so that
torch.compile traces it without a graph break and a CUDA graph can capture it. Going through that registration
costs, on every eager call, the dispatcher's boxing of the arguments, the generic autograd wrapper torch builds for
the op (a second dispatch below autograd), the alias checks of the outputs, and the same again for the backward
op: about 100 µs of host time per forward + backward on a fast CPU, more than the kernels themselves take at the
sizes of a decode step or a norm over 4096 × 1024 (issue 15).

`custom_op` here registers the op exactly as `torch.library.custom_op` does and returns a `KernelOp` whose call
takes one of three paths:

- through the registered op (`torch.ops.fastlm.<name>`) whenever something must see it as one operator: while
  torch.compile or export traces (the fake implementation and the graph node), under a tensor subclass (DTensor,
  FakeTensor, functional tensors), an active dispatch or torch-function mode, or functorch transforms (vmap, grad);
  on meta tensors (the fake implementation gives the shapes); under torch.jit.trace; and for an op with no autograd
  formula (every op that mutates an argument) while gradients are being recorded;
- when autograd must record the call (grad mode on and an input requires grad): the op's own implementation inside
  a plain `torch.autograd.Function` built from the op's `setup_context` and `backward`, the same formula the
  registered op uses, with none of the dispatcher's wrapping;
- otherwise (inference, or a backward op called from a backward): the implementation itself, a Python call; for
  an op that mutates arguments, followed by a bump of their version counters, which is what the registration's
  ADInplaceOrView kernel does (autograd then refuses a backward through values the op overwrote).

The three give the same tensors: the implementation is the same function, and the autograd formula is the same
pair of functions (`tests/test_eager_path.py` runs each op both ways and compares them bit for bit). What the direct
path skips that the dispatcher does: schema normalization (every call site passes every argument positionally,
already converted), the outputs' alias check (no implementation returns an input), and the op's name in eager
profiles. Lazy negative views (the only lazy view a real floating-point tensor can carry; fastlm takes no complex
tensors) go to the registered op, whose dispatch materializes them.

Set `DISPATCH_ALWAYS = True` (tests do, for some checks) to send every call through the registered op.
"""

import inspect
from typing import Callable, Optional

import torch

# Every call through the registered op: for tests that compare the two paths, and for debugging.
DISPATCH_ALWAYS = False

_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_transforms = torch._C._are_functorch_transforms_active
_any_requires_grad = torch._C._any_requires_grad
_grad_enabled = torch.is_grad_enabled
_Tensor = torch.Tensor


_Parameter = torch.nn.Parameter
_tracing = torch._C._get_tracing_state
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
# autograd.Function.apply without its Python wrapper, which binds default arguments when a separate setup_context is
# declared (ours is not), checks for functorch transforms (done by `_must_dispatch`) and unwraps functorch's dead
# wrappers (`_plain` sends any functorch-wrapped tensor to the registered op instead): ~4 µs a call.
_function_apply = torch._C._FunctionBase.__dict__["apply"]
_increment_version = torch.autograd.graph.increment_version


def _plain(args) -> bool:
    """Every tensor argument is a plain torch.Tensor or a plain nn.Parameter (no subclass that must see the
    operator: the exact type is compared, since an nn.Parameter wrapping a subclass — a DTensor parameter — passes
    isinstance(p, nn.Parameter) but keeps the subclass's type), none is a functorch wrapper (a tensor of a
    transform, or one that escaped it: the registered op's autograd.Function unwraps those) and none is a lazily
    negated view."""
    for a in args:
        kind = type(a)
        if kind is _Tensor or kind is _Parameter:
            # A lazily negated view (its negative bit set: torch._neg_view, or the imaginary part of a conjugated
            # complex tensor) holds the values unnegated: the dispatcher materializes it for the registered op;
            # the launchers would read it raw.
            if _functorch_wrapped(a) or a.is_neg():
                return False
        elif kind not in _SCALARS and isinstance(a, _Tensor):
            return False
    return True


_SCALARS = frozenset((type(None), bool, int, float, str))  # argument types that are never tensors: no isinstance


def _must_dispatch(args) -> bool:
    # Meta tensors (shapes only) take the registered op's fake implementation; every op's first argument is a
    # tensor on the device all its tensors share. torch.jit.trace records the registered op (its sizes are
    # tensors there, which the launchers' arithmetic cannot take).
    return (DISPATCH_ALWAYS or _compiling() or _dispatch_modes() > 0 or _function_modes() or _transforms()
            or _tracing() is not None or not _plain(args) or args[0].is_meta)


class KernelOp:
    """A registered fastlm op (see the module docstring): `op(*args)` runs it on the cheapest correct path."""

    def __init__(self, definition, fn: Callable, mutated: tuple):
        self._definition = definition  # torch.library's CustomOpDef
        self._fn = fn
        self._mutated = mutated  # positions of the arguments the op writes
        self._function: Optional[type] = None
        self._apply: Optional[Callable] = None
        # The registered operator, `torch.ops.fastlm.<name>.default`, looked up once here. Not lazily on first
        # use: a first use inside torch.compile's trace (a model compiled before any eager call) made Dynamo guard
        # on the attribute's new OpOverload value, which it cannot ("Unexpected type OpOverload").
        self.registered = definition._opoverload

    def register_fake(self, fn):
        return self._definition.register_fake(fn)

    def register_autograd(self, backward, *, setup_context=None):
        self._definition.register_autograd(backward, setup_context=setup_context)
        fn = self._fn

        def forward(ctx, *args):
            output = fn(*args)
            if setup_context is not None:
                setup_context(ctx, args, output)
            return output

        # The same (ctx, inputs, output) contract as torch.library's, and its default of materialized (zero)
        # gradients for unused outputs. setup_context is called from forward rather than declared separately:
        # autograd.Function binds a separate one's arguments with inspect.signature on every call (~10 µs).
        self._function = type(
            f"{self._definition._namespace}_{self._definition._name}_function",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )
        self._apply = _function_apply.__get__(None, self._function)

    def __call__(self, *args):
        if _must_dispatch(args):
            return self.registered(*args)
        if _grad_enabled() and _any_requires_grad(*args):
            if self._apply is None:
                return self.registered(*args)
            return self._apply(*args)
        output = self._fn(*args)
        if self._mutated:
            # As the registration's ADInplaceOrView kernel: the written arguments' version counters move on.
            _increment_version([args[i] for i in self._mutated if args[i] is not None])
        return output


def custom_op(name: str, *, mutates_args=()):
    """`torch.library.custom_op(name, mutates_args=...)`, returning a `KernelOp` (positional arguments only)."""

    def wrap(fn):
        definition = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        if isinstance(mutates_args, str):
            raise ValueError("fastlm's ops name the arguments they mutate (a tuple of names), got "
                             f"{mutates_args!r}")
        params = list(inspect.signature(fn).parameters)
        return KernelOp(definition, fn, tuple(params.index(a) for a in mutates_args))

    return wrap
