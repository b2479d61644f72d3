"""Every GPU check this machine allows, and a GPU benchmark, in one run with one report.

    python -m exporter.bench.gpu_check [--report gpu_check_report.md] [--text-layers 2] [--budget-s 290]
    (scripts/gpu_check.sh runs exactly this)

1. Environment: GPU, driver-visible stacks (TensorRT + cuda-python, onnxruntime-gpu's CUDA
   provider, CUDA PyTorch), each with the reason it is unusable when it is.
2. Parity: parity_tests/test_tensorrt.py (marked `gpu`) in a child pytest: TensorRT engines
   and ONNX Runtime CUDA against the float32 PyTorch reference (vision cosine, decoder top-1,
   greedy answers), and float16 ONNX against float16 PyTorch on CUDA. Each group runs where
   its stack is installed and is reported skipped, with the reason, where it is not.
3. Benchmark, on a LLaVA-1.5-7B-shaped float16 model with random weights (exporter.testing.scale: CLIP
   ViT-L/14-336, mlp2x_gelu, hidden 4096, vocab 32064) and --text-layers decoder layers (32 is
   the real depth; the default keeps export + engine build inside the time budget): export
   with --fp16, build engines, then llava-bench's sides (exporter.bench.run) on the GPU:
   PyTorch eager float16 on CUDA (ReferenceSide), TensorRT and ONNX Runtime CUDA (RuntimeSide:
   the runtime's own Pipeline.run), on identical inputs (one 336px image + --prompt-len text
   tokens), a warm-up run and --repeats runs each, medians:
       image encode ms at batch 1, time to first token (encode + splice + prefill), decode
       tokens/s over --new-tokens greedy steps, and decode against the memory roofline:
       bound tok/s = GPU bandwidth / bytes of decoder weights read per token
   GPU bandwidth is measured (a device-to-device copy in PyTorch, bytes read + written) or,
   without CUDA PyTorch, the nominal memory clock x bus width.

The report (Markdown, plus the same as JSON beside it) is written even when a stage fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exporter.bench.report import SideResult

REPO = Path(__file__).resolve().parents[2]  # exporter/bench/gpu_check.py -> the repository
PARITY_FILE = "parity_tests/test_tensorrt.py"
NO_TESTS_COLLECTED = 5  # pytest's exit status when it found nothing to run
TIMED_OUT = -1  # run_parity's exit status when the child pytest ran out of time


# ---------------------------------------------------------------------------------------------
# What this machine has (each None when usable, else the reason it is not)


def cuda_runtime_status() -> str | None:
    from runtime.backends.trt import Cuda  # imports cuda-python only when Cuda() is made
    from runtime.errors import EngineError

    try:
        cuda = Cuda()
        count = cuda.call("cudaGetDeviceCount", cuda.rt.cudaGetDeviceCount())
    except EngineError as err:
        return str(err)
    except Exception as err:  # a driver that is missing or too old surfaces in many ways
        return f"the CUDA runtime is unusable ({err})"
    return None if count else "no CUDA GPU is visible"


def tensorrt_status() -> str | None:
    """Why TensorRT engines cannot be built and run here, or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (pip install 'llava-export[gpu]')"
    except Exception as err:
        return f"tensorrt does not load ({err})"
    return cuda_runtime_status()


