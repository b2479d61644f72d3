"""`llava-export decoder`: the language model with past-key-value I/O, plus the token
embeddings and the tokenizer.

    inputs_embeds  [B,S,hidden]                 attention_mask [B,P+S] int64 (left padding)
    position_ids   [B,S] int64                  past_key_values.{i}.key|value [B,kv,P,hd]
 -> logits [B,vocab] float32 (last position only), present.{i}.key|value [B,kv,P+S,hd]

One graph serves prefill (P = 0) and decode (S = 1). Logits cover only the last position:
generation needs nothing else, and every position of a 600-token prompt times a 32k vocabulary
would be 77 MB of float32 per sequence for nothing.

That is the "concat" KV layout: each present is Concat(past, new), a copy of the whole cache
per step. The opt-in "static" layout (--kv-cache static, ONNX Runtime only) takes and returns
preallocated buffers instead, past_key_values.{i}.* and present.{i}.* [B,kv,M,hd] alike, of
which the first P+S columns are live: com.microsoft.GroupQueryAttention writes the S new
positions at columns P..P+S-1 and attends over columns 0..P+S-1 only. Bound to one OrtValue as
both past and present (runtime/backends/ort.py), the buffer is updated in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exporter import parity
from exporter.graphs import onnx_io, quantize
from exporter.graphs.tokenizer import save_tokenizer
from exporter.manifest import open_manifest
from exporter.progress import Progress
from exporter.source import LlavaSource
from runtime import contract
from runtime.contract import GraphSpec, TokenSpec
from runtime.errors import LlavaError

DEFAULT_OPSET = 18


class DecoderWithPast(nn.Module):
    """The text model and LM head as one function of (embeddings, mask, positions, past)."""

    def __init__(self, llava: nn.Module):
        super().__init__()
        self.language_model = llava.model.language_model
        self.lm_head = llava.lm_head

    def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values):
        from transformers import DynamicCache

        # A plain (non-sliding) cache: present must hold all P+S positions; a sliding window,
        # if the config has one, is applied by the model's attention mask instead.
        cache = DynamicCache()
        for layer, (key, value) in enumerate(past_key_values):
            cache.update(key, value, layer)
        hidden = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        logits = self.lm_head(hidden[:, -1]).float()  # [B, vocab]
        presents = []
        for layer in cache.layers:
            presents += [layer.keys, layer.values]  # each [B, kv_heads, P+S, head_dim]
        return (logits, *presents)


# -- the static KV layout ---------------------------------------------------------------------

STATIC_ATTENTION = "llava_export_static_kv"  # the transformers attention implementation below


def group_query_attention(
    query, key, value, past_key, past_value, attention_bias, num_heads: int, kv_num_heads: int, scale: float
):
    """ONNX Runtime's com.microsoft.GroupQueryAttention on a preallocated cache: the ONNX node
    while exporting, the same arithmetic in PyTorch otherwise.

    query [B,S,heads*hd], key/value [B,S,kv*hd] (rotary applied), past_key/value [B,kv,M,hd]
    live in columns 0..T-S-1, attention_bias [B,1,S,T] additive (causal and padding)
    -> output [B,S,heads*hd], present_key/value [B,kv,M,hd]: past with the S new positions
    written at columns T-S..T-1. Columns from T on are neither read nor written.

    The node gets total_sequence_length T and seqlens_k [B] = T-1 for every row: left padding
    ends every row at the same column, and the bias hides the padding. Its own causal mask
    agrees with the bias'."""
    if not torch.onnx.is_in_onnx_export():
        return group_query_attention_reference(
            query, key, value, past_key, past_value, attention_bias, num_heads, kv_num_heads, scale
        )
    batch, total = query.shape[0], attention_bias.shape[-1]
    seqlens_k = torch.full((batch,), total - 1, dtype=torch.int32)
    total_sequence_length = torch.full((), total, dtype=torch.int32)
    return torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention",
        [
            query,
            key,
            value,
            past_key,
            past_value,
            seqlens_k,
            total_sequence_length,
            None,
            None,
            None,
            attention_bias,
        ],
        {"num_heads": num_heads, "kv_num_heads": kv_num_heads, "scale": scale},
        dtypes=[query.dtype, past_key.dtype, past_value.dtype],
        shapes=[query.shape, past_key.shape, past_value.shape],
        version=1,
    )


