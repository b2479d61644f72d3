"""`llava-export` end to end (click's CliRunner on exporter.cli.main, plus one real process):
user errors, refusing to clobber another model, never leaving half-written artifacts, and
the manifest it writes."""

from __future__ import annotations

import builtins
import collections
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("torch")
pytest.importorskip("transformers")

from exporter import parity  # noqa: E402
from exporter.graphs import onnx_io  # noqa: E402
from exporter.graphs.decoder import export_decoder  # noqa: E402
from exporter.graphs.vision import export_vision  # noqa: E402
from exporter.parity import OutputParity, ParityError  # noqa: E402
from exporter.progress import Progress  # noqa: E402
from exporter.source import load_source  # noqa: E402
from exporter.testing.tiny import TinyConfig  # noqa: E402
from runtime import contract  # noqa: E402
from runtime.errors import ArtifactError  # noqa: E402
from tests.support.cli import assert_user_error, invoke  # noqa: E402
from tests.support.graphs import pixels, run_vision  # noqa: E402

DEFAULT = TinyConfig()
GRAPH_FILES = (contract.VISION_FILE, contract.DECODER_FILE)


def copy_with_config(folder: Path, target: Path, **changes) -> Path:
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def leftovers(folder: Path) -> list[str]:
    """Graph files or staging folders an export left behind."""
    names = [p.name for p in folder.iterdir()] if folder.exists() else []
    return sorted(n for n in names if n.startswith(".staging-") or n.startswith(GRAPH_FILES))


def graph_initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


# ---------------------------------------------------------------------------------------------
# User errors: exit 2, one line, no traceback


@pytest.mark.parametrize("command", ["vision", "decoder", "all"])
def test_missing_model(tmp_path, command):
    result = invoke(command, "--model", tmp_path / "no" / "such-model", "--out", tmp_path / "out", "--quiet")
    assert_user_error(result, "does not exist", "--model")


def test_plain_llama_is_not_llava(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=320).save_pretrained(
        tmp_path / "llama"
    )
    assert_user_error(
        invoke("all", "--model", tmp_path / "llama", "--out", tmp_path / "out", "--quiet"),
        "not a LLaVA model",
    )


def test_unloadable_tower_names_the_flag(workshop, tmp_path):
    model = copy_with_config(
        workshop.tiny(DEFAULT)["original"],
        tmp_path / "model",
        mm_vision_tower=str(tmp_path / "gone" / "clip"),
    )
    assert_user_error(
        invoke("vision", "--model", model, "--out", tmp_path / "out", "--quiet"), "--vision-tower"
    )
    assert_user_error(
        invoke(
            "vision",
            "--model",
            model,
            "--vision-tower",
            tmp_path / "nope",
            "--out",
            tmp_path / "out",
            "--quiet",
        ),
        "--vision-tower",
    )
    assert leftovers(tmp_path / "out") == []


def test_unknown_projector(workshop, tmp_path):
    model = copy_with_config(
        workshop.tiny(DEFAULT)["original"], tmp_path / "model", mm_projector_type="resampler"
    )
    assert_user_error(
        invoke("vision", "--model", model, "--out", tmp_path / "out", "--quiet"),
        "mm_projector_type",
        "resampler",
    )


def test_unwritable_out(workshop, tmp_path):
    (tmp_path / "file").write_text("a regular file")  # root ignores chmod; nothing can go under a file
    result = invoke(
        "decoder", "--model", workshop.tiny(DEFAULT)["hf"], "--out", tmp_path / "file" / "out", "--quiet"
    )
    assert_user_error(result, "cannot write to output folder", "--out")


def test_errors_print_progress_and_one_error_line(tmp_path):
    """Without --quiet the stages still end in a single `error:` line and no traceback."""
    result = invoke("vision", "--model", tmp_path / "missing", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        result.stderr.strip().splitlines()[-1]
    ]
    assert "Traceback" not in result.output


