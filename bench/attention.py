"""Training-attention benchmarks: the fused Pallas kernels (`parallax_flash_attention`: Mosaic
GPU forward where it applies, Triton backward but for the Mosaic GPU dk/dv kernel that the
block-size table turns on for softmax and D=64) against cuDNN and the XLA paths. Modes:

  train      forward and forward+backward at the shape of record, an L x D sweep and block
             sweeps of the Pallas kernels (attention_train, in --out)
  grid       the training kernels over L x D x GQA ratio and packed documents against cuDNN
             (attention_grid; --resume continues a run cut short)
  segments   the same shape with segment-id layouts: what packed sequences cost
             (attention_segments)
  xla        dense vs chunked XLA paths (and cuDNN on GPU): wall time and compiled memory
             (attention_xla_gpu, attention_xla_cpu; --only-32k: attention_xla_cpu_32k)
  bwd        the Mosaic GPU dq/dr and dk/dv kernels against the Triton fast launches
             (attention_bwd_mgpu)
  nonfinite  CUPTI kernel times of the training and decode kernels on clean inputs and with
             NaN at masked positions, for an A/B of the non-finite handling against an older
             checkout; --table writes the before / after table (kernel_nonfinite)

Shape of record: B=4, L=T=S=4096, Hq=16, Hkv=8, D=128, causal, bf16. GPU kernel time is from
CUPTI (`jax.experimental.mosaic.gpu.profiler.measure`, sum of kernel times per call, median
over calls), with a wall-clock fallback (train); xla times wall-clock medians of jitted calls.

  PYTHONPATH=. python3 bench/attention.py train --out DIR [--no-block-sweep] [--budget-s 320]
  PYTHONPATH=. python3 bench/attention.py grid --out $OUT [--resume] [--budget-s 480]
  PYTHONPATH=. python3 bench/attention.py xla [--only-32k]
  PYTHONPATH=. python3 bench/attention.py bwd [--kernels dq,dkv] [--configs] --out $OUT
  git archive REV pallas_kernels | tar -x -C /tmp/before
  PYTHONPATH=/tmp/before:. python3 bench/attention.py nonfinite --out /tmp/before.json
  PYTHONPATH=. python3 bench/attention.py nonfinite --out /tmp/after.json
  python3 bench/attention.py nonfinite --table /tmp/before.json /tmp/after.json --out OUT.md
  PYTHONPATH=. python3 bench/attention.py MODE --help

Only public pallas_kernels names are imported at the top, and parallax_jax only inside the
modes that use it, so nonfinite runs against an older checkout of pallas_kernels too.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import traceback
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels  # noqa: E402
from pallas_kernels import parallax_decode, parallax_flash_attention  # noqa: E402
from bench import common  # noqa: E402
from bench.common import kernel_breakdown, log, rel_err, time_ms  # noqa: E402

INTERPRET = {"on": False}  # train --cpu-smoke: run the Pallas kernels in interpret mode


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
    """Matrix FLOPs over the visible (query, key) pairs: softmax forward 4*D per pair (QK^T,
    PV), backward 10*D (FA convention: QK^T recompute, dO V^T, dV, dK, dQ); Parallax forward
    8*D (QK^T, RK^T, P1 V, P2 V), backward 16*D (QK^T, RK^T, dO V^T recompute; dV, dK from
    dS and from dT, dQ, dR)."""
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


# ----------------------------------------------------------------------------- train


def reference(q, k, v, r, scale, *, causal=True, window=None):
  """Dense float32 Parallax (softmax if r is None): the library's `xla` reference at full
  matmul precision."""
  import parallax_jax as pj
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    return pj.attention(f32(q), f32(k), f32(v), f32(r), probe="none" if r is None else "learned",
                        affine="constant" if r is None else "affine", bandwidth=1.0 / scale,
                        causal=causal, window=window, implementation="xla")


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


FWD_ONLY = {"pallas_mgpu_parallax", "pallas_mgpu_softmax"}  # no backward: time the forward


def errors(sh: Shape, attn, parallax: bool, inputs, backward=True):
  """Errors of the output (and, with backward, the grads) vs the float32 reference on the
  slice batch 0, kv heads 0..1 (the computation is independent per batch and kv group)."""
  q, k, v, r, do = inputs
  fwd, train = fwd_and_train_fns(attn, parallax)
  G = sh.Hq // sh.Hkv
  nkv = min(2, sh.Hkv)
  sl_q = lambda x: x[:1, :, : nkv * G]
  sl_k = lambda x: x[:1, :, :nkv]
  f32 = lambda x: x.astype(jnp.float32)
  scale = 1.0 / math.sqrt(sh.D)
  if not backward:
    o_ref = reference(f32(sl_q(q)), f32(sl_k(k)), f32(sl_k(v)),
                      f32(sl_q(r)) if parallax else None, scale, causal=sh.causal)
    return {"o": rel_err(sl_q(fwd(q, k, v, r, do)), o_ref)}
  o, grads = train(q, k, v, r, do)
  args = (sl_q(q), sl_k(k), sl_k(v)) + ((sl_q(r),) if parallax else ())

  def ref_fn(*xs):
    if not parallax:
      xs = xs + (None,)
    return reference(*xs, scale, causal=sh.causal)

  ref_fn32 = lambda *xs: ref_fn(*[x.astype(jnp.float32) for x in xs])
  o_ref, vjp = jax.vjp(ref_fn32, *args)
  g_ref = vjp(sl_q(do).astype(jnp.float32))
  res = {"o": rel_err(sl_q(o), o_ref)}
  for name, g, gr, s in zip(["dq", "dk", "dv", "dr"], grads, g_ref, [sl_q, sl_k, sl_k, sl_q]):
    res[name] = rel_err(s(g), gr)
  return res


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
      head = f"{name:18s} {sh.L:6d} D{sh.D:<4d} fwd {t_f:8.3f} ms ({entry['fwd_tflops']:6.1f} TF/s)"
      if name in FWD_ONLY:
        entry["kernels_fwd"] = kernel_breakdown(fwd, inputs)
        if check:
          entry["errors"] = errors(sh, attn, parallax, inputs, backward=False)
        log(head + "  (forward only)" + (f"  err {entry['errors']}" if check else ""))
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
      log(head + f"  fwd+bwd {t_fb:8.3f} ms ({entry['fwdbwd_tflops']:6.1f} TF/s)"
          + (f"  err {entry['errors']}" if check else ""))
    except Exception as e:  # noqa: BLE001
      entry["error"] = repr(e)[:2000]
      log(f"{name} failed: {repr(e)[:500]}")
      traceback.print_exc()
    row["impls"][name] = entry
  results.append(row)
  return row


def sweep_blocks(D):
  """The block sweep's BlockSizes at head dim D (128, or 64). Each entry varies all three
  kernels; the per-kernel CUPTI times pick each kernel's best."""
  B = pallas_kernels.BlockSizes
  if D == 64:
    return [
        B(128, 64, 8, 3, 64, 64, 4, 3, 64, 64, 4, 3),
        B(128, 64, 4, 3, 64, 32, 4, 3, 32, 64, 4, 3),
        B(128, 128, 8, 3, 128, 64, 8, 3, 64, 128, 8, 3),
        B(64, 64, 4, 4, 64, 64, 4, 4, 64, 64, 4, 4),
        B(128, 32, 4, 4, 128, 32, 8, 3, 32, 128, 8, 3),
        B(128, 64, 8, 4, 64, 128, 4, 3, 128, 64, 8, 3),
    ]
  return [
      # BlockSizes(block_q, block_k, warps, stages,  dq: q, k, warps, stages,
      #            dkv: q, k, warps, stages); the first is the default table entry (D=128).
      B(128, 64, 8, 3, 64, 32, 4, 3, 32, 64, 4, 3),
      B(128, 64, 8, 3, 64, 32, 4, 3, 32, 64, 4, 3, fp16_p2=False),
      B(128, 64, 8, 4, 64, 32, 4, 4, 32, 64, 4, 4),
      B(128, 64, 8, 2, 64, 32, 4, 2, 32, 64, 4, 2),
      B(128, 32, 8, 4, 32, 64, 4, 3, 16, 64, 4, 3),
      B(128, 32, 8, 3, 64, 64, 8, 3, 32, 128, 4, 3),
      B(64, 128, 4, 3, 128, 32, 8, 4, 64, 64, 8, 3),
      B(128, 128, 8, 3, 32, 32, 4, 3, 32, 32, 4, 3),
      B(64, 64, 4, 4, 64, 16, 4, 3, 16, 128, 4, 3),
      B(128, 64, 8, 3, 128, 64, 8, 3, 64, 128, 8, 3),
      B(128, 16, 4, 4, 64, 32, 4, 5, 32, 64, 4, 5),
      B(64, 32, 4, 3, 32, 16, 4, 3, 16, 32, 4, 3),
  ]


