"""Non-finite values in the split-KV decode kernel (pallas_kernels/decode_triton.py): interpret mode
on CPU against `reference_decode` (docs/attention.md, rules 1-2), and the kernel's structure
(one loop over the keys for one new token per row) in its CUDA lowering on an abstract H100.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common
from pallas_kernels import decode_triton as dk
from tests.kernels import checkerboard, lower_h100, triton_modules, verify_triton_modules

warnings.filterwarnings("ignore", category=DeprecationWarning)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
NAN, INF = np.nan, np.inf


def _inputs(rng, B, Hq, Hkv, S, D, dtype, tokens, parallax):
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  qs = (B, Hq, D) if tokens == 1 else (B, tokens, Hq, D)
  q, r = f(*qs), 0.3 * f(*qs)
  k, v = f(B, S, Hkv, D), f(B, S, Hkv, D)
  return {"q": q.astype(dtype), "k": k.astype(dtype), "v": v.astype(dtype),
          "r": r.astype(dtype) if parallax else None}


def _poison(x, name, b, where, head, value, tokens):
  """x with `value` in one entry (column 3): batch b, slots (k, v) or token (q, r with T > 1)
  `where` (an int or a slice), head `head` (None: every head)."""
  hs = slice(None) if head is None else head
  if name in ("k", "v"):
    return x.at[b, where, hs, 3].set(value)
  return x.at[b, hs, 3].set(value) if tokens == 1 else x.at[b, where, hs, 3].set(value)


def _decode(*, lengths, window, ns, pack, bk):
  return jax.jit(lambda q, k, v, r: dk.parallax_decode(
      q, k, v, r, scale=0.3, lengths=jnp.asarray(lengths, jnp.int32), window=window,
      num_splits=ns, block_kv=bk, kv_heads_per_program=pack, interpret=True))


def check(rng, *, poison, lengths, B=None, Hq=4, Hkv=2, S=70, D=64, dtype=jnp.float32,
          tokens=1, window=None, ns=1, pack=None, bk=16, parallax=True, dead="some"):
  """The kernel on a poisoned cache against `reference_decode`: the same rows are NaN (in
  every entry), the others are finite, match the reference, and equal the kernel's output on
  the clean inputs bit for bit (masked slots never enter a row's arithmetic).
  dead: "none" (no row sees a poisoned value), "some", or "all"."""
  B = len(lengths) if B is None else B
  clean = _inputs(rng, B, Hq, Hkv, S, D, dtype, tokens, parallax)
  bad = dict(clean)
  for name, b, where, head, value in poison:
    if bad[name] is not None:   # (softmax: no r)
      bad[name] = _poison(bad[name], name, b, where, head, value, tokens)
  f = _decode(lengths=lengths, window=window, ns=ns, pack=pack, bk=bk)
  got = np.asarray(f(bad["q"], bad["k"], bad["v"], bad["r"]), np.float32)
  want = np.asarray(f(clean["q"], clean["k"], clean["v"], clean["r"]), np.float32)
  ref = np.asarray(dk.reference_decode(bad["q"], bad["k"], bad["v"], bad["r"], scale=0.3,
                                       lengths=jnp.asarray(lengths, jnp.int32),
                                       window=window))
  assert got.shape == ref.shape == bad["q"].shape
  ref_dead = np.isnan(ref).all(-1)
  assert not np.isnan(ref[~ref_dead]).any()
  got_dead = np.isnan(got).all(-1)
  np.testing.assert_array_equal(got_dead, ref_dead)
  assert np.isfinite(got[~got_dead]).all()
  n = int(ref_dead.sum())
  assert {"none": n == 0, "some": 0 < n < ref_dead.size, "all": n == ref_dead.size}[dead], n
  live = ~ref_dead
  np.testing.assert_array_equal(got[live], want[live])
  err = np.max(np.abs(got[live] - ref[live]), initial=0.0) / max(np.max(np.abs(ref[live]),
                                                                        initial=0.0), 1e-6)
  assert err <= TOL[dtype], err
  return got_dead


def _tail(name, lengths, value, head=None):
  """`value` in every slot at or past lengths (K or V), all heads."""
  return [(name, b, slice(n, None), head, value) for b, n in enumerate(lengths)]


LENGTHS = [1, 37, 70, 16]      # S=70, 16-key tiles: a one-key row, mid-tile, the clamped last
                               # tile (70 = 4 x 16 + 6), a tile boundary


# ----------------------------------------------------------------------------- one token


@checkerboard("name,value,ns", ["k", "v"], [NAN, INF], [1, 3])
def test_tail_past_lengths(rng, name, value, ns):
  """NaN / inf in every slot past lengths, K or V alone: no row changes (bit for bit)."""
  check(rng, poison=_tail(name, LENGTHS, value), lengths=LENGTHS, ns=ns, dead="none")


@checkerboard("parallax,ns", [True, False], [1, 3, 5])
def test_window_excluded_and_tail(rng, parallax, ns):
  """NaN before the window (the window-start tile and whole tiles before it) and inf past
  lengths: nothing reaches a row."""
  lengths = [37, 70, 9, 64]
  poison = ([("k", b, slice(0, n - 8), None, NAN) for b, n in enumerate(lengths)]
            + [("v", b, slice(0, n - 8), None, INF) for b, n in enumerate(lengths)]
            + _tail("v", lengths, NAN) + _tail("k", lengths, -INF))
  check(rng, poison=poison, lengths=lengths, window=8, ns=ns, parallax=parallax, dead="none")


@checkerboard("name,value,ns", [("k", NAN), ("v", NAN), ("v", INF), ("k", INF)], [1, 3])
def test_visible_slot(rng, name, value, ns):
  """A non-finite entry in a visible slot: the rows of its KV head are NaN in every entry,
  the others (other heads, other sequences) untouched, also with NaN past lengths."""
  lengths = [37, 70, 9]
  poison = _tail("v", lengths, NAN) + [(name, 0, 20, 1, value), (name, 1, 69, 0, value),
                                       (name, 2, 0, 0, value)]
  dead = check(rng, poison=poison, lengths=lengths, ns=ns)
  np.testing.assert_array_equal(dead, [[0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]])


def test_visible_softmax(rng):
  """Softmax: NaN in a visible K or V slot (an infinite key entry may weigh 0 instead: the
  documented exception), with inf past lengths."""
  lengths = [37, 70, 9]
  poison = _tail("k", lengths, INF) + [("k", 0, 36, 1, NAN), ("v", 1, 0, 0, NAN)]
  for ns in (1, 3):
    dead = check(rng, poison=poison, lengths=lengths, ns=ns, parallax=False)
    np.testing.assert_array_equal(dead, [[0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])


@checkerboard("Hq,Hkv,pack,ns", [(2, 2, None), (4, 2, None), (16, 2, None), (2, 2, 2),
                                 (4, 2, 2), (16, 2, 2)], [1, 3])
def test_gqa_and_packed_heads(rng, Hq, Hkv, pack, ns):
  """GQA ratios 1 / 2 / 8, one or two KV heads per program: a poisoned slot of head 1 past
  lengths changes nothing, one in a visible slot kills exactly head 1's rows."""
  lengths = [37, 70, 5]
  G = Hq // Hkv
  poison = _tail("k", lengths, NAN, head=1) + _tail("v", lengths, INF, head=0)
  check(rng, poison=poison, lengths=lengths, Hq=Hq, Hkv=Hkv, ns=ns, pack=pack, dead="none")
  poison = poison + [("v", 1, 3, 1, NAN)]
  dead = check(rng, poison=poison, lengths=lengths, Hq=Hq, Hkv=Hkv, ns=ns, pack=pack)
  want = np.zeros((3, Hq), bool)
  want[1, G:] = True
  np.testing.assert_array_equal(dead, want)


@checkerboard("D,dtype,parallax", [(64, jnp.bfloat16), (128, jnp.float32),
                                   (128, jnp.bfloat16)], [True, False])
def test_head_dims_and_dtypes(rng, D, dtype, parallax):
  lengths = [37, 70, 23]
  poison = (_tail("k", lengths, NAN) + _tail("v", lengths, -INF)
            + [("v", 2, 22, None, NAN)])
  dead = check(rng, poison=poison, lengths=lengths, D=D, dtype=dtype, ns=3,
               parallax=parallax)
  assert dead[2].all() and not dead[:2].any()


def test_q_and_r(rng):
  """A non-finite q or r row is NaN; lengths 0 (no key: zero rows otherwise), with NaN in
  the whole cache; and a split that holds none of a row's keys."""
  lengths = [0, 37, 0, 5]
  poison = (_tail("k", lengths, NAN) + _tail("v", lengths, NAN)
            + [("q", 0, None, 1, NAN), ("r", 1, None, 2, INF), ("q", 3, None, 0, NAN),
               ("r", 2, None, 3, NAN)])
  for ns in (1, 3):
    dead = check(rng, poison=poison, lengths=lengths, ns=ns)
    want = np.zeros((4, 4), bool)
    want[0, 1] = want[1, 2] = want[3, 0] = want[2, 3] = True
    np.testing.assert_array_equal(dead, want)
  # softmax ignores r
  dead = check(rng, poison=poison, lengths=lengths, ns=3, parallax=False)
  assert dead.sum() == 2 and dead[0, 1] and dead[3, 0]


def test_all_lengths_zero(rng):
  """An empty cache full of NaN: every row is zero."""
  lengths = [0, 0]
  poison = _tail("k", lengths, NAN) + _tail("v", lengths, INF)
  for ns in (1, 3):
    got_dead = check(rng, poison=poison, lengths=lengths, ns=ns, dead="none")
    assert not got_dead.any()


def test_many_splits_merge_by_tiles(rng):
  """>= 32 splits (the merge reads [splits, D] tiles): NaN past lengths changes nothing, a
  visible NaN in one split kills its rows."""
  S, lengths = 512, [333, 512, 17]
  assert common.split_chunk(S, 32, 16)[1] >= dk.MERGE_TILES_FROM
  poison = _tail("v", lengths, NAN) + _tail("k", lengths, INF)
  check(rng, poison=poison, lengths=lengths, S=S, ns=32, dead="none")
  dead = check(rng, poison=poison + [("v", 0, 200, 0, NAN)], lengths=lengths, S=S, ns=32)
  np.testing.assert_array_equal(dead, [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_default_launch(rng):
  """The launch `parallax_decode` picks by itself (block_kv / num_splits None)."""
  lengths = [300, 511, 77, 1]
  poison = _tail("v", lengths, NAN) + _tail("k", lengths, NAN)
  check(rng, poison=poison, lengths=lengths, S=512, ns=None, bk=None, dtype=jnp.bfloat16,
        dead="none")


# ----------------------------------------------------------------------------- several tokens


@checkerboard("ns,pack,parallax", [(1, None), (3, None), (3, 2)], [True, False])
def test_multi_token(rng, ns, pack, parallax):
  """T=3 new tokens at slots L-3..L-1: NaN in the last token's slot reaches only that token,
  NaN in the middle one the last two; NaN past lengths nothing."""
  lengths = [37, 70, 9]
  poison = (_tail("v", lengths, NAN) + _tail("k", lengths, INF)
            + [("v", 0, 36, None, NAN), ("k", 1, 68, 0, NAN)])
  dead = check(rng, poison=poison, lengths=lengths, tokens=3, ns=ns, pack=pack,
               parallax=parallax)
  want = np.zeros((3, 3, 4), bool)      # [B, T, Hq]
  want[0, 2] = True                     # slot 36 = L - 1: the last token only
  want[1, 1:, :2] = True                # slot 68 = L - 2, KV head 0: tokens 1 and 2
  np.testing.assert_array_equal(dead, want)


@pytest.mark.parametrize("ns", [1, 3])
def test_multi_token_window(rng, ns):
  """T=3 with a window of 8: a slot only the first token sees (L-10) kills only it; lengths
  shorter than T (a token before the cache) and a non-finite q there; bf16, D=128, G=8."""
  lengths = [37, 70, 2]
  poison = ([("v", 0, 27, None, NAN), ("k", 1, 60, 1, INF), ("q", 2, 0, 3, NAN)]
            + _tail("k", lengths, NAN) + _tail("v", lengths, NAN)
            + [("k", b, slice(0, max(n - 10, 0)), None, NAN) for b, n in enumerate(lengths)])
  dead = check(rng, poison=poison, lengths=lengths, Hq=16, Hkv=2, D=128, tokens=3, window=8,
               ns=ns, dtype=jnp.bfloat16)
  want = np.zeros((3, 3, 16), bool)
  want[0, 0] = True                     # slot 27 = 37 - 10: token 0 (slot 34) only
  want[1, 0, 8:] = True                 # slot 60, KV head 1: token 0 (slot 67) only
  want[2, 0, 3] = True                  # token 0 sits before the cache: q NaN, no key
  np.testing.assert_array_equal(dead, want)


# ----------------------------------------------------------------------------- structure


def _lower(tokens, parallax, batch, S, ns, Hq=16, Hkv=8, D=128, window=500, pack=None):
  """TTIR modules of the kernel lowered for CUDA on an abstract H100 (no GPU)."""
  q = jax.ShapeDtypeStruct((batch, Hq, D) if tokens == 1 else (batch, tokens, Hq, D),
                           jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, S, Hkv, D), jnp.bfloat16)
  lens = jax.ShapeDtypeStruct((batch,), jnp.int32)
  f = lambda q, k, v, r, l: dk.parallax_decode(q, k, v, r if parallax else None, scale=0.1,
                                               lengths=l, window=window, num_splits=ns,
                                               kv_heads_per_program=pack)
  mods = triton_modules(lower_h100(f, q, kv, kv, q, lens))
  assert [n for n, _ in mods] == ["parallax_decode" if parallax else "softmax_decode"]
  verify_triton_modules(mods)
  return mods


def _structure(raw):
  """The tt.dot ops of a TTIR module and the loops (scf.for / scf.while) and conditionals
  (scf.if) that hold some: (total dots, [dots per loop], [(dots, holds a loop) per
  conditional])."""
  from jax._src.interpreters import mlir
  from jax._src.lib import triton as tlib
  from jax._src.lib.mlir import ir
  ctx = mlir.make_ir_context()
  tlib.dialect.register_dialect(ctx)
  loops, ifs = [], []

  def walk(op):  # -> (dots nested in op, loops nested in op)
    n = nl = 0
    for region in op.regions:
      for block in region.blocks:
        for o in block.operations:
          d, l = walk(o.operation)
          n, nl = n + d, nl + l
    if op.name == "tt.dot":
      n += 1
    elif op.name in ("scf.for", "scf.while") and n:
      loops.append(n)
      nl += 1
    elif op.name == "scf.if" and n:
      ifs.append((n, nl > 0))
    return n, nl

  with ctx:
    total, _ = walk(ir.Module.parse(raw).operation)
  return total, loops, ifs


STRUCT_CASES = {            # tokens, parallax, batch, S, splits, Hq, Hkv, D, pack
    "unsplit": (1, True, 64, 3000, 1, 16, 8, 128, None),
    "split_softmax": (1, False, 4, 3000, 3, 16, 8, 128, None),
    "split": (1, True, 4, 3000, 3, 16, 8, 128, None),
    "merge_by_tiles": (1, True, 1, 8192, None, 8, 8, 64, None),
    "packed": (1, True, 64, 1000, None, 16, 8, 128, 2),
    "default_mha_pack": (1, True, 128, 2048, None, 8, 8, 64, None),
}


@pytest.mark.parametrize("case", list(STRUCT_CASES))
def test_one_token_kernel_has_one_loop(case):
  """One new token per row: the kernel lowers for CUDA with a single loop over the keys;
  the only other dots are one tile's (rows that see fewer than block_kv keys), in a
  conditional without a loop. No second pass."""
  tokens, parallax, batch, S, ns, Hq, Hkv, D, pack = STRUCT_CASES[case]
  (_, raw), = _lower(tokens, parallax, batch, S, ns, Hq, Hkv, D, pack=pack)
  total, loops, ifs = _structure(raw)
  assert len(loops) == 1, (total, loops, ifs)
  per_tile = loops[0]
  assert total == 2 * per_tile and (per_tile, False) in ifs, (total, loops, ifs)
  # the check sees a second pass: T > 1 compiles the careful loop in
  (_, raw2), = _lower(2, parallax, batch, S, ns, Hq, Hkv, D, pack=pack)
  total2, loops2, _ = _structure(raw2)
  assert len(loops2) == 2 and total2 == 4 * loops2[0], (total2, loops2)


def test_one_token_jaxpr_has_one_loop():
  """The same in the kernel's jaxpr (what interpret mode runs): one loop and one tile's dots
  in a cond without a loop, for T == 1; T == 2 adds the careful pass."""
  def kernel_jaxpr(tokens):
    q = jnp.zeros((2, 4, 64) if tokens == 1 else (2, tokens, 4, 64), jnp.bfloat16)
    kv = jnp.zeros((2, 70, 2, 64), jnp.bfloat16)
    f = lambda q, k, v, r: dk.parallax_decode(q, k, v, r, scale=0.1, lengths=jnp.array([5, 7]),
                                              num_splits=3, block_kv=16, interpret=True)
    found = []

    def walk(jaxpr):
      for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
          found.append(eqn.params["jaxpr"])
        for sub in _subjaxprs(eqn):
          walk(sub)

    walk(jax.make_jaxpr(f)(q, kv, kv, q).jaxpr)
    (kj,) = found
    return kj

  def count(jaxpr):  # loops [dots], conds [(dots, holds a loop)]
    loops, conds = [], []
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      subs = list(_subjaxprs(eqn))
      n = sum(_dots(s) for s in subs)
      sub_loops = []
      for s in subs:
        ls, cs = count(s)
        sub_loops, conds = sub_loops + ls, conds + cs
      loops += sub_loops
      if name == "cond" and n:
        conds.append((n, bool(sub_loops)))
      if name in ("while", "scan") and n:
        loops.append(n)
    return loops, conds

  loops, conds = count(kernel_jaxpr(1))
  assert len(loops) == 1, (loops, conds)
  n = loops[0]
  assert n > 0 and (n, False) in conds and _dots(kernel_jaxpr(1)) == 2 * n, conds
  loops2, _ = count(kernel_jaxpr(2))
  assert len(loops2) == 2, loops2


def _subjaxprs(eqn):
  from jax.extend import core as jcore
  for v in eqn.params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, jcore.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jcore.Jaxpr):
        yield x


def _dots(jaxpr):
  return sum(int(eqn.primitive.name == "dot_general") + sum(_dots(s) for s in _subjaxprs(eqn))
             for eqn in jaxpr.eqns)
