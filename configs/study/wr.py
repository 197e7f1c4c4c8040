"""W_R recipe ablations under Muon, each against main's parallax_muon (W_R = 0 at init, no
norm on r, scale 1):
  like_q    r_init='like_q': W_R drawn like W_Q (the model is no longer softmax at init)
  r_norm    r_norm=True: per-head RMSNorm on r with a learned gain, like the QK-norm
  r_scale   r = 0.25 W_R x (model.r_scale): under Muon and AdamW, whose update sizes do not
            follow the gradient's scale, this is a 4x smaller step on the correction's probe
            with the rest of the model untouched.
"""
from configs.study.common import DATA, LRS, model, train_config
from train.study import Arm, Grid


def get_grid() -> Grid:
  base = train_config("parallax_muon", model("parallax"), "muon")
  arms = (
      Arm("like_q_muon", base, LRS["muon"], overrides=("model.r_init=like_q",),
          baseline="main/parallax_muon"),
      Arm("r_norm_muon", base, LRS["muon"], overrides=("model.r_norm=true",),
          baseline="main/parallax_muon"),
      Arm("r_scale_muon", base, LRS["muon"], overrides=("model.r_scale=0.25",),
          baseline="main/parallax_muon"),
  )
  return Grid("wr", arms, seeds=2, data=DATA, description="W_R recipe ablations (Muon)")
