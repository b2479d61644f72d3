"""Exact parity on the shipped toy LoRA (models/toy-llava-lora-zh on models/toy-llava-original,
docs/toy-model.md): the handbook's flow, exported with `--model-base`, against PEFT's own
merge_and_unload of the same adapter on the same base.

- fp32 artifacts: every greedy caption of the held-out images ("为该图片生成标注。") identical
  to the PEFT reference's.
- fp16 artifacts: at least 99% identical. They are exported with --no-verify: the fine-tune
  pushed the decoder's activations on inputs off its task (the parity check's random sample,
  the base's English questions) past float16's range, so that check's logits overflow.
- the caption streams as whole characters: no piece holds U+FFFD, and the pieces join to it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("peft")

from exporter.source import load_source  # noqa: E402
from exporter.toy import data  # noqa: E402
from exporter.toy.evaluate import Question, reference_answers, runtime_answers  # noqa: E402
from exporter.toy.lora import INSTRUCTION, MAX_NEW_TOKENS  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from tests.support.adapters import original_lora_reference  # noqa: E402
from tests.support.toy import TOY_LORA_DIR, TOY_ORIGINAL_DIR, export_with_cli  # noqa: E402

CAPTION_IMAGES = 20


def held_out() -> list[Question]:
    """The Chinese caption of each of the first test-split scenes."""
    return [
        Question(data.render(scene), INSTRUCTION, data.caption_zh(scene))
        for scene in map(data.make_scene, data.split_seeds("test", CAPTION_IMAGES))
    ]


@pytest.fixture(scope="module")
def toy_lora(tmp_path_factory):
    """The questions, PEFT's reference answers and the fp32 pipeline of the merged export."""
    if not (TOY_LORA_DIR / "adapter_config.json").is_file():
        pytest.skip("models/toy-llava-lora-zh is not in this checkout")
    torch.set_num_threads(2)
    questions = held_out()
    out = export_with_cli(
        TOY_LORA_DIR, tmp_path_factory.mktemp("lora-fp32"), "--model-base", TOY_ORIGINAL_DIR
    )
    pipe = Pipeline.load(out)
    base = load_source(str(TOY_ORIGINAL_DIR))
    peft = replace(base, model=original_lora_reference(base.model, TOY_LORA_DIR))
    reference = reference_answers(peft, pipe, questions, MAX_NEW_TOKENS)
    return questions, reference, pipe


def test_reference_writes_chinese_captions(toy_lora):
    """The fine-tune took: PEFT's merge captions most held-out images exactly."""
    questions, reference, _ = toy_lora
    assert len(questions) == CAPTION_IMAGES
    assert sum(q.answer == r for q, r in zip(questions, reference)) / len(questions) >= 0.95


def test_fp32_answers_equal_peft_merge(toy_lora):
    questions, reference, pipe = toy_lora
    answers = runtime_answers(pipe, questions, MAX_NEW_TOKENS)
    different = [(q.question, a, r) for q, a, r in zip(questions, answers, reference) if a != r]
    assert not different, different[:5]


def test_fp16_answers_nearly_all_equal(toy_lora, tmp_path):
    questions, reference, _ = toy_lora
    flags = ("--model-base", TOY_ORIGINAL_DIR, "--fp16", "--no-verify")
    out = export_with_cli(TOY_LORA_DIR, tmp_path / "fp16", *flags)
    answers = runtime_answers(Pipeline.load(out), questions, MAX_NEW_TOKENS)
    identical = sum(a == r for a, r in zip(answers, reference)) / len(questions)
    assert identical >= 0.99, identical


def test_caption_streams_whole_characters(toy_lora):
    """The toy tokenizer spells Chinese in byte tokens, and TextStream releases a run of them
    when it ends (runtime/pipeline.py): here the whole caption after its first "▁"."""
    questions, _, pipe = toy_lora
    item = questions[0]
    pieces = list(pipe.stream(item.question, [item.image], MAX_NEW_TOKENS))
    assert pieces and not [p for p in pieces if "\ufffd" in p]
    text = "".join(pieces)
    assert text == pipe.generate(item.question, [item.image], MAX_NEW_TOKENS).text
    assert text.endswith("背景上")  # the caption ends "...在灰色背景上"
