"""Pallas GPU kernels for parallax_jax: fused Parallax / softmax attention for training, and
split-KV decode."""
from pallas_kernels.decode import default_launch
from pallas_kernels.decode import default_num_splits
from pallas_kernels.decode import init_arrivals
from pallas_kernels.decode import parallax_decode
from pallas_kernels.decode import reference_decode
from pallas_kernels.parallax_triton import BlockSizes
from pallas_kernels.parallax_triton import default_block_sizes
from pallas_kernels.parallax_triton import is_supported
from pallas_kernels.parallax_triton import parallax_flash_attention

__all__ = ["BlockSizes", "default_block_sizes", "default_launch", "default_num_splits",
           "init_arrivals", "is_supported", "parallax_decode", "parallax_flash_attention",
           "reference_decode"]
