"""A row sees only its keys: non-finite values elsewhere never reach its output or gradients.

Each case poisons positions (NaN or inf in q, k or v) and checks, for every implementation
that runs on the CPU: rows that see a poisoned entry are NaN in every entry; every other row
(and the gradient of a loss over those rows) equals the result with the poison replaced by
finite values.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallax_jax as pj
from parallax_jax import masks


@dataclasses.dataclass(frozen=True)
class Case:
  T: int = 16
  S: int = 16
  causal: bool = True
  window: int | None = None
  segments: bool = False
  # (array, key or query position, kv head or None for all heads, value)
  poison: tuple = ()


CASES = {
    # a NaN value ahead of rows 0-4 (the first row that sees it is 5)
    "causal_nan_v": Case(poison=(("v", 5, None, np.nan),)),
    # packed documents [0] * 7 + [1] * 9: document 0's NaN must not reach document 1
    "segments_nan_v": Case(segments=True, poison=(("v", 3, None, np.nan),)),
    # window 4: key 3 is seen by rows 3-6 only; inf in one kv head (GQA: q-heads 2, 3)
    "window_inf_k": Case(window=4, poison=(("k", 3, 1, np.inf),)),
    # T < S, end-aligned: query i sits at key position i + 10
    "end_aligned_nan_k": Case(T=6, poison=(("k", 13, None, np.nan),)),
    # a NaN query row (e.g. garbage padding) sees earlier keys: their gradients stay exact
    "nan_q_row": Case(poison=(("q", 10, None, np.nan),)),
    # -inf value, non-causal with window: rows within 3 of key 8
    "noncausal_window_ninf_v": Case(causal=False, window=3, poison=(("v", 8, 0, -np.inf),)),
}
HQ, HKV, D = 4, 2, 8


def make(c: Case, dtype, seed=0, hq=HQ, hkv=HKV, d=D):
  """(clean args, poisoned args, kwargs, expected NaN rows [B, T, Hq] as numpy).

  With c.segments the documents are [0] * (S * 7 // 16) + [1] * (the rest), aligned at the
  end for T < S."""
  rng = np.random.default_rng(seed)
  n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
  q, k, v, r = n(1, c.T, hq, d), n(1, c.S, hkv, d), n(1, c.S, hkv, d), n(1, c.T, hq, d) * 0.3
  kw = dict(causal=c.causal, window=c.window)
  seg = None
  if c.segments:
    ids = np.repeat([0, 1], [c.S * 7 // 16, c.S - c.S * 7 // 16])
    seg = jnp.asarray(ids[None, c.S - c.T:], jnp.int32), jnp.asarray(ids[None], jnp.int32)
    kw["segment_ids"] = seg
  vis = np.asarray(masks.full_mask(c.T, c.S, causal=c.causal, window=c.window,
                                   q_seg=None if seg is None else seg[0],
                                   kv_seg=None if seg is None else seg[1]))
  vis = np.broadcast_to(vis, (1, c.T, c.S))
  args = {"q": q, "k": k, "v": v, "r": r}
  nan_rows = np.zeros((1, c.T, hq), bool)
  heads = lambda h: slice(None) if h is None else slice(h, h + 1)
  qheads = lambda h: slice(None) if h is None else slice(h * (hq // hkv), (h + 1) * (hq // hkv))
  for name, pos, h, val in c.poison:
    args[name] = args[name].at[:, pos, heads(h)].set(val)
    if name == "q":
      nan_rows[:, pos, heads(h)] = True
    else:
      nan_rows[:, :, qheads(h)] |= vis[:, :, pos][:, :, None]
  clean = (q, k, v, r)
  return clean, tuple(args[x] for x in "qkvr"), kw, nan_rows


def attn(impl, kw, member="parallax"):
  """The member as a jitted function of (q, k, v, r): one compile serves clean and poisoned."""
  extra = dict(block_sizes=pj.BlockSizes(8, 8)) if impl == "chunked" else {}

  def f(q, k, v, r):
    if member == "parallax":
      return pj.parallax_attention(q, k, v, r, implementation=impl, **kw, **extra)
    return pj.softmax_attention(q, k, v, implementation=impl, **kw, **extra)
  return f


def check_rows(o, want, nan_rows, tol):
  o = np.asarray(o, np.float32)
  want = np.asarray(want, np.float32)
  assert np.all(np.isnan(o[nan_rows])), "a row that sees a poisoned entry is not all NaN"
  clean = ~nan_rows
  assert np.all(np.isfinite(o[clean])), "poison leaked into a row that does not see it"
  err = np.max(np.abs(o[clean] - want[clean]), initial=0.0)
  assert err <= tol, err


def check_clean_row_grads(f, clean, poisoned, nan_rows, name):
  """The gradients (q, k, v, r) of a loss over the rows that see no poison: finite, and
  those of the clean inputs."""
  keep = jnp.asarray(~nan_rows)[..., None]
  w = jnp.cos(jnp.arange(np.prod(clean[0].shape), dtype=jnp.float32)).reshape(clean[0].shape)
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.where(keep, f(*a) * w, 0.0)),
                          argnums=(0, 1, 2, 3)))
  for x, y, arg in zip(grad(*poisoned), grad(*clean), "qkvr"):
    x, y = np.asarray(x), np.asarray(y)
    assert np.all(np.isfinite(x)), f"{name}: d{arg} not finite"
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-6, err_msg=f"{name}: d{arg}")


@pytest.mark.parametrize("impl,dtype", [("xla", jnp.float32), ("chunked", jnp.bfloat16),
                                        pytest.param("xla", jnp.bfloat16, marks=pytest.mark.slow),
                                        pytest.param("chunked", jnp.float32, marks=pytest.mark.slow)])
def test_poison_reaches_only_the_rows_that_see_it(impl, dtype):
  members = ("parallax", "softmax") if dtype == jnp.float32 else ("parallax",)
  for name, c in CASES.items():
    clean, poisoned, kw, nan_rows = make(c, dtype)
    for member in members:
      f = jax.jit(attn(impl, kw, member))
      try:  # invisible entries change nothing, bit for bit
        check_rows(f(*poisoned), f(*clean), nan_rows, 0.0)
      except AssertionError as e:
        raise AssertionError(f"{name} {member}: {e}") from None


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_gradients_of_clean_rows_ignore_the_poison(impl):
  """A NaN row is a constant: the gradient of a loss over the other rows is exactly the one
  with the poison replaced by finite values (no 0 * NaN anywhere)."""
  for name, c in CASES.items():
    clean, poisoned, kw, nan_rows = make(c, jnp.float32)
    check_clean_row_grads(attn(impl, kw), clean, poisoned, nan_rows, name)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_decode_cache_beyond_lengths(impl):
  """decode_attention: NaN / inf in cache slots past lengths (uninitialised memory) or before
  the window reach no row; a NaN slot a token sees makes that row NaN."""
  rng = np.random.default_rng(0)
  n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, r, k, v = n(2, 2, HQ, 16), n(2, 2, HQ, 16), n(2, 24, HKV, 16), n(2, 24, HKV, 16)
  lengths = jnp.asarray([9, 20])
  kp = k.at[0, 9:].set(jnp.inf).at[1, :10].set(jnp.nan)      # past lengths; before window
  vp = v.at[0, 9:].set(jnp.nan).at[1, 19].set(jnp.nan)       # slot 19: seen by token 1 only
  f = lambda k, v: np.asarray(pj.decode_attention(
      q, k, v, r, lengths=lengths, probe="learned", affine="affine", window=8,
      implementation=impl))
  got, want = f(kp, vp), f(k, v)
  nan = np.zeros(got.shape[:-1], bool)
  nan[1, 1] = True
  assert np.isnan(got[nan]).all()
  np.testing.assert_array_equal(got[~nan], want[~nan])
