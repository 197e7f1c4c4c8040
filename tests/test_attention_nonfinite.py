"""The training kernels' non-finite handling: fast launches that mark, fixup launches that repair.

Each Triton training kernel (`attention_triton`: forward, dq/dr, dk/dv) runs as a fast launch
that computes every program as if its inputs were finite and marks the programs whose result
is not (forward: lse = NaN on the rows; backward: a flag per program), and a fixup launch that
reads the marks first and reruns only the marked programs carefully, in place
(docs/attention.md).

CPU: the kernels run in Pallas interpret mode; the structure of the fast kernels (no branch,
no second loop) is checked on their jaxprs and on the Triton IR lowered for an abstract H100.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes, attention, common, parallax_flash_attention
from pallas_kernels import attention_triton as tr
from parallax_jax import masks
from tests.kernels import ci_subset, lower_h100, triton_modules, verify_triton_modules

warnings.filterwarnings("ignore", category=DeprecationWarning)

B16 = BlockSizes(16, 16, 4, 2, 16, 16, 4, 2, 16, 16, 4, 2)
MIXED = BlockSizes(32, 16, 4, 2, 16, 32, 4, 2, 16, 32, 4, 2)


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass(frozen=True)
class Case:
  T: int = 45
  S: int = 45
  Hq: int = 4
  Hkv: int = 2
  D: int = 16
  dtype: object = jnp.float32
  causal: bool = True
  window: int | None = None
  parallax: bool = True
  segments: bool = False  # packed documents: ids [0] * (S * 7 // 16) + [1] * the rest
  need_dscale: bool = False
  blocks: BlockSizes = B16
  # (array, position, head or None for all, value); array in q, k, v, r, do ("do": the
  # cotangent of o, at query positions, q-heads)
  poison: tuple = ()


def setup(c: Case, seed=0):
  """(cfg, padded (q, k, v, r, scale, qseg, kseg), padded do, visibility [1, T, S], ids)
  as `parallax_flash_attention` builds them, with c.poison applied."""
  rng = np.random.default_rng(seed)
  n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(c.dtype)
  x = {"q": n(1, c.T, c.Hq, c.D), "k": n(1, c.S, c.Hkv, c.D), "v": n(1, c.S, c.Hkv, c.D),
       "r": (n(1, c.T, c.Hq, c.D) * 0.5).astype(c.dtype), "do": n(1, c.T, c.Hq, c.D)}
  for name, pos, h, val in c.poison:
    x[name] = x[name].at[:, pos, slice(None) if h is None else slice(h, h + 1)].set(val)
  seg = None
  if c.segments:
    ids = np.repeat([0, 1], [c.S * 7 // 16, c.S - c.S * 7 // 16])
    seg = jnp.asarray(ids[None, c.S - c.T:], jnp.int32), jnp.asarray(ids[None], jnp.int32)
  vis = np.asarray(masks.full_mask(c.T, c.S, causal=c.causal, window=c.window,
                                   q_seg=None if seg is None else seg[0],
                                   kv_seg=None if seg is None else seg[1]))
  vis = np.broadcast_to(vis, (1, c.T, c.S))
  Dp = max(16, common.next_pow2(c.D))
  bs = attention._fit_blocks(c.blocks, c.T, c.S)
  Tp = common.round_up(c.T, max(bs.block_q, bs.block_q_dq, bs.block_q_dkv))
  Sp = common.round_up(c.S, max(bs.block_k, bs.block_k_dq, bs.block_k_dkv))
  cfg = tr.CallConfig(T=c.T, S=c.S, Tp=Tp, Sp=Sp, D=Dp, Hq=c.Hq, Hkv=c.Hkv, causal=c.causal,
                      window=c.window, has_r=c.parallax, has_seg=c.segments,
                      need_dscale=c.need_dscale, blocks=bs, interpret=True,
                      fp16_pv=c.parallax and jnp.dtype(c.dtype) == jnp.bfloat16 and bs.fp16_p2)
  pq = lambda a: common.pad(common.pad(a, 1, Tp), 3, Dp)
  pk = lambda a: common.pad(common.pad(a, 1, Sp), 3, Dp)
  scale = jnp.asarray(np.linspace(0.15, 0.35, c.Hq), jnp.float32)
  qseg = kseg = None
  if seg is not None:
    qseg, kseg = common.pad(seg[0], 1, Tp, -1), common.pad(seg[1], 1, Sp, -2)
  args = (pq(x["q"]), pk(x["k"]), pk(x["v"]), pq(x["r"]) if c.parallax else None, scale,
          qseg, kseg)
  return cfg, args, pq(x["do"]), vis, seg


def _launches(cfg, q, k, v, r, scale, qseg, kseg, do):
  """Every launch's result: the fast forward and the repaired one, then the fast dq/dr and
  dk/dv launches (with their flags) and the repaired ones, both on the repaired forward."""
  fwd_fast = tr.fwd_call(cfg, q, k, v, r, scale, qseg, kseg, fast=True)
  fwd = tr.fwd_call(cfg, q, k, v, r, scale, qseg, kseg)
  o, lse, tbar, vbar = fwd
  dq_fast = tr.dq_call(cfg, q, k, v, r, do, o, vbar, lse, tbar, scale, qseg, kseg, fast=True)
  dq = tr.dq_call(cfg, q, k, v, r, do, o, vbar, lse, tbar, scale, qseg, kseg)
  delta, gbar = dq[2], dq[3]
  dkv_fast = tr.dkv_call(cfg, q, k, v, r, do, lse, delta, tbar, gbar, scale, qseg, kseg,
                         fast=True)
  dkv = tr.dkv_call(cfg, q, k, v, r, do, lse, delta, tbar, gbar, scale, qseg, kseg)
  return fwd_fast, fwd, dq_fast, dq, dkv_fast, dkv


launches = jax.jit(_launches, static_argnums=0)


def f32(x):
  return np.asarray(x, np.float32)


def same(a, b):
  """Bit for bit (NaN equal to NaN)."""
  if a is None or b is None:
    return a is None and b is None
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
      a.view(np.uint8), b.view(np.uint8))


def tiles(x, axis, b):
  """x split along axis into tiles of b."""
  return np.split(np.asarray(x), np.asarray(x).shape[axis] // b, axis=axis)


# ----------------------------------------------------------------------------- clean inputs

CLEAN = {
    "f32_parallax_gqa2_odd": Case(T=45, S=45),
    "f32_softmax_mha_T<S_dscale": Case(T=29, S=61, Hq=2, Hkv=2, parallax=False,
                                       need_dscale=True),
    "f32_parallax_gqa8_d128_window": Case(T=40, S=40, Hq=8, Hkv=1, D=128, window=9,
                                          blocks=MIXED),
    "bf16_parallax_gqa2_d64_segments": Case(T=50, S=50, D=64, dtype=jnp.bfloat16,
                                            segments=True, need_dscale=True),
    "bf16_softmax_gqa1_noncausal": Case(T=33, S=33, Hq=2, Hkv=2, D=64, dtype=jnp.bfloat16,
                                        parallax=False, causal=False),
}


@pytest.mark.parametrize("name", ci_subset(list(CLEAN), ["bf16_parallax_gqa2_d64_segments"]))
def test_clean_inputs_fixups_leave_the_fast_results(name):
  """No mark on clean inputs, and every fixup launch leaves its outputs bit for bit as the
  fast launch wrote them (forward, dq/dr/delta/gbar/qdq, dk/dv)."""
  cfg, args, do, _, _ = setup(CLEAN[name])
  fwd_fast, fwd, dq_fast, dq, dkv_fast, dkv = launches(cfg, *args, do)
  assert not np.isnan(f32(fwd_fast[1])).any(), "a clean forward marked a row"
  assert not f32(dq_fast[-1]).any() and not f32(dkv_fast[-1]).any(), "a clean program marked"
  assert dq_fast[-1].shape == (1, cfg.Hq, cfg.Tp // cfg.blocks.block_q_dq)
  assert dkv_fast[-1].shape == (1, cfg.Hkv, cfg.Sp // cfg.blocks.block_k_dkv)
  for label, a, b in [("fwd", fwd_fast, fwd), ("dq", dq_fast[:-1], dq),
                      ("dkv", dkv_fast[:-1], dkv)]:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
      assert same(x, y), f"{name}: {label} output {i} changed by its fixup launch"
  for x in tuple(fwd[:1]) + tuple(dq[:2]) + tuple(dkv):
    if x is not None:
      assert np.isfinite(f32(x)).all()


# ----------------------------------------------------------------------------- marks, repairs

# Poison at positions some rows cannot see (or in dead rows), with the launches it must mark.
POISON = {
    # key 20's value: causal rows 0-19 cannot see it, rows 16-19 share its diagonal tile
    "masked_nan_v": (Case(poison=(("v", 20, None, np.nan),)), ("fwd", "dq", "dkv")),
    "masked_inf_k_one_kv_head_window": (
        Case(window=7, poison=(("k", 25, 1, np.inf),)), ("fwd", "dq", "dkv")),
    "masked_nan_k_T<S": (Case(T=23, S=41, poison=(("k", 30, None, np.nan),)),
                         ("fwd", "dq", "dkv")),
    # a dead row (NaN q): every kernel marks it (dq: its NaN o makes delta = do.o NaN; the
    # fast launch has no select on live rows) and the fixups zero what it sends back
    "dead_row_nan_q": (Case(poison=(("q", 30, None, np.nan),)), ("fwd", "dq", "dkv")),
    "dead_row_nan_r": (Case(poison=(("r", 30, 2, np.nan),)), ("fwd", "dq", "dkv")),
    # a dead row's cotangent is NaN as well (a loss that does not mask it out)
    "dead_row_nan_q_and_do": (Case(poison=(("q", 30, None, np.nan), ("do", 30, None, np.nan))),
                              ("fwd", "dq", "dkv")),
    "segments_nan_v_softmax": (
        Case(T=48, S=48, segments=True, parallax=False, need_dscale=True,
             poison=(("v", 12, None, np.nan),)), ("fwd", "dq", "dkv")),
    "gqa8_d128_bf16_nan_v": (
        Case(T=37, S=37, Hq=8, Hkv=1, D=128, dtype=jnp.bfloat16, blocks=MIXED,
             poison=(("v", 20, None, np.nan),)), ("fwd", "dq", "dkv")),
    "gqa1_d64_bf16_segments_nan_q": (
        Case(T=50, S=50, Hq=2, Hkv=2, D=64, dtype=jnp.bfloat16, segments=True,
             need_dscale=True, poison=(("q", 10, 1, np.nan), ("v", 30, None, np.inf))),
        ("fwd", "dq", "dkv")),
    "noncausal_window_ninf_v_odd": (
        Case(T=39, S=39, causal=False, window=5, poison=(("v", 21, 0, -np.inf),)),
        ("fwd", "dq", "dkv")),
}


def test_compact_fixup_chunks_match_one_point_per_program(monkeypatch):
  """The fixup launches' compact grid: programs that cover several grid points (a chunk of
  marks, one set) give, bit for bit, the results of one point per program."""
  c = Case(T=64, S=64, poison=(("v", 20, None, np.nan), ("q", 50, 1, np.nan)))
  cfg, args, do, _, _ = setup(c)
  one = jax.jit(_launches, static_argnums=0)(cfg, *args, do)
  monkeypatch.setattr(common, "NUM_SMS", 1)
  assert common.fixup_chunk(4, 16) == 4    # 4 tiles x 1 x 4 heads: chunks of 4 tiles
  chunked = jax.jit(_launches, static_argnums=0)(cfg, *args, do)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(chunked)):
    assert same(a, b)
  assert np.isnan(f32(one[0][1])).any()    # the forward marked rows: the fixups ran


@pytest.mark.slow
def test_compact_fixup_chunks_under_vmap(monkeypatch):
  """vmap (as the MAD benchmark trains its runs) adds a grid axis to every launch: the
  compact fixup programs, each covering several tiles, still find their marks; each run's
  value and gradients equal its own unbatched call's."""
  monkeypatch.setattr(common, "NUM_SMS", 1)
  rng = np.random.default_rng(0)
  n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  T, Hq, Hkv, D = 64, 4, 2, 16
  q, k, v, r = n(2, 1, T, Hq, D), n(2, 1, T, Hkv, D), n(2, 1, T, Hkv, D), n(2, 1, T, Hq, D)
  v = v.at[0, :, 20].set(jnp.nan)          # run 0: a masked NaN value
  q = q.at[1, :, 50, 1].set(jnp.nan)       # run 1: a dead row
  w = jnp.cos(jnp.arange(T * Hq * D, dtype=jnp.float32)).reshape(1, T, Hq, D)
  loss = lambda *a: jnp.nansum(parallax_flash_attention(
      *a, scale=0.25, block_sizes=B16, interpret=True) * w)
  vg = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
  batched = jax.jit(jax.vmap(vg))(q, k, v, r)
  one = jax.jit(vg)
  for i in range(2):
    for a, b in zip(jax.tree.leaves(one(q[i], k[i], v[i], r[i])),
                    jax.tree.leaves(jax.tree.map(lambda x: x[i], batched))):
      np.testing.assert_allclose(f32(a), f32(b), rtol=1e-5, atol=1e-5)
      assert np.isfinite(f32(a)).all()


