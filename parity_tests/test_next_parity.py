"""LLaVA-1.6 (anyres) end to end: the runtime against `LlavaNextForConditionalGeneration`.

The reference side is transformers alone: its `LlavaNextImageProcessorPil` makes the pixel
values and image sizes, `get_image_features` (tower, projector, pack_image_features) the
image embeddings, `generate` the tokens, on the runtime's own tokenization with each image's
place holding `image_token_index` once per embedding the reference packs for it. The runtime
side is an artifact folder and `Pipeline` (runtime/anyres.py tiles, the vision graph,
runtime/anyres.py packs). Near ties are handled as in test_generation_parity.py: tokens are
compared up to the first step whose reference top-2 margin is below MARGIN_TOL.

Cases: the tiny NeXT models of every text family, both pinpoint lists (the default list
scaled to the tiny 32-pixel tile, and a list that is not symmetric in height and width), each
exported from both source formats; batch 1 and 2, one image and two images per prompt.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.pipeline import Pipeline, Request, Timings
from tests.support.fixtures import gradient_pictures
from tests.support.generation import compare_greedy, greedy_with_margins

MARGIN_TOL = 1e-3
MIN_STEPS = 12
NEW_TOKENS = 24
# The default pinpoints scaled to a 32-pixel tile, and a list whose pairs have no mirror
# image, where (height, width) against (width, height) matters (HF's order).
DEFAULT_PINPOINTS = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))
NON_SQUARE_PINPOINTS = ((32, 64), (64, 96))
FORMATS = ("hf", "original")


def next_cases():
    from exporter.testing.tiny import TinyConfig

    return {
        "llama-default-pinpoints": TinyConfig(anyres=DEFAULT_PINPOINTS, max_positions=640),
        "mistral-non-square-pinpoints": TinyConfig(
            family="mistral", anyres=NON_SQUARE_PINPOINTS, max_positions=640, seed=3
        ),
        "qwen2-default-pinpoints": TinyConfig(
            family="qwen2", anyres=DEFAULT_PINPOINTS, max_positions=640, seed=5
        ),
    }


CASE_NAMES = ("llama-default-pinpoints", "mistral-non-square-pinpoints", "qwen2-default-pinpoints")
# (prompt, images) per row: sizes that pick different grids, one smaller than a tile, and a
# prompt with two images.
SIZES = {"wide": (45, 100), "tall": (90, 41), "tiny": (13, 19), "square": (70, 70)}
ROWS = {
    "one image": [("What is shown in the image?", ["wide"]), ("Describe the image in detail.", ["tall"])],
    "two images": [
        ("Compare the two pictures.", ["tiny", "square"]),
        ("Which is brighter?", ["tall", "wide"]),
    ],
}


@pytest.fixture(scope="module")
def pictures() -> dict[str, Image.Image]:
    return gradient_pictures(SIZES)


@pytest.fixture(scope="module", params=CASE_NAMES)
def case(request):
    return request.param, next_cases()[request.param]


@pytest.fixture(scope="module", params=FORMATS)
def fmt(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipe(case, fmt, workshop):
    _, config = case
    with Pipeline.load(workshop.artifacts(config, fmt=fmt)) as pipe:
        pipe.manifest.tokens.eos = []  # no stopping: every step is compared
        yield pipe


@pytest.fixture(scope="module")
def reference(case, workshop):
    """transformers' own from_pretrained of the HF folder: independent of exporter.source."""
    _, config = case
    return workshop.reference(config)


def hf_processor(model):
    """The image processor llava-hf ships with a NeXT model, for this model's tile and pinpoints
    (the tiny models use CLIP's mean and std, as the real ones)."""
    from transformers import LlavaNextImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    size = model.config.vision_config.image_size
    return LlavaNextImageProcessorPil(
        image_grid_pinpoints=model.config.image_grid_pinpoints,
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


def reference_features(model, images: list[Image.Image]):
    """transformers' pixel values, image sizes and packed features (one [tokens, hidden] each)."""
    import torch

    inputs = hf_processor(model)(images, return_tensors="np")
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=torch.from_numpy(inputs["pixel_values"]),
            image_sizes=torch.from_numpy(inputs["image_sizes"]),
        ).pooler_output
    return inputs, [f.numpy() for f in features]


def test_packed_image_features_equal_transformers(pipe, reference, pictures):
    images = list(pictures.values())
    _, expected = reference_features(reference, images)
    batch = pipe.prepare([Request("<image>" * len(images), images)], max_new_tokens=1)
    ours = pipe.image_embeds(batch, Timings())
    assert [len(o) for o in ours] == [len(e) for e in expected]
    assert pipe.image_tokens(len(images), batch.image_sizes) == [len(e) for e in expected]
    for name, got, want in zip(pictures, ours, expected):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0, err_msg=name)


def reference_ids(pipe: Pipeline, prompt: str, token_counts: list[int], image_token: int) -> list[int]:
    """Our tokenization, the reference's image token once per embedding of each image."""
    from runtime import prompts

    text = prompts.render_prompt(pipe.manifest.template, prompt, len(token_counts))
    chunks = prompts.tokenize_prompt(pipe.tokenizer, text, pipe.manifest.tokens.bos)
    ids: list[int] = []
    for index, chunk in enumerate(chunks):
        ids += chunk
        if index < len(token_counts):
            ids += [image_token] * token_counts[index]
    return ids


@pytest.mark.parametrize("images_per_row", list(ROWS))
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_equal_generate(case, fmt, pipe, reference, pictures, images_per_row, batch, capsys):
    assert pipe.manifest.tokens.pad != reference.config.image_token_index  # padding is no image
    rows = ROWS[images_per_row][:batch]
    requests = [Request(prompt, [pictures[n] for n in names]) for prompt, names in rows]
    answers = pipe.generate_batch(requests, max_new_tokens=NEW_TOKENS)

    flat = [pictures[n] for _, names in rows for n in names]
    inputs, features = reference_features(reference, flat)
    counts = iter(len(f) for f in features)
    sequences = [
        reference_ids(pipe, prompt, [next(counts) for _ in names], reference.config.image_token_index)
        for prompt, names in rows
    ]
    tokens, margins = greedy_with_margins(
        reference,
        sequences,
        pipe.manifest.tokens.pad,
        NEW_TOKENS,
        pixel_values=inputs["pixel_values"],
        image_sizes=inputs["image_sizes"],
    )
    report, failures = compare_greedy([a.token_ids for a in answers], tokens, margins, MARGIN_TOL, MIN_STEPS)
    with capsys.disabled():
        print(f"\n[{case[0]} {fmt}, batch {batch}, {images_per_row}] " + "; ".join(report))
    assert not failures, "\n".join(failures)


def test_every_supported_next_configuration_has_a_case():
    """Fails when the exporter takes a NeXT configuration (text family, select strategy, kind
    of pinpoint list) that no case above exports and compares."""
    from exporter.source import ANYRES_FAMILIES, ANYRES_STRATEGIES

    cases = next_cases().values()
    assert {c.family for c in cases} >= set(ANYRES_FAMILIES)
    assert {c.select_strategy for c in cases} >= set(ANYRES_STRATEGIES)
    symmetric = {all((w, h) in c.anyres for h, w in c.anyres) for c in cases}
    assert symmetric == {True, False}, "a case with a symmetric pinpoint list and one without"
    assert set(FORMATS) == {"hf", "original"}
