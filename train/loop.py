"""The training loop: resume, train, log, evaluate, diagnose, checkpoint, sample.

`train(cfg)` runs `cfg.run.steps` optimizer steps (continuing from the newest checkpoint in
`<out_dir>/checkpoints` when `run.resume`), and returns a summary dict. Per step it logs
loss, perplexity, tokens/s, MFU (from `flops_per_token(model, seq_len, training=True)`, which
counts Parallax's extra attention matmuls; only when the device peak is known or
`run.peak_tflops` is set), gradient norm and learning rate; every `diag_every` steps the
correction-to-output ratio of each layer and the stable ranks of W_Q and W_R; every
`eval_every` steps the loss on `data.eval_batches` batches of the held-out 'val' shards.
Metrics go to `<out_dir>/metrics.jsonl` always and to TensorBoard event files when
tensorboardX (or torch's SummaryWriter) is importable.

Metrics are fetched one step late so the host never stalls the device queue; before every
checkpoint the pending step is checked, so a NaN / inf loss, gradient norm or norm of the
updated parameters raises `NonFiniteLossError` without saving, naming the last checkpoint
(which was verified finite when it was saved or restored). SIGTERM (and SIGINT) makes the
loop save a checkpoint at the current step and return.

Resuming (`run.resume`, see train/resume.py for what may change) restores the newest
checkpoint that reads back and matches its fingerprint, moving unreadable ones aside
(train/checkpoint.py); metrics.jsonl is cut back to the restored step and TensorBoard told to
drop the replayed steps. Each process continues its own data stream (a checkpoint holds every
process's iterator state; one written by another process count: train/resume.py). A new run
starts from `init.from_hf` / `init.from_checkpoint` parameters when set. Every run ends by
drawing its loss curve to `<out_dir>/loss.png`.

With `run.profile_steps > 0`, process 0 records a JAX profiler trace of steps
`profile_start+1 .. profile_start+profile_steps` into `<out_dir>/profile` (xplane.pb for
TensorBoard plus a Perfetto-compatible trace.json.gz); the last traced step is waited for
before the trace stops, and the trace is stopped on any early exit. Summarise it with
`python -m train.trace_summary <out_dir>/profile`.
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from parallax_jax.models.qwen3 import flops_per_token
from train import data as data_lib
from train import resume as resume_lib
from train.checkpoint import Checkpointer, CheckpointMismatchError, NonFiniteStateError
from train.config import TrainConfig
from train.mesh import batch_groups, make_mesh
from train.run_lock import run_dir_lock
from train.step import Trainer

PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "h800": 989.0, "a100": 312.0, "b200": 2250.0,
               "gh200": 989.0, "l4": 121.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}


class NonFiniteLossError(RuntimeError):
  pass


class DeviceMemoryError(RuntimeError):
  """The state's setup, a step (or its compile, eval, diagnostics) ran out of device memory."""


def _is_oom(e: BaseException) -> bool:
  return isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)


def _memory_error(e: BaseException, cfg: TrainConfig, step: int, good: str):
  m = re.search(r"allocate ([\d.]+\s*[KMGT]?i?B)", str(e))
  what = f"allocating {m.group(1)}" if m else "RESOURCE_EXHAUSTED"
  micro = cfg.data.global_batch_size // cfg.data.grad_accum
  return DeviceMemoryError(
      f"out of device memory at step {step} ({what}); to fit, raise data.grad_accum (now "
      f"{cfg.data.grad_accum}: micro-batches of {micro} sequences), set "
      f"model.remat_policy=full, or shard over more devices (mesh.fsdp); {good}")


def device_peak_flops(override_tflops: float = 0.0) -> float | None:
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind.lower()
  for name, tf in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if name in kind.replace(" ", ""):
      return tf * 1e12
  return None