def nan_rows_of(c: Case, vis):
  """[1, T, Hq]: the rows that see a poisoned q, r, k or v entry."""
  G = c.Hq // c.Hkv
  rows = np.zeros((1, c.T, c.Hq), bool)
  for name, pos, h, _ in c.poison:
    if name in ("q", "r"):
      rows[:, pos, slice(None) if h is None else slice(h, h + 1)] = True
    elif name in ("k", "v"):
      heads = slice(None) if h is None else slice(h * G, (h + 1) * G)
      rows[:, :, heads] |= vis[:, :, pos][:, :, None]
  return rows


@pytest.mark.parametrize("name", ci_subset(list(POISON), [
    "masked_nan_v", "dead_row_nan_q_and_do", "gqa1_d64_bf16_segments_nan_q"]))
def test_marked_programs_are_repaired_the_others_untouched(name):
  """The fast launches mark exactly the programs whose result is not finite; the fixup
  launches rewrite those (rows that see the poison dead: o NaN, lse +inf; gradients finite)
  and leave every unmarked program as the fast launch wrote it, bit for bit."""
  c, marked_kernels = POISON[name]
  cfg, args, do, vis, _ = setup(c)
  fwd_fast, fwd, dq_fast, dq, dkv_fast, dkv = launches(cfg, *args, do)
  bs = cfg.blocks
  dead = nan_rows_of(c, vis)                                 # [1, T, Hq]

  # forward: lse = NaN exactly on the rows whose fast output is not finite
  o_fast, lse_fast = f32(fwd_fast[0]), f32(fwd_fast[1])
  np.testing.assert_array_equal(np.isnan(lse_fast),
                                ~np.isfinite(o_fast).all(-1).transpose(0, 2, 1))
  tile_marked = np.isnan(lse_fast).reshape(1, cfg.Hq, -1, bs.block_q).any(-1)
  assert tile_marked.any() == ("fwd" in marked_kernels), tile_marked.any()
  for i, (a, b) in enumerate(zip(fwd_fast, fwd)):
    if a is None:
      continue
    row_axis = 1 if a.ndim == 4 else 2
    for t, (ta, tb) in enumerate(zip(tiles(a, row_axis, bs.block_q),
                                     tiles(b, row_axis, bs.block_q))):
      m = tile_marked[:, :, t]                                 # [1, Hq]
      for h in range(cfg.Hq):
        xa, xb = (ta[:, :, h] if a.ndim == 4 else ta[:, h]), (
            tb[:, :, h] if a.ndim == 4 else tb[:, h])
        if not m[0, h]:
          assert same(xa, xb), f"unmarked forward tile {t} head {h} rewritten (output {i})"
  o, lse = f32(fwd[0])[:, :c.T, :, :c.D], f32(fwd[1])[:, :, :c.T]
  assert not np.isnan(lse).any()
  np.testing.assert_array_equal(np.isnan(o).all(-1), dead)
  np.testing.assert_array_equal(np.isfinite(o).all(-1), ~dead)
  np.testing.assert_array_equal(np.isinf(lse).transpose(0, 2, 1) & (lse > 0).transpose(0, 2, 1),
                                dead)

  # dq/dr: flags exactly where a fast program's result is not finite, and only there rewritten
  flags = f32(dq_fast[-1])                                   # [1, Hq, q tiles]
  assert flags.any() == ("dq" in marked_kernels), flags
  finite_fast = np.ones_like(flags, bool)     # every fast output (dq, dr, delta, gbar, qdq)
  for a, b in zip(dq_fast[:-1], dq):
    if a is None:
      continue
    a4, b4 = (a, b) if a.ndim == 4 else (np.asarray(a)[..., None].transpose(0, 2, 1, 3),
                                         np.asarray(b)[..., None].transpose(0, 2, 1, 3))
    for t, (ta, tb) in enumerate(zip(tiles(a4, 1, bs.block_q_dq), tiles(b4, 1, bs.block_q_dq))):
      for h in range(cfg.Hq):
        finite_fast[0, h, t] &= np.isfinite(f32(ta[:, :, h])).all()
        if flags[0, h, t] == 0:
          assert same(ta[:, :, h], tb[:, :, h]), f"unmarked dq tile {t} head {h} rewritten"
  np.testing.assert_array_equal(flags > 0, ~finite_fast)
  for x in dq:
    if x is not None:
      assert np.isfinite(f32(x)).all()

  # dk/dv: the same per key tile and kv head
  flags = f32(dkv_fast[-1])                                  # [1, Hkv, key tiles]
  assert flags.any() == ("dkv" in marked_kernels), flags
  for a, b in zip(dkv_fast[:-1], dkv):
    for t, (ta, tb) in enumerate(zip(tiles(a, 1, bs.block_k_dkv), tiles(b, 1, bs.block_k_dkv))):
      for h in range(cfg.Hkv):
        if flags[0, h, t] == 0:
          assert same(ta[:, :, h], tb[:, :, h]), f"unmarked dk/dv tile {t} head {h} rewritten"
  for x in dkv:
    assert np.isfinite(f32(x)).all()


