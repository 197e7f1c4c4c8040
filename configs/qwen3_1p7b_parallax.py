"""Qwen3-1.7B shapes, Parallax attention, Muon + AdamW, WSD, L=4096."""
from configs._common import gpu_config, model_1p7b


def get_config():
  return gpu_config("qwen3_1p7b_parallax", model_1p7b(), optimizer="muon", lr=3e-3)
