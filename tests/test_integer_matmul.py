"""`--quant w8a8` (exporter/graphs/integer_matmul.py): 7-bit weights in int8 per output column,
int8 activations per token stored around 128 in uint8, MatMulInteger. The kernel it relies on
is exact at the extremes of those ranges; the rewritten graph
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
    WEIGHT_PEAK,
    ZERO_POINT,
    IntegerLinears,
    quantize_columns,
    quantize_rows,
)
from runtime import contract  # noqa: E402
from tests.support.cli import assert_error_line, invoke  # noqa: E402

K, N = 96, 40


def run_matmul_integer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MatMulInteger(a, b, 128) of uint8 a and int8 b, as the graph runs it."""
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "zero"], ["y"])],
        "product",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, list(a.shape)),
            helper.make_tensor_value_info("b", TensorProto.INT8, list(b.shape)),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        [numpy_helper.from_array(np.array(ZERO_POINT, np.uint8), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"a": a, "b": b})[0]


@pytest.mark.parametrize("rows", [1, 3, 64])  # a decode step's kernel and the GEMM's
def test_the_integer_product_is_exact_at_the_extremes(rows):
    """The design's premise: ONNX Runtime's uint8 x int8 kernel is exact for any uint8 against
    weights within +-WEIGHT_PEAK, also where each pair of neighbouring products is as large as
    they get, 255 x 63 twice (the pairs vpmaddubsw sums in int16 on AVX2), and where the values
    are random."""
    generator = np.random.default_rng(0)
    depth = 512
    a = np.where(generator.random((rows, depth)) < 0.5, 0, 255).astype(np.uint8)
    a[0] = 255
    b = generator.integers(-WEIGHT_PEAK, WEIGHT_PEAK + 1, (depth, 64)).astype(np.int8)
    b[:, 0], b[:, 1] = WEIGHT_PEAK, -WEIGHT_PEAK  # row 0: every pair at +-2 x 255 x 63
    b[:, 2] = np.where(a[-1] == 255, WEIGHT_PEAK, -WEIGHT_PEAK)  # the last row: every product positive
    exact = (a.astype(np.int64) - ZERO_POINT) @ b.astype(np.int64)
    np.testing.assert_array_equal(run_matmul_integer(a, b), exact)


def test_columns_round_to_their_own_scale():
    generator = np.random.default_rng(1)
    weight = generator.standard_normal((K, N)).astype(np.float32)
    weight[:, 3] *= 50  # a column of its own magnitude
    weight[:, 7] = 0
    quant = quantize_columns(weight.T.copy().T)  # a transposed view, as the streamed export passes
    assert quant.values.dtype == np.int8 and quant.values.shape == (K, N)
    signed = quant.values.astype(np.int32)
    assert signed.min() >= -WEIGHT_PEAK and signed.max() <= WEIGHT_PEAK
    assert (np.abs(signed).max(axis=0)[np.arange(N) != 7] == WEIGHT_PEAK).all()  # each column's peak
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
    acc = (qx.astype(np.int64) - ZERO_POINT) @ quant.values.astype(np.int64)
    return acc.astype(np.float32) * scale * quant.scales


def rewritten(merge: bool) -> tuple[onnx.ModelProto, dict]:
    """two_linears_on_one_input in the integer form, the two products merged or not."""
    model, weights = two_linears_on_one_input()
    rewriter = IntegerLinears(model.graph)
    for node in [node for node in model.graph if node.op_type == "MatMul"]:
        name = node.inputs[1].name
        rewriter.replace(node, weights[name], name)
    if merge:
        rewriter.merge_siblings()
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    return proto, weights


def run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_the_rewritten_graph_is_the_integer_form_and_shares_the_input_rounding():
    proto, weights = rewritten(merge=False)
    ops = [node.op_type for node in proto.graph.node]
    assert "MatMul" not in ops and ops.count("MatMulInteger") == 2
    assert ops.count("ReduceMax") == 1  # x is rounded once for both layers

    x = np.random.default_rng(3).standard_normal((2, 3, K)).astype(np.float32)
    x[0, 1] = 0  # an all-zero token
    x[1, 2] *= 100  # an outlier token: the others keep their own scale
    y = run(proto, x)
    expected = integer_reference(x, weights["w1"]) + integer_reference(x, weights["w2"])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    exact = x @ weights["w1"] + x @ weights["w2"]
    assert np.abs(y - exact).max() < 0.02 * np.abs(exact).max()  # and close to the float product


def test_siblings_merge_into_one_product_with_the_same_numbers():
    separate, _ = rewritten(merge=False)
    merged, _ = rewritten(merge=True)
    ops = [node.op_type for node in merged.graph.node]
    assert ops.count("MatMulInteger") == 1 and ops.count("Split") == 1
    (product,) = [node for node in merged.graph.node if node.op_type == "MatMulInteger"]
    shapes = {tensor.name: list(tensor.dims) for tensor in merged.graph.initializer}
    assert product.input[1] == "w1+w2_w8" and shapes[product.input[1]] == [K, 2 * N]
    assert not {"w1_w8", "w2_w8", "w1_scales", "w2_scales"} & set(shapes)  # the old weights are gone
    x = np.random.default_rng(5).standard_normal((2, 3, K)).astype(np.float32)
    np.testing.assert_array_equal(run(merged, x), run(separate, x))  # bit for bit


def test_sibling_names_keep_the_shared_prefix():
    names = [f"layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    assert (
        integer_matmul.sibling_name(names) == "layers.0.self_attn.q_proj.weight+k_proj.weight+v_proj.weight"
    )
    assert integer_matmul.sibling_name(["w1", "w2"]) == "w1+w2"


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
    products = TinyConfig().text_layers * 4 + 1  # q|k|v, o, gate|up, down per layer + lm_head
    assert ops.count("MatMulInteger") == products and "MatMulNBits" not in ops
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
