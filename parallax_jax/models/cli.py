"""Sample from a checkpoint.

    parallax-sample --checkpoint runs/tiny --prompt "def " --max-new-tokens 48
    parallax-sample --checkpoint runs/tiny/checkpoints/300 --prompt-ids 1,2,3 --temperature 0.7
    parallax-sample --hf path/to/Qwen3-0.6B --prompt "Hello" --temperature 0.7
    parallax-sample --preset tiny --prompt-ids 1,2,3 --prompt-ids 4,5

(`python -m parallax_jax.models.cli` is the same command.) Sources: --checkpoint (a training
run directory: its newest step, or --step; one step `<run>/checkpoints/<step>`; or a
`save_checkpoint` directory: see `parallax_jax.models.checkpoint`), --hf (a Hugging Face
Qwen3 directory; W_R added at zero), or --preset (random init, for smoke tests). Prompts:
--prompt-ids (comma-separated ids; repeat for a batch of different lengths) or --prompt
(text; needs the `tokenizers` package and a tokenizer.json: a run's data directory, the one
beside the checkpoint, or --tokenizer). A training run's eos id (its data's meta.json), or a
Hugging Face directory's eos_token_id, stops a sequence unless --eos-id says otherwise.

Output, one sequence per prompt, numbered from 0 in the order given (--prompt-ids first, then
--prompt):
  with a tokenizer   a header line `--- sample <i> (prompt: <text repr or ids>) ---`, then the
                     prompt's text followed by the generated text (as many lines as they take);
  without one        one line per sequence: the generated ids, space-separated;
  --json             one JSON object per line: "prompt_ids", "new_ids", and with a tokenizer
                     "text" (the generated text only).
Notes (the checkpoint loaded, what --attention leaves out) go to stderr before the samples.
Bad arguments, files, prompts or settings exit with status 2 and one line on stderr,
`parallax-sample: error: <message>` (no usage block, no notes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from parallax_jax._parser import Parser, prog_name


def _seed(text: str) -> int:
  """An argparse type: a seed JAX's PRNG keys take (an unsigned 32-bit int)."""
  n = int(text)
  if not 0 <= n < 2**32:
    raise argparse.ArgumentTypeError(f"must be in [0, 2^32), got {text}")
  return n


def _tokenizer(path):
  if path is None or not os.path.exists(path):
    return None
  try:
    from tokenizers import Tokenizer
  except ImportError:
    return None
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises its own Exception type
    raise ValueError(f"cannot read the tokenizer {path}: {e}") from None


def _header(i: int, prompt) -> str:
  """The line before sample `i`: its prompt, the text's repr or the ids, cut short."""
  if isinstance(prompt, str):
    shown = repr(prompt) if len(prompt) <= 40 else repr(prompt[:37]) + "..."
  else:
    shown = (f"{len(prompt)} ids " if len(prompt) > 8 else "ids ") + ",".join(
        map(str, prompt[:8])) + (",..." if len(prompt) > 8 else "")
  return f"--- sample {i} (prompt: {shown}) ---"


def with_attention(config, name: str):
  """`config` with attention member `name`; the probe's norm and the gate go when the new
  member has no learned probe / no correction to gate (as in `presets.softmax_control`)."""
  new = config.replace(attention=name, probe=None, affine=None, r_norm=False, r_scale=1.0,
                       correction_gate=False)
  if new.has_probe_params:
    new = new.replace(r_norm=config.r_norm, r_scale=config.r_scale)
  if (config.correction_gate and new.resolved_affine in ("affine", "boundary")
      and new.resolved_probe != "none"):
    new = new.replace(correction_gate=True)
  return new


class _Help(argparse.ArgumentDefaultsHelpFormatter):
  """Shows '(default: X)' where there is a default that the help does not already explain."""

  def _get_help_string(self, action):
    d = action.default
    if d is None or d is False or d == [] or "default" in (action.help or ""):
      return action.help
    return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
  ap = Parser(prog=prog_name("parallax-sample", "parallax_jax.models.cli", __file__),
              description=__doc__.splitlines()[0], formatter_class=_Help)
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="training run directory, one step's directory "
                   "(<run>/checkpoints/<step>), or a save_checkpoint directory")
  src.add_argument("--hf", help="Hugging Face Qwen3 directory (config.json + safetensors)")
  src.add_argument("--preset", help="random-init preset name (smoke tests)")
  ap.add_argument("--step", type=int, help="step of a run directory (default: the newest)")
  ap.add_argument("--prompt-ids", action="append", default=[],
                  help="comma-separated token ids; repeat for a batch")
  ap.add_argument("--prompt", action="append", default=[], help="prompt text (needs tokenizers)")
  ap.add_argument("--tokenizer", help="tokenizer.json (default: the run's data directory, or "
                  "beside the checkpoint)")
  ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
  ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
  ap.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: all)")
  ap.add_argument("--eos-id", type=int, default=None,
                  help="stop a sequence at this id (default: a training run's eos id, or a "
                  "Hugging Face directory's eos_token_id; -1: never stop)")
  ap.add_argument("--pad-id", type=int, default=0, help="id printed after a sequence's eos")
  ap.add_argument("--seed", type=_seed, default=0, help="sampling (and --preset / W_R init) seed")
  ap.add_argument("--attention", help="override the attention member (e.g. softmax); "
                  "softmax on a Parallax checkpoint drops W_R, with a note")
  ap.add_argument("--dtype", help="override the compute dtype (e.g. float32)")
  ap.add_argument("--implementation", help="override the attention implementation")
  ap.add_argument("--json", action="store_true", help="print JSON lines")
  return ap


