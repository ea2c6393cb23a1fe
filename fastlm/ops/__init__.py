"""The public ops: one module per op family (argument checks, backend dispatch, torch.library registration,
autograd). Nothing below this layer knows about autograd or dispatch."""

from fastlm.ops.attention import attention, scaled_dot_product_attention
from fastlm.ops.cross_entropy import cross_entropy, linear_cross_entropy
from fastlm.ops.gated import geglu, swiglu
from fastlm.ops.norm import layer_norm, rms_norm
from fastlm.ops.rotary import rotary_embedding

__all__ = ["attention", "cross_entropy", "geglu", "layer_norm", "linear_cross_entropy", "rms_norm", "rotary_embedding",
           "scaled_dot_product_attention", "swiglu"]