GRAD_CASES = ["masked_nan_v", "masked_nan_k_T<S", "dead_row_nan_q", "dead_row_nan_r",
              "dead_row_nan_q_and_do", "segments_nan_v_softmax", "gqa8_d128_bf16_nan_v",
              "gqa1_d64_bf16_segments_nan_q"]


@pytest.mark.parametrize("name", ci_subset(GRAD_CASES, ["masked_nan_k_T<S", "dead_row_nan_r"]))
def test_repaired_results_follow_the_rule(name):
  """End to end (`parallax_flash_attention`, its custom_vjp): rows that see the poison are
  NaN, the others equal the result with the poison replaced by finite values, and so do the
  gradients (dq, dk, dv, dr, dscale) for a cotangent that is NaN (or anything) on dead rows."""
  c, _ = POISON[name]
  clean = dataclasses.replace(c, poison=())
  _, _, _, vis, seg = setup(c)
  dead = nan_rows_of(c, vis)
  kw = dict(causal=c.causal, window=c.window, block_sizes=c.blocks, interpret=True)
  if seg is not None:
    kw.update(q_segment_ids=seg[0], kv_segment_ids=seg[1])

  def inputs(case):
    rs = np.random.default_rng(0)
    m = lambda *s: jnp.asarray(rs.standard_normal(s), jnp.float32).astype(case.dtype)
    x = {"q": m(1, c.T, c.Hq, c.D), "k": m(1, c.S, c.Hkv, c.D), "v": m(1, c.S, c.Hkv, c.D),
         "r": (m(1, c.T, c.Hq, c.D) * 0.5).astype(c.dtype), "do": m(1, c.T, c.Hq, c.D)}
    for nm, pos, h, val in case.poison:
      x[nm] = x[nm].at[:, pos, slice(None) if h is None else slice(h, h + 1)].set(val)
    return (x["q"], x["k"], x["v"], x["r"] if c.parallax else None), x["do"]

  def f(q, k, v, r, sc):
    return parallax_flash_attention(q, k, v, r, scale=sc, **kw)

  scale = jnp.asarray(np.linspace(0.15, 0.35, c.Hq), jnp.float32)
  keep = jnp.asarray(~dead)[..., None]
  g = jax.jit(lambda x, d: (lambda o, vjp: (o, vjp(d)))(*jax.vjp(f, *x, scale)))
  args, do = inputs(c)
  o, grads = g(args, jnp.where(keep, do, jnp.nan).astype(c.dtype))  # NaN on dead rows
  args, do = inputs(clean)
  o_ref, grads_ref = g(args, jnp.where(keep, do, 0).astype(c.dtype))
  o, o_ref = f32(o), f32(o_ref)
  assert np.isnan(o[dead]).all() and np.isfinite(o[~dead]).all()
  np.testing.assert_array_equal(o[~dead], o_ref[~dead])
  assert not f32(grads[0])[dead].any(), "a dead row's dq is not zero"
  tol = 1e-6 if c.dtype == jnp.float32 else 2e-2
  for x, y, arg in zip(grads, grads_ref, ["dq", "dk", "dv", "dr", "dscale"]):
    if x is None:
      continue
    x, y = f32(x), f32(y)
    assert np.isfinite(x).all(), f"{name}: {arg} not finite"
    np.testing.assert_allclose(x, y, atol=tol, rtol=tol, err_msg=f"{name}: {arg}")


