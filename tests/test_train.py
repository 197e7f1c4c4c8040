"""Training loop: config/CLI, schedule, data pipeline, mesh rules, step, checkpoints, resume.

Everything runs a 2-layer d=64 model on a ~0.25 MB slice of the Python stdlib (BPE 320).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal

import jax
import numpy as np
import pytest

from parallax_jax.models import presets
from parallax_jax.nn.layers import LOGICAL_AXIS_NAMES
from train import data as data_lib
from train.config import (DataConfig, MeshConfig, OptimizerConfig, RunConfig, ScheduleConfig,
                          TrainConfig, apply_overrides, flat_keys, load_config_file)
from train.schedule import wsd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 320
pytestmark = pytest.mark.usefixtures("compile_cache")


def small_config(data_path: str, out_dir: str, **run_kw) -> TrainConfig:
  run = dict(steps=6, out_dir=out_dir, log_every=1, eval_every=0, diag_every=0,
             checkpoint_every=0, keep_checkpoints=3, progress=False, sample_lines=0)
  run.update(run_kw)
  return TrainConfig(
      name="test",
      model=presets.tiny(vocab_size=VOCAB, max_seq_len=64, implementation="xla"),
      mesh=MeshConfig(data=1),
      data=DataConfig(path=data_path, seq_len=32, global_batch_size=4, prefetch=2,
                      eval_batches=1, auto_prepare=False),
      optimizer=OptimizerConfig(name="muon", lr=1e-2),
      schedule=ScheduleConfig(warmup_steps=2, decay_fraction=0.5),
      run=RunConfig(**run))


# --------------------------------------------------------------------------- config / CLI
def test_overrides_parse_to_field_types():
  cfg = apply_overrides(TrainConfig(), ["optimizer.lr=3e-3", "model.num_layers=4",
                                        "optimizer.adam_lr=none", "run.resume=false",
                                        "model.bandwidth=inf", "model.window=none"])
  assert cfg.optimizer.lr == 3e-3 and cfg.model.num_layers == 4
  assert cfg.optimizer.adam_lr is None and cfg.run.resume == "never"
  assert cfg.model.bandwidth == float("inf") and cfg.model.window is None
  # `str | tuple[str, ...]`: one policy, or a comma list of one per layer
  cfg = apply_overrides(TrainConfig(), ["model.num_layers=2", "model.remat_policy=none,full"])
  assert cfg.model.remat_policy == ("none", "full")
  assert apply_overrides(cfg, ["model.remat_policy=full"]).model.remat_policy == "full"


@pytest.mark.parametrize("item, match", [
    ("optimizer.bogus=1", "optimizer.bogus: unknown key"),
    ("nope.lr=1", "nope: unknown key"),
    ("optimizer.lr=abc", "optimizer.lr: expected a number"),
    ("optimizer.lr=-1", "optimizer.lr: must be > 0"),
    ("optimizer.name=sgd", "optimizer.name: unknown value"),
    ("schedule.decay_shape=exp", "schedule.decay_shape"),
    ("data.grad_accum=3", "data.grad_accum: must divide"),
    ("run.resume=maybe", "run.resume: unknown value"),
    ("model.num_heads=3", "model.num_kv_heads: num_heads"),
    ("model.attention=parralax", "model.attention: unknown value .parralax."),
    ("optimizer=1", "is a section"),
    ("optimizer.lr", "expected key=value"),
])
def test_bad_overrides_name_the_key(item, match):
  with pytest.raises(ValueError, match=match):
    apply_overrides(TrainConfig(), [item])


def test_cli_help_lists_every_key_and_bad_values_fail_fast(capsys):
  from train.__main__ import main
  with pytest.raises(SystemExit):
    main(["--config", os.path.join(REPO, "configs/tiny.py"), "--help"])
  out = capsys.readouterr().out
  for key, _, _ in flat_keys(load_config_file(os.path.join(REPO, "configs/tiny.py"))):
    assert key in out
  assert main(["--config", os.path.join(REPO, "configs/tiny.py"), "--set",
               "optimizer.lr=x"]) == 2
  assert "optimizer.lr" in capsys.readouterr().err


def test_cli_defaults_to_the_tiny_preset_and_takes_preset_names(capsys):
  from train.__main__ import main
  assert main(["--print-config"]) == 0
  default = json.loads(capsys.readouterr().out)
  assert main(["--config", "tiny", "--print-config"]) == 0
  assert json.loads(capsys.readouterr().out) == default
  assert default["model"]["num_layers"] == 4 and default["run"]["out_dir"] == "runs/tiny"
  assert main(["--config", "no_such_preset"]) == 2
  assert "presets: " in capsys.readouterr().err


def test_every_preset_loads():
  d = os.path.join(REPO, "configs")
  names = [n for n in os.listdir(d) if n.endswith(".py") and not n.startswith("_")]
  assert len(names) >= 6
  for n in names:
    cfg = load_config_file(os.path.join(d, n))
    assert isinstance(cfg, TrainConfig)
    json.dumps(cfg.to_dict())


# --------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "cosine"])
def test_wsd_schedule(shape):
  s = wsd(2.0, 100, ScheduleConfig(warmup_steps=10, decay_fraction=0.2, decay_shape=shape,
                                    final_lr_fraction=0.1))
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(1.0)
  assert float(s(10)) == pytest.approx(2.0) and float(s(80)) == pytest.approx(2.0)
  assert float(s(100)) == pytest.approx(0.2)
  mid = float(s(90))
  want = {"linear": 0.5, "1-sqrt": 1 - 0.5 ** 0.5, "cosine": 0.5}[shape]
  assert mid == pytest.approx(2.0 * (0.1 + 0.9 * want), rel=1e-5)
  vals = [float(s(t)) for t in range(80, 101)]
  assert all(a >= b for a, b in zip(vals, vals[1:]))


# --------------------------------------------------------------------------- data
def test_shards_format_and_packing(shards):
  meta = data_lib.read_meta(shards)
  assert meta["splits"]["train"] and meta["splits"]["val"] and meta["vocab_size"] <= VOCAB
  src = data_lib.DocumentSource(shards, "train")
  doc = src[0]
  assert doc[-1] == meta["eos_id"] and len(doc) >= 2
  it = iter(data_lib.make_dataset(shards, split="train", seq_len=64, batch_size=3, seed=1))
  for _ in range(5):
    b = next(it)
    assert all(b[k].shape == (3, 64) for k in data_lib_keys())
    seg, pos = b["segment_ids"], b["positions"]
    # positions restart at 0 where a new segment starts; targets are next tokens of inputs
    # a new segment inside a row starts a piece at position 0 (column 0 may continue a piece
    # split at the previous row's end); positions count up within a segment
    new = np.concatenate([np.zeros((3, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    assert np.all(pos[new] == 0) and np.all(seg > 0)
    cont = ~new[:, 1:]
    assert np.all((pos[:, 1:] - pos[:, :-1])[cont] == 1)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    assert np.array_equal(b["targets"][:, :-1][same], b["inputs"][:, 1:][same])
  it.close()


def data_lib_keys():
  return ("inputs", "targets", "segment_ids", "positions")


def test_data_iterator_state_resumes_and_shards_per_process(shards):
  mk = lambda **kw: iter(data_lib.make_dataset(shards, split="train", seq_len=32,
                                               batch_size=2, seed=3, **kw))
  a = mk()
  for _ in range(3):
    next(a)
  state = json.loads(json.dumps(data_lib.iterator_state(a)))
  want = [next(a) for _ in range(3)]
  b = mk()
  b.set_state(state)
  got = [next(b) for _ in range(3)]
  for w, g in zip(want, got):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])
  p0 = next(mk(process_index=0, process_count=2))
  p1 = next(mk(process_index=1, process_count=2))
  assert not np.array_equal(p0["inputs"], p1["inputs"])
  for x in (a, b):
    x.close()


def test_prepare_writes_each_document_as_encoded_across_batches(tmp_path, monkeypatch):
  """Tokenized in several size-bounded batches, every document lands in its split as the
  tokenizer encodes it alone, then EOS, in corpus order."""
  from tokenizers import Tokenizer
  from train import prepare as prep
  docs = [f"def f{i}(x):\n    return x * {i} + {'y' * (i % 7)}\n" * (1 + i % 5)
          for i in range(60)]
  src = tmp_path / "docs.jsonl"
  src.write_text("\n".join(json.dumps({"text": d}) for d in docs))
  monkeypatch.setattr(prep, "BATCH_BYTES", 300)  # many batches, some of one document
  assert len(list(prep._byte_batches(docs, 300))) > 10
  meta = prep.prepare(str(tmp_path / "out"), [str(src)], vocab_size=300, val_fraction=0.2,
                      quiet=True)
  tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
  eos = meta["eos_id"]
  for split in ("train", "val"):
    want = [tok.encode(d).ids + [eos] for i, d in enumerate(docs)
            if prep._is_val(i, 0.2) == (split == "val")]
    got = []
    for name in meta["splits"][split]:
      ids = np.fromfile(tmp_path / "out" / f"{name}.bin", meta["dtype"])
      off = np.load(tmp_path / "out" / f"{name}.offsets.npy")
      got += [ids[a:b].tolist() for a, b in zip(off[:-1], off[1:])]
    assert got == want, split



def test_prepare_warns_when_the_document_split_misses_val_fraction(tmp_path, capsys):
  """Documents are split, not tokens: a small corpus whose held-out document is large holds
  out far more than val_fraction; prepare says so (one line naming the option)."""
  from train import prepare as prep
  docs = [f"x = {i}\n" * 20 for i in range(4)] + ["y = 1\n" * 2000]  # the last one: val
  src = tmp_path / "docs.jsonl"
  src.write_text("\n".join(json.dumps({"text": d}) for d in docs))
  prep.prepare(str(tmp_path / "out"), [str(src)], vocab_size=280, val_fraction=0.02)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("warning: --val-fraction 0.02:"), err
  assert "1 of 5 documents" in err[0]

# --------------------------------------------------------------------------- mesh
def test_rule_table_covers_every_logical_name():
  from train.mesh import RULES, mesh_shape
  assert {k for k, _ in RULES} == set(LOGICAL_AXIS_NAMES)
  assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="devices"):
    mesh_shape(MeshConfig(data=3), 8)


# --------------------------------------------------------------------------- loop
def test_grad_accumulation_matches_full_batch(shards, tmp_path):
  from train.mesh import make_mesh
  from train.step import Trainer
  it = iter(data_lib.make_dataset(shards, split="train", seq_len=32, batch_size=4, prefetch=0))
  host = next(it)
  losses = {}
  for accum in (1, 2):
    cfg = small_config(shards, str(tmp_path))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, grad_accum=accum))
    tr = Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    st = tr.init_state(0)
    st, m1 = tr.train_step(st, tr.device_batch(host, accum=accum))
    st, m2 = tr.train_step(st, tr.device_batch(host, accum=accum))
    losses[accum] = (float(m1["loss"]), float(m2["loss"]), float(m1["grad_norm"]))
  np.testing.assert_allclose(losses[1], losses[2], rtol=2e-5)


@pytest.mark.parametrize("optimizer", [pytest.param("adamw", marks=pytest.mark.slow), "muon"])
def test_learning_rates_compile_to_one_program(shards, tmp_path, optimizer):
  """The peak lr is an argument of the step, not a constant in it: a learning-rate sweep
  compiles once. The step still follows its lr: the logged lr, and the first update (AdamW's
  and Muon's first steps are linear in lr) scales with it."""
  from train.mesh import make_mesh
  from train.step import Trainer
  it = iter(data_lib.make_dataset(shards, split="train", seq_len=32, batch_size=4, prefetch=0))
  host = next(it)
  texts, deltas = [], []
  for lr in (1e-3, 4e-3):
    cfg = small_config(shards, str(tmp_path))
    cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, name=optimizer,
                                                                 lr=lr))
    tr = Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    batch = tr.device_batch(host, accum=1)
    with tr.context():
      texts.append(tr._train_step.lower(tr.abstract_state_with_shardings(), batch,
                                        tr.peak_lr).as_text())
    st = tr.init_state(0)
    st, _ = tr.train_step(st, batch)       # step 0: lr 0 under warmup
    p1 = jax.tree.map(np.asarray, st["params"])
    st, m = tr.train_step(st, batch)
    np.testing.assert_allclose(float(m["lr"]), lr * float(tr.unit_schedule(1)), rtol=1e-6)
    deltas.append(jax.tree.map(lambda a, b: np.asarray(b) - a, p1, st["params"]))
  assert texts[0] == texts[1]
  big = jax.tree.leaves(deltas[1])[0]
  np.testing.assert_allclose(big, 4 * jax.tree.leaves(deltas[0])[0], rtol=1e-3, atol=1e-7)


