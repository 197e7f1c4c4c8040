"""Training-attention benchmark: fused Pallas Parallax vs cuDNN / XLA softmax (H100).

Forward and forward+backward at B=4, L=4096, Hq=16, Hkv=8, D=128, causal, bf16 (the issue's
shape), plus a sweep over L and D and a block-size sweep of the Pallas kernels. Kernel time is
from CUPTI (`jax.experimental.mosaic.gpu.profiler.measure`, sum of kernel times per call,
median over iterations), with a wall-clock fallback. TFLOP/s count matrix FLOPs over the
visible (query, key) pairs: softmax forward 4*D per pair (QK^T, PV), backward 10*D (FA
convention: QK^T recompute, dO V^T, dV, dK, dQ); Parallax forward 8*D (QK^T, RK^T, P1 V,
P2 V), backward 16*D (QK^T, RK^T, dO V^T recompute; dV, dK from dS and from dT, dQ, dR).
Errors: max|x - ref| / max|ref| against a dense float32 reference (HIGHEST precision) on the
slice batch 0, kv-heads 0..1 (the computation is independent per batch and kv group).

Usage: PYTHONPATH=. python3 bench/attention_train.py --out OUT_DIR [--quick] [--no-sweep]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax
import jax.numpy as jnp

import parallax_jax as pj
import numpy as np

import pallas_kernels
from pallas_kernels import BlockSizes, parallax_flash_attention

HIGHEST = jax.lax.Precision.HIGHEST
T_START = time.time()
INTERPRET = {"on": False}  # --cpu-smoke: run the Pallas kernels in interpret mode


def log(*a):
  print(f"[{time.time() - T_START:7.1f}s]", *a, flush=True)


# ----------------------------------------------------------------------------- timing


def _measure_cupti(fn, args, iters):
  from jax.experimental.mosaic.gpu import profiler
  _, times = profiler.measure(fn, aggregate=True, iterations=iters)(*args)
  return [float(t) for t in times]


def _measure_wall(fn, args, iters):
  out = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append((time.perf_counter() - t0) * 1e3)
  return out


TIMER = {"mode": "cupti"}


def time_ms(fn, args, iters=20, warmup=2):
  """Median kernel time in ms of fn(*args) (fn jitted)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  if TIMER["mode"] == "cupti":
    try:
      ts = _measure_cupti(fn, args, iters)
      return statistics.median(ts), ts
    except Exception as e:  # noqa: BLE001
      log("CUPTI timing failed, falling back to wall clock:", repr(e)[:300])
      TIMER["mode"] = "wall"
  ts = _measure_wall(fn, args, iters)
  return statistics.median(ts), ts


def kernel_breakdown(fn, args):
  """[(kernel name, ms)] of one call (CUPTI)."""
  try:
    from jax.experimental.mosaic.gpu import profiler
    _, ts = profiler.measure(fn, aggregate=False)(*args)
    return [(n, float(t)) for n, t in ts]
  except Exception as e:  # noqa: BLE001
    return [("unavailable", repr(e)[:200])]


# ----------------------------------------------------------------------------- reference


def reference(q, k, v, r, scale, *, causal=True, window=None):
  """Dense float32 Parallax (softmax if r is None): the library's `xla` reference at full
  matmul precision."""
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    return pj.attention(f32(q), f32(k), f32(v), f32(r), probe="none" if r is None else "learned",
                        affine="constant" if r is None else "affine", bandwidth=1.0 / scale,
                        causal=causal, window=window, implementation="xla")


