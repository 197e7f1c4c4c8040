"""Muon benchmarks (issue 4, bench item 3). Modes:

  step         Muon update time against the 0.6B forward+backward, one GPU (muon_step;
               --smoke: muon_step_smoke, any backend)
  collectives  collectives and step time of a Muon update with FSDP-sharded params on 8
               simulated CPU devices (muon_collectives)
  vs-adamw     Muon against AdamW on a small model, each at its best learning rate, CPU
               (muon_vs_adamw; --quick: muon_vs_adamw_quick)

Results go to bench/results/<name>.{json,md}.

  PYTHONPATH=. python3 bench/muon.py step [--out DIR] [--smoke]
  python3 bench/muon.py collectives [--iters 10]
  PYTHONPATH=. python3 bench/muon.py vs-adamw [--quick]
  python3 bench/muon.py MODE --help

jax is imported after the mode is known: collectives sets the device count and the CPU
platform before jax starts (vs-adamw the CPU platform, unless JAX_PLATFORMS says otherwise).
"""
from __future__ import annotations

import functools
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402
from bench.common import log  # noqa: E402


# ----------------------------------------------------------------------------- step

PEAK_TFLOPS = 790.0  # bf16 dense matmul, H100/H200 as seen on this workplace


def ns_flops(params, ns_steps: int):
  """Matmul FLOPs of the Newton-Schulz iteration over every Muon matrix.

  Per step on X [m, n], m <= n (tall matrices are iterated transposed):
    A = X X^T: 2 m^2 n;  B = b A + c A A: 2 m^3;  B X: 2 m^2 n  ->  2 (2 m^2 n + m^3).
  """
  import jax
  from parallax_jax.optim import matrix_views
  from parallax_jax.optim.routing import MatrixView
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


def recorded_attention_choices():
  """A list that collects each attention implementation the model picks
  (`implementation=None` takes the Pallas kernels on GPU where they apply)."""
  from parallax_jax import api
  chosen, choose = [], api._choose

  def recording_choose(*a, **kw):
    impl = choose(*a, **kw)
    chosen.append(impl)
    return impl

  api._choose = recording_choose
  return chosen


