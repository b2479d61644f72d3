"""Full-size random checkpoints for the scale checks (not a test: a command you run by hand).

    python -m exporter.testing.scale checkpoint --out /tmp/llava7b --text-layers 32
    python -m exporter.testing.scale measure -- llava-export decoder --model /tmp/llava7b --out /tmp/a --fp16 --no-verify

`checkpoint` writes a LLaVA-1.5-7B-shaped Hugging Face folder (CLIP ViT-L/14-336, 24 layers,
mlp2x_gelu to 4096; a Vicuna-7B-shaped decoder of `--text-layers` layers, vocab 32064) with
random weights, float16 like the published checkpoint, one tensor at a time so that memory
stays near the model's own size. Its tokenizer is the tiny test one (exporter.testing.tiny_tokenizer)
with a placeholder piece for every other id of the model's vocabulary (`▁w320` ... `▁w32063`,
decoded " w320" ...): text tokenizes as with the tiny one alone, and whatever ids a random model
generates decode to text, so an export of it can be served and streamed. `measure` runs a
command and prints its wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from exporter.source import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_empty_model
from exporter.testing.original_format import write_processor_config
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


def write_checkpoint(out: Path, text_layers: int, seed: int = 0) -> None:
    from transformers import LlavaConfig

    config = LlavaConfig(
        vision_config=CLIP_L_336, text_config=vicuna_7b(text_layers), image_token_index=32000
    )
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
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="2GB")
    spec = PreprocessSpec(
        shortest_edge=336, crop_size=336, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, aspect="pad"
    )
    write_processor_config(out, spec, "LlavaImageProcessor")
    write_tokenizer(out, config.text_config.vocab_size)


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
    run = sub.add_parser("measure", help="run a command; print wall time and peak RSS")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.action == "checkpoint":
        write_checkpoint(args.out, args.text_layers)
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return measure(command)


if __name__ == "__main__":
    sys.exit(main())
