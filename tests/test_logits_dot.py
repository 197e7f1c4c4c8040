"""`logits_dot`: float32 logits from bf16 operands with a bf16 backward (the LM head)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallax_jax.nn.layers import logits_dot


def _loss(logits, targets):
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(lse - picked) + 1e-4 * jnp.sum(lse ** 2)


@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_matches_float32_autodiff(layout):
  kx, kw, kt = jax.random.split(jax.random.key(0), 3)
  B, T, d, V = 2, 24, 64, 300
  x = jax.random.normal(kx, (B, T, d), jnp.float32).astype(jnp.bfloat16)
  w = 0.05 * jax.random.normal(kw, (V, d) if layout == "vd" else (d, V), jnp.float32)
  tg = jax.random.randint(kt, (B, T), 0, V)
  spec = "btd,vd->btv" if layout == "vd" else "btd,dv->btv"

  def ref(x, w):  # float32 everywhere: the exact gradient of the bf16-rounded operands
    xr = x.astype(jnp.float32)
    wr = w.astype(jnp.bfloat16).astype(jnp.float32)
    return _loss(jnp.einsum(spec, xr, wr, precision="highest"), tg)

  def ours(x, w):
    return _loss(logits_dot(x, w, jnp.bfloat16, layout), tg)

  l0, (gx0, gw0) = jax.value_and_grad(ref, argnums=(0, 1))(x, w)
  l1, (gx1, gw1) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(x, w)
  assert gx1.dtype == jnp.bfloat16 and gw1.dtype == jnp.float32 and gw1.shape == w.shape
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  for a, b in ((gx1, gx0), (gw1, gw0)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) / np.max(np.abs(b)) < 1e-2


def test_backward_matmuls_are_bf16():
  """No float32 matmul over the [tokens, vocab] cotangent in the gradient's HLO."""
  x = jax.ShapeDtypeStruct((4, 32, 64), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((300, 64), jnp.float32)
  tg = jnp.zeros((4, 32), jnp.int32)
  f = jax.grad(lambda x, w: _loss(logits_dot(x, w, jnp.bfloat16, "vd"), tg), argnums=(0, 1))
  hlo = jax.jit(f).lower(x, w).as_text()
  dots = [line for line in hlo.splitlines() if "dot_general" in line]
  assert len(dots) == 3, dots
  for line in dots:  # operands bf16, accumulation f32
    assert "bf16" in line.split("dot_general")[1].split(")")[0], line


def test_bad_layout():
  with pytest.raises(ValueError, match="w_layout"):
    logits_dot(jnp.zeros((2, 4)), jnp.zeros((4, 3)), jnp.bfloat16, "xy")
