"""Qwen3 model: shapes, causality, W_R = 0 == softmax, checkpoints, presets, counts, configs."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallax_jax.models import init_params, presets, qwen3
from parallax_jax.models.qwen3 import Qwen3Model
from parallax_jax.models.config import ModelConfig
from parallax_jax.nn.layers import LOGICAL_AXIS_NAMES

B, T = 2, 7


def small(**kw):
  base = dict(vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=8, intermediate_size=40, max_seq_len=64, dtype="float32",
              init_std=0.2, implementation="xla")
  base.update(kw)
  return ModelConfig(**base)


def rand_params(cfg, seed=0, zero_r=False):
  """Random parameters drawn on the host (fast: no XLA compile of the initialisers).

  Norm scales are 1 + noise so that they matter; W_R is zero with zero_r.
  """
  rng = np.random.default_rng(seed)

  def draw(path, a):
    names = [getattr(k, "key", "") for k in path]
    if names[-1] == "scale":
      x = 1.0 + 0.2 * rng.standard_normal(a.shape)
    elif names[-1] == "log_bandwidth":
      x = math.log(math.sqrt(cfg.resolved_head_dim)) + 0.1 * rng.standard_normal(a.shape)
    elif "r_proj" in names and zero_r:
      x = np.zeros(a.shape)
    else:
      x = cfg.init_std * rng.standard_normal(a.shape)
    return jnp.asarray(x, a.dtype)

  return jax.tree_util.tree_map_with_path(draw, qwen3.abstract_params(cfg))


def tokens(b=B, t=T, seed=0, vocab=48):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


def forward(cfg, params, toks, **kw):
  return qwen3.Qwen3Model(cfg).apply({"params": params}, toks, **kw)


def test_shapes_dtypes_and_logical_names():
  cfg = small(dtype="bfloat16", tie_embeddings=False)
  boxed = qwen3.init_params(cfg, 0, boxed=True)
  params = nn.unbox(boxed)
  assert set(params) == {"embed", "final_norm", "lm_head", "layers_0", "layers_1"}
  assert params["embed"]["embedding"].shape == (48, 32)
  assert params["lm_head"]["kernel"].shape == (32, 48)
  assert params["layers_0"]["attn"]["q_proj"]["kernel"].shape == (32, 4, 8)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # fp32 params
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim
    assert set(leaf.names) <= set(LOGICAL_AXIS_NAMES)
  assert not np.any(params["layers_0"]["attn"]["r_proj"]["kernel"])  # W_R = 0 by default
  logits = forward(cfg, params, tokens())
  assert logits.shape == (B, T, 48) and logits.dtype == jnp.float32
  assert "lm_head" not in qwen3.abstract_params(small())  # tied by default


def test_scan_layers_equals_unrolled():
  cfg = small(r_init="like_q")
  params = rand_params(cfg, 1)
  scfg = cfg.replace(scan_layers=True, remat_policy="full")
  stacked = {k: v for k, v in params.items() if not k.startswith("layers_")}
  stacked["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), params["layers_0"],
                                   params["layers_1"])
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape,
                                                          qwen3.abstract_params(scfg))
  specs = qwen3.logical_param_specs(scfg)
  assert specs["layers"]["attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "q_heads", "head_dim")
  toks = tokens()
  np.testing.assert_allclose(forward(scfg, stacked, toks), forward(cfg, params, toks),
                             rtol=1e-5, atol=1e-5)


def test_unrolled_init_is_the_scanned_init_unstacked():
  """Same rng, same values either way; the unrolled tree and its logical names are flax's own
  (the unrolled model's direct init gives the same structure, shapes and specs)."""
  cfg = small(correction_gate=True, learnable_bandwidth=True, tie_embeddings=False,
              num_layers=3, remat_policy=("none", "full", "dots"))
  params = qwen3.init_params(cfg, 7)
  stacked = qwen3.init_params(cfg.replace(scan_layers=True, remat_policy="none"), 7)
  for i in range(3):
    jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a, b[i]),
                 params[f"layers_{i}"], stacked["layers"])
  direct = qwen3.Qwen3Model(cfg).init(jax.random.key(7), jnp.zeros((1, 1), jnp.int32))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, nn.unbox(direct["params"]))
  assert nn.get_partition_spec(qwen3.init_params(cfg, 7, boxed=True)) == \
      nn.get_partition_spec(direct["params"])


