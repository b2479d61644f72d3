"""`llava-bench`: the PyTorch reference and the runtime, side by side, in one process.

Both sides get identical inputs: the same seeded pixel values (one image per sequence) and the
same random text token ids around the image, then each runs its own whole pipeline:

    image encode   reference: VisionEncoder (tower, layer select, projector), eager, no_grad
                   runtime:   the vision graph
                   LLaVA-1.6 (anyres): a seeded BENCH_IMAGE_SIZE image's tiles (5 at 640x480
                   with the default pinpoints), then the packing: reference get_image_features
                   (tower, projector, pack_image_features); runtime the vision graph + anyres.pack
    splice         text embeddings | image embeddings | text embeddings -> [B, L, hidden]
    prefill        one forward over the L positions with an empty cache -> first token
                   reference: the text model with a transformers DynamicCache + lm_head at the
                   last position; runtime: the decoder graph with an empty cache
    decode         --new-tokens single-token steps with the cache, greedy (argmax), EOS ignored
                   reference: the same model and cache; runtime: the decoder graph, a position a step

The runtime side is the user's own loop: Pipeline.run on a Batch of those ids and pixels, for
1 + --new-tokens steps with stop_at_eos=False. It times the four phases itself (Timings); only
end to end is timed from outside. The reference times the same phases with perf_counter (on
CUDA, for the GPU check, after a synchronize), into the same RunTimes.

A run is all four; `--warmup` runs per side are discarded, then `--repeats` runs alternate
between the sides (so drift in the machine's load hits both alike) and each figure is the
median over them. The machine's read bandwidth and float32 GEMM rate are measured in the same
process, with the same threads, for the roofline (exporter.bench.roofline); each side's memory
by exporter.bench.memory. exporter.bench.report turns the runs into the table, JSON and plot.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from exporter.bench import roofline as rl
from exporter.bench.memory import RssMeter, SideMemory
from exporter.bench.report import (
    REFERENCE,
    BenchReport,
    RunTimes,
    SideResult,
    SweepPoint,
    greedy_agreement,
    plot,
)
from exporter.progress import Progress
from runtime import anyres, contract
from runtime.errors import EngineError, LlavaError, PromptError
from runtime.extras import require
from runtime.pipeline import Batch, Pipeline, Timings, ms_since

PLOT_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1)  # --plot sweeps these fractions of --prompt-len
BENCH_IMAGE_SIZE = (480, 640)  # (height, width): an anyres model's image, a VGA photo


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
    # The decoder alone on a text prompt, against a `reference_layers`-deep float32 cut of the
    # reference whose times are scaled to the whole depth (DecoderCutSide): for a decoder whose
    # float32 copy does not fit, a 7B on a 24 GB box.
    decoder_only: bool = False
    reference_layers: int = 2

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
            ("--reference-layers", self.reference_layers, 1),
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
    # [B,3,H,W] float32, normalized-looking noise; anyres: [B*tiles,3,S,S]; None: --decoder-only
    pixels: np.ndarray | None
    before: np.ndarray  # [B, k] int64: text ids before the image (BOS first when the model has one)
    after: np.ndarray  # [B, m] int64: text ids after it
    image_tokens: int  # per image
    image_sizes: list[tuple[int, int]] | None = None  # anyres: each row's image's (height, width)

    @property
    def batch(self) -> int:
        return len(self.before)

    @property
    def text_tokens(self) -> int:
        return self.before.shape[1] + self.after.shape[1]

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + self.image_tokens

    def pipeline_batch(self) -> Batch:
        """The same inputs as the runtime's Batch: per row, the text before and after its image
        (--decoder-only: the text alone)."""
        if self.pixels is None:
            return Batch(
                [[np.concatenate([before, after])] for before, after in zip(self.before, self.after)]
            )
        return Batch(
            [[before, after] for before, after in zip(self.before, self.after)], self.pixels, self.image_sizes
        )


def make_inputs(
    manifest: contract.Manifest, batch: int, text_tokens: int, seed: int = 0, image: bool = True
) -> BenchInputs:
    """Seeded pixels and random ordinary token ids (never BOS, EOS or pad inside the text);
    half the text before the image, as a system prompt would be, the rest after it. Without
    `image` (--decoder-only): the text alone."""
    rng = np.random.default_rng(seed)
    if not image:
        ids = text_ids(manifest, rng, batch, text_tokens)
        return BenchInputs(None, ids, ids[:, :0], 0)
    size, sizes = manifest.preprocess.crop_size, None
    image_tokens = manifest.vision.num_image_tokens
    if manifest.anyres is None:
        pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    else:  # a real image's tiles: their number follows from its size
        height, width = BENCH_IMAGE_SIZE
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        pixels = np.concatenate([anyres.tiles(image, manifest.anyres, manifest.preprocess)] * batch)
        sizes = [BENCH_IMAGE_SIZE] * batch
        image_tokens = anyres.image_token_count(BENCH_IMAGE_SIZE, manifest.anyres, manifest.vision)
    ids = text_ids(manifest, rng, batch, text_tokens)
    split = max(1, text_tokens // 2)
    return BenchInputs(pixels, ids[:, :split], ids[:, split:], image_tokens, sizes)


def text_ids(
    manifest: contract.Manifest, rng: np.random.Generator, batch: int, text_tokens: int
) -> np.ndarray:
    """[B, text_tokens] random ordinary ids, BOS first when the model has one."""
    special = {manifest.tokens.bos, manifest.tokens.pad, *manifest.tokens.eos} - {None}
    ordinary = np.setdiff1d(np.arange(manifest.text.vocab_size), np.array(sorted(special), dtype=np.int64))
    ids = rng.choice(ordinary, size=(batch, text_tokens)).astype(np.int64)
    if manifest.tokens.bos is not None:
        ids[:, 0] = manifest.tokens.bos
    return ids


# ---------------------------------------------------------------------------------------------
# The two sides


class ReferenceSide:
    """The source's LlavaForConditionalGeneration, eager, under torch.no_grad(), on `device`
    (cpu | cuda: there every clock reading waits for the GPU to finish what was queued)."""

    name = REFERENCE

    def __init__(self, source, device: str = "cpu"):
        from exporter.graphs.vision import VisionEncoder

        model = source.model.to(device)  # in place: the source's model is on `device` now
        self.device = device
        self.model = model
        self.encoder = VisionEncoder.of(source)
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.embed = model.get_input_embeddings()
        self.dtype = next(model.parameters()).dtype

    def clock(self) -> float:
        """perf_counter, once the device has run what was queued (CUDA kernels run asynchronously)."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def run(self, inputs: BenchInputs, new_tokens: int) -> RunTimes:
        import torch

        device = self.device
        with torch.no_grad():
            start = self.clock()
            image_embeds = self.encode(inputs)  # [B, N_img, hidden]
            encoded = self.clock()
            before, after = (torch.from_numpy(ids).to(device) for ids in (inputs.before, inputs.after))
            embeds = torch.cat([self.embed(before), image_embeds, self.embed(after)], dim=1)  # [B, L, hidden]
            spliced = self.clock()
            tokens, prefilled, decoded = self.generate(embeds, new_tokens)
        return RunTimes(
            image_encode_ms=ms_since(start, encoded),
            splice_ms=ms_since(encoded, spliced),
            prefill_ms=ms_since(spliced, prefilled),
            decode_ms=ms_since(prefilled, decoded),
            end_to_end_ms=ms_since(start, decoded),
            tokens=tokens,
        )

    def generate(self, embeds, new_tokens: int) -> tuple[list[list[int]], float, float]:
        """The prefill over embeds [B, L, hidden] with an empty cache, then `new_tokens` greedy
        steps: (tokens [B][1 + new_tokens], the clock after the prefill, the clock at the end)."""
        import torch
        from transformers import DynamicCache

        device = self.device
        batch, length = embeds.shape[:2]
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
        cache = DynamicCache()
        positions = torch.arange(length, device=device).expand(batch, length)
        token = self.forward(embeds, mask, positions, cache).argmax(-1)  # [B]
        prefilled = self.clock()
        tokens = [token]
        for step in range(new_tokens):
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long, device=device)], dim=1)
            positions = torch.full((batch, 1), length + step, dtype=torch.long, device=device)
            token = self.forward(self.embed(token)[:, None], mask, positions, cache).argmax(-1)
            tokens.append(token)
        return torch.stack(tokens, 1).tolist(), prefilled, self.clock()

    def encode(self, inputs: BenchInputs):
        """[B, N_img, hidden]: the encoder on one image per row; under anyres transformers'
        get_image_features on the rows' tiles, packed as LLaVA-1.6 does."""
        import torch

        pixels = torch.from_numpy(inputs.pixels).to(self.device, self.dtype)
        if inputs.image_sizes is None:
            return self.encoder(pixels)
        sizes = torch.tensor(inputs.image_sizes, device=self.device)
        return torch.stack(
            self.model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        )

    def forward(self, embeds, mask, positions, cache):
        """embeds [B,S,hidden] -> logits [B,vocab] of the last position; `cache` grows by S."""
        hidden = self.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        ).last_hidden_state
        return self.lm_head(hidden[:, -1]).float()


