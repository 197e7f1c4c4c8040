"""A deterministic text corpus from the Python installation: source files and docs of the
standard library and every installed package, filtered, deduplicated, in a fixed order.

    python -m train.corpus --out data/study_corpus                 # corpus.jsonl + manifest
    python -m train.corpus --out data/study_corpus --prepare data/study \
        --tokenizer configs/study/tokenizer.json                     # ... then token shards
    python -m train.corpus --out data/tok_corpus --max-mb 60 \
        --train-tokenizer configs/study/tokenizer.json --vocab-size 16384

Nothing is downloaded: the text is what the running interpreter has installed (a GPU image
with torch, transformers, scipy, ... holds a few hundred MB of Python source and docs).

Selection, in order (each step deterministic, so the same installation gives the same bytes):
  1. roots: the stdlib, purelib and platlib of the running interpreter (`sysconfig`), or
     --root LABEL=DIR; never sys.path, so wheels put on PYTHONPATH for one run stay out.
     A root nested in another (site-packages inside the stdlib) is walked once, as itself.
  2. files with an extension in --exts (default .py .pyi .md .rst .txt), outside
     __pycache__ / .git / node_modules / *.dist-info / *.egg-info.
  3. content filters: size within [min_bytes, max_bytes], strict UTF-8, no NUL byte, longest
     line <= max_line chars, at least a min_alpha fraction of ASCII letters, and no
     '@generated' / 'DO NOT EDIT' marker in the first 1 KB (generated tables and bindings
     are not text anyone wrote).
  4. exact deduplication on the text with '\\r\\n' -> '\\n' (vendored copies, license files):
     the first path in sorted order keeps it.
  5. order by sha1 of the text (content-defined, so a package added or removed does not
     reorder the rest), then cut at --max-mb.

Outputs in --out: corpus.jsonl ({"path", "text"} per document), manifest.tsv
(sha1, bytes, path per document, in corpus order) and corpus.json (the summary: documents,
bytes, a sha256 over the manifest that names this exact corpus, bytes per top-level package,
counts of skipped files by reason), written last, so a directory with corpus.json is complete.

--prepare tokenizes it with train.prepare (a given tokenizer; the study's is
configs/study/tokenizer.json, trained with --train-tokenizer on this machine's corpus). Byte-
level BPE of this kind of text costs ~1 CPU-second per MB (measured on a 2-core CPU: 1.1 MB
per CPU-second); train.prepare encodes batches of 256 documents on all cores.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor

DEFAULT_EXTS = (".py", ".pyi", ".md", ".rst", ".txt")
SKIP_DIRS = ("__pycache__", ".git", "node_modules")
SKIP_DIR_SUFFIXES = (".dist-info", ".egg-info")
GENERATED_MARKERS = ("@generated", "DO NOT EDIT", "do not edit")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """roots: (label, directory) pairs; paths in the manifest are label/relative-path."""
  roots: tuple[tuple[str, str], ...]
  exts: tuple[str, ...] = DEFAULT_EXTS
  min_bytes: int = 64
  max_bytes: int = 1_000_000
  max_line: int = 1000
  min_alpha: float = 0.25
  max_mb: float | None = None

  def __post_init__(self):
    if not self.roots:
      raise ValueError("corpus.roots: at least one root is needed")
    for label, path in self.roots:
      if not label or "/" in label:
        raise ValueError(f"corpus.roots: bad label {label!r} (non-empty, no '/')")
      if not os.path.isdir(path):
        raise ValueError(f"corpus.roots: {label}={path!r} is not a directory")
    if not self.exts or not all(e.startswith(".") for e in self.exts):
      raise ValueError(f"corpus.exts: must be extensions like '.py', got {self.exts!r}")
    if not 0 < self.min_bytes <= self.max_bytes:
      raise ValueError(f"corpus.min_bytes: need 0 < min_bytes <= max_bytes, got "
                       f"{self.min_bytes}, {self.max_bytes}")
    if self.max_line < 1:
      raise ValueError(f"corpus.max_line: must be >= 1, got {self.max_line}")
    if not 0 <= self.min_alpha <= 1:
      raise ValueError(f"corpus.min_alpha: must be in [0, 1], got {self.min_alpha}")
    if self.max_mb is not None and not self.max_mb > 0:
      raise ValueError(f"corpus.max_mb: must be > 0 or None, got {self.max_mb}")


def default_roots() -> tuple[tuple[str, str], ...]:
  """The running interpreter's stdlib and package directories (existing, distinct)."""
  paths = sysconfig.get_paths()
  out, seen = [], set()
  for label, key in (("stdlib", "stdlib"), ("site-packages", "purelib"),
                     ("site-packages", "platlib")):
    p = paths.get(key)
    if p and os.path.isdir(p) and os.path.realpath(p) not in seen:
      seen.add(os.path.realpath(p))
      out.append((label, p))
  return tuple(out)


