"""runtime.serve.media: each form of image_url, each refusal and its message, and the policy's gates.

Remote URLs are served by a local ThreadingHTTPServer on 127.0.0.1, so nothing leaves the machine.
"""

import base64
import http.server
import io
import pathlib
import socket
import subprocess
import sys
import threading
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from runtime.errors import ImageError
from runtime.serve.media import MediaPolicy, load_image_url
from tests.support.fixtures import bomb_png


def png_bytes(width: int, height: int, mode: str = "RGB") -> bytes:
    """A noise PNG (noise, so it does not compress to nothing and truncation cuts pixel data)."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


DEFAULTS = MediaPolicy()  # data URLs only


def refusal(url: str, policy: MediaPolicy = DEFAULTS) -> str:
    """The one-line message load_image_url raises for `url`."""
    with pytest.raises(ImageError) as info:
        load_image_url(url, policy)
    message = str(info.value)
    assert "\n" not in message
    return message


# data: URLs


def test_data_url_decodes_to_rgb():
    image = load_image_url(data_url(png_bytes(7, 5, "RGBA")), MediaPolicy())
    assert image.size == (7, 5) and image.mode == "RGB"


def test_data_url_message_names_size_not_payload():
    url = data_url(b"this is text, not a picture")
    payload = url.partition(",")[2]
    message = refusal(url)
    assert "not an image" in message
    assert f"data:image/png;base64,... ({len(payload)} bytes)" in message and payload not in message


@pytest.mark.parametrize(
    "data,words",
    [
        (b"", "empty"),
        (png_bytes(64, 64)[:2000], "truncated or corrupt"),
        (bomb_png(100_000, 100_000), "decompression bomb"),
    ],
    ids=["empty", "truncated", "bomb"],
)
def test_data_url_bad_image_bytes(data, words):
    assert words in refusal(data_url(data))


def test_text_data_url_is_refused():
    message = refusal("data:text/plain;base64," + base64.b64encode(b"hello").decode())
    assert "data URL is text/plain, not an image" in message


def test_data_url_without_media_type_is_text():
    assert "text/plain, not an image" in refusal("data:;base64,aGVsbG8=")


def test_data_url_must_be_base64():
    assert "not base64-encoded" in refusal("data:image/png,%89PNG")


def test_data_url_needs_a_comma():
    assert "no ','" in refusal("data:image/png;base64")


def test_bad_base64_is_refused():
    assert "not valid base64" in refusal("data:image/png;base64,iVBOR!!w0KGgo=")


def test_data_url_size_cap():
    data = png_bytes(16, 16)
    assert load_image_url(data_url(data), MediaPolicy(max_image_bytes=len(data))).size == (16, 16)
    message = refusal(data_url(data), MediaPolicy(max_image_bytes=len(data) - 1))
    assert f"{len(data)} bytes, over the {len(data) - 1} bytes limit" in message


# file:// URLs


@pytest.fixture
def media(tmp_path) -> dict:
    """An allowed folder holding one image, a secret image beside it (outside), and the policy
    that allows the folder."""
    allowed, outside = tmp_path / "media", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "cat photo.png").write_bytes(png_bytes(9, 4))
    (outside / "secret.png").write_bytes(png_bytes(3, 3))
    return {
        "allowed": allowed,
        "image": allowed / "cat photo.png",
        "secret": outside / "secret.png",
        "policy": MediaPolicy(allowed_local_path=allowed),
    }


def file_url(path: pathlib.Path, host: str = "") -> str:
    return f"file://{host}{quote(str(path))}"


def test_file_urls_are_off_by_default(media):
    assert "start llava-serve with --allowed-local-media-path DIR" in refusal(file_url(media["image"]))


@pytest.mark.parametrize("host", ["", "localhost"])
def test_file_url_inside_allowed_folder_loads(media, host):
    url = file_url(media["image"], host)
    assert "%20" in url  # the space is percent-encoded and must be decoded
    image = load_image_url(url, media["policy"])
    assert image.size == (9, 4) and image.mode == "RGB"


def test_allowed_folder_given_through_a_symlink(media, tmp_path):
    link = tmp_path / "media-link"
    link.symlink_to(media["allowed"], target_is_directory=True)
    image = load_image_url(file_url(link / "cat photo.png"), MediaPolicy(allowed_local_path=link))
    assert image.size == (9, 4)


def test_symlink_escaping_the_folder_is_refused(media):
    (media["allowed"] / "innocent.png").symlink_to(media["secret"])
    message = refusal(file_url(media["allowed"] / "innocent.png"), media["policy"])
    assert f"outside the allowed media folder {media['allowed'].resolve()}" in message


def test_dot_dot_escape_is_refused(media):
    url = "file://" + quote(f"{media['allowed']}/../outside/secret.png")
    message = refusal(url, media["policy"])
    assert "outside the allowed media folder" in message


def test_sibling_folder_sharing_the_prefix_is_outside(media, tmp_path):
    sibling = tmp_path / "media-private"  # its path starts with the allowed folder's
    sibling.mkdir()
    (sibling / "x.png").write_bytes(png_bytes(2, 2))
    message = refusal(file_url(sibling / "x.png"), media["policy"])
    assert "outside the allowed media folder" in message


def test_missing_file_inside_the_folder(media):
    message = refusal(file_url(media["allowed"] / "gone.png"), media["policy"])
    assert "gone.png: no such image file" in message


def test_missing_file_outside_says_outside(media):
    # the same answer as for an existing file: a client cannot probe what exists out there
    message = refusal(file_url(media["secret"].with_name("nope.png")), media["policy"])
    assert "outside the allowed media folder" in message


def test_file_url_with_a_remote_host_is_refused(media):
    message = refusal("file://fileserver/share/a.png", media["policy"])
    assert "file:///<absolute path>" in message


# http:// and https:// URLs


class ImageHandler(http.server.BaseHTTPRequestHandler):
    """Serves the cases by path: a PNG, a 404, a 204, a body over 1 MiB, and a slow answer."""

    release = threading.Event()  # set at teardown, so the slow handler stops waiting

    def do_GET(self):
        if self.path == "/slow.png":
            self.release.wait(10)
        if self.path == "/missing.png":
            self.send_error(404, "Not Found")
            return
        if self.path in ("/to-ftp", "/to-self"):
            target = "ftp://127.0.0.1/image.png" if self.path == "/to-ftp" else "/image.png"
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()
            return
        if self.path == "/no-content":
            self.send_response(204)
            self.end_headers()
            return
        body = b"\0" * (2**20 + 10) if self.path == "/huge.png" else png_bytes(11, 6)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        """Quiet: the tests read the client's side."""


