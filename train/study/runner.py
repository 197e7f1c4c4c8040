"""Running a grid: one run after another (or `jobs` at a time in subprocesses) through
`train.loop.train`, inside a wall-clock budget, resumable.

- A run with a result of status done / diverged is skipped; an interrupted or failed one
  runs again (the loop resumes from its checkpoint when the run directory still has one,
  else it starts over with its old metrics set aside); a run that failed `max_attempts`
  times is left out and reported. (Across device calls only metrics and results travel, so
  a run cut off by the end of a call starts over in the next; the budget check below keeps
  that rare.)
- `stop_at` (epoch seconds): no run starts unless its estimated wall time (the median of
  this arm's finished runs, else the largest arm median of the grid's, else of the study's
  other grids, else unknown: it starts) ends before it, and
  at `stop_at` the run in progress gets SIGTERM, which the loop answers by saving a
  checkpoint and returning: the call that holds the device ends on time with every
  finished result on disk.
- A finished run's checkpoints are deleted (a 100M-parameter run's state is ~1.3 GB; the
  study keeps metrics, not weights) unless keep_checkpoints.
- XLA's persistent compilation cache (`<out>/.jax_cache`) lets runs that compile to the
  same program (every run of an arm: the peak lr is an argument of the train step) skip
  the compile.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time

from train.study import grid as grid_lib
from train.study import results as res_lib
from train.study.grid import FINAL, Grid, RunSpec

EXCLUDE_FROM_PACK = ("checkpoints", "tb", "profile", ".jax_cache", ".run.lock")


@dataclasses.dataclass(frozen=True)
class RunOptions:
  out: str
  extra: tuple[str, ...] = ()        # --set overrides for every run
  only: tuple[str, ...] = ()
  shard: tuple[int, int] | None = None
  stop_at: float | None = None       # epoch seconds
  grace_s: float = 60.0              # after stop_at, how long a run may take to stop
  max_runs: int | None = None
  jobs: int = 1
  gpus: tuple[str, ...] = ()         # one run per GPU (jobs = len(gpus))
  keep_checkpoints: bool = False
  max_attempts: int = 2
  compile_cache: bool = True
  dry_run: bool = False
  allow_data_change: bool = False
  pack_to: str | None = None         # rewrite this pack after every run that ends


class StudyError(RuntimeError):
  pass


# --------------------------------------------------------------------------- data
def ensure_data(grid: Grid, extra: tuple[str, ...] = (), log=print) -> str | None:
  """Make the grid's token shards when they are missing (train.corpus: the installed Python
  text), unless `extra` points data.path elsewhere; returns the data's identity (the corpus
  and tokenizer hashes, or a hash of the shards' checksums; see data_identity)."""
  paths = {grid_lib.arm_config(a, extra).data.path for a in grid.arms
           if grid_lib.available_arms(grid, extra)[a.name] is None}
  d = grid.data
  if d is not None and d.path in paths and (
      not os.path.exists(os.path.join(d.path, "meta.json"))
      or not os.path.exists(os.path.join(d.path, "corpus.json"))):
    from train import corpus
    log(f"{grid.name}: preparing {d.path} (corpus {d.corpus_dir}, at most {d.max_mb} MB)")
    cfg = corpus.CorpusConfig(roots=corpus.default_roots(), max_mb=d.max_mb)
    corpus.build(cfg, d.corpus_dir, log=log)
    corpus.prepare_shards(d.corpus_dir, d.path, d.tokenizer, val_fraction=d.val_fraction,
                          log=log)
  for a in grid.arms:  # an eval longer than the held-out split would count documents twice
    if grid_lib.available_arms(grid, extra)[a.name] is None:
      c = grid_lib.arm_config(a, extra)
      need = c.data.eval_batches * c.data.global_batch_size * c.data.seq_len
      have = split_tokens(c.data.path, "val")
      if have is not None and have < need:
        log(f"{grid.name}: warning: {a.name} evaluates {need} tokens but {c.data.path} holds "
            f"{have} held-out tokens (raise the val fraction or lower data.eval_batches)")
      break
  ids = {data_identity(p) for p in paths}
  if len(ids) > 1:
    raise StudyError(f"grid {grid.name}: arms read different data ({sorted(paths)})")
  return ids.pop() if ids else None


