"""llava-bench: the roofline arithmetic against hand-computed numbers, the report's ratios on
synthetic sides (every ratio reads "times better than PyTorch"), the two sides on the same
inputs, the command end to end on the tiny model (a real subprocess: it sets process-wide thread
counts) and on a tiny LLaVA-1.6 (a 640x480 image's 5 tiles, packed alike on both sides), and its
user errors (the runtime's limits among them, before PyTorch loads)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporter.bench import roofline as rl
from tests.support.cli import assert_error_line

LLAVA_BENCH = Path(sys.executable).with_name("llava-bench")
QUICK = [
    "--prompt-len",
    "8",
    "--new-tokens",
    "4",
    "--warmup",
    "1",
    "--repeats",
    "2",
    "--bandwidth-mib",
    "8",
    "--gemm-size",
    "128",
]


@pytest.fixture(scope="module")
def tiny_hf(workshop) -> Path:
    """The tiny model's Hugging Face folder, the one tiny_artifacts was exported from."""
    return workshop.tiny()["hf"]


# ---------------------------------------------------------------------------------------------
# Roofline arithmetic

# A LLaVA-7B-like decoder in round numbers: 4e9 weights in the layers, 1e9 in lm_head, float16.
DECODER = rl.DecoderCost(
    layer_params=4_000_000_000,
    lm_head_params=1_000_000_000,
    num_layers=32,
    num_heads=32,
    head_dim=128,
    dtype="float16",
)
MACHINE = rl.MachineRates(
    read_gb_s=20.0, copy_gb_s=15.0, gemm_gflop_s=1000.0, threads=8, buffer_mib=1024, gemm_size=2048
)


def test_decode_reads_every_decoder_weight_once_per_step():
    assert DECODER.weight_bytes == 10_000_000_000  # 5e9 weights * 2 bytes
    assert rl.DecoderCost(10, 5, 1, 1, 4, "float32").weight_bytes == 60


def test_prefill_flops_by_hand():
    # 100 tokens: layers 2 * 4e9 * 100 = 8e11; lm_head at the last position 2 * 1e9 = 2e9;
    # causal attention 2 (QK, AV) * 2 * 128 * (100 * 101 / 2 = 5050 pairs) * 32 heads * 32 layers
    attention = 2 * 2 * 128 * 5050 * 32 * 32
    assert attention == 2_647_654_400
    assert DECODER.attention_flops(100) == attention
    assert DECODER.prefill_flops(100) == 8e11 + 2e9 + attention
    assert DECODER.prefill_flops(100, batch=3) == 3 * (8e11 + 2e9 + attention)


def test_vision_flops_by_hand():
    cost = rl.VisionCost(
        patch_params=100,
        layer_params=1000,
        projector_params=50,
        num_layers=2,
        num_heads=2,
        head_dim=4,
        tower_tokens=5,
        image_tokens=4,
    )
    # patches 2*100*4 = 800; layers 2*1000*5 = 10000; attention 2*2*4*25*2*2 = 1600; projector 2*50*4 = 400
    assert cost.flops() == 12_800
    assert cost.flops(batch=2) == 25_600


def test_roofline_bounds_by_hand():
    vision = rl.VisionCost(
        patch_params=0,
        layer_params=300_000_000,
        projector_params=0,
        num_layers=24,
        num_heads=16,
        head_dim=64,
        tower_tokens=577,
        image_tokens=576,
    )
    bound = rl.roofline(
        MACHINE, DECODER, vision, batch=1, prompt_tokens=100, new_tokens=10, vision_dtype="float16"
    )
    # decode: 1e10 bytes at 20 GB/s = 500 ms; its compute (~1e10 FLOPs at 1 TFLOP/s, ~10 ms) is smaller
    assert bound.decode_step.memory_ms == pytest.approx(500.0)
    assert bound.decode_step.bound_by == "memory"
    assert bound.decode_step.ms == pytest.approx(500.0)
    assert bound.decode_tokens_per_s == pytest.approx(2.0)
    # prefill: (8e11 + 2e9 + 2.6476544e9) FLOPs at 1e12 FLOP/s
    assert bound.prefill.compute_ms == pytest.approx(804.6476544)
    assert bound.prefill.bound_by == "compute"
    assert bound.prefill.ms == pytest.approx(804.6476544)
    # image: 2 * 3e8 * 577 + 2*2*64*577^2*16*24 FLOPs at 1e12 FLOP/s; 6e8 bytes at 20 GB/s = 30 ms
    vision_flops = 2 * 3e8 * 577 + 2 * 2 * 64 * 577**2 * 16 * 24
    assert bound.image_encode.compute_ms == pytest.approx(vision_flops / 1e9)
    assert bound.image_encode.memory_ms == pytest.approx(30.0)
    assert bound.end_to_end_ms == pytest.approx(
        bound.image_encode.ms + bound.prefill.ms + 10 * 500.0, rel=1e-3
    )
    # batch 4: the same weights serve four sequences per step
    assert rl.roofline(MACHINE, DECODER, vision, 4, 100, 10).decode_tokens_per_s == pytest.approx(
        8.0, rel=1e-2
    )


