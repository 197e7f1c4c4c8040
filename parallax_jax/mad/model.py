"""MAD's default model with any attention-family member as its token mixer.

Language-model backbone (MAD's `LanguageModel`): token embedding, then `num_layers` x
[token mixer, SwiGLU], each sublayer pre-norm (RMSNorm) with a residual, then a final norm and
an untied linear head with bias. Auto-encoder backbone (MAD's `AutoEncoder`, compression): the
same encoder; its last position is pooled, sinusoidal positions are added to it and a two-layer
(norm, linear, GELU) MLP decodes every position.

The mixer is MAD's multi-head attention (q/k/v/o projections with bias, full-width rotary
embeddings, 1/sqrt(head_dim) scale) with its softmax replaced by `parallax_jax.attention` with
the member's (bandwidth, probe, affine). For the learned probe, r = W_R x (`r_proj`, shaped like
q_proj, the same RoPE as q) follows the library's model convention: zero-initialised by default,
so a new Parallax model computes exactly the softmax model, with `r_init='like_q'`, `r_norm`
(RMSNorm on r), `r_scale` (a fixed factor on r after its norm) and `r_rope=False` (no RoPE on
r) as options.

Initialisation (`init_params`, on the host with NumPy: XLA's CPU compile of a jitted Flax init
costs seconds per model, more than a whole smoke test) follows MAD: the language model keeps
PyTorch's nn.Linear default for weights (uniform +-1/sqrt(fan_in)), zero biases and N(0, 0.02)
embeddings; the auto-encoder draws every weight from N(0, 0.02); `init_std` replaces both with
N(0, init_std). Each leaf has its own stream, keyed by (seed, path), so members that share a
parameter share its initial value. The modules' own initialisers are placeholders.

Parameter paths match `parallax_jax.optim`'s routing: `layer_{i}/attn/{q,k,v,r,o}_proj/kernel`
and `layer_{i}/mlp/{gate,up,down}_proj/kernel` reach Muon, `embed/`, `lm_head/`, norms and biases
AdamW; `MUON_ROUTING` also sends the auto-encoder's decoder matrices to Muon.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parallax_jax import api
from parallax_jax.nn.layers import apply_rope, rope_cos_sin
from parallax_jax.optim import routing as rt

BACKBONES = ("lm", "autoencoder")
R_INITS = ("zeros", "like_q")
DTYPES = ("float32", "bfloat16")

MUON_ROUTING = rt.Routing(rules=rt.DEFAULT_RULES + (
    rt.Rule(r"(^|/)decoder_\d+/kernel$", rt.MUON, rt.MatrixView(2, (0,), (1,))),))


def member_spec(member: str) -> tuple[float | None, str, str]:
  """(bandwidth, probe, affine) of a member: a name of `parallax_jax.MEMBERS`, or
  'probe:affine[:bandwidth]' with bandwidth a number, 'inf' or 'default' (sqrt(head_dim))."""
  if member in api.MEMBERS:
    return api.MEMBERS[member]
  parts = member.split(":")
  if len(parts) not in (2, 3):
    raise ValueError(f"member: expected a name of {tuple(api.MEMBERS)} or "
                     f"'probe:affine[:bandwidth]', got {member!r}")
  probe, affine = parts[:2]
  if probe not in api.PROBES or affine not in api.AFFINES:
    raise ValueError(f"member: {member!r} needs a probe of {api.PROBES} and an affine of "
                     f"{api.AFFINES}")
  bandwidth = None
  if len(parts) == 3 and parts[2] != "default":
    try:
      bandwidth = float(parts[2])
    except ValueError:
      raise ValueError(f"member: bandwidth of {member!r} must be a number, 'inf' or "
                       f"'default'") from None
    if not bandwidth > 0:
      raise ValueError(f"member: bandwidth of {member!r} must be > 0, got {bandwidth}")
  return bandwidth, probe, affine


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The MAD model. mlp_width None is MAD's SwiGLU width, 16 * ceil(int(8 width / 3) / 16)
  (352 at width 128). ridge and solver are read by solve-probe members only ('lla', 'mesa',
  ...), where a ridge > 0 keeps the first positions' local regressions well posed."""
  vocab_size: int
  seq_len: int
  backbone: str = "lm"
  width: int = 128
  num_layers: int = 2
  num_heads: int = 16
  mlp_width: int | None = None
  member: str = "softmax"
  ridge: float = 1e-2
  solver: str = "direct"
  rope: bool = True
  rope_theta: float = 10_000.0
  attn_bias: bool = True
  r_init: str = "zeros"
  r_norm: bool = False
  r_scale: float = 1.0
  r_rope: bool = True
  init_std: float | None = None
  norm_eps: float = 1e-5
  dtype: str = "bfloat16"
  implementation: str | None = None  # None: the library's choice (Pallas on GPU where it applies)

  def __post_init__(self):
    for key in ("vocab_size", "seq_len", "width", "num_layers", "num_heads"):
      v = getattr(self, key)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"ModelConfig.{key}: must be an int >= 1, got {v!r}")
    if self.width % self.num_heads:
      raise ValueError(f"ModelConfig.num_heads: must divide width ({self.width}), got "
                       f"{self.num_heads}")
    if self.rope and self.head_dim % 2:
      raise ValueError(f"ModelConfig.rope: needs an even head_dim, got {self.head_dim}")
    if self.backbone not in BACKBONES:
      raise ValueError(f"ModelConfig.backbone: expected one of {BACKBONES}, got {self.backbone!r}")
    if self.r_init not in R_INITS:
      raise ValueError(f"ModelConfig.r_init: expected one of {R_INITS}, got {self.r_init!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"ModelConfig.dtype: expected one of {DTYPES}, got {self.dtype!r}")
    if self.implementation not in api.IMPLEMENTATIONS + (None,):
      raise ValueError(f"ModelConfig.implementation: expected one of {api.IMPLEMENTATIONS} or "
                       f"None, got {self.implementation!r}")
    if self.solver not in api.SOLVERS:
      raise ValueError(f"ModelConfig.solver: expected one of {api.SOLVERS}, got "
                       f"{self.solver!r}")
    why = api.unrolled_refusal(self.solver, member_spec(self.member)[1], self.head_dim)
    if why:
      raise ValueError(f"ModelConfig.solver: {why}")
    if not 0 <= self.ridge < math.inf:
      raise ValueError(f"ModelConfig.ridge: must be a finite number >= 0, got {self.ridge!r}")
    if isinstance(self.r_scale, bool) or not (isinstance(self.r_scale, (int, float))
                                              and 0 < self.r_scale < math.inf):
      raise ValueError(f"ModelConfig.r_scale: must be a finite number > 0, got {self.r_scale!r}")
    if self.init_std is not None and not 0 < self.init_std < math.inf:
      raise ValueError(f"ModelConfig.init_std: must be a finite number > 0 or None, got "
                       f"{self.init_std!r}")
    _, probe, affine = member_spec(self.member)  # raises on a bad member
    if self.implementation == "pallas" and api._pallas_member(probe, affine) is None:
      raise ValueError(f"ModelConfig.implementation: 'pallas' runs softmax and Parallax only, "
                       f"got member {self.member!r}")

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def ffn_width(self) -> int:
    if self.mlp_width is not None:
      return self.mlp_width
    return 16 * -(-int(8 * self.width / 3) // 16)

  @property
  def spec(self) -> tuple[float | None, str, str]:
    return member_spec(self.member)

  @property
  def has_probe(self) -> bool:
    _, probe, affine = self.spec
    return probe == "learned" and affine != "constant"

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def attention_implementation(cfg: ModelConfig, batch: int, length: int) -> str:
  """What the mixer's `parallax_jax.attention` call runs at [batch, length] on the default
  backend (cfg.implementation, or the library's choice for None)."""
  bandwidth, probe, affine = cfg.spec
  x = jax.ShapeDtypeStruct((batch, length, cfg.num_heads, cfg.head_dim), cfg.compute_dtype)
  return api.chosen_implementation(x, x, x, x if cfg.has_probe else None, probe=probe,
                                   affine=affine, implementation=cfg.implementation,
                                   bandwidth=bandwidth)


class Dense(nn.Module):
  """y = x . kernel (+ bias), contracting the last `in_dims` axes of x; float32 parameters."""
  features: tuple[int, ...]
  in_dims: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[x.ndim - self.in_dims:]
    kernel = self.param("kernel", nn.initializers.zeros, tuple(in_shape) + tuple(self.features))
    y = jax.lax.dot_general(
        x.astype(self.dtype), kernel.astype(self.dtype),
        ((tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims))), ((), ())))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, tuple(self.features)).astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


