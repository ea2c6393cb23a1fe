"""End-to-end training steps, two families.

e2e: fastlm.models.GPT against the same model in plain PyTorch (eager and torch.compile), Hugging Face
transformers, and Hugging Face patched by Liger-Kernel, at GPT-2 124M and Llama 3.2 1B shapes.
e2e_hf: a Hugging Face model as users have it — transformers' LlamaForCausalLM at Llama 3.2 1B's shapes and
Qwen3ForCausalLM at Qwen3 1.7B's, random weights — as it is (`hf`), patched by Liger-Kernel (`liger`) and patched by
fastlm (`fastlm.patch`). (A family of its own: its reference is `hf`, e2e's is the eager twin.)

What one timed call is: a whole training step, forward, backward and optimizer step (AdamW, fused, lr 1e-4), then
the gradients dropped (zero_grad(set_to_none=True)). The harness has no mode for that, so this family times one
mode, the harness's "fwd" (one call of the provider's function, inputs not requiring grad), and that function is the
step: **rows labelled fwd are whole training steps.** The check before timing compares each provider's loss on the
first step (all start from the same weights) with torch eager's.

Precision: bf16 weights and activations for every provider (the models are moved to bfloat16, the optimizer works
on the bf16 parameters; no autocast), so every provider computes in the same dtype and none depends on which ops
autocast covers. Losses are float32.

FLOPs (`work`): model FLOPs of the step, GPTConfig.train_flops_per_token(seq) · tokens: 6 · the matmul parameters
(every Linear, the output head counted even when tied) per token, plus causal attention's 6 · layers · heads ·
head_dim · seq per token (PaLM's accounting, halved for the causal mask; no recomputation counted). TFLOP/s over the
bf16 matmul rate measured in the run is the MFU. Tokens per second = batch · seq / time: `python -m benchmarks.e2e
RESULTS.json` prints them. Peak memory is the harness's: the extra memory of one step over what is allocated before
it (the weights and the optimizer state are not in it; gradients and activations are).

Providers of e2e:
  fastlm         fastlm.models.GPT, fastlm's `auto` backend: fused residual + norm, fastlm.attention, and
                 linear_cross_entropy (no logits).
  torch          EagerGPT below: the same architecture and parameter names in plain PyTorch, what a user writes:
                 nn.LayerNorm / nn.RMSNorm after the residual add, F.scaled_dot_product_attention (causal, GQA through
                 enable_gqa), the logits materialized and F.cross_entropy on them in float32.
  torch.compile  EagerGPT with each transformer block and the head compiled (torch.compile, fullgraph, default mode):
                 regional compilation, which compiles one block's code once for all layers and keeps the compile
                 time inside the GPU session's budget.
  hf             transformers GPT2LMHeadModel / LlamaForCausalLM made by GPT.to_hf() (same weights), sdpa attention,
                 use_cache=False; its loss is computed on float32 logits.
  liger          the hf model patched by Liger-Kernel's apply_liger_kernel_to_<model> (its defaults: RMSNorm, RoPE,
                 SwiGLU, fused linear cross-entropy). Liger patches transformers' classes globally, so it runs last.
                 Liger has no GPT-2 patch: that case says skipped.
Providers of e2e_hf (each builds the case's model from SEED, transformers' own init, bf16, sdpa attention: the same
weights for each; the step is `_hf_step`'s, as for e2e's hf):
  hf             the transformers model as it is (the reference).
  fastlm.patch   fastlm.patch(model): its RMSNorms, rotary embedding, SwiGLU, attention and the causal-LM loss (no
                 logits) on fastlm's kernels, backend auto.
  fastlm.patch-low_memory  the same with low_memory_loss=True (no fp32 accumulator for the head's weight gradient).
  liger          Liger-Kernel's apply_liger_kernel_to_<model>(model=model), as `_apply_liger_kernel_to_instance` calls
                 it (defaults: RMSNorm, RoPE, SwiGLU, fused linear cross-entropy); last, as in e2e.
  Liger replaces names in transformers' modeling modules (the RMSNorm and MLP classes, apply_rotary_pos_emb): every
  Hugging Face build in this module first puts back what it replaced (`_restore_transformers`), so a model built
  after a liger row, in either family, is transformers' own.
Targets: random tokens, the last position of each row ignored (−100), so that Hugging Face's shifted labels give the
same loss as ours.

GPU time, an estimate (not measured: no GPU was available when this was written): about 80 s on an H100, most of it
the two torch.compile builds (~15–25 s each with regional compilation); the steps themselves (GPT-2: 16 × 1024
tokens, ~50 ms; Llama 1B: 4 × 2048 tokens, ~200 ms; ~10 steps per provider with do_bench's warm-up) and the model
builds take the rest. --quick runs the GPT-2 case alone. Each model runs at a sequence length it supports: GPT-2 at
its 1024 positions, Llama at 2048. e2e_hf, also an estimate: Llama 1B ~64 TFLOP and Qwen3 1.7B ~90 TFLOP a step
(4 × 2048 tokens), a few hundred ms each on an H100/H200, ~10 steps and one model build (seconds) per provider:
under a minute in all. Its --quick case is the Llama model on one sequence of 2048 (a quarter of the step).
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import harness
from benchmarks.harness import Case, Family, Provider

# (name, batch, seq): each model at a sequence length it supports (GPT-2's learned position table has 1024 rows;
# past them the embedding gather reads out of bounds), 16384 tokens a step for GPT-2, 8192 for Llama 1B (whose eager
# float32 logits, 4 GiB, and their gradient dominate the peers' memory).
CASES = (("gpt2-124m", 16, 1024), ("llama-1b", 4, 2048))
QUICK_CASES = CASES[:1]
# e2e_hf: transformers' models at Llama 3.2 1B's and Qwen3 1.7B's shapes, 8192 tokens a step; --quick: 2048.
HF_CASES = (("llama-1b-hf", 4, 2048), ("qwen3-1.7b-hf", 4, 2048))
HF_QUICK_CASES = (("llama-1b-hf", 1, 2048),)
HF_MODEL_TYPES = {"llama-1b-hf": "llama", "qwen3-1.7b-hf": "qwen3"}  # e2e_hf's models: their transformers type
DTYPE = torch.bfloat16
DEVICE = "cuda"  # where the models are built: the current CUDA device, where the harness puts the inputs
LR = 1e-4
IGNORE_INDEX = -100
TOLERANCE = {torch.bfloat16: 2e-2}  # relative difference of the first step's loss against torch eager's
SEED = 0


def model_config(name: str):
    """The case's model as a GPTConfig: fastlm's model for e2e; for e2e_hf the same shapes (its FLOPs and vocab)."""
    from fastlm.models import GPTConfig

    return {"gpt2-124m": GPTConfig.gpt2_124m, "llama-1b": GPTConfig.llama_1b, "llama-1b-hf": GPTConfig.llama_1b,
            "qwen3-1.7b-hf": qwen3_1_7b}[name]()


def qwen3_1_7b(**overrides):
    """Qwen3 1.7B's shapes (its public config): 28 layers, 2048 wide, 16 query and 8 kv heads of 128, SwiGLU 6144,
    151936 tokens, rope θ 10⁶, RMSNorm eps 10⁻⁶, embeddings tied. Its q and k RMSNorms are no matmul: not counted."""
    from fastlm.models import GPTConfig

    return GPTConfig(**{**dict(vocab_size=151936, block_size=40960, n_layer=28, n_head=16, n_kv_head=8, n_embd=2048,
                               head_dim=128, intermediate_size=6144, norm="rmsnorm", mlp="swiglu", pos="rope",
                               bias=False, tie_embeddings=True, eps=1e-6, rope_theta=1e6), **overrides})


def hf_model_config(name: str):
    """The transformers config of an e2e_hf model, from model_config(name): a LlamaConfig (fastlm.models.gpt's
    hf_config: Llama 3's rope scaling, tied as Llama 3.2 1B) or a Qwen3Config (q/k norms, no sliding window)."""
    import transformers
    from fastlm.models.gpt import hf_config

    c = model_config(name)
    if HF_MODEL_TYPES[name] == "llama":
        return hf_config(c)[1]
    return transformers.Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim, max_position_embeddings=c.block_size, rms_norm_eps=c.eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, tie_word_embeddings=c.tie_embeddings,
        attention_bias=c.bias, use_sliding_window=False, hidden_act="silu", bos_token_id=None, eos_token_id=None,
        pad_token_id=None)


