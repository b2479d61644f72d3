"""`llava-export`: thin commands that parse options and call one typed function each.

User errors (runtime.errors.LlavaError) print as one line, without a traceback, exit 2.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from exporter.graphs import DEFAULT_OPSET
from runtime.errors import LlavaError
from runtime.extras import require


def user_errors(command):
    """Turns LlavaError into `error: <message>` and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LlavaError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing half-written was left behind", err=True)
            sys.exit(130)

    return wrapper


def needs_extra(extra: str, feature: str):
    """Checks, before the command imports anything heavy, that `extra` is installed (a
    missing one is a one-line MissingExtra naming it, which user_errors prints)."""

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            require(extra, feature)
            return command(*args, **kwargs)

        return wrapper

    return decorate


def source_options(command=None, *, required: bool = True, what: str = ""):
    """--model and --vision-tower. `required=False` (and `what`, appended to --model's help:
    what it is for) where a command can do without the source; used bare as @source_options."""
    if command is None:
        return functools.partial(source_options, required=required, what=what)
    command = click.option(
        "--vision-tower",
        metavar="PATH",
        help="CLIP tower folder for an original-format model (overrides mm_vision_tower).",
    )(command)
    command = click.option(
        "--model",
        "model",
        required=required,
        metavar="SRC",
        help="Model folder or hub id (HF Llava or original LLaVA format)." + what,
    )(command)
    return command


def model_base_option(command):
    return click.option(
        "--model-base",
        metavar="BASE",
        help="The model a training output in --model was trained on: the LLaVA (or language model) "
        "under a LoRA folder, the language model under a projector-only checkpoint. Merged at export.",
    )(command)


def output_options(command):
    command = click.option(
        "--no-verify",
        "verify",
        is_flag=True,
        flag_value=False,
        default=True,
        help="Skip the ONNX Runtime run against PyTorch (for graphs too big to run here; `llava-export verify` runs it later).",
    )(command)
    command = click.option("--quiet", is_flag=True, help="Print only errors.")(command)
    command = click.option("--force", is_flag=True, help="Replace artifacts of another model in --out.")(
        command
    )
    command = click.option(
        "--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset to emit."
    )(command)
    command = click.option(
        "--fp16", is_flag=True, help="Write float16 graphs (TensorRT takes precision from the graph)."
    )(command)
    command = click.option(
        "--out", required=True, type=click.Path(path_type=Path), help="Artifact folder to write."
    )(command)
    return command


def load(
    model: str,
    vision_tower: str | None,
    fp16: bool,
    progress,
    model_base: str | None = None,
    stream_decoder: bool = False,
):
    """Loads the source in the export dtype: float16 for --fp16, so a 7B model fits in memory
    (and a LoRA merges in it, layer by layer); `stream_decoder`: no weight (source.tensors)."""
    import torch

    from exporter.source import load_source

    dtype = torch.float16 if fp16 else torch.float32
    what = " (its config: the weights are read as they are quantized)" if stream_decoder else ""
    with progress.stage(f"loading {model}" + (f" on {model_base}" if model_base else "") + what):
        return load_source(
            model,
            vision_tower=vision_tower,
            dtype=dtype,
            model_base=model_base,
            stream_decoder=stream_decoder,
        )


def begin(
    command: str,
    model: str,
    vision_tower: str | None,
    model_base: str | None,
    out: Path,
    fp16: bool,
    quiet: bool,
    template: str | None = None,
    stream_decoder: bool = False,
):
    """The common start of an export command: check options, announce, load the source."""
    from exporter.progress import Progress

    check_template(template)
    progress = Progress(quiet)
    progress.say(f"llava-export {command}: {model} -> {out}")
    source = load(model, vision_tower, fp16, progress, model_base, stream_decoder)
    if source.anyres is not None:
        progress.say(f"  {describe_anyres(source)}")
    return source, progress


def streams_decoder(flags: dict, model_base: str | None) -> bool:
    """Whether the decoder is exported float32 and quantized as its weights are read: the float
    decoder is never in memory (graphs/streamed.py), so its parity check cannot run here."""
    return bool(flags["quant"]) and not flags["fp16"] and not model_base


def say_decoder_parity_not_run(progress, model: str, out: Path) -> None:
    progress.say(
        "  parity: not run, the float weights are never all in memory; check the artifacts with "
        f"`llava-export verify --model {model} --artifacts {out}` where the float32 model fits"
    )


