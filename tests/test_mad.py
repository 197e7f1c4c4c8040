"""MAD suite: generator invariants and MAD's accuracy."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallax_jax.mad import metrics, tasks

IGNORE = tasks.IGNORE


def _data(task, n=200, seed=0, **changes):
  s = dataclasses.replace(tasks.baseline(task), **changes)
  return s, tasks.make_dataset(s, seed, num_train=n, num_test=n)


# ----------------------------------------------------------------------------- settings

def test_settings_follow_mads_configs():
  b = {t: tasks.baseline(t) for t in tasks.TASKS}
  assert (b["in-context-recall"].vocab_size, b["in-context-recall"].seq_len) == (16, 128)
  assert (b["noisy-in-context-recall"].vocab_size, b["noisy-in-context-recall"].noise_vocab_size,
          b["noisy-in-context-recall"].frac_noise) == (32, 16, 0.2)
  assert (b["fuzzy-in-context-recall"].k_motif_size, b["fuzzy-in-context-recall"].v_motif_size) == (3, 3)
  assert (b["selective-copying"].seq_len, b["selective-copying"].num_tokens_to_copy) == (256, 16)
  assert (b["compression"].vocab_size, b["compression"].seq_len) == (16, 32)
  assert (b["memorization"].vocab_size, b["memorization"].seq_len, b["memorization"].num_train) == (256, 32, 256)
  assert all(s.num_test == 1280 for s in b.values())
  counts = {t: len(tasks.settings(t, "all")) for t in tasks.TASKS}
  assert counts == {"in-context-recall": 11, "noisy-in-context-recall": 14,
                    "fuzzy-in-context-recall": 11, "selective-copying": 13, "compression": 11,
                    "memorization": 6}
  for t in tasks.TASKS:
    labels = [s.label for s in tasks.settings(t, "all")]
    assert labels[0] == "baseline" and len(set(labels)) == len(labels)
  assert tasks.settings("in-context-recall")[0] == b["in-context-recall"]
  assert b["in-context-recall"].length == 127 and b["fuzzy-in-context-recall"].length == 128


@pytest.mark.parametrize("call, match", [
    (lambda: tasks.settings("in-context-recall", "hard"), "difficulty"),
    (lambda: tasks.baseline("copying"), "task"),
    (lambda: tasks.TaskSetting("in-context-recall", vocab_size=16, seq_len=127), "seq_len"),
    (lambda: tasks.TaskSetting("noisy-in-context-recall", 32, 128, frac_noise=1.0), "frac_noise"),
    (lambda: tasks.TaskSetting("noisy-in-context-recall", 32, 128, frac_noise=0.2), "noise_vocab_size"),
    (lambda: tasks.TaskSetting("selective-copying", 16, 32, num_tokens_to_copy=16), "num_tokens_to_copy"),
    (lambda: tasks.TaskSetting("compression", 0, 32), "vocab_size"),
    (lambda: tasks.generate(np.random.default_rng(0), tasks.baseline("memorization"), 4, True), "kv_map"),
])
def test_bad_settings_raise_naming_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ----------------------------------------------------------------------------- generators

def _recall_pairs(x, y):
  """Full token sequence (the last token lives only in the targets) and its pairs."""
  full = np.concatenate([x, y[-1:]])
  return full.reshape(-1, 2)


@pytest.mark.parametrize("task", ["in-context-recall", "noisy-in-context-recall"])
def test_recall_scores_only_values_of_keys_seen_before(task):
  s, d = _data(task)
  ns = s.vocab_size - s.noise_vocab_size
  nk = ns // 2
  assert d.test_inputs.shape == (200, s.seq_len - 1)
  np.testing.assert_array_equal(d.train_inputs[:, 1:], d.train_targets[:, :-1])  # next token
  noise_pairs = total_pairs = 0
  maps = []
  for x, y in zip(d.test_inputs, d.test_targets):
    pairs = _recall_pairs(x, y)
    kv, first_map = {}, {}
    for j, (k, v) in enumerate(pairs):
      target = y[2 * j]  # predicted while reading the key
      total_pairs += 1
      if k >= ns:  # noise pair: both tokens noise, never scored
        assert v >= ns and target == IGNORE
        noise_pairs += 1
        continue
      assert 0 <= k < nk <= v < ns
      if k in kv:
        assert kv[k] == v and target == v  # multi-query: every repeat is scored, correctly
      else:
        assert target == IGNORE
        kv[k] = v
        first_map[k] = v
    assert y[-1] != IGNORE  # the final query pair is always scored
    assert set(np.flatnonzero(y != IGNORE)) <= set(range(0, len(y), 2))
    maps.append(first_map)
  # A fresh key->value map per sequence: some key gets different values in different ones.
  assert any(a.get(k) not in (None, v) for a, b in zip(maps, maps[1:]) for k, v in b.items())
  # 63 pairs before the query, one of them kept real: 62 candidates for noise out of 64.
  frac = noise_pairs / total_pairs
  assert (abs(frac - s.frac_noise * 62 / 64) < 0.015) if s.frac_noise else frac == 0


def _runs(seq, lo, hi):
  """Maximal runs of tokens in [lo, hi) as (start, tokens) pairs."""
  out, cur, start = [], [], 0
  for i, t in enumerate(seq):
    if lo <= t < hi:
      if not cur:
        start = i
      cur.append(int(t))
    elif cur:
      out.append((start, tuple(cur)))
      cur = []
  if cur:
    out.append((start, tuple(cur)))
  return out


def test_fuzzy_recall_keys_and_values_of_1_to_3_tokens():
  s, d = _data("fuzzy-in-context-recall")
  pad, ns = s.vocab_size - 1, s.vocab_size - 1
  nk = ns // 2
  train_key_sizes = set()
  for x in d.train_inputs:
    train_key_sizes |= {len(k) for _, k in _runs(x, 0, nk)}
  assert train_key_sizes == {1, 2, 3}
  np.testing.assert_array_equal(d.train_inputs[:, 1:], d.train_targets[:, :-1])
  for x, y in zip(d.test_inputs, d.test_targets):
    full = np.concatenate([x, y[-1:]])
    n_pad = int(np.argmax(full != pad))
    assert n_pad >= 1 and (full[:n_pad] == pad).all() and (full[n_pad:] != pad).all()
    keys, vals = _runs(full, 0, nk), _runs(full, nk, ns)
    assert len(keys) == len(vals) and all(ks < vs for (ks, _), (vs, _) in zip(keys, vals))
    kv = {}
    for (_, k), (vs, v) in zip(keys, vals):
      assert len(k) == 3 and len(set(k)) == 3 and 1 <= len(v) <= 3 and len(set(v)) == len(v)
      scored = y[vs - 1:vs - 1 + len(v)]  # value token t is predicted at position t - 1
      if k in kv:
        assert kv[k] == v
        np.testing.assert_array_equal(scored, v)
      else:
        assert (scored == IGNORE).all()
        kv[k] = v
    assert keys[-1][1] in {k for _, k in keys[:-1]}  # the final query's key was shown
    assert np.count_nonzero(y != IGNORE) == sum(
        len(v) for i, ((_, k), (_, v)) in enumerate(zip(keys, vals))
        if k in {kk for _, kk in keys[:i]})


def test_selective_copy_targets_are_the_tokens_in_order():
  s, d = _data("selective-copying")
  m, L, blank, copy = s.num_tokens_to_copy, s.seq_len, s.vocab_size - 2, s.vocab_size - 1
  for x, y in [(d.train_inputs, d.train_targets), (d.test_inputs, d.test_targets)]:
    assert x.shape[1] == L
    assert (x[:, L - m - 1] == copy).all() and (x[:, L - m:] == blank).all()
    assert (y[:, :L - m] == IGNORE).all()
    data = x[:, :L - m - 1]
    assert (data != copy).all()
    for row, tgt in zip(data, y[:, L - m:]):
      np.testing.assert_array_equal(row[row != blank], tgt)
    assert (data[:, -1] != blank).all()  # MAD inserts blanks only before tokens
  np.testing.assert_array_equal(d.test_targets[0] != IGNORE, d.train_targets[0] != IGNORE)


def test_compression_targets_are_the_inputs():
  s, d = _data("compression")
  for x, y in [(d.train_inputs, d.train_targets), (d.test_inputs, d.test_targets)]:
    np.testing.assert_array_equal(x, y)
    assert (x[:, -1] == s.vocab_size - 1).all() and (x[:, :-1] < s.vocab_size - 1).all()
  assert s.backbone == "autoencoder"


def test_memorization_is_one_fixed_map():
  s, d = _data("memorization", n=300)
  nk = (s.vocab_size - 1) // 2
  assert len(d.kv_map) == nk and len(set(d.kv_map.tolist())) == nk
  assert ((nk <= d.kv_map) & (d.kv_map < s.vocab_size - 1)).all()
  for x, y in [(d.train_inputs, d.train_targets), (d.test_inputs, d.test_targets)]:
    assert (x[:, 1::2] == s.vocab_size - 1).all() and (y[:, ::2] == IGNORE).all()
    np.testing.assert_array_equal(y[:, 1::2], d.kv_map[x[:, ::2]])
  other = tasks.make_dataset(s, 1, num_train=4, num_test=4)
  assert (other.kv_map != d.kv_map).any()


@pytest.mark.parametrize("task", tasks.TASKS)
def test_datasets_are_reproducible_from_the_seed(task):
  s = tasks.baseline(task)
  a, b, c = (tasks.make_dataset(s, seed, num_train=16, num_test=16) for seed in (3, 3, 4))
  for name in ("train_inputs", "train_targets", "test_inputs", "test_targets"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert getattr(a, name).dtype == np.int32
    assert getattr(a, name).shape == (16, s.length)
  assert (a.test_inputs != c.test_inputs).any()


# ----------------------------------------------------------------------------- metrics

def _torchmetrics_macro(pred, target, num_classes):
  """MulticlassAccuracy(average='macro', ignore_index=-100), written out from its definition."""
  keep = target != IGNORE
  p, t = pred[keep], target[keep]
  recalls = []
  for c in range(num_classes):
    tp, fn, fp = np.sum((p == c) & (t == c)), np.sum((p != c) & (t == c)), np.sum((p == c) & (t != c))
    if tp + fn + fp:
      recalls.append(tp / (tp + fn) if tp + fn else 0.0)
  return np.mean(recalls) if recalls else 0.0


def test_macro_accuracy_is_torchmetrics_default(rng):
  # Class 2 is predicted but never a target: it counts as 0, so (1/2 + 1 + 0) / 3; class 3 is
  # predicted only at an ignored position and does not count.
  t = jnp.array([[0, 0, 1, IGNORE]])
  p = jnp.array([[0, 2, 1, 3]])
  assert float(metrics.macro_accuracy(p, t, 4)) == pytest.approx(0.5)
  assert float(jnp.divide(*metrics.micro_counts(p, t))) == pytest.approx(2 / 3)
  for _ in range(5):
    target = rng.integers(0, 6, (4, 9))
    target[rng.random(target.shape) < 0.3] = IGNORE
    pred = np.where(rng.random(target.shape) < 0.6, np.maximum(target, 0), rng.integers(0, 8, target.shape))
    got = float(metrics.macro_accuracy(jnp.asarray(pred), jnp.asarray(target), 8))
    assert got == pytest.approx(_torchmetrics_macro(pred, target, 8), abs=1e-6)


def test_batch_metrics_perplexity_and_ignore(rng):
  logits = jnp.asarray(rng.standard_normal((2, 5, 7)), jnp.float32)
  target = jnp.array([[1, 2, IGNORE, 3, 0], [IGNORE] * 5])
  m = metrics.batch_metrics(logits, target, 7)
  lp = jax.nn.log_softmax(logits)
  nll = -np.mean([lp[0, i, int(target[0, i])] for i in (0, 1, 3, 4)])
  assert float(m["ppl"]) == pytest.approx(math.exp(nll), rel=1e-5)
  assert int(m["scored"]) == 4


def test_macro_accuracy_equals_torchmetrics(rng):
  """Against the library MAD scores with, where it is installed (not in CI)."""
  torch = pytest.importorskip("torch")
  tm = pytest.importorskip("torchmetrics.classification")
  for _ in range(5):
    target = rng.integers(0, 10, (8, 16))
    target[rng.random(target.shape) < 0.4] = IGNORE
    pred = np.where(rng.random(target.shape) < 0.5, np.maximum(target, 0),
                    rng.integers(0, 12, target.shape))
    want = tm.MulticlassAccuracy(num_classes=12, ignore_index=IGNORE)(
        torch.as_tensor(pred).reshape(-1), torch.as_tensor(target).reshape(-1))
    got = metrics.macro_accuracy(jnp.asarray(pred), jnp.asarray(target), 12)
    assert float(got) == pytest.approx(float(want), abs=1e-6)
