"""Generation with a KV cache: prefill, one-token decode steps, sampling, `generate`.

Only k and v are cached (`KVCache`, [layers, B, S, Hkv, Dh] each); the Parallax probe
r = W_R x of the current token is recomputed, so the cache is the same size as softmax's.
Prompts of different lengths are right-padded into one [B, T] batch with `prompt_lengths`:
each sequence's new tokens go to its own next slot and RoPE position, and a decode step
attends over each sequence's first `lengths[b] + 1` slots only, through
`parallax_jax.decode_attention` (the Pallas split-KV kernel on GPU, reading the cache in
place; `ModelConfig.decode_implementation`).

    out = generate(config, params, prompts, prompt_lengths, max_new_tokens=32,
                   temperature=0.8, top_p=0.95, rng=jax.random.key(0), eos_id=2)
    out.tokens  # [B, max_new_tokens] (pad_id after eos)   out.lengths  # [B]
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from parallax_jax.models.config import ModelConfig
from parallax_jax.models.qwen3 import KVCache, Qwen3Model

Array = jax.Array

__all__ = ["KVCache", "GenerateOutput", "init_cache", "prefill", "decode_step", "sample_logits",
           "generate"]


def _config(model_or_config) -> ModelConfig:
  return model_or_config.config if isinstance(model_or_config, Qwen3Model) else model_or_config


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache of `max_len` slots per sequence."""
  return KVCache.init(_config(config), batch, max_len, dtype)


# Input checks. Shapes and dtypes are checked always; values only where they are concrete
# (not traced under jit), since an out-of-range id or length does not fail: the embedding
# lookup and the gathers fill NaN (or wrap a negative index) and generation goes on silently.
def _values(x):
  """x as a numpy array when its values are known now, else None (a tracer)."""
  return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _check_cache(where: str, cfg, cache) -> None:
  """The cache was built for this model: [num_layers, B, S, num_kv_heads, head_dim]."""
  want = (cfg.num_layers, cfg.num_kv_heads, cfg.resolved_head_dim)
  have = (cache.k.shape[0], cache.k.shape[3], cache.k.shape[4])
  if have != want or cache.v.shape != cache.k.shape:
    raise ValueError(f"{where}: the cache has (layers, kv heads, head dim) {have}, the model "
                     f"{want}; build it with init_cache(config, ...)")


def _check_ids(where: str, name: str, ids, ndim: int, vocab_size: int):
  shape = "[B, T]" if ndim == 2 else "[B]"
  if np.ndim(ids) != ndim:
    raise ValueError(f"{where}: {name} must be token ids shaped {shape}, got shape "
                     f"{tuple(np.shape(ids))}")
  dtype = np.dtype(ids.dtype) if hasattr(ids, "dtype") else np.asarray(ids).dtype
  if dtype.kind not in "iu":
    raise ValueError(f"{where}: {name} must be integer token ids, got dtype {dtype}")
  vals = _values(ids)
  if vals is not None and vals.size and (vals.min() < 0 or vals.max() >= vocab_size):
    bad = np.argwhere((vals < 0) | (vals >= vocab_size))[0]
    raise ValueError(f"{where}: {name} must be in [0, vocab_size={vocab_size}), got "
                     f"{int(vals[tuple(bad)])} at index {tuple(int(i) for i in bad)}")


def _check_lengths(where: str, name: str, lengths, batch: int, t: int):
  if np.shape(lengths) != (batch,):
    raise ValueError(f"{where}: {name} must be shaped [B] = ({batch},), got shape "
                     f"{tuple(np.shape(lengths))}")
  dtype = np.dtype(lengths.dtype) if hasattr(lengths, "dtype") else np.asarray(lengths).dtype
  if dtype.kind not in "iu":
    raise ValueError(f"{where}: {name} must be integers, got dtype {dtype}")
  vals = _values(lengths)
  if vals is not None and (vals.min() < 1 or vals.max() > t):
    raise ValueError(f"{where}: {name} must be in [1, T={t}] (T: the padded prompt length), "
                     f"got {vals.tolist()}")


def _check_sampling(temperature, top_p, top_k):
  def number(x):
    if isinstance(x, (bool, str, bytes)):
      return math.nan
    try:
      return float(x)
    except (TypeError, ValueError):
      return math.nan
  # written so that NaN fails every test (NaN < 0 is False: it used to sample token 0)
  if not (0 <= number(temperature) < math.inf and 0 < number(top_p) <= 1
          and isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool)
          and top_k >= 0):
    raise ValueError(f"need a finite temperature >= 0, 0 < top_p <= 1 and an int top_k >= 0; "
                     f"got {temperature!r}, {top_p!r}, {top_k!r}")


