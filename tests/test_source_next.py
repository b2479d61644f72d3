"""LLaVA-1.6 (LLaVA-NeXT, "anyres") sources: both checkpoint formats load as transformers'
LlavaNextForConditionalGeneration, export with image_newline.npy and a version 2 manifest, and
what LLaVA-1.6's code cannot run is refused in one line naming what to fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exporter.source import SUPPORTED_FAMILIES, load_source  # noqa: E402
from exporter.testing.original_format import write_clip_tower  # noqa: E402
from exporter.testing.tiny import TinyConfig, build_tiny_model  # noqa: E402
from runtime import contract  # noqa: E402
from runtime.contract import AnyresSpec  # noqa: E402
from runtime.errors import SourceError  # noqa: E402
from tests.support.cli import assert_user_error, invoke  # noqa: E402
from tests.support.graphs import FP32_ATOL, assert_same_weights, run_vision  # noqa: E402

# transformers' default pinpoints (336-pixel tiles) scaled to the tiny 32-pixel tile, and a list
# that is not symmetric in height and width: swapping the original's pairs shows on it.
DEFAULT_PINPOINTS = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))
LOPSIDED_PINPOINTS = ((32, 64), (64, 96))
NEXT = TinyConfig(anyres=DEFAULT_PINPOINTS)
LOPSIDED = TinyConfig(anyres=LOPSIDED_PINPOINTS)
DEFAULT = TinyConfig()
IMAGE_SIZE = [50, 90]  # (height, width) of the image the tiles come from: 64 x 96 of LOPSIDED's


def edited_copy(folder: Path, target: Path, file: str = "config.json", **changes) -> Path:
    """A copy of a model folder whose JSON `file` has `changes` (None deletes a key)."""
    shutil.copytree(folder, target)
    path = target / file
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return target


def spec_of(config: TinyConfig) -> AnyresSpec:
    return AnyresSpec([list(point) for point in config.anyres], tile_size=config.image_size)


def tiles(config: TinyConfig, image_size=IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    """Seeded pixel values for the tiles of one image of `image_size`, base tile first: [N,3,S,S]."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    count = image_size_to_num_patches(image_size, [list(p) for p in config.anyres], config.image_size)
    generator = torch.Generator().manual_seed(3000 + seed)
    return torch.randn(count, 3, config.image_size, config.image_size, generator=generator)


# ---------------------------------------------------------------------------------------------
# Loading both formats


@pytest.mark.parametrize("fmt", ["hf", "original"])
@pytest.mark.parametrize("config", [NEXT, LOPSIDED], ids=["default_pinpoints", "lopsided_pinpoints"])
def test_both_formats_load_the_reference(workshop, config, fmt):
    from transformers import LlavaNextForConditionalGeneration

    source = load_source(str(workshop.tiny(config)[fmt]))
    assert source.format == fmt and isinstance(source.model, LlavaNextForConditionalGeneration)
    assert_same_weights(source.model, workshop.reference(config))
    assert source.anyres == spec_of(config)  # HF's (height, width), the original's swapped back
    assert source.model.config.image_grid_pinpoints == source.anyres.grid_pinpoints
    assert source.vision.select_strategy == "default" and source.vision.num_image_tokens == 16
    assert source.preprocess == config.preprocess and source.preprocess.aspect == "crop"
    assert source.template == "vicuna_v1" and not source.model.training


def test_original_pinpoints_are_width_first_and_swapped_in_order(workshop, tmp_path):
    original = workshop.tiny(LOPSIDED)["original"]
    written = json.loads((original / "config.json").read_text())["image_grid_pinpoints"]
    assert written == [[64, 32], [96, 64]]
    as_string = edited_copy(original, tmp_path / "string", image_grid_pinpoints="[(64, 32), (96, 64)]")
    assert load_source(str(as_string)).anyres == spec_of(LOPSIDED)