@pytest.fixture(scope="module")
def server_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    ImageHandler.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def remote(server_url, monkeypatch) -> str:
    """The local server's URL, reached directly even where a proxy is set in the environment."""
    monkeypatch.setenv("no_proxy", "*")
    return server_url


REMOTE = MediaPolicy(allow_remote=True, remote_timeout_s=5.0)


def test_remote_urls_are_off_by_default(remote):
    message = refusal(f"{remote}/image.png")
    assert "remote image URLs are off: start llava-serve with --allow-remote-images" in message


def test_remote_png_loads(remote):
    image = load_image_url(f"{remote}/image.png", REMOTE)
    assert image.size == (11, 6) and image.mode == "RGB"


def test_remote_404_names_url_and_status(remote):
    message = refusal(f"{remote}/missing.png", REMOTE)
    assert f"{remote}/missing.png" in message and "HTTP 404" in message


def test_remote_redirects_stay_on_the_web(remote):
    assert load_image_url(f"{remote}/to-self", REMOTE).size == (11, 6)
    message = refusal(f"{remote}/to-ftp", REMOTE)
    assert "to-ftp" in message and "redirect to ftp://127.0.0.1/image.png refused" in message


def test_remote_status_other_than_200(remote):
    assert "HTTP 204, not 200" in refusal(f"{remote}/no-content", REMOTE)


def test_remote_body_over_the_cap(remote):
    message = refusal(f"{remote}/huge.png", MediaPolicy(allow_remote=True, max_image_bytes=2**20))
    assert "image at URL is over 1 MiB" in message


def test_remote_timeout(remote):
    message = refusal(f"{remote}/slow.png", MediaPolicy(allow_remote=True, remote_timeout_s=0.2))
    assert "slow.png" in message and "timed out after 0.2 s" in message


def test_remote_connection_refused():
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    message = refusal(f"http://127.0.0.1:{port}/a.png", REMOTE)
    assert f"127.0.0.1:{port}/a.png: could not fetch the image" in message and "refused" in message


def test_long_urls_are_shortened():
    message = refusal("https://example.com/" + "a" * 500 + ".png")
    assert "https://example.com/aaa" in message and "a" * 100 not in message and "..." in message


# everything else


@pytest.mark.parametrize("url", ["", "ftp://example.com/a.png", "/srv/images/a.png", "C:\\images\\a.png"])
def test_other_forms_list_the_accepted_ones(url):
    message = refusal(url)
    for form in ("data:image/<type>;base64,<payload>", "file:///<absolute path>", "http(s)://"):
        assert form in message


def test_media_does_not_import_torch():
    code = (
        "import sys, runtime.serve.media\n"
        "bad = sorted(m for m in ('torch', 'transformers', 'requests', 'httpx') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])
