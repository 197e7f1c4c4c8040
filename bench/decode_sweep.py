"""Launch-parameter sweep of the Pallas decode kernel (splits x block_kv x stages), plus a
per-kernel time breakdown (CUPTI, aggregate=False) at the default parameters.

Used to set `default_num_splits` / the decode defaults; the figures are in bench/NOTES.md (decode).

  PYTHONPATH=. python3 bench/decode_sweep.py --out DIR [--budget 240]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

warnings.filterwarnings("ignore", category=DeprecationWarning)

from bench.common import environment, kernel_medians_us  # noqa: E402
from bench.decode import time_us  # noqa: E402
from pallas_kernels import decode_triton as dk  # noqa: E402

T0 = time.time()
SHAPES = [  # (grid, B, L, Hq, Hkv, D)
    ("gqa", 1, 1024, 16, 8, 128), ("gqa", 1, 8192, 16, 8, 128), ("gqa", 1, 32768, 16, 8, 128),
    ("gqa", 8, 4096, 16, 8, 128), ("gqa", 32, 4096, 16, 8, 128), ("gqa", 64, 4096, 16, 8, 128),
    ("gqa", 64, 8192, 16, 8, 128), ("gqa", 32, 32768, 16, 8, 128), ("gqa", 128, 4096, 16, 8, 128),
    ("mha", 8, 4096, 8, 8, 64), ("mha", 256, 1024, 8, 8, 64), ("mha", 256, 4096, 8, 8, 64),
    ("mha", 64, 4096, 8, 8, 64),
]
SMALL = [  # B * Hkv < 132 programs: the split regime (in-kernel merge)
    ("gqa", 1, 1024, 16, 8, 128), ("gqa", 1, 4096, 16, 8, 128), ("gqa", 1, 8192, 16, 8, 128),
    ("gqa", 1, 32768, 16, 8, 128), ("gqa", 8, 1024, 16, 8, 128), ("gqa", 8, 4096, 16, 8, 128),
    ("gqa", 8, 32768, 16, 8, 128), ("mha", 1, 1024, 8, 8, 64), ("mha", 1, 4096, 8, 8, 64),
    ("mha", 1, 32768, 8, 8, 64), ("mha", 8, 1024, 8, 8, 64), ("mha", 8, 4096, 8, 8, 64),
]
SMALL_LAUNCH = [(64, 3, 4), (32, 3, 4), (64, 3, 2), (32, 2, 2)]
MID = [  # B * Hkv around one wave of SMs: split or not
    ("gqa", 8, 1024, 16, 8, 128), ("gqa", 16, 1024, 16, 8, 128), ("gqa", 32, 1024, 16, 8, 128),
    ("gqa", 32, 4096, 16, 8, 128), ("mha", 8, 8192, 8, 8, 64), ("mha", 256, 1024, 8, 8, 64),
]
MID_LAUNCH = [(64, st, nw) for nw in (2, 4, 8) for st in (2, 3, 4) if nw != 8 or st == 3]
LAUNCH = [(64, 2, 4), (64, 3, 4), (64, 4, 4), (128, 2, 4), (128, 3, 8), (32, 2, 4), (32, 4, 4),
          (128, 3, 4), (128, 4, 4), (256, 2, 4), (256, 3, 8)]


def breakdown(fn, args):
  return {n: round(t, 2) for n, t in kernel_medians_us(fn, args, iters=5).items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="bench/results")
  ap.add_argument("--budget", type=float, default=240.0)
  ap.add_argument("--grid", choices=("all", "gqa", "mha", "small", "mid"), default="all",
                  help="only the shapes of this grid (small: the split regime, B*Hkv < 132, "
                  "with 1-2 tile splits and 2-warp launches; mid: B*Hkv near one wave, "
                  "1-8 splits x warps x stages)")
  ap.add_argument("--name", default="decode_sweep", help="results file stem")
  a = ap.parse_args()
  res = {"env": environment(), "rows": []}
  shapes, launch = {"small": (SMALL, SMALL_LAUNCH), "mid": (MID, MID_LAUNCH)}.get(
      a.grid, (SHAPES, LAUNCH))
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
    s0 = dk.default_num_splits(B, Hkv, L)
    row = {"grid": grid, "B": B, "L": L, "Hq": Hq, "Hkv": Hkv, "D": D, "default_splits": s0,
           "configs": []}
    for has_r in (True, False):
      rr = r if has_r else None
      f0 = jax.jit(lambda q, k, v, rr, lens: dk.parallax_decode(q, k, v, rr, scale=scale,
                                                                lengths=lens))
      row[f"default_us_{'parallax' if has_r else 'softmax'}"] = time_us(
          f0, (q, k, v, rr, lens), iters=20)[0]
      if has_r:
        row["breakdown_us"] = breakdown(f0, (q, k, v, rr, lens))
    mults = {"small": (s0 // 2, s0, 2 * s0, L // 64, L // 32), "mid": (1, 2, 4, 8)}.get(
        a.grid, (s0, 2 * s0, 4 * s0, 8 * s0, 16 * s0))
    splits = sorted({max(1, min(s, L // 32)) for s in mults})
    for ns, (bk, st, nw) in itertools.product(splits, launch):
      if time.time() - T0 > a.budget or L // ns < bk:
        continue
      f = jax.jit(lambda q, k, v, r, lens: dk.parallax_decode(
          q, k, v, r, scale=scale, lengths=lens, num_splits=ns, block_kv=bk, num_stages=st,
          num_warps=nw))
      try:
        us = time_us(f, (q, k, v, r, lens), iters=20)[0]
        row["configs"].append({"splits": ns, "block_kv": bk, "stages": st, "warps": nw,
                               "us": us, "GBps": kv_gb / (us * 1e-6)})
      except Exception as e:  # noqa: BLE001
        row["configs"].append({"splits": ns, "block_kv": bk, "stages": st, "warps": nw,
                               "error": repr(e)[:200]})
    ok = [c for c in row["configs"] if "us" in c]
    if ok:
      row["best"] = min(ok, key=lambda c: c["us"])
    print(f"[{time.time() - T0:6.1f}s] {grid} B={B} L={L} default parallax "
          f"{row['default_us_parallax']:.1f} softmax {row['default_us_softmax']:.1f} best "
          f"{row.get('best')} breakdown {row['breakdown_us']}", flush=True)
    res["rows"].append(row)
    with open(os.path.join(a.out, f"{a.name}.json"), "w") as fh:
      json.dump(res, fh, indent=1)
    del q, k, v, r


if __name__ == "__main__":
  main()
