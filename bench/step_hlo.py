"""Compile one training step of a preset and report what XLA made of it (no step is run).

    PYTHONPATH=. python bench/step_hlo.py [--config configs/qwen3_0p6b_parallax.py]
        [--set KEY=VALUE ...] [--out DIR]

Prints the custom-call kernels of the optimized HLO by target (Pallas Triton kernels by name,
Mosaic GPU kernels, cuBLAS / cuDNN calls) with their counts, and the compiled memory
analysis (argument, output, temporary bytes). A custom call that appears more often than the
model has layers x micro-batches (x 1 forward, x 2 backward kernels) was duplicated, e.g. by
a remat policy that does not save its outputs or by XLA's memory-driven rematerialisation.
--out also writes the optimized HLO text there.
"""
from __future__ import annotations

import argparse
import collections
import os
import re


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/qwen3_0p6b_parallax.py")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--out", default=None, help="write the optimized HLO text here")
  a = p.parse_args(argv)

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
  hlo = compiled.as_text()
  counts = collections.Counter()
  for line in hlo.splitlines():
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
      fh.write(hlo)


if __name__ == "__main__":
  main()
