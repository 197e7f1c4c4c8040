"""The quality study: corpus selection, grid planning, the runner (resume, divergence, time
budget, config guards) with a stand-in loop, and one real 2-arm grid through train.loop with
its report."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import tarfile
import time

import pytest

from parallax_jax.models import presets
from train import corpus
from train.config import (DataConfig, MeshConfig, OptimizerConfig, RunConfig, ScheduleConfig,
                          TrainConfig)
from train.study import Arm, Grid, grid as grid_lib, results as res_lib, runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(vocab: int = 512) -> TrainConfig:
  return TrainConfig(
      name="t", model=presets.tiny(vocab_size=vocab, max_seq_len=64, implementation="xla"),
      mesh=MeshConfig(data=1),
      data=DataConfig(path="unused", seq_len=32, global_batch_size=4, prefetch=0,
                      eval_batches=1, auto_prepare=False),
      optimizer=OptimizerConfig(name="muon", lr=1e-2),
      schedule=ScheduleConfig(warmup_steps=1, decay_fraction=0.5),
      run=RunConfig(steps=4, log_every=2, eval_every=4, diag_every=0, checkpoint_every=0,
                    progress=False, sample_lines=0))


def sweep_grid(**kw) -> Grid:
  return Grid("g", (Arm("a", tiny_config(), (2e-3, 1e-3, 4e-3)),), seeds=2, **kw)


def done(loss):
  return {"status": "done", "eval_loss": loss}


# --------------------------------------------------------------------------- planning
def test_plan_sweep_then_seeds_at_the_best_lr():
  g = sweep_grid()
  arm = g.arms[0]
  p = grid_lib.plan_arm(g, arm, {})
  assert [r.run_id for r in p.runs] == ["a/lr0.002_s0", "a/lr0.001_s0", "a/lr0.004_s0"]
  assert p.best is None and not p.complete
  res = {"a/lr0.002_s0": done(3.0), "a/lr0.001_s0": done(3.2)}
  assert grid_lib.plan_arm(g, arm, res).best is None  # a sweep run is still missing
  res["a/lr0.004_s0"] = {"status": "diverged"}
  p = grid_lib.plan_arm(g, arm, res)
  assert p.best == 2e-3 and p.edge is None
  assert [(r.run_id, r.stage) for r in p.runs[3:]] == [("a/lr0.002_s1", "seed")]
  todo = grid_lib.pending(g, [p], res)
  assert [r.run_id for r in todo] == ["a/lr0.002_s1"]
  res["a/lr0.002_s1"] = done(3.01)
  assert grid_lib.plan_arm(g, arm, res).complete
  # an arm's own seed count replaces the grid's
  three = dataclasses.replace(arm, seeds=3)
  assert [r.run_id for r in grid_lib.plan_arm(g, three, res).runs[3:]] == \
      ["a/lr0.002_s1", "a/lr0.002_s2"]
  with pytest.raises(ValueError, match="arm a: seeds"):
    dataclasses.replace(arm, seeds=0)


def test_plan_extends_an_edge_best_then_stops_at_max_extra():
  g = sweep_grid(max_extra_lrs=2)
  arm = g.arms[0]
  res = {"a/lr0.001_s0": done(3.3), "a/lr0.002_s0": done(3.2), "a/lr0.004_s0": done(3.1)}
  p = grid_lib.plan_arm(g, arm, res)
  assert p.runs[-1].run_id == "a/lr0.008_s0" and p.runs[-1].stage == "extend"
  assert p.best is None
  res["a/lr0.008_s0"] = done(3.05)  # still improving: one more
  p = grid_lib.plan_arm(g, arm, res)
  assert p.runs[-1].run_id == "a/lr0.016_s0"
  res["a/lr0.016_s0"] = done(3.0)  # the edge again, but no extension left
  p = grid_lib.plan_arm(g, arm, res)
  assert p.best == 1.6e-2 and p.edge == "high" and p.runs[-1].run_id == "a/lr0.016_s1"


def test_plan_all_diverged_looks_lower_and_failed_runs_retry_then_drop():
  g = sweep_grid(max_extra_lrs=1)
  arm = g.arms[0]
  res = {f"a/lr{k}_s0": {"status": "diverged"} for k in ("0.001", "0.002", "0.004")}
  p = grid_lib.plan_arm(g, arm, res)
  assert p.runs[-1].run_id == "a/lr0.0005_s0"
  res["a/lr0.0005_s0"] = {"status": "diverged"}
  p = grid_lib.plan_arm(g, arm, res)
  assert p.best is None and p.complete
  res = {"a/lr0.002_s0": {"status": "failed", "failures": 1}}
  p = grid_lib.plan_arm(g, arm, res)
  assert "a/lr0.002_s0" in [r.run_id for r in grid_lib.pending(g, [p], res)]
  res["a/lr0.002_s0"]["failures"] = 2
  assert "a/lr0.002_s0" not in [r.run_id for r in grid_lib.pending(g, [p], res)]


def test_selection_unavailable_arms_and_grid_checks():
  g = Grid("g", (Arm("a", tiny_config(), (1e-3, 2e-3, 4e-3)),
                 Arm("b", tiny_config(), (1e-3, 2e-3, 4e-3), overrides=("model.r_bogus=1",))))
  plans = grid_lib.plan_grid(g, {})
  assert plans[1].unavailable.startswith("model.r_bogus: unknown key") and not plans[1].runs
  runs = grid_lib.pending(g, plans, {})
  assert [r.run_id for r in grid_lib.select(runs, ("a/lr0.002*",))] == ["a/lr0.002_s0"]
  assert len(grid_lib.select(runs, ("a",))) == 3
  shards = [grid_lib.select(runs, shard=(i, 2)) for i in range(2)]
  assert sorted(r.run_id for s in shards for r in s) == sorted(r.run_id for r in runs)
  with pytest.raises(ValueError, match="--shard"):
    grid_lib.parse_shard("2/2")
  with pytest.raises(ValueError, match="min_lrs"):
    Grid("g", (Arm("a", tiny_config(), (1e-3,)),))
  with pytest.raises(ValueError, match="baseline 'zz'"):
    Grid("g", (Arm("a", tiny_config(), (1e-3,), baseline="zz"),), min_lrs=1)
  with pytest.raises(ValueError, match="arm.name"):
    Arm("A b", tiny_config(), (1e-3,))


def test_token_efficiency_interpolates_the_control_in_log_tokens(tmp_path):
  """softmax 2.2 at 100 tokens, 1.8 at 200; Parallax 2.0 at 100: the control needs
  2 ** ((2.2 - 2.0) / (2.2 - 1.8)) = x1.41; below the control's longer loss only a bound."""
  import dataclasses
  from train.study import report

  def arm(grid, name, base, loss, tokens, longer_of=None):
    return report.ArmSummary(grid=grid, arm=name, optimizer="muon", baseline=base, note="",
                             lrs=[1e-3], sweep={}, best=1e-3, edge=None,
                             seeds=[{"status": "done", "eval_loss": loss, "tokens": tokens,
                                     "run_dir": str(tmp_path / grid / name)}], pending=[],
                             longer_of=longer_of)
  arms = [arm("main", "p", "s", 2.0, 100), arm("main", "s", None, 2.2, 100),
          arm("long", "p_long", "s_long", 1.7, 200, "main/p"),
          arm("long", "s_long", None, 1.8, 200, "main/s")]
  index = {a.key: a for a in arms}
  (e,) = report._efficiency(index)
  assert e["arm"].key == "main/p" and e["bound"] == "" and e["parallax"] == (2.0, 1.7)
  assert e["ratio"] == pytest.approx(2 ** 0.5)
  table = report._efficiency_table([e])
  assert "x1.41 (0.0M)" in table[-1] and "-0.2000 / -0.1000" in table[-1]
  row = report._claims(index)[-1]
  assert "| x1.41 | - |" in row and "ahead by more than the paper's" in row
  assert "not ahead" not in row
  index["long/p_long"] = arm("long", "p_long", "s_long", 1.81, 200, "main/p")
  assert "at 0.0M tokens Parallax is not ahead (+0.0100)" in report._claims(index)[-1]
  index["long/p_long"] = arm("long", "p_long", "s_long", 1.7, 200, "main/p")
  assert report._claims(index, frozenset({"long"}))[-1] == row  # long: outside the claims
  index["main/p"] = arm("main", "p", "s", 1.75, 100)
  assert report._efficiency(index)[0]["bound"] == ">="
  index["main/p"] = arm("main", "p", "s", 2.3, 100)
  assert report._efficiency(index)[0]["bound"] == "<="
  assert "not as the paper" in report._claims(index)[-1]
  long = grid_lib.load_grid(os.path.join(REPO, "configs", "study", "long.py"))
  assert {a.longer_of for a in long.arms} == {f"main/{x}_{o}" for x in ("parallax", "softmax")
                                              for o in ("muon", "adamw")}
  with pytest.raises(ValueError, match="longer_of must be '<grid>/<arm>'"):
    dataclasses.replace(long.arms[0], longer_of="parallax_muon")


