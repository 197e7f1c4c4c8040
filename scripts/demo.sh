#!/usr/bin/env bash
# Set up, then print the attention-family comparison on random data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m parallax_jax.demo "$@"
