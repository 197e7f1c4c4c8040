"""Fused Parallax / softmax attention for training: the entry point over the kernels.

`parallax_flash_attention` checks its inputs, pads T and S to the tiles and D to a power of
two (>= 16), fits the tile sizes to the sequence (`BlockSizes`, by default from
`default_block_sizes`) and runs a `custom_vjp`:

  * forward: on Hopper the Mosaic GPU kernel (`attention_mgpu`) where it covers the call (no
    window, aligned lengths; `BlockSizes.mosaic_forward`), followed by the Triton forward's
    fixup launch on the rows it marked non-finite (`mosaic_fwd_call`); else, and in
    interpret mode, the Triton forward (`attention_triton.fwd_call`). Both leave the same
    residuals (o, lse, tbar, vbar).
  * backward: the Triton dq/dr kernel and the Triton dk/dv kernel (`attention_triton`), or
    on Hopper with `BlockSizes.mosaic_dq` / `mosaic_dkv` (the latter on in the default
    table for softmax and D=64) the Mosaic GPU dq/dr (`attention_mgpu_dq`) / dk/dv
    (`attention_mgpu_dkv`) kernel where it covers the call, followed by the Triton kernel's
    fixup launch on the tiles it marked (`mosaic_dq_call`, `mosaic_dkv_call`).

The kernels' math, masks and non-finite handling: `attention_triton`, docs/attention.md.
The kernel modules import only `pallas_kernels.common`; this module imports them.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import attention_mgpu as mgpu
from pallas_kernels import attention_mgpu_dkv as mgpu_dkv
from pallas_kernels import attention_mgpu_dq as mgpu_dq
from pallas_kernels.attention_triton import (BlockSizes, CallConfig, default_block_sizes,
                                             dkv_call, dq_call, fwd_call)
from pallas_kernels.common import (SUPPORTED_DTYPES, fp16_values, next_pow2, nonfinite, pad,
                                   round_up)

MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- custom_vjp

ATTN_RESIDUALS = "attn_residuals"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, r, scale, qseg, kseg):
  return _forward(cfg, q, k, v, r, scale, qseg, kseg)[0]


def _forward(cfg, q, k, v, r, scale, qseg, kseg):
  if cfg.blocks.mosaic_forward and not cfg.interpret:
    return mosaic_fwd_call(cfg, q, k, v, r, scale, qseg, kseg)
  return fwd_call(cfg, q, k, v, r, scale, qseg, kseg)


def _flash_fwd(cfg, q, k, v, r, scale, qseg, kseg):
  # symbolic_zeros=True: primals arrive wrapped with a `perturbed` flag; dscale is only
  # computed when the scale array is being differentiated.
  need_dscale = cfg.need_dscale and scale.perturbed
  q, k, v, r, scale, qseg, kseg = (
      None if x is None else x.value for x in (q, k, v, r, scale, qseg, kseg))
  o, lse, tbar, vbar = _forward(cfg, q, k, v, r, scale, qseg, kseg)
  # Named so a remat policy can keep them (`save_only_these_names(ATTN_RESIDUALS)`): without
  # it, a rematerialised layer reruns this forward kernel in its backward pass.
  o, lse, tbar, vbar = (checkpoint_name(x, ATTN_RESIDUALS) for x in (o, lse, tbar, vbar))
  flag = jnp.zeros((0,), jnp.float32) if need_dscale else None
  return o, (q, k, v, r, scale, qseg, kseg, o, lse, tbar, vbar, flag)


def _flash_bwd(cfg, res, do):
  q, k, v, r, scale, qseg, kseg, o, lse, tbar, vbar, flag = res
  cfg = dataclasses.replace(cfg, need_dscale=flag is not None)
  if isinstance(do, jax.custom_derivatives.SymbolicZero):
    do = jnp.zeros(o.shape, o.dtype)
  do = do.astype(q.dtype)
  dqf = mosaic_dq_call if cfg.blocks.mosaic_dq and not cfg.interpret else dq_call
  dq, dr, delta, gbar, qdq = dqf(cfg, q, k, v, r, do, o, vbar, lse, tbar, scale, qseg, kseg)
  dkv = mosaic_dkv_call if cfg.blocks.mosaic_dkv and not cfg.interpret else dkv_call
  dk, dv = dkv(cfg, q, k, v, r, do, lse, delta, tbar, gbar, scale, qseg, kseg)
  if cfg.need_dscale:
    dscale = jnp.sum(qdq, axis=(0, 2))
  else:
    dscale = jnp.zeros_like(scale)
  return dq, dk, dv, dr, dscale, None, None


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------- Mosaic GPU forward


def mosaic_fwd_call(tcfg, q, k, v, r, scale, qseg, kseg, *,
                    config: mgpu.MgpuConfig | None = None):
  """Drop-in replacement for `attention_triton.fwd_call(cfg, q, k, v, r, scale, qseg, kseg)`
  (same arguments and (o, lse, tbar, vbar) result): the Mosaic GPU kernel when it supports
  the call, else the Triton forward. `_forward` calls it when `BlockSizes.mosaic_forward`."""
  mg = tcfg.window is None and not tcfg.interpret and tcfg.Dv is None  # one head dim
  # padded keys would need masking; zero-padded head dims are harmless (Dp = D here anyway)
  mg = mg and tcfg.Tp == tcfg.T and tcfg.Sp == tcfg.S
  cfg = config or mgpu.default_config(q.shape[-1], tcfg.has_r)
  if tcfg.has_r and jnp.dtype(q.dtype) == jnp.bfloat16:
    cfg = dataclasses.replace(cfg, fp16_pv=tcfg.fp16_pv)  # follow BlockSizes.fp16_p2
  if mg:
    mg, _ = mgpu.supported(q, k, v, r, causal=tcfg.causal, q_segment_ids=qseg,
                           kv_segment_ids=kseg, config=cfg)
  if not mg:
    return fwd_call(tcfg, q, k, v, r, scale, qseg, kseg)
  v_fp16 = fp16_values(v) if tcfg.fp16_pv else None    # one conversion for both kernels
  outs = mgpu.parallax_forward_mgpu(q, k, v, r, scale=scale, causal=tcfg.causal,
                                    q_segment_ids=qseg, kv_segment_ids=kseg, config=cfg,
                                    v_fp16=v_fp16)
  return mosaic_fixup(tcfg, q, k, v, r, scale, qseg, kseg, outs, v_fp16=v_fp16)


def mosaic_fixup(tcfg, q, k, v, r, scale, qseg, kseg, outs, *, v_fp16=None):
  """The Mosaic GPU forward's (o, (lse, tbar, vbar)) with the rows it marked (lse = NaN: a
  non-finite output) recomputed by the Triton forward's careful pass, in place: tiles
  without a mark return at once (one small launch when every value is finite)."""
  o, (lse, tbar, vbar) = outs
  outs = fwd_call(tcfg, q, k, v, r, scale, qseg, kseg, fixup=(o, lse, tbar, vbar),
                  v_fp16=v_fp16)
  # As `attention_mgpu._forward`'s outputs: a single user, so a scanned model's
  # stacked-residual writes do not clone the call.
  return lax.optimization_barrier(tuple(outs))


# ----------------------------------------------------------------------------- Mosaic GPU backward


def _mosaic_bwd_covers(kernel, tcfg, q, k, v, r, qseg, kseg, config, interpret) -> bool:
  """Whether a Mosaic GPU backward kernel module (`mgpu_dq`, `mgpu_dkv`) takes this call: no
  window, unpadded lengths (padded rows or keys would need masking), its `supported`; on
  the GPU only unless `interpret` (tests) is given."""
  if tcfg.window is not None or (interpret is None and tcfg.interpret) or tcfg.Dv is not None:
    return False
  if tcfg.Tp != tcfg.T or tcfg.Sp != tcfg.S:
    return False
  return kernel.supported(q, k, v, r, causal=tcfg.causal, q_segment_ids=qseg,
                          kv_segment_ids=kseg, config=config,
                          platform="interpret" if interpret is not None else None)[0]


def _marks(rowsum, tile: int):
  """[B, H, L / tile] f32: 1 where a tile of rows holds a non-finite row sum."""
  B, H, L = rowsum.shape
  return jnp.max(nonfinite(rowsum).reshape(B, H, L // tile, tile), axis=-1)


def mosaic_dq_call(tcfg, q, k, v, r, do, o, vbar, lse, tbar, scale, qseg, kseg, *,
                   config: mgpu_dq.DqConfig | None = None, interpret=None):
  """Drop-in replacement for `attention_triton.dq_call` (same arguments and (dq, dr, delta,
  gbar, qdq) result): delta = do.o and gbar = do.vbar in XLA, the Mosaic GPU kernel when it
  supports the call, then the Triton dq fixup launch on every Triton query tile holding a
  row whose dq, dr, delta or gbar is not finite; else the Triton kernel. interpret (tests):
  a plgpu.InterpretGPUParams for the Mosaic kernel, with an interpret-mode `tcfg` for the
  Triton launches."""
  # the kernel writes no q.dq rows, which a differentiated scale needs
  if tcfg.need_dscale or not _mosaic_bwd_covers(mgpu_dq, tcfg, q, k, v, r, qseg, kseg, config,
                                                interpret):
    return dq_call(tcfg, q, k, v, r, do, o, vbar, lse, tbar, scale, qseg, kseg)
  # The Triton fast launch's preprocess, as it computes it: no select on dead rows (their
  # NaN o marks them, and the fixup zeroes them)
  row_dot = lambda x: jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32),
                                 x.astype(jnp.float32))
  delta = row_dot(o)
  gbar = row_dot(vbar) if r is not None else None
  dq, dr, rowsum = mgpu_dq.parallax_dq_mgpu(
      q, k, v, r, do, lse, delta, tbar, gbar, scale=scale, causal=tcfg.causal,
      q_segment_ids=qseg, kv_segment_ids=kseg, config=config, interpret=interpret)
  # the fixup's tiles (T = Tp is a multiple of them); a non-finite delta or gbar marks too
  flags = _marks(rowsum + delta + (0.0 if gbar is None else gbar), tcfg.blocks.block_q_dq)
  return dq_call(tcfg, q, k, v, r, do, o, vbar, lse, tbar, scale, qseg, kseg,
                 fixup=(dq, dr, delta, gbar, None, flags))


def mosaic_dkv_call(tcfg, q, k, v, r, do, lse, delta, tbar, gbar, scale, qseg, kseg, *,
                    config: mgpu_dkv.DkvConfig | None = None, interpret=None):
  """Drop-in replacement for `attention_triton.dkv_call` (same arguments and (dk, dv)
  result): the Mosaic GPU kernel when it supports the call, then the Triton dk/dv fixup
  launch on every Triton key tile holding a key row whose dk or dv is not finite; else the
  Triton kernel. interpret (tests): a plgpu.InterpretGPUParams for the Mosaic kernel, with
  an interpret-mode `tcfg` for the Triton launches."""
  if not _mosaic_bwd_covers(mgpu_dkv, tcfg, q, k, v, r, qseg, kseg, config, interpret):
    return dkv_call(tcfg, q, k, v, r, do, lse, delta, tbar, gbar, scale, qseg, kseg)
  dk, dv, rowsum = mgpu_dkv.parallax_dkv_mgpu(
      q, k, v, r, do, lse, delta, tbar, gbar, scale=scale, causal=tcfg.causal,
      q_segment_ids=qseg, kv_segment_ids=kseg, config=config, interpret=interpret)
  flags = _marks(rowsum, tcfg.blocks.block_k_dkv)  # the fixup's tiles: S = Sp is a multiple
  return dkv_call(tcfg, q, k, v, r, do, lse, delta, tbar, gbar, scale, qseg, kseg,
                  fixup=(dk, dv, flags))


# ----------------------------------------------------------------------------- public API


def is_supported(q, k, v, r=None, *, window=None, q_segment_ids=None, kv_segment_ids=None,
                 interpret=False, platform=None) -> tuple[bool, str]:
  """(True, "") if `parallax_flash_attention` can run these inputs, else (False, reason).

  Accepts arrays or jax.ShapeDtypeStruct. `platform` defaults to the default backend; the
  kernel runs on "gpu"/"cuda" (or anywhere with interpret=True).
  """
  try:
    _check_inputs(q, k, v, r, window, q_segment_ids, kv_segment_ids)
  except ValueError as e:
    return False, str(e)
  if not interpret:
    platform = platform or jax.default_backend()
    if platform not in ("gpu", "cuda", "rocm"):
      return False, f"the Pallas Triton kernel needs a GPU (platform is {platform!r})"
  return True, ""


def _check_inputs(q, k, v, r, window, q_segment_ids, kv_segment_ids):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"expected [B, L, H, D] inputs, got {q.shape=}, {k.shape=}, {v.shape=}")
  B, T, Hq, D = q.shape
  if k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[3] != D:
    raise ValueError(f"k must be [B, S, Hkv, {D}] and v [B, S, Hkv, Dv], got {k.shape=}, "
                     f"{v.shape=}")
  if v.shape[3] > MAX_HEAD_DIM:
    raise ValueError(f"v head_dim {v.shape[3]} > {MAX_HEAD_DIM} is not supported")
  if r is not None and r.shape != q.shape:
    raise ValueError(f"r must have q's shape {q.shape}, got {r.shape}")
  Hkv = k.shape[2]
  if Hq % Hkv:
    raise ValueError(f"q heads ({Hq}) must be a multiple of kv heads ({Hkv})")
  if D > MAX_HEAD_DIM:
    raise ValueError(f"head_dim {D} > {MAX_HEAD_DIM} is not supported")
  dts = {jnp.dtype(x.dtype) for x in (q, k, v) + (() if r is None else (r,))}
  if len(dts) != 1 or next(iter(dts)) not in SUPPORTED_DTYPES:
    raise ValueError(f"q, k, v, r must share one dtype among float32/bfloat16/float16, got {dts}")
  if window is not None and int(window) < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  if q_segment_ids is not None:
    if q_segment_ids.shape != (B, T) or kv_segment_ids.shape != (B, k.shape[1]):
      raise ValueError(f"segment ids must be [B, T] and [B, S], got {q_segment_ids.shape}, "
                       f"{kv_segment_ids.shape}")


def _fit_blocks(bs: BlockSizes, T: int, S: int) -> BlockSizes:
  """Shrink tiles that are larger than the sequence (keeping powers of two >= 16)."""
  tq = max(16, next_pow2(T))
  tk = max(16, next_pow2(S))
  return dataclasses.replace(
      bs, block_q=min(bs.block_q, tq), block_k=min(bs.block_k, tk),
      block_q_dq=min(bs.block_q_dq, tq), block_k_dq=min(bs.block_k_dq, tk),
      block_q_dkv=min(bs.block_q_dkv, tq), block_k_dkv=min(bs.block_k_dkv, tk))


def parallax_flash_attention(q, k, v, r=None, *, scale, causal=True, window=None,
                             q_segment_ids=None, kv_segment_ids=None, block_sizes=None,
                             interpret=False):
  """Fused Parallax attention (softmax attention when r is None), differentiable.

  q, r: [B, T, Hq, D]; k: [B, S, Hkv, D]; v: [B, S, Hkv, Dv] (Dv may differ from D: then the
  Triton kernels run; Hq a multiple of Hkv; q-head h reads kv-head h // (Hq // Hkv)).
  scale: python float or an [Hq] (or scalar) float array = 1/bandwidth, 0 meaning uniform
  weights; an array scale gets a cotangent. causal: end-aligned (query i
  sees keys j <= S - T + i). window: keep keys with j > S - T + i - window (and
  j < S - T + i + window without causal). q_segment_ids [B, T], kv_segment_ids [B, S]: int
  ids, attend only within equal ids. Rows without keys output 0. Returns [B, T, Hq, Dv] in
  q's dtype. block_sizes: `BlockSizes` override (default: heuristic table).
  """
  _check_inputs(q, k, v, r, window, q_segment_ids, kv_segment_ids)
  B, T, Hq, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  if isinstance(scale, (int, float, np.floating, np.integer)):
    need_dscale = False
    scale_arr = jnp.full((Hq,), float(scale), jnp.float32)
  else:
    need_dscale = True
    scale_arr = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (Hq,))
  Dv = v.shape[3]
  Dp, Dvp = max(16, next_pow2(D)), max(16, next_pow2(Dv))
  # tiles for the wider of the two head dims (its accumulator or its q/k tiles dominate)
  bs = block_sizes if block_sizes is not None else default_block_sizes(
      max(Dp, Dvp), r is not None, q.dtype)
  bs = _fit_blocks(bs, T, S)
  Tp = round_up(T, max(bs.block_q, bs.block_q_dq, bs.block_q_dkv))
  Sp = round_up(S, max(bs.block_k, bs.block_k_dq, bs.block_k_dkv))
  has_seg = q_segment_ids is not None
  cfg = CallConfig(T=T, S=S, Tp=Tp, Sp=Sp, D=Dp, Hq=Hq, Hkv=Hkv, causal=bool(causal),
                   window=None if window is None else int(window), has_r=r is not None,
                   has_seg=has_seg, need_dscale=need_dscale, blocks=bs,
                   interpret=bool(interpret),
                   fp16_pv=(r is not None and jnp.dtype(q.dtype) == jnp.bfloat16 and bs.fp16_p2),
                   Dv=Dvp if Dvp != Dp else None)
  qp = pad(pad(q, 1, Tp), 3, Dp)
  rp = None if r is None else pad(pad(r, 1, Tp), 3, Dp)
  kp = pad(pad(k, 1, Sp), 3, Dp)
  vp = pad(pad(v, 1, Sp), 3, Dvp)
  qseg = kseg = None
  if has_seg:
    qseg = pad(jnp.asarray(q_segment_ids, jnp.int32), 1, Tp, -1)
    kseg = pad(jnp.asarray(kv_segment_ids, jnp.int32), 1, Sp, -2)
  o = _flash(cfg, qp, kp, vp, rp, scale_arr, qseg, kseg)
  if Tp != T or Dvp != Dv:
    o = o[:, :T, :, :Dv]
  return o


# ----------------------------------------------------------------------------- timing


def main():
  """Time the Mosaic GPU forward against the Triton forward on a GPU (CUPTI kernel time).

  PYTHONPATH=. python3 pallas_kernels/attention.py [--quick]
  """
  import argparse
  import statistics

  from jax.experimental.mosaic.gpu import profiler

  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="main shape only, defaults only")
  ap.add_argument("--tiles", action="store_true",
                  help="also sweep block_kv x num_stages x schedule_barrier")
  ap.add_argument("--shapes", default="all", choices=("all", "main"),
                  help="main: B=4 L=4096 Hq/Hkv 16/8 D=128 causal only")
  ap.add_argument("--segments", action="store_true",
                  help="packed-sequence segment ids (4 documents of random length per row)")
  args = ap.parse_args()
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)

  def kernel_ms(fn, xs, iters=20):
    jax.block_until_ready(fn(*xs))
    _, ts = profiler.measure(fn, aggregate=True, iterations=iters)(*xs)
    return statistics.median(float(t) for t in ts)

  def triton_fwd(q, k, v, r, ids, scale, causal):
    B, T, Hq, D = q.shape
    bs = default_block_sizes(D, r is not None)
    tcfg = CallConfig(T=T, S=k.shape[1], Tp=T, Sp=k.shape[1], D=D, Hq=Hq, Hkv=k.shape[2],
                      causal=causal, window=None, has_r=r is not None, has_seg=ids is not None,
                      need_dscale=False, blocks=bs, interpret=False,
                      fp16_pv=(r is not None and q.dtype == jnp.bfloat16 and bs.fp16_p2))
    return fwd_call(tcfg, q, k, v, r, jnp.full((Hq,), scale, jnp.float32), ids, ids)

  shapes = [(4, 4096, 16, 8, 128, True)]
  if not args.quick and args.shapes == "all":
    shapes += [(4, 4096, 16, 8, 64, True), (4, 4096, 16, 8, 128, False),
               (2, 16384, 16, 8, 128, True), (8, 1024, 16, 8, 128, True)]
  for B, L, Hq, Hkv, D, causal in shapes:
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (B, L, Hq, D), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, L, Hkv, D), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, L, Hkv, D), jnp.float32).astype(jnp.bfloat16)
    r = (0.5 * jax.random.normal(ks[3], (B, L, Hq, D), jnp.float32)).astype(jnp.bfloat16)
    scale = 1.0 / math.sqrt(D)
    pairs = (L * (L + 1) // 2 if causal else L * L) * B * Hq  # FLOPs as if unmasked
    ids = None
    if args.segments:
      rng = np.random.default_rng(0)
      cuts = np.sort(rng.choice(np.arange(1, L), size=(B, 3), replace=True), axis=1)
      ids = jnp.asarray(np.stack([np.searchsorted(c, np.arange(L), side="right") + 1
                                  for c in cuts]), jnp.int32)
    for parallax in (True, False):
      rr = r if parallax else None
      flops = (8 if parallax else 4) * D * pairs
      tri = jax.jit(lambda q, k, v, r, ids: triton_fwd(q, k, v, r, ids, scale, causal))
      t_tri = kernel_ms(tri, (q, k, v, rr, ids))
      ref = tri(q, k, v, rr, ids)
      base = mgpu.default_config(D, parallax)
      configs = [base]
      if not args.quick:
        configs += [dataclasses.replace(base, schedule_barrier=sb, pin_softmax=pin,
                                        num_stages=st, split_waits=sw)
                    for sb in (True, False) for pin in (True, False) for st in (2, 3)
                    for sw in ((True, False) if parallax else (True,))]
      if args.tiles:
        configs += [mgpu.MgpuConfig(block_kv=bkv, num_stages=st, schedule_barrier=sb)
                    for bkv in (64, 128) for st in (2, 3) for sb in (True, False)]
      configs = list(dict.fromkeys(configs))
      print(f"== B={B} L={L} Hq/Hkv={Hq}/{Hkv} D={D} causal={causal} segments={args.segments} "
            f"{'parallax' if parallax else 'softmax'}: triton {t_tri:.3f} ms "
            f"({flops / t_tri / 1e9:.0f} TF/s)", flush=True)
      for cfg in configs:
        f = jax.jit(lambda q, k, v, r, ids, cfg=cfg: mgpu.parallax_forward_mgpu(
            q, k, v, r, scale=scale, causal=causal, q_segment_ids=ids, kv_segment_ids=ids,
            config=cfg))
        try:
          t = kernel_ms(f, (q, k, v, rr, ids))
          o, res = f(q, k, v, rr, ids)
        except Exception as e:  # noqa: BLE001  (e.g. SMEM overflow for big tiles)
          print(f"  {cfg}: failed {repr(e)[:300]}", flush=True)
          continue
        d = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float32) -
                                              np.asarray(b, np.float32))))
        diffs = [d(o, ref[0]), d(res[0], ref[1])]
        if parallax:
          diffs += [d(res[1], ref[2]), d(res[2], ref[3])]
        print(f"  mgpu {cfg}: {t:.3f} ms ({flops / t / 1e9:.0f} TF/s, {t_tri / t:.2f}x "
              f"triton); max |diff| vs triton o, lse, tbar, vbar: "
              + ", ".join(f"{x:.1e}" for x in diffs), flush=True)


if __name__ == "__main__":
  main()
