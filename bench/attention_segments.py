"""Training attention (forward, forward+backward) on packed sequences: what segment ids cost.

    PYTHONPATH=. python bench/attention_segments.py [--out DIR] [--data data/stdlib]

One shape (B=4, L=4096, Hq=16, Hkv=8, D=128, bf16, causal: the 0.6B training shape), the
training path `parallax_flash_attention` (Mosaic GPU forward where it applies, Triton
backward), CUPTI kernel times, for segment-id layouts:
  none      no segment ids
  one_doc   every id equal: all the mask work and no masked pair (its overhead alone)
  stdlib    the first 4 packed rows of the training stream (data/stdlib, seed 0), as the
            0.6B bench trains on them
  halves    two documents of L/2 per row
For each layout: the share of causal 64 x 64 tiles whose ids never match (skippable),
that hold one id (no mask needed) and that mix ids.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil

import numpy as np


def tile_kinds(seg: np.ndarray, tile: int = 64) -> dict:
  """Shares of causal (q tile, k tile) pairs that are disjoint / uniform / mixed by id."""
  n = seg.shape[1] // tile
  counts = {"skip": 0, "uniform": 0, "mixed": 0}
  for row in seg:
    t = row[: n * tile].reshape(n, tile)
    lo, hi = t.min(1), t.max(1)
    i, j = np.tril_indices(n)
    skip = (hi[i] < lo[j]) | (hi[j] < lo[i])
    uni = (lo[i] == hi[i]) & (lo[j] == hi[j]) & (lo[i] == lo[j])
    counts["skip"] += int(skip.sum())
    counts["uniform"] += int((uni & ~skip).sum())
    counts["mixed"] += int((~uni & ~skip).sum())
  total = sum(counts.values())
  return {k: v / total for k, v in counts.items()}


def visible_fraction(seg: np.ndarray) -> float:
  """Causal (query, key) pairs with equal ids / all causal pairs."""
  from bench.common import document_context
  return document_context(seg) / ((seg.shape[1] + 1) / 2)


def stdlib_rows(path: str, B: int, L: int) -> np.ndarray:
  from train import prepare
  from train.data import make_dataset
  if not os.path.exists(os.path.join(path, "meta.json")):
    prepare.main(["--out", path])
  it = iter(make_dataset(path, split="train", seq_len=L, batch_size=B, seed=0, prefetch=0))
  return np.asarray(next(it)["segment_ids"], np.int32)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default="data/stdlib")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--name", default="attention_segments")
  p.add_argument("--out", default=None, help="also copy the result files here")
  a = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from bench import common
  from bench.attention_train import kernel_breakdown, time_ms
  from pallas_kernels import parallax_flash_attention

  B, L, Hq, Hkv, D = 4, 4096, 16, 8, 128
  ks = jax.random.split(jax.random.key(0), 5)
  n = lambda k, h: jax.random.normal(k, (B, L, h, D), jnp.float32).astype(jnp.bfloat16)
  q, k, v, do = n(ks[0], Hq), n(ks[1], Hkv), n(ks[2], Hkv), n(ks[4], Hq)
  r = (0.5 * n(ks[3], Hq).astype(jnp.float32)).astype(jnp.bfloat16)
  scale = 1.0 / math.sqrt(D)
  layouts = {
      "none": None,
      "one_doc": np.ones((B, L), np.int32),
      "stdlib": stdlib_rows(a.data, B, L),
      "halves": np.repeat(np.array([[1, 2]], np.int32), L // 2, axis=1).repeat(B, 0),
  }
  rows = []
  for name, seg in layouts.items():
    ids = None if seg is None else jnp.asarray(seg)
    attn = lambda q, k, v, r, ids=ids: parallax_flash_attention(
        q, k, v, r, scale=scale, causal=True, q_segment_ids=ids, kv_segment_ids=ids)
    fwd = jax.jit(attn)

    def train(q, k, v, r, do, attn=attn):
      o, vjp = jax.vjp(attn, q, k, v, r)
      return o, vjp(do)
    train = jax.jit(train)
    row = {"layout": name}
    if seg is not None:
      row["tiles"] = tile_kinds(seg)
      row["visible_pairs"] = visible_fraction(seg)
    row["fwd_ms"], _ = time_ms(fwd, (q, k, v, r), iters=a.iters)
    row["fwd_bwd_ms"], _ = time_ms(train, (q, k, v, r, do), iters=a.iters)
    row["kernels"] = kernel_breakdown(train, (q, k, v, r, do))
    print(row, flush=True)
    rows.append(row)

  head = ["layout", "skip / one id / mixed tiles", "visible causal pairs", "fwd ms",
          "fwd+bwd ms", "kernels (ms)"]
  md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r_ in rows:
    t = r_.get("tiles")
    tiles = "-" if t is None else f"{t['skip']:.0%} / {t['uniform']:.0%} / {t['mixed']:.0%}"
    vis = f"{r_['visible_pairs']:.0%}" if "visible_pairs" in r_ else "100%"
    kern = ", ".join(f"{nm.split('(')[0][:24]} {ms:.3f}" for nm, ms in r_["kernels"]
                     if isinstance(ms, float))
    md.append(f"| {r_['layout']} | {tiles} | {vis} | {r_['fwd_ms']:.3f} | "
              f"{r_['fwd_bwd_ms']:.3f} | {kern} |")
  notes = (f"B={B} L={L} Hq={Hq} Hkv={Hkv} D={D} bf16 causal, `parallax_flash_attention` "
           f"(Mosaic GPU forward, Triton backward), CUPTI median of {a.iters}.")
  common.write_results(a.name, common.environment(), rows, "\n".join(md), notes)
  if a.out:
    for ext in ("json", "md"):
      shutil.copy(os.path.join(os.path.dirname(__file__), "results", f"{a.name}.{ext}"), a.out)


if __name__ == "__main__":
  main()
