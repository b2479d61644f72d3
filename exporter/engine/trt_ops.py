"""Which ONNX operators TensorRT's ONNX parser takes, checked before any engine build (and in
CI, without a GPU): `unsupported_ops(model_path)` lists the nodes it would reject.

SUPPORTED_OPS is the set of operators marked supported ("Y") in onnx-tensorrt's
docs/operators.md, release 10.15 (TensorRT 10.15, "opset 9 to opset 24"). Operators that
appeared only in late 10.x releases are in LATE_OPS with the release that added them, so a
graph using them is flagged for older TensorRT 10 installs. The table's per-operator
restrictions (e.g. "axes must be an initializer") are not modelled here: the parser's own
error, reported by `llava-export engine` with the node and operator, covers those.
"""

from __future__ import annotations

import os
from pathlib import Path

from runtime.errors import ArtifactError

TENSORRT_DOCS = "onnx-tensorrt docs/operators.md, TensorRT 10.15"
MIN_OPSET, MAX_OPSET = 9, 24
ONNX_DOMAINS = ("", "ai.onnx")

# Operators marked "Y" in the table named by TENSORRT_DOCS.
SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant
    ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear
    Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
    GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
    GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
    Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
    RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
    Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile
    TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

# Supported only from the TensorRT release named (onnx-tensorrt's CHANGELOG.md); older 10.x
# parsers reject them.
LATE_OPS = {
    "DeformConv": "10.1",
    "BlackmanWindow": "10.4",
    "HammingWindow": "10.4",
    "HannWindow": "10.4",
    "STFT": "10.5",
    "Attention": "10.14",
    "RMSNormalization": "10.15",
    "RotaryEmbedding": "10.15",
    "TensorScatter": "10.15",
}


def _graph_nodes(graph, prefix: str = ""):
    """Every node of a graph and its subgraphs (If/Loop/Scan bodies), with a path-like name."""
    from onnx import AttributeProto

    for index, node in enumerate(graph.node):
        name = prefix + (node.name or f"#{index}")
        yield name, node
        for attribute in node.attribute:
            if attribute.type == AttributeProto.GRAPH:
                yield from _graph_nodes(attribute.g, f"{name}/{attribute.name}/")
            elif attribute.type == AttributeProto.GRAPHS:
                for k, sub in enumerate(attribute.graphs):
                    yield from _graph_nodes(sub, f"{name}/{attribute.name}[{k}]/")


def unsupported_ops(
    model_path: str | os.PathLike, tensorrt_version: str | None = None
) -> list[tuple[str, str]]:
    """[(node name, op)] of the nodes TensorRT's ONNX parser would not take, in graph order.

    Reads only the graph structure (external weights stay on disk). A node of a model-local
    function counts as its function's body; an operator from another domain (com.microsoft,
    ...) is unsupported unless a local function defines it. An opset outside the parser's
    range is reported as ("<model>", "opset N"). `tensorrt_version` (e.g. "10.8.0") also flags
    LATE_OPS newer than it.
    """
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError, OSError, ...
        raise ArtifactError(
            f"{model_path} is not a readable ONNX graph ({str(err)[:120]}): re-export it"
        ) from None
    problems: list[tuple[str, str]] = []
    for opset in model.opset_import:
        if opset.domain in ONNX_DOMAINS and not MIN_OPSET <= opset.version <= MAX_OPSET:
            problems.append(("<model>", f"opset {opset.version}"))
    functions = {(f.domain, f.name): f for f in model.functions}

    def check(name: str, node) -> None:
        key = (node.domain, node.op_type)
        if key in functions:  # a model-local function: the parser inlines its body
            for inner_name, inner in _graph_nodes(functions[key], f"{name}/"):
                check(inner_name, inner)
            return
        op = node.op_type if node.domain in ONNX_DOMAINS else f"{node.domain}.{node.op_type}"
        if node.domain not in ONNX_DOMAINS or node.op_type not in SUPPORTED_OPS:
            problems.append((name, op))
        elif (
            tensorrt_version and node.op_type in LATE_OPS and _older(tensorrt_version, LATE_OPS[node.op_type])
        ):
            problems.append((name, f"{op} (needs TensorRT {LATE_OPS[node.op_type]}+)"))

    for name, node in _graph_nodes(model.graph):
        check(name, node)
    return problems


def _older(version: str, than: str) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split(".")[:2] if p.isdigit())

    return parts(version) < parts(than)


def describe_unsupported(path: Path, problems: list[tuple[str, str]], limit: int = 8) -> str:
    """One line for a user: which nodes, which ops."""
    shown = ", ".join(f"{name} ({op})" for name, op in problems[:limit])
    more = f" and {len(problems) - limit} more" if len(problems) > limit else ""
    ops = sorted({op for _, op in problems})
    return (
        f"{path.name} has {len(problems)} node(s) TensorRT's ONNX parser does not support "
        f"(ops: {', '.join(ops)}; per {TENSORRT_DOCS}): {shown}{more}"
    )