def data_identity(data_path: str) -> str | None:
  """'<corpus sha256>+<tokenizer sha256[:12]>' for train.corpus data; a hash of the shards'
  checksums for other prepared data; None when neither is recorded."""
  stamp = res_lib.read_json(os.path.join(data_path, "corpus.json"))
  if stamp and stamp.get("corpus_sha256"):
    return f"{stamp['corpus_sha256']}+{str(stamp.get('tokenizer_sha256'))[:12]}"
  meta = res_lib.read_json(os.path.join(data_path, "meta.json"))
  if meta and meta.get("checksums"):
    return "checksums:" + res_lib.fingerprint({"c": meta["checksums"]})
  return None


def check_data(grid: Grid, results: dict[str, dict], corpus_sha: str | None, allow: bool):
  """Refuse to add runs on other data to a grid whose finished runs used another corpus
  (a changed installation changes the corpus; the comparison would be void)."""
  if corpus_sha is None:
    return
  other = sorted({r.get("corpus_sha256") for r in results.values()
                  if r.get("status") in FINAL and r.get("corpus_sha256")} - {corpus_sha})
  if other and not allow:
    raise StudyError(f"grid {grid.name}: finished runs used corpus {other[0][:12]}, this "
                     f"machine's is {corpus_sha[:12]}; use another --out, or "
                     f"--allow-data-change to mix them")


# --------------------------------------------------------------------------- one run
class _Tee:
  def __init__(self, stream, path):
    self.stream, self.file = stream, open(path, "a")

  def write(self, s):
    self.stream.write(s)
    self.file.write(s)
    return len(s)

  def flush(self):
    self.stream.flush()
    self.file.flush()

  def isatty(self):
    return False

  def close(self):
    self.file.close()


def _device_info() -> dict:
  import jax
  d = jax.devices()[0]
  return {"device": d.device_kind, "platform": d.platform, "device_count": jax.device_count(),
          "jax": jax.__version__}


def split_tokens(data_path: str, split: str = "train") -> int | None:
  """Tokens in one split of the data (train: for the epochs a run sees)."""
  import numpy as np
  meta = res_lib.read_json(os.path.join(data_path, "meta.json"))
  try:
    return sum(int(np.load(os.path.join(data_path, s + ".offsets.npy"), mmap_mode="r")[-1])
               for s in meta["splits"][split])
  except (TypeError, KeyError, OSError, ValueError):
    return None


def _git_commit() -> str | None:
  """The code's commit: $PARALLAX_JAX_COMMIT where the caller knows it better than the
  checkout's git metadata (a copied tree whose .git is missing or stale), else HEAD."""
  if os.environ.get("PARALLAX_JAX_COMMIT"):
    return os.environ["PARALLAX_JAX_COMMIT"]
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def _set_aside(path: str, log):
  n = 1
  while os.path.exists(f"{path}.prev{n}"):
    n += 1
  os.replace(path, f"{path}.prev{n}")
  log(f"  kept {path} as {os.path.basename(path)}.prev{n}")


def prepare_run_dir(cfg_dict: dict, run_dir: str, log):
  """An unfinished run directory is resumed only when it holds a checkpoint of the same
  config; otherwise its metrics (and a mismatched config's checkpoints) are set aside so
  the new attempt starts clean."""
  os.makedirs(run_dir, exist_ok=True)
  old = res_lib.read_json(os.path.join(run_dir, "config.json"))
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  has_ckpt = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
  if old is not None and res_lib.config_diff(old, cfg_dict):
    log(f"  {run_dir}: config changed ({'; '.join(res_lib.config_diff(old, cfg_dict)[:3])}); "
        "starting over")
    for name in ("checkpoints", "metrics.jsonl"):
      if os.path.exists(os.path.join(run_dir, name)):
        _set_aside(os.path.join(run_dir, name), log)
  elif not has_ckpt and os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
    _set_aside(os.path.join(run_dir, "metrics.jsonl"), log)


