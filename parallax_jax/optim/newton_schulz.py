"""Newton-Schulz orthogonalisation: G -> ~ U V^T for G = U S V^T.

One step maps X -> a X + (b A + c A^2) X with A = X X^T, which applies the odd
quintic p(s) = a s + b s^3 + c s^5 to every singular value and keeps U, V. So the
whole iteration is exactly U f(S / scale) V^T with f = p_k o ... o p_1 and
scale = ||G||_F * safety + eps; `scalar_map` evaluates that f, and the tests use
it as the oracle.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Union

import jax
import jax.numpy as jnp
import numpy as np

Coeffs = tuple[float, float, float]
Schedule = Union[Literal["quintic", "polar_express"], Sequence[float], Sequence[Sequence[float]]]

# Keller Jordan's quintic (github.com/KellerJordan/Muon, modded-nanogpt 2024). It
# maximises the slope at 0 instead of converging: after 5 steps singular values land
# in roughly [0.68, 1.2] rather than at 1, which trains as well and needs fewer steps.
QUINTIC: Coeffs = (3.4445, -4.7750, 2.0315)

# Polar Express, degree 5: Amsel, Persson, Musco, Gower, "The Polar Express: Optimal
# Matrix Sign Methods and Their Application to the Muon Algorithm", arXiv:2505.16932,
# Algorithm 1 (reference implementation: github.com/NoahAmsel/PolarExpress). Step t
# uses the minimax-optimal odd quintic for sign(x) on the interval left by steps < t,
# so the composition converges (unlike QUINTIC); the last polynomial is the limit and
# is repeated for longer schedules.
_POLAR_EXPRESS_PAPER: tuple[Coeffs, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
# As in the paper, every step but the last is evaluated at s / 1.01 (a/1.01, b/1.01^3,
# c/1.01^5) so that bf16 round-off pushing a singular value slightly above the
# interval's end cannot blow up.
_PE_SHRINK = 1.01
POLAR_EXPRESS: tuple[Coeffs, ...] = tuple(
    (a / _PE_SHRINK, b / _PE_SHRINK**3, c / _PE_SHRINK**5) for a, b, c in _POLAR_EXPRESS_PAPER[:-1]
) + (_POLAR_EXPRESS_PAPER[-1],)

DEFAULT_NS_STEPS = 5
NS_DTYPES = (jnp.bfloat16, jnp.float32)


def _triple(t, where: str) -> Coeffs:
  try:
    out = tuple(float(v) for v in t)
  except TypeError:
    out = ()
  if len(out) != 3 or not all(math.isfinite(v) for v in out):
    raise ValueError(f"ns_coeffs: {where} must be three finite numbers (a, b, c), got {t!r}")
  return out  # type: ignore[return-value]


def ns_coefficients(ns_coeffs: Schedule = "quintic", ns_steps: int | None = None) -> tuple[Coeffs, ...]:
  """Per-step (a, b, c) triples for a schedule; the tuple's length is the step count.

  ns_coeffs: "quintic" (QUINTIC every step, default 5 steps), "polar_express" (the
    paper's first `ns_steps` polynomials, default 5; its last one repeats beyond 8),
    one (a, b, c) triple (repeated `ns_steps` times, default 5), or a list of triples.
  ns_steps: for a list of triples it may be omitted (the list is the source of truth)
    but must equal the list's length when given: a mismatch is a ValueError rather
    than silently running fewer steps or a different suffix of the list.
  """
  if ns_steps is not None and (isinstance(ns_steps, bool) or not isinstance(ns_steps, (int, np.integer)) or ns_steps < 1):
    raise ValueError(f"ns_steps must be a positive int or None, got {ns_steps!r}")
  if isinstance(ns_coeffs, str):
    steps = DEFAULT_NS_STEPS if ns_steps is None else int(ns_steps)
    if ns_coeffs == "quintic":
      return (QUINTIC,) * steps
    if ns_coeffs == "polar_express":
      pe = POLAR_EXPRESS
      return pe[:steps] + (pe[-1],) * max(0, steps - len(pe))
    raise ValueError(f"ns_coeffs: unknown schedule {ns_coeffs!r}; use 'quintic', 'polar_express', "
                     "an (a, b, c) triple or a list of triples")
  seq = list(ns_coeffs)
  if seq and all(isinstance(v, (int, float, np.number)) for v in seq):
    steps = DEFAULT_NS_STEPS if ns_steps is None else int(ns_steps)
    return (_triple(seq, "a single triple"),) * steps
  if not seq:
    raise ValueError("ns_coeffs: the list of per-step triples is empty")
  triples = tuple(_triple(t, f"step {i}") for i, t in enumerate(seq))
  if ns_steps is not None and ns_steps != len(triples):
    raise ValueError(f"ns_steps={ns_steps} disagrees with ns_coeffs, which lists {len(triples)} per-step "
                     "triples; omit ns_steps (the list sets the step count) or make them agree")
  return triples


def scalar_map(coeffs: Sequence[Coeffs], s):
  """The composed polynomial f that the iteration applies to normalised singular values."""
  for a, b, c in coeffs:
    s2 = s * s
    s = s * (a + s2 * (b + c * s2))
  return s


def singular_value_band(coeffs: Sequence[Coeffs], lo: float, hi: float = 1.0, n: int = 100_001) -> tuple[float, float]:
  """(min, max) of f over [lo, hi]: where the output's singular values can land."""
  s = np.linspace(lo, hi, n, dtype=np.float64)
  y = scalar_map(coeffs, s)
  return float(y.min()), float(y.max())


def orthogonalize(x: jax.Array, coeffs: Sequence[Coeffs], *, ns_dtype=jnp.bfloat16,
                  eps: float = 1e-7, safety: float = 1.01) -> jax.Array:
  """Orthogonalise each matrix in x [..., m, n]; returns the same shape and dtype.

  The Frobenius norm bounds the spectral norm, so x / (||x||_F * safety + eps) has
  singular values in [0, 1/safety]; the safety factor leaves headroom for the round-off
  of a bf16 iteration. A zero matrix stays exactly zero.
  """
  if x.ndim < 2:
    raise ValueError(f"orthogonalize needs [..., m, n], got shape {x.shape}")
  if jnp.dtype(ns_dtype) not in [jnp.dtype(d) for d in NS_DTYPES]:
    raise ValueError(f"ns_dtype must be bfloat16 or float32, got {ns_dtype!r}")
  out_dtype = x.dtype
  # Iterate on the wide orientation so the Gram matrix X X^T is min(m, n)^2.
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
  x = (x / (norm * safety + eps)).astype(ns_dtype)
  # fp32 is asked for accuracy: forbid TF32 (the GPU default for fp32 dots).
  precision = jax.lax.Precision.HIGHEST if jnp.dtype(ns_dtype) == jnp.float32 else None
  mm = lambda p, q: jnp.matmul(p, q, precision=precision)
  for a, b, c in coeffs:
    gram = mm(x, jnp.swapaxes(x, -1, -2))
    poly = b * gram + c * mm(gram, gram)
    x = a * x + mm(poly, x)
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  return x.astype(out_dtype)
