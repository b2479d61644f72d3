#!/usr/bin/env bash
# The main job: set up, write the bundled tiny LLaVA, export it, answer a question about an image.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m exporter.tiny --out out/tiny-llava
.venv/bin/llava-export all --model out/tiny-llava/hf --out out/tiny-llava/artifacts --force
.venv/bin/llava-run --artifacts out/tiny-llava/artifacts --image examples/shapes.png \
  --prompt "Describe the image." --max-new-tokens 24 --json
