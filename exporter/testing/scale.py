"""Full-size random checkpoints for the scale checks (not a test: a command you run by hand).

    python -m exporter.testing.scale checkpoint --out /tmp/llava7b --text-layers 32 [--format original]
    python -m exporter.testing.scale checkpoint --out /tmp/llava16-7b --text-layers 2 --anyres
    python -m exporter.testing.scale lora --base /tmp/llava7b-orig --out /tmp/llava7b-lora [--r 128 --alpha 256]
    python -m exporter.testing.scale measure -- llava-export decoder --model /tmp/llava7b --out /tmp/a --fp16 --no-verify

`checkpoint` writes a LLaVA-1.5-7B-shaped Hugging Face folder (CLIP ViT-L/14-336, 24 layers,
mlp2x_gelu to 4096; a Vicuna-7B-shaped decoder of `--text-layers` layers, vocab 32064) with
random weights, float16 like the published checkpoint, one tensor at a time so that memory
stays near the model's own size. `--anyres` writes a LLaVA-1.6-7B-shaped one instead
(llava-hf/llava-v1.6-vicuna-7b-hf's: LlavaNextForConditionalGeneration, the same tower and
decoder, DEFAULT_PINPOINTS, a random image_newline, a LlavaNextImageProcessor), HF layout
only. Its tokenizer is the tiny test one (exporter.testing.tiny_tokenizer) with a placeholder
piece for every other id of the model's vocabulary (`▁w320` ... `▁w32063`, decoded " w320"
...): text tokenizes as with the tiny one alone, and whatever ids a random model
generates decode to text, so an export of it can be served and streamed. `--format original`
writes the same model in the original LLaVA layout (exporter.testing.original_format), its CLIP
tower beside OUT in OUT-clip. `lora` writes an original-repo LoRA folder for such a base:
random lora_A / lora_B on every linear layer of the decoder (LLaVA's find_all_linear_names)
and a random projector in non_lora_trainables.bin. `measure` runs a command and prints its
wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from exporter.adapters import ADAPTER_CONFIG, NON_LORA_FILE
from exporter.source import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PEFT_PREFIX,
    build_empty_model,
    projector_depth,
)
from exporter.testing.original_format import write_clip_tower, write_original, write_processor_config
from exporter.testing.tiny_tokenizer import build_tiny_tokenizer
from runtime.contract import TOKENIZER_FILE, PreprocessSpec

CLIP_L_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}


def vicuna_7b(layers: int) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
    }


# LLaVA's find_all_linear_names on LlavaLlamaForCausalLM: every Linear of the decoder layers
# (the projector, the tower and lm_head left out), by the name of its module in a layer
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARD_BYTES = 2 * 10**9  # the shard size of the published checkpoints


# LLaVA-1.6's grid pinpoints, (height, width) in pixels (llava-hf/llava-v1.6-*-hf's
# image_grid_pinpoints): 1x2, 2x1, 2x2, 3x1 and 1x3 tiles of 336
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def llava_7b(text_layers: int):
    from transformers import LlavaConfig

    return LlavaConfig(vision_config=CLIP_L_336, text_config=vicuna_7b(text_layers), image_token_index=32000)


def llava_next_7b(text_layers: int, pinpoints: list[list[int]] = DEFAULT_PINPOINTS):
    """LLaVA-1.6-7B's (llava-v1.6-vicuna-7b-hf) config: LLaVA-1.5-7B's tower, projector and
    decoder, tiled at `pinpoints` ((height, width) pairs)."""
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        vision_config=CLIP_L_336,
        text_config=vicuna_7b(text_layers),
        image_token_index=32000,
        image_grid_pinpoints=[list(point) for point in pinpoints],
    )


def write_checkpoint(
    out: Path, text_layers: int, seed: int = 0, layout: str = "hf", anyres: bool = False
) -> None:
    """The random LLaVA-1.5-7B-shaped model (LLaVA-1.6-7B-shaped with `anyres`) with
    `text_layers` decoder layers, in `layout` ("hf" or "original"; "hf" only with `anyres`)."""
    if anyres and layout != "hf":
        raise ValueError("the LLaVA-1.6-shaped checkpoint is written in the HF layout only")
    model = random_model((llava_next_7b if anyres else llava_7b)(text_layers), seed)
    if layout == "original":
        save_original(model, out)
    else:
        save_hf(model, out)


def random_model(config, seed: int = 0) -> nn.Module:
    """`config`'s LlavaForConditionalGeneration (LlavaNextForConditionalGeneration for a
    LlavaNextConfig, its image_newline random too) in float16: norm weights 1, everything else
    N(0, 0.02), filled tensor by tensor (a float32 temporary of one tensor at a time)."""
    model = build_empty_model(config, depth=2, dtype=torch.float16)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.endswith(("inv_freq", "position_ids")):
            continue
        # small random values in place, tensor by tensor: no second copy of the model
        fill = torch.empty(tensor.shape, dtype=torch.float32)
        if "norm" in name and name.endswith("weight"):
            fill.fill_(1.0)
        else:
            fill.normal_(0, 0.02, generator=generator)
        tensor.data.copy_(fill)
        del fill
    return model


def save_hf(model: nn.Module, out: Path) -> None:
    """OUT in the Hugging Face layout: the weights in ~2 GB shards, the image processor (a
    LlavaNextImageProcessor at the model's pinpoints for a LlavaNext model), the tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="2GB")
    if model.config.model_type == "llava_next":
        pinpoints = model.config.image_grid_pinpoints
        write_processor_config(out, preprocess_of(model), "LlavaNextImageProcessor", pinpoints)
    else:
        write_processor_config(out, preprocess_of(model), "LlavaImageProcessor")
    write_tokenizer(out, model.config.text_config.vocab_size)


def save_original(model: nn.Module, out: Path) -> Path:
    """OUT in the original layout (config.json with mm_* fields; `model.layers...`,
    `model.mm_projector...`, `lm_head` in float16 shards of ~SHARD_BYTES) and the CLIP tower
    in OUT-clip beside it, which mm_vision_tower names relative to OUT ("../OUT-clip", as
    LLaVA's loader finds it from OUT or from a LoRA folder's copy of the config). Returns
    the tower's folder."""
    tower = out.parent / f"{out.name}-clip"
    write_clip_tower(model, tower, preprocess_of(model))
    size = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    shards = math.ceil(size / SHARD_BYTES)
    write_original(model, out, f"../{tower.name}", "mlp2x_gelu", "pad", shards=shards)
    write_tokenizer(out, model.config.text_config.vocab_size)
    return tower


def preprocess_of(model: nn.Module) -> PreprocessSpec:
    """LLaVA-1.5's: CLIP's normalization, images padded to square and resized to the tower's size
    (a LlavaNextImageProcessor's tiles are the tower's size; its padding is its own)."""
    size = model.config.vision_config.image_size
    return PreprocessSpec(
        shortest_edge=size, crop_size=size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, aspect="pad"
    )


def write_lora(base: Path, out: Path, r: int = 128, alpha: int = 256, seed: int = 0) -> None:
    """An original-repo LoRA folder (LLaVA's `--lora_enable` output, r and alpha as in its
    finetune_lora.sh) for the original-format LLaVA `base`: config.json (the base's),
    adapter_config.json, adapter_model.safetensors with float16 lora_A [r, in] ~ N(0, 0.02)
    and lora_B [out, r] ~ N(0, 1e-3) on every LORA_TARGETS module of every layer (small: at
    r = 128, alpha = 256 the merge moves a weight of ~0.02 by ~5e-4, finite in float16), and
    non_lora_trainables.bin with a random projector. ~0.6 GB at r = 128 on the 7B shape,
    held whole while it is written."""
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (out_features, in_features) in linear_shapes(config).items():
            key = f"{PEFT_PREFIX}model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = random_half((r, in_features), 0.02, generator)
            tensors[f"{key}.lora_B.weight"] = random_half((out_features, r), 1e-3, generator)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(base, r, alpha), indent=2) + "\n")
    depth = projector_depth(config.get("mm_projector_type", "linear"), base)
    torch.save(random_projector(config, depth, generator), out / NON_LORA_FILE)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each LORA_TARGETS Linear of one decoder layer, by its name in the layer,
    from a Llama-family config.json."""
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_width = (config.get("num_key_value_heads") or heads) * head_dim
    return {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv_width, hidden),
        "self_attn.v_proj": (kv_width, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }


def random_half(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(shape).normal_(0, std, generator=generator).half()


def random_projector(config: dict, depth: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A projector of `depth` Linear layers for `config` under non_lora_trainables' names:
    `base_model.model.model.mm_projector.{0,2,...}.{weight,bias}`, float16 ~ N(0, 0.02)."""
    hidden = config["hidden_size"]
    state = {}
    for layer in range(depth):
        in_features = config["mm_hidden_size"] if layer == 0 else hidden
        key = f"{PEFT_PREFIX}model.mm_projector.{2 * layer}"
        state[f"{key}.weight"] = random_half((hidden, in_features), 0.02, generator)
        state[f"{key}.bias"] = random_half((hidden,), 0.02, generator)
    return state


