"""TensorRT engines without a GPU.

1. Profiles derived from the manifest (runtime/engines.py): valid ranges that cover an image
   plus the longest prompt in prefill and the whole cache in decode, limits checked with the
   flag named; LLaVA-1.5's exact profiles; for LLaVA-1.6 (anyres) the largest image's tokens
   and tiles against runtime/anyres.py over a sweep of sizes, and the tile-batch vision profile.
2. Engine folders: naming, selection, and the errors for another GPU, another TensorRT
   version, a missing or malformed engine.json, a stale engine, a truncated plan.
3. `llava-export engine` and the TensorRT backend end to end against the fake `tensorrt` and
   `cuda.bindings.runtime` of tests/support/fake_tensorrt.py (the `fake_gpu` fixture): the
   plumbing (staging, profiles, the ping-pong KV cache, no cache traffic to the host, errors;
   a LLaVA-1.6 export's tiles in chunks of the vision profile, its answers ONNX Runtime's),
   not TensorRT itself: parity_tests/test_tensorrt.py does that on a GPU.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from runtime import contract, engines
from runtime.contract import AnyresSpec, GraphSpec, Manifest, PreprocessSpec, TextSpec, TokenSpec, VisionSpec
from runtime.engines import EngineLimits, GpuIdentity, ShapeRange
from runtime.errors import EngineError, PromptError
from tests.support.fake_tensorrt import FAKE_FOLDER

H200 = GpuIdentity("NVIDIA H200", 9, 0, "10.13.3.9")


def make_manifest(
    image_size=336,
    patch=14,
    hidden=4096,
    layers=32,
    heads=32,
    kv_heads=32,
    head_dim=128,
    vocab=32064,
    positions=4096,
    strategy="default",
    anyres=None,
) -> Manifest:
    """A manifest without an export: LLaVA-1.5-7B-shaped by default; `anyres`: grid pinpoints
    (height, width) in pixels make it a LLaVA-1.6 with tiles of image_size."""
    vision = VisionSpec(image_size, patch, 1024, 24, -2, strategy, "mlp2x_gelu")
    text = TextSpec("llama", hidden, layers, heads, kv_heads, head_dim, vocab, positions)
    manifest = Manifest(
        source={"path": "x", "format": "hf", "weights_sha256": "w" * 64},
        vision=vision,
        text=text,
        preprocess=PreprocessSpec(image_size, image_size, [0.5] * 3, [0.5] * 3, "pad"),
        tokens=TokenSpec(1, [2], 0),
        template="vicuna_v1",
        anyres=None if anyres is None else AnyresSpec([list(p) for p in anyres], image_size),
    )
    kv = ["batch", kv_heads, "past_sequence", head_dim]
    inputs = {
        contract.INPUTS_EMBEDS: ["batch", "sequence", hidden],
        contract.ATTENTION_MASK: ["batch", "total_sequence"],
        contract.POSITION_IDS: ["batch", "sequence"],
    }
    inputs.update({name: kv for name in contract.decoder_input_names(layers)[3:]})
    outputs = {contract.LOGITS: ["batch", vocab]}
    manifest.graphs["vision"] = GraphSpec(
        "vision.onnx",
        "float16",
        18,
        {contract.PIXEL_VALUES: ["batch", 3, image_size, image_size]},
        {contract.IMAGE_EMBEDS: ["batch", vision.num_image_tokens, hidden]},
        "v" * 64,
    )
    manifest.graphs["decoder"] = GraphSpec("decoder.onnx", "float16", 18, inputs, outputs, "d" * 64)
    return manifest


# ---------------------------------------------------------------------------------------------
# 1. Limits and profiles


def test_default_limits_for_llava_7b():
    manifest = make_manifest()
    assert manifest.vision.num_image_tokens == 576
    limits = engines.derive_limits(manifest)
    assert limits == EngineLimits(max_batch=1, max_input_len=576 + 1024, max_seq_len=4096)


def test_default_limits_follow_a_small_model():
    manifest = make_manifest(image_size=32, patch=8, positions=256)
    assert engines.derive_limits(manifest) == EngineLimits(1, 256, 256)
    assert engines.derive_limits(manifest, max_seq_len=100) == EngineLimits(1, 100, 100)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"max_batch": 0}, "--max-batch"),
        ({"max_seq_len": 5000}, "--max-seq-len"),
        ({"max_seq_len": 1}, "--max-seq-len"),
        ({"max_input_len": 3000, "max_seq_len": 2048}, "--max-input-len"),
        ({"max_input_len": 576}, "--max-input-len"),
    ],
)
def test_bad_limits_name_the_flag(kwargs, flag):
    with pytest.raises(EngineError, match=flag):
        engines.derive_limits(make_manifest(), **kwargs)


LIMIT_GRID = [(1, None, None), (4, None, None), (2, 600, 700), (8, 600, 600), (1, 4096, 4096)]
SHAPES = [
    {},
    {"kv_heads": 8},
    {"kv_heads": 1, "layers": 2},
    {"strategy": "full"},
    {"image_size": 224, "patch": 16},
]


@pytest.mark.parametrize("limit_args", LIMIT_GRID)
@pytest.mark.parametrize("shape", SHAPES)
def test_derived_profiles_are_valid_and_cover_what_the_runtime_sends(limit_args, shape):
    manifest = make_manifest(**shape)
    limits = engines.derive_limits(manifest, *limit_args)
    image_tokens, text = manifest.vision.num_image_tokens, manifest.text
    vision = engines.vision_profiles(manifest, limits)
    decoder = engines.decoder_profiles(manifest, limits)
    assert engines.profile_problems(manifest, limits, "vision", vision) == []
    assert engines.profile_problems(manifest, limits, "decoder", decoder) == []
    assert [p.name for p in decoder] == [engines.PREFILL, engines.DECODE]

    def call(batch, sequence, past):
        kv = (batch, text.num_kv_heads, past, text.head_dim)
        shapes = {
            contract.INPUTS_EMBEDS: (batch, sequence, text.hidden_size),
            contract.ATTENTION_MASK: (batch, past + sequence),
            contract.POSITION_IDS: (batch, sequence),
        }
        return {**shapes, **{name: kv for name in contract.decoder_input_names(text.num_layers)[3:]}}

    top = limits.max_batch
    # prefill: an image plus the longest prompt, any batch, an empty cache
    assert limits.max_input_len >= image_tokens + 1
    for batch in (1, top):
        assert engines.find_profile(decoder, call(batch, limits.max_input_len, 0)) == 0
        assert engines.find_profile(decoder, call(batch, image_tokens + 1, 0)) == 0
        assert engines.find_profile(decoder, call(batch, 1, 0)) == 0
        # decode: one token after 1 .. max_seq_len - 1 cached positions
        assert engines.find_profile(decoder, call(batch, 1, 1)) == 1
        assert engines.find_profile(decoder, call(batch, 1, limits.max_seq_len - 1)) == 1
    # nothing beyond the limits, no chunked prefill
    assert engines.find_profile(decoder, call(1, limits.max_input_len + 1, 0)) is None
    assert engines.find_profile(decoder, call(1, 1, limits.max_seq_len)) is None
    assert engines.find_profile(decoder, call(top + 1, 1, 1)) is None
    assert engines.find_profile(decoder, call(1, 2, 1)) is None
    # the backend's per-token probe: one past stands for all
    probe = {
        k: v
        for k, v in call(1, 1, 5).items()
        if not k.startswith("past_key_values.") or k == contract.past_key_name(0)
    }
    assert engines.find_profile(decoder, probe, partial=True) == 1
    assert engines.find_profile(decoder, probe) is None  # not partial: every input is required
    assert engines.find_profile(decoder, {"no_such_input": (1,)}, partial=True) is None
    prefill, decode = decoder
    assert decode.shapes[contract.past_key_name(0)].max[2] == limits.max_seq_len - 1
    assert decode.shapes[contract.ATTENTION_MASK].max[1] == limits.max_seq_len
    assert prefill.shapes[contract.past_value_name(text.num_layers - 1)].max[2] == 0
    pixels = vision[0].shapes[contract.PIXEL_VALUES]
    size = manifest.preprocess.crop_size
    assert (pixels.min, pixels.opt, pixels.max) == (
        (1, 3, size, size),
        (1, 3, size, size),
        (top, 3, size, size),
    )


def test_opt_shapes_are_a_typical_request():
    manifest = make_manifest()
    limits = engines.derive_limits(manifest)
    prefill, decode = engines.decoder_profiles(manifest, limits)
    assert prefill.shapes[contract.INPUTS_EMBEDS].opt == (1, 576 + engines.OPT_TEXT_TOKENS, 4096)
    assert decode.shapes[contract.past_key_name(0)].opt == (
        1,
        32,
        576 + engines.OPT_TEXT_TOKENS + engines.OPT_ANSWER_TOKENS,
        128,
    )


def test_llava_1_5_profiles_are_unchanged_by_anyres():
    """The exact profiles a LLaVA-1.5-7B engine was built with before LLaVA-1.6 support (one
    tile per image: the vision batch is the image batch, opt 1), so its engines need no rebuild."""
    manifest = make_manifest(layers=1)
    assert engines.max_image_tokens(manifest) == 576 and engines.tiles_per_image(manifest) == 1
    limits = engines.derive_limits(manifest, max_batch=4)
    assert limits == EngineLimits(4, 1600, 4096)

    def r(low, opt, high):
        return {"min": list(low), "opt": list(opt), "max": list(high)}

    vision = engines.vision_profiles(manifest, limits)
    assert [p.as_dict() for p in vision] == [
        {
            "name": "images",
            "shapes": {"pixel_values": r((1, 3, 336, 336), (1, 3, 336, 336), (4, 3, 336, 336))},
        }
    ]
    prefill_kv = r((1, 32, 0, 128), (1, 32, 0, 128), (4, 32, 0, 128))
    decode_kv = r((1, 32, 1, 128), (1, 32, 768, 128), (4, 32, 4095, 128))
    kv_names = contract.decoder_input_names(1)[3:]
    assert [p.as_dict() for p in engines.decoder_profiles(manifest, limits)] == [
        {
            "name": "prefill",
            "shapes": {
                "inputs_embeds": r((1, 1, 4096), (1, 640, 4096), (4, 1600, 4096)),
                "attention_mask": r((1, 1), (1, 640), (4, 1600)),
                "position_ids": r((1, 1), (1, 640), (4, 1600)),
                **{name: prefill_kv for name in kv_names},
            },
        },
        {
            "name": "decode",
            "shapes": {
                "inputs_embeds": r((1, 1, 4096), (1, 1, 4096), (4, 1, 4096)),
                "attention_mask": r((1, 2), (1, 769), (4, 4096)),
                "position_ids": r((1, 1), (1, 1), (4, 1)),
                **{name: decode_kv for name in kv_names},
            },
        },
    ]


# LLaVA-1.6 pinpoint lists, (height, width) in pixels: the default one at 336-pixel tiles, one
# with a 2 x 3 grid (7 tiles), and the tiny models' two (32-pixel tiles, as
# parity_tests/test_next_parity.py), the second without mirror pairs.
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
WIDE_PINPOINTS = ((336, 672), (672, 1008))
TINY_PINPOINTS = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))
TINY_NON_SQUARE = ((32, 64), (64, 96))
# pinpoints, manifest arguments, and what an engine must take: (most tiles of one image, most
# tokens of one image, the default max_input_len), each worked out by hand
ANYRES_CASES = {
    # 576 + 48 x (48 + 1) for 672 x 672; 2,928 + 1,024 text tokens fit 4,096 positions
    "default-336": (DEFAULT_PINPOINTS, {}, (5, 2928, 2928 + 1024)),
    # 576 + 48 x (72 + 1) for 672 x 1008: 4,080 + 1,024 is capped at the 4,096 positions
    "wide-336": (WIDE_PINPOINTS, {}, (7, 4080, 4096)),
    # 16 + 8 x (8 + 1) for 64 x 64; capped at the tiny model's 640 positions
    "tiny": (TINY_PINPOINTS, {"image_size": 32, "patch": 8, "positions": 640}, (5, 88, 640)),
    # 16 + 8 x (12 + 1) for 64 x 96
    "tiny-non-square": (TINY_NON_SQUARE, {"image_size": 32, "patch": 8, "positions": 640}, (7, 120, 640)),
}


def anyres_manifest(case: str, **changes) -> Manifest:
    pinpoints, kwargs, _ = ANYRES_CASES[case]
    return make_manifest(anyres=pinpoints, **{**kwargs, **changes})


def image_sizes(pinpoints, tile: int) -> list[tuple[int, int]]:
    """(height, width) sizes: a grid of sides from 1 pixel to past the largest pinpoint (every
    aspect from a 1-pixel line to square and back), every pinpoint exactly, doubled, halved,
    and one pixel off."""
    top = max(max(p) for p in pinpoints) + 2 * tile
    sides = sorted({1, 2, 3, *range(1, top, max(1, top // 45)), top})
    sizes = [(h, w) for h in sides for w in sides]
    for h, w in pinpoints:
        sizes += [(h, w), (2 * h, 2 * w), (h + 1, w), (h, w - 1), (h // 2, w // 2)]
    return sizes


@pytest.mark.parametrize("case", list(ANYRES_CASES))
def test_anyres_limits_hold_the_largest_image(case):
    from runtime import anyres

    manifest = anyres_manifest(case)
    tiles, tokens, input_len = ANYRES_CASES[case][2]
    spec = manifest.anyres
    sizes = image_sizes(spec.grid_pinpoints, spec.tile_size)
    counts = [anyres.image_token_count(size, spec, manifest.vision) for size in sizes]
    # the bound is the largest count over every size, and some size (a pinpoint's own) reaches it
    assert engines.max_image_tokens(manifest) == max(counts) == tokens
    assert engines.tiles_per_image(manifest) == spec.max_tiles == tiles
    assert max(anyres.tile_count(size, spec) for size in sizes) == tiles
    limits = engines.derive_limits(manifest)
    positions = manifest.text.max_positions
    assert limits == EngineLimits(1, input_len, min(positions, engines.DEFAULT_MAX_SEQ_LEN))
    assert limits.max_input_len == min(tokens + engines.DEFAULT_TEXT_TOKENS, limits.max_seq_len)
    # a smaller --max-seq-len caps the default prompt length too, as long as the largest image fits
    assert engines.derive_limits(manifest, max_seq_len=tokens + 1).max_input_len == tokens + 1


@pytest.mark.parametrize("case", list(ANYRES_CASES))
@pytest.mark.parametrize("max_batch", [1, 2, 4])
def test_anyres_profiles_take_tile_batches(case, max_batch):
    manifest = anyres_manifest(case, layers=2, kv_heads=8)
    tiles, tokens, _ = ANYRES_CASES[case][2]
    size = manifest.preprocess.crop_size
    limits = engines.derive_limits(manifest, max_batch=max_batch)
    vision = engines.vision_profiles(manifest, limits)
    decoder = engines.decoder_profiles(manifest, limits)
    assert engines.profile_problems(manifest, limits, "vision", vision) == []
    assert engines.profile_problems(manifest, limits, "decoder", decoder) == []
    # one tile at least, one image's tiles at opt, max_batch images of the most tiles at most
    pixels = vision[0].shapes[contract.PIXEL_VALUES]
    assert (pixels.min, pixels.opt, pixels.max) == (
        (1, 3, size, size),
        (tiles, 3, size, size),
        (max_batch * tiles, 3, size, size),
    )
    for count in range(1, max_batch * tiles + 1):  # any tile count in between is one run
        assert engines.find_profile(vision, {contract.PIXEL_VALUES: (count, 3, size, size)}) == 0
    assert (
        engines.find_profile(vision, {contract.PIXEL_VALUES: (max_batch * tiles + 1, 3, size, size)}) is None
    )
    # prefill holds the largest image and a word at any batch; its opt is that image and a question
    text = manifest.text
    prefill, decode = decoder
    embeds = prefill.shapes[contract.INPUTS_EMBEDS]
    assert embeds.opt[1] == min(tokens + engines.OPT_TEXT_TOKENS, limits.max_input_len)
    assert embeds.max == (max_batch, limits.max_input_len, text.hidden_size)
    assert embeds.min[1] == 1 and limits.max_input_len >= tokens + 1
    past_opt = decode.shapes[contract.past_key_name(0)].opt[2]
    assert past_opt == min(embeds.opt[1] + engines.OPT_ANSWER_TOKENS, limits.max_seq_len - 1)


def test_anyres_max_input_len_too_small_names_the_largest_image():
    manifest = anyres_manifest("default-336")
    assert engines.derive_limits(manifest, max_input_len=2929).max_input_len == 2929
    for short in (577, 2928):  # 577 holds a LLaVA-1.5 image and a word, not this model's largest
        with pytest.raises(EngineError) as caught:
            engines.derive_limits(manifest, max_input_len=short)
        message = str(caught.value)
        assert f"--max-input-len {short} cannot hold one image (2928 tokens)" in message, message
        assert "use at least 2929" in message, message
    with pytest.raises(EngineError, match=r"--max-input-len 4000 is longer than --max-seq-len 3000"):
        engines.derive_limits(manifest, max_input_len=4000, max_seq_len=3000)


def test_profile_problems_are_found():
    manifest = make_manifest(layers=1)
    limits = engines.derive_limits(manifest)
    prefill, decode = engines.decoder_profiles(manifest, limits)
    broken = dict(decode.shapes)
    broken[contract.POSITION_IDS] = ShapeRange((1, 2), (1, 1), (1, 3))
    del broken[contract.past_value_name(0)]
    broken[contract.INPUTS_EMBEDS] = ShapeRange((1, 1, 64), (1, 1, 64), (1, 1, 64))
    problems = engines.profile_problems(manifest, limits, "decoder", [engines.Profile("bad", broken)])
    assert any("position_ids: axis 1" in p for p in problems)
    assert any("no range for input past_key_values.0.value" in p for p in problems)
    assert any("fixed at 4096" in p for p in problems)
    assert ShapeRange((1,), (1, 2), (1,)).problems()


def test_profiles_round_trip_through_json():
    manifest = make_manifest(layers=2)
    profiles = engines.decoder_profiles(manifest, engines.derive_limits(manifest))
    again = [engines.Profile.from_dict(json.loads(json.dumps(p.as_dict()))) for p in profiles]
    assert again == profiles


# ---------------------------------------------------------------------------------------------
# 2. Engine folders


def test_folder_names():
    assert H200.folder_name == "nvidia-h200-sm90-trt10.13.3.9"
    assert (
        GpuIdentity("NVIDIA GeForce RTX 4090", 8, 9, "10.0.1").folder_name
        == "nvidia-geforce-rtx-4090-sm89-trt10.0.1"
    )
    assert (
        GpuIdentity("NVIDIA A100-SXM4-80GB", 8, 0, "11.1.0").folder_name
        == "nvidia-a100-sxm4-80gb-sm80-trt11.1.0"
    )
    assert engines.slug("  /weird  name!/ ") == "weird-name"
    assert engines.slug("???") == "gpu"


def write_engine_folder(artifacts: Path, manifest: Manifest, identity: GpuIdentity = H200, **changes) -> Path:
    """A fake engine folder, as `llava-export engine` would leave it (plans are dummy bytes)."""
    folder = artifacts / contract.ENGINES_DIR / identity.folder_name
    folder.mkdir(parents=True)
    limits = engines.derive_limits(manifest)
    profiles = {
        "vision": engines.vision_profiles(manifest, limits),
        "decoder": engines.decoder_profiles(manifest, limits),
    }
    for graph in engines.GRAPHS:
        (folder / engines.PLANS[graph]).write_bytes(b"plan" * 10)
    sources = {g: manifest.graphs[g].sha256 for g in engines.GRAPHS}
    record = engines.engine_record(
        identity, manifest, limits, profiles, sources, {g: 40 for g in engines.GRAPHS}
    )
    record.update(changes)
    engines.write_engine_json(folder, record)
    return folder


@pytest.fixture
def fake_artifacts(tmp_path):
    manifest = make_manifest(layers=2)
    return tmp_path / "artifacts", manifest


def test_selects_the_folder_for_this_gpu(fake_artifacts):
    artifacts, manifest = fake_artifacts
    write_engine_folder(artifacts, manifest, GpuIdentity("NVIDIA A100-SXM4-80GB", 8, 0, "10.13.3.9"))
    folder = write_engine_folder(artifacts, manifest)
    (artifacts / "engines" / f".staging-{H200.folder_name}-123").mkdir()  # an interrupted build
    selected = engines.select_engine(artifacts, manifest, H200)
    assert selected.path == folder
    assert selected.limits == engines.derive_limits(manifest)
    assert [p.name for p in selected.profiles("decoder")] == ["prefill", "decode"]
    assert selected.plan("decoder") == folder / "decoder.plan"
    record = json.loads((folder / "engine.json").read_text())
    assert record["gpu"] == {"name": "NVIDIA H200", "compute_capability": "9.0"}
    assert record["tensorrt_version"] == "10.13.3.9" and record["strongly_typed"] is True
    assert record["source"]["decoder"]["sha256"] == manifest.graphs["decoder"].sha256


def assert_engine_error(artifacts, manifest, *fragments, identity=H200):
    with pytest.raises(EngineError) as caught:
        engines.select_engine(artifacts, manifest, identity)
    message = str(caught.value)
    assert f"llava-export engine --artifacts {artifacts}" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_no_engines(fake_artifacts):
    artifacts, manifest = fake_artifacts
    assert_engine_error(artifacts, manifest, "no TensorRT engines", "NVIDIA H200 (sm90)")
    with pytest.raises(EngineError, match="llava-export engine"):
        engines.require_engines(artifacts)
    (artifacts / "engines" / ".staging-x").mkdir(parents=True)  # only a staging folder: still none
    with pytest.raises(EngineError, match="TensorRT engine"):
        engines.require_engines(artifacts)


def test_engines_for_another_gpu(fake_artifacts):
    artifacts, manifest = fake_artifacts
    write_engine_folder(artifacts, manifest, GpuIdentity("NVIDIA A100-SXM4-80GB", 8, 0, "10.13.3.9"))
    assert_engine_error(
        artifacts, manifest, "NVIDIA A100-SXM4-80GB (sm80)", "this machine is NVIDIA H200 (sm90)"
    )


def test_engines_for_another_tensorrt_version(fake_artifacts):
    artifacts, manifest = fake_artifacts
    write_engine_folder(artifacts, manifest, GpuIdentity("NVIDIA H200", 9, 0, "10.8.0.43"))
    assert_engine_error(
        artifacts, manifest, "built with TensorRT 10.8.0.43", "this machine has TensorRT 10.13.3.9"
    )


def test_missing_or_malformed_engine_json(fake_artifacts):
    artifacts, manifest = fake_artifacts
    folder = write_engine_folder(artifacts, manifest)
    (folder / "engine.json").unlink()
    assert_engine_error(artifacts, manifest, "engine.json is missing")
    (folder / "engine.json").write_text("{not json")
    assert_engine_error(artifacts, manifest, "unreadable")
    (folder / "engine.json").write_text(json.dumps({"format": "something else"}))
    assert_engine_error(artifacts, manifest, "not a llava-export-engine record")
    (folder / "engine.json").write_text(json.dumps({"format": engines.ENGINE_FORMAT, "format_version": 99}))
    assert_engine_error(artifacts, manifest, "format version 99")
    (folder / "engine.json").write_text(
        json.dumps({"format": engines.ENGINE_FORMAT, "format_version": 1, "gpu": {}})
    )
    assert_engine_error(artifacts, manifest, "incomplete")


def test_engine_json_that_disagrees_with_its_folder_name(fake_artifacts):
    artifacts, manifest = fake_artifacts
    write_engine_folder(artifacts, manifest, tensorrt_version="10.0.1")
    assert_engine_error(artifacts, manifest, "says it was built for NVIDIA H200 (sm90) with TensorRT 10.0.1")


def test_stale_engines_after_a_re_export(fake_artifacts):
    artifacts, manifest = fake_artifacts
    write_engine_folder(artifacts, manifest)
    manifest.graphs["decoder"].sha256 = "e" * 64  # decoder.onnx re-exported
    assert_engine_error(artifacts, manifest, "stale", "decoder.onnx changed")
    manifest.graphs["decoder"].sha256 = "d" * 64
    manifest.source["weights_sha256"] = "x" * 64  # other weights, same graph file
    assert_engine_error(artifacts, manifest, "stale", "other weights")


def test_missing_or_truncated_plan(fake_artifacts):
    artifacts, manifest = fake_artifacts
    folder = write_engine_folder(artifacts, manifest)
    (folder / "vision.plan").write_bytes(b"pl")
    assert_engine_error(artifacts, manifest, "vision.plan is truncated (2 of 40 bytes)")
    (folder / "vision.plan").unlink()
    assert_engine_error(artifacts, manifest, "vision.plan is missing")


# ---------------------------------------------------------------------------------------------
# 3. `llava-export engine` and the backend on the fake TensorRT (tests/support/fake_tensorrt.py)


@pytest.fixture
def artifacts(workshop, tmp_path):
    """A private copy of the tiny float32 export (engines get written into it)."""
    from exporter.testing.tiny import TinyConfig

    return shutil.copytree(workshop.artifacts(TinyConfig(), "hf"), tmp_path / "artifacts")


def engine_cli(*args):
    from exporter.cli import main

    return CliRunner().invoke(main, ["engine", *map(str, args)])


def error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    return last


def leftovers(artifacts: Path) -> list[str]:
    root = artifacts / "engines"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_build_writes_a_complete_engine_folder(fake_gpu, artifacts, tmp_path):
    cache = tmp_path / "cache" / "timing.cache"
    result = engine_cli(
        "--artifacts", artifacts, "--timing-cache", cache, "--max-batch", 2, "--workspace", 1.5
    )
    assert result.exit_code == 0, result.output
    assert (
        "wrote" in result.stderr and "Building engine" in result.stderr and "decoder/decode" in result.stderr
    )
    assert leftovers(artifacts) == [FAKE_FOLDER]
    folder = artifacts / "engines" / FAKE_FOLDER
    assert sorted(p.name for p in folder.iterdir()) == ["decoder.plan", "engine.json", "vision.plan"]
    record = json.loads((folder / "engine.json").read_text())
    manifest = contract.read_manifest(artifacts)
    assert record["gpu"] == {"name": "NVIDIA Fake 100", "compute_capability": "9.0"}
    assert record["tensorrt_version"] == "10.99.1"
    assert record["limits"] == {"max_batch": 2, "max_input_len": 256, "max_seq_len": 256}
    assert [p["name"] for p in record["profiles"]["decoder"]] == ["prefill", "decode"]
    for graph in engines.GRAPHS:
        assert record["source"][graph]["sha256"] == manifest.graphs[graph].sha256
        assert record["plans"][graph]["bytes"] == (folder / engines.PLANS[graph]).stat().st_size
    assert cache.read_bytes() == b"tt"  # both builds recorded into one cache
    assert [flag.name for flag in fake_gpu.cleared_flags] == ["TF32", "TF32"]  # float32 stays float32
    # the plans carry exactly the derived profiles
    plan = json.loads((folder / "decoder.plan").read_text())
    limits = engines.derive_limits(manifest, max_batch=2)
    expected = engines.decoder_profiles(manifest, limits)
    assert plan["profiles"] == [
        {n: [list(r.min), list(r.opt), list(r.max)] for n, r in p.shapes.items()} for p in expected
    ]
    assert (
        engines.select_engine(artifacts, manifest, GpuIdentity("NVIDIA Fake 100", 9, 0, "10.99.1")).path
        == folder
    )


def test_rebuild_reuses_the_timing_cache_and_replaces_the_folder(fake_gpu, artifacts, tmp_path):
    cache = tmp_path / "timing.cache"
    assert engine_cli("--artifacts", artifacts, "--timing-cache", cache).exit_code == 0
    before = json.loads((artifacts / "engines" / FAKE_FOLDER / "engine.json").read_text())
    result = engine_cli("--artifacts", artifacts, "--timing-cache", cache, "--max-seq-len", 128)
    assert result.exit_code == 0, result.output
    assert fake_gpu.caches_loaded == [b"", b"t", b"tt", b"ttt"]
    after = json.loads((artifacts / "engines" / FAKE_FOLDER / "engine.json").read_text())
    assert before["limits"]["max_seq_len"] == 256 and after["limits"]["max_seq_len"] == 128
    assert leftovers(artifacts) == [FAKE_FOLDER]


def test_default_timing_cache_lives_outside_the_artifacts(fake_gpu, artifacts, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert engine_cli("--artifacts", artifacts).exit_code == 0
    assert (tmp_path / "xdg" / "llava-export" / f"timing-{FAKE_FOLDER}.cache").read_bytes() == b"tt"


def test_a_corrupt_timing_cache_is_replaced(fake_gpu, artifacts, tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"corrupt")
    result = engine_cli("--artifacts", artifacts, "--timing-cache", cache)
    assert result.exit_code == 0, result.output
    assert "not usable" in result.stderr and cache.read_bytes() == b"tt"


def test_parser_rejection_names_the_node_and_op(fake_gpu, artifacts):
    fake_gpu.reject = ("decoder.onnx", "GatherND")
    line = error_line(engine_cli("--artifacts", artifacts))
    assert (
        "TensorRT's ONNX parser rejected decoder.onnx" in line and "(GatherND): unsupported attribute" in line
    )
    assert leftovers(artifacts) == []


def test_failed_build_leaves_the_previous_engines_alone(fake_gpu, artifacts):
    assert engine_cli("--artifacts", artifacts).exit_code == 0
    plan = (artifacts / "engines" / FAKE_FOLDER / "decoder.plan").read_bytes()
    fake_gpu.fail_build = "decoder.onnx"
    line = error_line(engine_cli("--artifacts", artifacts, "--max-seq-len", 100))
    assert "could not build the decoder engine" in line
    assert leftovers(artifacts) == [FAKE_FOLDER]
    assert (artifacts / "engines" / FAKE_FOLDER / "decoder.plan").read_bytes() == plan


def test_interrupted_build_leaves_nothing(fake_gpu, artifacts):
    fake_gpu.interrupt_at = "decoder.onnx"
    result = engine_cli("--artifacts", artifacts)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert leftovers(artifacts) == []


def test_stale_onnx_is_refused_before_building(fake_gpu, artifacts):
    with open(artifacts / "decoder.onnx", "ab") as handle:
        handle.write(b"\0")
    line = error_line(engine_cli("--artifacts", artifacts))
    assert "decoder.onnx is not the graph its manifest describes" in line
    assert fake_gpu.executions == [] and leftovers(artifacts) == []


def test_weight_quantized_decoders_are_refused(artifacts):
    manifest = contract.read_manifest(artifacts)
    manifest.graphs["decoder"].quant = "int8"
    contract.write_manifest(artifacts, manifest)
    line = error_line(engine_cli("--artifacts", artifacts, "--dry-run"))
    assert "--quant int8" in line and "without --quant" in line


def test_static_kv_decoders_are_refused(artifacts):
    manifest = contract.read_manifest(artifacts)
    manifest.graphs["decoder"].kv_cache, manifest.graphs["decoder"].max_seq_len = contract.KV_STATIC, 256
    contract.write_manifest(artifacts, manifest)
    line = error_line(engine_cli("--artifacts", artifacts, "--dry-run"))
    assert "GroupQueryAttention" in line and "without --kv-cache" in line


def test_without_tensorrt_the_build_says_what_to_install(artifacts, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    line = error_line(engine_cli("--artifacts", artifacts))
    assert "TensorRT is not installed" in line and "llava-export[gpu]" in line


# -- the backend on the fake ----------------------------------------------------------------


def build(artifacts, *args):
    result = engine_cli("--artifacts", artifacts, *args)
    assert result.exit_code == 0, result.output


PROMPT = "What is shown in the image?"


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "image.png"
    Image.fromarray((np.arange(40 * 48 * 3) % 251).astype(np.uint8).reshape(40, 48, 3)).save(path)
    return path


def test_backend_answers_like_onnx_runtime(fake_gpu, artifacts, image):
    from runtime.pipeline import Pipeline, Request

    build(artifacts, "--max-batch", 2)
    trt_pipe, ort_pipe = Pipeline.load(artifacts, backend="trt"), Pipeline.load(artifacts, backend="ort")
    assert trt_pipe.backend.name == "trt" and trt_pipe.backend.dtype == np.float32
    assert (
        trt_pipe.generate(PROMPT, [image], max_new_tokens=8).token_ids
        == ort_pipe.generate(PROMPT, [image], max_new_tokens=8).token_ids
    )
    requests = [Request(PROMPT, [image]), Request("Describe it in detail, please.", [image, image])]
    ours = [a.token_ids for a in trt_pipe.generate_batch(requests, max_new_tokens=6)]
    theirs = [a.token_ids for a in ort_pipe.generate_batch(requests, max_new_tokens=6)]
    assert ours == theirs
    trt_pipe.backend.close()


def test_kv_cache_stays_on_the_device_and_ping_pongs(fake_gpu, artifacts, image):
    from runtime.pipeline import Pipeline

    build(artifacts)
    pipe = Pipeline.load(artifacts, backend="trt")
    manifest = pipe.manifest
    fake_gpu.executions.clear()
    fake_gpu.cudart.copies.clear()
    pipe.generate(PROMPT, [image], max_new_tokens=6)
    runs = [run for run in fake_gpu.executions if run["plan"] == "decoder.onnx"]
    assert [run["profile"] for run in runs] == [0, 1, 1, 1, 1, 1]
    layers = manifest.text.num_layers
    for before, after in zip(runs, runs[1:]):
        for layer in range(layers):
            # this step's present is next step's past: no copy in between
            assert (
                after["addresses"][contract.past_key_name(layer)]
                == before["addresses"][contract.present_key_name(layer)]
            )
            assert (
                after["addresses"][contract.past_value_name(layer)]
                == before["addresses"][contract.present_value_name(layer)]
            )
    assert runs[2]["addresses"][contract.past_key_name(0)] == runs[0]["addresses"][contract.past_key_name(0)]
    # per decode step only the new token's embedding, mask and position go up, and the logits come down
    hidden, vocab = manifest.text.hidden_size, manifest.text.vocab_size
    copies = fake_gpu.cudart.copies
    vision_copies = 2  # pixels up, image embeddings down
    prefill_copies = 4  # embeds, mask, positions up; logits down
    per_step = copies[vision_copies + prefill_copies :]
    assert len(per_step) == 4 * 5
    for step in range(5):
        (k1, embeds), (k2, mask), (k3, positions), (k4, logits) = per_step[4 * step : 4 * step + 4]
        assert (k1, k2, k3, k4) == ("h2d", "h2d", "h2d", "d2h")
        assert embeds == hidden * 4 and positions == 8 and logits == vocab * 4
        assert mask == 8 * runs[step + 1]["shapes"][contract.ATTENTION_MASK][1]
    pipe.backend.close()
    assert all(kind != "device" for _, kind in fake_gpu.cudart.blocks.values()), "device memory leaked"
    assert not fake_gpu.cudart.blocks, "pinned memory leaked"


def test_prompt_longer_than_the_engine_is_refused_before_any_compute(fake_gpu, artifacts, image):
    from runtime import prompts
    from runtime.pipeline import Pipeline, Request

    ort_pipe = Pipeline.load(artifacts, backend="ort")
    short = prompts.count_prompt_tokens(
        ort_pipe.tokenize(Request("Hi", [image])), ort_pipe.manifest.vision.num_image_tokens
    )
    limit, capacity = short + 2, short + 12
    build(artifacts, "--max-input-len", limit, "--max-seq-len", capacity)
    pipe = Pipeline.load(artifacts, backend="trt")
    pipe.manifest.tokens.eos = []  # this pipeline's own: no EOS, every answer runs to max_new_tokens
    limits = pipe.backend.limits
    assert (limits.max_input, limits.kv_capacity, limits.max_batch) == (limit, capacity, 1)
    fake_gpu.executions.clear()
    with pytest.raises(PromptError, match=rf"TensorRT engine takes at most {limit} .*--max-input-len"):
        pipe.generate("Describe this image with many many words, please, thank you.", [image])
    # the last token is never fed back: a prompt of `short` positions leaves room for this many
    room = capacity - short + 1
    with pytest.raises(
        PromptError,
        match=rf"holds {capacity}: ask for at most {room} new tokens or resize the TensorRT engine: "
        rf"`llava-export engine --artifacts {artifacts} --max-seq-len {capacity + 1}`",
    ):
        pipe.generate("Hi", [image], max_new_tokens=room + 1)
    assert fake_gpu.executions == []  # neither refusal ran the vision engine or the decoder
    answer = pipe.generate("Hi", [image], max_new_tokens=room)
    assert len(answer.token_ids) == room
    widest = max(
        run["shapes"][contract.ATTENTION_MASK][1]
        for run in fake_gpu.executions
        if run["plan"] == "decoder.onnx"
    )
    assert widest == capacity
    pipe.close()


def test_backend_limits_and_stale_cache_handles(fake_gpu, artifacts):
    from runtime.backends.base import Limits
    from runtime.backends.trt import TrtBackend

    build(artifacts)
    manifest = contract.read_manifest(artifacts)
    backend = TrtBackend(artifacts, manifest)
    hidden = manifest.text.hidden_size
    # the engine's build limits, the fixed cache (max_seq_len) included, are declared
    assert backend.limits == Limits(
        max_positions=256,
        kv_capacity=256,
        max_input=256,
        max_batch=1,
        owner="the TensorRT engine",
        resize=f"llava-export engine --artifacts {artifacts}",
    )
    with pytest.raises(EngineError, match="--max-batch 2"):
        backend.limits.check(batch=2, prompt=3, new_tokens=1)
    cache = backend.empty_cache(1)
    embeds = np.zeros((1, 3, hidden), np.float32)
    mask, positions = np.ones((1, 3), np.int64), np.arange(3)[None]
    logits, newer = backend.decode(embeds, mask, positions, cache)
    assert logits.shape == (1, manifest.text.vocab_size) and newer.length == 3
    with pytest.raises(EngineError, match="latest"):
        backend.decode(embeds, mask, positions, cache)  # the old handle: its slab is being reused
    with pytest.raises(EngineError, match="profile"):
        backend.decode(
            np.zeros((1, 2, hidden), np.float32), np.ones((1, 5), np.int64), np.arange(3, 5)[None], newer
        )
    runs = len(fake_gpu.executions)
    with pytest.raises(EngineError, match="no optimization profile .* takes 1 x 300 new positions after 0"):
        backend.decode(  # a direct call outside the profiles is refused, not run
            np.zeros((1, 300, hidden), np.float32),
            np.ones((1, 300), np.int64),
            np.arange(300)[None],
            backend.empty_cache(1),
        )
    assert len(fake_gpu.executions) == runs
    backend.close()
    backend.close()  # idempotent
    with pytest.raises(EngineError, match="the trt backend is closed"):
        backend.empty_cache(1)
    assert not fake_gpu.cudart.blocks, "memory leaked"


def prefill(backend, embeds: np.ndarray):
    """A prefill of these [B,S,hidden] embeddings (no padding) on a new empty cache."""
    batch, sequence, _ = embeds.shape
    positions = np.broadcast_to(np.arange(sequence), (batch, sequence))
    return backend.decode(embeds, np.ones((batch, sequence), np.int64), positions, backend.empty_cache(batch))


def decode_one(backend, embeds: np.ndarray, cache):
    """One decode step of these [B,1,hidden] embeddings after the cache's positions (no padding)."""
    batch, past = len(embeds), cache.length
    mask, positions = np.ones((batch, past + 1), np.int64), np.full((batch, 1), past, np.int64)
    return backend.decode(embeds, mask, positions, cache)


