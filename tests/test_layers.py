"""Layers: RMSNorm, RoPE, the family attention layer (probe, gate, bandwidth), MLP, block."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallax_jax.models.config import REMAT_POLICIES, ModelConfig
from parallax_jax.nn import layers as L

D, HQ, HKV, DH, B, T = 32, 4, 2, 8, 2, 6


def cfg(**kw):
  base = dict(vocab_size=64, hidden_size=D, num_layers=2, num_heads=HQ, num_kv_heads=HKV,
              head_dim=DH, intermediate_size=48, max_seq_len=64, dtype="float32",
              init_std=0.2, implementation="xla")
  base.update(kw)
  return ModelConfig(**base)


def rope_args(t=T, b=B):
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  return L.rope_cos_sin(pos, DH, 1e6)


def x_in(seed=0, t=T):
  return jax.random.normal(jax.random.key(seed), (B, t, D), jnp.float32)


def init_attn(c, seed=1):
  mod = L.Attention(c)
  cos, sin = rope_args()
  variables = mod.init(jax.random.key(seed), x_in(), cos, sin)
  return mod, nn.unbox(variables["params"]), variables["params"]


def run_attn(mod, params, x=None):
  cos, sin = rope_args()
  return mod.apply({"params": params}, x_in() if x is None else x, cos, sin)[0]


def test_rmsnorm_matches_formula():
  x = x_in()
  mod = L.RMSNorm("embed", 1e-6)
  p = mod.init(jax.random.key(0), x)
  p = jax.tree.map(lambda s: s * 0 + jnp.linspace(0.5, 1.5, D), nn.unbox(p))
  y = mod.apply(p, x)
  rms = np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-6)
  ref = x / rms * np.linspace(0.5, 1.5, D)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_rope_is_relative_and_norm_preserving():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, DH))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, DH))

  def rot(x, p):
    cos, sin = L.rope_cos_sin(jnp.array([[p]]), DH, 10.0)
    return L.apply_rope(x, cos, sin)

  np.testing.assert_allclose(jnp.linalg.norm(rot(q, 7)), jnp.linalg.norm(q), rtol=1e-5)
  d1 = jnp.sum(rot(q, 9) * rot(k, 4))
  d2 = jnp.sum(rot(q, 15) * rot(k, 10))
  np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(rot(q, 0), q, rtol=0, atol=0)


def test_attention_param_paths_shapes_and_logical_names():
  c = cfg(r_norm=True, learnable_bandwidth=True, correction_gate=True)
  _, params, boxed = init_attn(c)
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes == {
      "q_proj": {"kernel": (D, HQ, DH)}, "k_proj": {"kernel": (D, HKV, DH)},
      "v_proj": {"kernel": (D, HKV, DH)}, "r_proj": {"kernel": (D, HQ, DH)},
      "o_proj": {"kernel": (HQ, DH, D)}, "q_norm": {"scale": (DH,)},
      "k_norm": {"scale": (DH,)}, "r_norm": {"scale": (DH,)}, "log_bandwidth": (HQ,),
      "gate": {"kernel": (D, HQ), "bias": (HQ,)},
  }
  leaves = jax.tree.leaves(boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), leaf
    assert len(leaf.names) == leaf.value.ndim
    assert set(leaf.names) <= set(L.LOGICAL_AXIS_NAMES)
  # W_R is zero by default; the bandwidth starts at sqrt(head_dim)
  assert not np.any(params["r_proj"]["kernel"])
  np.testing.assert_allclose(np.exp(params["log_bandwidth"]), math.sqrt(DH), rtol=1e-6)


def test_softmax_member_has_no_probe_params_and_like_q_init():
  _, p_soft, _ = init_attn(cfg(attention="softmax"))
  assert "r_proj" not in p_soft and "gate" not in p_soft
  _, p_q, _ = init_attn(cfg(r_init="like_q"))
  assert np.std(p_q["r_proj"]["kernel"]) > 0.1


def test_attention_shapes_every_member():
  for name in ("softmax", "parallax", "lla", "lla_affine", "linear", "mesa", "least_squares"):
    c = cfg(attention=name, ridge=0.1, r_init="like_q")
    mod, params, _ = init_attn(c)
    y = run_attn(mod, params)
    assert y.shape == (B, T, D) and bool(jnp.all(jnp.isfinite(y))), name


@pytest.mark.parametrize("affine", ["affine", "boundary"])
def test_gate_is_a_convex_mix_of_softmax_and_full(affine):
  c = cfg(correction_gate=True, r_init="like_q", affine=affine)
  mod, params, _ = init_attn(c)
  ungated = L.Attention(c.replace(correction_gate=False))
  soft = L.Attention(c.replace(correction_gate=False, attention="softmax", affine=None))
  p_plain = {k: v for k, v in params.items() if k != "gate"}
  p_soft = {k: v for k, v in p_plain.items() if k != "r_proj"}
  y_full, y_soft = run_attn(ungated, p_plain), run_attn(soft, p_soft)
  assert float(jnp.max(jnp.abs(y_full - y_soft))) > 1e-3  # the correction is not trivial
  # bias 0 and zero kernel: g = 1/2 everywhere; o_proj is linear so y = (y_soft + y_full) / 2
  np.testing.assert_allclose(run_attn(mod, params), 0.5 * (y_soft + y_full), rtol=1e-5,
                             atol=1e-6)
  big = jax.tree.map(lambda a: a, params)
  big["gate"] = {"kernel": params["gate"]["kernel"], "bias": jnp.full((HQ,), 40.0)}
  np.testing.assert_allclose(run_attn(mod, big), y_full, rtol=1e-5, atol=1e-6)
  big["gate"] = {"kernel": params["gate"]["kernel"], "bias": jnp.full((HQ,), -40.0)}
  np.testing.assert_allclose(run_attn(mod, big), y_soft, rtol=1e-5, atol=1e-6)


def test_learnable_bandwidth_gets_gradients():
  c = cfg(learnable_bandwidth=True, r_init="like_q")
  mod, params, _ = init_attn(c)
  g = jax.grad(lambda p: jnp.sum(run_attn(mod, p) ** 2))(params)
  assert float(jnp.max(jnp.abs(g["log_bandwidth"]))) > 0
  # and the layer with h = exp(log h) = sqrt(Dh) equals the fixed-bandwidth layer
  fixed = L.Attention(c.replace(learnable_bandwidth=False))
  p_fixed = {k: v for k, v in params.items() if k != "log_bandwidth"}
  np.testing.assert_allclose(run_attn(mod, params), run_attn(fixed, p_fixed), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.slow
def test_block_remat_policies_agree():
  c = cfg(r_init="like_q")
  cos, sin = rope_args()
  x = x_in()
  params = nn.unbox(L.DecoderBlock(c).init(jax.random.key(0), x, cos, sin)["params"])
  assert set(params) == {"attn", "mlp", "input_norm", "post_attn_norm"}
  assert set(params["mlp"]) == {"gate_proj", "up_proj", "down_proj"}

  def loss(p, policy):
    blk = L.block_class(c, policy)(c)
    return jnp.sum(blk.apply({"params": p}, x, cos, sin)[0] ** 2)

  ref_v, ref_g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "none")
  assert set(REMAT_POLICIES) == {"none", "full", "dots", "dots_no_batch", "attn_out",
                                 "qkv_attn_out", "dots_attn"}
  for policy in ("full", "qkv_attn_out", "dots_attn"):  # the others are plain jax policies
    v, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, policy)
    np.testing.assert_allclose(v, ref_v, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b)))), g, ref_g)


def test_logical_constraints_apply_under_rules():
  """With a mesh and a rule table in scope the constraints resolve (no unknown names)."""
  c = cfg()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                          ("data", "fsdp", "tensor"))
  mod = L.DecoderBlock(c)
  cos, sin = rope_args()
  x = x_in()
  with jax.set_mesh(mesh), nn.logical_axis_rules(L.logical_axis_rules_example()):
    params = jax.jit(mod.init)(jax.random.key(0), x, cos, sin)["params"]
    y = jax.jit(lambda p: mod.apply({"params": p}, x, cos, sin)[0])(params)
  assert y.shape == x.shape


def test_attention_inputs_are_sown_on_request():
  c = cfg(correction_gate=True)
  mod, params, _ = init_attn(c)
  cos, sin = rope_args()
  _, state = mod.apply({"params": params}, x_in(), cos, sin, mutable=["intermediates"])
  got = {k: v[0].shape for k, v in state["intermediates"].items()}
  assert got == {"q": (B, T, HQ, DH), "k": (B, T, HKV, DH), "v": (B, T, HKV, DH),
                 "r": (B, T, HQ, DH), "g": (B, T, HQ)}


_SHARDED_DECODE = r"""
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from parallax_jax import api
from parallax_jax.nn import layers as L
assert jax.device_count() == 4
rng = np.random.default_rng(0)
f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
q, r = f(4, 1, 4, 16), f(4, 1, 4, 16)
k, v = f(4, 192, 2, 16), f(4, 192, 2, 16)
lengths = jnp.asarray([[5], [100], [192], [64]], jnp.int32)
seen = []
def call(q_, k_, v_, r_, len_, bw_, arr_):
  seen.append((q_.shape, arr_.shape))
  return api.decode_attention(q_, k_, v_, r_, lengths=len_[:, 0], probe="learned",
                              affine="affine", implementation="pallas", num_splits=3,
                              arrivals=arr_)
ref, _ = L.shard_attention(call, q, k, v, r, lengths, None, jnp.zeros((4, 2), jnp.int32))
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
with jax.set_mesh(mesh), nn.logical_axis_rules(L.logical_axis_rules_example()):
  o, arr = jax.jit(lambda *a: L.shard_attention(call, *a))(
      q, k, v, r, lengths, None, jnp.zeros((4, 2), jnp.int32))
np.testing.assert_allclose(o, ref, rtol=1e-5, atol=1e-5)
np.testing.assert_array_equal(arr, 0)
assert arr.shape == (4, 2) and seen[-1] == ((2, 1, 2, 16), (2, 1)), seen
print("OK")
"""


def test_shard_attention_carries_decode_state_per_shard():
  """Under a (data 2, fsdp 1, tensor 2) mesh the decode kernel's arrival counter [B, Hkv] is
  split with the batch and KV heads (each shard sees its [B/2, Hkv/2] part) and comes back
  zero."""
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
  p = subprocess.run([sys.executable, "-c", _SHARDED_DECODE], env=env, cwd=repo,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-4000:]
