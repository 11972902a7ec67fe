#!/usr/bin/env bash
# Create (or refresh) the project-local virtual environment .venv. Idempotent: once
# installed, a re-run returns at once unless pyproject.toml changed since.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.raymtl-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's exit status is kept; only the local-index noise is filtered from its stderr.
pipq() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pipq --upgrade pip
# On this machine torch 2.13.0 is the CPU build on local disk; installing it first keeps
# pip from pulling a multi-GB CUDA build. On GPU machines set RAYMTL_TORCH to a CUDA build.
pipq "torch==${RAYMTL_TORCH:-2.13.0}"
pipq -e ".[dev]"
touch "$stamp"
echo "[raymtl] environment ready in .venv"
