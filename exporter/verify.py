"""`llava-export verify`: the parity report of an artifact folder against its PyTorch source."""

from __future__ import annotations

from pathlib import Path

from exporter import parity
from exporter.graphs.decoder import decoder_parity
from exporter.graphs.vision import vision_parity
from exporter.progress import Progress
from exporter.source import LlavaSource
from runtime import contract
from runtime.errors import ArtifactError

CHECKS = {"vision": vision_parity, "decoder": decoder_parity}


def verify_artifacts(
    source: LlavaSource, folder: Path, progress: Progress | None = None
) -> list[parity.OutputParity]:
    """Runs every graph in `folder` against `source`; raises ParityError listing all failures."""
    progress = progress or Progress()
    manifest = contract.read_manifest(folder)
    if not manifest.graphs:
        raise ArtifactError(f"{folder} holds no graphs: export some with `llava-export all --out {folder}`")
    results = []
    for name, graph in manifest.graphs.items():
        quant = {"quant": graph.quant} if graph.quant else {}  # a quantized decoder's own gate
        with progress.stage(
            f"running {graph.file} ({graph.dtype}{', ' + graph.quant + ' weights' if graph.quant else ''}) against PyTorch"
        ):
            graph_results = CHECKS[name](source, folder / graph.file, graph.dtype, **quant)
        parity.report(progress, name, graph_results)
        results += graph_results
    parity.assert_parity(results, str(folder))
    return results
