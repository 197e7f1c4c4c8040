"""Hugging Face Qwen3 checkpoints (config.json + safetensors): load into `Qwen3Model`, export.

    config, params = load_hf_checkpoint("path/to/Qwen3-0.6B", attention="parallax")
    save_hf_checkpoint("out/qwen3", config, params)      # a softmax model -> transformers Qwen3

The softmax checkpoint becomes a Parallax model by adding W_R (`attn/r_proj/kernel`), zero by
default, so that the logits equal the transformers Qwen3 implementation exactly; fine-tune
from there. `r_init="like_q"` instead draws W_R like W_Q (rng from `seed`).

Safetensors are read and written here with numpy (8-byte header length, JSON header, raw
little-endian tensors; bfloat16 via ml_dtypes), so no torch or `safetensors` package is
needed. Sharded checkpoints (`model.safetensors.index.json`) are read.

The per-layer tensor mapping (`layer_specs`) is shared with the fla Parallax format
(`parallax_jax.models.fla`): both store torch `nn.Linear` weights [out, in] under
`model.layers.{i}.` and differ only in names.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from parallax_jax.models.config import ModelConfig
from parallax_jax.models.qwen3 import abstract_params, init_params

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def _hf_err(key, msg, source="Hugging Face config.json"):
  raise ValueError(f"{source}: {key}: {msg}")


# --------------------------------------------------------------------------- safetensors
def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as numpy arrays (memory-mapped, read-only).

  A file that is not safetensors raises a one-line ValueError naming the file (and the
  tensor whose header entry is wrong)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path}: not a safetensors file ({size} bytes, no 8-byte header length)")
    n = int.from_bytes(head, "little")
    if n > size - 8:
      raise ValueError(f"{path}: not a safetensors file (header length {n} exceeds the file's "
                       f"{size} bytes)")
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
    raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: not a safetensors file (header is a {type(header).__name__}, "
                     "not a JSON object)")
  base = 8 + n
  mm = np.memmap(path, dtype=np.uint8, mode="r") if size > base else np.zeros(0, np.uint8)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: tensor {name!r}: header entry {info!r} needs dtype, shape and "
                       "data_offsets [start, end]") from None
    if not (isinstance(dtype, str) and all(type(k) is int and k >= 0 for k in shape)):
      raise ValueError(f"{path}: tensor {name!r}: header entry {info!r} needs a dtype name and "
                       "a shape of non-negative ints (corrupt header)")
    if dtype not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
    dt = np.dtype(_ST_DTYPES[dtype])
    nbytes = math.prod(shape) * dt.itemsize
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start
            and end - start == nbytes and base + end <= size):
      raise ValueError(f"{path}: tensor {name!r}: data_offsets [{start}, {end}] do not hold "
                       f"{dtype} {shape} ({nbytes} bytes) within the file's {size - base} data "
                       "bytes (truncated or corrupt)")
    out[name] = mm[base + start:base + end].view(dt).reshape(shape)
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata=None) -> str:
  """Write numpy arrays as one .safetensors file (names sorted, header padded to 8 bytes)."""
  header, offset, names = {}, 0, sorted(tensors)
  for name in names:
    a = tensors[name]
    if np.dtype(a.dtype) not in _ST_NAMES:
      raise ValueError(f"write_safetensors: tensor {name} has unsupported dtype {a.dtype}")
    header[name] = {"dtype": _ST_NAMES[np.dtype(a.dtype)], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  header["__metadata__"] = {"format": "pt", **(metadata or {})}
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for name in names:
      f.write(np.ascontiguousarray(tensors[name]).astype(tensors[name].dtype, copy=False)
              .tobytes())
  return path


def _read_json(path: str, what: str) -> Any:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file ({what})")
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_hf_weights(path: str) -> dict[str, np.ndarray]:
  """Tensors of a checkpoint directory (model.safetensors or a sharded index)."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    wm = _read_json(index, "safetensors index")
    if not isinstance(wm, dict) or not isinstance(wm.get("weight_map"), dict):
      raise ValueError(f"{index}: weight_map: missing or not an object")
    files = sorted(set(wm["weight_map"].values()))
    bad = [f for f in files if not isinstance(f, str) or not f]
    if bad:
      raise ValueError(f"{index}: weight_map: file names must be strings, got {bad[0]!r}")
    for name in files:
      if not os.path.isfile(os.path.join(path, name)):
        raise FileNotFoundError(f"{os.path.join(path, name)}: no such file (listed in {index})")
  else:
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"no .safetensors files in {path}")
  out = {}
  for name in files:
    out.update(read_safetensors(os.path.join(path, name)))
  return out


