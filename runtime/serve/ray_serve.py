"""Scale-out on Ray Serve: llava-serve's app and scheduler as replicas behind Ray's HTTP proxy
(docs/serving.md, "Scale-out on Ray Serve").

    llava-serve --ray --artifacts DIR --replicas 2           # a local Ray instance, or --ray-address
    serve deploy docs/ray-serve.yaml                          # a cluster, from a config file (build_app)

Each replica holds one Pipeline, its Engine and the very app `llava-serve` runs alone
(create_app), so the API, streaming and the page are the same. Ray routes a request to a
replica with room (at most `max_ongoing_requests` = the scheduler's --max-batch each: Ray holds
the rest in its own queue instead of ours), autoscales on ongoing requests per replica, and
replaces a replica whose health check fails (its engine unhealthy: see Engine.healthy) or
whose process died. Each response names its replica in the `x-llava-replica` header;
`/metrics` is the answering replica's, `/cluster/metrics` every replica's with a `replica` label.

Needs the `serve-ray` extra (Ray Serve); imported only once that is checked.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Response
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from runtime.pipeline import Pipeline
from runtime.serve.app import Settings, create_app
from runtime.serve.engine import Engine
from runtime.serve.media import MediaPolicy

REPLICA_HEADER = "x-llava-replica"
APP_NAME = "llava"


@dataclass(frozen=True)
class ReplicaConfig:
    """What every replica is built from (pickled to each replica's process)."""

    artifacts: str
    settings: Settings
    backend: str = "ort"
    threads: int | None = None  # ONNX Runtime's intra-op threads per replica
    max_batch: int = 8
    request_timeout_s: float | None = 600.0


@dataclass(frozen=True)
class Scaling:
    """How many replicas and what each takes from the cluster."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max): replicas follow ongoing requests
    cpus: float = 1.0
    gpus: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)  # more serve.deployment options


class LlavaReplica:
    """One replica: the pipeline, its scheduler and the llava-serve app over them."""

    def __init__(self, config: ReplicaConfig):
        self.replica_name = serve.get_replica_context().replica_tag
        self.pipe = Pipeline.load(config.artifacts, backend=config.backend, threads=config.threads)
        # Ray queues what the replica has no row for (max_ongoing_requests = max_batch): the
        # engine's own queue only bridges a finishing row and the next request
        self.engine = Engine(
            self.pipe,
            max_batch=config.max_batch,
            max_queue=config.max_batch,
            request_timeout_s=config.request_timeout_s,
        )
        self.llava_app = create_app(self.engine, config.settings)
        self.llava_app.add_middleware(ReplicaHeader, name=self.replica_name)
        self.llava_app.add_api_route("/replica", self.describe, methods=["GET"])
        self.llava_app.add_api_route("/cluster/metrics", self.cluster_metrics, methods=["GET"])

    def __serve_build_asgi_app__(self):
        return self.llava_app

    def check_health(self) -> None:
        """Ray Serve's health check: raising makes Ray replace this replica."""
        if not self.engine.healthy:
            raise RuntimeError(
                f"replica {self.replica_name}: its {self.pipe.backend.name} engine is unhealthy"
            )

    def metrics_text(self) -> tuple[str, str]:
        """(this replica's name, its Prometheus text): what /cluster/metrics gathers."""
        return self.replica_name, self.llava_app.state.metrics.text().decode()

    async def describe(self) -> dict:
        return {
            "replica": self.replica_name,
            "pid": os.getpid(),
            "backend": self.pipe.backend.name,
            "running": self.engine.batch_size,
            "waiting": self.engine.queue_length,
        }

    async def cluster_metrics(self) -> Response:
        context = serve.get_replica_context()
        handle = serve.get_deployment_handle(context.deployment, context.app_name)
        texts = await handle.broadcast("metrics_text").results_async()
        return Response(labelled_metrics(texts), media_type=CONTENT_TYPE_LATEST)

    def __del__(self):
        self.pipe.close()  # after Ray's wrapper ran the app's shutdown (the engine's stop)


class ReplicaHeader:
    """ASGI middleware: every response says which replica answered it."""

    def __init__(self, app, name: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), name.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


def labelled_metrics(texts: list[tuple[str, str]]) -> str:
    """Several replicas' Prometheus texts as one: each family once, each sample with its
    replica's name as a `replica` label (sum by it for the cluster's totals)."""
    families: dict[str, tuple[str, str, list[str]]] = {}  # name -> (type, help, sample lines)
    for replica, text in texts:
        for family in text_string_to_metric_families(text):
            _kind, _help, lines = families.setdefault(family.name, (family.type, family.documentation, []))
            for sample in family.samples:
                labels = {**sample.labels, "replica": replica}
                rendered = ",".join(f'{key}="{escape(value)}"' for key, value in sorted(labels.items()))
                lines.append(f"{sample.name}{{{rendered}}} {sample.value!r}")
    out = []
    for name, (kind, documentation, lines) in families.items():
        name = (
            f"{name}_total" if kind == "counter" else name
        )  # the parser strips it; the text format keeps it
        out += [f"# HELP {name} {documentation}", f"# TYPE {name} {kind}", *lines]
    return "\n".join(out) + "\n"


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def application(config: ReplicaConfig, scaling: Scaling) -> serve.Application:
    """The Ray Serve application: LlavaReplica as the ingress, scaled as asked."""
    options: dict[str, Any] = {
        "name": "LlavaReplica",
        "max_ongoing_requests": config.max_batch,  # Ray's queue and ours do not fight
        "ray_actor_options": {"num_cpus": scaling.cpus, "num_gpus": scaling.gpus},
        "health_check_period_s": 2,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": config.settings.shutdown_grace_s + 5,
        **scaling.options,
    }
    if scaling.autoscale is None:
        options["num_replicas"] = scaling.replicas
    else:
        low, high = scaling.autoscale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": config.max_batch,  # a replica whose rows are all busy
        }
    deployment = serve.deployment(serve.ingress()(LlavaReplica), **options)
    return deployment.bind(config)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder for `serve run` / `serve deploy` (import_path
    runtime.serve.ray_serve:build_app): `args` are llava-serve's options by their Python names
    (artifacts, backend, threads, max_batch, request_timeout, api_key, served_model_name,
    allowed_local_media_path, allow_remote_images, max_images); the replicas and resources come
    from the config file's deployment section."""
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown or "artifacts" not in args:
        raise ValueError(
            f"build_app takes artifacts and optionally {', '.join(BUILD_ARGS[1:])}; got {sorted(args)}"
        )
    args = dict(args)
    artifacts = str(args.pop("artifacts"))
    media_root = args.pop("allowed_local_media_path", None)
    media = MediaPolicy(
        allowed_local_path=None if media_root is None else Path(media_root).resolve(),
        allow_remote=bool(args.pop("allow_remote_images", False)),
    )
    settings = Settings(
        model_name=args.pop("served_model_name", None) or os.path.basename(os.path.normpath(artifacts)),
        api_key=args.pop("api_key", None),
        media=media,
        max_images=int(args.pop("max_images", 1)),
    )
    config = ReplicaConfig(
        artifacts=artifacts,
        settings=settings,
        backend=args.pop("backend", "ort"),
        threads=args.pop("threads", None),
        max_batch=int(args.pop("max_batch", 8)),
        request_timeout_s=float(args.pop("request_timeout", 600.0)),
    )
    return application(config, Scaling())


BUILD_ARGS = (
    "artifacts",
    "backend",
    "threads",
    "max_batch",
    "request_timeout",
    "api_key",
    "served_model_name",
    "allowed_local_media_path",
    "allow_remote_images",
    "max_images",
)


def run(config: ReplicaConfig, scaling: Scaling, host: str, port: int, address: str | None) -> None:
    """Deploys on a local Ray instance (address None) or joins a cluster, serves until SIGINT
    or SIGTERM, then takes the application down (and the local instance with it)."""
    import ray

    ray.init(address=address, include_dashboard=False, logging_level="warning")
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(config, scaling), name=APP_NAME, route_prefix="/")
        replicas = f"{scaling.autoscale[0]}-{scaling.autoscale[1]}" if scaling.autoscale else scaling.replicas
        print(
            f"llava-serve: {config.settings.model_name} on Ray Serve ({replicas} replicas), http://{host}:{port}/",
            flush=True,
        )
        wait_for_signal()
    finally:
        if address is None:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)  # the cluster and its Serve instance stay for their owner


def wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
