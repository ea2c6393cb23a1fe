"""`fastlm.patch(model)` / `fastlm.unpatch(model)`: run an already-built Hugging Face transformers model on fastlm's
kernels, in place, with the same numbers as before.

Supported: the model types in `SUPPORTED_MODEL_TYPES` (GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma 2), on the
transformers versions in `SUPPORTED_TRANSFORMERS` (the ones whose source this was written against and tested on).
transformers is imported by `patch`, never by `import fastlm` (which only arranges to register with it: 4.).

What `patch` changes, and nothing else (parameters, buffers and state_dict keys are untouched):

1. Modules: each one patched is given a subclass of its own class (a `__class__` swap, so isinstance holds) with
   fastlm's forward; unpatch swaps the class back.

   Norms. Each norm module of the model type's norm class gets a forward that calls fastlm.layer_norm /
   fastlm.rms_norm with the module's weight and eps, reproducing the model's casting: GPT-2's torch.nn.LayerNorm
   becomes fastlm.nn.LayerNorm; Llama-style RMSNorms (eps in `variance_epsilon`) normalize in fp32, cast to the input
   dtype and scale by the weight, which is fastlm.rms_norm when weight and input share a dtype; Gemma 2's RMSNorm
   (eps in `eps`) scales by (1 + weight) in fp32 before one cast, which is fastlm.rms_norm(..., offset=1.0) for a
   weight in the input's dtype or fp32. Other dtype pairings (where HF's output dtype is the promotion of the two)
   run the original forward.

   Rotary embedding (Llama, Mistral, Qwen2, Qwen3, Gemma 2). Each attention module gets the class's own forward — the
   same code object — run over a copy of its modeling module's globals in which `apply_rotary_pos_emb` is fastlm's:
   fastlm.rotary_embedding of q and of k (full-width rotate-half tables, HF's (batch, seq, head_dim) cos and sin,
   read in place). Only the patched model's modules see it: the modeling module itself, and every unpatched model,
   keep transformers' function. HF computes q·cos + rotate_half(q)·sin by type promotion: cos and sin come in the
   hidden states' dtype (the rotary module casts them), so in the result dtype promote(q, cos) — q's own dtype except
   where autocast made q bf16 beside float32 tables, where HF's result is float32. fastlm computes in float32
   (float64 for float64) and rounds once to that same result dtype. A call the kernel does not cover (cos or sin
   requiring grad, tables that do not match q's batch/seq/head_dim, an unsqueeze_dim other than 1 or 2) runs
   transformers' function, with a warning the first time.

   Gated MLP (the same five; GPT-2's MLP is left as it is). Each MLP module whose act_fn is SiLU (hidden_act
   "silu"/"swish"), the tanh GELU ("gelu_pytorch_tanh", Gemma 2's) or the erf GELU ("gelu") gets the forward
   down_proj(fastlm.swiglu(gate_proj(x), up_proj(x))) (fastlm.geglu(..., approximate="tanh" / "none") for the GELUs):
   act(gate)·up in float32, rounded once, where HF rounds act(gate) and the product. Any other activation keeps its
   module unpatched; an act_fn replaced after patching runs the original forward.

2. Attention, through transformers' registries: "fastlm" is registered as an attention function
   (`AttentionInterface`, called by every attention module as (module, query, key, value, attention_mask,
   dropout=, scaling=, sliding_window=, softcap=, is_causal=, **kwargs) with query (B, H, S, D)) and as a mask
   builder (`AttentionMaskInterface`), and the model is switched with `model.set_attn_implementation("fastlm")`.
   The mask builder returns None exactly when the mask is causal, aligned bottom-right (the last query is the
   last key, which is how a KV cache lines up), with no padding: then the attention function calls
   fastlm.attention(q, k, v, causal=True, scale=scaling, window=(sliding_window - 1, 0), softcap=softcap) in
   (B, S, H, D) layout, grouped-query heads read in place. HF's sliding window keeps key j for query i when
   i - sliding_window < j <= i, hence the left window of sliding_window - 1. Anything else — padding or packed
   sequences (a real mask), attention dropout in training, a non-causal module, mismatched head dims — runs
   transformers' own sdpa attention for that call (its eager attention when there is a softcap, which sdpa
   cannot apply), with a warning the first time each reason occurs.

3. The causal-LM loss (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
   Qwen3ForCausalLM, Gemma2ForCausalLM): the model's forward is wrapped. In training mode with `labels`, the
   wrapper runs the base model and computes HF's ForCausalLMLoss — labels shifted left with ignore_index (-100)
   padding, or `shift_labels` when given; mean over the kept tokens, or sum / `num_items_in_batch` when given —
   as fastlm.linear_cross_entropy(hidden, lm_head.weight, ...) with Gemma 2's final_logit_softcapping, so the
   (tokens, vocab) logits are never made: the output's `logits` is None (and is left out of the tuple when
   return_dict=False). Under autocast the head's inputs are cast to the autocast dtype, as autocast would, and the
   fused op runs with autocast off. In eval mode, without labels, with `logits_to_keep`, or with a custom loss
   function, the original forward runs; with an lm_head that is not a plain torch.nn.Linear in the hidden states'
   dtype (an adapter, mixed dtypes) the wrapper computes HF's loss over the logits itself. When the caller passes no attention_mask, position_ids, past_key_values or encoder
   states, the wrapper also tells the attention function that the batch is plainly causal (a keyword passed down
   through the model), so that under torch.compile — where transformers cannot rule out packed sequences and
   materializes a mask — the kernel still runs. Warnings are not given while torch.compile traces (a warning
   would break the graph).

4. `attn_implementation="fastlm"` without `patch`: `import fastlm` registers the attention function and the mask
   builder with transformers as soon as transformers' registries exist (at once when transformers.modeling_utils /
   masking_utils are already imported, otherwise when they are: a `sys.meta_path` finder that runs the
   registration right after each of those modules executes, then leaves). `import fastlm` itself imports no
   transformers (1–3 s). So `AutoModelForCausalLM.from_config(config, attn_implementation="fastlm")` and
   `from_pretrained(..., attn_implementation="fastlm")` select fastlm's attention as they select
   "flash_attention_2" (attention alone: norms, rotary, MLP and loss are `patch`'s), on the transformers versions
   `patch` supports (on others nothing is registered, and transformers says the implementation is unknown).

`patch` on a patched model is a no-op that returns it; `unpatch` puts back the recorded classes, attention
implementation and forward, after which outputs and state_dict are what they were (a no-op on a model that is not
patched). The record lives in the model's `__dict__` and the forward is a bound method, so copy.deepcopy of a
patched model gives a patched copy; pickling a whole patched module does not work (its norm classes are made at
patch time): pickle the state_dict, or unpatch first.

The transformers internals this relies on (which will move) are listed, dated, in docs/DESIGN.md ("Hugging Face
integration").
"""

