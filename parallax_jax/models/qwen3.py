"""Qwen3-style decoder-only LM with a swappable attention-family member.

    model = Qwen3Model(config)
    params = init_params(config, jax.random.key(0))          # unboxed fp32 params
    logits = model.apply({"params": params}, tokens)         # [B, T, V] float32

Parameter tree: `embed/embedding` [V, d], `layers_{i}/...` (or `layers/...` with a leading
layer axis when `scan_layers`), `final_norm/scale` [d], `lm_head/kernel` [d, V] unless tied.
Also here: `KVCache`, `param_count`, `flops_per_token`, orbax `save_checkpoint` /
`load_checkpoint`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from parallax_jax.models.config import ModelConfig
from parallax_jax.nn.layers import (BLD, RMSNorm, block_class, constrain, logits_dot,
                                    rope_cos_sin)

Array = jax.Array


@flax.struct.dataclass
class KVCache:
  """Per-layer keys and values plus how many slots each sequence has filled.

  k, v: [num_layers, B, S, Hkv, Dh] (compute dtype); lengths: [B] int32. Only k and v are
  cached: the Parallax probe r = W_R x is recomputed from the current token.
  arrivals: [num_layers, B, Hkv] int32, all zero between steps: the decode kernel's split
  arrival counters, carried so that no step has to zero them (None: each call zeroes its own).
  """
  k: Array
  v: Array
  lengths: Array
  arrivals: Array | None = None

  @classmethod
  def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.resolved_head_dim)
    dtype = config.compute_dtype if dtype is None else dtype
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32),
               jnp.zeros(shape[:2] + shape[3:4], jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


class Embed(nn.Module):
  """Token embedding `embedding` [V, d]; `attend` is the tied LM head x E^T."""
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                  ("vocab", "embed")),
        (cfg.vocab_size, cfg.hidden_size), cfg.weight_dtype)

  def __call__(self, tokens):
    return jnp.take(self.embedding, tokens, axis=0).astype(self.config.compute_dtype)

  def attend(self, x):
    return logits_dot(x, self.embedding, self.config.compute_dtype, "vd")


class LMHead(nn.Module):
  """Untied LM head `kernel` [d, V]: float32 logits, bf16 backward (`logits_dot`)."""
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
        (cfg.hidden_size, cfg.vocab_size), cfg.weight_dtype)

  def __call__(self, x):
    return logits_dot(x, self.kernel, self.config.compute_dtype, "dv")


class Qwen3Model(nn.Module):
  """Qwen3 decoder LM. See `parallax_jax.nn.layers.Attention` for the cache modes.

  __call__(tokens [B,T] int, positions [B,T] (default arange; with a cache, cache.lengths +
           arange), segment_ids [B,T] (packed sequences; no cache only), cache: KVCache | None,
           return_hidden: bool = False, prefill: bool | None = None)
  -> logits [B,T,V] float32, or (logits, new_cache) when a cache is given.
  return_hidden=True (no cache) skips the LM head and returns (hidden, w, w_layout): the final
  hidden state [B,T,d] (after final_norm, compute dtype) and the head weight, the tied
  embedding [V,d] ("vd") or the lm_head kernel [d,V] ("dv"), for a fused loss
  (`parallax_jax.nn.losses.fused_cross_entropy`) that never materializes all the logits.
  With a cache, the T tokens continue each sequence b: written at slots cache.lengths[b] +
  [0, T), each attending over its sequence's earlier slots and itself; `cache.lengths`
  advances by T (set it to the true lengths after a right-padded chunk). T == 1 is a decode
  step; T > 1 into an empty cache (`prefill=True` promises every cache.lengths is 0, or
  prefill=None and the lengths are concrete zeros) runs the training attention over the T
  tokens; otherwise `parallax_jax.decode_attention` with T tokens a sequence reads the cache
  (a chunked prefill, a second turn, a multi-token speculative decode). prefill=True on a
  non-empty cache is a ValueError where the lengths are concrete; traced, those rows' logits
  are NaN.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
               return_hidden: bool = False, prefill: bool | None = None):
    cfg = self.config
    if return_hidden and cache is not None:
      raise ValueError("return_hidden is for training / scoring; not supported with a cache")
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids are not supported together with a KV cache")
    b, t = tokens.shape
    empty = cache is not None and _empty_cache(cache, t, prefill)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      if cache is not None and not empty:
        positions = positions + cache.lengths[:, None].astype(jnp.int32)
    embed = Embed(cfg, name="embed")
    x = constrain(embed(tokens), BLD)
    cos, sin = rope_cos_sin(positions, cfg.resolved_head_dim, cfg.rope_theta)
    lengths = None if cache is None or empty else cache.lengths  # None: the empty prefill

    if cfg.scan_layers:
      block = block_class(cfg, cfg.layer_remat_policy(0), scan=True)
      scanned = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                        split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      layer_cache = None if cache is None else _layer_cache(cache)
      x, new_kv = scanned(cfg, name="layers")(x, cos, sin, segment_ids, layer_cache, lengths)
    else:
      new_kv = None if cache is None else _layer_cache(cache)
      for i in range(cfg.num_layers):
        block = block_class(cfg, cfg.layer_remat_policy(i))
        layer_cache = None if cache is None else tuple(c[i] for c in new_kv)
        x, nc = block(cfg, name=f"layers_{i}")(x, cos, sin, segment_ids, layer_cache, lengths)
        if cache is not None:
          new_kv = tuple(c.at[i].set(n) for c, n in zip(new_kv, nc))

    x = RMSNorm("embed", cfg.rms_norm_eps, dtype=cfg.compute_dtype,
                param_dtype=cfg.weight_dtype, name="final_norm")(x)
    head = None if cfg.tie_embeddings else LMHead(cfg, name="lm_head")
    if return_hidden:
      x = constrain(x, BLD)
      if head is None:
        return x, embed.embedding, "vd"
      return x, head.kernel, "dv"
    logits = embed.attend(x) if head is None else head(x)
    logits = constrain(logits.astype(jnp.float32),
                       ("activation_batch", "activation_length", "activation_vocab"))
    if cache is None:
      return logits
    if empty and prefill:  # promised empty, traced: a row that was not is NaN, not garbage
      logits = jnp.where((cache.lengths != 0)[:, None, None], jnp.nan, logits)
    return logits, cache.replace(k=new_kv[0], v=new_kv[1], lengths=cache.lengths + t,
                                 arrivals=new_kv[2] if len(new_kv) > 2 else cache.arrivals)


