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
preallocated buffers instead, updated in place: static_kv.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exporter import parity
from exporter.graphs import DEFAULT_OPSET, fusions, integer_matmul, quantize
from exporter.graphs.export import ExportOptions, GraphExport, export_graph
from exporter.graphs.static_kv import DecoderWithStaticCache, in_buffers
from exporter.graphs.tokenizer import save_tokenizer
from exporter.progress import Progress
from exporter.source import LlavaSource
from runtime import contract
from runtime.contract import Manifest, TokenSpec
from runtime.errors import LlavaError

# The cache dims' names in each layout: the graph's past and present sequence dims.
PAST_DIM = {contract.KV_CONCAT: "past_sequence", contract.KV_STATIC: "max_sequence"}
PRESENT_DIM = {contract.KV_CONCAT: "total_sequence", contract.KV_STATIC: "max_sequence"}
TRACE_BUFFER = 8  # the static layout's buffer length while tracing (any length runs)
# The parity check: a left-padded prefill of these lengths, then this many decode steps; a
# static-layout graph's buffers get spare columns after the live ones, which it must ignore.
PARITY_LENGTHS = [6, 4]
PARITY_DECODE_STEPS = 2
PARITY_SPARE_COLUMNS = 4
# What ships with the decoder: the runtime's embedding table and tokenizer.
COMPANION_FILES = (contract.EMBEDDINGS_FILE, contract.TOKENIZER_FILE, contract.TOKENIZER_CONFIG_FILE)


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


@dataclasses.dataclass
class ParityStep:
    """One prefill or decode step of the parity check."""

    inputs: tuple  # (embeds [B,S,hidden] float32, mask [B,P+S], positions [B,S], past [(k, v)] [B,kv,P,hd])
    actual: list[np.ndarray]  # the graph's logits [B,vocab] and presents (a static layout's live columns)
    expected: list[torch.Tensor]  # the reference's, float32


