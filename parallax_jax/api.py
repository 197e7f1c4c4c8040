"""The one public entry point for the attention family, and named wrappers."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parallax_jax import chunked as _chunked
from parallax_jax import reference as _reference

PROBES = ("none", "query", "learned", "solve")
AFFINES = ("constant", "linear", "affine", "boundary")
SOLVERS = ("direct", "cg")
IMPLEMENTATIONS = ("xla", "chunked", "pallas")
# Above this many (query, key) pairs per head `implementation=None` avoids the dense path.
DENSE_MAX_PAIRS = 1 << 20

# name -> (bandwidth, probe, affine); bandwidth None means sqrt(head_dim).
MEMBERS: dict[str, tuple[float | None, str, str]] = {
    "softmax": (None, "none", "constant"),
    "parallax": (None, "learned", "affine"),
    "lla": (None, "solve", "boundary"),
    "lla_affine": (None, "solve", "affine"),
    "linear": (math.inf, "query", "linear"),
    "mesa": (math.inf, "solve", "linear"),
    "least_squares": (math.inf, "solve", "boundary"),
}


def _fail(msg):
  raise ValueError(msg)


def _is_concrete(x):
  return not isinstance(x, jax.core.Tracer)


def _check_inputs(q, k, v, r, probe, affine, ridge, solver, window, segment_ids,
                  implementation, cg_iters):
  for name, x in (("q", q), ("k", k), ("v", v)) + ((("r", r),) if r is not None else ()):
    if getattr(x, "ndim", None) != 4:
      _fail(f"{name} must have rank 4 [batch, length, heads, head_dim], got shape "
            f"{getattr(x, 'shape', type(x).__name__)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      _fail(f"{name} must be floating point, got dtype {x.dtype}")
  dtypes = {n: x.dtype for n, x in (("q", q), ("k", k), ("v", v), ("r", r)) if x is not None}
  if len(set(dtypes.values())) > 1:
    _fail(f"q, k, v (and r) must share one dtype, got {dtypes}")
  b, t, hq, d = q.shape
  if k.shape[0] != b or v.shape[0] != b:
    _fail(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
  if k.shape[:3] != v.shape[:3]:
    _fail(f"k and v must agree in [batch, length, heads], got k {k.shape}, v {v.shape}")
  if k.shape[-1] != d:
    _fail(f"head_dim mismatch: q has {d}, k has {k.shape[-1]} (shapes q {q.shape}, k {k.shape})")
  hkv = k.shape[2]
  if hq % hkv:
    _fail(f"query heads ({hq}) must be a multiple of kv heads ({hkv}) for GQA/MQA")
  if r is not None and r.shape != q.shape:
    _fail(f"r must have q's shape {q.shape}, got {r.shape}")
  if probe not in PROBES:
    _fail(f"unknown probe {probe!r}; expected one of {PROBES}")
  if affine not in AFFINES:
    _fail(f"unknown affine {affine!r}; expected one of {AFFINES}")
  if probe == "learned" and r is None and affine != "constant":
    _fail("probe='learned' needs r (the learned probe, r = W_R x, shaped like q), got r=None")
  if r is not None and probe != "learned":
    _fail(f"r is only read by probe='learned', got probe={probe!r} with an r")
  if solver not in SOLVERS:
    _fail(f"unknown solver {solver!r}; expected one of {SOLVERS}")
  if cg_iters is not None and (not isinstance(cg_iters, int) or cg_iters <= 0):
    _fail(f"cg_iters must be a positive int, got {cg_iters!r}")
  if _is_concrete(ridge) and not float(np.min(np.asarray(ridge))) >= 0.0:
    _fail(f"ridge must be >= 0, got {ridge!r}")
  if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer))
                             or window <= 0):
    _fail(f"window must be a positive int (number of keys kept), got {window!r}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    _fail(f"unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS} or None")
  return _segments(segment_ids, b, t, k.shape[1])


def _segments(segment_ids, b, t, s):
  """segment_ids: [B, L] (T == S) or a (q_ids [B, T], kv_ids [B, S]) pair."""
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      _fail(f"segment_ids must be an array [B, L] or a pair (q_ids, kv_ids), got "
            f"{len(segment_ids)} items")
    q_seg, kv_seg = segment_ids
  else:
    if t != s:
      _fail(f"one segment_ids array needs equal query and key lengths, got T={t}, S={s}; "
            "pass (q_segment_ids, kv_segment_ids)")
    q_seg = kv_seg = segment_ids
  q_seg, kv_seg = jnp.asarray(q_seg), jnp.asarray(kv_seg)
  for name, x, n in (("q segment_ids", q_seg, t), ("kv segment_ids", kv_seg, s)):
    if x.shape != (b, n):
      _fail(f"{name} must have shape {(b, n)}, got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
      _fail(f"{name} must be integers, got dtype {x.dtype}")
  return q_seg, kv_seg


def _scale(bandwidth, hq, d, dtype):
  """Per-q-head 1/h as an array [Hq] (0 for h = inf). Differentiable in `bandwidth`."""
  if bandwidth is None:
    return jnp.full((hq,), 1.0 / math.sqrt(d), dtype)
  h = jnp.asarray(bandwidth, dtype)
  if h.ndim == 0:
    h = jnp.broadcast_to(h, (hq,))
  elif h.shape != (hq,):
    _fail(f"bandwidth must be a scalar or have shape [q_heads]=({hq},), got {h.shape}")
  if _is_concrete(h) and not bool(jnp.all(h > 0)):
    _fail(f"bandwidth must be > 0 (or inf), got {bandwidth!r}")
  return 1.0 / h


def _compute_dtype(dtype):
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _pallas_member(probe, affine):
  """'softmax' or 'parallax' when the fused kernels compute this member, else None."""
  if affine == "constant" or (probe == "none" and affine != "linear"):
    return "softmax"
  if (probe, affine) == ("learned", "affine"):
    return "parallax"
  return None


def _choose(implementation, probe, affine, q, k, v, r, window, q_seg, kv_seg):
  """`implementation=None`: the fused kernels on GPU where they apply, else dense for short
  sequences and chunked for long ones."""
  if implementation is not None:
    return implementation
  if jax.default_backend() == "gpu" and _pallas_member(probe, affine):
    try:
      import pallas_kernels
      ok, _ = pallas_kernels.is_supported(
          q, k, v, r if _pallas_member(probe, affine) == "parallax" else None, window=window,
          q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    except ImportError:
      ok = False
    if ok:
      return "pallas"
  if q.shape[1] * k.shape[1] <= DENSE_MAX_PAIRS:
    return "xla"
  return "chunked"


def attention(q, k, v, r=None, *, probe: str, affine: str, bandwidth: Any = None,
              ridge: float = 0.0, solver: str = "direct", causal: bool = True,
              window: int | None = None, segment_ids: Any = None,
              implementation: str | None = None, cg_iters: int | None = None,
              block_sizes: _chunked.BlockSizes | None = None):
  """Attention family member `(bandwidth, probe, affine)`; see the spec for the math.

  Args:
    q: queries [batch, T, q_heads, head_dim]. r: the learned probe, same shape (probe='learned').
    k, v: keys/values [batch, S, kv_heads, head_dim]; q-head h reads kv-head h // (Hq // Hkv).
    probe: 'none' | 'query' | 'learned' | 'solve'.
    affine: 'constant' | 'linear' | 'affine' | 'boundary'.
    bandwidth: h in exp(q.k / h): None (sqrt(head_dim)), a scalar, an array [q_heads]
      (learnable: gradients flow), or inf (uniform weights).
    ridge: lambda >= 0 for the solve probe. solver: 'direct' or 'cg' (matrix-free conjugate
      gradient with `cg_iters` iterations, default head_dim).
    causal: mask future keys; with T < S the queries are the last T positions.
    window: keep only the `window` most recent keys (including the diagonal).
    segment_ids: [B, L] ints, or (q_ids [B, T], kv_ids [B, S]); keys of other segments masked.
    implementation: 'xla' (dense reference), 'chunked' (memory-efficient), 'pallas' (GPU
      kernels), or None to choose by size and platform.
    block_sizes: `chunked.BlockSizes` override for the chunked implementation.

  Returns:
    [batch, T, q_heads, v_head_dim] in q's dtype. Rows that see no key are zero.
  """
  q_seg, kv_seg = _check_inputs(q, k, v, r, probe, affine, ridge, solver, window, segment_ids,
                                implementation, cg_iters)
  compute_dtype = _compute_dtype(q.dtype)
  scale = _scale(bandwidth, q.shape[2], q.shape[3], compute_dtype)
  impl = _choose(implementation, probe, affine, q, k, v, r, window, q_seg, kv_seg)
  kwargs = dict(probe=probe, affine=affine, ridge=ridge, solver=solver, cg_iters=cg_iters,
                causal=causal, window=window, q_seg=q_seg, kv_seg=kv_seg,
                compute_dtype=compute_dtype)
  if impl == "xla":
    return _reference.dense_attention(q, k, v, r, scale, **kwargs)
  if impl == "chunked":
    return _chunked.chunked_attention(q, k, v, r, scale, block_sizes=block_sizes, **kwargs)
  return _pallas(q, k, v, r, scale, **kwargs)


def _pallas(q, k, v, r, scale, *, probe, affine, causal, window, q_seg, kv_seg, **_):
  kind = _pallas_member(probe, affine)
  if kind is None:
    _fail(f"implementation='pallas' supports softmax and Parallax (probe='learned', "
          f"affine='affine'), got probe={probe!r}, affine={affine!r}")
  try:
    import pallas_kernels
  except ImportError as e:  # pragma: no cover - depends on the install
    raise ValueError(f"implementation='pallas' is unavailable: {e}") from e
  r = r if kind == "parallax" else None
  ok, why = pallas_kernels.is_supported(q, k, v, r, window=window, q_segment_ids=q_seg,
                                        kv_segment_ids=kv_seg)
  if not ok:
    _fail(f"implementation='pallas' cannot run this call: {why}")
  return pallas_kernels.parallax_flash_attention(
      q, k, v, r, scale=scale, causal=causal, window=window, q_segment_ids=q_seg,
      kv_segment_ids=kv_seg)


def softmax_attention(q, k, v, **kwargs):
  """Softmax attention: the `constant` affine (local Nadaraya-Watson)."""
  return attention(q, k, v, probe="none", affine="constant", **kwargs)


def parallax_attention(q, k, v, r, **kwargs):
  """Parallax: o = vbar - C^T r with a learned probe r = W_R x."""
  return attention(q, k, v, r, probe="learned", affine="affine", **kwargs)


def lla_attention(q, k, v, *, boundary: bool = True, **kwargs):
  """Exact Local Linear Attention: the solved probe, with boundary amplification by default."""
  return attention(q, k, v, probe="solve", affine="boundary" if boundary else "affine", **kwargs)


def linear_attention(q, k, v, **kwargs):
  """Normalised causal linear attention (h = inf, probe = query, linear model)."""
  return attention(q, k, v, probe="query", affine="linear", bandwidth=math.inf, **kwargs)


def member(name: str, q, k, v, r=None, **kwargs):
  """Any named member of the family (see `MEMBERS`), e.g. member('mesa', q, k, v, ridge=1.0)."""
  if name not in MEMBERS:
    _fail(f"unknown member {name!r}; expected one of {tuple(MEMBERS)}")
  bandwidth, probe, affine = MEMBERS[name]
  kwargs.setdefault("bandwidth", bandwidth)
  return attention(q, k, v, r, probe=probe, affine=affine, **kwargs)
