"""Hopper (sm_90a) decode kernel for Parallax / softmax attention in Pallas Mosaic GPU.

Same contract and math as the Triton-lowering decode kernel (`decode_triton`): one
new query row per sequence (q, r: [B, Hq, D]) against the KV cache [B, S_max, Hkv, D] read in
place, per-sequence lengths, optional window, GQA packing (the G = Hq/Hkv rows of a KV head in
one program, so each K/V byte is read once per split). Per row, fp32:
S1 = q.k*scale (log2 domain), S2 = r.k, one running max m over S1, P1 = exp2(S1 - m),
P2 = P1*S2, d1 = sum P1, d2 = sum P2, O1 = P1 V, O2 = P2 V;
o = (1 + d2/d1) O1/d1 - O2/d1 (r None: O1/d1); a row without valid keys gives 0.

Why a second kernel: with the Triton lowering's 16-row MMA tiles the warps of a program split
each K/V tile by key, so every row max and every P -> MMA-operand relayout crosses warps
(shared memory and a barrier per tile); at the small, L2-resident shapes that chain, not
memory, sets the time (bench/NOTES.md, decode v6). Here a program is one warpgroup issuing
64-row wgmma tiles, where a row lives in one warp (row reductions are two shuffles), P feeds
the P V wgmma from registers, and a producer warpgroup keeps a TMA ring of K/V tiles in
flight. Decode has one to eight real rows per KV head; the 64-row tile is compute that decode
has to spare (bench/NOTES.md gives the count), and the tile is used as follows.

The A tile (SMEM, [64, D]) holds four copies ("stripes", one per warp) of 16 rows: rows 0-7 of
a stripe are the 8-aligned box of query rows that holds the KV head's G rows (the others are
other heads' rows, computed and never stored), rows 8-15 are the same rows of r
(`pack_qr=True`: the paper's instruction sharing, one Q K^T wgmma gives S1 and S2; a thread
holds rows i and i+8 of its warp, so moving S2 onto S1's rows is a renaming of registers,
`_row_half`) or of q again (`pack_qr=False`: a second wgmma on an A tile of r gives S2).
Both halves of a stripe then carry the same registers (S1 from rows 0-7, S2 from rows 8-15),
so the softmax's elementwise work is done once per real row, not on rows nobody reads.
Every stripe computes the same P1 and P2 rows; the P V operand takes P1 in stripe 0, the
bf16/fp16 high part of P2 in stripe 1 and its low part in stripe 2 (P2 = hi + lo keeps 16
bits of P2: the output's cancellation (1 + d2/d1) O1/d1 - O2/d1 amplifies P2's rounding), so
one wgmma per tile gives O1, O2hi and O2lo. Per K/V tile: 2 wgmmas (pack_qr) or 3, as many as
softmax needs with pack_qr.

`num_consumers=2` gives a program a second consumer warpgroup: the two take alternate K/V
tiles with their own (m, d1, d2, O) and the second hands its state over through SMEM for an
exact merge, so two per-tile chains (wgmma, softmax, wgmma) run per SM instead of one; the
registers are split 232/232/40 as in `attention_mgpu`.

Splits over the KV length (when B*Hkv does not fill the GPU) write fp32 partials (m, d1, d2,
O1, O2hi, O2lo of the 8 rows) and a small XLA pass merges them (`_merge`), or with
`merge_kernel` one Pallas launch (`decode_mgpu_merge`). With
`cluster_merge` the splits of one (b, h) are instead one thread-block cluster (at most 8):
each leaves its state in its SMEM, and after a cluster barrier split 0 reads the others'
through distributed shared memory, merges them exactly (the two consumers' merge, once per
peer) and stores o; a second barrier keeps the peers' SMEM alive until it has. The Mosaic
GPU interpreter (the CPU tests) has no cluster refs, so that path is checked by its CUDA
lowering on CPU and by the GPU tests.

Covered (`supported`): bf16 / fp16, head_dim 64 or 128, Hq/Hkv in {1, 2, 4, 8}, q of one
token per sequence, a cache length that is a multiple of 8 (the K/V TMA tiling), any lengths
and window. Everything else: `decode_triton.parallax_decode`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import (LOG2E, NUM_SMS, SMEM_LIMIT, hopper_platform, pad,
                                   split_chunk, wgmma_smem)
from pallas_kernels.decode_mgpu_merge import merge_partials

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_HEAD_DIMS = (64, 128)
_BOX = 8          # query rows per TMA box: the SMEM tile's row granule
_STRIPE = 16      # rows per warp in a wgmma tile
_ROWS = 64        # wgmma M
MAX_CLUSTER = 8   # CTAs per cluster without the non-portable opt-in


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Launch of the Mosaic GPU decode kernel.

  block_kv: keys per K/V tile (multiple of 64; S1/S2 [64, block_kv] fp32 in registers).
  num_stages: depth of the producer's K/V TMA ring (>= 2).
  num_splits: programs per (batch, KV head) over the length; None: `default_splits`.
  pack_qr: Q and R rows in one wgmma tile (one Q K^T wgmma per tile); False: two.
  num_consumers: consumer warpgroups per program (1 or 2). Two take alternate K/V tiles
    with their own (m, d1, d2, O), merged through SMEM at the end: two independent
    per-tile chains (wgmma -> softmax -> wgmma) per SM where one chain's latency, not
    memory, sets the time. num_stages must be a multiple of it (a ring slot then belongs
    to one consumer, which sees every phase of its barriers).
  cluster_merge: the splits of one (batch, KV head) run as one thread-block cluster and
    merge in the kernel: each leaves its (O, m, d1, d2) in its SMEM, split 0 reads the
    others' through distributed shared memory and stores o (no XLA merge). The default
    split count is capped at 8, the portable cluster size; an explicit num_splits above
    it asks for a larger cluster, which the device may refuse at launch. GPU only: the
    interpreter has no cluster refs.
  merge_kernel: the split partials are merged by one Pallas (Triton) launch
    (`decode_mgpu_merge`) that also writes o's rows in place, instead of XLA's fusions and
    the row gather. merge_columns: o's columns one program of that launch merges (a power
    of two >= 8; fewer: more programs, fewer bytes each).
  """
  block_kv: int = 64
  num_stages: int = 3
  num_splits: int | None = None
  pack_qr: bool = True
  num_consumers: int = 1
  cluster_merge: bool = False
  merge_kernel: bool = False
  merge_columns: int = 32

  def __post_init__(self):
    if self.block_kv % 64 or self.block_kv <= 0:
      raise ValueError(f"block_kv={self.block_kv} must be a positive multiple of 64")
    if self.num_stages < 2:
      raise ValueError(f"num_stages={self.num_stages} must be >= 2")
    if self.num_splits is not None and self.num_splits < 1:
      raise ValueError(f"num_splits={self.num_splits} must be >= 1")
    if self.num_consumers not in (1, 2):
      raise ValueError(f"num_consumers={self.num_consumers} must be 1 or 2")
    if self.cluster_merge and self.merge_kernel:
      raise ValueError("cluster_merge and merge_kernel are two ways to merge the splits: "
                       "choose one")
    if self.merge_columns < 8 or self.merge_columns & (self.merge_columns - 1):
      raise ValueError(f"merge_columns={self.merge_columns} must be a power of two >= 8")
    if self.num_stages % self.num_consumers:
      raise ValueError(f"num_stages={self.num_stages} must be a multiple of "
                       f"num_consumers={self.num_consumers}")


