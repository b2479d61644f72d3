"""runtime.anyres: LLaVA-1.6 tiling and feature packing, against transformers.

tiles() is checked against LlavaNextImageProcessorPil (1e-5, max abs), the counts against
image_size_to_num_patches and LlavaNextProcessor._get_number_of_features, and pack() exactly
against LlavaNextModel.pack_image_features of a tiny random model. torch and transformers are
imported only inside the tests that use them.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime import anyres
from runtime.contract import AnyresSpec, PreprocessSpec, VisionSpec
from runtime.errors import ArtifactError

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

DEFAULT_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-1.6's
TINY = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # the same shapes at tile 32
TINY_LOPSIDED = [[32, 64], [64, 96]]  # not symmetric in height and width
PINPOINTS = {"default336": (DEFAULT_336, 336), "tiny": (TINY, 32), "lopsided": (TINY_LOPSIDED, 32)}

# (height, width): tiny, square, 2:1, 1:2, 1:3, 3:1, one side under a tile (at either tile size),
# odd, large photos, a single pixel, too thin to keep a row at any pinpoint
SIZES = [
    (5, 7),
    (7, 5),
    (64, 64),
    (336, 336),
    (400, 200),
    (200, 400),
    (150, 450),
    (450, 150),
    (20, 90),
    (100, 700),
    (333, 517),
    (1000, 700),
    (480, 640),
    (1, 1),
    (1, 2000),
    (2000, 1),
    (3, 1500),
]
# sizes whose unpadded side is a whole number that float arithmetic misses by 1e-15
# (55 * (48 / 176) = 14.999999999999998 at the default pinpoints, 47 * (12 / 188) at the tiny
# ones): transformers' round(.., 7) makes them 15 and 3; plain truncation would change the cut
ROUNDING_TRAPS = [(47, 1128), (55, 176), (88, 55), (88, 99), (47, 188), (49, 588), (94, 376)]
MODES = ["RGB", "L", "RGBA", "P"]
KINDS = ["noise", "gradient"]


def make_image(height: int, width: int, mode: str, kind: str, seed: int = 0) -> Image.Image:
    """Seeded noise (every level, sharp edges) or a smooth gradient (where resampling shows)."""
    if kind == "noise":
        rgba = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    else:
        y = np.linspace(0, 1, height)[:, None]
        x = np.linspace(0, 1, width)[None, :]
        planes = [x + 0 * y, y + 0 * x, (x + y) / 2, 1 - 0.7 * x * y]  # R, G, B, alpha
        rgba = np.round(np.stack(planes, axis=-1) * 255).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgba[..., :3])
    if mode == "RGBA":
        return Image.fromarray(rgba)
    if mode == "L":
        return Image.fromarray(rgba[..., 0])
    if mode == "P":
        return Image.fromarray(rgba[..., :3]).quantize(16)
    raise ValueError(mode)


def anyres_spec(name: str) -> AnyresSpec:
    pinpoints, tile = PINPOINTS[name]
    return AnyresSpec(grid_pinpoints=pinpoints, tile_size=tile)


def preprocess_spec(tile: int, resample: str = "bicubic") -> PreprocessSpec:
    return PreprocessSpec(shortest_edge=tile, crop_size=tile, mean=CLIP_MEAN, std=CLIP_STD, resample=resample)


def vision_spec(tile: int, patch: int, strategy: str = "default") -> VisionSpec:
    return VisionSpec(
        image_size=tile,
        patch_size=patch,
        hidden_size=16,
        num_layers=1,
        select_layer=-2,
        select_strategy=strategy,
        projector="mlp2x_gelu",
    )


@functools.cache
def hf_image_processor(name: str, resample: str = "bicubic"):
    from transformers import LlavaNextImageProcessorPil
    from transformers.image_utils import PILImageResampling

    pinpoints, tile = PINPOINTS[name]
    return LlavaNextImageProcessorPil(
        image_grid_pinpoints=pinpoints,
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=PILImageResampling[resample.upper()],
    )


def assert_tiles_match(image: Image.Image, name: str, resample: str = "bicubic") -> None:
    spec = anyres_spec(name)
    ours = anyres.tiles(image, spec, preprocess_spec(spec.tile_size, resample))
    out = hf_image_processor(name, resample)(image.copy(), return_tensors="np")
    ref = np.asarray(out["pixel_values"])[0]  # one image: no batch padding
    assert list(np.asarray(out["image_sizes"])[0]) == [image.height, image.width]
    size = (image.height, image.width)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert ours.shape == ref.shape == (anyres.tile_count(size, spec), 3, spec.tile_size, spec.tile_size)
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_tiles_default_pinpoints(size, kind):
    assert_tiles_match(make_image(*size, "RGB", kind, seed=sum(size)), "default336")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
@pytest.mark.parametrize("size", [(333, 517), (480, 640), (5, 7)], ids=str)
def test_tiles_default_pinpoints_modes(size, mode):
    assert_tiles_match(make_image(*size, mode, "gradient"), "default336")
    assert_tiles_match(make_image(*size, mode, "noise", seed=3), "default336")


@pytest.mark.parametrize("name", ["tiny", "lopsided"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_tiles_tiny_tiles(name, kind, mode):
    for index, size in enumerate(SIZES):
        assert_tiles_match(make_image(*size, mode, kind, seed=index), name)


@pytest.mark.parametrize("resample", ["bilinear", "nearest", "lanczos"])
def test_tiles_follow_the_resample_filter(resample):
    for size in [(333, 517), (20, 90), (64, 64)]:
        image = make_image(*size, "RGB", "gradient")
        assert_tiles_match(image, "tiny", resample)
    # and the filter matters: bicubic tiles of the same gradient differ
    spec = anyres_spec("tiny")
    image = make_image(333, 517, "RGB", "gradient")
    other = anyres.tiles(image, spec, preprocess_spec(32, resample))
    assert np.abs(other - anyres.tiles(image, spec, preprocess_spec(32))).max() > 1e-3


def test_tiles_layout_by_hand():
    """A 32x64 image at pinpoint [32, 64]: no resize, no padding; tile 1 is the left half."""
    spec = anyres_spec("tiny")
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, 32:] = 255  # right half white
    out = anyres.tiles(Image.fromarray(pixels), spec, preprocess_spec(32))
    assert anyres.best_resolution((32, 64), TINY) == (32, 64) and out.shape == (3, 3, 32, 32)
    black = (0 - np.float32(CLIP_MEAN[0])) / np.float32(CLIP_STD[0])
    assert np.allclose(out[1], out[1, :, :1, :1]) and np.isclose(out[1, 0, 0, 0], black)
    assert (out[2] > 1).all()  # the white half
    # a 16x64 image fits [32, 64] at 1x: 8 black rows above and below it
    out = anyres.tiles(Image.fromarray(pixels[:16]), spec, preprocess_spec(32))
    assert anyres.best_resolution((16, 64), TINY) == (32, 64)
    assert np.isclose(out[2, 0, :8], black).all() and np.isclose(out[2, 0, 24:], black).all()
    assert (out[2, :, 8:24] > 1).all()


def test_best_resolution_matches_transformers():
    from transformers.image_processing_utils import select_best_resolution

    for size in random_sizes(500, seed=1) + SIZES:
        for pinpoints, _ in PINPOINTS.values():
            assert anyres.best_resolution(size, pinpoints) == tuple(select_best_resolution(size, pinpoints))


def random_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    """Seeded (height, width) pairs, from 1 to 2000 pixels a side."""
    rng = np.random.default_rng(seed)
    return [(int(h), int(w)) for h, w in rng.integers(1, 2001, (count, 2))]


def hf_processor(name: str):
    """A LlavaNextProcessor without a tokenizer: only what _get_number_of_features reads."""
    from transformers import LlavaNextProcessor

    processor = LlavaNextProcessor.__new__(LlavaNextProcessor)
    processor.image_processor = hf_image_processor(name)
    processor.patch_size = 8 if PINPOINTS[name][1] == 32 else 14
    processor.num_additional_image_tokens = 1  # a CLIP tower: the CLS, which "default" drops
    processor.vision_feature_select_strategy = "default"
    return processor


@pytest.mark.parametrize("name", list(PINPOINTS))
def test_counts_match_transformers(name):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    spec = anyres_spec(name)
    tile = spec.tile_size
    vision = vision_spec(tile, 8 if tile == 32 else 14)
    processor = hf_processor(name)
    for size in SIZES + ROUNDING_TRAPS + random_sizes(1000, seed=2):
        assert anyres.tile_count(size, spec) == image_size_to_num_patches(size, spec.grid_pinpoints, tile)
        expected = processor._get_number_of_features(*size, tile, tile) - 1  # minus the CLS
        assert anyres.image_token_count(size, spec, vision) == expected, size


def test_counts_by_hand():
    spec = anyres_spec("default336")
    vision = vision_spec(336, 14)  # 24 x 24 = 576 tokens a tile
    # 480x640 (h, w) -> pinpoint [672, 672] -> 2 x 2 tiles -> a 48 x 48 map; the image fills the
    # width, 36 of 48 rows are its own: 576 + 36 * (48 + 1)
    assert anyres.best_resolution((480, 640), DEFAULT_336) == (672, 672)
    assert anyres.grid_shape((480, 640), spec) == (2, 2) and anyres.tile_count((480, 640), spec) == 5
    assert anyres.image_token_count((480, 640), spec, vision) == 576 + 36 * 49
    # 55x176 -> [336, 672], a 24 x 48 map; the width fills, 55 * (48 / 176) = 14.999999999999998
    # rounds (7 digits) to 15 rows, cut (24 - 15) // 2 = 4 from each end: 16 rows are kept
    assert anyres.grid_shape((55, 176), spec) == (1, 2)
    assert anyres.image_token_count((55, 176), spec, vision) == 576 + 16 * 49
    # 5x7 at the tiny tiles: pinpoint [32, 64] ([64, 32] ties on pixels kept and waste; the first
    # wins), a 4 x 8 map. 7/5 < 8/4, so the height fills and the width is round(7 * 4 / 5, 7) = 5.6,
    # truncated to 5; the cut is (8 - 5) // 2 = 1 from each end, which keeps 6 columns, not 5
    tiny = anyres_spec("tiny")
    assert anyres.grid_shape((5, 7), tiny) == (1, 2)
    assert anyres.image_token_count((5, 7), tiny, vision_spec(32, 8)) == 16 + 4 * (6 + 1)


@functools.cache
def tiny_model(name: str):
    """A random LlavaNextForConditionalGeneration with a CLIP tower of `name`'s tile size."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    pinpoints, tile = PINPOINTS[name]
    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            image_size=tile,
            patch_size=8 if tile == 32 else 14,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        text_config=LlamaConfig(
            hidden_size=24,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
        ),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        image_token_index=63,
    )
    return LlavaNextForConditionalGeneration(config).eval()


