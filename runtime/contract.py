"""The artifact contract between exporter and runtime, written once.

An artifact folder holds:

    llava_export.json            the manifest below (format version, model, preprocessing, ...)
    vision.onnx (+ .data)        pixel_values [B,3,H,W] -> image_embeds [B,N_img,hidden]
    decoder.onnx (+ .data)       inputs_embeds, attention_mask, position_ids, past_key_values.*
                                 -> logits [B,vocab] (last position only), present.*
    embed_tokens.npy             [vocab, hidden], memory-mapped by the runtime
    image_newline.npy            [hidden] (LLaVA-1.6 "anyres" models only: format version 2)
    tokenizer.json (+ tokenizer_config.json)
    engines/<gpu>-sm<cc>-trt<version>/...   TensorRT plans (optional)

The exporter imports this module; the runtime never imports the exporter. docs/artifacts.md
is the same contract for humans. Any change that an older runtime would misread bumps
FORMAT_VERSION; the runtime refuses versions it does not know.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import ArtifactError

FORMAT_NAME = "llava-export"
# Version 2 is version 1 plus `anyres` (LLaVA-1.6 tiling): written only for such models, so
# LLaVA-1.5 manifests stay readable by runtimes that know version 1 alone, and those refuse
# a 1.6 manifest instead of misreading it.
FORMAT_VERSION = 1
ANYRES_FORMAT_VERSION = 2
READABLE_VERSIONS = (FORMAT_VERSION, ANYRES_FORMAT_VERSION)

MANIFEST_FILE = "llava_export.json"
VISION_FILE = "vision.onnx"
DECODER_FILE = "decoder.onnx"
EMBEDDINGS_FILE = "embed_tokens.npy"
IMAGE_NEWLINE_FILE = "image_newline.npy"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
ENGINES_DIR = "engines"

# Graph I/O names, following Optimum / ONNX Runtime GenAI so other tools can read our graphs.
PIXEL_VALUES = "pixel_values"
IMAGE_EMBEDS = "image_embeds"
INPUTS_EMBEDS = "inputs_embeds"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"

# Decoder KV cache layouts (GraphSpec.kv_cache).
KV_CONCAT = "concat"
KV_STATIC = "static"
KV_LAYOUTS = (KV_CONCAT, KV_STATIC)


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


def decoder_input_names(num_layers: int) -> list[str]:
    names = [INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS]
    for layer in range(num_layers):
        names += [past_key_name(layer), past_value_name(layer)]
    return names


def decoder_output_names(num_layers: int) -> list[str]:
    names = [LOGITS]
    for layer in range(num_layers):
        names += [present_key_name(layer), present_value_name(layer)]
    return names


@dataclass
class PreprocessSpec:
    """How an image becomes pixel_values, identically in the exporter's reference and the runtime.

    aspect "pad": pad to a square with the mean colour, then resize to crop_size
    (original LLaVA `image_aspect_ratio: pad`). aspect "crop": resize the shortest edge to
    `shortest_edge`, then center-crop to crop_size (the HF CLIP processor's default).
    """

    shortest_edge: int
    crop_size: int
    mean: list[float]
    std: list[float]
    aspect: str = "crop"  # "pad" | "crop"
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        if self.aspect not in ("pad", "crop"):
            raise ArtifactError(f"image aspect must be 'pad' or 'crop', not {self.aspect!r}")


@dataclass
class VisionSpec:
    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    select_layer: int  # index into hidden_states (embeddings are 0), negative from the end
    select_strategy: str  # "default" drops CLS, "full" keeps it
    projector: str  # "linear" | "mlp{N}x_gelu"
    num_image_tokens: int = field(init=False)

    def __post_init__(self):
        patches = (self.image_size // self.patch_size) ** 2
        self.num_image_tokens = patches + (1 if self.select_strategy == "full" else 0)


# LLaVA-1.6's only merge of the tile grid: unpad to the image's aspect, a newline per row.
MERGE_SPATIAL_UNPAD = "spatial_unpad"


@dataclass
class AnyresSpec:
    """LLaVA-1.6 ("anyres"): an image is seen as a downscaled base tile plus a grid of tiles.

    The image goes to the pinpoint (height, width) that keeps most of its pixels and wastes
    least, resized keeping its aspect, padded black to the pinpoint, centred, and cut into
    `tile_size` squares; the base tile (the whole image squashed to one tile) comes first.
    After the vision graph the grid's features are unpadded to the image's aspect and each
    row ends in the `newline_file` vector (runtime/anyres.py does all of it).
    """

    grid_pinpoints: list[list[int]]  # [[height, width], ...] in pixels, HF's order (not the original repo's)
    tile_size: int  # pixels; the vision tower's image_size
    merge: str = MERGE_SPATIAL_UNPAD
    newline_file: str = IMAGE_NEWLINE_FILE

    def __post_init__(self):
        if self.merge != MERGE_SPATIAL_UNPAD:
            raise ArtifactError(f"anyres merge must be {MERGE_SPATIAL_UNPAD!r}, not {self.merge!r}")
        self.grid_pinpoints = [list(map(int, point)) for point in self.grid_pinpoints]
        if not self.grid_pinpoints:
            raise ArtifactError("anyres has no grid pinpoints")
        uneven = [
            p
            for p in self.grid_pinpoints
            if len(p) != 2 or min(p) <= 0 or p[0] % self.tile_size or p[1] % self.tile_size
        ]
        if uneven:
            raise ArtifactError(
                f"anyres pinpoint {uneven[0]} is not a (height, width) in whole {self.tile_size}-pixel tiles"
            )

    @property
    def max_tiles(self) -> int:
        """The most tiles an image can take: the largest grid, plus the base tile."""
        return 1 + max(h // self.tile_size * (w // self.tile_size) for h, w in self.grid_pinpoints)


@dataclass
class TextSpec:
    family: str  # "llama" | "mistral" | "qwen2"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int


@dataclass
class TokenSpec:
    bos: int | None
    eos: list[int]  # generation stops at any of these
    pad: int


@dataclass
class GraphSpec:
    """One ONNX graph: file, dtype of its floating tensors, opset, I/O names and dims.

    inputs/outputs map a name to its dims, each an int or a symbolic name ("batch").
    """

    file: str
    dtype: str  # "float32" | "float16"
    opset: int
    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]
    sha256: str = ""
    # Quantization of the linear layers, or None: "int8" | "int4" (com.microsoft.MatMulNBits,
    # activations stay `dtype`) or "w8a8" (MatMulInteger, activations rounded to uint8 per
    # token: docs/artifacts.md). Informational: ONNX Runtime runs the graph as it is.
    # Left out of the JSON when None, so float manifests read as before.
    quant: str | None = None
    # The decoder's KV cache layout (docs/artifacts.md): "concat" (past [B,kv,P,hd] in, present
    # [B,kv,P+S,hd] out) or "static" (one preallocated buffer [B,kv,max_seq_len,hd] per cache
    # tensor, updated in place; ONNX Runtime only). Both are left out of the JSON for "concat",
    # so manifests without them read as "concat".
    kv_cache: str = KV_CONCAT
    max_seq_len: int | None = None  # "static": the buffer length the runtime allocates

    def __post_init__(self):
        if self.kv_cache not in KV_LAYOUTS:
            raise ArtifactError(f"unknown kv_cache layout {self.kv_cache!r} (known: {', '.join(KV_LAYOUTS)})")
        if (self.kv_cache == KV_STATIC) != (self.max_seq_len is not None):
            raise ArtifactError(
                f"kv_cache {self.kv_cache!r} with max_seq_len {self.max_seq_len}: only a static layout has (and needs) one"
            )


@dataclass
class Manifest:
    source: dict[str, Any]  # {"path", "format": "hf"|"original", "weights_sha256"}
    vision: VisionSpec
    text: TextSpec
    preprocess: PreprocessSpec
    tokens: TokenSpec
    template: str
    graphs: dict[str, GraphSpec] = field(default_factory=dict)  # "vision" | "decoder"
    embeddings: dict[str, Any] = field(default_factory=dict)  # {"file", "dtype", "shape"}
    tools: dict[str, str] = field(default_factory=dict)
    parity: dict[str, dict[str, float]] = field(default_factory=dict)
    anyres: AnyresSpec | None = None  # LLaVA-1.6 tiling; None for LLaVA-1.5 (one tile per image)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        # the version follows the content: a runtime that knows only 1 must refuse `anyres`
        self.format_version = FORMAT_VERSION if self.anyres is None else ANYRES_FORMAT_VERSION
        spec = self.anyres
        if spec is not None:
            sizes = {
                spec.tile_size,
                self.vision.image_size,
                self.preprocess.shortest_edge,
                self.preprocess.crop_size,
            }
            if len(sizes) != 1:
                raise ArtifactError(
                    f"anyres tile_size {spec.tile_size}, vision image_size {self.vision.image_size} and preprocess "
                    f"shortest_edge/crop_size {self.preprocess.shortest_edge}/{self.preprocess.crop_size} must agree"
                )
            if self.vision.select_strategy != "default":
                raise ArtifactError(
                    "anyres takes select_strategy 'default' only (the CLS token has no place in the tile grid)"
                )

    def to_json(self) -> str:
        data = asdict(self)
        if data["anyres"] is None:
            data.pop("anyres")
        for graph in data["graphs"].values():
            if graph.get("quant") is None:
                graph.pop("quant", None)
            if graph.get("kv_cache") == KV_CONCAT:
                graph.pop("kv_cache")
                graph.pop("max_seq_len")
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        vision = dict(data["vision"])
        vision.pop("num_image_tokens", None)  # derived
        return cls(
            source=data["source"],
            vision=VisionSpec(**vision),
            text=TextSpec(**data["text"]),
            preprocess=PreprocessSpec(**data["preprocess"]),
            tokens=TokenSpec(**data["tokens"]),
            template=data["template"],
            graphs={name: GraphSpec(**g) for name, g in data.get("graphs", {}).items()},
            embeddings=data.get("embeddings", {}),
            tools=data.get("tools", {}),
            parity=data.get("parity", {}),
            anyres=AnyresSpec(**data["anyres"]) if "anyres" in data else None,
            format=data["format"],
        )

    def same_model(self, other: Manifest) -> bool:
        """Same weights and the same reading of them (a select layer or aspect changed by
        a config edit makes a different model)."""
        return self.source.get("weights_sha256") == other.source.get("weights_sha256") and (
            self.vision,
            self.text,
            self.preprocess,
            self.anyres,
        ) == (other.vision, other.text, other.preprocess, other.anyres)


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Reads and checks DIR/llava_export.json; raises ArtifactError naming what is wrong."""
    path = Path(folder) / MANIFEST_FILE
    if not Path(folder).is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist (export one with `llava-export all`)")
    if not path.is_file():
        raise ArtifactError(
            f"{path} is missing: {folder} is not an artifact folder (export one with `llava-export all`)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); re-export the artifacts") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path} is not a {FORMAT_NAME} manifest")
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{path} has format version {version}; this runtime reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (re-export with this llava-export, or install the matching runtime)"
        )
    if (version == ANYRES_FORMAT_VERSION) != ("anyres" in data):
        raise ArtifactError(
            f"{path} is malformed: format version {version} {'without' if 'anyres' not in data else 'with'} "
            "an `anyres` entry; re-export the artifacts"
        )
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError) as err:
        raise ArtifactError(f"{path} is incomplete or malformed ({err}); re-export the artifacts") from None
    except ArtifactError as err:
        raise ArtifactError(f"{path}: {err}; re-export the artifacts") from None


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> None:
    """Writes the manifest atomically (write aside, then rename)."""
    path = Path(folder) / MANIFEST_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, path)


def file_sha256(*paths: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (GraphSpec.sha256), or of several files' bytes read one
    after the other (the manifest's weights_sha256: a checkpoint's files in order), read in
    16 MiB blocks so that a 7B checkpoint is never in memory at once."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()