class DecoderGraph(GraphExport):
    """decoder.onnx (DecoderWithPast, or DecoderWithStaticCache for the static layout), weight-
    quantized after tracing when options.quant says so; embed_tokens.npy and the tokenizer ship
    with it and fill the manifest's embeddings and tokens."""

    name = "decoder"
    file = contract.DECODER_FILE
    checks = "prefill and decode"

    @property
    def static(self) -> bool:
        return self.options.kv_cache == contract.KV_STATIC

    def io_spec(self):
        text, kv_cache = self.source.text, self.options.kv_cache
        past = ["batch", text.num_kv_heads, PAST_DIM[kv_cache], text.head_dim]
        present = ["batch", text.num_kv_heads, PRESENT_DIM[kv_cache], text.head_dim]
        inputs = {
            contract.INPUTS_EMBEDS: ["batch", "sequence", text.hidden_size],
            contract.ATTENTION_MASK: ["batch", "total_sequence"],
            contract.POSITION_IDS: ["batch", "sequence"],
        }
        outputs = {contract.LOGITS: ["batch", text.vocab_size]}
        for layer in range(text.num_layers):
            inputs[contract.past_key_name(layer)] = past
            inputs[contract.past_value_name(layer)] = past
            outputs[contract.present_key_name(layer)] = present
            outputs[contract.present_value_name(layer)] = present
        return inputs, outputs

    def dynamic_shapes(self) -> dict:
        """dynamic_axes as the forward takes its arguments: past_key_values a (key, value) pair
        per layer."""
        axes = self.dynamic_axes()
        layers = range(self.source.text.num_layers)
        return {
            "inputs_embeds": axes[contract.INPUTS_EMBEDS],
            "attention_mask": axes[contract.ATTENTION_MASK],
            "position_ids": axes[contract.POSITION_IDS],
            "past_key_values": [
                (axes[contract.past_key_name(i)], axes[contract.past_value_name(i)]) for i in layers
            ],
        }

    def trace_details(self) -> str:
        options = self.options
        return f"{options.dtype_name}, {self.source.text.num_layers} layers, opset {options.opset}, {options.kv_cache} KV cache"

    def module(self) -> nn.Module:
        """In the source model's own weights: converted in place when the source was loaded in
        another dtype (load it in the export dtype: a float32 copy of a 7B decoder would not
        fit next to it in 24 GB)."""
        decoder = (DecoderWithStaticCache if self.static else DecoderWithPast)(self.source.model).eval()
        if next(decoder.parameters()).dtype != self.options.dtype:
            decoder = decoder.to(self.options.dtype)
        return decoder

    def sample_inputs(self) -> tuple:
        return trace_sample(self.source, self.options.dtype, self.options.kv_cache)

    @property
    def streamed(self) -> bool:
        """The source's decoder weights are still in the checkpoint (load_source stream_decoder):
        the graph is traced on meta and quantized as the weights are read (streamed.py)."""
        return self.source.tensors is not None

    def write(self, stage: Path, progress: Progress) -> Path:
        if self.streamed:
            from exporter.graphs.streamed import write_streamed_decoder

            return write_streamed_decoder(self, stage, progress)
        return super().write(stage, progress)

    def check_options(self) -> None:
        """--quant and the KV cache options, before any work; fills in the static layout's
        default buffer length. A streamed source takes --quant, float32 (either KV layout) and
        no parity check (its float weights are never all in memory)."""
        quant, size = self.options.quant, self.options.block_size
        if quant:
            quantize.check_quant(quant)
        if size is not None and quant not in quantize.QUANT_BITS:
            raise LlavaError("--block-size sets --quant's blocks: give --quant int8|int4 with it")
        if size is not None and (size < 16 or size & (size - 1)):  # MatMulNBits' requirement
            raise LlavaError(f"--block-size must be a power of two >= 16, not {size}")
        if quant == integer_matmul.QUANT and self.options.fp16:
            raise LlavaError("--quant w8a8 computes in float32 on the CPU: export without --fp16")
        if self.streamed and (not self.options.quant or self.options.fp16):
            raise LlavaError("a streamed decoder export takes --quant int4|int8|w8a8 and float32")
        if self.streamed and self.options.verify:
            raise LlavaError(
                "a streamed decoder export cannot run its parity check: the float model is not loaded"
            )
        max_seq_len = check_kv_cache(self.source, self.options.kv_cache, self.options.max_seq_len)
        self.options = dataclasses.replace(self.options, max_seq_len=max_seq_len)

    def rewrite(self, path: Path, progress: Progress) -> None:
        """--quant: the linear layers to int8/int4 MatMulNBits (quantize.py) or w8a8
        MatMulInteger (integer_matmul.py); the static layout's norms and rotary to ONNX
        Runtime's fused kernels (fusions.py), in the same write when both apply. A streamed
        graph had both as it was written."""
        quant = self.options.quant
        if self.streamed or not (quant or self.static):
            return
        counts: dict[str, int] = {}

        def fuse(model) -> None:  # on the onnx_ir graph, before it is written
            counts.update(fusions.fuse_static_decoder(model, self.rotary_caches()))

        finish = fuse if self.static else None
        if quant:
            with progress.stage(f"quantizing the linear layers to {quant} ({quantize.QUANT_OPS[quant]})"):
                if quant == integer_matmul.QUANT:
                    stats = quantize.integer_decoder(path, path, finish)
                else:
                    stats = quantize.quantize_decoder(
                        path, path, quantize.quant_bits(quant), self.options.block_size, finish=finish
                    )
            progress.say(f"  {stats.summary()}")
        else:
            with progress.stage(fusions.STAGE):
                fusions.rewrite_file(path, fuse)
        if counts:
            progress.say(f"  {fusions.summary(counts)}")

    def rotary_caches(self):
        """The static layout's cos/sin caches for its max_seq_len positions (fusions.py)."""
        language_model = self.source.model.model.language_model
        return fusions.rotary_caches(language_model, self.options.max_seq_len, self.options.dtype)

    def add_companions(self, stage: Path, manifest: Manifest, progress: Progress) -> list[str]:
        with progress.stage("writing token embeddings and tokenizer"):
            manifest.embeddings = write_embeddings(self.source, stage, self.options.dtype_name)
            tokens = save_tokenizer(self.source.tokenizer_dir, stage)
        manifest.tokens = TokenSpec(bos=tokens["bos"], eos=tokens["eos"], pad=tokens["pad"])
        return [name for name in COMPANION_FILES if (stage / name).exists()]

    def graph_spec(self, sha256: str) -> contract.GraphSpec:
        options = self.options
        return dataclasses.replace(
            super().graph_spec(sha256),
            quant=options.quant,
            kv_cache=options.kv_cache,
            max_seq_len=options.max_seq_len,
        )

    def parity(self, path: Path) -> list[parity.OutputParity]:
        """The graph against DecoderWithPast (in the dtype the source was loaded in): a left-
        padded prefill (PARITY_LENGTHS), then PARITY_DECODE_STEPS decode steps; compares the
        logits of every step and the last step's cache at real positions.

        A weight-quantized graph is held to parity.QUANT_MIN_COSINE against a reference whose
        linear layers carry the very weights the graph stores (quantize.quantized_linears): what
        is left is the op's own arithmetic (int8 activations: in blocks of K at MatMulNBits'
        accuracy level 4, per token at w8a8). Its logits
        are also set against the unquantized weights (cosine, top-1 agreement): what the
        quantization costs, reported and not gated."""
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        decoder = DecoderWithPast(self.source.model).eval()
        quant = self.options.quant
        with (
            quantize.quantized_linears(decoder, quantize.reference_rounding(path, quant))
            if quant
            else contextlib.nullcontext()
        ):
            steps = self.run_steps(session, decoder)
        results = [
            parity.compare(
                f"logits step {number}", step.actual[0], step.expected[0].numpy(), min_cosine=self.min_cosine
            )
            for number, step in enumerate(steps)
        ]
        names = contract.decoder_output_names(self.source.text.num_layers)
        results += compare_cache(steps[-1], names[1:], self.min_cosine)
        if quant:
            results += quantization_effect(decoder, steps, self.options.dtype_name)
        return results

    def run_steps(self, session, decoder: DecoderWithPast) -> list[ParityStep]:
        """Runs the graph and the reference on the same inputs, step by step: each decode step
        feeds both the reference's present as past and the embedding of its argmax. A static
        layout's past goes in buffers with PARITY_SPARE_COLUMNS after the live ones."""
        text, dtype_name = self.source.text, self.options.dtype_name
        names = contract.decoder_output_names(text.num_layers)
        generator = torch.Generator().manual_seed(1)
        width = max(PARITY_LENGTHS)
        embeds = torch.randn(len(PARITY_LENGTHS), width, text.hidden_size, generator=generator)
        mask = left_padded_mask(PARITY_LENGTHS, width)
        past = empty_past(self.source, len(PARITY_LENGTHS), torch.float32)
        buffer = width + PARITY_DECODE_STEPS + PARITY_SPARE_COLUMNS
        steps = []
        for _ in range(PARITY_DECODE_STEPS + 1):
            positions = positions_from_mask(mask, embeds.shape[1])
            expected = run_reference(decoder, embeds, mask, positions, past)
            fed_past = in_buffers(past, buffer) if self.static else past
            actual = session.run(names, graph_feed(embeds, mask, positions, fed_past, dtype_name))
            if self.static:
                actual[1:] = [present[:, :, : mask.shape[1]] for present in actual[1:]]  # the live columns
            steps.append(ParityStep((embeds, mask, positions, past), actual, expected))
            past = list(zip(expected[1::2], expected[2::2]))  # [(key, value)] per layer
            embeds = self.source.model.get_input_embeddings()(expected[0].argmax(-1))[:, None].float()
            mask = torch.cat([mask, torch.ones(len(PARITY_LENGTHS), 1, dtype=torch.long)], dim=1)
        return steps


