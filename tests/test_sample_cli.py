"""Sampling from training checkpoints: `load_checkpoint` and `parallax-sample` on a real run.

One tiny run (1 layer, d=32, 2 steps, a checkpoint per step) is trained by `train.loop.train`
in a temporary directory, with a relative run.out_dir and data.path as `scripts/train.sh`
writes them, and then read back from another working directory.
"""
from __future__ import annotations

import json
import re
import os

import jax
import numpy as np
import pytest

from parallax_jax.models import checkpoint, presets
from parallax_jax.models import cli
from parallax_jax.models.config import ModelConfig
from parallax_jax.models.generate import generate

VOCAB = 320


def _train_tiny_run(base):
  from train.config import (DataConfig, MeshConfig, OptimizerConfig, RunConfig, ScheduleConfig,
                            TrainConfig)
  from train.loop import train
  from train.prepare import prepare
  old = os.getcwd()
  os.chdir(base)  # relative paths, as `python -m train` from a repository root writes them
  try:
    prepare("data/tiny", None, vocab_size=VOCAB, max_mb=0.05, val_fraction=0.1, quiet=True)
    model = presets.tiny(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=16, intermediate_size=32, max_seq_len=64,
                         r_norm=True, implementation="xla")
    cfg = TrainConfig(
        name="t", model=model, mesh=MeshConfig(data=1),
        data=DataConfig(path="data/tiny", seq_len=16, global_batch_size=2, prefetch=0,
                        eval_batches=1, auto_prepare=False),
        optimizer=OptimizerConfig(name="adamw", lr=1e-2),
        schedule=ScheduleConfig(warmup_steps=0, decay_fraction=0.0),
        run=RunConfig(steps=2, out_dir="runs/tiny", log_every=1, eval_every=0, diag_every=0,
                      checkpoint_every=1, keep_checkpoints=3, progress=False, sample_lines=0))
    out = train(cfg, log=lambda s: None)
  finally:
    os.chdir(old)
  flat = checkpoint.param_paths(jax.device_get(out["state"]["params"]))
  np.savez(os.path.join(base, "final_params.npz"),
           **{"/".join(k): np.asarray(v) for k, v in flat.items()})
  with open(os.path.join(base, "model.json"), "w") as f:
    json.dump(cfg.model.to_dict(), f)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The tiny run, trained once per test session: pytest-xdist workers share it through
  their common temporary root, under a file lock."""
  import fcntl
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # this session's root, above the workers' dirs
    root = root.parent
  base = root / "sample_cli_run"
  with open(str(base) + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (base / "model.json").exists():
      base.mkdir(exist_ok=True)
      _train_tiny_run(str(base))
  params: dict = {}
  with np.load(base / "final_params.npz") as z:
    for k in z.files:
      node = params
      *head, last = k.split("/")
      for h in head:
        node = node.setdefault(h, {})
      node[last] = z[k]
  with open(base / "data/tiny/meta.json") as f:
    eos = json.load(f)["eos_id"]
  with open(base / "model.json") as f:
    config = ModelConfig.from_dict(json.load(f))
  return {"dir": str(base / "runs" / "tiny"), "config": config, "eos": eos, "params": params,
          "data": str(base / "data" / "tiny")}


def _equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_load_checkpoint_reads_a_run_and_one_step(run, tmp_path, monkeypatch):
  """(before: only save_checkpoint's model_config.json layout was read, which the training
  loop never writes)"""
  monkeypatch.chdir(tmp_path)
  cfg, params = checkpoint.load_checkpoint(run["dir"])
  assert cfg == run["config"]
  _equal(params, run["params"])
  step_dir = os.path.join(run["dir"], "checkpoints", "1")
  cfg1, p1 = checkpoint.load_checkpoint(step_dir)
  assert cfg1 == cfg
  _, p1b = checkpoint.load_checkpoint(run["dir"], step=1)
  _equal(p1, p1b)
  assert not np.array_equal(p1["embed"]["embedding"], params["embed"]["embedding"])
  src = checkpoint.find_checkpoint(step_dir)
  assert (src.kind, src.step, src.run_dir) == ("step", 1, run["dir"])
  data = checkpoint.checkpoint_data(src)  # data.path was relative to another directory
  assert data["tokenizer"] == os.path.join(run["data"], "tokenizer.json")
  assert data["eos_id"] == run["eos"]
  with pytest.raises(ValueError, match=r"no committed checkpoint for step 7 \(have \[1, 2\]\)"):
    checkpoint.load_checkpoint(run["dir"], step=7)
  with pytest.raises(ValueError, match="not a checkpoint"):
    checkpoint.load_checkpoint(str(tmp_path))


def _sample(argv, capsys):
  assert cli.main(argv + ["--json"]) == 0
  out = capsys.readouterr()
  return [json.loads(x) for x in out.out.splitlines()], out.err


def test_cli_samples_a_run_and_a_step_with_its_tokenizer(run, tmp_path, monkeypatch, capsys):
  """`parallax-sample --checkpoint <run>` and `<run>/checkpoints/<step>` (before: both
  failed: no model_config.json)."""
  monkeypatch.chdir(tmp_path)
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(os.path.join(run["data"], "tokenizer.json"))
  ids = tok.encode("def ").ids
  ref = generate(run["config"], run["params"], np.array([ids]), max_new_tokens=6,
                 eos_id=run["eos"])
  want = np.asarray(ref.tokens)[0, :int(ref.lengths[0])].tolist()
  for path in (run["dir"], os.path.join(run["dir"], "checkpoints", "2")):
    lines, err = _sample(["--checkpoint", path, "--prompt", "def ", "--max-new-tokens", "6"],
                         capsys)
    assert lines[0]["prompt_ids"] == ids and lines[0]["new_ids"] == want, path
    assert lines[0]["text"] == tok.decode(want)
    assert "(step 2)" in err


def test_cli_text_output_splits_into_its_samples(run, capsys):
  """Without --json, with a tokenizer: per sample a header line naming the prompt, then the
  prompt's text and the generated text, which may hold newlines (before: the generated texts
  back to back, nothing between them, no prompt)."""
  argv = ["--checkpoint", run["dir"], "--prompt-ids", "5,6,7", "--prompt", "def f(x):\n",
          "--max-new-tokens", "5", "--eos-id", "-1"]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  recs, _ = _sample(argv, capsys)
  parts = re.split(r"^--- sample (\d+) \(prompt: (.*)\) ---\n", out, flags=re.M)
  assert parts[0] == "" and len(parts) == 1 + 3 * 2, out
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(os.path.join(run["data"], "tokenizer.json"))
  for i, (n, shown, body) in enumerate(zip(parts[1::3], parts[2::3], parts[3::3])):
    assert int(n) == i
    prompt = tok.decode([5, 6, 7]) if i == 0 else "def f(x):\n"
    assert shown == ("ids 5,6,7" if i == 0 else repr("def f(x):\n"))
    assert body == prompt + recs[i]["text"] + "\n"
  assert cli._header(0, list(range(20))) == "--- sample 0 (prompt: 20 ids 0,1,2,3,4,5,6,7,...) ---"
  assert cli._header(1, "x" * 50) == f"--- sample 1 (prompt: {'x' * 37!r}...) ---"


def test_cli_attention_softmax_drops_wr_with_a_note(run, capsys):
  lines, err = _sample(["--checkpoint", run["dir"], "--prompt-ids", "5,6,7",
                        "--max-new-tokens", "4", "--attention", "softmax", "--eos-id", "-1"],
                       capsys)
  assert ("note: --attention softmax leaves out attn/r_norm/scale, attn/r_proj/kernel of this "
          "parallax checkpoint (W_R)") in err
  cfg = run["config"].replace(attention="softmax", r_norm=False)
  layer = {k: v for k, v in run["params"]["layers_0"]["attn"].items()
           if k not in ("r_proj", "r_norm")}
  params = {**run["params"], "layers_0": {**run["params"]["layers_0"], "attn": layer}}
  ref = generate(cfg, params, np.array([[5, 6, 7]]), max_new_tokens=4)
  assert lines[0]["new_ids"] == np.asarray(ref.tokens)[0].tolist()


def test_cli_help_shows_defaults(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for text in ("tokens to generate (default: 32)", "(default: 1.0)", "--step",
               "default: a training run's eos id"):
    assert text in " ".join(out.split()), text


@pytest.mark.parametrize("argv, match", [
    (["--prompt-ids", "1,x"], "--prompt-ids: expected comma-separated integers, got '1,x'"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "100"], "exceeds max_seq_len 64"),
    (["--prompt-ids", "1,400"], r"prompt 0: ids must be in \[0, 320\)"),
    (["--prompt-ids", "1,2", "--temperature", "-1"], "temperature >= 0"),
    (["--prompt-ids", "1,2", "--step", "9"], "no committed checkpoint for step 9"),
])
def test_cli_bad_input_is_one_line(run, capsys, argv, match):
  """Exactly one line on stderr: no usage block, no notes (before: argparse's usage first)."""
  with pytest.raises(SystemExit) as e:
    cli.main(["--checkpoint", run["dir"]] + argv)
  assert e.value.code == 2
  out = capsys.readouterr()
  err = out.err.splitlines()
  assert len(err) == 1 and err[0].startswith("parallax-sample: error: "), out.err
  assert re.search(match, err[0]), err[0]
  assert out.out == ""


@pytest.mark.parametrize("argv0, prog", [
    ("/venv/bin/parallax-sample", "parallax-sample"),
    (cli.__file__, "python -m parallax_jax.models.cli"),
])
def test_cli_usage_errors_are_one_line_named_as_invoked(monkeypatch, capsys, argv0, prog):
  monkeypatch.setattr("sys.argv", [argv0])
  for argv, match in ((["--prompt-ids", "1"], "one of the arguments --checkpoint --hf --preset "
                       "is required"),
                      (["--preset", "nope", "--prompt-ids", "1"], "unknown preset 'nope'")):
    with pytest.raises(SystemExit) as e:
      cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: {match}"), err


def test_cli_bad_checkpoint_paths(tmp_path, capsys):
  for name, files in (("hf", ("config.json", "model.safetensors")),
                      ("fresh_run", ("config.json", "metrics.jsonl"))):
    (tmp_path / name).mkdir()
    for f in files:
      (tmp_path / name / f).write_text("{}")
  for path, match in ((tmp_path / "nope", "no such checkpoint directory"),
                      (tmp_path, "not a checkpoint: expected a training run"),
                      (tmp_path / "hf", "looks like a Hugging Face directory: use --hf"),
                      (tmp_path / "fresh_run", "has not saved a checkpoint yet")):
    with pytest.raises(SystemExit) as e:
      cli.main(["--checkpoint", str(path), "--prompt-ids", "1"])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1 and match in err[0], err


_SAVE_SHARDED = """
import sys, numpy as np, jax, orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from parallax_jax.models import presets, qwen3
cfg = presets.tiny(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                   head_dim=16, intermediate_size=32)
mesh = jax.make_mesh((8,), ("d",))
rng = np.random.default_rng(0)
params = jax.tree.map(lambda a: jax.device_put(
    rng.standard_normal(a.shape).astype(a.dtype),
    NamedSharding(mesh, P("d") if a.shape and a.shape[0] % 8 == 0 else P())),
    qwen3.abstract_params(cfg))
mgr = ocp.CheckpointManager(sys.argv[1] + "/checkpoints", item_names=("state", "config"))
mgr.save(3, args=ocp.args.Composite(
    state=ocp.args.StandardSave({"step": 3, "params": params, "opt_state": {"mu": params}}),
    config=ocp.args.JsonSave({"model": cfg.to_dict()})))
mgr.wait_until_finished()
np.save(sys.argv[1] + "/embedding.npy", np.asarray(params["embed"]["embedding"]))
"""


def test_load_checkpoint_of_a_sharded_run_onto_one_device(tmp_path):
  """A train state saved sharded over 8 devices reads back onto this process's one device."""
  import subprocess
  import sys
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", _SAVE_SHARDED, str(tmp_path)], check=True, env=env,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  cfg, params = checkpoint.load_checkpoint(str(tmp_path))
  emb = params["embed"]["embedding"]
  assert emb.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
  np.testing.assert_array_equal(emb, np.load(tmp_path / "embedding.npy"))
  assert cfg.vocab_size == 64


def test_cli_attention_parallax_adds_wr_at_zero_with_a_note(tmp_path, capsys):
  """A softmax checkpoint sampled as Parallax: W_R starts at its initialisation (zeros), so
  the samples are the softmax model's. (before: refused, 'has no parameter ... r_proj')"""
  from parallax_jax.models import qwen3
  cfg = presets.tiny(vocab_size=64, max_seq_len=32, implementation="xla", attention="softmax")
  params = qwen3.init_params(cfg, jax.random.key(3))
  qwen3.save_checkpoint(str(tmp_path / "soft"), params, cfg)
  lines, err = _sample(["--checkpoint", str(tmp_path / "soft"), "--prompt-ids", "5,6,7",
                        "--max-new-tokens", "4", "--attention", "parallax"], capsys)
  assert "note: --attention parallax adds attn/r_proj/kernel, not in this softmax " in err
  ref = generate(cfg, params, np.array([[5, 6, 7]]), max_new_tokens=4)
  assert lines[0]["new_ids"] == np.asarray(ref.tokens)[0].tolist()
