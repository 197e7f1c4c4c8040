"""Training-step benchmarks of the 0.6B presets. Modes:

  throughput  tokens/s, step time and MFU of the real training loop, Parallax vs softmax
              (bench/results/train_throughput; --name: train_fsdp_scaling's runs)
  guards      what the training loop's reliability guards cost (train_guards)
  hlo         compile one step and list what XLA made of it (no step is run; prints)

  PYTHONPATH=. python bench/train_step.py throughput [--steps 30] [--batch 8] [--out DIR]
  PYTHONPATH=. python bench/train_step.py guards [--config qwen3_0p6b_parallax] [--steps 10]
  PYTHONPATH=. python bench/train_step.py hlo [--config configs/qwen3_0p6b_parallax.py]
      [--set KEY=VALUE ...] [--out DIR]
  PYTHONPATH=. python bench/train_step.py MODE --help
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import sys
import time

from bench import common

PRESETS = ("qwen3_0p6b_parallax", "qwen3_0p6b_softmax")


# ----------------------------------------------------------------------------- throughput


def in_document_context(path: str, seq_len: int, batch: int, batches: int) -> float:
  """Mean keys a query sees inside its own document (causal) over the first `batches`
  batches of the training stream (seed 0, as the loop reads it); packed ids are runs."""
  import numpy as np
  from train.data import make_dataset
  it = iter(make_dataset(path, split="train", seq_len=seq_len, batch_size=batch, seed=0,
                         prefetch=0))
  return common.document_context(np.concatenate([next(it)["segment_ids"]
                                                 for _ in range(batches)]))


def report(name, env, rows, presets, *, data, batch, steps, overrides, grad_accum, out):
  """Add the in-document MFU to `rows` and write bench/results/<name>.json and .md."""
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
  common.write_results(name, env, rows, "\n".join(md), ratio, out=out)


def throughput(a):
  """Runs the real training loop (`train.loop.train`) on the stdlib shards (prepared on first
  use; token ids < 1024 are valid in the 151,936-entry vocabulary) at L=4096 for each preset,
  in one process, and reports the median of the logged windows after the compiling first
  step. MFU is the loop's: model FLOPs per token (the model's FLOP function, counting
  Parallax's extra attention matmuls) x tokens/s over the device's dense bf16 peak. Its
  attention term counts every causal (query, key) pair of the 4096-token rows, the usual
  convention; the training rows pack several documents and the kernels skip tiles of pairs
  across documents, so the table also gives "MFU in-doc": the same step time over FLOPs that
  count only pairs inside one document (the mean visible context of the batches trained on,
  `in_document_context`)."""
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
         overrides=a.overrides, grad_accum=a.grad_accum, out=a.out)


# ----------------------------------------------------------------------------- guards


def guards(a):
  """Three guards run on the training path (train/step.py, train/checkpoint.py,
  train/data.py):
  - every step: the norm of the updated parameters (`param_norm`), so a non-finite update is
    caught before its state is kept or saved. Measured two ways: the step with and without
    it (the same jitted step; without, the metric is dropped and XLA removes the reduction),
    and the reduction alone over the parameters.
  - every checkpoint save and restore: the state's fingerprint (two 32-bit sums of the raw
    bits of every array, and a finite check), one jitted pass over params + optimizer state.
  - every shard, once per process when opened: CRC-32 and the token-id range (one read),
    timed on a synthetic shard of --shard-mb written to a temporary directory.
  The steps train on random token ids (the guards' cost does not depend on the data)."""
  import json
  import tempfile

  import jax
  import numpy as np
  import optax
  from parallax_jax.models.checkpoint import _fingerprint_jit
  from train import data as data_lib
  from train.config import load_config_file
  from train.mesh import make_mesh
  from train.step import Trainer

  cfg = load_config_file(a.config)
  cfg = dataclasses.replace(
      cfg, data=dataclasses.replace(cfg.data, seq_len=a.seq_len, global_batch_size=a.batch,
                                    grad_accum=1),
      schedule=dataclasses.replace(cfg.schedule, warmup_steps=1))
  mesh = make_mesh(cfg.mesh)
  rng = np.random.default_rng(0)
  host = []
  for _ in range(a.steps + 1):
    ids = rng.integers(0, cfg.model.vocab_size, (a.batch, a.seq_len + 1), dtype=np.int32)
    host.append({"inputs": ids[:, :-1], "targets": ids[:, 1:],
                 "segment_ids": np.ones((a.batch, a.seq_len), np.int32),
                 "positions": np.broadcast_to(np.arange(a.seq_len, dtype=np.int32),
                                              (a.batch, a.seq_len)).copy()})

  class WithoutGuard(Trainer):
    def _train_step_impl(self, state, batch, *args):
      state, metrics = super()._train_step_impl(state, batch, *args)
      metrics.pop("param_norm")  # unused output: XLA drops the reduction
      return state, metrics

  def step_times(trainer_cls):
    tr = trainer_cls(cfg, mesh)
    st = tr.init_state(0)
    batches = [tr.device_batch(h, accum=1) for h in host]
    st, m = tr.train_step(st, batches[0])  # compile
    jax.block_until_ready((st, m))
    times = []
    for b in batches[1:]:
      t0 = time.perf_counter()
      st, m = tr.train_step(st, b)
      jax.block_until_ready((st, m))
      times.append(time.perf_counter() - t0)
    return tr, st, times

  tr, st, t_with = step_times(Trainer)
  params = st["params"]
  t_norm = common.time_fn(jax.jit(optax.tree.norm), params)
  t_fp = common.time_fn(_fingerprint_jit, st)
  n_param = sum(x.size for x in jax.tree.leaves(params))
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(st))
  del tr, st, params
  _, _, t_without = step_times(WithoutGuard)

  # shard verification throughput (uncached: the module's cache is cleared first)
  with tempfile.TemporaryDirectory() as tmp:
    n = int(a.shard_mb * 1e6) // 2
    rng.integers(0, 1024, n, dtype=np.uint16).tofile(os.path.join(tmp, "s.bin"))
    np.save(os.path.join(tmp, "s.offsets.npy"), np.asarray([0, n], np.int64))
    meta = {"format": data_lib.FORMAT, "dtype": "uint16", "vocab_size": 1024, "eos_id": 0,
            "splits": {"train": ["s"]},
            "checksums": {"s": {"bin": data_lib.crc32_file(os.path.join(tmp, "s.bin")),
                                "offsets": data_lib.crc32_file(os.path.join(tmp,
                                                                            "s.offsets.npy"))}}}
    json.dump(meta, open(os.path.join(tmp, "meta.json"), "w"))
    nbytes = 2 * n
    data_lib._verified.clear()
    t0 = time.perf_counter()
    data_lib.check_shard(tmp, "s", meta, verify=True)
    t_shards = time.perf_counter() - t0

  med = statistics.median
  env = common.environment()
  rows = [
      {"guard": "param_norm in the train step", "when": "every step",
       "step_with_s": med(t_with), "step_without_s": med(t_without),
       "overhead_pct": 100 * (med(t_with) / med(t_without) - 1),
       "step_with_all_s": t_with, "step_without_all_s": t_without},
      {"guard": "param_norm alone", "when": "every step", "seconds": t_norm,
       "params": n_param},
      {"guard": "state fingerprint", "when": "each save and restore", "seconds": t_fp,
       "state_bytes": state_bytes},
      {"guard": "shard CRC-32 + id range", "when": "each shard, once per process",
       "seconds": t_shards, "bytes": nbytes, "gb_per_s": nbytes / t_shards / 1e9},
  ]
  md = ["| guard | when | cost |", "|---|---|---|",
        f"| `param_norm` in the step | every step | step {med(t_with) * 1e3:.1f} ms with vs "
        f"{med(t_without) * 1e3:.1f} ms without ({rows[0]['overhead_pct']:+.2f}%; medians of "
        f"{a.steps} steps, {a.config}, batch {a.batch} x {a.seq_len}) |",
        f"| `param_norm` alone | every step | {t_norm * 1e3:.2f} ms ({n_param / 1e6:.0f}M "
        f"float32 parameters) |",
        f"| state fingerprint | each checkpoint save / restore | {t_fp * 1e3:.2f} ms "
        f"({state_bytes / 1e9:.2f} GB of state) |",
        f"| shard CRC-32 + id range | each shard once per process | {t_shards:.2f} s for "
        f"{nbytes / 1e6:.1f} MB ({nbytes / t_shards / 1e9:.2f} GB/s, host) |"]
  # every setting spelled out, defaults included (the header's command has only those given)
  cmd = "PYTHONPATH=. python bench/train_step.py guards " + " ".join(
      f"--{k} {getattr(a, k.replace('-', '_'))}"
      for k in ("config", "batch", "seq-len", "steps", "shard-mb"))
  common.write_results(a.name, env, rows, "\n".join(md), notes=f"Settings: `{cmd}`", out=a.out)