def test_train_resume_bit_identical_and_checkpoint_guards(shards, tmp_path):
  from train.checkpoint import CheckpointMismatchError
  from train.loop import train
  full = train(small_config(shards, str(tmp_path / "full")), log=lambda s: None)
  assert sorted(full["losses"]) == list(range(1, 7))
  assert all(np.isfinite(v) for v in full["losses"].values())

  part = train(small_config(shards, str(tmp_path / "part")), stop_after=3, log=lambda s: None)
  assert part["stopped_by"] == "stop_after" and sorted(part["losses"]) == [1, 2, 3]
  # a half-written (uncommitted) checkpoint from a crash must be ignored
  os.makedirs(tmp_path / "part" / "checkpoints" / "5.orbax-checkpoint-tmp-123" / "state")
  rest = train(small_config(shards, str(tmp_path / "part")), log=lambda s: None)
  assert sorted(rest["losses"]) == [4, 5, 6]
  for s in (4, 5, 6):
    assert rest["losses"][s] == full["losses"][s], (s, rest["losses"][s], full["losses"][s])
  a = jax.tree.leaves(full["state"]["params"])
  b = jax.tree.leaves(rest["state"]["params"])
  assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))

  other = small_config(shards, str(tmp_path / "part"), steps=8)
  other = dataclasses.replace(other, model=other.model.replace(hidden_size=96))
  with pytest.raises(CheckpointMismatchError, match="model.hidden_size"):
    train(other, log=lambda s: None)