def ort_cuda_status() -> str | None:
    """Why ONNX Runtime's CUDA provider is not usable here, or None."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu instead of onnxruntime)"
    try:  # available in the build is not the same as loadable here (CUDA/cuDNN libraries, a GPU)
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = min(model.ir_version, 10)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CUDAExecutionProvider"]
        )
        if "CUDAExecutionProvider" not in session.get_providers():
            return "onnxruntime's CUDAExecutionProvider did not load (CUDA or cuDNN libraries missing, or no GPU)"
    except Exception as err:
        return f"onnxruntime's CUDAExecutionProvider fails ({str(err).splitlines()[0][:160]})"
    return None


def torch_cuda_status() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU (a CPU build, or no driver)"
    return None


def environment() -> dict:
    info: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
    info["stacks"] = {
        "tensorrt": tensorrt_status(),
        "onnxruntime-cuda": ort_cuda_status(),
        "torch-cuda": torch_cuda_status(),
    }
    for module in ("tensorrt", "onnxruntime", "torch", "transformers", "onnx"):
        try:
            info[module] = __import__(module).__version__
        except Exception:
            info[module] = None
    try:
        from importlib import metadata

        info["cuda-python"] = metadata.version("cuda-python")
    except Exception:
        info["cuda-python"] = None
    gpu = gpu_properties()
    if gpu:
        info["gpu"] = gpu
    return info


def gpu_properties() -> dict | None:
    """Name, compute capability, memory and nominal bandwidth of device 0 (torch or cuda-python)."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info = {
                "name": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            }
            nominal = nominal_bandwidth_gb_s()
            if nominal:
                info["nominal_bandwidth_gb_s"] = nominal
            return info
    except Exception:
        pass
    if cuda_runtime_status() is None:
        from runtime.backends.trt import Cuda

        name, major, minor = Cuda().device()
        return {
            "name": name,
            "compute_capability": f"{major}.{minor}",
            "nominal_bandwidth_gb_s": nominal_bandwidth_gb_s(),
        }
    return None


def nominal_bandwidth_gb_s() -> float | None:
    """Memory clock x bus width x 2 (double data rate), from the CUDA runtime's attributes."""
    try:
        from runtime.backends.trt import Cuda

        cuda = Cuda()
        attr = cuda.rt.cudaDeviceAttr
        clock_khz = cuda.call("clock", cuda.rt.cudaDeviceGetAttribute(attr.cudaDevAttrMemoryClockRate, 0))
        width_bits = cuda.call(
            "bus width", cuda.rt.cudaDeviceGetAttribute(attr.cudaDevAttrGlobalMemoryBusWidth, 0)
        )
        return round(2 * clock_khz * 1e3 * width_bits / 8 / 1e9, 1)
    except Exception:
        return None


def measured_bandwidth_gb_s(mib: int = 2048, repeats: int = 10) -> float | None:
    """Device-to-device copy in PyTorch: (bytes read + bytes written) / best time."""
    if torch_cuda_status() is not None:
        return None
    import torch

    count = mib * 2**20 // 2
    source = torch.empty(count, dtype=torch.float16, device="cuda").fill_(1)
    target = torch.empty_like(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    del source, target
    torch.cuda.empty_cache()
    return round(2 * count * 2 / best / 1e9, 1)


# ---------------------------------------------------------------------------------------------
# Parity (a child pytest over parity_tests/test_tensorrt.py)


def run_parity(work: Path, timeout_s: float) -> dict:
    junit = work / "parity.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        PARITY_FILE,
        "-rs",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
    ]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(timeout_s, 30))
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output, code = f"{err.stdout or ''}{err.stderr or ''}\n(timed out after {timeout_s:.0f} s)", TIMED_OUT
    return {
        "command": " ".join(command),
        "exit": code,
        "seconds": round(time.perf_counter() - start, 1),
        "tests": junit_tests(junit) if junit.is_file() else [],
        "output_tail": output.strip().splitlines()[-40:],
    }


def junit_tests(junit: Path) -> list[dict]:
    """Each test case's name, outcome, first line of its message and seconds."""
    outcomes = {"failure": "failed", "error": "error", "skipped": "skipped"}
    tests = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag, name in outcomes.items():
            found = case.find(tag)
            if found is not None:
                text = (found.get("message") or found.text or "").strip()
                outcome, message = name, text.splitlines()[0][:300] if text else ""
                break
        tests.append(
            {
                "test": case.get("name"),
                "outcome": outcome,
                "message": message,
                "seconds": float(case.get("time") or 0),
            }
        )
    return tests