def test_console_script_exit_code_and_no_traceback(tmp_path):
    """The installed `llava-export` entry point, in its own process."""
    script = Path(sys.executable).with_name("llava-export")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    process = subprocess.run(
        [
            str(script),
            "vision",
            "--model",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2, process.stderr
    assert process.stdout == ""
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in process.stderr


# ---------------------------------------------------------------------------------------------
# Another model's folder; --vision-tower


def test_refuses_another_models_folder_unless_force(workshop, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(workshop.artifacts(DEFAULT), out)
    manifest = json.loads((out / contract.MANIFEST_FILE).read_text())
    manifest["source"].update(path="/models/someone-else", weights_sha256="0" * 64)  # another model's
    (out / contract.MANIFEST_FILE).write_text(json.dumps(manifest))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    model = workshop.tiny(DEFAULT)["hf"]

    assert_user_error(invoke("vision", "--model", model, "--out", out, "--quiet"), "another model", "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # untouched

    result = invoke("vision", "--model", model, "--out", out, "--quiet", "--force")
    assert result.exit_code == 0, result.output
    assert (
        not (out / contract.DECODER_FILE).exists() and not (out / contract.EMBEDDINGS_FILE).exists()
    )  # the other model's
    written = contract.read_manifest(out)
    assert written.source["weights_sha256"] == load_source(str(model)).weights_sha256
    assert list(written.graphs) == ["vision"]


def test_all_reads_each_weight_file_once(workshop, tmp_path, monkeypatch):
    """`llava-export all` exports two graphs into one manifest, whose model identity is the
    weights' sha256: each weight file, the tower's too, is read once for both (a 7B checkpoint
    is 14 GB per read). Loading reads them outside Python's open (safetensors)."""
    folders = workshop.tiny(DEFAULT)
    weights = {
        os.path.realpath(p) for name in ("original", "clip") for p in folders[name].glob("*.safetensors")
    }
    reads = collections.Counter()
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) in weights:
            reads[os.path.realpath(file)] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)  # pathlib's
    result = invoke("all", "--model", folders["original"], "--out", tmp_path / "out", "--quiet")
    monkeypatch.undo()
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(weights) == 2 and reads == {file: 1 for file in weights}


def test_vision_tower_flag_overrides(workshop, tmp_path):
    """An original checkpoint whose mm_vision_tower is unreachable exports with --vision-tower,
    to the same graph as the original checkpoint with its tower in place."""
    folders = workshop.tiny(DEFAULT)
    model = copy_with_config(
        folders["original"], tmp_path / "model", mm_vision_tower="openai/clip-unreachable"
    )
    out = tmp_path / "out"
    result = invoke("vision", "--model", model, "--vision-tower", folders["clip"], "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    expected = graph_initializers(workshop.artifacts(DEFAULT, "original") / contract.VISION_FILE)
    actual = graph_initializers(out / contract.VISION_FILE)
    assert sorted(actual) == sorted(expected) and all(
        np.array_equal(actual[k], expected[k]) for k in expected
    )
    assert contract.read_manifest(out).source["format"] == "original"


# ---------------------------------------------------------------------------------------------
# Failed and interrupted exports leave nothing half-written


def failing_compare(name, actual, expected, atol=None, min_cosine=None):
    return OutputParity(name, 1.0, 0.5, False)


@pytest.mark.parametrize("graph", ["vision", "decoder"])
def test_failed_parity_leaves_nothing(workshop, tmp_path, monkeypatch, graph):
    source = load_source(str(workshop.tiny(DEFAULT)["hf"]))
    monkeypatch.setattr(parity, "compare", failing_compare)
    export = export_vision if graph == "vision" else export_decoder
    with pytest.raises(ParityError) as failure:
        export(source, tmp_path / "out", progress=Progress(quiet=True))
    assert "nothing was written" in str(failure.value)
    assert leftovers(tmp_path / "out") == []
    assert not (tmp_path / "out" / contract.MANIFEST_FILE).exists()
    assert not (tmp_path / "out" / contract.EMBEDDINGS_FILE).exists()


def test_failed_parity_through_the_cli_is_a_report_not_a_traceback(workshop, tmp_path, monkeypatch):
    monkeypatch.setattr(parity, "compare", failing_compare)
    result = invoke("vision", "--model", workshop.tiny(DEFAULT)["hf"], "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.startswith("error: parity failed") and "image_embeds" in result.stderr
    assert "Traceback" not in result.output
    assert leftovers(tmp_path / "out") == []


def test_same_weights_read_differently_is_another_model(workshop, tmp_path):
    """A config edit (another select layer) on the same weights must not merge into the folder."""
    folders = workshop.tiny(DEFAULT)
    out = tmp_path / "out"
    assert invoke("vision", "--model", folders["original"], "--out", out, "--quiet").exit_code == 0
    edited = copy_with_config(folders["original"], tmp_path / "edited", mm_vision_select_layer=-1)
    assert_user_error(
        invoke("vision", "--model", edited, "--out", out, "--quiet"), "another model", "--force"
    )


@pytest.mark.parametrize("command", ["vision", "decoder"])
def test_interrupted_export_leaves_nothing(workshop, tmp_path, monkeypatch, command):
    def interrupt(path):
        assert Path(path).is_file() and Path(path).parent.name.startswith(".staging-")  # mid-export
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_io, "check_graph", interrupt)
    result = invoke(command, "--model", workshop.tiny(DEFAULT)["hf"], "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 130, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert leftovers(tmp_path / "out") == []
    assert not (tmp_path / "out" / contract.MANIFEST_FILE).exists()


# ---------------------------------------------------------------------------------------------
# The manifest


def test_manifest_records_the_export(workshop):
    folder = workshop.artifacts(DEFAULT)
    manifest = contract.read_manifest(folder)
    source = load_source(str(workshop.tiny(DEFAULT)["hf"]))
    assert manifest.format_version == contract.FORMAT_VERSION
    assert manifest.source["format"] == "hf" and manifest.source["weights_sha256"] == source.weights_sha256
    assert manifest.vision == source.vision and manifest.text == source.text
    assert manifest.vision.num_image_tokens == (DEFAULT.image_size // DEFAULT.patch_size) ** 2
    assert (
        manifest.text.hidden_size,
        manifest.text.num_layers,
        manifest.text.num_kv_heads,
        manifest.text.vocab_size,
    ) == (64, 2, 2, 320)
    assert manifest.embeddings == {"file": contract.EMBEDDINGS_FILE, "dtype": "float32", "shape": [320, 64]}
    assert manifest.tokens.bos == 1 and 2 in manifest.tokens.eos
    for graph in ("vision", "decoder"):  # the parity figures measured at export time
        figures = manifest.parity[graph]
        assert 0 <= figures["max_abs_err"] <= 1e-4 and figures["min_cosine"] >= parity.MIN_COSINE["float32"]


@pytest.mark.parametrize("graph", ["vision", "decoder"])
def test_manifest_io_spec_matches_the_graph(workshop, graph):
    folder = workshop.artifacts(DEFAULT)
    spec = contract.read_manifest(folder).graphs[graph]
    model = onnx.load(str(folder / spec.file))
    assert spec.dtype == "float32" and spec.opset == 18
    assert spec.sha256 == hashlib.sha256((folder / spec.file).read_bytes()).hexdigest()

    def dims(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    for declared, actual in (
        (spec.inputs, dims(model.graph.input)),
        (spec.outputs, dims(model.graph.output)),
    ):
        assert list(declared) == list(actual)  # names, in graph order
        for name, shape in declared.items():
            assert len(shape) == len(actual[name]), name
            for want, got in zip(shape, actual[name]):
                assert want == got if isinstance(want, int) else isinstance(got, str), (
                    name,
                    shape,
                    actual[name],
                )
    if graph == "vision":
        assert spec.outputs[contract.IMAGE_EMBEDS][1:] == [16, 64]
        pix = pixels(DEFAULT, 2).numpy()
        assert run_vision(folder, pix).shape == (2, 16, 64)
    else:
        assert list(spec.inputs) == contract.decoder_input_names(2) and list(
            spec.outputs
        ) == contract.decoder_output_names(2)


def test_read_manifest_refuses_an_unknown_format_version(workshop, tmp_path):
    data = json.loads((workshop.artifacts(DEFAULT) / contract.MANIFEST_FILE).read_text())
    data["format_version"] = max(contract.READABLE_VERSIONS) + 1
    (tmp_path / contract.MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=f"format version {max(contract.READABLE_VERSIONS) + 1}"):
        contract.read_manifest(tmp_path)
