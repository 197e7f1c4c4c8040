"""Decode-attention benchmarks: the Pallas split-KV Parallax decode kernel against cuDNN / XLA
softmax decode, the XLA Parallax path, torch's FlashAttention-2 and its own variants. Modes
(result files under --out, default bench/results):

  grid          the decode grid, GQA and MHA (decode_grid_warm; --cold: decode_grid_cold);
                --grids adds one grid per GQA ratio 1-16 and head dim 64 / 128
  ab            the working tree's Triton kernel vs another source file of it (decode_ab)
  launch-sweep  explicit `parallax_decode` launch keywords, L2 cold (decode_launch_sweep)
  split-sweep   split counts x tiles around the defaults, L2 warm, unchained (decode_sweep)
  multitoken    T new tokens per sequence against T=1 (decode_multitoken)
  mgpu-ab       the Mosaic GPU kernel's variants vs the Triton kernel (decode_mgpu_ab)

One new token per sequence (multitoken: T), KV cache [B, L, Hkv, D], all L slots valid, bf16.
Timing (grid, ab, launch-sweep, mgpu-ab): CUPTI kernel time
(`jax.experimental.mosaic.gpu.profiler.measure`, median over iterations) of everything a
decode step launches, for every JAX implementation alike as STEPS chained steps (each step's
output is the next one's query) / STEPS. What a decode loop holds across steps is an input:
cuDNN's query lengths (ones) and the Pallas kernel's arrival counter, handed from step to step
as the model's `KVCache.arrivals`; `us_fresh_counter` (grid JSON) is one Pallas call that
zeroes its own counter instead. torch (grid) is timed with CUDA events around each call
(launch included), so it is an anchor, not a like-for-like kernel time. GB/s counts the K and
V bytes of the valid cache; the HBM rate it is compared with is a measured device copy (read +
write bytes / time). Caches under the 50 MB L2 stay L2-resident across iterations (for every
implementation alike): GB/s above the HBM rate are L2 reads; caches of 50-200 MB stay partly
resident, by an amount that depends on each kernel's order of reading. `--cold` (grid, ab;
always in launch-sweep) evicts the L2 between steps instead (a 256 MB read, not timed): every
step reads its cache from HBM, as in a model, where the other layers run between two steps of
one. Error: max |o - ref| / max |ref| against a float32 dense reference (B*L <= 256k only).
The XLA paths run only where B*L <= 256k (they are 3-5x slower and only baselines).

  PYTHONPATH=. python3 bench/decode.py grid --out DIR [--budget 300] [--cold] [--grids G,..]
      [--resume]
  PYTHONPATH=. python3 bench/decode.py ab --baseline /tmp/base.py --out DIR [--cold]
      (git show REV:pallas_kernels/decode_triton.py > /tmp/base.py; an older
      decode.py takes its helpers from parallax_triton: rewrite that import to pallas_kernels.common)
  PYTHONPATH=. python3 bench/decode.py launch-sweep --out DIR --shapes gqa:32:4096,... \\
      --variants '[{}, {"block_kv": 32, "num_stages": 3}]' [--reps 2]
  PYTHONPATH=. python3 bench/decode.py MODE --help
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

warnings.filterwarnings("ignore", category=DeprecationWarning)

from jax.experimental import pallas as pl  # noqa: E402

import pallas_kernels  # noqa: E402
from bench import common  # noqa: E402
from bench.common import log  # noqa: E402
from pallas_kernels import decode_triton as dk  # noqa: E402  (default_pack)
from pallas_kernels.common import split_chunk  # noqa: E402

STEPS = 8  # dependent decode calls per timed call (see `chained`)
# grid -> (Hq, Hkv, D): the grids of record (gqa, mha) and one per GQA ratio G and head dim
GRIDS = {"gqa": (16, 8, 128), "mha": (8, 8, 64),
         "g1d128": (16, 16, 128), "g4d128": (32, 8, 128), "g8d128": (64, 8, 128),
         "g16d128": (128, 8, 128), "g2d64": (16, 8, 64), "g4d64": (32, 8, 64),
         "g8d64": (64, 8, 64)}
SHAPES_HELP = ("comma list of grid:B:L (gqa: Hq=16 Hkv=8 D=128; mha: 8/8 D=64; gGdD: GQA ratio "
               "G at head dim D, e.g. g4d128: 32/8 D=128, g1d128: 16/16)")
LAUNCH = "block_kv, num_splits, kv_heads_per_program"


# ----------------------------------------------------------------------------- timing


def time_us(fn, args, iters=30):
  """(median us, "cupti" or "wall") of fn(*args) after two warm-up calls; a call CUPTI fails
  on is timed by wall clock, the next ones by CUPTI again."""
  ms, _ = common.time_ms(fn, args, iters, sticky=False)
  return ms * 1e3, common.TIMER["last"]


def hbm_copy_gbps():
  """Measured HBM rate: a 4 GiB bf16 copy (x + 1), read + write bytes over CUPTI time."""
  x = jnp.zeros((2**31,), jnp.bfloat16)
  us, _ = time_us(jax.jit(lambda a: a + 1), (x,), iters=10)
  return 2 * x.nbytes / (us * 1e-6) / 1e9


def chained(step):
  """STEPS decode steps, each one's output the next one's query (so no two calls are the
  same and XLA cannot merge them; as in generation, step t+1 depends on step t), unrolled (an
  XLA loop adds a ~1 us counter-increment kernel per iteration). Timed / STEPS."""
  def f(q, k, v, r, lens, ex):
    for _ in range(STEPS):
      q, ex = step(q, k, v, r, lens, ex)
      q = q.astype(k.dtype)
    return q, ex
  return jax.jit(f)


# --cold: a 256 MB read between steps evicts the 50 MB L2, as the layers between two decode
# steps of one layer do in a model.
FLUSH_BLOCKS, FLUSH_ROWS = 16384, 64  # [64, 128] bf16 blocks


def flush_buffer():
  return jnp.ones((FLUSH_BLOCKS * FLUSH_ROWS, 128), jnp.bfloat16)


def _flush_kernel(x_ref, o_in_ref, sums_ref, o_ref):
  del o_in_ref, o_ref  # o passes through untouched (aliased)
  sums_ref[...] = jnp.sum(x_ref[...].astype(jnp.float32), axis=0, keepdims=True)


def l2_flush(buf, o):
  """Reads all of buf (a Pallas kernel named `l2_flush`) and returns o itself, aliased: what
  consumes the result runs after the flush, and no other kernel is added between steps."""
  whole = pl.BlockSpec(o.shape, lambda i: (0,) * o.ndim)
  _, o = pl.pallas_call(
      _flush_kernel, grid=(FLUSH_BLOCKS,),
      in_specs=[pl.BlockSpec((FLUSH_ROWS, 128), lambda i: (i, 0)), whole],
      out_specs=[pl.BlockSpec((1, 128), lambda i: (i, 0)), whole],
      out_shape=[jax.ShapeDtypeStruct((FLUSH_BLOCKS, 128), jnp.float32),
                 jax.ShapeDtypeStruct(o.shape, o.dtype)],
      input_output_aliases={1: 1}, name="l2_flush",
  )(buf, o)
  return o


def chained_cold(step):
  """`chained` with the L2 flushed after every step; call with the flush buffer last."""
  def f(q, k, v, r, lens, ex, buf):
    for _ in range(STEPS):
      q, ex = step(q, k, v, r, lens, ex)
      q = l2_flush(buf, q.astype(k.dtype))
    return q, ex
  return jax.jit(f)


def time_cold_us(fn, args, iters=20):
  """CUPTI time per step of a `chained_cold` fn (median over iters) of every kernel but the
  flushes, and the names of those kernels."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  per_iter = common.cupti_calls(fn, args, iters)
  totals = [sum(t for name, t in it if "l2_flush" not in name) for it in per_iter]
  names = sorted({name[:64] for name, _ in per_iter[0] if "l2_flush" not in name})
  return statistics.median(totals) * 1e3 / STEPS, names


