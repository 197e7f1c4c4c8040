"""Device mesh (data x fsdp x tensor) and the one rule table mapping the model's logical axis
names (`parallax_jax.nn.layers.LOGICAL_AXIS_NAMES`) to mesh axes.

  data    pure data parallelism: batch split, parameters replicated.
  fsdp    batch split AND parameters / optimizer state split along their 'embed' axis
          (ZeRO-3 style; XLA all-gathers weights per use and reduce-scatters gradients).
  tensor  Megatron-style: heads, MLP width and vocab split; activations' head / mlp axes
          follow.

Multi-host: call `jax.distributed.initialize()` (train/__main__.py does when
`JAX_COORDINATOR_ADDRESS` or a cluster environment is present) before building the mesh;
`jax.devices()` then lists every host's devices and the same code path runs.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train.config import MeshConfig

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_q_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("cache_length", None),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                       f"(product {known}) of {dict(zip(AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are "
                     f"{num_devices} devices; set one axis to -1 or match the device count")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # noqa: BLE001 - odd device counts on CPU: plain reshape
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, AXES)


def _axis_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(mesh.shape[n] for n in names)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drop mesh axes from dimensions they do not divide (e.g. 2 KV heads on tensor=4):
  those dimensions stay replicated instead of failing."""
  out = []
  for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    out.append(entry if shape[i] % _axis_size(mesh, entry) == 0 else None)
  return P(*out)


def logical_to_sharding(logical_specs, abstract_tree, mesh: Mesh, rules=RULES):
  """NamedShardings for a tree of logical PartitionSpecs (matching `abstract_tree` shapes)."""
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  return jax.tree.map(lambda s, a: NamedSharding(mesh, fit_spec(s, a.shape, mesh)),
                      mesh_specs, abstract_tree,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int, leading: int = 0) -> NamedSharding:
  """Sharding of a [*leading, batch, ...] array: batch over data x fsdp."""
  return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES, *([None] * (ndim - leading - 1))))


def batch_slices(mesh: Mesh, process_of=None) -> dict[int, tuple[int, int]]:
  """{process: (data index, data count)}: which slice of the data stream each process reads
  (`data.make_dataset(process_index=, process_count=)`), and how many slices there are.

  The batch is split over data x fsdp, so processes whose devices hold the same batch shards
  (a tensor axis across processes: one process per GPU with mesh.tensor > 1, or tensor wider
  than a host) must read the SAME rows, and the others different ones; reading by process
  index fed such devices different data as one replicated array, silently. A layout where
  processes hold overlapping but different shard sets cannot be fed: a ValueError.
  process_of(device) -> process is for tests (default: the devices' processes)."""
  process_of = process_of or (lambda d: d.process_index)
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  held: dict[int, set[int]] = {}
  for d, idx in batch_sharding(mesh, 1).devices_indices_map((shards,)).items():
    held.setdefault(process_of(d), set()).add(idx[0].start or 0)
  groups = sorted({frozenset(v) for v in held.values()}, key=min)
  if sum(len(g) for g in groups) != shards or len({len(g) for g in groups}) != 1:
    where = {p: sorted(v) for p, v in sorted(held.items())}
    raise ValueError(f"mesh {dict(mesh.shape)}: the processes hold batch shards (of data x "
                     f"fsdp = {shards}) {where}: sets that overlap or differ in size cannot be "
                     f"fed one data slice each; order the devices or axes so each process "
                     f"holds whole shards")
  return {p: (groups.index(frozenset(v)), len(groups)) for p, v in held.items()}


def batch_groups(mesh: Mesh, process_of=None, me: int | None = None) -> tuple[int, int]:
  """This process's (data index, data count) of `batch_slices` (`me`: another process)."""
  return batch_slices(mesh, process_of)[jax.process_index() if me is None else me]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _dict_keys(path) -> tuple[str, ...]:
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value":
      out.append(k.name)
  return tuple(out)


def state_like_params_sharding(tree, param_shardings, params_abstract, mesh: Mesh):
  """Shardings for an optimizer-state tree: a leaf whose key path ends with a parameter's
  path and has that parameter's shape gets the parameter's sharding; anything else (counts,
  scalars, differently shaped leaves) is replicated."""
  by_path = {}
  for (p, s), a in zip(jax.tree_util.tree_flatten_with_path(param_shardings)[0],
                       jax.tree.leaves(params_abstract)):
    by_path[_dict_keys(p)] = (tuple(a.shape), s)

  def one(path, leaf):
    keys = _dict_keys(path)
    for n in range(len(keys), 0, -1):
      hit = by_path.get(keys[-n:])
      if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
        return hit[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, tree)