# ----------------------------------------------------------------------------- hlo


def hlo(a):
  """Prints the custom-call kernels of the optimized HLO by target (Pallas Triton kernels by
  name, Mosaic GPU kernels, cuBLAS / cuDNN calls) with their counts, and the compiled memory
  analysis (argument, output, temporary bytes). A custom call that appears more often than
  the model has layers x micro-batches (x 1 forward, x 2 backward kernels) was duplicated,
  e.g. by a remat policy that does not save its outputs or by XLA's memory-driven
  rematerialisation. --out also writes the optimized HLO text there."""
  import collections
  import re

  import jax
  import jax.numpy as jnp
  from train.config import apply_overrides, load_config_file
  from train.mesh import make_mesh
  from train.step import BATCH_KEYS, Trainer

  cfg = apply_overrides(load_config_file(a.config), a.overrides)
  trainer = Trainer(cfg, make_mesh(cfg.mesh))
  accum = cfg.data.grad_accum
  shape = (accum, cfg.data.global_batch_size // accum, cfg.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=trainer.batch_shardings[k])
           for k in BATCH_KEYS}
  with trainer.context():
    compiled = trainer._train_step.lower(trainer.abstract_state_with_shardings(), batch,
                                        trainer.peak_lr).compile()
  text = compiled.as_text()
  counts = collections.Counter()
  for line in text.splitlines():
    m = re.search(r'custom_call_target="([^"]+)"', line)
    if not m:
      continue
    target = m.group(1)
    # Pallas kernels: the op_name ends in "<kernel name>/pallas_call"
    name = re.search(r'op_name="[^"]*/([A-Za-z0-9_]+)/(?:pallas_call|mpmd_map)"', line)
    if name:
      target = f"{target}:{name.group(1)}"
    counts[target] += 1
  print(f"{cfg.name}: layers {cfg.model.num_layers}, micro-batches {accum}, "
        f"scan_layers {cfg.model.scan_layers}, remat {cfg.model.remat_policy}")
  print("custom calls in the optimized HLO (a scanned layer body counts once):")
  for t, n in counts.most_common():
    print(f"  {n:4d}  {t}")
  mem = compiled.memory_analysis()
  if mem is not None:
    for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes"):
      print(f"  {k}: {getattr(mem, k, 0) / 2**30:.2f} GiB")
  if a.out:
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{cfg.name}.hlo.txt"), "w") as fh:
      fh.write(text)


