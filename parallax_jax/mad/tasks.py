"""The six MAD synthetic tasks (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid
Architectures"), reimplemented in NumPy from the paper and its task configurations.

Every generator is a pure function of a `numpy.random.Generator` and a `TaskSetting`, and
returns int32 arrays `inputs [N, T]`, `targets [N, T]` with `IGNORE` (-100) where a position is
not scored. `make_dataset(setting, seed)` draws the train and test splits of one setting.

Token layout (V = vocab_size):
  in-context recall   keys [0, ns/2), values [ns/2, ns), ns = V - noise_vocab_size, noise
                      tokens [ns, V). Sequences of key-value pairs, a fresh key->value map per
                      sequence; the last pair repeats an earlier key. Test targets: the value
                      of every key already seen (multi-query). Training targets: the next
                      token everywhere (MAD trains recall as plain language modelling).
                      T = seq_len - 1 (MAD shifts a seq_len-long sequence by one).
  noisy recall        the same with pairs replaced by two noise tokens with prob. frac_noise.
  fuzzy recall        keys and values of 1..k_motif_size / 1..v_motif_size distinct tokens
                      (keys [0, ns/2), values [ns/2, ns), ns = V - 1; pad V - 1 on the left);
                      test keys always have k_motif_size tokens. T = seq_len.
  selective copying   num_tokens_to_copy tokens from [0, V - 2) scattered among blanks (V - 2),
                      then the copy token (V - 1) and one blank per token; targets: the tokens,
                      in order, at those last blanks. T = seq_len.
  compression         seq_len - 1 tokens from [0, V - 1), then the compression token V - 1;
                      targets = inputs (the auto-encoder decodes every position from the last).
  memorization        (key, insert) pairs, keys [0, (V-1)/2), insert token V - 1; the target at
                      each insert is the key's value under ONE map fixed for the whole dataset.

Deviation from the MAD repository, on purpose: in fuzzy recall MAD can (rarely) score a final
probe whose key never appeared (its probe position can fall after the fill loop ends); here
the probe always appears before it is queried, so every scored target is recallable. The
selective-copying blanks use the seeded generator (MAD draws them from NumPy's global state).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

IGNORE = -100
TASKS = ("in-context-recall", "noisy-in-context-recall", "fuzzy-in-context-recall",
         "selective-copying", "compression", "memorization")
SETTING_CHOICES = ("baseline", "all")


@dataclasses.dataclass(frozen=True)
class TaskSetting:
  """One difficulty setting of one task (the fields of MAD's task configs)."""
  task: str
  vocab_size: int
  seq_len: int
  num_train: int = 12_800
  num_test: int = 1_280
  noise_vocab_size: int = 0
  frac_noise: float = 0.0
  num_tokens_to_copy: int = 0
  k_motif_size: int = 1
  v_motif_size: int = 1
  label: str = "baseline"  # what differs from the baseline, e.g. "vocab_size=32"

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"TaskSetting.task: unknown task {self.task!r}; expected one of {TASKS}")
    for key in ("vocab_size", "seq_len", "num_train", "num_test", "k_motif_size",
                "v_motif_size"):
      v = getattr(self, key)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"TaskSetting.{key}: must be an int >= 1, got {v!r}")
    if not 0.0 <= self.frac_noise < 1.0:
      raise ValueError(f"TaskSetting.frac_noise: must be in [0, 1), got {self.frac_noise!r}")
    if self.frac_noise > 0 and self.noise_vocab_size < 1:
      raise ValueError(f"TaskSetting.noise_vocab_size: must be >= 1 when frac_noise > 0, got "
                       f"{self.noise_vocab_size!r}")
    _CHECKS[self.task](self)

  @property
  def length(self) -> int:
    """T, the model's sequence length for this setting."""
    return self.seq_len - 1 if self.task in _SHIFTED else self.seq_len

  @property
  def backbone(self) -> str:
    return "autoencoder" if self.task == "compression" else "lm"


def _check_recall(s: TaskSetting):
  ns = s.vocab_size - s.noise_vocab_size
  if ns < 4:
    raise ValueError(f"TaskSetting.vocab_size: {s.task} needs >= 4 non-noise tokens, got "
                     f"vocab_size={s.vocab_size}, noise_vocab_size={s.noise_vocab_size}")
  if s.seq_len % 2 or s.seq_len < 4:
    raise ValueError(f"TaskSetting.seq_len: {s.task} needs an even seq_len >= 4, got {s.seq_len}")