# ---------------------------------------------------------------------------------------------- the eager twin


def _eager_attention(config):
    """fastlm.models.gpt.Attention (the same projections) with the rotary embedding in plain PyTorch (apply_rope, on
    rope_cos_sin's tables) and torch's SDPA in place of fastlm's ops."""
    from fastlm.models.gpt import Attention, apply_rope

    class EagerAttention(Attention):
        def rotate(self, x, rope):
            return apply_rope(x, *rope)

        def forward(self, x, rope):
            q, k, v = (t.transpose(1, 2) for t in self.project(x, rope))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
            return self.proj(y.transpose(1, 2).flatten(2))

    return EagerAttention(config, layer=0)


def _eager_norm(config):
    if config.norm == "layernorm":
        return nn.LayerNorm(config.n_embd, eps=config.eps, bias=config.bias)
    return nn.RMSNorm(config.n_embd, eps=config.eps)


def _eager_mlp(config):
    """fastlm.models.gpt.MLP (the same fused fc and proj) with SwiGLU as F.silu(gate) * up."""
    from fastlm.models.gpt import MLP

    class EagerMLP(MLP):
        def activation(self, h):
            if self.gated:
                gate, up = h.chunk(2, dim=-1)
                return F.silu(gate) * up
            return F.gelu(h, approximate="tanh")

    return EagerMLP(config)


