"""`llava-bench`: the PyTorch reference against the runtime on identical inputs, with the
machine's roofline. A thin command: parses options, calls exporter.bench.run.run_bench,
prints the table (progress goes to stderr). User errors print as one `error:` line, exit 2."""

from __future__ import annotations

from pathlib import Path

import click

from exporter.cli import needs_extra, source_options, user_errors
from runtime.backends import BACKENDS


@click.command()
@source_options
@click.option(
    "--artifacts",
    required=True,
    type=click.Path(path_type=Path),
    help="Artifact folder exported from --model.",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="ort",
    show_default=True,
    help="Runtime backend to measure.",
)
@click.option(
    "--batch", type=click.IntRange(1), default=1, show_default=True, help="Sequences per run, one image each."
)
@click.option(
    "--prompt-len",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Text tokens per prompt; the image adds its own tokens.",
)
@click.option(
    "--new-tokens",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Decode steps after the prefill's token (EOS ignored).",
)
@click.option(
    "--warmup", type=click.IntRange(0), default=1, show_default=True, help="Discarded runs per side."
)
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Measured runs per side; figures are medians.",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    help="torch threads = ONNX Runtime intra-op threads  [default: all cores]",
)
@click.option(
    "--reference-dtype",
    type=click.Choice(["auto", "float32", "float16"]),
    default="auto",
    show_default=True,
    help="PyTorch dtype; auto matches the decoder graph.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write every figure as JSON here.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    help="PNG of tokens/s against prompt length (needs matplotlib).",
)
@click.option(
    "--bandwidth-mib",
    type=click.IntRange(1),
    default=1024,
    show_default=True,
    help="Buffer for the bandwidth measurement (keep it far above the L3 cache).",
)
@click.option(
    "--gemm-size",
    type=click.IntRange(16),
    default=2048,
    show_default=True,
    help="n of the n x n x n float32 GEMM measuring the FLOP rate.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for pixels and token ids.")
@user_errors
@needs_extra("export", "llava-bench")
def main(**options):
    """Side-by-side speed and memory of PyTorch and the runtime, against this machine's roofline."""
    from exporter.bench.run import BenchConfig, run_bench

    report = run_bench(BenchConfig(**options))
    click.echo(report.table())


if __name__ == "__main__":
    main()
