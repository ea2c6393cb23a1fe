"""fastlm.models.GPT, both families (GPT-2: LayerNorm, learned positions, GELU, tied head; Llama: RMSNorm, GQA,
rotary embeddings with Llama 3 scaling, SwiGLU, untied head), at test size:

- the triton backend against the float64 model by the tolerance rule, loss and every parameter's gradient;
- Hugging Face GPT2LMHeadModel / LlamaForCausalLM (random tiny configs, nothing downloaded) give the same logits and
  loss as our model loaded from them, and to_hf inverts from_hf;
- generate() with its KV cache gives the tokens of greedy decoding by full forwards; sampling keeps to top_k;
- a training step compiled with torch.compile(fullgraph=True) is one graph, on the torch and triton backends;
- DistributedDataParallel and FSDP2 (fully_shard) on two CPU processes (gloo) give the single-process loss and
  gradients of the whole batch;
- examples/train_gpt.py runs a few steps;
- a bf16 autocast training step against plain PyTorch under autocast (the reference backend on CPU; the kernels on a
  GPU);
- on a GPU: inductor, CUDA graph capture, and the NCCL variant of the distributed test.

The Triton interpreter runs a few model passes at most (each costs seconds on CPU): the file is meant to stay near a
minute on a two-core machine.
"""

import copy
import dataclasses
import faulthandler
import importlib.util
import os
import socket
from pathlib import Path

import pytest
import torch

import fastlm
from fastlm.models import GPT, GPTConfig
from fastlm.models.gpt import config_from_hf
from conftest import DEVICE, HAS_GPU, assert_by_rule, generator, kernel_backends, seeded, simulated_runs

REPO = Path(__file__).resolve().parent.parent
FAMILIES = {"gpt2": GPTConfig.gpt2_tiny, "llama": GPTConfig.llama_tiny}
# The float32 tests run the triton backend: the cuda backend's attention takes float16 and bfloat16 at head dims 32 to
# 256 only (it says so by raising BackendUnavailable), so it is tested in the bf16 autocast test, at head_dim 32.
TRITON = [p for p in kernel_backends() if p.values[0] == "triton"]
BATCH, SEQ = 2, 32
# A larger init than GPT-2's 0.02, so that attention scores spread (softmax far from uniform) and masks matter.
INIT_STD = 0.1


def _config(family, **overrides):
    return FAMILIES[family](init_std=INIT_STD, **overrides)


def _model(config, seed=0, device=DEVICE):
    """A model with every parameter random: norm weights around 1, biases around 0, never exactly 1 or 0. `seed` is
    the draw's offset under FASTLM_TEST_SEED (conftest.seeded)."""
    torch.manual_seed(seeded(seed))
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(device)


def _batch(config, batch=BATCH, seq=SEQ, seed=1, ignore=True, device=DEVICE):
    """Token ids and targets (batch, seq); with `ignore`, a few targets are −100."""
    g = generator(seed)
    idx = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    targets = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    if ignore:
        targets[0, :3] = -100
        targets[-1, -2:] = -100
    return idx.to(device), targets.to(device)


def _loss_and_grads(model, idx, targets, module=None):
    """Loss and {name: gradient} of one forward and backward; `module` holds the parameters when model wraps it."""
    module = module or model
    module.zero_grad(set_to_none=True)
    loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def _assert_loss_and_grads_by_rule(out, ref, base, sims=()):
    """`sims`: the baseline's runs under simulated rounding (conftest.simulated_runs): PyTorch's error, sampled."""
    assert_by_rule("loss", out[0], ref[0], base[0], samples=[s[0] for s in sims])
    assert out[1].keys() == ref[1].keys()
    for name in ref[1]:
        assert_by_rule(f"d {name}", out[1][name], ref[1][name], base[1][name], samples=[s[1][name] for s in sims])


# ---------------------------------------------------------------------------------------------- config and model


