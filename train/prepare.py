"""Tokenize text into the shard format of train/data.py.

    python -m train.prepare --out data/stdlib                       # default corpus, new BPE
    python -m train.prepare --out data/mine --input a.txt b.jsonl --tokenizer tokenizer.json
    python -m train.prepare --out data/mine --input docs/ --vocab-size 8192 --jsonl-key text

Inputs: .txt / .md / .py / any text file is one document; .jsonl has one document per line
(field --jsonl-key, default 'text'); directories are walked for such files. With no --input
the default corpus is the Python standard library's own .py sources
(`sysconfig.get_paths()['stdlib']`), present on every machine, so nothing is downloaded.
Without --tokenizer a byte-level BPE of --vocab-size is trained with the `tokenizers`
library on the (train part of the) corpus. Every document gets an end-of-text token
appended. Documents are assigned to the 'val' split deterministically (a hash of their
index, --val-fraction), the rest to 'train'; shards hold at most --shard-tokens tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import zlib
from typing import Iterator

import numpy as np

from train.data import FORMAT, crc32_file

EOS = "<|endoftext|>"
TEXT_EXTS = (".py", ".txt", ".md", ".rst", ".json", ".jsonl")


def _walk(paths: list[str]) -> list[str]:
  files = []
  for p in paths:
    if os.path.isdir(p):
      for root, dirs, names in os.walk(p):
        if {"meta.json", "tokenizer.json"} <= set(names):
          dirs[:] = []  # a prepared dataset (--out's own on a rerun): its JSON is not text
          continue
        dirs.sort()
        dirs[:] = [d for d in dirs if d not in ("__pycache__", "test", "tests", "idlelib",
                                                "site-packages")]
        files.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(TEXT_EXTS))
    elif os.path.exists(p):
      files.append(p)
    else:
      raise FileNotFoundError(f"--input {p!r} does not exist")
  return files


def iter_documents(paths: list[str], jsonl_key: str = "text",
                   max_bytes: int | None = None) -> Iterator[str]:
  total = 0
  for f in _walk(paths):
    if f.endswith(".jsonl"):
      docs = []
      with open(f, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
          if not line.strip():
            continue
          try:
            d = json.loads(line)[jsonl_key]
          except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{f}:{n}: not a JSON object with a {jsonl_key!r} field "
                             f"({type(e).__name__}: {e})") from None
          if not isinstance(d, str):
            raise ValueError(f"{f}:{n}: field {jsonl_key!r} is {type(d).__name__}, not a "
                             f"string")
          docs.append(d)
    else:
      with open(f, encoding="utf-8", errors="replace") as fh:
        docs = [fh.read()]
    for d in docs:
      if not d.strip():
        continue
      total += len(d)
      yield d
      if max_bytes is not None and total >= max_bytes:
        return


def default_corpus() -> list[str]:
  return [sysconfig.get_paths()["stdlib"]]


# A byte-level BPE holds the 256 bytes and the end-of-text token; the trainer reserves
# memory for the whole vocabulary up front (~45 bytes an entry: 2**24 takes ~0.8 GB).
MIN_VOCAB, MAX_VOCAB = 257, 1 << 24


def check_vocab_size(vocab_size) -> None:
  if (isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer))
      or not MIN_VOCAB <= vocab_size <= MAX_VOCAB):
    raise ValueError(f"--vocab-size {vocab_size!r}: a byte-level BPE needs an integer from "
                     f"{MIN_VOCAB} (256 bytes + end-of-text) to {MAX_VOCAB}")


def train_bpe(docs: list[str], vocab_size: int):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  check_vocab_size(vocab_size)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(docs, trainer=trainer)
  return tok


# Documents per tokenizer call, by size: the tokenizer encodes a call's documents in
# parallel, so a call of a fixed number of documents waits for its longest one; ~8 MB
# calls keep the cores busy and the ids held in Python lists small.
BATCH_BYTES = 8_000_000


def _byte_batches(docs: list[str], max_bytes: int):
  """(start, stop) ranges of docs of about max_bytes characters each (at least one doc)."""
  start, size = 0, 0
  for i, d in enumerate(docs):
    size += len(d)
    if size >= max_bytes:
      yield start, i + 1
      start, size = i + 1, 0
  if start < len(docs):
    yield start, len(docs)


def _is_val(i: int, fraction: float) -> bool:
  return (zlib.crc32(str(i).encode()) % 10_000) < fraction * 10_000


def _write_atomic(path: str, write) -> None:
  """write(file) into a temporary file, then rename it over `path`: a reader never sees a
  half-written file, and one still holding the old file (a memory map) keeps its bytes."""
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def load_tokenizer(path: str):
  from tokenizers import Tokenizer
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for any bad file
    raise ValueError(f"--tokenizer {path!r}: not a readable tokenizer.json ({e})") from None


def prepare(out: str, inputs: list[str] | None = None, *, tokenizer: str | None = None,
            vocab_size: int = 1024, val_fraction: float = 0.02, shard_tokens: int = 50_000_000,
            jsonl_key: str = "text", max_mb: float | None = None, quiet: bool = False) -> dict:
  """Write shards + meta.json into `out`; returns the meta dict.

  Everything that can be refused (arguments, inputs, tokenizer) is checked before `out` is
  touched; an existing meta.json there is removed before any file is replaced, so a run
  stopped half way never leaves a directory that reads as complete."""
  # Bad arguments fail here, not after minutes of tokenizing.
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out {out!r} is a file, not a directory")
  if not 0 < val_fraction < 1:  # NaN too
    raise ValueError(f"--val-fraction {val_fraction}: must be in (0, 1): training needs both "
                     f"a train and a validation split")
  if shard_tokens < 1:
    raise ValueError(f"--shard-tokens {shard_tokens}: must be >= 1")
  if max_mb is not None and not max_mb > 0:
    raise ValueError(f"--max-mb {max_mb}: must be > 0")
  if tokenizer:
    tok = load_tokenizer(tokenizer)
  else:
    check_vocab_size(vocab_size)
  inputs = inputs or default_corpus()
  max_bytes = None if max_mb is None else int(max_mb * 1e6)
  docs = list(iter_documents(inputs, jsonl_key, max_bytes))
  if not docs:
    raise ValueError(f"no documents found in {inputs}")
  val = {i for i in range(len(docs)) if _is_val(i, val_fraction)}
  if not val and len(docs) >= 2:
    val = {len(docs) - 1}  # a small corpus still gets a held-out document
  if not val or len(val) == len(docs):
    raise ValueError(f"{len(docs)} document(s) in {inputs} leave no "
                     f"{'validation' if not val else 'training'} split; add input or change "
                     f"--val-fraction")
  if not tokenizer:
    tok = train_bpe([d for i, d in enumerate(docs) if i not in val], vocab_size)
  if tok.token_to_id(EOS) is None:
    tok.add_special_tokens([EOS])
  eos_id = tok.token_to_id(EOS)
  # Ids need not be contiguous (a tokenizer file may skip some): the vocabulary, and so the
  # shard dtype, must cover the largest id, not just count them.
  vocab = max(tok.get_vocab_size(), max(tok.get_vocab(with_added_tokens=True).values()) + 1)
  dtype = np.uint16 if vocab <= 65535 else np.uint32
  os.makedirs(out, exist_ok=True)
  meta_path = os.path.join(out, "meta.json")
  if os.path.exists(meta_path):
    os.remove(meta_path)  # the old data stops reading as complete before any of it changes
  _write_atomic(os.path.join(out, "tokenizer.json"),
                lambda f: f.write(tok.to_str(pretty=True).encode("utf-8")))
  splits: dict[str, list[str]] = {"train": [], "val": []}
  buffers: dict[str, list[np.ndarray]] = {"train": [], "val": []}
  counts = {"train": 0, "val": 0}
  totals = {"train": 0, "val": 0}
  checksums: dict[str, dict[str, int]] = {}

  def flush(split):
    if not buffers[split]:
      return
    name = f"{split}-{len(splits[split]):05d}"
    arrs = buffers[split]
    offsets = np.zeros(len(arrs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrs])
    ids = np.concatenate(arrs).astype(np.dtype(dtype).newbyteorder("<"))
    _write_atomic(os.path.join(out, name + ".bin"), ids.tofile)
    _write_atomic(os.path.join(out, name + ".offsets.npy"), lambda f: np.save(f, offsets))
    checksums[name] = {"bin": crc32_file(os.path.join(out, name + ".bin")),
                       "offsets": crc32_file(os.path.join(out, name + ".offsets.npy"))}
    splits[split].append(name)
    buffers[split], counts[split] = [], 0

  for start, stop in _byte_batches(docs, BATCH_BYTES):
    # ids only (no offsets): about half the time of encode_batch
    encs = tok.encode_batch_fast(docs[start:stop])
    for k, enc in enumerate(encs, start):
      ids = np.append(np.asarray(enc.ids, np.int64), eos_id)
      if len(ids) < 2:
        continue
      split = "val" if k in val else "train"
      buffers[split].append(ids)
      counts[split] += len(ids)
      totals[split] += len(ids)
      if counts[split] >= shard_tokens:
        flush(split)
  flush("train")
  flush("val")
  if not splits["val"] or not splits["train"]:
    raise ValueError(f"{len(docs)} document(s) in {inputs} leave no "
                     f"{'validation' if not splits['val'] else 'training'} split; add input "
                     f"or change --val-fraction")
  meta = {"format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": vocab,
          "eos_id": int(eos_id), "tokenizer": "tokenizer.json", "splits": splits,
          "checksums": checksums, "num_documents": len(docs), "inputs": inputs}
  # meta.json last: a complete dataset
  _write_atomic(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
  if not quiet:
    print(f"prepared {out}: {len(docs)} documents, vocab {vocab}, tokens {totals}", flush=True)
    # Documents, not tokens, are split: a corpus of a few large documents can hold out far
    # more (or less) than val_fraction of its tokens.
    share = totals["val"] / max(sum(totals.values()), 1)
    if val_fraction > 0 and share > max(3 * val_fraction, val_fraction + 0.1):
      print(f"warning: --val-fraction {val_fraction}: the validation split holds {share:.0%} "
            f"of the tokens ({len(val)} of {len(docs)} documents; the split is by document): "
            f"add documents or lower --val-fraction", file=sys.stderr, flush=True)
  return meta


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m train.prepare", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--input", nargs="+", default=None,
                  help="text/JSONL files or directories (default: Python stdlib sources); "
                  "directories holding a prepared dataset are skipped")
  ap.add_argument("--tokenizer", default=None, help="tokenizer.json to use (default: train BPE)")
  ap.add_argument("--vocab-size", type=int, default=1024, help="BPE vocab size (default 1024)")
  ap.add_argument("--val-fraction", type=float, default=0.02, help="held-out fraction (0.02)")
  ap.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard")
  ap.add_argument("--jsonl-key", default="text", help="JSONL text field (default 'text')")
  ap.add_argument("--max-mb", type=float, default=None, help="stop after this many MB of text")
  a = ap.parse_args(argv)
  try:
    prepare(a.out, a.input, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
            val_fraction=a.val_fraction, shard_tokens=a.shard_tokens, jsonl_key=a.jsonl_key,
            max_mb=a.max_mb)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