def rel_err(x, ref):
  x = np.asarray(jnp.asarray(x, jnp.float32))
  ref = np.asarray(jnp.asarray(ref, jnp.float32))
  if not np.all(np.isfinite(x)):
    return float("nan")
  return float(np.max(np.abs(x - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


# ----------------------------------------------------------------------------- problems


@dataclasses.dataclass
class Shape:
  B: int = 4
  L: int = 4096
  Hq: int = 16
  Hkv: int = 8
  D: int = 128
  causal: bool = True
  dtype: str = "bfloat16"

  @property
  def pairs(self):
    L = self.L
    return L * (L + 1) // 2 if self.causal else L * L

  def flops(self, parallax: bool, backward: bool):
    per_pair = (16 if backward else 8) if parallax else (10 if backward else 4)
    return per_pair * self.D * self.pairs * self.B * self.Hq


def make_inputs(sh: Shape, seed=0, r_scale=0.5):
  dt = jnp.dtype(sh.dtype)
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (sh.B, sh.L, sh.Hq, sh.D), jnp.float32).astype(dt)
  k = jax.random.normal(ks[1], (sh.B, sh.L, sh.Hkv, sh.D), jnp.float32).astype(dt)
  v = jax.random.normal(ks[2], (sh.B, sh.L, sh.Hkv, sh.D), jnp.float32).astype(dt)
  r = (r_scale * jax.random.normal(ks[3], (sh.B, sh.L, sh.Hq, sh.D), jnp.float32)).astype(dt)
  do = jax.random.normal(ks[4], (sh.B, sh.L, sh.Hq, sh.D), jnp.float32).astype(dt)
  return q, k, v, r, do


def fwd_and_train_fns(attn, parallax: bool):
  """(forward fn, forward+backward fn) taking (q, k, v, r, do); jitted."""
  if parallax:
    fwd = jax.jit(lambda q, k, v, r, do: attn(q, k, v, r))

    def train(q, k, v, r, do):
      o, vjp = jax.vjp(attn, q, k, v, r)
      return o, vjp(do)
  else:
    fwd = jax.jit(lambda q, k, v, r, do: attn(q, k, v))

    def train(q, k, v, r, do):
      o, vjp = jax.vjp(attn, q, k, v)
      return o, vjp(do)
  return fwd, jax.jit(train)


def impls(sh: Shape, blocks=None):
  scale = 1.0 / math.sqrt(sh.D)
  out = {}
  out["pallas_parallax"] = (lambda q, k, v, r: parallax_flash_attention(
      q, k, v, r, scale=scale, causal=sh.causal, block_sizes=blocks,
      interpret=INTERPRET["on"]), True)
  out["pallas_softmax"] = (lambda q, k, v: parallax_flash_attention(
      q, k, v, scale=scale, causal=sh.causal, block_sizes=blocks,
      interpret=INTERPRET["on"]), False)
  out["cudnn_softmax"] = (lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=sh.causal, implementation="cudnn"), False)
  out["xla_softmax"] = (lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=sh.causal, implementation="xla"), False)
  # Mosaic GPU (Hopper) forward, forward only (no VJP): pallas_kernels/attention_mgpu.py
  from pallas_kernels import attention_mgpu

  def mgpu(q, k, v, r=None):
    interp = None
    if INTERPRET["on"]:
      from jax.experimental.pallas import mosaic_gpu as plgpu
      interp = plgpu.InterpretGPUParams()
    return attention_mgpu.parallax_forward_mgpu(q, k, v, r, scale=scale, causal=sh.causal,
                                               interpret=interp)[0]

  out["pallas_mgpu_parallax"] = (lambda q, k, v, r: mgpu(q, k, v, r), True)
  out["pallas_mgpu_softmax"] = (lambda q, k, v: mgpu(q, k, v), False)
  try:
    import parallax_jax
    out["chunked_parallax"] = (lambda q, k, v, r: parallax_jax.attention(
        q, k, v, r, probe="learned", affine="affine", causal=sh.causal,
        implementation="chunked"), True)
    out["dense_parallax"] = (lambda q, k, v, r: parallax_jax.attention(
        q, k, v, r, probe="learned", affine="affine", causal=sh.causal,
        implementation="xla"), True)
  except Exception as e:  # noqa: BLE001
    log("parallax_jax unavailable:", repr(e)[:200])
  return out


# ----------------------------------------------------------------------------- checks


FWD_ONLY = {"pallas_mgpu_parallax", "pallas_mgpu_softmax"}  # no backward: time the forward


