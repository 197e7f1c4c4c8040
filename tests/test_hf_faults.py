"""Faults on the way in from Hugging Face or another run: a bad header, a config that
transformers reads differently, a model that does not compute the checkpoint's function.
Each is one line naming the file and the key or tensor, never a traceback or a silently
different model."""
import json
import re
import struct
import types

import jax
import numpy as np
import pytest

from parallax_jax.models import hf, qwen3
from parallax_jax.models.config import ModelConfig
from train.config import DataConfig, InitConfig, RunConfig, TrainConfig
from train.loop import initial_params

BASE_HF = dict(model_type="qwen3", vocab_size=32, hidden_size=16, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=24,
               rope_theta=1e6, tie_word_embeddings=True)
quiet = lambda s: None  # noqa: E731


def _raw_safetensors(path, header, data=b"\0" * 8):
  h = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": "ab", "data_offsets": [0, 8]},
    {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [-2], "data_offsets": [0, -8]},
    {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 10]},
])
def test_corrupt_header_entry_names_the_tensor(tmp_path, entry):
  """(before: TypeError tracebacks, a numpy view error, or a negative shape accepted)"""
  _raw_safetensors(tmp_path / "model.safetensors", {"x": entry})
  with pytest.raises(ValueError, match=r"model.safetensors: tensor 'x': header entry"):
    hf.read_hf_weights(str(tmp_path))


def test_index_file_name_not_a_string(tmp_path):
  """(before: TypeError from os.path.join)"""
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": None}}))
  with pytest.raises(ValueError, match=r"index.json: weight_map: file names must be strings"):
    hf.read_hf_weights(str(tmp_path))


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_rope_settings_not_an_object(key):
  """(before: AttributeError 'str' object has no attribute 'get')"""
  with pytest.raises(ValueError, match=rf"config.json: {key}: must be an object"):
    hf.config_from_hf({**BASE_HF, key: "linear"})


@pytest.mark.parametrize("extra, window", [
    # transformers slides only the layers from max_window_layers (default 28) on
    (dict(use_sliding_window=True, sliding_window=4), None),
    (dict(use_sliding_window=True, sliding_window=4, max_window_layers=0), 4),
    (dict(use_sliding_window=True, sliding_window=4,
          layer_types=["full_attention"] * 2), None),
    (dict(use_sliding_window=True, sliding_window=None,
          layer_types=["sliding_attention"] * 2), None),
    (dict(use_sliding_window=False, sliding_window=4,
          layer_types=["sliding_attention"] * 2), None),
    (dict(use_sliding_window=True, max_window_layers=0), 4096),  # Qwen3Config's default
])
def test_sliding_window_layers_as_transformers_reads_them(extra, window):
  """(before: a window on every layer that transformers runs with full attention, and an
  all-full model refused as 'mixed')"""
  assert hf.config_from_hf({**BASE_HF, **extra}).window == window


def test_mixed_sliding_layers_name_layer_types():
  with pytest.raises(ValueError, match=r"layer_types: mixed sliding / full"):
    hf.config_from_hf({**BASE_HF, "use_sliding_window": True, "sliding_window": 4,
                       "max_window_layers": 1})


def test_missing_head_dim_is_qwen3_default_128():
  """Qwen3Config's head_dim defaults to 128, not hidden_size / heads."""
  cfg = {k: v for k, v in BASE_HF.items() if k != "head_dim"}
  assert hf.config_from_hf(cfg).resolved_head_dim == 128


def _hf_dir(path, **model):
  """A tiny softmax Qwen3 written as transformers would read it."""
  cfg = ModelConfig(**{**dict(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2,
                              num_kv_heads=1, head_dim=8, intermediate_size=24,
                              attention="softmax", dtype="float32"), **model})
  hf.save_hf_checkpoint(str(path), cfg, qwen3.init_params(cfg, jax.random.key(0)))
  return str(path)


def test_vocab_mismatch_names_file_and_vocab_size(tmp_path):
  """(before: no file named, and a hint at head_dim / num_heads)"""
  path = _hf_dir(tmp_path / "ckpt", vocab_size=40)
  cfg = json.load(open(f"{path}/config.json"))
  json.dump({**cfg, "vocab_size": 32}, open(f"{path}/config.json", "w"))
  with pytest.raises(ValueError, match=r"ckpt: tensor model.embed_tokens.weight: shape "
                     r"\(40, 16\) does not match the config's \(32, 16\) \(check vocab_size"):
    hf.load_hf_checkpoint(path)


def _train_config(model, out, **init):
  return TrainConfig(model=model, data=DataConfig(path=str(out), seq_len=32, auto_prepare=False),
                     run=RunConfig(out_dir=str(out)), init=InitConfig(**init))


def _model(**kw):
  return ModelConfig(**{**dict(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2,
                               num_kv_heads=1, head_dim=8, intermediate_size=24, max_seq_len=64,
                               dtype="float32"), **kw})


