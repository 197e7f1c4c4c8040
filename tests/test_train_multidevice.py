"""Data / FSDP / tensor parallel train steps on 8 simulated CPU devices match 1 device;
diagnostics and eval run on every mesh (scanned layers' diagnostics equal the unrolled ones on
2 x 2 x 2); the whole loop (eval, diagnostics, checkpoint,
resume, sampling) runs on a data x fsdp x tensor = 2 x 2 x 2 mesh.

CI runs two sharded meshes, data x tensor = 4 x 2 with gradient accumulation and
data x fsdp x tensor = 2 x 2 x 2, then the loop; the pure data = 8 and fsdp = 8 meshes run
with `-m slow`.

Runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must
be set before JAX starts). Three optimizer steps (Muon + AdamW, grad clipping) on the same
batches for each mesh; losses and grad norms must agree with the 1-device run to float32
reduction-order tolerance, and the parameters must end up sharded as the rules say. The
1-device run uses the unfused loss, the meshes the fused chunked one (fused_cross_entropy).
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
import jax, numpy as np
from parallax_jax.models import presets
from train.config import DataConfig, MeshConfig, OptimizerConfig, RunConfig, ScheduleConfig, TrainConfig
from train.data import make_dataset
from train.mesh import make_mesh
from train.prepare import prepare
from train.step import Trainer
from parallax_jax import api

# Record the q shape each attention call sees while a train step traces: under a mesh the
# layer runs attention per shard (shard_map), so it must see the local batch / heads.
seen, _orig, _rec = [], api.attention, [False]
def _recording(q, *a, **kw):
  if _rec[0]:
    seen.append(list(q.shape))
  return _orig(q, *a, **kw)
api.attention = _recording

out, meshes, loop = sys.argv[1], sys.argv[2].split(","), sys.argv[3] == "loop"
# compiled steps are reused by the loop at the end (same programs)
jax.config.update("jax_compilation_cache_dir", out + "_xla_cache")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
configs = {}
prepare(out, None, vocab_size=320, max_mb=0.15, val_fraction=0.1, quiet=True)
assert jax.device_count() == 8
it = iter(make_dataset(out, split="train", seq_len=32, batch_size=8, prefetch=0))
batches = [next(it) for _ in range(2)]
res, kept = {}, {}
MESHES = {"single": (MeshConfig(1, 1, 1), 1, 1), "data": (MeshConfig(8, 1, 1), 8, 1),
          "fsdp": (MeshConfig(1, 8, 1), 8, 1), "tensor_accum": (MeshConfig(4, 1, 2), 8, 2),
          "all3": (MeshConfig(2, 2, 2), 8, 1)}
for name in ["single"] + meshes:
  mesh_cfg, ndev, accum = MESHES[name]
  cfg = TrainConfig(model=presets.tiny(vocab_size=320, max_seq_len=64, implementation="xla"),
                    mesh=mesh_cfg,
                    data=DataConfig(path=out, seq_len=32, global_batch_size=8, grad_accum=accum),
                    # the unfused loss on 1 device; fused, several chunks, on the meshes
                    optimizer=OptimizerConfig(name="muon", lr=1e-2, clip_grad_norm=1.0,
                                              loss_chunk_tokens=0 if ndev == 1 else 64),
                    schedule=ScheduleConfig(warmup_steps=1),
                    run=RunConfig(steps=2))
  tr = Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:ndev]))
  st = tr.init_state(0)
  ls = []
  seen.clear(); _rec[0] = True
  for b in batches:
    st, m = tr.train_step(st, tr.device_batch(b, accum=accum))
    ls.append([float(m["loss"]), float(m["grad_norm"])])
  _rec[0] = False
  # diagnostics (COR from the sown q/k/v/r, stable ranks) and eval on every mesh
  d = jax.device_get(tr.diagnostics(st["params"], tr.device_batch(batches[0])))
  ev = jax.device_get(tr.eval_step(st["params"], tr.device_batch(batches[0])))
  ls.append([float(d["cor/layer_0"]), float(ev["nll"]), float(ev["nll_repeat"]),
             float(ev["tokens_repeat"])])
  q = st["params"]["layers_0"]["attn"]["q_proj"]["kernel"]
  e = st["params"]["embed"]["embedding"]
  res[name] = {"losses": ls, "q_spec": str(q.sharding.spec), "e_spec": str(e.sharding.spec),
               "mu_spec": None, "attn_q": sorted({tuple(x) for x in seen})}
  configs[name] = cfg
  kept[name] = (st, d)

if "all3" in meshes:  # scanned layers on the mesh: the diagnostics stack the sown values
  import dataclasses, jax.numpy as jnp
  cfg = configs["all3"]
  scfg = dataclasses.replace(cfg, model=cfg.model.replace(scan_layers=True))
  st, d = kept["all3"]
  n = cfg.model.num_layers
  p = {k: v for k, v in st["params"].items() if not k.startswith("layers_")}
  p["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                             *[st["params"][f"layers_{i}"] for i in range(n)])
  tr = Trainer(scfg, make_mesh(scfg.mesh, jax.devices()[:8]))
  ds = jax.device_get(tr.diagnostics(jax.device_put(p, tr.param_shardings),
                                     tr.device_batch(batches[0])))
  res["scan_diag"] = {"keys_differ": sorted(set(ds) ^ set(d)), "max_rel": max(
      abs(float(ds[k]) - float(d[k])) / max(abs(float(d[k])), 1e-12) for k in d)}

# The whole loop on all three axes, with the all3 config above (so the compiled train, eval
# and diagnostics steps come from the persistent cache): eval, diagnostics, checkpoint,
# interrupt, resume, sampling.
import dataclasses
from train.loop import train
if not loop:
  print("RESULT" + json.dumps(res))
  sys.exit(0)
cfg = dataclasses.replace(configs["all3"], run=RunConfig(
    steps=2, out_dir=out + "_run", log_every=1, eval_every=1, diag_every=1, checkpoint_every=1,
    progress=False, sample_lines=1, sample_tokens=4))
q = lambda s: None
part = train(cfg, stop_after=1, log=q)
rest = train(cfg, log=q)
recs = [json.loads(l) for l in open(out + "_run/metrics.jsonl")]
res["loop"] = {"part": part["final_step"], "final": rest["final_step"],
               "samples": len(rest["samples"]),
               "loss_steps": [r["step"] for r in recs if "loss" in r],
               "keys": sorted(set().union(*recs)),
               "timings": rest["timings_s"]}
print("RESULT" + json.dumps(res))
""")


