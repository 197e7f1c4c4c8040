"""CLI: python -m train [--config tiny | configs/tiny.py] [--set key=value ...] [--print-config]

--config takes a preset file or the name of a preset shipped with the package (`tiny`,
`tiny_softmax`, `qwen3_0p6b_parallax`, ...; default `tiny`, the CPU demo). Every key, its
type and value (from the chosen preset) is listed by --help. Overrides are parsed and
validated before JAX is touched, so unknown keys and bad values fail at once. Errors a user
can fix are one line on stderr: exit status 2 for bad arguments and config values, 1 for
data, checkpoint, mesh and divergence errors. Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
and JAX_PROCESS_ID (or run under SLURM / a TPU pod) and jax.distributed.initialize() is
called first; the rest is the same code path as one host.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_PRESET = "tiny"


def _key_listing(cfg) -> str:
  from train.config import flat_keys
  lines = ["config keys (--set key=value; values from the --config preset):"]
  for key, val, tp in flat_keys(cfg):
    lines.append(f"  {key:34s} {tp:24s} {val!r}")
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  from train.config import TrainConfig, apply_overrides, load_config_file, preset_names
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--config", default=DEFAULT_PRESET)
  known, _ = pre.parse_known_args(argv)
  base = None
  base_err = None
  try:
    base = load_config_file(known.config)
  except ValueError as e:
    base_err = e
  ap = argparse.ArgumentParser(
      prog="python -m train", formatter_class=argparse.RawDescriptionHelpFormatter,
      description=__doc__, epilog=_key_listing(base or TrainConfig()))
  ap.add_argument("--config", default=DEFAULT_PRESET,
                  help=f"preset file or name (default {DEFAULT_PRESET}; presets: "
                       f"{', '.join(preset_names())})")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                  help="override a config key (repeatable), e.g. optimizer.lr=3e-3")
  ap.add_argument("--print-config", action="store_true", help="print the config and exit")
  args = ap.parse_args(argv)
  try:
    if base_err is not None:
      raise base_err
    cfg = apply_overrides(base, args.overrides)
    keys = {item.split("=", 1)[0].strip() for item in args.overrides}
    if "data.path" in keys and "data.auto_prepare" not in keys and cfg.data.auto_prepare:
      # a data.path given by hand names data the user has: a typo must not be filled with
      # the preset's demo corpus (the loop then says how to prepare it, or to opt in)
      import dataclasses
      cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, auto_prepare=False))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    print(json.dumps(cfg.to_dict(), indent=1))
    return 0
  from train.checkpoint import (CheckpointCorruptError, CheckpointSaveError,
                                NonFiniteStateError)
  from train.loop import DeviceMemoryError, NonFiniteLossError, train
  from train.run_lock import RunDirInUseError
  try:
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS"):
      import jax
      jax.distributed.initialize()
    train(cfg)
  except (ValueError, OSError, NonFiniteLossError, NonFiniteStateError,
          CheckpointCorruptError, CheckpointSaveError, DeviceMemoryError,
          RunDirInUseError) as e:
    # What a user can act on (a config key, a file, a diverged run): one line, no traceback.
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
