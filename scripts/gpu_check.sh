#!/usr/bin/env bash
# Every GPU check this machine allows (TensorRT, ONNX Runtime CUDA, float16 PyTorch on CUDA) and
# the GPU benchmark, in about 5 minutes, into gpu_check_report.md (+ .json). The logic is in
# exporter/bench/gpu_check.py; arguments pass through (e.g. --text-layers 32 for the full 7B depth).
# PYTHON: an interpreter with the exporter and the GPU extras installed (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m exporter.bench.gpu_check "$@"