def _check_same_config(grid: Grid, run_id: str, prev: dict, cfg_dict: dict):
  """A finished run is kept only while the grid (with its --set keys) still gives it the
  config it ran with; otherwise its result would stand for a run it is not."""
  if prev.get("config_fingerprint") in (None, res_lib.fingerprint(cfg_dict)):
    return  # (None: a result without its config, nothing to compare)
  diff = res_lib.config_diff(prev.get("config", {}), cfg_dict, added_at_default=False)
  if diff:
    raise StudyError(f"{grid.name}/{run_id} finished with another config "
                     f"({'; '.join(diff[:4])}); use another --out")


def check_finished_configs(grid: Grid, results: dict[str, dict], plans, opts: RunOptions):
  """Every finished run of the plan against the config it would run with now."""
  for p in plans:
    for spec in p.runs:
      prev = results.get(spec.run_id)
      if prev and prev.get("status") in FINAL:
        cfg = grid_lib.run_config(grid, spec, opts.out, opts.extra)
        _check_same_config(grid, spec.run_id, prev, cfg.to_dict())


def run_one(grid: Grid, spec: RunSpec, opts: RunOptions, corpus_sha: str | None = None,
            log=print) -> dict:
  """Train one run in this process and write its result.json; returns the result."""
  from train import loop
  cfg = grid_lib.run_config(grid, spec, opts.out, opts.extra)
  cfg_dict = cfg.to_dict()
  run_dir = spec.run_dir(opts.out)
  result_path = os.path.join(run_dir, "result.json")
  prev = res_lib.read_json(result_path) or {}
  if prev.get("status") in FINAL:
    _check_same_config(grid, spec.run_id, prev, cfg_dict)
    return prev
  prepare_run_dir(cfg_dict, run_dir, log)
  result = {"grid": grid.name, **grid_lib.as_dict(spec), "attempts": prev.get("attempts", 0) + 1,
            "failures": prev.get("failures", 0),
            "config_fingerprint": res_lib.fingerprint(cfg_dict), "jobs": opts.jobs,
            "corpus_sha256": corpus_sha or data_identity(cfg.data.path),
            "data_train_tokens": split_tokens(cfg.data.path),
            "commit": _git_commit(), **_device_info()}
  t0 = time.perf_counter()
  tee = _Tee(sys.stdout, os.path.join(run_dir, "log.txt"))
  status, error, summary = "done", None, None
  try:
    with contextlib.redirect_stdout(tee):
      summary = loop.train(cfg, log=lambda s: print(s, flush=True))
    if summary.get("stopped_by"):
      status = "interrupted"
    result["timings_s"] = summary.get("timings_s")
  except loop.NonFiniteLossError as e:
    status, error = "diverged", str(e).splitlines()[0]
  except Exception as e:  # noqa: BLE001 - one broken run must not end the grid
    status, error = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  finally:
    tee.close()
  summary = None  # the train state: free the device memory before the next run
  gc.collect()
  result.update(status=status, error=error, wall_s=round(time.perf_counter() - t0, 1),
                finished_at=time.strftime("%Y-%m-%d %H:%M:%S"), config=cfg_dict)
  try:
    result.update(res_lib.summarize(run_dir, cfg_dict))
    if result.get("data_train_tokens"):
      result["epochs"] = result["tokens"] / result["data_train_tokens"]
  except Exception as e:  # noqa: BLE001 - a result without metrics is still a result
    result["error"] = (error or "") + f" (summary: {type(e).__name__}: {e})"
  if status == "done" and result.get("eval_loss") is None:
    status = result["status"] = "failed"
    result["error"] = "no eval/loss at the final step (set run.eval_every > 0)"
  result["failures"] += status == "failed"
  res_lib.write_json(result_path, result)
  if status in FINAL and not opts.keep_checkpoints:
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
  return result


