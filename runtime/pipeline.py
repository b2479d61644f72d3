"""The Python API: `Pipeline.load(DIR)`, then `generate(...)` or `stream(...)`.

    with Pipeline.load("artifacts/") as pipe:  # backend="ort" | "trt", threads=N (ONNX Runtime)
        answer = pipe.generate("What colour is the circle?", images=["cat.jpg"])
        print(answer.text, answer.timings)
        for piece in pipe.stream("Describe the image.", images=["cat.jpg"]):
            print(piece, end="", flush=True)

One run loop serves every caller (generate, generate_batch, stream, llava-run, the
benchmarks), in two steps:

    batch = pipe.prepare(requests, max_new_tokens)   # -> Batch
        render + tokenize each request; check the backend's limits (Limits.check) before
        anything is computed; load and preprocess the images into pixel values
    for tokens in pipe.run(batch, max_new_tokens, sampling, timings, stop_at_eos=True):
        encode the images, splice them into the text embeddings, prefill, decode; yields
        each row's new token per step (None once that row has finished) and fills timings

A `Batch` can also be built directly: per row, token-id chunks with one image between
consecutive chunks, and the images' pixel_values [N,3,H,W] float32 (a benchmark feeds random
ids around one image per row); for a LLaVA-1.6 ("anyres") model, every image's tiles
[tiles,3,S,S] and each image's size, which fixes its tiles and its tokens (runtime/anyres.py). `run` checks the limits again, since such a batch never went
through `prepare`; with stop_at_eos=False it runs exactly max_new_tokens steps. A request
that does not fit (prompt with its image tokens, left-padded across the batch, plus
max_new_tokens - 1 fed-back tokens, against the model's positions and the backend's KV
capacity, prefill length and batch size) is refused up front with the fix named; nothing is
cut short. `pipe.backend.limits.check(batch=..., prompt=..., new_tokens=...)` asks the same
question without a Batch.
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

from runtime import anyres, contract, generate, preprocess, prompts
from runtime.backends import load_backend
from runtime.errors import ArtifactError, PromptError

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token (Llama / sentencepiece vocabularies)


@dataclass
class Timings:
    image_encode_ms: float = 0.0
    splice_ms: float = 0.0  # text embeddings looked up and joined with the image embeddings
    prefill_ms: float = 0.0  # prefill alone; time to first token = image_encode_ms + splice_ms + prefill_ms
    decode_ms: float = 0.0
    new_tokens: int = 0
    total_ms: float = 0.0  # run's whole call; through generate / stream, tokenizing and loading images too

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes from prefill; decode produced the rest
        decoded = max(self.new_tokens - 1, 0)
        return decoded / (self.decode_ms / 1000) if self.decode_ms > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "image_encode_ms": round(self.image_encode_ms, 3),
            "splice_ms": round(self.splice_ms, 3),
            "prefill_ms": round(self.prefill_ms, 3),
            "time_to_first_token_ms": round(self.image_encode_ms + self.splice_ms + self.prefill_ms, 3),
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


@dataclass
class Batch:
    """Requests ready to run: per row, its token-id chunks, one image between consecutive
    chunks; `pixel_values` holds every row's images, row by row."""

    chunks: list[list[Sequence[int]]]  # row i has len(chunks[i]) - 1 images
    # [N,3,H,W] float32, one tile per image (LLaVA-1.5); under anyres every image's tiles, image
    # by image, [tiles,3,S,S]. None: no images
    pixel_values: np.ndarray | None = None
    image_sizes: list[tuple[int, int]] | None = None  # anyres only: each image's (height, width)

    def __post_init__(self):
        given = 0 if self.pixel_values is None else len(self.pixel_values)
        if self.image_sizes is None and given != self.images:
            raise PromptError(
                f"the batch's chunks have room for {self.images} images; pixel_values holds {given}"
            )
        if self.image_sizes is not None and len(self.image_sizes) != self.images:
            raise PromptError(
                f"the batch's chunks have room for {self.images} images; image_sizes gives {len(self.image_sizes)}"
            )

    @property
    def images(self) -> int:
        return sum(len(row) - 1 for row in self.chunks)


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
        self,
        folder: Path,
        manifest: contract.Manifest,
        backend,
        tokenizer,
        embed_table,
        chat_template,
        image_newline: np.ndarray | None = None,
    ):
        self.folder = folder
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self.embed_table = embed_table  # [vocab, hidden], memory-mapped
        self.chat_template = chat_template
        self.image_newline = image_newline  # [hidden]: ends each tile row (anyres); None for LLaVA-1.5

    @classmethod
    def load(cls, folder: str | os.PathLike, backend: str = "ort", threads: int | None = None) -> Pipeline:
        """Opens an artifact folder; ArtifactError names any missing or unreadable file.
        `threads`: ONNX Runtime's intra-op threads (None: its own choice; TensorRT takes none)."""
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
        newline = read_image_newline(folder, manifest)
        return cls(
            folder,
            manifest,
            load_backend(backend, folder, manifest, threads),
            tokenizer,
            embed_table,
            read_chat_template(folder),
            newline,
        )

    def close(self) -> None:
        """Releases the backend (sessions, device memory); idempotent."""
        self.backend.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- preparing inputs -------------------------------------------------------------------

    def tokenize(self, request: Request) -> list[list[int]]:
        """The request's text chunks around its images (PromptError if the placeholders do not match)."""
        template = request.template or self.manifest.template
        text = prompts.render_prompt(template, request.prompt, len(request.images), self.chat_template)
        return prompts.tokenize_prompt(self.tokenizer, text, self.manifest.tokens.bos)

    def check_limits(
        self,
        chunks: list[list[Sequence[int]]],
        max_new_tokens: int,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        """The backend's limits for these rows (their left-padded width counts each image's
        tokens; under anyres those follow from `image_sizes`, every row's images in order)."""
        counts = self.image_tokens(sum(len(row) - 1 for row in chunks), image_sizes)
        remaining = iter(counts)
        width = max(prompts.count_prompt_tokens(row, [next(remaining) for _ in row[1:]]) for row in chunks)
        try:
            self.backend.limits.check(batch=len(chunks), prompt=width, new_tokens=max_new_tokens)
        except PromptError as err:
            if self.manifest.anyres is None or not counts:
                raise
            sizes = ", ".join(f"{w}x{h}: {n}" for (h, w), n in zip(image_sizes, counts))
            raise PromptError(
                f"{err} (the images' tokens, by their sizes: {sizes}; a smaller image takes fewer)"
            ) from None

    def image_tokens(self, count: int, image_sizes: Sequence[tuple[int, int]] | None = None) -> list[int]:
        """The embeddings each of `count` images stands for in the prompt: N_img each for
        LLaVA-1.5; under anyres, known from each image's (height, width) before any compute."""
        if self.manifest.anyres is None:
            return [self.manifest.vision.num_image_tokens] * count
        if image_sizes is None or len(image_sizes) != count:
            raise PromptError(
                f"an anyres (LLaVA-1.6) model needs the size of each of its {count} images (Batch.image_sizes)"
            )
        return [
            anyres.image_token_count(size, self.manifest.anyres, self.manifest.vision) for size in image_sizes
        ]

    def load_images(self, images: Sequence) -> list:
        """Paths or PIL images -> PIL images (ImageError names a file that will not decode)."""
        return [image if hasattr(image, "convert") else preprocess.load_image(image) for image in images]

    def image_sizes(self, loaded: Sequence) -> list[tuple[int, int]] | None:
        """Each loaded image's (height, width) under anyres (its tiles and tokens follow); None for LLaVA-1.5."""
        return None if self.manifest.anyres is None else [(image.height, image.width) for image in loaded]

    def pixel_values(self, images: Sequence) -> np.ndarray:
        """Paths or PIL images -> [N,3,H,W] float32; under anyres every image's tiles, image by
        image, [tiles,3,S,S]."""
        loaded = self.load_images(images)
        spec = self.manifest.anyres
        if spec is None:
            return preprocess.preprocess(loaded, self.manifest.preprocess)
        return np.concatenate([anyres.tiles(image, spec, self.manifest.preprocess) for image in loaded])

    def prepare(self, requests: list[Request], max_new_tokens: int) -> Batch:
        """Tokenizes every request and checks the limits before anything is computed (one
        request that does not fit refuses the batch), then preprocesses the images. Under
        anyres the images are decoded before the check: their sizes fix their tokens."""
        chunks = [self.tokenize(request) for request in requests]
        images = [image for request in requests for image in request.images]
        if self.manifest.anyres is not None:
            images = self.load_images(images)
        sizes = self.image_sizes(images)
        self.check_limits(chunks, max_new_tokens, sizes)
        return Batch(chunks, self.pixel_values(images) if images else None, sizes)

    def splice_rows(
        self, chunks: list[list[Sequence[int]]], image_embeds: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """Each row spliced with its own images (image_embeds: each image's [tokens, hidden], row by row)."""
        sequences, offset = [], 0
        for row in chunks:
            count = len(row) - 1
            sequences.append(self.splice(row, image_embeds[offset : offset + count]))
            offset += count
        return sequences

    def splice(self, chunks: list[Sequence[int]], image_embeds: Sequence[np.ndarray]) -> np.ndarray:
        """Text embeddings with image i's [tokens_i, hidden] between chunk i and chunk i+1 -> [L, hidden]."""
        parts = []
        for index, chunk in enumerate(chunks):
            parts.append(self.embed_table[chunk])
            if index < len(chunks) - 1:
                parts.append(image_embeds[index])
        return np.concatenate(parts, axis=0).astype(self.backend.dtype, copy=False)

    # -- generating ---------------------------------------------------------------------------

    def run(
        self,
        batch: Batch,
        max_new_tokens: int,
        sampling: generate.Sampling | None = None,
        timings: Timings | None = None,
        stop_at_eos: bool = True,
    ) -> Iterator[list[int | None]]:
        """Per step, each row's new token (None once that row has finished): the limits, then
        encode, splice, prefill, decode. Fills `timings` as it goes (image_encode_ms, splice_ms,
        prefill_ms, decode_ms, new_tokens, total_ms); stop_at_eos=False runs exactly
        max_new_tokens steps."""
        timings = timings if timings is not None else Timings()
        start = time.perf_counter()
        self.check_limits(batch.chunks, max_new_tokens, batch.image_sizes)  # before the images are encoded
        image_embeds = self.image_embeds(batch, timings)
        splice_start = time.perf_counter()
        sequences = self.splice_rows(batch.chunks, image_embeds)
        timings.splice_ms = ms_since(splice_start)
        eos_ids = self.manifest.tokens.eos if stop_at_eos else []
        prefill_start = time.perf_counter()
        # generate checks the same limits again: it is callable on its own
        tokens = generate.generate(
            self.backend, self.embed_table, sequences, max_new_tokens, eos_ids, sampling
        )
        step_start = prefill_start
        for step in tokens:
            now = time.perf_counter()
            if timings.new_tokens == 0:
                timings.prefill_ms = ms_since(prefill_start, now)
            else:
                timings.decode_ms += ms_since(step_start, now)
            timings.new_tokens += 1
            yield step
            step_start = time.perf_counter()  # time spent by the consumer is not decode time
        timings.total_ms = ms_since(start)

    def image_embeds(self, batch: Batch, timings: Timings) -> list[np.ndarray]:
        """Each image's embeddings [tokens, hidden] in the decoder's dtype, in the batch's order:
        the vision graph's output per image (LLaVA-1.5), or under anyres each image's tiles
        packed (unpadded, a newline per row, the base tile first). image_encode_ms counts both."""
        if batch.pixel_values is None:
            return []
        spec = self.manifest.anyres
        if spec is not None:  # checked before the tiles are encoded
            counts = [anyres.tile_count(size, spec) for size in batch.image_sizes]
            if sum(counts) != len(batch.pixel_values):
                raise PromptError(
                    f"the batch's {len(counts)} images take {sum(counts)} tiles; pixel_values holds {len(batch.pixel_values)}"
                )
        start = time.perf_counter()
        embeds = self.backend.encode_images(batch.pixel_values)  # [tiles, N_img, hidden]
        if spec is None:
            images = list(embeds)
        else:
            bounds = np.cumsum([0, *counts])
            images = [
                anyres.pack(embeds[low:high], size, spec, self.manifest.vision, self.image_newline)
                for low, high, size in zip(bounds[:-1], bounds[1:], batch.image_sizes)
            ]
        timings.image_encode_ms = ms_since(start)
        return images

    def steps(
        self,
        requests: list[Request],
        max_new_tokens: int,
        sampling: generate.Sampling | None = None,
        timings: Timings | None = None,
    ) -> Iterator[list[int | None]]:
        """prepare + run: per step, each request's new token (None once finished). total_ms
        counts tokenizing and loading the images too."""
        timings = timings if timings is not None else Timings()
        start = time.perf_counter()
        yield from self.run(self.prepare(requests, max_new_tokens), max_new_tokens, sampling, timings)
        timings.total_ms = ms_since(start)

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
        for (token,) in self.steps([Request(prompt, images, template)], max_new_tokens, sampling, timings):
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


def ms_since(start: float, now: float | None = None) -> float:
    return ((time.perf_counter() if now is None else now) - start) * 1000


def read_image_newline(folder: Path, manifest: contract.Manifest) -> np.ndarray | None:
    """An anyres model's image_newline.npy [hidden]; None for LLaVA-1.5."""
    if manifest.anyres is None:
        return None
    path = folder / manifest.anyres.newline_file
    try:
        newline = np.load(path)
    except (OSError, ValueError) as err:
        raise ArtifactError(
            f"{path} is missing or unreadable ({err}); re-export with `llava-export vision`"
        ) from None
    if newline.shape != (manifest.text.hidden_size,):
        raise ArtifactError(
            f"{path} has shape {newline.shape}, the manifest says ({manifest.text.hidden_size},)"
        )
    return newline


def read_chat_template(folder: Path) -> str | None:
    path = folder / contract.TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("chat_template")
    except ValueError:
        return None
