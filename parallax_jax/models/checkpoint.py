"""Read model parameters from any checkpoint this project writes.

    config, params = load_checkpoint("runs/tiny")                 # newest step of a run
    config, params = load_checkpoint("runs/tiny/checkpoints/300") # one step
    config, params = load_checkpoint("export/ckpt")               # save_checkpoint's layout

Three layouts are read:
  run    `python -m train`'s run directory: `<run>/config.json` and
         `<run>/checkpoints/<step>/{state, config, ...}`; the newest committed step (one with
         orbax's `_CHECKPOINT_METADATA`), or `step=`.
  step   one `<run>/checkpoints/<step>` directory. `state` is an orbax StandardSave of
         {"step", "params", "opt_state"}; only "params" is read (orbax partial restore: the
         optimizer state is never loaded), `config` (the TrainConfig as JSON) gives the model.
  params `qwen3.save_checkpoint`'s directory: `model_config.json` + orbax params under
         `params/` (a params-only export, no optimizer state).

The model config comes from the checkpoint; a `config` argument replaces it (same parameter
shapes). When it has fewer parameters (e.g. softmax attention for a Parallax checkpoint,
dropping W_R) `drop_unused=True` is needed; a parameter it needs that the checkpoint lacks
raises. Parameters land on one device (the first), whatever mesh wrote them.

`checkpoint_data(path)` finds the run's tokenizer and eos id: the run config's `data.path`
(relative to the working directory or to the directory `run.out_dir` was relative to) holds
meta.json and tokenizer.json (train/data.py); for the params layout, a tokenizer.json beside
the checkpoint.

This module does not import `train`: it reads the layout, not the training code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from parallax_jax.models.config import ModelConfig
from parallax_jax.models.orbax_errors import quiet_leftovers, quiet_reads, read_error
from parallax_jax.models.qwen3 import CONFIG_FILE, abstract_params

__all__ = ["CheckpointSource", "find_checkpoint", "load_checkpoint", "checkpoint_data",
           "committed_steps", "param_paths", "fingerprint", "verify_fingerprint"]


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
  """Where a checkpoint's parameters and config are.

  kind: 'run' | 'step' | 'params'; params_dir: the orbax directory holding the params;
  prefix: their path inside it (("params",) in a train state, () in a params export);
  config: the stored ModelConfig; train_config: the run's TrainConfig dict (None for a
  params export); step: the step (None for a params export); run_dir: the run directory
  (None when not known)."""
  kind: str
  path: str
  params_dir: str
  prefix: tuple[str, ...]
  config: ModelConfig
  train_config: dict | None = None
  step: int | None = None
  run_dir: str | None = None


def _leaf_fingerprint(x):
  """(sum of the raw 32-bit words, sum of word * odd position weight) mod 2^32, finite?

  Integer sums wrap exactly, so the result does not depend on the reduction order or on how
  the array is sharded; any single flipped bit changes the first sum, a swap the second."""
  x = jnp.asarray(x)
  size = x.dtype.itemsize
  if x.dtype == jnp.bool_:
    u = x.astype(jnp.uint32)
  elif size >= 4:
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., size // 4] for 8-byte types
    if size > 4:
      u = jnp.bitwise_xor(u[..., 0], u[..., 1] * jnp.uint32(0x9E3779B1))
  else:
    u = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  pos = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(u.ndim)):  # the flat index, built per dimension: shards stay local
    pos = pos + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
    stride *= u.shape[d]
  s1 = jnp.sum(u, dtype=jnp.uint32)
  s2 = jnp.sum(u * (pos * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
            else jnp.bool_(True))
  return jnp.stack([s1, s2]), finite


@jax.jit
def _fingerprint_jit(state):
  sums, finite = zip(*(_leaf_fingerprint(x) for x in jax.tree.leaves(state)))
  return jnp.stack(sums), jnp.stack(finite)


def _path(p) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p)


def fingerprint(state) -> dict[str, Any]:
  """{"leaves": {path: [s1, s2]}, "nonfinite": [paths with NaN / inf]} of a state tree."""
  paths = [_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  sums, finite = jax.device_get(_fingerprint_jit(state))
  return {"version": 1,
          "leaves": {p: [int(a), int(b)] for p, (a, b) in zip(paths, np.asarray(sums))},
          "nonfinite": [p for p, ok in zip(paths, np.asarray(finite)) if not ok]}


def few(paths, n: int = 3) -> str:
  paths = list(paths)
  return ", ".join(paths[:n]) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def verify_fingerprint(tree, saved: dict | None) -> str | None:
  """None if every array of `tree` is finite and (when `saved` is a fingerprint of a tree
  holding it, e.g. the train state around params) matches its saved sums; else what is
  wrong. Paths of `tree` absent from `saved` are an error; extra saved paths are not (a
  partial restore reads a subtree)."""
  fp = fingerprint(tree)
  if fp["nonfinite"]:
    return f"it holds NaN / inf in {few(fp['nonfinite'])}"
  if saved is None:
    return None
  want = saved.get("leaves", {})
  bad = [p for p, v in fp["leaves"].items() if want.get(p) != v]
  if bad:
    return f"its arrays differ from what was saved ({few(bad)})"
  return None


def _json(path: str, what: str):
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({what}: {e})") from None


def _model_config(d: Any, source: str) -> ModelConfig:
  if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
    raise ValueError(f"{source}: model: missing (expected the TrainConfig JSON with a 'model' "
                     "section)")
  try:
    return ModelConfig.from_dict(d["model"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"{source}: model: {e}") from None


def committed_steps(checkpoints_dir: str) -> list[int]:
  """Steps under `<run>/checkpoints` that orbax committed (a crash mid-save leaves a
  temporary directory, a moved-aside one `<step>.unreadable`: neither is listed)."""
  if not os.path.isdir(checkpoints_dir):
    return []
  return sorted(int(n) for n in os.listdir(checkpoints_dir) if n.isdigit() and os.path.isfile(
      os.path.join(checkpoints_dir, n, "_CHECKPOINT_METADATA")))


def _step_config(step_dir: str) -> dict:
  """The TrainConfig dict saved with one step (its `config` item), else the run's
  config.json."""
  item = os.path.join(step_dir, "config")
  if os.path.isdir(item):
    import orbax.checkpoint as ocp
    try:
      with quiet_reads():
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item)
    except Exception as e:  # noqa: BLE001 - any read failure: say which file
      raise ValueError(f"{item}: the step's config does not read back ({read_error(e)})"
                       ) from None
  run_cfg = os.path.join(os.path.dirname(os.path.dirname(step_dir)), "config.json")
  if os.path.isfile(run_cfg):
    return _json(run_cfg, "run config")
  raise ValueError(f"{step_dir}: no config item and no {run_cfg}: cannot tell the model")


def find_checkpoint(path: str, step: int | None = None) -> CheckpointSource:
  """Which layout `path` is and where its params and config are (see the module doc)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such checkpoint directory")
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    if step is not None:
      raise ValueError(f"{path}: step={step} given, but this is a params export (one set of "
                       "parameters, no steps)")
    cfg_path = os.path.join(path, CONFIG_FILE)
    d = _json(cfg_path, "model config")  # its errors name the file already
    try:
      config = ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{cfg_path}: {e}") from None
    return CheckpointSource("params", path, os.path.join(path, "params"), (), config)
  if os.path.isdir(os.path.join(path, "state")):  # one step
    if step is not None and os.path.basename(path) != str(step):
      raise ValueError(f"{path}: is one step's directory; step={step} does not apply")
    d = _step_config(path)
    parent = os.path.dirname(path)
    run_dir = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None
    name = os.path.basename(path)
    return CheckpointSource("step", path, os.path.join(path, "state"), ("params",),
                            _model_config(d, os.path.join(path, "config")), d,
                            int(name) if name.isdigit() else None, run_dir)
  if os.path.basename(path) == "checkpoints" and not os.path.isdir(
      os.path.join(path, "checkpoints")):
    path = os.path.dirname(path)  # <run>/checkpoints given: the run
  ckdir = os.path.join(path, "checkpoints")
  if os.path.isdir(ckdir):
    steps = committed_steps(ckdir)
    if not steps:
      raise ValueError(f"{path}: a run directory with no committed checkpoint in {ckdir}")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ValueError(f"{path}: no committed checkpoint for step {step} (have {steps})")
    src = find_checkpoint(os.path.join(ckdir, str(step)))
    return dataclasses.replace(src, kind="run", path=path, run_dir=path)
  hint = ""
  if os.path.isfile(os.path.join(path, "config.json")):
    if os.path.isfile(os.path.join(path, "model.safetensors")):
      hint = " (this looks like a Hugging Face directory: use --hf)"
    elif os.path.isfile(os.path.join(path, "metrics.jsonl")):
      hint = " (a training run that has not saved a checkpoint yet: no checkpoints/)"
  raise ValueError(f"{path}: not a checkpoint{hint}: expected a training run (config.json + "
                   f"checkpoints/), one step (checkpoints/<step>/ with state/), or a "
                   f"save_checkpoint directory ({CONFIG_FILE} + params/)")


