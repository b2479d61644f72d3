"""The GPU check's plumbing without a GPU (exporter/bench/gpu_check.py): the reason it gives for
each stack it cannot use, its benchmark flow on the fake TensorRT of tests/support/fake_tensorrt.py
(the `fake_gpu` fixture), and the exit status and report its parity stage leads to. Its GPU
figures need a GPU: scripts/gpu_check.sh runs it there."""

from __future__ import annotations

import shutil
import sys
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from exporter.bench import gpu_check
from exporter.progress import Progress
from tests.support.fake_tensorrt import FAKE_FOLDER


@pytest.fixture
def artifacts(workshop, tmp_path):
    """A private copy of the tiny float32 export (engines get written into it)."""
    from exporter.testing.tiny import TinyConfig

    return shutil.copytree(workshop.artifacts(TinyConfig(), "hf"), tmp_path / "artifacts")


def build_engines(artifacts):
    from exporter.cli import main

    result = CliRunner().invoke(main, ["engine", "--artifacts", str(artifacts)])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------
# What this machine has


def test_statuses_name_what_is_missing(monkeypatch):
    import onnxruntime
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    assert gpu_check.tensorrt_status() == "tensorrt is not installed (pip install 'llava-export[gpu]')"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (
        gpu_check.torch_cuda_status()
        == f"torch {torch.__version__} sees no CUDA GPU (a CPU build, or no driver)"
    )
    monkeypatch.setitem(sys.modules, "torch", None)
    assert gpu_check.torch_cuda_status() == "torch is not installed"

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert gpu_check.ort_cuda_status() == (
        f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider "
        "(install onnxruntime-gpu instead of onnxruntime)"
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert gpu_check.ort_cuda_status() == "onnxruntime is not installed"


def test_statuses_on_the_fake_gpu(fake_gpu, monkeypatch):
    assert gpu_check.tensorrt_status() is None and gpu_check.cuda_runtime_status() is None
    success = fake_gpu.cudart.cudaError_t.cudaSuccess
    monkeypatch.setattr(fake_gpu.cudart, "cudaGetDeviceCount", lambda: (success, 0))
    assert gpu_check.tensorrt_status() == "no CUDA GPU is visible"


# ---------------------------------------------------------------------------------------------
# The benchmark


def test_prepare_model_exports_once_and_builds_engines_on_the_fakes(
    fake_gpu, workshop, tmp_path, monkeypatch
):
    """The tiny model stands in for the 7B-shaped checkpoint: written once, exported once in
    float16, engines built on the fake TensorRT each time."""
    from exporter.testing import scale
    from runtime import contract

    tiny = workshop.tiny()["hf"]
    monkeypatch.setattr(scale, "write_checkpoint", lambda out, text_layers: shutil.copytree(tiny, out))
    first: dict = {}
    artifacts, source, folder = gpu_check.prepare_model(tmp_path, 2, 8, 4, first, Progress(quiet=True))
    assert folder == artifacts / "engines" / FAKE_FOLDER and (folder / "engine.json").is_file()
    assert contract.read_manifest(artifacts).graphs["decoder"].dtype == "float16"
    assert set(first["prepare_s"]) == {"checkpoint", "load", "export_fp16", "engines"}
    again: dict = {}
    gpu_check.prepare_model(tmp_path, 2, 8, 4, again, Progress(quiet=True))
    assert set(again["prepare_s"]) == {"load", "engines"}  # the checkpoint and the export reused


def test_benchmark_flow_on_the_fakes(fake_gpu, artifacts, workshop, tmp_path, monkeypatch):
    """run_benchmark with the fake TensorRT and llava-bench's sides: PyTorch asked for on CUDA
    (the CPU stands in for it here), the runtime through its own Pipeline.run; roofline from the
    nominal bandwidth, greedy agreement, and the Markdown report."""
    from exporter.bench import run
    from exporter.source import load_source
    from exporter.testing.tiny import TinyConfig

    build_engines(artifacts)
    source = load_source(str(workshop.tiny(TinyConfig())["hf"]))
    monkeypatch.setattr(
        gpu_check, "prepare_model", lambda *a, **k: (artifacts, source, artifacts / "engines" / FAKE_FOLDER)
    )
    monkeypatch.setattr(gpu_check, "ort_cuda_status", lambda: "no CUDA here")
    monkeypatch.setattr(gpu_check, "torch_cuda_status", lambda: None)
    monkeypatch.setattr(gpu_check, "measured_bandwidth_gb_s", lambda: None)  # no CUDA copy to time here
    devices, reference_side = [], run.ReferenceSide

    def reference_on_the_cpu(source, device):
        devices.append(device)
        return reference_side(source, device="cpu")

    monkeypatch.setattr(run, "ReferenceSide", reference_on_the_cpu)
    pipeline_runs = []
    monkeypatch.setattr(run.Pipeline, "run", recording(run.Pipeline.run, pipeline_runs))
    args = SimpleNamespace(text_layers=2, prompt_len=8, new_tokens=4, repeats=2)
    report = {
        "environment": {"stacks": {"tensorrt": None, "onnxruntime-cuda": "no", "torch-cuda": None}},
        "errors": {},
    }
    gpu_check.run_benchmark(args, tmp_path, report, Progress(quiet=True))
    bench = report["benchmark"]
    assert devices == ["cuda"]
    assert bench["bandwidth_gb_s"] == {"measured_copy": None, "nominal": 4800.0}
    assert bench["decoder_weight_bytes_per_token"] > 0 and bench["roofline_decode_tokens_per_s"] > 0
    assert list(bench["sides"]) == ["pytorch", "trt"]
    for side in bench["sides"].values():
        assert (
            side["image_encode_ms"] > 0
            and side["time_to_first_token_ms"] > 0
            and side["decode_tokens_per_s"] > 0
        )
        assert side["fraction_of_roofline"] is not None and "tokens" not in side
    # a warm-up and two repeats, each the prefill's token + 4 decode steps, EOS ignored
    assert pipeline_runs == [(3, False), (5, False), (5, False)]
    # float32 graphs on the fake TensorRT reproduce the reference's greedy tokens
    assert bench["sides"]["trt"]["greedy_tokens_agreeing_with_pytorch"] == 5
    text = gpu_check.markdown({**report, "seconds": 1.0})
    assert "| trt |" in text and "| pytorch |" in text and "4800.0 GB/s" in text


def recording(pipeline_run, calls: list):
    """Pipeline.run, noting each call's (max_new_tokens, stop_at_eos)."""

    def run(pipe, batch, max_new_tokens, sampling=None, timings=None, stop_at_eos=True):
        calls.append((max_new_tokens, stop_at_eos))
        return pipeline_run(pipe, batch, max_new_tokens, sampling, timings, stop_at_eos)

    return run


def test_the_cuda_reference_waits_for_the_gpu_before_each_clock_reading(workshop, monkeypatch):
    import torch

    from exporter.bench.run import ReferenceSide
    from exporter.source import load_source

    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: waits.append("synchronize"))
    side = ReferenceSide(load_source(str(workshop.tiny()["hf"])))
    side.clock()
    assert waits == []  # on the CPU nothing runs asynchronously
    side.device = "cuda"
    side.clock()
    assert waits == ["synchronize"]


