"""The Python API: `Pipeline.load(DIR)`, then `generate(...)` or `stream(...)`.

pipe = Pipeline.load("artifacts/")
answer = pipe.generate("What colour is the circle?", images=["cat.jpg"])
print(answer.text, answer.timings)
for piece in pipe.stream("Describe the image.", images=["cat.jpg"]):
    print(piece, end="", flush=True)
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime import contract, generate, preprocess, prompts
from runtime.backends import load_backend
from runtime.errors import ArtifactError, EngineError, PromptError

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token (Llama / sentencepiece vocabularies)


@dataclass
class Timings:
    image_encode_ms: float = 0.0
    prefill_ms: float = 0.0  # prefill alone; time to first token = image_encode_ms + prefill_ms
    decode_ms: float = 0.0
    new_tokens: int = 0
    total_ms: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes from prefill; decode produced the rest
        decoded = max(self.new_tokens - 1, 0)
        return decoded / (self.decode_ms / 1000) if self.decode_ms > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "image_encode_ms": round(self.image_encode_ms, 3),
            "prefill_ms": round(self.prefill_ms, 3),
            "time_to_first_token_ms": round(self.image_encode_ms + self.prefill_ms, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "new_tokens": self.new_tokens,
            "total_ms": round(self.total_ms, 3),
        }


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    timings: Timings = field(default_factory=Timings)


@dataclass
class Request:
    prompt: str
    images: Sequence = ()
    template: str | None = None


class TextStream:
    """Turns token ids into text pieces as they come, never splitting a UTF-8 character.

    The pieces join to exactly `tokenizer.decode(ids)`. Two things make a piece premature:
    a trailing incomplete character (the text ends in U+FFFD), and a trailing run of
    byte-fallback tokens (<0xNN>): tokenizers' ByteFallback decodes such a run as a whole,
    so one more byte can turn text already shown into U+FFFD. Both wait for the next token;
    `flush()` gives what is left when the stream ends.
    """

    def __init__(self, tokenizer, eos_ids: list[int]):
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.ids: list[int] = []
        self.emitted = 0

    def add(self, token: int) -> str:
        if token in self.eos_ids:
            return ""
        self.ids.append(token)
        if BYTE_TOKEN.fullmatch(self.tokenizer.id_to_token(token) or ""):
            return ""  # the byte run may go on: its text is not final yet
        return self.take(final=False)

    def flush(self) -> str:
        return self.take(final=True)

    def take(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):  # an incomplete byte sequence: wait for the next token
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


class Pipeline:
    def __init__(
        self, folder: Path, manifest: contract.Manifest, backend, tokenizer, embed_table, chat_template
    ):
        self.folder = folder
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self.embed_table = embed_table  # [vocab, hidden], memory-mapped
        self.chat_template = chat_template

    @classmethod
    def load(cls, folder: str | os.PathLike, backend: str = "ort") -> Pipeline:
        """Opens an artifact folder; ArtifactError names any missing or unreadable file."""
        import tokenizers

        folder = Path(folder)
        manifest = contract.read_manifest(folder)
        for graph in ("vision", "decoder"):
            if graph not in manifest.graphs:
                raise ArtifactError(
                    f"{folder} has no {graph} graph: export it with `llava-export all --out {folder}`"
                )
        for name in (contract.EMBEDDINGS_FILE, contract.TOKENIZER_FILE):
            if not (folder / name).is_file():
                raise ArtifactError(
                    f"{folder / name} is missing: re-export with `llava-export all --out {folder}`"
                )
        try:
            embed_table = np.load(folder / contract.EMBEDDINGS_FILE, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise ArtifactError(
                f"{folder / contract.EMBEDDINGS_FILE} is unreadable ({err}); re-export it"
            ) from None
        expected = (manifest.text.vocab_size, manifest.text.hidden_size)
        if embed_table.shape != expected:
            raise ArtifactError(
                f"{folder / contract.EMBEDDINGS_FILE} has shape {embed_table.shape}, the manifest says {expected}"
            )
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(folder / contract.TOKENIZER_FILE))
        except Exception as err:
            raise ArtifactError(
                f"{folder / contract.TOKENIZER_FILE} is unreadable ({err}); re-export it"
            ) from None
        return cls(
            folder,
            manifest,
            load_backend(backend, folder, manifest),
            tokenizer,
            embed_table,
            read_chat_template(folder),
        )

    # -- preparing inputs -------------------------------------------------------------------

    def tokenize(self, request: Request) -> list[list[int]]:
        """Text chunks around the images; PromptError if too long for the model's positions."""
        template = request.template or self.manifest.template
        text = prompts.render_prompt(template, request.prompt, len(request.images), self.chat_template)
        chunks = prompts.tokenize_prompt(self.tokenizer, text, self.manifest.tokens.bos)
        length = prompts.count_prompt_tokens(chunks, self.manifest.vision.num_image_tokens)
        if length > self.manifest.text.max_positions:
            raise PromptError(
                f"prompt is {length} tokens with its images; the model takes at most {self.manifest.text.max_positions}"
            )
        engine_limit = getattr(self.backend, "max_input_len", None)  # a TensorRT engine's prefill profile
        if engine_limit is not None and length > engine_limit:
            raise PromptError(
                f"prompt is {length} tokens with its images; the TensorRT engine takes at most {engine_limit} "
                f"(rebuild it with `llava-export engine --artifacts {self.folder} --max-input-len {length}`)"
            )
        return chunks

    @property
    def max_positions(self) -> int:
        """Prompt + answer positions: the model's, or fewer where the backend's cache is smaller."""
        return min(
            self.manifest.text.max_positions,
            getattr(self.backend, "max_positions", self.manifest.text.max_positions),
        )

    def pixel_values(self, images: Sequence) -> np.ndarray:
        """Paths or PIL images -> [N,3,H,W] float32."""
        loaded = [image if hasattr(image, "convert") else preprocess.load_image(image) for image in images]
        return preprocess.preprocess(loaded, self.manifest.preprocess)

    def splice(self, chunks: list[list[int]], image_embeds: np.ndarray) -> np.ndarray:
        """Text embeddings with image i's [N_img, hidden] between chunk i and chunk i+1 -> [L, hidden]."""
        parts = []
        for index, chunk in enumerate(chunks):
            parts.append(self.embed_table[chunk])
            if index < len(chunks) - 1:
                parts.append(image_embeds[index])
        return np.concatenate(parts, axis=0).astype(self.backend.dtype, copy=False)

    # -- generating ---------------------------------------------------------------------------

    def steps(
        self, requests: list[Request], max_new_tokens: int, sampling, timings: Timings
    ) -> Iterator[list[int | None]]:
        """Per step, each request's new token (None once finished). Fills `timings` as it goes."""
        start = time.perf_counter()
        all_chunks = [self.tokenize(request) for request in requests]  # every check before any compute
        max_batch = getattr(self.backend, "max_batch", None)  # a TensorRT engine's profiles
        if max_batch is not None and len(requests) > max_batch:
            raise EngineError(
                f"{len(requests)} requests in one batch; the TensorRT engine takes at most {max_batch} "
                f"(rebuild it with `llava-export engine --artifacts {self.folder} --max-batch {len(requests)}`)"
            )
        images = [image for request in requests for image in request.images]
        embeds = np.zeros(
            (0, self.manifest.vision.num_image_tokens, self.manifest.text.hidden_size), self.backend.dtype
        )
        if images:
            pixels = self.pixel_values(images)
            encode_start = time.perf_counter()
            embeds = self.backend.encode_images(pixels)
            timings.image_encode_ms = (time.perf_counter() - encode_start) * 1000
        sequences, offset = [], 0
        for chunks in all_chunks:
            count = len(chunks) - 1
            sequences.append(self.splice(chunks, embeds[offset : offset + count]))
            offset += count
        prefill_start = time.perf_counter()
        tokens = generate.generate(
            self.backend,
            self.embed_table,
            sequences,
            max_new_tokens,
            self.manifest.tokens.eos,
            sampling,
            self.max_positions,
        )
        step_start = prefill_start
        for step in tokens:
            now = time.perf_counter()
            if timings.new_tokens == 0:
                timings.prefill_ms = (now - prefill_start) * 1000
            else:
                timings.decode_ms += (now - step_start) * 1000
            timings.new_tokens += 1
            yield step
            step_start = time.perf_counter()  # time spent by the consumer is not decode time
        timings.total_ms = (time.perf_counter() - start) * 1000

    def stream(
        self,
        prompt: str,
        images: Sequence = (),
        max_new_tokens: int = 128,
        template: str | None = None,
        sampling: generate.Sampling | None = None,
        timings: Timings | None = None,
    ) -> Iterator[str]:
        """Yields the answer's text piece by piece as tokens come."""
        text = TextStream(self.tokenizer, self.manifest.tokens.eos)
        for (token,) in self.steps(
            [Request(prompt, images, template)], max_new_tokens, sampling, timings or Timings()
        ):
            if token is not None:
                piece = text.add(token)
                if piece:
                    yield piece
        piece = text.flush()
        if piece:
            yield piece

    def generate(
        self,
        prompt: str,
        images: Sequence = (),
        max_new_tokens: int = 128,
        template: str | None = None,
        sampling: generate.Sampling | None = None,
    ) -> Answer:
        return self.generate_batch([Request(prompt, images, template)], max_new_tokens, sampling)[0]

    def generate_batch(
        self, requests: list[Request], max_new_tokens: int = 128, sampling: generate.Sampling | None = None
    ) -> list[Answer]:
        """Several requests in one left-padded batch; each Answer shares the batch's timings."""
        timings = Timings()
        ids: list[list[int]] = [[] for _ in requests]
        for step in self.steps(requests, max_new_tokens, sampling, timings):
            for row, token in enumerate(step):
                if token is not None:
                    ids[row].append(token)
        eos = set(self.manifest.tokens.eos)
        return [
            Answer(
                self.tokenizer.decode([t for t in row if t not in eos], skip_special_tokens=True),
                row,
                timings,
            )
            for row in ids
        ]


def read_chat_template(folder: Path) -> str | None:
    path = folder / contract.TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("chat_template")
    except ValueError:
        return None
