"""python -m parallax_jax.mad: the MAD suite for attention-family members and optimizers.

  python -m parallax_jax.mad --members softmax,parallax --optimizers adamw,muon --tasks all \\
      --settings baseline --seeds 3 --out runs/mad

writes <out>/mad_<tag>.json (every run, its history, per-program wall times, scores),
mad_<tag>.md (task x member/optimizer table, mean ± std over seeds, the paper's figures beside)
and mad_<tag>.png, after every program so an interrupted run keeps what it finished; the
same command run again resumes there (the programs already in mad_<tag>.json are skipped;
`--fresh` starts over).
`--quick` is a CPU smoke (a few steps on shrunken splits); `--merge a.json b.json` combines
runs made by separate commands. See docs/mad.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import platform
import re
import sys
import time

import jax

from parallax_jax import api
from parallax_jax._parser import Parser
from parallax_jax.mad import report
from parallax_jax.mad.model import R_INITS, ModelConfig, member_spec
from parallax_jax.mad.tasks import SETTING_CHOICES, TASKS, settings
from parallax_jax.mad.train import OPTIMIZERS, Protocol, compile_program, device_data, run_setting


def _floats(s: str) -> tuple[float, ...]:
  return tuple(float(x) for x in s.split(",") if x)


def parse_args(argv=None) -> argparse.Namespace:
  p = Parser(prog="python -m parallax_jax.mad", description=__doc__,
             formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--members", default="softmax,parallax",
                 help=f"comma list: names of {tuple(api.MEMBERS)} or probe:affine[:bandwidth]")
  p.add_argument("--optimizers", default="adamw", help=f"comma list of {OPTIMIZERS}")
  p.add_argument("--tasks", default="all", help=f"'all' or a comma list of {TASKS}")
  p.add_argument("--settings", default="baseline", choices=SETTING_CHOICES,
                 help="baseline: one setting per task; all: MAD's difficulty settings")
  p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (data, init, batch order)")
  p.add_argument("--out", default="runs/mad")
  p.add_argument("--tag", default="results", help="output files are mad_<tag>.*")
  g = p.add_argument_group("protocol (defaults: MAD's)")
  g.add_argument("--epochs", type=int, default=None, help="MAD's: 200 (--quick: 2)")
  g.add_argument("--task-epochs", default="",
                 help="per-task epochs overriding --epochs, e.g. memorization=200,compression=100")
  g.add_argument("--batch-size", type=int, default=None, help="MAD's: 128 (--quick: 16)")
  g.add_argument("--lrs", type=_floats, default=(1e-4, 5e-4, 1e-3))
  g.add_argument("--wds", type=_floats, default=(0.0, 0.1))
  g.add_argument("--no-early-stop", action="store_true",
                 help="train every epoch (MAD stops a run once test accuracy > 0.999)")
  g.add_argument("--sweep-stop", action="store_true",
                 help="once a run of a seed has stopped above 0.999, stop that seed's other runs "
                      "(changes a setting's best-of-sweep score by at most 0.001; not MAD's)")
  g.add_argument("--steps-per-epoch", type=int, default=None,
                 help="cap (smoke runs; --quick: 2)")
  g.add_argument("--train-examples", type=int, default=None, help="override the setting's")
  g.add_argument("--test-examples", type=int, default=None, help="override the setting's")
  g.add_argument("--group-size", type=int, default=None,
                 help="runs per program call (default: the whole sweep x seeds at once, halved "
                 "until XLA's memory plan fits the device)")
  g.add_argument("--quick", action="store_true",
                 help="CPU smoke: 2 epochs of 2 steps, batch 16, 64 train / 32 test examples "
                 "(each unless given)")
  m = p.add_argument_group("model (defaults: MAD's)")
  m.add_argument("--width", type=int, default=128)
  m.add_argument("--layers", type=int, default=2, help="[mixer, SwiGLU] pairs")
  m.add_argument("--heads", type=int, default=16)
  m.add_argument("--no-rope", action="store_true")
  m.add_argument("--no-attn-bias", action="store_true")
  m.add_argument("--r-init", default="zeros", choices=R_INITS)
  m.add_argument("--r-norm", action="store_true", help="RMSNorm on r (learned probe)")
  m.add_argument("--r-scale", type=float, default=1.0,
                 help="a fixed factor on r after its norm (learned probe)")
  m.add_argument("--no-r-rope", action="store_true", help="no RoPE on r (learned probe)")
  m.add_argument("--r-lr-mult", type=float, default=1.0,
                 help="W_R's learning rate (and decay) x this (learned probe)")
  m.add_argument("--r-adamw", action="store_true",
                 help="under Muon, train W_R with the AdamW group instead (learned probe)")
  m.add_argument("--init-std", type=float, default=None)
  m.add_argument("--ridge", type=float, default=1e-2, help="solve-probe members only")
  m.add_argument("--solver", default="direct", choices=api.SOLVERS,
                 help="solve-probe members only: their D x D systems' solver")
  m.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="compute dtype (auto: bfloat16 on GPU, float32 elsewhere)")
  m.add_argument("--implementation", default="auto",
                 choices=api.IMPLEMENTATIONS + ("auto",),
                 help="attention implementation (auto: the library's choice, e.g. the Pallas "
                      "kernels on GPU for softmax/Parallax)")
  p.add_argument("--max-minutes", type=float, default=None,
                 help="start no new program after this many minutes (outputs stay complete)")
  p.add_argument("--compile-cache", default=None,
                 help="JAX persistent compilation cache directory (reused across commands)")
  p.add_argument("--compile-threads", type=int, default=None,
                 help="programs compiled concurrently, in run order, ahead of training "
                 "(default: CPU count)")
  p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                 help="combine these result files into mad_<tag>.* and exit")
  p.add_argument("--fresh", action="store_true",
                 help="ignore (and overwrite) an existing mad_<tag>.json instead of resuming it")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  # --quick fills what the command leaves unset; MAD's values otherwise
  for key, quick, mad in (("epochs", 2, 200), ("steps_per_epoch", 2, None),
                          ("batch_size", 16, 128), ("train_examples", 64, None),
                          ("test_examples", 32, None)):
    if getattr(args, key) is None:
      setattr(args, key, quick if args.quick else mad)
  for key in ("members", "optimizers", "tasks"):  # in order, each once
    items = list(dict.fromkeys(x for x in getattr(args, key).split(",") if x))
    if not items:
      p.error(f"--{key}: empty list")
    setattr(args, key, items)
  if args.tasks == ["all"]:
    args.tasks = list(TASKS)
  if not re.fullmatch(r"[\w.+-]+", args.tag):
    p.error(f"--tag: a file name part (letters, digits, '_', '.', '+', '-'), got {args.tag!r}")
  for mem in args.members:
    try:
      member_spec(mem)
    except ValueError as e:
      p.error(f"--members: {str(e).removeprefix('member: ')}")
  for o in args.optimizers:
    if o not in OPTIMIZERS:
      p.error(f"--optimizers: unknown optimizer {o!r}; expected some of {OPTIMIZERS}")
  for t in args.tasks:
    if t not in TASKS:
      p.error(f"--tasks: unknown task {t!r}; expected 'all' or some of {TASKS}")
  task_epochs = {}
  for item in (x for x in args.task_epochs.split(",") if x):
    task, _, n = item.partition("=")
    if task not in TASKS or not n.isdigit() or int(n) < 1:
      p.error(f"--task-epochs: expected TASK=N with TASK in {TASKS} and N >= 1, got {item!r}")
    task_epochs[task] = int(n)
  args.task_epochs = task_epochs
  if args.seeds < 1:
    p.error(f"--seeds: need >= 1, got {args.seeds}")
  if args.r_adamw and "muon" not in args.optimizers:
    p.error("--r-adamw: changes Muon's routing of W_R, but --optimizers has no muon")
  probe_flags = [f for f, on in (
      ("--r-init", args.r_init != "zeros"), ("--r-norm", args.r_norm),
      ("--r-scale", args.r_scale != 1.0), ("--no-r-rope", args.no_r_rope),
      ("--r-lr-mult", args.r_lr_mult != 1.0), ("--r-adamw", args.r_adamw)) if on]
  if probe_flags and not any(ModelConfig(vocab_size=16, seq_len=16, member=m).has_probe
                             for m in args.members):
    p.error(f"{probe_flags[0]}: changes members with a learned probe (r = W_R x) only, and "
            f"--members has none ({','.join(args.members)})")
  try:  # the protocol's own checks (epochs, batch size, lrs, wds, ...), as flags
    _protocol(args)
  except ValueError as e:
    p.error(_as_flags(str(e)))
  if args.dtype == "auto":
    args.dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
  args.model_kwargs = dict(
      width=args.width, num_layers=args.layers, num_heads=args.heads, rope=not args.no_rope,
      attn_bias=not args.no_attn_bias, r_init=args.r_init, r_norm=args.r_norm,
      r_scale=args.r_scale, r_rope=not args.no_r_rope,
      init_std=args.init_std, ridge=args.ridge, solver=args.solver, dtype=args.dtype,
      implementation=None if args.implementation == "auto" else args.implementation)
  for mem in args.members:  # the model's checks, before anything compiles
    try:
      ModelConfig(vocab_size=16, seq_len=16, member=mem, **args.model_kwargs)
    except ValueError as e:
      p.error(_as_flags(str(e)))
  if not args.merge and os.path.exists(args.out) and not os.path.isdir(args.out):
    p.error(f"--out: {args.out!r} is a file, not a directory")
  for path in args.merge or ():
    if not os.path.isfile(path):
      p.error(f"--merge: no result file {path!r}")
  if args.implementation == "pallas" and jax.default_backend() != "gpu":
    p.error(f"--implementation: 'pallas' needs a GPU (the platform here is "
            f"{jax.default_backend()!r})")
  try:  # the results are written after each program: a bad directory fails now, not then
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f".mad_{args.tag}.probe"), "w"):
      pass
    os.remove(os.path.join(args.out, f".mad_{args.tag}.probe"))
  except OSError as e:
    p.error(f"--out: cannot write in {args.out!r} ({e.strerror or e})")
  return args


# ModelConfig's field names as the flags that set them, for its error messages
_FLAGS = {"num_heads": "--heads", "num_layers": "--layers", "width": "--width",
          "init_std": "--init-std", "r_init": "--r-init", "rope": "--no-rope",
          "implementation": "--implementation", "solver": "--solver", "ridge": "--ridge",
          "dtype": "--dtype", "member": "--members", "r_scale": "--r-scale",
          "r_rope": "--no-r-rope"}
_PROTOCOL_FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "lrs": "--lrs",
                   "wds": "--wds", "steps_per_epoch": "--steps-per-epoch",
                   "num_train": "--train-examples", "num_test": "--test-examples",
                   "group_size": "--group-size", "r_lr_mult": "--r-lr-mult"}


def _protocol(args) -> Protocol:
  return Protocol(epochs=args.epochs, batch_size=args.batch_size, lrs=args.lrs, wds=args.wds,
                  stop_acc=None if args.no_early_stop else 0.999, stop_sweep=args.sweep_stop,
                  steps_per_epoch=args.steps_per_epoch, num_train=args.train_examples,
                  num_test=args.test_examples, group_size=args.group_size,
                  r_lr_mult=args.r_lr_mult, r_adamw=args.r_adamw)


def _as_flags(msg: str) -> str:
  for field, flag in _FLAGS.items():
    msg = msg.replace(f"ModelConfig.{field}:", f"{flag}:")
  for field, flag in _PROTOCOL_FLAGS.items():
    msg = msg.replace(f"Protocol.{field}:", f"{flag}:")
  return msg.replace("must divide width (", "must divide --width (")


def _meta(args, protocol: Protocol, model_kwargs: dict) -> dict:
  dev = jax.devices()[0]
  return {"tag": args.tag, "argv": sys.argv[1:],
          "device": getattr(dev, "device_kind", dev.platform),
          "platform": dev.platform, "jax": jax.__version__, "python": platform.python_version(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "settings": args.settings, "seeds": args.seeds, "members": args.members,
          "optimizers": args.optimizers, "tasks": args.tasks,
          "protocol": {k: getattr(protocol, k) for k in protocol.__dataclass_fields__},
          "model": model_kwargs, "wall_s": 0.0}


def _resumable(path: str, meta: dict) -> dict | None:
  """The earlier result at `path` when this command continues it; None when there is none.

  Its runs count only under the same protocol, model and seeds; anything else is refused in one
  line (mixing them into one table would compare unlike runs).
  """
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      prev = json.load(f)
    old = prev["meta"]
    prev["programs"], prev["runs"]  # noqa: B018 - the keys a result must have
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SystemExit(f"error: {path} exists but is not a MAD result ({e}); move it away, or "
                     "pass --fresh to overwrite it")
  if "merged_from" in old:
    raise SystemExit(f"error: {path} was written by --merge and cannot be resumed; use another "
                     "--tag or --out, or pass --fresh to overwrite it")
  now = json.loads(json.dumps(meta))  # tuples as the file stores them
  diff = _setup_diff(old, now, ("there", "now"), ("seeds", "settings"))
  if diff:
    raise SystemExit(f"error: {path} holds runs of another setup ({diff}); use another --tag "
                     "or --out, or pass --fresh to overwrite it")
  for task, n in now["task_epochs"].items():
    if task in (old.get("task_epochs") or {}) and old["task_epochs"][task] != n:
      raise SystemExit(f"error: {path} trained {task} for {old['task_epochs'][task]} epochs, "
                       f"this command for {n}; use another --tag or --out, or pass --fresh")
  return prev


# protocol keys that may differ between the commands of one table: the sweep's grid (merged
# as its union), --sweep-stop (the header says where), epochs (per task: task_epochs) and
# the runs a call (memory)
_MERGEABLE = ("lrs", "wds", "stop_sweep", "epochs", "group_size")


def _setup_diff(was: dict, now: dict, names: tuple[str, str], keys=(), skip=()) -> str | None:
  """Where two results' metas differ in protocol, model and `keys`, as 'name: value in one,
  value in other' (`names`: how the two are called); None where they agree. A file written
  before a field existed ran with that field's default."""
  defaults = {"protocol": _field_defaults(Protocol), "model": _field_defaults(ModelConfig)}
  pairs = []
  for key in ("protocol", "model", *keys):
    a, b = was.get(key), now.get(key)
    if key in defaults:
      both = {**(a or {}), **(b or {})}
      a, b = ({**{k: v for k, v in defaults[key].items() if k in both}, **(x or {})}
              for x in (a, b))
      pairs += [(f"{key}.{k}", a.get(k), b.get(k)) for k in both if k not in skip]
    else:
      pairs.append((key, a, b))
  diff = [f"{name}: {x!r} {names[0]}, {y!r} {names[1]}" for name, x, y in pairs if x != y]
  return ", ".join(diff) or None


