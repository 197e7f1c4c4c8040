"""The checkpoint writer's own error reports: into a file, not over the terminal.

When a background save fails (a full disk), orbax's writer threads each log the failure with
its traceback, the threads that die print theirs, and asyncio callbacks that arrive after
their event loop closed print one "Event loop is closed" traceback each: hundreds of lines
on a full disk, above the one-line `CheckpointSaveError` the loop raises for the same
failure. While a `Diversion` is open these reports go to a file instead, which the error
line names (or, if nothing named it, a note when the diversion closes); everything else still
prints as before.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import traceback

from parallax_jax.models import orbax_errors
from parallax_jax.models.orbax_errors import closed_loop

_ORBAX = os.sep + "orbax" + os.sep


def _from_orbax(tb) -> bool:
  return any(_ORBAX in f.filename for f in traceback.extract_tb(tb))


class Diversion:
  """While open: orbax's ERROR log records, exceptions of threads running orbax code, and
  the late reports of its abandoned tasks (`parallax_jax.models.orbax_errors`) are appended
  to `path` instead of printed. Process-global hooks, installed once however many are open
  (nested opens share them)."""

  _lock = threading.Lock()
  _open: list[Diversion] = []
  _saved = None  # threading.excepthook before the first open

  def __init__(self, path: str):
    self.path = path
    self.count = 0  # reports diverted
    self.named = False  # an error message has pointed the user at `path`
    self.unwritten: list[str] = []  # the last line of each report the file refused
    self._why = ""

  # ------------------------------------------------------------------ the file
  def _write(self, text: str):
    with Diversion._lock:
      self.count += 1
      try:
        with open(self.path, "a") as f:
          f.write(text.rstrip("\n") + "\n\n")
      except OSError as e:  # the full disk that failed the save refuses this too
        self._why = self._why or str(e)
        lines = [x for x in text.strip().splitlines() if x.strip()]
        self.unwritten.append(lines[-1].strip()[:300] if lines else "")  # the exception line

  # ------------------------------------------------------------------ the hooks
  @staticmethod
  def _current() -> Diversion | None:
    return Diversion._open[-1] if Diversion._open else None

  class _Filter(logging.Filter):
    def filter(self, record):
      d = Diversion._current()
      if d is None or record.levelno < logging.ERROR or _ORBAX not in record.pathname:
        return True
      text = record.getMessage()
      if record.exc_info:
        text += "\n" + "".join(traceback.format_exception(*record.exc_info))
      d._write(f"[{record.levelname} {record.pathname}:{record.lineno}] {text}")
      return False

  _filter = _Filter()

  @staticmethod
  def _thread_hook(args):
    d = Diversion._current()
    if d is not None and args.exc_traceback is not None and (
        _from_orbax(args.exc_traceback)
        or closed_loop(args.exc_type, args.exc_value, args.exc_traceback)):
      name = args.thread.name if args.thread is not None else "?"
      d._write(f"[thread {name}] " + "".join(traceback.format_exception(
          args.exc_type, args.exc_value, args.exc_traceback)))
      return
    Diversion._saved(args)

  @staticmethod
  def _leftover(text: str):  # a late report of the writer's abandoned tasks (orbax_errors)
    d = Diversion._current()
    if d is not None:
      d._write(text)

  def __enter__(self) -> Diversion:
    with Diversion._lock:
      if not Diversion._open:
        Diversion._saved = threading.excepthook
        threading.excepthook = Diversion._thread_hook
        orbax_errors.divert(Diversion._leftover)
        logging.getLogger("absl").addFilter(Diversion._filter)
      Diversion._open.append(self)
    return self

  def __exit__(self, *exc):
    with Diversion._lock:
      Diversion._open.remove(self)
      if not Diversion._open:
        threading.excepthook = Diversion._saved
        Diversion._saved = None
        orbax_errors.divert(None, remove=Diversion._leftover)
        logging.getLogger("absl").removeFilter(Diversion._filter)
    if self.unwritten:  # one line, not the hundreds the reports would print
      sys.stderr.write(f"note: {len(self.unwritten)} reports of the checkpoint writer could not "
                       f"be kept in {self.path} ({self._why}); the first: "
                       f"{self.unwritten[0]}\n")
    elif self.count and not self.named:
      sys.stderr.write(f"note: {self.count} error reports of the checkpoint writer are in "
                       f"{self.path}\n")
    return False
