"""Export to transformers Qwen3 (hf) and to fla's Parallax model, checked on CPU.

hf: export, read back with this package's HF loader (itself checked against transformers'
logits, tests/test_hf.py), logits equal; exporting the transformers-written fixture
reproduces its tensors. fla: export, read back with `load_fla_checkpoint` AND run through an
independent float64 NumPy forward written from fla's layer code (tensor names, RoPE on r,
r.k unscaled, eps 1e-5 per-head norms), logits equal. scripts/check_export_torch.py runs the
exported directories in torch itself (GPU machine: fla's kernels need Triton + CUDA).
"""
from __future__ import annotations

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from parallax_jax.models import export, fla, hf, qwen3
from parallax_jax.models.config import ModelConfig
from tests.test_generate import rand_params

V = 48
IDS = np.array([[3, 17, 5, 40, 22, 9, 31, 2, 11], [7, 7, 1, 0, 45, 19, 28, 6, 13]], np.int32)


def cfg_of(**kw):
  base = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=8, intermediate_size=40, max_seq_len=64, dtype="float32",
              init_std=0.3, implementation="xla", rope_theta=5e4, rms_norm_eps=1e-5)
  base.update(kw)
  return ModelConfig(**base)


def logits(cfg, params, ids=IDS):
  return np.asarray(qwen3.Qwen3Model(cfg).apply({"params": params}, jnp.asarray(ids)))


# --------------------------------------------------------------------------- hf
@pytest.mark.parametrize("kw", [
    dict(),
    dict(tie_embeddings=False, window=4, rms_norm_eps=1e-6),
    dict(bandwidth=5.0, scan_layers=True),
    dict(learnable_bandwidth=True),
], ids=["tied", "untied-window", "bandwidth-scan", "learnable-bandwidth"])
def test_hf_export_round_trip(tmp_path, kw):
  cfg = cfg_of(attention="softmax", **kw)
  params = rand_params(cfg, 1)
  if cfg.learnable_bandwidth:  # one bandwidth per layer: foldable into q_norm
    for i, h in enumerate((2.0, 4.5)):
      params[f"layers_{i}"]["attn"]["log_bandwidth"] = jnp.full((4,), math.log(h))
  notes = hf.save_hf_checkpoint(str(tmp_path), cfg, params, eos_id=5)
  assert any("bandwidth" in n for n in notes) == (cfg.bandwidth is not None
                                                  or cfg.learnable_bandwidth)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
  stored = json.load(open(tmp_path / "config.json"))
  assert stored["eos_token_id"] == 5 and stored["rope_parameters"]["rope_theta"] == 5e4
  cfg2, params2 = hf.load_hf_checkpoint(str(tmp_path), dtype="float32", attention="softmax",
                                        implementation="xla")
  assert cfg2.window == cfg.window and cfg2.tie_embeddings == cfg.tie_embeddings
  np.testing.assert_allclose(logits(cfg2, params2), logits(cfg, params), rtol=1e-5, atol=1e-5)


FIXTURE = os.environ.get("PARALLAX_HF_FIXTURE",
                         os.path.join(os.path.dirname(__file__), "hf_fixture", "data"))


@pytest.mark.skipif(not os.path.exists(os.path.join(FIXTURE, "untied", "model.safetensors")),
                    reason="HF fixture not built (tests/hf_fixture/make_fixture.py)")
@pytest.mark.parametrize("name", ["tied", "untied"])
def test_hf_export_reproduces_a_transformers_checkpoint(tmp_path, name):
  """A transformers-written Qwen3 read in and exported again: the same tensors (names,
  shapes, dtypes, values) and the same config values transformers reads."""
  path = os.path.join(FIXTURE, name)
  cfg, params = hf.load_hf_checkpoint(path, attention="softmax", dtype="float32")
  hf.save_hf_checkpoint(str(tmp_path), cfg, params)
  want, got = hf.read_hf_weights(path), hf.read_hf_weights(str(tmp_path))
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  a = json.load(open(os.path.join(path, "config.json")))
  b = json.load(open(tmp_path / "config.json"))
  for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim",
            "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_parameters",
            "tie_word_embeddings", "layer_types", "use_sliding_window", "model_type",
            "architectures", "hidden_act", "attention_bias", "max_position_embeddings"):
    assert b[k] == a[k], k


