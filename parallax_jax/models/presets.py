"""Model presets and the paper's two softmax controls for a Parallax model.

    tiny()                 CPU-sized, runs in seconds (float32 compute)
    qwen3_0p6b()           Qwen3-0.6B shapes: d 1024, 28 layers, 16/8 heads, Dh 128, F 3072, tied
    qwen3_1p7b()           Qwen3-1.7B shapes: d 2048, 28 layers, 16/8 heads, Dh 128, F 6144, tied
    softmax_control(cfg, match="params" | "compute", seq_len=...)

Each preset takes `attention=` (default 'parallax') and any other ModelConfig overrides.
The controls are softmax models identical to `cfg` except that the attention is softmax and
the SwiGLU width `intermediate_size` is widened so that either the parameter count
(`param_count`) or the forward FLOPs per token at `seq_len` (`flops_per_token`) matches the
Parallax model as closely as a multiple of `multiple_of` allows.
"""
from __future__ import annotations

from typing import Callable

from parallax_jax.models.config import ModelConfig
from parallax_jax.models.qwen3 import flops_per_token, param_count

DEFAULT_CONTROL_SEQ_LEN = 4096


def tiny(**overrides) -> ModelConfig:
  kw = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, intermediate_size=128, max_seq_len=256, tie_embeddings=True,
            dtype="float32", attention="parallax")
  kw.update(overrides)
  return ModelConfig(**kw)


def qwen3_0p6b(**overrides) -> ModelConfig:
  kw = dict(vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
            head_dim=128, intermediate_size=3072, max_seq_len=40960, rope_theta=1_000_000.0,
            rms_norm_eps=1e-6, tie_embeddings=True, attention="parallax")
  kw.update(overrides)
  return ModelConfig(**kw)


def qwen3_1p7b(**overrides) -> ModelConfig:
  kw = dict(vocab_size=151936, hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8,
            head_dim=128, intermediate_size=6144, max_seq_len=40960, rope_theta=1_000_000.0,
            rms_norm_eps=1e-6, tie_embeddings=True, attention="parallax")
  kw.update(overrides)
  return ModelConfig(**kw)


def softmax_control(config: ModelConfig, match: str = "params", *,
                    seq_len: int = DEFAULT_CONTROL_SEQ_LEN, multiple_of: int = 64) -> ModelConfig:
  """A softmax model matching `config`'s parameter count (match='params') or forward FLOPs
  per token at `seq_len` (match='compute') by widening the MLP (intermediate_size rounded to
  a multiple of `multiple_of`). Bandwidth settings are kept; the probe, its norm and the gate
  are removed."""
  if match not in ("params", "compute"):
    raise ValueError(f"softmax_control: match must be 'params' or 'compute', got {match!r}")
  base = config.replace(attention="softmax", probe=None, affine=None, r_norm=False,
                        r_scale=1.0, correction_gate=False)
  if match == "params":
    metric = param_count
  else:
    def metric(c):
      return flops_per_token(c, seq_len)
  target = metric(config)
  f0 = base.intermediate_size
  m0, m1 = metric(base), metric(base.replace(intermediate_size=f0 + 1))
  f_exact = f0 + (target - m0) / (m1 - m0)  # both metrics are affine in intermediate_size
  f = max(multiple_of, int(round(f_exact / multiple_of)) * multiple_of)
  return base.replace(intermediate_size=f)


def qwen3_0p6b_softmax_matched_params(**overrides) -> ModelConfig:
  return softmax_control(qwen3_0p6b(**overrides), "params")


def qwen3_0p6b_softmax_matched_compute(seq_len: int = DEFAULT_CONTROL_SEQ_LEN,
                                       **overrides) -> ModelConfig:
  return softmax_control(qwen3_0p6b(**overrides), "compute", seq_len=seq_len)


def qwen3_1p7b_softmax_matched_params(**overrides) -> ModelConfig:
  return softmax_control(qwen3_1p7b(**overrides), "params")


def qwen3_1p7b_softmax_matched_compute(seq_len: int = DEFAULT_CONTROL_SEQ_LEN,
                                       **overrides) -> ModelConfig:
  return softmax_control(qwen3_1p7b(**overrides), "compute", seq_len=seq_len)


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "tiny": tiny,
    "qwen3_0p6b": qwen3_0p6b,
    "qwen3_1p7b": qwen3_1p7b,
    "qwen3_0p6b_softmax_matched_params": qwen3_0p6b_softmax_matched_params,
    "qwen3_0p6b_softmax_matched_compute": qwen3_0p6b_softmax_matched_compute,
    "qwen3_1p7b_softmax_matched_params": qwen3_1p7b_softmax_matched_params,
    "qwen3_1p7b_softmax_matched_compute": qwen3_1p7b_softmax_matched_compute,
}


def get_preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
  return PRESETS[name](**overrides)
