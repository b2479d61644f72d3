"""`llava-bench llamacpp`: the decoder against llama.cpp's on the same weights, side by side.

llama.cpp is a peer, never a dependency: the user builds it (scripts/llamacpp_peer.sh builds
llama-bench from the llama.cpp tree vendored in llama-cpp-python's source distribution and
converts the checkpoint to GGUF) and names its llama-bench binary here. Each round runs, one
after the other, so that drift in the shared machine's bandwidth hits both alike:

    ours       llava-bench --decoder-only on --artifacts (a warm-up run, then one measured):
               a --prompt-len text prefill, then --new-tokens decode steps
    llama.cpp  llama-bench -p PROMPT_LEN -n 0             the prefill (pp)
               llama-bench -p 0 -n NEW_TOKENS -d PROMPT_LEN   decode after a PROMPT_LEN context (tg)

Both decode --new-tokens steps after a --prompt-len context, so they attend to the same
positions. Figures are medians over the rounds; the ratios read as llava-bench's: above 1 this
project is faster. The roofline is llava-bench's, on the artifacts' stored bytes.
"""

from __future__ import annotations

import gc
import json
import shutil
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from exporter.bench.run import BenchConfig, available_cpus, check_outputs, run_bench
from exporter.progress import Progress
from runtime.errors import LlavaError

PEER = "llama.cpp"


@dataclass
class PeerConfig:
    model: str
    artifacts: Path
    gguf: Path
    llama_bench: str
    prompt_len: int = 640
    new_tokens: int = 32
    rounds: int = 2
    threads: int | None = None
    reference_layers: int = 2
    json_path: Path | None = None
    vision_tower: str | None = None
    seed: int = 0

    def __post_init__(self):
        self.artifacts, self.gguf = Path(self.artifacts), Path(self.gguf)
        if self.threads is None:
            self.threads = available_cpus()
        if not self.gguf.is_file():
            raise LlavaError(
                f"--gguf {self.gguf} does not exist: convert the checkpoint (scripts/llamacpp_peer.sh gguf)"
            )
        binary = shutil.which(self.llama_bench)
        if binary is None:
            raise LlavaError(
                f"--llama-bench {self.llama_bench} is not an executable: build it (scripts/llamacpp_peer.sh build)"
            )
        self.llama_bench = binary


@dataclass
class PeerRound:
    """One round's figures: ours from llava-bench's report, llama.cpp's from llama-bench's."""

    ours_prefill_ms: float
    ours_decode_tokens_per_s: float
    peer_prefill_ms: float
    peer_decode_tokens_per_s: float
    ours_report: dict = field(repr=False)
    peer_records: list[dict] = field(repr=False)


