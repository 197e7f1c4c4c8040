"""A study grid: arms x learning rates x seeds, and the plan of runs it implies.

A grid file (`configs/study/<name>.py`) defines `get_grid() -> Grid`. Every arm has a base
`TrainConfig` and its own learning-rate sweep; the protocol is the same for every arm:

  stage 1 (sweep)   every lr of `arm.lrs` at seed `grid.sweep_seed`, the same number of steps
                    as the final runs (the sweep is read at the horizon that is reported);
  extension         when every sweep run has ended and the best final eval loss sits at an
                    edge of the lrs tried (the smallest, or the largest that did not diverge),
                    the next lr beyond that edge (x or / `grid.lr_step`) is added, at most
                    `grid.max_extra_lrs` times per arm, so the best lr is bracketed;
  stage 2 (seeds)   seeds 1 .. grid.seeds-1 at the arm's best lr (seed 0 is its sweep run);
                    `arm.seeds` replaces grid.seeds for one arm (give it to both arms of a
                    comparison alike).

The plan is a pure function of the grid and the results on disk, so a later invocation picks
up where the last stopped and a second stage appears by itself once its sweep is complete.
A run is identified by (arm, lr, seed); its config is the arm's config with `optimizer.lr`,
`run.seed` and `data.seed` set (both seeds: a seed changes the initialisation and the data
order; every arm sees the same data order at the same seed).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import math
import os
import re
import zlib
from typing import Any

from train.config import TrainConfig, apply_overrides

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
STATUSES = ("done", "diverged", "failed", "interrupted")
FINAL = ("done", "diverged")  # a run in one of these states is never run again


@dataclasses.dataclass(frozen=True)
class StudyData:
  """How the grid's token shards are made when `path` holds none (train.corpus):
  the installed Python text, deduplicated, cut at max_mb, tokenized with `tokenizer`."""
  path: str
  tokenizer: str
  corpus_dir: str
  max_mb: float = 300.0
  val_fraction: float = 0.02

  def __post_init__(self):
    for k in ("path", "tokenizer", "corpus_dir"):
      if not isinstance(getattr(self, k), str) or not getattr(self, k):
        raise ValueError(f"data.{k}: must be a non-empty path, got {getattr(self, k)!r}")
    if not self.max_mb > 0:
      raise ValueError(f"data.max_mb: must be > 0, got {self.max_mb!r}")
    if not 0 < self.val_fraction < 1:
      raise ValueError(f"data.val_fraction: must be in (0, 1), got {self.val_fraction!r}")


@dataclasses.dataclass(frozen=True)
class Arm:
  """One model x optimizer recipe. overrides: `--set`-style strings applied to `config`; a
  key the config does not have (a feature not in this version) makes the arm unavailable,
  reported with the one-line error, instead of failing the grid. baseline: the arm it is
  compared with in the report: an arm of this grid, or '<grid>/<arm>' of another. longer_of:
  '<grid>/<arm>' of the same recipe at fewer tokens (the report's token-efficiency table
  interpolates between the two lengths). seeds: the grid's seed count for this arm only."""
  name: str
  config: TrainConfig
  lrs: tuple[float, ...]
  overrides: tuple[str, ...] = ()
  baseline: str | None = None
  note: str = ""
  longer_of: str | None = None
  seeds: int | None = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not NAME_RE.match(self.name):
      raise ValueError(f"arm.name: {self.name!r} must match {NAME_RE.pattern}")
    if not isinstance(self.config, TrainConfig):
      raise ValueError(f"arm {self.name}: config must be a TrainConfig, got "
                       f"{type(self.config).__name__}")
    lrs = tuple(self.lrs)
    if not lrs or not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0
                          for x in lrs):
      raise ValueError(f"arm {self.name}: lrs must be finite numbers > 0, got {self.lrs!r}")
    if len({lr_key(x) for x in lrs}) != len(lrs):
      raise ValueError(f"arm {self.name}: lrs has duplicates: {self.lrs!r}")
    object.__setattr__(self, "lrs", tuple(float(x) for x in lrs))
    object.__setattr__(self, "overrides", tuple(self.overrides))
    if self.longer_of is not None and not (
        isinstance(self.longer_of, str) and self.longer_of.count("/") == 1
        and all(NAME_RE.match(x) for x in self.longer_of.split("/"))):
      raise ValueError(f"arm {self.name}: longer_of must be '<grid>/<arm>', got "
                       f"{self.longer_of!r}")
    if self.seeds is not None and (isinstance(self.seeds, bool) or
                                   not isinstance(self.seeds, int) or self.seeds < 1):
      raise ValueError(f"arm {self.name}: seeds must be an int >= 1, got {self.seeds!r}")


