"""The one export-and-validate path (`export_graph`), and the description each graph gives it
(`GraphExport`, as Optimum's OnnxConfig describes a model to its exporter).

A description (vision.VisionGraph, decoder.DecoderGraph) says what differs between graphs: its
file, its I/O spec (names in graph order and dims; the symbolic dims are the dynamic axes), the
module to trace and the sample inputs to trace it with, its parity check against PyTorch and the
tolerance that gates it, and hooks for what only some graphs do: options checked before any
work, a rewrite of the saved graph (quantization), companion files and the manifest fields they
fill. `export_graph` does the rest, in the same order for every graph:

    check the options, the output folder and its manifest (another model's is refused)
    -> in a staging folder: trace, save, onnx.checker, rewrite, parity against PyTorch
    -> sha256; companions, then the graph, moved into the folder (the .onnx last)
    -> the manifest's GraphSpec and parity figures, written atomically

Nothing reaches the folder before parity passed, and a failed or interrupted export leaves it
as it was (onnx_io.staging removes the staging folder whatever happens).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from exporter import parity
from exporter.graphs import DEFAULT_OPSET, onnx_io
from exporter.manifest import open_manifest
from exporter.progress import Progress
from exporter.source import LlavaSource
from runtime import contract
from runtime.contract import GraphSpec, Manifest

Dims = dict[str, list[int | str]]  # I/O name -> dims, each an int or a symbolic name ("batch")


@dataclasses.dataclass
class ExportOptions:
    """The export flags (the CLI's), shared by every graph; a graph ignores those it does not take."""

    fp16: bool = False  # float16 weights, inputs and activations
    opset: int = DEFAULT_OPSET
    force: bool = False  # replace the artifacts of another model in the folder
    verify: bool = True  # run the graph in ONNX Runtime against PyTorch before publishing it
    template: str | None = None  # the prompt template the manifest records (None: the model's)
    quant: str | None = None  # the decoder's weight-only quantization, "int8" | "int4"
    block_size: int | None = None  # --quant's weights per scale (None: quantize.DEFAULT_BLOCK_SIZE)
    kv_cache: str = contract.KV_CONCAT  # the decoder's KV cache layout
    max_seq_len: int | None = None  # the static layout's buffer length (None: the model's default)
    dtype_name: str = dataclasses.field(init=False)  # "float16" | "float32"

    def __post_init__(self):
        self.dtype_name = "float16" if self.fp16 else "float32"

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name)


class GraphExport:
    """One graph as export_graph and `llava-export verify` need it. Subclasses set the class
    attributes and give io_spec, module, sample_inputs, parity and trace_details."""

    name: str  # the graph's key in the manifest's graphs and parity: "vision" | "decoder"
    file: str  # its file in the artifact folder
    checks: str  # what its parity check runs: "running {checks} in ONNX Runtime against PyTorch"

    def __init__(self, source: LlavaSource, options: ExportOptions):
        self.source = source
        self.options = options

    @classmethod
    def exported(cls, source: LlavaSource, spec: GraphSpec) -> GraphExport:
        """The description of a graph already exported, with the options its manifest entry
        records (dtype, opset, quantization, KV layout): what `llava-export verify` checks."""
        options = ExportOptions(
            fp16=spec.dtype == "float16",
            opset=spec.opset,
            quant=spec.quant,
            kv_cache=spec.kv_cache,
            max_seq_len=spec.max_seq_len,
        )
        return cls(source, options)

    # -- what each graph describes

    def io_spec(self) -> tuple[Dims, Dims]:
        """(inputs, outputs), each in graph order: the trace's names and dynamic axes, and the
        manifest's GraphSpec.inputs/outputs as they are."""
        raise NotImplementedError

    def module(self) -> nn.Module:
        """The module to trace, in the export dtype, its forward taking sample_inputs."""
        raise NotImplementedError

    def sample_inputs(self) -> tuple:
        """The arguments to trace with (sizes above 1 on every dynamic axis: torch.export
        specialises 0 and 1)."""
        raise NotImplementedError

    def parity(self, path: Path) -> list[parity.OutputParity]:
        """The graph at `path` (in options.dtype_name) against the PyTorch reference, each output
        gated at min_cosine."""
        raise NotImplementedError

    def trace_details(self) -> str:
        """What the tracing progress line says about the graph: "float16, opset 18"."""
        raise NotImplementedError

    def dynamic_shapes(self):
        """torch.export's dynamic_shapes for sample_inputs: dynamic_axes as it is, for a module
        whose forward takes one argument per graph input, named as the input."""
        return self.dynamic_axes()

    # -- hooks: what only some graphs do

    def check_options(self) -> None:
        """LlavaError for options this graph cannot take, raised before any work; may fill in
        option defaults that depend on the source."""

    def write(self, stage: Path, progress: Progress) -> Path:
        """Writes the checked graph into `stage`; returns its path. By default: trace_and_save."""
        return trace_and_save(self, stage, progress)

    def rewrite(self, path: Path, progress: Progress) -> None:
        """Rewrites the saved and checked graph at `path` in place, before its parity check."""

    def add_companions(self, stage: Path, manifest: Manifest, progress: Progress) -> list[str]:
        """Writes the files that ship with the graph into `stage` and records them in `manifest`;
        returns their names, moved into the folder just before the graph."""
        return []

    def graph_spec(self, sha256: str) -> GraphSpec:
        """The manifest's entry for the graph."""
        inputs, outputs = self.io_spec()
        return GraphSpec(self.file, self.options.dtype_name, self.options.opset, inputs, outputs, sha256)

    # -- derived from the description

    @property
    def min_cosine(self) -> float:
        """The parity gate: parity.MIN_COSINE of the graph dtype, or QUANT_MIN_COSINE of its
        weight quantization."""
        return parity.min_cosine_for(self.options.dtype_name, self.options.quant)

    def dynamic_axes(self) -> dict[str, dict[int, torch.export.Dim]]:
        """{input: {axis: Dim}} for the symbolic dims of io_spec's inputs; one Dim per name, so
        that inputs sharing a name ("batch") share the dim."""
        inputs, _ = self.io_spec()
        dims = {dim: torch.export.Dim(dim) for shape in inputs.values() for _, dim in symbolic(shape)}
        return {name: {axis: dims[dim] for axis, dim in symbolic(shape)} for name, shape in inputs.items()}