def test_study_grids_load_matched_and_equal_tokens():
  from parallax_jax.models.qwen3 import param_count
  grids = {n: grid_lib.load_grid(os.path.join(REPO, "configs", "study", f"{n}.py"))
           for n in ("main", "gate", "wr", "compute", "long", "smoke")}
  main = grids["main"]
  for opt in ("muon", "adamw"):
    par = grid_lib.arm_config(main.arm(f"parallax_{opt}"))
    ctl = grid_lib.arm_config(main.arm(f"softmax_{opt}"))
    assert ctl.model.attention == "softmax" and par.optimizer.name == ctl.optimizer.name == opt
    assert abs(param_count(par.model) / param_count(ctl.model) - 1) < 0.01
    assert 100e6 < param_count(par.model) < 150e6
  study = [a for n in ("main", "gate", "wr", "compute") for a in grids[n].arms]
  shapes = {(a.config.run.steps, a.config.data.global_batch_size, a.config.data.seq_len)
            for a in study}
  assert len(shapes) == 1 and all(len(a.lrs) >= 3 for a in study)
  by_opt = {}
  for a in study:  # arms of one optimizer share one sweep: none is tuned more
    by_opt.setdefault(a.config.optimizer.name, set()).add(a.lrs)
  assert all(len(v) == 1 for v in by_opt.values())
  assert grid_lib.arm_config(grids["gate"].arms[0]).model.correction_gate
  assert grid_lib.arm_config(grids["wr"].arm("like_q_muon")).model.r_init == "like_q"
  assert grid_lib.arm_config(grids["wr"].arm("r_norm_muon")).model.r_norm
  # the compute-matched control: Parallax's forward FLOPs per token within 1%
  from parallax_jax.models.presets import flops_per_token
  for opt in ("muon", "adamw"):
    par = grid_lib.arm_config(main.arm(f"parallax_{opt}")).model
    ctl = grid_lib.arm_config(grids["compute"].arm(f"softmax_compute_{opt}")).model
    assert ctl.attention == "softmax"
    assert abs(flops_per_token(ctl, 1024) / flops_per_token(par, 1024) - 1) < 0.01
  # the long grid: main's arms at twice the steps at their 960-step best lr (Muon's also at
  # half of it, both arms alike), out of the claims table
  long = grids["long"]
  assert not long.claims
  for a in long.arms:
    assert a.lrs[1:] == ((a.lrs[0] / 2,) if a.name.endswith("muon_long") else ())
  seeds = {a.name: long.seeds if a.seeds is None else a.seeds for a in long.arms}
  assert seeds["parallax_muon_long"] == seeds["softmax_muon_long"]
  assert seeds["parallax_adamw_long"] == seeds["softmax_adamw_long"]
  steps = main.arms[0].config.run.steps
  assert {grid_lib.arm_config(a).run.steps for a in long.arms} == {2 * steps}


