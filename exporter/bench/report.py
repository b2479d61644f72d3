"""What `llava-bench` found: each side's medians, the ratios between the sides, each side's
distance from the roofline, and the table, the JSON and the plot that show them.

Every ratio reads one way: how many times better the runtime is than PyTorch, above 1 better.
For a millisecond or MiB row that is PyTorch's figure over the runtime's (faster, smaller); for
tokens/s the runtime's over PyTorch's. The ceiling is the same ratio for a backend running
exactly at the roofline, so the two columns compare directly: a ratio at the ceiling is a
runtime at the roofline.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from exporter.bench import roofline as rl
from exporter.bench.memory import SideMemory

if TYPE_CHECKING:
    from exporter.bench.run import BenchConfig
    from runtime.pipeline import Timings

REFERENCE = "pytorch"
RATIO_CONVENTION = (
    "times better than pytorch, above 1 better: pytorch/runtime for ms and MiB (faster, smaller), "
    "runtime/pytorch for tok/s; ratio_ceiling is the same ratio for a backend at the roofline"
)


@dataclass
class RunTimes:
    """One run of either side (milliseconds) and the greedy tokens it produced, [B][1 + new_tokens].
    The phases are the runtime's own Timings fields (Pipeline.run fills them; the reference side
    times the same phases); end to end is the whole run as its caller waits for it."""

    image_encode_ms: float
    splice_ms: float
    prefill_ms: float
    decode_ms: float
    end_to_end_ms: float
    tokens: list[list[int]] = field(repr=False)

    @classmethod
    def from_timings(cls, timings: Timings, end_to_end_ms: float, tokens: list[list[int]]) -> RunTimes:
        return cls(
            timings.image_encode_ms,
            timings.splice_ms,
            timings.prefill_ms,
            timings.decode_ms,
            end_to_end_ms,
            tokens,
        )

    @property
    def time_to_first_token_ms(self) -> float:
        return self.image_encode_ms + self.splice_ms + self.prefill_ms


@dataclass
class SideResult:
    """One side's measured runs, with what is needed to turn times into rates."""

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
        """The table's rows (METRICS' keys)."""
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
HIGHER_IS_BETTER = {key: higher for key, _, higher in METRICS}
CEILING_PHASES = {"image_encode_ms": "image encode", "prefill_ms": "prefill", "decode_tokens_per_s": "decode"}


def ratio(value: float | None, against: float | None, higher_is_better: bool) -> float | None:
    """How many times better `value` is than `against`: above 1 it is faster or smaller."""
    better, worse = (value, against) if higher_is_better else (against, value)
    if better is None or worse is None or worse <= 0:
        return None
    return better / worse


def efficiency(value: float, bound: float | None, higher_is_better: bool) -> float | None:
    """Fraction of the roofline reached, the ratio of `value` to its bound: 1.0 runs at it."""
    return ratio(value, bound, higher_is_better) if value > 0 else None


def roofline_metrics(bound: rl.Roofline) -> dict[str, float | None]:
    """The roofline's figure for each of METRICS' rows (memory has none)."""
    return {
        "image_encode_ms": bound.image_encode.ms,
        "prefill_ms": bound.prefill.ms,
        "decode_tokens_per_s": bound.decode_tokens_per_s,
        "end_to_end_ms": bound.end_to_end_ms,
        "peak_rss_mib": None,
    }


def greedy_agreement(reference: RunTimes, runtime: RunTimes) -> int:
    """Leading greedy tokens on which every row of the two runs agrees (llava-bench and the GPU
    check alike)."""
    agree = len(reference.tokens[0])
    for ours, theirs in zip(reference.tokens, runtime.tokens):
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        agree = min(agree, same)
    return agree


