"""The streamed quantized decoder (exporter/graphs/streamed.py): traced with placeholder
weights, each linear weight quantized as it is read from the checkpoint. It must be the very
graph the float export quantized afterwards gives (the same MatMulNBits blocks or w8a8 columns,
the same outputs bit for bit), for both source formats, every text family, tied embeddings,
int4, int8 and w8a8, without the source ever loading a decoder weight. `llava-export all --quant` streams the same decoder and
reads only the vision side into memory: its vision graph is the float export's."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from exporter.graphs import streamed as streamed_module  # noqa: E402
from exporter.graphs.decoder import DecoderGraph, export_decoder, trace_sample  # noqa: E402
from exporter.graphs.export import ExportOptions, export_graph  # noqa: E402
from exporter.graphs.vision import VisionEncoder, export_vision, sample_pixels  # noqa: E402
from exporter.progress import Progress  # noqa: E402
from exporter.source import load_source, load_vision_weights  # noqa: E402
from exporter.testing.tiny import TINY_PINPOINTS, TinyConfig  # noqa: E402
from runtime import contract  # noqa: E402
from runtime.errors import LlavaError  # noqa: E402
from tests.support.cli import invoke  # noqa: E402
from tests.support.fixtures import gradient_pictures  # noqa: E402
from tests.support.graphs import assert_same_weights  # noqa: E402

CASES = {
    "llama-hf-int4": (TinyConfig(), "hf", "int4"),
    "llama-original-int8": (TinyConfig(), "original", "int8"),
    "mistral-hf-int8": (TinyConfig(family="mistral"), "hf", "int8"),
    "qwen2-original-int4": (TinyConfig(family="qwen2"), "original", "int4"),  # q/k/v biases
    "tied-hf-int4": (TinyConfig(tie_embeddings=True), "hf", "int4"),  # lm_head is embed_tokens
    "llama-hf-w8a8": (TinyConfig(), "hf", "w8a8"),  # MatMulInteger, integer_matmul.py
    "qwen2-original-w8a8": (TinyConfig(family="qwen2"), "original", "w8a8"),
}

NEXT = TinyConfig(anyres=TINY_PINPOINTS)
# The vision side of each format: the original format's 1.5 tower comes from the separate CLIP
# checkpoint, its 1.6 tower from the checkpoint itself (unfreeze_mm_vision_tower); HF 1.6 holds
# image_newline outside the model.
VISION_SIDES = {
    "llava-hf": (TinyConfig(), "hf"),
    "llava-original": (TinyConfig(), "original"),
    "next-hf": (NEXT, "hf"),
    "next-original": (NEXT, "original"),
}
DECODER_WEIGHTS = ("model.language_model.", "lm_head.")
PROMPT = "What is in the picture?"


def run(folder, feed) -> list[np.ndarray]:
    return ort.InferenceSession(str(folder / contract.DECODER_FILE), providers=["CPUExecutionProvider"]).run(
        None, feed
    )


def sample_feed(source) -> dict[str, np.ndarray]:
    embeds, mask, positions, past = trace_sample(source, torch.float32)
    feed = {
        contract.INPUTS_EMBEDS: embeds.numpy(),
        contract.ATTENTION_MASK: mask.numpy(),
        contract.POSITION_IDS: positions.numpy(),
    }
    for layer, (key, value) in enumerate(past):
        feed[contract.past_key_name(layer)] = key.numpy()
        feed[contract.past_value_name(layer)] = value.numpy()
    return feed


@pytest.mark.parametrize("case", list(CASES))
def test_the_streamed_graph_is_the_float_export_quantized(workshop, tmp_path, case):
    config, fmt, quant = CASES[case]
    folder = workshop.tiny(config)[fmt]
    loaded = load_source(str(folder))
    export_decoder(loaded, tmp_path / "after", quant=quant, verify=False, progress=Progress(quiet=True))

    streamed = load_source(str(folder), stream_decoder=True)
    assert all(p.is_meta for p in streamed.model.parameters())  # no weight was loaded
    options = ExportOptions(quant=quant, verify=False)
    export_graph(DecoderGraph(streamed, options), tmp_path / "streamed", Progress(quiet=True))

    feed = sample_feed(loaded)
    ours, theirs = run(tmp_path / "streamed", feed), run(tmp_path / "after", feed)
    assert len(ours) == len(theirs) == 1 + 2 * config.text_layers  # logits, each present
    for index, (mine, reference) in enumerate(zip(ours, theirs)):
        np.testing.assert_array_equal(mine, reference, err_msg=f"output {index}")
    embeddings = contract.EMBEDDINGS_FILE
    assert np.array_equal(
        np.load(tmp_path / "streamed" / embeddings), np.load(tmp_path / "after" / embeddings)
    )
    ours, theirs = (contract.read_manifest(tmp_path / side) for side in ("streamed", "after"))
    assert (
        ours.graphs["decoder"].quant == quant
        and ours.graphs["decoder"].inputs == theirs.graphs["decoder"].inputs
    )
    assert ours.source["weights_sha256"] == theirs.source["weights_sha256"]


def test_llava_export_decoder_quant_streams_and_verify_checks_it(workshop, tmp_path):
    folder, out = workshop.tiny()["hf"], tmp_path / "out"
    result = invoke("decoder", "--model", folder, "--out", out, "--quant", "int4")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "tracing the decoder graph without its weights" in result.output
    assert "parity: not run" in result.output and "llava-export verify" in result.output
    assert json.loads((out / contract.MANIFEST_FILE).read_text())["graphs"]["decoder"]["quant"] == "int4"
    checked = invoke("verify", "--model", folder, "--artifacts", out)
    assert checked.exit_code == 0 and "all outputs within tolerance" in checked.output, checked.output


@pytest.mark.parametrize("case", ["llama-hf-int4", "qwen2-original-int4", "mistral-hf-int8", "llama-hf-w8a8"])
def test_the_streamed_static_kv_graph_is_the_float_export_quantized(workshop, tmp_path, case):
    """--kv-cache static: GroupQueryAttention on preallocated buffers, a symbolic op that the
    meta device could not trace beside it; with placeholder weights the same graph bit for bit."""
    config, fmt, quant = CASES[case]
    folder = workshop.tiny(config)[fmt]
    static = {"kv_cache": contract.KV_STATIC, "max_seq_len": 16}
    loaded = load_source(str(folder))
    export_decoder(
        loaded, tmp_path / "after", quant=quant, verify=False, progress=Progress(quiet=True), **static
    )
    streamed = load_source(str(folder), stream_decoder=True)
    options = ExportOptions(quant=quant, verify=False, **static)
    export_graph(DecoderGraph(streamed, options), tmp_path / "streamed", Progress(quiet=True))

    # one decode step of one row (GroupQueryAttention takes a batch of 1 past a prefill)
    embeds, mask, positions, past = trace_sample(loaded, torch.float32, contract.KV_STATIC)
    feed = {
        contract.INPUTS_EMBEDS: embeds[:1, :1].numpy(),
        contract.ATTENTION_MASK: mask[:1, :3].numpy(),
        contract.POSITION_IDS: positions[:1, :1].numpy(),
    }
    for layer, (key, value) in enumerate(past):
        feed[contract.past_key_name(layer)] = key[:1].numpy()
        feed[contract.past_value_name(layer)] = value[:1].numpy()
    ours, theirs = run(tmp_path / "streamed", feed), run(tmp_path / "after", feed)
    assert len(ours) == len(theirs) == 1 + 2 * config.text_layers
    for index, (mine, reference) in enumerate(zip(ours, theirs)):
        np.testing.assert_array_equal(mine, reference, err_msg=f"output {index}")
    manifest = contract.read_manifest(tmp_path / "streamed")
    assert (
        manifest.graphs["decoder"].kv_cache == contract.KV_STATIC
        and manifest.graphs["decoder"].quant == quant
    )


def test_placeholders_hold_one_value_whatever_their_shape():
    """A 7B lm_head's placeholder stores 4 bytes, and only placeholders count as such."""
    weight = torch.empty(32064, 4096, device="meta")
    module = torch.nn.Linear(4096, 32064, bias=False, device="meta")
    streamed_module.placeholders(module)
    held = module.weight
    assert held.shape == weight.shape and held.device.type == "cpu" and held.untyped_storage().nbytes() == 4

    class Wrapped:  # onnx_ir's TorchTensor keeps the traced tensor as .raw
        def __init__(self, raw):
            self.raw = raw

    assert streamed_module.is_placeholder(Wrapped(held))
    assert not streamed_module.is_placeholder(Wrapped(torch.zeros(3, 4)))
    assert not streamed_module.is_placeholder(Wrapped(torch.zeros(1)))  # a real one-element weight
    with pytest.raises(LlavaError, match="cannot be streamed"):
        streamed_module.placeholders(torch.nn.Linear(1, 1, bias=False, device="meta"))


