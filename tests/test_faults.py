"""Faults a real run meets: kills, corrupt checkpoints and shards, divergence, changed configs,
a checkpoint of another process count.

Every test starts from copies of one reference run (6 steps of the 2-layer test model,
checkpoints every 2, all kept) and checks that the loop resumes from the newest checkpoint
that really is good, bit-identically, or stops with one line naming what to fix.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from tests.test_train import VOCAB, small_config
from train import checkpoint as ckpt_lib, data as data_lib
from train.checkpoint import (Checkpointer, CheckpointCorruptError, CheckpointMismatchError,
                              CheckpointSaveError)
from train.loop import NonFiniteLossError, train
from train.run_lock import RunDirInUseError, run_dir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
quiet = lambda s: None  # noqa: E731
pytestmark = pytest.mark.usefixtures("compile_cache")


def config(shards, out, **run):
  return small_config(shards, str(out), checkpoint_every=2, keep_checkpoints=4, **run)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
  out = tmp_path_factory.mktemp("runs") / "ref"
  res = train(config(shards, out), log=quiet)
  return str(out), jax.device_get(res["state"]["params"])


def copy_run(reference, tmp_path, name="run"):
  dst = tmp_path / name
  shutil.copytree(reference[0], dst)
  return dst


def same_params(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def array_files(step_dir) -> list[str]:
  return sorted(f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                                     recursive=True) if os.path.isfile(f))


# --------------------------------------------------------------------------- checkpoints
def test_unreadable_checkpoints_are_skipped_and_metrics_replayed_once(shards, reference,
                                                                     tmp_path):
  """Newest first: a truncated array file (6), a deleted _METADATA (4) and a stray empty
  step directory (8) are each moved aside with a warning; the run resumes from 2 and ends
  bit-identical to the uninterrupted one, with every step once in metrics.jsonl."""
  run = copy_run(reference, tmp_path)
  ck = run / "checkpoints"
  big = max(array_files(ck / "6"), key=os.path.getsize)
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)
  os.remove(ck / "4" / "state" / "_METADATA")
  os.makedirs(ck / "8")
  logs = []
  out = train(config(shards, run), log=logs.append)
  assert same_params(out["state"]["params"], reference[1])
  warned = [l for l in logs if l.startswith("warning:")]
  assert len(warned) == 3 and all("moved to" in l for l in warned), logs
  assert any("resumed from" in l and l.split(":")[0].endswith("/2") for l in logs), logs
  assert sorted(os.listdir(ck)) == ["2", "4", "4.unreadable", "6", "6.unreadable",
                                    "8.unreadable"]
  steps = [json.loads(l)["step"] for l in open(run / "metrics.jsonl")
           if "loss" in json.loads(l)]
  assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("trial", range(6))
def test_flipped_bits_never_restore_silently(reference, tmp_path, trial):
  """One flipped bit anywhere in a checkpoint's array files: the restore fails (orbax, or the
  fingerprint), it never returns wrong values."""
  from train.mesh import make_mesh
  from train.step import Trainer
  run = copy_run(reference, tmp_path)
  files = array_files(run / "checkpoints" / "6")
  rng = np.random.default_rng(trial)
  f = files[trial % len(files)]
  b = bytearray(open(f, "rb").read())
  pos = int(rng.integers(len(b)))
  b[pos] ^= 1 << int(rng.integers(8))
  open(f, "wb").write(bytes(b))
  cfg = config("unused", run)
  tr = Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
  ck = Checkpointer(str(run / "checkpoints"), warn=quiet)
  try:
    try:
      state, _ = ck.restore(6, tr.abstract_state_with_shardings())
    except CheckpointCorruptError:
      return
    # a flip in bytes the arrays do not use (index, padding) may restore the right values
    assert same_params(state["params"], reference[1]), (f, pos)
  finally:
    ck.close()


def test_diverged_update_is_never_saved(shards, reference, tmp_path, capsys):
  """A huge learning rate blows the parameters up after a finite loss: the run stops before
  saving, naming the last checkpoint, which is finite; resuming with the old config from it
  reproduces the uninterrupted run. From the CLI the stop is one line, exit status 1."""
  run = copy_run(reference, tmp_path)
  shutil.rmtree(run / "checkpoints" / "6")
  cfg = config(shards, run, resume="override")
  bad = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, lr=1e30))
  with pytest.raises(NonFiniteLossError, match=r"param_norm at step 5.*last good checkpoint is "
                                               r".*checkpoints/4"):
    train(bad, log=quiet)
  assert Checkpointer(str(run / "checkpoints")).all_steps() == [2, 4]
  out = train(config(shards, run), log=quiet)
  assert same_params(out["state"]["params"], reference[1])

  from train.__main__ import main
  preset = tmp_path / "preset.py"
  preset.write_text(textwrap.dedent(f"""
      from tests.test_train import small_config
      def get_config():
        return small_config({shards!r}, {str(tmp_path / 'cli')!r}, checkpoint_every=1)
      """))
  capsys.readouterr()
  assert main(["--config", str(preset), "--set", "optimizer.lr=1e30"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  # step 1 runs at the warmup's lr 0: its checkpoint is good, step 2's never written
  assert len(err) == 1 and err[0].startswith("error: non-finite param_norm at step 2") and \
      err[0].endswith("the last good checkpoint is " + str(tmp_path / "cli" / "checkpoints" / "1")), err
  assert Checkpointer(str(tmp_path / "cli" / "checkpoints")).all_steps() == [1]


def test_out_of_device_memory_is_one_line(shards, tmp_path, capsys, monkeypatch):
  """An allocation failure in a step (faked: the real one needs a full GPU) stops the CLI
  with one line naming the step, the keys that lower memory and the last good checkpoint,
  which a rerun resumes from."""
  from train.__main__ import main
  from train.step import Trainer
  step = Trainer.train_step
  calls = []

  def failing_step(self, state, batch):
    calls.append(1)
    if len(calls) == 3:
      raise jax.errors.JaxRuntimeError(
          "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.50GiB.")
    return step(self, state, batch)

  monkeypatch.setattr(Trainer, "train_step", failing_step)
  preset = tmp_path / "preset.py"
  preset.write_text(textwrap.dedent(f"""
      from tests.test_train import small_config
      def get_config():
        return small_config({shards!r}, {str(tmp_path / 'run')!r}, checkpoint_every=2)
      """))
  capsys.readouterr()
  assert main(["--config", str(preset)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
      "error: out of device memory at step 3 (allocating 1.50GiB); to fit, raise "
      "data.grad_accum (now 1: micro-batches of 4 sequences)") and err[0].endswith(
      "the last good checkpoint is " + str(tmp_path / "run" / "checkpoints" / "2")), err

  # before the loop: the state itself does not fit (the rerun restores step 2's checkpoint)
  def no_memory(*a, **k):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9GiB.")

  monkeypatch.setattr(Checkpointer, "restore_latest", no_memory)
  assert main(["--config", str(preset)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: out of device memory setting up the "
                                             "train state (RESOURCE_EXHAUSTED"), err


# orbax's writer threads die with the failed write; their errors reach the run as one
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_failed_save_stops_the_run_and_the_rerun_resumes(shards, reference, tmp_path,
                                                         monkeypatch, capfd):
  """A checkpoint write that fails in the background (here a file-size limit, failing like a
  full disk) stops the run at its next check with one error naming the failed step and the
  last committed checkpoint; the partial write is removed (on a full disk its bytes would
  stop the rerun too), and the rerun resumes to the uninterrupted result."""
  import resource
  out = tmp_path / "run"
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
  save = Checkpointer.save

  def limited_save(self, step, *args, **kw):  # from step 4 on, no file grows past 16 KiB
    if step == 4:
      self.wait()  # step 2's checkpoint is committed first
      resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, limits[1]))
    return save(self, step, *args, **kw)

  monkeypatch.setattr(Checkpointer, "save", limited_save)
  try:
    with pytest.raises(CheckpointSaveError, match=r"checkpoints/4 could not be written: .*File "
                                                  r"too large.*last good checkpoint is "
                                                  r".*checkpoints/2 \(a rerun resumes.*"
                                                  r"writer's own reports: .*checkpoint_errors"):
      train(config(shards, out), log=quiet)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, old_handler)
  monkeypatch.undo()
  # the writer's own tracebacks went to the file the error names (as far as the file-size
  # limit let them: then one note line), not to the terminal
  err = capfd.readouterr().err
  assert "Traceback" not in err and err.count("\n") <= 1, err
  assert "Traceback" in (out / "checkpoint_errors.log").read_text()
  assert sorted(os.listdir(out / "checkpoints")) == ["2"]
  res = train(config(shards, out), log=quiet)
  assert same_params(res["state"]["params"], reference[1])


def test_a_short_checkpoint_disk_is_warned_of_at_the_start(shards, tmp_path, monkeypatch):
  """A disk that cannot hold keep + 1 checkpoints of the state is named before training."""
  import collections
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**30, 2**30 - 4096, 4096))
  lines = []
  train(config(shards, tmp_path / "run", steps=2), log=lines.append)
  warned = [l for l in lines if "GiB free; a checkpoint of this state" in l]
  assert len(warned) == 1 and "run.keep_checkpoints=4 keeps 4" in warned[0], lines


def test_partial_writes_are_removed_at_open(tmp_path):
  """A crash mid-save leaves orbax's temporary directory: it can never be read back, so
  opening the checkpoint directory deletes it (saying so)."""
  d = tmp_path / "checkpoints"
  (d / "4.orbax-checkpoint-tmp-1765000000" / "state").mkdir(parents=True)
  warned = []
  ck = Checkpointer(str(d), warn=warned.append)
  ck.close()
  assert os.listdir(d) == [] and "4.orbax-checkpoint-tmp-1765000000" in warned[0]


@pytest.mark.parametrize("change, key", [
    (("optimizer", "name", "adamw"), "optimizer.name"),
    (("data", "seq_len", 16), "data.seq_len"),
    (("optimizer", "lr", 3e-3), "run.resume=override"),
    (("run", "steps", 4), "run.steps"),
])
def test_changed_config_names_the_key(shards, reference, tmp_path, change, key):
  run = copy_run(reference, tmp_path)
  cfg = config(shards, run)
  section, field, value = change
  cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section),
                                                                 **{field: value})})
  with pytest.raises(CheckpointMismatchError, match=key.replace(".", r"\.")):
    train(cfg, log=quiet)
  assert json.load(open(run / "config.json")) == json.load(open(
      os.path.join(reference[0], "config.json")))  # a refused resume rewrites nothing


def test_fewer_steps_than_the_checkpoint_is_refused_once(shards, reference, tmp_path):
  """run.steps below the checkpoint's step: one refusal that says so, under override too (an
  override cannot make a finished step unfinished), before the state is read."""
  run = copy_run(reference, tmp_path)
  for mode in ("auto", "override"):
    with pytest.raises(CheckpointMismatchError, match=r"run\.steps: 4 is before the checkpoint's "
                                                      r"step 6 .*raise run\.steps"):
      train(config(shards, run, steps=4, resume=mode), log=quiet)


def test_resume_onto_data_prepared_again_is_refused(tmp_path):
  """The checkpoint's data stream position indexes the data it was written on: after the
  shards at data.path are prepared again from other text, a resume is refused (naming
  override), and under override the new data starts over."""
  from train.prepare import prepare
  data = str(tmp_path / "data")
  prepare(data, None, vocab_size=320, max_mb=0.25, val_fraction=0.1, quiet=True)
  more = config(data, tmp_path / "run", steps=4)
  train(more, stop_after=2, log=quiet)
  shutil.rmtree(data)
  prepare(data, None, vocab_size=320, max_mb=0.2, val_fraction=0.1, quiet=True)
  with pytest.raises(CheckpointMismatchError, match=r"indexes other data than data\.path "
                                                    r"holds now .*run\.resume=override"):
    train(more, log=quiet)
  notes = []
  over = dataclasses.replace(more, run=dataclasses.replace(more.run, resume="override"))
  assert train(over, log=notes.append)["final_step"] == 4
  assert any("starts the new data over" in n for n in notes), notes


def test_second_run_on_the_same_out_dir_is_refused(shards, reference, tmp_path):
  """A run started on a directory another live run holds (a job submitted twice) stops
  before touching it, naming the holder; once the holder is gone the directory is free (the
  kernel drops the lock with its process: kill_9 below resumes through it)."""
  run = copy_run(reference, tmp_path)
  with run_dir_lock(str(run)):
    with pytest.raises(RunDirInUseError, match=r"run\.out_dir .* is in use by another run "
                                               r"\(pid \d+ on .*, since .*\); wait"):
      train(config(shards, run), log=quiet)
  assert train(config(shards, run), log=quiet)["final_step"] == 6


def test_resume_never_refuses_existing_checkpoints(shards, reference, tmp_path):
  run = copy_run(reference, tmp_path)
  with pytest.raises(ValueError, match="run.resume=never.*already holds checkpoints"):
    train(config(shards, run, resume="never"), log=quiet)


def test_kill_9_mid_run_resumes_bit_identically(shards, reference, tmp_path):
  """SIGKILL a real `python -m train` process once its first checkpoint is on disk, wherever
  it is (training, or writing the next checkpoint); the resumed run ends identical."""
  run = tmp_path / "killed"
  preset = tmp_path / "preset.py"
  preset.write_text(textwrap.dedent(f"""
      from tests.test_train import small_config
      def get_config():
        return small_config({shards!r}, {str(run)!r}, checkpoint_every=1, keep_checkpoints=6)
      """))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,  # reuse this module's compiles
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  p = subprocess.Popen([sys.executable, "-m", "train", "--config", str(preset)], cwd=REPO,
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  t0 = time.time()
  while not os.path.exists(run / "checkpoints" / "2" / "_CHECKPOINT_METADATA"):
    assert p.poll() is None, p.stderr.read().decode()[-2000:]
    assert time.time() - t0 < 300
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  out = train(small_config(shards, str(run), checkpoint_every=1, keep_checkpoints=6),
              log=quiet)
  assert out["final_step"] == 6 and same_params(out["state"]["params"], reference[1])


def _data_record(step_dir, record=None):
  """The data iterator record of a checkpoint step; with `record`, replace it."""
  path = os.path.join(step_dir, "data", "metadata")
  if record is not None:
    with open(path, "w") as f:
      json.dump(record, f)
  with open(path) as f:
    return json.load(f)


def _spy_set_state(monkeypatch) -> list:
  calls = []
  real = data_lib._PackIterator.set_state

  def set_state(self, state):
    calls.append(state)
    real(self, state)

  monkeypatch.setattr(data_lib._PackIterator, "set_state", set_state)
  return calls


def test_checkpoint_of_another_process_count(shards, reference, tmp_path, monkeypatch):
  """A checkpoint written by 2 processes (its data record holds 2 iterator states) cannot
  continue the data streams of 1: refused under run.resume=auto, naming both counts and the
  remedy, nothing rewritten; under override the run continues on a fresh stream."""
  run = copy_run(reference, tmp_path)
  for s in ("4", "6"):
    shutil.rmtree(run / "checkpoints" / s)
  rec = _data_record(run / "checkpoints" / "2")
  assert rec["process_count"] == 1 and len(rec["per_process"]) == 1, rec
  _data_record(run / "checkpoints" / "2",
               {"process_count": 2, "per_process": rec["per_process"] * 2})
  def no_state_read(*a, **k):
    raise AssertionError("the state was read before the data record was checked")

  with monkeypatch.context() as m, pytest.raises(CheckpointMismatchError) as e:
    m.setattr(ckpt_lib.ocp.args, "StandardRestore", no_state_read)  # refused before it
    train(config(shards, run), log=quiet)
  msg = str(e.value)
  assert "\n" not in msg and "checkpoints/2 was written by 2 processes, this run has 1:" in msg
  assert msg.endswith("--set run.resume=override"), msg
  assert json.load(open(run / "config.json")) == json.load(open(
      os.path.join(reference[0], "config.json")))
  calls, logs = _spy_set_state(monkeypatch), []
  out = train(config(shards, run, resume="override"), log=logs.append)
  assert calls == [] and sorted(out["losses"]) == [3, 4, 5, 6]  # the stream starts over
  notes = [l for l in logs if "written by 2 processes" in l]
  assert len(notes) == 1 and notes[0].startswith("resume: ") and "restarts" in notes[0], logs
  assert not same_params(out["state"]["params"], reference[1])  # other batches


def test_old_checkpoint_data_state_resumes(shards, reference, tmp_path, monkeypatch):
  """A checkpoint of an older version holds one bare iterator state: a single process
  resumes from it bit-identically, without a warning."""
  run = copy_run(reference, tmp_path)
  shutil.rmtree(run / "checkpoints" / "6")
  old = _data_record(run / "checkpoints" / "4")["per_process"][0]
  _data_record(run / "checkpoints" / "4", old)
  calls, logs = _spy_set_state(monkeypatch), []
  out = train(config(shards, run), log=logs.append)
  assert calls == [old] and same_params(out["state"]["params"], reference[1])
  assert not [l for l in logs if l.startswith("warning:")], logs


# --------------------------------------------------------------------------- shards
def _copy_shards(shards, tmp_path):
  dst = tmp_path / "shards"
  shutil.copytree(shards, dst)
  meta = json.load(open(dst / "meta.json"))
  return dst, meta, meta["splits"]["train"][0]


def _open(path):
  return data_lib.DocumentSource(str(path), "train", max_len=32)


def test_corrupt_shard_names_the_file(shards, tmp_path):
  dst, meta, shard = _copy_shards(shards, tmp_path)
  b = bytearray(open(dst / f"{shard}.bin", "rb").read())
  b[101] ^= 0x10
  open(dst / f"{shard}.bin", "wb").write(bytes(b))
  with pytest.raises(data_lib.DataError, match=f"{shard}.bin: CRC-32"):
    _open(dst)


def test_truncated_shard_names_the_file(shards, tmp_path):
  dst, meta, shard = _copy_shards(shards, tmp_path)
  with open(dst / f"{shard}.bin", "r+b") as f:
    f.truncate(os.path.getsize(dst / f"{shard}.bin") - 2)
  with pytest.raises(data_lib.DataError, match=f"{shard}.bin: holds .* tokens but"):
    _open(dst)


def test_out_of_vocabulary_ids_name_the_file(shards, tmp_path):
  """In-vocabulary garbage cannot be told from text; ids past the vocabulary can."""
  dst, meta, shard = _copy_shards(shards, tmp_path)
  toks = np.fromfile(dst / f"{shard}.bin", np.uint16)
  toks[7] = VOCAB + 5
  toks.tofile(dst / f"{shard}.bin")
  meta["checksums"][shard]["bin"] = data_lib.crc32_file(str(dst / f"{shard}.bin"))
  json.dump(meta, open(dst / "meta.json", "w"))
  with pytest.raises(data_lib.DataError, match=f"{shard}.bin: token id {VOCAB + 5} at "
                                               f"position 7 is outside the vocabulary"):
    _open(dst)


# --------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("override, message", [
    ("run.out_dir={file}", "run.out_dir: '{file}' is a file, not a directory"),
    ("mesh.data=3", "mesh: data*fsdp*tensor = 3 but there are 1 devices"),
    ("data.path={missing}", "data.path '{missing}' has no meta.json"),
])
def test_cli_errors_are_one_line(shards, tmp_path, capsys, override, message):
  from train.__main__ import main
  f = tmp_path / "a_file"
  f.write_text("")
  fill = dict(file=str(f), missing=str(tmp_path / "nowhere"))
  preset = tmp_path / "preset.py"
  preset.write_text(textwrap.dedent(f"""
      import dataclasses
      from tests.test_train import small_config
      def get_config():  # data.auto_prepare=true: a path set by hand is still never filled
        c = small_config({shards!r}, {str(tmp_path / 'run')!r})
        return dataclasses.replace(c, data=dataclasses.replace(c.data, auto_prepare=True))
      """))
  capsys.readouterr()
  assert main(["--config", str(preset), "--set", override.format(**fill)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message.format(**fill) in err[0], err
  if override.startswith("mesh."):  # refused before the run directory is made
    assert not os.path.exists(tmp_path / "run")


def test_writer_error_diversion_keeps_other_errors_and_restores_hooks(tmp_path):
  """Only orbax's reports are diverted; other threads' errors reach the previous hook; the
  hooks are restored when the last diversion closes."""
  import logging
  import sys
  import threading
  from train.writer_errors import Diversion
  before = threading.excepthook
  seen = []
  old_thread_hook = threading.excepthook
  threading.excepthook = lambda args: seen.append(str(args.exc_value))
  try:
    with Diversion(str(tmp_path / "a.log")) as outer, Diversion(str(tmp_path / "b.log")) as d:
      t = threading.Thread(target=lambda: (_ for _ in ()).throw(ValueError("not orbax")))
      t.start()
      t.join()
      rec = logging.LogRecord("absl", logging.ERROR, "/x/orbax/checkpoint/m.py", 1, "boom",
                              None, None)
      assert not Diversion._filter.filter(rec)  # dropped from the terminal, kept in b.log
      assert Diversion._filter.filter(logging.LogRecord(  # not orbax: printed as before
          "absl", logging.ERROR, "/x/other.py", 1, "keep", None, None))
    assert seen == ["not orbax"] and d.count == 1 and outer.count == 0
    assert "boom" in (tmp_path / "b.log").read_text()
  finally:
    threading.excepthook = old_thread_hook
  assert threading.excepthook == before


def _closed_loop_report():
  """The report an abandoned orbax callback makes: asyncio's "Event loop is closed"."""
  import asyncio
  import types
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(lambda: None)
  except RuntimeError as e:
    return types.SimpleNamespace(exc_type=RuntimeError, exc_value=e,
                                 exc_traceback=e.__traceback__, err_msg=None, object=None)


