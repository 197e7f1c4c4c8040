"""Mosaic GPU decode kernel (pallas_kernels/decode_mgpu.py).

CPU: the kernel runs in the Mosaic GPU interpreter against the dense float32 decode reference
(poisoned keys and values past every length; lengths 0, 1 and not multiples of the tile;
windows; splits; GQA ratios 1-8; bf16 / fp16; head_dim 64 / 128). Interpreter gaps (jax
0.11.2): no wgmma with a register LHS and no `inline_mgpu`, so there the P V product runs as
a plain dot and the tile's row-half pick as array ops (`_row_half`); the
lowering tests below build both for CUDA on an abstract H100, and the GPU tests run them.
GPU (`-m gpu`, Hopper): compiled kernel against the reference and the Triton kernel
(`TestDecodeMgpu`; `TestDecodeMgpuInterpret` is the interpreter's run of the same test).
"""
from __future__ import annotations

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_mgpu as dm
from pallas_kernels import decode_triton as dk
from tests.kernels import (has_hopper, interpret_params, lower_h100, mosaic_modules,
                           triton_modules, verify_triton_modules)
from tests.test_decode_triton import TOL, poison_tail

warnings.filterwarnings("ignore", category=DeprecationWarning)


@dataclasses.dataclass(frozen=True)
class Case:
  B: int = 2
  Hq: int = 4
  Hkv: int = 2
  S: int = 200
  D: int = 64
  dtype: object = jnp.bfloat16
  parallax: bool = True
  lengths: tuple = (77, 200)
  window: int | None = None
  config: dm.DecodeConfig = dm.DecodeConfig(num_stages=2, num_splits=1)


