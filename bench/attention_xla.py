"""Dense vs chunked Parallax vs softmax (XLA, and cuDNN on GPU): time and compiled memory.

    PYTHONPATH=. python bench/attention_xla.py            # picks shapes for the platform
    PYTHONPATH=. python bench/attention_xla.py --only-32k # the CPU acceptance run

Times are wall-clock medians of jitted calls (compile excluded). "mem" is the compiled
program's temp + output bytes (XLA's memory analysis): the working set beyond the inputs.
TFLOP/s counts causal matrix work: softmax 2 matmuls (QK^T, PV), Parallax 4 (adds RK^T, P2 V);
the backward is counted as 2.5x the forward, as FlashAttention does.
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

import parallax_jax as pj
from bench import common

GIB = 1024**3


def flops(b, l, hq, d, matmuls, causal=True, backward=False):
  f = 2.0 * b * hq * l * l * d * matmuls * (0.5 if causal else 1.0)
  return f * (3.5 if backward else 1.0)


def variants(platform):
  v = {
      "softmax_xla_dense": (lambda q, k, v, r: pj.softmax_attention(q, k, v, implementation="xla"), 2),
      "softmax_chunked": (lambda q, k, v, r: pj.softmax_attention(q, k, v, implementation="chunked"), 2),
      "parallax_xla_dense": (lambda q, k, v, r: pj.parallax_attention(q, k, v, r, implementation="xla"), 4),
      "parallax_chunked": (lambda q, k, v, r: pj.parallax_attention(q, k, v, r, implementation="chunked"), 4),
  }
  if platform == "gpu":
    v["softmax_cudnn"] = (lambda q, k, v, r: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"), 2)
  return v


def bench_shape(b, l, hq, hkv, d, dtype, platform, names, dense_limit_bytes, backward=True):
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (b, l, hq, d), dtype)
  k = jax.random.normal(ks[1], (b, l, hkv, d), dtype)
  v = jax.random.normal(ks[2], (b, l, hkv, d), dtype)
  r = (0.1 * jax.random.normal(ks[3], (b, l, hq, d))).astype(dtype)
  rows = []
  for name, (fn, mm) in variants(platform).items():
    if names and name not in names:
      continue
    row = dict(variant=name, B=b, L=l, Hq=hq, Hkv=hkv, D=d, dtype=jnp.dtype(dtype).name)
    dense_bytes = 3 * b * hq * l * l * 4  # scores, weights and a product term, fp32
    if "dense" in name and dense_bytes > dense_limit_bytes:
      row["skipped"] = f"dense needs ~{dense_bytes / GIB:.0f} GiB"
      rows.append(row)
      print(row, flush=True)
      continue
    fwd = jax.jit(fn)
    loss = lambda q, k, v, r: jnp.sum(fn(q, k, v, r).astype(jnp.float32))
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    try:
      row["fwd_ms"] = 1e3 * common.time_fn(fwd, q, k, v, r)
      row["fwd_mem_MiB"] = (common.compiled_bytes(fwd, q, k, v, r) or 0) / 2**20
      row["fwd_TFLOPs"] = flops(b, l, hq, d, mm) / (row["fwd_ms"] * 1e-3) / 1e12
      if backward:
        row["fwdbwd_ms"] = 1e3 * common.time_fn(bwd, q, k, v, r)
        row["fwdbwd_mem_MiB"] = (common.compiled_bytes(bwd, q, k, v, r) or 0) / 2**20
        row["fwdbwd_TFLOPs"] = flops(b, l, hq, d, mm, backward=True) / (row["fwdbwd_ms"] * 1e-3) / 1e12
    except Exception as e:  # record and go on: one failing variant must not hide the rest
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    rows.append(row)
    print(row, flush=True)
  return rows


def table(rows):
  head = ["variant", "B", "L", "Hq", "Hkv", "D", "dtype", "fwd ms", "fwd TFLOP/s", "fwd mem MiB",
          "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd mem MiB", "note"]
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  f = lambda x, p=2: "" if x is None else f"{x:.{p}f}"
  for r in rows:
    out.append("| " + " | ".join([
        r["variant"], str(r["B"]), str(r["L"]), str(r["Hq"]), str(r["Hkv"]), str(r["D"]), r["dtype"],
        f(r.get("fwd_ms")), f(r.get("fwd_TFLOPs"), 3), f(r.get("fwd_mem_MiB"), 1),
        f(r.get("fwdbwd_ms")), f(r.get("fwdbwd_TFLOPs"), 3), f(r.get("fwdbwd_mem_MiB"), 1),
        r.get("skipped", r.get("error", ""))]) + " |")
  return "\n".join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only-32k", action="store_true",
                 help="only the chunked Parallax fwd+bwd at B=1 H=4 L=32768 D=64 (CPU acceptance)")
  p.add_argument("--name", default=None, help="results file stem (default attention_xla_<platform>)")
  a = p.parse_args(argv)
  env = common.environment()
  plat = env["platform"]
  rows = []
  if a.only_32k:
    rows += bench_shape(1, 32768, 4, 4, 64, jnp.float32, plat, {"parallax_chunked"}, 0)
  elif plat == "gpu":
    for l in (1024, 4096, 16384):
      rows += bench_shape(4, l, 16, 8, 128, jnp.bfloat16, plat, None, 40 * GIB)
  else:
    for l in (1024, 4096):
      rows += bench_shape(1, l, 4, 4, 64, jnp.float32, plat, None, 8 * GIB)
  name = a.name or ("attention_xla_" + plat + ("_32k" if a.only_32k else ""))
  common.write_results(name, env, rows, table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
