"""Decode attention with a cold L2, at a few shapes: cuDNN and the Pallas kernel only.

bench/decode.py chains the same call on one cache, so a cache near the L2's 50 MB stays
partly resident from one step to the next, and how much of it does depends on each kernel's
order of reading (which tiles it reads last). In a model the layers between two steps of a
layer evict its cache. Here (as `bench/decode.py --cold` over its whole grid) a 256 MB read,
a Pallas kernel named `l2_flush` that hands the step's output on untouched, runs between
chained steps, and the timer counts every kernel but the flush (CUPTI per-kernel times).
Same inputs and arrival-counter handling as bench/decode.py; repetitions interleaved.

  PYTHONPATH=. python3 bench/decode_cold.py --out bench/results [--shapes mha:8:8192,...]
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from bench.common import environment
from bench.decode import (SHAPES_HELP, chained_cold, flush_buffer, impls, log, shape_inputs,
                          shapes_within, time_cold_us)
from pallas_kernels import decode as dk

DEFAULT_SHAPES = ("mha:8:8192,mha:8:1024,mha:1:8192,gqa:8:1024,gqa:8:4096,mha:256:1024,"
                  "mha:8:4096,mha:8:32768,gqa:32:1024,gqa:32:4096,gqa:32:8192,mha:64:1024,"
                  "gqa:1:1024,mha:1:1024,gqa:256:4096,gqa:32:32768")


def bench_shape(grid, B, L, Hq, Hkv, D, buf, reps):
  (q, k, v, r, lens), _ = shape_inputs(B, L, Hq, Hkv, D)
  ex = {"ql": jnp.ones((B,), jnp.int32), "arr": dk.init_arrivals(B, Hkv)}
  args = (q, k, v, r, lens, ex, buf)
  row = {"grid": grid, "B": B, "L": L, "Hq": Hq, "Hkv": Hkv, "D": D, "us": {}, "kernels": {}}
  steps = impls(B, L, Hq, Hkv, D, with_xla=False)
  fns = {name: chained_cold(step) for name, step in steps.items()}
  for _ in range(reps):  # interleaved repetitions
    for name, fn in fns.items():
      us, names = time_cold_us(fn, args)
      row["us"].setdefault(name, []).append(us)
      row["kernels"][name] = names
  log(grid, B, L, {n: [round(t, 2) for t in ts] for n, ts in row["us"].items()})
  return row


def write_md(res, path):
  env = res["env"]
  lines = [f"# Decode attention with a cold L2, {env.get('device')}, jax {env.get('jax')}, "
           f"{env.get('date')}", "",
           "bf16, one token per sequence, all L slots valid; a 256 MB read between chained "
           "steps evicts the L2; us = CUPTI time per step of every kernel but the flush "
           f"(median of 20, min over {res['reps']} interleaved repetitions); xC = time / cuDNN "
           "time. "
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
