"""Migration from a Hugging Face Qwen3 checkpoint: logits equal transformers' (W_R = 0).

The fixture (tiny random Qwen3 models saved by transformers, plus transformers' float32
logits) is built by tests/hf_fixture/make_fixture.py under a separate Python with torch:

    PYENV_VERSION=3.11.7 python -m venv .venv-hf
    .venv-hf/bin/pip install torch==2.13.0 transformers safetensors numpy
    .venv-hf/bin/python tests/hf_fixture/make_fixture.py

Set PARALLAX_HF_FIXTURE to use another directory.
"""
import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from parallax_jax.models import hf, qwen3

FIXTURE = os.environ.get("PARALLAX_HF_FIXTURE",
                         os.path.join(os.path.dirname(__file__), "hf_fixture", "data"))
needs_fixture = pytest.mark.skipif(
    not os.path.exists(os.path.join(FIXTURE, "tied", "logits.npy")),
    reason=f"HF fixture not built at {FIXTURE}: run tests/hf_fixture/make_fixture.py with a "
           "torch + transformers Python (see the docstring of tests/test_hf.py)")


def fixture(name):
  d = os.path.join(FIXTURE, name)
  return d, np.load(os.path.join(d, "input_ids.npy")), np.load(os.path.join(d, "logits.npy"))


@needs_fixture
@pytest.mark.parametrize("name,kw", [
    ("untied", dict()),
    ("tied", dict()),
    ("tied", dict(scan_layers=True)),
    ("untied", dict(attention="softmax", implementation="chunked")),
])
def test_logits_match_transformers(name, kw):
  path, ids, ref = fixture(name)
  cfg, params = hf.load_hf_checkpoint(path, dtype="float32", **kw)
  assert cfg.tie_embeddings == (name == "tied")
  if cfg.has_probe_params:  # Parallax with W_R = 0: exactly the softmax model
    layer = params["layers"] if cfg.scan_layers else params["layers_0"]
    assert not np.any(layer["attn"]["r_proj"]["kernel"])
  logits = qwen3.Qwen3Model(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32))
  np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


@needs_fixture
def test_like_q_probe_init_changes_only_wr():
  path, ids, ref = fixture("untied")
  cfg0, p0 = hf.load_hf_checkpoint(path, dtype="float32")
  cfg1, p1 = hf.load_hf_checkpoint(path, dtype="float32", r_init="like_q", seed=3)
  w_r = p1["layers_0"]["attn"]["r_proj"]["kernel"]
  assert np.std(w_r) > 0.5 * cfg1.init_std
  drop = lambda p: {k: ({**v, "attn": {a: w for a, w in v["attn"].items() if a != "r_proj"}}
                        if k.startswith("layers_") else v) for k, v in p.items()}
  jax.tree.map(np.testing.assert_array_equal, drop(p1), drop(p0))
  logits = qwen3.Qwen3Model(cfg1).apply({"params": p1}, jnp.asarray(ids, jnp.int32))
  assert float(np.max(np.abs(np.asarray(logits) - ref))) > 1e-3  # the correction is active


@needs_fixture
def test_head_dim_mismatch_is_reported():
  path, _, _ = fixture("tied")
  with pytest.raises(ValueError, match="head_dim"):
    hf.load_hf_checkpoint(path, head_dim=16)


def _write_safetensors(path, tensors):
  header, blobs, off = {}, [], 0
  names = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
           np.dtype(np.int64): "I64"}
  for k, a in tensors.items():
    b = np.ascontiguousarray(a).tobytes()
    header[k] = {"dtype": names[a.dtype], "shape": list(a.shape),
                 "data_offsets": [off, off + len(b)]}
    blobs.append(b)
    off += len(b)
  header["__metadata__"] = {"format": "pt"}
  h = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_read_safetensors_dtypes(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32),
             "b": rng.standard_normal((5,)).astype(ml_dtypes.bfloat16),
             "c": np.arange(6, dtype=np.int64).reshape(2, 3)}
  _write_safetensors(tmp_path / "model.safetensors", tensors)
  got = hf.read_hf_weights(str(tmp_path))
  assert set(got) == set(tensors)
  for k, a in tensors.items():
    assert got[k].dtype == a.dtype
    np.testing.assert_array_equal(got[k], a)