import contextlib
import importlib.abc
import sys
import types
from dataclasses import dataclass, field

import torch

from fastlm import _backend
from fastlm import nn as fastlm_nn
from fastlm.ops.attention import MAX_HEAD_DIM, attention
from fastlm.ops.cross_entropy import linear_cross_entropy
from fastlm.ops.gated import geglu, swiglu
from fastlm.ops.norm import rms_norm
from fastlm.ops.rotary import rotary_embedding
from fastlm.reference import attention_visible

ATTN_IMPLEMENTATION = "fastlm"
SUPPORTED_TRANSFORMERS = ("5.17", "5.18")  # [low, high): the releases this was checked against
IGNORE_INDEX = -100

# Set by the causal-LM wrapper on calls it has proven plainly causal; read (and removed) by the attention function.
_PLAIN_CAUSAL = "fastlm_plain_causal"
_RECORD = "_fastlm_patch"


# ---------------------------------------------------------------------------------------------- norms


def _original_forward(self, *args, **kwargs):
    return self._fastlm_original_class.forward(self, *args, **kwargs)


def _rms_norm_cast_forward(self, hidden_states):
    """Llama, Mistral, Qwen2, Qwen3: weight * (x_fp32 * rsqrt(mean(x²) + eps)).to(x.dtype). With weight and x of
    one dtype the kernel gives this in that dtype, rounded once where HF rounds twice (a no-op in float32)."""
    if self.weight.dtype != hidden_states.dtype:
        return _original_forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _rms_norm_offset_forward(self, x):
    """Gemma 2: (x_fp32 * rsqrt(mean(x²) + eps) * (1 + weight_fp32)).to(x.dtype)."""
    if self.weight.dtype not in (x.dtype, torch.float32):
        return _original_forward(self, x)
    return rms_norm(x, self.weight, self.eps, offset=1.0)


