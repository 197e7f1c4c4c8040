"""The study report: `python -m train.study report --out runs/study`.

Writes <out>/report.md (one section per grid under out) and per grid:
  loss_curves.png   train loss (lines) and eval loss (dots) against tokens, each arm at its
                    best lr, one line per seed; right panel: the last 60% of training
  lr_sweep.png      final eval loss against lr, one line per arm (x: diverged), per optimizer
  cor.png           COR per layer at the end, and the layer-mean COR over training
  stable_rank.png   stable rank of W_Q (solid) and W_R (dashed) over training, layer mean
  gate.png          the mean correction gate per layer at the end and over training (arms
                    with the gate, when the loop logs gate/layer_i)
The table: arm, best lr (the lowest final eval loss of the sweep seed), the lrs tried, final
eval loss mean +- sample std over the seeds at the best lr, its difference to the arm's
baseline (+- the standard error of the difference, when both have >= 2 seeds), tokens,
parameters, step time, tokens/s, MFU. Nothing is written for runs that have not ended; the
pending ones are listed. Where arms ran at two lengths (`Arm.longer_of`), the tokens the
control needs to reach the Parallax arm's loss. Last, the paper's claims about the optimizer
coupling (the Parallax - softmax gap, W_R's stable rank, COR in the deepest layers, the gate,
the token ratio) under Muon and under AdamW next to what the study measured.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import statistics
import sys
import time

from train.study import grid as grid_lib
from train.study import results as res_lib

COR_PREFIX, GATE_PREFIX, SR_PREFIX = "cor/layer_", "gate/layer_", "stable_rank/"


@dataclasses.dataclass
class ArmSummary:
  grid: str
  arm: str
  optimizer: str | None
  baseline: str | None
  note: str
  lrs: list[float]
  sweep: dict[float, dict]             # lr -> result at the sweep seed
  best: float | None
  edge: str | None
  seeds: list[dict]                    # done results at the best lr
  pending: list[str]
  unavailable: str | None = None
  longer_of: str | None = None         # '<grid>/<arm>': the same recipe at fewer tokens
  # the sweep is not complete yet: `best` is the lowest loss among its finished runs
  provisional: bool = False

  @property
  def key(self) -> str:
    return f"{self.grid}/{self.arm}"

  def losses(self) -> list[float]:
    return [r["eval_loss"] for r in self.seeds if isinstance(r.get("eval_loss"), float)]

  def mean_std(self) -> tuple[float | None, float | None, int]:
    xs = self.losses()
    if not xs:
      return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)

  def median_of(self, key: str, device: str | None = None) -> float | None:
    """Median over the best-lr runs that had the device alone (and ran on `device`)."""
    vals = [r[key] for r in self.seeds if isinstance(r.get(key), (int, float))
            and r.get("jobs", 1) == 1 and (device is None or r.get("device") == device)]
    return statistics.median(vals) if vals else None

  def first(self, key: str):
    for r in self.seeds or list(self.sweep.values()):
      if r.get(key) is not None:
        return r[key]
    return None


def _grid_files(out_grids: list[str], files: list[str]) -> dict[str, grid_lib.Grid]:
  found = {}
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), "configs", "study")
  candidates = list(files) or sorted(glob.glob(os.path.join(here, "*.py")))
  for path in candidates:
    if os.path.basename(path).startswith("_") or os.path.basename(path) == "common.py":
      continue
    try:
      g = grid_lib.load_grid(path)
    except ValueError:
      if files:  # a file the command named must load; the defaults may be anything
        raise
      continue
    if files and g.name not in out_grids:
      print(f"note: --grid {path} is grid {g.name!r}, which has no results under --out "
            f"(grids there: {', '.join(out_grids) or 'none'})", file=sys.stderr)
    if g.name in out_grids:
      found[g.name] = g
  return found


def summarize_grid(out: str, name: str, grid: grid_lib.Grid | None) -> list[ArmSummary]:
  results = res_lib.load_results(out, name)
  arms = []
  if grid is not None:
    plans = {p.arm: p for p in grid_lib.plan_grid(grid, results)}
    todo = {r.run_id for r in grid_lib.pending(grid, list(plans.values()), results)}
    for a in grid.arms:
      p = plans[a.name]
      sweep = {lr: results[f"{a.name}/lr{grid_lib.lr_key(lr)}_s{grid.sweep_seed}"]
               for lr in p.lrs
               if f"{a.name}/lr{grid_lib.lr_key(lr)}_s{grid.sweep_seed}" in results}
      best, provisional = p.best, False
      if best is None and not p.unavailable:
        # a study in progress: read the arm at its best lr so far, marked as such
        done = {lr: r["eval_loss"] for lr, r in sweep.items() if r.get("status") == "done"
                and isinstance(r.get("eval_loss"), float) and math.isfinite(r["eval_loss"])}
        if done:
          best, provisional = min(done, key=lambda lr: (done[lr], lr)), True
      seeds = [results[r.run_id] for r in p.runs if best is not None and r.lr == best
               and results.get(r.run_id, {}).get("status") == "done"]
      arms.append(ArmSummary(name, a.name, a.config.optimizer.name, a.baseline, a.note,
                             p.lrs, sweep, best, p.edge, seeds,
                             sorted(r.run_id for r in p.runs if r.run_id in todo),
                             p.unavailable, a.longer_of, provisional))
    return arms
  by_arm: dict[str, list[dict]] = {}
  for r in results.values():
    by_arm.setdefault(r["arm"], []).append(r)
  for arm, rs in sorted(by_arm.items()):  # no grid file: the lowest loss among seed-0 runs
    s0 = min(r["seed"] for r in rs)
    sweep = {r["lr"]: r for r in rs if r["seed"] == s0}
    done = {lr: r["eval_loss"] for lr, r in sweep.items() if r.get("status") == "done"
            and isinstance(r.get("eval_loss"), float)}
    best = min(done, key=done.get) if done else None
    seeds = [r for r in rs if best is not None and r["lr"] == best and r["status"] == "done"]
    opt = rs[0].get("config", {}).get("optimizer", {}).get("name")
    arms.append(ArmSummary(name, arm, opt, None, "", sorted(sweep), sweep, best, None, seeds,
                           []))
  return arms


def _fmt(x, spec=".4f", none="-"):
  return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _delta(a: ArmSummary, b: ArmSummary | None) -> str:
  if b is None:
    return "-"
  ma, sa, na = a.mean_std()
  mb, sb, nb = b.mean_std()
  if ma is None or mb is None:
    return "-"
  text = f"{ma - mb:+.4f}"
  if sa is not None and sb is not None:
    text += f" (+- {math.sqrt(sa ** 2 / na + sb ** 2 / nb):.4f})"
  return text


def timing_device(results: list[dict]) -> str | None:
  """The device most runs that had it alone ran on: the timing columns use its runs only
  (an H100's and an H200's step times are not one population)."""
  devs = [r["device"] for r in results if r.get("device") and r.get("jobs", 1) == 1
          and r.get("status") == "done"]
  return min(set(devs), key=lambda d: (-devs.count(d), d)) if devs else None


def _table(arms: list[ArmSummary], index: dict[str, ArmSummary],
           device: str | None = None) -> list[str]:
  rows = ["| arm | optimizer | best lr | lrs tried | final eval loss (mean +- std, n) | "
          "vs baseline | tokens (epochs) | params | step time (s) | tokens/s | MFU |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
  for a in arms:
    if a.unavailable:
      rows.append(f"| {a.arm} | {a.optimizer} | unavailable: {a.unavailable.split(';')[0]} "
                  "| | | | | | | | |")
      continue
    m, s, n = a.mean_std()
    loss = "-" if m is None else f"{m:.4f}" + (f" +- {s:.4f}" if s is not None else "") + \
        f" (n={n})"
    best = "-" if a.best is None else grid_lib.lr_key(a.best) + \
        (" (so far)" if a.provisional else f" ({a.edge} edge)" if a.edge else "")
    base = index.get(_resolve(a, a.baseline)) if a.baseline else None
    tokens = a.first("tokens")
    epochs = a.first("epochs")
    params = a.first("params")
    mfu = a.median_of("mfu", device)
    rows.append(
        f"| {a.arm} | {a.optimizer} | {best} | "
        f"{', '.join(grid_lib.lr_key(x) for x in sorted(a.lrs))} "
        f"| {loss} | {_delta(a, base)}" + (f" vs {a.baseline}" if base else "") +
        f" | {_fmt(tokens and tokens / 1e6, '.3g')}M"
        + (f" ({epochs:.2f})" if epochs else "") + f" | {_fmt(params and params / 1e6, '.4g')}M "
        f"| {_fmt(a.median_of('step_time_s', device), '.3f')} "
        f"| {_fmt(a.median_of('tokens_per_s', device), ',.0f')} "
        f"| {_fmt(mfu and 100 * mfu, '.1f')}{'%' if mfu else ''} |")
  return rows


def _resolve(a: ArmSummary, name: str | None) -> str | None:
  if name is None:
    return None
  return name if "/" in name else f"{a.grid}/{name}"


def _baseline(a: ArmSummary, index: dict[str, ArmSummary]) -> ArmSummary | None:
  """The arm `a` is compared with, when it has one and `a` can run here."""
  return index.get(_resolve(a, a.baseline)) if a.baseline and not a.unavailable else None


def _sweep_table(arms: list[ArmSummary]) -> list[str]:
  rows = ["| arm | lr | status | final eval loss | seeds at this lr |", "|---|---|---|---|---|"]
  for a in arms:
    if a.unavailable:
      continue
    for lr in sorted(a.lrs):
      r = a.sweep.get(lr)
      st = r.get("status") if r else ("pending" if a.pending else "-")
      extra = ""
      if lr == a.best:
        extra = ", ".join(_fmt(x) for x in a.losses())
      rows.append(f"| {a.arm} | {grid_lib.lr_key(lr)} | {st} | "
                  f"{_fmt(r.get('eval_loss') if r else None)} | {extra} |")
  return rows


def _diag_final(a: ArmSummary, prefix: str) -> list[float] | None:
  """Per-layer values at each best-lr run's last diagnostics step, averaged over seeds."""
  per_run = []
  for r in a.seeds:
    recs = res_lib.read_metrics(r["run_dir"])
    rec = next((x for x in reversed(recs) if any(k.startswith(prefix) for k in x)), None)
    if rec:
      layers = sorted((int(k[len(prefix):]), v) for k, v in rec.items()
                      if k.startswith(prefix) and k[len(prefix):].isdigit())
      per_run.append([v for _, v in layers])
  if not per_run or len({len(x) for x in per_run}) != 1:
    return None
  return [statistics.fmean(col) for col in zip(*per_run)]


