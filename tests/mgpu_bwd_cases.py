"""What the tests of the two Mosaic GPU backward kernels share (tests/test_attention_mgpu_dq.py,
tests/test_attention_mgpu_dkv.py): the cases, the kernels' residual arguments with the dense
float32 reference's gradients, an interpret-mode Triton call config, and the checks of the
kernels' wiring into the training front."""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import attention
from pallas_kernels import attention_triton as tr
from tests.kernels import lower_h100, mosaic_modules, triton_modules
from tests.test_attention_mgpu import Case, inputs, reference, rel, segment_ids

# max |x - ref| / max |ref| of each gradient, as the forward's
TOL = {jnp.bfloat16: 1e-2, jnp.float16: 4e-3}

# name -> (Case, keyword arguments of the kernel's config or None for its default)
CASES = {
    "bf16_parallax_causal_d64_gqa2": (Case(), None),
    "bf16_parallax_causal_d128_gqa4": (Case(T=128, S=128, D=128, Hq=4, Hkv=1), None),
    "fp16_softmax_noncausal_d128": (Case(D=128, dtype=jnp.float16, parallax=False,
                                         causal=False), None),
    "bf16_parallax_causal_T<S_d128": (Case(T=128, S=384, D=128), None),
    "bf16_parallax_packed_segments_3stages": (Case(segments="packed"), {"num_stages": 3}),
    "bf16_parallax_packed_segments_B2": (Case(B=2, segments="packed"), None),
    "bf16_softmax_causal_packed_segments_d128": (Case(D=128, parallax=False,
                                                      segments="packed"), None),
    "bf16_parallax_noncausal_cross_segments_arrayscale": (
        Case(causal=False, segments="cross", array_scale=True), None),
    "bf16_parallax_causal_races": (Case(races=True), None),
    "bf16_parallax_causal_d128_split_scores": (Case(T=128, S=128, D=128, Hq=4, Hkv=1),
                                               {"split_scores": True}),
}
# the interpreter cases CI runs (both members and dtypes, causal and not, GQA 4, packed
# segments, 3 stages); the rest are `slow`
CI_CASES = ["bf16_parallax_causal_d128_gqa4", "fp16_softmax_noncausal_d128",
            "bf16_parallax_packed_segments_3stages"]

GPU_CASES = {
    "bf16_parallax_causal_d128_L1024": (Case(B=2, T=1024, S=1024, Hq=8, Hkv=4, D=128), None),
    "bf16_parallax_causal_d64_L2048_gqa8": (Case(B=1, T=2048, S=2048, Hq=8, Hkv=1, D=64),
                                            None),
    "bf16_softmax_noncausal_d128_3stages": (Case(B=1, T=1024, S=2048, Hq=4, Hkv=2, D=128,
                                                 parallax=False, causal=False),
                                            {"num_stages": 3}),
    "fp16_parallax_causal_T<S_d128": (Case(B=1, T=1024, S=2048, Hq=4, Hkv=2, D=128,
                                           dtype=jnp.float16), None),
    "bf16_parallax_packed_segments_d128": (Case(B=2, T=2048, S=2048, Hq=8, Hkv=4, D=128,
                                                segments="packed"), None),
    "bf16_parallax_cross_segments_arrayscale": (Case(B=1, T=1024, S=1024, Hq=4, Hkv=2,
                                                     causal=False, segments="cross",
                                                     array_scale=True), None),
}


def with_config(cases: dict, config_cls) -> dict:
  """The cases with their config keyword arguments made into `config_cls` instances."""
  return {n: (c, None if kw is None else config_cls(**kw)) for n, (c, kw) in cases.items()}


def run_case(module, kernel, c: Case, cfg, interpret: bool):
  """One kernel case: the reference's residuals and gradients, the kernel's `supported`,
  then `kernel` (parallax_dq_mgpu or parallax_dkv_mgpu of `module`) interpreted or jitted
  on a fresh q buffer (it must not read its outputs' memory), with the race detector's
  verdict where the case asks for it. Returns (inputs, the kernel's outputs, grads)."""
  from tests.kernels import interpret_params
  args, ref = residuals_and_grads(c)
  q, k, v, r, do, lse, delta, tbar, gbar, scale, qs, ks = args
  ok, why = module.supported(q, k, v, r, causal=c.causal, q_segment_ids=qs,
                             kv_segment_ids=ks, config=cfg,
                             platform="interpret" if interpret else None)
  assert ok, why

  def f(q, k, v, r, do, lse, delta, tbar, gbar):
    return kernel(q, k, v, r, do, lse, delta, tbar, gbar, scale=scale, causal=c.causal,
                  q_segment_ids=qs, kv_segment_ids=ks, config=cfg,
                  interpret=interpret_params(c.races) if interpret else None)

  out = (f if interpret else jax.jit(f))(q.at[:].set(q), k, v, r, do, lse, delta, tbar, gbar)
  if c.races:
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    assert not gpu_callbacks.get_races().races_found, "the race detector reported a race"
  return args, out, ref


