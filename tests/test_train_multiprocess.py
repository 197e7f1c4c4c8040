"""Multi-process (multi-host) resume: every process continues its own data stream.

Each process reads its own slice of the data, so each has its own data iterator state. A save
gathers them all into the checkpoint (`gather_data_states`, a collective; one process gathers
nothing) and a resume hands each process its own (train/resume.py `data_state`). A checkpoint
of another process count cannot continue the streams: refused under run.resume=auto, fresh
streams under run.resume=override. An older checkpoint's bare state still resumes.

The gather and the choice are tested with simulated processes (threads behind a fake
allgather); one real run trains in two CPU processes joined by `jax.distributed.initialize`
(gloo collectives), is interrupted, resumes, and matches the uninterrupted two-process run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

from train import checkpoint as ckpt_lib
from train import resume as resume_lib
from train.checkpoint import CheckpointMismatchError, gather_data_states

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHERE = "runs/x/checkpoints/4"


# --------------------------------------------------------------------------- data
def _as_processes(n, me, barrier, fn, timeout=None) -> list:
  """fn(i) for i < n, each in a thread standing for process i (`me.i`): their results in
  process order. An error in one aborts the barrier (the others would wait forever) and is
  raised."""
  out, errors = [None] * n, []

  def run(i):
    me.i = i
    try:
      out[i] = fn(i)
    except BaseException as e:  # noqa: BLE001
      errors.append(e)
      barrier.abort()

  threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout)
  assert not errors, errors
  return out


@pytest.mark.parametrize("shared", [True, False])
def test_auto_prepare_waits_for_process_0(monkeypatch, tmp_path, shared):
  """Two simulated processes (threads) with data.auto_prepare: process 0 prepares while the
  other waits (it read the missing meta.json at once and stopped); one on a disk of its own
  (another path here) prepares its own copy."""
  from jax.experimental import multihost_utils

  from tests.test_train import small_config
  from train import loop, prepare as prepare_lib
  n, barrier, me = 2, threading.Barrier(2, timeout=120), threading.local()
  monkeypatch.setattr(jax, "process_count", lambda: n)
  monkeypatch.setattr(jax, "process_index", lambda: me.i)
  monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: barrier.wait())
  calls, real = [], prepare_lib.prepare

  def prepare(path, *a, **kw):
    calls.append(me.i)
    time.sleep(0.5)  # the other process reaches its check meanwhile
    return real(path, *a, **kw, quiet=True)
  monkeypatch.setattr(prepare_lib, "prepare", prepare)

  def run(i):
    data = str(tmp_path / ("data" if shared else f"data{i}"))
    cfg = small_config(data, str(tmp_path / "run"))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, auto_prepare=True, vocab_size=300, max_corpus_mb=0.05))
    return loop.ensure_data(cfg, log=lambda s: None)

  out = _as_processes(n, me, barrier, run)
  assert sorted(calls) == ([0] if shared else [0, 1])
  assert out[0]["vocab_size"] == out[1]["vocab_size"] == 300


# --------------------------------------------------------------------------- gather
def test_one_process_gathers_without_a_collective(monkeypatch):
  def no_collective(*a, **kw):
    raise AssertionError("one process must not run a collective")

  monkeypatch.setattr(ckpt_lib.multihost_utils, "process_allgather", no_collective)
  state = {"index": 6, "offset": 0}
  assert gather_data_states(state) == {"process_count": 1, "per_process": [state]}


def test_every_process_gathers_every_state(monkeypatch):
  """Three simulated processes (threads) with states of different JSON lengths, one longer
  than the smallest padding: each gets all three, in process order; every gather has the
  same shape on every process (a real allgather requires it), padded to a power of two."""
  n = 3
  states = [{"index": 6, "offset": 0}, {"index": 7, "offset": 377},
            {"index": 123456, "offset": 9, "parent": {"epoch": 2, "rng": "x" * 90}}]
  barrier, slots, shapes = threading.Barrier(n), [None] * n, []
  me = threading.local()

  def allgather(x):  # stacks every process's array, like process_allgather(tiled=False)
    slots[me.i] = np.asarray(x)
    barrier.wait()
    got = np.stack(slots)
    if me.i == 0:
      shapes.append([s.shape for s in slots])
    barrier.wait()
    return got

  monkeypatch.setattr(jax, "process_count", lambda: n)
  monkeypatch.setattr(ckpt_lib.multihost_utils, "process_allgather", allgather)
  out = _as_processes(n, me, barrier, lambda i: gather_data_states(states[i]), timeout=30)
  want = {"process_count": n, "per_process": states}
  assert out == [want] * n
  assert json.loads(json.dumps(want)) == want  # what JsonSave writes
  assert len(shapes) == 2 and all(len(set(s)) == 1 for s in shapes), shapes
  width = shapes[1][0][0]
  assert width == 256 and width >= len(json.dumps(states[2])), shapes  # 2^k >= the longest


# --------------------------------------------------------------------------- restore
def test_each_process_resumes_from_its_own_state():
  states = [{"index": 6, "offset": 0}, {"index": 7, "offset": 377}]
  rec = {"process_count": 2, "per_process": states}
  for i in range(2):
    assert resume_lib.data_state(rec, "auto", WHERE, process_index=i, process_count=2) == \
        (states[i], [])
  one = {"process_count": 1, "per_process": [states[1]]}
  assert resume_lib.data_state(one, "auto", WHERE) == (states[1], [])  # this process: 1 of 1


def test_processes_reading_other_slices_are_refused_or_restart_the_streams():
  """Two processes that read one slice (a tensor axis across them) and then two (a mesh
  without it) walk different streams: the same process count must not hand the old
  positions over. A record without slices was read by process index."""
  states = [{"index": 6, "offset": 0}, {"index": 6, "offset": 0}]
  shared, own = [[0, 1], [0, 1]], [[0, 2], [1, 2]]
  rec = {"process_count": 2, "per_process": states, "slices": shared}
  assert resume_lib.data_state(rec, "auto", WHERE, process_index=1, process_count=2,
                               slices=shared) == (states[1], [])
  with pytest.raises(CheckpointMismatchError, match=r"reading the data in slices \[\[0, 1\], "
                     r"\[0, 1\]\] .*this run's mesh has them read \[\[0, 2\], \[1, 2\]\]"):
    resume_lib.data_state(rec, "auto", WHERE, process_index=1, process_count=2, slices=own)
  got, notes = resume_lib.data_state(rec, "override", WHERE, process_index=1, process_count=2,
                                     slices=own)
  assert got is None and "restarts from the start of its slice" in notes[0], notes
  old = {"process_count": 2, "per_process": states}
  assert resume_lib.data_state(old, "auto", WHERE, process_index=1, process_count=2,
                               slices=own) == (states[1], [])
  with pytest.raises(CheckpointMismatchError):
    resume_lib.data_state(old, "auto", WHERE, process_index=1, process_count=2, slices=shared)


def test_an_older_checkpoint_resumes_every_process_from_its_one_state():
  old = {"index": 6, "offset": 0}  # a bare iterator state, as older versions saved
  assert resume_lib.data_state(old, "auto", WHERE, process_index=0, process_count=1) == \
      (old, [])
  for i in range(2):
    got, notes = resume_lib.data_state(old, "auto", WHERE, process_index=i, process_count=2)
    assert got == old and len(notes) == 1 and "\n" not in notes[0], notes
    assert notes[0].startswith(f"warning: checkpoint {WHERE} holds one data iterator state")


@pytest.mark.parametrize("saved, now", [(2, 1), (1, 4)])
def test_another_process_count_is_refused_or_restarts_the_streams(saved, now):
  rec = {"process_count": saved,
         "per_process": [{"index": 5 + i, "offset": i} for i in range(saved)]}
  with pytest.raises(CheckpointMismatchError) as e:
    resume_lib.data_state(rec, "auto", WHERE, process_index=0, process_count=now)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(
      f"checkpoint {WHERE} was written by {saved} processes, this run has {now}:"), msg
  assert msg.endswith("restarted from the start of its slice (data repeats), "
                      "--set run.resume=override"), msg
  for i in range(now):
    got, notes = resume_lib.data_state(rec, "override", WHERE, process_index=i,
                                       process_count=now)
    assert got is None and len(notes) == 1 and "\n" not in notes[0], notes
    assert notes[0].startswith(f"resume: checkpoint {WHERE} was written by {saved} processes")
    assert "restarts from the start of its slice" in notes[0]


# --------------------------------------------------------------------------- two processes
# One process of a two-process run: argv = process id, coordinator port, shards, run root,
# compilation cache. Trains 6 steps uninterrupted ("full"), then 3 steps, stopped ("part"),
# then resumes the part to 6 ("rest"); prints what each process saved and restored.
SCRIPT = textwrap.dedent(r"""
import json, sys
import jax
pid, (port, shards, root, cache) = int(sys.argv[1]), sys.argv[2:6]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=pid, initialization_timeout=120)
jax.config.update("jax_compilation_cache_dir", cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from parallax_jax.models import presets
from train import data as data_lib, resume as resume_lib
from train.config import (DataConfig, MeshConfig, OptimizerConfig, RunConfig, ScheduleConfig,
                          TrainConfig)
from train.loop import train

saved, restored = [], []
_state, _pick = data_lib.iterator_state, resume_lib.data_state
def iterator_state(it):
  s = _state(it)
  saved.append(s)
  return s
def data_state(*a, **kw):
  s, notes = _pick(*a, **kw)
  restored.append(s)
  return s, notes
data_lib.iterator_state, resume_lib.data_state = iterator_state, data_state

def config(out):
  return TrainConfig(
      name="test", model=presets.tiny(vocab_size=320, max_seq_len=64, implementation="xla"),
      mesh=MeshConfig(data=2),
      data=DataConfig(path=shards, seq_len=32, global_batch_size=4, prefetch=2,
                      eval_batches=1, auto_prepare=False),
      optimizer=OptimizerConfig(name="muon", lr=1e-2),
      schedule=ScheduleConfig(warmup_steps=2, decay_fraction=0.5),
      run=RunConfig(steps=6, out_dir=out, log_every=1, eval_every=0, diag_every=0,
                    checkpoint_every=2, keep_checkpoints=3, progress=False, sample_lines=0))

def main():
  quiet = lambda s: None
  assert jax.process_count() == 2 and jax.device_count() == 2, jax.devices()
  full = train(config(root + "/full"), log=quiet)
  part = train(config(root + "/part"), stop_after=3, log=quiet)
  at_stop = saved[-1]
  rest = train(config(root + "/part"), log=quiet)
  losses = lambda r: {str(k): v for k, v in r["losses"].items()}
  print("RESULT" + json.dumps({"full": losses(full), "part": losses(part), "rest": losses(rest),
                               "at_stop": at_stop, "restored": restored}), flush=True)

try:
  main()
except BaseException:  # exit now: a normal exit would wait for the other process forever
  import os, traceback
  traceback.print_exc()
  sys.stdout.flush(); sys.stderr.flush()
  os._exit(1)
""")


def _short_document_shards(path: str, vocab: int = 320) -> str:
  """Shards of random documents of 3 to 40 tokens: the two processes' streams then stop at
  different positions (the stdlib shards' long documents fill every row alike)."""
  rng = np.random.default_rng(0)
  os.makedirs(path)
  splits = {}
  for split, n in (("train", 400), ("val", 40)):
    docs = [np.append(rng.integers(1, vocab, int(rng.integers(2, 40))), 0) for _ in range(n)]
    np.concatenate(docs).astype("<u2").tofile(os.path.join(path, f"{split}_0.bin"))
    np.save(os.path.join(path, f"{split}_0.offsets.npy"),
            np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64))
    splits[split] = [f"{split}_0"]
  with open(os.path.join(path, "meta.json"), "w") as f:
    json.dump({"format": "parallax-tokens-v1", "dtype": "uint16", "vocab_size": vocab,
               "eos_id": 0, "tokenizer": "tokenizer.json", "splits": splits}, f)
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(tmp_path, script: str, *args: str, poke=None) -> list[dict]:
  """Run `script` as processes 0 and 1 (argv: process id, coordinator port, *args), one CPU
  device each; their RESULT lines, parsed. poke(procs, logs) runs at every poll."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=1").strip(),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  port = str(_free_port())
  procs, logs = [], [tmp_path / f"process_{i}.log" for i in range(2)]
  for i in range(2):
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen([sys.executable, "-c", script, str(i), port, *args],
                                    env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    text=True))
  try:  # one process failing leaves the other waiting in a collective: stop it
    t0 = time.time()
    while any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs):
      assert time.time() - t0 < 300, "the two processes did not finish in 300 s"
      if poke is not None:
        poke(procs, logs)
      time.sleep(0.2)
  finally:
    killed = [p.poll() is None for p in procs]
    for p, k in zip(procs, killed):
      if k:
        p.kill()
        p.wait()
  outs = [open(f).read() for f in logs]
  for i in sorted(range(2), key=lambda i: killed[i]):  # the one that failed first
    rc = procs[i].returncode
    assert rc == 0, f"process {i} exited with {rc}: {outs[i][-4000:]}"
  return [json.loads([l for l in out.splitlines() if l.startswith("RESULT")][-1][6:])
          for out in outs]


@pytest.mark.slow
def test_two_processes_resume_their_own_data_streams(tmp_path, compile_cache):
  """Two CPU processes (one device each, mesh data = 2): the checkpoint holds both data
  states, each process resumes from its own, and the resumed run's losses equal the
  uninterrupted two-process run's. One process resuming that checkpoint is refused.
  (Handing process 0's position to both, as before, fails here: process 1's offset lies past
  the end of its own piece, a ValueError in the packer, and process 0 waits in a collective;
  elsewhere the other processes silently skip or repeat data.)"""
  shards = _short_document_shards(str(tmp_path / "shards"))
  root = str(tmp_path)
  res = _two_processes(tmp_path, SCRIPT, shards, root, compile_cache)
  a, b = res
  # each process saved its own position at the stop, and they differ (one slice each)
  assert a["at_stop"] != b["at_stop"], (a["at_stop"], b["at_stop"])
  with open(os.path.join(root, "part", "checkpoints", "3", "data", "metadata")) as f:
    record = json.load(f)
  assert record.pop("data_id")  # the identity of the shards the positions index
  assert record.pop("slices") == [[0, 2], [1, 2]]  # mesh data = 2: a slice each
  assert record == {"process_count": 2, "per_process": [a["at_stop"], b["at_stop"]]}
  # the fresh runs restored nothing; the resumed one each process's own state
  assert a["restored"] == [a["at_stop"]] and b["restored"] == [b["at_stop"]], (a, b)
  for r in res:
    assert sorted(r["full"]) == [str(s) for s in range(1, 7)]
    assert sorted(r["part"]) == ["1", "2", "3"] and sorted(r["rest"]) == ["4", "5", "6"]
    for s in ("4", "5", "6"):  # the same programs on the same batches: bit-identical
      assert r["rest"][s] == r["full"][s], (s, r["rest"], r["full"])
  assert a["full"] == b["full"]

  # one process cannot continue the two streams: refused under run.resume=auto
  from tests.test_train import small_config
  from train.loop import train
  cfg = small_config(shards, os.path.join(root, "part"), checkpoint_every=2)
  with pytest.raises(CheckpointMismatchError,
                     match=r"checkpoints/6 was written by 2 processes, this run has 1: "):
    train(cfg, log=lambda s: None)


# One process of a run whose tensor axis spans the two processes (one device each): argv =
# process id, coordinator port, shards, run dir, run overrides (JSON). Prints every line.
TENSOR_SCRIPT = textwrap.dedent(r"""
import json, sys
import jax
pid, port, shards, out, run = int(sys.argv[1]), *sys.argv[2:5], json.loads(sys.argv[5])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=pid, initialization_timeout=120)
from tests.test_train_multiprocess import tensor_config
from train.loop import train
try:
  r = train(tensor_config(shards, out, tensor=2, **run), log=lambda s: print(s, flush=True))
  print("RESULT" + json.dumps({"losses": {str(k): v for k, v in r["losses"].items()},
                               "samples": r["samples"], "final": r["final_step"],
                               "stopped_by": r["stopped_by"]}), flush=True)
