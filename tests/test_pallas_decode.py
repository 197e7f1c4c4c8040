"""Split-KV Pallas decode kernel (pallas_kernels/decode.py): interpret mode on CPU against a
dense float32 reference (and once against `parallax_jax.attention`); `-m gpu` compiled."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode as dk

warnings.filterwarnings("ignore", category=DeprecationWarning)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 4e-3}


def has_gpu():
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def make(rng, B, Hq, Hkv, S, D, dtype, parallax=True):
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, r = f(B, Hq, D), f(B, Hq, D) * 0.3
  k, v = f(B, S, Hkv, D), f(B, S, Hkv, D)
  # poison: garbage (large / NaN-free) values beyond the valid region must not matter
  return (q.astype(dtype), k.astype(dtype), v.astype(dtype),
          r.astype(dtype) if parallax else None)


def poison_tail(k, lengths):
  S = k.shape[1]
  invalid = jnp.arange(S)[None, :] >= jnp.asarray(lengths)[:, None]
  return jnp.where(invalid[:, :, None, None], jnp.asarray(1e4, k.dtype), k)


def check(rng, B, Hq, Hkv, S, D, dtype, lengths, window=None, ns=None, bk=16, parallax=True,
          interpret=True):
  q, k, v, r = make(rng, B, Hq, Hkv, S, D, dtype, parallax)
  k, v = poison_tail(k, lengths), poison_tail(v, lengths)
  scale = 1.0 / np.sqrt(D)
  lengths = jnp.asarray(lengths, jnp.int32)
  o = dk.parallax_decode(q, k, v, r, scale=scale, lengths=lengths, window=window,
                         num_splits=ns, block_kv=bk, interpret=interpret)
  ref = dk.reference_decode(q, k, v, r, scale=scale, lengths=lengths, window=window)
  assert o.shape == q.shape and o.dtype == q.dtype
  o = np.asarray(o, np.float32)
  ref = np.asarray(ref)
  assert np.all(np.isfinite(o))
  err = np.max(np.abs(o - ref)) / max(np.max(np.abs(ref)), 1e-6)
  assert err <= TOL[dtype], err
  return o, ref


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (8, 2), (8, 1), (16, 2)])
@pytest.mark.parametrize("ns", [1, 3])
def test_gqa_ratios(rng, Hq, Hkv, ns):
  check(rng, 3, Hq, Hkv, 70, 16, jnp.float32, [1, 37, 70], ns=ns)


@pytest.mark.parametrize("ns", [1, 2, 3, 4])
@pytest.mark.parametrize("window", [None, 1, 5, 40])
def test_splits_windows(rng, ns, window):
  check(rng, 4, 4, 2, 100, 16, jnp.float32, [1, 17, 64, 100], window=window, ns=ns)


@pytest.mark.parametrize("parallax", [True, False])
def test_softmax_and_zero_length(rng, parallax):
  o, _ = check(rng, 3, 4, 2, 40, 16, jnp.float32, [0, 5, 40], ns=2, parallax=parallax)
  assert np.all(o[0] == 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(rng, dtype):
  check(rng, 2, 8, 2, 96, 64, dtype, [33, 96], ns=2, bk=32)


def test_default_splits_and_small_cache(rng):
  check(rng, 2, 2, 1, 10, 16, jnp.float32, [3, 10], bk=None)  # S < block_kv: padded
  check(rng, 1, 2, 1, 300, 16, jnp.float32, [299], bk=None)  # heuristic num_splits
  assert dk.default_num_splits(1, 8, 32768) > 1
  assert dk.default_num_splits(256, 8, 1024) == 1


def test_matches_family_api(rng):
  import parallax_jax
  B, Hq, Hkv, S, D = 2, 4, 2, 48, 16
  q, k, v, r = make(rng, B, Hq, Hkv, S, D, jnp.float32)
  lengths = jnp.asarray([20, 48], jnp.int32)
  scale = 1.0 / np.sqrt(D)
  o = dk.parallax_decode(q, k, v, r, scale=scale, lengths=lengths, num_splits=2, block_kv=16,
                         interpret=True)
  kv_ids = jnp.where(jnp.arange(S)[None] < lengths[:, None], 0, -1)
  q_ids = jnp.zeros((B, 1), jnp.int32)
  ref = parallax_jax.attention(q[:, None], k, v, r[:, None], probe="learned",
                               affine="affine", causal=True, segment_ids=(q_ids, kv_ids),
                               implementation="xla")[:, 0]  # bandwidth None: 1/sqrt(D)
  # causal end-aligned: the query sits at S-1 which sees all valid slots; same as lengths mask
  np.testing.assert_allclose(np.asarray(o), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("parallax", [True, False])
def test_gpu(rng, D, dtype, parallax):
  check(rng, 4, 16, 8, 3000, D, dtype, [1, 1000, 2999, 3000], ns=None, bk=64,
        parallax=parallax, interpret=False)
  check(rng, 2, 16, 2, 1024, D, dtype, [700, 1024], window=256, ns=3, bk=64,
        parallax=parallax, interpret=False)


@pytest.mark.parametrize("parallax", [True, False])
def test_cuda_lowering_abstract_h100(parallax):
  """Lower for CUDA on an abstract H100 (no GPU) and verify the kernel's TTIR."""
  from tests.test_pallas_train import _triton_modules, verify_triton_modules

  dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
  q = jax.ShapeDtypeStruct((4, 16, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((4, 3000, 8, 128), jnp.bfloat16)
  lens = jax.ShapeDtypeStruct((4,), jnp.int32)
  f = lambda q, k, v, r, l: dk.parallax_decode(q, k, v, r if parallax else None, scale=0.1,
                                               lengths=l, window=500, num_splits=3)
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = jax.jit(f).trace(q, kv, kv, q, lens).lower(lowering_platforms=("cuda",))
  mods = _triton_modules(lowered)
  assert [n for n, _ in mods] == ["parallax_decode" if parallax else "softmax_decode"]
  verify_triton_modules(mods)
