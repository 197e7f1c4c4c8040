"""The argument parser of the command-line tools (`parallax-sample`, `parallax-export`, MAD)."""
from __future__ import annotations

import argparse
import os
import sys


def prog_name(script: str, module: str, module_file: str) -> str:
  """The name a command was invoked by: `python -m <module>` when `sys.argv[0]` is the
  module's own file (`python -m` or `python path/to/module.py`), else the console script's
  name `script` (the installed command, and a `main(argv)` called from Python)."""
  argv0 = sys.argv[0] if sys.argv else ""
  try:
    if argv0 and os.path.samefile(argv0, module_file):
      return f"python -m {module}"
  except OSError:
    pass
  return script


class Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors, its own (a malformed command line) and those of the
  command (a bad file, prompt or setting), are one line on stderr, `<prog>: error: <message>`,
  and exit status 2; `--help` shows the usage."""

  def error(self, message):
    message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    self.exit(2, f"{self.prog}: error: {message}\n")
