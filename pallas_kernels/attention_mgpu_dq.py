"""Hopper (sm_90a) dq/dr kernel for Parallax / softmax attention in Pallas Mosaic GPU.

The math of the Triton dq/dr kernel (`attention_triton._dq_kernel`), per query row i of
q-head h and key row j of its KV head (fp32 accumulation):

    a   = exp2(q.k * scale * log2e - lse)          (lse in the log2 domain; 0 if masked)
    g   = do.v;  c = (1 + tbar) - r.k
    dtt = a (gbar - g);  ds = a (gbar - delta) - dtt c
    dq += (ds * scale) k;  dr += dtt k                 (softmax: ds = a (g - delta), no dr)

with delta = do.o and gbar = do.vbar per row, which the caller computes (one fused XLA
reduction; the dk/dv kernel needs them too).

Structure (the dk/dv kernel's, `attention_mgpu_dkv`, with the roles of queries and keys
swapped): one CTA per (q-head, 2 * 64 query rows, batch), three warpgroups. Warpgroups 0 and
1 each own 64 query rows: they load their Q, R, dO tiles and row vectors once and hold dQ,
dR [64, D] in fp32 registers. Warpgroup 2 is the producer: it streams the K, V tiles (and
key segment ids) the CTA's rows see by TMA into a `num_stages`-deep SMEM ring. Per step a
consumer issues Q K^T, dO V^T, R K^T on the tensor cores (wgmma, both operands in SMEM),
forms a, ds, dtt in registers and issues dQ += ds K, dR += dtt K with the left operand from
registers. A consumer's key tiles are those its rows see: the causal geometry (fully visible
tiles first, the diagonal's masked tiles last) and, with segment ids, the run of tiles
holding its rows' ids (`common.seg_ranges`); the CTA streams the union of its two consumers'
ranges, and each releases unread the tiles only the other needs.

Non-finite values follow the Triton kernels' protocol: this is a fast launch; it returns per
query row the sum of its dQ and dR rows, from which the caller (with delta and gbar) marks
the Triton query tiles whose results are not finite, and the Triton dq fixup launch
recomputes those (`attention.mosaic_dq_call`).

Covered (see `supported`): bf16/fp16, head_dim 64 or 128, GQA, non-causal, causal with
T <= S (end-aligned), T a multiple of 128 and S of block_k, segment ids (int32; every tile in
a consumer's range is masked by id); no window. Everything else runs the Triton kernel.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import (MGPU_PRODUCER_REGISTERS, MgpuBwdConfig, cdiv,
                                   check_mgpu_bwd_call, clamp_tile_range, cta_tile_range,
                                   hopper_platform, launch_warp_specialized, mgpu_bwd_rows,
                                   mgpu_call_ok, producer_ring, seg_ranges,
                                   wgmma_scores, wgmma_smem)

_COMPUTE_WGS = 2  # consumer warpgroups per CTA
_BLOCK_Q = 64  # query rows per consumer warpgroup: one wgmma M tile
_SR_SLOT_ROWS = 8  # rows of 4 int32 per warpgroup's segment-range slot: 128 bytes


@dataclasses.dataclass(frozen=True)
class DqConfig(MgpuBwdConfig):
  """Tiles of the Mosaic GPU dq/dr kernel (its ring streams K and V; the pipeline fields:
  `common.MgpuBwdConfig`).

  block_k: key rows per pipeline step (the N of the three [64, block_k] score tiles, the K of
    the dQ, dR products: 64 or 128, wgmma taking a register operand's K in groups of 64).
    Registers per consumer thread at D=128: dQ + dR take 128, the three fp32 score tiles 96
    at block_k=64.
  """
  block_k: int = 64

  def __post_init__(self):
    if self.block_k not in (64, 128):
      raise ValueError(f"block_k={self.block_k} must be 64 or 128")
    super().__post_init__()


def default_config(head_dim: int, parallax: bool = True) -> DqConfig:
  """block_k=64 with Parallax at D=128 (its three score tiles and dQ, dR fill ~224 of the
  240 registers); 128 where the registers allow (softmax, or D=64), halving the steps."""
  if parallax and head_dim > 64:
    return DqConfig(block_k=64, num_stages=2)
  return DqConfig(block_k=128, num_stages=2)


def smem_bytes(cfg: DqConfig, head_dim: int, parallax: bool, itemsize: int = 2) -> int:
  """SMEM of the buffers: Q (R) dO per consumer, the K V ring, row vectors, ids."""
  per_wg = _COMPUTE_WGS * _BLOCK_Q * head_dim * itemsize * (3 if parallax else 2)
  ring = cfg.num_stages * cfg.block_k * head_dim * itemsize * 2
  rows = _COMPUTE_WGS * (4 if parallax else 2) * _BLOCK_Q * 4
  return (per_wg + ring + rows + cfg.num_stages * cfg.block_k * 4
          + _COMPUTE_WGS * (_BLOCK_Q * 8 + 2 * cfg.block_k * 4))


def supported(q, k, v, r=None, *, causal=True, window=None, q_segment_ids=None,
              kv_segment_ids=None, config: DqConfig | None = None,
              platform: str | None = None) -> tuple[bool, str]:
  """(True, "") if `parallax_dq_mgpu` handles these inputs, else (False, reason). Accepts
  arrays or ShapeDtypeStructs; platform as `attention_mgpu.supported`."""
  def tiles(D):
    cfg = config or default_config(D, r is not None)
    return (cfg, (_COMPUTE_WGS * _BLOCK_Q, str(_COMPUTE_WGS * _BLOCK_Q)),
            (cfg.block_k, f"block_k={cfg.block_k}"),
            smem_bytes(cfg, D, r is not None, jnp.dtype(q.dtype).itemsize))

  ok, why = mgpu_call_ok(q, k, v, r, window, q_segment_ids, kv_segment_ids, causal, tiles)
  return hopper_platform(platform) if ok else (ok, why)


# ----------------------------------------------------------------------------- kernel


@functools.partial(jax.jit, static_argnames=("causal", "cfg", "interpret"))
def _dq(q, k, v, r, do, rows, params, qseg=None, kseg=None, srng=None, *, causal: bool,
        cfg: DqConfig, interpret=None):
  """The plgpu.kernel call. rows [B, Hq, n, T] f32: lse, delta (, 1 + tbar, gbar with r).
  params [Hq, 2, block_k] f32: row 0 = scale * log2e, row 1 = scale, per column.
  srng [B, T / 64, 4] int32 with segment ids: `common.seg_ranges` of each 64-row query
  tile, in key tiles (lo and hi used: the tiles outside are skipped).
  Returns dq (, dr) [B, T, Hq, D] (q's dtype) and rowsum [B, Hq, T] f32, the sum of each
  query row's dq (and dr) entries (non-finite iff some entry is)."""
  B, T, Hq, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  G = Hq // Hkv
  dtype = q.dtype
  has_r = r is not None
  has_seg = qseg is not None
  n_rows = rows.shape[2]
  bq, bk = _BLOCK_Q, cfg.block_k
  off = S - T  # end-aligned causal: query i sits at key position i + off
  nk = S // bk
  n_cta = T // (_COMPUTE_WGS * bq)
  stages = cfg.num_stages
  # Interpreted, each consumer loads its own key tiles into its own slot (no producer): the
  # GPU interpreter runs a warpgroup's code on XLA's CPU thread pool, where barrier waits can
  # starve the producer of a thread on small machines (see `attention_mgpu_dkv._dkv`).
  self_load = interpret is not None
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)  # one value per query row
  col_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per key column

  def k_tiles(q0):
    """Key tiles rows [q0, q0 + bq) see (causal): (full, hi): [0, full) by all of them,
    [full, hi) by some."""
    hi = jnp.minimum(cdiv(q0 + (bq + off), bk), nk)
    full = jnp.minimum(lax.div(q0 + (off + 1), bk), hi)
    return full, hi

  def kernel(refs, scoped):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    r_ref = refs.pop(3) if has_r else None
    do_ref, rows_ref, p_ref = refs[3:6]
    qseg_ref, kseg_ref, srng_ref = ((refs.pop(6), refs.pop(6), refs.pop(6)) if has_seg
                                    else (None, None, None))
    dq_ref = refs[6]
    dr_ref = refs.pop(7) if has_r else None
    sum_ref = refs[7]
    (q_smem, r_smem, do_smem, k_smem, v_smem, row_smem, qs_smem, p_smem, ks_smem, sum_smem,
     sr_smem), (q_bar, r_bar, do_bar, row_bar, qs_bar, p_bar, k_bar, v_bar, ks_bar,
                sr_bar), free = scoped
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    hk = lax.div(h, G)
    wg = lax.axis_index("wg")
    # causal: the last query rows, which see the most keys, launch first (the last wave of
    # CTAs then holds the short ones), as the forward orders its tiles
    qc = lax.axis_index("q_seq")
    q0 = ((n_cta - 1 - qc) if causal else qc) * (_COMPUTE_WGS * bq)
    if has_seg:  # every thread reads the key-tile ranges of the CTA's two query tiles
      plgpu.copy_gmem_to_smem(srng_ref.at[b, pl.ds(lax.div(q0, bq), _COMPUTE_WGS)],
                              sr_smem.at[wg, pl.ds(0, _COMPUTE_WGS)], sr_bar.at[wg])
      plgpu.barrier_wait(sr_bar.at[wg])

    def tiles(w):
      """(lo, full, hi) of consumer w: key tiles [lo, hi) its rows see, [lo, full) all of
      them (causal geometry and segment ranges)."""
      lo = jnp.int32(0)
      full, hi = k_tiles(q0 + w * bq) if causal else (jnp.int32(nk), jnp.int32(nk))
      if has_seg:  # and within the tiles its ids allow
        lo, full, hi = clamp_tile_range(lo, full, hi, sr_smem[wg, w, 0], sr_smem[wg, w, 3])
      return lo, full, hi

    ranges = [tiles(w) for w in range(_COMPUTE_WGS)]
    lo_cta, hi_cta = cta_tile_range(ranges)  # the CTA streams the union of the two
    steps = hi_cta - lo_cta

    def fetch(j, slot):  # key tile j into a ring slot
      src = (b, pl.ds(j * bk, bk), hk)
      plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_bar.at[slot])
      if has_seg:
        plgpu.copy_gmem_to_smem(kseg_ref.at[b, pl.ds(j * bk, bk)], ks_smem.at[slot],
                                ks_bar.at[slot])

    @pl.when(wg < _COMPUTE_WGS)
    def _consumer():
      plgpu.set_max_registers(cfg.consumer_registers, action="increase")
      qw = q0 + wg * bq
      lo, full, hi = clamp_tile_range(*(jnp.where(wg == 0, x, y) for x, y in zip(*ranges)),
                                      lo_cta, hi_cta)
      src = (b, pl.ds(qw, bq), h)
      plgpu.copy_gmem_to_smem(q_ref.at[src], q_smem.at[wg], q_bar.at[wg])
      if has_r:
        plgpu.copy_gmem_to_smem(r_ref.at[src], r_smem.at[wg], r_bar.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[src], do_smem.at[wg], do_bar.at[wg])
      plgpu.copy_gmem_to_smem(rows_ref.at[b, h, :, pl.ds(qw, bq)], row_smem.at[wg],
                              row_bar.at[wg])
      plgpu.copy_gmem_to_smem(p_ref.at[h], p_smem.at[wg], p_bar.at[wg])
      if has_seg:
        plgpu.copy_gmem_to_smem(qseg_ref.at[b, pl.ds(qw, bq)], qs_smem.at[wg], qs_bar.at[wg])
      for bar in (q_bar, r_bar, do_bar, row_bar, p_bar, qs_bar):
        if bar is not None:
          plgpu.barrier_wait(bar.at[wg])
      q_t, do_t = q_smem.at[wg], do_smem.at[wg]
      r_t = r_smem.at[wg] if has_r else None
      # loaded once as vectors (two registers each), broadcast to the score tile where used:
      # per row lse, delta (, 1 + tbar, gbar, gbar - delta)
      col = lambda x: lax.broadcast_in_dim(x, (bq, bk), [1])
      row = lambda x: lax.broadcast_in_dim(x, (bq, bk), [0])
      rv = [plgpu.load(row_smem.at[wg, j], layout=row_layout) for j in range(n_rows)]
      if has_r:
        rv.append(rv[3] - rv[1])
      # scalars (one register each; a per-column vector would hold block_k / 4 per thread)
      c2, sc1 = p_smem[wg, 0, 0], p_smem[wg, 1, 0]  # scale * log2e, scale
      qsv = plgpu.load(qs_smem.at[wg], layout=row_layout) if has_seg else None

      def wait_loaded(slot):
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[slot])
        if has_seg:
          plgpu.barrier_wait(ks_bar.at[slot])

      def skip(j, carry):
        # a tile only the other consumer's rows see: observe its loads (the interpreter
        # checks every barrier phase) and release it
        slot = lax.rem(j - lo_cta, jnp.array(stages, j.dtype))
        wait_loaded(slot)
        plgpu.barrier_arrive(free.at[slot])
        return carry

      def body(j, carry, masked: bool):
        if self_load:  # this consumer's own slot, loaded and awaited here
          slot = wg
          fetch(j, slot)
        else:
          slot = lax.rem(j - lo_cta, jnp.array(stages, j.dtype))
        wait_loaded(slot)
        k_t, v_t = k_smem.at[slot], v_smem.at[slot]

        scores = functools.partial(wgmma_scores, plgpu.ACC((bq, bk), jnp.float32))
        if has_r and cfg.split_scores:  # dO V^T waits until a and c are formed
          s, rk = scores((q_t, k_t), (r_t, k_t))
          g = None
        else:
          sc = scores((q_t, k_t), (do_t, v_t), *([(r_t, k_t)] if has_r else []))
          s, g = sc[:2]
          rk = sc[2] if has_r else None
        a = jnp.exp2(s * c2 - row(rv[0]))
        if masked:
          qi = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=wgmma_layout)
          kj = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=wgmma_layout)
          a = jnp.where(kj + j * bk <= qi + (qw + off), a, 0.0)
        if has_seg:
          ksv = plgpu.load(ks_smem.at[slot], layout=col_layout)
          a = jnp.where(col(ksv) == row(qsv), a, 0.0)
        if has_r:
          c = row(rv[2]) - rk  # (1 + tbar) - r.k
          if g is None:
            (g,) = scores((do_t, v_t))
          dtt = a * (row(rv[3]) - g)
          ds = (a * row(rv[4]) - dtt * c) * sc1
          lhs = (ds.astype(dtype), dtt.astype(dtype))
        else:
          lhs = ((a * (g - row(rv[1])) * sc1).astype(dtype),)

        def products(accs):
          plgpu.wgmma(accs[0], lhs[0], k_t)
          if has_r:
            plgpu.wgmma(accs[1], lhs[1], k_t)

        if interpret is None:  # accumulate in place
          carry = pl.run_state(products)(tuple(plgpu.ACC.init(x) for x in carry))
        else:
          # the GPU interpreter (jax 0.11.2) has neither a register-LHS wgmma nor
          # pl.run_state: the same arithmetic as plain dots
          f32 = functools.partial(lax.dot, preferred_element_type=jnp.float32)
          carry = tuple(x + f32(y, k_t[...]) for x, y in zip(carry, lhs))
        if has_seg or interpret is not None:
          # generic-proxy SMEM reads (ids; the interpreter's dots), before the slot goes back
          # to the TMA
          plgpu.commit_smem()
        if not self_load:
          plgpu.barrier_arrive(free.at[slot])
        return carry

      zacc = plgpu.layout_cast(jnp.zeros((bq, D), jnp.float32), wgmma_layout)
      carry = (zacc, zacc) if has_r else (zacc,)
      if not self_load:
        carry = lax.fori_loop(lo_cta, lo, skip, carry)
      carry = lax.fori_loop(lo, full, functools.partial(body, masked=False), carry)
      carry = lax.fori_loop(full, hi, functools.partial(body, masked=True), carry)
      if not self_load:
        carry = lax.fori_loop(hi, hi_cta, skip, carry)
      # Q, R no longer needed: their SMEM takes the results
      q_t[...] = carry[0].astype(dtype)
      total = carry[0].sum(axis=1)
      if has_r:
        r_t[...] = carry[1].astype(dtype)
        total = total + carry[1].sum(axis=1)
      sum_smem.at[wg][...] = total
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_t, dq_ref.at[src])
      if has_r:
        plgpu.copy_smem_to_gmem(r_t, dr_ref.at[src])
      plgpu.copy_smem_to_gmem(sum_smem.at[wg], sum_ref.at[b, h, pl.ds(qw, bq)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == (-1 if self_load else _COMPUTE_WGS))
    def _producer():
      plgpu.set_max_registers(MGPU_PRODUCER_REGISTERS[cfg.consumer_registers], action="decrease")

      producer_ring(steps, stages, lambda step, slot: fetch(lo_cta + step, slot), free)

  def entry(*refs):
    smem = (
        wgmma_smem((_COMPUTE_WGS, bq, D), dtype),  # Q, then dQ
        wgmma_smem((_COMPUTE_WGS, bq, D), dtype) if has_r else None,  # R, then dR
        wgmma_smem((_COMPUTE_WGS, bq, D), dtype),  # dO
        wgmma_smem((stages, bk, D), dtype),  # K ring
        wgmma_smem((stages, bk, D), dtype),  # V ring
        plgpu.SMEM((_COMPUTE_WGS, n_rows, bq), jnp.float32),  # row vectors
        plgpu.SMEM((_COMPUTE_WGS, bq), jnp.int32) if has_seg else None,  # q segment ids
        plgpu.SMEM((_COMPUTE_WGS, 2, bk), jnp.float32),  # the head's scales per column
        plgpu.SMEM((stages, bk), jnp.int32) if has_seg else None,  # k segment ids ring
        plgpu.SMEM((_COMPUTE_WGS, bq), jnp.float32),  # row sums out
        # segment ranges, one 128-byte slot per warpgroup: a TMA writes SMEM at 128-byte
        # aligned addresses only
        plgpu.SMEM((_COMPUTE_WGS + 1, _SR_SLOT_ROWS, 4), jnp.int32) if has_seg else None,
    )
    per_wg = lambda: plgpu.Barrier(num_barriers=_COMPUTE_WGS)
    per_slot = lambda: plgpu.Barrier(num_barriers=stages)
    loaded = (per_wg(), per_wg() if has_r else None, per_wg(), per_wg(),
              per_wg() if has_seg else None, per_wg(),
              per_slot(), per_slot(), per_slot() if has_seg else None,
              plgpu.Barrier(num_barriers=_COMPUTE_WGS + 1) if has_seg else None)
    free = plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages)
    pl.run_scoped(lambda *scoped: kernel(refs, scoped), smem, loaded, free,
                  collective_axes="wg")

  out_type = ([jax.ShapeDtypeStruct(q.shape, dtype)] * (2 if has_r else 1)
              + [jax.ShapeDtypeStruct((B, Hq, T), jnp.float32)])
  return launch_warp_specialized(
      entry, (q, k, v, r, do, rows, params, qseg, kseg, srng), out_type=out_type,
      grid=(Hq, n_cta, B), grid_names=("heads", "q_seq", "batch"), consumers=_COMPUTE_WGS,
      producer=not self_load, interpret=interpret)


