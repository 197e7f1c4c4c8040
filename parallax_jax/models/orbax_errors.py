"""A failed orbax read or write: its error in one line, and its leftovers off the terminal.

When orbax fails to read an array (a truncated or damaged file) the caller gets the error
once, but the read's other coroutines are abandoned, and each reports later through
`sys.unraisablehook`, during the call and up to the interpreter's exit: either its own copy
of the error with TensorStore's whole spec ("Exception ignored in: <coroutine object
_read_array_index_and_device_put ...>", ~70 lines each) or asyncio's "Event loop is closed"
from a callback that arrived after its loop closed. A failed background save leaves the
same kind. A CLI's one-line error ends up above dozens of tracebacks.

One process-wide hook (installed on first use) routes exactly those reports: nowhere while a
read runs under `quiet_reads()` or once `quiet_leftovers()` was called (after a failure that
has been reported; a failed `quiet_reads()` calls it), else to the
innermost open sink (`divert`: the training loop's checkpoint error log), else on to the
hook that was there before. Every other report passes through unchanged.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import traceback
import warnings
from typing import Callable

_ORBAX = os.sep + "orbax" + os.sep
_lock = threading.Lock()
_previous: Callable | None = None  # the unraisable hook found at install
_sinks: list[Callable[[str], None]] = []
_quiet = False
_reading = 0  # orbax reads in flight under `quiet_reads`
dropped = 0  # leftover reports dropped after quiet_leftovers()


def read_error(e: BaseException, n: int = 240) -> str:
  """`Type: message` in one line for an orbax / TensorStore failure: the innermost cause
  (which names the damaged array and file), without the store's multi-line spec."""
  chain, x = [], e
  while x is not None and all(x is not c for c in chain):
    chain.append(x)
    x = x.__cause__ or x.__context__
  for x in reversed(chain):
    text = str(x).split(". See full TensorStore details")[0].strip()
    if text:
      line = f"{type(x).__name__}: {text.splitlines()[0]}"
      return line if len(line) <= n else line[:n - 3] + "..."
  return type(e).__name__


def closed_loop(exc_type, exc, tb) -> bool:
  """asyncio's "Event loop is closed", raised by a callback an abandoned task left behind."""
  return (exc_type is RuntimeError and str(exc) == "Event loop is closed"
          and any(f.filename.endswith(os.path.join("asyncio", "base_events.py"))
                  for f in traceback.extract_tb(tb)))


def _is_leftover(args) -> bool:
  code = getattr(args.object, "cr_code", None)  # an orbax coroutine finalised with its error
  if code is not None and _ORBAX in code.co_filename:
    return True
  return args.exc_traceback is not None and closed_loop(args.exc_type, args.exc_value,
                                                        args.exc_traceback)


def _hook(args):
  global dropped
  if _is_leftover(args):
    if _quiet or _reading:
      dropped += 1
      return
    if _sinks:
      _sinks[-1]("".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                    args.exc_traceback)))
      return
  (_previous or sys.__unraisablehook__)(args)


def _install():
  global _previous
  if sys.unraisablehook is not _hook:
    _previous, sys.unraisablehook = sys.unraisablehook, _hook


def quiet_leftovers():
  """Drop the leftover reports of failed orbax reads and writes from now on (call it once
  the failure itself has been raised or reported)."""
  global _quiet
  with _lock:
    _install()
    _quiet = True
    # the abandoned reads that never started warn once each at exit
    warnings.filterwarnings("ignore", message=r"coroutine '_read_\w+' was never awaited",
                            category=RuntimeWarning)


@contextlib.contextmanager
def quiet_reads():
  """Around an orbax read: its leftovers are dropped while it runs (the first arrive before
  the error reaches the caller) and, if it fails, from then on."""
  global _reading
  with _lock:
    _install()
    _reading += 1
  try:
    yield
  except BaseException:
    quiet_leftovers()
    raise
  finally:
    with _lock:
      _reading -= 1


def divert(sink: Callable[[str], None] | None, *, remove: Callable | None = None):
  """Open (`divert(fn)`) or close (`divert(None, remove=fn)`) a sink for leftover reports."""
  with _lock:
    _install()
    if sink is not None:
      _sinks.append(sink)
    elif remove is not None and remove in _sinks:
      _sinks.remove(remove)


__all__ = ["closed_loop", "divert", "quiet_leftovers", "quiet_reads", "read_error"]
