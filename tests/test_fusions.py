"""The static layout on ONNX Runtime's fused kernels (exporter/graphs/fusions.py): each residual
Add + RMSNorm becomes SkipSimplifiedLayerNormalization and each rotary a RotaryEmbedding, the
graph's outputs stay those of the traced ops (a left-padded batch's prefill, whose rows sit at
different positions, and a decode step), the export's parity gate passes in float32 and
float16, the caches are the model's own rotary, and the concat layout (TensorRT's) keeps
standard ONNX ops only. parity_tests/test_static_kv.py runs the fused graphs' greedy tokens
against transformers."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from exporter.graphs import fusions  # noqa: E402
from exporter.graphs.decoder import export_decoder, positions_from_mask  # noqa: E402
from exporter.progress import Progress  # noqa: E402
from exporter.source import load_source  # noqa: E402
from exporter.testing.tiny import TinyConfig  # noqa: E402
from runtime import contract  # noqa: E402

BUFFER = 16
TRACED_ROTARY_OPS = ("Neg", "Slice", "Sin", "Cos")  # rotate_half and the angles: gone when fused


def op_counts(folder) -> collections.Counter:
    graph = onnx.load(str(folder / contract.DECODER_FILE), load_external_data=False).graph
    return collections.Counter(node.op_type for node in graph.node)


def export_static(source, out, **options):
    export_decoder(
        source, out, progress=Progress(quiet=True), kv_cache=contract.KV_STATIC, max_seq_len=BUFFER, **options
    )
    return out


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("quant", [None, "w8a8", "int4"])
def test_the_static_layout_runs_fused_norms_and_rotary_and_passes_parity(workshop, tmp_path, quant, fp16):
    if quant == "w8a8" and fp16:
        pytest.skip("w8a8 is float32 only")
    config = TinyConfig()
    source = load_source(str(workshop.tiny(config)["hf"]))
    export_static(source, tmp_path, quant=quant, fp16=fp16)  # raises unless parity passed
    ops = op_counts(tmp_path)
    layers = config.text_layers
    # every norm but layer 0's first (it follows no residual Add); a q and a k rotary per layer
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert ops["RotaryEmbedding"] == 2 * layers and ops["GroupQueryAttention"] == layers
    assert ops["Pow"] == ops["Sqrt"] == 1
    assert not any(ops[op] for op in TRACED_ROTARY_OPS), ops


def test_fusing_keeps_the_outputs_of_a_left_padded_prefill_and_a_decode_step(workshop, tmp_path, monkeypatch):
    """The same graph exported unfused (fuse_static_decoder a no-op) and fused: one left-padded batch of
    two prompts (rows at different positions for the same columns), then a decode step of both
    rows from the prefill's cache."""
    source = load_source(str(workshop.tiny()["hf"]))
    fused = export_static(source, tmp_path / "fused", verify=False)
    with monkeypatch.context() as patched:
        unfused = collections.defaultdict(int)
        patched.setattr(fusions, "fuse_static_decoder", lambda model, caches: unfused)
        traced = export_static(source, tmp_path / "traced", verify=False)
    assert op_counts(traced)["RotaryEmbedding"] == 0 and op_counts(fused)["RotaryEmbedding"] > 0

    sessions = [
        ort.InferenceSession(str(folder / contract.DECODER_FILE), providers=["CPUExecutionProvider"])
        for folder in (fused, traced)
    ]
    text = source.text
    generator = np.random.default_rng(3)
    mask = np.array([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int64)  # row 0: 3 columns of padding
    empty = np.zeros((2, text.num_kv_heads, BUFFER, text.head_dim), np.float32)
    prefill = {
        contract.INPUTS_EMBEDS: generator.standard_normal((2, 6, text.hidden_size)).astype(np.float32),
        contract.ATTENTION_MASK: mask,
        contract.POSITION_IDS: positions_from_mask(torch.from_numpy(mask), 6).numpy(),
    }
    for layer in range(text.num_layers):
        prefill[contract.past_key_name(layer)] = prefill[contract.past_value_name(layer)] = empty
    ours, theirs = (session.run(None, prefill) for session in sessions)
    assert_same(ours, theirs, live=6)

    step = dict(prefill)
    step[contract.INPUTS_EMBEDS] = generator.standard_normal((2, 1, text.hidden_size)).astype(np.float32)
    step[contract.ATTENTION_MASK] = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    step[contract.POSITION_IDS] = positions_from_mask(
        torch.from_numpy(step[contract.ATTENTION_MASK]), 1
    ).numpy()
    for layer in range(text.num_layers):  # the traced graph's own cache, for both
        step[contract.past_key_name(layer)] = theirs[1 + 2 * layer]
        step[contract.past_value_name(layer)] = theirs[2 + 2 * layer]
    ours, theirs = (session.run(None, step) for session in sessions)
    assert_same(ours, theirs, live=7)


def assert_same(ours, theirs, live: int) -> None:
    """Logits, and each present's `live` columns (a prefill row's padding columns included:
    the cache holds whatever the row computed there, and the mask hides it)."""
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5, err_msg="logits")
    for index, (mine, reference) in enumerate(zip(ours[1:], theirs[1:]), start=1):
        np.testing.assert_allclose(
            mine[:, :, :live], reference[:, :, :live], rtol=1e-5, atol=1e-5, err_msg=f"present {index}"
        )


