"""Tiny random LLaVA models for tests and the demo, written in seconds, deterministically.

`write_tiny(root, TinyConfig(...))` writes
    root/hf/        LlavaForConditionalGeneration (safetensors) + tokenizer + image processor
    root/original/  the same weights in the original LLaVA repo's layout, pointing at root/clip
    root/clip/      the separate CLIP tower checkpoint the original format names
The HF folder is written only for the mlp2x_gelu projector (the only one transformers' Llava
expresses); the original format takes every projector type.

`TinyConfig(anyres=((32, 64), (64, 32), ...))` makes a LLaVA-1.6 instead: a
LlavaNextForConditionalGeneration with those (height, width) pinpoints, a LlavaNextImageProcessor
in hf/, and in original/ LLaVA-1.6's layout (image_aspect_ratio anyres, the pinpoints as
(width, height), model.image_newline, the tower's weights with unfreeze_mm_vision_tower).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from exporter.source import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_empty_model, projector_depth
from exporter.testing.original_format import write_clip_tower, write_original, write_processor_config
from exporter.testing.tiny_tokenizer import build_tiny_tokenizer
from runtime.contract import PreprocessSpec

TOKENIZER_VOCAB = 320
# LLaVA-1.6's default pinpoints, [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
# at the tiny tower's 32-pixel tile
TINY_PINPOINTS = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))


@dataclass(frozen=True)
class TinyConfig:
    family: str = "llama"  # llama | mistral | qwen2
    projector: str = "mlp2x_gelu"
    select_layer: int = -2
    select_strategy: str = "default"  # default | full
    aspect: str = "pad"  # pad | crop
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 3
    text_hidden: int = 64
    text_layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 256
    tie_embeddings: bool = False
    weights: str = "safetensors"  # original format: safetensors | bin
    shards: int = 1
    seed: int = 0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "linear", "factor": 2.0}
    # LLaVA-1.6: its grid pinpoints, (height, width) in pixels as HF's, each in whole image_size
    # tiles; None: LLaVA-1.5
    anyres: tuple[tuple[int, int], ...] | None = None

    @property
    def preprocess(self) -> PreprocessSpec:
        """What the source reads back: an anyres model's aspect is "crop" (its tiles are cut
        from the padded image; `aspect` is LLaVA-1.5's pad-to-square)."""
        return PreprocessSpec(
            shortest_edge=self.image_size,
            crop_size=self.image_size,
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
            aspect=self.aspect if self.anyres is None else "crop",
        )


def text_config(tiny: TinyConfig, vocab_size: int) -> dict:
    config = {
        "model_type": tiny.family,
        "hidden_size": tiny.text_hidden,
        "intermediate_size": tiny.text_hidden * 2,
        "num_hidden_layers": tiny.text_layers,
        "num_attention_heads": tiny.heads,
        "num_key_value_heads": tiny.kv_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": tiny.max_positions,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tiny.tie_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if tiny.family == "mistral":
        config["sliding_window"] = None
    if tiny.rope_scaling:
        config["rope_scaling"] = dict(tiny.rope_scaling)
    return config


def build_tiny_model(tiny: TinyConfig, vocab_size: int = TOKENIZER_VOCAB):
    """A random-weight reference model (seeded), float32: LlavaForConditionalGeneration, or
    LlavaNextForConditionalGeneration for `anyres` (its image_newline random too)."""
    from transformers import LlavaConfig, LlavaNextConfig

    num_patches = (tiny.image_size // tiny.patch_size) ** 2
    config_class = LlavaConfig
    anyres = {}
    if tiny.anyres is not None:
        config_class, anyres = LlavaNextConfig, {"image_grid_pinpoints": [list(p) for p in tiny.anyres]}
    config = config_class(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": tiny.vision_hidden,
            "intermediate_size": tiny.vision_hidden * 2,
            "num_hidden_layers": tiny.vision_layers,
            "num_attention_heads": 4,
            "image_size": tiny.image_size,
            "patch_size": tiny.patch_size,
            "projection_dim": tiny.vision_hidden,
        },
        text_config=text_config(tiny, vocab_size),
        vision_feature_layer=tiny.select_layer,
        vision_feature_select_strategy=tiny.select_strategy,
        image_token_index=0,
        image_seq_length=num_patches + (tiny.select_strategy == "full"),
        tie_word_embeddings=tiny.tie_embeddings,
        **anyres,
    )
    model = build_empty_model(config, projector_depth(tiny.projector, Path(".")), torch.float32)
    generator = torch.Generator().manual_seed(tiny.seed)
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if name.endswith(("inv_freq", "position_ids")):
            continue
        # Norm weights near 1, everything else small: activations stay in a sane range.
        if "norm" in name and name.endswith("weight"):
            tensor.data.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=generator))
        else:
            tensor.data.copy_(0.2 * torch.randn(tensor.shape, generator=generator))
    if tiny.tie_embeddings:
        model.tie_weights()
    return model


def write_tiny(root: Path, tiny: TinyConfig = TinyConfig()) -> dict[str, Path]:
    """Writes the tiny model's folders under root; returns {"hf"?, "original", "clip"}."""
    root = Path(root)
    model = build_tiny_model(tiny)
    folders = {"original": root / "original", "clip": root / "clip"}
    write_clip_tower(model, folders["clip"], tiny.preprocess)
    write_original(
        model,
        folders["original"],
        str(folders["clip"].resolve()),
        tiny.projector,
        tiny.aspect,
        tiny.weights,
        tiny.shards,
    )
    build_tiny_tokenizer(folders["original"], vocab_size=TOKENIZER_VOCAB)
    if tiny.projector == "mlp2x_gelu":
        folders["hf"] = root / "hf"
        write_hf(model, folders["hf"], tiny)
    return folders


def write_hf(model, folder: Path, tiny: TinyConfig) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    build_tiny_tokenizer(folder, vocab_size=TOKENIZER_VOCAB)
    if tiny.anyres is None:
        write_processor_config(folder, tiny.preprocess, "LlavaImageProcessor")
    else:
        write_processor_config(folder, tiny.preprocess, "LlavaNextImageProcessor", tiny.anyres)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m exporter.testing.tiny",
        description="Write a tiny random LLaVA (hf, original, clip folders).",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--anyres",
        action="store_true",
        help="a LLaVA-1.6 (LlavaNext) with the default pinpoints at its 32-pixel tile",
    )
    args = parser.parse_args(argv)
    tiny = TinyConfig(anyres=TINY_PINPOINTS, max_positions=640) if args.anyres else TinyConfig()
    for name, folder in write_tiny(args.out, tiny).items():
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
