"""fastlm.patch / fastlm.unpatch on Hugging Face transformers models.

Tiny random-config models of every supported type (built from config objects; nothing is downloaded). The
tolerance rule of DESIGN.md, model-wide: the reference is the unpatched model in float64 with its fp32 islands
(RMSNorm, the eager softmax) upcast too; PyTorch's own is the unpatched model in float32; the patched model, in
float32, passes when its error is at most twice PyTorch's plus one ulp — for logits (eval), the loss and every
parameter gradient (train), and for 20 AdamW steps of training. The Triton kernels run (through the interpreter
on CPU) for some model types, the default backend for the others.
"""

import copy
import importlib
import subprocess
import sys
import types
import warnings

import pytest
import torch

import fastlm
from conftest import DEVICE, HAS_GPU, assert_by_rule, generator, seeded, simulated_runs
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
    torch.manual_seed(seeded(seed))
    model = cls(config)
    g = generator(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.to(DEVICE).train()


def _tokens(batch, seq, seed=0):
    # Offsets from 100: the models' draws take 0 and 1 (`_model`), FASTLM_TEST_SEED shifts both (conftest.seeded).
    return torch.randint(3, VOCAB, (batch, seq), generator=generator(100 + seed)).to(DEVICE)


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


def _assert_patched_like_unpatched(model_type, backend, seq=16, **patch_kw):
    base = _model(model_type)
    ref = _float64_reference(base)
    patched = fastlm.patch(copy.deepcopy(base), **patch_kw)
    x = _tokens(2, seq)
    ref_logits, (ref_loss, ref_grads) = _eval_logits(ref, x), _train_step(ref, x)

    def unpatched():
        return _eval_logits(base, x), _train_step(base, x)

    # PyTorch's error: the unpatched model as run, and under simulated rounding (conftest.simulated_runs).
    (base_logits, (base_loss, base_grads)), sims = unpatched(), simulated_runs(unpatched)
    with fastlm.use_backend(backend):
        logits = _eval_logits(patched, x)
        loss, grads = _train_step(patched, x)
    assert_by_rule(f"{model_type} logits", logits, ref_logits, base_logits, samples=[s[0] for s in sims])
    assert_by_rule(f"{model_type} loss", loss, ref_loss, base_loss, samples=[s[1][0] for s in sims])
    assert grads.keys() == base_grads.keys()
    for name in grads:
        assert_by_rule(f"{model_type} d{name}", grads[name], ref_grads[name], base_grads[name],
                       samples=[s[1][1][name] for s in sims])


# ---------------------------------------------------------------------------------------------- tests


def _skip_without_triton(backend):
    if backend == "triton" and not (HAS_GPU or fastlm._util.interpreting()):
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


def test_patch_with_low_memory_loss(monkeypatch):
    """fastlm.patch(model, low_memory_loss=True): the fused loss runs its low-memory path (the lm_head's weight
    gradient in vocabulary blocks), and the model still matches the unpatched one by the rule."""
    _skip_without_triton("triton")
    lce = importlib.import_module("fastlm.ops.linear_cross_entropy")
    calls = []
    real = lce._dweight_pass

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(lce, "_dweight_pass", spy)
    _assert_patched_like_unpatched("llama", "triton", low_memory_loss=True)
    assert calls == [(VOCAB, calls[0][1])], calls  # once: the one training step's loss


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
    """20 AdamW steps over a fixed set of batches: the patched model's loss curve is the unpatched one's. Rounding
    errors grow along a training run, so each curve's error is one draw of a wide spread: PyTorch's side of the rule
    samples it (the unpatched run under simulated rounding, conftest.simulated_runs)."""
    base = _model(model_type, num_hidden_layers=1)
    batches = [_tokens(2, 12, seed=s) for s in range(4)]

    def curve(model):
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
        return torch.stack(losses)

    sims = simulated_runs(lambda: curve(copy.deepcopy(base)))
    curves = {name: curve(model) for name, model in (("ref", _float64_reference(base)),
                                                     ("patched", fastlm.patch(copy.deepcopy(base))), ("base", base))}
    assert curves["patched"][-1] < curves["patched"][0]  # it trains
    assert_by_rule(f"{model_type} loss curve", curves["patched"], curves["ref"], curves["base"], samples=sims)


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
    fastlm._backend._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref_logits, base_logits, logits = (_eval_logits(m, x, attention_mask=mask) for m in (ref, base, patched))
        sims = simulated_runs(lambda: _eval_logits(base, x, attention_mask=mask))
    assert calls == []
    said = [str(w.message) for w in caught if "fastlm.patch" in str(w.message)]
    assert len(said) == 1 and "not plainly causal" in said[0]
    assert ("eager" if model_type == "gemma2" else "sdpa") in said[0]
    kept = lambda t: torch.cat([t[0, 4:], t[1]])  # noqa: E731
    assert_by_rule(f"{model_type} padded logits", kept(logits), kept(ref_logits), kept(base_logits),
                   samples=[kept(s) for s in sims])
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
    sims = simulated_runs(lambda: _eval_logits(base, x, position_ids=positions, use_cache=False))
    fastlm._backend._warned.clear()
    with pytest.warns(UserWarning, match="not plainly causal"):
        logits = _eval_logits(patched, x, position_ids=positions, use_cache=False)
    assert calls == []
    assert_by_rule("packed logits", logits, ref_logits, base_logits, samples=sims)
    # the second sequence alone gives the same logits: the packing was honoured
    alone = _eval_logits(base, x[:, 7:], use_cache=False)
    torch.testing.assert_close(logits[:, 7:], alone, rtol=0, atol=1e-5)


def test_attention_dropout_falls_back(monkeypatch):
    calls = _attention_calls(monkeypatch)
    model = fastlm.patch(_model("llama", attention_dropout=0.5))
    fastlm._backend._warned.clear()
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
    sims = simulated_runs(lambda: _decode_logits(base, x, prompt))
    with fastlm.use_backend(backend):
        logits = _decode_logits(patched, x, prompt)
    assert_by_rule(f"{model_type} decoding logits", logits, ref_logits, base_logits, samples=sims)
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
        sims = simulated_runs(lambda: base(x, labels=labels, **kwargs).loss.detach())
        out = patched(x, labels=labels, **kwargs)
        assert out.logits is None
        assert_by_rule(f"loss {list(kwargs)}", out.loss, ref_loss, base_loss, samples=sims)
    as_tuple = patched(x, labels=labels, return_dict=False)
    sims = simulated_runs(lambda: base(x, labels=labels).loss.detach())
    assert_by_rule("loss return_dict=False", as_tuple[0], ref(x, labels=labels).loss, base(x, labels=labels).loss,
                   samples=sims)
    assert not any(isinstance(t, torch.Tensor) and t.shape[-1:] == (VOCAB,) for t in as_tuple)


def test_autocast_loss():
    """Under autocast the head runs in the autocast dtype, as it does unpatched: loss and gradients by the rule."""
    base = _model("llama", num_hidden_layers=1)
    ref = _float64_reference(base)
    patched = fastlm.patch(copy.deepcopy(base))
    x = _tokens(2, 12)
    ref_loss, ref_grads = _train_step(ref, x)

    def baseline():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return _train_step(base, x)

    (base_loss, base_grads), sims = baseline(), simulated_runs(baseline)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss, grads = _train_step(patched, x)
    assert_by_rule("autocast loss", loss, ref_loss, base_loss, samples=[s[0] for s in sims])
    for name in ("lm_head.weight", "model.norm.weight"):
        assert_by_rule(f"autocast d{name}", grads[name], ref_grads[name], base_grads[name],
                       samples=[s[1][name] for s in sims])


def test_torch_compile_fullgraph_no_graph_breaks():
    """torch.compile(fullgraph=True) traces a patched Gemma 2 training step in one graph (a graph break would
    raise) that calls fastlm's registered ops — the attention kernel included — and gives the eager loss."""
    backend = "triton" if (HAS_GPU or fastlm._util.interpreting()) else "auto"
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
    """bf16 at a larger size on the GPU, the auto backend (whatever it routes to on this GPU: fastlm's kernels,
    or SDPA and torch's norms where a measured table says so, as on an H200): logits, loss and
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


# ---------------------------------------------------------------------------------------------- rotary embedding and
# gated MLP on fastlm (issue 14)

ROTARY_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma2"]  # every supported type but GPT-2 (learned positions)


def _op_calls(monkeypatch):
    """Calls of fastlm.rotary_embedding, swiglu and geglu made by patched models (hf's names, spied):
    [(op name, kwargs)]."""
    calls = []

    def spy(name, op):
        def counted(*args, **kwargs):
            calls.append((name, kwargs))
            return op(*args, **kwargs)
        return counted

    for name in ("rotary_embedding", "swiglu", "geglu"):
        monkeypatch.setattr(hf, name, spy(name, getattr(hf, name)))
    return calls


def _count(calls, name):
    return sum(1 for n, _ in calls if n == name)


@pytest.mark.parametrize("model_type", ["gpt2"] + ROTARY_TYPES)
def test_patch_runs_rotary_and_gated_mlp_on_fastlm(monkeypatch, model_type):
    """Each patched layer rotates q and k with fastlm.rotary_embedding and gates its MLP with fastlm.swiglu (Gemma
    2: fastlm.geglu, tanh): the attention and MLP classes are swapped like the norms. transformers' modeling module
    is left alone, so an unpatched model of the same type beside it calls none of them. GPT-2 keeps its MLP."""
    import importlib

    calls = _op_calls(monkeypatch)
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    rope_before = getattr(modeling, "apply_rotary_pos_emb", None)
    base = _model(model_type)
    patched = fastlm.patch(copy.deepcopy(base))
    x = _tokens(2, 16)
    _eval_logits(base, x)
    assert calls == []  # the unpatched twin: transformers' own code
    _eval_logits(patched, x)
    layers = COMMON["num_hidden_layers"]
    if model_type == "gpt2":
        assert calls == []
        return
    assert _count(calls, "rotary_embedding") == 2 * layers  # q and k
    gated = "geglu" if model_type == "gemma2" else "swiglu"
    assert _count(calls, gated) == layers and len(calls) == 3 * layers
    if model_type == "gemma2":
        assert all(kw == {"approximate": "tanh"} for n, kw in calls if n == "geglu")
    assert getattr(modeling, "apply_rotary_pos_emb") is rope_before
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma2"}
    for kind in ("Attention", "MLP"):
        cls = getattr(modeling, prefix[model_type] + kind)
        swapped = [m for m in patched.modules() if isinstance(m, cls)]
        assert len(swapped) == layers and all(type(m).__name__ == f"Fastlm{cls.__name__}" for m in swapped)
    # training: the same calls in the forward, autograd through them
    calls.clear()
    loss, grads = _train_step(patched, x)
    assert _count(calls, "rotary_embedding") == 2 * layers and _count(calls, gated) == layers
    assert all(torch.isfinite(g).all() for g in grads.values())
    fastlm.unpatch(patched)
    assert [type(m) for m in patched.modules()] == [type(m) for m in base.modules()]


def _patched_rope(model_type="llama"):
    """The apply_rotary_pos_emb a patched model's attention calls, and transformers' own."""
    model = fastlm.patch(_model(model_type, num_hidden_layers=1))
    attn = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    modeling = sys.modules[type(attn).__mro__[1].__module__]
    return type(attn).forward.__globals__["apply_rotary_pos_emb"], modeling.apply_rotary_pos_emb


# (q/k dtype, table dtype, q/k layout, unsqueeze_dim, table batch): what transformers' attention passes (the
# transposed projection, tables in the hidden states' dtype), autocast's bf16 q beside float32 tables (HF's result is
# float32), a contiguous (B, H, S, D) q, the (B, S, H, D) layout with unsqueeze_dim=2 and one table for the batch,
# float16 q beside bfloat16 tables (promoted to float32), float64.
ROPE_CASES = [
    (torch.float32, torch.float32, "projection", 1, 2),
    (torch.bfloat16, torch.float32, "projection", 1, 2),
    (torch.bfloat16, torch.bfloat16, "contiguous", 1, 2),
    (torch.float32, torch.float32, "bshd", 2, 1),
    (torch.float16, torch.bfloat16, "projection", -3, 2),
    (torch.float64, torch.float64, "projection", 1, 2),
]


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype,table_dtype,layout,unsqueeze_dim,table_batch", ROPE_CASES,
                         ids=lambda v: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else str(v))
def test_patched_rotary_is_hf_apply_rotary_pos_emb(backend, dtype, table_dtype, layout, unsqueeze_dim, table_batch):
    """The patched apply_rotary_pos_emb against transformers' own: its result dtype (HF's type promotion of q and
    the tables), its strides where q is the projection's transposed view (so attention reads it in place), and its
    values by the rule (transformers' function in float64 the reference, in the tested dtypes PyTorch's own)."""
    from conftest import simulated_runs

    _skip_without_triton(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 runs on the torch backend only")
    if backend == "triton" and not HAS_GPU and torch.bfloat16 in (dtype, table_dtype):
        pytest.skip("bf16 under the Triton interpreter is not tested (tests/test_rotary.py's CPU dtypes)")
    ours, theirs = _patched_rope()
    batch, seq, heads, kv_heads, head_dim = 2, 7, 4, 2, 16
    g = generator(7)

    def qk(h):
        t = torch.randn(batch, seq, h, head_dim, generator=g).to(DEVICE, dtype)
        if layout == "projection":
            return t.transpose(1, 2)
        return t.transpose(1, 2).contiguous() if layout == "contiguous" else t

    q, k = qk(heads), qk(kv_heads)
    angles = torch.rand(table_batch, seq, head_dim // 2, generator=g, dtype=torch.float64) * 6.0
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = (t.to(DEVICE, table_dtype) for t in (angles.cos(), angles.sin()))
    ref = theirs(q.double(), k.double(), cos.double(), sin.double(), unsqueeze_dim)
    base = theirs(q, k, cos, sin, unsqueeze_dim)
    sims = simulated_runs(lambda: theirs(q, k, cos, sin, unsqueeze_dim))
    with fastlm.use_backend(backend):
        out = ours(q, k, cos, sin, unsqueeze_dim)
    for i, name in enumerate("qk"):
        assert out[i].dtype == base[i].dtype == torch.promote_types(dtype, table_dtype)
        if layout == "projection":
            assert out[i].stride() == base[i].stride()
        assert_by_rule(f"rotated {name}", out[i], ref[i], base[i], samples=[s[i] for s in sims])


def test_patched_rotary_falls_back_to_transformers(monkeypatch):
    """Calls the kernel does not reproduce run transformers' function itself (bit-identical), with a warning:
    (seq, head_dim) tables broadcast by unsqueeze_dim=0, and tables that require grad (fastlm gives cos and sin no
    gradient; HF's function does)."""
    calls = _op_calls(monkeypatch)
    ours, theirs = _patched_rope()
    g = generator(8)
    q = torch.randn(2, 4, 6, 16, generator=g).to(DEVICE)
    k = torch.randn(2, 2, 6, 16, generator=g).to(DEVICE)
    cos, sin = (torch.randn(6, 16, generator=g).to(DEVICE) for _ in range(2))
    fastlm._backend._warned.clear()
    with pytest.warns(UserWarning, match="unsqueeze_dim=0 .* run transformers' apply_rotary_pos_emb"):
        out = ours(q, k, cos, sin, 0)
    assert all(torch.equal(a, b) for a, b in zip(out, theirs(q, k, cos, sin, 0)))
    cos3, sin3 = (t[None].expand(2, -1, -1).clone().requires_grad_() for t in (cos, sin))
    with pytest.warns(UserWarning, match="cos or sin requiring grad"):
        out = ours(q, k, cos3, sin3)
    expected = theirs(q, k, cos3, sin3)
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
    assert torch.equal(torch.autograd.grad(out[0].sum(), cos3)[0], torch.autograd.grad(expected[0].sum(), cos3)[0])
    assert calls == []
    with torch.no_grad():  # no gradient wanted: the kernel
        ours(q, k, cos3, sin3)
    assert _count(calls, "rotary_embedding") == 2


@pytest.mark.parametrize("hidden_act,expected", [("gelu", ("geglu", "none")), ("swish", ("swiglu", None)),
                                                 ("relu", None)])
def test_gated_mlp_by_activation(monkeypatch, hidden_act, expected):
    """SiLU (silu, swish) → fastlm.swiglu; the erf GELU → fastlm.geglu(approximate="none"); any other activation
    keeps its MLP (norms, rotary and attention are still patched). Logits by the rule."""
    calls = _op_calls(monkeypatch)
    base = _model("llama", hidden_act=hidden_act)
    ref, patched = _float64_reference(base), fastlm.patch(copy.deepcopy(base))
    x = _tokens(2, 12)
    ref_logits, base_logits, logits = (_eval_logits(m, x) for m in (ref, base, patched))
    assert_by_rule(f"{hidden_act} logits", logits, ref_logits, base_logits)
    layers = COMMON["num_hidden_layers"]
    mlps = [m for m in patched.modules() if isinstance(m, transformers.models.llama.modeling_llama.LlamaMLP)]
    assert _count(calls, "rotary_embedding") == 2 * layers
    if expected is None:
        assert {type(m).__name__ for m in mlps} == {"LlamaMLP"} and len(calls) == 2 * layers
    else:
        name, approximate = expected
        assert {type(m).__name__ for m in mlps} == {"FastlmLlamaMLP"} and _count(calls, name) == layers
        if name == "geglu":
            assert all(kw == {"approximate": approximate} for n, kw in calls if n == "geglu")


def test_gated_mlp_with_act_fn_replaced_after_patching_runs_its_own_forward(monkeypatch):
    calls = _op_calls(monkeypatch)
    model = fastlm.patch(_model("qwen3"))
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, COMMON["hidden_size"], generator=generator(9)).to(DEVICE)
    mlp(x)
    assert _count(calls, "swiglu") == 1
    mlp.act_fn = torch.nn.GELU()
    out = mlp(x)
    assert _count(calls, "swiglu") == 1 and _count(calls, "geglu") == 0
    assert torch.equal(out, transformers.models.qwen3.modeling_qwen3.Qwen3MLP.forward(mlp, x))


def test_torch_compile_rotary_and_gated_mlp_fullgraph_without_recompiles():
    """A patched Llama training step compiles into one graph holding fastlm's rotary and gated ops (on the kernel
    backends), gives the eager loss, and a second batch reuses it: the patched attention forward's globals (a copy
    of its modeling module's, without __name__) are guarded as a dict, so nothing fails a guard."""
    backend = "triton" if (HAS_GPU or fastlm._util.interpreting()) else "auto"
    model = fastlm.patch(_model("llama", num_hidden_layers=1))
    graphs = []

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    x, y = _tokens(1, 8, seed=1), _tokens(1, 8, seed=2)
    with fastlm.use_backend(backend):
        eager_loss, _ = _train_step(model, x)
        compiled = torch.compile(model, fullgraph=True, backend=counting_aot_eager)
        loss = compiled(x, labels=x).loss
        loss.backward()
        compiled(y, labels=y).loss.backward()
    assert len(graphs) == 1
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    if backend == "triton":
        ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
        for op in ("fastlm.rotary_embedding", "fastlm.gated_fwd", "fastlm.attention_fwd"):
            assert any(name.startswith(op) for name in ops), (op, ops)


# ---------------------------------------------------------------------------------------------- attn_implementation
# "fastlm" without patch

_SELECT_BY_NAME = r"""
import copy, sys
import torch

order, folder = sys.argv[1], sys.argv[2]
if order == "transformers-first":
    import transformers.masking_utils, transformers.modeling_utils
import fastlm
from fastlm.integrations import hf
assert ("transformers" in sys.modules) == (order == "transformers-first")
import transformers

calls = []
kernel = hf.attention
hf.attention = lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs)
config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="fastlm").eval()
assert model.config._attn_implementation == "fastlm"
eager = copy.deepcopy(model)
eager.set_attn_implementation("eager")
x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits, expected = model(x).logits, eager(x).logits
torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
assert len(calls) == 2, calls
model.save_pretrained(folder)
loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="fastlm").eval()
assert loaded.config._attn_implementation == "fastlm"
with torch.no_grad():
    torch.testing.assert_close(loaded(x).logits, logits, rtol=1e-5, atol=1e-6)
assert len(calls) == 4, calls
# the import hook is gone, and left no wrapper on the modules it registered from
assert not any(type(f).__name__ == "_RegisterOnImport" for f in sys.meta_path)
for name in ("transformers.modeling_utils", "transformers.masking_utils"):
    assert type(sys.modules[name].__loader__).__name__ != "_LoaderThen"
    assert type(sys.modules[name].__spec__.loader).__name__ != "_LoaderThen"
print("ok")
"""


@pytest.mark.parametrize("order", ["fastlm-first", "transformers-first"])
def test_attn_implementation_fastlm_selects_fastlm_attention(tmp_path, order):
    """`import fastlm`, then from_config / from_pretrained(attn_implementation="fastlm"), no patch: fastlm's
    attention runs (the logits of eager attention), whether transformers was imported after fastlm (the import hook
    registers when its registries load) or before (registered at `import fastlm`). Nothing is downloaded."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _SELECT_BY_NAME, order, str(tmp_path / "tiny")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"


def test_register_with_transformers_is_idempotent():
    hook = [f for f in sys.meta_path if isinstance(f, hf._RegisterOnImport)]
    hf.register_with_transformers()
    hf.register_with_transformers()
    assert [f for f in sys.meta_path if isinstance(f, hf._RegisterOnImport)] == hook
    assert hf.ATTN_IMPLEMENTATION in transformers.AttentionInterface._global_mapping
    assert masking_utils.AttentionMaskInterface._global_mapping[hf.ATTN_IMPLEMENTATION] is hf._mask


# ---------------------------------------------------------------------------------------------- benchmarks/e2e.py's
# Hugging Face family (e2e_hf)


def test_e2e_hf_cases_and_providers():
    from benchmarks import e2e
    from benchmarks.__main__ import families

    family = e2e.HF_FAMILY
    assert families()["e2e_hf"] is family and families()["e2e"] is e2e.FAMILY
    assert family.modes == ("fwd",) and family.metric == "flops" and family.reference == "hf"
    # liger last: it patches globally
    assert [p.name for p in family.providers] == ["hf", "fastlm.patch", "fastlm.patch-low_memory", "liger"]
    assert [p.name for p in family.providers if p.backend] == ["fastlm.patch"]
    llama, qwen3 = e2e.hf_cases(quick=False)
    assert [c.params for c in (llama, qwen3)] == [{"model": "llama-1b-hf", "batch": 4, "seq": 2048},
                                                  {"model": "qwen3-1.7b-hf", "batch": 4, "seq": 2048}]
    assert [c.params for c in e2e.hf_cases(quick=True)] == [{"model": "llama-1b-hf", "batch": 1, "seq": 2048}]
    assert {c.dtype for c in (llama, qwen3)} == {torch.bfloat16}
    # Llama: e2e's llama-1b FLOPs. Qwen3 1.7B: 28 layers of 2048 · (16 + 2·8) · 128 + 16·128 · 2048 attention and
    # 3 · 2048 · 6144 MLP, the tied 151936-token head; causal attention's 6 · 28 · 16 · 128 · 2048 per token.
    assert e2e.work(llama, "fwd") == e2e.work(e2e._case("llama-1b", 4, 2048), "fwd")
    matmul = 28 * (2048 * 32 * 128 + 16 * 128 * 2048 + 3 * 2048 * 6144) + 151936 * 2048
    assert e2e.work(qwen3, "fwd") == (6 * matmul + 6 * 28 * 16 * 128 * 2048) * 4 * 2048
    # The transformers models have those shapes: their Linear weights are the FLOPs' matmul parameters.
    for case, model_type in ((llama, "llama"), (qwen3, "qwen3")):
        config = e2e.hf_model_config(case.params["model"])
        assert config.model_type == model_type and config.tie_word_embeddings
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert linears == e2e.model_config(case.params["model"]).matmul_params(), case.label
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.intermediate_size, config.vocab_size) == (2048, 28, 16, 8, 128, 6144, 151936)
    assert any(type(m).__name__ == "Qwen3RMSNorm" for m in model.model.layers[0].self_attn.modules())  # q/k norms


def _tiny_e2e_hf(monkeypatch):
    """e2e_hf's machinery on CPU at test size: the models' shapes shrunk, the device timers stubbed."""
    from benchmarks import e2e, harness
    from fastlm.models import GPTConfig

    monkeypatch.setattr(e2e, "DEVICE", "cpu")
    monkeypatch.setattr(e2e, "model_config", lambda name: (
        GPTConfig.llama_tiny(tie_embeddings=True) if name.startswith("llama") else
        e2e.qwen3_1_7b(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, head_dim=16,
                       intermediate_size=128)))
    monkeypatch.setattr(e2e, "_TRANSFORMERS_GLOBALS", {})
    monkeypatch.setattr(harness, "_bench", lambda fn: (fn(), 2.0)[1])
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 164)
    return e2e, harness


def test_e2e_hf_providers_run_on_cpu(monkeypatch):
    """Both models, hf and fastlm.patch, a training step each from the same weights, checked against each other,
    every row filled; fastlm.patch's model runs fastlm's rotary and SwiGLU; liger is missing here (or runs)."""
    e2e, harness = _tiny_e2e_hf(monkeypatch)
    calls = _op_calls(monkeypatch)
    family = e2e.HF_FAMILY
    availability = {p.name: p.available() for p in family.providers}
    for model in ("llama-1b-hf", "qwen3-1.7b-hf"):
        case = e2e._case(model, batch=2, seq=16)
        a, b = e2e.seeded_hf_model(case), e2e.seeded_hf_model(case)
        assert a.dtype == torch.bfloat16 and a.training and a.config._attn_implementation == "sdpa"
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        calls.clear()
        rows = harness.run_case(family, case, availability, torch.device("cpu"), l2_bytes=1024, ceiling=100.0)
        status = {r["provider"]: r["status"] for r in rows}
        assert status["hf"] == status["fastlm.patch"] == "ok"
        assert status["liger"] == ("ok" if availability["liger"][0] else "missing")
        ours = next(r for r in rows if r["provider"] == "fastlm.patch")
        assert ours["rel_err"] < e2e.TOLERANCE[torch.bfloat16] and ours["vs"]["hf"] == 1.0
        assert ours["work"] == e2e.model_config(model).train_flops_per_token(16) * 2 * 16
        assert _count(calls, "rotary_embedding") > 0 and _count(calls, "swiglu") > 0
        table = e2e.tokens_per_second(rows)
        assert [(m, p) for m, p, *_ in table][:2] == [(model, "hf"), (model, "fastlm.patch")]


def test_e2e_liger_patch_is_undone_before_the_next_hugging_face_build(monkeypatch):
    """Liger replaces names in transformers' modeling module (here a stand-in patch function doing what
    apply_liger_kernel_to_llama does): the liger model keeps them while it runs, and the next build — any provider,
    either family — gets transformers' own classes and functions back."""
    e2e, _ = _tiny_e2e_hf(monkeypatch)
    from transformers.models.llama import modeling_llama

    saved = {name: getattr(modeling_llama, name) for name in ("LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb")}
    for name, value in saved.items():
        monkeypatch.setattr(modeling_llama, name, value)  # put back at teardown, whatever happens

    class StandInNorm(saved["LlamaRMSNorm"]):
        pass

    def stand_in_liger(model):
        modeling_llama.LlamaRMSNorm = StandInNorm
        modeling_llama.apply_rotary_pos_emb = lambda q, k, cos, sin, unsqueeze_dim=1: (q, k)
        model.forward = model.forward  # an instance attribute, as Liger's fused-loss forward is

    monkeypatch.setattr(e2e, "_liger_patch", lambda case: stand_in_liger)
    case = e2e._case("llama-1b-hf", batch=1, seq=8)
    e2e._build_liger_hf_model(case)
    assert modeling_llama.LlamaRMSNorm is StandInNorm
    model = e2e.seeded_hf_model(case)
    assert {name: getattr(modeling_llama, name) for name in saved} == saved
    assert not any(isinstance(m, StandInNorm) for m in model.modules())
