"""Softmax control of the tiny CPU demo (same shapes, no probe)."""
import dataclasses

from configs import tiny
from parallax_jax.models import softmax_control


def get_config():
  cfg = tiny.get_config()
  return dataclasses.replace(cfg, name="tiny_softmax",
                             model=softmax_control(cfg.model, "params"),
                             run=dataclasses.replace(cfg.run, out_dir="runs/tiny_softmax"))
