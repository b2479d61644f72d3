#!/usr/bin/env bash
# The main job: set up, export the bundled toy LLaVA (models/toy-llava, trained by
# `python -m exporter.toy.train`), answer questions about the bundled example image.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/llava-export all --model models/toy-llava --out out/toy-llava --force
for question in "Describe the image." "How many shapes are there?" "What colour is the background?"; do
  echo "> $question"
  .venv/bin/llava-run --artifacts out/toy-llava --image examples/shapes.png --prompt "$question" \
    --max-new-tokens 40 --timings
done