_SUBCLASSES = {}


def _patched_class(cls, what, **attrs):
    """A subclass of cls with fastlm's forward (`attrs`): same parameters, state_dict keys and isinstance. One per
    class and attributes, made on first use."""
    key = (cls, tuple(sorted(attrs.items(), key=lambda item: item[0])))
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Fastlm{cls.__name__}", (cls,), {
            **attrs,
            "_fastlm_original_class": cls,
            "__module__": __name__,
            "__doc__": f"{cls.__name__} on fastlm's {what} (installed by fastlm.patch).",
        })
    return _SUBCLASSES[key]


# ---------------------------------------------------------------------------------------------- rotary embedding

_ROPE = "apply_rotary_pos_emb"
_ROPE_PARAMETERS = ("q", "k", "cos", "sin", "unsqueeze_dim")  # transformers 5.17's signature, in every family
_ROPE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _rope_unsupported(q, k, cos, sin, unsqueeze_dim):
    """Why fastlm.rotary_embedding cannot reproduce HF's apply_rotary_pos_emb on these arguments, or None."""
    if not isinstance(unsqueeze_dim, int) or unsqueeze_dim % 4 not in (1, 2):
        return f"unsqueeze_dim={unsqueeze_dim!r} (q, k as (batch, heads, seq, head_dim) or (batch, seq, heads, ...))"
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return "tables other than (batch or 1, seq, head_dim) beside 4-D q and k"
    seq = 2 if unsqueeze_dim % 4 == 1 else 1
    for x in (q, k):
        if (cos.shape[0] not in (1, x.shape[0]) or cos.shape[1] != x.shape[seq] or cos.shape[2] != x.shape[3]
                or x.shape[3] % 2):
            return "tables that are not q's and k's (batch or 1, seq, head_dim), or an odd head_dim"
    if any(t.dtype not in _ROPE_DTYPES for t in (q, k, cos)) or sin.dtype != cos.dtype:
        return "dtypes other than float16, bfloat16, float32 or float64 (cos and sin alike)"
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return "cos or sin requiring grad (fastlm treats them as buffers)"
    if not (q.device == k.device == cos.device == sin.device):
        return "tensors on different devices"
    return None


def _rotate(x, cos, sin, unsqueeze_dim):
    """HF's x·cos + rotate_half(x)·sin with cos, sin unsqueezed at unsqueeze_dim, on fastlm.rotary_embedding: in the
    dtype HF's type promotion gives (x's, or float32 for bf16/fp16 x beside float32 tables), rounded once."""
    dtype = torch.promote_types(x.dtype, cos.dtype)
    x = x.to(dtype)
    if cos.dtype not in (dtype, torch.float32):
        cos, sin = cos.to(dtype), sin.to(dtype)  # exact: a widening (float16 tables beside a bfloat16 x)
    if unsqueeze_dim % 4 == 2:  # (batch, seq, heads, head_dim)
        return rotary_embedding(x, cos, sin)
    # (batch, heads, seq, head_dim), usually a transposed view of the projection's (batch, seq, heads, head_dim):
    # rotate it in that layout, so the result has HF's strides and the attention kernel reads it without a copy.
    if x.transpose(1, 2).is_contiguous():
        return rotary_embedding(x.transpose(1, 2), cos, sin).transpose(1, 2)
    return rotary_embedding(x, cos, sin, heads_first=True)


