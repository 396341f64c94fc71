#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite, lint included. CI runs this file.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu
.venv/bin/ruff check .
.venv/bin/pytest -q -rfE tests "$@"