# ----------------------------------------------------------------------------- command line


def parser():
  ap, modes = common.mode_parser(__doc__)
  overrides = dict(dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  p = common.add_mode(modes, "throughput", throughput, "training throughput of the 0.6B "
                      "presets: tokens/s, step time and MFU, Parallax vs softmax "
                      "(bench/results/train_throughput)")
  p.add_argument("--steps", type=int, default=30, help="optimizer steps per preset (default 30)")
  p.add_argument("--batch", type=int, default=8, help="global batch in sequences of 4096 (default 8)")
  p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
  p.add_argument("--data", default="data/stdlib", help="token shards (prepared if missing)")
  p.add_argument("--presets", nargs="*", default=list(PRESETS))
  p.add_argument("--name", default="train_throughput", help="results file stem under bench/results")
  p.add_argument("--out", default=None, help="also copy the result files here (e.g. $OUT)")
  p.add_argument("--set", **overrides,
                 help="extra config override for every preset (e.g. model.remat_policy=dots_attn)")
  p = common.add_mode(modes, "guards", guards, "what the training loop's reliability guards "
                      "cost: per-step parameter norm, state fingerprint, shard check "
                      "(bench/results/train_guards)")
  p.add_argument("--config", default="qwen3_0p6b_parallax", help="preset name or file")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=4096)
  p.add_argument("--steps", type=int, default=10, help="timed steps, with and without the guard")
  p.add_argument("--shard-mb", type=float, default=256, help="size of the synthetic shard")
  p.add_argument("--name", default="train_guards", help="results file stem under bench/results")
  p.add_argument("--out", default=None, help="also copy the result files here (e.g. $OUT)")
  p = common.add_mode(modes, "hlo", hlo, "compile one training step of a preset and report "
                      "what XLA made of it (no step is run)")
  p.add_argument("--config", default="configs/qwen3_0p6b_parallax.py", help="preset name or file")
  p.add_argument("--set", **overrides)
  p.add_argument("--out", default=None, help="write the optimized HLO text here")
  return ap


def main(argv=None):
  a = parser().parse_args(argv)
  a.run(a)
  return 0


if __name__ == "__main__":
  sys.exit(main())
