"""Fused Parallax attention (and softmax attention) through the Pallas Triton lowering.

Math (spec `attention_family.md`, identity 2 and "Backward pass of Parallax"), per q-head and
query row i over its visible keys j:

    S1 = q.k_j * scale      (scale = 1/h; 0 means h = inf, uniform weights)
    S2 = r.k_j              (no scale)
    one running max m over S1;  P1 = exp(S1 - m);  P2 = P1 * S2
    O1 = P1 V, O2 = P2 V, d1 = sum P1, d2 = sum P2
    o  = (1 + d2/d1) O1/d1 - O2/d1          (r = None: o = O1/d1, softmax attention)

Kernels (all stream K/V tiles once per query tile, fp32 accumulation):
  * forward: grid (q tiles, B, Hq); writes o, lse (log2 domain: m*log2e + log2 d1), and for
    Parallax tbar = d2/d1 and vbar = O1/d1.
  * dq/dr kernel: grid (q tiles, B, Hq), loops over K/V tiles; it also computes the backward
    preprocess delta = do.o and gbar = do.vbar for its rows and writes them for dk/dv.
  * dk/dv kernel: grid (kv tiles, B, Hkv), loops over the G q-heads of the GQA group and the
    q tiles, so dk/dv are summed over the group in registers (no repeated K/V in HBM).
Masks: causal is end-aligned (query i sits at position i + S - T); window W keeps keys with
pos - W < j (and j < pos + W without causal); segment ids; rows without keys give 0.
Each K/V (or Q) loop is split into unmasked interior tiles and masked boundary tiles. With
segment ids in packed (sorted) rows the loops also skip tiles of other documents and keep
single-document interior tiles unmasked (`common.seg_ranges`); unsorted ids mask every tile.

T, S are padded to the tile sizes and D to a power of two (>= 16) by the caller
(`attention.parallax_flash_attention`, which calls `fwd_call`, `dq_call` and `dkv_call` with a
`CallConfig`); padded keys are masked, padded query rows are computed and dropped (their
cotangents are zero).

Non-finite values (docs/attention.md): each kernel runs as two launches. The fast launch
computes every program as above and marks those whose result is not finite (forward: lse =
NaN on the row; dq/dr, dk/dv: one f32 flag per program); the fixup launch (on the compact
grid of `common.compact_fixup_call`: a program per chunk of marks) reads the marks before
anything else and reruns only the marked programs carefully, writing over their outputs in
place (aliased in and out). On clean inputs a fixup launch costs one wave of mark reads.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import (LOG2E, NEG_INF, cdiv, compact_fixup_call, compiler_params,
                                   dot, finite, fp16_values, iota, nonfinite, seg_ranges)


# ----------------------------------------------------------------------------- block sizes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and Triton launch parameters of the three kernels (all powers of two >= 16).

  block_q/block_k: forward tiles; *_dq: dq/dr kernel; *_dkv: dk/dv kernel.
  Tiles larger than the (padded) sequence are shrunk automatically.
  """
  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2
  block_q_dq: int = 64
  block_k_dq: int = 32
  num_warps_dq: int = 4
  num_stages_dq: int = 2
  block_q_dkv: int = 32
  block_k_dkv: int = 64
  num_warps_dkv: int = 4
  num_stages_dkv: int = 2
  # Parallax with bf16 inputs: run the forward's P1 V and P2 V products in fp16 (3 more
  # mantissa bits than bf16). The output subtracts O2/d1 from (1 + tbar) vbar, which amplifies
  # the rounding of P2 = P1 * r.k by about std(r.k); with bf16 P2 the max relative error
  # reaches ~1e-2 at D=64 (see bench/NOTES.md). V is converted once outside the kernel, scaled
  # by a power of two so that max|v| < 2^15 (exact; undone on the output); |r.k| must stay
  # below 65504 (fp16 range).
  fp16_p2: bool = True
  # Forward on Hopper through the Mosaic GPU kernel (`attention_mgpu`: TMA, wgmma, two
  # ping-ponged consumer warpgroups) where it supports the call (no window,
  # aligned lengths); else, and in interpret mode, the Triton forward. Same residuals, so the
  # Triton backward is shared. H100, B=4 L=4096 D=128 causal: 1.02 vs 1.18 ms.
  mosaic_forward: bool = True
  # dk/dv on Hopper through the Mosaic GPU kernel (`attention_mgpu_dkv`) where it supports the
  # call, its non-finite marks repaired by the Triton dk/dv fixup launch. Off in a
  # BlockSizes built by hand; the table turns it on for softmax and for Parallax at D=64,
  # where it ran at 1.26-1.44x and 1.34x the Triton kernel's speed on an H100
  # (bench/results/attention_bwd_mgpu.md). Parallax at D=128 keeps the Triton kernel
  # (0.84-1.06x).
  mosaic_dkv: bool = False
  # dq/dr on Hopper through the Mosaic GPU kernel (`attention_mgpu_dq`) where it supports the
  # call (not with a differentiated scale), its non-finite marks repaired by the Triton dq
  # fixup launch. Off by default: on an H100 it ran at 0.51-0.92x the Triton kernel's speed
  # (bench/results/attention_bwd_mgpu.md).
  mosaic_dq: bool = False

  def __post_init__(self):
    for f in ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv"):
      b = getattr(self, f)
      if b < 16 or b & (b - 1):
        raise ValueError(f"BlockSizes.{f}={b} must be a power of two >= 16")


