"""Orbax checkpoints of the train state + the data iterator state + the config, verified.

Layout: <out_dir>/checkpoints/<step>/{state, data, config, integrity}; `state` is the sharded
train state (params, optimizer state, step), `data` every process's data iterator state
(`{"process_count": P, "per_process": [state of process 0, ..., P - 1]}`, gathered from all
processes at each save: `gather_data_states`; train/resume.py `data_state` picks this
process's entry on resume), `config` the full TrainConfig as JSON, `integrity` a fingerprint
of every state array (two 32-bit sums of its raw bits:
`parallax_jax.models.checkpoint.fingerprint`). Saves are asynchronous (the
loop keeps training while the write finishes) and only the newest `keep` are kept. Orbax
writes each step into a temporary directory and renames it once complete, so a half-written
checkpoint (a crash mid-save) is never listed and never restored.

What a save and a restore guarantee:
- A state holding a NaN / inf is never saved (`NonFiniteStateError`).
- A save that fails in the background (a full disk, a lost mount) surfaces at the loop's
  next check (`check_saves`) as one `CheckpointSaveError` naming the cause and the last
  committed checkpoint; its partial directory is removed so its bytes do not keep the disk
  full, and so is any partial directory an earlier crash left (at open).
- `restore_latest` restores the newest checkpoint that reads back and matches its
  fingerprint. One that does not (a truncated or bit-flipped array file, a missing
  `_METADATA`, a directory that is not a committed checkpoint) is moved aside to
  `<step>.unreadable` with a warning, and the next older one is tried: keep-N exists for this.
- A checkpoint written for another config (or another process count) is not a corrupt one:
  the caller's `check`, given the stored config and data record before the state is read,
  raises, naming what differs, and nothing is moved.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import weakref
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from parallax_jax.models.checkpoint import few, fingerprint, verify_fingerprint
from parallax_jax.models.orbax_errors import quiet_leftovers, quiet_reads, read_error
from train.writer_errors import Diversion

ITEMS = ("state", "data", "config", "integrity")
QUARANTINE_SUFFIX = ".unreadable"
PARTIAL_MARK = ".orbax-checkpoint-tmp"  # orbax's name for a step directory being written


class CheckpointMismatchError(ValueError):
  """The checkpoint belongs to a run with a different config (names the keys)."""


class CheckpointCorruptError(RuntimeError):
  """A checkpoint that cannot be read back as it was written."""


class NonFiniteStateError(RuntimeError):
  """The train state holds NaN / inf: it is not saved."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (disk full, permissions, a lost mount)."""


