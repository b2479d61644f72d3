"""ONNX Runtime's profile of decode steps of a `--kv-cache static` decoder: time per op type, the
profile behind docs/benchmarks.md's "What limits w8a8's decode".

    .venv/bin/python scripts/profile_decode.py DIR [--context 640] [--steps 8] [--threads 2]

Random embeddings and a random cache of `--context` positions; the KV buffers are bound in place
as the runtime binds them (past and present share one buffer), so attention reads the cache
and copies nothing. The first step (allocations) is left out of the sums.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import contract  # noqa: E402


def bound_session(folder: Path, context: int, threads: int):
    import onnxruntime as ort

    manifest = contract.read_manifest(folder)
    graph = manifest.graphs["decoder"]
    if graph.kv_cache != contract.KV_STATIC:
        raise SystemExit(f"{folder} is not a --kv-cache static decoder")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "decode")
    session = ort.InferenceSession(str(folder / graph.file), options, providers=["CPUExecutionProvider"])
    generator = np.random.default_rng(0)
    binding = session.io_binding()
    hidden = graph.inputs[contract.INPUTS_EMBEDS][-1]
    binding.bind_cpu_input(
        contract.INPUTS_EMBEDS, (generator.standard_normal((1, 1, hidden)) * 0.02).astype(np.float32)
    )
    binding.bind_cpu_input(contract.ATTENTION_MASK, np.ones((1, context + 1), np.int64))
    binding.bind_cpu_input(contract.POSITION_IDS, np.array([[context]], np.int64))
    layers = (len(graph.inputs) - 3) // 2
    for layer in range(layers):
        for past, present in [
            (contract.past_key_name(layer), f"present.{layer}.key"),
            (contract.past_value_name(layer), f"present.{layer}.value"),
        ]:
            _, heads, _, head_dim = graph.inputs[past]
            shape = (1, heads, graph.max_seq_len, head_dim)
            buffer = ort.OrtValue.ortvalue_from_numpy(
                (generator.standard_normal(shape) * 0.1).astype(np.float32)
            )
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
    binding.bind_output("logits")
    return session, binding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--context", type=int, default=640)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    session, binding = bound_session(args.folder, args.context, args.threads)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - start)
    print("step ms (profiled):", [round(t * 1e3) for t in times])
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("name") == "model_run")
    first_end = runs[0][0] + runs[0][1]
    per_op, nodes = collections.defaultdict(float), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] > first_end:
            per_op[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]] += 1
    steps = len(runs) - 1
    total = sum(per_op.values())
    for op, micros in sorted(per_op.items(), key=lambda item: -item[1]):
        print(
            f"{op:24s} {micros / steps / 1e3:8.2f} ms a step {nodes[op] // steps:6d} nodes {micros / total:6.1%}"
        )
    print(f"all kernels {total / steps / 1e3:.1f} ms a step, {steps} steps")


if __name__ == "__main__":
    main()
