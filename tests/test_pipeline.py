"""The Python API (runtime/pipeline.py) on the tiny model exported in float32: answers,
streaming, batching, several images, and the typed errors a user can get."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import ArtifactError, EngineError, ImageError, PromptError
from runtime.pipeline import Answer, Batch, Pipeline, Request, Timings

PROMPTS = ["What is shown in the image?", "Describe the image in detail, with every colour you can see."]


@pytest.fixture(scope="module")
def pipe(tiny_artifacts) -> Pipeline:
    return Pipeline.load(tiny_artifacts)


class Recorder:
    """Wraps a backend's encode_images and decode, recording their inputs; restores them after."""

    def __init__(self, backend):
        self.backend = backend
        self.encoded: list[np.ndarray] = []
        self.decoded: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._encode, self._decode = backend.encode_images, backend.decode

    def __enter__(self):
        def encode_images(pixel_values):
            self.encoded.append(pixel_values.copy())
            return self._encode(pixel_values)

        def decode(inputs_embeds, attention_mask, position_ids, cache):
            self.decoded.append((inputs_embeds.copy(), attention_mask.copy(), position_ids.copy()))
            return self._decode(inputs_embeds, attention_mask, position_ids, cache)

        self.backend.encode_images, self.backend.decode = encode_images, decode
        return self

    def __exit__(self, *exc):
        del self.backend.encode_images, self.backend.decode  # back to the class's methods

    @property
    def prefill_embeds(self) -> np.ndarray:
        return self.decoded[0][0]


# -- answers --------------------------------------------------------------------------------


def test_generate_returns_an_answer_with_timings(pipe, images):
    answer = pipe.generate(PROMPTS[0], images=[images["a"]], max_new_tokens=12)
    assert isinstance(answer, Answer) and isinstance(answer.timings, Timings)
    assert 1 <= len(answer.token_ids) <= 12
    assert all(isinstance(t, int) and 0 <= t < pipe.manifest.text.vocab_size for t in answer.token_ids)
    content = [t for t in answer.token_ids if t not in pipe.manifest.tokens.eos]
    assert answer.text == pipe.tokenizer.decode(content, skip_special_tokens=True)
    timings = answer.timings
    assert timings.new_tokens == len(answer.token_ids)
    assert timings.image_encode_ms > 0 and timings.prefill_ms > 0 and timings.total_ms > 0
    assert timings.total_ms >= timings.image_encode_ms + timings.prefill_ms + timings.decode_ms
    if timings.new_tokens > 1:
        assert timings.decode_ms > 0 and timings.decode_tokens_per_s > 0
    assert {"image_encode_ms", "prefill_ms", "decode_tokens_per_s", "total_ms"} <= set(timings.as_dict())


def test_generate_is_deterministic_and_uses_the_image(pipe, images):
    first = pipe.generate(PROMPTS[0], images=[images["a"]], max_new_tokens=16)
    again = pipe.generate(PROMPTS[0], images=[images["a"]], max_new_tokens=16)
    other = pipe.generate(PROMPTS[0], images=[images["b"]], max_new_tokens=16)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


def test_text_only_prompt(pipe):
    with Recorder(pipe.backend) as calls:
        answer = pipe.generate(PROMPTS[0], max_new_tokens=4)
    assert answer.token_ids and calls.encoded == []
    assert answer.timings.image_encode_ms == 0


@pytest.mark.parametrize("prompt", PROMPTS + ["Is there a red ball?"])
def test_stream_pieces_join_to_the_generated_text(pipe, images, prompt):
    new_tokens = 31  # all that fit after the longest prompt (226 positions with its image, of 256)
    answer = pipe.generate(prompt, images=[images["a"]], max_new_tokens=new_tokens)
    timings = Timings()
    pieces = list(pipe.stream(prompt, images=[images["a"]], max_new_tokens=new_tokens, timings=timings))
    assert "".join(pieces) == answer.text
    assert timings.new_tokens == len(answer.token_ids)


