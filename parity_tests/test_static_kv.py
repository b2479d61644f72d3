"""The static KV layout (`--kv-cache static`): preallocated buffers updated in place.

Greedy tokens of the runtime over a static-layout export equal those over the default concat
layout and transformers' own generate, at batch 1 and a left-padded batch of 2 (float32);
the buffers are written in place (the graph's presents come straight out of
GroupQueryAttention reading the past inputs; at run time each step writes into the very
buffers it was given); a request that would overflow them is a PromptError before any compute
(the backend declares the buffers' length in its Limits).

Near ties: as in test_generation_parity.py, tokens are compared up to the reference's first
step whose top-2 logit margin is below MARGIN_TOL (random weights give near-tied logits where
float round-off may flip the argmax); at least MIN_STEPS of NEW_TOKENS must be compared.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exporter.graphs.decoder import export_decoder  # noqa: E402
from exporter.graphs.vision import export_vision  # noqa: E402
from exporter.progress import Progress  # noqa: E402
from exporter.source import load_source  # noqa: E402
from exporter.testing.tiny import TinyConfig  # noqa: E402
from runtime import contract  # noqa: E402
from runtime.backends.ort import OrtBackend  # noqa: E402
from runtime.errors import PromptError  # noqa: E402
from runtime.generate import decode_one_token, generate, prefill  # noqa: E402
from tests.support.generation import greedy_with_margins  # noqa: E402
from tests.support.graphs import token_ids  # noqa: E402

DEFAULT = TinyConfig()  # llama, 4 heads sharing 2 KV heads
NEW_TOKENS = 20
MIN_STEPS = 16
MARGIN_TOL = 1e-3
BUFFER = 64  # room for the prompts below and NEW_TOKENS, with spare columns at the end
PROMPTS = [token_ids(13, seed=0), token_ids(8, seed=1)]  # left padding: the second row gets 5 columns


def export_static(workshop, factory, config: TinyConfig, max_seq_len: int = BUFFER, vision: bool = True):
    """`config`'s tiny model exported with --kv-cache static (and its vision graph: the runtime
    backend loads both)."""
    source = load_source(str(workshop.tiny(config)["hf"]))
    out = factory.mktemp("artifacts-static")
    if vision:
        export_vision(source, out, progress=Progress(quiet=True))
    export_decoder(
        source, out, progress=Progress(quiet=True), kv_cache=contract.KV_STATIC, max_seq_len=max_seq_len
    )
    return out


@pytest.fixture(scope="module")
def static_artifacts(workshop, tmp_path_factory):
    return export_static(workshop, tmp_path_factory, DEFAULT)


@pytest.fixture(scope="module")
def concat_artifacts(workshop):
    return workshop.artifacts(DEFAULT)


def runtime_tokens(folder, prompts: list[list[int]]) -> np.ndarray:
    """Greedy tokens [B, NEW_TOKENS] of runtime.generate over the ONNX Runtime backend."""
    table = np.load(folder / contract.EMBEDDINGS_FILE)
    with OrtBackend(folder, contract.read_manifest(folder)) as backend:
        steps = generate(backend, table, [table[ids] for ids in prompts], NEW_TOKENS, eos_ids=[])
        return np.array(list(steps)).T


def reference_tokens(model, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """transformers' greedy tokens [B, NEW_TOKENS] on the left-padded prompts, and each step's
    top-2 logit margin [B, NEW_TOKENS]. Padding holds token 3 (any id: the mask hides it; not
    0, the tiny model's image token)."""
    return greedy_with_margins(model, prompts, 3, NEW_TOKENS)


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_equal_concat_layout_and_pytorch(
    static_artifacts, concat_artifacts, workshop, batch, capsys
):
    prompts = PROMPTS[:batch]
    static = runtime_tokens(static_artifacts, prompts)
    concat = runtime_tokens(concat_artifacts, prompts)
    expected, margins = reference_tokens(workshop.reference(DEFAULT), prompts)
    for row in range(batch):
        near_ties = np.flatnonzero(margins[row] < MARGIN_TOL)
        steps = int(near_ties[0]) if near_ties.size else NEW_TOKENS
        assert steps >= MIN_STEPS, (
            f"row {row}: the reference's margin falls below {MARGIN_TOL} at step {steps}"
        )
        assert static[row, :steps].tolist() == expected[row, :steps].tolist(), (
            f"row {row}: static layout vs PyTorch"
        )
        assert static[row, :steps].tolist() == concat[row, :steps].tolist(), (
            f"row {row}: static vs concat layout"
        )
        with capsys.disabled():
            print(f"\nstatic KV, batch {batch}, row {row}: {steps} of {NEW_TOKENS} greedy tokens compared")


def test_presents_come_straight_from_attention_over_the_past_inputs(static_artifacts):
    """No Concat (or any copy) on the KV path: each present is an output of the
    GroupQueryAttention node that reads that layer's past inputs, and the graph takes and
    returns buffers of the same (symbolic) length."""
    graph = onnx.load(str(static_artifacts / contract.DECODER_FILE), load_external_data=False).graph
    producers = {output: node for node in graph.node for output in node.output}
    inputs = {i.name: i for i in graph.input}
    for layer in range(DEFAULT.text_layers):
        for past, present in (
            (contract.past_key_name(layer), contract.present_key_name(layer)),
            (contract.past_value_name(layer), contract.present_value_name(layer)),
        ):
            node = producers[present]
            assert (node.domain, node.op_type) == ("com.microsoft", "GroupQueryAttention")
            assert past in node.input and past in inputs
            assert [d.dim_param for d in inputs[past].type.tensor_type.shape.dim][2] == "max_sequence"
    assert not [
        n for n in graph.node if n.op_type == "Concat" and any("past_key_values" in i for i in n.input)
    ]


def test_each_step_writes_into_the_same_buffers(static_artifacts):
    """Prefill and a decode step bind the buffers as both past and present: the same OrtValues,
    at the same addresses, hold the new positions afterwards; columns past them stay zero."""
    folder = static_artifacts
    backend = OrtBackend(folder, contract.read_manifest(folder))
    table = np.load(folder / contract.EMBEDDINGS_FILE)
    state = prefill(backend, [table[ids] for ids in PROMPTS])
    buffers = list(state.cache)
    addresses = [value.data_ptr() for value in buffers]
    assert len(buffers) == 2 * DEFAULT.text_layers and len(set(addresses)) == len(addresses)
    prompt_width = state.mask.shape[1]
    state = decode_one_token(backend, table, state.logits.argmax(-1), state)
    assert all(a is b for a, b in zip(state.cache, buffers))
    assert [value.data_ptr() for value in state.cache] == addresses
    for value in state.cache:
        array = value.numpy()  # [B, kv, BUFFER, hd]
        assert array.shape == (2, DEFAULT.kv_heads, BUFFER, DEFAULT.text_hidden // DEFAULT.heads)
        assert np.abs(array[:, :, prompt_width]).max() > 0  # the decoded token's position
        assert not array[:, :, prompt_width + 1 :].any()


def test_manifest_records_the_layout(static_artifacts):
    graph = contract.read_manifest(static_artifacts).graphs["decoder"]
    assert (graph.kv_cache, graph.max_seq_len) == (contract.KV_STATIC, BUFFER)


def test_overflowing_the_buffers_is_a_prompt_error(static_artifacts):
    folder = static_artifacts
    backend = OrtBackend(folder, contract.read_manifest(folder))
    assert (backend.limits.kv_capacity, backend.limits.capacity) == (
        BUFFER,
        BUFFER,
    )  # declared, checked up front
    table = np.load(folder / contract.EMBEDDINGS_FILE)
    prompt = table[PROMPTS[0]]  # 13 positions: room for BUFFER - 13 + 1 new tokens
    with pytest.raises(
        PromptError,
        match=f"need {BUFFER + 1} cache positions.*holds {BUFFER}.*at most {BUFFER - 13 + 1} new tokens",
    ):
        next(generate(backend, table, [prompt], BUFFER - 13 + 2, eos_ids=[]))
    assert len(list(generate(backend, table, [prompt], BUFFER - 13 + 1, eos_ids=[]))) == BUFFER - 13 + 1
    too_wide = np.ones((1, BUFFER + 1), np.int64)
    with pytest.raises(PromptError, match=f"reach {BUFFER + 1} positions.*holds {BUFFER}"):
        backend.decode(prompt[None, :1], too_wide, np.zeros((1, 1), np.int64), backend.empty_cache(1))
    backend.close()


@pytest.mark.parametrize(
    "config",
    [TinyConfig(kv_heads=1), TinyConfig(family="mistral"), TinyConfig(family="qwen2", tie_embeddings=True)],
    ids=["llama_mqa", "mistral", "qwen2_tied"],
)
def test_other_families_pass_the_export_parity_gate(workshop, tmp_path_factory, config):
    """export_decoder runs the graph against PyTorch and raises ParityError on a miss."""
    folder = export_static(workshop, tmp_path_factory, config, max_seq_len=32, vision=False)
    assert contract.read_manifest(folder).graphs["decoder"].kv_cache == contract.KV_STATIC


def test_sliding_window_models_are_refused_before_any_work(workshop, tmp_path):
    from runtime.errors import LlavaError

    source = load_source(str(workshop.tiny(TinyConfig(family="mistral"))["hf"]))
    source.model.config.text_config.sliding_window = 16
    with pytest.raises(LlavaError, match="does not take sliding-window attention"):
        export_decoder(source, tmp_path, progress=Progress(quiet=True), kv_cache=contract.KV_STATIC)
    assert not (tmp_path / contract.MANIFEST_FILE).exists()
