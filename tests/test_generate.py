"""KV-cache generation: cached decoding == full forward, per-sequence lengths, sampling."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallax_jax.models import qwen3
from parallax_jax.models.config import ModelConfig
from parallax_jax.models.generate import (KVCache, decode_step, generate, init_cache, prefill,
                                          sample_logits)

V = 40


def small(**kw):
  base = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=8, intermediate_size=40, max_seq_len=64, dtype="float32",
              init_std=0.3, implementation="xla")
  base.update(kw)
  return ModelConfig(**base)


def rand_params(cfg, seed=0):
  """Random parameters drawn on the host (no XLA compile of initialisers); W_R non-zero."""
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = getattr(path[-1], "key", "")
    if name == "scale":
      x = 1.0 + 0.2 * rng.standard_normal(a.shape)
    elif name == "log_bandwidth":
      x = math.log(math.sqrt(cfg.resolved_head_dim)) + 0.1 * rng.standard_normal(a.shape)
    else:
      x = cfg.init_std * rng.standard_normal(a.shape)
    return jnp.asarray(x, a.dtype)

  return jax.tree_util.tree_map_with_path(draw, qwen3.abstract_params(cfg))


def forward(cfg, params, toks):
  return qwen3.Qwen3Model(cfg).apply({"params": params}, toks)


CASES = {
    "softmax": dict(attention="softmax"),
    "parallax": dict(r_norm=True, correction_gate=True, learnable_bandwidth=True),
    "parallax-window-chunked": dict(window=3, implementation="chunked"),
    "parallax-scan": dict(scan_layers=True, remat_policy="full"),
    "lla": dict(attention="lla", ridge=0.1),
    "linear": dict(attention="linear"),
    "mesa-moments": dict(attention="mesa", ridge=0.1, implementation="moments"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_decoding_equals_full_forward(case):
  cfg = small(**CASES[case])
  params = rand_params(cfg, 1)
  t_total, lengths = 9, np.array([3, 6])
  toks = jax.random.randint(jax.random.key(2), (2, t_total), 0, V)
  full = forward(cfg, params, toks)  # [B, T, V]

  # right-padded prompts; the padding holds junk that must never be attended to
  p = int(lengths.max())
  prompts = np.array(toks[:, :p])
  prompts[0, lengths[0]:] = V - 1
  cache = init_cache(cfg, 2, t_total + 1)
  assert cache.k.shape == (2, 2, t_total + 1, 2, 8) and cache.v.shape == cache.k.shape
  tol = dict(rtol=2e-4, atol=2e-4) if cfg.resolved_probe == "solve" else dict(rtol=1e-5,
                                                                               atol=1e-5)
  logits, cache = prefill(cfg, params, jnp.asarray(prompts), jnp.asarray(lengths), cache)
  np.testing.assert_array_equal(cache.lengths, lengths)
  np.testing.assert_allclose(logits, full[np.arange(2), lengths - 1], **tol)
  # two tokens at once continue each row from its own length (a chunked prefill / second turn)
  pos = lengths[:, None] + np.arange(2)
  logits, cache = qwen3.Qwen3Model(cfg).apply({"params": params},
                                              toks[np.arange(2)[:, None], pos], cache=cache)
  np.testing.assert_allclose(logits, full[np.arange(2)[:, None], pos], **tol)
  for s in range(t_total - p - 2):
    pos = lengths + 2 + s
    logits, cache = decode_step(cfg, params, toks[np.arange(2), pos], cache)
    np.testing.assert_allclose(logits, full[np.arange(2), pos], **tol, err_msg=f"step {s}")
  np.testing.assert_array_equal(cache.lengths, lengths + t_total - p)


def test_generate_greedy_batched_equals_single_and_naive():
  cfg = small(r_norm=True)
  params = rand_params(cfg, 3)
  prompts = [[5, 7, 9], [1, 2, 3, 4, 11]]
  n_new = 4
  batch = np.zeros((2, 5), np.int32)
  for i, pr in enumerate(prompts):
    batch[i, :len(pr)] = pr
  out = generate(cfg, params, batch, [3, 5], max_new_tokens=n_new)
  assert out.tokens.shape == (2, n_new)
  np.testing.assert_array_equal(out.lengths, [n_new, n_new])
  # naive reference: re-run the full forward on the growing sequences (kept in a fixed-size
  # right-padded buffer: causal, so the padding never affects the positions read)
  buf, n = batch.copy(), np.array([3, 5])
  buf = np.concatenate([buf, np.zeros((2, n_new), np.int32)], axis=1)
  for _ in range(n_new):
    nxt = np.asarray(jnp.argmax(forward(cfg, params, jnp.asarray(buf))[np.arange(2), n - 1], -1))
    buf[np.arange(2), n] = nxt
    n = n + 1
  for i, pr in enumerate(prompts):
    np.testing.assert_array_equal(out.tokens[i], buf[i, len(pr):len(pr) + n_new])
  single = generate(cfg, params, np.asarray([prompts[0]]), max_new_tokens=n_new)
  np.testing.assert_array_equal(single.tokens[0], out.tokens[0])


def test_generate_stops_at_eos_and_pads():
  cfg = small()
  params = rand_params(cfg, 4)
  prompts = np.array([[3, 4, 5], [6, 7, 8]], np.int32)
  ref = generate(cfg, params, prompts, max_new_tokens=5)
  eos = int(ref.tokens[0, 1])
  out = generate(cfg, params, prompts, max_new_tokens=5, eos_id=eos, pad_id=V - 1)
  first = [int(np.argmax(np.asarray(r) == eos)) if eos in np.asarray(r) else None
           for r in ref.tokens]
  for b in range(2):
    if first[b] is None:
      np.testing.assert_array_equal(out.tokens[b], ref.tokens[b])
      assert out.lengths[b] == 5
    else:
      k = first[b]
      np.testing.assert_array_equal(out.tokens[b, :k + 1], ref.tokens[b, :k + 1])
      assert np.all(np.asarray(out.tokens[b, k + 1:]) == V - 1)
      assert out.lengths[b] == k + 1
  assert out.lengths[0] <= 2
  # a list of ids stops at any of them (one that never appears changes nothing)
  both = generate(cfg, params, prompts, max_new_tokens=5, eos_id=[V + 7, eos], pad_id=V - 1)
  np.testing.assert_array_equal(both.tokens, out.tokens)
  np.testing.assert_array_equal(both.lengths, out.lengths)


def test_sampling_temperature_top_k_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.07, 0.03]]))
  key = jax.random.key(0)
  assert int(sample_logits(key, logits, temperature=0.0)[0]) == 0
  assert int(sample_logits(key, logits, temperature=1.0, top_k=1)[0]) == 0
  assert int(sample_logits(key, logits, temperature=1.0, top_p=0.01)[0]) == 0
  n = 4000
  many = jnp.repeat(logits, n, axis=0)
  s = np.asarray(sample_logits(key, many, temperature=1.0))
  freq = np.bincount(s, minlength=5) / n
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.1, 0.07, 0.03], atol=0.03)
  s = np.asarray(sample_logits(key, many, temperature=1.0, top_p=0.7))  # nucleus {0, 1}
  assert set(np.unique(s)) == {0, 1}
  np.testing.assert_allclose(np.mean(s == 0), 0.5 / 0.8, atol=0.03)
  s = np.asarray(sample_logits(key, many, temperature=1.0, top_k=3))
  assert set(np.unique(s)) == {0, 1, 2}
  s = np.asarray(sample_logits(key, many, temperature=5.0))  # hotter: flatter
  assert np.mean(s == 0) < 0.35
  with pytest.raises(ValueError):
    sample_logits(key, logits, top_p=0.0)


def test_generate_with_sampling_is_seeded():
  cfg = small()
  params = rand_params(cfg, 5)
  prompts = np.array([[3, 4, 5, 6]], np.int32)
  kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.9)
  a = generate(cfg, params, prompts, rng=jax.random.key(1), **kw)
  b = generate(cfg, params, prompts, rng=jax.random.key(1), **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert np.all((np.asarray(a.tokens) >= 0) & (np.asarray(a.tokens) < V))
  with pytest.raises(ValueError, match="rng"):
    generate(cfg, params, prompts, max_new_tokens=2, temperature=1.0)
  assert isinstance(a.cache, KVCache)


def test_cli_samples_from_a_checkpoint(tmp_path, capsys):
  import json

  from parallax_jax.models import cli
  cfg = small()
  params = rand_params(cfg, 6)
  path = qwen3.save_checkpoint(str(tmp_path / "ckpt"), params, cfg)
  ref = generate(cfg, params, np.array([[1, 2, 3], [4, 5, 0]], np.int32), [3, 2],
                 max_new_tokens=3)
  assert cli.main(["--checkpoint", path, "--prompt-ids", "1,2,3", "--prompt-ids", "4,5",
                   "--max-new-tokens", "3", "--json"]) == 0
  lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert [x["prompt_ids"] for x in lines] == [[1, 2, 3], [4, 5]]
  assert [x["new_ids"] for x in lines] == np.asarray(ref.tokens).tolist()


@pytest.mark.parametrize("case", ["parallax-gated",
                                  pytest.param("softmax-window", marks=pytest.mark.slow)])
def test_generate_pallas_decode_equals_xla(case):
  """The decode step through the Pallas decode kernel (interpret mode on CPU, the cache read
  in place) gives the same greedy tokens and close logits as the dense 'xla' decode."""
  kw = {"parallax-gated": dict(r_norm=True, correction_gate=True, learnable_bandwidth=True),
        "softmax-window": dict(attention="softmax", window=3, num_heads=8)}[case]
  cfg_x = small(head_dim=16, decode_implementation="xla", **kw)
  cfg_p = cfg_x.replace(decode_implementation="pallas")
  params = rand_params(cfg_x, 7)
  prompts = np.array([[5, 7, 9, 0, 0], [1, 2, 3, 4, 11]], np.int32)
  lengths = jnp.asarray([3, 5])
  n_new = 5
  out_x = generate(cfg_x, params, prompts, lengths, max_new_tokens=n_new)
  out_p = generate(cfg_p, params, prompts, lengths, max_new_tokens=n_new)
  np.testing.assert_array_equal(out_p.tokens, out_x.tokens)
  np.testing.assert_allclose(out_p.cache.k, out_x.cache.k, rtol=1e-5, atol=1e-5)
  # logits of a few decode steps, teacher-forced on the generated tokens
  cache_x = cache_p = init_cache(cfg_x, 2, 5 + n_new)
  _, cache_x = prefill(cfg_x, params, jnp.asarray(prompts), lengths, cache_x)
  _, cache_p = prefill(cfg_p, params, jnp.asarray(prompts), lengths, cache_p)
  jaxpr = lambda cfg: str(jax.make_jaxpr(decode_step, static_argnums=0)(
      cfg, params, out_x.tokens[:, 0], cache_x))
  assert "pallas_call" in jaxpr(cfg_p) and "pallas_call" not in jaxpr(cfg_x)
  step = jax.jit(decode_step, static_argnums=0)
  for s in range(3):
    lx, cache_x = step(cfg_x, params, out_x.tokens[:, s], cache_x)
    lp, cache_p = step(cfg_p, params, out_x.tokens[:, s], cache_p)
    np.testing.assert_allclose(lp, lx, rtol=1e-5, atol=1e-5, err_msg=f"step {s}")


@pytest.mark.parametrize("scan_layers", [pytest.param(False, marks=pytest.mark.slow), True])
def test_generate_carries_the_decode_arrival_counter(scan_layers):
  """A cache long enough for split decode launches (192 slots: 3 splits of 64): the cache's
  arrival counters ([layers, B, Hkv]) are carried through every layer and step and stay zero,
  and the tokens match the dense 'xla' decode. With scan_layers the kernel runs inside flax's
  nn.scan, which needs it removable by dead-code elimination (`decode._removable`)."""
  cfg_x = small(head_dim=16, decode_implementation="xla", max_seq_len=256,
                scan_layers=scan_layers)
  cfg_p = cfg_x.replace(decode_implementation="pallas")
  cache = init_cache(cfg_p, 2, 192)
  assert cache.arrivals.shape == (2, 2, 2) and cache.arrivals.dtype == jnp.int32
  params = rand_params(cfg_x, 3)
  prompts = np.array([[5, 7, 9, 0], [1, 2, 3, 4]], np.int32)
  out_x = generate(cfg_x, params, prompts, [3, 4], max_new_tokens=3, cache_len=192)
  out_p = generate(cfg_p, params, prompts, [3, 4], max_new_tokens=3, cache_len=192)
  np.testing.assert_array_equal(out_p.tokens, out_x.tokens)
  np.testing.assert_array_equal(out_p.cache.arrivals, 0)
  assert out_p.cache.arrivals.shape == (2, 2, 2)


def _tiny():
  cfg = small(num_layers=1, max_seq_len=12)
  return cfg, rand_params(cfg, 8)


@pytest.mark.parametrize("kw, match", [
    (dict(prompts=[[1, V, 3]]),
     r"prompts must be in \[0, vocab_size=40\), got 40 at index \(0, 1\)"),
    (dict(prompts=[[1, -1, 3]]), r"got -1 at index \(0, 1\)"),
    (dict(prompts=[[1, 2, 0]], prompt_lengths=[2], pad=V + 1), r"got 41 at index \(0, 2\)"),
    (dict(prompts=[1, 2, 3]), r"shaped \[B, T\], got shape \(3,\)"),
    (dict(prompts=[[1.0, 2.0, 3.0]]), "integer token ids, got dtype float64"),
    (dict(prompt_lengths=[0]), r"prompt_lengths must be in \[1, T=3\].*got \[0\]"),
    (dict(prompt_lengths=[4]), r"prompt_lengths must be in \[1, T=3\].*got \[4\]"),
    (dict(prompt_lengths=[3, 3]), r"prompt_lengths must be shaped \[B\] = \(1,\)"),
    (dict(max_new_tokens=10), "prompt length 3 \\+ max_new_tokens 10 = 13 exceeds max_seq_len 12"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(temperature=-1.0), "temperature >= 0"),
    (dict(temperature=math.nan), "finite temperature >= 0"),  # sampled token 0 before
    (dict(top_k=2.5), "an int top_k >= 0"),
    (dict(prompts=np.zeros((0, 3), np.int32)), "prompts hold no sequence"),
    (dict(eos_id=[]), r"eos_id must be None, an int or a list of ints, got \[\]"),
    (dict(eos_id=2.0), "eos_id must be None, an int or a list of ints"),
])
def test_generate_refuses_bad_input(kw, match):
  """Each bad input raises one ValueError before anything runs (before: out-of-range ids
  gave a NaN cache and tokens [0, 0, ...] or wrapped around, bad lengths NaN logits)."""
  cfg, params = _tiny()
  prompts = kw.pop("prompts", [[1, 2, 3]])
  if "pad" in kw:
    prompts = [p[:-1] + [kw.pop("pad")] for p in prompts]
  with pytest.raises(ValueError, match=match):
    generate(cfg, params, prompts, kw.pop("prompt_lengths", None),
             max_new_tokens=kw.pop("max_new_tokens", 3), **kw)


def test_sampling_at_a_tiny_temperature_is_greedy_and_top_k_may_exceed_the_vocabulary():
  logits = jnp.array([[0.0, 1.0, 5.0, 2.0, -1.0]])
  for i in range(4):  # 1e-40: every logit / t overflowed to inf, then NaN: token 0
    assert int(sample_logits(jax.random.key(i), logits, temperature=1e-40)[0]) == 2
  assert sample_logits(jax.random.key(0), logits, top_k=1000).shape == (1,)


def test_prefill_and_decode_step_refuse_bad_input():
  cfg, params = _tiny()
  cache = init_cache(cfg, 1, 4)
  with pytest.raises(ValueError, match=r"prefill: lengths must be in \[1, T=3\].*got \[5\]"):
    prefill(cfg, params, jnp.array([[1, 2, 3]]), jnp.array([5]), cache)
  with pytest.raises(ValueError, match=r"prefill: tokens must be in \[0, vocab_size=40\)"):
    prefill(cfg, params, jnp.array([[1, 2, V]]), None, cache)
  with pytest.raises(ValueError, match=r"decode_step: tokens must be token ids shaped \[B\]"):
    decode_step(cfg, params, jnp.array([[1]]), cache)
  with pytest.raises(ValueError, match="decode_step: tokens must be in"):
    decode_step(cfg, params, jnp.array([-2]), cache)
  full = cache.replace(lengths=jnp.array([4], jnp.int32))
  with pytest.raises(ValueError, match=r"cache.lengths \[4\] must be < 4"):
    decode_step(cfg, params, jnp.array([1]), full)
  with pytest.raises(ValueError, match=r"cache.lengths \[-1\] must be >= 0"):
    decode_step(cfg, params, jnp.array([1]), cache.replace(lengths=jnp.array([-1], jnp.int32)))
  held = cache.replace(lengths=jnp.array([2], jnp.int32))
  with pytest.raises(ValueError, match=r"prefill: 3 tokens after cache.lengths \[2\] do not fit"):
    prefill(cfg, params, jnp.array([[1, 2, 3]]), None, held)
  with pytest.raises(ValueError, match="prefill=True on a cache that is not empty"):
    prefill(cfg, params, jnp.array([[1, 2]]), None, held, empty=True)
  once = jax.jit(lambda c: prefill(cfg, params, jnp.array([[1, 2]]), None, c, empty=True)[0])
  assert np.isnan(once(held)).all() and np.isfinite(once(cache)).all()  # traced: NaN, not junk
  other = init_cache(cfg.replace(num_layers=cfg.num_layers + 1), 1, 4)  # another model's
  with pytest.raises(ValueError, match=r"prefill: the cache has \(layers, kv heads, head dim\)"):
    prefill(cfg, params, jnp.array([[1, 2, 3]]), None, other)


def test_a_next_turn_continues_the_cache_generate_returns():
  """generate's cache holds each prompt and its tokens up to the eos, and a next turn through
  generate(cache=...) (prefill into the held cache, then decoding) equals generating from
  the whole conversation (prefill used to write the new turn over slots [0, T); the cache
  lacked the last token)."""
  cfg = small(r_norm=True)
  params = rand_params(cfg, 6)
  prompts, plen = np.array([[5, 7, 9, 0], [1, 2, 3, 4]]), np.array([3, 4])
  eos = 26  # greedy: row 0 says [36, 26, ...] and stops there, row 1 [17, 14, 30]
  out = generate(cfg, params, prompts, plen, max_new_tokens=3, eos_id=eos, cache_len=16)
  toks, n = np.asarray(out.tokens), np.asarray(out.lengths)
  assert n.tolist() == [2, 3] and int(toks[1, :2].tolist().count(eos)) == 0, (toks, eos)
  np.testing.assert_array_equal(out.cache.lengths, plen + n)
  said = [np.concatenate([prompts[i, :plen[i]], toks[i, :n[i]]]) for i in range(2)]
  turn = np.array([[11, 12], [13, 14]])
  nxt = generate(cfg, params, turn, None, max_new_tokens=2, cache=out.cache)  # via prefill
  convs = [np.concatenate([said[i], turn[i]]) for i in range(2)]
  ends = np.array([len(c) for c in convs])
  padded = np.zeros((2, ends.max()), np.int32)  # right-padded, with the true lengths
  for i, c in enumerate(convs):
    padded[i, :len(c)] = c
  ref = generate(cfg, params, padded, ends, max_new_tokens=2)
  np.testing.assert_array_equal(nxt.tokens, ref.tokens)
  np.testing.assert_array_equal(nxt.cache.lengths, [len(c) + 4 for c in said])
  with pytest.raises(ValueError, match=r"cache_len 16 < cache.lengths 7 \+ prompt length 2 "
                                       r"\+ max_new_tokens 8"):
    generate(cfg, params, turn, None, max_new_tokens=8, cache=out.cache)


@pytest.mark.parametrize("pad_id", [-1, pytest.param(V + 5, marks=pytest.mark.slow)])
def test_generate_pad_id_need_not_be_a_token(pad_id):
  """Finished sequences feed their sampled token to the model, not pad_id, so pad_id only
  marks the output (before: pad_id was embedded: -1 wrapped around, V + 5 put NaN in the
  cache)."""
  cfg, params = _tiny()
  prompts = np.array([[3, 4, 5], [6, 7, 8]], np.int32)
  ref = generate(cfg, params, prompts, max_new_tokens=4)
  eos = int(ref.tokens[0, 0])
  out = generate(cfg, params, prompts, max_new_tokens=4, eos_id=eos, pad_id=pad_id)
  np.testing.assert_array_equal(out.tokens[0], [eos] + [pad_id] * 3)
  assert int(out.lengths[0]) == 1
  assert np.all(np.isfinite(np.asarray(out.cache.k)))
  # row 0's cache holds the tokens it sampled after eos, as the run without eos_id does
  np.testing.assert_array_equal(out.cache.k[:, 0], ref.cache.k[:, 0])
