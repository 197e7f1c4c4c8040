"""`fused_cross_entropy`: chunked LM head + cross-entropy with its gradient computed in the
forward, against the unfused path (`logits_dot` logits -> `token_losses`)."""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallax_jax.nn.layers import logits_dot
from parallax_jax.nn.losses import chunked_cross_entropy, fused_cross_entropy
from tests.kernels import checkerboard
from train.step import token_losses

B, T, D, V = 3, 37, 64, 1000  # 111 tokens: no chunk size below divides it evenly
Z = 1e-2


def _inputs(layout, x_dtype=jnp.float32, bad_masked_targets=True, seed=0):
  kx, kw, kt, km = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(kx, (B, T, D), jnp.float32).astype(x_dtype)
  w = 0.05 * jax.random.normal(kw, (V, D) if layout == "vd" else (D, V), jnp.float32)
  t = jax.random.randint(kt, (B, T), 0, V)
  m = jax.random.uniform(km, (B, T)) > 0.25
  if bad_masked_targets:  # padding may hold any id: must be ignored, not gathered
    t = jnp.where(m, t, jnp.where(jnp.arange(T) % 2 == 0, -1, V + 7))
  return x, w, t, m


def _reference(x, w, t, m, dtype, layout, z=Z):
  """The unfused path; the targets clipped since the reference gathers every position."""
  nll, zsq, n = token_losses(logits_dot(x, w, dtype, layout), jnp.clip(t, 0, V - 1), m)
  return nll + z * zsq, (nll, zsq, n)


def _fused(x, w, t, m, dtype, layout, chunk, z=Z):
  return fused_cross_entropy(x, w, t, m, z_loss=z, dtype=dtype, w_layout=layout,
                             chunk_tokens=chunk)


def _close(a, b, rtol):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.max(np.abs(a - b)) <= rtol * max(np.max(np.abs(b)), 1e-30), (
      np.max(np.abs(a - b)), np.max(np.abs(b)))


@checkerboard("layout,dtype,rtol,chunk", ["vd", "dv"], [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-4)],
              [16, 111, 4096])
def test_values_match_unfused(layout, dtype, rtol, chunk):
  x, w, t, m = _inputs(layout)
  l0, a0 = _reference(x, w, t, m, dtype, layout)
  for fn in (fused_cross_entropy, chunked_cross_entropy):
    l1, a1 = jax.jit(lambda *a: fn(*a, z_loss=Z, dtype=dtype, w_layout=layout,
                                   chunk_tokens=chunk))(x, w, t, m)
    assert l1.dtype == jnp.float32 and all(a.dtype == jnp.float32 for a in a1)
    np.testing.assert_allclose(float(l1), float(l0), rtol=rtol)
    for u, v in zip(a1, a0):
      np.testing.assert_allclose(float(u), float(v), rtol=rtol)
    assert float(a1[2]) == float(jnp.sum(m))


def test_mask_as_int_and_leading_shapes():
  x, w, t, m = _inputs("vd")
  ref = _fused(x, w, t, m, jnp.float32, "vd", 16)
  got = _fused(x.reshape(B * T, D), w, t.reshape(-1), m.astype(jnp.int32).reshape(-1),
               jnp.float32, "vd", 16)
  np.testing.assert_allclose(np.asarray(jax.tree.leaves(got)), np.asarray(jax.tree.leaves(ref)),
                             rtol=1e-6)


def test_unmasked_out_of_range_target_is_nan():
  x, w, t, m = _inputs("vd")
  t = t.at[0, 0].set(V)
  m = m.at[0, 0].set(True)
  loss, (nll, zsq, _) = _fused(x, w, t, m, jnp.float32, "vd", 16)
  assert np.isnan(float(loss)) and np.isnan(float(nll)) and np.isfinite(float(zsq))


@pytest.mark.parametrize("layout", ["vd", "dv"])
@pytest.mark.parametrize("dtype, x_dtype, rtol", [(jnp.float32, jnp.float32, 1e-5),
                                                  (jnp.bfloat16, jnp.bfloat16, 2e-2),
                                                  (jnp.bfloat16, jnp.float32, 1e-2)])
def test_gradients_match_unfused(layout, dtype, x_dtype, rtol):
  x, w, t, m = _inputs(layout, x_dtype)
  vg = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
  (l0, _), (gx0, gw0) = vg(lambda x, w: _reference(x, w, t, m, dtype, layout))(x, w)
  (l1, _), (gx1, gw1) = vg(lambda x, w: _fused(x, w, t, m, dtype, layout, 16))(x, w)
  assert gx1.dtype == x.dtype and gw1.dtype == w.dtype and gw1.shape == w.shape
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-4)
  _close(gx1, gx0, rtol)
  _close(gw1, gw0, rtol)


