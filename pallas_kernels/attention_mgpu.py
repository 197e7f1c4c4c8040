"""Hopper (sm_90a) forward kernel for Parallax / softmax attention in Pallas Mosaic GPU.

Same math and residuals as the Pallas-Triton forward (`attention_triton._fwd_kernel`), per
q-head and query row, fp32 accumulation:

    S1 = q.k * scale (log2 domain), one running max m;  P1 = exp2(S1 - m)
    S2 = r.k;  P2 = P1 * S2;  d1 = sum P1, d2 = sum P2, O1 = P1 V, O2 = P2 V
    o = (1 + d2/d1) O1/d1 - O2/d1           (r = None: o = O1/d1)

Residuals, in the Triton forward's layout so its backward consumes them unchanged:
lse [B, Hq, T] f32 = m + log2 d1 (log2 domain), and for Parallax tbar [B, Hq, T] f32 = d2/d1
and vbar [B, T, Hq, D] (input dtype) = O1/d1.

Structure (after jax/experimental/pallas/ops/gpu/attention_mgpu.py, FlashAttention-3 style):
one CTA per (head, 2 * block_q query rows, batch), three warpgroups. Warpgroup 2 is the
producer: it streams K and V tiles by TMA into a `num_stages`-deep SMEM ring guarded by
"loaded" / "consumed" barriers. Warpgroups 0 and 1 each own block_q query rows: they TMA their
Q (and R) tiles once, then per K/V tile issue S1 = Q K^T and S2 = R K^T on the tensor cores
(wgmma), do the online softmax in registers, and issue O1 += P1 V, O2 += P2 V (P from
registers, V from SMEM). A schedule barrier ping-pongs the two consumers so one's softmax
overlaps the other's matmuls.

Numerics: with bf16 inputs and r given, both PV products run in fp16 (as the Triton forward
with `BlockSizes.fp16_p2`): V is converted once outside the kernel, scaled by a power of two
so that max|v| < 2^15, and the scale is undone on vbar and o. bf16 P2 = P1 * S2 loses ~3 bits
that the output's cancellation ((1 + tbar) vbar - O2/d1) amplifies (bench/NOTES.md).

Covered (see `supported`): bf16/fp16, head_dim 64 or 128, GQA (q-head h reads kv-head
h // (Hq // Hkv)), non-causal, causal with T <= S (end-aligned, as the Triton kernel),
T a multiple of 2 * block_q and S a multiple of block_kv, segment ids (int32, any values:
every K/V tile is masked by id); no window.
Everything else goes to the Triton kernel (`attention.mosaic_fwd_call` falls back to it).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# fp16_values: the Triton forward's V -> fp16 conversion (both forwards round V the same
# way)
from pallas_kernels.common import (LOG2E, MGPU_PRODUCER_REGISTERS, check_mgpu_pipeline,
                                   fp16_values, hopper_platform, mgpu_call_ok,
                                   wgmma_smem)

_COMPUTE_WGS = 2  # consumer warpgroups per CTA (each owns block_q query rows)


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
  """Tiles of the Mosaic GPU forward.

  block_q: query rows per consumer warpgroup (a CTA covers 2 * block_q rows); must be 64
    (one wgmma M tile; more would not fit O1, O2 in registers at D=128).
  block_kv: keys per K/V tile (multiple of 64). Each consumer holds O1, O2 [block_q, D] and
    S1, S2 [block_q, block_kv] in fp32 registers: D=128 -> 64, D=64 -> 128 by default.
  num_stages: depth of the K/V SMEM ring (>= 2).
  schedule_barrier: ping-pong the two consumer warpgroups (softmax of one overlaps the
    matmuls of the other), as in attention_mgpu.
  fp16_pv: bf16 Parallax: PV products in fp16 (accuracy; see module docstring).
  split_waits: Parallax: wait for S1 alone and start its softmax (max, exp2, d1) while the
    tensor cores still compute S2, instead of waiting for both.
  consumer_registers: per-thread register cap of the consumer warpgroups (232 or 240; the
    producer gets what is left of the 64K file: 40 or 24). H100, main shape: 232 -> 240
    took the Parallax forward from 1.026 to 0.987 ms, and with split_waits to 0.970 ms.
  pin_softmax: an optimization barrier on the softmax results before the schedule barrier
    (as attention_mgpu), so the compiler cannot sink the softmax past the barrier waits.
  """
  block_q: int = 64
  block_kv: int = 64
  num_stages: int = 2
  schedule_barrier: bool = True
  fp16_pv: bool = True
  split_waits: bool = True
  consumer_registers: int = 240
  pin_softmax: bool = True

  def __post_init__(self):
    if self.block_q != 64:
      raise ValueError(f"block_q={self.block_q} must be 64")
    if self.block_kv % 64 or self.block_kv <= 0:
      raise ValueError(f"block_kv={self.block_kv} must be a positive multiple of 64")
    check_mgpu_pipeline(self.num_stages, self.consumer_registers)


def default_config(head_dim: int, parallax: bool = True) -> MgpuConfig:
  """Defaults by register budget, confirmed by `attention.main`'s H100 sweep (bench/NOTES.md
  v3).

  Parallax D=128: O1 + O2 take 128 of the 240 registers per thread, S1 + S2 at block_kv=64
  another 64 (block_kv=128 ran 2x slower). Softmax has half the accumulators, so
  block_kv=128 fits (0.88 vs 1.03 ms at block_kv=64, L=4096 non-causal).
  Parallax runs without the ping-pong schedule barrier: its spills drop (108 -> 64 bytes per
  thread) and the main shape goes 0.967 -> 0.934 ms; softmax keeps it (0.471 vs 0.514 ms).
  """
  if head_dim <= 64:
    return MgpuConfig(block_kv=128, num_stages=2, schedule_barrier=not parallax)
  return MgpuConfig(block_kv=64 if parallax else 128, num_stages=2,
                    schedule_barrier=not parallax)


def smem_bytes(cfg: MgpuConfig, head_dim: int, parallax: bool, itemsize: int = 2) -> int:
  """SMEM of the kernel's buffers: Q (+R) per consumer, the K and V rings, row vectors."""
  qr = _COMPUTE_WGS * cfg.block_q * head_dim * itemsize * (2 if parallax else 1)
  kv = 2 * cfg.num_stages * cfg.block_kv * head_dim * itemsize
  return qr + kv + 2 * _COMPUTE_WGS * 2 * cfg.block_q * 4


