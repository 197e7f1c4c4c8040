"""Moment form of the family (the `"moments"` implementation).

A row's output depends on its keys and values only through weighted moments: vbar, kbar,
E[k k^T] and E[k v^T] under the row's weights a_i. Stack the features of each key,
f_j = [v_j, k_j, upper(k_j k_j^T), vec(k_j v_j^T)] (only those the member reads), and one
weighted sum A F gives them all: softmax attention with a value of width w = Dv + D +
D(D+1)/2 + D Dv. What follows per row is D x D algebra. The dense formulas instead make
several passes over [T, S] arrays (rho . k_j, a_j (rho . k_j), and their gradients), so for
small heads (MAD's D = 8: w <= 116 against S = 128-256) this form moves a fraction of the
bytes. With an infinite bandwidth and a plain causal (or no) mask the weights are uniform
over a prefix: A F is a cumulative sum over keys divided by the count, O(T w) with no [T, S]
array at all (normalised linear attention and the Mesa-like ridge regression).

On a GPU, A F runs on the fused softmax kernel (`pallas_kernels`) with F as its value (the
kernel takes a value head dim other than q's), and its backward returns dF, which XLA carries
back through the features. No [T, S] array reaches memory; its float32 dots have an XLA
float32 dot's precision (TF32 by default on the GPU, as the dense path's einsums).

Same contract as the dense reference (`reference.family_core`): float32 (or float64)
arithmetic, rows without keys are zero, a row that sees a non-finite entry is NaN and a
constant. The moments are taken about zero and centred afterwards (E[kk^T] - kbar q^T - ...),
exactly as the dense direct solvers do.
"""
from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp
import numpy as np

from parallax_jax import masks
from parallax_jax import reference as ref

_GPU_PLATFORMS = ("gpu", "cuda", "rocm")
_local = threading.local()


@contextlib.contextmanager
def kernel_enabled(enabled: bool):
  """Within this block (this thread's traces), whether A F may run on the fused softmax
  kernel on a GPU (the default) or stays in XLA: the A/B switch of bench/mad_step.py."""
  before = getattr(_local, "kernel", True)
  _local.kernel = enabled
  try:
    yield
  finally:
    _local.kernel = before


def needed(probe: str, affine: str) -> frozenset[str]:
  """Which moments the member reads: 'v' (vbar), 'k' (kbar), 'kk', 'kv'."""
  if affine == "constant" or (probe == "none" and affine != "linear"):
    return frozenset({"v"})
  if probe == "none":  # linear through the origin with a zero probe: the output is zero
    return frozenset()
  need = {"kv"}
  if affine != "linear":
    need |= {"v", "k"}
  if probe == "solve":
    need |= {"kk"} | ({"k"} if affine != "linear" else set())
  return frozenset(need)


