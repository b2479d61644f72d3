"""Writing a reference model in the original LLaVA repo's checkpoint layout.

The inverse of exporter/source.py's original-format loader: used to make the original-format
twin of a Hugging Face model (the tiny fixtures, the trained toy model), so that both
loaders are exercised on identical weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from exporter.source import MLP2X_NAMES

# The original repo's tower: LlavaMetaModel.vision_tower (CLIPVisionTower) .vision_tower (CLIPVisionModel)
ORIGINAL_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."


def write_clip_tower(model: nn.Module, folder: Path, preprocess) -> None:
    """The separate CLIP checkpoint that `mm_vision_tower` names: CLIPVisionModel + processor."""
    from transformers import CLIPVisionModel

    folder.mkdir(parents=True, exist_ok=True)
    tower = model.model.vision_tower
    clip = CLIPVisionModel(tower.config)
    clip.load_state_dict(tower.state_dict())
    clip.save_pretrained(folder)
    write_processor_config(folder, preprocess, "CLIPImageProcessor")


def write_processor_config(folder: Path, preprocess, processor_class: str, grid_pinpoints=None) -> None:
    """preprocessor_config.json for CLIPImageProcessor, LlavaImageProcessor (which pads) or
    LlavaNextImageProcessor (which tiles at `grid_pinpoints`, (height, width) pairs; its do_pad
    pads a batch's tile counts)."""
    processor = {
        "image_processor_type": processor_class,
        "do_resize": True,
        "size": {"shortest_edge": preprocess.shortest_edge},
        "do_center_crop": True,
        "crop_size": {"height": preprocess.crop_size, "width": preprocess.crop_size},
        "do_rescale": True,
        "rescale_factor": preprocess.rescale_factor,
        "do_normalize": True,
        "image_mean": preprocess.mean,
        "image_std": preprocess.std,
        "do_convert_rgb": True,
        "resample": 3,  # bicubic
    }
    if processor_class == "LlavaImageProcessor":
        processor["do_pad"] = preprocess.aspect == "pad"
    if processor_class == "LlavaNextImageProcessor":
        processor.update(do_pad=True, image_grid_pinpoints=[list(point) for point in grid_pinpoints])
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def original_state_dict(model: nn.Module, tower: bool = False) -> dict[str, torch.Tensor]:
    """The reference's decoder + projector weights (LLaVA-1.6's image_newline; the tower's too
    with `tower`, as a checkpoint whose tower was fine-tuned holds it) under original-format
    names (the model's own tensors, not copies: write_original copies one shard at a time)."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.vision_tower.") and tower:
            state[ORIGINAL_TOWER_PREFIX + name[len("model.vision_tower.") :]] = tensor
        elif name == "model.image_newline":
            state[name] = tensor
        elif name.startswith("model.language_model."):
            state["model." + name[len("model.language_model.") :]] = tensor
        elif name.startswith("model.multi_modal_projector."):
            suffix = name[len("model.multi_modal_projector.") :]
            for index, named in MLP2X_NAMES.items():
                if suffix.startswith(named):
                    suffix = index + suffix[len(named) :]
            state["model.mm_projector." + suffix] = tensor
        elif name == "lm_head.weight" and not model.config.tie_word_embeddings:
            state[name] = tensor
    return state


def original_config(model: nn.Module, tower: str, projector: str, aspect: str) -> dict:
    """config.json as the original repo writes it: the text config plus mm_* fields (a
    LlavaNext model's: LLaVA-1.6's, whatever `aspect`)."""
    config = model.config
    text = config.text_config.to_dict()
    family = text["model_type"]
    text.update(
        {
            "architectures": [
                "LlavaLlamaForCausalLM" if family == "llama" else f"Llava{family.title()}ForCausalLM"
            ],
            "model_type": {"llama": "llava_llama", "mistral": "llava_mistral", "qwen2": "llava_qwen"}[family],
            "mm_vision_tower": tower,
            "mm_projector_type": projector,
            "mm_hidden_size": config.vision_config.hidden_size,
            "mm_vision_select_layer": config.vision_feature_layer,
            "mm_vision_select_feature": "patch"
            if config.vision_feature_select_strategy == "default"
            else "cls_patch",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "image_aspect_ratio": aspect,
            "tie_word_embeddings": bool(config.tie_word_embeddings),
        }
    )
    if config.model_type == "llava_next":
        text.update(anyres_fields(config))
    return text


def anyres_fields(config) -> dict:
    """LLaVA-1.6's fields: its pinpoints in the original repo's (width, height) order, the
    spatial_unpad merge (with model.image_newline) and the tower fine-tuned with the model."""
    return {
        "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": [[width, height] for height, width in config.image_grid_pinpoints],
        "mm_patch_merge_type": "spatial_unpad",
        "unfreeze_mm_vision_tower": True,
    }


def write_original(
    model: nn.Module,
    folder: Path,
    tower: str,
    projector: str,
    aspect: str,
    weights: str = "safetensors",
    shards: int = 1,
) -> None:
    """Writes config.json and weights (`safetensors` or `bin`, in `shards` files with an index
    when more than one), as the original repo and its LoRA merge script do. Peak memory: the
    model plus one shard's copy (a 7B model is written in shards of ~2 GB)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = original_config(model, tower, projector, aspect)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = original_state_dict(model, tower=config.get("unfreeze_mm_vision_tower", False))
    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)]
    suffix = "safetensors" if weights == "safetensors" else "bin"
    stem = "model" if weights == "safetensors" else "pytorch_model"
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file = f"{stem}.{suffix}" if shards == 1 else f"{stem}-{number:05d}-of-{shards:05d}.{suffix}"
        save_shard({name: state[name].contiguous().clone() for name in group}, folder / file, weights)
        weight_map.update({name: file for name in group})
    if shards > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_shard(part: dict[str, torch.Tensor], path: Path, weights: str) -> None:
    """One shard's file; `part` (its copy) is dropped on return, before the next is made."""
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file(part, str(path), metadata={"format": "pt"})
    else:
        torch.save(part, path)
