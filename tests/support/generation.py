"""Greedy generation by the PyTorch reference on the runtime's own tokenization, with each
step's top-2 logit margin (random weights have near ties: a comparison stops before the
first step whose margin is below its tolerance). Used by the generation, static-KV and GPU
parity tests."""

from __future__ import annotations

import numpy as np

from runtime import preprocess, prompts
from runtime.pipeline import Pipeline

NEW_TOKENS = 32

# (prompt, image) per row; the two rows' prompts have different lengths (191 and 196 tokens with
# the vicuna_v1 template and 16 image tokens: room for NEW_TOKENS within the 256 positions).
ROWS = [
    ("What is shown in the image?", "a"),
    ("Describe the image in detail.", "b"),
]


def reference_ids(pipe: Pipeline, prompt: str, num_images: int, image_token_index: int) -> list[int]:
    """Our tokenization, with the reference's image token standing for each image's embeddings."""
    text = prompts.render_prompt(pipe.manifest.template, prompt, num_images)
    chunks = prompts.tokenize_prompt(pipe.tokenizer, text, pipe.manifest.tokens.bos)
    ids: list[int] = []
    for index, chunk in enumerate(chunks):
        ids += chunk
        if index < len(chunks) - 1:
            ids += [image_token_index] * pipe.manifest.vision.num_image_tokens
    return ids


def reference_generate(model, pipe: Pipeline, rows, image_paths):
    """Greedy tokens [B, NEW_TOKENS] and top-2 margins [B, NEW_TOKENS] from transformers' generate."""
    pad = pipe.manifest.tokens.pad
    assert pad != model.config.image_token_index  # padding must not count as image tokens
    sequences = [reference_ids(pipe, prompt, 1, model.config.image_token_index) for prompt, _ in rows]
    pixels = preprocess.preprocess(
        [preprocess.load_image(path) for path in image_paths], pipe.manifest.preprocess
    )
    return greedy_with_margins(model, sequences, pad, NEW_TOKENS, pixel_values=pixels)


def greedy_with_margins(model, sequences: list[list[int]], pad: int, new_tokens: int, **inputs):
    """transformers' greedy tokens [B, new_tokens] over the left-padded `sequences` (extra
    `inputs`, e.g. pixel_values, as numpy), and each step's top-2 logit margin [B, new_tokens]."""
    import torch

    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):  # left padding
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **{name: torch.from_numpy(value) for name, value in inputs.items()},
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,  # no stopping: every step is compared, EOS or not
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_logits=True,
        )
    tokens = out.sequences[:, width:].numpy()
    logits = torch.stack(out.logits, dim=1).float()  # [B, steps, vocab], before any processor
    top2 = logits.topk(2, dim=-1).values
    margins = (top2[..., 0] - top2[..., 1]).numpy()
    # greedy picked the argmax of these very logits (no processors): a check on the check
    np.testing.assert_array_equal(tokens, logits.argmax(-1).numpy())
    return tokens, margins


def compare_greedy(
    ours: list[list[int]], theirs: np.ndarray, margins: np.ndarray, tolerance: float, min_steps: int
):
    """Each row's tokens against the reference's [B, steps] up to (not including) its first
    step whose top-2 margin is below `tolerance`: (report lines, failure lines). A row that
    differs before then fails, and so does one with fewer than `min_steps` steps to compare."""
    report, failures = [], []
    for row, tokens in enumerate(ours):
        low = np.flatnonzero(margins[row] < tolerance)
        compared = int(low[0]) if len(low) else theirs.shape[1]
        mine, reference = list(tokens[:compared]), theirs[row, :compared].tolist()
        report.append(f"row {row}: {compared}/{theirs.shape[1]} steps compared")
        if mine != reference:
            first = next(i for i, (a, b) in enumerate(zip(mine, reference)) if a != b)
            failures.append(
                f"row {row}: tokens differ at step {first} (reference margin {margins[row, first]:.2e}): "
                f"runtime {mine} vs reference {reference}"
            )
        elif compared < min_steps:
            failures.append(
                f"row {row}: only {compared} steps before a near tie (margin {tolerance}); pick other prompts or seeds"
            )
    return report, failures
