"""`llava-bench`: the PyTorch reference against the runtime on identical inputs, with the
machine's roofline; `llava-bench serve`: llava-serve under concurrent streaming clients.
Thin commands: parse options, call exporter.bench.run.run_bench or
exporter.bench.serve.run_serve_bench, print the table (progress goes to stderr). User errors
print as one `error:` line, exit 2.

`llava-bench` is a click group that runs the PyTorch-against-runtime bench itself when no
subcommand is named, so `llava-bench --model SRC --artifacts DIR ...` works as it always did;
its --model and --artifacts are checked here rather than by click (a required group option
would be required before `serve` too)."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from exporter.cli import needs_extra, source_options, user_errors
from runtime.backends import BACKENDS

json_option = click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Write every figure as JSON here."
)


@click.group(invoke_without_command=True, subcommand_metavar="[serve|llamacpp [OPTIONS]]")
@source_options(required=False, what="  [required]")
@click.option(
    "--artifacts",
    type=click.Path(path_type=Path),
    help="Artifact folder exported from --model.  [required]",
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
@json_option
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
@click.option(
    "--decoder-only",
    is_flag=True,
    help="The decoder alone on a --prompt-len text prompt, against a --reference-layers cut of the "
    "PyTorch decoder (float32, read from the checkpoint) scaled to the whole depth: for a decoder "
    "whose float32 copy does not fit in memory (a 7B on 24 GB).",
)
@click.option(
    "--reference-layers",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="With --decoder-only: decoder layers of the PyTorch cut.",
)
@click.pass_context
def main(ctx: click.Context, **options):
    """Side-by-side speed and memory of PyTorch and the runtime, against this machine's roofline.

    `llava-bench serve --help`: llava-serve's aggregate tokens/s and latencies under 1, 4, 16
    concurrent clients, against the batched decode step's roofline.

    `llava-bench llamacpp --help`: the decoder against llama.cpp's llama-bench on the same
    weights (GGUF), rounds alternating."""
    given = [name for name in options if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if ctx.invoked_subcommand is not None:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise click.UsageError(f"{flags}: put the options of `{ctx.invoked_subcommand}` after its name")
        return
    for name in ("model", "artifacts"):
        if options[name] is None:
            raise click.MissingParameter(ctx=ctx, param=next(p for p in ctx.command.params if p.name == name))
    bench(**options)


@user_errors
@needs_extra("export", "llava-bench")
def bench(**options):
    from exporter.bench.run import BenchConfig, run_bench

    report = run_bench(BenchConfig(**options))
    click.echo(report.table())


@main.command("serve")
@click.option(
    "--artifacts",
    type=click.Path(path_type=Path),
    help="Artifact folder to serve in this process (with --url: the folder that server serves, "
    "for the KV figures and the question's length).",
)
@click.option("--url", help="A running llava-serve (http://HOST:PORT) instead of one in this process.")
@source_options(
    required=False, what=" The one --artifacts were exported from, for the roofline  [default: no roofline]"
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="ort",
    show_default=True,
    help="The in-process server's backend.",
)
@click.option(
    "--clients",
    default="1,4,16",
    show_default=True,
    help="Concurrent streaming clients, one measurement for each count (comma-separated).",
)
@click.option(
    "--requests",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Requests each client sends back to back.",
)
@click.option(
    "--prompt-len",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Text tokens of each request's question; the template and the image add theirs.",
)
@click.option(
    "--new-tokens", type=click.IntRange(1), default=32, show_default=True, help="max_tokens of each request."
)
@click.option(
    "--warmup",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="Requests sent alone first, not counted.",
)
@click.option(
    "--ignore-eos/--honour-eos",
    default=True,
    show_default=True,
    help="Send ignore_eos (vLLM's extension): answers run to max_tokens. Tokens are counted from "
    "the server's usage either way.",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    help="The in-process server's ONNX Runtime intra-op threads (and torch's, for the machine's "
    "rates)  [default: all cores]",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1),
    help="The in-process server's --max-batch  [default: the largest --clients]",
)
@click.option("--api-key", envvar="LLAVA_API_KEY", help="The --url server's API key (or set LLAVA_API_KEY).")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0, min_open=True),
    default=600.0,
    show_default=True,
    help="Seconds a client waits for the next chunk.",
)
@json_option
@click.option(
    "--bandwidth-mib",
    type=click.IntRange(1),
    default=1024,
    show_default=True,
    help="Buffer for the bandwidth measurement (with --model).",
)
@click.option(
    "--gemm-size",
    type=click.IntRange(16),
    default=2048,
    show_default=True,
    help="n of the n x n x n float32 GEMM measuring the FLOP rate (with --model).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the images.")
@user_errors
def serve(clients, **options):
    """llava-serve under N concurrent streaming clients, for each N of --clients: aggregate
    tokens/s, TTFT and inter-token latency, against the batched decode step's roofline."""
    from exporter.bench.serve import ServeBenchConfig, parse_clients, run_serve_bench

    report = run_serve_bench(ServeBenchConfig(clients=parse_clients(clients), **options))
    click.echo(report.table())


@main.command("llamacpp")
@source_options(what=" The one --artifacts were exported from (for the reference cut and the roofline).")
@click.option(
    "--artifacts", required=True, type=click.Path(path_type=Path), help="Artifact folder to measure."
)
@click.option(
    "--gguf",
    required=True,
    type=click.Path(path_type=Path),
    help="The same weights as llama.cpp's GGUF (scripts/llamacpp_peer.sh gguf).",
)
@click.option(
    "--llama-bench",
    "llama_bench",
    required=True,
    help="llama.cpp's llama-bench binary (scripts/llamacpp_peer.sh build).",
)
@click.option(
    "--prompt-len", type=click.IntRange(1), default=640, show_default=True, help="Prefill tokens (text)."
)
@click.option(
    "--new-tokens",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Decode steps after the --prompt-len context.",
)
@click.option(
    "--rounds",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Rounds, each running ours then llama.cpp's; figures are medians.",
)
@click.option("--threads", type=click.IntRange(1), help="Threads of both (and torch's)  [default: all cores]")
@click.option(
    "--reference-layers",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Decoder layers of llava-bench --decoder-only's PyTorch cut.",
)
@json_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the token ids.")
@user_errors
@needs_extra("export", "llava-bench llamacpp")
def llamacpp(**options):
    """The decoder against llama.cpp on the same weights: prefill and decode at --prompt-len,
    rounds alternating between the two, ratios above 1 where this project is faster."""
    from exporter.bench.peer import PeerConfig, run_peer_bench

    report = run_peer_bench(PeerConfig(**options))
    click.echo(report.table())


if __name__ == "__main__":
    main()
