"""Export a checkpoint for evaluation and serving in torch.

    parallax-export --checkpoint runs/tiny_rnorm --format fla --out export/tiny_rnorm
    parallax-export --checkpoint runs/tiny_softmax/checkpoints/300 --format hf \\
        --out export/tiny_softmax

(`python -m parallax_jax.models.export` is the same command. runs/tiny_rnorm: `python -m
train --config tiny --set model.r_norm=true --set run.out_dir=runs/tiny_rnorm`, a Parallax
run fla can represent; runs/tiny_softmax: `python -m train --config tiny_softmax`.)

--checkpoint is anything `parallax_jax.models.checkpoint.load_checkpoint` reads (a training
run directory: its newest step, or --step; one step; a save_checkpoint directory). Formats:
  hf   a transformers Qwen3 directory (Qwen3ForCausalLM): softmax models, or Parallax ones
       whose W_R is zero (exactly softmax); `parallax_jax.models.hf.save_hf_checkpoint`.
  fla  a flash-linear-attention Parallax directory (fla.models.parallax,
       ParallaxForCausalLM); `parallax_jax.models.fla.save_fla_checkpoint`.
Both write config.json + model.safetensors (numpy writer, no torch needed), copy the run's
tokenizer.json (a note when none is found), and set eos_token_id from the run's data (a note
when there is none), then print the output directory. The files are written beside --out and
renamed into place last, so a failed or interrupted export leaves no --out (what a killed
one leaves, a hidden `.<out>.partial-<pid>-*` beside it, the next export of --out removes).
Approximations are printed to stderr as notes. What the format cannot represent, a bad checkpoint or bad
arguments exit with status 2 and one line on stderr, `parallax-export: error: <message>`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid

from parallax_jax._parser import Parser, prog_name

FORMATS = ("hf", "fla")


def _remove_stale_partials(parent: str, base: str):
  """Remove what killed exports of `base` left (`.{base}.partial-{pid}-{id}`, a model's size
  of hidden files): those whose process no longer runs on this host."""
  prefix = f".{base}.partial-"
  for name in os.listdir(parent):
    pid = name[len(prefix):].split("-")[0] if name.startswith(prefix) else ""
    if not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      os.kill(int(pid), 0)
      continue  # still running (another export of the same --out)
    except ProcessLookupError:
      pass
    except OSError:  # running under another user
      continue
    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def export(checkpoint: str, fmt: str, out: str, *, step: int | None = None,
           dtype: str | None = None, tokenizer: bool = True) -> list[str]:
  """Export `checkpoint` to directory `out` in format `fmt`; returns the notes."""
  from parallax_jax.models import checkpoint as ckpt
  from parallax_jax.models import fla, hf
  if fmt not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
  src = ckpt.find_checkpoint(checkpoint, step)
  # a non-empty directory could be a training run (whose config.json the export would
  # replace) or an older export (whose shard index would outlive the new weights)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out: {out!r} is a file, not a directory")
  held = sorted(os.listdir(out)) if os.path.isdir(out) else []
  if held:
    raise ValueError(f"--out: {out!r} is not empty ({', '.join(held[:3])}"
                     f"{', ...' if len(held) > 3 else ''}); export into a new or empty directory")
  if fmt == "fla":  # refuse before reading the weights
    fla.check_fla_exportable(src.config)
  config, params = ckpt.load_checkpoint(checkpoint, source=src)
  data = ckpt.checkpoint_data(src)
  save = hf.save_hf_checkpoint if fmt == "hf" else fla.save_fla_checkpoint
  # write beside --out and rename at the end: an interrupted or failed export leaves no
  # --out that looks complete (and none that blocks a rerun)
  parent = os.path.dirname(os.path.abspath(out))
  made, p = [], parent
  while not os.path.exists(p):
    made.append(p)
    p = os.path.dirname(p)
  os.makedirs(parent, exist_ok=True)
  base = os.path.basename(os.path.abspath(out))
  _remove_stale_partials(parent, base)
  tmp = os.path.join(parent, f".{base}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  os.mkdir(tmp)
  try:
    notes = save(tmp, config, params, dtype=dtype, eos_id=data["eos_id"],
                 tokenizer=data["tokenizer"] if tokenizer else None)
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked above)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    for d in made:  # deepest first; only directories this call created
      try:
        os.rmdir(d)
      except OSError:
        break
    raise
  if data["eos_id"] is None:  # generation in torch would not stop: say so
    notes.append("no eos id found (the run's data meta.json): eos_token_id written as null")
  if tokenizer and data["tokenizer"] is None:  # a serving stack needs one: say it is missing
    notes.append(f"no tokenizer.json found (looked at {data['searched'] or 'no data.path'}): "
                 "none copied")
  return notes


def main(argv=None) -> int:
  ap = Parser(prog=prog_name("parallax-export", "parallax_jax.models.export", __file__),
              description=__doc__.splitlines()[0],
              formatter_class=argparse.RawDescriptionHelpFormatter,
              epilog="\n".join(__doc__.splitlines()[2:]))
  ap.add_argument("--checkpoint", required=True,
                  help="training run directory, one step's directory, or a save_checkpoint "
                  "directory")
  ap.add_argument("--step", type=int, help="step of a run directory (default: the newest)")
  ap.add_argument("--format", required=True, choices=FORMATS, help="hf (Qwen3) or fla (Parallax)")
  ap.add_argument("--out", required=True, help="output directory (created; new or empty)")
  ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                  help="tensor dtype (default: the checkpoint's, float32 for training runs)")
  ap.add_argument("--no-tokenizer", action="store_true", help="do not copy tokenizer.json")
  args = ap.parse_args(argv)
  try:
    notes = export(args.checkpoint, args.format, args.out, step=args.step, dtype=args.dtype,
                   tokenizer=not args.no_tokenizer)
  except (ValueError, OSError) as e:  # a refusal, a missing file, an unwritable --out
    ap.error(str(e))
  for n in notes:
    print(f"note: {n}", file=sys.stderr)
  print(args.out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
