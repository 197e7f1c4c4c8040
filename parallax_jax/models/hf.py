"""Load a Hugging Face Qwen3 checkpoint (config.json + safetensors) into `Qwen3Model`.

    config, params = load_hf_checkpoint("path/to/Qwen3-0.6B", attention="parallax")

The softmax checkpoint becomes a Parallax model by adding W_R (`attn/r_proj/kernel`), zero by
default, so that the logits equal the transformers Qwen3 implementation exactly; fine-tune
from there. `r_init="like_q"` instead draws W_R like W_Q (rng from `seed`).

Safetensors are parsed here with numpy (8-byte header length, JSON header, raw little-endian
tensors; bfloat16 via ml_dtypes), so no torch or `safetensors` package is needed. Sharded
checkpoints (`model.safetensors.index.json`) are supported.
"""
from __future__ import annotations

import json
import os
from typing import Any

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


def _hf_err(key, msg):
  raise ValueError(f"Hugging Face config.json: {key}: {msg}")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as numpy arrays (memory-mapped, read-only)."""
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  base = 8 + n
  mm = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    dt = np.dtype(_ST_DTYPES[info["dtype"]])
    out[name] = mm[base + start:base + end].view(dt).reshape(info["shape"])
  return out


def read_hf_weights(path: str) -> dict[str, np.ndarray]:
  """Tensors of a checkpoint directory (model.safetensors or a sharded index)."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"no .safetensors files in {path}")
  out = {}
  for name in files:
    out.update(read_safetensors(os.path.join(path, name)))
  return out


def config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
  """ModelConfig from a transformers Qwen3 config.json dict (+ ModelConfig overrides, e.g.
  attention='parallax', dtype='float32', scan_layers=True)."""
  mt = hf.get("model_type", "qwen3")
  if mt != "qwen3":
    _hf_err("model_type", f"expected 'qwen3', got {mt!r}")
  if hf.get("attention_bias", False):
    _hf_err("attention_bias", "q/k/v/o biases are not supported (Qwen3 has none)")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    _hf_err("hidden_act", f"only 'silu' (SwiGLU) is supported, got {act!r}")
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling")
  rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or rope.get(
      "rope_type", "default")
  if rope_type != "default":
    _hf_err("rope_scaling", f"only default RoPE is supported, got rope_type {rope_type!r}")
  # transformers >= 5 nests it in rope_parameters; its Qwen3Config default is 10000
  theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
  window = None
  if hf.get("use_sliding_window", False):
    layer_types = hf.get("layer_types") or []
    if any(lt != "sliding_attention" for lt in layer_types):
      _hf_err("use_sliding_window", "mixed sliding / full layers are not supported")
    window = int(hf["sliding_window"])
  kw = dict(
      vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
      num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
      num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
      head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
      intermediate_size=int(hf["intermediate_size"]),
      max_seq_len=int(hf.get("max_position_embeddings", 40960)), rope_theta=float(theta),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=float(hf.get("initializer_range", 0.02)), window=window,
      attention="parallax")
  kw.update(overrides)
  return ModelConfig(**kw)


def _check_shape(name, arr, shape):
  if tuple(arr.shape) != tuple(shape):
    raise ValueError(f"checkpoint tensor {name}: shape {tuple(arr.shape)} does not match the "
                     f"config's {tuple(shape)} (check head_dim / num_heads / num_kv_heads)")