def supported(q, k, v, r=None, *, causal=True, window=None, q_segment_ids=None,
              kv_segment_ids=None, config: MgpuConfig | None = None,
              platform: str | None = None) -> tuple[bool, str]:
  """(True, "") if `parallax_forward_mgpu` handles these inputs, else (False, reason).

  Accepts arrays or jax.ShapeDtypeStruct. platform: None checks the default device (must be
  a CUDA GPU of compute capability 9.x, wgmma being sm_90a only); "cuda"/"gpu" skips the
  device check (e.g. for lowering on an abstract H100); "interpret" skips it too.
  """
  def tiles(D):
    cfg = config or default_config(D, r is not None)
    return (cfg, (_COMPUTE_WGS * cfg.block_q, str(_COMPUTE_WGS * cfg.block_q)),
            (cfg.block_kv, f"block_kv={cfg.block_kv}"),
            smem_bytes(cfg, D, r is not None, jnp.dtype(q.dtype).itemsize))

  ok, why = mgpu_call_ok(q, k, v, r, window, q_segment_ids, kv_segment_ids, causal, tiles)
  if not ok:
    return ok, why
  ok, why = hopper_platform(platform)
  if not ok:
    return ok, why
  if causal and platform != "interpret":
    try:  # attention_mgpu: ptxas miscompiles the causal kernel on CUDA 12.8.0 - 12.9.0
      from jax._src.lib import cuda_versions
      ver = cuda_versions.cuda_runtime_get_version() if cuda_versions else None
    except Exception:  # noqa: BLE001
      ver = None
    if ver is not None and 12080 <= ver < 12091:
      return False, f"causal masks miscompile with CUDA runtime {ver} (12.8.0 - 12.9.0)"
  return True, ""