def parity_failure(parity: dict | None) -> str | None:
    """Why the parity stage failed, or None when it passed (or was skipped with --skip-parity).
    Collecting no tests is a failure: the parity suite did not run, so it proved nothing."""
    if parity is None or parity["exit"] == 0:
        return None
    if parity["exit"] == NO_TESTS_COLLECTED:
        return f"no tests were collected from {PARITY_FILE}: the parity suite did not run"
    if parity["exit"] == TIMED_OUT:
        return f"{PARITY_FILE} ran out of time"
    return f"pytest exited with status {parity['exit']}"


# ---------------------------------------------------------------------------------------------
# Benchmark


def prepare_model(work: Path, text_layers: int, prompt_len: int, new_tokens: int, report: dict, progress):
    """Checkpoint -> fp16 artifacts -> engines (each reused when already there). Returns
    (artifacts folder, LlavaSource loaded in float16, engines folder or None)."""
    import torch

    from exporter.source import load_source
    from exporter.testing import scale

    checkpoint = work / f"llava7b-{text_layers}l"
    artifacts = work / f"artifacts-{text_layers}l-fp16"
    timings = report.setdefault("prepare_s", {})
    if not (checkpoint / "config.json").is_file():
        what = f"writing a random LLaVA-1.5-7B-shaped checkpoint ({text_layers} decoder layers)"
        with timed(timings, "checkpoint"), progress.stage(what):
            scale.write_checkpoint(checkpoint, text_layers)
    with timed(timings, "load"), progress.stage("loading it in float16"):
        source = load_source(str(checkpoint), dtype=torch.float16)
    if not has_both_graphs(artifacts):
        with timed(timings, "export_fp16"):
            export_fp16(source, artifacts, progress)
    if tensorrt_status() is not None:
        return artifacts, source, None
    from exporter.engine.build import build_engines

    image_tokens = source.vision.num_image_tokens
    with timed(timings, "engines"):
        folder = build_engines(
            artifacts,
            max_batch=1,
            max_input_len=image_tokens + prompt_len,
            max_seq_len=image_tokens + prompt_len + new_tokens + 1,
            timing_cache=work / "timing.cache",
            progress=progress,
        )
    return artifacts, source, folder


@contextlib.contextmanager
def timed(timings: dict, key: str):
    """Records the block's seconds as timings[key] when it succeeds."""
    start = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - start, 1)


def has_both_graphs(artifacts: Path) -> bool:
    """A previous run's export is reused only when its manifest lists both graphs."""
    from runtime import contract

    try:
        return set(contract.read_manifest(artifacts).graphs) >= {"vision", "decoder"}
    except Exception:  # no folder, no manifest, or one a half-finished run left
        return False


def export_fp16(source, artifacts: Path, progress) -> None:
    """Both graphs in float16, unverified: the parity stage checks the graphs on the tiny
    models, and a PyTorch comparison at 7B width would spend the time budget."""
    from exporter.graphs.decoder import export_decoder
    from exporter.graphs.vision import export_vision

    export_vision(source, artifacts, fp16=True, force=True, verify=False, progress=progress)
    export_decoder(source, artifacts, fp16=True, force=True, verify=False, progress=progress)


def measure_side(side, inputs, new_tokens: int, repeats: int) -> SideResult:
    """A warm-up run (kernels chosen, memory allocated), then `repeats` runs, each the prompt
    with its image and `new_tokens` decode steps: llava-bench's figures for one side."""
    from exporter.bench.memory import SideMemory
    from exporter.bench.report import SideResult

    side.run(inputs, 2)
    runs = [side.run(inputs, new_tokens) for _ in range(repeats)]
    return SideResult(side.name, runs, SideMemory(), inputs.batch, new_tokens, inputs.prompt_tokens)


