"""What the paper measures: correction size, effective weights, stable rank."""
from __future__ import annotations

import jax.numpy as jnp

from parallax_jax import api
from parallax_jax import masks
from parallax_jax import reference as ref


def correction_to_output_ratio(q, k, v, r, **kwargs):
  """COR = mean_i ||C_i^T r_i|| / mean_i ||vbar_i||, averaged over batch, rows and heads.

  Uses the family API (any implementation), since C^T r = softmax(q,k,v) - parallax(q,k,v,r).
  kwargs go to `parallax_jax.attention` (causal, window, segment_ids, bandwidth, ...).
  Returns a [q_heads] array of per-head ratios.
  """
  vbar = api.softmax_attention(q, k, v, **kwargs).astype(jnp.float32)
  o = api.parallax_attention(q, k, v, r, **kwargs).astype(jnp.float32)
  corr = jnp.linalg.norm(vbar - o, axis=-1).mean(axis=(0, 1))
  base = jnp.linalg.norm(vbar, axis=-1).mean(axis=(0, 1))
  return corr / jnp.maximum(base, jnp.finfo(jnp.float32).tiny)


def effective_weights(q, k, r, *, bandwidth=None, causal=True, window=None, segment_ids=None):
  """Parallax's effective weights e_ij = a_ij (1 + rbar_i - r_i . k_j), dense [B, Hq, T, S],
  together with the base softmax weights a_ij. Each row of e sums to 1 (spec identity 3)."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  q_seg, kv_seg = api._segments(segment_ids, b, t, s)
  cd = api._compute_dtype(q.dtype)
  scale = api._scale(bandwidth, hq, d, cd).reshape(hkv, -1)
  mask = masks.full_mask(t, s, causal=causal, window=window, q_seg=q_seg, kv_seg=kv_seg)
  mask = mask[:, None, None] if mask.ndim == 3 else mask[None, None, None]
  qs = ref.split_heads(q.astype(cd), hkv)
  ks = ref.kv_heads_first(k.astype(cd))
  a = ref.weights(qs, ks, scale, mask)
  tt = jnp.einsum("bkgtd,bksd->bkgts", ref.split_heads(r.astype(cd), hkv), ks)
  tbar = jnp.sum(a * tt, axis=-1, keepdims=True)
  e = a * (1.0 + tbar - tt)
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
  rows = 1
  for n in w.shape[:fan_in_axes]:
    rows *= n
  m = w.reshape(rows, -1)
  sigma = jnp.linalg.svd(m, compute_uv=False)
  return jnp.sum(sigma**2) / jnp.maximum(sigma[0] ** 2, jnp.finfo(jnp.float32).tiny)