def fwd_errors(sh: Shape, attn, parallax: bool, inputs):
  """Error of the output only vs the float32 reference (batch 0, kv heads 0..1)."""
  q, k, v, r, do = inputs
  fwd, _ = fwd_and_train_fns(attn, parallax)
  o = fwd(q, k, v, r, do)
  G = sh.Hq // sh.Hkv
  nkv = min(2, sh.Hkv)
  sl_q = lambda x: x[:1, :, : nkv * G]
  sl_k = lambda x: x[:1, :, :nkv]
  f32 = lambda x: x.astype(jnp.float32)
  o_ref = reference(f32(sl_q(q)), f32(sl_k(k)), f32(sl_k(v)),
                    f32(sl_q(r)) if parallax else None, 1.0 / math.sqrt(sh.D), causal=sh.causal)
  return {"o": rel_err(sl_q(o), o_ref)}


def errors(sh: Shape, attn, parallax: bool, inputs):
  """Errors of output and grads vs the float32 reference on batch 0, kv heads 0..1."""
  q, k, v, r, do = inputs
  fwd, train = fwd_and_train_fns(attn, parallax)
  o, grads = train(q, k, v, r, do)
  G = sh.Hq // sh.Hkv
  nkv = min(2, sh.Hkv)
  sl_q = lambda x: x[:1, :, : nkv * G]
  sl_k = lambda x: x[:1, :, :nkv]
  args = (sl_q(q), sl_k(k), sl_k(v)) + ((sl_q(r),) if parallax else ())
  scale = 1.0 / math.sqrt(sh.D)

  def ref_fn(*xs):
    if not parallax:
      xs = xs + (None,)
    return reference(*xs, scale, causal=sh.causal)

  ref_fn32 = lambda *xs: ref_fn(*[x.astype(jnp.float32) for x in xs])
  o_ref, vjp = jax.vjp(ref_fn32, *args)
  g_ref = vjp(sl_q(do).astype(jnp.float32))
  res = {"o": rel_err(sl_q(o), o_ref)}
  names = ["dq", "dk", "dv", "dr"]
  slicers = [sl_q, sl_k, sl_k, sl_q]
  for name, g, gr, s in zip(names, grads, g_ref, slicers):
    res[name] = rel_err(s(g), gr)
  return res


# ----------------------------------------------------------------------------- runs


def bench_shape(sh: Shape, names, results, blocks=None, iters=20, check=False):
  inputs = make_inputs(sh)
  row = {"shape": dataclasses.asdict(sh), "impls": {}}
  for name, (attn, parallax) in impls(sh, blocks).items():
    if name not in names:
      continue
    entry = {}
    try:
      fwd, train = fwd_and_train_fns(attn, parallax)
      t_f, ts_f = time_ms(fwd, inputs, iters)
      entry["fwd_ms"] = t_f
      entry["fwd_ms_all"] = ts_f
      entry["fwd_tflops"] = sh.flops(parallax, False) / (t_f * 1e-3) / 1e12
      if name in FWD_ONLY:
        entry["kernels_fwd"] = kernel_breakdown(fwd, inputs)
        if check:
          entry["errors"] = fwd_errors(sh, attn, parallax, inputs)
        log(f"{name:18s} {sh.L:6d} D{sh.D:<4d} fwd {t_f:8.3f} ms ({entry['fwd_tflops']:6.1f} "
            f"TF/s)  (forward only)" + (f"  err {entry['errors']}" if check else ""))
        row["impls"][name] = entry
        continue
      t_fb, ts_fb = time_ms(train, inputs, iters)
      entry["fwdbwd_ms"] = t_fb
      entry["fwdbwd_ms_all"] = ts_fb
      flops = sh.flops(parallax, False) + sh.flops(parallax, True)
      entry["fwdbwd_tflops"] = flops / (t_fb * 1e-3) / 1e12
      if name.startswith("pallas"):
        entry["kernels_fwdbwd"] = kernel_breakdown(train, inputs)
      if check:
        entry["errors"] = errors(sh, attn, parallax, inputs)
      log(f"{name:18s} {sh.L:6d} D{sh.D:<4d} fwd {t_f:8.3f} ms ({entry['fwd_tflops']:6.1f} TF/s)"
          f"  fwd+bwd {t_fb:8.3f} ms ({entry['fwdbwd_tflops']:6.1f} TF/s)"
          + (f"  err {entry['errors']}" if check else ""))
    except Exception as e:  # noqa: BLE001
      entry["error"] = repr(e)[:2000]
      log(f"{name} failed: {repr(e)[:500]}")
      traceback.print_exc()
    row["impls"][name] = entry
  results.append(row)
  return row


