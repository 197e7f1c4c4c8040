"""MAD's training protocol, with a whole sweep trained as one vmapped program.

For one task setting, model and optimizer, every (seed, learning rate, weight decay) run is a
slice of one `jax.vmap`-ed epoch function: the runs share the compiled program and the data
arrays (one train/test draw per seed), and each carries its own parameters, optimizer state,
shuffling key and hyper-parameters. Runs of one seed share their initialisation and batch
order, so the sweep points of a seed differ only in (lr, wd).

Protocol (MAD's `MADConfig` and `make_benchmark_mad_configs`, MAD README "The MAD protocol"):
batch 128, 200 epochs, learning rates {1e-4, 5e-4, 1e-3} x weight decays {0, 0.1}, cosine
annealing per epoch to 1e-6 (PyTorch CosineAnnealingLR, T_max = epochs, no warm-up), AdamW
(0.9, 0.999, eps 1e-8) with decoupled decay on every parameter, cross-entropy over the scored
positions, a test evaluation after every epoch, early stopping once test accuracy exceeds
0.999, and the run's result read at the epoch of lowest test perplexity (Lightning restores
the `ModelCheckpoint(monitor='test/Perplexity_epoch', mode='min')` checkpoint for the final
`trainer.validate`). A run's score is that accuracy; the best over the sweep is the setting's.

Learning rate and weight decay enter outside the optimizer: the optax transformation gives a
unit-rate direction d (no decay) and the step is p <- p + lr_t d - lr_t wd p, which is
PyTorch's AdamW update exactly and keeps the traced hyper-parameters out of the optimizer's
Python-side argument checks (`optim.muon` validates weight_decay with a Python `if`, so it cannot
take a traced value). Muon ('muon') replaces the direction of the hidden matrices (routing by
role, `model.MUON_ROUTING`); its AdamW group uses the same (0.9, 0.999) moments as 'adamw' and
its update-RMS matching (`update_scale='rms'`) lets the same learning-rate grid apply.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from parallax_jax.mad import metrics as mt
from parallax_jax.mad.model import (MUON_ROUTING, MADModel, ModelConfig, attention_implementation,
                                    init_params, param_shapes)
from parallax_jax.mad.tasks import IGNORE, TaskSetting, make_dataset
from parallax_jax.optim import muon
from parallax_jax.optim import routing as rt

OPTIMIZERS = ("adamw", "muon")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """MAD's defaults; steps_per_epoch / num_train / num_test shrink a run for the CPU, and
  group_size caps how many runs one program call trains at once (memory).

  stop_sweep (off in MAD): once a run has stopped early with a score above stop_acc, stop the
  other runs of its seed too. The setting's score (the best of the sweep) then changes by at
  most 1 - stop_acc, and the stopped runs' records are truncated (`sweep_stopped`).

  W_R (the learned probe's `r_proj`; not MAD's, for the ablations): r_lr_mult multiplies its
  learning rate (and so its decay, as a PyTorch parameter group's lr would); r_adamw trains its
  kernel with Muon's AdamW group instead of Muon (its bias is there already)."""
  epochs: int = 200
  batch_size: int = 128
  lrs: tuple[float, ...] = (1e-4, 5e-4, 1e-3)
  wds: tuple[float, ...] = (0.0, 0.1)
  min_lr: float = 1e-6
  stop_acc: float | None = 0.999
  stop_sweep: bool = False
  steps_per_epoch: int | None = None
  num_train: int | None = None
  num_test: int | None = None
  group_size: int | None = None
  r_lr_mult: float = 1.0
  r_adamw: bool = False

  def __post_init__(self):
    object.__setattr__(self, "lrs", tuple(float(x) for x in self.lrs))
    object.__setattr__(self, "wds", tuple(float(x) for x in self.wds))
    for key in ("epochs", "batch_size"):
      v = getattr(self, key)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"Protocol.{key}: must be an int >= 1, got {v!r}")
    for key in ("steps_per_epoch", "num_train", "num_test", "group_size"):
      v = getattr(self, key)
      if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"Protocol.{key}: must be an int >= 1 or None, got {v!r}")
    if not self.lrs or not all(0 < x < math.inf for x in self.lrs):
      raise ValueError(f"Protocol.lrs: must be a non-empty list of finite rates > 0, got "
                       f"{self.lrs}")
    if not self.wds or not all(0 <= x < math.inf for x in self.wds):
      raise ValueError(f"Protocol.wds: must be a non-empty list of finite decays >= 0, got "
                       f"{self.wds}")
    if not 0 <= self.min_lr <= min(self.lrs):
      raise ValueError(f"Protocol.min_lr: must be in [0, min(lrs)], got {self.min_lr}")
    if self.stop_sweep and self.stop_acc is None:
      raise ValueError("Protocol.stop_sweep: needs stop_acc (early stopping) set")
    v = self.r_lr_mult
    if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0 <= v < math.inf):
      raise ValueError(f"Protocol.r_lr_mult: must be a finite number >= 0, got {v!r}")


