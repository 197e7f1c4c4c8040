"""Pieces the kernel modules share: constants, small array helpers, the non-finite helpers,
the compact grid of the fixup launches, the fp16 V conversion, the Hopper check, the SM count,
the Mosaic GPU kernels' input checks and warp-specialised pipeline pieces, and the split-KV
and segment-range tiling.

This module imports no kernel module: each kernel module imports only this one (and jax), and
the fronts (`attention`, the package) import the kernels.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltriton

LOG2E = math.log2(math.e)
NEG_INF = -1e30  # finite "minus infinity" for masked logits (keeps exp2(m_old - m_new) finite)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
NUM_SMS = 132  # H100 SXM
SMEM_LIMIT = 232448 - 4096  # H100 max dynamic SMEM per block, minus barriers and slack


# ----------------------------------------------------------------------------- shapes


def next_pow2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def balanced(op, xs):
  """op over xs as a balanced tree: log2(len) dependent steps, not len - 1."""
  while len(xs) > 1:
    xs = [op(a, b) for a, b in zip(xs[::2], xs[1::2])] + xs[len(xs) - len(xs) % 2:]
  return xs[0]


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


# ----------------------------------------------------------------------------- fixup launches
#
# A fixup launch (attention_triton) repairs the few programs of a fast launch that marked
# their result as not finite. Launched over the fast launch's grid it costs a program per
# grid point even on clean inputs (7-14 us at 512-2048 points on an H100: each program is
# scheduled at the careful kernel's occupancy only to read its mark). On the compact grid
# each program reads a chunk of marks with one load and returns unless one is set; only then
# does it visit the chunk's grid points, each seeing its blocks through `BlockView`s.


class BlockView:
  """A whole-array ref seen as the block a BlockSpec gives grid point (block_shape, block
  indices): each access composes into one indexer on the whole array (the Triton lowering
  takes one indexer per access, so a `ref.at[...]` view could not be indexed again)."""

  def __init__(self, ref, block_shape, block_idx):
    self.ref, self.dtype = ref, ref.dtype
    self.shape = tuple(n for n in block_shape if n is not None)
    # per dim of the whole array: (first element, block size; None: squeezed)
    self._dims = [(i, None) if n is None else (i * n, n) for i, n in zip(block_idx, block_shape)]

  def _indexer(self, idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    if Ellipsis in idx:
      e = idx.index(Ellipsis)
      idx = idx[:e] + (slice(None),) * (len(self.shape) - len(idx) + 1) + idx[e + 1:]
    idx = iter(idx + (slice(None),) * (len(self.shape) - len(idx)))
    out = []
    for start, n in self._dims:
      if n is None:
        out.append(start)
        continue
      x = next(idx)
      if isinstance(x, slice):
        if x != slice(None):
          raise NotImplementedError(f"BlockView: slice {x}; use pl.ds")
        out.append(pl.ds(start, n))
      elif isinstance(x, pl.Slice):
        out.append(pl.ds(start + x.start, x.size))
      else:
        out.append(start + x)
    return tuple(out)

  def __getitem__(self, idx):
    return self.ref[self._indexer(idx)]

  def __setitem__(self, idx, value):
    self.ref[self._indexer(idx)] = value


def fixup_chunk(tiles: int, points: int) -> int:
  """Grid points a compact program covers: a power of two dividing `tiles` (a chunk stays in
  one (b, h) row of the marks), near points / NUM_SMS (one wave of programs)."""
  c = 1
  while 2 * c <= points // NUM_SMS and tiles % (2 * c) == 0:
    c *= 2
  return c


def compact_fixup_call(kernel, args, *, grid, in_specs, out_specs, out_shape, mark,
                       tile_index, input_output_aliases, compiler_params, interpret, name):
  """`pl.pallas_call(kernel, grid=grid, in_specs, out_specs, ...)(*args)` of a fixup kernel
  on the compact grid: one program per chunk of marks, the kernel called (pids=(i, h)) only
  at the grid points (i, b, h) of a chunk that holds a mark; it checks its own mark again.

  grid: (tiles, B, H), the fast launch's. mark: (position of the marks among the kernel's
  refs, inputs then outputs; rows per mark: 1 for one f32 flag per point, > 0 when marked,
  or the row count of an lse block, NaN on a marked row); the marks are [B, H, tiles * rows].
  tile_index(t): the grid index i of the marks' tile t (the kernels' tile orders are their
  own inverses)."""
  tiles, nb, nh = grid
  c = fixup_chunk(tiles, tiles * nb * nh)
  pos, rows = mark
  specs = list(in_specs) + list(out_specs)
  whole = lambda x: None if x is None else pl.BlockSpec(x.shape,
                                                       lambda p, n=len(x.shape): (0,) * n)

  def compact(*refs):
    p = pl.program_id(0)
    bh, t0 = p // (tiles // c), (p % (tiles // c)) * c
    b, h = bh // nh, bh % nh
    chunk = refs[pos][b, h, pl.ds(t0 * rows, c * rows)]
    hit = jnp.isnan(chunk) if rows > 1 else chunk > 0.0

    def visit(j, carry):
      i = tile_index(t0 + j)
      views = [None if r is None else BlockView(r, spec.block_shape, spec.index_map(i, b, h))
               for r, spec in zip(refs, specs)]
      kernel(*views, pids=(i, h))
      return carry

    @pl.when(jnp.max(jnp.where(hit, 1.0, 0.0)) > 0.0)
    def _():
      lax.fori_loop(0, c, visit, jnp.int32(0))

  return pl.pallas_call(
      compact, grid=(tiles * nb * nh // c,),
      in_specs=[whole(a) for a in args], out_specs=[whole(o) for o in out_shape],
      out_shape=out_shape, input_output_aliases=input_output_aliases,
      compiler_params=compiler_params, interpret=interpret, name=name)(*args)


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


# ----------------------------------------------------------------------------- Mosaic GPU inputs

MGPU_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MGPU_HEAD_DIMS = (64, 128)
# Warp-specialised kernels (two consumer warpgroups, one producer): consumer register cap ->
# producer cap, 2 * 128 * consumer + 128 * producer = 168 * 384 (the launch's even split of
# the 64K register file, rounded to 8)
MGPU_PRODUCER_REGISTERS = {232: 40, 240: 24}


def check_mgpu_pipeline(num_stages: int, consumer_registers: int):
  """ValueError unless a warp-specialised kernel's ring depth and register cap are valid."""
  if num_stages < 2:
    raise ValueError(f"num_stages={num_stages} must be >= 2")
  if consumer_registers not in MGPU_PRODUCER_REGISTERS:
    raise ValueError(f"consumer_registers={consumer_registers} must be one of "
                     f"{sorted(MGPU_PRODUCER_REGISTERS)}")


