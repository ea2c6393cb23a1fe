"""fastlm.patch / fastlm.unpatch on Hugging Face transformers models.

Tiny random-config models of every supported type (built from config objects; nothing is downloaded). The
tolerance rule of DESIGN.md, model-wide: the reference is the unpatched model in float64 with its fp32 islands
(RMSNorm, the eager softmax) upcast too; PyTorch's own is the unpatched model in float32; the patched model, in
float32, passes when its error is at most twice PyTorch's plus one ulp — for logits (eval), the loss and every
parameter gradient (train), and for 20 AdamW steps of training. The Triton kernels run (through the interpreter
on CPU) for some model types, the default backend for the others.
"""

import copy
import subprocess
import sys
import types
import warnings

import pytest
import torch

import fastlm
from conftest import DEVICE, HAS_GPU, assert_by_rule
from fastlm.integrations import hf

transformers = pytest.importorskip("transformers")
from transformers import masking_utils  # noqa: E402

VOCAB = 128
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
WINDOW = 5  # sliding window of Mistral, Qwen2's top layer and Gemma 2's even layers: shorter than the sequences


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The models are tiny: one intra-op thread is faster, and immune to a busy machine's spinning OpenMP threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(model_type, **overrides):
    """The tiny config of each type: GQA everywhere but GPT-2; sliding windows shorter than the sequences; Gemma 2
    with both softcaps small enough to bite."""
    t = transformers
    common = {**COMMON, **overrides}
    if model_type == "gpt2":
        return t.GPT2LMHeadModel, t.GPT2Config(
            n_embd=common["hidden_size"], n_layer=common["num_hidden_layers"], n_head=common["num_attention_heads"],
            vocab_size=VOCAB, n_positions=common["max_position_embeddings"], attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
            bos_token_id=1, eos_token_id=2)
    if model_type == "llama":
        return t.LlamaForCausalLM, t.LlamaConfig(**common)
    if model_type == "mistral":
        return t.MistralForCausalLM, t.MistralConfig(**common, sliding_window=WINDOW)
    if model_type == "qwen2":
        return t.Qwen2ForCausalLM, t.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW,
                                                 max_window_layers=common["num_hidden_layers"] - 1)
    if model_type == "qwen3":
        return t.Qwen3ForCausalLM, t.Qwen3Config(**common, head_dim=16)
    if model_type == "gemma2":
        return t.Gemma2ForCausalLM, t.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16,
                                                   sliding_window=WINDOW, final_logit_softcapping=3.0,
                                                   attn_logit_softcapping=2.0)
    raise AssertionError(model_type)


def _model(model_type, attn="eager", seed=0, **overrides):
    """A float32 model of the type with every parameter moved off its initial value (norm weights away from 1 or
    0, biases away from 0), in train mode."""
    cls, config = _config(model_type, **overrides)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.to(DEVICE).train()


def _tokens(batch, seq, seed=0):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


# ---------------------------------------------------------------------------------------------- the float64 reference


def _exact_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """Eager attention with the softmax in the input dtype (transformers' casts it to float32)."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    return (probs @ value).transpose(1, 2).contiguous(), probs


transformers.AttentionInterface.register("float64_reference", _exact_attention)
masking_utils.AttentionMaskInterface.register("float64_reference", masking_utils.eager_mask)


def _rms_norm_float64(self, x):
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y * ((1.0 + self.weight) if type(self).__name__ == "Gemma2RMSNorm" else self.weight)


def _float64_reference(model):
    """The unpatched model in float64, its float32 islands (RMSNorm's upcast, the eager softmax) in float64 too."""
    ref = copy.deepcopy(model).double()
    for module in ref.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_norm_float64, module)
    ref.set_attn_implementation("float64_reference")
    return ref


def _eval_logits(model, x, **kwargs):
    model.eval()
    with torch.no_grad():
        return model(x, **kwargs).logits


