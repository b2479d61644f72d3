"""LLaVA's LoRA fine-tune, as the handbook runs it on Wukong's Chinese captions, on the toy model.

    python -m exporter.toy.lora data --out out/toy-zh [--images N] [--seed S] [--split train]
    python -m exporter.toy.lora train --model-base models/toy-llava-original \\
        --data-path out/toy-zh/toy_zh_captions.json --image-folder out/toy-zh --out models/toy-llava-lora-zh

`data` writes the handbook's layout: a JSON list of {"id", "image" (relative to the image
folder), "conversations": [{"from": "human", "value": "<image>\\n为该图片生成标注。"},
{"from": "gpt", "value": caption}]}, captions from data.caption_zh, and the PNGs under images/.

`train` reads that JSON and its images as LLaVA's train.py does (image = image folder / "image";
the human turn's <image> goes in front, vicuna_v1 prompts, loss on the answers and their </s>),
puts PEFT LoRA on the decoder's linear layers and lm_head, trains the projector in full (LLaVA
sets its requires_grad after get_peft_model) and keeps the vision tower frozen. It writes
LLaVA's LoRA output folder (what its load_pretrained_model and merge script read):
    config.json                the base's original-format config, mm_vision_tower relative to OUT
    adapter_config.json        PEFT's LoraConfig, target_modules as names of a plain Llama
    adapter_model.safetensors  base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, ...
                               base_model.model.lm_head.lora_{A,B}.weight
    non_lora_trainables.bin    base_model.model.model.mm_projector.{0,2}.{weight,bias}
    training.json              the command, the settings, the time and the held-out accuracy
Tensors are float16. Deterministic for a given --seed, --steps and thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from exporter.source import MLP2X_NAMES, PEFT_PREFIX, load_source
from exporter.toy import data
from exporter.toy.evaluate import pixel_values, reference_answer
from exporter.toy.train import (
    Batches,
    check_answer_tokens,
    collate,
    conversation_sequence,
    loss_and_hits,
    optimize,
    prompt_format,
)
from runtime.contract import TOKENIZER_FILE
from runtime.prompts import IMAGE_PLACEHOLDER

INSTRUCTION = "为该图片生成标注。"  # "generate a caption for this image", the handbook's
DATA_FILE = "toy_zh_captions.json"
IMAGE_DIR = "images"
# LLaVA's find_all_linear_names on a Llama decoder (it skips the tower, the projector, lm_head)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LM_HEAD = "lm_head"
# Where the decoder's layers sit in LlavaForConditionalGeneration, and in LLaVA's LlavaLlamaForCausalLM
HF_LAYERS, LLAVA_LAYERS = "model.language_model.layers.", "model.layers."
OUTPUT_FILES = ("config.json", "adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin")
SAVE_DTYPE = torch.float16
MAX_NEW_TOKENS = 128  # the longest caption is 88 tokens: "▁", then 29 characters of 3 bytes


# ---------------------------------------------------------------------------------------------
# The data set


def entry(split: str, seed: int) -> dict:
    """One record of the handbook's JSON for scene `seed` (its image: images/<id>.png)."""
    scene = data.make_scene(seed)
    name = f"{split}_{seed:010d}"
    return {
        "id": name,
        "image": f"{IMAGE_DIR}/{name}.png",
        "conversations": [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{INSTRUCTION}"},
            {"from": "gpt", "value": data.caption_zh(scene)},
        ],
    }


def write_data(out: Path, images: int, seed: int = 0, split: str = "train") -> Path:
    """OUT/toy_zh_captions.json and OUT/images/*.png for scenes seed .. seed + images - 1 of the split."""
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    records = []
    for scene_seed in data.split_seeds(split, seed + images)[seed:]:
        record = entry(split, scene_seed)
        data.render(data.make_scene(scene_seed)).save(out / record["image"])
        records.append(record)
    path = out / DATA_FILE
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def human_text(value: str) -> str:
    """LLaVA's preprocess_multimodal (mm_use_im_start_end False): the <image> moves to the front."""
    if IMAGE_PLACEHOLDER not in value:
        return value
    return f"{IMAGE_PLACEHOLDER}\n{value.replace(IMAGE_PLACEHOLDER, '').strip()}"


