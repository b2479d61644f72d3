"""`llava-export verify`: the parity report of an artifact folder against its PyTorch source."""

from __future__ import annotations

from pathlib import Path

from exporter import parity
from exporter.graphs.decoder import DecoderGraph
from exporter.graphs.vision import VisionGraph
from exporter.progress import Progress
from exporter.source import LlavaSource
from runtime import contract
from runtime.errors import ArtifactError

# The manifest's graph names -> their descriptions, whose parity checks the export ran.
GRAPHS = {graph.name: graph for graph in (VisionGraph, DecoderGraph)}


def verify_artifacts(
    source: LlavaSource, folder: Path, progress: Progress | None = None
) -> list[parity.OutputParity]:
    """Runs every graph in `folder` against `source`, with the dtype, weight quantization and KV
    layout its manifest entry records; raises ParityError listing all failures."""
    progress = progress or Progress()
    manifest = contract.read_manifest(folder)
    if not manifest.graphs:
        raise ArtifactError(f"{folder} holds no graphs: export some with `llava-export all --out {folder}`")
    results = []
    for name, spec in manifest.graphs.items():
        weights = f", {spec.quant} weights" if spec.quant else ""
        with progress.stage(f"running {spec.file} ({spec.dtype}{weights}) against PyTorch"):
            graph_results = GRAPHS[name].exported(source, spec).parity(folder / spec.file)
        parity.report(progress, name, graph_results)
        results += graph_results
    parity.assert_parity(results, str(folder))
    return results