def describe_anyres(source) -> str:
    """ "LLaVA-1.6 (anyres): 5 pinpoints of 336-pixel tiles, up to 5 tiles and 2928 tokens an image"."""
    from runtime import anyres

    spec = source.anyres
    return (
        f"LLaVA-1.6 (anyres): {len(spec.grid_pinpoints)} pinpoints of {spec.tile_size}-pixel tiles, "
        f"up to {spec.max_tiles} tiles and {anyres.max_image_token_count(spec, source.vision)} tokens an image"
    )


def check_template(template: str | None) -> None:
    if template is None:
        return
    from runtime.prompts import TEMPLATES

    if template not in TEMPLATES and template != "chat":
        raise click.BadParameter(
            f"unknown template {template!r} (known: {', '.join(sorted(TEMPLATES))}, chat)",
            param_hint="--template",
        )


def template_option(command):
    return click.option(
        "--template",
        metavar="NAME",
        help="Prompt template recorded in the manifest (default: derived from the model).",
    )(command)


def quant_option(command):
    command = click.option(
        "--block-size",
        type=int,
        metavar="N",
        help="With --quant int8|int4: weights per scale and zero point, a power of two >= 16.  [default: 128 at int8, 32 at int4]",
    )(command)
    return click.option(
        "--quant",
        type=click.Choice(["int8", "int4", "w8a8"]),
        default=None,
        help="Quantize the decoder's linear layers: int8|int4 weights (ONNX Runtime's MatMulNBits), or w8a8, int8 weights and activations on the CPU's integer dot products (MatMulInteger). ONNX Runtime only, not TensorRT.",
    )(command)


def kv_cache_options(command):
    command = click.option(
        "--max-seq-len",
        type=click.IntRange(min=2),
        metavar="N",
        help="Longest prompt + answer the static KV cache holds (its buffers' length).  [default: the model's positions, at most 4096]",
    )(command)
    command = click.option(
        "--kv-cache",
        type=click.Choice(["concat", "static"]),
        default="concat",
        show_default=True,
        help="Decoder KV cache layout: concat (past in, past + new out: every runtime) or static (preallocated buffers updated in place: ONNX Runtime only, no per-step copy of the cache).",
    )(command)
    return command


@click.group()
@click.version_option(package_name="llava-export")
def main():
    """Export LLaVA models to ONNX / TensorRT artifacts and check them against PyTorch."""


@main.command()
@source_options
@model_base_option
@output_options
@user_errors
@needs_extra("export", "llava-export vision")
def vision(model, vision_tower, model_base, out, quiet, **flags):
    """CLIP tower + projector -> OUT/vision.onnx."""
    from exporter.graphs.export import ExportOptions, export_graph
    from exporter.graphs.vision import VisionGraph

    source, progress = begin("vision", model, vision_tower, model_base, out, flags["fp16"], quiet)
    export_graph(VisionGraph(source, ExportOptions(**flags)), out, progress)
    progress.say(f"wrote {out / 'vision.onnx'}")


@main.command()
@source_options
@model_base_option
@output_options
@template_option
@quant_option
@kv_cache_options
@user_errors
@needs_extra("export", "llava-export decoder")
def decoder(model, vision_tower, model_base, out, quiet, **flags):
    """Decoder with past-KV I/O -> OUT/decoder.onnx, embed_tokens.npy, tokenizer."""
    from exporter.graphs.decoder import DecoderGraph
    from exporter.graphs.export import ExportOptions, export_graph

    stream = streams_decoder(flags, model_base)
    source, progress = begin(
        "decoder", model, vision_tower, model_base, out, flags["fp16"], quiet, flags["template"], stream
    )
    if stream and flags["verify"]:
        flags["verify"] = False
        say_decoder_parity_not_run(progress, model, out)
    export_graph(DecoderGraph(source, ExportOptions(**flags)), out, progress)
    progress.say(f"wrote {out / 'decoder.onnx'}")


