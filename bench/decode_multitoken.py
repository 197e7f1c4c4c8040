"""Multi-token decode (T new tokens per sequence, e.g. speculative decoding): time of the
Pallas Parallax decode kernel for T in --tokens against T=1 on the same KV cache.

The cache read is the same for every T (all T*G rows of a KV head share its tiles), so the
prediction is ~T=1's time while T*G <= 16 rows fit the padded MMA tile (GQA 16/8: T <= 8).
Timing: CUPTI kernel time (median), including the transposes of q, r, o that T > 1 adds.

  PYTHONPATH=. python3 bench/decode_multitoken.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import warnings

import jax
import jax.numpy as jnp

warnings.filterwarnings("ignore", category=DeprecationWarning)

from bench.common import environment  # noqa: E402
from bench.decode import time_us  # noqa: E402
from pallas_kernels import decode_triton as dk  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="bench/results")
  ap.add_argument("--Bs", default="1,8,64")
  ap.add_argument("--Ls", default="4096,32768")
  ap.add_argument("--tokens", default="1,2,4,8")
  a = ap.parse_args()
  os.makedirs(a.out, exist_ok=True)
  Hq, Hkv, D = 16, 8, 128
  res = {"env": environment(), "Hq": Hq, "Hkv": Hkv, "D": D, "rows": []}
  for L in map(int, a.Ls.split(",")):
    for B in map(int, a.Bs.split(",")):
      ks = jax.random.split(jax.random.key(B + L), 4)
      k = jax.random.normal(ks[2], (B, L, Hkv, D), jnp.bfloat16)
      v = jax.random.normal(ks[3], (B, L, Hkv, D), jnp.bfloat16)
      lens = jnp.full((B,), L, jnp.int32)
      row = {"B": B, "L": L, "us": {}}
      for T in map(int, a.tokens.split(",")):
        shape = (B, Hq, D) if T == 1 else (B, T, Hq, D)
        q = jax.random.normal(ks[0], shape, jnp.bfloat16)
        r = (0.5 * jax.random.normal(ks[1], shape)).astype(jnp.bfloat16)
        f = jax.jit(lambda q, k, v, r, l: dk.parallax_decode(q, k, v, r, scale=D ** -0.5,
                                                             lengths=l))
        row["us"][T], _ = time_us(f, (q, k, v, r, lens))
      print(row, flush=True)
      res["rows"].append(row)
  with open(os.path.join(a.out, "decode_multitoken.json"), "w") as fh:
    json.dump(res, fh, indent=1)
  toks = list(map(int, a.tokens.split(",")))
  lines = [f"# Multi-token Parallax decode, {res['env']['device']}, jax {res['env']['jax']}, "
           f"{res['env']['date']}", "",
           f"bf16, Hq={Hq}, Hkv={Hkv}, D={D}, all L slots valid; CUPTI us (x T=1 time).", "",
           "| B | L | " + " | ".join(f"T={t}" for t in toks) + " |",
           "|---|---|" + "---|" * len(toks)]
  for row in res["rows"]:
    base = row["us"][toks[0]]
    lines.append(f"| {row['B']} | {row['L']} | " + " | ".join(
        f"{row['us'][t]:.1f} (x{row['us'][t] / base:.2f})" for t in toks) + " |")
  with open(os.path.join(a.out, "decode_multitoken.md"), "w") as fh:
    fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
