"""End-to-end training steps: fastlm.models.GPT against the same model in plain PyTorch (eager and torch.compile),
Hugging Face transformers, and Hugging Face patched by Liger-Kernel, at GPT-2 124M and Llama 3.2 1B shapes.

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

Providers:
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
Targets: random tokens, the last position of each row ignored (−100), so that Hugging Face's shifted labels give the
same loss as ours.

GPU time, an estimate (not measured: no GPU was available when this was written): about 80 s on an H100, most of it
the two torch.compile builds (~15–25 s each with regional compilation); the steps themselves (GPT-2: 16 × 1024
tokens, ~50 ms; Llama 1B: 4 × 2048 tokens, ~200 ms; ~10 steps per provider with do_bench's warm-up) and the model
builds take the rest. --quick runs the GPT-2 case alone. Each model runs at a sequence length it supports: GPT-2 at
its 1024 positions, Llama at 2048.
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
DTYPE = torch.bfloat16
DEVICE = "cuda"  # where the models are built: the current CUDA device, where the harness puts the inputs
LR = 1e-4
IGNORE_INDEX = -100
TOLERANCE = {torch.bfloat16: 2e-2}  # relative difference of the first step's loss against torch eager's
SEED = 0


def model_config(name: str):
    from fastlm.models import GPTConfig

    return {"gpt2-124m": GPTConfig.gpt2_124m, "llama-1b": GPTConfig.llama_1b}[name]()


# ---------------------------------------------------------------------------------------------- the eager twin


def _eager_attention(config):
    """fastlm.models.gpt.Attention (the same projections and rotary) with torch's SDPA in place of fastlm's."""
    from fastlm.models.gpt import Attention

    class EagerAttention(Attention):
        def forward(self, x, rope):
            q, k, v = (t.transpose(1, 2) for t in self.project(x, rope))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
            return self.proj(y.transpose(1, 2).flatten(2))

    return EagerAttention(config, layer=0)


def _eager_norm(config):
    if config.norm == "layernorm":
        return nn.LayerNorm(config.n_embd, eps=config.eps, bias=config.bias)
    return nn.RMSNorm(config.n_embd, eps=config.eps)


class _EagerBlock(nn.Module):
    def __init__(self, config):
        from fastlm.models.gpt import MLP

        super().__init__()
        self.norm_1 = _eager_norm(config)
        self.attn = _eager_attention(config)
        self.norm_2 = _eager_norm(config)
        self.mlp = MLP(config)  # plain PyTorch already

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
    gpt = _seeded_gpt(case)
    model = gpt.to_hf(attn_implementation="sdpa")
    del gpt
    return _hf_step(model.train())


def _liger_patch(case):
    """Liger-Kernel's patch function for the case's model type, or None."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return MODEL_TYPE_TO_APPLY_LIGER_FN.get(_model_type(case))


def _model_type(case):
    return "gpt2" if case.params["model"].startswith("gpt2") else "llama"


def _build_liger(case):
    gpt = _seeded_gpt(case)
    model = gpt.to_hf(attn_implementation="sdpa")
    del gpt
    _liger_patch(case)(model=model)
    return _hf_step(model.train())


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
        print("usage: python -m benchmarks.e2e RESULTS/e2e.json  (prints tokens/s, MFU and peak memory per row)")
        return 2
    rows = json.loads(Path(argv[0]).read_text())["rows"]
    print("| model | provider | tokens/s | MFU | peak extra GiB |\n|---|---|---|---|---|")
    for model, provider, tps, mfu, peak in tokens_per_second(rows):
        print(f"| {model} | {provider} | {tps:,.0f} | {mfu:.0%} | {peak:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