# --------------------------------------------------------------------------- the grid
def estimate_s(grid: Grid, arm: str, results: dict[str, dict],
               study: list[dict[str, dict]] = (), jobs: int = 1) -> float | None:
  """Expected wall time of one more run of `arm` when `jobs` run at a time on the device:
  the median of its finished runs made that way, else the largest median among the grid's
  arms, else among the arms of the study's other grids (`study`: their results; unknown
  arms are assumed slow). A run counts scaled by the ratio of this arm's steps to its own
  (fixed costs scale too: an upper bound for a longer run). With jobs > 1 and no such
  run yet, the runs made alone x jobs (an upper bound: sharing the device is no slower than
  taking turns). None if nothing has finished."""
  try:
    steps = grid_lib.arm_config(grid.arm(arm)).run.steps
  except ValueError:
    steps = None

  def medians(res, n):
    by_arm: dict[str, list[float]] = {}
    for r in res.values():
      if r.get("status") == "done" and r.get("wall_s") and r.get("jobs", 1) == n:
        scale = steps / r["steps"] if steps and r.get("steps") else 1.0
        by_arm.setdefault(r["arm"], []).append(float(r["wall_s"]) * scale)
    return {a: statistics.median(v) for a, v in by_arm.items()}

  def estimate(n):
    own = medians(results, n)
    if arm in own:
      return own[arm]
    if own:
      return max(own.values())
    return max((m for res in study for m in medians(res, n).values()), default=None)

  est = estimate(jobs)
  if est is None and jobs > 1:
    alone = estimate(1)
    est = None if alone is None else alone * jobs
  return est


class _Deadline:
  """At stop_at: SIGTERM to this process (the loop saves a checkpoint and returns), again
  every 5 s while it has not (a signal that lands before the loop installs its handler is
  only noted by the runner's); at stop_at + grace the process exits, so the commands after
  it in the device call (packing the results) still run."""

  def __init__(self, stop_at: float | None, grace: float, log):
    self.expired = False
    self.done = threading.Event()
    self.log = log
    if stop_at is not None:
      threading.Thread(target=self._watch, args=(stop_at, grace), daemon=True).start()

  def _watch(self, stop_at: float, grace: float):
    if self.done.wait(max(0.0, stop_at - time.time())):
      return
    self.expired = True
    self.log("study: time budget reached; stopping the run in progress")
    while True:
      if time.time() > stop_at + grace:
        self.log(f"study: still running {grace:.0f} s after the budget; exiting")
        sys.stdout.flush()
        os._exit(124)
      os.kill(os.getpid(), signal.SIGTERM)
      if self.done.wait(5.0):
        return

  def cancel(self):
    self.done.set()


def _plan_all(grids: list[Grid], opts: RunOptions):
  out = []
  for g in grids:
    results = res_lib.load_results(opts.out, g.name)
    plans = grid_lib.plan_grid(g, results, opts.extra)
    todo = grid_lib.select(grid_lib.pending(g, plans, results, opts.max_attempts),
                           opts.only, opts.shard)
    out.append((g, results, plans, todo))
  return out


