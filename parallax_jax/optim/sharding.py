"""Keep Newton-Schulz free of collectives when the parameters are sharded.

Left alone, XLA shards X X^T along the parameter's FSDP axis and puts an all-gather or
all-reduce into every matmul of every iteration. Instead, a batch of matrices
[B, m, n] is laid out once so that each device holds whole matrices, the iteration
runs locally, and the result is laid out back (a local slice for "replicate", one
all-to-all for "distribute").

The mesh is read from the array's abstract type (jax.typeof(x).sharding.mesh), which
jit fills in from the inputs' shardings, so no mesh has to be passed in.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

ShardStrategy = Literal["distribute", "replicate", "none"]
SHARD_STRATEGIES = ("distribute", "replicate", "none")


def _mesh_axes(x: jax.Array):
  """(mesh, usable axis names) or (None, ()) when x is not on a multi-device mesh."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not mesh.axis_names or math.prod(mesh.axis_sizes) == 1:
    return None, ()
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  if any(t == AxisType.Manual for t in types.values()):
    return None, ()  # inside shard_map the caller owns the layout
  return mesh, tuple(n for n in mesh.axis_names if dict(zip(mesh.axis_names, mesh.axis_sizes))[n] > 1)


def _explicit_mesh(x: jax.Array):
  mesh, _ = _mesh_axes(x)
  return mesh if mesh is not None and all(t == AxisType.Explicit for t in mesh.axis_types) else None


def unshard(x: jax.Array) -> jax.Array:
  """Under Explicit mesh axes, replicate x so reshapes and concatenations are legal
  (explicit sharding rejects the implicit collectives they would need); else x."""
  return x if _explicit_mesh(x) is None else jax.sharding.reshard(x, P())


def reshard_like(y: jax.Array, like: jax.Array) -> jax.Array:
  """Under Explicit mesh axes, give y the sharding of `like`; else y (XLA propagates)."""
  return y if _explicit_mesh(like) is None else jax.sharding.reshard(y, jax.typeof(like).sharding.spec)


def _place(x: jax.Array, mesh, spec: P) -> jax.Array:
  if all(t == AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def local_matrices(x: jax.Array, strategy: ShardStrategy) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
  """Lay out x [B, m, n] so each device holds whole matrices.

  Returns (x laid out, undo) where undo(y) restores the original batch size and pins
  y to the same layout (so propagation cannot push the parameter's sharding back
  into the iteration).
  distribute: pad B with zero matrices to a multiple of the device count and shard
    B: every device orthogonalises B/devices matrices (zeros stay zeros).
  replicate: every device gathers and orthogonalises all B matrices.
  none: leave the layout to XLA (collectives inside the iteration when sharded).
  """
  mesh, axes = _mesh_axes(x) if strategy != "none" else (None, ())
  if mesh is None:
    return x, lambda y: y
  if strategy == "replicate":
    spec = P()
    return _place(x, mesh, spec), lambda y: _place(y, mesh, spec)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  n_dev = math.prod(sizes[a] for a in axes)
  b = x.shape[0]
  pad = -b % n_dev
  if pad:
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
  spec = P(axes, None, None)
  # Explicit axes forbid slicing a sharded axis, hence unshard (a no-op under Auto).
  return _place(x, mesh, spec), lambda y: unshard(_place(y, mesh, spec))[:b]
