"""`llava-bench`: the PyTorch reference and the runtime, side by side, in one process.

Both sides get identical inputs: the same seeded pixel values (one image per sequence) and the
same random text token ids around the image, then each runs its own whole pipeline:

    image encode   reference: VisionEncoder (tower, layer select, projector), eager, no_grad
                   runtime:   backend.encode_images (vision.onnx)
    splice         text embeddings | image embeddings | text embeddings -> [B, L, hidden]
    prefill        one forward over the L positions with an empty cache -> first token
                   reference: the text model with a transformers DynamicCache + lm_head at the
                   last position; runtime: runtime.generate.prefill
    decode         --new-tokens single-token steps with the cache, greedy (argmax), EOS ignored
                   reference: the same model and cache; runtime: runtime.generate.decode_one_token

A run is all four; `--warmup` runs per side are discarded, then `--repeats` runs alternate
between the sides (so drift in the machine's load hits both alike) and each figure is the
median over them. The machine's read bandwidth and float32 GEMM rate are measured in the same
process, with the same threads, for the roofline (exporter.bench.roofline).

Peak memory is per side: resident growth while loading, and the peak above the pre-run
resident size during each run (Linux: VmHWM, reset through /proc/self/clear_refs before each
phase). Both sides live in one process, so each figure is what that side added.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from exporter.bench import roofline as rl
from exporter.progress import Progress
from runtime import contract, generate
from runtime.errors import LlavaError, PromptError
from runtime.extras import require

REFERENCE = "pytorch"
PLOT_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1)  # --plot sweeps these fractions of --prompt-len


@dataclass
class BenchConfig:
    model: str
    artifacts: Path
    backend: str = "ort"
    batch: int = 1
    prompt_len: int = 32  # text tokens; the image adds its N_img tokens to the prefill
    new_tokens: int = 32  # decode steps after the prefill's token
    warmup: int = 1
    repeats: int = 3
    threads: int | None = None  # None: every core this process may use
    reference_dtype: str = "auto"  # "auto" (the decoder graph's dtype) | "float32" | "float16"
    json_path: Path | None = None
    plot_path: Path | None = None
    vision_tower: str | None = None
    bandwidth_mib: int = 1024
    gemm_size: int = 2048
    seed: int = 0

    def __post_init__(self):
        self.artifacts = Path(self.artifacts)
        if self.threads is None:
            self.threads = available_cpus()
        for flag, value, least in (
            ("--batch", self.batch, 1),
            ("--prompt-len", self.prompt_len, 1),
            ("--new-tokens", self.new_tokens, 1),
            ("--warmup", self.warmup, 0),
            ("--repeats", self.repeats, 1),
            ("--threads", self.threads, 1),
            ("--bandwidth-mib", self.bandwidth_mib, 1),
            ("--gemm-size", self.gemm_size, 1),
        ):
            if value < least:
                raise LlavaError(f"{flag} must be at least {least}, not {value}")
        if self.reference_dtype not in ("auto", "float32", "float16"):
            raise LlavaError(
                f"--reference-dtype must be auto, float32 or float16, not {self.reference_dtype!r}"
            )


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class BenchInputs:
    pixels: np.ndarray  # [B,3,H,W] float32, normalized-looking noise
    before: np.ndarray  # [B, k] int64: text ids before the image (BOS first when the model has one)
    after: np.ndarray  # [B, m] int64: text ids after it
    image_tokens: int

    @property
    def batch(self) -> int:
        return len(self.pixels)

    @property
    def text_tokens(self) -> int:
        return self.before.shape[1] + self.after.shape[1]

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + self.image_tokens


def make_inputs(manifest: contract.Manifest, batch: int, text_tokens: int, seed: int = 0) -> BenchInputs:
    """Seeded pixels and random ordinary token ids (never BOS, EOS or pad inside the text);
    half the text before the image, as a system prompt would be, the rest after it."""
    rng = np.random.default_rng(seed)
    size = manifest.preprocess.crop_size
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    special = {manifest.tokens.bos, manifest.tokens.pad, *manifest.tokens.eos} - {None}
    ordinary = np.setdiff1d(np.arange(manifest.text.vocab_size), np.array(sorted(special), dtype=np.int64))
    ids = rng.choice(ordinary, size=(batch, text_tokens)).astype(np.int64)
    if manifest.tokens.bos is not None:
        ids[:, 0] = manifest.tokens.bos
    split = max(1, text_tokens // 2)
    return BenchInputs(pixels, ids[:, :split], ids[:, split:], manifest.vision.num_image_tokens)


# ---------------------------------------------------------------------------------------------
# Memory


class RssMeter:
    """This process's resident memory from /proc (Linux); figures are MiB, None elsewhere.

    The peak (VmHWM) is reset by writing 5 to /proc/self/clear_refs; where that is refused the
    peak of a phase is only the resident size sampled after it (a lower bound)."""

    def __init__(self):
        self.available = Path("/proc/self/statm").is_file()
        self.resettable = self.available and self.reset_peak()
        self.sampled_peak = 0.0

    @property
    def method(self) -> str:
        if not self.available:
            return "unavailable (no /proc)"
        if self.resettable:
            return "VmHWM, reset via /proc/self/clear_refs before each phase"
        return "resident size sampled after each phase (peak not resettable: a lower bound)"

    def current(self) -> float:
        if not self.available:
            return 0.0
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def reset_peak(self) -> bool:
        self.sampled_peak = 0.0
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def peak(self) -> float:
        if not self.available:
            return 0.0
        if self.resettable:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        self.sampled_peak = max(self.sampled_peak, self.current())
        return self.sampled_peak


@dataclass
class SideMemory:
    """MiB this side added: `resident` after loading, `load_peak` while loading, and the
    largest peak above the pre-run resident size during a run (`run_peak`)."""

    resident: float = 0.0
    load_peak: float = 0.0
    run_peak: float = 0.0

    @property
    def peak(self) -> float:
        return max(self.load_peak, self.resident + self.run_peak)


# ---------------------------------------------------------------------------------------------
# The two sides


@dataclass
class RunTimes:
    """One run (milliseconds) and the greedy tokens it produced, [B][1 + new_tokens]."""

    image_encode_ms: float
    splice_ms: float
    prefill_ms: float
    decode_ms: float
    end_to_end_ms: float
    tokens: list[list[int]] = field(repr=False)

    @property
    def time_to_first_token_ms(self) -> float:
        return self.image_encode_ms + self.splice_ms + self.prefill_ms


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


class ReferenceSide:
    """The source's LlavaForConditionalGeneration, eager, under torch.no_grad()."""

    name = REFERENCE

    def __init__(self, source):
        from exporter.graphs.vision import VisionEncoder

        model = source.model
        self.encoder = VisionEncoder(model, source.vision.select_layer, source.vision.select_strategy).eval()
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.embed = model.get_input_embeddings()
        self.dtype = next(model.parameters()).dtype

    def run(self, inputs: BenchInputs, new_tokens: int) -> RunTimes:
        import torch
        from transformers import DynamicCache

        with torch.no_grad():
            start = time.perf_counter()
            image_embeds = self.encoder(torch.from_numpy(inputs.pixels).to(self.dtype))  # [B, N_img, hidden]
            encode_ms = ms_since(start)
            splice_start = time.perf_counter()
            before, after = torch.from_numpy(inputs.before), torch.from_numpy(inputs.after)
            embeds = torch.cat([self.embed(before), image_embeds, self.embed(after)], dim=1)  # [B, L, hidden]
            splice_ms = ms_since(splice_start)
            prefill_start = time.perf_counter()
            batch, length = embeds.shape[:2]
            mask = torch.ones(batch, length, dtype=torch.long)
            cache = DynamicCache()
            logits = self.forward(embeds, mask, torch.arange(length).expand(batch, length), cache)
            token = logits.argmax(-1)  # [B]
            prefill_ms = ms_since(prefill_start)
            tokens = [token]
            decode_start = time.perf_counter()
            for step in range(new_tokens):
                mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
                positions = torch.full((batch, 1), length + step, dtype=torch.long)
                token = self.forward(self.embed(token)[:, None], mask, positions, cache).argmax(-1)
                tokens.append(token)
            decode_ms = ms_since(decode_start)
        return RunTimes(
            encode_ms, splice_ms, prefill_ms, decode_ms, ms_since(start), torch.stack(tokens, 1).tolist()
        )

    def forward(self, embeds, mask, positions, cache):
        """embeds [B,S,hidden] -> logits [B,vocab] of the last position; `cache` grows by S."""
        hidden = self.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        ).last_hidden_state
        return self.lm_head(hidden[:, -1]).float()


