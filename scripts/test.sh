#!/usr/bin/env bash
# Set up .venv (first time only) and run the test suite: real Ray, real DeepSpeed, real data.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k data
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
