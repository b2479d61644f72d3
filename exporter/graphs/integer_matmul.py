"""`--quant w8a8`: the decoder's linear layers on the CPU's integer dot products, weights and
activations in 8 bits (standard ONNX MatMulInteger; float32 everywhere else).

A linear layer y = x @ W (x [..., K] float32, W [K, N]) becomes

    per row of x (a token):  scale = max|x| / 127,  qx = round(x / scale) + 128     uint8 [..., K]
    acc = MatMulInteger(qx, Wq, a_zero_point=128, b_zero_point=128)                int32 [..., N]
    y = acc * scale * weight_scales                                               float32 [..., N]

Wq = round(W / weight_scales) + 128 in uint8, one scale per output column
(weight_scales[n] = max|W[:, n]| / 127). Both sides are symmetric int8 values stored around
128, so the integer part, sum_k (qx - 128)(Wq - 128), is exact. Layers that read the same x
(q, k, v; gate, up) share its rounding.

Why uint8 around 128 and not int8: on an AVX2 CPU without VNNI, ONNX Runtime's uint8 x int8
kernel sums pairs of products in int16 (vpmaddubsw) and saturates past 32767, and its int8
activation path is a slow reference loop; uint8 x uint8 is exact (tests/test_integer_matmul.py)
and fast. Why a scale per token: a prompt's tokens each get the numbers they would get alone (a
prefill and a decode agree, whatever else is in the batch), and one outlier token does not
coarsen the others. Against MatMulNBits' int8 (blocks of 128 along K, activations rounded in
blocks at accuracy level 4) the weights round per column, more coarsely, and the activations
per token; the gain is speed: docs/benchmarks.md, "The full 7B on a CPU against llama.cpp".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import LlavaError

QUANT = "w8a8"
ZERO_POINT = 128  # both sides: the stored uint8 = the signed value + 128
TINY = np.finfo(np.float32).tiny  # an all-zero row's scale: nothing to divide by zero
COLUMNS_AT_ONCE = 512  # quantize_columns' float32 working set: K x 512 (8 MiB at K = 4096)


@dataclass
class ColumnQuant:
    """A [K, N] weight as the graph stores it."""

    values: np.ndarray  # [K, N] uint8, the signed value + ZERO_POINT
    scales: np.ndarray  # [N] float32

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes


def quantize_columns(weight: np.ndarray) -> ColumnQuant:
    """Symmetric round to nearest per output column of `weight` [K, N] (float32, a transposed
    view of the checkpoint's [N, K] is fine); a column of zeros gets scale 1. Works through
    COLUMNS_AT_ONCE columns at a time, so a 7B MLP weight needs no float copy of its own."""
    depth, columns = weight.shape
    values = np.empty((depth, columns), np.uint8)
    scales = np.empty(columns, np.float32)
    for start in range(0, columns, COLUMNS_AT_ONCE):
        part = slice(start, start + COLUMNS_AT_ONCE)
        chunk = weight[:, part].astype(np.float32)
        peak = np.abs(chunk).max(axis=0)
        scales[part] = np.where(peak > 0, peak / 127, 1)
        values[:, part] = np.clip(np.round(chunk / scales[part]), -127, 127) + ZERO_POINT
    return ColumnQuant(values, scales)


def dequantize_columns(quant: ColumnQuant) -> np.ndarray:
    """The [K, N] float32 weight the graph's integer product stands for."""
    return (quant.values.astype(np.float32) - ZERO_POINT) * quant.scales


def fake_quantized(weight: np.ndarray) -> np.ndarray:
    """`weight` [K, N] after a round trip through the graph's storage, in its own dtype."""
    return dequantize_columns(quantize_columns(weight)).astype(weight.dtype)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the graph does to an activation x [..., K] float32, in numpy: (qx uint8, scale
    [..., 1] float32). The reference for the tests."""
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / np.float32(127), TINY).astype(np.float32)
    return (np.round(x / scale) + ZERO_POINT).astype(np.uint8), scale


def graph_bytes_per_weight(path) -> float:
    """The stored bytes per weight of a w8a8 graph's linear layers: a byte per weight and a
    float32 scale per column (read from the graph without its weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    matmuls = [node for node in model.graph.node if node.op_type == "MatMulInteger"]
    shapes = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    weights = [shapes[node.input[1]] for node in matmuls if node.input[1] in shapes]
    if not weights:
        raise LlavaError(f"{path} has no MatMulInteger over a stored weight: not a --quant w8a8 decoder")
    count = sum(depth * columns for depth, columns in weights)
    return (count + 4 * sum(columns for _, columns in weights)) / count


def initializer(graph, name: str, array: np.ndarray):
    """`array` as a new initializer of the onnx_ir `graph`; returns its Value."""
    import onnx_ir as ir

    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


class IntegerLinears:
    """Rewrites an onnx_ir graph's linear layers into the integer form above, one at a time."""

    def __init__(self, graph):
        import onnx_ir as ir

        self.ir, self.graph = ir, graph
        self.quantized: dict[int, tuple] = {}  # id(x) -> (qx, scale) Values
        constants = {
            "axes": np.array([-1], np.int64),
            "peak": np.array(127, np.float32),
            "tiny": np.array(TINY, np.float32),
            "offset": np.array(ZERO_POINT, np.float32),
            "zero_point": np.array(ZERO_POINT, np.uint8),
        }
        self.constant = {
            name: initializer(graph, f"{QUANT}.{name}", array) for name, array in constants.items()
        }

    def replace(self, matmul, weight: np.ndarray, name: str, computed_by: list | None = None) -> int:
        """`matmul` (computing its input 0 times the linear weight initializer `name`) -> the
        integer form of `weight` [K, N] float32, stored under `name`_*; the output keeps its
        uses and name. The nodes that computed it (`computed_by`, default [matmul]) and the
        float initializer are removed. Returns the stored bytes."""
        ir, zero_point = self.ir, self.constant["zero_point"]
        quant = quantize_columns(weight)
        values = initializer(self.graph, f"{name}_w8", quant.values)
        scales = initializer(self.graph, f"{name}_scales", quant.scales)
        qx, scale = self.quantize_input(matmul.inputs[0])
        acc = ir.node("MatMulInteger", [qx, values, zero_point, zero_point])
        as_float = ir.node("Cast", [acc.outputs[0]], attributes={"to": ir.DataType.FLOAT})
        per_row = ir.node("Mul", [as_float.outputs[0], scale])
        result = ir.node("Mul", [per_row.outputs[0], scales])
        self.graph.insert_before(matmul, [acc, as_float, per_row, result])
        old = matmul.outputs[0]
        output_name, old.name = old.name, f"{old.name}.float"
        ir.convenience.replace_all_uses_with(old, result.outputs[0], replace_graph_outputs=True)
        result.outputs[0].name = output_name
        result.outputs[0].shape, result.outputs[0].type = old.shape, old.type
        for node in computed_by or [matmul]:
            self.graph.remove(node, safe=True)
        self.graph.initializers.pop(name)
        return quant.nbytes

    def quantize_input(self, x) -> tuple:
        """(qx, scale) for activation `x`, added once, right after x is made."""
        if id(x) in self.quantized:
            return self.quantized[id(x)]
        ir, c = self.ir, self.constant
        nodes = []

        def add(op, inputs, **attributes):
            nodes.append(ir.node(op, inputs, attributes=attributes or None))
            return nodes[-1].outputs[0]

        peak = add("ReduceMax", [add("Abs", [x]), c["axes"]], keepdims=1)
        scale = add("Max", [add("Div", [peak, c["peak"]]), c["tiny"]])
        shifted = add("Add", [add("Round", [add("Div", [x, scale])]), c["offset"]])  # 1..255
        qx = add("Cast", [shifted], to=ir.DataType.UINT8)
        producer = x.producer()
        if producer is None:  # a graph input
            self.graph.insert_before(next(iter(self.graph)), nodes)
        else:
            self.graph.insert_after(producer, nodes)
        self.quantized[id(x)] = (qx, scale)
        return self.quantized[id(x)]
