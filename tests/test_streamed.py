"""The streamed quantized decoder (exporter/graphs/streamed.py): traced on the meta device,
each linear weight quantized as it is read from the checkpoint. It must be the very graph the
float export quantized afterwards gives (the same MatMulNBits blocks, the same outputs bit for
bit), for both source formats, every text family, tied embeddings, int4 and int8, without the
source ever loading a decoder weight."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from exporter.graphs.decoder import DecoderGraph, export_decoder, trace_sample  # noqa: E402
from exporter.graphs.export import ExportOptions, export_graph  # noqa: E402
from exporter.progress import Progress  # noqa: E402
from exporter.source import load_source  # noqa: E402
from exporter.testing.tiny import TinyConfig  # noqa: E402
from runtime import contract  # noqa: E402
from runtime.errors import LlavaError  # noqa: E402
from tests.support.cli import invoke  # noqa: E402

CASES = {
    "llama-hf-int4": (TinyConfig(), "hf", "int4"),
    "llama-original-int8": (TinyConfig(), "original", "int8"),
    "mistral-hf-int8": (TinyConfig(family="mistral"), "hf", "int8"),
    "qwen2-original-int4": (TinyConfig(family="qwen2"), "original", "int4"),  # q/k/v biases
    "tied-hf-int4": (TinyConfig(tie_embeddings=True), "hf", "int4"),  # lm_head is embed_tokens
}


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
    assert "tracing the decoder graph on the meta device" in result.output
    assert "parity: not run" in result.output and "llava-export verify" in result.output
    assert json.loads((out / contract.MANIFEST_FILE).read_text())["graphs"]["decoder"]["quant"] == "int4"
    checked = invoke("verify", "--model", folder, "--artifacts", out)
    assert checked.exit_code == 0 and "all outputs within tolerance" in checked.output, checked.output


def test_a_streamed_source_takes_only_a_float32_concat_quantized_export_without_parity(workshop, tmp_path):
    streamed = load_source(str(workshop.tiny()["hf"]), stream_decoder=True)
    for options, message in [
        (ExportOptions(verify=False), "takes --quant"),
        (ExportOptions(quant="int4", fp16=True, verify=False), "float32"),
        (ExportOptions(quant="int4", kv_cache=contract.KV_STATIC, verify=False), "concat KV cache"),
        (ExportOptions(quant="int4"), "cannot run its parity check"),
    ]:
        with pytest.raises(LlavaError, match=message):
            export_graph(DecoderGraph(streamed, options), tmp_path / "out", Progress(quiet=True))
    assert not (tmp_path / "out" / contract.DECODER_FILE).exists()