def run_reference(decoder: DecoderWithPast, embeds, mask, positions, past) -> list[torch.Tensor]:
    """The reference's logits and presents in float32, its float inputs cast to its dtype."""
    dtype = next(decoder.parameters()).dtype
    with torch.no_grad():
        outputs = decoder(embeds.to(dtype), mask, positions, [(k.to(dtype), v.to(dtype)) for k, v in past])
    return [t.float() for t in outputs]


def graph_feed(embeds, mask, positions, past, dtype_name: str) -> dict[str, np.ndarray]:
    """The graph's inputs, its floats in the graph dtype."""
    feed = {
        contract.INPUTS_EMBEDS: embeds.numpy().astype(dtype_name),
        contract.ATTENTION_MASK: mask.numpy(),
        contract.POSITION_IDS: positions.numpy(),
    }
    for layer, (key, value) in enumerate(past):
        feed[contract.past_key_name(layer)] = key.numpy().astype(dtype_name)
        feed[contract.past_value_name(layer)] = value.numpy().astype(dtype_name)
    return feed


def compare_cache(step: ParityStep, names: list[str], min_cosine: float) -> list[parity.OutputParity]:
    """The step's presents (`names`), graph against reference, at its real (unpadded) positions."""
    real = step.inputs[1].bool().numpy()  # [B, P+S]: the positions the presents cover
    results = []
    for name, actual, expected in zip(names, step.actual[1:], step.expected[1:]):
        # [B,kv,P+S,hd] -> [real tokens, kv, hd]
        kept = np.moveaxis(actual, 2, 1)[real], np.moveaxis(expected.numpy(), 2, 1)[real]
        results.append(parity.compare(name, kept[0], kept[1], min_cosine=min_cosine))
    return results


