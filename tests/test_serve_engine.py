"""The continuous-batching scheduler without HTTP: answers equal to a request alone whatever
else runs, per-request settings, and the faults (a full queue, a failing request, a failing
step, a client that leaves, a deadline, shutdown)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from exporter.toy.evaluate import held_out_questions
from runtime import prompts
from runtime.errors import EngineError
from runtime.pipeline import Pipeline
from runtime.serve.engine import (
    ContextTooLong,
    Delta,
    Engine,
    EngineStopped,
    Finish,
    GenerationParams,
    Job,
    QueueFull,
    RequestTimeout,
    StopStrings,
)

SHORT = GenerationParams(max_tokens=24)
LONG = GenerationParams(max_tokens=None, ignore_eos=True)  # all the context leaves: a row that stays a while


@pytest.fixture(scope="module")
def tiny_pipe(tiny_artifacts):
    with Pipeline.load(tiny_artifacts) as pipe:
        yield pipe


def job(pipe, question: str, images=(), params=SHORT) -> Job:
    prompt = prompts.render_prompt(pipe.manifest.template, question, len(images))
    return Job.prepare(pipe, prompt, list(images), params)


def run_with_engine(pipe, scenario, **options):
    """Runs `await scenario(engine)` on a started engine, stopped afterwards."""

    async def main():
        engine = Engine(pipe, **options)
        engine.start()
        try:
            return await scenario(engine)
        finally:
            await engine.stop(grace_s=5)

    return asyncio.run(main())


async def wait_for(condition, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition did not come true in time")


def test_answers_equal_each_request_alone_while_rows_join_and_leave(toy_pipe):
    questions = held_out_questions(6)[:30]
    alone = [toy_pipe.generate(q.question, [q.image], 24).text for q in questions]

    async def scenario(engine):
        async def ask(index, q):
            await asyncio.sleep(0.003 * index)  # arrivals spread over the steps
            return await (await engine.submit(job(toy_pipe, q.question, [q.image]))).collect()

        return await asyncio.gather(*(ask(i, q) for i, q in enumerate(questions))), engine.steps

    answers, steps = run_with_engine(toy_pipe, scenario, max_batch=6)
    assert [text for text, _ in answers] == alone
    generated = sum(finish.completion_tokens for _, finish in answers)
    assert steps < generated - len(questions)  # rows shared decode steps: this was batched
    assert all(finish.prompt_tokens > toy_pipe.manifest.vision.num_image_tokens for _, finish in answers)


def test_a_seeded_sample_does_not_depend_on_the_batch(toy_pipe):
    q = held_out_questions(1)[0]
    sampled = GenerationParams(max_tokens=16, temperature=1.5, seed=7)

    async def scenario(engine):
        alone = await (await engine.submit(job(toy_pipe, q.question, [q.image], sampled))).collect()
        others = [await engine.submit(job(toy_pipe, "how many shapes?", [q.image], LONG)) for _ in range(3)]
        await wait_for(lambda: engine.batch_size == 3)
        together = await (await engine.submit(job(toy_pipe, q.question, [q.image], sampled))).collect()
        for stream in others:
            stream.cancel()
        return alone, together

    alone, together = run_with_engine(toy_pipe, scenario, max_batch=4)
    assert alone == together


def test_stop_strings_cut_the_answer_and_finish_it(toy_pipe):
    q = held_out_questions(1)[0]
    full = toy_pipe.generate(q.question, [q.image], 24).text
    word = full.split()[2]
    cut = full[: full.index(word)]

    async def scenario(engine):
        stream = await engine.submit(job(toy_pipe, q.question, [q.image], GenerationParams(24, stop=(word,))))
        return [event async for event in stream]

    events = run_with_engine(toy_pipe, scenario)
    assert "".join(e.text for e in events if isinstance(e, Delta)) == cut
    assert events[-1].reason == "stop"


def test_the_token_budget_ends_with_length(tiny_pipe):
    async def scenario(engine):
        return await (
            await engine.submit(job(tiny_pipe, "hello", (), GenerationParams(3, ignore_eos=True)))
        ).collect()

    _text, finish = run_with_engine(tiny_pipe, scenario)
    assert (finish.reason, finish.completion_tokens) == ("length", 3)


def test_stop_strings_hold_back_what_may_start_one():
    stops = StopStrings(["</s>", "END"])
    assert stops.feed("hello </") == ("hello ", False)
    assert stops.feed("b>EN") == ("</b>", False)
    assert stops.feed("D tail") == ("", True)
    assert StopStrings(["xyz"]).feed("abc") == ("abc", False)


def test_a_full_queue_refuses_at_once(toy_pipe):
    async def scenario(engine):
        running = await engine.submit(job(toy_pipe, "one", (), LONG))
        await wait_for(lambda: engine.batch_size == 1)
        waiting = await engine.submit(job(toy_pipe, "two", (), LONG))
        with pytest.raises(QueueFull, match="already waiting"):
            await engine.submit(job(toy_pipe, "three", (), LONG))
        waiting.cancel()  # a client that left frees its place in the queue
        replacement = await engine.submit(job(toy_pipe, "four", (), GenerationParams(2)))
        running.cancel()
        return await replacement.collect()

    _text, finish = run_with_engine(toy_pipe, scenario, max_batch=1, max_queue=1)
    assert finish.completion_tokens <= 2


def test_a_cancelled_stream_frees_its_row_at_the_next_step(toy_pipe):
    async def scenario(engine):
        stream = await engine.submit(job(toy_pipe, "one", (), LONG))
        first = await anext(stream)
        stream.cancel()
        await wait_for(lambda: engine.batch_size == 0)
        return first, engine.steps

    first, steps = run_with_engine(toy_pipe, scenario)
    assert isinstance(first, Delta | Finish) and steps < 400


def test_a_request_past_its_deadline_fails_and_frees_its_row(toy_pipe):
    async def scenario(engine):
        stream = await engine.submit(job(toy_pipe, "one", (), LONG), timeout_s=0.05)
        with pytest.raises(RequestTimeout, match="timeout"):
            await stream.collect()
        await wait_for(lambda: engine.batch_size == 0)

    run_with_engine(toy_pipe, scenario)


def test_a_failing_request_fails_alone(tiny_pipe, images):
    good = job(tiny_pipe, "describe", [images["a"]], GenerationParams(6))
    bad = job(tiny_pipe, "describe", [images["a"]], GenerationParams(6))
    bad.pixel_values = np.zeros((1, 3, 5, 5), np.float32)  # found late: the vision graph refuses it

    async def scenario(engine):
        streams = [await engine.submit(j) for j in (good, bad, good)]
        return await asyncio.gather(*(s.collect() for s in streams), return_exceptions=True)

    first, failed, last = run_with_engine(tiny_pipe, scenario)
    assert isinstance(failed, EngineError) and "the request failed" in str(failed)
    assert first == last and first[1].completion_tokens >= 1


def test_a_failing_step_fails_its_rows_and_the_engine_goes_on(toy_pipe, monkeypatch):
    decode = toy_pipe.backend.decode_impl
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:  # prefill, one decode step, then the failure
            raise RuntimeError("device lost")
        return decode(*args)

    monkeypatch.setattr(toy_pipe.backend, "decode_impl", flaky)

    async def scenario(engine):
        with pytest.raises(EngineError, match="device lost"):
            await (await engine.submit(job(toy_pipe, "one", (), LONG))).collect()
        return await (
            await engine.submit(job(toy_pipe, "two", (), GenerationParams(3, ignore_eos=True)))
        ).collect()

    _text, finish = run_with_engine(toy_pipe, scenario)
    assert finish.completion_tokens == 3


def test_a_backend_that_keeps_failing_makes_the_engine_unhealthy(tiny_pipe, monkeypatch):
    def broken(*args):
        raise RuntimeError("device lost")

    async def scenario(engine):
        assert engine.healthy
        monkeypatch.setattr(tiny_pipe.backend, "decode_impl", broken)
        for _ in range(3):
            with pytest.raises(EngineError, match="device lost"):
                await (await engine.submit(job(tiny_pipe, "one", (), GenerationParams(3)))).collect()
        return engine.healthy

    assert run_with_engine(tiny_pipe, scenario) is False


def test_shutdown_finishes_running_requests_then_refuses_new_ones(tiny_pipe):
    async def scenario(engine):
        stream = await engine.submit(job(tiny_pipe, "one", (), GenerationParams(20, ignore_eos=True)))
        stopping = asyncio.ensure_future(engine.stop(grace_s=30))
        _text, finish = await stream.collect()
        await stopping
        with pytest.raises(EngineStopped, match="shutting down"):
            await engine.submit(job(tiny_pipe, "two"))
        return finish

    assert run_with_engine(tiny_pipe, scenario).completion_tokens == 20


def test_shutdown_past_its_grace_fails_what_is_left(toy_pipe):
    async def scenario(engine):
        stream = await engine.submit(job(toy_pipe, "one", (), LONG))
        await wait_for(lambda: engine.batch_size == 1)
        await engine.stop(grace_s=0.05)
        with pytest.raises(EngineStopped, match="shut down before the request finished"):
            await stream.collect()
        return engine.steps

    assert run_with_engine(toy_pipe, scenario) < 400


def test_a_prompt_past_the_context_is_refused_before_it_is_queued(tiny_pipe):
    capacity = tiny_pipe.backend.limits.capacity
    with pytest.raises(ContextTooLong, match="new tokens"):
        job(tiny_pipe, "hi", (), GenerationParams(capacity))
    with pytest.raises(ContextTooLong, match="shorten it"):
        job(tiny_pipe, "word " * capacity, (), GenerationParams(None))
    default = job(tiny_pipe, "hi", (), GenerationParams(None))
    assert default.params.max_tokens == capacity - default.prompt_tokens + 1  # what the context leaves


def test_the_static_kv_layout_serves_the_same_answers(workshop, tmp_path_factory, images):
    """Regrouping rebuilds the static layout's fixed buffers (kv_capacity columns) per batch."""
    from exporter.graphs.decoder import export_decoder
    from exporter.graphs.vision import export_vision
    from exporter.progress import Progress
    from exporter.source import load_source
    from runtime import contract

    source = load_source(str(workshop.tiny()["hf"]))
    out = tmp_path_factory.mktemp("artifacts-static")
    export_vision(source, out, progress=Progress(quiet=True))
    export_decoder(source, out, progress=Progress(quiet=True), kv_cache=contract.KV_STATIC, max_seq_len=240)
    questions = ["describe", "what colour is it, exactly?", "how many?", "is it big or small at all?"]
    with Pipeline.load(out) as pipe:
        assert pipe.backend.limits.kv_capacity == 240
        alone = [pipe.generate(q, [images["a"]], 12).text for q in questions]

        async def scenario(engine):
            async def ask(index, question):
                await asyncio.sleep(0.002 * index)
                stream = await engine.submit(job(pipe, question, [images["a"]], GenerationParams(12)))
                return (await stream.collect())[0]

            return await asyncio.gather(*(ask(i, q) for i, q in enumerate(questions)))

        assert run_with_engine(pipe, scenario, max_batch=3) == alone
