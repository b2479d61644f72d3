"""`llava-bench serve`: llava-serve under N concurrent streaming clients, against the batched
roofline of its decode step.

    llava-bench serve --artifacts DIR [--model SRC] [--clients 1,4,16] [--requests 2] [--json PATH]
    llava-bench serve --url http://HOST:PORT [--artifacts DIR] [--model SRC] ...

Without `--url` the server runs in this process (runtime.serve's own app and Engine, uvicorn on
a loopback port in a thread, `--max-batch` rows: by default the largest N, so every client
gets a row). For each N of `--clients`, N clients each send `--requests` streaming chat
requests back to back: one image each (seeded noise at the model's crop size, a different one
per client), a fixed question of about `--prompt-len` tokens, `max_tokens=--new-tokens`,
temperature 0, `ignore_eos` (vLLM's extension, which llava-serve takes; `--honour-eos` leaves
it out). Tokens are what the server's usage chunk says each answer generated, so an answer
that stopped early counts what it really produced.

Figures for each N (the clients' from the SSE chunks' arrival times, the decode steps' from
the server's /metrics, scraped before and after the N's window, in this process or at --url):
    tok/s          tokens received over the window, from the clients' start to the last answer's end
    x one client   that over the 1-client figure
    roofline       N tokens per batched decode step at max(weight bytes / read bandwidth,
                   decode FLOPs for N rows / GEMM rate) (exporter.bench.roofline; needs --model)
    step tok/s     the decode steps' own rate, prefills left out: the window's growth of
                   llava_decode_step_rows_sum (a token per row per step) over that of
                   llava_decode_step_seconds_sum; "step of roof": that over the roofline at
                   the steps' mean rows
    TTFT           request sent -> first content chunk (queue wait and other rows' prefills included)
    ITL            gaps between consecutive content chunks of one answer (a chunk is a token's
                   text; a token that decodes to no text yet sends none)
    rows           the decode steps' mean rows and, in brackets, the smallest
                   llava_decode_step_rows bucket (1, 2, 4, 8, 16, 32, 64) holding every step
    KV MiB         rows x KV bytes per position (2 x layers x kv_heads x head_dim x dtype bytes)
                   x the positions each row holds at the end (prompt + new tokens; a static
                   layout's whole buffer); beside it the growth of this process's peak RSS
                   over the smallest N's (in-process server only)

The scheduler prefills joining requests alone, one per step boundary: with an image per
request that prefill is most of a CPU server's work, so the aggregate tok/s includes it and
the step tok/s does not.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import io
import itertools
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from exporter.bench import roofline as rl
from exporter.bench.memory import RssMeter
from exporter.bench.report import align_columns, fmt, pct, rates_dict, round_or_none
from exporter.progress import Progress
from runtime import contract
from runtime.errors import LlavaError
from runtime.extras import MissingExtra, installed, require

DEFAULT_CLIENTS = (1, 4, 16)
# A question's words: plain English the tokenizer knows, repeated to --prompt-len tokens.
QUESTION_WORDS = "describe the picture in detail and say what shapes colours and objects it shows".split()
STEP_SECONDS, STEP_ROWS = "llava_decode_step_seconds", "llava_decode_step_rows"  # /metrics histograms


@dataclass
class ServeBenchConfig:
    artifacts: Path | None = None
    url: str | None = None  # a running server; None: start one in this process
    model: str | None = None  # the source, for the roofline's costs; None: no roofline
    vision_tower: str | None = None
    backend: str = "ort"
    clients: tuple[int, ...] = DEFAULT_CLIENTS
    requests: int = 2  # per client, back to back
    prompt_len: int = 32  # text tokens of the question; the template and the image add theirs
    new_tokens: int = 32  # max_tokens of each request
    warmup: int = 1  # requests sent alone before the sweep, not counted
    threads: int | None = None  # the in-process server's ONNX Runtime threads; None: every core
    max_batch: int | None = None  # the in-process server's --max-batch; None: the largest N
    ignore_eos: bool = True
    api_key: str | None = None
    timeout_s: float = 600.0  # longest wait for one chunk
    json_path: Path | None = None
    bandwidth_mib: int = 1024
    gemm_size: int = 2048
    seed: int = 0

    def __post_init__(self):
        from exporter.bench.run import available_cpus

        self.artifacts = None if self.artifacts is None else Path(self.artifacts)
        self.clients = tuple(sorted(set(self.clients)))
        if not self.clients or min(self.clients) < 1:
            raise LlavaError(f"--clients must be whole numbers of at least 1, not {self.clients}")
        self.threads = self.threads or available_cpus()
        self.max_batch = self.max_batch or max(self.clients)
        if self.url is None and self.artifacts is None:
            raise LlavaError("give --artifacts (the folder to serve here) or --url (a running llava-serve)")
        if self.url is not None:
            self.url = self.url.rstrip("/")
            if not self.url.startswith(("http://", "https://")):
                raise LlavaError(f"--url {self.url}: give the server's address, http://HOST:PORT")


def parse_clients(text: str) -> tuple[int, ...]:
    """ "1,4,16" -> (1, 4, 16); LlavaError naming the flag otherwise."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise LlavaError(f"--clients {text!r}: give client counts of at least 1, comma-separated (1,4,16)")
    return counts


