"""llava-bench serve: the command end to end on the tiny model (in a subprocess, with the
roofline: it sets torch's process-wide threads), in-process against a server of its own and
against a running one (--url), the server's step metrics as it parses them, the figures'
arithmetic on a synthetic run, and its user errors (one `error:` line, exit 2). No timing
thresholds: only that the figures exist and add up."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.bench import roofline as rl
from tests.support.cli import assert_error_line

LLAVA_BENCH = Path(sys.executable).with_name("llava-bench")
QUICK = ["--clients", "1,2", "--new-tokens", "4", "--requests", "2", "--warmup", "1"]
MACHINE = ["--bandwidth-mib", "8", "--gemm-size", "128", "--threads", "1"]
# The tiny llama: 2 layers, 2 kv heads of 16, float32: 2 (K and V) x 2 x 2 x 16 x 4 bytes.
TINY_KV_BYTES_PER_POSITION = 512


@pytest.fixture(scope="module")
def tiny_hf(workshop) -> Path:
    return workshop.tiny()["hf"]


def llava_bench(*args, timeout=240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [str(LLAVA_BENCH), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )


def invoke(*args):
    from click.testing import CliRunner

    from exporter.bench.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def level_rows(table: str) -> dict[int, dict[str, str]]:
    """The table's rows by client count, each cell by its column header."""
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("clients"))
    names = re.split(r"\s{2,}", header.strip())
    rows = {}
    for line in lines[lines.index(header) + 1 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[int(cells[0])] = dict(zip(names, cells))
    return rows


def check_levels(report: dict, clients: list[int], requests: int, new_tokens: int) -> None:
    levels = report["levels"]
    assert [level["clients"] for level in levels] == clients
    for level in levels:
        n = level["clients"]
        assert level["requests_completed"] == n * requests and level["requests_failed"] == 0, level
        # ignore_eos: every answer runs its whole budget, as the server's usage counted it
        assert level["early_stops"] == 0 and level["tokens"] == n * requests * new_tokens, level
        assert level["tokens_per_s"] > 0 and level["window_s"] > 0
        assert level["tokens_per_s"] == pytest.approx(level["tokens"] / level["window_s"], rel=1e-2)
        assert level["ttft_p50_ms"] > 0 and level["ttft_p99_ms"] >= level["ttft_p50_ms"]
        assert level["content_chunks"] >= 1
        # the server's own step counts over the window: each answer's first token comes from
        # its prefill, the others from batched decode steps, one token per row per step
        assert level["decode_tokens"] == n * requests * (new_tokens - 1), level
        assert requests * (new_tokens - 1) <= level["decode_steps"] <= level["decode_tokens"]
        assert 1 <= level["mean_rows"] <= n and level["max_rows_bucket"] in (1, 2, 4, 8, 16)
        assert level["mean_rows"] == pytest.approx(level["decode_tokens"] / level["decode_steps"], rel=1e-2)
        assert level["step_tokens_per_s"] == pytest.approx(
            level["decode_tokens"] / level["decode_s"], rel=1e-2
        )
        assert 0 < level["decode_share_of_window"] < 1
    assert levels[0]["times_one_client"] == 1.0
    assert levels[1]["times_one_client"] == pytest.approx(
        levels[1]["tokens_per_s"] / levels[0]["tokens_per_s"], rel=1e-2
    )


# ---------------------------------------------------------------------------------------------
# The command end to end


def test_serve_bench_end_to_end_with_the_roofline(tiny_hf, tiny_artifacts, tmp_path):
    out = tmp_path / "serve.json"
    result = llava_bench(
        "serve", "--artifacts", tiny_artifacts, "--model", tiny_hf, *QUICK, *MACHINE, "--json", out
    )
    assert result.returncode == 0, result.stderr
    table = result.stdout
    rows = level_rows(table)
    assert sorted(rows) == [1, 2], table
    for row in rows.values():
        assert float(row["tok/s"].replace(",", "")) > 0, table
        assert row["x one client"].endswith("x") and row["roofline tok/s"] != "n/a", table
        assert row["of roof"].endswith("%") and row["step of roof"].endswith("%"), table
        assert float(row["KV MiB"]) > 0 and re.fullmatch(r"\d+\.\d \(<=\d+\)", row["rows"]), table
    assert rows[1]["x one client"] == "1.00x" and rows[1]["rows"] == "1.0 (<=1)"
    assert "roofline inputs: read" in table and "decode steps at N=2:" in table

    report = json.loads(out.read_text())
    check_levels(report, [1, 2], requests=2, new_tokens=4)
    settings = report["settings"]
    assert settings["in_process"] and settings["max_batch"] == 2 and settings["ignore_eos"]
    assert settings["api_key"] is None
    prompt = settings["prompt_tokens"]
    assert prompt > 16  # the question, the template and the tiny model's 16 image tokens
    assert report["kv"]["bytes_per_position"] == TINY_KV_BYTES_PER_POSITION
    assert report["kv"]["positions_per_row"] == prompt + 4 and report["kv"]["layout"] == "concat"
    weight_bytes = report["model"]["weight_bytes"]
    assert weight_bytes == 4 * 94_528  # as llava-bench counts the tiny decoder
    rates = report["machine"]["rates"]
    assert rates["read_gb_s"] > 0 and rates["gemm_gflop_s"] > 0

    def roof_step_ms(rows: float) -> float:
        context = round(prompt + (4 + 1) / 2)
        flops = (
            2.0 * 94_528 * rows + 2 * 2.0 * 16 * context * 4 * 2 * rows
        )  # linear + attention, 4 heads, 2 layers
        return max(weight_bytes / (rates["read_gb_s"] * 1e9), flops / (rates["gemm_gflop_s"] * 1e9)) * 1e3

    for level in report["levels"]:
        n, roof = level["clients"], level["roofline"]
        assert roof["bytes"] == weight_bytes
        assert roof["tokens_per_s"] == pytest.approx(n / (roof_step_ms(n) / 1e3), rel=1e-2)
        assert level["share_of_roofline"] == pytest.approx(
            level["tokens_per_s"] / roof["tokens_per_s"], rel=1e-2
        )
        mean_rows_roof = level["mean_rows"] / (roof_step_ms(level["mean_rows"]) / 1e3)
        assert level["step_share_of_roofline"] == pytest.approx(
            level["step_tokens_per_s"] / mean_rows_roof, rel=2e-2
        )
        assert level["kv_mib"] == pytest.approx(
            n * (prompt + 4) * TINY_KV_BYTES_PER_POSITION / 2**20, rel=1e-2
        )
        assert level["rss_peak_mib"] > 0 and level["rss_growth_mib"] is not None


def test_serve_bench_without_model_prints_no_roofline(tiny_artifacts, tmp_path):
    """In this process (no torch threads set without --model): the roofline is n/a, the rest is there."""
    out = tmp_path / "serve.json"
    result = invoke("serve", "--artifacts", tiny_artifacts, *QUICK, "--threads", "1", "--json", out)
    assert result.exit_code == 0, result.output
    rows = level_rows(result.output)
    assert sorted(rows) == [1, 2]
    assert all(row["roofline tok/s"] == "n/a" and row["of roof"] == "n/a" for row in rows.values())
    assert "roofline: n/a (give --model" in result.output
    report = json.loads(out.read_text())
    check_levels(report, [1, 2], requests=2, new_tokens=4)
    assert report["model"] is None and report["machine"]["rates"] is None
    assert all(
        level["roofline"] is None and level["step_share_of_roofline"] is None for level in report["levels"]
    )


def test_serve_bench_against_a_running_server(tiny_artifacts, tmp_path):
    """--url: the same figures from the clients and the server's /metrics, no RSS."""
    from runtime.pipeline import Pipeline
    from tests.support.serving import live_server

    out = tmp_path / "serve.json"
    with (
        Pipeline.load(tiny_artifacts, threads=1) as pipe,
        live_server(pipe, engine_options={"max_batch": 4}) as server,
    ):
        result = invoke("serve", "--url", server.url, "--artifacts", tiny_artifacts, *QUICK, "--json", out)
    assert result.exit_code == 0, result.output
    assert sorted(level_rows(result.output)) == [1, 2]
    report = json.loads(out.read_text())
    assert report["settings"]["served_model"] == server.model and not report["settings"]["in_process"]
    check_levels(report, [1, 2], requests=2, new_tokens=4)
    assert all(level["rss_peak_mib"] is None for level in report["levels"])


# ---------------------------------------------------------------------------------------------
# The server's step metrics, and the figures' arithmetic on a synthetic run


def test_step_counts_from_the_servers_metrics_page():
    """What llava-serve's own Metrics write, parsed back; the growth between two scrapes."""
    from exporter.bench.serve import parse_step_counts
    from runtime.serve.metrics import Metrics

    metrics = Metrics()
    assert parse_step_counts("# HELP other\nother_total 1.0\n") is None  # a server without them
    empty = parse_step_counts(metrics.text().decode())
    assert (empty.steps, empty.seconds, empty.rows) == (0, 0, 0)
    metrics.step(1, 0.5)  # before the window
    before = parse_step_counts(metrics.text().decode())
    for rows, seconds in ((3, 0.25), (12, 0.5), (12, 0.75)):
        metrics.step(rows, seconds)
    grown = parse_step_counts(metrics.text().decode()) - before
    assert (grown.steps, grown.seconds, grown.rows) == (3, 1.5, 27)
    figures = grown.figures(window_s=6.0)
    assert figures["step_tokens_per_s"] == pytest.approx(18.0) and figures["mean_rows"] == pytest.approx(9.0)
    assert figures["max_rows_bucket"] == 16 and figures["decode_share_of_window"] == pytest.approx(0.25)
    metrics.step(100, 0.1)  # above the largest bucket (64)
    assert (parse_step_counts(metrics.text().decode()) - before).figures(6.0)["max_rows_bucket"] is None


def synthetic_report(levels, manifest=None):
    from exporter.bench.serve import ServeBenchConfig, ServeReport

    decoder = rl.DecoderCost(
        layer_params=1_000_000_000, lm_head_params=0, num_layers=2, num_heads=1, head_dim=1, dtype="float32"
    )
    rates = rl.MachineRates(
        read_gb_s=40.0, copy_gb_s=30.0, gemm_gflop_s=200.0, threads=2, buffer_mib=1024, gemm_size=2048
    )
    return ServeReport(
        config=ServeBenchConfig(artifacts=Path("art"), clients=(1, 4, 16), new_tokens=9),
        server={"url": "http://x", "served_model": "m", "backend": "ort-cpu"},
        machine={"cpu": "cpu", "available_cpus": 2, "load_average_start": [0.1]},
        manifest=manifest,
        decoder=decoder,
        rates=rates,
        levels=levels,
        question_tokens=32,
    )


def synthetic_level(clients: int, tokens_each: int, window_s: float):
    """`clients` answers of `tokens_each` tokens; three decode steps of all rows, 0.1 s each."""
    from exporter.bench.serve import Level, RequestRecord, StepCounts

    records = []
    for _ in range(clients):
        record = RequestRecord(0.0, chunks=[0.5, 0.6], end=1.0, completion_tokens=tokens_each)
        record.prompt_tokens, record.finish_reason = 95, "length"
        records.append(record)
    return Level(clients, records, window_s, StepCounts(3, 0.3, 3 * clients, {float(clients): 3}))


def test_batched_roofline_turns_compute_bound_and_ratios_read_against_one_client():
    # 4e9 weight bytes at 40 GB/s: 100 ms a step. 2e9 FLOPs a row at 200 GFLOP/s: 10 ms a row,
    # so one row and four are memory bound, sixteen compute bound (160 ms a step).
    report = synthetic_report(
        [synthetic_level(1, 10, 2.0), synthetic_level(4, 10, 4.0), synthetic_level(16, 10, 8.0)]
    )
    assert report.roofline_step(1).bound_by == "memory"
    assert report.roofline_step(1).ms == pytest.approx(100.0)
    assert report.roofline_tokens_per_s(4) == pytest.approx(40.0, rel=1e-3)
    assert report.roofline_step(16).bound_by == "compute"
    assert report.roofline_tokens_per_s(16) == pytest.approx(100.0, rel=1e-3)  # the GEMM rate's ceiling
    one, four, sixteen = (report.figures(level) for level in report.levels)
    assert (one["tokens_per_s"], four["tokens_per_s"], sixteen["tokens_per_s"]) == (5.0, 10.0, 20.0)
    assert sixteen["times_one_client"] == pytest.approx(4.0)
    assert sixteen["share_of_roofline"] == pytest.approx(20.0 / 100.0, rel=1e-3)
    # three steps of 16 rows in 0.1 s each, against 160 ms each at the roofline (a synthetic run
    # may beat it; a real one cannot)
    assert sixteen["step_tokens_per_s"] == pytest.approx(160.0)
    assert sixteen["step_share_of_roofline"] == pytest.approx(1.6, rel=1e-3)
    assert sixteen["decode_s"] == pytest.approx(0.3) and sixteen["decode_share_of_window"] == pytest.approx(
        0.3 / 8
    )
    rows = level_rows(report.table())
    assert rows[16]["x one client"] == "4.00x" and rows[16]["roofline tok/s"].endswith(" (c)")
    assert float(rows[16]["roofline tok/s"].split()[0]) == pytest.approx(100.0)
    assert rows[1]["roofline tok/s"] == "10.0 (m)" and rows[16]["of roof"] == "20%"
    assert rows[16]["rows"] == "16.0 (<=16)" and rows[16]["RSS +MiB"] == "-"


def test_kv_bytes_per_row_from_the_manifest(tiny_artifacts):
    from runtime import contract

    manifest = contract.read_manifest(tiny_artifacts)
    report = synthetic_report([synthetic_level(1, 9, 1.0), synthetic_level(4, 9, 1.0)], manifest)
    kv = report.kv()
    assert kv["bytes_per_position"] == TINY_KV_BYTES_PER_POSITION and kv["layout"] == "concat"
    assert kv["positions_per_row"] == 95 + 9  # prompt + new tokens
    assert report.figures(report.levels[1])["kv_mib"] == pytest.approx(4 * 104 * 512 / 2**20, rel=1e-3)


def test_question_is_sized_with_the_tokenizer(tiny_artifacts):
    import tokenizers

    from exporter.bench.serve import parse_clients, question

    tokenizer = tokenizers.Tokenizer.from_file(str(tiny_artifacts / "tokenizer.json"))
    for length in (8, 32, 100):
        text, counted = question(length, tokenizer)
        assert counted == len(tokenizer.encode(text, add_special_tokens=False).ids)
        assert length - 2 <= counted <= length, (length, text)
    text, counted = question(1, tokenizer)  # no word is one token here: the shortest alone
    assert len(text.split()) == 1 and counted >= 1
    assert question(5)[1] is None and len(question(5)[0].split()) == 5
    assert parse_clients("16,1,4") == (16, 1, 4)


# ---------------------------------------------------------------------------------------------
# User errors: one `error:` line, exit 2


def test_missing_artifacts_folder(tmp_path):
    assert_error_line(invoke("serve", "--artifacts", tmp_path / "nowhere", *QUICK), "does not exist")


def test_neither_artifacts_nor_url():
    assert_error_line(invoke("serve", *QUICK), "give --artifacts", "--url")


def test_bad_client_counts(tiny_artifacts):
    for bad in ("0", "1,x", ""):
        assert_error_line(invoke("serve", "--artifacts", tiny_artifacts, "--clients", bad), "--clients")


def test_json_into_a_missing_folder(tiny_artifacts, tmp_path):
    assert_error_line(
        invoke("serve", "--artifacts", tiny_artifacts, "--json", tmp_path / "no" / "x.json"),
        "--json",
        "a folder that exists",
    )


def test_url_where_no_server_listens():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        port = sock.getsockname()[1]
        assert_error_line(
            invoke("serve", "--url", f"http://127.0.0.1:{port}", *QUICK), "no llava-serve answers there"
        )
    finally:
        sock.close()


def test_the_bench_options_stay_before_serve_only_for_the_bench(tiny_hf, tiny_artifacts):
    """`llava-bench --model ... --artifacts ...` is the PyTorch bench as before; its options
    before `serve` are a usage error naming them, and without --model it still asks for it."""
    result = invoke("--model", tiny_hf, "serve", "--artifacts", tiny_artifacts)
    assert result.exit_code == 2 and "--model: put the options of `serve` after its name" in result.output
    result = invoke("--artifacts", tiny_artifacts)
    assert result.exit_code == 2 and "Missing option '--model'" in result.output
    result = invoke("--model", tiny_hf)
    assert result.exit_code == 2 and "Missing option '--artifacts'" in result.output
