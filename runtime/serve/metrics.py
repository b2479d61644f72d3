"""`GET /metrics`: the server's counters in Prometheus' text format (prometheus_client).

Each app has its own registry, so several servers (tests, Ray replicas) in one process do not
share counts. Names follow vLLM's where they mean the same (`llava:` instead of `vllm:`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from runtime.serve.engine import Engine, Finish, Observer

# Seconds: from 5 ms (a toy model's token) to a minute (a queued 7B prompt on a CPU)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics(Observer):
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llava_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "llava_prompt_tokens",
            "Prompt tokens of finished requests, image tokens included",
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "llava_generation_tokens", "Tokens generated for finished requests", registry=self.registry
        )
        self.finished_requests = Counter(
            "llava_request_success",
            "Requests that finished, by finish reason",
            ["finish_reason"],
            registry=self.registry,
        )
        self.failed_requests = Counter(
            "llava_request_failure", "Requests that failed in the scheduler", registry=self.registry
        )
        self.ttft = Histogram(
            "llava_time_to_first_token_seconds",
            "From submit (queue wait included) to the first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "llava_inter_token_latency_seconds",
            "Between consecutive tokens of one request",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "llava_decode_step_seconds",
            "One batched decode step, all running rows",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.step_rows = Histogram(
            "llava_decode_step_rows",
            "Rows in one batched decode step",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.queue = Gauge("llava_num_requests_waiting", "Requests in the queue", registry=self.registry)
        self.running = Gauge(
            "llava_num_requests_running", "Rows in the running batch", registry=self.registry
        )

    def watch(self, engine: Engine) -> None:
        """Queue length and batch size are read from the engine at each scrape."""
        self.queue.set_function(lambda: engine.queue_length)
        self.running.set_function(lambda: engine.batch_size)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def step(self, rows: int, seconds: float) -> None:
        self.step_seconds.observe(seconds)
        self.step_rows.observe(rows)

    def finished(self, finish: Finish) -> None:
        self.prompt_tokens.inc(finish.prompt_tokens)
        self.generation_tokens.inc(finish.completion_tokens)
        self.finished_requests.labels(finish.reason).inc()

    def failed(self) -> None:
        self.failed_requests.inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