def test_the_caches_are_the_models_rotary(workshop):
    language_model = load_source(str(workshop.tiny()["hf"])).model.model.language_model
    cos, sin = fusions.rotary_caches(language_model, BUFFER, torch.float32)
    positions = torch.arange(BUFFER)[None]
    expected = language_model.rotary_emb(torch.zeros(1), positions)  # [1, BUFFER, hd] each
    half = cos.shape[1]
    for ours, theirs in zip((cos, sin), expected):
        assert ours.shape == (BUFFER, theirs.shape[-1] // 2)
        np.testing.assert_array_equal(ours, theirs[0, :, :half].numpy())
        np.testing.assert_array_equal(ours, theirs[0, :, half:].numpy())  # rotate_half's layout


def test_a_rotary_that_depends_on_the_length_gets_no_cache(workshop):
    """Dynamic scaling changes the frequencies with the sequence length: the traced rotary stays."""
    language_model = load_source(str(workshop.tiny()["hf"])).model.model.language_model
    config = language_model.config
    config.rope_parameters = {**config.rope_parameters, "rope_type": "dynamic", "factor": 2.0}
    assert fusions.rotary_caches(language_model, BUFFER, torch.float32) is None


def test_the_concat_layout_keeps_standard_onnx_ops(workshop):
    """The concat layout is TensorRT's too: no com.microsoft op is put in."""
    folder = workshop.artifacts(TinyConfig())
    graph = onnx.load(str(folder / contract.DECODER_FILE), load_external_data=False).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}


def test_a_streamed_static_export_is_fused_and_verify_checks_it(workshop, tmp_path):
    """The 7B path: `decoder --quant` streams (no parity at export) and fuses; `verify` then runs
    the fused graph against PyTorch."""
    from tests.support.cli import invoke

    folder, out = workshop.tiny()["hf"], tmp_path / "out"
    static_w8a8 = ["--quant", "w8a8", "--kv-cache", "static", "--max-seq-len", "32"]
    result = invoke("decoder", "--model", folder, "--out", out, *static_w8a8)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "rotaries to RotaryEmbedding" in result.output
    assert op_counts(out)["RotaryEmbedding"] == 2 * TinyConfig().text_layers
    checked = invoke("verify", "--model", folder, "--artifacts", out)
    assert checked.exit_code == 0 and "all outputs within tolerance" in checked.output, checked.output
