"""The moment form (implementation='moments') beyond the family-wide tests in test_family.py:
the prefix-sum path of uniform weights, its non-finite contract, and when None picks it."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import parallax_jax as pj
from parallax_jax import moments
from tests import brute
from tests.test_family import make

UNIFORM = [("linear", "query", "linear"), ("mesa", "solve", "linear"),
           ("least_squares", "solve", "boundary"), ("parallax", "learned", "affine"),
           ("softmax", "none", "constant")]


@pytest.mark.parametrize("t,s,causal,members", [
    (13, 9, True, 2), (9, 9, False, 2),  # CI: the solve members, rows without keys, no mask
    pytest.param(9, 13, True, 5, marks=pytest.mark.slow),
    pytest.param(13, 9, True, 5, marks=pytest.mark.slow),
    pytest.param(9, 9, False, 5, marks=pytest.mark.slow)])
def test_uniform_prefix_matches_brute_force(x64, rng, t, s, causal, members):
  # end-aligned causal with fewer and with more queries than keys (rows without keys), and
  # no mask; GQA 2
  q, k, v, r = make(rng, t=t, s=s)
  for name, probe, affine in UNIFORM if members == len(UNIFORM) else UNIFORM[1:1 + members]:
    kw = dict(bandwidth=math.inf, causal=causal, ridge=0.5 if probe == "solve" else 0.0)
    rr = r if probe == "learned" else None
    got = pj.attention(q, k, v, rr, probe=probe, affine=affine, implementation="moments", **kw)
    want = brute.attention(q, k, v, rr, probe=probe, affine=affine, **kw)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-9, rtol=1e-9, err_msg=name)
  if members == len(UNIFORM):
    f = lambda q, k, v: pj.member("least_squares", q, k, v, ridge=0.5, causal=causal,
                                  implementation="moments")
    check_grads(f, (q, k, v), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_uniform_prefix_keeps_the_non_finite_contract(x64, rng):
  q, k, v, _ = make(rng, b=1, t=8, hq=2, hkv=1, d=3)
  poisoned = k.at[0, 5, 0, 1].set(jnp.nan)
  f = lambda k: pj.member("mesa", q, k, v, ridge=0.5, implementation="moments")
  o = np.asarray(f(poisoned))
  assert np.all(np.isnan(o[:, 5:])) and np.all(np.isfinite(o[:, :5]))
  np.testing.assert_array_equal(o[:, :5], np.asarray(f(k))[:, :5])  # isolation
  loss = lambda k: jnp.sum(f(k)[:, :5] ** 2)  # a loss over the rows that see no NaN
  g = np.asarray(jax.grad(loss)(poisoned))
  np.testing.assert_array_equal(g, np.asarray(jax.grad(loss)(k.at[0, 5, 0, 1].set(0.0))))


def test_bfloat16_inputs_compute_in_float32(rng):
  q, k, v, _ = make(rng, dtype=jnp.bfloat16)
  got = pj.lla_attention(q, k, v, implementation="moments", ridge=0.1)
  want = pj.lla_attention(*(x.astype(jnp.float32) for x in (q, k, v)), implementation="xla",
                          ridge=0.1)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2, rtol=2e-2)


def test_none_picks_the_moment_form_for_small_heads():
  spec = lambda t, d, hq=16: jax.ShapeDtypeStruct((2, t, hq, d), jnp.float32)
  choose = lambda name, t, d, **kw: pj.chosen_implementation(
      spec(t, d), spec(t, d), spec(t, d), spec(t, d) if name == "parallax" else None,
      probe=pj.MEMBERS[name][1], affine=pj.MEMBERS[name][2], bandwidth=pj.MEMBERS[name][0],
      **kw)
  # MAD's heads (D = 8): the solve probe and the uniform members
  for name in ("lla", "lla_affine", "mesa", "least_squares", "linear"):
    assert choose(name, 128, 8) == "moments", name
  assert moments.width("solve", "boundary", 8, 8) == 8 + 8 + 36 + 64
  assert choose("parallax", 128, 8) == "xla"  # no fewer [T, S] passes: more flops
  assert choose("lla", 128, 64) == "xla"  # 64^2 features a key against 128 keys
  assert choose("lla", 2048, 8) == "chunked"  # the weights would be a dense [T, S]
  assert choose("linear", 8192, 8) == "moments"  # prefix sums: no [T, S] array
  assert choose("linear", 128, 8, window=16) == "xla"  # a window: not a prefix
  assert choose("linear", 128, 8, implementation="chunked") == "chunked"


@pytest.mark.slow
def test_higher_order_autodiff_matches_dense(x64, rng):
  q, k, v, _ = make(rng, b=1, t=5, hq=2, hkv=1, d=2)
  modes = {"hessian": jax.hessian, "jacrev(jacfwd)": lambda g: jax.jacrev(jax.jacfwd(g))}
  for name in ("lla", "least_squares"):  # weights from the mask; prefix sums
    f = lambda impl: lambda k: jnp.sum(jnp.sin(pj.member(name, q, k, v, ridge=0.5,
                                                         implementation=impl)))
    for mode_name, mode in modes.items():
      np.testing.assert_allclose(np.asarray(mode(f("moments"))(k)),
                                 np.asarray(mode(f("xla"))(k)), rtol=1e-8, atol=1e-10,
                                 err_msg=f"{name} {mode_name}")


def test_gradient_has_no_scatter():
  # Indexing the features (k[..., rows]) or the prefix sums differentiates into scatters,
  # which cost more than the whole moment sum on an H100; selections are matmuls and slices.
  x = jax.ShapeDtypeStruct((1, 16, 2, 4), jnp.float32)
  for name in ("lla", "mesa", "linear"):
    loss = lambda q, k, v: jnp.sum(pj.member(name, q, k, v, implementation="moments"))
    assert "scatter" not in str(jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(x, x, x)), name


@pytest.mark.slow  # CI covers the kernel's value width in test_attention's interpret cases
@pytest.mark.parametrize("masking", ["causal", "window-segments"])
def test_kernel_weighted_sum_matches_xla(rng, masking):
  """A F on the fused softmax kernel (interpret mode): F as the value, q and k zero-padded."""
  q, k, v, _ = make(rng, b=1, t=13, s=13, hq=4, hkv=2, d=4, dtype=np.float32)
  kw = dict(probe="solve", affine="boundary", ridge=0.1, solver="direct", cg_iters=None,
            causal=True, window=None, q_seg=None, kv_seg=None, compute_dtype=jnp.float32)
  if masking != "causal":
    seg = jnp.asarray(rng.integers(0, 2, (1, 13)).cumsum(1) // 2)
    kw.update(window=6, q_seg=seg, kv_seg=seg)
  scale = jnp.full((4,), 0.5)
  f = lambda kernel: lambda q, k, v: moments.moment_attention(q, k, v, None, scale,
                                                              kernel=kernel, **kw)
  loss = lambda g: lambda *a: jnp.sum(jnp.sin(g(*a)))
  np.testing.assert_allclose(f("interpret")(q, k, v), f(False)(q, k, v), atol=1e-4, rtol=1e-4)
  got = jax.grad(loss(f("interpret")), (0, 1, 2))(q, k, v)
  want = jax.grad(loss(f(False)), (0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(b).max()), rtol=1e-4)


def test_kernel_weighted_sum_lowers_for_the_gpu():
  """MAD's lla (D = 8: 116 features, padded to 128) lowers to the Triton kernels for CUDA."""
  from tests.kernels import lower_h100, triton_modules
  x = jax.ShapeDtypeStruct((2, 128, 16, 8), jnp.float32)
  kw = dict(probe="solve", affine="boundary", ridge=0.01, solver="direct", cg_iters=None,
            causal=True, window=None, q_seg=None, kv_seg=None, compute_dtype=jnp.float32)
  loss = lambda q, k, v: jnp.sum(moments.moment_attention(
      q, k, v, None, jnp.full((16,), 8 ** -0.5), kernel=True, **kw))
  names = [n for n, _ in triton_modules(lower_h100(jax.grad(loss, (0, 1, 2)), x, x, x))]
  assert len(names) >= 3, names  # forward, dq and dk/dv
