"""The compute-matched softmax control: its MLP widened until its forward FLOPs per token at
L=1024 equal Parallax's (SwiGLU 2816: 118.8M parameters, 0.263 GFLOP a token forward
against Parallax's 0.264; main's control matches parameters instead, 106.4M and 0.238).
Each optimizer's arm has main's lr grid and protocol and is compared with main's Parallax
arm of that optimizer (negative: the control is lower)."""
from configs.study.common import DATA, LRS, SEQ_LEN, model, train_config
from parallax_jax.models import softmax_control
from train.study import Arm, Grid


def get_grid() -> Grid:
  ctl = softmax_control(model("parallax"), "compute", seq_len=SEQ_LEN)
  arms = tuple(
      Arm(f"softmax_compute_{opt}", train_config(f"softmax_compute_{opt}", ctl, opt), LRS[opt],
          baseline=f"main/parallax_{opt}")
      for opt in ("muon", "adamw"))
  return Grid("compute", arms, seeds=2, data=DATA,
              description="the compute-matched softmax control")