def test_a_streamed_source_takes_only_a_float32_quantized_export_without_parity(workshop, tmp_path):
    streamed = load_source(str(workshop.tiny()["hf"]), stream_decoder=True)
    for options, message in [
        (ExportOptions(verify=False), "takes --quant"),
        (ExportOptions(quant="int4", fp16=True, verify=False), "float32"),
        (ExportOptions(quant="int4"), "cannot run its parity check"),
    ]:
        with pytest.raises(LlavaError, match=message):
            export_graph(DecoderGraph(streamed, options), tmp_path / "out", Progress(quiet=True))
    assert not (tmp_path / "out" / contract.DECODER_FILE).exists()


# ---------------------------------------------------------------------------------------------
# `llava-export all --quant`: the vision side in memory, the decoder streamed


@pytest.mark.parametrize("case", list(VISION_SIDES))
def test_load_vision_weights_reads_the_vision_side_as_the_loaded_source_has_it(workshop, monkeypatch, case):
    config, fmt = VISION_SIDES[case]
    folder = workshop.tiny(config)[fmt]
    loaded = load_source(str(folder))
    streamed = load_source(str(folder), stream_decoder=True)
    read = []
    get = streamed.tensors.get
    monkeypatch.setattr(streamed.tensors, "get", lambda name: read.append(name) or get(name))
    load_vision_weights(streamed)

    ours, theirs = streamed.model.model, loaded.model.model
    assert_same_weights(ours.vision_tower, theirs.vision_tower)
    assert_same_weights(ours.multi_modal_projector, theirs.multi_modal_projector)
    buffers = dict(ours.vision_tower.named_buffers())  # CLIP's position_ids: in no checkpoint
    assert buffers and buffers.keys() == dict(theirs.vision_tower.named_buffers()).keys()
    assert all(torch.equal(buffers[name], value) for name, value in theirs.vision_tower.named_buffers())
    if config.anyres is not None:
        assert torch.equal(ours.image_newline, theirs.image_newline)
    pixels = sample_pixels(loaded, 2)
    with torch.no_grad():  # the same modules: eager attention included
        assert torch.equal(VisionEncoder.of(streamed)(pixels), VisionEncoder.of(loaded)(pixels))

    vision = itertools.chain(ours.vision_tower.state_dict().values(), ours.multi_modal_projector.parameters())
    assert all(t.device.type == "cpu" and not t.requires_grad for t in vision)
    decoder = [*ours.language_model.parameters(), *streamed.model.lm_head.parameters()]
    assert decoder and all(p.is_meta for p in decoder)  # the float decoder was not materialized
    assert read and not [name for name in read if name.startswith(DECODER_WEIGHTS)]