def test_configs_and_parameter_counts():
    gpt2 = GPTConfig.gpt2_124m()
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.vocab_size, gpt2.intermediate_size) == (12, 12, 768, 50257,
                                                                                               3072)
    llama = GPTConfig.llama_1b()
    assert (llama.n_kv_head, llama.head_dim, llama.intermediate_size, llama.rope_theta) == (8, 64, 8192, 500000.0)
    with torch.device("meta"):
        # GPT-2 small is 124.4M parameters with its tied head; Llama 3.2 1B 1.236B.
        assert GPT(gpt2).num_params() == 124_439_808
        assert GPT(llama).num_params() == 1_235_814_400
        for config in (gpt2, llama, _config("gpt2"), _config("llama")):
            model = GPT(config)
            linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
            assert config.matmul_params() == linears  # the tied head counted as a matmul
    # Per token: 6 FLOPs per matmul parameter, and causal attention's 6·layers·heads·head_dim·seq.
    assert gpt2.train_flops_per_token(1024) == 6 * gpt2.matmul_params() + 6 * 12 * 12 * 64 * 1024
    for bad in (dict(norm="batchnorm"), dict(n_head=4, n_kv_head=3), dict(pos="alibi"), dict(n_embd=66, n_head=4)):
        with pytest.raises(ValueError):
            GPTConfig.gpt2_tiny(**bad)
    with pytest.raises(ValueError, match="rope_scaling"):
        GPTConfig.llama_tiny(rope_scaling={"factor": 8.0})


def test_init_is_gpt2_style_and_the_head_tied_as_configured():
    model = GPT(GPTConfig.gpt2_tiny(n_layer=8, n_embd=256, vocab_size=512))
    assert model.lm_head.weight is model.wte.weight
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    proj = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks])
    assert proj.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1/√(2·8 layers)
    assert all(torch.equal(b.norm_1.weight, torch.ones(256)) and not b.attn.qkv.bias.any() for b in model.blocks)
    llama = GPT(GPTConfig.llama_tiny())
    assert llama.lm_head.weight is not llama.wte.weight and llama.wpe is None
    assert all(b.attn.qkv.bias is None and b.mlp.fc.bias is None for b in llama.blocks)
    assert isinstance(llama.norm_f, torch.nn.RMSNorm) and isinstance(model.norm_f, torch.nn.LayerNorm)


def test_forward_returns_the_loss_or_the_logits():
    config = _config("llama")
    model = _model(config)
    idx, targets = _batch(config)
    with fastlm.use_backend("torch"), torch.no_grad():
        logits = model(idx, all_logits=True)
        last = model(idx)
        loss = model(idx, targets)
    assert logits.shape == (BATCH, SEQ, config.vocab_size) and last.shape == (BATCH, 1, config.vocab_size)
    torch.testing.assert_close(last, logits[:, -1:])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="targets"):
        model(idx, targets[:, :-1])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros((1, config.block_size + 1), dtype=torch.long, device=DEVICE))


# ---------------------------------------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("kernel", TRITON)
@pytest.mark.parametrize("family", FAMILIES)
def test_kernel_backend_matches_the_reference(family, kernel):
    """Loss and every gradient of a training step: the kernel backend in float32 against the float64 model, by the
    tolerance rule, with the torch backend in float32 as PyTorch's own error."""
    config = _config(family)
    model = _model(config)
    idx, targets = _batch(config)
    with fastlm.use_backend("torch"):
        ref = _loss_and_grads(copy.deepcopy(model).double(), idx, targets)
        base = _loss_and_grads(model, idx, targets)
        sims = simulated_runs(lambda: _loss_and_grads(model, idx, targets))
    with fastlm.use_backend(kernel):
        out = _loss_and_grads(model, idx, targets)
    _assert_loss_and_grads_by_rule(out, ref, base, sims)


# ---------------------------------------------------------------------------------------------- Hugging Face