def step(a):
  """Times, each jitted on its own, median wall time after a warm-up call (common.time_fn):
    1. forward+backward (mean token cross-entropy and its gradients) of
       `presets.qwen3_0p6b()` at batch 8 x 4096, bf16 compute, fp32 params, scanned layers
       with remat 'full'; if the whole batch does not fit, gradient accumulation over
       micro-batches (lax.scan, same 8 x 4096 tokens per step; the micro-batch is recorded);
    2. the Muon update alone: `tx.update` + `optax.apply_updates` on the real param tree
       (NS in bf16, default quintic x 5), and optax.adamw's update for reference.
  Ratios are update / (fwd+bwd + update). Also records the attention implementation the
  model took, and the Newton-Schulz matmul FLOPs with their floor at PEAK_TFLOPS.
  --smoke runs the tiny preset at a small batch on any backend (a check of the mode only)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from parallax_jax.models import Qwen3Model, count_params, flops_per_token, init_params, presets
  from parallax_jax.optim import muon, ns_coefficients

  chosen = recorded_attention_choices()
  batch, seq, min_seconds, remat, attention = 8, 4096, 3.0, "full", "parallax"
  env = common.environment()
  env["backend"] = jax.default_backend()
  try:
    env["optax"] = optax.__version__
    import flax
    env["flax"] = flax.__version__
  except Exception:  # noqa: BLE001
    pass
  log("env", env)

  if a.smoke:
    cfg = presets.tiny(attention=attention, remat_policy=remat, scan_layers=True,
                       dtype="bfloat16")
    batch, seq, min_seconds = 4, 64, 0.2
  else:
    cfg = presets.qwen3_0p6b(attention=attention, remat_policy=remat, scan_layers=True)
  model = Qwen3Model(cfg)
  params = jax.jit(functools.partial(init_params, cfg))(jax.random.key(0))
  n_params = count_params(params)
  log("params", n_params)

  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq + 1)), jnp.int32)
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
  rows = {"config": {"preset": "tiny" if a.smoke else "qwen3_0p6b", "attention": cfg.attention,
                     "implementation_config": cfg.implementation, "remat_policy": cfg.remat_policy,
                     "scan_layers": cfg.scan_layers, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
                     "params": n_params, "batch": batch, "seq_len": seq,
                     "tokens_per_step": batch * seq, "device_bytes_limit": limit}}
  attempts = []
  t_fb = grads = None
  plans = [(None, n) for n in (1, 2, 4, 8) if batch % n == 0]
  plans += [("chunked", n) for n in (2, 4, 8) if batch % n == 0]  # if the default never ran
  for impl_cfg, accum in plans:
    if t_fb is not None:
      break
    if impl_cfg != cfg.implementation:
      cfg = cfg.replace(implementation=impl_cfg)
      model = Qwen3Model(cfg)
      log(f"falling back to implementation={impl_cfg!r}")
    fb = make_fwd_bwd(accum)
    chosen.clear()
    try:
      t = time.time()
      comp = fb.lower(params, inputs, targets).compile()
      ma = comp.memory_analysis()
      need = None
      if ma is not None:
        need = int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                   - ma.alias_size_in_bytes)
      log(f"accum {accum}: compiled in {time.time() - t:.1f}s, needs {need} B of {limit}")
      att = {"implementation_config": impl_cfg, "accum": accum, "micro_batch": batch // accum, "compile_s": time.time() - t,
             "compiled_bytes": need}
      if limit is not None and need is not None and need > 0.97 * limit:
        att["skipped"] = "compiled footprint above the device limit"
        attempts.append(att)
        continue
      impl = sorted(set(chosen))
      loss, grads = comp(params, inputs, targets)
      jax.block_until_ready(grads)
      t_fb = common.time_fn(comp, params, inputs, targets, min_iters=5, min_seconds=min_seconds)
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
  fb_flops = flops_per_token(cfg, seq, training=True) * batch * seq
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
      t = time.time()
      comp = make_step(tx).lower(params, grads, state).compile()
      c_s = time.time() - t
      t_u = common.time_fn(comp, params, grads, state, min_iters=10, min_seconds=min_seconds)
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
    ns_alone = common.time_fn(ns_fn, xs, min_iters=10, min_seconds=min_seconds)
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

  md = ["| what | ms | % of fwd+bwd+update | % of fwd+bwd |", "|---|---|---|---|",
        f"| forward+backward, {batch} x {seq} (accum {ok['accum']} x micro-batch "
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
  common.write_results("muon_step_smoke" if a.smoke else "muon_step", env, rows, "\n".join(md),
                       notes, out=a.out)
  log("done")


# ----------------------------------------------------------------------------- collectives

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(-start)?\(")
# the stacked (scanned) model of the collectives mode; NS in float32
MODEL = {"layers": 8, "d": 128, "heads": 4, "kv_heads": 2, "head_dim": 32, "ffn": 384,
         "vocab": 1024}


def model_params(layers, d, heads, kv_heads, head_dim, ffn, vocab, seed=0):
  """A stacked (nn.scan) params tree with the Parallax model's paths and layouts."""
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)
  n = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1] if len(s) > 1 else 1), jnp.float32)
  L = layers
  layer = {
      "attn": {"q_proj": {"kernel": n(L, d, heads, head_dim)}, "k_proj": {"kernel": n(L, d, kv_heads, head_dim)},
               "v_proj": {"kernel": n(L, d, kv_heads, head_dim)}, "r_proj": {"kernel": n(L, d, heads, head_dim)},
               "o_proj": {"kernel": n(L, heads, head_dim, d)}, "q_norm": {"scale": jnp.ones((L, head_dim))},
               "k_norm": {"scale": jnp.ones((L, head_dim))}, "r_norm": {"scale": jnp.ones((L, head_dim))},
               "log_bandwidth": jnp.zeros((L, heads))},
      "mlp": {"gate_proj": {"kernel": n(L, d, ffn)}, "up_proj": {"kernel": n(L, d, ffn)},
              "down_proj": {"kernel": n(L, ffn, d)}},
      "input_norm": {"scale": jnp.ones((L, d))}, "post_attn_norm": {"scale": jnp.ones((L, d))},
  }
  return {"params": {"embed": {"embedding": n(vocab, d)}, "layers": layer, "final_norm": {"scale": jnp.ones((d,))},
                     "lm_head": {"kernel": n(d, vocab)}}}


def fsdp_spec(x, n_dev, skip_leading):
  """Shard the first axis divisible by the device count (after a stacked layer axis)."""
  from jax.sharding import PartitionSpec as P
  for ax in range(1 if skip_leading and x.ndim > 1 else 0, x.ndim):
    if x.shape[ax] % n_dev == 0 and x.shape[ax] >= n_dev:
      spec = [None] * x.ndim
      spec[ax] = "fsdp"
      return P(*spec)
  return P()


