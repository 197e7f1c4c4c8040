"""The study's model and training setup (docs/study.md).

Model: Qwen3-style (QK-norm, GQA, SwiGLU, RoPE, tied embeddings), d=768, 12 layers, 8 query
heads x 128 / 4 KV heads, SwiGLU 2048, vocab 16384: 107.0M parameters with Parallax (W_R
zero-initialised), 106.4M for its parameter-matched softmax control (MLP 2368).
Training: L=1024, 32 sequences (32,768 tokens) a step, 960 steps = 31.5M tokens, WSD
(60 warmup steps, 1-sqrt decay over the last 25%), weight decay 0.1, clip 1.0, z-loss 1e-4,
bf16 compute, scanned layers, no remat. (Unrolled, a step is 28% faster on an H100 but
setup and compiling take ~35 s longer: even at 960 steps; bench/NOTES.md.)
"""
import os

from parallax_jax.models import presets, softmax_control
from train.config import (DataConfig, MeshConfig, OptimizerConfig, RunConfig, ScheduleConfig,
                          TrainConfig)
from train.study import StudyData

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "tokenizer.json")
VOCAB = 16384
SEQ_LEN = 1024
BATCH = 32
STEPS = 960
DATA_PATH = "data/study"

# The learning-rate sweeps, centre first (the runner runs them in this order). Arms of one
# optimizer share a list; the runner extends a sweep whose best lr is at an edge (x2 or /2,
# at most twice), the same rule for every arm.
MUON_LRS = (6e-3, 3e-3, 1.2e-2)
ADAMW_LRS = (2e-3, 1e-3, 4e-3)
LRS = {"muon": MUON_LRS, "adamw": ADAMW_LRS}

# The corpus: this installation's Python source and docs, deduplicated, cut at 200 MB
# (~55M tokens at ~3.6 bytes a token: a run's 31.5M tokens are ~0.6 of an epoch, so no run
# sees a document twice; the cut keeps the per-call tokenizing to well under a minute).
DATA = StudyData(path=DATA_PATH, tokenizer=TOKENIZER, corpus_dir="data/study_corpus",
                 max_mb=200.0, val_fraction=0.02)


def model(attention: str = "parallax", **kw):
  kw = {"vocab_size": VOCAB, "hidden_size": 768, "num_layers": 12, "num_heads": 8,
        "num_kv_heads": 4, "head_dim": 128, "intermediate_size": 2048,
        "max_seq_len": SEQ_LEN, "scan_layers": True, "remat_policy": "none",
        "attention": attention, **kw}
  return presets.qwen3_0p6b(**kw)


def control(parallax_model):
  """The parameter-matched softmax control (MLP widened)."""
  return softmax_control(parallax_model, "params")


def train_config(name: str, model_cfg, optimizer: str) -> TrainConfig:
  return TrainConfig(
      name=name,
      model=model_cfg,
      mesh=MeshConfig(data=-1),
      data=DataConfig(path=DATA_PATH, seq_len=SEQ_LEN, global_batch_size=BATCH, grad_accum=1,
                      prefetch=4, eval_batches=16, auto_prepare=False, vocab_size=VOCAB),
      optimizer=OptimizerConfig(name=optimizer, lr=LRS[optimizer][0], weight_decay=0.1,
                                adam_weight_decay=0.1, clip_grad_norm=1.0, z_loss=1e-4),
      schedule=ScheduleConfig(warmup_steps=60, decay_fraction=0.25, decay_shape="1-sqrt"),
      # checkpoint_every=0, save_final=False: a save only on SIGTERM (which the runner sends
      # when a call's time is up); the study keeps metrics, not weights, so other saves
      # (~1.3 GB of state each) are pure cost.
      run=RunConfig(steps=STEPS, out_dir=f"runs/study/{name}", log_every=20, eval_every=240,
                    diag_every=120, checkpoint_every=0, keep_checkpoints=1, progress=False,
                    sample_lines=0, save_final=False),
  )


__all__ = ["DATA", "LRS", "STEPS", "TOKENIZER", "control", "model", "train_config"]
