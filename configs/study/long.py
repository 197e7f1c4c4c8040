"""Twice the tokens: main's four arms at 1920 steps (62.9M tokens, ~1.14 epochs of the
corpus), each at its best lr of main's 960-step sweep (AdamW 1e-3 both; Muon 6e-3
Parallax, 3e-3 softmax), one seed, no sweep.

Why: at 960 steps Parallax's train loss falls faster from the first logged steps under both
optimizers; softmax/Muon is within 0.02 by step 400, softmax/AdamW is still 0.11 behind at the
end. If the AdamW gap is that early speed-up not yet recovered, it shrinks here; if it is a
lasting difference, it does not. AdamW's pair runs first. Each arm's lr is taken from main's
sweep by the same rule (its best at 960 steps), so no arm is tuned more than another.

The Muon pair also runs at half its 960-step best lr (Parallax 3e-3, softmax 1.5e-3): at 960
steps Parallax/Muon's 3e-3 and 6e-3 tied (1.8008, 1.8002), and a longer schedule often
prefers a lower peak, so one lr could favour either arm; both Muon arms get the same second
point and the report takes each arm's better one. AdamW's pair is left at one lr: its gap
(-0.078) is eight times main's seed spread. Both Muon arms' best came out at an edge of their
two points (Parallax the low one, softmax the high one), so a sweep whose best is at an edge
gets one more point past it (max_extra_lrs=1, the same rule for every arm): both Muon arms
then have run the same three lrs, 1.5e-3, 3e-3 and 6e-3. At its best lr each Muon arm then
gets a second seed (`Arm.seeds`, both Muon arms alike): the Muon gap at twice the tokens
(-0.0065 at 3e-3, +0.0084 with Parallax at 6e-3) is about one seed spread of main's. The
AdamW pair keeps one seed.
"""
from configs.study.common import DATA, STEPS, control, model, train_config
from train.study import Arm, Grid

BEST_LR = {"parallax_adamw": 1e-3, "softmax_adamw": 1e-3,
           "parallax_muon": 6e-3, "softmax_muon": 3e-3}
# the lrs each optimizer's long arms run: the 960-step best first, then half of it (Muon)
LR_FACTORS = {"adamw": (1.0,), "muon": (1.0, 0.5)}
LONG = ("run.steps=%d" % (2 * STEPS), "run.diag_every=240")


def get_grid() -> Grid:
  arms = []
  for opt in ("adamw", "muon"):
    par = model("parallax")
    for name, m in ((f"parallax_{opt}", par), (f"softmax_{opt}", control(par))):
      lrs = tuple(BEST_LR[name] * f for f in LR_FACTORS[opt])
      arms.append(Arm(f"{name}_long", train_config(f"{name}_long", m, opt), lrs,
                      overrides=LONG,
                      baseline=f"softmax_{opt}_long" if name.startswith("parallax") else None,
                      longer_of=f"main/{name}", seeds=2 if opt == "muon" else None))
  return Grid("long", tuple(arms), seeds=1, min_lrs=1, max_extra_lrs=1, data=DATA,
              description="main's arms at twice the tokens, at their 960-step best lrs",
              claims=False)
