"""Flax Linen layers: RMSNorm, RoPE, family attention, SwiGLU MLP, decoder block."""
from parallax_jax.nn.layers import (ACTIVATION_AXES, LOGICAL_AXIS_NAMES, PARAM_AXES, MLP,
                                    Attention, DecoderBlock, Projection, RMSNorm, apply_rope,
                                    logical_axis_rules_example, remat_policy, rope_cos_sin)

__all__ = [
    "ACTIVATION_AXES", "LOGICAL_AXIS_NAMES", "PARAM_AXES", "MLP", "Attention", "DecoderBlock",
    "Projection", "RMSNorm", "apply_rope", "logical_axis_rules_example", "remat_policy",
    "rope_cos_sin",
]
