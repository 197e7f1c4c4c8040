"""Misuse of the layers, losses and diagnostics: one-line errors naming the argument, NaN
instead of plausible garbage where nothing can be raised (under jit), scale-free diagnostics."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallax_jax import diagnostics
from parallax_jax.models.config import ModelConfig
from parallax_jax.nn import layers as L
from parallax_jax.nn.losses import chunked_cross_entropy, fused_cross_entropy

D, HQ, HKV, DH, B = 32, 4, 2, 8, 3


def cfg(**kw):
  base = dict(vocab_size=64, hidden_size=D, num_layers=1, num_heads=HQ, num_kv_heads=HKV,
              head_dim=DH, intermediate_size=48, max_seq_len=64, dtype="float32",
              init_std=0.2, implementation="xla", r_init="like_q")
  base.update(kw)
  return ModelConfig(**base)


def test_rope_shape_mistakes_are_one_line():
  """1-D positions failed deep in indexing, an odd head_dim in broadcasting, and cos/sin of
  one position silently rotated every token of a longer x by the same angle."""
  x = jnp.ones((2, 5, 3, DH))
  with pytest.raises(ValueError, match="cos and sin must be"):
    L.apply_rope(x, *L.rope_cos_sin(jnp.arange(5), DH, 1e4))
  with pytest.raises(ValueError, match="cos and sin must be"):
    L.apply_rope(x, *L.rope_cos_sin(jnp.zeros((2, 1)), DH, 1e4))
  with pytest.raises(ValueError, match="x must be"):
    L.apply_rope(x[:, :, 0], *L.rope_cos_sin(jnp.zeros((2, 5)), DH, 1e4))
  with pytest.raises(ValueError, match="head_dim must be an even int"):
    L.rope_cos_sin(jnp.zeros((2, 5)), 7, 1e4)
  cos, sin = L.rope_cos_sin(jnp.zeros((1, 5)), DH, 1e4)  # one row of positions for the batch
  np.testing.assert_array_equal(L.apply_rope(x, cos, sin), x)


def _decode_setup(slots=4):
  mod = L.Attention(cfg())
  x = jax.random.normal(jax.random.key(0), (B, 1, D))
  cos, sin = L.rope_cos_sin(jnp.full((B, 1), 2), DH, 1e6)
  params = nn.unbox(mod.init(jax.random.key(1), x, cos, sin)["params"])
  cache = tuple(jax.random.normal(jax.random.key(i), (B, slots, HKV, DH)) for i in (2, 3))
  step = lambda n, c=cache: mod.apply({"params": params}, x, cos, sin, None, c, n)
  return mod, params, cache, step


def test_decode_cache_arguments_are_checked():
  """cache_lengths missing, scalar or outside the cache, a wrongly shaped cache and a prefill
  longer than the cache all failed deep in jax (or, past the end, dropped the write
  silently)."""
  mod, params, cache, step = _decode_setup()
  for bad in (None, 2, jnp.int32(2), jnp.full((B, 1), 2), jnp.full((B,), 2.0)):
    with pytest.raises(ValueError, match="needs cache_lengths"):
      step(bad)
  for bad in ([0, 4, 1], [0, -1, 1]):
    with pytest.raises(ValueError, match=r"must be in \[0, 4\)"):
      step(jnp.asarray(bad))
  with pytest.raises(ValueError, match="cache .k, v. must be"):
    step(jnp.zeros((B,), jnp.int32), tuple(c[:, :, :1] for c in cache))
  x = jnp.ones((B, 6, D))
  cos, sin = L.rope_cos_sin(jnp.broadcast_to(jnp.arange(6), (B, 6)), DH, 1e6)
  with pytest.raises(ValueError, match="does not fit"):
    mod.apply({"params": params}, x, cos, sin, None, cache, None)
  x = jnp.ones((B, 2, D))  # two tokens continuing the cache need two free slots
  cos, sin = L.rope_cos_sin(jnp.broadcast_to(jnp.arange(2), (B, 2)), DH, 1e6)
  with pytest.raises(ValueError, match=r"must be in \[0, 3\) \(the cache's 4 slots, 2 new"):
    mod.apply({"params": params}, x, cos, sin, None, cache, jnp.asarray([0, 3, 1]))


def test_decode_slot_outside_cache_is_nan_under_jit():
  """Traced, nothing can raise: a row whose slot is outside the cache is NaN and writes
  nothing (a negative slot used to overwrite the cache's last slot); other rows are exact."""
  _, _, (ck, cv), step = _decode_setup()
  y, (nk, nv) = jax.jit(step)(jnp.asarray([2, 4, -1]))
  ref, (rk, _) = step(jnp.asarray([2, 2, 2]))
  assert np.isnan(np.asarray(y)).any(axis=(1, 2)).tolist() == [False, True, True]
  np.testing.assert_allclose(y[0], ref[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(nk[0], rk[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(nk[1:], ck[1:])
  np.testing.assert_array_equal(nv[1:], cv[1:])


def test_cor_does_not_depend_on_the_scale_of_v():
  """COR is linear over linear in v; the norms used to underflow to 0 at |v| ~ 1e-22 and
  overflow to NaN at 1e22."""
  ks = jax.random.split(jax.random.key(0), 4)
  q, r = (jax.random.normal(k, (2, 6, HQ, DH)) for k in ks[:2])
  k, v = (jax.random.normal(k_, (2, 6, HKV, DH)) for k_ in ks[2:])
  cor = lambda v_: diagnostics.correction_to_output_ratio(q, k, v_, 0.3 * r,
                                                          implementation="xla")
  ref = cor(v)
  assert float(jnp.min(ref)) > 0.05
  for s in (1e-22, 1e22):
    np.testing.assert_allclose(cor(v * s), ref, rtol=1e-5)
  np.testing.assert_array_equal(cor(0 * v), 0.0)


def test_loss_dtype_and_z_loss_are_checked():
  """An integer compute dtype truncated x and w to ints and gave a plausible loss; a traced
  z_loss failed with a tracer error inside the loss."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  w = 0.3 * jax.random.normal(jax.random.key(1), (11, 8))
  t, m = jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 5), bool)
  for fn in (fused_cross_entropy, chunked_cross_entropy):
    with pytest.raises(ValueError, match="floating dtype"):
      fn(x, w, t, m, dtype=jnp.int8)
    with pytest.raises(ValueError, match="z_loss must be a python number"):
      jax.jit(lambda z, fn=fn: fn(x, w, t, m, z_loss=z)[0])(1e-4)
  with pytest.raises(ValueError, match="floating dtype"):
    L.logits_dot(x, w, jnp.int8, "vd")


def test_unknown_remat_policy_names_the_choices():
  with pytest.raises(ValueError, match="remat policy must be one of"):
    L.remat_policy("dot")