def test_orbax_leftovers_are_dropped_during_and_after_a_failed_read(monkeypatch):
  """A closed-loop report is dropped while a read runs and after one failed, and reaches the
  previous hook otherwise; any other report always reaches it."""
  import types
  from parallax_jax.models import orbax_errors
  seen = []
  monkeypatch.setattr(orbax_errors, "_quiet", False)
  monkeypatch.setattr(orbax_errors, "_sinks", [])
  with orbax_errors.quiet_reads():  # installs the hook
    monkeypatch.setattr(orbax_errors, "_previous", lambda args: seen.append(args))
    orbax_errors._hook(_closed_loop_report())
  assert seen == []
  late, other = _closed_loop_report(), types.SimpleNamespace(
      exc_type=ValueError, exc_value=ValueError("mine"), exc_traceback=None, object=None)
  orbax_errors._hook(late)
  orbax_errors._hook(other)
  assert seen == [late, other]
  with pytest.raises(OSError), orbax_errors.quiet_reads():
    raise OSError("a damaged file")
  orbax_errors._hook(_closed_loop_report())
  orbax_errors._hook(other)
  assert seen == [late, other, other] and orbax_errors._quiet


def test_read_error_is_the_innermost_cause_in_one_line():
  from parallax_jax.models.orbax_errors import read_error
  try:
    try:
      raise ValueError('OUT_OF_RANGE: Error reading "params.w/0.0" in OCDBT database')
    except ValueError as inner:
      raise Exception("Encountered error while reading array index: (slice(0, 4, 1),). See "
                      "full TensorStore details: <bound method spec of TensorStore({\n "
                      "'driver': 'zarr',\n})>.") from inner
  except Exception as e:  # noqa: BLE001
    assert read_error(e) == ('ValueError: OUT_OF_RANGE: Error reading "params.w/0.0" in OCDBT '
                             'database')
  assert read_error(Exception("a\nb. See full TensorStore details: x")) == "Exception: a"