# Heuristic table: (head_dim bucket, parallax?) -> BlockSizes, for Hopper-class GPUs.
# Picked per kernel from the CUPTI block sweeps of `bench/attention.py train` on an H100
# (B=4, L=4096, Hq=16, Hkv=8, causal, bf16; bench/results/attention_train.md, NOTES.md).
# The 256 entries are unmeasured guesses. Override with `block_sizes=`.
_TABLE: dict[tuple[int, bool], BlockSizes] = {
    # fwd 0.47 ms, dq 0.45 ms, dk/dv 0.70 ms (softmax, D=64)
    (64, False): BlockSizes(128, 64, 4, 3, 64, 64, 4, 3, 64, 64, 4, 3, mosaic_dkv=True),
    # fwd 0.73 ms, dq 0.70 ms, dk/dv 1.14 ms (Parallax, D=64)
    (64, True): BlockSizes(128, 128, 8, 3, 64, 64, 4, 3, 64, 64, 4, 3, mosaic_dkv=True),
    # fwd 0.75 ms, dq 0.83 ms, dk/dv 1.19 ms (softmax, D=128)
    (128, False): BlockSizes(128, 64, 8, 3, 128, 64, 8, 3, 32, 64, 4, 3, mosaic_dkv=True),
    # fwd 1.11 ms, dq 1.25 ms, dk/dv 1.85 ms (Parallax, D=128)
    (128, True): BlockSizes(128, 64, 8, 3, 128, 64, 8, 3, 32, 64, 4, 3),
    (256, False): BlockSizes(64, 32, 4, 2, 32, 32, 4, 2, 32, 32, 4, 2),
    (256, True): BlockSizes(64, 32, 4, 2, 32, 32, 4, 2, 32, 32, 4, 2),
}


def default_block_sizes(head_dim: int, parallax: bool = True, dtype=None) -> BlockSizes:
  """Block sizes from the heuristic table for a (padded) head_dim and input dtype.

  The table is tuned for 2-byte inputs; float32 tiles take twice the shared memory (the
  Parallax dq kernel's 128x64 / 3-stage entry asks for 262656 > 232448 bytes on an H100), so
  4-byte inputs get the small default tiles.
  """
  if dtype is not None and jnp.dtype(dtype).itemsize > 2:
    return BlockSizes()
  d = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
  return _TABLE[(d, parallax)]


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class CallConfig:
  """What the kernels of one call take as static: lengths, padding, heads, masks, tiles."""
  T: int  # real query length
  S: int  # real key length
  Tp: int  # padded
  Sp: int
  D: int  # padded head dim
  Hq: int
  Hkv: int
  causal: bool
  window: int | None
  has_r: bool
  has_seg: bool
  need_dscale: bool
  blocks: BlockSizes
  interpret: bool
  fp16_pv: bool = False  # forward PV products in fp16 (bf16 Parallax, see BlockSizes.fp16_p2)
  Dv: int | None = None  # padded value head dim, when it differs from D

  @property
  def DV(self):
    return self.Dv or self.D

  @property
  def G(self):
    return self.Hq // self.Hkv

  @property
  def offset(self):
    return self.S - self.T


def _visible(qi, kj, cfg: CallConfig, qseg=None, kseg=None):
  """Mask for query indices qi and key indices kj (broadcast against each other)."""
  pos = qi + cfg.offset
  m = kj < cfg.S
  if cfg.causal:
    m = m & (kj <= pos)
  if cfg.window is not None:
    m = m & (kj > pos - cfg.window)
    if not cfg.causal:
      m = m & (kj < pos + cfg.window)
  if qseg is not None:
    m = m & (qseg == kseg)
  return m


def _clip(x, lo, hi):
  return jnp.minimum(jnp.maximum(x, lo), hi)


def _kv_tiles(qs, bq: int, bk: int, cfg: CallConfig):
  """K/V tile ranges for query rows [qs, qs + bq).

  Returns (lo, mid_lo, mid_hi, hi): tiles [lo, hi) hold visible keys; tiles in
  [mid_lo, mid_hi) are visible to every row of the tile (no mask needed).
  """
  off, W = cfg.offset, cfg.window
  nk = cfg.Sp // bk
  zero = jnp.int32(0)
  # last visible key (inclusive) over the tile's rows
  if cfg.causal:
    jmax = qs + (bq - 1 + off)
  elif W is not None:
    jmax = qs + (bq - 1 + off + W - 1)
  else:
    jmax = qs * 0 + (cfg.S - 1)
  jmax = jnp.minimum(jmax, cfg.S - 1)
  hi = jnp.minimum(cdiv(jnp.maximum(jmax + 1, zero), bk), nk)
  if W is not None:
    lo = lax.div(jnp.maximum(qs + (off - W + 1), zero), bk)
  else:
    lo = zero
  lo = jnp.minimum(lo, hi)
  # tiles fully visible to all rows (segment ids aside: see `common.seg_ranges`)
  full_hi = qs * 0 + cfg.S // bk
  if cfg.causal:
    full_hi = jnp.minimum(full_hi, lax.div(jnp.maximum(qs + (off + 1), zero), bk))
  elif W is not None:
    full_hi = jnp.minimum(full_hi, lax.div(jnp.maximum(qs + (off + W), zero), bk))
  if W is not None:
    full_lo = cdiv(jnp.maximum(qs + (bq + off - W), zero), bk)
  else:
    full_lo = zero
  mid_lo = _clip(full_lo, lo, hi)
  mid_hi = _clip(full_hi, mid_lo, hi)
  return lo, mid_lo, mid_hi, hi