def prefill(config, params, tokens: Array, lengths: Array | None, cache: KVCache, *,
            empty: bool | None = None):
  """Run right-padded tokens [B, T] through the model after what the cache holds.

  Sequence b's tokens continue it from slot cache.lengths[b] (an empty cache: a prompt; a
  cache that `generate` or an earlier call returned: the next turn). Returns (logits [B, V]
  at each sequence's last new token, the cache with lengths advanced by `lengths`). Every id
  of `tokens`, the padding included, must be in [0, vocab_size); `lengths` in [1, T], and
  cache.lengths + T within the cache and max_seq_len (checked where concrete). empty=True
  promises an empty cache (the training attention runs over the T tokens: the fast path for
  a prompt); None decides from concrete lengths; a non-empty cache is read through
  `parallax_jax.decode_attention`.
  """
  cfg = _config(config)
  _check_ids("prefill", "tokens", tokens, 2, cfg.vocab_size)
  b, t = tokens.shape
  _check_cache("prefill", cfg, cache)
  if cache.k.shape[1] != b:
    raise ValueError(f"prefill: tokens have batch {b}, the cache {cache.k.shape[1]}")
  if lengths is not None:
    _check_lengths("prefill", "lengths", lengths, b, t)
  start = _values(cache.lengths)
  limit = min(cache.max_len, cfg.max_seq_len)
  if start is not None and start.size and (start.min() < 0 or start.max() + t > limit):
    raise ValueError(f"prefill: {t} tokens after cache.lengths {start.tolist()} do not fit "
                     f"min(cache length {cache.max_len}, max_seq_len {cfg.max_seq_len}) = "
                     f"{limit} slots (a padded chunk writes all T slots of every row)")
  lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
  logits, new = Qwen3Model(cfg).apply({"params": params}, tokens, cache=cache, prefill=empty)
  new = new.replace(lengths=cache.lengths + lengths)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return last, new


def decode_step(config, params, tokens: Array, cache: KVCache):
  """One token per sequence ([B]) at position cache.lengths -> (logits [B, V], cache).

  Needs cache.lengths < min(cache.max_len, max_seq_len) (checked where concrete): a write
  past the cache's end would be dropped.
  """
  cfg = _config(config)
  _check_ids("decode_step", "tokens", tokens, 1, cfg.vocab_size)
  _check_cache("decode_step", cfg, cache)
  lens = _values(cache.lengths)
  limit = min(cache.max_len, cfg.max_seq_len)
  if lens is not None and lens.size and lens.min() < 0:
    raise ValueError(f"decode_step: cache.lengths {lens.tolist()} must be >= 0")
  if lens is not None and lens.size and lens.max() >= limit:
    raise ValueError(f"decode_step: cache.lengths {lens.tolist()} must be < {limit} "
                     f"(cache length {cache.max_len}, max_seq_len {cfg.max_seq_len})")
  logits, cache = Qwen3Model(cfg).apply({"params": params}, tokens[:, None], cache=cache)
  return logits[:, 0], cache


def sample_logits(rng, logits: Array, *, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0) -> Array:
  """Sample token ids [B] from logits [B, V]: greedy when temperature == 0, otherwise
  softmax(logits / temperature) restricted to the top_k tokens (0: all) and to the smallest
  set whose probability reaches top_p (nucleus; the most likely token is always kept)."""
  _check_sampling(temperature, top_p, top_k)
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # shifted so the largest is 0 first: a tiny temperature then sends the others to -inf
  # (greedy in the limit) instead of overflowing every logit to inf and NaN
  logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k and top_k < logits.shape[-1]:  # top_k >= the vocabulary keeps every token
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep = before < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class GenerateOutput:
  tokens: Array   # [B, max_new_tokens] int32, pad_id after a sequence's eos
  lengths: Array  # [B] number of generated tokens (including the eos)
  # The KVCache after generation: what it held before (generate(cache=...)), each prompt and
  # its generated tokens up to and including the eos; lengths count exactly those (slots
  # past them hold what a finished sequence decoded after its eos, never attended to). Pass
  # it as generate(..., cache=out.cache) or to `prefill` to continue (a next turn).
  cache: Any = None


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "cache_len",
                                             "temperature", "top_p", "top_k", "eos_id", "pad_id"))
def _generate(params, prompts, prompt_lengths, rng, cache, *, config, max_new_tokens,
              cache_len, temperature, top_p, top_k, eos_id, pad_id):
  b = prompts.shape[0]
  if cache is None:
    cache = KVCache.init(config, b, cache_len)
    logits, cache = prefill(config, params, prompts, prompt_lengths, cache, empty=True)
  else:  # a next turn: the prompts continue what the cache holds
    logits, cache = prefill(config, params, prompts, prompt_lengths, cache, empty=False)
  held = cache.lengths  # each sequence's tokens before the first generated one
  sample = functools.partial(sample_logits, temperature=temperature, top_p=top_p, top_k=top_k)
  rngs = jax.random.split(rng, max_new_tokens)

  def finish(tok, done):
    out = jnp.where(done, pad_id, tok)
    new_done = done if eos_id is None else done | jnp.isin(out, jnp.asarray(eos_id, out.dtype))
    return out, new_done

  # A finished sequence keeps feeding its sampled (in-vocabulary) token to the model, never
  # pad_id, which need not be a token id (e.g. -1).
  tok = sample(rngs[0], logits)
  first, done = finish(tok, jnp.zeros((b,), bool))
  count = jnp.ones((b,), jnp.int32)

  def step(carry, key):
    tok, done, count, cache = carry
    logits, cache = decode_step(config, params, tok, cache)
    tok = sample(key, logits)
    out, new_done = finish(tok, done)
    return (tok, new_done, count + (~done).astype(jnp.int32), cache), out

  (tok, _, count, cache), rest = jax.lax.scan(step, (tok, done, count, cache), rngs[1:])
  tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
  # the last token's k, v too, so the cache holds each sequence up to its eos (or its last
  # token) and lengths say exactly that: the next turn continues it as it is
  _, cache = decode_step(config, params, tok, cache)
  return GenerateOutput(tokens=tokens, lengths=count, cache=cache.replace(lengths=held + count))


