"""The session's fixtures, for tests/ and parity_tests/ alike (registered by the root conftest.py).

Exports are the slow part (seconds each on a CPU), so one session-wide `Workshop`, the only
cache, writes every tiny model folder and every exported artifact folder once, under pytest's
tmp_path_factory. It imports the exporter (torch, transformers) only when a test asks for a
model, so the runtime's tests run where only the runtime is installed.

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


class Workshop:
    """Tiny models and their exports, made once per test session."""

    def __init__(self, factory: pytest.TempPathFactory):
        self.factory = factory
        self.tinies: dict[str, dict[str, Path]] = {}
        self.folders: dict[tuple, Path] = {}
        self.done: dict[tuple, set[str]] = {}
        self.references: dict = {}

    def tiny(self, config=None) -> dict[str, Path]:
        """write_tiny's folders {"hf"?, "original", "clip"} for `config` (default: TinyConfig())."""
        from exporter.testing.tiny import TinyConfig, write_tiny

        config = config or TinyConfig()
        key = repr(config)  # TinyConfig may hold a dict (rope_scaling): not hashable
        if key not in self.tinies:
            self.tinies[key] = write_tiny(self.factory.mktemp("tiny"), config)
        return self.tinies[key]

    def artifacts(
        self, config=None, fmt: str = "hf", fp16: bool = False, graphs=("vision", "decoder")
    ) -> Path:
        """An artifact folder exported (through the Python API) from `config`'s `fmt` folder."""
        import torch

        from exporter.graphs.decoder import export_decoder
        from exporter.graphs.vision import export_vision
        from exporter.progress import Progress
        from exporter.source import load_source
        from exporter.testing.tiny import TinyConfig

        config = config or TinyConfig()
        key = (repr(config), fmt, fp16)
        if key not in self.folders:
            self.folders[key] = self.factory.mktemp(f"artifacts-{fmt}-{'fp16' if fp16 else 'fp32'}")
            self.done[key] = set()
        out, done = self.folders[key], self.done[key]
        missing = [g for g in graphs if g not in done]
        if missing:
            dtype = torch.float16 if fp16 else torch.float32
            source = load_source(str(self.tiny(config)[fmt]), dtype=dtype)
            for graph in missing:
                export = export_vision if graph == "vision" else export_decoder
                export(source, out, fp16=fp16, progress=Progress(quiet=True))
                done.add(graph)
        return out

    def reference(self, config=None):
        """The float32 PyTorch reference, independent of exporter.source: transformers'
        LlavaForConditionalGeneration (LlavaNextForConditionalGeneration for an `anyres`
        config) read from the HF folder, or (projectors only the original format expresses)
        the very model write_tiny saved, rebuilt from its seed."""
        import torch

        from exporter.testing.tiny import TinyConfig, build_tiny_model

        config = config or TinyConfig()
        key = repr(config)
        if key not in self.references:
            folders = self.tiny(config)
            if "hf" in folders:
                from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

                model_class = (
                    LlavaForConditionalGeneration
                    if config.anyres is None
                    else LlavaNextForConditionalGeneration
                )
                model = model_class.from_pretrained(folders["hf"], dtype=torch.float32)
            else:
                model = build_tiny_model(config)
            self.references[key] = model.eval().requires_grad_(False)
        return self.references[key]


@pytest.fixture(scope="session")
def workshop(tmp_path_factory) -> Workshop:
    """Tiny model folders, exported artifact folders and float32 references, made once."""
    return Workshop(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_artifacts(workshop) -> Path:
    """Artifact folder of the tiny model (default TinyConfig) exported from its Hugging Face format (fp32)."""
    return workshop.artifacts()


def write_images(folder: Path) -> dict[str, Path]:
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


def gradient_pictures(sizes: dict[str, tuple[int, int]], seed: int = 7) -> dict[str, Image.Image]:
    """Seeded RGB images of `sizes` (height, width): noise over a horizontal gradient, so that
    resampling matters (LLaVA-1.6's tiles are resized images)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (height, width) in sizes.items():
        ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
        noise = rng.integers(-40, 40, (height, width, 3))
        out[name] = Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8))
    return out


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """Image files: "a", "b" (good, different); "truncated", "not_image", "missing", "bomb"."""
    return write_images(tmp_path_factory.mktemp("images"))


def broken_copies(good: Path, folder: Path) -> dict[str, Path]:
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
    """Copies of the tiny artifact folder, each broken one way (see broken_copies)."""
    return broken_copies(tiny_artifacts, tmp_path_factory.mktemp("broken"))


@pytest.fixture(scope="session")
def toy_artifacts(tmp_path_factory) -> Path:
    """The shipped toy model exported with `llava-export all` (fp32), once per session; skips
    where models/toy-llava is not in the checkout."""
    from tests.support.toy import TOY_HF_DIR, export_with_cli

    if not (TOY_HF_DIR / "model.safetensors").is_file():
        pytest.skip("models/toy-llava is not in this checkout")
    return export_with_cli(TOY_HF_DIR, tmp_path_factory.mktemp("toy") / "toy-fp32")


@pytest.fixture(scope="session")
def toy_pipe(toy_artifacts):
    """A Pipeline over toy_artifacts, shared by the server's tests (each server gets its own Engine)."""
    from runtime.pipeline import Pipeline

    with Pipeline.load(toy_artifacts) as pipe:
        yield pipe