def _field_defaults(cls) -> dict:
  return json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(cls)
                                if f.default is not dataclasses.MISSING}))


def _check_mergeable(paths: list[str]) -> None:
  """Refuse (one line) to merge results of different models or protocols: one table would
  compare unlike runs under one label."""
  metas = []
  for path in paths:
    try:
      with open(path) as f:
        metas.append(json.load(f)["meta"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise SystemExit(f"error: --merge: {path} is not a MAD result ({type(e).__name__}: {e})")
  for path, meta in zip(paths[1:], metas[1:]):
    a, b = os.path.basename(paths[0]), os.path.basename(path)
    diff = _setup_diff(metas[0], meta, (f"in {a}", f"in {b}"), ("seeds", "settings"),
                       skip=_MERGEABLE)
    ea, eb = (m.get("task_epochs") or {} for m in (metas[0], meta))
    epochs = [f"task_epochs.{t}: {ea[t]} in {a}, {eb[t]} in {b}" for t in ea
              if t in eb and ea[t] != eb[t]]
    diff = ", ".join(x for x in [diff, *epochs] if x)
    if diff:
      raise SystemExit(f"error: --merge: {a} and {b} ran other setups ({diff}); merge runs "
                       "of one model and protocol only")


def _distinct_settings(task: str, args):
  """The task's settings, less those that --train-examples / --test-examples (or --quick)
  make copies of an earlier one (MAD's training-set-size settings): a copy would be trained
  again and weigh twice in the task's mean."""
  out, seen = [], set()
  for s in settings(task, args.settings):
    eff = dataclasses.replace(s, label="", num_train=args.train_examples or s.num_train,
                              num_test=args.test_examples or s.num_test)
    if eff not in seen:
      seen.add(eff)
      out.append(s)
  return out


def _job_key(task, label, member, optimizer) -> str:
  return f"{task}/{label}/{member}/{optimizer}"


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.merge:
    _check_mergeable(args.merge)
    try:
      result = report.merge(args.merge, args.tag)
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise SystemExit(f"error: --merge: cannot combine {', '.join(args.merge)}: "
                       f"{type(e).__name__}: {e}")
    paths = report.write(result, args.out, args.tag)
    print("wrote", ", ".join(paths.values()))
    return result
  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  protocol = _protocol(args)
  model_kwargs = args.model_kwargs
  result = {"meta": _meta(args, protocol, model_kwargs), "programs": [], "runs": []}
  seeds = tuple(range(args.seeds))
  jobs = [(s, mem, o) for t in args.tasks for s in _distinct_settings(t, args)
          for mem in args.members for o in args.optimizers]
  protocols = {t: dataclasses.replace(protocol, epochs=args.task_epochs.get(t, args.epochs))
               for t in args.tasks}
  result["meta"]["task_epochs"] = {t: p.epochs for t, p in protocols.items()}
  prev = None if args.fresh else _resumable(
      os.path.join(args.out, f"mad_{args.tag}.json"), result["meta"])
  earlier = dict(wall_s=0.0, compile_wall_s=0.0)
  if prev is not None:  # continue it: its programs stay, the finished jobs are skipped
    old = prev["meta"]
    done = {_job_key(p["task"], p["setting"], p["member"], p["optimizer"])
            for p in prev["programs"]}
    left = [j for j in jobs if _job_key(j[0].task, j[0].label, j[1], j[2]) not in done]
    print(f"resuming {args.out}/mad_{args.tag}.json: {len(jobs) - len(left)} of this command's "
          f"{len(jobs)} programs are done there ({len(prev['programs'])} programs, "
          f"{len(prev['runs'])} runs kept)", flush=True)
    jobs = left
    earlier = {k: old.get(k, 0.0) for k in earlier}
    meta = result["meta"]
    for key in ("members", "optimizers", "tasks"):  # the file covers both commands' jobs
      meta[key] = list(dict.fromkeys(list(old.get(key, [])) + meta[key]))
    meta["task_epochs"] = dict(old.get("task_epochs") or {}, **meta["task_epochs"])
    meta["commands"] = old.get("commands", [old.get("argv")]) + [meta["argv"]]
    meta["dates"] = old.get("dates", [old.get("date")]) + [meta["date"]]
    result["programs"], result["runs"] = prev["programs"], prev["runs"]
  start = time.perf_counter()
  wall = lambda: round(earlier["wall_s"] + time.perf_counter() - start, 2)
  # XLA compiles outside the GIL: the programs compile concurrently, in the order they run,
  # while the first ones train; compiles still queued when --max-minutes stops are dropped.
  threads = max(1, min(len(jobs) or 1, args.compile_threads or os.cpu_count() or 1))
  print(f"compiling {len(jobs)} programs ({threads} threads, ahead of training)", flush=True)
  pool = concurrent.futures.ThreadPoolExecutor(threads)
  futures = [pool.submit(compile_program, setting, optimizer=opt, seeds=seeds,
                         protocol=protocols[setting.task],
                         model_kwargs=dict(model_kwargs, member=mem),
                         log=lambda m: print(m, flush=True))
             for setting, mem, opt in jobs]
  result["meta"]["compile_wall_s"] = earlier["compile_wall_s"]
  runs_per_prog = args.seeds * len(protocol.lrs) * len(protocol.wds)
  groups = -(-runs_per_prog // (protocol.group_size or runs_per_prog))
  show = sys.stdout.isatty() and not args.no_progress
  from tqdm import tqdm
  bar = tqdm(total=groups * sum(protocols[s.task].epochs for s, _, _ in jobs), disable=not show,
             unit="epoch", dynamic_ncols=True)
  try:
    data, data_key = None, None
    late = lambda: (args.max_minutes is not None
                    and time.perf_counter() - start > 60 * args.max_minutes)
    for i, ((setting, mem, opt), future) in enumerate(zip(jobs, futures)):
      if not late():
        t_wait = time.perf_counter()
        program = future.result()
        result["meta"]["compile_wall_s"] = round(
            result["meta"]["compile_wall_s"] + time.perf_counter() - t_wait, 2)
      if late():
        print(f"--max-minutes {args.max_minutes} reached: skipping the {len(jobs) - i} remaining "
              "programs", flush=True)
        result["meta"]["skipped"] = [f"{s.task}/{s.label}/{m}/{o}" for s, m, o in jobs[i:]]
        break
      calls = -(-runs_per_prog // program.num_runs)  # a program fitted to memory: more calls
      if calls != groups:
        bar.total += (calls - groups) * protocols[setting.task].epochs
        bar.refresh()
      if data_key != setting:  # one draw per setting, shared by its members and optimizers
        data, data_key = device_data(setting, seeds, protocol), setting
      bar.set_description(f"{setting.task} {setting.label} {mem}/{opt}")
      out = run_setting(setting, optimizer=opt, seeds=seeds, protocol=protocols[setting.task],
                        model_kwargs=dict(model_kwargs, member=mem), on_epoch=bar.update,
                        program=program, data=data)
      result["programs"].append(out["timing"])
      result["runs"] += out["runs"]
      result["meta"]["wall_s"] = wall()
      report.write(result, args.out, args.tag, png=False)
      tm = out["timing"]
      best = max(r["acc"] for r in out["runs"])
      line = (f"[{i + 1}/{len(jobs)}] {setting.task} {setting.label} {mem}/{opt}: "
              f"{tm['epochs_run']} epochs {tm['train_s']:.1f} s "
              f"({tm['train_s'] / max(tm['epochs_run'], 1):.2f} s/epoch), best acc {best:.3f} "
              f"(wall {result['meta']['wall_s']:.0f} s)")
      bar.write(line) if show else print(line, flush=True)
  finally:  # an error or the time limit: drop the queued compiles
    pool.shutdown(wait=False, cancel_futures=True)
  bar.close()
  result["meta"]["wall_s"] = wall()
  paths = report.write(result, args.out, args.tag)
  print("\n".join(report.table(result)))
  print("wrote", ", ".join(paths.values()))
  return result


if __name__ == "__main__":
  main()
