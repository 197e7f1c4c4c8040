"""Shared pieces of the GPU presets (paper setup: Qwen3 shapes, L = 4096, Muon + WSD)."""
import dataclasses

from parallax_jax.models import presets, softmax_control
from train.config import (DataConfig, MeshConfig, OptimizerConfig, RunConfig, ScheduleConfig,
                          TrainConfig)

SEQ_LEN = 4096


def gpu_config(name: str, model, *, optimizer: str = "muon", lr: float = 3e-3,
               steps: int = 20_000, global_batch_size: int = 128, grad_accum: int = 16,
               data_path: str = "data/pretrain") -> TrainConfig:
  return TrainConfig(
      name=name,
      model=model,
      mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
      data=DataConfig(path=data_path, seq_len=SEQ_LEN, global_batch_size=global_batch_size,
                      grad_accum=grad_accum, prefetch=4, eval_batches=16, auto_prepare=False,
                      vocab_size=model.vocab_size),
      optimizer=OptimizerConfig(name=optimizer, lr=lr, weight_decay=0.1, adam_weight_decay=0.1,
                                clip_grad_norm=1.0, z_loss=1e-4),
      schedule=ScheduleConfig(warmup_steps=500, decay_fraction=0.2, decay_shape="1-sqrt"),
      run=RunConfig(steps=steps, out_dir=f"runs/{name}", log_every=20, eval_every=1000,
                    diag_every=500, checkpoint_every=1000, keep_checkpoints=3,
                    sample_lines=4, sample_tokens=64, sample_temperature=0.8),
  )


def model_0p6b(**kw):
  # Unrolled layers: a scan stacks each layer's saved residuals into [layers, ...] buffers,
  # a copy per residual (39 ms of a 0.63 s step on one H100); compiling 28 layers takes ~75 s.
  kw = {"max_seq_len": SEQ_LEN, "remat_policy": "dots_attn", "scan_layers": False, **kw}
  return presets.qwen3_0p6b(**kw)


def model_1p7b(**kw):
  kw = {"max_seq_len": SEQ_LEN, "remat_policy": "dots_attn", "scan_layers": True, **kw}
  return presets.qwen3_1p7b(**kw)


def softmax(model):
  """The parameter-matched softmax control (MLP widened)."""
  return softmax_control(model, "params")


__all__ = ["dataclasses", "gpu_config", "model_0p6b", "model_1p7b", "softmax"]
