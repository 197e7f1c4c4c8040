"""Memory-efficient attention family in pure JAX (the `"chunked"` implementation).

Streaming members (probe none/query/learned; any affine) run FlashAttention-style:
query blocks outside, KV blocks inside, one running max shared by both score branches
(S1 = QK^T/h and S2 = RK^T) and one rescale for O1, O2, d1, d2 (spec identity 2).
Every streaming output has the form

    o = A * vbar + B * u,   vbar = sum_j a_j v_j,   u = sum_j a_j t_j v_j,   t_j = rho . k_j

with per-row scalars (A, B) from the affine choice (see `_coefficients`), so one
custom_vjp covers softmax, Parallax, linear and boundary members. The backward
recomputes the weights block by block from the saved logsumexp and keeps only row
statistics (lse, tbar, vbar): memory O(T * D), never O(T * S).

The `solve` probe needs a D x D moment per query, which does not stream through a
scalar rescale; it runs the dense formulas one query block at a time under
`jax.checkpoint` (memory O(block * S)) and is differentiated by autodiff.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from parallax_jax import masks
from parallax_jax import reference as ref


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and key/value block lengths. Larger blocks: fewer loop steps, more memory."""
  block_q: int = 512
  block_kv: int = 512

  def __post_init__(self):
    for name in ("block_q", "block_kv"):
      val = getattr(self, name)
      if not isinstance(val, int) or val <= 0:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {val!r}")


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything shape- or config-like, passed to custom_vjp as a static argument."""
  t: int
  s: int
  bq: int
  bk: int
  causal: bool
  window: int | None
  affine: str
  has_rho: bool
  has_seg: bool

  @property
  def offset(self):
    return self.s - self.t

  @property
  def nq(self):
    return -(-self.t // self.bq)

  @property
  def nk(self):
    return -(-self.s // self.bk)


def _round_up(x, m):
  return -(-x // m) * m


def _kv_range(st: _Static, qi, xp=jnp):
  """KV blocks [lo, hi) that query block qi can see (block skipping for causal/window)."""
  p_lo = qi * st.bq + st.offset                # absolute position of the block's first row
  p_hi = p_lo + st.bq - 1
  hi = st.nk
  if st.causal:
    hi = xp.clip(p_hi // st.bk + 1, 0, st.nk)
  elif st.window is not None:
    hi = xp.clip((p_hi + st.window - 1) // st.bk + 1, 0, st.nk)
  lo = 0
  if st.window is not None:
    lo = xp.clip((p_lo - st.window + 1) // st.bk, 0, st.nk)
  return lo, hi


def _q_range(st: _Static, kj, xp=jnp):
  """Query blocks [lo, hi) that can see KV block kj (the transpose of `_kv_range`)."""
  j_lo = kj * st.bk
  j_hi = j_lo + st.bk - 1
  lo, hi = 0, st.nq
  if st.causal:
    lo = xp.clip((j_lo - st.offset) // st.bq, 0, st.nq)
  elif st.window is not None:
    lo = xp.clip((j_lo - st.window + 1 - st.offset) // st.bq, 0, st.nq)
  if st.window is not None:
    hi = xp.clip((j_hi + st.window - 1 - st.offset) // st.bq + 1, 0, st.nq)
  return lo, hi


def _static_ranges(ranges, st: _Static, n):
  """(lo [n], count [n], max count) of a block-range function over blocks 0..n-1."""
  r = np.array([ranges(st, i, np) for i in range(n)], np.int32).reshape(n, 2)
  count = np.maximum(r[:, 1] - r[:, 0], 0)
  return jnp.asarray(r[:, 0]), jnp.asarray(count), int(count.max(initial=0))


def _varying(x) -> frozenset:
  mat = getattr(x if hasattr(x, "manual_axis_type") else jax.typeof(x), "manual_axis_type", None)
  return getattr(mat, "varying", frozenset())


def _vary_as(step, init):
  """init with each leaf marked varying over the manual mesh axes that `step(init)`'s leaf
  varies over. Inside `jax.shard_map` (check_vma) a loop's carry must keep its type, and a
  carry built from constants (zeros, -inf) is invariant while the step's output, made from
  the sharded q, k, v, is not; elsewhere nothing varies and init comes back as it is."""
  if not getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()):
    return init  # not inside shard_map: no second trace of the step
  out = jax.eval_shape(step, init)
  def cast(x, o):
    missing = tuple(sorted(_varying(o) - _varying(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(cast, init, out)


def _skip_loop(body, lo, count, max_count, init):
  """body(lo + i, carry) for i < count, as a loop of `max_count` steps.

  A fixed trip count (the most blocks any block sees) keeps the loop differentiable in
  reverse mode and transposable (see `_streaming_jvp`); steps past `count` are skipped.
  Each step is rematerialised, so a transposed loop keeps no per-step [bq, bk] values.
  """
  init = _vary_as(lambda c: body(lo, c), init)
  step = jax.checkpoint(lambda i, carry: jax.lax.cond(
      i < count, lambda c: body(lo + i, c), lambda c: c, carry), prevent_cse=False)
  return jax.lax.fori_loop(0, max_count, step, init)


def _slice(x, start, size, axis):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _block_mask(st: _Static, qi, kj, q_seg, kv_seg):
  """Mask [B|1, 1, 1, bq, bk] for (query block qi, KV block kj)."""
  q_pos = qi * st.bq + jnp.arange(st.bq)
  k_pos = kj * st.bk + jnp.arange(st.bk)
  qs = ks = None
  if st.has_seg:
    qs = _slice(q_seg, qi * st.bq, st.bq, 1)
    ks = _slice(kv_seg, kj * st.bk, st.bk, 1)
  m = masks.block_mask(q_pos, k_pos, offset=st.offset, causal=st.causal, window=st.window,
                       q_seg=qs, kv_seg=ks, kv_len=st.s)
  return m[:, None, None] if m.ndim == 3 else m[None, None, None]


def _scores(st, q_b, k_b, scale, mask):
  s = jnp.einsum("bkgqd,bksd->bkgqs", q_b, k_b) * scale[None, :, :, None, None]
  return jnp.where(mask, s, -jnp.inf)


def _coefficients(affine, tbar, c, gbar=None, dou=None):
  """Per-row (A, B) of o = A vbar + B u, and with cotangents (gbar = do.vbar, dou = do.u)
  also dL/dtbar and dL/dc (c = rho . q, only the boundary member depends on it)."""
  one = jnp.ones_like(tbar)
  if affine == "linear":
    return 0.0 * one, one, 0.0 * one, None
  if affine == "affine":  # o = (1 + tbar) vbar - u
    return 1.0 + tbar, -one, gbar, None
  # boundary: o = vbar - (u - tbar vbar) / den, den = 1 - tbar + c
  den = 1.0 - tbar + c
  a_coef = 1.0 + tbar / den
  b_coef = -1.0 / den
  if gbar is None:
    return a_coef, b_coef, None, None
  inv2 = 1.0 / (den * den)
  d_tbar = gbar * (1.0 + c) * inv2 - dou * inv2
  d_c = -gbar * tbar * inv2 + dou * inv2
  return a_coef, b_coef, d_tbar, d_c


def _bad_rows(x):
  """[..., 1] bool: rows of x holding a non-finite entry."""
  return ~jnp.all(jnp.isfinite(x), axis=-1, keepdims=True)


def _forward(st: _Static, q, k, v, rho, scale, q_seg, kv_seg):
  """Streaming forward on padded, split-head inputs. Returns o and row statistics.

  Non-finite inputs, as `reference.family_core`: rows whose q (or probe), or a key or value
  they see, holds a non-finite entry are flagged and come out NaN in every entry; the
  streaming runs on the inputs' finite parts, so no other row is touched.
  """
  b, nkv, g, _, _ = q.shape
  dv = v.shape[-1]
  row = (b, nkv, g, st.bq, 1)
  bad_kv = (_bad_rows(k) | _bad_rows(v))[..., 0]    # [B, K, S]
  bad_q = _bad_rows(q) | (_bad_rows(rho) if st.has_rho else False)
  q, k, v = ref.finite(q), ref.finite(k), ref.finite(v)
  rho = ref.finite(rho) if st.has_rho else rho

  def q_block(qi):
    q_b = _slice(q, qi * st.bq, st.bq, 3)
    r_b = _slice(rho, qi * st.bq, st.bq, 3) if st.has_rho else None

    def kv_step(kj, carry):
      m, d1, o1, d2, o2, flag = carry
      k_b = _slice(k, kj * st.bk, st.bk, 2)
      v_b = _slice(v, kj * st.bk, st.bk, 2)
      mask = _block_mask(st, qi, kj, q_seg, kv_seg)
      s1 = _scores(st, q_b, k_b, scale, mask)
      bad = _slice(bad_kv, kj * st.bk, st.bk, 2)[:, :, None, None, :]
      flag = flag | jnp.any(mask & bad, axis=-1, keepdims=True)
      m_new = jnp.maximum(m, jnp.max(s1, axis=-1, keepdims=True))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      alpha = jnp.exp(m - m_safe)          # one rescale for all four accumulators
      p1 = jnp.exp(s1 - m_safe)
      d1 = alpha * d1 + jnp.sum(p1, axis=-1, keepdims=True)
      o1 = alpha * o1 + jnp.einsum("bkgqs,bksd->bkgqd", p1, v_b)
      if st.has_rho:
        p2 = p1 * jnp.einsum("bkgqd,bksd->bkgqs", r_b, k_b)   # P2 = P1 * S2
        d2 = alpha * d2 + jnp.sum(p2, axis=-1, keepdims=True)
        o2 = alpha * o2 + jnp.einsum("bkgqs,bksd->bkgqd", p2, v_b)
      return m_new, d1, o1, d2, o2, flag

    zeros_row = jnp.zeros(row, q.dtype)
    zeros_out = jnp.zeros(row[:-1] + (dv,), q.dtype)
    init = (jnp.full(row, -jnp.inf, q.dtype), zeros_row, zeros_out, zeros_row, zeros_out,
            _slice(bad_q, qi * st.bq, st.bq, 3))
    lo, count = kv_lo[qi], kv_count[qi]
    m, d1, o1, d2, o2, flag = _skip_loop(kv_step, lo, count, max_count, init)

    has_keys = d1 > 0
    inv = jnp.where(has_keys, 1.0 / jnp.where(has_keys, d1, 1.0), 0.0)
    vbar = o1 * inv
    lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, d1, 1.0)), 0.0)
    if st.affine == "constant":
      return jnp.where(has_keys, ref.nan_rows(vbar, flag), 0.0), lse, zeros_row, vbar
    tbar = d2 * inv
    c = jnp.sum(r_b * q_b, axis=-1, keepdims=True)
    a_coef, b_coef, _, _ = _coefficients(st.affine, tbar, c)
    o = a_coef * vbar + b_coef * (o2 * inv)
    return jnp.where(has_keys, ref.nan_rows(o, flag), 0.0), lse, tbar, vbar

  kv_lo, kv_count, max_count = _static_ranges(_kv_range, st, st.nq)
  outs = jax.lax.map(q_block, jnp.arange(st.nq))
  # [nq, B, K, G, bq, X] -> [B, K, G, nq * bq, X]
  return tuple(jnp.moveaxis(x, 0, 3).reshape(b, nkv, g, st.nq * st.bq, x.shape[-1])
               for x in outs)


def _backward(st: _Static, res, do):
  q, k, v, rho, scale, q_seg, kv_seg, o, lse, tbar, vbar = res
  # As the forward: finite parts of the inputs, and a NaN row (flagged there) is a constant
  # that sends nothing back (its cotangent is dropped and its keys masked).
  q, k, v = ref.finite(q), ref.finite(k), ref.finite(v)
  rho = ref.finite(rho) if st.has_rho else rho
  live = ~_bad_rows(o)                                   # [B, K, G, T, 1]
  o = jnp.where(live, o, 0.0)
  do = jnp.where(live, do.astype(q.dtype), 0.0)
  delta = jnp.sum(do * o, axis=-1, keepdims=True)       # do . o
  if st.affine == "constant":
    a_coef = b_coef = d_tbar = d_c = None
  elif st.affine == "linear":  # o = u: neither vbar nor tbar enters
    a_coef, b_coef, d_tbar, d_c = _coefficients("linear", tbar, None)
  else:
    gbar = jnp.sum(do * vbar, axis=-1, keepdims=True)   # do . vbar
    c = jnp.sum(rho * q, axis=-1, keepdims=True)
    a_coef, b_coef, _, _ = _coefficients(st.affine, tbar, c)
    dou = (delta - a_coef * gbar) / b_coef               # do . u, from do . o = A gbar + B do.u
    _, _, d_tbar, d_c = _coefficients(st.affine, tbar, c, gbar, dou)

  def kv_block(carry, kj):
    dq_u, dr = carry
    k_b = _slice(k, kj * st.bk, st.bk, 2)
    v_b = _slice(v, kj * st.bk, st.bk, 2)

    def q_step(qi, inner):
      dk_b, dv_b, dq_u, dr = inner
      sl = lambda x: _slice(x, qi * st.bq, st.bq, 3)
      q_b, do_b, lse_b, delta_b = sl(q), sl(do), sl(lse), sl(delta)
      mask = _block_mask(st, qi, kj, q_seg, kv_seg) & sl(live)
      s1 = _scores(st, q_b, k_b, scale, mask)
      a = jnp.exp(s1 - lse_b)                                # masked entries -> 0
      g = jnp.einsum("bkgqd,bksd->bkgqs", do_b, v_b)        # do . v_j
      if st.affine == "constant":
        coef_v = a
        ds = a * (g - delta_b)
      else:
        r_b = sl(rho)
        t = jnp.einsum("bkgqd,bksd->bkgqs", r_b, k_b)
        w = sl(a_coef) + sl(b_coef) * t                      # e_j / a_j
        coef_v = a * w
        dt = a * (sl(b_coef) * g + sl(d_tbar))
        ds = a * (w * g + (t - sl(tbar)) * sl(d_tbar) - delta_b)
        dk_b = dk_b + jnp.einsum("bkgqs,bkgqd->bksd", dt, r_b)
        dr = jax.lax.dynamic_update_slice_in_dim(
            dr, sl(dr) + jnp.einsum("bkgqs,bksd->bkgqd", dt, k_b), qi * st.bq, 3)
      dv_b = dv_b + jnp.einsum("bkgqs,bkgqd->bksd", coef_v, do_b)
      dk_b = dk_b + jnp.einsum("bkgqs,bkgqd->bksd", ds * scale[None, :, :, None, None], q_b)
      dq_u = jax.lax.dynamic_update_slice_in_dim(
          dq_u, sl(dq_u) + jnp.einsum("bkgqs,bksd->bkgqd", ds, k_b), qi * st.bq, 3)
      return dk_b, dv_b, dq_u, dr

    init = (jnp.zeros_like(k_b), jnp.zeros_like(v_b), dq_u, dr)
    dk_b, dv_b, dq_u, dr = _skip_loop(q_step, q_lo[kj], q_count[kj], max_count, init)
    return (dq_u, dr), (dk_b, dv_b)

  q_lo, q_count, max_count = _static_ranges(_q_range, st, st.nk)

  dr0 = jnp.zeros_like(q) if st.has_rho else jnp.zeros((), q.dtype)
  init = _vary_as(lambda c: kv_block(c, 0)[0], (jnp.zeros_like(q), dr0))
  (dq_u, dr), (dk, dv) = jax.lax.scan(kv_block, init, jnp.arange(st.nk))
  b, nkv = k.shape[:2]
  dk = jnp.moveaxis(dk, 0, 2).reshape(b, nkv, st.nk * st.bk, k.shape[-1])
  dv = jnp.moveaxis(dv, 0, 2).reshape(b, nkv, st.nk * st.bk, v.shape[-1])
  dscale = jnp.sum(q * dq_u, axis=(0, 3, 4))            # d/d(scale) of s = scale * q.k
  dq = dq_u * scale[None, :, :, None, None]
  if d_c is not None:                                    # boundary: c = rho . q
    dq = dq + d_c * rho
    dr = dr + d_c * q
  return dq, dk, dv, (dr if st.has_rho else None), dscale


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _streaming(st, q, k, v, rho, scale, q_seg, kv_seg):
  return _forward(st, q, k, v, rho, scale, q_seg, kv_seg)[0]


def _streaming_jvp(st, primals, tangents):
  """Forward and reverse mode from one rule, both through the hand-written backward.

  The backward `_backward(res, do)` is linear in the cotangent do: it applies J^T. Its
  linear transpose, taken by JAX, applies J, which is the tangent map forward mode needs.
  Reverse mode transposes that tangent map once more and so runs the hand-written backward
  again (its loops have static trip counts and rematerialised steps: memory stays
  O(T * D)). A custom_vjp would give reverse mode only.
  """
  q, k, v, rho, scale, q_seg, kv_seg = primals
  o, lse, tbar, vbar = _forward(st, q, k, v, rho, scale, q_seg, kv_seg)
  res = (q, k, v, rho, scale, q_seg, kv_seg, o, lse, tbar,
         vbar if st.affine in ("affine", "boundary") else None)
  zero = lambda x: x is None or isinstance(x, jax.custom_derivatives.SymbolicZero)
  live = [i for i, x in enumerate(tangents[:5]) if not zero(x)]
  if not live:
    return o, _vary_as(lambda _: o, jnp.zeros_like(o))

  def bwd(do):  # the cotangents of the inputs whose tangents are not zero
    grads = _backward(st, res, do)
    return tuple(grads[i] for i in live)

  tangent_map = jax.linear_transpose(bwd, o)  # o: its type, varying axes under shard_map
  (do,) = tangent_map(tuple(tangents[i] for i in live))
  return o, do


_streaming.defjvp(_streaming_jvp, symbolic_zeros=True)


def _pad_to(x, axis, size, value=0):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def chunked_attention(q, k, v, r, scale, *, probe, affine, ridge, solver, cg_iters, causal,
                      window, q_seg, kv_seg, compute_dtype, block_sizes=None):
  """Validated [B,T,Hq,D] inputs -> [B,T,Hq,Dv] output in q's dtype (see api.attention)."""
  bs = block_sizes or BlockSizes()
  if probe == "none" and affine == "linear":
    return jnp.zeros(q.shape[:-1] + (v.shape[-1],), q.dtype)
  if probe == "solve":
    return _query_blocked_dense(q, k, v, scale, affine=affine, ridge=ridge, solver=solver,
                                cg_iters=cg_iters, causal=causal, window=window, q_seg=q_seg,
                                kv_seg=kv_seg, compute_dtype=compute_dtype,
                                block_q=min(bs.block_q, 128))
  if probe == "none":
    affine = "constant"
  rho = {"query": q, "learned": r}.get(probe) if affine != "constant" else None

  t, s, hkv = q.shape[1], k.shape[1], k.shape[2]
  bq = min(bs.block_q, _round_up(t, 8))
  bk = min(bs.block_kv, _round_up(s, 8))
  st = _Static(t=t, s=s, bq=bq, bk=bk, causal=causal, window=window, affine=affine,
               has_rho=rho is not None, has_seg=q_seg is not None)
  tp, sp = st.nq * bq, st.nk * bk

  def prep_q(x):
    return _pad_to(ref.split_heads(x.astype(compute_dtype), hkv), 3, tp)

  def prep_kv(x):
    return _pad_to(ref.kv_heads_first(x.astype(compute_dtype)), 2, sp)

  segs = (None, None)
  if q_seg is not None:
    segs = (_pad_to(q_seg, 1, tp, -1), _pad_to(kv_seg, 1, sp, -2))
  o = _streaming(st, prep_q(q), prep_kv(k), prep_kv(v),
                 None if rho is None else prep_q(rho),
                 scale.astype(compute_dtype).reshape(hkv, -1), *segs)
  return ref.merge_heads(o[:, :, :, :t]).astype(q.dtype)