def block_sweep(sh: Shape, out, budget_s, configs, key="block_sweep"):
  inputs = make_inputs(sh)
  scale = 1.0 / math.sqrt(sh.D)
  rows = []
  for bs in configs:
    if time.time() - common.T0 > budget_s:
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
  bs = pallas_kernels.BlockSizes(**kw)
  out[key] = {"blocks": dataclasses.asdict(bs), "kernel_ms": {n: b[0] for n, b in best.items()}}
  log(f"{key}: {dataclasses.astuple(bs)} {out[key]['kernel_ms']}")
  save(out)
  return bs


OUT_PATH = {"json": None}


def save(out):
  if OUT_PATH["json"]:
    with open(OUT_PATH["json"], "w") as f:
      json.dump(out, f, indent=1, default=str)


def train_md(out):
  lines = [f"# attention_train results", "",
           f"device: {out['device']}; jax {out['jax']} / jaxlib {out['jaxlib']}; "
           f"date {out['date']}; timer: {out['timer']}", "", f"Command: `{out['command']}`", ""]
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
        cells = [name, s["B"], s["L"], f"{s['Hq']}/{s['Hkv']}", s["D"]]
        if "error" in e:
          cells += [f"failed: {e['error'][:80]}"] + [""] * 6
        else:
          errs = e.get("errors")
          cells += [f"{e['fwd_ms']:.3f}", f"{e['fwd_tflops']:.0f}",
                    f"{e['fwd_ms'] / cud['fwd_ms']:.2f}x" if "fwd_ms" in cud else ""]
          if "fwdbwd_ms" in e:
            cells += [f"{e['fwdbwd_ms']:.3f}", f"{e['fwdbwd_tflops']:.0f}",
                      f"{e['fwdbwd_ms'] / cud['fwdbwd_ms']:.2f}x" if "fwdbwd_ms" in cud else ""]
          else:  # forward-only entries
            cells += ["", "", ""]
          cells.append(", ".join(f"{v:.1e}" for v in errs.values()) if errs else "")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
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


SWEEP_L = (1024, 4096, 16384)


def train(a):
  """Errors: max|x - ref| / max|ref| against a dense float32 reference (HIGHEST precision)."""
  if a.cpu_smoke:
    INTERPRET["on"] = True
    common.TIMER["mode"] = "wall"
  os.makedirs(a.out, exist_ok=True)
  OUT_PATH["json"] = os.path.join(a.out, "attention_train.json")
  out = {**common.environment(), "timer": common.TIMER["mode"]}
  log("device", out["device"])

  main_shape = Shape()
  blocks = {128: sweep_blocks(128), 64: sweep_blocks(64)}
  sweep_l = SWEEP_L
  if a.cpu_smoke:
    main_shape = Shape(B=1, L=128, Hq=4, Hkv=2, D=64)
    blocks = {128: blocks[128][:2], 64: blocks[64][:1]}
    sweep_l = (64,)
  names = ["pallas_parallax", "pallas_softmax", "pallas_mgpu_parallax", "pallas_mgpu_softmax",
           "cudnn_softmax", "xla_softmax", "chunked_parallax", "dense_parallax"]
  tuned = {128: None, 64: None}  # None: the heuristic table
  # 1. block sweeps; each kernel's best time picks its tiles (kernels are independent)
  if not a.no_block_sweep:
    rows = block_sweep(main_shape, out, a.budget_s, blocks[128])
    tuned[main_shape.D] = pick_best(rows, out, "tuned_blocks")
    rows = block_sweep(dataclasses.replace(main_shape, D=64), out, a.budget_s, blocks[64],
                       key="block_sweep_d64")
    tuned[64] = pick_best(rows, out, "tuned_blocks_d64")
  # 2. the shape of record, every implementation, with errors
  out["main"] = []
  bench_shape(main_shape, names, out["main"], blocks=tuned[main_shape.D], check=True)
  out["timer"] = common.TIMER["mode"]
  save(out)
  # 3. L x D sweep
  out["sweep"] = []
  for D in (128, 64):
    for L in sweep_l:
      if time.time() - common.T0 > a.budget_s:
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
  md = train_md(out)
  with open(os.path.join(a.out, "attention_train.md"), "w") as f:
    f.write(md)
  print(md)