class DecoderCutSide(ReferenceSide):
    """--decoder-only's reference: the first `layers` decoder layers of a streamed source (its
    model on the meta device, source.tensors reading the checkpoint), with the embeddings, the
    final norm and lm_head, read into float32 on the CPU; the rest stays on meta. Its runs are
    the cut's own times: run_bench scales them to the whole depth (depth_scales)."""

    def __init__(self, source, layers: int):
        from exporter.source import read_parameters

        model = source.model
        language_model = model.model.language_model
        language_model.layers = language_model.layers[:layers]
        for prefix, module in (("model.language_model.", language_model), ("lm_head.", model.lm_head)):
            read_parameters(module, module.state_dict(), prefix, source.tensors)
        # the rotary inv_freq is a buffer, not in the checkpoint: a fresh module computes it
        language_model.rotary_emb = type(language_model.rotary_emb)(config=language_model.config)
        self.device = "cpu"
        self.model = model
        self.language_model = language_model
        self.lm_head = model.lm_head
        self.embed = language_model.embed_tokens
        self.dtype = self.embed.weight.dtype

    def run(self, inputs: BenchInputs, new_tokens: int) -> RunTimes:
        import torch

        with torch.no_grad():
            start = self.clock()
            embeds = self.embed(torch.from_numpy(np.concatenate([inputs.before, inputs.after], axis=1)))
            spliced = self.clock()
            tokens, prefilled, decoded = self.generate(embeds, new_tokens)
        return RunTimes(
            image_encode_ms=0.0,
            splice_ms=ms_since(start, spliced),
            prefill_ms=ms_since(spliced, prefilled),
            decode_ms=ms_since(prefilled, decoded),
            end_to_end_ms=ms_since(start, decoded),
            tokens=tokens,
        )