except BaseException:  # exit now: a normal exit would wait for the other process forever
  import os, traceback
  traceback.print_exc()
  sys.stdout.flush(); sys.stderr.flush()
  os._exit(1)
""")


def tensor_config(shards, out, tensor, **run):
  from parallax_jax.models import presets
  from train.config import (DataConfig, MeshConfig, OptimizerConfig, RunConfig,
                            ScheduleConfig, TrainConfig)
  return TrainConfig(
      name="test", model=presets.tiny(vocab_size=320, max_seq_len=64, implementation="xla"),
      mesh=MeshConfig(data=1, fsdp=1, tensor=tensor),
      data=DataConfig(path=shards, seq_len=32, global_batch_size=4, prefetch=0,
                      eval_batches=1, auto_prepare=False),
      optimizer=OptimizerConfig(name="muon", lr=1e-2),
      schedule=ScheduleConfig(warmup_steps=1, decay_fraction=0.5),
      run=RunConfig(**{**dict(steps=3, out_dir=out, log_every=1, eval_every=3, diag_every=0,
                               checkpoint_every=0, progress=False, sample_lines=1,
                               sample_tokens=4), **run}))


@pytest.mark.slow
def test_a_tensor_axis_across_processes_reads_one_batch(tmp_path):
  """mesh.tensor = 2 over two processes of one device each (one process per GPU is a common
  launch): both devices hold the whole batch, so both processes must read the same rows.
  Each read its own slice by process index, and the two halves of every layer saw different
  data as one array, silently. The run now equals the same run on one device."""
  from train.loop import train
  from train.prepare import prepare
  shards = str(tmp_path / "shards")  # with a tokenizer: the run ends with samples
  prepare(shards, None, vocab_size=320, max_mb=0.15, val_fraction=0.1, quiet=True)
  res = _two_processes(tmp_path, TENSOR_SCRIPT, shards, str(tmp_path / "two"), "{}")
  one = train(tensor_config(shards, str(tmp_path / "one"), tensor=1), log=lambda s: None)
  ref = {str(k): v for k, v in one["losses"].items()}
  got = res[0]["losses"]
  assert got == res[1]["losses"] and sorted(got) == sorted(ref) == ["1", "2", "3"], (res, ref)
  for k in ref:
    assert abs(got[k] - ref[k]) <= 1e-4 * abs(ref[k]), (k, got, ref)
  # the end's samples: parameters split over both processes are gathered for process 0
  assert len(res[0]["samples"]) == 1 and res[1]["samples"] == [], res


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_to_one_process_stops_every_process_at_one_step(tmp_path, sig):
  """A scheduler's SIGTERMs reach a job's processes at different times, here process 1 alone:
  the processes must agree on one step to save at and stop. Each stopped where its own signal
  came: the save's collectives then mismatched ("Is there a distributed collective mismatch
  in your code?"), both processes died, and the save was lost. They now agree through jax's
  preemption service, which a SIGINT reaches as a SIGTERM."""
  import signal
  from train.prepare import prepare
  shards = str(tmp_path / "shards")
  prepare(shards, None, vocab_size=320, max_mb=0.15, val_fraction=0.1, quiet=True)
  sent = []

  def poke(procs, logs):
    if not sent and "step      3" in open(logs[1]).read():
      procs[1].send_signal(getattr(signal, sig))
      sent.append(True)

  run = json.dumps(dict(steps=400, eval_every=0, sample_lines=0))
  res = _two_processes(tmp_path, TENSOR_SCRIPT, shards, str(tmp_path / "run"), run, poke=poke)
  res = [{k: r[k] for k in ("final", "stopped_by")} for r in res]
  assert sent and res[0] == res[1] and res[0]["stopped_by"] == "SIGTERM", res
  assert 3 <= res[0]["final"] < 400, res
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / str(res[0]["final"]))