def _empty_cache(cache: KVCache, t: int, prefill: bool | None) -> bool:
  """Whether T tokens go to an empty cache through the prefill path (see Qwen3Model)."""
  held = None if isinstance(cache.lengths, jax.core.Tracer) else np.asarray(cache.lengths)
  if prefill and held is not None and held.any():
    raise ValueError(f"prefill=True on a cache that is not empty: cache.lengths "
                     f"{held.tolist()} (prefill=None continues it)")
  if prefill is None:
    return t > 1 and held is not None and not held.any()
  return prefill and t > 1  # one token: the decode step is the same computation


def _layer_cache(cache: KVCache) -> tuple:
  """The per-layer-stacked arrays one decoder layer reads: (k, v[, arrivals])."""
  return (cache.k, cache.v) if cache.arrivals is None else (cache.k, cache.v, cache.arrivals)


# --------------------------------------------------------------------------- params
def _dummy_tokens():
  return jnp.zeros((1, 1), jnp.int32)


def init_params(config: ModelConfig, rng: Any, *, boxed: bool = False):
  """Initialised parameters (unboxed arrays unless boxed=True keeps nn.Partitioned).

  Unrolled layers are initialised as the scanned model and unstacked: the same values as
  `scan_layers=True` at the same rng, and one layer's initialisers in the compiled program
  instead of num_layers copies (the 12-layer study model: 146 XLA fusions instead of 1119)."""
  if not isinstance(rng, jax.Array) or not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
  if not config.scan_layers and config.num_layers > 1:
    stacked = init_params(config.replace(scan_layers=True, remat_policy="none"), rng,
                          boxed=boxed)
    return _unstack_layers(stacked, config.num_layers)
  variables = Qwen3Model(config).init(rng, _dummy_tokens())
  return variables["params"] if boxed else nn.unbox(variables["params"])


def _unstack_layers(params, num_layers: int):
  """`layers/...` with a leading layer axis -> `layers_{i}/...` (boxed leaves lose the
  'layers' axis name)."""
  def take(x, i):
    if isinstance(x, nn.Partitioned):
      return x.replace(value=x.value[i], names=x.names[1:])
    return x[i]

  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: take(x, i), params["layers"],
                                      is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return out


def abstract_params(config: ModelConfig, *, boxed: bool = False):
  """ShapeDtypeStruct tree of the parameters (no memory allocated; jax.eval_shape)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0), boxed=boxed))


def logical_param_specs(config: ModelConfig):
  """Tree of logical PartitionSpecs (axis names) matching the parameter tree."""
  return nn.get_partition_spec(abstract_params(config, boxed=True))


def count_params(params) -> int:
  """Number of scalars in a (possibly abstract) parameter tree."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def param_count(config: ModelConfig, *, embeddings: bool = True) -> int:
  """Analytic parameter count (equals `count_params(abstract_params(config))`).

  embeddings=False drops the token embedding and the (untied) LM head.
  """
  d, hq, hkv, dh, f = (config.hidden_size, config.num_heads, config.num_kv_heads,
                       config.resolved_head_dim, config.intermediate_size)
  attn = d * hq * dh + 2 * d * hkv * dh + hq * dh * d + 2 * dh
  if config.has_probe_params:
    attn += d * hq * dh + (dh if config.r_norm else 0)
  if config.learnable_bandwidth:
    attn += hq
  if config.correction_gate:
    attn += d * hq + hq
  layer = attn + 3 * d * f + 2 * d
  total = config.num_layers * layer + d
  if embeddings:
    total += config.vocab_size * d * (1 if config.tie_embeddings else 2)
  return total