class Mixer(nn.Module):
  """Multi-head attention whose weights come from the family member."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    proj = lambda name: Dense((cfg.num_heads, cfg.head_dim), use_bias=cfg.attn_bias, dtype=dt,
                              name=name)(x)
    q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
    r = None
    if cfg.has_probe:
      r = proj("r_proj")
      if cfg.r_norm:
        r = RMSNorm(cfg.norm_eps, dt, name="r_norm")(r)
      if cfg.r_scale != 1.0:
        r = r * jnp.asarray(cfg.r_scale, r.dtype)
    if cfg.rope:
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
      if r is not None and cfg.r_rope:
        r = apply_rope(r, cos, sin)
    bandwidth, probe, affine = cfg.spec
    o = api.attention(q, k, v, r, probe=probe, affine=affine, bandwidth=bandwidth,
                      ridge=cfg.ridge if probe == "solve" else 0.0, solver=cfg.solver,
                      implementation=cfg.implementation)
    return Dense((cfg.width,), in_dims=2, use_bias=cfg.attn_bias, dtype=dt, name="o_proj")(o)


class SwiGLU(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    dense = lambda n, name: Dense((n,), dtype=dt, name=name)
    h = jax.nn.silu(dense(cfg.ffn_width, "gate_proj")(x)) * dense(cfg.ffn_width, "up_proj")(x)
    return dense(cfg.width, "down_proj")(h)


class Sublayer(nn.Module):
  """x + inner(norm(x)), inner the mixer ('attn') or the SwiGLU ('mlp')."""
  cfg: ModelConfig
  kind: str

  @nn.compact
  def __call__(self, x, cos, sin):
    h = RMSNorm(self.cfg.norm_eps, self.cfg.compute_dtype, name="norm")(x)
    if self.kind == "attn":
      return x + Mixer(self.cfg, name="attn")(h, cos, sin)
    return x + SwiGLU(self.cfg, name="mlp")(h)


def sincos_positions(length: int, width: int) -> np.ndarray:
  """MAD's decoder positions (fairseq layout): [sin(p w_i) | cos(p w_i)], w_i = 1e4^(-i/(h-1))."""
  half = width // 2
  freqs = np.exp(np.arange(half) * -(math.log(10_000.0) / (half - 1)))
  ang = np.arange(length)[:, None] * freqs[None]
  emb = np.concatenate([np.sin(ang), np.cos(ang)], axis=1)
  return np.pad(emb, ((0, 0), (0, width % 2))).astype(np.float32)


