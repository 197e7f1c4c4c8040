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
    (dict(probe="solve", ridge=-1.0), "ridge must be finite and >= 0"),
    (dict(probe="solve", ridge=float("inf")), "ridge must be finite and >= 0"),
    (dict(probe="solve", ridge="1"), "ridge must be a number"),
    (dict(causal="no"), "causal must be True or False"),
    (dict(bandwidth="2"), "bandwidth must be a number or an array"),
    (dict(solver="lu", probe="solve"), "unknown solver 'lu'"),
    (dict(implementation="cuda"), "unknown implementation 'cuda'"),
    (dict(bandwidth=jnp.ones(3)), r"bandwidth must be a scalar or have shape \[q_heads\]"),
    (dict(bandwidth=-1.0), "bandwidth must be > 0"),
    (dict(r=jnp.zeros((B, T, H, D + 1))), "r must have q's shape"),
    (dict(segment_ids=jnp.zeros((B, T + 1), jnp.int32)), "segment_ids must have shape"),
    (dict(segment_ids=jnp.zeros((B, T))), "must be integers"),
    (dict(v=jnp.zeros((B, T + 1, 2, D))), "k and v must agree"),
    (dict(k=jnp.zeros((2, T, 2, D)), v=jnp.zeros((2, T, 2, D))), "batch sizes differ"),
    (dict(q=jnp.zeros((B, T, 0, D)), r=jnp.zeros((B, T, 0, D))), "heads and head_dim must be"),
    (dict(k=jnp.zeros((B, T, 0, D)), v=jnp.zeros((B, T, 0, D))), "heads and head_dim must be"),
    (dict(q=jnp.zeros((B, T, H, 0)), k=jnp.zeros((B, T, 2, 0)), v=jnp.zeros((B, T, 2, 0)),
          r=jnp.zeros((B, T, H, 0))), "heads and head_dim must be >= 1"),
    (dict(probe="solve", ridge=jnp.ones(2)), "ridge must be a scalar"),
    (dict(probe="solve", cg_iters=True, solver="cg"), "cg_iters must be a positive int"),
    (dict(block_sizes=(64, 64)), "block_sizes must be a parallax_jax.BlockSizes"),
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


def test_concrete_arrays_closed_over_by_jit(qkvr):
  """Concrete bandwidth / lengths captured by an outer jit are still checked, not traced."""
  q, k, v, r = qkvr
  h, lens = jnp.full((H,), 3.0), jnp.asarray([T - 2], jnp.int32)
  bad_h, bad_lens = -h, -lens
  o = jax.jit(lambda q: pj.lla_attention(q, k, v, bandwidth=h))(q)
  assert np.all(np.isfinite(np.asarray(o)))
  o = jax.jit(lambda q: pj.decode_attention(q[:, 0], k, v, r[:, 0], lengths=lens, probe="learned",
                                            affine="affine", implementation="xla"))(q)
  assert np.all(np.isfinite(np.asarray(o)))
  with pytest.raises(ValueError, match="lengths must be >= 0"):
    jax.jit(lambda q: pj.decode_attention(q[:, 0], k, v, r[:, 0], lengths=bad_lens,
                                          probe="learned", affine="affine"))(q)
  with pytest.raises(ValueError, match="bandwidth must be > 0"):
    jax.jit(lambda q: pj.lla_attention(q, k, v, bandwidth=bad_h))(q)


@pytest.mark.parametrize("impl", ["xla", "chunked", None])
def test_empty_lengths(impl):
  """T = 0 (or B = 0) gives an empty output, S = 0 zeros (rows that see no key), gradients
  included, in every implementation."""
  z = lambda *s: jnp.ones(s, jnp.float32)
  for (b, t, s), want in [((1, 0, 0), 0.0), ((1, 0, 5), 0.0), ((1, 3, 0), 0.0),
                          ((0, 3, 3), 0.0)]:
    q, k, v = z(b, t, H, D), z(b, s, 2, D), z(b, s, 2, D)
    for member in ("parallax", "lla"):
      f = lambda q: pj.member(member, q, k, v, q if member == "parallax" else None,
                              implementation=impl, causal=False)
      o = f(q)
      assert o.shape == (b, t, H, D) and o.dtype == q.dtype and np.all(np.asarray(o) == want)
      g = jax.grad(lambda q: jnp.sum(f(q)))(q)
      assert g.shape == q.shape and np.all(np.asarray(g) == 0.0)
  o = pj.decode_attention(z(2, H, D), z(2, 0, 2, D), z(2, 0, 2, D),
                          lengths=jnp.zeros(2, jnp.int32), probe="none", affine="constant")
  assert o.shape == (2, H, D) and np.all(np.asarray(o) == 0.0)