def residuals_and_grads(c: Case, seed=0):
  """Inputs, the kernels' residual arguments (lse, delta, tbar, gbar from the reference's
  o, vbar in float32) and the reference's gradients {q, k, v, r} (r None for softmax)."""
  q, k, v, r, scale = inputs(c, seed)
  qs, ks = segment_ids(c, seed)
  do = jax.random.normal(jax.random.PRNGKey(seed + 11), q.shape, jnp.float32).astype(q.dtype)
  o, lse, tbar, vbar = reference(q, k, v, r, scale, c.causal, qs, ks)
  f32 = lambda x: x.astype(jnp.float32)
  delta = jnp.einsum("bthd,bthd->bht", o, f32(do))
  gbar = None if r is None else jnp.einsum("bthd,bthd->bht", vbar, f32(do))
  prims = [f32(x) for x in (q, k, v, r) if x is not None]
  out = lambda q, k, v, r=None: reference(q, k, v, r, scale, c.causal, qs, ks)[0]
  _, vjp = jax.vjp(out, *prims)
  grads = dict(zip("qkvr", vjp(f32(do))))
  grads.setdefault("r", None)
  return (q, k, v, r, do, lse, delta, tbar, gbar, scale, qs, ks), grads


def triton_config(q, k, r, causal, seg, interpret=True):
  """The Triton kernels' CallConfig for unpadded inputs (their fixup launches, in tests)."""
  B, T, Hq, D = q.shape
  return tr.CallConfig(T=T, S=k.shape[1], Tp=T, Sp=k.shape[1], D=D, Hq=Hq, Hkv=k.shape[2],
                       causal=causal, window=None, has_r=r is not None, has_seg=seg,
                       need_dscale=False, blocks=tr.default_block_sizes(D, r is not None),
                       interpret=interpret, fp16_pv=r is not None and q.dtype == jnp.bfloat16)


def check_training_gradient_lowers(flag: str, argnums, triton_kernel: str):
  """`BlockSizes(<flag>=True)`: a training gradient (w.r.t. argnums of q, k, v, r) lowers for
  an H100 with a Mosaic GPU module and the Triton kernel's fixup launch in place of the
  Triton kernel `triton_kernel` (the caller makes the kernel module's Hopper check pass)."""
  sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  q, kv = sd(1, 1024, 8, 128), sd(1, 1024, 4, 128)
  bs = dataclasses.replace(tr.default_block_sizes(128, True), **{flag: True})

  def loss(q, k, v, r):
    o = attention.parallax_flash_attention(q, k, v, r, scale=0.1, block_sizes=bs)
    return jnp.sum(o.astype(jnp.float32))

  low = lower_h100(jax.grad(loss, argnums=argnums), q, kv, kv, q)
  names = [n for n, _ in triton_modules(low)]
  assert f"{triton_kernel}_fixup" in names and triton_kernel not in names, names
  assert len(mosaic_modules(low)) >= 1


def check_front_gradients_match_triton(flag: str, segments: bool, poison: bool):
  """GPU: gradients through `parallax_flash_attention` with `BlockSizes(<flag>=True)` equal
  the Triton kernels' (NaN at a masked position: the fixup repairs what the kernel marks)."""
  c = Case(B=2, T=2048, S=2048, Hq=8, Hkv=4, D=128, segments="packed" if segments else None)
  q, k, v, r, scale = inputs(c, seed=2)
  qs, ks = segment_ids(c, seed=2)
  if poison:
    v = v.at[:, -1].set(jnp.nan)  # the last key: seen by the last row only
  w = jax.random.normal(jax.random.PRNGKey(4), q.shape, jnp.float32)

  def grads(mosaic):
    bs = dataclasses.replace(tr.default_block_sizes(128, True), **{flag: mosaic})
    loss = lambda q, k, v, r: jnp.sum(attention.parallax_flash_attention(
        q, k, v, r, scale=scale, q_segment_ids=qs, kv_segment_ids=ks,
        block_sizes=bs).astype(jnp.float32) * w)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, r)

  for name, a, b in zip(("dq", "dk", "dv", "dr"), grads(True), grads(False)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
    fin = np.isfinite(b)
    assert rel(a[fin], b[fin]) < 1e-2, name


def check_cuda_lowering(kernel, config, D: int, parallax: bool, causal: bool, seg: bool,
                        score_cols: int):
  """`kernel` (parallax_dq_mgpu or parallax_dkv_mgpu) through Mosaic GPU's Python lowering in
  full and the module verifier for an abstract H100: one module with the score products
  ([64, score_cols]), the gradient products ([64, D]), TMA both ways and setmaxnreg."""
  sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  q, kv, row = sd(2, 1024, 8, D), sd(2, 1024, 4, D), sd(2, 8, 1024, dt=jnp.float32)
  ids = sd(2, 1024, dt=jnp.int32) if seg else None

  def f(q, k, v, r, do, lse, delta, tbar, gbar, ids):
    return kernel(q, k, v, r, do, lse, delta, tbar, gbar, scale=0.1, config=config,
                  causal=causal, q_segment_ids=ids, kv_segment_ids=ids)

  p = parallax
  mods = mosaic_modules(lower_h100(f, q, kv, kv, q if p else None, q, row, row,
                                   row if p else None, row if p else None, ids))
  assert len(mods) == 1
  ops = set(re.findall(rb"[a-z_]+(?:\.[a-z_0-9]+)+", mods[0]))
  assert b"wgmma.mma_async.sync.aligned.m64n%dk16.f32.bf16.bf16" % score_cols in ops
  assert b"wgmma.mma_async.sync.aligned.m64n%dk16.f32.bf16.bf16" % D in ops
  assert b"nvvm.cp.async.bulk.tensor.shared.cluster.global" in ops  # TMA loads
  assert b"nvvm.cp.async.bulk.tensor.global.shared.cta" in ops  # TMA stores
  assert b"setmaxnreg.inc.sync.aligned.u32" in ops and b"setmaxnreg.dec.sync.aligned.u32" in ops
