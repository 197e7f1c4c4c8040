"""Build the Hugging Face Qwen3 migration fixture used by tests/test_hf.py.

Runs under a *separate* Python with torch + transformers (the project venv has no torch):

    PYENV_VERSION=3.11.7 python -m venv .venv-hf
    .venv-hf/bin/pip install torch==2.13.0 transformers safetensors numpy
    .venv-hf/bin/python tests/hf_fixture/make_fixture.py            # -> tests/hf_fixture/data/

It builds tiny *random* Qwen3 models with transformers itself (Qwen3Config + Qwen3ForCausalLM,
no download), saves each with `save_pretrained` (config.json + model.safetensors), and saves the
float32 reference logits that transformers computes for fixed input ids. Two variants: untied
and tied embeddings. Norm weights are perturbed away from 1 so that loading them is tested.
"""

import argparse
import json
import os

import numpy as np
import torch
import transformers
from transformers import Qwen3Config, Qwen3ForCausalLM

VARIANTS = {
    # head_dim (32) != hidden_size / num_attention_heads (16): Qwen3 decouples them.
    "untied": dict(tie_word_embeddings=False),
    "tied": dict(tie_word_embeddings=True),
}


def build(out_dir: str, name: str, overrides: dict, seed: int) -> None:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        initializer_range=0.1,
        attention_bias=False,
        use_sliding_window=False,
        **overrides,
    )
    config._attn_implementation = "eager"
    model = Qwen3ForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight") or "layernorm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    path = os.path.join(out_dir, name)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, config.vocab_size, size=(2, 13), dtype=np.int64)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(input_ids)).logits.to(torch.float32).numpy()
    np.save(os.path.join(path, "input_ids.npy"), input_ids)
    np.save(os.path.join(path, "logits.npy"), logits)
    with open(os.path.join(path, "fixture.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "seed": seed, "logits_shape": list(logits.shape)}, f, indent=1)
    print(f"wrote {path}: logits {logits.shape}, |logits| max {np.abs(logits).max():.3f}")


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(here, "data"))
    args = ap.parse_args()
    for i, (name, ov) in enumerate(VARIANTS.items()):
        build(args.out, name, ov, seed=1234 + i)


if __name__ == "__main__":
    main()
