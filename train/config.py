"""Typed, frozen, validated training configuration and the `--set a.b=value` override parser.

A run is described by one `TrainConfig` (sections: model, mesh, data, optimizer, schedule,
run, init). Every section is a frozen dataclass that checks itself in `__post_init__`; errors are
`ValueError("<section>.<key>: ...")` so the offending key is named. Presets live in
`configs/*.py`, each defining `get_config() -> TrainConfig`.

Overrides: `apply_overrides(cfg, ["optimizer.lr=3e-3", "model.num_layers=4"])` parses each
value to the field's declared type (int, float incl. 'inf', bool true/false, str, None for
optional fields, comma-separated tuples) and rebuilds the frozen dataclasses, re-running all
checks. Unknown keys and bad values fail here, before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types
import typing
from typing import Any

from parallax_jax.models.config import ModelConfig


def _err(section: str, key: str, msg: str):
  raise ValueError(f"{section}.{key}: {msg}")


def _pos_int(section, obj, key, minimum=1):
  v = getattr(obj, key)
  if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
    _err(section, key, f"must be an int >= {minimum}, got {v!r}")


def _num(section, obj, key, lo=None, hi=None, lo_open=False, allow_none=False):
  v = getattr(obj, key)
  if v is None and allow_none:
    return
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    _err(section, key, f"must be a finite number, got {v!r}")
  if lo is not None and (v < lo or (lo_open and v == lo)):
    _err(section, key, f"must be {'>' if lo_open else '>='} {lo}, got {v!r}")
  if hi is not None and v > hi:
    _err(section, key, f"must be <= {hi}, got {v!r}")


def _choice(section, obj, key, choices):
  v = getattr(obj, key)
  if v not in choices:
    _err(section, key, f"unknown value {v!r}; expected one of {tuple(choices)}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh: data x fsdp x tensor. One size may be -1 (all remaining devices)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = (self.data, self.fsdp, self.tensor)
    for k in ("data", "fsdp", "tensor"):
      v = getattr(self, k)
      if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
        _err("mesh", k, f"must be an int >= 1 or -1 (use the remaining devices), got {v!r}")
    if sizes.count(-1) > 1:
      # name an axis that is -1 (not always data) and show all three: which one to fix
      # depends on what the preset set
      last = [k for k, v in zip(("data", "fsdp", "tensor"), sizes) if v == -1][-1]
      _err("mesh", last, f"at most one mesh axis may be -1 (the remaining devices), got "
           f"data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Tokenized shards (see train/data.py for the format) and batching.

  path: directory written by `python -m train.prepare`; prepared automatically with the
    default corpus (Python stdlib sources, BPE of `vocab_size`) when missing and
    `auto_prepare` is set (the CLI turns it off for a data.path set with --set, unless
    data.auto_prepare is set too: a mistyped path is refused, not filled with the demo
    corpus). global_batch_size sequences of seq_len tokens per optimizer step, split into
    grad_accum micro-batches. verify: when a shard is first opened, read it
    once to check its CRC-32 against meta.json and its token ids against the vocabulary
    (false skips the read, for corpora too large to scan; sizes are always checked).
  """
  path: str = "data/stdlib"
  seq_len: int = 128
  global_batch_size: int = 16
  grad_accum: int = 1
  seed: int = 0
  prefetch: int = 2
  eval_batches: int = 4
  auto_prepare: bool = True
  vocab_size: int = 1024
  max_corpus_mb: float = 6.0
  verify: bool = True

  def __post_init__(self):
    for k in ("seq_len", "global_batch_size", "grad_accum", "eval_batches", "vocab_size"):
      _pos_int("data", self, k)
    _pos_int("data", self, "seed", 0)
    _pos_int("data", self, "prefetch", 0)
    _num("data", self, "max_corpus_mb", 0, lo_open=True)
    if not isinstance(self.path, str) or not self.path:
      _err("data", "path", f"must be a non-empty string, got {self.path!r}")
    for k in ("auto_prepare", "verify"):
      if not isinstance(getattr(self, k), bool):
        _err("data", k, f"must be a bool, got {getattr(self, k)!r}")
    if self.global_batch_size % self.grad_accum:
      _err("data", "grad_accum", f"must divide global_batch_size ({self.global_batch_size}), "
           f"got {self.grad_accum}")