def _train_step(model, x):
    """Loss and parameter gradients of one training forward and backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(x, labels=x).loss
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _assert_patched_like_unpatched(model_type, backend, seq=16):
    base = _model(model_type)
    ref = _float64_reference(base)
    patched = fastlm.patch(copy.deepcopy(base))
    x = _tokens(2, seq)
    ref_logits, base_logits = _eval_logits(ref, x), _eval_logits(base, x)
    (ref_loss, ref_grads), (base_loss, base_grads) = _train_step(ref, x), _train_step(base, x)
    with fastlm.use_backend(backend):
        logits = _eval_logits(patched, x)
        loss, grads = _train_step(patched, x)
    assert_by_rule(f"{model_type} logits", logits, ref_logits, base_logits)
    assert_by_rule(f"{model_type} loss", loss, ref_loss, base_loss)
    assert grads.keys() == base_grads.keys()
    for name in grads:
        assert_by_rule(f"{model_type} d{name}", grads[name], ref_grads[name], base_grads[name])


# ---------------------------------------------------------------------------------------------- tests


def _skip_without_triton(backend):
    if backend == "triton" and not (HAS_GPU or fastlm.kernels._common.interpreting()):
        pytest.skip("triton backend needs a GPU or TRITON_INTERPRET=1")


def test_import_fastlm_does_not_import_transformers():
    code = "import sys, fastlm; fastlm.patch; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("model_type,backend", [
    ("gpt2", "triton"), ("llama", "triton"), ("gemma2", "triton"),
    ("mistral", "auto"), ("qwen2", "auto"), ("qwen3", "auto"),
])
def test_patched_matches_unpatched(model_type, backend):
    _skip_without_triton(backend)
    _assert_patched_like_unpatched(model_type, backend)


def test_patch_replaces_what_it_says():
    model = fastlm.patch(_model("qwen3"))
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    # 2 per layer, q_norm and k_norm per layer, the final norm: all swapped, none left behind
    assert len(norms) == 4 * COMMON["num_hidden_layers"] + 1
    assert all(type(m).__name__ == "FastlmQwen3RMSNorm" for m in norms)
    assert all(isinstance(m, transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm) for m in norms)
    assert model.config._attn_implementation == "fastlm"
    model = fastlm.patch(_model("gpt2"))
    assert {type(m) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {fastlm.nn.LayerNorm}


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_training_curve(model_type):
    """20 AdamW steps over a fixed set of batches: the patched model's loss curve is the unpatched one's."""
    base = _model(model_type, num_hidden_layers=1)
    models = {"ref": _float64_reference(base), "base": base, "patched": fastlm.patch(copy.deepcopy(base))}
    batches = [_tokens(2, 12, seed=s) for s in range(4)]
    curves = {}
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        model.train()
        losses = []
        for step in range(20):
            x = batches[step % len(batches)]
            loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        curves[name] = torch.stack(losses)
    assert curves["patched"][-1] < curves["patched"][0]  # it trains
    assert_by_rule(f"{model_type} loss curve", curves["patched"], curves["ref"], curves["base"])


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_unpatch_restores_exactly(model_type):
    model = _model(model_type, attn="sdpa")  # transformers' default
    x = _tokens(2, 16)
    logits, (loss, grads) = _eval_logits(model, x), _train_step(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    attn = model.config._attn_implementation

    assert fastlm.patch(model) is model
    assert model.state_dict().keys() == state.keys()  # patching renames and adds nothing
    _eval_logits(model, x)
    _train_step(model, x)  # running the patched model leaves nothing behind either
    assert fastlm.unpatch(model) is model

    assert [type(m) for m in model.modules()] == classes
    assert model.config._attn_implementation == attn
    assert "forward" not in model.__dict__
    assert torch.equal(_eval_logits(model, x), logits)
    loss2, grads2 = _train_step(model, x)
    assert torch.equal(loss2, loss) and all(torch.equal(grads2[k], grads[k]) for k in grads)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_patch_twice_is_a_no_op_and_unpatch_of_unpatched_too():
    model = _model("llama")
    x = _tokens(2, 8)
    fastlm.patch(model)
    forward, classes = model.forward, [type(m) for m in model.modules()]
    assert fastlm.patch(model) is model
    assert model.forward == forward and [type(m) for m in model.modules()] == classes
    fastlm.unpatch(model)
    logits = _eval_logits(model, x)
    assert fastlm.unpatch(model) is model
    assert torch.equal(_eval_logits(model, x), logits)
    assert model.config._attn_implementation == "eager"


def test_refuses_unsupported_models():
    t = transformers
    bert = t.BertModel(t.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, vocab_size=64))
    opt = t.OPTForCausalLM(t.OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                                       vocab_size=64, word_embed_proj_dim=32))
    for model, model_type in ((bert, "bert"), (opt, "opt")):
        with pytest.raises(ValueError, match=f"supports the model types gemma2, gpt2, llama, mistral, qwen2, qwen3; "
                                             f"got '{model_type}'"):
            fastlm.patch(model)
        assert "_fastlm_patch" not in model.__dict__
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fastlm.patch(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("version", ["4.57.1", "5.16.0", "5.18.0", "6.0.0"])
def test_refuses_unverified_transformers_versions(monkeypatch, version):
    model = _model("llama")
    # Building a model can swap the `transformers` entry of sys.modules for a fresh lazy module: patch that one.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    with pytest.raises(RuntimeError, match=f"transformers >= 5.17, < 5.18 .* this is transformers {version}"):
        fastlm.patch(model)
    assert "_fastlm_patch" not in model.__dict__


def test_sliding_window_is_hf_window():
    """HF's sliding-window causal mask is fastlm's window (sliding_window − 1, 0), aligned bottom-right — with
    no cache, and for queries at the end of a sliding-window cache (kv_offset > 0)."""
    for q_length, kv_length, q_offset, kv_offset in ((12, 12, 0, 0), (3, WINDOW - 1 + 3, 9, 9 - WINDOW + 1)):
        hf_mask = masking_utils.sdpa_mask(
            batch_size=1, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=masking_utils.sliding_window_causal_mask_function(WINDOW), allow_is_causal_skip=False)
        visible = fastlm.reference.attention_visible(q_length, kv_length, WINDOW - 1, 0, "cpu")
        assert torch.equal(hf_mask[0, 0], visible)
        assert not visible.all(-1).any()  # the window does cut


def _attention_calls(monkeypatch):
    calls = []
    kernel = hf.attention

    def spy(q, k, v, **kwargs):
        calls.append((q.shape[1], k.shape[1], kwargs["window"], kwargs["softcap"]))
        return kernel(q, k, v, **kwargs)

    monkeypatch.setattr(hf, "attention", spy)
    return calls


def test_kernel_arguments(monkeypatch):
    """Gemma 2: the sliding layer gets window (WINDOW − 1, 0), the global one none; both the attention softcap."""
    calls = _attention_calls(monkeypatch)
    model = fastlm.patch(_model("gemma2"))
    _eval_logits(model, _tokens(2, 16))
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert calls == [(16, 16, (WINDOW - 1, 0), 2.0), (16, 16, (-1, -1), 2.0)]


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_padding_falls_back_to_transformers(monkeypatch, model_type):
    """A padded batch runs transformers' own attention (sdpa; eager for Gemma 2's softcap), with one warning, and
    gives the unpatched logits (by the rule, on the positions that are not padding)."""
    calls = _attention_calls(monkeypatch)
    base = _model(model_type)
    ref, patched = _float64_reference(base), fastlm.patch(copy.deepcopy(base))
    x = _tokens(2, 12)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    hf._said.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref_logits, base_logits, logits = (_eval_logits(m, x, attention_mask=mask) for m in (ref, base, patched))
    assert calls == []
    said = [str(w.message) for w in caught if "fastlm.patch" in str(w.message)]
    assert len(said) == 1 and "not plainly causal" in said[0]
    assert ("eager" if model_type == "gemma2" else "sdpa") in said[0]
    kept = lambda t: torch.cat([t[0, 4:], t[1]])  # noqa: E731
    assert_by_rule(f"{model_type} padded logits", kept(logits), kept(ref_logits), kept(base_logits))
    # an all-ones mask is no padding: the kernel runs
    _eval_logits(patched, x, attention_mask=torch.ones_like(x))
    assert len(calls) == COMMON["num_hidden_layers"]


def test_packed_sequences_fall_back(monkeypatch):
    """Two sequences packed in one row (position_ids restarting, no attention_mask, as transformers'
    DataCollatorWithFlattening gives; without a cache, which transformers needs to see the packing): each attends
    only to itself, through transformers' attention."""
    calls = _attention_calls(monkeypatch)
    base = _model("qwen2")
    ref, patched = _float64_reference(base), fastlm.patch(copy.deepcopy(base))
    x = _tokens(1, 12)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None].to(DEVICE)
    ref_logits, base_logits = (_eval_logits(m, x, position_ids=positions, use_cache=False) for m in (ref, base))
    hf._said.clear()
    with pytest.warns(UserWarning, match="not plainly causal"):
        logits = _eval_logits(patched, x, position_ids=positions, use_cache=False)
    assert calls == []
    assert_by_rule("packed logits", logits, ref_logits, base_logits)
    # the second sequence alone gives the same logits: the packing was honoured
    alone = _eval_logits(base, x[:, 7:], use_cache=False)
    torch.testing.assert_close(logits[:, 7:], alone, rtol=0, atol=1e-5)


