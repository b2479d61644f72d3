"""What LLaVA training writes, loaded onto the model it was trained on (`--model-base`).

Three kinds of training output, told apart by their files, never by the folder's name:
  - an original-repo LoRA folder (`--lora_enable`): config.json with the mm_* fields, the PEFT
    adapter of LlavaLlamaForCausalLM (`base_model.model.model.layers.N...`), and
    non_lora_trainables.bin (the projector and any other weights trained in full);
    BASE: the original-format LLaVA or the language model it was trained on;
  - a PEFT adapter of a Hugging Face LlavaForConditionalGeneration (no mm_* config.json),
    in either key layout transformers has used; BASE: that model, in HF format;
  - a projector-only checkpoint (stage-1 pretraining, `--tune_mm_mlp_adapter`): config.json
    and mm_projector.bin; BASE: the language model.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or
`adapter_model.bin`, from older PEFT versions). Its tensors are named after the modules of the
model it was trained on, behind PEFT's wrapper prefix:

    base_model.model.<module>.lora_A.weight   [r, in]
    base_model.model.<module>.lora_B.weight   [out, r]
    base_model.model.<parameter>              a module trained in full (`modules_to_save`)

The merge is PEFT's: W + scale * B @ A, with scale = alpha / r (alpha / sqrt(r) for rsLoRA;
`rank_pattern` and `alpha_pattern` override r and alpha per module). It runs module by module
in the model's own dtype: each product is formed in float32 and the merged weight rounded once,
so a 7B model is never held in float32. Which of the reference's parameters a module name
means depends on the layout the adapter was trained in; the caller passes that mapping.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from exporter.source import (
    PEFT_PREFIX,
    SUPPORTED_FAMILIES,
    ZERO3_HINT,
    LlavaSource,
    SourceInput,
    detect_format,
    iter_checkpoint,
    load_hf,
    load_original,
    original_names,
    read_json,
    tokenizer_folder,
    weight_files,
)
from runtime.errors import SourceError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_FILE = "non_lora_trainables.bin"
PROJECTOR_FILE = "mm_projector.bin"
LORA_SUFFIX = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# kind -> what it is, in words
TRAINING_OUTPUTS = {
    "lora": "a LoRA adapter folder",
    "projector": "a projector-only checkpoint (mm_projector.bin)",
}
# Hugging Face LlavaForConditionalGeneration's names before transformers 4.52 -> since then
HF_OLD_LAYOUT = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
CLIP_WRAPPER = "model.vision_tower.vision_model."  # transformers 5's CLIPVisionModel drops it


@dataclass
class LoraAdapter:
    """One adapter's tensors by module (keys without PEFT's prefix) and the numbers that scale them."""

    folder: Path
    file: Path
    config: dict
    lora_a: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> [r, in]
    lora_b: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> [out, r]
    full: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter -> tensor (modules_to_save)

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", self.r))

    @property
    def rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def scale(self, module: str) -> float:
        """PEFT's scaling for `module`: its own r and alpha where the patterns name it."""
        r = pattern_value(self.config.get("rank_pattern") or {}, module, self.r)
        alpha = pattern_value(self.config.get("alpha_pattern") or {}, module, self.alpha)
        return alpha / r**0.5 if self.rslora else alpha / r

    def files(self) -> list[Path]:
        """What the merge read: the config (it holds alpha) and the tensors."""
        return [self.folder / ADAPTER_CONFIG, self.file]

    def describe(self) -> dict:
        """The manifest's account of the adapter (its sha256 is added by the source)."""
        return {"path": str(self.folder), "r": self.r, "alpha": self.alpha, "rslora": self.rslora}


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name's tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_file(folder: Path) -> Path | None:
    return next((folder / name for name in ADAPTER_FILES if (folder / name).is_file()), None)


def checkpoint_kind(folder: Path) -> str:
    """ "lora", "projector" or "model" (a whole model), by the files in `folder`."""
    if (folder / ADAPTER_CONFIG).is_file():
        return "lora"
    stray = adapter_file(folder)
    if stray is not None:
        raise SourceError(
            f"{folder} has {stray.name} but no {ADAPTER_CONFIG}: copy it from the training output"
        )
    if (folder / PROJECTOR_FILE).is_file() and not has_weights(folder):
        return "projector"
    return "model"