def quantization_effect(
    decoder: DecoderWithPast, steps: list[ParityStep], dtype_name: str
) -> list[parity.OutputParity]:
    """Each step's graph logits against the reference with its unquantized weights: reported
    beside the gate (cosine, top-1 agreement), not gated."""
    results = []
    for number, step in enumerate(steps):
        effect = parity.compare(
            f"logits step {number} vs {dtype_name} weights",
            step.actual[0],
            run_reference(decoder, *step.inputs)[0].numpy(),
            top1=True,
        )
        results.append(dataclasses.replace(effect, gated=False))
    return results


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


def write_embeddings(source: LlavaSource, folder: Path, dtype_name: str) -> dict:
    """embed_tokens.npy [vocab, hidden] in the graph dtype; the runtime memory-maps it."""
    if source.tensors is not None:  # streamed: still in the checkpoint
        weight = source.tensors.get("model.language_model.embed_tokens.weight")
    else:
        weight = source.model.get_input_embeddings().weight.detach()
    array = weight.to(getattr(torch, dtype_name)).numpy()
    np.save(folder / contract.EMBEDDINGS_FILE, array)
    return {"file": contract.EMBEDDINGS_FILE, "dtype": dtype_name, "shape": list(array.shape)}


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
    block_size: int | None = None,
) -> dict[str, float]:
    """Writes decoder.onnx, embed_tokens.npy and the tokenizer into `out`; updates the manifest;
    returns the parity figures (empty when `verify` is off).

    The source should be loaded in the export dtype (float16 for --fp16; DecoderGraph.module).
    `quant` ("int8" | "int4") quantizes the linear layers' weights (exporter/graphs/quantize.py)
    after tracing, in blocks of `block_size` weights (None: quantize.DEFAULT_BLOCK_SIZE); the
    parity gate is then parity.QUANT_MIN_COSINE[quant]. `kv_cache` "static"
    writes the static layout (static_kv.py) whose runtime buffers hold `max_seq_len` positions
    (recorded in the manifest).
    """
    options = ExportOptions(
        fp16=fp16,
        opset=opset,
        force=force,
        verify=verify,
        template=template,
        quant=quant,
        block_size=block_size,
        kv_cache=kv_cache,
        max_seq_len=max_seq_len,
    )
    return export_graph(DecoderGraph(source, options), out, progress)
