"""Chunked LM-head + cross-entropy that never holds float32 logits for all tokens at once.

    loss_sum, (nll_sum, zsq_sum, count) = fused_cross_entropy(
        x, w, targets, mask, z_loss=1e-4, dtype=jnp.bfloat16, w_layout="vd", chunk_tokens=4096)

x [..., d] hidden states, w the head ([V, d] tied embedding "vd", or [d, V] "dv"), targets
[...] int, mask [...] (bool or 0/1). logits = x.astype(dtype) . w.astype(dtype) with float32
accumulation (the numerics of `logits_dot`'s forward); per token nll = lse - logits[target],
zsq = lse^2; the sums run over masked positions; loss_sum = nll_sum + z_loss * zsq_sum.

`fused_cross_entropy` computes the gradient in the forward ("fused linear cross entropy", as in
Liger-Kernel): tokens are processed `chunk_tokens` at a time in a `lax.scan`, so only one
chunk's [chunk, V] float32 logits is live. Per chunk the logits cotangent of loss_sum,
mask * (softmax * (1 + 2 z lse) - onehot(target)), is written once in `dtype` and fed to
two `dtype` matmuls with float32 accumulation: dx (x's dtype) and dW (a float32 accumulator,
returned in w's dtype). Those two are the only residuals; the backward scales them by the
scalar cotangent of loss_sum. Only loss_sum is differentiable: a nonzero cotangent on
nll_sum / zsq_sum / count raises NotImplementedError (value_and_grad(..., has_aux=True) on
loss_sum gives them symbolic-zero cotangents). Without differentiation only the forward
sums run (no dx / dW work); `chunked_cross_entropy` is that forward as a plain function.

Targets: masked positions may hold any id (padding, -1, >= V): they are clipped for the
gather and contribute nothing. An unmasked target outside [0, V) makes nll_sum (and
loss_sum) NaN rather than a silently wrong number.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

__all__ = ["fused_cross_entropy", "chunked_cross_entropy"]


def _check(x, w, targets, mask, w_layout, chunk_tokens, z_loss, dtype):
  if isinstance(z_loss, jax.core.Tracer):  # float() below would fail deep inside the loss
    raise ValueError(f"z_loss must be a python number (static), got the traced {z_loss!r}")
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):  # an int dtype would truncate x and w
    raise ValueError(f"dtype must be a floating dtype, got {jnp.dtype(dtype)}")
  if w_layout not in ("dv", "vd"):
    raise ValueError(f"w_layout must be 'dv' or 'vd', got {w_layout!r}")
  if w.ndim != 2 or w.shape[1 if w_layout == "vd" else 0] != x.shape[-1]:
    raise ValueError(f"w {w.shape} (layout {w_layout!r}) does not match x's last dim "
                     f"{x.shape[-1]}")
  if targets.shape != x.shape[:-1] or mask.shape != x.shape[:-1]:
    raise ValueError(f"targets {targets.shape} and mask {mask.shape} must equal x's leading "
                     f"shape {x.shape[:-1]}")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets must be integers, got {targets.dtype}")
  if (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, (int, np.integer))
      or chunk_tokens < 1):
    raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")


def _chunks(x, targets, mask, chunk_tokens):
  """[n_chunks, c, ...] views of the flattened tokens, padded with mask 0.

  Chunk j holds tokens i * n_chunks + j (strided, not contiguous): a batch-sharded x keeps
  its sharding on the within-chunk axis, so the scan runs over an unsharded axis.
  """
  d = x.shape[-1]
  n = math.prod(x.shape[:-1])
  k = -(-n // min(chunk_tokens, n))  # number of chunks
  c = -(-n // k)  # balanced chunk size: padding < k tokens
  pad = k * c - n

  def split(a, fill):
    a = a.reshape(n, *a.shape[len(x.shape) - 1:])
    if pad:
      a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
    return jnp.swapaxes(a.reshape(c, k, *a.shape[1:]), 0, 1)

  return split(x, 0), split(targets.astype(jnp.int32), 0), split(mask, False), (n, c, k, d)


def _unchunk(a, n, lead_shape):
  """Inverse of `_chunks` for a per-token result [n_chunks, c, d]."""
  k, c, d = a.shape
  return jnp.swapaxes(a, 0, 1).reshape(k * c, d)[:n].reshape(*lead_shape, d)


def _chunk_stats(xc, wh, tc, mc, dtype, w_layout):
  """f32 logits [c, V], lse [c], and the (nll, zsq, count) sums of one chunk."""
  spec = "cd,vd->cv" if w_layout == "vd" else "cd,dv->cv"
  logits = jnp.einsum(spec, xc.astype(dtype), wh, preferred_element_type=jnp.float32)
  v = logits.shape[-1]
  lse = jax.nn.logsumexp(logits, axis=-1)
  valid = (tc >= 0) & (tc < v)
  picked = jnp.take_along_axis(logits, jnp.clip(tc, 0, v - 1)[:, None], axis=-1)[:, 0]
  picked = jnp.where(valid, picked, jnp.nan)  # unmasked bad target -> NaN, not garbage
  # where, not multiply: a masked NaN (bad target) must not leak into the sums
  nll = jnp.sum(jnp.where(mc, lse - picked, 0.0))
  zsq = jnp.sum(jnp.where(mc, lse * lse, 0.0))
  cnt = jnp.sum(mc.astype(jnp.float32))
  return logits, lse, (nll, zsq, cnt)


def _forward(x, w, targets, mask, z_loss, dtype, w_layout, chunk_tokens, want_dx, want_dw):
  """(nll, zsq, count) sums and, when asked, dx / dW of loss_sum (cotangent 1)."""
  lead = x.shape[:-1]
  zero = jnp.zeros((), jnp.float32)
  if math.prod(lead) == 0:
    dx = jnp.zeros_like(x) if want_dx else None
    return (zero, zero, zero), dx, (jnp.zeros_like(w) if want_dw else None)
  xs, ts, ms, (n, c, k, d) = _chunks(x, targets, mask, chunk_tokens)
  wh = w.astype(dtype)
  grad = want_dx or want_dw
  gx_spec, gw_spec = (("cv,vd->cd", "cv,cd->vd") if w_layout == "vd"
                      else ("cv,dv->cd", "cd,cv->dv"))

  def body(carry, inp):
    sums, dw_acc = carry
    xc, tc, mc = inp
    logits, lse, part = _chunk_stats(xc, wh, tc, mc, dtype, w_layout)
    sums = tuple(a + b for a, b in zip(sums, part))
    if not grad:
      return (sums, dw_acc), None
    # d loss_sum / d logits for one token: softmax * (1 + 2 z lse) - onehot(target), times
    # the mask. One elementwise expression from the f32 logits to `dtype`, so XLA fuses it
    # into a single pass that writes the low-precision tensor (no f32 [c, V] cotangent).
    scale = jnp.where(mc, 1.0 + 2.0 * z_loss * lse, 0.0)
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == tc[:, None]
    g = jnp.exp(logits - lse[:, None]) * scale[:, None] - (onehot & mc[:, None])
    g = g.astype(dtype)
    dxc = None
    if want_dx:
      dxc = jnp.einsum(gx_spec, g, wh, preferred_element_type=jnp.float32).astype(x.dtype)
    if want_dw:
      xh = xc.astype(dtype)
      args = (g, xh) if w_layout == "vd" else (xh, g)
      dw_acc = dw_acc + jnp.einsum(gw_spec, *args, preferred_element_type=jnp.float32)
    return (sums, dw_acc), dxc

  dw0 = jnp.zeros(w.shape, jnp.float32) if want_dw else None
  (sums, dw), dxs = jax.lax.scan(body, ((zero, zero, zero), dw0), (xs, ts, ms))
  dx = _unchunk(dxs, n, lead) if want_dx else None
  return sums, dx, (dw.astype(w.dtype) if want_dw else None)


def chunked_cross_entropy(x, w, targets, mask, *, z_loss: float = 0.0, dtype=jnp.bfloat16,
                          w_layout: str = "vd", chunk_tokens: int = 4096):
  """The forward of `fused_cross_entropy` without any gradient work (evaluation).

  Same signature and outputs. Do not differentiate it: autodiff through its scan would save
  every chunk's logits; use `fused_cross_entropy` for gradients.
  """
  _check(x, w, targets, mask, w_layout, chunk_tokens, z_loss, dtype)
  mask = mask != 0 if mask.dtype != jnp.bool_ else mask
  (nll, zsq, cnt), _, _ = _forward(x, w, targets, mask, float(z_loss), dtype, w_layout,
                                   int(chunk_tokens), False, False)
  return nll + z_loss * zsq, (nll, zsq, cnt)


def fused_cross_entropy(x, w, targets, mask, *, z_loss: float = 0.0, dtype=jnp.bfloat16,
                        w_layout: str = "vd", chunk_tokens: int = 4096):
  """(loss_sum, (nll_sum, zsq_sum, count)), float32; see the module docstring.

  Differentiable in x and w through loss_sum only. z_loss, dtype, w_layout and chunk_tokens
  are static (python values).
  """
  _check(x, w, targets, mask, w_layout, chunk_tokens, z_loss, dtype)
  # bool mask and int32 targets: no cotangents to define for them
  mask = mask != 0 if mask.dtype != jnp.bool_ else mask
  return _fused(x, w, targets.astype(jnp.int32), mask, float(z_loss), jnp.dtype(dtype),
                w_layout, int(chunk_tokens))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(x, w, targets, mask, z_loss, dtype, w_layout, chunk_tokens):
  (nll, zsq, cnt), _, _ = _forward(x, w, targets, mask, z_loss, dtype, w_layout, chunk_tokens,
                                   False, False)
  return nll + z_loss * zsq, (nll, zsq, cnt)


def _fused_fwd(x, w, targets, mask, z_loss, dtype, w_layout, chunk_tokens):
  # symbolic_zeros: args arrive as CustomVJPPrimal; `perturbed` says whether x / w need a
  # gradient at all (e.g. a frozen head skips the dW matmuls).
  want_dx, want_dw = x.perturbed, w.perturbed
  (nll, zsq, cnt), dx, dw = _forward(x.value, w.value, targets.value, mask.value, z_loss,
                                     dtype, w_layout, chunk_tokens, want_dx, want_dw)
  return (nll + z_loss * zsq, (nll, zsq, cnt)), (dx, dw)


def _fused_bwd(z_loss, dtype, w_layout, chunk_tokens, res, cts):
  del z_loss, dtype, w_layout, chunk_tokens
  g_loss, aux_cts = cts
  if not all(isinstance(c, SymbolicZero) for c in aux_cts):
    raise NotImplementedError(
        "fused_cross_entropy: only loss_sum is differentiable; nll_sum, zsq_sum and count "
        "must not receive a cotangent (differentiate loss_sum, e.g. value_and_grad(..., "
        "has_aux=True), or use the unfused logits path)")
  dx, dw = res
  if isinstance(g_loss, SymbolicZero):
    return None, None, None, None
  g = g_loss.astype(jnp.float32)
  scale = lambda a: None if a is None else (a.astype(jnp.float32) * g).astype(a.dtype)
  return scale(dx), scale(dw), None, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)
