"""MAD suite: generator invariants, MAD's accuracy, the model, the vmapped protocol, the CLI."""
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import parallax_jax as pj
from parallax_jax.mad import metrics, report, tasks, train
from parallax_jax.mad.model import MUON_ROUTING, MADModel, ModelConfig, init_params, member_spec
from parallax_jax.optim import muon, routing as rt

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


# ----------------------------------------------------------------------------- model

TINY = dict(width=16, num_heads=2, num_layers=1, dtype="float32", implementation="xla")


def test_member_spec():
  assert member_spec("parallax") == (None, "learned", "affine")
  assert member_spec("query:linear:inf") == (math.inf, "query", "linear")
  assert member_spec("learned:affine:4") == (4.0, "learned", "affine")
  assert member_spec("learned:affine:default") == (None, "learned", "affine")
  for bad in ("transformer", "learned", "learned:cubic", "learned:affine:-1", "none:constant:x"):
    with pytest.raises(ValueError, match="member"):
      member_spec(bad)
  with pytest.raises(ValueError, match="num_heads"):
    ModelConfig(vocab_size=8, seq_len=8, width=16, num_heads=3)
  with pytest.raises(ValueError, match="r_init"):
    ModelConfig(vocab_size=8, seq_len=8, r_init="ones")
  with pytest.raises(ValueError, match="ModelConfig.solver"):
    ModelConfig(vocab_size=8, seq_len=8, member="lla", solver="lu")
  with pytest.raises(ValueError, match="ModelConfig.solver: 'unrolled' is for head_dim"):
    ModelConfig(vocab_size=8, seq_len=8, member="lla", solver="unrolled", width=64, num_heads=1)
  ModelConfig(vocab_size=8, seq_len=8, member="softmax", solver="unrolled", width=64,
              num_heads=1)  # no solve, no limit


@pytest.mark.parametrize("backbone", ["lm", "autoencoder"])
def test_every_leaf_is_routed_and_only_hidden_matrices_get_muon(backbone):
  cfg = ModelConfig(vocab_size=11, seq_len=8, backbone=backbone, member="parallax", r_norm=True,
                    **TINY)
  params = init_params(cfg, 0)
  strict = dataclasses.replace(MUON_ROUTING, unmatched="error")
  labels = {rt.path_str(p): lab for p, lab in
            jax.tree_util.tree_flatten_with_path(rt.param_labels(params, strict))[0]}
  muon_paths = {p for p, lab in labels.items() if lab == rt.MUON}
  want = {f"layer_0/attn/{n}_proj/kernel" for n in "qkvro"}
  want |= {f"layer_1/mlp/{n}_proj/kernel" for n in ("gate", "up", "down")}
  if backbone == "autoencoder":
    want |= {"decoder_0/kernel", "decoder_1/kernel"}
  assert muon_paths == want
  assert labels["embed/embedding"] == labels["lm_head/kernel"] == rt.ADAM


def test_init_follows_mad():
  lm = init_params(ModelConfig(vocab_size=11, seq_len=8, member="parallax", **TINY), 0)
  q = lm["layer_0"]["attn"]["q_proj"]["kernel"]
  assert np.abs(q).max() <= 1 / math.sqrt(16) and np.std(q) > 0.5 / math.sqrt(3 * 16)
  o = lm["layer_0"]["attn"]["o_proj"]["kernel"]  # fan-in = heads x head_dim
  assert o.shape == (2, 8, 16) and np.abs(o).max() <= 1 / math.sqrt(16)
  assert (lm["layer_0"]["attn"]["r_proj"]["kernel"] == 0).all()
  assert (lm["layer_0"]["attn"]["q_proj"]["bias"] == 0).all()
  assert (lm["layer_0"]["norm"]["scale"] == 1).all()
  assert np.std(lm["embed"]["embedding"]) == pytest.approx(0.02, rel=0.3)
  ae = init_params(ModelConfig(vocab_size=11, seq_len=8, backbone="autoencoder", **TINY), 0)
  assert np.std(ae["layer_1"]["mlp"]["up_proj"]["kernel"]) == pytest.approx(0.02, rel=0.3)
  like_q = init_params(ModelConfig(vocab_size=11, seq_len=8, member="parallax", r_init="like_q",
                                   **TINY), 0)
  assert np.abs(like_q["layer_0"]["attn"]["r_proj"]["kernel"]).max() > 0
  # Shared leaves get the same values whatever the member.
  sm = init_params(ModelConfig(vocab_size=11, seq_len=8, member="softmax", **TINY), 0)
  np.testing.assert_array_equal(sm["layer_0"]["attn"]["q_proj"]["kernel"], q)


