"""Flax Linen layers of a Qwen3-style decoder with a swappable attention-family member.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and every large
activation a logical constraint (`nn.with_logical_constraint`); `LOGICAL_AXIS_NAMES` lists them
all so a training setup can map them to a mesh with one rule table. Without rules in scope the
constraints are no-ops.

Parameter paths (relied on by the optimizer's routing; keep them stable), inside a layer:
  attn/{q,r}_proj/kernel [d, Hq, Dh]   attn/{k,v}_proj/kernel [d, Hkv, Dh]
  attn/o_proj/kernel [Hq, Dh, d]       attn/{q,k,r}_norm/scale [Dh]
  attn/log_bandwidth [Hq]              attn/gate/{kernel [d, Hq], bias [Hq]}
  mlp/{gate,up}_proj/kernel [d, F]     mlp/down_proj/kernel [F, d]
  input_norm/scale [d]                 post_attn_norm/scale [d]
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.attention import ATTN_RESIDUALS
from parallax_jax import api as _api

if TYPE_CHECKING:  # annotation only: importing parallax_jax.models here would be circular
  from parallax_jax.models.config import ModelConfig

Array = jax.Array

# Logical axis names of parameters.
PARAM_AXES = ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "layers")
# Logical axis names of activations (kept distinct from the parameter names so that e.g.
# FSDP can shard parameter 'embed' while activation 'activation_embed' stays replicated).
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed",
                   "activation_q_heads", "activation_kv_heads", "activation_head_dim",
                   "activation_mlp", "activation_vocab", "cache_length")
LOGICAL_AXIS_NAMES = PARAM_AXES + ACTIVATION_AXES

BLD = ("activation_batch", "activation_length", "activation_embed")
BLHD_Q = ("activation_batch", "activation_length", "activation_q_heads", "activation_head_dim")
BLHD_KV = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
BSHD_CACHE = ("activation_batch", "cache_length", "activation_kv_heads", "activation_head_dim")


def constrain(x, names):
  return nn.with_logical_constraint(x, names)


def _mesh_axis_size(mesh, entry) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(mesh.shape[n] for n in names)


def shard_attention(call: Callable, q, k, v, r, seg, bandwidth, state=None):
  """call(q, k, v, r, seg, bandwidth) per shard of the context mesh (`jax.set_mesh`).

  Attention is independent per sequence and per head, but XLA cannot partition a Pallas
  custom call: left to the SPMD partitioner, a batch-sharded q/k/v is all-gathered and every
  device runs the whole global batch. Under a mesh this wraps the call in `jax.shard_map` with
  the batch and head axes the logical rules give the activations (heads only when Hq and Hkv
  both divide, so every GQA group stays on one shard). Without a mesh (or rules) it is a plain
  call. With `state` (the decode kernel's carried arrival counter, [B, Hkv], split like k's
  batch and heads) the call is call(q, k, v, r, seg, bandwidth, state) -> (o, state).
  """
  extra = () if state is None else (state,)
  mesh = jax.sharding.get_abstract_mesh()
  spec_q = nn.logical_to_mesh_axes(BLHD_Q)
  if mesh.empty or mesh.size == 1 or spec_q is None:
    return call(q, k, v, r, seg, bandwidth, *extra)
  batch, heads = spec_q[0], spec_q[2]
  if nn.logical_to_mesh_axes(BLHD_KV)[2] != heads:
    heads = None
  if batch is not None and q.shape[0] % _mesh_axis_size(mesh, batch):
    batch = None
  if heads is not None and (q.shape[2] % _mesh_axis_size(mesh, heads)
                            or k.shape[2] % _mesh_axis_size(mesh, heads)):
    heads = None
  if batch is None and heads is None:
    return call(q, k, v, r, seg, bandwidth, *extra)
  P = jax.sharding.PartitionSpec
  bhd = P(batch, None, heads, None)
  specs = (bhd, bhd, bhd, None if r is None else bhd, jax.tree.map(lambda _: P(batch, None), seg))
  extra_specs = (P(batch, heads),) * len(extra)
  out_specs = (bhd, *extra_specs) if extra else bhd
  if isinstance(bandwidth, jax.Array):
    fn, args = call, (q, k, v, r, seg, bandwidth, *extra)
    specs += (P(heads) if bandwidth.ndim == 1 else P(),) + extra_specs
  else:  # python float: keep it static
    fn = lambda q_, k_, v_, r_, s_, *e: call(q_, k_, v_, r_, s_, bandwidth, *e)
    args, specs = (q, k, v, r, seg, *extra), specs + extra_specs
  return jax.shard_map(fn, in_specs=specs, out_specs=out_specs, check_vma=False)(*args)


def remat_policy(name: str):
  """jax.checkpoint policy for a config name (None for 'none', which means no remat)."""
  cp = jax.checkpoint_policies
  policies = {
      "none": None,
      "full": cp.nothing_saveable,
      "dots": cp.checkpoint_dots,
      "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
      "attn_out": cp.save_only_these_names("attn_out"),
      "qkv_attn_out": cp.save_only_these_names("q", "k", "v", "r", "attn_out"),
      # dots plus the Pallas attention residuals (o, lse, tbar, vbar): the backward pass
      # then skips rerunning the forward attention kernel.
      "dots_attn": cp.save_from_both_policies(
          cp.checkpoint_dots, cp.save_only_these_names(ATTN_RESIDUALS)),
  }
  if name not in policies:
    raise ValueError(f"remat policy must be one of {tuple(policies)}, got {name!r}")
  return policies[name]


class Projection(nn.Module):
  """y = x . W contracting the last `in_dims` axes of x with the first of W ('kernel')."""
  features: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  in_dims: int = 1
  kernel_init: Callable = nn.initializers.normal(0.02)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  out_dtype: Any = None  # preferred_element_type of the contraction (None: dtype)

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[x.ndim - self.in_dims:]
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        tuple(in_shape) + tuple(self.features), self.param_dtype)
    x_axes = tuple(range(x.ndim - self.in_dims, x.ndim))
    k_axes = tuple(range(self.in_dims))
    return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                               ((x_axes, k_axes), ((), ())),
                               preferred_element_type=self.out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def logits_dot(x, w, dtype, w_layout: str = "dv"):
  """LM-head logits `x . W` in float32 from `dtype` (bf16) operands, with a bf16 backward.

  x [..., d] (any float dtype); w: [d, V] (w_layout "dv", a Projection kernel) or [V, d]
  ("vd", a tied embedding), usually the float32 parameter. Forward: one `dtype` matmul with
  float32 accumulation and output. Backward: the float32 logits cotangent is rounded to
  `dtype` once, so both gradient matmuls run on `dtype` tensor cores with float32
  accumulation (autodiff of a mixed bf16 x bf16 -> f32 dot would upcast W and run two f32
  (TF32) matmuls over the [tokens, vocab] cotangent: 2.5x slower on H100, bench/NOTES.md).
  dW is returned in w's dtype from the float32 accumulator; dx in x's dtype.
  """
  return _logits_fwd(x, w, dtype, w_layout)[0]


def _logits_spec(x, w_layout):
  xa = "".join("abcefgh"[i] for i in range(x.ndim - 1))
  return f"{xa}d,{'dv' if w_layout == 'dv' else 'vd'}->{xa}v", xa


def _logits_fwd(x, w, dtype, w_layout):
  if w_layout not in ("dv", "vd"):
    raise ValueError(f"w_layout must be 'dv' or 'vd', got {w_layout!r}")
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):  # an int dtype would truncate x and w
    raise ValueError(f"dtype must be a floating dtype, got {jnp.dtype(dtype)}")
  spec, _ = _logits_spec(x, w_layout)
  y = jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
  return y, (x, w)


def _logits_bwd(dtype, w_layout, res, g):
  x, w = res
  spec, xa = _logits_spec(x, w_layout)
  gh = g.astype(dtype)
  wh, xh = w.astype(dtype), x.astype(dtype)
  wspec = "dv" if w_layout == "dv" else "vd"
  dx = jnp.einsum(f"{xa}v,{wspec}->{xa}d", gh, wh, preferred_element_type=jnp.float32)
  dw = jnp.einsum(f"{xa}d,{xa}v->{wspec}", xh, gh, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


logits_dot.defvjp(_logits_fwd, _logits_bwd)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis, statistics in float32 (Qwen3: y = scale * x / rms(x))."""
  axis_name: str = "embed"
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """cos, sin [B, T, Dh] (float32) for rotate-half RoPE at integer `positions` [B, T]."""
  if (isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) or head_dim < 2
      or head_dim % 2):
    raise ValueError(f"head_dim must be an even int >= 2 for rotate-half RoPE, got {head_dim!r}")
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotate-half RoPE on x [B, T, H, Dh] with cos/sin [B, T, Dh]; computed in float32."""
  # Checked here: a mismatch otherwise fails deep in broadcasting, or (cos of one position
  # against T > 1 tokens) silently rotates every token by the same angle.
  if x.ndim != 4:
    raise ValueError(f"apply_rope: x must be [batch, length, heads, head_dim], got {x.shape}")
  if (cos.shape != sin.shape or cos.ndim != 3 or cos.shape[1:] != (x.shape[1], x.shape[3])
      or cos.shape[0] not in (1, x.shape[0])):
    raise ValueError(f"apply_rope: cos and sin must be [batch, length, head_dim] = "
                     f"{(x.shape[0], x.shape[1], x.shape[3])} (from positions [batch, length]), "
                     f"got cos {cos.shape}, sin {sin.shape}")
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


class Attention(nn.Module):
  """Attention with q/k/v/o projections, QK-norm, RoPE and the family member from the config.

  Parallax's probe r = W_R x is a separate projection shaped like W_Q (`r_proj`), with optional
  RMSNorm and fixed scale (`r_scale`), then the same RoPE as q. The optional sigmoid gate g
  (per position and q-head) multiplies the correction: o = vbar - g C^T r. For
  affine='affine' the output is linear in r, so this is computed exactly with ONE attention
  call by passing g * r as the probe. For 'boundary' (nonlinear in r) or the 'solve' probe
  it costs a second, softmax, call:
  o = vbar + g (o_full - vbar).

  Call: `(x [B,T,d], cos, sin, segment_ids, cache, cache_lengths) -> (y, new_cache)`.
  - cache None: training / full forward (causal over x, optional packed `segment_ids`).
  - cache (k, v) [B,S,Hkv,Dh] (or (k, v, arrivals), arrivals the decode kernel's zeroed
    [B, Hkv] int32 counter, carried through and returned) and cache_lengths None: prefill of
    an empty cache: causal attention over x (the training kernels), k and v written to slots
    [0, T).
  - cache and cache_lengths: the T tokens continue each sequence: k, v written at slots
    cache_lengths[b] + [0, T); token t attends over the first cache_lengths[b] + t + 1 slots
    (and the window) through `parallax_jax.decode_attention` (on GPU the Pallas split-KV
    kernel reading the cache in place, `config.decode_implementation`): T == 1 is a decode
    step, T > 1 a chunked prefill or a multi-token (speculative) decode. Only k and v are
    cached; r is recomputed. cache_lengths must be ints [B] with cache_lengths[b] + T <= S:
    outside, a ValueError where concrete; traced, nothing is written and that row's output
    is NaN.
  """
  config: ModelConfig

  def _init(self, zero=False):
    if zero:
      return nn.initializers.zeros
    return nn.initializers.normal(self.config.init_std)

  @nn.compact
  def __call__(self, x, cos, sin, segment_ids=None, cache=None, cache_lengths=None):
    cfg = self.config
    hq, hkv, dh, dt, pdt = (cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                            cfg.compute_dtype, cfg.weight_dtype)
    probe, affine = cfg.resolved_probe, cfg.resolved_affine

    def proj(name, heads, axis, zero=False):
      return Projection((heads, dh), ("embed", axis, "head_dim"), kernel_init=self._init(zero),
                        dtype=dt, param_dtype=pdt, name=name)(x)

    def norm(name):
      return RMSNorm("head_dim", cfg.resolved_head_norm_eps, dtype=dt, param_dtype=pdt, name=name)

    q = apply_rope(norm("q_norm")(proj("q_proj", hq, "q_heads")), cos, sin)
    k = apply_rope(norm("k_norm")(proj("k_proj", hkv, "kv_heads")), cos, sin)
    v = proj("v_proj", hkv, "kv_heads")
    q = checkpoint_name(constrain(q, BLHD_Q), "q")
    k = checkpoint_name(constrain(k, BLHD_KV), "k")
    v = checkpoint_name(constrain(v, BLHD_KV), "v")

    r = None
    if cfg.has_probe_params:
      r = proj("r_proj", hq, "q_heads", zero=cfg.r_init == "zeros")
      if cfg.r_norm:
        r = norm("r_norm")(r)
      if cfg.r_scale != 1.0:
        r = r * jnp.asarray(cfg.r_scale, r.dtype)
      r = checkpoint_name(constrain(apply_rope(r, cos, sin), BLHD_Q), "r")

    gate = None
    if cfg.correction_gate:
      gate = _Gate(hq, cfg.gate_bias_init, dt, pdt, name="gate")(x)  # [B, T, Hq]
      self.sow("intermediates", "g", gate)

    if cfg.learnable_bandwidth:
      log_bw = self.param("log_bandwidth", nn.with_logical_partitioning(
          nn.initializers.constant(math.log(cfg.resolved_bandwidth)), ("q_heads",)), (hq,), pdt)
      bandwidth = jnp.exp(log_bw.astype(jnp.float32))
    else:
      bandwidth = cfg.resolved_bandwidth

    # Diagnostics (COR, effective weights, ...): apply(..., mutable=["intermediates"]) collects
    # q, k, v, r after norm and RoPE (r before the gate; the gate value is sown as "g"), as the
    # family API receives them in training; free when not requested.
    for name, val in (("q", q), ("k", k), ("v", v), ("r", r)):
      if val is not None:
        self.sow("intermediates", name, val)

    new_cache = None
    decode = False
    arrivals = None
    if cache is not None:
      ck, cv, *arrivals = cache  # (k, v) or (k, v, arrivals): see `KVCache`
      arrivals = arrivals[0] if arrivals else None
      t = x.shape[1]
      _check_cache(ck, cv, k.shape, t)
      if t == 1 or cache_lengths is not None:  # decode step / continuation of the cache
        decode = True
        slots = ck.shape[1]
        cache_lengths = _check_cache_lengths(cache_lengths, x.shape[0], slots, t)
        # A row whose tokens do not all fit writes nothing (a negative index would wrap to the
        # end) and its output is NaN below, not attention that silently misses tokens.
        outside = (cache_lengths < 0) | (cache_lengths > slots - t)
        b = jnp.arange(x.shape[0])[:, None]
        slot = jnp.where(outside[:, None], slots, cache_lengths[:, None] + jnp.arange(t))
        ck = ck.at[b, slot].set(k.astype(ck.dtype), mode="drop")
        cv = cv.at[b, slot].set(v.astype(cv.dtype), mode="drop")
        # The cache is read in place, in its stored dtype (no per-step copy or cast); token t
        # of row b sees slots j <= cache_lengths[b] + t (and, with a window, the `window`
        # latest of them).
        k, v = ck, cv
        lengths = (cache_lengths.astype(jnp.int32) + t)[:, None]  # [B, 1]: shards like seg ids
      else:  # prefill from an empty cache
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, 0, 0))
      new_cache = (constrain(ck, BSHD_CACHE), constrain(cv, BSHD_CACHE))

    def family(probe_, affine_, r_):
      nonlocal arrivals
      r_ = r_ if probe_ == "learned" else None
      if decode:
        def call(q_, k_, v_, r_, len_, bw_, arr_=None):
          return _api.decode_attention(q_, k_, v_, r_, lengths=len_[:, 0], probe=probe_,
                                       affine=affine_, bandwidth=bw_, window=cfg.window,
                                       ridge=cfg.attention_ridge, solver=cfg.solver,
                                       implementation=cfg.resolved_decode_implementation,
                                       arrivals=arr_)
        if arrivals is None:
          return shard_attention(call, q, k, v, r_, lengths, bandwidth)
        o, arrivals = shard_attention(call, q, k, v, r_, lengths, bandwidth, arrivals)
        return o

      def call(q_, k_, v_, r_, seg_, bw_):
        return _api.attention(q_, k_, v_, r_, probe=probe_, affine=affine_, bandwidth=bw_,
                              ridge=cfg.attention_ridge, solver=cfg.solver, causal=True,
                              window=cfg.window,
                              segment_ids=seg_, implementation=cfg.implementation)
      return shard_attention(call, q, k, v, r_, segment_ids, bandwidth)

    if gate is None:
      out = family(probe, affine, r)
    elif affine == "affine" and probe == "learned":
      out = family(probe, affine, r * gate[..., None].astype(r.dtype))  # exact, one call
    elif affine == "affine" and probe == "query":
      # o = vbar - g C^T q: the probe q only enters the correction; still one call, but the
      # probe must differ from q, so route it through the 'learned' probe slot.
      out = family("learned", affine, q * gate[..., None].astype(q.dtype))
    else:  # nonlinear in the probe: o = vbar + g (o_full - vbar), two calls
      base = family("none", "constant", None)
      full = family(probe, affine, r)
      out = base + gate[..., None].astype(base.dtype) * (full - base)
    if decode:
      out = jnp.where(outside[:, None, None, None], jnp.nan, out)
    out = checkpoint_name(constrain(out, BLHD_Q), "attn_out")
    y = Projection((cfg.hidden_size,), ("q_heads", "head_dim", "embed"), in_dims=2,
                   kernel_init=self._init(), dtype=dt, param_dtype=pdt, name="o_proj")(out)
    if new_cache is not None and arrivals is not None:
      new_cache = new_cache + (arrivals,)
    return constrain(y, BLD), new_cache


def _check_cache(ck, cv, k_shape, t):
  """The cache must be [B, S, Hkv, Dh] like k, and a prefill must fit in its S slots."""
  want = (k_shape[0], ck.shape[1], k_shape[2], k_shape[3])
  if ck.ndim != 4 or ck.shape != want or cv.shape != ck.shape:
    raise ValueError(f"cache (k, v) must be [batch, slots, kv_heads, head_dim] = {want}, got "
                     f"{ck.shape} and {cv.shape}")
  if t > ck.shape[1]:
    raise ValueError(f"prefill of {t} tokens does not fit the cache's {ck.shape[1]} slots")


def _check_cache_lengths(cache_lengths, batch, slots, t=1):
  """cache_lengths of a decode step or continuation: ints [B], each with room for the T new
  tokens (in [0, slots - T]) where concrete."""
  if (cache_lengths is None or jnp.shape(cache_lengths) != (batch,)
      or not jnp.issubdtype(jnp.result_type(cache_lengths), jnp.integer)):
    got = None if cache_lengths is None else (jnp.shape(cache_lengths),
                                              jnp.result_type(cache_lengths))
    raise ValueError(f"a decode step (T == 1 with a cache) needs cache_lengths: ints of shape "
                     f"[batch]=({batch},), the slot each new token is written to; got {got}")
  if _api._is_concrete(cache_lengths):
    n = np.asarray(cache_lengths)
    if n.size and (n.min() < 0 or n.max() > slots - t):
      raise ValueError(f"cache_lengths {n.tolist()} must be in [0, {slots - t + 1}) (the "
                       f"cache's {slots} slots, {t} new token{'s' * (t > 1)})")
  return jnp.asarray(cache_lengths)


class _Gate(nn.Module):
  """g = sigmoid(x W_g + b), W_g [d, Hq] zero-initialised, b [Hq] = bias_init."""
  heads: int
  bias_init: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("embed", "q_heads")),
                        (x.shape[-1], self.heads), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.constant(self.bias_init), ("q_heads",)), (self.heads,), self.param_dtype)
    logits = jnp.einsum("btd,dh->bth", x.astype(self.dtype), kernel.astype(self.dtype))
    return jax.nn.sigmoid(logits.astype(jnp.float32) + bias.astype(jnp.float32))


class MLP(nn.Module):
  """SwiGLU without bias: down(silu(gate(x)) * up(x))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    init = nn.initializers.normal(cfg.init_std)
    kw = dict(kernel_init=init, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    f = cfg.intermediate_size
    g = Projection((f,), ("embed", "mlp"), name="gate_proj", **kw)(x)
    u = Projection((f,), ("embed", "mlp"), name="up_proj", **kw)(x)
    h = constrain(jax.nn.silu(g) * u, ("activation_batch", "activation_length", "activation_mlp"))
    return Projection((cfg.hidden_size,), ("mlp", "embed"), name="down_proj", **kw)(h)


class DecoderBlock(nn.Module):
  """Pre-norm block: h = x + attn(input_norm(x)); y = h + mlp(post_attn_norm(h)).

  Returns (y, new_layer_cache) so it can be used directly as an `nn.scan` body.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, segment_ids=None, cache=None, cache_lengths=None):
    cfg = self.config
    kw = dict(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    x = constrain(x, BLD)
    a, new_cache = Attention(cfg, name="attn")(RMSNorm("embed", name="input_norm", **kw)(x),
                                               cos, sin, segment_ids, cache, cache_lengths)
    h = x + a
    y = h + MLP(cfg, name="mlp")(RMSNorm("embed", name="post_attn_norm", **kw)(h))
    return constrain(y.astype(cfg.compute_dtype), BLD), new_cache


def block_class(config: ModelConfig, policy: str, scan: bool = False) -> type[nn.Module]:
  """DecoderBlock wrapped in nn.remat with `policy` ('none': unwrapped)."""
  if policy == "none":
    return DecoderBlock
  return nn.remat(DecoderBlock, policy=remat_policy(policy), prevent_cse=not scan)


def logical_axis_rules_example() -> Sequence[tuple[str, Any]]:
  """The rule table of the training loop (`train.mesh.RULES`), for a mesh with axes
  ('data', 'fsdp', 'tensor'): batch over data x fsdp, parameters' 'embed' over fsdp (ZeRO-3
  style), heads, MLP width and vocab over tensor. Adapt per mesh."""
  batch = ("data", "fsdp")
  return (
      ("activation_batch", batch), ("activation_length", None), ("activation_embed", None),
      ("activation_q_heads", "tensor"), ("activation_kv_heads", "tensor"),
      ("activation_head_dim", None), ("activation_mlp", "tensor"),
      ("activation_vocab", "tensor"), ("cache_length", None),
      ("vocab", "tensor"), ("embed", "fsdp"), ("q_heads", "tensor"), ("kv_heads", "tensor"),
      ("head_dim", None), ("mlp", "tensor"), ("layers", None),
  )
