"""Fixtures shared by the runtime tests and the generation parity tests.

The tiny random LLaVA (exporter.tiny, default TinyConfig: llama, 2 layers, 32x32 images,
16 image tokens, max_positions 256) is written once and exported once per format per
pytest process, in float32, by the same functions `llava-export all` calls: through
tests/fixtures.py's session Workshop when it is there (the parity and exporter tests use the
same one), else through the module-level cache below. Test modules import the fixtures they
use (`from tests.runtime_fixtures import tiny_artifacts`); either cache makes a second
module's import reuse the same export.

Broken copies of the artifact folder (missing decoder, unknown format version, truncated
decoder) and bad image files are built here too, for the Pipeline and llava-run error tests.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_CACHE: dict = {}


def _workshop(factory):
    """tests/fixtures.py's session Workshop (shared with the parity and exporter tests, so a
    whole-repo run exports the tiny model once), or None where it is not available."""
    try:
        from tests.fixtures import workshop_for
    except ImportError:
        return None
    return workshop_for(factory)


def tiny_sources(factory) -> dict[str, Path]:
    """{"hf", "original", "clip"}: the tiny model's source folders, written once per session."""
    from exporter.tiny import TinyConfig, write_tiny

    workshop = _workshop(factory)
    if workshop is not None:
        return workshop.tiny(TinyConfig())
    key = ("sources", factory.getbasetemp())
    if key not in _CACHE:
        _CACHE[key] = write_tiny(factory.mktemp("tiny-source"), TinyConfig())
    return _CACHE[key]


def export_tiny(factory, fmt: str) -> Path:
    """The tiny model in source format `fmt` ("hf" | "original") exported in float32, once."""
    from exporter.tiny import TinyConfig

    workshop = _workshop(factory)
    if workshop is not None:
        return workshop.artifacts(TinyConfig(), fmt)
    key = ("artifacts", factory.getbasetemp(), fmt)
    if key not in _CACHE:
        from exporter.decoder import export_decoder
        from exporter.progress import Progress
        from exporter.source import load_source
        from exporter.vision import export_vision

        source = load_source(str(tiny_sources(factory)[fmt]))
        out = factory.mktemp(f"artifacts-{fmt}")
        export_vision(source, out, progress=Progress(quiet=True))
        export_decoder(source, out, progress=Progress(quiet=True))
        _CACHE[key] = out
    return _CACHE[key]


def _base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> Path:
    """Artifact folder of the tiny model exported from its Hugging Face format (fp32)."""
    return export_tiny(tmp_path_factory, "hf")


def _write_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    paths = {}
    # Two clearly different images, neither square (the "pad" aspect path does something).
    noise = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    paths["a"] = folder / "a.png"
    noise.save(paths["a"])
    ramp = np.zeros((24, 36, 3), dtype=np.uint8)
    ramp[..., 0] = np.linspace(0, 255, 36, dtype=np.uint8)[None, :]
    ramp[..., 2] = np.linspace(255, 0, 24, dtype=np.uint8)[:, None]
    paths["b"] = folder / "b.jpg"
    Image.fromarray(ramp).save(paths["b"], quality=95)

    # Bad files.
    data = paths["a"].read_bytes()
    paths["truncated"] = folder / "truncated.png"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["not_image"] = folder / "notes.png"
    paths["not_image"].write_text("this is a text file, not a picture\n")
    paths["missing"] = folder / "does-not-exist.png"
    paths["bomb"] = folder / "bomb.png"
    paths["bomb"].write_bytes(bomb_png(100_000, 100_000))
    return paths


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """Image files: "a", "b" (good, different); "truncated", "not_image", "missing", "bomb"."""
    key = ("images", _base(tmp_path_factory))
    if key not in _CACHE:
        _CACHE[key] = _write_images(_base(tmp_path_factory) / "images")
    return _CACHE[key]


def _broken_copies(good: Path, folder: Path) -> dict[str, Path]:
    from runtime import contract

    broken = {}
    broken["no_decoder"] = folder / "no-decoder"
    shutil.copytree(good, broken["no_decoder"])
    (broken["no_decoder"] / contract.DECODER_FILE).unlink()

    broken["future_version"] = folder / "future-version"
    shutil.copytree(good, broken["future_version"])
    manifest_path = broken["future_version"] / contract.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = contract.FORMAT_VERSION + 98
    manifest_path.write_text(json.dumps(manifest))

    broken["truncated_decoder"] = folder / "truncated-decoder"
    shutil.copytree(good, broken["truncated_decoder"])
    decoder = broken["truncated_decoder"] / contract.DECODER_FILE
    data = decoder.read_bytes()
    decoder.write_bytes(data[: len(data) // 2])

    broken["missing_folder"] = folder / "never-exported"
    return broken


@pytest.fixture(scope="session")
def broken_artifacts(tiny_artifacts, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny artifact folder, each broken one way (see _broken_copies)."""
    key = ("broken", _base(tmp_path_factory))
    if key not in _CACHE:
        _CACHE[key] = _broken_copies(tiny_artifacts, _base(tmp_path_factory) / "broken")
    return _CACHE[key]
