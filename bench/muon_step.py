"""Muon update time against forward+backward time for the 0.6B preset (issue 4, bench item 3a).

Times, each jitted on its own, median wall time after a warm-up call (bench.common.time_fn):
  1. forward+backward (mean token cross-entropy and its gradients) of `presets.qwen3_0p6b()`
     at batch 8 x 4096, bf16 compute, fp32 params, scanned layers with `remat_policy` (default
     'full'); if the whole batch does not fit, gradient accumulation over micro-batches
     (lax.scan, same 8 x 4096 tokens per step; the micro-batch is recorded);
  2. the Muon update alone: `tx.update` + `optax.apply_updates` on the real param tree
     (NS in bf16, default quintic x 5), and optax.adamw's update for reference.
Ratios are update / (fwd+bwd + update). Also records the attention implementation the model
took (`implementation=None` picks the Pallas kernels on GPU when they apply), and the
Newton-Schulz matmul FLOPs with their floor at PEAK_TFLOPS.

  PYTHONPATH=. python3 bench/muon_step.py [--out DIR] [--smoke]

--smoke runs the tiny preset at a small batch on any backend (a check of the script only).
Writes bench/results/muon_step.{json,md} (and copies them into --out when given).
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import environment, time_fn, write_results  # noqa: E402
from parallax_jax import api  # noqa: E402
from parallax_jax.models import Qwen3Model, count_params, flops_per_token, init_params, presets  # noqa: E402
from parallax_jax.optim import matrix_views, muon, ns_coefficients  # noqa: E402
from parallax_jax.optim.routing import MatrixView  # noqa: E402

PEAK_TFLOPS = 790.0  # bf16 dense matmul, H100/H200 as seen on this workplace
T0 = time.time()


def log(*a):
  print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


# ------------------------------------------------------------------ attention implementation
CHOSEN = []
_orig_choose = api._choose


def _recording_choose(*a, **kw):
  impl = _orig_choose(*a, **kw)
  CHOSEN.append(impl)
  return impl


api._choose = _recording_choose


# ------------------------------------------------------------------ NS FLOPs
def ns_flops(params, ns_steps: int):
  """Matmul FLOPs of the Newton-Schulz iteration over every Muon matrix.

  Per step on X [m, n], m <= n (tall matrices are iterated transposed):
    A = X X^T: 2 m^2 n;  B = b A + c A A: 2 m^3;  B X: 2 m^2 n  ->  2 (2 m^2 n + m^3).
  """
  views = matrix_views(params)
  total, mats = 0, {}
  leaves = jax.tree.leaves(views, is_leaf=lambda v: v is None or isinstance(v, MatrixView))
  xs = jax.tree.leaves(params)
  for v, x in zip(leaves, xs):
    if v is None:
      continue
    b, m, n = v.matrix_shape(x.shape)
    m, n = min(m, n), max(m, n)
    total += b * ns_steps * 2 * (2 * m * m * n + m ** 3)
    mats[f"[{m}, {n}]"] = mats.get(f"[{m}, {n}]", 0) + b
  return total, mats


# ------------------------------------------------------------------ main
def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT"))
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=4096)
  ap.add_argument("--remat", default="full")
  ap.add_argument("--attention", default="parallax")
  ap.add_argument("--min-seconds", type=float, default=3.0)
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()

  env = environment()
  env["backend"] = jax.default_backend()
  try:
    env["optax"] = optax.__version__
    import flax
    env["flax"] = flax.__version__
  except Exception:  # noqa: BLE001
    pass
  log("env", env)

  if args.smoke:
    cfg = presets.tiny(attention=args.attention, remat_policy=args.remat, scan_layers=True,
                       dtype="bfloat16")
    args.batch, args.seq, args.min_seconds = 4, 64, 0.2
  else:
    cfg = presets.qwen3_0p6b(attention=args.attention, remat_policy=args.remat, scan_layers=True)
  model = Qwen3Model(cfg)
  params = jax.jit(functools.partial(init_params, cfg))(jax.random.key(0))
  n_params = count_params(params)
  log("params", n_params)

  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)), jnp.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def make_fwd_bwd(accum):
    if accum == 1:
      return jax.jit(jax.value_and_grad(loss_fn))

    def fwd_bwd(p, x, y):
      xs = x.reshape(accum, -1, x.shape[-1])
      ys = y.reshape(accum, -1, y.shape[-1])

      def body(carry, mb):
        l, g = jax.value_and_grad(loss_fn)(p, *mb)
        return (carry[0] + l, jax.tree.map(jnp.add, carry[1], g)), None

      zeros = jax.tree.map(jnp.zeros_like, p)
      (l, g), _ = jax.lax.scan(body, (jnp.float32(0), zeros), (xs, ys))
      return l / accum, jax.tree.map(lambda a: a / accum, g)

    return jax.jit(fwd_bwd)

  dev = jax.devices()[0]
  try:
    limit = dev.memory_stats()["bytes_limit"]
  except Exception:  # noqa: BLE001
    limit = None
  rows = {"config": {"preset": "tiny" if args.smoke else "qwen3_0p6b", "attention": cfg.attention,
                     "implementation_config": cfg.implementation, "remat_policy": cfg.remat_policy,
                     "scan_layers": cfg.scan_layers, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
                     "params": n_params, "batch": args.batch, "seq_len": args.seq,
                     "tokens_per_step": args.batch * args.seq, "device_bytes_limit": limit}}
  attempts = []
  t_fb = grads = None
  plans = [(None, a) for a in (1, 2, 4, 8) if args.batch % a == 0]
  plans += [("chunked", a) for a in (2, 4, 8) if args.batch % a == 0]  # if the default never ran
  for impl_cfg, accum in plans:
    if t_fb is not None:
      break
    if impl_cfg != cfg.implementation:
      cfg = cfg.replace(implementation=impl_cfg)
      model = Qwen3Model(cfg)
      log(f"falling back to implementation={impl_cfg!r}")
    fb = make_fwd_bwd(accum)
    CHOSEN.clear()
    try:
      t = time.time()
      comp = fb.lower(params, inputs, targets).compile()
      ma = comp.memory_analysis()
      need = None
      if ma is not None:
        need = int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                   - ma.alias_size_in_bytes)
      log(f"accum {accum}: compiled in {time.time() - t:.1f}s, needs {need} B of {limit}")
      att = {"implementation_config": impl_cfg, "accum": accum, "micro_batch": args.batch // accum, "compile_s": time.time() - t,
             "compiled_bytes": need}
      if limit is not None and need is not None and need > 0.97 * limit:
        att["skipped"] = "compiled footprint above the device limit"
        attempts.append(att)
        continue
      impl = sorted(set(CHOSEN))
      loss, grads = comp(params, inputs, targets)
      jax.block_until_ready(grads)
      t_fb = time_fn(comp, params, inputs, targets, min_iters=5, min_seconds=args.min_seconds)
      att.update(fwd_bwd_s=t_fb, loss=float(loss), attention_implementation=impl)
      attempts.append(att)
      log(f"accum {accum}: fwd+bwd {t_fb * 1e3:.1f} ms, loss {float(loss):.3f}, attention {impl}")
    except Exception as e:  # noqa: BLE001
      log(f"accum {accum} failed: {type(e).__name__}: {str(e)[:400]}")
      attempts.append({"implementation_config": impl_cfg, "accum": accum, "error": f"{type(e).__name__}: {str(e)[:400]}"})
      grads = None
  rows["fwd_bwd_attempts"] = attempts
  if t_fb is None:
    raise SystemExit("no forward+backward configuration ran")
  ok = attempts[-1]
  fb_flops = flops_per_token(cfg, args.seq, training=True) * args.batch * args.seq
  rows["fwd_bwd"] = {"seconds": t_fb, "accum": ok["accum"], "micro_batch": ok["micro_batch"],
                     "attention_implementation": ok["attention_implementation"],
                     "model_flops": fb_flops,
                     "model_tflops_per_s": fb_flops / t_fb / 1e12,
                     "note": "model_flops = flops_per_token(training=True) = 3x forward matmul "
                             "FLOPs; remat recomputation not counted"}

  # ---------------------------------------------------------------- optimizer updates
  def make_step(tx):
    def step(p, g, s):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    return jax.jit(step)

  steps = 5
  flops, mats = ns_flops(params, steps)
  opts = {
      "muon (quintic x5, bf16 NS)": muon(3e-4, weight_decay=0.1),
      "muon (polar_express x5, bf16 NS)": muon(3e-4, weight_decay=0.1, ns_coeffs="polar_express"),
      "adamw (optax)": optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1),
  }
  upd = {}
  for name, tx in opts.items():
    try:
      state = jax.jit(tx.init)(params)
      step = make_step(tx)
      t = time.time()
      comp = step.lower(params, grads, state).compile()
      c_s = time.time() - t
      t_u = time_fn(comp, params, grads, state, min_iters=10, min_seconds=args.min_seconds)
      upd[name] = {"seconds": t_u, "compile_s": c_s,
                   "ratio_update_over_step": t_u / (t_fb + t_u),
                   "ratio_update_over_fwd_bwd": t_u / t_fb}
      log(f"{name}: {t_u * 1e3:.2f} ms, {100 * t_u / (t_fb + t_u):.2f}% of fwd+bwd+update")
      del state
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      upd[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
  rows["updates"] = upd
  # Newton-Schulz alone, on the batched shapes the update sees (fp32 in, bf16 NS, one jit).
  ns_alone = None
  try:
    from parallax_jax.optim import orthogonalize
    coeffs = ns_coefficients("quintic")
    xs = [jax.random.normal(jax.random.key(i), (b,) + tuple(int(d) for d in k.strip("[]").split(", ")))
          for i, (k, b) in enumerate(mats.items())]
    ns_fn = jax.jit(lambda xs: [orthogonalize(x, coeffs, ns_dtype=jnp.bfloat16) for x in xs])
    ns_alone = time_fn(ns_fn, xs, min_iters=10, min_seconds=args.min_seconds)
    del xs
    log(f"NS alone: {ns_alone * 1e3:.2f} ms")
  except Exception as e:  # noqa: BLE001
    traceback.print_exc()
    ns_alone = f"{type(e).__name__}: {str(e)[:300]}"
  rows["ns"] = {"ns_alone_s": ns_alone, "ns_steps": steps, "matrices (min, max) -> count": mats, "flops": flops,
                "floor_s_at_peak": flops / (PEAK_TFLOPS * 1e12), "peak_tflops": PEAK_TFLOPS,
                "count": "per step on [m, n], m <= n: 2 (2 m^2 n + m^3)"}
  mu = upd.get("muon (quintic x5, bf16 NS)", {})
  if "seconds" in mu:
    rows["ns"]["achieved_tflops_if_all_update_time_were_ns"] = flops / mu["seconds"] / 1e12
  log("ns", rows["ns"])

  # ---------------------------------------------------------------- write
  md = ["| what | ms | % of fwd+bwd+update | % of fwd+bwd |", "|---|---|---|---|",
        f"| forward+backward, {args.batch} x {args.seq} (accum {ok['accum']} x micro-batch "
        f"{ok['micro_batch']}) | {t_fb * 1e3:.1f} | | |"]
  for name, r in upd.items():
    if "seconds" in r:
      md.append(f"| {name} update + apply | {r['seconds'] * 1e3:.2f} | "
                f"{100 * r['ratio_update_over_step']:.2f} | {100 * r['ratio_update_over_fwd_bwd']:.2f} |")
    else:
      md.append(f"| {name} | failed: {r['error'][:80]} | | |")
  if isinstance(ns_alone, float):
    md.append(f"| NS alone (quintic x5, bf16, all Muon matrices batched by shape) | {ns_alone * 1e3:.2f} | "
              f"{100 * ns_alone / (t_fb + ns_alone):.2f} | {100 * ns_alone / t_fb:.2f} |")
  md.append(f"| NS matmul floor at {PEAK_TFLOPS:.0f} TFLOP/s ({flops / 1e12:.2f} TFLOP) | "
            f"{rows['ns']['floor_s_at_peak'] * 1e3:.2f} | | |")
  notes = (f"Model: {rows['config']['preset']} ({cfg.attention}, {n_params:,} params), "
           f"compute {cfg.dtype}, params {cfg.param_dtype}, remat '{cfg.remat_policy}', scanned layers; "
           f"attention implementation config {cfg.implementation!r} -> took "
           f"{ok['attention_implementation']} on backend {env['backend']}. "
           f"fwd+bwd at {rows['fwd_bwd']['model_tflops_per_s']:.0f} model TFLOP/s "
           f"(3x forward matmul FLOPs, remat not counted). Update timings: jitted "
           f"tx.update + optax.apply_updates, no buffer donation, fp32 params/grads/state.")
  name = "muon_step_smoke" if args.smoke else "muon_step"
  write_results(name, env, rows, "\n".join(md), notes)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    base = Path(__file__).resolve().parent / "results" / name
    for ext in (".json", ".md"):
      shutil.copy(str(base) + ext, args.out)
  log("done")


if __name__ == "__main__":
  main()
