"""parallax-jax: Parallax attention and the Local Linear Attention family in JAX."""
from parallax_jax.api import (
    AFFINES,
    DECODE_IMPLEMENTATIONS,
    IMPLEMENTATIONS,
    MEMBERS,
    PROBES,
    attention,
    chosen_implementation,
    decode_attention,
    linear_attention,
    lla_attention,
    member,
    parallax_attention,
    softmax_attention,
)
from parallax_jax.chunked import BlockSizes
from parallax_jax import diagnostics

__version__ = "0.1.0"

__all__ = [
    "AFFINES", "DECODE_IMPLEMENTATIONS", "IMPLEMENTATIONS", "diagnostics", "MEMBERS", "PROBES",
    "BlockSizes", "attention", "chosen_implementation", "decode_attention", "linear_attention",
    "lla_attention", "member", "parallax_attention", "softmax_attention",
]
