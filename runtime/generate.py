"""Decoding: prefill, decode_one_token, generate (after gpt-fast's generate.py).

Sequences arrive as spliced embeddings (text embeddings with image embeddings in place of
each <image>). A batch is left-padded: real tokens end at the same column, so every row's
next token is at the last position, and position ids count only real tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.backends.base import Backend


@dataclass
class Sampling:
    """Greedy when temperature is 0 (the default); otherwise temperature + nucleus (top-p)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    def pick(self, logits: np.ndarray) -> np.ndarray:
        """logits [B,vocab] float32 -> token ids [B]."""
        if self.temperature <= 0:
            return logits.argmax(-1)
        return np.array([self.sample_row(row) for row in logits])

    def sample_row(self, logits: np.ndarray) -> int:
        scaled = logits.astype(np.float64) / self.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, self.top_p)) + 1]  # smallest set with mass >= top_p
        kept = probs[keep] / probs[keep].sum()
        return int(keep[self.rng.choice(len(keep), p=kept)])


@dataclass
class DecodeState:
    cache: Any  # the backend's KV cache, P positions
    mask: np.ndarray  # [B, P] int64, 0 on left padding
    logits: np.ndarray  # [B, vocab] for the next token


def left_pad(sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """[L_i, hidden] each -> embeds [B, L, hidden] (zeros on the left), mask [B, L] int64."""
    width = max(len(s) for s in sequences)
    embeds = np.zeros((len(sequences), width, sequences[0].shape[-1]), dtype=sequences[0].dtype)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        embeds[row, width - len(sequence) :] = sequence
        mask[row, width - len(sequence) :] = 1
    return embeds, mask


def positions(mask: np.ndarray, new: int) -> np.ndarray:
    """Position ids [B, new] of the last `new` columns: real tokens count from 0."""
    return np.maximum(mask.cumsum(-1) - 1, 0)[:, -new:]


def prefill(backend: Backend, sequences: list[np.ndarray]) -> DecodeState:
    embeds, mask = left_pad(sequences)
    logits, cache = backend.decode(
        embeds, mask, positions(mask, embeds.shape[1]), backend.empty_cache(len(sequences))
    )
    return DecodeState(cache, mask, logits)


def decode_one_token(
    backend: Backend, embed_table: np.ndarray, tokens: np.ndarray, state: DecodeState
) -> DecodeState:
    """Feeds tokens [B] at the next position; the cache grows by one."""
    embeds = embed_table[tokens][:, None, :]  # [B, 1, hidden]
    mask = np.concatenate([state.mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
    logits, cache = backend.decode(embeds, mask, positions(mask, 1), state.cache)
    return DecodeState(cache, mask, logits)


def generate(
    backend: Backend,
    embed_table: np.ndarray,
    sequences: list[np.ndarray],
    max_new_tokens: int,
    eos_ids: list[int],
    sampling: Sampling | None = None,
) -> Iterator[list[int | None]]:
    """Yields, per step, each row's new token (None once that row has finished).

    A row finishes at an EOS id (which is yielded) or after max_new_tokens; with no EOS ids
    every row runs exactly max_new_tokens steps. The backend's limits are checked before any
    compute (Limits.check: PromptError or EngineError naming the fix), so the loop is never
    cut short by the model's positions or a fixed cache, and never overruns one.
    """
    sampling = sampling or Sampling()
    width = max(len(s) for s in sequences)  # the left-padded prompt's
    backend.limits.check(batch=len(sequences), prompt=width, new_tokens=max_new_tokens)
    state = prefill(backend, sequences)
    finished = np.zeros(len(sequences), dtype=bool)
    for step in range(max_new_tokens):
        tokens = sampling.pick(state.logits)
        yield [None if done else int(token) for token, done in zip(tokens, finished)]
        finished |= np.isin(tokens, eos_ids)
        if finished.all() or step == max_new_tokens - 1:
            return  # the last token is never fed back
        state = decode_one_token(backend, embed_table, tokens, state)
