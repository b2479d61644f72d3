"""Trains the toy LLaVA from scratch on procedural shapes, and writes it in both formats.

    python -m exporter.toy.train --out models/toy-llava [--steps N] [--minutes M] [--seed S]

writes
    models/toy-llava/           LlavaForConditionalGeneration (safetensors), tokenizer, image processor
    models/toy-llava-original/  the same weights in the original LLaVA layout (exporter.convert)
    models/toy-clip/            the CLIP tower the original format names (mm_vision_tower ../toy-clip)

The LLaVA-1.5 recipe, at toy scale (docs/toy-model.md):
  stage 1  "pretrain": image + caption in the `plain` format (<s> image caption </s>), loss on
           the caption. Real LLaVA freezes a pretrained CLIP and a pretrained LLM here and trains
           only the projector; nothing here is pretrained, so stage 1 trains everything: it is
           where the vision tower learns to see and the decoder learns the words.
  stage 2  "instruction tuning": multi-turn vicuna_v1 conversations about the image (every kind
           of question, shuffled; the image only in the first turn), loss on the answers and
           their </s> only. Vision tower, projector and decoder all train (real LLaVA freezes the
           tower here too; ours is still young).
Sequences carry N `image_token_index` placeholders where the image goes, and the forward is
LlavaForConditionalGeneration's own, so training computes exactly what inference does.
Deterministic for a given --seed, --steps and thread count; --minutes only stops early.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from exporter.convert import write_clip_tower, write_original, write_processor_config
from exporter.toy import data
from exporter.toy.eval_reference import (
    BOS_ID,
    EOS_ID,
    TEMPLATE,
    evaluate_reference,
    num_image_tokens,
    pixel_values,
    prompt_ids,
    toy_preprocess,
)
from runtime.contract import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from runtime.prompts import TEMPLATES, render_prompt

IGNORE = -100


@dataclass(frozen=True)
class ToyConfig:
    """The toy model's shape: LLaVA-1.5's architecture (CLIP ViT, mlp2x_gelu, Llama), shrunk."""

    image_size: int = 48
    patch_size: int = 8  # 6 x 6 = 36 image tokens
    vision_hidden: int = 64
    vision_layers: int = 3  # the last one is unused: features come from layer -2, as in LLaVA
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_intermediate: int = 352
    heads: int = 4
    kv_heads: int = 2
    vocab_size: int = 384
    max_positions: int = 512
    select_layer: int = -2


def llava_config(toy: ToyConfig):
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": toy.vision_hidden,
            "intermediate_size": toy.vision_hidden * 4,
            "num_hidden_layers": toy.vision_layers,
            "num_attention_heads": toy.vision_heads,
            "image_size": toy.image_size,
            "patch_size": toy.patch_size,
            "projection_dim": toy.vision_hidden,
            "hidden_act": "quick_gelu",  # as OpenAI CLIP
        },
        text_config={
            "model_type": "llama",
            "hidden_size": toy.text_hidden,
            "intermediate_size": toy.text_intermediate,
            "num_hidden_layers": toy.text_layers,
            "num_attention_heads": toy.heads,
            "num_key_value_heads": toy.kv_heads,
            "vocab_size": toy.vocab_size,
            "max_position_embeddings": toy.max_positions,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": 0,
        },
        projector_hidden_act="gelu",
        vision_feature_layer=toy.select_layer,
        vision_feature_select_strategy="default",
        # <unk> (id 0) marks image slots, as in exporter/tiny.py; no prompt ever produces it.
        image_token_index=0,
        image_seq_length=(toy.image_size // toy.patch_size) ** 2,
        tie_word_embeddings=False,
    )


# ---------------------------------------------------------------------------------------------
# Tokenizer and sequences


def tokenizer_corpus(n_examples: int = 600) -> list[str]:
    """What the tokenizer learns its merges from: prompts, questions, answers and captions."""
    lines = [render_prompt(TEMPLATE, "Describe the image.", 1), render_prompt("plain", "", 1)]
    lines += data.vocabulary_text()
    for seed in data.split_seeds("train", n_examples):
        scene = data.make_scene(seed)
        lines.append(data.caption(scene))
        for question, answer in data.questions(scene, random.Random(seed)):
            lines.append(f"{render_prompt(TEMPLATE, question, 0)} {answer}")
    return lines


def build_tokenizer(folder: Path, vocab_size: int):
    from tokenizers import Tokenizer

    from exporter.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(folder, vocab_size=vocab_size, corpus=tokenizer_corpus())
    return Tokenizer.from_file(str(folder / TOKENIZER_FILE))


def answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer.encode(answer, add_special_tokens=False).ids


def check_answer_tokens(tokenizer, examples) -> None:
    """An answer's training tokens must be what the prompt + answer text tokenizes to after the
    prompt: the decoder is taught the tokens a greedy decoder then emits and the runtime decodes."""
    for _image, _caption, qa in examples:
        for question, answer in qa:
            prompt = render_prompt(TEMPLATE, question, 1).split("<image>")[1]
            whole = tokenizer.encode(f"{prompt} {answer}", add_special_tokens=False).ids
            alone = tokenizer.encode(prompt, add_special_tokens=False).ids
            if whole != alone + answer_ids(tokenizer, answer):
                raise AssertionError(f"answer {answer!r} tokenizes differently after the prompt {prompt!r}")
            if tokenizer.decode(answer_ids(tokenizer, answer), skip_special_tokens=True) != answer:
                raise AssertionError(f"answer {answer!r} does not decode back to itself")


def caption_sequence(tokenizer, caption: str, config) -> tuple[list[int], list[bool]]:
    """Stage 1 (LLaVA `plain`): <s> [image] caption </s>; loss on caption and </s>."""
    prompt = [BOS_ID] + [config.image_token_index] * num_image_tokens(config)
    target = answer_ids(tokenizer, caption) + [EOS_ID]
    return prompt + target, [False] * len(prompt) + [True] * len(target)


def conversation_sequence(tokenizer, qa: list[tuple[str, str]], config) -> tuple[list[int], list[bool]]:
    """Stage 2 (vicuna_v1, multi-turn): turn 1 is exactly the inference prompt (image placeholders
    included); later turns continue as Conversation.get_prompt does ("USER: q ASSISTANT: a</s>").
    Loss on each answer and its </s>."""
    template = TEMPLATES[TEMPLATE]
    user, assistant = template.roles
    ids: list[int] = []
    mask: list[bool] = []
    for turn, (question, answer) in enumerate(qa):
        if turn == 0:
            prompt = prompt_ids(tokenizer, question, config)
        else:
            prompt = tokenizer.encode(f"{user}: {question}{template.sep}{assistant}:", add_special_tokens=False).ids
        target = answer_ids(tokenizer, answer) + [EOS_ID]
        ids += prompt + target
        mask += [False] * len(prompt) + [True] * len(target)
    return ids, mask


def collate(sequences: list[tuple[list[int], list[bool]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids [B,S] (pad </s>, never the image id), attention_mask [B,S], labels [B,S]."""
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), EOS_ID, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE, dtype=torch.long)
    for row, (ids, mask) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.where(torch.tensor(mask), torch.tensor(ids), IGNORE)
    return input_ids, attention, labels