def adapter_config(base: Path, r: int, alpha: int) -> dict:
    """adapter_config.json as PEFT's LoraConfig saves it for LLaVA's training (dropout 0.05)."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": str(base),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(LORA_TARGETS),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """The tiny tokenizer (a stand-in: the scale checks are about the graphs), one piece per id
    of the model's `vocab_size` ids."""
    build_tiny_tokenizer(out)
    cover_vocabulary(out / TOKENIZER_FILE, vocab_size)


def cover_vocabulary(path: Path, vocab_size: int) -> None:
    """Adds a placeholder piece `▁w<id>` to the BPE vocabulary of tokenizer.json `path` for each
    id it lacks below `vocab_size`. No merge leads to them, so encoding is unchanged; decoding
    an id gives " w<id>" where it gave nothing before."""
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    first = max(vocab.values()) + 1
    for token_id in range(first, vocab_size):
        piece = f"\u2581w{token_id}"
        if piece in vocab:
            raise ValueError(f"{path}: the placeholder {piece!r} is already a piece")
        vocab[piece] = token_id
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def measure(command: list[str]) -> int:
    """Runs `command`, then prints wall seconds and the peak RSS of the child processes."""
    start = time.perf_counter()
    code = subprocess.call(command)
    wall = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    print(
        json.dumps(
            {
                "command": " ".join(command),
                "exit": code,
                "wall_s": round(wall, 1),
                "peak_rss_gib": round(peak_gb, 2),
            }
        )
    )
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exporter.testing.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True)
    make = sub.add_parser("checkpoint", help="write a random LLaVA-1.5-7B-shaped checkpoint")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--text-layers", type=int, default=32)
    make.add_argument("--format", choices=("hf", "original"), default="hf")
    make.add_argument(
        "--anyres",
        action="store_true",
        help="LLaVA-1.6-7B-shaped instead (LlavaNext, the default pinpoints; --format hf only)",
    )
    lora = sub.add_parser("lora", help="write a random original-repo LoRA folder for an original-format BASE")
    lora.add_argument("--base", type=Path, required=True)
    lora.add_argument("--out", type=Path, required=True)
    lora.add_argument("--r", type=int, default=128)
    lora.add_argument("--alpha", type=int, default=256)
    lora.add_argument("--seed", type=int, default=0)
    run = sub.add_parser("measure", help="run a command; print wall time and peak RSS")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.action == "checkpoint":
        if args.anyres and args.format != "hf":
            parser.error("--anyres writes the HF layout only (--format hf)")
        write_checkpoint(args.out, args.text_layers, layout=args.format, anyres=args.anyres)
        return 0
    if args.action == "lora":
        write_lora(args.base, args.out, args.r, args.alpha, args.seed)
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return measure(command)


if __name__ == "__main__":
    sys.exit(main())
