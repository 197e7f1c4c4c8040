"""GPU kernel times of the training and decode kernels, for an A/B of the non-finite handling.

Each shape is timed on clean inputs (every call's path: the kernels' one finiteness check
per program, and the Mosaic GPU forward's fixup launch) and on inputs with NaN at masked
positions (the careful pass: the last key's value, seen only by the last query row; for
decode, every cache slot past lengths). CUPTI times per kernel, medians over --iters calls.
Only public entry points are used, so an older checkout of pallas_kernels runs it too:

  PYTHONPATH=. python bench/kernel_nonfinite.py --out /tmp/after.json
  git archive <old commit> pallas_kernels | tar -x -C /tmp/before
  PYTHONPATH=/tmp/before:. python bench/kernel_nonfinite.py --out /tmp/before.json
  python bench/kernel_nonfinite.py --table /tmp/before.json /tmp/after.json --out OUT.md

(--table also reads the row lines a run prints, so a run cut short still counts.)
"""
from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import parallax_decode, parallax_flash_attention

TRAIN = [(4, 4096, 16, 8, 128), (4, 4096, 16, 8, 64), (8, 1024, 16, 8, 128)]  # B L Hq Hkv D
DECODE = [(1, 8192, 16, 8, 128), (8, 1024, 16, 8, 128), (64, 4096, 16, 8, 128),
          (8, 8192, 8, 8, 64), (256, 1024, 8, 8, 64)]


def kernel_us(fn, args, iters):
  """{kernel: median us} and their sum, CUPTI (as bench.common.kernel_medians_us)."""
  import statistics
  from jax.experimental.mosaic.gpu import profiler
  jax.block_until_ready(fn(*args))
  _, per_call = profiler.measure(fn, aggregate=False, iterations=iters)(*args)
  by_name = {}
  for call in per_call:
    for name, t in call:
      by_name.setdefault(name, []).append(float(t) * 1e3)
  med = {n: round(statistics.median(ts), 2) for n, ts in by_name.items()}
  return med, round(sum(med.values()), 2)


def train_rows(iters, segments):
  for B, L, Hq, Hkv, D in TRAIN:
    ks = jax.random.split(jax.random.key(L + D), 4)
    q = jax.random.normal(ks[0], (B, L, Hq, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, L, Hkv, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, L, Hkv, D), jnp.bfloat16)
    r = (0.3 * jax.random.normal(ks[3], (B, L, Hq, D))).astype(jnp.bfloat16)
    kw = {}
    if segments:  # four documents per row
      ids = jnp.asarray(np.repeat(np.arange(4), L // 4)[None].repeat(B, 0), jnp.int32)
      kw = dict(q_segment_ids=ids, kv_segment_ids=ids)
    for parallax in (True, False):
      rr = r if parallax else None
      fwd = jax.jit(lambda q, k, v, r: parallax_flash_attention(
          q, k, v, r, scale=1 / math.sqrt(D), causal=True, **kw))
      w = jnp.cos(jnp.arange(B * L * Hq * D, dtype=jnp.float32)).reshape(q.shape)
      bwd = jax.jit(jax.grad(lambda q, k, v, r: jnp.sum(
          parallax_flash_attention(q, k, v, r, scale=1 / math.sqrt(D), causal=True,
                                   **kw).astype(jnp.float32) * w), argnums=(0, 1, 2)))
      for poison in (False, True):
        vv = v.at[:, -1].set(jnp.nan) if poison else v
        for name, fn in (("fwd", fwd), ("fwd+bwd", bwd)):
          per, total = kernel_us(fn, (q, k, vv, rr), iters)
          row = dict(kind="train", pass_=name, B=B, L=L, Hq=Hq, Hkv=Hkv, D=D,
                     member="parallax" if parallax else "softmax", segments=segments,
                     nan_at_masked=poison, total_us=total, kernels_us=per)
          print(json.dumps(row), flush=True)
          yield row


def decode_rows(iters):
  for B, L, Hq, Hkv, D in DECODE:
    ks = jax.random.split(jax.random.key(B * 100003 + L + D), 4)
    q = jax.random.normal(ks[0], (B, Hq, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, L, Hkv, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, L, Hkv, D), jnp.bfloat16)
    r = (0.3 * jax.random.normal(ks[3], (B, Hq, D))).astype(jnp.bfloat16)
    lens = jnp.full((B,), L - 37, jnp.int32)    # the last tile is partly past lengths
    for parallax in (True, False):
      fn = jax.jit(lambda q, k, v, r: parallax_decode(q, k, v, r, scale=1 / math.sqrt(D),
                                                      lengths=lens))
      for poison in (False, True):
        kk = k.at[:, L - 37:].set(jnp.nan) if poison else k
        vv = v.at[:, L - 37:].set(jnp.nan) if poison else v
        per, total = kernel_us(fn, (q, kk, vv, r if parallax else None), iters)
        row = dict(kind="decode", B=B, L=L, Hq=Hq, Hkv=Hkv, D=D,
                   member="parallax" if parallax else "softmax", nan_past_lengths=poison,
                   total_us=total, kernels_us=per)
        print(json.dumps(row), flush=True)
        yield row


def _key(row):
  return tuple((k, v) for k, v in row.items() if k not in ("total_us", "kernels_us"))


def read_rows(path):
  """Rows of a --out JSON file, or of the JSON lines of a run's printed output."""
  with open(path) as f:
    text = f.read()
  try:
    return json.loads(text)["rows"]
  except (json.JSONDecodeError, KeyError):
    return [json.loads(l) for l in text.splitlines() if l.startswith("{")]


def table(before_path, after_path):
  """Markdown: total kernel us per shape, before and after, and the fixup launch's share."""
  before = {_key(r): r for r in read_rows(before_path)}
  lines = ["| kind | pass | B | L | D | member | docs | NaN masked | before us | after us | "
           "after/before | fixup us |", "|" + "---|" * 12]
  for r in read_rows(after_path):
    b = before.get(_key(r))
    if b is None:
      continue
    nan = r.get("nan_at_masked", r.get("nan_past_lengths"))
    fix = sum(t for n, t in r["kernels_us"].items() if "fixup" in n)
    lines.append(f"| {r['kind']} | {r.get('pass_', 'step')} | {r['B']} | {r['L']} | {r['D']} | "
                 f"{r['member']} | {'4' if r.get('segments') else '1'} | {'yes' if nan else 'no'} | "
                 f"{b['total_us']:.1f} | {r['total_us']:.1f} | {r['total_us'] / b['total_us']:.3f} "
                 f"| {fix:.1f} |")
  return "\n".join(lines) + "\n"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True, help="JSON file for the rows (markdown with --table)")
  ap.add_argument("--table", nargs=2, metavar=("BEFORE", "AFTER"),
                  help="write a before/after markdown table of two runs' rows instead")
  ap.add_argument("--iters", type=int, default=30)
  ap.add_argument("--only", choices=("train", "decode"), default=None)
  args = ap.parse_args()
  if args.table:
    with open(args.out, "w") as f:
      f.write(table(*args.table))
    return
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__,
        "pallas_kernels from", pallas_kernels.__file__, flush=True)
  rows = []
  if args.only in (None, "train"):
    rows += list(train_rows(args.iters, segments=False))
    rows += list(train_rows(args.iters, segments=True))
  if args.only in (None, "decode"):
    rows += list(decode_rows(args.iters))
  with open(args.out, "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