class MetricsWriter:
  """metrics.jsonl (always) and TensorBoard events (tensorboardX or torch, when importable).

  `start`: the step training resumes after; records of later steps (written before a crash,
  replayed now) are dropped from metrics.jsonl and TensorBoard is told to purge them. The
  TensorBoard file is opened at the first write, so a run that writes nothing leaves none."""

  def __init__(self, out_dir: str, enabled: bool = True, start: int = 0):
    self.enabled, self.out_dir, self.start = enabled, out_dir, start
    self.jsonl = self.tb = None
    self._tb_cls = False  # not looked up yet
    if enabled:
      path = os.path.join(out_dir, "metrics.jsonl")
      _truncate_metrics(path, start)
      self.jsonl = open(path, "a")

  def _writer(self):
    if self._tb_cls is False:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        try:
          from torch.utils.tensorboard import SummaryWriter
        except ImportError:
          SummaryWriter = None
      self._tb_cls = SummaryWriter
      if SummaryWriter is not None:
        self.tb = SummaryWriter(os.path.join(self.out_dir, "tb"),
                                purge_step=self.start + 1 if self.start else None)
    return self.tb

  def write(self, step: int, metrics: dict[str, float]):
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self.jsonl.flush()
    tb = self._writer()
    if tb is not None:
      for k, v in metrics.items():
        if math.isfinite(v):  # e.g. tokens/s of the compile step: no NaN points
          tb.add_scalar(k, v, step)

  def close(self):
    if self.jsonl:
      self.jsonl.close()
    if self.tb is not None:
      self.tb.close()


def _truncate_metrics(path: str, start: int):
  """Keep the records of steps <= start (and drop a line cut short by a crash)."""
  if not os.path.exists(path):
    return
  keep, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        ok = json.loads(line)["step"] <= start
      except (ValueError, KeyError, TypeError):
        ok = False
      if ok:
        keep.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)


class _Progress:
  """A tqdm bar on stderr when stdout is a terminal; plain lines otherwise."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self.bar = None
    if enabled and sys.stdout.isatty():
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr)
      except ImportError:
        pass
    self.enabled = enabled

  def update(self, n: int, text: str):
    if self.bar is not None:
      self.bar.update(n)
      self.bar.set_postfix_str(text, refresh=False)

  def write(self, text: str):
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def ensure_data(cfg: TrainConfig, log=print):
  """The data's meta.json; with data.auto_prepare, the demo corpus is prepared first where
  it is missing. Several processes: process 0 prepares while the others wait; one that then
  still finds no meta.json has a disk of its own and prepares its own copy (the same
  deterministic corpus)."""
  path = cfg.data.path
  meta_path = os.path.join(path, "meta.json")
  if not cfg.data.auto_prepare:
    if not os.path.exists(meta_path):
      raise FileNotFoundError(f"data.path {path!r} has no meta.json; run python -m "
                              f"train.prepare --out {path} (or set data.auto_prepare=true)")
  else:
    def prep():
      from train.prepare import prepare
      log(f"preparing {path} from the Python standard library sources ...")
      prepare(path, None, vocab_size=cfg.data.vocab_size, max_mb=cfg.data.max_corpus_mb)
    failed = None
    if jax.process_index() == 0 and not os.path.exists(meta_path):
      try:
        prep()
      except Exception as e:  # noqa: BLE001 - raised after the barrier, which all must reach
        failed = e
    if jax.process_count() > 1:
      # every process passes here whatever it found, so the barrier cannot wait for one that
      # skipped it
      multihost_utils.sync_global_devices("train.ensure_data")
    if failed is not None:
      raise failed
    if jax.process_count() > 1 and not os.path.exists(meta_path):
      prep()
  meta = data_lib.read_meta(path)
  if meta["vocab_size"] > cfg.model.vocab_size:
    raise ValueError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's "
                     f"tokenizer vocabulary {meta['vocab_size']} ({path})")
  return meta


def sample(cfg: TrainConfig, params, meta: dict, n: int, max_new: int, temperature: float,
           seed: int = 0) -> list[str]:
  from tokenizers import Tokenizer

  from parallax_jax.models import generate
  tok = Tokenizer.from_file(os.path.join(cfg.data.path, meta["tokenizer"]))
  prompts = ["def ", "import ", "class ", "    return ", "# ", "if __name__"][:n]
  ids = [tok.encode(p).ids or [meta["eos_id"]] for p in prompts]
  t = max(len(x) for x in ids)
  arr = np.zeros((len(ids), t), np.int32)
  for i, x in enumerate(ids):
    arr[i, :len(x)] = x
  host_params = jax.device_get(params)
  out = generate(cfg.model, host_params, arr, np.asarray([len(x) for x in ids], np.int32),
                 max_new_tokens=max_new, temperature=temperature, top_p=0.95,
                 rng=jax.random.key(seed), eos_id=meta["eos_id"])
  toks = np.asarray(out.tokens)
  lens = np.asarray(out.lengths)
  texts = []
  for i, p in enumerate(prompts):
    new = [int(x) for x in toks[i, :lens[i]] if int(x) != meta["eos_id"]]
    texts.append(p + tok.decode(new))
  return texts


def local_dataset(trainer: Trainer, cfg: TrainConfig, split: str, **kw):
  """This process's slice of a split, in batches of its rows of the global batch."""
  return data_lib.make_dataset(
      cfg.data.path, split=split, seq_len=cfg.data.seq_len,
      batch_size=cfg.data.global_batch_size // trainer.data_count, verify=cfg.data.verify,
      process_index=trainer.data_index, process_count=trainer.data_count, **kw)


