"""The flash-linear-attention (`fla`) Parallax model format: export to it, read it back.

    notes = save_fla_checkpoint("out/fla", config, params)   # -> ParallaxForCausalLM directory
    config, params = load_fla_checkpoint("out/fla")

fla's `ParallaxForCausalLM` (fla.models.parallax, `model_type: parallax`) is the same pre-norm
decoder as this package's Qwen3 with the learned-probe affine member: SwiGLU MLP, GQA,
per-head RMSNorm on q, r and k (`qk_norm`), rotate-half RoPE on q, k and r (r with q's
positions), softmax scale head_dim^-0.5 on q.k only (r.k unscaled), and
o = vbar - C^T r with the same sliding window (`window_size`: the `window` newest keys).
Tensor names: `model.embeddings.weight`, `model.layers.{i}.attn_norm / mlp_norm.weight`,
`model.layers.{i}.attn.{q,r,k,v,o}_proj.weight`, `model.layers.{i}.attn.{q,r,k}_norm.weight`,
`model.layers.{i}.mlp.{gate,up,down}_proj.weight`, `model.norm.weight`, `lm_head.weight`.

What fla cannot represent, so export refuses it (one-line ValueError): another attention
member (softmax: use the hf export), the correction gate, head_dim != hidden_size /
num_heads (fla derives it), a model without r_norm (fla normalizes r whenever it normalizes
q and k, and this model always normalizes q and k), and a learnable bandwidth that differs
across the heads of a layer. A bandwidth h != sqrt(head_dim) is folded into q_norm. fla's
per-head norms use eps 1e-5 whatever `norm_eps` is: a model with another
`head_norm_eps` / `rms_norm_eps` exports with a note (logits differ slightly); models read
from fla set `head_norm_eps=1e-5`, so the round trip is exact.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from parallax_jax.models import hf
from parallax_jax.models.config import ModelConfig

FLA_HEAD_NORM_EPS = 1e-5  # fla.layers.parallax builds its q/r/k RMSNorm with the default eps

FLA_LAYER_NAMES = {
    "q_proj": "attn.q_proj.weight", "r_proj": "attn.r_proj.weight",
    "k_proj": "attn.k_proj.weight", "v_proj": "attn.v_proj.weight",
    "o_proj": "attn.o_proj.weight", "q_norm": "attn.q_norm.weight",
    "r_norm": "attn.r_norm.weight", "k_norm": "attn.k_norm.weight",
    "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight", "input_norm": "attn_norm.weight",
    "post_attn_norm": "mlp_norm.weight",
}
FLA_MODEL_NAMES = {"embed": "model.embeddings.weight", "final_norm": "model.norm.weight",
                   "lm_head": "lm_head.weight"}


def _err(msg):
  raise ValueError(f"fla export: {msg}")


def check_fla_exportable(config: ModelConfig) -> list[str]:
  """Raise for what fla's Parallax model cannot represent; return notes on what is
  approximated."""
  cfg = config
  probe, affine = cfg.resolved_probe, cfg.resolved_affine
  if (probe, affine) != ("learned", "affine"):
    hint = " (a softmax model exports to the hf format)" if affine == "constant" else ""
    _err(f"fla's Parallax layer is the learned-probe affine member; this model is attention "
         f"{cfg.attention!r} (probe {probe!r}, affine {affine!r}){hint}")
  if cfg.correction_gate:
    _err("correction_gate: fla's Parallax has no gate on the correction")
  if cfg.hidden_size % cfg.num_heads or cfg.resolved_head_dim != cfg.hidden_size // cfg.num_heads:
    _err(f"head_dim {cfg.resolved_head_dim}: fla derives it as hidden_size / num_heads = "
         f"{cfg.hidden_size} / {cfg.num_heads}")
  if not cfg.r_norm:
    _err("r_norm is False: fla's Parallax normalizes r whenever it normalizes q and k "
         "(qk_norm), and this model always normalizes q and k (train with model.r_norm=true)")
  notes = []
  if cfg.resolved_head_norm_eps != FLA_HEAD_NORM_EPS:
    notes.append(f"q/k/r RMSNorm eps {cfg.resolved_head_norm_eps:g} becomes fla's fixed "
                 f"{FLA_HEAD_NORM_EPS:g}: logits differ slightly")
  return notes


def config_to_fla(config: ModelConfig, *, dtype: str = "float32", eos_id: int | None = None,
                  bos_id: int | None = None) -> dict[str, Any]:
  """fla ParallaxConfig keys (config.json) for `config`."""
  cfg = config
  return {
      "architectures": ["ParallaxForCausalLM"], "model_type": "parallax",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_layers, "num_heads": cfg.num_heads,
      "num_kv_heads": cfg.num_kv_heads, "qkv_bias": False, "qk_norm": True,
      "window_size": cfg.window, "rope_theta": cfg.rope_theta,
      "max_position_embeddings": cfg.max_seq_len, "hidden_ratio": 4,
      "intermediate_size": cfg.intermediate_size, "hidden_act": "swish",
      "initializer_range": cfg.init_std, "norm_eps": cfg.rms_norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "attnres_block_size": None,
      "fuse_norm": True, "fuse_swiglu": True, "fuse_cross_entropy": True,
      "fuse_linear_cross_entropy": False, "use_l2warp": False, "use_cache": True,
      "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None,
      "dtype": dtype, "torch_dtype": dtype,
  }


def config_from_fla(d: dict[str, Any], *, source: str = "fla config.json",
                    **overrides) -> ModelConfig:
  """ModelConfig of an fla Parallax config.json (+ ModelConfig overrides)."""
  def err(key, msg):
    raise ValueError(f"{source}: {key}: {msg}")

  if not isinstance(d, dict):
    raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
  if d.get("model_type") != "parallax":
    err("model_type", f"expected 'parallax', got {d.get('model_type')!r}")
  for key, want in (("qkv_bias", False), ("qk_norm", True), ("attnres_block_size", None)):
    if d.get(key, want) != want:
      err(key, f"{d[key]!r} is not supported (this model: {want!r})")
  if d.get("hidden_act", "swish") != "swish":
    err("hidden_act", f"only 'swish' (SwiGLU) is supported, got {d['hidden_act']!r}")

  def need(key):
    if d.get(key) is None:
      err(key, "missing (an fla Parallax config.json needs it)")
    return d[key]

  hidden, heads = int(need("hidden_size")), int(need("num_heads"))
  if hidden % heads:
    err("num_heads", f"hidden_size {hidden} is not a multiple of num_heads {heads}")
  inter = d.get("intermediate_size")
  if inter is None:  # fla's GatedMLP: 2/3 * hidden * ratio, rounded up to a multiple of 256
    inter = int(hidden * (d.get("hidden_ratio") or 4) * 2 / 3)
    inter = 256 * ((inter + 255) // 256)
  kw = dict(
      vocab_size=int(need("vocab_size")), hidden_size=hidden,
      num_layers=int(need("num_hidden_layers")), num_heads=heads,
      num_kv_heads=int(d.get("num_kv_heads") or heads), head_dim=hidden // heads,
      intermediate_size=int(inter), max_seq_len=int(d.get("max_position_embeddings") or 40960),
      rope_theta=float(need("rope_theta")), rms_norm_eps=float(d.get("norm_eps", 1e-6)),
      head_norm_eps=FLA_HEAD_NORM_EPS, tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      init_std=float(d.get("initializer_range", 0.02)), window=d.get("window_size"),
      attention="parallax", r_norm=True)
  kw.update(overrides)
  try:
    return ModelConfig(**kw)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def save_fla_checkpoint(path: str, config: ModelConfig, params, *, dtype: str | None = None,
                        eos_id: int | None = None, bos_id: int | None = None,
                        tokenizer: str | None = None) -> list[str]:
  """Write an fla `ParallaxForCausalLM` directory (config.json + model.safetensors) whose
  logits equal this model's up to the notes returned (see the module doc for what raises).
  dtype: 'float32' | 'bfloat16' | 'float16' (None: the params' dtype)."""
  notes = check_fla_exportable(config)
  if config.r_scale != 1.0:  # fla has no such factor: fold it into r's norm weight
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * np.float32(config.r_scale) if "r_norm" in jax.tree_util.keystr(p)
        else x, params)
    notes.append(f"r_scale {config.r_scale:g} folded into r_norm")
  scales = hf.q_scales(config, params, "fla")
  if any(abs(s - 1.0) > 1e-12 for s in scales):
    notes.append(f"bandwidth folded into q_norm (scale x{scales[0]:.6g} in layer 0)")
  weights = hf.params_to_weights(config, params, FLA_LAYER_NAMES, FLA_MODEL_NAMES,
                                 q_scale=scales, dtype=hf.export_dtype(dtype))
  name = dtype or hf._param_dtype_name(params)
  hf.write_export_dir(path, config_to_fla(config, dtype=name, eos_id=eos_id, bos_id=bos_id),
                      weights, tokenizer)
  return notes


def load_fla_checkpoint(path: str, **overrides):
  """(config, params) from an fla Parallax directory (config.json + safetensors), e.g. one
  `save_fla_checkpoint` wrote; overrides go to ModelConfig (e.g. dtype='float32')."""
  cfg_path = os.path.join(path, "config.json")
  config = config_from_fla(hf._read_json(cfg_path, "fla config"), source=cfg_path, **overrides)
  params = hf.weights_to_params(hf.read_hf_weights(path), config, FLA_LAYER_NAMES,
                                FLA_MODEL_NAMES, source=path)
  return config, params
