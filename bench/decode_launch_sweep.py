"""Launch-parameter sweep of the Triton decode kernel with a cold L2: explicit
`parallax_decode` keyword sets (block_kv, num_splits, num_warps, num_stages,
kv_heads_per_program) against cuDNN softmax decode and the kernel's default softmax launch,
per shape, in one run.

Each entry is timed as in bench/decode.py --cold (STEPS chained steps, the arrival counter
handed on, the L2 evicted between steps by the untimed `l2_flush`; CUPTI time of every other
kernel, median of 20), `--reps` interleaved repetitions, the minimum reported; max relative
error against the float32 reference where B*L <= 256k. Used to set `default_launch`,
`default_pack` and the stage / warp rules of `parallax_decode` (bench/NOTES.md, decode v12,
v13). `--variants '[{}]'` gives the columns of the former bench/decode_cold.py (cuDNN, the
kernel's default softmax and Parallax launches; bench/NOTES.md, decode v11).

  PYTHONPATH=. python3 bench/decode_launch_sweep.py --out DIR --shapes gqa:32:4096,... \\
      --variants '[{}, {"block_kv": 32, "num_stages": 3}]' [--reps 2] [--budget 300]
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import environment
from bench.decode import (SHAPES_HELP, chained_cold, flush_buffer, impls, launched, log,
                          pallas_step, shape_inputs, shapes_within, time_cold_us)
from pallas_kernels import decode_triton as dk


def sweep_shape(grid, B, L, Hq, Hkv, D, variants, buf, reps):
  """One shape's row: us per step of every entry (a list over repetitions), errors."""
  scale = 1.0 / np.sqrt(D)
  (q, k, v, r, lens), refs = shape_inputs(B, L, Hq, Hkv, D)
  args = (q, k, v, r, lens, {"ql": jnp.ones((B,), jnp.int32), "arr": dk.init_arrivals(B, Hkv)},
          buf)
  steps = {"cudnn": impls(B, L, Hq, Hkv, D, with_xla=False)["cudnn_softmax"],
           "softmax": pallas_step(scale, parallax=False)}
  steps.update({"par " + json.dumps(kw): pallas_step(scale, **kw) for kw in variants})
  row = {"grid": grid, "B": B, "L": L, "Hq": Hq, "Hkv": Hkv, "D": D,
         "default_launch": launched(B, Hkv, L, D, Hq // Hkv),
         "us": {}, "kernels": {}, "rel_err": {}, "errors": {}}
  fns = {}
  for name, step in steps.items():
    try:
      fns[name] = chained_cold(step)
      if refs and name.startswith("par"):
        o = np.asarray(jax.jit(step)(*args[:6])[0], np.float32)
        ref = refs["parallax"]
        row["rel_err"][name] = float(np.max(np.abs(o - ref)) / np.max(np.abs(ref)))
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


def write_md(res, path):
  lines = [f"# Decode launch sweep, L2 evicted between steps ({res['env'].get('device')}, "
           f"{res['env'].get('date')})", "",
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


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="bench/results", help="directory of the results")
  ap.add_argument("--name", default="decode_launch_sweep", help="file name stem of the results")
  ap.add_argument("--shapes", required=True, help=SHAPES_HELP)
  ap.add_argument("--variants", default="[{}]",
                  help="JSON list of parallax_decode keyword dicts, timed at every shape")
  ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions per shape")
  ap.add_argument("--budget", type=float, default=300.0, help="seconds; later shapes skipped")
  args = ap.parse_args()
  variants = json.loads(args.variants)
  if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
    ap.error(f"--variants must be a JSON list of dicts, got {args.variants!r}")
  os.makedirs(args.out, exist_ok=True)
  res = {"env": environment(), "reps": args.reps, "variants": variants, "rows": []}
  buf = flush_buffer()
  for shape in shapes_within(args.shapes, args.budget):
    res["rows"].append(sweep_shape(*shape, variants, buf, args.reps))
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
      json.dump(res, f, indent=1)
    write_md(res, os.path.join(args.out, f"{args.name}.md"))


if __name__ == "__main__":
  main()