def group_query_attention_reference(
    query, key, value, past_key, past_value, attention_bias, num_heads, kv_num_heads, scale
):
    """group_query_attention in PyTorch ops (same arguments and results)."""
    batch, new, _ = query.shape
    total, head_dim = attention_bias.shape[-1], past_key.shape[-1]
    presents = []
    for past, states in ((past_key, key), (past_value, value)):
        present = past.clone()
        present[:, :, total - new : total] = states.view(batch, new, kv_num_heads, head_dim).transpose(1, 2)
        presents.append(present)
    groups = num_heads // kv_num_heads
    keys, values = (p[:, :, :total].repeat_interleave(groups, dim=1) for p in presents)  # [B,heads,T,hd]
    queries = query.view(batch, new, num_heads, head_dim).transpose(1, 2)
    scores = (queries @ keys.transpose(2, 3)).float() * scale + attention_bias.float()
    output = scores.softmax(-1).to(values.dtype) @ values  # [B,heads,S,hd]
    return output.transpose(1, 2).reshape(batch, new, num_heads * head_dim), presents[0], presents[1]


def static_kv_attention(
    module, query, key, value, attention_mask, scaling, static_kv=None, sliding_window=None, **kwargs
):
    """A transformers attention implementation over the static cache `static_kv` (a list of
    [key, value] buffers per layer, replaced by the presents). query [B,heads,S,hd], key/value
    [B,kv,S,hd] (the new positions only: no transformers cache is involved), attention_mask the
    additive bias [B,1,S,T] -> ([B,S,heads,hd], no weights)."""
    assert sliding_window is None, "check_kv_cache refuses sliding-window models"
    batch, heads, new, head_dim = query.shape
    kv_heads = key.shape[1]
    layer = static_kv[module.layer_idx]
    flat = [
        states.transpose(1, 2).reshape(batch, new, -1) for states in (query, key, value)
    ]  # [B,S,heads*hd]
    output, layer[0], layer[1] = group_query_attention(
        *flat, layer[0], layer[1], attention_mask, heads, kv_heads, scaling
    )
    return output.view(batch, new, heads, head_dim), None


def attention_bias(attention_mask: torch.Tensor, new: int, dtype: torch.dtype) -> torch.Tensor:
    """attention_mask [B,T] (0 on left padding) -> additive bias [B,1,S,T]: 0 where the query at
    column T-S+i may see column j (j <= T-S+i, not padding), the dtype's min elsewhere (as
    transformers' eager mask; a padding query row, fully masked, stays finite)."""
    total = attention_mask.shape[1]
    columns = torch.arange(total)
    rows = torch.arange(new) + (total - new)
    visible = (columns[None, :] <= rows[:, None])[None] & attention_mask[:, None, :].bool()  # [B,S,T]
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)[:, None]


class DecoderWithStaticCache(DecoderWithPast):
    """DecoderWithPast over preallocated buffers: past_key_values [B,kv,M,hd] each, live in
    columns 0..P-1 (P = attention_mask width - S); returns (logits, the buffers with the S new
    positions written at P..P+S-1)."""

    def __init__(self, llava: nn.Module):
        from transformers import AttentionInterface

        super().__init__(llava)
        AttentionInterface.register(STATIC_ATTENTION, static_kv_attention)  # forward selects it by name

    def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values):
        static_kv = [[key, value] for key, value in past_key_values]
        config = self.language_model.config
        eager, config._attn_implementation = config._attn_implementation, STATIC_ATTENTION
        try:
            hidden = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_bias(
                    attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype
                ),  # 4D: used as is
                position_ids=position_ids,
                use_cache=False,
                static_kv=static_kv,
            ).last_hidden_state
        finally:
            config._attn_implementation = eager
        logits = self.lm_head(hidden[:, -1]).float()  # [B, vocab]
        return (logits, *(buffer for layer in static_kv for buffer in layer))


# The cache dims' names in each layout: the graph's past and present sequence dims.
PAST_DIM = {contract.KV_CONCAT: "past_sequence", contract.KV_STATIC: "max_sequence"}
PRESENT_DIM = {contract.KV_CONCAT: "total_sequence", contract.KV_STATIC: "max_sequence"}
TRACE_BUFFER = 8  # the static layout's buffer length while tracing (any length runs)


def dynamic_shapes(num_layers: int, kv_cache: str = contract.KV_CONCAT) -> dict:
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence")
    past = torch.export.Dim(PAST_DIM[kv_cache])
    total = torch.export.Dim("total_sequence")
    return {
        "inputs_embeds": {0: batch, 1: sequence},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: sequence},
        "past_key_values": [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(num_layers)],
    }