def test_hf_export_of_parallax_needs_zero_wr(tmp_path):
  cfg = cfg_of(r_norm=True, correction_gate=True)
  params = rand_params(cfg, 2)
  with pytest.raises(ValueError, match=r"hf export: W_R \(attn/r_proj\) is non-zero in layers "
                                       r"\[0, 1\].*fla format"):
    hf.save_hf_checkpoint(str(tmp_path / "a"), cfg, params)
  for i in range(2):
    attn = params[f"layers_{i}"]["attn"]
    attn["r_proj"]["kernel"] = jnp.zeros_like(attn["r_proj"]["kernel"])
  notes = hf.save_hf_checkpoint(str(tmp_path / "b"), cfg, params)
  assert any("W_R is zero" in n for n in notes)
  cfg2, params2 = hf.load_hf_checkpoint(str(tmp_path / "b"), dtype="float32",
                                        attention="softmax", implementation="xla")
  np.testing.assert_allclose(logits(cfg2, params2), logits(cfg, params), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(attention="lla"), "attention 'lla' .* has no Qwen3 equivalent"),
    (dict(attention="softmax", learnable_bandwidth=True),
     "layer 0: attn/log_bandwidth differs across heads"),
])
def test_hf_export_refuses(tmp_path, kw, match):
  cfg = cfg_of(**kw)
  with pytest.raises(ValueError, match=match):
    hf.save_hf_checkpoint(str(tmp_path), cfg, rand_params(cfg, 3))
  assert not os.path.exists(tmp_path / "config.json")


# --------------------------------------------------------------------------- fla
def fla_forward_numpy(path, ids):
  """float64 logits of an fla ParallaxForCausalLM directory, written from fla's code: pre-norm
  blocks (attn_norm, mlp_norm), per-head RMSNorm (eps 1e-5) on q, r, k, rotate-half RoPE on
  q, k and r, s1 = q.k / sqrt(D) (masked causal + window), s2 = r.k,
  o = O1/d1 (1 + d2/d1) - O2/d1, SwiGLU, final norm, lm_head (or the tied embedding)."""
  c = json.load(open(os.path.join(path, "config.json")))
  w = {k: np.asarray(v, np.float64) for k, v in
       hf.read_safetensors(os.path.join(path, "model.safetensors")).items()}
  d, nh, nkv = c["hidden_size"], c["num_heads"], c["num_kv_heads"] or c["num_heads"]
  dh, g, eps = d // nh, nh // nkv, c["norm_eps"]
  b, t = ids.shape

  def rms(x, scale, e):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + e) * scale

  inv = 1.0 / c["rope_theta"] ** (np.arange(0, dh, 2) / dh)
  f = np.arange(t)[:, None] * inv
  cos, sin = np.cos(np.concatenate([f, f], -1)), np.sin(np.concatenate([f, f], -1))

  def rope(x):  # [B, T, H, D]
    rot = np.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], -1)
    return x * cos[None, :, None] + rot * sin[None, :, None]

  i_, j_ = np.arange(t)[:, None], np.arange(t)[None]
  masked = (j_ > i_) | ((i_ - j_ >= c["window_size"]) if c["window_size"] else False)
  x = w["model.embeddings.weight"][ids]
  for n in range(c["num_hidden_layers"]):
    p = lambda k: w[f"model.layers.{n}.{k}"]
    h = rms(x, p("attn_norm.weight"), eps)
    heads = lambda name, k: (h @ p(f"attn.{name}_proj.weight").T).reshape(b, t, k, dh)
    q = rope(rms(heads("q", nh), p("attn.q_norm.weight"), 1e-5))
    r = rope(rms(heads("r", nh), p("attn.r_norm.weight"), 1e-5))
    k = np.repeat(rope(rms(heads("k", nkv), p("attn.k_norm.weight"), 1e-5)), g, axis=2)
    v = np.repeat(heads("v", nkv), g, axis=2)
    s1 = np.where(masked, -np.inf, np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh))
    p1 = np.exp(s1 - s1.max(-1, keepdims=True))
    p2 = p1 * np.einsum("bthd,bshd->bhts", r, k)
    d1, d2 = p1.sum(-1)[..., None], p2.sum(-1)[..., None]
    o = (np.einsum("bhts,bshd->bhtd", p1, v) / d1 * (1 + d2 / d1)
         - np.einsum("bhts,bshd->bhtd", p2, v) / d1)
    x = x + o.transpose(0, 2, 1, 3).reshape(b, t, d) @ p("attn.o_proj.weight").T
    h = rms(x, p("mlp_norm.weight"), eps)
    gate = h @ p("mlp.gate_proj.weight").T
    x = x + (gate / (1 + np.exp(-gate)) * (h @ p("mlp.up_proj.weight").T)) @ p(
        "mlp.down_proj.weight").T
  x = rms(x, w["model.norm.weight"], eps)
  return x @ w.get("lm_head.weight", w["model.embeddings.weight"]).T


FLA_CASES = {
    "tied-gqa": dict(),
    "untied-window-mha": dict(tie_embeddings=False, window=3, num_kv_heads=4),
    "bandwidth-scan": dict(bandwidth=3.0, scan_layers=True),
    "r_scale": dict(r_scale=0.25),  # folded into r_norm's weight
}


