"""Running exported graphs directly in ONNX Runtime, seeded inputs, and graph inspection.

Needs torch (the seeded inputs are torch tensors, as the references take them): a test module
importing this is skipped where torch is not installed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from runtime import contract  # noqa: E402

# The graph dtypes' gates these tests hold artifacts to (the issues' numbers).
FP32_ATOL = 1e-4
FP16_MIN_COSINE = 0.999


# ---------------------------------------------------------------------------------------------
# Running artifacts


@functools.cache
def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_vision(folder: Path, pixels: np.ndarray) -> np.ndarray:
    graph = session(folder / contract.VISION_FILE)
    dtype = np.float16 if graph.get_inputs()[0].type == "tensor(float16)" else np.float32
    return graph.run(None, {contract.PIXEL_VALUES: pixels.astype(dtype)})[0]


def embeddings(folder: Path) -> np.ndarray:
    """embed_tokens.npy as the runtime reads it."""
    return np.load(folder / contract.EMBEDDINGS_FILE, mmap_mode="r")


def empty_past(folder: Path, batch: int) -> list[np.ndarray]:
    """Past inputs of length 0, [B, kv_heads, 0, head_dim] each, in graph order."""
    manifest = contract.read_manifest(folder)
    dtype = np.float16 if manifest.graphs["decoder"].dtype == "float16" else np.float32
    shape = (batch, manifest.text.num_kv_heads, 0, manifest.text.head_dim)
    return [np.zeros(shape, dtype) for _ in range(2 * manifest.text.num_layers)]


def run_decoder(
    folder: Path, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]
):
    """One decoder.onnx call: returns (logits [B,vocab], presents [k0, v0, k1, v1, ...])."""
    graph = session(folder / contract.DECODER_FILE)
    names = [i.name for i in graph.get_inputs()]
    feed = {
        contract.INPUTS_EMBEDS: embeds.astype(past[0].dtype),
        contract.ATTENTION_MASK: mask.astype(np.int64),
    }
    feed[contract.POSITION_IDS] = positions.astype(np.int64)
    feed.update(dict(zip(names[3:], past)))
    logits, *presents = graph.run(None, feed)
    return logits, presents


def cache_tensors(cache) -> list[np.ndarray]:
    """A transformers cache's tensors in graph order: [k0, v0, k1, v1, ...]."""
    tensors = []
    for layer in cache.layers:
        tensors += [layer.keys.numpy(), layer.values.numpy()]
    return tensors


def pixels(config, batch: int, seed: int = 0) -> torch.Tensor:
    """Seeded, normalized-looking pixel values [B,3,H,W] (different from the exporter's own)."""
    generator = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(batch, 3, config.image_size, config.image_size, generator=generator)


def token_ids(count: int, seed: int, vocab: int = 320) -> list[int]:
    """Random ordinary token ids (never 0-2: <unk>, which references use as image token, <s>, </s>)."""
    generator = torch.Generator().manual_seed(2000 + seed)
    return torch.randint(3, vocab, (count,), generator=generator).tolist()


# ---------------------------------------------------------------------------------------------
# Inspecting graphs


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named value (inputs, outputs, initializers, inferred)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


# Buffers PyTorch keeps in float32 in a float16 model (rotary frequencies), rightly.
FLOAT32_BUFFERS = ("inv_freq",)


def float16_graph_problems(model: onnx.ModelProto) -> list[str]:
    """What keeps a float16 graph from being float16 throughout, with safe normalizations."""
    graph = model.graph
    problems = []
    weights = [
        t
        for t in graph.initializer
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE) and len(t.dims)
    ]
    weights = [t for t in weights if not t.name.endswith(FLOAT32_BUFFERS)]
    problems += [
        f"initializer {t.name} is {TensorProto.DataType.Name(t.data_type)}"
        for t in weights
        if t.data_type != TensorProto.FLOAT16
    ]
    if not weights:
        problems.append("no floating-point weights at all")
    for value in graph.input:
        if value.name in (contract.PIXEL_VALUES, contract.INPUTS_EMBEDS) or value.name.startswith(
            "past_key_values."
        ):
            if value.type.tensor_type.elem_type != TensorProto.FLOAT16:
                problems.append(f"input {value.name} is not float16")
    types = value_types(model)
    for node in graph.node:
        if node.op_type == "LayerNormalization":
            stash = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("stash_type", 1)
            if stash != 1 and types.get(node.input[0]) != TensorProto.FLOAT:
                problems.append(
                    f"LayerNormalization {node.name} computes its statistics in float16 (stash_type {stash})"
                )
        if node.op_type == "Softmax" and types.get(node.input[0]) != TensorProto.FLOAT:
            # fp16 exp/sum over long rows loses the small probabilities (or overflows): PyTorch's
            # reference upcasts here, so must the graph.
            problems.append(
                f"Softmax {node.name} runs in {TensorProto.DataType.Name(types.get(node.input[0], 0))}, not FLOAT"
            )
    return problems


def weights(model) -> dict:
    """A model's persistent tensors by name, without the derived ones (rotary inv_freq, CLIP's position_ids)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith(("inv_freq", "position_ids"))}


def assert_same_weights(a, b) -> None:
    """The same tensor names and every tensor bit for bit equal."""
    sa, sb = weights(a), weights(b)
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors differ: {different[:5]}"
