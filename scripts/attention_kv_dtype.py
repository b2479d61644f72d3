"""ONNX Runtime's CPU GroupQueryAttention for one decode step, float32 against float16 KV cache:
the measurement behind "Tried and left out: a float16 KV cache" in docs/benchmarks.md.

    .venv/bin/python scripts/attention_kv_dtype.py [--context 640] [--threads 2]

32 layers of LLaVA-1.5-7B's attention (32 heads of 128, a 1024-position static cache each,
`--context` of it filled), one query token; the caches are bound in place as the runtime binds
them, so each step reads them and copies nothing. Prints the median of 10 steps, two rounds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

HEADS, HEAD_DIM, LAYERS, MAX_POSITIONS = 32, 128, 32, 1024


def attention_model(dtype: type):
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    inputs = [
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    nodes, outputs = [], []
    for layer in range(LAYERS):
        names = [f"{kind}{layer}" for kind in ("query", "key", "value", "past_key", "past_value")]
        for name in names[:3]:
            inputs.append(helper.make_tensor_value_info(name, elem, [1, 1, HEADS * HEAD_DIM]))
        for name in names[3:]:
            inputs.append(helper.make_tensor_value_info(name, elem, [1, HEADS, MAX_POSITIONS, HEAD_DIM]))
        results = [f"out{layer}", f"present_key{layer}", f"present_value{layer}"]
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [*names, "seqlens_k", "total_sequence_length"],
                results,
                domain="com.microsoft",
                num_heads=HEADS,
                kv_num_heads=HEADS,
            )
        )
        outputs += [helper.make_tensor_value_info(name, elem, None) for name in results]
    graph = helper.make_graph(nodes, "attention", inputs, outputs)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def seconds_per_step(dtype: type, context: int, threads: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = attention_model(dtype).SerializeToString()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    generator = np.random.default_rng(0)
    binding = session.io_binding()
    binding.bind_cpu_input("seqlens_k", np.array([context], np.int32))
    binding.bind_cpu_input("total_sequence_length", np.array(context + 1, np.int32))
    for layer in range(LAYERS):
        for kind in ("query", "key", "value"):
            token = generator.standard_normal((1, 1, HEADS * HEAD_DIM)).astype(dtype)
            binding.bind_cpu_input(f"{kind}{layer}", token)
        for kind in ("key", "value"):  # past and present share one buffer
            cache = generator.standard_normal((1, HEADS, MAX_POSITIONS, HEAD_DIM)).astype(dtype)
            buffer = ort.OrtValue.ortvalue_from_numpy(cache)
            binding.bind_ortvalue_input(f"past_{kind}{layer}", buffer)
            binding.bind_ortvalue_output(f"present_{kind}{layer}", buffer)
        binding.bind_output(f"out{layer}")
    session.run_with_iobinding(binding)  # warm-up
    times = []
    for _ in range(10):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=640)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for _ in range(2):
        for dtype in (np.float32, np.float16):
            seconds = seconds_per_step(dtype, args.context, args.threads)
            print(
                f"{np.dtype(dtype).name:8s} KV: {seconds * 1e3:6.1f} ms a step ({LAYERS} layers)", flush=True
            )


if __name__ == "__main__":
    main()
