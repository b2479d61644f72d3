"""Trains the toy LLaVA from scratch on procedural shapes, and writes it in both formats.

    python -m exporter.toy.train --out models/toy-llava [--steps N] [--minutes M] [--seed S]

writes
    models/toy-llava/           LlavaForConditionalGeneration (safetensors), tokenizer, image processor
    models/toy-llava-original/  the same weights in the original LLaVA layout (exporter.testing.original_format)
    models/toy-clip/            the CLIP tower the original format names (mm_vision_tower ../toy-clip)

The LLaVA-1.5 recipe, at toy scale (docs/toy-model.md):
  stage 0  vision pretraining, standing in for CLIP's own: the tower learns each patch's colour,
           shape, size and cell and the background through throwaway linear heads.
  stage 1  "pretrain": image + caption in the `plain` format (<s> image caption </s>), loss on
           the caption. Real LLaVA trains only the projector here, over a pretrained LLM;
           nothing here is pretrained, so the decoder trains too. The tower stays frozen from here on.
  stage 2  "instruction tuning": multi-turn vicuna_v1 conversations about the image (one
           question of each kind; the image only in the first turn), loss on the answers and
           their </s> only; projector and decoder train.
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
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from exporter.source import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from exporter.testing.original_format import write_clip_tower, write_original, write_processor_config
from exporter.toy import data
from exporter.toy.evaluate import PromptFormat, pixel_values, prompt_ids, score_reference
from runtime.contract import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, PreprocessSpec
from runtime.prompts import TEMPLATES, render_prompt

IGNORE = -100
TEMPLATE = "vicuna_v1"
BOS_ID, EOS_ID = 1, 2


@dataclass(frozen=True)
class ToyConfig:
    """The toy model's shape: LLaVA-1.5's architecture (CLIP ViT, mlp2x_gelu, Llama), shrunk."""

    image_size: int = 48
    patch_size: int = 16  # 3 x 3 = 9 image tokens
    vision_hidden: int = 64
    vision_layers: int = 3  # the last one is unused: features come from layer -2, as in LLaVA
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_intermediate: int = 352
    heads: int = 8
    kv_heads: int = 4
    vocab_size: int = 570  # every word of the data whole: the most the corpus yields
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
        # <unk> (id 0) marks image slots, as in exporter/testing/tiny.py; no prompt ever produces it.
        image_token_index=0,
        image_seq_length=(toy.image_size // toy.patch_size) ** 2,
        tie_word_embeddings=False,
    )


def toy_preprocess(image_size: int) -> PreprocessSpec:
    """The toy model's image preprocessing: pad to square (LLaVA-1.5), bicubic to image_size."""
    return PreprocessSpec(
        shortest_edge=image_size,
        crop_size=image_size,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        aspect="pad",
    )


