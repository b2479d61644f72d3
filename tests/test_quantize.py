"""Weight-only quantization of the decoder (`--quant int8|int4`, exporter/graphs/quantize.py): the graph
holds MatMulNBits for every linear layer and no big float MatMul, runs in ONNX Runtime and in
the runtime, stays close to the float32 graph, computes exactly with the weights it stores, and
the manifest and CLI say so. All on the tiny model (hidden 64: narrower than some blocks)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from exporter import parity  # noqa: E402
from exporter.cli import main  # noqa: E402
from exporter.graphs import onnx_io, quantize  # noqa: E402
from exporter.graphs.decoder import DecoderGraph  # noqa: E402
from exporter.graphs.export import ExportOptions  # noqa: E402
from exporter.source import load_source  # noqa: E402
from exporter.testing.tiny import TinyConfig  # noqa: E402
from runtime import contract  # noqa: E402
from runtime.errors import LlavaError  # noqa: E402
from tests.support.graphs import empty_past  # noqa: E402

DEFAULT = TinyConfig()
LINEAR_LAYERS = DEFAULT.text_layers * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
PRODUCTS = DEFAULT.text_layers * 4 + 1  # q|k|v, o, gate|up, down per layer + lm_head: the siblings merged
# Logits of the quantized graph against the float32 graph, random tiny weights (every layer
# amplifies the rounding: int4 lands near 0.91-0.94 here; trained models fare far better).
MIN_COSINE_VS_FLOAT = {"int8": 0.995, "int4": 0.85}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def cli_export(workshop, tmp_path_factory) -> tuple[Path, str]:
    """`llava-export all --quant int4` of the tiny model, through the CLI: (folder, output)."""
    out = tmp_path_factory.mktemp("int4") / "art"
    result = invoke("all", "--model", workshop.tiny(DEFAULT)["hf"], "--out", out, "--quant", "int4")
    assert result.exit_code == 0, (result.output, result.exception)
    return out, result.output


@pytest.fixture(scope="module")
def cli_int4(cli_export) -> Path:
    return cli_export[0]


@pytest.fixture(scope="module")
def quantized(workshop, tmp_path_factory, cli_int4):
    """{quant: decoder.onnx path}: int4 from the CLI export, int8 by quantize_decoder from the
    workshop's float32 export (no second trace)."""
    out = tmp_path_factory.mktemp("int8") / contract.DECODER_FILE
    quantize.quantize_decoder(workshop.artifacts(DEFAULT) / contract.DECODER_FILE, out, bits=8)
    return {"int4": cli_int4 / contract.DECODER_FILE, "int8": out}


