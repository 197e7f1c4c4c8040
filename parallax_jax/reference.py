"""Dense reference for the whole attention family (the `"xla"` implementation).

Materialises the [T, S] weight matrix per head, so it is O(T*S) in memory. Every other
implementation is tested against it; it follows the spec's formulas literally.
Internal layout: heads split into kv-heads and groups, `[B, Hkv, G, T, D]`, so GQA never
repeats K/V (q-head h = kv_head * G + g reads kv-head h // G).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from parallax_jax import masks


def split_heads(x, num_kv_heads):
  """[B, T, Hq, D] -> [B, Hkv, G, T, D]."""
  b, t, h, d = x.shape
  return x.reshape(b, t, num_kv_heads, h // num_kv_heads, d).transpose(0, 2, 3, 1, 4)


def merge_heads(x):
  """[B, Hkv, G, T, D] -> [B, T, Hq, D]."""
  b, k, g, t, d = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, d)


def kv_heads_first(x):
  """[B, S, Hkv, D] -> [B, Hkv, S, D]."""
  return x.transpose(0, 2, 1, 3)


def finite(x):
  """x with its non-finite entries replaced by 0."""
  return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def weights(q, k, scale, mask):
  """Masked softmax weights a [B, Hkv, G, T, S]; rows without keys are all zero."""
  s = jnp.einsum("bkgtd,bksd->bkgts", q, k) * scale[None, :, :, None, None]
  s = jnp.where(mask, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  d = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(d > 0, d, 1.0)


def nonfinite_rows(x):
  """x[..., D] -> [...] bool: whether a row holds a non-finite entry."""
  return ~jnp.all(jnp.isfinite(x), axis=-1)


def row_flags(q, k, v, rho, mask):
  """[B, K, G, T, 1] bool: rows whose own q (or probe rho) or a visible key/value holds a
  non-finite entry. q, rho [B,K,G,T,D]; k, v [B,K,S,D]; mask as in `family_core`."""
  bad = nonfinite_rows
  bad_kv = (bad(k) | bad(v))[:, :, None, None, :]
  flag = jnp.any(mask & bad_kv, axis=-1, keepdims=True) | bad(q)[..., None]
  return flag if rho is None else flag | bad(rho)[..., None]


def nan_rows(o, flag):
  """NaN in every entry of the rows that are flagged or hold a non-finite entry."""
  flag = flag | ~jnp.all(jnp.isfinite(o), axis=-1, keepdims=True)
  return jnp.where(flag, jnp.nan, o)


def _cg(op, b, iters):
  """Conjugate gradient with a fixed iteration count (jit- and grad-friendly).

  Divisions are guarded so a converged (zero) residual stays at zero instead of NaN.
  """
  def dot(x, y):
    return jnp.sum(x * y, axis=-1, keepdims=True)

  def body(_, state):
    x, r, p, rr = state
    ap = op(p)
    pap = dot(p, ap)
    alpha = jnp.where(pap > 0, rr / jnp.where(pap > 0, pap, 1.0), 0.0)
    x = x + alpha * p
    r = r - alpha * ap
    rr_new = dot(r, r)
    beta = jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0)
    return x, r, r + beta * p, rr_new

  x0 = jnp.zeros_like(b)
  x, *_ = jax.lax.fori_loop(0, iters, body, (x0, b, b, dot(b, b)))
  return x


def _cholesky_solve_unrolled(system, rhs):
  """Solve system x = rhs for a batch of small symmetric positive definite systems.

  system [..., D, D] (only its lower triangle is read), rhs [..., D] -> x [..., D]. The
  Cholesky factorization and the forward / back substitutions written out over the head dim:
  slices, multiply-adds, one sqrt and one divide per column, all elementwise over the batch,
  which XLA fuses into a few kernels (no batched library calls on many tiny matrices) and
  autodiff differentiates like any other elementwise code. The factor is built column by
  column, each column one [..., D - j] array, so the graph holds O(D^2) ops of O(D^3) work;
  it is still meant for small heads (the API refuses head_dim > 32). A system that is not
  positive definite gives NaN (sqrt of a negative pivot), as jnp.linalg.cholesky does.
  """
  d = system.shape[-1]
  a_cols = jnp.unstack(system, axis=-1)  # A[..., :, j]; one unstack, its transpose one stack
  below, inv = [], []  # below[j] = L[j+1:, j] as [..., D - j - 1]; inv[j] = 1 / L_jj
  for j in range(d):
    col = a_cols[j][..., j:]  # A[j:, j]
    for p in range(j):
      l_p = below[p][..., j - p - 1:]  # L[j:, p]
      col = col - l_p * l_p[..., :1]  # - L[j:, p] L_jp
    inv.append(1.0 / jnp.sqrt(col[..., 0]))
    below.append(col[..., 1:] * inv[j][..., None])
  y, rest = [], rhs  # L y = rhs, column by column: rest = rhs[j:] - L[j:, :j] y[:j]
  for j in range(d):
    y.append(rest[..., 0] * inv[j])
    if j + 1 < d:
      rest = rest[..., 1:] - below[j] * y[j][..., None]
  low = [jnp.unstack(c, axis=-1) for c in below]  # low[j][i - j - 1] = L_ij
  x = [None] * d  # L^T x = y, from the last row up
  for i in reversed(range(d)):
    acc = y[i]
    for p in range(i + 1, d):
      acc = acc - low[i][p - i - 1] * x[p]
    x[i] = acc * inv[i]
  return jnp.stack(x, axis=-1)


def solve_probe(q, k, a, has_keys, *, affine, ridge, solver, cg_iters):
  """The exact local-regression probe rho (spec, `solve` row).

  linear:          rho = (sum_j a_j k_j k_j^T + lam I)^-1 q
  affine/boundary: rho = (M + lam I)^-1 mu,  M = sum_j a_j (k_j - q)(k_j - q)^T,  mu = kbar - q
  """
  kbar = jnp.einsum("bkgts,bksd->bkgtd", a, k)
  if solver != "cg":
    kk = jnp.einsum("bkgts,bksd,bkse->bkgtde", a, k, k)
    return solve_moments(q, kbar, kk, has_keys, affine=affine, ridge=ridge, solver=solver,
                         cg_iters=cg_iters)
  ridge = ridge + jnp.where(has_keys, 0.0, 1.0)

  def op(x):  # matrix-free: never forms the D x D moment
    akx = a * jnp.einsum("bkgtd,bksd->bkgts", x, k)
    y = jnp.einsum("bkgts,bksd->bkgtd", akx, k) + ridge * x
    if affine != "linear":
      qx = jnp.sum(q * x, axis=-1, keepdims=True)
      y = y - kbar * qx - q * jnp.sum(akx, axis=-1, keepdims=True) + q * qx
    return y

  return _cg(op, q if affine == "linear" else kbar - q, cg_iters)


def solve_moments(q, kbar, kk, has_keys, *, affine, ridge, solver, cg_iters):
  """The solve probe from the row's moments kbar [..., D] and kk = sum_j a_j k_j k_j^T
  [..., D, D] (weights summing to 1; kbar unused for affine='linear')."""
  # Rows without keys get the identity system instead of a zero one: their output is
  # zeroed anyway, and a singular solve there would turn gradients into NaN.
  ridge = ridge + jnp.where(has_keys, 0.0, 1.0)
  rhs = q if affine == "linear" else kbar - q
  if affine != "linear":
    # Second moment about the query: E[kk^T] - kbar q^T - q kbar^T + q q^T (weights sum to 1).
    kk = (kk - kbar[..., :, None] * q[..., None, :] - q[..., :, None] * kbar[..., None, :]
          + q[..., :, None] * q[..., None, :])
  eye = jnp.eye(q.shape[-1], dtype=q.dtype)
  system = kk + ridge[..., None] * eye
  # moments shared by a kv head's q heads (uniform weights) meet per-head right-hand sides
  system = jnp.broadcast_to(system, jnp.broadcast_shapes(system.shape[:-1], rhs.shape)
                            + system.shape[-1:])
  rhs = jnp.broadcast_to(rhs, system.shape[:-1])
  if solver == "unrolled":  # the same factorization, as elementwise ops (small heads)
    return _cholesky_solve_unrolled(system, rhs)
  if solver == "cholesky":  # a weighted second moment plus ridge: symmetric positive definite
    factor = jnp.linalg.cholesky(system)
    return jax.scipy.linalg.cho_solve((factor, True), rhs[..., None])[..., 0]
  if solver == "cg":
    return _cg(lambda x: jnp.einsum("...de,...e->...d", system, x), rhs, cg_iters)
  return jnp.linalg.solve(system, rhs[..., None])[..., 0]


def family_core(q, k, v, r, scale, mask, *, probe, affine, ridge=0.0, solver="direct",
                cg_iters=None):
  """All members on split-head inputs: q, r [B,K,G,T,D]; k [B,K,S,D]; v [B,K,S,Dv].

  scale [K, G] = 1/bandwidth (0 for an infinite bandwidth); mask broadcastable to
  [B, K, G, T, S]. Returns [B, K, G, T, Dv] in the inputs' dtype.

  Non-finite inputs: a row whose q (or probe), or a key or value it sees, holds a
  non-finite entry is NaN in every entry; every other row is computed from finite inputs
  only. The rows are flagged first and the formulas run on the inputs' finite parts, so a
  NaN row is a constant: it sends no gradient back, and a NaN at a position a row does
  not see reaches neither its output nor its gradients.
  """
  rho_in = {"query": q, "learned": r}.get(probe) if affine != "constant" else None
  flag = row_flags(q, k, v, rho_in, mask)
  q, k, v = finite(q), finite(k), finite(v)
  a = weights(q, k, scale, mask)
  vbar = jnp.einsum("bkgts,bksd->bkgtd", a, v)
  has_keys = jnp.any(mask, axis=-1)[..., None]
  if affine == "constant" or probe == "none" and affine != "linear":
    return jnp.where(has_keys, nan_rows(vbar, flag), 0.0)
  if probe == "none":  # linear model through the origin with a zero probe
    return jnp.zeros_like(vbar)
  if probe == "query":
    rho = q
  elif probe == "learned":
    rho = finite(r)
  else:
    rho = solve_probe(q, k, a, has_keys, affine=affine, ridge=ridge, solver=solver,
                      cg_iters=cg_iters or q.shape[-1])

  t = jnp.einsum("bkgtd,bksd->bkgts", rho, k)
  u = jnp.einsum("bkgts,bksd->bkgtd", a * t, v)  # sum_j a_j (rho . k_j) v_j
  tbar = jnp.sum(a * t, axis=-1, keepdims=True)  # rho . kbar
  if affine == "linear":
    o = u
  elif affine == "affine":  # vbar - C^T rho, with C^T rho = u - tbar * vbar
    o = (1.0 + tbar) * vbar - u
  else:  # boundary: divide the correction by 1 - rho . mu = 1 - tbar + rho . q
    den = 1.0 - tbar + jnp.sum(rho * q, axis=-1, keepdims=True)
    o = vbar - (u - tbar * vbar) / den
  return jnp.where(has_keys, nan_rows(o, flag), 0.0)


def dense_attention(q, k, v, r, scale, *, probe, affine, ridge, solver, cg_iters, causal,
                    window, q_seg, kv_seg, compute_dtype, mask=None):
  """[B,T,Hq,D] layout wrapper around `family_core` (validated inputs; see api.attention).

  mask: None (from causal / window / segments), or a boolean [B, T, S] given as is (decode).
  """
  hkv = k.shape[2]
  t, s = q.shape[1], k.shape[1]
  if mask is None:
    mask = masks.full_mask(t, s, causal=causal, window=window, q_seg=q_seg, kv_seg=kv_seg)
  mask = mask[:, None, None] if mask.ndim == 3 else mask[None, None, None]
  cast = lambda x: None if x is None else x.astype(compute_dtype)
  o = family_core(
      split_heads(cast(q), hkv), kv_heads_first(cast(k)), kv_heads_first(cast(v)),
      None if r is None else split_heads(cast(r), hkv),
      scale.astype(compute_dtype).reshape(hkv, -1), mask,
      probe=probe, affine=affine, ridge=ridge, solver=solver, cg_iters=cg_iters)
  return merge_heads(o).astype(q.dtype)
