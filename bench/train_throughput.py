"""Training throughput of the 0.6B presets: tokens/s, step time and MFU, Parallax vs softmax.

    PYTHONPATH=. python bench/train_throughput.py [--steps 30] [--batch 8] [--out DIR]

Runs the real training loop (`train.loop.train`) on the stdlib shards (prepared on first use;
token ids < 1024 are valid in the 151,936-entry vocabulary) at L=4096 for each preset, in one
process, and reports the median of the logged windows after the compiling first step. MFU is
the loop's: model FLOPs per token (the model's FLOP function, counting Parallax's extra
attention matmuls) x tokens/s over the device's dense bf16 peak. Its attention term counts
every causal (query, key) pair of the 4096-token rows, the usual convention; the training rows
pack several documents and the kernels skip tiles of pairs across documents, so the table also
gives "MFU in-doc": the same step time over FLOPs that count only pairs inside one document
(the mean visible context of the batches trained on, `in_document_context`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

from bench import common

PRESETS = ("qwen3_0p6b_parallax", "qwen3_0p6b_softmax")


def in_document_context(path: str, seq_len: int, batch: int, batches: int) -> float:
  """Mean keys a query sees inside its own document (causal) over the first `batches`
  batches of the training stream (seed 0, as the loop reads it); packed ids are runs."""
  from bench import common
  from train.data import make_dataset
  it = iter(make_dataset(path, split="train", seq_len=seq_len, batch_size=batch, seed=0,
                         prefetch=0))
  import numpy as np
  return common.document_context(np.concatenate([next(it)["segment_ids"]
                                                 for _ in range(batches)]))


def report(name, env, rows, presets, *, data, batch, steps, overrides, grad_accum):
  """Add the in-document MFU to `rows` and write bench/results/<name>.json and .md."""
  from bench import common
  from train.config import load_config_file
  from parallax_jax.models.qwen3 import flops_per_token
  ctx = in_document_context(data, 4096, batch, steps)
  for r, preset in zip(rows, presets):
    if "mfu" in r:
      m = load_config_file(f"configs/{preset}.py").model
      frac = (flops_per_token(m, r["seq_len"], training=True, context=ctx)
              / flops_per_token(m, r["seq_len"], training=True))
      r["in_document_context"], r["mfu_in_doc"] = ctx, r["mfu"] * frac
  ok = [r for r in rows if "step_time_s" in r]
  ratio = ""
  if len(ok) == 2:
    ratio = (f"Parallax / softmax step-time ratio: "
             f"{ok[0]['step_time_s'] / ok[1]['step_time_s']:.3f}")
  head = ["preset", "batch x L", "tokens/s", "step s", "MFU", "MFU in-doc", "loss first -> last",
          "note"]
  md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    md.append(f"| {r['preset']} | {r['batch']} x {r['seq_len']} | {r.get('tokens_per_s', 0):,.0f} | "
              f"{r.get('step_time_s', float('nan')):.3f} | {r.get('mfu', float('nan')):.1%} | "
              f"{r.get('mfu_in_doc', float('nan')):.1%} | "
              f"{r.get('first_loss', float('nan')):.3f} -> {r.get('last_loss', float('nan')):.3f} | "
              f"{r.get('error', '')} |")
  if overrides:
    ratio += f"\nOverrides: {' '.join(overrides)}; grad_accum {grad_accum}."
  common.write_results(name, env, rows, "\n".join(md), ratio)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=30, help="optimizer steps per preset (default 30)")
  p.add_argument("--batch", type=int, default=8, help="global batch in sequences of 4096 (default 8)")
  p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
  p.add_argument("--data", default="data/stdlib", help="token shards (prepared if missing)")
  p.add_argument("--presets", nargs="*", default=list(PRESETS))
  p.add_argument("--name", default="train_throughput", help="results file stem under bench/results")
  p.add_argument("--out", default=None, help="also copy the result files here (e.g. $OUT)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="extra config override for every preset (e.g. model.remat_policy=dots_attn)")
  a = p.parse_args(argv)

  import jax
  from train import prepare
  from train.config import apply_overrides, load_config_file
  from train.loop import train

  if not os.path.exists(os.path.join(a.data, "meta.json")):
    prepare.main(["--out", a.data])
  env = common.environment()
  rows = []
  for name in a.presets:
    cfg = load_config_file(f"configs/{name}.py")
    out_dir = f"runs/bench_{name}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = apply_overrides(cfg, [
        f"data.path={a.data}", f"run.steps={a.steps}", f"data.global_batch_size={a.batch}",
        f"data.grad_accum={a.grad_accum}", "schedule.warmup_steps=5", "run.eval_every=0",
        "run.diag_every=0", "run.sample_lines=0", "run.log_every=5", f"run.out_dir={out_dir}",
        "run.resume=false", *a.overrides])
    row = {"preset": name, "overrides": a.overrides, "batch": a.batch, "seq_len": cfg.data.seq_len, "grad_accum": a.grad_accum,
           "attention": cfg.model.attention, "implementation": str(cfg.model.implementation),
           "remat": str(cfg.model.remat_policy), "steps": a.steps, "devices": jax.device_count()}
    try:
      res = train(cfg)
      hist = [h for h in res["history"] if "tokens_per_s" in h][1:]  # drop the first window
      row["tokens_per_s"] = statistics.median(h["tokens_per_s"] for h in hist)
      row["step_time_s"] = statistics.median(h["step_time_s"] for h in hist)
      if all("mfu" in h for h in hist):
        row["mfu"] = statistics.median(h["mfu"] for h in hist)
      row["first_loss"] = res["losses"][min(res["losses"])]
      row["last_loss"] = res["losses"][max(res["losses"])]
    except Exception as e:  # record and go on: one failing preset must not hide the other
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    rows.append(row)
    print(row, flush=True)
  report(a.name, env, rows, a.presets, data=a.data, batch=a.batch, steps=a.steps,
         overrides=a.overrides, grad_accum=a.grad_accum)
  if a.out:
    for ext in ("json", "md"):
      shutil.copy(f"bench/results/{a.name}.{ext}", a.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
