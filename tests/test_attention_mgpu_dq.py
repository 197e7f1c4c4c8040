"""Mosaic GPU (Hopper) dq/dr kernel (pallas_kernels/attention_mgpu_dq) and its wiring in the
front (`attention.mosaic_dq_call`, `BlockSizes.mosaic_dq`).

CPU:
  * the kernel in the Mosaic GPU interpreter against the gradients of a dense float32
    reference (`test_attention_mgpu.reference`), given the reference's residuals. Interpreted,
    each consumer warpgroup loads its own key tiles (no producer: see `_dq`), and the dQ, dR
    products run as plain dots (no register-LHS wgmma in the interpreter).
  * a NaN in a key's value marks the query rows whose products meet it; `mosaic_dq_call`'s
    Triton fixup launch repairs them to the Triton kernel's result.
  * the kernel lowers for CUDA on an abstract H100 (wgmma with a register operand, TMA,
    setmaxnreg), and so does a training gradient with `BlockSizes(mosaic_dq=True)`.
GPU (`-m gpu`, Hopper): the compiled kernel (producer ring, skipped tiles) against the
reference, and gradients through `parallax_flash_attention` with and without it.
"""
from __future__ import annotations

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention
from pallas_kernels import attention_mgpu_dq as dm
from pallas_kernels import attention_triton as tr
from tests.kernels import (has_hopper, interpret_params, lower_h100, mosaic_modules,
                           triton_modules)
from tests.test_attention_mgpu import Case, inputs, reference, rel, segment_ids
from tests.test_attention_mgpu_dkv import _tcfg

warnings.filterwarnings("ignore", category=DeprecationWarning)

# max |x - ref| / max |ref| of dq and dr, as the forward's
TOL = {jnp.bfloat16: 1e-2, jnp.float16: 4e-3}


def residuals_and_grads(c: Case, seed=0):
  """Inputs, the kernel's residual arguments (lse, delta, tbar, gbar from the reference's
  o, vbar in float32) and the reference dq, dr (dr None for softmax)."""
  q, k, v, r, scale = inputs(c, seed)
  qs, ks = segment_ids(c, seed)
  do = jax.random.normal(jax.random.PRNGKey(seed + 11), q.shape, jnp.float32).astype(q.dtype)
  o, lse, tbar, vbar = reference(q, k, v, r, scale, c.causal, qs, ks)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  delta = jnp.einsum("bthd,bthd->bht", o, f32(do))
  gbar = None if r is None else jnp.einsum("bthd,bthd->bht", vbar, f32(do))
  _, vjp = jax.vjp(lambda q, r: reference(q, k, v, r, scale, c.causal, qs, ks)[0],
                   f32(q), f32(r))
  dq, dr = vjp(f32(do))
  return (q, k, v, r, do, lse, delta, tbar, gbar, scale, qs, ks), (dq, dr)


CASES = {
    "bf16_parallax_causal_d64_gqa2": (Case(), None),
    "bf16_parallax_causal_d128_gqa4": (Case(T=128, S=128, D=128, Hq=4, Hkv=1), None),
    "fp16_softmax_noncausal_d128": (Case(D=128, dtype=jnp.float16, parallax=False,
                                         causal=False), None),
    "bf16_parallax_causal_T<S_d128": (Case(T=128, S=384, D=128), None),
    "bf16_parallax_causal_T<S_d64_bk64": (Case(T=128, S=384), dm.DqConfig(block_k=64)),
    "bf16_parallax_packed_segments_3stages": (Case(segments="packed"),
                                              dm.DqConfig(num_stages=3)),
    "bf16_parallax_packed_segments_B2": (Case(B=2, segments="packed"), None),
    "bf16_softmax_causal_packed_segments_d128": (Case(D=128, parallax=False,
                                                      segments="packed"), None),
    "bf16_parallax_noncausal_cross_segments_arrayscale": (
        Case(causal=False, segments="cross", array_scale=True), None),
    "bf16_parallax_causal_races": (Case(races=True), None),
    "bf16_parallax_causal_d128_split_scores": (Case(T=128, S=128, D=128, Hq=4, Hkv=1),
                                               dm.DqConfig(split_scores=True)),
}

GPU_CASES = {
    "bf16_parallax_causal_d128_L1024": (Case(B=2, T=1024, S=1024, Hq=8, Hkv=4, D=128), None),
    "bf16_parallax_causal_d64_L2048_gqa8": (Case(B=1, T=2048, S=2048, Hq=8, Hkv=1, D=64),
                                            None),
    "bf16_softmax_noncausal_d128_3stages": (Case(B=1, T=1024, S=2048, Hq=4, Hkv=2, D=128,
                                                 parallax=False, causal=False),
                                            dm.DqConfig(num_stages=3)),
    "fp16_parallax_causal_T<S_d128": (Case(B=1, T=1024, S=2048, Hq=4, Hkv=2, D=128,
                                           dtype=jnp.float16), None),
    "bf16_parallax_packed_segments_d128": (Case(B=2, T=2048, S=2048, Hq=8, Hkv=4, D=128,
                                                segments="packed"), None),
    "bf16_parallax_cross_segments_arrayscale": (Case(B=1, T=1024, S=1024, Hq=4, Hkv=2,
                                                     causal=False, segments="cross",
                                                     array_scale=True), None),
}