def test_nan_loss_stops_keeping_last_good_checkpoint(shards, tmp_path, monkeypatch):
  import jax.numpy as jnp

  from train import step as step_lib
  from train.loop import NonFiniteLossError, train
  real = step_lib.Trainer.train_step

  def poisoned(self, state, batch):
    state, m = real(self, state, batch)
    bad = jnp.where(state["step"] >= 4, jnp.nan, m["loss"])
    return state, {**m, "loss": bad}

  monkeypatch.setattr(step_lib.Trainer, "train_step", poisoned)
  cfg = small_config(shards, str(tmp_path / "nan"), checkpoint_every=2)
  with pytest.raises(NonFiniteLossError, match="step 4.*last good checkpoint.*2"):
    train(cfg, log=lambda s: None)
  from train.checkpoint import Checkpointer
  assert Checkpointer(str(tmp_path / "nan" / "checkpoints")).latest_step() == 2


def sigterm_during_step(n: int, monkeypatch):
  """The process sends itself SIGTERM inside the n-th train step (1-based)."""
  from train import step as step_lib
  real = step_lib.Trainer.train_step
  calls = {"n": 0}

  def step(self, state, batch):
    calls["n"] += 1
    if calls["n"] == n:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(self, state, batch)

  monkeypatch.setattr(step_lib.Trainer, "train_step", step)