def optax_dims(params):
  """optax.contrib.muon given our routing (so it runs NS on the same leaves)."""
  import jax
  from optax.contrib import MuonDimensionNumbers
  from parallax_jax.optim import matrix_views
  to_dims = lambda v: None if v is None else MuonDimensionNumbers(v.fan_in, v.fan_out)
  return jax.tree.map(to_dims, matrix_views(params), is_leaf=lambda v: v is None or hasattr(v, "fan_in"))


def optimizers(ns_steps, ns_dtype):
  import optax.contrib
  from parallax_jax.optim import muon
  kw = dict(nesterov=True, ns_steps=ns_steps)
  return {
      "optax.contrib.muon (its ndim routing)": optax.contrib.muon(0.02, **kw),
      "optax.contrib.muon (our routing)": optax.contrib.muon(0.02, muon_weight_dimension_numbers=optax_dims, **kw),
      "ours, shard_strategy=none": muon(0.02, ns_dtype=ns_dtype, shard_strategy="none", **kw),
      "ours, shard_strategy=replicate": muon(0.02, ns_dtype=ns_dtype, shard_strategy="replicate", **kw),
      "ours, shard_strategy=distribute": muon(0.02, ns_dtype=ns_dtype, shard_strategy="distribute", **kw),
  }


def build_step(tx, params, shardings):
  import jax
  import optax

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.jit(tx.init, out_shardings=None)(params)
  return jax.jit(step, in_shardings=(shardings, None, shardings), out_shardings=(shardings, None)), state


def count_collectives(hlo: str) -> dict[str, int]:
  counts = {c: 0 for c in COLLECTIVES}
  for m in _OP.finditer(hlo):
    counts[m.group(1)] += 1
  counts["total"] = sum(counts.values())
  return counts


