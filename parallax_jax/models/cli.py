"""Sample from a checkpoint.

    python -m parallax_jax.models.cli --checkpoint runs/ckpt --prompt-ids 1,2,3 --max-new-tokens 16
    python -m parallax_jax.models.cli --hf path/to/Qwen3-0.6B --prompt "Hello" --temperature 0.7
    python -m parallax_jax.models.cli --preset tiny --prompt-ids 1,2,3 --prompt-ids 4,5

Sources: --checkpoint (this package's `save_checkpoint` layout: model_config.json + orbax
params), --hf (a Hugging Face Qwen3 directory; W_R added at zero), or --preset (random init,
for smoke tests). Prompts: --prompt-ids (comma-separated ids; repeat for a batch of different
lengths) or --prompt (text; needs the `tokenizers` package and a tokenizer.json beside the
checkpoint or given with --tokenizer). Prints one line per sequence (JSON with --json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np


def _tokenizer(path):
  if path is None or not os.path.exists(path):
    return None
  try:
    from tokenizers import Tokenizer
  except ImportError:
    return None
  return Tokenizer.from_file(path)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="parallax_jax.models.cli", description=__doc__.splitlines()[0])
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="directory written by save_checkpoint")
  src.add_argument("--hf", help="Hugging Face Qwen3 directory (config.json + safetensors)")
  src.add_argument("--preset", help="random-init preset name (smoke tests)")
  ap.add_argument("--prompt-ids", action="append", default=[],
                  help="comma-separated token ids; repeat for a batch")
  ap.add_argument("--prompt", action="append", default=[], help="prompt text (needs tokenizers)")
  ap.add_argument("--tokenizer", help="tokenizer.json (default: beside the checkpoint)")
  ap.add_argument("--max-new-tokens", type=int, default=32)
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--top-k", type=int, default=0)
  ap.add_argument("--eos-id", type=int, default=None)
  ap.add_argument("--pad-id", type=int, default=0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--attention", help="override the attention member (e.g. parallax, softmax)")
  ap.add_argument("--dtype", help="override the compute dtype (e.g. float32)")
  ap.add_argument("--implementation", help="override the attention implementation")
  ap.add_argument("--json", action="store_true", help="print JSON lines")
  args = ap.parse_args(argv)

  from parallax_jax.models import hf, presets, qwen3
  from parallax_jax.models.generate import generate
  overrides = {k: v for k, v in (("attention", args.attention), ("dtype", args.dtype),
                                 ("implementation", args.implementation)) if v is not None}
  if args.checkpoint:
    config = qwen3.load_config(args.checkpoint)
    config, params = qwen3.load_checkpoint(args.checkpoint, config.replace(**overrides))
    tok_path = args.tokenizer or os.path.join(args.checkpoint, "tokenizer.json")
  elif args.hf:
    config, params = hf.load_hf_checkpoint(args.hf, seed=args.seed, **overrides)
    tok_path = args.tokenizer or os.path.join(args.hf, "tokenizer.json")
  else:
    config = presets.get_preset(args.preset, **overrides)
    params = qwen3.init_params(config, jax.random.key(args.seed))
    tok_path = args.tokenizer

  tokenizer = _tokenizer(tok_path)
  prompts = [[int(t) for t in p.split(",") if t.strip()] for p in args.prompt_ids]
  if args.prompt:
    if tokenizer is None:
      ap.error("--prompt needs the `tokenizers` package and a tokenizer.json (--tokenizer)")
    prompts += [tokenizer.encode(p).ids for p in args.prompt]
  if not prompts or any(not p for p in prompts):
    ap.error("give at least one non-empty --prompt-ids or --prompt")
  for p in prompts:
    if max(p) >= config.vocab_size or min(p) < 0:
      ap.error(f"prompt ids must be in [0, {config.vocab_size}), got {p}")
  lengths = np.array([len(p) for p in prompts], np.int32)
  batch = np.full((len(prompts), lengths.max()), args.pad_id, np.int32)
  for i, p in enumerate(prompts):
    batch[i, :len(p)] = p

  out = generate(config, params, batch, lengths, max_new_tokens=args.max_new_tokens,
                 rng=jax.random.key(args.seed), temperature=args.temperature, top_p=args.top_p,
                 top_k=args.top_k, eos_id=args.eos_id, pad_id=args.pad_id)
  tokens, counts = np.asarray(out.tokens), np.asarray(out.lengths)
  for i, p in enumerate(prompts):
    new = tokens[i, :counts[i]].tolist()
    rec = {"prompt_ids": p, "new_ids": new}
    if tokenizer is not None:
      rec["text"] = tokenizer.decode(new)
    print(json.dumps(rec) if args.json else
          (rec.get("text") if "text" in rec else " ".join(map(str, new))))
  sys.stdout.flush()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