# ----------------------------------------------------------------------------- kernel


# A jit boundary makes JAX lower the kernel once per (shapes, config) and reuse the function
# at every call site. Without it each call site gets its own Mosaic module (Pallas stamps a
# fresh `dump_basename` into each), so an unrolled 28-layer model compiled 28 identical
# kernels through ptxas (bench/NOTES.md).
@functools.partial(jax.jit, static_argnames=("causal", "cfg", "interpret"))
def _forward(q, k, v, r, params, qseg=None, kseg=None, *, causal: bool, cfg: MgpuConfig,
             interpret=None):
  """The plgpu.kernel call. params: [Hq, 2, block_q] f32 (row 0 = scale*log2e, row 1 = the
  V scale to undo), loaded into SMEM as per-row vectors (no scalar GMEM loads needed).
  qseg [B, T], kseg [B, S] int32 or None: segment ids (a query sees keys of its own id)."""
  B, T, Hq, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  G = Hq // Hkv
  dtype, vdtype = q.dtype, v.dtype
  has_r = r is not None
  has_seg = qseg is not None
  bq, bkv = cfg.block_q, cfg.block_kv
  off = S - T  # end-aligned causal: query i sits at key position i + off
  n_kv = S // bkv
  stages = min(cfg.num_stages, n_kv)
  nq = T // (_COMPUTE_WGS * bq)
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  col_layout = plgpu.Layout.WGMMA.reduce(0)

  def kernel(refs, scoped):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    r_ref = refs.pop(3) if has_r else None
    p_ref = refs[3]
    qseg_ref, kseg_ref = (refs.pop(4), refs.pop(4)) if has_seg else (None, None)
    o_ref, lse_ref = refs[4:6]
    tbar_ref, vbar_ref = refs[6:8] if has_r else (None, None)
    (q_smem2, r_smem2, k_smem, v_smem, p_smem2, row_smem2, qs_smem2, ks_smem), (
        k_bar, v_bar, q_bar, r_bar, p_bar, qs_bar, ks_bar), (k_free, v_free), sched = scoped
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    # causal: heaviest query tiles (largest index) launch first
    qt = (nq - 1 - lax.axis_index("q_seq")) if causal else lax.axis_index("q_seq")
    cta_q0 = qt * (_COMPUTE_WGS * bq)
    if causal:  # K/V tiles this CTA needs = those of its last row
      cta_steps = jnp.minimum(lax.div(cta_q0 + (_COMPUTE_WGS * bq + off + bkv - 1), bkv), n_kv)
    else:
      cta_steps = n_kv

    if cfg.schedule_barrier:
      def sched_arrive():
        plgpu.barrier_arrive(sched)

      def sched_wait():
        plgpu.barrier_wait(sched)
    else:
      sched_arrive = sched_wait = lambda: None

    def sched_sync():
      sched_arrive()
      sched_wait()

    @pl.when(wg < _COMPUTE_WGS)
    def _consumer():
      plgpu.set_max_registers(cfg.consumer_registers, action="increase")
      q_smem = q_smem2.at[wg]
      r_smem = r_smem2.at[wg] if has_r else None
      p_smem = p_smem2.at[wg]
      row_smem = row_smem2.at[wg]
      q0 = cta_q0 + wg * bq
      if causal:
        steps = jnp.minimum(lax.div(q0 + (bq + off + bkv - 1), bkv), n_kv)
        # tiles [0, full) are visible to every row of this warpgroup: no mask
        full = jnp.minimum(lax.div(q0 + (off + 1), bkv), steps)
      else:
        steps = full = n_kv

      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], q_smem, q_bar.at[wg])
      if has_r:
        plgpu.copy_gmem_to_smem(r_ref.at[b, pl.ds(q0, bq), h], r_smem, r_bar.at[wg])
      plgpu.copy_gmem_to_smem(p_ref.at[h], p_smem, p_bar.at[wg])
      if has_seg:
        plgpu.copy_gmem_to_smem(qseg_ref.at[b, pl.ds(q0, bq)], qs_smem2.at[wg], qs_bar.at[wg])
      plgpu.barrier_wait(p_bar.at[wg])
      c = plgpu.load(p_smem.at[0], layout=row_layout)  # scale * log2e, per row
      if has_seg:
        plgpu.barrier_wait(qs_bar.at[wg])
        qsv = plgpu.load(qs_smem2.at[wg], layout=row_layout)
      plgpu.barrier_wait(q_bar.at[wg])
      if has_r:
        plgpu.barrier_wait(r_bar.at[wg])

      zrow = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout)
      zacc = plgpu.layout_cast(jnp.zeros((bq, D), jnp.float32), wgmma_layout)
      m0 = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
      carry = (zacc, m0, zrow) + ((zacc, zrow) if has_r else ())

      plgpu.barrier_wait(k_bar.at[0])  # steps >= 1: T <= S causal rows all see key 0
      if has_seg:
        plgpu.barrier_wait(ks_bar.at[0])
      pl.when(wg == 1)(sched_sync)  # warpgroup 0 goes first

      def body(step, carry, masked: bool):
        if has_r:
          o1, m, d1, o2, d2 = carry
        else:
          o1, m, d1 = carry
        slot = lax.rem(step, jnp.array(stages, step.dtype))
        kt = k_smem.at[slot].transpose((1, 0))

        def softmax1(s1):  # online softmax of the S1 tile against the running max
          s1 = s1 * lax.broadcast_in_dim(c, s1.shape, [0])
          if masked:
            qi = plgpu.broadcasted_iota(jnp.int32, s1.shape, 0, layout=wgmma_layout)
            kj = plgpu.broadcasted_iota(jnp.int32, s1.shape, 1, layout=wgmma_layout)
            s1 = jnp.where(qi + (q0 + off) >= kj + step * bkv, s1, -jnp.inf)
          if has_seg:
            ksv = plgpu.load(ks_smem.at[slot], layout=col_layout)
            same = (lax.broadcast_in_dim(qsv, s1.shape, [0]) ==
                    lax.broadcast_in_dim(ksv, s1.shape, [1]))
            s1 = jnp.where(same, s1, -jnp.inf)
          m_new = jnp.maximum(m, s1.max(axis=1))
          if has_seg:  # a row may have seen no key yet: exp2(-inf - (-inf)) would be NaN
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
          else:  # every row sees key 0 first (causal T <= S, or non-causal)
            m_use = m_new
          alpha = jnp.exp2(m - m_use)
          p1 = jnp.exp2(s1 - lax.broadcast_in_dim(m_use, s1.shape, [0]))
          return m_new, alpha, p1

        def scores(s1_ref, s2_ref=None):
          plgpu.wgmma(s1_ref, q_smem, kt)
          if has_r:
            plgpu.wgmma(s2_ref, r_smem, kt)
          sched_sync()  # let the other warpgroup issue its matmuls
          if has_r and cfg.split_waits:  # S1's softmax overlaps the S2 matmul
            sm = softmax1(plgpu.wgmma_accumulator_load(s1_ref, wait_n=1))
            return sm, s2_ref[...]
          return softmax1(s1_ref[...]), (s2_ref[...] if has_r else None)

        acc_t = plgpu.ACC((bq, bkv), jnp.float32)
        (m_new, alpha, p1), s2 = pl.run_scoped(scores, *((acc_t, acc_t) if has_r else (acc_t,)))
        if has_seg:  # order the generic-proxy read of the k-id slot before its TMA refill
          plgpu.commit_smem()
        plgpu.barrier_arrive(k_free.at[slot])

        alpha2 = lax.broadcast_in_dim(alpha, o1.shape, [0])
        o1 = o1 * alpha2
        d1 = d1 * alpha + p1.sum(axis=1)
        if has_r:
          p2 = p1 * s2  # masked keys: p1 = 0 and s2 finite
          o2 = o2 * alpha2
          d2 = d2 * alpha + p2.sum(axis=1)
          p2h = p2.astype(vdtype)
        p1h = p1.astype(vdtype)
        # attention_mgpu: pinning the softmax before the barriers keeps the schedule tight
        if cfg.pin_softmax and has_r:
          o1, o2, m_new, d1, d2, p1h, p2h = lax.optimization_barrier(
              (o1, o2, m_new, d1, d2, p1h, p2h))
        elif cfg.pin_softmax:
          o1, m_new, d1, p1h = lax.optimization_barrier((o1, m_new, d1, p1h))
        sched_arrive()  # softmax done
        plgpu.barrier_wait(v_bar.at[slot])
        sched_wait()  # tensor cores free

        def wait_next_k():  # issued after the PV matmuls so the wait overlaps them
          nxt = step + 1

          @pl.when(nxt < steps)
          def _():
            plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.array(stages, step.dtype))])
            if has_seg:
              plgpu.barrier_wait(ks_bar.at[lax.rem(nxt, jnp.array(stages, step.dtype))])

        def pv(accs):
          plgpu.wgmma(accs[0], p1h, v_smem.at[slot])
          if has_r:
            plgpu.wgmma(accs[1], p2h, v_smem.at[slot])
          wait_next_k()

        accs = (o1, o2) if has_r else (o1,)
        if interpret is None:  # accumulate in place: no second [block_q, D] register block
          accs = pl.run_state(pv)(tuple(plgpu.ACC.init(a) for a in accs))
        else:
          # The GPU interpreter (jax 0.11.2) supports neither wgmma with a register LHS nor
          # pl.run_state: same arithmetic (fp16/bf16 operands, fp32 sums) as a plain dot.
          vt = v_smem.at[slot][...]
          ps = (p1h, p2h) if has_r else (p1h,)
          accs = tuple(a + lax.dot(p, vt, preferred_element_type=jnp.float32)
                       for a, p in zip(accs, ps))
          # This read is a generic-proxy SMEM access (wgmma's is async-proxy): fence it
          # before the slot is released to the TMA, as the race detector requires.
          plgpu.commit_smem()
          wait_next_k()
        plgpu.barrier_arrive(v_free.at[slot])
        if has_r:
          return accs[0], m_new, d1, accs[1], d2
        return accs[0], m_new, d1

      # `masked` adds the causal mask; with segment ids softmax1 masks every tile by id
      carry = lax.fori_loop(0, full, functools.partial(body, masked=False), carry)
      if causal:
        carry = lax.fori_loop(full, steps, functools.partial(body, masked=True), carry)

        def flush(step, _):  # tiles only the other warpgroup needs: release them
          slot = lax.rem(step, jnp.array(stages, step.dtype))
          # Observe every phase of the load barriers (free: this warpgroup is in lockstep
          # with the other through the schedule barrier anyway); the GPU interpreter
          # rejects a thread that skips a barrier phase it would later have seen.
          plgpu.barrier_wait(k_bar.at[slot])
          if has_seg:
            plgpu.barrier_wait(ks_bar.at[slot])
          plgpu.barrier_wait(v_bar.at[slot])
          plgpu.barrier_arrive(k_free.at[slot])
          plgpu.barrier_arrive(v_free.at[slot])
          sched_sync()  # the two schedule syncs a computed step does
          sched_sync()

        lax.fori_loop(steps, cta_steps, flush, None)
      pl.when(wg == 0)(sched_sync)

      if has_r:
        o1, m, d1, o2, d2 = carry
      else:
        o1, m, d1 = carry
      if has_seg:  # rows without a visible key: o = 0, lse = +inf (as the Triton forward)
        has_keys = d1 > 0.0
        d1 = jnp.where(has_keys, d1, 1.0)
      # else every row has >= 1 visible key (non-causal, or causal with T <= S)
      inv = 1.0 / d1
      if has_r:
        vmul = plgpu.load(p_smem.at[1], layout=row_layout)  # undoes the fp16 V scaling
        inv_v = lax.broadcast_in_dim(inv * vmul, o1.shape, [0])
        vbar = o1 * inv_v
        tbar = d2 * inv
        o = lax.broadcast_in_dim(1.0 + tbar, o1.shape, [0]) * vbar - o2 * inv_v
        r_smem[...] = vbar.astype(dtype)  # R no longer needed: reuse its SMEM
        row_smem.at[1][...] = tbar
      else:
        o = o1 * lax.broadcast_in_dim(inv, o1.shape, [0])
      q_smem[...] = o.astype(dtype)
      # A row with a non-finite output gets lse = NaN (o - o is 0 or NaN): a masked key's
      # non-finite value or probe score can reach it here (0 * NaN in the masked tiles'
      # products), and the Triton forward's fixup pass recomputes those rows carefully.
      lse = m + jnp.log2(d1) + (o - o).sum(axis=1)
      row_smem.at[0][...] = jnp.where(has_keys, lse, jnp.inf) if has_seg else lse
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(q0, bq), h])
      plgpu.copy_smem_to_gmem(row_smem.at[0], lse_ref.at[b, h, pl.ds(q0, bq)])
      if has_r:
        plgpu.copy_smem_to_gmem(r_smem, vbar_ref.at[b, pl.ds(q0, bq), h])
        plgpu.copy_smem_to_gmem(row_smem.at[1], tbar_ref.at[b, h, pl.ds(q0, bq)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _producer():
      plgpu.set_max_registers(MGPU_PRODUCER_REGISTERS[cfg.consumer_registers], action="decrease")
      hk = lax.div(h, jnp.array(G, h.dtype))

      def load_kseg(step, slot):
        if has_seg:
          plgpu.copy_gmem_to_smem(kseg_ref.at[b, pl.ds(step * bkv, bkv)], ks_smem.at[slot],
                                  ks_bar.at[slot])

      def load(step, slot):
        src = (b, pl.ds(step * bkv, bkv), hk)
        plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_bar.at[slot])
        load_kseg(step, slot)
        plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_bar.at[slot])

      for i in range(stages):
        # causal CTAs near the start may need fewer tiles than stages: never leave a TMA
        # in flight that no consumer waits for
        pl.when(i < cta_steps)(functools.partial(load, i, i))

      @pl.loop(0, jnp.maximum(cta_steps - stages, 0))
      def _(step):
        slot = lax.rem(step, jnp.array(stages, step.dtype))
        nxt = step + stages
        src = (b, pl.ds(nxt * bkv, bkv), hk)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_bar.at[slot])
        load_kseg(nxt, slot)
        plgpu.barrier_wait(v_free.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_bar.at[slot])

      @pl.loop(jnp.maximum(cta_steps - stages, 0), cta_steps)
      def _(step):  # observe the last releases too (the interpreter checks every phase)
        slot = lax.rem(step, jnp.array(stages, step.dtype))
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])

  def entry(*refs):
    smem = (
        wgmma_smem((_COMPUTE_WGS, bq, D), dtype),  # Q, then o
        wgmma_smem((_COMPUTE_WGS, bq, D), dtype) if has_r else None,  # R, then vbar
        wgmma_smem((stages, bkv, D), dtype),  # K ring
        wgmma_smem((stages, bkv, D), vdtype),  # V ring
        plgpu.SMEM((_COMPUTE_WGS, 2, bq), jnp.float32),  # params rows
        plgpu.SMEM((_COMPUTE_WGS, 2, bq), jnp.float32),  # lse, tbar out
        plgpu.SMEM((_COMPUTE_WGS, bq), jnp.int32) if has_seg else None,  # q segment ids
        plgpu.SMEM((stages, bkv), jnp.int32) if has_seg else None,  # k segment ids ring
    )
    loaded = (
        plgpu.Barrier(num_barriers=stages),  # K tile landed
        plgpu.Barrier(num_barriers=stages),  # V tile landed
        plgpu.Barrier(num_barriers=_COMPUTE_WGS),  # Q
        plgpu.Barrier(num_barriers=_COMPUTE_WGS) if has_r else None,  # R
        plgpu.Barrier(num_barriers=_COMPUTE_WGS),  # params
        plgpu.Barrier(num_barriers=_COMPUTE_WGS) if has_seg else None,  # q segment ids
        plgpu.Barrier(num_barriers=stages) if has_seg else None,  # k segment ids landed
    )
    free = (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 2
    sched = plgpu.Barrier(num_arrivals=_COMPUTE_WGS)
    pl.run_scoped(lambda *scoped: kernel(refs, scoped), smem, loaded, free, sched,
                  collective_axes="wg")

  rows = jax.ShapeDtypeStruct((B, Hq, T), jnp.float32)
  out_type = [jax.ShapeDtypeStruct(q.shape, dtype), rows]
  if has_r:
    out_type += [rows, jax.ShapeDtypeStruct(q.shape, dtype)]
  args = (q, k, v) + ((r,) if has_r else ()) + (params,) + ((qseg, kseg) if has_seg else ())
  outs = plgpu.kernel(
      entry,
      out_type=out_type,
      grid=(Hq, nq, B),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
  )(*args)
  # In a scanned model the outputs are also written into stacked per-layer buffers. XLA's
  # dynamic-slice fusion then clones the custom call (one copy feeding the layer, one writing
  # in place into the stack), so the kernel ran twice per layer (H100 profile,
  # bench/NOTES.md). A barrier leaves the call a single user; the stack write becomes a copy.
  outs = lax.optimization_barrier(tuple(outs))
  if has_r:
    o, lse, tbar, vbar = outs
    return o, (lse, tbar, vbar)
  o, lse = outs
  return o, (lse, None, None)


# ----------------------------------------------------------------------------- wrappers


def parallax_forward_mgpu(q, k, v, r=None, *, scale, causal=True, q_segment_ids=None,
                          kv_segment_ids=None, config: MgpuConfig | None = None,
                          interpret=None, v_fp16=None):
  """Forward of Parallax attention (softmax when r is None) with the Mosaic GPU kernel.

  q, r: [B, T, Hq, D]; k, v: [B, S, Hkv, D], as `parallax_flash_attention`. scale: python
  float, scalar or [Hq] array (1/bandwidth, 0 = uniform weights). causal: end-aligned.
  Returns (o, (lse, tbar, vbar)) as attention_triton.fwd_call returns (o, lse, tbar, vbar):
  o, vbar [B, T, Hq, D] in q's dtype, lse, tbar [B, Hq, T] f32; tbar, vbar None without r.
  q_segment_ids [B, T], kv_segment_ids [B, S] int32 (optional, both or neither): a query
  sees only keys of its own id (packed sequences); rows that see no key give o = 0 and
  lse = +inf, as the Triton forward. A row whose output is not finite gets lse = NaN (for
  the Triton forward's fixup pass, see `attention.mosaic_fwd_call`).
  interpret: a plgpu.InterpretGPUParams to run on CPU (tests). Check `supported` first.
  v_fp16: `fp16_values(v)` when the caller has it already.
  """
  B, T, Hq, D = q.shape
  cfg = config or default_config(D, r is not None)
  ok, why = supported(q, k, v, r, causal=causal, q_segment_ids=q_segment_ids,
                      kv_segment_ids=kv_segment_ids, config=cfg,
                      platform="interpret" if interpret is not None else "cuda")
  if not ok:
    raise ValueError(f"parallax_forward_mgpu: unsupported inputs: {why}")
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (Hq,))
  vmul = jnp.float32(1.0)
  if r is not None and jnp.dtype(q.dtype) == jnp.bfloat16 and cfg.fp16_pv:
    v, vmul = fp16_values(v) if v_fp16 is None else v_fp16
  params = jnp.stack([scale * LOG2E, jnp.broadcast_to(vmul, (Hq,))], axis=1)
  params = jnp.broadcast_to(params[:, :, None], (Hq, 2, cfg.block_q))
  return _forward(q, k, v, r, params, q_segment_ids, kv_segment_ids, causal=bool(causal),
                  cfg=cfg, interpret=interpret)
