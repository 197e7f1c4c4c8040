"""train.plot: the usage text matches the flags, a missing run is a one-line error, and
plot_run writes one run's loss.png."""
from __future__ import annotations

import json
import os
import re

import pytest

from train import plot


def _write_run(run_dir, records, tail=""):
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_usage_names_only_real_flags(capsys):
  with pytest.raises(SystemExit) as e:
    plot.main(["--help"])
  assert e.value.code == 0
  help_text = capsys.readouterr().out
  usage = re.findall(r"--[a-z][a-z-]*", plot.__doc__)
  assert usage and set(usage) == {"--out", "--key", "--no-eval"}
  for flag in usage:
    assert re.search(rf"\[{flag}\b", help_text.split("\n\n")[0]), flag  # in argparse's usage


def test_missing_run_is_one_line_error(tmp_path, capsys):
  _write_run(str(tmp_path / "a"), [{"step": 1, "loss": 2.0}])
  missing = str(tmp_path / "nope")
  assert plot.main([str(tmp_path / "a"), missing, "--out", str(tmp_path / "x.png")]) == 1
  err = capsys.readouterr().err
  assert err.strip().count("\n") == 0 and missing in err and "Traceback" not in err
  assert not (tmp_path / "x.png").exists()


def test_read_metrics_keeps_last_of_repeated_steps_and_skips_cut_lines(tmp_path):
  recs = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "loss": 2.4},
          {"step": 2, "eval/loss": 2.6}]
  _write_run(str(tmp_path), recs, tail='{"step": 3, "lo')
  assert plot.read_metrics(str(tmp_path), "loss") == ([1, 2], [3.0, 2.4])
  assert plot.read_metrics(str(tmp_path), "eval/loss") == ([2], [2.6])


def test_plot_run_writes_loss_png(tmp_path):
  pytest.importorskip("matplotlib")
  run = str(tmp_path / "run")
  _write_run(run, [{"step": s, "loss": 5.0 / s} for s in range(1, 6)]
             + [{"step": 5, "eval/loss": 1.2}])
  out = plot.plot_run(run)
  assert out == os.path.join(run, "loss.png")
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_run_without_metrics_writes_nothing(tmp_path):
  assert plot.plot_run(str(tmp_path)) is None
  assert os.listdir(tmp_path) == []