@contextlib.contextmanager
def in_process_server(config: ServeBenchConfig, progress: Progress):
    """llava-serve's app over `config.artifacts` on a free loopback port, in a thread:
    yields (its URL, the served model's name, the Pipeline)."""
    from runtime.pipeline import Pipeline
    from runtime.serve.app import Settings, create_app, running_in_thread
    from runtime.serve.engine import Engine

    with progress.stage(f"loading {config.artifacts} ({config.backend}, {config.threads} threads)"):
        pipe = Pipeline.load(config.artifacts, backend=config.backend, threads=config.threads)
    with contextlib.closing(pipe):
        engine = Engine(pipe, max_batch=config.max_batch, max_queue=max(64, max(config.clients)))
        name = config.artifacts.resolve().name
        with running_in_thread(create_app(engine, Settings(model_name=name))) as url:
            yield url, name, pipe


# ---------------------------------------------------------------------------------------------
# The clients


@dataclass
class RequestRecord:
    """One streamed request as its client saw it (perf_counter seconds)."""

    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk with content
    end: float = 0.0
    completion_tokens: int | None = None  # the usage chunk's
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason is not None

    @property
    def tokens(self) -> int:
        """Tokens generated: the server's count, else (no usage chunk) the content chunks."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunks)

    def read_event(self, event: dict, arrived: float) -> None:
        """One SSE chunk's error, usage, content and finish reason."""
        if "error" in event:
            self.error = f"stream error: {event['error'].get('message')}"
        usage = event.get("usage") or {}
        self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)
        self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
        for choice in event.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                self.chunks.append(arrived)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason


