"""The split merge of the Mosaic GPU decode kernel's partials, as one Pallas (Triton) launch.

`decode_mgpu` splits the KV length over programs when B*Hkv leaves SMs idle. Each split
writes fp32 partials of its 8-row box of query rows: vecs [B, Hkv, ns, nv, 8] (m in the
log2 domain, d1(, d2)) and mats [B, Hkv, ns, nm, 8, D] (O1(, O2hi, O2lo)). This launch
merges them exactly and writes o [B, Hq, D] itself, only the G = Hq/Hkv rows of each
(b, h): no gather after it.

Why a launch of its own: XLA compiles the same merge (`decode_mgpu._merge`) to two fusions
that took 6.1 us of an H100's 13.9-us step at 16 splits (GQA 4, D 128, B 1, L 4k), growing
by ~0.17 us a split, where the decode kernel itself took 7.9 (bench/NOTES.md); the in-kernel
cluster merge lost. Here a program takes U splits' partials per iteration, every load
issued before the arithmetic, so a group costs about one L2 latency; programs are (KV head,
batch, D chunk), so even B = 1 spreads the bytes (16 splits x 4 rows x 128 x 3 x 4 B =
96 KB a KV head) over tens of SMs. Measured on an H100 with 32 columns a program (32
programs at B = 1, Hkv = 8): 3.55 us at G = 4 and 5.39 at G = 8, growing with each
program's bytes, so the chunk is a knob (`columns`, DecodeConfig.merge_columns).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import balanced, compiler_params

BOX = 8            # query rows per box of the Mosaic kernel's partials
D_CHUNK = 32       # default columns of o per program (a 128-byte fp32 row segment)
MERGE_REGS = 192   # fp32 registers per thread for one group's loads in flight


def group_splits(num_splits: int, rows: int, cols: int, num_mats: int, num_vecs: int,
                 threads: int) -> int:
  """Splits loaded per iteration: the largest divisor of num_splits whose partials ([rows,
  cols] tiles of each matrix, and the row vectors) fit MERGE_REGS registers a thread."""
  per_split = num_mats * -(-rows * cols // threads) + num_vecs
  fit = max(1, MERGE_REGS // per_split)
  return max(u for u in range(1, num_splits + 1) if num_splits % u == 0 and u <= fit)


def _kernel(vec_ref, mat_ref, o_ref, *, num_heads, group, num_splits, has_r, per_iter):
  """o rows of (b, h), columns of this D chunk, from every split's partials."""
  h, b = pl.program_id(0), pl.program_id(1)
  rows = pl.ds(lax.rem(b * num_heads + h * group, BOX), group)   # (b, h)'s rows in its box

  def load(sp):
    vec = lambda i: vec_ref[sp, i, rows]                              # [G]
    mat = lambda i: mat_ref[sp, i, rows, :]                           # [G, DC]
    # O2 = O2hi + O2lo in fp32 (two halves of P2 on the tensor cores)
    return (vec(0), vec(1), vec(2) if has_r else None, mat(0),
            mat(1) + mat(2) if has_r else None)

  def step(i, carry):
    m0, *sums = carry
    parts = [load(i * per_iter + u) for u in range(per_iter)]
    m = jnp.maximum(m0, balanced(jnp.maximum, [p[0] for p in parts]))
    m_use = jnp.where(m == -jnp.inf, 0.0, m)          # no key so far: every weight 0
    ws = [jnp.exp2(m0 - m_use)] + [jnp.exp2(p[0] - m_use) for p in parts]
    vals = [[acc] + [p[k] for p in parts] for k, acc in enumerate(sums, 1)]
    col = lambda w, x: w if x.ndim == 1 else w[:, None]
    return (m, *(None if xs[0] is None else balanced(jnp.add, [col(w, x) * x for w, x in
                                                               zip(ws, xs)]) for xs in vals))

  G, DC = o_ref.shape
  zv, zm = jnp.zeros((G,), jnp.float32), jnp.zeros((G, DC), jnp.float32)
  init = (zv - jnp.inf, zv, zv if has_r else None, zm, zm if has_r else None)
  _, d1, d2, o1, o2 = lax.fori_loop(0, num_splits // per_iter, step, init)
  ok = (d1 > 0.0)[:, None]
  safe = jnp.where(ok, d1[:, None], 1.0)
  o = o1 / safe if o2 is None else (1.0 + d2[:, None] / safe) * o1 / safe - o2 / safe
  o_ref[...] = jnp.where(ok, o, 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_heads", "has_r", "out_dtype", "interpret",
                                             "columns"))
def merge_partials(vecs, mats, *, num_heads: int, has_r: bool, out_dtype, interpret=False,
                   columns: int = D_CHUNK):
  """o [B, Hq, D] (out_dtype) from the split partials of `decode_mgpu._decode`: the same
  math as `decode_mgpu._merge` (rows with no key: 0). columns: o's columns a program merges
  (fewer: more programs, fewer bytes each)."""
  B, Hkv, ns, nv, box = vecs.shape
  nm, D = mats.shape[3], mats.shape[-1]
  if box != BOX or mats.shape[:3] != (B, Hkv, ns) or nv != (3 if has_r else 2) or \
      nm != (3 if has_r else 1) or num_heads % Hkv:
    raise ValueError(f"merge_partials: bad partials vecs {vecs.shape} mats {mats.shape} for "
                     f"num_heads={num_heads}, has_r={has_r}")
  if columns < 8 or columns & (columns - 1):
    raise ValueError(f"merge_partials: columns={columns} must be a power of two >= 8")
  G = num_heads // Hkv
  dc = min(D, columns)
  num_warps = max(1, min(4, G * dc // 64))           # ~2 values of a [G, 32] tile a thread
  per_iter = group_splits(ns, G, dc, nm, nv, 32 * num_warps)   # O2hi, O2lo loaded apart
  kernel = functools.partial(_kernel, num_heads=num_heads, group=G, num_splits=ns,
                             has_r=has_r, per_iter=per_iter)
  return pl.pallas_call(
      kernel, grid=(Hkv, B, D // dc),
      in_specs=[pl.BlockSpec((None, None, ns, nv, BOX), lambda h, b, c: (b, h, 0, 0, 0)),
                pl.BlockSpec((None, None, ns, nm, BOX, dc),
                             lambda h, b, c: (b, h, 0, 0, 0, c))],
      out_specs=pl.BlockSpec((None, G, dc), lambda h, b, c: (b, h, c)),
      out_shape=jax.ShapeDtypeStruct((B, num_heads, D), out_dtype),
      compiler_params=compiler_params(num_warps, 1), interpret=interpret,
      name="decode_split_merge",
  )(vecs, mats)