def time_step(step, args, flush_buf=None):
  """(us per step, how it was timed) of `step` chained STEPS times on args; flush_buf: the
  L2 evicted between steps (`chained_cold`, every kernel but the flush timed)."""
  if flush_buf is None:
    us, how = time_us(chained(step), args)
    return us / STEPS, f"{how}, {STEPS} chained steps"
  us, kernels = time_cold_us(chained_cold(step), (*args, flush_buf))
  return us, f"cupti, {STEPS} chained steps, L2 flushed between: {', '.join(kernels)}"


# ----------------------------------------------------------------------------- steps, inputs


def pallas_step(scale, parallax=True, module=pallas_kernels, **launch):
  """One decode step of the Triton kernel (`module`: pallas_kernels, or another source of its
  decode module: mode ab) with `parallax_decode` keywords `launch`; ex["arr"] None: the call
  zeroes its own counter."""
  def step(q, k, v, r, lens, ex):
    o = module.parallax_decode(q, k, v, r if parallax else None, scale=scale, lengths=lens,
                               arrivals=ex["arr"], **launch)
    return (o, ex) if ex["arr"] is None else (o[0], {**ex, "arr": o[1]})
  return step


def sdpa_step(scale, impl="cudnn"):
  """One softmax decode step of `jax.nn.dot_product_attention` (cuDNN or XLA)."""
  def step(q, k, v, r, lens, ex):
    return jax.nn.dot_product_attention(
        q[:, None], k, v, scale=scale, implementation=impl,
        query_seq_lengths=ex["ql"], key_value_seq_lengths=lens)[:, 0], ex
  return step


def impls(B, L, Hq, Hkv, D, with_xla=True):
  """name -> one decode step step(q, k, v, r, lens, ex) -> (o, ex). ex = {"ql": query
  lengths (ones), "arr": the zeroed arrival counter}: what a decode loop holds across steps
  (the Pallas kernel hands the counter on, as `KVCache.arrivals` does), not made per call."""
  scale = 1.0 / np.sqrt(D)
  out = {"pallas_parallax": pallas_step(scale),
         "pallas_softmax": pallas_step(scale, parallax=False),
         "cudnn_softmax": sdpa_step(scale)}
  if not with_xla:
    return out
  out["xla_softmax"] = sdpa_step(scale, "xla")

  def xla_parallax(q, k, v, r, lens, ex):
    import parallax_jax
    kv_ids = jnp.where(jnp.arange(L)[None] < lens[:, None], 0, -1)
    q_ids = jnp.zeros((B, 1), jnp.int32)
    return parallax_jax.attention(q[:, None], k, v, r[:, None], probe="learned",
                                  affine="affine", causal=True, segment_ids=(q_ids, kv_ids),
                                  implementation="xla")[:, 0], ex
  out["xla_parallax"] = xla_parallax
  return out


def step_args(q, k, v, r, lens, B, Hkv):
  """The arguments of a step: the inputs and what a decode loop holds (ex, see `impls`)."""
  return (q, k, v, r, lens,
          {"ql": jnp.ones((B,), jnp.int32), "arr": pallas_kernels.init_arrivals(B, Hkv)})


def shapes_within(specs: str, budget: float):
  """(grid, B, L, Hq, Hkv, D) of each grid:B:L in the comma list `specs`, while less than
  `budget` seconds have passed since the first (later shapes are logged and skipped)."""
  t0 = time.time()
  for spec in specs.split(","):
    if time.time() - t0 > budget:
      log("budget spent: skipping", spec)
      continue
    grid, B, L = spec.split(":")
    yield (grid, int(B), int(L), *GRIDS[grid])


def launched(B, Hkv, L, D, rows):
  """(block_kv, splits, KV heads per program) the Parallax kernel launches by default (splits
  after the kernel rounds its chunk of the cache up to whole tiles)."""
  pack = dk.default_pack(B, Hkv, L, D, rows=rows)
  bk, ns = pallas_kernels.default_launch(B, Hkv, L, D, rows=rows, pack=pack)
  return bk, split_chunk(L, ns, bk)[1], pack


