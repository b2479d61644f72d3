"""The toy LLaVA: its data is deterministic, its training script runs, its shipped weights load.

The full training (docs/toy-model.md) takes minutes; the smoke test runs three steps of it so
the script cannot rot. The held-out accuracy target itself is measured by the eval, not here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exporter.toy import data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HF_DIR = ROOT / "models" / "toy-llava"
ORIGINAL_DIR = ROOT / "models" / "toy-llava-original"
CLIP_DIR = ROOT / "models" / "toy-clip"


# ---------------------------------------------------------------------------------------------
# Data


def test_examples_are_deterministic():
    for seed in (0, 7, 123456):
        image_a, caption_a, qa_a = data.make_example(seed)
        image_b, caption_b, qa_b = data.make_example(seed)
        assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
        assert (caption_a, qa_a) == (caption_b, qa_b)
        assert image_a.size == (data.IMAGE_SIZE, data.IMAGE_SIZE) and image_a.mode == "RGB"


def test_different_seeds_draw_different_images():
    images = [np.asarray(data.make_example(seed)[0]) for seed in range(5)]
    assert all(not np.array_equal(images[0], other) for other in images[1:])


def test_splits_are_disjoint_and_deterministic():
    train, test = data.split_seeds("train", 1000), data.split_seeds("test", 1000)
    assert not set(train) & set(test)
    # the whole ranges never meet either, however many examples a split is asked for
    assert data.split_seeds("train", data.SPLIT_SIZE)[-1] < data.split_seeds("test", 1)[0]
    first = data.split("test", 2)
    again = data.split("test", 2)
    assert [(c, qa) for _, c, qa in first] == [(c, qa) for _, c, qa in again]
    assert first[0][1] == data.make_example(test[0])[1]
    with pytest.raises(ValueError):
        data.split("validation", 1)


def test_answers_are_short_and_canonical():
    closed = (
        set(data.COLOURS) | set(data.SHAPES) | set(data.SIZES) | set(data.POSITIONS) | set(data.BACKGROUNDS)
        | {str(n) for n in range(data.MAX_OBJECTS + 1)}
    )  # fmt: skip
    kinds = set()
    for seed in data.split_seeds("train", 200):
        scene = data.make_scene(seed)
        _, caption, qa = data.make_example(seed)
        assert caption.endswith(f"on a {scene.background} background")
        for question, answer in qa:
            kind = data.question_kind(question)
            kinds.add(kind)
            if kind == "describe":
                assert answer == data.description(scene)
            else:
                assert answer in closed, (question, answer)
        # every "colour shape" names one object
        assert len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects)
    assert kinds == {"describe", "count", "count_shape", "background", "colour", "shape", "where", "size"}


def test_description_example():
    scene = data.Scene(
        0,
        (data.Shape("red", "circle", "large", 0), data.Shape("orange", "square", "small", 4)),
        "gray",
    )
    assert data.description(scene) == "a red circle and an orange square on a gray background"
    assert data.caption(scene) == (
        "a large red circle at the top left and a small orange square at the center on a gray background"
    )


# ---------------------------------------------------------------------------------------------
# Training script


def test_training_smoke(tmp_path):
    from exporter.toy import train

    started = time.monotonic()
    out = tmp_path / "toy-llava"
    accuracy = train.main(
        [
            "--out",
            str(out),
            "--steps",
            "3",
            "--vision-steps",
            "2",
            "--pool",
            "8",
            "--batch-size",
            "4",
            "--caption-batch-size",
            "4",
            "--eval-images",
            "1",
            "--log-every",
            "1",
        ]
    )
    assert 0.0 <= accuracy <= 1.0
    for folder, files in {
        out: [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "preprocessor_config.json",
            "training.json",
        ],
        tmp_path / "toy-llava-original": ["config.json", "model.safetensors", "tokenizer.json"],
        tmp_path / "toy-clip": ["config.json", "model.safetensors", "preprocessor_config.json"],
    }.items():
        for name in files:
            assert (folder / name).is_file(), folder / name
    original = json.loads((tmp_path / "toy-llava-original" / "config.json").read_text())
    assert original["mm_vision_tower"] == "../toy-clip"
    assert original["mm_projector_type"] == "mlp2x_gelu" and original["image_aspect_ratio"] == "pad"
    print(f"smoke training took {time.monotonic() - started:.1f}s")


def test_answer_tokens_are_what_greedy_decoding_emits():
    """The answer's training tokens follow the prompt exactly as in the whole text's tokenization."""
    import tempfile

    from exporter.toy import train

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = train.build_tokenizer(Path(scratch), train.ToyConfig().vocab_size)
    train.check_answer_tokens(tokenizer, data.split("test", 10))


# ---------------------------------------------------------------------------------------------
# Shipped weights


def shipped():
    if not (HF_DIR / "model.safetensors").is_file():
        pytest.skip("models/toy-llava is not in this checkout")


def test_shipped_size_budget():
    shipped()
    total = sum(f.stat().st_size for d in (HF_DIR, ORIGINAL_DIR, CLIP_DIR) for f in d.glob("*.safetensors"))
    assert total <= 10 * 1024 * 1024, total


def test_original_names_the_tower_relative_to_itself():
    shipped()
    config = json.loads((ORIGINAL_DIR / "config.json").read_text())
    assert (ORIGINAL_DIR / config["mm_vision_tower"]).resolve() == CLIP_DIR.resolve()


def test_shipped_formats_load_and_agree():
    """Both formats load through exporter.source and give identical image features and logits."""
    from exporter.source import load_source
    from exporter.toy.evaluate import pixel_values, prompt_ids
    from exporter.toy.train import prompt_format

    shipped()
    hf = load_source(str(HF_DIR))
    original = load_source(str(ORIGINAL_DIR), vision_tower=str(CLIP_DIR))
    assert hf.format == "hf" and original.format == "original"
    assert hf.preprocess == original.preprocess and hf.preprocess.aspect == "pad"
    assert hf.vision == original.vision and hf.text == original.text

    images = [image for image, _, _ in data.split("test", 2)]
    pixels = pixel_values(images, hf.preprocess)  # [2,3,H,W]
    with torch.no_grad():
        features_hf = hf.model.model.get_image_features(pixels).pooler_output
        features_original = original.model.model.get_image_features(pixels).pooler_output
    for a, b in zip(features_hf, features_original):
        assert torch.equal(a, b)

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(HF_DIR / "tokenizer.json"))
    ids = torch.tensor(
        [prompt_ids(tokenizer, "What colour is the background?", prompt_format(hf.model.config))]
    )
    with torch.no_grad():
        logits_hf = hf.model(input_ids=ids, pixel_values=pixels[:1]).logits
        logits_original = original.model(input_ids=ids, pixel_values=pixels[:1]).logits
    assert torch.equal(logits_hf, logits_original)


def test_shipped_model_answers():
    """A handful of held-out questions through HF generate (the full eval measures >= 200)."""
    from tokenizers import Tokenizer
    from transformers import LlavaForConditionalGeneration

    from exporter.toy.evaluate import score_reference
    from exporter.toy.train import prompt_format, toy_preprocess

    shipped()
    torch.set_num_threads(2)
    model = LlavaForConditionalGeneration.from_pretrained(HF_DIR, dtype=torch.float32)
    tokenizer = Tokenizer.from_file(str(HF_DIR / "tokenizer.json"))
    spec = toy_preprocess(model.config.vision_config.image_size)
    result = score_reference(model, tokenizer, data.split("test", 3), prompt_format(model.config), spec)
    assert result.total >= 20
    assert result.accuracy >= 0.8, result.summary()


def test_example_image_is_a_held_out_scene():
    """examples/shapes.png (the demo's image) is test-split seed 1073742827 (index 1003), outside
    the images any evaluation uses."""
    from PIL import Image

    image = Image.open(ROOT / "examples" / "shapes.png").convert("RGB")
    assert 1073742827 in data.split_seeds("test", 1004)
    assert np.array_equal(np.asarray(image), np.asarray(data.make_example(1073742827)[0]))