@main.command(name="all")
@source_options
@model_base_option
@output_options
@template_option
@quant_option
@kv_cache_options
@user_errors
@needs_extra("export", "llava-export all")
def all_graphs(model, vision_tower, model_base, out, quiet, **flags):
    """Vision + decoder + tokenizer + manifest: everything the runtime needs."""
    import dataclasses

    from exporter.graphs.decoder import DecoderGraph
    from exporter.graphs.export import ExportOptions, export_graph
    from exporter.graphs.vision import VisionGraph
    from exporter.source import load_vision_weights

    # As `decoder`'s: the decoder streamed, never in memory; only the vision side is read
    # into it, so the vision graph keeps its parity check.
    stream = streams_decoder(flags, model_base)
    source, progress = begin(
        "all", model, vision_tower, model_base, out, flags["fp16"], quiet, flags["template"], stream
    )
    options = ExportOptions(**flags)
    decoder = DecoderGraph(source, dataclasses.replace(options, verify=False) if stream else options)
    decoder.check_options()  # bad decoder options fail before the vision export
    if stream:
        with progress.stage("reading the vision tower and projector (the decoder stays in the checkpoint)"):
            load_vision_weights(source)
    progress.say("[1/2] vision")
    export_graph(VisionGraph(source, options), out, progress)
    progress.say("[2/2] decoder")
    if stream:
        source.model.to("meta")  # the vision side's float32 weights: the decoder needs none of them
        if options.verify:
            say_decoder_parity_not_run(progress, model, out)
    export_graph(decoder, out, progress)
    progress.say(f"wrote {out} (run it: llava-run --artifacts {out} --image IMAGE --prompt TEXT)")


@main.command()
@source_options
@model_base_option
@click.option("--artifacts", required=True, type=click.Path(path_type=Path), help="Artifact folder to check.")
@user_errors
@needs_extra("export", "llava-export verify")
def verify(model, vision_tower, model_base, artifacts):
    """Parity report: every graph in ARTIFACTS against the PyTorch model."""
    from exporter.progress import Progress
    from exporter.verify import verify_artifacts

    progress = Progress()
    progress.say(f"llava-export verify: {artifacts} against {model}")
    source = load(model, vision_tower, False, progress, model_base)
    verify_artifacts(source, artifacts, progress)
    progress.say("all outputs within tolerance")


@main.command()
@click.option(
    "--artifacts",
    "--onnx",
    "artifacts",
    required=True,
    type=click.Path(path_type=Path),
    help="Artifact folder (from `llava-export all`) to build engines for.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    metavar="B",
    help="Most sequences (and images) per run.  [default: 1]",
)
@click.option(
    "--max-input-len",
    type=click.IntRange(min=1),
    metavar="N",
    help="Longest prompt in tokens, image tokens included.  [default: one image + 1024]",
)
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=2),
    metavar="N",
    help="Longest prompt + answer (the KV cache's size).  [default: the model's positions, at most 4096]",
)
@click.option(
    "--timing-cache",
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="TensorRT timing cache to reuse and update.  [default: ~/.cache/llava-export/timing-<gpu>.cache]",
)
@click.option(
    "--workspace",
    type=click.FloatRange(min=0, min_open=True),
    metavar="GB",
    help="Most GPU memory TensorRT may use for scratch while building.  [default: TensorRT's]",
)
@click.option(
    "--dry-run", is_flag=True, help="Check the graphs and print the profiles; build nothing (needs no GPU)."
)
@click.option("--quiet", is_flag=True, help="Print only errors.")
@user_errors
def engine(artifacts, max_batch, max_input_len, max_seq_len, timing_cache, workspace, dry_run, quiet):
    """TensorRT engines for this GPU -> ARTIFACTS/engines/<gpu>-sm<cc>-trt<version>/."""
    from exporter.engine.build import build_engines, plan_engines
    from exporter.progress import Progress

    progress = Progress(quiet)
    progress.say(f"llava-export engine: {artifacts}")
    if dry_run:
        plan = plan_engines(artifacts, max_batch, max_input_len, max_seq_len, progress=progress)
        for line in plan.describe():
            progress.say(f"  {line}")
        progress.say("dry run: the graphs and profiles are fine; nothing was built")
        return
    folder = build_engines(
        artifacts, max_batch, max_input_len, max_seq_len, timing_cache, workspace, progress
    )
    progress.say(
        f"wrote {folder} (run it: llava-run --artifacts {artifacts} --backend trt --image IMAGE --prompt TEXT)"
    )


if __name__ == "__main__":
    main()
