"""Fused Parallax / softmax attention for training (`pallas_kernels.attention`, the front over
the Triton kernels of `attention_triton` and the Mosaic GPU forward): forward and backward.

CPU: the kernels run with interpret=True against a dense float32 reference (output and the
gradients dq, dk, dv, dr, dscale), and every kernel is lowered for CUDA with an abstract H100
(TTIR generated and verified; see `test_cuda_lowering_abstract_h100`). GPU tests (`-m gpu`) run
the compiled kernels at larger shapes: `TestFlashAttention` compiled, its subclass
`TestFlashAttentionInterpret` the same test in interpret mode on the CPU cases.
"""
from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import BlockSizes, attention, attention_triton, common, parallax_flash_attention
from parallax_jax import masks
from tests import test_masking as masking
from tests.kernels import ci_subset, has_gpu

warnings.filterwarnings("ignore", category=DeprecationWarning)

HIGHEST = jax.lax.Precision.HIGHEST
B32 = BlockSizes(32, 32, 4, 2, 32, 32, 4, 2, 32, 32, 4, 2)
B64 = BlockSizes(64, 64, 4, 2, 64, 64, 4, 2, 64, 64, 4, 2)
MIXED = BlockSizes(64, 32, 4, 2, 32, 64, 4, 2, 16, 32, 4, 2)
# max |x - ref| / max |ref| allowed, by dtype: (output, gradients)
TOL = {jnp.float32: (2e-5, 5e-5), jnp.bfloat16: (1e-2, 2e-2), jnp.float16: (4e-3, 1e-2)}


# ----------------------------------------------------------------------------- reference


def ref_mask(T, S, causal, window, qseg=None, kseg=None):
  """[1|B, 1, T, S] visibility, from the library's one mask definition."""
  m = masks.full_mask(T, S, causal=causal, window=window, q_seg=qseg, kv_seg=kseg)
  return m[:, None] if m.ndim == 3 else m[None, None]


def reference(q, k, v, r, scale, *, causal=True, window=None, q_segment_ids=None,
              kv_segment_ids=None):
  """Dense float32 Parallax (softmax if r is None): o = vbar - (sum_j a_j t_j v_j - tbar vbar)."""
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  q, k, v, r = f32(q), f32(k), f32(v), f32(r)
  B, T, H, D = q.shape
  S, G = k.shape[1], H // k.shape[2]
  k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (H,))
  s = jnp.einsum("bthd,bshd->bhts", q, k, precision=HIGHEST) * scale[None, :, None, None]
  mask = ref_mask(T, S, causal, window, q_segment_ids, kv_segment_ids)
  s = jnp.where(mask, s, -jnp.inf)
  mx = jnp.max(s, -1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0))
  d = jnp.sum(p, -1, keepdims=True)
  a = p / jnp.where(d > 0, d, 1.0)
  vbar = jnp.einsum("bhts,bshd->bthd", a, v, precision=HIGHEST)
  if r is None:
    return vbar
  t = jnp.einsum("bthd,bshd->bhts", r, k, precision=HIGHEST)
  tbar = jnp.sum(a * t, -1).transpose(0, 2, 1)[..., None]
  u = jnp.einsum("bhts,bshd->bthd", a * t, v, precision=HIGHEST)
  return (1.0 + tbar) * vbar - u


# ----------------------------------------------------------------------------- helpers


@dataclasses.dataclass(frozen=True)
class Case:
  T: int = 97
  S: int = 97
  Hq: int = 4
  Hkv: int = 2
  D: int = 64
  dtype: object = jnp.float32
  causal: bool = True
  window: int | None = None
  parallax: bool = True
  segments: bool | str = False  # True: sorted random ids; "docs": long documents
  array_scale: bool = False
  blocks: BlockSizes = B32
  B: int = 2
  r_scale: float = 0.5
  Dv: int | None = None  # v's head dim, when not D


def o_shape(c: Case):
  return (c.B, c.T, c.Hq, c.Dv or c.D)


