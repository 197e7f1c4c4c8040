"""Split-KV Pallas (Triton-lowering) decode kernel for Parallax (and softmax) attention.

One new query row per sequence (q, r: [B, Hq, D]) against the model's KV cache layout
[B, S_max, Hkv, D] (`parallax_jax/models/generate.py`), read in place (no copy / transpose).
Per row (spec `attention_family.md`): S1 = q.k*scale, S2 = r.k, one running max m over S1,
P1 = exp(S1 - m), P2 = P1*S2, d1 = sum P1, d2 = sum P2, O1 = P1 V, O2 = P2 V (fp32);
o = (1 + d2/d1) O1/d1 - O2/d1 (r None: o = O1/d1). Rows with no valid key give 0.

Grid (Hkv / KV heads per program, B, num_splits), KV head fastest, so programs running
together read neighbouring heads of the same cache rows (H100, one split: MHA B=256 L=1k-8k
1.5-3% faster than with the batch fastest, GQA B=256 L=8k 1.6%). GQA packing puts the
G = Hq/Hkv query rows (and, in a second tile, their probe rows) of one KV head in one
program, so each K/V byte is read once per split; a program can also take two neighbouring
KV heads (`default_pack`).
q and r are read in place ([B, Hq, D], masked loads pad the G rows to 16) and the kernel
writes o itself: one launch. With splits, each writes fp32 partials (m, d1, d2, O1, O2) of
its G rows, and the last split of (b, h) to arrive (an atomic counter) merges them exactly.
Keys valid for batch b: (lengths[b] - window, lengths[b]) intersected with [0, S_max).
Tiles are [block_kv, D]; the last tile of the cache is clamped to start at S_max - block_kv
(keys already seen are masked), so no padding of the cache is needed when S_max >= block_kv.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (NEG_INF, NUM_SMS, SUPPORTED_DTYPES, balanced,
                                   compiler_params, dot, finite, iota, next_pow2, nonfinite,
                                   pad, rewrite, split_chunk)

# Register budgets (fp32 registers per thread) of the merges' loads in flight.
MERGE_REGS = 192         # `_merge_by_split`
MERGE_REGS_TILES = 64    # `_merge_by_tiles`
# Splits from which the merge reads [splits, D] tiles (`_merge_by_tiles`) rather than split
# by split (H100: split by split wins at 4-16 splits, tiles at 32; bench/NOTES.md, decode v9
# and v10).
MERGE_TILES_FROM = 32


def default_num_splits(batch: int, num_kv_heads: int, s_max: int, block_kv: int = 64,
                       num_sms: int = NUM_SMS, rows: int = 1) -> int:
  """No split once B*Hkv nearly fills the SMs; below that ~2 waves of programs, >= 1 tile each.

  H100 sweeps (decode v3/v4 in bench/NOTES.md): with the merge inside the kernel, splitting
  programs that already cover the SMs only adds merge work (B=32, L=1k: 48.8 us at 1 split,
  56.8 at 2; B=16, L=1k: 26.9 vs 29.9). Below that, ~2 waves win (B=8, L=1k: 4 splits), and
  the count is rounded down so the programs fit the ~2 resident per SM (3-stage Parallax
  tiles: at B=8, L=4k, 5 splits (320 programs) took 70 us against 60 at one wave). One-tile
  splits pay off when they stay within the two waves (B=1, L=1k: 16 splits 8.1-8.3 us
  against 8.8-8.9 for 8). The merge's work grows with rows (T * Hq/Hkv rows per KV head) x
  splits, so many-row (multi-token) launches take at most max(8, 64 // rows) splits (B=1,
  L=4k, T=8: 23.4 us at 8 splits against 44.9 at 32; T=4: 17.6 against 22.6).
  """
  progs = batch * num_kv_heads
  if 10 * progs >= 9 * num_sms:
    return 1
  want = max(1, (2 * num_sms) // progs)
  max_by_len = max(1, s_max // block_kv)
  return int(min(want, max_by_len, 64, max(8, 64 // rows)))


def unsplit_tiles(programs: int, head_dim: int) -> tuple[int, int | None]:
  """(block_kv, num_stages or None for the default) of an unsplit Parallax launch of <= 4
  rows per KV head, by programs per SM: about the same bytes in flight per SM (see
  `default_launch`)."""
  per_sm = programs / NUM_SMS
  if per_sm < 1.8:
    return (128, None) if head_dim <= 64 else (64, None)
  if per_sm < 3 and head_dim <= 64:
    return 64, 4
  if per_sm < 4:
    return 32, None
  return 64, None


def default_pack(batch: int, num_kv_heads: int, s_max: int, head_dim: int, rows: int = 1,
                 parallax: bool = True) -> int:
  """KV heads per program that `parallax_decode` picks when given no launch keyword.

  2 for unsplit Parallax launches of one query row per KV head (MHA) at head_dim <= 64 with
  >= 512 programs (B*Hkv), and of <= 2 rows at head_dim >= 128 with 512-1023 programs over
  <= 1k keys (then with 32-key tiles, 4 stages, 2 warps); else 1. A program of two heads
  reads [block_kv, 2*D] tiles (rows twice as long) and half as many programs share the SMs.
  H100, L2 evicted between steps (decode v13 in bench/NOTES.md, us; cuDNN softmax in
  brackets): MHA B=256 L=1k 185.2 -> 181.4 (185.8), L=4k 716.4 -> 705.0, L=8k 1422 -> 1400;
  B=128 L=1k 95.2 -> 94.4 (94.5); B=64 L=4k 179.1 -> 176.9, L=8k 352.0 -> 346.5, L=32k 1391
  -> 1375, L=1k unchanged (49.1); GQA B=64 L=1k 95.0 -> 93.3 (95.1). Slower: GQA B=64 L=4k
  (351.8 -> 353.9 with those tiles, 352.3 with 64-key 3-stage ones), B=128 L=1k (180.2 ->
  181.7), B=256 L=1k (350.9 -> 358.1); a 128-key tile of two D=128 heads does not fit the
  shared memory in 3 stages.
  """
  progs = batch * num_kv_heads
  if (not parallax or num_kv_heads % 2 or s_max < 256
      or default_num_splits(batch, num_kv_heads, s_max, 64, rows=rows) != 1):
    return 1
  if head_dim <= 64 and rows == 1 and progs >= 512:
    return 2
  if head_dim >= 128 and rows <= 2 and 512 <= progs < 1024 and s_max <= 1024:
    return 2
  return 1


def default_launch(batch: int, num_kv_heads: int, s_max: int, head_dim: int, rows: int = 1,
                   parallax: bool = True, pack: int = 1, tokens: int = 1) -> tuple[int, int]:
  """(block_kv, num_splits) that `parallax_decode` picks when given neither, for `pack` KV
  heads per program (`default_pack`: 32-key tiles for two heads at head_dim >= 128).

  64-key tiles and `default_num_splits`, except for Parallax at head_dim >= 128 when that
  gives >= 32 splits (few KV heads, a long cache): half as many splits of 128-key tiles (one
  program per SM: 3 stages of K and V fill its shared memory) halve the latency-bound tile
  steps. H100 (B=1, Hkv=8, D=128, 4 warps): L=4k 10.8 -> 10.2 us, 8k 14.2 -> 14.0, 32k 53.7
  -> 51.9; no gain at D=64 or B=8.
  Also 128-key tiles for unsplit Parallax launches at head_dim >= 128 of >= 512 programs
  (B*Hkv; <= 16 rows): fewer, larger loads per program. H100 (decode v6 in bench/NOTES.md):
  GQA B=256 L=1k 355.2 -> 350.7 us, B=64 L=4k 352.0 -> 349.3; slower with fewer programs (B=32
  L=1k 48.5 -> 50.2: one program per SM, two waves). At D=64, 64-key tiles with 2 warps and 2
  stages (`parallax_decode`) beat them (decode v6, MHA B=256 L=4k: 719 against 741).
  Fewer unsplit Parallax programs (<= 4 rows) keep about the same bytes in flight per SM
  with smaller tiles: 32-key tiles (3 stages; 2 warps at head_dim <= 64) from 1.8 to 4
  programs per SM (at head_dim <= 64 from 3), 64-key tiles with 4 stages from 1.8 to 3 at
  head_dim <= 64 (`parallax_decode`), and 128-key tiles below 1.8 at head_dim <= 64. H100,
  L2 evicted between steps (decode v12 in bench/NOTES.md, us): GQA B=32 (256
  programs) L=4k 180.5 -> 175.9 (cuDNN 179.5), L=32k 1393 -> 1381; MHA B=64 (512) L=1k 51.1
  -> 49.2, L=32k 1432 -> 1395; MHA B=32 (256) L=4k 117.4 -> 94.3 (cuDNN 91.1); MHA B=16 (128)
  L=8k 197.2 -> 92.7 (cuDNN 95.1). Slower: 32-key tiles with 2048 programs (MHA B=256 L=4k 721
  -> 739) or 128 (GQA B=16 L=4k 91.5 -> 105.6).
  One new token (`tokens` = 1) of 4-8 q-heads per KV head (rows) at head_dim >= 128, few
  programs (B*Hkv <= 32) and a long cache: 128-key tiles, one program per SM, each split at
  least 4 tiles long. The rows cap of `default_num_splits` (for the merge of multi-token
  launches) left these at 16 splits of 64-key tiles. H100, L2 evicted between steps, Hkv=8
  (decode v15 in bench/NOTES.md, us; cuDNN softmax in brackets): G=4 B=1 L=4k 15.2 -> 13.4
  (13.7), L=16k 34.2 -> 30.4 (30.6), L=32k 54.5 -> 51.3 (51.8), B=2 L=4k 21.1 -> 18.2 (19.1),
  B=4 L=4k 30.0 -> 29.4 (30.2); G=8 B=1 L=4k 15.2 -> 14.2 (13.6), L=32k 70.7 -> 53.9 (52.0).
  """
  ns = default_num_splits(batch, num_kv_heads, s_max, 64, rows=rows)
  progs = batch * num_kv_heads
  if (parallax and head_dim >= 128 and tokens == 1 and 4 <= rows <= 8 and ns > 1
      and progs <= 32 and s_max >= 2048):
    return 128, max(1, min(NUM_SMS // progs, s_max // (4 * 128)))
  if pack > 1 and head_dim >= 128 and ns == 1:
    return 32, 1
  if parallax and head_dim >= 128 and ns >= 32 and s_max >= 2048:
    return 128, ns // 2
  if parallax and head_dim >= 128 and ns == 1 and progs >= 512 and rows <= 16 and s_max >= 256:
    return 128, 1
  if parallax and ns == 1 and rows <= 4 and s_max >= 256:
    return unsplit_tiles(progs, head_dim)[0], 1
  return 64, ns


def _p2v(p2, v):
  """P2 V with ~16-bit P2 precision on the tensor cores.

  The output subtracts O2/d1, which amplifies the rounding of P2 (P2 in bf16 alone costs
  ~1e-2 relative error); an fp32 dot runs off the tensor cores (it cost 20-50% of the decode
  time). P2 = hi + lo with both in V's dtype keeps 16 (bf16) or 22 (fp16) bits for two cheap
  MMAs: decode pads the G rows to 16, so the MMA count, not its size, is what matters.
  """
  if v.dtype == jnp.float32:
    return dot(p2, v)
  hi = p2.astype(v.dtype)
  lo = (p2 - hi.astype(jnp.float32)).astype(v.dtype)
  return dot(hi, v) + dot(lo, v)


def _finish(d1, d2, o1, o2):
  """o from the (merged) sums (d1, d2 broadcast against o1, o2); no valid key: 0. A NaN d1
  (a dead row, see `_kernel`) makes the whole row NaN."""
  safe = jnp.where(d1 == 0, 1.0, d1)
  o = o1 / safe if o2 is None else (1.0 + d2 / safe) * o1 / safe - o2 / safe
  return jnp.where(d1 == 0, 0.0, o)


def _kernel(len_ref, q_ref, k_ref, v_ref, r_ref, cnt_ref, o_ref, m_ref, d1_ref, d2_ref, o1_ref,
            o2_ref, *, scale, window, bk, chunk, s_max, group, tokens, num_splits, num_warps,
            interpret, lazy, pack):
  """One program: `pack` KV heads of sequence b, the keys of split s.

  Non-finite values (docs/attention.md): the loop's tiles lie inside the slots the rows see
  (see `run`'s tiles; rows that see fewer than block_kv keys take one tile with masked loads
  instead), so a slot past lengths or before the window never enters a product. With one
  token (T == 1) every row of the program sees the same keys, so no other masking is needed:
  a row that sees a non-finite key or value gets non-finite sums and is marked dead (NaN
  d1) by one row check after the loop. Several tokens (T > 1) see different keys among the
  last T slots (and the first T of a window); there a program whose check finds a dead row
  runs its loop again carefully, a second loop compiled in only for T > 1.
  """
  h, b, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  has_r = r_ref is not None
  head_rows = tokens * group                # rows (token t, head g) = t * G + g of a KV head
  nrow = pack * head_rows                   # the program's `pack` KV heads, one after another
  bh, D = max(16, next_pow2(nrow)), q_ref.shape[-1]
  L = jnp.minimum(len_ref[b], s_max)
  seen_lo = 0 if window is None else jnp.maximum(L - tokens + 1 - window, 0)
  lo = jnp.maximum(s * chunk, seen_lo)
  hi = jnp.minimum((s + 1) * chunk, L)      # [lo, hi): the union of the rows' key ranges
  if tokens > 1:
    # Token t of T sits at slot L - T + t and sees keys j <= that slot (and > slot - window).
    end = jnp.minimum(L - (tokens - 1) + iota(bh, 0) % head_rows // group, L)     # [bh, 1]
    row_lo = jnp.maximum(s * chunk, 0 if window is None else jnp.maximum(end - window, 0))
    row_hi = jnp.minimum((s + 1) * chunk, end)
  # The rows of KV head h, read in place from [Hkv * rows, D] and zero-padded to the 16 rows
  # an MMA needs by a masked load (no padded copy of q / r in HBM).
  rows = pl.ds(h * nrow, bh)
  row_ok = iota(bh, 0) < nrow                                     # [bh, 1]
  load_rows = lambda ref: plgpu.load(ref.at[rows, :], mask=row_ok, other=0.0)
  q = load_rows(q_ref)
  r = load_rows(r_ref) if has_r else None

  # Packed KV heads (pack > 1): a [bk, pack * D] tile holds `pack` heads side by side; row
  # block p of q / r scores against head p's columns and its P against head p's V columns.
  # ok: None (a plain load), or [bk, 1]: key rows outside it load as zeros.
  load_keys = lambda ref, start, cols, ok: (
      ref[pl.ds(start, bk), cols] if ok is None
      else plgpu.load(ref.at[pl.ds(start, bk), cols], mask=ok, other=0.0))
  if pack == 1:
    heads_of = lambda ref, start, ok: [load_keys(ref, start, slice(None), ok)]
    scores = lambda x, ks: dot(x, ks[0], trans_b=True)
    by_head = lambda f, w, vs, acc: acc + f(w, vs[0])
  else:
    sub = iota(bh, 0) // head_rows                                 # [bh, 1] head of a row
    heads_of = lambda ref, start, ok: [load_keys(ref, start, pl.ds(p * D, D), ok)
                                       for p in range(pack)]
    scores = lambda x, ks: balanced(jnp.add, [jnp.where(sub == p, dot(x, kp, trans_b=True),
                                                        0.0) for p, kp in enumerate(ks)])

    def by_head(f, w, vs, acc):
      # acc + row block p's product with its own head's V, picked by a select after the
      # dots (a zero weight in front of another head's V would turn a non-finite entry there
      # into NaN); each product accumulates onto acc, so two tiles are live, as with a sum.
      out = acc + f(w, vs[-1])
      for p in range(len(vs) - 2, -1, -1):
        out = jnp.where(sub == p, acc + f(w, vs[p]), out)
      return out

  def body(i, carry, careful=False, short=False):
    """Tile i: keys from lo + i bk on, of the slots [start, start + bk) (see "Tiles")."""
    if careful:
      *carry, flag = carry
    m, d1, d2, o1, o2 = carry
    first = lo + i * bk
    if short:   # one tile over all the keys, the slots outside [lo, hi) read as zeros
      start = jnp.minimum(first, s_max - bk)
      slots = start + iota(bk, 0)                                           # [bk, 1]
      ok = (slots >= lo) & (slots < hi)
    else:       # inside [seen_lo, L): plain loads
      start, ok = jnp.minimum(first, L - bk), None
    k = heads_of(k_ref, start, ok)
    v = heads_of(v_ref, start, ok)
    j = start + iota(bk, 1)                                                 # [1, bk]
    if tokens == 1:  # every row sees [lo, hi)
      valid = (j >= first) & (j < hi)
    else:
      valid = (j >= jnp.maximum(row_lo, first)) & (j < row_hi)
    s1 = scores(q, k) * scale
    # R K issued before the row max: its MMAs overlap the cross-warp reduction (a barrier
    # the compiler does not move them across). H100: B=8 L=1k 12.5 -> 11.7 us, B=1 L=8k
    # 13.7 -> 13.2.
    s2 = scores(r, k) if has_r else None
    s1 = jnp.where(valid, s1, NEG_INF)
    if careful:  # V's finite part, rows that see a non-finite value flagged, S2 masked
      bad = [jnp.max(nonfinite(vp), axis=1)[None, :] for vp in v]            # [1, bk]
      bad = bad[0] if pack == 1 else balanced(jnp.add, [jnp.where(sub == p, b, 0.0)
                                                         for p, b in enumerate(bad)])
      flag = jnp.maximum(flag, jnp.max(jnp.where(valid, bad, 0.0), axis=1))
      v = [finite(vp) for vp in v]
      s2 = jnp.where(valid, s2, 0.0) if has_r else None
    m_new = jnp.maximum(m, jnp.max(s1, axis=1))
    alpha = jnp.exp(m - m_new)
    p1 = jnp.where(valid, jnp.exp(s1 - m_new[:, None]), 0.0)
    d1 = d1 * alpha[:, None] + p1 if lazy else d1 * alpha + jnp.sum(p1, axis=1)
    if has_r:
      p2 = p1 * s2
      d2 = d2 * alpha[:, None] + p2 if lazy else d2 * alpha + jnp.sum(p2, axis=1)
    o1 = by_head(lambda w, vp: dot(w.astype(vp.dtype), vp), p1, v, o1 * alpha[:, None])
    if has_r:
      o2 = by_head(_p2v, p2, v, o2 * alpha[:, None])
    out = (m_new, d1, d2, o1, o2)
    return out + (flag,) if careful else out

  zr = jnp.zeros((bh,), jnp.float32)
  zo = jnp.zeros((bh, D), jnp.float32)
  zd = jnp.zeros((bh, bk), jnp.float32) if lazy else zr
  init = (zr + NEG_INF, zd, zd, zo, zo)
  # Tiles (docs/attention.md, non-finite values): tile i reads the slots [start, start + bk),
  # start = min(lo + i bk, L - bk), and counts its keys [lo + i bk, hi) (the tile clamped to
  # end at L reads keys of the tile before it or of the next split again, masked). Every
  # slot the loop reads lies in [seen_lo, L), the union of what the program's rows see, so
  # a slot no row sees (past lengths, before the window) never enters a product and the
  # loop's loads need no mask. With T == 1 every row sees all of [seen_lo, L): a slot a tile
  # reads but masks is one the row sees elsewhere, so a non-finite value there kills the
  # row either way and a finite one weighs exactly 0. (T > 1: a row may not see such a
  # slot; the careful pass sorts that out.) Rows that see fewer than bk keys (L - seen_lo <
  # bk: a short sequence or window) take one tile with masked loads (zeros outside [lo,
  # hi)) instead of the loop.
  n = jnp.where(hi > lo, (hi - lo + bk - 1) // bk, 0)
  roomy = L - seen_lo >= bk
  # A row with no key in this program (an empty split, lengths 0, or with T > 1 a token
  # before the cache's first slot) computes nothing from its q and r: a scalar branch, taken
  # only then, reads them (non-finite: the row is dead).
  no_key = hi <= lo if tokens == 1 else (hi <= lo) | (L < tokens)

  def qr_dead(d1):  # (q, r read again: the loop's copies need not stay live after it)
    bad = lambda ref: jnp.max(nonfinite(load_rows(ref).astype(jnp.float32)), axis=1)
    worst = jnp.maximum(bad(q_ref), bad(r_ref)) if has_r else bad(q_ref)
    return jnp.where(worst > 0.0, jnp.nan, d1)

  def run(careful):
    loop = lambda c: lax.fori_loop(0, n, functools.partial(body, careful=careful), c)
    short = lambda c: lax.cond(hi > lo, functools.partial(body, 0, careful=careful, short=True),
                               lambda c: c, c)
    # (the single tile in a branch of its own, not after the loop: nothing it needs stays
    # live through the loop)
    m, d1, d2, o1, o2, *flag = lax.cond(roomy, loop, short, init + ((zr,) if careful else ()))
    if lazy:
      d1, d2 = jnp.sum(d1, axis=1), jnp.sum(d2, axis=1)
    if careful:  # flagged: the row sees a non-finite value
      d1 = jnp.where(flag[0] > 0.0, jnp.nan, d1)
    # The row rule: non-finite sums (a non-finite key or value the row sees; with T == 1
    # slots it does not see never get here) make the row dead: NaN d1, so its output, after
    # any merge, is NaN in every entry. One row reduction per program (O1 + O2 is
    # non-finite where either is).
    dead = jnp.max(nonfinite(o1 + o2 if has_r else o1), axis=1)
    if has_r:
      dead = jnp.maximum(dead, nonfinite(d2))
    d1 = jnp.where(dead > 0.0, jnp.nan, d1)
    d1 = lax.cond(no_key, qr_dead, lambda d1: d1, d1)
    return (m, d1, d2, o1, o2), dead

  store_rows = lambda ref, x: plgpu.store(ref.at[rows, :], x.astype(ref.dtype), mask=row_ok)
  vec_ok = row_ok[:, 0]

  def emit(sums):  # the output, or this split's partials (only the real rows reach memory)
    m, d1, d2, o1, o2 = sums
    if num_splits == 1:
      store_rows(o_ref, _finish(d1[:, None], d2[:, None] if has_r else None, o1,
                                o2 if has_r else None))
      return
    plgpu.store(m_ref.at[s, :], m, mask=vec_ok)
    plgpu.store(d1_ref.at[s, :], d1, mask=vec_ok)
    plgpu.store(o1_ref.at[s, :, :], o1, mask=row_ok)
    if has_r:
      plgpu.store(d2_ref.at[s, :], d2, mask=vec_ok)
      plgpu.store(o2_ref.at[s, :, :], o2, mask=row_ok)

  sums, dead = run(False)
  emit(sums)
  if tokens > 1:
    # A dead row may only have met a slot that another token sees (a later token's, or one
    # before this token's window): then the loop runs again carefully (V's finite part,
    # S2 masked per row, rows that see a non-finite value flagged) and rewrites the result.
    any_dead = jnp.max(jnp.where(vec_ok, dead, 0.0)) > 0.0
    pl.when(any_dead)(rewrite(interpret, emit, lambda: run(True)[0]))
  if num_splits == 1:
    return

  # Split partials stored (above), then the last split of (b, h) to arrive merges them:
  # the barrier orders every thread's stores before the release-acquire counter increment
  # (one thread). The merging program's plain loads are ordered after that acquire (the
  # barrier after the atomic hands it to every warp), and the acquire leaves no stale L1
  # line to hit: no line of another split's partial was read before.
  if not interpret:  # (the interpreter runs programs one at a time and has no barrier rule)
    plgpu.debug_barrier()
  slot = b * pl.num_programs(0) + h
  arrived = plgpu.atomic_add(cnt_ref, slot, jnp.ones((), jnp.int32))

  @pl.when(arrived == num_splits - 1)
  def _merge():
    # Every split of (b, h) has arrived, so no one else touches the counter in this launch:
    # leave it zero for the next one (a counter carried across calls needs no zeroing).
    cnt_ref[slot] = jnp.zeros((), jnp.int32)
    merge = _merge_by_tiles if num_splits >= MERGE_TILES_FROM else _merge_by_split
    merge(m_ref, d1_ref, d2_ref, o1_ref, o2_ref, o_ref, h=h, nrow=nrow,
          num_splits=num_splits, num_warps=num_warps)


def merge_group_splits(rows: int, head_dim: int, num_warps: int, parallax: bool,
                       num_splits: int) -> int:
  """Splits whose partials `_merge_by_split` loads at once: a split's [rows, D] tiles of O1
  (and O2) take rows*D / threads registers per thread each, plus the row scalars (m, d1(,
  d2)); as many splits as fit MERGE_REGS, at most all of them."""
  per_tile = -(-next_pow2(rows) * head_dim // (32 * num_warps))
  per_split = (2 if parallax else 1) * per_tile + (3 if parallax else 2)
  return max(1, min(num_splits, MERGE_REGS // per_split))


def _merge_by_split(m_ref, d1_ref, d2_ref, o1_ref, o2_ref, o_ref, *, h, nrow, num_splits,
                    num_warps):
  """o rows of KV head h from the split partials: an exact log-sum-exp merge.

  Split by split: a split's partial is [rows] vectors m, d1, d2 and [rows, D] tiles O1, O2
  of all the head's rows, so every max and sum over the splits is elementwise inside each
  thread (a balanced tree of them). (A row's splits loaded as one [splits, D] tile and
  reduced over axis 0 put a cross-warp reduction, shared memory and a barrier, in each of
  ~5 reductions per row: 2.4 us of the 6.7 us step at H100 GQA B=1 L=1k; bench/NOTES.md,
  decode v9.) A loop takes `merge_group_splits` splits per iteration, all of their loads
  before the arithmetic, so a launch of <= 16 splits of a few rows waits for one load
  latency (H100 GQA B=1 L=8k, 16 splits x 2 rows: 12.21 -> 11.35 us against the v9 merge's
  (row, split) pairs in register-sized chunks, 2 load latencies; groups of 8 splits: 12.00;
  bench/NOTES.md, decode v10), in code whose size does not grow with rows x splits.
  """
  has_r = o2_ref is not None
  R, D = next_pow2(nrow), o1_ref.shape[-1]
  U = merge_group_splits(nrow, D, num_warps, has_r, num_splits)
  row_ok = iota(R, 0) < nrow                                    # [R, 1]

  def load_split(sp):   # (m, d1, d2, O1, O2) of split sp; past the last split: no keys
    ok = sp < num_splits
    sp = jnp.minimum(sp, num_splits - 1)
    vec = lambda ref, other: plgpu.load(ref.at[sp, pl.ds(0, R)], mask=row_ok[:, 0] & ok,
                                        other=other)
    mat = lambda ref: plgpu.load(ref.at[sp, pl.ds(0, R), :], mask=row_ok & ok, other=0.0)
    return (vec(m_ref, NEG_INF), vec(d1_ref, 0.0), vec(d2_ref, 0.0) if has_r else None,
            mat(o1_ref), mat(o2_ref) if has_r else None)

  def group(i, carry):  # fold splits [i*U, (i+1)*U) into the running (m, d1, d2, O1, O2)
    m0, *sums = carry
    parts = [load_split(i * U + u) for u in range(U)]
    m = jnp.maximum(m0, balanced(jnp.maximum, [p[0] for p in parts]))
    ws = [jnp.exp(m0 - m)] + [jnp.exp(p[0] - m) for p in parts]   # (NEG_INF: no keys)
    vals = [[acc] + [p[k] for p in parts] for k, acc in enumerate(sums, 1)]
    col = lambda w, x: w if x.ndim == 1 else w[:, None]
    return (m, *(None if xs[0] is None else balanced(jnp.add, [col(w, x) * x for w, x in
                                                               zip(ws, xs)]) for xs in vals))

  zv, zm = jnp.zeros((R,), jnp.float32), jnp.zeros((R, D), jnp.float32)
  init = (zv + NEG_INF, zv, zv if has_r else None, zm, zm if has_r else None)
  _, d1, d2, o1, o2 = lax.fori_loop(0, -(-num_splits // U), group, init)
  o = _finish(d1[:, None], None if d2 is None else d2[:, None], o1, o2)
  plgpu.store(o_ref.at[pl.ds(h * nrow, R), :], o.astype(o_ref.dtype), mask=row_ok)


def _merge_by_tiles(m_ref, d1_ref, d2_ref, o1_ref, o2_ref, o_ref, *, h, nrow, num_splits,
                    num_warps):
  """`_merge_by_split`'s result from [splits, D] tiles reduced over axis 0: fewer, wider
  loads (H100, 32 splits of MHA B=1, 2 warps, D=64: L=8k 8.92 against 9.34 us, L=32k 28.2
  against 29.1 for `_merge_by_split` in one or two groups; bench/NOTES.md, decode v10).

  Per row, every split's partial is read at once ([nsp, 1] columns and [nsp, D] tiles), so
  a row costs one load latency and two dependent reductions (the max, then the weighted
  sums). Rows go in groups whose tiles fit a register budget (all of a group's loads first;
  more live tiles spill: 2.5x slower at 32 splits x 8 rows), and every store comes last.
  """
  has_r = o2_ref is not None
  D = o1_ref.shape[-1]
  nsp = next_pow2(num_splits)
  split_ok = iota(nsp, 0) < num_splits                           # [nsp, 1]
  load = lambda ref, other: plgpu.load(ref, mask=split_ok, other=other)
  col = lambda ref, g, other: load(ref.at[pl.ds(0, nsp), pl.ds(g, 1)], other)     # [nsp, 1]
  tile = lambda ref, g: load(ref.at[pl.ds(0, nsp), jnp.asarray(g, jnp.int32), :], 0.0)
  tile_elems = nsp * D * (2 if has_r else 1)                     # O1 (and O2) of a row
  per_group = max(1, min(nrow, MERGE_REGS_TILES * 32 * num_warps // tile_elems))
  outs = []
  for g0 in range(0, nrow, per_group):
    group = range(g0, min(g0 + per_group, nrow))
    parts = [(col(m_ref, g, NEG_INF), col(d1_ref, g, 0.0),
              col(d2_ref, g, 0.0) if has_r else None, tile(o1_ref, g),
              tile(o2_ref, g) if has_r else None) for g in group]
    for ms, d1s, d2s, o1s, o2s in parts:
      w = jnp.exp(ms - jnp.max(ms, axis=0, keepdims=True))      # [nsp, 1]
      wsum = lambda x: None if x is None else jnp.sum(w * x, axis=0)
      outs.append(_finish(wsum(d1s), wsum(d2s), wsum(o1s), wsum(o2s)))
  for g, o in enumerate(outs):
    o_ref[h * nrow + g, :] = o.astype(o_ref.dtype)


def parallax_decode(q, k_cache, v_cache, r=None, *, scale, lengths, window=None,
                    num_splits=None, block_kv=None, num_warps=None, num_stages=None,
                    kv_heads_per_program=None, arrivals=None, interpret=False):
  """Decode attention of one new token (or T new tokens) per sequence.

  q, r: [B, Hq, D], or [B, T, Hq, D] for T new tokens (speculative / multi-token decode);
  k_cache, v_cache: [B, S_max, Hkv, D] (Hq multiple of Hkv; q-head h reads kv-head
  h // (Hq//Hkv)); lengths: [B] int32, keys j < lengths[b] valid (the new tokens' k, v
  included). Token t of T sits at slot lengths[b]-T+t and sees the keys j <= its slot (with
  `window`: j > slot - window). scale: python float. All T*G rows of a KV head share its
  tiles, so T tokens cost one read of the cache.
  Returns q's shape in q's dtype, written by the kernel itself (one launch; T > 1 adds a
  transpose of q, r and o).
  arrivals: None, or an all-zero int32 [B, Hkv] array carried across calls (a decode loop's
  state, e.g. `init_arrivals`); the call then returns (o, arrivals). Split launches count
  the arrivals of each (b, h) there to elect the merging program, which leaves it zero
  again; with None, each split launch zeroes a fresh counter (one more small kernel: 0.3-0.7
  us more per step at the split shapes of bench/results/decode_grid_warm.md).
  kv_heads_per_program: neighbouring KV heads one program reads (dividing Hkv, with <= 64
  rows in all): their [block_kv, D] tiles are one [block_kv, heads x D] tile of the cache,
  and each row block scores against its own head's columns. Defaults to `default_pack` when
  no launch keyword is given, else 1. With splits, a program's partials cover all its rows.
  num_stages defaults to 3 with r (H100 sweep: the Parallax loop body needs the deeper K/V
  prefetch to stay memory bound, 370 vs 445 us at B=64, L=4k) and 2 without, except: 3 for
  the softmax's split launches of few programs whose splits span >= 2 tiles (below), and 2
  (with 2 warps) for unsplit launches at head_dim <= 64 with 64-key tiles (4 for Parallax at
  1.8-3 programs per SM) and for unsplit 128-key launches of >= 2048 programs over >= 4k keys.
  block_kv defaults to 64, and to 128 for Parallax at head_dim >= 128 when the default split
  count is >= 32 (with half the splits) and for unsplit Parallax launches of many programs
  (or of few at head_dim <= 64), to 32 for unsplit Parallax launches in between
  (`default_launch`).
  num_warps defaults to 2 when the programs are split over the length into splits of >= 2
  64-key tiles, B*Hkv fits one wave and a KV head has <= 4 rows (sweep: Parallax B=8 L=1k
  15.5 -> 14.5 us, B=1 L=32k 56.1 -> 55.1; with T=4 or 8 tokens x 2 heads, 4 warps: 17.6 vs
  21.2 and 23.4 vs 26.6 us at B=1 L=4k, 8 splits; softmax with 3 stages: MHA B=8 L=8k 57.5 ->
  49.8, GQA B=1 L=8k 11.7 -> 10.7, decode v10 in bench/NOTES.md), and for
  unsplit launches at head_dim <= 64 with 64- or 32-key tiles (see num_stages), else 4.
  """
  if q.ndim not in (3, 4):
    raise ValueError(f"q must be [B, Hq, D] or [B, T, Hq, D], got {q.shape}")
  multi = q.ndim == 4
  B, T, Hq, D = q.shape if multi else (q.shape[0], 1, *q.shape[1:])
  _, S, Hkv, Dk = k_cache.shape
  if Dk != D or v_cache.shape != k_cache.shape or Hq % Hkv:
    raise ValueError(f"bad shapes q {q.shape} k {k_cache.shape} v {v_cache.shape}")
  if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
    raise ValueError(f"unsupported dtype {q.dtype}")
  if D < 16 or D & (D - 1):
    raise ValueError(f"head_dim must be a power of two >= 16, got {D}")
  if r is not None and r.shape != q.shape:
    raise ValueError(f"r {r.shape} != q {q.shape}")
  if arrivals is not None and (arrivals.shape != (B, Hkv) or arrivals.dtype != jnp.int32):
    raise ValueError(f"arrivals must be int32 [B, Hkv] = ({B}, {Hkv}) zeros, got "
                     f"{arrivals.dtype} {arrivals.shape}")
  G = Hq // Hkv
  R = T * G
  if R > 64:
    raise ValueError(f"at most 64 rows per KV head (tokens x Hq/Hkv), got T={T}, Hq={Hq}, "
                     f"Hkv={Hkv}")
  pack = 1 if kv_heads_per_program is None else kv_heads_per_program
  if not isinstance(pack, int) or pack < 1 or Hkv % pack or pack * R > 64:
    raise ValueError(f"kv_heads_per_program must be a positive int dividing Hkv={Hkv} with "
                     f"kv_heads_per_program x {R} rows per KV head <= 64, got {pack!r}")
  bk, ns = (64 if block_kv is None else block_kv), num_splits
  if block_kv is None and num_splits is None and S >= bk:
    if kv_heads_per_program is None and num_warps is None and num_stages is None:
      pack = default_pack(B, Hkv, S, D, rows=R, parallax=r is not None)
    bk, ns = default_launch(B, Hkv, S, D, rows=R, parallax=r is not None, pack=pack,
                            tokens=T)
  bh = max(16, next_pow2(pack * R))
  if S < bk:  # tiny caches only: pad to one tile
    bk = max(16, min(bk, next_pow2(S)))
    k_cache, v_cache = pad(k_cache, 1, bk), pad(v_cache, 1, bk)
  Sp = k_cache.shape[1]
  if ns is None:
    ns = default_num_splits(B, Hkv, S, bk, rows=R)
  chunk, ns = split_chunk(Sp, ns, bk)
  # Unsplit launches at D <= 64 with 64-key tiles: 2 warps and 2 stages, so more programs are
  # resident per SM (H100, Parallax MHA B=64: L=1k 51.4 -> 49.5 us, L=4k 191.0 -> 184.3;
  # B=256 L=8k 1474 -> 1433 against 128-key tiles; decode v6 in bench/NOTES.md;
  # softmax MHA B=256 L=4k 770 -> 723: decode v10).
  small_unsplit = ns == 1 and D <= 64 and bk == 64 and R <= 4
  # Unsplit 32-key tiles at D <= 64 (`default_launch`): 2 warps (H100, L2 evicted, MHA B=64
  # L=4k: 180.1 us, 1 warp 180.2; 2 stages 205.4).
  thin_unsplit = ns == 1 and D <= 64 and bk == 32 and R <= 4
  # Split launches of few programs whose splits span >= 2 tiles: 2 warps, and 3 stages (the
  # softmax too: MHA B=8 L=8k 57.5 -> 49.8 us, L=32k 207 -> 175, GQA B=8 L=1k 10.7 -> 9.2).
  split_few = (ns > 1 and chunk >= 2 * bk and B * Hkv <= NUM_SMS and R <= 4 and bk < 128)
  # Unsplit 128-key Parallax tiles of >= 2048 programs over >= 4k keys: 2 stages (one program
  # per SM either way). H100, L2 evicted: GQA B=256 L=4k 1396 -> 1385 us (three runs), L=8k
  # unchanged (2754-2777 -> 2763-2765); slower with fewer programs or keys (B=128 L=8k 1366 ->
  # 1388, B=256 L=1k 351 -> 356).
  big_unsplit = ns == 1 and bk == 128 and B * Hkv >= 2048 and S >= 4096
  # Unsplit 64-key Parallax tiles at D <= 64 of 1.8-3 programs per SM: 4 stages, one more
  # tile in flight per program (`unsplit_tiles`).
  mid_unsplit = small_unsplit and r is not None and unsplit_tiles(B * Hkv, D) == (64, 4)
  # Two D >= 128 heads per program in 32-key tiles (`default_pack`): 4 stages, 2 warps (H100,
  # GQA B=64 L=1k: 93.3 us; 3 stages and 4 warps 93.3, 64-key tiles with 3 stages 95.7).
  packed_thin = pack > 1 and D >= 128 and bk == 32 and ns == 1
  if num_stages is None:
    num_stages = (4 if mid_unsplit or packed_thin else
                  2 if small_unsplit or big_unsplit or (r is None and not split_few) else 3)
  if num_warps is None:
    num_warps = 2 if split_few or small_unsplit or thin_unsplit or packed_thin else 4
  # Row sums d1, d2 kept as [rows, block_kv] elementwise sums and reduced once after the loop
  # (no cross-warp reduction per tile) where a program loops over >= 2 tiles of <= 16 rows,
  # except D=128 with 2 warps (register pressure). H100: MHA B=1 L=8k 9.9 -> 9.2 us, B=8 L=1k
  # 9.1 -> 8.4; GQA B=1 L=8k 14.0 -> 13.6; but GQA B=8 L=1k (2 warps) 12.4 -> 12.9.
  lazy = chunk >= 2 * bk and bh == 16 and not (D >= 128 and num_warps == 2)
  has_r = r is not None
  lengths = jnp.asarray(lengths, jnp.int32).reshape(B)
  out_shape_final = q.shape

  def rows_by_kv_head(x):  # [B, T, Hq, D] -> [B, Hkv * T * G, D], rows (h, t, g)
    if not multi:
      return x
    x = x.reshape(B, T, Hkv, G, D).transpose(0, 2, 1, 3, 4)
    return x.reshape(B, Hkv * R, D)

  q = rows_by_kv_head(q)
  r = rows_by_kv_head(r) if has_r else None
  Hq = Hkv * R

  heads = pl.BlockSpec((None, Hq, D), lambda h, b, s: (b, 0, 0))
  # `pack` neighbouring KV heads per program: [B, Sp, Hkv, D] read as [B, Sp, Hkv/pack,
  # pack*D] (the same bytes, no copy), so a program's tile rows are pack*D wide.
  Hp = Hkv // pack
  k_cache = k_cache.reshape(B, Sp, Hp, pack * D)
  v_cache = v_cache.reshape(B, Sp, Hp, pack * D)
  kv_spec = pl.BlockSpec((None, Sp, None, pack * D), lambda h, b, s: (b, 0, h, 0))
  in_specs = [pl.BlockSpec((B,), lambda h, b, s: (0,)), heads, kv_spec, kv_spec,
              heads if has_r else None]
  args = [lengths, q, k_cache, v_cache, r]
  out_shape = [jax.ShapeDtypeStruct((B, Hq, D), q.dtype)]
  out_specs = [heads]
  aliases = {}
  if ns > 1:
    # Partials of every split of (b, h) in one block: the merging program reads them all.
    vec = jax.ShapeDtypeStruct((B, Hp, ns, bh), jnp.float32)
    mat = jax.ShapeDtypeStruct((B, Hp, ns, bh, D), jnp.float32)
    vec_spec = pl.BlockSpec((None, None, ns, bh), lambda h, b, s: (b, h, 0, 0))
    mat_spec = pl.BlockSpec((None, None, ns, bh, D), lambda h, b, s: (b, h, 0, 0, 0))
    cnt_spec = pl.BlockSpec((B * Hkv,), lambda h, b, s: (0,))
    in_specs.append(cnt_spec)
    args.append(jnp.zeros((B * Hkv,), jnp.int32) if arrivals is None
                else arrivals.reshape(B * Hkv))
    aliases = {sum(a is not None for a in args) - 1: 1}  # (flat index: r may be None)
    n_vec, n_mat = (3, 2) if has_r else (2, 1)    # (m, d1, d2), (O1, O2)
    parts = [vec] * n_vec + [mat] * n_mat
    part_specs = [vec_spec] * n_vec + [mat_spec] * n_mat
    out_shape += [jax.ShapeDtypeStruct((B * Hkv,), jnp.int32)] + parts
    out_specs = out_specs + [cnt_spec] + part_specs
  else:
    in_specs.append(None)
    args.append(None)

  def kernel(len_ref, q_ref, k_ref, v_ref, r_ref, cnt_in, o_ref, *outs):
    m_ref = d1_ref = d2_ref = o1_ref = o2_ref = cnt_ref = None
    if ns > 1:
      cnt_ref, *parts = outs
      m_ref, d1_ref, *parts = parts
      if has_r:
        d2_ref, *parts = parts
      o1_ref, *parts = parts
      o2_ref = parts[0] if has_r else None
    _kernel(len_ref, q_ref, k_ref, v_ref, r_ref, cnt_ref, o_ref, m_ref, d1_ref, d2_ref,
            o1_ref, o2_ref, scale=float(scale),
            window=None if window is None else int(window), bk=bk, chunk=chunk,
            s_max=S if S >= bk else Sp, group=G, tokens=T, num_splits=ns,
            num_warps=num_warps, interpret=bool(interpret), lazy=lazy, pack=pack)

  call = pl.pallas_call(
      kernel, grid=(Hp, B, ns), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=compiler_params(num_warps, num_stages), interpret=bool(interpret),
      name="parallax_decode" if has_r else "softmax_decode",
  )
  outs = _removable(call)(*args)
  o = outs[0]
  if multi:  # [B, Hkv * T * G, D] -> [B, T, Hq, D]
    o = o.reshape(B, Hkv, T, G, D).transpose(0, 2, 1, 3, 4)
  o = o.reshape(out_shape_final)
  if arrivals is None:
    return o
  return o, (outs[1].reshape(B, Hkv) if ns > 1 else arrivals)


def _removable(call):
  """`call` made removable by dead-code elimination, and refusing differentiation clearly.

  A pallas_call is never removed, even with unused outputs, so flax's `nn.scan` (which traces
  its body to find what the broadcast inputs feed, and rejects any op it cannot remove:
  'broadcasted variable has a data dependency on the scan body') failed on a model with
  scan_layers=True decoding through the kernel. A custom_jvp call is removable.
  """
  @jax.custom_jvp
  def launch(*args):
    return call(*args)

  @launch.defjvp
  def _jvp(primals, tangents):
    raise NotImplementedError("parallax_decode is not differentiable (inference only); use "
                              "parallax_jax.attention for gradients")

  return launch


def init_arrivals(batch: int, num_kv_heads: int):
  """The zeroed arrival counter a decode loop carries across `parallax_decode` calls."""
  return jnp.zeros((batch, num_kv_heads), jnp.int32)


def reference_decode(q, k_cache, v_cache, r=None, *, scale, lengths, window=None):
  """Dense float32 reference of `parallax_decode` (q [B, T, Hq, D]: token by token)."""
  if q.ndim == 4:
    T = q.shape[1]
    lengths = jnp.minimum(jnp.asarray(lengths, jnp.int32), k_cache.shape[1])
    return jnp.stack([reference_decode(q[:, t], k_cache, v_cache,
                                       None if r is None else r[:, t], scale=scale,
                                       lengths=jnp.maximum(lengths - (T - 1 - t), 0),
                                       window=window) for t in range(T)], axis=1)
  B, Hq, D = q.shape
  S, Hkv = k_cache.shape[1], k_cache.shape[2]
  G = Hq // Hkv
  f = lambda x: x.astype(jnp.float32)
  k = jnp.repeat(f(k_cache), G, axis=2)
  v = jnp.repeat(f(v_cache), G, axis=2)
  hp = lax.Precision.HIGHEST
  L = jnp.asarray(lengths, jnp.int32)[:, None, None]
  j = jnp.arange(S)[None, None, :]
  valid = j < L
  if window is not None:
    valid &= j > L - 1 - window
  # A row that sees a non-finite key or value (or has a non-finite q, r) is NaN; the rest
  # is computed from finite parts, so slots a row does not see never reach it.
  nonfinite = lambda x: ~jnp.all(jnp.isfinite(x), axis=-1)
  dead = jnp.any(valid & jnp.transpose(nonfinite(k) | nonfinite(v), (0, 2, 1)), axis=-1)
  dead |= nonfinite(q) | (False if r is None else nonfinite(r))
  k, v, q = finite(k), finite(v), finite(f(q))
  r = None if r is None else finite(f(r))
  s1 = jnp.einsum("bhd,bshd->bhs", q, k, precision=hp) * scale
  s1 = jnp.where(valid, s1, -jnp.inf)
  m = jnp.max(s1, axis=-1, keepdims=True)
  p = jnp.where(valid, jnp.exp(s1 - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  d1 = jnp.sum(p, -1, keepdims=True)
  a = p / jnp.where(d1 > 0, d1, 1.0)
  vbar = jnp.einsum("bhs,bshd->bhd", a, v, precision=hp)
  if r is None:
    o = vbar
  else:
    t = jnp.einsum("bhd,bshd->bhs", r, k, precision=hp)
    tbar = jnp.sum(a * t, -1, keepdims=True)
    o = vbar - (jnp.einsum("bhs,bshd->bhd", a * t, v, precision=hp) - tbar * vbar)
  return jnp.where(dead[..., None], jnp.nan, o)
