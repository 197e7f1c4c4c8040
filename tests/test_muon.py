"""Muon: Newton-Schulz against its exact polynomial oracle, routing by role, optax parity."""
import functools
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
from optax.contrib import _muon as optax_muon
import pytest

from parallax_jax.optim import (MUON, ADAM, MatrixView, Routing, Rule, describe, matrix_views, muon,
                                ns_coefficients, orthogonalize, param_labels, scalar_map, scale_by_muon,
                                singular_value_band, stable_rank, stable_ranks, update_rms)
from parallax_jax.optim.muon import ScaleByMuonState, add_decayed_weights

D, H, HKV, DH, F, V, L = 16, 2, 1, 8, 24, 40, 2


def _layer(rng, stack=()):
  n = lambda *s: jnp.asarray(rng.standard_normal(stack + s), jnp.float32)
  return {
      "attn": {
          "q_proj": {"kernel": n(D, H, DH)}, "k_proj": {"kernel": n(D, HKV, DH)},
          "v_proj": {"kernel": n(D, HKV, DH)}, "r_proj": {"kernel": n(D, H, DH)},
          "o_proj": {"kernel": n(H, DH, D)},
          "q_norm": {"scale": n(DH)}, "k_norm": {"scale": n(DH)}, "r_norm": {"scale": n(DH)},
          "log_bandwidth": n(H), "gate": {"kernel": n(D, H), "bias": n(H)},
      },
      "mlp": {"gate_proj": {"kernel": n(D, F)}, "up_proj": {"kernel": n(D, F)}, "down_proj": {"kernel": n(F, D)}},
      "input_norm": {"scale": n(D)}, "post_attn_norm": {"scale": n(D)},
  }


def fake_params(stacked=False, tied=False, seed=0):
  """A params tree shaped like the Parallax Linen model (paths and axis layout)."""
  rng = np.random.default_rng(seed)
  p = {"embed": {"embedding": jnp.asarray(rng.standard_normal((V, D)), jnp.float32)},
       "final_norm": {"scale": jnp.ones((D,))}}
  if stacked:
    p["layers"] = _layer(rng, (L,))
  else:
    p.update({f"layers_{i}": _layer(rng) for i in range(L)})
  if not tied:
    p["lm_head"] = {"kernel": jnp.asarray(rng.standard_normal((D, V)), jnp.float32)}
  return {"params": p}


def _small(params):
  """A few leaves of each kind from a stacked tree (fewer leaves: faster compiles)."""
  p = params["params"]
  a, m = p["layers"]["attn"], p["layers"]["mlp"]
  return {"params": {"embed": p["embed"], "lm_head": p["lm_head"], "final_norm": p["final_norm"],
                     "layers": {"attn": {k: a[k] for k in ["q_proj", "r_proj", "o_proj", "log_bandwidth"]},
                                "mlp": {"down_proj": m["down_proj"]}}}}


def _oracle(g, coeffs, safety=1.01, eps=1e-7):
  """U f(S / (||G||_F safety + eps)) V^T in float64."""
  g = np.asarray(g, np.float64)
  u, s, vt = np.linalg.svd(g, full_matrices=False)
  return (u * scalar_map(coeffs, s / (np.linalg.norm(g) * safety + eps))) @ vt


# ----------------------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", [(20, 12), (16, 16), (3, 8, 28)])
@pytest.mark.parametrize("sched,atol", [("quintic", 1e-6), ("polar_express", 5e-6),
                                        ([(3.0, -3.2, 1.2), (2.0, -1.5, 0.5), (1.5, -0.5, 0.0)], 1e-6)])
def test_ns_equals_polynomial_oracle(shape, sched, atol):
  # Polar Express's first polynomial has slope 8.2 at 0, so fp32 round-off grows to
  # ~3e-6; the quintic and milder lists stay below 1e-6.
  coeffs = ns_coefficients(sched)
  g = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  out = np.asarray(orthogonalize(jnp.asarray(g), coeffs, ns_dtype=jnp.float32))
  want = np.stack([_oracle(m, coeffs) for m in g.reshape((-1,) + shape[-2:])]).reshape(shape)
  np.testing.assert_allclose(out, want, atol=atol, rtol=0)


