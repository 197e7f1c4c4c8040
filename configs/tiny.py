"""CPU demo: a 4-layer Parallax model on the Python stdlib sources (prepared on first use)."""
from parallax_jax.models import presets
from train.config import (DataConfig, MeshConfig, OptimizerConfig, RunConfig, ScheduleConfig,
                          TrainConfig)

VOCAB = 1024


def model(attention: str = "parallax"):
  return presets.tiny(vocab_size=VOCAB, hidden_size=128, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=32, intermediate_size=384, max_seq_len=512,
                      dtype="float32", attention=attention, implementation="xla")


def get_config() -> TrainConfig:
  return TrainConfig(
      name="tiny",
      model=model(),
      mesh=MeshConfig(data=-1),
      data=DataConfig(path="data/stdlib", seq_len=128, global_batch_size=16, vocab_size=VOCAB,
                      max_corpus_mb=6.0, eval_batches=4),
      optimizer=OptimizerConfig(name="muon", lr=1e-2, clip_grad_norm=1.0),
      schedule=ScheduleConfig(warmup_steps=20, decay_fraction=0.3, decay_shape="1-sqrt"),
      run=RunConfig(steps=300, out_dir="runs/tiny", log_every=10, eval_every=100,
                    diag_every=100, checkpoint_every=100, sample_lines=3, sample_tokens=48),
  )