def test_members_run_and_zero_probe_parallax_is_softmax(rng):
  tokens = jnp.asarray(rng.integers(0, 11, (2, 8)), jnp.int32)
  members = ["softmax", "parallax", "lla", "linear", "mesa", "query:affine:4"]
  cfgs = {m: ModelConfig(vocab_size=11, seq_len=8, member=m, **TINY) for m in members}
  params = {m: init_params(c, 0) for m, c in cfgs.items()}
  out = jax.jit(lambda ps, t: {m: MADModel(cfgs[m]).apply({"params": ps[m]}, t)
                               for m in members})(params, tokens)
  for m in members:
    assert out[m].shape == (2, 8, 11) and bool(jnp.isfinite(out[m]).all()), m
  np.testing.assert_array_equal(out["parallax"], out["softmax"])
  assert not np.allclose(out["linear"], out["softmax"])
  # the probe's options: a scale on r and RoPE on r change a probe that is not zero
  like_q = dict(vocab_size=11, seq_len=8, member="parallax", r_init="like_q", **TINY)
  p = init_params(ModelConfig(**like_q), 0)
  outs = [MADModel(ModelConfig(**like_q, **kw)).apply({"params": p}, tokens)
          for kw in ({}, {"r_scale": 2.0}, {"r_rope": False})]
  assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[0], outs[2])
  with pytest.raises(ValueError, match="ModelConfig.r_scale"):
    ModelConfig(**dict(like_q, r_scale=0.0))


# ----------------------------------------------------------------------------- protocol

def test_cosine_schedule_is_pytorchs_per_epoch():
  lr = train.cosine_lr(1e-3, jnp.arange(4.0), 4, 1e-6)
  want = [1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
  np.testing.assert_allclose(lr, want, rtol=1e-6)


def _tree(rng):
  n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {"layer_0": {"attn": {"q_proj": {"kernel": n(6, 2, 3), "bias": n(2, 3)}}},
          "layer_1": {"mlp": {"up_proj": {"kernel": n(6, 5)}}}, "embed": {"embedding": n(7, 6)}}


@pytest.mark.parametrize("optimizer", train.OPTIMIZERS)
def test_step_outside_the_optimizer_equals_decoupled_weight_decay(optimizer, rng):
  params, lr, wd = _tree(rng), 3e-3, 0.1
  grads = [_tree(rng) for _ in range(3)]
  if optimizer == "adamw":
    ref = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd)
  else:
    ref = muon(lr, weight_decay=wd, adam_weight_decay=wd, adam_b1=0.9, adam_b2=0.999,
               routing=MUON_ROUTING)
  tx = train.direction(optimizer)
  p_ref, s_ref, p, s = params, ref.init(params), params, tx.init(params)
  for g in grads:
    u, s_ref = ref.update(g, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
    d, s = tx.update(g, s, p)
    p = jax.tree.map(lambda x, y: x + lr * y - lr * wd * x, p, d)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p, p_ref)



