"""Backends by name. Heavy imports (onnxruntime, tensorrt) happen only when one is loaded."""

from __future__ import annotations

from pathlib import Path

from runtime.backends.base import Backend
from runtime.contract import Manifest
from runtime.errors import LlavaError

BACKENDS = ("ort", "trt")


def load_backend(name: str, folder: Path, manifest: Manifest, threads: int | None = None) -> Backend:
    """An open backend (close it, or use it in a `with` block). `threads`: ONNX Runtime's
    intra-op threads (None: its own choice); TensorRT runs on the GPU and takes none."""
    if name == "ort":
        from runtime.backends.ort import OrtBackend

        return OrtBackend(folder, manifest, threads)
    if name == "trt":
        from runtime.backends.trt import load_trt_backend

        return load_trt_backend(folder, manifest)
    raise LlavaError(f"unknown backend {name!r} (choose one of: {', '.join(BACKENDS)})")
