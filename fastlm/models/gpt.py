"""A decoder-only transformer on fastlm's ops, one module for the GPT-2 and the Llama families.

The family is a matter of GPTConfig fields:

    field            GPT-2                              Llama
    norm             "layernorm" (weight and bias)      "rmsnorm"
    pos              "learned" position table           "rope": rotary, Hugging Face's rotate-half layout
    mlp              "gelu" (tanh approximation)        "swiglu"
    n_kv_head        n_head                             fewer: grouped-query attention
    bias             True (every Linear and norm)       False
    tie_embeddings   True                               False (True in Llama 3.2 1B and 3B)

Where fastlm's ops come in:
- The pre-norm residual add is fused into the norm: `fastlm.layer_norm(x, w, b, eps, residual=r)` (and rms_norm)
  returns (norm(x + r), x + r), so each block reads and writes the residual stream once per norm.
- `fastlm.attention(q, k, v, causal=True)` takes (batch, seqlen, heads, head_dim) tensors, which is what the QKV
  projection gives after a view: no transposes. Its causal mask is aligned bottom-right, so with a KV cache the new
  queries see every cached key: decoding is the same call on the cache.
- The training loss is `fastlm.linear_cross_entropy(hidden, lm_head.weight, targets)`: the (tokens, vocab) logits
  are never made.
- Llama's rotary embedding is `fastlm.rotary_embedding(q, cos, sin)` on the projection's (batch, seqlen, heads,
  head_dim) views, with full-width tables made once per forward (`rope_tables`), and its MLP's gating is
  `fastlm.swiglu(gate, up)` on the two halves of the fused gate-up projection, read in place.
Everything else (embeddings, linear layers, GPT-2's GELU) is plain PyTorch. Under `fastlm.use_backend("torch")`
every op is the reference, so the same model is its own reference.

Mixed precision. Under torch.autocast the residual stream stays in float32 (as eager PyTorch's type promotion keeps
it: the embeddings are float32 and each block's output is added to them), the matmuls and attention run in the
autocast dtype, and linear_cross_entropy casts the head's operands to it as autocast casts an nn.Linear's. The loss
is float32 either way.

Hugging Face: `GPT.from_hf(model)` loads a transformers `GPT2LMHeadModel` or `LlamaForCausalLM` (same logits), and
`model.to_hf()` makes one from ours. GPT-2's Conv1D layers store their weights (in, out), transposed from
nn.Linear's; Llama's q, k, v and gate, up projections are concatenated into our fused qkv and fc layers.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastlm import nn as fnn
from fastlm.ops.attention import attention
from fastlm.ops.cross_entropy import linear_cross_entropy
from fastlm.ops.gated import swiglu
from fastlm.ops.rotary import rotary_embedding

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope")
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
HF_MODELS = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}  # the transformers classes from_hf loads


@dataclass
class GPTConfig:
    """The model's shape and family. Fields left None (n_kv_head, head_dim, intermediate_size) are filled in at
    construction from the others; the presets take any field as a keyword override."""

    vocab_size: int = 50257
    block_size: int = 1024  # the longest sequence: the learned position table's size, the KV cache's limit
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # None: n_head; fewer (dividing n_head): grouped-query attention
    n_embd: int = 768
    head_dim: Optional[int] = None  # None: n_embd // n_head
    intermediate_size: Optional[int] = None  # the MLP's hidden width; None: 4·n_embd (gelu), ⌈8·n_embd/3⌉₂₅₆ (swiglu)
    norm: str = "layernorm"
    mlp: str = "gelu"
    pos: str = "learned"
    bias: bool = True  # biases in every Linear (and LayerNorm): GPT-2 has them, Llama none
    tie_embeddings: bool = True  # the output head shares the token embedding's weight
    eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3's frequency scaling, or None: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}.
    rope_scaling: Optional[dict] = None
    init_std: float = 0.02  # GPT-2's initialisation: N(0, init_std), the residual projections scaled by 1/√(2·n_layer)

    def __post_init__(self):
        for name, value, allowed in (("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS),
                                     ("pos", self.pos, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {allowed}, got {value!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}), "
                                 "or head_dim given")
            self.head_dim = self.n_embd // self.n_head
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd if self.mlp == "gelu" else 256 * -(-8 * self.n_embd // 768)
        if self.rope_scaling is not None:
            missing = [k for k in LLAMA3_SCALING_KEYS if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"GPTConfig.rope_scaling (Llama 3's) lacks {missing}")

    # ------------------------------------------------------------------------------------------ presets

    @classmethod
    def gpt2_124m(cls, **overrides):
        """GPT-2 small: 12 layers, 12 heads, 768 wide, 50257 tokens, 1024 positions (124M parameters)."""
        return cls(**overrides)

    @classmethod
    def llama_1b(cls, **overrides):
        """Llama 3.2 1B's shapes: 16 layers, 2048 wide, 32 query and 8 kv heads of 64, SwiGLU 8192, 128256 tokens,
        rope θ 500000 with Llama 3's scaling, embeddings tied (as that model has them; 1.24B parameters)."""
        return cls(**{**dict(vocab_size=128256, block_size=131072, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
                             intermediate_size=8192, norm="rmsnorm", mlp="swiglu", pos="rope", bias=False,
                             tie_embeddings=True, eps=1e-5, rope_theta=500000.0,
                             rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192}), **overrides})

    @classmethod
    def gpt2_tiny(cls, **overrides):
        """The GPT-2 family at test size: 2 layers, 4 heads, 64 wide, 96 tokens, 64 positions."""
        return cls(**{**dict(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_embd=64), **overrides})

    @classmethod
    def llama_tiny(cls, **overrides):
        """The Llama family at test size: 2 layers, 4 query and 2 kv heads, 64 wide, SwiGLU 128, 96 tokens, untied."""
        return cls(**{**dict(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                             intermediate_size=128, norm="rmsnorm", mlp="swiglu", pos="rope", bias=False,
                             tie_embeddings=False), **overrides})

    # ------------------------------------------------------------------------------------------ arithmetic

    def matmul_params(self) -> int:
        """The parameters that take part in a matmul: every Linear, the output head counted even when tied to the
        embedding (the lookup is no matmul); biases and norms left out."""
        C, D, I = self.n_embd, self.head_dim, self.intermediate_size
        attn = C * (self.n_head + 2 * self.n_kv_head) * D + self.n_head * D * C
        mlp = C * I * (2 if self.mlp == "swiglu" else 1) + I * C
        return self.n_layer * (attn + mlp) + self.vocab_size * C

    def train_flops_per_token(self, seq_len: int) -> int:
        """Model FLOPs of one training token (forward + backward, no recomputation), PaLM's accounting with the causal
        half: 6·matmul_params, plus attention's 6·n_layer·n_head·head_dim·seq_len (per query and head, the two
        forward matmuls cost 2·2·head_dim per visible key, seq_len/2 keys on average, and the backward twice that)."""
        return 6 * self.matmul_params() + 6 * self.n_layer * self.n_head * self.head_dim * seq_len