def watch_the_decoder(monkeypatch) -> dict:
    """Records, for an export in this process, each name read from a checkpoint and, when the
    streamed decoder is written, what had been read by then, whether the language model and
    lm_head were all still on meta and whether the vision side was released to it."""
    seen = {"read": []}
    get, write = streamed_module.CheckpointTensors.get, streamed_module.write_streamed_decoder

    def counted_get(self, name):
        seen["read"].append(name)
        return get(self, name)

    def watched_write(graph, stage, progress):
        model = graph.source.model
        seen["before_decoder"] = list(seen["read"])
        weights = [*model.model.language_model.parameters(), *model.lm_head.parameters()]
        seen["decoder_on_meta"] = all(p.is_meta for p in weights)
        seen["vision_released"] = all(p.is_meta for p in model.parameters())
        return write(graph, stage, progress)

    monkeypatch.setattr(streamed_module.CheckpointTensors, "get", counted_get)
    monkeypatch.setattr(streamed_module, "write_streamed_decoder", watched_write)
    return seen


def export_all_streamed(folder, out, quant: str, monkeypatch):
    """`llava-export all --quant QUANT` through the CLI; checks it streamed the decoder (and only
    it) and kept the vision graph's parity check. Returns the output."""
    seen = watch_the_decoder(monkeypatch)
    result = invoke("all", "--model", folder, "--out", out, "--quant", quant)
    assert result.exit_code == 0, (result.output, result.exception)
    output = result.output
    assert "reading the vision tower and projector" in output
    assert "parity vision vs PyTorch" in output and "parity decoder" not in output
    assert "parity: not run" in output and f"llava-export verify --model {folder}" in output
    assert "tracing the decoder graph without its weights" in output
    assert seen["decoder_on_meta"], "the float decoder was materialized"
    assert seen["vision_released"], "the vision weights stayed in memory for the decoder export"
    before = seen["before_decoder"]
    assert before and not [name for name in before if name.startswith(DECODER_WEIGHTS)]
    manifest = contract.read_manifest(out)
    assert manifest.graphs["decoder"].quant == quant and manifest.graphs["vision"].quant is None
    assert manifest.parity["vision"] and not manifest.parity["decoder"]
    return output