def io_spec(source: LlavaSource, kv_cache: str = contract.KV_CONCAT) -> tuple[dict, dict]:
    text = source.text
    kv = ["batch", text.num_kv_heads, PAST_DIM[kv_cache], text.head_dim]
    present = ["batch", text.num_kv_heads, PRESENT_DIM[kv_cache], text.head_dim]
    inputs = {
        contract.INPUTS_EMBEDS: ["batch", "sequence", text.hidden_size],
        contract.ATTENTION_MASK: ["batch", "total_sequence"],
        contract.POSITION_IDS: ["batch", "sequence"],
    }
    outputs = {contract.LOGITS: ["batch", text.vocab_size]}
    for layer in range(text.num_layers):
        inputs[contract.past_key_name(layer)] = kv
        inputs[contract.past_value_name(layer)] = kv
        outputs[contract.present_key_name(layer)] = present
        outputs[contract.present_value_name(layer)] = present
    return inputs, outputs


def left_padded_mask(lengths: list[int], width: int) -> torch.Tensor:
    """[B, width] int64: zeros on the left, then `length` ones."""
    return torch.tensor([[0] * (width - n) + [1] * n for n in lengths], dtype=torch.long)


def positions_from_mask(mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Position ids of the last `new_tokens` columns: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)[:, -new_tokens:]


def empty_past(source: LlavaSource, batch: int, dtype: torch.dtype, length: int = 0) -> list:
    shape = (batch, source.text.num_kv_heads, length, source.text.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
        for _ in range(source.text.num_layers)
    ]


def in_buffers(past: list, length: int) -> list:
    """Concat-layout past [B,kv,P,hd] -> static-layout buffers [B,kv,length,hd], zeros after P."""
    return [tuple(nn.functional.pad(t, (0, 0, 0, length - t.shape[2])) for t in pair) for pair in past]


def trace_sample(source: LlavaSource, dtype: torch.dtype, kv_cache: str = contract.KV_CONCAT):
    """Arguments to trace with: B=2, S=3, P=2 (sizes 0 and 1 would be specialised); the static
    layout's past in buffers of TRACE_BUFFER columns."""
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 3, source.text.hidden_size, generator=generator).to(dtype)
    mask = torch.ones(2, 5, dtype=torch.long)
    positions = positions_from_mask(mask, 3)
    past = [
        (k.normal_(generator=generator), v.normal_(generator=generator))
        for k, v in empty_past(source, 2, torch.float32, 2)
    ]
    past = [(k.to(dtype), v.to(dtype)) for k, v in past]
    if kv_cache == contract.KV_STATIC:
        past = in_buffers(past, TRACE_BUFFER)
    return embeds, mask, positions, past