# ---------------------------------------------------------------------------------------------- rotary embedding


def rope_inv_freq(config: GPTConfig, device=None) -> torch.Tensor:
    """(head_dim/2,) float32 rotation frequencies θ^(−2i/head_dim), with Llama 3's scaling when configured: the
    long wavelengths divided by `factor`, the short ones kept, those in between blended linearly in 1/wavelength.
    Computed as Hugging Face computes them, so the angles agree bit for bit."""
    D = config.head_dim
    inv = 1.0 / config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D)
    s = config.rope_scaling
    if s is None:
        return inv
    context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    ramp = (context / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - ramp) * inv / s["factor"] + ramp * inv
    long = wavelen > context / s["low_freq_factor"]
    short = wavelen < context / s["high_freq_factor"]
    return torch.where(long, inv / s["factor"], torch.where(short, inv, blended))


def rope_cos_sin(config: GPTConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple:
    """cos, sin (T, head_dim/2) of the angles position·frequency (angles in float32, as Hugging Face's; cos and sin
    in float64 for a float64 model, else float32)."""
    angles = positions.to(torch.float32)[:, None] * rope_inv_freq(config, positions.device)[None, :]
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    angles = angles.to(ct)
    return angles.cos(), angles.sin()


def rope_tables(config: GPTConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple:
    """cos, sin (T, head_dim): rope_cos_sin's tables in Hugging Face's full-width form, cat(c, c), which
    fastlm.rotary_embedding takes."""
    cos, sin = rope_cos_sin(config, positions, dtype)
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, D) by the angles, rotate-half layout: dims i and i + D/2 form a pair (Hugging Face's
    Llama convention, not the interleaved one of Meta's original code). Computed in cos's dtype, rounded once. The
    plain-PyTorch form, on rope_cos_sin's half-width tables; the model runs fastlm.rotary_embedding on rope_tables'."""
    x1, x2 = x.to(cos.dtype).chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2): broadcast over batch and heads
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


# ---------------------------------------------------------------------------------------------- layers


class KVCache:
    """Keys and values of every layer for `length` positions, for `GPT.generate`. Each layer's buffers are allocated
    at its first write, (batch, length, kv_heads, head_dim) in the dtype of the keys written."""

    def __init__(self, n_layer: int, length: int):
        self.length = length
        self.layers = [None] * n_layer

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """Write k, v (B, T, kv_heads, D) at positions start … start+T−1 of `layer`; → the cached keys and values
        of positions 0 … start+T−1 (views of the buffers)."""
        end = start + k.shape[1]
        if end > self.length:
            raise ValueError(f"KVCache holds {self.length} positions, asked to write up to {end}")
        if self.layers[layer] is None:
            shape = (k.shape[0], self.length) + tuple(k.shape[2:])
            self.layers[layer] = (k.new_empty(shape), v.new_empty(shape))
        k_cache, v_cache = self.layers[layer]
        k_cache[:, start:end] = k
        v_cache[:, start:end] = v
        return k_cache[:, :end], v_cache[:, :end]


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "layernorm":
        return fnn.LayerNorm(config.n_embd, eps=config.eps, bias=config.bias)
    return fnn.RMSNorm(config.n_embd, eps=config.eps)


def _add_norm(norm: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor]) -> tuple:
    """(norm(x + residual), x + residual), the add fused into the norm; with no residual yet, x is the stream.
    Under autocast x (a matmul's output) is in the autocast dtype and the stream in float32: x joins the stream's
    dtype, as `x + residual` would promote it."""
    if residual is None:
        return norm(x), x
    return norm(x.to(residual.dtype), residual=residual)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer  # this layer's index in a KVCache
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        q_width, kv_width = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.qkv = nn.Linear(config.n_embd, q_width + 2 * kv_width, bias=config.bias)
        self.proj = nn.Linear(q_width, config.n_embd, bias=config.bias)

    def rotate(self, x, rope):
        """x (B, T, heads, D) rotated by rope = (cos, sin), rope_tables' (T, D) tables, float32 (float64 for a float64
        model): computed in the tables' dtype, rounded once to x's."""
        return rotary_embedding(x, *rope)

    def project(self, x, rope=None):
        """x (B, T, C) → q (B, T, H, D), k and v (B, T, Hkv, D), rotated when rope (cos, sin) is given."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split((H * D, Hkv * D, Hkv * D), dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if rope is not None:
            q, k = self.rotate(q, rope), self.rotate(k, rope)
        return q, k, v

    def forward(self, x, rope=None, cache=None, start=0):
        """x (B, T, C) at positions start … start+T−1; rope: (cos, sin) of those positions or None; cache: a
        KVCache holding positions 0 … start−1 of this layer, which the new keys and values join."""
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)
        y = attention(q, k, v, causal=True)  # bottom-right causal: query start+i sees keys 0 … start+i
        return self.proj(y.flatten(2))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        width = config.intermediate_size
        # SwiGLU's gate and up projections are one Linear: (gate; up) stacked along the output.
        self.fc = nn.Linear(config.n_embd, 2 * width if self.gated else width, bias=config.bias)
        self.proj = nn.Linear(width, config.n_embd, bias=config.bias)

    def activation(self, h):
        """The fc output (…, 2·width) → swiglu of its halves (…, width), or GPT-2's GELU (tanh approximation)."""
        if self.gated:
            gate, up = h.chunk(2, dim=-1)  # strided views of the fused projection: swiglu reads them in place
            return swiglu(gate, up)
        return F.gelu(h, approximate="tanh")

    def forward(self, x):
        return self.proj(self.activation(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.norm_1 = _norm(config)
        self.attn = Attention(config, layer)
        self.norm_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x, residual, rope=None, cache=None, start=0):
        """x: the previous block's MLP output (the embeddings in the first block, with residual None); residual:
        the stream before it. → (this block's MLP output, the stream after its attention's add); the next norm
        adds the one to the other."""
        h, residual = _add_norm(self.norm_1, x, residual)
        h, residual = _add_norm(self.norm_2, self.attn(h, rope, cache, start), residual)
        return self.mlp(h), residual


# ---------------------------------------------------------------------------------------------- the model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = _norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self):
        """GPT-2's initialisation: weights and embeddings N(0, init_std), biases 0, norms 1, and the two projections
        that write into the residual stream (attention's and the MLP's) N(0, init_std/√(2·n_layer)), so the stream's
        variance does not grow with depth."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        for block in self.blocks:
            for p in (block.attn.proj.weight, block.mlp.proj.weight):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))

    def num_params(self) -> int:
        """Parameters, a tied head counted once."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, idx, targets=None, *, all_logits=False):
        """idx (B, T) token ids. With targets (B, T) (the token each position should predict, ignore_index −100):
        the mean cross-entropy, float32, through linear_cross_entropy (no logits made). Without: the logits of the
        last position (B, 1, vocab), or of every position (B, T, vocab) with all_logits=True."""
        if targets is not None and (not isinstance(targets, torch.Tensor) or targets.shape != idx.shape):
            raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got "
                             f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
        h = self.hidden_states(idx)
        if targets is not None:
            return self.loss(h, targets)
        return self.lm_head(h if all_logits else h[:, -1:])

    def hidden_states(self, idx, cache: Optional[KVCache] = None, start: int = 0):
        """The final norm's output (B, T, C) for tokens idx (B, T) at positions start … start+T−1 (a KV cache
        holding positions 0 … start−1)."""
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError(f"idx must be a (batch, seqlen) tensor of token ids, got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        T = idx.shape[1]
        if start + T > self.config.block_size:
            raise ValueError(f"positions up to {start + T} exceed block_size {self.config.block_size}")
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            rope = rope_tables(self.config, positions, self.wte.weight.dtype)
        residual = None
        for block in self.blocks:
            x, residual = block(x, residual, rope, cache, start)
        h, _ = _add_norm(self.norm_f, x, residual)
        return h

    def loss(self, hidden, targets, ignore_index=-100):
        """Mean cross-entropy of the head's logits of hidden (B, T, C) against targets (B, T), never making the
        logits (fastlm.linear_cross_entropy)."""
        return linear_cross_entropy(hidden, self.lm_head.weight, targets, ignore_index=ignore_index)

    # ------------------------------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None):
        """Continue each row of idx (B, T) by max_new_tokens sampled tokens → (B, T + max_new_tokens).

        One forward over the prompt fills a KV cache (the prefill); each further token is a forward of the single
        new token, whose query attends to the whole cache. temperature 0 picks the most likely token (greedy);
        otherwise the logits are divided by temperature, and top_k keeps only the k most likely tokens."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int ≥ 0, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an int ≥ 1 or None, got {top_k!r}")
        if max_new_tokens == 0:
            return idx
        T = idx.shape[1]
        cache = KVCache(len(self.blocks), T + max_new_tokens - 1)  # the last token is sampled, never fed
        h = self.hidden_states(idx, cache, 0)
        out = [idx]
        for step in range(max_new_tokens):
            token = _sample(self.lm_head(h[:, -1]).float(), temperature, top_k, generator)  # (B, 1)
            out.append(token)
            if step + 1 < max_new_tokens:
                h = self.hidden_states(token, cache, T + step)
        return torch.cat(out, dim=1)

    # ------------------------------------------------------------------------------------------ Hugging Face

    @classmethod
    def from_hf(cls, hf_model) -> "GPT":
        """Our model with the weights of a transformers GPT2LMHeadModel or LlamaForCausalLM (copied, in their dtype
        and device), giving the same logits. Dropout, which ours has none of, is left behind."""
        name = type(hf_model).__name__
        if name not in HF_MODELS:
            raise ValueError(f"GPT.from_hf supports {' and '.join(HF_MODELS)}, got {name}")
        config = config_from_hf(hf_model.config)
        theirs = hf_model.state_dict()
        ours = {}
        for key, hf_keys, transposed in _hf_layout(config, HF_MODELS[name]):
            ours[key] = torch.cat([theirs[k].t() if transposed else theirs[k] for k in hf_keys], dim=0)
        if config.tie_embeddings:
            ours["lm_head.weight"] = ours["wte.weight"]
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(ours, assign=True)
        if config.tie_embeddings:  # assign=True gave the head a Parameter of its own: share the embedding's again
            model.lm_head.weight = model.wte.weight
        return model

    def to_hf(self, attn_implementation: str = "sdpa"):
        """A transformers GPT2LMHeadModel or LlamaForCausalLM with this model's weights (copied), on its device and
        in its dtype. The config must be one of the two families exactly (see hf_config)."""
        import transformers

        model_type, their_config = hf_config(self.config)
        param = self.wte.weight
        with torch.device(param.device):
            hf = transformers.AutoModelForCausalLM.from_config(their_config, attn_implementation=attn_implementation,
                                                               dtype=param.dtype)
        theirs = hf.state_dict()
        ours = self.state_dict()
        with torch.no_grad():
            for key, hf_keys, transposed in _hf_layout(self.config, model_type):
                sizes = [theirs[k].shape[1] if transposed else theirs[k].shape[0] for k in hf_keys]
                for k, part in zip(hf_keys, ours[key].split(sizes, dim=0)):
                    theirs[k].copy_(part.t() if transposed else part)
        return hf


def _sample(logits, temperature, top_k, generator):
    """One token per row of logits (B, V) → (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


# ---------------------------------------------------------------------------------------------- HF conversion


def _hf_layout(config: GPTConfig, model_type: str) -> list:
    """[(our parameter, [Hugging Face parameters], transposed)]: our tensor is theirs concatenated along dim 0, each
    transposed first where `transposed` (GPT-2's Conv1D weights, stored (in, out))."""
    layout = []

    def add(ours, theirs, transposed=False):
        layout.append((ours, theirs if isinstance(theirs, list) else [theirs], transposed))

    if model_type == "gpt2":
        add("wte.weight", "transformer.wte.weight")
        add("wpe.weight", "transformer.wpe.weight")
        for i in range(config.n_layer):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b, conv1d in (("norm_1", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                                 ("attn.proj", "attn.c_proj", True), ("norm_2", "ln_2", False),
                                 ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)):
                add(f"{ours}{a}.weight", f"{theirs}{b}.weight", conv1d)
                add(f"{ours}{a}.bias", f"{theirs}{b}.bias")
        add("norm_f.weight", "transformer.ln_f.weight")
        add("norm_f.bias", "transformer.ln_f.bias")
    else:
        add("wte.weight", "model.embed_tokens.weight")
        for i in range(config.n_layer):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            add(f"{ours}norm_1.weight", f"{theirs}input_layernorm.weight")
            add(f"{ours}norm_2.weight", f"{theirs}post_attention_layernorm.weight")
            linears = (("attn.qkv", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                       ("attn.proj", ["self_attn.o_proj"]), ("mlp.fc", ["mlp.gate_proj", "mlp.up_proj"]),
                       ("mlp.proj", ["mlp.down_proj"]))
            for a, bs in linears:
                add(f"{ours}{a}.weight", [f"{theirs}{b}.weight" for b in bs])
                if config.bias:
                    add(f"{ours}{a}.bias", [f"{theirs}{b}.bias" for b in bs])
        add("norm_f.weight", "model.norm.weight")
    if not config.tie_embeddings:
        add("lm_head.weight", "lm_head.weight")
    return layout


def config_from_hf(hf_config) -> GPTConfig:
    """Our config for a transformers GPT2Config or LlamaConfig; ValueError for what our model does not do."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "gpt2":
        unsupported = {
            "activation_function": hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"),
            "scale_attn_by_inverse_layer_idx": hf_config.scale_attn_by_inverse_layer_idx,
            "scale_attn_weights": not hf_config.scale_attn_weights,
            "add_cross_attention": hf_config.add_cross_attention,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"GPT.from_hf: GPT-2 settings it does not model: {', '.join(bad)}")
        return GPTConfig(vocab_size=hf_config.vocab_size, block_size=hf_config.n_positions,
                         n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd,
                         intermediate_size=hf_config.n_inner or 4 * hf_config.n_embd, norm="layernorm", mlp="gelu",
                         pos="learned", bias=True, tie_embeddings=hf_config.tie_word_embeddings,
                         eps=hf_config.layer_norm_epsilon)
    if model_type == "llama":
        if hf_config.hidden_act != "silu":
            raise ValueError(f"GPT.from_hf: Llama with hidden_act {hf_config.hidden_act!r} (SwiGLU needs 'silu')")
        if bool(hf_config.attention_bias) != bool(hf_config.mlp_bias):
            raise ValueError("GPT.from_hf: Llama with attention_bias != mlp_bias (our `bias` covers both)")
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"GPT.from_hf: rope_type {rope_type!r} (supported: 'default', 'llama3')")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("GPT.from_hf: partial rotary embeddings are not supported")
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        scaling = {k: rope[k] for k in LLAMA3_SCALING_KEYS} if rope_type == "llama3" else None
        return GPTConfig(vocab_size=hf_config.vocab_size, block_size=hf_config.max_position_embeddings,
                         n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads,
                         n_kv_head=hf_config.num_key_value_heads, n_embd=hf_config.hidden_size,
                         head_dim=hf_config.head_dim, intermediate_size=hf_config.intermediate_size, norm="rmsnorm",
                         mlp="swiglu", pos="rope", bias=bool(hf_config.attention_bias),
                         tie_embeddings=hf_config.tie_word_embeddings, eps=hf_config.rms_norm_eps,
                         rope_theta=float(theta), rope_scaling=scaling)
    raise ValueError(f"GPT.from_hf supports Hugging Face model types 'gpt2' (GPT2LMHeadModel) and 'llama' "
                     f"(LlamaForCausalLM), got {model_type!r}")


def hf_config(config: GPTConfig) -> tuple:
    """(model_type, transformers config) for our config, which must be the GPT-2 or the Llama family exactly."""
    import transformers

    gpt2 = (config.norm, config.mlp, config.pos) == ("layernorm", "gelu", "learned")
    llama = (config.norm, config.mlp, config.pos) == ("rmsnorm", "swiglu", "rope")
    if gpt2 and config.bias and config.n_kv_head == config.n_head and config.head_dim * config.n_head == config.n_embd:
        return "gpt2", transformers.GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=config.n_head, n_inner=config.intermediate_size,
            activation_function="gelu_new", layer_norm_epsilon=config.eps, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, tie_word_embeddings=config.tie_embeddings, bos_token_id=None, eos_token_id=None)
    if llama:
        rope = {"rope_type": "default", "rope_theta": config.rope_theta}
        if config.rope_scaling is not None:
            rope.update(rope_type="llama3", **{k: config.rope_scaling[k] for k in LLAMA3_SCALING_KEYS})
        return "llama", transformers.LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
            num_key_value_heads=config.n_kv_head, head_dim=config.head_dim,
            max_position_embeddings=config.block_size, rms_norm_eps=config.eps, rope_parameters=rope,
            tie_word_embeddings=config.tie_embeddings, attention_bias=config.bias, mlp_bias=config.bias,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
    raise ValueError("to_hf: the config is neither the GPT-2 family (layernorm, gelu, learned positions, biases, "
                     "no GQA) nor the Llama family (rmsnorm, swiglu, rope)")
