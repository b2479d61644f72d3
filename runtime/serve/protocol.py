"""The OpenAI chat completions request and response, as vLLM and llama.cpp's server take them.

`ChatRequest` parses a body (pydantic); `ChatRequest.conversation()` turns its messages into
the runtime's turns, with `<image>` where each image part stands and the image URLs in order.
What the server does not do (n > 1, tools, logprobs, ...) is refused by name with a 400
(`ApiError`), never ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.errors import LlavaError
from runtime.prompts import IMAGE_PLACEHOLDER, Turn


class ApiError(LlavaError):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None  # accepted and ignored: the model sees one resolution


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


# Request fields the server does not implement, and the value each may take: present with
# any other value, the request is refused with a 400 naming the field.
UNSUPPORTED = {
    "n": 1,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "logprobs": False,
    "top_logprobs": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "audio": None,
    "prediction": None,
}


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unsupported fields land in model_extra

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says

    def check_supported(self) -> None:
        for name, allowed in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name, allowed)
            if value is not None and value != allowed:
                raise ApiError(400, f"'{name}' is not supported by llava-serve: leave it out", param=name)
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ApiError(400, "only response_format {'type': 'text'} is supported", param="response_format")

    def budget(self) -> int | None:
        """max_completion_tokens, or max_tokens (older clients); None: what the context leaves."""
        value = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        if value is not None and value <= 0:
            raise ApiError(400, f"'{param}' must be at least 1, not {value}", param=param)
        return value

    def stops(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > 4:
            raise ApiError(400, f"at most 4 stop strings, not {len(stops)}", param="stop")
        return tuple(stop for stop in stops if stop)

    def conversation(self) -> Conversation:
        """The turns (system messages first, joined), with the image URLs in order."""
        system: list[str] = []
        turns: list[Turn] = []
        urls: list[str] = []
        for index, message in enumerate(self.messages):
            param = f"messages[{index}]"
            text = message_text(message, param, urls)
            if message.role in ("system", "developer"):
                if turns:
                    raise ApiError(
                        400, f"{param}: a {message.role} message must come before the others", param=param
                    )
                system.append(text)
            else:
                turns.append(Turn(message.role, text))
        return Conversation(turns, "\n".join(system) if system else None, urls)


@dataclass
class Conversation:
    turns: list[Turn]
    system: str | None  # None: the template's own system prompt
    image_urls: list[str]


def message_text(message: Message, param: str, urls: list[str]) -> str:
    """The message as text, `<image>` where each image part stands (parts joined by newlines,
    so [image, text] is LLaVA's own "<image>\\nquestion"); appends its image URLs to `urls`."""
    if message.content is None or message.content == "" or message.content == []:
        raise ApiError(400, f"{param}: the {message.role} message has no content", param=param)
    parts = (
        [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
    )
    pieces = []
    for part in parts:
        if isinstance(part, ImagePart):
            if message.role != "user":
                raise ApiError(400, f"{param}: only user messages may hold images", param=param)
            urls.append(part.image_url.url)
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            if IMAGE_PLACEHOLDER in part.text:
                raise ApiError(
                    400,
                    f"{param}: the text holds a literal {IMAGE_PLACEHOLDER}: send images as image_url parts",
                    param=param,
                )
            pieces.append(part.text)
    return "\n".join(pieces)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(ident: str, model: str, text: str, finish_reason: str, counts: dict[str, int]) -> dict:
    """The whole answer: a `chat.completion` object."""
    return {
        "id": ident,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": counts,
    }


def chunk(ident: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    """One `chat.completion.chunk` of a stream."""
    return {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk(ident: str, model: str, counts: dict[str, int]) -> dict:
    """The last chunk when stream_options.include_usage: no choices, the usage."""
    return {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": counts,
    }