# W_R's parameters (kernel and bias) in the MAD model's tree
_R_PROJ = r"(^|/)attn/r_proj/"


def direction(optimizer: str, r_adamw: bool = False) -> optax.GradientTransformation:
  """The unit-rate, decay-free update direction of `optimizer` (already negated); r_adamw:
  under Muon, W_R's kernel in the AdamW group."""
  if optimizer == "adamw":
    return optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), optax.scale(-1.0))
  if optimizer == "muon":
    return muon(1.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, routing=muon_routing(r_adamw))
  raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")


def muon_routing(r_adamw: bool = False) -> rt.Routing:
  """The MAD model's Muon routing; r_adamw: W_R's kernel in the AdamW group."""
  return MUON_ROUTING.with_rules(rt.Rule(_R_PROJ + "kernel$", rt.ADAM)) if r_adamw \
      else MUON_ROUTING


def lr_multipliers(params, protocol: Protocol):
  """Per-leaf learning-rate factors (Python floats): r_lr_mult on W_R, 1 elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: protocol.r_lr_mult if re.search(_R_PROJ, rt.path_str(p)) else 1.0, params)


def cosine_lr(lr, epoch, epochs, min_lr: float):
  """CosineAnnealingLR(T_max=epochs, eta_min=min_lr), stepped once per epoch."""
  return min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))


def _batches(order, batch_size: int, steps: int):
  """order [N] -> [steps, batch] indices, the epoch's tail padded with -1 (ignored rows),
  like a DataLoader with drop_last=False."""
  n = order.shape[0]
  full = -(-n // batch_size) * batch_size
  order = jnp.concatenate([order, jnp.full((full - n,), -1, order.dtype)])
  return order.reshape(-1, batch_size)[:steps]


def _rows(x, y, seed_idx, idx):
  safe = jnp.maximum(idx, 0)
  return x[seed_idx, safe], jnp.where((idx >= 0)[:, None], y[seed_idx, safe], IGNORE)


@dataclasses.dataclass
class Program:
  """The compiled functions of one (setting, model, optimizer): the optimizer state's init,
  and one epoch of training followed by the test evaluation (one program, one compile)."""
  init: Callable
  epoch: Callable
  steps_per_epoch: int
  compile_s: float
  temp_bytes: int | None = None  # XLA's scratch for one epoch call (memory planning)
  attention: str | None = None   # the mixer's implementation (xla, chunked, pallas)
  num_runs: int = 1              # runs one call trains (the group it was compiled for)
  need_bytes: int | None = None  # scratch + arguments + outputs of one epoch call


def build_program(cfg: ModelConfig, optimizer: str, protocol: Protocol, data: dict[str, Any],
                  num_runs: int) -> Program:
  """Compile for `num_runs` runs; `data` may hold arrays or only their shapes (`data_shapes`),
  so programs can be compiled before (and concurrently with) anything else."""
  model = MADModel(cfg)
  tx = direction(optimizer, protocol.r_adamw)
  n_train, length = data["train_x"].shape[1:]
  n_test = data["test_x"].shape[1]
  bs = protocol.batch_size
  steps = -(-n_train // bs)
  if protocol.steps_per_epoch is not None:
    steps = min(steps, protocol.steps_per_epoch)

  def loss_fn(params, x, y):
    nll, count = mt.token_nll(model.apply({"params": params}, x), y)
    return nll / jnp.maximum(count, 1)

  def train_one(params, opt_state, key, seed_idx, lr, wd, active, epoch, epochs, train_x,
                train_y):
    order = _batches(jax.random.permutation(jax.random.fold_in(key, epoch), n_train), bs, steps)
    lr_t = cosine_lr(lr, epoch.astype(jnp.float32), epochs, protocol.min_lr)

    def step(carry, idx):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, *_rows(train_x, train_y, seed_idx, idx))
      d, new_opt = tx.update(grads, opt_state, params)
      def apply(p, u, m):  # m: W_R's lr multiplier (1 elsewhere: the step as it was)
        lr_p = lr_t if m == 1.0 else m * lr_t
        return p + lr_p * u - (lr_p * wd) * p
      new = jax.tree.map(apply, params, d, lr_multipliers(params, protocol))
      keep = lambda a, b: jnp.where(active, a, b)  # a stopped run stays where it stopped
      return (jax.tree.map(keep, new, params), jax.tree.map(keep, new_opt, opt_state)), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), order)
    return params, opt_state, jnp.mean(losses)

  def eval_one(params, seed_idx, test_x, test_y):
    idx = _batches(jnp.arange(n_test), bs, -(-n_test // bs))

    def body(_, rows):
      x, y = _rows(test_x, test_y, seed_idx, rows)
      m = mt.batch_metrics(model.apply({"params": params}, x), y, cfg.vocab_size)
      return None, (m, jnp.sum(rows >= 0))

    _, (m, w) = jax.lax.scan(body, None, idx)
    w = w.astype(jnp.float32)
    mean = lambda v: jnp.sum(v * w) / jnp.sum(w)  # Lightning: batch-size-weighted epoch mean
    return {"acc": mean(m["acc"]), "ppl": mean(m["ppl"]),
            "acc_micro": jnp.sum(m["correct"]) / jnp.maximum(jnp.sum(m["scored"]), 1)}

  # The epoch count is an argument, not a constant: programs compiled for a short calibration
  # run are the ones a full run needs (with a persistent compilation cache).
  def epoch_one(params, opt_state, key, seed_idx, lr, wd, active, epoch, epochs, train_x,
                train_y, test_x, test_y):
    params, opt_state, loss = train_one(params, opt_state, key, seed_idx, lr, wd, active, epoch,
                                        epochs, train_x, train_y)
    return params, opt_state, dict(eval_one(params, seed_idx, test_x, test_y), loss=loss)

  run = jax.ShapeDtypeStruct
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), num_runs))
  f32, i32 = jnp.float32, jnp.int32
  stacked = jax.tree.map(lambda x: run((num_runs,) + x.shape, x.dtype), param_shapes(cfg))
  t0 = time.perf_counter()
  init = jax.jit(jax.vmap(tx.init)).lower(stacked).compile()
  state = (stacked, jax.eval_shape(jax.vmap(tx.init), stacked))
  epoch = jax.jit(jax.vmap(epoch_one, in_axes=(0,) * 7 + (None,) * 6),
                  donate_argnums=(0, 1)).lower(
      *state, keys, run((num_runs,), i32), run((num_runs,), f32), run((num_runs,), f32),
      run((num_runs,), bool), run((), i32), run((), f32), data["train_x"], data["train_y"],
      data["test_x"], data["test_y"]).compile()
  mem = epoch.memory_analysis()
  temp = need = None
  if mem is not None:
    temp = int(mem.temp_size_in_bytes)
    need = temp + int(mem.argument_size_in_bytes) + int(mem.output_size_in_bytes) - \
        int(getattr(mem, "alias_size_in_bytes", 0))
  return Program(init, epoch, steps, time.perf_counter() - t0, temp,
                 attention_implementation(cfg, bs, length), num_runs, need)


# The share of the device's memory a program may plan for: the rest is the stacked data of
# the next setting, the allocator's fragmentation, and the runtime's own buffers.
MEMORY_SHARE = 0.9


def device_memory() -> int | None:
  """Bytes the default device's allocator may hand out (None where it does not say: CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def fitting_program(cfg: ModelConfig, optimizer: str, protocol: Protocol, data: dict[str, Any],
                    num_runs: int, limit: int | None = None,
                    log: Callable[[str], None] | None = None) -> Program:
  """`build_program` for `num_runs` runs a call, halving the group until XLA's plan of one
  epoch call fits MEMORY_SHARE of the device (`limit` bytes; the device's own by default).
  Members without fused kernels (lla, mesa, linear: the dense path) hold [T, S] arrays per
  head and run, and a whole sweep of them at once can plan for more than the device has,
  where XLA would rematerialize for minutes and then fail at run time; for them the group
  is first sized from one run's plan (one more, small compile)."""
  limit = device_memory() if limit is None else limit
  bs, length = protocol.batch_size, data["train_x"].shape[-1]
  if limit is not None and num_runs > 1 and \
      attention_implementation(cfg, bs, length) != "pallas":
    # Size the group from one run's plan first: compiling an oversized group is what costs
    # (XLA tries to rematerialize it into the device for minutes before giving up).
    probe = build_program(cfg, optimizer, protocol, data, 1)
    if probe.need_bytes is not None:
      shared = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in data.values())
      per_run = max(probe.need_bytes - shared, 1)
      fit = max(1, int((MEMORY_SHARE * limit - shared) // per_run))
      if fit < num_runs:
        if log:
          log(f"{cfg.member}/{optimizer} L={cfg.seq_len}: one run plans "
              f"{probe.need_bytes / 2**30:.2f} GiB: {fit} runs a call of {num_runs} fit "
              f"{limit / 2**30:.1f}")
        num_runs = fit
      if num_runs == 1:
        return probe
  while True:
    prog = build_program(cfg, optimizer, protocol, data, num_runs)
    if limit is None or prog.need_bytes is None or \
        prog.need_bytes <= MEMORY_SHARE * limit or num_runs == 1:
      break
    smaller = -(-num_runs // 2)
    if log:
      log(f"{cfg.member}/{optimizer} L={cfg.seq_len}: {num_runs} runs a call plan "
          f"{prog.need_bytes / 2**30:.1f} GiB of {limit / 2**30:.1f}: {smaller} a call")
    num_runs = smaller
  if limit is not None and prog.need_bytes is not None and prog.need_bytes > limit and log:
    log(f"warning: {cfg.member}/{optimizer} L={cfg.seq_len} plans "
        f"{prog.need_bytes / 2**30:.1f} GiB for one run of {limit / 2**30:.1f} GiB")
  return prog


def data_shapes(setting: TaskSetting, num_seeds: int, protocol: Protocol) -> dict[str, Any]:
  n_train = protocol.num_train or setting.num_train
  n_test = protocol.num_test or setting.num_test
  shape = lambda n: jax.ShapeDtypeStruct((num_seeds, n, setting.length), jnp.int32)
  return {"train_x": shape(n_train), "train_y": shape(n_train), "test_x": shape(n_test),
          "test_y": shape(n_test)}


def device_data(setting: TaskSetting, seeds: tuple[int, ...], protocol: Protocol
                ) -> dict[str, jax.Array]:
  """One train/test draw per seed, stacked on a leading seed axis, on the device."""
  datasets = [make_dataset(setting, s, num_train=protocol.num_train, num_test=protocol.num_test)
              for s in seeds]
  stack = lambda name: jnp.asarray(np.stack([getattr(d, name) for d in datasets]))
  return {"train_x": stack("train_inputs"), "train_y": stack("train_targets"),
          "test_x": stack("test_inputs"), "test_y": stack("test_targets")}


def sweep(seeds: tuple[int, ...], protocol: Protocol) -> list[tuple[int, float, float]]:
  """(seed index, lr, wd) of every run, and how many runs one program call takes."""
  return list(itertools.product(range(len(seeds)), protocol.lrs, protocol.wds))


def group_size(num_runs: int, protocol: Protocol) -> int:
  return min(num_runs, protocol.group_size or num_runs)


def compile_program(setting: TaskSetting, *, optimizer: str, seeds: tuple[int, ...],
                    protocol: Protocol = Protocol(), model_kwargs: dict | None = None,
                    log: Callable[[str], None] | None = None) -> Program:
  """The program `run_setting` would build, from shapes only (thread-safe)."""
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
  cfg = model_config_for(setting, **(model_kwargs or {}))
  runs = len(sweep(seeds, protocol))
  return fitting_program(cfg, optimizer, protocol, data_shapes(setting, len(seeds), protocol),
                         group_size(runs, protocol), log=log)


def model_config_for(setting: TaskSetting, **model_kwargs) -> ModelConfig:
  return ModelConfig(vocab_size=setting.vocab_size, seq_len=setting.length,
                     backbone=setting.backbone, **model_kwargs)


def run_setting(setting: TaskSetting, *, optimizer: str, seeds: tuple[int, ...],
                protocol: Protocol = Protocol(), model_kwargs: dict | None = None,
                on_epoch: Callable[[int], None] | None = None, program: Program | None = None,
                data: dict[str, jax.Array] | None = None) -> dict[str, Any]:
  """Train the whole sweep x seeds of one setting. Returns {"runs": [...], "timing": {...}}.

  program / data: from `compile_program` / `device_data` when built ahead (both are rebuilt
  here otherwise). on_epoch(n) is called after each epoch of each group with the epochs just
  done (progress); when every run of a group has stopped early, once with the epochs skipped.
  """
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
  if not seeds:
    raise ValueError("seeds: need at least one seed")
  cfg = model_config_for(setting, **(model_kwargs or {}))
  t0 = time.perf_counter()
  if data is None:
    data = device_data(setting, seeds, protocol)
  data_s = time.perf_counter() - t0
  grid = sweep(seeds, protocol)
  if program is None:
    program = fitting_program(cfg, optimizer, protocol, data, group_size(len(grid), protocol))
  group = program.num_runs
  runs, train_s, epochs_done = [], 0.0, 0
  for start in range(0, len(grid), group):
    part = grid[start:start + group]
    real = len(part)
    part = part + [part[-1]] * (group - real)  # pad: same shapes, one compile
    t1 = time.perf_counter()
    out = _train_group(program, cfg, part, real, seeds, protocol, data, on_epoch)
    train_s += time.perf_counter() - t1
    epochs_done = max(epochs_done, out["epochs"])
    runs += out["runs"]
  for r in runs:
    r.update(task=setting.task, setting=setting.label, optimizer=optimizer, member=cfg.member)
  return {"runs": runs, "timing": {
      "task": setting.task, "setting": setting.label, "member": cfg.member,
      "optimizer": optimizer, "runs": len(grid), "runs_per_program": group,
      "epochs": protocol.epochs,
      "data_s": round(data_s, 3), "compile_s": round(program.compile_s, 3),
      "train_s": round(train_s, 3), "epochs_run": epochs_done,
      "steps_per_epoch": program.steps_per_epoch, "length": setting.length,
      "vocab_size": setting.vocab_size, "temp_bytes": program.temp_bytes,
      "attention": program.attention}}


def _train_group(program: Program, cfg: ModelConfig, part, real: int, seeds, protocol: Protocol,
                 data, on_epoch) -> dict[str, Any]:
  seed_idx = np.array([p[0] for p in part], np.int32)
  # Runs of one seed share the initial parameters and the batch order.
  inits = [init_params(cfg, int(s)) for s in seeds]
  params = jax.tree.map(lambda *xs: jnp.asarray(np.stack([xs[i] for i in seed_idx])), *inits)
  opt_state = program.init(params)
  shuffle = jnp.stack([jax.random.key(int(seeds[i])) for i in seed_idx])
  lr = jnp.asarray([p[1] for p in part], jnp.float32)
  wd = jnp.asarray([p[2] for p in part], jnp.float32)
  n = len(part)
  active = np.arange(n) < real
  hist = {k: [[] for _ in range(n)] for k in ("acc", "ppl", "acc_micro", "loss")}
  best = [dict(ppl=math.inf, acc=math.nan, acc_micro=math.nan, epoch=-1) for _ in range(n)]
  stopped = [None] * n
  sweep_stopped = [False] * n
  sidx = jnp.asarray(seed_idx)
  epoch = 0
  for epoch in range(protocol.epochs):
    params, opt_state, ev = program.epoch(
        params, opt_state, shuffle, sidx, lr, wd, jnp.asarray(active), jnp.int32(epoch),
        jnp.float32(protocol.epochs), data["train_x"], data["train_y"], data["test_x"],
        data["test_y"])
    ev = jax.device_get(ev)
    for i in np.flatnonzero(active):
      vals = {k: float(ev[k][i]) for k in ("acc", "ppl", "acc_micro", "loss")}
      for k, v in vals.items():
        hist[k][i].append(v)
      if vals["ppl"] < best[i]["ppl"]:  # strict: ties keep the earlier checkpoint
        best[i] = dict(ppl=vals["ppl"], acc=vals["acc"], acc_micro=vals["acc_micro"],
                       epoch=epoch)
      if protocol.stop_acc is not None and vals["acc"] > protocol.stop_acc:
        active[i] = False
        stopped[i] = epoch
    if protocol.stop_sweep:
      done = {seed_idx[i] for i in range(real)
              if stopped[i] is not None and best[i]["acc"] > protocol.stop_acc}
      for i in np.flatnonzero(active):
        if seed_idx[i] in done:
          active[i], sweep_stopped[i] = False, True
    if on_epoch:
      on_epoch(1)
    if not active.any():
      if on_epoch and protocol.epochs - epoch - 1:
        on_epoch(protocol.epochs - epoch - 1)
      break
  runs = []
  for i in range(real):
    runs.append(dict(
        seed=int(seeds[seed_idx[i]]), lr=float(lr[i]), wd=float(wd[i]),
        acc=best[i]["acc"], acc_micro=best[i]["acc_micro"], ppl=best[i]["ppl"],
        best_epoch=best[i]["epoch"], acc_max=max(hist["acc"][i]), acc_last=hist["acc"][i][-1],
        epochs_run=len(hist["acc"][i]), stopped_early=stopped[i] is not None,
        sweep_stopped=sweep_stopped[i],
        history={k: [round(v, 6) for v in hist[k][i]] for k in hist}))
  return {"runs": runs, "epochs": epoch + 1}