def make_inputs(c: Case, rng):
  n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q = n(c.B, c.T, c.Hq, c.D).astype(c.dtype)
  k = n(c.B, c.S, c.Hkv, c.D).astype(c.dtype)
  v = n(c.B, c.S, c.Hkv, c.Dv or c.D).astype(c.dtype)
  r = (c.r_scale * n(c.B, c.T, c.Hq, c.D)).astype(c.dtype) if c.parallax else None
  if c.array_scale:
    scale = jnp.asarray(rng.uniform(0.02, 0.3, c.Hq), jnp.float32).at[0].set(0.0)
  else:
    scale = float(1.0 / np.sqrt(c.D))
  kw = dict(causal=c.causal, window=c.window)
  if c.segments in ("docs", "docs_unsorted"):
    # documents long next to a tile: in packed (sorted) rows, interior tiles of one id take
    # the unmasked path and tiles of two different documents are skipped; unsorted ids (an
    # id that comes back later) fall back to masking every tile
    ids = [5, 1, 5, 2, 0] if c.segments == "docs_unsorted" else [1, 2, 3, 4, 5]

    def docs(n):
      return np.broadcast_to(np.repeat(ids, [70, 3, 50, 40, max(n - 163, 0)])[:n], (c.B, n))
    kw.update(q_segment_ids=jnp.asarray(docs(c.T), jnp.int32),
              kv_segment_ids=jnp.asarray(docs(c.S), jnp.int32))
  elif c.segments:
    # packed sequences: sorted random segment ids, the same split for q and k where T == S
    qseg = np.sort(rng.integers(0, 3, (c.B, c.T)), axis=1)
    kseg = np.sort(rng.integers(0, 3, (c.B, c.S)), axis=1)
    kw.update(q_segment_ids=jnp.asarray(qseg, jnp.int32),
              kv_segment_ids=jnp.asarray(kseg, jnp.int32))
  return q, k, v, r, scale, kw


def rel_err(x, ref):
  x = np.asarray(x, np.float32)
  ref = np.asarray(ref, np.float32)
  assert x.shape == ref.shape, (x.shape, ref.shape)
  assert np.all(np.isfinite(x)), "non-finite values"
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def value_and_vjp(f, primals, do):
  """(f(*primals), vjp(do)) in one jitted call (one XLA compile per case)."""
  def g(primals, do):
    o, vjp = jax.vjp(f, *primals)
    return o, vjp(do)
  return jax.jit(g)(primals, do)


def check_case(c: Case, rng, *, interpret=True):
  q, k, v, r, scale, kw = make_inputs(c, rng)
  args = (q, k, v) + ((r,) if c.parallax else ())
  diff_scale = c.array_scale

  def kern(*xs):
    *xs, sc = xs if diff_scale else (*xs, scale)
    return parallax_flash_attention(*xs, scale=sc, block_sizes=c.blocks, interpret=interpret,
                                    **kw)

  def refn(*xs):
    *xs, sc = xs if diff_scale else (*xs, scale)
    xs = [x.astype(jnp.float32) for x in xs] + ([] if c.parallax else [None])
    return reference(*xs, sc, **kw)

  primals = args + ((scale,) if diff_scale else ())
  do = jnp.asarray(rng.standard_normal(o_shape(c)), jnp.float32).astype(c.dtype)
  o, grads = value_and_vjp(kern, primals, do)
  assert o.dtype == q.dtype and o.shape == o_shape(c)
  o_ref, grads_ref = value_and_vjp(refn, primals, do.astype(jnp.float32))
  tol_o, tol_g = TOL[c.dtype]
  errs = {"o": rel_err(o, o_ref)}
  names = ["dq", "dk", "dv"] + (["dr"] if c.parallax else []) + (["dscale"] if diff_scale else [])
  for name, g, gr in zip(names, grads, grads_ref):
    assert g.shape == gr.shape and g.dtype == (jnp.float32 if name == "dscale" else c.dtype)
    errs[name] = rel_err(g, gr)
  bad = {n: e for n, e in errs.items() if e > (tol_o if n == "o" else tol_g)}
  assert not bad, f"{c}: errors {errs}"
  return errs


