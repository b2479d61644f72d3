"""The continuous-batching scheduler: one thread owns the backend, every request shares its
decode steps (docs/serving.md has the design and its costs).

    engine = Engine(Pipeline.load("artifacts/"), max_batch=8, max_queue=64)
    engine.start()
    job = Job.prepare(engine.pipe, prompt, images, GenerationParams(max_tokens=64))
    stream = await engine.submit(job)          # QueueFull when the queue is full
    async for event in stream:                 # Delta(text)..., then one Finish
        ...
    await engine.stop(grace_s=10)

No HTTP here: the server (app.py), the tests and Ray Serve replicas drive it alike. The
asyncio side only queues jobs and reads events; the scheduler thread never awaits.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from runtime import generate, prompts
from runtime.errors import EngineError, LlavaError, PromptError
from runtime.pipeline import Batch, Pipeline, TextStream, Timings
from runtime.serve.batch import HostRows, stack

UNHEALTHY_AFTER = 3  # failed steps in a row


class QueueFull(LlavaError):
    """The queue of waiting requests is full: try again later (HTTP 429)."""


class EngineStopped(LlavaError):
    """The engine is shutting down or has stopped (HTTP 503)."""


class RequestTimeout(LlavaError):
    """A request ran past its deadline (HTTP 504)."""


class ContextTooLong(PromptError):
    """The prompt with its images and the answer do not fit the model or its KV cache (HTTP 400,
    context_length_exceeded)."""


@dataclass(frozen=True)
class GenerationParams:
    """One request's own settings: its budget, sampling and stop strings."""

    max_tokens: int | None  # None: as many as the context leaves
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run the whole budget (benchmarks; vLLM's extension of the API)


@dataclass
class Job:
    """A request ready to run: its token chunks around its images, checked against the limits."""

    chunks: list[list[int]]  # len(chunks) - 1 images, one between consecutive chunks
    pixel_values: np.ndarray | None  # [N,3,H,W] float32 (anyres: [tiles,3,S,S]); None without images
    params: GenerationParams
    prompt_tokens: int  # the prompt's positions, each image's tokens included
    image_sizes: list[tuple[int, int]] | None = None  # anyres only: each image's (height, width)

    @classmethod
    def prepare(
        cls,
        pipe: Pipeline,
        prompt: str,
        images: Sequence,
        params: GenerationParams,
        load: Callable[[Any], Any] | None = None,
    ) -> Job:
        """`prompt` already rendered, one <image> per image. ContextTooLong when the prompt and
        max_tokens do not fit the model or the backend, checked before the images are loaded
        (under anyres just after: an image's size fixes its tokens). `load` turns each item of
        `images` into a PIL image; default: paths or PIL images."""
        chunks = prompts.tokenize_prompt(pipe.tokenizer, prompt, pipe.manifest.tokens.bos)
        if len(chunks) - 1 != len(images):
            raise PromptError(
                f"the prompt has {len(chunks) - 1} <image> placeholders for {len(images)} images"
            )
        loaded = None
        if pipe.manifest.anyres is not None:
            loaded = pipe.load_images([load(image) for image in images] if load else images)
        sizes = pipe.image_sizes(loaded) if loaded is not None else None
        tokens = prompts.count_prompt_tokens(chunks, pipe.image_tokens(len(images), sizes))
        if params.max_tokens is None:
            room = pipe.backend.limits.capacity - tokens + 1  # the last token is never fed back
            params = replace(params, max_tokens=max(room, 1))
        try:
            pipe.check_limits([chunks], params.max_tokens, sizes)
        except PromptError as err:
            raise ContextTooLong(str(err)) from None
        if loaded is None:
            loaded = [load(image) for image in images] if load else list(images)
        return cls(chunks, pipe.pixel_values(loaded) if images else None, params, tokens, sizes)


@dataclass(frozen=True)
class Delta:
    """New answer text (never half a character, never text a stop string may still claim)."""

    text: str


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int  # tokens generated, an EOS included


class Observer:
    """What the scheduler reports as it goes (metrics.py records it); does nothing here."""

    def first_token(self, seconds: float) -> None: ...

    def token_gap(self, seconds: float) -> None: ...

    def step(self, rows: int, seconds: float) -> None:
        """One batched decode step of `rows` rows (prefills and regroups not included)."""

    def finished(self, finish: Finish) -> None: ...

    def failed(self) -> None: ...


class Stream:
    """One request's events, sent by the scheduler thread: Delta..., then Finish, or an error
    raised from the iteration. `cancel()` (or a deadline passing) frees the request's row at
    the next step boundary."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float | None):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.cancelled = False  # read by the scheduler thread
        self.ended = False

    def send(self, event) -> None:
        """From the scheduler thread: a Delta, a Finish or an exception."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            self.cancelled = True

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self):
        if self.ended:
            raise StopAsyncIteration
        remaining = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)
        try:
            event = await asyncio.wait_for(self.events.get(), remaining)
        except asyncio.TimeoutError:
            self.cancel()
            self.ended = True
            raise RequestTimeout(
                f"the request ran past its {self.timeout_s:g} s timeout: ask for fewer tokens or try again"
            ) from None
        if isinstance(event, BaseException):
            self.ended = True
            raise event
        if isinstance(event, Finish):
            self.ended = True
        return event

    async def collect(self) -> tuple[str, Finish]:
        """The whole answer and how it finished."""
        pieces = []
        async for event in self:
            if isinstance(event, Delta):
                pieces.append(event.text)
            else:
                return "".join(pieces), event
        raise EngineError("the stream ended without finishing")  # unreachable: Finish ends it