class MADModel(nn.Module):
  """tokens [B, T] int -> logits [B, T, vocab] float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    b, t = tokens.shape
    x = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.initializers.zeros,
                 name="embed")(tokens).astype(dt)
    cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(t), (b, t)), cfg.head_dim,
                            cfg.rope_theta)
    for i in range(cfg.num_layers):
      x = Sublayer(cfg, "attn", name=f"layer_{2 * i}")(x, cos, sin)
      x = Sublayer(cfg, "mlp", name=f"layer_{2 * i + 1}")(x, cos, sin)
    if cfg.backbone == "autoencoder":
      x = x[:, -1:, :] + jnp.asarray(sincos_positions(t, cfg.width), dt)[None]
      for i in range(2):
        h = RMSNorm(cfg.norm_eps, dt, name=f"decoder_{i}_norm")(x)
        x = jax.nn.gelu(Dense((cfg.width,), use_bias=True, dtype=dt, name=f"decoder_{i}")(h),
                        approximate=False)
    x = RMSNorm(cfg.norm_eps, dt, name="final_norm")(x)
    logits = Dense((cfg.vocab_size,), use_bias=True, dtype=dt, name="lm_head")(x)
    return logits.astype(jnp.float32)


def param_shapes(cfg: ModelConfig):
  """The parameter tree of `MADModel(cfg)` as ShapeDtypeStructs (tracing only)."""
  tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
  return jax.eval_shape(lambda t: MADModel(cfg).init(jax.random.key(0), t), tokens)["params"]


def init_params(cfg: ModelConfig, seed: int):
  """MAD's initialisation of `MADModel(cfg)` as a tree of float32 NumPy arrays."""

  def one(path, leaf):
    name = rt.path_str(path)
    shape = leaf.shape
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    last = name.rsplit("/", 1)[-1]
    if last == "scale":
      return np.ones(shape, np.float32)
    if last == "bias" or (name.endswith("r_proj/kernel") and cfg.r_init == "zeros"):
      return np.zeros(shape, np.float32)
    if last == "embedding":
      return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    if cfg.init_std is not None or cfg.backbone == "autoencoder":
      std = 0.02 if cfg.init_std is None else cfg.init_std
      return (std * rng.standard_normal(shape)).astype(np.float32)
    fan_in = math.prod(shape[:2 if name.endswith("o_proj/kernel") else 1])
    bound = 1.0 / math.sqrt(fan_in)  # PyTorch nn.Linear: kaiming_uniform(a=sqrt(5))
    return rng.uniform(-bound, bound, shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, param_shapes(cfg))
