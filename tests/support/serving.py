"""llava-serve inside pytest: the real app on a real loopback socket, in a thread.

    with live_server(pipe, engine_options={"max_batch": 4}) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")

Each server gets its own Engine over the given Pipeline, stopped (its requests finished or
failed) when the block ends; the Pipeline stays open for the next server.
"""

from __future__ import annotations

import base64
import contextlib
import io
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
    from runtime.serve.app import Settings, create_app, running_in_thread
    from runtime.serve.engine import Engine

    engine = Engine(pipe, **(engine_options or {}))
    app = create_app(engine, Settings(model_name=model, **settings))
    with running_in_thread(app, start_timeout_s=30) as url:
        yield LiveServer(url, app, engine, model)


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