def _sr_keys(rec: dict, role: str) -> list[str]:
  return [k for k in rec if k.startswith(SR_PREFIX) and k.endswith(f"/{role}")]


def _sr_final(a: ArmSummary, role: str) -> float | None:
  vals = []
  for r in a.seeds:
    recs = res_lib.read_metrics(r["run_dir"])
    rec = next((x for x in reversed(recs) if _sr_keys(x, role)), None)
    if rec:
      vals.append(statistics.fmean(rec[k] for k in _sr_keys(rec, role)))
  return statistics.fmean(vals) if vals else None


def _diag_table(arms: list[ArmSummary]) -> list[str]:
  rows = ["| arm | COR per layer (end) | COR mean | stable rank W_Q | stable rank W_R | "
          "gate per layer (end) |", "|---|---|---|---|---|---|"]
  for a in arms:
    if a.unavailable or not a.seeds:
      continue
    cor = _diag_final(a, COR_PREFIX)
    gate = _diag_final(a, GATE_PREFIX)
    rows.append(f"| {a.arm} | {' '.join(f'{x:.3f}' for x in cor) if cor else '-'} | "
                f"{_fmt(statistics.fmean(cor) if cor else None, '.3f')} | "
                f"{_fmt(_sr_final(a, 'q_proj'), '.1f')} | {_fmt(_sr_final(a, 'r_proj'), '.1f')} | "
                f"{' '.join(f'{x:.3f}' for x in gate) if gate else '-'} |")
  return rows