class StopStrings:
    """Holds back text that may be the start of a stop string; cuts the text at the first one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [stop for stop in stops if stop]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was found)."""
        text = self.pending + piece
        hits = [text.find(stop) for stop in self.stops if stop in text]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        hold = max((self.overlap(text, stop) for stop in self.stops), default=0)
        self.pending = text[len(text) - hold :]
        return text[: len(text) - hold], False

    @staticmethod
    def overlap(text: str, stop: str) -> int:
        """The longest end of `text` that begins `stop` (shorter than stop: no full match)."""
        for size in range(min(len(text), len(stop) - 1), 0, -1):
            if stop.startswith(text[-size:]):
                return size
        return 0

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


@dataclass
class Row:
    """A request in the running batch: what it has generated and its own decoding state."""

    job: Job
    stream: Stream
    sampling: generate.Sampling
    text: TextStream
    stops: StopStrings
    submitted: float  # time.perf_counter() at submit
    generated: int = 0
    next_token: int = -1  # the token the next decode step feeds
    last_token_at: float = 0.0
    done: bool = False
    timings: Timings = field(default_factory=Timings)

    @property
    def gone(self) -> bool:
        return self.done or self.stream.cancelled


class Engine:
    """The scheduler: a bounded queue in front of one continuously batched decode loop."""

    def __init__(
        self,
        pipe: Pipeline,
        max_batch: int = 8,
        max_queue: int = 64,
        request_timeout_s: float | None = None,
        observer: Observer | None = None,
    ):
        backend_batch = pipe.backend.limits.max_batch
        if backend_batch is not None and max_batch > backend_batch:
            raise EngineError(
                f"--max-batch {max_batch} is more than {pipe.backend.limits.owner} takes ({backend_batch}): "
                f"use --max-batch {backend_batch} or rebuild the engines"
            )
        self.pipe = pipe
        self.backend = pipe.backend
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.observer = observer or Observer()
        self.eos_ids = pipe.manifest.tokens.eos
        self.waiting: collections.deque[tuple[Job, Stream, float]] = collections.deque()
        self.rows: list[Row] = []
        self.cache = None  # the backend's cache of self.rows, self.mask.shape[1] positions
        self.mask = np.zeros((0, 0), dtype=np.int64)
        self.lock = threading.Condition()
        self.stopping = False  # no new requests
        self.aborting = False  # fail what is left
        self.thread: threading.Thread | None = None
        self.steps = 0  # decode steps run, for tests and metrics
        self.failed_steps = 0  # in a row: a backend that keeps failing makes the engine unhealthy

    # -- the asyncio side -------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self.loop, name="llava-scheduler", daemon=True)
        self.thread.start()

    async def submit(self, job: Job, timeout_s: float | None = None) -> Stream:
        """Queues a job; QueueFull at once when --max-queue requests already wait,
        EngineStopped once shutdown began. `timeout_s` overrides the engine's request timeout."""
        stream = Stream(asyncio.get_running_loop(), timeout_s or self.request_timeout_s)
        with self.lock:
            if self.stopping or self.thread is None or not self.thread.is_alive():
                raise EngineStopped("the server is shutting down: send the request to another replica")
            self.drop_cancelled_waiting()
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting: retry shortly")
            self.waiting.append((job, stream, time.perf_counter()))
            self.lock.notify()
        return stream

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def healthy(self) -> bool:
        """The thread runs, the backend is open and its last steps did not all fail (/health,
        and Ray Serve's health check, which replaces an unhealthy replica)."""
        alive = self.thread is not None and self.thread.is_alive()
        return alive and not self.backend.closed and self.failed_steps < UNHEALTHY_AFTER

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stops taking requests, lets the queued and running ones finish for up to `grace_s`,
        then fails what is left with EngineStopped and ends the thread."""
        await asyncio.to_thread(self.shutdown, grace_s)

    def shutdown(self, grace_s: float = 30.0) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(grace_s)
        with self.lock:
            self.aborting = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()

    # -- the scheduler thread ---------------------------------------------------------------

    def loop(self) -> None:
        while True:
            with self.lock:
                while not (self.waiting or self.rows or self.stopping):
                    self.lock.wait()
                if self.aborting or (self.stopping and not self.waiting and not self.rows):
                    break
                # one prefill per step boundary: the running rows wait for at most one prefill
                # between two of their tokens (docs/serving.md)
                live = sum(not row.gone for row in self.rows)  # rows that finish now leave at this boundary
                joining = [self.waiting.popleft()] if self.waiting and live < self.max_batch else []
            self.step(joining)
        self.fail_all(EngineStopped("the server shut down before the request finished: retry it"))

    def step(self, joining: list[tuple[Job, Stream, float]]) -> None:
        """One step boundary: retire, admit, regroup; then one batched decode step."""
        try:
            leaving = [index for index, row in enumerate(self.rows) if row.gone]
            joining = [entry for entry in joining if not entry[1].cancelled]
            if leaving or joining:
                self.regroup(leaving, joining)
            if self.rows:
                self.decode_step()
                self.failed_steps = 0
        except Exception as err:  # a backend failure: fail this batch, keep serving the queue
            self.failed_steps += 1
            self.fail_batch(err)

    def regroup(self, leaving: list[int], joining: list[tuple[Job, Stream, float]]) -> None:
        """The cache to the host (before any prefill: TensorRT keeps one live cache), the rows
        that stay, each new row prefilled alone, and the whole back to the backend."""
        keep = [index for index in range(len(self.rows)) if index not in set(leaving)]
        parts = []
        if keep:
            parts.append(
                HostRows(self.backend.cache_to_host(self.cache, self.mask.shape[1]), self.mask).select(keep)
            )
        self.cache = None  # the backend's copy goes before the merge: one copy less at the peak
        self.rows = [self.rows[index] for index in keep]
        for job, stream, submitted in joining:
            admitted = self.admit(job, stream, submitted)
            if admitted is not None:
                row, cache = admitted
                self.rows.append(row)
                parts.append(cache)
        if not parts:
            self.cache, self.mask = None, np.zeros((0, 0), dtype=np.int64)
            return
        merged = stack(parts)
        self.cache, self.mask = self.backend.cache_from_host(merged.arrays), merged.mask

    def admit(self, job: Job, stream: Stream, submitted: float) -> tuple[Row, HostRows] | None:
        """Encode, splice and prefill one request alone; sends its first token. None when it
        failed (it fails alone) or finished with its first token."""
        params = job.params
        row = Row(
            job,
            stream,
            generate.Sampling(params.temperature, params.top_p, params.seed),
            TextStream(self.pipe.tokenizer, self.eos_ids),
            StopStrings(params.stop),
            submitted,
        )
        try:
            batch = Batch([job.chunks], job.pixel_values, job.image_sizes)
            sequences = self.pipe.splice_rows(batch.chunks, self.pipe.image_embeds(batch, row.timings))
            state = generate.prefill(self.backend, sequences)
            cache = HostRows(self.backend.cache_to_host(state.cache, state.mask.shape[1]), state.mask)
        except LlavaError as err:  # the request's own fault
            self.observer.failed()
            stream.send(err)
            return None
        except Exception as err:  # the backend's: counts towards unhealthy, like a failed step
            self.failed_steps += 1
            self.observer.failed()
            stream.send(EngineError(f"the request failed: {err}"))
            return None
        self.failed_steps = 0
        self.accept(row, int(row.sampling.pick(state.logits)[0]))
        return None if row.gone else (row, cache)

    def decode_step(self) -> None:
        start = time.perf_counter()
        tokens = np.array([row.next_token for row in self.rows])
        state = generate.DecodeState(self.cache, self.mask, None)
        state = generate.decode_one_token(self.backend, self.pipe.embed_table, tokens, state)
        self.cache, self.mask = state.cache, state.mask
        self.steps += 1
        self.observer.step(len(self.rows), time.perf_counter() - start)
        for index, row in enumerate(self.rows):
            self.accept(row, int(row.sampling.pick(state.logits[index : index + 1])[0]))

    def accept(self, row: Row, token: int) -> None:
        """A row's new token: its text to the client, and whether it has finished."""
        now = time.perf_counter()
        if row.generated == 0:
            self.observer.first_token(now - row.submitted)
        else:
            self.observer.token_gap(now - row.last_token_at)
        row.generated += 1
        row.last_token_at = now
        row.next_token = token
        if token in self.eos_ids and not row.job.params.ignore_eos:
            self.finish(row, "stop", row.text.flush())
            return
        text, stopped = row.stops.feed(row.text.add(token))
        if text:
            row.stream.send(Delta(text))
        if stopped:
            self.finish(row, "stop", None)
        elif row.generated >= row.job.params.max_tokens:
            self.finish(row, "length", row.text.flush())

    def finish(self, row: Row, reason: str, tail: str | None) -> None:
        """Sends what text is left (unless a stop string cut it) and the Finish."""
        if tail is not None:
            text, stopped = row.stops.feed(tail)
            text += "" if stopped else row.stops.flush()
            reason = "stop" if stopped else reason
            if text:
                row.stream.send(Delta(text))
        finish = Finish(reason, row.job.prompt_tokens, row.generated)
        row.done = True
        self.observer.finished(finish)
        row.stream.send(finish)

    def fail_batch(self, err: Exception) -> None:
        error = err if isinstance(err, LlavaError) else EngineError(f"the batch failed: {err}")
        for row in self.rows:
            if not row.done:
                self.observer.failed()
                row.stream.send(error)
        self.rows, self.cache, self.mask = [], None, np.zeros((0, 0), dtype=np.int64)

    def fail_all(self, error: LlavaError) -> None:
        self.fail_batch(error)
        with self.lock:
            waiting, self.waiting = list(self.waiting), collections.deque()
        for _job, stream, _submitted in waiting:
            self.observer.failed()
            stream.send(error)

    def drop_cancelled_waiting(self) -> None:
        """Waiting requests whose client left no longer hold a place in the queue (lock held)."""
        if any(stream.cancelled for _job, stream, _ in self.waiting):
            self.waiting = collections.deque(entry for entry in self.waiting if not entry[1].cancelled)