class _EagerBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm_1 = _eager_norm(config)
        self.attn = _eager_attention(config)
        self.norm_2 = _eager_norm(config)
        self.mlp = _eager_mlp(config)

    def forward(self, x, rope):
        x = x + self.attn(self.norm_1(x), rope)
        return x + self.mlp(self.norm_2(x))


class EagerGPT(nn.Module):
    """fastlm.models.GPT in plain PyTorch: the same architecture, parameter names and state dict, torch's own ops
    (see the module docstring). forward(idx, targets) → the mean float32 cross-entropy of the materialized logits;
    logits(idx) → every position's logits."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.blocks = nn.ModuleList(_EagerBlock(config) for _ in range(config.n_layer))
        self.norm_f = _eager_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        return self.head_loss(self.trunk(idx), targets)

    def trunk(self, idx):
        """The residual stream after the last block (before the final norm)."""
        from fastlm.models.gpt import rope_cos_sin

        # GPT.hidden_states's check: past block_size the learned position table has no row (the gather would read
        # out of bounds, a device-side assert on the GPU), and fastlm's model refuses the same way.
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"positions up to {idx.shape[1]} exceed block_size {self.config.block_size}")
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            rope = rope_cos_sin(self.config, positions, self.wte.weight.dtype)
        for block in self.blocks:
            x = block(x, rope)
        return x

    def logits(self, idx):
        return self.lm_head(self.norm_f(self.trunk(idx)))

    def head_loss(self, x, targets):
        logits = self.lm_head(self.norm_f(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)

    @classmethod
    def from_gpt(cls, gpt) -> "EagerGPT":
        """The eager twin of a fastlm GPT, sharing its tensors (no copy)."""
        with torch.device("meta"):
            model = cls(gpt.config)
        model.load_state_dict(gpt.state_dict(), assign=True)
        if gpt.config.tie_embeddings:
            model.lm_head.weight = model.wte.weight
        return model


def compile_regions(model: EagerGPT) -> EagerGPT:
    """Regional compilation: every block, and the head with its loss, compiled in place (fullgraph, static shapes).
    The blocks share their code, so one compilation serves every layer."""
    for block in model.blocks:
        block.compile(fullgraph=True, dynamic=False)
    model.head_loss = torch.compile(model.head_loss, fullgraph=True, dynamic=False)
    return model


# ---------------------------------------------------------------------------------------------- cases and work


def _case(name, batch, seq):
    return Case("train_step", DTYPE, {"model": name, "batch": batch, "seq": seq})


def cases(quick: bool) -> list:
    """2 cases (1 with --quick), each run by 5 providers."""
    return [_case(*c) for c in (QUICK_CASES if quick else CASES)]


def hf_cases(quick: bool) -> list:
    """e2e_hf's: 2 cases (1, smaller, with --quick), each run by 3 providers."""
    return [_case(*c) for c in (HF_QUICK_CASES if quick else HF_CASES)]