def test_cache_regroups_through_the_host_like_a_batch(fake_gpu, artifacts):
    """The scheduler's regroup: two rows prefilled alone, their caches brought to the host and
    merged into one batch, decode as the same two rows prefilled together do."""
    from runtime.backends.trt import TrtBackend

    build(artifacts, "--max-batch", 2)
    manifest = contract.read_manifest(artifacts)
    text = manifest.text
    backend = TrtBackend(artifacts, manifest)
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((2, 3, text.hidden_size)).astype(np.float32)
    step = rng.standard_normal((2, 1, text.hidden_size)).astype(np.float32)

    alone = []
    for row in range(2):
        _, cache = prefill(backend, rows[row : row + 1])
        arrays = backend.cache_to_host(cache, 3)
        assert len(arrays) == 2 * text.num_layers
        assert all(a.shape == (1, text.num_kv_heads, 3, text.head_dim) for a in arrays)
        assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)
        assert len({a.tobytes() for a in arrays}) == len(arrays)  # every layer's key and value its own
        alone.append(arrays)
    merged = [np.concatenate(pair) for pair in zip(*alone)]
    assert backend.kv.batch == 1
    cache = backend.cache_from_host(merged)  # the slabs grow to 2 rows
    assert (cache.batch, cache.length, backend.kv.batch) == (2, 3, 2)
    # what goes up comes down, byte for byte; a shorter length is a prefix of the positions
    assert all(np.array_equal(a, b) for a, b in zip(backend.cache_to_host(cache, 3), merged))
    assert all(np.array_equal(a, b[:, :, :2]) for a, b in zip(backend.cache_to_host(cache, 2), merged))
    with pytest.raises(EngineError, match="4 positions of a cache holding 3"):
        backend.cache_to_host(cache, 4)
    regrouped, after = decode_one(backend, step, cache)
    assert after.length == 4

    _, together = prefill(backend, rows)
    batched = backend.cache_to_host(together, 3)
    assert all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(merged, batched))
    expected, _ = decode_one(backend, step, together)
    np.testing.assert_allclose(regrouped, expected, rtol=1e-5, atol=1e-5)
    # a regroup that reorders the rows reorders the answers (and needs no new slabs)
    swapped, _ = decode_one(backend, step[::-1], backend.cache_from_host([a[::-1] for a in merged]))
    np.testing.assert_allclose(swapped, expected[::-1], rtol=1e-5, atol=1e-5)
    backend.close()
    assert not fake_gpu.cudart.blocks, "memory leaked"