# ----------------------------------------------------------------------------- structure


def _subjaxprs(params):
  for v in params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
        yield x if hasattr(x, "eqns") else x.jaxpr


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for sub in _subjaxprs(e.params):
      yield from _eqns(sub)


def pallas_kernels_of(fn, *args):
  """{launch name: kernel jaxpr} of every pallas_call fn traces."""
  out = {}
  for e in _eqns(jax.make_jaxpr(fn)(*args).jaxpr):
    if e.primitive.name == "pallas_call":
      out[str(e.params["name"])] = e.params["jaxpr"]
  return out


def control_flow(jaxpr):
  """(loops, branches) anywhere in a kernel jaxpr."""
  names = [e.primitive.name for e in _eqns(jaxpr)]
  return sum(n in ("while", "scan") for n in names), sum(n == "cond" for n in names)


def _fwd_bwd(case: Case):
  cfg, (q, k, v, r, scale, qseg, kseg), do, _, _ = setup(case)

  def fn(q, k, v, r, do):
    o, vjp = jax.vjp(lambda *a: attention._flash(cfg, *a, scale, qseg, kseg), q, k, v, r)
    return vjp(do)
  return fn, (q, k, v, r, do)


# the hot loops of each kernel: forward and dq: three K/V loops (masked, interior, masked);
# dk/dv: the GQA heads loop around three query loops
LOOPS = {"fwd": 3, "bwd_dq": 3, "bwd_dkv": 4}