@dataclass
class SweepPoint:
    """--plot's figures at one prompt length."""

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
    greedy_match: int | None  # None: --decoder-only, whose cut cannot give the model's tokens
    # GB/s, before each repeat and after the last
    reads_between_repeats: list[float] = field(default_factory=list)
    sweep: list[SweepPoint] = field(default_factory=list)
    # --decoder-only: the cut the reference ran (run.cut_summary); its times in `reference` are scaled
    reference_cut: dict | None = None

    @property
    def sides(self) -> list[SideResult]:
        return [self.reference, self.runtime]

    @property
    def overloaded(self) -> bool:
        """Other processes wanted more cores than there are (1-minute load average)."""
        load = self.machine.get("load_average_start")
        return bool(load) and load[0] > self.machine["available_cpus"]

    # -- derived figures ------------------------------------------------------------------

    def ratios(self) -> dict[str, float | None]:
        """Each metric's runtime-against-PyTorch ratio (above 1: the runtime is better)."""
        ref, run = self.reference.metrics(), self.runtime.metrics()
        return {key: ratio(run[key], ref[key], higher) for key, _, higher in METRICS}

    def ratio_ceilings(self) -> dict[str, float | None]:
        """The ratio a backend running at the roofline would show against this PyTorch run
        (None where there is no roofline). No backend at the graph's precision can beat it."""
        ref, bound = self.reference.metrics(), roofline_metrics(self.bound)
        return {key: ratio(bound[key], ref[key], higher) for key, _, higher in METRICS}

    def efficiencies(self, side: SideResult) -> dict[str, float | None]:
        bound = roofline_metrics(self.bound)
        return {
            key: efficiency(value, bound[key], HIGHER_IS_BETTER[key]) for key, value in side.metrics().items()
        }

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

    # -- JSON -----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "settings": self.settings_dict(),
            "machine": self.machine_dict(),
            "model": self.model,
            "roofline": self.bound.as_dict(),
            "results": {side.name: side.as_dict() for side in self.sides},
            "ratio_convention": RATIO_CONVENTION,
            "ratios": _rounded(self.ratios(), 4),
            "efficiency": {side.name: _rounded(self.efficiencies(side), 4) for side in self.sides},
            "decode_weight_gb_s": {side.name: round(self.decode_weight_gb_s(side), 4) for side in self.sides},
            "decode_share_of_read_between_repeats": {
                side.name: round_or_none(self.decode_share_of_reads(side), 4) for side in self.sides
            },
            "ratio_ceiling": _rounded(self.ratio_ceilings(), 4),
            "greedy_tokens_matching": (
                None
                if self.greedy_match is None
                else {"leading": self.greedy_match, "of": self.config.new_tokens + 1}
            ),
            "reference_cut": self.reference_cut,
            "sweep": [asdict(point) for point in self.sweep],
        }

    def settings_dict(self) -> dict:
        config = self.config
        return {
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
        }

    def machine_dict(self) -> dict:
        return {
            **self.machine,
            **rates_dict(self.rates),
            "first_measurement": rates_dict(self.rates_before),
            "bandwidth_buffer_mib": self.rates.buffer_mib,
            "gemm_size": self.rates.gemm_size,
            "read_gb_s_between_repeats": [round(r, 2) for r in self.reads_between_repeats],
        }

    # -- the table ------------------------------------------------------------------------

    def table(self) -> str:
        return "\n".join([*self.heading_lines(), "", *self.metric_lines(), "", *self.note_lines()])

    def heading_lines(self) -> list[str]:
        config, rates, machine = self.config, self.rates, self.machine
        quant = f", {self.model['decoder_quant']} weights" if self.model.get("decoder_quant") else ""
        image = f"{self.model['image_tokens']} image"
        if self.model.get("image_size"):  # anyres: the image's size fixes its tiles and tokens
            height, width = self.model["image_size"]
            image += f": a {width}x{height} image in {self.model['image_tiles']} tiles"
        ort_threads = self.ort_threads if self.ort_threads is not None else "n/a"
        reference, prompt = self.model["reference_dtype"], f"{config.prompt_len} text + {image}"
        if self.reference_cut:
            cut = self.reference_cut
            reference += f"; {cut['layers']} of {cut['of']} decoder layers, times scaled to {cut['of']}"
            prompt = "text only: --decoder-only"
        return [
            f"llava-bench: {config.model} (pytorch, {reference}) vs {config.artifacts} "
            f"({self.runtime.name}, {self.model['decoder_dtype']}{quant})",
            f"  batch {config.batch}, prompt {self.runtime.prompt_tokens} tokens ({prompt}), "
            f"{config.new_tokens} decode steps; "
            f"warm-up {config.warmup}, repeats {config.repeats}, medians",
            f"  threads: torch {self.torch_threads}, onnxruntime intra-op {ort_threads}",
            f"  machine: {machine['cpu']}, {machine['available_cpus']} cpus, load average "
            f"{machine['load_average_start']} -> {machine.get('load_average_end', '?')}",
            f"  roofline inputs: read {rates.read_gb_s:.1f} GB/s (copy {rates.copy_gb_s:.1f}), float32 GEMM "
            f"{rates.gemm_gflop_s:.1f} GFLOP/s ({rates.gemm_size}^3); decode reads "
            f"{self.bound.decode_step.bytes / 2**20:.1f} MiB of weights per step",
        ]

    def metric_lines(self) -> list[str]:
        short = self.runtime.name.split("-")[0]
        ref, run, bound = self.reference.metrics(), self.runtime.metrics(), roofline_metrics(self.bound)
        ratios, ref_reached, run_reached = (
            self.ratios(),
            self.efficiencies(self.reference),
            self.efficiencies(self.runtime),
        )
        rows = [
            [
                "metric",
                "pytorch",
                self.runtime.name,
                f"x better ({short})",
                "roofline",
                "pt/roof",
                f"{short}/roof",
            ]
        ]
        for key, label, _ in METRICS:
            if key == "image_encode_ms" and self.reference_cut:
                continue  # --decoder-only: no image
            if key == "prefill_ms":
                label = f"prefill ms ({self.runtime.prompt_tokens} tok)"
            rows.append(
                [
                    label,
                    fmt(ref[key]),
                    fmt(run[key]),
                    fmt(ratios[key], "x"),
                    fmt(bound[key]),
                    pct(ref_reached[key]),
                    pct(run_reached[key]),
                ]
            )
        return align_columns(rows)

    def note_lines(self) -> list[str]:
        config, machine = self.config, self.machine
        lines = []
        if self.overloaded:
            lines.append(
                f"  warning: the load average ({machine['load_average_start'][0]}) exceeds the "
                f"{machine['available_cpus']} cpus: other work competed for the cores, so multi-threaded "
                "timings are noisy (try --threads 1)"
            )
        lines.append(self.ceiling_line())
        if self.reads_between_repeats:
            lines.append(self.reads_line())
        if self.reference_cut:
            lines += self.cut_lines()
        else:
            diverged = self.greedy_match <= config.new_tokens
            lines.append(
                f"  greedy tokens: the runtime matches pytorch on the first {self.greedy_match} of "
                f"{config.new_tokens + 1}"
                + (" (random weights have near-tied logits; divergence is not an error)" if diverged else "")
            )
        lines += [
            "  x better: how many times faster (ms, tok/s) or smaller (RSS) the runtime is than pytorch, "
            "above 1 better. x/roof: fraction of the roofline reached",
            f"  peak RSS: {self.memory_method}",
        ]
        return lines

    def cut_lines(self) -> list[str]:
        """--decoder-only: what the cut measured, how it was scaled, and the figures per layer."""
        cut, layers = self.reference_cut, self.reference_cut["of"]
        ref, run = self.reference.metrics(), self.runtime.metrics()
        per_layer = ", ".join(
            f"{what} pytorch {ref_ms / layers:.2f} ms, {self.runtime.name} {run_ms / layers:.2f} ms"
            for what, ref_ms, run_ms in (
                ("prefill", ref["prefill_ms"], run["prefill_ms"]),
                ("decode step", 1000 / ref["decode_tokens_per_s"], 1000 / run["decode_tokens_per_s"]),
            )
        )
        return [
            f"  pytorch ran the first {cut['layers']} of {layers} decoder layers (with lm_head): prefill "
            f"{cut['measured_prefill_ms']:.0f} ms, decode {cut['measured_decode_tokens_per_s']:.2f} tok/s, scaled "
            f"to {layers} layers by the roofline's work (prefill x{cut['scales']['prefill']:.2f}, decode "
            f"x{cut['scales']['decode']:.2f}); its peak RSS is the cut's",
            f"  per decoder layer (each time over the {layers} layers, lm_head's share included): {per_layer}",
            "  greedy tokens: not compared (the cut is not the model)",
        ]

    def ceiling_line(self) -> str:
        """What the roofline leaves for any backend against this PyTorch run, phase by phase."""
        ceilings = self.ratio_ceilings()
        phases = ", ".join(
            f"{ceilings[key]:.2f}x faster on {phase}"
            for key, phase in CEILING_PHASES.items()
            if ceilings[key] is not None
        )
        return f"  ceiling: a backend at the roofline would be {phases} than this pytorch run"

    def reads_line(self) -> str:
        reads = self.reads_between_repeats
        streamed = ", ".join(
            f"{side.name} {self.decode_weight_gb_s(side):.1f} GB/s ({pct(self.decode_share_of_reads(side)).strip()})"
            for side in self.sides
        )
        return (
            f"  read bandwidth between repeats: {min(reads):.1f} to {max(reads):.1f} GB/s, median "
            f"{statistics.median(reads):.1f}; decode streamed weights at {streamed} of that median"
        )