# ----------------------------------------------------------------------------- wrapper


def parallax_dq_mgpu(q, k, v, r, do, lse, delta, tbar=None, gbar=None, *, scale,
                     causal=True, q_segment_ids=None, kv_segment_ids=None,
                     config: DqConfig | None = None, interpret=None):
  """dq, dr of Parallax attention (softmax when r is None) with the Mosaic GPU kernel.

  q, r, do: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; lse, tbar [B, Hq, T] f32 (the forward's
  residuals: lse in the log2 domain, +inf for rows without keys); delta = do.o and
  gbar = do.vbar [B, Hq, T] f32. scale: python float, scalar or [Hq]. Returns
  (dq, dr, rowsum): dq, dr in q's dtype (dr None without r), rowsum [B, Hq, T] f32 the sum of
  each query row's dq and dr entries (not finite iff one of them is: the caller's mark for a
  fixup). interpret: a plgpu.InterpretGPUParams to run on CPU (tests). Check `supported`.
  """
  B, T, Hq, D = q.shape
  cfg = config or default_config(D, r is not None)
  ok, why = supported(q, k, v, r, causal=causal, q_segment_ids=q_segment_ids,
                      kv_segment_ids=kv_segment_ids, config=cfg,
                      platform="interpret" if interpret is not None else "cuda")
  check_mgpu_bwd_call("parallax_dq_mgpu", (ok, why), r, tbar, gbar)
  rows, params = mgpu_bwd_rows(lse, delta, tbar if r is not None else None, gbar, scale, Hq,
                               cfg.block_k)
  srng = None
  if q_segment_ids is not None:  # key tiles each 64-row query tile's ids allow
    srng = seg_ranges(q_segment_ids, kv_segment_ids, T, k.shape[1], _BLOCK_Q, cfg.block_k)
  outs = _dq(q, k, v, r, do, rows, params, q_segment_ids, kv_segment_ids, srng,
             causal=bool(causal), cfg=cfg, interpret=interpret)
  return (outs[0], outs[1], outs[2]) if r is not None else (outs[0], None, outs[1])