def num_image_tokens(config) -> int:
    """Embeddings per image: patches, plus CLS when the strategy keeps it ("full")."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (config.vision_feature_select_strategy == "full")


def prompt_format(config) -> PromptFormat:
    """How the toy model is prompted in training and by its held-out evaluation."""
    return PromptFormat(TEMPLATE, BOS_ID, [EOS_ID], config.image_token_index, num_image_tokens(config))


# ---------------------------------------------------------------------------------------------
# Tokenizer and sequences


def tokenizer_corpus(n_examples: int = 600) -> list[str]:
    """What the tokenizer learns its merges from: the text chunks exactly as tokenize_prompt
    encodes them (chunk 0 = system + "USER:", chunk 1 = "\n" question " ASSISTANT:") followed by
    the answer, later turns, and captions."""
    template = TEMPLATES[TEMPLATE]
    user, assistant = template.roles
    chunk0 = render_prompt(TEMPLATE, "", 1).split("<image>")[0]
    lines = [chunk0] + data.vocabulary_text()
    for seed in data.split_seeds("train", n_examples):
        scene = data.make_scene(seed)
        lines += [chunk0, data.caption(scene)]  # chunk 0 once per conversation, as in training
        for question, answer in data.questions(scene, random.Random(seed)):
            lines.append(render_prompt(TEMPLATE, question, 1).split("<image>")[1] + " " + answer)
            lines.append(f"{user}: {question}{template.sep}{assistant}: {answer}")
    return lines


def build_tokenizer(folder: Path, vocab_size: int):
    from tokenizers import Tokenizer

    from exporter.testing.tiny_tokenizer import build_tiny_tokenizer

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
            prompt = prompt_ids(tokenizer, question, prompt_format(config))
        else:
            prompt = tokenizer.encode(
                f"{user}: {question}{template.sep}{assistant}:", add_special_tokens=False
            ).ids
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


class Pool:
    """The training images, rendered and preprocessed once (runtime.preprocess, float32) and
    reused by every stage and epoch; the questions about them are drawn afresh each time."""

    def __init__(self, n_images: int, spec, chunk: int = 256):
        seeds = data.split_seeds("train", n_images)
        self.scenes = [data.make_scene(seed) for seed in seeds]
        self.pixels = torch.cat(
            [
                pixel_values([data.render(s) for s in self.scenes[i : i + chunk]], spec)
                for i in range(0, n_images, chunk)
            ]
        )  # [n,3,H,W]

    def __len__(self) -> int:
        return len(self.scenes)


class Batches:
    """Batches for one stage: shuffled passes over the pool, seeded."""

    def __init__(self, pool: Pool, batch_size: int, seed: int):
        self.pool, self.batch_size = pool, batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def indices(self) -> list[int]:
        while len(self.order) < self.batch_size:
            fresh = list(range(len(self.pool)))
            self.rng.shuffle(fresh)
            self.order += fresh
        taken, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return taken


def vision_batch(batches: Batches, toy: ToyConfig):
    """Stage 0: pixels [B,3,H,W] and per-patch labels [B,P] (colour, shape, size: 0 = empty;
    cell: 0..8), background [B]. A patch takes the labels of the grid cell its centre falls in."""
    index = batches.indices()
    grid = toy.image_size // toy.patch_size
    centres = [
        int((g + 0.5) * toy.patch_size * 3 // toy.image_size) for g in range(grid)
    ]  # patch row/col -> cell row/col
    cell_of_patch = [3 * centres[r] + centres[c] for r in range(grid) for c in range(grid)]
    colours, shapes, sizes, backgrounds = [], [], [], []
    for i in index:
        scene = batches.pool.scenes[i]
        by_cell = {o.cell: o for o in scene.objects}
        objs = [by_cell.get(cell) for cell in cell_of_patch]
        colours.append([0 if o is None else 1 + list(data.COLOURS).index(o.colour) for o in objs])
        shapes.append([0 if o is None else 1 + data.SHAPES.index(o.shape) for o in objs])
        sizes.append([0 if o is None else 1 + data.SIZES.index(o.size) for o in objs])
        backgrounds.append(list(data.BACKGROUNDS).index(scene.background))
    cells = [cell_of_patch] * len(index)
    labels = dict(colour=colours, shape=shapes, size=sizes, cell=cells, background=backgrounds)
    labels = {k: torch.tensor(v) for k, v in labels.items()}
    return batches.pool.pixels[index], labels


def caption_batch(batches: Batches, tokenizer, config):
    index = batches.indices()
    sequences = [caption_sequence(tokenizer, data.caption(batches.pool.scenes[i]), config) for i in index]
    return (*collate(sequences), batches.pool.pixels[index])


# Question kinds whose text names an object by colour AND shape: asked earlier, they would
# give away the answer to "what colour is the circle?" (the text says "red circle").
NAMING_KINDS = ("where", "size")


def instruction_batch(batches: Batches, tokenizer, config):
    """Stage 2: per image, a multi-turn vicuna_v1 conversation over one question of each kind
    (data.questions: fresh phrasings and referents). Turn 1, which is exactly the inference
    prompt, is any question at random; the rest are ordered so that no answer can be read off
    the conversation's earlier text (the eval asks every question alone): first the questions
    that name an object by one attribute, then those naming both, and the description last
    (a conversation that opens with the description ends there)."""
    index = batches.indices()
    sequences = []
    for i in index:
        qa = data.questions(batches.pool.scenes[i], batches.rng)
        first = qa.pop(batches.rng.randrange(len(qa)))
        kinds = {turn: data.question_kind(turn[0]) for turn in qa}
        if data.question_kind(first[0]) == "describe":
            turns = [first]
        else:
            plain = [t for t in qa if kinds[t] not in NAMING_KINDS and kinds[t] != "describe"]
            naming = [t for t in qa if kinds[t] in NAMING_KINDS]
            batches.rng.shuffle(plain)
            batches.rng.shuffle(naming)
            turns = [first, *plain, *naming, *(t for t in qa if kinds[t] == "describe")]
        sequences.append(conversation_sequence(tokenizer, turns, config))
    return (*collate(sequences), batches.pool.pixels[index])


def loss_and_hits(model, input_ids, attention, labels, pixels) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the labelled tokens, and per row: were all of them the argmax?

    LlavaForConditionalGeneration.forward is model.model then lm_head; the head runs here only
    on the positions that carry a label (the rest of the [B,S,vocab] logits would be thrown away).
    """
    hidden = model.model(input_ids=input_ids, attention_mask=attention, pixel_values=pixels).last_hidden_state
    targets = labels[:, 1:]  # position t predicts token t + 1
    mask = targets != IGNORE  # [B,S-1]
    logits = model.lm_head(hidden[:, :-1][mask])  # [labelled, vocab]
    loss = torch.nn.functional.cross_entropy(logits, targets[mask])
    right = torch.ones_like(mask)
    right[mask] = logits.argmax(-1) == targets[mask]
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
                prompt = prompt_ids(tokenizer, question, prompt_format(config))
                target = answer_ids(tokenizer, answer) + [EOS_ID]
                sequence = (prompt + target, [False] * len(prompt) + [True] * len(target))
                rows.append((sequence, pixels, data.question_kind(question)))
        self.batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        self.size = len(rows)

    @torch.no_grad()
    def accuracy(self, model) -> tuple[float, str]:
        """(overall, "describe 80 count 100 ...") in percent."""
        model.eval()
        kinds: dict[str, list[int]] = {}
        for batch in self.batches:
            input_ids, attention, labels = collate([sequence for sequence, _, _ in batch])
            _, right = loss_and_hits(model, input_ids, attention, labels, torch.cat([p for _, p, _ in batch]))
            for (_, _, kind), hit in zip(batch, right.tolist()):
                kinds.setdefault(kind, [0, 0])
                kinds[kind][0] += hit
                kinds[kind][1] += 1
        model.train()
        total = sum(c for c, _ in kinds.values()) / max(self.size, 1)
        return total, " ".join(f"{k} {100 * c / n:.0f}" for k, (c, n) in sorted(kinds.items()))


