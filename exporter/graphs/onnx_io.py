"""Writing ONNX graphs safely: trace with the dynamo exporter, save aside, check, then rename.

A reader never sees a half-written graph: everything is written into a staging folder inside
the output folder and moved into place file by file, the .onnx last (its presence means the
graph and its external data are complete).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from runtime.errors import LlavaError

# Graphs whose weights exceed this go to external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def softmax_in_dtype(self, dim: int, dtype: int = -1):
    """aten::softmax.int with its dtype applied to the INPUT, as PyTorch computes it.

    onnxscript's translation runs Softmax in the input dtype and casts the result, so the
    float32 softmax of a float16 model's attention (softmax(x, dtype=float32)) became a float16
    Softmax once the optimizer folded the casts. Cast -> Softmax keeps it in float32.
    """
    from onnxscript import opset18 as op

    if dtype != -1 and dtype is not None:
        self = op.Cast(self, to=dtype)
    return op.Softmax(self, axis=dim)


def trace_to_onnx(module, args, dynamic_shapes, input_names, output_names, opset: int, optimize: bool = True):
    """torch.onnx.export(dynamo=True), with the exporter's chatter kept off the terminal.
    `optimize` False: no constant folding (a module on the meta device has no values to fold)."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            module,
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            optimize=optimize,
            verbose=False,
            custom_translation_table={torch.ops.aten.softmax.int: softmax_in_dtype},
        )


def check_writable(folder: Path) -> None:
    """Creates the output folder and proves it writable, before any long work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".llava-export-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise LlavaError(
            f"cannot write to output folder {folder} ({err.strerror or err}); choose another --out"
        ) from None


@contextlib.contextmanager
def staging(folder: Path, name: str):
    """A scratch folder inside `folder`, removed whatever happens."""
    stage = folder / f".staging-{name}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def save_graph(program, stage: Path, file_name: str, external: bool) -> Path:
    """Saves an ONNXProgram into the staging folder; weights to `<file>.data` when external."""
    path = stage / file_name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program.save(str(path), external_data=external)
    return path


def check_graph(path: Path) -> None:
    """onnx.checker on the file path, so external data is read and 2 GB graphs pass."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise LlavaError(
            f"exported graph {path.name} fails onnx.checker: {str(err).splitlines()[0]}"
        ) from None


def publish(stage: Path, folder: Path, file_name: str) -> None:
    """Moves a staged graph into folder: external data first, the .onnx last."""
    graph = stage / file_name
    companions = [p for p in stage.glob(file_name + "*") if p != graph]
    for companion in companions:
        os.replace(companion, folder / companion.name)
    os.replace(graph, folder / file_name)
    if not companions:
        (folder / (file_name + ".data")).unlink(missing_ok=True)  # left by an earlier export
