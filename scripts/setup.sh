#!/usr/bin/env bash
# Creates .venv with the exporter, the runtime, the server, the benchmark's plotting and the
# test tools.
# Idempotent: reinstalls only when pyproject.toml or this script changed. torch is pinned to
# the CPU build (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet torch==2.13.0
  .venv/bin/pip install --quiet -e ".[export,serve,serve-ray,dev,bench]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