# ---------------------------------------------------------------------------------------------
# Training


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine down to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


class VisionHeads(torch.nn.Module):
    """Stage 0's throwaway classifiers on the tower's selected layer: what each patch shows."""

    def __init__(self, hidden: int):
        super().__init__()
        self.colour = torch.nn.Linear(hidden, len(data.COLOURS) + 1)
        self.shape = torch.nn.Linear(hidden, len(data.SHAPES) + 1)
        self.size = torch.nn.Linear(hidden, len(data.SIZES) + 1)
        self.background = torch.nn.Linear(hidden, len(data.BACKGROUNDS))
        self.cell = torch.nn.Linear(
            hidden, len(data.POSITIONS)
        )  # where the patch is: features keep their place

    def loss(self, model, pixels, labels) -> tuple[torch.Tensor, str]:
        layer = model.config.vision_feature_layer
        patches = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[layer][
            :, 1:
        ]  # [B,P,D]
        loss = torch.nn.functional.cross_entropy(self.background(patches.mean(1)), labels["background"])
        accuracy = []
        for name in ("colour", "shape", "size", "cell"):
            logits = getattr(self, name)(patches)  # [B,P,classes]
            loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[name].flatten())
            accuracy.append(f"{name} {(logits.argmax(-1) == labels[name]).float().mean().item():.2f}")
        return loss, "patch " + " ".join(accuracy)


