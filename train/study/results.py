"""What a study run leaves on disk, and reading it back.

<out>/<grid>/<arm>/lr<lr>_s<seed>/
  config.json     the TrainConfig (written by the loop)
  metrics.jsonl   the loop's metrics: loss, tokens_per_s, step_time_s, mfu, eval/loss,
                  cor/layer_i, stable_rank/..., gate/layer_i (when the loop logs it)
  result.json     written by the runner when the run ends (below); a run with a result of
                  status done / diverged is finished and never run again
  log.txt         the loop's log lines
  checkpoints/    while the run is unfinished (deleted once it is, unless kept)

result.json: status (done | diverged | failed | interrupted), attempts, failures, arm, lr,
seed, stage, final_step, steps, eval_loss (the last eval at the final step), train_loss (the
last logged window), tokens (final_step x batch x seq_len), epochs (tokens / the data's train
tokens), params, flops_per_token, step_time_s and tokens_per_s (medians over logged windows,
the compile step excluded by the loop), mfu, wall_s, device, jobs (runs sharing the device),
corpus_sha256, config_fingerprint, config, commit, error.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import statistics
from typing import Any

from train.config import TrainConfig
from train.resume import flatten

# Keys that do not change what a run computes: a finished run is still the same run when
# only these differ (another out_dir after a move, more frequent logging, ...).
NEUTRAL_KEYS = ("name", "run.out_dir", "run.progress", "run.resume", "run.log_every",
                "run.checkpoint_every", "run.keep_checkpoints", "run.async_checkpoint",
                "run.save_final",
                "run.profile_start", "run.profile_steps", "run.sample_lines",
                "run.sample_tokens", "run.sample_temperature", "data.path", "data.prefetch",
                "data.verify", "data.auto_prepare")


def fingerprint(cfg_dict: dict) -> str:
  flat = {k: v for k, v in flatten(cfg_dict).items() if k not in NEUTRAL_KEYS}
  return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_diff(a: dict, b: dict, *, added_at_default: bool = True) -> list[str]:
  """'key: old -> new' for every identity key that differs. added_at_default=False leaves out
  keys `a` lacks that `b` holds at their default (a config key the code added after `a`, at
  the value that reproduces it)."""
  fa, fb = flatten(a), flatten(b)
  defaults = {} if added_at_default else flatten(TrainConfig().to_dict())
  keys = sorted((set(fa) | set(fb)) - set(NEUTRAL_KEYS))
  return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in keys if fa.get(k) != fb.get(k)
          and (added_at_default or k in fa or fb.get(k) != defaults.get(k, object()))]


def read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_json(path: str, obj: dict):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=_json_default)
  os.replace(tmp, path)


def _json_default(x):
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  raise TypeError(f"cannot serialise {type(x).__name__}")


def load_results(out: str, grid: str) -> dict[str, dict]:
  """run_id ('arm/lr..._s..') -> result dict, for every run of `grid` under `out`."""
  found = {}
  for path in glob.glob(os.path.join(out, grid, "*", "*", "result.json")):
    res = read_json(path)
    if res is None:
      continue
    run_dir = os.path.dirname(path)
    arm = os.path.basename(os.path.dirname(run_dir))
    found[f"{arm}/{os.path.basename(run_dir)}"] = {**res, "run_dir": run_dir}
  return found


def grids_under(out: str) -> list[str]:
  return sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))
                and not d.startswith(".")) if os.path.isdir(out) else []


def read_metrics(run_dir: str) -> list[dict]:
  """metrics.jsonl records in step order; a step logged twice (a replay after a resume)
  keeps its last value of each key."""
  path = os.path.join(run_dir, "metrics.jsonl")
  by_step: dict[int, dict] = {}
  if not os.path.exists(path):
    return []
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:
        continue  # a line cut short by a crash
      if isinstance(rec, dict) and isinstance(rec.get("step"), int):
        by_step.setdefault(rec["step"], {}).update(rec)
  return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
  xs, ys = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and math.isfinite(v):
      xs.append(r["step"])
      ys.append(float(v))
  return xs, ys


def last(records: list[dict], key: str) -> tuple[int, float] | None:
  xs, ys = series(records, key)
  return (xs[-1], ys[-1]) if xs else None


def median(records: list[dict], key: str, skip_first: bool = True) -> float | None:
  """Median of a per-window metric; the first window (warm-up after compile) is left out when
  there are others."""
  _, ys = series(records, key)
  if skip_first and len(ys) > 1:
    ys = ys[1:]
  return statistics.median(ys) if ys else None


def summarize(run_dir: str, cfg_dict: dict) -> dict[str, Any]:
  """The metric part of result.json from a run's metrics.jsonl and config."""
  from parallax_jax.models.config import ModelConfig
  from parallax_jax.models.qwen3 import flops_per_token, param_count
  recs = read_metrics(run_dir)
  model = ModelConfig.from_dict(cfg_dict["model"])
  seq, batch = cfg_dict["data"]["seq_len"], cfg_dict["data"]["global_batch_size"]
  final_step = recs[-1]["step"] if recs else 0
  ev = last(recs, "eval/loss")
  tr = last(recs, "loss")
  return {
      "final_step": final_step,
      "steps": cfg_dict["run"]["steps"],
      "eval_loss": ev[1] if ev and ev[0] == final_step else None,
      "eval_step": ev[0] if ev else None,
      "train_loss": tr[1] if tr else None,
      "tokens": final_step * batch * seq,
      "params": param_count(model),
      "flops_per_token": flops_per_token(model, seq, training=True),
      "step_time_s": median(recs, "step_time_s"),
      "tokens_per_s": median(recs, "tokens_per_s"),
      "mfu": median(recs, "mfu"),
  }
