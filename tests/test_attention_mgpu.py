"""Mosaic GPU (Hopper) forward of Parallax / softmax attention (pallas_kernels/attention_mgpu)
and its wiring in the front (`attention.mosaic_fwd_call`, `attention.mosaic_fixup`).

CPU:
  * the kernel runs in the Mosaic GPU interpreter (plgpu.InterpretGPUParams: simulated
    warpgroups, SMEM, TMA, barriers, optionally its race detector) against a dense float32
    reference: o and the residuals lse, tbar, vbar. Interpreter gaps in jax 0.11.2: no wgmma
    with a register LHS and no pl.run_state, so under interpretation the two PV products run
    as plain dots (`_forward(interpret=...)`); S1, S2 run through the interpreted wgmma.
  * the residuals match the Triton forward's (interpret mode) in layout and value, and the
    Triton backward kernels give the same gradients from either forward's residuals.
  * the kernel lowers for CUDA on an abstract H100 (Mosaic GPU's Python lowering runs in full
    and verifies the module); the module contains the wgmma, TMA and setmaxnreg ops.
GPU (`-m gpu`, needs a Hopper GPU): compiled kernel vs the reference at L=1024..4096
(`TestMgpuForward`; `TestMgpuForwardInterpret` is the interpreter's run) and vs the Triton
forward's residuals.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention
from pallas_kernels import attention_mgpu as mg
from pallas_kernels import attention_triton as tr
from pallas_kernels.common import LOG2E
from tests.kernels import (has_hopper, interpret_params, lower_h100, mosaic_modules,
                           triton_modules, verify_triton_modules)

warnings.filterwarnings("ignore", category=DeprecationWarning)

HIGHEST = jax.lax.Precision.HIGHEST
# max |x - ref| / max |ref| allowed for o and vbar, by dtype
TOL = {jnp.bfloat16: 1e-2, jnp.float16: 4e-3}


# ----------------------------------------------------------------------------- reference


def reference(q, k, v, r, scale, causal, qseg=None, kseg=None):
  """Dense float32 forward: o, lse (log2 domain), tbar, vbar in the Triton layouts.
  Rows without a visible key: o = vbar = tbar = 0 and lse = +inf (the kernels' convention)."""
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  q, k, v, r = f32(q), f32(k), f32(v), f32(r)
  B, T, H, D = q.shape
  S, G = k.shape[1], H // k.shape[2]
  k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (H,))
  s = jnp.einsum("bthd,bshd->bhts", q, k, precision=HIGHEST) * scale[None, :, None, None]
  if causal:  # end-aligned
    s = jnp.where(jnp.arange(S)[None] <= jnp.arange(T)[:, None] + (S - T), s, -jnp.inf)
  if qseg is not None:
    s = jnp.where(qseg[:, None, :, None] == kseg[:, None, None, :], s, -jnp.inf)
  has_keys = jnp.any(s > -jnp.inf, axis=-1, keepdims=True)
  a = jnp.where(has_keys, jax.nn.softmax(jnp.where(has_keys, s, 0.0), axis=-1), 0.0)
  vbar = jnp.einsum("bhts,bshd->bthd", a, v, precision=HIGHEST)
  lse = jnp.where(has_keys[..., 0], jax.nn.logsumexp(s, axis=-1) * LOG2E, jnp.inf)
  if r is None:
    return vbar, lse, None, None
  t = jnp.einsum("bthd,bshd->bhts", r, k, precision=HIGHEST)
  t = jnp.where(jnp.isfinite(s), t, 0.0)
  tbar = jnp.sum(a * t, axis=-1)
  o2 = jnp.einsum("bhts,bshd->bthd", a * t, v, precision=HIGHEST)
  o = (1.0 + jnp.transpose(tbar, (0, 2, 1)))[..., None] * vbar - o2
  return o, lse, tbar, vbar


