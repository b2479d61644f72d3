"""The shipped toy LLaVA (models/toy-llava, its original-format twin and a LoRA of it) and exporting it
through the command line, for the toy parity tests on the CPU and on a GPU."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOY_HF_DIR = ROOT / "models" / "toy-llava"
TOY_ORIGINAL_DIR = ROOT / "models" / "toy-llava-original"
TOY_LORA_DIR = ROOT / "models" / "toy-llava-lora-zh"  # a LoRA fine-tune of the original twin


def export_with_cli(model: Path, out: Path, *flags: str) -> Path:
    """`llava-export all --model MODEL --out OUT --quiet FLAGS...`, which must succeed."""
    from click.testing import CliRunner

    from exporter.cli import main

    result = CliRunner().invoke(main, ["all", "--model", str(model), "--out", str(out), "--quiet", *flags])
    assert result.exit_code == 0, result.output
    return out