def run_benchmark(args, work: Path, report: dict, progress) -> None:
    """Prepares the 7B-shaped model, then measures every usable GPU side on the same inputs."""
    from exporter.bench.report import REFERENCE
    from exporter.bench.run import RuntimeSide, make_inputs
    from runtime import contract

    bench = report["benchmark"] = {
        "text_layers": args.text_layers,
        "prompt_text_tokens": args.prompt_len,
        "new_tokens": args.new_tokens,
    }
    artifacts, source, engine_folder = prepare_model(
        work, args.text_layers, args.prompt_len, args.new_tokens, bench, progress
    )
    manifest = contract.read_manifest(artifacts)
    record_sizes(bench, artifacts, manifest, engine_folder)
    inputs = make_inputs(manifest, 1, args.prompt_len, seed=0)
    bench["prompt_tokens"] = inputs.prompt_tokens
    record_decode_roofline(bench, source)
    figures = bench["sides"] = {}
    reference = None
    for side in gpu_sides(artifacts, engine_folder, source):  # the reference first
        with progress.stage(f"benchmarking {side.name}"):
            try:
                result = measure_side(side, inputs, args.new_tokens, args.repeats)
                if side.name == REFERENCE:
                    reference = result
                figures[side.name] = side_figures(result, reference, bench["roofline_decode_tokens_per_s"])
            except Exception as err:
                figures[side.name] = {"error": f"{type(err).__name__}: {err}"}
        if isinstance(side, RuntimeSide):
            side.close()  # its sessions or engines, and the device memory they hold


def side_figures(
    result: SideResult, reference: SideResult | None, roofline_tokens_per_s: float | None
) -> dict:
    """The report's figures for one side: medians, the fraction of the decode roofline, and the
    leading greedy tokens it shares with PyTorch's (the report keeps no tokens)."""
    from exporter.bench.report import greedy_agreement

    medians, tokens_per_s = result.as_dict(), result.decode_tokens_per_s
    figures = {
        "image_encode_ms": medians["image_encode_ms"],
        "time_to_first_token_ms": medians["time_to_first_token_ms"],
        "decode_tokens_per_s": round(tokens_per_s, 1),
        "decode_ms_per_token": medians["decode_ms_per_step"],
        "fraction_of_roofline": (
            round(tokens_per_s / roofline_tokens_per_s, 3) if roofline_tokens_per_s and tokens_per_s else None
        ),
    }
    if reference is not None and reference is not result:
        figures["greedy_tokens_agreeing_with_pytorch"] = greedy_agreement(reference.runs[-1], result.runs[-1])
    return figures


def record_sizes(bench: dict, artifacts: Path, manifest, engine_folder: Path | None) -> None:
    """Plan and ONNX sizes side by side: a plan near its graph's size holds its weights once
    for both optimization profiles."""
    if engine_folder is not None:
        record = json.loads((engine_folder / "engine.json").read_text())
        bench["plan_bytes"] = {g: record["plans"][g]["bytes"] for g in record["plans"]}
        bench["build_seconds"] = record.get("build_seconds")
    bench["onnx_bytes"] = {
        g: sum(p.stat().st_size for p in artifacts.glob(manifest.graphs[g].file + "*"))
        for g in ("vision", "decoder")
    }


def record_decode_roofline(bench: dict, source) -> None:
    """Decode's bound: each token reads every float16 decoder weight once, at the GPU's bandwidth
    (measured where CUDA PyTorch is, else nominal)."""
    from exporter.bench.run import decoder_cost

    cost = decoder_cost(source, "float16")
    bench["decoder_weight_bytes_per_token"] = cost.weight_bytes
    bandwidth, nominal = measured_bandwidth_gb_s(), nominal_bandwidth_gb_s()
    bench["bandwidth_gb_s"] = {"measured_copy": bandwidth, "nominal": nominal}
    used = bandwidth or nominal
    bench["roofline_decode_tokens_per_s"] = round(used * 1e9 / cost.weight_bytes, 1) if used else None


