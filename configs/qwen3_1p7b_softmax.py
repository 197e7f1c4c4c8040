"""Softmax control of qwen3_1p7b_parallax (MLP widened to match parameters)."""
from configs._common import gpu_config, model_1p7b, softmax


def get_config():
  return gpu_config("qwen3_1p7b_softmax", softmax(model_1p7b()), optimizer="muon", lr=3e-3)