def has_weights(folder: Path) -> bool:
    return bool(weight_files(folder)) or any(folder.glob("*.index.json"))


def load_training_output(
    kind: str, folder: Path, base: Path, vision_tower: str | None, dtype: torch.dtype
) -> LlavaSource:
    """`folder` (a TRAINING_OUTPUTS kind) on `base`, merged, as one source."""
    base_config = read_json(base / "config.json", what="base model config (--model-base)")
    base_format = base_kind(base_config, base)
    if kind == "projector":
        return load_projector_only(folder, base, base_config, vision_tower, dtype)
    adapter = read_adapter(folder)
    if base_format == "hf":
        source = load_hf(base, base_config, dtype)
        source.tokenizer_dir = tokenizer_folder(folder, base)
        parameter_of, trained = hf_name, []
    else:
        config = original_config(folder, base, base_config, base_format)
        trained = [folder / NON_LORA_FILE] if (folder / NON_LORA_FILE).is_file() else []
        source = load_original(folder, config, vision_tower, dtype, base=base, trained=trained)
        parameter_of = original_names(source.model, trained=True)
    merge_adapter(source.model, adapter, parameter_of, base)
    adapter_input = SourceInput(
        "adapter",
        folder,
        adapter.files() + trained,
        {**adapter.describe(), "format": adapter_layout(base_format)},
    )
    return assembled(source, folder, base, base_format, adapter_input)


def load_projector_only(
    folder: Path, base: Path, base_config: dict, vision_tower: str | None, dtype: torch.dtype
) -> LlavaSource:
    """Stage-1 output: its config.json (the whole LLaVA's) and projector on the base's decoder."""
    base_format = base_kind(base_config, base)
    if base_format == "hf":
        raise SourceError(
            f"{folder} is {TRAINING_OUTPUTS['projector']}: its --model-base is the language model it was "
            f"trained on (e.g. a Vicuna folder), not the Hugging Face LLaVA {base}"
        )
    config = original_config(folder, base, base_config, base_format)
    trained = [folder / PROJECTOR_FILE]
    source = load_original(folder, config, vision_tower, dtype, base=base, trained=trained)
    return assembled(source, folder, base, base_format, SourceInput("projector", folder, trained))


def assembled(
    source: LlavaSource, folder: Path, base: Path, base_format: str, trained: SourceInput
) -> LlavaSource:
    """`source` named after the training output, with its inputs for the manifest."""
    source.path = folder
    if not source.inputs:  # an HF base holds its own tower
        source.inputs = [SourceInput("base", base, weight_files(base))]
    source.inputs[0].details["format"] = base_format
    source.inputs.insert(1, trained)
    return source


def base_kind(config: dict, base: Path) -> str:
    """ "hf" or "original" (a LLaVA), or "text" (a language model: Vicuna, Llama, ...)."""
    if config.get("model_type") in SUPPORTED_FAMILIES and "mm_vision_tower" not in config:
        return "text"
    return detect_format(config, base)


def original_config(folder: Path, base: Path, base_config: dict, base_format: str) -> dict:
    """The config the model is built from: the training output's own config.json (LLaVA's
    loader uses it), else the base's when the base is a LLaVA."""
    path = folder / "config.json"
    if path.is_file():
        config = read_json(path, what="model config")
        if "mm_vision_tower" in config or "mm_projector_type" in config:
            return config
    if base_format == "original":
        return base_config
    raise SourceError(
        f"{folder} has no config.json with LLaVA's mm_* fields, and the base {base} is a language model: "
        "copy config.json from the training output's folder"
    )


def hf_name(key: str) -> str:
    """A Hugging Face LLaVA's parameter name, in any layout transformers has used, as
    transformers 5 names it."""
    for old, new in HF_OLD_LAYOUT:
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    if key.startswith(CLIP_WRAPPER):
        key = "model.vision_tower." + key[len(CLIP_WRAPPER) :]
    return key


def adapter_layout(base_format: str) -> str:
    return "peft-hf-llava" if base_format == "hf" else "llava-original"


