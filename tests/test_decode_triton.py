"""Split-KV Pallas decode kernel (pallas_kernels/decode_triton.py): interpret mode on CPU
against a dense float32 reference (and once against `parallax_jax.attention`); `-m gpu`
compiled."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_triton as dk
from tests.kernels import checkerboard, ci_subset, has_gpu, lower_h100, triton_modules, verify_triton_modules

warnings.filterwarnings("ignore", category=DeprecationWarning)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 4e-3}


def make(rng, B, Hq, Hkv, S, D, dtype, parallax=True, tokens=None):
  """q, r [B, Hq, D] (tokens None) or [B, tokens, Hq, D]; caches [B, S, Hkv, D]."""
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  qs = (B, Hq, D) if tokens is None else (B, tokens, Hq, D)
  q, r = f(*qs), f(*qs) * 0.3
  k, v = f(B, S, Hkv, D), f(B, S, Hkv, D)
  # poison: garbage (large / NaN-free) values beyond the valid region must not matter
  return (q.astype(dtype), k.astype(dtype), v.astype(dtype),
          r.astype(dtype) if parallax else None)


def poison_tail(k, lengths):
  S = k.shape[1]
  invalid = jnp.arange(S)[None, :] >= jnp.asarray(lengths)[:, None]
  return jnp.where(invalid[:, :, None, None], jnp.asarray(1e4, k.dtype), k)


def check(rng, B, Hq, Hkv, S, D, dtype, lengths, window=None, ns=None, bk=16, parallax=True,
          interpret=True, tokens=None):
  q, k, v, r = make(rng, B, Hq, Hkv, S, D, dtype, parallax, tokens)
  k, v = poison_tail(k, lengths), poison_tail(v, lengths)
  scale = 1.0 / np.sqrt(D)
  lengths = jnp.asarray(lengths, jnp.int32)
  # Jitted: one compile each is faster on CPU than dispatching the wrappers op by op.
  o = jax.jit(lambda q, k, v, r, n: dk.parallax_decode(
      q, k, v, r, scale=scale, lengths=n, window=window, num_splits=ns, block_kv=bk,
      interpret=interpret))(q, k, v, r, lengths)
  ref = jax.jit(lambda q, k, v, r, n: dk.reference_decode(
      q, k, v, r, scale=scale, lengths=n, window=window))(q, k, v, r, lengths)
  assert o.shape == q.shape and o.dtype == q.dtype
  o = np.asarray(o, np.float32)
  ref = np.asarray(ref)
  assert np.all(np.isfinite(o))
  err = np.max(np.abs(o - ref)) / max(np.max(np.abs(ref)), 1e-6)
  assert err <= TOL[dtype], err
  return o, ref


# Non-finite cache entries (docs/attention.md): (lengths, tokens, window, pack, splits,
# [(array, batch, slot, kv head or None, value)]). Slots beyond lengths may hold anything.
POISON = {
    "nan_tail": ([5, 37, 70], 1, None, 1, 3, [("v", b, slice(n, None), None, np.nan)
                                              for b, n in enumerate([5, 37, 70])]),
    "inf_k_tail_splits": ([5, 37, 70], 1, None, 1, 1, [("k", 0, slice(5, None), None, np.inf),
                                                      ("k", 1, slice(37, 40), 1, -np.inf)]),
    "window_nan_and_seen": ([40, 64, 9], 1, 8, 1, 2, [("v", 0, slice(0, 32), None, np.nan),
                                                      ("k", 1, 60, 0, np.nan)]),
    "multi_token_pack2": ([40, 64, 9], 3, None, 2, 2, [("v", 0, 39, None, np.nan),
                                                       ("v", 1, slice(64, None), None, np.nan),
                                                       ("k", 2, 8, 1, np.nan)]),
}


def _poison_decode(rng, dtype, lengths, tokens, window, cases):
  """Caches with poisoned slots, and the rows [B, (T,) Hq] that see one."""
  B, Hq, Hkv, S, D = 3, 4, 2, 70, 16
  q, k, v, r = make(rng, B, Hq, Hkv, S, D, dtype, tokens=None if tokens == 1 else tokens)
  arrs = {"k": k, "v": v}
  seen = np.zeros((B, tokens, Hq), bool)
  slot = np.asarray(lengths)[:, None] - tokens + np.arange(tokens)              # [B, T]
  for name, b, j, h, val in cases:
    hs = slice(None) if h is None else slice(h, h + 1)
    arrs[name] = arrs[name].at[b, j, hs].set(val)
    js = np.arange(S)[j]
    vis = (js[None] <= slot[b][:, None]) & (js[None] < S)
    if window is not None:
      vis &= js[None] > slot[b][:, None] - window
    qh = slice(None) if h is None else slice(h * (Hq // Hkv), (h + 1) * (Hq // Hkv))
    seen[b, :, qh] |= np.atleast_2d(vis).any(axis=-1)[:, None]
  seen = seen[:, 0] if tokens == 1 else seen
  return (q, k, v, r), (q, arrs["k"], arrs["v"], r), seen


@pytest.mark.parametrize("name", ci_subset(list(POISON), ["nan_tail", "multi_token_pack2"]))
def test_poisoned_cache_reaches_only_rows_that_see_it(rng, name):
  """NaN / inf beyond lengths, before the window, or in a later token's slot: rows that see
  a poisoned slot are NaN, the others equal the kernel's output on a clean cache, bit for
  bit (one launch, splits and packed heads; Parallax, and softmax for every other case in
  f32; every other case in bf16)."""
  i = list(POISON).index(name)
  lengths, tokens, window, pack, ns, cases = POISON[name]
  for dtype in (jnp.float32,) + ((jnp.bfloat16,) if i % 2 == 0 else ()):
    clean, poisoned, seen = _poison_decode(rng, dtype, lengths, tokens, window, cases)
    for parallax in (True, False) if dtype == jnp.float32 and i % 2 == 0 else (True,):
      f = jax.jit(lambda q, k, v, r: dk.parallax_decode(
          q, k, v, r if parallax else None, scale=0.25, lengths=jnp.asarray(lengths),
          block_kv=16, window=window, num_splits=ns, kv_heads_per_program=pack, interpret=True))
      got, want = np.asarray(f(*poisoned), np.float32), np.asarray(f(*clean), np.float32)
      ref = np.asarray(dk.reference_decode(*poisoned[:3], poisoned[3] if parallax else None,
                                           scale=0.25, lengths=jnp.asarray(lengths),
                                           window=window))
      msg = f"{name} {dtype.__name__} parallax={parallax}"
      assert np.isnan(got[seen]).all() and np.isnan(ref[seen]).all(), msg
      assert np.array_equal(got[~seen], want[~seen]), msg
      assert np.isfinite(ref[~seen]).all(), msg


@checkerboard("Hq,Hkv,ns", [(4, 4), (4, 2), (8, 2), (8, 1), (16, 2), (32, 1)], [1, 3])
def test_gqa_ratios(rng, Hq, Hkv, ns):
  check(rng, 3, Hq, Hkv, 70, 16, jnp.float32, [1, 37, 70], ns=ns)


@checkerboard("T,Hq,Hkv,ns,window", [(2, 4, 2), (3, 2, 2), (4, 8, 2), (2, 16, 2)], [1, 3],
              [None, 5])
def test_multi_token(rng, T, Hq, Hkv, ns, window):
  """Token t sits at slot lengths-T+t: causal among the new tokens, lengths < T included."""
  check(rng, 3, Hq, Hkv, 70, 16, jnp.float32, [1, 37, 70], window=window, ns=ns, tokens=T)


@pytest.mark.slow
def test_multi_token_softmax_and_bf16(rng):
  check(rng, 2, 8, 2, 96, 64, jnp.bfloat16, [2, 96], ns=2, bk=32, tokens=2)
  check(rng, 2, 4, 4, 50, 16, jnp.float32, [0, 50], ns=2, parallax=False, tokens=3)
  with pytest.raises(ValueError, match="at most 64 rows"):
    dk.parallax_decode(jnp.zeros((1, 5, 16, 16)), jnp.zeros((1, 32, 1, 16)),
                       jnp.zeros((1, 32, 1, 16)), scale=1.0, lengths=[4], interpret=True)


def test_merge_in_row_groups(rng):
  """Many splits x rows: the in-kernel merge of >= MERGE_TILES_FROM splits reads [splits, D]
  tiles and takes the rows in several register-sized groups (32 splits x 8 rows x D=64: 2
  rows per group)."""
  assert 32 >= dk.MERGE_TILES_FROM
  check(rng, 1, 2, 1, 512, 64, jnp.float32, [500], ns=32, tokens=4)
  assert dk.default_num_splits(1, 8, 4096, rows=16) == 8  # many rows: fewer splits
  assert dk.default_num_splits(1, 8, 4096, rows=2) == 32
  assert dk.default_num_splits(1, 8, 4096) == 33


@pytest.mark.parametrize("parallax,T", ci_subset([(True, 8), (False, 16)], [(True, 8)]))
def test_merge_by_split_in_groups(rng, parallax, T):
  """Fewer splits merge split by split, in register-sized groups of splits: 16 splits of 16
  (32) rows at D=64 take two groups, the second one partial (its splits past the last
  masked), the running max carried from group to group, and splits without valid keys (a
  short length; a window leaving the early splits empty)."""
  assert 16 < dk.MERGE_TILES_FROM
  B, Hq, Hkv, S, D = 2, 4, 2, 256, 64
  group = dk.merge_group_splits(T * Hq // Hkv, D, 4, parallax, 16)     # (4 warps)
  assert 16 // 2 <= group < 16 and 16 % group
  check(rng, B, Hq, Hkv, S, D, jnp.float32, [256, 40], ns=16, tokens=T, parallax=parallax)
  check(rng, B, Hq, Hkv, S, D, jnp.float32, [256, 200], ns=16, tokens=T, window=30,
        parallax=parallax)


def test_unused_launch_is_removed_and_grad_refused(rng):
  """The launch is removable when its outputs are unused (flax's nn.scan needs that), and
  differentiating it raises a clear error."""
  q, k, v, r = make(rng, 1, 4, 2, 64, 16, jnp.float32)
  f = lambda q: dk.parallax_decode(q, k, v, r, scale=0.25, lengths=[9], num_splits=2,
                                   block_kv=16, interpret=True)
  jaxpr = jax.make_jaxpr(lambda q: (f(q), 1.0)[1])(q)
  from jax._src.interpreters import partial_eval as pe
  dced, used = pe.dce_jaxpr(jaxpr.jaxpr, [True])
  assert not dced.eqns and not any(used)
  with pytest.raises(NotImplementedError, match="not differentiable"):
    jax.grad(lambda q: f(q).sum())(q)


@pytest.mark.parametrize("parallax", ci_subset([True, False], [True]))
def test_carried_arrivals(rng, parallax):
  """A counter carried across calls (any split count, 1 or T tokens) stays zero and gives the
  same bits as a freshly zeroed one."""
  B, Hq, Hkv, S, D = 2, 4, 2, 100, 16
  lengths = jnp.asarray([37, 100], jnp.int32)
  arrivals = dk.init_arrivals(B, Hkv)
  for ns, tokens in ((3, None), (1, None), (4, 2), (2, None)):
    q, k, v, r = make(rng, B, Hq, Hkv, S, D, jnp.float32, parallax, tokens)
    kw = dict(scale=0.25, lengths=lengths, num_splits=ns, block_kv=16, interpret=True)
    o, arrivals = dk.parallax_decode(q, k, v, r, arrivals=arrivals, **kw)
    np.testing.assert_array_equal(o, dk.parallax_decode(q, k, v, r, **kw))
    assert arrivals.shape == (B, Hkv) and arrivals.dtype == jnp.int32
    np.testing.assert_array_equal(arrivals, 0)
  with pytest.raises(ValueError, match=r"arrivals must be int32 \[B, Hkv\]"):
    dk.parallax_decode(q, k, v, r, arrivals=jnp.zeros((B * Hkv,), jnp.int32), **kw)


@checkerboard("ns,window", [1, 2, 3, 4], [None, 1, 5, 40])
def test_splits_windows(rng, ns, window):
  check(rng, 4, 4, 2, 100, 16, jnp.float32, [1, 17, 64, 100], window=window, ns=ns)


@pytest.mark.parametrize("parallax", [True, False])
def test_softmax_and_zero_length(rng, parallax):
  o, _ = check(rng, 3, 4, 2, 40, 16, jnp.float32, [0, 5, 40], ns=2, parallax=parallax)
  assert np.all(o[0] == 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(rng, dtype):
  check(rng, 2, 8, 2, 96, 64, dtype, [33, 96], ns=2, bk=32)


def test_default_splits_and_small_cache(rng):
  check(rng, 2, 2, 1, 10, 16, jnp.float32, [3, 10], bk=None)  # S < block_kv: padded
  check(rng, 1, 2, 1, 300, 16, jnp.float32, [299], bk=None)  # heuristic num_splits
  check(rng, 1, 2, 1, 2048, 128, jnp.float32, [2000], bk=None)  # 16 splits of 128-key tiles
  check(rng, 1, 4, 1, 2048, 128, jnp.float32, [2000], bk=None)  # 4 rows: 4 splits of 128
  # one split of 128-key tiles, row sums kept per element (3 tiles, the last one clamped)
  check(rng, 2, 4, 2, 300, 128, jnp.float32, [300, 131], ns=1, bk=128, window=200)
  assert dk.default_launch(50, 8, 260, 16, rows=1) == (32, 1)
  assert dk.default_launch(1, 8, 4096, 128, rows=2) == (128, 16)
  assert dk.default_launch(1, 8, 4096, 128, rows=2, parallax=False) == (64, 32)
  assert dk.default_launch(1, 8, 4096, 64) == (64, 33)
  assert dk.default_launch(64, 8, 4096, 128, rows=2) == (128, 1)
  assert dk.default_launch(64, 8, 4096, 64) == (32, 1)
  assert dk.default_launch(64, 8, 4096, 64, parallax=False) == (64, 1)
  assert dk.default_launch(256, 8, 1024, 64) == (64, 1)
  assert dk.default_launch(32, 8, 1024, 128, rows=2) == (32, 1)  # unsplit, few programs
  assert dk.default_launch(32, 8, 1024, 128, rows=2, parallax=False) == (64, 1)
  assert dk.default_launch(64, 8, 1024, 64) == (32, 1)
  assert dk.default_launch(32, 8, 1024, 64) == (64, 1)
  assert dk.default_launch(16, 8, 1024, 64) == (128, 1)
  assert dk.default_launch(16, 8, 1024, 128, rows=2) == (64, 1)
  assert dk.default_launch(256, 8, 1024, 128, rows=2, parallax=False) == (64, 1)
  # one token of 4-8 q-heads per KV head, few programs: 128-key tiles, one program per SM,
  # splits of >= 4 tiles; not for several tokens, softmax or many programs
  assert dk.default_launch(1, 8, 4096, 128, rows=4) == (128, 8)
  assert dk.default_launch(1, 8, 32768, 128, rows=8) == (128, 16)
  assert dk.default_launch(4, 8, 16384, 128, rows=4) == (128, 4)
  assert dk.default_launch(1, 8, 4096, 128, rows=4, tokens=2) == (64, 16)
  assert dk.default_launch(1, 8, 4096, 128, rows=4, parallax=False) == (64, 16)
  assert dk.default_launch(8, 8, 4096, 128, rows=4) == (64, 4)
  assert dk.default_num_splits(1, 8, 32768) > 1
  assert dk.default_num_splits(256, 8, 1024) == 1


@checkerboard("pack,Hq,Hkv,tokens,ns,window,parallax", [
    (2, 4, 4, None, 1, None), (2, 8, 4, None, 3, 7), (4, 4, 4, None, 2, None),
    (2, 4, 2, 3, 1, 5), (2, 8, 8, 2, 4, None)], [True, False])
def test_kv_heads_per_program(rng, pack, Hq, Hkv, tokens, ns, window, parallax):
  """Programs of `pack` neighbouring KV heads ([block_kv, pack*D] tiles): every row scores
  against its own head's columns; splits, windows, several tokens, ragged lengths."""
  B, S, D = 3, 70, 16
  lengths = [1, 33, 70] if tokens is None else [tokens, 33, 70]
  q, k, v, r = make(rng, B, Hq, Hkv, S, D, jnp.float32, parallax, tokens)
  k, v = poison_tail(k, lengths), poison_tail(v, lengths)
  lengths = jnp.asarray(lengths, jnp.int32)
  o = dk.parallax_decode(q, k, v, r, scale=0.25, lengths=lengths, window=window,
                         num_splits=ns, block_kv=16, kv_heads_per_program=pack, interpret=True)
  ref = dk.reference_decode(q, k, v, r, scale=0.25, lengths=lengths, window=window)
  np.testing.assert_allclose(np.asarray(o), np.asarray(ref), atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_default_launch_of_many_programs(rng):
  """One split of 32-key tiles (B*Hkv = 400 programs, ~3 per SM: the default), S = 260."""
  lens = [1, 260] + [int(x) for x in rng.integers(1, 261, 48)]
  assert dk.default_launch(50, 8, 260, 16, rows=1) == (32, 1)
  check(rng, 50, 8, 8, 260, 16, jnp.float32, lens, bk=None)


def test_default_pack(rng):
  assert dk.default_pack(256, 8, 1024, 64) == 2     # MHA, >= 512 programs
  assert dk.default_pack(64, 8, 4096, 64) == 2
  assert dk.default_pack(32, 8, 4096, 64) == 1      # 256 programs
  assert dk.default_pack(256, 8, 1024, 64, parallax=False) == 1
  assert dk.default_pack(256, 8, 1024, 64, rows=2) == 1
  assert dk.default_pack(256, 7, 1024, 64) == 1     # odd Hkv
  assert dk.default_pack(64, 8, 1024, 128, rows=2) == 2
  assert dk.default_pack(64, 8, 4096, 128, rows=2) == 1
  assert dk.default_pack(128, 8, 1024, 128, rows=2) == 1
  assert dk.default_pack(1, 8, 4096, 64) == 1       # split launch
  assert dk.default_launch(64, 8, 1024, 128, rows=2, pack=2) == (32, 1)
  assert dk.default_launch(256, 8, 1024, 64, pack=2) == (64, 1)
  # the default picks it: 2 heads of 32-key tiles (B*Hkv = 512, S <= 1k), against the reference
  lens = [int(x) for x in rng.integers(1, 301, 64)]
  check(rng, 64, 16, 8, 300, 128, jnp.float32, lens, bk=None)
  for bad in (3, 0, 2.0):
    with pytest.raises(ValueError, match="kv_heads_per_program"):
      q, k, v, r = make(rng, 1, 4, 4, 32, 16, jnp.float32)
      dk.parallax_decode(q, k, v, r, scale=0.25, lengths=jnp.asarray([5]),
                         kv_heads_per_program=bad, interpret=True)


def test_matches_family_api(rng):
  import parallax_jax
  B, Hq, Hkv, S, D = 2, 4, 2, 48, 16
  q, k, v, r = make(rng, B, Hq, Hkv, S, D, jnp.float32)
  lengths = jnp.asarray([20, 48], jnp.int32)
  scale = 1.0 / np.sqrt(D)
  o = dk.parallax_decode(q, k, v, r, scale=scale, lengths=lengths, num_splits=2, block_kv=16,
                         interpret=True)
  kv_ids = jnp.where(jnp.arange(S)[None] < lengths[:, None], 0, -1)
  q_ids = jnp.zeros((B, 1), jnp.int32)
  ref = parallax_jax.attention(q[:, None], k, v, r[:, None], probe="learned",
                               affine="affine", causal=True, segment_ids=(q_ids, kv_ids),
                               implementation="xla")[:, 0]  # bandwidth None: 1/sqrt(D)
  # causal end-aligned: the query sits at S-1 which sees all valid slots; same as lengths mask
  np.testing.assert_allclose(np.asarray(o), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("parallax", [True, False])
def test_gpu(rng, D, dtype, parallax):
  check(rng, 4, 16, 8, 3000, D, dtype, [1, 1000, 2999, 3000], ns=None, bk=64,
        parallax=parallax, interpret=False)
  check(rng, 2, 16, 2, 1024, D, dtype, [700, 1024], window=256, ns=3, bk=64,
        parallax=parallax, interpret=False)
  for ns in (1, 4):
    check(rng, 3, 16, 8, 1000, D, dtype, [2, 500, 1000], window=300, ns=ns, bk=64,
          parallax=parallax, interpret=False, tokens=4)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("B,Hq,Hkv,S,D,block_kv", [
    (32, 16, 8, 1000, 128, 32),    # unsplit, few programs: 32-key tiles, 4 warps
    (64, 8, 8, 1000, 64, 32),      # the same at D=64: 2 warps
    (32, 8, 8, 1000, 64, 64),      # ~2 programs per SM at D=64: 64-key tiles, 4 stages
    (16, 8, 8, 1000, 64, 128),     # ~1 per SM at D=64: 128-key tiles
    (256, 16, 8, 4096, 128, 128),  # >= 2048 programs: 128-key tiles, 2 stages
    (256, 8, 8, 1000, 64, 64),     # MHA, 2048 programs: 2 KV heads per program
    (64, 16, 8, 1000, 128, 32),    # 512 programs of 2 D=128 heads, 32-key tiles, 4 stages
])
def test_gpu_default_unsplit_launches(B, Hq, Hkv, S, D, block_kv):
  """The default launches of unsplit Parallax decode, compiled: ragged lengths (1 and S
  included), a poisoned tail, bf16 against the float32 reference."""
  pack = dk.default_pack(B, Hkv, S, D, rows=Hq // Hkv)
  assert dk.default_launch(B, Hkv, S, D, rows=Hq // Hkv, pack=pack) == (block_kv, 1)
  ks = jax.random.split(jax.random.key(B + S + D), 5)
  q = jax.random.normal(ks[0], (B, Hq, D), jnp.bfloat16)
  r = (0.3 * jax.random.normal(ks[1], (B, Hq, D))).astype(jnp.bfloat16)
  lengths = jax.random.randint(ks[2], (B,), 1, S + 1).at[:2].set(jnp.asarray([1, S]))
  k = poison_tail(jax.random.normal(ks[3], (B, S, Hkv, D), jnp.bfloat16), lengths)
  v = poison_tail(jax.random.normal(ks[4], (B, S, Hkv, D), jnp.bfloat16), lengths)
  o = jax.jit(lambda *a: dk.parallax_decode(*a, scale=D ** -0.5, lengths=lengths))(q, k, v, r)
  ref = dk.reference_decode(q, k, v, r, scale=D ** -0.5, lengths=lengths)
  o = np.asarray(o, np.float32)
  assert np.all(np.isfinite(o))
  err = np.max(np.abs(o - np.asarray(ref))) / np.max(np.abs(np.asarray(ref)))
  assert err <= TOL[jnp.bfloat16], err


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("parallax", [True, False])
@pytest.mark.parametrize("B,L,ns", [(1, 8192, None), (8, 1024, None), (64, 1024, None),
                                    (8, 1024, 1), (8, 1024, 8)])
def test_gpu_poisoned_cache(rng, parallax, B, L, ns):
  """Compiled decode (default launch, unsplit, split): NaN / inf past lengths reach no row;
  a NaN slot a row sees makes it NaN."""
  q, k, v, r = make(rng, B, 16, 8, L, 128, jnp.bfloat16, parallax)
  lengths = jnp.asarray(rng.integers(L // 2, L - 1, B), jnp.int32)
  past = jnp.arange(L)[None, :, None, None] >= lengths[:, None, None, None]
  kp = jnp.where(past, jnp.asarray(jnp.inf, k.dtype), k)
  vp = jnp.where(past, jnp.asarray(jnp.nan, v.dtype), v).at[0, 5].set(jnp.nan)
  f = jax.jit(lambda k, v: dk.parallax_decode(q, k, v, r, scale=128 ** -0.5, lengths=lengths,
                                              num_splits=ns))
  got, want = np.asarray(f(kp, vp), np.float32), np.asarray(f(k, v), np.float32)
  assert np.isnan(got[0]).all() and np.isfinite(got[1:]).all()
  np.testing.assert_allclose(got[1:], want[1:], rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("parallax", [True, False])
def test_gpu_many_splits_merge_is_exact_and_deterministic(rng, parallax):
  """Many splits merged in-kernel by the last program to arrive: the same bits every call
  (a merge reading a stale partial would change them) and close to the reference."""
  B, Hq, Hkv, S, D = 2, 16, 8, 8192, 128
  q, k, v, r = make(rng, B, Hq, Hkv, S, D, jnp.bfloat16, parallax)
  lengths = jnp.asarray([8192, 5000], jnp.int32)
  f = jax.jit(lambda q, k, v, r: dk.parallax_decode(q, k, v, r, scale=D ** -0.5,
                                                    lengths=lengths, num_splits=48))
  outs = [np.asarray(f(q, k, v, r), np.float32) for _ in range(20)]
  for o in outs[1:]:
    np.testing.assert_array_equal(o, outs[0])
  # the same with the arrival counter carried from call to call (the model's decode loop)
  g = jax.jit(lambda q, k, v, r, a: dk.parallax_decode(q, k, v, r, scale=D ** -0.5,
                                                       lengths=lengths, num_splits=48,
                                                       arrivals=a))
  arr = dk.init_arrivals(B, Hkv)
  for _ in range(20):
    o, arr = g(q, k, v, r, arr)
    np.testing.assert_array_equal(np.asarray(o, np.float32), outs[0])
  np.testing.assert_array_equal(arr, 0)
  ref = np.asarray(dk.reference_decode(q, k, v, r, scale=D ** -0.5, lengths=lengths))
  err = np.max(np.abs(outs[0] - ref)) / np.max(np.abs(ref))
  assert err <= TOL[jnp.bfloat16], err


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("member,tokens", [("parallax", 1), ("softmax", 1), ("parallax", 3)])
def test_gpu_decode_attention_auto_picks_kernel(member, tokens):
  """implementation=None on a GPU runs the compiled kernel and matches the dense path (one
  new token, or 3 per sequence)."""
  import parallax_jax
  B, Hq, Hkv, S, D = 3, 16, 8, 2048, 128
  ks = jax.random.split(jax.random.key(0), 4)
  qs = (B, Hq, D) if tokens == 1 else (B, tokens, Hq, D)
  q = jax.random.normal(ks[0], qs, jnp.bfloat16)
  r = (0.5 * jax.random.normal(ks[1], qs)).astype(jnp.bfloat16)
  kc = jax.random.normal(ks[2], (B, S, Hkv, D), jnp.bfloat16)
  vc = jax.random.normal(ks[3], (B, S, Hkv, D), jnp.bfloat16)
  lens = jnp.asarray([1, 1000, 2048], jnp.int32)
  kw = (dict(probe="learned", affine="affine") if member == "parallax"
        else dict(probe="none", affine="constant"))
  rr = r if member == "parallax" else None
  f = lambda impl: jax.jit(lambda *a: parallax_jax.decode_attention(
      *a, lengths=lens, implementation=impl, **kw))
  assert "pallas_call" in str(jax.make_jaxpr(f(None))(q, kc, vc, rr))
  o, ref = f(None)(q, kc, vc, rr), f("xla")(q, kc, vc, rr)
  err = float(jnp.max(jnp.abs(o.astype(jnp.float32) - ref.astype(jnp.float32))) /
              jnp.max(jnp.abs(ref.astype(jnp.float32))))
  assert err < 1e-2, err


@pytest.mark.parametrize("parallax,tokens,batch,ns", [
    (True, 1, 4, 3), (False, 1, 4, 3), (True, 4, 4, 3),
    (True, 1, 64, None),   # default launch: one split of 128-key tiles, per-element row sums
    (True, 1, 32, None),   # default launch: one split of 32-key tiles
    (True, 1, 64, "pack")])  # two KV heads per program, 32-key tiles (S=1000)
def test_cuda_lowering_abstract_h100(parallax, tokens, batch, ns):
  """Lower for CUDA on an abstract H100 (no GPU) and verify the kernel's TTIR."""
  q = jax.ShapeDtypeStruct((batch, 16, 128) if tokens == 1 else (batch, tokens, 16, 128),
                           jnp.bfloat16)
  S = 3000
  if ns == "pack":
    S, ns = 1000, None
    assert dk.default_pack(batch, 8, S, 128, rows=2) == 2
  kv = jax.ShapeDtypeStruct((batch, S, 8, 128), jnp.bfloat16)
  lens = jax.ShapeDtypeStruct((batch,), jnp.int32)
  f = lambda q, k, v, r, l: dk.parallax_decode(q, k, v, r if parallax else None, scale=0.1,
                                               lengths=l, window=500, num_splits=ns)
  mods = triton_modules(lower_h100(f, q, kv, kv, q, lens))
  assert [n for n, _ in mods] == ["parallax_decode" if parallax else "softmax_decode"]
  verify_triton_modules(mods)


# ----------------------------------------------------------------------------- decode_attention
# The public decode entry `parallax_jax.decode_attention`: 'pallas' (the kernel above, interpret
# mode on CPU) against 'xla' and against the generic `attention` with the model's decode
# segment ids (the path the model's decode step took before).

MEMBER_ARGS = {"softmax": dict(probe="none", affine="constant"),
               "parallax": dict(probe="learned", affine="affine")}


def _old_generic(q, k, v, r, lengths, window, bandwidth=None, **member):
  import parallax_jax
  # the mask the model's decode step used before: slot j visible iff j < n (and j >= n - W)
  n = jnp.asarray(lengths, jnp.int32)[:, None]
  j = jnp.arange(k.shape[1], dtype=jnp.int32)[None, :]
  valid = (j < n) & ((j >= n - window) if window is not None else True)
  seg = (jnp.zeros((q.shape[0], 1), jnp.int32), jnp.where(valid, 0, -1).astype(jnp.int32))
  dt = q.dtype
  return parallax_jax.attention(
      q[:, None], k.astype(dt), v.astype(dt), None if r is None else r[:, None],
      bandwidth=bandwidth, causal=False, segment_ids=seg, implementation="xla", **member)[:, 0]


def _decode_three_ways(rng, B, Hq, Hkv, S, D, dtype, lengths, member, window=None,
                       bandwidth=None, bk=16, ns=2):
  import parallax_jax
  q, k, v, r = make(rng, B, Hq, Hkv, S, D, dtype, parallax=member == "parallax")
  k, v = poison_tail(k, lengths), poison_tail(v, lengths)
  lengths = jnp.asarray(lengths, jnp.int32)
  kw = dict(lengths=lengths, window=window, bandwidth=bandwidth, **MEMBER_ARGS[member])
  o_p = parallax_jax.decode_attention(q, k, v, r, implementation="pallas", block_kv=bk,
                                      num_splits=ns, **kw)
  o_x = parallax_jax.decode_attention(q, k, v, r, implementation="xla", **kw)
  o_old = _old_generic(q, k, v, r, lengths, window, bandwidth, **MEMBER_ARGS[member])
  for o in (o_p, o_x):
    assert o.shape == q.shape and o.dtype == q.dtype
  return [np.asarray(o, np.float32) for o in (o_p, o_x, o_old)]


def _close(a, b, dtype):
  err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6)
  assert err <= TOL[dtype], err


@checkerboard("member,Hq,Hkv", ["softmax", "parallax"], [(4, 4), (4, 2), (8, 2)])
def test_decode_attention_gqa(rng, member, Hq, Hkv):
  # lengths 1, a non-multiple of the 16-key tile, the full (non-multiple) cache
  o_p, o_x, o_old = _decode_three_ways(rng, 3, Hq, Hkv, 50, 16, jnp.float32, [1, 21, 50],
                                       member)
  np.testing.assert_array_equal(o_x, o_old)  # 'xla' is the old generic path
  _close(o_p, o_x, jnp.float32)


@checkerboard("member,dtype", ["softmax", "parallax"], [jnp.float32, jnp.bfloat16])
def test_decode_attention_window_and_dtype(rng, member, dtype):
  o_p, o_x, o_old = _decode_three_ways(rng, 4, 4, 2, 40, 16, dtype, [1, 3, 19, 40], member,
                                       window=5, ns=3)
  np.testing.assert_array_equal(o_x, o_old)
  _close(o_p, o_x, dtype)


@pytest.mark.parametrize("bandwidth", ci_subset([2.5, "per_head", "inf"], ["per_head"]))
def test_decode_attention_bandwidth(rng, bandwidth):
  """Python-float bandwidth -> the kernel's scale; an array is folded into q; inf: uniform."""
  bw = {"per_head": jnp.asarray([2.0, 3.0, 5.0, 8.0]), "inf": np.inf}.get(bandwidth, bandwidth)
  o_p, o_x, o_old = _decode_three_ways(rng, 2, 4, 2, 33, 16, jnp.float32, [7, 33], "parallax",
                                       bandwidth=bw)
  np.testing.assert_allclose(o_x, o_old, rtol=1e-6, atol=1e-6)
  _close(o_p, o_x, jnp.float32)


def test_decode_attention_ranks_dtypes_and_auto(rng):
  import parallax_jax
  q, k, v, r = make(rng, 2, 4, 2, 24, 16, jnp.float32)
  lengths = jnp.asarray([5, 24], jnp.int32)
  kw = dict(lengths=lengths, probe="learned", affine="affine")
  o3 = parallax_jax.decode_attention(q, k, v, r, implementation="xla", **kw)
  o4 = parallax_jax.decode_attention(q[:, None], k, v, r[:, None], implementation="xla", **kw)
  assert o4.shape == (2, 1, 4, 16)
  np.testing.assert_array_equal(o4[:, 0], o3)
  # None on CPU is 'xla'
  np.testing.assert_array_equal(parallax_jax.decode_attention(q, k, v, r, **kw), o3)
  # a cache stored in another dtype than q: read as stored, output in q's dtype
  qb, rb = q.astype(jnp.bfloat16), r.astype(jnp.bfloat16)
  for impl in ("pallas", "xla"):
    o = parallax_jax.decode_attention(qb, k, v, rb, implementation=impl, block_kv=16, **kw)
    assert o.dtype == jnp.bfloat16
    _close(np.asarray(o, np.float32), np.asarray(o3), jnp.bfloat16)
  # lengths 0: zero rows; a probe of zeros: softmax
  z = parallax_jax.decode_attention(q, k, v, jnp.zeros_like(r), implementation="pallas",
                                    lengths=jnp.asarray([0, 9]), probe="learned",
                                    affine="affine", block_kv=16)
  s = parallax_jax.decode_attention(q, k, v, implementation="pallas", lengths=jnp.asarray([0, 9]),
                                    probe="none", affine="constant", block_kv=16)
  assert np.all(np.asarray(z[0]) == 0)
  np.testing.assert_allclose(z, s, rtol=1e-6, atol=1e-6)
  # a carried arrival counter: (o, counter) on both paths ('xla' passes it through)
  zeros = jnp.zeros((2, 2), jnp.int32)
  for impl in ("pallas", "xla"):
    o, arr = parallax_jax.decode_attention(q, k, v, r, implementation=impl, block_kv=16,
                                           num_splits=2, arrivals=zeros, **kw)
    np.testing.assert_array_equal(arr, 0)
    _close(np.asarray(o), np.asarray(o3), jnp.float32)


@checkerboard("member,window", ["softmax", "parallax"], [None, 6])
def test_decode_attention_multi_token(rng, member, window):
  """T new tokens per sequence: token t at slot lengths-T+t, causal among them; 'pallas'
  (one launch for all T), 'xla' and the kernel's token-by-token reference agree, and 'xla'
  matches T one-token calls. lengths 2 < T: the first token sees no key (zero row)."""
  import parallax_jax
  B, Hq, Hkv, S, D, T = 4, 4, 2, 40, 16, 3
  q, k, v, r = make(rng, B, Hq, Hkv, S, D, jnp.float32, parallax=member == "parallax",
                    tokens=T)
  lengths = jnp.asarray([2, 3, 21, 40], jnp.int32)
  k, v = poison_tail(k, lengths), poison_tail(v, lengths)
  kw = dict(lengths=lengths, window=window, **MEMBER_ARGS[member])
  o_p = parallax_jax.decode_attention(q, k, v, r, implementation="pallas", block_kv=16,
                                      num_splits=2, **kw)
  o_x = parallax_jax.decode_attention(q, k, v, r, implementation="xla", **kw)
  ref = np.asarray(dk.reference_decode(q, k, v, r, scale=1 / np.sqrt(D), lengths=lengths,
                                       window=window))
  assert o_p.shape == o_x.shape == q.shape
  _close(np.asarray(o_p), ref, jnp.float32)
  _close(np.asarray(o_x), ref, jnp.float32)
  assert np.all(np.asarray(o_p)[0, 0] == 0) and np.all(np.asarray(o_x)[0, 0] == 0)
  for t in range(T):
    one = parallax_jax.decode_attention(
        q[:, t], k, v, None if r is None else r[:, t], implementation="xla",
        **{**kw, "lengths": jnp.maximum(lengths - (T - 1 - t), 0)})
    np.testing.assert_allclose(o_x[:, t], one, rtol=1e-6, atol=1e-6)
  # a per-head bandwidth array, folded into the T query rows on the kernel path
  kw["bandwidth"] = jnp.asarray([2.0, 3.0, 5.0, 8.0])
  o_p = parallax_jax.decode_attention(q, k, v, r, implementation="pallas", block_kv=16, **kw)
  o_x = parallax_jax.decode_attention(q, k, v, r, implementation="xla", **kw)
  _close(np.asarray(o_p), np.asarray(o_x), jnp.float32)


def test_decode_attention_other_members_xla(rng):
  """Members the kernel does not compute run on 'xla' (and None); 'pallas' refuses them."""
  import parallax_jax
  q, k, v, _ = make(rng, 2, 4, 2, 20, 16, jnp.float32)
  lengths = jnp.asarray([6, 20], jnp.int32)
  kw = dict(lengths=lengths, probe="solve", affine="boundary", ridge=0.1, window=8)
  o = parallax_jax.decode_attention(q, k, v, **kw)
  np.testing.assert_allclose(o, _old_generic(q, k, v, None, lengths, 8, probe="solve",
                                             affine="boundary", ridge=0.1), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="decode kernel computes softmax and Parallax"):
    parallax_jax.decode_attention(q, k, v, implementation="pallas", **kw)


def test_decode_attention_bad_inputs(rng):
  import parallax_jax
  q, k, v, r = make(rng, 2, 4, 2, 20, 16, jnp.float32)
  L = jnp.asarray([3, 4], jnp.int32)
  par = dict(probe="learned", affine="affine")

  def bad(match, *args, **kw):
    a = dict(zip(("q", "k_cache", "v_cache", "r"), (q, k, v, r)))
    a.update(zip(("q", "k_cache", "v_cache", "r"), args))
    kw = {"lengths": L, **par, **kw}
    with pytest.raises(ValueError, match=match):
      parallax_jax.decode_attention(a["q"], a["k_cache"], a["v_cache"], a["r"], **kw)

  bad(r"q must be \[batch, q_heads, head_dim\]", q[:, :, None, None])
  bad(r"or \[batch, tokens, q_heads, head_dim\] with tokens >= 1", q[:, None][:, :0],
      k, v, r[:, None][:, :0])
  many = lambda x: jnp.repeat(x[:, None], 33, axis=1)  # 33 tokens x 2 q-heads per KV head
  bad("at most 64 rows per KV head", many(q), k, v, many(r), implementation="pallas")
  bad("r must have q's shape", q, k, v, r[:, :2])
  bad("q and r must share one dtype", q, k, v, r.astype(jnp.bfloat16))
  bad("k_cache must have rank 4", q, k[:, 0])
  bad("k_cache and v_cache must share one dtype", q, k, v.astype(jnp.bfloat16))
  bad("k_cache and v_cache must agree", q, k, v[:, :10])
  bad("batch sizes differ", q, k[:1], v[:1])
  bad("head_dim mismatch", q[..., :8], k, v, r[..., :8])
  bad(r"multiple of kv heads", q[:, :3], k, v, r[:, :3])
  bad(r"lengths must have shape \[batch\]=\(2,\)", lengths=L[:1])
  bad("lengths must be integers", lengths=jnp.asarray([1.0, 2.0]))
  bad("probe='learned' needs r", q, k, v, None)
  bad("unknown decode implementation 'chunked'", implementation="chunked")
  bad("window must be a positive int", window=0)
  bad("block_kv must be a power of two", block_kv=24)
  bad("num_splits must be a positive int", num_splits=0)
  bad(r"arrivals must be int32 \[batch, kv_heads\] = \(2, 2\)",
      arrivals=jnp.zeros((2, 2), jnp.float32))
  bad("bandwidth must be > 0", bandwidth=-1.0, implementation="pallas")
  bad("bandwidth must be > 0", bandwidth=-1.0, implementation="xla")
  bad("head_dim a power of two >= 16", q[..., :8], k[..., :8], v[..., :8], r[..., :8],
      implementation="pallas")
  with jax.enable_x64(True):
    k64, v64 = k.astype(jnp.float64), v.astype(jnp.float64)
    assert k64.dtype == jnp.float64
    bad("reads caches of float32/bfloat16/float16", q, k64, v64, implementation="pallas")
