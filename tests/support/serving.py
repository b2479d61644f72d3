"""llava-serve inside pytest: the real app on a real loopback socket, in a thread.

    with live_server(pipe, max_batch=4) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")

Each server gets its own Engine over the given Pipeline, stopped (its requests finished or
failed) when the block ends; the Pipeline stays open for the next server.
"""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from dataclasses import dataclass

from PIL import Image


@dataclass
class LiveServer:
    url: str
    app: object
    engine: object
    model: str


@contextlib.contextmanager
def live_server(pipe, model: str = "toy", engine_options: dict | None = None, **settings):
    """A running server for `pipe`; `engine_options` go to Engine, `settings` to Settings."""
    import uvicorn

    from runtime.serve.app import Settings, create_app
    from runtime.serve.engine import Engine

    engine = Engine(pipe, **(engine_options or {}))
    app = create_app(engine, Settings(model_name=model, **settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("llava-serve did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", app, engine, model)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    """An image as the data: URL an OpenAI client sends."""
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def image_message(question: str, url: str) -> list[dict]:
    """One user turn: the image first, then the question (LLaVA's "<image>\\nquestion")."""
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]
