"""Qwen3-style models with a swappable attention-family member."""
from parallax_jax.models import presets
from parallax_jax.models.checkpoint import find_checkpoint, load_checkpoint
from parallax_jax.models.config import REMAT_POLICIES, ModelConfig
from parallax_jax.models.fla import load_fla_checkpoint, save_fla_checkpoint
from parallax_jax.models.generate import (GenerateOutput, decode_step, generate, init_cache,
                                          prefill, sample_logits)
from parallax_jax.models.hf import (config_from_hf, convert_hf_weights, load_hf_checkpoint,
                                    save_hf_checkpoint)
from parallax_jax.models.presets import PRESETS, get_preset, softmax_control
from parallax_jax.models.qwen3 import (KVCache, Qwen3Model, abstract_params, count_params,
                                       flops_per_token, init_params, logical_param_specs,
                                       param_count, save_checkpoint)

__all__ = [
    "REMAT_POLICIES", "ModelConfig", "GenerateOutput", "decode_step", "generate", "init_cache",
    "prefill", "sample_logits", "config_from_hf", "convert_hf_weights", "load_hf_checkpoint",
    "save_hf_checkpoint", "load_fla_checkpoint", "save_fla_checkpoint", "find_checkpoint",
    "PRESETS", "get_preset", "softmax_control", "presets", "KVCache", "Qwen3Model",
    "abstract_params", "count_params", "flops_per_token", "init_params", "load_checkpoint",
    "logical_param_specs", "param_count", "save_checkpoint",
]
