"""Cheap numbers to log next to the loss: update RMS per group and stable ranks.

Stable rank ||W||_F^2 / ||W||_2^2 is a smooth lower bound on rank; the Parallax paper
tracks it for the probe W_R against W_Q (W_R keeps it only under Muon).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from parallax_jax.optim import routing as rt


def update_rms(updates, labels) -> dict[str, jax.Array]:
  """RMS of all update entries in each group, e.g. labels = param_labels(params)."""
  sums: dict[str, jax.Array] = {}
  counts: dict[str, int] = {}
  for u, label in zip(jax.tree.leaves(updates), jax.tree.leaves(labels)):
    sums[label] = sums.get(label, 0.0) + jnp.sum(jnp.square(u.astype(jnp.float32)))
    counts[label] = counts.get(label, 0) + u.size
  return {k: jnp.sqrt(sums[k] / max(counts[k], 1)) for k in sums}


def stable_rank(w: jax.Array, view: rt.MatrixView | None = None) -> jax.Array:
  """||W||_F^2 / ||W||_2^2 of each matrix of w under `view` (default: last two axes).

  Returns shape [batch] (one per layer for a stacked leaf, [1] for a plain matrix).
  """
  view = view or rt.last_two_axes(w.ndim)
  mats = view.to_matrices(w.astype(jnp.float32))
  s = jnp.linalg.svd(mats, compute_uv=False)
  # relative to the largest before squaring: scale-free; a zero matrix gives 0
  rel = s / jnp.maximum(s[..., :1], jnp.finfo(jnp.float32).tiny)
  return jnp.sum(rel * rel, axis=-1)


def stable_ranks(params, patterns: Sequence[str] = (r"attn/q_proj/kernel$", r"attn/r_proj/kernel$"),
                 routing: rt.Routing | None = None) -> dict[str, jax.Array]:
  """Stable rank of every leaf whose path matches one of `patterns`, keyed by path.

  Muon leaves are read with their routing view (q/k/v/r kernels as [d, H*Dh], per
  layer when stacked); other leaves as their last two axes.
  """
  routing = routing or rt.Routing()
  out = {}
  for p, w in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = rt.path_str(p)
    if any(re.search(pat, path) for pat in patterns):
      view = routing.view(path, w.shape) if routing.label(path) == rt.MUON else None
      out[path] = stable_rank(w, view)
  return out