def test_gradient_one_argument_and_scaled_cotangent():
  """Only w differentiated (x not perturbed: no dx work); a cotangent of 3 scales it."""
  x, w, t, m = _inputs("vd")
  gw0 = jax.grad(lambda w: 3.0 * _reference(x, w, t, m, jnp.float32, "vd")[0])(w)
  gw1 = jax.jit(jax.grad(lambda w: 3.0 * _fused(x, w, t, m, jnp.float32, "vd", 16)[0]))(w)
  _close(gw1, gw0, 1e-5)
  gx1 = jax.grad(lambda x: _fused(x, w, t, m, jnp.float32, "vd", 16)[0])(x)
  gx0 = jax.grad(lambda x: _reference(x, w, t, m, jnp.float32, "vd")[0])(x)
  _close(gx1, gx0, 1e-5)


def test_aux_outputs_are_not_differentiable():
  x, w, t, m = _inputs("vd")
  for k in range(3):
    with pytest.raises(NotImplementedError, match="only loss_sum is differentiable"):
      jax.grad(lambda x: _fused(x, w, t, m, jnp.float32, "vd", 16)[1][k])(x)
  with pytest.raises(NotImplementedError, match="only loss_sum"):
    jax.grad(lambda x: sum(jax.tree.leaves(_fused(x, w, t, m, jnp.float32, "vd", 16))))(x)


def test_scan_over_micro_batches_under_jit():
  """The train step's pattern: value_and_grad(has_aux) per micro-batch inside lax.scan."""
  xs, ws, ts, ms = zip(*(_inputs("vd", seed=s) for s in (1, 2)))
  xs, ts, ms, w = jnp.stack(xs), jnp.stack(ts), jnp.stack(ms), ws[0]

  def run(loss):
    grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

    def body(carry, mb):
      gw_acc, sums = carry
      (_, aux), (gx, gw) = grad_fn(mb[0], w, mb[1], mb[2])
      return (gw_acc + gw, jax.tree.map(jnp.add, sums, aux)), gx
    zero = jnp.float32(0)
    return jax.jit(lambda: jax.lax.scan(body, (jnp.zeros_like(w), (zero, zero, zero)),
                                        (xs, ts, ms)))()

  ref = run(lambda x, w, t, m: _reference(x, w, t, m, jnp.float32, "vd"))
  got = run(lambda x, w, t, m: _fused(x, w, t, m, jnp.float32, "vd", 16))
  (gw0, s0), gx0 = ref
  (gw1, s1), gx1 = got
  np.testing.assert_allclose(np.asarray(s1), np.asarray(s0), rtol=1e-5)
  _close(gw1, gw0, 1e-5)
  _close(gx1, gx0, 1e-5)


def _vocab_tensor_sizes(hlo: str, vocab: int):
  """Element counts of every f32 array in HLO text that has a `vocab`-sized dimension."""
  out = []
  for dims in re.findall(r"\bf32\[([0-9,]+)\]", hlo):
    shape = [int(s) for s in dims.split(",")]
    if vocab in shape:
      out.append(math.prod(shape))
  return out


