"""Every operator our exporter emits is one TensorRT's ONNX parser takes (checked without a
GPU, against exporter.engine.trt_ops' list from onnx-tensorrt's docs), and `unsupported_ops` finds
the nodes it would reject: in the main graph, in subgraphs, in local functions, in other
domains, and an opset out of the parser's range."""

from __future__ import annotations

import shutil

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from exporter.engine import trt_ops
from runtime import contract

FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="module")
def exported(workshop):
    """{(family, fp16): artifact folder} for every family, float32 and float16."""
    from exporter.testing.tiny import TinyConfig

    return {
        (family, fp16): workshop.artifacts(TinyConfig(family=family), "hf", fp16)
        for family in FAMILIES
        for fp16 in (False, True)
    }


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("graph", [contract.VISION_FILE, contract.DECODER_FILE])
def test_exported_graphs_use_only_parser_supported_ops(exported, family, fp16, graph):
    path = exported[(family, fp16)] / graph
    assert trt_ops.unsupported_ops(path) == []
    # and at an opset the parser reads
    opsets = {o.domain: o.version for o in onnx.load(str(path), load_external_data=False).opset_import}
    assert trt_ops.MIN_OPSET <= opsets[""] <= trt_ops.MAX_OPSET


def test_our_graphs_need_no_late_tensorrt_release(exported):
    """Nothing we emit needs a TensorRT newer than 10.0 (LATE_OPS are flagged for old ones)."""
    for folder in exported.values():
        for graph in (contract.VISION_FILE, contract.DECODER_FILE):
            assert trt_ops.unsupported_ops(folder / graph, tensorrt_version="10.0.1") == []


def test_the_list_is_the_parsers_list():
    # spot checks against onnx-tensorrt's table: supported, not supported, added late
    assert {
        "LayerNormalization",
        "Softmax",
        "GatherND",
        "Erf",
        "Range",
        "Trilu",
        "CastLike",
    } <= trt_ops.SUPPORTED_OPS
    assert (
        not {"Unique", "StringNormalizer", "SequenceAt", "Multinomial", "BitShift", "DFT"}
        & trt_ops.SUPPORTED_OPS
    )
    assert set(trt_ops.LATE_OPS) <= trt_ops.SUPPORTED_OPS
    assert "10.15" in trt_ops.TENSORRT_DOCS


def model_with(nodes, inputs=("x",), functions=(), opset=18, domains=()):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2]) for name in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports, functions=list(functions))


def save(model, tmp_path, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def test_unsupported_node_is_named_with_its_op(tmp_path):
    model = model_with(
        [
            helper.make_node("Relu", ["x"], ["a"], name="ok"),
            helper.make_node("Unique", ["a"], ["y"], name="bad"),
        ]
    )
    assert trt_ops.unsupported_ops(save(model, tmp_path)) == [("bad", "Unique")]


def test_other_domains_and_unnamed_nodes(tmp_path):
    model = model_with(
        [helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft")],
        domains=["com.microsoft"],
    )
    assert trt_ops.unsupported_ops(save(model, tmp_path)) == [("#0", "com.microsoft.FusedMatMul")]


def test_subgraphs_are_searched(tmp_path):
    then = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["t"], name="inner")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"], name="fine")],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
    )
    cond = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then, else_branch=other)
    graph = helper.make_graph(
        [cond],
        "g",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert trt_ops.unsupported_ops(save(model, tmp_path)) == [("branch/then_branch/inner", "Unique")]


def test_local_functions_are_inlined(tmp_path):
    body = [
        helper.make_node("Relu", ["a"], ["b"], name="r"),
        helper.make_node("Unique", ["b"], ["c"], name="u"),
    ]
    function = helper.make_function("local", "MyOp", ["a"], ["c"], body, [helper.make_opsetid("", 18)])
    model = model_with(
        [helper.make_node("MyOp", ["x"], ["y"], domain="local", name="call")],
        functions=[function],
        domains=["local"],
    )
    assert trt_ops.unsupported_ops(save(model, tmp_path)) == [("call/u", "Unique")]


def test_opset_out_of_range_and_late_ops(tmp_path):
    assert ("<model>", "opset 8") in trt_ops.unsupported_ops(
        save(model_with([helper.make_node("Relu", ["x"], ["y"])], opset=8), tmp_path)
    )
    late = model_with(
        [
            helper.make_node("Gelu", ["x"], ["a"]),
            helper.make_node("Attention", ["x", "x", "x"], ["y"], name="attn"),
        ],
        opset=23,
    )
    path = save(late, tmp_path, "late.onnx")
    assert trt_ops.unsupported_ops(path) == []
    assert trt_ops.unsupported_ops(path, tensorrt_version="10.15.1") == []
    assert trt_ops.unsupported_ops(path, tensorrt_version="10.8.0") == [
        ("attn", "Attention (needs TensorRT 10.14+)")
    ]


def test_describe_names_nodes_ops_and_the_source(tmp_path):
    problems = [(f"n{i}", "Unique") for i in range(10)] + [("m", "NonMaxRoiPool")]
    line = trt_ops.describe_unsupported(tmp_path / "decoder.onnx", problems, limit=3)
    assert "decoder.onnx has 11 node(s)" in line and "n0 (Unique)" in line and "and 8 more" in line
    assert "NonMaxRoiPool" in line and trt_ops.TENSORRT_DOCS in line


def test_engine_command_reports_an_unsupported_node_before_anything_else(workshop, tmp_path):
    """`llava-export engine` runs the op check first, with or without TensorRT installed."""
    from exporter.cli import main
    from exporter.testing.tiny import TinyConfig

    folder = shutil.copytree(workshop.artifacts(TinyConfig(), "hf"), tmp_path / "artifacts")
    model = onnx.load(str(folder / contract.VISION_FILE))
    first = model.graph.node[0]
    model.graph.node.insert(
        1, helper.make_node("Unique", [first.output[0]], ["unused_unique"], name="sneaky_unique")
    )
    onnx.save(model, str(folder / contract.VISION_FILE))
    manifest = contract.read_manifest(folder)  # the manifest agrees: only the op check can object
    manifest.graphs["vision"].sha256 = contract.file_sha256(folder / contract.VISION_FILE)
    contract.write_manifest(folder, manifest)
    for extra in (["--dry-run"], []):
        result = CliRunner().invoke(main, ["engine", "--artifacts", str(folder), *extra])
        assert result.exit_code == 2, result.output
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "sneaky_unique (Unique)" in last and "vision.onnx" in last
        assert "Traceback" not in result.output


def test_unreadable_graph_is_an_artifact_error(tmp_path):
    from runtime.errors import ArtifactError

    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07garbage\xff\xff")
    with pytest.raises(ArtifactError, match="broken.onnx is not a readable ONNX graph"):
        trt_ops.unsupported_ops(path)