def _fastlm_rope(original):
    """The apply_rotary_pos_emb that patched attention modules call: fastlm.rotary_embedding of q and of k, or
    `original` (transformers' function) for a call it does not cover."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        why = _rope_unsupported(q, k, cos, sin, unsqueeze_dim)
        if why is not None:
            _say_once(f"fastlm.patch: a rotary embedding with {why} is not covered by fastlm.rotary_embedding; "
                      "such calls run transformers' apply_rotary_pos_emb")
            return original(q, k, cos, sin, unsqueeze_dim)
        return _rotate(q, cos, sin, unsqueeze_dim), _rotate(k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.__doc__ = _fastlm_rope.__doc__
    apply_rotary_pos_emb._fastlm_original = original
    return apply_rotary_pos_emb


_SCOPES = {}  # modeling module name → (the globals its patched attention forwards run over, original, fastlm's)
_ROPE_FORWARDS = {}  # attention class → its forward over that scope


def _rope_scope(module):
    """A copy of the modeling module's globals with fastlm's apply_rotary_pos_emb, refreshed from the module on each
    patch (so it holds what an unpatched forward would find). No `__name__`: see the module docstring (Dynamo)."""
    original = vars(module)[_ROPE]
    scope, was, rope = _SCOPES.get(module.__name__, ({}, None, None))
    if original is not was:
        rope = _fastlm_rope(original)
    scope.update((name, value) for name, value in vars(module).items() if name != "__name__")
    scope[_ROPE] = rope
    _SCOPES[module.__name__] = (scope, original, rope)
    return scope


def _rope_forward(cls, module):
    """cls.forward's own code over `_rope_scope(module)`, or None when that forward does not call the module's
    apply_rotary_pos_emb itself (a decorated forward, another signature: a transformers this was not checked on)."""
    import inspect

    forward = cls.forward
    rope = vars(module).get(_ROPE)
    if (not isinstance(forward, types.FunctionType) or _ROPE not in forward.__code__.co_names or rope is None
            or tuple(inspect.signature(rope).parameters) != _ROPE_PARAMETERS):
        return None
    scope = _rope_scope(module)
    if cls not in _ROPE_FORWARDS:
        new = types.FunctionType(forward.__code__, scope, forward.__name__, forward.__defaults__,
                                 forward.__closure__)
        new.__kwdefaults__ = forward.__kwdefaults__
        new.__dict__.update(forward.__dict__)
        new.__qualname__, new.__doc__, new.__module__ = forward.__qualname__, forward.__doc__, forward.__module__
        new.__annotations__ = forward.__annotations__
        _ROPE_FORWARDS[cls] = new
    return _ROPE_FORWARDS[cls]


# ---------------------------------------------------------------------------------------------- gated MLP


def _gated_activations():
    """{ACT2FN activation class: the GELU approximation fastlm.geglu takes, or None for SiLU (fastlm.swiglu)}."""
    from transformers import activations

    return {activations.SiLUActivation: None, torch.nn.SiLU: None, activations.GELUTanh: "tanh",
            activations.GELUActivation: "none"}


def _gated_mlp_forward(self, x):
    """down_proj(act_fn(gate_proj(x)) * up_proj(x)) with act(gate)·up fused: fastlm.swiglu, or fastlm.geglu with the
    class's GELU approximation."""
    if type(self.act_fn) is not self._fastlm_activation:  # act_fn replaced after patching
        return _original_forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype != up.dtype:  # projections in two dtypes: HF's product promotes
        return self.down_proj(self.act_fn(gate) * up)
    if self._fastlm_gelu is None:
        return self.down_proj(swiglu(gate, up))
    return self.down_proj(geglu(gate, up, approximate=self._fastlm_gelu))


# ---------------------------------------------------------------------------------------------- the model types


@dataclass(frozen=True)
class _ModelType:
    causal_lm: str  # the *ForCausalLM class whose loss is fused
    norms: dict  # norm class name in the modeling module → forward; "torch.nn.LayerNorm" for torch's own
    attention: str = None  # the attention class whose apply_rotary_pos_emb becomes fastlm.rotary_embedding
    mlp: str = None  # the gated MLP class, down_proj(act_fn(gate_proj(x)) * up_proj(x))
    final_softcap_attr: str = None  # the config attribute holding the final logit softcap
    output_class: str = "CausalLMOutputWithPast"  # what the causal LM's forward returns (transformers.modeling_outputs)