SWEEP_BLOCKS = [
    # BlockSizes(block_q, block_k, warps, stages,  dq: q, k, warps, stages,
    #            dkv: q, k, warps, stages); the first is the default table entry (D=128).
    # Each entry varies all three kernels; the per-kernel CUPTI times pick each kernel's best.
    BlockSizes(128, 64, 8, 3, 64, 32, 4, 3, 32, 64, 4, 3),
    BlockSizes(128, 64, 8, 3, 64, 32, 4, 3, 32, 64, 4, 3, fp16_p2=False),
    BlockSizes(128, 64, 8, 4, 64, 32, 4, 4, 32, 64, 4, 4),
    BlockSizes(128, 64, 8, 2, 64, 32, 4, 2, 32, 64, 4, 2),
    BlockSizes(128, 32, 8, 4, 32, 64, 4, 3, 16, 64, 4, 3),
    BlockSizes(128, 32, 8, 3, 64, 64, 8, 3, 32, 128, 4, 3),
    BlockSizes(64, 128, 4, 3, 128, 32, 8, 4, 64, 64, 8, 3),
    BlockSizes(128, 128, 8, 3, 32, 32, 4, 3, 32, 32, 4, 3),
    BlockSizes(64, 64, 4, 4, 64, 16, 4, 3, 16, 128, 4, 3),
    BlockSizes(128, 64, 8, 3, 128, 64, 8, 3, 64, 128, 8, 3),
    BlockSizes(128, 16, 4, 4, 64, 32, 4, 5, 32, 64, 4, 5),
    BlockSizes(64, 32, 4, 3, 32, 16, 4, 3, 16, 32, 4, 3),
]
SWEEP_BLOCKS_D64 = [
    BlockSizes(128, 64, 8, 3, 64, 64, 4, 3, 64, 64, 4, 3),
    BlockSizes(128, 64, 4, 3, 64, 32, 4, 3, 32, 64, 4, 3),
    BlockSizes(128, 128, 8, 3, 128, 64, 8, 3, 64, 128, 8, 3),
    BlockSizes(64, 64, 4, 4, 64, 64, 4, 4, 64, 64, 4, 4),
    BlockSizes(128, 32, 4, 4, 128, 32, 8, 3, 32, 128, 8, 3),
    BlockSizes(128, 64, 8, 4, 64, 128, 4, 3, 128, 64, 8, 3),
]


def block_sweep(sh: Shape, out, budget_s, configs, key="block_sweep"):
  inputs = make_inputs(sh)
  scale = 1.0 / math.sqrt(sh.D)
  rows = []
  for bs in configs:
    if time.time() - T_START > budget_s:
      log("time budget reached, stopping the block sweep")
      break
    attn = lambda q, k, v, r, bs=bs: parallax_flash_attention(
        q, k, v, r, scale=scale, causal=sh.causal, block_sizes=bs,
        interpret=INTERPRET["on"])
    entry = {"blocks": dataclasses.asdict(bs)}
    try:
      fwd, train = fwd_and_train_fns(attn, True)
      entry["fwd_ms"], _ = time_ms(fwd, inputs, 10)
      entry["fwdbwd_ms"], _ = time_ms(train, inputs, 10)
      entry["kernels"] = kernel_breakdown(train, inputs)
      log(f"blocks {tuple(dataclasses.astuple(bs))}: fwd {entry['fwd_ms']:.3f} "
          f"fwd+bwd {entry['fwdbwd_ms']:.3f} kernels {entry['kernels']}")
    except Exception as e:  # noqa: BLE001
      entry["error"] = repr(e)[:1500]
      log(f"blocks {dataclasses.astuple(bs)} failed: {repr(e)[:400]}")
    rows.append(entry)
    out[key] = rows
    save(out)
  return rows