def shape_inputs(B, L, Hq, Hkv, D):
  """The bf16 inputs of one grid shape (seeded by the shape: every mode but split-sweep and
  multitoken times the same cache), all L slots valid: (q, k, v, r, lens), and the float32
  references {"parallax", "softmax"} where B*L <= 256k (else {})."""
  dt = jnp.bfloat16
  ks = jax.random.split(jax.random.key(B * 100003 + L + D), 4)
  q = jax.random.normal(ks[0], (B, Hq, D), dt)
  r = (0.5 * jax.random.normal(ks[1], (B, Hq, D))).astype(dt)
  k = jax.random.normal(ks[2], (B, L, Hkv, D), dt)
  v = jax.random.normal(ks[3], (B, L, Hkv, D), dt)
  lens = jnp.full((B,), L, jnp.int32)
  refs = {}
  if B * L <= 256 * 1024:
    scale = 1.0 / np.sqrt(D)
    refs = {name: np.asarray(pallas_kernels.reference_decode(q, k, v, rr, scale=scale,
                                                             lengths=lens))
            for name, rr in (("parallax", r), ("softmax", None))}
  return (q, k, v, r, lens), refs


def log_entry(grid, B, L, name, ent, digits=4):
  log(grid, B, L, name, {a: (round(b, digits) if isinstance(b, float) else b)
                         for a, b in ent.items()})


def add_vs_cudnn(row):
  """Each timed entry's time over cuDNN's (where cuDNN ran)."""
  c = row.get("cudnn_softmax", {}).get("us")
  for ent in row.values():
    if isinstance(ent, dict) and "us" in ent and c:
      ent["vs_cudnn"] = ent["us"] / c


def save(out, name, res, write_md):
  """<out>/<name>.json and .md, rewritten after every shape (a run cut short keeps its rows)."""
  with open(os.path.join(out, f"{name}.json"), "w") as f:
    json.dump(res, f, indent=1)
  write_md(res, os.path.join(out, f"{name}.md"))


# ----------------------------------------------------------------------------- grid


def torch_fa2(B, L, Hq, Hkv, D, scale, cold=False):
  """torch SDPA with only the flash backend, on the JAX arrays (DLPack, no copy); cold: a 256
  MB read before each timed call (outside its events)."""
  import torch
  from torch.nn.attention import SDPBackend, sdpa_kernel
  import torch.nn.functional as F

  def run(q, k, v):
    tq = torch.from_dlpack(q).unsqueeze(2)                   # [B, Hq, 1, D]
    tk = torch.from_dlpack(k).transpose(1, 2)                # [B, Hkv, L, D] (view)
    tv = torch.from_dlpack(v).transpose(1, 2)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
      f = lambda: F.scaled_dot_product_attention(tq, tk, tv, scale=scale, enable_gqa=Hq != Hkv)
      for _ in range(3):
        f()
      flush = torch.ones(FLUSH_BLOCKS * FLUSH_ROWS * 128, dtype=torch.bfloat16,
                         device=tq.device) if cold else None
      ts = []
      for _ in range(30):
        if flush is not None:
          flush.sum()
        ev[0].record(); f(); ev[1].record(); torch.cuda.synchronize()
        ts.append(ev[0].elapsed_time(ev[1]) * 1e3)
      out = f().squeeze(2).float().cpu().numpy()
    return statistics.median(ts), out
  return run


GRID_BS = {"gqa": (1, 8, 32, 64, 128, 256), "mha": (1, 8, 64, 256)}
GRID_BS_OTHER = (1, 8, 64, 256)     # the per-ratio grids
GRID_LS = (1024, 4096, 8192, 32768)


def grid_title(name):
  Hq, Hkv, D = GRIDS[name]
  return f"{name}: Hq={Hq}, Hkv={Hkv} (GQA {Hq // Hkv}), D={D}"


def grid_stem(a) -> str:
  return (("decode_grid" if a.grids == "gqa,mha" else "decode_grid_ratios")
          + ("_cold" if a.cold else "_warm"))


def resumed_rows(out: str, stem: str) -> list:
  """The rows of an earlier run of the same grid file (<out>, else bench/results), each
  naming the run it came from: a grid too large for one call is measured over several."""
  for d in (out, common.RESULTS):
    path = os.path.join(d, f"{stem}.json")
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      src = {k: old["env"].get(k) for k in ("date", "command", "pallas_kernels")}
      return [dict(r, **{"from": r.get("from", src)}) for r in old["rows"]]
  return []


def grid(a):
  res = {"env": common.environment(), "cold": a.cold, "rows": []}
  stem = grid_stem(a)
  if a.resume:
    res["rows"] = resumed_rows(a.out, stem)
    log(f"resume: {len(res['rows'])} rows of {stem} kept")
  done = {(r["grid"], r["B"], r["L"]) for r in res["rows"]}
  flush_buf = flush_buffer() if a.cold else None
  try:
    res["hbm_copy_GBps"] = hbm_copy_gbps()
    log("HBM copy GB/s", round(res["hbm_copy_GBps"]))
  except Exception as e:  # noqa: BLE001
    log("hbm copy failed", repr(e)[:200])
  for name in a.grids.split(","):
    if name not in GRIDS:
      raise SystemExit(f"--grids: unknown grid {name!r} (one of {', '.join(GRIDS)})")
    Bs = GRID_BS.get(name, GRID_BS_OTHER)
    Hq, Hkv, D = GRIDS[name]
    for L in GRID_LS:
      for B in Bs:
        if B * L > 4 * 2**20:
          log(f"skip B={B} L={L}: KV {2 * B * L * Hkv * D * 2 / 1e9:.0f} GB")
          continue
        if (name, B, L) in done:
          continue
        if time.time() - common.T0 > a.budget:
          log(f"budget spent; skip {name} B={B} L={L}")
          continue
        res["rows"].append(grid_shape(name, B, L, Hq, Hkv, D, flush_buf))
        save(a.out, stem, res, grid_md)


