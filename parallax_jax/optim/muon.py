"""Muon for hidden matrices, AdamW for everything else, as optax transformations.

scale_by_muon: Nesterov momentum -> Newton-Schulz on each leaf's matrix view ->
  shape scaling. Matrices of equal shape (stacked layers, per-head slices, and
  same-shaped leaves) are orthogonalised as one batch, laid out so that no
  collective runs inside the iteration (see sharding.py).
muon: optax.partition of that (+ decoupled weight decay, learning rate) and AdamW,
  with the split decided by parameter role (routing.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections import defaultdict
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from parallax_jax.optim import newton_schulz as ns
from parallax_jax.optim import routing as rt
from parallax_jax.optim.sharding import SHARD_STRATEGIES, ShardStrategy, local_matrices, reshard_like, unshard

UpdateScale = Literal["rms", "shape"]
UPDATE_SCALES = ("rms", "shape")


class ScaleByMuonState(NamedTuple):
  count: jax.Array  # int32 [], steps taken
  mu: optax.Updates  # momentum, in mu_dtype


def _check(ok: bool, key: str, value: Any, want: str):
  if not ok:
    raise ValueError(f"{key} must be {want}, got {value!r}")


def _check_number(key: str, value: Any, ok: Callable[[float], bool], want: str):
  """A real number (Python, NumPy or a concrete 0-d array) that is finite and `ok`; traced
  values (e.g. `optax.inject_hyperparams` under jit) are the caller's to check."""
  if isinstance(value, jax.core.Tracer):
    return
  try:
    v = None if isinstance(value, (str, bytes, bool)) or value is None else float(value)
  except (TypeError, ValueError):
    v = None
  _check(v is not None and math.isfinite(v) and ok(v), key, value, f"a finite number {want}")


# The arguments of `muon` to list as static in `optax.inject_hyperparams(muon,
# static_args=MUON_STATIC_ARGS)`: the ones that shape the program (iteration counts and
# coefficients, dtypes, the routing) or that a Python check reads. What stays injectable:
# learning_rate, weight_decay, adam_learning_rate, adam_weight_decay.
MUON_STATIC_ARGS = ("ns_coeffs", "ns_steps", "ns_dtype", "ns_eps", "ns_safety", "beta", "rms",
                    "adam_b1", "adam_b2", "adam_eps", "mu_dtype", "adam_weight_decay_mask")


def _dtype_or_none(d):
  try:
    return jnp.dtype(d)
  except TypeError:
    return None


def _scale_factor(update_scale: UpdateScale, rms: float, m: int, n: int) -> float:
  # "shape": Keller Jordan's sqrt(max(1, fan_out / fan_in)).
  # "rms": Moonshot (Liu et al. 2025, arXiv:2502.16982): an orthogonal [m, n] matrix
  #   has RMS 1/sqrt(max(m, n)), so rms * sqrt(max(m, n)) gives every matrix AdamW's
  #   typical update RMS and lets AdamW learning rates and weight decay transfer.
  if update_scale == "shape":
    return max(1.0, n / m) ** 0.5
  return rms * max(m, n) ** 0.5