class UnusedParametersError(ValueError):
  """The config leaves out parameters the checkpoint stores (`load_checkpoint` without
  drop_unused). where: the params directory; names: the left-out parameters ('a/b/c')."""

  def __init__(self, where: str, names: list[str]):
    self.where, self.names = where, names
    super().__init__(f"{where}: the config leaves out stored parameters ({self.listed()}); "
                     "pass drop_unused=True to drop them")

  def listed(self) -> str:
    return ", ".join(self.names[:4]) + (" ..." if len(self.names) > 4 else "")


class _NoStepMetadataNote(logging.Filter):
  """Drops orbax's note that an item directory has no `_CHECKPOINT_METADATA`: a run's step
  keeps that file one level up (beside `state/`), so reading the item alone always logs it,
  for a complete checkpoint. Also its warning that an item's metadata did not read: the
  error raised for it here says more."""

  def filter(self, record):
    m = record.getMessage()
    return not (m.startswith("Metadata file does not exist")
                or m.startswith("Failed to get item metadata"))


@contextlib.contextmanager
def _quiet_item_reads():
  log = logging.getLogger("absl")
  note = _NoStepMetadataNote()
  log.addFilter(note)
  try:
    yield
  finally:
    log.removeFilter(note)


def _tree_metadata(params_dir: str) -> dict:
  """{path tuple: shape} of every array stored under an orbax pytree directory."""
  import orbax.checkpoint as ocp
  try:
    with quiet_reads(), _quiet_item_reads(), ocp.PyTreeCheckpointer() as ck:
      md = ck.metadata(params_dir)
  except Exception as e:  # noqa: BLE001 - a missing or corrupt item
    raise ValueError(f"{params_dir}: not a readable orbax checkpoint ({read_error(e)})"
                     ) from None
  tree = getattr(getattr(md, "item_metadata", md), "tree", getattr(md, "item_metadata", md))
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]
  if not flat:  # orbax reads a missing _METADATA or manifest as "no arrays", with a warning
    quiet_leftovers()  # the read failed inside orbax: its abandoned tasks report late
    raise ValueError(f"{params_dir}: not a readable orbax checkpoint (it lists no arrays: its "
                     "_METADATA or manifest.ocdbt is missing or damaged)")
  return {tuple(str(getattr(k, "key", k)) for k in p): tuple(m.shape) for p, m in flat}


