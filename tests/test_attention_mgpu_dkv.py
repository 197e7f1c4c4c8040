"""Mosaic GPU (Hopper) dk/dv kernel (pallas_kernels/attention_mgpu_dkv) and its wiring in the
front (`attention.mosaic_dkv_call`, `BlockSizes.mosaic_dkv`).

CPU:
  * the kernel in the Mosaic GPU interpreter against the gradients of a dense float32
    reference (`test_attention_mgpu.reference`), given the reference's residuals. Interpreted,
    each consumer warpgroup loads its own query tiles (no producer: see `_dkv`), and the
    dK, dV products run as plain dots (no register-LHS wgmma in the interpreter).
  * a NaN at a masked position marks its key rows; `mosaic_dkv_call`'s Triton fixup launch
    repairs them to the Triton kernel's result.
  * the kernel lowers for CUDA on an abstract H100 (wgmma with a register operand, TMA,
    setmaxnreg), and so does a training gradient with `BlockSizes(mosaic_dkv=True)`.
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
from pallas_kernels import attention_mgpu_dkv as dm
from pallas_kernels import attention_triton as tr
from tests.kernels import has_hopper, interpret_params
from tests import mgpu_bwd_cases as bwd
from tests.mgpu_bwd_cases import with_config
from tests.test_attention_mgpu import Case, inputs, rel

warnings.filterwarnings("ignore", category=DeprecationWarning)

# the dk/dv kernel's own option, on by default (gbar and 1 + tbar folded into the score
# accumulators): these cases keep the unfolded step covered
UNFOLDED_CASES = {
    "bf16_parallax_causal_d128_gqa4_unfolded": (Case(T=128, S=128, D=128, Hq=4, Hkv=1),
                                                {"fold_rows": False}),
    "bf16_parallax_packed_segments_unfolded_split_scores": (
        Case(segments="packed"), {"fold_rows": False, "split_scores": True}),
    "bf16_softmax_causal_packed_segments_unfolded": (Case(parallax=False, segments="packed"),
                                                     {"fold_rows": False}),
}
CASES = with_config(bwd.CASES | UNFOLDED_CASES, dm.DkvConfig)
GPU_CASES = with_config(bwd.GPU_CASES | {
    "bf16_parallax_causal_d128_L1024_unfolded": (Case(B=2, T=1024, S=1024, Hq=8, Hkv=4,
                                                      D=128), {"fold_rows": False}),
    "bf16_parallax_cross_segments_arrayscale_unfolded": (
        Case(B=1, T=1024, S=1024, Hq=4, Hkv=2, causal=False, segments="cross",
             array_scale=True), {"fold_rows": False, "split_scores": True}),
    "bf16_softmax_causal_packed_segments_d128_unfolded": (
        Case(B=2, T=2048, S=2048, Hq=8, Hkv=4, D=128, parallax=False, segments="packed"),
        {"fold_rows": False})}, dm.DkvConfig)


class TestMgpuDkv:
  """dk, dv against the reference's, compiled on a Hopper GPU."""
  INTERPRET = False
  NEEDS = "hopper"
  CASES = GPU_CASES

  def test_matches_reference(self, name):
    c, cfg = self.CASES[name]
    (_, k, v, *_), (dk, dv, rowsum), ref = bwd.run_case(dm, dm.parallax_dkv_mgpu, c, cfg,
                                                        self.INTERPRET)
    assert dk.shape == k.shape and dk.dtype == k.dtype and dv.dtype == v.dtype
    assert rowsum.shape == (c.B, c.Hkv, c.S) and bool(jnp.all(jnp.isfinite(rowsum)))
    errs = {"dk": rel(dk, ref["k"]), "dv": rel(dv, ref["v"])}
    assert max(errs.values()) < bwd.TOL[c.dtype], errs
    print(name, errs)


class TestMgpuDkvInterpret(TestMgpuDkv):
  """The same in the Mosaic GPU interpreter; CI runs three cases (both members and dtypes,
  causal and not, GQA 4, packed segments, 3 stages), the rest are `slow`."""
  INTERPRET = True
  CASES = CASES
  CI_CASES = bwd.CI_CASES + ["bf16_parallax_causal_d128_gqa4_unfolded",
                             "bf16_softmax_causal_packed_segments_unfolded"]


