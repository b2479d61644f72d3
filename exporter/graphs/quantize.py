"""Weight-only quantization of the decoder graph (`llava-export decoder --quant int8|int4`).

Every linear layer (q/k/v/o, the MLP, lm_head) becomes ONNX Runtime's contrib op
`com.microsoft.MatMulNBits`: its weight [K, N] is stored as 8- or 4-bit integers in blocks of
`block_size` along K, each block with its own float scale and zero point (asymmetric), and the
op dequantizes on the fly. Activations, norms, attention and the KV cache keep the graph's
float dtype; the token embeddings (embed_tokens.npy) are not touched.

Why: a decode step reads every weight once, so its time is the weight bytes over the memory
bandwidth. int8 (blocks of 128) stores ~0.26x the float32 bytes, int4 (blocks of 32) ~0.16x.

`accuracy_level` selects MatMulNBits' compute type on the CPU: 0 leaves it unset (float), 4
rounds each block of activations to int8 and uses the CPU's integer dot products
(AVX2/AVX512-VNNI). 4 is the default: unset is much slower in ONNX Runtime (docs/benchmarks.md,
"Quantization").

The quantizer reads the whole float graph into memory (2 GB for a 2-layer 7B-width decoder);
the result goes to external data when its weights exceed onnx_io.EXTERNAL_DATA_BYTES. The new
graph is written into a staging folder beside `path_out` and renamed into place, the .onnx last.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import LlavaError

MATMUL_NBITS = "MatMulNBits"

# --quant value -> bits per weight, for MatMulNBits' weight-only quantization.
QUANT_BITS = {"int8": 8, "int4": 4}
# Every --quant value -> the op its linear layers become. w8a8: integer_matmul.py.
QUANT_OPS = {"int8": MATMUL_NBITS, "int4": MATMUL_NBITS, "w8a8": "MatMulInteger"}

# Weights per scale and zero point, by bits. int4 rounds 16x coarser than int8 and needs the
# fine grid, 32, though it decodes slower than 128; int8's rounding is fine at any block size,
# and 128 decodes faster (fewer scales to read and apply). Measurements: docs/benchmarks.md,
# "Quantization". A K that is not a multiple of the block (the toy's 352-wide MLP at 128) is
# zero-padded to whole blocks by the quantizer and the op.
DEFAULT_BLOCK_SIZE = {8: 128, 4: 32}
# Accuracy level 4: int8 activations and integer dot products on the CPU; unset is much slower
# in ONNX Runtime (docs/benchmarks.md, "Quantization").
DEFAULT_ACCURACY_LEVEL = 4

# A MatMul is a linear layer when its weight is a 2-D initializer with both sides at least this
# long; smaller constant MatMuls (rotary frequency products, say) stay float.
MIN_WEIGHT_SIDE = 16


@dataclass
class QuantStats:
    """What quantize_decoder did: how many linear layers, and their weight bytes before/after."""

    bits: int
    block_size: int
    accuracy_level: int
    layers: int  # MatMuls (and Gemms) rewritten as MatMulNBits
    float_bytes: int  # their float weights
    quant_bytes: int  # packed weights + scales + zero points

    @property
    def ratio(self) -> float:
        return self.quant_bytes / self.float_bytes if self.float_bytes else 1.0

    def summary(self) -> str:
        grid = (
            f"int{self.bits} (blocks of {self.block_size}, accuracy level {self.accuracy_level})"
            if self.block_size
            else "w8a8 (a scale per output column, activations per token)"
        )
        return (
            f"{self.layers} linear layers to {grid}: {mib(self.float_bytes)} of weights -> "
            f"{mib(self.quant_bytes)} ({self.ratio:.2f}x)"
        )


def integer_stats(layers: int, float_bytes: int, quant_bytes: int) -> QuantStats:
    """QuantStats of a --quant w8a8 rewrite (no blocks, no accuracy level)."""
    return QuantStats(8, 0, 0, layers, float_bytes, quant_bytes)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:,.0f} KiB"


def bytes_per_weight(bits: int, block_size: int, scale_bytes: int = 4) -> float:
    """Stored bytes per quantized weight: the value, plus each block's scale and zero point."""
    return bits / 8 + (scale_bytes + bits / 8) / block_size