def _llama_like(prefix, norm_forward=None, **kwargs):
    return _ModelType(f"{prefix}ForCausalLM", {f"{prefix}RMSNorm": norm_forward or _rms_norm_cast_forward},
                      attention=f"{prefix}Attention", mlp=f"{prefix}MLP", **kwargs)


_MODEL_TYPES = {
    "gpt2": _ModelType("GPT2LMHeadModel", {"torch.nn.LayerNorm": None},
                       output_class="CausalLMOutputWithCrossAttentions"),
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "qwen2": _llama_like("Qwen2"),
    "qwen3": _llama_like("Qwen3"),
    "gemma2": _llama_like("Gemma2", _rms_norm_offset_forward, final_softcap_attr="final_logit_softcapping"),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_MODEL_TYPES))


def _modeling_module(model_type):
    import importlib

    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _class_swaps(model_type):
    """module → its patched class, or None to leave it: the model type's norms, attention (rotary) and gated MLP
    (when its act_fn is one fastlm fuses)."""
    spec = _MODEL_TYPES[model_type]
    swaps = {}
    for name, forward in spec.norms.items():
        if name == "torch.nn.LayerNorm":
            swaps[torch.nn.LayerNorm] = fastlm_nn.LayerNorm
        else:
            cls = getattr(_modeling_module(model_type), name)
            swaps[cls] = _patched_class(cls, "norm kernel", forward=forward)
    if spec.attention is not None:
        module = _modeling_module(model_type)
        cls = getattr(module, spec.attention)
        forward = _rope_forward(cls, module)
        if forward is not None:
            swaps[cls] = _patched_class(cls, "rotary embedding", forward=forward)
    mlp = getattr(_modeling_module(model_type), spec.mlp) if spec.mlp is not None else None
    activations = _gated_activations() if mlp is not None else {}

    def swap(module):
        cls = type(module)
        if cls is mlp:
            act = type(getattr(module, "act_fn", None))
            if act not in activations:
                return None
            return _patched_class(cls, "gated activation", forward=_gated_mlp_forward, _fastlm_activation=act,
                                  _fastlm_gelu=activations[act])
        return swaps.get(cls)

    return swap


# ---------------------------------------------------------------------------------------------- warnings

def _say_once(message):
    _backend.say_once(message, message)


# ---------------------------------------------------------------------------------------------- attention


def _bottom_right(q_length, kv_length, q_offset, kv_offset):
    # A static cache hands offsets as device tensors: its keys are not aligned, and a mask is built for it.
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        return False
    return kv_offset + kv_length == q_offset + q_length


def _no_padding(attention_mask):
    from transformers.utils.import_utils import is_tracing

    if attention_mask is None:
        return True
    if is_tracing(attention_mask):
        return False  # cannot look at the values: build the mask
    return bool(attention_mask.all())


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, allow_is_causal_skip=True,
          **kwargs):
    """transformers' mask builder for "fastlm": None when the kernel's own causal (+ the layer's sliding window)
    pattern is the mask; otherwise sdpa's boolean mask (batch, 1, q_length, kv_length)."""
    from transformers.masking_utils import sdpa_mask

    if allow_is_causal_skip and _bottom_right(q_length, kv_length, q_offset, kv_offset) and _no_padding(
            attention_mask):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, allow_is_causal_skip=False, **kwargs)


def _fallback(why, module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, causal,
              kwargs):
    """transformers' own attention for a call the kernel does not cover: sdpa, or eager when there is a softcap."""
    implementation = "sdpa" if softcap is None else "eager"
    _say_once(f"fastlm.patch: {why} is not covered by fastlm.attention; such calls run transformers' "
              f"{implementation} attention")
    if attention_mask is None and causal:
        # None meant bottom-right causal (+ window); sdpa's is_causal is top-left, so spell the pattern out.
        left = sliding_window - 1 if sliding_window is not None else None
        attention_mask = attention_visible(query.shape[2], key.shape[2], left, 0, query.device)[None, None]
    if softcap is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=causal, **kwargs)
    cls = getattr(type(module), "_fastlm_original_class", type(module))  # a patched attention: its own class's
    eager = sys.modules[cls.__module__].eager_attention_forward
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.where(attention_mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap,
                 **kwargs)


