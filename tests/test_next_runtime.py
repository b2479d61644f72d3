"""LLaVA-1.6 (anyres) artifacts through every way in: the Pipeline, llava-run and llava-serve.

The numbers are parity_tests/test_next_parity.py's; here: an image's tokens are known and
checked before any compute, the bad inputs of a NeXT folder, and the same answer whichever
way a request comes in (Python, the command line, the OpenAI API, one request or several in a
batch).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from runtime import anyres, contract
from runtime.errors import ArtifactError, PromptError
from runtime.pipeline import Batch, Pipeline, Request
from tests.support.serving import data_url, image_message, live_server

PINPOINTS = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))
QUESTION = "What is shown in the image?"
LLAVA_RUN = Path(sys.executable).with_name("llava-run")


@pytest.fixture(scope="module")
def next_artifacts(workshop) -> Path:
    from exporter.testing.tiny import TinyConfig

    return workshop.artifacts(TinyConfig(anyres=PINPOINTS, max_positions=640))


@pytest.fixture(scope="module")
def pipe(next_artifacts):
    with Pipeline.load(next_artifacts) as pipe:
        yield pipe


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_an_images_tokens_follow_its_size(pipe):
    sizes = [(20, 70), (64, 64), (90, 30), (5, 5)]
    counts = pipe.image_tokens(len(sizes), sizes)
    assert counts == [anyres.image_token_count(s, pipe.manifest.anyres, pipe.manifest.vision) for s in sizes]
    assert len(set(counts)) > 1  # sizes that pick other grids take other counts
    batch = pipe.prepare([Request("<image>" * len(sizes), [picture(*s) for s in sizes])], 4)
    assert batch.image_sizes == sizes
    assert len(batch.pixel_values) == sum(anyres.tile_count(s, pipe.manifest.anyres) for s in sizes)


def test_too_many_image_tokens_are_refused_before_any_compute(pipe, monkeypatch):
    """Eight 64x64 images take 8 x 88 tokens, over the model's 640 positions: refused naming
    what each image takes, before an image is tiled or encoded."""
    monkeypatch.setattr(anyres, "tiles", lambda *a: pytest.fail("tiled before the limits check"))
    monkeypatch.setattr(pipe.backend, "encode_images", lambda *a: pytest.fail("encoded before the check"))
    images = [picture(64, 64, seed) for seed in range(8)]
    with pytest.raises(PromptError) as err:
        pipe.generate("<image>" * 8 + "Compare them.", images, max_new_tokens=4)
    message = str(err.value)
    assert "the model takes at most 640 positions" in message and "64x64: 88" in message
    assert "\n" not in message


def test_a_batch_without_image_sizes_is_refused(pipe):
    pixels = pipe.pixel_values([picture(40, 40)])
    with pytest.raises(PromptError, match="needs the size of each of its 1 images"):
        list(pipe.run(Batch([[[1], [5]]], pixels[:1]), 2))
    with pytest.raises(PromptError, match="take 5 tiles; pixel_values holds 3"):
        list(pipe.run(Batch([[[1], [5]]], pixels[:3], [(80, 80)]), 2))


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda folder: (folder / contract.IMAGE_NEWLINE_FILE).unlink(),
            "image_newline.npy is missing or unreadable",
        ),
        (
            lambda folder: np.save(folder / contract.IMAGE_NEWLINE_FILE, np.zeros(3, np.float32)),
            "has shape \\(3,\\)",
        ),
    ],
)
def test_a_damaged_newline_file_is_an_artifact_error(next_artifacts, tmp_path, damage, message):
    import shutil

    folder = tmp_path / "next"
    shutil.copytree(next_artifacts, folder)
    damage(folder)
    with pytest.raises(ArtifactError, match=message):
        Pipeline.load(folder)


def test_a_batch_answers_as_each_request_alone(pipe):
    requests = [
        Request(QUESTION, [picture(30, 90, 1)]),
        Request("Describe the two images.", [picture(80, 40, 2), picture(12, 12, 3)]),
    ]
    alone = [pipe.generate_batch([r], 8)[0].token_ids for r in requests]
    assert [a.token_ids for a in pipe.generate_batch(requests, 8)] == alone


def llava_run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [str(LLAVA_RUN), *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def test_llava_run_answers_as_the_pipeline(next_artifacts, pipe, tmp_path):
    path = tmp_path / "wide.png"
    picture(45, 100, 4).save(path)
    expected = pipe.generate(QUESTION, [path], max_new_tokens=8).text
    result = llava_run(
        "--artifacts", next_artifacts, "--image", path, "--prompt", QUESTION, "--max-new-tokens", 8
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_llava_run_refuses_images_over_the_positions_in_one_line(next_artifacts, tmp_path):
    paths = []
    for seed in range(8):
        paths += ["--image", tmp_path / f"{seed}.png"]
        picture(64, 64, seed).save(paths[-1])
    result = llava_run("--artifacts", next_artifacts, *paths, "--prompt", "Compare them.")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "64x64: 88" in lines[0], result.stderr


@pytest.mark.slow
def test_llava_serve_answers_as_the_pipeline_and_refuses_too_many_image_tokens(pipe):
    images = [picture(45, 100, 5), picture(90, 41, 6)]
    expected = [pipe.generate(QUESTION, [image], max_new_tokens=8).text for image in images]
    with live_server(pipe, model="tiny-next", engine_options={"max_batch": 4}, max_images=8) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        answers = [
            client.chat.completions.create(
                model=server.model,
                messages=image_message(QUESTION, data_url(image)),
                temperature=0,
                max_tokens=8,
            )
            .choices[0]
            .message.content
            for image in images
        ]
        assert answers == expected
        content = [
            {"type": "image_url", "image_url": {"url": data_url(picture(64, 64, s))}} for s in range(8)
        ]
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=server.model,
                messages=[{"role": "user", "content": [*content, {"type": "text", "text": "Compare them."}]}],
                max_tokens=4,
            )
        assert "64x64: 88" in str(err.value)
        # the server keeps serving the others
        again = client.chat.completions.create(
            model=server.model,
            messages=image_message(QUESTION, data_url(images[0])),
            temperature=0,
            max_tokens=8,
        )
        assert again.choices[0].message.content == expected[0]