def read_adapter(folder: Path) -> LoraAdapter:
    """The adapter in `folder`; raises SourceError for what cannot be merged as LoRA."""
    config = read_json(folder / ADAPTER_CONFIG, "adapter config")
    check_adapter_config(config, folder)
    file = adapter_file(folder)
    if file is None:
        raise SourceError(f"{folder} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_FILES)}")
    adapter = LoraAdapter(folder=folder, file=file, config=config)
    for key, tensor in iter_checkpoint(file):
        name = key.removeprefix(PEFT_PREFIX)
        if tensor.numel() == 0:
            raise SourceError(f"{file}: {key} is empty: the adapter was {ZERO3_HINT}")
        lora = LORA_SUFFIX.match(name)
        if lora:
            parts = adapter.lora_a if lora["part"] == "A" else adapter.lora_b
            parts[lora["module"]] = tensor
        elif ".lora_" in name or "trainable_tokens" in name:
            raise SourceError(
                f"{file}: tensor {key} is not one this merge knows (LoRA on linear layers only)"
            )
        else:
            adapter.full[name] = tensor
    unpaired = sorted(set(adapter.lora_a) ^ set(adapter.lora_b))
    if unpaired:
        raise SourceError(f"{file}: module {unpaired[0]} has only one of lora_A and lora_B")
    if not adapter.lora_a and not adapter.full:
        raise SourceError(f"{file} holds no LoRA tensors (lora_A / lora_B)")
    return adapter


def check_adapter_config(config: dict, folder: Path) -> None:
    """Plain LoRA only: other PEFT methods and LoRA variants change what merging means."""
    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA":
        raise SourceError(
            f"{folder}: adapter type {kind or 'unknown'} is not supported (LoRA only: peft_type LORA)"
        )
    if config.get("use_dora"):
        raise SourceError(f"{folder}: DoRA adapters (use_dora) are not supported (plain LoRA only)")
    for option, meaning in (
        ("fan_in_fan_out", "Conv1D layers"),
        ("lora_bias", "a trained lora_B bias"),
    ):
        if config.get(option):
            raise SourceError(f"{folder}: {option} ({meaning}) is not supported in Llama-family LoRA")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise SourceError(f"{folder}/{ADAPTER_CONFIG}: r must be a positive integer, got {config.get('r')!r}")


def merge_adapter(
    model: nn.Module, adapter: LoraAdapter, parameter_of: Callable[[str], str | None], base: Path
) -> None:
    """Merges `adapter` into `model` in place. `parameter_of(name)` maps a parameter name of
    the model the adapter was trained on (`<module>.weight`) to the reference's, None for one
    that has no place in it. An adapter naming modules the base lacks is refused, not skipped."""
    params = dict(model.named_parameters())
    targets = {module: parameter_of(module + ".weight") for module in adapter.lora_a}
    targets.update({name: parameter_of(name) for name in adapter.full})
    unmatched = sorted(name for name, target in targets.items() if target not in params)
    if unmatched:
        matched = len(targets) - len(unmatched)
        raise SourceError(
            f"{adapter.file}: {len(unmatched)} of {len(targets)} adapted modules match no module of the "
            f"base {base} (e.g. {unmatched[0]}; {matched} matched): is it the model the adapter was trained on?"
        )
    with torch.no_grad():
        for module, lora_a in adapter.lora_a.items():
            merge_one(params[targets[module]], lora_a, adapter.lora_b[module], adapter.scale(module), module)
        for name, tensor in adapter.full.items():
            weight = params[targets[name]]
            check_shape(weight, tensor, name, adapter.file)
            weight.copy_(tensor)


def merge_one(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, module: str):
    """weight [out, in] += scale * B [out, r] @ A [r, in], rounded once to weight's dtype."""
    out_features, in_features = weight.shape
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
        raise SourceError(
            f"adapter module {module}: lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} do not pair"
        )
    if lora_a.shape[1] != in_features or lora_b.shape[0] != out_features:
        raise SourceError(
            f"adapter module {module}: lora_B @ lora_A is {lora_b.shape[0]} x {lora_a.shape[1]}, the base's "
            f"weight is {out_features} x {in_features}: the base is not the model the adapter was trained on"
        )
    delta = lora_b.float() @ lora_a.float()
    weight.copy_(weight.float().add_(delta, alpha=scale))


def check_shape(weight: torch.Tensor, tensor: torch.Tensor, name: str, file: Path) -> None:
    if tuple(weight.shape) != tuple(tensor.shape):
        raise SourceError(
            f"{file}: {name} has shape {tuple(tensor.shape)}, the base's is {tuple(weight.shape)}: "
            "the base is not the model the adapter was trained on"
        )