def evaluate(trainer: Trainer, cfg: TrainConfig, params) -> dict[str, float]:
  ds = local_dataset(trainer, cfg, "val", shuffle=False, prefetch=0)
  it = iter(ds)
  sums: dict[str, float] = {}
  for _ in range(cfg.data.eval_batches):
    # micro-batches as training splits the batch: a full batch at once can exceed the memory
    # that grad_accum was chosen to fit
    out = jax.device_get(trainer.eval_step(
        params, trainer.device_batch(next(it), accum=cfg.data.grad_accum)))
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  loss = sums["nll"] / max(sums["tokens"], 1.0)
  metrics = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
  if "tokens_repeat" in sums:  # the loss on targets a copy predicts, and on the rest
    n_rep, n_new = sums["tokens_repeat"], sums["tokens"] - sums["tokens_repeat"]
    if n_rep > 0:
      metrics["eval/loss_repeat"] = sums["nll_repeat"] / n_rep
    if n_new > 0:
      metrics["eval/loss_novel"] = (sums["nll"] - sums["nll_repeat"]) / n_new
    metrics["eval/repeat_fraction"] = n_rep / max(sums["tokens"], 1.0)
  return metrics


def _preemption_service() -> bool:
  """Whether jax's preemption service runs: several processes under jax.distributed (it is
  on by default there; `jax_enable_preemption_service`)."""
  if jax.process_count() == 1:
    return False
  try:
    from jax._src import distributed
  except ImportError:
    return False
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


def check_run_dir(out_dir: str):
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"run.out_dir: {out_dir!r} is a file, not a directory")
  os.makedirs(out_dir, exist_ok=True)


def warn_if_disk_short(directory: str, state, keep: int, log):
  """Warn at the start when the checkpoint disk cannot hold `keep` checkpoints plus the one
  being written (the state's bytes, uncompressed: an upper bound): better than a failed save
  hours in."""
  size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  existing = sum(os.path.getsize(os.path.join(root, f))  # kept checkpoints use space already
                 for root, _, files in os.walk(directory) for f in files)
  free = shutil.disk_usage(directory).free
  if free < (keep + 1) * size - existing:
    log(f"warning: {directory} has {free / 2**30:.1f} GiB free; a checkpoint of this state "
        f"takes up to {size / 2**30:.1f} GiB and run.keep_checkpoints={keep} keeps {keep} "
        f"plus the one being written: a save may fail (lower run.keep_checkpoints, or free "
        f"space)")