def llama_bench(config: PeerConfig, prompt: int, generate: int, depth: int = 0) -> dict:
    """One llama-bench test, one repetition after its own warm-up: its JSON record."""
    command = [
        config.llama_bench,
        "-m",
        str(config.gguf),
        "-t",
        str(config.threads),
        "-p",
        str(prompt),
        "-n",
        str(generate),
        "-d",
        str(depth),
        "-r",
        "1",
        "-o",
        "json",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LlavaError(f"llama-bench failed ({' '.join(command)}): {last}")
    try:
        records = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise LlavaError(f"llama-bench printed no JSON ({' '.join(command)})") from None
    if len(records) != 1:
        raise LlavaError(f"llama-bench gave {len(records)} results for one test ({' '.join(command)})")
    return records[0]


def record_ms(record: dict) -> float:
    """A llama-bench record's mean time of its test in milliseconds (avg_ns is per repetition)."""
    return record["avg_ns"] / 1e6


def run_round(config: PeerConfig, index: int, progress: Progress) -> PeerRound:
    progress.say(f"round {index + 1}/{config.rounds}: llava-bench --decoder-only")
    bench = BenchConfig(
        config.model,
        config.artifacts,
        prompt_len=config.prompt_len,
        new_tokens=config.new_tokens,
        warmup=1,
        repeats=1,
        threads=config.threads,
        vision_tower=config.vision_tower,
        seed=config.seed,
        decoder_only=True,
        reference_layers=config.reference_layers,
    )
    report = run_bench(bench, progress).to_dict()
    gc.collect()  # the runtime's sessions go before llama.cpp loads its copy of the weights
    ours = next(side for name, side in report["results"].items() if name != "pytorch")
    progress.say(
        f"round {index + 1}/{config.rounds}: llama-bench prefill, then decode at {config.prompt_len}"
    )
    prefill = llama_bench(config, config.prompt_len, 0)
    decode = llama_bench(config, 0, config.new_tokens, depth=config.prompt_len)
    return PeerRound(
        ours_prefill_ms=ours["prefill_ms"],
        ours_decode_tokens_per_s=ours["decode_tokens_per_s"],
        peer_prefill_ms=record_ms(prefill),
        peer_decode_tokens_per_s=config.new_tokens / (record_ms(decode) / 1000),
        ours_report=report,
        peer_records=[prefill, decode],
    )


@dataclass
class PeerReport:
    config: PeerConfig
    rounds: list[PeerRound]

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(r, attribute) for r in self.rounds)

    def spread(self, attribute: str, digits: int) -> str:
        values = [getattr(r, attribute) for r in self.rounds]
        return f"{min(values):,.{digits}f}-{max(values):,.{digits}f}"

    @property
    def last_ours(self) -> dict:
        return self.rounds[-1].ours_report

    def figures(self) -> dict:
        ours_prefill, peer_prefill = self.median("ours_prefill_ms"), self.median("peer_prefill_ms")
        ours_decode, peer_decode = (
            self.median("ours_decode_tokens_per_s"),
            self.median("peer_decode_tokens_per_s"),
        )
        # Each round against its own roofline: the bandwidth swings between rounds, so a median
        # decode over one round's bandwidth would pair figures of different moments.
        rooflines = [r.ours_report["roofline"]["decode_tokens_per_s"] for r in self.rounds]
        of_roofline = [r.ours_decode_tokens_per_s / roof for r, roof in zip(self.rounds, rooflines)]
        return {
            "prefill_ms": {"ours": ours_prefill, PEER: peer_prefill, "x_better": peer_prefill / ours_prefill},
            "decode_tokens_per_s": {
                "ours": ours_decode,
                PEER: peer_decode,
                "x_better": ours_decode / peer_decode,
            },
            "roofline_decode_tokens_per_s": statistics.median(rooflines),
            "ours_decode_of_roofline": statistics.median(of_roofline),
            "decode_weight_bytes": self.last_ours["roofline"]["decode_step"]["bytes"],
            "gguf_bytes": self.config.gguf.stat().st_size,
        }

    def to_dict(self) -> dict:
        config = self.config
        return {
            "settings": {
                "model": config.model,
                "artifacts": str(config.artifacts),
                "gguf": str(config.gguf),
                "llama_bench": config.llama_bench,
                "prompt_tokens": config.prompt_len,
                "new_tokens": config.new_tokens,
                "rounds": config.rounds,
                "threads": config.threads,
            },
            "figures": self.figures(),
            "rounds": [
                {
                    "ours_prefill_ms": r.ours_prefill_ms,
                    "ours_decode_tokens_per_s": r.ours_decode_tokens_per_s,
                    "peer_prefill_ms": r.peer_prefill_ms,
                    "peer_decode_tokens_per_s": r.peer_decode_tokens_per_s,
                    "llava_bench": r.ours_report,
                    "llama_bench": r.peer_records,
                }
                for r in self.rounds
            ],
        }

    def table(self) -> str:
        config, figures = self.config, self.figures()
        quant = self.last_ours["model"]["decoder_quant"] or self.last_ours["model"]["decoder_dtype"]
        peer_type = self.rounds[-1].peer_records[0].get("model_type", "?")
        prefill, decode = figures["prefill_ms"], figures["decode_tokens_per_s"]
        machine = self.last_ours["machine"]
        lines = [
            f"llava-bench llamacpp: {config.artifacts} ({quant}, {figures['decode_weight_bytes'] / 2**30:.2f} GiB "
            f"of decoder weights) vs {config.gguf} ({peer_type}, {figures['gguf_bytes'] / 2**30:.2f} GiB file)",
            f"  {config.threads} threads, {config.rounds} rounds alternating, medians (range); prompt "
            f"{config.prompt_len} tokens, then {config.new_tokens} decode steps",
            f"  machine: {machine['cpu']}, read {machine['read_gb_s']:.1f} GB/s, float32 GEMM "
            f"{machine['gemm_gflop_s']:.1f} GFLOP/s",
            "",
            f"  prefill ms ({config.prompt_len} tok):  ours {prefill['ours']:,.0f} "
            f"({self.spread('ours_prefill_ms', 0)}), llama.cpp {prefill[PEER]:,.0f} ({self.spread('peer_prefill_ms', 0)}): "
            f"{prefill['x_better']:.2f}x",
            f"  decode tok/s (at {config.prompt_len}):  ours {decode['ours']:.2f} "
            f"({self.spread('ours_decode_tokens_per_s', 2)}), llama.cpp {decode[PEER]:.2f} "
            f"({self.spread('peer_decode_tokens_per_s', 2)}): {decode['x_better']:.2f}x",
            f"  decode roofline on the stored bytes: {figures['roofline_decode_tokens_per_s']:.2f} tok/s (median of "
            f"the rounds'); ours reached {figures['ours_decode_of_roofline']:.0%} (median of each round's own)",
            "  x better: above 1 this project is faster",
        ]
        return "\n".join(lines)


def run_peer_bench(config: PeerConfig, progress: Progress | None = None) -> PeerReport:
    progress = progress or Progress()
    check_outputs(config.json_path)
    rounds = [run_round(config, index, progress) for index in range(config.rounds)]
    report = PeerReport(config, rounds)
    if config.json_path is not None:
        Path(config.json_path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