def _q_tiles(ks, bk: int, bq: int, cfg: CallConfig):
  """Query tile ranges for key rows [ks, ks + bk) (see `_kv_tiles`); rows >= T are skipped."""
  off, W = cfg.offset, cfg.window
  zero = jnp.int32(0)
  if cfg.causal:
    imin = ks - off
  elif W is not None:
    imin = ks - (off + W - 1)
  else:
    imin = ks * 0
  if W is not None:
    ihi = ks + (bk - 1 - off + W)  # exclusive
  else:
    ihi = ks * 0 + cfg.T
  ihi = _clip(ihi, zero, cfg.T)
  hi = cdiv(ihi, bq)
  lo = jnp.minimum(lax.div(jnp.maximum(imin, zero), bq), hi)
  if cfg.causal:
    full_lo = cdiv(jnp.maximum(ks + (bk - 1 - off), zero), bq)
  elif W is not None:
    full_lo = cdiv(jnp.maximum(ks + (bk - off - W), zero), bq)
  else:
    full_lo = zero
  if W is not None:
    full_hi = lax.div(jnp.maximum(ks + (W - off), zero), bq)
  else:
    full_hi = hi
  # a key tile that reaches into the key padding is always masked
  full_hi = jnp.where(ks + bk <= cfg.S, full_hi, zero)
  mid_lo = _clip(full_lo, lo, hi)
  mid_hi = _clip(full_hi, mid_lo, hi)
  return lo, mid_lo, mid_hi, hi