def check_batch(cfg: TrainConfig, mesh):
  """The batch splits over processes and over the data x fsdp devices."""
  d = cfg.data
  # the processes reading distinct rows
  pc = batch_groups(mesh)[1] if jax.process_count() > 1 else 1
  if d.global_batch_size % pc:
    raise ValueError(f"data.global_batch_size: {d.global_batch_size} does not split over "
                     f"the {pc} processes that read distinct rows")
  if (d.global_batch_size // pc) % d.grad_accum:  # each process splits its rows itself
    raise ValueError(f"data.grad_accum: {d.grad_accum} does not split the "
                     f"{d.global_batch_size // pc} rows of each of {pc} processes reading "
                     f"distinct rows (data.global_batch_size {d.global_batch_size})")
  micro = d.global_batch_size // d.grad_accum
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if micro % shards:
    raise ValueError(f"data.global_batch_size: {d.global_batch_size} rows / grad_accum "
                     f"{d.grad_accum} = {micro} per micro-batch does not split over mesh "
                     f"data x fsdp = {shards} devices")


def initial_params(cfg: TrainConfig, trainer: Trainer, log):
  """Parameters of a new run from init.from_hf / init.from_checkpoint (None: random init)."""
  ic = cfg.init
  if ic.from_hf:
    from parallax_jax.models.hf import convert_hf_weights, read_hf_config, read_hf_weights
    path = ic.from_hf
    try:
      hf = read_hf_config(path)
    except (OSError, ValueError) as e:
      raise type(e)(f"init.from_hf: {e}") from None
    differ = lambda keys: [  # noqa: E731
        f"model.{k.removeprefix('resolved_')}: config {getattr(cfg.model, k)!r} vs checkpoint "
        f"{getattr(hf, k)!r}" for k in keys if getattr(cfg.model, k) != getattr(hf, k)]
    diff = differ(("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                   "intermediate_size", "tie_embeddings", "resolved_head_dim"))
    if diff:
      raise ValueError(f"init.from_hf: {path} does not fit the model ({'; '.join(diff)})")
    # Same shapes, another function: a deliberate change (a longer context's rope_theta, a
    # window) is allowed, but the run does not start from the checkpoint's logits.
    diff = differ(("rope_theta", "rms_norm_eps", "resolved_head_norm_eps", "window"))
    if diff:
      log(f"warning: init.from_hf: the model computes another function than {path} "
          f"({'; '.join(diff)}); set those keys to start from the checkpoint's logits")
    try:
      params = convert_hf_weights(read_hf_weights(path), cfg.model, seed=cfg.run.seed,
                                  source=path)
    except (OSError, ValueError) as e:
      raise type(e)(f"init.from_hf: {e}") from None
    log(f"init: parameters from Hugging Face checkpoint {path}")
    return jax.device_put(params, trainer.param_shardings)
  if ic.from_checkpoint:
    from parallax_jax.models.checkpoint import (UnusedParametersError, find_checkpoint,
                                                load_checkpoint)
    try:
      src = find_checkpoint(ic.from_checkpoint)
    except (FileNotFoundError, ValueError) as e:
      raise type(e)(f"init.from_checkpoint: {e}") from None
    def fresh(missing):  # parameters the source lacks start as a new run's (W_R = 0)
      log(f"init: {len(missing)} parameter(s) not in {src.path} start from their "
          f"initialisation: {', '.join('/'.join(k) for k in missing[:4])}"
          + (" ..." if len(missing) > 4 else ""))
      return trainer.fresh_params(cfg.run.seed)
    try:
      _, params = load_checkpoint(ic.from_checkpoint, cfg.model, source=src,
                                  shardings=trainer.param_shardings, fill_missing=fresh)
    except UnusedParametersError as e:
      # the API's way out (drop_unused) is not a config key: say what to change here
      raise ValueError(f"init.from_checkpoint: {e.where}: the config leaves out stored "
                       f"parameters ({e.listed()}); set the model.* keys to the checkpoint's "
                       "model (the loop starts from every stored parameter)") from None
    except ValueError as e:  # another model's shapes, a damaged step: say which key it was
      raise ValueError(f"init.from_checkpoint: {e}") from None
    log(f"init: parameters from {src.path}" + (f" (step {src.step})" if src.step else ""))
    return params
  return None


def _resume_or_init(cfg: TrainConfig, cfg_dict: dict, trainer: Trainer, ckpt: Checkpointer,
                    it, data_id: str, log) -> tuple[int, Any]:
  """(start step, state): the newest good checkpoint under run.resume, else a new state."""
  rc = cfg.run
  if rc.resume == "never":
    if ckpt.latest_step() is not None:
      raise ValueError(f"run.resume=never: {ckpt.directory} already holds checkpoints (latest "
                       f"step {ckpt.latest_step()}); use a new run.out_dir or delete them")
    restored = None
  else:
    notes: list[str] = []
    data_choice: list = []  # (this process's data state, notes) of the step being restored

    def check(stored: dict, data_record: dict, step: int):
      # before the state is read: a refusal should not wait for a large restore
      where = f"{ckpt.directory}/{step}"
      if step > rc.steps:  # before the trajectory check: run.resume=override cannot help
        raise CheckpointMismatchError(
            f"run.steps: {rc.steps} is before the checkpoint's step {step} ({where}); nothing "
            f"to train: raise run.steps to train further, or use a new run.out_dir")
      notes[:] = resume_lib.check(stored, cfg_dict, rc.resume, where)
      data_choice[:] = [resume_lib.data_state(data_record, rc.resume, where, data_id=data_id,
                                              slices=trainer.data_slices)]

    restored = ckpt.restore_latest(trainer.abstract_state_with_shardings(), check)
  if restored is None:
    params = initial_params(cfg, trainer, log)
    if params is None:
      return 0, trainer.init_state(rc.seed)
    return 0, trainer.state_from_params(params)
  start, state, _ = restored
  # this process's own data stream position, chosen in `check` for the step restored (a
  # record of another process count: refused under auto, fresh streams under override)
  data_state, data_notes = data_choice[0]
  if data_state is not None:
    it.set_state(data_state)
  for n in notes + data_notes:
    log(n)
  todo = rc.steps - start
  log(f"resumed from {ckpt.directory}/{start}: "
      + (f"{todo} steps to go (run.steps={rc.steps})" if todo else
         f"the run is complete (run.steps={rc.steps}); nothing to train"))
  return start, state


def train(cfg: TrainConfig, *, stop_after: int | None = None, log=None) -> dict[str, Any]:
  """Run (or resume) training. stop_after: return after this global step (tests: simulate an
  interruption) after saving a checkpoint there. One run at a time in run.out_dir
  (train/run_lock.py)."""
  is_main = jax.process_index() == 0
  log = log or (lambda s: print(s, flush=True) if is_main else None)
  t_enter = time.perf_counter()
  # the mesh and the batch split first: refused, they leave no run directory and prepare no
  # data
  mesh = make_mesh(cfg.mesh)
  check_batch(cfg, mesh)
  check_run_dir(cfg.run.out_dir)
  with run_dir_lock(cfg.run.out_dir, warn=log):
    return _train(cfg, mesh, stop_after, log, t_enter)


def _train(cfg: TrainConfig, mesh, stop_after: int | None, log, t_enter: float
           ) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  rc = cfg.run
  meta = ensure_data(cfg, log)
  data_id = data_lib.shards_identity(meta)
  trainer = Trainer(cfg, mesh)
  ckpt = Checkpointer(os.path.join(rc.out_dir, "checkpoints"), keep=rc.keep_checkpoints,
                      async_save=rc.async_checkpoint, warn=log)
  cfg_dict = cfg.to_dict()
  accum = cfg.data.grad_accum
  ds = local_dataset(trainer, cfg, "train", seed=cfg.data.seed, prefetch=cfg.data.prefetch)
  it = iter(ds)
  try:
    start, state = _resume_or_init(cfg, cfg_dict, trainer, ckpt, it, data_id, log)
  except BaseException as e:
    ckpt.close()
    if _is_oom(e):  # the parameters and optimizer state alone do not fit
      raise DeviceMemoryError(
          f"out of device memory setting up the train state ({str(e).splitlines()[0][:120]});"
          f" shard it over more devices (mesh.fsdp) or use a smaller model") from e
    raise
  if is_main:  # only once the resume was accepted: a refused one leaves the old config
    with open(os.path.join(rc.out_dir, "config.json"), "w") as f:
      json.dump(cfg_dict, f, indent=1)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.params_abstract))
  log(f"{cfg.name}: {n_params / 1e6:.2f}M params, mesh {dict(mesh.shape)}, "
      f"{jax.device_count()} {jax.devices()[0].platform} devices, steps {start}->{rc.steps}")
  if is_main and (rc.checkpoint_every or rc.save_final) and start < rc.steps:
    warn_if_disk_short(ckpt.directory, state, rc.keep_checkpoints, log)

  tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
  flops_tok = flops_per_token(cfg.model, cfg.data.seq_len, training=True)
  peak = device_peak_flops(rc.peak_tflops)
  writer = MetricsWriter(rc.out_dir, enabled=is_main, start=start)
  bar = _Progress(rc.steps, start, rc.progress and is_main)

  stop = {"signal": None}
  old_handlers = {}
  # Several processes must stop at one step (the save is a collective), but a scheduler's
  # SIGTERMs reach them at different steps: jax's preemption service (jax.distributed) takes
  # SIGTERM and agrees on the step. A SIGINT is handed to it as a SIGTERM.
  agree = _preemption_service()

  def on_signal(signum, frame):
    if agree:
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      stop["signal"] = signum

  for sig in (signal.SIGINT,) if agree else (signal.SIGTERM, signal.SIGINT):
    try:
      old_handlers[sig] = signal.signal(sig, on_signal)
    except ValueError:  # not the main thread
      pass

  losses: dict[int, float] = {}
  history: list[dict] = []
  window = {"t": time.perf_counter(), "steps": 0, "loss": 0.0, "gn": 0.0}
  pending = None
  last_saved = start if start > 0 else None  # verified finite when restored
  eval_metrics: dict[str, float] = {}
  stopped_by = None
  # where the wall time goes (seconds): setup (data, mesh, init or restore), the first step
  # (its compile), eval, diagnostics, saves, the steps, and finish (waiting for async saves,
  # the plot, samples)
  timings = {"setup": 0.0, "first_step": 0.0, "steps": 0.0, "eval": 0.0, "diag": 0.0,
             "save": 0.0, "finish": 0.0}

  def drain():
    nonlocal pending
    if pending is None:
      return
    step_no, m = pending
    pending = None
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(m[k])]
    if bad:
      what = ", ".join(f"{k} {m[k]}" for k in ("loss", "grad_norm", "param_norm"))
      raise NonFiniteLossError(f"non-finite {' and '.join(bad)} at step {step_no} ({what}); "
                               f"stopping without saving: {last_good()}")
    losses[step_no] = m["loss"]
    if step_no == start + 1:  # the first step includes compilation: not in tokens/s
      window["t"], window["tsteps"] = time.perf_counter(), -1
      timings["first_step"] = window["t"] - t_loop
    window["tsteps"] = window.get("tsteps", 0) + 1
    window["steps"] += 1
    window["loss"] += m["loss"]
    window["gn"] += m["grad_norm"]
    window["lr"] = m["lr"]
    bar.update(1, f"loss {m['loss']:.3f} lr {m['lr']:.2e}")
    if step_no % rc.log_every == 0 or step_no == rc.steps:
      ckpt.check_saves()  # a background save that failed stops the run here, not at the next
      now = time.perf_counter()
      dt = now - window["t"]
      k = window["steps"]
      kt = window.get("tsteps", k)
      tps = kt * tokens_per_step / dt if dt > 0 and kt > 0 else float("nan")
      loss = window["loss"] / k
      rec = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "grad_norm": window["gn"] / k,
             "lr": window["lr"], "tokens_per_s": tps,
             "step_time_s": dt / kt if kt > 0 else float("nan"),
             "z_loss": m["z_loss"]}
      if peak is not None and math.isfinite(tps):
        rec["mfu"] = flops_tok * tps / (peak * jax.device_count())
      writer.write(step_no, rec)
      history.append({"step": step_no, **rec})
      bar.write(f"step {step_no:6d}  loss {loss:.4f}  ppl {rec['perplexity']:.1f}  "
                f"gnorm {rec['grad_norm']:.3f}  lr {rec['lr']:.2e}  "
                # a window of only the compiling first step has no timed step
                + (f"tok/s {tps:,.0f}" if math.isfinite(tps) else "tok/s -")
                + (f"  mfu {rec['mfu']:.1%}" if "mfu" in rec else ""))
      window.update(t=time.perf_counter(), steps=0, tsteps=0, loss=0.0, gn=0.0)

  def last_good():
    return (f"the last good checkpoint is {ckpt.directory}/{last_saved}" if last_saved
            is not None else "no checkpoint was written yet")

  def save(step_no):
    nonlocal last_saved
    try:
      # this process's data position; save gathers every process's (a collective)
      ckpt.save(step_no, state, data_lib.iterator_state(it), cfg_dict, data_id=data_id,
                slices=trainer.data_slices)
    except NonFiniteStateError as e:
      raise NonFiniteLossError(f"{e}: {last_good()}") from None
    last_saved = step_no

  # Profiling (process 0 only: each process would write its own host file, and
  # jax's Perfetto export expects one trace per run folder).
  prof_dir = os.path.join(rc.out_dir, "profile")
  prof_first, prof_last = rc.profile_start + 1, rc.profile_start + rc.profile_steps
  prof = {"on": False, "first": None}

  def start_profile(step_no):
    prof["first"] = step_no  # one attempt per run
    try:
      jax.profiler.start_trace(prof_dir, create_perfetto_trace=True)
    except Exception as e:  # profiling is a diagnostic: never kill the run for it
      log(f"profile: could not start the trace at step {step_no}: {e!r}")
      return
    prof["on"] = True

  def stop_profile(step_no, complete):
    if not prof["on"]:
      return
    prof["on"] = False
    try:
      jax.profiler.stop_trace()
    except Exception as e:
      log(f"profile: stopping the trace failed: {e!r}")
      return
    runs = glob.glob(os.path.join(prof_dir, "plugins", "profile", "*"))
    where = max(runs, key=os.path.getmtime) if runs else prof_dir
    what = (f"steps {prof['first']}..{step_no}" if step_no >= prof["first"]
            else f"step {prof['first']} (unfinished)") + ("" if complete else " (stopped early)")
    log(f"profile: {what} traced to {where}; summarise with "
        f"`python -m train.trace_summary {prof_dir}`")

  if rc.profile_steps and is_main and start >= prof_last:
    log(f"profile: steps {prof_first}..{prof_last} were done before step {start}; not tracing")
  step = start
  t_loop = time.perf_counter()
  timings["setup"] = t_loop - t_enter
  try:
    while step < rc.steps:
      profiled = rc.profile_steps > 0 and is_main and prof_first <= step + 1 <= prof_last
      if profiled and prof["first"] is None:
        jax.block_until_ready(state)  # earlier steps finish before the trace starts
        start_profile(step + 1)
      with (jax.profiler.StepTraceAnnotation("train", step_num=step + 1) if prof["on"]
            else contextlib.nullcontext()):
        batch = trainer.device_batch(next(it), accum=accum)
        state, metrics = trainer.train_step(state, batch)
      drain()
      step += 1
      pending = (step, metrics)
      if agree and multihost_utils.reached_preemption_sync_point(step):
        stop["signal"] = signal.SIGTERM  # the step every process stops at
      if prof["on"] and step == prof_last:
        jax.block_until_ready((state, metrics))  # so this step's device work is in the trace
        t_prof = time.perf_counter()
        stop_profile(step, complete=True)
        window["t"] += time.perf_counter() - t_prof  # writing the trace is not training time
      last = step == rc.steps
      boundary = (last or step == stop_after or stop["signal"] is not None
                  or (rc.checkpoint_every and step % rc.checkpoint_every == 0)
                  or (rc.eval_every and step % rc.eval_every == 0)
                  or (rc.diag_every and step % rc.diag_every == 0))
      if not boundary:
        continue
      drain()
      t_extra = time.perf_counter()
      if rc.diag_every and (step % rc.diag_every == 0 or last):
        t_part = time.perf_counter()
        diag_batch = trainer.device_batch(next(iter(local_dataset(
            trainer, cfg, "val", shuffle=False, prefetch=0))), cfg.data.grad_accum)
        d = {k: float(v) for k, v in jax.device_get(
            trainer.diagnostics(state["params"], diag_batch)).items()}
        writer.write(step, d)
        # by layer number: a string sort puts layer_10 before layer_2
        cors = [v for _, v in sorted((int(k[len("cor/layer_"):]), v) for k, v in d.items()
                                     if k.startswith("cor/layer_"))]
        if cors:
          bar.write(f"step {step:6d}  COR per layer " + " ".join(f"{c:.3f}" for c in cors))
        timings["diag"] += time.perf_counter() - t_part
      if rc.eval_every and (step % rc.eval_every == 0 or last):
        t_part = time.perf_counter()
        eval_metrics = evaluate(trainer, cfg, state["params"])
        writer.write(step, eval_metrics)
        history.append({"step": step, **eval_metrics})
        bar.write(f"step {step:6d}  eval loss {eval_metrics['eval/loss']:.4f}  "
                  f"ppl {eval_metrics['eval/perplexity']:.1f}")
        timings["eval"] += time.perf_counter() - t_part
      if ((last and rc.save_final) or step == stop_after or stop["signal"] is not None
          or (rc.checkpoint_every and step % rc.checkpoint_every == 0)):
        t_part = time.perf_counter()
        save(step)
        timings["save"] += time.perf_counter() - t_part
      window["t"] += time.perf_counter() - t_extra  # keep tokens/s about training only
      if stop["signal"] is not None and not last:  # at the last step the run is complete
        stopped_by = signal.Signals(stop["signal"]).name
        log(f"{stopped_by}: saved checkpoint {ckpt.directory}/{step}; exiting")
        break
      if step == stop_after:
        stopped_by = "stop_after"
        break
    drain()
  except jax.errors.JaxRuntimeError as e:
    if not _is_oom(e):
      raise
    # async dispatch: the failing step is this one or the one before it
    raise _memory_error(e, cfg, step + 1, last_good()) from e
  finally:
    t_end = time.perf_counter()
    try:
      stop_profile(step, complete=False)  # no-op unless the loop left the window early
    finally:
      bar.close()
      try:
        ckpt.close()
      finally:
        writer.close()
        for sig, h in old_handlers.items():
          signal.signal(sig, h)
        close = getattr(it, "close", None)
        if close:
          close()

  if is_main:
    try:
      from train.plot import plot_run
      plot_run(rc.out_dir)
    except Exception as e:  # noqa: BLE001 - a plot never fails a finished run
      log(f"loss plot: not written ({type(e).__name__}: {e})")
  samples = []
  if stopped_by is None and stop["signal"] is None and rc.sample_lines > 0:
    params = state["params"]
    if jax.process_count() > 1:  # parameters split over processes: a collective, every
      params = multihost_utils.process_allgather(params, tiled=True)  # process takes part
    if is_main:
      samples = sample(cfg, params, meta, rc.sample_lines, rc.sample_tokens,
                       rc.sample_temperature, rc.seed)
      log("samples:")
      for s in samples:
        log("  | " + s.replace("\n", "\n  | "))
  timings["steps"] = (t_end - t_loop) - timings["eval"] - timings["diag"] - timings["save"]
  timings["finish"] = time.perf_counter() - t_end
  return {"losses": losses, "history": history, "eval": eval_metrics, "final_step": step,
          "stopped_by": stopped_by, "samples": samples, "state": state,
          "checkpoint_dir": ckpt.directory,
          "timings_s": {k: round(v, 2) for k, v in timings.items()}}