def _hf_model(family):
    transformers = pytest.importorskip("transformers")
    common = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        model = transformers.GPT2LMHeadModel(config)
    else:
        # Llama 3's rope scaling, with an original context (16) shorter than the test's sequences, so it matters.
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          rope_parameters=rope, **common)
        model = transformers.LlamaForCausalLM(config)
    torch.manual_seed(seeded(2))
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1, biases away from 0, weights wider than the init's
            p.add_(INIT_STD * torch.randn_like(p))
    return model.to(DEVICE).eval()


HF_CASES = [("gpt2", "torch"), ("llama", "torch")] + [pytest.param("gpt2", p.values[0], marks=p.marks)
                                                      for p in TRITON]


@pytest.mark.parametrize("family,kernel", HF_CASES)
def test_from_hf_gives_hugging_faces_logits_and_loss(family, kernel):
    """Ours loaded from a Hugging Face model against it: the float64 copy of theirs is the reference, theirs in
    float32 PyTorch's own error (the tolerance rule)."""
    hf = _hf_model(family)
    ours = GPT.from_hf(hf)
    assert ours.config.tie_embeddings == (family == "gpt2")
    idx, _ = _batch(ours.config, ignore=False)
    # Hugging Face predicts labels[t + 1] at position t: our targets are the ids moved one left, the last ignored.
    targets = torch.cat((idx[:, 1:], torch.full_like(idx[:, :1], -100)), dim=1)
    with torch.no_grad():
        ref = copy.deepcopy(hf).double()(input_ids=idx, labels=idx)
        base = hf(input_ids=idx, labels=idx)
        sims = simulated_runs(lambda: hf(input_ids=idx, labels=idx))
        with fastlm.use_backend(kernel):
            h = ours.hidden_states(idx)
            logits, loss = ours.lm_head(h), ours.loss(h, targets)
    assert_by_rule("logits", logits, ref.logits, base.logits, samples=[s.logits for s in sims])
    assert_by_rule("loss", loss, ref.loss, base.loss, samples=[s.loss for s in sims])


def test_to_hf_inverts_from_hf():
    pytest.importorskip("transformers")
    for family in FAMILIES:
        model = _model(_config(family, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 16})
                       if family == "llama" else _config(family))
        back = GPT.from_hf(model.to_hf())
        assert dataclasses.replace(back.config, init_std=INIT_STD) == model.config  # the init is ours alone
        assert back.state_dict().keys() == model.state_dict().keys()
        for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
            assert torch.equal(a, b), name
        assert (back.lm_head.weight is back.wte.weight) == model.config.tie_embeddings


def test_from_hf_refuses_what_it_does_not_model():
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="GPT2LMHeadModel and LlamaForCausalLM, got Linear"):
        GPT.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="activation_function"):
        config_from_hf(transformers.GPT2Config(activation_function="relu"))
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        config_from_hf(transformers.LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                                 "factor": 4.0}))
    with pytest.raises(ValueError, match="'gpt2'.*'llama'.*got 'bert'"):
        config_from_hf(transformers.BertConfig())


# ---------------------------------------------------------------------------------------------- generation


def _greedy_by_full_forwards(model, prompt, n):
    seq = prompt
    for _ in range(n):
        seq = torch.cat((seq, model(seq).argmax(dim=-1)), dim=1)  # model(seq): the last position's logits
    return seq


# (family, backend, batch, new tokens): the interpreter's case is the smallest that still decodes over a cache.
GENERATE_CASES = [("gpt2", "torch", BATCH, 4), ("llama", "torch", BATCH, 4)] + [
    pytest.param("llama", p.values[0], 1, 2, marks=p.marks) for p in TRITON]