def default_splits(batch: int, num_kv_heads: int, s_max: int, block_kv: int,
                   num_sms: int = NUM_SMS) -> int:
  """One wave of programs (one resident per SM: the K/V ring and the fp32 output tile fill
  most of its SMEM), at least one tile each; none once B*Hkv covers the SMs."""
  progs = batch * num_kv_heads
  if 10 * progs >= 9 * num_sms:
    return 1
  return int(max(1, min(num_sms // progs, s_max // block_kv, 64)))


def smem_bytes(cfg: DecodeConfig, head_dim: int, parallax: bool, itemsize: int = 2) -> int:
  """SMEM of the kernel's buffers: the A tile(s), the K/V ring, the fp32 output scratch."""
  a = (1 if cfg.pack_qr or not parallax else 2) * _ROWS * head_dim * itemsize
  ring = 2 * cfg.num_stages * cfg.block_kv * head_dim * itemsize
  scratch = (_ROWS + 2 * _STRIPE) * head_dim * 4       # O, read back shifted by 16 and 32
  out = _ROWS * head_dim * itemsize + 3 * _ROWS * 4     # o staging, row vectors
  return a + ring + scratch + out


def supported(q, k_cache, v_cache, r=None, *, config: DecodeConfig | None = None,
              platform: str | None = None) -> tuple[bool, str]:
  """(True, "") if `parallax_decode_mgpu` takes these inputs, else (False, reason).
  platform as `attention_mgpu.supported` (None: the default device must be a Hopper GPU)."""
  if q.ndim != 3 or k_cache.ndim != 4:
    return False, f"expected q [B, Hq, D] and a [B, S, Hkv, D] cache, got {q.shape}, " \
                  f"{k_cache.shape}"
  B, Hq, D = q.shape
  Bk, S, Hkv, Dk = k_cache.shape
  if v_cache.shape != k_cache.shape or Bk != B or Dk != D:
    return False, f"k and v caches must be [B, S, Hkv, {D}] = {v_cache.shape}, {k_cache.shape}"
  if r is not None and r.shape != q.shape:
    return False, f"r {r.shape} must have q's shape {q.shape}"
  dts = {jnp.dtype(x.dtype) for x in (q, k_cache, v_cache) + (() if r is None else (r,))}
  if len(dts) != 1 or next(iter(dts)) not in _DTYPES:
    return False, f"dtypes {sorted(map(str, dts))}: need one of bfloat16 / float16"
  if D not in _HEAD_DIMS:
    return False, f"head_dim {D} not in {_HEAD_DIMS}"
  if Hq % Hkv or _BOX % (Hq // Hkv):
    return False, f"Hq/Hkv = {Hq}/{Hkv} must be 1, 2, 4 or 8"
  cfg = config or DecodeConfig()
  if S % _BOX and S >= cfg.block_kv:   # (shorter caches are padded to one tile)
    # the K/V TMA descriptors tile the cache's length by the SMEM tile's 8 rows
    return False, f"cache length {S} must be a multiple of {_BOX}"
  need = smem_bytes(cfg, D, r is not None, jnp.dtype(q.dtype).itemsize)
  if need > SMEM_LIMIT:
    return False, f"{cfg} needs {need} bytes of SMEM at head_dim {D} (> {SMEM_LIMIT})"
  if cfg.cluster_merge and platform == "interpret":
    return False, "cluster_merge: the Mosaic GPU interpreter cannot read another CTA's SMEM"
  return hopper_platform(platform)


# ----------------------------------------------------------------------------- the kernel


def _row_half(x, half, interpret):
  """x ([64, N] in the WGMMA layout, or a [64] row vector of it) with both 8-row halves of
  every 16-row stripe set to half `half` (0: rows 0-7, 1: rows 8-15): row i becomes row
  (i mod 8) + 8 * half.

  In the wgmma layout a thread holds rows r and r + 8 of its warp's 16 (same columns), so
  this is a renaming of registers: no instruction. Both halves then hold the same SSA
  values, so every elementwise op after it is emitted once per value (CSE), where the tile's
  other half would otherwise run the softmax on rows nobody reads. The interpreter has no
  `inline_mgpu`: there it is the same permutation as array ops.
  """
  if interpret is not None:
    rest = x.shape[1:]
    h = x.reshape((_ROWS // _STRIPE, 2, _BOX) + rest)[:, half:half + 1]
    return jnp.broadcast_to(h, (_ROWS // _STRIPE, 2, _BOX) + rest).reshape(x.shape)

  import jax.experimental.mosaic.gpu as mgpu

  # registers of [64, N]: (1, N/8, 1, 1, 2, 1, 1, 1, 1), tiling (64, 8) -> (16, 8) -> (8, 8)
  # -> (2,); of [64]: (1, 1, 2, 1, 1), tiling (64,) -> (16,) -> (8,) -> (1,). The axis of
  # size 2 is the row half within the warp's 16 rows.
  layout, mlayout, axis, ndim = ((plgpu.Layout.WGMMA, mgpu.WGMMA_LAYOUT, 4, 9) if x.ndim == 2
                                 else (plgpu.Layout.WGMMA.reduce(1), mgpu.WGMMA_ROW_LAYOUT,
                                       2, 5))

  @plgpu.inline_mgpu(arg_types=(layout,),
                     return_type=plgpu.ShapeDtypeStruct(x.shape, x.dtype, layout=layout))
  def pick(_, arr):
    regs = arr.registers
    if arr.layout != mlayout or regs.ndim != ndim or regs.shape[axis] != 2:
      raise NotImplementedError(f"unexpected register layout {arr.layout} {regs.shape}")
    picked = np.repeat(np.take(regs, [half], axis=axis), 2, axis=axis)
    return mgpu.FragmentedArray(_registers=picked, _layout=arr.layout,
                                _is_signed=arr.is_signed)

  return pick(x)


def cluster_sync():
  """barrier.cluster with release / acquire semantics: every thread of every CTA in the
  cluster arrives, then waits for all; SMEM writes before it are visible to the cluster's
  reads after it (each warpgroup calls it, so all of a CTA's threads take part)."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import llvm

  @plgpu.inline_mgpu()
  def sync(_):
    llvm.inline_asm(ir.Type.parse("!llvm.void"), [],
                    "barrier.cluster.arrive.release.aligned;\n\t"
                    "barrier.cluster.wait.acquire.aligned;",
                    "", has_side_effects=True)

  sync()


# A jit boundary: one lowering (one Mosaic module, one ptxas compile) per shape and launch,
# shared by every call site (as `attention_mgpu._forward`).
@functools.partial(jax.jit, static_argnames=("num_heads", "scale", "window", "cfg",
                                             "num_splits", "s_max", "interpret"))
def _decode(lengths, q2, k_cache, v_cache, r2, *, num_heads, scale, window, cfg, num_splits,
            s_max, interpret=None):
  """The plgpu.kernel call. q2, r2: [B*Hq rounded up to 8, D] (rows b*Hq + head).

  Returns the 8 box rows of each (b, h): o [B, Hkv, 8, D] (one split; a TMA store of only
  the G rows of (b, h) would need an SMEM tile of G < 8 rows), or the partials of each
  (b, h, split): vecs [B, Hkv, ns, nv, 8] f32 (m, d1(, d2)) and mats [B, Hkv, ns, nm, 8, D]
  f32 (O1(, O2hi, O2lo)); with cfg.cluster_merge, o as for one split."""
  B, S, Hkv, D = k_cache.shape
  Hq = num_heads
  G = Hq // Hkv
  dtype = q2.dtype
  has_r = r2 is not None
  pack = cfg.pack_qr and has_r
  bk, stages, ns = cfg.block_kv, cfg.num_stages, num_splits
  chunk, _ = split_chunk(S, ns, bk)
  c_log2 = float(scale) * LOG2E
  nc = cfg.num_consumers
  nv, nm = (3, 3) if has_r else (2, 1)   # (m, d1, d2) / (O1, O2hi, O2lo)
  cluster = cfg.cluster_merge and ns > 1  # the splits merge through each other's SMEM
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  def tile_range(L, s):
    """[lo, hi) keys of split s, and its tiles [t0, t0 + n)."""
    lo = s * chunk
    if window is not None:
      lo = jnp.maximum(lo, jnp.maximum(L - window, 0))
    hi = jnp.minimum((s + 1) * chunk, L)
    t0 = lax.div(lo, bk)
    n = jnp.where(hi > lo, lax.div(hi + (bk - 1), bk) - t0, 0)
    return lo, hi, t0, n

  def kernel(refs, scoped):
    len_ref, q_ref, k_ref, v_ref = refs[:4]
    r_ref = refs[4] if has_r else None
    outs = refs[5 if has_r else 4:]
    (a_smem, ar_smem, k_smem, v_smem, o_scr, o_stage, vec_smem), (
        k_bar, v_bar, a_bar), (k_free, v_free), x_bar = scoped
    h = lax.axis_index("heads")
    b = lax.axis_index("batch")
    s = lax.axis_index("split")
    wg = lax.axis_index("wg")
    L = jnp.minimum(len_ref[b], s_max)
    lo, hi, t0, n = tile_range(L, s)

    def load_a_tiles():
      # The 8-aligned box of query rows holding the G rows of (b, h) (G divides 8). An
      # unaligned start made Mosaic's layout inference ask for an SMEM tiling dividing it.
      rows = pl.ds(lax.div(b * Hq + h * G, _BOX) * _BOX, _BOX)
      copies = []
      for st in range(_ROWS // _STRIPE):
        top, bot = pl.ds(st * _STRIPE, _BOX), pl.ds(st * _STRIPE + _BOX, _BOX)
        copies.append((q_ref.at[rows], a_smem.at[top]))
        copies.append((r_ref.at[rows] if pack else q_ref.at[rows], a_smem.at[bot]))
        if has_r and not pack:
          copies.append((r_ref.at[rows], ar_smem.at[top]))
          copies.append((r_ref.at[rows], ar_smem.at[bot]))
      for i, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, a_bar.at[i])

    def run_tiles(c):
      """Consumer c's tiles (steps c, c + nc, ...): its (O, m, d1, d2) over them."""
      for i in range(n_copies):
        plgpu.barrier_wait(a_bar.at[i])
      zrow = plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), row_layout)
      m0 = plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32), row_layout)
      zacc = plgpu.layout_cast(jnp.zeros((_ROWS, D), jnp.float32), plgpu.Layout.WGMMA)
      # (the row-half pick makes both halves' index values the same SSA values too, so
      # the masks and selects below are emitted once per value)
      stripe = _row_half(lax.div(plgpu.broadcasted_iota(
          jnp.int32, (_ROWS, bk), 0, layout=plgpu.Layout.WGMMA), _STRIPE), 0, interpret)
      col = _row_half(plgpu.broadcasted_iota(jnp.int32, (_ROWS, bk), 1,
                                             layout=plgpu.Layout.WGMMA), 0, interpret)

      def body(i, carry):
        o, m, d1, d2 = carry
        step = c + i * nc
        slot = lax.rem(step, stages)
        t = t0 + step
        kstart = jnp.minimum(t * bk, S - bk)   # the last tile is clamped into the cache
        kt = k_smem.at[slot].transpose((1, 0))
        plgpu.barrier_wait(k_bar.at[slot])

        def scores(s_ref, s2_ref):
          plgpu.wgmma(s_ref, a_smem, kt)
          if has_r and not pack:
            plgpu.wgmma(s2_ref, ar_smem, kt)
          s1 = s_ref[...]
          return s1, (s2_ref[...] if has_r and not pack else None)

        acc_t = plgpu.ACC((_ROWS, bk), jnp.float32)
        s1, s2 = pl.run_scoped(scores, acc_t, acc_t if has_r and not pack else None)
        plgpu.barrier_arrive(k_free.at[slot])
        # S1 from the q rows (0-7), S2 from the r rows (8-15, packed) or the r tile's q-row
        # half: the softmax below then runs once per real row
        if pack:
          s1, s2 = _row_half(s1, 0, interpret), _row_half(s1, 1, interpret)
        else:
          s1 = _row_half(s1, 0, interpret)
          s2 = None if s2 is None else _row_half(s2, 0, interpret)
        # keys [max(lo, t*bk), hi): a clamped tile's first keys were seen by the tile before
        j = kstart + col
        valid = (j >= jnp.maximum(lo, t * bk)) & (j < hi)
        s1 = jnp.where(valid, s1 * c_log2, -jnp.inf)
        # one SSA value per real row from here on (the carried m's halves are loop values)
        m_new = _row_half(jnp.maximum(m, s1.max(axis=1)), 0, interpret)
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # no valid key yet: exp2 -> 0
        alpha = jnp.exp2(m - m_use)
        p1 = jnp.exp2(s1 - lax.broadcast_in_dim(m_use, s1.shape, [0]))
        d1 = d1 * alpha + p1.sum(axis=1)
        if has_r:
          p2 = p1 * s2
          d2 = d2 * alpha + p2.sum(axis=1)
          hi16 = p2.astype(v_smem.dtype).astype(jnp.float32)
          pa = jnp.where(stripe == 0, p1,
                         jnp.where(stripe == 1, hi16, jnp.where(stripe == 2, p2 - hi16, 0.0)))
        else:
          pa = p1
        pa = pa.astype(v_smem.dtype)
        o = o * lax.broadcast_in_dim(alpha, o.shape, [0])
        plgpu.barrier_wait(v_bar.at[slot])
        if interpret is None:
          def pv(acc_ref):
            plgpu.wgmma(acc_ref, pa, v_smem.at[slot])
          o = pl.run_state(pv)(plgpu.ACC.init(o))
        else:
          # The GPU interpreter (jax 0.11.2) has no wgmma with a register LHS: same
          # arithmetic (16-bit operands, fp32 sums) as a plain dot.
          o = o + lax.dot(pa, v_smem.at[slot][...], preferred_element_type=jnp.float32)
          plgpu.commit_smem()   # a generic-proxy read of the slot before its TMA refill
        plgpu.barrier_arrive(v_free.at[slot])
        return o, m_new, d1, d2

      steps_c = lax.div(jnp.maximum(n - c + (nc - 1), 0), nc)
      return lax.fori_loop(0, steps_c, body, (zacc, m0, zrow, zrow))

    def hand_over(state):
      """Second consumer: its state to SMEM (O in o_scr's rows 0-63, m, d1, d2 in vec_smem:
      both untouched by the first consumer until it has read them)."""
      o, m, d1, d2 = state
      o_scr.at[pl.ds(0, _ROWS)][...] = o
      for i, x in enumerate((m, d1, d2)):
        vec_smem[i][...] = x
      plgpu.barrier_arrive(x_bar)

    def merge_from(state, where=lambda ref: ref):
      """The exact merge into `state` of the (O, m, d1, d2) stored in o_scr's rows 0-63 and
      vec_smem of this program (where: identity) or of another split in the cluster (where:
      its cluster_ref, applied to each final slice)."""
      o, m, d1, d2 = state
      o_x = plgpu.load(where(o_scr.at[pl.ds(0, _ROWS)]), layout=plgpu.Layout.WGMMA,
                       optimized=False)
      m_x, d1_x, d2_x = (plgpu.load(where(vec_smem[i]), layout=row_layout, optimized=False)
                         for i in range(3))
      m_new = jnp.maximum(m, m_x)
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      a, a_x = jnp.exp2(m - m_use), jnp.exp2(m_x - m_use)
      bc = lambda x: lax.broadcast_in_dim(x, o.shape, [0])
      return (o * bc(a) + o_x * bc(a_x), m_new, d1 * a + d1_x * a_x, d2 * a + d2_x * a_x)

    def take_over(state):
      """First consumer: the exact merge of the second consumer's state into its own."""
      plgpu.barrier_wait(x_bar)
      return merge_from(state)

    def merge_cluster(state):
      """Every split's state to its SMEM; split 0 merges the others' (distributed shared
      memory reads, after a cluster barrier) and stores o; a second barrier keeps each
      split's SMEM alive until split 0 has read it."""
      o, m, d1, d2 = state
      o_scr.at[pl.ds(0, _ROWS)][...] = o
      for i, x in enumerate((m, d1, d2)):
        vec_smem[i][...] = x
      cluster_sync()

      @pl.when(s == 0)
      def _():
        st = state
        for j in range(1, ns):
          st = merge_from(st, lambda ref, j=j: plgpu.cluster_ref(ref, {"split": j}))
        store(st, single=True)

      cluster_sync()

    def finish(state):
      if cluster:
        merge_cluster(state)
      else:
        store(state, single=ns == 1)

    def store(state, single):
      """o of one split's (or the merged) state, else the split's partials."""
      o, m, d1, d2 = state
      # O's stripes: O1 (rows 0-15), O2hi (16-31), O2lo (32-47). Read back shifted by 16
      # and 32 rows so that O2 lands on O1's rows.
      if has_r or not single:
        o_scr.at[pl.ds(0, _ROWS)][...] = o
      if single:
        o1 = o
        if has_r:
          o2 = (plgpu.load(o_scr.at[pl.ds(_STRIPE, _ROWS)], layout=plgpu.Layout.WGMMA,
                           optimized=False)
                + plgpu.load(o_scr.at[pl.ds(2 * _STRIPE, _ROWS)],
                             layout=plgpu.Layout.WGMMA, optimized=False))
        ok = d1 > 0.0
        inv = 1.0 / jnp.where(ok, d1, 1.0)
        bc = lambda x: lax.broadcast_in_dim(x, o1.shape, [0])
        if has_r:
          res = bc(1.0 + d2 * inv) * o1 * bc(inv) - o2 * bc(inv)
        else:
          res = o1 * bc(inv)
        res = jnp.where(bc(ok), res, 0.0)
        o_stage[...] = res.astype(dtype)
        plgpu.commit_smem()
        (o_ref,) = outs
        plgpu.copy_smem_to_gmem(o_stage.at[pl.ds(0, _BOX)], o_ref.at[b, h])
      else:
        vec_ref, mat_ref = outs
        for i, x in enumerate((m, d1, d2)[:nv]):
          vec_smem[i][...] = x
        plgpu.commit_smem()
        for i in range(nv):
          plgpu.copy_smem_to_gmem(vec_smem[i].at[pl.ds(0, _BOX)], vec_ref.at[b, h, s, i])
        for i in range(nm):
          plgpu.copy_smem_to_gmem(o_scr.at[pl.ds(i * _STRIPE, _BOX)], mat_ref.at[b, h, s, i])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 0)
    def _first_consumer():
      if nc > 1:
        plgpu.set_max_registers(232, action="increase")
      load_a_tiles()
      state = run_tiles(0)
      finish(take_over(state) if nc > 1 else state)

    if nc > 1:
      @pl.when(wg == 1)
      def _second_consumer():
        plgpu.set_max_registers(232, action="increase")
        hand_over(run_tiles(1))
        if cluster:  # every thread of the cluster takes part in its barriers
          cluster_sync()
          cluster_sync()

    @pl.when(wg == nc)
    def _producer():
      if nc > 1:
        plgpu.set_max_registers(40, action="decrease")

      def load(step, slot):
        kstart = jnp.minimum((t0 + step) * bk, S - bk)
        src = (b, pl.ds(kstart, bk), h)
        plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_bar.at[slot])

      for i in range(stages):
        pl.when(i < n)(functools.partial(load, i, i))

      @pl.loop(0, jnp.maximum(n - stages, 0))
      def _(step):
        slot = lax.rem(step, stages)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])
        load(step + stages, slot)

      @pl.loop(jnp.maximum(n - stages, 0), n)
      def _(step):  # observe the last releases too (the interpreter checks every phase)
        slot = lax.rem(step, stages)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])

      if cluster:
        cluster_sync()
        cluster_sync()

  n_copies = (_ROWS // _STRIPE) * (4 if has_r and not pack else 2)

  def entry(*refs):
    smem = (
        wgmma_smem((_ROWS, D), dtype),  # A: q (and r) stripes
        wgmma_smem((_ROWS, D), dtype) if has_r and not pack else None,  # A of r (unpacked)
        wgmma_smem((stages, bk, D), dtype),  # K ring
        wgmma_smem((stages, bk, D), dtype),  # V ring
        # O, read back shifted (stores of the wgmma layout need tiled, swizzled SMEM)
        plgpu.SMEM((_ROWS + 2 * _STRIPE, D), jnp.float32,
                   transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))),
        wgmma_smem((_ROWS, D), dtype),  # o staging
        # m, d1, d2 staging: one buffer each (a peer split reads them whole: a slice of
        # one buffer loses its static offset through the cluster ref's lowering)
        tuple(plgpu.SMEM((_ROWS,), jnp.float32) for _ in range(3)),
    )
    loaded = (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
              plgpu.Barrier(num_barriers=n_copies))
    free = (plgpu.Barrier(num_barriers=stages),) * 2
    handed = plgpu.Barrier() if nc > 1 else None    # second consumer's state in SMEM
    pl.run_scoped(lambda *scoped: kernel(refs, scoped), smem, loaded, free, handed,
                  collective_axes="wg")

  if ns == 1 or cluster:
    out_type = [jax.ShapeDtypeStruct((B, Hkv, _BOX, D), dtype)]
  else:
    out_type = [jax.ShapeDtypeStruct((B, Hkv, ns, nv, _BOX), jnp.float32),
                jax.ShapeDtypeStruct((B, Hkv, ns, nm, _BOX, D), jnp.float32)]
  args = (lengths, q2, k_cache, v_cache) + ((r2,) if has_r else ())
  # a cluster's CTAs are scheduled together, so split 0 can wait for the others' states
  launch = (dict(grid=(Hkv, B), grid_names=("heads", "batch"), cluster=(ns,),
                 cluster_names=("split",)) if cluster else
            dict(grid=(Hkv, B, ns), grid_names=("heads", "batch", "split")))
  return plgpu.kernel(
      entry, out_type=out_type, **launch, num_threads=nc + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret,
  )(*args)