def param_paths(tree) -> dict[tuple[str, ...], Any]:
  """{path tuple: leaf} of a (possibly abstract) parameter tree."""
  return {tuple(str(getattr(k, "key", k)) for k in p): leaf
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_checkpoint(path: str, config: ModelConfig | None = None, *, step: int | None = None,
                    drop_unused: bool = False, source: CheckpointSource | None = None,
                    shardings=None, fill_missing=None):
  """(config, params) from a run directory, one step, or a `save_checkpoint` directory.

  config: replaces the stored config (its parameters must be stored with the same shapes).
  step: the step of a run directory (default: the newest committed). drop_unused: allow a
  config that leaves some stored parameters out (listed in the error otherwise).
  fill_missing: for a config with parameters the checkpoint lacks (W_R of a Parallax model
  from a softmax run), `fill_missing(paths)` returns a params tree of the config's, whose
  leaves at those paths (tuples of names) are taken; without it they raise. Params
  are restored in `config.param_dtype`, on the first device or with `shardings` (a tree of
  shardings like the params). Only the parameters are read, and checked: finite, and equal
  to what was saved where the step holds a fingerprint (`integrity`, written by the loop)."""
  import orbax.checkpoint as ocp
  src = source or find_checkpoint(path, step)
  config = src.config if config is None else config
  stored = {k[len(src.prefix):]: v for k, v in _tree_metadata(src.params_dir).items()
            if k[:len(src.prefix)] == src.prefix}
  want = param_paths(abstract_params(config))
  where = src.params_dir
  missing = [k for k in want if k not in stored]
  if missing and fill_missing is None:
    raise ValueError(f"{where}: has no parameter {'/'.join(missing[0])} (needed by the config"
                     f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); was it "
                     "written for another model config?")
  for k, a in want.items():
    if k in stored and tuple(stored[k]) != tuple(a.shape):
      raise ValueError(f"{where}: parameter {'/'.join(k)} has shape {tuple(stored[k])}, the "
                       f"config's is {tuple(a.shape)}")
  extra = sorted("/".join(k) for k in stored if k not in want)
  if extra and not drop_unused:
    raise UnusedParametersError(where, extra)
  if shardings is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda a: dev, abstract_params(config))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_params(config), shardings)
  if missing:  # restore what is stored; the rest comes from fill_missing below
    flat = traverse_util.flatten_dict(target)
    target = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in missing})
  item = target
  for k in reversed(src.prefix):
    item = {k: item}
  args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                     dtype=a.dtype), item)
  try:
    with quiet_reads(), _quiet_item_reads(), ocp.PyTreeCheckpointer() as ck:
      out = ck.restore(src.params_dir, args=ocp.args.PyTreeRestore(
          item, restore_args=args, partial_restore=True))
  except Exception as e:  # noqa: BLE001 - truncated or corrupt array files
    raise ValueError(f"{where}: the parameters do not read back ({read_error(e)})") from None
  saved = None
  integrity = os.path.join(os.path.dirname(src.params_dir), "integrity")
  if src.prefix and os.path.isdir(integrity):
    try:
      with quiet_reads():
        saved = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(integrity)
    except Exception as e:  # noqa: BLE001 - a damaged fingerprint file
      raise ValueError(f"{integrity}: the step's fingerprint does not read back "
                       f"({read_error(e)})") from None
  problem = verify_fingerprint(out, saved)  # paths like the saved state's: params/...
  if problem:
    raise ValueError(f"{where}: {problem}")
  for k in src.prefix:
    out = out[k]
  if missing:
    fill = param_paths(fill_missing(missing))
    out = traverse_util.unflatten_dict(
        {**traverse_util.flatten_dict(out), **{k: fill[k] for k in missing}})
  return config, out


