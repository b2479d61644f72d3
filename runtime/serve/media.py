"""The image_url of a chat message -> an RGB PIL image, within what the operator allows.

A data URL carries its image inline, so it is always accepted. A file:// URL makes the server
read its own disk and an http(s) URL makes it fetch from the network on a client's behalf,
so each is off until llava-serve is started with the flag that opens it. Every refusal is an
ImageError whose one line names the image (by a short form of its URL) and what to fix.
Standard library and pillow only, so the server needs no HTTP client package.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from runtime.errors import ImageError
from runtime.preprocess import load_image, load_image_bytes

ACCEPTED_FORMS = (
    "data:image/<type>;base64,<payload>, "
    "file:///<absolute path> (with --allowed-local-media-path) "
    "or http(s)://... (with --allow-remote-images)"
)

# Longer URLs are cut to this many characters in messages: the start says which image it was.
_NAME_CHARS = 80


@dataclass(frozen=True)
class MediaPolicy:
    """Which image URLs the server loads; the defaults accept data URLs only."""

    allowed_local_path: Path | None = None  # file:// URLs must resolve inside this folder
    allow_remote: bool = False  # http:// and https:// URLs
    remote_timeout_s: float = 10.0  # per connect and per read, as urllib applies it
    max_image_bytes: int = 20 * 2**20  # a data URL's decoded payload, a download's body


def load_image_url(url: str, policy: MediaPolicy) -> Image.Image:
    """Loads the image an OpenAI image_url names, with load_image's checks; raises ImageError."""
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    if scheme == "data":
        return _load_data_url(url, policy)
    if scheme == "file":
        return _load_file_url(url, policy)
    if scheme in ("http", "https"):
        return _load_remote_url(url, policy)
    what = "image URL is empty" if not url else f"{short_name(url)}: not an accepted image URL"
    raise ImageError(f"{what}; use {ACCEPTED_FORMS}")


def short_name(url: str) -> str:
    """How messages call the image: a data URL by its header and payload size (never the
    payload itself), any other URL cut to a readable length."""
    if url[:5].lower() == "data:":
        header, _, payload = url.partition(",")
        return f"{_cut(header)},... ({len(payload)} bytes)"
    return _cut(url)


def _cut(text: str) -> str:
    return text if len(text) <= _NAME_CHARS else text[: _NAME_CHARS - 3] + "..."


def _load_data_url(url: str, policy: MediaPolicy) -> Image.Image:
    """data:[<media type>][;base64],<payload> (RFC 2397), accepted only as a base64 image."""
    name = short_name(url)
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise ImageError(f"{name}: data URL has no ',' before its payload; use {ACCEPTED_FORMS}")
    media_type, *parameters = (part.strip().lower() for part in header.split(";"))
    media_type = media_type or "text/plain"  # RFC 2397's default
    if not media_type.startswith("image/"):
        raise ImageError(f"{name}: data URL is {media_type}, not an image; send data:image/<type>;base64,...")
    if "base64" not in parameters:
        raise ImageError(f"{name}: data URL is not base64-encoded; send data:{media_type};base64,<payload>")
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as err:
        raise ImageError(f"{name}: data URL payload is not valid base64 ({err})") from None
    if len(data) > policy.max_image_bytes:
        raise ImageError(
            f"{name}: image is {len(data)} bytes, over the {_size(policy.max_image_bytes)} limit"
        )
    return load_image_bytes(data, name)


def _load_file_url(url: str, policy: MediaPolicy) -> Image.Image:
    """file:///abs/path, read only when it resolves inside the allowed folder."""
    name = short_name(url)
    if policy.allowed_local_path is None:
        raise ImageError(
            f"{name}: file:// URLs are off: start llava-serve with --allowed-local-media-path DIR"
        )
    parts = urllib.parse.urlsplit(url)
    path = urllib.parse.unquote(parts.path)
    if parts.netloc not in ("", "localhost") or not path.startswith("/"):
        raise ImageError(f"{name}: a file URL must be file:///<absolute path> (no host but localhost)")
    allowed = policy.allowed_local_path.resolve()
    try:
        # Not strict: a missing file inside the folder then gets load_image's "no such image
        # file", and the answer for a path outside does not tell whether that path exists.
        resolved = Path(path).resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop, before Python 3.13
        raise ImageError(f"{name}: cannot resolve the file path ({err})") from None
    if not resolved.is_relative_to(allowed):
        raise ImageError(f"{name}: outside the allowed media folder {allowed} (symlinks and '..' followed)")
    return load_image(resolved)


class _WebOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) URLs only: urllib's own handler follows ftp:// too."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to {_cut(newurl)} refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_FETCH = urllib.request.build_opener(_WebOnlyRedirects)


def _load_remote_url(url: str, policy: MediaPolicy) -> Image.Image:
    """http(s)://..., fetched with the policy's timeout and never read past its size limit."""
    name = short_name(url)
    if not policy.allow_remote:
        raise ImageError(f"{name}: remote image URLs are off: start llava-serve with --allow-remote-images")
    limit = policy.max_image_bytes
    try:
        with _FETCH.open(url, timeout=policy.remote_timeout_s) as response:
            if response.status != 200:
                raise ImageError(f"{name}: fetching the image gave HTTP {response.status}, not 200")
            data = response.read(limit + 1)  # one byte more than allowed tells "too large"
    except (OSError, http.client.HTTPException, ValueError) as err:
        # OSError covers urllib's URLError and HTTPError and socket timeouts; ValueError a bad URL
        raise ImageError(f"{name}: could not fetch the image ({_fetch_failure(err, policy)})") from None
    if len(data) > limit:
        raise ImageError(f"{name}: image at URL is over {_size(limit)}")
    return load_image_bytes(data, name)


def _fetch_failure(err: Exception, policy: MediaPolicy) -> str:
    """The reason a fetch failed, in a few words: the HTTP status, a timeout, or urllib's reason."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, TimeoutError):
        return f"timed out after {policy.remote_timeout_s:g} s"
    return str(reason) or type(reason).__name__


def _size(n_bytes: int) -> str:
    """A size limit as people set it: whole MiB, or bytes when under one."""
    return f"{n_bytes / 2**20:g} MiB" if n_bytes >= 2**20 else f"{n_bytes} bytes"
