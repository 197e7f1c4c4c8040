"""A/B of the decode kernels in one run: the Pallas-Triton split-KV kernel (the default,
`pallas_kernels.decode_triton`) against the Mosaic GPU kernel (`pallas_kernels.decode_mgpu`: packed
and unpacked Q/R tiles, ring depths, one or two consumer warpgroups, split counts), with cuDNN
softmax decode as the common bar.

Same inputs, timing and chaining as bench/decode.py (CUPTI kernel time of STEPS chained
steps / STEPS; the Triton kernel hands its arrival counter on). For the Mosaic variants the
JSON also splits one step's CUPTI time by kernel (the decode kernel, the XLA merge of the
split partials, the row gather), so the per-tile loop can be compared apart from the merge,
which this kernel leaves to XLA.

  PYTHONPATH=. python3 bench/decode_mgpu_ab.py --out DIR [--budget 400]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import environment, kernel_medians_us
from bench.decode import (SHAPES_HELP, STEPS, chained, log, shape_inputs,
                          shapes_within, time_us)
from pallas_kernels import decode_mgpu as dm
from pallas_kernels import decode_triton as dk
from pallas_kernels.common import split_chunk


def variants(B, Hkv, L):
  """name -> DecodeConfig of the Mosaic GPU kernel at this shape. `2wg`: two consumer
  warpgroups on alternate tiles; `halfsplits`: half the default split count (longer
  programs, half the partials to merge)."""
  base = dm.DecodeConfig()
  two = dataclasses.replace(base, num_stages=4, num_consumers=2)
  out = {"mgpu_pack": base, "mgpu_nopack": dataclasses.replace(base, pack_qr=False),
         "mgpu_pack_2stages": dataclasses.replace(base, num_stages=2),
         "mgpu_pack_4stages": dataclasses.replace(base, num_stages=4),
         "mgpu_pack_2wg": two}
  splits = dm.default_splits(B, Hkv, L, base.block_kv)
  if splits > 1:   # (one split: the same launch as mgpu_pack_2wg)
    out["mgpu_pack_2wg_halfsplits"] = dataclasses.replace(two, num_splits=splits // 2)
  return out


def steps(B, L, Hq, Hkv, D):
  scale = 1.0 / np.sqrt(D)
  out = {}

  def triton(q, k, v, r, lens, ex):
    o, arr = dk.parallax_decode(q, k, v, r, scale=scale, lengths=lens, arrivals=ex["arr"])
    return o, {**ex, "arr": arr}
  out["triton_parallax"] = triton

  def cudnn(q, k, v, r, lens, ex):
    return jax.nn.dot_product_attention(
        q[:, None], k, v, scale=scale, implementation="cudnn",
        query_seq_lengths=ex["ql"], key_value_seq_lengths=lens)[:, 0], ex
  out["cudnn_softmax"] = cudnn

  for name, cfg in variants(B, Hkv, L).items():
    def mg(q, k, v, r, lens, ex, cfg=cfg):
      return dm.parallax_decode_mgpu(q, k, v, r, scale=scale, lengths=lens, config=cfg), ex
    out[name] = mg

  def mg_softmax(q, k, v, r, lens, ex):
    return dm.parallax_decode_mgpu(q, k, v, None, scale=scale, lengths=lens), ex
  out["mgpu_softmax"] = mg_softmax
  return out


def bench_shape(grid, B, L, Hq, Hkv, D):
  (q, k, v, r, lens), refs = shape_inputs(B, L, Hq, Hkv, D)
  kv_bytes = 2 * B * L * Hkv * D * 2
  ns = dm.default_splits(B, Hkv, L, dm.DecodeConfig().block_kv)
  row = {"grid": grid, "B": B, "L": L, "Hq": Hq, "Hkv": Hkv, "D": D, "kv_GB": kv_bytes / 1e9,
         "mgpu_num_splits": split_chunk(L, ns, dm.DecodeConfig().block_kv)[1]}
  args = (q, k, v, r, lens, {"ql": jnp.ones((B,), jnp.int32), "arr": dk.init_arrivals(B, Hkv)})
  cfgs = variants(B, Hkv, L)
  for name, step in steps(B, L, Hq, Hkv, D).items():
    try:
      us, how = time_us(chained(step), args)
      ent = {"us": us / STEPS, "GBps": kv_bytes / (us / STEPS * 1e-6) / 1e9,
             "timer": f"{how}, {STEPS} chained steps"}
      if name in cfgs:
        ent["config"] = dataclasses.asdict(cfgs[name])
      if name.startswith("mgpu"):
        ent["kernels_us"] = kernel_medians_us(jax.jit(lambda *a, s=step: s(*a)[0]), args)
      ref = refs.get("softmax" if "softmax" in name else "parallax")
      if ref is not None:
        o = np.asarray(jax.jit(step)(*args)[0], np.float32)
        ent["rel_err"] = float(np.max(np.abs(o - ref)) / np.max(np.abs(ref)))
    except Exception as e:  # noqa: BLE001  (a launch this GPU refuses: recorded, not fatal)
      ent = {"error": repr(e)[:400]}
    row[name] = ent
    log(grid, B, L, name, {a: (round(b, 3) if isinstance(b, float) else b)
                           for a, b in ent.items()})
  c = row.get("cudnn_softmax", {}).get("us")
  for name, ent in row.items():
    if isinstance(ent, dict) and "us" in ent and c:
      ent["vs_cudnn"] = ent["us"] / c
  return row


def write_md(res, path):
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


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="bench/results", help="directory for decode_mgpu_ab.json/md")
  ap.add_argument("--budget", type=float, default=400.0, help="seconds; later shapes skipped")
  ap.add_argument("--shapes", default="gqa:1:8192,gqa:1:1024,gqa:8:1024,gqa:8:8192,"
                  "gqa:32:4096,gqa:256:1024,gqa:256:8192,mha:1:8192,mha:8:1024,mha:8:8192,"
                  "mha:256:1024,mha:256:4096,gqa:1:32768,gqa:64:32768",
                  help=SHAPES_HELP)
  args = ap.parse_args()
  ok, why = dm.supported(jax.ShapeDtypeStruct((1, 16, 128), jnp.bfloat16),
                         jax.ShapeDtypeStruct((1, 64, 8, 128), jnp.bfloat16),
                         jax.ShapeDtypeStruct((1, 64, 8, 128), jnp.bfloat16))
  if not ok:
    raise SystemExit(f"the Mosaic GPU decode kernel cannot run here: {why}")
  os.makedirs(args.out, exist_ok=True)
  res = {"env": environment(), "rows": []}
  for shape in shapes_within(args.shapes, args.budget):
    res["rows"].append(bench_shape(*shape))
    with open(os.path.join(args.out, "decode_mgpu_ab.json"), "w") as f:
      json.dump(res, f, indent=1)
    write_md(res, os.path.join(args.out, "decode_mgpu_ab.md"))


if __name__ == "__main__":
  main()