# --------------------------------------------------------------------------- config
def config_from_hf(hf: dict[str, Any], *, source: str = "Hugging Face config.json",
                   **overrides) -> ModelConfig:
  """ModelConfig from a transformers Qwen3 config.json dict (+ ModelConfig overrides, e.g.
  attention='parallax', dtype='float32', scan_layers=True). `source` names the file in
  errors."""
  err = lambda key, msg: _hf_err(key, msg, source)

  def num(key, kind, default=None):
    v = hf.get(key)
    if v is None:
      if default is None:
        err(key, "missing (a Qwen3 config.json needs it)")
      return default
    try:
      if isinstance(v, bool) or (kind is int and float(v) != int(v)):
        raise ValueError
      return kind(v)
    except (TypeError, ValueError):
      err(key, f"must be {'an int' if kind is int else 'a number'}, got {v!r}")

  if not isinstance(hf, dict):
    raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
  mt = hf.get("model_type", "qwen3")
  if mt != "qwen3":
    err("model_type", f"expected 'qwen3', got {mt!r}")
  if hf.get("attention_bias", False):
    err("attention_bias", "q/k/v/o biases are not supported (Qwen3 has none)")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    err("hidden_act", f"only 'silu' (SwiGLU) is supported, got {act!r}")
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for key, v in (("rope_parameters", rope), ("rope_scaling", scaling)):
    if not isinstance(v, dict):
      err(key, f"must be an object, got {v!r}")
  rope_type = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type", "default")
  if rope_type != "default":
    err("rope_scaling", f"only default RoPE is supported, got rope_type {rope_type!r}")
  # transformers >= 5 nests it in rope_parameters; its Qwen3Config default is 10000
  theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
  heads, layers = num("num_attention_heads", int), num("num_hidden_layers", int)
  window = None
  # transformers: a layer slides iff use_sliding_window, sliding_window is not null (4096 if
  # absent) and its layer_types entry says so (absent: the layers from max_window_layers on)
  if hf.get("use_sliding_window", False) and hf.get("sliding_window", 4096) is not None:
    layer_types = hf.get("layer_types")
    if layer_types is None:
      first = num("max_window_layers", int, 28)
      layer_types = ["sliding_attention" if i >= first else "full_attention"
                     for i in range(layers)]
    if not isinstance(layer_types, list) or len(layer_types) != layers:
      err("layer_types", f"must be a list of {layers} layer types, got {layer_types!r}")
    sliding = {lt == "sliding_attention" for lt in layer_types}
    if len(sliding) > 1:
      err("layer_types", "mixed sliding / full layers are not supported")
    if sliding == {True}:
      window = num("sliding_window", int, 4096)
  kw = dict(
      vocab_size=num("vocab_size", int), hidden_size=num("hidden_size", int),
      num_layers=layers, num_heads=heads,
      num_kv_heads=num("num_key_value_heads", int, heads),
      head_dim=num("head_dim", int, 128),  # Qwen3Config's default, not hidden / heads
      intermediate_size=num("intermediate_size", int),
      max_seq_len=num("max_position_embeddings", int, 40960), rope_theta=float(theta),
      rms_norm_eps=num("rms_norm_eps", float, 1e-6),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=num("initializer_range", float, 0.02), window=window,
      attention="parallax")
  kw.update(overrides)
  try:
    return ModelConfig(**kw)
  except ValueError as e:
    key, _, rest = str(e).partition(": ")
    key = key.removeprefix("ModelConfig.")
    if key in overrides:  # the caller's value, not the file's: do not blame the file
      raise ValueError(f"{key}={overrides[key]!r} (an override of {source}): {rest}") from None
    raise ValueError(f"{source}: {e}") from None