def _load(args, overrides, note):
  """(config, params, tokenizer path, eos id) of the chosen source."""
  from parallax_jax.models import checkpoint, hf, presets, qwen3
  if args.step is not None and not args.checkpoint:
    raise ValueError("--step applies to --checkpoint only")
  if args.checkpoint:
    src = checkpoint.find_checkpoint(args.checkpoint, args.step)
    config = src.config
    if args.attention and args.attention != config.attention:
      config = with_attention(config, args.attention)
    config = config.replace(**{k: v for k, v in overrides.items() if k != "attention"})
    def names(cfg):  # parameter paths inside a layer (one entry for all layers)
      return {"/".join(k[1:] if k[0].startswith("layers") else k)
              for k in checkpoint.param_paths(qwen3.abstract_params(cfg))}

    dropped = sorted(names(src.config) - names(config))
    if dropped:
      wr = " (W_R)" if any("r_proj" in d for d in dropped) else ""
      note(f"note: --attention {args.attention} leaves out {', '.join(dropped)} of this "
           f"{src.config.attention} checkpoint{wr}: the samples are from what remains, not "
           "from the trained model")
    def fresh(missing):  # e.g. W_R of a Parallax model from a softmax run: r_init (zeros)
      note(f"note: --attention {args.attention} adds "
           f"{', '.join(sorted(names(config) - names(src.config)))}, not in this "
           f"{src.config.attention} checkpoint, at its initialisation (r_init="
           f"{config.r_init!r})")
      return qwen3.init_params(config, jax.random.key(args.seed))
    config, params = checkpoint.load_checkpoint(args.checkpoint, config, drop_unused=True,
                                                source=src, fill_missing=fresh)
    data = checkpoint.checkpoint_data(src)
    where = f"{src.path}" + (f" (step {src.step})" if src.step is not None else "")
    note(f"loaded {where}")
    return config, params, args.tokenizer or data["tokenizer"], data["eos_id"]
  if args.hf:
    config, params = hf.load_hf_checkpoint(args.hf, seed=args.seed, **overrides)
    # softmax, or a learned probe with W_R = 0, at Qwen3's scale is the checkpoint's function
    same = (np.isclose(config.resolved_bandwidth, config.resolved_head_dim ** 0.5) and (
        config.resolved_affine == "constant" or config.resolved_probe == "learned"))
    if not same:
      note(f"note: --attention {args.attention} is not this softmax Qwen3's attention: the "
           "samples are from its weights under another function, not from the model")
    note(f"loaded {args.hf}")
    return (config, params, args.tokenizer or os.path.join(args.hf, "tokenizer.json"),
            hf.read_hf_eos_ids(args.hf))
  config = presets.get_preset(args.preset, **overrides)
  return config, qwen3.init_params(config, jax.random.key(args.seed)), args.tokenizer, None


def main(argv=None) -> int:
  ap = _parser()
  args = ap.parse_args(argv)
  from parallax_jax.models.generate import generate
  notes = []  # printed once the samples are made: a refused input prints its error line only
  overrides = {k: v for k, v in (("attention", args.attention), ("dtype", args.dtype),
                                 ("implementation", args.implementation)) if v is not None}
  try:
    config, params, tok_path, eos_id = _load(args, overrides, notes.append)
  except (ValueError, OSError) as e:
    ap.error(str(e))
  eos_id = eos_id if args.eos_id is None else (None if args.eos_id < 0 else args.eos_id)

  try:
    tokenizer = _tokenizer(tok_path)
  except ValueError as e:
    ap.error(str(e))
  prompts = []
  for p in args.prompt_ids:
    try:
      prompts.append([int(t) for t in p.split(",") if t.strip()])
    except ValueError:
      ap.error(f"--prompt-ids: expected comma-separated integers, got {p!r}")
  given = prompts + list(args.prompt)  # as the user gave them, for the text output
  if args.prompt:
    if tokenizer is None:
      ap.error("--prompt needs the `tokenizers` package and a tokenizer.json (--tokenizer); "
               + (f"none at {tok_path}" if tok_path else "this source names none"))
    prompts += [tokenizer.encode(p).ids for p in args.prompt]
  if not prompts or any(not p for p in prompts):
    ap.error("give at least one non-empty --prompt-ids or --prompt")
  lengths = np.array([len(p) for p in prompts], np.int32)
  batch = np.zeros((len(prompts), lengths.max()), np.int32)  # padding: any valid id
  for i, p in enumerate(prompts):
    batch[i, :len(p)] = p
  for i, p in enumerate(prompts):
    if max(p) >= config.vocab_size or min(p) < 0:
      ap.error(f"prompt {i}: ids must be in [0, {config.vocab_size}), got {p}")
  try:
    out = generate(config, params, batch, lengths, max_new_tokens=args.max_new_tokens,
                   rng=jax.random.key(args.seed), temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, eos_id=eos_id, pad_id=args.pad_id)
  except ValueError as e:  # bad settings are refused before anything is compiled
    ap.error(str(e))
  for n in notes:
    print(n, file=sys.stderr, flush=True)
  tokens, counts = np.asarray(out.tokens), np.asarray(out.lengths)
  for i, p in enumerate(prompts):
    new = tokens[i, :counts[i]].tolist()
    rec = {"prompt_ids": p, "new_ids": new}
    if tokenizer is not None:
      rec["text"] = tokenizer.decode(new)
    if args.json:
      print(json.dumps(rec))
    elif tokenizer is None:
      print(" ".join(map(str, new)))
    else:
      text = given[i] if isinstance(given[i], str) else tokenizer.decode(p)
      print(_header(i, given[i]))
      print(text + rec["text"])
  sys.stdout.flush()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