def pick_best(rows, out, key):
  """BlockSizes combining each kernel's fastest tiles over the sweep (fp16 P2 only)."""
  best = {}
  fields = {"parallax_fwd": ("block_q", "block_k", "num_warps", "num_stages"),
            "parallax_bwd_dq": ("block_q_dq", "block_k_dq", "num_warps_dq", "num_stages_dq"),
            "parallax_bwd_dkv": ("block_q_dkv", "block_k_dkv", "num_warps_dkv",
                                 "num_stages_dkv")}
  for e in rows:
    if "error" in e:
      continue
    for name, t in e.get("kernels", []):
      if name == "parallax_fwd" and not e["blocks"].get("fp16_p2", True):
        continue  # the default keeps the fp16 P2 V product (accuracy)
      if name in fields and isinstance(t, float) and (name not in best or t < best[name][0]):
        best[name] = (t, {f: e["blocks"][f] for f in fields[name]})
  if len(best) != 3:
    log(f"{key}: no complete sweep, keeping the table")
    return None
  kw = {}
  for name in fields:
    kw.update(best[name][1])
  bs = BlockSizes(**kw)
  out[key] = {"blocks": dataclasses.asdict(bs), "kernel_ms": {n: b[0] for n, b in best.items()}}
  log(f"{key}: {dataclasses.astuple(bs)} {out[key]['kernel_ms']}")
  save(out)
  return bs


SWEEP_L = (1024, 4096, 16384)
OUT_PATH = {"json": None}


def save(out):
  if OUT_PATH["json"]:
    with open(OUT_PATH["json"], "w") as f:
      json.dump(out, f, indent=1, default=str)


