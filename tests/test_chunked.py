"""The chunked implementation equals the dense reference: values and gradients."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallax_jax as pj
from tests.kernels import ci_subset

BS = pj.BlockSizes(64, 64)


def inputs(rng, b, t, s, hq, hkv, d, dtype, r_scale=0.2):
  q = rng.standard_normal((b, t, hq, d))
  k = rng.standard_normal((b, s, hkv, d))
  v = rng.standard_normal((b, s, hkv, d))
  r = r_scale * rng.standard_normal((b, t, hq, d))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v, r))


def loss(impl, probe="learned", affine="affine", **kw):
  def f(q, k, v, r):
    o = pj.attention(q, k, v, r if probe == "learned" else None, probe=probe, affine=affine,
                     implementation=impl, **kw)
    # A fixed random-looking cotangent: exercises every output entry.
    w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape))
    return jnp.sum(o.astype(jnp.float32) * w)
  return f


def compare(args, tol, **kw):
  # Jitted: one compile each is several times faster on CPU than dispatching op by op.
  dense = jax.jit(jax.value_and_grad(loss("xla", **kw), argnums=(0, 1, 2, 3)))(*args)
  chunk = jax.jit(jax.value_and_grad(loss("chunked", block_sizes=BS, **kw),
                                     argnums=(0, 1, 2, 3)))(*args)
  for got, want, name in zip(jax.tree.leaves(chunk), jax.tree.leaves(dense),
                             ["value", "dq", "dk", "dv", "dr"]):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    # Relative to the largest entry, floored at 1 so all-zero gradients (window=1) compare
    # absolutely instead of against rounding noise.
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1.0)
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("hq,hkv", ci_subset(  # ratios 1, 2, 4, 8 + MQA
    [(4, 4), (4, 2), (8, 2), (8, 1), (16, 2)], [(4, 4), (8, 2), (8, 1)]))
def test_gqa_ratios(rng, hq, hkv):
  compare(inputs(rng, 1, 130, 130, hq, hkv, 16, np.float32), 2e-5)


@pytest.mark.parametrize("window", ci_subset([1, 63, 64, 100, 129], [1, 100]))
def test_unaligned_windows(rng, window):
  compare(inputs(rng, 1, 200, 200, 2, 1, 16, np.float32), 2e-5, window=window)


@pytest.mark.parametrize("t,s", ci_subset([(1, 150), (37, 150), (150, 150), (150, 40)],
                                           [(1, 150), (150, 40)]))
def test_fewer_queries_than_keys_end_aligned(rng, t, s):
  compare(inputs(rng, 2, t, s, 4, 2, 16, np.float32), 2e-5)


def test_non_causal_with_window(rng):
  compare(inputs(rng, 1, 150, 150, 2, 2, 16, np.float32), 2e-5, causal=False, window=70)


def test_segment_ids(rng):
  args = inputs(rng, 2, 190, 190, 4, 2, 16, np.float32)
  seg = jnp.asarray(np.sort(rng.integers(0, 5, (2, 190)), axis=1))
  compare(args, 2e-5, segment_ids=seg)
  compare(args, 2e-5, segment_ids=seg, window=50)


@pytest.mark.parametrize("probe,affine", ci_subset(
    [("none", "constant"), ("query", "linear"), ("query", "affine"), ("learned", "boundary")],
    [("query", "affine"), ("learned", "boundary")]))
def test_other_streaming_members(rng, probe, affine):
  compare(inputs(rng, 1, 100, 100, 2, 1, 16, np.float32, r_scale=0.05), 5e-5,
          probe=probe, affine=affine)


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 2e-2),
                                       pytest.param(jnp.float16, 4e-3, marks=pytest.mark.slow)])
def test_low_precision_against_float32_reference(rng, dtype, tol):
  args32 = inputs(rng, 1, 140, 140, 4, 2, 32, np.float32)
  args_lp = tuple(x.astype(dtype) for x in args32)
  want = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2, 3)))(*args32)
  got = jax.jit(jax.grad(loss("chunked", block_sizes=BS), argnums=(0, 1, 2, 3)))(*args_lp)
  for g, w in zip(got, want):
    assert g.dtype == dtype
    err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
    assert err <= tol, err
  o = pj.parallax_attention(*args_lp, implementation="chunked", block_sizes=BS)
  w = pj.parallax_attention(*args32, implementation="xla")
  assert o.dtype == dtype
  assert float(jnp.max(jnp.abs(o.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w))) <= tol


def test_jit_vmap_and_determinism(rng):
  q, k, v, r = inputs(rng, 3, 70, 70, 2, 1, 8, np.float32)
  f = jax.jit(lambda q, k, v, r: pj.parallax_attention(q, k, v, r, implementation="chunked",
                                                       block_sizes=pj.BlockSizes(32, 32)))
  batched = jax.vmap(lambda q, k, v, r: f(q[None], k[None], v[None], r[None])[0])(q, k, v, r)
  chex.assert_trees_all_close(batched, f(q, k, v, r), atol=1e-6)
  g = jax.jit(jax.grad(loss("chunked", block_sizes=pj.BlockSizes(32, 32)), argnums=(0, 1, 2, 3)))
  a, b = g(q, k, v, r), g(q, k, v, r)
  for x, y in zip(a, b):  # same inputs, same bits
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_solve_probe_chunked_gradients(rng):
  args = inputs(rng, 1, 70, 70, 2, 1, 4, np.float32)
  compare(args, 1e-4, probe="solve", affine="boundary", ridge=1.0)


def test_memory_is_linear_in_length():
  """The chunked backward's compiled temp memory must not grow like T*S."""
  def temp_bytes(t):
    shp = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, 1, 32), jnp.float32)
    f = jax.jit(jax.grad(loss("chunked", block_sizes=pj.BlockSizes(128, 128)), argnums=(0, 1, 2, 3)))
    return f.lower(shp, kv, kv, shp).compile().memory_analysis().temp_size_in_bytes
  small, big = temp_bytes(1024), temp_bytes(8192)
  # 8x the length: a quadratic implementation would need 64x; allow linear growth plus slack.
  assert big < 12 * small, (small, big)


