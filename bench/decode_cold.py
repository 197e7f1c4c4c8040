"""Decode attention with a cold L2: each step's KV cache read from HBM, as in a model.

bench/decode.py chains the same call on one cache, so a cache near the L2's 50 MB stays
partly resident from one step to the next, and how much of it does depends on each kernel's
order of reading (which tiles it reads last). In a model the layers between two steps of a
layer evict its cache. Here a 256 MB read (a Pallas kernel named `l2_flush`) runs between
chained steps, and the timer counts the attention kernels only (CUPTI per-kernel times,
without the flush or the chain's cast / broadcast fusions `loop_*`; cuDNN's reduction kernel
counts). Same inputs and arrival-counter handling as bench/decode.py.

  PYTHONPATH=. python3 bench/decode_cold.py --out bench/results [--shapes mha:8:8192,...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from bench.common import environment
from bench.decode import SHAPES_HELP, STEPS, log, shape_inputs, shapes_within
from pallas_kernels import decode as dk

FLUSH_BLOCKS, FLUSH_ROWS = 16384, 64  # [64, 128] bf16 blocks: 256 MB, 5x the L2
DEFAULT_SHAPES = ("mha:8:8192,mha:8:1024,mha:1:8192,gqa:8:1024,gqa:8:4096,mha:256:1024,"
                  "mha:8:4096,mha:8:32768,gqa:32:1024,gqa:32:4096,gqa:32:8192,mha:64:1024,"
                  "gqa:1:1024,mha:1:1024,gqa:256:4096,gqa:32:32768")


def _flush_kernel(x_ref, dep_ref, o_ref):
  del dep_ref  # only orders the flush after the step that produced it
  o_ref[...] = jnp.sum(x_ref[...].astype(jnp.float32), axis=0, keepdims=True)


def l2_flush(buf, dep):
  """Reads all of buf (column sums per block); dep: a [1, 128] value of the previous step."""
  return pl.pallas_call(
      _flush_kernel, grid=(FLUSH_BLOCKS,),
      in_specs=[pl.BlockSpec((FLUSH_ROWS, 128), lambda i: (i, 0)),
                pl.BlockSpec((1, 128), lambda i: (0, 0))],
      out_specs=pl.BlockSpec((1, 128), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((FLUSH_BLOCKS, 128), jnp.float32), name="l2_flush",
  )(buf, dep)


def flush_buffer():
  return jnp.ones((FLUSH_BLOCKS * FLUSH_ROWS, 128), jnp.bfloat16)


def chained_cold(step):
  """STEPS steps as bench/decode.py's `chained`, each followed by the flush; the next step's
  query depends on the flush's output, so the three run in that order."""
  def f(q, k, v, r, lens, ex, buf):
    for _ in range(STEPS):
      o, ex = step(q, k, v, r, lens, ex)
      fl = l2_flush(buf, jnp.broadcast_to(o.reshape(-1)[:1].astype(jnp.float32), (1, 128)))
      q = (o.astype(jnp.float32) + fl[0, 0] * 0.0).astype(k.dtype)
    return q, ex
  return jax.jit(f)


def attention_us(fn, args, iters=20):
  """Median over iters of the attention kernels' CUPTI time per step, and their names."""
  from jax.experimental.mosaic.gpu import profiler
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  _, per_iter = profiler.measure(fn, aggregate=False, iterations=iters)(*args)
  keep = lambda name: "l2_flush" not in name and not name.startswith("loop_")
  totals = [sum(t for name, t in it if keep(name)) for it in per_iter]
  names = sorted({name[:64] for name, _ in per_iter[0] if keep(name)})
  return statistics.median(totals) * 1e3 / STEPS, names


def steps_of(B, Hkv, scale):
  def cudnn(q, k, v, r, lens, ex):
    return jax.nn.dot_product_attention(
        q[:, None], k, v, scale=scale, implementation="cudnn", query_seq_lengths=ex["ql"],
        key_value_seq_lengths=lens)[:, 0], ex

  def pallas(parallax):
    def step(q, k, v, r, lens, ex):
      o, arr = dk.parallax_decode(q, k, v, r if parallax else None, scale=scale,
                                  lengths=lens, arrivals=ex["arr"])
      return o, {**ex, "arr": arr}
    return step
  return {"cudnn_softmax": cudnn, "pallas_parallax": pallas(True),
          "pallas_softmax": pallas(False)}


def bench_shape(grid, B, L, Hq, Hkv, D, buf, reps):
  (q, k, v, r, lens), _ = shape_inputs(B, L, Hq, Hkv, D)
  ex = {"ql": jnp.ones((B,), jnp.int32), "arr": dk.init_arrivals(B, Hkv)}
  args = (q, k, v, r, lens, ex, buf)
  row = {"grid": grid, "B": B, "L": L, "Hq": Hq, "Hkv": Hkv, "D": D, "us": {}, "kernels": {}}
  fns = {name: chained_cold(step) for name, step in steps_of(B, Hkv, 1.0 / np.sqrt(D)).items()}
  for _ in range(reps):  # interleaved repetitions
    for name, fn in fns.items():
      us, names = attention_us(fn, args)
      row["us"].setdefault(name, []).append(us)
      row["kernels"][name] = names
  log(grid, B, L, {n: [round(t, 2) for t in ts] for n, ts in row["us"].items()})
  return row


def write_md(res, path):
  env = res["env"]
  lines = [f"# Decode attention with a cold L2, {env.get('device')}, jax {env.get('jax')}, "
           f"{env.get('date')}", "",
           "bf16, one token per sequence, all L slots valid; a 256 MB read between chained "
           "steps evicts the L2; us = attention kernels' CUPTI time per step (median of 20, "
           f"min over {res['reps']} interleaved repetitions); xC = time / cuDNN time. "
           "Produced by bench/decode_cold.py.", "",
           "| grid | B | L | cudnn_softmax | pallas_parallax | pallas_softmax |",
           "|---|---|---|---|---|---|"]
  for row in res["rows"]:
    best = {n: min(ts) for n, ts in row["us"].items()}
    c = best["cudnn_softmax"]
    cell = lambda n: f"{best[n]:.1f} us, x{best[n] / c:.3f}"
    lines.append(f"| {row['grid']} | {row['B']} | {row['L']} | {c:.1f} us | "
                 f"{cell('pallas_parallax')} | {cell('pallas_softmax')} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="bench/results",
                  help="directory for decode_cold.json / decode_cold.md")
  ap.add_argument("--shapes", default=DEFAULT_SHAPES, help=SHAPES_HELP)
  ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions per shape")
  ap.add_argument("--budget", type=float, default=300.0, help="seconds; later shapes skipped")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  res = {"env": environment(), "reps": args.reps, "rows": []}
  buf = flush_buffer()
  for shape in shapes_within(args.shapes, args.budget):
    res["rows"].append(bench_shape(*shape, buf, args.reps))
    with open(os.path.join(args.out, "decode_cold.json"), "w") as f:
      json.dump(res, f, indent=1)
    write_md(res, os.path.join(args.out, "decode_cold.md"))


if __name__ == "__main__":
  main()
