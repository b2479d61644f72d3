"""`llava-export vision`: CLIP tower + feature selection + projector as ONE ONNX graph.

pixel_values [B,3,H,W] -> image_embeds [B,N_img,hidden]     (batch dynamic)

For LLaVA-1.6 ("anyres") the batch is an image's tiles, base tile first: the graph is the same,
and image_newline.npy [hidden], the vector the runtime puts at the end of each row of the tile
grid, ships with it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exporter import parity
from exporter.graphs import DEFAULT_OPSET
from exporter.graphs.export import ExportOptions, GraphExport, export_graph
from exporter.progress import Progress
from exporter.source import LlavaSource
from runtime import contract
from runtime.contract import Manifest

PARITY_BATCH = 2
# LLaVA-1.6's check of the packing: a picture of (height, width) = these many tiles, which picks
# a grid of several tiles and is unpadded in both the pinpoint and the grid
PACKED_IMAGE = (1.4, 2.1)
PACKED_IMAGE_OUTPUT = "packed_image_features"


class VisionEncoder(nn.Module):
    """What LLaVA does to an image before splicing: tower, select a layer, drop CLS, project."""

    def __init__(self, llava: nn.Module, select_layer: int, select_strategy: str):
        super().__init__()
        self.tower = llava.model.vision_tower
        self.projector = llava.model.multi_modal_projector
        self.select_layer = select_layer
        self.keep_cls = select_strategy == "full"

    @classmethod
    def of(cls, source: LlavaSource) -> VisionEncoder:
        """The encoder `source`'s config describes, in eval mode."""
        return cls(source.model, source.vision.select_layer, source.vision.select_strategy).eval()

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


class VisionGraph(GraphExport):
    """vision.onnx: VisionEncoder with a dynamic batch, held to parity.MIN_COSINE of its dtype
    against the encoder in float32."""

    name = "vision"
    file = contract.VISION_FILE
    checks = "it"

    def io_spec(self):
        size = self.source.preprocess.crop_size
        tokens, hidden = self.source.vision.num_image_tokens, self.source.text.hidden_size
        return (
            {contract.PIXEL_VALUES: ["batch", 3, size, size]},
            {contract.IMAGE_EMBEDS: ["batch", tokens, hidden]},
        )

    def trace_details(self) -> str:
        return f"{self.options.dtype_name}, opset {self.options.opset}"

    def add_companions(self, stage: Path, manifest: Manifest, progress: Progress) -> list[str]:
        """LLaVA-1.6: the model's image_newline [hidden] in the graph dtype (manifest.anyres,
        from the source, names the file)."""
        anyres = self.source.anyres
        if anyres is None:
            return []
        np.save(stage / anyres.newline_file, self.newline())
        return [anyres.newline_file]

    def module(self) -> nn.Module:
        encoder = VisionEncoder.of(self.source)
        # A float16 copy when the source was loaded in float32 (the tower is under 1 GB).
        dtype = self.options.dtype
        return encoder if next(encoder.parameters()).dtype == dtype else copy.deepcopy(encoder).to(dtype)

    def sample_inputs(self) -> tuple:
        return (sample_pixels(self.source, PARITY_BATCH).to(self.options.dtype),)

    def parity(self, path: Path) -> list[parity.OutputParity]:
        """The graph against the encoder computed in float32, on a fixed batch; for LLaVA-1.6
        also an image's packed features (PACKED_IMAGE), with the newline file beside `path`
        when there is one (verify) or the model's (export, before the file is published)."""
        encoder = VisionEncoder.of(self.source)
        if next(encoder.parameters()).dtype != torch.float32:
            encoder = copy.deepcopy(encoder).float()
        pixels = sample_pixels(self.source, PARITY_BATCH)
        with torch.no_grad():
            expected = encoder(pixels).numpy()
        actual = run_vision_graph(path, pixels.numpy().astype(self.options.dtype_name))
        results = [parity.compare(contract.IMAGE_EMBEDS, actual, expected, min_cosine=self.min_cosine)]
        if self.source.anyres is not None:
            results.append(self.packed_parity(path, encoder))
        return results

    def packed_parity(self, path: Path, encoder: VisionEncoder) -> parity.OutputParity:
        """A seeded PACKED_IMAGE-sized picture through runtime.anyres (tiles, the graph, pack)
        against the float32 `encoder` on the same tiles packed by transformers'
        pack_image_features (what get_image_features does, without a float32 copy of a 7B
        decoder)."""
        from PIL import Image

        from runtime import anyres

        source, spec = self.source, self.source.anyres
        height, width = (round(side * spec.tile_size) for side in PACKED_IMAGE)
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        tiles = anyres.tiles(image, spec, source.preprocess)  # [T,3,S,S] float32
        newline_file = path.parent / spec.newline_file
        newline = np.load(newline_file) if newline_file.is_file() else self.newline()
        embeds = run_vision_graph(path, tiles.astype(self.options.dtype_name))
        actual = anyres.pack(embeds, (height, width), spec, source.vision, newline)
        llava = source.model.model  # LlavaNextModel: pack_image_features reads its config only
        with torch.no_grad():
            (expected,), _ = llava.pack_image_features(
                [encoder(torch.from_numpy(tiles))],
                torch.tensor([[height, width]]),
                source.vision.select_strategy,
                image_newline=llava.image_newline.float(),
            )
        return parity.compare(PACKED_IMAGE_OUTPUT, actual, expected.numpy(), min_cosine=self.min_cosine)

    def newline(self) -> np.ndarray:
        """The model's image_newline [hidden] in the graph dtype: image_newline.npy's content."""
        return self.source.model.model.image_newline.detach().to(self.options.dtype).numpy()


def run_vision_graph(path: Path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {contract.PIXEL_VALUES: pixels})[0]


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
    options = ExportOptions(fp16=fp16, opset=opset, force=force, verify=verify)
    return export_graph(VisionGraph(source, options), out, progress)
