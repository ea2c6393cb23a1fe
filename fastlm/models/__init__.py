"""Reference models built on fastlm's ops: `GPT` covers the GPT-2 and Llama families (see fastlm.models.gpt)."""

from fastlm.models.gpt import GPT, GPTConfig, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache"]
