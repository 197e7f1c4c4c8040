"""A/B of the Triton decode kernel against a baseline source of it, in one run: the working
tree's `pallas_kernels/decode_triton.py` against another version of that file (e.g. `git show
REV:pallas_kernels/decode_triton.py > /tmp/base.py`), with cuDNN softmax decode as the common
bar. The baseline's imports resolve in this tree: an older version (`pallas_kernels/decode.py`,
which takes its helpers from `parallax_triton`) needs that import rewritten to take them from
`pallas_kernels.common` (the same helpers, without the leading underscore).

Same inputs, timing and chaining as bench/decode.py (CUPTI kernel time of STEPS chained
steps / STEPS, the arrival counter handed on); max relative error against the float32
reference where B*L <= 256k. Default shapes: the split ones of the decode grid (B*Hkv below
one wave), where the in-kernel merge of the splits is on the critical path.

  PYTHONPATH=. python3 bench/decode_ab.py --baseline /tmp/base.py --out DIR [--budget 300]
      [--cold]   (the L2 evicted between steps, as in a model: bench/decode.py)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import environment
from bench.decode import (SHAPES_HELP, STEPS, flush_buffer, impls, launched, log,
                          pallas_step, shape_inputs, shapes_within, time_step)
from pallas_kernels import decode_triton as dk


def load_module(path: str, name: str = "decode_baseline"):
  """The decode module from another source file of it (its imports resolve in this tree)."""
  mod = types.ModuleType(name)
  mod.__file__ = path
  sys.modules[name] = mod
  with open(path) as f:
    exec(compile(f.read(), path, "exec"), mod.__dict__)
  return mod


def bench_shape(mods, grid, B, L, Hq, Hkv, D, flush_buf=None):
  """One shape's row; flush_buf (`--cold`): the L2 evicted between steps (bench/decode.py)."""
  scale = 1.0 / np.sqrt(D)
  (q, k, v, r, lens), refs = shape_inputs(B, L, Hq, Hkv, D)
  args = (q, k, v, r, lens, {"ql": jnp.ones((B,), jnp.int32), "arr": dk.init_arrivals(B, Hkv)})
  row = {"grid": grid, "B": B, "L": L, "Hq": Hq, "Hkv": Hkv, "D": D,
         LAUNCH: launched(B, Hkv, L, D, Hq // Hkv)}
  steps = {"cudnn_softmax": impls(B, L, Hq, Hkv, D, with_xla=False)["cudnn_softmax"]}
  for name, mod in mods.items():
    steps[name] = pallas_step(scale, module=mod)
  for name, step in steps.items():
    us, how = time_step(step, args, flush_buf)
    ent = {"us": us, "timer": how}
    if refs and name != "cudnn_softmax":
      o = np.asarray(jax.jit(step)(*args)[0], np.float32)
      ent["rel_err"] = float(np.max(np.abs(o - refs["parallax"])) /
                             np.max(np.abs(refs["parallax"])))
    row[name] = ent
    log(grid, B, L, name, {a: (round(b, 4) if isinstance(b, float) else b)
                           for a, b in ent.items()})
  for name in mods:
    row[name]["vs_cudnn"] = row[name]["us"] / row["cudnn_softmax"]["us"]
  return row


LAUNCH = "block_kv, num_splits, kv_heads_per_program"


def write_md(res, path):
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


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--baseline", required=True,
                  help="a source file of pallas_kernels/decode_triton.py")
  ap.add_argument("--out", default="bench/results", help="directory for decode_ab.json / .md")
  ap.add_argument("--name", default="decode_ab", help="file name stem of the results")
  ap.add_argument("--budget", type=float, default=300.0, help="seconds; later shapes skipped")
  ap.add_argument("--shapes", default="gqa:1:1024,gqa:1:8192,mha:1:8192,gqa:8:1024,mha:8:1024,"
                  "gqa:1:4096,gqa:1:32768,mha:1:32768,mha:8:8192,mha:1:1024,mha:1:4096,"
                  "gqa:8:4096,mha:8:4096,gqa:8:8192,gqa:8:32768,mha:8:32768",
                  help=SHAPES_HELP)
  ap.add_argument("--cold", action="store_true",
                  help="evict the L2 between steps (a 256 MB read, not timed), as in a model")
  args = ap.parse_args()
  mods = {"baseline": load_module(args.baseline), "new": dk}
  os.makedirs(args.out, exist_ok=True)
  res = {"env": environment(), "baseline": args.baseline, "cold": args.cold, "rows": []}
  flush_buf = flush_buffer() if args.cold else None
  for shape in shapes_within(args.shapes, args.budget):
    res["rows"].append(bench_shape(mods, *shape, flush_buf=flush_buf))
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
      json.dump(res, f, indent=1)
    write_md(res, os.path.join(args.out, f"{args.name}.md"))


if __name__ == "__main__":
  main()
