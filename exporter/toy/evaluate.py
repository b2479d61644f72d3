"""Held-out accuracy of the toy model, with one answer rule and one PyTorch reference, for
training's report, the evaluation table and the parity tests alike.

    python -m exporter.toy.evaluate --model models/toy-llava --artifacts out/toy-fp32 out/toy-fp16 out/toy-int8

Every question of the held-out split goes through the reference (transformers `generate`,
greedy) and through each artifact folder (the runtime's Pipeline, greedy). The table gives
each one's accuracy and the share of answers identical to the reference's.

The reference sees exactly the runtime's input: the question rendered by the template and
tokenized in chunks around `<image>` (runtime.prompts), with the image's N embeddings standing
as N `image_token_index` placeholders between chunk 0 and chunk 1 (how
LlavaForConditionalGeneration splices), and pixels from runtime.preprocess. An answer is
right when it equals the expected one exactly: data.py's answers are canonical.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from exporter.toy.data import question_kind, split
from runtime.contract import KV_CONCAT, PreprocessSpec, read_manifest
from runtime.pipeline import Pipeline
from runtime.preprocess import preprocess
from runtime.prompts import render_prompt, tokenize_prompt

MAX_NEW_TOKENS = 40


@dataclass(frozen=True)
class PromptFormat:
    """How a question about one image becomes the reference's input."""

    template: str
    bos: int | None
    eos: list[int]  # the answer ends at the first of these
    image_token_index: int  # the reference's placeholder id
    image_tokens: int  # placeholders per image: the image's embeddings

    @classmethod
    def of_artifacts(cls, pipe: Pipeline, model_config) -> PromptFormat:
        """What the runtime does with the exported folder `pipe` holds."""
        manifest = pipe.manifest
        return cls(
            manifest.template,
            manifest.tokens.bos,
            list(manifest.tokens.eos),
            model_config.image_token_index,
            manifest.vision.num_image_tokens,
        )


def same_answer(got: str, expected: str) -> bool:
    return got == expected


def prompt_ids(tokenizer, question: str, fmt: PromptFormat) -> list[int]:
    """BOS + chunk 0 + N image placeholders + chunk 1: input_ids for LlavaForConditionalGeneration."""
    chunks = tokenize_prompt(tokenizer, render_prompt(fmt.template, question, 1), fmt.bos)
    return chunks[0] + [fmt.image_token_index] * fmt.image_tokens + chunks[1]


def pixel_values(images, spec: PreprocessSpec) -> torch.Tensor:
    """PIL images -> [B,3,H,W] float32, by the runtime's own preprocessing."""
    return torch.from_numpy(np.ascontiguousarray(preprocess(list(images), spec)))


@torch.no_grad()
def reference_answer(
    model,
    tokenizer,
    pixels: torch.Tensor,
    question: str,
    fmt: PromptFormat,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> str:
    """The greedy answer of HF generate to one question about one image ([1,3,H,W] pixels)."""
    ids = torch.tensor([prompt_ids(tokenizer, question, fmt)])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),  # explicit: a placeholder id may equal the pad id
        pixel_values=pixels,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=fmt.eos,
        pad_token_id=fmt.eos[0],
    )
    new = out[0, ids.shape[1] :].tolist()
    ends = [new.index(eos) for eos in fmt.eos if eos in new]
    return tokenizer.decode(new[: min(ends)] if ends else new, skip_special_tokens=True)


@dataclass
class Question:
    image: object  # PIL image
    question: str
    answer: str


def held_out_questions(num_images: int) -> list[Question]:
    return [Question(image, q, a) for image, _caption, qa in split("test", num_images) for q, a in qa]


def reference_answers(
    source, pipe: Pipeline, questions: list[Question], max_new_tokens: int = MAX_NEW_TOKENS
) -> list[str]:
    """The reference's answers on exactly the input the runtime builds from `pipe`'s folder."""
    model = source.model.eval()
    fmt, spec = PromptFormat.of_artifacts(pipe, model.config), pipe.manifest.preprocess
    return [
        reference_answer(
            model, pipe.tokenizer, pixel_values([q.image], spec), q.question, fmt, max_new_tokens
        )
        for q in questions
    ]


