"""Held-out accuracy of the PyTorch reference: greedy `generate`, exact-match answers.

The prompt is exactly what the runtime builds (runtime.prompts: render_prompt, then
tokenize_prompt with BOS), with the image's N embeddings standing as N `image_token_index`
placeholders between chunk 0 and chunk 1, which is how LlavaForConditionalGeneration splices;
pixel values come from runtime.preprocess. So the tokens generated here are the ones an
exported model must reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from exporter.source import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from exporter.toy.data import question_kind
from runtime.contract import PreprocessSpec
from runtime.preprocess import preprocess
from runtime.prompts import render_prompt, tokenize_prompt

TEMPLATE = "vicuna_v1"
BOS_ID, EOS_ID = 1, 2


def toy_preprocess(image_size: int) -> PreprocessSpec:
    """The toy model's image preprocessing: pad to square (LLaVA-1.5), bicubic to image_size."""
    return PreprocessSpec(
        shortest_edge=image_size,
        crop_size=image_size,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        aspect="pad",
    )


def num_image_tokens(config) -> int:
    """Embeddings per image: patches, plus CLS when the strategy keeps it ("full")."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (config.vision_feature_select_strategy == "full")


def prompt_ids(tokenizer, question: str, config, template: str = TEMPLATE) -> list[int]:
    """BOS + chunk 0 + N image placeholders + chunk 1: input_ids for LlavaForConditionalGeneration."""
    chunks = tokenize_prompt(tokenizer, render_prompt(template, question, 1), BOS_ID)
    return chunks[0] + [config.image_token_index] * num_image_tokens(config) + chunks[1]


def pixel_values(images, spec: PreprocessSpec) -> torch.Tensor:
    """PIL images -> [B,3,H,W] float32, by the runtime's own preprocessing."""
    return torch.from_numpy(np.ascontiguousarray(preprocess(list(images), spec)))


@dataclass
class Accuracy:
    correct: int = 0
    total: int = 0
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # kind -> [correct, total]
    misses: list[tuple[str, str, str]] = field(default_factory=list)  # (question, expected, got)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    def add(self, question: str, expected: str, got: str) -> None:
        hit = got == expected
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


@torch.no_grad()
def answer(model, tokenizer, image_pixels: torch.Tensor, question: str, max_new_tokens: int = 40) -> str:
    """Greedy answer from HF generate to one question about one image ([1,3,H,W] pixels)."""
    ids = torch.tensor([prompt_ids(tokenizer, question, model.config)])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=image_pixels,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    new = out[0, ids.shape[1] :].tolist()
    if EOS_ID in new:
        new = new[: new.index(EOS_ID)]
    return tokenizer.decode(new, skip_special_tokens=True)


def evaluate_reference(model, tokenizer, examples, spec: PreprocessSpec | None = None) -> Accuracy:
    """Exact-match accuracy over every (question, answer) of `examples` (data.split output)."""
    spec = spec or toy_preprocess(model.config.vision_config.image_size)
    model.eval()
    result = Accuracy()
    for image, _caption, qa in examples:
        pixels = pixel_values([image], spec)
        for question, expected in qa:
            result.add(question, expected, answer(model, tokenizer, pixels, question))
    return result
