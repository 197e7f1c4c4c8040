"""Split-KV Pallas (Triton-lowering) decode kernel for Parallax (and softmax) attention.

One new query row per sequence (q, r: [B, Hq, D]) against the model's KV cache layout
[B, S_max, Hkv, D] (`parallax_jax/models/generate.py`), read in place (no copy / transpose).
Per row (spec `attention_family.md`): S1 = q.k*scale, S2 = r.k, one running max m over S1,
P1 = exp(S1 - m), P2 = P1*S2, d1 = sum P1, d2 = sum P2, O1 = P1 V, O2 = P2 V (fp32);
o = (1 + d2/d1) O1/d1 - O2/d1 (r None: o = O1/d1). Rows with no valid key give 0.

Grid (B, Hkv, num_splits): GQA packing puts the G = Hq/Hkv query rows (and, in a second
tile, their probe rows) of one KV head in one program, so each K/V byte is read once per split.
Each split writes fp32 partials (m, d1, d2, O1, O2); `_merge` combines them exactly in JAX.
Keys valid for batch b: (lengths[b] - window, lengths[b]) intersected with [0, S_max).
Tiles are [block_kv, D]; the last tile of the cache is clamped to start at S_max - block_kv
(keys already seen are masked), so no padding of the cache is needed when S_max >= block_kv.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.parallax_triton import (NEG_INF, SUPPORTED_DTYPES, _compiler_params, _dot,
                                            _iota, _next_pow2, _pad, _round_up)

NUM_SMS = 132  # H100 SXM


def default_num_splits(batch: int, num_kv_heads: int, s_max: int, block_kv: int = 64,
                       num_sms: int = NUM_SMS) -> int:
  """Enough splits that B*Hkv*splits covers ~2 waves of SMs, each split >= 2 tiles.

  H100 sweep (bench/results/decode_sweep.json): at B=1, L=1k, 8 splits of 2 tiles beat 4 of 4
  (10.0 vs 11.4 us); beyond ~2 waves more splits only add merge work (B=64, L=4k: 370 us at
  1 split, 392 at 4, 470 at 16). Below one program per SM the count is rounded down so the
  programs fit the ~2 resident per SM (3-stage Parallax tiles): at B=8, L=4k, 5 splits (320
  programs) took 70 us against 60 at a count fitting one wave.
  """
  progs = batch * num_kv_heads
  if progs <= num_sms:
    want = max(1, (2 * num_sms) // progs)
  else:
    want = max(1, -(-2 * num_sms // progs))
  max_by_len = max(1, s_max // (2 * block_kv))
  return int(min(want, max_by_len, 64))


def _p2v(p2, v):
  """P2 V with ~16-bit P2 precision on the tensor cores.

  The output subtracts O2/d1, which amplifies the rounding of P2 (P2 in bf16 alone costs
  ~1e-2 relative error); an fp32 dot runs off the tensor cores (it cost 20-50% of the decode
  time). P2 = hi + lo with both in V's dtype keeps 16 (bf16) or 22 (fp16) bits for two cheap
  MMAs: decode pads the G rows to 16, so the MMA count, not its size, is what matters.
  """
  if v.dtype == jnp.float32:
    return _dot(p2, v)
  hi = p2.astype(v.dtype)
  lo = (p2 - hi.astype(jnp.float32)).astype(v.dtype)
  return _dot(hi, v) + _dot(lo, v)


def _kernel(len_ref, q_ref, k_ref, v_ref, r_ref, m_ref, d1_ref, d2_ref, o1_ref, o2_ref, *,
            scale, window, bk, chunk, s_max, has_r):
  b, s = pl.program_id(0), pl.program_id(2)
  L = jnp.minimum(len_ref[b], s_max)
  lo_valid = 0 if window is None else jnp.maximum(L - window, 0)
  lo = jnp.maximum(s * chunk, lo_valid)
  hi = jnp.minimum((s + 1) * chunk, L)
  q = q_ref[...]
  bh, D = q.shape
  r = r_ref[...] if has_r else None

  def body(t, carry):
    m, d1, d2, o1, o2 = carry
    start = jnp.minimum(t * bk, s_max - bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    j = start + _iota(bk, 1)
    valid = (j >= jnp.maximum(lo, t * bk)) & (j < hi)
    s1 = _dot(q, k, trans_b=True) * scale
    s1 = jnp.where(valid, s1, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s1, axis=1))
    alpha = jnp.exp(m - m_new)
    p1 = jnp.where(valid, jnp.exp(s1 - m_new[:, None]), 0.0)
    d1 = d1 * alpha + jnp.sum(p1, axis=1)
    o1 = o1 * alpha[:, None] + _dot(p1.astype(v.dtype), v)
    if has_r:
      s2 = _dot(r, k, trans_b=True)
      p2 = p1 * s2
      d2 = d2 * alpha + jnp.sum(p2, axis=1)
      o2 = o2 * alpha[:, None] + _p2v(p2, v)
    return m_new, d1, d2, o1, o2

  zr = jnp.zeros((bh,), jnp.float32)
  zo = jnp.zeros((bh, D), jnp.float32)
  carry = (zr + NEG_INF, zr, zr, zo, zo)
  t0 = lo // bk
  t1 = jnp.where(hi > lo, (hi + bk - 1) // bk, t0)
  m, d1, d2, o1, o2 = lax.fori_loop(t0, t1, body, carry)
  m_ref[...] = m
  d1_ref[...] = d1
  o1_ref[...] = o1
  if has_r:
    d2_ref[...] = d2
    o2_ref[...] = o2


def _merge(m, d1, d2, o1, o2):
  """Exact rescale-merge of split partials along axis 2 -> o (fp32, rows without keys: 0)."""
  M = jnp.max(m, axis=2, keepdims=True)
  w = jnp.exp(m - M)
  D1 = jnp.sum(w * d1, axis=2)
  O1 = jnp.sum(w[..., None] * o1, axis=2)
  safe = jnp.where(D1 > 0, D1, 1.0)[..., None]
  if o2 is None:
    o = O1 / safe
  else:
    D2 = jnp.sum(w * d2, axis=2)[..., None]
    O2 = jnp.sum(w[..., None] * o2, axis=2)
    o = (1.0 + D2 / safe) * O1 / safe - O2 / safe
  return jnp.where((D1 > 0)[..., None], o, 0.0)


def parallax_decode(q, k_cache, v_cache, r=None, *, scale, lengths, window=None,
                    num_splits=None, block_kv=None, num_warps=4, num_stages=None,
                    interpret=False):
  """Decode attention of one new token per sequence.

  q, r: [B, Hq, D]; k_cache, v_cache: [B, S_max, Hkv, D] (Hq multiple of Hkv; q-head h reads
  kv-head h // (Hq//Hkv)); lengths: [B] int32, keys j < lengths[b] valid, the token sits at
  lengths[b]-1 and with `window` sees j > lengths[b]-1-window. scale: python float.
  Returns [B, Hq, D] in q's dtype.
  num_stages defaults to 3 with r (H100 sweep: the Parallax loop body needs the deeper K/V
  prefetch to stay memory bound, 370 vs 445 us at B=64, L=4k) and 2 without.
  """
  B, Hq, D = q.shape
  _, S, Hkv, Dk = k_cache.shape
  if Dk != D or v_cache.shape != k_cache.shape or Hq % Hkv:
    raise ValueError(f"bad shapes q {q.shape} k {k_cache.shape} v {v_cache.shape}")
  if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
    raise ValueError(f"unsupported dtype {q.dtype}")
  if D < 16 or D & (D - 1):
    raise ValueError(f"head_dim must be a power of two >= 16, got {D}")
  if r is not None and r.shape != q.shape:
    raise ValueError(f"r {r.shape} != q {q.shape}")
  G = Hq // Hkv
  bh = max(16, _next_pow2(G))
  bk = block_kv if block_kv is not None else 64
  if S < bk:  # tiny caches only: pad to one tile
    bk = max(16, min(bk, _next_pow2(S)))
    k_cache, v_cache = _pad(k_cache, 1, bk), _pad(v_cache, 1, bk)
  Sp = k_cache.shape[1]
  if num_stages is None:
    num_stages = 3 if r is not None else 2
  ns = num_splits if num_splits is not None else default_num_splits(B, Hkv, S, bk)
  chunk = _round_up(-(-Sp // ns), bk)
  ns = -(-Sp // chunk)

  def pack(x):  # [B, Hq, D] -> [B, Hkv, bh, D] (rows >= G are zero)
    return _pad(x.reshape(B, Hkv, G, D), 2, bh)

  qp = pack(q)
  rp = pack(r) if r is not None else None
  lengths = jnp.asarray(lengths, jnp.int32).reshape(B)
  grid = (B, Hkv, ns)
  row_spec = pl.BlockSpec((None, None, bh, D), lambda b, h, s: (b, h, 0, 0))
  kv_spec = pl.BlockSpec((None, Sp, None, D), lambda b, h, s: (b, 0, h, 0))
  vec_out = pl.BlockSpec((None, None, None, bh), lambda b, h, s: (b, h, s, 0))
  mat_out = pl.BlockSpec((None, None, None, bh, D), lambda b, h, s: (b, h, s, 0, 0))
  vec = jax.ShapeDtypeStruct((B, Hkv, ns, bh), jnp.float32)
  mat = jax.ShapeDtypeStruct((B, Hkv, ns, bh, D), jnp.float32)
  has_r = r is not None
  out_shape = [vec, vec, vec, mat, mat] if has_r else [vec, vec, mat]
  out_specs = [vec_out] * 3 + [mat_out] * 2 if has_r else [vec_out] * 2 + [mat_out]

  def kernel(len_ref, q_ref, k_ref, v_ref, r_ref, *outs):
    if has_r:
      m_ref, d1_ref, d2_ref, o1_ref, o2_ref = outs
    else:
      (m_ref, d1_ref, o1_ref), d2_ref, o2_ref = outs, None, None
    _kernel(len_ref, q_ref, k_ref, v_ref, r_ref, m_ref, d1_ref, d2_ref, o1_ref, o2_ref,
            scale=float(scale), window=None if window is None else int(window), bk=bk,
            chunk=chunk, s_max=S if S >= bk else Sp, has_r=has_r)

  outs = pl.pallas_call(
      kernel, grid=grid,
      in_specs=[pl.BlockSpec((B,), lambda b, h, s: (0,)), row_spec, kv_spec, kv_spec,
                row_spec if has_r else None],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(num_warps, num_stages), interpret=bool(interpret),
      name="parallax_decode" if has_r else "softmax_decode",
  )(lengths, qp, k_cache, v_cache, rp)
  if has_r:
    m, d1, d2, o1, o2 = outs
  else:
    (m, d1, o1), d2, o2 = outs, None, None
  o = _merge(m, d1, d2, o1, o2)  # [B, Hkv, bh, D]
  return o[:, :, :G].reshape(B, Hq, D).astype(q.dtype)


def reference_decode(q, k_cache, v_cache, r=None, *, scale, lengths, window=None):
  """Dense float32 reference of `parallax_decode`."""
  B, Hq, D = q.shape
  S, Hkv = k_cache.shape[1], k_cache.shape[2]
  G = Hq // Hkv
  f = lambda x: x.astype(jnp.float32)
  k = jnp.repeat(f(k_cache), G, axis=2)
  v = jnp.repeat(f(v_cache), G, axis=2)
  hp = lax.Precision.HIGHEST
  s1 = jnp.einsum("bhd,bshd->bhs", f(q), k, precision=hp) * scale
  L = jnp.asarray(lengths, jnp.int32)[:, None, None]
  j = jnp.arange(S)[None, None, :]
  valid = j < L
  if window is not None:
    valid &= j > L - 1 - window
  s1 = jnp.where(valid, s1, -jnp.inf)
  m = jnp.max(s1, axis=-1, keepdims=True)
  p = jnp.where(valid, jnp.exp(s1 - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  d1 = jnp.sum(p, -1, keepdims=True)
  a = p / jnp.where(d1 > 0, d1, 1.0)
  vbar = jnp.einsum("bhs,bshd->bhd", a, v, precision=hp)
  if r is None:
    o = vbar
  else:
    t = jnp.einsum("bhd,bshd->bhs", f(r), k, precision=hp)
    tbar = jnp.sum(a * t, -1, keepdims=True)
    o = vbar - (jnp.einsum("bhs,bshd->bhd", a * t, v, precision=hp) - tbar * vbar)
  return o