def depth_scales(
    rates: rl.MachineRates,
    full: rl.DecoderCost,
    cut: rl.DecoderCost,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
) -> dict[str, float]:
    """How much longer the whole float32 decoder's prefill and decode take than the cut's, by
    the roofline's work (FLOPs or bytes, whichever bounds the phase): the factors DecoderCutSide's
    times are multiplied by. lm_head is in both, so the factors are below the depth ratio."""
    bounds = [
        rl.roofline(rates, replace(cost, bytes_per_weight=None), None, batch, prompt_tokens, new_tokens)
        for cost in (full, cut)
    ]
    return {
        "prefill": bounds[0].prefill.ms / bounds[1].prefill.ms,
        "decode": bounds[0].decode_step.ms / bounds[1].decode_step.ms,
    }


def scaled_runs(runs: list[RunTimes], scales: dict[str, float]) -> list[RunTimes]:
    """A cut's runs as the whole depth would take them, by depth_scales' factors."""
    scaled = []
    for run in runs:
        prefill, decode = run.prefill_ms * scales["prefill"], run.decode_ms * scales["decode"]
        scaled.append(
            RunTimes(0.0, run.splice_ms, prefill, decode, run.splice_ms + prefill + decode, run.tokens)
        )
    return scaled


class RuntimeSide:
    """An artifact folder's Pipeline, running the user's own loop (Pipeline.run). A run is the
    prefill's token plus `new_tokens` decode steps, EOS ignored: 1 + new_tokens steps of it."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.name = pipe.backend.name

    def check(self, inputs: BenchInputs, new_tokens: int) -> None:
        """The backend's limits for these runs (PromptError or EngineError naming the fix)."""
        self.pipe.backend.limits.check(
            batch=inputs.batch, prompt=inputs.prompt_tokens, new_tokens=new_tokens + 1
        )

    def run(self, inputs: BenchInputs, new_tokens: int) -> RunTimes:
        batch, timings = inputs.pipeline_batch(), Timings()
        start = time.perf_counter()
        steps = list(self.pipe.run(batch, new_tokens + 1, timings=timings, stop_at_eos=False))
        end_to_end_ms = ms_since(start)
        return RunTimes.from_timings(timings, end_to_end_ms, [list(row) for row in zip(*steps)])

    def close(self) -> None:
        self.pipe.close()


