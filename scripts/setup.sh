#!/usr/bin/env bash
# Create (or refresh) the project-local virtual environment .venv. Idempotent: a second
# run checks the installed packages against pyproject.toml and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.raymtl-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
# CPU build from local disk on this machine; pinning it first keeps pip from pulling CUDA torch.
.venv/bin/python -m pip install -q "torch==${RAYMTL_TORCH:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
touch "$stamp"
