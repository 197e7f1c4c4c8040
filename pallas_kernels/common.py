"""Pieces the kernel modules share: constants, small array helpers, the non-finite helpers,
the fp16 V conversion, the Hopper check, the SM count and the split-KV chunking.

This module imports no kernel module: each kernel module imports only this one (and jax), and
the fronts (`attention`, the package) import the kernels.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pltriton

LOG2E = math.log2(math.e)
NEG_INF = -1e30  # finite "minus infinity" for masked logits (keeps exp2(m_old - m_new) finite)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
NUM_SMS = 132  # H100 SXM
SMEM_LIMIT = 232448 - 4096  # H100 max dynamic SMEM per block, minus barriers and slack


# ----------------------------------------------------------------------------- shapes


def next_pow2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def pad(x, axis, new, value=0):
  if x is None or x.shape[axis] == new:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, new - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def split_chunk(s_max: int, num_splits: int, block_kv: int) -> tuple[int, int]:
  """(keys per split, splits launched): each split covers whole tiles, so the count can drop
  (L=4k, 64-key tiles: 33 asked -> chunks of 128 -> 32 launched)."""
  chunk = round_up(-(-s_max // num_splits), block_kv)
  return chunk, -(-s_max // chunk)


# ----------------------------------------------------------------------------- Triton


def dot(a, b, trans_b=False):
  """a @ b (or a @ b.T) with fp32 accumulation. fp32 inputs follow
  `jax_default_matmul_precision` like an XLA dot: the default lowers to TF32, 'highest' (as
  the tests set it) to an IEEE fp32 dot. Every kernel casts its operands to the input dtype,
  so only all-fp32 calls reach this case."""
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def iota(n, axis, ndim=2):
  shape = [1] * ndim
  shape[axis] = n
  return lax.broadcasted_iota(jnp.int32, tuple(shape), axis)


def compiler_params(num_warps, num_stages):
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def rewrite(cfg_interpret: bool, write, compute):
  """write(compute()) over what the fast pass wrote: a barrier first, so every thread's
  earlier stores land before any thread's new ones (the two stores of an element may come
  from different threads)."""
  def go():
    if not cfg_interpret:
      pltriton.debug_barrier()
    write(compute())
  return go


# ----------------------------------------------------------------------------- non-finite


def nonfinite(x):
  """1.0 where x is not finite, else 0.0 (f32); reduced with max, which on the GPU ignores
  NaN operands (maxnumf), so the indicator, never x itself, is what gets reduced."""
  return jnp.where(jnp.isfinite(x), 0.0, 1.0)


def finite(x):
  return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def fp16_values(v):
  """v as fp16 scaled by 2^-e (e >= 0) so that max|v| < 2^15, and 2^e (fp32 scalar)."""
  # finite entries only: one NaN or inf must not rescale (and so poison) every value
  vmax = jnp.max(jnp.where(jnp.isfinite(v), jnp.abs(v), 0)).astype(jnp.float32)
  e = jnp.maximum(jnp.floor(jnp.log2(jnp.maximum(vmax, 1e-30))) - 14.0, 0.0)
  return (v.astype(jnp.float32) * jnp.exp2(-e)).astype(jnp.float16), jnp.exp2(e)


# ----------------------------------------------------------------------------- Hopper


def hopper_platform(platform: str | None) -> tuple[bool, str]:
  """(True, "") if Mosaic GPU Hopper kernels can run for `platform`: None checks the default
  device (a CUDA GPU of compute capability 9.x: wgmma is sm_90a only); "cuda"/"gpu" (e.g.
  lowering on an abstract H100) and "interpret" skip the device check."""
  if platform is None:
    try:
      dev = jax.devices()[0]
    except RuntimeError:
      return False, "no device"
    cc = getattr(dev, "compute_capability", None)
    if dev.platform != "gpu" or cc is None or not str(cc).startswith("9."):
      return False, f"needs a Hopper GPU (sm_90), got {dev.platform} {cc}"
    platform = "cuda"
  if platform not in ("cuda", "gpu", "interpret"):
    return False, f"platform {platform!r} is not cuda"
  return True, ""
