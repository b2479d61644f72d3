"""`llava-serve`: the OpenAI-compatible server over an artifact folder (docs/serving.md).

    llava-serve --artifacts out/toy-fp32            # http://127.0.0.1:8000, the page at /

Needs the `serve` extra (FastAPI, uvicorn, prometheus-client); without it, one line says so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from runtime.errors import LlavaError


@click.command()
@click.option(
    "--artifacts", required=True, type=click.Path(), help="Artifact folder written by `llava-export all`."
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface)."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option(
    "--threads", type=click.IntRange(1), help="ONNX Runtime's intra-op threads  [default: its choice]"
)
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
) -> None:
    from runtime.extras import require

    require("serve", "llava-serve")
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
    with Pipeline.load(artifacts, backend=backend, threads=threads) as pipe:
        engine = Engine(pipe, max_batch=max_batch, max_queue=max_queue, request_timeout_s=request_timeout)
        app = create_app(engine, settings)
        click.echo(
            f"llava-serve: {settings.model_name} on {pipe.backend.name}, http://{host}:{port}/", err=True
        )
        uvicorn.run(
            app, host=host, port=port, log_level="info", timeout_graceful_shutdown=settings.shutdown_grace_s
        )


if __name__ == "__main__":
    main()