def test_attention_dropout_falls_back(monkeypatch):
    calls = _attention_calls(monkeypatch)
    model = fastlm.patch(_model("llama", attention_dropout=0.5))
    hf._said.clear()
    with pytest.warns(UserWarning, match="attention dropout is not covered"):
        model(_tokens(2, 8), labels=_tokens(2, 8))
    assert calls == []
    model.eval()
    _eval_logits(model, _tokens(2, 8))  # no dropout in eval: the kernel
    assert len(calls) == COMMON["num_hidden_layers"]


def _decode_logits(model, x, prompt):
    """Prefill x[:, :prompt], then feed the rest one token at a time through the KV cache: every step's logits."""
    model.eval()
    with torch.no_grad():
        out = model(x[:, :prompt], use_cache=True)
        logits = [out.logits[:, -1]]
        for i in range(prompt, x.shape[1]):
            out = model(x[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("model_type,backend,layers", [("mistral", "auto", 2), ("gemma2", "auto", 2),
                                                      ("gemma2", "triton", 1)])
def test_kv_cache_decoding(monkeypatch, model_type, backend, layers):
    """Decoding through the KV cache past the sliding window (the cache's keys aligned bottom-right): every step
    by the rule, on the kernel; and greedy generate gives the unpatched tokens. (One layer under the Triton
    interpreter: Gemma 2's sliding one.)"""
    _skip_without_triton(backend)
    calls = _attention_calls(monkeypatch)
    base = _model(model_type, num_hidden_layers=layers)
    ref, patched = _float64_reference(base), fastlm.patch(copy.deepcopy(base))
    x, prompt = _tokens(2, 15 if backend == "auto" else 10), 7
    ref_logits, base_logits = (_decode_logits(m, x, prompt) for m in (ref, base))
    with fastlm.use_backend(backend):
        logits = _decode_logits(patched, x, prompt)
    assert_by_rule(f"{model_type} decoding logits", logits, ref_logits, base_logits)
    assert len(calls) == (1 + x.shape[1] - prompt) * layers
    # the last step: one query over the sliding layer's window (WINDOW - 1 cached keys + itself), or over all keys
    assert calls[-layers][:3] == (1, WINDOW, (WINDOW - 1, 0))
    assert calls[-1][:2] in ((1, WINDOW), (1, x.shape[1]))
    if backend == "auto":
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert torch.equal(patched.generate(x[:, :prompt], **kw), base.generate(x[:, :prompt], **kw))


def test_loss_matches_hf_options():
    """ignore_index labels, num_items_in_batch (sum / count), shift_labels, return_dict=False: HF's loss by the
    rule, with logits None."""
    base = _model("gemma2", num_hidden_layers=1)
    ref, patched = _float64_reference(base), fastlm.patch(copy.deepcopy(base))
    x = _tokens(2, 10)
    labels = x.clone()
    labels[0, :3] = -100
    shift = torch.roll(x, -1, dims=1)
    shift[:, -1] = -100
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(7)}, {"shift_labels": shift}):
        ref_loss, base_loss = (m(x, labels=labels, **kwargs).loss for m in (ref, base))
        out = patched(x, labels=labels, **kwargs)
        assert out.logits is None
        assert_by_rule(f"loss {list(kwargs)}", out.loss, ref_loss, base_loss)
    as_tuple = patched(x, labels=labels, return_dict=False)
    assert_by_rule("loss return_dict=False", as_tuple[0], ref(x, labels=labels).loss, base(x, labels=labels).loss)
    assert not any(isinstance(t, torch.Tensor) and t.shape[-1:] == (VOCAB,) for t in as_tuple)