def test_no_full_float32_logits_in_compiled_step():
  n_tok, chunk = 4 * 64, 64
  x = jax.ShapeDtypeStruct((4, 64, D), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((V, D), jnp.float32)
  t = jax.ShapeDtypeStruct((4, 64), jnp.int32)
  m = jax.ShapeDtypeStruct((4, 64), jnp.bool_)

  def compiled(loss):
    f = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return jax.jit(f).lower(x, w, t, m).compile().as_text()

  fused = compiled(lambda x, w, t, m: _fused(x, w, t, m, jnp.bfloat16, "vd", chunk))
  sizes = _vocab_tensor_sizes(fused, V)
  assert sizes and max(sizes) <= chunk * V, sorted(set(sizes))
  # the check can fail: the unfused path holds f32 logits for every token
  unfused = compiled(lambda x, w, t, m: _reference(x, w, t, m, jnp.bfloat16, "vd"))
  assert max(_vocab_tensor_sizes(unfused, V)) >= n_tok * V


def test_bad_arguments():
  x, w, t, m = _inputs("vd")
  with pytest.raises(ValueError, match="w_layout"):
    _fused(x, w, t, m, jnp.float32, "xy", 16)
  with pytest.raises(ValueError, match="does not match"):
    _fused(x, w, t, m, jnp.float32, "dv", 16)
  with pytest.raises(ValueError, match="chunk_tokens"):
    _fused(x, w, t, m, jnp.float32, "vd", 0)
  with pytest.raises(ValueError, match="leading shape"):
    _fused(x, w, t[:, :-1], m, jnp.float32, "vd", 16)
  with pytest.raises(ValueError, match="integers"):
    _fused(x, w, t.astype(jnp.float32), m, jnp.float32, "vd", 16)


# --------------------------------------------------------------------------- model / trainer
def test_model_return_hidden_matches_logits():
  from parallax_jax.models import Qwen3Model, init_params, presets
  for tie in (True, False):
    cfg = presets.tiny(vocab_size=320, max_seq_len=64, implementation="xla",
                       tie_embeddings=tie, num_layers=1)
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    tok = jax.random.randint(jax.random.key(1), (2, 16), 0, 320)
    model = Qwen3Model(cfg)
    layout = []

    def hidden(p, tok):
      h, w, lay = model.apply({"params": p}, tok, return_hidden=True)
      layout.append(lay)
      return h, w

    logits = jax.jit(model.apply)({"params": params}, tok)
    h, w = jax.jit(hidden)(params, tok)
    assert layout == ["vd" if tie else "dv"] and h.shape == (2, 16, cfg.hidden_size)
    np.testing.assert_array_equal(
        np.asarray(w), np.asarray(params["embed"]["embedding"] if tie
                                  else params["lm_head"]["kernel"]))
    np.testing.assert_allclose(np.asarray(logits_dot(h, w, cfg.compute_dtype, layout[0])),
                               np.asarray(logits), atol=1e-5)
  with pytest.raises(ValueError, match="return_hidden"):
    model.apply({"params": params}, tok[:, :1], cache=object(), return_hidden=True)


def _trainer(chunk, *, tie=True, dtype="float32", accum=2):
  from parallax_jax.models import presets
  from train.config import (DataConfig, MeshConfig, OptimizerConfig, RunConfig, ScheduleConfig,
                            TrainConfig)
  from train.mesh import make_mesh
  from train.step import Trainer
  cfg = TrainConfig(
      name="test",
      # one layer: the loss sits after the last one
      model=presets.tiny(vocab_size=320, max_seq_len=64, implementation="xla",
                         tie_embeddings=tie, dtype=dtype, num_layers=1),
      mesh=MeshConfig(data=1),
      data=DataConfig(path="unused", seq_len=32, global_batch_size=4, grad_accum=accum,
                      auto_prepare=False),
      optimizer=OptimizerConfig(name="muon", lr=1e-2, z_loss=1e-3, loss_chunk_tokens=chunk),
      schedule=ScheduleConfig(warmup_steps=1),
      run=RunConfig(steps=4, progress=False))
  return Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))


def _host_batch(seed=0):
  """Two packed documents per row plus padding (segment id 0, target -1 there)."""
  r = np.random.default_rng(seed)
  seg = np.ones((4, 32), np.int32)
  seg[:, 12:] = 2
  seg[:, 27:] = 0
  tok = r.integers(0, 320, (4, 33)).astype(np.int32)
  pos = np.where(np.arange(32) < 12, np.arange(32), np.arange(32) - 12).astype(np.int32)
  return {"inputs": tok[:, :-1], "targets": np.where(seg > 0, tok[:, 1:], -1).astype(np.int32),
          "segment_ids": seg, "positions": np.broadcast_to(pos, (4, 32)).copy()}


@pytest.mark.parametrize("tie, dtype, rtol", [pytest.param(True, "float32", 1e-5, marks=pytest.mark.slow),
                                              (False, "bfloat16", 1e-4)])
def test_train_step_matches_unfused(tie, dtype, rtol):
  res = {}
  for chunk in (0, 24):  # 64 tokens per micro-batch: 3 chunks of 22 (2 padding)
    tr = _trainer(chunk, tie=tie, dtype=dtype)
    st = tr.init_state(0)
    out = []
    for s in range(2):
      hb = _host_batch(s)
      st, m = tr.train_step(st, tr.device_batch(hb, accum=2))
      out += [float(m["loss"]), float(m["z_loss"]), float(m["grad_norm"]), float(m["tokens"])]
    ev = jax.device_get(tr.eval_step(st["params"], tr.device_batch(_host_batch(5))))
    out += [float(ev["nll"]), float(ev["tokens"]), float(ev["nll_repeat"]),
            float(ev["tokens_repeat"])]
    res[chunk] = out
  assert all(np.isfinite(res[0]))
  np.testing.assert_allclose(res[24], res[0], rtol=rtol)


def test_config_knob_validated():
  from train.config import OptimizerConfig, TrainConfig, apply_overrides
  assert OptimizerConfig().loss_chunk_tokens == 4096
  cfg = apply_overrides(TrainConfig(), ["optimizer.loss_chunk_tokens=0"])
  assert cfg.optimizer.loss_chunk_tokens == 0
  for bad, match in (("-1", "optimizer.loss_chunk_tokens: must be an int >= 0"),
                     ("1.5", "optimizer.loss_chunk_tokens: expected an int")):
    with pytest.raises(ValueError, match=match):
      apply_overrides(TrainConfig(), [f"optimizer.loss_chunk_tokens={bad}"])
  with pytest.raises(ValueError, match="loss_chunk_tokens"):
    dataclasses.replace(OptimizerConfig(), loss_chunk_tokens=True)
