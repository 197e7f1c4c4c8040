"""Orbax checkpoints of the train state + the grain iterator state + the config.

Layout: <out_dir>/checkpoints/<step>/{state, data, config}; `state` is the sharded train
state (params, optimizer state, step), `data` the data iterator's JSON state, `config` the
full TrainConfig as JSON. Saves are asynchronous (the loop keeps training while the write
finishes) and only the newest `keep` are kept. Orbax writes each step into a temporary
directory and renames it once complete, so a half-written checkpoint (a crash mid-save) is
never listed by `latest_step()` and never restored.

Restoring checks the stored model config against the current one first and raises
`CheckpointMismatchError` naming the differing keys, instead of failing deep inside orbax on
a shape mismatch.
"""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  pass


class Checkpointer:
  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=opts,
                                         item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = True):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)), force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def stored_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def restore(self, step: int, abstract_state, config: dict) -> tuple[Any, dict]:
    stored = self.stored_config(step)
    diffs = {k: (stored.get("model", {}).get(k), v) for k, v in config["model"].items()
             if stored.get("model", {}).get(k) != v}
    if diffs:
      detail = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}"
                         for k, (a, b) in sorted(diffs.items()))
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} was written for a different model config "
          f"({detail}); use another run.out_dir or --set run.resume=false")
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