def test_autocast_loss():
    """Under autocast the head runs in the autocast dtype, as it does unpatched: loss and gradients by the rule."""
    base = _model("llama", num_hidden_layers=1)
    ref = _float64_reference(base)
    patched = fastlm.patch(copy.deepcopy(base))
    x = _tokens(2, 12)
    ref_loss, ref_grads = _train_step(ref, x)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        base_loss, base_grads = _train_step(base, x)
        loss, grads = _train_step(patched, x)
    assert_by_rule("autocast loss", loss, ref_loss, base_loss)
    for name in ("lm_head.weight", "model.norm.weight"):
        assert_by_rule(f"autocast d{name}", grads[name], ref_grads[name], base_grads[name])


def test_torch_compile_fullgraph_no_graph_breaks():
    """torch.compile(fullgraph=True) traces a patched Gemma 2 training step in one graph (a graph break would
    raise) that calls fastlm's registered ops — the attention kernel included — and gives the eager loss."""
    backend = "triton" if (HAS_GPU or fastlm.kernels._common.interpreting()) else "auto"
    model = fastlm.patch(_model("gemma2", num_hidden_layers=1))
    x = _tokens(2, 8)
    graphs = []

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    with fastlm.use_backend(backend):
        eager_loss, eager_grads = _train_step(model, x)
        compiled = torch.compile(model, fullgraph=True, backend=counting_aot_eager)
        model.zero_grad(set_to_none=True)
        loss = compiled(x, labels=x).loss
        loss.backward()
    assert len(graphs) == 1
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-4, atol=1e-6)
    if backend == "triton":
        ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
        for op in ("fastlm.attention_fwd", "fastlm.norm_fwd", "fastlm.linear_cross_entropy_fwd"):
            assert any(name.startswith(op) for name in ops), (op, ops)