def test_sigterm_saves_and_exits(shards, tmp_path, monkeypatch):
  from train.checkpoint import Checkpointer
  from train.loop import train
  sigterm_during_step(2, monkeypatch)
  out = train(small_config(shards, str(tmp_path / "term")), log=lambda s: None)
  assert out["stopped_by"] == "SIGTERM" and out["final_step"] == 2
  assert Checkpointer(str(tmp_path / "term" / "checkpoints")).latest_step() == 2


def test_sigterm_at_the_last_step_is_a_finished_run(shards, tmp_path, monkeypatch):
  """A SIGTERM that lands during the last step: the run is complete (its eval done), so it
  is not reported stopped (a study would otherwise redo it); the checkpoint is still saved."""
  from train.checkpoint import Checkpointer
  from train.loop import train
  sigterm_during_step(3, monkeypatch)
  out = train(small_config(shards, str(tmp_path / "t"), steps=3, eval_every=3),
              log=lambda s: None)
  assert out["stopped_by"] is None and out["final_step"] == 3 and out["eval"]
  assert Checkpointer(str(tmp_path / "t" / "checkpoints")).latest_step() == 3


def test_metrics_eval_diagnostics_samples_and_plot(shards, tmp_path):
  from train.loop import train
  from train.plot import plot_runs
  from train.checkpoint import Checkpointer
  cfg = small_config(shards, str(tmp_path / "m"), steps=4, eval_every=4, diag_every=4,
                     sample_lines=2, sample_tokens=8, log_every=2, save_final=False)
  out = train(cfg, log=lambda s: None)
  assert Checkpointer(str(tmp_path / "m" / "checkpoints")).latest_step() is None
  t = out["timings_s"]
  assert set(t) == {"setup", "first_step", "steps", "eval", "diag", "save", "finish"}
  assert all(v >= 0 for v in t.values()) and t["eval"] > 0 and t["diag"] > 0
  assert t["save"] == 0 and t["steps"] >= t["first_step"] > 0
  recs = [json.loads(l) for l in open(tmp_path / "m" / "metrics.jsonl")]
  keys = set().union(*recs)
  for k in ("loss", "perplexity", "tokens_per_s", "grad_norm", "lr", "eval/loss",
            "eval/loss_repeat", "eval/loss_novel", "eval/repeat_fraction",
            "cor/layer_0", "cor/layer_1", "stable_rank/layers_0/attn/r_proj",
            "stable_rank/layers_0/attn/q_proj"):
    assert k in keys, k
  ev = next(r for r in recs if "eval/loss_repeat" in r)  # the split averages to the whole
  f = ev["eval/repeat_fraction"]
  assert 0 < f < 1 and ev["eval/loss"] == pytest.approx(
      f * ev["eval/loss_repeat"] + (1 - f) * ev["eval/loss_novel"], rel=1e-5)
  assert len(out["samples"]) == 2 and all(isinstance(s, str) for s in out["samples"])
  png = plot_runs([str(tmp_path / "m")], str(tmp_path / "loss.png"))
  assert png is None or os.path.getsize(png) > 0