def test_cache_from_host_refuses_what_the_engine_cannot_hold(fake_gpu, artifacts):
    from runtime.backends.trt import TrtBackend

    build(artifacts, "--max-seq-len", 128)  # max_batch 1
    manifest = contract.read_manifest(artifacts)
    text = manifest.text
    backend = TrtBackend(artifacts, manifest)
    hidden, layers = text.hidden_size, text.num_layers
    _, cache = prefill(backend, np.ones((1, 3, hidden), np.float32))
    arrays = backend.cache_to_host(cache, 3)

    def cache_of(batch, positions):
        shape = (batch, text.num_kv_heads, positions, text.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * layers)]

    runs, copies = len(fake_gpu.executions), len(fake_gpu.cudart.copies)
    with pytest.raises(
        EngineError,
        match=rf"2 sequences in one batch; the TensorRT engine takes at most 1: send fewer or resize the "
        rf"TensorRT engine: `llava-export engine --artifacts {artifacts} --max-batch 2`",
    ):
        backend.cache_from_host(cache_of(2, 3))
    with pytest.raises(
        PromptError, match=r"reach 129 positions; the TensorRT engine holds 128: .*--max-seq-len 129`"
    ):
        backend.cache_from_host(cache_of(1, 129))
    with pytest.raises(EngineError, match="one per past input"):
        backend.cache_from_host(arrays[:-1])
    with pytest.raises(EngineError, match=r"past_key_values\.1\.key is \(1, \d+, 4, \d+\)"):
        backend.cache_from_host(
            [*arrays[:2], np.zeros((1, text.num_kv_heads, 4, text.head_dim)), *arrays[3:]]
        )
    # refused before anything moved: the slabs, and the live cache in them, are as they were
    assert backend.kv.batch == 1 and len(fake_gpu.cudart.copies) == copies
    assert all(np.array_equal(a, b) for a, b in zip(backend.cache_to_host(cache, 3), arrays))
    assert len(fake_gpu.executions) == runs
    full = backend.cache_from_host(cache_of(1, 128))  # the whole capacity fits
    assert full.length == 128
    backend.close()


