"""TensorRT backend: engine selection. Engines are built per GPU and TensorRT version under
DIR/engines/<gpu>-sm<cc>-trt<version>/ by `llava-export engine`."""

from __future__ import annotations

from pathlib import Path

from runtime import contract
from runtime.contract import Manifest
from runtime.errors import EngineError


def load_trt_backend(folder: Path, manifest: Manifest):
    build = f"llava-export engine --artifacts {folder}"
    engines = folder / contract.ENGINES_DIR
    if not engines.is_dir() or not any(engines.iterdir()):
        raise EngineError(f"no TensorRT engine in {engines} for this GPU: build one with `{build}`")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise EngineError("TensorRT is not installed: pip install 'llava-export[gpu]' (see README, GPU install)") from None
    raise EngineError(f"the TensorRT backend cannot run these engines yet; rebuild them with `{build}` once it can")