def run_grids(grids: list[Grid], opts: RunOptions, log=print,
              paths: dict[str, str] | None = None) -> dict:
  """Run what is pending in `grids` (in order) until done, out of time or max_runs.
  paths: grid name -> its file (needed by jobs > 1: each child loads it).
  Returns {"ran": [...results], "pending": n, "stopped": reason or None}."""
  os.makedirs(opts.out, exist_ok=True)
  if opts.compile_cache and not opts.dry_run:
    _enable_compile_cache(os.path.join(opts.out, ".jax_cache"))
  corpus = {}
  for g in grids:
    results = res_lib.load_results(opts.out, g.name)
    plans = grid_lib.plan_grid(g, results, opts.extra)
    log(f"study {g.name}: {sum(len(p.runs) for p in plans)} runs planned so far")
    for line in grid_lib.describe(g, plans, results):
      log(line)
    check_finished_configs(g, results, plans, opts)
    if not opts.dry_run:
      corpus[g.name] = ensure_data(g, opts.extra, log)
      check_data(g, results, corpus[g.name], opts.allow_data_change)
  if opts.dry_run:
    todo = [r for *_, t in _plan_all(grids, opts) for r in t]
    log(f"study: {len(todo)} runs pending: " + ", ".join(f"{r.grid}/{r.run_id}" for r in todo))
    return {"ran": [], "pending": len(todo), "stopped": "dry_run"}
  if opts.jobs > 1 or opts.gpus:
    return _run_parallel(grids, opts, paths or {}, log)
  ran, stopped = [], None
  stop = {"sig": False}
  old = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sig", True))
  deadline = _Deadline(opts.stop_at, opts.grace_s, log)
  skipped: set[str] = set()
  try:
    while True:
      if stop["sig"] or deadline.expired:
        stopped = "deadline" if deadline.expired else "SIGTERM"
        break
      if opts.max_runs is not None and len(ran) >= opts.max_runs:
        stopped = "max_runs"
        break
      nxt = _next_run(grids, opts, skipped, log)
      if nxt is None:
        break
      g, spec = nxt
      log(f"study: run {g.name}/{spec.run_id} ({spec.stage})")
      res = run_one(g, spec, opts, corpus.get(g.name), log)
      ran.append(res)
      _repack(opts, log)
      log(f"study: {g.name}/{spec.run_id} {res['status']}"
          + (f" eval loss {res['eval_loss']:.4f}" if res.get("eval_loss") else "")
          + f" in {res.get('wall_s', 0):.0f} s"
          + (f" ({res['error']})" if res.get("error") else ""))
      if res["status"] == "interrupted":
        stopped = "deadline" if deadline.expired else "interrupted"
        break
  finally:
    deadline.cancel()
    signal.signal(signal.SIGTERM, old)
  left = sum(len(t) for *_, t in _plan_all(grids, opts))
  log(f"study: {len(ran)} runs this time; {left} pending in the current plan"
      + (f"; stopped: {stopped}" if stopped else ""))
  return {"ran": ran, "pending": left, "stopped": stopped}


def _next_run(grids, opts: RunOptions, skipped: set[str], log):
  """The first pending run that fits before stop_at (a run that does not is skipped for this
  invocation: a shorter one may still fit)."""
  plans = _plan_all(grids, opts)
  study = [results for _, results, _, _ in plans]
  for g, results, _, todo in plans:
    for spec in todo:
      key = f"{g.name}/{spec.run_id}"
      if key in skipped:
        continue
      if opts.stop_at is not None:
        est = estimate_s(g, spec.arm, results, study, jobs=1 if opts.gpus else opts.jobs)
        left = opts.stop_at - time.time()
        if est is not None and est > left:
          log(f"study: {key} needs ~{est:.0f} s, {left:.0f} s left: not started")
          skipped.add(key)
          continue
      return g, spec
  return None


def _enable_compile_cache(path: str):
  import jax
  if not jax.config.jax_compilation_cache_dir:
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# --------------------------------------------------------------------------- parallel
def child_command(grid_path: str, spec: RunSpec, opts: RunOptions) -> list[str]:
  cmd = [sys.executable, "-m", "train.study", "_run", "--grid", grid_path, "--out", opts.out,
         "--arm", spec.arm, "--lr", repr(spec.lr), "--seed", str(spec.seed),
         "--stage", spec.stage, "--jobs", str(1 if opts.gpus else opts.jobs)]
  for s in opts.extra:
    cmd += ["--set", s]
  if opts.keep_checkpoints:
    cmd.append("--keep-checkpoints")
  return cmd


