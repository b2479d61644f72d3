"""vision.onnx against transformers' LlavaForConditionalGeneration.get_image_features.

The reference is transformers' own model (read from the HF folder), not our VisionEncoder
wrapper: a wrong feature layer, CLS handling or projector in the wrapper must fail here.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exporter.parity import assert_parity, compare  # noqa: E402
from exporter.testing.tiny import TinyConfig  # noqa: E402
from runtime import contract  # noqa: E402
from tests.support.graphs import FP16_MIN_COSINE, FP32_ATOL, float16_graph_problems, pixels, run_vision  # noqa: E402

DEFAULT = TinyConfig()

# Each select layer, strategy and projector at least once (not the full product). Projectors
# other than mlp2x_gelu exist only in the original format.
GRID = {
    "layer-2_default_mlp2x_hf": (TinyConfig(), "hf"),
    "layer-1_full_mlp2x_hf": (TinyConfig(select_layer=-1, select_strategy="full"), "hf"),
    "layer-3_default_linear_original": (TinyConfig(select_layer=-3, projector="linear"), "original"),
    "layer-1_full_mlp3x_original": (
        TinyConfig(select_layer=-1, select_strategy="full", projector="mlp3x_gelu"),
        "original",
    ),
    "layer-2_full_linear_original": (TinyConfig(select_strategy="full", projector="linear"), "original"),
}


def reference_features(model, pixel_values: torch.Tensor) -> np.ndarray:
    """[B, N_img, hidden] from transformers, with the layer and strategy of the model's config."""
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values).pooler_output  # one per image
    return torch.stack(list(features)).numpy()


def test_fp32_batches_1_and_3(workshop):
    folder = workshop.artifacts(DEFAULT, graphs=("vision",))
    reference = workshop.reference(DEFAULT)
    results = []
    for batch in (1, 3):
        pix = pixels(DEFAULT, batch, seed=batch)
        results.append(
            compare(
                f"image_embeds batch {batch}",
                run_vision(folder, pix.numpy()),
                reference_features(reference, pix),
                atol=FP32_ATOL,
            )
        )
    assert_parity(results, "vision.onnx float32 vs get_image_features")


def test_fp32_rows_are_independent(workshop):
    """Image i of a batch gives what it gives alone (no cross-batch mixing in the graph)."""
    folder = workshop.artifacts(DEFAULT, graphs=("vision",))
    pix = pixels(DEFAULT, 3, seed=7).numpy()
    together = run_vision(folder, pix)
    results = [
        compare(f"image {i}", run_vision(folder, pix[i : i + 1])[0], together[i], atol=FP32_ATOL)
        for i in range(3)
    ]
    assert_parity(results, "vision.onnx batch rows vs single images")


def test_fp16_cosine_per_image_token(workshop):
    folder = workshop.artifacts(DEFAULT, fp16=True, graphs=("vision",))
    reference = workshop.reference(DEFAULT)
    results = []
    for batch in (1, 3):
        pix = pixels(DEFAULT, batch, seed=batch)
        actual = run_vision(folder, pix.numpy())
        assert actual.dtype == np.float16
        results.append(
            compare(
                f"image_embeds batch {batch}",
                actual,
                reference_features(reference, pix),
                min_cosine=FP16_MIN_COSINE,
            )
        )
    assert_parity(results, "vision.onnx float16 vs float32 get_image_features")


@pytest.mark.parametrize("case", list(GRID))
def test_grid(workshop, case):
    config, fmt = GRID[case]
    folder = workshop.artifacts(config, fmt=fmt, graphs=("vision",))
    manifest = contract.read_manifest(folder)
    pix = pixels(config, 2, seed=3)
    actual = run_vision(folder, pix.numpy())
    expected = reference_features(workshop.reference(config), pix)
    patches = (config.image_size // config.patch_size) ** 2
    assert expected.shape[1] == patches + (config.select_strategy == "full")
    assert manifest.vision.num_image_tokens == expected.shape[1]
    assert manifest.vision.projector == config.projector
    assert_parity([compare(contract.IMAGE_EMBEDS, actual, expected, atol=FP32_ATOL)], f"vision.onnx {case}")


# ---------------------------------------------------------------------------------------------
# The float16 graph itself


def test_fp16_graph_is_float16_with_safe_normalizations(workshop):
    folder = workshop.artifacts(DEFAULT, fp16=True, graphs=("vision",))
    model = onnx.load(str(folder / contract.VISION_FILE))
    assert contract.read_manifest(folder).graphs["vision"].dtype == "float16"
    assert any(n.op_type == "Softmax" for n in model.graph.node) and any(
        n.op_type == "LayerNormalization" for n in model.graph.node
    )
    assert float16_graph_problems(model) == []
    output = model.graph.output[0]
    assert (output.name, output.type.tensor_type.elem_type) == (contract.IMAGE_EMBEDS, TensorProto.FLOAT16)


def test_float16_check_catches_an_unsafe_graph(workshop):
    """The check above can fail: a float32 graph, and a float16 Softmax, are both reported."""
    model = onnx.load(str(workshop.artifacts(DEFAULT, graphs=("vision",)) / contract.VISION_FILE))
    assert any("is FLOAT" in p for p in float16_graph_problems(model))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4])
    weight = helper.make_tensor("w", TensorProto.FLOAT16, [4], [1.0] * 4)
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["m"], name="mul"),
        helper.make_node("Softmax", ["m"], ["y"], name="sm"),
    ]
    unsafe = helper.make_model(helper.make_graph(nodes, "unsafe", [x], [y], [weight]))
    assert float16_graph_problems(unsafe) == ["Softmax sm runs in FLOAT16, not FLOAT"]