def prefill_feed(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of 2 x 5 random embeddings, no past."""
    generator = np.random.default_rng(seed)
    feed = {
        contract.INPUTS_EMBEDS: generator.standard_normal((2, 5, DEFAULT.text_hidden)).astype(np.float32),
        contract.ATTENTION_MASK: np.ones((2, 5), np.int64),
        contract.POSITION_IDS: np.tile(np.arange(5), (2, 1)),
    }
    feed.update(dict(zip(contract.decoder_input_names(DEFAULT.text_layers)[3:], empty_past(folder, 2))))
    return feed


def run(path: Path, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


# ---------------------------------------------------------------------------------------------
# The graph


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_every_linear_layer_is_matmulnbits(quantized, quant):
    model = onnx.load(str(quantized[quant]))
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == PRODUCTS
    for node in nbits:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "com.microsoft"
        assert (
            attrs["bits"] == quantize.QUANT_BITS[quant]
            and attrs["accuracy_level"] == quantize.DEFAULT_ACCURACY_LEVEL
        )
        # int8's default block (128) is wider than the tiny model's K = 64: narrowed to 64
        assert attrs["block_size"] == min(quantize.DEFAULT_BLOCK_SIZE[attrs["bits"]], 64)
    float_types = (TensorProto.FLOAT, TensorProto.FLOAT16)
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm"):  # attention's activation products only
            assert not any(name in weights for name in node.input), (
                node.op_type,
                node.name,
                list(node.input),
            )
    scales = {node.input[2] for node in nbits}
    big_floats = [
        t.name
        for t in graph.initializer
        if t.data_type in float_types and np.prod(t.dims) >= 16 * 16 and t.name not in scales
    ]
    assert big_floats == []
    assert any(o.domain == "com.microsoft" for o in model.opset_import)


def test_siblings_share_one_matmulnbits_with_the_same_numbers(workshop, quantized, tmp_path):
    """q, k, v and gate, up: one MatMulNBits over their columns each, split after, computing bit
    for bit what the separate ones do (the quantizer's output before the merge)."""
    float_decoder = workshop.artifacts(DEFAULT) / contract.DECODER_FILE
    model, _, excluded = quantize.read_float_decoder(float_decoder)
    bits, block_size = quantize.graph_settings(quantized["int8"])
    separate = tmp_path / contract.DECODER_FILE
    unmerged = quantize.run_quantizer(model, bits, block_size, quantize.DEFAULT_ACCURACY_LEVEL, excluded)
    quantize.write_quantized(unmerged, separate)
    merged = onnx.load(str(quantized["int8"]), load_external_data=False)
    widths = [
        helper.get_attribute_value(attribute)
        for node in merged.graph.node
        if node.op_type == "MatMulNBits"
        for attribute in node.attribute
        if attribute.name == "N"
    ]
    hidden, kv = DEFAULT.text_hidden, DEFAULT.text_hidden // DEFAULT.heads * DEFAULT.kv_heads
    mlp = 2 * hidden  # the tiny model's intermediate size
    assert widths.count(hidden + 2 * kv) == widths.count(2 * mlp) == DEFAULT.text_layers  # q|k|v, gate|up
    assert sum(node.op_type == "Split" for node in merged.graph.node) >= 2 * DEFAULT.text_layers
    feed = prefill_feed(workshop.artifacts(DEFAULT))
    for ours, theirs in zip(run(quantized["int8"], feed), run(separate, feed)):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_logits_close_to_the_float32_graph(workshop, quantized, quant):
    folder = workshop.artifacts(DEFAULT)
    feed = prefill_feed(folder)
    expected = run(folder / contract.DECODER_FILE, feed)
    actual = run(quantized[quant], feed)
    assert [a.shape for a in actual] == [e.shape for e in expected]
    cosine = parity.cosine_rows(actual[0], expected[0]).min()
    assert cosine >= MIN_COSINE_VS_FLOAT[quant], cosine


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_graph_computes_with_the_weights_it_stores(workshop, quantized, quant):
    """Against a reference carrying the dequantized weights, only MatMulNBits' int8 activations
    differ: the export-time gate (QUANT_MIN_COSINE) holds with a wide margin."""
    source = load_source(str(workshop.tiny(DEFAULT)["hf"]))
    results = DecoderGraph(source, ExportOptions(quant=quant)).parity(quantized[quant])
    gated = [r for r in results if r.gated]
    assert all(r.ok for r in results) and len(gated) == 3 + 2 * DEFAULT.text_layers
    assert min(r.min_cosine for r in gated) >= 0.998
    reported = [r for r in results if not r.gated]  # the same logits against the float weights
    assert len(reported) == 3 and all(r.top1 is not None for r in reported)
    assert min(r.min_cosine for r in reported) >= MIN_COSINE_VS_FLOAT[quant]


def test_reference_weights_are_put_back(workshop):
    source = load_source(str(workshop.tiny(DEFAULT)["hf"]))
    lm_head = source.model.lm_head
    original, values = lm_head.weight, lm_head.weight.detach().clone()
    with quantize.quantized_linears(source.model, lambda kn: quantize.fake_quantized(kn, 4, 32)):
        assert lm_head.weight is not original and not torch.equal(lm_head.weight, values)
    assert lm_head.weight is original and torch.equal(original, values)


def test_float16_decoder_quantizes(workshop, tmp_path):
    """MatMulNBits takes float16 activations on the CPU too: --fp16 --quant works."""
    folder = workshop.artifacts(DEFAULT, fp16=True)
    out = tmp_path / contract.DECODER_FILE
    quantize.quantize_decoder(folder / contract.DECODER_FILE, out, bits=4)
    source = load_source(str(workshop.tiny(DEFAULT)["hf"]), dtype=torch.float16)
    results = DecoderGraph(source, ExportOptions(fp16=True, quant="int4")).parity(out)
    assert all(r.ok for r in results), [r.line() for r in results]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows, block", [(64, 32), (100, 32), (64, 128), (352, 128)])
def test_dequantized_weights_are_what_matmulnbits_computes_with(bits, rows, block):
    """K not a multiple of the block, or narrower than it: zero-padded, and still exact."""
    columns = 48
    weight = np.random.default_rng(bits + rows).standard_normal((rows, columns)).astype(np.float32)
    packed, scales, zero_points = quantize.quantize_blocks(weight, bits, block)
    node = helper.make_node(
        "MatMulNBits",
        ["x", "b", "s", "z"],
        ["y"],
        domain="com.microsoft",
        K=rows,
        N=columns,
        bits=bits,
        block_size=block,
        accuracy_level=1,
    )
    tensors = [numpy_helper.from_array(a, n) for a, n in ((packed, "b"), (scales, "s"), (zero_points, "z"))]
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, columns])],
        tensors,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    x = np.random.default_rng(0).standard_normal((3, rows)).astype(np.float32)
    actual = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    dequantized = quantize.dequantize_blocks(packed, scales, zero_points, bits, rows)
    np.testing.assert_allclose(actual, x @ dequantized, rtol=1e-5, atol=1e-4)
    step = (weight.max() - weight.min()) / (2**bits - 1)
    assert np.abs(dequantized - weight).max() <= step  # each weight within a rounding step


