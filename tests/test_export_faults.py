"""parallax-export faults: what a failed export leaves behind, and what it says is missing."""
from __future__ import annotations

import os

import pytest

from parallax_jax.models import export, hf, qwen3
from tests.test_export import cfg_of
from tests.test_generate import rand_params


def softmax_ckpt(tmp_path):
  cfg = cfg_of(attention="softmax")
  return qwen3.save_checkpoint(str(tmp_path / "ckpt"), rand_params(cfg, 1), cfg)


def test_interrupted_export_leaves_no_out(tmp_path, monkeypatch):
  """An export stopped mid-write used to leave --out with config.json and a truncated
  model.safetensors: names that look complete, and a directory that refuses the rerun."""
  src, out = softmax_ckpt(tmp_path), tmp_path / "a" / "hf"
  real = hf.write_safetensors

  def stop(path, tensors, metadata=None):
    open(path, "wb").write(b"\0" * 64)
    raise KeyboardInterrupt

  monkeypatch.setattr(hf, "write_safetensors", stop)
  with pytest.raises(KeyboardInterrupt):
    export.export(src, "hf", str(out))
  assert not os.path.exists(tmp_path / "a")  # neither --out nor its new parent, nor a tmp dir
  monkeypatch.setattr(hf, "write_safetensors", real)
  export.export(src, "hf", str(out))  # the rerun is not refused
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert sorted(os.listdir(tmp_path / "a")) == ["hf"]


def test_a_killed_exports_leftovers_are_removed(tmp_path):
  """A hard-killed export (SIGKILL, out of memory) can clean nothing up: its hidden partial
  directory, a model's size, stayed beside --out for good. The next export of that --out
  removes those of processes that no longer run, and keeps a running one's."""
  src = softmax_ckpt(tmp_path)
  dead = tmp_path / f".hf.partial-{2**22 + 12345}-0a1b2c3d"  # above Linux's pid_max default
  live = tmp_path / f".hf.partial-{os.getppid()}-0a1b2c3d"
  for d in (dead, live):
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\0" * 64)
  export.export(src, "hf", str(tmp_path / "hf"))
  assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", "hf", live.name])


def test_refused_export_into_empty_out(tmp_path):
  """A refusal found after the weights are read (non-zero W_R) keeps an empty --out as it
  was, so the same directory takes the next export."""
  cfg = cfg_of(r_norm=True)
  src = qwen3.save_checkpoint(str(tmp_path / "ckpt"), rand_params(cfg, 2), cfg)
  out = tmp_path / "out"
  out.mkdir()
  with pytest.raises(ValueError, match="W_R"):
    export.export(src, "hf", str(out))
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "out"] and not os.listdir(out)
  assert export.export(src, "fla", str(out)) is not None
  assert "model.safetensors" in os.listdir(out)


def test_missing_tokenizer_is_noted(tmp_path):
  """The docs promise the run's tokenizer.json; when none is found the export says so
  instead of silently writing a directory a serving stack cannot tokenize for."""
  src = softmax_ckpt(tmp_path)
  notes = export.export(src, "hf", str(tmp_path / "a"))
  assert any("no tokenizer.json found" in n for n in notes), notes
  assert not any("tokenizer" in n for n in export.export(src, "hf", str(tmp_path / "b"),
                                                         tokenizer=False))
  open(os.path.join(src, "tokenizer.json"), "w").write("{}")
  notes = export.export(src, "hf", str(tmp_path / "c"))
  assert not any("tokenizer" in n for n in notes)
  assert "tokenizer.json" in os.listdir(tmp_path / "c")
  # a params export has no data meta: no eos id, said once (generation would not stop)
  assert sum("eos_token_id written as null" in n for n in notes) == 1


def test_bad_model_config_json_names_the_file_once(tmp_path):
  src = softmax_ckpt(tmp_path)
  open(os.path.join(src, "model_config.json"), "w").write("{nope")
  with pytest.raises(ValueError) as e:
    export.export(src, "hf", str(tmp_path / "a"))
  assert str(e.value).count("model_config.json") == 1 and "not valid JSON" in str(e.value)