def grid_shape(grid, B, L, Hq, Hkv, D, flush_buf=None):
  scale = 1.0 / np.sqrt(D)
  (q, k, v, r, lens), refs = shape_inputs(B, L, Hq, Hkv, D)
  kv_bytes = 2 * B * L * Hkv * D * 2
  small = bool(refs)
  row = {"grid": grid, "B": B, "L": L, "Hq": Hq, "Hkv": Hkv, "D": D,
         LAUNCH: launched(B, Hkv, L, D, Hq // Hkv),
         "num_splits": pallas_kernels.default_num_splits(B, Hkv, L, rows=Hq // Hkv),
         "kv_GB": kv_bytes / 1e9}

  def record(name, us, how, o=None):
    ent = {"us": us, "GBps": kv_bytes / (us * 1e-6) / 1e9, "timer": how}
    ref = refs.get("parallax" if "parallax" in name else "softmax")
    if ref is not None and o is not None:
      ent["rel_err"] = common.rel_err(o, ref)
    row[name] = ent
    log_entry(grid, B, L, name, ent)

  args = step_args(q, k, v, r, lens, B, Hkv)
  for name, step in impls(B, L, Hq, Hkv, D, with_xla=small).items():
    try:
      us, how = time_step(step, args, flush_buf)
      record(name, us, how, jax.jit(step)(*args)[0] if small else None)
      if name.startswith("pallas") and flush_buf is None:  # one call zeroing its own counter
        fresh = jax.jit(lambda *a, step=step: step(*a[:5], {**a[5], "arr": None})[0])
        row[name]["us_fresh_counter"] = time_us(fresh, args)[0]
    except Exception as e:  # noqa: BLE001
      row[name] = {"error": repr(e)[:300]}
      log(grid, B, L, name, row[name])
  try:
    us, o = torch_fa2(B, L, Hq, Hkv, D, scale, cold=flush_buf is not None)(q, k, v)
    record("torch_fa2_softmax", us, "cuda_events" + (", L2 flushed" if flush_buf is not None
                                                     else ""), o)
  except Exception as e:  # noqa: BLE001
    row["torch_fa2_softmax"] = {"error": repr(e)[:300]}
    log(grid, B, L, "torch", row["torch_fa2_softmax"])
  add_vs_cudnn(row)
  return row


def grid_md(res, path):
  names = ["pallas_parallax", "pallas_softmax", "cudnn_softmax", "torch_fa2_softmax",
           "xla_softmax", "xla_parallax"]
  hbm = res.get("hbm_copy_GBps")
  lines = [f"# Decode attention, {res['env']['device']}, jax {res['env']['jax']}, "
           f"{res['env']['date']}", "", f"Command: `{res['env']['command']}`", "",
           "bf16, one token per sequence, all L slots valid. us = median kernel time (CUPTI; "
           f"per step of {STEPS} chained steps; Pallas hands its arrival counter on, as the "
           "model's decode loop does; torch: CUDA events, launch included); GB/s of K+V read"
           + (f" (% of the measured HBM copy rate, {hbm:.0f} GB/s)" if hbm else "")
           + "; xC = time / cuDNN time; err = max rel error vs fp32 reference.", ""]
  if res.get("cold"):
    lines[0] = lines[0].replace("# Decode attention,", "# Decode attention, cold L2,")
    lines += ["Cold L2 (`--cold`): a 256 MB read between steps (a Pallas kernel, `l2_flush`, "
              "not timed; torch: before each call, outside its events) evicts the L2, so every "
              "step reads the cache from HBM, as in a model.", ""]
  kept = list(dict.fromkeys(json.dumps(r["from"]) for r in res["rows"] if "from" in r))
  if kept:
    lines += ["Rows marked † were kept from earlier runs (`--resume`): " + "; ".join(kept)
              + ".", ""]
  for grid in dict.fromkeys(r["grid"] for r in res["rows"]):
    title = grid_title(grid)
    rows = sorted((r for r in res["rows"] if r["grid"] == grid), key=lambda r: (r["L"], r["B"]))
    if not rows:
      continue
    lines += [f"## {title}", "", "| B | L | Parallax splits (x keys per tile if not 64, KV "
              "heads per program if not 1) | " + " | ".join(names) + " |",
              "|---|---|---|" + "---|" * len(names)]
    for row in rows:
      cells = []
      for n in names:
        e = row.get(n, {})
        if "us" not in e:
          cells.append("err" if "error" in e else "-")
          continue
        s = f"{e['us']:.1f} us, {e['GBps']:.0f} GB/s"
        if hbm and n.startswith("pallas"):
          s += f" ({e['GBps'] / hbm:.0%})"
        if "vs_cudnn" in e:
          s += f", x{e['vs_cudnn']:.2f}"
        if "rel_err" in e:
          s += f", err {e['rel_err']:.1e}"
        cells.append(s)
      bk, ns, pack = row[LAUNCH]
      lines.append(f"| {row['B']}{' †' if 'from' in row else ''} | {row['L']} | {ns}"
                   + (f" x {bk}" if bk != 64 else "")
                   + (f", {pack} KV heads" if pack > 1 else "") + " | " + " | ".join(cells)
                   + " |")
    lines.append("")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- ab


def ab(a):
  mods = {"baseline": common.load_module(a.baseline, "decode_baseline"), "new": pallas_kernels}
  res = {"env": common.environment(), "baseline": a.baseline, "cold": a.cold, "rows": []}
  flush_buf = flush_buffer() if a.cold else None
  for shape in shapes_within(a.shapes, a.budget):
    res["rows"].append(ab_shape(mods, *shape, flush_buf=flush_buf))
    save(a.out, a.name, res, ab_md)


def ab_shape(mods, grid, B, L, Hq, Hkv, D, flush_buf=None):
  """One shape's row; flush_buf (`--cold`): the L2 evicted between steps (mode grid)."""
  scale = 1.0 / np.sqrt(D)
  (q, k, v, r, lens), refs = shape_inputs(B, L, Hq, Hkv, D)
  args = step_args(q, k, v, r, lens, B, Hkv)
  row = {"grid": grid, "B": B, "L": L, "Hq": Hq, "Hkv": Hkv, "D": D,
         LAUNCH: launched(B, Hkv, L, D, Hq // Hkv)}
  steps = {"cudnn_softmax": sdpa_step(scale)}
  for name, mod in mods.items():
    steps[name] = pallas_step(scale, module=mod)
  for name, step in steps.items():
    us, how = time_step(step, args, flush_buf)
    ent = {"us": us, "timer": how}
    if refs and name != "cudnn_softmax":
      ent["rel_err"] = common.rel_err(jax.jit(step)(*args)[0], refs["parallax"])
    row[name] = ent
    log_entry(grid, B, L, name, ent)
  for name in mods:
    row[name]["vs_cudnn"] = row[name]["us"] / row["cudnn_softmax"]["us"]
  return row


def ab_md(res, path):
  lines = [f"# Decode A/B: Triton kernel, baseline vs working tree ({res['env'].get('device')}, "
           f"{res['env'].get('date')})", "",
           f"baseline: {res['baseline']}. us per step (CUPTI, {STEPS} chained steps"
           + ("; L2 evicted between steps" if res.get("cold") else "")
           + "); "
           "x = ratio to cuDNN softmax decode.", "",
           "| grid | B | L | new default (block_kv, splits, KV heads per program) | cuDNN | "
           "baseline | new | new / baseline |",
           "|---|---:|---:|---|---:|---:|---:|---:|"]
  for row in res["rows"]:
    c, b, n = (row[k]["us"] for k in ("cudnn_softmax", "baseline", "new"))
    lines.append(f"| {row['grid']} | {row['B']} | {row['L']} | {row[LAUNCH]} "
                 f"| {c:.2f} | {b:.2f} (x{b / c:.2f}) | {n:.2f} (x{n / c:.2f}) | {n / b:.3f} |")
  lines += ["", f"env: {json.dumps(res['env'])}"]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- launch-sweep


def launch_sweep(a):
  variants = json.loads(a.variants)
  if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
    raise SystemExit(f"--variants must be a JSON list of dicts, got {a.variants!r}")
  res = {"env": common.environment(), "reps": a.reps, "variants": variants, "rows": []}
  buf = flush_buffer()
  for shape in shapes_within(a.shapes, a.budget):
    res["rows"].append(launch_sweep_shape(*shape, variants, buf, a.reps))
    save(a.out, a.name, res, launch_sweep_md)


def launch_sweep_shape(grid, B, L, Hq, Hkv, D, variants, buf, reps):
  """One shape's row: us per step of every entry (a list over repetitions), errors."""
  scale = 1.0 / np.sqrt(D)
  (q, k, v, r, lens), refs = shape_inputs(B, L, Hq, Hkv, D)
  args = (*step_args(q, k, v, r, lens, B, Hkv), buf)
  steps = {"cudnn": sdpa_step(scale), "softmax": pallas_step(scale, parallax=False)}
  steps.update({"par " + json.dumps(kw): pallas_step(scale, **kw) for kw in variants})
  row = {"grid": grid, "B": B, "L": L, "Hq": Hq, "Hkv": Hkv, "D": D,
         "default_launch": launched(B, Hkv, L, D, Hq // Hkv),
         "us": {}, "kernels": {}, "rel_err": {}, "errors": {}}
  fns = {}
  for name, step in steps.items():
    try:
      fns[name] = chained_cold(step)
      if refs and name.startswith("par"):
        row["rel_err"][name] = common.rel_err(jax.jit(step)(*args[:6])[0], refs["parallax"])
    except Exception as e:  # noqa: BLE001  (a launch that does not compile: recorded)
      row["errors"][name] = repr(e)[:300]
  for _ in range(reps):  # interleaved repetitions
    for name, fn in list(fns.items()):
      try:
        us, row["kernels"][name] = time_cold_us(fn, args)
      except Exception as e:  # noqa: BLE001
        row["errors"][name] = repr(e)[:300]
        fns.pop(name)
        continue
      row["us"].setdefault(name, []).append(us)
  c = min(row["us"]["cudnn"])
  for name, ts in row["us"].items():
    log(grid, B, L, f"{name:60s} {min(ts):9.2f} us x{min(ts) / c:.4f}")
  return row


def launch_sweep_md(res, path):
  lines = [f"# Decode launch sweep, L2 evicted between steps ({res['env'].get('device')}, "
           f"{res['env'].get('date')})", "", f"Command: `{res['env']['command']}`", "",
           f"us per step (CUPTI, min over {res['reps']} interleaved repetitions); x = ratio to "
           "cuDNN softmax decode; `softmax`: the kernel's default softmax launch; `par {...}`: "
           "Parallax with those `parallax_decode` keywords ({}: its defaults when run).", "",
           "| grid | B | L | entry | us | x cuDNN |", "|---|---:|---:|---|---:|---:|"]
  for row in res["rows"]:
    c = min(row["us"]["cudnn"])
    for name, ts in row["us"].items():
      lines.append(f"| {row['grid']} | {row['B']} | {row['L']} | `{name}` | {min(ts):.2f} | "
                   f"{min(ts) / c:.4f} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- split-sweep

SPLIT_SHAPES = [  # (grid, B, L, Hq, Hkv, D)
    ("gqa", 1, 1024, 16, 8, 128), ("gqa", 1, 8192, 16, 8, 128), ("gqa", 1, 32768, 16, 8, 128),
    ("gqa", 8, 4096, 16, 8, 128), ("gqa", 32, 4096, 16, 8, 128), ("gqa", 64, 4096, 16, 8, 128),
    ("gqa", 64, 8192, 16, 8, 128), ("gqa", 32, 32768, 16, 8, 128), ("gqa", 128, 4096, 16, 8, 128),
    ("mha", 8, 4096, 8, 8, 64), ("mha", 256, 1024, 8, 8, 64), ("mha", 256, 4096, 8, 8, 64),
    ("mha", 64, 4096, 8, 8, 64),
]
SPLIT_SMALL = [  # B * Hkv < 132 programs: the split regime (in-kernel merge)
    ("gqa", 1, 1024, 16, 8, 128), ("gqa", 1, 4096, 16, 8, 128), ("gqa", 1, 8192, 16, 8, 128),
    ("gqa", 1, 32768, 16, 8, 128), ("gqa", 8, 1024, 16, 8, 128), ("gqa", 8, 4096, 16, 8, 128),
    ("gqa", 8, 32768, 16, 8, 128), ("mha", 1, 1024, 8, 8, 64), ("mha", 1, 4096, 8, 8, 64),
    ("mha", 1, 32768, 8, 8, 64), ("mha", 8, 1024, 8, 8, 64), ("mha", 8, 4096, 8, 8, 64),
]
SPLIT_SMALL_LAUNCH = [(64, 3, 4), (32, 3, 4), (64, 3, 2), (32, 2, 2)]  # (block_kv, stages, warps)
SPLIT_MID = [  # B * Hkv around one wave of SMs: split or not
    ("gqa", 8, 1024, 16, 8, 128), ("gqa", 16, 1024, 16, 8, 128), ("gqa", 32, 1024, 16, 8, 128),
    ("gqa", 32, 4096, 16, 8, 128), ("mha", 8, 8192, 8, 8, 64), ("mha", 256, 1024, 8, 8, 64),
]
SPLIT_MID_LAUNCH = [(64, st, nw) for nw in (2, 4, 8) for st in (2, 3, 4) if nw != 8 or st == 3]
SPLIT_LAUNCH = [(64, 2, 4), (64, 3, 4), (64, 4, 4), (128, 2, 4), (128, 3, 8), (32, 2, 4),
                (32, 4, 4), (128, 3, 4), (128, 4, 4), (256, 2, 4), (256, 3, 8)]


def split_sweep(a):
  """Each shape: the default Parallax and softmax launches (one call, its own counter, L2
  warm), a per-kernel CUPTI breakdown of the Parallax one, then split counts around the
  default x (block_kv, stages, warps)."""
  res = {"env": common.environment(), "rows": []}
  shapes, launch = {"small": (SPLIT_SMALL, SPLIT_SMALL_LAUNCH),
                    "mid": (SPLIT_MID, SPLIT_MID_LAUNCH)}.get(a.grid, (SPLIT_SHAPES, SPLIT_LAUNCH))
  for grid, B, L, Hq, Hkv, D in shapes:
    if a.grid not in ("all", "small", "mid", grid):
      continue
    ks = jax.random.split(jax.random.key(B + L), 4)
    q = jax.random.normal(ks[0], (B, Hq, D), jnp.bfloat16)
    r = (0.5 * jax.random.normal(ks[1], (B, Hq, D))).astype(jnp.bfloat16)
    k = jax.random.normal(ks[2], (B, L, Hkv, D), jnp.bfloat16)
    v = jax.random.normal(ks[3], (B, L, Hkv, D), jnp.bfloat16)
    lens = jnp.full((B,), L, jnp.int32)
    scale = 1 / np.sqrt(D)
    kv_gb = 2 * B * L * Hkv * D * 2 / 1e9
    s0 = pallas_kernels.default_num_splits(B, Hkv, L)
    row = {"grid": grid, "B": B, "L": L, "Hq": Hq, "Hkv": Hkv, "D": D, "default_splits": s0,
           "configs": []}
    for has_r in (True, False):
      rr = r if has_r else None
      f0 = jax.jit(lambda q, k, v, rr, lens: pallas_kernels.parallax_decode(
          q, k, v, rr, scale=scale, lengths=lens))
      row[f"default_us_{'parallax' if has_r else 'softmax'}"] = time_us(
          f0, (q, k, v, rr, lens), iters=20)[0]
      if has_r:
        row["breakdown_us"] = {n: round(t, 2) for n, t in common.kernel_medians_us(
            f0, (q, k, v, rr, lens), iters=5).items()}
    mults = {"small": (s0 // 2, s0, 2 * s0, L // 64, L // 32), "mid": (1, 2, 4, 8)}.get(
        a.grid, (s0, 2 * s0, 4 * s0, 8 * s0, 16 * s0))
    splits = sorted({max(1, min(s, L // 32)) for s in mults})
    for ns, (bk, st, nw) in itertools.product(splits, launch):
      if time.time() - common.T0 > a.budget or L // ns < bk:
        continue
      f = jax.jit(lambda q, k, v, r, lens: pallas_kernels.parallax_decode(
          q, k, v, r, scale=scale, lengths=lens, num_splits=ns, block_kv=bk, num_stages=st,
          num_warps=nw))
      cfg = {"splits": ns, "block_kv": bk, "stages": st, "warps": nw}
      try:
        us = time_us(f, (q, k, v, r, lens), iters=20)[0]
        row["configs"].append({**cfg, "us": us, "GBps": kv_gb / (us * 1e-6)})
      except Exception as e:  # noqa: BLE001
        row["configs"].append({**cfg, "error": repr(e)[:200]})
    ok = [c for c in row["configs"] if "us" in c]
    if ok:
      row["best"] = min(ok, key=lambda c: c["us"])
    log(f"{grid} B={B} L={L} default parallax {row['default_us_parallax']:.1f} softmax "
        f"{row['default_us_softmax']:.1f} best {row.get('best')} breakdown {row['breakdown_us']}")
    res["rows"].append(row)
    with open(os.path.join(a.out, f"{a.name}.json"), "w") as fh:
      json.dump(res, fh, indent=1)
    del q, k, v, r


# ----------------------------------------------------------------------------- multitoken

MT_BS, MT_LS, MT_TOKENS = (1, 8, 64), (4096, 32768), (1, 2, 4, 8)


def multitoken(a):
  """The cache read is the same for every T (all T*G rows of a KV head share its tiles), so
  the prediction is ~T=1's time while T*G <= 16 rows fit the padded MMA tile (GQA 16/8:
  T <= 8). CUPTI kernel time (median) of one call, including the transposes of q, r, o that
  T > 1 adds."""
  Hq, Hkv, D = GRIDS["gqa"]
  res = {"env": common.environment(), "Hq": Hq, "Hkv": Hkv, "D": D, "rows": []}
  for L in MT_LS:
    for B in MT_BS:
      ks = jax.random.split(jax.random.key(B + L), 4)
      k = jax.random.normal(ks[2], (B, L, Hkv, D), jnp.bfloat16)
      v = jax.random.normal(ks[3], (B, L, Hkv, D), jnp.bfloat16)
      lens = jnp.full((B,), L, jnp.int32)
      row = {"B": B, "L": L, "us": {}}
      for T in MT_TOKENS:
        shape = (B, Hq, D) if T == 1 else (B, T, Hq, D)
        q = jax.random.normal(ks[0], shape, jnp.bfloat16)
        r = (0.5 * jax.random.normal(ks[1], shape)).astype(jnp.bfloat16)
        f = jax.jit(lambda q, k, v, r, l: pallas_kernels.parallax_decode(
            q, k, v, r, scale=D ** -0.5, lengths=l))
        row["us"][T], _ = time_us(f, (q, k, v, r, lens))
      print(row, flush=True)
      res["rows"].append(row)
  with open(os.path.join(a.out, "decode_multitoken.json"), "w") as fh:
    json.dump(res, fh, indent=1)
  lines = [f"# Multi-token Parallax decode, {res['env']['device']}, jax {res['env']['jax']}, "
           f"{res['env']['date']}", "", f"Command: `{res['env']['command']}`", "",
           f"bf16, Hq={Hq}, Hkv={Hkv}, D={D}, all L slots valid; CUPTI us (x T=1 time).", "",
           "| B | L | " + " | ".join(f"T={t}" for t in MT_TOKENS) + " |",
           "|---|---|" + "---|" * len(MT_TOKENS)]
  for row in res["rows"]:
    base = row["us"][MT_TOKENS[0]]
    lines.append(f"| {row['B']} | {row['L']} | " + " | ".join(
        f"{row['us'][t]:.1f} (x{row['us'][t] / base:.2f})" for t in MT_TOKENS) + " |")
  with open(os.path.join(a.out, "decode_multitoken.md"), "w") as fh:
    fh.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- mgpu-ab


def mgpu_variants(dm, B, Hkv, L):
  """name -> DecodeConfig of the Mosaic GPU kernel at this shape. `2wg`: two consumer
  warpgroups on alternate tiles; `halfsplits`: half the default split count (longer
  programs, half the partials to merge); `cluster`: the splits (at most 8) merged in the
  kernel through distributed shared memory instead of by XLA; `cluster16`: up to 16 in one
  cluster (the non-portable size: the launch may be refused, recorded as an error); `mk`:
  the splits merged by one Pallas (Triton) launch that writes o's rows."""
  base = dm.DecodeConfig()
  two = dataclasses.replace(base, num_stages=4, num_consumers=2)
  out = {"mgpu_pack": base, "mgpu_nopack": dataclasses.replace(base, pack_qr=False),
         "mgpu_pack_2stages": dataclasses.replace(base, num_stages=2),
         "mgpu_pack_4stages": dataclasses.replace(base, num_stages=4),
         "mgpu_pack_2wg": two}
  splits = dm.default_splits(B, Hkv, L, base.block_kv)
  if splits > 1:   # (one split: the same launch as mgpu_pack_2wg)
    out["mgpu_pack_2wg_halfsplits"] = dataclasses.replace(two, num_splits=splits // 2)
    out["mgpu_pack_cluster"] = dataclasses.replace(base, cluster_merge=True)
    out["mgpu_pack_2wg_cluster"] = dataclasses.replace(two, cluster_merge=True)
    out["mgpu_pack_mk"] = dataclasses.replace(base, merge_kernel=True)
    out["mgpu_pack_2wg_mk"] = dataclasses.replace(two, merge_kernel=True)
    for cols in (16, 8):  # more merge programs, fewer bytes each
      out[f"mgpu_pack_mk{cols}"] = dataclasses.replace(base, merge_kernel=True,
                                                       merge_columns=cols)
  if splits > 8:   # the default's split count in one cluster: past the portable 8 CTAs
    out["mgpu_pack_cluster16"] = dataclasses.replace(base, cluster_merge=True,
                                                     num_splits=min(splits, 16))
  return out


def mgpu_ab(a):
  """For the Mosaic variants the JSON also splits one step's CUPTI time by kernel (the decode
  kernel, the XLA merge of the split partials, the row gather), so the per-tile loop can be
  compared apart from the merge, which this kernel leaves to XLA unless its splits merge in
  a cluster (the `cluster` variants)."""
  from pallas_kernels import decode_mgpu as dm
  ok, why = dm.supported(jax.ShapeDtypeStruct((1, 16, 128), jnp.bfloat16),
                         jax.ShapeDtypeStruct((1, 64, 8, 128), jnp.bfloat16),
                         jax.ShapeDtypeStruct((1, 64, 8, 128), jnp.bfloat16))
  if not ok:
    raise SystemExit(f"the Mosaic GPU decode kernel cannot run here: {why}")
  res = {"env": common.environment(), "rows": []}
  for shape in shapes_within(a.shapes, a.budget):
    res["rows"].append(mgpu_shape(dm, *shape, only=a.variants))
    save(a.out, "decode_mgpu_ab", res, mgpu_md)


def mgpu_shape(dm, grid, B, L, Hq, Hkv, D, only=None):
  scale = 1.0 / np.sqrt(D)
  (q, k, v, r, lens), refs = shape_inputs(B, L, Hq, Hkv, D)
  kv_bytes = 2 * B * L * Hkv * D * 2
  ns = dm.default_splits(B, Hkv, L, dm.DecodeConfig().block_kv)
  row = {"grid": grid, "B": B, "L": L, "Hq": Hq, "Hkv": Hkv, "D": D, "kv_GB": kv_bytes / 1e9,
         "mgpu_num_splits": split_chunk(L, ns, dm.DecodeConfig().block_kv)[1]}
  args = step_args(q, k, v, r, lens, B, Hkv)
  cfgs = {n: c for n, c in mgpu_variants(dm, B, Hkv, L).items() if not only or n in only}
  steps = {"triton_parallax": pallas_step(scale), "cudnn_softmax": sdpa_step(scale)}
  for name, cfg in cfgs.items():
    def mg(q, k, v, r, lens, ex, cfg=cfg):
      return dm.parallax_decode_mgpu(q, k, v, r, scale=scale, lengths=lens, config=cfg), ex
    steps[name] = mg

  def mg_softmax(q, k, v, r, lens, ex, cfg=None):
    return dm.parallax_decode_mgpu(q, k, v, None, scale=scale, lengths=lens, config=cfg), ex
  if not only or "mgpu_softmax" in only:
    steps["mgpu_softmax"] = mg_softmax
  if ns > 1 and (not only or "mgpu_softmax_mk" in only):
    steps["mgpu_softmax_mk"] = functools.partial(mg_softmax,
                                                 cfg=dm.DecodeConfig(merge_kernel=True))
  for name, step in steps.items():
    try:
      us, how = time_step(step, args)
      ent = {"us": us, "GBps": kv_bytes / (us * 1e-6) / 1e9, "timer": how}
      if name in cfgs:
        ent["config"] = dataclasses.asdict(cfgs[name])
      if name.startswith("mgpu"):
        ent["kernels_us"] = common.kernel_medians_us(jax.jit(lambda *a, s=step: s(*a)[0]), args)
      ref = refs.get("softmax" if "softmax" in name else "parallax")
      if ref is not None:
        ent["rel_err"] = common.rel_err(jax.jit(step)(*args)[0], ref)
    except Exception as e:  # noqa: BLE001  (a launch this GPU refuses: recorded, not fatal)
      ent = {"error": repr(e)[:400]}
    row[name] = ent
    log_entry(grid, B, L, name, ent, digits=3)
  add_vs_cudnn(row)
  return row


def mgpu_md(res, path):
  names = list(dict.fromkeys(n for row in res["rows"] for n in row
                              if isinstance(row[n], dict)))
  lines = [f"# Decode A/B: Triton vs Mosaic GPU kernels ({res['env'].get('device')}, "
           f"{res['env'].get('date')})", "",
           "us per step (CUPTI, chained steps); x = ratio to cuDNN softmax decode.", "",
           "| grid | B | L | splits (mgpu) | " + " | ".join(names) + " |",
           "|---|---:|---:|---:|" + "---:|" * len(names)]
  for row in res["rows"]:
    cells = []
    for n in names:
      e = row.get(n, {})
      cells.append(f"{e['us']:.1f} (x{e.get('vs_cudnn', float('nan')):.2f})" if "us" in e
                   else "error" if "error" in e else "-")
    lines.append(f"| {row['grid']} | {row['B']} | {row['L']} | {row['mgpu_num_splits']} | "
                 + " | ".join(cells) + " |")
  lines += ["", f"env: {json.dumps(res['env'])}"]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- command line

AB_SHAPES = ("gqa:1:1024,gqa:1:8192,mha:1:8192,gqa:8:1024,mha:8:1024,gqa:1:4096,gqa:1:32768,"
             "mha:1:32768,mha:8:8192,mha:1:1024,mha:1:4096,gqa:8:4096,mha:8:4096,gqa:8:8192,"
             "gqa:8:32768,mha:8:32768")  # the split shapes of the grid (B*Hkv below one wave)
MGPU_SHAPES = ("gqa:1:8192,gqa:1:1024,gqa:8:1024,gqa:8:8192,gqa:32:4096,gqa:256:1024,"
               "gqa:256:8192,mha:1:8192,mha:8:1024,mha:8:8192,mha:256:1024,mha:256:4096,"
               "gqa:1:32768,gqa:64:32768")
COLD_HELP = "evict the L2 between steps (a 256 MB read, not timed), as in a model"


def parser():
  ap, modes = common.mode_parser(__doc__)

  def mode(name, fn, help, budget=300.0):
    p = common.add_mode(modes, name, fn, help)
    p.add_argument("--out", default="bench/results", help="directory of the result files")
    if budget is not None:
      p.add_argument("--budget", type=float, default=budget,
                     help="seconds; later shapes are skipped")
    return p

  p = mode("grid", grid, "the decode grid: GQA Hq=16 Hkv=8 D=128 B 1-256 and MHA Hq=Hkv=8 "
           "D=64 B 1-256, L 1k-32k; every implementation (decode_grid_warm / _cold)")
  p.add_argument("--cold", action="store_true", help=COLD_HELP)
  p.add_argument("--grids", default="gqa,mha",
                 help=f"comma list of grids ({', '.join(GRIDS)}); gGdD: GQA ratio G at head "
                 "dim D, B 1, 8, 64, 256; other than gqa,mha the results go to "
                 "decode_grid_ratios_warm / _cold")
  p.add_argument("--resume", action="store_true",
                 help="keep the rows of the grid file in --out (else bench/results) and time "
                 "only the shapes it lacks; kept rows name the run they came from")
  p = mode("ab", ab, "the Triton kernel of the working tree vs a baseline source file of "
           "pallas_kernels/decode_triton.py, cuDNN as the common bar (decode_ab); default shapes: the "
           "split ones of the grid, where the in-kernel merge of the splits is on the "
           "critical path")
  p.add_argument("--baseline", required=True, help="a source file of pallas_kernels/decode_triton.py")
  p.add_argument("--name", default="decode_ab", help="file name stem of the results")
  p.add_argument("--shapes", default=AB_SHAPES, help=SHAPES_HELP)
  p.add_argument("--cold", action="store_true", help=COLD_HELP)
  p = mode("launch-sweep", launch_sweep, "explicit parallax_decode keyword sets (block_kv, "
           "num_splits, num_warps, num_stages, kv_heads_per_program) against cuDNN and the "
           "kernel's default softmax launch, L2 evicted between steps, --reps interleaved "
           "repetitions, the minimum reported (decode_launch_sweep); `--variants '[{}]'` "
           "times the default launches")
  p.add_argument("--name", default="decode_launch_sweep", help="file name stem of the results")
  p.add_argument("--shapes", required=True, help=SHAPES_HELP)
  p.add_argument("--variants", default="[{}]",
                 help="JSON list of parallax_decode keyword dicts, timed at every shape")
  p.add_argument("--reps", type=int, default=2, help="interleaved repetitions per shape")
  p = mode("split-sweep", split_sweep, "split counts x (block_kv, stages, warps) around the "
           "default launch, one call with L2 warm, plus a per-kernel breakdown at the defaults "
           "(decode_sweep)", budget=240.0)
  p.add_argument("--grid", choices=("all", "gqa", "mha", "small", "mid"), default="all",
                 help="only the shapes of this grid (small: the split regime, B*Hkv < 132, "
                 "with 1-2 tile splits and 2-warp launches; mid: B*Hkv near one wave, "
                 "1-8 splits x warps x stages)")
  p.add_argument("--name", default="decode_sweep", help="file name stem of the results")
  p = mode("multitoken", multitoken, "T = 1, 2, 4, 8 new tokens per sequence (e.g. "
           "speculative decoding) against T=1 on the same cache, GQA B 1, 8, 64, L 4k, 32k "
           "(decode_multitoken)", budget=None)
  p = mode("mgpu-ab", mgpu_ab, "the Mosaic GPU decode kernel (packed and unpacked Q/R tiles, "
           "ring depths, one or two consumer warpgroups, split counts) vs the Triton kernel, "
           "cuDNN as the common bar (decode_mgpu_ab)", budget=400.0)
  p.add_argument("--shapes", default=MGPU_SHAPES, help=SHAPES_HELP)
  p.add_argument("--variants", type=lambda x: frozenset(x.split(",")), default=None,
                 help="comma-separated Mosaic variants to time (mgpu_pack, mgpu_pack_2wg, "
                      "mgpu_pack_cluster, mgpu_pack_mk, mgpu_softmax, mgpu_softmax_mk, ...; "
                      "default: all); Triton and cuDNN "
                      "always run")
  return ap


def main(argv=None):
  a = parser().parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  a.run(a)


if __name__ == "__main__":
  sys.exit(main())
