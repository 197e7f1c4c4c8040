"""One run at a time in a run directory.

Two runs started on the same `run.out_dir` (a job submitted twice, a second terminal) would
both resume from the same checkpoint and then interleave their checkpoints and metrics. The
first holds an exclusive `flock` on `<out_dir>/.run.lock` for its lifetime (process 0 only:
the processes of one run share the directory); the second stops at once, naming the holder.
The kernel drops the lock when its process dies, so a crash or `kill -9` leaves nothing to
clean up. (On a network file system without `flock`, the lock is skipped with a warning.)
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

LOCK_NAME = ".run.lock"


class RunDirInUseError(RuntimeError):
  """Another live run holds the run directory."""


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      h = json.load(f)
    return f"pid {h['pid']} on {h['host']}, since {h['since']}"
  except (OSError, ValueError, KeyError):
    return "another process"


def _acquire(out_dir: str, warn):
  path = os.path.join(out_dir, LOCK_NAME)
  f = open(path, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    f.close()
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      return None, (f"run.out_dir {out_dir!r} is in use by another run ({_holder(path)}); "
                    f"wait for it to finish, or use another run.out_dir")
    warn(f"warning: could not lock {path} ({e.strerror}); not guarding against a second run")
    return "unlocked", None
  f.seek(0)
  f.truncate()
  json.dump({"pid": os.getpid(), "host": socket.gethostname(),
             "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
  f.flush()
  return f, None


@contextlib.contextmanager
def run_dir_lock(out_dir: str, warn=print):
  """Hold `out_dir`'s run lock (process 0) for the block; raise RunDirInUseError on every
  process if another run holds it."""
  handle, refusal = (_acquire(out_dir, warn) if jax.process_index() == 0
                     else ("unlocked", None))
  if jax.process_count() > 1:  # every process stops, not process 0 alone
    held = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))
    if not int(held):
      refusal = refusal or f"run.out_dir {out_dir!r} is in use by another run"
  if refusal:
    raise RunDirInUseError(refusal)
  try:
    yield
  finally:
    if handle not in (None, "unlocked"):
      handle.close()  # closing the file drops the flock