# --------------------------------------------------------------------------- runner
def fake_train(diverge_above: float = 1.0, sleep_until_sigterm: bool = False):
  """A stand-in for train.loop.train: writes the files the loop writes; loss is lowest at
  lr 2e-3; lrs above diverge_above raise NonFiniteLossError."""
  from train import loop
  calls = []

  def train(cfg, log=None, **_):
    calls.append(cfg.run.out_dir)
    os.makedirs(cfg.run.out_dir, exist_ok=True)
    with open(os.path.join(cfg.run.out_dir, "config.json"), "w") as f:
      json.dump(cfg.to_dict(), f)
    lr = cfg.optimizer.lr
    if lr > diverge_above:
      raise loop.NonFiniteLossError("non-finite loss at step 3")
    stopped = {"s": None}
    if sleep_until_sigterm:
      old = signal.signal(signal.SIGTERM, lambda *_: stopped.__setitem__("s", "SIGTERM"))
      try:
        t0 = time.time()
        while stopped["s"] is None and time.time() - t0 < 10:
          time.sleep(0.02)
      finally:
        signal.signal(signal.SIGTERM, old)
      return {"stopped_by": stopped["s"], "final_step": 1}
    loss = 3.0 + abs(math.log2(lr / 2e-3)) * 0.1 + cfg.run.seed * 0.01
    with open(os.path.join(cfg.run.out_dir, "metrics.jsonl"), "w") as f:
      for step in (2, 4):
        f.write(json.dumps({"step": step, "loss": loss + 1 / step, "step_time_s": 0.1,
                            "tokens_per_s": 1280.0}) + "\n")
      f.write(json.dumps({"step": 4, "eval/loss": loss}) + "\n")
    return {"stopped_by": None, "final_step": 4, "state": None}
  return train, calls