def rel(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  assert np.all(np.isfinite(x))
  return float(np.max(np.abs(x - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


@dataclasses.dataclass(frozen=True)
class Case:
  T: int = 256
  S: int = 256
  Hq: int = 4
  Hkv: int = 2
  D: int = 64
  B: int = 1
  dtype: object = jnp.bfloat16
  parallax: bool = True
  causal: bool = True
  config: mg.MgpuConfig | None = None
  array_scale: bool = False
  races: bool = False
  segments: str | None = None  # "packed": shared sorted ids; "cross": q ids != kv ids


def segment_ids(c: Case, seed=0):
  """Packed-sequence ids [B, T], [B, S] int32 (None, None without c.segments).

  "packed" (T == S): documents of random lengths (some shorter than a tile, some spanning
  several), id 0 padding at the end of row 0. "cross": independent random ids in {0, 1, 2},
  so some query rows see no key at all.
  """
  if c.segments is None:
    return None, None
  rng = np.random.default_rng(seed)
  if c.segments == "cross":
    return (jnp.asarray(rng.integers(0, 3, (c.B, c.T)), jnp.int32),
            jnp.asarray(rng.integers(0, 3, (c.B, c.S)), jnp.int32))
  assert c.T == c.S
  rows = []
  for b in range(c.B):
    cuts = np.sort(rng.choice(np.arange(1, c.T), size=5, replace=False))
    ids = np.searchsorted(cuts, np.arange(c.T), side="right") + 1
    if b == 0:
      ids[-37:] = 0
    rows.append(ids)
  seg = jnp.asarray(np.stack(rows), jnp.int32)
  return seg, seg


def inputs(c: Case, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (c.B, c.T, c.Hq, c.D), jnp.float32).astype(c.dtype)
  k = jax.random.normal(ks[1], (c.B, c.S, c.Hkv, c.D), jnp.float32).astype(c.dtype)
  v = jax.random.normal(ks[2], (c.B, c.S, c.Hkv, c.D), jnp.float32).astype(c.dtype)
  r = (0.5 * jax.random.normal(ks[3], (c.B, c.T, c.Hq, c.D), jnp.float32)).astype(c.dtype)
  if c.array_scale:  # per-head bandwidths, one head uniform (scale 0)
    scale = jnp.array([0.2, 0.0, 1.0 / math.sqrt(c.D), 0.05] * (c.Hq // 4), jnp.float32)
  else:
    scale = 1.0 / math.sqrt(c.D)
  return q, k, v, r if c.parallax else None, scale


def check(c: Case, outs, ref):
  o, (lse, tbar, vbar) = outs
  ro, rlse, rtbar, rvbar = ref
  tol = TOL[c.dtype]
  assert o.shape == ro.shape and o.dtype == jnp.dtype(c.dtype)
  assert lse.shape == (c.B, c.Hq, c.T) and lse.dtype == jnp.float32
  lse, rlse = np.asarray(lse), np.asarray(rlse)
  assert np.array_equal(np.isinf(lse), np.isinf(rlse))  # rows without keys: +inf
  fin = np.isfinite(rlse)
  errs = {"o": rel(o, ro), "lse": float(np.max(np.abs(lse[fin] - rlse[fin]), initial=0.0))}
  if c.parallax:
    assert tbar.shape == (c.B, c.Hq, c.T) and tbar.dtype == jnp.float32
    assert vbar.shape == ro.shape and vbar.dtype == jnp.dtype(c.dtype)
    errs["tbar"] = rel(tbar, rtbar)
    errs["vbar"] = rel(vbar, rvbar)
  else:
    assert tbar is None and vbar is None
  assert errs["o"] < tol, errs
  assert errs["lse"] < 1e-3, errs  # fp32 statistics: only the inputs' rounding is shared
  if c.parallax:
    assert errs["vbar"] < tol and errs["tbar"] < 1e-3, errs
  return errs


# ----------------------------------------------------------------------------- the reference


# interpret mode (CPU)
CASES = {
    "bf16_parallax_causal_d128": Case(D=128),
    "bf16_parallax_noncausal_d64_bkv128": Case(causal=False),
    "bf16_parallax_noncausal_d128": Case(D=128, causal=False),
    "fp16_parallax_causal_T<S_d128_3stages": Case(
        T=256, S=384, D=128, dtype=jnp.float16, config=mg.MgpuConfig(num_stages=3)),
    "bf16_parallax_causal_d64_bkv64_arrayscale_races": Case(
        config=mg.MgpuConfig(block_kv=64, num_stages=3), array_scale=True, races=True),
    "bf16_parallax_causal_d128_bkv128_races": Case(
        D=128, Hq=2, Hkv=1, config=mg.MgpuConfig(block_kv=128), races=True),
    "bf16_softmax_causal_d64": Case(parallax=False),
    "fp16_softmax_noncausal_d128_B2": Case(B=2, T=128, S=256, D=128, dtype=jnp.float16,
                                           parallax=False, causal=False),
    "bf16_parallax_bf16_pv": Case(config=mg.MgpuConfig(block_kv=128, fp16_pv=False)),
    "bf16_parallax_causal_joint_waits_232regs": Case(
        config=mg.MgpuConfig(block_kv=64, split_waits=False, consumer_registers=232)),
    "bf16_parallax_causal_packed_segments_d128_races": Case(
        B=2, D=128, segments="packed", races=True),
    "fp16_softmax_causal_packed_segments_d64": Case(
        dtype=jnp.float16, parallax=False, segments="packed"),
    "bf16_parallax_noncausal_cross_segments_T<S": Case(T=128, S=256, causal=False,
                                                       segments="cross"),
}


# the defaults before split waits and the 240-register cap (both paths stay covered)
_JOINT232 = mg.MgpuConfig(split_waits=False, consumer_registers=232)

# compiled (Hopper)
GPU_CASES = {
    "bf16_parallax_causal_d128_L1024": Case(B=2, T=1024, S=1024, Hq=8, Hkv=4, D=128),
    "bf16_parallax_noncausal_d128_L2048": Case(B=1, T=2048, S=2048, Hq=8, Hkv=2, D=128,
                                               causal=False),
    "bf16_parallax_causal_d64_L4096": Case(B=1, T=4096, S=4096, Hq=4, Hkv=4, D=64),
    "fp16_parallax_causal_T<S_d128": Case(B=1, T=1024, S=2048, Hq=4, Hkv=2, D=128,
                                          dtype=jnp.float16),
    "bf16_softmax_causal_d128_L4096": Case(B=1, T=4096, S=4096, Hq=8, Hkv=4, D=128,
                                           parallax=False),
    "bf16_softmax_noncausal_d64": Case(B=2, T=1024, S=1024, Hq=8, Hkv=8, D=64, parallax=False,
                                       causal=False),
    "bf16_parallax_array_scale_3stages": Case(B=1, T=1024, S=1024, Hq=8, Hkv=4, D=128,
                                              array_scale=True,
                                              config=mg.MgpuConfig(num_stages=3)),
    "bf16_parallax_causal_joint_waits_232regs": Case(B=2, T=1024, S=1024, Hq=8, Hkv=4, D=128,
                                                     config=_JOINT232),
    "bf16_parallax_causal_packed_segments_d128": Case(B=2, T=2048, S=2048, Hq=8, Hkv=4, D=128,
                                                      segments="packed"),
    "bf16_parallax_noncausal_cross_segments_d64": Case(B=1, T=1024, S=1024, Hq=4, Hkv=2, D=64,
                                                       causal=False, segments="cross"),
}


class TestMgpuForward:
  """o and the residuals against the reference, compiled on a Hopper GPU."""
  INTERPRET = False
  NEEDS = "hopper"
  CASES = GPU_CASES

  def test_matches_reference(self, name):
    c = self.CASES[name]
    q, k, v, r, scale = inputs(c)
    qs, ks = segment_ids(c)
    ok, why = mg.supported(q, k, v, r, causal=c.causal, q_segment_ids=qs, kv_segment_ids=ks,
                           config=c.config, platform="interpret" if self.INTERPRET else None)
    assert ok, why
    if c.races:
      from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    fwd = functools.partial(mg.parallax_forward_mgpu, causal=c.causal, config=c.config,
                            interpret=interpret_params(c.races) if self.INTERPRET else None)
    if not self.INTERPRET:
      fwd = jax.jit(fwd)
    outs = fwd(q, k, v, r, scale=scale, q_segment_ids=qs, kv_segment_ids=ks)
    jax.block_until_ready(outs)
    if c.races:
      assert not gpu_callbacks.get_races().races_found, "the race detector reported a race"
    errs = check(c, outs, reference(q, k, v, r, scale, c.causal, qs, ks))
    if c.parallax and c.dtype == jnp.bfloat16 and c.D == 128 and c.T == 1024:
      assert errs["o"] <= 5e-3, errs  # the brief's accuracy target (bench/NOTES.md)
    print(name, errs)


class TestMgpuForwardInterpret(TestMgpuForward):
  """The same in the Mosaic GPU interpreter (some cases with its race detector); CI runs the
  cases that keep every dtype, member, mask, segment kind, stage count and wait scheme."""
  INTERPRET = True
  CASES = CASES
  CI_CASES = ["fp16_parallax_causal_T<S_d128_3stages",
              "bf16_parallax_causal_d64_bkv64_arrayscale_races",
              "fp16_softmax_noncausal_d128_B2", "bf16_parallax_causal_joint_waits_232regs",
              "fp16_softmax_causal_packed_segments_d64",
              "bf16_parallax_noncausal_cross_segments_T<S"]


def _triton_cfg(q, k, r, causal, interpret):
  B, T, Hq, D = q.shape
  bs = tr.BlockSizes(64, 64, 4, 2, 64, 64, 4, 2, 64, 64, 4, 2)
  return tr.CallConfig(T=T, S=k.shape[1], Tp=T, Sp=k.shape[1], D=D, Hq=Hq, Hkv=k.shape[2],
                       causal=causal, window=None, has_r=r is not None, has_seg=False,
                       need_dscale=False, blocks=bs, interpret=interpret,
                       fp16_pv=r is not None and q.dtype == jnp.bfloat16)


def test_residuals_match_triton_and_feed_its_backward():
  """Same residual layout/values as the Triton forward; its backward kernels accept them."""
  c = Case(T=128, S=128, D=64, causal=True)
  q, k, v, r, scale = inputs(c, seed=1)
  sc = jnp.full((c.Hq,), scale, jnp.float32)
  tcfg = _triton_cfg(q, k, r, c.causal, interpret=True)
  t_o, t_lse, t_tbar, t_vbar = tr.fwd_call(tcfg, q, k, v, r, sc, None, None)
  o, (lse, tbar, vbar) = mg.parallax_forward_mgpu(q, k, v, r, scale=scale, causal=c.causal,
                                                  interpret=interpret_params())
  for a, b in ((o, t_o), (lse, t_lse), (tbar, t_tbar), (vbar, t_vbar)):
    assert a.shape == b.shape and a.dtype == b.dtype
  assert rel(o, t_o) < 5e-3 and rel(vbar, t_vbar) < 5e-3
  assert float(jnp.max(jnp.abs(lse - t_lse))) < 1e-4
  assert rel(tbar, t_tbar) < 1e-4
  do = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32).astype(q.dtype)

  def grads(o, lse, tbar, vbar):
    dq, dr, delta, gbar, _ = tr.dq_call(tcfg, q, k, v, r, do, o, vbar, lse, tbar, sc, None,
                                        None)
    dk, dv = tr.dkv_call(tcfg, q, k, v, r, do, lse, delta, tbar, gbar, sc, None, None)
    return dq, dk, dv, dr

  for name, a, b in zip("dq dk dv dr".split(), grads(o, lse, tbar, vbar),
                        grads(t_o, t_lse, t_tbar, t_vbar)):
    assert rel(a, b) < 1e-2, name


@pytest.mark.parametrize("segments", [pytest.param(None, marks=pytest.mark.slow), "packed"])
def test_nonfinite_rows_are_marked_and_fixed(segments):
  """A NaN value in a masked tile reaches rows that do not see it through the tile's
  products (0 * NaN): the kernel marks every row with a non-finite output (lse = NaN), and
  the Triton fixup pass (`mosaic_fwd_call`'s second launch) recomputes those tiles carefully, so
  the result equals the Triton forward's on the same inputs."""
  c = Case(T=128, S=128, D=64, segments=segments)
  q, k, v, r, scale = inputs(c, seed=3)
  qs, ks = segment_ids(c)
  v = v.at[:, 40].set(jnp.nan)              # key 40: causal rows 0-39 must not see it
  sc = jnp.full((c.Hq,), scale, jnp.float32)
  tcfg = dataclasses.replace(_triton_cfg(q, k, r, True, interpret=True), has_seg=qs is not None)
  outs = mg.parallax_forward_mgpu(q, k, v, r, scale=scale, causal=True, q_segment_ids=qs,
                                  kv_segment_ids=ks, interpret=interpret_params())
  lse = np.asarray(outs[1][0])
  assert np.isnan(lse[:, :, :40]).any()      # the leak the marks exist for
  o, lse, tbar, vbar = attention.mosaic_fixup(tcfg, q, k, v, r, sc, qs, ks, outs)
  want = tr.fwd_call(tcfg, q, k, v, r, sc, qs, ks)
  o, wo = np.asarray(o, np.float32), np.asarray(want[0], np.float32)
  assert np.array_equal(np.isnan(o), np.isnan(wo)) and np.isnan(wo[:, 40:]).all(axis=(2, 3)).any()
  assert not np.isnan(np.asarray(lse)).any() and rel(o[:, :40], wo[:, :40]) < 5e-3
  np.testing.assert_array_equal(np.isinf(np.asarray(lse)), np.isinf(np.asarray(want[1])))


def test_supported():
  z = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  q, kv = z(1, 256, 4, 128), z(1, 256, 2, 128)
  sup = lambda *a, **kw: mg.supported(*a, **{"platform": "cuda", **kw})
  assert sup(q, kv, kv, q, causal=True) == (True, "")
  assert sup(q, kv, kv, None, causal=False) == (True, "")
  assert not sup(z(1, 256, 4, 128, dt=jnp.float32), z(1, 256, 2, 128, dt=jnp.float32),
                 z(1, 256, 2, 128, dt=jnp.float32))[0]
  assert "head_dim" in sup(z(1, 256, 4, 96), z(1, 256, 2, 96), z(1, 256, 2, 96))[1]
  assert "multiple" in sup(z(1, 200, 4, 128), kv, kv)[1]
  assert "window" in sup(q, kv, kv, window=16)[1]
  ids = z(1, 256, dt=jnp.int32)
  assert "neither" in sup(q, kv, kv, q_segment_ids=ids)[1]
  assert sup(q, kv, kv, q, q_segment_ids=ids, kv_segment_ids=ids) == (True, "")
  assert "[B, T]" in sup(q, kv, kv, q_segment_ids=z(1, 128, dt=jnp.int32), kv_segment_ids=ids)[1]
  assert "int32" in sup(q, kv, kv, q_segment_ids=z(1, 256, dt=jnp.int16),
                        kv_segment_ids=z(1, 256, dt=jnp.int16))[1]
  assert not sup(z(1, 256, 4, 128), z(1, 128, 2, 128), z(1, 128, 2, 128), causal=True)[0]
  assert sup(z(1, 256, 4, 128), z(1, 128, 2, 128), z(1, 128, 2, 128), causal=False)[0]
  assert "SMEM" in sup(q, kv, kv, q, config=mg.MgpuConfig(block_kv=256, num_stages=4))[1]
  if not has_hopper():
    assert not mg.supported(q, kv, kv, q)[0]  # default: checks the actual device


def test_mosaic_fwd_call_falls_back_to_triton():
  """mosaic_fwd_call (the wiring hook) with an unsupported config runs the Triton forward."""
  c = Case(T=128, S=128, D=64)
  q, k, v, r, scale = inputs(c)
  tcfg = _triton_cfg(q, k, r, True, interpret=True)  # interpret: never the Mosaic kernel
  sc = jnp.full((c.Hq,), scale, jnp.float32)
  got = attention.mosaic_fwd_call(tcfg, q, k, v, r, sc, None, None)
  want = tr.fwd_call(tcfg, q, k, v, r, sc, None, None)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# ----------------------------------------------------------------------------- CUDA lowering


@pytest.mark.parametrize("D,parallax,causal,config,seg", [
    (128, True, True, None, False), (64, True, False, None, False),
    (128, False, False, None, False), (64, False, True, None, False),
    (128, True, True, _JOINT232, False), (128, True, True, None, True)])
def test_cuda_lowering_abstract_h100(D, parallax, causal, config, seg):
  """Lower for CUDA on an abstract H100 without a GPU.

  Covers Mosaic GPU's Python lowering in full (Lane semantics: register layouts of every
  array op, SMEM allocation and budget, barriers, TMA descriptors) and the module verifier;
  the LLVM -> PTX -> SASS steps (and so register allocation/spills) run only in the CUDA
  plugin's compiler, i.e. in the `gpu` tests.
  """
  q = jax.ShapeDtypeStruct((2, 1024, 8, D), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 1024, 4, D), jnp.bfloat16)
  sc = jax.ShapeDtypeStruct((8,), jnp.float32)
  ids = jax.ShapeDtypeStruct((2, 1024), jnp.int32) if seg else None

  def f(q, k, v, r, sc, ids):
    return mg.parallax_forward_mgpu(q, k, v, r, scale=sc, causal=causal, q_segment_ids=ids,
                                    kv_segment_ids=ids, config=config)

  mods = mosaic_modules(lower_h100(f, q, kv, kv, q if parallax else None, sc, ids))
  assert len(mods) == 1
  ops = set(re.findall(rb"[a-z_]+(?:\.[a-z_0-9]+)+", mods[0]))
  cfg = config or mg.default_config(D, parallax)
  pv_type = b"f16" if parallax else b"bf16"  # bf16 Parallax: PV products in fp16
  assert b"wgmma.mma_async.sync.aligned.m64n%dk16.f32.bf16.bf16" % cfg.block_kv in ops
  assert b"wgmma.mma_async.sync.aligned.m64n%dk16.f32.%s.%s" % (D, pv_type, pv_type) in ops
  assert b"nvvm.cp.async.bulk.tensor.shared.cluster.global" in ops  # TMA loads
  assert b"nvvm.cp.async.bulk.tensor.global.shared.cta" in ops  # TMA stores
  assert b"setmaxnreg.inc.sync.aligned.u32" in ops and b"setmaxnreg.dec.sync.aligned.u32" in ops
  assert (b"wgmma.wait_group.sync.aligned 1" in mods[0]) == (cfg.split_waits and parallax)



@pytest.mark.parametrize("parallax", [True, False])
def test_fixup_lowering_abstract_h100(parallax):
  """The Triton fixup pass that follows the Mosaic GPU forward lowers for CUDA (its TTIR
  verifies): an early return per tile, the careful pass under it."""
  sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  q, kv, rows = sd(2, 1024, 8, 128), sd(2, 1024, 4, 128), sd(2, 8, 1024, dt=jnp.float32)
  tcfg = dataclasses.replace(_triton_cfg(q, kv, q if parallax else None, True, False),
                             blocks=tr.default_block_sizes(128, parallax))

  def f(q, k, v, r, sc, o, lse, tbar, vbar):
    return attention.mosaic_fixup(tcfg, q, k, v, r, sc, None, None, (o, (lse, tbar, vbar)))

  args = (q, kv, kv, q if parallax else None, sd(8, dt=jnp.float32), q, rows,
          rows if parallax else None, q if parallax else None)
  mods = triton_modules(lower_h100(f, *args))
  kind = "parallax" if parallax else "softmax"
  assert [n for n, _ in mods] == [f"{kind}_fwd_fixup"]
  verify_triton_modules(mods)


def test_one_mosaic_module_per_config_across_call_sites():
  """An unrolled model calls the kernel once per layer: every call must reuse one lowered
  Mosaic module (one ptxas compile), not carry its own (Pallas stamps a fresh dump name
  into each lowering; 28 of them made the unrolled 0.6B step fail to compile)."""
  q = jax.ShapeDtypeStruct((1, 1024, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)

  def f(q, k, v, r):
    o = q
    for i in range(3):
      with jax.named_scope(f"layer{i}"):
        o = mg.parallax_forward_mgpu(o * 2, k, v, r, scale=0.1, causal=True)[0]
    return o

  assert len(mosaic_modules(lower_h100(f, q, kv, kv, q))) == 1


# ----------------------------------------------------------------------------- GPU

@pytest.mark.parametrize("D,causal", [(128, True), (64, False)])
@pytest.mark.gpu
@pytest.mark.skipif(not has_hopper(), reason="needs a Hopper GPU")
def test_gpu_residuals_match_triton(D, causal):
  c = Case(B=2, T=2048, S=2048, Hq=8, Hkv=4, D=D, causal=causal)
  q, k, v, r, scale = inputs(c, seed=3)
  sc = jnp.full((c.Hq,), scale, jnp.float32)
  tcfg = dataclasses.replace(_triton_cfg(q, k, r, causal, interpret=False),
                             blocks=tr.default_block_sizes(D, True))
  t_o, t_lse, t_tbar, t_vbar = jax.jit(
      lambda *a: tr.fwd_call(tcfg, *a, None, None))(q, k, v, r, sc)
  o, (lse, tbar, vbar) = jax.jit(lambda *a: mg.parallax_forward_mgpu(
      *a, scale=scale, causal=causal))(q, k, v, r)
  assert rel(o, t_o) < 5e-3 and rel(vbar, t_vbar) < 5e-3
  assert float(jnp.max(jnp.abs(lse - t_lse))) < 1e-3
  assert rel(tbar, t_tbar) < 1e-3