def scale_by_muon(
    *,
    ns_coeffs: ns.Schedule = "quintic",
    ns_steps: int | None = None,
    ns_dtype=jnp.bfloat16,
    ns_eps: float = 1e-7,
    ns_safety: float = 1.01,
    beta: float = 0.95,
    nesterov: bool = True,
    mu_dtype=None,
    update_scale: UpdateScale = "rms",
    rms: float = 0.2,
    routing: rt.Routing | None = None,
    shard_strategy: ShardStrategy = "distribute",
) -> optax.GradientTransformation:
  """Momentum + Newton-Schulz + shape scaling for every leaf it is given.

  ns_coeffs, ns_steps: see newton_schulz.ns_coefficients.
  ns_dtype: bfloat16 (fast) or float32 (accurate; TF32 is disabled) for the iteration.
  ns_eps, ns_safety: the input is divided by ||G||_F * ns_safety + ns_eps.
  beta, nesterov: m <- beta m + (1 - beta) g; the direction is beta m + (1 - beta) g
    with Nesterov, m without. No bias correction: the orthogonalisation removes scale.
  mu_dtype: momentum storage dtype (None: the parameter's dtype).
  update_scale, rms: "rms" gives each matrix update RMS `rms`; "shape" multiplies by
    sqrt(max(1, fan_out / fan_in)).
  routing: the matrix view of each leaf from its path (see routing.Routing); None
    reads every leaf as [..., fan_in, fan_out] with leading axes batched.
  shard_strategy: "distribute" | "replicate" | "none", see sharding.local_matrices.
  """
  coeffs = ns.ns_coefficients(ns_coeffs, ns_steps)
  _check_number("beta", beta, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
  _check(_dtype_or_none(ns_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)), "ns_dtype", ns_dtype,
         "bfloat16 or float32")
  _check_number("ns_eps", ns_eps, lambda v: v > 0, "> 0")
  _check_number("ns_safety", ns_safety, lambda v: v >= 1.0, ">= 1")
  _check(update_scale in UPDATE_SCALES, "update_scale", update_scale, f"one of {UPDATE_SCALES}")
  _check_number("rms", rms, lambda v: v > 0, "> 0")
  _check(shard_strategy in SHARD_STRATEGIES, "shard_strategy", shard_strategy, f"one of {SHARD_STRATEGIES}")
  _check(routing is None or isinstance(routing, rt.Routing), "routing", routing, "a Routing or None")
  _check(mu_dtype is None or (_dtype_or_none(mu_dtype) is not None
                              and jnp.issubdtype(_dtype_or_none(mu_dtype), jnp.floating)),
         "mu_dtype", mu_dtype, "a floating dtype or None")
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def view_of(path, x) -> rt.MatrixView:
    if routing is None:
      if x.ndim < 2:
        raise ValueError(f"scale_by_muon: leaf {rt.path_str(path)!r} of shape {x.shape} is not a matrix")
      return rt.last_two_axes(x.ndim)
    return routing.view(rt.path_str(path), x.shape)

  def init_fn(params):
    mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=p.dtype if mu_dtype is None else mu_dtype), params)
    # Fail at init, not at the first step, on a leaf with no matrix view.
    jax.tree_util.tree_map_with_path(view_of, params)
    return ScaleByMuonState(count=jnp.zeros([], jnp.int32), mu=mu)

  def update_fn(updates, state, params=None):
    del params
    # Accumulate in the wider of (gradient, momentum) dtypes; store in mu_dtype.
    mu = jax.tree.map(lambda g, m: beta * m + (1 - beta) * g, updates, state.mu)
    direction = jax.tree.map(lambda g, m: beta * m + (1 - beta) * g, updates, mu) if nesterov else mu
    out = jax.tree.map(lambda o, g: o.astype(g.dtype), orthogonalize_tree(direction), updates)
    mu = jax.tree.map(lambda m, old: m.astype(old.dtype), mu, state.mu)
    return out, ScaleByMuonState(count=optax.safe_increment(state.count), mu=mu)

  def orthogonalize_tree(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    views = [view_of(p, x) for p, x in flat]
    mats = [v.to_matrices(unshard(x)) for v, (_, x) in zip(views, flat)]  # [batch, fan_in, fan_out]
    # NS(G^T) = NS(G)^T, so store tall matrices wide: up and down projections then share
    # a batch. One batched iteration per shape gives fewer, larger matmuls and one
    # layout change per group instead of per leaf.
    tall = [a.shape[1] > a.shape[2] for a in mats]
    wide = [jnp.swapaxes(a, 1, 2) if t else a for a, t in zip(mats, tall)]
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, a in enumerate(wide):
      groups[a.shape[1:]].append(i)
    results: list[jax.Array] = [None] * len(mats)  # type: ignore[list-item]
    for idx in groups.values():
      batch = jnp.concatenate([wide[i] for i in idx]) if len(idx) > 1 else wide[idx[0]]
      batch, undo = local_matrices(batch, shard_strategy)
      o = undo(ns.orthogonalize(batch, coeffs, ns_dtype=ns_dtype, eps=ns_eps, safety=ns_safety))
      splits = list(itertools.accumulate(wide[i].shape[0] for i in idx))[:-1]
      for i, part in zip(idx, jnp.split(o, splits)):
        results[i] = part
    leaves = []
    for v, o, a, t, (_, x) in zip(views, results, mats, tall, flat):
      o = jnp.swapaxes(o, 1, 2) if t else o
      leaves.append(reshard_like(v.from_matrices(o * _scale_factor(update_scale, rms, *a.shape[1:]), x.shape), x))
    return jax.tree_util.tree_unflatten(treedef, leaves)

  return optax.GradientTransformation(init_fn, update_fn)


def add_decayed_weights(weight_decay: float, *, cautious: bool = False, mask=None) -> optax.GradientTransformation:
  """u + wd * p; cautious: only where u * p >= 0 (Chen et al. 2025, arXiv:2510.12402),
  i.e. where decay pulls the same way as the update instead of fighting it."""
  if not cautious:
    return optax.add_decayed_weights(weight_decay, mask)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("cautious weight decay needs params passed to update()")
    updates = jax.tree.map(
        lambda u, p: u + weight_decay * jnp.where(u * p >= 0, p, 0).astype(u.dtype), updates, params)
    return updates, state

  tx = optax.GradientTransformation(optax.init_empty_state, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    cautious_weight_decay: bool = False,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    adam_weight_decay: float = 0.0,
    adam_weight_decay_mask: Any | Callable | None = None,
    routing: rt.Routing | None = None,
    per_head: bool | None = None,
    ns_coeffs: ns.Schedule = "quintic",
    ns_steps: int | None = None,
    ns_dtype=jnp.bfloat16,
    ns_eps: float = 1e-7,
    ns_safety: float = 1.01,
    beta: float = 0.95,
    nesterov: bool = True,
    mu_dtype=None,
    update_scale: UpdateScale = "rms",
    rms: float = 0.2,
    shard_strategy: ShardStrategy = "distribute",
) -> optax.GradientTransformation:
  """Muon on hidden matrices, AdamW on embedding, head, norms, biases and scalars.

  learning_rate, weight_decay: Muon group (decoupled: p -= lr * (u + wd * p)).
  cautious_weight_decay: decay only coordinates where it agrees with the update
    (both groups).
  adam_*: the AdamW group's own hyper-parameters; adam_learning_rate None reuses
    learning_rate (sensible with update_scale="rms"). adam_weight_decay_mask: optax
    mask (tree or callable) within the AdamW group, e.g. to skip norms.
  routing: role-based split and matrix views (default routing.Routing()).
  per_head: shorthand for routing with per_head set (orthogonalise each head of the
    [d, H, Dh] q/k/v/r kernels separately).
  The remaining arguments go to scale_by_muon.
  """
  routing = routing or rt.Routing()
  _check(isinstance(routing, rt.Routing), "routing", routing, "a Routing or None")
  if per_head is not None:
    routing = dataclasses.replace(routing, per_head=bool(per_head))
  for key, lr in (("learning_rate", learning_rate), ("adam_learning_rate", adam_learning_rate)):
    if callable(lr) or (lr is None and key == "adam_learning_rate"):
      continue  # a schedule (the caller's to check), or the Muon group's
    _check_number(key, lr, lambda v: v >= 0, ">= 0 (or a schedule)")
  _check_number("weight_decay", weight_decay, lambda v: v >= 0, ">= 0")
  _check_number("adam_weight_decay", adam_weight_decay, lambda v: v >= 0, ">= 0")
  _check_number("adam_b1", adam_b1, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
  _check_number("adam_b2", adam_b2, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
  _check_number("adam_eps", adam_eps, lambda v: v > 0, "> 0")
  muon_tx = optax.chain(
      scale_by_muon(ns_coeffs=ns_coeffs, ns_steps=ns_steps, ns_dtype=ns_dtype, ns_eps=ns_eps, ns_safety=ns_safety,
                    beta=beta, nesterov=nesterov, mu_dtype=mu_dtype, update_scale=update_scale, rms=rms,
                    routing=routing, shard_strategy=shard_strategy),
      add_decayed_weights(weight_decay, cautious=cautious_weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
  adam_tx = optax.chain(
      optax.scale_by_adam(b1=adam_b1, b2=adam_b2, eps=adam_eps, mu_dtype=mu_dtype),
      add_decayed_weights(adam_weight_decay, cautious=cautious_weight_decay, mask=adam_weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate if adam_learning_rate is None else adam_learning_rate),
  )
  return optax.partition({rt.MUON: muon_tx, rt.ADAM: adam_tx}, lambda p: rt.param_labels(p, routing))