def test_runner_resumes_across_calls_and_records_divergence(tmp_path, monkeypatch):
  from train import loop
  train, calls = fake_train(diverge_above=3e-3)
  monkeypatch.setattr(loop, "train", train)
  g = sweep_grid()
  root = tmp_path / "study"
  pack = tmp_path / "call" / "study.tar.gz"  # rewritten as each run ends
  opts = runner.RunOptions(out=str(root), max_runs=1, compile_cache=False,
                           pack_to=str(pack))
  out = runner.run_grids([g], opts, log=lambda s: None)  # a first slice: one run
  assert [r["run_id"] for r in out["ran"]] == ["a/lr0.002_s0"] and out["pending"] == 2
  with tarfile.open(pack) as t:
    assert "study/g/a/lr0.002_s0/result.json" in t.getnames()
  opts = runner.RunOptions(out=str(root), compile_cache=False)
  out = runner.run_grids([g], opts, log=lambda s: None)  # the rest, then the seed stage
  assert [(r["run_id"], r["status"]) for r in out["ran"]] == [
      ("a/lr0.001_s0", "done"), ("a/lr0.004_s0", "diverged"), ("a/lr0.002_s1", "done")]
  res = res_lib.load_results(str(root), "g")
  r = res["a/lr0.002_s1"]
  assert r["eval_loss"] == pytest.approx(3.01) and r["tokens"] == 4 * 4 * 32
  assert r["step_time_s"] == 0.1 and r["params"] > 0 and r["stage"] == "seed"
  assert "non-finite" in res["a/lr0.004_s0"]["error"]
  n = len(calls)
  out = runner.run_grids([g], opts, log=lambda s: None)  # nothing left: nothing runs
  assert out["ran"] == [] and len(calls) == n
  with pytest.raises(runner.StudyError, match="another config"):
    runner.run_one(g, grid_lib.RunSpec("g", "a", 2e-3, 0, "sweep"),
                   runner.RunOptions(out=str(root), extra=("schedule.warmup_steps=2",)))
  # the whole grid with --set on finished runs: refused before anything runs (it used to
  # plan nothing and report the old results as the new config's)
  with pytest.raises(runner.StudyError, match=r"a/lr0.002_s0 finished with another config "
                     r"\(schedule.warmup_steps: 1 -> 2\)"):
    runner.run_grids([g], dataclasses.replace(opts, extra=("schedule.warmup_steps=2",)),
                     log=lambda s: None)
  assert len(calls) == n
  # a key the runs' configs lack, at its default (code newer than the runs): still the same
  for d in (root / "g" / "a").iterdir():
    r = json.loads((d / "result.json").read_text())
    del r["config"]["optimizer"]["z_loss"]
    r["config_fingerprint"] = "older-code"
    (d / "result.json").write_text(json.dumps(r))
  assert runner.run_grids([g], opts, log=lambda s: None)["ran"] == []