# ---------------------------------------------------------------------------------------------
# Writing


def test_big_graph_goes_to_external_data(workshop, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 0)
    folder = workshop.artifacts(DEFAULT)
    out = tmp_path / contract.DECODER_FILE
    quantize.quantize_decoder(folder / contract.DECODER_FILE, out, bits=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        contract.DECODER_FILE,
        contract.DECODER_FILE + ".data",
    ]
    inline = onnx.load(str(out), load_external_data=False).graph.initializer
    assert not [t.name for t in inline if t.data_location != TensorProto.EXTERNAL and len(t.raw_data) > 1024]
    feed = prefill_feed(folder)
    cosine = parity.cosine_rows(run(out, feed)[0], run(folder / contract.DECODER_FILE, feed)[0]).min()
    assert cosine >= MIN_COSINE_VS_FLOAT["int4"]


def test_requantizing_in_place_is_refused_and_failure_leaves_nothing(workshop, tmp_path, monkeypatch):
    float_graph = workshop.artifacts(DEFAULT) / contract.DECODER_FILE
    out = tmp_path / contract.DECODER_FILE
    quantize.quantize_decoder(float_graph, out, bits=8)
    with pytest.raises(LlavaError, match="already quantized"):
        quantize.quantize_decoder(out, tmp_path / "again.onnx", bits=4)

    def broken(path):
        raise LlavaError("checker says no")

    monkeypatch.setattr(onnx_io, "check_graph", broken)
    with pytest.raises(LlavaError, match="checker says no"):
        quantize.quantize_decoder(float_graph, tmp_path / "other" / contract.DECODER_FILE, bits=4)
    assert list((tmp_path / "other").iterdir()) == []  # no graph, no staging folder


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"bits": 3}, "4 or 8 bits"),
        ({"bits": 4, "block_size": 48}, "power of two"),
        ({"bits": 4, "block_size": 8}, "power of two"),
        ({"bits": 4, "accuracy_level": 7}, "accuracy_level"),
    ],
)
def test_bad_settings_are_user_errors(workshop, tmp_path, settings, message):
    with pytest.raises(LlavaError, match=message):
        quantize.quantize_decoder(
            workshop.artifacts(DEFAULT) / contract.DECODER_FILE, tmp_path / "q.onnx", **settings
        )
    assert not (tmp_path / "q.onnx").exists()


def test_explicit_block_wider_than_k_is_padded(workshop, tmp_path):
    folder = workshop.artifacts(DEFAULT)
    stats = quantize.quantize_decoder(
        folder / contract.DECODER_FILE, tmp_path / "q.onnx", bits=4, block_size=256
    )
    assert stats.block_size == 256 and stats.layers == LINEAR_LAYERS
    feed = prefill_feed(folder)
    cosine = parity.cosine_rows(
        run(tmp_path / "q.onnx", feed)[0], run(folder / contract.DECODER_FILE, feed)[0]
    ).min()
    assert cosine >= 0.5  # one scale per column at 4 bits: coarse, but the same function


# ---------------------------------------------------------------------------------------------
# Manifest, CLI, runtime


def test_manifest_records_quant(workshop, cli_int4, tmp_path):
    manifest = contract.read_manifest(cli_int4)
    assert manifest.graphs["decoder"].quant == "int4" and manifest.graphs["decoder"].dtype == "float32"
    assert manifest.graphs["vision"].quant is None  # the vision graph stays float
    assert (
        manifest.graphs["decoder"].sha256
        == hashlib.sha256((cli_int4 / contract.DECODER_FILE).read_bytes()).hexdigest()
    )
    # the CLI streams a --quant decoder (graphs/streamed.py): no float model, no decoder parity;
    # the Python API's export of a loaded model checks it and records the figures
    assert not manifest.parity.get("decoder") and manifest.parity["vision"]
    from exporter.graphs.decoder import export_decoder
    from exporter.progress import Progress

    verified = tmp_path / "verified"
    export_decoder(
        load_source(str(workshop.tiny(DEFAULT)["hf"])), verified, quant="int4", progress=Progress(quiet=True)
    )
    figures = contract.read_manifest(verified).parity["decoder"]
    assert figures["min_cosine"] >= parity.QUANT_MIN_COSINE["int4"]
    assert (
        0 <= figures["unquantized_top1_agreement"] <= 1
        and figures["unquantized_min_cosine"] < figures["min_cosine"]
    )
    assert sorted(p.name for p in cli_int4.iterdir() if p.name.startswith(".staging")) == []