def discover(cfg: CorpusConfig) -> list[tuple[str, str]]:
  """(manifest path, absolute path) of every candidate file, sorted by manifest path."""
  real_roots = {os.path.realpath(p) for _, p in cfg.roots}
  files = {}
  for label, root in cfg.roots:
    root_real = os.path.realpath(root)
    for d, dirs, names in os.walk(root):
      keep = []
      for x in sorted(dirs):
        full = os.path.realpath(os.path.join(d, x))
        if (x in SKIP_DIRS or x.endswith(SKIP_DIR_SUFFIXES)
            or (full in real_roots and full != root_real)):  # another root: walked as itself
          continue
        keep.append(x)
      dirs[:] = keep
      for n in names:
        if n.endswith(cfg.exts):
          full = os.path.join(d, n)
          rel = label + "/" + os.path.relpath(full, root).replace(os.sep, "/")
          files.setdefault(rel, full)
  return sorted(files.items())


def read_document(path: str, cfg: CorpusConfig) -> tuple[str | None, str]:
  """(normalised text, "ok") or (None, reason it was skipped)."""
  try:
    size = os.path.getsize(path)
    if size < cfg.min_bytes:
      return None, "too_small"
    if size > cfg.max_bytes:
      return None, "too_large"
    with open(path, "rb") as f:
      raw = f.read()
  except OSError:
    return None, "unreadable"
  if b"\0" in raw:
    return None, "binary"
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    return None, "not_utf8"
  head = text[:1024]
  if any(m in head for m in GENERATED_MARKERS):
    return None, "generated"
  text = text.replace("\r\n", "\n")
  if max(map(len, text.split("\n"))) > cfg.max_line:
    return None, "long_lines"
  if not text.strip():
    return None, "empty"
  letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS))  # C speed, unlike str.isalpha
  if letters < cfg.min_alpha * len(raw):
    return None, "low_alpha"
  return text, "ok"


_ASCII_LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))