def tokens(case: Case) -> int:
    return case.params["batch"] * case.params["seq"]


def work(case: Case, mode: str) -> int:
    """Model FLOPs of one training step (the only mode this family times)."""
    return model_config(case.params["model"]).train_flops_per_token(case.params["seq"]) * tokens(case)


def make_inputs(case: Case, device, gen):
    """Random token ids (batch, seq) and targets with each row's last position ignored; no gradient outputs (the
    provider's function runs its own backward)."""
    V = model_config(case.params["model"]).vocab_size
    shape = (case.params["batch"], case.params["seq"])
    idx = torch.randint(0, V, shape, generator=gen, device=device)
    targets = torch.randint(0, V, shape, generator=gen, device=device)
    targets[:, -1] = IGNORE_INDEX
    return {"idx": idx, "targets": targets}, ()


# ---------------------------------------------------------------------------------------------- providers


def _seeded_gpt(case: Case):
    """fastlm's GPT for the case, initialised from SEED on the GPU, in bf16: every provider starts from its weights."""
    from fastlm.models import GPT

    torch.manual_seed(SEED)
    with torch.device(DEVICE):
        model = GPT(model_config(case.params["model"]))
    return model.to(DTYPE)


def _train_step(model, loss_of):
    """fn(inputs) → (loss,): one forward, backward and AdamW step of `model`, `loss_of(inputs)` its loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)  # one kernel for every parameter

    def step(inputs):
        loss = loss_of(inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return (loss.detach().float(),)

    return step


def _build_fastlm(case):
    model = _seeded_gpt(case)
    return _train_step(model, lambda i: model(i["idx"], i["targets"]))


def _build_eager(case):
    model = EagerGPT.from_gpt(_seeded_gpt(case))
    return _train_step(model, lambda i: model(i["idx"], i["targets"]))


def _build_compiled(case):
    # Dynamo keeps compiled code on the code objects, which both cases share: start each case afresh.
    torch._dynamo.reset()
    model = compile_regions(EagerGPT.from_gpt(_seeded_gpt(case)))
    return _train_step(model, lambda i: model(i["idx"], i["targets"]))


def hf_labels(targets):
    """Hugging Face's labels for our targets: its loss predicts labels[:, t + 1] at position t, so the targets move
    one to the right (the first label is ignored, and our last target, ignored, drops off)."""
    pad = torch.full_like(targets[:, :1], IGNORE_INDEX)
    return torch.cat((pad, targets[:, :-1]), dim=1)


def _hf_step(model):
    def loss_of(i):
        return model(input_ids=i["idx"], labels=hf_labels(i["targets"]), use_cache=False).loss

    return _train_step(model, loss_of)


def _build_hf(case):
    _restore_transformers()
    gpt = _seeded_gpt(case)
    model = gpt.to_hf(attn_implementation="sdpa")
    del gpt
    return _hf_step(model.train())


def _liger_patch(case):
    """Liger-Kernel's patch function for the case's model type, or None."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return MODEL_TYPE_TO_APPLY_LIGER_FN.get(_model_type(case))