@pytest.mark.parametrize("family,kernel,batch,new", GENERATE_CASES)
def test_generate_with_the_kv_cache_matches_greedy_full_forwards(family, kernel, batch, new):
    """top_k=1 is greedy; each decode step is fastlm.attention of one query over the cache (bottom-right causal),
    at positions past the prompt (learned positions or rope angles offset by the cache's length)."""
    config = _config(family)
    model = _model(config)
    prompt, _ = _batch(config, batch=batch, seq=8, ignore=False)
    with fastlm.use_backend(kernel):
        out = model.generate(prompt, new, top_k=1)
        expected = _greedy_by_full_forwards(model, prompt, new)
    assert out.shape == (batch, 8 + new)
    assert torch.equal(out[:, :8], prompt)
    assert torch.equal(out, expected)
    if kernel == "torch":
        assert torch.equal(model.generate(prompt, new, temperature=0.0), expected)


def test_sampling_keeps_to_top_k_and_follows_the_generator():
    config = _config("gpt2")
    model = _model(config)
    prompt, _ = _batch(config, seq=4, ignore=False)
    with fastlm.use_backend("torch"):
        out = model.generate(prompt, 6, temperature=1.5, top_k=3, generator=torch.Generator(DEVICE).manual_seed(0))
        again = model.generate(prompt, 6, temperature=1.5, top_k=3, generator=torch.Generator(DEVICE).manual_seed(0))
        with torch.no_grad():
            logits = model(out[:, :-1], all_logits=True)[:, 3:]  # the logits each sampled token was drawn from
    assert torch.equal(out, again)
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == out[:, 4:, None]).any(-1).all()
    assert not torch.equal(out[:, 4:], logits.argmax(-1))  # not greedy (at temperature 1.5, 12 draws)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 1, top_k=0)


# ---------------------------------------------------------------------------------------------- torch.compile


# Each family once: the interpreter's compile is the Llama one (RMSNorm, GQA and rope around the custom ops).
COMPILE_CASES = [("gpt2", "torch")] + [pytest.param("llama", p.values[0], marks=p.marks) for p in TRITON]


