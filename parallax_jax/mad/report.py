"""Scores, tables and the bar chart of a MAD run; merging of several runs' JSON files.

Score of one (member, optimizer, task): for each seed and setting, the best run of the
learning-rate x weight-decay sweep (by the run's accuracy, read at its lowest-test-perplexity
epoch); the mean over the task's settings; then mean and sample std over seeds. The average
is the mean over tasks, per seed, then mean and std over seeds.
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any

import numpy as np

from parallax_jax.mad.tasks import TASKS

AVERAGE = "average"
# The Parallax paper's MAD table (Zuo et al., "Parallax: Parameterized Local Linear Attention
# for Language Modeling", arXiv:2605.29157), as far as its figures were available to us; None
# where we have not seen the paper's value.
PAPER_SOURCE = "Parallax paper (arXiv:2605.29157), MAD table"
PAPER: dict[str, dict[str, float | None]] = {
    "Transformer (softmax)": {"in-context-recall": 0.803, "selective-copying": 0.950,
                              AVERAGE: 0.672},
    "Parallax": {"in-context-recall": 0.951, "selective-copying": 0.988, AVERAGE: 0.716},
}


def combo(run: dict[str, Any]) -> str:
  return f"{run['member']}/{run['optimizer']}"


def _mean_std(values: list[float]) -> dict[str, float]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
          "n": int(len(v))}


def diverged(run: dict[str, Any], metric: str = "acc") -> bool:
  v = run.get(metric)
  return v is None or (isinstance(v, float) and math.isnan(v))


def scores(runs: list[dict[str, Any]], metric: str = "acc") -> dict[str, Any]:
  """{combo: {task: {mean, std, n, per_seed, best}, 'average': {...}}} from run records.

  A run with no finite metric (it diverged: no epoch had a finite test perplexity) scores 0,
  so a sweep that only diverged is a failed task, not a missing one."""
  best: dict[tuple, dict[str, Any]] = {}
  for r in runs:
    if diverged(r, metric):
      r = dict(r, **{metric: 0.0})
    v = r[metric]
    key = (combo(r), r["task"], r["setting"], r["seed"])
    if key not in best or v > best[key][metric]:
      best[key] = r
  per_seed: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
  winners: dict[tuple, dict[str, Any]] = defaultdict(dict)
  for (c, task, setting, seed), r in best.items():
    per_seed[(c, task)][seed].append(r[metric])
    winners[(c, task)][f"{setting}/seed{seed}"] = {"lr": r["lr"], "wd": r["wd"],
                                                   metric: r[metric]}
  out: dict[str, Any] = defaultdict(dict)
  task_seed: dict[str, dict[Any, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
  for (c, task), by_seed in per_seed.items():
    means = {seed: float(np.mean(v)) for seed, v in by_seed.items()}
    out[c][task] = {**_mean_std(list(means.values())), "per_seed": means,
                    "settings": len(next(iter(by_seed.values()))), "best": winners[(c, task)]}
    for seed, m in means.items():
      task_seed[c][seed][task] = m
  for c, by_seed in task_seed.items():
    tasks = sorted({t for d in by_seed.values() for t in d}, key=TASKS.index)
    full = [np.mean([d[t] for t in tasks]) for d in by_seed.values() if len(d) == len(tasks)]
    if full:
      out[c][AVERAGE] = {**_mean_std(full), "tasks": tasks}
  return dict(out)


SOLVED = 0.999   # accuracy above which a sweep's winner says nothing about the lr
TIE = 1e-3       # lrs whose best accuracies are this close share the win


def lr_positions(runs: list[dict[str, Any]], metric: str = "acc") -> dict[str, dict[str, int]]:
  """Where each (task, setting, seed) sweep's best lr sits in the lr grid, per combo:
  {combo: {'bottom', 'inside', 'top', 'tie', 'solved': counts}}. A winner at the grid's
  top or bottom means the grid did not bracket that run's best lr. 'solved': the best run is
  above SOLVED (several lrs solve the task, and early stopping ends the sweep at the first);
  'tie': the best accuracies of two or more lrs are within TIE of each other."""
  per_lr: dict[tuple, dict[float, float]] = defaultdict(dict)
  grid: dict[str, set[float]] = defaultdict(set)
  for r in runs:
    v = 0.0 if diverged(r, metric) else r[metric]  # as in `scores`
    c = combo(r)
    grid[c].add(r["lr"])
    key = (c, r["task"], r["setting"], r["seed"])
    per_lr[key][r["lr"]] = max(v, per_lr[key].get(r["lr"], -math.inf))
  out: dict[str, dict[str, int]] = {}
  for (c, *_), accs in per_lr.items():
    counts = out.setdefault(c, dict.fromkeys(("bottom", "inside", "top", "tie", "solved"), 0))
    best = max(accs.values())
    winners = [lr for lr, a in accs.items() if a >= best - TIE]
    lrs = sorted(grid[c])
    if best > SOLVED:
      counts["solved"] += 1
    elif len(winners) > 1:
      counts["tie"] += 1
    elif len(lrs) > 1 and winners[0] == lrs[-1]:
      counts["top"] += 1
    elif len(lrs) > 1 and winners[0] == lrs[0]:
      counts["bottom"] += 1
    else:
      counts["inside"] += 1
  return out


def _cell(s: dict[str, Any] | None) -> str:
  if s is None:
    return "-"
  return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["n"] > 1 else f"{s['mean']:.3f}"


def table(result: dict[str, Any]) -> list[str]:
  """The main table: task x member/optimizer scores, the paper's beside."""
  sc = result["scores"]
  combos = list(sc)
  tasks = [t for t in TASKS if any(t in sc[c] for c in combos)]
  head = ["task"] + combos + [f"paper: {p}" for p in PAPER]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for t in tasks + [AVERAGE]:
    row = [t] + [_cell(sc[c].get(t)) for c in combos]
    row += ["-" if PAPER[p].get(t) is None else f"{PAPER[p][t]:.3f}" for p in PAPER]
    lines.append("| " + " | ".join(row) + " |")
  return lines


