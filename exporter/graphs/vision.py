"""`llava-export vision`: CLIP tower + feature selection + projector as ONE ONNX graph.

pixel_values [B,3,H,W] -> image_embeds [B,N_img,hidden]     (batch dynamic)
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exporter import parity
from exporter.graphs import onnx_io
from exporter.manifest import open_manifest
from exporter.progress import Progress
from exporter.source import LlavaSource
from runtime import contract
from runtime.contract import GraphSpec

DEFAULT_OPSET = 18
PARITY_BATCH = 2


class VisionEncoder(nn.Module):
    """What LLaVA does to an image before splicing: tower, select a layer, drop CLS, project."""

    def __init__(self, llava: nn.Module, select_layer: int, select_strategy: str):
        super().__init__()
        self.tower = llava.model.vision_tower
        self.projector = llava.model.multi_modal_projector
        self.select_layer = select_layer
        self.keep_cls = select_strategy == "full"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # hidden_states: embeddings, then each layer's output, each [B, 1 + patches, vision_hidden]
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        if not self.keep_cls:
            hidden = hidden[:, 1:]
        return self.projector(hidden)  # [B, N_img, text_hidden]


def sample_pixels(source: LlavaSource, batch: int, seed: int = 0) -> torch.Tensor:
    """A fixed, seeded batch of normalized-looking pixel values [B,3,H,W]."""
    size = source.preprocess.crop_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def export_vision(
    source: LlavaSource,
    out: Path,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    verify: bool = True,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Writes out/vision.onnx and updates the manifest; returns the parity figures (empty
    when `verify` is off)."""
    progress = progress or Progress()
    onnx_io.check_writable(out)
    manifest = open_manifest(out, source, force)
    dtype_name = "float16" if fp16 else "float32"
    dtype = getattr(torch, dtype_name)
    encoder = VisionEncoder(source.model, source.vision.select_layer, source.vision.select_strategy).eval()
    # A float16 copy when the source was loaded in float32 (the tower is under 1 GB).
    traced = encoder if next(encoder.parameters()).dtype == dtype else copy.deepcopy(encoder).to(dtype)
    pixels = sample_pixels(source, PARITY_BATCH).to(dtype)
    with onnx_io.staging(out, "vision") as stage:
        with progress.stage(f"tracing the vision graph ({dtype_name}, opset {opset})"):
            program = onnx_io.trace_to_onnx(
                traced,
                (pixels,),
                dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
                input_names=[contract.PIXEL_VALUES],
                output_names=[contract.IMAGE_EMBEDS],
                opset=opset,
            )
        with progress.stage("saving and checking the graph"):
            external = onnx_io.parameter_bytes(traced) > onnx_io.EXTERNAL_DATA_BYTES
            path = onnx_io.save_graph(program, stage, contract.VISION_FILE, external)
            onnx_io.check_graph(path)
        results = []
        if verify:
            with progress.stage("running it in ONNX Runtime against PyTorch"):
                results = vision_parity(source, path, dtype_name)
            parity.report(progress, "vision", results)
            parity.assert_parity(results, "vision graph; nothing was written")
        sha = onnx_io.file_sha256(path)
        onnx_io.publish(stage, out, contract.VISION_FILE)
    manifest.graphs["vision"] = GraphSpec(
        file=contract.VISION_FILE,
        dtype=dtype_name,
        opset=opset,
        inputs={
            contract.PIXEL_VALUES: ["batch", 3, source.preprocess.crop_size, source.preprocess.crop_size]
        },
        outputs={contract.IMAGE_EMBEDS: ["batch", source.vision.num_image_tokens, source.text.hidden_size]},
        sha256=sha,
    )
    manifest.parity["vision"] = parity.summary(results)
    contract.write_manifest(out, manifest)
    return manifest.parity["vision"]


def vision_parity(source: LlavaSource, path: Path, dtype_name: str) -> list[parity.OutputParity]:
    """The graph at `path` against the PyTorch reference computed in float32, on a fixed batch."""
    encoder = VisionEncoder(source.model, source.vision.select_layer, source.vision.select_strategy).eval()
    if next(encoder.parameters()).dtype != torch.float32:
        encoder = copy.deepcopy(encoder).float()
    pixels = sample_pixels(source, PARITY_BATCH)
    with torch.no_grad():
        expected = encoder(pixels).numpy()
    actual = run_vision_graph(path, pixels.numpy().astype(dtype_name))
    return [parity.compare(contract.IMAGE_EMBEDS, actual, expected, min_cosine=parity.MIN_COSINE[dtype_name])]


def run_vision_graph(path: Path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {contract.PIXEL_VALUES: pixels})[0]