def test_stale_caches_are_refused_by_cache_to_host(fake_gpu, artifacts):
    from runtime.backends.trt import TrtBackend

    build(artifacts)
    manifest = contract.read_manifest(artifacts)
    backend = TrtBackend(artifacts, manifest)
    hidden = manifest.text.hidden_size
    empty = backend.empty_cache(1)
    _, cache = prefill(backend, np.ones((1, 3, hidden), np.float32))  # a new empty cache: `empty` is stale
    with pytest.raises(EngineError, match="latest"):
        backend.cache_to_host(empty, 0)
    arrays = backend.cache_to_host(cache, 3)
    restored = backend.cache_from_host(arrays)
    for stale in (cache, empty):  # a regroup starts a new cache: the one it came from is gone
        with pytest.raises(EngineError, match="latest"):
            backend.cache_to_host(stale, stale.length)
        with pytest.raises(EngineError, match="latest"):
            decode_one(backend, np.ones((1, 1, hidden), np.float32), stale)
    with pytest.raises(EngineError, match="latest"):
        backend.cache_to_host(("not", "a", "cache"), 0)
    _, newer = decode_one(backend, np.ones((1, 1, hidden), np.float32), restored)
    with pytest.raises(EngineError, match="latest"):
        backend.cache_to_host(restored, 3)  # one step on, its handle is stale too
    assert backend.cache_to_host(newer, 4)[0].shape[2] == 4
    backend.close()
    with pytest.raises(EngineError, match="the trt backend is closed"):
        backend.cache_to_host(newer, 4)