# ----------------------------------------------------------------------------- wrappers


def _box_rows(batch: int, num_heads: int, num_kv_heads: int):
  """Rows of each (b, h)'s G query heads within its 8-row box: [B, Hkv, G] int32."""
  G = num_heads // num_kv_heads
  base = (np.arange(batch)[:, None] * num_heads + np.arange(num_kv_heads)[None, :] * G)
  return jnp.asarray((base % _BOX)[:, :, None] + np.arange(G), jnp.int32)


def _merge(vecs, mats, idx, has_r):
  """Exact merge of the split partials (XLA) of the box rows idx [B, Hkv, G]: [B, Hkv, G, D]
  fp32.

  Written elementwise over the splits (a static count, <= 64): the max, the weights, the
  sums and the division are one expression per output element, which XLA can emit as one
  loop fusion. As reductions over the split axis it took five kernels on an H100 (two
  reduces, a transpose, a divide, a convert: 7.5 us at Hq 32 / Hkv 8, B=1, L=4k, as long as
  the decode kernel's 7.7). The G rows are gathered from the merged 8-row box at the end."""
  ns = vecs.shape[2]
  vec = lambda j, i: vecs[:, :, j, i, :, None]             # [B, Hkv, 8, 1]
  mat = lambda j, i: mats[:, :, j, i]                      # [B, Hkv, 8, D]
  top = functools.reduce(jnp.maximum, (vec(j, 0) for j in range(ns)))
  top = jnp.where(top == -jnp.inf, 0.0, top)
  w = [jnp.exp2(vec(j, 0) - top) for j in range(ns)]
  total = lambda f: functools.reduce(jnp.add, (w[j] * f(j) for j in range(ns)))
  d1 = total(lambda j: vec(j, 1))
  o1 = total(lambda j: mat(j, 0))
  safe = jnp.where(d1 > 0, d1, 1.0)
  if has_r:
    d2 = total(lambda j: vec(j, 2))
    o2 = total(lambda j: mat(j, 1) + mat(j, 2))
    o = (1.0 + d2 / safe) * o1 / safe - o2 / safe
  else:
    o = o1 / safe
  o = jnp.where(d1 > 0, o, 0.0)                            # [B, Hkv, 8, D]
  return jnp.take_along_axis(o, idx[..., None], axis=2)