class RuntimeSide:
    """An artifact folder through runtime.backends and runtime.generate, as llava-run runs it."""

    def __init__(self, pipeline):
        self.backend = pipeline.backend
        self.embed_table = pipeline.embed_table  # [vocab, hidden], memory-mapped
        self.name = self.backend.name

    def run(self, inputs: BenchInputs, new_tokens: int) -> RunTimes:
        table, backend = self.embed_table, self.backend
        start = time.perf_counter()
        image_embeds = backend.encode_images(inputs.pixels)
        encode_ms = ms_since(start)
        splice_start = time.perf_counter()
        sequences = [
            np.concatenate([table[inputs.before[row]], image_embeds[row], table[inputs.after[row]]]).astype(
                backend.dtype, copy=False
            )
            for row in range(inputs.batch)
        ]
        splice_ms = ms_since(splice_start)
        prefill_start = time.perf_counter()
        state = generate.prefill(backend, sequences)
        token = state.logits.argmax(-1)
        prefill_ms = ms_since(prefill_start)
        tokens = [token]
        decode_start = time.perf_counter()
        for _ in range(new_tokens):
            state = generate.decode_one_token(backend, table, token, state)
            token = state.logits.argmax(-1)
            tokens.append(token)
        decode_ms = ms_since(decode_start)
        return RunTimes(
            encode_ms, splice_ms, prefill_ms, decode_ms, ms_since(start), np.stack(tokens, 1).tolist()
        )


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class SideResult:
    name: str
    runs: list[RunTimes]
    memory: SideMemory
    batch: int
    new_tokens: int
    prompt_tokens: int

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(run, attribute) for run in self.runs)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens all sequences of the batch decoded per second (the prefill's token excluded)."""
        decode_ms = self.median("decode_ms")
        return self.batch * self.new_tokens / (decode_ms / 1000) if decode_ms > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        prefill_ms = self.median("prefill_ms")
        return self.batch * self.prompt_tokens / (prefill_ms / 1000) if prefill_ms > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        return {
            "image_encode_ms": self.median("image_encode_ms"),
            "prefill_ms": self.median("prefill_ms"),
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "end_to_end_ms": self.median("end_to_end_ms"),
            "peak_rss_mib": self.memory.peak,
        }

    def as_dict(self) -> dict:
        return {
            **{key: round(value, 3) for key, value in self.metrics().items()},
            "splice_ms": round(self.median("splice_ms"), 3),
            "time_to_first_token_ms": round(self.median("time_to_first_token_ms"), 3),
            "decode_ms": round(self.median("decode_ms"), 3),
            "decode_ms_per_step": round(self.median("decode_ms") / self.new_tokens, 3),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 1),
            "memory_mib": {key: round(value, 1) for key, value in asdict(self.memory).items()},
            "runs": [
                {key: round(value, 3) for key, value in asdict(run).items() if key != "tokens"}
                for run in self.runs
            ],
        }