def hf_pack(name: str, features: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
    import torch

    model = tiny_model(name)
    newline = model.model.image_newline.detach()
    with torch.no_grad():
        packed, lens = model.model.pack_image_features(
            [torch.from_numpy(features)], torch.tensor([size]), "default", image_newline=newline
        )
    return packed[0].numpy(), newline.numpy(), int(lens[0])


@pytest.mark.parametrize("name", list(PINPOINTS))
def test_pack_matches_transformers(name):
    spec = anyres_spec(name)
    patch = 8 if spec.tile_size == 32 else 14
    vision = vision_spec(spec.tile_size, patch)
    rng = np.random.default_rng(4)
    sizes = SIZES + ROUNDING_TRAPS + random_sizes(25 if name == "default336" else 60, seed=5)
    for size in sizes:
        features = rng.standard_normal((anyres.tile_count(size, spec), vision.num_image_tokens, 24))
        features = features.astype(np.float32)
        ref, newline, length = hf_pack(name, features, size)
        ours = anyres.pack(features, size, spec, vision, newline)
        assert ours.dtype == np.float32
        assert ours.shape == ref.shape == (anyres.image_token_count(size, spec, vision), 24), size
        assert length == len(ours)
        assert np.array_equal(ours, ref), size


def test_pack_keeps_the_features_dtype():
    spec = anyres_spec("tiny")
    vision = vision_spec(32, 8)
    size = (333, 517)
    features = np.random.default_rng(6).standard_normal((anyres.tile_count(size, spec), 16, 24))
    features = features.astype(np.float16)
    ref, newline, _ = hf_pack("tiny", features, size)  # a float32 newline, cast to float16 there
    ours = anyres.pack(features, size, spec, vision, newline)
    assert ours.dtype == ref.dtype == np.float16 and np.array_equal(ours, ref)


def test_pack_layout_by_hand():
    """1 x 2 tiles of 2 x 2 patches (tile 32, patch 16), a 32x64 image: nothing to unpad."""
    spec = anyres_spec("tiny")
    vision = vision_spec(32, 16)
    features = np.arange(3 * 4, dtype=np.float32).reshape(3, 4, 1)  # tile t, patch k -> 4t + k
    out = anyres.pack(features, (32, 64), spec, vision, np.array([-1], dtype=np.float32))[:, 0]
    # base 0..3; then map row 0: tile 1's patches 0,1, tile 2's 0,1, newline; row 1: their 2,3
    assert out.tolist() == [0, 1, 2, 3, 4, 5, 8, 9, -1, 6, 7, 10, 11, -1]


def test_errors():
    spec = anyres_spec("default336")
    image = make_image(40, 60, "RGB", "noise")
    full = vision_spec(336, 14, strategy="full")
    with pytest.raises(ArtifactError, match="select_strategy 'default', not 'full'"):
        anyres.image_token_count((40, 60), spec, full)
    with pytest.raises(ArtifactError, match="select_strategy"):
        anyres.pack(np.zeros((3, 577, 8), np.float32), (40, 60), spec, full, np.zeros(8, np.float32))
    for shortest, crop in [(224, 336), (336, 224), (224, 224)]:
        other = PreprocessSpec(shortest_edge=shortest, crop_size=crop, mean=CLIP_MEAN, std=CLIP_STD)
        with pytest.raises(ArtifactError, match="equal to tile_size 336"):
            anyres.tiles(image, spec, other)
    with pytest.raises(ArtifactError, match="resample"):
        anyres.tiles(image, spec, preprocess_spec(336, resample="box"))
    with pytest.raises(ArtifactError, match="differs from the vision image_size"):
        anyres.image_token_count((40, 60), spec, vision_spec(224, 14))
    vision = vision_spec(336, 14)
    with pytest.raises(ArtifactError, match="do not fit a 1x2 grid"):
        anyres.pack(np.zeros((5, 576, 8), np.float32), (40, 60), spec, vision, np.zeros(8, np.float32))
    with pytest.raises(ArtifactError, match="newline"):
        anyres.pack(np.zeros((3, 576, 8), np.float32), (40, 60), spec, vision, np.zeros(9, np.float32))


def test_too_thin_an_image_keeps_only_its_base_tile():
    """1 x 2000 keeps no whole row at any pinpoint; transformers still picks the least wasteful
    one and unpads its grid to nothing, so only the base tile's tokens are left."""
    spec, vision = anyres_spec("default336"), vision_spec(336, 14)
    assert anyres.best_resolution((1, 2000), DEFAULT_336) == (336, 672)
    assert anyres.tile_count((1, 2000), spec) == 3
    assert anyres.image_token_count((1, 2000), spec, vision) == 576
    features = np.ones((3, 576, 8), np.float32)
    assert anyres.pack(features, (1, 2000), spec, vision, np.zeros(8, np.float32)).shape == (576, 8)


def test_tiles_is_fast_enough():
    """A 640x480 photo at the default pinpoints (5 tiles): a few tens of ms at most."""
    import time

    spec, preprocess = anyres_spec("default336"), preprocess_spec(336)
    image = make_image(480, 640, "RGB", "noise")
    anyres.tiles(image, spec, preprocess)
    start = time.perf_counter()
    for _ in range(5):
        anyres.tiles(image, spec, preprocess)
    assert (time.perf_counter() - start) / 5 < 0.2  # ~13 ms here; generous for slow CI machines


def test_anyres_imports_no_torch():
    script = (
        "import json, sys, runtime.anyres\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))"
    )
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=repo, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


# ---------------------------------------------------------------------------------------------
# The contract: format version 2 carries anyres, and only it


def next_manifest(**anyres_fields):
    from runtime.contract import Manifest, TextSpec, TokenSpec

    vision = VisionSpec(32, 8, 16, 2, -2, "default", "mlp2x_gelu")
    text = TextSpec("llama", 64, 2, 4, 2, 16, 320, 512)
    preprocess = PreprocessSpec(32, 32, CLIP_MEAN, CLIP_STD)
    spec = AnyresSpec(**{"grid_pinpoints": TINY, "tile_size": 32, **anyres_fields})
    return Manifest({"path": "m"}, vision, text, preprocess, TokenSpec(1, [2], 0), "vicuna_v1", anyres=spec)


def test_an_anyres_manifest_is_version_2_and_a_plain_one_stays_version_1(tmp_path):
    from dataclasses import replace

    from runtime import contract

    manifest = next_manifest()
    contract.write_manifest(tmp_path, manifest)
    assert json.loads((tmp_path / contract.MANIFEST_FILE).read_text())["format_version"] == 2
    assert contract.read_manifest(tmp_path).anyres == manifest.anyres
    plain = replace(manifest, anyres=None)
    assert plain.format_version == 1 and "anyres" not in json.loads(plain.to_json())


def test_a_runtime_that_reads_version_1_only_refuses_an_anyres_manifest(tmp_path, monkeypatch):
    from runtime import contract

    contract.write_manifest(tmp_path, next_manifest())
    monkeypatch.setattr(contract, "READABLE_VERSIONS", (1,))  # the runtime before LLaVA-1.6
    with pytest.raises(ArtifactError, match="has format version 2; this runtime reads versions 1 "):
        contract.read_manifest(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("anyres"), "format version 2 without an `anyres` entry"),
        (lambda d: d.update(format_version=1), "format version 1 with an `anyres` entry"),
        (
            lambda d: d["anyres"].update(grid_pinpoints=[[32, 48]]),
            r"pinpoint \[32, 48\] is not .* 32-pixel tiles",
        ),
        (
            lambda d: d["anyres"].update(tile_size=64, grid_pinpoints=[[64, 128]]),
            "tile_size 64, vision image_size 32",
        ),
        (lambda d: d["anyres"].update(merge="flat"), "anyres merge must be 'spatial_unpad'"),
    ],
)
def test_a_malformed_anyres_manifest_is_refused(tmp_path, edit, message):
    from runtime import contract

    data = json.loads(next_manifest().to_json())
    edit(data)
    (tmp_path / contract.MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=message):
        contract.read_manifest(tmp_path)