class TestMgpuDq:
  """dq, dr against the reference's, compiled on a Hopper GPU."""
  INTERPRET = False
  NEEDS = "hopper"
  CASES = GPU_CASES

  def test_matches_reference(self, name):
    c, cfg = self.CASES[name]
    (q, k, v, r, do, lse, delta, tbar, gbar, scale, qs, ks), (rdq, rdr) = residuals_and_grads(c)
    ok, why = dm.supported(q, k, v, r, causal=c.causal, q_segment_ids=qs, kv_segment_ids=ks,
                           config=cfg, platform="interpret" if self.INTERPRET else None)
    assert ok, why
    if c.races:
      from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    def f(q, k, v, r, do, lse, delta, tbar, gbar):
      return dm.parallax_dq_mgpu(q, k, v, r, do, lse, delta, tbar, gbar, scale=scale,
                                 causal=c.causal, q_segment_ids=qs, kv_segment_ids=ks,
                                 config=cfg,
                                 interpret=interpret_params(c.races) if self.INTERPRET else None)

    q = q.at[:].set(q)  # a fresh buffer: the kernel must not read its outputs' memory
    dq, dr, rowsum = (f if self.INTERPRET else jax.jit(f))(q, k, v, r, do, lse, delta, tbar,
                                                           gbar)
    if c.races:
      assert not gpu_callbacks.get_races().races_found, "the race detector reported a race"
    assert dq.shape == q.shape and dq.dtype == q.dtype
    assert (dr is None) == (r is None)
    assert rowsum.shape == (c.B, c.Hq, c.T) and bool(jnp.all(jnp.isfinite(rowsum)))
    errs = {"dq": rel(dq, rdq)}
    if r is not None:
      errs["dr"] = rel(dr, rdr)
    assert max(errs.values()) < TOL[c.dtype], errs
    print(name, errs)


class TestMgpuDqInterpret(TestMgpuDq):
  """The same in the Mosaic GPU interpreter; CI runs three cases (both members and dtypes,
  causal and not, GQA 4, packed segments, 3 stages, block_k 64 (Parallax D=128) and 128
  (the others)), the rest are `slow`."""
  INTERPRET = True
  CASES = CASES
  CI_CASES = ["bf16_parallax_causal_d128_gqa4", "fp16_softmax_noncausal_d128",
              "bf16_parallax_packed_segments_3stages"]


def test_nonfinite_query_rows_are_marked_and_fixed():
  """NaN in the value of key 100 reaches, through 0 * NaN in the masked tiles' products,
  the dq rows of queries that never see it; the kernel's row sums mark them and the
  Triton fixup launch recomputes those query tiles: the result equals the Triton kernel's."""
  c = Case(T=128, S=128, D=64)
  q, k, v, r, scale = inputs(c, seed=5)
  v = v.at[:, 100].set(jnp.nan)
  do = jax.random.normal(jax.random.PRNGKey(9), q.shape, jnp.float32).astype(q.dtype)
  tcfg = _tcfg(q, k, r, True, False)
  sc = jnp.full((c.Hq,), scale, jnp.float32)
  o, lse, tbar, vbar = tr.fwd_call(tcfg, q, k, v, r, sc, None, None)
  args = (q, k, v, r, do, o, vbar, lse, tbar, sc, None, None)
  f32 = lambda x: x.astype(jnp.float32)
  delta = jnp.einsum("bthd,bthd->bht", f32(o), f32(do))
  gbar = jnp.einsum("bthd,bthd->bht", f32(vbar), f32(do))
  _, _, rowsum = dm.parallax_dq_mgpu(q, k, v, r, do, lse, delta, tbar, gbar, scale=scale,
                                     interpret=interpret_params())
  assert not np.isfinite(np.asarray(rowsum)[:, :, :100]).all()  # rows that never see key 100
  got = attention.mosaic_dq_call(tcfg, *args, interpret=interpret_params())
  want = tr.dq_call(tcfg, *args)
  for a, b in zip(got[:4], want[:4]):  # dq, dr, delta, gbar
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    fin = np.isfinite(b)
    assert rel(a[fin], b[fin]) < 1e-2
  assert np.isfinite(np.asarray(got[0], np.float32)[:, :100]).all()