# ---------------------------------------------------------------------------------------------
# Parity and the check's exit status


def test_the_parity_file_is_found_from_the_repository():
    assert (gpu_check.REPO / gpu_check.PARITY_FILE).is_file()
    assert (gpu_check.REPO / "pyproject.toml").is_file()


def test_junit_cases_become_outcomes_with_their_first_message_line(tmp_path):
    junit = tmp_path / "parity.xml"
    junit.write_text(
        "<testsuites><testsuite>"
        '<testcase name="passes" time="0.5"/>'
        '<testcase name="fails" time="1"><failure message="cosine 0.9&#10;more">trace</failure></testcase>'
        '<testcase name="skips"><skipped message="TensorRT parity: no GPU"/></testcase>'
        '<testcase name="errs"><error>  </error></testcase>'
        "</testsuite></testsuites>"
    )
    assert gpu_check.junit_tests(junit) == [
        {"test": "passes", "outcome": "passed", "message": "", "seconds": 0.5},
        {"test": "fails", "outcome": "failed", "message": "cosine 0.9", "seconds": 1.0},
        {"test": "skips", "outcome": "skipped", "message": "TensorRT parity: no GPU", "seconds": 0.0},
        {"test": "errs", "outcome": "error", "message": "", "seconds": 0.0},
    ]


@pytest.mark.parametrize(
    "exit_status, failure",
    [
        (0, None),
        (1, "pytest exited with status 1"),
        (5, "no tests were collected from parity_tests/test_tensorrt.py: the parity suite did not run"),
        (-1, "parity_tests/test_tensorrt.py ran out of time"),
    ],
)
def test_parity_that_did_not_pass_fails_the_check(exit_status, failure, tmp_path, monkeypatch):
    """Exit status 5 (no tests collected) is no success: the parity suite proved nothing."""
    parity = {
        "command": "pytest",
        "exit": exit_status,
        "seconds": 0.1,
        "tests": [],
        "output_tail": ["the child pytest's last lines"],
    }
    monkeypatch.setattr(gpu_check, "run_parity", lambda work, timeout_s: parity)
    monkeypatch.setattr(
        gpu_check,
        "environment",
        lambda: {"stacks": {"tensorrt": "no", "onnxruntime-cuda": "no", "torch-cuda": "no"}},
    )
    report = tmp_path / "report.md"
    status = gpu_check.main(["--report", str(report), "--work", str(tmp_path / "work"), "--skip-bench"])

    text = report.read_text()
    if failure is None:
        assert status == 0 and "Failed" not in text and "last lines" not in text
    else:
        assert status == 1
        assert f"**Failed: {failure}.**" in text and "the child pytest's last lines" in text
    assert gpu_check.parity_failure(parity) == failure