def test_solve_probe_models_are_finite_at_the_default_ridge():
  """ridge 0.0 (the config's default) gives the attention the family's default ridge: at
  exactly 0 the first positions' systems are singular and the whole model was NaN."""
  cfg = small(attention="mesa")
  assert cfg.ridge == 0.0 and cfg.attention_ridge is None
  assert bool(jnp.isfinite(forward(cfg, rand_params(cfg, 2), jnp.ones((B, T), jnp.int32))).all())
  assert small(attention="mesa", ridge=0.1).attention_ridge == 0.1


@pytest.mark.parametrize("name,kw", [
    ("parallax", dict(r_norm=True, correction_gate=True)),
    pytest.param("parallax-chunked-window", dict(implementation="chunked", window=3),
                 marks=pytest.mark.slow),
    ("lla", dict(ridge=0.1)),
])
def test_causality_by_gradient(name, kw):
  """d logits[:, i] / d (embedding of the token at j) == 0 exactly for every j > i."""
  cfg = small(attention=name.split("-")[0], tie_embeddings=False, **kw)
  params = rand_params(cfg, 2)
  toks = jnp.arange(B * T).reshape(B, T) % 48  # distinct tokens: one embedding row each
  probe = jax.random.normal(jax.random.key(3), (48,))

  def out(emb):
    p = dict(params, embed={"embedding": emb})
    return forward(cfg, p, toks) @ probe  # [B, T]

  # receptive field: causal, and with a window W each layer reaches W - 1 positions back
  reach = T if cfg.window is None else cfg.num_layers * (cfg.window - 1)
  _, vjp = jax.vjp(out, params["embed"]["embedding"])
  cotangents = jnp.eye(T)[:, None, :] * jnp.ones((T, B, T))  # one per output position i
  (grads,) = jax.vmap(vjp)(cotangents)  # [T, V, d]
  for i in range(T):
    rows = jnp.linalg.norm(grads[i][toks], axis=-1)  # [B, T]: gradient reaching position j
    lo = max(0, i - reach)
    assert bool(jnp.all(rows[:, i + 1:] == 0)), (name, i, rows)
    assert bool(jnp.all(rows[:, :lo] == 0)), (name, i, rows)
    assert bool(jnp.all(rows[:, lo:i + 1] > 0)), (name, i, rows)


@pytest.mark.parametrize("implementation,dtype", [
    ("xla", "float32"), ("chunked", "float32"),
    pytest.param("xla", "bfloat16", marks=pytest.mark.slow)])
def test_wr_zero_equals_softmax_values_and_grads(implementation, dtype):
  par = small(attention="parallax", implementation=implementation, dtype=dtype)
  soft = par.replace(attention="softmax")
  p_par = rand_params(par, 4, zero_r=True)

  def drop_r(p):
    return {k: ({**v, "attn": {a: w for a, w in v["attn"].items() if a != "r_proj"}}
                if k.startswith("layers_") else v) for k, v in p.items()}

  p_soft = drop_r(p_par)
  assert jax.tree.structure(p_soft) == jax.tree.structure(qwen3.abstract_params(soft))
  toks = tokens(t=6)
  targets = tokens(t=6, seed=9)

  def loss(cfg, p):
    logits = forward(cfg, p, toks)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

  # Op by op (no jit) the two are bitwise equal: r = 0 adds exact zeros to the same softmax.
  np.testing.assert_array_equal(forward(par, p_par, toks), forward(soft, p_soft, toks))
  l_par, g_par = jax.value_and_grad(lambda p: loss(par, p))(p_par)
  l_soft, g_soft = jax.value_and_grad(lambda p: loss(soft, p))(p_soft)
  np.testing.assert_array_equal(l_par, l_soft)
  jax.tree.map(np.testing.assert_array_equal, drop_r(g_par), g_soft)
  if implementation == "xla" and dtype == "float32":
    # Under jit XLA fuses the two graphs differently, so equality is to rounding (~1 ulp).
    np.testing.assert_allclose(jax.jit(forward, static_argnums=0)(par, p_par, toks),
                               jax.jit(forward, static_argnums=0)(soft, p_soft, toks),
                               rtol=1e-5, atol=1e-5)
  # W_R itself does get a gradient: fine-tuning moves the model off softmax
  assert float(jnp.max(jnp.abs(g_par["layers_0"]["attn"]["r_proj"]["kernel"]))) > 0