# [batch, length, q_heads, head_dim] per shard (tiny preset: 4 q heads, 2 kv heads), and a
# word each parameter spec must hold (q kernel [embed, q_heads, head_dim]; embedding [vocab,
# embed]).
EXPECT = {"data": ([1, 32, 4, 16], ()), "fsdp": ([1, 32, 4, 16], ("fsdp",)),
          "tensor_accum": ([1, 32, 2, 16], ("tensor",)),
          "all3": ([2, 32, 2, 16], ("fsdp", "tensor"))}


def run_meshes(tmp_path, meshes, loop):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip(),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "shards"), ",".join(meshes),
                      "loop" if loop else "no_loop"], env=env, cwd=REPO, capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  line = [l for l in p.stdout.splitlines() if l.startswith("RESULT")][-1]
  res = json.loads(line[len("RESULT"):])
  ref = res["single"]["losses"]
  assert res["single"]["attn_q"] == [[8, 32, 4, 16]], res["single"]
  for name in meshes:
    got = res[name]["losses"]
    for (l0, g0), (l1, g1) in zip(ref[:-1], got[:-1]):
      assert abs(l0 - l1) <= 2e-4 * abs(l0), (name, ref, got)
      assert abs(g0 - g1) <= 2e-3 * abs(g0), (name, ref, got)
    shape, words = EXPECT[name]
    assert res[name]["attn_q"] == [shape], res[name]
    assert all(w in res[name]["q_spec"] for w in words), res[name]
    # diagnostics and eval agree across meshes (the last entry of each run's list)
    ref_cor, ref_nll, ref_rep, ref_n = ref[-1]
    cor, nll, rep, n = got[-1]
    assert abs(cor - ref_cor) <= 1e-2 * abs(ref_cor) and abs(nll - ref_nll) <= 1e-3 * ref_nll, name
    assert n == ref_n > 0 and abs(rep - ref_rep) <= 1e-3 * ref_rep, name  # the repeat split
  if "tensor_accum" in meshes:
    assert "tensor" in res["tensor_accum"]["e_spec"]
  return res


def test_parallelisms_match_single_device(tmp_path):
  res = run_meshes(tmp_path, ["tensor_accum", "all3"], loop=True)
  loop = res["loop"]
  sd = res["scan_diag"]  # scanned layers' diagnostics equal the unrolled ones on the mesh
  assert sd["keys_differ"] == [] and sd["max_rel"] < 1e-3, sd
  assert (loop["part"], loop["final"], loop["samples"]) == (1, 2, 1), loop
  assert loop["loss_steps"] == [1, 2], loop
  assert {"eval/loss", "eval/loss_repeat", "eval/loss_novel", "cor/layer_0",
          "stable_rank/layers_0/attn/r_proj"} <= set(loop["keys"])
  t = loop["timings"]  # the resumed part: one step, its eval, diagnostics and save
  assert t["steps"] >= t["first_step"] > 0 and t["eval"] > 0 and t["diag"] > 0 and t["save"] > 0


@pytest.mark.slow
def test_data_and_fsdp_meshes_match_single_device(tmp_path):
  run_meshes(tmp_path, ["data", "fsdp"], loop=False)