OPTIMIZERS = ("muon", "adamw")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """muon: Muon on hidden matrices + AdamW for embeddings/norms/scalars; adamw: AdamW alone.

  lr: peak learning rate (Muon group, or everything for adamw); adam_lr: the AdamW group's
  peak (None: lr). clip_grad_norm: global-norm clipping (0 disables). z_loss: coefficient of
  log(Z)^2 (0 disables). loss_chunk_tokens: the LM head + cross-entropy run fused, this many
  tokens at a time, with the gradient computed in the forward
  (`parallax_jax.nn.losses.fused_cross_entropy`: no [tokens, vocab] float32 logits); 0 uses
  the unfused path (full logits, then the loss).
  """
  name: str = "muon"
  lr: float = 3e-3
  adam_lr: float | None = None
  weight_decay: float = 0.0
  adam_weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  muon_beta: float = 0.95
  muon_rms: float = 0.2
  muon_update_scale: str = "rms"
  per_head: bool = False
  clip_grad_norm: float = 1.0
  z_loss: float = 0.0
  loss_chunk_tokens: int = 4096

  def __post_init__(self):
    _choice("optimizer", self, "name", OPTIMIZERS)
    _pos_int("optimizer", self, "loss_chunk_tokens", 0)
    _num("optimizer", self, "lr", 0, lo_open=True)
    _num("optimizer", self, "adam_lr", 0, lo_open=True, allow_none=True)
    for k in ("weight_decay", "adam_weight_decay", "clip_grad_norm", "z_loss", "muon_rms"):
      _num("optimizer", self, k, 0)
    for k in ("b1", "b2", "muon_beta"):
      _num("optimizer", self, k, 0, 0.999999)
    _num("optimizer", self, "eps", 0, lo_open=True)
    _choice("optimizer", self, "muon_update_scale", ("rms", "shape"))
    if not isinstance(self.per_head, bool):
      _err("optimizer", "per_head", f"must be a bool, got {self.per_head!r}")


DECAY_SHAPES = ("linear", "1-sqrt", "cosine")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """WSD: linear warmup over warmup_steps, constant, then decay over the last
  decay_fraction of the run to final_lr_fraction * peak with shape linear / 1-sqrt / cosine."""
  warmup_steps: int = 20
  decay_fraction: float = 0.2
  decay_shape: str = "1-sqrt"
  final_lr_fraction: float = 0.0

  def __post_init__(self):
    _pos_int("schedule", self, "warmup_steps", 0)
    _num("schedule", self, "decay_fraction", 0, 1)
    _num("schedule", self, "final_lr_fraction", 0, 1)
    _choice("schedule", self, "decay_shape", DECAY_SHAPES)