@pytest.mark.parametrize("key,bad", [
    ("attention_bias", {"attention_bias": True}),
    ("rope_scaling", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
    ("model_type", {"model_type": "llama"}),
    ("hidden_act", {"hidden_act": "gelu"}),
])
def test_unsupported_hf_configs_name_the_key(key, bad):
  base = dict(model_type="qwen3", vocab_size=32, hidden_size=16, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=24,
              rope_theta=1e6, tie_word_embeddings=True)
  hf.config_from_hf(base)  # the base is fine
  with pytest.raises(ValueError, match=key):
    hf.config_from_hf({**base, **bad})
  cfg = hf.config_from_hf(base)
  assert cfg.rope_theta == 1e6 and cfg.attention == "parallax" and cfg.head_dim == 8


def test_rope_theta_from_rope_parameters():
  base = dict(model_type="qwen3", vocab_size=32, hidden_size=16, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=24,
              rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
  assert hf.config_from_hf(base).rope_theta == 5e5
  # transformers' Qwen3Config default when neither is given
  del base["rope_parameters"]
  assert hf.config_from_hf(base).rope_theta == 10000.0


BASE_HF = dict(model_type="qwen3", vocab_size=32, hidden_size=16, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=24,
               rope_theta=1e6, tie_word_embeddings=True)


def _hf_dir(tmp_path, config=BASE_HF, weights=b""):
  d = tmp_path / "ckpt"
  d.mkdir()
  (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
  if isinstance(weights, bytes):
    (d / "model.safetensors").write_bytes(weights)
  else:
    _write_safetensors(d / "model.safetensors", weights)
  return str(d)


@pytest.mark.parametrize("config, match", [
    ({k: v for k, v in BASE_HF.items() if k != "vocab_size"},
     r"ckpt/config.json: vocab_size: missing"),
    ({**BASE_HF, "hidden_size": "big"},
     r"ckpt/config.json: hidden_size: must be an int, got 'big'"),
    ({**BASE_HF, "num_attention_heads": 3, "num_key_value_heads": 2},
     r"ckpt/config.json: ModelConfig.num_kv_heads: num_heads \(3\) must be a multiple"),
    ("{not json", r"ckpt/config.json: not valid JSON"),
])
def test_bad_hf_config_json_names_file_and_key(tmp_path, config, match):
  """(before: a bare KeyError 'vocab_size', int() / JSON errors naming nothing)"""
  with pytest.raises(ValueError, match=match):
    hf.load_hf_checkpoint(_hf_dir(tmp_path, config))


def _good_weights():
  rng = np.random.default_rng(0)
  return {"model.embed_tokens.weight": rng.standard_normal((32, 16)).astype(np.float32)}


@pytest.mark.parametrize("case, match", [
    ("garbage", r"model.safetensors: not a safetensors file \(header length"),
    ("short", r"model.safetensors: not a safetensors file \(3 bytes"),
    ("not-json", r"model.safetensors: not a safetensors file \(header is not JSON"),
    ("truncated", r"model.safetensors: tensor 'model.embed_tokens.weight': data_offsets"),
    ("bad-entry", r"model.safetensors: tensor 'x': header entry"),
])
def test_bad_safetensors_name_the_file(tmp_path, case, match):
  """(before: JSONDecodeError or a reshape error without the file name)"""
  if case == "garbage":
    blob = np.random.default_rng(1).bytes(200)
  elif case == "short":
    blob = b"abc"
  elif case == "not-json":
    blob = (7).to_bytes(8, "little") + b"{nope!!" + b"\0" * 16
  else:
    _write_safetensors(tmp_path / "w.safetensors", _good_weights())
    blob = (tmp_path / "w.safetensors").read_bytes()
    if case == "truncated":
      blob = blob[:-8]
    else:
      h = json.dumps({"x": {"dtype": "F32"}}).encode()
      blob = struct.pack("<Q", len(h)) + h
  with pytest.raises(ValueError, match=match):
    hf.load_hf_checkpoint(_hf_dir(tmp_path, weights=blob))


def test_missing_tensor_names_the_checkpoint(tmp_path):
  """(before: KeyError)"""
  path = _hf_dir(tmp_path, weights=_good_weights())
  with pytest.raises(ValueError, match=r"ckpt: no tensor 'model.norm.weight' \(the config"):
    hf.load_hf_checkpoint(path)


@needs_fixture
def test_bf16_compute_is_about_3e_2_from_transformers_fp32():
  """What load_hf_checkpoint's docstring promises for the default bfloat16 compute."""
  path, ids, ref = fixture("tied")
  cfg, params = hf.load_hf_checkpoint(path)
  assert cfg.dtype == "bfloat16"
  err = float(np.max(np.abs(np.asarray(qwen3.Qwen3Model(cfg).apply(
      {"params": params}, jnp.asarray(ids, jnp.int32))) - ref)))
  assert 3e-3 < err < 1e-1, err
