"""`llava-serve`: the OpenAI-compatible server over an artifact folder (docs/serving.md).

    llava-serve --artifacts out/toy-fp32            # http://127.0.0.1:8000, the page at /

Needs the `serve` extra (FastAPI, uvicorn, prometheus-client); without it, one line says so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from runtime.cli import artifact_options
from runtime.errors import LlavaError


@click.command()
@artifact_options
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface)."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--max-batch", default=8, show_default=True, type=click.IntRange(1), help="Rows decoded together."
)
@click.option(
    "--max-queue",
    default=64,
    show_default=True,
    type=click.IntRange(1),
    help="Requests that may wait; then 429.",
)
@click.option(
    "--request-timeout",
    default=600.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Seconds a request may take, queue included; then 504.",
)
@click.option(
    "--api-key",
    envvar="LLAVA_API_KEY",
    help="Require 'Authorization: Bearer KEY' on /v1 (or set LLAVA_API_KEY).",
)
@click.option(
    "--served-model-name", help="The model's name in the API  [default: the artifact folder's name]"
)
@click.option(
    "--allowed-local-media-path",
    type=click.Path(file_okay=False),
    help="Allow file:// image URLs under this folder.",
)
@click.option(
    "--allow-remote-images",
    is_flag=True,
    help="Allow http(s):// image URLs (fetched with a timeout and a size cap).",
)
@click.option(
    "--max-images", default=1, show_default=True, type=click.IntRange(1), help="Images per request."
)
@click.option("--ray", "use_ray", is_flag=True, help="Run as replicas on Ray Serve (the serve-ray extra).")
@click.option(
    "--replicas",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="--ray: replicas, one pipeline each.",
)
@click.option(
    "--autoscale", metavar="MIN:MAX", help="--ray: replicas follow ongoing requests between MIN and MAX."
)
@click.option(
    "--cpus-per-replica",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0),
    help="--ray: CPUs per replica.",
)
@click.option(
    "--gpus-per-replica",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="--ray: GPUs per replica.",
)
@click.option(
    "--ray-address", help="--ray: join this cluster (auto, or ray://HEAD:10001)  [default: a local instance]"
)
@click.option(
    "--max-body-mb",
    default=32.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Largest request body; then 413.",
)
def main(**options):
    """Serve the exported model with the OpenAI chat completions API and a web page."""
    try:
        serve(**options)
    except LlavaError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


def serve(
    artifacts,
    host,
    port,
    backend,
    threads,
    max_batch,
    max_queue,
    request_timeout,
    api_key,
    served_model_name,
    allowed_local_media_path,
    allow_remote_images,
    max_images,
    max_body_mb,
    use_ray=False,
    replicas=1,
    autoscale=None,
    cpus_per_replica=1.0,
    gpus_per_replica=0.0,
    ray_address=None,
) -> None:
    from runtime.extras import require

    require("serve", "llava-serve")
    if use_ray:
        require("serve-ray", "llava-serve --ray")
    elif autoscale or ray_address or replicas != 1:
        raise LlavaError("--replicas, --autoscale and --ray-address take --ray")
    import uvicorn

    from runtime.pipeline import Pipeline
    from runtime.serve.app import Settings, create_app
    from runtime.serve.engine import Engine
    from runtime.serve.media import MediaPolicy

    media_root = None
    if allowed_local_media_path is not None:
        media_root = Path(allowed_local_media_path).resolve()
        if not media_root.is_dir():
            raise LlavaError(f"--allowed-local-media-path {allowed_local_media_path}: no such folder")
    settings = Settings(
        model_name=served_model_name or Path(artifacts).resolve().name,
        api_key=api_key,
        media=MediaPolicy(allowed_local_path=media_root, allow_remote=allow_remote_images),
        max_images=max_images,
        max_body_bytes=int(max_body_mb * 2**20),
    )
    if use_ray:
        from runtime import contract
        from runtime.serve import ray_serve

        contract.read_manifest(Path(artifacts))  # a wrong folder fails here, not in every replica
        config = ray_serve.ReplicaConfig(
            str(Path(artifacts).resolve()), settings, backend, threads, max_batch, request_timeout
        )
        scaling = ray_serve.Scaling(replicas, parse_autoscale(autoscale), cpus_per_replica, gpus_per_replica)
        ray_serve.run(config, scaling, host, port, ray_address)
        return
    with Pipeline.load(artifacts, backend=backend, threads=threads) as pipe:
        engine = Engine(pipe, max_batch=max_batch, max_queue=max_queue, request_timeout_s=request_timeout)
        app = create_app(engine, settings)
        click.echo(
            f"llava-serve: {settings.model_name} on {pipe.backend.name}, http://{host}:{port}/", err=True
        )
        uvicorn.run(
            app, host=host, port=port, log_level="info", timeout_graceful_shutdown=settings.shutdown_grace_s
        )


def parse_autoscale(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    low, colon, high = text.partition(":")
    if not (colon and low.isdigit() and high.isdigit() and int(low) <= int(high) and int(high) >= 1):
        raise LlavaError(f"--autoscale {text}: give MIN:MAX replicas, e.g. 1:4")
    return int(low), int(high)


if __name__ == "__main__":
    main()
