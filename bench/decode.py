"""Decode-attention benchmark: Pallas split-KV Parallax decode vs cuDNN / XLA softmax decode,
the XLA Parallax path and torch's FlashAttention-2 (SDPA flash backend, on the same cache
through DLPack), one new token per sequence, KV cache [B, L, Hkv, D] (all L slots valid).

Grids: GQA Hq=16 Hkv=8 D=128 over --Bs x --Ls, and MHA Hq=Hkv=8 D=64 over --mha-Bs x --Ls.
Timing: CUPTI kernel time (`jax.experimental.mosaic.gpu.profiler.measure`, median over
iterations) of everything a decode step launches, for every JAX implementation alike as
STEPS chained steps (each step's output is the next one's query) / STEPS. What a decode loop
holds across steps is an input: cuDNN's query lengths (ones) and the Pallas kernel's arrival
counter, handed from step to step as the model's `KVCache.arrivals`; `us_fresh_counter`
(JSON) is one Pallas call that zeroes its own counter instead. torch is timed with CUDA
events around each call (launch included), so it is an anchor, not a like-for-like kernel
time. GB/s counts the K and V bytes of the valid cache; the HBM rate it is compared with is a
measured device copy (read + write bytes / time). Caches under the 50 MB L2 stay L2-resident
across iterations (for every implementation alike): GB/s above the HBM rate are L2 reads;
caches of 50-200 MB stay partly resident, by an amount that depends on each kernel's order of
reading. `--cold` evicts the L2 between steps instead (a 256 MB read, not timed): every step
reads its cache from HBM, as in a model, where the other layers run between two steps of one.
Error: max |o - ref| / max |ref| against a float32 dense reference (B*L <= 256k only). The
XLA paths run only where B*L <= 256k (they are 3-5x slower and only baselines).

  PYTHONPATH=. python3 bench/decode.py --out DIR [--budget 300] [--cold]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

warnings.filterwarnings("ignore", category=DeprecationWarning)

from jax.experimental import pallas as pl  # noqa: E402

from bench.common import environment  # noqa: E402
from pallas_kernels import decode_triton as dk  # noqa: E402
from pallas_kernels.common import split_chunk  # noqa: E402

T0 = time.time()


def log(*a):
  print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def time_us(fn, args, iters=30):
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  try:
    from jax.experimental.mosaic.gpu import profiler
    _, ts = profiler.measure(fn, aggregate=True, iterations=iters)(*args)
    return statistics.median(float(t) for t in ts) * 1e3, "cupti"
  except Exception as e:  # noqa: BLE001
    log("cupti failed:", repr(e)[:200])
  ts = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts) * 1e6, "wall"


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


def hbm_copy_gbps():
  """Measured HBM rate: a 4 GiB bf16 copy (x + 1), read + write bytes over CUPTI time."""
  x = jnp.zeros((2**31,), jnp.bfloat16)
  us, _ = time_us(jax.jit(lambda a: a + 1), (x,), iters=10)
  return 2 * x.nbytes / (us * 1e-6) / 1e9


STEPS = 8  # dependent decode calls per timed call (see `chained`)
GRIDS = {"gqa": (16, 8, 128), "mha": (8, 8, 64)}  # grid -> (Hq, Hkv, D)
SHAPES_HELP = "comma list of grid:B:L (gqa: Hq=16 Hkv=8 D=128; mha: 8/8 D=64)"


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


def pallas_step(scale, parallax=True, module=dk, **launch):
  """One decode step of the Triton kernel (`module`: pallas_kernels.decode_triton, or a source
  of it: bench/decode_ab.py) with `parallax_decode` keywords `launch`; ex["arr"] None: the call
  zeroes its own counter."""
  def step(q, k, v, r, lens, ex):
    o = module.parallax_decode(q, k, v, r if parallax else None, scale=scale, lengths=lens,
                               arrivals=ex["arr"], **launch)
    return (o, ex) if ex["arr"] is None else (o[0], {**ex, "arr": o[1]})
  return step


def impls(B, L, Hq, Hkv, D, with_xla=True):
  """name -> one decode step step(q, k, v, r, lens, ex) -> (o, ex). ex = {"ql": query
  lengths (ones), "arr": the zeroed arrival counter}: what a decode loop holds across steps
  (the Pallas kernel hands the counter on, as `KVCache.arrivals` does), not made per call."""
  import parallax_jax
  scale = 1.0 / np.sqrt(D)
  out = {}

  out["pallas_parallax"] = pallas_step(scale)
  out["pallas_softmax"] = pallas_step(scale, parallax=False)

  def sdpa(impl):
    def step(q, k, v, r, lens, ex):
      return jax.nn.dot_product_attention(
          q[:, None], k, v, scale=scale, implementation=impl,
          query_seq_lengths=ex["ql"], key_value_seq_lengths=lens)[:, 0], ex
    return step
  out["cudnn_softmax"] = sdpa("cudnn")
  if not with_xla:
    return out
  out["xla_softmax"] = sdpa("xla")

  def xla_parallax(q, k, v, r, lens, ex):
    kv_ids = jnp.where(jnp.arange(L)[None] < lens[:, None], 0, -1)
    q_ids = jnp.zeros((B, 1), jnp.int32)
    return parallax_jax.attention(q[:, None], k, v, r[:, None], probe="learned",
                                  affine="affine", causal=True, segment_ids=(q_ids, kv_ids),
                                  implementation="xla")[:, 0], ex
  out["xla_parallax"] = xla_parallax
  return out


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
  from jax.experimental.mosaic.gpu import profiler
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  _, per_iter = profiler.measure(fn, aggregate=False, iterations=iters)(*args)
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


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="bench/results",
                  help="directory for decode_grid_warm.json / .md (--cold: decode_grid_cold.*)")
  ap.add_argument("--budget", type=float, default=300.0, help="seconds; later shapes are skipped")
  ap.add_argument("--Bs", default="1,8,32,64,128,256", help="batch sizes of the GQA grid")
  ap.add_argument("--Ls", default="1024,4096,8192,32768", help="cache lengths")
  ap.add_argument("--mha-Bs", default="1,8,64,256", help="batch sizes of the MHA D=64 grid")
  ap.add_argument("--no-torch", action="store_true", help="skip the torch FA2 anchor")
  ap.add_argument("--cold", action="store_true",
                  help="evict the L2 between steps (a 256 MB read, not timed), as in a model")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  res = {"env": environment(), "cold": args.cold, "rows": []}
  flush_buf = flush_buffer() if args.cold else None
  try:
    res["hbm_copy_GBps"] = hbm_copy_gbps()
    log("HBM copy GB/s", round(res["hbm_copy_GBps"]))
  except Exception as e:  # noqa: BLE001
    log("hbm copy failed", repr(e)[:200])
  grids = [("gqa", 16, 8, 128, args.Bs), ("mha", 8, 8, 64, args.mha_Bs)]
  for grid, Hq, Hkv, D, Bs in grids:
    for L in map(int, args.Ls.split(",")):
      for B in map(int, Bs.split(",")):
        if B * L > 4 * 2**20:
          log(f"skip B={B} L={L}: KV {2 * B * L * Hkv * D * 2 / 1e9:.0f} GB")
          continue
        if time.time() - T0 > args.budget:
          log(f"budget spent; skip {grid} B={B} L={L}")
          continue
        res["rows"].append(bench_shape(grid, B, L, Hq, Hkv, D, not args.no_torch, flush_buf))
        stem = os.path.join(args.out, "decode_grid_cold" if args.cold else "decode_grid_warm")
        with open(stem + ".json", "w") as f:
          json.dump(res, f, indent=1)
        write_md(res, stem + ".md")


def launched(B, Hkv, L, D, rows):
  """(block_kv, splits, KV heads per program) the Parallax kernel launches by default (splits
  after the kernel rounds its chunk of the cache up to whole tiles)."""
  pack = dk.default_pack(B, Hkv, L, D, rows=rows)
  bk, ns = dk.default_launch(B, Hkv, L, D, rows=rows, pack=pack)
  return bk, split_chunk(L, ns, bk)[1], pack


def shape_inputs(B, L, Hq, Hkv, D):
  """The bf16 inputs of one grid shape (seeded by the shape: every script times the same
  cache), all L slots valid: (q, k, v, r, lens), and the float32 references {"parallax",
  "softmax"} where B*L <= 256k (else {})."""
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
    refs = {name: np.asarray(dk.reference_decode(q, k, v, rr, scale=scale, lengths=lens))
            for name, rr in (("parallax", r), ("softmax", None))}
  return (q, k, v, r, lens), refs


def bench_shape(grid, B, L, Hq, Hkv, D, with_torch, flush_buf=None):
  scale = 1.0 / np.sqrt(D)
  (q, k, v, r, lens), refs = shape_inputs(B, L, Hq, Hkv, D)
  kv_bytes = 2 * B * L * Hkv * D * 2
  small = bool(refs)
  row = {"grid": grid, "B": B, "L": L, "Hq": Hq, "Hkv": Hkv, "D": D,
         "block_kv, num_splits, kv_heads_per_program": launched(B, Hkv, L, D, Hq // Hkv),
         "num_splits": dk.default_num_splits(B, Hkv, L, rows=Hq // Hkv),
         "kv_GB": kv_bytes / 1e9}

  def record(name, us, how, o=None):
    ent = {"us": us, "GBps": kv_bytes / (us * 1e-6) / 1e9, "timer": how}
    ref = refs.get("parallax" if "parallax" in name else "softmax")
    if ref is not None and o is not None:
      ent["rel_err"] = float(np.max(np.abs(np.asarray(o, np.float32) - ref)) /
                             np.max(np.abs(ref)))
    row[name] = ent
    log(grid, B, L, name, {a: (round(b, 4) if isinstance(b, float) else b)
                           for a, b in ent.items()})

  args = (q, k, v, r, lens, {"ql": jnp.ones((B,), jnp.int32), "arr": dk.init_arrivals(B, Hkv)})
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
  if with_torch:
    try:
      us, o = torch_fa2(B, L, Hq, Hkv, D, scale, cold=flush_buf is not None)(q, k, v)
      record("torch_fa2_softmax", us, "cuda_events" + (", L2 flushed" if flush_buf is not None
                                                       else ""), o)
    except Exception as e:  # noqa: BLE001
      row["torch_fa2_softmax"] = {"error": repr(e)[:300]}
      log(grid, B, L, "torch", row["torch_fa2_softmax"])
  c = row.get("cudnn_softmax", {}).get("us")
  for name in list(row):
    if isinstance(row[name], dict) and "us" in row[name] and c:
      row[name]["vs_cudnn"] = row[name]["us"] / c
  return row


def write_md(res, path):
  names = ["pallas_parallax", "pallas_softmax", "cudnn_softmax", "torch_fa2_softmax",
           "xla_softmax", "xla_parallax"]
  hbm = res.get("hbm_copy_GBps")
  lines = [f"# Decode attention, {res['env']['device']}, jax {res['env']['jax']}, "
           f"{res['env']['date']}", "",
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
  for grid, title in (("gqa", "GQA: Hq=16, Hkv=8, D=128"), ("mha", "MHA: Hq=Hkv=8, D=64")):
    rows = [r for r in res["rows"] if r.get("grid", "gqa") == grid]
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
      bk, ns, pack = row.get("block_kv, num_splits, kv_heads_per_program",
                             (*row.get("block_kv, num_splits", (64, row["num_splits"])), 1))
      lines.append(f"| {row['B']} | {row['L']} | {ns}" + (f" x {bk}" if bk != 64 else "")
                   + (f", {pack} KV heads" if pack > 1 else "") + " | " + " | ".join(cells)
                   + " |")
    lines.append("")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