def _check_fuzzy(s: TaskSetting):
  ns = s.vocab_size - 1 - s.noise_vocab_size
  if ns // 2 < s.k_motif_size or ns - ns // 2 < s.v_motif_size:
    raise ValueError(f"TaskSetting.vocab_size: {s.vocab_size} leaves too few key/value tokens "
                     f"for motifs of {s.k_motif_size}/{s.v_motif_size} distinct tokens")
  kv = s.k_motif_size + s.v_motif_size
  if s.seq_len < 4 * kv + 2:
    raise ValueError(f"TaskSetting.seq_len: fuzzy recall needs seq_len >= {4 * kv + 2} for "
                     f"motifs of {s.k_motif_size}/{s.v_motif_size}, got {s.seq_len}")


def _check_copy(s: TaskSetting):
  if s.vocab_size < 3:
    raise ValueError(f"TaskSetting.vocab_size: selective copying needs >= 3, got {s.vocab_size}")
  if s.num_tokens_to_copy < 1 or s.seq_len <= 2 * s.num_tokens_to_copy + 1:
    raise ValueError(f"TaskSetting.num_tokens_to_copy: needs 1 <= n and seq_len > 2 n + 1, got "
                     f"n={s.num_tokens_to_copy}, seq_len={s.seq_len}")


def _check_compression(s: TaskSetting):
  if s.vocab_size < 2 or s.seq_len < 2:
    raise ValueError(f"TaskSetting.vocab_size/seq_len: compression needs both >= 2, got "
                     f"{s.vocab_size}, {s.seq_len}")


def _check_memorization(s: TaskSetting):
  if s.vocab_size < 4:
    raise ValueError(f"TaskSetting.vocab_size: memorization needs >= 4, got {s.vocab_size}")
  if s.seq_len % 2:
    raise ValueError(f"TaskSetting.seq_len: memorization needs an even seq_len, got {s.seq_len}")


_CHECKS: dict[str, Callable[[TaskSetting], None]] = {
    "in-context-recall": _check_recall, "noisy-in-context-recall": _check_recall,
    "fuzzy-in-context-recall": _check_fuzzy, "selective-copying": _check_copy,
    "compression": _check_compression, "memorization": _check_memorization,
}
_SHIFTED = ("in-context-recall", "noisy-in-context-recall")

# ----------------------------------------------------------------------------- settings

# MAD's configs/tasks/*.yml: the baseline, then each variable changed on its own.
_BASELINES = {
    "in-context-recall": dict(vocab_size=16, seq_len=128),
    "noisy-in-context-recall": dict(vocab_size=32, seq_len=128, noise_vocab_size=16,
                                    frac_noise=0.2),
    "fuzzy-in-context-recall": dict(vocab_size=16, seq_len=128, k_motif_size=3, v_motif_size=3),
    "selective-copying": dict(vocab_size=16, seq_len=256, num_tokens_to_copy=16),
    "compression": dict(vocab_size=16, seq_len=32),
    "memorization": dict(vocab_size=256, seq_len=32, num_train=256),
}
_TRAIN_SIZES = (6400, 3200, 1600, 800)
_CHANGES = {
    "in-context-recall": dict(vocab_size=(32, 64, 128), seq_len=(256, 512, 1024),
                              num_train=_TRAIN_SIZES),
    "noisy-in-context-recall": dict(vocab_size=(48, 80, 144), seq_len=(256, 512, 1024),
                                    num_train=_TRAIN_SIZES, frac_noise=(0.4, 0.6, 0.8)),
    "fuzzy-in-context-recall": dict(vocab_size=(32, 64, 128), seq_len=(256, 512, 1024),
                                    num_train=_TRAIN_SIZES),
    "selective-copying": dict(vocab_size=(32, 64, 128), seq_len=(512, 1024),
                              num_train=_TRAIN_SIZES, num_tokens_to_copy=(32, 64, 96)),
    "compression": dict(vocab_size=(32, 64, 128), seq_len=(64, 128, 256),
                        num_train=_TRAIN_SIZES),
    "memorization": dict(vocab_size=(512, 1024, 2048, 4096, 8192)),
}


def baseline(task: str) -> TaskSetting:
  """MAD's baseline setting of `task`."""
  if task not in TASKS:
    raise ValueError(f"task: unknown task {task!r}; expected one of {TASKS}")
  return TaskSetting(task=task, **_BASELINES[task])


def settings(task: str, difficulty: str = "baseline") -> list[TaskSetting]:
  """`difficulty`: 'baseline' (one setting) or 'all' (MAD's benchmark: the baseline and every
  single-variable change of its config; a task's MAD score averages over these)."""
  if difficulty not in SETTING_CHOICES:
    raise ValueError(f"difficulty: expected one of {SETTING_CHOICES}, got {difficulty!r}")
  base = baseline(task)
  out = [base]
  if difficulty == "all":
    for key, values in _CHANGES[task].items():
      out += [dataclasses.replace(base, **{key: v}, label=f"{key}={v}") for v in values]
  return out


# ----------------------------------------------------------------------------- generators