def build(cfg: CorpusConfig, out: str, *, workers: int | None = None, log=print) -> dict:
  """Select, deduplicate and write the corpus into `out`; returns the corpus.json summary."""
  t0 = time.perf_counter()
  candidates = discover(cfg)
  workers = workers or min(32, os.cpu_count() or 1)
  with ThreadPoolExecutor(workers) as pool:  # reads and hashing release the GIL
    results = list(pool.map(lambda rp: read_document(rp[1], cfg), candidates, chunksize=64))
  skipped = collections.Counter()
  seen, docs = set(), []
  for (rel, _), (text, why) in zip(candidates, results):
    if text is None:
      skipped[why] += 1
      continue
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()
    if digest in seen:
      skipped["duplicate"] += 1
      continue
    seen.add(digest)
    docs.append((digest, rel, text))
  docs.sort()
  cap = None if cfg.max_mb is None else int(cfg.max_mb * 1e6)
  total, kept = 0, []
  for doc in docs:
    if cap is not None and total >= cap:
      skipped["over_max_mb"] += 1
      continue
    n = len(doc[2].encode("utf-8"))
    kept.append((doc, n))
    total += n
  if not kept:
    raise ValueError(f"corpus: no document passed the filters under {cfg.roots}")
  os.makedirs(out, exist_ok=True)
  summary_path = os.path.join(out, "corpus.json")
  if os.path.exists(summary_path):
    os.remove(summary_path)  # an old summary must never describe new files
  manifest = hashlib.sha256()
  packages = collections.Counter()
  with open(os.path.join(out, "corpus.jsonl"), "w", encoding="utf-8") as fj, \
       open(os.path.join(out, "manifest.tsv"), "w", encoding="utf-8") as fm:
    for (digest, rel, text), n in kept:
      fj.write(json.dumps({"path": rel, "text": text}, ensure_ascii=False) + "\n")
      line = f"{digest}\t{n}\t{rel}\n"
      fm.write(line)
      manifest.update(line.encode("utf-8"))
      packages[_package(rel)] += n
  summary = {
      "format": "parallax-corpus-v1",
      "sha256": manifest.hexdigest(),
      "documents": len(kept),
      "bytes": total,
      "candidates": len(candidates),
      "skipped": dict(sorted(skipped.items())),
      "roots": [list(r) for r in cfg.roots],
      "config": dataclasses.asdict(cfg),
      "python": sys.version.split()[0],
      "bytes_by_package": dict(packages.most_common()),
      "seconds": round(time.perf_counter() - t0, 2),
  }
  tmp = summary_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(tmp, summary_path)
  top = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in packages.most_common(8))
  log(f"corpus {out}: {len(kept)} documents, {total / 1e6:.1f} MB (sha256 "
      f"{summary['sha256'][:12]}) from {len(candidates)} files in {summary['seconds']} s; "
      f"skipped {dict(skipped)}; MB by package: {top}")
  return summary


def _package(rel: str) -> str:
  parts = rel.split("/")
  if parts[0] == "stdlib":
    return "stdlib"
  return parts[1].split(".")[0] if len(parts) > 2 else parts[0]


def read_summary(out: str) -> dict:
  path = os.path.join(out, "corpus.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no corpus at {out!r} (missing corpus.json); run "
                            f"`python -m train.corpus --out {out}`")
  with open(path) as f:
    return json.load(f)


def iter_texts(out: str):
  with open(os.path.join(out, "corpus.jsonl"), encoding="utf-8") as f:
    for line in f:
      yield json.loads(line)["text"]


def train_tokenizer(out: str, path: str, vocab_size: int) -> str:
  """Byte-level BPE of `vocab_size` over the corpus in `out`, saved to `path`."""
  from train.prepare import train_bpe
  tok = train_bpe(list(iter_texts(out)), vocab_size)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tok.save(path)
  return path


def prepare_shards(out: str, data_dir: str, tokenizer: str, *, val_fraction: float = 0.01,
                   log=print) -> dict:
  """Tokenize the corpus in `out` into train.data shards at `data_dir` (train.prepare, the
  one writer of the format) and record the corpus and tokenizer hashes in
  `data_dir/corpus.json`, written last. A complete `data_dir` made from the same corpus,
  tokenizer and split is kept as it is."""
  import numpy as np
  summary = read_summary(out)
  stamp = {"corpus_sha256": summary["sha256"], "tokenizer_sha256": _file_sha256(tokenizer),
           "val_fraction": val_fraction}
  stamp_path = os.path.join(data_dir, "corpus.json")
  if os.path.exists(os.path.join(data_dir, "meta.json")) and os.path.exists(stamp_path):
    with open(stamp_path) as f:
      old = json.load(f)
    if all(old.get(k) == v for k, v in stamp.items()):
      log(f"{data_dir}: already prepared from corpus {summary['sha256'][:12]}")
      return old
  for name in ("meta.json", "corpus.json"):  # a stale meta.json would mark it complete
    if os.path.exists(os.path.join(data_dir, name)):
      os.remove(os.path.join(data_dir, name))
  from train.prepare import prepare
  t0 = time.perf_counter()
  meta = prepare(data_dir, [os.path.join(out, "corpus.jsonl")], tokenizer=tokenizer,
                 val_fraction=val_fraction, quiet=True)
  seconds = time.perf_counter() - t0
  tokens = {s: sum(int(np.load(os.path.join(data_dir, n + ".offsets.npy"))[-1]) for n in names)
            for s, names in meta["splits"].items()}
  record = {**stamp, "documents": summary["documents"], "bytes": summary["bytes"],
            "tokens": tokens, "bytes_per_token": summary["bytes"] / max(1, sum(tokens.values())),
            "tokenize_seconds": round(seconds, 2), "cpus": os.cpu_count()}
  tmp = stamp_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, stamp_path)
  log(f"{data_dir}: tokens {tokens}, {record['bytes_per_token']:.2f} bytes/token, "
      f"tokenized in {seconds:.1f} s ({record['cpus']} cpus)")
  return record