@dataclasses.dataclass(frozen=True)
class MgpuBwdConfig:
  """What the configs of the Mosaic GPU backward kernels share (each adds its streamed tile).

  num_stages: depth of the SMEM ring the producer fills (>= 2).
  consumer_registers: per-thread register cap of the consumer warpgroups (232 or 240).
  split_scores: Parallax only: issue the two products that form a and c (of K with Q and
    R), form a and c, then issue the third (of V with dO), so two fp32 score tiles are live
    at a time instead of three (32 fewer registers per thread at 64 columns; the third
    product no longer overlaps the first two's math).
  """
  num_stages: int = 2
  consumer_registers: int = 240
  split_scores: bool = False

  def __post_init__(self):
    check_mgpu_pipeline(self.num_stages, self.consumer_registers)


def check_mgpu_bwd_call(name: str, supported: tuple[bool, str], r, tbar, gbar):
  """ValueError unless a Mosaic GPU backward kernel supports the call and has the residuals
  Parallax needs."""
  ok, why = supported
  if not ok:
    raise ValueError(f"{name}: unsupported inputs: {why}")
  if r is not None and (tbar is None or gbar is None):
    raise ValueError(f"{name}: r needs tbar and gbar")


def mgpu_inputs_ok(q, k, v, r, window, q_segment_ids, kv_segment_ids) -> tuple[bool, str]:
  """The input checks the Mosaic GPU training kernels share (their tile constraints aside):
  (True, "") or (False, reason). Arrays or ShapeDtypeStructs."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    return False, "expected [B, L, H, D] inputs"
  B, T, Hq, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  if v.shape != k.shape or k.shape[0] != B or k.shape[3] != D:
    return False, f"k and v must be [B, S, Hkv, {D}]"
  if r is not None and r.shape != q.shape:
    return False, "r must have q's shape"
  dts = {jnp.dtype(x.dtype) for x in (q, k, v) + (() if r is None else (r,))}
  if len(dts) != 1 or next(iter(dts)) not in MGPU_DTYPES:
    return False, f"dtypes {dts}: need one of bfloat16/float16"
  if D not in MGPU_HEAD_DIMS:
    return False, f"head_dim {D} not in {MGPU_HEAD_DIMS}"
  if Hq % Hkv:
    return False, "Hq must be a multiple of Hkv"
  if window is not None:
    return False, "window masks are not implemented"
  if (q_segment_ids is None) != (kv_segment_ids is None):
    return False, "give both q_segment_ids and kv_segment_ids, or neither"
  if q_segment_ids is not None:
    if q_segment_ids.shape != (B, T) or kv_segment_ids.shape != (B, S):
      return False, f"segment ids must be [B, T] and [B, S] = {(B, T)}, {(B, S)}"
    if any(jnp.dtype(x.dtype) != jnp.int32 for x in (q_segment_ids, kv_segment_ids)):
      return False, "segment ids must be int32"
  return True, ""


def mgpu_call_ok(q, k, v, r, window, q_segment_ids, kv_segment_ids, causal: bool,
                 tiles) -> tuple[bool, str]:
  """The checks a Mosaic GPU training kernel's `supported` makes before the platform's: the
  shared input checks (`mgpu_inputs_ok`), then its tiles: tiles(head_dim) -> (cfg, t_tile,
  s_tile, smem bytes of cfg's buffers), with T a multiple of t_tile and S of s_tile ((size,
  how the reason names it) pairs), the buffers within SMEM_LIMIT and T <= S under a causal
  mask."""
  ok, why = mgpu_inputs_ok(q, k, v, r, window, q_segment_ids, kv_segment_ids)
  if not ok:
    return ok, why
  T, D, S = q.shape[1], q.shape[3], k.shape[1]
  cfg, t_tile, s_tile, smem = tiles(D)
  for name, n, (size, label) in (("T", T, t_tile), ("S", S, s_tile)):
    if n % size:
      return False, f"{name}={n} is not a multiple of {label}"
  if smem > SMEM_LIMIT:
    return False, f"{cfg} needs more SMEM than {SMEM_LIMIT} bytes"
  if causal and T > S:
    return False, "causal with T > S (rows without keys) is not implemented"
  return True, ""


def mgpu_bwd_rows(lse, delta, tbar, gbar, scale, n_heads: int, width: int):
  """The Mosaic GPU backward kernels' row and head inputs: rows [B, Hq, n, T] f32 = lse,
  delta (, 1 + tbar, gbar when tbar is given) and params [Hq, 2, width] f32 = scale * log2e,
  scale per head (scale: float, scalar or [Hq]; width: a TMA-sized row)."""
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (n_heads,))
  vecs = (lse, delta) + ((1.0 + tbar, gbar) if tbar is not None else ())
  rows = jnp.stack([x.astype(jnp.float32) for x in vecs], axis=2)
  params = jnp.broadcast_to(jnp.stack([scale * LOG2E, scale], axis=1)[:, :, None],
                            (n_heads, 2, width))
  return rows, params


# ----------------------------------------------------------------------------- warp-specialised
# The pieces of the Mosaic GPU backward kernels' pipeline: two consumer warpgroups, each with
# its own range of tiles, and a producer streaming the union of the two through a ring.


def wgmma_smem(shape, dtype):
  """An SMEM buffer in the layout wgmma operands and TMA copies of 2-byte tiles use:
  (8, 64) tiles, 128-byte swizzle."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                              plgpu.SwizzleTransform(128)))