# ---------------------------------------------------------------------------------------------- GPU


def _assert_loss_by_rule(name, loss, ref_loss, base_loss, model_dtype):
    """The loss is float32 but a bf16 model computes it from bf16 logits: its rounding step is bf16's. (A mean
    over many tokens, its error is a sum of cancelling terms; compared at float32 steps the unpatched model's
    error is as often tiny by luck as not.)"""
    assert_by_rule(name, loss.to(model_dtype), ref_loss, base_loss.to(model_dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_gpu_bf16_auto_backend(model_type):
    """bf16 at a larger size on the GPU, the auto backend (the CUDA / Triton kernels): logits, loss and
    gradients by the rule against the unpatched model in bf16, the reference in float64 (factor 3 for the
    gradients, which all but the head's flow through attention's dQ, dK, dV)."""
    base = _model(model_type, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=512).to(torch.bfloat16)
    ref, patched = _float64_reference(base), fastlm.patch(copy.deepcopy(base))
    x = _tokens(4, 256)
    ref_logits, base_logits, logits = (_eval_logits(m, x) for m in (ref, base, patched))
    assert_by_rule(f"{model_type} bf16 logits", logits, ref_logits, base_logits)
    (ref_loss, ref_grads), (base_loss, base_grads), (loss, grads) = (_train_step(m, x) for m in (ref, base, patched))
    _assert_loss_by_rule(f"{model_type} bf16 loss", loss, ref_loss, base_loss, torch.bfloat16)
    for name in grads:
        assert_by_rule(f"{model_type} bf16 d{name}", grads[name], ref_grads[name], base_grads[name], factor=3.0)


@pytest.mark.gpu
def test_gpu_inductor_compile():
    """torch.compile with inductor, fullgraph, on the GPU: a bf16 Gemma 2 training step, loss and gradients by
    the rule (the reference in float64, PyTorch's the unpatched model in bf16, eager)."""
    base = _model("gemma2", hidden_size=256, intermediate_size=512, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=512).to(torch.bfloat16)
    ref, patched = _float64_reference(base), fastlm.patch(copy.deepcopy(base))
    x = _tokens(4, 256)
    (ref_loss, ref_grads), (base_loss, base_grads) = _train_step(ref, x), _train_step(base, x)
    torch._dynamo.reset()
    compiled = torch.compile(patched, fullgraph=True)
    loss = compiled(x, labels=x).loss
    loss.backward()
    _assert_loss_by_rule("compiled bf16 loss", loss.detach(), ref_loss, base_loss, torch.bfloat16)
    for name, p in patched.named_parameters():
        assert_by_rule(f"compiled bf16 d{name}", p.grad, ref_grads[name], base_grads[name], factor=3.0)
