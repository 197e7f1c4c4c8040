"""Faults of data preparation: a prepare stopped half way or run again over a dataset in use,
bad arguments and inputs, tokenizers with gaps in their ids, a hand-edited meta.json.

Each either leaves a directory that reads as what it is (complete or not), or stops with one
line naming the flag, key or file, before anything on disk is touched.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from train import corpus, data as data_lib, prepare as prep


def _texts(path, n=30, word="alpha"):
  path.mkdir()
  for i in range(n):
    (path / f"d{i}.txt").write_text(f"{word} document {i}: def f(x): return x * {i}\n" * 3)
  return str(path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A small prepared dataset (BPE 300) and a second corpus of other text."""
  root = tmp_path_factory.mktemp("prep")
  docs = _texts(root / "docs")
  other = _texts(root / "other", word="omega zulu")
  out = str(root / "data")
  prep.prepare(out, [docs], vocab_size=300, val_fraction=0.2, quiet=True)
  return out, docs, other


def _copy(prepared, tmp_path):
  dst = str(tmp_path / "data")
  shutil.copytree(prepared[0], dst)
  return dst


def test_interrupted_prepare_over_a_dataset_leaves_it_incomplete(prepared, tmp_path,
                                                                  monkeypatch):
  """Ctrl-C while a dataset is prepared again: the old meta.json must not vouch for a
  directory whose tokenizer (and some shards) are already the new ones."""
  out = _copy(prepared, tmp_path)

  def interrupt(path):
    raise KeyboardInterrupt
  monkeypatch.setattr(prep, "crc32_file", interrupt)  # after the first new shard is written
  with pytest.raises(KeyboardInterrupt):
    prep.prepare(out, [prepared[2]], vocab_size=280, val_fraction=0.2, quiet=True)
  with pytest.raises(FileNotFoundError, match="missing meta.json"):
    data_lib.read_meta(out)


def test_prepare_again_keeps_the_bytes_of_open_shards(prepared, tmp_path):
  """A run still reading the shards (memory maps) keeps its data when they are replaced,
  instead of reading the new text (or faulting on a shorter file) mid-run."""
  out = _copy(prepared, tmp_path)
  src = data_lib.DocumentSource(out, "train")
  before = [src[i].tolist() for i in range(len(src))]
  prep.prepare(out, [prepared[2]], vocab_size=280, val_fraction=0.2, quiet=True)
  assert [src[i].tolist() for i in range(len(src))] == before
  assert data_lib.read_meta(out)["vocab_size"] == 280