def config_to_hf(config: ModelConfig, *, dtype: str = "float32", eos_id: int | None = None,
                 bos_id: int | None = None) -> dict[str, Any]:
  """transformers Qwen3 config.json for `config`'s shapes (softmax attention)."""
  cfg = config
  sliding = cfg.window is not None
  return {
      "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.resolved_head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
      "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
      # transformers 5 reads rope_parameters, 4.x rope_theta: both, with one value
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "attention_bias": False, "attention_dropout": 0.0,
      "use_sliding_window": sliding, "sliding_window": cfg.window,
      "max_window_layers": 0 if sliding else cfg.num_layers,
      "layer_types": [("sliding_attention" if sliding else "full_attention")] * cfg.num_layers,
      "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None, "use_cache": True,
      "dtype": dtype, "torch_dtype": dtype,
  }


# --------------------------------------------------------------------------- tensor names
# One entry per tensor of a decoder layer: (name in the format tables below, path inside
# this model's layer, torch shape, ours -> torch, torch -> ours).
Spec = tuple[str, tuple[str, ...], tuple[int, ...], Callable, Callable]

# Per-layer names (after "model.layers.{i}.") and whole-model names of each format.
HF_LAYER_NAMES = {
    "q_proj": "self_attn.q_proj.weight", "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight", "o_proj": "self_attn.o_proj.weight",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
    "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight", "input_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
}
HF_MODEL_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
                  "lm_head": "lm_head.weight"}


def layer_specs(config: ModelConfig) -> list[Spec]:
  """How each tensor of one decoder layer maps to a torch nn.Linear / norm weight."""
  d, hq, hkv, dh, f = (config.hidden_size, config.num_heads, config.num_kv_heads,
                       config.resolved_head_dim, config.intermediate_size)
  same = lambda a: a
  tr = lambda a: a.T

  def proj(heads):  # [d, H, Dh] <-> torch [H*Dh, d]
    return ((heads * dh, d), lambda a: a.reshape(d, heads * dh).T,
            lambda w: w.T.reshape(d, heads, dh))

  specs = [
      ("q_proj", ("attn", "q_proj", "kernel"), *proj(hq)),
      ("k_proj", ("attn", "k_proj", "kernel"), *proj(hkv)),
      ("v_proj", ("attn", "v_proj", "kernel"), *proj(hkv)),
      ("o_proj", ("attn", "o_proj", "kernel"), (d, hq * dh),
       lambda a: a.reshape(hq * dh, d).T, lambda w: w.T.reshape(hq, dh, d)),
      ("q_norm", ("attn", "q_norm", "scale"), (dh,), same, same),
      ("k_norm", ("attn", "k_norm", "scale"), (dh,), same, same),
      ("gate_proj", ("mlp", "gate_proj", "kernel"), (f, d), tr, tr),
      ("up_proj", ("mlp", "up_proj", "kernel"), (f, d), tr, tr),
      ("down_proj", ("mlp", "down_proj", "kernel"), (d, f), tr, tr),
      ("input_norm", ("input_norm", "scale"), (d,), same, same),
      ("post_attn_norm", ("post_attn_norm", "scale"), (d,), same, same),
  ]
  if config.has_probe_params:
    specs.append(("r_proj", ("attn", "r_proj", "kernel"), *proj(hq)))
    if config.r_norm:
      specs.append(("r_norm", ("attn", "r_norm", "scale"), (dh,), same, same))
  return specs