def gpu_sides(artifacts: Path, engine_folder: Path | None, source) -> list:
    """llava-bench's sides on the GPU: PyTorch eager on CUDA, TensorRT where its engines were
    built, ONNX Runtime CUDA, each where usable (the reference first)."""
    from exporter.bench.run import ReferenceSide, RuntimeSide
    from runtime.pipeline import Pipeline

    sides = []
    if torch_cuda_status() is None:
        sides.append(ReferenceSide(source, device="cuda"))
    if engine_folder is not None:
        sides.append(RuntimeSide(Pipeline.load(artifacts, backend="trt")))
    if ort_cuda_status() is None:
        pipe = Pipeline.load(artifacts, backend="ort")
        if pipe.backend.name == "ort-cuda":
            sides.append(RuntimeSide(pipe))
        else:
            pipe.close()
    return sides


# ---------------------------------------------------------------------------------------------
# Report


def markdown(report: dict) -> str:
    lines = [
        "# llava-export GPU check",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {report.get('seconds', '?')} s in all",
        "",
        *environment_lines(report["environment"]),
    ]
    if report.get("parity"):
        lines += parity_lines(report["parity"])
    if report.get("benchmark"):
        lines += benchmark_lines(report["benchmark"])
    for stage, message in report.get("errors", {}).items():
        lines += ["", f"## {stage} failed", "", "```", message.strip(), "```"]
    return "\n".join(lines) + "\n"


def environment_lines(env: dict) -> list[str]:
    gpu = env.get("gpu") or {}
    lines = [
        f"GPU: {gpu.get('name', 'none visible')} (compute {gpu.get('compute_capability', '?')}, {gpu.get('memory_gib', '?')} GiB)",
        f"Versions: tensorrt {env.get('tensorrt')}, cuda-python {env.get('cuda-python')}, onnxruntime {env.get('onnxruntime')}, "
        f"torch {env.get('torch')}, transformers {env.get('transformers')}, python {env.get('python')}",
        "",
        "| stack | usable |",
        "|---|---|",
    ]
    for stack, reason in env["stacks"].items():
        lines.append(f"| {stack} | {'yes' if reason is None else 'no: ' + reason} |")
    return lines


def parity_lines(parity: dict) -> list[str]:
    counts: dict[str, int] = {}
    for test in parity["tests"]:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no tests ran"
    lines = ["", f"## Parity ({summary}; {parity['seconds']} s)", ""]
    failure = parity_failure(parity)
    if failure:
        lines += [f"**Failed: {failure}.**", ""]
    lines += ["| test | outcome | note |", "|---|---|---|"]
    for test in parity["tests"]:
        lines.append(f"| {test['test']} | {test['outcome']} | {test['message'].replace('|', '/')} |")
    if failure:
        lines += ["", "```", *parity["output_tail"], "```"]
    return lines