# -- batching -------------------------------------------------------------------------------


def test_batch_equals_each_request_alone(pipe, images):
    requests = [Request(PROMPTS[0], [images["a"]]), Request(PROMPTS[1], [images["b"]])]
    alone = [pipe.generate_batch([request], max_new_tokens=16)[0] for request in requests]
    with Recorder(pipe.backend) as calls:
        batch = pipe.generate_batch(requests, max_new_tokens=16)
    mask = calls.decoded[0][1]  # the prefill's attention mask: the shorter prompt is left-padded
    assert mask.shape[0] == 2 and mask[0, 0] == 0 and mask[1].all()
    assert [a.token_ids for a in batch] == [a.token_ids for a in alone]
    assert [a.text for a in batch] == [a.text for a in alone]


# -- images and placeholders ----------------------------------------------------------------


def expected_splice(pipe: Pipeline, prompt: str, image_paths) -> np.ndarray:
    """The prefill input built by hand: token embeddings, with each image's own embeddings
    (encoded alone) where its placeholder was."""
    chunks = pipe.tokenize(Request(prompt, image_paths))
    parts = []
    for index, chunk in enumerate(chunks):
        parts.append(np.asarray(pipe.embed_table[chunk]))
        if index < len(image_paths):
            parts.append(pipe.backend.encode_images(pipe.pixel_values([image_paths[index]]))[0])
    return np.concatenate(parts)


def test_several_images_fill_their_placeholders_in_order(pipe, images):
    prompt = "Left: <image> right: <image> Which one is red?"
    a, b = images["a"], images["b"]
    with Recorder(pipe.backend) as calls:
        pipe.generate(prompt, images=[a, b], max_new_tokens=1)
        pipe.generate(prompt, images=[b, a], max_new_tokens=1)
    ab, ba = calls.decoded[0][0][0], calls.decoded[1][0][0]
    assert len(ab) == len(ba) == sum(map(len, pipe.tokenize(Request(prompt, [a, b])))) + 2 * 16
    np.testing.assert_allclose(ab, expected_splice(pipe, prompt, [a, b]), atol=1e-5)
    np.testing.assert_allclose(ba, expected_splice(pipe, prompt, [b, a]), atol=1e-5)
    assert not np.allclose(ab, ba, atol=1e-3)  # swapping the images changes the input


def test_placeholder_count_must_match_the_images(pipe, images):
    with pytest.raises(PromptError, match="2 <image> placeholders but 1 image"):
        pipe.generate("<image> and <image>?", images=[images["a"]])
    with pytest.raises(PromptError, match="placeholder"):
        pipe.generate("<image> what is it?", images=[images["a"], images["b"]])


def test_an_image_without_placeholder_goes_in_front(pipe, images):
    with Recorder(pipe.backend) as calls:
        implicit = pipe.generate(PROMPTS[0], images=[images["a"]], max_new_tokens=8)
        explicit = pipe.generate("<image>\n" + PROMPTS[0], images=[images["a"]], max_new_tokens=8)
        pipe.generate(
            PROMPTS[0] + "\n<image>", images=[images["a"]], max_new_tokens=1
        )  # prefill: decoded[-1]
    np.testing.assert_array_equal(calls.prefill_embeds, calls.decoded[len(implicit.token_ids)][0])
    assert implicit.token_ids == explicit.token_ids
    assert not np.array_equal(calls.prefill_embeds, calls.decoded[-1][0])  # placement matters


# -- typed errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing", "no such image file"),
        ("truncated", "truncated or corrupt"),
        ("not_image", "not an image"),
        ("bomb", "decompression bomb"),
    ],
)
def test_bad_image_raises_image_error_naming_the_file(pipe, images, name, message):
    with pytest.raises(ImageError, match=message) as caught:
        pipe.generate(PROMPTS[0], images=[images[name]], max_new_tokens=2)
    assert str(images[name]) in str(caught.value)