def export_decoder(
    source: LlavaSource,
    out: Path,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    template: str | None = None,
    verify: bool = True,
    progress: Progress | None = None,
    quant: str | None = None,
    kv_cache: str = contract.KV_CONCAT,
    max_seq_len: int | None = None,
) -> dict[str, float]:
    """Writes decoder.onnx, embed_tokens.npy and the tokenizer into `out`; updates the manifest.

    The source should be loaded in the export dtype (float16 for --fp16): a float32 copy of a
    7B decoder would not fit next to it in 24 GB. `quant` ("int8" | "int4") quantizes the linear
    layers' weights (exporter/graphs/quantize.py) after tracing; the parity gate is then
    parity.QUANT_MIN_COSINE[quant]. `kv_cache` "static" writes the static layout (module
    docstring) whose runtime buffers hold `max_seq_len` positions (recorded in the manifest).
    """
    progress = progress or Progress()
    bits = quantize.quant_bits(quant) if quant else None  # a bad value fails before any work
    max_seq_len = check_kv_cache(source, kv_cache, max_seq_len)
    onnx_io.check_writable(out)
    manifest = open_manifest(out, source, force, template)
    dtype_name = "float16" if fp16 else "float32"
    dtype = getattr(torch, dtype_name)
    decoder = (DecoderWithStaticCache if kv_cache == contract.KV_STATIC else DecoderWithPast)(
        source.model
    ).eval()
    if next(decoder.parameters()).dtype != dtype:
        decoder = decoder.to(dtype)  # in place: load the source in the export dtype to avoid this
    with onnx_io.staging(out, "decoder") as stage:
        with progress.stage(
            f"tracing the decoder graph ({dtype_name}, {source.text.num_layers} layers, opset {opset}, {kv_cache} KV cache)"
        ):
            program = onnx_io.trace_to_onnx(
                decoder,
                trace_sample(source, dtype, kv_cache),
                dynamic_shapes=dynamic_shapes(source.text.num_layers, kv_cache),
                input_names=contract.decoder_input_names(source.text.num_layers),
                output_names=contract.decoder_output_names(source.text.num_layers),
                opset=opset,
            )
        with progress.stage("saving and checking the graph"):
            external = onnx_io.parameter_bytes(decoder) > onnx_io.EXTERNAL_DATA_BYTES
            float_stage = stage / "float" if quant else stage  # the float graph, kept aside
            float_stage.mkdir(exist_ok=True)
            path = onnx_io.save_graph(program, float_stage, contract.DECODER_FILE, external)
            del program
            onnx_io.check_graph(path)
        if quant:
            with progress.stage(f"quantizing the linear layers to {quant} (MatMulNBits)"):
                stats = quantize.quantize_decoder(path, stage / contract.DECODER_FILE, bits)
                shutil.rmtree(float_stage)
                path = stage / contract.DECODER_FILE
            progress.say(f"  {stats.summary()}")
        results = []
        if verify:
            with progress.stage("running prefill and decode in ONNX Runtime against PyTorch"):
                results = decoder_parity(source, path, dtype_name, quant=quant)
            parity.report(progress, "decoder", results)
            parity.assert_parity(results, "decoder graph; nothing was written")
        sha = onnx_io.file_sha256(path)
        with progress.stage("writing token embeddings and tokenizer"):
            embeddings = write_embeddings(source, stage, dtype_name)
            tokens = save_tokenizer(source.tokenizer_dir, stage)
        for name in (contract.EMBEDDINGS_FILE, contract.TOKENIZER_FILE, contract.TOKENIZER_CONFIG_FILE):
            if (stage / name).exists():
                (stage / name).replace(out / name)
        onnx_io.publish(stage, out, contract.DECODER_FILE)
    inputs, outputs = io_spec(source, kv_cache)
    manifest.graphs["decoder"] = GraphSpec(
        contract.DECODER_FILE,
        dtype_name,
        opset,
        inputs,
        outputs,
        sha,
        quant=quant,
        kv_cache=kv_cache,
        max_seq_len=max_seq_len,
    )
    manifest.embeddings = embeddings
    manifest.tokens = TokenSpec(bos=tokens["bos"], eos=tokens["eos"], pad=tokens["pad"])
    manifest.parity["decoder"] = parity.summary(results)
    contract.write_manifest(out, manifest)
    return manifest.parity["decoder"]


def check_kv_cache(source: LlavaSource, kv_cache: str, max_seq_len: int | None) -> int | None:
    """LlavaError for KV cache options the model cannot take; else the static layout's buffer
    length: `max_seq_len`, by default the model's positions up to 4096 (as TensorRT engines'),
    or None for the concat layout, which takes none."""
    from runtime.engines import DEFAULT_MAX_SEQ_LEN

    if kv_cache not in contract.KV_LAYOUTS:
        raise LlavaError(f"unknown KV cache layout {kv_cache!r} (known: {', '.join(contract.KV_LAYOUTS)})")
    if kv_cache == contract.KV_CONCAT:
        if max_seq_len is not None:
            raise LlavaError("--max-seq-len sizes the static KV cache: it takes --kv-cache static")
        return None
    if getattr(source.model.config.text_config, "sliding_window", None) is not None:
        raise LlavaError(
            "--kv-cache static does not take sliding-window attention (this model has it): use --kv-cache concat"
        )
    positions = source.text.max_positions
    if max_seq_len is None:
        return min(DEFAULT_MAX_SEQ_LEN, positions)
    if not 2 <= max_seq_len <= positions:
        raise LlavaError(
            f"--max-seq-len {max_seq_len} must be from 2 (a prompt token and an answer token) to the model's {positions} positions"
        )
    return max_seq_len


def graph_kv_layout(session) -> str:
    """The KV layout of a decoder graph (an ONNX Runtime session), read off its first past
    input's sequence dim (PAST_DIM): `llava-export verify` checks graphs of either layout."""
    dim = session.get_inputs()[3].shape[2]
    return contract.KV_STATIC if dim == PAST_DIM[contract.KV_STATIC] else contract.KV_CONCAT