def width(probe: str, affine: str, d: int, dv: int) -> int:
  """Features per key the member needs (the w of A F)."""
  sizes = {"v": dv, "k": d, "kk": d * (d + 1) // 2, "kv": d * dv}
  return sum(sizes[m] for m in needed(probe, affine))


def _pairs(d):
  """One-hot [D, P] selections of the upper triangle's rows and columns, and the [P, D, D] map
  back to a symmetric matrix. Matrix products, not indexing: the gradient of a gather is a
  scatter, which cost more than the whole moment sum on a GPU."""
  rows, cols = np.triu_indices(d)
  p = np.arange(rows.size)
  pick_rows, pick_cols = np.zeros((d, p.size), np.float32), np.zeros((d, p.size), np.float32)
  pick_rows[rows, p] = 1.0
  pick_cols[cols, p] = 1.0
  sym = np.zeros((p.size, d, d), np.float32)
  sym[p, rows, cols] = 1.0
  sym[p, cols, rows] = 1.0
  return pick_rows, pick_cols, sym


def _features(k, v, need):
  """[B, K, S, w] features per key and the slices that unpack their moments."""
  parts, slices, at = [], {}, 0
  d, dv = k.shape[-1], v.shape[-1]
  for name in ("v", "k", "kk", "kv"):
    if name not in need:
      continue
    if name == "v":
      f = v
    elif name == "k":
      f = k
    elif name == "kk":
      pick_rows, pick_cols, _ = _pairs(d)
      f = (jnp.matmul(k, jnp.asarray(pick_rows, k.dtype), precision="highest")
           * jnp.matmul(k, jnp.asarray(pick_cols, k.dtype), precision="highest"))
    else:
      f = (k[..., :, None] * v[..., None, :]).reshape(k.shape[:-1] + (d * dv,))
    parts.append(f)
    slices[name] = slice(at, at + f.shape[-1])
    at += f.shape[-1]
  return jnp.concatenate(parts, axis=-1), slices


def _prefix_count(t, s, causal, dtype):
  """[T, 1] keys each row sees under a plain mask: query i sees keys 0 .. i + S - T (none
  when that is negative: T > S) causally, every key otherwise."""
  if not causal:
    return jnp.full((t, 1), s, dtype)
  return jnp.maximum(jnp.arange(t) + s - t + 1, 0).astype(dtype)[:, None]


def _prefix_means(f, t, causal):
  """Uniform weights under a plain mask: [B, K, 1, T, w] means of f [B, K, S, w] over each
  row's keys (zero for a row without keys)."""
  s = f.shape[2]
  if not causal:
    mean = jnp.broadcast_to(jnp.mean(f, axis=2, keepdims=True), f.shape[:2] + (t, f.shape[-1]))
    return mean[:, :, None]
  csum = _rows_of_prefix(jnp.cumsum(f, axis=2), t)
  count = _prefix_count(t, s, True, f.dtype)
  return jnp.where(count > 0, csum / jnp.maximum(count, 1.0), 0.0)[:, :, None]


def _rows_of_prefix(csum, t):
  """Rows i + S - T of a prefix sum over axis 2 (zero where negative), by a static slice or
  pad: an index gather would differentiate into a scatter."""
  s = csum.shape[2]
  if t <= s:
    return csum[:, :, s - t:]
  pad = [(0, 0)] * csum.ndim
  pad[2] = (t - s, 0)
  return jnp.pad(csum, pad)


def _prefix_flags(q, k, v, rho, causal):
  """`reference.row_flags` under a plain mask, from prefix counts instead of a [T, S] mask."""
  bad = ref.nonfinite_rows
  t, s = q.shape[3], k.shape[2]
  bad_kv = (bad(k) | bad(v)).astype(jnp.int32)  # [B, K, S]
  if causal:
    seen = _rows_of_prefix(jnp.cumsum(bad_kv, axis=-1), t)
  else:
    seen = jnp.broadcast_to(jnp.sum(bad_kv, axis=-1, keepdims=True), bad_kv.shape[:2] + (t,))
  flag = (seen > 0)[:, :, None, :, None] | bad(q)[..., None]
  return flag if rho is None else flag | bad(rho)[..., None]


def _dense_sum(q, k, feats, scale, mask):
  """A F with the weights materialised (XLA)."""
  return jnp.einsum("bkgts,bksw->bkgtw", ref.weights(q, k, scale, mask), feats)


def _plain_mask(t, s, causal):
  """The [1, 1, 1, T, S] mask of a plain (causal or no) mask, for the XLA weighted sum."""
  return masks.full_mask(t, s, causal=causal, window=None)[None, None, None]


def kernel_sum(q, k, feats, scale, *, causal, window, q_seg, kv_seg, interpret=False):
  """A F on the fused softmax kernel, or None where it cannot run these shapes.

  q [B,K,G,T,D]; k [B,K,S,D]; feats [B,K,S,w]; scale [K,G]. Returns [B,K,G,T,w].
  """
  try:
    import pallas_kernels
  except ImportError:  # pragma: no cover - depends on the install
    return None
  hkv = k.shape[1]
  qs = ref.merge_heads(q)
  ks, fs = (jnp.swapaxes(x, 1, 2) for x in (k, feats))  # [B, S, K, D] and [B, S, K, w]
  # the caller decided the platform (a GPU, or interpret mode): only the shapes are checked
  ok, _ = pallas_kernels.is_supported(qs, ks, fs, window=window, q_segment_ids=q_seg,
                                      kv_segment_ids=kv_seg, interpret=interpret, platform="gpu")
  if not ok:
    return None
  out = pallas_kernels.parallax_flash_attention(
      qs, ks, fs, scale=scale.reshape(-1), causal=causal, window=window, q_segment_ids=q_seg,
      kv_segment_ids=kv_seg, interpret=interpret)
  return ref.split_heads(out, hkv)


def moment_core(q, k, v, r, scale, mask, *, probe, affine, ridge=0.0, solver="direct",
                cg_iters=None, plain=None, uniform=False, weighted_sum=None):
  """All members from moments; arguments as `reference.family_core`.

  plain: None (the keys a row sees are given by `mask`), or 'causal' / 'full' for the plain
  end-aligned causal mask / no mask (then `mask` may be None): which rows see a non-finite
  key, and whether a row sees any key, come from prefix counts, with no [T, S] array.
  uniform: the bandwidth is infinite; with a plain mask A F is then a prefix mean.
  weighted_sum: (q, k, feats, scale) -> A F or None (e.g. `kernel_sum` with the call's mask
  arguments); None, or a None result, computes it in XLA.
  """
  rho_in = {"query": q, "learned": r}.get(probe) if affine != "constant" else None
  t, s = q.shape[3], k.shape[2]
  if plain is None:
    flag = ref.row_flags(q, k, v, rho_in, mask)
    has_keys = jnp.any(mask, axis=-1)[..., None]
  else:
    flag = _prefix_flags(q, k, v, rho_in, plain == "causal")
    has_keys = _prefix_count(t, s, plain == "causal", q.dtype) > 0
  q, k, v = ref.finite(q), ref.finite(k), ref.finite(v)
  need = needed(probe, affine)
  if not need:
    return jnp.zeros(q.shape[:-1] + v.shape[-1:], q.dtype)
  feats, at = _features(k, v, need)
  if uniform and plain is not None:
    mom = _prefix_means(feats, t, plain == "causal")
  else:
    mom = None if weighted_sum is None else weighted_sum(q, k, feats, scale)
    if mom is None:
      mom = _dense_sum(q, k, feats, scale,
                       mask if mask is not None else _plain_mask(t, s, plain == "causal"))
  get = lambda name: mom[..., at[name]]
  if need == {"v"}:
    return jnp.where(has_keys, ref.nan_rows(get("v") + jnp.zeros_like(q[..., :1]), flag), 0.0)
  d, dv = k.shape[-1], v.shape[-1]
  ekv = get("kv").reshape(mom.shape[:-1] + (d, dv))
  if probe == "query":
    rho = q
  elif probe == "learned":
    rho = ref.finite(r)
  else:
    _, _, sym = _pairs(d)  # the upper triangle's moments fill both halves
    ekk = jnp.einsum("...p,pde->...de", get("kk"), jnp.asarray(sym, mom.dtype),
                     precision="highest")
    kbar = get("k") if affine != "linear" else None
    rho = ref.solve_moments(q, kbar, ekk, has_keys, affine=affine, ridge=ridge, solver=solver,
                            cg_iters=cg_iters or d)
  # sum_j a_j (rho . k_j) v_j: a D x Dv contraction per row, exact (no TF32 on a GPU)
  u = jnp.einsum("...de,...d->...e", ekv, rho, precision="highest")
  if affine == "linear":
    o = u
  else:
    vbar = get("v")
    tbar = jnp.sum(rho * get("k"), axis=-1, keepdims=True)  # rho . kbar
    if affine == "affine":
      o = (1.0 + tbar) * vbar - u
    else:
      den = 1.0 - tbar + jnp.sum(rho * q, axis=-1, keepdims=True)
      o = vbar - (u - tbar * vbar) / den
  o = o + jnp.zeros_like(q[..., :1])  # uniform moments are shared by a kv head's q heads
  return jnp.where(has_keys, ref.nan_rows(o, flag), 0.0)


def moment_attention(q, k, v, r, scale, *, probe, affine, ridge, solver, cg_iters, causal,
                     window, q_seg, kv_seg, compute_dtype, uniform=False, kernel=None):
  """[B,T,Hq,D] layout wrapper around `moment_core` (validated inputs; see api.attention).

  uniform: the bandwidth is infinite for every head; with no window and no segments the
  moments are prefix means (no [T, S] mask or weights).
  kernel: run A F on the fused softmax kernel: None (on a GPU, unless `kernel_enabled(False)`),
  True, False, or 'interpret' (Pallas interpret mode, for tests off the GPU).
  """
  if kernel is None:
    kernel = jax.default_backend() in _GPU_PLATFORMS and getattr(_local, "kernel", True)
  weighted_sum = None
  if kernel:
    weighted_sum = lambda q_, k_, f_, s_: kernel_sum(
        q_, k_, f_, s_, causal=causal, window=window, q_seg=q_seg, kv_seg=kv_seg,
        interpret=kernel == "interpret")
  hkv = k.shape[2]
  plain, mask = None, None
  if window is None and q_seg is None:  # no [T, S] mask is needed at all
    plain = "causal" if causal else "full"
  else:
    mask = masks.full_mask(q.shape[1], k.shape[1], causal=causal, window=window, q_seg=q_seg,
                           kv_seg=kv_seg)
    mask = mask[:, None, None] if mask.ndim == 3 else mask[None, None, None]
  cast = lambda x: None if x is None else x.astype(compute_dtype)
  o = moment_core(
      ref.split_heads(cast(q), hkv), ref.kv_heads_first(cast(k)), ref.kv_heads_first(cast(v)),
      None if r is None else ref.split_heads(cast(r), hkv),
      scale.astype(compute_dtype).reshape(hkv, -1), mask, probe=probe, affine=affine,
      ridge=ridge, solver=solver, cg_iters=cg_iters, plain=plain, uniform=uniform,
      weighted_sum=weighted_sum)
  return ref.merge_heads(o).astype(q.dtype)
