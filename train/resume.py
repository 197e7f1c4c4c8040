"""What a resumed run may change, decided from the checkpoint's stored config.

Every config key falls in one of three classes:
  fixed       the checkpoint cannot be restored into the new run, or the data stream would
              not continue where it stopped: model.*, data.path, data.seq_len, optimizer.name,
              optimizer.clip_grad_norm switched on / off (the optimizer state's structure).
  trajectory  the run would continue on another path than the one it started: run.steps,
              the rest of optimizer.* and schedule.* (the learning-rate schedule is a function
              of run.steps), data.global_batch_size, data.seed. Refused under
              run.resume=auto, applied with a printed note under run.resume=override (the new
              schedule is evaluated from the restored step on).
  free        everything else (logging, eval, checkpoint cadence, mesh, prefetch, ...).

The data streams: a checkpoint holds every process's data iterator state, and each process
continues from its own (`data_state`), if the data is the same: the record carries the
data's identity (`train.data.shards_identity`), and a checkpoint of other data (prepared
again at the same path) is refused under run.resume=auto and starts the new data over under
override. Each process reads a slice of the data that depends
on the process count, so a checkpoint of another process count cannot continue the streams:
refused under run.resume=auto; under run.resume=override every process's stream restarts
from the start of its slice (data repeats).
"""
from __future__ import annotations

import json
from typing import Any

import jax

from train.checkpoint import CheckpointMismatchError

FIXED_PREFIXES = ("model.", "data.path", "data.seq_len", "optimizer.name")
TRAJECTORY_PREFIXES = ("run.steps", "optimizer.", "schedule.", "data.global_batch_size",
                       "data.seed")
FREE_KEYS = ("optimizer.loss_chunk_tokens",)  # numerics of the same loss, chunked differently


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def changes(stored: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """(key, checkpoint value, config value) for every leaf key that differs."""
  a = flatten(json.loads(json.dumps(stored)))
  b = flatten(json.loads(json.dumps(current)))
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def classify(key: str, old: Any, new: Any) -> str:
  if key in FREE_KEYS:
    return "free"
  if key == "optimizer.clip_grad_norm" and (not old) != (not new):
    return "fixed"
  if key.startswith(FIXED_PREFIXES):
    return "fixed"
  if key.startswith(TRAJECTORY_PREFIXES):
    return "trajectory"
  return "free"


def _fmt(items) -> str:
  return ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, a, b in items)


def check(stored: dict, current: dict, mode: str, where: str) -> list[str]:
  """Raise CheckpointMismatchError naming the keys a resume under `mode` may not change;
  return notes for the changes it applies."""
  diff = changes(stored, current)
  fixed = [d for d in diff if classify(*d) == "fixed"]
  traj = [d for d in diff if classify(*d) == "trajectory"]
  if fixed:
    raise CheckpointMismatchError(
        f"checkpoint {where} was written for a different run ({_fmt(fixed)}); to train this "
        f"config, use another run.out_dir (a new directory starts a new run)")
  if traj and mode != "override":
    raise CheckpointMismatchError(
        f"resuming from {where} would change the run's trajectory ({_fmt(traj)}); to resume "
        f"with the new values anyway (the schedule is recomputed from the restored step on), "
        f"--set run.resume=override")
  return [f"resume: {k} {a!r} -> {b!r}" for k, a, b in traj]


def data_state(record: dict, mode: str, where: str, *, process_index: int | None = None,
               process_count: int | None = None, data_id: str | None = None,
               slices: list | None = None) -> tuple[dict | None, list[str]]:
  """(this process's data iterator state, or None for a fresh stream; notes to print) from a
  checkpoint's data record (train/checkpoint.py `gather_data_states`). Raise
  CheckpointMismatchError for a record of other data (`data_id`: the identity of the data
  at data.path now), another process count, or processes reading other slices of the data
  (`slices`: each process's [data index, data count] now, `Trainer.data_slices`; a record
  without them read by process index) unless mode is override."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  stored_id = record.get("data_id")
  if stored_id is not None and data_id is not None and stored_id != data_id:
    why = (f"checkpoint {where} indexes other data than data.path holds now (data identity "
           f"{stored_id} vs {data_id}: its shards were prepared again), so its data stream "
           f"cannot continue")
    if mode != "override":
      raise CheckpointMismatchError(
          f"{why}; to train on the new data from its start, --set run.resume=override")
    return None, [f"resume: {why}; every process's data stream starts the new data over"]
  if "per_process" not in record:  # an older version's record: process 0's state only
    if pc == 1:
      return record, []
    return record, [f"warning: checkpoint {where} holds one data iterator state (written by "
                    f"an older version); all {pc} processes continue from it, as older "
                    f"versions did, so processes other than 0 may skip or repeat some data"]
  states = record["per_process"]
  stored = record.get("slices", [[i, len(states)] for i in range(len(states))])
  now = [[i, pc] for i in range(pc)] if slices is None else [list(x) for x in slices]
  if len(states) == pc and stored == now:
    return states[pi], []
  if len(states) == pc:
    why = (f"checkpoint {where} was written by processes reading the data in slices "
           f"{stored} ([index, count] per process), this run's mesh has them read {now} "
           f"(which processes share batch shards changed), so the data streams cannot "
           f"continue")
  else:
    why = (f"checkpoint {where} was written by {len(states)} processes, this run has {pc}: "
           f"each process's slice of the data depends on the process count, so the data "
           f"streams cannot continue")
  if mode != "override":
    raise CheckpointMismatchError(
        f"{why}; to resume anyway with every process's data stream restarted from the start "
        f"of its slice (data repeats), --set run.resume=override")
  return None, [f"resume: {why}; every process's data stream restarts from the start of its "
                f"slice (data repeats)"]