def test_too_long_prompt_is_refused_before_any_compute(pipe, images):
    prompt = "red ball " * 200  # well over the tiny model's 256 positions
    with Recorder(pipe.backend) as calls:
        with pytest.raises(PromptError, match="at most 256"):
            pipe.generate(prompt, images=[images["a"]], max_new_tokens=2)
        with pytest.raises(PromptError, match="at most 256"):
            list(pipe.stream(prompt, images=[images["a"]], max_new_tokens=2))
        with pytest.raises(PromptError, match="at most 256"):  # one bad request spoils the batch up front
            pipe.generate_batch([Request(PROMPTS[0], [images["a"]]), Request(prompt, [images["b"]])])
    assert calls.encoded == [] and calls.decoded == []


def prompt_of_length(pipe: Pipeline, length: int) -> str:
    """A text-only prompt of exactly `length` tokens, template included ("the" is one token)."""
    from runtime import prompts

    for words in range(1, length):
        prompt = " ".join(["the"] * words)
        text = prompts.render_prompt(pipe.manifest.template, prompt, 0)
        chunks = prompts.tokenize_prompt(pipe.tokenizer, text, pipe.manifest.tokens.bos)
        if prompts.count_prompt_tokens(chunks, pipe.manifest.vision.num_image_tokens) == length:
            return prompt
    raise AssertionError(f"no prompt of {length} tokens")


def test_the_limit_is_the_models_positions(pipe):
    """A prompt filling all 256 positions still gets its one token (the last position's
    logits); with 3 positions to spare exactly 4 new tokens fit (the last is never fed back).
    More is refused before any compute, naming how many fit: nothing is cut short."""
    limit = pipe.manifest.text.max_positions
    full, spare = prompt_of_length(pipe, limit), prompt_of_length(pipe, limit - 3)
    assert len(pipe.generate(full, max_new_tokens=1).token_ids) == 1
    with Recorder(pipe.backend) as calls:
        steps = list(pipe.run(pipe.prepare([Request(spare)], 4), 4, stop_at_eos=False))
        assert len(steps) == 4 and calls.decoded[-1][1].shape == (1, limit)
    with Recorder(pipe.backend) as calls:
        with pytest.raises(
            PromptError,
            match=f"and 5 new tokens need {limit + 1} cache positions; the model takes at most {limit} "
            "positions: ask for at most 4 new tokens$",
        ):
            pipe.generate(spare, max_new_tokens=5)
        with pytest.raises(PromptError, match="ask for at most 1 new token$"):
            pipe.generate(full, max_new_tokens=2)
        with pytest.raises(PromptError, match=f"prompt is {limit + 1} tokens"):
            pipe.generate(prompt_of_length(pipe, limit + 1), max_new_tokens=1)
    assert calls.decoded == []


# -- prepare and run: the one loop ----------------------------------------------------------


def test_a_batch_built_from_token_ids_runs_like_a_request(pipe, images):
    """What a benchmark does: its own token-id chunks around one image per row, no text."""
    request = Request(PROMPTS[0], [images["a"]])
    answer = pipe.generate_batch([request], max_new_tokens=8)[0]
    batch = Batch([pipe.tokenize(request)], pipe.pixel_values([images["a"]]))
    timings = Timings()
    steps = list(pipe.run(batch, 8, timings=timings))
    assert [token for (token,) in steps if token is not None] == answer.token_ids
    assert timings.new_tokens == len(steps) and timings.image_encode_ms > 0 and timings.splice_ms > 0
    assert timings.total_ms >= timings.image_encode_ms + timings.splice_ms + timings.prefill_ms
    assert "splice_ms" in timings.as_dict()


