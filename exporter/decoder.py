"""`llava-export decoder`: the language model with past-key-value I/O, plus the token
embeddings and the tokenizer.

    inputs_embeds  [B,S,hidden]                 attention_mask [B,P+S] int64 (left padding)
    position_ids   [B,S] int64                  past_key_values.{i}.key|value [B,kv,P,hd]
 -> logits [B,vocab] float32 (last position only), present.{i}.key|value [B,kv,P+S,hd]

One graph serves prefill (P = 0) and decode (S = 1). Logits cover only the last position:
generation needs nothing else, and every position of a 600-token prompt times a 32k vocabulary
would be 77 MB of float32 per sequence for nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exporter import onnx_io, parity, quantize
from exporter.manifest import open_manifest
from exporter.progress import Progress
from exporter.source import LlavaSource
from exporter.tokenizer import save_tokenizer
from runtime import contract
from runtime.contract import GraphSpec, TokenSpec

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


def dynamic_shapes(num_layers: int) -> dict:
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence")
    past = torch.export.Dim("past_sequence")
    total = torch.export.Dim("total_sequence")
    return {
        "inputs_embeds": {0: batch, 1: sequence},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: sequence},
        "past_key_values": [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(num_layers)],
    }


def io_spec(source: LlavaSource) -> tuple[dict, dict]:
    text = source.text
    kv = ["batch", text.num_kv_heads, "past_sequence", text.head_dim]
    present = ["batch", text.num_kv_heads, "total_sequence", text.head_dim]
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
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(source.text.num_layers)]


def trace_sample(source: LlavaSource, dtype: torch.dtype):
    """Arguments to trace with: B=2, S=3, P=2 (sizes 0 and 1 would be specialised)."""
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 3, source.text.hidden_size, generator=generator).to(dtype)
    mask = torch.ones(2, 5, dtype=torch.long)
    positions = positions_from_mask(mask, 3)
    past = [(k.normal_(generator=generator), v.normal_(generator=generator)) for k, v in empty_past(source, 2, torch.float32, 2)]
    past = [(k.to(dtype), v.to(dtype)) for k, v in past]
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
) -> dict[str, float]:
    """Writes decoder.onnx, embed_tokens.npy and the tokenizer into `out`; updates the manifest.

    The source should be loaded in the export dtype (float16 for --fp16): a float32 copy of a
    7B decoder would not fit next to it in 24 GB. `quant` ("int8" | "int4") quantizes the linear
    layers' weights (exporter/quantize.py) after tracing; the parity gate is then
    parity.QUANT_MIN_COSINE[quant].
    """
    progress = progress or Progress()
    bits = quantize.quant_bits(quant) if quant else None  # a bad value fails before any work
    onnx_io.check_writable(out)
    manifest = open_manifest(out, source, force, template)
    dtype_name = "float16" if fp16 else "float32"
    dtype = getattr(torch, dtype_name)
    decoder = DecoderWithPast(source.model).eval()
    if next(decoder.parameters()).dtype != dtype:
        decoder = decoder.to(dtype)  # in place: load the source in the export dtype to avoid this
    with onnx_io.staging(out, "decoder") as stage:
        with progress.stage(f"tracing the decoder graph ({dtype_name}, {source.text.num_layers} layers, opset {opset})"):
            program = onnx_io.trace_to_onnx(
                decoder,
                trace_sample(source, dtype),
                dynamic_shapes=dynamic_shapes(source.text.num_layers),
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
    inputs, outputs = io_spec(source)
    manifest.graphs["decoder"] = GraphSpec(contract.DECODER_FILE, dtype_name, opset, inputs, outputs, sha, quant=quant)
    manifest.embeddings = embeddings
    manifest.tokens = TokenSpec(bos=tokens["bos"], eos=tokens["eos"], pad=tokens["pad"])
    manifest.parity["decoder"] = parity.summary(results)
    contract.write_manifest(out, manifest)
    return manifest.parity["decoder"]


def write_embeddings(source: LlavaSource, folder: Path, dtype_name: str) -> dict:
    """embed_tokens.npy [vocab, hidden] in the graph dtype; the runtime memory-maps it."""
    weight = source.model.get_input_embeddings().weight.detach()
    array = weight.to(getattr(torch, dtype_name)).numpy()
    np.save(folder / contract.EMBEDDINGS_FILE, array)
    return {"file": contract.EMBEDDINGS_FILE, "dtype": dtype_name, "shape": list(array.shape)}


def decoder_parity(source: LlavaSource, path: Path, dtype_name: str, steps: int = 2, quant: str | None = None) -> list[parity.OutputParity]:
    """The graph at `path` against PyTorch (in the dtype the source was loaded in): prefill a
    left-padded batch of 2 (lengths 6 and 4), then `steps` decode steps feeding the reference's
    present back as past; compares logits every step and the final cache at real positions.

    A weight-quantized graph (`quant`) is held to parity.QUANT_MIN_COSINE against a reference
    whose linear layers carry the very weights the graph stores (quantize.quantized_linears):
    what is left is MatMulNBits' own arithmetic (int8 activations at accuracy level 4). Its
    logits are also set against the unquantized weights (cosine, top-1 agreement): what the
    quantization costs, reported and not gated."""
    import onnxruntime as ort

    decoder = DecoderWithPast(source.model).eval()
    model_dtype = next(decoder.parameters()).dtype
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    min_cosine = parity.min_cosine_for(dtype_name, quant)
    names = contract.decoder_output_names(source.text.num_layers)

    def reference(embeds, mask, positions, past) -> list[torch.Tensor]:
        with torch.no_grad():
            return [t.float() for t in decoder(embeds.to(model_dtype), mask, positions, [(k.to(model_dtype), v.to(model_dtype)) for k, v in past])]

    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, 6, source.text.hidden_size, generator=generator)
    mask = left_padded_mask([6, 4], 6)
    past = empty_past(source, 2, torch.float32)
    results, steps_run = [], []
    with quantize.quantized_linears(decoder, *quantize.graph_settings(path)) if quant else contextlib.nullcontext():
        for step in range(steps + 1):
            positions = positions_from_mask(mask, embeds.shape[1])
            expected = reference(embeds, mask, positions, past)
            feed = {
                contract.INPUTS_EMBEDS: embeds.numpy().astype(dtype_name),
                contract.ATTENTION_MASK: mask.numpy(),
                contract.POSITION_IDS: positions.numpy(),
            }
            for layer, (key, value) in enumerate(past):
                feed[contract.past_key_name(layer)] = key.numpy().astype(dtype_name)
                feed[contract.past_value_name(layer)] = value.numpy().astype(dtype_name)
            actual = session.run(names, feed)
            results.append(parity.compare(f"logits step {step}", actual[0], expected[0].numpy(), min_cosine=min_cosine))
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
            effect = parity.compare(f"logits step {step} vs {dtype_name} weights", logits, reference(*inputs)[0].numpy(), top1=True)
            results.append(dataclasses.replace(effect, gated=False))
    return results
