"""The static KV layout's graph on ONNX Runtime's fused kernels (`--kv-cache static`, a graph
that only ONNX Runtime runs anyway: its attention is com.microsoft.GroupQueryAttention).

A decode step runs every node of the graph for one token, and on a CPU a small node costs
about as much to launch as to compute: a 7B decoder's ~3,400 nodes took ~30 ms of a ~200 ms
w8a8 step (docs/benchmarks.md). Two patterns make most of a layer's nodes:

    RMSNorm, 7 nodes:       x -> Pow -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x) -> Mul(w)
    rotary, ~12 per q/k:    [B,S,n*hd] -> Reshape -> Transpose -> x*cos + rotate_half(x)*sin
                            -> Transpose -> Reshape (then GroupQueryAttention)

They become
    residual Add + RMSNorm -> com.microsoft.SkipSimplifiedLayerNormalization (the norm and the
                              sum the next residual adds to), onnxscript's rules;
    rotary                 -> com.microsoft.RotaryEmbedding on the [B,S,n*hd] projection, over
                              cos/sin caches [max_seq_len, hd/2] and the graph's position_ids.

The first norm (layer 0's, on inputs_embeds) follows no Add and stays as traced: ONNX Runtime
registers the skip-less SimplifiedLayerNormalization in the ONNX domain, which onnx.checker
refuses.
GroupQueryAttention's own rotary (do_rotary) is not used: ONNX Runtime 1.32's CPU kernel writes
a batched prompt's keys to the cache rotated at positions 0..S-1 whatever position_ids say, so a
left-padded row's cache would be wrong.
"""

from __future__ import annotations

import numpy as np

from exporter.graphs import integer_matmul
from runtime import contract
from runtime.errors import LlavaError

MICROSOFT = "com.microsoft"
HALF_TURN = [0, 2, 1, 3]  # [B,S,n,hd] <-> [B,n,S,hd]
STAGE = "fusing the norms and rotary into ONNX Runtime kernels"