def default_block_size(bits: int, narrowest: int) -> int:
    """DEFAULT_BLOCK_SIZE[bits], or the power of two that covers the narrowest K of a model
    narrower than that (a block past K is padding, stored for nothing); >= 16: MIN_WEIGHT_SIDE."""
    return min(DEFAULT_BLOCK_SIZE[bits], 1 << (narrowest - 1).bit_length())


def quant_bits(quant: str) -> int:
    """int8 -> 8, int4 -> 4 (MatMulNBits); anything else is a user error naming --quant."""
    check_quant(quant)
    if quant not in QUANT_BITS:
        raise LlavaError(
            f"--quant {quant} has no MatMulNBits bit width (it is not one of {', '.join(QUANT_BITS)})"
        )
    return QUANT_BITS[quant]


def check_quant(quant: str) -> None:
    if quant not in QUANT_OPS:
        raise LlavaError(f"--quant must be one of {', '.join(QUANT_OPS)}, not {quant!r}")


def check_settings(bits: int, block_size: int, accuracy_level: int) -> None:
    if bits not in (4, 8):
        raise LlavaError(f"weight-only quantization takes 4 or 8 bits, not {bits}")
    # MatMulNBits' own requirement: a power of two, at least 16.
    if block_size < 16 or block_size & (block_size - 1):
        raise LlavaError(f"quantization block size must be a power of two >= 16, not {block_size}")
    if accuracy_level not in range(5):
        raise LlavaError(
            f"MatMulNBits accuracy_level is 0 (unset), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8), not {accuracy_level}"
        )


def quantize_decoder(
    path_in: str | Path,
    path_out: str | Path,
    bits: int,
    block_size: int | None = None,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    finish: Callable | None = None,
) -> QuantStats:
    """Reads the float decoder graph at `path_in` (float32 or float16, external data beside
    it) and writes the weight-only quantized graph to `path_out` (+ `.data` when big).
    `block_size` None: DEFAULT_BLOCK_SIZE[bits], or less for a model narrower than that (a
    block past K is padding, stored for nothing). `path_out` may equal `path_in`: the input is
    read completely before anything is replaced. `finish`, when given, rewrites the onnx_ir
    model in place before it is written (the static layout's fusions: one write, not two).
    Peak memory: about twice the float graph."""
    check_settings(bits, block_size or 16, accuracy_level)
    model, targets, excluded = read_float_decoder(Path(path_in))
    weights = {t.name: t for t in model.graph.initializer}
    if block_size is None:
        block_size = default_block_size(bits, min(weights[node.input[1]].dims[0] for node in targets))
    float_bytes = sum(tensor_bytes(weights[node.input[1]]) for node in targets)
    before = {t.name for t in model.graph.initializer}

    model = run_quantizer(model, bits, block_size, accuracy_level, excluded)

    added = [t for t in model.graph.initializer if t.name not in before]
    quant_bytes = sum(tensor_bytes(t) for t in added)
    layers = sum(node.op_type == MATMUL_NBITS for node in model.graph.node)
    write_quantized(with_siblings_merged(model, finish), Path(path_out))
    return QuantStats(bits, block_size, accuracy_level, layers, float_bytes, quant_bytes)


def with_siblings_merged(model, finish: Callable | None = None):
    """The ModelProto `model` after merge_sibling_nbits (then `finish`, on the onnx_ir model)."""
    import onnx_ir as ir

    graph = ir.from_proto(model)
    merge_sibling_nbits(graph.graph)
    if finish is not None:
        finish(graph)
    return ir.to_proto(graph)