def test_tokenizer_with_ids_past_its_count_gets_a_wide_enough_dtype(prepared, tmp_path):
  """A tokenizer whose ids skip some (9 entries, one of id 70000): its vocabulary is the
  largest id + 1, so the shards are uint32 and hold the ids as encoded, not wrapped."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {w: i for i, w in enumerate(["alpha", "document", "def", "f(x):", "return", "x"])}
  vocab["[UNK]"] = 70_000
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.save(str(tmp_path / "tok.json"))
  out = str(tmp_path / "data")
  meta = prep.prepare(out, [prepared[1]], tokenizer=str(tmp_path / "tok.json"),
                      val_fraction=0.2, quiet=True)
  assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001
  src = data_lib.DocumentSource(out, "train")  # verify: every id below vocab_size
  assert 70_000 in src[0].tolist()


@pytest.mark.parametrize("args, message", [
    (["--vocab-size", "-5"], "--vocab-size -5: "),
    (["--vocab-size", "100000000000"], "--vocab-size 100000000000: "),  # was a Rust OOM abort
    (["--vocab-size", "10"], "--vocab-size 10: "),  # was a silent vocabulary of 257
    (["--tokenizer", "{tmp}/missing.json"], "--tokenizer '{tmp}/missing.json': "),
    (["--tokenizer", "{tmp}/bad.json"], "--tokenizer '{tmp}/bad.json': "),
    (["--val-fraction", "0"], "--val-fraction 0.0: "),
    (["--val-fraction", "1"], "--val-fraction 1.0: "),
    (["--shard-tokens", "0"], "--shard-tokens 0: "),
    (["--max-mb", "0"], "--max-mb 0.0: "),
    (["--input", "{tmp}/bad.jsonl"], "{tmp}/bad.jsonl:2: field 'text' is NoneType"),
    (["--input", "{tmp}/one.txt"], "1 document(s) in "),
])
def test_bad_arguments_are_one_line_and_leave_the_dataset(prepared, tmp_path, capsys, args,
                                                          message):
  """Refused before the output directory is touched (not after minutes of tokenizing, not
  with a traceback): the dataset there stays complete."""
  out = _copy(prepared, tmp_path)
  (tmp_path / "bad.json").write_text("not json")
  (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
  (tmp_path / "one.txt").write_text("a single document\n")
  args = [a.format(tmp=tmp_path) for a in args]
  if "--input" not in args:
    args += ["--input", prepared[1]]
  before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
  capsys.readouterr()
  assert prep.main(["--out", out, *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: " + message.format(tmp=tmp_path)), err
  assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before


def test_out_that_is_a_file_and_an_empty_input_list(prepared, tmp_path, capsys):
  """--out naming a file says so; `--input` with no paths (an empty shell glob) is an
  error, not a silent fall-back to the stdlib corpus."""
  f = tmp_path / "a_file"
  f.write_text("")
  assert prep.main(["--out", str(f), "--input", prepared[1]]) == 2
  assert capsys.readouterr().err.strip() == f"error: --out {str(f)!r} is a file, not a directory"
  with pytest.raises(SystemExit):
    prep.main(["--out", str(tmp_path / "x"), "--input"])
  assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("patch, message", [
    ({"dtype": "int8"}, "dtype 'int8', expected"),
    ({"vocab_size": "300"}, "vocab_size '300' is not a positive integer"),
    ({"eos_id": 300}, "eos_id 300 is not an id below vocab_size"),
    ({"splits": {"train": "train-00000"}}, "splits must map split names to lists"),
    ({"checksums": []}, "checksums must map shard names"),
])
def test_hand_edited_meta_is_one_data_error(prepared, tmp_path, patch, message):
  """A DataError naming meta.json and the key, not a TypeError from inside the pipeline."""
  out = _copy(prepared, tmp_path)
  path = os.path.join(out, "meta.json")
  meta = json.load(open(path))
  json.dump({**meta, **patch}, open(path, "w"))
  with pytest.raises(data_lib.DataError, match=f"meta.json: {message}"):
    data_lib.DocumentSource(out, "train")


def test_corpus_cli_errors_are_one_line(tmp_path, capsys):
  """train.corpus: a root with no usable text, or a missing tokenizer for --prepare, is one
  line (the latter before the corpus is built)."""
  (tmp_path / "empty").mkdir()
  assert corpus.main(["--out", str(tmp_path / "c"), "--root", f"e={tmp_path / 'empty'}"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: corpus: no document passed"), err
  assert corpus.main(["--out", str(tmp_path / "c2"), "--root", f"e={tmp_path / 'empty'}",
                      "--prepare", str(tmp_path / "d"), "--tokenizer", "missing.json"]) == 2
  assert capsys.readouterr().err.strip() == "error: --tokenizer 'missing.json': no such file"
  assert not os.path.exists(tmp_path / "c2")


def test_vocab_size_above_uint16_prepares_uint32_shards(tmp_path):
  """Sanity of the wide path: ids as encoded, read back through the pipeline."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = [f"w{i}" for i in range(70_000)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.save(str(tmp_path / "tok.json"))
  docs = tmp_path / "docs.jsonl"
  docs.write_text("\n".join(json.dumps({"text": f"w{i} w{69_999 - i} w65536"})
                            for i in range(20)))
  meta = prep.prepare(str(tmp_path / "d"), [str(docs)], tokenizer=str(tmp_path / "tok.json"),
                      val_fraction=0.2, quiet=True)
  assert meta["dtype"] == "uint32" and meta["eos_id"] == 70_000
  src = data_lib.DocumentSource(str(tmp_path / "d"), "train")
  assert all(t[-1] == 70_000 and 65_536 in t.tolist() for t in (src[i] for i in range(len(src))))
  assert np.asarray(src[0]).dtype == np.int32


def test_a_prepared_dataset_under_the_input_is_not_read_as_text(tmp_path):
  """--out inside --input (a rerun over the same tree): its meta.json and tokenizer.json are
  .json files, which were tokenized as documents of the next dataset."""
  docs = _texts(tmp_path / "docs")
  out = os.path.join(docs, "data")
  first = prep.prepare(out, [docs], vocab_size=300, val_fraction=0.2, quiet=True)
  again = prep.prepare(out, [docs], vocab_size=300, val_fraction=0.2, quiet=True)
  assert again["num_documents"] == first["num_documents"] == 30
