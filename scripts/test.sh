#!/usr/bin/env bash
# Sets up and runs every test: unit tests (tests/) and the parity suite (parity_tests/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
