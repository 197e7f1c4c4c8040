"""Parallax vs the parameter-matched softmax control, each under Muon and under AdamW."""
from configs.study.common import DATA, LRS, control, model, train_config
from train.study import Arm, Grid


def get_grid() -> Grid:
  arms = []
  for opt in ("muon", "adamw"):
    par = model("parallax")
    arms.append(Arm(f"parallax_{opt}", train_config(f"parallax_{opt}", par, opt), LRS[opt],
                    baseline=f"softmax_{opt}"))
    arms.append(Arm(f"softmax_{opt}", train_config(f"softmax_{opt}", control(par), opt),
                    LRS[opt]))
  return Grid("main", tuple(arms), seeds=2, data=DATA,
              description="Parallax vs the parameter-matched softmax control, Muon and AdamW")