def merge_sibling_nbits(graph) -> None:
    """The MatMulNBits of an onnx_ir graph that read one input with the same K, bits, block size
    and accuracy level (q, k, v; gate, up) -> one over their output columns side by side, its
    output split back into theirs. The same numbers (each column has its own blocks, scales and
    zero points, stored in rows of N), in fewer and wider kernel calls: what a decode step
    spends outside the weights' reads (docs/benchmarks.md)."""
    groups: dict[tuple, list] = {}
    for node in graph:
        if node.op_type == MATMUL_NBITS and len(node.inputs) == 4:
            attributes = {name: attribute.value for name, attribute in node.attributes.items()}
            settings = tuple(attributes.get(name) for name in ("K", "bits", "block_size", "accuracy_level"))
            groups.setdefault((id(node.inputs[0]), settings), []).append(node)
    for nodes in groups.values():
        if len(nodes) > 1:
            merge_nbits(graph, nodes)


def merge_nbits(graph, nodes: list) -> None:
    import onnx_ir as ir

    from exporter.graphs.integer_matmul import sibling_name, side_by_side, split_back

    first = nodes[0]
    bits = first.attributes["bits"].value
    name = sibling_name([node.inputs[1].name.removesuffix(f"_Q{bits}") for node in nodes])
    merged = [  # packed values, scales, zero points: each stored in rows of N
        side_by_side(graph, [node.inputs[index] for node in nodes], 0, f"{name}{suffix}")
        for index, suffix in ((1, f"_Q{bits}"), (2, "_scales"), (3, "_zero_points"))
    ]
    widths = [node.attributes["N"].value for node in nodes]
    attributes = {key: attribute.value for key, attribute in first.attributes.items()} | {"N": sum(widths)}
    node = ir.node(MATMUL_NBITS, [first.inputs[0], *merged], attributes=attributes, domain=first.domain)
    graph.insert_before(first, node)
    split_back(graph, node.outputs[0], [old.outputs[0] for old in nodes], widths, name)
    graph.remove(nodes, safe=True)


def integer_decoder(path_in: str | Path, path_out: str | Path, finish: Callable | None = None) -> QuantStats:
    """quantize_decoder's --quant w8a8: every linear layer in integer_matmul.py's form (and
    `finish` as there)."""
    import onnx
    import onnx_ir as ir
    from onnx import numpy_helper

    from exporter.graphs.integer_matmul import IntegerLinears

    proto, targets, _ = read_float_decoder(Path(path_in))
    weights = {t.name: t for t in proto.graph.initializer}
    if any(weights[node.input[1]].data_type != onnx.TensorProto.FLOAT for node in targets):
        raise LlavaError(f"{path_in} is float16: --quant w8a8 computes in float32, export without --fp16")
    targets = {node.name: node.input[1] for node in targets}
    model = ir.from_proto(proto)
    del proto
    rewriter = IntegerLinears(model.graph)
    float_bytes = quant_bytes = 0
    for node in [node for node in model.graph if node.name in targets]:
        weight = numpy_helper.to_array(weights.pop(targets[node.name]))  # [K, N]
        float_bytes += weight.nbytes
        quant_bytes += rewriter.replace(node, weight, targets[node.name])
    rewriter.merge_siblings()
    if finish is not None:
        finish(model)
    write_quantized(ir.to_proto(model), Path(path_out))
    return integer_stats(len(targets), float_bytes, quant_bytes)


def read_float_decoder(path_in: Path):
    """(the float decoder ModelProto with its weights, the MatMuls to quantize, the names of
    those to leave float), Gemms over a linear weight turned into MatMuls."""
    import onnx

    if not path_in.is_file():
        raise LlavaError(f"{path_in} does not exist: export a float decoder first (llava-export decoder)")
    model = onnx.load(str(path_in))  # with its external data
    if any(node.op_type in QUANT_OPS.values() for node in model.graph.node):
        raise LlavaError(f"{path_in} is already quantized: quantize the float32 (or float16) export")
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    if not any(i.type.tensor_type.elem_type in float_types for i in model.graph.input):
        raise LlavaError(f"{path_in} has no float32 or float16 input: not a float decoder graph")
    gemms_to_matmuls(model.graph)
    targets, excluded = linear_matmuls(model.graph)
    if not targets:
        raise LlavaError(
            f"{path_in} has no MatMul with a weight of at least {MIN_WEIGHT_SIDE}x{MIN_WEIGHT_SIDE}: nothing to quantize"
        )
    return model, targets, excluded


