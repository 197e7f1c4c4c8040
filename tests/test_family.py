"""The spec's identities and a float64 brute-force oracle for every member."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import parallax_jax as pj
from tests import brute
from tests.kernels import checkerboard

ALL_PAIRS = [(p, a) for p in pj.PROBES for a in pj.AFFINES]


def make(rng, b=2, t=12, s=None, hq=4, hkv=2, d=8, dv=None, dtype=np.float64, r_scale=0.3):
  s = t if s is None else s
  q = rng.standard_normal((b, t, hq, d))
  k = rng.standard_normal((b, s, hkv, d))
  v = rng.standard_normal((b, s, hkv, dv or d))
  r = r_scale * rng.standard_normal((b, t, hq, d))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v, r))


def call(impl, q, k, v, r, probe, affine, **kw):
  # Jitted: one compile is faster on CPU than dispatching the chunked scans op by op.
  return jax.jit(lambda q, k, v, r: pj.attention(
      q, k, v, r if probe == "learned" else None, probe=probe, affine=affine,
      implementation=impl, **kw))(q, k, v, r)


@checkerboard("impl,probe,affine", ["xla", "chunked", "moments"], ALL_PAIRS)
def test_matches_float64_brute_force(x64, rng, impl, probe, affine):
  # GQA 2, fewer queries than keys, window and segments: every mask rule at once.
  q, k, v, r = make(rng, t=9, s=13)
  seg = (jnp.asarray(rng.integers(0, 2, (2, 9)).cumsum(1) // 2),
         jnp.asarray(rng.integers(0, 2, (2, 13)).cumsum(1) // 2))
  kw = dict(window=7, segment_ids=seg, ridge=0.7 if probe == "solve" else 0.0)
  if affine == "linear" and probe in ("query", "solve"):
    kw["bandwidth"] = math.inf
  got = call(impl, q, k, v, r, probe, affine, block_sizes=pj.BlockSizes(4, 4), **kw)
  want = brute.attention(q, k, v, r if probe == "learned" else None, probe=probe,
                         affine=affine, **kw)
  chex.assert_trees_all_close(np.asarray(got), want, atol=1e-9, rtol=1e-9)


def test_random_shapes_brute_force(x64):
  hyp = pytest.importorskip("hypothesis")
  st = hyp.strategies

  @hyp.settings(max_examples=5, deadline=None, derandomize=True)
  @hyp.given(t=st.integers(1, 10), extra=st.integers(0, 5), hkv=st.sampled_from([1, 2]),
             grp=st.sampled_from([1, 2, 3]), d=st.sampled_from([2, 5]),
             window=st.sampled_from([None, 1, 3]), causal=st.booleans(),
             member=st.sampled_from(["softmax", "parallax", "lla_affine", "linear"]))
  def check(t, extra, hkv, grp, d, window, causal, member):
    rng = np.random.default_rng(t * 1000 + extra * 100 + d)
    q, k, v, r = make(rng, b=1, t=t, s=t + extra, hq=hkv * grp, hkv=hkv, d=d)
    bw, probe, affine = pj.MEMBERS[member]
    kw = dict(bandwidth=bw, causal=causal, window=window, ridge=0.5)
    got = pj.member(member, q, k, v, r if probe == "learned" else None, **kw)
    want = brute.attention(q, k, v, r, probe=probe, affine=affine, **kw)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-9, rtol=1e-9)

  check()


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_identity1_zero_probe_is_softmax_exactly(rng, impl):
  q, k, v, r = make(rng, dtype=np.float32)
  zero = jnp.zeros_like(r)
  f_par = lambda q, k, v: jnp.sum(jnp.tanh(pj.parallax_attention(q, k, v, zero, implementation=impl)))
  f_soft = lambda q, k, v: jnp.sum(jnp.tanh(pj.softmax_attention(q, k, v, implementation=impl)))
  np.testing.assert_array_equal(pj.parallax_attention(q, k, v, zero, implementation=impl),
                                pj.softmax_attention(q, k, v, implementation=impl))
  g1 = jax.jit(jax.grad(f_par, argnums=(0, 1, 2)))(q, k, v)
  g2 = jax.jit(jax.grad(f_soft, argnums=(0, 1, 2)))(q, k, v)
  chex.assert_trees_all_close(g1, g2, atol=1e-6, rtol=1e-6)


def test_identity2_streaming_form(x64, rng):
  """o = (1 + d2/d1) O1/d1 - O2/d1 with P2 = P1 * S2 and one shared max, on one head."""
  q, k, v, r = make(rng, b=1, t=6, hq=1, hkv=1, d=4)
  s1 = np.einsum("td,sd->ts", q[0, :, 0], k[0, :, 0]) / 2.0
  s2 = np.einsum("td,sd->ts", r[0, :, 0], k[0, :, 0])
  s1 = np.where(np.tril(np.ones((6, 6), bool)), s1, -np.inf)
  p1 = np.exp(s1 - s1.max(-1, keepdims=True))
  p2 = p1 * s2
  o1, o2 = p1 @ v[0, :, 0], p2 @ v[0, :, 0]
  d1, d2 = p1.sum(-1, keepdims=True), p2.sum(-1, keepdims=True)
  want = (1 + d2 / d1) * o1 / d1 - o2 / d1
  for impl in ("xla", "chunked"):
    got = pj.parallax_attention(q, k, v, r, implementation=impl, block_sizes=pj.BlockSizes(2, 2))
    np.testing.assert_allclose(np.asarray(got[0, :, 0]), want, rtol=1e-12, atol=1e-12)


def test_identity3_effective_weights(x64, rng):
  q, k, v, r = make(rng, r_scale=2.0)
  e, a = pj.diagnostics.effective_weights(q, k, r)
  np.testing.assert_allclose(np.asarray(e.sum(-1)), 1.0, atol=1e-12)
  o = pj.parallax_attention(q, k, v, r, implementation="xla")
  # o_i = sum_j e_ij v_j (q-head h reads kv-head h // 2).
  vv = jnp.repeat(v, 2, axis=2)
  np.testing.assert_allclose(np.asarray(o), np.einsum("bhts,bshd->bthd", e, vv), atol=1e-12)
  assert float(e.min()) < 0 and float(e.max()) > 1  # weights can be negative or exceed 1


def _enough_keys(t, d):
  return np.arange(t) >= d + 1  # causal rows with at least D + 2 keys


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_identity4_lla_is_weighted_least_squares_intercept(x64, rng, solver):
  b, t, d = 1, 14, 3
  q, k, v, _ = make(rng, b=b, t=t, hq=1, hkv=1, d=d)
  got = pj.lla_attention(q, k, v, solver=solver, cg_iters=3 * d, ridge=0.0)
  got = np.asarray(got)[0, :, 0]
  bw = math.sqrt(d)
  for i in np.nonzero(_enough_keys(t, d))[0]:
    kj, vj, qi = np.asarray(k[0, : i + 1, 0]), np.asarray(v[0, : i + 1, 0]), np.asarray(q[0, i, 0])
    a = np.exp(kj @ qi / bw)
    a /= a.sum()
    x = np.concatenate([np.ones((i + 1, 1)), kj - qi], axis=1) * np.sqrt(a)[:, None]
    coef, *_ = np.linalg.lstsq(x, vj * np.sqrt(a)[:, None], rcond=None)
    np.testing.assert_allclose(got[i], coef[0], rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("impl", ["xla", "chunked", "moments"])
@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_identity5_lla_reproduces_affine_maps(x64, rng, impl, solver):
  b, t, d = 2, 12, 3
  q, k, _, _ = make(rng, b=b, t=t, hq=2, hkv=1, d=d)
  amat, bvec = rng.standard_normal((d, d)), rng.standard_normal(d)
  v = jnp.einsum("ed,bshd->bshe", amat, k) + bvec
  got = pj.lla_attention(q, k, v, solver=solver, cg_iters=3 * d, implementation=impl,
                         ridge=0.0)
  want = jnp.einsum("ed,bthd->bthe", amat, q) + bvec
  rows = _enough_keys(t, d)
  np.testing.assert_allclose(np.asarray(got)[:, rows], np.asarray(want)[:, rows], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("impl", ["xla", "chunked", "moments"])
def test_identity6_global_ridge_regression(x64, rng, impl):
  b, t, d, lam = 1, 10, 4, 0.3
  q, k, v, _ = make(rng, b=b, t=t, hq=1, hkv=1, d=d)
  got = np.asarray(pj.member("mesa", q, k, v, ridge=lam, implementation=impl))[0, :, 0]
  for i in range(t):
    kj, vj = np.asarray(k[0, : i + 1, 0]), np.asarray(v[0, : i + 1, 0])
    want = (vj.T @ kj) @ np.linalg.solve(kj.T @ kj + (i + 1) * lam * np.eye(d), np.asarray(q[0, i, 0]))
    np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-10)


def _solve(solver, grad=False, **kw):
  """Jitted attention (or the gradient in q, k, v of a loss of it) with this solver: one
  compile is faster on CPU than dispatching the unrolled solver's many ops one by one."""
  f = lambda q, k, v: pj.attention(q, k, v, solver=solver, **kw)
  if grad:
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), (0, 1, 2)))
  return jax.jit(f)