def test_runner_time_budget_stops_the_run_and_skips_what_does_not_fit(tmp_path, monkeypatch):
  from train import loop
  train, _ = fake_train(sleep_until_sigterm=True)
  monkeypatch.setattr(loop, "train", train)
  g = sweep_grid()
  opts = runner.RunOptions(out=str(tmp_path), stop_at=time.time() + 0.5, compile_cache=False)
  t0 = time.time()
  out = runner.run_grids([g], opts, log=lambda s: None)
  assert time.time() - t0 < 5 and out["stopped"] == "deadline"
  assert [r["status"] for r in out["ran"]] == ["interrupted"]
  # a known run length longer than what is left: nothing starts
  res_lib.write_json(os.path.join(tmp_path, "g", "a", "lr0.002_s0", "result.json"),
                     {"status": "done", "arm": "a", "wall_s": 100.0, "eval_loss": 3.0})
  msgs = []
  out = runner.run_grids([g], runner.RunOptions(out=str(tmp_path), stop_at=time.time() + 50,
                                                compile_cache=False), log=msgs.append)
  assert out["ran"] == [] and any("not started" in m for m in msgs)
  # a grid with nothing finished takes its estimate from the study's other grids
  g2 = dataclasses.replace(sweep_grid(), name="g2")
  msgs = []
  out = runner.run_grids([g, g2], runner.RunOptions(out=str(tmp_path), stop_at=time.time() + 50,
                                                    compile_cache=False), log=msgs.append)
  assert out["ran"] == [] and any(m.startswith("study: g2/") and "not started" in m
                                  for m in msgs), msgs
  # two at a time: runs made that way are the estimate, else the runs made alone x 2
  done = {"a": {"status": "done", "arm": "a", "wall_s": 100.0, "jobs": 1}}
  assert runner.estimate_s(g, "b", done, jobs=2) == 200.0
  done["b"] = {"status": "done", "arm": "b", "wall_s": 130.0, "jobs": 2}
  assert runner.estimate_s(g, "a", done, jobs=2) == 130.0
  assert runner.estimate_s(g, "a", done) == 100.0
  # runs of another length count scaled by the steps (a grid of longer runs)
  steps = grid_lib.arm_config(g.arm("a")).run.steps
  done = {"z": {"status": "done", "arm": "z", "wall_s": 100.0, "steps": steps // 2}}
  assert runner.estimate_s(g, "a", done) == pytest.approx(100.0 * steps / (steps // 2))


def test_pack_leaves_out_checkpoints(tmp_path):
  run = tmp_path / "study" / "g" / "a" / "lr0.001_s0"
  (run / "checkpoints" / "4").mkdir(parents=True)
  (run / "checkpoints" / "4" / "state").write_text("x" * 1000)
  (run / "metrics.jsonl").write_text("{}\n")
  (run / "result.json").write_text("{}")
  to = runner.pack(str(tmp_path / "study"), str(tmp_path / "out" / "s.tar.gz"), log=lambda s: None)
  with tarfile.open(to) as t:
    names = t.getnames()
  assert "study/g/a/lr0.001_s0/metrics.jsonl" in names
  assert not any("checkpoints" in n for n in names)


# --------------------------------------------------------------------------- corpus
def _tree(root):
  files = {
      "pkg/a.py": "def f(x):\n  return x + 1\n" * 10,
      "pkg/b.py": "def f(x):\n  return x + 1\n" * 10,          # duplicate of a.py
      "pkg/c.md": "# Title\n\nSome documentation text here.\n" * 5,
      "pkg/gen.py": "# @generated by a tool\nTABLE = [1, 2, 3]\n" * 5,
      "pkg/long.txt": "x" * 5000 + "\n",
      "pkg/tiny.py": "x = 1\n",
      "pkg/data.txt": "1 2 3 4 5 6 7 8 9 0\n" * 20,
      "pkg/__pycache__/a.py": "def cached():\n  pass\n" * 10,
      "pkg/skip.bin": "not text",
  }
  for rel, text in files.items():
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
  (root / "pkg" / "latin1.py").write_bytes(b"# caf\xe9 is not utf-8 here\n" * 10)
  (root / "pkg" / "nul.py").write_bytes(b"abc\x00def\n" * 20)


def test_corpus_filters_dedups_and_is_deterministic(tmp_path):
  _tree(tmp_path / "src")
  cfg = corpus.CorpusConfig(roots=(("lib", str(tmp_path / "src")),))
  s1 = corpus.build(cfg, str(tmp_path / "c1"), log=lambda s: None)
  s2 = corpus.build(cfg, str(tmp_path / "c2"), log=lambda s: None)
  assert s1["sha256"] == s2["sha256"] and s1["documents"] == 2
  assert s1["skipped"] == {"binary": 1, "duplicate": 1, "generated": 1, "long_lines": 1,
                           "low_alpha": 1, "not_utf8": 1, "too_small": 1}
  paths = [line.split("\t")[2].strip() for line in open(tmp_path / "c1" / "manifest.tsv")]
  assert sorted(paths) == ["lib/pkg/a.py", "lib/pkg/c.md"]  # a.py kept, its copy b.py not
  docs = [json.loads(line) for line in open(tmp_path / "c1" / "corpus.jsonl")]
  assert [d["path"] for d in docs] == paths
  capped = corpus.build(corpus.CorpusConfig(roots=cfg.roots, max_mb=1e-4),
                        str(tmp_path / "c3"), log=lambda s: None)
  assert capped["documents"] == 1 and capped["skipped"]["over_max_mb"] == 1
  with pytest.raises(ValueError, match="corpus.roots"):
    corpus.CorpusConfig(roots=(("lib", str(tmp_path / "missing")),))


def test_corpus_shards_load_and_are_reused(tmp_path):
  from train import data as data_lib
  src = tmp_path / "src"
  for i in range(12):
    p = src / f"m{i}.py"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f'"""Module {i}."""\n\ndef function_{i}(value):\n  return value * {i}\n' * 4)
  cfg = corpus.CorpusConfig(roots=(("lib", str(src)),))
  corpus.build(cfg, str(tmp_path / "c"), log=lambda s: None)
  tok = corpus.train_tokenizer(str(tmp_path / "c"), str(tmp_path / "tok.json"), 300)
  rec = corpus.prepare_shards(str(tmp_path / "c"), str(tmp_path / "d"), tok, val_fraction=0.2,
                              log=lambda s: None)
  assert rec["tokens"]["train"] > 0 and rec["tokens"]["val"] > 0
  src_train = data_lib.DocumentSource(str(tmp_path / "d"), "train")
  assert src_train.num_documents() + data_lib.DocumentSource(
      str(tmp_path / "d"), "val").num_documents() == 12
  msgs = []
  again = corpus.prepare_shards(str(tmp_path / "c"), str(tmp_path / "d"), tok,
                                val_fraction=0.2, log=msgs.append)
  assert again == rec and "already prepared" in msgs[0]


# --------------------------------------------------------------------------- end to end
def test_report_times_runs_of_one_device():
  from train.study import report
  h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
  runs = [dict(status="done", device=h100, step_time_s=0.11),
          dict(status="done", device=h100, step_time_s=0.13, jobs=2),  # shared the device
          dict(status="done", device=h200, step_time_s=0.08),
          dict(status="done", device=h200, step_time_s=0.09),
          dict(status="done", device=h100, step_time_s=0.12)]
  assert report.timing_device(runs) == h100  # a tie between alone runs: by name
  a = report.ArmSummary(grid="g", arm="a", optimizer="muon", baseline=None, note="", lrs=[],
                         sweep={}, best=None, edge=None, seeds=runs, pending=[])
  assert a.median_of("step_time_s", h100) == pytest.approx(0.115)
  assert a.median_of("step_time_s", h200) == pytest.approx(0.085)
  assert a.median_of("step_time_s") == pytest.approx(0.10)


def test_claims_read_only_grids_that_feed_them(tmp_path):
  """The claims' loss gap comes from main's pair; a grid with `claims=False` (a rerun at
  another length) is left out even when its pair comes first."""
  from train.study import report

  def arm(grid, name, opt, base, loss):
    return report.ArmSummary(grid=grid, arm=name, optimizer=opt, baseline=base, note="",
                             lrs=[1e-3], sweep={}, best=1e-3, edge=None,
                             seeds=[{"status": "done", "eval_loss": loss,
                                     "run_dir": str(tmp_path / grid / name)}], pending=[])
  arms = [arm("long", "p", "adamw", "s", 1.0), arm("long", "s", "adamw", None, 3.0),
          arm("main", "p", "adamw", "s", 2.0), arm("main", "s", "adamw", None, 2.5)]
  index = {a.key: a for a in arms}
  gap_row = lambda rows: next(r for r in rows if r.startswith("| Parallax - softmax"))
  assert "| - | -2.0000 |" in gap_row(report._claims(index))
  assert "| - | -0.5000 |" in gap_row(report._claims(index, frozenset({"long"})))


def test_report_reads_an_unfinished_sweep_at_its_best_so_far(tmp_path):
  """While a sweep runs, the arm is read at its best finished lr, marked "so far", in the
  table and in every claims cell it feeds; a complete sweep carries no mark."""
  from train.study import report
  g = sweep_grid()
  for run_id, loss in (("a/lr0.002_s0", 2.9), ("a/lr0.001_s0", 3.0)):
    d = tmp_path / "g" / run_id
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({**done(loss), "tokens": 100}))
  (a,) = report.summarize_grid(str(tmp_path), "g", g)
  assert a.provisional and a.best == 2e-3 and a.losses() == [2.9]
  assert a.pending == ["a/lr0.004_s0"]
  assert "| 0.002 (so far) |" in report._table([a], {a.key: a})[-1]
  base = dataclasses.replace(a, arm="s", provisional=False)
  par = dataclasses.replace(a, arm="p", baseline="s",
                            seeds=[{**done(2.5), "run_dir": str(tmp_path / "none")}])
  gap_row = next(r for r in report._claims({x.key: x for x in (base, par)})
                 if r.startswith("| Parallax - softmax"))
  assert "| -0.4000 (so far) |" in gap_row
  d = tmp_path / "g" / "a/lr0.004_s0"
  d.mkdir(parents=True)
  (d / "result.json").write_text(json.dumps(done(3.1)))
  (a,) = report.summarize_grid(str(tmp_path), "g", g)
  assert not a.provisional and a.best == 2e-3 and "(so far)" not in report._table([a], {})[-1]


def test_smoke_grid_through_the_loop_and_report(tmp_path):
  """2 arms x 1 lr x 1 seed of a tiny model through train.loop.train, then the report."""
  from train.prepare import prepare
  from train.study.__main__ import main
  data = str(tmp_path / "data")
  prepare(data, None, vocab_size=320, max_mb=0.1, val_fraction=0.2, quiet=True)
  out = str(tmp_path / "study")
  grid = os.path.join(REPO, "configs", "study", "smoke.py")
  sets = ["--set", f"data.path={data}"]
  assert main(["--grid", grid, "--out", out, "--no-compile-cache", *sets]) == 0
  res = res_lib.load_results(out, "smoke")
  assert {k: r["status"] for k, r in res.items()} == {"parallax/lr0.01_s0": "done",
                                                        "softmax/lr0.01_s0": "done"}
  par = res["parallax/lr0.01_s0"]
  assert par["final_step"] == 2 and math.isfinite(par["eval_loss"])
  assert par["timings_s"]["steps"] > 0 and par["timings_s"]["save"] == 0  # save_final off
  assert not os.path.exists(os.path.join(par["run_dir"], "checkpoints"))
  recs = res_lib.read_metrics(par["run_dir"])
  assert any(k.startswith("cor/layer_") for r in recs for k in r)
  assert main(["report", "--out", out]) == 0
  text = open(os.path.join(out, "report.md")).read()
  assert "| parallax | adamw | 0.01 |" in text and "vs softmax" in text
  assert "| parallax - softmax (1, 1) | " in text  # the gap over training
  assert re.search(r"\| parallax - softmax \(0\.\d\d\) \| [+-]\d\.\d{4} / [+-]\d\.\d{4} \|",
                   text), text  # and split by repeated / novel targets
  # the paper's claims: AdamW's gap and diagnostics measured, Muon's not run in this grid
  assert re.search(r"\| Parallax - softmax final eval loss[^|]*\| - \| [+-]\d\.\d{4} \| "
                   r"not measured yet \|", text), text
  assert re.search(r"\| COR, deepest quarter[^|]*\| - \| \d+\.\d\d \|", text)
  for png in ("loss_curves.png", "gap.png", "lr_sweep.png", "cor.png", "stable_rank.png"):
    assert os.path.getsize(os.path.join(out, "smoke", png)) > 0
  assert main(["plan", "--grid", grid, "--out", out, *sets]) == 0


def test_two_runs_at_a_time_in_subprocesses(tmp_path):
  """--jobs 2: each run in its own `_run` subprocess with half the device's memory; both
  results land, marked jobs=2 (left out of the timing estimates)."""
  from train.prepare import prepare
  from train.study.__main__ import main
  data = str(tmp_path / "data")
  prepare(data, None, vocab_size=320, max_mb=0.1, val_fraction=0.2, quiet=True)
  out = str(tmp_path / "study")
  grid = os.path.join(REPO, "configs", "study", "smoke.py")
  assert main(["--grid", grid, "--out", out, "--jobs", "2", "--no-compile-cache",
               "--set", f"data.path={data}", "--stop-at", str(int(time.time()) + 300)]) == 0
  res = res_lib.load_results(out, "smoke")
  assert {r["status"] for r in res.values()} == {"done"} and len(res) == 2
  assert all(r["jobs"] == 2 for r in res.values())


def test_cli_names_a_bad_out_in_one_line(tmp_path, capsys):
  from train.study.__main__ import main
  afile = tmp_path / "afile"
  afile.write_text("")
  grid = os.path.join(REPO, "configs", "study", "smoke.py")
  for args, says in ((["plan", "--grid", grid, "--out", str(afile)], "is a file"),
                     (["pack", "--out", str(tmp_path / "no"), "--to", "x.tgz"], "no study dir"),
                     (["report", "--out", str(tmp_path / "no")], "no study directory")):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out: ") and says in err[0], err
  study = tmp_path / "study"
  (study / "g").mkdir(parents=True)
  (study / "g" / "x.json").write_text("{}")
  for args, says in ((["--grid", grid, "--out", str(study), "--set", "foo=1"],
                      "--set: foo: unknown key 'foo'"),
                     (["plan", "--grid", str(afile), "--out", str(study)],
                      "is not a Python grid file"),
                     (["pack", "--out", str(study), "--to", str(tmp_path)], "is a directory"),
                     (["pack", "--out", str(study), "--to", str(afile / "x.tgz")],
                      "a part of its path is a file")):
    assert main(args) == 2, args
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
  assert not os.path.exists(str(tmp_path) + ".tmp")
  # a pack written inside the study is never packed into the next one
  for _ in range(2):
    assert main(["pack", "--out", str(study), "--to", str(study / "p.tar.gz")]) == 0
  with tarfile.open(study / "p.tar.gz") as tar:
    assert sorted(tar.getnames()) == ["study", "study/g", "study/g/x.json"]
