"""`fastlm.patch(model)` / `fastlm.unpatch(model)`: run an already-built Hugging Face transformers model on fastlm's
kernels, in place, with the same numbers as before.

Supported: the model types in `SUPPORTED_MODEL_TYPES` (GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma 2), on the
transformers versions in `SUPPORTED_TRANSFORMERS` (the ones whose source this was written against and tested on).
transformers is imported by `patch`, never by `import fastlm`.

What `patch` changes, and nothing else (parameters, buffers and state_dict keys are untouched):

1. Norms. Each norm module of the model type's norm class is given a subclass of its own class (`__class__` swap)
   whose forward calls fastlm.layer_norm / fastlm.rms_norm with the module's weight and eps, reproducing the
   model's casting: GPT-2's torch.nn.LayerNorm becomes fastlm.nn.LayerNorm; Llama-style RMSNorms (eps in
   `variance_epsilon`) normalize in fp32, cast to the input dtype and scale by the weight, which is
   fastlm.rms_norm when weight and input share a dtype; Gemma 2's RMSNorm (eps in `eps`) scales by (1 + weight)
   in fp32 before one cast, which is fastlm.rms_norm(..., offset=1.0) for a weight in the input's dtype or fp32.
   Other dtype pairings (where HF's output dtype is the promotion of the two) run the original forward.

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

`patch` on a patched model is a no-op that returns it; `unpatch` puts back the recorded classes, attention
implementation and forward, after which outputs and state_dict are what they were (a no-op on a model that is not
patched). The record lives in the model's `__dict__` and the forward is a bound method, so copy.deepcopy of a
patched model gives a patched copy; pickling a whole patched module does not work (its norm classes are made at
patch time): pickle the state_dict, or unpatch first.

transformers 5.17 mechanics this relies on (paths under transformers/):
- modeling_utils.py `AttentionInterface` / `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`
  called from each model's Attention.forward (e.g. models/llama/modeling_llama.py `LlamaAttention.forward`;
  Gemma 2 passes sliding_window and softcap, Mistral/Qwen2/Qwen3 pass sliding_window, GPT-2 passes scaling).
- modeling_utils.py `set_attn_implementation` (validates against ALL_ATTENTION_FUNCTIONS.valid_keys()).
- masking_utils.py `_preprocess_mask_arguments`: an implementation missing from
  `ALL_MASK_ATTENTION_FUNCTIONS._global_mapping` gets *no mask at all* (padding silently ignored), hence the mask
  builder registered with `AttentionMaskInterface.register`. `create_causal_mask` /
  `create_sliding_window_causal_mask` call it with (batch_size, q_length, kv_length, q_offset, kv_offset,
  mask_function, attention_mask (2-D bool padding mask or None), allow_is_causal_skip, local_size, ...);
  allow_is_causal_skip is False when the pattern is not plain causal (packed sequences found from position_ids,
  or/and mask functions), and `sdpa_mask` builds the boolean mask otherwise.
- cache_utils.py `DynamicLayer` / `DynamicSlidingWindowLayer.get_mask_sizes`: kv_offset + kv_length equals
  q_offset + q_length, so their keys are aligned bottom-right; a static cache's are not (a mask is built).
- integrations/sdpa_attention.py `sdpa_attention_forward`, and each modeling file's `eager_attention_forward`
  (additive float mask, softcap), for the fallback.
- loss/loss_utils.py `ForCausalLMLoss` / `fixed_cross_entropy`: float32 logits, shift with pad, ignore_index,
  reduction "mean", or "sum" / num_items_in_batch.
- utils/generic.py `can_return_tuple` (return_dict), utils/output_capturing.py `capture_outputs` (the base model
  takes return_dict and output_* keywords).
"""

import contextlib
import sys
from dataclasses import dataclass, field

import torch

from fastlm import _backend
from fastlm import nn as fastlm_nn
from fastlm.ops.attention import MAX_HEAD_DIM, attention
from fastlm.ops.cross_entropy import linear_cross_entropy
from fastlm.ops.norm import rms_norm
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


