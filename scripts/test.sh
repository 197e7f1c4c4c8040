#!/usr/bin/env bash
# Set up, then run the test suite (CPU; GPU-only tests skip themselves). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" -m "not slow" "$@"