def symbolic(shape: list[int | str]) -> list[tuple[int, str]]:
    """(axis, name) of each symbolic dim of `shape`."""
    return [(axis, dim) for axis, dim in enumerate(shape) if isinstance(dim, str)]


def export_graph(graph: GraphExport, out: Path, progress: Progress | None = None) -> dict[str, float]:
    """Exports `graph` into the artifact folder `out` and records it in the manifest; returns its
    parity figures (empty when options.verify is off)."""
    progress = progress or Progress()
    graph.check_options()
    onnx_io.check_writable(out)
    manifest = open_manifest(out, graph.source, graph.options.force, graph.options.template)
    with onnx_io.staging(out, graph.name) as stage:
        path = graph.write(stage, progress)
        graph.rewrite(path, progress)
        results = check_parity(graph, path, progress) if graph.options.verify else []
        sha256 = contract.file_sha256(path)
        for name in graph.add_companions(stage, manifest, progress):
            (stage / name).replace(out / name)
        onnx_io.publish(stage, out, graph.file)
    manifest.graphs[graph.name] = graph.graph_spec(sha256)
    manifest.parity[graph.name] = parity.summary(results)
    contract.write_manifest(out, manifest)
    return manifest.parity[graph.name]


def trace_and_save(graph: GraphExport, stage: Path, progress: Progress) -> Path:
    """Traces the graph's module into stage/<file>, its weights in external data when they pass
    onnx_io.EXTERNAL_DATA_BYTES, and runs onnx.checker on it."""
    module = graph.module()
    inputs, outputs = graph.io_spec()
    with progress.stage(f"tracing the {graph.name} graph ({graph.trace_details()})"):
        program = onnx_io.trace_to_onnx(
            module,
            graph.sample_inputs(),
            dynamic_shapes=graph.dynamic_shapes(),
            input_names=list(inputs),
            output_names=list(outputs),
            opset=graph.options.opset,
        )
    with progress.stage("saving and checking the graph"):
        external = onnx_io.parameter_bytes(module) > onnx_io.EXTERNAL_DATA_BYTES
        path = onnx_io.save_graph(program, stage, graph.file, external)
        del program  # its copy of the weights: a 7B decoder's would stay in memory for nothing
        onnx_io.check_graph(path)
    return path


def check_parity(graph: GraphExport, path: Path, progress: Progress) -> list[parity.OutputParity]:
    """The graph's parity check, reported; ParityError (nothing published) when it fails."""
    with progress.stage(f"running {graph.checks} in ONNX Runtime against PyTorch"):
        results = graph.parity(path)
    parity.report(progress, graph.name, results)
    parity.assert_parity(results, f"{graph.name} graph; nothing was written")
    return results
