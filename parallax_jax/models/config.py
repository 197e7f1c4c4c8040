"""`ModelConfig`: the one typed, frozen, validated description of a Qwen3-style model.

Every key is checked in `__post_init__`; a bad value raises `ValueError` whose message starts
with `ModelConfig.<key>:` so the offending key is named. `dataclasses.replace(cfg, ...)` re-runs
the checks. Configs are hashable (usable as static arguments / Flax module attributes) and
round-trip through JSON (`to_dict` / `from_dict`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from parallax_jax.api import (AFFINES, DECODE_IMPLEMENTATIONS, IMPLEMENTATIONS, MEMBERS, PROBES,
                              SOLVERS, unrolled_refusal)

# Per-layer rematerialisation policies (see `parallax_jax.nn.layers.remat_policy`).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "attn_out", "qkv_attn_out",
                  "dots_attn")
R_INITS = ("zeros", "like_q")
DTYPES = ("float32", "bfloat16", "float16", "float64")


def _err(key: str, msg: str):
  raise ValueError(f"ModelConfig.{key}: {msg}")


def _check_int(cfg, key, minimum=1, allow_none=False):
  v = getattr(cfg, key)
  if v is None and allow_none:
    return
  if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
    _err(key, f"must be an int >= {minimum}{' or None' if allow_none else ''}, got {v!r}")


def _check_choice(cfg, key, choices, allow_none=False):
  v = getattr(cfg, key)
  if v is None and allow_none:
    return
  if v not in choices:
    _err(key, f"unknown value {v!r}; expected one of {tuple(choices)}"
         f"{' or None' if allow_none else ''}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Qwen3 architecture with a swappable attention-family member.

  Architecture (defaults: Qwen3-0.6B):
    vocab_size, hidden_size (d), num_layers, num_heads (Hq), num_kv_heads (Hkv; GQA when
    Hq is a multiple of it), head_dim (Dh; None means hidden_size // num_heads; Qwen3 decouples
    it from hidden_size), intermediate_size (SwiGLU width F), max_seq_len, rope_theta,
    rms_norm_eps, tie_embeddings, init_std (normal init of every projection and the embedding),
    head_norm_eps (eps of the per-head q/k/r RMSNorm; None: rms_norm_eps. fla's Parallax model
    fixes it at 1e-5 whatever its norm_eps, so a model read from that format sets it).

  Attention:
    attention: a member name of `parallax_jax.MEMBERS` ('softmax', 'parallax', 'lla',
      'lla_affine', 'linear', 'mesa', 'least_squares').
    probe / affine: optional overrides of the member's probe and affine axes.
    bandwidth: h in exp(q.k / h); None means the member's default (sqrt(head_dim), or inf for
      the linear-attention end of the family). A float, or inf.
    learnable_bandwidth: a per-head parameter `attn/log_bandwidth` [Hq] initialised at log(h).
    ridge, solver: for the 'solve' probe. ridge 0.0 (the default) means the family API's
      default, `parallax_jax.api.SOLVE_RIDGE` (1e-3): at exactly 0 the first head_dim
      positions' systems are singular in a causal model, which would make it NaN.
    window: sliding-window size (keys kept, including the diagonal) or None.
    implementation: 'xla' | 'chunked' | 'pallas' | 'moments' | None (the family API chooses).
    decode_implementation: 'xla' | 'pallas' | None for a generation decode step
      (`parallax_jax.decode_attention`); None follows `implementation` ('chunked' and
      'moments' -> 'xla'; None: the Pallas decode kernel on GPU where it applies).
    r_init: 'zeros' (W_R = 0: exactly the softmax model at init) or 'like_q'.
    r_norm: per-head RMSNorm on r (`attn/r_norm/scale`), like Qwen3's QK-norm.
    r_scale: a fixed factor on r after its norm, before RoPE (1.0: none); e.g. to start a
      normalised probe small while W_R is initialised like W_Q.
    correction_gate: o = vbar - g * C^T r with g = sigmoid(x W_g + b) per position and head
      (`attn/gate/kernel` [d, Hq], `attn/gate/bias` [Hq]); gate_bias_init sets b at init.

  Numerics and structure:
    dtype (compute, default bfloat16), param_dtype (default float32), remat_policy (one of
    REMAT_POLICIES, or a tuple with one per layer when scan_layers is False), scan_layers
    (stack layers with nn.scan: params get a leading 'layers' axis under `layers/`).
  """
  vocab_size: int = 151936
  hidden_size: int = 1024
  num_layers: int = 28
  num_heads: int = 16
  num_kv_heads: int = 8
  head_dim: int | None = 128
  intermediate_size: int = 3072
  max_seq_len: int = 40960
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  head_norm_eps: float | None = None
  tie_embeddings: bool = True
  init_std: float = 0.02
  # attention
  attention: str = "parallax"
  probe: str | None = None
  affine: str | None = None
  bandwidth: float | None = None
  learnable_bandwidth: bool = False
  ridge: float = 0.0
  solver: str = "direct"
  window: int | None = None
  implementation: str | None = None
  decode_implementation: str | None = None
  r_init: str = "zeros"
  r_norm: bool = False
  r_scale: float = 1.0
  correction_gate: bool = False
  gate_bias_init: float = 0.0
  # numerics / structure
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  remat_policy: str | tuple[str, ...] = "none"
  scan_layers: bool = False

  def __post_init__(self):
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "intermediate_size", "max_seq_len"):
      _check_int(self, key)
    _check_int(self, "head_dim", allow_none=True)
    _check_int(self, "window", allow_none=True)
    if self.num_heads % self.num_kv_heads:
      _err("num_kv_heads", f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
           f"({self.num_kv_heads}) for GQA")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      _err("head_dim", f"is None, so it would be hidden_size / num_heads, but hidden_size "
           f"({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); set head_dim")
    if self.resolved_head_dim % 2:
      _err("head_dim", f"must be even for rotate-half RoPE, got {self.resolved_head_dim}")
    for key in ("rope_theta", "rms_norm_eps", "init_std"):
      v = getattr(self, key)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
        _err(key, f"must be a finite number > 0, got {v!r}")
    v = self.head_norm_eps
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                          or not (v > 0 and math.isfinite(v))):
      _err("head_norm_eps", f"must be a finite number > 0 or None, got {v!r}")
    for key in ("tie_embeddings", "learnable_bandwidth", "r_norm", "correction_gate",
                "scan_layers"):
      if not isinstance(getattr(self, key), bool):
        _err(key, f"must be a bool, got {getattr(self, key)!r}")
    # attention
    _check_choice(self, "attention", MEMBERS)
    _check_choice(self, "probe", PROBES, allow_none=True)
    _check_choice(self, "affine", AFFINES, allow_none=True)
    _check_choice(self, "solver", SOLVERS)
    why = unrolled_refusal(self.solver, self.resolved_probe, self.resolved_head_dim)
    if why:
      _err("solver", why)
    _check_choice(self, "implementation", IMPLEMENTATIONS, allow_none=True)
    _check_choice(self, "decode_implementation", DECODE_IMPLEMENTATIONS, allow_none=True)
    _check_choice(self, "r_init", R_INITS)
    if self.bandwidth is not None:
      bw = self.bandwidth
      if isinstance(bw, bool) or not isinstance(bw, (int, float)) or not bw > 0:
        _err("bandwidth", f"must be a number > 0 (or inf) or None, got {bw!r}")
    if self.learnable_bandwidth and math.isinf(self.resolved_bandwidth):
      _err("learnable_bandwidth", "cannot learn an infinite bandwidth (this member's bandwidth "
           "is inf); set bandwidth to a finite value or learnable_bandwidth=False")
    v = self.r_scale
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
      _err("r_scale", f"must be a finite number > 0, got {v!r}")
    if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or \
        not 0 <= self.ridge < math.inf:
      _err("ridge", f"must be a finite number >= 0, got {self.ridge!r}")
    if self.correction_gate:
      if self.resolved_affine not in ("affine", "boundary"):
        _err("correction_gate", f"gates the covariance correction, which affine "
             f"{self.resolved_affine!r} does not have (needs 'affine' or 'boundary')")
      if self.resolved_probe == "none":
        _err("correction_gate", "probe 'none' has no correction to gate")
    if not isinstance(self.gate_bias_init, (int, float)) or isinstance(self.gate_bias_init, bool) \
        or not math.isfinite(self.gate_bias_init):
      _err("gate_bias_init", f"must be a finite number, got {self.gate_bias_init!r}")
    # numerics
    _check_choice(self, "dtype", DTYPES)
    _check_choice(self, "param_dtype", DTYPES)
    rp = self.remat_policy
    if isinstance(rp, tuple):
      if self.scan_layers:
        _err("remat_policy", "a per-layer tuple needs scan_layers=False (scanned layers share "
             "one policy)")
      if len(rp) != self.num_layers:
        _err("remat_policy", f"per-layer tuple has {len(rp)} entries, num_layers is "
             f"{self.num_layers}")
      for p in rp:
        if p not in REMAT_POLICIES:
          _err("remat_policy", f"unknown policy {p!r}; expected one of {REMAT_POLICIES}")
    elif rp not in REMAT_POLICIES:
      _err("remat_policy", f"unknown policy {rp!r}; expected one of {REMAT_POLICIES} or a "
           "tuple of them, one per layer")

  # ----------------------------------------------------------------- derived values
  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @property
  def resolved_head_norm_eps(self) -> float:
    """eps of the per-head RMSNorm on q, k and r."""
    return self.rms_norm_eps if self.head_norm_eps is None else self.head_norm_eps

  @property
  def resolved_probe(self) -> str:
    return self.probe if self.probe is not None else MEMBERS[self.attention][1]

  @property
  def resolved_affine(self) -> str:
    return self.affine if self.affine is not None else MEMBERS[self.attention][2]

  @property
  def resolved_bandwidth(self) -> float:
    """The initial / fixed bandwidth h as a float (sqrt(head_dim) when unset)."""
    bw = self.bandwidth if self.bandwidth is not None else MEMBERS[self.attention][0]
    return float(bw) if bw is not None else math.sqrt(self.resolved_head_dim)

  @property
  def attention_ridge(self) -> float | None:
    """The ridge the attention calls get: None (the family API's default) for 0.0."""
    return self.ridge if self.ridge > 0 else None

  @property
  def resolved_decode_implementation(self) -> str | None:
    """The `implementation` of `decode_attention` in a decode step."""
    if self.decode_implementation is not None:
      return self.decode_implementation
    # the decode step has a dense and a kernel path; the other training forms decode densely
    return "xla" if self.implementation in ("chunked", "moments") else self.implementation

  @property
  def has_probe_params(self) -> bool:
    """Whether the layer owns W_R (`attn/r_proj`)."""
    return self.resolved_probe == "learned" and self.resolved_affine != "constant"

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def layer_remat_policy(self, layer: int) -> str:
    return self.remat_policy[layer] if isinstance(self.remat_policy, tuple) else self.remat_policy

  # ----------------------------------------------------------------- (de)serialisation
  def replace(self, **kwargs) -> ModelConfig:
    return dataclasses.replace(self, **kwargs)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    if isinstance(d["remat_policy"], tuple):
      d["remat_policy"] = list(d["remat_policy"])
    if d["bandwidth"] is not None and math.isinf(d["bandwidth"]):
      d["bandwidth"] = "inf"
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
      if key not in names:
        _err(key, f"unknown config key (known: {sorted(names)})")
    d = dict(d)
    if isinstance(d.get("remat_policy"), list):
      d["remat_policy"] = tuple(d["remat_policy"])
    if d.get("bandwidth") == "inf":
      d["bandwidth"] = math.inf
    return cls(**d)