@pytest.mark.parametrize("family,kernel", COMPILE_CASES)
def test_compiled_training_step_is_one_graph(family, kernel):
    """torch.compile(fullgraph=True) of the forward and loss (the backward through AOTAutograd): one frame compiled,
    no graph break, and the eager loss and gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend

    config = _config(family, n_layer=1)  # a graph break would show in one layer; compiling two takes twice as long
    model = _model(config)
    batch, seq = (BATCH, SEQ) if kernel == "torch" else (1, 16)  # the interpreter is slow: a smaller step
    idx, targets = _batch(config, batch=batch, seq=seq)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with fastlm.use_backend(kernel):
        eager = _loss_and_grads(model, idx, targets)
        out = _loss_and_grads(compiled, idx, targets, module=model)
    assert counter.frame_count == 1 and counter.op_count > 0
    torch.testing.assert_close(out[0], eager[0])
    for name in eager[1]:
        torch.testing.assert_close(out[1][name], eager[1][name], msg=lambda m: f"d {name}: {m}")


# ---------------------------------------------------------------------------------------------- on a GPU


def _eager_twin(model):
    from benchmarks.e2e import EagerGPT

    return EagerGPT.from_gpt(copy.deepcopy(model))


# The reference backend runs here too (CPU autocast): it checks the model's own mixed-precision plumbing (the float32
# stream beside bf16 branches, rope, the head's cast). The kernels in bf16 need a GPU: the interpreter's bf16 dot is
# wrong (triton issue 11584).
AUTOCAST_CASES = [(family, "torch") for family in FAMILIES] + [
    pytest.param(family, p.values[0], marks=[*p.marks, pytest.mark.gpu]) for family in FAMILIES
    for p in kernel_backends()]


@pytest.mark.parametrize("family,kernel", AUTOCAST_CASES)
def test_bf16_autocast_training_step(family, kernel):
    """Under bf16 autocast, against the float64 model, with plain PyTorch (SDPA, torch norms, cross-entropy on the
    logits: benchmarks.e2e.EagerGPT) under the same autocast as PyTorch's own error: the logits, and every gradient
    of the loss, and the loss. The loss is one number carrying bf16 noise, a single draw of its error: PyTorch's side of
    the rule samples that draw's spread (the twin's step under simulated rounding, conftest.simulated_runs). The
    kernels' gradients get the rule's attention factor 3: every parameter but the last norm's and the head's is reached
    through attention's backward. head_dim 32, which the cuda backend's attention takes."""
    config = _config(family, n_embd=128)
    model = _model(config)
    idx, targets = _batch(config, seq=64 if HAS_GPU else SEQ)
    twin = _eager_twin(model)
    reference = copy.deepcopy(model).double()
    with fastlm.use_backend("torch"):
        ref = _loss_and_grads(reference, idx, targets)
        with torch.no_grad():
            ref_logits = reference(idx, all_logits=True)

    def baseline():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            step = _loss_and_grads(twin, idx, targets)
            with torch.no_grad():
                return step, twin.logits(idx)

    (base, base_logits), sims = baseline(), simulated_runs(baseline)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        with fastlm.use_backend(kernel):
            out = _loss_and_grads(model, idx, targets)
            with torch.no_grad():
                out_logits = model(idx, all_logits=True)
    assert out[0].dtype == torch.float32 and torch.isfinite(out[0])
    assert out_logits.dtype == base_logits.dtype == torch.bfloat16
    assert_by_rule("logits", out_logits, ref_logits, base_logits, samples=[s[1] for s in sims])
    assert_by_rule("loss", out[0], ref[0], base[0], samples=[s[0][0] for s in sims])
    for name in ref[1]:
        assert out[1][name].dtype == torch.float32
        assert_by_rule(f"d {name}", out[1][name], ref[1][name], base[1][name],
                       factor=2.0 if kernel == "torch" else 3.0, samples=[s[0][1][name] for s in sims])


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_inductor_compiled_training_step(family):
    config = _config(family)
    model = _model(config)
    idx, targets = _batch(config, seq=64)
    with fastlm.use_backend("torch"):
        ref = _loss_and_grads(copy.deepcopy(model).double(), idx, targets)
        base = _loss_and_grads(model, idx, targets)
        sims = simulated_runs(lambda: _loss_and_grads(model, idx, targets))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = _loss_and_grads(compiled, idx, targets, module=model)
    _assert_loss_and_grads_by_rule(out, ref, base, sims)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_captured_in_a_cuda_graph(family):
    """Forward and backward captured once with static inputs, replayed on new batches: the eager loss and gradients
    each time (nothing in the step syncs the host, or the capture would fail)."""
    config = _config(family)
    model = _model(config)
    eager = copy.deepcopy(model)
    static_idx, static_targets = _batch(config, seq=64, seed=10)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture: Triton compiles, cuBLAS picks its kernels
            _loss_and_grads(model, static_idx, static_targets)
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = model(static_idx, static_targets)
        static_loss.backward()
    for seed in (11, 12):
        idx, targets = _batch(config, seq=64, seed=seed)
        static_idx.copy_(idx)
        static_targets.copy_(targets)
        graph.replay()
        expected = _loss_and_grads(eager, idx, targets)
        torch.testing.assert_close(static_loss, expected[0])
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[1][name], msg=lambda m: f"d {name}: {m}")


# ---------------------------------------------------------------------------------------------- DDP and FSDP2

DIST_WORLD = 2
DIST_BATCH = 4  # the whole batch; each rank takes DIST_BATCH / DIST_WORLD rows


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _dist_worker(rank, port, out_file, device_type):
    """One rank: for each family, one training step under DDP and one under FSDP2 (fully_shard on every block and
    the root) on this rank's rows; rank 0 saves the mean loss and the full gradients."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    # A rank that dies on a signal leaves no Python traceback (the H200 run saw only "SIGSEGV"): faulthandler
    # writes each thread's stack to a file beside the results, which the test's error then shows.
    crash_log = open(_crash_log(out_file, rank), "w")
    faulthandler.enable(file=crash_log, all_threads=True)
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the two ranks share the machine with the test process
    cuda = device_type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=DIST_WORLD)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    rows = slice(rank * DIST_BATCH // DIST_WORLD, (rank + 1) * DIST_BATCH // DIST_WORLD)
    results = {}
    try:
        for family in FAMILIES:
            config = _config(family)
            idx, targets = _batch(config, batch=DIST_BATCH, ignore=False, device=device)
            for wrapper in ("ddp", "fsdp2"):
                model = _model(config, device=device)
                if wrapper == "ddp":
                    wrapped = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
                else:
                    for block in model.blocks:
                        fully_shard(block)
                    wrapped = fully_shard(model)
                loss = wrapped(idx[rows], targets[rows])
                loss.backward()
                # Equal token counts per rank: the mean of the ranks' mean losses is the whole batch's mean.
                mean = loss.detach().clone()
                dist.all_reduce(mean)
                grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).cpu()
                         for n, p in model.named_parameters()}
                results[(family, wrapper)] = ((mean / DIST_WORLD).cpu(), grads)
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def _crash_log(out_file, rank):
    return Path(out_file).with_name(f"rank{rank}-faults.log")