def load_runtime(config: BenchConfig, meter: RssMeter, progress: Progress) -> tuple[RuntimeSide, SideMemory]:
    with progress.stage(f"loading the runtime ({config.backend}) from {config.artifacts}"):
        return meter.loading(
            lambda: RuntimeSide(
                Pipeline.load(config.artifacts, backend=config.backend, threads=config.threads)
            )
        )


def load_reference(
    config: BenchConfig, dtype: str, meter: RssMeter, progress: Progress
) -> tuple[object, ReferenceSide, SideMemory]:
    """(the LlavaSource, its ReferenceSide, the memory they added)."""
    import torch

    with progress.stage(f"loading the PyTorch reference ({dtype}) from {config.model}"):
        from exporter.source import load_source

        def load():
            source = load_source(config.model, vision_tower=config.vision_tower, dtype=getattr(torch, dtype))
            return source, ReferenceSide(source)

        (source, reference), memory = meter.loading(load)
    return source, reference, memory


def load_decoder_cut(
    config: BenchConfig, manifest: contract.Manifest, dtype: str, meter: RssMeter, progress: Progress
) -> tuple[object, DecoderCutSide, SideMemory, rl.DecoderCost, rl.DecoderCost]:
    """--decoder-only: (the streamed LlavaSource, its DecoderCutSide, the memory they added, the
    whole decoder's cost as the graph stores it, the cut's at `dtype`)."""
    import torch

    layers = min(config.reference_layers, manifest.text.num_layers)
    what = f"the first {layers} of {manifest.text.num_layers} decoder layers ({dtype})"
    with progress.stage(f"loading {what} of {config.model} as the PyTorch reference"):
        from exporter.source import load_source

        def load():
            source = load_source(
                config.model,
                vision_tower=config.vision_tower,
                dtype=getattr(torch, dtype),
                stream_decoder=True,
            )
            check_same_model(source, manifest, config)
            full, _ = model_costs(source, config, manifest)  # parameter counts work on meta
            side = DecoderCutSide(source, layers)
            return source, side, full, replace(decoder_cost(source, dtype), num_layers=layers)

        (source, side, full, cut), memory = meter.loading(load)
    return source, side, memory, full, cut


def cut_summary(
    cut: rl.DecoderCost, manifest: contract.Manifest, scales: dict[str, float], measured: SideResult
) -> dict:
    """What --decoder-only's reference measured on its cut, and the factors that scaled it."""
    return {
        "layers": cut.num_layers,
        "of": manifest.text.num_layers,
        "scales": {phase: round(factor, 4) for phase, factor in scales.items()},
        "measured_prefill_ms": round(measured.median("prefill_ms"), 3),
        "measured_decode_tokens_per_s": round(measured.decode_tokens_per_s, 3),
    }


# ---------------------------------------------------------------------------------------------
# Checks, before any long work


def check_outputs(json_path: Path | None, plot_path: Path | None = None) -> None:
    """Output paths and --plot's dependency, before any compute."""
    for flag, path in (("--json", json_path), ("--plot", plot_path)):
        if path is not None and not Path(path).parent.is_dir():
            raise LlavaError(f"{flag} {path}: folder {Path(path).parent} does not exist")
        if path is not None and Path(path).is_dir():
            raise LlavaError(f"{flag} {path} is a folder; give a file path")
    if plot_path is not None:
        require("bench", "--plot")


def check_fits(runtime: RuntimeSide, inputs: BenchInputs, config: BenchConfig) -> None:
    """The runtime's own limits for these runs (the model's positions, a static KV cache, a
    TensorRT engine's profiles), before the slow PyTorch load; the error names the flags too."""
    try:
        runtime.check(inputs, config.new_tokens)
    except (PromptError, EngineError) as err:
        raise type(err)(
            f"--batch {config.batch}, --prompt-len {config.prompt_len} (+ {inputs.image_tokens} image tokens) "
            f"and --new-tokens {config.new_tokens} ({config.new_tokens + 1} new tokens with the prefill's) "
            f"do not fit: {err}"
        ) from None


def check_same_model(source, manifest: contract.Manifest, config: BenchConfig) -> None:
    if source.anyres != manifest.anyres:
        raise LlavaError(
            f"--artifacts {config.artifacts} were not exported from --model {config.model}: their anyres "
            f"tiling is {manifest.anyres} there and {source.anyres} in the model"
        )
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