@pytest.mark.parametrize("case", [
    Case(), Case(parallax=False, Hq=8, Hkv=1, segments=True, need_dscale=True),
    Case(Hq=2, Hkv=2, window=5, causal=False)], ids=["parallax", "softmax_seg", "window"])
def test_fast_kernels_have_no_branch_and_no_second_loop(case):
  """Jaxpr level: each fast kernel holds its hot loops only (no cond: no careful pass
  compiled into it); each fixup kernel (compact grid) a cond on its chunk of marks around
  the loop over the chunk's grid points, each with a cond on its own mark around the same
  hot loops."""
  fn, args = _fwd_bwd(case)
  kernels = pallas_kernels_of(fn, *args)
  kind = "parallax" if case.parallax else "softmax"
  assert sorted(kernels) == sorted(f"{kind}_{k}{s}" for k in LOOPS for s in ("", "_fixup"))
  for k, n_loops in LOOPS.items():
    assert control_flow(kernels[f"{kind}_{k}"]) == (n_loops, 0), k
    assert control_flow(kernels[f"{kind}_{k}_fixup"]) == (n_loops + 1, 2), k
    # the fixup's gate is the kernel's first operation on data: its top level is the load
    # of the chunk of marks, its test and the cond (program ids aside)
    top = [e.primitive.name for e in kernels[f"{kind}_{k}_fixup"].eqns]
    assert top[-1] == "cond" and "dot_general" not in top, (k, top)
    assert sum(n in ("get", "load") for n in top) == 1, (k, top)