def mean_context(config: ModelConfig, seq_len: int) -> float:
  """Average number of keys a query sees in a causal sequence of seq_len (with the window)."""
  w = config.window
  if w is None or w >= seq_len:
    return (seq_len + 1) / 2
  # positions 0..w-1 see i+1 keys, the rest see w
  return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def attention_core_flops(config: ModelConfig, seq_len: int, context: float | None = None) -> float:
  """Forward FLOPs per token of one layer's attention core (no projections).

  Counted as the quadratic (parallel) form with 2 FLOPs per multiply-add, each [T,S]x[S,Dh]
  -like matmul costing 2 * Hq * Dh * ctx per token (ctx = mean visible keys):
    softmax (constant): S = Q K^T, O = P V                            -> 2 matmuls
    learned probe, affine/boundary: S1, S2 = R K^T, O1, O2 = P2 V     -> 4 matmuls
    query probe, affine/boundary: S2 = h S1 is free                   -> 3 matmuls
    linear affine: S (unless h = inf), t = rho K^T, (a t) V           -> 2-3 matmuls
    solve probe: weighted second moments sum_j a_j (k_j - c)(k_j - c)^T (2 Hq Dh^2 ctx), a
      D x D solve per query and head (2/3 Dh^3 + 2 Dh^2), then the learned-probe matmuls.
  The two-call gate fallback (boundary or solve with correction_gate) adds a softmax pass.
  Elementwise work (exp, masks) is not counted. `context` overrides ctx (e.g. seq_len for a
  dense implementation that computes every (query, key) pair).
  """
  hq, dh = config.num_heads, config.resolved_head_dim
  ctx = mean_context(config, seq_len) if context is None else context
  mm = 2.0 * hq * dh * ctx
  probe, affine = config.resolved_probe, config.resolved_affine
  finite = math.isfinite(config.resolved_bandwidth) or config.learnable_bandwidth
  extra = 0.0
  if affine == "constant":
    n = 2
  elif affine == "linear":
    n = 2 + (1 if finite else 0)
  elif probe == "query":
    n = 3
  elif probe == "none":
    n = 2
  else:
    n = 4
  if probe == "solve":
    extra += 2.0 * hq * dh * dh * ctx + hq * (2.0 / 3.0 * dh ** 3 + 2.0 * dh * dh)
  if config.correction_gate and not (affine == "affine" and probe in ("learned", "query")):
    n += 2
  return n * mm + extra


def flops_per_token(config: ModelConfig, seq_len: int, *, training: bool = False,
                    context: float | None = None) -> float:
  """Matmul FLOPs per token for sequences of seq_len (forward; x3 with training=True).

  = 2 * (matmul parameters per layer) * num_layers + attention core (`attention_core_flops`)
    * num_layers + 2 * d * V for the LM head. The embedding lookup is free; norms, RoPE,
  the gate's sigmoid and the bandwidth are not counted. `context`: see attention_core_flops.
  """
  d, hq, hkv, dh, f = (config.hidden_size, config.num_heads, config.num_kv_heads,
                       config.resolved_head_dim, config.intermediate_size)
  mat = 2 * d * hq * dh + 2 * d * hkv * dh + 3 * d * f
  if config.has_probe_params:
    mat += d * hq * dh
  if config.correction_gate:
    mat += d * hq
  per_layer = 2.0 * mat + attention_core_flops(config, seq_len, context)
  fwd = config.num_layers * per_layer + 2.0 * d * config.vocab_size
  return 3.0 * fwd if training else fwd


# --------------------------------------------------------------------------- checkpoints
CONFIG_FILE = "model_config.json"


def save_checkpoint(path: str, params, config: ModelConfig) -> str:
  """Save unboxed params (orbax, under path/params) and the config (path/model_config.json)."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(config.to_dict(), f, indent=1)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, "params"), nn.unbox(params), force=True)
  ckptr.wait_until_finished()
  return path


def load_config(path: str) -> ModelConfig:
  with open(os.path.join(path, CONFIG_FILE)) as f:
    return ModelConfig.from_dict(json.load(f))


def load_checkpoint(path: str, config: ModelConfig | None = None):
  """(config, params) from `save_checkpoint`'s layout; `config` overrides the stored one
  (it must describe the same parameter shapes)."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  config = load_config(path) if config is None else config
  target = abstract_params(config)
  params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), target)
  return config, params