def test_ns_coefficient_schedules():
  assert ns_coefficients("quintic") == ((3.4445, -4.7750, 2.0315),) * 5
  assert len(ns_coefficients("quintic", 7)) == 7
  pe = ns_coefficients("polar_express", 10)
  assert len(pe) == 10 and pe[7:] == ((1.875, -1.25, 0.375),) * 3
  np.testing.assert_allclose(pe[0], (8.28721201814563 / 1.01, -23.595886519098837 / 1.01**3,
                                     17.300387312530933 / 1.01**5))
  assert ns_coefficients("polar_express", 3) == pe[:3]  # a prefix, never a suffix
  assert ns_coefficients((1.0, 2.0, 3.0), 2) == ((1.0, 2.0, 3.0),) * 2
  three = [(3.0, -3.0, 1.0)] * 3
  assert len(ns_coefficients(three)) == 3 and len(ns_coefficients(three, 3)) == 3
  with pytest.raises(ValueError, match="ns_steps=5 disagrees"):
    ns_coefficients(three, 5)


@pytest.mark.parametrize("sched", ["quintic", "polar_express"])
@pytest.mark.parametrize("ns_dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 0.08)])
def test_singular_values_inside_measured_band(sched, ns_dtype, tol):
  # bf16 round-off measured: up to ~0.025 outside the band for the quintic, ~0.07 below
  # it for Polar Express.
  coeffs = ns_coefficients(sched)
  g = np.random.default_rng(1).standard_normal((4, 48, 128)).astype(np.float32)
  g[1] = np.swapaxes(np.random.default_rng(2).standard_normal((4, 128, 48)), -1, -2)[1]
  s_in = np.linalg.svd(g, compute_uv=False) / (np.linalg.norm(g, axis=(1, 2))[:, None] * 1.01)
  lo, hi = singular_value_band(coeffs, s_in.min(), s_in.max())
  s_out = np.linalg.svd(np.asarray(orthogonalize(jnp.asarray(g), coeffs, ns_dtype=ns_dtype), np.float32),
                        compute_uv=False)
  assert lo - tol <= s_out.min() and s_out.max() <= hi + tol, (s_out.min(), s_out.max(), lo, hi)
  if sched == "quintic":  # Keller Jordan's quintic x5 lands in about [0.68, 1.2]
    assert 0.68 <= lo and hi <= 1.21
    band = singular_value_band(coeffs, 1e-3)
    assert band[1] == pytest.approx(1.2024, abs=1e-3)
  else:  # Polar Express is tighter around 1
    assert 0.85 <= lo and hi <= 1.13


@pytest.mark.parametrize("shape", [(12, 20), (16, 16)])
def test_ns_of_transpose_is_transpose(shape):
  coeffs = ns_coefficients("quintic")
  g = jnp.asarray(np.random.default_rng(3).standard_normal(shape), jnp.float32)
  a = orthogonalize(g.T, coeffs, ns_dtype=jnp.float32)
  b = orthogonalize(g, coeffs, ns_dtype=jnp.float32).T
  np.testing.assert_allclose(a, b, atol=0 if shape[0] != shape[1] else 1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zero_gradients_zero_updates(dtype):
  params = jax.tree.map(lambda x: x.astype(dtype), _small(fake_params(stacked=True)))
  tx = muon(0.02, weight_decay=0.1, ns_dtype=dtype, mu_dtype=dtype)
  params = jax.tree.map(jnp.zeros_like, params)  # zero params too, so decay adds nothing
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(2):
    updates, state = jax.jit(tx.update)(zeros, state, params)
  for u in jax.tree.leaves(updates):
    assert u.dtype == dtype
    assert not np.any(np.isnan(np.asarray(u, np.float32))) and not np.any(np.asarray(u, np.float32))


# ----------------------------------------------------------------------------- optax parity


def _matrices(seed):
  rng = np.random.default_rng(seed)
  return {"a": jnp.asarray(rng.standard_normal((16, 40)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal((40, 16)), jnp.float32)}


@pytest.mark.parametrize("nesterov,steps,consistent_rms", [(False, 3, None), (True, 1, 0.2)])
def test_agrees_with_optax_contrib_scale_by_muon(nesterov, steps, consistent_rms):
  # Same definition when: fp32 iteration, no safety factor, the same eps, and either no
  # Nesterov (bias correction is a scale, which orthogonalisation removes) or the first
  # step only (optax's bias-corrected Nesterov mixes g and m with other weights later).
  ours = optax.chain(
      scale_by_muon(ns_dtype=jnp.float32, ns_safety=1.0, ns_eps=1e-8, nesterov=nesterov,
                    update_scale="shape" if consistent_rms is None else "rms", rms=consistent_rms or 0.2),
      optax.scale(-0.1))
  dims = lambda p: jax.tree.map(lambda _: optax_muon.MuonDimensionNumbers(), p)
  ref = optax.chain(optax.contrib.scale_by_muon(nesterov=nesterov, eps=1e-8, weight_dimension_numbers=dims),
                    optax_muon.scale_by_shape(dims, consistent_rms=consistent_rms), optax.scale(-0.1))
  params = _matrices(0)
  s1, s2 = ours.init(params), ref.init(params)
  up1, up2 = jax.jit(ours.update), jax.jit(ref.update)
  for t in range(steps):
    g = _matrices(t + 1)
    u1, s1 = up1(g, s1, params)
    u2, s2 = up2(g, s2, params)
    chex.assert_trees_all_close(u1, u2, atol=2e-6)


def test_full_muon_agrees_with_optax_contrib_muon_where_routing_coincides():
  # On 2-D hidden matrices and 1-D norms the ndim rule and the role rule agree.
  rng = np.random.default_rng(0)
  params = {"mlp": {"up_proj": {"kernel": jnp.asarray(rng.standard_normal((16, 40)), jnp.float32)},
                    "down_proj": {"kernel": jnp.asarray(rng.standard_normal((40, 16)), jnp.float32)}},
            "final_norm": {"scale": jnp.ones((16,))}}
  ours = muon(0.05, adam_learning_rate=0.01, adam_b2=0.999, ns_dtype=jnp.float32, ns_safety=1.0, ns_eps=1e-8,
              nesterov=False, update_scale="shape", weight_decay=0.1)
  ref = optax.contrib.muon(0.05, adam_learning_rate=0.01, nesterov=False, eps=1e-8, weight_decay=0.1)
  s1, s2 = ours.init(params), ref.init(params)
  up1, up2 = jax.jit(ours.update), jax.jit(ref.update)
  p1 = p2 = params
  for t in range(3):
    g = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(t).standard_normal(x.shape), x.dtype), params)
    u1, s1 = up1(g, s1, p1)
    u2, s2 = up2(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  chex.assert_trees_all_close(p1, p2, atol=1e-5)


# ----------------------------------------------------------------------------- routing


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_routing_by_role_on_model_shaped_tree(stacked, tied):
  params = fake_params(stacked=stacked, tied=tied)
  labels = {"/".join(str(k.key) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(param_labels(params))[0]}
  muon_paths = {k for k, v in labels.items() if v == MUON}
  layer_names = ["layers"] if stacked else [f"layers_{i}" for i in range(L)]
  want = {f"params/{ly}/{m}/kernel" for ly in layer_names
          for m in ["attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/r_proj", "attn/o_proj",
                    "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"]}
  assert muon_paths == want
  assert labels["params/embed/embedding"] == ADAM
  assert tied or labels["params/lm_head/kernel"] == ADAM
  views = matrix_views(params)
  ly = layer_names[0]
  q = views["params"][ly]["attn"]["q_proj"]["kernel"]
  o = views["params"][ly]["attn"]["o_proj"]["kernel"]
  x_q = params["params"][ly]["attn"]["q_proj"]["kernel"]
  x_o = params["params"][ly]["attn"]["o_proj"]["kernel"]
  nb = L if stacked else 1
  assert q.matrix_shape(x_q.shape) == (nb, D, H * DH)  # fan-in d
  assert o.matrix_shape(x_o.shape) == (nb, H * DH, D)
  text = describe(params)  # every leaf is claimed by a rule; embed/head lines say adam
  assert "<unmatched>" not in text and len(text.splitlines()) == len(labels)
  assert all(f" {ADAM} " in ln for ln in text.splitlines() if "embed/" in ln or "lm_head/" in ln)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_routing_on_the_real_model(scan, tied):
  models = pytest.importorskip("parallax_jax.models")
  cfg = models.presets.tiny(scan_layers=scan, tie_embeddings=tied, learnable_bandwidth=True,
                            correction_gate=True, r_norm=True)
  params = models.abstract_params(cfg)
  routing = Routing(unmatched="error")  # every leaf of the real model is claimed by a rule
  labels = {"/".join(str(k.key) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(param_labels(params, routing))[0]}
  assert labels["embed/embedding"] == ADAM and labels.get("lm_head/kernel", ADAM) == ADAM
  assert ("lm_head/kernel" in labels) != tied
  kinds = ["attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/r_proj", "attn/o_proj",
           "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"]
  names = ["layers"] if scan else [f"layers_{i}" for i in range(cfg.num_layers)]
  assert {k for k, v in labels.items() if v == MUON} == {f"{n}/{k}/kernel" for n in names for k in kinds}
  jax.eval_shape(muon(1e-3, routing=routing).init, params)  # matrix views fit every shape
  # Boxed params (nn.Partitioned from with_logical_partitioning) route the same way.
  model = models.Qwen3Model(cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
  assert jax.tree.leaves(param_labels(boxed, routing)) == jax.tree.leaves(param_labels(params, routing))


@pytest.fixture(scope="module")
def one_step():
  """One jitted muon() step on the stacked model tree (mu in bf16), shared by tests."""
  params = _small(fake_params(stacked=True))
  tx = muon(1e-3, mu_dtype=jnp.bfloat16)
  g = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), x.dtype), params)
  updates, state = jax.jit(tx.update)(g, tx.init(params), params)
  return params, g, updates, state


def test_embedding_and_head_get_adamw_updates(one_step):
  _, g, updates, _ = one_step
  for name, leaf in [("embed", "embedding"), ("lm_head", "kernel")]:
    u, gg = updates["params"][name][leaf], g["params"][name][leaf]
    # First AdamW step is -lr * g / (|g| + eps) = -lr * sign(g); Muon's never is.
    np.testing.assert_allclose(u, -1e-3 * np.sign(gg), rtol=1e-2)


def test_unknown_leaves_default_to_adamw_and_strict_mode_raises():
  params = {"encoder": {"dense": {"kernel": jnp.ones((8, 8))}}, "mlp": {"up_proj": {"kernel": jnp.ones((8, 4))}}}
  assert param_labels(params) == {"encoder": {"dense": {"kernel": ADAM}}, "mlp": {"up_proj": {"kernel": MUON}}}
  assert "<unmatched>" in describe(params).splitlines()[0]
  with pytest.raises(ValueError, match="encoder/dense/kernel"):
    param_labels(params, Routing(unmatched="error"))
  custom = Routing().with_rules(Rule(r"dense/kernel$", MUON, MatrixView(2, (0,), (1,))))
  assert param_labels(params, custom)["encoder"]["dense"]["kernel"] == MUON
  # A broad user rule appended after the guards still cannot capture embed / lm_head.
  broad = Routing(rules=Routing().rules + (Rule(r"kernel$|embedding$", MUON, MatrixView(2, (0,), (1,))),))
  labels = param_labels(fake_params(), broad)["params"]
  assert labels["embed"]["embedding"] == ADAM and labels["lm_head"]["kernel"] == ADAM


@functools.lru_cache
def _muon_branch(routing):
  tx = scale_by_muon(routing=routing, ns_dtype=jnp.float32, nesterov=False, beta=0.0)
  return tx.init, jax.jit(tx.update)  # cached: same-shaped calls reuse the compilation


def _run_muon_branch(params, routing):
  init, update = _muon_branch(routing)
  return update(params, init(params))[0]


def test_per_head_equals_loop_over_heads():
  params = fake_params()["params"]
  q = params["layers_0"]["attn"]["q_proj"]["kernel"]  # [D, H, DH]
  out = _run_muon_branch({"attn": {"q_proj": {"kernel": q}}}, Routing(per_head=True))["attn"]["q_proj"]["kernel"]
  coeffs = ns_coefficients("quintic")
  scale = 0.2 * max(D, DH) ** 0.5
  for h in range(H):
    want = scale * orthogonalize(q[:, h, :], coeffs, ns_dtype=jnp.float32)
    np.testing.assert_allclose(out[:, h, :], want, atol=1e-6)
  whole = _run_muon_branch({"attn": {"q_proj": {"kernel": q}}}, Routing())["attn"]["q_proj"]["kernel"]
  assert not np.allclose(whole, out, atol=1e-3)  # per-head is a different map


def test_stacked_leaves_are_orthogonalised_per_layer():
  layers = fake_params(stacked=True)["params"]["layers"]
  stacked = {"attn": {k: layers["attn"][k] for k in ["q_proj", "o_proj"]}, "mlp": {"down_proj": layers["mlp"]["down_proj"]}}
  out = _run_muon_branch({"layers": stacked}, Routing())["layers"]
  for i in range(L):
    one = _run_muon_branch({"layers_0": jax.tree.map(lambda x: x[i], stacked)}, Routing())["layers_0"]
    chex.assert_trees_all_close(one, jax.tree.map(lambda x: x[i], out), atol=1e-6)


def test_rank_mismatch_is_a_clear_error():
  params = {"layers": {"attn": {"q_proj": {"kernel": jnp.ones((D, H * DH))}}}}  # stacked but 2-D
  with pytest.raises(ValueError, match=r"layers/attn/q_proj/kernel.*rank-4"):
    scale_by_muon(routing=Routing()).init(params)


# ----------------------------------------------------------------------------- config, wd, diagnostics


@pytest.mark.parametrize("kwargs,key", [
    ({"beta": 1.0}, "beta"), ({"ns_steps": 0}, "ns_steps"), ({"ns_coeffs": "cubic"}, "ns_coeffs"),
    ({"ns_coeffs": [(3.0, -3.0, 1.0)] * 3, "ns_steps": 5}, "ns_steps"), ({"ns_coeffs": [(1.0, 2.0)]}, "ns_coeffs"),
    ({"ns_dtype": jnp.float16}, "ns_dtype"), ({"update_scale": "spectral"}, "update_scale"),
    ({"shard_strategy": "gather"}, "shard_strategy"), ({"weight_decay": -0.1}, "weight_decay"),
    ({"adam_b2": 1.5}, "adam_b2"), ({"ns_safety": 0.9}, "ns_safety"), ({"routing": "default"}, "routing"),
    ({"weight_decay": float("inf")}, "weight_decay"), ({"rms": float("inf")}, "rms"),
    ({"weight_decay": "0.1"}, "weight_decay"), ({"mu_dtype": jnp.int32}, "mu_dtype"),
])
def test_bad_config_raises_naming_the_key(kwargs, key):
  with pytest.raises(ValueError, match=key):
    muon(0.02, **kwargs)


@pytest.mark.parametrize("lr, adam_lr, key", [
    (-0.02, None, "learning_rate"), (float("nan"), None, "learning_rate"),
    (0.02, float("inf"), "adam_learning_rate"), (0.02, -1.0, "adam_learning_rate"),
    (None, None, "learning_rate"), ("0.1", None, "learning_rate"),  # None: gradient ascent
    (np.float32(-1e-3), None, "learning_rate")])
def test_bad_learning_rate_is_refused(lr, adam_lr, key):
  with pytest.raises(ValueError, match=f"^{key} must be a finite number >= 0"):
    muon(lr, adam_learning_rate=adam_lr)
  muon(optax.constant_schedule(0.02))  # schedules are not evaluated here


def test_injected_hyperparameters_match_the_plain_optimizer():
  """optax.inject_hyperparams(muon, static_args=MUON_STATIC_ARGS): lr and weight decay as
  state (to log or change them), the same update under jit."""
  from parallax_jax.optim import MUON_STATIC_ARGS
  params = {"layers_0": {"attn": {"q_proj": {"kernel": jnp.full((D, H, DH), 0.1)}}},
            "embed": {"embedding": jnp.full((5, D), 0.1)}}
  grads = jax.tree.map(lambda x: 0.1 + jnp.arange(x.size).reshape(x.shape) * 1e-3, params)
  tx = optax.inject_hyperparams(muon, static_args=MUON_STATIC_ARGS)(learning_rate=1e-2,
                                                                    weight_decay=0.1)
  u, state = jax.jit(tx.update)(grads, tx.init(params), params)
  ref = muon(1e-2, weight_decay=0.1)
  want, _ = jax.jit(ref.update)(grads, ref.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), u, want)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)


