"""Which keys each query sees: causal (end-aligned), sliding window, segments.

One function builds the mask for any block of query/key positions, so the dense
reference, the chunked implementation and the kernels' tests agree by construction.
"""
from __future__ import annotations

import jax.numpy as jnp


def block_mask(q_pos, k_pos, *, offset, causal, window, q_seg=None, kv_seg=None, kv_len=None):
  """Boolean mask [..., Tq, Sk] for query rows `q_pos` and key columns `k_pos`.

  q_pos: int [Tq] query indices (0..T-1); k_pos: int [Sk] key indices (0..S-1).
  offset: S - T. Query i sits at absolute position i + offset (decode convention:
    with fewer queries than keys the queries are the *last* T positions).
  window: keep keys with pos - window < j (the `window` most recent keys including
    the diagonal); without `causal` the window is symmetric, |pos - j| < window.
  q_seg / kv_seg: int [B, Tq] / [B, Sk] segment ids; keys of another segment are masked.
  kv_len: keys at index >= kv_len are padding and always masked.
  """
  pos = (q_pos + offset)[:, None]
  j = k_pos[None, :]
  mask = jnp.ones((q_pos.shape[0], k_pos.shape[0]), dtype=bool)
  if causal:
    mask &= j <= pos
  if window is not None:
    mask &= j > pos - window
    if not causal:
      mask &= j < pos + window
  if kv_len is not None:
    mask &= j < kv_len
  if q_seg is not None:
    mask = mask[None] & (q_seg[:, :, None] == kv_seg[:, None, :])
  return mask


def full_mask(T, S, *, causal, window, q_seg=None, kv_seg=None):
  """Mask [T, S] (or [B, T, S] with segments) for a whole sequence."""
  return block_mask(jnp.arange(T), jnp.arange(S), offset=S - T, causal=causal,
                    window=window, q_seg=q_seg, kv_seg=kv_seg)
