#!/usr/bin/env bash
# Create (or reuse) .venv with Python 3.12 and install parallax-jax with its test extra.
# Idempotent: a second run only checks that the install is current.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  if command -v pyenv >/dev/null 2>&1 && PYENV_VERSION=3.12.1 pyenv which python >/dev/null 2>&1; then
    PYENV_VERSION=3.12.1 pyenv which python; return
  fi
  for p in python3.12 python3; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
      command -v "$p"; return
    fi
  done
  echo "error: Python >= 3.12 not found (set PYTHON=/path/to/python3.12, or install 3.12.1 with pyenv)" >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
