"""`--quant w8a8`: the decoder's linear layers on the CPU's integer dot products, weights and
activations in 8-bit storage (standard ONNX MatMulInteger; float32 everywhere else).

A linear layer y = x @ W (x [..., K] float32, W [K, N]) becomes

    per row of x (a token):  scale = max|x| / 127,  qx = round(x / scale) + 128     uint8 [..., K]
    acc = MatMulInteger(qx, Wq, a_zero_point=128)                                  int32 [..., N]
    y = acc * scale * weight_scales                                               float32 [..., N]

Wq = round(W / weight_scales) in int8, one scale per output column
(weight_scales[n] = max|W[:, n]| / 63). Layers that read the same x (q, k, v; gate, up) share
its rounding.

Why uint8 x int8, and weights of 7 bits: it is ONNX Runtime's fast integer GEMM on x86 (VNNI's
vpdpbusd where the CPU has it; on AVX2 without VNNI, vpmaddubsw, which sums pairs of products
in int16 and saturates past 32767). With |Wq| <= 63 a pair is at most 2 x 255 x 63 = 32130, so
the integer part, sum_k (qx - 128) Wq, is exact on every x86 CPU (tests/test_integer_matmul.py).
int8 x int8 is a slow reference loop; uint8 x uint8 is exact at 8 bits but slower. Why a scale
per token: a prompt's tokens each get the numbers they would get alone (a prefill and a decode
agree, whatever else is in the batch), and one outlier token does not coarsen the others.
Against MatMulNBits' int8 (blocks of 128 along K, activations rounded in blocks at accuracy
level 4) the weights round per column, more coarsely; the gain is speed: docs/benchmarks.md,
"The full 7B on a CPU against llama.cpp".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import LlavaError

QUANT = "w8a8"
ZERO_POINT = 128  # the activations' uint8 = the signed value + 128
WEIGHT_PEAK = 63  # 7-bit weights: the uint8 x int8 kernel's int16 pair sums cannot saturate
TINY = np.finfo(np.float32).tiny  # an all-zero row's scale: nothing to divide by zero
COLUMNS_AT_ONCE = 512  # quantize_columns' float32 working set: K x 512 (8 MiB at K = 4096)


@dataclass
class ColumnQuant:
    """A [K, N] weight as the graph stores it."""

    values: np.ndarray  # [K, N] int8, within +-WEIGHT_PEAK
    scales: np.ndarray  # [N] float32

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes


def quantize_columns(weight: np.ndarray) -> ColumnQuant:
    """Symmetric round to nearest per output column of `weight` [K, N] (float32, a transposed
    view of the checkpoint's [N, K] is fine); a column of zeros gets scale 1. Works through
    COLUMNS_AT_ONCE columns at a time, so a 7B MLP weight needs no float copy of its own."""
    depth, columns = weight.shape
    values = np.empty((depth, columns), np.int8)
    scales = np.empty(columns, np.float32)
    for start in range(0, columns, COLUMNS_AT_ONCE):
        part = slice(start, start + COLUMNS_AT_ONCE)
        chunk = weight[:, part].astype(np.float32)
        peak = np.abs(chunk).max(axis=0)
        scales[part] = np.where(peak > 0, peak / WEIGHT_PEAK, 1)
        values[:, part] = np.clip(np.round(chunk / scales[part]), -WEIGHT_PEAK, WEIGHT_PEAK)
    return ColumnQuant(values, scales)


def dequantize_columns(quant: ColumnQuant) -> np.ndarray:
    """The [K, N] float32 weight the graph's integer product stands for."""
    return quant.values.astype(np.float32) * quant.scales


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


@dataclass
class Product:
    """One rewritten linear layer: MatMulInteger -> Cast -> Mul (row scale) -> Mul (column scales)."""

    nodes: list  # the four onnx_ir Nodes, in that order
    values: object  # the int8 [K, N] weight's Value
    scales: object  # the float32 [N] column scales' Value

    @property
    def output(self):
        return self.nodes[-1].outputs[0]


class IntegerLinears:
    """Rewrites an onnx_ir graph's linear layers into the integer form above, one at a time; then
    merge_siblings() puts the layers that read one input side by side."""

    def __init__(self, graph):
        import onnx_ir as ir

        self.ir, self.graph = ir, graph
        self.quantized: dict[int, tuple] = {}  # id(x) -> (qx, scale) Values
        self.readers: dict[int, list[Product]] = {}  # id(qx) -> the products that read it
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
        quant = quantize_columns(weight)
        values = initializer(self.graph, f"{name}_w8", quant.values)
        scales = initializer(self.graph, f"{name}_scales", quant.scales)
        qx, scale = self.quantize_input(matmul.inputs[0])
        product = self.product(qx, scale, values, scales)
        self.graph.insert_before(matmul, product.nodes)
        take_over(matmul.outputs[0], product.output)
        for node in computed_by or [matmul]:
            self.graph.remove(node, safe=True)
        self.graph.initializers.pop(name)
        self.readers.setdefault(id(qx), []).append(product)
        return quant.nbytes

    def merge_siblings(self) -> None:
        """The products that read one rounded input (q, k, v; gate, up) -> one MatMulInteger over
        their weights side by side, its scaled output split back into theirs. The same numbers
        (each column keeps its own scale, the integer sums are exact), in fewer and wider kernel
        calls: what a decode step spends outside the weights' reads (docs/benchmarks.md)."""
        while self.readers:
            _, products = self.readers.popitem()
            if len(products) > 1:
                self.merge(products)

    def merge(self, products: list[Product]) -> None:
        first = products[0]
        qx, scale = first.nodes[0].inputs[0], first.nodes[2].inputs[1]
        name = sibling_name([product.values.name.removesuffix("_w8") for product in products])
        widths = [product.values.shape[1] for product in products]
        values = side_by_side(self.graph, [product.values for product in products], 1, f"{name}_w8")
        scales = side_by_side(self.graph, [product.scales for product in products], 0, f"{name}_scales")
        merged = self.product(qx, scale, values, scales)
        self.graph.insert_before(first.nodes[0], merged.nodes)
        split_back(self.graph, merged.output, [product.output for product in products], widths, name)
        for product in products:
            self.graph.remove(product.nodes, safe=True)

    def product(self, qx, scale, values, scales) -> Product:
        """The four nodes of one integer product, not yet in the graph."""
        ir = self.ir
        acc = ir.node("MatMulInteger", [qx, values, self.constant["zero_point"]])
        as_float = ir.node("Cast", [acc.outputs[0]], attributes={"to": ir.DataType.FLOAT})
        per_row = ir.node("Mul", [as_float.outputs[0], scale])
        result = ir.node("Mul", [per_row.outputs[0], scales])
        return Product([acc, as_float, per_row, result], values, scales)

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


def sibling_name(names: list[str]) -> str:
    """One name for weights stored side by side: their common dotted prefix, then each one's
    rest, e.g. 'layers.0.self_attn.q_proj.weight+k_proj.weight+v_proj.weight'."""
    parts = [name.split(".") for name in names]
    shared = 0
    while all(len(part) > shared + 1 and part[shared] == parts[0][shared] for part in parts):
        shared += 1
    prefix = ".".join(parts[0][:shared])
    return (prefix + "." if prefix else "") + "+".join(".".join(part[shared:]) for part in parts)


def take_over(old, new) -> None:
    """onnx_ir Value `new` takes `old`'s uses, name, shape and type (graph outputs too)."""
    import onnx_ir as ir

    output_name, old.name = old.name, f"{old.name}.replaced"
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    new.name, new.shape, new.type = output_name, old.shape, old.type


def side_by_side(graph, parts: list, axis: int, name: str):
    """One new initializer `name`: the initializers `parts` (onnx_ir Values) concatenated along
    `axis`, each dropped from the graph and its array freed as soon as it is copied (a 7B
    export holds one group's weights twice, not every group's)."""
    arrays = [part.const_value.numpy() for part in parts]
    array = np.concatenate(arrays, axis=axis)
    del arrays
    for part in parts:
        part.const_value = None
        graph.initializers.pop(part.name)
    return initializer(graph, name, array)


def split_back(graph, merged, olds: list, widths: list[int], name: str) -> None:
    """A Split of `merged` [..., sum(widths)] along its last axis, right after its producer, each
    part taking over one of `olds` (take_over)."""
    import onnx_ir as ir

    widths_value = initializer(graph, f"{name}_widths", np.array(widths, np.int64))
    split = ir.node("Split", [merged, widths_value], attributes={"axis": -1}, num_outputs=len(olds))
    graph.insert_after(merged.producer(), split)
    for old, part in zip(olds, split.outputs):
        take_over(old, part)
