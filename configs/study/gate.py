"""The correction gate (o = vbar - g C^T r, g = sigmoid(x W_g + b), W_g = 0 and b = 0 at
init, so g = 1/2 everywhere at the start) under Muon and AdamW; compared with main's
ungated Parallax arm of the same optimizer."""
from configs.study.common import DATA, LRS, model, train_config
from train.study import Arm, Grid


def get_grid() -> Grid:
  arms = tuple(
      Arm(f"parallax_gate_{opt}",
          train_config(f"parallax_gate_{opt}", model("parallax", correction_gate=True), opt),
          LRS[opt], baseline=f"main/parallax_{opt}")
      for opt in ("muon", "adamw"))
  return Grid("gate", arms, seeds=2, data=DATA, description="the correction gate")
