"""Run exported models in torch and compare their float32 logits with JAX's.

    # the flash-linear-attention, fla-core and einops wheels, from .whl/
    python -m pip install --no-deps --no-index --target /tmp/fla .whl/*.whl
    PYTHONPATH=/tmp/fla python scripts/check_export_torch.py [--out DIR]

Builds small random models in JAX (float32, the dense 'xla' attention), exports them with
`parallax_jax.models.hf.save_hf_checkpoint` / `fla.save_fla_checkpoint`, loads the
directories with transformers (`Qwen3ForCausalLM`, eager attention) and with fla
(`AutoModelForCausalLM` after `import fla`: `ParallaxForCausalLM`), and prints the largest
|logit difference| per case. fla runs twice: with its Triton kernel (`parallel_parallax`,
which takes bf16 only: that model runs in bf16, held to twice the error of this package's own
bf16 forward) and with its float32 PyTorch reference `naive_parallax` patched
in, which checks the format (names, RoPE on r, scales, norms) to float32 rounding. A greedy
generation through fla's KV cache (its decode kernels) is compared with `generate` for
information. Needs torch and transformers; the fla cases need fla and a CUDA GPU (Triton),
and are skipped without them. Exit status 1 if a checked case is off; results also go to
<--out or $OUT>/check_export_torch.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the JAX reference: float32 on the CPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from parallax_jax.models import fla as fla_export  # noqa: E402
from parallax_jax.models import hf, qwen3  # noqa: E402
from parallax_jax.models.config import ModelConfig  # noqa: E402
from parallax_jax.models.generate import generate  # noqa: E402

# Tolerances on max |logit difference| (logits are O(1-10) here).
TOL_EXACT = 2e-4   # float32 against float32: transformers, fla with naive_parallax


def model_config(**kw) -> ModelConfig:
  base = dict(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=32, intermediate_size=192, max_seq_len=256, rope_theta=5e4,
              rms_norm_eps=1e-5, dtype="float32", implementation="xla", init_std=0.1)
  base.update(kw)
  return ModelConfig(**base)


def random_params(cfg: ModelConfig, seed: int):
  """Host-drawn parameters: every weight (W_R included) random, norms around 1."""
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = getattr(path[-1], "key", "")
    x = (1.0 + 0.2 * rng.standard_normal(a.shape) if name == "scale"
         else cfg.init_std * rng.standard_normal(a.shape))
    return jnp.asarray(x, a.dtype)

  return jax.tree_util.tree_map_with_path(draw, qwen3.abstract_params(cfg))


HF_CASES = {
    "qwen3-softmax-gqa": dict(attention="softmax"),
    "qwen3-softmax-untied-window-bandwidth": dict(attention="softmax", tie_embeddings=False,
                                                  window=24, bandwidth=4.0, rms_norm_eps=1e-6),
    "qwen3-softmax-head_dim64": dict(attention="softmax", head_dim=64, num_kv_heads=1),
}
FLA_CASES = {
    "fla-parallax-gqa-d32": dict(r_norm=True),
    "fla-parallax-mha-d64-untied-window": dict(r_norm=True, hidden_size=256, num_kv_heads=4,
                                               head_dim=64, tie_embeddings=False, window=40),
    "fla-parallax-bandwidth-eps1e-6": dict(r_norm=True, bandwidth=7.0, rms_norm_eps=1e-6),
}


def jax_logits(cfg, params, ids):
  return np.asarray(qwen3.Qwen3Model(cfg).apply({"params": params}, jnp.asarray(ids)))


def torch_logits(model, ids, device):
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids, device=device), use_cache=False)
  return out.logits.float().cpu().numpy()


def check_hf(tmp, ids, device, results):
  import torch
  from transformers import Qwen3ForCausalLM
  for name, kw in HF_CASES.items():
    cfg = model_config(**kw)
    params = random_params(cfg, 1)
    path = os.path.join(tmp, name)
    notes = hf.save_hf_checkpoint(path, cfg, params)
    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32,
                                             attn_implementation="eager").to(device).eval()
    err = float(np.abs(torch_logits(model, ids, device) - jax_logits(cfg, params, ids)).max())
    results.append({"case": name, "what": "transformers Qwen3ForCausalLM", "max_abs": err,
                    "tol": TOL_EXACT, "ok": err <= TOL_EXACT, "notes": notes})


def check_fla(tmp, ids, device, results):
  import torch
  import fla  # noqa: F401  (registers model_type 'parallax' with transformers)
  import fla.layers.parallax as fla_layer
  from fla.ops.parallax.naive import naive_parallax
  from transformers import AutoModelForCausalLM
  kernel = fla_layer.parallel_parallax

  def naive(q, r, k, v, window_size=None, cu_seqlens=None, **_):
    assert cu_seqlens is None
    return naive_parallax(q, r, k, v, window_size=window_size)

  for name, kw in FLA_CASES.items():
    cfg = model_config(**kw)
    params = random_params(cfg, 2)
    path = os.path.join(tmp, name)
    notes = fla_export.save_fla_checkpoint(path, cfg, params)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    want = jax_logits(cfg, params, ids)
    # the format itself, with eps 1e-5 per-head norms (what fla computes) on the JAX side
    read_cfg, read_params = fla_export.load_fla_checkpoint(path, dtype="float32",
                                                           implementation="xla")
    want_fla = jax_logits(read_cfg, read_params, ids)
    eps_shift = float(np.abs(want_fla - want).max())
    # fla's Triton kernel takes bf16 / fp16 only: its model runs in bf16, held to twice the
    # error of this package's own bf16 forward against the float32 logits
    want_bf16 = jax_logits(read_cfg.replace(dtype="bfloat16"), read_params, ids)
    tol_bf16 = max(2 * float(np.abs(want_bf16 - want_fla).max()), TOL_EXACT)
    model_bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(
        device).eval()
    for impl, fn, tol, m in (("naive_parallax", naive, TOL_EXACT, model),
                             ("parallel_parallax kernel, bf16", kernel, tol_bf16, model_bf16)):
      fla_layer.parallel_parallax = fn
      try:
        got = torch_logits(m, ids, device)
      finally:
        fla_layer.parallel_parallax = kernel
      err = float(np.abs(got - want_fla).max())
      results.append({"case": name, "what": f"fla ParallaxForCausalLM, {impl}",
                      "max_abs": err, "tol": tol, "ok": err <= tol, "notes": notes,
                      "max_abs_vs_original_model": float(np.abs(got - want).max()),
                      "eps_shift": eps_shift})
    # greedy decoding through fla's cache (decode kernels) vs this package's generate
    prompt = ids[:, :16]
    rec = {"case": name, "what": "fla greedy generate (KV cache) vs generate", "ok": True,
           "info_only": True}
    try:
      with torch.no_grad():
        out = model_bf16.generate(input_ids=torch.as_tensor(prompt, device=device),
                             max_new_tokens=8, do_sample=False, use_cache=True)
      got = out[:, prompt.shape[1]:].cpu().numpy()
      ref = np.asarray(generate(read_cfg.replace(dtype="bfloat16"), read_params, prompt,
                                max_new_tokens=8).tokens)
      same = got.shape == ref.shape and bool(np.array_equal(got, ref))
      rec.update(same_tokens=same, fla_tokens=got.tolist(), jax_tokens=ref.tolist())
    except Exception as e:  # noqa: BLE001 - information only
      rec.update(same_tokens=False, error=f"{type(e).__name__}: {e}"[:300])
    results.append(rec)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.environ.get("OUT"), help="write check_export_torch.json")
  ap.add_argument("--seq-len", type=int, default=80)
  args = ap.parse_args(argv)
  import torch
  import transformers
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  device = "cuda" if torch.cuda.is_available() else "cpu"
  ids = np.random.default_rng(0).integers(0, 256, size=(2, args.seq_len)).astype(np.int64)
  results: list[dict] = []
  versions = {"torch": torch.__version__, "transformers": transformers.__version__,
              "jax": jax.__version__, "device": device}
  with tempfile.TemporaryDirectory() as tmp:
    check_hf(tmp, ids, device, results)
    try:
      import fla
      versions["fla"] = getattr(fla, "__version__", "?")
    except ImportError as e:
      results.append({"case": "fla", "skipped": f"fla not importable: {e}", "ok": True})
    else:
      if device != "cuda":
        results.append({"case": "fla", "skipped": "fla's Triton kernels need a CUDA GPU",
                        "ok": True})
      else:
        check_fla(tmp, ids, device, results)
  for r in results:
    if "skipped" in r:
      print(f"SKIP {r['case']}: {r['skipped']}")
    elif r.get("info_only"):
      print(f"INFO {r['case']}: {r['what']}: same tokens {r['same_tokens']}"
            + (f" ({r['error']})" if "error" in r else ""))
    else:
      extra = (f" (vs the original eps model {r['max_abs_vs_original_model']:.2e})"
               if "max_abs_vs_original_model" in r else "")
      print(f"{'OK  ' if r['ok'] else 'FAIL'} {r['case']}: {r['what']}: max |dlogit| "
            f"{r['max_abs']:.2e} (tol {r['tol']:.0e}){extra}"
            + (f"; notes: {'; '.join(r['notes'])}" if r.get("notes") else ""))
  print(json.dumps(versions))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "check_export_torch.json"), "w") as f:
      json.dump({"versions": versions, "results": results}, f, indent=1)
  return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
  raise SystemExit(main())