def parallax_decode_mgpu(q, k_cache, v_cache, r=None, *, scale, lengths, window=None,
                         config: DecodeConfig | None = None, interpret=None):
  """Decode attention of one new token per sequence with the Mosaic GPU kernel.

  Arguments as `decode_triton.parallax_decode` (q, r [B, Hq, D]; caches
  [B, S_max, Hkv, D]; lengths [B] int32: keys j < lengths[b] valid; window: keys
  j > lengths[b] - 1 - window; scale: python float). Returns o [B, Hq, D] in q's dtype.
  interpret: a plgpu.InterpretGPUParams to run on CPU (tests). Check `supported` first.
  """
  cfg = config or DecodeConfig()
  ok, why = supported(q, k_cache, v_cache, r, config=cfg,
                      platform="interpret" if interpret is not None else "cuda")
  if not ok:
    raise ValueError(f"parallax_decode_mgpu: unsupported inputs: {why}")
  if window is not None and int(window) < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  B, Hq, D = q.shape
  _, S, Hkv, _ = k_cache.shape
  G = Hq // Hkv
  bk = cfg.block_kv
  if S < bk:  # tiny caches only: pad to one tile (the padded keys are past every length)
    k_cache, v_cache = pad(k_cache, 1, bk), pad(v_cache, 1, bk)
  Sp = k_cache.shape[1]
  ns = cfg.num_splits or default_splits(B, Hkv, Sp, bk)
  if cfg.cluster_merge and cfg.num_splits is None:
    ns = min(ns, MAX_CLUSTER)
  _, ns = split_chunk(Sp, ns, bk)
  rows = -(-B * Hq // _BOX) * _BOX  # whole 8-row boxes
  q2, r2 = (None if x is None else pad(x.reshape(B * Hq, D), 0, rows) for x in (q, r))
  lengths = jnp.asarray(lengths, jnp.int32).reshape(B)
  out = _decode(lengths, q2, k_cache, v_cache, r2, num_heads=Hq, scale=float(scale),
                window=None if window is None else int(window), cfg=cfg, num_splits=ns,
                s_max=S, interpret=interpret)
  idx = _box_rows(B, Hq, Hkv)
  if ns > 1 and cfg.merge_kernel:
    return merge_partials(*out, num_heads=Hq, has_r=r is not None, out_dtype=q.dtype,
                          interpret=interpret is not None, columns=cfg.merge_columns)
  if ns == 1 or cfg.cluster_merge:
    o = jnp.take_along_axis(out[0], idx[..., None], axis=2)      # [B, Hkv, G, D]
  else:
    o = _merge(*out, idx, r is not None).astype(q.dtype)
  return o.reshape(B, Hq, D)