def write_quantized(model, path_out: Path) -> None:
    """`model` to `path_out` (its weights to external data when big), staged and checked."""
    import onnx

    from exporter.graphs import onnx_io

    external = sum(tensor_bytes(t) for t in model.graph.initializer) > onnx_io.EXTERNAL_DATA_BYTES
    path_out.parent.mkdir(parents=True, exist_ok=True)
    with onnx_io.staging(path_out.parent, f"quantize-{path_out.name}") as stage:
        staged = stage / path_out.name
        save_kwargs = (
            {
                "save_as_external_data": True,
                "all_tensors_to_one_file": True,
                "location": path_out.name + ".data",
                "size_threshold": 1024,
            }
            if external
            else {}
        )
        onnx.save_model(model, str(staged), **save_kwargs)
        del model
        onnx_io.check_graph(staged)
        onnx_io.publish(stage, path_out.parent, path_out.name)


def run_quantizer(model, bits: int, block_size: int, accuracy_level: int, excluded: list[str]):
    """ONNX Runtime's MatMulNBitsQuantizer (round to nearest, asymmetric, blocks along K; a K
    that is not a multiple of the block is zero-padded by the quantizer and the op)."""
    MatMulNBitsQuantizer = import_quantizer()
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=False,  # a zero point per block: the 4-bit grid spans each block's own [min, max]
        accuracy_level=accuracy_level or None,
        nodes_to_exclude=excluded,
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    return quantizer.model.model