def _query_blocked_dense(q, k, v, scale, *, affine, ridge, solver, cg_iters, causal, window,
                         q_seg, kv_seg, compute_dtype, block_q):
  """Solve-probe members: dense formulas one query block at a time (rematerialised)."""
  t, s, hkv = q.shape[1], k.shape[1], k.shape[2]
  bq = min(block_q, _round_up(t, 8))
  nq = -(-t // bq)
  qs = _pad_to(ref.split_heads(q.astype(compute_dtype), hkv), 3, nq * bq)
  ks = ref.kv_heads_first(k.astype(compute_dtype))
  vs = ref.kv_heads_first(v.astype(compute_dtype))
  sc = scale.astype(compute_dtype).reshape(hkv, -1)
  qseg = None if q_seg is None else _pad_to(q_seg, 1, nq * bq, -1)

  @jax.checkpoint
  def block(qi):
    q_b = _slice(qs, qi * bq, bq, 3)
    mask = masks.block_mask(qi * bq + jnp.arange(bq), jnp.arange(s), offset=s - t,
                            causal=causal, window=window,
                            q_seg=None if qseg is None else _slice(qseg, qi * bq, bq, 1),
                            kv_seg=kv_seg)
    mask = mask[:, None, None] if mask.ndim == 3 else mask[None, None, None]
    # Padded query rows (past T) see no keys only by accident; zero them explicitly.
    mask &= (qi * bq + jnp.arange(bq) < t)[:, None]
    return ref.family_core(q_b, ks, vs, None, sc, mask, probe="solve", affine=affine,
                           ridge=ridge, solver=solver, cg_iters=cg_iters)

  out = jax.lax.map(block, jnp.arange(nq))
  b, _, g = qs.shape[:3]
  out = jnp.moveaxis(out, 0, 3).reshape(b, hkv, g, nq * bq, -1)
  return ref.merge_heads(out[:, :, :, :t]).astype(q.dtype)