def test_original_image_features_are_the_hf_models(workshop):
    """The whole LLaVA-1.6 image path (the tiles' grid picked from the pinpoints, unpadded, a
    newline per row) gives the same features from either format: the pinpoints are swapped right."""
    hf = load_source(str(workshop.tiny(LOPSIDED)["hf"])).model
    original = load_source(str(workshop.tiny(LOPSIDED)["original"])).model
    pixel_values, sizes = tiles(LOPSIDED)[None], torch.tensor([IMAGE_SIZE])
    with torch.no_grad():
        expected = hf.get_image_features(pixel_values=pixel_values, image_sizes=sizes).pooler_output[0]
        actual = original.get_image_features(pixel_values=pixel_values, image_sizes=sizes).pooler_output[0]
    # the base tile's 16, then a 2 x 3 grid of 4 x 4 patches unpadded to 6 rows of 12, each + newline
    assert torch.equal(actual, expected) and expected.shape == (16 + 6 * (12 + 1), 64)


@pytest.mark.parametrize("fmt", ["hf", "original"])
@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_families(workshop, family, fmt):
    config = TinyConfig(family=family, tie_embeddings=family == "qwen2", anyres=DEFAULT_PINPOINTS)
    source = load_source(str(workshop.tiny(config)[fmt]))
    assert (
        source.text.family == family
        and source.template
        == {
            "llama": "vicuna_v1",
            "mistral": "mistral_instruct",
            "qwen2": "chatml",
        }[family]
    )
    assert_same_weights(source.model, workshop.reference(config))


def test_fine_tuned_tower_comes_from_the_checkpoint(workshop, tmp_path):
    """LLaVA-1.6 fine-tuned its tower (unfreeze_mm_vision_tower): the original repo builds the
    tower of mm_vision_tower, then loads the checkpoint's weights over it."""
    other = tmp_path / "other-clip"
    write_clip_tower(build_tiny_model(TinyConfig(anyres=DEFAULT_PINPOINTS, seed=1)), other, NEXT.preprocess)
    model = edited_copy(workshop.tiny(NEXT)["original"], tmp_path / "model", mm_vision_tower=str(other))
    assert_same_weights(load_source(str(model)).model, workshop.reference(NEXT))

    frozen = edited_copy(model, tmp_path / "frozen", unfreeze_mm_vision_tower=None)
    tower = load_source(str(frozen)).model.model.vision_tower
    expected = build_tiny_model(TinyConfig(anyres=DEFAULT_PINPOINTS, seed=1)).model.vision_tower
    assert_same_weights(tower, expected)


def test_image_newline_must_be_in_the_checkpoint(workshop, tmp_path):
    from safetensors.torch import load_file, save_file

    model = edited_copy(workshop.tiny(NEXT)["original"], tmp_path / "model")
    weights = load_file(model / "model.safetensors")
    assert "model.image_newline" in weights
    del weights["model.image_newline"]
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SourceError, match="missing from the checkpoint, e.g. model.image_newline"):
        load_source(str(model))


# ---------------------------------------------------------------------------------------------
# `llava-export all`


@pytest.mark.parametrize("fmt", ["hf", "original"])
def test_all_writes_the_newline_and_a_version_2_manifest(workshop, tmp_path, fmt):
    out = tmp_path / "out"
    result = invoke("all", "--model", workshop.tiny(NEXT)[fmt], "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert (
        "LLaVA-1.6 (anyres): 5 pinpoints of 32-pixel tiles, up to 5 tiles and 88 tokens an image"
        in result.output
    )
    reference = workshop.reference(NEXT)

    newline = np.load(out / contract.IMAGE_NEWLINE_FILE)
    assert newline.dtype == np.float32 and np.array_equal(newline, reference.model.image_newline.numpy())
    data = json.loads((out / contract.MANIFEST_FILE).read_text())
    assert data["format_version"] == contract.ANYRES_FORMAT_VERSION == 2
    assert data["anyres"] == {
        "grid_pinpoints": [list(point) for point in DEFAULT_PINPOINTS],
        "tile_size": 32,
        "merge": "spatial_unpad",
        "newline_file": contract.IMAGE_NEWLINE_FILE,
    }
    manifest = contract.read_manifest(out)
    assert manifest.anyres == spec_of(NEXT) and manifest.source["format"] == fmt
    assert manifest.graphs["vision"].inputs[contract.PIXEL_VALUES] == ["batch", 3, 32, 32]

    for count in (spec_of(NEXT).max_tiles, 3):  # the batch is dynamic: an image's tiles
        pixel_values = tiles(NEXT, seed=count)[:count]
        with torch.no_grad():
            hidden = reference.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]
            expected = reference.model.multi_modal_projector(hidden[:, 1:]).numpy()
        actual = run_vision(out, pixel_values.numpy())
        assert actual.shape == (count, 16, 64)
        np.testing.assert_allclose(actual, expected, atol=FP32_ATOL)


