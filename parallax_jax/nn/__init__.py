"""Flax Linen layers (RMSNorm, RoPE, family attention, SwiGLU MLP, decoder block) and the
chunked LM-head cross-entropy losses."""
from parallax_jax.nn.layers import (ACTIVATION_AXES, LOGICAL_AXIS_NAMES, PARAM_AXES, MLP,
                                    Attention, DecoderBlock, Projection, RMSNorm, apply_rope,
                                    logical_axis_rules_example, remat_policy, rope_cos_sin)
from parallax_jax.nn.losses import chunked_cross_entropy, fused_cross_entropy

__all__ = [
    "ACTIVATION_AXES", "LOGICAL_AXIS_NAMES", "PARAM_AXES", "MLP", "Attention", "DecoderBlock",
    "Projection", "RMSNorm", "apply_rope", "logical_axis_rules_example", "remat_policy",
    "rope_cos_sin", "chunked_cross_entropy", "fused_cross_entropy",
]