# ----------------------------------------------------------------------------- CPU cases

CASES = {
    # masks
    "causal_odd_large_probe": Case(T=97, S=97, r_scale=1.0),
    "noncausal_T<S": Case(T=45, S=130, causal=False, Hkv=4),
    "causal_end_aligned_T<S_mqa": Case(T=45, S=130, Hkv=1),
    "window100_tiles64": Case(T=230, S=230, window=100, blocks=B64, Hq=2, Hkv=1, B=1),
    "window37_mixed_tiles": Case(T=130, S=130, window=37, blocks=MIXED),
    "window_T<S": Case(T=70, S=150, window=33),
    "window_noncausal": Case(T=100, S=100, window=20, causal=False),
    "segments_causal": Case(T=97, S=97, segments=True),
    "segments_window_noncausal": Case(T=64, S=96, segments=True, causal=False, window=40),
    "segments_docs_causal": Case(T=200, S=200, segments="docs", B=1),
    "segments_docs_noncausal_T<S": Case(T=96, S=200, segments="docs", causal=False, B=1,
                                        blocks=MIXED),
    "segments_docs_unsorted": Case(T=200, S=200, segments="docs_unsorted", B=1),
    # heads / dims / probe / scale
    "gqa4_d128": Case(T=64, S=80, Hq=4, Hkv=1, D=128, B=1),
    "gqa2_d128_mixed": Case(T=100, S=100, Hq=4, Hkv=2, D=128, blocks=MIXED, B=1),
    "softmax_array_scale_noncausal": Case(T=70, S=70, array_scale=True, parallax=False,
                                          causal=False),
    "softmax_window_segments": Case(parallax=False, window=30, segments=True),
    "head_dim_48_padded": Case(T=40, S=40, D=48),
    "array_scale_with_zero": Case(T=70, S=70, array_scale=True),
    # low precision
    "bf16_causal_d128": Case(T=130, S=130, D=128, dtype=jnp.bfloat16, Hq=2, Hkv=1, B=1),
    "bf16_window_segments": Case(T=100, S=100, dtype=jnp.bfloat16, window=100 - 41,
                                 segments=True, blocks=B64),
    "fp16_causal": Case(T=80, S=80, dtype=jnp.float16),
    "bf16_softmax_gqa": Case(T=64, S=64, dtype=jnp.bfloat16, parallax=False, Hq=4, Hkv=1),
    # a value head dim other than q's (the moment form's features; MLA-style heads)
    "softmax_dv_wider_gqa": Case(T=45, S=70, D=16, Dv=116, parallax=False, Hq=4, Hkv=2),
    "parallax_dv_narrower_window": Case(T=70, S=70, D=64, Dv=24, window=30, segments=True),
}


GPU_CASES = {
    "bf16_parallax_causal_gqa": Case(B=2, T=1024, S=1024, Hq=8, Hkv=4, D=128,
                                     dtype=jnp.bfloat16, blocks=None),
    # aligned T == S with packed segments: the Mosaic GPU forward (segment-id masks) + Triton bwd
    "bf16_parallax_causal_gqa_segments": Case(B=2, T=1024, S=1024, Hq=8, Hkv=4, D=128,
                                              dtype=jnp.bfloat16, segments=True, blocks=None),
    "bf16_parallax_d64_window_odd": Case(B=2, T=1000, S=1000, Hq=4, Hkv=1, D=64,
                                         dtype=jnp.bfloat16, window=100, blocks=None),
    "fp16_parallax_segments_T<S": Case(B=2, T=500, S=777, Hq=4, Hkv=2, D=128,
                                       dtype=jnp.float16, segments=True, blocks=None),
    # long documents: skipped, single-id (unmasked) and mixed tiles in the Triton backward
    "bf16_parallax_causal_docs": Case(B=2, T=2048, S=2048, Hq=8, Hkv=4, D=128,
                                      dtype=jnp.bfloat16, segments="docs", blocks=None),
    "bf16_softmax_noncausal": Case(B=2, T=1024, S=1024, Hq=8, Hkv=8, D=128,
                                   dtype=jnp.bfloat16, parallax=False, causal=False,
                                   blocks=None),
    "f32_parallax_array_scale": Case(B=1, T=300, S=300, Hq=4, Hkv=2, D=64,
                                     array_scale=True, blocks=None),
    "bf16_softmax_d16_dv128": Case(B=2, T=1000, S=1000, Hq=8, Hkv=4, D=16, Dv=128,
                                   dtype=jnp.bfloat16, parallax=False, blocks=None),
    "f32_softmax_d8_dv116_gqa": Case(B=2, T=128, S=128, Hq=16, Hkv=16, D=8, Dv=116,
                                     parallax=False, blocks=None),
}