def same_bytes(a, b, *names: str) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_all_quant_streams_and_answers_as_the_float_export_quantized(workshop, tmp_path, monkeypatch):
    """LLaVA-1.6 from the HF format, int4: the vision graph and image_newline as today's export
    (the float model loaded, its decoder quantized after) writes them, the decoder's outputs bit
    for bit its, and the same greedy answer through the runtime."""
    from runtime.pipeline import Pipeline

    folder, out, today = workshop.tiny(NEXT)["hf"], tmp_path / "streamed", tmp_path / "today"
    loaded = load_source(str(folder))
    export_vision(loaded, today, progress=Progress(quiet=True))
    export_decoder(loaded, today, quant="int4", verify=False, progress=Progress(quiet=True))
    export_all_streamed(folder, out, "int4", monkeypatch)

    same_bytes(out, today, contract.VISION_FILE, contract.IMAGE_NEWLINE_FILE, contract.EMBEDDINGS_FILE)
    feed = sample_feed(loaded)
    for index, (mine, reference) in enumerate(zip(run(out, feed), run(today, feed))):
        np.testing.assert_array_equal(mine, reference, err_msg=f"output {index}")
    (picture,) = gradient_pictures({"wide": (40, 72)}).values()  # a grid of several tiles
    answers = []
    for side in (out, today):
        with Pipeline.load(side) as pipe:
            answers.append(pipe.generate(PROMPT, [picture], max_new_tokens=8).token_ids)
    assert len(answers[0]) == 8 and answers[0] == answers[1]


def test_all_quant_is_the_vision_export_beside_the_streamed_decoder_export(workshop, tmp_path, monkeypatch):
    """LLaVA-1.5 in the original format (the tower from its separate CLIP checkpoint), int8:
    `llava-export vision`'s graph of the loaded model and `llava-export decoder --quant`'s files."""
    folder, out = workshop.tiny()["original"], tmp_path / "streamed"
    export_vision(load_source(str(folder)), tmp_path / "vision", progress=Progress(quiet=True))
    decoder = invoke(
        "decoder", "--model", folder, "--out", tmp_path / "decoder", "--quant", "int8", "--quiet"
    )
    assert decoder.exit_code == 0, (decoder.output, decoder.exception)
    export_all_streamed(folder, out, "int8", monkeypatch)

    same_bytes(out, tmp_path / "vision", contract.VISION_FILE)
    same_bytes(
        out,
        tmp_path / "decoder",
        contract.DECODER_FILE,
        contract.EMBEDDINGS_FILE,
        contract.TOKENIZER_FILE,
        contract.TOKENIZER_CONFIG_FILE,
    )
