"""Decode-attention benchmark: Pallas split-KV Parallax decode vs cuDNN / XLA softmax decode and
the XLA Parallax path, one new token per sequence, KV cache [B, L, Hkv, D] (all L slots valid).

Timing: CUPTI kernel time (`jax.experimental.mosaic.gpu.profiler.measure`, median over
iterations), wall-clock median as fallback. GB/s counts the K and V bytes of the valid cache.
Error: max |o - ref| / max |ref| against a float32 dense reference (small shapes only).

  PYTHONPATH=. python3 bench/decode.py --out DIR [--budget 300]
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

from bench.common import environment  # noqa: E402
from pallas_kernels import decode as dk  # noqa: E402

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


def impls(B, L, Hq, Hkv, D):
  import parallax_jax
  scale = 1.0 / np.sqrt(D)
  out = {}
  out["pallas_parallax"] = jax.jit(
      lambda q, k, v, r, lens: dk.parallax_decode(q, k, v, r, scale=scale, lengths=lens))
  out["pallas_softmax"] = jax.jit(
      lambda q, k, v, r, lens: dk.parallax_decode(q, k, v, None, scale=scale, lengths=lens))

  def sdpa(impl):
    def f(q, k, v, r, lens):
      return jax.nn.dot_product_attention(
          q[:, None], k, v, scale=scale, implementation=impl,
          query_seq_lengths=jnp.ones((B,), jnp.int32), key_value_seq_lengths=lens)[:, 0]
    return jax.jit(f)
  out["cudnn_softmax"] = sdpa("cudnn")
  out["xla_softmax"] = sdpa("xla")

  def xla_parallax(q, k, v, r, lens):
    kv_ids = jnp.where(jnp.arange(L)[None] < lens[:, None], 0, -1)
    q_ids = jnp.zeros((B, 1), jnp.int32)
    return parallax_jax.attention(q[:, None], k, v, r[:, None], probe="learned",
                                  affine="affine", causal=True, segment_ids=(q_ids, kv_ids),
                                  implementation="xla")[:, 0]
  out["xla_parallax"] = jax.jit(xla_parallax)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="bench/results")
  ap.add_argument("--budget", type=float, default=300.0)
  ap.add_argument("--Bs", default="1,8,64,256")
  ap.add_argument("--Ls", default="1024,8192,32768")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  Hq, Hkv, D, dt = 16, 8, 128, jnp.bfloat16
  res = {"env": environment(), "config": dict(Hq=Hq, Hkv=Hkv, D=D, dtype="bfloat16"),
         "rows": []}
  for L in map(int, args.Ls.split(",")):
    for B in map(int, args.Bs.split(",")):
      if B * L > 2 * 2**20:
        log(f"skip B={B} L={L} (KV {B*L*Hkv*D*4/1e9:.1f} GB; XLA paths would not fit)")
        continue
      if time.time() - T0 > args.budget:
        log("budget spent; stopping")
        break
      ks = jax.random.split(jax.random.key(B * 100003 + L), 4)
      q = jax.random.normal(ks[0], (B, Hq, D), dt)
      r = (0.5 * jax.random.normal(ks[1], (B, Hq, D))).astype(dt)
      k = jax.random.normal(ks[2], (B, L, Hkv, D), dt)
      v = jax.random.normal(ks[3], (B, L, Hkv, D), dt)
      lens = jnp.full((B,), L, jnp.int32)
      kv_bytes = 2 * B * L * Hkv * D * 2
      refs = {}
      if B * L <= 256 * 1024:
        refs["parallax"] = dk.reference_decode(q, k, v, r, scale=1 / np.sqrt(D), lengths=lens)
        refs["softmax"] = dk.reference_decode(q, k, v, None, scale=1 / np.sqrt(D), lengths=lens)
      row = {"B": B, "L": L, "num_splits": dk.default_num_splits(B, Hkv, L), "kv_GB": kv_bytes / 1e9}
      for name, fn in impls(B, L, Hq, Hkv, D).items():
        try:
          us, how = time_us(fn, (q, k, v, r, lens))
          ent = {"us": us, "GBps": kv_bytes / (us * 1e-6) / 1e9, "timer": how}
          ref = refs.get("parallax" if "parallax" in name else "softmax")
          if ref is not None:
            o = np.asarray(fn(q, k, v, r, lens), np.float32)
            ref = np.asarray(ref)
            ent["rel_err"] = float(np.max(np.abs(o - ref)) / np.max(np.abs(ref)))
        except Exception as e:  # noqa: BLE001
          ent = {"error": repr(e)[:300]}
        row[name] = ent
        log(B, L, name, {a: (round(b, 4) if isinstance(b, float) else b) for a, b in ent.items()})
      c = row.get("cudnn_softmax", {}).get("us")
      for name in list(row):
        if isinstance(row[name], dict) and "us" in row[name] and c:
          row[name]["vs_cudnn"] = row[name]["us"] / c
      res["rows"].append(row)
      with open(os.path.join(args.out, "decode.json"), "w") as f:
        json.dump(res, f, indent=1)
      write_md(res, os.path.join(args.out, "decode.md"))
      del q, k, v, r


def write_md(res, path):
  names = ["pallas_parallax", "pallas_softmax", "cudnn_softmax", "xla_softmax", "xla_parallax"]
  lines = [f"# Decode attention, {res['env']['device']}, jax {res['env']['jax']}, "
           f"{res['env']['date']}", "",
           f"Hq={res['config']['Hq']} Hkv={res['config']['Hkv']} D={res['config']['D']} bf16, "
           "one token per sequence, all L slots valid. us = median kernel time (CUPTI); "
           "GB/s of K+V read; xC = time / cuDNN time; err = max rel error vs fp32 reference.",
           "", "| B | L | splits | " + " | ".join(names) + " |",
           "|---|---|---|" + "---|" * len(names)]
  for row in res["rows"]:
    cells = []
    for n in names:
      e = row.get(n, {})
      if "us" not in e:
        cells.append("err" if "error" in e else "-")
        continue
      s = f"{e['us']:.1f} us, {e['GBps']:.0f} GB/s"
      if "vs_cudnn" in e:
        s += f", x{e['vs_cudnn']:.2f}"
      if "rel_err" in e:
        s += f", err {e['rel_err']:.1e}"
      cells.append(s)
    lines.append(f"| {row['B']} | {row['L']} | {row['num_splits']} | " + " | ".join(cells) + " |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