def test_bad_rules_raise():
  with pytest.raises(ValueError, match="Rule.label"):
    Rule("x", "sgd")
  with pytest.raises(ValueError, match="Rule.view"):
    Rule("x", MUON)
  with pytest.raises(ValueError, match="MatrixView"):
    MatrixView(2, (0,), (0,))


def test_cautious_weight_decay_only_where_signs_agree():
  p = {"w": jnp.array([1.0, 1.0, -1.0, -1.0])}
  u = {"w": jnp.array([0.5, -0.5, 0.5, -0.5])}
  out, _ = add_decayed_weights(0.1, cautious=True).update(u, optax.EmptyState(), p)
  np.testing.assert_allclose(out["w"], [0.6, -0.5, 0.5, -0.6])


def test_mu_dtype_and_diagnostics(one_step):
  params, _, updates, state = one_step
  is_state = lambda x: isinstance(x, (ScaleByMuonState, optax.ScaleByAdamState))
  moments = [x.mu for x in jax.tree.leaves(state, is_leaf=is_state) if is_state(x)]
  assert len(moments) == 2 and all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(moments))
  rms = update_rms(updates, param_labels(params))
  # "rms" scaling: orthogonal update * 0.2 sqrt(max(m, n)) has RMS ~0.2 (singular values ~0.7-1.1)
  assert 0.13e-3 < float(rms[MUON]) < 0.23e-3
  assert float(rms[ADAM]) == pytest.approx(1e-3, rel=1e-2)  # AdamW first step: |u| = lr
  sr = stable_ranks(params)
  assert set(sr) == {"params/layers/attn/q_proj/kernel", "params/layers/attn/r_proj/kernel"}
  assert sr["params/layers/attn/q_proj/kernel"].shape == (L,)
  np.testing.assert_allclose(stable_rank(jnp.eye(6)), [6.0], rtol=1e-6)
  np.testing.assert_allclose(stable_rank(jnp.outer(jnp.arange(1.0, 5), jnp.ones(3))), [1.0], rtol=1e-5)


