"""Pallas GPU kernels for parallax_jax (fused Parallax / softmax attention, training)."""
from pallas_kernels.parallax_triton import BlockSizes
from pallas_kernels.parallax_triton import default_block_sizes
from pallas_kernels.parallax_triton import is_supported
from pallas_kernels.parallax_triton import parallax_flash_attention

__all__ = ["BlockSizes", "default_block_sizes", "is_supported", "parallax_flash_attention"]