def markdown(out):
  lines = [f"# attention_train results", "",
           f"device: {out['device']}; jax {out['jax']} / jaxlib {out['jaxlib']}; "
           f"date {out['date']}; timer: {out['timer']}", ""]
  for title, rows in (("Main shape", out.get("main", [])), ("Sweep", out.get("sweep", []))):
    if not rows:
      continue
    lines += [f"## {title}", "",
              "| impl | B | L | Hq/Hkv | D | fwd ms | fwd TF/s | fwd / cuDNN | fwd+bwd ms | "
              "fwd+bwd TF/s | fwd+bwd / cuDNN | max rel err (o, dq, dk, dv, dr) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
      s = row["shape"]
      cud = row["impls"].get("cudnn_softmax", {})
      for name, e in row["impls"].items():
        if "error" in e:
          lines.append(f"| {name} | {s['B']} | {s['L']} | {s['Hq']}/{s['Hkv']} | {s['D']} | "
                       f"failed: {e['error'][:80]} | | | | | | |")
          continue
        errs = e.get("errors")
        es = ", ".join(f"{v:.1e}" for v in errs.values()) if errs else ""
        rf = f"{e['fwd_ms'] / cud['fwd_ms']:.2f}x" if "fwd_ms" in cud else ""
        if "fwdbwd_ms" not in e:  # forward-only entries
          lines.append(
              f"| {name} | {s['B']} | {s['L']} | {s['Hq']}/{s['Hkv']} | {s['D']} | "
              f"{e['fwd_ms']:.3f} | {e['fwd_tflops']:.0f} | {rf} | | | | {es} |")
          continue
        rb = f"{e['fwdbwd_ms'] / cud['fwdbwd_ms']:.2f}x" if "fwdbwd_ms" in cud else ""
        lines.append(
            f"| {name} | {s['B']} | {s['L']} | {s['Hq']}/{s['Hkv']} | {s['D']} | "
            f"{e['fwd_ms']:.3f} | {e['fwd_tflops']:.0f} | {rf} | {e['fwdbwd_ms']:.3f} | "
            f"{e['fwdbwd_tflops']:.0f} | {rb} | {es} |")
    lines.append("")
  for key in ("tuned_blocks", "tuned_blocks_d64"):
    if out.get(key):
      lines += [f"{key} (used for the tables above): {out[key]['blocks']}; per-kernel ms "
                f"{out[key]['kernel_ms']}", ""]
  for key, title in (("block_sweep", "main shape"), ("block_sweep_d64", "main shape, D=64")):
    if not out.get(key):
      continue
    lines += [f"## Pallas Parallax block sweep ({title})", "",
              "| blocks (fwd q,k,w,s / dq q,k,w,s / dkv q,k,w,s) | fwd ms | fwd+bwd ms | "
              "kernels in fwd+bwd (ms) |",
              "|---|---|---|---|"]
    for e in out[key]:
      b = e["blocks"]
      desc = (f"{b['block_q']},{b['block_k']},{b['num_warps']},{b['num_stages']} / "
              f"{b['block_q_dq']},{b['block_k_dq']},{b['num_warps_dq']},{b['num_stages_dq']} / "
              f"{b['block_q_dkv']},{b['block_k_dkv']},{b['num_warps_dkv']},{b['num_stages_dkv']}")
      desc += "" if b.get("fp16_p2", True) else " (bf16 P2)"
      if "error" in e:
        lines.append(f"| {desc} | failed | {e['error'][:60]} | |")
      else:
        ks = ", ".join(f"{n.replace('parallax_', '')} {t:.3f}" for n, t in e["kernels"]
                       if isinstance(t, float) and t > 0.01)
        lines.append(f"| {desc} | {e['fwd_ms']:.3f} | {e['fwdbwd_ms']:.3f} | {ks} |")
    lines.append("")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=".")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--no-sweep", action="store_true", help="skip the L x D sweep")
  ap.add_argument("--no-block-sweep", action="store_true")
  ap.add_argument("--budget-s", type=float, default=420.0)
  ap.add_argument("--cpu-smoke", action="store_true",
                  help="tiny shapes, interpret mode, wall-clock timer (checks the script)")
  args = ap.parse_args()
  if args.cpu_smoke:
    INTERPRET["on"] = True
    TIMER["mode"] = "wall"
  os.makedirs(args.out, exist_ok=True)
  OUT_PATH["json"] = os.path.join(args.out, "attention_train.json")
  dev = jax.devices()[0]
  import jaxlib
  out = {"device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__,
         "jaxlib": jaxlib.__version__, "date": datetime.datetime.now().isoformat(),
         "python": platform.python_version(), "timer": TIMER["mode"]}
  log("device", out["device"])

  main_shape = Shape(L=1024) if args.quick else Shape()
  if args.cpu_smoke:
    main_shape = Shape(B=1, L=128, Hq=4, Hkv=2, D=64)
    global SWEEP_BLOCKS, SWEEP_L
    SWEEP_BLOCKS = SWEEP_BLOCKS[:2]
    global SWEEP_BLOCKS_D64
    SWEEP_BLOCKS_D64 = SWEEP_BLOCKS_D64[:1]
    SWEEP_L = (64,)
  names = ["pallas_parallax", "pallas_softmax", "pallas_mgpu_parallax", "pallas_mgpu_softmax",
           "cudnn_softmax", "xla_softmax", "chunked_parallax", "dense_parallax"]
  tuned = {128: None, 64: None}  # None: the heuristic table
  # 1. block sweeps; each kernel's best time picks its tiles (kernels are independent)
  if not args.no_block_sweep:
    rows = block_sweep(main_shape, out, args.budget_s, SWEEP_BLOCKS)
    tuned[main_shape.D] = pick_best(rows, out, "tuned_blocks")
    rows = block_sweep(dataclasses.replace(main_shape, D=64), out, args.budget_s,
                       SWEEP_BLOCKS_D64, key="block_sweep_d64")
    tuned[64] = pick_best(rows, out, "tuned_blocks_d64")
  # 2. the shape of record, every implementation, with errors
  out["main"] = []
  bench_shape(main_shape, names, out["main"], blocks=tuned[main_shape.D], check=True)
  out["timer"] = TIMER["mode"]
  save(out)
  # 3. L x D sweep
  if not args.no_sweep:
    out["sweep"] = []
    for D in (128, 64):
      for L in SWEEP_L:
        if time.time() - T_START > args.budget_s:
          log("time budget reached, stopping the sweep")
          break
        if L == main_shape.L and D == main_shape.D:
          continue
        sh = dataclasses.replace(main_shape, L=L, D=D)
        bench_shape(sh, ["pallas_parallax", "pallas_softmax", "pallas_mgpu_parallax",
                         "pallas_mgpu_softmax", "cudnn_softmax"], out["sweep"],
                    blocks=tuned.get(D), iters=10)
        save(out)
  save(out)
  md = markdown(out)
  with open(os.path.join(args.out, "attention_train.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
