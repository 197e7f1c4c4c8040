"""Softmax control of qwen3_0p6b_parallax (MLP widened to match parameters)."""
from configs._common import gpu_config, model_0p6b, softmax


def get_config():
  return gpu_config("qwen3_0p6b_softmax", softmax(model_0p6b()), optimizer="muon", lr=3e-3)
