"""A quantized decoder that never holds the float model (`llava-export decoder --quant
int4|int8|w8a8` without --fp16): float32 activations around int4/int8 weights, within a few GB
of memory for a 7B checkpoint.

    1. the decoder is traced with placeholder weights (a CPU tensor of each weight's shape
       that stores one value): the graph, with no weight in memory;
    2. each linear layer (Transpose(W) -> MatMul, or Gemm(x, W, transB=1) for lm_head) becomes
       MatMulNBits (int4, int8: the same block quantizer as quantize.py) or w8a8's
       MatMulInteger (integer_matmul.py), its weight W [N, K] read from its checkpoint shard
       and dropped before the next one is read;
    3. the remaining initializers (norm weights, the rotary inv_freq) are filled in: they are
       small;
    4. the graph is optimized (constant folding, as the float export's), the static layout's
       norms and rotary fused (fusions.py), and saved.

MatMulNBits stores its weight per output column N in blocks along K: the rows of W as the
checkpoint holds them, so no transposed copy is made (MatMulInteger takes [K, N]: one weight's
int8 copy). On the tiny models the result is bit-for-bit the graph of the float export
quantized afterwards (tests/test_streamed.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from exporter.graphs import fusions, integer_matmul, onnx_io, quantize
from exporter.progress import Progress
from exporter.source import iter_checkpoint
from runtime.errors import SourceError

MICROSOFT = "com.microsoft"
LM_HEAD, EMBEDDINGS = "lm_head.weight", "model.language_model.embed_tokens.weight"


class CheckpointTensors:
    """The tensors of a checkpoint's shards by the reference model's names (`name_of` maps a
    checkpoint key to one, or None to leave it out), each read from its shard when asked for."""

    def __init__(self, files: list[Path], name_of: Callable[[str], str | None]):
        self.where: dict[str, tuple[Path, str]] = {}
        self.bins: dict[Path, dict[str, torch.Tensor]] = {}  # .bin shards, memory-mapped once each
        self.add(files, name_of)

    def add(self, files: list[Path], name_of: Callable[[str], str | None]) -> None:
        """Indexes more shards, with their own `name_of`; a name they share with shards indexed
        before is read from these (the original format's fine-tuned tower in the checkpoint over
        the separate CLIP checkpoint, as the loaded source has it)."""
        for file in files:
            for key in self.keys(file):
                name = name_of(key)
                if name is not None:
                    self.where[name] = (file, key)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name == LM_HEAD and name not in self.where:  # tied: lm_head is the token embeddings
            name = EMBEDDINGS
        if name not in self.where:
            raise SourceError(f"the checkpoint has no weight for {name}")
        file, key = self.where[name]
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                return handle.get_tensor(key)
        return self.bins[file][key].clone()  # a copy: the page-cache mapping is dropped with it

    def keys(self, file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                return list(handle.keys())
        self.bins[file] = dict(iter_checkpoint(file))  # memory-mapped: nothing is read yet
        return list(self.bins[file])


def trace_without_weights(module, sample: tuple, graph) -> object:
    """The graph of `module` (its weights on the meta device) as an onnx_ir model, unoptimized:
    constant folding reads values, and a placeholder has none of its own. Each meta parameter
    and buffer is traced as a placeholder (placeholders()): the static layout's
    GroupQueryAttention node, a symbolic op, makes its outputs on the CPU and cannot be traced
    beside meta tensors."""
    inputs, outputs = graph.io_spec()
    return onnx_io.trace_to_onnx(
        placeholders(module),
        sample,
        dynamic_shapes=graph.dynamic_shapes(),
        input_names=list(inputs),
        output_names=list(outputs),
        opset=graph.options.opset,
        optimize=False,
    ).model


def placeholders(module):
    """`module` with each meta parameter and buffer replaced by a CPU tensor of its shape and
    dtype that stores one value (stride 0): a 7B decoder's take no memory. is_placeholder tells
    them apart in the traced graph, whose initializers still hold them."""
    for owner in module.modules():
        for name, tensor in list(owner.named_parameters(recurse=False)):
            if tensor.is_meta:
                owner._parameters[name] = torch.nn.Parameter(placeholder(tensor), requires_grad=False)
        for name, tensor in list(owner.named_buffers(recurse=False)):
            if tensor.is_meta:
                owner._buffers[name] = placeholder(tensor)
    return module


def placeholder(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.numel() < 2:  # is_placeholder could not tell it from a real one-element weight
        raise SourceError(
            f"a weight of shape {tuple(tensor.shape)} cannot be streamed: export without --quant"
        )
    return torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)


def write_streamed_decoder(graph, stage: Path, progress: Progress) -> Path:
    """stage/<graph.file>: `graph` (a DecoderGraph on a source loaded with stream_decoder)
    traced without its weights, its linear layers quantized as they are read. Returns the path."""
    import onnxscript

    source, options = graph.source, graph.options
    with progress.stage(f"tracing the decoder graph without its weights ({graph.trace_details()})"):
        model = trace_without_weights(graph.module(), graph.sample_inputs(), graph)
    linears = [found for node in model.graph if (found := linear_weight(node, model.graph))]
    values = named_values(source)
    with progress.stage(
        f"quantizing the linear layers to {options.quant} as they are read ({quantize.QUANT_OPS[options.quant]})"
    ):
        if options.quant == integer_matmul.QUANT:
            stats = integer_linears(model, linears, values)
        else:
            bits = quantize.quant_bits(options.quant)
            narrowest = min(model.graph.initializers[name].shape[1] for name, _, _ in linears)  # K
            block_size = options.block_size or quantize.default_block_size(bits, narrowest)
            stats = quantize_linears(
                model, linears, values, bits, block_size, quantize.DEFAULT_ACCURACY_LEVEL
            )
        fill_initializers(model, values)
    progress.say(f"  {stats.summary()}")
    with progress.stage("optimizing the graph"):
        onnxscript.optimizer.optimize(model)
    if graph.static:
        with progress.stage(fusions.STAGE):
            counts = fusions.fuse_static_decoder(model, graph.rotary_caches())
        progress.say(f"  {fusions.summary(counts)}")
    with progress.stage("saving and checking the graph"):
        path = stage / graph.file
        save_model(model, path)
        del model
        onnx_io.check_graph(path)
    return path


def named_values(source) -> Callable[[str], np.ndarray]:
    """A graph initializer's name (DecoderWithPast's parameter names) -> its float32 value:
    weights from the checkpoint, buffers (rotary inv_freq) computed by a fresh CPU module."""
    buffers = real_buffers(source)

    def value(name: str) -> np.ndarray:
        if name in buffers:
            return buffers[name]
        reference = "model." + name if name.startswith("language_model.") else name
        return source.tensors.get(reference).float().numpy()

    return value


def real_buffers(source) -> dict[str, np.ndarray]:
    """The decoder's non-persistent buffers (rotary inv_freq), which a meta model does not hold,
    from a CPU instance of the rotary module."""
    language_model = source.model.model.language_model
    rotary = type(language_model.rotary_emb)(config=language_model.config)
    return {
        f"language_model.rotary_emb.{name}": buffer.float().numpy() for name, buffer in rotary.named_buffers()
    }


def quantize_linears(
    model, linears, values, bits: int, block_size: int, accuracy_level: int
) -> quantize.QuantStats:
    """Each of `linears` (linear_weight's finds) -> MatMulNBits, one weight in memory at a time."""
    graph = model.graph
    float_bytes = quant_bytes = layers = 0
    for weight_name, matmul, removed in linears:
        weight = values(weight_name)  # [N, K] float32
        columns, depth = weight.shape
        packed, scales, zero_points = quantize.quantize_blocks(
            np.ascontiguousarray(weight.T), bits, block_size
        )  # the block quantizer takes [K, N]
        float_bytes += weight.nbytes
        quant_bytes += packed.nbytes + scales.nbytes + zero_points.nbytes
        del weight
        constants = [
            integer_matmul.initializer(graph, f"{weight_name}_Q{bits}", packed),
            integer_matmul.initializer(graph, f"{weight_name}_scales", scales),
            integer_matmul.initializer(graph, f"{weight_name}_zero_points", zero_points),
        ]
        replace_with_matmul_nbits(graph, matmul, constants, depth, columns, bits, block_size, accuracy_level)
        for node_gone in removed:
            graph.remove(node_gone, safe=True)
        graph.initializers.pop(weight_name)
        layers += 1
    quantize.merge_sibling_nbits(graph)
    model.opset_imports[MICROSOFT] = 1
    return quantize.QuantStats(bits, block_size, accuracy_level, layers, float_bytes, quant_bytes)


def integer_linears(model, linears, values) -> quantize.QuantStats:
    """Each of `linears` -> the integer form of integer_matmul.py, one weight in memory at a time."""
    rewriter = integer_matmul.IntegerLinears(model.graph)
    float_bytes = quant_bytes = 0
    for weight_name, matmul, removed in linears:
        weight = values(weight_name)  # [N, K] float32
        float_bytes += weight.nbytes
        quant_bytes += rewriter.replace(matmul, weight.T, weight_name, removed)  # a view: [K, N]
        del weight
    rewriter.merge_siblings()
    return quantize.integer_stats(len(linears), float_bytes, quant_bytes)


def linear_weight(node, graph):
    """(weight name, the node computing x @ W^T, the nodes to remove) when `node` is a linear
    layer over an initializer W [N, K] of at least MIN_WEIGHT_SIDE on both sides, else None."""
    if node.op_type == "Transpose" and is_weight(node.inputs[0], graph):
        users = node.outputs[0].uses()
        if len(users) == 1 and users[0].node.op_type == "MatMul" and users[0].idx == 1:
            return node.inputs[0].name, users[0].node, [users[0].node, node]
    if node.op_type == "Gemm" and len(node.inputs) == 2 and is_weight(node.inputs[1], graph):
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        if (
            attributes.get("transB") == 1
            and not attributes.get("transA")
            and attributes.get("alpha", 1.0) == 1.0
        ):
            return node.inputs[1].name, node, [node]
    return None


def is_weight(value, graph) -> bool:
    return (
        value is not None
        and value.name in graph.initializers
        and value.shape is not None
        and len(value.shape) == 2
        and min(value.shape.numpy()) >= quantize.MIN_WEIGHT_SIDE
    )


def replace_with_matmul_nbits(
    graph, matmul, constants, depth, columns, bits, block_size, accuracy_level
) -> None:
    """A MatMulNBits on the linear's input in place of `matmul`, its output taking the old one's
    uses and name (a graph output keeps its name: logits)."""
    import onnx_ir as ir

    attributes = {
        "K": depth,
        "N": columns,
        "bits": bits,
        "block_size": block_size,
        "accuracy_level": accuracy_level,
    }
    node = ir.node("MatMulNBits", [matmul.inputs[0], *constants], attributes=attributes, domain=MICROSOFT)
    graph.insert_before(matmul, node)
    integer_matmul.take_over(matmul.outputs[0], node.outputs[0])


def fill_initializers(model, values) -> None:
    """Every initializer still without a value (norm weights, inv_freq) gets its real one."""
    import onnx_ir as ir

    for name, value in model.graph.initializers.items():
        if is_placeholder(value.const_value):
            value.const_value = ir.tensor(values(name), name=name)


def is_placeholder(tensor) -> bool:
    """An initializer traced from placeholders(): a torch tensor whose elements share one value
    (a real weight of one element is not one: it is held as is)."""
    raw = getattr(tensor, "raw", None)
    return torch.is_tensor(raw) and raw.numel() > 1 and not any(raw.stride())


def save_model(model, path: Path) -> None:
    """The graph and its weights (external data beside it when over onnx_io.EXTERNAL_DATA_BYTES)."""
    import onnx_ir as ir

    weights = sum(value.const_value.nbytes for value in model.graph.initializers.values())
    if weights > onnx_io.EXTERNAL_DATA_BYTES:
        ir.save(model, path, external_data=path.name + ".data")
    else:
        ir.save(model, path)
