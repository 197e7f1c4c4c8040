"""Hopper (sm_90a) dk/dv kernel for Parallax / softmax attention in Pallas Mosaic GPU.

The math of the Triton dk/dv kernel (`attention_triton._dkv_kernel`), per key row j and
query row i of q-head h (transposed tiles [keys, queries], fp32 accumulation):

    a   = exp2(k.q * scale * log2e - lse)          (lse in the log2 domain; 0 if masked)
    gt  = v.do;  c = (1 + tbar) - k.r
    dtt = a (gbar - gt);  ds = a (gbar - delta) - dtt c
    dv += (a c) do;  dk += (ds * scale) q + dtt r          (softmax: c = 1, r = 0 and
                                                             ds = a (gt - delta))

summed over the q-heads of the key's GQA group. delta, gbar come from the dq kernel.

Structure (after the backward of jax/experimental/pallas/ops/gpu/attention_mgpu.py, with the
forward's hand-written producer so causal ranges can be dynamic): one CTA per (kv-head,
2 * 64 key rows, batch), three warpgroups. Warpgroups 0 and 1 each own 64 key rows: they
load their K and V tiles once and hold dK, dV [64, D] in fp32 registers. Warpgroup 2 is the
producer: it streams, for each q-head of the group and each query tile the CTA's keys see,
the Q, R, dO tiles and the row vectors (lse, delta, 1 + tbar, gbar) by TMA into a
`num_stages`-deep SMEM ring. Per step a consumer issues K Q^T, K R^T, V dO^T on the tensor
cores (wgmma, both operands in SMEM), forms a, c, ds, dtt in registers and issues
dV += (a c) dO, dK += ds Q + dtt R with the left operand from registers. A consumer's
query tiles are those its keys see: the causal geometry and, with segment ids, the run of
tiles holding its keys' ids (`common.seg_ranges`, as the Triton kernel skips them); the CTA
streams the union of its two consumers' ranges, and each releases unread the tiles only the
other needs.

Non-finite values follow the Triton kernels' protocol: this is a fast launch; it returns
per key row the sum of its dK and dV rows, from which the caller marks the Triton key tiles
whose results are not finite, and the Triton fixup launch recomputes those
(`attention.mosaic_dkv_call`).

Covered (see `supported`): bf16/fp16, head_dim 64 or 128, GQA, non-causal, causal with
T <= S (end-aligned), T a multiple of block_q and S of 128, segment ids (int32; every tile
in a consumer's range is masked by id); no window. Everything else runs the Triton kernel.
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
_BLOCK_K = 64  # key rows per consumer warpgroup: one wgmma M tile
_SR_SLOT_ROWS = 8  # rows of 4 int32 per warpgroup's segment-range slot: 128 bytes


@dataclasses.dataclass(frozen=True)
class DkvConfig(MgpuBwdConfig):
  """Tiles of the Mosaic GPU dk/dv kernel (its ring streams Q, R, dO and the row vectors;
  the pipeline fields: `common.MgpuBwdConfig`).

  block_q: query rows per pipeline step (the N of the three [64, block_q] score tiles, the K
    of the dK, dV products: 64 or 128, wgmma taking a register operand's K in groups of
    64). Registers per consumer thread at D=128: dK + dV take 128, the three fp32 score
    tiles 96 at block_q=64.
  fold_rows: the V dO^T and K R^T accumulators start at -gbar and -(1 + tbar) (per query
    column), so the products leave gt - gbar and k.r - (1 + tbar) and the step's math needs
    two per-column vectors (lse, gbar - delta) instead of four (softmax: V dO^T starts at
    -delta, one instead of two): a column vector takes block_q / 4 registers per thread
    (16 at 64 columns). On by default: 0.6-7.5% faster at every benchmarked shape on an H100
    (bench/NOTES.md), the same rounding.
  """
  block_q: int = 64
  fold_rows: bool = True

  def __post_init__(self):
    if self.block_q not in (64, 128):
      raise ValueError(f"block_q={self.block_q} must be 64 or 128")
    super().__post_init__()


def default_config(head_dim: int, parallax: bool = True) -> DkvConfig:
  """block_q=64 everywhere: at D=128 Parallax's three score tiles and dK, dV fill ~224 of
  the 240 registers."""
  del head_dim, parallax
  return DkvConfig(block_q=64, num_stages=2)


def smem_bytes(cfg: DkvConfig, head_dim: int, parallax: bool, itemsize: int = 2) -> int:
  """SMEM of the buffers: K and V per consumer, the Q (R) dO ring, row vectors, ids."""
  kv = 2 * _COMPUTE_WGS * _BLOCK_K * head_dim * itemsize
  ring = cfg.num_stages * cfg.block_q * head_dim * itemsize * (3 if parallax else 2)
  rows = cfg.num_stages * (4 if parallax else 2) * cfg.block_q * 4
  return kv + ring + rows + cfg.num_stages * cfg.block_q * 4 + _COMPUTE_WGS * _BLOCK_K * 12


def supported(q, k, v, r=None, *, causal=True, window=None, q_segment_ids=None,
              kv_segment_ids=None, config: DkvConfig | None = None,
              platform: str | None = None) -> tuple[bool, str]:
  """(True, "") if `parallax_dkv_mgpu` handles these inputs, else (False, reason). Accepts
  arrays or ShapeDtypeStructs; platform as `attention_mgpu.supported`."""
  def tiles(D):
    cfg = config or default_config(D, r is not None)
    return (cfg, (cfg.block_q, f"block_q={cfg.block_q}"),
            (_COMPUTE_WGS * _BLOCK_K, str(_COMPUTE_WGS * _BLOCK_K)),
            smem_bytes(cfg, D, r is not None, jnp.dtype(q.dtype).itemsize))

  ok, why = mgpu_call_ok(q, k, v, r, window, q_segment_ids, kv_segment_ids, causal, tiles)
  return hopper_platform(platform) if ok else (ok, why)


# ----------------------------------------------------------------------------- kernel


@functools.partial(jax.jit, static_argnames=("causal", "cfg", "interpret"))
def _dkv(q, k, v, r, do, rows, params, qseg=None, kseg=None, srng=None, *, causal: bool,
         cfg: DkvConfig, interpret=None):
  """The plgpu.kernel call. rows [B, Hq, n, T] f32: lse, delta (, 1 + tbar, gbar with r).
  params [Hq, 2, block_q] f32: row 0 = scale * log2e, row 1 = scale, per column.
  srng [B, S / 64, 4] int32 with segment ids: `common.seg_ranges` of each 64-key tile, in
  query tiles (lo and hi used: the tiles outside are skipped).
  Returns dk, dv [B, S, Hkv, D] (k's dtype) and rowsum [B, Hkv, S] f32, the sum of each
  key row's dk and dv entries (non-finite iff some entry is)."""
  B, T, Hq, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  G = Hq // Hkv
  dtype = k.dtype
  has_r = r is not None
  has_seg = qseg is not None
  n_rows = rows.shape[2]
  bq, bk = cfg.block_q, _BLOCK_K
  off = S - T  # end-aligned causal: query i sits at key position i + off
  nq = T // bq
  n_cta = S // (_COMPUTE_WGS * bk)
  stages = cfg.num_stages
  # The GPU interpreter runs each warpgroup's code as a computation on XLA's CPU thread
  # pool, and a barrier wait blocks its pool thread: on a 2-core machine the two consumers
  # waiting for the producer's first loads can leave it no thread to run on (a deadlock).
  # Interpreted, each consumer loads its own tiles into its own slot instead (no producer):
  # the same tiles, masks and arithmetic; the producer's ring runs on GPUs only.
  self_load = interpret is not None
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)  # one value per key row
  col_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per query column

  def q_tile_lo(kb):
    """First query tile that key rows [kb, kb + bk) see (causal), and the first that all of
    them see."""
    lo = lax.div(jnp.maximum(kb - off, 0), bq)
    full = jnp.minimum(cdiv(jnp.maximum(kb + (bk - 1 - off), 0), bq), nq)
    return lo, full

  def kernel(refs, scoped):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    r_ref = refs.pop(3) if has_r else None
    do_ref, rows_ref, p_ref = refs[3:6]
    qseg_ref, kseg_ref, srng_ref = ((refs.pop(6), refs.pop(6), refs.pop(6)) if has_seg
                                    else (None, None, None))
    dk_ref, dv_ref, sum_ref = refs[6:9]
    (k_smem, v_smem, q_smem, r_smem, do_smem, row_smem, qs_smem, p_smem2, ks_smem, sum_smem,
     sr_smem), (k_bar, v_bar, p_bar, ks_bar, q_bar, r_bar, do_bar, row_bar, qs_bar,
                sr_bar), free = scoped
    b = lax.axis_index("batch")
    hk = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    k0 = lax.axis_index("kv_seq") * (_COMPUTE_WGS * bk)
    if has_seg:  # every thread reads the query-tile ranges of the CTA's two key tiles
      plgpu.copy_gmem_to_smem(srng_ref.at[b, pl.ds(lax.div(k0, bk), _COMPUTE_WGS)],
                              sr_smem.at[wg, pl.ds(0, _COMPUTE_WGS)], sr_bar.at[wg])
      plgpu.barrier_wait(sr_bar.at[wg])

    def tiles(w):
      """(lo, full, hi) of consumer w: query tiles [lo, hi) its keys see, [full, hi) all of
      them (causal geometry and segment ranges)."""
      lo, full = q_tile_lo(k0 + w * bk) if causal else (jnp.int32(0), jnp.int32(0))
      hi = jnp.int32(nq)
      if has_seg:  # and within the tiles its ids allow
        lo, full, hi = clamp_tile_range(lo, full, hi, sr_smem[wg, w, 0], sr_smem[wg, w, 3])
      return lo, full, hi

    ranges = [tiles(w) for w in range(_COMPUTE_WGS)]
    lo_cta, hi_cta = cta_tile_range(ranges)  # the CTA streams the union of the two
    n_i = hi_cta - lo_cta  # query tiles per q-head
    steps = G * n_i

    def fetch(g, i, slot):  # query tile i of the group's q-head g into a ring slot
      h = hk * G + g
      src = (b, pl.ds(i * bq, bq), h)
      plgpu.copy_gmem_to_smem(q_ref.at[src], q_smem.at[slot], q_bar.at[slot])
      if has_r:
        plgpu.copy_gmem_to_smem(r_ref.at[src], r_smem.at[slot], r_bar.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[src], do_smem.at[slot], do_bar.at[slot])
      plgpu.copy_gmem_to_smem(rows_ref.at[b, h, :, pl.ds(i * bq, bq)], row_smem.at[slot],
                              row_bar.at[slot])
      if has_seg:
        plgpu.copy_gmem_to_smem(qseg_ref.at[b, pl.ds(i * bq, bq)], qs_smem.at[slot],
                                qs_bar.at[slot])

    @pl.when(wg < _COMPUTE_WGS)
    def _consumer():
      plgpu.set_max_registers(cfg.consumer_registers, action="increase")
      kb = k0 + wg * bk
      lo, full, hi = clamp_tile_range(*(jnp.where(wg == 0, x, y) for x, y in zip(*ranges)),
                                      lo_cta, hi_cta)
      src = (b, pl.ds(kb, bk), hk)
      plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[wg], k_bar.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[wg], v_bar.at[wg])
      p_smem = p_smem2.at[wg]
      plgpu.copy_gmem_to_smem(p_ref.at[pl.ds(hk * G, G)], p_smem, p_bar.at[wg])
      if has_seg:
        plgpu.copy_gmem_to_smem(kseg_ref.at[b, pl.ds(kb, bk)], ks_smem.at[wg], ks_bar.at[wg])
      plgpu.barrier_wait(p_bar.at[wg])
      if has_seg:
        plgpu.barrier_wait(ks_bar.at[wg])
        ksv = plgpu.load(ks_smem.at[wg], layout=row_layout)
      plgpu.barrier_wait(k_bar.at[wg])
      plgpu.barrier_wait(v_bar.at[wg])
      k_t, v_t = k_smem.at[wg], v_smem.at[wg]

      def wait_loaded(slot):
        plgpu.barrier_wait(q_bar.at[slot])
        if has_r:
          plgpu.barrier_wait(r_bar.at[slot])
        plgpu.barrier_wait(do_bar.at[slot])
        plgpu.barrier_wait(row_bar.at[slot])
        if has_seg:
          plgpu.barrier_wait(qs_bar.at[slot])

      def skip(i, carry, base):
        # a tile only the other consumer's keys see: observe its loads (the interpreter
        # checks every barrier phase) and release it
        slot = lax.rem(base + i, jnp.array(stages, i.dtype))
        wait_loaded(slot)
        plgpu.barrier_arrive(free.at[slot])
        return carry

      def body(i, carry, base, g, scales, masked: bool):
        dk, dv = carry
        if self_load:  # this consumer's own slot, loaded and awaited here
          slot = wg
          fetch(g, i, slot)
        else:
          slot = lax.rem(base + i, jnp.array(stages, i.dtype))
        wait_loaded(slot)
        q_t, do_t = q_smem.at[slot], do_smem.at[slot]
        r_t = r_smem.at[slot] if has_r else None

        scores = functools.partial(wgmma_scores, plgpu.ACC((bk, bq), jnp.float32),
                                   interpret=interpret is not None)
        col = lambda x: lax.broadcast_in_dim(x, (bk, bq), [1])
        row_vec = lambda j: col(plgpu.load(row_smem.at[slot, j], layout=col_layout))
        fold = cfg.fold_rows
        zscore = lambda: plgpu.layout_cast(jnp.zeros((bk, bq), jnp.float32), wgmma_layout)
        # with fold: gt - gbar (softmax: gt - delta) and k.r - (1 + tbar) from accumulators
        # started at -gbar (-delta) and -(1 + tbar)
        gt_init = lambda: -row_vec(3 if has_r else 1)
        kr_init = lambda: -row_vec(2)
        if has_r and cfg.split_scores:  # V dO^T waits until a and c are formed
          s, kr = (scores((k_t, q_t), (k_t, r_t), inits=(zscore(), kr_init())) if fold
                   else scores((k_t, q_t), (k_t, r_t)))
          gt = None
        else:
          pairs = ((k_t, q_t), (v_t, do_t), *([(k_t, r_t)] if has_r else []))
          inits = (zscore(), gt_init()) + ((kr_init(),) if has_r else ())
          sc = scores(*pairs, inits=inits) if fold else scores(*pairs)
          s, gt = sc[:2]
          kr = sc[2] if has_r else None
        c2, sc1 = scales  # scale * log2e, scale
        a = jnp.exp2(s * c2 - row_vec(0))
        if masked:
          kj = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=wgmma_layout)
          qi = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=wgmma_layout)
          a = jnp.where(kj + kb <= qi + (i * bq + off), a, 0.0)
        if has_seg:
          qsv = plgpu.load(qs_smem.at[slot], layout=col_layout)
          same = (lax.broadcast_in_dim(ksv, s.shape, [0]) ==
                  lax.broadcast_in_dim(qsv, s.shape, [1]))
          a = jnp.where(same, a, 0.0)
        delta = row_vec(1)
        if fold and not has_r:  # gt = v.do - delta
          pv = a.astype(dtype)
          lhs = ((a * gt * sc1).astype(dtype),)
        elif fold:  # kr = k.r - (1 + tbar) = -c, gt = v.do - gbar
          if gt is None:
            (gt,) = scores((v_t, do_t), inits=(gt_init(),))
          dtt = -a * gt
          ds = a * ((row_vec(3) - delta) - gt * kr) * sc1
          pv = (-a * kr).astype(dtype)
          lhs = (ds.astype(dtype), dtt.astype(dtype))
        elif has_r:
          c = row_vec(2) - kr  # (1 + tbar) - k.r
          if gt is None:
            (gt,) = scores((v_t, do_t))
          gbar = row_vec(3)
          dtt = a * (gbar - gt)
          ds = (a * (gbar - delta) - dtt * c) * sc1
          pv = (a * c).astype(dtype)
          lhs = (ds.astype(dtype), dtt.astype(dtype))
        else:
          pv = a.astype(dtype)
          lhs = ((a * (gt - delta) * sc1).astype(dtype),)

        def products(accs):
          dv_acc, dk_acc = accs
          plgpu.wgmma(dv_acc, pv, do_t)
          plgpu.wgmma(dk_acc, lhs[0], q_t)
          if has_r:
            plgpu.wgmma(dk_acc, lhs[1], r_t)

        if interpret is None:  # accumulate in place
          dv, dk = pl.run_state(products)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
        else:
          # the GPU interpreter (jax 0.11.2) has neither a register-LHS wgmma nor
          # pl.run_state: the same arithmetic as plain dots
          f32 = functools.partial(lax.dot, preferred_element_type=jnp.float32)
          dv = dv + f32(pv, do_t[...])
          dk = dk + f32(lhs[0], q_t[...])
          if has_r:
            dk = dk + f32(lhs[1], r_t[...])
        if has_seg or interpret is not None:
          # generic-proxy SMEM reads (ids; the interpreter's dots), before the slot goes back
          # to the TMA
          plgpu.commit_smem()
        if not self_load:
          plgpu.barrier_arrive(free.at[slot])
        return dk, dv

      def head(g, carry):
        base = g * n_i - lo_cta  # step of query tile i = base + i
        # q-head g's constants, once per head: scale * log2e, scale, as scalars (a register
        # each; a per-column vector holds block_q / 4 per thread)
        scales = (p_smem[g, 0, 0], p_smem[g, 1, 0])
        step = functools.partial(body, base=base, g=g, scales=scales)
        if not self_load:
          carry = lax.fori_loop(lo_cta, lo, functools.partial(skip, base=base), carry)
        carry = lax.fori_loop(lo, full, functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(full, hi, functools.partial(step, masked=False), carry)
        if not self_load:
          carry = lax.fori_loop(hi, hi_cta, functools.partial(skip, base=base), carry)
        return carry

      zacc = plgpu.layout_cast(jnp.zeros((bk, D), jnp.float32), wgmma_layout)
      dk, dv = lax.fori_loop(0, G, head, (zacc, zacc))
      k_t[...] = dk.astype(dtype)  # K, V no longer needed: their SMEM takes the results
      v_t[...] = dv.astype(dtype)
      sum_smem.at[wg][...] = dk.sum(axis=1) + dv.sum(axis=1)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_t, dk_ref.at[src])
      plgpu.copy_smem_to_gmem(v_t, dv_ref.at[src])
      plgpu.copy_smem_to_gmem(sum_smem.at[wg], sum_ref.at[b, hk, pl.ds(kb, bk)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == (-1 if self_load else _COMPUTE_WGS))
    def _producer():
      plgpu.set_max_registers(MGPU_PRODUCER_REGISTERS[cfg.consumer_registers], action="decrease")

      def load(step, slot):
        g = lax.div(step, n_i)
        fetch(g, lo_cta + step - g * n_i, slot)

      producer_ring(steps, stages, load, free)

  def entry(*refs):
    smem = (
        wgmma_smem((_COMPUTE_WGS, bk, D), dtype),  # K, then dK
        wgmma_smem((_COMPUTE_WGS, bk, D), dtype),  # V, then dV
        wgmma_smem((stages, bq, D), dtype),  # Q ring
        wgmma_smem((stages, bq, D), dtype) if has_r else None,  # R ring
        wgmma_smem((stages, bq, D), dtype),  # dO ring
        plgpu.SMEM((stages, n_rows, bq), jnp.float32),  # row vectors ring
        plgpu.SMEM((stages, bq), jnp.int32) if has_seg else None,  # q segment ids ring
        plgpu.SMEM((_COMPUTE_WGS, G, 2, bq), jnp.float32),  # params of the group's heads
        plgpu.SMEM((_COMPUTE_WGS, bk), jnp.int32) if has_seg else None,  # k segment ids
        plgpu.SMEM((_COMPUTE_WGS, bk), jnp.float32),  # row sums out
        # segment ranges, one 128-byte slot per warpgroup: a TMA writes SMEM at 128-byte
        # aligned addresses only (a 32-byte slot faults with a misaligned address)
        plgpu.SMEM((_COMPUTE_WGS + 1, _SR_SLOT_ROWS, 4), jnp.int32) if has_seg else None,
    )
    per_wg = lambda: plgpu.Barrier(num_barriers=_COMPUTE_WGS)
    per_slot = lambda: plgpu.Barrier(num_barriers=stages)
    loaded = (per_wg(), per_wg(), per_wg(), per_wg() if has_seg else None,
              per_slot(), per_slot() if has_r else None, per_slot(), per_slot(),
              per_slot() if has_seg else None,
              plgpu.Barrier(num_barriers=_COMPUTE_WGS + 1) if has_seg else None)
    free = plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages)
    pl.run_scoped(lambda *scoped: kernel(refs, scoped), smem, loaded, free,
                  collective_axes="wg")

  out_type = [jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(k.shape, dtype),
              jax.ShapeDtypeStruct((B, Hkv, S), jnp.float32)]
  return launch_warp_specialized(
      entry, (q, k, v, r, do, rows, params, qseg, kseg, srng), out_type=out_type,
      grid=(Hkv, n_cta, B), grid_names=("heads", "kv_seq", "batch"), consumers=_COMPUTE_WGS,
      producer=not self_load, interpret=interpret)