def _ttir_ops(raw):
  """{op name: count} of a Triton module."""
  from jax._src.interpreters import mlir
  from jax._src.lib import triton as tlib
  from jax._src.lib.mlir import ir
  counts = {}

  def walk(op):
    counts[op.name] = counts.get(op.name, 0) + 1
    for region in op.regions:
      for block in region.blocks:
        for o in block.operations:
          walk(o.operation)

  ctx = mlir.make_ir_context()
  tlib.dialect.register_dialect(ctx)
  with ctx:
    walk(ir.Module.parse(raw).operation)
  return counts


LOWER = [
    dict(T=4096, S=4096, Hq=16, Hkv=8, D=128, dtype=jnp.bfloat16, parallax=True,
         kw=dict(causal=True)),
    dict(T=1000, S=1500, Hq=8, Hkv=1, D=64, dtype=jnp.float16, parallax=True,
         kw=dict(causal=True, window=100), seg=True),
    dict(T=512, S=512, Hq=4, Hkv=4, D=128, dtype=jnp.float32, parallax=False,
         kw=dict(causal=False)),
    dict(T=300, S=300, Hq=6, Hkv=2, D=96, dtype=jnp.bfloat16, parallax=False,
         kw=dict(causal=True, window=64), seg=True),
]


@pytest.mark.parametrize("lc", LOWER[:2] + [pytest.param(lc, marks=pytest.mark.slow)
                                          for lc in LOWER[2:]],
                         ids=lambda lc: f"{lc['D']}_{lc['parallax']}")