# ----------------------------------------------------------------------------- grid

GRID_L = (1024, 4096, 16384, 32768)
GRID_D = (64, 128)
GRID_HKV = (16, 8, 4)        # Hq = 16: GQA ratios 1, 2, 4
GRID_TOKENS = 16384          # B = tokens / L (at least 1)
GRID_DOCS = 4                # the packed rows: documents of L / 4 tokens (GQA 2)
TARGETS = {"fwd": 1.8, "fwdbwd": 1.9}   # Parallax / cuDNN softmax, the kernels issue's aim


def grid_shapes():
  """(Shape, documents per row) of the grid: every L x D x GQA ratio without documents, and
  GQA 2 with packed documents."""
  for D in GRID_D:
    for L in GRID_L:
      B = max(1, GRID_TOKENS // L)
      for hkv in GRID_HKV:
        yield Shape(B=B, L=L, Hq=16, Hkv=hkv, D=D), 0
      yield Shape(B=B, L=L, Hq=16, Hkv=8, D=D), GRID_DOCS


def grid_key(sh: Shape, docs: int) -> str:
  return f"L{sh.L}_D{sh.D}_G{sh.Hq // sh.Hkv}_docs{docs}"


def grid_row(sh: Shape, docs: int, iters: int) -> dict:
  """Forward and forward+backward times (ms) of Parallax and softmax through
  `parallax_flash_attention` (with segment ids where docs) and of cuDNN softmax (causal, no
  documents: it takes no segment ids here), and the ratios to cuDNN."""
  inputs = make_inputs(sh)
  scale = 1.0 / math.sqrt(sh.D)
  kw = {}
  if docs:
    ids = jnp.asarray(np.repeat(np.arange(docs), sh.L // docs)[None].repeat(sh.B, 0), jnp.int32)
    kw = dict(q_segment_ids=ids, kv_segment_ids=ids)
  fns = {
      "parallax": (lambda q, k, v, r: parallax_flash_attention(
          q, k, v, r, scale=scale, causal=True, interpret=INTERPRET["on"], **kw), True),
      "softmax": (lambda q, k, v: parallax_flash_attention(
          q, k, v, scale=scale, causal=True, interpret=INTERPRET["on"], **kw), False),
  }
  if not INTERPRET["on"]:
    fns["cudnn"] = (lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, implementation="cudnn"), False)
  row = {"key": grid_key(sh, docs), "shape": dataclasses.asdict(sh), "docs": docs}
  for name, (attn, parallax) in fns.items():
    try:
      fwd, train_fn = fwd_and_train_fns(attn, parallax)
      row[f"{name}_fwd_ms"], _ = time_ms(fwd, inputs, iters)
      row[f"{name}_fwdbwd_ms"], _ = time_ms(train_fn, inputs, iters)
    except Exception as e:  # noqa: BLE001
      row[f"{name}_error"] = repr(e)[:1000]
      log(f"{row['key']} {name} failed: {repr(e)[:300]}")
  for name in ("parallax", "softmax"):
    for kind in ("fwd", "fwdbwd"):
      num, den = row.get(f"{name}_{kind}_ms"), row.get(f"cudnn_{kind}_ms")
      if num and den:
        row[f"{name}_{kind}_x"] = num / den
  return row


def grid_md(rows) -> str:
  head = ["L", "D", "GQA", "docs", "B", "Parallax fwd ms", "cuDNN fwd ms", "x",
          "Parallax fwd+bwd ms", "cuDNN fwd+bwd ms", "x", "softmax (ours) fwd / fwd+bwd x"]
  md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  f = lambda x, n=3: "-" if x is None else f"{x:.{n}f}"
  for r in rows:
    sh = r["shape"]
    mark = lambda kind: "" if r.get(f"parallax_{kind}_x") is None or (
        r[f"parallax_{kind}_x"] <= TARGETS[kind]) else " *"
    md.append(
        f"| {sh['L']} | {sh['D']} | {sh['Hq'] // sh['Hkv']} | {r['docs'] or '-'} | {sh['B']} | "
        f"{f(r.get('parallax_fwd_ms'))} | {f(r.get('cudnn_fwd_ms'))} | "
        f"{f(r.get('parallax_fwd_x'), 2)}{mark('fwd')} | {f(r.get('parallax_fwdbwd_ms'))} | "
        f"{f(r.get('cudnn_fwdbwd_ms'))} | {f(r.get('parallax_fwdbwd_x'), 2)}{mark('fwdbwd')} | "
        f"{f(r.get('softmax_fwd_x'), 2)} / {f(r.get('softmax_fwdbwd_x'), 2)} |")
  return "\n".join(md)


def grid(a):
  """The training-kernel grid: L x D x GQA ratio (and packed documents), each row saved as it
  ends; --resume skips the rows a previous (cut short) run wrote."""
  if a.cpu_smoke:
    INTERPRET["on"] = True
    common.TIMER["mode"] = "wall"
  path = os.path.join(common.RESULTS, f"{a.name}.json")
  rows = []
  if a.resume and os.path.exists(path):
    with open(path) as fh:
      rows = json.load(fh)["results"]
  done = {r["key"] for r in rows}
  shapes = list(grid_shapes())
  if a.cpu_smoke:
    shapes = [(Shape(B=1, L=64, Hq=4, Hkv=4, D=64), 0), (Shape(B=1, L=64, Hq=4, Hkv=2, D=64), 4)]
  env = {**common.environment(), "timer": common.TIMER["mode"]}
  notes = (f"bf16, causal, Hq=16, B = {GRID_TOKENS} tokens / L; `parallax_flash_attention` "
           "(Mosaic GPU forward on Hopper, Triton backward, Mosaic GPU dk/dv for softmax and "
           "D=64) and cuDNN "
           "(`jax.nn.dot_product_attention`, no segment ids: its rows with documents are the "
           f"full causal rows). Sums of kernel times per call (CUPTI), median of {a.iters}. "
           f"x: over cuDNN softmax; * above the aim (forward {TARGETS['fwd']}, forward+backward "
           f"{TARGETS['fwdbwd']}).")
  for sh, docs in shapes:
    if grid_key(sh, docs) in done:
      continue
    if time.time() - common.T0 > a.budget_s:
      log("time budget reached: rerun with --resume for the rest")
      break
    row = grid_row(sh, docs, a.iters)
    log(json.dumps(row))
    rows.append(row)
    common.write_results(a.name, env, rows, grid_md(rows), notes, out=a.out)


# ----------------------------------------------------------------------------- segments


def tile_kinds(seg: np.ndarray, tile: int = 64) -> dict:
  """Shares of causal (q tile, k tile) pairs that are disjoint / uniform / mixed by id."""
  n = seg.shape[1] // tile
  counts = {"skip": 0, "uniform": 0, "mixed": 0}
  for row in seg:
    t = row[: n * tile].reshape(n, tile)
    lo, hi = t.min(1), t.max(1)
    i, j = np.tril_indices(n)
    skip = (hi[i] < lo[j]) | (hi[j] < lo[i])
    uni = (lo[i] == hi[i]) & (lo[j] == hi[j]) & (lo[i] == lo[j])
    counts["skip"] += int(skip.sum())
    counts["uniform"] += int((uni & ~skip).sum())
    counts["mixed"] += int((~uni & ~skip).sum())
  total = sum(counts.values())
  return {k: v / total for k, v in counts.items()}


def visible_fraction(seg: np.ndarray) -> float:
  """Causal (query, key) pairs with equal ids / all causal pairs."""
  return common.document_context(seg) / ((seg.shape[1] + 1) / 2)


def stdlib_rows(path: str, B: int, L: int) -> np.ndarray:
  from train import prepare
  from train.data import make_dataset
  if not os.path.exists(os.path.join(path, "meta.json")):
    prepare.main(["--out", path])
  it = iter(make_dataset(path, split="train", seq_len=L, batch_size=B, seed=0, prefetch=0))
  return np.asarray(next(it)["segment_ids"], np.int32)


def segments(a):
  """Layouts: none (no segment ids); one_doc (every id equal: all the mask work and no masked
  pair, its overhead alone); stdlib (the first 4 packed rows of the training stream,
  data/stdlib, seed 0, as the 0.6B bench trains on them); halves (two documents of L/2 per
  row). For each: the share of causal 64 x 64 tiles whose ids never match (skippable), that
  hold one id (no mask needed) and that mix ids."""
  sh = Shape()
  B, L, Hq, Hkv, D = sh.B, sh.L, sh.Hq, sh.Hkv, sh.D
  q, k, v, r, do = make_inputs(sh)
  scale = 1.0 / math.sqrt(D)
  layouts = {
      "none": None,
      "one_doc": np.ones((B, L), np.int32),
      "stdlib": stdlib_rows(a.data, B, L),
      "halves": np.repeat(np.array([[1, 2]], np.int32), L // 2, axis=1).repeat(B, 0),
  }
  rows = []
  for name, seg in layouts.items():
    ids = None if seg is None else jnp.asarray(seg)
    attn = lambda q, k, v, r, ids=ids: parallax_flash_attention(
        q, k, v, r, scale=scale, causal=True, q_segment_ids=ids, kv_segment_ids=ids)
    fwd, (_, train_fn) = jax.jit(attn), fwd_and_train_fns(attn, True)
    row = {"layout": name}
    if seg is not None:
      row["tiles"] = tile_kinds(seg)
      row["visible_pairs"] = visible_fraction(seg)
    row["fwd_ms"], _ = time_ms(fwd, (q, k, v, r), iters=a.iters)
    row["fwd_bwd_ms"], _ = time_ms(train_fn, (q, k, v, r, do), iters=a.iters)
    row["kernels"] = kernel_breakdown(train_fn, (q, k, v, r, do))
    print(row, flush=True)
    rows.append(row)

  head = ["layout", "skip / one id / mixed tiles", "visible causal pairs", "fwd ms",
          "fwd+bwd ms", "kernels (ms)"]
  md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r_ in rows:
    t = r_.get("tiles")
    tiles = "-" if t is None else f"{t['skip']:.0%} / {t['uniform']:.0%} / {t['mixed']:.0%}"
    vis = f"{r_['visible_pairs']:.0%}" if "visible_pairs" in r_ else "100%"
    kern = ", ".join(f"{nm.split('(')[0][:24]} {ms:.3f}" for nm, ms in r_["kernels"]
                     if isinstance(ms, float))
    md.append(f"| {r_['layout']} | {tiles} | {vis} | {r_['fwd_ms']:.3f} | "
              f"{r_['fwd_bwd_ms']:.3f} | {kern} |")
  notes = (f"B={B} L={L} Hq={Hq} Hkv={Hkv} D={D} bf16 causal, `parallax_flash_attention` "
           f"(the default kernels: `bench/attention.py` docstring), CUPTI median of {a.iters}.")
  common.write_results(a.name, common.environment(), rows, "\n".join(md), notes, out=a.out)


# ----------------------------------------------------------------------------- xla

GIB = 1024**3


def xla_flops(b, l, hq, d, matmuls, causal=True, backward=False):
  """Causal matrix work: softmax 2 matmuls (QK^T, PV), Parallax 4 (adds RK^T, P2 V); the
  backward counted as 2.5x the forward, as FlashAttention does."""
  f = 2.0 * b * hq * l * l * d * matmuls * (0.5 if causal else 1.0)
  return f * (3.5 if backward else 1.0)


def xla_variants(platform):
  import parallax_jax as pj
  v = {
      "softmax_xla_dense": (lambda q, k, v, r: pj.softmax_attention(q, k, v, implementation="xla"), 2),
      "softmax_chunked": (lambda q, k, v, r: pj.softmax_attention(q, k, v, implementation="chunked"), 2),
      "parallax_xla_dense": (lambda q, k, v, r: pj.parallax_attention(q, k, v, r, implementation="xla"), 4),
      "parallax_chunked": (lambda q, k, v, r: pj.parallax_attention(q, k, v, r, implementation="chunked"), 4),
  }
  if platform == "gpu":
    v["softmax_cudnn"] = (lambda q, k, v, r: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"), 2)
  return v


def xla_shape(b, l, hq, hkv, d, dtype, platform, names, dense_limit_bytes, backward=True):
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (b, l, hq, d), dtype)
  k = jax.random.normal(ks[1], (b, l, hkv, d), dtype)
  v = jax.random.normal(ks[2], (b, l, hkv, d), dtype)
  r = (0.1 * jax.random.normal(ks[3], (b, l, hq, d))).astype(dtype)
  rows = []
  for name, (fn, mm) in xla_variants(platform).items():
    if names and name not in names:
      continue
    row = dict(variant=name, B=b, L=l, Hq=hq, Hkv=hkv, D=d, dtype=jnp.dtype(dtype).name)
    dense_bytes = 3 * b * hq * l * l * 4  # scores, weights and a product term, fp32
    if "dense" in name and dense_bytes > dense_limit_bytes:
      row["skipped"] = f"dense needs ~{dense_bytes / GIB:.0f} GiB"
      rows.append(row)
      print(row, flush=True)
      continue
    fwd = jax.jit(fn)
    loss = lambda q, k, v, r: jnp.sum(fn(q, k, v, r).astype(jnp.float32))
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    try:
      row["fwd_ms"] = 1e3 * common.time_fn(fwd, q, k, v, r)
      row["fwd_mem_MiB"] = (common.compiled_bytes(fwd, q, k, v, r) or 0) / 2**20
      row["fwd_TFLOPs"] = xla_flops(b, l, hq, d, mm) / (row["fwd_ms"] * 1e-3) / 1e12
      if backward:
        row["fwdbwd_ms"] = 1e3 * common.time_fn(bwd, q, k, v, r)
        row["fwdbwd_mem_MiB"] = (common.compiled_bytes(bwd, q, k, v, r) or 0) / 2**20
        row["fwdbwd_TFLOPs"] = (xla_flops(b, l, hq, d, mm, backward=True)
                                / (row["fwdbwd_ms"] * 1e-3) / 1e12)
    except Exception as e:  # record and go on: one failing variant must not hide the rest
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    rows.append(row)
    print(row, flush=True)
  return rows


def xla_table(rows):
  head = ["variant", "B", "L", "Hq", "Hkv", "D", "dtype", "fwd ms", "fwd TFLOP/s", "fwd mem MiB",
          "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd mem MiB", "note"]
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  f = lambda x, p=2: "" if x is None else f"{x:.{p}f}"
  for r in rows:
    out.append("| " + " | ".join([
        r["variant"], str(r["B"]), str(r["L"]), str(r["Hq"]), str(r["Hkv"]), str(r["D"]), r["dtype"],
        f(r.get("fwd_ms")), f(r.get("fwd_TFLOPs"), 3), f(r.get("fwd_mem_MiB"), 1),
        f(r.get("fwdbwd_ms")), f(r.get("fwdbwd_TFLOPs"), 3), f(r.get("fwdbwd_mem_MiB"), 1),
        r.get("skipped", r.get("error", ""))]) + " |")
  return "\n".join(out)


def xla(a):
  """Shapes by platform: GPU B=4 Hq/Hkv 16/8 D=128 bf16, L 1k, 4k, 16k; CPU B=1 H=4 D=64
  float32, L 1k, 4k. "mem" is the compiled program's temp + output bytes (XLA's memory
  analysis): the working set beyond the inputs."""
  env = common.environment()
  plat = env["platform"]
  rows = []
  if a.only_32k:
    rows += xla_shape(1, 32768, 4, 4, 64, jnp.float32, plat, {"parallax_chunked"}, 0)
  elif plat == "gpu":
    for l in (1024, 4096, 16384):
      rows += xla_shape(4, l, 16, 8, 128, jnp.bfloat16, plat, None, 40 * GIB)
  else:
    for l in (1024, 4096):
      rows += xla_shape(1, l, 4, 4, 64, jnp.float32, plat, None, 8 * GIB)
  name = a.name or ("attention_xla_" + plat + ("_32k" if a.only_32k else ""))
  common.write_results(name, env, rows, xla_table(rows))


# ----------------------------------------------------------------------------- nonfinite

NF_TRAIN = [(4, 4096, 16, 8, 128), (4, 4096, 16, 8, 64), (8, 1024, 16, 8, 128)]  # B L Hq Hkv D
NF_DECODE = [(1, 8192, 16, 8, 128), (8, 1024, 16, 8, 128), (64, 4096, 16, 8, 128),
             (8, 8192, 8, 8, 64), (256, 1024, 8, 8, 64)]


def kernel_us(fn, args, iters):
  """{kernel: median us} and their sum, CUPTI, rounded to 0.01 us."""
  med = {n: round(t, 2) for n, t in common.kernel_medians_us(fn, args, iters).items()}
  return med, round(sum(med.values()), 2)


def nonfinite_train_rows(iters, segments):
  for B, L, Hq, Hkv, D in NF_TRAIN:
    ks = jax.random.split(jax.random.key(L + D), 4)
    q = jax.random.normal(ks[0], (B, L, Hq, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, L, Hkv, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, L, Hkv, D), jnp.bfloat16)
    r = (0.3 * jax.random.normal(ks[3], (B, L, Hq, D))).astype(jnp.bfloat16)
    kw = {}
    if segments:  # four documents per row
      ids = jnp.asarray(np.repeat(np.arange(4), L // 4)[None].repeat(B, 0), jnp.int32)
      kw = dict(q_segment_ids=ids, kv_segment_ids=ids)
    for parallax in (True, False):
      rr = r if parallax else None
      fwd = jax.jit(lambda q, k, v, r: parallax_flash_attention(
          q, k, v, r, scale=1 / math.sqrt(D), causal=True, **kw))
      w = jnp.cos(jnp.arange(B * L * Hq * D, dtype=jnp.float32)).reshape(q.shape)
      bwd = jax.jit(jax.grad(lambda q, k, v, r: jnp.sum(
          parallax_flash_attention(q, k, v, r, scale=1 / math.sqrt(D), causal=True,
                                   **kw).astype(jnp.float32) * w), argnums=(0, 1, 2)))
      for poison in (False, True):
        vv = v.at[:, -1].set(jnp.nan) if poison else v
        for name, fn in (("fwd", fwd), ("fwd+bwd", bwd)):
          per, total = kernel_us(fn, (q, k, vv, rr), iters)
          row = dict(kind="train", pass_=name, B=B, L=L, Hq=Hq, Hkv=Hkv, D=D,
                     member="parallax" if parallax else "softmax", segments=segments,
                     nan_at_masked=poison, total_us=total, kernels_us=per)
          print(json.dumps(row), flush=True)
          yield row


def nonfinite_decode_rows(iters):
  for B, L, Hq, Hkv, D in NF_DECODE:
    ks = jax.random.split(jax.random.key(B * 100003 + L + D), 4)
    q = jax.random.normal(ks[0], (B, Hq, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, L, Hkv, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, L, Hkv, D), jnp.bfloat16)
    r = (0.3 * jax.random.normal(ks[3], (B, Hq, D))).astype(jnp.bfloat16)
    lens = jnp.full((B,), L - 37, jnp.int32)    # the last tile is partly past lengths
    for parallax in (True, False):
      fn = jax.jit(lambda q, k, v, r: parallax_decode(q, k, v, r, scale=1 / math.sqrt(D),
                                                      lengths=lens))
      for poison in (False, True):
        kk = k.at[:, L - 37:].set(jnp.nan) if poison else k
        vv = v.at[:, L - 37:].set(jnp.nan) if poison else v
        per, total = kernel_us(fn, (q, kk, vv, r if parallax else None), iters)
        row = dict(kind="decode", B=B, L=L, Hq=Hq, Hkv=Hkv, D=D,
                   member="parallax" if parallax else "softmax", nan_past_lengths=poison,
                   total_us=total, kernels_us=per)
        print(json.dumps(row), flush=True)
        yield row


def _key(row):
  return tuple((k, v) for k, v in row.items() if k not in ("total_us", "kernels_us"))


def nonfinite_table(before_path, after_path):
  """Markdown: total kernel us per shape, before and after, and the fixup launch's share."""
  before = {_key(r): r for r in common.read_rows(before_path)}
  lines = ["| kind | pass | B | L | D | member | docs | NaN masked | before us | after us | "
           "after/before | fixup us | dq, dk/dv after/before |", "|" + "---|" * 13]

  def kernel_sum(row, suffix):   # the fast launch of a backward kernel (not its fixup)
    return sum(t for n, t in row["kernels_us"].items() if n.endswith(suffix))

  for r in common.read_rows(after_path):
    b = before.get(_key(r))
    if b is None:
      continue
    nan = r.get("nan_at_masked", r.get("nan_past_lengths"))
    fix = sum(t for n, t in r["kernels_us"].items() if "fixup" in n)
    ratios = [f"{kernel_sum(r, k) / kernel_sum(b, k):.3f}" for k in ("bwd_dq", "bwd_dkv")
              if kernel_sum(b, k) > 0]
    lines.append(f"| {r['kind']} | {r.get('pass_', 'step')} | {r['B']} | {r['L']} | {r['D']} | "
                 f"{r['member']} | {'4' if r.get('segments') else '1'} | {'yes' if nan else 'no'} | "
                 f"{b['total_us']:.1f} | {r['total_us']:.1f} | {r['total_us'] / b['total_us']:.3f} "
                 f"| {fix:.1f} | {', '.join(ratios) or '-'} |")
  return "\n".join(lines) + "\n"


def nonfinite(a):
  """Each shape on clean inputs (every call's path: the kernels' one finiteness check per
  program, and the Mosaic GPU forward's fixup launch) and with NaN at masked positions (the
  careful pass: the last key's value, seen only by the last query row; for decode, every
  cache slot past lengths). CUPTI times per kernel, medians over --iters calls. --table also
  reads the row lines a run prints, so a run cut short still counts."""
  if a.table:
    with open(a.out, "w") as f:
      f.write(nonfinite_table(*a.table))
    return
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__,
        "pallas_kernels from", pallas_kernels.__file__, flush=True)
  rows = list(nonfinite_train_rows(a.iters, segments=False))
  rows += list(nonfinite_train_rows(a.iters, segments=True))
  rows += list(nonfinite_decode_rows(a.iters))
  with open(a.out, "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "environment": common.environment(),
               "rows": rows}, f, indent=1)


# ----------------------------------------------------------------------------- dkv


BWD_SHAPES = [  # B, L, Hq, Hkv, D, Parallax, causal, 4 documents
    (4, 4096, 16, 8, 128, True, True, False), (4, 4096, 16, 8, 128, False, True, False),
    (4, 4096, 16, 8, 128, True, True, True), (4, 4096, 16, 8, 128, False, True, True),
    (8, 1024, 16, 8, 128, True, True, False), (4, 4096, 16, 8, 64, True, True, False),
    (4, 4096, 16, 8, 64, False, True, True), (2, 2048, 16, 4, 128, True, False, False)]


def _bwd_inputs(B, L, Hq, Hkv, D, parallax, causal, docs):
  """Random bf16 inputs of one backward shape and the Triton forward's residuals."""
  from pallas_kernels import attention_triton as tr
  ks = jax.random.split(jax.random.key(L + D), 5)
  q = jax.random.normal(ks[0], (B, L, Hq, D), jnp.bfloat16)
  k = jax.random.normal(ks[1], (B, L, Hkv, D), jnp.bfloat16)
  v = jax.random.normal(ks[2], (B, L, Hkv, D), jnp.bfloat16)
  r = (0.5 * jax.random.normal(ks[3], (B, L, Hq, D))).astype(jnp.bfloat16) if parallax else None
  do = jax.random.normal(ks[4], (B, L, Hq, D), jnp.bfloat16)
  ids = (jnp.asarray(np.repeat(np.arange(4), L // 4)[None].repeat(B, 0), jnp.int32)
         if docs else None)
  bs = tr.default_block_sizes(D, parallax)
  cfg = tr.CallConfig(T=L, S=L, Tp=L, Sp=L, D=D, Hq=Hq, Hkv=Hkv, causal=causal, window=None,
                      has_r=parallax, has_seg=docs, need_dscale=False, blocks=bs,
                      interpret=False, fp16_pv=parallax and bs.fp16_p2)
  sc = jnp.full((Hq,), 1 / math.sqrt(D), jnp.float32)
  res = jax.jit(lambda *a: tr.fwd_call(cfg, *a))(q, k, v, r, sc, ids, ids)
  return cfg, (q, k, v, r, do), ids, sc, res


def _bwd_row(shape, iters, tri, mosaic, configs, ref_outs):
  """One row: the Triton fast launch `tri` and the Mosaic kernel `mosaic(config)` for each
  config; us (CUPTI median of the sum of the call's kernels), TFLOP/s (executed matmul FLOPs,
  causal pairs only), max relative difference of the outputs (ref_outs picks them) to
  Triton's."""
  B, L, Hq, Hkv, D, parallax, causal, docs, kernel = shape
  pairs = B * Hq * (L * (L + 1) // 2 if causal else L * L) // (4 if docs else 1)
  # matmuls per (query, key) pair, 2 D FLOPs each: dk/dv K Q^T, V dO^T, dV, dK (+ K R^T,
  # dK's R term); dq/dr Q K^T, dO V^T, dQ (+ R K^T, dR)
  mm = {"dkv": (6, 4), "dq": (5, 3)}[kernel][0 if parallax else 1]
  flops = 2 * mm * D * pairs
  row = dict(B=B, L=L, Hq=Hq, Hkv=Hkv, D=D, member="parallax" if parallax else "softmax",
             causal=causal, docs=4 if docs else 1, kernel=kernel, us={}, tflops={},
             rel_diff={})
  f, args = tri
  ref = ref_outs(f(*args))
  row["us"]["triton"] = round(sum(common.kernel_medians_us(f, args, iters).values()), 2)
  for c in configs:
    name = "mosaic" if c is None else f"mosaic {c}"
    f = mosaic(c)
    try:
      got = ref_outs(f(*args))
      row["us"][name] = round(sum(common.kernel_medians_us(f, args, iters).values()), 2)
      row["rel_diff"][name] = max(rel_err(x, y) for x, y in zip(got, ref))
    except Exception as e:  # noqa: BLE001  (a config that does not compile: recorded)
      row["us"][name] = None
      row["rel_diff"][name] = repr(e)[:200]
  row["tflops"] = {n: (round(flops / t / 1e6, 1) if t else None) for n, t in row["us"].items()}
  log(json.dumps(row))
  return row


def dkv_row(B, L, Hq, Hkv, D, parallax, causal, docs, iters, configs):
  """The Triton dk/dv fast launch and the Mosaic GPU dk/dv kernel (each config) on the
  residuals of the Triton forward and dq kernels."""
  from pallas_kernels import attention_mgpu_dkv as dm
  from pallas_kernels import attention_triton as tr
  cfg, (q, k, v, r, do), ids, sc, (o, lse, tbar, vbar) = _bwd_inputs(
      B, L, Hq, Hkv, D, parallax, causal, docs)
  _, _, delta, gbar, _ = jax.jit(lambda *a: tr.dq_call(cfg, *a))(
      q, k, v, r, do, o, vbar, lse, tbar, sc, ids, ids)
  args = (q, k, v, r, do, lse, delta, tbar, gbar)
  tri = jax.jit(lambda *a: tr.dkv_call(cfg, *a, sc, ids, ids, fast=True))
  mosaic = lambda c: jax.jit(lambda *a: dm.parallax_dkv_mgpu(
      *a, scale=sc, causal=causal, q_segment_ids=ids, kv_segment_ids=ids, config=c))
  return _bwd_row((B, L, Hq, Hkv, D, parallax, causal, docs, "dkv"), iters, (tri, args),
                  mosaic, configs, lambda outs: outs[:2])


def dq_row(B, L, Hq, Hkv, D, parallax, causal, docs, iters, configs):
  """The Triton dq/dr fast launch (its delta, gbar preprocess inside) and the Mosaic GPU
  dq/dr kernel (each config) with the XLA reduction that gives it delta, gbar."""
  from pallas_kernels import attention_mgpu_dq as dm
  from pallas_kernels import attention_triton as tr
  cfg, (q, k, v, r, do), ids, sc, (o, lse, tbar, vbar) = _bwd_inputs(
      B, L, Hq, Hkv, D, parallax, causal, docs)
  args = (q, k, v, r, do, o, vbar, lse, tbar)
  tri = jax.jit(lambda *a: tr.dq_call(cfg, *a, sc, ids, ids, fast=True))

  def mosaic(c):
    def f(q, k, v, r, do, o, vbar, lse, tbar):
      rd = lambda x: jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32),
                                x.astype(jnp.float32))
      dq, dr, rowsum = dm.parallax_dq_mgpu(
          q, k, v, r, do, lse, rd(o), tbar, None if r is None else rd(vbar), scale=sc,
          causal=causal, q_segment_ids=ids, kv_segment_ids=ids, config=c)
      return dq, dr, rowsum
    return jax.jit(f)

  pick = lambda outs: [x for x in outs[:2] if x is not None]
  return _bwd_row((B, L, Hq, Hkv, D, parallax, causal, docs, "dq"), iters, (tri, args),
                  mosaic, configs, pick)


def bwd_md(rows) -> str:
  lines = ["| kernel | B | L | Hq/Hkv | D | member | causal | docs | launch | us | TFLOP/s | "
           "x Triton | rel diff |", "|" + "---|" * 13]
  for r in rows:
    t = r["us"]["triton"]
    for n, us in r["us"].items():
      ratio = f"{t / us:.2f}" if us else "-"
      d = r["rel_diff"].get(n, "")
      d = f"{d:.1e}" if isinstance(d, float) else (d or "-")
      lines.append(f"| {r.get('kernel', 'dkv')} | {r['B']} | {r['L']} | {r['Hq']}/{r['Hkv']} | {r['D']} | {r['member']} | "
                   f"{r['causal']} | {r['docs']} | {n} | {us} | {r['tflops'][n]} | {ratio} | "
                   f"{d} |")
  return "\n".join(lines)


def bwd_configs(kernel: str, parallax: bool) -> dict:
  """The named kernel configs `bwd --configs` times next to the default."""
  if kernel == "dkv":
    from pallas_kernels.attention_mgpu_dkv import DkvConfig as C
    out = {"stages3": C(num_stages=3), "regs232": C(consumer_registers=232),
           "unfold": C(fold_rows=False)}
    if parallax:
      out["split"] = C(split_scores=True)
  else:
    from pallas_kernels.attention_mgpu_dq import DqConfig as C
    out = {"stages3": C(num_stages=3), "regs232": C(consumer_registers=232)}
    if parallax:
      out["split"] = C(split_scores=True)
  return out


def kept_bwd_rows(name: str, kernels) -> list:
  """The rows of the kernels this run leaves out, from the results file it rewrites, each
  naming the run it came from (a `--kernels dkv` run keeps the last dq rows)."""
  path = os.path.join(common.RESULTS, f"{name}.json")
  if not os.path.exists(path):
    return []
  with open(path) as fh:
    old = json.load(fh)
  src = {k: old["environment"].get(k) for k in ("date", "command", "pallas_kernels")}
  return [{**r, "from": r.get("from", src)} for r in old["results"]
          if r.get("kernel", "dkv") not in kernels]


def bwd(a):
  """The Mosaic GPU backward kernels against the Triton fast launches, per kernel."""
  kernels = a.kernels.split(",")
  unknown = set(kernels) - {"dq", "dkv"}
  if unknown:
    raise SystemExit(f"--kernels: unknown {sorted(unknown)} (dq, dkv)")
  names = {n for k in kernels for n in bwd_configs(k, True)}
  unknown = set((a.configs or "all").split(",")) - names - {"all"}
  if unknown:
    raise SystemExit(f"--configs: unknown {sorted(unknown)} ({', '.join(sorted(names))})")
  kept, rows, env = kept_bwd_rows(a.name, kernels), [], common.environment()
  kept_note = "".join(f" Rows kept from an earlier run: {src}."
                      for src in dict.fromkeys(json.dumps(r["from"]) for r in kept))
  # shape-major, so a cut-short run has both kernels at its first shapes; written after
  # every row
  for sh in BWD_SHAPES:
    for kernel in kernels:
      parallax = sh[5]  # (split_scores changes Parallax only)
      configs = [None] + [c for n, c in bwd_configs(kernel, parallax).items()
                          if a.configs == "all" or n in (a.configs or "").split(",")]
      if kernel == "dkv":
        rows.append(dkv_row(*sh, a.iters, configs))
      else:
        rows.append(dq_row(*sh, a.iters, configs))
      common.write_results(a.name, env, rows + kept, bwd_md(rows + kept),
                           notes="x Triton: the Triton kernel's time over this row's (> 1: "
                           "faster). dq: the Mosaic time includes the XLA reduction giving "
                           "it delta, gbar (the Triton dq kernel computes them). rel diff: "
                           "max |x - triton| / max |triton| of dq, dr or dk, dv."
                           + kept_note, out=a.out)


# ----------------------------------------------------------------------------- command line


def parser():
  ap, modes = common.mode_parser(__doc__)
  mode = lambda name, fn, help: common.add_mode(modes, name, fn, help)
  p = mode("train", train, "Pallas Parallax / softmax (Triton, Mosaic GPU forward) vs cuDNN, "
           "XLA and the chunked / dense Parallax paths: forward and forward+backward at the "
           "shape of record with errors, an L x D sweep and block sweeps of the Pallas kernels "
           "(attention_train.json / .md in --out)")
  p.add_argument("--out", default=".", help="directory of the result files")
  p.add_argument("--no-block-sweep", action="store_true",
                 help="skip the block sweeps (the tables use the kernels' default tiles)")
  p.add_argument("--budget-s", type=float, default=420.0,
                 help="seconds; the sweeps stop when spent")
  p.add_argument("--cpu-smoke", action="store_true",
                 help="tiny shapes, interpret mode, wall-clock timer (checks the mode)")
  p = mode("grid", grid, "training kernels over L x D x GQA ratio and packed documents: "
           "Parallax and softmax forward, forward+backward against cuDNN (attention_grid)")
  p.add_argument("--iters", type=int, default=10, help="timed calls per median")
  p.add_argument("--budget-s", type=float, default=480.0,
                 help="seconds; no new row starts after them")
  p.add_argument("--resume", action="store_true", help="keep the rows of a previous run")
  p.add_argument("--name", default="attention_grid", help="results file stem")
  p.add_argument("--out", default=None, help="also copy the result files here")
  p.add_argument("--cpu-smoke", action="store_true",
                 help="two tiny shapes, interpret mode, wall-clock timer (checks the mode)")
  p = mode("segments", segments, "training attention with segment ids: one shape (the 0.6B "
           "training shape), Parallax forward and forward+backward per segment-id layout "
           "(bench/results/attention_segments)")
  p.add_argument("--data", default="data/stdlib", help="token shards (prepared if missing)")
  p.add_argument("--iters", type=int, default=20, help="timed calls per median")
  p.add_argument("--name", default="attention_segments", help="results file stem")
  p.add_argument("--out", default=None, help="also copy the result files here")
  p = mode("xla", xla, "dense vs chunked Parallax vs softmax (XLA, and cuDNN on GPU): wall "
           "time and compiled memory (bench/results/attention_xla_<platform>)")
  p.add_argument("--only-32k", action="store_true",
                 help="only the chunked Parallax fwd+bwd at B=1 H=4 L=32768 D=64 float32 (the "
                 "CPU acceptance run: attention_xla_<platform>_32k)")
  p.add_argument("--name", default=None, help="results file stem (default by platform)")
  p = mode("bwd", bwd, "the Mosaic GPU dq/dr and dk/dv kernels against the Triton fast "
           "launches (attention_bwd_mgpu)")
  p.add_argument("--kernels", default="dq,dkv", help="comma list of dq, dkv")
  p.add_argument("--iters", type=int, default=20, help="timed calls per median")
  p.add_argument("--configs", nargs="?", const="all", default=None, metavar="NAMES",
                 help="also time other configs: all (no value), or a comma list of stages3 "
                      "(3 stages), regs232 (232 consumer registers), unfold (dk/dv: row "
                      "vectors read apart from the score accumulators, the old default), "
                      "split (Parallax: split score products)")
  p.add_argument("--name", default="attention_bwd_mgpu", help="results file stem")
  p.add_argument("--out", default=None, help="also copy the result files here")
  p = mode("nonfinite", nonfinite, "GPU kernel times of the training and decode kernels, for "
           "an A/B of the non-finite handling (kernel_nonfinite); public pallas_kernels entry "
           "points only, so an older checkout put first on PYTHONPATH runs it too")
  p.add_argument("--out", required=True, help="JSON file for the rows (markdown with --table)")
  p.add_argument("--table", nargs=2, metavar=("BEFORE", "AFTER"),
                 help="write a before/after markdown table of two runs' rows instead")
  p.add_argument("--iters", type=int, default=30, help="timed calls per median")
  return ap


def main(argv=None):
  a = parser().parse_args(argv)
  a.run(a)


if __name__ == "__main__":
  sys.exit(main())