def test_checkpoint_round_trip(tmp_path):
  cfg = small(r_init="like_q", learnable_bandwidth=True, scan_layers=True)
  params = rand_params(cfg, 5)
  path = qwen3.save_checkpoint(str(tmp_path / "ckpt"), params, cfg)
  cfg2, params2 = qwen3.load_checkpoint(path)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  assert jax.tree.map(lambda a: a.dtype, params2) == jax.tree.map(lambda a: a.dtype, params)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_presets_build_and_count(name):
  cfg = presets.get_preset(name)
  abstract = qwen3.abstract_params(cfg)  # jax.eval_shape: nothing allocated
  n = qwen3.count_params(abstract)
  assert n == qwen3.param_count(cfg)
  print(f"{name}: {n:,} parameters ({n / 1e9:.3f}B)")
  if name == "tiny":
    assert n < 1e6
  elif name.startswith("qwen3_0p6b"):
    assert 0.55e9 < n < 0.9e9
  elif name.startswith("qwen3_1p7b"):
    assert 1.6e9 < n < 2.1e9


def test_qwen3_reference_parameter_counts():
  # Qwen3 (softmax) shapes: 0.6B = 596,049,920 with tied embeddings, 0.44B non-embedding;
  # 1.7B = 1,720,574,976 (1.4B non-embedding).
  s06 = presets.qwen3_0p6b(attention="softmax")
  s17 = presets.qwen3_1p7b(attention="softmax")
  assert qwen3.param_count(s06) == 596_049_920
  assert abs(qwen3.param_count(s06, embeddings=False) / 1e9 - 0.44) < 0.01
  assert qwen3.param_count(s17) == 1_720_574_976
  assert abs(qwen3.param_count(s17, embeddings=False) / 1e9 - 1.4) < 0.01
  # Parallax adds exactly one d x (Hq Dh) W_R per layer
  p06 = presets.qwen3_0p6b()
  assert qwen3.param_count(p06) - qwen3.param_count(s06) == 28 * 1024 * 16 * 128


@pytest.mark.parametrize("base", ["qwen3_0p6b", "qwen3_1p7b"])
def test_softmax_controls_match(base):
  par = presets.get_preset(base)
  by_params = presets.get_preset(base + "_softmax_matched_params")
  by_compute = presets.get_preset(base + "_softmax_matched_compute")
  for ctrl in (by_params, by_compute):
    assert ctrl.attention == "softmax" and not ctrl.has_probe_params
    assert ctrl.intermediate_size > par.intermediate_size and ctrl.intermediate_size % 64 == 0
  rel = abs(qwen3.param_count(by_params) / qwen3.param_count(par) - 1)
  assert rel < 0.005, rel
  s = presets.DEFAULT_CONTROL_SEQ_LEN
  rel = abs(qwen3.flops_per_token(by_compute, s) / qwen3.flops_per_token(par, s) - 1)
  assert rel < 0.005, rel
  # the softmax model at the Parallax shape has fewer parameters and less compute
  plain = par.replace(attention="softmax")
  assert qwen3.param_count(plain) < qwen3.param_count(par)
  assert qwen3.flops_per_token(plain, s) < qwen3.flops_per_token(par, s)