def _model_type(case):
    name = case.params["model"]
    return HF_MODEL_TYPES.get(name) or ("gpt2" if name.startswith("gpt2") else "llama")


# transformers modeling module → its globals before a Liger patch function replaced some of them
_TRANSFORMERS_GLOBALS = {}


def _apply_liger(case, model):
    """Liger's patch of the case's model type on `model` (what _apply_liger_kernel_to_instance does), the
    modeling module's globals saved first for `_restore_transformers`."""
    module = sys.modules[type(model).__module__]
    _TRANSFORMERS_GLOBALS.setdefault(module, dict(vars(module)))
    _liger_patch(case)(model=model)


def _restore_transformers():
    """Put back the modeling-module globals Liger replaced (its RMSNorm and MLP classes, apply_rotary_pos_emb), before
    every Hugging Face build: the model built is transformers' own. (The liger row, last in its case, is done by then:
    its model looks apply_rotary_pos_emb up in the module at each call.)"""
    for module, saved in _TRANSFORMERS_GLOBALS.items():
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)


def _build_liger(case):
    _restore_transformers()
    gpt = _seeded_gpt(case)
    model = gpt.to_hf(attn_implementation="sdpa")
    del gpt
    _apply_liger(case, model)
    return _hf_step(model.train())


def seeded_hf_model(case: Case):
    """e2e_hf's model for the case: transformers' AutoModelForCausalLM from hf_model_config, initialised by
    transformers from SEED on DEVICE in bf16, sdpa attention, in train mode: every provider starts from its
    weights."""
    import transformers

    _restore_transformers()
    config = hf_model_config(case.params["model"])
    torch.manual_seed(SEED)
    with torch.device(DEVICE):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=DTYPE)
    return model.train()


def _build_hf_model(case):
    return _hf_step(seeded_hf_model(case))


def _build_fastlm_patch(case):
    import fastlm

    return _hf_step(fastlm.patch(seeded_hf_model(case)))


def _build_fastlm_patch_low_memory(case):
    import fastlm

    return _hf_step(fastlm.patch(seeded_hf_model(case), low_memory_loss=True))


def _build_liger_hf_model(case):
    model = seeded_hf_model(case)
    _apply_liger(case, model)
    return _hf_step(model)


def _liger_skip(case):
    if _liger_patch(case) is None:
        return f"Liger-Kernel has no patch for {_model_type(case)} models"
    return ""


PROVIDERS = [
    Provider("fastlm", _build_fastlm, harness.importable("fastlm.models"), harness.fastlm_context("auto"), backend="auto"),
    Provider("torch", _build_eager),
    Provider("torch.compile", _build_compiled),
    Provider("hf", _build_hf, harness.importable("transformers")),
    Provider("liger", _build_liger, harness.importable("liger_kernel.transformers"), skip=_liger_skip),  # last: see above
]

FAMILY = Family(
    name="e2e",
    metric="flops",
    cases=cases,
    providers=PROVIDERS,
    make_inputs=make_inputs,
    work=work,
    reference="torch",
    x_key="seq",
    tolerance=TOLERANCE,
    modes=("fwd",),
    notes=(
        "**Each timed call is a whole training step** (forward, backward, fused AdamW step, zero_grad): the rows "
        "are labelled fwd because the harness times one call of the provider's function, and this family's "
        "function is the step.",
        "bf16 weights and activations for every provider (no autocast); float32 losses.",
        "FLOPs: GPTConfig.train_flops_per_token(seq) × batch × seq: 6 × matmul parameters (head included even when "
        "tied) + causal attention's 6 × layers × heads × head_dim × seq, per token. The fraction of the matmul rate "
        "is the MFU. tokens/s = batch × seq / time (`python -m benchmarks.e2e <json>`).",
        "fastlm: fastlm.models.GPT, backend auto. torch: the same model in plain PyTorch (nn norms, SDPA, "
        "F.cross_entropy on float32 logits). torch.compile: that model with each block and the head compiled "
        "(regional, fullgraph, default mode). hf: transformers from GPT.to_hf(), sdpa. liger: hf patched by "
        "Liger-Kernel's apply_liger_kernel_to_<model>, defaults.",
        "Peak memory: extra over what is allocated before the step (weights and optimizer state excluded).",
    ),
)