def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                       softcap=None, is_causal=None, **kwargs):
    """transformers' attention function for "fastlm": query (B, Hq, Sq, D), key and value (B, Hk, Sk, D) →
    (output (B, Sq, Hq, D), None)."""
    plain = kwargs.pop(_PLAIN_CAUSAL, False)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    why = None
    if not causal:
        why = "non-causal (bidirectional or cross) attention"
    elif attention_mask is not None and not plain:
        why = "an attention mask that is not plainly causal (padding, packed sequences, a static cache)"
    elif dropout:
        why = "attention dropout"
    elif query.shape[-1] != value.shape[-1] or query.shape[-1] > MAX_HEAD_DIM:
        why = f"head dims other than query = value ≤ {MAX_HEAD_DIM}"
    if why is not None:
        return _fallback(why, module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap,
                         causal, kwargs)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
    out = attention(q, k, v, causal=True, scale=scaling, window=window, softcap=softcap or 0.0)
    return out, None


def _register_attention(modeling_utils):
    modeling_utils.AttentionInterface.register(ATTN_IMPLEMENTATION, _attention_forward)


def _register_mask(masking_utils):
    masking_utils.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask)


def _register():
    import transformers.masking_utils
    import transformers.modeling_utils

    _register_attention(transformers.modeling_utils)
    _register_mask(transformers.masking_utils)


# What registers "fastlm" with transformers, per module holding a registry: run right after the module executes.
_REGISTRIES = {"transformers.modeling_utils": _register_attention, "transformers.masking_utils": _register_mask}


def _supported_version(transformers):
    from packaging.version import InvalidVersion, Version

    low, high = SUPPORTED_TRANSFORMERS
    try:
        release = Version(Version(transformers.__version__).base_version)
    except (InvalidVersion, AttributeError, TypeError):
        return False
    return Version(low) <= release < Version(high)


def _registered_when_imported(name, module):
    """Register with the registry `module` (just executed, or found imported) holds; never fails the import."""
    try:
        if _supported_version(sys.modules.get("transformers")):
            _REGISTRIES[name](module)
    except Exception as e:  # noqa: BLE001 - a failed registration leaves "fastlm" unknown to transformers, no more
        import warnings

        warnings.warn(f"fastlm could not register its attention with {name} ({type(e).__name__}: {e}); "
                      f"attn_implementation={ATTN_IMPLEMENTATION!r} needs fastlm.patch(model) first", stacklevel=2)


class _LoaderThen(importlib.abc.Loader):
    """The module's own loader, then the registration. Puts the real loader back on the module before running it,
    so nothing after the import sees this wrapper."""

    def __init__(self, loader, name, finder):
        self._loader, self._name, self._finder = loader, name, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _registered_when_imported(self._name, module)
        self._finder.done(self._name)

    def __getattr__(self, name):  # the rest of the loader's interface (get_source, is_package, ...)
        if name in ("_loader", "_name", "_finder"):
            raise AttributeError(name)
        return getattr(self._loader, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """First on sys.meta_path while a registry module is still to be imported: for those module names only, it finds
    the spec with the finders after it and wraps its loader (`_LoaderThen`); it leaves once each has executed."""

    def __init__(self, pending):
        self.pending = set(pending)

    def find_spec(self, name, path=None, target=None):
        if name not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _LoaderThen(spec.loader, name, self)
        return spec

    def done(self, name):
        self.pending.discard(name)
        if not self.pending:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)


def register_with_transformers():
    """Make attn_implementation="fastlm" known to transformers without importing it (what `import fastlm` does): the
    registries already imported are registered with now, the others as soon as they are imported. Idempotent."""
    pending = []
    for name in _REGISTRIES:
        module = sys.modules.get(name)
        if module is not None:
            _registered_when_imported(name, module)
        else:
            pending.append(name)
    if pending and not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport(pending))


# ---------------------------------------------------------------------------------------------- causal-LM loss