def test_cuda_lowering_abstract_h100_fast_and_fixup(lc):
  """Forward + backward lowered for CUDA on an abstract H100: six Triton kernels (three
  fast, three fixup) whose TTIR verifies. In the TTIR the fast kernels hold no scf.if and
  only their hot loops; each fixup kernel branches on its chunk of marks and on each mark,
  around a loop over the chunk's grid points and the same hot loops."""
  sd = lambda *s, dt=lc["dtype"]: jax.ShapeDtypeStruct(s, dt)
  q = sd(2, lc["T"], lc["Hq"], lc["D"])
  kv = sd(2, lc["S"], lc["Hkv"], lc["D"])
  args = [q, kv, kv, q if lc["parallax"] else None, sd(lc["Hq"], dt=jnp.float32)]
  ids = [sd(2, lc["T"], dt=jnp.int32), sd(2, lc["S"], dt=jnp.int32)] if lc.get("seg") else [
      None, None]

  def f(q, k, v, r, sc, qs, ks):
    fn = lambda q, k, v, r, sc: parallax_flash_attention(
        q, k, v, r, scale=sc, q_segment_ids=qs, kv_segment_ids=ks, **lc["kw"])
    o, vjp = jax.vjp(fn, q, k, v, r, sc)
    return o, vjp(o)

  mods = dict(triton_modules(lower_h100(f, *args, *ids)))
  kind = "parallax" if lc["parallax"] else "softmax"
  assert sorted(mods) == sorted(f"{kind}_{k}{s}" for k in LOOPS for s in ("", "_fixup"))
  verify_triton_modules(list(mods.items()))
  for k, n_loops in LOOPS.items():
    fast, fix = _ttir_ops(mods[f"{kind}_{k}"]), _ttir_ops(mods[f"{kind}_{k}_fixup"])
    loops = lambda ops: ops.get("scf.for", 0) + ops.get("scf.while", 0)
    assert fast.get("scf.if", 0) == 0 and loops(fast) == n_loops, (k, fast)
    assert fix.get("scf.if", 0) >= 2 and loops(fix) == n_loops + 1, (k, fix)
    # the fast kernel: a mark (forward: lse) and no more matrix products than the fixup's
    assert fast.get("tt.dot", 0) == fix.get("tt.dot", 0), k


# ----------------------------------------------------------------------------- the gate


@functools.partial(jax.jit, static_argnums=0)
def gated(cfg, q, k, v, r, scale, qseg, kseg, do, row_mark, dq_flags, dkv_flags):
  """The fast results, and each fixup launch run alone on sentinel outputs with the given
  marks: forward rows where row_mark [B, Hq, Tp] is set get lse = NaN, the others lse = 5;
  dq and dk/dv programs get the given flags."""
  fast = tr.fwd_call(cfg, q, k, v, r, scale, qseg, kseg, fast=True)
  o, lse, tbar, vbar = fast
  sent = lambda x, val: None if x is None else jnp.full(x.shape, val, x.dtype)
  fwd = tr.fwd_call(cfg, q, k, v, r, scale, qseg, kseg, fixup=(
      sent(o, 7.0), jnp.where(row_mark, jnp.nan, 5.0), sent(tbar, 3.0), sent(vbar, 7.0)))
  dq_fast = tr.dq_call(cfg, q, k, v, r, do, o, vbar, lse, tbar, scale, qseg, kseg,
                       fast=True)
  _, _, delta, gbar, _, _ = dq_fast
  dq = tr.dq_call(cfg, q, k, v, r, do, o, vbar, lse, tbar, scale, qseg, kseg, fixup=(
      *(sent(x, 7.0) for x in dq_fast[:5]), dq_flags))
  dkv_fast = tr.dkv_call(cfg, q, k, v, r, do, lse, delta, tbar, gbar, scale, qseg, kseg,
                         fast=True)
  dkv = tr.dkv_call(cfg, q, k, v, r, do, lse, delta, tbar, gbar, scale, qseg, kseg,
                    fixup=(sent(dkv_fast[0], 7.0), sent(dkv_fast[1], 7.0), dkv_flags))
  return fast, fwd, dq_fast[:5], dq, dkv_fast[:2], dkv


