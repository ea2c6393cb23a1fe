"""Integrations with other libraries. Each is imported lazily: `import fastlm` never imports them.

- `hf`: `fastlm.patch(model)` / `fastlm.unpatch(model)` for Hugging Face transformers models.
"""

from fastlm.integrations.hf import patch, unpatch

__all__ = ["patch", "unpatch"]
