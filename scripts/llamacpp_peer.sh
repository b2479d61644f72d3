#!/usr/bin/env bash
# Builds llama.cpp from source as a benchmark PEER and converts a LLaVA-1.5 checkpoint's
# text decoder to GGUF. llama.cpp is never a dependency of this project: it lives in WORKDIR
# only, and nothing is installed into .venv.
#
#   scripts/llamacpp_peer.sh build [WORKDIR]                       # default /tmp/llamacpp-peer
#   scripts/llamacpp_peer.sh gguf  HF_FOLDER OUT_PREFIX [WORKDIR]
#       writes OUT_PREFIX-q8_0.gguf and OUT_PREFIX-q4_0.gguf (OUT_PREFIX-f16.gguf is deleted
#       unless KEEP_F16=1). Needs `build` first. QUANT_FLAGS (e.g. --pure) go to llama-quantize;
#       THREADS (default 2) is its thread count.
#   NO_AMX=1 scripts/llamacpp_peer.sh build   leaves ggml's AMX kernels out (see build()).
#
# llama.cpp comes vendored in the llama-cpp-python sdist (vendor/llama.cpp), pinned below.
set -euo pipefail

LLCPP_PY_VERSION=0.3.36
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"

usage() { sed -n '6,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

src_dir() { echo "$1/llama_cpp_python-$LLCPP_PY_VERSION/vendor/llama.cpp"; }

build() {
  local work="${1:-/tmp/llamacpp-peer}"
  local sdist="$work/llama_cpp_python-$LLCPP_PY_VERSION.tar.gz"
  mkdir -p "$work"
  # Reuse an sdist already in WORKDIR; otherwise fetch it (source only, no deps).
  if [ ! -f "$sdist" ]; then
    pip download --no-deps --no-binary :all: "llama-cpp-python==$LLCPP_PY_VERSION" -d "$work"
  fi
  local src; src="$(src_dir "$work")"
  [ -f "$src/CMakeLists.txt" ] || tar xzf "$sdist" -C "$work"

  # CPU only, native flags; no CUDA/Metal, no network clients, nothing but the two tools.
  # NO_AMX=1 leaves ggml's AMX kernels out (-march=native compiles them in where the CPU
  # advertises AMX): on a VM that advertises it but does not run ggml's tile code, llama-bench
  # dies of a general protection fault at its first ldtilecfg (dmesg names libggml-cpu).
  local no_amx=""
  [ "${NO_AMX:-0}" = 1 ] && no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF \
    -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
  cmake --build "$src/build" --config Release --target llama-bench llama-quantize -j 2

  # Record the llama.cpp version so docs can cite it. The sdist ships the submodule's git
  # dir (shallow, so build numbers are meaningless: cite the commit).
  {
    echo "llama-cpp-python $LLCPP_PY_VERSION"
    git -C "$src" log -1 --format='llama.cpp commit %H (%cs) %s' 2>/dev/null \
      || echo "llama.cpp commit unknown"
    "$src/build/bin/llama-bench" --version 2>&1 | grep -i version || true
  } | tee "$work/VERSION.txt"
  echo "binaries: $src/build/bin/llama-bench $src/build/bin/llama-quantize"
}

gguf() {
  local hf="$1" out="$2" work="${3:-/tmp/llamacpp-peer}"
  local src; src="$(src_dir "$work")"
  local quantize="$src/build/bin/llama-quantize"
  [ -x "$quantize" ] || { echo "no $quantize: run '$0 build $work' first" >&2; exit 1; }

  # The converter takes the LLaVA folder as is: LlavaForConditionalGeneration is registered as a
  # llama TEXT model, its text_config is hoisted to the top level, "language_model." is stripped
  # from tensor names, and the vision tower and projector ("vision_", "projector.") are skipped.
  # (--mmproj would write those instead; not benchmarked here.) The tiny tokenizer's
  # tokenizer.json (BPE, byte fallback) goes through its LlamaHfVocab, all 32064 ids.
  # It runs on the project's venv; the vendored gguf-py comes first on its path.
  PYTHONPATH="$src/gguf-py" "$PY" "$src/convert_hf_to_gguf.py" "$hf" \
    --outtype f16 --outfile "$out-f16.gguf"

  local q
  for q in q8_0 q4_0; do
    # shellcheck disable=SC2086  # QUANT_FLAGS is a list of flags
    "$quantize" ${QUANT_FLAGS:-} "$out-f16.gguf" "$out-$q.gguf" "$q" "${THREADS:-2}"
  done
  [ "${KEEP_F16:-0}" = 1 ] || rm -f "$out-f16.gguf"
  ls -l "$out"-*.gguf
}

case "${1:-}" in
  build) shift; [ $# -le 1 ] || usage; build "$@" ;;
  gguf) shift; [ $# -ge 2 ] && [ $# -le 3 ] || usage; gguf "$@" ;;
  *) usage ;;
esac