class TestFlashAttention:
  """Output and gradients against the reference, compiled on a GPU (default tiles: on Hopper
  the Mosaic GPU forward where it applies)."""
  INTERPRET = False
  NEEDS = "gpu"
  CASES = GPU_CASES

  def test_matches_reference(self, name, rng):
    errs = check_case(self.CASES[name], rng, interpret=self.INTERPRET)
    print(name, errs)


class TestFlashAttentionInterpret(TestFlashAttention):
  """The same in interpret mode (the Triton kernels), on the CPU cases; CI runs a subset
  that keeps every mask kind, head layout, head dim and dtype (the rest: `-m slow`)."""
  INTERPRET = True
  CASES = CASES
  CI_CASES = ["causal_end_aligned_T<S_mqa", "segments_window_noncausal",
              "segments_docs_unsorted", "gqa2_d128_mixed", "softmax_array_scale_noncausal",
              "head_dim_48_padded", "bf16_window_segments", "fp16_causal",
              "softmax_dv_wider_gqa", "parallax_dv_narrower_window"]


def test_rows_without_keys_are_zero(rng):
  """T > S causal: the first T - S queries see no key -> zero output and zero gradients."""
  c = Case(T=80, S=40, Hq=2, Hkv=1, B=1)
  q, k, v, r, scale, kw = make_inputs(c, rng)
  f = lambda q, k, v, r: parallax_flash_attention(q, k, v, r, scale=scale, block_sizes=B32,
                                                  interpret=True, **kw)
  o, (dq, dk, dv, dr) = value_and_vjp(f, (q, k, v, r), jnp.ones_like(q))
  o_ref = reference(q, k, v, r, scale, **kw)
  assert rel_err(o, o_ref) < 2e-5
  assert np.all(np.asarray(o[:, :40]) == 0.0)
  assert np.all(np.asarray(dq[:, :40]) == 0.0) and np.all(np.asarray(dr[:, :40]) == 0.0)
  for g in (dq, dk, dv, dr):
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("sort", [True, False])
def test_seg_ranges_cover_visible_tiles(sort, rng):
  """`common.seg_ranges`: every tile pair with a shared id lies in [lo, hi); every tile in
  [mid_lo, mid_hi) shares one id with all real rows of its row tile (safe to leave unmasked)."""
  B, R, C, br, bc = 3, 90, 70, 16, 8
  Rp, Cp = 96, 72
  rows = rng.integers(0, 4, (B, R))
  cols = rng.integers(0, 4, (B, C))
  if sort:
    rows, cols = np.sort(rows, axis=1), np.sort(cols, axis=1)
  rows_p = np.pad(rows, ((0, 0), (0, Rp - R)), constant_values=-1)
  cols_p = np.pad(cols, ((0, 0), (0, Cp - C)), constant_values=-2)
  rng_ = np.asarray(common.seg_ranges(
      jnp.asarray(rows_p, jnp.int32), jnp.asarray(cols_p, jnp.int32), R, C, br, bc))
  n_mid = 0
  for b in range(B):
    for i in range(Rp // br):
      lo, mid_lo, mid_hi, hi = rng_[b, i]
      rt = rows_p[b, i * br:(i + 1) * br]
      rt = rt[rt >= 0]
      for j in range(Cp // bc):
        ct = cols_p[b, j * bc:(j + 1) * bc]
        if np.isin(rt, ct).any():
          assert lo <= j < hi, (b, i, j, rng_[b, i])
        if mid_lo <= j < mid_hi:
          n_mid += 1
          assert len(set(rt)) == 1 and set(ct) == set(rt), (b, i, j, rng_[b, i])
  assert (n_mid > 0) == sort  # sorted rows do use the unmasked path; unsorted never


def test_segment_without_keys(rng):
  """A query segment id that no key has: those rows give 0 and no NaN anywhere."""
  c = Case(T=64, S=64, segments=True, causal=False, Hq=2, Hkv=1, B=1)
  q, k, v, r, scale, kw = make_inputs(c, rng)
  kw["q_segment_ids"] = kw["q_segment_ids"].at[:, :10].set(7)
  f = lambda q, k, v, r: parallax_flash_attention(q, k, v, r, scale=scale, block_sizes=B32,
                                                  interpret=True, **kw)
  o, grads = value_and_vjp(f, (q, k, v, r), jnp.ones_like(q))
  assert np.all(np.asarray(o[:, :10]) == 0.0)
  assert rel_err(o, reference(q, k, v, r, scale, **kw)) < 2e-5
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))


