"""runtime/generate.py (left padding, positions, sampling, the decode loop), the backends'
Limits and lifecycle (runtime/backends/base.py) and the TextStream of runtime/pipeline.py,
against a scripted fake backend: no model needed."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from runtime.backends.base import Limits
from runtime.errors import EngineError, PromptError
from runtime.generate import Sampling, decode_one_token, generate, left_pad, positions, prefill
from runtime.pipeline import TextStream
from tests.support.fake_backends import EMBED_TABLE, EOS, HIDDEN, ScriptedBackend, sequence

# -- left padding and positions -------------------------------------------------------------


def test_left_pad_puts_padding_on_the_left():
    embeds, mask = left_pad([sequence(3, 7.0), sequence(5, 9.0)])
    assert embeds.shape == (2, 5, HIDDEN) and embeds.dtype == np.float32
    assert mask.dtype == np.int64
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(embeds[0, :2], 0.0)
    np.testing.assert_array_equal(embeds[0, 2:], 7.0)
    np.testing.assert_array_equal(embeds[1], 9.0)


def test_left_pad_keeps_the_dtype():
    embeds, _ = left_pad([sequence(2, 1.0).astype(np.float16)])
    assert embeds.dtype == np.float16


def test_positions_count_only_real_tokens():
    _, mask = left_pad([sequence(3, 1.0), sequence(5, 1.0)])
    # padding gets 0 (its value does not matter: the mask hides it); real tokens count from 0
    np.testing.assert_array_equal(positions(mask, 5), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    grown = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    np.testing.assert_array_equal(positions(grown, 1), [[3], [5]])


def test_prefill_then_decode_feed_the_backend_consistently():
    backend = ScriptedBackend([[4, 5], [6, 7]])
    state = prefill(backend, [sequence(3, 1.0), sequence(5, 2.0)])
    np.testing.assert_array_equal(state.logits.argmax(-1), [4, 6])
    first = backend.calls[0]
    assert first["embeds"].shape == (2, 5, HIDDEN)
    np.testing.assert_array_equal(first["positions"], [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])

    state = decode_one_token(backend, EMBED_TABLE, np.array([4, 6]), state)
    second = backend.calls[1]
    assert second["embeds"].shape == (2, 1, HIDDEN)
    np.testing.assert_array_equal(second["embeds"][:, 0, 0], [4.0, 6.0])  # the tokens' own embeddings
    np.testing.assert_array_equal(second["mask"], [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(second["positions"], [[3], [5]])
    assert state.cache == 6
    np.testing.assert_array_equal(state.logits.argmax(-1), [5, 7])


# -- sampling -------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)
    np.testing.assert_array_equal(Sampling().pick(logits), logits.argmax(-1))
    np.testing.assert_array_equal(Sampling(temperature=0.0, seed=3).pick(logits), logits.argmax(-1))


def draws(sampling: Sampling, logits: np.ndarray, n: int = 200) -> list[int]:
    return [int(sampling.pick(logits[None])[0]) for _ in range(n)]


FLAT = np.random.default_rng(1).normal(scale=0.5, size=50).astype(np.float32)


def test_seeded_sampling_is_reproducible():
    a = draws(Sampling(temperature=1.0, top_p=0.9, seed=7), FLAT)
    b = draws(Sampling(temperature=1.0, top_p=0.9, seed=7), FLAT)
    assert a == b
    assert len(set(a)) > 5  # it really sampled, not just took the argmax


def test_different_seeds_sample_differently():
    a = draws(Sampling(temperature=1.0, top_p=0.9, seed=7), FLAT)
    b = draws(Sampling(temperature=1.0, top_p=0.9, seed=8), FLAT)
    assert a != b


def test_tiny_top_p_always_takes_the_argmax():
    logits = np.random.default_rng(2).normal(size=(3, 50)).astype(np.float32)
    sampling = Sampling(temperature=5.0, top_p=1e-6, seed=0)  # a hot temperature, but a tiny nucleus
    for _ in range(100):
        np.testing.assert_array_equal(sampling.pick(logits), logits.argmax(-1))


def test_top_p_keeps_the_smallest_set_with_that_mass():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.8 >= 0.7), never the tail
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    seen = set(draws(Sampling(temperature=1.0, top_p=0.7, seed=0), logits, 500))
    assert seen == {0, 1}
    seen = set(draws(Sampling(temperature=1.0, top_p=1.0, seed=0), logits, 500))
    assert seen == {0, 1, 2, 3}


# -- the decode loop ------------------------------------------------------------------------


def run(backend: ScriptedBackend, lengths: list[int], max_new_tokens: int):
    sequences = [sequence(n, 1.0) for n in lengths]
    return list(generate(backend, EMBED_TABLE, sequences, max_new_tokens, [EOS], Sampling()))


def test_generate_stops_at_eos():
    k = 3
    backend = ScriptedBackend([[5, 6, 7, EOS, 8, 9]])
    steps = run(backend, [4], max_new_tokens=20)
    assert steps == [[5], [6], [7], [EOS]]  # the EOS is yielded, then nothing
    assert len(backend.calls) == k + 1  # prefill + k decodes: the EOS is never fed back


def test_a_finished_row_yields_none_while_the_other_runs_on():
    backend = ScriptedBackend([[5, EOS, 9], [6, 7, 8, EOS]])
    steps = run(backend, [3, 5], max_new_tokens=20)
    assert steps == [[5, 6], [EOS, 7], [None, 8], [None, EOS]]


def test_generate_respects_max_new_tokens():
    backend = ScriptedBackend([[5, 6, 7, 8, 9, 10, 11]])
    steps = run(backend, [4], max_new_tokens=4)
    assert steps == [[5], [6], [7], [8]]
    assert len(backend.calls) == 4  # the last token is never fed


def test_generate_fills_the_models_positions_exactly():
    backend = ScriptedBackend([[5]], Limits(max_positions=12))
    steps = run(backend, [10], max_new_tokens=3)
    # positions 0..9 hold the prompt; tokens 1 and 2 are fed at positions 10 and 11; token 3 is
    # the last one the model can produce (it would need position 12)
    assert steps == [[5], [5], [5]]
    fed = max(int(call["positions"].max()) for call in backend.calls)
    assert fed == 11


def test_more_tokens_than_the_models_positions_are_refused_before_any_compute():
    backend = ScriptedBackend([[5]], Limits(max_positions=12))
    with pytest.raises(
        PromptError,
        match="^prompt \\(10 tokens with its images\\) and 50 new tokens need 59 cache positions; "
        "the model takes at most 12 positions: ask for at most 3 new tokens$",
    ):
        run(backend, [10], max_new_tokens=50)
    assert backend.calls == []


def test_a_prompt_filling_every_position_still_gets_one_token():
    backend = ScriptedBackend([[5]], Limits(max_positions=12))
    assert run(backend, [12], max_new_tokens=1) == [[5]]
    assert len(backend.calls) == 1
    with pytest.raises(PromptError, match="ask for at most 1 new token$"):
        run(backend, [12], max_new_tokens=2)
    assert len(backend.calls) == 1


# -- the limits: one policy for every backend -----------------------------------------------

ENGINE = Limits(
    max_positions=256,
    kv_capacity=100,
    max_input=40,
    max_batch=2,
    owner="the TensorRT engine",
    resize="llava-export engine --artifacts DIR",
)


@pytest.mark.parametrize(
    "batch, prompt, new_tokens, error, message",
    [
        (
            3,
            10,
            1,
            EngineError,
            "3 sequences in one batch; the TensorRT engine takes at most 2: send fewer or resize the "
            "TensorRT engine: `llava-export engine --artifacts DIR --max-batch 3`",
        ),
        (
            1,
            257,
            1,
            PromptError,
            "prompt is 257 tokens with its images; the model takes at most 256 positions",
        ),
        (
            1,
            50,
            10,
            PromptError,
            "prompt is 50 tokens with its images; the TensorRT engine takes at most 40 in one prefill: "
            "shorten it or resize the TensorRT engine: `llava-export engine --artifacts DIR --max-input-len 50`",
        ),
        (  # both flags where the prompt needs a longer prefill and a larger cache
            1,
            120,
            1,
            PromptError,
            "the TensorRT engine takes at most 40 in one prefill: shorten it or resize the TensorRT engine: "
            "`llava-export engine --artifacts DIR --max-input-len 120 --max-seq-len 120`",
        ),
        (
            2,
            30,
            80,
            PromptError,
            "the batch's longest prompt (30 tokens with its images) and 80 new tokens need 109 cache positions; "
            "the TensorRT engine holds 100: ask for at most 71 new tokens or resize the TensorRT engine: "
            "`llava-export engine --artifacts DIR --max-seq-len 109`",
        ),
        (  # beyond the model's positions no engine helps
            1,
            30,
            300,
            PromptError,
            "need 329 cache positions; the TensorRT engine holds 100: ask for at most 71 new tokens",
        ),
    ],
)
def test_limits_refuse_what_does_not_fit_naming_the_fix(batch, prompt, new_tokens, error, message):
    with pytest.raises(error) as caught:
        ENGINE.check(batch=batch, prompt=prompt, new_tokens=new_tokens)
    assert message in str(caught.value)
    if "--max" not in message:
        assert "`" not in str(caught.value)  # no command to suggest


@pytest.mark.parametrize(
    "limits, prompt, new_tokens",
    [
        (ENGINE, 40, 61),  # the last token is never fed back: 40 + 60 = 100
        (Limits(max_positions=256), 256, 1),
        (Limits(max_positions=256, kv_capacity=4096), 200, 57),  # a cache larger than the model
    ],
)
def test_limits_take_what_fits_exactly(limits, prompt, new_tokens):
    limits.check(batch=1, prompt=prompt, new_tokens=new_tokens)
    with pytest.raises(PromptError, match="new token"):
        limits.check(batch=1, prompt=prompt, new_tokens=new_tokens + 1)


# -- the lifecycle --------------------------------------------------------------------------


def test_a_closed_backend_refuses_to_run():
    with ScriptedBackend([[5]]) as backend:
        assert run(backend, [3], max_new_tokens=2) == [[5], [5]]
    assert backend.closed and backend.released == 1
    backend.close()  # idempotent: released once
    assert backend.released == 1
    calls = len(backend.calls)
    with pytest.raises(EngineError, match="the fake backend is closed"):
        run(backend, [3], max_new_tokens=2)
    assert len(backend.calls) == calls


# -- streaming text -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    from exporter.testing.tiny_tokenizer import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer(folder)
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def is_byte_token(tokenizer: Tokenizer, token: int) -> bool:
    piece = tokenizer.id_to_token(token)
    return piece.startswith("<0x") and piece.endswith(">")


def stream_pieces(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    stream = TextStream(tokenizer, [EOS])
    pieces = [stream.add(token) for token in ids]
    pieces.append(stream.flush())
    return [piece for piece in pieces if piece]


def test_stream_never_splits_a_multibyte_character(tokenizer):
    text = "héllo wörld ✓"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    # é, ö (2 bytes) and ✓ (3 bytes) are not in the tiny vocabulary: they are byte tokens
    assert sum(is_byte_token(tokenizer, t) for t in ids) >= 7
    pieces = stream_pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces), pieces
    assert len(pieces) > 1  # it did stream


def test_stream_skips_eos(tokenizer):
    ids = tokenizer.encode("red ball", add_special_tokens=False).ids
    assert "".join(stream_pieces(tokenizer, [*ids, EOS])) == "red ball"


def test_stream_of_invalid_bytes_joins_to_the_full_decode(tokenizer):
    """What a random model emits: byte tokens that are no valid UTF-8 as a run. tokenizers'
    ByteFallback turns the whole run into U+FFFD, including bytes that were valid alone, so
    text streamed early would disagree with the final answer; and a run left incomplete at
    the end must still come out."""
    byte = {b: tokenizer.token_to_id(f"<0x{b:02X}>") for b in (0x41, 0xE2, 0x42, 0x9C)}
    word = tokenizer.encode("red", add_special_tokens=False).ids
    for ids in (
        [byte[0x41], byte[0xE2], byte[0x42], *word],  # valid "A", then a run that goes bad
        [*word, byte[0x41], byte[0xE2], byte[0x9C]],  # ends mid-character
        [byte[0xE2], *word, byte[0xE2], byte[0x42]],
    ):
        assert "".join(stream_pieces(tokenizer, ids)) == tokenizer.decode(ids)
