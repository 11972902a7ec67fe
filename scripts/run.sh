#!/usr/bin/env bash
# Set up .venv (first time only) and run the main job on the embedded defaults.
# Extra arguments go to jobs/mtl.py, e.g. ./scripts/run.sh --smoke
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python jobs/mtl.py "$@"
