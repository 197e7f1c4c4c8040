"""Opt-in profiling of a few training steps (run.profile_start / run.profile_steps) and the
trace summary script (train/trace_summary.py), on CPU."""
from __future__ import annotations

import glob
import json
import os

import pytest

from train.config import TrainConfig, apply_overrides, load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 320


def test_profile_keys_parse_and_validate():
  cfg = apply_overrides(TrainConfig(), ["run.profile_start=5", "run.profile_steps=3"])
  assert (cfg.run.profile_start, cfg.run.profile_steps) == (5, 3)
  assert (TrainConfig().run.profile_start, TrainConfig().run.profile_steps) == (0, 0)
  with pytest.raises(ValueError, match=r"run\.profile_steps"):
    apply_overrides(TrainConfig(), ["run.profile_steps=-1"])
  with pytest.raises(ValueError, match=r"run\.profile_start"):
    apply_overrides(TrainConfig(), ["run.profile_start=-2"])
  with pytest.raises(ValueError, match=r"run\.profile_steps.*exceeds run\.steps"):
    apply_overrides(TrainConfig(), ["run.steps=10", "run.profile_start=9",
                                    "run.profile_steps=2"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  from train.prepare import prepare
  out = str(tmp_path_factory.mktemp("shards"))
  prepare(out, None, vocab_size=VOCAB, max_mb=0.25, val_fraction=0.1, quiet=True)
  return out


def tiny_config(shards: str, out_dir: str):
  """configs/tiny.py shrunk for a fast CPU run of 4 steps, tracing steps 2 and 3."""
  return apply_overrides(load_config_file(os.path.join(REPO, "configs/tiny.py")), [
      f"data.path={shards}", "data.auto_prepare=false", f"data.vocab_size={VOCAB}",
      f"model.vocab_size={VOCAB}", "model.num_layers=2", "model.max_seq_len=64",
      "data.seq_len=32", "data.global_batch_size=4", "data.eval_batches=1", "mesh.data=1",
      "schedule.warmup_steps=1", "run.steps=4", f"run.out_dir={out_dir}", "run.log_every=1",
      "run.eval_every=0", "run.diag_every=0", "run.checkpoint_every=0", "run.progress=false",
      "run.sample_lines=0", "run.profile_start=1", "run.profile_steps=2"])


def test_train_profiles_steps_and_summary_reads_trace(shards, tmp_path, capsys):
  from train import trace_summary
  from train.loop import train
  out_dir = str(tmp_path / "run")
  cfg = tiny_config(shards, out_dir)
  logs = []
  out = train(cfg, log=logs.append)
  assert out["final_step"] == 4 and sorted(out["losses"]) == [1, 2, 3, 4]
  prof_dir = os.path.join(out_dir, "profile")
  assert glob.glob(os.path.join(prof_dir, "plugins", "profile", "*", "*.xplane.pb"))
  traces = glob.glob(os.path.join(prof_dir, "plugins", "profile", "*", "*.trace.json.gz"))
  assert traces
  assert any(line.startswith("profile: steps 2..3 traced to ") for line in logs), logs

  path = trace_summary.find_trace(prof_dir)
  events = trace_summary.load_events(path)
  # exactly steps 2 and 3 ran inside the trace: step 1 was waited for before it started
  runs = {e["args"]["run_id"] for e in events if "train_step" in
          (e.get("args") or {}).get("hlo_module", "") and "run_id" in e["args"]}
  assert len(runs) == 2, runs
  s = trace_summary.summarise(events)
  assert s["source"] == "host" and s["kernels"] and s["kernel_time_us"] > 0
  assert s["steps"] == 2  # the StepTraceAnnotation step numbers of steps 2 and 3
  assert {c["category"] for c in s["categories"]} <= {c for c, _ in
                                                       trace_summary.CATEGORIES} | {"other"}
  capsys.readouterr()
  js = str(tmp_path / "summary.json")
  assert trace_summary.main([prof_dir, "--top", "5", "--json", js]) == 0
  text = capsys.readouterr().out
  assert "no GPU device tracks" in text and "| category |" in text and "\n| 1 | `" in text
  assert json.load(open(js))["kernels"]


@pytest.mark.slow
def test_trace_stops_when_the_loop_exits_inside_the_window(shards, tmp_path):
  import jax
  from train.loop import train
  out_dir = str(tmp_path / "run")
  logs = []
  out = train(tiny_config(shards, out_dir), stop_after=2, log=logs.append)
  assert out["stopped_by"] == "stop_after"
  assert any(line.startswith("profile: steps 2..2 (stopped early) traced to ")
             for line in logs), logs
  assert glob.glob(os.path.join(out_dir, "profile", "plugins", "profile", "*", "*.trace.json.gz"))
  jax.profiler.start_trace(str(tmp_path / "again"))  # raises if a trace were still running
  jax.profiler.stop_trace()


def test_summary_says_perfetto_trace_is_missing(tmp_path):
  from train import trace_summary
  (tmp_path / "plugins" / "profile" / "t").mkdir(parents=True)
  (tmp_path / "plugins" / "profile" / "t" / "host.xplane.pb").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="Perfetto trace is missing"):
    trace_summary.find_trace(str(tmp_path))


def test_summary_gpu_tracks_and_categories(tmp_path):
  """A synthetic GPU trace: only the device's Stream lines count, not derived 'XLA Ops'."""
  import gzip
  from train import trace_summary
  ev = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7"}},
        {"ph": "M", "pid": 2, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "X", "pid": 2, "tid": 7, "ts": 0, "dur": 30, "name": "nvjet_hsh_128x256"},
        {"ph": "X", "pid": 2, "tid": 7, "ts": 40, "dur": 10, "name": "parallax_fwd"},
        {"ph": "X", "pid": 2, "tid": 7, "ts": 50, "dur": 10, "name": "loop_add_fusion"},
        {"ph": "X", "pid": 2, "tid": 7, "ts": 90, "dur": 10, "name": "ncclDevKernel_AllReduce"},
        {"ph": "X", "pid": 2, "tid": 9, "ts": 0, "dur": 100, "name": "dot.3"},
        {"ph": "X", "pid": 1, "tid": 3, "ts": 0, "dur": 500, "name": "train",
         "args": {"step_num": "1"}}]
  p = tmp_path / "h.trace.json.gz"
  with gzip.open(p, "wt") as f:
    json.dump({"traceEvents": ev}, f)
  s = trace_summary.summarise(trace_summary.load_events(trace_summary.find_trace(str(p))))
  assert s["source"] == "gpu" and s["devices"] == ["/device:GPU:0"] and s["steps"] == 1
  assert [k["name"] for k in s["kernels"]][0] == "nvjet_hsh_128x256"
  assert (s["kernel_time_us"], s["busy_us"], s["span_us"]) == (60, 60, 100)
  cats = {c["category"]: c["total_us"] for c in s["categories"]}
  assert cats == {"matmul": 30, "attention kernels": 10, "XLA fusions": 10, "collectives": 10}
