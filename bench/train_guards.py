"""What the training loop's reliability guards cost.

    PYTHONPATH=. python bench/train_guards.py [--config qwen3_0p6b_parallax] [--batch 8]
        [--seq-len 4096] [--steps 10] [--shard-mb 256] [--out train_guards]

Three guards run on the training path (train/step.py, train/checkpoint.py, train/data.py):
- every step: the norm of the updated parameters (`param_norm`), so a non-finite update is
  caught before its state is kept or saved. Measured two ways: the step with and without it
  (the same jitted step; without, the metric is dropped and XLA removes the reduction), and
  the reduction alone over the parameters.
- every checkpoint save and restore: the state's fingerprint (two 32-bit sums of the raw
  bits of every array, and a finite check), one jitted pass over params + optimizer state.
- every shard, once per process when opened: CRC-32 and the token-id range (one read),
  timed on a synthetic shard of --shard-mb written to a temporary directory.
The steps train on random token ids (the guards' cost does not depend on the data).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import numpy as np
import optax

from bench import common


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="qwen3_0p6b_parallax")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq-len", type=int, default=4096)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--shard-mb", type=float, default=256)
  ap.add_argument("--out", default="train_guards")
  a = ap.parse_args(argv)

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
    def _train_step_impl(self, state, batch):
      state, metrics = super()._train_step_impl(state, batch)
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

  rows = []
  tr, st, t_with = step_times(Trainer)
  params = st["params"]
  t_norm = common.time_fn(jax.jit(optax.tree.norm), params)
  t_fp = common.time_fn(_fingerprint_jit, st)
  n_param = sum(x.size for x in jax.tree.leaves(params))
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(st))
  del tr, st, params
  _, _, t_without = step_times(WithoutGuard)

  # shard verification throughput (uncached: the module's cache is cleared first)
  import json
  import tempfile
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
  cmd = ("PYTHONPATH=. python bench/train_guards.py " + " ".join(
      f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()))
  common.write_results(a.out, env, rows, "\n".join(md), notes=f"Command: `{cmd}`")


if __name__ == "__main__":
  main()
