"""The backend interface: what the generator needs from an inference engine, and no more.

A backend runs the two graphs of an artifact folder and says what it can take (`Limits`:
checked once per request, before any compute, by `Limits.check`, the one policy for every
backend). The KV cache is opaque to the caller: a backend keeps it wherever it is cheapest
(ONNX Runtime OrtValues, device buffers, ...).

Lifecycle, as Polygraphy's runners have it: a backend holds its sessions or device memory from
construction until `close()` (idempotent; a `with` block calls it), and a closed backend
raises EngineError instead of running. A backend implements the `*_impl` methods; the public
ones check that it is still open first.

    with load_backend("ort", folder, manifest) as backend:
        embeds = backend.encode_images(pixel_values)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import EngineError, PromptError


@dataclass(frozen=True)
class Limits:
    """The largest request a backend takes; None: no limit of that kind.

    A request is `batch` sequences left-padded to `prompt` positions (its images' tokens
    included) asking for `new_tokens` tokens. The last new token is never fed back, so the KV
    cache reaches prompt + new_tokens - 1 positions: no more than `capacity`."""

    max_positions: int  # the model's positions (prompt + answer)
    kv_capacity: int | None = None  # positions the KV cache holds; None: it grows as needed
    max_input: int | None = None  # positions one prefill takes, images included
    max_batch: int | None = None  # sequences per call
    owner: str = "the backend"  # what sets the three limits above, in messages
    resize: str | None = None  # the command that changes them; a limit's flag is appended to it

    @property
    def capacity(self) -> int:
        """Positions a generation may reach: the model's, or fewer where the cache is smaller."""
        return self.max_positions if self.kv_capacity is None else min(self.kv_capacity, self.max_positions)

    def check(self, batch: int, prompt: int, new_tokens: int) -> None:
        """EngineError (batch) or PromptError (positions) naming the fix, when the request does
        not fit; nothing is ever cut short instead."""
        if self.max_batch is not None and batch > self.max_batch:
            raise EngineError(
                f"{batch} sequences in one batch; {self.owner} takes at most {self.max_batch}: "
                f"send fewer{self.or_resize([f'--max-batch {batch}'])}"
            )
        needed = prompt + max(new_tokens - 1, 0)
        what = "prompt" if batch == 1 else "the batch's longest prompt"
        fix = self.or_resize(self.flags_to_fit(prompt, needed))
        if prompt > self.max_positions:
            raise PromptError(
                f"{what} is {prompt} tokens with its images; the model takes at most {self.max_positions} positions: shorten it"
            )
        if self.max_input is not None and prompt > self.max_input:
            raise PromptError(
                f"{what} is {prompt} tokens with its images; {self.owner} takes at most {self.max_input} in one prefill: "
                f"shorten it{fix}"
            )
        if prompt > self.capacity:
            raise PromptError(f"{what} is {prompt} tokens with its images; {self.holds()}: shorten it{fix}")
        if needed > self.capacity:
            room = self.capacity - prompt + 1
            raise PromptError(
                f"{what} ({prompt} tokens with its images) and {new_tokens} new tokens need {needed} cache positions; "
                f"{self.holds()}: ask for at most {room} new token{'s' if room != 1 else ''}{fix}"
            )

    def holds(self) -> str:
        """What bounds the positions: the cache where it is smaller than the model."""
        if self.capacity < self.max_positions:
            return f"{self.owner} holds {self.capacity}"
        return f"the model takes at most {self.max_positions} positions"

    def flags_to_fit(self, prompt: int, needed: int) -> list[str]:
        """The resize flags that make room for this request, where the model's positions allow."""
        flags = []
        if self.max_input is not None and self.max_input < prompt <= self.max_positions:
            flags.append(f"--max-input-len {prompt}")
        if self.kv_capacity is not None and self.kv_capacity < needed <= self.max_positions:
            flags.append(f"--max-seq-len {needed}")
        return flags

    def or_resize(self, flags: list[str]) -> str:
        if not flags or self.resize is None:
            return ""
        return f" or resize {self.owner}: `{self.resize} {' '.join(flags)}`"


class Backend(ABC):
    name: str = "?"
    dtype: np.dtype  # the decoder's floating dtype: inputs_embeds and image_embeds use it
    limits: Limits  # what this backend takes (set by its constructor)
    # Intra-op CPU threads the decoder's session really got (ONNX Runtime; 0: its own choice,
    # one per physical core); None: the backend has no such pool (TensorRT).
    threads: int | None = None
    closed: bool = False

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [B,3,H,W] float32 -> image_embeds [B,N_img,hidden] in the decoder's dtype."""
        self.check_open()
        return self.encode_images_impl(pixel_values)

    def empty_cache(self, batch: int) -> Any:
        """A KV cache holding zero positions for `batch` sequences."""
        self.check_open()
        return self.empty_cache_impl(batch)

    def decode(
        self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: Any
    ) -> tuple[np.ndarray, Any]:
        """One decoder call: inputs_embeds [B,S,hidden], attention_mask [B,P+S] int64,
        position_ids [B,S] int64, a cache of P positions -> (logits [B,vocab] float32, the
        cache of P+S positions). Prefill is S = prompt length with P = 0; decode is S = 1."""
        self.check_open()
        return self.decode_impl(inputs_embeds, attention_mask, position_ids, cache)

    def cache_to_host(self, cache: Any, length: int) -> list[np.ndarray]:
        """The cache's `length` live positions as host arrays, one [B,kv,length,hd] per past
        input (in contract order). With cache_from_host, what a continuous-batching scheduler
        uses to regroup rows (docs/serving.md); a copy of the whole cache, so not per step."""
        self.check_open()
        return self.cache_to_host_impl(cache, length)

    def cache_from_host(self, arrays: list[np.ndarray]) -> Any:
        """A cache holding these [B,kv,P,hd] arrays as its P live positions."""
        self.check_open()
        return self.cache_from_host_impl(arrays)

    def close(self) -> None:
        """Releases the sessions or device memory; later calls do nothing."""
        if not self.closed:
            self.closed = True
            self.close_impl()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_open(self) -> None:
        if self.closed:
            raise EngineError(f"the {self.name} backend is closed: load the artifacts again to run them")

    @abstractmethod
    def encode_images_impl(self, pixel_values: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def empty_cache_impl(self, batch: int) -> Any: ...

    @abstractmethod
    def decode_impl(
        self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: Any
    ) -> tuple[np.ndarray, Any]: ...

    @abstractmethod
    def cache_to_host_impl(self, cache: Any, length: int) -> list[np.ndarray]: ...

    @abstractmethod
    def cache_from_host_impl(self, arrays: list[np.ndarray]) -> Any: ...

    @abstractmethod
    def close_impl(self) -> None:
        """Frees what the backend holds; called once, by close()."""