RESUME_MODES = ("auto", "override", "never")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Loop, logging, checkpoint and sampling settings.

  out_dir: run directory (checkpoints/, metrics.jsonl, TensorBoard events, config.json,
    loss.png).
  resume: 'auto' continues from the newest good checkpoint in out_dir and refuses a config
    that would change the run's trajectory (run.steps, optimizer, schedule, batch size, data
    seed: train/resume.py lists the keys); 'override' continues and applies such changes,
    printing each; 'never' starts from scratch and refuses an out_dir that holds checkpoints.
    true / false are read as 'auto' / 'never'.
  checkpoint_every: 0 saves only at the end (and on SIGTERM). save_final: false skips the
  save at the last step (runs whose weights nobody keeps, e.g. the quality study's; a
  SIGTERM still saves). diag_every: COR per layer and
  stable ranks of W_R / W_Q (0 disables). peak_tflops: per-device peak for MFU (0: auto from
  the device kind; unknown devices such as CPU report no MFU).
  profile_start / profile_steps: when profile_steps > 0, record a JAX profiler trace
  (TensorBoard xplane + a Perfetto trace.json.gz) of steps profile_start+1 ..
  profile_start+profile_steps under <out_dir>/profile; summarise it with
  `python -m train.trace_summary <out_dir>/profile`. Only process 0 traces; the window must
  end by `steps`; a resumed run traces what is left of the window.
  """
  steps: int = 300
  seed: int = 0
  out_dir: str = "runs/tiny"
  log_every: int = 10
  eval_every: int = 100
  diag_every: int = 100
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  async_checkpoint: bool = True
  save_final: bool = True
  resume: str = "auto"
  progress: bool = True
  peak_tflops: float = 0.0
  sample_lines: int = 3
  sample_tokens: int = 48
  sample_temperature: float = 0.7
  profile_start: int = 0
  profile_steps: int = 0

  def __post_init__(self):
    _pos_int("run", self, "steps")
    _pos_int("run", self, "log_every")
    for k in ("seed", "eval_every", "diag_every", "checkpoint_every", "sample_lines",
              "profile_start", "profile_steps"):
      _pos_int("run", self, k, 0)
    _pos_int("run", self, "keep_checkpoints")
    _pos_int("run", self, "sample_tokens")
    _num("run", self, "peak_tflops", 0)
    _num("run", self, "sample_temperature", 0)
    if isinstance(self.resume, bool) or str(self.resume).lower() in ("true", "false"):
      object.__setattr__(self, "resume", "auto" if str(self.resume).lower() == "true" else "never")
    _choice("run", self, "resume", RESUME_MODES)
    for k in ("async_checkpoint", "progress"):
      if not isinstance(getattr(self, k), bool):
        _err("run", k, f"must be a bool, got {getattr(self, k)!r}")
    if not isinstance(self.out_dir, str) or not self.out_dir:
      _err("run", "out_dir", f"must be a non-empty string, got {self.out_dir!r}")
    if self.profile_steps and self.profile_start + self.profile_steps > self.steps:
      _err("run", "profile_steps", f"profile_start + profile_steps = "
           f"{self.profile_start + self.profile_steps} exceeds run.steps {self.steps}")


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """Where a NEW run's parameters come from (a resumed run continues from its checkpoint).

  from_hf: a Hugging Face Qwen3 directory (config.json + *.safetensors). Its weights are
    loaded into `model`, whose shapes must match; what the checkpoint lacks (W_R, the gate, a
    learnable bandwidth) keeps its initialisation, so with r_init='zeros' a softmax Qwen3
    becomes a Parallax model computing the same function, which then fine-tunes.
  from_checkpoint: a run directory of this loop (its newest checkpoint) or one step's
    checkpoint directory (<run>/checkpoints/<step>): its parameters only.
  Either way the optimizer state, the data stream and the schedule start fresh.
  """
  from_hf: str | None = None
  from_checkpoint: str | None = None

  def __post_init__(self):
    for k in ("from_hf", "from_checkpoint"):
      v = getattr(self, k)
      if v is not None and (not isinstance(v, str) or not v):
        _err("init", k, f"must be a path or none, got {v!r}")
    if self.from_hf and self.from_checkpoint:
      _err("init", "from_checkpoint", "set at most one of init.from_hf and init.from_checkpoint")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  name: str = "tiny"
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
  run: RunConfig = dataclasses.field(default_factory=RunConfig)
  init: InitConfig = dataclasses.field(default_factory=InitConfig)

  def __post_init__(self):
    for k, cls in (("model", ModelConfig), ("mesh", MeshConfig), ("data", DataConfig),
                   ("optimizer", OptimizerConfig), ("schedule", ScheduleConfig),
                   ("run", RunConfig), ("init", InitConfig)):
      if not isinstance(getattr(self, k), cls):
        _err("config", k, f"must be a {cls.__name__}, got {type(getattr(self, k)).__name__}")
    if self.data.seq_len > self.model.max_seq_len:
      _err("data", "seq_len", f"{self.data.seq_len} exceeds model.max_seq_len "
           f"{self.model.max_seq_len}")
    if self.schedule.warmup_steps > self.run.steps:
      _err("schedule", "warmup_steps", f"{self.schedule.warmup_steps} exceeds run.steps "
           f"{self.run.steps}")

  def to_dict(self) -> dict[str, Any]:
    d = {"name": self.name}
    for f in dataclasses.fields(self):
      if f.name == "name":
        continue
      v = getattr(self, f.name)
      d[f.name] = v.to_dict() if isinstance(v, ModelConfig) else dataclasses.asdict(v)
    return d

  def replace(self, **kw) -> TrainConfig:
    return dataclasses.replace(self, **kw)


# --------------------------------------------------------------------------- overrides
def _hints(cls) -> dict[str, Any]:
  mod = __import__(cls.__module__, fromlist=["_"])
  return typing.get_type_hints(cls, vars(mod))


def _parse_one(tp, text: str, key: str):
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if type(None) in args and text.strip().lower() in ("none", "null"):
      return None
    errors = []
    if "," in text:  # `str | tuple[str, ...]`: a comma list is the tuple, not one string
      args = sorted(args, key=lambda a: typing.get_origin(a) is not tuple)
    for a in args:
      if a is type(None):
        continue
      try:
        return _parse_one(a, text, key)
      except ValueError as e:
        errors.append(str(e))
    raise ValueError(f"{key}: cannot parse {text!r} as {tp}")
  if origin is tuple:
    (elem, *_rest) = typing.get_args(tp)
    return tuple(_parse_one(elem, t.strip(), key) for t in text.split(",") if t.strip())
  if tp is bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
      return True
    if low in ("false", "0", "no", "off"):
      return False
    raise ValueError(f"{key}: expected a bool (true/false), got {text!r}")
  if tp is int:
    try:
      return int(text)
    except ValueError:
      raise ValueError(f"{key}: expected an int, got {text!r}") from None
  if tp is float:
    try:
      return float(text)
    except ValueError:
      raise ValueError(f"{key}: expected a number, got {text!r}") from None
  if tp is str:
    return text
  raise ValueError(f"{key}: cannot override a field of type {tp}")


def _apply(obj, tree: dict, prefix: str):
  """Rebuild `obj` with every override in `tree` ({field: text | subtree}) in ONE replace per
  dataclass, so checks that tie several keys together see all the new values at once."""
  names = {f.name for f in dataclasses.fields(obj)}
  hints = _hints(type(obj))
  changes = {}
  for head, sub in tree.items():
    full = prefix + head
    if head not in names:
      raise ValueError(f"{full}: unknown key {head!r}; known keys here: {sorted(names)}")
    cur = getattr(obj, head)
    if isinstance(sub, dict):
      if not dataclasses.is_dataclass(cur):
        raise ValueError(f"{full}: unknown key ({full} is a leaf value, not a section)")
      changes[head] = _apply(cur, sub, full + ".")
    else:
      if dataclasses.is_dataclass(cur):
        raise ValueError(f"{full}: is a section; set one of its keys, e.g. {full}.<key>")
      changes[head] = _parse_one(hints[head], sub, full)
  try:
    return dataclasses.replace(obj, **changes)
  except ValueError as e:
    # a section's own check names its class ("ModelConfig.attention: ..."): say the key the
    # user typed instead
    own = f"{type(obj).__name__}."
    if prefix and str(e).startswith(own):
      raise ValueError(prefix + str(e)[len(own):]) from None
    raise


def apply_overrides(cfg: TrainConfig, overrides) -> TrainConfig:
  """Apply 'a.b=value' strings (a later one for the same key wins); raises ValueError naming
  the key on any problem. All overrides are applied together, then validated."""
  tree: dict = {}
  for item in overrides or ():
    if "=" not in item:
      raise ValueError(f"--set {item!r}: expected key=value, e.g. optimizer.lr=3e-3")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for k, part in enumerate(parts[:-1]):
      nxt = node.setdefault(part, {})
      if not isinstance(nxt, dict):
        raise ValueError(f"{key.strip()}: {'.'.join(parts[:k + 1])} is also set as a value")
      node = nxt
    if isinstance(node.get(parts[-1]), dict):
      raise ValueError(f"{key.strip()}: is a section; set one of its keys")
    node[parts[-1]] = text.strip()
  return _apply(cfg, tree, "")


def flat_keys(obj, prefix: str = "") -> list[tuple[str, Any, str]]:
  """(dotted key, default/current value, type) for every leaf key, in declaration order."""
  out = []
  hints = _hints(type(obj))
  for f in dataclasses.fields(obj):
    v = getattr(obj, f.name)
    key = f"{prefix}{f.name}"
    if dataclasses.is_dataclass(v):
      out.extend(flat_keys(v, key + "."))
    else:
      tp = hints[f.name]
      out.append((key, v, getattr(tp, "__name__", None) or str(tp)))
  return out


def preset_names() -> list[str]:
  """Presets shipped in the `configs` package (usable by name: --config tiny)."""
  import importlib.resources
  try:
    files = importlib.resources.files("configs").iterdir()
  except (ModuleNotFoundError, TypeError):
    return []
  return sorted(f.name[:-3] for f in files if f.name.endswith(".py") and not f.name.startswith("_"))


def resolve_config_path(name: str) -> str:
  """A preset file path, or a preset name ('tiny', 'qwen3_0p6b_parallax') of the `configs`
  package, which works from a checkout and from an installed wheel alike."""
  if os.path.exists(name):
    return name
  if os.sep not in name and not name.endswith(".py") and name in preset_names():
    import importlib.resources
    return str(importlib.resources.files("configs") / f"{name}.py")
  raise ValueError(f"--config: no such file or preset {name!r} (presets: "
                   f"{', '.join(preset_names()) or 'none found'})")


def load_config_file(path: str) -> TrainConfig:
  """Import a preset file (or a named preset, see resolve_config_path) and call its
  `get_config()`."""
  path = resolve_config_path(path)
  spec = importlib.util.spec_from_file_location(
      "_train_config_" + os.path.basename(path).removesuffix(".py"), path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if not hasattr(mod, "get_config"):
    raise ValueError(f"--config: {path} defines no get_config()")
  cfg = mod.get_config()
  if not isinstance(cfg, TrainConfig):
    raise ValueError(f"--config: {path}: get_config() returned {type(cfg).__name__}, "
                     "not a TrainConfig")
  return cfg