def rotary_caches(language_model, length: int, dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """(cos, sin) [length, hd/2] in `dtype` for positions 0..length-1, as the model's rotary
    module computes them (position x inv_freq in float32, times its attention scaling), or None
    for a rotary whose frequencies change with the sequence length (dynamic scaling): a cache
    could not hold it."""
    import torch

    rotary = type(language_model.rotary_emb)(config=language_model.config)  # real buffers, even on meta
    if "dynamic" in str(getattr(rotary, "rope_type", "default")):
        return None
    positions = torch.arange(length, dtype=torch.float32)[:, None]
    angles = positions * rotary.inv_freq.float()[None, :]  # [length, hd/2]
    scaling = getattr(rotary, "attention_scaling", 1.0)
    return tuple((function(angles) * scaling).to(dtype).numpy() for function in (torch.cos, torch.sin))


def fuse_static_decoder(model, caches: tuple[np.ndarray, np.ndarray] | None) -> dict[str, int]:
    """Rewrites the onnx_ir `model` in place; returns how many of each fusion it made."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.rewriter.ort_fusions import skip_normalization

    common_passes.ShapeInferencePass()(model)  # the skip rule checks [B,S,D] shapes
    counts = {"rms_normalization": residual_norm_rules().apply_to_model(model)}
    counts["skip_rms_normalization"] = skip_normalization.fuse_skip_rms_normalization(model)
    if counts["skip_rms_normalization"] != counts["rms_normalization"]:  # one left in the ONNX domain
        raise LlavaError(
            f"fusing the decoder's norms: {counts['rms_normalization']} RMSNorms but "
            f"{counts['skip_rms_normalization']} residual adds fused with them (a graph this exporter does not know)"
        )
    counts["rotary_embedding"] = fuse_rotary(model, caches) if caches is not None else 0
    model.opset_imports[MICROSOFT] = 1
    return counts


def residual_norm_rules():
    """onnxscript's RMSNorm rules, limited to norms whose input is a residual Add: those the
    skip rule then takes, so no SimplifiedLayerNormalization is left on its own."""
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions import rms_normalization

    class ResidualRmsNorm(rms_normalization.RmsNormFusion):
        def check(self, op, x, **bindings) -> pattern.MatchResult:
            producer = x.producer()
            if producer is None or producer.op_type != "Add":
                return pattern.MatchResult().fail("not after a residual Add", x)
            return super().check(op, x, **bindings)

    return pattern.RewriteRuleSet(
        [ResidualRmsNorm.rule(f"ResidualRmsNorm{order}", _mul_order=order) for order in (False, True)]
    )


def fuse_rotary(model, caches: tuple[np.ndarray, np.ndarray]) -> int:
    """Each GroupQueryAttention's query and key, when traced as the rotary pattern above, from
    a RotaryEmbedding on the projection instead; its value, Reshape(Reshape(v)), from v's
    [B,S,kv*hd] directly. Returns the rotaries replaced."""
    import onnx_ir.passes.common as common_passes

    graph = model.graph
    attentions = [node for node in graph if node.op_type == "GroupQueryAttention"]
    found = [
        (attention, slot, heads, projection)
        for attention in attentions
        for slot, heads in ((0, "num_heads"), (1, "kv_num_heads"))
        if (projection := unrotated(attention.inputs[slot])) is not None
    ]
    if not found:
        return 0
    positions = next(value for value in graph.inputs if value.name == contract.POSITION_IDS)
    cos = integer_matmul.initializer(graph, "rotary.cos_cache", caches[0])
    sin = integer_matmul.initializer(graph, "rotary.sin_cache", caches[1])
    for attention, slot, heads, projection in found:
        rotary = rotary_node(projection, positions, cos, sin, attention.attributes[heads].value)
        graph.insert_before(attention, rotary)
        attention.replace_input_with(slot, rotary.outputs[0])
    for attention in attentions:
        value = reshaped_twice(attention.inputs[2])
        if value is not None:
            attention.replace_input_with(2, value)
    common_passes.RemoveUnusedNodesPass()(model)  # the old rotary chains
    return len(found)


def rotary_node(projection, positions, cos, sin, heads: int):
    import onnx_ir as ir

    return ir.node(
        "RotaryEmbedding",
        [projection, positions, cos, sin],
        attributes={"interleaved": 0, "num_heads": heads},
        domain=MICROSOFT,
    )


def unrotated(value):
    """The [B,S,n*hd] projection x when `value` = Reshape(Transpose(r)) with r = x4 * C +
    rotate_half(x4) * S, x4 = Transpose(Reshape(x)), C and S from Cos and Sin; else None."""
    back = producer(first_input(producer(value, "Reshape")), "Transpose", perm=HALF_TURN)
    total = producer(first_input(back), "Add")
    if total is None:
        return None
    straight, turned = (producer(term, "Mul") for term in total.inputs)
    if straight is None or turned is None:
        return None
    x4, cos = straight.inputs
    halves, sin = turned.inputs
    if not (from_op(cos, "Cos") and from_op(sin, "Sin") and is_rotate_half(halves, x4)):
        return None
    heads_first = producer(x4, "Transpose", perm=HALF_TURN)
    return first_input(producer(first_input(heads_first), "Reshape"))


def is_rotate_half(value, x4) -> bool:
    """value = Concat(-x4[..., h:], x4[..., :h], axis=-1) with h = hd/2."""
    concat = producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or x4.shape is None:
        return False
    negated = producer(concat.inputs[0], "Neg")
    upper = producer(first_input(negated), "Slice")
    lower = producer(concat.inputs[1], "Slice")
    half = x4.shape[-1] // 2 if isinstance(x4.shape[-1], int) else None
    return (
        half is not None
        and upper is not None
        and lower is not None
        and upper.inputs[0] is x4
        and lower.inputs[0] is x4
        and slice_bounds(lower) == (0, half)
        and slice_bounds(upper)[0] == half
        and slice_bounds(upper)[1] >= 2 * half
    )


def slice_bounds(node) -> tuple[int | None, int | None]:
    """A Slice's single start and end, when they are constants on the last axis, step 1."""
    starts, ends, axes = (constant(node.inputs[i]) if len(node.inputs) > i else None for i in (1, 2, 3))
    steps = constant(node.inputs[4]) if len(node.inputs) > 4 else [1]
    if starts is None or ends is None or axes not in ([3], [-1]) or steps != [1]:
        return None, None
    return starts[0], ends[0]


def reshaped_twice(value):
    """x when `value` = Reshape(Reshape(x)) to x's own shape [B,S,width]; else None."""
    inner = producer(first_input(producer(value, "Reshape")), "Reshape")
    if inner is None:
        return None
    source = inner.inputs[0]
    if source.shape is None or value.shape is None or len(source.shape) != 3:
        return None
    return source if list(source.shape) == list(value.shape) else None


def producer(value, op_type: str, perm: list[int] | None = None):
    """value's producing node when it is `op_type` (with that perm, for a Transpose), else None."""
    if value is None or value.producer() is None:
        return None
    node = value.producer()
    if node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    if perm is not None and list(node.attributes["perm"].value) != perm:
        return None
    return node


def first_input(node):
    return None if node is None else node.inputs[0]


def from_op(value, op_type: str) -> bool:
    """value is op_type's output, through Unsqueeze and Cast nodes."""
    while value is not None and value.producer() is not None:
        node = value.producer()
        if node.op_type == op_type:
            return True
        if node.op_type not in ("Unsqueeze", "Cast"):
            return False
        value = node.inputs[0]
    return False


def constant(value) -> list[int] | None:
    """An integer constant's items (an initializer or a Constant node's), else None."""
    import onnx_ir as ir

    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(item) for item in tensor.numpy().reshape(-1)]


def rewrite_file(path, rewrite) -> None:
    """`rewrite` (in place, on the onnx_ir model) applied to the graph at `path` (external data
    beside it), written back staged and checked."""
    import onnx
    import onnx_ir as ir

    from exporter.graphs import quantize

    model = ir.from_proto(onnx.load(str(path)))
    rewrite(model)
    quantize.write_quantized(ir.to_proto(model), path)


def summary(counts: dict[str, int]) -> str:
    return (
        f"{counts['skip_rms_normalization']} residual norms to SkipSimplifiedLayerNormalization, "
        f"{counts['rotary_embedding']} rotaries to RotaryEmbedding"
    )
