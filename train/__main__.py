"""CLI: python -m train --config configs/tiny.py [--set key=value ...] [--print-config]

Every key, its type and default (from the chosen --config, or the built-in defaults) is
listed by --help. Overrides are parsed and validated before JAX is touched, so unknown keys
and bad values fail at once. Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (or run under SLURM / a TPU pod) and jax.distributed.initialize() is called
first; the rest is the same code path as one host.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _key_listing(cfg) -> str:
  from train.config import flat_keys
  lines = ["config keys (--set key=value; defaults from the --config file if given):"]
  for key, val, tp in flat_keys(cfg):
    lines.append(f"  {key:34s} {tp:24s} {val!r}")
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  from train.config import TrainConfig, apply_overrides, load_config_file
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--config", default=None)
  known, _ = pre.parse_known_args(argv)
  base = None
  base_err = None
  try:
    base = load_config_file(known.config) if known.config else TrainConfig()
  except ValueError as e:
    base_err = e
  ap = argparse.ArgumentParser(
      prog="python -m train", formatter_class=argparse.RawDescriptionHelpFormatter,
      description=__doc__, epilog=_key_listing(base or TrainConfig()))
  ap.add_argument("--config", default=None, help="preset file defining get_config()")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                  help="override a config key (repeatable), e.g. optimizer.lr=3e-3")
  ap.add_argument("--print-config", action="store_true", help="print the config and exit")
  args = ap.parse_args(argv)
  try:
    if base_err is not None:
      raise base_err
    cfg = apply_overrides(base, args.overrides)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    print(json.dumps(cfg.to_dict(), indent=1))
    return 0
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS"):
    import jax
    jax.distributed.initialize()
  from train.loop import train
  train(cfg)
  return 0


if __name__ == "__main__":
  sys.exit(main())