def client_images(count: int, size: int, seed: int) -> list[str]:
    """One seeded noise image per client as a PNG data: URL (encoded once, sent with every request)."""
    from PIL import Image

    urls = []
    for client in range(count):
        pixels = np.random.default_rng(seed + client).integers(0, 256, (size, size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def question(prompt_len: int, tokenizer=None) -> tuple[str, int | None]:
    """(a question of about `prompt_len` tokens, its token count when a tokenizer counted it).
    Without a tokenizer a word stands for a token; with one, words that would overshoot are
    skipped for later, shorter ones, so the count lands at `prompt_len` or just under it."""
    if tokenizer is None:
        return " ".join(itertools.islice(itertools.cycle(QUESTION_WORDS), prompt_len)), None

    def count(words: list[str]) -> int:
        return len(tokenizer.encode(" ".join(words), add_special_tokens=False).ids)

    words: list[str] = []
    misses = 0
    for word in itertools.cycle(QUESTION_WORDS):
        if misses == len(QUESTION_WORDS):  # a whole round without a word that fits
            break
        fits = count([*words, word]) <= prompt_len
        words, misses = ([*words, word], 0) if fits else (words, misses + 1)
    words = words or [min(QUESTION_WORDS, key=lambda word: count([word]))]  # none fits: the shortest
    return " ".join(words), count(words)


def request_body(config: ServeBenchConfig, model: str, text: str, image_url: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": config.new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return {**body, "ignore_eos": True} if config.ignore_eos else body


def error_text(payload: str) -> str:
    try:
        return json.loads(payload)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return payload.strip()[:200]


def http_options(config: ServeBenchConfig, connections: int = 1) -> dict:
    import httpx

    return {
        "headers": {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {},
        "timeout": httpx.Timeout(config.timeout_s, connect=30.0),
        "limits": httpx.Limits(max_connections=connections + 4, max_keepalive_connections=connections + 4),
    }


async def stream_one(http, url: str, body: dict) -> RequestRecord:
    import httpx

    record = RequestRecord(time.perf_counter())
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                payload = (await response.aread()).decode("utf-8", "replace")
                record.error = f"HTTP {response.status_code}: {error_text(payload)}"
            else:
                await read_stream(response, record)
    except httpx.HTTPError as err:
        record.error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    record.end = time.perf_counter()
    if record.error is None and record.finish_reason is None:
        record.error = "the stream ended without a finish_reason"
    return record


async def read_stream(response, record: RequestRecord) -> None:
    """The SSE lines of one answer into its record, up to [DONE] or an error."""
    async for line in response.aiter_lines():
        arrived, data = time.perf_counter(), line[5:].strip() if line.startswith("data:") else ""
        if data == "[DONE]":
            return
        if data:
            record.read_event(json.loads(data), arrived)
            if record.error:
                return


async def drive(config: ServeBenchConfig, url: str, bodies: list[list[dict]]) -> tuple[list, float]:
    """Client i sends bodies[i] back to back, all clients at once: (the records, the window's seconds)."""
    import httpx

    async def one_client(http, own: list[dict]) -> list[RequestRecord]:
        return [await stream_one(http, url, body) for body in own]

    async with httpx.AsyncClient(**http_options(config, len(bodies))) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(http, own) for own in bodies))
    records = [record for own in results for record in own]
    return records, max(record.end for record in records) - start


def get(config: ServeBenchConfig, url: str) -> str:
    import httpx

    with httpx.Client(**http_options(config)) as http:
        response = http.get(url)
    if response.status_code != 200:
        raise LlavaError(f"GET {url}: HTTP {response.status_code}: {error_text(response.text)}")
    return response.text


def server_info(config: ServeBenchConfig, url: str) -> tuple[str, str]:
    """(the served model's name, the backend /health names), or a LlavaError naming --url."""
    import httpx

    try:
        models, health = (json.loads(get(config, url + path)) for path in ("/v1/models", "/health"))
        return models["data"][0]["id"], str(health.get("backend", "?"))
    except httpx.HTTPError as err:
        raise LlavaError(f"--url {url}: no llava-serve answers there ({type(err).__name__}: {err})") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise LlavaError(f"--url {url}: no model in its /v1/models answer: is it llava-serve?") from None


# ---------------------------------------------------------------------------------------------
# The server's decode steps (/metrics)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def share(value: float | None, of: float | None) -> float | None:
    return value / of if value is not None and of else None


def significant(value: float | None, digits: int = 4) -> float | None:
    """`digits` significant digits (shares of a roofline far above the run are small)."""
    return None if value is None else float(f"{value:.{digits}g}")


@dataclass
class StepCounts:
    """The server's decode-step histograms at one scrape of /metrics, or the growth between
    two: steps run, their seconds and rows summed, and steps of at most `le` rows (buckets)."""

    steps: float
    seconds: float
    rows: float  # = the tokens the steps made, one per row
    at_most: dict[float, float]  # llava_decode_step_rows' cumulative buckets, le -> steps

    def __sub__(self, earlier: StepCounts) -> StepCounts:
        at_most = {le: n - earlier.at_most.get(le, 0.0) for le, n in self.at_most.items()}
        return StepCounts(
            self.steps - earlier.steps, self.seconds - earlier.seconds, self.rows - earlier.rows, at_most
        )

    @property
    def mean_rows(self) -> float | None:
        return self.rows / self.steps if self.steps else None

    def figures(self, window_s: float) -> dict:
        """max_rows_bucket: the smallest finite bucket that holds every step (None: none does)."""
        holding = [le for le, n in self.at_most.items() if n >= self.steps and le != float("inf")]
        return {
            "decode_steps": round(self.steps),
            "decode_tokens": round(self.rows),
            "decode_s": round(self.seconds, 6),
            "decode_share_of_window": round_or_none(share(self.seconds, window_s), 4),
            "step_tokens_per_s": round_or_none(share(self.rows, self.seconds), 3),
            "mean_rows": round_or_none(self.mean_rows, 3),
            "max_rows_bucket": min(holding, default=None) if self.steps else None,
        }


NO_STEPS = dict.fromkeys(StepCounts(0, 0, 0, {}).figures(0))  # StepCounts.figures' keys: no step metrics


def parse_step_counts(text: str) -> StepCounts | None:
    """The decode-step histograms of a Prometheus text page; None when it has none (an older server)."""
    values, at_most = {}, {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith(STEP_ROWS + "_bucket{"):
            at_most[float(re.search(r'le="([^"]+)"', name).group(1))] = float(value)
        elif name and not line.startswith("#"):
            values[name] = float(value)
    names = (STEP_SECONDS + "_count", STEP_SECONDS + "_sum", STEP_ROWS + "_sum")
    return StepCounts(*(values[name] for name in names), at_most) if set(names) <= set(values) else None


# ---------------------------------------------------------------------------------------------
# Figures


@dataclass
class Level:
    """One N's window: its requests, the server's decode steps in it (None: no such metrics),
    this process's peak RSS in it (in-process server only)."""

    clients: int
    records: list[RequestRecord]
    window_s: float
    steps: StepCounts | None
    rss_peak_mib: float | None = None

    @property
    def done(self) -> list[RequestRecord]:
        return [record for record in self.records if record.ok]

    @property
    def tokens_per_s(self) -> float:
        return sum(record.tokens for record in self.done) / self.window_s if self.window_s > 0 else 0.0

    def latencies_ms(self) -> tuple[list[float], list[float]]:
        """(TTFT of each answer, every gap between two of an answer's content chunks)."""
        ttft = [(record.chunks[0] - record.sent) * 1e3 for record in self.done if record.chunks]
        itl = [(b - a) * 1e3 for record in self.done for a, b in zip(record.chunks, record.chunks[1:])]
        return ttft, itl


@dataclass
class ServeReport:
    config: ServeBenchConfig
    server: dict  # url, served_model, backend
    machine: dict
    manifest: contract.Manifest | None
    decoder: rl.DecoderCost | None
    rates: rl.MachineRates | None  # the best of before and after
    levels: list[Level]
    question_tokens: int | None
    memory_method: str = ""

    def prompt_tokens(self) -> int | None:
        counts = [
            record.prompt_tokens for level in self.levels for record in level.done if record.prompt_tokens
        ]
        return round(statistics.median(counts)) if counts else None

    def roofline_step(self, rows: float | None) -> rl.Phase | None:
        """The bound of one decode step of `rows` rows at the run's mean context."""
        prompt = self.prompt_tokens()
        if self.decoder is None or self.rates is None or prompt is None or not rows:
            return None
        context = round(prompt + (self.config.new_tokens + 1) / 2)
        return rl.phase(self.rates, self.decoder.weight_bytes, self.decoder.decode_flops(context, rows))

    def roofline_tokens_per_s(self, rows: float | None) -> float | None:
        step = self.roofline_step(rows)
        return None if step is None else rows / (step.ms / 1e3)

    def kv(self) -> dict:
        """A row's KV cache: bytes per position x the positions it holds at its end."""
        graph = self.manifest.graphs["decoder"] if self.manifest is not None else None
        if graph is None:
            return dict.fromkeys(("layout", "bytes_per_position", "positions_per_row", "mib_per_row"))
        text, prompt = self.manifest.text, self.prompt_tokens()
        per_position = (
            2 * text.num_layers * text.num_kv_heads * text.head_dim * rl.BYTES_PER_ELEMENT[graph.dtype]
        )
        positions = prompt and prompt + self.config.new_tokens
        if graph.kv_cache == contract.KV_STATIC:  # the whole buffer, whatever the row holds
            positions = graph.max_seq_len
        mib = significant(positions and per_position * positions / 2**20)
        return {
            "layout": graph.kv_cache,
            "bytes_per_position": per_position,
            "positions_per_row": positions,
            "mib_per_row": mib,
        }

    def figures(self, level: Level) -> dict:
        """Every figure of one N: its JSON, which the table formats."""
        done, clients, (ttft, itl) = level.done, level.clients, level.latencies_ms()
        one = next((other.tokens_per_s for other in self.levels if other.clients == 1), None)
        steps = NO_STEPS if level.steps is None else level.steps.figures(level.window_s)
        roof, roof_tps = self.roofline_step(clients), self.roofline_tokens_per_s(clients)
        kv_row, first_rss = self.kv()["mib_per_row"], self.levels[0].rss_peak_mib
        return {
            "clients": clients,
            "requests_completed": len(done),
            "requests_failed": len(level.records) - len(done),
            "errors": sorted({record.error for record in level.records if record.error}),
            "early_stops": sum(record.finish_reason == "stop" for record in done),
            "tokens": sum(record.tokens for record in done),
            "content_chunks": sum(len(record.chunks) for record in done),
            "window_s": round(level.window_s, 6),
            "tokens_per_s": round(level.tokens_per_s, 3),
            "times_one_client": round_or_none(share(level.tokens_per_s, one), 3),
            **{f"ttft_p{q}_ms": round_or_none(percentile(ttft, q), 1) for q in (50, 99)},
            **{f"itl_p{q}_ms": round_or_none(percentile(itl, q), 2) for q in (50, 99)},
            **steps,
            "roofline": None if roof is None else {**roof.as_dict(), "tokens_per_s": round(roof_tps, 3)},
            "share_of_roofline": significant(share(level.tokens_per_s, roof_tps)),
            "step_share_of_roofline": significant(
                share(steps["step_tokens_per_s"], self.roofline_tokens_per_s(steps["mean_rows"]))
            ),
            "kv_mib": significant(kv_row and kv_row * clients),
            "rss_peak_mib": round_or_none(level.rss_peak_mib, 1),
            "rss_growth_mib": None if first_rss is None else round(level.rss_peak_mib - first_rss, 1),
        }

    def to_dict(self) -> dict:
        settings = {
            **asdict(self.config),
            "api_key": None,
            "in_process": self.config.url is None,
            **self.server,
        }
        settings.update(question_tokens=self.question_tokens, prompt_tokens=self.prompt_tokens())
        rates = None if self.rates is None else rates_dict(self.rates)  # the best of before and after
        model = (
            None
            if self.decoder is None
            else {**asdict(self.decoder), "weight_bytes": self.decoder.weight_bytes}
        )
        return {
            "settings": settings,
            "machine": {**self.machine, "rates": rates, "memory_method": self.memory_method},
            "model": model,
            "kv": self.kv(),
            "levels": [self.figures(level) for level in self.levels],
        }

    # -- the table --------------------------------------------------------------------------

    def table(self) -> str:
        figures = [self.figures(level) for level in self.levels]
        return "\n".join([*self.heading_lines(), "", *level_lines(figures), "", *self.note_lines(figures)])

    def heading_lines(self) -> list[str]:
        config, machine, server, layout = self.config, self.machine, self.server, self.kv()["layout"]
        where = f"in this process, --max-batch {config.max_batch}, {config.threads} threads"
        where = "a running server" if config.url else where
        backend = server["backend"] + (f", {layout} KV" if layout else "")
        eos = "EOS ignored (ignore_eos)" if config.ignore_eos else "EOS honoured"
        lines = [
            f"llava-bench serve: {server['served_model']} ({backend}) at {server['url']} ({where})",
            f"  each client: {config.requests} streaming requests back to back, one image + a "
            f"{self.question_tokens or config.prompt_len}-token question (prompt {self.prompt_tokens() or '?'} "
            f"tokens with the template and image), max_tokens {config.new_tokens}, temperature 0, {eos}",
            f"  machine: {machine['cpu']}, {machine['available_cpus']} cpus, load average "
            f"{machine['load_average_start']} -> {machine.get('load_average_end', '?')}",
        ]
        if self.rates is None:
            return [*lines, "  roofline: n/a (give --model, the source the artifacts were exported from)"]
        return [
            *lines,
            f"  roofline inputs: read {self.rates.read_gb_s:.1f} GB/s, float32 GEMM {self.rates.gemm_gflop_s:.1f} "
            f"GFLOP/s; a decode step reads {self.decoder.weight_bytes / 2**20:,.1f} MiB of weights for all its rows",
        ]

    def note_lines(self, figures: list[dict]) -> list[str]:
        lines = [
            f"  warning: a request failed: {error}"
            for error in sorted({e for f in figures for e in f["errors"]})
        ]
        if sum(f["content_chunks"] for f in figures) < 0.9 * sum(f["tokens"] for f in figures):
            lines.append("  warning: fewer content chunks than tokens (ids that decode to no text send none)")
        for f in figures:
            if f["decode_steps"] is None:
                lines.append(
                    f"  warning: {self.server['url']}/metrics has no {STEP_SECONDS}: no step figures"
                )
            elif f["decode_steps"]:
                lines.append(
                    f"  decode steps at N={f['clients']}: {f['decode_steps']:,} of {f['mean_rows']:.1f} rows on average, "
                    f"{f['decode_s'] / f['decode_steps'] * 1e3:,.1f} ms each, {f['decode_s']:,.1f} s of the "
                    f"{f['window_s']:,.1f} s window (the rest: prefills and regroups)"
                )
        kv = self.kv()
        if kv["mib_per_row"] is not None:
            lines.append(
                f"  KV cache: {kv['bytes_per_position'] / 1024:,.1f} KiB per position x {kv['positions_per_row']} "
                f"positions = {kv['mib_per_row']:,.1f} MiB per row; RSS +MiB: this process's peak over the smallest "
                f"N's ({self.memory_method})"
            )
        return [*lines, *LEGEND]


LEGEND = (
    "  tok/s: tokens received / the window (first request sent to last answer ended), prefills included;"
    " step tok/s: the server's decode steps alone (/metrics), against the roofline at their mean rows",
    "  roofline: N rows a decode step at max(weights / read bandwidth, FLOPs / GEMM rate), (m)emory or"
    " (c)ompute bound; TTFT and ITL: from the content chunks' arrival; rows: mean (largest step's bucket)",
)


def level_lines(figures: list[dict]) -> list[str]:
    header = "clients|done|tok/s|x one client|roofline tok/s|of roof|step tok/s|step of roof|"
    rows = [(header + "TTFT p50 ms|p99|ITL p50 ms|p99|rows|KV MiB|RSS +MiB").split("|")]
    for f in figures:
        roof, bucket, growth = f["roofline"], f["max_rows_bucket"], f["rss_growth_mib"]
        failed = f" ({f['requests_failed']} failed)" if f["requests_failed"] else ""
        rows.append(
            [
                str(f["clients"]),
                f"{f['requests_completed']}{failed}",
                fmt(f["tokens_per_s"]),
                fmt(f["times_one_client"], "x"),
                "n/a" if roof is None else f"{fmt(roof['tokens_per_s'])} ({roof['bound_by'][0]})",
                "n/a" if roof is None else pct(f["share_of_roofline"]),
                fmt(f["step_tokens_per_s"]),
                pct(f["step_share_of_roofline"]),
                *(fmt(f[key]) for key in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")),
                "-"
                if not f["decode_steps"]
                else f"{f['mean_rows']:.1f} ({f'<={bucket:g}' if bucket else '>64'})",
                "n/a" if f["kv_mib"] is None else fmt(f["kv_mib"]),
                "-" if growth is None else f"{'+' if growth >= 0 else '-'}{fmt(abs(growth))}",
            ]
        )
    return align_columns(rows)


# ---------------------------------------------------------------------------------------------
# The run


def check_config(config: ServeBenchConfig) -> None:
    """The --json path and the dependencies, before any compute."""
    path = config.json_path
    if path is not None and (Path(path).is_dir() or not Path(path).parent.is_dir()):
        raise LlavaError(f"--json {path}: give a file path in a folder that exists")
    if config.url is None:
        require("serve", "llava-bench serve (the in-process server; or give --url)")
    if not installed("httpx"):
        raise MissingExtra(
            "llava-bench serve needs httpx for its clients, not installed here: pip install httpx"
        )
    if config.model is not None:
        require("export", "llava-bench serve --model (the roofline's costs)")
        if config.artifacts is None:
            raise LlavaError(
                "--model needs --artifacts too: the folder the server serves, for its decoder's dtype"
            )


def count_model(config: ServeBenchConfig, manifest: contract.Manifest, progress: Progress):
    """The decoder's cost from the source, as llava-bench counts it."""
    import torch

    from exporter.bench.run import check_same_model, model_costs
    from exporter.source import load_source

    torch.set_num_threads(config.threads)
    with progress.stage(f"counting the model's parameters in {config.model}"):
        source = load_source(config.model, vision_tower=config.vision_tower, dtype=torch.float16)
        check_same_model(source, manifest, config)
        return model_costs(source, config, manifest)[0]


def measure_levels(config: ServeBenchConfig, url: str, bodies: list[dict], meter, progress) -> list[Level]:
    """Each N's window, with the server's step counts scraped around it (and, with a meter, this
    process's peak RSS in it)."""
    levels = []
    for clients in config.clients:
        if meter is not None:
            meter.reset_peak()
        before = parse_step_counts(get(config, url + "/metrics"))
        with progress.stage(f"{clients} clients x {config.requests} requests"):
            records, window = asyncio.run(
                drive(config, url, [[bodies[c]] * config.requests for c in range(clients)])
            )
        after = parse_step_counts(get(config, url + "/metrics"))
        steps = after - before if before is not None and after is not None else None
        levels.append(Level(clients, records, window, steps, meter.peak() if meter is not None else None))
        if not levels[-1].done:
            raise LlavaError(f"no request completed with {clients} clients: {records[0].error}")
        progress.say(f"    {levels[-1].tokens_per_s:.2f} tok/s over {window:.1f} s")
    return levels


def run_serve_bench(config: ServeBenchConfig, progress: Progress | None = None) -> ServeReport:
    from exporter.bench.run import load_average, machine_info, measure_rates

    progress = progress or Progress()
    check_config(config)
    manifest = contract.read_manifest(config.artifacts) if config.artifacts is not None else None
    decoder = rates = None
    if config.model is not None:
        decoder = count_model(config, manifest, progress)
        gc.collect()  # the source model goes before the server loads
        rates = measure_rates(config, progress, f"measuring this machine ({config.gemm_size}^3 GEMM)")
    machine = machine_info()
    with contextlib.ExitStack() as stack:
        if config.url is None:
            url, model_name, pipe = stack.enter_context(in_process_server(config, progress))
            backend, tokenizer = pipe.backend.name, pipe.tokenizer
        else:
            url, (model_name, backend) = config.url, server_info(config, config.url)
            tokenizer = local_tokenizer(config.artifacts)
        text, question_tokens = question(config.prompt_len, tokenizer)
        size = manifest.preprocess.crop_size if manifest is not None else 336
        images = client_images(max(config.clients), size, config.seed)
        bodies = [request_body(config, model_name, text, image) for image in images]
        if config.warmup:
            with progress.stage(f"warm-up: {config.warmup} requests alone"):
                warm, _ = asyncio.run(drive(config, url, [[bodies[0]] * config.warmup]))
            if not all(record.ok for record in warm):
                raise LlavaError(f"the warm-up request failed: {next(r.error for r in warm if not r.ok)}")
        meter = RssMeter() if config.url is None else None
        levels = measure_levels(config, url, bodies, meter, progress)
    machine["load_average_end"] = load_average()
    report = ServeReport(
        config=config,
        server={"url": url, "served_model": model_name, "backend": backend},
        machine=machine,
        manifest=manifest,
        decoder=decoder,
        rates=rates and rl.best_rates(rates, measure_rates(config, progress, "measuring this machine again")),
        levels=levels,
        question_tokens=question_tokens,
        memory_method=meter.method if meter is not None else "n/a (the server is another process)",
    )
    if config.json_path is not None:
        Path(config.json_path).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return report


def local_tokenizer(artifacts: Path | None):
    """The artifact folder's tokenizer, to size the question; None without one."""
    path = None if artifacts is None else Path(artifacts) / contract.TOKENIZER_FILE
    if path is None or not path.is_file():
        return None
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(path))