# (key, label, higher is better); prefill's label gets the token count.
METRICS = (
    ("image_encode_ms", "image encode ms", False),
    ("prefill_ms", "prefill ms", False),
    ("decode_tokens_per_s", "decode tok/s", True),
    ("end_to_end_ms", "end-to-end ms", False),
    ("peak_rss_mib", "peak RSS MiB", False),
)


CEILING_PHASES = {"image_encode_ms": "image encode", "prefill_ms": "prefill", "decode_tokens_per_s": "decode"}


def ratio(runtime: float, reference: float) -> float | None:
    return runtime / reference if reference > 0 else None


def efficiency(value: float, bound: float | None, higher_is_better: bool) -> float | None:
    """Fraction of the roofline reached: 1.0 runs at the bound."""
    if bound is None or value <= 0:
        return None
    return value / bound if higher_is_better else bound / value


def ratio_ceiling(reference: float, bound: float | None, higher_is_better: bool) -> float | None:
    """The ratio a backend running at the roofline would show against this reference: the
    ratio column's ceiling (PyTorch at 80% of a compute-bound phase's roofline leaves 1.25x)."""
    reached = efficiency(reference, bound, higher_is_better)
    return 1 / reached if reached else None


def roofline_metrics(bound: rl.Roofline) -> dict[str, float | None]:
    return {
        "image_encode_ms": bound.image_encode.ms,
        "prefill_ms": bound.prefill.ms,
        "decode_tokens_per_s": bound.decode_tokens_per_s,
        "end_to_end_ms": bound.end_to_end_ms,
        "peak_rss_mib": None,
    }


def greedy_agreement(reference: RunTimes, runtime: RunTimes) -> int:
    """Leading tokens on which every row of the two runs agrees."""
    agree = len(reference.tokens[0])
    for ours, theirs in zip(reference.tokens, runtime.tokens):
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        agree = min(agree, same)
    return agree


@dataclass
class SweepPoint:
    text_tokens: int
    prompt_tokens: int
    prefill_tokens_per_s: dict[str, float]
    decode_tokens_per_s: dict[str, float]
    roofline_prefill_tokens_per_s: float
    roofline_decode_tokens_per_s: float


