"""A scripted fake backend for the decoding loop's tests: no model, no ONNX Runtime."""

from __future__ import annotations

import numpy as np

from runtime.backends.base import Backend, Limits
from runtime.errors import PromptError

VOCAB, HIDDEN, EOS = 12, 4, 2
ROOMY = Limits(max_positions=1024)  # a model with positions to spare and a cache that grows


def fixed_cache(kv_capacity: int, max_positions: int = 1024) -> Limits:
    """The limits of a preallocated cache of `kv_capacity` positions (ONNX Runtime's static layout)."""
    return Limits(
        max_positions,
        kv_capacity,
        owner="the decoder's static KV cache",
        resize="llava-export decoder --kv-cache static",
    )


class ScriptedBackend(Backend):
    """Returns logits that make `script[row][step]` the argmax; records every decode call.

    The "cache" is the number of positions it holds, so each call can check that the
    generator grew the mask and the cache in step. A fixed capacity in `limits` is enforced
    the way the TensorRT engine and the static layout do: the call that would overrun it raises.
    """

    name = "fake"
    dtype = np.dtype(np.float32)

    def __init__(self, script: list[list[int]], limits: Limits = ROOMY):
        self.script = script
        self.limits = limits
        self.calls: list[dict] = []
        self.released = 0

    def encode_images_impl(self, pixel_values):
        raise AssertionError("no images in these tests")

    def empty_cache_impl(self, batch):
        return 0

    def decode_impl(self, inputs_embeds, attention_mask, position_ids, cache):
        batch, new, _ = inputs_embeds.shape
        assert attention_mask.shape == (batch, cache + new)
        assert position_ids.shape == (batch, new)
        if cache + new > self.limits.capacity:
            raise PromptError(f"the fake's cache overflows at {cache + new} positions")
        step = len(self.calls)
        self.calls.append(
            {"embeds": inputs_embeds.copy(), "mask": attention_mask.copy(), "positions": position_ids.copy()}
        )
        logits = np.zeros((batch, VOCAB), dtype=np.float32)
        for row in range(batch):
            script = self.script[row]
            logits[row, script[min(step, len(script) - 1)]] = 5.0
        return logits, cache + new

    def cache_to_host_impl(self, cache, length):
        raise AssertionError("the decoding loop never regroups rows")

    def cache_from_host_impl(self, arrays):
        raise AssertionError("the decoding loop never regroups rows")

    def close_impl(self):
        self.released += 1


# Token t's embedding is (t, t, t, t): easy to recognise in what the backend receives.
EMBED_TABLE = np.repeat(np.arange(VOCAB, dtype=np.float32)[:, None], HIDDEN, axis=1)


def sequence(length: int, fill: float) -> np.ndarray:
    return np.full((length, HIDDEN), fill, dtype=np.float32)