def _curve(a: ArmSummary, key: str) -> dict[int, float]:
  """`key` at each step every best-lr seed logged, mean over the seeds."""
  per = []
  for r in a.seeds:
    recs = res_lib.read_metrics(r["run_dir"])
    per.append({x["step"]: x[key] for x in recs if isinstance(x.get(key), float)})
  if not per:
    return {}
  steps = set.intersection(*(set(p) for p in per))
  return {s: statistics.fmean(p[s] for p in per) for s in sorted(steps)}


def _eval_curve(a: ArmSummary) -> dict[int, float]:
  """Held-out loss at each evaluation step, mean over the best-lr seeds (the steps every one
  of them logged)."""
  return _curve(a, "eval/loss")


def _gap_table(arms: list[ArmSummary], index: dict[str, ArmSummary]) -> list[str]:
  """Arm minus baseline eval loss at each evaluation step (whether a difference at the end
  was there all along, grows or closes)."""
  pairs = []
  for a in arms:
    base = _baseline(a, index)
    ca, cb = (_eval_curve(a), _eval_curve(base)) if base else ({}, {})
    common = sorted(set(ca) & set(cb))
    if common:
      pairs.append((a, base, {s: ca[s] - cb[s] for s in common}))
  if not pairs:
    return []
  steps = sorted({s for *_, d in pairs for s in d})
  rows = ["| arm - baseline (seeds) | " + " | ".join(f"step {s}" for s in steps) + " |",
          "|---|" + "---|" * len(steps)]
  for a, base, d in pairs:
    rows.append(f"| {a.arm} - {base.arm} ({len(a.seeds)}, {len(base.seeds)}) | "
                + " | ".join(f"{d[s]:+.4f}" if s in d else "-" for s in steps) + " |")
  return rows


