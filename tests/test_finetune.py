"""A new run's parameters from Hugging Face (init.from_hf) or from another run
(init.from_checkpoint): the model starts where the source left it, the optimizer, data stream
and schedule start fresh."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallax_jax.models import hf, qwen3
from train import data as data_lib
from train.config import (DataConfig, InitConfig, MeshConfig, OptimizerConfig, RunConfig,
                          ScheduleConfig, TrainConfig)

FIXTURE = os.path.join(os.path.dirname(__file__), "hf_fixture", "data", "tied")
needs_fixture = pytest.mark.skipif(not os.path.isdir(FIXTURE), reason="HF fixture not built")
quiet = lambda s: None  # noqa: E731


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """Random-id documents in the loop's shard format, vocabulary 160 (the fixture's)."""
  out = str(tmp_path_factory.mktemp("ids160"))
  rng = np.random.default_rng(0)
  meta = {"format": data_lib.FORMAT, "dtype": "uint16", "vocab_size": 160, "eos_id": 0,
          "tokenizer": "tokenizer.json", "splits": {}, "checksums": {}}
  for split, n in (("train", 40), ("val", 8)):
    docs = [np.append(rng.integers(1, 160, int(rng.integers(8, 60))), 0) for _ in range(n)]
    np.concatenate(docs).astype("<u2").tofile(os.path.join(out, f"{split}.bin"))
    np.save(os.path.join(out, f"{split}.offsets.npy"),
            np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64))
    meta["splits"][split] = [split]
    meta["checksums"][split] = {
        "bin": data_lib.crc32_file(os.path.join(out, f"{split}.bin")),
        "offsets": data_lib.crc32_file(os.path.join(out, f"{split}.offsets.npy"))}
  json.dump(meta, open(os.path.join(out, "meta.json"), "w"))
  return out


def run_config(model, data, out, **init) -> TrainConfig:
  return TrainConfig(
      name="ft", model=model, mesh=MeshConfig(data=1),
      data=DataConfig(path=data, seq_len=32, global_batch_size=2, auto_prepare=False,
                      eval_batches=1),
      optimizer=OptimizerConfig(name="muon", lr=1e-2),
      schedule=ScheduleConfig(warmup_steps=0),
      run=RunConfig(steps=2, out_dir=str(out), log_every=1, eval_every=0, diag_every=0,
                    checkpoint_every=0, progress=False, sample_lines=0),
      init=InitConfig(**init))


def capture_initial_params(monkeypatch) -> list:
  from train.step import Trainer
  seen = []
  real = Trainer.state_from_params

  def spy(self, params):
    seen.append(jax.device_get(params))
    return real(self, params)

  monkeypatch.setattr(Trainer, "state_from_params", spy)
  return seen


@needs_fixture
def test_from_hf_parallax_starts_as_the_transformers_model(shards, tmp_path, monkeypatch):
  """The paper's migration: a softmax Qwen3 loaded into a Parallax model (W_R = 0) computes
  transformers' logits, then fine-tunes."""
  hf_cfg = json.load(open(os.path.join(FIXTURE, "config.json")))
  model = hf.config_from_hf(hf_cfg, dtype="float32", max_seq_len=64, implementation="xla")
  assert model.has_probe_params and model.r_init == "zeros"
  seen = capture_initial_params(monkeypatch)
  from train.loop import train
  out = train(run_config(model, shards, tmp_path / "ft", from_hf=FIXTURE), log=quiet)
  assert sorted(out["losses"]) == [1, 2] and all(np.isfinite(list(out["losses"].values())))
  ids = np.load(os.path.join(FIXTURE, "input_ids.npy"))
  logits = qwen3.Qwen3Model(model).apply({"params": seen[0]}, jnp.asarray(ids, jnp.int32))
  np.testing.assert_allclose(logits, np.load(os.path.join(FIXTURE, "logits.npy")),
                             rtol=1e-4, atol=1e-4)
  # and the run itself is an ordinary run: a checkpoint a later resume continues from
  assert os.path.isdir(tmp_path / "ft" / "checkpoints" / "2")