# --------------------------------------------------------------------------- checkpointer
class Checkpointer:
  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True,
               warn: Callable[[str], None] = print):
    self.directory = os.path.abspath(directory)
    self.warn = warn
    self._issued: list[int] = []  # steps of the saves issued, in order
    self._opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                              enable_async_checkpointing=async_save)
    self._set_aside_strays()
    self._open()
    # the writer threads' own tracebacks of a failed save go to this file (the loop reports
    # the failure in one line naming it)
    rank = jax.process_index()
    self._diversion = Diversion(os.path.join(
        os.path.dirname(self.directory),
        "checkpoint_errors.log" if rank == 0 else f"checkpoint_errors.process{rank}.log"))
    self._diversion.__enter__()
    # closed by close(), or when an unclosed checkpointer is collected (the hooks are global)
    self._end_diversion = weakref.finalize(self, self._diversion.__exit__, None, None, None)

  def _open(self):
    self.manager = ocp.CheckpointManager(self.directory, options=self._opts, item_names=ITEMS)

  # ------------------------------------------------------------------ listing
  def _is_committed(self, step: int) -> bool:
    return os.path.isfile(os.path.join(self.directory, str(step), "_CHECKPOINT_METADATA"))

  def _integer_dirs(self) -> list[int]:
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory)
                  if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

  def _set_aside_strays(self):
    """An integer-named directory without orbax's commit metadata (an empty or hand-made
    one) is not a step: move it aside so it is neither listed nor in the way of a save.
    A partial save (a crash or a full disk mid-write) is deleted: it can never be read, and
    on a full disk its bytes are what stops the resumed run."""
    if jax.process_index() != 0:
      return
    for s in self._integer_dirs():
      if not self._is_committed(s):
        self._quarantine(s, "it is not a committed checkpoint (no _CHECKPOINT_METADATA)")
    freed = self._remove_partial_saves()
    if freed:
      self.warn(f"warning: removed unfinished checkpoint writes in {self.directory}: "
                f"{', '.join(freed)}")

  def _remove_partial_saves(self) -> list[str]:
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return []
    gone = sorted(n for n in os.listdir(self.directory) if PARTIAL_MARK in n)
    for n in gone:
      shutil.rmtree(os.path.join(self.directory, n), ignore_errors=True)
    return gone

  def all_steps(self) -> list[int]:
    return [s for s in self._integer_dirs() if self._is_committed(s)]

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _quarantine(self, step: int, why: str) -> str:
    src = os.path.join(self.directory, str(step))
    dst, n = src + QUARANTINE_SUFFIX, 1
    while os.path.exists(dst):
      n += 1
      dst = f"{src}{QUARANTINE_SUFFIX}.{n}"
    os.rename(src, dst)
    self.warn(f"warning: checkpoint {src} is unreadable ({why}); moved to {dst}")
    return dst

  # ------------------------------------------------------------------ save
  def save(self, step: int, state, data_state: dict, config: dict,
           data_id: str | None = None, slices: list | None = None):
    """Save asynchronously after checking that every state array is finite. data_state: this
    process's data iterator state; every process calls save (the states are gathered).
    data_id: the identity of the data those states index (`train.data.shards_identity`);
    slices: each process's [data index, data count] (`Trainer.data_slices`), which slice of
    the data stream its state walks."""
    fp = fingerprint(state)
    if fp["nonfinite"]:
      raise NonFiniteStateError(
          f"step {step}: the train state holds NaN / inf in {few(fp['nonfinite'])}; not saved")
    data = gather_data_states(data_state)  # JsonSave writes on the primary process only
    if data_id is not None:
      data["data_id"] = data_id
    if slices is not None:
      data["slices"] = slices
    self.check_saves()  # the previous save's failure, named as such, before this one starts
    self._issued.append(step)
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
          config=ocp.args.JsonSave(config), integrity=ocp.args.JsonSave(fp)), force=True)
    except Exception as e:  # noqa: BLE001 - a synchronous write failure (sync saves)
      raise self._save_failed(e) from e

  def check_saves(self):
    """Raise `CheckpointSaveError` if a background save has failed since the last check."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001 - whatever the writer raised
      raise self._save_failed(e) from e

  def _save_failed(self, e: BaseException) -> CheckpointSaveError:
    self._remove_partial_saves()
    quiet_leftovers()  # reported here; the writer's late callbacks would only repeat it
    text = str(e)
    if "No space left on device" in text or getattr(e, "errno", None) == errno.ENOSPC:
      cause = "no space left on device"
    elif "File too large" in text or getattr(e, "errno", None) == errno.EFBIG:
      cause = "a file exceeded the size limit (File too large)"
    else:
      cause = read_error(e, 160)
    try:
      free = f"; {shutil.disk_usage(self.directory).free / 2**20:,.0f} MiB free there"
    except OSError:
      free = ""
    last = self.latest_step()
    good = (f"the last good checkpoint is {self.directory}/{last} (a rerun resumes from it)"
            if last is not None else "no checkpoint was committed yet")
    # the failed write is the oldest issued one that never committed (a save raises the
    # failure of the one before it)
    failed = [s for s in self._issued if last is None or s > last]
    what = f"checkpoint {self.directory}/{failed[0]}" if failed else "a checkpoint"
    logged = (f" (the writer's own reports: {self._diversion.path})"
              if self._diversion.count else "")
    self._diversion.named = bool(logged)
    return CheckpointSaveError(f"{what} could not be written: {cause}{free}; {good}{logged}")

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_failed(e) from e
    self.check_saves()

  # ------------------------------------------------------------------ restore
  def restore(self, step: int, abstract_state,
              check: Callable[[dict, dict, int], None] | None = None) -> tuple[Any, dict]:
    """(state, data record) of `step`, verified against its fingerprint. The data record is
    as saved (every process's iterator state; a bare state from older versions): pass it to
    train/resume.py `data_state`. check(config, data record, step) runs on the small JSON
    items before the state is read.

    Raises CheckpointMismatchError (from check) for a checkpoint of another run,
    CheckpointCorruptError for one that cannot be read back as written."""
    try:
      with quiet_reads():
        head = self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - any read failure means unreadable
      raise CheckpointCorruptError(f"its config or data record does not read back: "
                                   f"{read_error(e)}") from e
    if check is not None:
      check(head["config"], head["data"], step)
    has_fp = os.path.isdir(os.path.join(self.directory, str(step), "integrity"))
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if has_fp:
      items["integrity"] = ocp.args.JsonRestore()
    try:
      with quiet_reads():  # an abandoned read's late reports would repeat the error
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001
      raise CheckpointCorruptError(f"it does not read back: {read_error(e)}") from e
    problem = verify_fingerprint(out["state"], out["integrity"] if has_fp else None)
    if problem:
      raise CheckpointCorruptError(problem)
    if not has_fp:
      self.warn(f"warning: checkpoint {self.directory}/{step} has no fingerprint (written by an "
                "older version); restored without verifying its arrays")
    return out["state"], head["data"]

  def restore_latest(self, abstract_state,
                     check: Callable[[dict, dict, int], None] | None = None
                     ) -> tuple[int, Any, dict] | None:
    """(step, state, data) of the newest checkpoint that restores and verifies; None when
    there is none. Unreadable ones are moved aside (and reported) on the way down."""
    tried = []
    for step in reversed(self.all_steps()):
      try:
        state, data = self.restore(step, abstract_state, check)
        return step, state, data
      except CheckpointCorruptError as e:
        tried.append(f"{step} ({e})")
        if jax.process_index() == 0:
          self.manager.close()
          self._quarantine(step, str(e))
          self._open()
    if tried:
      raise CheckpointCorruptError(
          f"no checkpoint in {self.directory} reads back: {'; '.join(tried)}. They were moved "
          f"aside (*{QUARANTINE_SUFFIX}); rerun to start from scratch")
    return None

  def close(self):
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      finally:
        self._end_diversion()


# --------------------------------------------------------------------------- data states
def gather_data_states(local: dict) -> dict:
  """{"process_count": P, "per_process": [state of process 0, ..., P - 1]} from this
  process's JSON-serialisable data iterator state.

  A collective: every process calls it. One process gathers nothing; several allgather the
  lengths of their JSON encodings, then the bytes padded to a power of two (>= 64), so a run
  compiles a few small gathers once and each later save costs two tiny transfers."""
  pc = jax.process_count()
  if pc == 1:
    return {"process_count": 1, "per_process": [local]}
  raw = np.frombuffer(json.dumps(local, sort_keys=True).encode(), np.uint8)
  lens = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32)))
  lens = lens.reshape(pc)
  width = max(64, 1 << (int(lens.max()) - 1).bit_length())
  buf = np.zeros((width,), np.uint8)
  buf[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(pc, width)
  return {"process_count": pc,
          "per_process": [json.loads(rows[i, :int(n)].tobytes()) for i, n in enumerate(lens)]}


__all__ = ["Checkpointer", "CheckpointCorruptError", "CheckpointMismatchError",
           "CheckpointSaveError", "NonFiniteStateError", "fingerprint", "gather_data_states"]