def _first_seen(keys: np.ndarray, real: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray]:
  """For pairs (keys [n, P], real [n, P] bool): (seen_before [n, P], presented [n, num_keys])."""
  onehot = (keys[..., None] == np.arange(num_keys)) & real[..., None]
  before = np.cumsum(onehot, axis=1) - onehot  # occurrences strictly earlier
  seen = np.take_along_axis(before, keys[..., None], axis=-1)[..., 0] > 0
  return seen & real, onehot.any(axis=1)


def _recall(rng: np.random.Generator, n: int, s: TaskSetting, train: bool):
  ns = s.vocab_size - s.noise_vocab_size
  nk = ns // 2
  pairs = s.seq_len // 2 - 1  # plus the final query pair
  out_x, out_y = [], []
  for start in range(0, n, 1024):  # bounded memory for long sequences / large vocabularies
    m = min(1024, n - start)
    keys = rng.integers(0, nk, (m, pairs))
    kv_map = rng.integers(nk, ns, (m, nk))  # a fresh map per sequence
    real = np.ones((m, pairs), bool)
    if s.frac_noise > 0:
      real = rng.random((m, pairs)) >= s.frac_noise
      real[np.arange(m), rng.integers(0, pairs, m)] = True  # at least one pair to query
    vals = np.take_along_axis(kv_map, keys, axis=1)
    noise = rng.integers(ns, max(s.vocab_size, ns + 1), (m, pairs, 2))  # unused without noise
    seen, presented = _first_seen(keys, real, nk)
    # The final pair queries a uniformly drawn key among those presented.
    probe = np.argmax(np.where(presented, rng.random((m, nk)), -1.0), axis=1)
    tok = np.where(real[..., None], np.stack([keys, vals], -1), noise).reshape(m, -1)
    tok = np.concatenate([tok, probe[:, None], kv_map[np.arange(m), probe][:, None]], axis=1)
    if train:
      out_x.append(tok[:, :-1])
      out_y.append(tok[:, 1:])
      continue
    tgt = np.full((m, pairs, 2), IGNORE)
    tgt[..., 1] = np.where(seen, vals, IGNORE)
    tgt = np.concatenate([tgt.reshape(m, -1), np.full((m, 1), IGNORE), tok[:, -1:]], axis=1)
    out_x.append(tok[:, :-1])
    out_y.append(tgt[:, 1:])
  return np.concatenate(out_x), np.concatenate(out_y)


class _Uniforms:
  """Uniform [0, 1) draws taken from `rng` in blocks (a Python-level loop over scalar
  `rng` calls would dominate the fuzzy-recall generator's time)."""

  def __init__(self, rng: np.random.Generator, block: int = 4096):
    self.rng, self.block, self.buf, self.i = rng, block, rng.random(block).tolist(), 0

  def __call__(self) -> float:
    if self.i == len(self.buf):
      self.buf, self.i = self.rng.random(self.block).tolist(), 0
    self.i += 1
    return self.buf[self.i - 1]

  def integer(self, lo: int, hi: int) -> int:
    return lo + min(int(self() * (hi - lo)), hi - lo - 1)

  def distinct(self, lo: int, hi: int, size: int) -> tuple[int, ...]:
    """`size` distinct tokens of [lo, hi), uniformly over ordered tuples (MAD draws one of
    all the permutations of that length)."""
    chosen: list[int] = []
    for j in range(size):
      t = self.integer(0, hi - lo - j)
      for c in sorted(chosen):  # skip the values already taken
        t += t >= c
      chosen.append(t)
    return tuple(lo + c for c in chosen)


def _fuzzy_one(u: _Uniforms, s: TaskSetting, train: bool):
  pad = s.vocab_size - 1
  ns = s.vocab_size - 1 - s.noise_vocab_size
  nk = ns // 2
  km, vm = s.k_motif_size, s.v_motif_size
  k_size = (lambda: u.integer(1, km + 1)) if train else (lambda: km)
  v_size = lambda: u.integer(1, vm + 1)
  key = lambda size: u.distinct(0, nk, size)
  value = lambda size: u.distinct(nk, ns, size)
  k_probe, v_probe = key(k_size()), value(v_size())
  probe_len = len(k_probe) + len(v_probe)
  fill_to = s.seq_len - probe_len - (km + vm)
  # Early enough that the fill loop always reaches it (see the module docstring).
  probe_at = u.integer(0, fill_to - (km + vm) + 1)
  kv_map = {k_probe: v_probe}
  seen: set[tuple[int, ...]] = set()
  probe_added = False
  x: list[int] = []
  y: list[int] = []
  while len(x) < fill_to:
    ks, vs = k_size(), v_size()
    if not probe_added and len(x) >= probe_at:
      k, v, probe_added = k_probe, v_probe, True
    elif s.frac_noise > 0 and u() < s.frac_noise:
      x += [u.integer(ns, ns + s.noise_vocab_size) for _ in range(ks + vs)]
      y += [IGNORE] * (ks + vs)
      continue
    else:
      k = key(ks)
      probe_added |= k == k_probe
      if k not in kv_map:
        kv_map[k] = value(vs)
      v = kv_map[k]
    x += list(k) + list(v)
    y += [IGNORE] * len(k) + (list(v) if k in seen else [IGNORE] * len(v))
    seen.add(k)
  x += list(k_probe) + list(v_probe)
  y += [IGNORE] * len(k_probe) + list(v_probe)
  n_pad = s.seq_len + 1 - len(x)
  x = np.array([pad] * n_pad + x)
  y = np.array([IGNORE] * n_pad + y)
  return (x[:-1], x[1:]) if train else (x[:-1], y[1:])


