"""Held-out accuracy of the toy model: the PyTorch reference and each exported variant.

    python -m exporter.toy.evaluate --model models/toy-llava --artifacts out/toy-fp32 out/toy-fp16 out/toy-int8

Every question of the held-out split goes through the reference (transformers `generate`,
greedy) and through each artifact folder (the runtime's Pipeline, greedy). The table gives each
one's exact-match accuracy and the share of answers identical to the reference's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from exporter.source import load_source
from exporter.toy.data import split
from runtime.contract import KV_CONCAT, read_manifest
from runtime.pipeline import Pipeline
from runtime.preprocess import preprocess
from runtime.prompts import render_prompt, tokenize_prompt

MAX_NEW_TOKENS = 40


@dataclass
class Question:
    image: object  # PIL image
    question: str
    answer: str


@dataclass
class Row:
    name: str
    accuracy: float
    identical_to_reference: float | None  # None for the reference itself
    seconds: float


def held_out_questions(num_images: int) -> list[Question]:
    return [Question(image, q, a) for image, _caption, qa in split("test", num_images) for q, a in qa]


def same_answer(got: str, expected: str) -> bool:
    return got.strip().lower() == expected.strip().lower()


def reference_answers(source, pipe: Pipeline, questions: list[Question]) -> list[str]:
    """Greedy answers of LlavaForConditionalGeneration on exactly the runtime's input ids and
    pixels: BOS + chunk 0 + N image placeholders + chunk 1."""
    model, manifest = source.model, pipe.manifest
    placeholder = [model.config.image_token_index] * manifest.vision.num_image_tokens
    eos = manifest.tokens.eos
    answers = []
    for item in questions:
        chunks = tokenize_prompt(
            pipe.tokenizer, render_prompt(manifest.template, item.question, 1), manifest.tokens.bos
        )
        ids = torch.tensor([chunks[0] + placeholder + chunks[1]])
        pixels = torch.from_numpy(preprocess([item.image], manifest.preprocess))
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),  # explicit: a placeholder id may equal the pad id
                pixel_values=pixels,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=eos,
            )
        new = [t for t in out[0, ids.shape[1] :].tolist() if t not in eos]
        answers.append(pipe.tokenizer.decode(new, skip_special_tokens=True))
    return answers


def runtime_answers(pipe: Pipeline, questions: list[Question]) -> list[str]:
    return [pipe.generate(item.question, [item.image], MAX_NEW_TOKENS).text for item in questions]


def variant_name(folder: Path) -> str:
    """float32 | float16 | int8 | int4, plus the KV layout when it is not the default."""
    decoder = read_manifest(folder).graphs["decoder"]
    name = decoder.quant or decoder.dtype
    return name if decoder.kv_cache == KV_CONCAT else f"{name}, {decoder.kv_cache} KV"


def evaluate(model: str, folders: list[Path], questions: list[Question]) -> list[Row]:
    source = load_source(model)
    pipes = [Pipeline.load(folder) for folder in folders]
    start = time.perf_counter()
    reference = reference_answers(source, pipes[0], questions)
    rows = [Row("pytorch float32", accuracy(reference, questions), None, time.perf_counter() - start)]
    for folder, pipe in zip(folders, pipes):
        start = time.perf_counter()
        answers = runtime_answers(pipe, questions)
        identical = sum(a == r for a, r in zip(answers, reference)) / len(questions)
        rows.append(
            Row(
                f"{folder.name} ({variant_name(folder)})",
                accuracy(answers, questions),
                identical,
                time.perf_counter() - start,
            )
        )
    return rows


def accuracy(answers: list[str], questions: list[Question]) -> float:
    return sum(same_answer(a, q.answer) for a, q in zip(answers, questions)) / len(questions)


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