def cta_tile_range(ranges):
  """[lo, hi) of the union of the two consumers' (lo, full, hi) ranges; an empty range adds
  nothing (both empty: [0, 0))."""
  (lo0, _, hi0), (lo1, _, hi1) = ranges
  e0, e1 = hi0 <= lo0, hi1 <= lo1
  lo = jnp.where(e0, jnp.where(e1, 0, lo1), jnp.where(e1, lo0, jnp.minimum(lo0, lo1)))
  hi = jnp.where(e0, jnp.where(e1, 0, hi1), jnp.where(e1, hi0, jnp.maximum(hi0, hi1)))
  return lo, hi


def clamp_tile_range(lo, full, hi, lo_bound, hi_bound):
  """A consumer's (lo, full, hi) tile range inside [lo_bound, hi_bound): the tiles its
  segment ids allow, or the CTA's range (so the tiles it skips are exactly the CTA's
  others). A range left empty is (x, x, x) for some x in the bounds."""
  lo = jnp.minimum(jnp.maximum(lo, lo_bound), hi_bound)
  hi = jnp.minimum(jnp.maximum(hi, lo), hi_bound)
  return lo, jnp.minimum(jnp.maximum(full, lo), hi), hi


def wgmma_scores(acc_type, *pairs, inits=None, interpret=False):
  """x y^T of each (x, y) pair of SMEM tiles on the tensor cores, issued together into fresh
  accumulators of `acc_type` (a plgpu.ACC); their values. inits: a starting value per
  accumulator (WGMMA-layout arrays), so the products add to them: a term folded into the
  accumulator needs no registers of its own after the issue (the interpreter, which has no
  pl.run_state, adds it after)."""
  def issue_into(accs):
    for acc, (x, y) in zip(accs, pairs):
      plgpu.wgmma(acc, x, y.transpose((1, 0)))

  def fresh(*accs):
    issue_into(accs)
    return tuple(acc[...] for acc in accs)

  if inits is None or interpret:
    vals = pl.run_scoped(fresh, *((acc_type,) * len(pairs)))
    return vals if inits is None else tuple(v + i for v, i in zip(vals, inits))
  return tuple(pl.run_state(issue_into)(tuple(plgpu.ACC.init(i) for i in inits)))