def runtime_answers(
    pipe: Pipeline, questions: list[Question], max_new_tokens: int = MAX_NEW_TOKENS
) -> list[str]:
    return [pipe.generate(item.question, [item.image], max_new_tokens).text for item in questions]


@dataclass
class Score:
    """Right answers, overall and by kind of question, and the misses."""

    correct: int = 0
    total: int = 0
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # kind -> [correct, total]
    misses: list[tuple[str, str, str]] = field(default_factory=list)  # (question, expected, got)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    def add(self, question: str, expected: str, got: str) -> None:
        hit = same_answer(got, expected)
        self.correct += hit
        self.total += 1
        kind = self.by_kind.setdefault(question_kind(question), [0, 0])
        kind[0] += hit
        kind[1] += 1
        if not hit:
            self.misses.append((question, expected, got))

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {c}/{n}" for k, (c, n) in sorted(self.by_kind.items()))
        return f"{self.correct}/{self.total} = {100 * self.accuracy:.1f}% ({kinds})"


def score(answers: list[str], questions: list[Question]) -> Score:
    result = Score()
    for got, item in zip(answers, questions):
        result.add(item.question, item.answer, got)
    return result


def accuracy(answers: list[str], questions: list[Question]) -> float:
    return score(answers, questions).accuracy


def score_reference(model, tokenizer, examples, fmt: PromptFormat, spec: PreprocessSpec) -> Score:
    """The reference's score over every (question, answer) of `examples` (data.split's output):
    training's report, before anything is exported."""
    model.eval()
    result = Score()
    for image, _caption, qa in examples:
        pixels = pixel_values([image], spec)
        for question, expected in qa:
            result.add(question, expected, reference_answer(model, tokenizer, pixels, question, fmt))
    return result


# ---------------------------------------------------------------------------------------------
# The evaluation table


@dataclass
class Row:
    name: str
    accuracy: float
    identical_to_reference: float | None  # None for the reference itself
    seconds: float


def variant_name(folder: Path) -> str:
    """float32 | float16 | int8 | int4, plus the KV layout when it is not the default."""
    decoder = read_manifest(folder).graphs["decoder"]
    name = decoder.quant or decoder.dtype
    return name if decoder.kv_cache == KV_CONCAT else f"{name}, {decoder.kv_cache} KV"


def evaluate(model: str, folders: list[Path], questions: list[Question]) -> list[Row]:
    from exporter.source import load_source

    source = load_source(model)
    pipes = [Pipeline.load(folder) for folder in folders]
    start = time.perf_counter()
    reference = reference_answers(source, pipes[0], questions)
    rows = [Row("pytorch float32", accuracy(reference, questions), None, time.perf_counter() - start)]
    for folder, pipe in zip(folders, pipes):
        start = time.perf_counter()
        answers = runtime_answers(pipe, questions)
        identical = sum(a == r for a, r in zip(answers, reference)) / len(questions)
        seconds = time.perf_counter() - start
        rows.append(
            Row(f"{folder.name} ({variant_name(folder)})", accuracy(answers, questions), identical, seconds)
        )
    return rows


def table(rows: list[Row], count: int) -> str:
    lines = [
        f"{count} held-out questions",
        f"{'variant':32} {'accuracy':>9} {'identical to reference':>23} {'time s':>7}",
    ]
    for row in rows:
        identical = "-" if row.identical_to_reference is None else f"{row.identical_to_reference:.1%}"
        lines.append(f"{row.name:32} {row.accuracy:>9.1%} {identical:>23} {row.seconds:>7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exporter.toy.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="the toy model's source folder (HF or original format)"
    )
    parser.add_argument(
        "--artifacts", type=Path, nargs="+", required=True, help="artifact folders exported from it"
    )
    parser.add_argument("--images", type=int, default=60, help="held-out images (several questions each)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    questions = held_out_questions(args.images)
    rows = evaluate(args.model, args.artifacts, questions)
    print(table(rows, len(questions)))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