# ----------------------------------------------------------------------------- wrapper


def parallax_dkv_mgpu(q, k, v, r, do, lse, delta, tbar=None, gbar=None, *, scale,
                      causal=True, q_segment_ids=None, kv_segment_ids=None,
                      config: DkvConfig | None = None, interpret=None):
  """dk, dv of Parallax attention (softmax when r is None) with the Mosaic GPU kernel.

  q, r, do: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; lse, tbar [B, Hq, T] f32 (the forward's
  residuals: lse in the log2 domain, +inf for rows without keys), delta, gbar [B, Hq, T]
  f32 (the dq kernel's: zero for such rows). scale: python float, scalar or [Hq]. Returns
  (dk, dv, rowsum): dk, dv in k's dtype, rowsum [B, Hkv, S] f32 the sum of each key row's
  dk and dv entries (not finite iff one of them is: the caller's mark for a fixup).
  interpret: a plgpu.InterpretGPUParams to run on CPU (tests). Check `supported` first.
  """
  B, T, Hq, D = q.shape
  cfg = config or default_config(D, r is not None)
  ok, why = supported(q, k, v, r, causal=causal, q_segment_ids=q_segment_ids,
                      kv_segment_ids=kv_segment_ids, config=cfg,
                      platform="interpret" if interpret is not None else "cuda")
  check_mgpu_bwd_call("parallax_dkv_mgpu", (ok, why), r, tbar, gbar)
  rows, params = mgpu_bwd_rows(lse, delta, tbar if r is not None else None, gbar, scale, Hq,
                               cfg.block_q)
  srng = None
  if q_segment_ids is not None:  # query tiles each 64-key tile's ids allow
    srng = seg_ranges(kv_segment_ids, q_segment_ids, k.shape[1], T, _BLOCK_K, cfg.block_q)
  return _dkv(q, k, v, r, do, rows, params, q_segment_ids, kv_segment_ids, srng,
              causal=bool(causal), cfg=cfg, interpret=interpret)