def test_poisoned_padding_is_masked(rng):
  """Garbage in the padded key/value/query rows (as the padded arrays' tails) changes nothing.

  Calls the padded-level op directly with huge finite values in the padding, which only the
  masks keep out (zero padding would hide a missing mask).
  """
  c = Case(T=50, S=70, Hq=2, Hkv=1, B=1)
  q, k, v, r, scale, kw = make_inputs(c, rng)
  bs = B32
  Tp, Sp = 64, 96
  poison = lambda x, n: jnp.concatenate(
      [x, jnp.full((x.shape[0], n - x.shape[1]) + x.shape[2:], 3e3, x.dtype)], axis=1)
  cfg = attention_triton.CallConfig(T=50, S=70, Tp=Tp, Sp=Sp, D=64, Hq=2, Hkv=1, causal=True,
                                    window=None, has_r=True, has_seg=False, need_dscale=False,
                                    blocks=bs, interpret=True)
  scale_arr = jnp.full((2,), scale, jnp.float32)
  args = (poison(q, Tp), poison(k, Sp), poison(v, Sp), poison(r, Tp))
  do = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  o, grads = value_and_vjp(lambda *a: attention._flash(cfg, *a, scale_arr, None, None), args,
                           jnp.pad(do, ((0, 0), (0, Tp - 50), (0, 0), (0, 0))))
  o_ref, grads_ref = value_and_vjp(lambda *a: reference(*a, scale, **kw), (q, k, v, r), do)
  assert rel_err(o[:, :50], o_ref) < 2e-5
  for g, gr in zip(grads, grads_ref):
    assert rel_err(g[:, :gr.shape[1]], gr) < 5e-5


# Non-finite values at positions a row cannot see (docs/attention.md): 16-row tiles over 40
# rows, so each poison sits in masked (diagonal, window, segment) tiles for some rows and
# in interior tiles for others.
B16 = BlockSizes(16, 16, 4, 2, 16, 16, 4, 2, 16, 16, 4, 2)
POISON_CASES = {
    "causal_nan_v": masking.Case(T=40, S=40, poison=(("v", 5, None, np.nan),)),
    "segments_nan_v": masking.Case(T=40, S=40, segments=True, poison=(("v", 3, None, np.nan),)),
    "window_inf_k_gqa": masking.Case(T=40, S=40, window=9, poison=(("k", 12, 1, np.inf),)),
    "end_aligned_nan_k": masking.Case(T=20, S=40, poison=(("k", 30, None, np.nan),)),
    "nan_q_row": masking.Case(T=40, S=40, poison=(("q", 25, None, np.nan),)),
    "noncausal_ninf_v": masking.Case(T=40, S=40, causal=False, window=5,
                                     poison=(("v", 20, 0, -np.inf),)),
}