@pytest.mark.parametrize("key, model, ckpt", [
    ("rope_theta", {}, {"rope_theta": 1e4}),
    ("rms_norm_eps", {}, {"rms_norm_eps": 1e-5}),
    ("head_norm_eps", {"head_norm_eps": 1e-5}, {}),
    ("window", {"window": 8}, {}),
])
def test_from_hf_warns_of_a_model_of_another_function(tmp_path, key, model, ckpt):
  """Same shapes, another function: the migration promises the checkpoint's logits, so the
  difference is named (a deliberate change, e.g. a longer context's rope_theta, still runs).
  (before: trained on silently from another model)"""
  from train.mesh import make_mesh
  from train.step import Trainer
  cfg = _train_config(_model(**model), tmp_path, from_hf=_hf_dir(tmp_path / "ckpt", **ckpt))
  logs = []
  params = initial_params(cfg, Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1])),
                          logs.append)
  assert params is not None
  assert re.match(rf"warning: init.from_hf: the model computes another function than "
                  rf".*ckpt \(model.{key}: config", logs[0]), logs


@pytest.mark.parametrize("case, match", [
    ("not-json", r"init.from_hf: .*ckpt/config.json: not valid JSON"),
    ("no-vocab", r"init.from_hf: .*ckpt/config.json: vocab_size: missing"),
    ("no-tensor", r"init.from_hf: .*ckpt: no tensor 'model.norm.weight'"),
])
def test_from_hf_errors_name_the_file(tmp_path, case, match):
  """(before: a bare JSON error, 'Hugging Face config.json' or 'checkpoint' for the file)"""
  path = _hf_dir(tmp_path / "ckpt")
  if case == "not-json":
    (tmp_path / "ckpt" / "config.json").write_text("{nope")
  elif case == "no-vocab":
    cfg = json.load(open(f"{path}/config.json"))
    json.dump({k: v for k, v in cfg.items() if k != "vocab_size"},
              open(f"{path}/config.json", "w"))
  else:
    w = hf.read_hf_weights(path)
    hf.write_safetensors(f"{path}/model.safetensors",
                         {k: np.array(v) for k, v in w.items() if k != "model.norm.weight"})
  cfg = _train_config(_model(), tmp_path, from_hf=path)
  with pytest.raises(ValueError, match=match):
    initial_params(cfg, None, quiet)


def test_from_checkpoint_of_another_shape_says_init(tmp_path):
  """(before: the params path and shapes, but not which config key pointed there)"""
  qwen3.save_checkpoint(str(tmp_path / "src"), qwen3.init_params(
      _model(), jax.random.key(0)), _model())
  cfg = _train_config(_model(intermediate_size=32), tmp_path,
                      from_checkpoint=str(tmp_path / "src"))
  with pytest.raises(ValueError, match=r"init.from_checkpoint: .*mlp/down_proj/kernel has "
                     r"shape \(24, 16\), the config's is \(32, 16\)"):
    initial_params(cfg, types.SimpleNamespace(param_shardings=None), quiet)


@pytest.mark.parametrize("attention, noted", [("lla", True), ("softmax", False)])
def test_sample_hf_notes_an_attention_that_changes_the_function(tmp_path, capsys, attention,
                                                               noted):
  """A member other than softmax / Parallax (W_R = 0) is another model: say so on stderr, as
  --checkpoint does for what --attention leaves out. (before: no note)"""
  from parallax_jax.models import cli
  path = _hf_dir(tmp_path / "ckpt")
  assert cli.main(["--hf", path, "--attention", attention, "--prompt-ids", "1,2",
                   "--max-new-tokens", "2"]) == 0
  err = capsys.readouterr().err
  assert (f"note: --attention {attention} is not this softmax Qwen3's attention" in err) == noted
  assert f"loaded {path}" in err


def test_sample_hf_stops_at_the_directory_eos_ids(tmp_path, capsys):
  """generation_config.json's eos_token_id (a list, as chat models have), else config.json's,
  stops a sequence. (before: a Hugging Face model never stopped)"""
  from parallax_jax.models import cli
  path = _hf_dir(tmp_path / "ckpt")
  argv = ["--hf", path, "--prompt-ids", "1,2", "--max-new-tokens", "4", "--json"]
  assert cli.main(argv + ["--eos-id", "-1"]) == 0
  first = json.loads(capsys.readouterr().out.splitlines()[-1])["new_ids"][0]
  json.dump({"eos_token_id": [31, first]}, open(f"{path}/generation_config.json", "w"))
  assert hf.read_hf_eos_ids(path) == [31, first]
  assert cli.main(argv) == 0
  assert json.loads(capsys.readouterr().out.splitlines()[-1])["new_ids"] == [first]
  json.dump({"eos_token_id": "x"}, open(f"{path}/generation_config.json", "w"))
  with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id: expected an id"):
    hf.read_hf_eos_ids(path)


def test_a_bad_override_is_not_blamed_on_config_json(tmp_path):
  """(before: '.../config.json: ModelConfig.attention: ...', a file with no such value)"""
  path = _hf_dir(tmp_path / "ckpt")
  with pytest.raises(ValueError, match=r"^attention='bogus' \(an override of .*config.json\): "
                     r"unknown value 'bogus'"):
    hf.read_hf_config(path, attention="bogus")