def test_backend_is_a_context_manager(fake_gpu, artifacts):
    from runtime.backends import load_backend

    build(artifacts)
    with load_backend("trt", artifacts, contract.read_manifest(artifacts)) as backend:
        backend.empty_cache(1)
        assert fake_gpu.cudart.blocks
    assert backend.closed and not fake_gpu.cudart.blocks


def test_engines_from_another_gpu_or_tensorrt_are_refused_at_load(fake_gpu, artifacts):
    from runtime.pipeline import Pipeline

    build(artifacts)
    fake_gpu.cudart.props.name = b"NVIDIA Other 200\0"
    with pytest.raises(
        EngineError, match=rf"NVIDIA Fake 100 \(sm90\).*llava-export engine --artifacts {artifacts}"
    ):
        Pipeline.load(artifacts, backend="trt")
    fake_gpu.cudart.props.name = b"NVIDIA Fake 100\0"
    sys.modules["tensorrt"].__version__ = "10.99.2"
    with pytest.raises(
        EngineError, match=r"built with TensorRT 10\.99\.1, this machine has TensorRT 10\.99\.2"
    ):
        Pipeline.load(artifacts, backend="trt")


def test_not_enough_device_memory_for_the_cache(fake_gpu, artifacts):
    from runtime.backends.trt import TrtBackend

    build(artifacts)
    backend = TrtBackend(artifacts, contract.read_manifest(artifacts))
    fake_gpu.cudart.device_limit = 0
    with pytest.raises(EngineError, match="not enough GPU memory for the KV cache.*--max-seq-len"):
        backend.empty_cache(1)
    fake_gpu.cudart.device_limit = None
    backend.close()