def _data_dir(src: CheckpointSource) -> tuple[str | None, list[str]]:
  """The run's data directory (from the run config's data.path) and the places tried."""
  data = (src.train_config or {}).get("data") or {}
  rel = data.get("path")
  if not isinstance(rel, str) or not rel:
    return None, []
  if os.path.isabs(rel):
    cands = [rel]
  else:
    cands = [os.path.abspath(rel)]
    out_dir = ((src.train_config or {}).get("run") or {}).get("out_dir")
    if src.run_dir and isinstance(out_dir, str) and not os.path.isabs(out_dir):
      # run.out_dir and data.path were relative to the same working directory
      tail = os.path.normpath(out_dir)
      if src.run_dir.endswith(os.sep + tail):
        cands.append(os.path.join(src.run_dir[:-len(tail)], rel))
  for c in cands:
    if os.path.isdir(c):
      return c, cands
  return None, cands


def checkpoint_data(src: CheckpointSource) -> dict[str, Any]:
  """{"tokenizer": tokenizer.json path or None, "eos_id": int or None, "searched": [...]}
  for a checkpoint (see the module doc)."""
  if src.kind == "params":
    tok = os.path.join(src.path, "tokenizer.json")
    return {"tokenizer": tok if os.path.isfile(tok) else None, "eos_id": None,
            "searched": [tok]}
  data, cands = _data_dir(src)
  if data is None:
    return {"tokenizer": None, "eos_id": None, "searched": cands}
  meta = {}
  if os.path.isfile(os.path.join(data, "meta.json")):
    meta = _json(os.path.join(data, "meta.json"), "data meta")
  tok = os.path.join(data, meta.get("tokenizer") or "tokenizer.json")
  eos = meta.get("eos_id")
  return {"tokenizer": tok if os.path.isfile(tok) else None,
          "eos_id": int(eos) if isinstance(eos, int) else None, "searched": [tok]}