def test_run_without_eos_runs_exactly_max_new_tokens_steps(tiny_artifacts, images):
    """Random ids around one image per row, as the benchmark feeds them; the model's first
    token made the EOS (on a pipeline of this test's own), so only stop_at_eos=False goes on."""
    rng = np.random.default_rng(0)
    with Pipeline.load(tiny_artifacts) as own:
        vocab = own.manifest.text.vocab_size
        pixels = own.pixel_values([images["a"], images["b"]])
        chunks = [[rng.integers(3, vocab, 5), rng.integers(3, vocab, 7)], [rng.integers(3, vocab, 3), [4, 5]]]
        with Recorder(own.backend) as calls:
            steps = list(own.run(Batch(chunks, pixels), 20, stop_at_eos=False))
        assert len(steps) == 20 and all(None not in step for step in steps)
        assert len(calls.encoded) == 1 and calls.encoded[0].shape == pixels.shape
        assert calls.decoded[0][1].shape == (2, 12 + 16)  # left-padded to the wider row
        own.manifest.tokens.eos = list(steps[0])
        assert len(list(own.run(Batch(chunks, pixels), 20))) == 1
        assert list(own.run(Batch(chunks, pixels), 20, stop_at_eos=False)) == steps


def test_run_checks_the_limits_of_a_batch_it_did_not_prepare(pipe, images):
    batch = Batch([[list(range(3, 300)), [5]]], pipe.pixel_values([images["a"]]))
    with Recorder(pipe.backend) as calls:
        with pytest.raises(PromptError, match="at most 256"):
            next(pipe.run(batch, 4))
    assert calls.encoded == [] and calls.decoded == []


def test_a_batch_needs_one_image_between_chunks(pipe, images):
    with pytest.raises(PromptError, match="room for 2 images; pixel_values holds 1"):
        Batch([[[1], [2], [3]]], pipe.pixel_values([images["a"]]))
    with pytest.raises(PromptError, match="room for 1 images; pixel_values holds 0"):
        Batch([[[1], [2]]])


def test_limits_are_checked_before_the_images_are_read(pipe, images):
    """prepare refuses a request that cannot fit before it opens any image (a missing file here)."""
    with pytest.raises(PromptError, match="at most 256"):
        pipe.prepare([Request(PROMPTS[0], [images["missing"]])], max_new_tokens=500)
    with pytest.raises(ImageError):
        pipe.prepare([Request(PROMPTS[0], [images["missing"]])], max_new_tokens=2)


# -- lifecycle and options ------------------------------------------------------------------


def test_a_closed_pipeline_releases_its_backend_and_says_so(tiny_artifacts):
    with Pipeline.load(tiny_artifacts) as own:
        assert own.generate(PROMPTS[0], max_new_tokens=2).token_ids
    assert own.backend.closed and own.backend.decoder is None and own.backend.vision is None
    own.close()  # idempotent
    with pytest.raises(EngineError, match="the ort-cpu backend is closed"):
        own.generate(PROMPTS[0], max_new_tokens=2)


def test_threads_go_through_the_constructor(tiny_artifacts, monkeypatch):
    monkeypatch.setenv("LLAVA_THREADS", "3")  # no longer read: the argument is the one way in
    with Pipeline.load(tiny_artifacts, threads=2) as own:
        assert own.backend.threads == 2
    with Pipeline.load(tiny_artifacts) as own:
        assert own.backend.threads == 0  # ONNX Runtime's own choice


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing_folder", "does not exist"),
        ("no_decoder", "decoder.onnx is missing"),
        ("future_version", "format version 99"),
        ("truncated_decoder", "decoder.onnx cannot be loaded"),
    ],
)
def test_broken_artifacts_raise_artifact_error(broken_artifacts, name, message):
    with pytest.raises(ArtifactError, match=message) as caught:
        Pipeline.load(broken_artifacts[name])
    assert str(broken_artifacts[name]) in str(caught.value)


def test_trt_without_engines_raises_engine_error(tiny_artifacts):
    with pytest.raises(EngineError, match="llava-export engine"):
        Pipeline.load(tiny_artifacts, backend="trt")
