"""A scripted fake backend for the decoding loop's tests: no model, no ONNX Runtime."""

from __future__ import annotations

import numpy as np

from runtime.backends.base import Backend

VOCAB, HIDDEN, EOS = 12, 4, 2


class ScriptedBackend(Backend):
    """Returns logits that make `script[row][step]` the argmax; records every decode call.

    The "cache" is the number of positions it holds, so each call can check that the
    generator grew the mask and the cache in step.
    """

    name = "fake"
    dtype = np.dtype(np.float32)

    def __init__(self, script: list[list[int]]):
        self.script = script
        self.calls: list[dict] = []

    def encode_images(self, pixel_values):
        raise AssertionError("no images in these tests")

    def empty_cache(self, batch):
        return 0

    def decode(self, inputs_embeds, attention_mask, position_ids, cache):
        batch, new, _ = inputs_embeds.shape
        assert attention_mask.shape == (batch, cache + new)
        assert position_ids.shape == (batch, new)
        step = len(self.calls)
        self.calls.append(
            {"embeds": inputs_embeds.copy(), "mask": attention_mask.copy(), "positions": position_ids.copy()}
        )
        logits = np.zeros((batch, VOCAB), dtype=np.float32)
        for row in range(batch):
            script = self.script[row]
            logits[row, script[min(step, len(script) - 1)]] = 5.0
        return logits, cache + new


# Token t's embedding is (t, t, t, t): easy to recognise in what the backend receives.
EMBED_TABLE = np.repeat(np.arange(VOCAB, dtype=np.float32)[:, None], HIDDEN, axis=1)


def sequence(length: int, fill: float) -> np.ndarray:
    return np.full((length, HIDDEN), fill, dtype=np.float32)