def test_w_r_ablations_route_and_scale_only_w_r(rng):
  """--r-adamw moves W_R's kernel (only) to Muon's AdamW group; --r-lr-mult scales W_R's
  kernel and bias (only); the defaults leave both as they were."""
  params = init_params(ModelConfig(vocab_size=11, seq_len=8, member="parallax", **TINY), 0)
  labels = lambda r_adamw: {rt.path_str(p): lab for p, lab in jax.tree_util.tree_flatten_with_path(
      rt.param_labels(params, train.muon_routing(r_adamw)))[0]}
  base, moved = labels(False), labels(True)
  assert base["layer_0/attn/r_proj/kernel"] == rt.MUON
  assert moved["layer_0/attn/r_proj/kernel"] == rt.ADAM
  assert {k for k in base if base[k] != moved[k]} == {"layer_0/attn/r_proj/kernel"}
  mults = {rt.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(
      train.lr_multipliers(params, train.Protocol(r_lr_mult=0.25)))[0]}
  assert {k for k, m in mults.items() if m != 1.0} == {"layer_0/attn/r_proj/kernel",
                                                       "layer_0/attn/r_proj/bias"}
  assert mults["layer_0/attn/r_proj/kernel"] == 0.25
  assert set(jax.tree.leaves(train.lr_multipliers(params, train.Protocol()))) == {1.0}
  with pytest.raises(ValueError, match="Protocol.r_lr_mult"):
    train.Protocol(r_lr_mult=-1.0)
  # through a compiled epoch: at r_lr_mult=0 W_R stays where it started, the rest moves
  setting = tasks.baseline("memorization")
  proto = train.Protocol(epochs=1, batch_size=8, steps_per_epoch=2, num_train=16, num_test=8,
                         lrs=(1e-2,), wds=(0.1,), r_lr_mult=0.0)
  cfg = train.model_config_for(setting, member="parallax", r_init="like_q", **TINY)
  data = train.device_data(setting, (0,), proto)
  prog = train.build_program(cfg, "adamw", proto, data, 1)
  p0 = jax.tree.map(lambda x: jnp.asarray(x)[None], init_params(cfg, 0))
  p1, _, _ = prog.epoch(jax.tree.map(jnp.copy, p0), prog.init(p0),
                        jax.random.split(jax.random.key(0), 1), jnp.zeros(1, jnp.int32),
                        jnp.full(1, 1e-2), jnp.full(1, 0.1), jnp.ones(1, bool), jnp.int32(0),
                        jnp.float32(1), *data.values())
  attn = lambda p: p["layer_0"]["attn"]
  np.testing.assert_array_equal(attn(p1)["r_proj"]["kernel"], attn(p0)["r_proj"]["kernel"])
  assert not np.allclose(attn(p1)["q_proj"]["kernel"], attn(p0)["q_proj"]["kernel"])


def test_a_program_over_the_memory_limit_trains_fewer_runs_a_call():
  """A sweep whose one-call memory plan exceeds the device's limit is compiled for half the
  runs a call until it fits; run_setting then trains it in that many calls."""
  setting = tasks.TaskSetting("compression", vocab_size=6, seq_len=8, num_train=16, num_test=8)
  protocol = train.Protocol(epochs=1, batch_size=8, lrs=(3e-3, 1e-3), wds=(0.0, 0.5))
  cfg = train.model_config_for(setting, **TINY, member="softmax")
  shapes = train.data_shapes(setting, 1, protocol)
  whole = train.build_program(cfg, "adamw", protocol, shapes, 4)
  assert whole.num_runs == 4 and whole.need_bytes >= whole.temp_bytes > 0
  logs = []
  prog = train.fitting_program(cfg, "adamw", protocol, shapes, 4, limit=whole.need_bytes,
                               log=logs.append)
  assert prog.num_runs < 4 and prog.need_bytes <= train.MEMORY_SHARE * whole.need_bytes
  # sized from one run's plan first (on a CPU every member takes the dense path)
  assert "one run plans" in logs[0] and "softmax/adamw" in logs[0], logs
  out = train.run_setting(setting, optimizer="adamw", seeds=(0,), protocol=protocol,
                          model_kwargs=dict(TINY, member="softmax"), program=prog)
  assert len(out["runs"]) == 4 and out["timing"]["runs_per_program"] == prog.num_runs

