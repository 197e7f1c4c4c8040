"""The one public entry point for the attention family, and named wrappers."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parallax_jax import chunked as _chunked
from parallax_jax import moments as _moments
from parallax_jax import reference as _reference

PROBES = ("none", "query", "learned", "solve")
AFFINES = ("constant", "linear", "affine", "boundary")
SOLVERS = ("direct", "cholesky", "unrolled", "cg")
# solver="unrolled" writes Cholesky out over the head dim (O(D^2) ops, O(D^3) work): small heads.
UNROLLED_MAX_HEAD_DIM = 32
IMPLEMENTATIONS = ("xla", "chunked", "pallas", "moments")
# Above this many (query, key) pairs per head `implementation=None` avoids the dense path.
DENSE_MAX_PAIRS = 1 << 20
# `implementation=None` takes the moment form for the solve probe, and for any member with an
# infinite bandwidth and no window or segments (prefix sums, no [T, S] array), when a key's
# features (moments.width) number at most this many times the keys: small heads, where one
# pass of A F moves fewer bytes than the dense formulas' several [T, S] passes.
MOMENTS_MAX_WIDTH_PER_KEY = 2
# Default ridge of the solve probe. At ridge 0 a row with fewer than head_dim + 1 keys has a
# singular local system (undefined outputs early in every sequence); 1e-3 keeps every row
# finite in float32 and biases well-conditioned rows (moment eigenvalues ~ |k|^2) very little.
SOLVE_RIDGE = 1e-3

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
  _check_qkv(q, k, v, r)
  _check_member_args(r, probe, affine, ridge, solver, window, cg_iters, q.shape[-1])
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    _fail(f"unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS} or None")
  return _segments(segment_ids, q.shape[0], q.shape[1], k.shape[1])


def _check_qkv(q, k, v, r):
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
  if min(hq, d, k.shape[2], v.shape[2], v.shape[3]) < 1:
    _fail(f"heads and head_dim must be >= 1, got shapes q {q.shape}, k {k.shape}, v {v.shape}")
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


def unrolled_refusal(solver: str, probe: str, head_dim: int) -> str | None:
  """Why `solver` cannot serve these heads ('unrolled' above UNROLLED_MAX_HEAD_DIM), else
  None: the one rule the configs check early and `attention` checks at the call."""
  if solver == "unrolled" and probe == "solve" and head_dim > UNROLLED_MAX_HEAD_DIM:
    return (f"'unrolled' is for head_dim <= {UNROLLED_MAX_HEAD_DIM}, got head_dim {head_dim}; "
            "use 'cholesky'")
  return None


def _check_member_args(r, probe, affine, ridge, solver, window, cg_iters, head_dim):
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
  why = unrolled_refusal(solver, probe, head_dim)
  if why:
    _fail(f"solver={why}")
  if cg_iters is not None and (isinstance(cg_iters, bool) or not isinstance(cg_iters, int)
                               or cg_iters <= 0):
    _fail(f"cg_iters must be a positive int, got {cg_iters!r}")
  if ridge is not None:
    if isinstance(ridge, (str, bytes, bool)):
      _fail(f"ridge must be a number, got {ridge!r}")
    if np.ndim(ridge) != 0:
      _fail(f"ridge must be a scalar, got shape {np.shape(ridge)}")
    # inf would make every solve-probe row NaN (the system's inverse is 0 times inf)
    if _is_concrete(ridge) and not 0.0 <= float(ridge) < math.inf:
      _fail(f"ridge must be finite and >= 0, got {ridge!r}")
  if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer))
                             or window <= 0):
    _fail(f"window must be a positive int (number of keys kept), got {window!r}")


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
  if isinstance(bandwidth, (str, bytes, bool)):
    _fail(f"bandwidth must be a number or an array, got {bandwidth!r}")
  h = jnp.asarray(bandwidth, dtype)
  if h.ndim == 0:
    h = jnp.broadcast_to(h, (hq,))
  elif h.shape != (hq,):
    _fail(f"bandwidth must be a scalar or have shape [q_heads]=({hq},), got {h.shape}")
  if _is_concrete(bandwidth):
    # numpy, not jnp: under an outer jit, jnp ops on a concrete array are staged (traced).
    if not bool(np.all(np.asarray(bandwidth, np.float64) > 0)):
      _fail(f"bandwidth must be > 0 (or inf), got {bandwidth!r}")
    return 1.0 / h
  # Traced (under jit): no error can be raised, so a head whose h is not > 0 (or is NaN)
  # gets NaN weights, and its output is NaN rather than plausible garbage.
  return jnp.where(h > 0, 1.0 / h, jnp.nan)


def _ridge(ridge, probe):
  """The ridge the solve probe uses: SOLVE_RIDGE by default; a traced negative one -> NaN."""
  if probe != "solve":
    return 0.0
  if ridge is None:
    return SOLVE_RIDGE
  if _is_concrete(ridge):
    return ridge
  return jnp.where(ridge >= 0, ridge, jnp.nan)  # NaN outputs instead of plausible garbage


def _compute_dtype(dtype):
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _pallas_member(probe, affine):
  """'softmax' or 'parallax' when the fused kernels compute this member, else None."""
  if affine == "constant" or (probe == "none" and affine != "linear"):
    return "softmax"
  if (probe, affine) == ("learned", "affine"):
    return "parallax"
  return None


def _uniform(bandwidth):
  """Whether the bandwidth is statically infinite for every head (uniform weights)."""
  if bandwidth is None or not _is_concrete(bandwidth):
    return False
  return bool(np.all(np.isinf(np.asarray(bandwidth, np.float64))))


def _choose(implementation, probe, affine, q, k, v, r, window, q_seg, kv_seg, uniform=False):
  """`implementation=None`: the fused kernels on GPU where they apply; the moment form for
  small heads; else dense for short sequences and chunked for long ones."""
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
  t, s = q.shape[1], k.shape[1]
  w = _moments.width(probe, affine, q.shape[3], v.shape[3])
  prefix = uniform and window is None and q_seg is None  # no [T, S] array at all
  if ((prefix or probe == "solve" and t * s <= DENSE_MAX_PAIRS)
      and w <= MOMENTS_MAX_WIDTH_PER_KEY * s and t * w <= DENSE_MAX_PAIRS):
    return "moments"
  if t * s <= DENSE_MAX_PAIRS:
    return "xla"
  return "chunked"


def chosen_implementation(q, k, v, r=None, *, probe: str, affine: str,
                          window: int | None = None, segment_ids: Any = None,
                          implementation: str | None = None, bandwidth: Any = None) -> str:
  """The implementation `attention` runs for these inputs (arrays or jax.ShapeDtypeStruct)
  on the default backend: `implementation` when given, else what None resolves to."""
  q_seg, kv_seg = _check_inputs(q, k, v, r, probe, affine, None, "direct", window, segment_ids,
                                implementation, None)
  return _choose(implementation, probe, affine, q, k, v, r, window, q_seg, kv_seg,
                 _uniform(bandwidth))


def attention(q, k, v, r=None, *, probe: str, affine: str, bandwidth: Any = None,
              ridge: float | None = None, solver: str = "direct", causal: bool = True,
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
    ridge: lambda >= 0 for the solve probe; None (default) means `SOLVE_RIDGE` (1e-3). At
      ridge=0 rows with fewer than head_dim + 1 keys have a singular system: their output
      is undefined (NaN, inf or finite garbage, which differs between implementations).
    solver: 'direct' (LU), 'cholesky' (the system is symmetric positive definite for
      ridge > 0: half the factorization work; a system that float32 rounding leaves
      indefinite makes its row NaN), 'unrolled' (the same Cholesky written out over the
      head dim as elementwise ops that XLA fuses, for head_dim <= 32: no batched library
      calls on many tiny matrices) or 'cg' (matrix-free conjugate gradient with
      `cg_iters` iterations, default head_dim).
    causal: mask future keys; with T < S the queries are the last T positions.
    window: keep only the `window` most recent keys (including the diagonal).
    segment_ids: [B, L] ints, or (q_ids [B, T], kv_ids [B, S]); keys of other segments masked.
    implementation: 'xla' (dense reference), 'chunked' (memory-efficient), 'pallas' (GPU
      kernels), 'moments' (weighted moments: small heads, infinite bandwidths), or None to
      choose by size, head dim and platform.
    block_sizes: `chunked.BlockSizes` override for the chunked implementation.

  Returns:
    [batch, T, q_heads, v_head_dim] in q's dtype. Rows that see no key are zero (so S = 0
    gives zeros and T = 0 an empty output). A row whose q (or probe), or a key or value it
    sees, is not finite is NaN; nothing a row does not see reaches it (docs/attention.md).

  Under jit a traced bandwidth <= 0 (or NaN) makes that head NaN, and a traced negative
  ridge makes the solve members NaN; concrete bad values raise a ValueError.
  """
  q_seg, kv_seg = _check_inputs(q, k, v, r, probe, affine, ridge, solver, window, segment_ids,
                                implementation, cg_iters)
  if not isinstance(causal, (bool, np.bool_)):  # a string or array would read as True
    _fail(f"causal must be True or False, got {causal!r}")
  if block_sizes is not None and not isinstance(block_sizes, _chunked.BlockSizes):
    _fail(f"block_sizes must be a parallax_jax.BlockSizes, got {type(block_sizes).__name__}")
  compute_dtype = _compute_dtype(q.dtype)
  scale = _scale(bandwidth, q.shape[2], q.shape[3], compute_dtype)
  if 0 in (q.shape[0], q.shape[1], k.shape[1]):  # no rows, or no keys: nothing to attend
    return jnp.zeros(q.shape[:-1] + v.shape[-1:], q.dtype)
  uniform = _uniform(bandwidth)
  impl = _choose(implementation, probe, affine, q, k, v, r, window, q_seg, kv_seg, uniform)
  ridge = _ridge(ridge, probe)
  kwargs = dict(probe=probe, affine=affine, ridge=ridge, solver=solver, cg_iters=cg_iters,
                causal=causal, window=window, q_seg=q_seg, kv_seg=kv_seg,
                compute_dtype=compute_dtype)
  if impl == "xla":
    return _reference.dense_attention(q, k, v, r, scale, **kwargs)
  if impl == "chunked":
    return _chunked.chunked_attention(q, k, v, r, scale, block_sizes=block_sizes, **kwargs)
  if impl == "moments":
    return _moments.moment_attention(q, k, v, r, scale, uniform=uniform, **kwargs)
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


