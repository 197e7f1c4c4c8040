"""The public contract: bad input raises ValueError naming the problem; wrappers; diagnostics."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallax_jax as pj

B, T, H, D = 1, 8, 4, 8


@pytest.fixture
def qkvr():
  ks = jax.random.split(jax.random.PRNGKey(3), 4)
  q = jax.random.normal(ks[0], (B, T, H, D))
  k = jax.random.normal(ks[1], (B, T, 2, D))
  v = jax.random.normal(ks[2], (B, T, 2, D))
  r = 0.1 * jax.random.normal(ks[3], (B, T, H, D))
  return q, k, v, r


@pytest.mark.parametrize("change,match", [
    (dict(k=jnp.zeros((B, T, 3, D)), v=jnp.zeros((B, T, 3, D))), "multiple of kv heads"),
    (dict(k=jnp.zeros((B, T, 2, D + 1)), v=jnp.zeros((B, T, 2, D + 1))), "head_dim mismatch"),
    (dict(q=jnp.zeros((T, H, D))), "rank 4"),
    (dict(v=jnp.zeros((B, T, 2, D), jnp.bfloat16)), "share one dtype"),
    (dict(window=0), "window must be a positive int"),
    (dict(window=-3), "window must be a positive int"),
    (dict(probe="magic"), "unknown probe 'magic'"),
    (dict(affine="cubic"), "unknown affine 'cubic'"),
    (dict(r=None), "needs r"),
    (dict(probe="solve", ridge=-1.0), "ridge must be >= 0"),
    (dict(solver="lu", probe="solve"), "unknown solver 'lu'"),
    (dict(implementation="cuda"), "unknown implementation 'cuda'"),
    (dict(bandwidth=jnp.ones(3)), r"bandwidth must be a scalar or have shape \[q_heads\]"),
    (dict(bandwidth=-1.0), "bandwidth must be > 0"),
    (dict(r=jnp.zeros((B, T, H, D + 1))), "r must have q's shape"),
    (dict(segment_ids=jnp.zeros((B, T + 1), jnp.int32)), "segment_ids must have shape"),
    (dict(segment_ids=jnp.zeros((B, T))), "must be integers"),
    (dict(v=jnp.zeros((B, T + 1, 2, D))), "k and v must agree"),
    (dict(k=jnp.zeros((2, T, 2, D)), v=jnp.zeros((2, T, 2, D))), "batch sizes differ"),
])
def test_bad_input_raises_value_error(qkvr, change, match):
  q, k, v, r = qkvr
  args = dict(q=q, k=k, v=v, r=r, probe="learned", affine="affine")
  args.update(change)
  if args["probe"] != "learned" and "r" not in change:
    args["r"] = None
  with pytest.raises(ValueError, match=match):
    pj.attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("r"), **args)


def test_r_with_a_probe_that_ignores_it(qkvr):
  q, k, v, r = qkvr
  with pytest.raises(ValueError, match="only read by probe='learned'"):
    pj.attention(q, k, v, r, probe="query", affine="affine")


def test_member_names_and_wrappers(qkvr):
  q, k, v, r = qkvr
  np.testing.assert_array_equal(pj.member("softmax", q, k, v), pj.softmax_attention(q, k, v))
  np.testing.assert_array_equal(pj.member("parallax", q, k, v, r),
                                pj.parallax_attention(q, k, v, r))
  np.testing.assert_array_equal(pj.member("lla", q, k, v, ridge=1.0),
                                pj.lla_attention(q, k, v, ridge=1.0))
  np.testing.assert_array_equal(pj.member("linear", q, k, v), pj.linear_attention(q, k, v))
  with pytest.raises(ValueError, match="unknown member"):
    pj.member("flash", q, k, v)


def test_jit_with_traced_bandwidth_and_ridge(qkvr):
  q, k, v, r = qkvr
  f = jax.jit(lambda h, lam: pj.lla_attention(q, k, v, bandwidth=h, ridge=lam))
  assert np.all(np.isfinite(np.asarray(f(jnp.full((H,), 3.0), 0.5))))


def test_pallas_rejects_unsupported_members(qkvr):
  q, k, v, r = qkvr
  with pytest.raises(ValueError, match="supports softmax and Parallax"):
    pj.lla_attention(q, k, v, implementation="pallas")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs a GPU"):
      pj.parallax_attention(q, k, v, r, implementation="pallas")


def test_correction_ratio_and_stable_rank(qkvr):
  q, k, v, r = qkvr
  cor0 = pj.diagnostics.correction_to_output_ratio(q, k, v, jnp.zeros_like(r))
  np.testing.assert_array_equal(cor0, np.zeros(H))
  cor = pj.diagnostics.correction_to_output_ratio(q, k, v, r)
  assert cor.shape == (H,) and np.all(np.asarray(cor) > 0)
  assert math.isclose(float(pj.diagnostics.stable_rank(jnp.eye(5))), 5.0, rel_tol=1e-6)
  rank1 = jnp.outer(jnp.arange(1.0, 4.0), jnp.arange(1.0, 6.0))
  assert math.isclose(float(pj.diagnostics.stable_rank(rank1)), 1.0, rel_tol=1e-5)
  w = jax.random.normal(jax.random.PRNGKey(0), (16, 2, 4))  # [d_model, heads, head_dim]
  assert 1.0 <= float(pj.diagnostics.stable_rank(w)) <= 8.0


def test_weight_statistics(qkvr):
  q, k, _, r = qkvr
  stats = pj.diagnostics.weight_statistics(q, k, 5.0 * r)
  assert set(stats) == {"negative_mass", "first_token_mass", "first_token_mass_softmax",
                        "softmax_entropy"}
  assert np.all(np.asarray(stats["negative_mass"]) <= 0)
  assert np.all(np.asarray(stats["softmax_entropy"]) >= 0)
  # Row 0 sees only key 0, so its softmax mass on the first token is 1.
  zero = pj.diagnostics.weight_statistics(q, k, jnp.zeros_like(r))
  np.testing.assert_allclose(zero["first_token_mass"], zero["first_token_mass_softmax"], rtol=1e-6)
  np.testing.assert_array_equal(zero["negative_mass"], np.zeros(H))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_default_implementation_on_gpu_is_the_fused_kernel_and_matches_reference():
  ks = jax.random.split(jax.random.PRNGKey(7), 4)
  q = jax.random.normal(ks[0], (2, 300, 8, 64), jnp.bfloat16)
  k = jax.random.normal(ks[1], (2, 300, 2, 64), jnp.bfloat16)
  v = jax.random.normal(ks[2], (2, 300, 2, 64), jnp.bfloat16)
  r = (0.1 * jax.random.normal(ks[3], q.shape)).astype(jnp.bfloat16)
  assert pj.api._choose(None, "learned", "affine", q, k, v, r, None, None, None) == "pallas"
  f = lambda impl: jax.grad(lambda q, k, v, r: jnp.sum(
      pj.parallax_attention(q, k, v, r, window=100, implementation=impl).astype(jnp.float32)
      * jnp.cos(jnp.arange(q.size, dtype=jnp.float32).reshape(q.shape))), argnums=(0, 1, 2, 3))
  up = lambda x: x.astype(jnp.float32)
  want = f("xla")(up(q), up(k), up(v), up(r))
  got = f(None)(q, k, v, r)
  for g, w in zip(got, want):
    assert float(jnp.max(jnp.abs(up(g) - w)) / jnp.max(jnp.abs(w))) <= 1e-2