def quantize_blocks(
    weight: np.ndarray, bits: int, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONNX Runtime's own block quantization of a [K, N] weight, as the quantizer stores it in
    MatMulNBits: (packed [N, K_blocks, block bytes] uint8, scales [N, K_blocks] in the weight's
    dtype, zero points [N, K_blocks] uint8 (two 4-bit ones per byte at int4))."""
    import_quantizer()
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=bits)
    return DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(weight))


def dequantize_blocks(
    packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, rows: int
) -> np.ndarray:
    """The [K, N] float32 weight MatMulNBits computes with: (q - zero point) * scale per block
    of K, the padding past `rows` = K dropped. 4-bit values and zero points pack two to a
    byte, the first in the low nibble."""
    columns, blocks, _ = packed.shape
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(columns, blocks, -1)
        zero = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(columns, -1)[:, :blocks]
    else:
        q, zero = packed, zero_points[:, :blocks]
    values = (q.astype(np.float32) - zero[..., None]) * scales.astype(np.float32)[
        ..., None
    ]  # [N, blocks, block]
    return np.ascontiguousarray(values.reshape(columns, -1)[:, :rows].T)


def fake_quantized(weight: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """`weight` [K, N] after a round trip through MatMulNBits' storage, in its own dtype."""
    packed, scales, zero_points = quantize_blocks(weight, bits, block_size)
    return dequantize_blocks(packed, scales, zero_points, bits, weight.shape[0]).astype(weight.dtype)


def graph_settings(path: str | Path) -> tuple[int, int]:
    """(bits, block_size) of the MatMulNBits in a quantized graph (read without its weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    settings = set()
    for node in model.graph.node:
        if node.op_type == MATMUL_NBITS:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            settings.add((attrs["bits"], attrs["block_size"]))
    if len(settings) != 1:
        raise LlavaError(
            f"{path} is not a decoder quantized by llava-export (MatMulNBits settings: {sorted(settings) or 'none'})"
        )
    return settings.pop()


def reference_rounding(path: str | Path, quant: str) -> Callable[[np.ndarray], np.ndarray]:
    """What the quantized decoder at `path` does to a [K, N] weight (for quantized_linears)."""
    from exporter.graphs import integer_matmul

    if quant == integer_matmul.QUANT:
        return integer_matmul.fake_quantized
    bits, block_size = graph_settings(path)
    return functools.partial(fake_quantized, bits=bits, block_size=block_size)


@contextlib.contextmanager
def quantized_linears(module, round_trip: Callable[[np.ndarray], np.ndarray]):
    """Within the block, every linear layer of `module` that quantize_decoder would quantize
    computes with its weights as the quantized graph holds them (`round_trip` of each [K, N]
    weight: reference_rounding's): the PyTorch reference for a quantized graph, so parity
    measures the graph, not the rounding. The original Parameter objects are put back
    afterwards (tied weights stay tied: nothing is written in place)."""
    import torch

    swapped = []
    try:
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear) and min(layer.weight.shape) >= MIN_WEIGHT_SIDE:
                weight = layer.weight.detach()
                kn = (
                    weight.T.float().numpy() if weight.dtype == torch.bfloat16 else weight.T.numpy()
                )  # [K, N], as the graph
                new = torch.from_numpy(round_trip(kn).T.copy()).to(weight.dtype)
                swapped.append((layer, layer.weight))
                layer.weight = torch.nn.Parameter(new, requires_grad=False)
        yield module
    finally:
        for layer, original in swapped:
            layer.weight = original


def import_quantizer():
    """ONNX Runtime's MatMulNBitsQuantizer, imported without its side effect: the module calls
    logging.basicConfig(level=INFO) on import, which would print every library's INFO chatter
    (onnxscript's optimizer, for one) for the rest of the process. The root logger is put back."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.setLevel(level)
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(
        logging.WARNING
    )  # a line per node
    return MatMulNBitsQuantizer


def tensor_bytes(tensor) -> int:
    """Stored bytes of an initializer (loaded, not external)."""
    if tensor.raw_data:
        return len(tensor.raw_data)
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor).nbytes


def weight_shape(graph, name: str) -> list[int] | None:
    for tensor in graph.initializer:
        if tensor.name == name:
            return list(tensor.dims)
    return None


def is_linear_weight(shape: list[int] | None) -> bool:
    return shape is not None and len(shape) == 2 and min(shape) >= MIN_WEIGHT_SIDE


def linear_matmuls(graph) -> tuple[list, list[str]]:
    """(MatMuls to quantize, names of the MatMuls with constant weights to leave float).
    Unnamed MatMuls get a name, so the quantizer's exclusion list can name them."""
    targets, excluded = [], []
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMul":
            continue
        if not node.name:
            node.name = f"matmul_{index}"
        if is_linear_weight(weight_shape(graph, node.input[1])):
            targets.append(node)
        else:
            excluded.append(node.name)
    return targets, excluded


def gemms_to_matmuls(graph) -> int:
    """Gemm(A, W, C, transB=1) -> MatMul(A, W^T) (+ Add C): the exporter writes lm_head at the
    last position (a 2-D input) as a Gemm, and the quantizer takes MatMuls only. Gemms that are
    not a plain linear layer (alpha, beta != 1, transA) are left alone."""
    from onnx import helper, numpy_helper

    weights = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    rewritten = 0
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = weights.get(node.input[1]) if node.op_type == "Gemm" else None
        plain = (
            attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        )
        if (
            weight is None
            or not plain
            or not is_linear_weight(list(weight.dims))
            or consumers[weight.name] != 1
        ):
            nodes.append(node)
            continue
        array = numpy_helper.to_array(weight)  # [N, K] with transB, as nn.Linear stores it
        if attrs.get("transB", 0):
            array = np.ascontiguousarray(array.T)
        graph.initializer.remove(weight)
        graph.initializer.append(numpy_helper.from_array(array, weight.name))
        name = node.name or f"gemm_{rewritten}"
        has_bias = len(node.input) > 2 and node.input[2]
        product = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(
            helper.make_node("MatMul", [node.input[0], weight.name], [product], name=name + "_matmul")
        )
        if has_bias:
            nodes.append(
                helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=name + "_bias")
            )
        rewritten += 1
    if rewritten:
        graph.ClearField("node")
        graph.node.extend(nodes)
    return rewritten