def test_long_sequence_chunked_matches_dense_output(rng):
  # Longer than the implementation=None dense threshold in one dimension; still cheap here.
  q, k, v, r = inputs(rng, 1, 1100, 1100, 2, 1, 16, np.float32)
  dense = pj.parallax_attention(q, k, v, r, implementation="xla")
  chunk = pj.parallax_attention(q, k, v, r, implementation="chunked")
  np.testing.assert_allclose(np.asarray(chunk), np.asarray(dense), atol=2e-5, rtol=2e-5)
  assert pj.api._choose(None, "learned", "affine", q, k, v, r, None, None, None) == "chunked"


@pytest.mark.slow
def test_32k_forward_backward_on_cpu():
  """The issue's acceptance shape: B=1, H=4, L=32768, D=64 Parallax fwd+bwd on the CPU."""
  key = jax.random.split(jax.random.PRNGKey(0), 4)
  shp = (1, 32768, 4, 64)
  q, k, v = (jax.random.normal(kk, shp, jnp.float32) for kk in key[:3])
  r = 0.1 * jax.random.normal(key[3], shp, jnp.float32)
  grads = jax.jit(jax.grad(loss("chunked"), argnums=(0, 1, 2, 3)))(q, k, v, r)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_forward_mode_matches_dense(rng):
  """jax.jvp through the chunked path (the transpose of its hand-written backward) equals
  the dense path's, for the streaming members, masks and GQA."""
  args = inputs(rng, 2, 40, 40, 4, 2, 8, np.float32)
  tangents = inputs(rng, 2, 40, 40, 4, 2, 8, np.float32)
  for probe, affine, kw in [("learned", "affine", dict(window=13)),
                            ("query", "boundary", dict(causal=False))]:
    f = lambda impl: loss(impl, probe, affine, **kw, **(
        dict(block_sizes=pj.BlockSizes(16, 16)) if impl == "chunked" else {}))
    _, got = jax.jit(lambda a, t: jax.jvp(f("chunked"), a, t))(args, tangents)
    _, want = jax.jit(lambda a, t: jax.jvp(f("xla"), a, t))(args, tangents)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, err_msg=f"{probe} {affine}")


def test_forward_mode_at_the_default_switch(rng):
  """L = 1025 is where implementation=None switches from dense to chunked: jvp works there
  (it failed with "can't apply forward-mode autodiff (jvp) to a custom_vjp function")."""
  q, k, v, r = inputs(rng, 1, 1025, 1025, 1, 1, 8, np.float32)
  assert pj.api._choose(None, "learned", "affine", q, k, v, r, None, None, None) == "chunked"
  _, got = jax.jit(lambda r: jax.jvp(lambda r: pj.parallax_attention(q, k, v, r), (r,), (r,)))(r)
  _, want = jax.jit(lambda r: jax.jvp(
      lambda r: pj.parallax_attention(q, k, v, r, implementation="xla"), (r,), (r,)))(r)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_higher_order_autodiff_matches_dense(rng):
  """hessian (forward over reverse), reverse over forward, reverse over reverse and vmap of
  jvp: all supported by the chunked path."""
  q, k, v, r = inputs(rng, 1, 12, 12, 2, 1, 4, np.float32)

  def f(impl):
    bs = dict(block_sizes=pj.BlockSizes(8, 8)) if impl == "chunked" else {}
    return lambda r: jnp.sum(jnp.sin(pj.parallax_attention(q, k, v, r, implementation=impl,
                                                           **bs)))

  modes = {"hessian": jax.hessian, "jacrev(jacfwd)": lambda g: jax.jacrev(jax.jacfwd(g)),
           "grad(grad)": lambda g: jax.grad(lambda r: jnp.sum(jax.grad(g)(r) ** 2)),
           "vmap(jvp)": lambda g: lambda r: jax.vmap(lambda t: jax.jvp(g, (r,), (t,))[1])(
               jnp.stack([r, -2.0 * r]))}
  for name, mode in modes.items():
    np.testing.assert_allclose(np.asarray(mode(f("chunked"))(r)), np.asarray(mode(f("xla"))(r)),
                               atol=1e-5, rtol=1e-4, err_msg=name)
