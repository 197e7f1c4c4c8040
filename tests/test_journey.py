"""The README's user journey, end to end, from an installed wheel in an empty directory:
install, train, sample, export to Hugging Face, fine-tune from it as Parallax on 8 devices
(with diagnostics, the multi-device path), export to fla, and the profiling summary.

Each step is the command a user types (`python -m ...`, named presets), run as a subprocess
whose working directory is outside the checkout, with the wheel's packages first on the path.
The models are shrunk by `--set` so the whole journey stays a few CPU minutes.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tiny preset, smaller: 1 layer, 64-token rows, 2 steps, a 0.3 MB corpus
SMALL = ["--set", "model.num_layers=1", "--set", "data.seq_len=64", "--set",
         "data.global_batch_size=8", "--set", "data.max_corpus_mb=0.3", "--set",
         "data.vocab_size=320", "--set", "run.steps=2", "--set", "schedule.warmup_steps=1",
         "--set", "run.eval_every=2", "--set", "run.checkpoint_every=0", "--set",
         "run.sample_lines=0"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """The package built as a wheel and installed (no dependencies: the test venv has them)."""
  root = tmp_path_factory.mktemp("journey")
  wheels = root / "wheels"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(wheels), REPO], check=True, capture_output=True)
  site = root / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                  str(site), *glob.glob(str(wheels / "*.whl"))], check=True,
                 capture_output=True)
  work = root / "work"
  work.mkdir()
  return site, work


def run(installed, *args, devices: int = 1, expect: int = 0):
  site, work = installed
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip())
  p = subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True,
                     text=True, timeout=900)
  assert p.returncode == expect, f"{args}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
  return p


def test_user_journey(installed):
  site, work = installed
  # the packages come from the wheel, not the checkout
  p = run(installed, "-c", "import train, parallax_jax, configs; print(train.__file__)")
  assert p.stdout.strip().startswith(str(site))

  # train a softmax model (the tiny preset by name), then sample from the run
  run(installed, "-m", "train", "--config", "tiny", "--set", "model.attention=softmax",
      "--set", "run.out_dir=runs/soft", *SMALL)
  assert os.path.isfile(work / "runs/soft/loss.png")
  assert os.path.isdir(work / "runs/soft/checkpoints/2")
  p = run(installed, "-m", "parallax_jax.models.cli", "--checkpoint", "runs/soft", "--prompt",
          "def ", "--max-new-tokens", "4", "--json")
  assert len([json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]) == 1

  # export it to transformers' Qwen3 layout; fine-tune that as Parallax (W_R = 0) on a
  # data x fsdp x tensor = 2 x 2 x 2 mesh with diagnostics every step
  run(installed, "-m", "parallax_jax.models.export", "--checkpoint", "runs/soft", "--format",
      "hf", "--out", "hf_soft")
  assert os.path.isfile(work / "hf_soft/config.json")
  run(installed, "-m", "train", "--config", "tiny", "--set", "init.from_hf=hf_soft",
      "--set", "model.r_norm=true", "--set", "run.out_dir=runs/migrated", "--set",
      "mesh.data=2", "--set", "mesh.fsdp=2", "--set", "mesh.tensor=2", "--set",
      "run.diag_every=1", *SMALL, devices=8)
  recs = [json.loads(l) for l in open(work / "runs/migrated/metrics.jsonl")]
  assert {"cor/layer_0", "eval/loss"} <= set().union(*recs)

  # export the Parallax run for fla; the profiling summary ships with the package
  run(installed, "-m", "parallax_jax.models.export", "--checkpoint", "runs/migrated",
      "--format", "fla", "--out", "fla_migrated")
  assert os.path.isfile(work / "fla_migrated/model.safetensors")
  p = run(installed, "-m", "train.trace_summary", "--help")
  assert "trace" in p.stdout

  # rerunning the finished run trains nothing, says so, and leaves no new (empty) event
  # file; a smaller run.steps is refused
  events = sorted(os.listdir(work / "runs/soft/tb"))
  p = run(installed, "-m", "train", "--config", "tiny", "--set", "model.attention=softmax",
          "--set", "run.out_dir=runs/soft", *SMALL)
  assert "the run is complete" in p.stdout
  assert sorted(os.listdir(work / "runs/soft/tb")) == events
  p = run(installed, "-m", "train", "--config", "tiny", "--set", "model.attention=softmax",
          "--set", "run.out_dir=runs/soft", *SMALL, "--set", "run.steps=1", expect=1)
  assert p.stderr.strip().startswith("error: run.steps: 1 is before the checkpoint's step 2")


def test_readme_python_examples_run():
  """Every ```python block of the README, in order, in one namespace, as a user pastes them."""
  import re
  text = open(os.path.join(REPO, "README.md")).read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(blocks) >= 2
  ns: dict = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), ns)  # noqa: S102
  assert ns["o"].shape == (2, 1024, 8, 64) and len(ns["grads"]) == 5
  assert ns["logits"].shape[:2] == (1, 8) and ns["out"].tokens.shape == (1, 8)
