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
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

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


def prefill(config, params, tokens: Array, lengths: Array | None, cache: KVCache):
  """Run the (right-padded) prompts [B, T] through the model into an EMPTY cache.

  Returns (logits [B, V] at each sequence's last prompt token, cache with lengths set).
  """
  cfg = _config(config)
  b, t = tokens.shape
  if t > cache.max_len:
    raise ValueError(f"prompt length {t} exceeds the cache length {cache.max_len}")
  lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
  logits, cache = Qwen3Model(cfg).apply({"params": params}, tokens, cache=cache)
  cache = cache.replace(lengths=lengths)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return last, cache


def decode_step(config, params, tokens: Array, cache: KVCache):
  """One token per sequence ([B]) at position cache.lengths -> (logits [B, V], cache)."""
  logits, cache = Qwen3Model(_config(config)).apply({"params": params}, tokens[:, None],
                                                     cache=cache)
  return logits[:, 0], cache


def sample_logits(rng, logits: Array, *, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0) -> Array:
  """Sample token ids [B] from logits [B, V]: greedy when temperature == 0, otherwise
  softmax(logits / temperature) restricted to the top_k tokens (0: all) and to the smallest
  set whose probability reaches top_p (nucleus; the most likely token is always kept)."""
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, "
                     f"{top_p}, {top_k}")
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k:
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
  cache: Any = None


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "cache_len",
                                             "temperature", "top_p", "top_k", "eos_id", "pad_id"))
def _generate(params, prompts, prompt_lengths, rng, *, config, max_new_tokens, cache_len,
              temperature, top_p, top_k, eos_id, pad_id):
  b = prompts.shape[0]
  cache = KVCache.init(config, b, cache_len)
  logits, cache = prefill(config, params, prompts, prompt_lengths, cache)
  sample = functools.partial(sample_logits, temperature=temperature, top_p=top_p, top_k=top_k)
  rngs = jax.random.split(rng, max_new_tokens)

  def finish(tok, done):
    tok = jnp.where(done, pad_id, tok)
    new_done = done if eos_id is None else done | (tok == eos_id)
    return tok, new_done

  first, done = finish(sample(rngs[0], logits), jnp.zeros((b,), bool))
  count = jnp.ones((b,), jnp.int32)

  def step(carry, key):
    tok, done, count, cache = carry
    logits, cache = decode_step(config, params, tok, cache)
    nxt, new_done = finish(sample(key, logits), done)
    return (nxt, new_done, count + (~done).astype(jnp.int32), cache), nxt

  (_, _, count, cache), rest = jax.lax.scan(step, (first, done, count, cache), rngs[1:])
  tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
  return GenerateOutput(tokens=tokens, lengths=count, cache=cache)


def generate(config, params, prompts, prompt_lengths=None, *, max_new_tokens: int,
             rng=None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             eos_id: int | None = None, pad_id: int = 0, cache_len: int | None = None
             ) -> GenerateOutput:
  """Generate `max_new_tokens` per sequence after right-padded `prompts` [B, T].

  prompt_lengths [B] (default: all T) gives each prompt's true length. temperature 0 is
  greedy. A sequence stops at `eos_id` (later tokens are `pad_id`). The cache holds
  `cache_len` (default T + max_new_tokens) slots. Returns GenerateOutput(tokens, lengths, cache).
  """
  cfg = _config(config)
  prompts = jnp.asarray(prompts, jnp.int32)
  b, t = prompts.shape
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  cache_len = t + max_new_tokens if cache_len is None else cache_len
  if cache_len < t + max_new_tokens - 1:
    raise ValueError(f"cache_len {cache_len} < prompt length {t} + max_new_tokens - 1")
  if prompt_lengths is None:
    prompt_lengths = jnp.full((b,), t, jnp.int32)
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  if rng is None:
    if temperature > 0:
      raise ValueError("sampling with temperature > 0 needs rng")
    rng = jax.random.key(0)
  return _generate(params, prompts, prompt_lengths, rng, config=cfg,
                   max_new_tokens=int(max_new_tokens), cache_len=int(cache_len),
                   temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                   eos_id=eos_id, pad_id=int(pad_id))