def optimize(name, groups, step_loss, steps, deadline, log_every, started, report=None) -> None:
    """AdamW with warmup and cosine decay over `steps`, weight decay on matrices only, for
    `groups` [(parameters, peak learning rate)] (LLaVA gives its projector a rate of its own);
    step_loss() -> (loss, note) per step; report() -> str is appended every 5th log line and
    at the end. Stops early at the deadline."""
    param_groups = []
    for params, peak in groups:
        params = [p for p in params if p.requires_grad]
        param_groups += [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01, "peak": peak},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "peak": peak},
        ]
    optimizer = torch.optim.AdamW([g for g in param_groups if g["params"]], betas=(0.9, 0.98))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    warmup = max(1, min(50, steps // 10))
    smoothed = None
    for step in range(steps):
        if time.monotonic() > deadline:
            print(f"[{name}] time budget reached: stopping after {step} of {steps} steps", flush=True)
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, group["peak"], warmup)
        loss, note = step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        last = step == steps - 1
        if (step + 1) % log_every == 0 or last:
            line = f"[{name}] step {step + 1}/{steps}  loss {smoothed:.4f}  {note}  {time.monotonic() - started:.0f}s"
            if report is not None and ((step + 1) % (log_every * 5) == 0 or last):
                line += f"  | held-out {report()}"
            print(line, flush=True)


def train(
    out: Path,
    original_out: Path,
    clip_out: Path,
    steps: int = 2400,
    stage1_fraction: float = 0.25,
    vision_steps: int = 800,
    batch_size: int = 32,
    caption_batch_size: int = 64,
    lr: float = 3e-3,
    pool_images: int = 10000,
    seed: int = 0,
    minutes: float = 40.0,
    eval_images: int = 40,
    log_every: int = 10,
    toy: ToyConfig = ToyConfig(),
) -> float:
    """Trains, writes the three folders, returns the held-out reference accuracy."""
    from transformers import LlavaForConditionalGeneration

    started = time.monotonic()
    budget = 60 * minutes
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch), toy.vocab_size)
        tokenizer_files = {
            name: (Path(scratch) / name).read_bytes() for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)
        }
    config = llava_config(toy)
    spec = toy_preprocess(toy.image_size)
    check_answer_tokens(tokenizer, data.split("test", 20))
    model = LlavaForConditionalGeneration(config).float().train()
    params = sum(p.numel() for p in model.parameters())
    stage1 = max(1, round(steps * stage1_fraction))
    stage2 = max(1, steps - stage1)
    print(f"toy LLaVA: {params / 1e6:.2f}M parameters, {num_image_tokens(config)} image tokens, vocab "
          f"{toy.vocab_size}; steps: vision {vision_steps}, captions {stage1} x {caption_batch_size}, "
          f"instructions {stage2} x {batch_size}; seed {seed}, {torch.get_num_threads()} threads", flush=True)  # fmt: skip
    pool = Pool(pool_images, spec)
    print(f"rendered {len(pool)} training images in {time.monotonic() - started:.0f}s", flush=True)
    held_out = HeldOut(tokenizer, config, spec, n_images=min(eval_images, 16)) if eval_images else None

    def report() -> str:
        total, kinds = held_out.accuracy(model)
        return f"{100 * total:.1f}% ({kinds})"

    # Stage 0: the vision tower learns to see (real LLaVA starts from CLIP's own pretraining).
    tower = model.model.vision_tower
    heads = VisionHeads(toy.vision_hidden)
    batches = Batches(pool, 64, seed)
    optimize("stage 0 vision", [([*tower.parameters(), *heads.parameters()], lr)],
             lambda: heads.loss(model, *vision_batch(batches, toy)), vision_steps, started + 0.1 * budget,
             log_every * 5, started)  # fmt: skip
    # Stages 1 and 2 keep the tower frozen, as LLaVA does.
    tower.requires_grad_(False)

    def text_step(make):
        def step():
            input_ids, attention, labels, pixels = make()
            loss, right = loss_and_hits(model, input_ids, attention, labels, pixels)
            return loss, f"exact {right.float().mean().item():.2f}"

        return step

    batches = Batches(pool, caption_batch_size, seed + 1)
    optimize("stage 1 captions", [(model.parameters(), lr)], text_step(lambda: caption_batch(batches, tokenizer, config)),
             stage1, started + 0.45 * budget, log_every, started)  # fmt: skip
    batches = Batches(pool, batch_size, seed + 2)
    optimize("stage 2 instructions", [(model.parameters(), lr)],
             text_step(lambda: instruction_batch(batches, tokenizer, config)), stage2,
             started + budget - 60, log_every, started, report if held_out else None)  # fmt: skip
    trained_s = time.monotonic() - started
    model.requires_grad_(False).eval()

    accuracy, total = float("nan"), 0
    if eval_images:
        result = score_reference(
            model, tokenizer, data.split("test", eval_images), prompt_format(config), spec
        )
        accuracy, total = result.accuracy, result.total
        print(
            f"held-out reference accuracy (HF generate, greedy, exact match): {result.summary()}", flush=True
        )
        for question, expected, got in result.misses[:10]:
            print(f"  miss: {question!r} expected {expected!r} got {got!r}", flush=True)

    write_folders(model, tokenizer_files, spec, out, original_out, clip_out)
    info = {
        "command": "python -m exporter.toy.train " + " ".join(sys.argv[1:])
        if sys.argv[0].endswith("train.py")
        else None,
        "toy_config": asdict(toy),
        "vision_steps": vision_steps,
        "caption_steps": stage1,
        "instruction_steps": stage2,
        "batch_size": batch_size,
        "caption_batch_size": caption_batch_size,
        "lr": lr,
        "pool_images": pool_images,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "train_seconds": round(trained_s),
        "total_seconds": round(time.monotonic() - started),
        "heldout_questions": total,
        "heldout_accuracy": None if not eval_images else round(accuracy, 4),
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out}, {original_out}, {clip_out} in {time.monotonic() - started:.0f}s", flush=True)
    return accuracy


