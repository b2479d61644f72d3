"""llava-serve over HTTP, talked to with the official `openai` client (and plain HTTP for the
errors): the same answers as llava-run alone under concurrency, streaming, multi-turn, the
OpenAI error shape for every bad input, back-pressure, auth, metrics."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import openai
import pytest
from PIL import Image

from exporter.toy.evaluate import held_out_questions
from runtime import prompts
from runtime.serve.media import MediaPolicy
from tests.support.fixtures import bomb_png
from tests.support.serving import data_url, image_message, live_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(toy_pipe):
    with live_server(toy_pipe, engine_options={"max_batch": 8, "max_queue": 64}) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def question():
    return held_out_questions(1)[0]


def post(server, body, **kwargs) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30, **kwargs)


def ask(server, content, **fields) -> dict:
    return {"model": server.model, "messages": [{"role": "user", "content": content}], **fields}


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# -- answers --------------------------------------------------------------------------------


def test_64_requests_from_16_clients_answer_as_each_alone(server, toy_pipe):
    questions = held_out_questions(16)[:64]
    alone = [toy_pipe.generate(q.question, [q.image], 32).text for q in questions]
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    async def one(q, stream: bool) -> str:
        messages = image_message(q.question, data_url(q.image))
        if not stream:
            reply = await client.chat.completions.create(
                model=server.model, messages=messages, temperature=0, max_tokens=32
            )
            return reply.choices[0].message.content
        chunks = await client.chat.completions.create(
            model=server.model, messages=messages, temperature=0, max_tokens=32, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    async def clients():
        queue = list(enumerate(questions))
        answers = [None] * len(questions)

        async def worker():
            while queue:
                index, q = queue.pop(0)
                answers[index] = await one(q, stream=index % 2 == 0)

        await asyncio.gather(*(worker() for _ in range(16)))
        await client.close()
        return answers

    steps_before = server.engine.steps
    answers = asyncio.run(clients())
    assert answers == alone
    tokens = sum(len(toy_pipe.tokenizer.encode(a, add_special_tokens=False).ids) for a in alone)
    assert server.engine.steps - steps_before < tokens  # requests shared decode steps


def test_a_streamed_answer_with_usage_joins_to_the_whole_answer(server, client, question):
    messages = image_message(question.question, data_url(question.image))
    whole = client.chat.completions.create(model=server.model, messages=messages, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=messages,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_the_stream_is_server_sent_events_ending_with_done(server, question):
    body = ask(server, "how many shapes?", stream=True, max_tokens=3, temperature=0)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: ") :])
    assert last["object"] == "chat.completion.chunk" and last["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )


def test_usage_counts_the_image_tokens_and_the_finish_reason_says_length(server, client, question, toy_pipe):
    messages = image_message(question.question, data_url(question.image))
    reply = client.chat.completions.create(model=server.model, messages=messages, temperature=0, max_tokens=2)
    prompt = prompts.render_prompt(toy_pipe.manifest.template, question.question, 1)
    chunks = prompts.tokenize_prompt(toy_pipe.tokenizer, prompt, toy_pipe.manifest.tokens.bos)
    assert reply.usage.prompt_tokens == prompts.count_prompt_tokens(
        chunks, toy_pipe.manifest.vision.num_image_tokens
    )
    assert (reply.choices[0].finish_reason, reply.usage.completion_tokens) == ("length", 2)


def test_a_conversation_goes_on_with_its_history(server, client, question, toy_pipe):
    first = image_message(question.question, data_url(question.image))
    answer = client.chat.completions.create(model=server.model, messages=first, temperature=0)
    follow_up = [
        *first,
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "how many shapes?"},
    ]
    second = client.chat.completions.create(model=server.model, messages=follow_up, temperature=0)
    turns = [
        prompts.Turn("user", "<image>\n" + question.question),
        prompts.Turn("assistant", answer.choices[0].message.content),
        prompts.Turn("user", "how many shapes?"),
    ]
    prompt = prompts.render_conversation(toy_pipe.manifest.template, turns, None, toy_pipe.chat_template)
    chunks = prompts.tokenize_prompt(toy_pipe.tokenizer, prompt, toy_pipe.manifest.tokens.bos)
    assert second.usage.prompt_tokens == prompts.count_prompt_tokens(
        chunks, toy_pipe.manifest.vision.num_image_tokens
    )
    assert second.choices[0].message.content


def test_a_system_message_replaces_the_templates(server, client):
    plain = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    brief = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        max_tokens=1,
    )
    assert brief.usage.prompt_tokens < plain.usage.prompt_tokens  # vicuna's long system prompt is gone


def test_stop_strings_end_the_answer(server, client, question):
    messages = image_message(question.question, data_url(question.image))
    whole = client.chat.completions.create(model=server.model, messages=messages, temperature=0)
    text = whole.choices[0].message.content
    word = text.split()[1]
    cut = client.chat.completions.create(model=server.model, messages=messages, temperature=0, stop=[word])
    assert cut.choices[0].message.content == text[: text.index(word)]
    assert cut.choices[0].finish_reason == "stop"


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list()] == [server.model]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["backend"].startswith("ort")
    client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    post(server, {"model": server.model})
    text = httpx.get(server.url + "/metrics").text
    assert 'llava_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'llava_requests_total{route="/v1/chat/completions",status="400"}' in text
    for name in (
        "llava_num_requests_waiting",
        "llava_num_requests_running",
        "llava_prompt_tokens_total",
        "llava_generation_tokens_total",
        "llava_time_to_first_token_seconds_bucket",
        "llava_inter_token_latency_seconds_bucket",
        "llava_decode_step_rows_bucket",
    ):
        assert name in text


# -- bad input: the right status, OpenAI's error shape, the server goes on -------------------


def png_bytes(size=(24, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_content(url: str, text: str = "what is it?") -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


@pytest.mark.parametrize(
    ("body", "status", "words", "code"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", None),
        ({"model": "toy"}, 400, "messages", None),
        ({"model": "toy", "messages": []}, 400, "at least 1", None),
        ({"model": "toy", "messages": [{"role": "user", "content": ""}]}, 400, "no content", None),
        ({"model": "toy", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", None),
        ({"model": "toy", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "user", None),
        (
            {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "gpt-9",
            "model_not_found",
        ),
        (
            {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
            400,
            "at least 1",
            None,
        ),
        ({"model": "toy", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "'n'", None),
        (
            {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "tools": [{}]},
            400,
            "'tools'",
            None,
        ),
        (
            {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "logprobs": True},
            400,
            "'logprobs'",
            None,
        ),
        (
            {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "temperature": 5},
            400,
            "temperature",
            None,
        ),
        (
            {"model": "toy", "messages": [{"role": "user", "content": "<image> hi"}]},
            400,
            "image_url parts",
            None,
        ),
    ],
)
def test_bad_requests_get_a_4xx_in_openai_shape(server, body, status, words, code):
    error = error_of(post(server, body), status)
    assert words in error["message"]
    assert error["code"] == code


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("data:image/png;base64,@@@not base64@@@", "base64"),
        ("data:text/plain;base64," + b64(b"hello"), "not an image"),
        ("data:image/png;base64," + b64(png_bytes()[:60]), "truncated"),
        ("data:image/png;base64," + b64(bomb_png(20_000, 20_000)), "decompression bomb"),
        ("file:///etc/passwd", "--allowed-local-media-path"),
        ("http://127.0.0.1:1/cat.png", "--allow-remote-images"),
    ],
)
def test_bad_images_get_a_400_naming_the_problem(server, url, words):
    error = error_of(post(server, ask(server, image_content(url))), 400)
    assert words in error["message"] and error["code"] == "invalid_image"


def test_malformed_json_is_a_400(server):
    response = httpx.post(
        server.url + "/v1/chat/completions",
        content=b'{"model": "toy", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert "not valid JSON" in error_of(response, 400)["message"]


def test_more_images_than_the_server_takes_is_a_400(server):
    url = "data:image/png;base64," + b64(png_bytes())
    content = [*image_content(url), {"type": "image_url", "image_url": {"url": url}}]
    assert error_of(post(server, ask(server, content)), 400)["code"] == "too_many_images"


def test_a_prompt_past_the_context_is_refused_before_any_compute(server, toy_pipe):
    steps = server.engine.steps
    long_text = "red circle " * toy_pipe.manifest.text.max_positions
    error = error_of(post(server, ask(server, long_text)), 400)
    assert error["code"] == "context_length_exceeded" and "shorten it" in error["message"]
    error = error_of(post(server, ask(server, "hi", max_tokens=toy_pipe.manifest.text.max_positions)), 400)
    assert error["code"] == "context_length_exceeded" and "ask for at most" in error["message"]
    assert server.engine.steps == steps


def test_unknown_routes_answer_in_openai_shape(server):
    assert error_of(httpx.get(server.url + "/v1/nothing"), 404)["type"] == "not_found_error"


def test_the_server_keeps_serving_after_bad_requests(server, client):
    post(server, {"model": "toy", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    reply = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.usage.completion_tokens >= 1


# -- servers with other settings ------------------------------------------------------------


def test_the_api_key_is_required_when_set(toy_pipe):
    with live_server(toy_pipe, api_key="s3cret") as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            error = error_of(post(server, ask(server, "hi", max_tokens=1), headers=headers), 401)
            assert error["code"] == "invalid_api_key" and "Bearer" in error["message"]
        assert httpx.get(server.url + "/v1/models").status_code == 401
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        assert httpx.get(server.url + "/health").status_code == 200  # health stays open for load balancers


def test_an_oversize_body_is_a_413(toy_pipe):
    with live_server(toy_pipe, max_body_bytes=4096) as server:
        url = "data:image/png;base64," + b64(png_bytes((256, 256)) + bytes(8000))
        error = error_of(post(server, ask(server, image_content(url))), 413)
        assert "over" in error["message"] and error["code"] == "body_too_large"
        assert post(server, ask(server, "hi", max_tokens=1)).status_code == 200


def test_file_urls_inside_the_allowed_folder_load(toy_pipe, tmp_path, question):
    media = tmp_path / "media"
    media.mkdir()
    question.image.save(media / "shapes.png")
    (tmp_path / "secret.png").write_bytes(png_bytes())
    with live_server(toy_pipe, media=MediaPolicy(media.resolve())) as server:
        reply = post(
            server,
            ask(server, image_content(f"file://{media / 'shapes.png'}", question.question), temperature=0),
        )
        assert reply.status_code == 200
        assert (
            reply.json()["choices"][0]["message"]["content"]
            == toy_pipe.generate(question.question, [question.image]).text
        )
        escape = f"file://{media}/../secret.png"
        assert "outside" in error_of(post(server, ask(server, image_content(escape))), 400)["message"]


def test_a_full_queue_answers_429_with_retry_after(toy_pipe):
    long = {"max_tokens": 400, "ignore_eos": True}
    with live_server(toy_pipe, engine_options={"max_batch": 1, "max_queue": 1}) as server:

        async def flood():
            async with httpx.AsyncClient(timeout=60) as http:
                running = asyncio.ensure_future(
                    http.post(server.url + "/v1/chat/completions", json=ask(server, "one", **long))
                )
                while server.engine.batch_size == 0:
                    await asyncio.sleep(0.01)
                waiting = asyncio.ensure_future(
                    http.post(server.url + "/v1/chat/completions", json=ask(server, "two", **long))
                )
                while server.engine.queue_length == 0:
                    await asyncio.sleep(0.01)
                refused = await http.post(
                    server.url + "/v1/chat/completions", json=ask(server, "three", **long)
                )
                return refused, await running, await waiting

        refused, running, waiting = asyncio.run(flood())
    assert error_of(refused, 429)["code"] == "queue_full"
    assert refused.headers["retry-after"] == "1"
    assert running.status_code == waiting.status_code == 200


def test_a_client_that_leaves_mid_stream_frees_its_row(toy_pipe):
    with live_server(toy_pipe) as server:
        body = ask(server, "one", stream=True, max_tokens=400, ignore_eos=True)
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            next(lines), next(lines)  # the role chunk, then a first delta
            assert server.engine.batch_size == 1
        steps = server.engine.steps
        deadline = time.monotonic() + 10
        while server.engine.batch_size and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.engine.batch_size == 0
        assert server.engine.steps - steps < 400 - 10  # freed long before its 400 tokens