def turns(conversations: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) per round: human then gpt, as LLaVA's preprocess_v1 pairs them."""
    if len(conversations) % 2 or any(
        turn["from"] != role for turn, role in zip(conversations, ["human", "gpt"] * len(conversations))
    ):
        raise ValueError(f"conversation does not alternate human, gpt: {[t['from'] for t in conversations]}")
    return [
        (human_text(conversations[i]["value"]), conversations[i + 1]["value"])
        for i in range(0, len(conversations), 2)
    ]


def read_data(data_path: Path, image_folder: Path) -> tuple[list, list[list[tuple[str, str]]]]:
    """(PIL images, rounds) per record: LLaVA's LazySupervisedDataset reads image_folder / "image"."""
    from PIL import Image

    records = json.loads(Path(data_path).read_text(encoding="utf-8"))
    images = [Image.open(image_folder / record["image"]).convert("RGB") for record in records]
    return images, [turns(record["conversations"]) for record in records]


# ---------------------------------------------------------------------------------------------
# The LoRA model


def lora_targets(lm_head: bool) -> str:
    """The modules find_all_linear_names picks, as a regex over LlavaForConditionalGeneration's
    names: its CLIP tower has q_proj / k_proj / v_proj too, which plain names would also match
    (LLaVA's tower is not loaded yet when get_peft_model runs)."""
    layers = rf"{HF_LAYERS.replace('.', '[.]')}\d+[.](self_attn|mlp)[.]({'|'.join(LINEAR_NAMES)})"
    return f"{layers}|{LM_HEAD}" if lm_head else layers


def lora_model(model, r: int, alpha: int, dropout: float, lm_head: bool):
    """PEFT LoRA on `model` (in place; returns the PeftModel), the projector trainable in full."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_targets(lm_head),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    model.model.multi_modal_projector.requires_grad_(True)  # LLaVA: "in case it is frozen by LoRA"
    return peft_model


def llava_adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The LoRA tensors under the names PEFT gives an adapter of LLaVA's LlavaLlamaForCausalLM
    (and of a plain LlamaForCausalLM): base_model.model.model.layers.N..., base_model.model.lm_head...
    lm_head's own weight stays out (PEFT would save it whole, as an "embedding layer")."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    return {
        swap_prefix(name, PEFT_PREFIX + HF_LAYERS, PEFT_PREFIX + LLAVA_LAYERS): t.detach().to(SAVE_DTYPE)
        for name, t in state.items()
    }


def swap_prefix(name: str, old: str, new: str) -> str:
    return new + name[len(old) :] if name.startswith(old) else name


def projector_state(model) -> dict[str, torch.Tensor]:
    """The projector under LLaVA's non_lora_trainables names (its Sequential's indices 0 and 2)."""
    state = {}
    for name, tensor in model.model.multi_modal_projector.state_dict().items():
        for index, named in MLP2X_NAMES.items():
            name = swap_prefix(name, named, index)
        state[f"{PEFT_PREFIX}model.mm_projector.{name}"] = tensor.detach().to(SAVE_DTYPE).clone()
    return state


# ---------------------------------------------------------------------------------------------
# The output folder


def output_config(base: Path, out: Path) -> dict:
    """The base's config.json with mm_vision_tower rewritten relative to OUT (a hub id stays)."""
    config = json.loads((base / "config.json").read_text())
    tower = base / config["mm_vision_tower"]
    if tower.is_dir():
        config["mm_vision_tower"] = os.path.relpath(tower.resolve(), out.resolve())
    return config


def write_output(peft_model, model, base: Path, folder: Path, out: Path, r, alpha, dropout, lm_head) -> None:
    """The four files of LLaVA's LoRA output into `folder` (to be renamed OUT)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(output_config(base, out), indent=2) + "\n")
    saved = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=[*LINEAR_NAMES, *([LM_HEAD] if lm_head else [])],
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base),
    )
    saved.target_modules = sorted(saved.target_modules)  # a set would be written in hash order
    saved.save_pretrained(str(folder))
    save_file(llava_adapter_state(peft_model), str(folder / "adapter_model.safetensors"), {"format": "pt"})
    torch.save(projector_state(model), folder / "non_lora_trainables.bin")


# ---------------------------------------------------------------------------------------------
# Evaluation


def caption_answer(model, tokenizer, pixels: torch.Tensor, fmt) -> str:
    """HF generate's greedy caption for one image ([1,3,H,W]), asked as llava-run asks it."""
    return reference_answer(model, tokenizer, pixels, INSTRUCTION, fmt, MAX_NEW_TOKENS)