def write_folders(
    model, tokenizer_files: dict[str, bytes], spec, out: Path, original_out: Path, clip_out: Path
) -> None:
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
    parser.add_argument("--steps", type=int, default=2400, help="optimizer steps of stages 1 and 2 together")
    parser.add_argument(
        "--stage1-fraction", type=float, default=0.25, help="share of --steps spent on captions"
    )
    parser.add_argument("--vision-steps", type=int, default=800, help="stage 0 steps (batch 64)")
    parser.add_argument("--batch-size", type=int, default=32, help="stage 2 batch (conversations)")
    parser.add_argument("--caption-batch-size", type=int, default=64, help="stage 1 batch (captions)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--pool", type=int, default=10000, help="training images (rendered once, reused)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--minutes",
        type=float,
        default=40.0,
        help="wall-clock cap (13 min suffice on 2 idle cores): stages stop early past it",
    )
    parser.add_argument(
        "--eval-images", type=int, default=40, help="held-out images for the final reference eval"
    )
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
        vision_steps=args.vision_steps,
        batch_size=args.batch_size,
        caption_batch_size=args.caption_batch_size,
        lr=args.lr,
        pool_images=args.pool,
        seed=args.seed,
        minutes=args.minutes,
        eval_images=args.eval_images,
        log_every=args.log_every,
    )


if __name__ == "__main__":
    main()