HF_PROVIDERS = [
    Provider("hf", _build_hf_model, harness.importable("transformers")),
    Provider("fastlm.patch", _build_fastlm_patch, harness.importable("fastlm", "transformers"),
             harness.fastlm_context("auto"), backend="auto"),
    # The loss's low-memory path (issue 13 against issue 14's "no more peak memory than Liger"): a column of its
    # own, not ranked for the dispatch table.
    Provider("fastlm.patch-low_memory", _build_fastlm_patch_low_memory, harness.importable("fastlm", "transformers"),
             harness.fastlm_context("auto")),
    Provider("liger", _build_liger_hf_model, harness.importable("liger_kernel.transformers"), skip=_liger_skip),
]

HF_FAMILY = Family(
    name="e2e_hf",
    metric="flops",
    cases=hf_cases,
    providers=HF_PROVIDERS,
    make_inputs=make_inputs,
    work=work,
    reference="hf",
    x_key="seq",
    tolerance=TOLERANCE,
    modes=("fwd",),
    notes=(
        "**Each timed call is a whole training step** (forward with labels, backward, fused AdamW step, zero_grad), "
        "labelled fwd as in e2e.",
        "The models are transformers' LlamaForCausalLM (Llama 3.2 1B's shapes) and Qwen3ForCausalLM (Qwen3 1.7B's), "
        "random weights from one seed, bf16 (no autocast), sdpa attention; float32 losses.",
        "hf: the model as it is. fastlm.patch: fastlm.patch(model) (norms, rotary, SwiGLU, attention, the loss "
        "without logits), backend auto; fastlm.patch-low_memory: the same with `low_memory_loss=True` (the head's "
        "weight gradient without its fp32 accumulator, the logits made twice). liger: Liger-Kernel's "
        "apply_liger_kernel_to_<model>(model=model), defaults.",
        "FLOPs as e2e's: 6 × matmul parameters (tied head counted) + causal attention's 6 × layers × heads × "
        "head_dim × seq, per token (Qwen3's q/k norms are no matmul). MFU = the fraction of the measured bf16 matmul "
        "rate; tokens/s with `python -m benchmarks.e2e <json>`.",
        "Peak memory: extra over what is allocated before the step (weights and optimizer state excluded).",
    ),
)

FAMILIES = (FAMILY, HF_FAMILY)


# ---------------------------------------------------------------------------------------------- tokens per second


def tokens_per_second(rows) -> list:
    """(model, provider, tokens/s, MFU, peak GiB) of every row that ran, from the harness's rows."""
    out = []
    for r in rows:
        if r["status"] in ("ok", "mismatch") and r["ms"]:
            n = r["params"]["batch"] * r["params"]["seq"]
            peak = r["peak_mem_bytes"] / 2**30 if r["peak_mem_bytes"] is not None else float("nan")
            out.append((r["params"]["model"], r["provider"], n / (r["ms"] / 1e3), r["frac_of_ceiling"], peak))
    return out


def main(argv=None) -> int:
    import json
    from pathlib import Path

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.e2e RESULTS/e2e.json  (or e2e_hf.json: prints tokens/s, MFU and peak "
              "memory per row)")
        return 2
    rows = json.loads(Path(argv[0]).read_text())["rows"]
    print("| model | provider | tokens/s | MFU | peak extra GiB |\n|---|---|---|---|---|")
    for model, provider, tps, mfu, peak in tokens_per_second(rows):
        print(f"| {model} | {provider} | {tps:,.0f} | {mfu:.0%} | {peak:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
