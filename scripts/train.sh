#!/usr/bin/env bash
# Set up, then run the main job: prepare the stdlib corpus, train the tiny Parallax model on the
# CPU (a few minutes), and sample from it. Extra args go to `python -m train` (e.g. --set ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m train --config configs/tiny.py "$@"
