"""Exact parity on the shipped toy LLaVA (models/toy-llava, docs/toy-model.md): a model that
has learned, so its greedy answers are decided by confident logits and can be compared token
for token with the PyTorch reference over the whole held-out set.

- fp32 artifacts: every answer identical to the reference's, and the reference itself right
  on at least 90% of the questions (the issue's target; the shipped weights score above it).
- fp16 artifacts: at least 99% of the answers identical.
- the original-format twin exports to the same graphs' answers.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from exporter.source import load_source  # noqa: E402
from exporter.toy.evaluate import accuracy, held_out_questions, reference_answers, runtime_answers  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from tests.support.toy import TOY_HF_DIR, TOY_ORIGINAL_DIR, export_with_cli  # noqa: E402

HELD_OUT_IMAGES = 30  # about 235 questions: the issue asks for at least 200


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The held-out questions, the reference's greedy answers, and the fp32 pipeline."""
    if not (TOY_HF_DIR / "model.safetensors").is_file():
        pytest.skip("models/toy-llava is not in this checkout")
    torch.set_num_threads(2)
    questions = held_out_questions(HELD_OUT_IMAGES)
    pipe = Pipeline.load(export_with_cli(TOY_HF_DIR, tmp_path_factory.mktemp("toy-fp32")))
    reference = reference_answers(load_source(str(TOY_HF_DIR)), pipe, questions)
    return questions, reference, pipe


def test_reference_is_accurate(toy):
    questions, reference, _ = toy
    assert len(questions) >= 200
    assert accuracy(reference, questions) >= 0.90


def test_fp32_answers_equal_the_reference(toy):
    questions, reference, pipe = toy
    answers = runtime_answers(pipe, questions)
    different = [(q.question, a, r) for q, a, r in zip(questions, answers, reference) if a != r]
    assert not different, different[:5]


def test_fp16_answers_nearly_all_equal(toy, tmp_path):
    questions, reference, _ = toy
    pipe = Pipeline.load(export_with_cli(TOY_HF_DIR, tmp_path / "fp16", "--fp16"))
    answers = runtime_answers(pipe, questions)
    identical = sum(a == r for a, r in zip(answers, reference)) / len(questions)
    assert identical >= 0.99, identical


def test_original_twin_answers_the_same(toy, tmp_path):
    """The original-format folder (its tower named relatively, ../toy-clip) exports to a
    pipeline whose answers equal the HF folder's, on a subset."""
    questions, reference, _ = toy
    pipe = Pipeline.load(export_with_cli(TOY_ORIGINAL_DIR, tmp_path / "original"))
    assert runtime_answers(pipe, questions[:40]) == reference[:40]
