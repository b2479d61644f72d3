"""`llava-run` end to end, as a real subprocess of the installed console script: the happy
path (streamed text, --json) and every user error (exit 2, one `error:` line, no traceback,
naming the file or flag to fix)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.pipeline import Pipeline

LLAVA_RUN = Path(sys.executable).with_name("llava-run")
PROMPT = "What is shown in the image?"


def llava_run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [str(LLAVA_RUN), *map(str, args)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=120,
    )


@pytest.fixture(scope="module")
def expected(tiny_artifacts, images):
    """The answer the Python API gives for the CLI's happy-path question."""
    return Pipeline.load(tiny_artifacts).generate(PROMPT, images=[images["a"]], max_new_tokens=12)


def test_streams_the_answer(tiny_artifacts, images, expected):
    result = llava_run(
        "--artifacts", tiny_artifacts, "--image", images["a"], "--prompt", PROMPT, "--max-new-tokens", 12
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.text + "\n"
    assert "Traceback" not in result.stderr


def test_timings_go_to_stderr_after_the_answer(tiny_artifacts, images, expected):
    result = llava_run(
        "--artifacts",
        tiny_artifacts,
        "--image",
        images["a"],
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        12,
        "--timings",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.text + "\n"
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("[ort-cpu: load ") and f"{len(expected.token_ids)} tokens at" in line, line


def test_json_prints_answer_and_timings(tiny_artifacts, images, expected):
    result = llava_run(
        "--artifacts",
        tiny_artifacts,
        "--image",
        images["a"],
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        12,
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["answer"] == expected.text
    assert report["new_tokens"] == len(expected.token_ids)
    for key in ("image_encode_ms", "prefill_ms", "decode_tokens_per_s", "total_ms"):
        assert isinstance(report[key], (int, float)) and report[key] >= 0, key
    assert report["image_encode_ms"] > 0 and report["prefill_ms"] > 0 and report["total_ms"] > 0


def test_sampling_flags_are_reproducible(tiny_artifacts, images):
    args = ["--artifacts", tiny_artifacts, "--image", images["a"], "--prompt", PROMPT, "--max-new-tokens", 12]
    args += ["--temperature", 1.0, "--top-p", 0.95, "--json"]
    first, again = llava_run(*args, "--seed", 1), llava_run(*args, "--seed", 1)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["answer"] == json.loads(again.stdout)["answer"]


def assert_user_error(result: subprocess.CompletedProcess, *names: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "name, says",
    [
        ("missing", "no such image file"),
        ("truncated", "truncated or corrupt"),
        ("not_image", "not an image"),
        ("bomb", "decompression bomb"),
    ],
)
def test_bad_image(tiny_artifacts, images, name, says):
    result = llava_run(
        "--artifacts", tiny_artifacts, "--image", images[name], "--prompt", PROMPT, "--max-new-tokens", 8
    )
    assert says in assert_user_error(result, str(images[name]))


def test_prompt_too_long(tiny_artifacts, images):
    result = llava_run("--artifacts", tiny_artifacts, "--image", images["a"], "--prompt", "the " * 300)
    assert_user_error(result, "prompt", "at most 256")


def test_more_new_tokens_than_fit_are_refused_up_front(tiny_artifacts, images):
    """The tiny model's 256 positions leave room for 66 new tokens after this 191-token prompt
    (the default 128 do not fit): refused before the image is even read, naming what fits."""
    result = llava_run("--artifacts", tiny_artifacts, "--image", images["missing"], "--prompt", PROMPT)
    assert_user_error(
        result, "need 318 cache positions", "at most 256 positions", "ask for at most 66 new tokens"
    )


def test_threads_reach_onnx_runtime(tiny_artifacts, images):
    args = ["--artifacts", tiny_artifacts, "--image", images["a"], "--prompt", PROMPT, "--max-new-tokens", 2]
    result = llava_run(*args, "--threads", 1, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["threads"] == 1


def test_placeholders_do_not_match_images(tiny_artifacts, images):
    result = llava_run(
        "--artifacts", tiny_artifacts, "--image", images["a"], "--prompt", "<image> vs <image>?"
    )
    assert_user_error(result, "prompt", "<image> placeholder", "1 image")


@pytest.mark.parametrize(
    "name, says",
    [
        ("missing_folder", "does not exist"),
        ("no_decoder", "decoder.onnx is missing"),
        ("future_version", "format version 99"),
        ("truncated_decoder", "decoder.onnx cannot be loaded"),
    ],
)
def test_broken_artifacts(broken_artifacts, images, name, says):
    result = llava_run("--artifacts", broken_artifacts[name], "--image", images["a"], "--prompt", PROMPT)
    assert says in assert_user_error(result, str(broken_artifacts[name]))


def test_trt_without_engines_names_the_build_command(tiny_artifacts, images):
    result = llava_run(
        "--artifacts", tiny_artifacts, "--image", images["a"], "--prompt", PROMPT, "--backend", "trt"
    )
    assert_user_error(result, "llava-export engine", "TensorRT")