def held_out_captions(model, tokenizer, spec, n_images: int) -> list[tuple[str, str]]:
    """(expected, generated) for the first n test-split scenes."""
    fmt = prompt_format(model.config)
    pairs = []
    for seed in data.split_seeds("test", n_images):
        scene = data.make_scene(seed)
        pixels = pixel_values([data.render(scene)], spec)
        pairs.append((data.caption_zh(scene), caption_answer(model, tokenizer, pixels, fmt)))
    return pairs


class HeldOutCaptions:
    """Teacher-forced exact match on test-split captions, one forward: a caption counts when
    every token and the </s> are the argmax, i.e. when greedy decoding writes it. For progress lines."""

    def __init__(self, tokenizer, config, spec, n_images: int):
        scenes = [data.make_scene(seed) for seed in data.split_seeds("test", n_images)]
        sequences = [
            conversation_sequence(tokenizer, [(INSTRUCTION, data.caption_zh(s))], config) for s in scenes
        ]
        self.batch = (*collate(sequences), pixel_values([data.render(s) for s in scenes], spec))

    @torch.no_grad()
    def accuracy(self, model) -> float:
        model.eval()
        _, right = loss_and_hits(model, *self.batch)
        model.train()
        return right.float().mean().item()


# ---------------------------------------------------------------------------------------------
# Training


