"""`--quant w8a8` (exporter/graphs/integer_matmul.py): int8 weights per output column, int8
activations per token, both stored around 128 in uint8, MatMulInteger. The kernel it relies on is exact; the rewritten graph
computes exactly the integer form (numpy, by hand); a whole decoder exported with it is every
linear layer on MatMulInteger, passes its parity check, answers in the runtime, and the CLI,
manifest, benchmark and TensorRT refusal say what it is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")
ir = pytest.importorskip("onnx_ir")

from exporter.graphs import integer_matmul  # noqa: E402
from exporter.graphs.integer_matmul import (  # noqa: E402
    ZERO_POINT,
    IntegerLinears,
    quantize_columns,
    quantize_rows,
)
from runtime import contract  # noqa: E402
from tests.support.cli import assert_error_line, invoke  # noqa: E402

K, N = 96, 40


def run_matmul_integer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MatMulInteger(a, b, 128, 128) of two uint8 matrices, as the graph runs it."""
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "zero", "zero"], ["y"])],
        "product",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, list(a.shape)),
            helper.make_tensor_value_info("b", TensorProto.UINT8, list(b.shape)),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        [numpy_helper.from_array(np.array(ZERO_POINT, np.uint8), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"a": a, "b": b})[0]


def test_the_integer_product_is_exact_at_the_extremes():
    """The design's premise: ONNX Runtime's uint8 x uint8 kernel with zero points of 128 does
    not saturate where every product is +-127 x +-127 (its uint8 x int8 kernel does, on AVX2
    without VNNI), nor where the values are random."""
    generator = np.random.default_rng(0)
    a = np.full((4, 512), 255, np.uint8)
    a[1], a[2] = 1, generator.integers(1, 256, 512)
    b = np.where(generator.random((512, 64)) < 0.5, 1, 255).astype(np.uint8)
    b[:, 0], b[:, 1] = 255, 1
    exact = (a.astype(np.int64) - ZERO_POINT) @ (b.astype(np.int64) - ZERO_POINT)
    np.testing.assert_array_equal(run_matmul_integer(a, b), exact)


def test_columns_round_to_their_own_scale():
    generator = np.random.default_rng(1)
    weight = generator.standard_normal((K, N)).astype(np.float32)
    weight[:, 3] *= 50  # a column of its own magnitude
    weight[:, 7] = 0
    quant = quantize_columns(weight.T.copy().T)  # a transposed view, as the streamed export passes
    assert quant.values.dtype == np.uint8 and quant.values.shape == (K, N)
    signed = quant.values.astype(np.int32) - ZERO_POINT
    assert signed.min() >= -127 and signed.max() <= 127
    assert (np.abs(signed).max(axis=0)[np.arange(N) != 7] == 127).all()  # each column's peak is 127
    assert quant.scales[7] == 1 and (signed[:, 7] == 0).all()
    error = np.abs(integer_matmul.dequantize_columns(quant) - weight)
    assert (error <= quant.scales / 2 + 1e-6).all()


def test_columns_are_quantized_the_same_in_chunks(monkeypatch):
    weight = np.random.default_rng(4).standard_normal((K, N)).astype(np.float32)
    whole = quantize_columns(weight)
    monkeypatch.setattr(integer_matmul, "COLUMNS_AT_ONCE", 7)  # 40 columns: 6 chunks, the last short
    chunked = quantize_columns(weight)
    np.testing.assert_array_equal(chunked.values, whole.values)
    np.testing.assert_array_equal(chunked.scales, whole.scales)


def test_rows_round_to_their_own_peak_and_zero_is_exact():
    x = np.array([[-1.0, 0.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]], np.float32)
    qx, scale = quantize_rows(x)
    assert qx.dtype == np.uint8
    assert qx[0, 3] == ZERO_POINT + 127 and qx[0, 1] == ZERO_POINT  # the peak, and zero
    assert qx[2, 3] == ZERO_POINT + 127 and qx[2, 0] == ZERO_POINT + 32  # its own scale: 4 / 127
    assert (qx[1] == ZERO_POINT).all() and scale[1] > 0  # an all-zero row: nothing to divide by
    dequantized = (qx.astype(np.float32) - ZERO_POINT) * scale
    assert np.abs(dequantized - x).max() <= scale.max() / 2 + 1e-6


def two_linears_on_one_input() -> ir.Model:
    """x [2, 3, K] -> MatMul(x, W1) + MatMul(x, W2), the weights initializers [K, N]."""
    generator = np.random.default_rng(2)
    weights = {f"w{i}": (generator.standard_normal((K, N)) * 0.1).astype(np.float32) for i in (1, 2)}
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"], name="first"),
            helper.make_node("MatMul", ["x", "w2"], ["b"], name="second"),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, N])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])), weights