def _kernel_fn(kw, parallax):
  kw = dict(kw)
  if "segment_ids" in kw:
    kw["q_segment_ids"], kw["kv_segment_ids"] = kw.pop("segment_ids")

  def f(q, k, v, r):
    return parallax_flash_attention(q, k, v, r if parallax else None, scale=0.25,
                                    block_sizes=B16, interpret=True, **kw)
  return f


@pytest.mark.parametrize("name", ci_subset(list(POISON_CASES), [
    "segments_nan_v", "window_inf_k_gqa", "end_aligned_nan_k"]))
def test_poison_reaches_only_the_rows_that_see_it(name):
  """Forward: rows that see a poisoned entry are NaN, the others equal the kernel's result
  on clean inputs bit for bit (f32: Parallax, and softmax for every other case; bf16:
  Parallax with fp16 P V products, every other case)."""
  i = list(POISON_CASES).index(name)
  for dtype in (jnp.float32,) + ((jnp.bfloat16,) if i % 2 == 0 else ()):
    clean, poisoned, kw, nan_rows = masking.make(POISON_CASES[name], dtype, hq=4, hkv=2, d=16)
    for parallax in (True, False) if dtype == jnp.float32 and i % 2 else (True,):
      f = jax.jit(_kernel_fn(kw, parallax))
      try:
        masking.check_rows(f(*poisoned), f(*clean), nan_rows, 0.0)
      except AssertionError as e:
        raise AssertionError(f"{name} {dtype.__name__} parallax={parallax}: {e}") from None


@pytest.mark.parametrize("name", ci_subset(
    ["causal_nan_v", "end_aligned_nan_k", "nan_q_row"], ["nan_q_row"]))
def test_poison_gradients_of_clean_rows(name):
  """Backward: a NaN row is a constant, so the gradient of a loss over the other rows is
  the one with the poison replaced by finite values (dq, dk, dv, dr). The cases need the
  careful pass of the dq kernel (masked NaN value, key) and of the dk/dv kernel (NaN q)."""
  clean, poisoned, kw, nan_rows = masking.make(POISON_CASES[name], jnp.float32, hq=4, hkv=2,
                                               d=16)
  masking.check_clean_row_grads(_kernel_fn(kw, True), clean, poisoned, nan_rows, name)


def test_r_zero_equals_softmax(rng):
  """Spec identity 1: Parallax with r = 0 is softmax attention (forward and dq/dk/dv)."""
  c = Case(T=70, S=70, window=25)
  q, k, v, r, scale, kw = make_inputs(c, rng)
  f = lambda q, k, v, r: parallax_flash_attention(q, k, v, r, scale=scale, block_sizes=B32,
                                                  interpret=True, **kw)
  g = lambda q, k, v: parallax_flash_attention(q, k, v, scale=scale, block_sizes=B32,
                                               interpret=True, **kw)
  do = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  o1, g1 = value_and_vjp(f, (q, k, v, jnp.zeros_like(r)), do)
  o2, g2 = value_and_vjp(g, (q, k, v), do)
  assert rel_err(o1, o2) < 1e-6
  for a, b in zip(g1[:3], g2):
    assert rel_err(a, b) < 1e-5


def test_matches_library_reference(rng):
  """Cross-check against parallax_jax's dense reference (implementation='xla')."""
  try:
    import parallax_jax
    attention = parallax_jax.attention
  except (ImportError, AttributeError) as e:  # pragma: no cover
    pytest.skip(f"parallax_jax.attention unavailable: {e}")
  c = Case(T=70, S=90, window=50)
  q, k, v, r, scale, kw = make_inputs(c, rng)
  o = parallax_flash_attention(q, k, v, r, scale=scale, block_sizes=B32, interpret=True, **kw)
  o_lib = attention(q, k, v, r, probe="learned", affine="affine", causal=True, window=50,
                    implementation="xla")
  assert rel_err(o, o_lib) < 2e-5


