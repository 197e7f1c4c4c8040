"""Grain input pipeline over memory-mapped token shards.

On-disk format (written by `python -m train.prepare`), one directory:

  meta.json                {"format": "parallax-tokens-v1", "dtype": "uint16" | "uint32",
                            "vocab_size": V, "eos_id": int, "tokenizer": "tokenizer.json",
                            "splits": {"train": [shard, ...], "val": [shard, ...]}}
  <shard>.bin              all tokens of the shard, flat, little-endian `dtype`
  <shard>.offsets.npy      int64 [num_docs + 1]: document d is tokens[off[d]:off[d+1]]
                           (every document ends with eos_id and has >= 2 tokens)
  tokenizer.json           the `tokenizers` tokenizer that produced the ids

meta.json also records each shard's CRC-32 checksums ({"checksums": {shard: {"bin": crc,
"offsets": crc}}}). Both files of a shard are opened with numpy memory maps, so only touched
pages are read; before that, each shard is checked once per process (`check_shard`): sizes
against the offsets (a truncated file), and with `verify` (data.verify) one full read for
the checksums and the token ids against the vocabulary. Every error is a `DataError` naming
the file.

Pipeline (train): documents of every train shard, long ones cut into pieces of seq_len + 1
tokens (overlapping by one token) -> seeded shuffle (a new permutation each
epoch) -> repeat forever -> this process's slice (process_index::process_count) ->
(inputs = doc[:-1], targets = doc[1:]) -> concatenate-then-split packing into rows of
seq_len with segment ids (1, 2, ... per document piece, 0 = padding) and per-document
positions -> batch of the per-process batch size -> thread prefetch. A document never sees
another one: the model gets the segment ids (attention masks across them) and the loss masks
padding. The iterator's `get_state()` / `set_state()` is a small JSON dict saved with every
checkpoint, so a resumed run reads exactly the batches it would have read.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Any

import grain
import jax
import numpy as np

FORMAT = "parallax-tokens-v1"
_CHUNK = 1 << 24  # bytes per read while verifying a shard


class DataError(ValueError):
  """A token shard that is missing, truncated, corrupt or out of the vocabulary."""


_verified: set[tuple] = set()  # shards already checked by this process: (file, size, mtime)


def crc32_file(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def check_shard(path: str, shard: str, meta: dict, verify: bool = True):
  """Raise DataError (naming the file) for a missing, truncated or corrupt shard, or one
  holding a token id outside meta's vocabulary. The full read (verify) runs once per
  process and file version."""
  dtype = np.dtype(meta["dtype"]).newbyteorder("<")
  bin_path = os.path.join(path, shard + ".bin")
  off_path = os.path.join(path, shard + ".offsets.npy")
  for f in (bin_path, off_path):
    if not os.path.isfile(f):
      raise DataError(f"{f}: missing (listed in {os.path.join(path, 'meta.json')})")
  size = os.path.getsize(bin_path)
  if size % dtype.itemsize:
    raise DataError(f"{bin_path}: {size} bytes is not a whole number of {dtype.name} tokens "
                    f"(truncated?)")
  try:
    off = np.load(off_path, mmap_mode="r")
  except Exception as e:  # noqa: BLE001 - any unreadable .npy
    raise DataError(f"{off_path}: unreadable ({type(e).__name__}: {e})") from None
  if off.ndim != 1 or off.dtype.kind not in "iu" or len(off) < 2 or int(off[0]) != 0:
    raise DataError(f"{off_path}: expected int64 [num_docs + 1] offsets starting at 0, got "
                    f"{off.dtype} {off.shape}")
  n = size // dtype.itemsize
  if int(off[-1]) != n:
    raise DataError(f"{bin_path}: holds {n} tokens but {off_path} ends at {int(off[-1])} "
                    f"(a truncated or mismatched shard)")
  key = (bin_path, size, os.stat(bin_path).st_mtime_ns, os.stat(off_path).st_mtime_ns)
  if not verify or key in _verified:
    return
  if np.any(np.diff(np.asarray(off)) < 0):
    raise DataError(f"{off_path}: offsets decrease (corrupt)")
  want = meta.get("checksums", {}).get(shard)
  vocab = int(meta["vocab_size"])
  crc, top, at = 0, -1, 0
  with open(bin_path, "rb") as fh:
    pos = 0
    while chunk := fh.read(_CHUNK - _CHUNK % dtype.itemsize):
      crc = zlib.crc32(chunk, crc)
      ids = np.frombuffer(chunk, dtype)
      m = int(ids.max())
      if m > top:
        top, at = m, pos + int(ids.argmax())
      pos += len(ids)
  if want is not None and crc != int(want["bin"]):
    raise DataError(f"{bin_path}: CRC-32 {crc:#010x} differs from the {int(want['bin']):#010x} "
                    f"recorded in meta.json: the file is corrupt")
  if want is not None and crc32_file(off_path) != int(want["offsets"]):
    raise DataError(f"{off_path}: CRC-32 differs from the one recorded in meta.json: the file "
                    f"is corrupt")
  if top >= vocab:
    raise DataError(f"{bin_path}: token id {top} at position {at} is outside the vocabulary "
                    f"(vocab_size {vocab} in meta.json)")
  _verified.add(key)


def read_meta(path: str) -> dict[str, Any]:
  meta_path = os.path.join(path, "meta.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"no token shards at {path!r} (missing meta.json); run "
                            f"`python -m train.prepare --out {path}`")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{meta_path}: unreadable ({type(e).__name__}: {e})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    raise DataError(f"{meta_path}: format {got!r}, expected {FORMAT!r}")
  for k in ("dtype", "vocab_size", "eos_id", "splits"):
    if k not in meta:
      raise DataError(f"{meta_path}: missing key {k!r}")
  # A hand-edited file: one line naming the key, not a TypeError deep in the pipeline.
  is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
  if meta["dtype"] not in ("uint16", "uint32"):
    raise DataError(f"{meta_path}: dtype {meta['dtype']!r}, expected 'uint16' or 'uint32'")
  if not is_int(meta["vocab_size"]) or meta["vocab_size"] < 1:
    raise DataError(f"{meta_path}: vocab_size {meta['vocab_size']!r} is not a positive integer")
  if not is_int(meta["eos_id"]) or not 0 <= meta["eos_id"] < meta["vocab_size"]:
    raise DataError(f"{meta_path}: eos_id {meta['eos_id']!r} is not an id below vocab_size")
  splits = meta["splits"]
  if not isinstance(splits, dict) or not all(
      isinstance(v, list) and all(isinstance(s, str) for s in v) for v in splits.values()):
    raise DataError(f"{meta_path}: splits must map split names to lists of shard names")
  sums = meta.get("checksums", {})
  if not isinstance(sums, dict) or not all(
      isinstance(c, dict) and is_int(c.get("bin")) and is_int(c.get("offsets"))
      for c in sums.values()):
    raise DataError(f"{meta_path}: checksums must map shard names to "
                    f"{{'bin': int, 'offsets': int}}")
  return meta


def shards_identity(meta: dict) -> str:
  """A short hash of what the token streams are made of (the splits' shards and their
  checksums, dtype, vocabulary, eos): equal for the same prepared data wherever it lies,
  different when the data is prepared again from other text. Checkpoints record it, so a
  resume never continues a stream position into other data."""
  keys = ("dtype", "vocab_size", "eos_id", "splits", "checksums")
  blob = json.dumps({k: meta.get(k) for k in keys}, sort_keys=True).encode()
  return f"{zlib.crc32(blob):08x}{zlib.adler32(blob):08x}"


class DocumentSource:
  """Random access to the documents of some shards: item i -> int32 token array.

  With max_len, a document longer than max_len + 1 tokens is served as consecutive pieces of
  at most max_len + 1 tokens overlapping by one (so every next-token pair appears exactly
  once); the shuffle then mixes pieces of long files instead of streaming one file through
  many consecutive batches.
  """

  def __init__(self, path: str, split: str = "train", max_len: int | None = None,
               verify: bool = True):
    meta = read_meta(path)
    if split not in meta["splits"] or not meta["splits"][split]:
      raise DataError(f"{path}: no shards for split {split!r} (have {list(meta['splits'])})")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    self.max_len = max_len
    self.tokens, self.offsets, starts = [], [], [0]
    self.doc_shard, self.doc_index, piece_counts = [], [], []
    for s, shard in enumerate(meta["splits"][split]):
      check_shard(path, shard, meta, verify)
      self.tokens.append(np.memmap(os.path.join(path, shard + ".bin"), dtype=dtype, mode="r"))
      off = np.load(os.path.join(path, shard + ".offsets.npy"), mmap_mode="r")
      self.offsets.append(off)
      starts.append(starts[-1] + len(off) - 1)
      if max_len is not None:
        lens = np.diff(np.asarray(off, np.int64))
        piece_counts.append(np.maximum(1, -(-(lens - 1) // max_len)))
    self.starts = np.asarray(starts, np.int64)
    if max_len is not None:
      self.piece_starts = np.concatenate([[0], np.cumsum(np.concatenate(piece_counts))])
    self.meta = meta

  def num_documents(self) -> int:
    return int(self.starts[-1])

  def __len__(self) -> int:
    if self.max_len is None:
      return self.num_documents()
    return int(self.piece_starts[-1])

  def _doc(self, i: int) -> tuple[np.ndarray, int, int]:
    s = int(np.searchsorted(self.starts, i, side="right") - 1)
    j = i - int(self.starts[s])
    off = self.offsets[s]
    return self.tokens[s], int(off[j]), int(off[j + 1])

  def __getitem__(self, i: int) -> np.ndarray:
    i = int(i)
    if self.max_len is None:
      toks, a, b = self._doc(i)
      return np.asarray(toks[a:b], np.int32)
    d = int(np.searchsorted(self.piece_starts, i, side="right") - 1)
    piece = i - int(self.piece_starts[d])
    toks, a, b = self._doc(d)
    lo = a + piece * self.max_len
    return np.asarray(toks[lo:min(lo + self.max_len + 1, b)], np.int32)

  @property
  def num_tokens(self) -> int:
    return int(sum(int(o[-1]) for o in self.offsets))


class _PackIterator(grain.DatasetIterator):
  """Concatenate-then-split packing of a MapDataset of token arrays into [B, T] batches.

  Each element of `parent` (a piece of >= 2 tokens) contributes its inputs piece[:-1] and
  targets piece[1:]; rows are filled back to back, a piece that does not fit is split and
  continues (same positions sequence, new segment id) in the next row. State = (index of the
  next parent element, tokens of it already used): two ints, so restoring is exact.
  """

  def __init__(self, parent: grain.MapDataset, seq_len: int, batch_size: int):
    super().__init__()
    self._src, self._t, self._b = parent, seq_len, batch_size
    self._index, self._offset = 0, 0

  def _row(self):
    t = self._t
    row = {k: np.zeros((t,), np.int32) for k in ("inputs", "targets", "segment_ids",
                                                  "positions")}
    fill, seg = 0, 0
    while fill < t:
      piece = self._src[self._index]
      n = len(piece) - 1
      take = min(n - self._offset, t - fill)
      a = self._offset
      seg += 1
      row["inputs"][fill:fill + take] = piece[a:a + take]
      row["targets"][fill:fill + take] = piece[a + 1:a + 1 + take]
      row["segment_ids"][fill:fill + take] = seg
      row["positions"][fill:fill + take] = np.arange(a, a + take)
      fill += take
      if a + take >= n:
        self._index, self._offset = self._index + 1, 0
      else:
        self._offset = a + take
    return row

  def __next__(self):
    rows = [self._row() for _ in range(self._b)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def get_state(self):
    return {"index": int(self._index), "offset": int(self._offset)}

  def set_state(self, state):
    self._index, self._offset = int(state["index"]), int(state["offset"])


class _PackDataset(grain.IterDataset):
  def __init__(self, parent: grain.MapDataset, seq_len: int, batch_size: int):
    super().__init__()
    self._map_parent, self._t, self._b = parent, seq_len, batch_size

  def __iter__(self):
    return _PackIterator(self._map_parent, self._t, self._b)


def make_dataset(path: str, *, split: str, seq_len: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True, prefetch: int = 2, process_index: int | None = None,
                 process_count: int | None = None, verify: bool = True) -> grain.IterDataset:
  """Packed batches {inputs, targets, segment_ids, positions}: int32 [batch_size, seq_len].

  batch_size is the PER-PROCESS batch size. verify: see `check_shard`.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  src = DocumentSource(path, split, max_len=seq_len, verify=verify)
  ds = grain.MapDataset.source(src)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None)
  if pc > 1:
    ds = ds[pi::pc]
  it = _PackDataset(ds, seq_len, batch_size)
  if prefetch > 0:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
  return it


def iterator_state(it) -> dict[str, Any]:
  """JSON-serialisable iterator state."""
  return json.loads(json.dumps(it.get_state(), default=_json_default))


def _json_default(x):
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, (bytes, bytearray)):
    return x.decode("latin-1")
  raise TypeError(f"cannot serialise {type(x)} in the data iterator state")
