"""ONNX Runtime's MatMulNBits and --quant w8a8's MatMulInteger against a float32 MatMul on this
CPU, at a decode step's and a 640-token prefill's shapes: the profile behind docs/benchmarks.md's
"The full 7B on a CPU".

    .venv/bin/python scripts/matmulnbits_rates.py [--threads 2] [--rows 1 640]

A chain of 16 layers of 4096 x 4096 (134 MB at int4, more than the last-level cache: the
weights stream from memory as a 7B decoder's do), random weights quantized by the exporter's
own block quantizer (asymmetric, accuracy level 4: int8 activations), for each bit width and
block size; and the same chain rewritten by integer_matmul.IntegerLinears (w8a8: each layer's
input rounded per row, MatMulInteger, the two scales). Prints the median time of a pass,
weights per second and the stored bytes per second (values, scales, zero points).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.graphs import integer_matmul, quantize  # noqa: E402

SIDE, LAYERS = 4096, 16
W8A8 = (8, 0)  # block 0: a scale per column, MatMulInteger
CONFIGS = [(32, None)] + [(bits, block) for bits in (4, 8) for block in (32, 64, 128)] + [W8A8]


def chain(weights: list[np.ndarray], bits: int, block: int | None):
    """x [M, SIDE] through every weight: MatMul (bits 32), MatMulNBits, or w8a8."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers, previous = [], [], "x"
    for index, weight in enumerate(weights):
        out = "y" if index == len(weights) - 1 else f"h{index}"
        if bits == 32 or block == 0:
            initializers.append(numpy_helper.from_array(weight, f"w{index}"))
            nodes.append(helper.make_node("MatMul", [previous, f"w{index}"], [out]))
        else:
            packed, scales, zero_points = quantize.quantize_blocks(weight, bits, block)
            names = [f"q{index}", f"s{index}", f"z{index}"]
            for name, array in zip(names, (packed, scales.reshape(-1), zero_points.reshape(-1))):
                initializers.append(numpy_helper.from_array(array, name))
            nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    [previous, *names],
                    [out],
                    domain="com.microsoft",
                    K=SIDE,
                    N=SIDE,
                    bits=bits,
                    block_size=block,
                    accuracy_level=quantize.DEFAULT_ACCURACY_LEVEL,
                )
            )
        previous = out
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", SIDE])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", SIDE])
    graph = helper.make_graph(nodes, "chain", [x], [y], initializers)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return integer_chain(model, weights) if block == 0 else model


def integer_chain(model, weights: list[np.ndarray]):
    """The float32 chain with each MatMul rewritten as --quant w8a8 writes it."""
    import onnx_ir as ir

    graph = ir.from_proto(model)
    rewriter = integer_matmul.IntegerLinears(graph.graph)
    for node in [node for node in graph.graph if node.op_type == "MatMul"]:
        name = node.inputs[1].name
        rewriter.replace(node, weights[int(name[1:])], name)
    return ir.to_proto(graph)


def seconds_per_pass(model, rows: int, threads: int, repeats: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((rows, SIDE)).astype(np.float32)
    session.run(None, {"x": x})  # warm-up (prepacking)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bits_per_weight(bits: int, block: int | None) -> float:
    """Stored bits per weight: the value, a float32 scale and a zero point per block (w8a8: a
    float32 scale per column of SIDE)."""
    if block is None:
        return 32.0
    return 8 + 32 / SIDE if block == 0 else bits + 32 / block + bits / block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 640], help="M: 1 decodes, 640 prefills")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((SIDE, SIDE)) * 0.02).astype(np.float32) for _ in range(LAYERS)]
    count = LAYERS * SIDE * SIDE
    for rows in args.rows:
        for bits, block in CONFIGS:
            seconds = seconds_per_pass(
                chain(weights, bits, block), rows, args.threads, 20 if rows == 1 else 3
            )
            name = {None: "float32 MatMul", 0: "w8a8 MatMulInteger"}.get(
                block, f"int{bits}, blocks of {block}"
            )
            stored = count * bits_per_weight(bits, block) / 8
            print(
                f"M={rows:<4d} {name:18s} {seconds * 1e3:8.1f} ms  {count / seconds / 1e9:6.1f} G weights/s  "
                f"{stored / seconds / 1e9:5.1f} GB/s stored  {2 * rows * count / seconds / 1e9:6.1f} GFLOP/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
