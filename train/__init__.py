"""Sharded pretraining of Parallax / softmax Qwen3-style models. See docs/train.md.

    python -m train --config configs/tiny.py --set optimizer.lr=3e-3
"""
from train.config import (DataConfig, MeshConfig, OptimizerConfig, RunConfig, ScheduleConfig,
                          TrainConfig, apply_overrides, load_config_file)

__all__ = ["DataConfig", "MeshConfig", "OptimizerConfig", "RunConfig", "ScheduleConfig",
           "TrainConfig", "apply_overrides", "load_config_file"]
