"""Float64 NumPy brute force of the spec, one query row at a time (an independent oracle)."""
from __future__ import annotations

import numpy as np


def neighbourhood(i, t, s, causal, window, q_seg=None, kv_seg=None):
  pos = i + s - t
  js = []
  for j in range(s):
    if causal and j > pos:
      continue
    if window is not None and (j <= pos - window or (not causal and j >= pos + window)):
      continue
    if q_seg is not None and q_seg[i] != kv_seg[j]:
      continue
    js.append(j)
  return np.array(js, dtype=int)


def attention(q, k, v, r=None, *, probe, affine, bandwidth=None, ridge=0.0, causal=True,
              window=None, segment_ids=None):
  """Same contract as parallax_jax.attention, computed literally from the spec."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  r = None if r is None else np.asarray(r, np.float64)
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  grp = hq // hkv
  h = np.full(hq, np.sqrt(d)) if bandwidth is None else np.broadcast_to(
      np.asarray(bandwidth, np.float64), (hq,))
  if segment_ids is None:
    q_seg = kv_seg = None
  elif isinstance(segment_ids, tuple):
    q_seg, kv_seg = (np.asarray(x) for x in segment_ids)
  else:
    q_seg = kv_seg = np.asarray(segment_ids)
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  for bi in range(b):
    for hh in range(hq):
      kh = hh // grp
      for i in range(t):
        js = neighbourhood(i, t, s, causal, window,
                           None if q_seg is None else q_seg[bi], None if kv_seg is None else kv_seg[bi])
        if len(js) == 0:
          continue
        qi = q[bi, i, hh]
        kj, vj = k[bi, js, kh], v[bi, js, kh]
        if np.isinf(h[hh]):
          a = np.full(len(js), 1.0 / len(js))
        else:
          logit = kj @ qi / h[hh]
          a = np.exp(logit - logit.max())
          a /= a.sum()
        vbar, kbar = a @ vj, a @ kj
        cov = (kj - kbar).T @ (a[:, None] * (vj - vbar))  # C = sum a (k - kbar)(v - vbar)^T
        mu = kbar - qi
        if probe == "none":
          rho = np.zeros(d)
        elif probe == "query":
          rho = qi
        elif probe == "learned":
          rho = r[bi, i, hh]
        elif affine == "linear":
          rho = np.linalg.solve((kj.T * a) @ kj + ridge * np.eye(d), qi)
        else:
          m2 = ((kj - qi).T * a) @ (kj - qi)
          rho = np.linalg.solve(m2 + ridge * np.eye(d), mu)
        if affine == "constant":
          o = vbar
        elif affine == "linear":
          o = (a * (kj @ rho)) @ vj
        elif affine == "affine":
          o = vbar - cov.T @ rho
        else:
          o = vbar - cov.T @ rho / (1.0 - rho @ mu)
        out[bi, i, hh] = o
  return out
