"""Qwen3-0.6B shapes, Parallax attention, Muon + AdamW, WSD, L=4096."""
from configs._common import gpu_config, model_0p6b


def get_config():
  return gpu_config("qwen3_0p6b_parallax", model_0p6b(), optimizer="muon", lr=3e-3)