# ---------------------------------------------------------------------------------------------
# What the model must do, and the machine it runs on


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
    """A --quant decoder's stored bytes per weight, from its MatMulNBits settings (w8a8: its
    initializers)."""
    from exporter.graphs import integer_matmul, quantize

    if graph.quant == integer_matmul.QUANT:
        return integer_matmul.graph_bytes_per_weight(path)
    bits, block_size = quantize.graph_settings(path)
    return quantize.bytes_per_weight(bits, block_size, rl.BYTES_PER_ELEMENT[graph.dtype])


def vision_cost(source) -> rl.VisionCost:
    """The vision graph's work for one image: one tile, or under anyres BENCH_IMAGE_SIZE's tiles."""
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
        tiles=1 if source.anyres is None else anyres.tile_count(BENCH_IMAGE_SIZE, source.anyres),
    )


def model_costs(
    source, config: BenchConfig, manifest: contract.Manifest
) -> tuple[rl.DecoderCost, rl.VisionCost]:
    """The decoder's cost at its graph's dtype and stored bytes per weight, and the vision tower's."""
    graph = manifest.graphs["decoder"]
    quantized = quantized_bytes_per_weight(config.artifacts / graph.file, graph) if graph.quant else None
    return decoder_cost(source, graph.dtype, quantized), vision_cost(source)


def model_summary(
    manifest: contract.Manifest, decoder: rl.DecoderCost, vision: rl.VisionCost | None, reference_dtype: str
) -> dict:
    return {
        "family": manifest.text.family,
        "decoder_layers": manifest.text.num_layers,
        "hidden_size": manifest.text.hidden_size,
        "vocab_size": manifest.text.vocab_size,
        "image_tokens": 0 if vision is None else bench_image_tokens(manifest),
        "image_tiles": None if vision is None else vision.tiles,  # tower runs per image
        "image_size": list(BENCH_IMAGE_SIZE)
        if manifest.anyres is not None and vision
        else None,  # (height, width)
        "decoder_dtype": manifest.graphs["decoder"].dtype,
        "decoder_quant": manifest.graphs["decoder"].quant,
        "vision_dtype": manifest.graphs["vision"].dtype,
        "reference_dtype": reference_dtype,
        "decoder_params": decoder.layer_params + decoder.lm_head_params,
        "decoder_weight_bytes": decoder.weight_bytes,
        "vision_params": None
        if vision is None
        else vision.patch_params + vision.layer_params + vision.projector_params,
    }


def bench_image_tokens(manifest: contract.Manifest) -> int:
    """The embeddings the benchmark's image stands for (under anyres: BENCH_IMAGE_SIZE's)."""
    if manifest.anyres is None:
        return manifest.vision.num_image_tokens
    return anyres.image_token_count(BENCH_IMAGE_SIZE, manifest.anyres, manifest.vision)


def machine_info() -> dict:
    return {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "available_cpus": available_cpus(),
        "memory_gib": memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": package_versions(),
        "load_average_start": load_average(),
    }


def cpu_name() -> str:
    fallback = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return fallback
    names = (
        line.split(":", 1)[1].strip()
        for line in cpuinfo.read_text().splitlines()
        if line.startswith("model name")
    )
    return next(names, fallback)