def _dot_flops(jaxpr):
  """Exact FLOPs (2 per multiply-add) of every dot_general in a jaxpr, recursively."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[a] for a in lc)
    mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else (v,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += mult * _dot_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += mult * _dot_flops(sub)
  return total


@pytest.mark.parametrize("kw", [
    dict(attention="softmax"),
    dict(attention="parallax", correction_gate=True),
    dict(attention="parallax", tie_embeddings=False, scan_layers=True),
])
def test_flops_per_token_matches_traced_matmuls(kw):
  """flops_per_token counts the matmuls the model runs (dense 'xla' path: every (q, k) pair)."""
  cfg = small(**kw)
  params = qwen3.abstract_params(cfg)
  toks = jnp.zeros((B, T), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda p: forward(cfg, p, toks))(params).jaxpr
  counted = _dot_flops(jaxpr) / (B * T)
  assert counted == pytest.approx(qwen3.flops_per_token(cfg, T, context=T), rel=1e-9)
  # causal accounting: half the pairs (plus the diagonal) on average
  assert qwen3.mean_context(cfg, T) == (T + 1) / 2
  assert qwen3.mean_context(cfg.replace(window=2), 4) == (1 + 2 + 2 + 2) / 4
  assert qwen3.flops_per_token(cfg, T, training=True) == 3 * qwen3.flops_per_token(cfg, T)


def test_config_json_round_trip():
  cfg = small(attention="linear", remat_policy=("full", "none"))
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  assert math.isinf(cfg.resolved_bandwidth) and hash(cfg) == hash(ModelConfig.from_dict(
      cfg.to_dict()))


@pytest.mark.parametrize("key,kw", [
    ("num_kv_heads", dict(num_heads=6, num_kv_heads=4)),
    ("attention", dict(attention="flash")),
    ("probe", dict(probe="sometimes")),
    ("affine", dict(affine="quadratic")),
    ("implementation", dict(implementation="cuda")),
    ("head_dim", dict(head_dim=None, hidden_size=30)),
    ("head_dim", dict(head_dim=7)),
    ("hidden_size", dict(hidden_size=0)),
    ("remat_policy", dict(remat_policy="sometimes")),
    ("remat_policy", dict(remat_policy=("full",))),
    ("correction_gate", dict(attention="softmax", correction_gate=True)),
    ("learnable_bandwidth", dict(attention="linear", learnable_bandwidth=True)),
    ("dtype", dict(dtype="float8")),
    ("r_init", dict(r_init="ones")),
    ("ridge", dict(ridge=-1.0)),
    ("solver", dict(attention="lla", solver="unrolled", head_dim=64)),
    ("window", dict(window=0)),
])
def test_bad_configs_name_the_key(key, kw):
  with pytest.raises(ValueError, match=rf"ModelConfig\.{key}:"):
    small(**kw)


def test_from_dict_names_unknown_key():
  with pytest.raises(ValueError, match=r"ModelConfig\.n_heads:"):
    ModelConfig.from_dict({"n_heads": 4})


def test_r_scale_equals_a_scaled_w_r():
  """r_scale multiplies r after its (absent) norm: the same as scaling W_R."""
  import jax
  cfg = presets.tiny(vocab_size=64, max_seq_len=32, dtype="float32", implementation="xla",
                     r_init="like_q")
  params = init_params(cfg, jax.random.key(0))
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(1, 16)
  scaled = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 0.3 if "r_proj" in jax.tree_util.keystr(p) else x, params)
  a = Qwen3Model(cfg.replace(r_scale=0.3)).apply({"params": params}, tokens)
  b = Qwen3Model(cfg).apply({"params": scaled}, tokens)
  np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="r_scale: must be a finite number > 0"):
    cfg.replace(r_scale=0.0)
  assert presets.softmax_control(cfg.replace(r_scale=0.3)).r_scale == 1.0