def markdown(result: dict[str, Any]) -> str:
  meta = result["meta"]
  sc, micro = result["scores"], result["scores_micro"]
  combos = list(sc)
  tasks = [t for t in TASKS if any(t in sc[c] for c in combos)]
  proto = meta.get("protocol", {})
  epochs = meta.get("task_epochs") or {}
  epochs = (", ".join(f"{t} {n}" for t, n in epochs.items()) if len(set(epochs.values())) > 1
            else proto.get("epochs"))
  lines = [f"# MAD: {meta.get('tag', '')}", ""]
  model = meta.get("model") or {}
  auto = "implementation" in model and model["implementation"] is None
  lines += [
      f"Device: {meta.get('device', '?')}; jax {meta.get('jax', '?')}; {meta.get('date', '')}; "
      f"wall {meta.get('wall_s', 0):.0f} s in all, of which waiting for compiles (each "
      f"command's programs compile concurrently) {meta.get('compile_wall_s', 0):.0f} s.",
      f"Protocol: epochs {epochs} (MAD: 200), batch {proto.get('batch_size')}, "
      f"lr {list(proto.get('lrs', []))} x wd {list(proto.get('wds', []))}, cosine to "
      f"{proto.get('min_lr')}, early stop at test accuracy > {proto.get('stop_acc')}"
      + {True: " (and the rest of its seed sweep: --sweep-stop)",
         "some": " (and, in the commands with --sweep-stop, the rest of its seed sweep)"}.get(
             proto.get("stop_sweep"), "") + "; "
      + (f"W_R's lr x {proto['r_lr_mult']}; " if proto.get("r_lr_mult", 1.0) != 1.0 else "")
      + ("W_R in Muon's AdamW group; " if proto.get("r_adamw") else "")
      + f"settings: {meta.get('settings')}; seeds {meta.get('seeds')}.",
      f"Model: {model}" + ("; implementation None is the library's choice, per program in "
                           "the wall-time table's attention column" if auto else "") + ".",
      *(f"Command: `python -m parallax_jax.mad {' '.join(a)}`" + (f" ({d})" if d else "")
        for a, d in zip(meta.get("commands") or [meta.get("argv") or []],
                        meta.get("dates") or [None])),
      "Accuracy: MAD's (torchmetrics MulticlassAccuracy, average='macro', per test batch, "
      "batch-weighted mean), read at each run's lowest-test-perplexity epoch; task score = best "
      "over the sweep, mean over settings; ± = sample std over seeds."]
  n_div = sum(diverged(r) for r in result["runs"])
  if n_div:
    lines.append(f"Diverged: {n_div} of {len(result['runs'])} runs had no epoch with a finite "
                 "test perplexity; each scores 0.")
  lines.append("")
  lines += table(result)
  lines += ["", f"Paper columns: {PAPER_SOURCE}; '-' where the value was not available to us. "
            "The paper's protocol details (epochs, optimizer) may differ from this run's.", "",
            "Micro accuracy (correct / scored tokens), same selection:", "",
            "| task | " + " | ".join(combos) + " |", "|" + "---|" * (len(combos) + 1)]
  for t in tasks + [AVERAGE]:
    lines.append("| " + " | ".join([t] + [_cell(micro[c].get(t)) for c in combos]) + " |")
  pos = lr_positions(result["runs"])
  lines += ["", "Where each sweep's best lr sits in the lr grid (one count per task setting and "
            f"seed; 'solved': the best run is above {SOLVED}, which several lrs reach; 'tie': "
            f"two or more lrs within {TIE} of the best). A best lr at the grid's top or bottom "
            "was not bracketed by the grid: a wider grid may raise that score.", "",
            "| member/optimizer | bottom | inside | top | tie | solved |",
            "|---|---|---|---|---|---|"]
  for c in combos:
    n = pos.get(c, {})
    lines.append(f"| {c} | " + " | ".join(str(n.get(k, 0)) for k in
                                         ("bottom", "inside", "top", "tie", "solved")) + " |")
  lines += ["", "Wall time per program (one task setting, every seed x lr x wd run at once):", "",
            "| task | setting | member/optimizer | attention | runs | compile s | train s | "
            "epochs | s/epoch |", "|---|---|---|---|---|---|---|---|---|"]
  for p in result["programs"]:
    per = p["train_s"] / max(p["epochs_run"], 1)
    lines.append(f"| {p['task']} | {p['setting']} | {p['member']}/{p['optimizer']} | "
                 f"{p.get('attention') or '-'} | {p['runs']} | {p['compile_s']:.1f} | "
                 f"{p['train_s']:.1f} | {p['epochs_run']} | {per:.2f} |")
  return "\n".join(lines) + "\n"


