"""Loss curves of several runs into one PNG.

    python -m train.plot runs/tiny runs/tiny_softmax --out loss.png [--key loss] [--eval]

Reads each run's metrics.jsonl (written by the loop); train loss solid, eval loss dashed
(with --eval). Needs matplotlib (returns None / exits 1 with a message when it is missing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def read_metrics(run_dir: str, key: str) -> tuple[list[int], list[float]]:
  steps, vals = {}, None
  path = os.path.join(run_dir, "metrics.jsonl")
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      if key in rec:
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
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
  ap.add_argument("--out", default="loss.png")
  ap.add_argument("--key", default="loss")
  ap.add_argument("--no-eval", action="store_true")
  a = ap.parse_args(argv)
  out = plot_runs(a.runs, a.out, a.key, not a.no_eval)
  if out is None:
    return 1
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