@pytest.mark.parametrize("damage", ["truncated", "no_metadata", "no_manifest"])
def test_damaged_checkpoint_is_one_line_from_the_sample_cli(reference, tmp_path, damage):
  """The CLI prints one line naming the damage, and nothing after it: the failed read's
  abandoned coroutines report late (up to exit), and those reports are dropped."""
  run = copy_run(reference, tmp_path)
  state = run / "checkpoints" / "6" / "state"
  if damage == "truncated":
    for f in glob.glob(str(state / "ocdbt.process_0" / "d" / "*")):
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  elif damage == "no_metadata":
    os.remove(state / "_METADATA")
  else:
    for f in glob.glob(str(state / "**" / "manifest.ocdbt"), recursive=True):
      os.remove(f)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  p = subprocess.run([sys.executable, "-m", "parallax_jax.models.cli", "--checkpoint", str(run),
                      "--prompt-ids", "1", "--max-new-tokens", "1"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  err = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(err) == 1, p.stderr[-3000:]
  assert {"truncated": "the parameters do not read back (ValueError: ",
          "no_metadata": "it lists no arrays: its _METADATA or manifest.ocdbt",
          "no_manifest": "it lists no arrays: its _METADATA or manifest.ocdbt"}[damage] in err[0]


def test_writer_reports_nobody_named_get_a_note_at_close(tmp_path, capfd):
  import logging
  from train.writer_errors import Diversion
  with Diversion(str(tmp_path / "w.log")):
    Diversion._filter.filter(logging.LogRecord("absl", logging.ERROR, "/x/orbax/m.py", 1,
                                               "restore failed", None, None))
  err = capfd.readouterr().err.strip().splitlines()
  assert err == [f"note: 1 error reports of the checkpoint writer are in {tmp_path}/w.log"]