def test_empty_and_bad_inputs_of_decode_and_diagnostics(qkvr):
  q, k, v, r = qkvr
  with pytest.raises(ValueError, match="lengths must be >= 0"):
    pj.decode_attention(q[:, 0], k, v, lengths=jnp.asarray([-1]), probe="none",
                        affine="constant")
  with pytest.raises(ValueError, match="heads and head_dim must be >= 1"):
    pj.decode_attention(q[:, 0, :, :0], k[..., :0], v[..., :0], lengths=jnp.asarray([1]),
                        probe="none", affine="constant")
  empty = q[:, :0]
  with pytest.raises(ValueError, match=r"correction_to_output_ratio needs batch, T and S >= 1"):
    pj.diagnostics.correction_to_output_ratio(empty, k, v, r[:, :0])
  with pytest.raises(ValueError, match=r"effective_weights needs batch, T and S >= 1"):
    pj.diagnostics.weight_statistics(q, k[:, :0], r)
  with pytest.raises(ValueError, match="needs the learned probe r"):
    pj.diagnostics.effective_weights(q, k, None)
  with pytest.raises(ValueError, match="stable_rank of an empty weight"):
    pj.diagnostics.stable_rank(jnp.zeros((0, 4)))
  with pytest.raises(ValueError, match="fan_in_axes must be an int in"):
    pj.diagnostics.stable_rank(jnp.ones((4, 4)), fan_in_axes=2)


@pytest.mark.parametrize("name", ["lla", "lla_affine", "mesa", "least_squares"])
def test_solve_members_are_finite_with_default_arguments(name):
  """Early rows see fewer keys than dimensions: at ridge 0 their system is singular. The
  default ridge (SOLVE_RIDGE) keeps them finite; ridge=0 stays the exact solve."""
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(kk, (2, 24, 2, 16)) for kk in ks)
  o = jax.jit(lambda q, k, v: pj.member(name, q, k, v))(q, k, v)
  assert np.all(np.isfinite(np.asarray(o)))
  assert pj.api._ridge(None, "solve") == pj.api.SOLVE_RIDGE and pj.api._ridge(0.0, "solve") == 0
  if name == "lla":
    o = pj.decode_attention(q[:, :3], k, v, lengths=jnp.asarray([3, 5]), probe="solve",
                            affine="boundary")
    assert np.all(np.isfinite(np.asarray(o)))


def test_traced_bad_bandwidth_and_ridge_give_nan(qkvr):
  """Under jit a bad traced value cannot raise: the affected output is NaN, not garbage."""
  q, k, v, r = qkvr
  f = jax.jit(lambda h: pj.parallax_attention(q, k, v, r, bandwidth=h))
  h = jnp.asarray([2.0, -1.0, 0.0, jnp.nan])
  o = np.asarray(f(h))
  assert np.all(np.isfinite(o[:, :, 0])) and np.all(np.isnan(o[:, :, 1:]))
  assert np.all(np.isfinite(np.asarray(f(jnp.asarray([2.0, 3.0, jnp.inf, 1.0])))))
  g = jax.jit(lambda lam: pj.lla_attention(q, k, v, ridge=lam))
  assert np.all(np.isnan(np.asarray(g(-0.5)))) and np.all(np.isfinite(np.asarray(g(0.5))))
  dec = jax.jit(lambda h: pj.decode_attention(q[:, 0], k, v, r[:, 0], lengths=jnp.asarray([5]),
                                              probe="learned", affine="affine", bandwidth=h))
  o = np.asarray(dec(h))
  assert np.all(np.isfinite(o[:, 0])) and np.all(np.isnan(o[:, 1:]))
  with pytest.raises(ValueError, match="bandwidth must be > 0"):
    pj.parallax_attention(q, k, v, r, bandwidth=jnp.asarray([2.0, -1.0, 1.0, 1.0]))


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
  from parallax_jax.optim import stable_rank as optim_stable_rank
  for scale in (1e30, 1e-30):  # scale-free (sigma^2 overflowed / underflowed in float32)
    assert math.isclose(float(pj.diagnostics.stable_rank(scale * jnp.eye(5))), 5.0, rel_tol=1e-6)
    assert math.isclose(float(optim_stable_rank(scale * jnp.eye(5))[0]), 5.0, rel_tol=1e-6)
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


def test_chosen_implementation_names_what_attention_runs():
  short = jax.ShapeDtypeStruct((2, 64, 4, 16), jnp.bfloat16)
  long = jax.ShapeDtypeStruct((1, 2048, 4, 16), jnp.float32)
  choose = lambda x, **kw: pj.chosen_implementation(x, x, x, x, probe="learned", affine="affine",
                                                    **kw)
  off_gpu = jax.default_backend() != "gpu"
  assert choose(short) == ("xla" if off_gpu else "pallas")
  assert choose(long) == ("chunked" if off_gpu else "pallas")  # past 2^20 pairs a head
  assert choose(long, implementation="xla") == "xla"
  assert pj.chosen_implementation(short, short, short, probe="solve", affine="boundary") == "xla"
  with pytest.raises(ValueError, match="implementation"):
    choose(short, implementation="cuda")


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
