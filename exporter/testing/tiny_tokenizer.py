"""A tiny Llama-style tokenizer, trained in milliseconds on a built-in corpus, for test models.

`build_tiny_tokenizer(folder)` writes tokenizer.json and tokenizer_config.json that
transformers loads as a LlamaTokenizer adding BOS, and that the runtime's `tokenizers` reads
identically (exporter.graphs.tokenizer exports it like any source's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from exporter.graphs.tokenizer import MODEL_MAX_LENGTH, write_json
from runtime.contract import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as in Llama
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # ids 3..258: any text encodes
MIN_VOCAB = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
DEFAULT_VOCAB_SIZE = 320

# Small English corpus the tiny tokenizer learns its merges from: what LLaVA prompts look like.
_SYSTEMS = [
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.",
]
_COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "brown", "grey"]
_SHAPES = ["circle", "square", "triangle", "star", "ball", "box", "cube", "line"]
_COUNTS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_QUESTIONS = [
    "What is shown in the image?",
    "Describe the image in detail.",
    "What colour is the {shape}?",
    "How many {shape}s are there in the picture?",
    "Is there a {colour} {shape} in this image?",
    "Where is the {colour} {shape}?",
    "What is the shape on the left?",
    "Which object is the largest?",
    "Can you count the objects in the photo?",
    "What is the colour of the background?",
]
_ANSWERS = [
    "The {shape} is {colour}.",
    "There are {count} {shape}s in the image.",
    "Yes, there is a {colour} {shape} in the middle of the image.",
    "The {colour} {shape} is on the right, next to a small {shape2}.",
    "The image shows {count} {colour} {shape}s on a {colour2} background.",
    "No, I do not see a {colour} {shape} here.",
]


def default_corpus() -> list[str]:
    """The built-in corpus: system prompts, USER:/ASSISTANT: turns about colours, shapes, counts."""
    lines = list(_SYSTEMS)
    n = len(_COLOURS)
    for i in range(60):  # deterministic variety, no randomness
        fill = {
            "colour": _COLOURS[i % n],
            "colour2": _COLOURS[(i * 3 + 1) % n],
            "shape": _SHAPES[i % len(_SHAPES)],
            "shape2": _SHAPES[(i * 5 + 2) % len(_SHAPES)],
            "count": _COUNTS[(i * 7) % len(_COUNTS)],
        }
        question = _QUESTIONS[i % len(_QUESTIONS)].format(**fill)
        answer = _ANSWERS[i % len(_ANSWERS)].format(**fill)
        lines.append(f"USER: {question} ASSISTANT: {answer}")
        lines.append(f"[INST] {question} [/INST] {answer}")
    return lines


def _llama_pipeline(tokenizer) -> None:
    """Sets the pre-tokenizer/decoder transformers 5's LlamaTokenizer uses (legacy=False, prefix space)."""
    from tokenizers import decoders, pre_tokenizers

    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )


def build_tiny_tokenizer(
    out_dir: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    corpus: list[str] | None = None,
    chat_template: str | None = None,
) -> None:
    """Trains a Llama-style byte-fallback BPE tokenizer (deterministic, milliseconds) into out_dir.

    Ids: <unk>=0, <s>=1, </s>=2, <0x00>..<0xFF>=3..258, then the corpus' characters and merges
    up to exactly `vocab_size`. Writes tokenizer.json and tokenizer_config.json, which
    `transformers.AutoTokenizer.from_pretrained(out_dir)` loads as a LlamaTokenizer adding BOS.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: the specials and 256 byte tokens need {MIN_VOCAB}"
        )
    lines = default_corpus() if corpus is None else list(corpus)
    alphabet = sorted({ch for line in lines for ch in line.replace(" ", "▁")} | {"▁"})

    # Train with whitespace splitting, like sentencepiece, so no merge crosses a word boundary;
    # the specials and byte tokens are listed first so they take ids 0..258 in order.
    trainee = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    trainee.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS + BYTE_TOKENS),
        limit_alphabet=min(len(alphabet), vocab_size - MIN_VOCAB),
        initial_alphabet=[],
        show_progress=False,
    )
    trainee.train_from_iterator(lines, trainer)
    trained = json.loads(trainee.to_str())["model"]
    vocab: dict[str, int] = trained["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    if len(vocab) != vocab_size:
        raise ValueError(
            f"the corpus yields only {len(vocab)} tokens, fewer than vocab_size {vocab_size}: "
            "give a larger corpus or a smaller vocab_size"
        )

    # The final tokenizer: only <unk> <s> </s> are added (special) tokens; bytes live in the vocab.
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    _llama_pipeline(tokenizer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    config: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / TOKENIZER_FILE), pretty=True)
    write_json(out / TOKENIZER_CONFIG_FILE, config)