@pytest.mark.parametrize("case", [
    Case(T=45, S=45, need_dscale=True),
    Case(T=40, S=56, Hq=8, Hkv=1, parallax=False, segments=True, blocks=MIXED)],
    ids=["parallax_dscale", "softmax_gqa8_segments"])
def test_fixup_launches_rewrite_exactly_the_marked_programs(case):
  """Each fixup launch alone, on sentinel outputs and a chosen pattern of marks: every
  unmarked program's outputs keep the sentinel bit for bit (not read, not rewritten); every
  marked program's are the careful pass's, which on clean inputs are the fast pass's."""
  cfg, args, do, _, _ = setup(case)
  bs = cfg.blocks
  nq, nq_dq, nk = cfg.Tp // bs.block_q, cfg.Tp // bs.block_q_dq, cfg.Sp // bs.block_k_dkv
  pattern = lambda *s: (np.arange(np.prod(s)).reshape(s) % 3 == 1)
  tile_mark = pattern(1, cfg.Hq, nq)
  row_mark = np.zeros((1, cfg.Hq, nq, bs.block_q), bool)
  row_mark[..., 5] = tile_mark                              # one marked row per marked tile
  dq_flags, dkv_flags = pattern(1, cfg.Hq, nq_dq), pattern(1, cfg.Hkv, nk)
  fast, fwd, dq_fast, dq, dkv_fast, dkv = gated(
      cfg, *args, do, jnp.asarray(row_mark.reshape(1, cfg.Hq, -1)),
      jnp.asarray(dq_flags, jnp.float32), jnp.asarray(dkv_flags, jnp.float32))
  tol = dict(rtol=1e-6, atol=1e-6)

  def check(got, want, sentinel, marked, b, head_axis, tile_axis):
    """got/want [1, ..] arrays; marked [1, heads, tiles]."""
    got, want = np.moveaxis(f32(got), (head_axis, tile_axis), (1, 2)), np.moveaxis(
        f32(want), (head_axis, tile_axis), (1, 2))
    n = got.shape[2] // b
    for h in range(marked.shape[1]):
      for t in range(n):
        g, w = got[:, h, t * b:(t + 1) * b], want[:, h, t * b:(t + 1) * b]
        if marked[0, h, t]:
          np.testing.assert_allclose(g, w, **tol, err_msg=f"marked head {h} tile {t}")
        else:
          assert (g == sentinel).all(), f"unmarked head {h} tile {t} rewritten"

  o, lse, tbar, vbar = fwd
  check(o, fast[0], 7.0, tile_mark, bs.block_q, 2, 1)
  check(lse, fast[1], 5.0, tile_mark, bs.block_q, 1, 2)
  if case.parallax:
    check(tbar, fast[2], 3.0, tile_mark, bs.block_q, 1, 2)
    check(vbar, fast[3], 7.0, tile_mark, bs.block_q, 2, 1)
  # dq: dq, dr, delta, gbar, qdq
  for i, axes in enumerate([(2, 1), (2, 1), (1, 2), (1, 2), (1, 2)]):
    if dq_fast[i] is not None:
      check(dq[i], dq_fast[i], 7.0, dq_flags, bs.block_q_dq, *axes)
  for got, want in zip(dkv, dkv_fast):
    check(got, want, 7.0, dkv_flags, bs.block_k_dkv, 2, 1)