def _run_parallel(grids: list[Grid], opts: RunOptions, paths: dict[str, str], log) -> dict:
  """Up to `jobs` runs at a time, each a `python -m train.study _run` subprocess: with
  `gpus`, one run per listed GPU (CUDA_VISIBLE_DEVICES), else all on the one device with
  1/jobs of its memory each (their step times then share it: result.json's jobs)."""
  missing = [g.name for g in grids if g.name not in paths]
  if missing:
    raise StudyError(f"--jobs > 1: no grid file for {missing}")
  slots = list(opts.gpus) or [None] * opts.jobs
  shared = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / len(slots):.3f}",
                XLA_PYTHON_CLIENT_PREALLOCATE="false")
  procs: dict[str, tuple[subprocess.Popen, str | None]] = {}
  ran, stopped, skipped = [], None, set()
  stop = {"sig": False}
  old = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sig", True))
  try:
    while True:
      for key, (p, slot) in list(procs.items()):
        if p.poll() is not None:
          del procs[key]
          slots.append(slot)
          g_name, run_id = key.split("/", 1)
          res = res_lib.load_results(opts.out, g_name).get(run_id, {"status": "failed"})
          ran.append(res)
          _repack(opts, log)
          log(f"study: {key} {res.get('status')} (exit {p.returncode})")
      late = opts.stop_at is not None and time.time() >= opts.stop_at
      if (stop["sig"] or late) and stopped is None:
        stopped = "deadline" if late else "SIGTERM"
        for p, _ in procs.values():
          p.send_signal(signal.SIGTERM)  # each loop saves a checkpoint and returns
      if late and time.time() > opts.stop_at + opts.grace_s:
        for p, _ in procs.values():
          p.kill()
      can_start = stopped is None and slots and \
          (opts.max_runs is None or len(ran) + len(procs) < opts.max_runs)
      if can_start:
        nxt = _next_run(grids, opts, skipped | set(procs), log)
        if nxt is not None:
          g, spec = nxt
          key = f"{g.name}/{spec.run_id}"
          slot = slots.pop(0)
          env = shared if slot is None else dict(os.environ, CUDA_VISIBLE_DEVICES=slot)
          log(f"study: start {key} ({spec.stage})" + (f" on GPU {slot}" if slot else ""))
          procs[key] = (subprocess.Popen(child_command(paths[g.name], spec, opts), env=env),
                        slot)
          continue
      if not procs:
        break
      time.sleep(1.0)
  finally:
    signal.signal(signal.SIGTERM, old)
    for p, _ in procs.values():
      p.wait()
  left = sum(len(t) for *_, t in _plan_all(grids, opts))
  log(f"study: {len(ran)} runs this time; {left} pending" + (f"; stopped: {stopped}" if stopped
                                                              else ""))
  return {"ran": ran, "pending": left, "stopped": stopped}


# --------------------------------------------------------------------------- pack
def pack(out: str, to: str, log=print) -> str:
  """Everything under `out` but checkpoints, TensorBoard events, profiles and the compile
  cache, as a .tar.gz whose paths start with out's last component (untar it in out's
  parent). A study's metrics and results are a few MB."""
  out = os.path.abspath(out)  # '.' packs under the directory's own name
  base = os.path.basename(out)
  to = os.path.abspath(to)
  if os.path.isdir(to):
    raise ValueError(f"--to: {to!r} is a directory; name the .tar.gz to write")
  tmp = f"{to}.tmp"  # renamed when complete: a process killed mid-write leaves the last pack
  # the pack itself may live under out (--pack-to inside the study): never packed into itself
  own = {os.path.relpath(p, os.path.dirname(out)) for p in (to, tmp)}

  def keep(info: tarfile.TarInfo):
    parts = info.name.split("/")
    if any(p in EXCLUDE_FROM_PACK for p in parts) or info.name.endswith(".tmp") \
        or info.name in own:
      return None
    return info

  try:
    os.makedirs(os.path.dirname(to), exist_ok=True)
    with tarfile.open(tmp, "w:gz") as tar:
      tar.add(out, arcname=base, filter=keep)
    os.replace(tmp, to)
  except OSError as e:
    if os.path.isfile(tmp):
      os.remove(tmp)
    why = ("a part of its path is a file" if isinstance(e, (FileExistsError, NotADirectoryError))
           else e.strerror or e)
    raise ValueError(f"--to: cannot write {to!r} ({why})") from e
  log(f"packed {out} into {to} ({os.path.getsize(to) / 1e6:.2f} MB)")
  return to


def _repack(opts: RunOptions, log):
  """The pack as of now (opts.pack_to), so a call killed before its last command still
  returns every run that ended."""
  if opts.pack_to:
    try:
      pack(opts.out, opts.pack_to, log)
    except (OSError, ValueError) as e:
      log(f"study: could not pack into {opts.pack_to}: {e!r}")


def summary_line(res: dict) -> str:
  loss = res.get("eval_loss")
  return (f"{res.get('arm')}/lr{grid_lib.lr_key(res.get('lr', math.nan))}_s{res.get('seed')}: "
          f"{res.get('status')}" + (f" {loss:.4f}" if isinstance(loss, float) else ""))


