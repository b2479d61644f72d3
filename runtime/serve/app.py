"""The HTTP side of llava-serve: a FastAPI app over one `Engine` (docs/serving.md).

    app = create_app(engine, Settings(model_name="toy-llava"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every request is checked here, before anything is queued: its body (size, JSON, fields), its
API key, its model name, its messages and the prompt they make, the context it needs and its
images. Errors go out in OpenAI's shape with their HTTP status. The app starts its engine
when it starts (lifespan) and stops it, finishing or failing what runs, when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from runtime import prompts
from runtime.errors import EngineError, ImageError, LlavaError, PromptError
from runtime.serve import protocol
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
    Stream,
)
from runtime.serve.media import MediaPolicy, load_image_url
from runtime.serve.metrics import Metrics
from runtime.serve.protocol import ApiError, ChatRequest


@dataclass(frozen=True)
class Settings:
    model_name: str
    api_key: str | None = None  # None: no key asked for
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_images: int = 1  # per request; LLaVA-1.5 was trained with one image per conversation
    max_body_bytes: int = 32 * 2**20
    retry_after_s: int = 1  # what a 429 tells the client to wait
    shutdown_grace_s: float = 30.0  # running requests get this long to finish at shutdown


@contextlib.contextmanager
def running_in_thread(app: FastAPI, start_timeout_s: float = 60.0):
    """`app` served by uvicorn on a free loopback port, in a thread of this process (tests,
    llava-bench serve): yields its URL; stops it (the app's shutdown: its engine's) on leaving."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise EngineError("llava-serve did not start in this process (see the messages above)")
            time.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join(60)


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    metrics = Metrics()
    metrics.watch(engine)
    engine.observer = metrics

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if engine.thread is None:
            engine.start()
        yield
        await engine.stop(settings.shutdown_grace_s)

    app = FastAPI(title="llava-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)
    add_error_handlers(app)
    add_routes(app, engine, settings, metrics)
    return app


def add_routes(app: FastAPI, engine: Engine, settings: Settings, metrics: Metrics) -> None:
    pipe = engine.pipe
    check_key = api_key_check(settings.api_key)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("runtime.serve").joinpath("static/index.html").read_text()

    @app.get("/health")
    async def health():
        if not engine.healthy:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {
            "status": "ok",
            "backend": pipe.backend.name,
            "running": engine.batch_size,
            "waiting": engine.queue_length,
        }

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [model_card(settings.model_name, pipe.backend.limits.capacity)]}

    @app.get("/v1/models/{name}", dependencies=[Depends(check_key)])
    async def model(name: str):
        check_model(name, settings.model_name)
        return model_card(name, pipe.backend.limits.capacity)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatRequest, request: Request):
        job = await prepare_job(body, engine, settings)
        stream = await submit(engine, job, settings)
        ident = protocol.completion_id()
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            first = await first_event(stream)  # a late failure still gets its HTTP status
            return StreamingResponse(
                sse_events(stream, first, ident, body.model, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text, finish = await collect_unless_gone(stream, request)
        counts = protocol.usage(finish.prompt_tokens, finish.completion_tokens)
        return protocol.completion(ident, body.model, text, finish.reason, counts)


def model_card(name: str, context: int) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "llava-export",
        "max_model_len": context,
    }


def check_model(asked: str, served: str) -> None:
    if asked != served:
        raise ApiError(
            404,
            f"the model '{asked}' does not exist; this server serves '{served}'",
            "not_found_error",
            "model",
            "model_not_found",
        )


def api_key_check(api_key: str | None):
    """A dependency that wants `Authorization: Bearer <api_key>` (nothing when no key is set)."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )

    return check


async def prepare_job(body: ChatRequest, engine: Engine, settings: Settings) -> Job:
    """The request checked and made ready: 4xx here, before anything is queued or computed."""
    body.check_supported()
    check_model(body.model, settings.model_name)
    conversation = body.conversation()
    if len(conversation.image_urls) > settings.max_images:
        raise ApiError(
            400,
            f"{len(conversation.image_urls)} images in one request; this server takes at most {settings.max_images}",
            param="messages",
            code="too_many_images",
        )
    pipe = engine.pipe
    params = GenerationParams(
        max_tokens=body.budget(),
        temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stops(),
        ignore_eos=body.ignore_eos,
    )
    try:
        prompt = prompts.render_conversation(
            pipe.manifest.template, conversation.turns, conversation.system, pipe.chat_template
        )
        # tokenizing, the limits and the images are CPU work: off the event loop
        return await asyncio.to_thread(
            Job.prepare,
            pipe,
            prompt,
            conversation.image_urls,
            params,
            lambda url: load_image_url(url, settings.media),
        )
    except ContextTooLong as err:
        raise ApiError(400, str(err), param="messages", code="context_length_exceeded") from None
    except ImageError as err:
        raise ApiError(400, str(err), param="messages", code="invalid_image") from None
    except PromptError as err:
        raise ApiError(400, str(err), param="messages") from None


async def submit(engine: Engine, job: Job, settings: Settings) -> Stream:
    try:
        return await engine.submit(job)
    except QueueFull as err:
        raise ApiError(
            429,
            str(err),
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(settings.retry_after_s)},
        ) from None
    except EngineStopped as err:
        raise ApiError(503, str(err), "server_error", code="shutting_down") from None


def api_error(err: Exception) -> ApiError:
    """A scheduler-side failure as the HTTP error it answers."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, RequestTimeout):
        return ApiError(504, str(err), "timeout_error", code="timeout")
    if isinstance(err, EngineStopped):
        return ApiError(503, str(err), "server_error", code="shutting_down")
    if isinstance(err, ImageError):
        return ApiError(400, str(err), param="messages", code="invalid_image")
    if isinstance(err, PromptError):
        return ApiError(400, str(err), param="messages")
    if isinstance(err, LlavaError):
        return ApiError(500, str(err), "server_error")
    return ApiError(500, f"internal error: {err}", "server_error")


async def first_event(stream: Stream) -> Delta | Finish:
    try:
        return await anext(stream)
    except LlavaError as err:
        raise api_error(err) from None


async def sse_events(stream: Stream, first: Delta | Finish, ident: str, model: str, include_usage: bool):
    """Server-sent events: the role, content deltas, the finish, the usage if asked, [DONE].
    A failure mid-stream is one `data: {"error": ...}` event. Leaving (the client went away,
    Starlette cancels this generator) frees the row at the next step."""
    try:
        yield sse(protocol.chunk(ident, model, {"role": "assistant", "content": ""}))
        event = first
        while True:
            if isinstance(event, Delta):
                yield sse(protocol.chunk(ident, model, {"content": event.text}))
            else:
                yield sse(protocol.chunk(ident, model, {}, event.reason))
                if include_usage:
                    counts = protocol.usage(event.prompt_tokens, event.completion_tokens)
                    yield sse(protocol.usage_chunk(ident, model, counts))
                break
            event = await anext(stream)
    except LlavaError as err:
        yield sse(api_error(err).body())
    finally:
        stream.cancel()  # nothing once the row has finished
    yield "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def collect_unless_gone(stream: Stream, request: Request) -> tuple[str, Finish]:
    """The whole answer; a client that disconnects first frees its row (no answer is sent)."""
    task = asyncio.ensure_future(stream.collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                stream.cancel()
                raise ApiError(499, "the client closed the connection", "client_closed")
    except LlavaError as err:
        raise api_error(err) from None
    finally:
        task.cancel()


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api(_request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, err: RequestValidationError):
        return JSONResponse(validation_error(err.errors()).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http(_request, err: HTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            ApiError(err.status_code, str(err.detail), kind).body(), status_code=err.status_code
        )

    @app.exception_handler(Exception)
    async def unexpected(_request, err: Exception):
        return JSONResponse(api_error(err).body(), status_code=500)


def validation_error(errors: list[dict]) -> ApiError:
    """Pydantic's first complaint as one line: "messages: Field required"."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    return ApiError(400, f"{param or 'body'}: {first['msg']}", param=param)


class CountRequests:
    """ASGI middleware: llava_requests{route, status} for every HTTP request."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_counting(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            # the matched route's template (the router records it in the scope): a bounded label set
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(route, str(status["code"])).inc()


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 before the app sees any of it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_large(send)
        messages, size = [], 0
        while True:  # the whole body, up to the limit, replayed to the app
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self.too_large(send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def too_large(self, send) -> None:
        limit = f"{self.max_bytes / 2**20:g} MiB"
        body = ApiError(
            413, f"the request body is over {limit}: send smaller images", code="body_too_large"
        ).body()
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
