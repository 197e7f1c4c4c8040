"""Pallas GPU kernels for parallax_jax: fused Parallax / softmax attention for training, and
split-KV decode.

Entry points: `attention.parallax_flash_attention` (training; it picks the Mosaic GPU or the
Triton forward, or interpret mode) and `decode_triton.parallax_decode`. The kernel modules,
`attention_triton`, `attention_mgpu`, `decode_triton`, `decode_mgpu` and `decode_mgpu_merge`,
import only `common`, which imports no kernel, except that `decode_mgpu` calls its own split
merge launch (`decode_mgpu_merge`, a Triton kernel in a file of its own).
"""
from pallas_kernels.attention import is_supported
from pallas_kernels.attention import parallax_flash_attention
from pallas_kernels.attention_triton import BlockSizes
from pallas_kernels.attention_triton import default_block_sizes
from pallas_kernels.decode_triton import default_launch
from pallas_kernels.decode_triton import default_num_splits
from pallas_kernels.decode_triton import init_arrivals
from pallas_kernels.decode_triton import parallax_decode
from pallas_kernels.decode_triton import reference_decode

__all__ = ["BlockSizes", "default_block_sizes", "default_launch", "default_num_splits",
           "init_arrivals", "is_supported", "parallax_decode", "parallax_flash_attention",
           "reference_decode"]