@needs_fixture
def test_from_hf_shape_mismatch_names_the_key(shards, tmp_path):
  hf_cfg = json.load(open(os.path.join(FIXTURE, "config.json")))
  model = hf.config_from_hf(hf_cfg, dtype="float32", max_seq_len=64).replace(
      intermediate_size=128)
  from train.loop import train
  with pytest.raises(ValueError, match=r"init.from_hf: .*\(model.intermediate_size: config 128 "
                                       r"vs checkpoint 96"):
    train(run_config(model, shards, tmp_path / "bad", from_hf=FIXTURE), log=quiet)


def test_from_checkpoint_takes_the_parameters_only(shards, tmp_path, monkeypatch):
  from parallax_jax.models import presets
  from train.loop import train
  model = presets.tiny(vocab_size=160, max_seq_len=64, implementation="xla")
  first = train(run_config(model, shards, tmp_path / "a"), log=quiet)
  seen = capture_initial_params(monkeypatch)
  cfg = run_config(model, shards, tmp_path / "b", from_checkpoint=str(tmp_path / "a"))
  cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, name="adamw"))
  second = train(cfg, log=quiet)
  jax.tree.map(np.testing.assert_array_equal, seen[0],
               jax.device_get(first["state"]["params"]))
  assert sorted(second["losses"]) == [1, 2]  # a new run: steps, schedule and data from 0


def test_from_checkpoint_into_a_smaller_model_says_which_keys(shards, tmp_path):
  """A model that leaves stored parameters out (here a softmax one from a Parallax run: no
  W_R) is refused naming them and the config keys to change, not the API's drop_unused."""
  from parallax_jax.models import presets
  from train.loop import train
  model = presets.tiny(vocab_size=160, max_seq_len=64, implementation="xla")
  train(run_config(model, shards, tmp_path / "a"), log=quiet)
  cfg = run_config(model.replace(attention="softmax", probe=None, affine=None), shards,
                   tmp_path / "b", from_checkpoint=str(tmp_path / "a"))
  with pytest.raises(ValueError, match=r"init.from_checkpoint: .*leaves out stored parameters "
                     r"\(.*r_proj.*\); set the model\.\* keys") as e:
    train(cfg, log=quiet)
  assert "drop_unused" not in str(e.value)
  # the API says how to drop them, and names them in the exception
  from parallax_jax.models.checkpoint import UnusedParametersError, load_checkpoint
  with pytest.raises(UnusedParametersError, match="pass drop_unused=True") as e:
    load_checkpoint(str(tmp_path / "a"), cfg.model)
  assert any("r_proj" in n for n in e.value.names)


def test_from_checkpoint_of_a_softmax_run_into_parallax_adds_wr_at_zero(shards, tmp_path):
  """The paper's migration from a run of this library: the Parallax model's W_R starts at its
  initialisation (zeros), so it starts as the softmax run's function. (before: refused, the
  checkpoint having no r_proj)"""
  from parallax_jax.models import presets
  from train.checkpoint import Checkpointer
  from train.loop import initial_params
  from train.mesh import make_mesh
  from train.step import Trainer
  parallax = presets.tiny(vocab_size=160, max_seq_len=64, implementation="xla")
  softmax = parallax.replace(attention="softmax", probe=None, affine=None)
  src = run_config(softmax, shards, tmp_path / "a")  # its step 3, as the loop saves it
  state = Trainer(src, make_mesh(src.mesh, jax.devices()[:1])).init_state(1)
  ck = Checkpointer(str(tmp_path / "a" / "checkpoints"), warn=quiet)
  ck.save(3, state, {}, src.to_dict())
  ck.close()
  cfg, logs = run_config(parallax, shards, tmp_path / "b",
                         from_checkpoint=str(tmp_path / "a")), []
  params = initial_params(cfg, Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1])),
                          logs.append)  # what the loop starts from (its state_from_params)
  assert any(l.startswith("init: ") and "r_proj" in l and "initialisation" in l for l in logs)
  ids = jnp.asarray(np.arange(1, 33)[None] % 160, jnp.int32)
  np.testing.assert_allclose(
      qwen3.Qwen3Model(parallax).apply({"params": jax.device_get(params)}, ids),
      qwen3.Qwen3Model(softmax).apply({"params": jax.device_get(state["params"])}, ids),
      rtol=1e-5, atol=1e-5)
