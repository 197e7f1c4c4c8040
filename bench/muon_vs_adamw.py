"""Muon against AdamW on a small model, each at its best learning rate (issue 4, bench item 3b).

A small Parallax Qwen3 (the tiny preset widened: d 128, 2 layers (scanned), 4/2 heads, Dh 32, F 384,
V 256, float32 compute) trained on a synthetic but learnable token stream: a fixed random
bigram Markov chain (each token has a few likely successors, drawn from a seeded Dirichlet),
fresh windows every step, so the training loss is also a held-out loss. Its entropy rate
is the loss floor. Same init, same data order for every run. Schedule: linear warm-up over
10 steps, then cosine decay to 10%; no weight decay in either group (optax.adamw and Muon's
AdamW group alike), b1 0.9, b2 0.95. Muon (default: quintic x5, bf16 NS, Nesterov 0.95,
update_scale "rms" 0.2) uses the same learning rate for its AdamW group (embedding, norms,
probe scalars), so the sweep compares the hidden-matrix optimizer alone.

Reports per (optimizer, lr) the final loss = mean training loss of the last 10 steps, then
reruns each optimizer's best lr with a second seed (init and data) to show run-to-run noise.

  PYTHONPATH=. python3 bench/muon_vs_adamw.py [--steps 120] [--quick]

Writes bench/results/muon_vs_adamw.{json,md}. CPU: about 5 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import environment, write_results  # noqa: E402
from parallax_jax.models import Qwen3Model, count_params, init_params, presets  # noqa: E402
from parallax_jax.optim import muon  # noqa: E402

T0 = time.time()


def log(*a):
  print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def markov_chain(vocab, seed, concentration=0.1):
  rng = np.random.default_rng(1000 + seed)
  trans = rng.dirichlet(np.full(vocab, concentration), size=vocab)  # [V, V], rows sum to 1
  # stationary distribution -> entropy rate
  w, v = np.linalg.eig(trans.T)
  pi = np.real(v[:, np.argmin(np.abs(w - 1))])
  pi = pi / pi.sum()
  h = -np.sum(pi[:, None] * trans * np.log(np.where(trans > 0, trans, 1.0)))
  return trans, float(h)


def sample_stream(trans, n_seq, length, seed):
  """n_seq independent chains of `length` tokens (inverse-CDF sampling, vectorised over chains)."""
  rng = np.random.default_rng(seed)
  cdf = np.cumsum(trans, axis=1)
  cdf[:, -1] = 1.0
  out = np.empty((n_seq, length), np.int32)
  out[:, 0] = rng.integers(0, trans.shape[0], n_seq)
  u = rng.random((n_seq, length))
  for t in range(1, length):
    rows = cdf[out[:, t - 1]]
    out[:, t] = (rows < u[:, t, None]).sum(axis=1)
  return out


def run(cfg, opt_name, lr, steps, batch, seq, data, seed):
  model = Qwen3Model(cfg)
  params = init_params(cfg, jax.random.key(seed))
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, 10, steps, end_value=0.1 * lr)
  if opt_name == "muon":
    tx = muon(sched, weight_decay=0.0)
  else:
    tx = optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.0)
  state = tx.init(params)

  def loss_fn(p, tok):
    logits = model.apply({"params": p}, tok[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()

  @jax.jit
  def step(p, s, tok):
    loss, g = jax.value_and_grad(loss_fn)(p, tok)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  losses = []
  for i in range(steps):
    tok = jnp.asarray(data[i * batch:(i + 1) * batch])
    params, state, loss = step(params, state, tok)
    losses.append(float(loss))
  final = float(np.mean(losses[-10:]))
  ok = bool(np.isfinite(final))
  return {"optimizer": opt_name, "lr": lr, "seed": seed, "final_loss": final if ok else None,
          "diverged": not ok, "loss_at": {str(k): losses[k - 1] for k in (10, 25, 50, 100, steps)
                                          if k <= steps},
          "curve_every_5": [round(x, 4) for x in losses[4::5]]}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=120)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  lrs = {"adamw": [1e-3, 3e-3, 1e-2, 3e-2], "muon": [1e-3, 3e-3, 1e-2, 3e-2]}
  if args.quick:
    args.steps, lrs = 20, {"adamw": [3e-3], "muon": [3e-3]}

  cfg = presets.tiny(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                     intermediate_size=384, max_seq_len=args.seq, scan_layers=True)
  env = environment()
  n_params = count_params(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
  trans, h = markov_chain(cfg.vocab_size, 0)
  data = {0: sample_stream(trans, args.steps * args.batch, args.seq + 1, seed=0)}
  log(f"model {n_params:,} params; bigram entropy rate {h:.4f} nats (loss floor); "
      f"uniform {np.log(cfg.vocab_size):.4f}")

  rows = []
  for opt in ("adamw", "muon"):
    for lr in lrs[opt]:
      r = run(cfg, opt, lr, args.steps, args.batch, args.seq, data[0], seed=0)
      rows.append(r)
      log(f"{opt:6s} lr {lr:g}: final {r['final_loss']}  at {r['loss_at']}")
  best = {}
  for opt in ("adamw", "muon"):
    ok = [r for r in rows if r["optimizer"] == opt and not r["diverged"]]
    best[opt] = min(ok, key=lambda r: r["final_loss"]) if ok else None
  # second seed (init and data) at each best lr
  if not args.quick:
    data[1] = sample_stream(trans, args.steps * args.batch, args.seq + 1, seed=1)
    for opt in ("adamw", "muon"):
      if best[opt] is None:
        continue
      r = run(cfg, opt, best[opt]["lr"], args.steps, args.batch, args.seq, data[1], seed=1)
      rows.append(r)
      log(f"{opt:6s} lr {r['lr']:g} seed 1: final {r['final_loss']}")

  md = [f"Final loss = mean training loss over the last 10 of {args.steps} steps "
        f"(batch {args.batch} x {args.seq}, fresh data each step). Loss floor (bigram entropy "
        f"rate) {h:.4f}, uniform {np.log(cfg.vocab_size):.4f}.", "",
        "| lr | " + " | ".join(f"{o} seed 0" for o in ("adamw", "muon")) + " |", "|---|---|---|"]
  for lr in sorted(set(lrs["adamw"]) | set(lrs["muon"])):
    cells = []
    for opt in ("adamw", "muon"):
      r = [x for x in rows if x["optimizer"] == opt and x["lr"] == lr and x["seed"] == 0]
      cells.append("" if not r else ("diverged" if r[0]["diverged"] else f"{r[0]['final_loss']:.4f}"))
    md.append(f"| {lr:g} | " + " | ".join(cells) + " |")
  md += ["", "| optimizer | best lr | seed 0 | seed 1 | loss at step 25 / 50 / 100 (seed 0) |",
         "|---|---|---|---|---|"]
  for opt in ("adamw", "muon"):
    b = best[opt]
    if b is None:
      md.append(f"| {opt} | all diverged | | | |")
      continue
    s1 = [x for x in rows if x["optimizer"] == opt and x["seed"] == 1]
    s1v = f"{s1[0]['final_loss']:.4f}" if s1 and not s1[0]["diverged"] else ""
    la = b["loss_at"]
    md.append(f"| {opt} | {b['lr']:g} | {b['final_loss']:.4f} | {s1v} | "
              f"{la.get('25', float('nan')):.4f} / {la.get('50', float('nan')):.4f} / "
              f"{la.get('100', float('nan')):.4f} |")
  notes = (f"Model: tiny preset widened (d {cfg.hidden_size}, {cfg.num_layers} layers, "
           f"{cfg.num_heads}/{cfg.num_kv_heads} heads, Dh {cfg.head_dim}, F {cfg.intermediate_size}, "
           f"V {cfg.vocab_size}, tied, parallax attention, {cfg.dtype} compute, {n_params:,} params). "
           f"Data: fixed random bigram chain, Dirichlet(0.1) rows, seeded. Schedule: warm-up 10 "
           f"steps, cosine to 10%; no weight decay; Muon defaults (quintic x5, bf16 NS, "
           f"update_scale 'rms' 0.2), its AdamW group at the same lr. Wall time {time.time() - T0:.0f} s.")
  result = {"config": cfg.to_dict(), "steps": args.steps, "batch": args.batch, "seq_len": args.seq,
            "params": n_params, "entropy_rate": h, "lrs": lrs, "runs": rows,
            "best": {o: (None if b is None else {"lr": b["lr"], "final_loss": b["final_loss"]})
                     for o, b in best.items()}}
  write_results("muon_vs_adamw" + ("_quick" if args.quick else ""), env, result, "\n".join(md), notes)
  log("done")


if __name__ == "__main__":
  main()
