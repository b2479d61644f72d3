#!/usr/bin/env bash
# The main job: set up, export the bundled toy LLaVA, and answer a question about an image.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/llava-export all --model models/toy-llava --out out/toy-llava --force
.venv/bin/llava-run --artifacts out/toy-llava --image examples/shapes.png \
  --prompt "Describe the image." --json