@pytest.mark.parametrize("fold", [False, True])
def test_nonfinite_key_rows_are_marked_and_fixed(fold):
  """NaN in the value of key 100 reaches, through 0 * NaN in the masked tiles' products,
  the dv rows of keys the NaN row never meets; the kernel's row sums mark them and the
  Triton fixup launch recomputes those key tiles: the result equals the Triton kernel's."""
  c = Case(T=128, S=128, D=64)
  q, k, v, r, scale = inputs(c, seed=5)
  v = v.at[:, 100].set(jnp.nan)
  do = jax.random.normal(jax.random.PRNGKey(9), q.shape, jnp.float32).astype(q.dtype)
  tcfg = bwd.triton_config(q, k, r, True, False)
  sc = jnp.full((c.Hq,), scale, jnp.float32)
  o, lse, tbar, vbar = tr.fwd_call(tcfg, q, k, v, r, sc, None, None)
  _, _, delta, gbar, _ = tr.dq_call(tcfg, q, k, v, r, do, o, vbar, lse, tbar, sc, None, None)
  args = (q, k, v, r, do, lse, delta, tbar, gbar, sc, None, None)
  cfg = dm.DkvConfig(fold_rows=fold)
  _, _, rowsum = dm.parallax_dkv_mgpu(q, k, v, r, do, lse, delta, tbar, gbar, scale=scale,
                                      config=cfg, interpret=interpret_params())
  assert not np.isfinite(np.asarray(rowsum)).all()
  got = attention.mosaic_dkv_call(tcfg, *args, config=cfg, interpret=interpret_params())
  want = tr.dkv_call(tcfg, *args)
  for a, b in zip(got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    fin = np.isfinite(b)
    assert fin[:, :100].all() and rel(a[fin], b[fin]) < 1e-2


def test_front_softmax_matches_triton():
  """Softmax (r = None) through `mosaic_dkv_call`, the table's default for softmax and
  D=64: dk, dv equal the Triton kernel's."""
  c = Case(T=128, S=128, D=64, parallax=False)
  q, k, v, r, scale = inputs(c, seed=3)
  do = jax.random.normal(jax.random.PRNGKey(4), q.shape, jnp.float32).astype(q.dtype)
  tcfg = bwd.triton_config(q, k, r, True, False)
  assert tcfg.blocks.mosaic_dkv
  sc = jnp.full((c.Hq,), scale, jnp.float32)
  o, lse, tbar, vbar = tr.fwd_call(tcfg, q, k, v, r, sc, None, None)
  _, _, delta, gbar, _ = tr.dq_call(tcfg, q, k, v, r, do, o, vbar, lse, tbar, sc, None, None)
  args = (q, k, v, r, do, lse, delta, tbar, gbar, sc, None, None)
  got = attention.mosaic_dkv_call(tcfg, *args, interpret=interpret_params())
  want = tr.dkv_call(tcfg, *args)
  for a, b in zip(got, want):
    assert rel(np.asarray(a, np.float32), np.asarray(b, np.float32)) < 1e-2


def test_supported():
  z = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  q, kv = z(1, 256, 4, 128), z(1, 256, 2, 128)
  sup = lambda *a, **kw: dm.supported(*a, **{"platform": "cuda", **kw})
  assert sup(q, kv, kv, q, causal=True) == (True, "")
  assert "head_dim" in sup(z(1, 256, 4, 96), z(1, 256, 2, 96), z(1, 256, 2, 96))[1]
  assert "multiple of 128" in sup(q, z(1, 192, 2, 128), z(1, 192, 2, 128), causal=False)[1]
  assert "block_q" in sup(z(1, 160, 4, 128), kv, kv, causal=False)[1]
  assert "window" in sup(q, kv, kv, window=16)[1]
  assert not sup(z(1, 512, 4, 128), kv, kv, causal=True)[0]  # T > S causal
  with pytest.raises(ValueError, match="block_q"):
    dm.DkvConfig(block_q=32)
  if not has_hopper():
    assert not dm.supported(q, kv, kv, q)[0]  # default: checks the actual device


# ----------------------------------------------------------------------------- CUDA lowering


@pytest.mark.parametrize("D,parallax,causal,seg,split,fold", [
    (128, True, True, False, False, False), (64, False, False, True, False, False),
    (128, True, True, True, True, False), (128, True, True, False, False, True),
    (64, False, True, True, False, True)])
def test_cuda_lowering_abstract_h100(D, parallax, causal, seg, split, fold):
  """Mosaic GPU's Python lowering in full and the module verifier, without a GPU."""
  cfg = dm.DkvConfig(split_scores=split, fold_rows=fold)
  bwd.check_cuda_lowering(dm.parallax_dkv_mgpu, cfg, D, parallax, causal, seg, cfg.block_q)


def test_training_gradient_lowers_with_mosaic_dkv(monkeypatch):
  """`BlockSizes(mosaic_dkv=True)`: the Mosaic dk/dv kernel and the Triton fixup launch in place
  of the Triton dk/dv kernel, lowered for an H100."""
  monkeypatch.setattr(dm, "hopper_platform", lambda platform: (True, ""))
  bwd.check_training_gradient_lowers("mosaic_dkv", (1, 2), "parallax_bwd_dkv")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not has_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("segments,poison", [(False, False), (True, False), (True, True)])
def test_gpu_gradients_match_triton(segments, poison):
  """Gradients through the front with the Mosaic dk/dv kernel equal the Triton kernels'."""
  bwd.check_front_gradients_match_triton("mosaic_dkv", segments, poison)
