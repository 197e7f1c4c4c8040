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

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention
from pallas_kernels import attention_mgpu_dq as dm
from pallas_kernels import attention_triton as tr
from tests.kernels import has_hopper, interpret_params
from tests import mgpu_bwd_cases as bwd
from tests.mgpu_bwd_cases import with_config
from tests.test_attention_mgpu import Case, inputs, rel

warnings.filterwarnings("ignore", category=DeprecationWarning)

CASES = {**with_config(bwd.CASES, dm.DqConfig),
         "bf16_parallax_causal_T<S_d64_bk64": (Case(T=128, S=384), dm.DqConfig(block_k=64))}
GPU_CASES = with_config(bwd.GPU_CASES, dm.DqConfig)


class TestMgpuDq:
  """dq, dr against the reference's, compiled on a Hopper GPU."""
  INTERPRET = False
  NEEDS = "hopper"
  CASES = GPU_CASES

  def test_matches_reference(self, name):
    c, cfg = self.CASES[name]
    (q, _, _, r, *_), (dq, dr, rowsum), ref = bwd.run_case(dm, dm.parallax_dq_mgpu, c, cfg,
                                                           self.INTERPRET)
    assert dq.shape == q.shape and dq.dtype == q.dtype
    assert (dr is None) == (r is None)
    assert rowsum.shape == (c.B, c.Hq, c.T) and bool(jnp.all(jnp.isfinite(rowsum)))
    errs = {"dq": rel(dq, ref["q"])}
    if r is not None:
      errs["dr"] = rel(dr, ref["r"])
    assert max(errs.values()) < bwd.TOL[c.dtype], errs
    print(name, errs)


class TestMgpuDqInterpret(TestMgpuDq):
  """The same in the Mosaic GPU interpreter; CI runs three cases (both members and dtypes,
  causal and not, GQA 4, packed segments, 3 stages, block_k 64 (Parallax D=128) and 128
  (the others)), the rest are `slow`."""
  INTERPRET = True
  CASES = CASES
  CI_CASES = bwd.CI_CASES


def test_nonfinite_query_rows_are_marked_and_fixed():
  """NaN in the value of key 100 reaches, through 0 * NaN in the masked tiles' products,
  the dq rows of queries that never see it; the kernel's row sums mark them and the
  Triton fixup launch recomputes those query tiles: the result equals the Triton kernel's."""
  c = Case(T=128, S=128, D=64)
  q, k, v, r, scale = inputs(c, seed=5)
  v = v.at[:, 100].set(jnp.nan)
  do = jax.random.normal(jax.random.PRNGKey(9), q.shape, jnp.float32).astype(q.dtype)
  tcfg = bwd.triton_config(q, k, r, True, False)
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
  cfg = dm.DqConfig(split_scores=True) if split else dm.default_config(D, parallax)
  bwd.check_cuda_lowering(dm.parallax_dq_mgpu, cfg, D, parallax, causal, seg, cfg.block_k)


def test_training_gradient_lowers_with_mosaic_dq(monkeypatch):
  """`BlockSizes(mosaic_dq=True)`: the Mosaic dq/dr kernel and the Triton fixup launch in place
  of the Triton dq/dr kernel, lowered for an H100."""
  monkeypatch.setattr(dm, "hopper_platform", lambda platform: (True, ""))
  bwd.check_training_gradient_lowers("mosaic_dq", (0, 3), "parallax_bwd_dq")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not has_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("segments,poison", [(False, False), (True, False), (True, True)])
def test_gpu_gradients_match_triton(segments, poison):
  """Gradients through the front with the Mosaic dq/dr kernel equal the Triton kernels'."""
  bwd.check_front_gradients_match_triton("mosaic_dq", segments, poison)