def test_artifacts_give_the_hf_models_image_features(workshop):
    """vision.onnx on an image's tiles, packed with image_newline.npy as transformers packs
    them, is LlavaNext's own image features: the artifacts hold all of the model's image path."""
    folder = workshop.artifacts(LOPSIDED, graphs=("vision",))
    reference = workshop.reference(LOPSIDED)
    pixel_values, sizes = tiles(LOPSIDED), torch.tensor([IMAGE_SIZE])
    features = torch.from_numpy(run_vision(folder, pixel_values.numpy()))
    newline = torch.from_numpy(np.load(folder / contract.IMAGE_NEWLINE_FILE))
    with torch.no_grad():
        packed, _ = reference.model.pack_image_features([features], sizes, "default", image_newline=newline)
        expected = reference.get_image_features(pixel_values=pixel_values[None], image_sizes=sizes)
    torch.testing.assert_close(packed[0], expected.pooler_output[0], atol=FP32_ATOL, rtol=0)


def test_fp16_newline_is_float16(workshop, tmp_path):
    out = tmp_path / "out"
    result = invoke("vision", "--model", workshop.tiny(LOPSIDED)["hf"], "--out", out, "--fp16", "--quiet")
    assert result.exit_code == 0, (result.output, result.exception)
    newline = np.load(out / contract.IMAGE_NEWLINE_FILE)
    expected = workshop.reference(LOPSIDED).model.image_newline.half().numpy()
    assert newline.dtype == np.float16 and np.array_equal(newline, expected)
    assert contract.read_manifest(out).anyres == spec_of(LOPSIDED)


def test_verify_checks_a_next_export(workshop):
    folder = workshop.artifacts(NEXT, "original")
    result = invoke("verify", "--model", workshop.tiny(NEXT)["original"], "--artifacts", folder)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "all outputs within tolerance" in result.output


def test_verify_checks_the_packing_and_the_newline_file(workshop, tmp_path):
    """The vision check runs an image's tiles through the graph and runtime.anyres.pack with the
    folder's own image_newline.npy: a wrong newline fails it, naming packed_image_features."""
    folder = tmp_path / "next"
    shutil.copytree(workshop.artifacts(NEXT, "original"), folder)
    newline = np.load(folder / contract.IMAGE_NEWLINE_FILE)
    np.save(folder / contract.IMAGE_NEWLINE_FILE, -newline)
    result = invoke("verify", "--model", workshop.tiny(NEXT)["hf"], "--artifacts", folder)
    assert result.exit_code != 0 and "packed_image_features" in result.output, result.output


def test_llava_15_export_stays_version_1(workshop):
    folder = workshop.artifacts(DEFAULT)
    data = json.loads((folder / contract.MANIFEST_FILE).read_text())
    assert data["format_version"] == contract.FORMAT_VERSION == 1 and "anyres" not in data
    assert not (folder / contract.IMAGE_NEWLINE_FILE).exists()
    assert load_source(str(workshop.tiny(DEFAULT)["original"])).anyres is None


# ---------------------------------------------------------------------------------------------
# Refusals: exit 2, one line naming what to fix, no --out folder