def inputs(c: Case, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, r = f(c.B, c.Hq, c.D), 0.3 * f(c.B, c.Hq, c.D)
  k, v = f(c.B, c.S, c.Hkv, c.D), f(c.B, c.S, c.Hkv, c.D)
  k, v = poison_tail(k, c.lengths), poison_tail(v, c.lengths)
  cast = lambda x: x.astype(c.dtype)
  return cast(q), cast(k), cast(v), (cast(r) if c.parallax else None)


def run(c: Case, interpret):
  q, k, v, r = inputs(c)
  kw = dict(scale=1.0 / np.sqrt(c.D), lengths=jnp.asarray(c.lengths, jnp.int32),
            window=c.window)
  o = dm.parallax_decode_mgpu(q, k, v, r, config=c.config, interpret=interpret, **kw)
  ref = np.asarray(dk.reference_decode(q, k, v, r, **kw))
  assert o.shape == q.shape and o.dtype == q.dtype
  o = np.asarray(o, np.float32)
  assert np.all(np.isfinite(o))
  err = float(np.max(np.abs(o - ref)) / max(float(np.max(np.abs(ref))), 1e-6))
  assert err <= TOL[c.dtype], err
  return o, err


_UNPACKED = dm.DecodeConfig(num_stages=2, num_splits=1, pack_qr=False)
CASES = {
    "gqa2_packed": Case(),
    "gqa2_unpacked_3stages": Case(config=dataclasses.replace(_UNPACKED, num_stages=3)),
    "softmax": Case(parallax=False),
    "splits3_packed": Case(config=dm.DecodeConfig(num_stages=2, num_splits=3)),
    "splits4_unpacked_window": Case(window=37, config=dataclasses.replace(_UNPACKED,
                                                                          num_splits=4)),
    "softmax_splits_zero_length": Case(parallax=False, lengths=(0, 200),
                                       config=dm.DecodeConfig(num_stages=2, num_splits=3)),
    "mha_lengths_0_1_64_rows_padded": Case(B=3, Hq=2, Hkv=2, lengths=(0, 1, 64)),
    "gqa8_fp16_d128_window_splits": Case(Hq=16, Hkv=2, D=128, S=304, dtype=jnp.float16,
                                         lengths=(300, 129), window=50,
                                         config=dm.DecodeConfig(num_stages=2, num_splits=2)),
    "gqa4_cache_under_one_tile": Case(Hq=8, Hkv=2, S=30, lengths=(30, 5)),
    # the splits merged by the Pallas (Triton) launch instead of XLA
    "splits3_merge_kernel": Case(config=dm.DecodeConfig(num_stages=2, num_splits=3,
                                                        merge_kernel=True)),
    "softmax_gqa8_merge_kernel_zero_length": Case(
        B=2, Hq=16, Hkv=2, D=128, S=304, parallax=False, lengths=(0, 300), window=50,
        config=dm.DecodeConfig(num_stages=2, num_splits=4, merge_kernel=True)),
    "gqa8_one_kv_head_window_5_splits": Case(B=1, Hq=8, Hkv=1, S=504, lengths=(433,),
                                             window=100,
                                             config=dm.DecodeConfig(num_stages=2, num_splits=5)),
    "bk128_splits2": Case(S=400, lengths=(400, 250),
                          config=dm.DecodeConfig(block_kv=128, num_stages=2, num_splits=2)),
    # two consumer warpgroups on alternate tiles, merged through SMEM: one tile (the second
    # consumer idle), odd tile counts, splits with a window, softmax, GQA 8
    "2wg_packed_lengths_1_200": Case(lengths=(1, 200), config=dm.DecodeConfig(
        num_stages=2, num_splits=1, num_consumers=2)),
    "2wg_splits3_window": Case(window=37, config=dm.DecodeConfig(
        num_stages=4, num_splits=3, num_consumers=2)),
    "2wg_unpacked_softmax_zero_length": Case(parallax=False, lengths=(0, 200),
                                             config=dataclasses.replace(
                                                 _UNPACKED, num_stages=4, num_consumers=2)),
    "2wg_gqa8_fp16_d128": Case(B=1, Hq=8, Hkv=1, S=336, D=128, lengths=(333,),
                               dtype=jnp.float16, config=dm.DecodeConfig(
                                   num_stages=4, num_splits=1, num_consumers=2)),
}


def _gpu_case(B, Hq, Hkv, S, D, splits, window, pack, consumers):
  lengths = tuple(int(x) for x in np.linspace(max(1, S // 3), S, B).round())
  return Case(B=B, Hq=Hq, Hkv=Hkv, S=S, D=D, lengths=lengths, window=window,
              config=dm.DecodeConfig(pack_qr=pack, num_splits=splits, num_consumers=consumers,
                                     num_stages=4 if consumers > 1 else 3))


# compiled (Hopper): every shape with packed / unpacked Q and R rows and two consumers
GPU_CASES = {
    f"B{B}_Hq{Hq}_Hkv{Hkv}_S{S}_D{D}_splits{splits}_window{window}_"
    f"{'packed' if pack else 'unpacked'}_{consumers}wg":
        _gpu_case(B, Hq, Hkv, S, D, splits, window, pack, consumers)
    for B, Hq, Hkv, S, D, splits, window in [
        (1, 16, 8, 8192, 128, None, None), (8, 16, 8, 1024, 128, None, 300),
        (64, 16, 8, 1000, 128, None, None), (4, 8, 8, 4096, 64, None, None),
        (2, 32, 4, 776, 128, 3, None)]
    for pack, consumers in [(True, 1), (False, 1), (True, 2)]
}


def _merged_case(B, Hq, Hkv, S, D, window, consumers, parallax, **merge):
  """A split launch whose splits merge another way than XLA's (`merge`: DecodeConfig keys)."""
  return dataclasses.replace(
      _gpu_case(B, Hq, Hkv, S, D, None, window, True, consumers), parallax=parallax,
      config=dm.DecodeConfig(num_consumers=consumers, num_stages=4 if consumers > 1 else 3,
                             **merge))


_member = lambda parallax: "parallax" if parallax else "softmax"  # noqa: E731
# the splits merged in the kernel through distributed shared memory (GPU only)
GPU_CASES.update({
    f"B{B}_Hq{Hq}_Hkv{Hkv}_S{S}_D{D}_{_member(parallax)}_cluster{splits}_{consumers}wg":
        _merged_case(B, Hq, Hkv, S, D, window, consumers, parallax, num_splits=splits,
                     cluster_merge=True)
    for B, Hq, Hkv, S, D, splits, window, consumers, parallax in [
        (1, 16, 8, 8192, 128, 8, None, 1, True), (1, 32, 4, 4096, 128, 8, None, 2, True),
        (2, 32, 4, 776, 128, 3, 300, 1, True), (4, 8, 8, 4096, 64, 5, None, 1, False)]
})
# the splits merged by one Pallas (Triton) launch that writes o's rows (no XLA merge, no gather)
GPU_CASES.update({
    f"B{B}_Hq{Hq}_Hkv{Hkv}_S{S}_D{D}_{_member(parallax)}_mk{consumers}wg"
    f"{'' if cols == 32 else cols}":
        _merged_case(B, Hq, Hkv, S, D, window, consumers, parallax, merge_kernel=True,
                     merge_columns=cols)
    for B, Hq, Hkv, S, D, window, consumers, parallax, cols in [
        (1, 32, 8, 4096, 128, None, 1, True, 32), (1, 16, 8, 8192, 128, 300, 2, True, 32),
        (2, 32, 4, 776, 128, None, 1, True, 32), (4, 8, 8, 4096, 64, None, 1, False, 32),
        (1, 64, 8, 4096, 128, None, 1, True, 8), (1, 32, 8, 4096, 64, None, 1, False, 16)]
})

class TestDecodeMgpu:
  """The kernel against the dense reference, compiled on a Hopper GPU, and there against the
  Triton kernel as well."""
  INTERPRET = False
  NEEDS = "hopper"
  CASES = GPU_CASES

  def test_matches_reference(self, name):
    c = self.CASES[name]
    o, _ = run(c, interpret_params() if self.INTERPRET else None)
    if not self.INTERPRET:
      q, k, v, r = inputs(c)
      t = dk.parallax_decode(q, k, v, r, scale=1.0 / np.sqrt(c.D),
                             lengths=jnp.asarray(c.lengths, jnp.int32), window=c.window)
      t = np.asarray(t, np.float32)
      assert np.max(np.abs(o - t)) / np.max(np.abs(t)) <= TOL[c.dtype]


class TestDecodeMgpuInterpret(TestDecodeMgpu):
  """The same in the Mosaic GPU interpreter, on the CPU cases (reference only); CI runs the
  cases that keep packing, splits, windows, stage counts, consumers, dtypes and GQA 1-8."""
  INTERPRET = True
  CASES = CASES
  CI_CASES = ["gqa2_packed", "gqa2_unpacked_3stages", "softmax_splits_zero_length",
              "mha_lengths_0_1_64_rows_padded", "gqa8_fp16_d128_window_splits",
              "2wg_splits3_window", "splits3_merge_kernel"]


@pytest.mark.parametrize("consumers", [1, 2])
def test_race_detector_finds_no_race(consumers):
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  run(Case(S=160, lengths=(160, 100), config=dm.DecodeConfig(
      num_stages=2, num_splits=2, num_consumers=consumers)), interpret_params(races=True))
  assert not gpu_callbacks.get_races().races_found, "the race detector reported a race"


@pytest.mark.parametrize("half", [0, 1])
def test_row_half_array_form(half):
  """The interpreter's form of the tile's row-half pick: row i -> row (i mod 8) + 8 * half."""
  x = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8)
  y = np.asarray(dm._row_half(x, half, interpret=interpret_params()))
  rows = np.arange(64)
  np.testing.assert_array_equal(y, np.asarray(x)[rows - rows % 16 + rows % 8 + 8 * half])


def test_default_splits():
  assert dm.default_splits(256, 8, 1024, 64) == 1          # B*Hkv covers the SMs
  assert dm.default_splits(1, 8, 8192, 64) == 16           # one wave of 132 SMs
  assert dm.default_splits(1, 8, 256, 64) == 4             # at least one tile each
  assert dm.default_splits(8, 8, 1024, 64) == 2


@pytest.mark.parametrize("has_r", [True, False])
def test_split_merge_is_elementwise_and_exact(has_r):
  """The XLA merge of the split partials: the exact log-sum-exp merge (against the reduction
  form, empty splits and a row with no key included) with no reduction over the split axis,
  so that XLA can fuse it into one kernel."""
  B, Hkv, ns, D, G = 2, 4, 5, 16, 2
  rng = np.random.default_rng(0)
  nv, nm = (3, 3) if has_r else (2, 1)
  vecs = rng.normal(size=(B, Hkv, ns, nv, 8)).astype(np.float32) * 4
  vecs[:, :, :, 1] = np.abs(vecs[:, :, :, 1])                      # d1 >= 0
  vecs[0, 0, 1:3, 0] = -np.inf                                     # empty splits: m = -inf,
  vecs[0, 0, 1:3, 1:] = 0.0                                        # no mass
  vecs[1, 2, :, 0, :] = -np.inf                                    # rows with no key at all
  vecs[1, 2, :, 1:, :] = 0.0
  mats = rng.normal(size=(B, Hkv, ns, nm, 8, D)).astype(np.float32)
  idx = jnp.asarray(dm._box_rows(B, G * Hkv, Hkv))
  got = np.asarray(dm._merge(jnp.asarray(vecs), jnp.asarray(mats), idx, has_r))
  m = vecs[:, :, :, 0]
  top = m.max(axis=2, keepdims=True)
  w = np.exp2(m - np.where(np.isneginf(top), 0.0, top))
  d1 = (w * vecs[:, :, :, 1]).sum(2)[..., None]
  o1 = (w[..., None] * mats[:, :, :, 0]).sum(2)
  safe = np.where(d1 > 0, d1, 1.0)
  if has_r:
    d2 = (w * vecs[:, :, :, 2]).sum(2)[..., None]
    o2 = (w[..., None] * (mats[:, :, :, 1] + mats[:, :, :, 2])).sum(2)
    want = (1 + d2 / safe) * o1 / safe - o2 / safe
  else:
    want = o1 / safe
  want = np.take_along_axis(np.where(d1 > 0, want, 0.0), np.asarray(idx)[..., None], axis=2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(got[1, 2] == 0.0) and np.isfinite(got).all()
  prims = {e.primitive.name for e in jax.make_jaxpr(dm._merge, static_argnums=(3,))(
      jnp.asarray(vecs), jnp.asarray(mats), idx, has_r).jaxpr.eqns}
  assert not prims & {"reduce_max", "reduce_sum", "argmax"}, prims


@pytest.mark.parametrize("has_r", [True, False])
def test_merge_kernel_matches_the_xla_merge(has_r):
  """The Pallas merge launch (interpreted) against `_merge`: empty splits, rows with no key,
  GQA 1-8, split counts that the group size must divide."""
  from pallas_kernels import decode_mgpu_merge as mm
  nv, nm = (3, 3) if has_r else (2, 1)
  for B, Hkv, G, ns, D in ((2, 4, 2, 5, 64), (1, 1, 8, 4, 128), (3, 4, 1, 3, 64),
                           (1, 8, 4, 16, 128)):
    rng = np.random.default_rng(ns)
    vecs = rng.normal(size=(B, Hkv, ns, nv, 8)).astype(np.float32) * 4
    vecs[:, :, :, 1] = np.abs(vecs[:, :, :, 1])
    vecs[0, 0, 1:3, 0], vecs[0, 0, 1:3, 1:] = -np.inf, 0.0        # empty splits
    vecs[-1, -1, :, 0], vecs[-1, -1, :, 1:] = -np.inf, 0.0        # no key at all
    mats = rng.normal(size=(B, Hkv, ns, nm, 8, D)).astype(np.float32)
    vecs, mats = jnp.asarray(vecs), jnp.asarray(mats)
    idx = jnp.asarray(dm._box_rows(B, G * Hkv, Hkv))
    want = np.asarray(dm._merge(vecs, mats, idx, has_r)).reshape(B, G * Hkv, D)
    for cols in (32, 8):
      got = np.asarray(mm.merge_partials(vecs, mats, num_heads=G * Hkv, has_r=has_r,
                                         out_dtype=jnp.float32, interpret=True, columns=cols))
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
      assert np.all(got[-1, -G:] == 0.0) and np.isfinite(got).all()
  assert mm.group_splits(16, 4, 32, 2, 3, 32) == 16
  assert mm.group_splits(12, 8, 32, 2, 3, 32) == 6      # a divisor of 12 within the budget
  with pytest.raises(ValueError, match="bad partials"):
    mm.merge_partials(vecs, mats, num_heads=3, has_r=has_r, out_dtype=jnp.float32)
  with pytest.raises(ValueError, match="merge_columns=12"):
    dm.DecodeConfig(merge_kernel=True, merge_columns=12)


def test_supported_and_errors():
  s = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)
  ok = lambda *a, **k: dm.supported(*a, platform="interpret", **k)
  assert ok(s(2, 16, 128), s(2, 64, 8, 128), s(2, 64, 8, 128), s(2, 16, 128)) == (True, "")
  assert not ok(s(2, 1, 16, 128), s(2, 64, 8, 128), s(2, 64, 8, 128))[0]     # multi-token
  with pytest.raises(ValueError, match="choose one"):
    dm.DecodeConfig(cluster_merge=True, merge_kernel=True)
  assert "Hq/Hkv" in ok(s(2, 12, 64), s(2, 64, 4, 64), s(2, 64, 4, 64))[1]     # G = 3
  assert "Hq/Hkv" in ok(s(2, 32, 64), s(2, 64, 2, 64), s(2, 64, 2, 64))[1]     # G = 16
  assert "head_dim" in ok(s(2, 8, 32), s(2, 64, 8, 32), s(2, 64, 8, 32))[1]
  assert "multiple of 8" in ok(s(2, 8, 64), s(2, 777, 8, 64), s(2, 777, 8, 64))[1]
  f32 = jnp.float32
  assert "dtypes" in ok(s(2, 8, 64, dt=f32), s(2, 64, 8, 64, dt=f32), s(2, 64, 8, 64, dt=f32))[1]
  assert "SMEM" in ok(s(2, 8, 128), s(2, 64, 8, 128), s(2, 64, 8, 128),
                      config=dm.DecodeConfig(block_kv=256, num_stages=4))[1]
  assert "interpreter" in ok(s(2, 8, 64), s(2, 64, 8, 64), s(2, 64, 8, 64),
                            config=dm.DecodeConfig(cluster_merge=True))[1]
  assert dm.supported(s(2, 8, 64), s(2, 64, 8, 64), s(2, 64, 8, 64), platform="cuda",
                      config=dm.DecodeConfig(cluster_merge=True)) == (True, "")
  if not has_hopper():
    assert "Hopper" in dm.supported(s(2, 8, 64), s(2, 64, 8, 64), s(2, 64, 8, 64))[1]
  with pytest.raises(ValueError, match="Hq/Hkv"):
    dm.parallax_decode_mgpu(jnp.zeros((1, 3, 64), jnp.bfloat16),
                            jnp.zeros((1, 64, 1, 64), jnp.bfloat16),
                            jnp.zeros((1, 64, 1, 64), jnp.bfloat16), scale=1.0, lengths=[3],
                            interpret=interpret_params())
  with pytest.raises(ValueError, match="block_kv"):
    dm.DecodeConfig(block_kv=96)
  with pytest.raises(ValueError, match="num_stages"):
    dm.DecodeConfig(num_stages=1)
  with pytest.raises(ValueError, match="num_consumers=3"):
    dm.DecodeConfig(num_consumers=3, num_stages=3)
  with pytest.raises(ValueError, match="num_stages=3 must be a multiple of num_consumers=2"):
    dm.DecodeConfig(num_consumers=2)


# ----------------------------------------------------------------------------- CUDA lowering


def _lower(B, Hq, Hkv, S, D, parallax, config):
  q = jax.ShapeDtypeStruct((B, Hq, D), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((B, S, Hkv, D), jnp.bfloat16)
  ln = jax.ShapeDtypeStruct((B,), jnp.int32)

  def f(q, k, v, r, ln):
    return dm.parallax_decode_mgpu(q, k, v, r, scale=0.125, lengths=ln, config=config)

  return lower_h100(f, q, kv, kv, q if parallax else None, ln)


@pytest.mark.parametrize("D,parallax,pack,splits,consumers,S", [
    (128, True, True, 1, 1, 8192), (128, True, True, 16, 1, 8192),
    (128, True, False, 1, 1, 8192), (64, False, True, 4, 1, 8192),
    (128, True, True, 16, 2, 8192), (64, True, False, 1, 2, 8192),
    (128, True, True, 3, 1, 776), (64, True, True, 1, 2, 1000)])
def test_cuda_lowering_abstract_h100(D, parallax, pack, splits, consumers, S):
  """Mosaic GPU's Python lowering in full (layouts, SMEM budget, barriers, TMA descriptors,
  the tile's row-half register pick, the register-LHS P V wgmma, two consumers' register
  split and SMEM hand-over); PTX -> SASS runs only on the GPU."""
  cfg = dm.DecodeConfig(pack_qr=pack, num_splits=splits, num_consumers=consumers,
                        num_stages=2 * consumers if consumers > 1 else 3)
  mods = mosaic_modules(_lower(1, 16 if D == 128 else 8, 8, S, D, parallax, cfg))
  assert len(mods) == 1
  ops = set(re.findall(rb"[a-z_]+(?:\.[a-z_0-9]+)+", mods[0]))
  assert b"wgmma.mma_async.sync.aligned.m64n%dk16.f32.bf16.bf16" % cfg.block_kv in ops  # S
  assert b"wgmma.mma_async.sync.aligned.m64n%dk16.f32.bf16.bf16" % D in ops             # P V
  assert b"nvvm.cp.async.bulk.tensor.shared.cluster.global" in ops  # TMA loads
  assert b"nvvm.cp.async.bulk.tensor.global.shared.cta" in ops      # TMA stores
  assert (b"setmaxnreg.inc.sync.aligned.u32" in ops) == (consumers > 1)


@pytest.mark.parametrize("D,parallax,G,cols", [(128, True, 4, 32), (64, False, 1, 8)])
def test_merge_kernel_lowers(D, parallax, G, cols):
  """merge_kernel: the Mosaic decode kernel then one Triton launch that merges its splits
  and writes o (no XLA merge, no gather); its Triton IR verifies."""
  cfg = dm.DecodeConfig(num_splits=16, merge_kernel=True, merge_columns=cols)
  lowered = _lower(1, 8 * G, 8, 4096, D, parallax, cfg)
  assert len(mosaic_modules(lowered)) == 1
  mods = triton_modules(lowered)
  assert [n for n, _ in mods] == ["decode_split_merge"]
  verify_triton_modules(mods, dot=False)


@pytest.mark.parametrize("D,parallax,consumers", [(128, True, 1), (64, False, 2)])
def test_cluster_merge_lowers(D, parallax, consumers):
  """cluster_merge: one cluster of 8 splits per (b, KV head), a release / acquire cluster
  barrier around split 0's reads of the others' SMEM (mapa), o stored by the kernel."""
  cfg = dm.DecodeConfig(num_splits=8, cluster_merge=True, num_consumers=consumers,
                        num_stages=4 if consumers > 1 else 3)
  mods = mosaic_modules(_lower(1, 16 if D == 128 else 8, 8, 8192, D, parallax, cfg))
  assert len(mods) == 1
  ops = set(re.findall(rb"[a-z_]+(?:\.[a-z_0-9]+)+", mods[0]))
  assert {b"barrier.cluster.arrive.release.aligned", b"barrier.cluster.wait.acquire.aligned",
          b"nvvm.mapa", b"gpu.cluster_block_id"} <= ops


def _ops_after_cse(module_bytes, names):
  """Counts of ops in a lowered Mosaic GPU module after MLIR CSE (Mosaic's own compile
  pipeline runs `canonicalize, cse` before LLVM, so duplicated SSA work is gone by PTX)."""
  from jax._src.interpreters import mlir as jmlir
  from jax._src.lib import mosaic_gpu_dialect
  from jax._src.lib.mlir import ir, passmanager
  from jax.experimental.mosaic.gpu import core as mcore
  # make_ir_context hands out a thread's context up to 10 times, then a fresh one: only a
  # reused one has the Mosaic GPU dialect (its memref element types) from an earlier lowering.
  ctx = jmlir.make_ir_context()
  mosaic_gpu_dialect.register_dialect(ctx)
  with ctx, ir.Location.unknown():
    ctx.allow_unregistered_dialects = True
    m = mcore._run_serde_pass(ir.Module.parse(module_bytes), serialize=False)
    passmanager.PassManager.parse("builtin.module(cse)", ctx).run(m.operation)
    txt = str(m)
  return {n: txt.count(n) for n in names}


@pytest.mark.parametrize("pack", [True, False])
def test_softmax_runs_once_per_real_row(pack):
  """The row-half pick leaves one exp2 per S1 value of the q rows: a thread's 64-key tile
  has 16 values per 8-row half (+ 2 for the running max's rescale), not 32 + 2."""
  cfg = dm.DecodeConfig(pack_qr=pack, num_splits=16)
  (mod,) = mosaic_modules(_lower(1, 16, 8, 8192, 128, True, cfg))
  n = _ops_after_cse(mod, ["ex2.approx", "arith.truncf"])
  assert n["ex2.approx"] == cfg.block_kv // 4 + 2, n
  assert n["arith.truncf"] == cfg.block_kv // 4, n   # hi(P2) and the P V operand, once each


def test_one_module_across_call_sites():
  """Three calls, one Mosaic module (the jit boundary around the kernel, as attention_mgpu)."""
  cfg = dm.DecodeConfig(num_splits=1)
  q = jax.ShapeDtypeStruct((4, 16, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((4, 1024, 8, 128), jnp.bfloat16)
  ln = jax.ShapeDtypeStruct((4,), jnp.int32)

  def f(q, k, v, ln):  # as in a model, each layer's query is computed
    o = q
    for _ in range(3):
      o = dm.parallax_decode_mgpu(o * 2, k, v, q, scale=0.1, lengths=ln, config=cfg)
    return o

  assert len(mosaic_modules(lower_h100(f, q, kv, kv, ln))) == 1


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not has_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_softmax_and_dtypes(dtype):
  run(Case(B=8, Hq=16, Hkv=8, S=2048, D=128, dtype=dtype, parallax=False,
           lengths=tuple(range(1, 2049, 256)), config=dm.DecodeConfig()), None)