def test_cg_cholesky_and_unrolled_match_direct(x64, rng):
  q, k, v, _ = make(rng, t=16, d=4)
  for affine in ("linear", "affine", "boundary"):
    kw = dict(probe="solve", affine=affine, ridge=0.2)
    direct = _solve("direct", **kw)(q, k, v)
    cg = _solve("cg", cg_iters=12, **kw)(q, k, v)
    np.testing.assert_allclose(np.asarray(cg), np.asarray(direct), rtol=1e-8, atol=1e-8)
    for solver in ("cholesky", "unrolled"):
      got = _solve(solver, **kw)(q, k, v)
      np.testing.assert_allclose(np.asarray(got), np.asarray(direct), rtol=1e-10, atol=1e-12)
    # the gradients too: cholesky's rule assumes a symmetric system, which this one is;
    # unrolled's are plain autodiff through the factorization and substitutions
    g_direct = _solve("direct", grad=True, **kw)(q, k, v)
    for solver in ("cholesky", "unrolled"):
      for g, g_want in zip(_solve(solver, grad=True, **kw)(q, k, v), g_direct):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_want), rtol=1e-8, atol=1e-10)
  # the chunked implementation hands the solver on to the same solve (direct: boundary's)
  kw = dict(probe="solve", affine="boundary", ridge=0.2, implementation="chunked",
            block_sizes=pj.BlockSizes(8, 8))
  np.testing.assert_allclose(np.asarray(_solve("unrolled", **kw)(q, k, v)),
                             np.asarray(direct), rtol=1e-10, atol=1e-12)