@pytest.mark.parametrize("case", sorted(FLA_CASES))
def test_fla_export_round_trip(tmp_path, case):
  cfg = cfg_of(r_norm=True, **FLA_CASES[case])
  params = rand_params(cfg, 4)
  notes = fla.save_fla_checkpoint(str(tmp_path), cfg, params, eos_id=2)
  assert not any("eps" in n for n in notes), notes
  stored = json.load(open(tmp_path / "config.json"))
  assert stored["model_type"] == "parallax" and stored["qk_norm"] is True
  assert stored["window_size"] == cfg.window and stored["eos_token_id"] == 2
  want = logits(cfg, params)
  np.testing.assert_allclose(fla_forward_numpy(str(tmp_path), IDS), want, rtol=1e-6, atol=2e-5)
  cfg2, params2 = fla.load_fla_checkpoint(str(tmp_path), dtype="float32", implementation="xla")
  assert (cfg2.head_norm_eps, cfg2.r_norm, cfg2.attention) == (1e-5, True, "parallax")
  np.testing.assert_allclose(logits(cfg2, params2), want, rtol=1e-5, atol=1e-5)


def test_fla_export_notes_the_head_norm_eps(tmp_path):
  """A model with eps 1e-6 exports with a note: fla's per-head norms use 1e-5."""
  cfg = cfg_of(r_norm=True, rms_norm_eps=1e-6)
  params = rand_params(cfg, 5)
  notes = fla.save_fla_checkpoint(str(tmp_path), cfg, params)
  assert any("eps 1e-06 becomes fla's fixed 1e-05" in n for n in notes), notes
  cfg2, params2 = fla.load_fla_checkpoint(str(tmp_path), dtype="float32", implementation="xla")
  fla_logits = fla_forward_numpy(str(tmp_path), IDS)
  # head_norm_eps=1e-5 is what makes the reader fla's model (with 1e-6: 6e-5 off)
  np.testing.assert_allclose(logits(cfg2, params2), fla_logits, rtol=1e-6, atol=2e-5)
  shift = np.abs(fla_logits - logits(cfg, params)).max()
  assert 1e-7 < shift < 1e-3, shift


@pytest.mark.parametrize("kw, match", [
    (dict(attention="softmax"), "learned-probe affine member.*softmax.*hf format"),
    (dict(attention="lla"), "attention 'lla'"),
    (dict(r_norm=True, correction_gate=True), "correction_gate"),
    (dict(r_norm=True, head_dim=16), r"head_dim 16: fla derives it as hidden_size / num_heads"),
    (dict(), "r_norm is False"),
    (dict(r_norm=True, learnable_bandwidth=True), "layer 0: attn/log_bandwidth differs"),
])
def test_fla_export_refuses_what_fla_cannot_represent(tmp_path, kw, match):
  cfg = cfg_of(**kw)
  with pytest.raises(ValueError, match=f"fla export: .*{match}"):
    fla.save_fla_checkpoint(str(tmp_path), cfg, rand_params(cfg, 6))
  assert not os.path.exists(tmp_path / "config.json")


# --------------------------------------------------------------------------- CLI
def test_export_cli(tmp_path, capsys, monkeypatch):
  cfg = cfg_of(r_norm=True)
  params = rand_params(cfg, 7)
  src = qwen3.save_checkpoint(str(tmp_path / "ckpt"), params, cfg)
  out = str(tmp_path / "fla")
  assert export.main(["--checkpoint", src, "--format", "fla", "--out", out]) == 0
  assert capsys.readouterr().out.strip() == out
  cfg2, params2 = fla.load_fla_checkpoint(out, dtype="float32", implementation="xla")
  np.testing.assert_allclose(logits(cfg2, params2), logits(cfg, params), rtol=1e-5, atol=1e-5)
  # a refusal is one line, named as the command was invoked (before: argparse's usage block
  # first, and "python -m parallax_jax.models.export" for the installed parallax-export)
  for argv0, prog in (("/venv/bin/parallax-export", "parallax-export"),
                      (export.__file__, "python -m parallax_jax.models.export")):
    monkeypatch.setattr("sys.argv", [argv0])
    with pytest.raises(SystemExit) as e:
      export.main(["--checkpoint", src, "--format", "hf", "--out", str(tmp_path / "hf")])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: hf export: W_R (attn/r_proj) is non-zero"), err
  for argv, match in (
      (["--checkpoint", str(tmp_path / "nope"), "--format", "fla", "--out", out],
       "no such checkpoint directory"),
      (["--checkpoint", src, "--format", "onnx", "--out", out], "argument --format: invalid"),
      # a non-empty --out (here the checkpoint itself) is never written into
      (["--checkpoint", src, "--format", "fla", "--out", src], "is not empty")):
    with pytest.raises(SystemExit) as e:
      export.main(argv)
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1 and match in err[0], err


def test_torch_check_script():
  """scripts/check_export_torch.py: the exported directories in transformers (and fla, on a
  CUDA machine with fla installed) against JAX's float32 logits. Skipped without torch."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts",
                      "check_export_torch.py")
  spec = importlib.util.spec_from_file_location("check_export_torch", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.main([]) == 0