def test_supported():
  z = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  q, kv = z(1, 256, 4, 128), z(1, 256, 2, 128)
  sup = lambda *a, **kw: dm.supported(*a, **{"platform": "cuda", **kw})
  assert sup(q, kv, kv, q, causal=True) == (True, "")
  assert "head_dim" in sup(z(1, 256, 4, 96), z(1, 256, 2, 96), z(1, 256, 2, 96))[1]
  assert "multiple of 128" in sup(z(1, 192, 4, 128), z(1, 192, 2, 128), z(1, 192, 2, 128),
                                  causal=False)[1]
  assert "block_k" in sup(q, z(1, 320, 2, 128), z(1, 320, 2, 128), causal=False,
                          config=dm.DqConfig(block_k=128))[1]
  assert "window" in sup(q, kv, kv, window=16)[1]
  assert not sup(z(1, 512, 4, 128), kv, kv, causal=True)[0]  # T > S causal
  with pytest.raises(ValueError, match="block_k"):
    dm.DqConfig(block_k=32)
  if not has_hopper():
    assert not dm.supported(q, kv, kv, q)[0]  # default: checks the actual device


# ----------------------------------------------------------------------------- CUDA lowering


@pytest.mark.parametrize("D,parallax,causal,seg,split", [(128, True, True, False, False),
                                                         (64, False, False, True, False),
                                                         (128, True, True, True, True)])
def test_cuda_lowering_abstract_h100(D, parallax, causal, seg, split):
  """Mosaic GPU's Python lowering in full and the module verifier, without a GPU."""
  sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  q, kv, row = sd(2, 1024, 8, D), sd(2, 1024, 4, D), sd(2, 8, 1024, dt=jnp.float32)
  ids = sd(2, 1024, dt=jnp.int32) if seg else None

  def f(q, k, v, r, do, lse, delta, tbar, gbar, ids):
    return dm.parallax_dq_mgpu(q, k, v, r, do, lse, delta, tbar, gbar, scale=0.1,
                               config=dm.DqConfig(split_scores=True) if split else None,
                               causal=causal, q_segment_ids=ids, kv_segment_ids=ids)

  p = parallax
  bk = dm.default_config(D, p).block_k
  mods = mosaic_modules(lower_h100(f, q, kv, kv, q if p else None, q, row, row,
                                   row if p else None, row if p else None, ids))
  assert len(mods) == 1
  ops = set(re.findall(rb"[a-z_]+(?:\.[a-z_0-9]+)+", mods[0]))
  assert b"wgmma.mma_async.sync.aligned.m64n%dk16.f32.bf16.bf16" % bk in ops  # Q K^T, dO V^T
  assert b"wgmma.mma_async.sync.aligned.m64n%dk16.f32.bf16.bf16" % D in ops  # dQ (, dR)
  assert b"nvvm.cp.async.bulk.tensor.shared.cluster.global" in ops  # TMA loads
  assert b"nvvm.cp.async.bulk.tensor.global.shared.cta" in ops  # TMA stores
  assert b"setmaxnreg.inc.sync.aligned.u32" in ops and b"setmaxnreg.dec.sync.aligned.u32" in ops


def test_training_gradient_lowers_with_mosaic_dq(monkeypatch):
  """`BlockSizes(mosaic_dq=True)`: a training gradient lowers for an H100 with the Mosaic
  dq/dr kernel and the Triton dq fixup launch in place of the Triton dq/dr kernel."""
  monkeypatch.setattr(dm, "hopper_platform", lambda platform: (True, ""))
  sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  q, kv = sd(1, 1024, 8, 128), sd(1, 1024, 4, 128)
  bs = dataclasses.replace(tr.default_block_sizes(128, True), mosaic_dq=True)

  def loss(q, k, v, r):
    o = attention.parallax_flash_attention(q, k, v, r, scale=0.1, block_sizes=bs)
    return jnp.sum(o.astype(jnp.float32))

  low = lower_h100(jax.grad(loss, argnums=(0, 3)), q, kv, kv, q)
  names = [n for n, _ in triton_modules(low)]
  assert "parallax_bwd_dq_fixup" in names and "parallax_bwd_dq" not in names, names
  assert len(mosaic_modules(low)) >= 1


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not has_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("segments,poison", [(False, False), (True, False), (True, True)])
def test_gpu_gradients_match_triton(segments, poison):
  """Gradients through `parallax_flash_attention` with the Mosaic dq/dr kernel equal the
  Triton kernel's (NaN at a masked position: the fixup repairs what the kernel marks)."""
  c = Case(B=2, T=2048, S=2048, Hq=8, Hkv=4, D=128, segments="packed" if segments else None)
  q, k, v, r, scale = inputs(c, seed=2)
  qs, ks = segment_ids(c, seed=2)
  if poison:
    v = v.at[:, -1].set(jnp.nan)  # the last key: seen by the last row only
  w = jax.random.normal(jax.random.PRNGKey(4), q.shape, jnp.float32)

  def grads(mosaic):
    bs = dataclasses.replace(tr.default_block_sizes(128, True), mosaic_dq=mosaic)
    loss = lambda q, k, v, r: jnp.sum(attention.parallax_flash_attention(
        q, k, v, r, scale=scale, q_segment_ids=qs, kv_segment_ids=ks,
        block_sizes=bs).astype(jnp.float32) * w)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, r)

  for name, a, b in zip(("dq", "dk", "dv", "dr"), grads(True), grads(False)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
    fin = np.isfinite(b)
    assert rel(a[fin], b[fin]) < 1e-2, name
