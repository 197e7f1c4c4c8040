"""Evaluate every member of the attention family on random data and print a comparison.

    python -m parallax_jax.demo --length 512 --heads 4 --kv-heads 2 --head-dim 32

For each member: how far its output is from softmax attention, the dense-vs-chunked
agreement, and the wall time of each implementation (jitted, after one warm-up call).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import parallax_jax as pj


def _time(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def run(batch, length, heads, kv_heads, head_dim, ridge, r_scale, seed):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (batch, length, heads, head_dim))
  k = jax.random.normal(ks[1], (batch, length, kv_heads, head_dim))
  v = jax.random.normal(ks[2], (batch, length, kv_heads, head_dim))
  r = r_scale * jax.random.normal(ks[3], q.shape)
  rows = []
  soft = pj.softmax_attention(q, k, v, implementation="xla")
  for name, (_, probe, _) in pj.MEMBERS.items():
    kw = dict(ridge=ridge) if probe == "solve" else {}
    rr = r if probe == "learned" else None
    fns = {impl: jax.jit(lambda q, k, v, rr, impl=impl: pj.member(
        name, q, k, v, rr, implementation=impl, **kw)) for impl in ("xla", "chunked")}
    dense, chunk = fns["xla"](q, k, v, rr), fns["chunked"](q, k, v, rr)
    finite = bool(jnp.all(jnp.isfinite(dense)))
    rows.append(dict(
        member=name,
        rel_diff_vs_softmax=float(jnp.linalg.norm(dense - soft) / jnp.linalg.norm(soft)),
        max_abs_dense_vs_chunked=float(jnp.max(jnp.abs(dense - chunk))),
        finite=finite,
        xla_ms=1e3 * _time(fns["xla"], q, k, v, rr),
        chunked_ms=1e3 * _time(fns["chunked"], q, k, v, rr),
    ))
  cor = pj.diagnostics.correction_to_output_ratio(q, k, v, r)
  return rows, np.asarray(cor)


def format_table(rows):
  head = ("member", "rel. diff to softmax", "max abs xla vs chunked", "finite", "xla ms",
          "chunked ms")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    lines.append(f"| {r['member']} | {r['rel_diff_vs_softmax']:.4f} | "
                 f"{r['max_abs_dense_vs_chunked']:.2e} | {r['finite']} | {r['xla_ms']:.2f} | "
                 f"{r['chunked_ms']:.2f} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m parallax_jax.demo", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
  p.add_argument("--length", type=int, default=512, help="sequence length (default 512)")
  p.add_argument("--heads", type=int, default=4, help="query heads (default 4)")
  p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default 2)")
  p.add_argument("--head-dim", type=int, default=32, help="head dimension (default 32)")
  p.add_argument("--ridge", type=float, default=1.0,
                 help="ridge for the solve-probe members (default 1.0)")
  p.add_argument("--r-scale", type=float, default=0.1,
                 help="std of the random learned probe r for Parallax (default 0.1)")
  p.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
  a = p.parse_args(argv)
  if a.heads % a.kv_heads:
    p.error(f"--heads ({a.heads}) must be a multiple of --kv-heads ({a.kv_heads})")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; B={a.batch} L={a.length} "
        f"Hq={a.heads} Hkv={a.kv_heads} D={a.head_dim}, causal")
  rows, cor = run(a.batch, a.length, a.heads, a.kv_heads, a.head_dim, a.ridge, a.r_scale, a.seed)
  print(format_table(rows))
  print("Parallax correction-to-output ratio per head:", np.round(cor, 4).tolist())


if __name__ == "__main__":
  main()