class Batches:
    """Fresh training images, seed after seed of the train split: each image is seen once."""

    def __init__(self, tokenizer, config, spec, batch_size: int, seed: int):
        self.tokenizer, self.config, self.spec, self.batch_size = tokenizer, config, spec, batch_size
        self.next_seed = 0
        self.rng = random.Random(seed)

    def _examples(self):
        seeds = data.split_seeds("train", self.next_seed + self.batch_size)[self.next_seed :]
        self.next_seed += self.batch_size
        return [data.make_example(s) for s in seeds]

    def captions(self):
        examples = self._examples()
        sequences = [caption_sequence(self.tokenizer, caption, self.config) for _, caption, _ in examples]
        return (*collate(sequences), pixel_values([image for image, _, _ in examples], self.spec))

    def conversations(self):
        examples = self._examples()
        sequences = []
        for _, _, qa in examples:
            qa = list(qa)
            self.rng.shuffle(qa)
            sequences.append(conversation_sequence(self.tokenizer, qa, self.config))
        return (*collate(sequences), pixel_values([image for image, _, _ in examples], self.spec))


def loss_and_hits(model, input_ids, attention, labels, pixels) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the labelled tokens, and per row: were all of them the argmax?"""
    logits = model(input_ids=input_ids, attention_mask=attention, pixel_values=pixels).logits  # [B,S,V]
    logits, targets = logits[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    mask = targets != IGNORE
    loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    right = (logits.argmax(-1) == targets) | ~mask
    return loss, right.all(dim=1)


# ---------------------------------------------------------------------------------------------
# Held-out check during training


class HeldOut:
    """Single-turn inference prompts over test-split images, teacher-forced: a row counts as
    right when every answer token and the </s> are the argmax, i.e. exactly when greedy decoding
    would produce the answer. One forward per batch: cheap enough to print as training goes."""

    def __init__(self, tokenizer, config, spec, n_images: int, batch_size: int = 64):
        rows = []
        for image, _caption, qa in data.split("test", n_images):
            pixels = pixel_values([image], spec)
            for question, answer in qa:
                prompt = prompt_ids(tokenizer, question, config)
                target = answer_ids(tokenizer, answer) + [EOS_ID]
                rows.append(((prompt + target, [False] * len(prompt) + [True] * len(target)), pixels))
        self.batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        self.size = len(rows)

    @torch.no_grad()
    def accuracy(self, model) -> float:
        model.eval()
        hits = 0
        for batch in self.batches:
            input_ids, attention, labels = collate([sequence for sequence, _ in batch])
            _, right = loss_and_hits(model, input_ids, attention, labels, torch.cat([p for _, p in batch]))
            hits += int(right.sum())
        model.train()
        return hits / max(self.size, 1)


# ---------------------------------------------------------------------------------------------
# Training


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine down to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def run_stage(name, model, make_batch, steps, peak_lr, deadline, held_out, log_every, started):
    decay, no_decay = [], []
    for pname, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in pname or "embedding" in pname else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, min(100, steps // 10))
    model.train()
    smoothed = None
    for step in range(steps):
        if time.monotonic() > deadline:
            print(f"[{name}] time budget reached: stopping after {step} of {steps} steps", flush=True)
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup)
        input_ids, attention, labels, pixels = make_batch()
        loss, right = loss_and_hits(model, input_ids, attention, labels, pixels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        last = step == steps - 1
        if (step + 1) % log_every == 0 or last:
            line = (
                f"[{name}] step {step + 1}/{steps}  loss {loss.item():.4f} (avg {smoothed:.4f})  "
                f"batch exact {right.float().mean().item():.2f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                f"{time.monotonic() - started:.0f}s"
            )
            if held_out is not None and ((step + 1) % (log_every * 5) == 0 or last):
                line += f"  held-out {100 * held_out.accuracy(model):.1f}%"
            print(line, flush=True)


def train(
    out: Path,
    original_out: Path,
    clip_out: Path,
    steps: int = 1000,
    stage1_fraction: float = 0.3,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    minutes: float = 20.0,
    eval_images: int = 40,
    log_every: int = 10,
    toy: ToyConfig = ToyConfig(),
) -> float:
    """Trains, writes the three folders, returns the held-out reference accuracy."""
    from transformers import LlavaForConditionalGeneration

    started = time.monotonic()
    deadline = started + 60 * minutes
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch), toy.vocab_size)
        tokenizer_files = {name: (Path(scratch) / name).read_bytes() for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)}
    config = llava_config(toy)
    spec = toy_preprocess(toy.image_size)
    check_answer_tokens(tokenizer, data.split("test", 20))
    model = LlavaForConditionalGeneration(config).float()
    params = sum(p.numel() for p in model.parameters())
    print(f"toy LLaVA: {params / 1e6:.2f}M parameters, {num_image_tokens(config)} image tokens, "
          f"vocab {toy.vocab_size}; {steps} steps of batch {batch_size}, seed {seed}, "
          f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip

    batches = Batches(tokenizer, config, spec, batch_size, seed)
    held_out = HeldOut(tokenizer, config, spec, n_images=min(eval_images, 12)) if eval_images else None
    stage1 = max(1, round(steps * stage1_fraction))
    stage2 = max(1, steps - stage1)
    run_stage("stage 1 captions", model, batches.captions, stage1, lr, started + (deadline - started) * 0.4,
              None, log_every, started)  # fmt: skip
    run_stage("stage 2 instructions", model, batches.conversations, stage2, lr, deadline - 60,
              held_out, log_every, started)  # fmt: skip
    trained_s = time.monotonic() - started
    model.eval()

    accuracy = float("nan")
    if eval_images:
        result = evaluate_reference(model, tokenizer, data.split("test", eval_images), spec)
        accuracy = result.accuracy
        print(f"held-out reference accuracy (HF generate, greedy, exact match): {result.summary()}", flush=True)
        for question, expected, got in result.misses[:10]:
            print(f"  miss: {question!r} expected {expected!r} got {got!r}", flush=True)

    write_folders(model, tokenizer_files, spec, out, original_out, clip_out)
    info = {
        "toy_config": asdict(toy),
        "steps": steps,
        "stage1_steps": stage1,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "train_seconds": round(trained_s),
        "total_seconds": round(time.monotonic() - started),
        "heldout_questions": 0 if not eval_images else result.total,
        "heldout_accuracy": None if not eval_images else round(accuracy, 4),
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out}, {original_out}, {clip_out} in {time.monotonic() - started:.0f}s", flush=True)
    return accuracy


def write_folders(model, tokenizer_files: dict[str, bytes], spec, out: Path, original_out: Path, clip_out: Path) -> None:
    """HF folder (save_pretrained), its original-format twin and the CLIP tower that twin names."""
    for folder in (out, original_out, clip_out):
        if folder.exists():
            shutil.rmtree(folder)
    model.save_pretrained(out)
    write_processor_config(out, spec, "LlavaImageProcessor")
    write_clip_tower(model, clip_out, spec)
    # mm_vision_tower relative to the original folder, so the repository can move as a whole.
    tower = os.path.relpath(clip_out.resolve(), original_out.resolve())
    write_original(model, original_out, tower, "mlp2x_gelu", spec.aspect)
    for folder in (out, original_out):
        for name, blob in tokenizer_files.items():
            (folder / name).write_bytes(blob)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(prog="python -m exporter.toy.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="HF folder to write (e.g. models/toy-llava)")
    parser.add_argument("--original-out", type=Path, help="original-format twin (default: OUT-original)")
    parser.add_argument("--clip-out", type=Path, help="CLIP tower folder (default: toy-clip beside OUT)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps, both stages together")
    parser.add_argument("--stage1-fraction", type=float, default=0.3, help="share of the steps spent on captions")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-clock cap: training stops early past it")
    parser.add_argument("--eval-images", type=int, default=40, help="held-out images for the final reference eval")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    return train(
        out=out,
        original_out=args.original_out or out.with_name(out.name + "-original"),
        clip_out=args.clip_out or out.with_name("toy-clip"),
        steps=args.steps,
        stage1_fraction=args.stage1_fraction,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        minutes=args.minutes,
        eval_images=args.eval_images,
        log_every=args.log_every,
    )


if __name__ == "__main__":
    main()