def test_machine_measurements_are_rates():
    read, copy = rl.measure_bandwidth(buffer_mib=4, repeats=1)
    assert read > 0.1 and copy > 0.1  # GB/s
    assert rl.measure_gemm(size=64, repeats=1) > 0.01  # GFLOP/s
    assert rl.gemm_flops(2048) == 2 * 2048**3


def test_decoder_cost_counts_the_tiny_model(tiny_hf):
    from exporter.bench.run import decoder_cost, vision_cost
    from exporter.source import load_source

    source = load_source(str(tiny_hf))
    cost = decoder_cost(source, "float32")
    # Tiny llama: hidden 64, intermediate 128, 4 heads, 2 kv heads (head_dim 16), vocab 320.
    # A layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 + mlp 3*64*128 + two norms 2*64 = 36992.
    assert cost.layer_params == 2 * 36_992 + 64  # + the final norm
    assert cost.lm_head_params == 320 * 64
    assert cost.weight_bytes == 4 * (2 * 36_992 + 64 + 320 * 64)
    vision = vision_cost(source)
    assert (vision.num_layers, vision.tower_tokens, vision.image_tokens) == (2, 17, 16)  # 3 layers, select -2


# ---------------------------------------------------------------------------------------------
# The report's ratios, on synthetic sides: each reads "times better than PyTorch", above 1 better

SYNTHETIC_VISION = rl.VisionCost(
    patch_params=1_000_000,
    layer_params=300_000_000,
    projector_params=20_000_000,
    num_layers=24,
    num_heads=16,
    head_dim=64,
    tower_tokens=577,
    image_tokens=576,
)
BATCH, PROMPT_TOKENS, NEW_TOKENS = 1, 640, 16
BOUND = rl.roofline(MACHINE, DECODER, SYNTHETIC_VISION, BATCH, PROMPT_TOKENS, NEW_TOKENS, "float16")
PHASES = ("image encode", "prefill", "decode")  # the ceiling line's, each the start of its row's label


def synthetic_side(name: str, encode_ms: float, prefill_ms: float, decode_ms: float, rss_mib: float):
    """One run with no splice time, so end to end is encode + prefill + decode."""
    from exporter.bench.memory import SideMemory
    from exporter.bench.report import RunTimes, SideResult

    run = RunTimes(
        encode_ms, 0.0, prefill_ms, decode_ms, encode_ms + prefill_ms + decode_ms, [[1] * (NEW_TOKENS + 1)]
    )
    return SideResult(name, [run], SideMemory(resident=rss_mib), BATCH, NEW_TOKENS, PROMPT_TOKENS)


def at_roofline(name: str, times: float = 1.0, rss_mib: float = 1000.0):
    """A side `times` slower than the roofline in every phase (decode: `times` the step's bound)."""
    return synthetic_side(
        name,
        times * BOUND.image_encode.ms,
        times * BOUND.prefill.ms,
        times * NEW_TOKENS * BOUND.decode_step.ms,
        rss_mib,
    )


def synthetic_report(reference, runtime):
    from exporter.bench.report import BenchReport
    from exporter.bench.run import BenchConfig

    config = BenchConfig(
        model="src", artifacts=Path("art"), prompt_len=64, new_tokens=NEW_TOKENS, threads=1, batch=BATCH
    )
    return BenchReport(
        config=config,
        machine={"cpu": "cpu", "available_cpus": 1, "load_average_start": [0.1], "load_average_end": [0.1]},
        model={
            "reference_dtype": "float16",
            "decoder_dtype": "float16",
            "decoder_quant": None,
            "image_tokens": 576,
            "decoder_params": 5_000_000_000,
        },
        rates=MACHINE,
        rates_before=MACHINE,
        bound=BOUND,
        reference=reference,
        runtime=runtime,
        memory_method="synthetic",
        torch_threads=1,
        ort_threads=1,
        greedy_match=NEW_TOKENS + 1,
    )


