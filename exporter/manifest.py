"""Building and updating the manifest (runtime/contract.py) from a loaded source."""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

from exporter.source import LlavaSource
from runtime import contract
from runtime.contract import Manifest, TokenSpec
from runtime.errors import ArtifactError, LlavaError

# Every file an export may have written: --force clears them when the folder held another model.
ARTIFACT_FILES = (
    contract.VISION_FILE,
    contract.VISION_FILE + ".data",
    contract.DECODER_FILE,
    contract.DECODER_FILE + ".data",
    contract.EMBEDDINGS_FILE,
    contract.IMAGE_NEWLINE_FILE,
    contract.TOKENIZER_FILE,
    contract.TOKENIZER_CONFIG_FILE,
    contract.MANIFEST_FILE,
)


def tool_versions() -> dict[str, str]:
    versions = {}
    for package in ("llava-export", "torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def new_manifest(source: LlavaSource, template: str | None = None) -> Manifest:
    return Manifest(
        source=source.describe(),
        vision=source.vision,
        text=source.text,
        preprocess=source.preprocess,
        tokens=TokenSpec(bos=None, eos=[], pad=0),  # filled when the tokenizer is exported
        template=template or source.template,
        tools=tool_versions(),
        anyres=source.anyres,
    )


def open_manifest(folder: Path, source: LlavaSource, force: bool, template: str | None = None) -> Manifest:
    """The manifest to update in `folder`: the existing one if it describes the same model,
    a fresh one if there is none; another model's folder is refused unless `force`."""
    fresh = new_manifest(source, template)
    if not (folder / contract.MANIFEST_FILE).exists():
        return fresh
    try:
        existing = contract.read_manifest(folder)
    except ArtifactError:
        existing = None
    if existing is not None and existing.same_model(fresh):
        fresh.graphs, fresh.embeddings, fresh.parity = existing.graphs, existing.embeddings, existing.parity
        fresh.tokens = existing.tokens
        if template is None:
            fresh.template = existing.template
        return fresh
    if not force:
        holder = existing.source.get("path") if existing else "an unreadable manifest"
        raise LlavaError(
            f"{folder} holds artifacts of another model ({holder}): pass --force to replace them, or choose another --out"
        )
    clear_artifacts(folder)
    return fresh


def clear_artifacts(folder: Path) -> None:
    for name in ARTIFACT_FILES:
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / contract.ENGINES_DIR, ignore_errors=True)