def test_unrolled_float32_as_accurate_as_direct(rng):
  # float32 against the float64 solution: no worse than LU (boundary amplifies errors most)
  kw = dict(probe="solve", affine="boundary", ridge=1e-2)
  with jax.enable_x64(True):
    q, k, v, _ = make(rng, b=1, t=12, d=8)
    want = (_solve("direct", **kw)(q, k, v),) + _solve("direct", grad=True, **kw)(q, k, v)
  q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
  err = {}
  for solver in ("direct", "unrolled"):
    got = (_solve(solver, **kw)(q, k, v),) + _solve(solver, grad=True, **kw)(q, k, v)
    assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in got)
    err[solver] = [np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b)))
                   for a, b in zip(got, want)]
  for e_unrolled, e_direct, w in zip(err["unrolled"], err["direct"], want):
    assert e_unrolled <= 3 * e_direct + 1e-5 * np.max(np.abs(np.asarray(w))), err


def test_unrolled_refuses_large_heads():
  d = pj.api.UNROLLED_MAX_HEAD_DIM + 1
  q = k = v = jnp.zeros((1, 4, 1, d))
  with pytest.raises(ValueError, match=f"head_dim {d}; use 'cholesky'"):
    pj.attention(q, k, v, probe="solve", affine="boundary", solver="unrolled")
  with pytest.raises(ValueError, match=f"head_dim {d}; use 'cholesky'"):
    pj.decode_attention(q[:, 0], k, v, lengths=jnp.array([4]), probe="solve",
                        affine="boundary", solver="unrolled")
  # members without a solve never run the solver
  jax.eval_shape(lambda q, k, v: pj.attention(q, k, v, probe="none", affine="constant",
                                              solver="unrolled"), q, k, v)


@pytest.mark.parametrize("impl", ["xla", "chunked", "moments"])
@pytest.mark.parametrize("member", ["softmax", "parallax", "lla", "lla_affine", "linear", "mesa",
                                    "least_squares"])
def test_gradients_float64(x64, rng, impl, member):
  q, k, v, r = make(rng, b=1, t=7, hq=2, hkv=1, d=3)
  bw, probe, affine = pj.MEMBERS[member]
  kw = dict(ridge=1.0, implementation=impl, block_sizes=pj.BlockSizes(4, 4), window=5)
  if probe == "learned":
    f = lambda q, k, v, r: pj.member(member, q, k, v, r, **kw)
    args = (q, k, v, r)
  else:
    f = lambda q, k, v: pj.member(member, q, k, v, **kw)
    args = (q, k, v)
  check_grads(f, args, order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_bandwidth_gradient(x64, rng, impl):
  q, k, v, r = make(rng, b=1, t=6, hq=2, hkv=2, d=3)
  f = lambda h: pj.parallax_attention(q, k, v, r, bandwidth=h, implementation=impl,
                                      block_sizes=pj.BlockSizes(4, 4))
  check_grads(f, (jnp.asarray([1.5, 2.5]),), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_infinite_bandwidth_is_uniform(x64, rng):
  q, k, v, _ = make(rng, b=1, t=5, hq=1, hkv=1, d=2)
  o = pj.softmax_attention(q, k, v, bandwidth=math.inf)
  cummean = np.cumsum(np.asarray(v[0, :, 0]), 0) / np.arange(1, 6)[:, None]
  np.testing.assert_allclose(np.asarray(o[0, :, 0]), cummean, atol=1e-12)


def test_float64_output_dtype_and_mixed_precision_dtype(rng):
  q, k, v, r = make(rng, dtype=jnp.bfloat16)
  assert pj.parallax_attention(q, k, v, r).dtype == jnp.bfloat16
  with jax.enable_x64(True):
    q, k, v, r = make(rng, dtype=np.float64)
    assert pj.parallax_attention(q, k, v, r).dtype == jnp.float64


def test_rows_without_keys_are_zero(rng):
  q, k, v, r = make(rng, t=6, s=4, dtype=np.float32)  # T > S: the first 2 queries see nothing
  for impl in ("xla", "chunked", "moments"):
    o = pj.parallax_attention(q, k, v, r, implementation=impl)
    assert np.all(np.asarray(o[:, :2]) == 0) and np.all(np.isfinite(np.asarray(o)))