def causal_lm_loss(hidden, lm_head, labels, softcap=None, num_items_in_batch=None, ignore_index=IGNORE_INDEX,
                   shift_labels=None, low_memory=False):
    """HF's ForCausalLMLoss on lm_head(hidden) without making the logits: hidden (B, S, H), labels (B, S),
    lm_head a torch.nn.Linear. Under autocast, hidden and the head are cast to the autocast dtype first, as
    autocast casts lm_head's inputs, and the fused op runs with autocast off. low_memory: as
    fastlm.linear_cross_entropy's."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    weight, bias = lm_head.weight, lm_head.bias
    device_type = h.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        dtype = torch.get_autocast_dtype(device_type)
        h, weight = h.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    reduction = "mean" if num_items_in_batch is None else "sum"
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        loss = linear_cross_entropy(h, weight, target, bias, ignore_index=ignore_index, reduction=reduction,
                                    softcap=softcap, low_memory=low_memory)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _uses_causal_lm_loss(model):
    """Whether model.loss_function is transformers' ForCausalLMLoss (what the fused loss reproduces)."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    if getattr(model, "_loss_function", None) is not None:
        return False
    return LOSS_MAPPING.get(getattr(model, "loss_type", None), ForCausalLMLoss) is ForCausalLMLoss


def _plainly_causal(arguments):
    """No padding, packing, cache or cross-attention input: every self-attention is plain causal (+ window)."""
    return all(arguments.get(name) is None for name in _NOT_PLAIN)


_NOT_PLAIN = ("attention_mask", "position_ids", "past_key_values", "encoder_hidden_states", "cu_seq_lens_q",
              "cu_seq_lens_k")


def _causal_lm_forward(self, *args, **kwargs):
    """The patched forward of a *ForCausalLM model (see the module docstring, point 3)."""
    record = self.__dict__[_RECORD]
    if len(args) > len(record.arg_names):
        return record.original(*args, **kwargs)  # let transformers say what is wrong
    arguments = dict(zip(record.arg_names, args), **kwargs)
    plain = {_PLAIN_CAUSAL: True} if _plainly_causal(arguments) else {}
    if not (self.training and arguments.get("labels") is not None):
        return record.original(*args, **kwargs, **plain)
    why = None
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    if not isinstance(logits_to_keep, int) or logits_to_keep != 0:
        why = "logits_to_keep"
    elif not _uses_causal_lm_loss(self):
        why = "a custom loss function"
    if why is not None:
        _say_once(f"fastlm.patch: training with {why} runs the model's own loss over materialized logits")
        return record.original(*args, **kwargs, **plain)

    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    labels = arguments.pop("labels")
    loss_args = {name: arguments[name] for name in ("num_items_in_batch", "shift_labels", "ignore_index")
                 if arguments.get(name) is not None}
    outputs = getattr(self, self.base_model_prefix)(**arguments, **plain, return_dict=True)
    hidden = outputs.last_hidden_state
    head = self.get_output_embeddings()
    softcap = getattr(self.config, record.final_softcap_attr) if record.final_softcap_attr else None
    logits = None
    same_dtype = head.weight.dtype == hidden.dtype and (head.bias is None or head.bias.dtype == hidden.dtype)
    if type(head) is torch.nn.Linear and (same_dtype or torch.is_autocast_enabled(hidden.device.type)):
        loss = causal_lm_loss(hidden, head, labels, softcap, **loss_args, low_memory=record.low_memory_loss)
    else:
        # An adapter-wrapped head, or mixed dtypes (HF's output is the promotion): HF's own computation.
        _say_once("fastlm.patch: an lm_head that is not a torch.nn.Linear in the hidden states' dtype; the loss "
                  "runs over materialized logits")
        logits = head(hidden)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **loss_args)
    output_cls = record.output_class
    rest = {name: value for name, value in outputs.items()
            if name in output_cls.__dataclass_fields__ and name != "last_hidden_state"}
    out = output_cls(loss=loss, logits=logits, **rest)
    return out if return_dict else out.to_tuple()