def test_float_manifest_has_no_quant_key_and_old_manifests_read(workshop, tmp_path):
    """An optional field: float manifests are written as before, and read back with quant None."""
    folder = workshop.artifacts(DEFAULT)
    data = json.loads((folder / contract.MANIFEST_FILE).read_text())
    assert all("quant" not in graph for graph in data["graphs"].values())
    assert contract.read_manifest(folder).graphs["decoder"].quant is None


def test_verify_reads_quant_from_the_manifest(workshop, cli_int4):
    result = invoke("verify", "--model", workshop.tiny(DEFAULT)["hf"], "--artifacts", cli_int4)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "int4 weights" in result.output and "quantization effect" in result.output


def test_runtime_generates_from_quantized_artifacts(cli_int4):
    from runtime.pipeline import Pipeline

    pipe = Pipeline.load(cli_int4)
    answer = pipe.generate("What is in the picture?", max_new_tokens=4)
    assert (
        isinstance(answer.text, str)
        and answer.text == pipe.generate("What is in the picture?", max_new_tokens=4).text
    )


def test_cli_reports_the_quantization(workshop, cli_export):
    folder, output = cli_export
    assert f"{LINEAR_LAYERS} linear layers to int4 (blocks of 32, accuracy level 4)" in output
    assert "parity: not run" in output and "llava-export verify" in output  # streamed
    checked = invoke("verify", "--model", workshop.tiny(DEFAULT)["hf"], "--artifacts", folder)
    assert checked.exit_code == 0, checked.output
    assert "parity decoder vs PyTorch" in checked.output and "quantization effect" in checked.output


@pytest.mark.parametrize("command", ["decoder", "all"])
def test_bad_quant_value_is_a_click_error(workshop, tmp_path, command):
    result = invoke(
        command, "--model", workshop.tiny(DEFAULT)["hf"], "--out", tmp_path / "out", "--quant", "int3"
    )
    assert result.exit_code == 2 and "Invalid value for '--quant'" in result.output
    assert "int8" in result.output and "int4" in result.output
    assert not (tmp_path / "out").exists()


def test_export_decoder_refuses_an_unknown_quant_before_any_work(workshop, tmp_path):
    from exporter.graphs.decoder import export_decoder

    source = load_source(str(workshop.tiny(DEFAULT)["hf"]))
    with pytest.raises(LlavaError, match="--quant"):
        export_decoder(source, tmp_path / "out", quant="int2")
    assert not (tmp_path / "out").exists()


def test_bench_counts_the_quantized_weight_bytes(workshop, cli_int4, tmp_path):
    """llava-bench's roofline reads int4 bytes (value + block scale and zero point), not float32's."""
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    quick = [
        "--prompt-len",
        "8",
        "--new-tokens",
        "2",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--bandwidth-mib",
        "8",
        "--gemm-size",
        "128",
        "--threads",
        "1",
    ]
    bench = Path(sys.executable).with_name("llava-bench")
    result = subprocess.run(
        [
            str(bench),
            "--model",
            str(workshop.tiny(DEFAULT)["hf"]),
            "--artifacts",
            str(cli_int4),
            *quick,
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "(ort-cpu, float32, int4 weights)" in result.stdout
    report = json.loads(out.read_text())
    assert report["model"]["decoder_quant"] == "int4" and report["model"]["reference_dtype"] == "float32"
    params = report["model"]["decoder_params"]
    assert report["model"]["decoder_weight_bytes"] == round(
        params * quantize.bytes_per_weight(4, 32)
    )  # 0.64 B, not 4


def test_block_size_sets_the_blocks_of_the_streamed_export(workshop, tmp_path):
    """--block-size: the graph's MatMulNBits blocks, what the export reports."""
    out = tmp_path / "art"
    result = invoke(
        "decoder",
        "--model",
        workshop.tiny(DEFAULT)["hf"],
        "--out",
        out,
        "--quant",
        "int4",
        "--block-size",
        "16",
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "to int4 (blocks of 16, accuracy level 4)" in result.output
    assert quantize.graph_settings(out / contract.DECODER_FILE) == (4, 16)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quant", "int8", "--block-size", "48"], "--block-size must be a power of two >= 16, not 48"),
        (["--block-size", "64"], "give --quant int8|int4 with it"),
    ],
)
def test_a_bad_block_size_is_one_line_before_any_work(workshop, tmp_path, flags, message):
    from tests.support.cli import assert_error_line

    result = invoke("decoder", "--model", workshop.tiny(DEFAULT)["hf"], "--out", tmp_path / "out", *flags)
    assert_error_line(result, message)
    assert not (tmp_path / "out" / contract.DECODER_FILE).exists()