# ----------------------------------------------------------------------------- decode

DECODE_IMPLEMENTATIONS = ("xla", "pallas")
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def _check_decode_inputs(q, k_cache, v_cache, r, lengths, probe, affine, ridge, solver, window,
                         implementation, cg_iters, num_splits, block_kv):
  for name, x in (("q", q), ("r", r)):
    if x is None:
      continue
    ndim = getattr(x, "ndim", None)
    if ndim not in (3, 4) or (ndim == 4 and x.shape[1] < 1):
      _fail(f"{name} must be [batch, q_heads, head_dim] (one new token per sequence) or "
            f"[batch, tokens, q_heads, head_dim] with tokens >= 1, got shape "
            f"{getattr(x, 'shape', type(x).__name__)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      _fail(f"{name} must be floating point, got dtype {x.dtype}")
  if r is not None and r.shape != q.shape:
    _fail(f"r must have q's shape {q.shape}, got {r.shape}")
  if r is not None and r.dtype != q.dtype:
    _fail(f"q and r must share one dtype, got q {q.dtype}, r {r.dtype}")
  for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
    if getattr(x, "ndim", None) != 4:
      _fail(f"{name} must have rank 4 [batch, max_len, kv_heads, head_dim], got shape "
            f"{getattr(x, 'shape', type(x).__name__)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      _fail(f"{name} must be floating point, got dtype {x.dtype}")
  if k_cache.dtype != v_cache.dtype:
    _fail(f"k_cache and v_cache must share one dtype, got {k_cache.dtype} and {v_cache.dtype}")
  if k_cache.shape[:3] != v_cache.shape[:3]:
    _fail(f"k_cache and v_cache must agree in [batch, max_len, kv_heads], got "
          f"{k_cache.shape} and {v_cache.shape}")
  b, hq, d = q.shape[0], q.shape[-2], q.shape[-1]
  if k_cache.shape[0] != b:
    _fail(f"batch sizes differ: q {q.shape}, k_cache {k_cache.shape}")
  if k_cache.shape[-1] != d:
    _fail(f"head_dim mismatch: q has {d}, k_cache has {k_cache.shape[-1]} (shapes q {q.shape}, "
          f"k_cache {k_cache.shape})")
  hkv = k_cache.shape[2]
  if min(hq, d, hkv, v_cache.shape[3]) < 1:
    _fail(f"heads and head_dim must be >= 1, got shapes q {q.shape}, k_cache {k_cache.shape}, "
          f"v_cache {v_cache.shape}")
  if hq % hkv:
    _fail(f"query heads ({hq}) must be a multiple of kv heads ({hkv}) for GQA/MQA")
  lengths = jnp.asarray(lengths)
  if lengths.shape != (b,):
    _fail(f"lengths must have shape [batch]=({b},), got {lengths.shape}")
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    _fail(f"lengths must be integers, got dtype {lengths.dtype}")
  if _is_concrete(lengths) and lengths.size and int(np.min(np.asarray(lengths))) < 0:
    _fail(f"lengths must be >= 0, got {np.asarray(lengths).tolist()}")
  _check_member_args(r, probe, affine, ridge, solver, window, cg_iters, d)
  if implementation is not None and implementation not in DECODE_IMPLEMENTATIONS:
    _fail(f"unknown decode implementation {implementation!r}; expected one of "
          f"{DECODE_IMPLEMENTATIONS} or None")
  if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(
      num_splits, (int, np.integer)) or num_splits <= 0):
    _fail(f"num_splits must be a positive int or None, got {num_splits!r}")
  if block_kv is not None and (isinstance(block_kv, bool) or not isinstance(
      block_kv, (int, np.integer)) or block_kv < 16 or block_kv & (block_kv - 1)):
    _fail(f"block_kv must be a power of two >= 16 or None, got {block_kv!r}")
  return lengths.astype(jnp.int32)


def _decode_pallas_kind(probe, affine, q, k_cache, v_cache):
  """('softmax' | 'parallax', '') when the decode kernel runs this call, else (None, reason)."""
  kind = _pallas_member(probe, affine)
  if kind is None:
    return None, (f"the decode kernel computes softmax and Parallax (probe='learned', "
                  f"affine='affine'), got probe={probe!r}, affine={affine!r}")
  try:
    from pallas_kernels.common import SUPPORTED_DTYPES
  except ImportError as e:  # pragma: no cover - depends on the install
    return None, f"pallas_kernels is unavailable: {e}"
  d = q.shape[-1]
  if d < 16 or d & (d - 1):
    return None, f"the decode kernel needs head_dim a power of two >= 16, got {d}"
  tokens = q.shape[1] if q.ndim == 4 else 1
  rows = tokens * (q.shape[-2] // k_cache.shape[2])
  if rows > 64:
    return None, (f"the decode kernel takes at most 64 rows per KV head (tokens x q_heads / "
                  f"kv_heads), got {tokens} x {q.shape[-2] // k_cache.shape[2]} = {rows}")
  if v_cache.shape != k_cache.shape:
    return None, (f"the decode kernel needs v_cache shaped like k_cache, got {v_cache.shape} "
                  f"and {k_cache.shape}")
  if jnp.dtype(k_cache.dtype) not in SUPPORTED_DTYPES:
    return None, (f"the decode kernel reads caches of float32/bfloat16/float16, got "
                  f"{k_cache.dtype}")
  return kind, ""


def decode_attention(q, k_cache, v_cache, r=None, *, lengths, probe: str, affine: str,
                     bandwidth: Any = None, window: int | None = None,
                     ridge: float | None = None,
                     solver: str = "direct", cg_iters: int | None = None,
                     implementation: str | None = None, num_splits: int | None = None,
                     block_kv: int | None = None, arrivals=None):
  """One decode step of family member `(bandwidth, probe, affine)` over a KV cache.

  Each sequence b has one new query row that attends over the first `lengths[b]` slots of its
  cache (after writing the new token's k, v at slot n, pass lengths = n + 1), with `window`
  keeping only the `window` most recent of them (slots j >= lengths[b] - window), the same
  keys as causal `attention` over the sequence. With T new tokens per sequence (speculative /
  multi-token decode; their k, v written at the last T valid slots), token t sits at slot
  lengths[b] - T + t and sees the slots up to its own (causal among the new tokens, and
  within `window` of its slot); the kernel reads the cache once for all T. Rows with no key
  (lengths 0, or an empty cache) are zero; lengths above max_len count as max_len (negative
  ones raise, or count as 0 under jit). Slots a row does not see never reach it, whatever
  they hold (uninitialised cache memory, NaN); a row that sees a non-finite slot is NaN.

  Args:
    q: the new queries [batch, q_heads, head_dim], or [batch, tokens, q_heads, head_dim].
      r: the learned probe, same shape and dtype (probe='learned').
    k_cache, v_cache: [batch, max_len, kv_heads, head_dim], the model's cache layout, read in
      place; their dtype may differ from q's (the kernel then runs in the cache's dtype).
    lengths: [batch] ints, the number of valid cache slots per sequence.
    probe, affine, bandwidth, window, ridge, solver, cg_iters: as in `attention`. bandwidth
      may be None (sqrt(head_dim)), a scalar, a per-head array [q_heads] or inf.
    implementation: 'pallas' (the split-KV decode kernel, `pallas_kernels.parallax_decode`; on
      a non-GPU backend it runs in Pallas interpret mode, for tests), 'xla' (dense masked
      computation over the whole cache, every member), or None: 'pallas' on GPU when the
      kernel applies (softmax or Parallax, head_dim a power of two >= 16, a float32/bfloat16/
      float16 cache, tokens x q_heads / kv_heads <= 64), else 'xla'.
    num_splits, block_kv: kernel launch overrides (None: its heuristics); ignored by 'xla'.
    arrivals: None, or the all-zero int32 [batch, kv_heads] counter a decode loop carries
      from call to call (`pallas_kernels.init_arrivals`); the call then returns
      (o, arrivals), zero again. The kernel's split launches count arrivals there instead of
      zeroing a fresh counter each call (one small kernel less per call); 'xla' passes it
      through.

  The kernel takes a python-float scale; an array bandwidth (e.g. a learnable per-head one)
  is folded into q (q / h in float32, then cast to the kernel's dtype) with scale 1. Not
  differentiable through the 'pallas' path.

  Returns:
    q's shape ([batch, (tokens,) q_heads, v_head_dim]) in q's dtype; (that, arrivals) when
    arrivals is given.
  """
  lengths = _check_decode_inputs(q, k_cache, v_cache, r, lengths, probe, affine, ridge, solver,
                                 window, implementation, cg_iters, num_splits, block_kv)
  if arrivals is not None:
    want = (k_cache.shape[0], k_cache.shape[2])
    if getattr(arrivals, "shape", None) != want or getattr(arrivals, "dtype", None) != jnp.int32:
      _fail(f"arrivals must be int32 [batch, kv_heads] = {want} zeros, got "
            f"{getattr(arrivals, 'dtype', type(arrivals).__name__)} "
            f"{getattr(arrivals, 'shape', '')}")
  squeeze = q.ndim == 4 and q.shape[1] == 1   # one token: the kernel's single-row launch
  q3 = q[:, 0] if squeeze else q
  r3 = None if r is None else (r[:, 0] if squeeze else r)
  kind, why = _decode_pallas_kind(probe, affine, q3, k_cache, v_cache)
  impl = implementation
  if impl is None:
    impl = "pallas" if kind is not None and jax.default_backend() in _GPU_PLATFORMS else "xla"
  if impl == "pallas" and kind is None:
    _fail(f"implementation='pallas' cannot run this decode call: {why}")
  if 0 in (q.shape[0], k_cache.shape[1]):  # no sequences, or an empty cache: no keys
    _scale(bandwidth, q.shape[-2], q.shape[-1], jnp.float32)  # still checks a bad bandwidth
    o = jnp.zeros(q.shape[:-1] + v_cache.shape[-1:], q.dtype)
    return o if arrivals is None else (o, arrivals)
  if impl == "pallas":
    o, arrivals = _decode_pallas(q3, k_cache, v_cache, r3 if kind == "parallax" else None,
                                 bandwidth, lengths=lengths, window=window,
                                 num_splits=num_splits, block_kv=block_kv, arrivals=arrivals)
  else:
    o = _decode_xla(q3, k_cache, v_cache, r3, bandwidth, lengths=lengths, window=window,
                    probe=probe, affine=affine, ridge=_ridge(ridge, probe), solver=solver,
                    cg_iters=cg_iters)
  o = o[:, None] if squeeze else o
  return o if arrivals is None else (o, arrivals)


def _decode_pallas(q, k_cache, v_cache, r, bandwidth, *, lengths, window, num_splits,
                   block_kv, arrivals):
  """-> (o, arrivals): the kernel's output and its counter (None when none was carried)."""
  import pallas_kernels
  hq, d, out_dtype = q.shape[-2], q.shape[-1], q.dtype
  if bandwidth is None:
    scale = 1.0 / math.sqrt(d)
  elif isinstance(bandwidth, (int, float, np.integer, np.floating)) and not isinstance(
      bandwidth, bool):
    h = float(bandwidth)
    if not h > 0:
      _fail(f"bandwidth must be > 0 (or inf), got {bandwidth!r}")
    scale = 0.0 if math.isinf(h) else 1.0 / h
  else:  # array / traced bandwidth: fold 1/h into q, exact in float32
    q = q.astype(jnp.float32) * _scale(bandwidth, hq, d, jnp.float32)[:, None]
    scale = 1.0
  dt = k_cache.dtype
  o = pallas_kernels.parallax_decode(
      q.astype(dt), k_cache, v_cache, None if r is None else r.astype(dt), scale=scale,
      lengths=lengths, window=window, num_splits=num_splits, block_kv=block_kv,
      arrivals=arrivals, interpret=jax.default_backend() not in _GPU_PLATFORMS)
  o, arrivals = (o, None) if arrivals is None else o
  return o.astype(out_dtype), arrivals


def _decode_xla(q, k_cache, v_cache, r, bandwidth, *, lengths, window, probe, affine, ridge,
                solver, cg_iters):
  s = k_cache.shape[1]
  one = q.ndim == 3
  q4, r4 = (q[:, None], None if r is None else r[:, None]) if one else (q, r)
  t = q4.shape[1]
  compute_dtype = _compute_dtype(jnp.result_type(q.dtype, k_cache.dtype))
  scale = _scale(bandwidth, q.shape[-2], q.shape[-1], compute_dtype)
  # token i at slot n - T + i sees slots j <= its own (and > slot - window)
  slot = (jnp.minimum(lengths, s)[:, None] - t + jnp.arange(t, dtype=jnp.int32))[:, :, None]
  j = jnp.arange(s, dtype=jnp.int32)[None, None, :]
  mask = j <= slot
  if window is not None:
    mask &= j > slot - window
  o = _reference.dense_attention(
      q4, k_cache, v_cache, r4, scale, probe=probe, affine=affine, ridge=ridge, solver=solver,
      cg_iters=cg_iters, causal=False, window=None, q_seg=None, kv_seg=None,
      compute_dtype=compute_dtype, mask=mask)
  return o[:, 0] if one else o


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
