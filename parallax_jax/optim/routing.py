"""Which optimizer each parameter gets, decided by its role (path), never by its ndim.

A leaf's path ("layers/attn/q_proj/kernel") is matched against a small ordered rule
table (first match wins). Muon rules also say how the leaf is seen as a matrix
(`MatrixView`): which axes are fan-in (rows), which are fan-out (columns); every other
axis is a batch axis whose slices are orthogonalised independently. Leaves no rule
claims go to AdamW, so a new parameter can never silently reach Muon; `describe` and
`param_labels` show the decision for every leaf.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

MUON = "muon"
ADAM = "adam"
LABELS = (MUON, ADAM)


@dataclasses.dataclass(frozen=True)
class MatrixView:
  """How a leaf of rank `ndim` is read as matrices [fan_in, fan_out] (y = x @ W).

  head_axis: for per-head orthogonalisation, the axis that becomes a batch axis so
    each head's slice is orthogonalised on its own.
  """
  ndim: int
  fan_in: tuple[int, ...]
  fan_out: tuple[int, ...]
  head_axis: int | None = None

  def __post_init__(self):
    axes = self.fan_in + self.fan_out
    if not self.fan_in or not self.fan_out:
      raise ValueError(f"MatrixView: fan_in and fan_out must be non-empty, got {self}")
    if len(set(axes)) != len(axes) or not all(0 <= a < self.ndim for a in axes):
      raise ValueError(f"MatrixView: fan_in/fan_out must be distinct axes in [0, {self.ndim}), got {self}")
    if self.head_axis is not None and (self.head_axis not in axes or len(axes) < 3):
      raise ValueError(f"MatrixView: head_axis must be one of several fan axes, got {self}")

  @property
  def batch(self) -> tuple[int, ...]:
    return tuple(a for a in range(self.ndim) if a not in self.fan_in + self.fan_out)

  def per_head(self) -> MatrixView:
    """The view with the head axis moved to the batch axes (no-op without one)."""
    if self.head_axis is None:
      return self
    drop = lambda axes: tuple(a for a in axes if a != self.head_axis)
    return MatrixView(self.ndim, drop(self.fan_in), drop(self.fan_out))

  def stacked(self, n: int) -> MatrixView:
    """The view of the same leaf with n extra leading (layer) axes, which are batch."""
    shift = lambda axes: tuple(a + n for a in axes)
    head = None if self.head_axis is None else self.head_axis + n
    return MatrixView(self.ndim + n, shift(self.fan_in), shift(self.fan_out), head)

  def matrix_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
    """(batch, m, n) for a leaf of this shape."""
    size = lambda axes: math.prod(shape[a] for a in axes)
    return size(self.batch), size(self.fan_in), size(self.fan_out)

  def to_matrices(self, x: jax.Array) -> jax.Array:
    """Leaf -> [batch, fan_in, fan_out]."""
    return jnp.transpose(x, self.batch + self.fan_in + self.fan_out).reshape(self.matrix_shape(x.shape))

  def from_matrices(self, y: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Inverse of to_matrices for a leaf of `shape`."""
    order = self.batch + self.fan_in + self.fan_out
    y = y.reshape(tuple(shape[a] for a in order))
    return jnp.transpose(y, tuple(order.index(a) for a in range(self.ndim)))


def last_two_axes(ndim: int) -> MatrixView:
  """[..., fan_in, fan_out] with every leading axis batched (plain 2-D weights)."""
  return MatrixView(ndim, (ndim - 2,), (ndim - 1,))


@dataclasses.dataclass(frozen=True)
class Rule:
  """Leaves whose path matches `pattern` (re.search) get `label`; Muon rules need a view."""
  pattern: str
  label: Literal["muon", "adam"]
  view: MatrixView | None = None

  def __post_init__(self):
    if self.label not in LABELS:
      raise ValueError(f"Rule.label must be one of {LABELS}, got {self.label!r} for {self.pattern!r}")
    if (self.label == MUON) != (self.view is not None):
      raise ValueError(f"Rule.view: a '{MUON}' rule needs a MatrixView and an '{ADAM}' rule none ({self.pattern!r})")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule.pattern {self.pattern!r} is not a regex: {e}") from None


# [d, H, Dh] projections whose heads are separate outputs: per-head is meaningful.
_HEADS_OUT = MatrixView(3, fan_in=(0,), fan_out=(1, 2), head_axis=1)
# o_proj [H, Dh, d] sums over heads, so it stays one [H*Dh, d] matrix.
_HEADS_IN = MatrixView(3, fan_in=(0, 1), fan_out=(2,))
_DENSE = MatrixView(2, fan_in=(0,), fan_out=(1,))