def collectives(a):
  """For each optimizer it compiles one jitted step (update + apply, params sharded along
  their d_model axis over an 8-way "fsdp" mesh), counts the collectives in the optimized HLO
  at ns_steps=5 and ns_steps=10 (a count that grows with ns_steps means collectives inside
  the Newton-Schulz loop), times the step, and checks that our sharded updates equal the
  single-device ones."""
  import json

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from parallax_jax.optim import MUON, muon, param_labels

  n_dev = jax.device_count()
  assert n_dev == 8, f"expected 8 simulated devices, got {n_dev}"
  env = common.environment()
  mesh = jax.make_mesh((n_dev,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  params = model_params(**MODEL)
  specs = jax.tree_util.tree_map_with_path(
      lambda p, x: fsdp_spec(x, n_dev, skip_leading="layers" in jax.tree_util.keystr(p)), params)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  params = jax.device_put(params, shardings)
  grads = jax.device_put(jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(1).standard_normal(x.shape),
                                                             x.dtype), params), shardings)
  labels = jax.tree.leaves(param_labels(params))
  n_muon = sum(label == MUON for label in labels)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  optax_ndim_muon = [jax.tree_util.keystr(p, simple=True, separator="/") for p, x in flat if x.ndim == 2]
  ns_dtype = jnp.float32

  rows = []
  reference = None  # our update without any mesh, for the equality check
  for name in optimizers(5, ns_dtype):
    row = {"optimizer": name}
    for k in (5, 10):
      tx = optimizers(k, ns_dtype)[name]
      step, state = build_step(tx, params, shardings)
      t0 = time.perf_counter()
      compiled = step.lower(params, state, grads).compile()
      row[f"compile_s_ns{k}"] = round(time.perf_counter() - t0, 2)
      row[f"collectives_ns{k}"] = count_collectives(compiled.as_text())
      if k == 5:
        out = compiled(params, state, grads)
        jax.block_until_ready(out)
        times = []
        for _ in range(a.iters):
          t0 = time.perf_counter()
          jax.block_until_ready(compiled(params, state, grads))
          times.append(time.perf_counter() - t0)
        row["step_ms_median"] = round(1e3 * statistics.median(times), 2)
        row["step_ms_min"] = round(1e3 * min(times), 2)
        if name.startswith("ours"):
          if reference is None:
            local = jax.tree.map(np.asarray, (params, grads))
            tx1 = muon(0.02, ns_dtype=ns_dtype, ns_steps=5)
            reference = jax.jit(lambda p, g: optax.apply_updates(p, tx1.update(g, tx1.init(p), p)[0]))(*local)
          row["max_abs_diff_vs_unsharded"] = float(max(
              jnp.max(jnp.abs(np.asarray(x) - np.asarray(y)))
              for x, y in zip(jax.tree.leaves(out[0]), jax.tree.leaves(reference))))
    row["grows_with_ns_steps"] = row["collectives_ns10"]["total"] > row["collectives_ns5"]["total"]
    rows.append(row)
    print(f"{name:38s} collectives ns5={row['collectives_ns5']['total']:4d} ns10={row['collectives_ns10']['total']:4d}"
          f"  step {row['step_ms_median']:9.2f} ms", flush=True)

  cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
  result = {
      "bench": "muon_collectives",
      "date": env["date"], "command": env["command"],
      "device": f"{n_dev} simulated CPU devices (--xla_force_host_platform_device_count=8) on {os.cpu_count()} cores: {cpu}",
      "jax": env["jax"], "optax": optax.__version__, "python": env["python"],
      "model": MODEL, "muon_leaves": n_muon, "leaves": len(labels), "ns_dtype": "float32",
      "optax_ndim_rule_sends_to_muon": optax_ndim_muon,
      "sharding": "FSDP: every leaf sharded over 'fsdp'=8 on its first divisible axis after the layer axis",
      "step": "jit(update + apply_updates), in/out shardings = param shardings; timed over --iters runs",
      "rows": rows,
  }
  out = Path(common.RESULTS) / "muon_collectives"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
  out.with_suffix(".md").write_text(collectives_md(result))
  print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def collectives_md(r) -> str:
  m = r["model"]
  lines = [
      "# Muon update under FSDP: collectives and step time (8 simulated CPU devices)",
      "",
      f"- date: {r['date']}; jax {r['jax']}, optax {r['optax']}, python {r['python']}",
      f"- command: `{r['command']}`",
      f"- device: {r['device']}",
      f"- model (stacked layers): L={m['layers']} d={m['d']} heads={m['heads']} kv_heads={m['kv_heads']} "
      f"head_dim={m['head_dim']} ffn={m['ffn']} vocab={m['vocab']}; {r['leaves']} leaves, "
      f"{r['muon_leaves']} routed to Muon by role; NS in {r['ns_dtype']}",
      f"- {r['sharding']}",
      f"- {r['step']}",
      "",
      "| optimizer | collectives, ns_steps=5 | ns_steps=10 | grows with ns_steps | step ms (median) | max abs diff vs unsharded |",
      "|---|---|---|---|---|---|",
  ]
  for row in r["rows"]:
    c5 = row["collectives_ns5"]
    detail = ", ".join(f"{k} {v}" for k, v in c5.items() if k != "total" and v)
    diff = row.get("max_abs_diff_vs_unsharded")
    lines.append(f"| {row['optimizer']} | {c5['total']} ({detail}) | {row['collectives_ns10']['total']} | "
                 f"{'yes' if row['grows_with_ns_steps'] else 'no'} | {row['step_ms_median']} | "
                 f"{'' if diff is None else f'{diff:.1e}'} |")
  lines += [
      "",
      "A count that grows with ns_steps means collectives inside the Newton-Schulz loop. optax's default",
      "(ndim == 2) routing sends the stacked 3-D/4-D hidden weights to AdamW, so its first row does not",
      f"orthogonalise them at all, and sends these to Muon: {', '.join(r['optax_ndim_rule_sends_to_muon'])}.",
      "`replicate` has the fewest collectives (an all-gather per matrix shape) but every device",
      "orthogonalises every matrix; `distribute` moves whole matrices to devices with all-to-alls before",
      "and after the iteration and splits the work 8 ways. `none` (and optax) leave the layout to XLA.",
      "CPU timings on simulated devices that share a few cores measure compute and copies, not",
      "interconnect; treat them as relative.",
      "",
  ]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- vs-adamw


def markov_chain(vocab, seed, concentration=0.1):
  import numpy as np
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
  import numpy as np
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


def train_run(cfg, opt_name, lr, steps, batch, seq, data, seed):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from parallax_jax.models import Qwen3Model, init_params
  from parallax_jax.optim import muon
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


