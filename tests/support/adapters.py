"""Training outputs of the tiny model, written by PEFT itself, and PEFT's merge of each.

Every adapter here is made by `peft.get_peft_model(...).save_pretrained(...)` with random
lora_A and lora_B (`init_lora_weights=False`: PEFT's default B = 0 would merge to nothing),
in the layout its kind has in the wild; its reference is PEFT's own
`PeftModel.from_pretrained(base, folder).merge_and_unload()`, independent of exporter/adapters.py.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# the same in a LlavaForConditionalGeneration, whose CLIP tower has q_proj, k_proj, v_proj too
LLAVA_DECODER_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_NAMES = {"0": "linear_1", "2": "linear_2"}  # LLaVA's Sequential -> transformers'


def text_model(llava) -> torch.nn.Module:
    """A LlamaForCausalLM holding `llava`'s decoder: the module names (`model.layers.N...`,
    `lm_head`) of LLaVA's LlavaLlamaForCausalLM, which original-repo adapters are keyed by."""
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(llava.config.text_config)
    llama.model.load_state_dict(llava.model.language_model.state_dict())
    llama.lm_head.load_state_dict(llava.lm_head.state_dict())
    return llama.eval()


def lora_config(target, r: int = 4, alpha: float = 8, **options):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=target, init_lora_weights=False, **options)


def random_projector(llava, seed: int) -> dict[str, torch.Tensor]:
    """Projector weights under LLaVA's names (`model.mm_projector.0.weight` ...), fresh."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, name in PROJECTOR_NAMES.items():
        layer = getattr(llava.model.multi_modal_projector, name)
        for part in ("weight", "bias"):
            shape = getattr(layer, part).shape
            state[f"model.mm_projector.{index}.{part}"] = torch.randn(shape, generator=generator) * 0.05
    return state


def llava_config_json(original: Path, tower: Path) -> dict:
    """The original folder's config.json with mm_vision_tower an absolute path (training writes
    the tower it was given)."""
    config = json.loads((original / "config.json").read_text())
    config["mm_vision_tower"] = str(tower.resolve())
    return config


def write_original_lora(
    folders: dict[str, Path], llava, out: Path, weights: str = "safetensors", seed: int = 0, **options
) -> Path:
    """An original-repo LoRA folder (LLaVA's `--lora_enable` output) for the tiny model:
    config.json, PEFT's adapter of the decoder's linear layers, non_lora_trainables.bin."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(text_model(llava), lora_config(LLAMA_LINEAR, **options))
    peft_model.save_pretrained(out, safe_serialization=weights == "safetensors")
    config = llava_config_json(folders["original"], folders["clip"])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    projector = random_projector(llava, seed + 1)
    torch.save({"base_model.model." + k: v for k, v in projector.items()}, out / "non_lora_trainables.bin")
    return out


def original_lora_reference(llava, folder: Path) -> torch.nn.Module:
    """PEFT's merge of an original-repo LoRA folder, and its projector, into a copy of `llava`."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(text_model(llava), folder).merge_and_unload()
    reference = copy.deepcopy(llava)
    reference.model.language_model.load_state_dict(merged.model.state_dict())
    reference.lm_head.load_state_dict(merged.lm_head.state_dict())
    trained = torch.load(folder / "non_lora_trainables.bin", weights_only=True)
    load_projector(reference, {k.removeprefix("base_model.model."): v for k, v in trained.items()})
    return reference


def load_projector(llava, state: dict[str, torch.Tensor]) -> None:
    for key, tensor in state.items():
        index, part = key.removeprefix("model.mm_projector.").split(".")
        getattr(getattr(llava.model.multi_modal_projector, PROJECTOR_NAMES[index]), part).data.copy_(tensor)


def write_hf_lora(base: Path, out: Path, target, layout: str = "new", seed: int = 0) -> Path:
    """A PEFT adapter of the Hugging Face LlavaForConditionalGeneration in `base`, in the key
    layout PEFT writes under transformers 5 ("new") or the one before transformers 4.52 ("old":
    `base_model.model.language_model.model.layers...`)."""
    from peft import get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration.from_pretrained(base)
    get_peft_model(model, lora_config(target)).save_pretrained(out)
    if layout == "old":
        file = str(out / "adapter_model.safetensors")
        renamed = {old_hf_key(key): tensor for key, tensor in load_file(file).items()}
        save_file(renamed, file, metadata={"format": "pt"})
    return out


def old_hf_key(key: str) -> str:
    return key.replace("base_model.model.model.language_model.", "base_model.model.language_model.model.")


def hf_lora_reference(base: Path, folder: Path) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(base)
    return PeftModel.from_pretrained(model, folder).merge_and_unload().eval()


def write_language_model(llava, folders: dict[str, Path], out: Path) -> Path:
    """The language model alone (a Vicuna-like LlamaForCausalLM folder with the tokenizer):
    the base of a projector-only checkpoint."""
    text_model(llava).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folders["original"] / name, out / name)
    return out


def write_projector_only(
    folders: dict[str, Path], llava, out: Path, seed: int = 5
) -> dict[str, torch.Tensor]:
    """Stage-1 output: config.json and mm_projector.bin. Returns the projector written."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(llava_config_json(folders["original"], folders["clip"])))
    projector = random_projector(llava, seed)
    torch.save(projector, out / "mm_projector.bin")
    return projector