def _start_distributed(tmp_path_factory, device_type):
    out_file = tmp_path_factory.mktemp("dist") / "results.pt"
    # The gloo ranks never touch a GPU: they start with none visible, so that no CUDA driver state (initialised by
    # any torch.cuda query at import) is part of a CPU test. The variable is the parent's only while the two
    # processes start, which copies the environment; this process's own CUDA use is unaffected.
    hide = {"CUDA_VISIBLE_DEVICES": ""} if device_type == "cpu" else {}
    saved = {k: os.environ.get(k) for k in hide}
    os.environ.update(hide)
    try:
        context = torch.multiprocessing.spawn(_dist_worker, args=(_free_port(), str(out_file), device_type),
                                              nprocs=DIST_WORLD, join=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return context, out_file


def _collect_distributed(context, out_file):
    try:
        while not context.join():  # each join returns when one more process has ended; raises if one failed
            pass
    except torch.multiprocessing.ProcessExitedException as e:
        stacks = "\n".join(f"--- rank {rank}:\n{_crash_log(out_file, rank).read_text()}"
                           for rank in range(DIST_WORLD) if _crash_log(out_file, rank).is_file())
        raise AssertionError(f"a distributed rank died: {e}\n{stacks}") from e
    return torch.load(out_file)


@pytest.fixture(scope="module", autouse=True)
def _distributed_cpu_run(tmp_path_factory):
    """The two CPU processes start with this module's first test and run beside the others (most of their time is
    importing torch and fastlm); the distributed tests collect their results."""
    context, out_file = _start_distributed(tmp_path_factory, "cpu")
    yield context, out_file
    for process in context.processes:  # a run no test collected (deselected) is stopped
        if process.is_alive():
            process.terminate()
        process.join()


@pytest.fixture(scope="module")
def distributed_cpu(_distributed_cpu_run):
    return _collect_distributed(*_distributed_cpu_run)


def _check_distributed(results, family, wrapper, device):
    config = _config(family)
    model = _model(config, device=device)
    idx, targets = _batch(config, batch=DIST_BATCH, ignore=False, device=device)
    with fastlm.use_backend("torch"):
        ref = _loss_and_grads(copy.deepcopy(model).double(), idx, targets)
        base = _loss_and_grads(model, idx, targets)
        sims = simulated_runs(lambda: _loss_and_grads(model, idx, targets))
    loss, grads = results[(family, wrapper)]
    out = (loss.to(device), {n: g.to(device) for n, g in grads.items()})
    _assert_loss_and_grads_by_rule(out, ref, base, sims)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
@pytest.mark.parametrize("family", FAMILIES)
def test_two_cpu_processes_match_one(distributed_cpu, family, wrapper):
    _check_distributed(distributed_cpu, family, wrapper, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL variant needs 2 GPUs")
def test_two_gpus_with_nccl_match_one(tmp_path_factory):
    results = _collect_distributed(*_start_distributed(tmp_path_factory, "cuda"))
    for family in FAMILIES:
        for wrapper in ("ddp", "fsdp2"):
            _check_distributed(results, family, wrapper, torch.device("cuda", 0))


# ---------------------------------------------------------------------------------------------- the example


def test_train_gpt_example_runs_and_learns(tmp_path):
    spec = importlib.util.spec_from_file_location("train_gpt", REPO / "examples" / "train_gpt.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "10", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--seq", "32",
                           "--batch", "8", "--lr", "1e-2", "--eval-every", "5", "--eval-batches", "2",
                           "--sample-tokens", "8", "--device", "cpu", "--no-progress", "--out", str(tmp_path)])
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "loss.png").stat().st_size > 0
    evals = [loss for _, loss in result["eval"]]
    assert [step for step, _ in result["eval"]] == [0, 5, 10]
    assert evals[-1] < evals[0] - 0.5  # from about ln 256 = 5.5: the byte frequencies alone are worth more
    checkpoint = torch.load(tmp_path / "checkpoint.pt")
    model = GPT(GPTConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["model"])
    assert isinstance(result["sample"], str) and result["sample"]