def vs_adamw(a):
  """A small Parallax Qwen3 (the tiny preset widened: d 128, 2 layers (scanned), 4/2 heads,
  Dh 32, F 384, V 256, float32 compute) trained on a synthetic but learnable token stream: a
  fixed random bigram Markov chain (each token has a few likely successors, drawn from a
  seeded Dirichlet), fresh windows every step, so the training loss is also a held-out loss.
  Its entropy rate is the loss floor. Same init, same data order for every run. 120 steps of
  batch 16 x 64. Schedule: linear warm-up over 10 steps, then cosine decay to 10%; no weight
  decay in either group (optax.adamw and Muon's AdamW group alike), b1 0.9, b2 0.95. Muon
  (default: quintic x5, bf16 NS, Nesterov 0.95, update_scale "rms" 0.2) uses the same
  learning rate for its AdamW group (embedding, norms, probe scalars), so the sweep compares
  the hidden-matrix optimizer alone.

  Reports per (optimizer, lr) the final loss = mean training loss of the last 10 steps, then
  reruns each optimizer's best lr with a second seed (init and data) to show run-to-run
  noise. CPU: about 5 minutes on 2 cores. --quick: 20 steps at one lr, no second seed."""
  import jax
  import numpy as np
  from parallax_jax.models import count_params, init_params, presets

  steps, batch, seq = 120, 16, 64
  lrs = {"adamw": [1e-3, 3e-3, 1e-2, 3e-2], "muon": [1e-3, 3e-3, 1e-2, 3e-2]}
  if a.quick:
    steps, lrs = 20, {"adamw": [3e-3], "muon": [3e-3]}

  cfg = presets.tiny(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                     intermediate_size=384, max_seq_len=seq, scan_layers=True)
  env = common.environment()
  n_params = count_params(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
  trans, h = markov_chain(cfg.vocab_size, 0)
  data = {0: sample_stream(trans, steps * batch, seq + 1, seed=0)}
  log(f"model {n_params:,} params; bigram entropy rate {h:.4f} nats (loss floor); "
      f"uniform {np.log(cfg.vocab_size):.4f}")

  rows = []
  for opt in ("adamw", "muon"):
    for lr in lrs[opt]:
      r = train_run(cfg, opt, lr, steps, batch, seq, data[0], seed=0)
      rows.append(r)
      log(f"{opt:6s} lr {lr:g}: final {r['final_loss']}  at {r['loss_at']}")
  best = {}
  for opt in ("adamw", "muon"):
    ok = [r for r in rows if r["optimizer"] == opt and not r["diverged"]]
    best[opt] = min(ok, key=lambda r: r["final_loss"]) if ok else None
  # second seed (init and data) at each best lr
  if not a.quick:
    data[1] = sample_stream(trans, steps * batch, seq + 1, seed=1)
    for opt in ("adamw", "muon"):
      if best[opt] is None:
        continue
      r = train_run(cfg, opt, best[opt]["lr"], steps, batch, seq, data[1], seed=1)
      rows.append(r)
      log(f"{opt:6s} lr {r['lr']:g} seed 1: final {r['final_loss']}")

  md = [f"Final loss = mean training loss over the last 10 of {steps} steps "
        f"(batch {batch} x {seq}, fresh data each step). Loss floor (bigram entropy "
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
           f"update_scale 'rms' 0.2), its AdamW group at the same lr. Wall time {time.time() - common.T0:.0f} s.")
  result = {"config": cfg.to_dict(), "steps": steps, "batch": batch, "seq_len": seq,
            "params": n_params, "entropy_rate": h, "lrs": lrs, "runs": rows,
            "best": {o: (None if b is None else {"lr": b["lr"], "final_loss": b["final_loss"]})
                     for o, b in best.items()}}
  common.write_results("muon_vs_adamw" + ("_quick" if a.quick else ""), env, result,
                       "\n".join(md), notes)
  log("done")


# ----------------------------------------------------------------------------- command line


def parser():
  ap, modes = common.mode_parser(__doc__)
  p = common.add_mode(modes, "step", step, "Muon update time against forward+backward time "
                      "for the 0.6B preset, batch 8 x 4096 (bench/results/muon_step)")
  p.add_argument("--out", default=os.environ.get("OUT"),
                 help="also copy the result files here (default: $OUT)")
  p.add_argument("--smoke", action="store_true",
                 help="the tiny preset at batch 4 x 64 on any backend (muon_step_smoke)")
  p = common.add_mode(modes, "collectives", collectives, "collectives and step time of a Muon "
                      "update with FSDP-sharded params on 8 simulated CPU devices "
                      "(bench/results/muon_collectives)")
  p.add_argument("--iters", type=int, default=10, help="timed steps per optimizer")
  p = common.add_mode(modes, "vs-adamw", vs_adamw, "Muon against AdamW on a small model, each "
                      "at its best learning rate, CPU (bench/results/muon_vs_adamw)")
  p.add_argument("--quick", action="store_true",
                 help="20 steps at lr 3e-3 only (muon_vs_adamw_quick: a check of the mode)")
  return ap


def main(argv=None):
  a = parser().parse_args(argv)
  if a.mode == "collectives":  # before jax starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
  if a.mode in ("collectives", "vs-adamw"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  a.run(a)
  return 0


if __name__ == "__main__":
  sys.exit(main())