def _split_gap_table(arms: list[ArmSummary], index: dict[str, ArmSummary]) -> list[str]:
  """Arm minus baseline eval loss on the targets that repeat an earlier bigram of their
  document (what copying predicts) and on the rest, at each evaluation both logged."""
  pairs = []
  for a in arms:
    base = _baseline(a, index)
    if base is None:
      continue
    cur = {k: (_curve(a, f"eval/loss_{k}"), _curve(base, f"eval/loss_{k}"))
           for k in ("repeat", "novel")}
    common = sorted(set.intersection(*(set(x) & set(y) for x, y in cur.values())))
    if common:
      pairs.append((a, base, {s: tuple(x[s] - y[s] for x, y in cur.values()) for s in common},
                    _curve(a, "eval/repeat_fraction")))
  if not pairs:
    return []
  steps = sorted({s for _, _, d, _ in pairs for s in d})
  rows = ["| arm - baseline: repeat / novel (repeat share) | "
          + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
  for a, base, d, frac in pairs:
    share = f"{frac[max(frac)]:.2f}" if frac else "-"
    rows.append(f"| {a.arm} - {base.arm} ({share}) | "
                + " | ".join(f"{d[s][0]:+.4f} / {d[s][1]:+.4f}" if s in d else "-"
                             for s in steps) + " |")
  return rows


def _efficiency(index: dict[str, ArmSummary]) -> list[dict]:
  """Per Parallax arm whose control also ran longer (`Arm.longer_of`): the tokens the control
  needs to reach the Parallax arm's final eval loss, as a multiple of the shorter length.
  The control's final losses at its two lengths (each run ends its own lr decay, so both are
  end-of-schedule losses) are interpolated linearly in log tokens; beyond them the ratio is
  only bounded. Means over the seeds at the best lrs."""
  longer = {a.longer_of: a for a in index.values() if a.longer_of and a.seeds}
  out = []
  for a in index.values():
    base = _baseline(a, index)
    if base is None or base.baseline is not None or not (a.seeds and base.seeds):
      continue
    base_long, long = longer.get(base.key), longer.get(a.key)
    if base_long is None:
      continue
    n1, n2 = base.seeds[0].get("tokens"), base_long.seeds[0].get("tokens")
    s1, s2, p1 = base.mean_std()[0], base_long.mean_std()[0], a.mean_std()[0]
    if not (n1 and n2 and n2 > n1 and s2 < s1):
      continue
    if p1 >= s1:
      ratio, bound = 1.0, "<="
    elif p1 <= s2:
      ratio, bound = n2 / n1, ">="
    else:
      ratio, bound = (n2 / n1) ** ((s1 - p1) / (s1 - s2)), ""
    out.append({"arm": a, "base": base, "tokens": (n1, n2), "control": (s1, s2),
                "parallax": (p1, long.mean_std()[0] if long else None),
                "ratio": ratio, "bound": bound,
                "provisional": any(x.provisional for x in (a, base, base_long, long) if x)})
  return out


def _efficiency_table(effs: list[dict]) -> list[str]:
  if not effs:
    return []
  rows = ["| Parallax arm (control) | tokens | control's final eval loss | Parallax's | "
          "Parallax - control | control's tokens to reach Parallax's loss |",
          "|---|---|---|---|---|---|"]
  for e in effs:
    (n1, n2), (s1, s2), (p1, p2) = e["tokens"], e["control"], e["parallax"]
    gap2 = _fmt(p2 - s2, "+.4f") if p2 is not None else "-"
    rows.append(f"| {e['arm'].key} ({e['base'].key}) | {n1 / 1e6:.1f}M / {n2 / 1e6:.1f}M | "
                f"{s1:.4f} / {s2:.4f} | {p1:.4f} / {_fmt(p2)} | {p1 - s1:+.4f} / {gap2} | "
                f"{e['bound']}x{e['ratio']:.2f} ({e['bound']}{e['ratio'] * n1 / 1e6:.1f}M)"
                + (" (so far)" if e["provisional"] else "") + " |")
  return rows


def _claims(index: dict[str, ArmSummary], skip: frozenset[str] = frozenset()) -> list[str]:
  """The paper's claims about the optimizer coupling next to what the study measured, per
  optimizer: the Parallax - softmax loss gap (arms whose baseline is a control, an arm
  with no baseline of its own), W_R's stable rank and the COR of the deepest quarter of
  the layers in those Parallax arms, and the mean gate of the arms that log one. The
  verdict is the stated comparison of means only; the tables above give the seed spread.
  skip: grids whose arms are left out (`Grid.claims` off)."""
  opts = ("muon", "adamw")
  pairs = {}
  # the token ratio reads the longer runs of a skipped grid, for pairs of the claims grids
  effs = [e for e in _efficiency(index) if e["arm"].grid not in skip]
  index = {k: a for k, a in index.items() if a.grid not in skip}
  for a in index.values():
    base = _baseline(a, index)
    if base is not None and base.baseline is None and a.seeds:
      pairs.setdefault(a.optimizer, (a, base))
  gap = {o: a.mean_std()[0] - b.mean_std()[0] for o, (a, b) in pairs.items() if b.seeds}
  sr = {o: _sr_final(a, "r_proj") for o, (a, _) in pairs.items()}
  deep = {}
  for o, (a, _) in pairs.items():
    cor = _diag_final(a, COR_PREFIX)
    if cor:
      deep[o] = statistics.fmean(cor[-max(1, len(cor) // 4):])
  gates, gate_prov = {}, set()
  for a in index.values():
    g = _diag_final(a, GATE_PREFIX) if a.seeds and not a.unavailable else None
    if g and a.optimizer not in gates:
      gates[a.optimizer] = statistics.fmean(g)
      if a.provisional:
        gate_prov.add(a.optimizer)
  # optimizers whose cells read an arm whose sweep is still running
  pair_prov = {o for o, (a, b) in pairs.items() if a.provisional or b.provisional}

  def cell(d, o, spec, prov=frozenset()):
    return _fmt(d.get(o), spec) + (" (so far)" if o in prov and d.get(o) is not None else "")

  def verdict(d, test, what):
    if any(d.get(o) is None for o in opts):
      return "not measured yet"
    return ("as the paper" if test(d["muon"], d["adamw"]) else "not as the paper") + \
        f" (test: {what})"

  rows = ["| claim (paper) | Muon | AdamW | verdict |", "|---|---|---|---|",
          f"| Parallax - softmax final eval loss: lower under Muon, the gap narrower or gone "
          f"under AdamW | {cell(gap, 'muon', '+.4f', pair_prov)} | "
          f"{cell(gap, 'adamw', '+.4f', pair_prov)} | "
          + verdict(gap, lambda m, a: m < 0 and m < a, "Muon gap < 0 and below AdamW's") + " |",
          f"| stable rank of W_R: collapses under AdamW (~134 -> ~10 at 0.6B), not under Muon "
          f"| {cell(sr, 'muon', '.1f', pair_prov)} | {cell(sr, 'adamw', '.1f', pair_prov)} | "
          + verdict(sr, lambda m, a: a < 0.5 * m, "AdamW's below half of Muon's") + " |",
          f"| COR, deepest quarter of the layers: > 8 under Muon, < 4 under AdamW "
          f"| {cell(deep, 'muon', '.2f', pair_prov)} | {cell(deep, 'adamw', '.2f', pair_prov)} | "
          + verdict(deep, lambda m, a: m > 8 and a < 4, "Muon > 8 and AdamW < 4") + " |",
          f"| correction gate (mean): ~1 under Muon, closes to ~0.26 under AdamW "
          f"| {cell(gates, 'muon', '.3f', gate_prov)} | {cell(gates, 'adamw', '.3f', gate_prov)} | "
          + verdict(gates, lambda m, a: a < m, "AdamW's below Muon's") + " |"]
  eff = {}
  for e in effs:
    eff.setdefault(e["arm"].optimizer, e)
  m = eff.get("muon")
  ratio = None if m is None else 1.0 if m["bound"] == "<=" else m["ratio"]
  v = ("not measured yet" if ratio is None else "not as the paper" if ratio <= 1.0 else
       "Parallax ahead by less than the paper's" if ratio < 1.05 else
       "as the paper" if ratio <= 1.09 else "Parallax ahead by more than the paper's")
  ecell = lambda o: (f"{eff[o]['bound']}x{eff[o]['ratio']:.2f}"
                     + (" (so far)" if eff[o]["provisional"] else "") if o in eff else "-")
  if m is not None and m["parallax"][1] is not None:
    # the ratio is read at the shorter length; say where the longer runs leave the lead
    (_, n2), (_, s2), (_, p2) = m["tokens"], m["control"], m["parallax"]
    if p2 >= s2:
      v += f"; at {n2 / 1e6:.1f}M tokens Parallax is not ahead ({p2 - s2:+.4f})"
  rows.append(f"| tokens: the control needs x1.05-1.09 Parallax's to reach its loss (5-8% "
              f"fewer steps to a target, 124M, Muon) | {ecell('muon')} | {ecell('adamw')} | "
              f"{v} (test: the Muon ratio against x1.05-1.09) |")
  return rows


# --------------------------------------------------------------------------- plots
def _plt():
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
  except ImportError:
    return None


def _tokens_per_step(r: dict) -> int:
  d = r.get("config", {}).get("data", {})
  return int(d.get("global_batch_size", 1)) * int(d.get("seq_len", 1))


def plot_loss_curves(arms: list[ArmSummary], path: str) -> str | None:
  plt = _plt()
  if plt is None or not any(a.seeds for a in arms):
    return None
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
  xmax, tail = 0.0, []
  for i, a in enumerate(x for x in arms if x.seeds):
    c = f"C{i % 10}"
    for j, r in enumerate(a.seeds):
      recs = res_lib.read_metrics(r["run_dir"])
      m = _tokens_per_step(r) / 1e6
      xs, ys = res_lib.series(recs, "loss")
      ex, ey = res_lib.series(recs, "eval/loss")
      if xs:
        xmax = max(xmax, xs[-1] * m)
        tail += [y for x, y in zip(xs, ys) if x >= 0.4 * xs[-1]]
      for ax in axes:
        ax.plot([x * m for x in xs], ys, color=c, lw=1.0, alpha=0.85,
                label=f"{a.arm} (lr {grid_lib.lr_key(a.best)})" if j == 0 else None)
        ax.plot([x * m for x in ex], ey, "o", color=c, ms=3.5)
  if tail:
    axes[1].set_xlim(0.4 * xmax, xmax * 1.01)
    axes[1].set_ylim(min(tail) - 0.02, max(tail) + 0.02)
  for ax, title in zip(axes, ("train loss (lines), eval loss (dots)", "last 60% of training")):
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  return _save(plt, fig, path)


def plot_gap(arms: list[ArmSummary], index: dict[str, ArmSummary], path: str) -> str | None:
  """Arm minus baseline over training: the train loss (the window mean of each log step;
  at a step both arms' runs of a seed see the same batches) as a line, the eval loss as
  dots; means over each arm's best-lr seeds. Where a gap opens and whether it closes."""
  plt = _plt()
  pairs = []
  for a in arms:
    base = _baseline(a, index)
    if base is not None and a.seeds and base.seeds:
      pairs.append((a, base))
  if plt is None or not pairs:
    return None
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  for i, (a, base) in enumerate(pairs):
    c = f"C{i % 10}"
    m = _tokens_per_step(a.seeds[0]) / 1e6
    for key, style in (("loss", "-"), ("eval/loss", "o")):
      ca, cb = _curve(a, key), _curve(base, key)
      steps = sorted(set(ca) & set(cb))
      ax.plot([s * m for s in steps], [ca[s] - cb[s] for s in steps], style, color=c,
              lw=1.0, ms=4, label=f"{a.arm} - {base.arm}" if key == "loss" else None)
  ax.axhline(0.0, color="k", lw=0.8)
  return _save_axes(plt, fig, ax, path, "loss difference (negative: arm lower)",
                    "arm - baseline: train loss (lines), eval loss (dots)")


def _save(plt, fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _save_axes(plt, fig, ax, path: str, ylabel: str, title: str) -> str:
  """Label a one-axes figure over tokens, save it to path and close it."""
  ax.set_xlabel("tokens (M)")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(plt, fig, path)


def plot_lr_sweep(arms: list[ArmSummary], path: str) -> str | None:
  plt = _plt()
  opts = sorted({a.optimizer or "?" for a in arms if a.sweep})
  if plt is None or not opts:
    return None
  fig, axes = plt.subplots(1, len(opts), figsize=(6.5 * len(opts), 4.5), squeeze=False)
  for ax, opt in zip(axes[0], opts):
    finite, diverged = [], []
    for i, a in enumerate(arms):
      if (a.optimizer or "?") != opt or not a.sweep:
        continue
      c = f"C{i % 10}"
      pts = sorted(a.sweep.items())
      ok = [(lr, r["eval_loss"]) for lr, r in pts if r.get("status") == "done"
            and isinstance(r.get("eval_loss"), float)]
      finite += [y for _, y in ok]
      diverged += [(lr, c) for lr, r in pts if r.get("status") == "diverged"]
      ax.plot([x for x, _ in ok], [y for _, y in ok], "-o", color=c, label=a.arm)
      ys = a.losses()
      if ys and a.best is not None:
        ax.errorbar([a.best], [statistics.fmean(ys)],
                    yerr=[statistics.stdev(ys)] if len(ys) > 1 else None, fmt="*", ms=11,
                    color=c, capsize=3)
    top = (max(finite) + 0.05 * (max(finite) - min(finite) + 1e-3)) if finite else 1.0
    for lr, c in diverged:  # diverged runs: an x along the top edge
      ax.plot([lr], [top], "x", color=c, ms=9, mew=2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final eval loss")
    ax.set_title(f"{opt}: lr sweep (x: diverged, *: seeds at the best lr)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  return _save(plt, fig, path)


def _layer_mean_series(recs: list[dict], prefix: str, suffix: str = ""):
  xs, ys = [], []
  for r in recs:
    vals = [v for k, v in r.items() if k.startswith(prefix) and k.endswith(suffix)
            and isinstance(v, (int, float)) and math.isfinite(v)]
    if vals:
      xs.append(r["step"])
      ys.append(statistics.fmean(vals))
  return xs, ys


def plot_layer_diag(arms: list[ArmSummary], prefix: str, label: str, path: str) -> str | None:
  """Per-layer value at the end (left) and the layer mean over training (right)."""
  plt = _plt()
  have = [(a, _diag_final(a, prefix)) for a in arms if a.seeds]
  have = [(a, v) for a, v in have if v]
  if plt is None or not have:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  for i, (a, final) in enumerate(have):
    c = f"C{i % 10}"
    axes[0].plot(range(len(final)), final, "-o", color=c, label=a.arm)
    for j, r in enumerate(a.seeds):
      recs = res_lib.read_metrics(r["run_dir"])
      xs, ys = _layer_mean_series(recs, prefix)
      tps = _tokens_per_step(r)
      axes[1].plot([x * tps / 1e6 for x in xs], ys, "-o", ms=3, color=c, alpha=0.85,
                   label=a.arm if j == 0 else None)
  axes[0].set_xlabel("layer")
  axes[0].set_title(f"{label} per layer at the end (mean over seeds)")
  axes[1].set_xlabel("tokens (M)")
  axes[1].set_title(f"{label}, mean over layers")
  for ax in axes:
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return _save(plt, fig, path)


def plot_stable_rank(arms: list[ArmSummary], path: str) -> str | None:
  plt = _plt()
  if plt is None or not any(a.seeds for a in arms):
    return None
  fig, ax = plt.subplots(figsize=(8, 4.5))
  drawn = False
  for i, a in enumerate(x for x in arms if x.seeds):
    c = f"C{i % 10}"
    for j, r in enumerate(a.seeds):
      recs = res_lib.read_metrics(r["run_dir"])
      tps = _tokens_per_step(r)
      for role, ls in (("q_proj", "-"), ("r_proj", "--")):
        xs, ys = _layer_mean_series(recs, SR_PREFIX, f"/{role}")
        if xs:
          drawn = True
          ax.plot([x * tps / 1e6 for x in xs], ys, ls, marker="o", ms=3, color=c, alpha=0.85,
                  label=f"{a.arm} {'W_Q' if role == 'q_proj' else 'W_R'}" if j == 0 else None)
  if not drawn:
    plt.close(fig)
    return None
  return _save_axes(plt, fig, ax, path, "stable rank (mean over layers)",
                    "stable rank of W_Q (solid) and W_R (dashed)")


# --------------------------------------------------------------------------- report
def write_report(out: str, grid_files: list[str] | None = None, log=print) -> str:
  names = res_lib.grids_under(out)
  if not names:
    raise FileNotFoundError(f"report: no study grids under {out!r}")
  grids = _grid_files(names, list(grid_files or []))
  # grids compared against another grid's arms come after it (main before gate and wr), and
  # the grids outside the claims table after those in it (main before long)
  names.sort(key=lambda n: (any(a.baseline and "/" in a.baseline
                                for a in (grids[n].arms if n in grids else ())),
                            not (grids[n].claims if n in grids else True), n))
  summaries = {n: summarize_grid(out, n, grids.get(n)) for n in names}
  index = {a.key: a for arms in summaries.values() for a in arms}
  all_results = [r for n in names for r in res_lib.load_results(out, n).values()]
  devices = sorted({r.get("device") for r in all_results if r.get("device")})
  tdev = timing_device(all_results)
  corpora = sorted({r.get("corpus_sha256")[:12] for r in all_results if r.get("corpus_sha256")})
  commits = sorted({r.get("commit") for r in all_results if r.get("commit")})
  jaxes = sorted({r.get("jax") for r in all_results if r.get("jax")})
  lines = ["# Quality study: results", "",
           f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `python -m train.study report "
           f"--out {out}` from {len(all_results)} runs. Devices: {', '.join(devices) or '-'}; "
           f"jax: {', '.join(jaxes) or '-'}; corpus: {', '.join(corpora) or '-'}; "
           f"commits: {', '.join(commits) or '-'}.", "",
           "Final eval loss: the loss on the held-out split at the last step; mean +- sample "
           "std over the seeds at the arm's best lr (the sweep seed's lowest loss; \"so far\": "
           "the sweep is still running and the arm is read at its best finished lr). Step time, "
           "tokens/s and MFU: medians over logged windows of runs that had the device alone"
           + (f", on {tdev} only" if len(devices) > 1 and tdev else "") + ".", ""]
  for n in names:
    arms = summaries[n]
    g = grids.get(n)
    gdir = os.path.join(out, n)
    lines += [f"## {n}" + (f": {g.description}" if g and g.description else ""), ""]
    lines += _table(arms, index, tdev) + [""]
    pend = [f"{a.arm}/{x.split('/', 1)[1]}" for a in arms for x in a.pending]
    if pend:
      lines += [f"Not yet run ({len(pend)}; the plan grows as sweeps end): "
                + ", ".join(pend), ""]
    failed = [r for r in res_lib.load_results(out, n).values() if r.get("status") == "failed"]
    for r in failed:
      lines.append(f"- failed: {r.get('run_id')} ({r.get('failures')} failures): {r.get('error')}")
    if failed:
      lines.append("")
    lines += ["Learning-rate sweeps:", ""] + _sweep_table(arms) + [""]
    gap = _gap_table(arms, index)
    if gap:
      lines += ["Eval loss over training, arm minus its baseline at their best lrs (mean over "
                "seeds; negative: the arm is lower):", ""] + gap + [""]
    split = _split_gap_table(arms, index)
    if split:
      lines += ["The same gap on the targets that repeat an earlier bigram of their document "
                "(a copy predicts them) and on the rest (runs that log the split):", ""] \
          + split + [""]
    diag = _diag_table(arms)
    if len(diag) > 2:
      lines += ["Diagnostics at the end of the best-lr runs (mean over seeds):", ""] + diag + [""]
    plots = [plot_loss_curves(arms, os.path.join(gdir, "loss_curves.png")),
             plot_gap(arms, index, os.path.join(gdir, "gap.png")),
             plot_lr_sweep(arms, os.path.join(gdir, "lr_sweep.png")),
             plot_layer_diag(arms, COR_PREFIX, "COR", os.path.join(gdir, "cor.png")),
             plot_stable_rank(arms, os.path.join(gdir, "stable_rank.png")),
             plot_layer_diag(arms, GATE_PREFIX, "gate", os.path.join(gdir, "gate.png"))]
    made = [p for p in plots if p]
    if _plt() is None:
      lines += ["(plots skipped: matplotlib is not installed)", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, out)})" for p in made] + [""]
    gate_arms = [a.arm for a in arms if g is not None and a.seeds and not a.unavailable
                 and grid_lib.arm_config(g.arm(a.arm)).model.correction_gate]
    if gate_arms and not any(_diag_final(a, GATE_PREFIX) for a in arms if a.arm in gate_arms):
      lines += [f"(gate: {', '.join(gate_arms)} have the gate on but their metrics hold no "
                "gate/layer_i: the loop that ran them did not log it)", ""]
  eff = _efficiency_table(_efficiency(index))
  if eff:
    lines += ["## Token efficiency", "",
              "The tokens the softmax control needs to reach the Parallax arm's final eval loss, "
              "from the control's final losses at two lengths (each run ends its own lr "
              "decay) interpolated linearly in log tokens; outside the two lengths only a bound. "
              "Means over the seeds at the best lrs.", ""] + eff + [""]
  lines += ["## The paper's claims, as measured", "",
            "Means over the seeds at each arm's best lr; the Parallax arms are those compared "
            "with a softmax control, the gate from the arms that log one.", ""]
  lines += _claims(index, frozenset(n for n, g in grids.items() if not g.claims)) + [""]
  path = os.path.join(out, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  log(f"report: {path}")
  return path