def _loop3(ranges, body, carry):
  """Run body(i, carry, masked) over [lo, mid_lo) masked, [mid_lo, mid_hi) not, [mid_hi, hi)."""
  lo, mid_lo, mid_hi, hi = ranges
  carry = lax.fori_loop(lo, mid_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(mid_lo, mid_hi, functools.partial(body, masked=False), carry)
  carry = lax.fori_loop(mid_hi, hi, functools.partial(body, masked=True), carry)
  return carry


def _with_seg_ranges(ranges, srng_ref):
  """Geometric tile ranges intersected with a `common.seg_ranges` row (None: no segment ids)."""
  if srng_ref is None:
    return ranges
  lo, mid_lo, mid_hi, hi = ranges
  lo = jnp.maximum(lo, srng_ref[0])
  hi = jnp.minimum(hi, srng_ref[3])
  mid_lo = _clip(jnp.maximum(mid_lo, srng_ref[1]), lo, hi)
  mid_hi = _clip(jnp.minimum(mid_hi, srng_ref[2]), mid_lo, hi)
  return lo, mid_lo, mid_hi, hi


@dataclasses.dataclass(frozen=True)
class _QueryTiles:
  """The launch of a kernel with one program per query tile (forward, dq/dr): grid (q tiles,
  B, Hq), the tile order qt, the blocks a program sees (its q rows, its KV head's whole K/V,
  its lse-like rows, its segment ids and tile ranges) and the segment tile ranges."""
  grid: tuple
  qt: object
  q_spec: object
  kv_spec: object
  v_spec: object     # V's blocks, and o's / dO's (their head dim is V's)
  o_spec: object
  row_spec: object
  seg_specs: tuple   # q ids, kv ids, tile ranges (None each without segment ids)
  srng: object


def _query_tiles(cfg: CallConfig, B: int, bq: int, bk: int, qseg, kseg) -> _QueryTiles:
  qt = lambda i: _qtile(i, cfg, bq)
  D, G, seg = cfg.D, cfg.G, cfg.has_seg
  return _QueryTiles(
      grid=(cfg.Tp // bq, B, cfg.Hq), qt=qt,
      q_spec=pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, qt(i), h, 0)),
      kv_spec=pl.BlockSpec((None, cfg.Sp, None, D), lambda i, b, h: (b, 0, h // G, 0)),
      v_spec=pl.BlockSpec((None, cfg.Sp, None, cfg.DV), lambda i, b, h: (b, 0, h // G, 0)),
      o_spec=pl.BlockSpec((None, bq, None, cfg.DV), lambda i, b, h: (b, qt(i), h, 0)),
      row_spec=pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, qt(i))),
      seg_specs=(
          pl.BlockSpec((None, bq), lambda i, b, h: (b, qt(i))) if seg else None,
          pl.BlockSpec((None, cfg.Sp), lambda i, b, h: (b, 0)) if seg else None,
          pl.BlockSpec((None, None, 4), lambda i, b, h: (b, qt(i), 0)) if seg else None),
      srng=seg_ranges(qseg, kseg, cfg.T, cfg.S, bq, bk) if seg else None)


# ----------------------------------------------------------------------------- forward


def _qtile(i, cfg: CallConfig, bq: int):
  """Query tile of grid index i: with causal masks the heaviest (last) tiles launch first."""
  return cfg.Tp // bq - 1 - i if cfg.causal else i


def _mark(*rows):
  """A training kernel's mark of its program for the fixup launch: f32 1.0 if some entry of
  the [rows] vectors (row sums of its results, per-row values; None skipped) is not finite,
  else 0.0. Summed first, so one reduction: a non-finite entry makes its row sum and the sum
  non-finite (NaN absorbs; inf - inf is NaN); a finite sum that overflows marks a clean
  program, which the fixup then recomputes to the same values."""
  total = functools.reduce(jnp.add, [x for x in rows if x is not None])
  return jnp.max(nonfinite(total), axis=0)


def _fwd_kernel(scale_ref, q_ref, k_ref, v_ref, r_ref, qseg_ref, kseg_ref, srng_ref,
                o_ref, lse_ref, tbar_ref, vbar_ref, *, cfg: CallConfig, bq: int, bk: int,
                fixup: bool = False, careful_only: bool = False, pids=None):
  """One query tile. Non-finite inputs (docs/attention.md) take two launches.

  The fast launch (fixup=False) runs the loops as they are and marks every row whose output
  is not finite: lse = NaN (one max over D per row, after the loops).

  The fixup launch (fixup=True): o, lse, tbar, vbar hold a fast launch's result (this
  kernel's, or the Mosaic GPU forward's, which marks rows the same way), aliased in and out.
  A tile with a marked row runs the careful pass (careful_only) and overwrites all four;
  the others return after reading their lse. The careful pass: on masked tiles V enters P V
  with its non-finite entries zeroed, rows that see one are flagged, and P2 is masked (a
  masked key's r.k may be NaN). Rows that are flagged or non-finite (dead) are written as
  o = NaN, lse = +inf, tbar = vbar = 0: the backward then treats them as constants (zero
  weights). Interior tiles do the fast pass's work."""
  if fixup:
    # Gate before any load: on clean inputs every program of this launch returns at once,
    # so the launch costs its lse reads, not a read of q (and r) per program.
    # (program ids are read out here: the interpreter has no program_id inside a branch)
    marked = jnp.max(jnp.where(jnp.isnan(lse_ref[...]), 1.0, 0.0)) > 0.0
    pl.when(marked)(functools.partial(
        _fwd_kernel, scale_ref, q_ref, k_ref, v_ref, r_ref, qseg_ref, kseg_ref, srng_ref,
        o_ref, lse_ref, tbar_ref, vbar_ref, cfg=cfg, bq=bq, bk=bk, careful_only=True,
        pids=pids or (pl.program_id(0), pl.program_id(2))))
    return
  pid0, h = pids if pids is not None else (pl.program_id(0), pl.program_id(2))
  iq = _qtile(pid0, cfg, bq)
  qs = iq * bq
  scale = scale_ref[h] * LOG2E
  q = q_ref[...]
  r = r_ref[...] if cfg.has_r else None
  qseg = qseg_ref[...] if cfg.has_seg else None
  Dv = v_ref.shape[-1]
  dt = v_ref.dtype  # fp16 when cfg.fp16_pv (v converted by the wrapper), else the input dtype

  def body(kb, carry, masked, careful=False):  # careful: masked tiles of the careful pass
    if careful:
      *carry, flag = carry
    if cfg.has_r:
      m, d1, o1, d2, o2 = carry
    else:
      m, d1, o1 = carry
    ks = pl.multiple_of(kb * bk, bk)
    k = k_ref[pl.ds(ks, bk), :]
    v = v_ref[pl.ds(ks, bk), :]
    s = dot(q, k, trans_b=True) * scale
    if masked:
      kseg = kseg_ref[pl.ds(ks, bk)] if cfg.has_seg else None
      mask = _visible(qs + iota(bq, 0), ks + iota(bk, 1), cfg,
                      None if qseg is None else qseg[:, None],
                      None if kseg is None else kseg[None, :])
      s = jnp.where(mask, s, NEG_INF)
    if careful:
      bad_v = jnp.max(nonfinite(v), axis=1)[None, :]           # [1, bk]
      flag = jnp.maximum(flag, jnp.max(jnp.where(mask, bad_v, 0.0), axis=1))
      v = finite(v)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    if masked:
      p = jnp.where(mask, p, 0.0)
    d1 = d1 * alpha + jnp.sum(p, axis=1)
    o1 = o1 * alpha[:, None] + dot(p.astype(dt), v)
    if not cfg.has_r:
      out = (m_new, d1, o1)
    else:
      t = dot(r, k, trans_b=True)
      p2 = p * t
      if careful:
        p2 = jnp.where(mask, p2, 0.0)
      d2 = d2 * alpha + jnp.sum(p2, axis=1)
      o2 = o2 * alpha[:, None] + dot(p2.astype(dt), v)
      out = (m_new, d1, o1, d2, o2)
    return out + (flag,) if careful else out

  zrow = jnp.zeros((bq,), jnp.float32)
  zacc = jnp.zeros((bq, Dv), jnp.float32)
  init = (zrow + NEG_INF, zrow, zacc)
  if cfg.has_r:
    init = init + (zrow, zacc)
  ranges = _with_seg_ranges(_kv_tiles(qs, bq, bk, cfg), srng_ref)

  def finish(carry, flag=None):
    m, d1, o1 = carry[:3]
    has_keys = d1 > 0.0
    inv = 1.0 / jnp.where(has_keys, d1, 1.0)
    if cfg.fp16_pv:
      inv_v = inv * scale_ref[cfg.Hq]  # undo the power-of-two scaling of v
    else:
      inv_v = inv
    vbar = o1 * inv_v[:, None]
    tbar = zrow
    if cfg.has_r:
      d2, o2 = carry[3:]
      tbar = d2 * inv
      o = (1.0 + tbar)[:, None] * vbar - o2 * inv_v[:, None]
    else:
      o = vbar
    lse = jnp.where(has_keys, m + jnp.log2(jnp.where(has_keys, d1, 1.0)), jnp.inf)
    if flag is None:   # fast pass: mark rows with a non-finite output for the fixup launch
      # (by the row sum: one add per entry; a non-finite entry makes it non-finite)
      lse = jnp.where(jnp.isfinite(jnp.sum(o, axis=1)), lse, jnp.nan)
    else:
      dead = jnp.maximum(flag, jnp.max(nonfinite(o), axis=1)) > 0.0
      o = jnp.where(dead[:, None], jnp.nan, o)
      lse = jnp.where(dead, jnp.inf, lse)
      tbar = jnp.where(dead, 0.0, tbar)
      vbar = jnp.where(dead[:, None], 0.0, vbar)
    return o, lse, tbar, vbar

  def careful():
    def cbody(kb, carry, masked):
      return body(kb, carry, masked, careful=True) if masked else (
          body(kb, carry[:-1], masked) + (carry[-1],))
    *carry, flag = _loop3(ranges, cbody, init + (zrow,))
    return finish(carry, flag)

  def write(outs):
    o, lse, tbar, vbar = outs
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse
    if cfg.has_r:
      tbar_ref[...] = tbar
      vbar_ref[...] = vbar.astype(vbar_ref.dtype)

  if careful_only:   # the fixup launch's marked tiles
    write(careful())
  else:
    write(finish(_loop3(ranges, body, init)))


def fwd_call(cfg: CallConfig, q, k, v, r, scale, qseg, kseg, *, fixup=None, v_fp16=None,
             fast=False):
  """(o, lse, tbar, vbar) of the Triton forward: the fast launch, then the fixup launch that
  repairs the tiles it marked (see `_fwd_kernel`). fast: the fast launch only (rows whose
  output is not finite have lse = NaN). fixup: (o, lse, tbar, vbar) of a fast forward
  (this one's or the Mosaic GPU kernel's) to repair in place: the fixup launch only.
  v_fp16: (v as fp16, its scale) from `fp16_values`, if already made."""
  if fixup is None and not fast:
    if cfg.fp16_pv and v_fp16 is None:
      v_fp16 = fp16_values(v)    # one conversion for both launches
    outs = fwd_call(cfg, q, k, v, r, scale, qseg, kseg, v_fp16=v_fp16, fast=True)
    return fwd_call(cfg, q, k, v, r, scale, qseg, kseg, fixup=outs, v_fp16=v_fp16)
  if cfg.fp16_pv:
    v, vmul = fp16_values(v) if v_fp16 is None else v_fp16
    scale = jnp.concatenate([scale, vmul[None]])
  B = q.shape[0]
  bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
  t = _query_tiles(cfg, B, bq, bk, qseg, kseg)
  grid, qt, q_spec, row_spec, srng = t.grid, t.qt, t.q_spec, t.row_spec, t.srng
  in_specs = [pl.BlockSpec(scale.shape, lambda i, b, h: (0,)), q_spec, t.kv_spec, t.v_spec,
              q_spec if cfg.has_r else None, *t.seg_specs]
  rows = jax.ShapeDtypeStruct((B, cfg.Hq, cfg.Tp), jnp.float32)
  o_shape = jax.ShapeDtypeStruct(q.shape[:3] + (cfg.DV,), q.dtype)
  out_shape = [o_shape, rows]
  out_specs = [t.o_spec, row_spec]
  if cfg.has_r:
    out_shape += [rows, o_shape]
    out_specs += [row_spec, t.o_spec]

  args = [scale, q, k, v, r, qseg, kseg, srng]
  aliases = {}
  if fixup is not None:
    prev = [x for x in fixup if x is not None]
    in_specs += out_specs
    base = sum(a is not None for a in args)   # aliases index the flattened inputs
    aliases = {base + i: i for i in range(len(prev))}
    args += prev
  n_in = len(in_specs)

  def kernel(*refs, pids=None):
    (scale_ref, q_ref, k_ref, v_ref, r_ref, qseg_ref, kseg_ref, srng_ref), outs = (
        refs[:8], refs[n_in:])
    o_ref, lse_ref, *rest = outs
    tbar_ref, vbar_ref = rest if cfg.has_r else (None, None)
    _fwd_kernel(scale_ref, q_ref, k_ref, v_ref, r_ref, qseg_ref, kseg_ref, srng_ref, o_ref,
                lse_ref, tbar_ref, vbar_ref, cfg=cfg, bq=bq, bk=bk, fixup=fixup is not None,
                pids=pids)

  kind = "parallax" if cfg.has_r else "softmax"
  params = compiler_params(cfg.blocks.num_warps, cfg.blocks.num_stages)
  if fixup is None:
    outs = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=params, interpret=cfg.interpret, name=f"{kind}_fwd")(*args)
  else:   # marks: the rows of lse (an output) that are NaN
    outs = compact_fixup_call(
        kernel, args, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        mark=(n_in + 1, bq), tile_index=qt, input_output_aliases=aliases,
        compiler_params=params, interpret=cfg.interpret, name=f"{kind}_fwd_fixup")
  if cfg.has_r:
    return tuple(outs)
  return outs[0], outs[1], None, None


# ----------------------------------------------------------------------------- backward
#
# Each backward kernel runs as two launches, as the forward: the fast launch computes every
# program as if its inputs were finite and writes a mark per program (flags [B, heads,
# tiles] f32: 1.0 if its result holds a non-finite value, two reductions once per program);
# the fixup launch (compact grid) reads the marks before anything else and, only where one
# is set, runs that program's loops again carefully and overwrites its outputs (aliased in
# and out). On clean inputs the fixup launch costs one wave of flag reads.


def _flag_spec(grid_tile):
  """One f32 mark per program: a scalar block of flags [B, heads, tiles]."""
  return pl.BlockSpec((None, None, None), lambda i, b, h: (b, h, grid_tile(i)))


def _dq_kernel(scale_ref, q_ref, k_ref, v_ref, r_ref, do_ref, lse_ref, tbar_ref, qseg_ref,
               kseg_ref, srng_ref, o_ref, vbar_ref, delta_ref, gbar_ref, flag_ref, dq_ref,
               dr_ref, qdq_ref, *, cfg: CallConfig, bq: int, bk: int, fixup: bool = False,
               careful: bool = False, pids=None):
  """dq (and dr) of one query tile, and the backward preprocess for its rows: delta = do.o
  and gbar = do.vbar (written for the dk/dv kernel). Rows the forward wrote as dead (lse =
  +inf: a NaN row, or one without keys) send nothing back: their dq, dr, delta, gbar are
  zero.

  The fast launch (fixup=False): the loops as they are, the preprocess as if every row were
  live; the mark is set if a row's dq, dr, delta or gbar is not finite (a dead row's NaN o,
  or a masked key or value that was not finite), from one sum of their row sums.
  The fixup launch (fixup=True; dq_ref, dr_ref, qdq_ref, delta_ref, gbar_ref aliased in and
  out): a marked program redoes the preprocess and the loops with the dead rows' do zeroed
  and, on masked tiles, K's finite part and masked ds, dt, and overwrites its outputs; the
  others return after reading their mark. So the fast launch holds no select on live rows:
  elementwise work per program is what costs at short loops (no-op selects there cost
  ~10% of the dq kernel at 1k tokens)."""
  if fixup:
    # the mark first, before any other load (program ids read out here: the interpreter
    # has no program_id inside a branch)
    pl.when(flag_ref[...] > 0.0)(functools.partial(
        _dq_kernel, scale_ref, q_ref, k_ref, v_ref, r_ref, do_ref, lse_ref, tbar_ref,
        qseg_ref, kseg_ref, srng_ref, o_ref, vbar_ref, delta_ref, gbar_ref, flag_ref, dq_ref,
        dr_ref, qdq_ref, cfg=cfg, bq=bq, bk=bk, careful=True,
        pids=pids or (pl.program_id(0), pl.program_id(2))))
    return
  pid0, h = pids if pids is not None else (pl.program_id(0), pl.program_id(2))
  iq = _qtile(pid0, cfg, bq)
  qs = iq * bq
  scale_raw = scale_ref[h]
  scale = scale_raw * LOG2E
  q = q_ref[...]
  lse_row = lse_ref[...]
  do = do_ref[...]
  keep = finite if careful else (lambda x: x)
  if careful:
    live_row = jnp.isfinite(lse_row)
    do = jnp.where(live_row[:, None], do, 0.0).astype(do_ref.dtype)
  # backward preprocess, fused: delta = do.o (and gbar = do.vbar), also written for dk/dv;
  # careful: zero on dead rows (their o is NaN, their do anything; zeroed above)
  do32 = do.astype(jnp.float32)
  delta_row = jnp.sum(do32 * keep(o_ref[...].astype(jnp.float32)), axis=1)
  delta_ref[...] = delta_row
  gbar_row = None
  if cfg.has_r:
    gbar_row = jnp.sum(do32 * keep(vbar_ref[...].astype(jnp.float32)), axis=1)
    gbar_ref[...] = gbar_row
  lse = lse_row[:, None]
  delta = delta_row[:, None]
  if cfg.has_r:
    r = r_ref[...]
    tbar1 = 1.0 + tbar_ref[...][:, None]
    gbar = gbar_row[:, None]
    gmd = gbar - delta
  qseg = qseg_ref[...] if cfg.has_seg else None
  D = q.shape[-1]
  dt = k_ref.dtype

  def body(kb, carry, masked):
    cm = careful and masked   # masked tiles of the careful pass
    ks = pl.multiple_of(kb * bk, bk)
    k = k_ref[pl.ds(ks, bk), :]
    v = v_ref[pl.ds(ks, bk), :]
    if cm:
      k = finite(k)
    a = jnp.exp2(dot(q, k, trans_b=True) * scale - lse)
    if masked:
      kseg = kseg_ref[pl.ds(ks, bk)] if cfg.has_seg else None
      mask = _visible(qs + iota(bq, 0), ks + iota(bk, 1), cfg,
                      None if qseg is None else qseg[:, None],
                      None if kseg is None else kseg[None, :])
      a = jnp.where(mask, a, 0.0)
    g = dot(do, v, trans_b=True)
    if cfg.has_r:
      dq, dr = carry
      t = dot(r, k, trans_b=True)
      dtt = a * (gbar - g)
      if cm:
        dtt = jnp.where(mask, dtt, 0.0)
      dr = dr + dot(dtt.astype(dt), k)
      ds = a * gmd - dtt * (tbar1 - t)
    else:
      dq = carry
      ds = a * (g - delta)
    if cm:
      ds = jnp.where(mask, ds, 0.0)
    dq = dq + dot(ds.astype(dt), k)
    return (dq, dr) if cfg.has_r else dq

  zacc = jnp.zeros((bq, D), jnp.float32)
  carry = (zacc, zacc) if cfg.has_r else zacc
  carry = _loop3(_with_seg_ranges(_kv_tiles(qs, bq, bk, cfg), srng_ref), body, carry)
  carry = carry if cfg.has_r else (carry,)
  if careful:
    carry = tuple(jnp.where(live_row[:, None], x, 0.0) for x in carry)
  dq = carry[0]
  dq_ref[...] = (dq * scale_raw).astype(dq_ref.dtype)
  if cfg.has_r:
    dr_ref[...] = carry[1].astype(dr_ref.dtype)
  qdq_row = None
  if cfg.need_dscale:
    qdq_row = jnp.sum(keep(q.astype(jnp.float32)) * dq, axis=1)
    qdq_ref[...] = qdq_row
  if not careful:
    flag_ref[...] = _mark(*[jnp.sum(x, axis=1) for x in carry], delta_row, gbar_row, qdq_row)


def dq_call(cfg: CallConfig, q, k, v, r, do, o, vbar, lse, tbar, scale, qseg, kseg, *,
            fast=False, fixup=None):
  """(dq, dr, delta, gbar, qdq) of the dq/dr kernel: the fast launch, then the fixup launch
  on the programs it marked (see `_dq_kernel`). fast: the fast launch only, its flags
  [B, Hq, q tiles] appended to the result. fixup: such a fast result (with its flags) to
  repair in place: the fixup launch only."""
  B = q.shape[0]
  bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
  t = _query_tiles(cfg, B, bq, bk, qseg, kseg)
  grid, qt, q_spec, row_spec, srng = t.grid, t.qt, t.q_spec, t.row_spec, t.srng
  flag_spec = _flag_spec(qt)
  pr = cfg.has_r
  in_specs = [pl.BlockSpec((cfg.Hq,), lambda i, b, h: (0,)), q_spec, t.kv_spec, t.v_spec,
              q_spec if pr else None, t.o_spec, row_spec, row_spec if pr else None,
              *t.seg_specs]
  args = [scale, q, k, v, r, do, lse, tbar, qseg, kseg, srng]
  n_args = len(args)
  rows = jax.ShapeDtypeStruct((B, cfg.Hq, cfg.Tp), jnp.float32)
  params = compiler_params(cfg.blocks.num_warps_dq, cfg.blocks.num_stages_dq)
  kind = "parallax" if pr else "softmax"
  # outputs of both launches: dq, dr, qdq (the fixup launch also rewrites delta, gbar)
  fix_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct(q.shape, q.dtype) if pr else None,
               rows if cfg.need_dscale else None]
  fix_specs = [q_spec, q_spec if pr else None, row_spec if cfg.need_dscale else None]

  # fast launch: inputs + (o, vbar); outputs (dq, dr, qdq) + (delta, gbar, flags)
  def fast_kernel(*refs):
    ins, (o_ref, vbar_ref), outs = refs[:n_args], refs[n_args:n_args + 2], refs[n_args + 2:]
    (dq_ref, dr_ref, qdq_ref), (delta_ref, gbar_ref, flag_ref) = outs[:3], outs[3:]
    _dq_kernel(*ins, o_ref, vbar_ref, delta_ref, gbar_ref, flag_ref, dq_ref, dr_ref, qdq_ref,
               cfg=cfg, bq=bq, bk=bk)

  if fixup is None:
    flags = jax.ShapeDtypeStruct((B, cfg.Hq, cfg.Tp // bq), jnp.float32)
    dq, dr, qdq, delta, gbar, flags = pl.pallas_call(
        fast_kernel, grid=grid, in_specs=in_specs + [t.o_spec, t.o_spec if pr else None],
        out_specs=fix_specs + [row_spec, row_spec if pr else None, flag_spec],
        out_shape=fix_shape + [rows, rows if pr else None, flags],
        compiler_params=params, interpret=cfg.interpret, name=f"{kind}_bwd_dq",
    )(*args, o, vbar)
    if fast:
      return dq, dr, delta, gbar, qdq, flags
  else:
    dq, dr, delta, gbar, qdq, flags = fixup

  # fixup launch: inputs + (o, vbar, flags) + aliased (dq, dr, qdq, delta, gbar)
  prev = [dq, dr, qdq, delta, gbar]
  out_shape = fix_shape + [rows, rows if pr else None]
  out_specs = fix_specs + [row_spec, row_spec if pr else None]
  base = sum(a is not None for a in args + [o, vbar, flags])
  aliases = {base + i: i for i in range(sum(x is not None for x in prev))}

  def fix_kernel(*refs, pids=None):
    ins, (o_ref, vbar_ref, flag_ref) = refs[:n_args], refs[n_args:n_args + 3]
    dq_ref, dr_ref, qdq_ref, delta_ref, gbar_ref = refs[n_args + 8:]
    _dq_kernel(*ins, o_ref, vbar_ref, delta_ref, gbar_ref, flag_ref, dq_ref, dr_ref, qdq_ref,
               cfg=cfg, bq=bq, bk=bk, fixup=True, pids=pids)

  dq, dr, qdq, delta, gbar = compact_fixup_call(
      fix_kernel, [*args, o, vbar, flags, *prev], grid=grid,
      in_specs=in_specs + [t.o_spec, t.o_spec if pr else None, flag_spec] + out_specs,
      out_specs=out_specs, out_shape=out_shape, mark=(n_args + 2, 1), tile_index=qt,
      input_output_aliases=aliases, compiler_params=params, interpret=cfg.interpret,
      name=f"{kind}_bwd_dq_fixup")
  return dq, dr, delta, gbar, qdq


def _dkv_kernel(scale_ref, q_ref, k_ref, v_ref, r_ref, do_ref, lse_ref, delta_ref, tbar_ref,
                gbar_ref, qseg_ref, kseg_ref, srng_ref, flag_ref, dk_ref, dv_ref, *,
                cfg: CallConfig, bq: int, bk: int, fixup: bool = False, careful: bool = False,
                pids=None):
  """dk, dv of one key tile, summed over the GQA group. Dead rows (lse = +inf) have zero
  weights (their delta, gbar are zero).

  The fast launch (fixup=False; flag_ref out): the loops as they are; the mark is set if dk
  or dv is not finite (a dead row's NaN q, r or do met a zero weight, or a masked pair's
  NaN). The fixup launch (fixup=True; flag_ref in, dk_ref, dv_ref aliased in and out): a
  marked program runs the loops again on the finite parts of K, V and of every Q, R, dO
  tile, with masked tiles' ds, dt and a c masked, and overwrites dk, dv; the others return
  after reading their mark."""
  if fixup:
    # the mark first, before any other load (program ids read out here: the interpreter
    # has no program_id inside a branch)
    pl.when(flag_ref[...] > 0.0)(functools.partial(
        _dkv_kernel, scale_ref, q_ref, k_ref, v_ref, r_ref, do_ref, lse_ref, delta_ref,
        tbar_ref, gbar_ref, qseg_ref, kseg_ref, srng_ref, flag_ref, dk_ref, dv_ref, cfg=cfg,
        bq=bq, bk=bk, careful=True, pids=pids or (pl.program_id(0), pl.program_id(2))))
    return
  ikv, hkv = pids if pids is not None else (pl.program_id(0), pl.program_id(2))
  ks = ikv * bk
  k = k_ref[...]
  v = v_ref[...]
  if careful:
    k, v = finite(k), finite(v)
  kseg = kseg_ref[...] if cfg.has_seg else None
  D = k.shape[-1]
  dt = k.dtype
  ranges = _with_seg_ranges(_q_tiles(ks, bk, bq, cfg), srng_ref)

  def head_body(g, carry):
    h = hkv * cfg.G + g
    scale_raw = scale_ref[h]
    scale = scale_raw * LOG2E

    def body(qb, carry, masked):
      dk, dv = carry
      qs = pl.multiple_of(qb * bq, bq)
      q = q_ref[pl.ds(qs, bq), h, :]
      do = do_ref[pl.ds(qs, bq), h, :]
      if careful:
        q, do = finite(q), finite(do)
      lse = lse_ref[h, pl.ds(qs, bq)][None, :]
      delta = delta_ref[h, pl.ds(qs, bq)][None, :]
      a = jnp.exp2(dot(k, q, trans_b=True) * scale - lse)  # [bk, bq]
      if masked:
        qseg = qseg_ref[pl.ds(qs, bq)] if cfg.has_seg else None
        mask = _visible(qs + iota(bq, 1), ks + iota(bk, 0), cfg,
                        None if qseg is None else qseg[None, :],
                        None if kseg is None else kseg[:, None])
        a = jnp.where(mask, a, 0.0)
      keep = (lambda x: jnp.where(mask, x, 0.0)) if careful and masked else (lambda x: x)
      gt = dot(v, do, trans_b=True)  # [bk, bq]
      if cfg.has_r:
        r = r_ref[pl.ds(qs, bq), h, :]
        if careful:
          r = finite(r)
        tbar1 = 1.0 + tbar_ref[h, pl.ds(qs, bq)][None, :]
        gbar = gbar_ref[h, pl.ds(qs, bq)][None, :]
        c = tbar1 - dot(k, r, trans_b=True)
        dtt = keep(a * (gbar - gt))
        ds = keep(a * (gbar - delta) - dtt * c)
        dv = dv + dot(keep(a * c).astype(dt), do)
        dk = dk + dot((ds * scale_raw).astype(dt), q) + dot(dtt.astype(dt), r)
      else:
        ds = keep(a * (gt - delta))
        dv = dv + dot(a.astype(dt), do)
        dk = dk + dot((ds * scale_raw).astype(dt), q)
      return dk, dv

    return _loop3(ranges, body, carry)

  dk, dv = lax.fori_loop(0, cfg.G, head_body, (jnp.zeros((bk, D), jnp.float32),
                                               jnp.zeros((bk, v.shape[-1]), jnp.float32)))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  if not careful:
    flag_ref[...] = _mark(jnp.sum(dk, axis=1), jnp.sum(dv, axis=1))


def dkv_call(cfg: CallConfig, q, k, v, r, do, lse, delta, tbar, gbar, scale, qseg, kseg, *,
             fast=False, fixup=None):
  """(dk, dv) of the dk/dv kernel: the fast launch, then the fixup launch on the programs it
  marked (see `_dkv_kernel`). fast: the fast launch only, its flags [B, Hkv, key tiles]
  appended to the result. fixup: such a fast result (dk, dv, flags) to repair in place: the
  fixup launch only."""
  B = q.shape[0]
  bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
  D = cfg.D
  grid = (cfg.Sp // bk, B, cfg.Hkv)
  qfull = pl.BlockSpec((None, cfg.Tp, cfg.Hq, D), lambda j, b, h: (b, 0, 0, 0))
  dofull = pl.BlockSpec((None, cfg.Tp, cfg.Hq, cfg.DV), lambda j, b, h: (b, 0, 0, 0))
  kv_spec = pl.BlockSpec((None, bk, None, D), lambda j, b, h: (b, j, h, 0))
  v_spec = pl.BlockSpec((None, bk, None, cfg.DV), lambda j, b, h: (b, j, h, 0))
  rows = pl.BlockSpec((None, cfg.Hq, cfg.Tp), lambda j, b, h: (b, 0, 0))
  flag_spec = _flag_spec(lambda j: j)
  pr = cfg.has_r
  in_specs = [
      pl.BlockSpec((cfg.Hq,), lambda j, b, h: (0,)),
      qfull, kv_spec, v_spec, qfull if pr else None, dofull,
      rows, rows, rows if pr else None, rows if pr else None,
      pl.BlockSpec((None, cfg.Tp), lambda j, b, h: (b, 0)) if cfg.has_seg else None,
      pl.BlockSpec((None, bk), lambda j, b, h: (b, j)) if cfg.has_seg else None,
      pl.BlockSpec((None, None, 4), lambda j, b, h: (b, j, 0)) if cfg.has_seg else None,
  ]
  # key tiles are the rows here: the query tiles each one's ids allow
  srng = seg_ranges(kseg, qseg, cfg.S, cfg.T, bk, bq) if cfg.has_seg else None
  args = [scale, q, k, v, r, do, lse, delta, tbar, gbar, qseg, kseg, srng]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  out_specs = [kv_spec, v_spec]
  params = compiler_params(cfg.blocks.num_warps_dkv, cfg.blocks.num_stages_dkv)
  kind = "parallax" if pr else "softmax"
  n_args = len(args)

  def fast_kernel(*refs):
    ins, (dk_ref, dv_ref, flag_ref) = refs[:n_args], refs[n_args:]
    _dkv_kernel(*ins, flag_ref, dk_ref, dv_ref, cfg=cfg, bq=bq, bk=bk)

  if fixup is None:
    dk, dv, flags = pl.pallas_call(
        fast_kernel, grid=grid, in_specs=in_specs, out_specs=out_specs + [flag_spec],
        out_shape=out_shape + [jax.ShapeDtypeStruct((B, cfg.Hkv, cfg.Sp // bk), jnp.float32)],
        compiler_params=params, interpret=cfg.interpret, name=f"{kind}_bwd_dkv",
    )(*args)
    if fast:
      return dk, dv, flags
  else:
    dk, dv, flags = fixup

  base = sum(a is not None for a in args) + 1   # aliases index the flattened inputs

  def fix_kernel(*refs, pids=None):
    ins, flag_ref, (dk_ref, dv_ref) = refs[:n_args], refs[n_args], refs[n_args + 3:]
    _dkv_kernel(*ins, flag_ref, dk_ref, dv_ref, cfg=cfg, bq=bq, bk=bk, fixup=True, pids=pids)

  dk, dv = compact_fixup_call(
      fix_kernel, [*args, flags, dk, dv], grid=grid, in_specs=in_specs + [flag_spec] + out_specs,
      out_specs=out_specs, out_shape=out_shape, mark=(n_args, 1), tile_index=lambda j: j,
      input_output_aliases={base: 0, base + 1: 1}, compiler_params=params,
      interpret=cfg.interpret, name=f"{kind}_bwd_dkv_fixup")
  return dk, dv