def test_repeat_targets_match_a_brute_force_scan():
  import jax.numpy as jnp
  from train.step import repeat_targets
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 4, (3, 41))
  seg = np.repeat(np.array([[1] * 20 + [2] * 18 + [0] * 3]), 3, axis=0)
  seg[2] = 1  # one document
  inputs, targets = toks[:, :-1], toks[:, 1:]
  got = np.asarray(repeat_targets(jnp.asarray(inputs), jnp.asarray(targets),
                                  jnp.asarray(seg[:, :-1])))
  want = np.zeros_like(got)
  for b in range(3):
    for t in range(40):
      want[b, t] = seg[b, t] != 0 and any(
          seg[b, u] == seg[b, t] and inputs[b, u] == inputs[b, t] and
          targets[b, u] == targets[b, t] for u in range(t))
  np.testing.assert_array_equal(got, want)
  assert 0 < want.mean() < 1


def test_scanned_remat_model_step_and_diagnostics(shards, tmp_path):
  from train.mesh import make_mesh
  from train.step import Trainer
  cfg = small_config(shards, str(tmp_path))
  cfg = dataclasses.replace(cfg, model=cfg.model.replace(scan_layers=True, remat_policy="dots"))
  tr = Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
  it = iter(data_lib.make_dataset(shards, split="train", seq_len=32, batch_size=4, prefetch=0))
  st = tr.init_state(0)
  for _ in range(3):
    st, m = tr.train_step(st, tr.device_batch(next(it), accum=1))
  assert np.isfinite(float(m["loss"]))
  host = next(it)
  d = jax.device_get(tr.diagnostics(st["params"], tr.device_batch(host)))
  assert {"cor/layer_0", "cor/layer_1"} <= set(d)
  assert float(d["cor/layer_0"]) > 0 and float(d["stable_rank/layers_1/attn/r_proj"]) > 0
  # In micro-batches (as the loop runs them under grad_accum, so that every layer's q, k, v,
  # r are held for B / A sequences, not B): the mean of each half's diagnostics.
  halves = [jax.device_get(tr.diagnostics(st["params"], tr.device_batch(
      {k: v[i * 2:(i + 1) * 2] for k, v in host.items()}))) for i in range(2)]
  d2 = jax.device_get(tr.diagnostics(st["params"], tr.device_batch(host, accum=2)))
  assert set(d2) == set(d)
  for k in d:
    np.testing.assert_allclose(d2[k], (halves[0][k] + halves[1][k]) / 2, rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("extra", [{}, {"correction_gate": True, "learnable_bandwidth": True}])
def test_diagnostics_scanned_equal_unrolled_and_per_layer_cor(shards, tmp_path, extra):
  # The diagnostics run all layers through one loop (one kernel instance): each layer's COR
  # must equal the family API on that layer's sown q, k, v, r, scanned or not.
  import jax.numpy as jnp
  from parallax_jax import diagnostics as pdiag
  from parallax_jax.models import Qwen3Model
  from train.mesh import make_mesh
  from train.step import Trainer
  base = small_config(shards, str(tmp_path))
  it = iter(data_lib.make_dataset(shards, split="val", seq_len=32, batch_size=4, prefetch=0))
  host = next(it)
  got = {}
  for scan in (False, True):
    cfg = dataclasses.replace(base, model=base.model.replace(scan_layers=scan, **extra))
    tr = Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    params = tr.init_state(0)["params"]
    if scan:  # moved off init: the loop's values must not hide a per-layer mix-up
      params = jax.tree.map(lambda x: x, params)
      params["layers"]["attn"]["r_proj"]["kernel"] = jax.random.normal(
          jax.random.key(1), params["layers"]["attn"]["r_proj"]["kernel"].shape) * 0.3
    else:
      for i in range(cfg.model.num_layers):
        params[f"layers_{i}"]["attn"]["r_proj"]["kernel"] = jax.random.normal(
            jax.random.key(1), (cfg.model.num_layers,)
            + params[f"layers_{i}"]["attn"]["r_proj"]["kernel"].shape)[i] * 0.3
    batch = tr.device_batch(host)
    got[scan] = {k: float(v) for k, v in jax.device_get(tr.diagnostics(params, batch)).items()}
  for k in got[False]:
    np.testing.assert_allclose(got[True][k], got[False][k], rtol=2e-4, err_msg=k)
  assert set(got[True]) == set(got[False])
  # the unrolled model, layer by layer, as the diagnostics did before they stacked the layers
  m = cfg.model.replace(scan_layers=False)
  _, inter = Qwen3Model(m).apply({"params": params_unrolled(params, m.num_layers)},
                                 jnp.asarray(host["inputs"]), positions=jnp.asarray(
                                     host["positions"]), segment_ids=jnp.asarray(
                                     host["segment_ids"]), mutable=["intermediates"])
  cors = []
  for i in range(m.num_layers):
    a = inter["intermediates"][f"layers_{i}"]["attn"]
    r = a["r"][0]
    bw = m.resolved_bandwidth
    if "g" in a:
      assert got[True][f"gate/layer_{i}"] == pytest.approx(float(jnp.mean(a["g"][0])), rel=1e-4)
      r = r * a["g"][0][..., None]
    if m.learnable_bandwidth:
      bw = jnp.exp(params["layers"]["attn"]["log_bandwidth"][i])
    cors.append(float(jnp.mean(pdiag.correction_to_output_ratio(
        a["q"][0], a["k"][0], a["v"][0], r, causal=True,
        segment_ids=jnp.asarray(host["segment_ids"]), bandwidth=bw))))
  np.testing.assert_allclose([got[True][f"cor/layer_{i}"] for i in range(m.num_layers)], cors,
                             rtol=2e-4)
  assert len(set(np.round(cors, 6))) == len(cors)  # layers differ: an index mix-up would show


def params_unrolled(params, num_layers):
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out


def test_overrides_are_validated_together():
  cfg = apply_overrides(TrainConfig(data=DataConfig(global_batch_size=32, grad_accum=16)),
                        ["data.global_batch_size=4", "data.grad_accum=2"])
  assert (cfg.data.global_batch_size, cfg.data.grad_accum) == (4, 2)


def test_batch_that_does_not_split_over_the_mesh_names_the_key():
  import types

  from train.loop import check_batch
  cfg = TrainConfig(data=DataConfig(global_batch_size=12, grad_accum=2))
  check_batch(cfg, types.SimpleNamespace(shape={"data": 3, "fsdp": 2}))
  with pytest.raises(ValueError, match=r"data.global_batch_size: 12 rows / grad_accum 2 = 6 "
                                       r"per micro-batch does not split over mesh data x fsdp = 4"):
    check_batch(cfg, types.SimpleNamespace(shape={"data": 2, "fsdp": 2}))