def test_engine_command_needs_no_torch(artifacts):
    """Engines are built where the ONNX and TensorRT are, often without the exporter's torch."""
    import subprocess

    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError('no ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from exporter.cli import main\n"
        "main(['engine', '--artifacts', sys.argv[1], '--dry-run'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(artifacts)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stderr
    assert "profile decoder/decode" in done.stderr


# -- LLaVA-1.6 (anyres) on the fake: tile batches through the vision engine ---------------------


@pytest.fixture
def next_artifacts(workshop, tmp_path):
    """A private copy of the tiny LLaVA-1.6 float32 export (TINY_PINPOINTS: at most 5 tiles and
    88 tokens an image; 640 positions)."""
    from exporter.testing.tiny import TinyConfig

    config = TinyConfig(anyres=TINY_PINPOINTS, max_positions=640)
    return shutil.copytree(workshop.artifacts(config, "hf"), tmp_path / "next")


def picture(height: int, width: int, seed: int = 0):
    """A PIL image of (height, width): a gradient under noise, so tiles differ."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    return Image.fromarray(np.clip(ramp + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8))


# (height, width) -> tiles with TINY_PINPOINTS: the 64 x 64 grid (5, the most), 32 x 96 (4), 32 x 64 (3)
SQUARE, WIDE, SMALL = (70, 70), (45, 100), (30, 60)


def vision_runs(fake_gpu) -> list[int]:
    """The tile batch of every vision engine run so far (each in profile 0)."""
    runs = [run for run in fake_gpu.executions if run["plan"] == "vision.onnx"]
    assert all(run["profile"] == 0 for run in runs)
    return [run["shapes"][contract.PIXEL_VALUES][0] for run in runs]


def test_anyres_engines_are_built_for_tile_batches(fake_gpu, next_artifacts):
    manifest = contract.read_manifest(next_artifacts)
    assert engines.tiles_per_image(manifest) == 5 and engines.max_image_tokens(manifest) == 88
    result = engine_cli("--artifacts", next_artifacts, "--max-batch", 2)
    assert result.exit_code == 0, result.output
    assert "an image is 88 at most" in result.stderr, result.stderr
    assert "profile vision/images: tiles 1..5..10" in result.stderr, result.stderr
    folder = next_artifacts / "engines" / FAKE_FOLDER
    record = json.loads((folder / "engine.json").read_text())
    assert record["limits"] == {"max_batch": 2, "max_input_len": 640, "max_seq_len": 640}
    assert record["profiles"]["vision"] == [
        {
            "name": "images",
            "shapes": {
                "pixel_values": {"min": [1, 3, 32, 32], "opt": [5, 3, 32, 32], "max": [10, 3, 32, 32]}
            },
        }
    ]
    # the plan carries that profile (what the fake TensorRT holds set_input_shape to)
    plan = json.loads((folder / "vision.plan").read_text())
    assert plan["profiles"] == [{"pixel_values": [[1, 3, 32, 32], [5, 3, 32, 32], [10, 3, 32, 32]]}]
    prefill = json.loads((folder / "decoder.plan").read_text())["profiles"][0]
    assert prefill[contract.INPUTS_EMBEDS] == [
        [1, 1, 64],
        [1, 88 + engines.OPT_TEXT_TOKENS, 64],
        [2, 640, 64],
    ]
    line = error_line(engine_cli("--artifacts", next_artifacts, "--dry-run", "--max-input-len", 88))
    assert "--max-input-len 88 cannot hold one image (88 tokens)" in line and "use at least 89" in line


def test_llava_1_5_engines_keep_one_image_per_vision_run(fake_gpu, artifacts):
    result = engine_cli("--artifacts", artifacts, "--max-batch", 2)
    assert result.exit_code == 0, result.output
    assert "(an image is 16)" in result.stderr and "profile vision/images: images 1..1..2 " in result.stderr
    plan = json.loads((artifacts / "engines" / FAKE_FOLDER / "vision.plan").read_text())
    assert plan["profiles"] == [{"pixel_values": [[1, 3, 32, 32], [1, 3, 32, 32], [2, 3, 32, 32]]}]


@pytest.mark.parametrize(
    "max_batch, chunks",
    [
        (1, {1: [1], 4: [4], 5: [5], 6: [5, 1], 12: [5, 5, 2]}),
        (2, {3: [3], 10: [10], 12: [10, 2], 21: [10, 10, 1]}),
    ],
)
def test_anyres_backend_encodes_tiles_in_chunks_of_the_profile(fake_gpu, next_artifacts, max_batch, chunks):
    """More tiles than one run takes go in chunks of max_batch x 5 (the vision profile's max),
    fewer in one run of their own size; the embeddings are ONNX Runtime's, tile for tile."""
    from runtime.backends import load_backend

    build(next_artifacts, "--max-batch", max_batch)
    manifest = contract.read_manifest(next_artifacts)
    rng = np.random.default_rng(max_batch)
    with (
        load_backend("trt", next_artifacts, manifest) as trt,
        load_backend("ort", next_artifacts, manifest) as ort,
    ):
        assert trt.tiles_per_run == max_batch * 5
        for count, expected in chunks.items():
            pixels = rng.standard_normal((count, 3, 32, 32)).astype(np.float32)
            fake_gpu.executions.clear()
            ours = trt.encode_images(pixels)
            assert vision_runs(fake_gpu) == expected, count
            assert ours.shape == (count, 16, 64) and ours.dtype == np.float32
            np.testing.assert_allclose(ours, ort.encode_images(pixels), rtol=1e-5, atol=1e-5)


def test_anyres_backend_follows_the_engines_profile(fake_gpu, next_artifacts, monkeypatch):
    """An engine whose vision profile takes fewer tiles than max_batch x 5 (built before
    LLaVA-1.6 support: one tile per image) still encodes every image, in runs it takes."""
    from runtime.backends import load_backend

    def one_tile_per_image(manifest, limits):
        size = manifest.preprocess.crop_size
        pixels = ShapeRange((1, 3, size, size), (1, 3, size, size), (limits.max_batch, 3, size, size))
        return [engines.Profile(engines.VISION_PROFILE, {contract.PIXEL_VALUES: pixels})]

    with monkeypatch.context() as patch:
        patch.setattr(engines, "vision_profiles", one_tile_per_image)
        build(next_artifacts, "--max-batch", 2)
    manifest = contract.read_manifest(next_artifacts)
    pixels = np.random.default_rng(3).standard_normal((5, 3, 32, 32)).astype(np.float32)
    with (
        load_backend("trt", next_artifacts, manifest) as trt,
        load_backend("ort", next_artifacts, manifest) as ort,
    ):
        assert trt.tiles_per_run == 2
        fake_gpu.executions.clear()
        np.testing.assert_allclose(trt.encode_images(pixels), ort.encode_images(pixels), rtol=1e-5, atol=1e-5)
        assert vision_runs(fake_gpu) == [2, 2, 1]


def test_anyres_pipeline_on_trt_answers_like_onnx_runtime(fake_gpu, next_artifacts):
    """A LLaVA-1.6 prompt through the fake TensorRT: an image of fewer tiles than the most runs
    as a batch of its own size (the profile's dynamic batch), a batch of requests whose tiles
    outnumber one run is chunked across image boundaries; the answers are ONNX Runtime's."""
    from runtime import anyres, prompts
    from runtime.pipeline import Pipeline, Request

    build(next_artifacts, "--max-batch", 2)
    with (
        Pipeline.load(next_artifacts, backend="trt") as trt,
        Pipeline.load(next_artifacts, backend="ort") as ort,
    ):
        spec = trt.manifest.anyres
        assert [anyres.tile_count(size, spec) for size in (SQUARE, WIDE, SMALL)] == [5, 4, 3]
        fake_gpu.executions.clear()
        small = picture(*SMALL)
        answer = trt.generate(PROMPT, [small], max_new_tokens=8)
        assert answer.token_ids == ort.generate(PROMPT, [small], max_new_tokens=8).token_ids
        assert vision_runs(fake_gpu) == [3]  # below the opt of 5, in one run
        # the prefill holds the image's 52 packed tokens (not 16, not the most, 88)
        chunks = trt.tokenize(Request(PROMPT, [small]))
        prefill = next(run for run in fake_gpu.executions if run["plan"] == "decoder.onnx")
        assert anyres.image_token_count(SMALL, spec, trt.manifest.vision) == 52
        assert prefill["shapes"][contract.INPUTS_EMBEDS][1] == prompts.count_prompt_tokens(chunks, [52])

        requests = [
            Request("Compare the two pictures.", [picture(*SQUARE, seed=1), picture(*WIDE, seed=2)]),
            Request(PROMPT, [picture(*SMALL, seed=3)]),
        ]
        fake_gpu.executions.clear()
        ours = [a.token_ids for a in trt.generate_batch(requests, max_new_tokens=6)]
        assert vision_runs(fake_gpu) == [10, 2]  # 5 + 4 + 3 tiles, the WIDE image's split
        assert ours == [a.token_ids for a in ort.generate_batch(requests, max_new_tokens=6)]


def test_anyres_prompt_longer_than_the_engine_is_refused_before_any_compute(fake_gpu, next_artifacts):
    """The engine's max_input_len is checked against each image's own tokens (from its size):
    the prompt with the smaller image fits, the same prompt with a larger one does not."""
    from runtime import prompts
    from runtime.pipeline import Pipeline, Request

    with Pipeline.load(next_artifacts, backend="ort") as ort:
        chunks = ort.tokenize(Request(PROMPT, [picture(*SMALL)]))
    fits = prompts.count_prompt_tokens(chunks, [52])  # SMALL: 52 tokens, SQUARE: 88
    build(next_artifacts, "--max-input-len", fits, "--max-seq-len", fits + 8)
    with Pipeline.load(next_artifacts, backend="trt") as trt:
        fake_gpu.executions.clear()
        with pytest.raises(
            PromptError, match=rf"TensorRT engine takes at most {fits} .*--max-input-len {fits + 36}"
        ):
            trt.generate(PROMPT, [picture(*SQUARE)], max_new_tokens=2)
        assert fake_gpu.executions == []
        assert len(trt.generate(PROMPT, [picture(*SMALL)], max_new_tokens=2).token_ids) == 2
        assert vision_runs(fake_gpu) == [3]