def train(
    model_base: Path,
    data_path: Path,
    image_folder: Path,
    out: Path,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lm_head: bool = True,
    steps: int = 2000,
    batch_size: int = 16,
    lr: float = 5e-3,
    mm_projector_lr: float = 5e-4,
    seed: int = 0,
    eval_images: int = 40,
    log_every: int = 25,
) -> float:
    """Fine-tunes, writes OUT (atomically: a scratch folder beside it, renamed at the end) and
    returns the held-out exact-match accuracy of the merged model (nan without eval images)."""
    started = time.monotonic()
    torch.manual_seed(seed)
    source = load_source(str(model_base))
    model, spec = source.model, source.preprocess
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source.tokenizer_dir / TOKENIZER_FILE))
    images, rounds = read_data(data_path, image_folder)
    check_answer_tokens(tokenizer, [(None, None, qa) for qa in rounds[:200]])
    sequences = [conversation_sequence(tokenizer, qa, model.config) for qa in rounds]
    pixels = torch.cat([pixel_values(images[i : i + 256], spec) for i in range(0, len(images), 256)])
    peft_model = lora_model(model, lora_r, lora_alpha, lora_dropout, lm_head)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    print(f"LoRA r {lora_r} alpha {lora_alpha} on {lora_targets(lm_head)}: {trainable} trainable parameters "
          f"(LoRA + projector); {len(sequences)} captions; {steps} steps x {batch_size}, lr {lr}, projector "
          f"lr {mm_projector_lr}; seed {seed}, {torch.get_num_threads()} threads; read in "
          f"{time.monotonic() - started:.0f}s", flush=True)  # fmt: skip
    held_out = HeldOutCaptions(tokenizer, model.config, spec, eval_images) if eval_images else None
    batches = Batches(sequences, batch_size, seed)
    model.train()

    def step():
        index = batches.indices()
        loss, right = loss_and_hits(model, *collate([sequences[i] for i in index]), pixels[index])
        return loss, f"exact {right.float().mean().item():.2f}"

    def report() -> str:
        return f"{100 * held_out.accuracy(model):.1f}% (teacher-forced)"

    projector = list(model.model.multi_modal_projector.parameters())
    adapters = [p for n, p in peft_model.named_parameters() if p.requires_grad and ".lora_" in n]
    optimize("lora", [(adapters, lr), (projector, mm_projector_lr)], step, steps, float("inf"), log_every,
             started, report if held_out else None)  # fmt: skip
    trained_s = time.monotonic() - started

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_output(peft_model, model, model_base, scratch, out, lora_r, lora_alpha, lora_dropout, lm_head)
        accuracy, samples = float("nan"), []
        if eval_images:
            merged = load_source(str(scratch), model_base=str(model_base)).model  # llava-export's merge
            pairs = held_out_captions(merged, tokenizer, spec, eval_images)
            accuracy = sum(expected == got for expected, got in pairs) / len(pairs)
            print(f"held-out captions (merged model, HF generate, greedy, exact match): "
                  f"{sum(e == g for e, g in pairs)}/{len(pairs)} = {100 * accuracy:.1f}%", flush=True)  # fmt: skip
            samples = [{"expected": e, "generated": g} for e, g in pairs[:5]]
            for expected, got in [p for p in pairs if p[0] != p[1]][:10]:
                print(f"  miss: expected {expected} got {got}", flush=True)
        info = {
            "command": "python -m exporter.toy.lora " + " ".join(sys.argv[1:])
            if sys.argv[0].endswith("lora.py")
            else None,
            "model_base": str(model_base),
            "data_path": str(data_path),
            "captions": len(sequences),
            "lora_r": lora_r,
            "lora_alpha": lora_alpha,
            "lora_dropout": lora_dropout,
            "lm_head": lm_head,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "mm_projector_lr": mm_projector_lr,
            "seed": seed,
            "threads": torch.get_num_threads(),
            "dtype": str(SAVE_DTYPE).removeprefix("torch."),
            "train_seconds": round(trained_s),
            "heldout_images": eval_images,
            "heldout_accuracy": None if not eval_images else round(accuracy, 4),
            "samples": samples,
        }
        (scratch / "training.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        plain_permissions(scratch)
        replace_folder(scratch, out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    print(f"wrote {out} in {time.monotonic() - started:.0f}s", flush=True)
    return accuracy


def plain_permissions(folder: Path) -> None:
    """The umask's permissions, as mkdir and open give them, for mkdtemp's 0700 folder and the
    0600 files safetensors writes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def replace_folder(new: Path, out: Path) -> None:
    """Renames `new` to OUT; an OUT already there is moved aside first and removed after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
        out.rename(old / out.name)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old)


def main(argv: list[str] | None = None) -> float | None:
    parser = argparse.ArgumentParser(prog="python -m exporter.toy.lora", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("data", help="write the JSON data set and its images")
    make.add_argument("--out", type=Path, required=True, help="folder for the JSON and images/")
    make.add_argument("--images", type=int, default=4000)
    make.add_argument("--seed", type=int, default=0, help="first scene seed within the split")
    make.add_argument("--split", choices=sorted(data.SPLIT_OFFSETS), default="train")
    fit = commands.add_parser("train", help="LoRA fine-tune; writes LLaVA's LoRA output folder")
    fit.add_argument(
        "--model-base", type=Path, required=True, help="original-format base (models/toy-llava-original)"
    )
    fit.add_argument("--data-path", type=Path, required=True, help="the data set's JSON")
    fit.add_argument(
        "--image-folder", type=Path, required=True, help="what the JSON's image paths are relative to"
    )
    fit.add_argument("--out", type=Path, required=True, help="output folder (e.g. models/toy-llava-lora-zh)")
    fit.add_argument("--lora-r", type=int, default=16)
    fit.add_argument("--lora-alpha", type=int, default=32)
    fit.add_argument("--lora-dropout", type=float, default=0.0)
    fit.add_argument("--no-lm-head", dest="lm_head", action="store_false", help="LoRA on the decoder only")
    fit.add_argument("--steps", type=int, default=2000)
    fit.add_argument("--batch-size", type=int, default=16)
    fit.add_argument("--lr", type=float, default=5e-3, help="peak learning rate of the LoRA weights")
    fit.add_argument("--mm-projector-lr", type=float, default=5e-4, help="the projector's (LLaVA's 1/10)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--eval-images", type=int, default=40, help="held-out test scenes for the final check")
    fit.add_argument("--threads", type=int, default=2)
    fit.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)
    if args.command == "data":
        path = write_data(args.out, args.images, args.seed, args.split)
        print(f"wrote {path} and {args.images} images under {args.out / IMAGE_DIR}", flush=True)
        return None
    torch.set_num_threads(args.threads)
    return train(
        model_base=args.model_base,
        data_path=args.data_path,
        image_folder=args.image_folder,
        out=args.out,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lm_head=args.lm_head,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        mm_projector_lr=args.mm_projector_lr,
        seed=args.seed,
        eval_images=args.eval_images,
        log_every=args.log_every,
    )


if __name__ == "__main__":
    main()