class _Scripted:
  """A stand-in Program whose epochs return given (acc, ppl) per run, to test the host side."""

  def __init__(self, acc, ppl):
    self.acc, self.ppl, self.calls = np.asarray(acc), np.asarray(ppl), []
    self.init = lambda params: {}
    self.steps_per_epoch = 1
    self.compile_s, self.temp_bytes = 0.0, None

  def epoch(self, params, opt, key, sidx, lr, wd, active, epoch, epochs, *data):
    self.calls.append(np.asarray(active).copy())
    e = int(epoch)
    return params, opt, {"acc": self.acc[e], "ppl": self.ppl[e], "acc_micro": self.acc[e],
                         "loss": self.ppl[e]}


def test_protocol_reads_accuracy_at_lowest_perplexity_and_stops_early():
  cfg = ModelConfig(vocab_size=5, seq_len=4, **TINY)
  protocol = train.Protocol(epochs=5, lrs=(1e-3, 1e-4), wds=(0.0,))
  # run 0 passes 0.999 at epoch 2 (stops); run 1 runs all 5 epochs, lowest ppl at epoch 1.
  acc = [[0.5, 0.9, 0.9995, 0.1, 0.1], [0.2, 0.6, 0.7, 0.8, 0.9]]
  ppl = [[3.0, 2.0, 1.5, 9.0, 9.0], [3.0, 1.1, 1.2, 1.3, 1.1]]
  prog = _Scripted(np.transpose(acc), np.transpose(ppl))
  part = [(0, 1e-3, 0.0), (0, 1e-4, 0.0), (0, 1e-4, 0.0)]  # the last is group padding
  done = []
  data = dict.fromkeys(("train_x", "train_y", "test_x", "test_y"))
  out = train._train_group(prog, cfg, part, 2, (7,), protocol, data, done.append)
  r0, r1 = out["runs"]
  assert (r0["acc"], r0["best_epoch"], r0["epochs_run"], r0["stopped_early"]) == (0.9995, 2, 3, True)
  assert (r1["acc"], r1["best_epoch"], r1["epochs_run"], r1["acc_max"]) == (0.6, 1, 5, 0.9)
  assert r0["seed"] == 7 and r1["lr"] == pytest.approx(1e-4)
  assert [c.tolist() for c in prog.calls[2:4]] == [[True, True, False], [False, True, False]]
  assert sum(done) == 5 and len(r0["history"]["acc"]) == 3
  # --sweep-stop: run 0 stopped above 0.999 at epoch 2, so its seed's other run stops with it.
  prog = _Scripted(np.transpose(acc), np.transpose(ppl))
  swept = dataclasses.replace(protocol, stop_sweep=True)
  r0, r1 = train._train_group(prog, cfg, part, 2, (7,), swept, data, None)["runs"]
  assert (r0["epochs_run"], r0["sweep_stopped"]) == (3, False)
  assert (r1["epochs_run"], r1["sweep_stopped"], r1["acc"]) == (3, True, 0.6)
  assert len(prog.calls) == 3