# ----------------------------------------------------------------------------- sharding (8 CPU devices)

_SHARDED_SCRIPT = r"""
import os, re, json
import jax, jax.numpy as jnp, numpy as np, optax.contrib
from jax.sharding import NamedSharding, PartitionSpec as P
from parallax_jax.optim import scale_by_muon
mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
rng = np.random.default_rng(0)
params = {"mlp": {"up_proj": {"kernel": jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)},
                  "down_proj": {"kernel": jnp.asarray(rng.standard_normal((128, 64)), jnp.float32)}}}
shard = jax.tree.map(lambda x: NamedSharding(mesh, P("fsdp")), params)
params = jax.device_put(params, shard)
def count(tx):
  state = tx.init(params)
  hlo = jax.jit(tx.update).lower(params, state).compile().as_text()
  return len(re.findall(r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(", hlo))
out = {s: [count(scale_by_muon(ns_steps=k, ns_dtype=jnp.float32, shard_strategy=s)) for k in (1, 3)]
       for s in ("distribute", "replicate")}
dims = lambda p: jax.tree.map(lambda _: optax.contrib.MuonDimensionNumbers(), p)
out["optax"] = [count(optax.contrib.scale_by_muon(ns_steps=k, weight_dimension_numbers=dims)) for k in (1, 3)]
# Explicit mesh axes: same update as unsharded, and it keeps the params' shardings.
tx = scale_by_muon(ns_dtype=jnp.float32)
local = jax.tree.map(np.asarray, params)
want = tx.update(local, tx.init(local))[0]
emesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
with jax.set_mesh(emesh):
  ep = jax.device_put(local, jax.tree.map(lambda x: NamedSharding(emesh, P("fsdp")), local))
  got = jax.jit(tx.update)(ep, tx.init(ep))[0]
out["explicit_err"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                          zip(jax.tree.leaves(got), jax.tree.leaves(want)))
out["explicit_specs"] = sorted({str(x.sharding.spec) for x in jax.tree.leaves(got)})
print(json.dumps(out))
"""


def test_no_collectives_inside_ns_on_8_cpu_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
  assert res.returncode == 0, res.stderr[-3000:]
  counts = json.loads(res.stdout.strip().splitlines()[-1])
  for strategy in ("distribute", "replicate"):
    two, six = counts[strategy]
    assert two == six and two <= 4, counts  # independent of ns_steps: nothing inside the loop
  assert counts["optax"][1] > counts["optax"][0], counts  # optax: collectives in every iteration
  assert counts["explicit_err"] < 1e-5 and counts["explicit_specs"] == ["P('fsdp', None)"], counts