def benchmark_lines(bench: dict) -> list[str]:
    lines = [
        "",
        f"## Benchmark: LLaVA-1.5-7B-shaped, float16, {bench['text_layers']} of 32 decoder layers",
        "",
        f"Prompt: one 336px image + {bench.get('prompt_text_tokens')} text tokens = {bench.get('prompt_tokens')} positions; "
        f"{bench.get('new_tokens')} greedy decode steps, batch 1.",
    ]
    bw = bench.get("bandwidth_gb_s", {})
    if "decoder_weight_bytes_per_token" in bench:
        lines.append(
            f"Roofline: {bench['decoder_weight_bytes_per_token'] / 1e9:.2f} GB of decoder weights per token / "
            f"{bw.get('measured_copy') or bw.get('nominal')} GB/s ({'measured copy' if bw.get('measured_copy') else 'nominal'}; "
            f"nominal {bw.get('nominal')}) = {bench.get('roofline_decode_tokens_per_s')} tok/s."
        )
    if bench.get("prepare_s"):
        lines.append("Preparation (s): " + ", ".join(f"{k} {v}" for k, v in bench["prepare_s"].items()))
    if bench.get("plan_bytes"):
        sizes = ", ".join(
            f"{g}.plan {bench['plan_bytes'][g] / 2**20:.0f} vs {g}.onnx {bench['onnx_bytes'][g] / 2**20:.0f}"
            for g in bench["plan_bytes"]
        )
        lines.append(f"Sizes (MiB): {sizes}; build s: {bench.get('build_seconds')}")
    lines += [
        "",
        "| side | image encode ms (b=1) | time to first token ms | decode tok/s | of roofline | greedy tokens = PyTorch |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in bench.get("sides", {}).items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:200]} | | | | |")
            continue
        fraction = r.get("fraction_of_roofline")
        lines.append(
            f"| {name} | {r['image_encode_ms']} | {r['time_to_first_token_ms']} | {r['decode_tokens_per_s']} | "
            f"{'' if fraction is None else f'{fraction:.0%}'} | {r.get('greedy_tokens_agreeing_with_pytorch', '-')} |"
        )
    lines += [
        "",
        "Random weights: greedy agreement counts leading tokens equal to PyTorch's (near ties make later ones meaningless).",
    ]
    return lines


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(report))
    path.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m exporter.bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--report", type=Path, default=REPO / "gpu_check_report.md", help="Markdown report (JSON beside it)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "llava-gpu-check",
        help="checkpoints, exports, engines (reused by a second run)",
    )
    parser.add_argument(
        "--text-layers",
        type=int,
        default=2,
        help="decoder layers of the 7B-shaped benchmark model (32 = full depth, minutes more)",
    )
    parser.add_argument("--prompt-len", type=int, default=32, help="text tokens next to the image")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--budget-s", type=float, default=290, help="stop starting new stages after this many seconds"
    )
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    return parser.parse_args(argv)


def benchmark_skip_reason(env: dict, elapsed_s: float, budget_s: float) -> str | None:
    """Why the benchmark cannot start, or None. It needs a GPU stack and, since export and
    engine build take minutes, most of the budget still left."""
    if all(env["stacks"][k] is not None for k in ("tensorrt", "onnxruntime-cuda", "torch-cuda")):
        return "no GPU stack is usable here (see the table above)"
    if elapsed_s > budget_s * 0.6:
        return f"skipped: {elapsed_s:.0f} s of the {budget_s:.0f} s budget already spent"
    return None


def main(argv: list[str] | None = None) -> int:
    """Runs every stage, writes the report after each; 1 when parity failed (or collected no
    tests) or a stage failed, else 0."""
    from exporter.progress import Progress

    args = parse_args(argv)
    start = time.perf_counter()
    progress = Progress()
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"environment": environment(), "errors": {}}
    env = report["environment"]
    progress.say(
        f"gpu check: {(env.get('gpu') or {}).get('name', 'no GPU visible')}; "
        + ", ".join(f"{k}: {'yes' if v is None else 'no'}" for k, v in env["stacks"].items())
    )
    if not args.skip_parity:
        with progress.stage(f"parity tests ({PARITY_FILE})"):
            report["parity"] = run_parity(args.work, timeout_s=args.budget_s * 0.45)
        write_report(report, args.report)
    if not args.skip_bench:
        skip = benchmark_skip_reason(env, time.perf_counter() - start, args.budget_s)
        if skip:
            report["errors"]["benchmark"] = skip
        else:
            try:
                run_benchmark(args, args.work, report, progress)
            except Exception:
                report["errors"]["benchmark"] = traceback.format_exc()[-3000:]
    report["seconds"] = round(time.perf_counter() - start, 1)
    write_report(report, args.report)
    progress.say(f"wrote {args.report} ({report['seconds']} s)")
    failed = parity_failure(report.get("parity")) is not None or bool(report["errors"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
