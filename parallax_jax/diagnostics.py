"""What the paper measures: correction size, effective weights, stable rank."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from parallax_jax import api
from parallax_jax import masks
from parallax_jax import reference as ref


def _nonempty(name, q, k):
  if q.shape[0] == 0 or q.shape[1] == 0 or k.shape[1] == 0:
    raise ValueError(f"{name} needs batch, T and S >= 1 (statistics over rows and keys), got "
                     f"q {q.shape}, k {k.shape}")


def correction_to_output_ratio(q, k, v, r, **kwargs):
  """COR = mean_i ||C_i^T r_i|| / mean_i ||vbar_i||, averaged over batch, rows and heads.

  Uses the family API (any implementation), since C^T r = softmax(q,k,v) - parallax(q,k,v,r).
  kwargs go to `parallax_jax.attention` (causal, window, segment_ids, bandwidth, ...).
  Returns a [q_heads] array of per-head ratios.
  """
  api._check_qkv(q, k, v, r)
  _nonempty("correction_to_output_ratio", q, k)
  vbar = api.softmax_attention(q, k, v, **kwargs).astype(jnp.float32)
  o = api.parallax_attention(q, k, v, r, **kwargs).astype(jnp.float32)
  # One common scale (it cancels in the ratio) before squaring: |v| ~ 1e-20 made every norm
  # underflow to a COR of 0, and |v| ~ 1e20 overflow to NaN.
  corr, base = vbar - o, vbar
  s = jnp.maximum(jnp.max(jnp.abs(corr)), jnp.max(jnp.abs(base)))
  s = jnp.where(jnp.isfinite(s) & (s > 0), s, 1.0)
  corr = jnp.linalg.norm(corr / s, axis=-1).mean(axis=(0, 1))
  base = jnp.linalg.norm(base / s, axis=-1).mean(axis=(0, 1))
  return corr / jnp.maximum(base, jnp.finfo(jnp.float32).tiny)


def effective_weights(q, k, r, *, bandwidth=None, causal=True, window=None, segment_ids=None):
  """Parallax's effective weights e_ij = a_ij (1 + rbar_i - r_i . k_j), dense [B, Hq, T, S],
  together with the base softmax weights a_ij. Each row of e sums to 1 (spec identity 3)."""
  if r is None:
    raise ValueError("effective_weights needs the learned probe r (shaped like q), got None")
  api._check_qkv(q, k, k, r)
  _nonempty("effective_weights", q, k)
  if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer))
                             or window <= 0):  # as the attention functions accept
    raise ValueError(f"window must be a positive int (number of keys kept), got {window!r}")
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  q_seg, kv_seg = api._segments(segment_ids, b, t, s)
  cd = api._compute_dtype(q.dtype)
  scale = api._scale(bandwidth, hq, d, cd).reshape(hkv, -1)
  mask = masks.full_mask(t, s, causal=causal, window=window, q_seg=q_seg, kv_seg=kv_seg)
  mask = mask[:, None, None] if mask.ndim == 3 else mask[None, None, None]
  qs = ref.split_heads(q.astype(cd), hkv)
  ks = ref.kv_heads_first(k.astype(cd))
  rs = ref.split_heads(r.astype(cd), hkv)
  # As the attention itself: rows that see a non-finite entry are NaN, others exact.
  flag = ref.row_flags(qs, ks, ks, rs, mask)
  qs, ks, rs = ref.finite(qs), ref.finite(ks), ref.finite(rs)
  a = ref.weights(qs, ks, scale, mask)
  tt = jnp.einsum("bkgtd,bksd->bkgts", rs, ks)
  tbar = jnp.sum(a * tt, axis=-1, keepdims=True)
  e = jnp.where(flag, jnp.nan, a * (1.0 + tbar - tt))
  a = jnp.where(flag, jnp.nan, a)
  flat = lambda x: x.reshape(b, hq, t, s)
  return flat(e), flat(a)


def weight_statistics(q, k, r, **kwargs):
  """Per-head means over rows: negative mass sum_j min(e_ij, 0), mass on the first key
  (attention sink) of e and of the base softmax a, and the entropy of a (nats).
  Dense in T x S: meant for diagnostics on sampled batches, not for long training runs."""
  e, a = effective_weights(q, k, r, **kwargs)
  ent = -jnp.sum(jnp.where(a > 0, a * jnp.log(jnp.where(a > 0, a, 1.0)), 0.0), axis=-1)
  mean = lambda x: x.mean(axis=(0, 2))
  return {
      "negative_mass": mean(jnp.sum(jnp.minimum(e, 0.0), axis=-1)),
      "first_token_mass": mean(e[..., 0]),
      "first_token_mass_softmax": mean(a[..., 0]),
      "softmax_entropy": mean(ent),
  }


def stable_rank(w, *, fan_in_axes: int = 1):
  """||W||_F^2 / ||W||_2^2 of W viewed as a matrix [prod(shape[:fan_in_axes]), rest].

  For a projection kernel [d_model, heads, head_dim] the default treats it as
  [d_model, heads * head_dim]; for o_proj [heads, head_dim, d_model] pass fan_in_axes=2.
  """
  w = jnp.asarray(w, jnp.float32)
  if isinstance(fan_in_axes, bool) or not isinstance(fan_in_axes, int) or not (
      1 <= fan_in_axes < w.ndim):
    raise ValueError(f"fan_in_axes must be an int in [1, {w.ndim - 1}] for a weight of shape "
                     f"{w.shape}, got {fan_in_axes!r}")
  if w.size == 0:
    raise ValueError(f"stable_rank of an empty weight, shape {w.shape}")
  rows = 1
  for n in w.shape[:fan_in_axes]:
    rows *= n
  m = w.reshape(rows, -1)
  sigma = jnp.linalg.svd(m, compute_uv=False)
  # relative to the largest before squaring: scale-free (sigma^2 overflowed at |W| ~ 1e20 and
  # underflowed at ~1e-20); a zero matrix gives 0
  rel = sigma / jnp.maximum(sigma[0], jnp.finfo(jnp.float32).tiny)
  return jnp.sum(rel * rel)