def _file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _parse_root(text: str) -> tuple[str, str]:
  if "=" not in text:
    raise argparse.ArgumentTypeError(f"--root {text!r}: expected LABEL=DIR")
  label, path = text.split("=", 1)
  return label, path


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m train.corpus", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True, help="corpus directory (corpus.jsonl, manifest.tsv)")
  ap.add_argument("--root", action="append", type=_parse_root, default=None,
                  help="LABEL=DIR to walk (repeatable; default: this interpreter's stdlib, "
                       "purelib, platlib)")
  ap.add_argument("--exts", default=",".join(DEFAULT_EXTS), help="comma-separated extensions")
  ap.add_argument("--max-mb", type=float, default=None, help="keep at most this many MB")
  ap.add_argument("--max-bytes", type=int, default=CorpusConfig.max_bytes,
                  help="skip files larger than this")
  ap.add_argument("--prepare", default=None, metavar="DATA_DIR",
                  help="then tokenize into train.data shards here (needs --tokenizer)")
  ap.add_argument("--tokenizer", default=None, help="tokenizer.json for --prepare")
  ap.add_argument("--val-fraction", type=float, default=0.01)
  ap.add_argument("--train-tokenizer", default=None, metavar="PATH",
                  help="train a byte-level BPE on the corpus and save it here")
  ap.add_argument("--vocab-size", type=int, default=16384)
  a = ap.parse_args(argv)
  try:
    cfg = CorpusConfig(roots=tuple(a.root) if a.root else default_roots(),
                       exts=tuple(e.strip() for e in a.exts.split(",") if e.strip()),
                       max_bytes=a.max_bytes, max_mb=a.max_mb)
    if a.prepare and not a.tokenizer:
      raise ValueError("--prepare: needs --tokenizer (the study's is configs/study/tokenizer.json)")
    # checked before the corpus is built, which can take minutes
    if a.prepare and not 0 < a.val_fraction < 1:
      raise ValueError(f"--val-fraction {a.val_fraction}: must be in (0, 1)")
    if a.prepare and not os.path.isfile(a.tokenizer):
      raise ValueError(f"--tokenizer {a.tokenizer!r}: no such file")
    if a.train_tokenizer:
      from train.prepare import check_vocab_size
      check_vocab_size(a.vocab_size)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    build(cfg, a.out)
    if a.train_tokenizer:
      t0 = time.perf_counter()
      train_tokenizer(a.out, a.train_tokenizer, a.vocab_size)
      print(f"tokenizer {a.train_tokenizer}: vocab {a.vocab_size}, trained in "
            f"{time.perf_counter() - t0:.1f} s", flush=True)
    if a.prepare:
      prepare_shards(a.out, a.prepare, a.tokenizer, val_fraction=a.val_fraction)
  except (ValueError, OSError) as e:  # no filtered text, a bad --out, an unreadable file
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