def _wrap_forward(model, spec, record):
    """Install the causal-LM forward on the model instance, as a bound method (so copy.deepcopy rebinds it to the
    copy) that shows the original's signature (Trainer and generate read it)."""
    import inspect
    import types

    from transformers import modeling_outputs

    original = model.forward
    record.original = original
    record.instance_forward = model.__dict__.get("forward")
    signature = inspect.signature(original)
    params = list(signature.parameters.values())
    record.arg_names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    record.final_softcap_attr = spec.final_softcap_attr
    record.output_class = getattr(modeling_outputs, spec.output_class)

    def forward(self, *args, **kwargs):
        return _causal_lm_forward(self, *args, **kwargs)

    forward.__signature__ = signature.replace(
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + params)
    forward.__doc__ = original.__doc__
    model.forward = types.MethodType(forward, model)


# ---------------------------------------------------------------------------------------------- patch / unpatch


@dataclass
class _Record:
    """What patch changed on one model, for unpatch."""

    classes: list = field(default_factory=list)  # (module, original class): norms, attention, MLP
    attn_implementation: str = None
    forward_wrapped: bool = False
    instance_forward: object = None  # model.__dict__["forward"] before patching, if there was one
    original: object = None  # the forward the wrapper calls: model.forward before patching
    arg_names: list = None  # its positional parameters, in order
    final_softcap_attr: str = None
    output_class: type = None
    low_memory_loss: bool = False  # patch's option: the fused loss with low_memory=True


def _check_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("fastlm.patch needs the transformers package (pip install transformers)") from e
    from packaging.version import Version

    low, high = SUPPORTED_TRANSFORMERS
    release = Version(Version(transformers.__version__).base_version)  # 5.17.0rc1, 5.17.0.dev0 count as 5.17.0
    if not Version(low) <= release < Version(high):
        raise RuntimeError(f"fastlm.patch supports transformers >= {low}, < {high} (the versions whose attention and "
                           f"mask dispatch it was checked against); this is transformers {transformers.__version__}")


def patch(model, *, low_memory_loss=False):
    """Run a Hugging Face transformers model on fastlm's kernels, in place; returns the model.

    Norms, attention and (for *ForCausalLM in training mode with labels) the loss are patched: see
    fastlm.integrations.hf. Raises ValueError for a model type not in SUPPORTED_MODEL_TYPES. Patching a patched
    model does nothing. low_memory_loss=True runs the fused loss as fastlm.linear_cross_entropy(...,
    low_memory=True): no fp32 accumulator for the head's weight gradient (V·H·4 bytes less at the peak), its
    logits made twice.
    """
    _check_transformers()
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"fastlm.patch takes a transformers PreTrainedModel, got {type(model).__name__}")
    if model.__dict__.get(_RECORD) is not None:
        return model
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"fastlm.patch supports the model types {', '.join(SUPPORTED_MODEL_TYPES)}; got "
                         f"{model_type!r} ({type(model).__name__})")
    spec = _MODEL_TYPES[model_type]
    _register()
    record = _Record(attn_implementation=model.config._attn_implementation, low_memory_loss=bool(low_memory_loss))
    try:
        swap = _class_swaps(model_type)
        for module in model.modules():
            patched = swap(module)
            if patched is not None:
                record.classes.append((module, type(module)))
                module.__class__ = patched
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(f"fastlm.patch: {type(model).__name__} did not accept attn_implementation="
                               f"{ATTN_IMPLEMENTATION!r} (transformers said why above)")
        causal_lm = getattr(_modeling_module(model_type), spec.causal_lm)
        if type(model).forward is causal_lm.forward:
            _wrap_forward(model, spec, record)
            record.forward_wrapped = True
    except BaseException:
        _undo(model, record)
        raise
    model.__dict__[_RECORD] = record
    return model


def _undo(model, record):
    for module, cls in record.classes:
        module.__class__ = cls
    model.config._attn_implementation = record.attn_implementation
    if record.forward_wrapped:
        if record.instance_forward is not None:
            model.forward = record.instance_forward
        else:
            del model.forward


def unpatch(model):
    """Undo fastlm.patch(model): norm classes, attention implementation and forward as they were; returns the
    model. Does nothing to a model that is not patched."""
    record = model.__dict__.pop(_RECORD, None)
    if record is not None:
        _undo(model, record)
    return model


register_with_transformers()