DEFAULT_RULES: tuple[Rule, ...] = (
    # Guards first so that a broad user rule appended later can never capture them.
    Rule(r"(^|/)embed/", ADAM),
    Rule(r"(^|/)lm_head/", ADAM),
    Rule(r"(^|/)attn/(q|k|v|r)_proj/kernel$", MUON, _HEADS_OUT),
    Rule(r"(^|/)attn/o_proj/kernel$", MUON, _HEADS_IN),
    Rule(r"(^|/)mlp/(gate|up|down)_proj/kernel$", MUON, _DENSE),
    # Listed for readability; unmatched leaves go to AdamW anyway.
    Rule(r"norm/scale$", ADAM),
    Rule(r"(^|/)bias$", ADAM),
    Rule(r"(^|/)attn/log_bandwidth$", ADAM),
    Rule(r"(^|/)attn/gate/", ADAM),
)


def path_str(path: Sequence[Any]) -> str:
  """A jax key path as 'a/b/0/c'.

  A trailing `.value` attribute is dropped: it is flax's metadata box (nn.Partitioned from
  nn.with_logical_partitioning), and keeping it would make boxed params miss every rule.
  """
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class Routing:
  """The rule table plus how stacked layers and per-head mode are read.

  stacked: paths matching it carry one leading layer axis (nn.scan), which is batched.
  unmatched: "adam" sends leaves no rule claims to AdamW; "error" raises instead.
  """
  rules: tuple[Rule, ...] = DEFAULT_RULES
  stacked: str = r"(^|/)layers/"
  per_head: bool = False
  unmatched: Literal["adam", "error"] = ADAM

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))
    if not all(isinstance(r, Rule) for r in self.rules):
      raise ValueError("Routing.rules must be a sequence of Rule")
    if self.unmatched not in (ADAM, "error"):
      raise ValueError(f"Routing.unmatched must be 'adam' or 'error', got {self.unmatched!r}")

  def with_rules(self, *rules: Rule) -> Routing:
    """A copy whose rules are `rules` followed by the current ones (so they win)."""
    return dataclasses.replace(self, rules=tuple(rules) + self.rules)

  def rule(self, path: str) -> Rule | None:
    return next((r for r in self.rules if re.search(r.pattern, path)), None)

  def label(self, path: str) -> str:
    r = self.rule(path)
    if r is None and self.unmatched == "error":
      raise ValueError(f"Routing: no rule matches parameter {path!r} (unmatched='error')")
    return ADAM if r is None else r.label

  def view(self, path: str, shape: Sequence[int]) -> MatrixView:
    """The matrix view of a Muon leaf, checked against its shape."""
    r = self.rule(path)
    if r is None or r.view is None:
      raise ValueError(f"Routing: parameter {path!r} is not routed to Muon, so it has no matrix view")
    view = r.view.per_head() if self.per_head else r.view
    n_stack = 1 if re.search(self.stacked, path) else 0
    if len(shape) != view.ndim + n_stack:
      what = "stacked (one leading layer axis) " if n_stack else ""
      raise ValueError(f"Routing: {path!r} has shape {tuple(shape)} but rule {r.pattern!r} expects a "
                       f"{what}rank-{view.ndim + n_stack} leaf; fix the rule or Routing.stacked")
    return view.stacked(n_stack)


def param_labels(params, routing: Routing | None = None):
  """The tree of 'muon' / 'adam' labels (what optax.partition sees)."""
  routing = routing or Routing()
  return jax.tree_util.tree_map_with_path(lambda p, _: routing.label(path_str(p)), params)


def matrix_views(params, routing: Routing | None = None):
  """A tree of MatrixView for Muon leaves and None for AdamW leaves."""
  routing = routing or Routing()

  def one(p, x):
    path = path_str(p)
    return routing.view(path, jnp.shape(x)) if routing.label(path) == MUON else None

  return jax.tree_util.tree_map_with_path(one, params)


def describe(params, routing: Routing | None = None) -> str:
  """One line per leaf: path, shape, label, matrix shape, and the rule that decided."""
  routing = routing or Routing()
  lines = []
  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = path_str(p)
    label, r = routing.label(path), routing.rule(path)
    mat = ""
    if label == MUON:
      b, m, n = routing.view(path, jnp.shape(x)).matrix_shape(jnp.shape(x))
      mat = f"{b} x [{m}, {n}]"
    rule = r.pattern if r is not None else "<unmatched>"
    lines.append(f"{path:48s} {str(tuple(jnp.shape(x))):20s} {label:5s} {mat:18s} {rule}")
  return "\n".join(lines)