def rates_dict(rates: rl.MachineRates) -> dict:
    return {
        "read_gb_s": round(rates.read_gb_s, 2),
        "copy_gb_s": round(rates.copy_gb_s, 2),
        "gemm_gflop_s": round(rates.gemm_gflop_s, 2),
    }


def round_or_none(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _rounded(values: dict[str, float | None], digits: int) -> dict[str, float | None]:
    return {key: round_or_none(value, digits) for key, value in values.items()}


def align_columns(rows: list[list[str]]) -> list[str]:
    """The first column left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join([row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])])
        for row in rows
    ]


def fmt(value: float | None, suffix: str = "") -> str:
    """A table's figure: 3 significant digits or so, thousands separated; "x": a ratio, 2 decimals."""
    if value is None:
        return "-"
    if suffix == "x":
        return f"{value:.2f}x"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3g}"


def pct(value: float | None) -> str:
    """A share as a percentage ("-" for none)."""
    if value is None:
        return "-"
    return f"{value * 100:.0f}%" if value >= 0.01 else f"{value * 100:.2g}%"


# ---------------------------------------------------------------------------------------------
# --plot


def plot(report: BenchReport, path: Path) -> None:
    """Two panels against prompt length: prefill tokens/s and decode tokens/s, one line per
    side, the roofline dashed."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the figure only goes to a file
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
        bounds = [getattr(point, bound_attribute) for point in report.sweep]
        axis.plot(x, bounds, linestyle="--", color="gray", label="roofline")
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