def _check_shape(name, arr, shape, source="checkpoint"):
  if tuple(arr.shape) != tuple(shape):
    # the embedding / lm_head rows are the vocabulary: name the key that sets them
    keys = ("vocab_size / hidden_size" if "embed" in name or "lm_head" in name
            else "head_dim / num_heads / num_kv_heads")
    raise ValueError(f"{source}: tensor {name}: shape {tuple(arr.shape)} does not match the "
                     f"config's {tuple(shape)} (check {keys})")


def _lookup(tree, key):
  for k in key:
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree


def weights_to_params(weights: dict[str, np.ndarray], config: ModelConfig, layer_names: dict,
                      model_names: dict, *, seed: int = 0, source: str = "checkpoint") -> dict:
  """A torch-layout tensor dict (names from `layer_names` / `model_names`) -> this model's
  unboxed param tree in param_dtype. Tensors the format has no name for (W_R in a Qwen3
  checkpoint, log_bandwidth, gate) come from `init_params`; unused tensors raise."""
  cfg = config
  d, v_ = cfg.hidden_size, cfg.vocab_size
  used = set()

  def get(name, shape):
    if name not in weights:
      raise ValueError(f"{source}: no tensor {name!r} (the config needs it)")
    arr = np.asarray(weights[name])
    _check_shape(name, arr, shape, source)
    used.add(name)
    return arr.astype(np.float32)

  def layer(i):
    out: dict = {}
    for key, path, shape, _, from_torch in layer_specs(cfg):
      if key not in layer_names:
        continue
      node = out
      for k in path[:-1]:
        node = node.setdefault(k, {})
      node[path[-1]] = from_torch(get(f"model.layers.{i}.{layer_names[key]}", shape))
    return out

  loaded = {
      "embed": {"embedding": get(model_names["embed"], (v_, d))},
      "final_norm": {"scale": get(model_names["final_norm"], (d,))},
  }
  if not cfg.tie_embeddings:
    loaded["lm_head"] = {"kernel": get(model_names["lm_head"], (v_, d)).T}
  layers = [layer(i) for i in range(cfg.num_layers)]
  if cfg.scan_layers:
    loaded["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  else:
    for i, lp in enumerate(layers):
      loaded[f"layers_{i}"] = lp
  extra = [n for n in weights if n not in used and "rotary_emb" not in n and not (
      cfg.tie_embeddings and n == model_names["lm_head"])]
  if extra:
    raise ValueError(f"{source}: tensors not used by the model: {sorted(extra)[:8]}"
                     f"{' ...' if len(extra) > 8 else ''}")

  # Parameters the checkpoint does not have (W_R, bandwidth, gate) come from the initialiser,
  # jitted so that XLA drops the initialisation of everything else.
  abstract = abstract_params(cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  keys = [tuple(k.key for k in path) for path, _ in leaves]
  missing = [key for key in keys if _lookup(loaded, key) is None]

  @jax.jit
  def fresh_leaves():
    fresh = init_params(cfg, jax.random.key(seed))
    return [_lookup(fresh, key) for key in missing]

  fresh = dict(zip(missing, fresh_leaves())) if missing else {}
  out = []
  for key, (_, ab) in zip(keys, leaves):
    if key in fresh:
      out.append(fresh[key])
    else:
      arr = _lookup(loaded, key)
      _check_shape("/".join(key), arr, ab.shape, source)
      out.append(jnp.asarray(arr, cfg.weight_dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def convert_hf_weights(weights: dict[str, np.ndarray], config: ModelConfig, *,
                       seed: int = 0, source: str = "checkpoint") -> dict:
  """transformers Qwen3 tensor dict -> this model's (unboxed) param tree, in param_dtype.

  Tensors the checkpoint lacks (W_R, log_bandwidth, gate) come from `init_params` (W_R = 0
  with r_init='zeros'; gate kernel 0). Unused checkpoint tensors raise, unless they are
  rotary caches.
  """
  return weights_to_params(weights, config, HF_LAYER_NAMES, HF_MODEL_NAMES, seed=seed,
                           source=source)


def read_hf_config(path: str, **overrides) -> ModelConfig:
  """ModelConfig of a Hugging Face Qwen3 directory's config.json (+ overrides); errors name
  the file."""
  cfg_path = os.path.join(path, "config.json")
  return config_from_hf(_read_json(cfg_path, "Hugging Face config"), source=cfg_path,
                        **overrides)


def read_hf_eos_ids(path: str) -> list[int] | None:
  """The ids that end a sequence: `eos_token_id` (an int or a list) of generation_config.json,
  else of config.json; None where neither names one."""
  for name in ("generation_config.json", "config.json"):
    f = os.path.join(path, name)
    if not os.path.isfile(f):
      continue
    eos = _read_json(f, "Hugging Face config").get("eos_token_id")
    if eos is None:
      continue
    ids = eos if isinstance(eos, list) else [eos]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                          for i in ids):
      raise ValueError(f"{f}: eos_token_id: expected an id or a list of ids, got {eos!r}")
    return ids
  return None


def load_hf_checkpoint(path: str, *, seed: int = 0, **overrides):
  """(config, params) from a Hugging Face Qwen3 directory; overrides go to ModelConfig
  (default attention='parallax' with W_R = 0, i.e. exactly the softmax model).

  Compute is in the config's `dtype`, bfloat16 unless overridden: bf16 logits differ from
  transformers' float32 ones by about 3e-2 (tiny test models; more for deep ones); pass
  dtype='float32' to compare (observed ~3e-6). Bad files raise a one-line error naming the
  file and the key or tensor."""
  config = read_hf_config(path, **overrides)
  return config, convert_hf_weights(read_hf_weights(path), config, seed=seed, source=path)


# --------------------------------------------------------------------------- export
def layer_params(config: ModelConfig, params, i: int) -> dict:
  """Layer i's parameter subtree (indexing the stacked `layers/` tree under scan_layers)."""
  if config.scan_layers:
    return jax.tree.map(lambda a: a[i], params["layers"])
  return params[f"layers_{i}"]


def q_scales(config: ModelConfig, params, fmt: str) -> list[float]:
  """Per layer, the factor sqrt(Dh) / h that folds the bandwidth h into q_norm's scale, so
  that a format fixing the softmax scale at Dh^-0.5 computes exp(q.k / h). A learnable
  bandwidth must then be one value per layer: q_norm is shared by the heads."""
  dh = config.resolved_head_dim
  out = []
  for i in range(config.num_layers):
    if config.learnable_bandwidth:
      h = np.exp(np.asarray(layer_params(config, params, i)["attn"]["log_bandwidth"],
                            np.float64))
      if not np.allclose(h, h[0], rtol=1e-6, atol=0):
        raise ValueError(f"{fmt} export: layer {i}: attn/log_bandwidth differs across heads "
                         f"(bandwidth {h.min():.4g} .. {h.max():.4g}); the {fmt} format has one "
                         "softmax scale per layer (folded into q_norm)")
      h = float(h[0])
    else:
      h = config.resolved_bandwidth
    out.append(0.0 if math.isinf(h) else math.sqrt(dh) / h)
  return out


def params_to_weights(config: ModelConfig, params, layer_names: dict, model_names: dict, *,
                      q_scale: list[float] | None = None, dtype=None) -> dict[str, np.ndarray]:
  """This model's param tree -> a torch-layout tensor dict (the inverse of
  `weights_to_params`, for the tensors the format names). q_scale multiplies q_norm's scale
  per layer (see `q_scales`). dtype: numpy dtype of the tensors (None: the params')."""
  def cast(a, scale=None):
    a = np.asarray(a)
    out = a.astype(np.float32) * np.float32(scale) if scale is not None else a
    return out.astype(dtype if dtype is not None else a.dtype)

  out = {model_names["embed"]: cast(params["embed"]["embedding"]),
         model_names["final_norm"]: cast(params["final_norm"]["scale"])}
  if not config.tie_embeddings:
    out[model_names["lm_head"]] = cast(np.asarray(params["lm_head"]["kernel"]).T)
  specs = layer_specs(config)
  for i in range(config.num_layers):
    lp = layer_params(config, params, i)
    for key, path, _, to_torch, _ in specs:
      if key in layer_names:
        scale = q_scale[i] if key == "q_norm" and q_scale is not None else None
        out[f"model.layers.{i}.{layer_names[key]}"] = cast(to_torch(np.asarray(
            _lookup(lp, path))), scale)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def export_dtype(dtype: str | None):
  if dtype is None:
    return None
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"export dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
  return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def _nonzero_probe_layers(config: ModelConfig, params) -> list[int]:
  return [i for i in range(config.num_layers)
          if np.any(np.asarray(layer_params(config, params, i)["attn"]["r_proj"]["kernel"]))]


def write_export_dir(path: str, config_json: dict, weights: dict[str, np.ndarray],
                     tokenizer: str | None) -> str:
  """config.json + model.safetensors (+ tokenizer.json copied) into directory `path`."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_json, f, indent=2)
  write_safetensors(os.path.join(path, "model.safetensors"), weights)
  if tokenizer:
    shutil.copyfile(tokenizer, os.path.join(path, "tokenizer.json"))
  return path


def _param_dtype_name(params) -> str:
  dt = np.dtype(jax.tree.leaves(params)[0].dtype)
  return "bfloat16" if dt == np.dtype(ml_dtypes.bfloat16) else dt.name


def save_hf_checkpoint(path: str, config: ModelConfig, params, *, dtype: str | None = None,
                       eos_id: int | None = None, bos_id: int | None = None,
                       tokenizer: str | None = None) -> list[str]:
  """Write a transformers Qwen3 directory (config.json + model.safetensors) whose logits
  equal this model's (Qwen3ForCausalLM, float32). Returns notes on what was adapted.

  Softmax models export as they are; a Parallax model only when W_R is zero in every layer
  (then it is exactly its softmax part); a non-zero W_R raises, since Qwen3 has no
  correction term (use `parallax_jax.models.fla.save_fla_checkpoint`). A bandwidth h other
  than sqrt(head_dim) is folded into q_norm. dtype: 'float32' | 'bfloat16' | 'float16'
  (None: the params' dtype). tokenizer: a tokenizer.json to copy beside the weights."""
  cfg, notes = config, []
  probe, affine = cfg.resolved_probe, cfg.resolved_affine
  if affine != "constant":
    if not (probe == "learned" and affine in ("affine", "boundary")):
      raise ValueError(f"hf export: attention {cfg.attention!r} (probe {probe!r}, affine "
                       f"{affine!r}) has no Qwen3 equivalent; only softmax models (or Parallax "
                       "with W_R = 0) export to hf")
    nonzero = _nonzero_probe_layers(cfg, params)
    if nonzero:
      raise ValueError(f"hf export: W_R (attn/r_proj) is non-zero in layers {nonzero}: Qwen3 has "
                       "no Parallax correction, so it would be dropped; export to the fla format")
    notes.append("W_R is zero in every layer: the model is exactly its softmax part")
  scales = q_scales(cfg, params, "hf")
  if any(abs(s - 1.0) > 1e-12 for s in scales):
    notes.append(f"bandwidth folded into q_norm (scale x{scales[0]:.6g} in layer 0)")
  if cfg.resolved_head_norm_eps != cfg.rms_norm_eps:
    notes.append(f"q/k RMSNorm eps {cfg.resolved_head_norm_eps:g} written as Qwen3's one "
                 f"rms_norm_eps {cfg.rms_norm_eps:g}: logits differ slightly")
  dt = export_dtype(dtype)
  weights = params_to_weights(cfg, params, HF_LAYER_NAMES, HF_MODEL_NAMES, q_scale=scales,
                              dtype=dt)
  name = dtype or _param_dtype_name(params)
  write_export_dir(path, config_to_hf(cfg, dtype=name, eos_id=eos_id, bos_id=bos_id), weights,
                   tokenizer)
  return notes
