"""A 2-arm x 1-lr x 1-seed grid of a 1-layer model, 2 steps: checks the runner, the loop's
metrics and the report end to end (tests/test_study.py runs it on its own small shards via
--set data.path=...; on a CPU its time is XLA compiling the init, train, eval and diagnostics
programs of each arm). AdamW: the smallest optimizer graph to compile."""
from configs.study.common import TOKENIZER, VOCAB, control
from parallax_jax.models import presets
from train.config import (DataConfig, MeshConfig, OptimizerConfig, RunConfig, ScheduleConfig,
                          TrainConfig)
from train.study import Arm, Grid, StudyData


def config(name: str, model_cfg) -> TrainConfig:
  return TrainConfig(
      name=name, model=model_cfg, mesh=MeshConfig(data=-1),
      data=DataConfig(path="data/study_smoke", seq_len=32, global_batch_size=4, prefetch=0,
                      eval_batches=1, auto_prepare=False, vocab_size=VOCAB),
      optimizer=OptimizerConfig(name="adamw", lr=1e-2),
      schedule=ScheduleConfig(warmup_steps=1, decay_fraction=0.5),
      run=RunConfig(steps=2, log_every=1, eval_every=2, diag_every=2, checkpoint_every=0,
                    keep_checkpoints=1, progress=False, sample_lines=0, save_final=False))


def get_grid() -> Grid:
  par = presets.tiny(vocab_size=VOCAB, num_layers=1, max_seq_len=64, implementation="xla")
  return Grid("smoke", (
      Arm("parallax", config("parallax", par), (1e-2,), baseline="softmax"),
      Arm("softmax", config("softmax", control(par)), (1e-2,)),
  ), seeds=1, min_lrs=1, max_extra_lrs=0,
      data=StudyData(path="data/study_smoke", tokenizer=TOKENIZER,
                     corpus_dir="data/study_smoke_corpus", max_mb=2.0),
      description="runner smoke test (tiny model)")