def bar_chart(result: dict[str, Any], path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sc = result["scores"]
  combos = list(sc)
  tasks = [t for t in TASKS if any(t in sc[c] for c in combos)] + [AVERAGE]
  x = np.arange(len(tasks))
  width = 0.8 / max(len(combos), 1)
  fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(tasks)), 4.5))
  for i, c in enumerate(combos):
    m = [sc[c].get(t, {}).get("mean", np.nan) for t in tasks]
    s = [sc[c].get(t, {}).get("std", 0.0) for t in tasks]
    ax.bar(x - 0.4 + (i + 0.5) * width, m, width, yerr=s, capsize=2, label=c)
  for marker, (name, vals) in zip("D^", PAPER.items()):
    xs = [j for j, t in enumerate(tasks) if vals.get(t) is not None]
    ax.scatter(xs, [vals[tasks[j]] for j in xs], marker=marker, color="k", zorder=3, s=18,
               label=f"paper: {name}")
  ax.set_xticks(x, [t.replace("-in-context", "").replace("-", "\n") for t in tasks], fontsize=8)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("MAD accuracy (best of sweep)")
  ax.set_title(f"MAD: {result['meta'].get('tag', '')}")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def finalize(result: dict[str, Any]) -> dict[str, Any]:
  result["scores"] = scores(result["runs"], "acc")
  result["scores_micro"] = scores(result["runs"], "acc_micro")
  return result


def write(result: dict[str, Any], out_dir: str, tag: str, png: bool = True) -> dict[str, str]:
  """Write mad_<tag>.json / .md (/ .png) under out_dir; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  finalize(result)
  paths = {ext: os.path.join(out_dir, f"mad_{tag}.{ext}") for ext in ("json", "md", "png")}
  # through a temporary file and a rename: an interrupted write never leaves a half file
  # where the last complete result (the one a rerun resumes) was
  for ext, text in (("json", json.dumps(result, indent=1)), ("md", markdown(result))):
    tmp = paths[ext] + ".tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, paths[ext])
  if png and result["runs"]:
    bar_chart(result, paths["png"])
  return paths


def merge(paths: list[str], tag: str) -> dict[str, Any]:
  """One result from several runs' JSON files (their runs and programs concatenated)."""
  parts = []
  for p in paths:
    with open(p) as f:
      parts.append(json.load(f))
  if not parts:
    raise ValueError("merge: no result files given")
  metas = [p["meta"] for p in parts]
  meta = dict(metas[0], tag=tag,
              merged_from=[f for p, m in zip(paths, metas)
                           for f in m.get("merged_from", [os.path.basename(p)])],
              # a merged file brings the commands and dates it was merged from
              commands=[c for m in metas for c in m.get("commands", [m.get("argv")])],
              dates=[d for m in metas for d in m.get("dates", [m.get("date")])],
              tasks=[t for m in metas for t in m.get("tasks", [])],
              task_epochs={t: n for m in metas for t, n in (m.get("task_epochs") or {}).items()},
              wall_s=sum(m.get("wall_s", 0.0) for m in metas),
              compile_wall_s=sum(m.get("compile_wall_s", 0.0) for m in metas))
  meta.pop("argv", None)
  protos = [m.get("protocol") or {} for m in metas]
  if protos[0]:  # the grid is the union of the parts' grids (e.g. an lr extension)
    meta["protocol"] = dict(protos[0], **{k: sorted({x for p in protos for x in p.get(k, [])})
                                          for k in ("lrs", "wds")})
    stops = {bool(p.get("stop_sweep")) for p in protos}
    meta["protocol"]["stop_sweep"] = "some" if len(stops) > 1 else stops.pop()
  return {"meta": meta, "programs": [q for p in parts for q in p["programs"]],
          "runs": [r for p in parts for r in p["runs"]]}
