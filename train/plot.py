"""Loss curves of several runs into one PNG.

    python -m train.plot runs/tiny runs/tiny_softmax [--out loss.png] [--key loss] [--no-eval]

Reads each run's metrics.jsonl (written by the loop); `key` solid, `eval/<key>` dashed
(left out with --no-eval). A run without metrics.jsonl is a one-line error (exit 1).
`plot_run(run_dir)` writes one run's `<run_dir>/loss.png`. Needs matplotlib (returns None /
exits 1 with a message when it is missing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def metrics_path(run_dir: str) -> str:
  return os.path.join(run_dir, "metrics.jsonl")


def read_metrics(run_dir: str, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key` in the run's metrics.jsonl, sorted by step.

  Raises FileNotFoundError when the run has no metrics.jsonl. Lines that are not JSON (a
  record cut short by a killed run) are skipped.
  """
  steps = {}
  with open(metrics_path(run_dir)) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(rec, dict) and key in rec and "step" in rec:
        steps[rec["step"]] = rec[key]  # a resumed run may repeat steps: keep the last
  xs = sorted(steps)
  vals = [steps[s] for s in xs]
  return xs, vals


def plot_runs(run_dirs: list[str], out: str, key: str = "loss", with_eval: bool = True,
              title: str | None = None) -> str | None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("train.plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return None
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, d in enumerate(run_dirs):
    color = f"C{i}"
    name = os.path.basename(os.path.normpath(d))
    xs, ys = read_metrics(d, key)
    if xs:
      ax.plot(xs, ys, color=color, label=f"{name} {key}")
    if with_eval:
      ex, ey = read_metrics(d, "eval/" + key)
      if ex:
        ax.plot(ex, ey, color=color, linestyle="--", marker="o", label=f"{name} eval/{key}")
  ax.set_xlabel("step")
  ax.set_ylabel(key)
  ax.set_title(title or f"{key} vs step")
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def plot_run(run_dir: str, key: str = "loss") -> str | None:
  """Write `<run_dir>/loss.png` (train `key` solid, `eval/<key>` dashed) for one run.

  Returns the path, or None (nothing written) when the run has no metrics.jsonl or
  matplotlib is missing; never raises for either, so a training loop can call it at the end
  of every run.
  """
  if not os.path.isfile(metrics_path(run_dir)):
    return None
  name = os.path.basename(os.path.normpath(run_dir))
  return plot_runs([run_dir], os.path.join(run_dir, "loss.png"), key, True,
                   title=f"{name}: {key} vs step")


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
  ap.add_argument("--out", default="loss.png", help="PNG to write (default: loss.png)")
  ap.add_argument("--key", default="loss", help="metric to plot (default: loss)")
  ap.add_argument("--no-eval", action="store_true", help="leave out the eval/<key> curves")
  a = ap.parse_args(argv)
  missing = [d for d in a.runs if not os.path.isfile(metrics_path(d))]
  if missing:
    print(f"train.plot: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
    return 1
  out = plot_runs(a.runs, a.out, a.key, not a.no_eval)
  if out is None:
    return 1
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