def memory_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    total = next((line for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:")), None)
    return round(int(total.split()[1]) / 2**20, 1) if total else None


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


def measure_rates(config: BenchConfig, progress: Progress, what: str) -> rl.MachineRates:
    with progress.stage(what):
        return rl.measure_machine(config.threads, config.bandwidth_mib, config.gemm_size)


# ---------------------------------------------------------------------------------------------
# Measuring


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
            result, peak = meter.peak_above_start(side.run, inputs, config.new_tokens)
            memory[side.name].run_peak = max(memory[side.name].run_peak, peak)
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


def side_results(
    sides,
    runs: dict[str, list[RunTimes]],
    memory: dict[str, SideMemory],
    config: BenchConfig,
    prompt_tokens: int,
) -> dict[str, SideResult]:
    return {
        side.name: SideResult(
            side.name, runs[side.name], memory[side.name], config.batch, config.new_tokens, prompt_tokens
        )
        for side in sides
    }


def run_bench(config: BenchConfig, progress: Progress | None = None) -> BenchReport:
    """Measures both sides and the machine; writes --json and --plot when asked."""
    progress = progress or Progress()
    check_outputs(config.json_path, config.plot_path)
    manifest = contract.read_manifest(config.artifacts)
    meter = RssMeter()
    runtime, runtime_memory = load_runtime(config, meter, progress)
    inputs = make_inputs(
        manifest, config.batch, config.prompt_len, config.seed, image=not config.decoder_only
    )
    check_fits(runtime, inputs, config)

    import torch

    torch.set_num_threads(config.threads)
    machine = machine_info()
    first_rates = measure_rates(
        config,
        progress,
        f"measuring this machine ({config.bandwidth_mib} MiB buffer, "
        f"{config.gemm_size}^3 GEMM, {config.threads} threads)",
    )
    dtype = reference_dtype(config, manifest)
    if config.decoder_only:
        source, reference, reference_memory, decoder, cut = load_decoder_cut(
            config, manifest, dtype, meter, progress
        )
        vision = None
    else:
        source, reference, reference_memory = load_reference(config, dtype, meter, progress)
        check_same_model(source, manifest, config)
        decoder, vision = model_costs(source, config, manifest)

    sides = [reference, runtime]
    memory = {REFERENCE: reference_memory, runtime.name: runtime_memory}
    progress.say(
        f"running {inputs.prompt_tokens}-token prefill + {config.new_tokens} decode steps, batch {config.batch}"
    )
    reads: list[float] = []
    runs = measure(sides, inputs, config, meter, memory, progress, reads)
    again = measure_rates(
        config, progress, "measuring this machine again (the best of before and after counts)"
    )
    rates = rl.best_rates(first_rates, again)
    cut_report = None
    if config.decoder_only:
        scales = depth_scales(rates, decoder, cut, config.batch, inputs.prompt_tokens, config.new_tokens)
        measured = side_results([reference], runs, memory, config, inputs.prompt_tokens)[REFERENCE]
        cut_report = cut_summary(cut, manifest, scales, measured)
        runs[REFERENCE] = scaled_runs(runs[REFERENCE], scales)
    results = side_results(sides, runs, memory, config, inputs.prompt_tokens)
    vision_dtype = manifest.graphs["vision"].dtype
    bound = rl.roofline(
        rates, decoder, vision, config.batch, inputs.prompt_tokens, config.new_tokens, vision_dtype
    )
    sweep = []
    if config.plot_path is not None and not config.decoder_only:
        sweep = run_sweep(sides, results, config, manifest, rates, decoder, vision, progress)
    machine["load_average_end"] = load_average()
    report = BenchReport(
        config=config,
        machine=machine,
        model=model_summary(manifest, decoder, vision, dtype),
        rates=rates,
        rates_before=first_rates,
        bound=bound,
        reference=results[REFERENCE],
        runtime=results[runtime.name],
        memory_method=meter.method,
        torch_threads=torch.get_num_threads(),
        ort_threads=runtime.pipe.backend.threads,
        greedy_match=None
        if config.decoder_only
        else greedy_agreement(runs[REFERENCE][-1], runs[runtime.name][-1]),
        reference_cut=cut_report,
        reads_between_repeats=reads,
        sweep=sweep,
    )
    write_outputs(report, config)
    return report


def write_outputs(report: BenchReport, config: BenchConfig) -> None:
    if config.json_path is not None:
        Path(config.json_path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if config.plot_path is not None:
        plot(report, Path(config.plot_path))


# ---------------------------------------------------------------------------------------------
# --plot's sweep over prompt lengths


def sweep_lengths(prompt_len: int) -> list[int]:
    return sorted({max(1, round(prompt_len * fraction)) for fraction in PLOT_FRACTIONS})


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
            unmetered = {side.name: SideMemory() for side in sides}  # the sweep reports no memory
            runs = measure(sides, inputs, config, RssMeter(), unmetered, progress)
            measured = side_results(sides, runs, unmetered, config, inputs.prompt_tokens)
        prompt_tokens = text_tokens + bench_image_tokens(manifest)
        bound = rl.roofline(rates, decoder, vision, config.batch, prompt_tokens, config.new_tokens)
        points.append(sweep_point(text_tokens, prompt_tokens, measured, bound, config.batch))
    return points


def sweep_point(
    text_tokens: int, prompt_tokens: int, measured: dict[str, SideResult], bound: rl.Roofline, batch: int
) -> SweepPoint:
    return SweepPoint(
        text_tokens=text_tokens,
        prompt_tokens=prompt_tokens,
        prefill_tokens_per_s={name: round(r.prefill_tokens_per_s, 2) for name, r in measured.items()},
        decode_tokens_per_s={name: round(r.decode_tokens_per_s, 2) for name, r in measured.items()},
        roofline_prefill_tokens_per_s=round(batch * prompt_tokens / (bound.prefill.ms / 1000), 2),
        roofline_decode_tokens_per_s=round(bound.decode_tokens_per_s, 2),
    )
