"""Where a MAD program's time goes, member by member (results/mad_step.{json,md}).

One MAD program trains a whole sweep (lrs x wds x seeds) of one member at once under vmap
(parallax_jax/mad/train.py). Members with fused kernels (softmax, Parallax) took 1.4-2 s an
epoch of 18 runs on an H100; lla took 14 s, and its programs planned for more memory than the
device has. This times a short epoch of each member's program at one task setting (wall
clock, fresh parameters each call since the program donates them) and lists the kernels that
take its time (CUPTI, GPU only), so the cost of the members without kernels (the dense
[T, S] work, the batched D x D solves of lla / mesa) is measured, not guessed.

  PYTHONPATH=. python3 bench/mad_step.py [--members softmax,parallax,lla,mesa,linear]
      [--solvers direct,cholesky,unrolled] [--implementations auto] [--task in-context-recall]
      [--optimizer adamw] [--runs 18] [--steps 20] [--name mad_step] [--out DIR]

--solvers: the solve-probe members (lla, mesa) get a row per solver of their D x D systems.
--implementations: a row per attention implementation (auto: the library's choice;
moments-xla: the moment form with its weighted sum kept in XLA instead of the fused kernel).

Compiles the members' programs concurrently, then times them one at a time.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402
from bench.common import log  # noqa: E402

TOP_KERNELS = 8


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--members", default="softmax,parallax,lla,mesa,linear")
  ap.add_argument("--solvers", default="direct,cholesky,unrolled",
                  help="solvers the solve-probe members run with (a row each)")
  ap.add_argument("--implementations", default="auto",
                  help="comma list of auto (the library's choice), xla, chunked, moments, "
                  "moments-xla, pallas")
  ap.add_argument("--task", default="in-context-recall")
  ap.add_argument("--optimizer", default="adamw", choices=("adamw", "muon"))
  ap.add_argument("--runs", type=int, default=18, help="runs a program trains at once")
  ap.add_argument("--steps", type=int, default=20, help="training steps of the timed epoch")
  ap.add_argument("--iters", type=int, default=3, help="timed epoch calls")
  ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--name", default="mad_step",
                  help="results file name under bench/results (e.g. one per study of the cost)")
  ap.add_argument("--out", default=None, help="also copy the results into this directory")
  return ap.parse_args(argv)


def main(argv=None):
  a = parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from parallax_jax import moments
  from parallax_jax.mad import tasks, train
  from parallax_jax.mad.model import init_params, member_spec

  setting = tasks.baseline(a.task)
  protocol = train.Protocol(epochs=1, steps_per_epoch=a.steps)
  dtype = a.dtype if a.dtype != "auto" else (
      "bfloat16" if jax.default_backend() == "gpu" else "float32")
  impls = a.implementations.split(",")
  # (row name, member, solver, implementation): a row per solver for the members that solve
  # a system, and per implementation
  rows_spec = [("/".join([m] + [s] * (member_spec(m)[1] == "solve") + [i] * (len(impls) > 1)),
                m, s, i)
               for m in a.members.split(",")
               for s in (a.solvers.split(",") if member_spec(m)[1] == "solve" else ["direct"])
               for i in impls]
  members = [name for name, *_ in rows_spec]
  cfgs = {name: train.model_config_for(setting, width=a.width, num_heads=a.heads, dtype=dtype,
                                       member=m, solver=s,
                                       implementation={"auto": None, "moments-xla": "moments"}
                                       .get(i, i))
          for name, m, s, i in rows_spec}
  kernel_on = {name: i != "moments-xla" for name, _, _, i in rows_spec}
  shapes = train.data_shapes(setting, 1, protocol)
  log(f"compiling {len(members)} programs: {a.runs} runs of {a.task}, {a.steps} steps")
  with concurrent.futures.ThreadPoolExecutor(len(members)) as pool:
    # fitted to the device's memory as the MAD runner does (fewer runs a call if needed)
    def build(m):
      with moments.kernel_enabled(kernel_on[m]):  # traced in this thread
        return train.fitting_program(cfgs[m], a.optimizer, protocol, shapes, a.runs, log=log)
    progs = dict(zip(members, pool.map(build, members)))
  data = train.device_data(setting, (0,), protocol)
  steps_per_epoch = -(-setting.num_train // protocol.batch_size)
  env = common.environment()

  def write(rows):  # after every row, so a call cut short keeps the rows it timed
    lines = ["| member | attention | runs a call | compile s | plan GiB | timed call s (wall) | "
             f"full epoch of {a.runs} runs, s ({steps_per_epoch} steps) | largest kernels (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
      tops = "; ".join(f"{k[:40]} {v:.1f}" for k, v in r["top_kernels_ms"][:3])
      lines.append(f"| {r['member']} | {r['attention']} | {r['runs']} | {r['compile_s']} | "
                   f"{r['need_gib']} | {r['epoch_wall_s']:.3f} | "
                   f"{r['epoch_wall_s'] * r['calls'] * steps_per_epoch / a.steps:.2f} | "
                   f"{tops or '-'} |")
    notes = (f"Task {a.task} (baseline setting), optimizer {a.optimizer}, {a.runs} runs a "
             f"program (fewer a call where they do not fit the device), {a.steps} training "
             f"steps of batch {protocol.batch_size} plus the test set's evaluation per timed "
             f"call (median of {a.iters}); the full-epoch column scales the call by "
             f"{steps_per_epoch} / {a.steps} steps and by the calls "
             "(evaluation included in both, so an upper bound).")
    common.write_results(a.name, env, rows, "\n".join(lines), notes, a.out)

  rows = []
  for m in members:
    prog, cfg = progs[m], cfgs[m]
    n = prog.num_runs
    host = jax.tree.map(lambda x: np.stack([np.asarray(x)] * n), init_params(cfg, 0))
    fixed = (jnp.stack([jax.random.key(0)] * n), jnp.zeros(n, jnp.int32),
             jnp.full(n, 1e-3, jnp.float32), jnp.zeros(n, jnp.float32), jnp.ones(n, bool),
             jnp.int32(0), jnp.float32(1), *data.values())

    def call():  # the program donates parameters and state: fresh ones each call
      params = jax.tree.map(jnp.asarray, host)
      return prog.epoch(params, prog.init(params), *fixed)

    jax.block_until_ready(call())
    walls = []
    for _ in range(a.iters):
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      walls.append(time.perf_counter() - t0)
    wall = sorted(walls)[len(walls) // 2]
    kernels = common.kernel_breakdown_eager(call)
    total = sum(t for _, t in kernels if isinstance(t, float))
    by_name: dict[str, float] = {}
    for name, t in kernels:
      if isinstance(t, float):
        by_name[name] = by_name.get(name, 0.0) + t
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    row = {"member": m, "solver": cfg.solver, "attention": prog.attention, "runs": n,
           "calls": -(-a.runs // n), "steps": a.steps,
           "compile_s": round(prog.compile_s, 1),
           "need_gib": None if prog.need_bytes is None else round(prog.need_bytes / 2**30, 2),
           "epoch_wall_s": round(wall, 4), "kernels_ms": round(total, 2),
           "top_kernels_ms": [(k, round(v, 3)) for k, v in top]}
    if kernels and kernels[0][0] == "unavailable":
      row["cupti"] = kernels[0][1]
    rows.append(row)
    log(m, {k: v for k, v in row.items() if k != "top_kernels_ms"})
    for k, v in top:
      log(f"    {v:9.3f} ms  {100 * v / max(total, 1e-9):5.1f}%  {k[:90]}")
    write(rows)


if __name__ == "__main__":
  main()