REFUSALS = [
    pytest.param(
        "original",
        "config.json",
        {"image_grid_pinpoints": [[64, 32], [96, 48]]},
        ("[96, 48]", "32-pixel tiles", "haotian-liu/LLaVA#1300"),
        id="original-uneven-pinpoint",
    ),
    pytest.param(
        "hf",
        "config.json",
        {"image_grid_pinpoints": [[32, 64], [48, 96]]},
        ("[48, 96]", "32-pixel tiles", "haotian-liu/LLaVA#1300"),
        id="hf-uneven-pinpoint",
    ),
    pytest.param(
        "original",
        "config.json",
        {"mm_patch_merge_type": "flat"},
        ("mm_patch_merge_type 'flat'", "spatial_unpad"),
        id="merge-flat",
    ),
    pytest.param(
        "original",
        "config.json",
        {"mm_patch_merge_type": "spatial"},
        ("mm_patch_merge_type 'spatial'", "spatial_unpad"),
        id="merge-spatial",
    ),
    pytest.param(
        "original",
        "config.json",
        {"mm_patch_merge_type": None},  # the original repo's default: flat
        ("mm_patch_merge_type 'flat'", "spatial_unpad"),
        id="merge-missing",
    ),
    pytest.param(
        "original",
        "config.json",
        {"mm_vision_select_feature": "cls_patch"},
        ("mm_vision_select_feature 'cls_patch'", "CLS token", "tile grid"),
        id="original-cls",
    ),
    pytest.param(
        "hf",
        "config.json",
        {"vision_feature_select_strategy": "full"},
        ("vision_feature_select_strategy 'full'", "CLS token", "tile grid"),
        id="hf-full",
    ),
    pytest.param(
        "original",
        "config.json",
        {"image_aspect_ratio": "anyres_max_9"},
        ("image_aspect_ratio 'anyres_max_9'", "LLaVA-NeXT repo", "not supported"),
        id="anyres-max",
    ),
    pytest.param(
        "original",
        "config.json",
        {"image_grid_pinpoints": "(1x1),...,(6x6)"},
        ("(1x1),...,(6x6)", "range form", "not supported"),
        id="pinpoint-range",
    ),
    pytest.param(
        "original",
        "config.json",
        {"image_grid_pinpoints": None},
        ("without image_grid_pinpoints",),
        id="no-pinpoints",
    ),
    pytest.param(
        "original",
        "config.json",
        {"image_grid_pinpoints": "[(64, 32), (96"},
        ("is not a list of (width, height) pairs",),
        id="unreadable-pinpoints",
    ),
    pytest.param(
        "original",
        "config.json",
        {"mm_vision_select_layer": [-2, -1]},
        ("several vision feature layers",),
        id="original-feature-layers",
    ),
    pytest.param(
        "hf",
        "config.json",
        {"vision_feature_layer": [-2, -1]},
        ("several vision feature layers",),
        id="hf-feature-layers",
    ),
    pytest.param(
        "hf",
        "preprocessor_config.json",
        {"size": {"shortest_edge": 48}},
        ("preprocessor_config.json", "shortest_edge 48", "image_size 32"),
        id="hf-processor-resize",
    ),
    pytest.param(
        "hf",
        "preprocessor_config.json",
        {"crop_size": {"height": 48, "width": 48}},
        ("preprocessor_config.json", "crop size 48", "image_size 32"),
        id="hf-processor-crop",
    ),
    pytest.param(
        "clip",
        "preprocessor_config.json",
        {"crop_size": {"height": 48, "width": 48}},
        ("clip/preprocessor_config.json", "crop size 48", "image_size 32"),
        id="original-tower-processor-crop",
    ),
]


@pytest.mark.parametrize("fmt, file, changes, fragments", REFUSALS)
def test_refusals_name_what_to_fix(workshop, tmp_path, fmt, file, changes, fragments):
    folders = workshop.tiny(LOPSIDED)
    if fmt == "clip":  # the original format's image processor is its tower's
        clip = edited_copy(folders["clip"], tmp_path / "clip", file, **changes)
        model = edited_copy(folders["original"], tmp_path / "model", mm_vision_tower=str(clip))
    else:
        model = edited_copy(folders[fmt], tmp_path / "model", file, **changes)
    out = tmp_path / "out"
    assert_user_error(invoke("all", "--model", model, "--out", out, "--quiet"), *fragments)
    assert not out.exists()