@dataclass
class BenchReport:
    config: BenchConfig
    machine: dict
    model: dict
    rates: rl.MachineRates  # the best of the two measurements
    rates_before: rl.MachineRates  # the first one alone
    bound: rl.Roofline
    reference: SideResult
    runtime: SideResult
    memory_method: str
    torch_threads: int
    ort_threads: int | None
    greedy_match: int
    reads_between_repeats: list[float] = field(
        default_factory=list
    )  # GB/s, before each repeat and after the last
    sweep: list[SweepPoint] = field(default_factory=list)

    def decode_weight_bytes(self, side: SideResult) -> float:
        """The weight bytes one decode step of this side reads: the graph's own (quantized or
        not) for the runtime, the reference dtype's for PyTorch."""
        if side is self.runtime:
            return self.bound.decode_step.bytes
        return self.model["decoder_params"] * rl.BYTES_PER_ELEMENT[self.model["reference_dtype"]]

    def decode_weight_gb_s(self, side: SideResult) -> float:
        """The weight bytes a side's decode streamed per second (each step reads them once)."""
        return side.decode_tokens_per_s / self.config.batch * self.decode_weight_bytes(side) / 1e9

    def decode_share_of_reads(self, side: SideResult) -> float | None:
        """decode_weight_gb_s over the median read bandwidth measured between the repeats: how
        close decoding came to the memory system as it was during the runs (the roofline columns
        use the best of the before and after measurements instead)."""
        if not self.reads_between_repeats:
            return None
        return self.decode_weight_gb_s(side) / statistics.median(self.reads_between_repeats)

    @property
    def overloaded(self) -> bool:
        """Other processes wanted more cores than there are (1-minute load average)."""
        load = self.machine.get("load_average_start")
        return bool(load) and load[0] > self.machine["available_cpus"]

    @property
    def sides(self) -> list[SideResult]:
        return [self.reference, self.runtime]

    def to_dict(self) -> dict:
        config = self.config
        ref, run = self.reference.metrics(), self.runtime.metrics()
        bound = roofline_metrics(self.bound)
        higher = {key: better for key, _, better in METRICS}
        return {
            "settings": {
                "model": config.model,
                "artifacts": str(config.artifacts),
                "backend": self.runtime.name,
                "batch": config.batch,
                "text_tokens": config.prompt_len,
                "image_tokens": self.model["image_tokens"],
                "prompt_tokens": self.runtime.prompt_tokens,
                "new_tokens": config.new_tokens,
                "warmup": config.warmup,
                "repeats": config.repeats,
                "seed": config.seed,
                "torch_threads": self.torch_threads,
                "ort_intra_op_threads": self.ort_threads,
                "reference_dtype": self.model["reference_dtype"],
                "memory_method": self.memory_method,
                "machine_overloaded": self.overloaded,
            },
            "machine": {
                **self.machine,
                "read_gb_s": round(self.rates.read_gb_s, 2),
                "copy_gb_s": round(self.rates.copy_gb_s, 2),
                "gemm_gflop_s": round(self.rates.gemm_gflop_s, 2),
                "first_measurement": {
                    "read_gb_s": round(self.rates_before.read_gb_s, 2),
                    "copy_gb_s": round(self.rates_before.copy_gb_s, 2),
                    "gemm_gflop_s": round(self.rates_before.gemm_gflop_s, 2),
                },
                "bandwidth_buffer_mib": self.rates.buffer_mib,
                "gemm_size": self.rates.gemm_size,
                "read_gb_s_between_repeats": [round(r, 2) for r in self.reads_between_repeats],
            },
            "model": self.model,
            "roofline": self.bound.as_dict(),
            "results": {side.name: side.as_dict() for side in self.sides},
            "ratios": {key: _round(ratio(run[key], ref[key]), 4) for key, _, _ in METRICS},
            "efficiency": {
                side.name: {
                    key: _round(efficiency(value, bound[key], higher[key]), 4)
                    for key, value in side.metrics().items()
                }
                for side in self.sides
            },
            "decode_weight_gb_s": {side.name: round(self.decode_weight_gb_s(side), 4) for side in self.sides},
            "decode_share_of_read_between_repeats": {
                side.name: _round(self.decode_share_of_reads(side), 4) for side in self.sides
            },
            "ratio_ceiling": {key: _round(ceiling, 4) for key, ceiling in self.ratio_ceilings().items()},
            "greedy_tokens_matching": {"leading": self.greedy_match, "of": config.new_tokens + 1},
            "sweep": [asdict(point) for point in self.sweep],
        }

    def table(self) -> str:
        config, rates = self.config, self.rates
        ref, run = self.reference.metrics(), self.runtime.metrics()
        bound = roofline_metrics(self.bound)
        quant = f", {self.model['decoder_quant']} weights" if self.model.get("decoder_quant") else ""
        lines = [
            f"llava-bench: {config.model} (pytorch, {self.model['reference_dtype']}) vs {config.artifacts} "
            f"({self.runtime.name}, {self.model['decoder_dtype']}{quant})",
            f"  batch {config.batch}, prompt {self.runtime.prompt_tokens} tokens ({config.prompt_len} text + "
            f"{self.model['image_tokens']} image), {config.new_tokens} decode steps; "
            f"warm-up {config.warmup}, repeats {config.repeats}, medians",
            f"  threads: torch {self.torch_threads}, onnxruntime intra-op {self.ort_threads if self.ort_threads is not None else 'n/a'}",
            f"  machine: {self.machine['cpu']}, {self.machine['available_cpus']} cpus, load average "
            f"{self.machine['load_average_start']} -> {self.machine.get('load_average_end', '?')}",
            f"  roofline inputs: read {rates.read_gb_s:.1f} GB/s (copy {rates.copy_gb_s:.1f}), float32 GEMM "
            f"{rates.gemm_gflop_s:.1f} GFLOP/s ({rates.gemm_size}^3); decode reads "
            f"{self.bound.decode_step.bytes / 2**20:.1f} MiB of weights per step",
            "",
        ]
        name = self.runtime.name
        header = [
            "metric",
            "pytorch",
            name,
            f"ratio ({name.split('-')[0]}/pt)",
            "roofline",
            "pt/roof",
            f"{name.split('-')[0]}/roof",
        ]
        rows = [header]
        for key, label, higher in METRICS:
            if key == "prefill_ms":
                label = f"prefill ms ({self.runtime.prompt_tokens} tok)"
            rows.append(
                [
                    label,
                    _fmt(ref[key]),
                    _fmt(run[key]),
                    _fmt(ratio(run[key], ref[key]), "x"),
                    _fmt(bound[key]),
                    _pct(efficiency(ref[key], bound[key], higher)),
                    _pct(efficiency(run[key], bound[key], higher)),
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            lines.append(
                "  ".join(
                    [row[0].ljust(widths[0])]
                    + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
                )
            )
        lines += [""]
        if self.overloaded:
            lines.append(
                f"  warning: the load average ({self.machine['load_average_start'][0]}) exceeds the {self.machine['available_cpus']} "
                "cpus: other work competed for the cores, so multi-threaded timings are noisy (try --threads 1)"
            )
        lines.append(self.ceiling_line())
        if self.reads_between_repeats:
            reads = self.reads_between_repeats
            streamed = ", ".join(
                f"{side.name} {self.decode_weight_gb_s(side):.1f} GB/s ({_pct(self.decode_share_of_reads(side)).strip()})"
                for side in self.sides
            )
            lines.append(
                f"  read bandwidth between repeats: {min(reads):.1f} to {max(reads):.1f} GB/s, median {statistics.median(reads):.1f}; "
                f"decode streamed weights at {streamed} of that median"
            )
        lines += [
            f"  greedy tokens: the runtime matches pytorch on the first {self.greedy_match} of {config.new_tokens + 1}"
            + (
                " (random weights have near-tied logits; divergence is not an error)"
                if self.greedy_match <= config.new_tokens
                else ""
            ),
            "  ratio < 1: the runtime is faster (ms) or smaller (RSS); > 1 on tok/s: faster. x/roof: fraction of the roofline reached",
            f"  peak RSS: {self.memory_method}",
        ]
        return "\n".join(lines)

    def ratio_ceilings(self) -> dict[str, float | None]:
        """Each metric's ratio_ceiling against this run's PyTorch side (None without a roofline)."""
        ref, bound = self.reference.metrics(), roofline_metrics(self.bound)
        return {key: ratio_ceiling(ref[key], bound[key], higher) for key, _, higher in METRICS}

    def ceiling_line(self) -> str:
        """What the roofline leaves for any backend against this PyTorch run, phase by phase."""
        ceilings = self.ratio_ceilings()
        phases = ", ".join(
            f"{ceilings[key]:.2f}x on {phase}"
            for key, phase in CEILING_PHASES.items()
            if ceilings[key] is not None
        )
        return f"  ceiling: a backend at the roofline would show {phases} against this pytorch run"


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | None, suffix: str = "") -> str:
    if value is None:
        return "-"
    if suffix == "x":
        return f"{value:.2f}x"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3g}"