def _eos_ids(eos_id) -> tuple[int, ...] | None:
  """eos_id (None, an int, or a list of ints: chat models end turns with one of several) as
  a tuple, the static argument of the compiled loop."""
  if eos_id is None:
    return None
  is_int = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, bool)  # noqa: E731
  ids = (eos_id,) if is_int(eos_id) else tuple(eos_id) if isinstance(eos_id, (list, tuple)) \
      else ()
  if not ids or not all(is_int(i) for i in ids):
    raise ValueError(f"eos_id must be None, an int or a list of ints, got {eos_id!r}")
  return tuple(int(i) for i in ids)


def generate(config, params, prompts, prompt_lengths=None, *, max_new_tokens: int,
             rng=None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             eos_id: int | list[int] | None = None, pad_id: int = 0,
             cache_len: int | None = None, cache: KVCache | None = None) -> GenerateOutput:
  """Generate `max_new_tokens` per sequence after right-padded `prompts` [B, T].

  prompt_lengths [B] (default: all T) gives each prompt's true length, in [1, T]. Every id of
  `prompts`, the padding included, must be in [0, vocab_size), and the longest prompt plus
  `max_new_tokens` must fit in `max_seq_len`. temperature 0 is greedy. A sequence stops at
  `eos_id` (an int or a list of ints; later tokens are `pad_id`, any int). The cache holds
  `cache_len` (default T + max_new_tokens) slots. `cache` (a GenerateOutput's, or one `prefill`
  filled) makes the prompts a next turn: each continues its sequence there (cache_len is then
  the cache's; cache.lengths + T + max_new_tokens must fit it and max_seq_len). Returns
  GenerateOutput(tokens, lengths, cache). Bad input raises a one-line ValueError (checked
  eagerly, before anything is compiled).
  """
  cfg = _config(config)
  if not hasattr(prompts, "dtype"):
    prompts = np.asarray(prompts)
  _check_ids("generate", "prompts", prompts, 2, cfg.vocab_size)
  if np.shape(prompts)[0] == 0:
    raise ValueError(f"generate: prompts hold no sequence (shape {tuple(np.shape(prompts))})")
  b, t = prompts.shape
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
      or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  _check_sampling(temperature, top_p, top_k)
  eos_id = _eos_ids(eos_id)
  start = 0
  if cache is not None:
    _check_cache("generate", cfg, cache)
    if cache.k.shape[1] != b:
      raise ValueError(f"generate: prompts have batch {b}, the cache {cache.k.shape[1]}")
    if cache_len is not None and cache_len != cache.max_len:
      raise ValueError(f"generate: cache_len {cache_len} but the cache given has "
                       f"{cache.max_len} slots")
    cache_len = cache.max_len
    held = _values(cache.lengths)
    start = 0 if held is None or not held.size else int(held.max())
  cache_len = t + max_new_tokens if cache_len is None else cache_len
  if cache_len < start + t + max_new_tokens:
    raise ValueError(f"cache_len {cache_len} < "
                     + (f"cache.lengths {start} + " if cache is not None else "")
                     + f"prompt length {t} + max_new_tokens {max_new_tokens}")
  if prompt_lengths is None:
    prompt_lengths = np.full((b,), t, np.int32)
  elif not hasattr(prompt_lengths, "dtype"):
    prompt_lengths = np.asarray(prompt_lengths)
  _check_lengths("generate", "prompt_lengths", prompt_lengths, b, t)
  longest = _values(prompt_lengths)
  longest = t if longest is None else int(longest.max())
  if start + longest + max_new_tokens > cfg.max_seq_len:
    before = f"cache.lengths {start} + " if start else ""
    raise ValueError(f"generate: {before}prompt length {longest} + max_new_tokens "
                     f"{max_new_tokens} = {start + longest + max_new_tokens} exceeds "
                     f"max_seq_len {cfg.max_seq_len}")
  prompts = jnp.asarray(prompts, jnp.int32)
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  if rng is None:
    if temperature > 0:
      raise ValueError("sampling with temperature > 0 needs rng")
    rng = jax.random.key(0)
  return _generate(params, prompts, prompt_lengths, rng, cache, config=cfg,
                   max_new_tokens=int(max_new_tokens), cache_len=int(cache_len),
                   temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                   eos_id=eos_id, pad_id=int(pad_id))