def table_row(table: str, label: str) -> dict[str, str]:
    """The table's row whose metric starts with `label`, by column header."""
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    row = next(line for line in lines if line.startswith(label))
    return dict(zip(re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", row.strip())))


def ceiling_in_line(table: str) -> dict[str, float]:
    line = next(line for line in table.splitlines() if line.strip().startswith("ceiling:"))
    found = re.findall(r"([\d.]+)x faster on (image encode|prefill|decode)", line)
    return {phase: float(value) for value, phase in found}


def test_a_runtime_at_the_roofline_shows_its_ratio_at_the_ceiling():
    report = synthetic_report(at_roofline("pytorch", times=1.6), at_roofline("ort-cpu"))
    figures, table = report.to_dict(), report.table()
    ceiling_line = ceiling_in_line(table)
    for key in ("image_encode_ms", "prefill_ms", "decode_tokens_per_s", "end_to_end_ms"):
        assert figures["ratios"][key] == pytest.approx(figures["ratio_ceiling"][key], rel=1e-3), key
        assert figures["ratios"][key] == pytest.approx(1.6, rel=1e-3), key  # above 1: the runtime is faster
        assert figures["efficiency"]["ort-cpu"][key] == pytest.approx(1.0, rel=1e-3), key
    for phase in PHASES:
        row = table_row(table, phase)
        assert row["x better (ort)"] == "1.60x" == f"{ceiling_line[phase]:.2f}x", (phase, table)
        assert row["ort/roof"] == "100%", (phase, table)


def test_a_runtime_twice_as_fast_shows_two_in_the_table_and_the_json():
    pytorch = synthetic_side("pytorch", 2000.0, 4000.0, 800.0, 3000.0)
    runtime = synthetic_side("ort-cpu", 1000.0, 2000.0, 400.0, 1500.0)  # half the time, half the memory
    report = synthetic_report(pytorch, runtime)
    figures, table = report.to_dict(), report.table()
    assert figures["ratios"] == {
        "image_encode_ms": 2.0,
        "prefill_ms": 2.0,
        "decode_tokens_per_s": 2.0,
        "end_to_end_ms": 2.0,
        "peak_rss_mib": 2.0,
    }
    for label in ("image encode ms", "prefill ms", "decode tok/s", "end-to-end ms", "peak RSS MiB"):
        assert table_row(table, label)["x better (ort)"] == "2.00x", (label, table)
    assert "above 1 better" in table and "above 1" in figures["ratio_convention"]


# ---------------------------------------------------------------------------------------------
# The two sides


def test_both_sides_turn_the_same_inputs_into_the_same_greedy_tokens(tiny_hf, tiny_artifacts):
    """A batch of 2 through the runtime's own loop (Pipeline.run) and through the reference:
    each [B][1 + new_tokens] tokens, row by row the same (float32 graphs, confident logits)."""
    from exporter.bench.report import greedy_agreement
    from exporter.bench.run import ReferenceSide, RuntimeSide, make_inputs
    from exporter.source import load_source
    from runtime import contract
    from runtime.pipeline import Pipeline

    inputs = make_inputs(contract.read_manifest(tiny_artifacts), batch=2, text_tokens=8)
    with Pipeline.load(tiny_artifacts, threads=1) as pipe:
        runtime = RuntimeSide(pipe).run(inputs, new_tokens=4)
    reference = ReferenceSide(load_source(str(tiny_hf))).run(inputs, new_tokens=4)
    for run in (runtime, reference):
        assert [len(row) for row in run.tokens] == [5, 5]
        assert 0 < run.time_to_first_token_ms <= run.end_to_end_ms and run.decode_ms > 0
    assert runtime.tokens == reference.tokens and runtime.tokens[0] != runtime.tokens[1]
    assert greedy_agreement(reference, runtime) == 5


# ---------------------------------------------------------------------------------------------
# The command end to end


def llava_bench(*args, timeout=180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [str(LLAVA_BENCH), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_bench_end_to_end_writes_table_and_json(tiny_hf, tiny_artifacts, tmp_path):
    out = tmp_path / "bench.json"
    result = llava_bench(
        "--model", tiny_hf, "--artifacts", tiny_artifacts, *QUICK, "--threads", "1", "--json", out
    )
    assert result.returncode == 0, result.stderr
    table = result.stdout
    for label in ("image encode ms", "prefill ms (24 tok)", "decode tok/s", "end-to-end ms", "peak RSS MiB"):
        assert label in table, table
    assert "ort-cpu" in table and "x better (ort)" in table and "roofline" in table
    assert "threads: torch 1, onnxruntime intra-op 1" in table

    report = json.loads(out.read_text())
    settings = report["settings"]
    assert (settings["text_tokens"], settings["image_tokens"], settings["prompt_tokens"]) == (8, 16, 24)
    assert (settings["torch_threads"], settings["ort_intra_op_threads"], settings["repeats"]) == (1, 1, 2)
    pytorch, ort = report["results"]["pytorch"], report["results"]["ort-cpu"]
    for side in (pytorch, ort):
        assert len(side["runs"]) == 2
        for key in (
            "image_encode_ms",
            "prefill_ms",
            "decode_tokens_per_s",
            "end_to_end_ms",
            "time_to_first_token_ms",
        ):
            assert side[key] > 0, key
        assert side["peak_rss_mib"] >= 0
        assert side["end_to_end_ms"] >= side["prefill_ms"]
    for key in ("image_encode_ms", "prefill_ms", "end_to_end_ms"):  # times faster: pytorch's ms / ort's
        assert report["ratios"][key] == pytest.approx(pytorch[key] / ort[key], rel=1e-2)
    assert report["ratios"]["decode_tokens_per_s"] == pytest.approx(
        ort["decode_tokens_per_s"] / pytorch["decode_tokens_per_s"], rel=1e-2
    )
    roof = report["roofline"]
    assert roof["decode_step"]["bytes"] == report["model"]["decoder_weight_bytes"] == 4 * 94_528
    assert roof["decode_tokens_per_s"] > 0 and roof["prefill_ms"] > 0
    assert 0 < report["efficiency"]["ort-cpu"]["decode_tokens_per_s"]
    assert report["machine"]["read_gb_s"] > 0 and report["machine"]["gemm_gflop_s"] > 0
    reads = report["machine"]["read_gb_s_between_repeats"]
    assert len(reads) == settings["repeats"] + 1 and min(reads) > 0  # before each repeat, after the last
    streamed = ort["decode_tokens_per_s"] * roof["decode_step"]["bytes"] / 1e9
    assert report["decode_weight_gb_s"]["ort-cpu"] == pytest.approx(streamed, rel=1e-2)
    reference_streamed = (
        pytorch["decode_tokens_per_s"] * 4 * report["model"]["decoder_params"] / 1e9
    )  # float32
    assert report["decode_weight_gb_s"]["pytorch"] == pytest.approx(reference_streamed, rel=1e-2)
    assert report["decode_share_of_read_between_repeats"]["ort-cpu"] == pytest.approx(
        streamed / np.median(reads), rel=2e-2
    )
    assert "read bandwidth between repeats:" in table and "decode streamed weights at pytorch" in table
    # The ratio a backend at the roofline would show: PyTorch's distance from the roofline.
    ceiling = report["ratio_ceiling"]
    assert ceiling["decode_tokens_per_s"] == pytest.approx(
        roof["decode_tokens_per_s"] / pytorch["decode_tokens_per_s"], rel=1e-2
    )
    assert ceiling["prefill_ms"] == pytest.approx(pytorch["prefill_ms"] / roof["prefill_ms"], rel=1e-2)
    assert ceiling["peak_rss_mib"] is None
    assert (
        f"ceiling: a backend at the roofline would be {ceiling['image_encode_ms']:.2f}x faster on image encode"
        in table
    )
    # The exported float32 graphs reproduce the reference: greedy tokens agree (the tiny model's
    # top-2 margins are far above float32 noise, as the generation parity tests show).
    assert report["greedy_tokens_matching"] == {"leading": 5, "of": 5}


# ---------------------------------------------------------------------------------------------
# LLaVA-1.6 (anyres): a 640x480 image's tiles, packed, on both sides

# The default pinpoints at the tiny model's 32-pixel tiles: a 640x480 image takes the 2x2 grid
# (64x64), 5 tiles, as it takes 672x672 at CLIP-L/336's
NEXT_PINPOINTS = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))
# 5 tiles of 16 patch features; packed: the base tile's 16, then the 8x8 grid unpadded to the
# image's aspect, 6 rows of 8, each with its newline: 16 + 6 * 9
NEXT_IMAGE_TOKENS = 70


@pytest.fixture(scope="module")
def next_model(workshop) -> tuple[Path, Path]:
    """A tiny LLaVA-1.6's HF folder and its artifact folder (fp32)."""
    from exporter.testing.tiny import TinyConfig

    config = TinyConfig(anyres=NEXT_PINPOINTS, max_positions=640)
    return workshop.tiny(config)["hf"], workshop.artifacts(config)


def test_an_anyres_bench_image_is_640x480_in_5_tiles_packed_alike_on_both_sides(next_model):
    """make_inputs tiles a seeded 640x480 image; the reference's encode (get_image_features:
    tower, projector, pack_image_features) and the runtime's (vision graph, anyres.pack) give
    the same [B, 70, hidden], not the 80 rows of five unpacked tiles; the greedy tokens agree."""
    import torch

    from exporter.bench.run import BENCH_IMAGE_SIZE, ReferenceSide, RuntimeSide, make_inputs
    from exporter.source import load_source
    from runtime import anyres, contract
    from runtime.pipeline import Pipeline, Timings

    hf, artifacts = next_model
    manifest = contract.read_manifest(artifacts)
    inputs = make_inputs(manifest, batch=2, text_tokens=8)
    assert BENCH_IMAGE_SIZE == (480, 640) and inputs.image_sizes == [BENCH_IMAGE_SIZE] * 2
    assert anyres.tile_count(BENCH_IMAGE_SIZE, manifest.anyres) == 5
    assert inputs.pixels.shape == (10, 3, 32, 32) and inputs.batch == 2
    counted = anyres.image_token_count(BENCH_IMAGE_SIZE, manifest.anyres, manifest.vision)
    assert inputs.image_tokens == NEXT_IMAGE_TOKENS == counted
    assert inputs.prompt_tokens == 8 + NEXT_IMAGE_TOKENS
    reference = ReferenceSide(load_source(str(hf)))
    with torch.no_grad():
        expected = reference.encode(inputs).numpy()
    with Pipeline.load(artifacts, threads=1) as pipe:
        packed = np.stack(pipe.image_embeds(inputs.pipeline_batch(), Timings()))
        runtime = RuntimeSide(pipe).run(inputs, new_tokens=4)
    assert expected.shape == packed.shape == (2, NEXT_IMAGE_TOKENS, 64)
    # after the base tile's 16, each of the 6 grid rows is 8 features and the model's newline
    newline = reference.model.model.image_newline.numpy()
    assert (expected[:, 16 + 8 :: 9] == newline).all() and expected[:, 16 + 8 :: 9].shape[1] == 6
    np.testing.assert_allclose(packed, expected, atol=1e-5)
    assert runtime.tokens == reference.run(inputs, new_tokens=4).tokens


def test_bench_on_an_anyres_model_reports_the_packed_image(next_model, tmp_path):
    hf, artifacts = next_model
    out = tmp_path / "bench.json"
    result = llava_bench("--model", hf, "--artifacts", artifacts, *QUICK, "--threads", "1", "--json", out)
    assert result.returncode == 0, result.stderr
    table = result.stdout
    heading = f"prompt 78 tokens (8 text + {NEXT_IMAGE_TOKENS} image: a 640x480 image in 5 tiles)"
    assert heading in table, table
    assert "prefill ms (78 tok)" in table and "image encode ms" in table
    report = json.loads(out.read_text())
    settings, model = report["settings"], report["model"]
    assert (settings["image_tokens"], settings["prompt_tokens"]) == (NEXT_IMAGE_TOKENS, 78)
    assert (model["image_tiles"], model["image_size"]) == (5, [480, 640])
    pytorch, ort = report["results"]["pytorch"], report["results"]["ort-cpu"]
    assert pytorch["image_encode_ms"] > 0 and ort["image_encode_ms"] > 0
    assert report["ratios"]["image_encode_ms"] == pytest.approx(
        pytorch["image_encode_ms"] / ort["image_encode_ms"], rel=1e-2
    )
    # the roofline's encode is the tower and projector over the 5 tiles
    encode = report["roofline"]["image_encode"]
    assert encode["flops"] == pytest.approx(5 * tiny_tile_flops(hf), rel=1e-6)
    assert report["greedy_tokens_matching"] == {"leading": 5, "of": 5}


def tiny_tile_flops(hf: Path) -> float:
    """The vision graph's FLOPs for one 32x32 tile of the tiny model, by VisionCost."""
    from dataclasses import replace

    from exporter.bench.run import vision_cost
    from exporter.source import load_source

    return replace(vision_cost(load_source(str(hf))), tiles=1).flops()


def test_artifacts_without_anyres_for_an_anyres_model(next_model, tiny_artifacts, monkeypatch):
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # in-process: keep pytest's threads
    result = invoke("--model", next_model[0], "--artifacts", tiny_artifacts, *QUICK)
    assert_error_line(result, "were not exported from --model", "anyres tiling is None there")


# ---------------------------------------------------------------------------------------------
# User errors: one `error:` line, exit 2, before any long work


def invoke(*args):
    from click.testing import CliRunner

    from exporter.bench.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_trt_without_engine_is_an_engine_error(tiny_hf, tiny_artifacts):
    assert_error_line(
        invoke("--model", tiny_hf, "--artifacts", tiny_artifacts, "--backend", "trt"),
        "TensorRT engine",
        "llava-export engine",
    )


def test_missing_artifacts(tiny_hf, tmp_path):
    assert_error_line(invoke("--model", tiny_hf, "--artifacts", tmp_path / "nowhere"), "does not exist")


@pytest.fixture
def slow_work(monkeypatch) -> list[str]:
    """Records the slow work after the runtime is loaded (measuring the machine, loading PyTorch),
    which a run that does not fit must never reach."""
    from exporter.bench import run

    done: list[str] = []
    monkeypatch.setattr(run, "measure_rates", lambda *args: done.append("measured the machine"))
    monkeypatch.setattr(run, "load_reference", lambda *args: done.append("loaded the reference"))
    return done


def test_prompt_too_long_for_the_model(tiny_hf, tiny_artifacts, slow_work):
    # 250 text + 16 image tokens > 256 positions: the runtime's own limits, with the flags
    assert_error_line(
        invoke("--model", tiny_hf, "--artifacts", tiny_artifacts, "--prompt-len", 250, "--new-tokens", 4),
        "--prompt-len 250 (+ 16 image tokens) and --new-tokens 4",
        "prompt is 266 tokens with its images; the model takes at most 256 positions",
    )
    assert slow_work == []


def test_a_static_kv_cache_too_small_is_refused_before_pytorch_loads(
    tiny_hf, tiny_artifacts, tmp_path, slow_work
):
    """The backend's limits, not only the model's positions: 8 text + 16 image tokens and the
    prefill's token + 16 decode steps reach 40 cache positions; the static cache holds 32."""
    from exporter.graphs.decoder import export_decoder
    from exporter.progress import Progress
    from exporter.source import load_source
    from runtime import contract

    artifacts = shutil.copytree(tiny_artifacts, tmp_path / "static")
    export_decoder(
        load_source(str(tiny_hf)),
        artifacts,
        force=True,
        verify=False,
        progress=Progress(quiet=True),
        kv_cache=contract.KV_STATIC,
        max_seq_len=32,
    )
    assert_error_line(
        invoke("--model", tiny_hf, "--artifacts", artifacts, "--prompt-len", 8, "--new-tokens", 16),
        "--new-tokens 16 (17 new tokens with the prefill's) do not fit",
        "the decoder's static KV cache holds 32",
        "--max-seq-len 40",
    )
    assert slow_work == []


def test_json_into_a_missing_folder(tiny_hf, tiny_artifacts, tmp_path):
    assert_error_line(
        invoke("--model", tiny_hf, "--artifacts", tiny_artifacts, "--json", tmp_path / "no" / "x.json"),
        "--json",
        "does not exist",
    )


def test_plot_without_matplotlib_names_the_extra(tiny_hf, tiny_artifacts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert_error_line(
        invoke("--model", tiny_hf, "--artifacts", tiny_artifacts, "--plot", tmp_path / "p.png"),
        "--plot needs matplotlib",
        "pip install 'llava-export[bench]'",
    )


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="--plot needs matplotlib")
def test_plot_sweeps_prompt_lengths(tiny_hf, tiny_artifacts, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = llava_bench(
        "--model",
        tiny_hf,
        "--artifacts",
        tiny_artifacts,
        *QUICK,
        "--threads",
        "1",
        "--json",
        out,
        "--plot",
        png,
    )
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = json.loads(out.read_text())["sweep"]
    assert [point["text_tokens"] for point in sweep] == [1, 2, 4, 8]  # 1/8, 1/4, 1/2, all of --prompt-len
    assert all(point["decode_tokens_per_s"]["ort-cpu"] > 0 for point in sweep)


def test_bad_numbers_are_usage_errors(tiny_hf, tiny_artifacts):
    for flag in ("--batch", "--repeats", "--new-tokens", "--prompt-len"):
        result = invoke("--model", tiny_hf, "--artifacts", tiny_artifacts, flag, 0)
        assert result.exit_code == 2 and flag in result.output, result.output


def test_artifacts_of_another_model(tiny_hf, tiny_artifacts, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # in-process: keep pytest's threads
    other = tmp_path / "other"
    shutil.copytree(tiny_hf, other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 512
    (other / "config.json").write_text(json.dumps(config))
    result = invoke("--model", other, "--artifacts", tiny_artifacts, *QUICK)
    assert_error_line(result, "were not exported from --model", "max_positions is 256 there and 512")


# ---------------------------------------------------------------------------------------------
# --decoder-only: the decoder alone, against a shallower float32 cut scaled to the whole depth


def test_the_cut_is_the_model_truncated_to_its_first_layers(tiny_hf):
    """DecoderCutSide's first layer, read from the checkpoint as the model streams in, gives the
    tokens of transformers' own model built with one layer (from_pretrained drops the rest)."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from exporter.bench.run import BenchInputs, DecoderCutSide
    from exporter.source import load_source

    source = load_source(str(tiny_hf), stream_decoder=True)
    assert source.model.model.language_model.layers[1].mlp.up_proj.weight.is_meta
    cut = DecoderCutSide(source, layers=1)
    assert len(cut.language_model.layers) == 1 and not cut.lm_head.weight.is_meta

    config = AutoConfig.from_pretrained(tiny_hf)
    config.text_config.num_hidden_layers = 1
    truncated = LlavaForConditionalGeneration.from_pretrained(
        tiny_hf, config=config, dtype=torch.float32
    ).eval()
    ids = np.array([[1, 5, 9, 33, 7, 2, 41, 12]])
    inputs = BenchInputs(None, ids, ids[:, :0], 0)
    run = cut.run(inputs, new_tokens=4)
    with torch.no_grad():
        expected = truncated.generate(
            torch.from_numpy(ids), max_new_tokens=5, do_sample=False, min_new_tokens=5
        )
    assert run.tokens == expected[:, ids.shape[1] :].tolist()


def test_depth_scales_follow_the_roofline_work_by_hand():
    """Decode is bound by bytes: the whole decoder's over the cut's; prefill by FLOPs."""
    from dataclasses import replace

    from exporter.bench.run import depth_scales

    full = replace(DECODER, dtype="float32")
    per_layer = full.layer_params // full.num_layers
    cut = replace(full, layer_params=2 * per_layer, num_layers=2)
    scales = depth_scales(MACHINE, full, cut, batch=1, prompt_tokens=640, new_tokens=32)
    assert scales["decode"] == pytest.approx(5e9 / (2 * per_layer + 1e9), rel=1e-3)  # bytes (KV aside)
    prefill = [cost.prefill_flops(640) for cost in (full, cut)]
    assert scales["prefill"] == pytest.approx(prefill[0] / prefill[1], rel=1e-9)
    assert 1 < scales["decode"] < scales["prefill"] < 16  # lm_head is in both: below the depth ratio


def test_decoder_only_bench_end_to_end(tiny_hf, tiny_artifacts, tmp_path):
    out = tmp_path / "bench.json"
    common = ("--model", tiny_hf, "--artifacts", tiny_artifacts, *QUICK, "--threads", "1", "--json", out)
    result = llava_bench(*common, "--decoder-only", "--reference-layers", "1")
    assert result.returncode == 0, result.stderr
    table = result.stdout
    assert "1 of 2 decoder layers, times scaled to 2" in table and "text only: --decoder-only" in table
    assert "image encode ms" not in table and "prefill ms (8 tok)" in table
    assert "per decoder layer" in table and "greedy tokens: not compared" in table

    report = json.loads(out.read_text())
    assert (report["settings"]["prompt_tokens"], report["settings"]["image_tokens"]) == (8, 0)
    assert report["greedy_tokens_matching"] is None
    cut, pytorch = report["reference_cut"], report["results"]["pytorch"]
    assert (cut["layers"], cut["of"]) == (1, 2)
    assert 1 < cut["scales"]["decode"] < 2 and 1 < cut["scales"]["prefill"] < 2
    # the reference's figures are the cut's, scaled: medians of scaled runs = scaled medians
    assert pytorch["prefill_ms"] == pytest.approx(
        cut["measured_prefill_ms"] * cut["scales"]["prefill"], rel=1e-3
    )
    assert pytorch["decode_tokens_per_s"] == pytest.approx(
        cut["measured_decode_tokens_per_s"] / cut["scales"]["decode"], rel=1e-3
    )
    for side in report["results"].values():
        assert side["image_encode_ms"] == 0 and side["prefill_ms"] > 0 and side["decode_tokens_per_s"] > 0


# ---------------------------------------------------------------------------------------------
# llava-bench llamacpp: rounds of ours and of llama.cpp's llama-bench (a stand-in here)

FAKE_LLAMA_BENCH = """#!{python}
# llama-bench's command line and JSON record, with times from the test's counts: 2 ms a prompt
# token, 10 ms a generated one (-r 1: one repetition, so avg_ns is the test's time)
import json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
with open({log!r}, "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if "{fail}" in args["-m"]:
    sys.exit("error: failed to load model '" + args["-m"] + "'")
prompt, generate = int(args["-p"]), int(args["-n"])
print(json.dumps([{{"model_type": "llama ?B Q4_0", "n_prompt": prompt, "n_gen": generate,
                   "n_depth": int(args["-d"]), "avg_ns": (2 * prompt + 10 * generate) * 10**6}}]))
"""


@pytest.fixture
def fake_llama_bench(tmp_path) -> tuple[Path, Path]:
    """(a llama-bench stand-in, the file it logs its command lines to)."""
    log, binary = tmp_path / "calls.log", tmp_path / "llama-bench"
    binary.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable, log=str(log), fail="broken"))
    binary.chmod(0o755)
    return binary, log


def test_llamacpp_rounds_alternate_and_report_the_ratios(tiny_hf, tiny_artifacts, tmp_path, fake_llama_bench):
    binary, log = fake_llama_bench
    gguf, out = tmp_path / "tiny-q4_0.gguf", tmp_path / "peer.json"
    gguf.write_bytes(b"GGUF")
    result = llava_bench(
        "llamacpp",
        *("--model", tiny_hf, "--artifacts", tiny_artifacts, "--gguf", gguf, "--llama-bench", binary),
        *("--prompt-len", 8, "--new-tokens", 4, "--rounds", 2, "--threads", 1, "--reference-layers", 1),
        *("--json", out),
    )
    assert result.returncode == 0, result.stderr
    # each round: a prefill of 8 tokens, then 4 steps after an 8-token context, on 1 thread
    prefill = f"-m {gguf} -t 1 -p 8 -n 0 -d 0 -r 1 -o json"
    decode = f"-m {gguf} -t 1 -p 0 -n 4 -d 8 -r 1 -o json"
    assert log.read_text().splitlines() == [prefill, decode, prefill, decode]

    report = json.loads(out.read_text())
    figures = report["figures"]
    assert figures["prefill_ms"]["llama.cpp"] == pytest.approx(16.0)  # 8 tokens at 2 ms
    assert figures["decode_tokens_per_s"]["llama.cpp"] == pytest.approx(100.0)  # 4 steps in 40 ms
    rounds = report["rounds"]
    ours_prefill = np.median([r["ours_prefill_ms"] for r in rounds])
    assert figures["prefill_ms"]["ours"] == pytest.approx(ours_prefill)
    assert figures["prefill_ms"]["x_better"] == pytest.approx(16.0 / ours_prefill)
    ours_decode = np.median([r["ours_decode_tokens_per_s"] for r in rounds])
    assert figures["decode_tokens_per_s"]["x_better"] == pytest.approx(ours_decode / 100.0)
    for r in rounds:  # ours: llava-bench --decoder-only's own report, once per round
        assert r["llava_bench"]["reference_cut"]["layers"] == 1
        assert r["ours_prefill_ms"] == r["llava_bench"]["results"]["ort-cpu"]["prefill_ms"]
    rooflines = [r["llava_bench"]["roofline"]["decode_tokens_per_s"] for r in rounds]
    assert figures["roofline_decode_tokens_per_s"] == pytest.approx(np.median(rooflines))
    each = [r["ours_decode_tokens_per_s"] / roof for r, roof in zip(rounds, rooflines)]
    assert figures["ours_decode_of_roofline"] == pytest.approx(np.median(each))  # each round its own
    assert "prefill ms (8 tok)" in result.stdout and "llama ?B Q4_0" in result.stdout


def test_llamacpp_without_its_files(tiny_hf, tiny_artifacts, tmp_path, fake_llama_bench):
    binary, _ = fake_llama_bench
    common = ("--model", tiny_hf, "--artifacts", tiny_artifacts)
    assert_error_line(
        invoke("llamacpp", *common, "--gguf", tmp_path / "none.gguf", "--llama-bench", binary),
        "--gguf",
        "does not exist",
        "scripts/llamacpp_peer.sh gguf",
    )
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert_error_line(
        invoke("llamacpp", *common, "--gguf", gguf, "--llama-bench", tmp_path / "no-such-binary"),
        "--llama-bench",
        "not an executable",
        "scripts/llamacpp_peer.sh build",
    )


def test_a_failing_llama_bench_is_one_line_naming_its_error(
    tiny_hf, tiny_artifacts, tmp_path, fake_llama_bench
):
    from exporter.bench.peer import PeerConfig, llama_bench
    from runtime.errors import LlavaError

    binary, _ = fake_llama_bench
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    config = PeerConfig(str(tiny_hf), tiny_artifacts, broken, str(binary), threads=1)
    with pytest.raises(LlavaError, match="llama-bench failed .*failed to load model"):
        llama_bench(config, 8, 0)