@dataclasses.dataclass(frozen=True)
class Grid:
  name: str
  arms: tuple[Arm, ...]
  seeds: int = 2
  sweep_seed: int = 0
  lr_step: float = 2.0
  max_extra_lrs: int = 2
  min_lrs: int = 3
  data: StudyData | None = None
  description: str = ""
  # whether the report's table of the paper's claims reads this grid's arms: off for a grid
  # that reruns arms outside the sweep protocol (another length, one lr)
  claims: bool = True

  def __post_init__(self):
    if not isinstance(self.name, str) or not NAME_RE.match(self.name):
      raise ValueError(f"grid.name: {self.name!r} must match {NAME_RE.pattern}")
    object.__setattr__(self, "arms", tuple(self.arms))
    if not self.arms:
      raise ValueError(f"grid {self.name}: arms: at least one arm is needed")
    names = [a.name for a in self.arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
      raise ValueError(f"grid {self.name}: arms: duplicate names {dup}")
    for a in self.arms:
      if a.baseline is not None and "/" not in a.baseline and a.baseline not in names:
        raise ValueError(f"grid {self.name}: arm {a.name}: baseline {a.baseline!r} is not an "
                         f"arm of this grid")
      if len(a.lrs) < self.min_lrs:
        raise ValueError(f"grid {self.name}: arm {a.name}: lrs has {len(a.lrs)} values, "
                         f"min_lrs is {self.min_lrs}")
    for k, lo in (("seeds", 1), ("sweep_seed", 0), ("max_extra_lrs", 0), ("min_lrs", 1)):
      v = getattr(self, k)
      if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"grid.{k}: must be an int >= {lo}, got {v!r}")
    if not (isinstance(self.lr_step, (int, float)) and self.lr_step > 1):
      raise ValueError(f"grid.lr_step: must be > 1, got {self.lr_step!r}")

  def arm(self, name: str) -> Arm:
    for a in self.arms:
      if a.name == name:
        return a
    raise ValueError(f"grid {self.name}: no arm {name!r} (arms: {[a.name for a in self.arms]})")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One planned run. stage: 'sweep', 'extend' or 'seed'; order: its place in the plan."""
  grid: str
  arm: str
  lr: float
  seed: int
  stage: str

  @property
  def name(self) -> str:
    return f"lr{lr_key(self.lr)}_s{self.seed}"

  @property
  def run_id(self) -> str:
    return f"{self.arm}/{self.name}"

  def run_dir(self, out: str) -> str:
    return os.path.join(out, self.grid, self.arm, self.name)


def lr_key(lr: float) -> str:
  """Canonical text of a learning rate (4 significant digits): run names and lookups."""
  return f"{lr:.4g}"


def load_grid(path: str) -> Grid:
  if not os.path.isfile(path):
    raise ValueError(f"--grid: no such file {path!r}")
  spec = importlib.util.spec_from_file_location(
      "_study_grid_" + os.path.basename(path).removesuffix(".py"), path)
  if not path.endswith(".py") or spec is None:
    raise ValueError(f"--grid: {path} is not a Python grid file (*.py with get_grid())")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if not hasattr(mod, "get_grid"):
    raise ValueError(f"--grid: {path} defines no get_grid()")
  grid = mod.get_grid()
  if not isinstance(grid, Grid):
    raise ValueError(f"--grid: {path}: get_grid() returned {type(grid).__name__}, not a Grid")
  return grid


def arm_config(arm: Arm, extra: tuple[str, ...] = ()) -> TrainConfig:
  """The arm's config with its overrides and the command line's `--set`s (ValueError names
  the bad key)."""
  cfg = apply_overrides(arm.config, list(arm.overrides) + list(extra))
  return dataclasses.replace(cfg, name=arm.name)


def run_config(grid: Grid, spec: RunSpec, out: str, extra: tuple[str, ...] = ()) -> TrainConfig:
  cfg = arm_config(grid.arm(spec.arm), extra)
  return apply_overrides(cfg, [f"optimizer.lr={spec.lr!r}", f"run.seed={spec.seed}",
                               f"data.seed={spec.seed}", f"run.out_dir={spec.run_dir(out)}",
                               f"name={grid.name}/{spec.run_id}"])


def available_arms(grid: Grid, extra: tuple[str, ...] = ()) -> dict[str, str | None]:
  """arm name -> None when its config builds, else the one-line reason it does not."""
  out = {}
  for a in grid.arms:
    try:
      arm_config(a, extra)
      out[a.name] = None
    except ValueError as e:
      out[a.name] = str(e)
  return out


# --------------------------------------------------------------------------- planning
@dataclasses.dataclass
class ArmPlan:
  """Where one arm stands. lrs: every lr in its sweep so far (listed ones, then extensions);
  best: the sweep's best lr once the sweep is complete; edge: the best is still at an edge
  with no extension left; runs: its planned runs in order."""
  arm: str
  lrs: list[float]
  runs: list[RunSpec]
  best: float | None = None
  edge: str | None = None
  complete: bool = False
  unavailable: str | None = None


def _loss(result: dict | None) -> float | None:
  """The ranking value of a finished run: its final eval loss (inf when it diverged)."""
  if result is None or result.get("status") not in FINAL:
    return None
  if result["status"] == "diverged":
    return math.inf
  v = result.get("eval_loss")
  return float(v) if v is not None and math.isfinite(v) else math.inf


def plan_arm(grid: Grid, arm: Arm, results: dict[str, dict]) -> ArmPlan:
  """results: run_id -> result dict (see train.study.results). Pure: no disk access."""
  mk = lambda lr, seed, stage: RunSpec(grid.name, arm.name, lr, seed, stage)  # noqa: E731
  lrs = list(arm.lrs)
  runs = [mk(lr, grid.sweep_seed, "sweep") for lr in lrs]
  plan = ArmPlan(arm.name, lrs, runs)
  while True:
    losses = {lr: _loss(results.get(mk(lr, grid.sweep_seed, "sweep").run_id)) for lr in lrs}
    if any(v is None for v in losses.values()):
      return plan  # the sweep is still running
    finite = {lr: v for lr, v in losses.items() if math.isfinite(v)}
    order = sorted(lrs)
    if finite:
      best = min(finite, key=lambda lr: (finite[lr], lr))
      edge = (None if len(order) < 2 else "low" if best == order[0] else
              "high" if best == order[-1] else None)
    else:  # everything diverged: look below
      best, edge = None, "low"
    if edge is None or len(lrs) - len(arm.lrs) >= grid.max_extra_lrs:
      plan.best, plan.edge = best, edge
      break
    new = order[0] / grid.lr_step if edge == "low" else order[-1] * grid.lr_step
    lrs.append(new)
    runs.append(mk(new, grid.sweep_seed, "extend"))
  if plan.best is not None:
    seeds = grid.seeds if arm.seeds is None else arm.seeds
    runs.extend(mk(plan.best, s, "seed") for s in range(seeds) if s != grid.sweep_seed)
  plan.complete = plan.best is None or all(_loss(results.get(r.run_id)) is not None
                                           for r in runs)
  return plan


def plan_grid(grid: Grid, results: dict[str, dict],
              extra: tuple[str, ...] = ()) -> list[ArmPlan]:
  avail = available_arms(grid, extra)
  plans = []
  for a in grid.arms:
    if avail[a.name] is not None:
      plans.append(ArmPlan(a.name, list(a.lrs), [], unavailable=avail[a.name]))
    else:
      plans.append(plan_arm(grid, a, results))
  return plans


STAGE_RANK = {"sweep": 0, "extend": 1, "seed": 2}


def pending(grid: Grid, plans: list[ArmPlan], results: dict[str, dict],
            max_attempts: int = 2) -> list[RunSpec]:
  """Runs still to do, in the order to run them: sweeps before extensions before seeds,
  one arm's runs together (they share compiled executables through the persistent
  compilation cache: evaluation, diagnostics, and the train step between seeds), arms in
  grid order. A run that failed `max_attempts` times is left out (and reported)."""
  arm_index = {a.name: i for i, a in enumerate(grid.arms)}
  todo = []
  for p in plans:
    for pos, r in enumerate(p.runs):
      res = results.get(r.run_id)
      if res is not None and res.get("status") in FINAL:
        continue
      if res is not None and res.get("status") == "failed" and \
         res.get("failures", 1) >= max_attempts:
        continue
      todo.append((STAGE_RANK[r.stage], arm_index[r.arm], pos, r))
  return [r for *_, r in sorted(todo, key=lambda t: t[:3])]


# --------------------------------------------------------------------------- selection
def parse_shard(text: str) -> tuple[int, int]:
  m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
  if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
    raise ValueError(f"--shard: expected i/n with 0 <= i < n, got {text!r}")
  return int(m.group(1)), int(m.group(2))


def select(runs: list[RunSpec], only: tuple[str, ...] = (),
           shard: tuple[int, int] | None = None) -> list[RunSpec]:
  """only: fnmatch patterns on 'arm/lr..._s..' run ids (a bare arm name matches its runs);
  shard (i, n): the runs whose crc32(grid/run_id) % n == i, stable as the plan grows."""
  out = []
  for r in runs:
    if only and not any(fnmatch.fnmatchcase(r.run_id, p) or fnmatch.fnmatchcase(r.arm, p)
                        for p in only):
      continue
    if shard is not None and zlib.crc32(f"{r.grid}/{r.run_id}".encode()) % shard[1] != shard[0]:
      continue
    out.append(r)
  return out


def describe(grid: Grid, plans: list[ArmPlan], results: dict[str, dict]) -> list[str]:
  """One line per arm: its lrs and each run's state (for `plan` and the runner's log)."""
  lines = []
  for p in plans:
    if p.unavailable:
      lines.append(f"  {p.arm}: unavailable ({p.unavailable.split(';')[0]})")
      continue
    states = []
    for r in p.runs:
      res = results.get(r.run_id)
      st = res.get("status") if res else "todo"
      loss = res.get("eval_loss") if res else None
      states.append(f"{r.name}:{st}" + (f"={loss:.4f}" if isinstance(loss, float) else ""))
    tail = (f" best lr {lr_key(p.best)}" if p.best is not None else "") + \
           (f" (at the {p.edge} edge)" if p.edge and p.best is not None else "") + \
           (" complete" if p.complete else "")
    lines.append(f"  {p.arm}: {' '.join(states)}{tail}")
  return lines


def as_dict(spec: RunSpec) -> dict[str, Any]:
  return {"grid": spec.grid, "arm": spec.arm, "lr": spec.lr, "seed": spec.seed,
          "stage": spec.stage, "run_id": spec.run_id}