def producer_ring(steps, stages: int, load, free):
  """A producer warpgroup's loop: `load(step, slot)` for the first `stages` steps, then each
  later step into the slot its consumers released (`free`: a barrier per slot), and last a
  wait on the final releases too (the interpreter checks every barrier phase)."""
  slot_of = lambda step: lax.rem(step, jnp.array(stages, step.dtype))
  for i in range(stages):
    pl.when(i < steps)(lambda i=i: load(i, i))

  @pl.loop(0, jnp.maximum(steps - stages, 0))
  def _(step):
    plgpu.barrier_wait(free.at[slot_of(step)])
    load(step + stages, slot_of(step))

  @pl.loop(jnp.maximum(steps - stages, 0), steps)
  def _(step):
    plgpu.barrier_wait(free.at[slot_of(step)])


def launch_warp_specialized(entry, args, *, out_type, grid, grid_names, consumers: int,
                            producer: bool, interpret=None):
  """plgpu.kernel of `entry` over `grid` with `consumers` warpgroups (and a producer one),
  called on the args that are not None."""
  return plgpu.kernel(
      entry, out_type=out_type, grid=grid, grid_names=grid_names,
      num_threads=consumers + int(producer), thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret,
  )(*[a for a in args if a is not None])


# ----------------------------------------------------------------------------- segment ids


def cdiv(a, b: int):
  """ceil(a / b) for a >= 0 (a may be traced)."""
  return lax.div(a + (b - 1), b)


def seg_ranges(rows, cols, n_rows: int, n_cols: int, b_rows: int, b_cols: int):
  """Column-tile ranges segment ids allow, per row tile: int32 [B, rows tiles, 4] =
  (lo, mid_lo, mid_hi, hi) as `attention_triton._kv_tiles`, intersected with the geometric
  ranges in the kernels (`attention_triton._with_seg_ranges`, `attention_mgpu_dkv`). rows [B, Rp],
  cols [B, Cp]: padded ids, n_rows / n_cols real.

  Packed rows hold non-decreasing ids, so the columns whose id falls in a row tile's id span
  are one run [a, b): tiles outside it are skipped, tiles inside it need no segment mask
  when the row tile holds a single id. Rows whose real ids are not sorted get every column
  tile, all masked. Computed in XLA once per call ([B, tiles, n_cols] compares).
  """
  big = jnp.int32(jnp.iinfo(jnp.int32).max)
  r, c = rows[:, :n_rows], cols[:, :n_cols]
  ok = (jnp.all(r[:, 1:] >= r[:, :-1], axis=1) & jnp.all(c[:, 1:] >= c[:, :-1], axis=1))
  B, Rp = rows.shape
  nt, nc = Rp // b_rows, cols.shape[1] // b_cols
  real = (jnp.arange(Rp) < n_rows).reshape(nt, b_rows)
  tiles = rows.reshape(B, nt, b_rows)
  tmin = jnp.min(jnp.where(real, tiles, big), axis=2)
  tmax = jnp.max(jnp.where(real, tiles, -big), axis=2)
  a = jnp.sum(c[:, None, :] < tmin[:, :, None], axis=2, dtype=jnp.int32)
  b = jnp.sum(c[:, None, :] <= tmax[:, :, None], axis=2, dtype=jnp.int32)
  lo, hi = a // b_cols, cdiv(b, b_cols)
  one = tmin == tmax
  mid_lo = jnp.where(one, cdiv(a, b_cols), lo)
  mid_hi = jnp.where(one, b // b_cols, lo)
  okb = ok[:, None]
  out = [jnp.where(okb, lo, 0), jnp.where(okb, mid_lo, 0), jnp.where(okb, mid_hi, 0),
         jnp.where(okb, hi, nc)]
  return jnp.stack(out, axis=-1).astype(jnp.int32)
