"""CLI of the quality study. See docs/study.md.

    python -m train.study --grid configs/study/main.py --out runs/study [--time-budget 480]
        [--only 'parallax_*'] [--shard 0/2] [--max-runs N] [--jobs N] [--set key=value]
    python -m train.study plan   --grid configs/study/main.py --out runs/study
    python -m train.study report --out runs/study
    python -m train.study pack   --out runs/study --to $OUT/study.tar.gz

run (the default): the grid's pending runs, one after another through train.loop.train;
  finished runs are skipped, so the same command continues a study. --time-budget S / --stop-at
  EPOCH: no run starts that would not end in time and the run in progress is stopped (with a
  checkpoint) when time is up. --grid may be given several times (grids run in that order).
plan: what has run, what is pending, each arm's best lr so far; nothing is trained.
report: <out>/report.md and <out>/<grid>/*.png from every grid under --out.
pack: <out>'s results without checkpoints, as one .tar.gz (untar it in out's parent).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

COMMANDS = ("run", "plan", "report", "pack", "_run")


def _common(ap: argparse.ArgumentParser):
  ap.add_argument("--grid", action="append", default=[], help="grid file (repeatable)")
  ap.add_argument("--out", default="runs/study", help="study directory (default runs/study)")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                  help="config override for every run of the grid (changes the runs' identity)")


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  named = bool(argv) and argv[0] in COMMANDS
  cmd = argv.pop(0) if named else "run"
  # without a command the usage reads "[run]": run is the default, plan / report / pack the
  # others (the description lists all four)
  ap = argparse.ArgumentParser(prog=f"python -m train.study {cmd if named else '[run]'}",
                               description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  if cmd in ("run", "plan", "_run"):
    _common(ap)
  else:
    ap.add_argument("--out", default="runs/study")
  if cmd in ("run", "plan"):
    ap.add_argument("--only", action="append", default=[],
                    help="fnmatch pattern on arm or arm/lr<lr>_s<seed> (repeatable, or a,b)")
    ap.add_argument("--shard", default=None, help="i/n: this slice of the pending runs")
  if cmd == "run":
    ap.add_argument("--time-budget", type=float, default=None, metavar="S",
                    help="seconds from now in which to finish (runs that do not fit wait)")
    ap.add_argument("--stop-at", type=float, default=None, metavar="EPOCH",
                    help="as --time-budget, an absolute time (date +%%s)")
    ap.add_argument("--grace", type=float, default=60.0, metavar="S",
                    help="after the budget, seconds a run may take to stop before the "
                         "process exits (default 60)")
    ap.add_argument("--max-runs", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time on the device")
    ap.add_argument("--gpus", default=None,
                    help="comma-separated GPU ids: one run per GPU at a time (sets --jobs)")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--max-attempts", type=int, default=2)
    ap.add_argument("--no-compile-cache", action="store_true")
    ap.add_argument("--allow-data-change", action="store_true")
    ap.add_argument("--pack-to", default=None, metavar="TAR_GZ",
                    help="rewrite this pack (as `pack --to`) after every run that ends, so a "
                    "killed call still returns the runs it finished")
  if cmd == "_run":
    ap.add_argument("--arm", required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--stage", default="sweep")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--keep-checkpoints", action="store_true")
  if cmd == "pack":
    ap.add_argument("--to", required=True, help="the .tar.gz to write")
  if cmd == "report":
    ap.add_argument("--grid", action="append", default=[],
                    help="grid files, for arm notes and baselines (default: every grid file "
                         "in configs/study/ whose name matches a grid under --out)")
  a = ap.parse_args(argv)

  from train.study import grid as grid_lib
  from train.study import runner
  try:
    if os.path.exists(a.out) and not os.path.isdir(a.out):
      raise ValueError(f"--out: {a.out!r} is a file, not a study directory")
    if cmd in ("pack", "report") and not os.path.isdir(a.out):
      raise ValueError(f"--out: no study directory {a.out!r}")
    if cmd == "pack":
      runner.pack(a.out, a.to)
      return 0
    if cmd == "report":
      from train.study import report
      report.write_report(a.out, grid_files=a.grid)
      return 0
    if not a.grid:
      raise ValueError("--grid: at least one grid file is needed")
    grids = [grid_lib.load_grid(p) for p in a.grid]
    paths = {g.name: p for g, p in zip(grids, a.grid)}
    extra = tuple(a.overrides)
    if extra:  # a typo in --set is the command's error, not an arm that this version lacks
      from train.config import apply_overrides
      try:
        apply_overrides(grids[0].arms[0].config, list(extra))
      except ValueError as e:
        raise ValueError(f"--set: {e}") from None
    if cmd == "_run":
      g = grids[0]
      spec = grid_lib.RunSpec(g.name, a.arm, a.lr, a.seed, a.stage)
      opts = runner.RunOptions(out=a.out, extra=extra, jobs=a.jobs,
                               keep_checkpoints=a.keep_checkpoints)
      res = runner.run_one(g, spec, opts, runner.ensure_data(g, extra))
      return 0 if res["status"] in grid_lib.FINAL else 1
    only = tuple(p for item in a.only for p in item.split(",") if p)
    shard = grid_lib.parse_shard(a.shard) if a.shard else None
    if cmd == "plan":
      opts = runner.RunOptions(out=a.out, extra=extra, only=only, shard=shard, dry_run=True)
      runner.run_grids(grids, opts)
      return 0
    if a.time_budget is not None and a.stop_at is not None:
      raise ValueError("--time-budget: give it or --stop-at, not both")
    stop_at = a.stop_at if a.stop_at is not None else (
        time.time() + a.time_budget if a.time_budget is not None else None)
    if a.jobs < 1:
      raise ValueError(f"--jobs: must be >= 1, got {a.jobs}")
    gpus = tuple(x.strip() for x in (a.gpus or "").split(",") if x.strip())
    opts = runner.RunOptions(out=a.out, extra=extra, only=only, shard=shard, stop_at=stop_at,
                             grace_s=a.grace, max_runs=a.max_runs,
                             jobs=len(gpus) or a.jobs, gpus=gpus,
                             keep_checkpoints=a.keep_checkpoints, max_attempts=a.max_attempts,
                             compile_cache=not a.no_compile_cache,
                             allow_data_change=a.allow_data_change, pack_to=a.pack_to)
    runner.run_grids(grids, opts, paths=paths)
    return 0
  except (ValueError, runner.StudyError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