def _fuzzy(rng: np.random.Generator, n: int, s: TaskSetting, train: bool):
  u = _Uniforms(rng)
  xs, ys = zip(*(_fuzzy_one(u, s, train) for _ in range(n)))
  return np.stack(xs), np.stack(ys)


def _selective_copy(rng: np.random.Generator, n: int, s: TaskSetting, train: bool):
  del train  # the same targets in both splits
  m, length = s.num_tokens_to_copy, s.seq_len
  blank, copy = s.vocab_size - 2, s.vocab_size - 1
  blanks = length - 2 * m - 1
  tokens = rng.integers(0, s.vocab_size - 2, (n, m))
  # MAD inserts each blank before a uniformly drawn token: blanks before token j are a
  # multinomial count, and the last token always sits right before the copy token.
  before = rng.multinomial(blanks, np.full(m, 1.0 / m), size=n)
  pos = np.cumsum(before, axis=1) + np.arange(m)
  x = np.full((n, length), blank)
  np.put_along_axis(x, pos, tokens, axis=1)
  x[:, length - m - 1] = copy
  y = np.full((n, length), IGNORE)
  y[:, length - m:] = tokens
  return x, y


def _compression(rng: np.random.Generator, n: int, s: TaskSetting, train: bool):
  del train
  x = rng.integers(0, s.vocab_size - 1, (n, s.seq_len))
  x[:, -1] = s.vocab_size - 1
  return x, x.copy()


def memorization_map(rng: np.random.Generator, vocab_size: int) -> np.ndarray:
  """value[key] for keys [0, (V-1)/2): a random injection into the values [(V-1)/2, V-1)."""
  ns = vocab_size - 1
  return rng.permutation(np.arange(ns // 2, ns))[:ns // 2]


def _memorization(rng: np.random.Generator, n: int, s: TaskSetting, kv_map: np.ndarray):
  keys = rng.integers(0, len(kv_map), (n, s.seq_len // 2))
  x = np.stack([keys, np.full_like(keys, s.vocab_size - 1)], -1).reshape(n, -1)
  y = np.stack([np.full_like(keys, IGNORE), kv_map[keys]], -1).reshape(n, -1)
  return x, y


_GENERATORS = {
    "in-context-recall": _recall, "noisy-in-context-recall": _recall,
    "fuzzy-in-context-recall": _fuzzy, "selective-copying": _selective_copy,
    "compression": _compression,
}


def generate(rng: np.random.Generator, setting: TaskSetting, n: int, train: bool,
             kv_map: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """n examples (inputs, targets) [n, T] int32 of `setting`; `train` picks the training
  targets (next token for the recall tasks). Memorization needs its fixed `kv_map`."""
  if setting.task == "memorization":
    if kv_map is None:
      raise ValueError("kv_map: memorization needs the dataset's fixed map (memorization_map)")
    x, y = _memorization(rng, n, setting, kv_map)
  else:
    x, y = _GENERATORS[setting.task](rng, n, setting, train)
  return x.astype(np.int32), y.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Dataset:
  setting: TaskSetting
  seed: int
  train_inputs: np.ndarray
  train_targets: np.ndarray
  test_inputs: np.ndarray
  test_targets: np.ndarray
  kv_map: np.ndarray | None = None  # memorization only


def make_dataset(setting: TaskSetting, seed: int, *, num_train: int | None = None,
                 num_test: int | None = None) -> Dataset:
  """Train and test splits of `setting`, reproducible from `seed` (num_train / num_test
  override the setting's sizes, e.g. for a quick CPU run)."""
  ss = np.random.SeedSequence([seed, TASKS.index(setting.task)])
  rng = np.random.default_rng(ss)
  kv_map = memorization_map(rng, setting.vocab_size) if setting.task == "memorization" else None
  n_train = setting.num_train if num_train is None else num_train
  n_test = setting.num_test if num_test is None else num_test
  tx, ty = generate(rng, setting, n_train, True, kv_map)
  ex, ey = generate(rng, setting, n_test, False, kv_map)
  return Dataset(setting, seed, tx, ty, ex, ey, kv_map)