def test_jit_and_defaults(rng):
  """Default block sizes (heuristic table), under jit, bf16."""
  c = Case(T=150, S=150, D=64, dtype=jnp.bfloat16, Hq=2, Hkv=1, B=1)
  q, k, v, r, scale, kw = make_inputs(c, rng)
  f = jax.jit(lambda q, k, v, r: parallax_flash_attention(q, k, v, r, scale=scale,
                                                          interpret=True, **kw))
  assert rel_err(f(q, k, v, r), reference(q, k, v, r, scale, **kw)) < 1e-2


def test_input_validation():
  z = lambda *s, dt=jnp.float32: jnp.zeros(s, dt)
  with pytest.raises(ValueError, match="head_dim"):
    parallax_flash_attention(z(1, 8, 1, 512), z(1, 8, 1, 512), z(1, 8, 1, 512), scale=1.0,
                             interpret=True)
  with pytest.raises(ValueError, match="multiple"):
    parallax_flash_attention(z(1, 8, 3, 64), z(1, 8, 2, 64), z(1, 8, 2, 64), scale=1.0,
                             interpret=True)
  with pytest.raises(ValueError, match="dtype"):
    parallax_flash_attention(z(1, 8, 1, 64), z(1, 8, 1, 64, dt=jnp.bfloat16),
                             z(1, 8, 1, 64), scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_q=48)
  ok, why = pallas_kernels.is_supported(z(1, 8, 1, 64), z(1, 8, 1, 64), z(1, 8, 1, 64),
                                        platform="cpu")
  assert not ok and "GPU" in why
  ok, why = pallas_kernels.is_supported(z(1, 8, 1, 64), z(1, 8, 1, 64), z(1, 8, 1, 64),
                                        platform="gpu")
  assert ok, why
  ok, why = pallas_kernels.is_supported(z(1, 8, 1, 300), z(1, 8, 1, 300), z(1, 8, 1, 300),
                                        platform="gpu")
  assert not ok and "head_dim" in why


# ----------------------------------------------------------------------------- CUDA lowering


# Lowering forward + backward for CUDA on an abstract H100 (TTIR verified, six launches, the
# fast kernels branch-free): tests/test_attention_nonfinite.py,
# test_cuda_lowering_abstract_h100_fast_and_fixup.


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("segments", [False, True])
def test_gpu_poison(segments):
  """Compiled kernels (on Hopper: the Mosaic GPU forward and its Triton fixup pass): NaN at
  masked positions reaches no other row, forward and gradients (bf16, default tiles)."""
  c = masking.Case(T=1024, S=1024, segments=segments,
                   poison=(("v", 700, None, np.nan), ("k", 300, 1, np.inf),
                           ("q", 900, None, np.nan)))
  clean, poisoned, kw, nan_rows = masking.make(c, jnp.bfloat16, hq=8, hkv=4, d=128)
  kw = dict(kw)
  if "segment_ids" in kw:
    kw["q_segment_ids"], kw["kv_segment_ids"] = kw.pop("segment_ids")
  f = lambda q, k, v, r: parallax_flash_attention(q, k, v, r, scale=128 ** -0.5, **kw)
  keep = jnp.asarray(~nan_rows)[..., None]
  w = jnp.cos(jnp.arange(np.prod(clean[0].shape), dtype=jnp.float32)).reshape(clean[0].shape)
  g = jax.jit(jax.value_and_grad(
      lambda *a: jnp.sum(jnp.where(keep, f(*a).astype(jnp.float32) * w, 0.0)),
      argnums=(0, 1, 2, 3)))
  o = np.asarray(jax.jit(f)(*poisoned), np.float32)
  o_clean = np.asarray(jax.jit(f)(*clean), np.float32)
  assert np.isnan(o[nan_rows]).all() and np.isfinite(o[~nan_rows]).all()
  assert rel_err(o[~nan_rows], o_clean[~nan_rows]) < 1e-2
  (l, grads), (l_clean, grads_clean) = g(*poisoned), g(*clean)
  assert abs(float(l) - float(l_clean)) <= 1e-2 * abs(float(l_clean))
  for x, y, name in zip(grads, grads_clean, "qkvr"):
    assert rel_err(x, y) < 2e-2, name
