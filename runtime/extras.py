"""The optional parts of llava-export and the pip extras that install them.

The runtime alone (`pip install llava-export`) answers questions from an artifact folder. A
command or option that needs more checks for it first with `require`, which raises
`MissingExtra` (a LlavaError: one line naming what to install, exit status 2) instead of the
ImportError traceback the first missing import would give.
"""

from __future__ import annotations

import importlib.util
import sys

from runtime.errors import LlavaError

# extra -> (what it brings, in words; the modules whose absence means it is not installed)
EXTRAS = {
    "export": (
        "the exporter (torch, transformers, onnxscript)",
        ("torch", "transformers", "onnxscript", "safetensors"),
    ),
    "bench": ("matplotlib", ("matplotlib",)),
    "serve": (
        "the server (FastAPI, uvicorn, prometheus-client)",
        ("fastapi", "uvicorn", "prometheus_client"),
    ),
    "serve-ray": ("Ray Serve", ("ray",)),
    "train": ("PEFT (LoRA training)", ("peft",)),
}
# How to install each, when `pip install 'llava-export[NAME]'` alone is not the whole story.
INSTALL = {
    "export": "pip install torch==2.13.0 && pip install 'llava-export[export]' (torch first: an unpinned one is a multi-GB CUDA build)",
}


class MissingExtra(LlavaError):
    """A feature was asked for whose optional dependencies are not installed."""


def installed(module: str) -> bool:
    """Whether `module` (a top-level name) can be imported, without importing it."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(extra: str, feature: str) -> None:
    """MissingExtra naming `extra` when any of its modules is missing; `feature` says what
    needed it ("llava-export vision", "--plot")."""
    brings, modules = EXTRAS[extra]
    absent = [module for module in modules if not installed(module)]
    if absent:
        how = INSTALL.get(extra, f"pip install 'llava-export[{extra}]'")
        raise MissingExtra(
            f"{feature} needs {brings}, not installed here ({', '.join(absent)} missing): {how}"
        )
