"""The family functions inside `jax.shard_map` (batch and heads split over a 4 x 2 mesh of
simulated CPU devices, default `check_vma`) equal the unsharded call, gradients included
(the streaming members; the xla and moments paths and the solve probe passed as they were).

The chunked implementation's loop carries start from constants (zeros, -inf), which
shard_map's type check holds invariant while each step's output varies over the mesh: every
streaming member failed with "cond branches must have equal output types". Runs in a
subprocess (the device count is fixed before JAX starts).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import parallax_jax as pj

mesh = jax.make_mesh((4, 2), ("data", "model"))
B, L, Hq, Hkv, D = 4, 20, 4, 2, 8  # GQA 2; L not a multiple of the chunked blocks
ks = jax.random.split(jax.random.key(0), 4)
q, r = (jax.random.normal(k, (B, L, Hq, D)) for k in ks[:2])
k, v = (jax.random.normal(k_, (B, L, Hkv, D)) for k_ in ks[2:])
seg = jnp.asarray(np.repeat([[1] * 12 + [2] * 8], B, 0))
spec = P("data", None, "model", None)
put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
args = (put(q, spec), put(k, spec), put(v, spec), put(r, spec), put(seg, P("data", None)))
CASES = [c.split("/") for c in sys.argv[1].split(",")]
res = {}
for name, impl in CASES:
  def attn(q, k, v, r, seg):
    kw = dict(segment_ids=seg, implementation=impl, block_sizes=pj.BlockSizes(8, 8))
    if name == "parallax":
      return pj.parallax_attention(q, k, v, r, **kw)
    if name == "linear":
      return pj.linear_attention(q, k, v, **kw)
    if name == "lla":  # the solve probe: dense formulas a query block at a time
      return pj.lla_attention(q, k, v, ridge=0.1, **kw)
    return pj.softmax_attention(q, k, v, **kw)
  sharded = jax.shard_map(attn, mesh=mesh, in_specs=(spec,) * 4 + (P("data", None),),
                          out_specs=spec)
  loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)
  grad = lambda f: jax.grad(loss(f), argnums=(0, 1, 2, 3))
  out, g = jax.jit(sharded)(*args), jax.jit(grad(sharded))(*args)
  ref, gr = attn(q, k, v, r, seg), grad(attn)(q, k, v, r, seg)
  res[f"{name}/{impl}"] = [float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))] + [
      float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(g, gr)
      if float(jnp.max(jnp.abs(b))) > 0]
print("RESULT" + json.dumps(res))
""")


@pytest.mark.parametrize("cases", [
    "parallax/chunked",
    pytest.param("softmax/chunked,linear/chunked,lla/chunked,parallax/xla,parallax/moments",
                 marks=pytest.mark.slow)])
def test_family_inside_shard_map_equals_unsharded(cases):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip(),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  p = subprocess.run([sys.executable, "-c", SCRIPT, cases], env=env, cwd=REPO, capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads([l for l in p.stdout.splitlines() if l.startswith("RESULT")][-1][6:])
  assert sorted(res) == sorted(cases.split(",")), res
  for case, errs in res.items():  # the solve's float32 conditioning: reduction order shows
    assert len(errs) >= 3 and max(errs) < (1e-3 if case.startswith("lla") else 1e-5), (case, errs)