def _pct(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.0f}%" if value >= 0.01 else f"{value * 100:.2g}%"


# ---------------------------------------------------------------------------------------------
# Model and machine descriptions


def decoder_cost(source, dtype: str, bytes_per_weight: float | None = None) -> rl.DecoderCost:
    """Parameter counts from the reference model (exact for every family's layers).
    `bytes_per_weight`: a weight-quantized decoder's (norms are counted at it too: a rounding)."""
    model = source.model
    language_model = model.model.language_model
    layer_params = sum(
        p.numel() for name, p in language_model.named_parameters() if not name.startswith("embed_tokens.")
    )
    lm_head_params = sum(p.numel() for p in model.lm_head.parameters())
    text = source.text
    return rl.DecoderCost(
        layer_params, lm_head_params, text.num_layers, text.num_heads, text.head_dim, dtype, bytes_per_weight
    )


def quantized_bytes_per_weight(path: Path, graph: contract.GraphSpec) -> float:
    """A --quant decoder's stored bytes per weight, from its MatMulNBits settings."""
    from exporter.graphs import quantize

    bits, block_size = quantize.graph_settings(path)
    return quantize.bytes_per_weight(bits, block_size, rl.BYTES_PER_ELEMENT[graph.dtype])


def vision_cost(source) -> rl.VisionCost:
    model = source.model
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel nests it in older transformers
    config = model.model.vision_tower.config
    layers = tower.encoder.layers
    select = source.vision.select_layer
    used = select if select >= 0 else len(layers) + 1 + select  # hidden_states[0] is the embeddings
    patches = (source.vision.image_size // source.vision.patch_size) ** 2
    return rl.VisionCost(
        patch_params=sum(p.numel() for p in tower.embeddings.patch_embedding.parameters()),
        layer_params=sum(p.numel() for layer in list(layers)[:used] for p in layer.parameters()),
        projector_params=sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
        num_layers=used,
        num_heads=config.num_attention_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        tower_tokens=patches + 1,
        image_tokens=source.vision.num_image_tokens,
    )


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    memory_gib = None
    cpuinfo, meminfo = Path("/proc/cpuinfo"), Path("/proc/meminfo")
    if cpuinfo.is_file():
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            cpu,
        )
    if meminfo.is_file():
        total = next(
            (line for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:")), None
        )
        memory_gib = round(int(total.split()[1]) / 2**20, 1) if total else None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "available_cpus": available_cpus(),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": package_versions(),
        "load_average_start": load_average(),
    }


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("torch", "transformers", "onnxruntime", "onnxruntime-gpu", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------------------------------------
# Running


def check_outputs(config: BenchConfig) -> None:
    """Output paths and --plot's dependency, before any compute."""
    for flag, path in (("--json", config.json_path), ("--plot", config.plot_path)):
        if path is not None and not Path(path).parent.is_dir():
            raise LlavaError(f"{flag} {path}: folder {Path(path).parent} does not exist")
        if path is not None and Path(path).is_dir():
            raise LlavaError(f"{flag} {path} is a folder; give a file path")
    if config.plot_path is not None:
        require("bench", "--plot")


def check_prompt(manifest: contract.Manifest, config: BenchConfig) -> None:
    total = config.prompt_len + manifest.vision.num_image_tokens + config.new_tokens
    if total > manifest.text.max_positions:
        raise PromptError(
            f"--prompt-len {config.prompt_len} + {manifest.vision.num_image_tokens} image tokens + --new-tokens "
            f"{config.new_tokens} is {total} positions; the model takes at most {manifest.text.max_positions}"
        )


def check_same_model(source, manifest: contract.Manifest, config: BenchConfig) -> None:
    for what, ours, theirs in (
        ("text", source.text, manifest.text),
        ("vision", source.vision, manifest.vision),
    ):
        if ours != theirs:
            differ = next(k for k in asdict(ours) if asdict(ours)[k] != asdict(theirs).get(k))
            raise LlavaError(
                f"--artifacts {config.artifacts} were not exported from --model {config.model}: the {what} "
                f"{differ} is {asdict(theirs).get(differ)} there and {asdict(ours)[differ]} in the model"
            )


def reference_dtype(config: BenchConfig, manifest: contract.Manifest) -> str:
    return manifest.graphs["decoder"].dtype if config.reference_dtype == "auto" else config.reference_dtype


def measure(
    sides,
    inputs: BenchInputs,
    config: BenchConfig,
    meter: RssMeter,
    memory: dict[str, SideMemory],
    progress: Progress,
    reads: list[float] | None = None,
) -> dict[str, list[RunTimes]]:
    """`warmup` discarded runs per side, then `repeats` runs alternating between the sides.
    With `reads`, the read bandwidth is measured before each repeat and after the last one and
    appended to it: what the memory system gave while the runs ran."""
    runs: dict[str, list[RunTimes]] = {side.name: [] for side in sides}
    for index in range(config.warmup + config.repeats):
        warm = index < config.warmup
        if reads is not None and not warm:
            reads.append(rl.measure_read(config.bandwidth_mib))
        done = []
        for side in sides:
            before = meter.current()
            meter.reset_peak()
            result = side.run(inputs, config.new_tokens)
            memory[side.name].run_peak = max(memory[side.name].run_peak, meter.peak() - before)
            done.append(f"{side.name} {result.end_to_end_ms:.0f} ms")
            if not warm:
                runs[side.name].append(result)
        what = (
            f"warm-up {index + 1}/{config.warmup}"
            if warm
            else f"repeat {index + 1 - config.warmup}/{config.repeats}"
        )
        progress.say(f"  {what}: " + ", ".join(done))
    if reads is not None:
        reads.append(rl.measure_read(config.bandwidth_mib))
    return runs


def sweep_lengths(prompt_len: int) -> list[int]:
    return sorted({max(1, round(prompt_len * fraction)) for fraction in PLOT_FRACTIONS})


def run_bench(config: BenchConfig, progress: Progress | None = None) -> BenchReport:
    """Measures both sides and the machine; writes --json and --plot when asked."""
    progress = progress or Progress()
    check_outputs(config)
    manifest = contract.read_manifest(config.artifacts)
    check_prompt(manifest, config)
    meter = RssMeter()
    memory = {REFERENCE: SideMemory()}
    with progress.stage(f"loading the runtime ({config.backend}) from {config.artifacts}"):
        from runtime.pipeline import Pipeline

        base = meter.current()
        meter.reset_peak()
        with environment(LLAVA_THREADS=str(config.threads)):  # the ORT backend's intra-op threads
            runtime = RuntimeSide(Pipeline.load(config.artifacts, backend=config.backend))
        memory[runtime.name] = SideMemory(meter.current() - base, meter.peak() - base)
    ort_threads = ort_intra_op_threads(runtime.backend)

    import torch

    torch.set_num_threads(config.threads)
    machine = machine_info()
    with progress.stage(
        f"measuring this machine ({config.bandwidth_mib} MiB buffer, {config.gemm_size}^3 GEMM, {config.threads} threads)"
    ):
        rates = rl.measure_machine(config.threads, config.bandwidth_mib, config.gemm_size)

    dtype = reference_dtype(config, manifest)
    with progress.stage(f"loading the PyTorch reference ({dtype}) from {config.model}"):
        from exporter.source import load_source

        base = meter.current()
        meter.reset_peak()
        source = load_source(config.model, vision_tower=config.vision_tower, dtype=getattr(torch, dtype))
        reference = ReferenceSide(source)
        memory[REFERENCE] = SideMemory(meter.current() - base, meter.peak() - base)
    check_same_model(source, manifest, config)

    graph = manifest.graphs["decoder"]
    decoder = decoder_cost(
        source,
        graph.dtype,
        quantized_bytes_per_weight(config.artifacts / graph.file, graph) if graph.quant else None,
    )
    vision = vision_cost(source)
    sides = [reference, runtime]
    inputs = make_inputs(manifest, config.batch, config.prompt_len, config.seed)
    progress.say(
        f"running {inputs.prompt_tokens}-token prefill + {config.new_tokens} decode steps, batch {config.batch}"
    )
    reads: list[float] = []
    runs = measure(sides, inputs, config, meter, memory, progress, reads)
    with progress.stage("measuring this machine again (the best of before and after counts)"):
        first = rates
        rates = rl.best_rates(
            first, rl.measure_machine(config.threads, config.bandwidth_mib, config.gemm_size)
        )
    results = {
        side.name: SideResult(
            side.name,
            runs[side.name],
            memory[side.name],
            config.batch,
            config.new_tokens,
            inputs.prompt_tokens,
        )
        for side in sides
    }
    bound = rl.roofline(
        rates,
        decoder,
        vision,
        config.batch,
        inputs.prompt_tokens,
        config.new_tokens,
        manifest.graphs["vision"].dtype,
    )

    sweep = []
    if config.plot_path is not None:
        sweep = run_sweep(sides, results, config, manifest, rates, decoder, vision, progress)
    machine["load_average_end"] = load_average()
    report = BenchReport(
        config=config,
        machine=machine,
        model={
            "family": manifest.text.family,
            "decoder_layers": manifest.text.num_layers,
            "hidden_size": manifest.text.hidden_size,
            "vocab_size": manifest.text.vocab_size,
            "image_tokens": manifest.vision.num_image_tokens,
            "decoder_dtype": manifest.graphs["decoder"].dtype,
            "decoder_quant": graph.quant,
            "vision_dtype": manifest.graphs["vision"].dtype,
            "reference_dtype": dtype,
            "decoder_params": decoder.layer_params + decoder.lm_head_params,
            "decoder_weight_bytes": decoder.weight_bytes,
            "vision_params": vision.patch_params + vision.layer_params + vision.projector_params,
        },
        rates=rates,
        rates_before=first,
        bound=bound,
        reference=results[REFERENCE],
        runtime=results[runtime.name],
        memory_method=meter.method,
        torch_threads=torch.get_num_threads(),
        ort_threads=ort_threads,
        greedy_match=greedy_agreement(runs[REFERENCE][-1], runs[runtime.name][-1]),
        reads_between_repeats=reads,
        sweep=sweep,
    )
    if config.json_path is not None:
        Path(config.json_path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if config.plot_path is not None:
        plot(report, Path(config.plot_path))
    return report


@contextlib.contextmanager
def environment(**values: str):
    """Sets environment variables for the block only (the backend reads them when it loads)."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ort_intra_op_threads(backend) -> int | None:
    """The thread count ONNX Runtime's decoder session was actually given (None: not ORT)."""
    session = getattr(backend, "decoder", None)
    try:
        return session.get_session_options().intra_op_num_threads
    except AttributeError:
        return None


# ---------------------------------------------------------------------------------------------
# --plot


def run_sweep(sides, results, config, manifest, rates, decoder, vision, progress) -> list[SweepPoint]:
    """Prefill and decode tokens/s at prompt lengths of 1/8, 1/4, 1/2 and all of --prompt-len
    text tokens (the image's tokens always added), same warm-up and repeats; the full length
    reuses the main measurement."""
    points = []
    for text_tokens in sweep_lengths(config.prompt_len):
        if text_tokens == config.prompt_len:
            measured = results
        else:
            inputs = make_inputs(manifest, config.batch, text_tokens, config.seed)
            progress.say(f"sweep: {inputs.prompt_tokens}-token prompt")
            runs = measure(sides, inputs, config, RssMeter(), {s.name: SideMemory() for s in sides}, progress)
            measured = {
                s.name: SideResult(
                    s.name, runs[s.name], SideMemory(), config.batch, config.new_tokens, inputs.prompt_tokens
                )
                for s in sides
            }
        prompt_tokens = text_tokens + manifest.vision.num_image_tokens
        bound = rl.roofline(rates, decoder, vision, config.batch, prompt_tokens, config.new_tokens)
        points.append(
            SweepPoint(
                text_tokens=text_tokens,
                prompt_tokens=prompt_tokens,
                prefill_tokens_per_s={name: round(r.prefill_tokens_per_s, 2) for name, r in measured.items()},
                decode_tokens_per_s={name: round(r.decode_tokens_per_s, 2) for name, r in measured.items()},
                roofline_prefill_tokens_per_s=round(
                    config.batch * prompt_tokens / (bound.prefill.ms / 1000), 2
                ),
                roofline_decode_tokens_per_s=round(bound.decode_tokens_per_s, 2),
            )
        )
    return points


def plot(report: BenchReport, path: Path) -> None:
    """Two panels against prompt length: prefill tokens/s and decode tokens/s, one line per
    side, the roofline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [point.prompt_tokens for point in report.sweep]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, attribute, bound_attribute, title in (
        (axes[0], "prefill_tokens_per_s", "roofline_prefill_tokens_per_s", "prefill (prompt tokens/s)"),
        (axes[1], "decode_tokens_per_s", "roofline_decode_tokens_per_s", "decode (new tokens/s)"),
    ):
        for side in report.sides:
            axis.plot(
                x,
                [getattr(point, attribute)[side.name] for point in report.sweep],
                marker="o",
                label=side.name,
            )
        axis.plot(
            x,
            [getattr(point, bound_attribute) for point in report.sweep],
            linestyle="--",
            color="gray",
            label="roofline",
        )
        axis.set_title(title)
        axis.set_xlabel("prompt tokens (text + image)")
        axis.set_ylabel("tokens/s")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    config = report.config
    figure.suptitle(
        f"{config.model}: batch {config.batch}, {config.new_tokens} decode steps, {report.torch_threads} threads"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
