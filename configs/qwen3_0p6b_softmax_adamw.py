"""Softmax control trained with AdamW alone."""
from configs._common import gpu_config, model_0p6b, softmax


def get_config():
  return gpu_config("qwen3_0p6b_softmax_adamw", softmax(model_0p6b()), optimizer="adamw", lr=1.5e-3)