def convert_hf_weights(weights: dict[str, np.ndarray], config: ModelConfig, *,
                       seed: int = 0) -> dict:
  """transformers Qwen3 tensor dict -> this model's (unboxed) param tree, in param_dtype.

  Tensors the checkpoint lacks (W_R, log_bandwidth, gate) come from `init_params` (W_R = 0
  with r_init='zeros'; gate kernel 0). Unused checkpoint tensors raise, unless they are
  rotary caches.
  """
  cfg = config
  d, hq, hkv, dh, f, v_ = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                           cfg.resolved_head_dim, cfg.intermediate_size, cfg.vocab_size)
  pdt = cfg.weight_dtype
  used = set()

  def get(name, shape):
    if name not in weights:
      raise KeyError(f"checkpoint has no tensor {name!r}")
    arr = np.asarray(weights[name])
    _check_shape(name, arr, shape)
    used.add(name)
    return arr.astype(np.float32)

  def layer(i):
    p = f"model.layers.{i}."
    return {
        "attn": {
            "q_proj": {"kernel": get(p + "self_attn.q_proj.weight", (hq * dh, d)).T.reshape(
                d, hq, dh)},
            "k_proj": {"kernel": get(p + "self_attn.k_proj.weight", (hkv * dh, d)).T.reshape(
                d, hkv, dh)},
            "v_proj": {"kernel": get(p + "self_attn.v_proj.weight", (hkv * dh, d)).T.reshape(
                d, hkv, dh)},
            "o_proj": {"kernel": get(p + "self_attn.o_proj.weight", (d, hq * dh)).T.reshape(
                hq, dh, d)},
            "q_norm": {"scale": get(p + "self_attn.q_norm.weight", (dh,))},
            "k_norm": {"scale": get(p + "self_attn.k_norm.weight", (dh,))},
        },
        "mlp": {
            "gate_proj": {"kernel": get(p + "mlp.gate_proj.weight", (f, d)).T},
            "up_proj": {"kernel": get(p + "mlp.up_proj.weight", (f, d)).T},
            "down_proj": {"kernel": get(p + "mlp.down_proj.weight", (d, f)).T},
        },
        "input_norm": {"scale": get(p + "input_layernorm.weight", (d,))},
        "post_attn_norm": {"scale": get(p + "post_attention_layernorm.weight", (d,))},
    }

  loaded = {
      "embed": {"embedding": get("model.embed_tokens.weight", (v_, d))},
      "final_norm": {"scale": get("model.norm.weight", (d,))},
  }
  if not cfg.tie_embeddings:
    loaded["lm_head"] = {"kernel": get("lm_head.weight", (v_, d)).T}
  layers = [layer(i) for i in range(cfg.num_layers)]
  if cfg.scan_layers:
    loaded["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  else:
    for i, lp in enumerate(layers):
      loaded[f"layers_{i}"] = lp
  extra = [n for n in weights if n not in used and "rotary_emb" not in n and not (
      cfg.tie_embeddings and n == "lm_head.weight")]
  if extra:
    raise ValueError(f"checkpoint tensors not used by the model: {sorted(extra)[:8]}"
                     f"{' ...' if len(extra) > 8 else ''}")

  # Parameters the checkpoint does not have (W_R, bandwidth, gate) come from the initialiser,
  # jitted so that XLA drops the initialisation of everything else.
  abstract = abstract_params(cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  keys = [tuple(k.key for k in path) for path, _ in leaves]

  def lookup(tree, key):
    for k in key:
      if not isinstance(tree, dict) or k not in tree:
        return None
      tree = tree[k]
    return tree

  missing = [key for key in keys if lookup(loaded, key) is None]

  @jax.jit
  def fresh_leaves():
    fresh = init_params(cfg, jax.random.key(seed))
    return [lookup(fresh, key) for key in missing]

  fresh = dict(zip(missing, fresh_leaves())) if missing else {}
  out = []
  for key, (_, ab) in zip(keys, leaves):
    if key in fresh:
      out.append(fresh[key])
    else:
      arr = lookup(loaded, key)
      _check_shape("/".join(key), arr, ab.shape)
      out.append(jnp.asarray(arr, pdt))
  return jax.tree_util.tree_unflatten(treedef, out)


def load_hf_checkpoint(path: str, *, seed: int = 0, **overrides):
  """(config, params) from a Hugging Face Qwen3 directory; overrides go to ModelConfig
  (default attention='parallax' with W_R = 0, i.e. exactly the softmax model)."""
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  config = config_from_hf(hf, **overrides)
  return config, convert_hf_weights(read_hf_weights(path), config, seed=seed)