# ---------------------------------------------------------------------------------------------- issue 14


def test_fastlm_models_is_an_attribute_of_fastlm():
    """`import fastlm; fastlm.models.GPT` without `import fastlm.models`: imported on first use, not before."""
    import subprocess
    import sys

    code = ("import sys, fastlm; assert 'fastlm.models' not in sys.modules; gpt = fastlm.models.GPT; "
            "assert 'fastlm.models' in sys.modules and 'models' in fastlm.__all__; "
            "from fastlm.models import GPT; assert gpt is GPT; print(gpt.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "fastlm.models.gpt"
    with pytest.raises(AttributeError, match="no attribute 'modelz'"):
        fastlm.modelz


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_runs_fastlm_rotary_and_swiglu(monkeypatch, family):
    """Each Llama block rotates q and k with fastlm.rotary_embedding (full-width float32 tables, the projection's
    (B, T, H, D) views) and gates its MLP with fastlm.swiglu on the fused projection's halves; GPT-2 calls neither.
    The eager twin of benchmarks.e2e (PyTorch's side in the autocast test) stays plain PyTorch."""
    from fastlm.models import gpt

    calls = []

    def spy(name, op):
        def counted(*args, **kwargs):
            calls.append((name, args))
            return op(*args, **kwargs)
        return counted

    for name in ("rotary_embedding", "swiglu"):
        monkeypatch.setattr(gpt, name, spy(name, getattr(gpt, name)))
    config = _config(family)
    model = _model(config)
    idx, targets = _batch(config, seq=8)
    with fastlm.use_backend("torch"):
        loss = model(idx, targets)
    loss.backward()
    if family == "gpt2":
        assert calls == []
    else:
        rope = [args for name, args in calls if name == "rotary_embedding"]
        gated = [args for name, args in calls if name == "swiglu"]
        assert len(rope) == 2 * config.n_layer and len(gated) == config.n_layer
        for x, cos, sin in rope:
            assert x.shape[1:] in ((8, config.n_head, config.head_dim), (8, config.n_kv_head, config.head_dim))
            assert cos.shape == sin.shape == (8, config.head_dim) and cos.dtype == torch.float32
        for gate, up in gated:
            assert gate.shape[-1] == up.shape[-1] == config.intermediate_size and gate.stride(-1) == 1
    calls.clear()
    twin = _eager_twin(model)
    with torch.no_grad():
        twin(idx, targets)
    assert calls == []