def test_vmapped_runs_do_not_interact_and_are_recorded():
  # One compile for the whole test: CPU compiles cost seconds.
  setting = tasks.TaskSetting("compression", vocab_size=6, seq_len=8, num_train=24, num_test=8)
  protocol = train.Protocol(epochs=2, batch_size=8, lrs=(3e-3, 1e-3), wds=(0.0, 0.5))
  kwargs = dict(TINY, member="parallax", r_init="like_q")
  prog = train.compile_program(setting, optimizer="adamw", seeds=(0,), protocol=protocol,
                               model_kwargs=kwargs)
  data = train.device_data(setting, (0,), protocol)
  cfg = train.model_config_for(setting, **kwargs)
  grid = train.sweep((0,), protocol)
  a = train._train_group(prog, cfg, grid, 4, (0,), protocol, data, None)["runs"]
  b = train._train_group(prog, cfg, grid[::-1], 4, (0,), protocol, data, None)["runs"]
  for x, y in zip(a, b[::-1]):
    assert (x["lr"], x["wd"]) == (y["lr"], y["wd"])
    np.testing.assert_allclose(x["history"]["loss"], y["history"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(x["history"]["ppl"], y["history"]["ppl"], rtol=1e-5)
  losses = {tuple(r["history"]["loss"]) for r in a}
  assert len(losses) == 4  # each (lr, wd) trained differently
  # A stopped run keeps its parameters; the others move.
  init = init_params(cfg, 0)
  params = jax.tree.map(lambda x: jnp.asarray(np.stack([x] * 4)), init)
  active = jnp.array([True, False, True, False])
  new, _, _ = prog.epoch(params, prog.init(params), jnp.stack([jax.random.key(0)] * 4),
                         jnp.zeros(4, jnp.int32), jnp.full(4, 1e-3), jnp.zeros(4), active,
                         jnp.int32(0), jnp.float32(2), *data.values())
  q = new["layer_0"]["attn"]["q_proj"]["kernel"]
  q0 = init["layer_0"]["attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(q[1], q0)
  np.testing.assert_array_equal(q[3], q0)
  assert not np.allclose(q[0], q0)
  # run_setting with the same program and data: every run recorded.
  out = train.run_setting(setting, optimizer="adamw", seeds=(0,), protocol=protocol,
                          model_kwargs=kwargs, program=prog, data=data)
  assert len(out["runs"]) == 4 and out["timing"]["epochs_run"] == 2
  for r in out["runs"]:
    assert r["task"] == "compression" and r["member"] == "parallax"
    assert 0 <= r["acc"] <= 1 and math.isfinite(r["ppl"]) and len(r["history"]["loss"]) == 2
  sc = report.scores(out["runs"])
  assert sc["parallax/adamw"]["compression"]["mean"] == max(r["acc"] for r in out["runs"])
  with pytest.raises(ValueError, match="optimizer"):
    train.run_setting(setting, optimizer="sgd", seeds=(0,), protocol=protocol)


def test_scores_best_of_sweep_then_mean_over_settings_and_seeds():
  runs = []
  for seed, base in ((0, 0.5), (1, 0.7)):
    for setting, bump in (("baseline", 0.0), ("vocab_size=32", -0.2)):
      for lr, extra in ((1e-3, 0.1), (1e-4, 0.0)):
        runs.append(dict(member="parallax", optimizer="muon", task="compression", setting=setting,
                         seed=seed, lr=lr, wd=0.0, acc=base + bump + extra, acc_micro=0.0))
  s = report.scores(runs)["parallax/muon"]
  assert s["compression"]["per_seed"] == {0: pytest.approx(0.5), 1: pytest.approx(0.7)}
  assert s["compression"]["mean"] == pytest.approx(0.6)
  assert s["compression"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
  assert s["average"]["mean"] == pytest.approx(0.6)
  # A sweep that only diverged (no finite perplexity, acc NaN) is a failed task, scored 0,
  # not a missing one that would leave the average to the other tasks.
  div = [dict(r, member="softmax", task="memorization", acc=math.nan) for r in runs] + \
      [dict(r, member="softmax") for r in runs]
  s = report.scores(div)["softmax/muon"]
  assert s["memorization"]["mean"] == 0.0 and s["average"]["mean"] == pytest.approx(0.3)


def test_results_are_replaced_whole_and_merge_refuses_other_setups(tmp_path):
  from parallax_jax.mad import __main__ as cli
  good = {"meta": {"tag": "t", "protocol": {}, "model": {}, "seeds": 1, "settings": "baseline",
                   "task_epochs": {"memorization": 3}}, "programs": [], "runs": []}
  report.write(good, str(tmp_path), "t", png=False)
  with pytest.raises(TypeError):  # a write that fails leaves the last complete file
    report.write(dict(good, meta={**good["meta"], "bad": object()}), str(tmp_path), "t",
                 png=False)
  assert json.loads((tmp_path / "mad_t.json").read_text())["meta"] == good["meta"]
  for name, change, says in (("e", {"task_epochs": {"memorization": 1}},
                              "task_epochs.memorization: 3 in mad_t.json, 1 in e.json"),
                             ("s", {"seeds": 2}, "seeds: 1 in mad_t.json, 2 in s.json")):
    (tmp_path / f"{name}.json").write_text(json.dumps(dict(good, meta={**good["meta"], **change})))
    with pytest.raises(SystemExit, match=says):
      cli.main(["--merge", str(tmp_path / "mad_t.json"), str(tmp_path / f"{name}.json"),
                "--out", str(tmp_path), "--tag", "m"])


def test_quick_fills_only_what_is_unset_and_settings_are_not_repeated(tmp_path):
  from parallax_jax.mad import __main__ as cli
  a = cli.parse_args(["--quick", "--epochs", "5", "--out", str(tmp_path)])
  assert (a.epochs, a.batch_size, a.steps_per_epoch) == (5, 16, 2)
  a = cli.parse_args(["--quick", "--settings", "all", "--out", str(tmp_path)])
  kept = cli._distinct_settings("compression", a)
  assert len(kept) < len(tasks.settings("compression", "all"))  # the num_train settings
  assert not any(s.label.startswith("num_train") for s in kept)
  assert len(cli._distinct_settings("compression", cli.parse_args(
      ["--settings", "all", "--out", str(tmp_path)]))) == len(tasks.settings("compression", "all"))


def test_lr_positions_count_edges_ties_and_solved_sweeps():
  def run(seed, lr, acc, wd=0.0, task="compression"):
    return dict(member="softmax", optimizer="adamw", task=task, setting="baseline", seed=seed,
                lr=lr, wd=wd, acc=acc)
  runs = [run(0, 1e-4, 0.5), run(0, 1e-3, 0.6), run(0, 1e-3, 0.7, wd=0.1),   # top (best wd)
          run(1, 1e-4, 0.8), run(1, 1e-3, 0.6),                              # bottom
          run(2, 1e-4, 0.5), run(2, 5e-4, 0.9), run(2, 1e-3, 0.6),           # inside
          run(3, 1e-4, 0.9), run(3, 1e-3, 0.9005),                           # tie
          run(4, 1e-4, 0.2), run(4, 1e-3, 1.0)]                              # solved
  assert report.lr_positions(runs)["softmax/adamw"] == dict(
      bottom=1, inside=1, top=1, tie=1, solved=1)


def test_cli_smoke_writes_json_table_and_chart(tmp_path):
  from parallax_jax.mad.__main__ import main
  args = ["--quick", "--tasks", "memorization", "--members", "parallax", "--optimizers", "muon",
          "--seeds", "1", "--lrs", "1e-3", "--wds", "0,0.1", "--width", "16", "--heads", "2",
          "--layers", "1", "--out", str(tmp_path), "--tag", "smoke", "--no-progress",
          "--compile-threads", "1"]
  result = main(args)
  for ext in ("json", "md", "png"):
    assert os.path.getsize(tmp_path / f"mad_smoke.{ext}") > 0
  saved = json.loads((tmp_path / "mad_smoke.json").read_text())
  assert len(saved["runs"]) == 2 and len(saved["programs"]) == 1
  assert set(saved["scores"]) == {"parallax/muon"}
  assert "| memorization |" in (tmp_path / "mad_smoke.md").read_text()
  assert saved["programs"][0]["attention"] == "xla"  # the library's choice on a CPU
  assert result["meta"]["protocol"]["epochs"] == 2
  # Merging: runs of another command (here the same runs relabelled) join the table.
  other = dict(saved, runs=[dict(r, member="softmax") for r in saved["runs"]])
  other["meta"] = dict(saved["meta"], protocol=dict(saved["meta"]["protocol"], lrs=[2e-3],
                                                     stop_sweep=True))
  (tmp_path / "other.json").write_text(json.dumps(other))
  merged = main(["--merge", str(tmp_path / "mad_smoke.json"), str(tmp_path / "other.json"),
                 "--out", str(tmp_path), "--tag", "merged"])
  assert len(merged["runs"]) == 4 and set(merged["scores"]) == {"parallax/muon", "softmax/muon"}
  assert "softmax/muon" in (tmp_path / "mad_merged.md").read_text()
  assert merged["meta"]["protocol"]["lrs"] == [1e-3, 2e-3]  # the union of the parts' grids
  # --sweep-stop in one part only: the header says so (the first part's protocol lacked it)
  assert "in the commands with --sweep-stop" in (tmp_path / "mad_merged.md").read_text()
  # A merged file merged again keeps the commands it came from.
  again = main(["--merge", str(tmp_path / "mad_merged.json"), str(tmp_path / "mad_smoke.json"),
                "--out", str(tmp_path), "--tag", "again"])
  assert len(again["meta"]["commands"]) == 3 and None not in again["meta"]["commands"]
  assert again["meta"]["merged_from"] == ["mad_smoke.json", "other.json", "mad_smoke.json"]
  # runs of another model would share a label in the table: refused
  bad = dict(other, meta=dict(other["meta"], model=dict(other["meta"]["model"], r_scale=0.5)))
  (tmp_path / "bad.json").write_text(json.dumps(bad))
  with pytest.raises(SystemExit, match=r"mad_smoke.json and bad.json ran other setups "
                     r"\(model.r_scale: 1.0 in mad_smoke.json, 0.5 in bad.json\)"):
    main(["--merge", str(tmp_path / "mad_smoke.json"), str(tmp_path / "bad.json"),
          "--out", str(tmp_path), "--tag", "bad"])
  with pytest.raises(SystemExit):
    main(["--members", "transformer"])


@pytest.mark.parametrize("args,says", [
    (["--heads", "3"], "--heads: must divide --width (128), got 3"),
    (["--members", "lla", "--implementation", "pallas"], "--implementation: 'pallas' runs"),
    (["--members", "lla", "--solver", "unrolled", "--width", "1024", "--heads", "2"],
     "--solver: 'unrolled' is for head_dim <= 32"),
    (["--lrs=-1"], "--lrs: must be a non-empty list of finite rates > 0"),
    (["--merge", "missing.json"], "--merge: no result file 'missing.json'"),
    (["--r-scale", "0"], "--r-scale: must be a finite number > 0"),
    (["--r-lr-mult=-1"], "--r-lr-mult: must be a finite number >= 0"),
    (["--r-adamw", "--optimizers", "adamw"], "--r-adamw: changes Muon's routing of W_R"),
    (["--members", "softmax", "--r-norm"], "--r-norm: changes members with a learned probe"),
    (["--epochs", "0"], "--epochs: must be an int >= 1, got 0"),
    (["--group-size", "0"], "--group-size: must be an int >= 1 or None, got 0"),
    (["--lrs", "0"], "--lrs: must be a non-empty list of finite rates > 0"),
    (["--wds", "inf"], "--wds: must be a non-empty list of finite decays >= 0"),
    (["--ridge", "inf"], "--ridge: must be a finite number >= 0"),
    (["--members", ","], "--members: empty list"),
    (["--tag", "a/b"], "--tag: a file name part"),
    (["--members", "softmax", "--implementation", "pallas"], "--implementation: 'pallas' needs"),
    (["--out", "/proc/no/such/dir"], "--out: cannot write in '/proc/no/such/dir'"),
])
def test_cli_bad_input_is_one_line_before_any_compile(args, says, capsys):
  from parallax_jax.mad.__main__ import main
  with pytest.raises(SystemExit) as e:
    main(args)
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and says in err[0], err


def test_cli_rerun_resumes_and_refuses_another_setup(tmp_path, capsys):
  from parallax_jax.mad.__main__ import main
  args = ["--quick", "--tasks", "memorization", "--members", "softmax", "--seeds", "1",
          "--lrs", "1e-3", "--wds", "0", "--width", "16", "--heads", "2", "--layers", "1",
          "--out", str(tmp_path), "--tag", "r", "--no-progress", "--compile-threads", "1"]
  first = main(args)
  # An interrupted suite rerun with more jobs: the finished program is kept, not retrained.
  second = main(args[:4] + ["softmax,parallax"] + args[5:])
  assert "1 of this command's 2 programs are done" in capsys.readouterr().out
  assert [p["member"] for p in second["programs"]] == ["softmax", "parallax"]
  assert second["runs"][0] == first["runs"][0]
  assert second["meta"]["members"] == ["softmax", "parallax"]
  assert len(second["meta"]["commands"]) == 2
  assert main(args)["runs"] == second["runs"]  # nothing left to do
  # a file written before the W_R options existed resumes: it ran with their defaults
  path = tmp_path / "mad_r.json"
  old = json.loads(path.read_text())
  for key, sub in (("model", ("r_scale", "r_rope")), ("protocol", ("r_lr_mult", "r_adamw"))):
    for k in sub:
      del old["meta"][key][k]
  path.write_text(json.dumps(old))
  assert main(args)["runs"] == second["runs"]
  with pytest.raises(SystemExit, match=r"model.r_scale: 1.0 there, 0.5 now"):
    main(args[:4] + ["softmax,parallax"] + args[5:] + ["--r-scale", "0.5"])
  with pytest.raises(SystemExit, match=r"protocol.lrs: \[0.001\] there, \[0.002\] now"):
    main(args[:8] + ["2e-3"] + args[9:])
  assert len(main(args + ["--fresh"])["runs"]) == 1  # starts over


@pytest.mark.slow
def test_cli_quick_all_tasks_default_model(tmp_path):
  from parallax_jax.mad.__main__ import main
  result = main(["--quick", "--tasks", "all", "--members", "parallax", "--optimizers", "muon",
                 "--seeds", "1", "--out", str(tmp_path), "--no-progress", "--compile-threads", "1"])
  assert set(result["scores"]["parallax/muon"]) == set(tasks.TASKS) | {"average"}


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


@pytest.mark.parametrize("interpret", [
    pytest.param(True, marks=pytest.mark.slow),
    pytest.param(False, marks=[pytest.mark.gpu, pytest.mark.skipif(
        jax.default_backend() != "gpu", reason="needs a GPU")]),
])
def test_fused_kernels_under_vmap_match_dense(interpret, rng):
  """The GPU runs vmap the Pallas kernels over the sweep (MAD's head_dim 8 is padded to 16)."""
  from pallas_kernels import parallax_flash_attention
  dt = jnp.float32 if interpret else jnp.bfloat16
  q, k, v, r = (jnp.asarray(rng.standard_normal((3, 2, 32, 4, 8)), dt) for _ in range(4))
  r = 0.3 * r
  scale = jnp.full((4,), 8 ** -0.5)  # the family API hands the kernel a per-head array
  fused = lambda q, k, v, r: parallax_flash_attention(q, k, v, r, scale=scale,
                                                     interpret=interpret)
  dense = jax.vmap(lambda *a: pj.parallax_attention(*a, implementation="xla"))
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2)
  got = jax.jit(jax.grad(loss(jax.vmap(fused)), argnums=(0, 1, 2, 3)))(q, k, v, r)
  want = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2, 3)))(q, k, v, r)
  tol = 1e-5 if interpret else 5e-2
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=tol * float(jnp.abs(b).max()), rtol=tol)
