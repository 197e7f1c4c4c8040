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

A run checkpointed on one mesh resumes on another (fewer devices, another split; `-m slow`):
one process per device count, and the resumed run follows the uninterrupted one.
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
import collections, json, sys
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
  if accum > 1:  # the loop's diagnostics: micro-batch by micro-batch, their mean
    da = jax.device_get(tr.diagnostics(st["params"], tr.device_batch(batches[0], accum=accum)))
    per = [jax.device_get(tr.diagnostics(st["params"], tr.device_batch(
        {k: v[i * 8 // accum:(i + 1) * 8 // accum] for k, v in batches[0].items()})))
           for i in range(accum)]
    res["accum_diag"] = max(abs(float(da[k]) - sum(float(x[k]) for x in per) / accum)
                            / max(abs(float(da[k])), 1e-12) for k in da)
    # eval micro-batch by micro-batch (the loop's): the whole batch's sums
    ea = jax.device_get(tr.eval_step(st["params"], tr.device_batch(batches[0], accum=accum)))
    res["accum_eval"] = max(abs(float(ea[k]) - float(ev[k])) / max(abs(float(ev[k])), 1e-12)
                            for k in ev)
  # one process per device: those holding the same batch shard read the same data slice
  from train.mesh import batch_groups
  groups = [batch_groups(tr.mesh, lambda d: d.id, d.id) for d in tr.mesh.devices.flat]
  res[name + "_groups"] = sorted(collections.Counter(groups).items())
  if name == "tensor_accum":  # processes of 3 and 5 devices: overlapping shard sets
    try:
      batch_groups(tr.mesh, lambda d: int(d.id < 3), 0)
    except ValueError as err:
      res["groups_refused"] = str(err)
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
    assert res["accum_diag"] < 1e-4, res["accum_diag"]
    assert res["accum_eval"] < 1e-5, res["accum_eval"]
    assert res["tensor_accum_groups"] == [[[i, 4], 2] for i in range(4)], res
    assert "overlap or differ in size" in res.get("groups_refused", ""), res
  if "all3" in meshes:
    assert res["all3_groups"] == [[[i, 4], 2] for i in range(4)], res
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


# One leg of a run per process, each with its own device count (a preempted job resuming on
# fewer GPUs): argv = shards, run dir, legs as JSON [[name, out, [data, fsdp, tensor], steps,
# stop_after], ...]. A leg named "*_refused" must fail before it touches the run.
RESUME_SCRIPT = textwrap.dedent(r"""
import json, sys
import jax, numpy as np
from parallax_jax.models import presets
from train.config import DataConfig, MeshConfig, OptimizerConfig, RunConfig, ScheduleConfig, TrainConfig
from train import checkpoint as ckpt_lib
from train.loop import train

shards, legs = sys.argv[1], json.loads(sys.argv[2])
jax.config.update("jax_compilation_cache_dir", sys.argv[3])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# the restored state, leaf by leaf, against the shardings the new run's Trainer asked for
restored = {}
_restore = ckpt_lib.Checkpointer.restore
def restore(self, step, abstract_state, check=None):
  state, data = _restore(self, step, abstract_state, check)
  got, want = jax.tree.leaves(state), jax.tree.leaves(abstract_state)
  restored.update(n=len(got), mismatched=sum(
      not g.sharding.is_equivalent_to(w.sharding, g.ndim) for g, w in zip(got, want)),
      devices=sorted({d.id for g in got for d in g.sharding.device_set}))
  return state, data
ckpt_lib.Checkpointer.restore = restore

res = {}
for name, out, mesh, steps, stop_after in legs:
  cfg = TrainConfig(
      name="mesh_resume",
      model=presets.tiny(vocab_size=320, max_seq_len=64, implementation="xla"),
      mesh=MeshConfig(*mesh),
      data=DataConfig(path=shards, seq_len=32, global_batch_size=4, prefetch=0,
                      auto_prepare=False),
      optimizer=OptimizerConfig(name="muon", lr=1e-2, loss_chunk_tokens=64),
      schedule=ScheduleConfig(warmup_steps=1, decay_fraction=0.5),
      run=RunConfig(steps=steps, out_dir=out, log_every=1, eval_every=0, diag_every=0,
                    checkpoint_every=0, progress=False, sample_lines=0))
  restored.clear()
  if name.endswith("_refused"):
    try:
      train(cfg, log=lambda s: None)
      res[name] = None
    except ValueError as e:
      res[name] = str(e)
    continue
  r = train(cfg, stop_after=stop_after, log=lambda s: None)
  params = r["state"]["params"]
  q = params["layers_0"]["attn"]["q_proj"]["kernel"]
  leaves = jax.tree.leaves(r["state"])
  res[name] = {"losses": {str(k): v for k, v in r["losses"].items()},
               "final": r["final_step"], "restored": dict(restored),
               "q_mesh": dict(q.sharding.mesh.shape),
               "q_shard": [list(q.shape), list(q.sharding.shard_shape(q.shape))],
               "devices": sorted({d.id for x in leaves for d in x.sharding.device_set})}
  np.savez(out + f"_{name}.npz", *[np.asarray(x) for x in jax.tree.leaves(params)])
print("RESULT" + json.dumps(res))
""")


def run_legs(tmp_path, ndev, legs):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={ndev}").strip(),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  p = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "shards"),
                      json.dumps(legs), str(tmp_path / "xla_cache")], env=env, cwd=REPO,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  line = [l for l in p.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


@pytest.mark.slow
def test_resume_under_another_mesh_continues_the_trajectory(tmp_path):
  """A run checkpointed on 8 devices (fsdp 4 x tensor 2) resumes on 2 (data 2), then on 1,
  and follows the uninterrupted 8-device run: `mesh.*` is a free key on resume
  (train/resume.py). The restored state lands on the new mesh's shardings and devices."""
  import numpy as np

  from train.prepare import prepare
  prepare(str(tmp_path / "shards"), None, vocab_size=320, max_mb=0.1, val_fraction=0.1,
          quiet=True)
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  a = run_legs(tmp_path, 8, [["full", full, [1, 4, 2], 6, None],
                             ["a", part, [1, 4, 2], 6, 2],
                             # 4 rows do not split over data = 8: refused, naming the key
                             ["data8_refused", part, [8, 1, 1], 6, None]])
  b = run_legs(tmp_path, 2, [["b", part, [2, 1, 1], 6, 4]])
  c = run_legs(tmp_path, 1, [["c", part, [1, 1, 1], 6, None]])
  err = a["data8_refused"]
  assert err and err.startswith("data.global_batch_size:") and "\n" not in err, err
  assert "data x fsdp = 8" in err, err
  ref = {int(k): v for k, v in a["full"]["losses"].items()}
  got = {int(k): v for leg in (a["a"], b["b"], c["c"]) for k, v in leg["losses"].items()}
  assert sorted(got) == sorted(ref) == list(range(1, 7)), (got, ref)
  assert all(got[s] == ref[s] for s in (1, 2)), (got, ref)  # the same mesh: the same program
  # After the switch only float32 reduction-order noise (other all-reduce / matmul splits),
  # compounded over a few steps: 2e-4, this file's cross-mesh loss tolerance. Fresh 6-step
  # runs on 2 or 1 device differ from the 8-device one by up to 6e-5 here, this resumed run
  # by under 2e-5; a resume that drops the optimizer state is 2e-2 off at its second step,
  # one that restarts the data stream 1e-1.
  for s in range(3, 7):
    assert abs(got[s] - ref[s]) <= 2e-4 * abs(ref[s]), (s, got[s], ref[s])
  assert (a["a"]["restored"], b["b"]["final"], c["c"]["final"]) == ({}, 4, 6)
  for leg, devs, mesh in ((b["b"], [0, 1], {"data": 2, "fsdp": 1, "tensor": 1}),
                          (c["c"], [0], {"data": 1, "fsdp": 1, "tensor": 1})):
    rs = leg["restored"]
    assert rs["n"] > 0 and rs["mismatched"] == 0 and rs["devices"] == devs, leg
    assert leg["devices"] == devs and leg["q_mesh"] == mesh, leg
  # q kernel [embed, heads, head_dim]: split 4 x 2 on mesh A, whole on each device of B / C
  (e, h, d), shard = a["full"]["q_shard"]
  assert shard == [e // 4, h // 2, d], a["full"]
  assert b["b"]["q_shard"] == c["c"]["q_shard"] == [[e, h, d], [e, h, d]], (b, c)
  # the final parameters, as one vector (the noise floor: fresh runs on other meshes, 1.3e-3;
  # per leaf it reaches 2e-2 in the zero-initialised W_R, built only of Muon's orthogonalised
  # updates, which amplify the noise)
  x, y = np.load(full + "_full.npz"), np.load(part + "_c.npz")
  diff = sum(float(np.sum((x[k] - y[k]) ** 2)) for k in x.files)
  assert diff <= (5e-3) ** 2 * sum(float(np.sum(x[k] ** 2)) for k in x.files), diff