def write_embeddings(source: LlavaSource, folder: Path, dtype_name: str) -> dict:
    """embed_tokens.npy [vocab, hidden] in the graph dtype; the runtime memory-maps it."""
    weight = source.model.get_input_embeddings().weight.detach()
    array = weight.to(getattr(torch, dtype_name)).numpy()
    np.save(folder / contract.EMBEDDINGS_FILE, array)
    return {"file": contract.EMBEDDINGS_FILE, "dtype": dtype_name, "shape": list(array.shape)}


def decoder_parity(
    source: LlavaSource, path: Path, dtype_name: str, steps: int = 2, quant: str | None = None
) -> list[parity.OutputParity]:
    """The graph at `path` against PyTorch (in the dtype the source was loaded in): prefill a
    left-padded batch of 2 (lengths 6 and 4), then `steps` decode steps feeding the reference's
    present back as past; compares logits every step and the final cache at real positions.

    A weight-quantized graph (`quant`) is held to parity.QUANT_MIN_COSINE against a reference
    whose linear layers carry the very weights the graph stores (quantize.quantized_linears):
    what is left is MatMulNBits' own arithmetic (int8 activations at accuracy level 4). Its
    logits are also set against the unquantized weights (cosine, top-1 agreement): what the
    quantization costs, reported and not gated.

    A static-layout graph (graph_kv_layout) gets the same past in buffers with spare columns
    after the live ones (in_buffers), which its attention must ignore; its presents are compared
    over their live columns."""
    import onnxruntime as ort

    decoder = DecoderWithPast(source.model).eval()
    model_dtype = next(decoder.parameters()).dtype
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    static = graph_kv_layout(session) == contract.KV_STATIC
    min_cosine = parity.min_cosine_for(dtype_name, quant)
    names = contract.decoder_output_names(source.text.num_layers)

    def reference(embeds, mask, positions, past) -> list[torch.Tensor]:
        with torch.no_grad():
            return [
                t.float()
                for t in decoder(
                    embeds.to(model_dtype),
                    mask,
                    positions,
                    [(k.to(model_dtype), v.to(model_dtype)) for k, v in past],
                )
            ]

    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, 6, source.text.hidden_size, generator=generator)
    mask = left_padded_mask([6, 4], 6)
    past = empty_past(source, 2, torch.float32)
    buffer = embeds.shape[1] + steps + 4  # the static layout's: 4 spare columns at the end
    results, steps_run = [], []
    with (
        quantize.quantized_linears(decoder, *quantize.graph_settings(path))
        if quant
        else contextlib.nullcontext()
    ):
        for step in range(steps + 1):
            positions = positions_from_mask(mask, embeds.shape[1])
            expected = reference(embeds, mask, positions, past)
            feed = {
                contract.INPUTS_EMBEDS: embeds.numpy().astype(dtype_name),
                contract.ATTENTION_MASK: mask.numpy(),
                contract.POSITION_IDS: positions.numpy(),
            }
            for layer, (key, value) in enumerate(in_buffers(past, buffer) if static else past):
                feed[contract.past_key_name(layer)] = key.numpy().astype(dtype_name)
                feed[contract.past_value_name(layer)] = value.numpy().astype(dtype_name)
            actual = session.run(names, feed)
            if static:
                actual[1:] = [present[:, :, : mask.shape[1]] for present in actual[1:]]  # the live columns
            results.append(
                parity.compare(f"logits step {step}", actual[0], expected[0].numpy(), min_cosine=min_cosine)
            )
            steps_run.append(((embeds, mask, positions, past), actual[0]))
            past = [(expected[1 + 2 * i], expected[2 + 2 * i]) for i in range(source.text.num_layers)]
            next_ids = expected[0].argmax(-1)
            embeds = source.model.get_input_embeddings()(next_ids)[:, None].float()
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    real = mask[:, :-1].bool().numpy()  # the cache covers all but the last appended column
    for name, act, exp in zip(names[1:], actual[1:], expected[1:]):
        kept = np.moveaxis(act, 2, 1)[real], np.moveaxis(exp.numpy(), 2, 1)[real]  # [real tokens, kv, hd]
        results.append(parity.compare(name, kept[0], kept[1], min_cosine=min_cosine))
    if quant:  # the same steps against the unquantized weights
        for step, (inputs, logits) in enumerate(steps_run):
            effect = parity.compare(
                f"logits step {step} vs {dtype_name} weights",
                logits,
                reference(*inputs)[0].numpy(),
                top1=True,
            )
            results.append(dataclasses.replace(effect, gated=False))
    return results