def integer_reference(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The integer form in numpy: exact integer product, then the two scales."""
    qx, scale = quantize_rows(x)
    quant = quantize_columns(weight)
    acc = (qx.astype(np.int64) - ZERO_POINT) @ (quant.values.astype(np.int64) - ZERO_POINT)
    return acc.astype(np.float32) * scale * quant.scales


def test_the_rewritten_graph_is_the_integer_form_and_shares_the_input_rounding():
    model, weights = two_linears_on_one_input()
    rewriter = IntegerLinears(model.graph)
    for node in [node for node in model.graph if node.op_type == "MatMul"]:
        name = node.inputs[1].name
        rewriter.replace(node, weights[name], name)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    ops = [node.op_type for node in proto.graph.node]
    assert "MatMul" not in ops and ops.count("MatMulInteger") == 2
    assert ops.count("ReduceMax") == 1  # x is rounded once for both layers

    x = np.random.default_rng(3).standard_normal((2, 3, K)).astype(np.float32)
    x[0, 1] = 0  # an all-zero token
    x[1, 2] *= 100  # an outlier token: the others keep their own scale
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    expected = integer_reference(x, weights["w1"]) + integer_reference(x, weights["w2"])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    exact = x @ weights["w1"] + x @ weights["w2"]
    assert np.abs(y - exact).max() < 0.02 * np.abs(exact).max()  # and close to the float product


# ---------------------------------------------------------------------------------------------
# A whole decoder


@pytest.fixture(scope="module")
def w8a8_export(workshop, tmp_path_factory) -> tuple[Path, str]:
    """`llava-export all --quant w8a8` of the tiny model (the decoder streamed): (folder, output)."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("w8a8") / "art"
    result = invoke("all", "--model", workshop.tiny()["hf"], "--out", out, "--quant", "w8a8")
    assert result.exit_code == 0, (result.output, result.exception)
    return out, result.output


def test_every_linear_layer_runs_on_matmul_integer(w8a8_export):
    folder, output = w8a8_export
    from exporter.testing.tiny import TinyConfig

    layers = TinyConfig().text_layers * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    assert f"{layers} linear layers to w8a8 (a scale per output column, activations per token)" in output
    model = onnx.load(str(folder / contract.DECODER_FILE))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMulInteger") == layers and "MatMulNBits" not in ops
    shapes = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    float_weights = [
        node.input[1]
        for node in model.graph.node
        if node.op_type in ("MatMul", "Gemm") and len(shapes.get(node.input[1], [])) == 2
    ]
    assert not float_weights
    manifest = json.loads((folder / contract.MANIFEST_FILE).read_text())
    assert manifest["graphs"]["decoder"]["quant"] == "w8a8"


def test_verify_passes_and_reports_what_the_rounding_costs(workshop, w8a8_export):
    folder, _ = w8a8_export
    checked = invoke("verify", "--model", workshop.tiny()["hf"], "--artifacts", folder)
    assert checked.exit_code == 0 and "all outputs within tolerance" in checked.output, checked.output
    assert "w8a8 weights" in checked.output and "quantization effect" in checked.output


def test_the_runtime_answers_from_w8a8_artifacts(w8a8_export):
    from runtime.pipeline import Pipeline

    pipe = Pipeline.load(w8a8_export[0])
    first = pipe.generate("What is in the picture?", max_new_tokens=4).text
    assert isinstance(first, str) and first == pipe.generate("What is in the picture?", max_new_tokens=4).text


def test_the_benchmark_counts_a_byte_a_weight(w8a8_export):
    path = w8a8_export[0] / contract.DECODER_FILE
    per_weight = integer_matmul.graph_bytes_per_weight(path)
    assert 1 < per_weight < 1.07  # a byte, and a 4-byte scale a column of 64 to 176 weights


def test_tensorrt_refuses_it_naming_the_op():
    from exporter.engine.build import onnx_runtime_only

    spec = contract.GraphSpec(contract.DECODER_FILE, "float32", 18, {}, {}, quant="w8a8")
    assert "--quant w8a8: MatMulInteger" in onnx_runtime_only(spec)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quant", "w8a8", "--block-size", "64"], "give --quant int8|int4 with it"),
        (["--quant", "w8a8", "--fp16"], "--quant w8a8 computes in float32 on the CPU: export without --fp16"),
    ],
)
def test_w8a8_settings_it_cannot_take_are_one_line_before_any_work(workshop, tmp_path, flags, message):
    pytest.importorskip("torch")
    result = invoke("decoder", "--model", workshop.tiny()["hf"], "--out", tmp_path / "out", *flags)
    assert_error_line(result, message)
    assert not (tmp_path / "out" / contract.DECODER_FILE).exists()