def _patched_norm_class(cls, forward):
    """A subclass of cls with the fastlm forward: same parameters, state_dict keys and isinstance."""
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Fastlm{cls.__name__}", (cls,), {
            "forward": forward,
            "_fastlm_original_class": cls,
            "__module__": __name__,
            "__doc__": f"{cls.__name__} on fastlm's norm kernel (installed by fastlm.patch).",
        })
    return _SUBCLASSES[cls]


# ---------------------------------------------------------------------------------------------- the model types


@dataclass(frozen=True)
class _ModelType:
    causal_lm: str  # the *ForCausalLM class whose loss is fused
    norms: dict  # norm class name in the modeling module → forward; "torch.nn.LayerNorm" for torch's own
    final_softcap_attr: str = None  # the config attribute holding the final logit softcap
    output_class: str = "CausalLMOutputWithPast"  # what the causal LM's forward returns (transformers.modeling_outputs)


_MODEL_TYPES = {
    "gpt2": _ModelType("GPT2LMHeadModel", {"torch.nn.LayerNorm": None},
                       output_class="CausalLMOutputWithCrossAttentions"),
    "llama": _ModelType("LlamaForCausalLM", {"LlamaRMSNorm": _rms_norm_cast_forward}),
    "mistral": _ModelType("MistralForCausalLM", {"MistralRMSNorm": _rms_norm_cast_forward}),
    "qwen2": _ModelType("Qwen2ForCausalLM", {"Qwen2RMSNorm": _rms_norm_cast_forward}),
    "qwen3": _ModelType("Qwen3ForCausalLM", {"Qwen3RMSNorm": _rms_norm_cast_forward}),
    "gemma2": _ModelType("Gemma2ForCausalLM", {"Gemma2RMSNorm": _rms_norm_offset_forward},
                         final_softcap_attr="final_logit_softcapping"),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_MODEL_TYPES))


def _modeling_module(model_type):
    import importlib

    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _norm_swaps(model_type):
    """{original norm class: patched class} for the model type."""
    swaps = {}
    for name, forward in _MODEL_TYPES[model_type].norms.items():
        if name == "torch.nn.LayerNorm":
            swaps[torch.nn.LayerNorm] = fastlm_nn.LayerNorm
        else:
            cls = getattr(_modeling_module(model_type), name)
            swaps[cls] = _patched_norm_class(cls, forward)
    return swaps


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
    eager = sys.modules[type(module).__module__].eager_attention_forward
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


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask)


# ---------------------------------------------------------------------------------------------- causal-LM loss


def causal_lm_loss(hidden, lm_head, labels, softcap=None, num_items_in_batch=None, ignore_index=IGNORE_INDEX,
                   shift_labels=None):
    """HF's ForCausalLMLoss on lm_head(hidden) without making the logits: hidden (B, S, H), labels (B, S),
    lm_head a torch.nn.Linear. Under autocast, hidden and the head are cast to the autocast dtype first, as
    autocast casts lm_head's inputs, and the fused op runs with autocast off."""
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
                                    softcap=softcap)
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
        loss = causal_lm_loss(hidden, head, labels, softcap, **loss_args)
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

    norms: list = field(default_factory=list)  # (module, original class)
    attn_implementation: str = None
    forward_wrapped: bool = False
    instance_forward: object = None  # model.__dict__["forward"] before patching, if there was one
    original: object = None  # the forward the wrapper calls: model.forward before patching
    arg_names: list = None  # its positional parameters, in order
    final_softcap_attr: str = None
    output_class: type = None


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


def patch(model):
    """Run a Hugging Face transformers model on fastlm's kernels, in place; returns the model.

    Norms, attention and (for *ForCausalLM in training mode with labels) the loss are patched: see
    fastlm.integrations.hf. Raises ValueError for a model type not in SUPPORTED_MODEL_TYPES. Patching a patched
    model does nothing.
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
    record = _Record(attn_implementation=model.config._attn_implementation)
    try:
        swaps = _norm_swaps(model_type)
        for module in model.modules():
            patched = swaps.get(type(module))
            if patched is not None:
                record.norms.append((module, type(module)))
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
    for module, cls in record.norms:
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
