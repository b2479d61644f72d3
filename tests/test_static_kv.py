"""The static KV layout's contract and checks, without running a model: the manifest fields
(old manifests read as the concat layout), generate's capacity check (a fixed cache declared
in a backend's Limits), the CLI's options.
parity_tests/test_static_kv.py runs static-layout exports."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from runtime import contract
from runtime.backends.base import Limits
from runtime.contract import GraphSpec, Manifest, PreprocessSpec, TextSpec, TokenSpec, VisionSpec
from runtime.errors import ArtifactError, PromptError
from runtime.generate import generate
from tests.support.fake_backends import EMBED_TABLE, ScriptedBackend, fixed_cache, sequence


def manifest_with(decoder: GraphSpec) -> Manifest:
    return Manifest(
        source={"path": "x", "format": "hf", "weights_sha256": "0"},
        vision=VisionSpec(32, 8, 32, 3, -2, "default", "mlp2x_gelu"),
        text=TextSpec("llama", 64, 2, 4, 2, 16, 320, 256),
        preprocess=PreprocessSpec(32, 32, [0.5] * 3, [0.5] * 3),
        tokens=TokenSpec(1, [2], 0),
        template="plain",
        graphs={"decoder": decoder},
    )


def decoder_spec(**layout) -> GraphSpec:
    return GraphSpec(contract.DECODER_FILE, "float32", 18, {}, {}, **layout)


def test_static_layout_round_trips_through_the_manifest():
    written = manifest_with(decoder_spec(kv_cache=contract.KV_STATIC, max_seq_len=1024)).to_json()
    graph = Manifest.from_dict(json.loads(written)).graphs["decoder"]
    assert (graph.kv_cache, graph.max_seq_len) == ("static", 1024)


def test_concat_manifests_read_and_write_as_before():
    """The concat layout leaves both fields out of the JSON; a manifest without them (every
    manifest written before the static layout existed) reads as concat."""
    data = json.loads(manifest_with(decoder_spec()).to_json())
    assert "kv_cache" not in data["graphs"]["decoder"] and "max_seq_len" not in data["graphs"]["decoder"]
    graph = Manifest.from_dict(data).graphs["decoder"]
    assert (graph.kv_cache, graph.max_seq_len) == ("concat", None)


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"kv_cache": "paged"}, "unknown kv_cache layout 'paged'"),
        ({"kv_cache": "static"}, "only a static layout has"),
        ({"max_seq_len": 64}, "only a static layout has"),
    ],
)
def test_inconsistent_layouts_are_refused(layout, message):
    with pytest.raises(ArtifactError, match=message):
        decoder_spec(**layout)


def test_generate_refuses_more_tokens_than_the_cache_holds_before_any_compute():
    backend = ScriptedBackend([[5]], fixed_cache(10))
    steps = generate(backend, EMBED_TABLE, [sequence(4, 1.0)], max_new_tokens=8, eos_ids=[])
    with pytest.raises(
        PromptError,
        match="need 11 cache positions; the decoder's static KV cache holds 10: ask for at most 7 new tokens "
        "or resize .*`llava-export decoder --kv-cache static --max-seq-len 11`",
    ):
        next(steps)
    assert backend.calls == []


def test_generate_fills_the_cache_exactly():
    """The last token is never fed back: 4 prompt positions + 7 tokens fit in 10."""
    backend = ScriptedBackend([[5]], fixed_cache(10))
    assert len(list(generate(backend, EMBED_TABLE, [sequence(4, 1.0)], max_new_tokens=7, eos_ids=[]))) == 7
    assert backend.calls[-1]["mask"].shape == (1, 10)


def test_a_prompt_longer_than_the_cache_says_so():
    backend = ScriptedBackend([[5]], fixed_cache(3))
    with pytest.raises(PromptError, match="prompt is 4 tokens .* holds 3: shorten it"):
        next(generate(backend, EMBED_TABLE, [sequence(4, 1.0)], max_new_tokens=1, eos_ids=[]))
    assert backend.calls == []


def test_the_longest_row_of_a_batch_counts():
    backend = ScriptedBackend([[5], [6]], fixed_cache(6))
    with pytest.raises(PromptError, match="the batch's longest prompt \\(5 tokens"):
        next(
            generate(backend, EMBED_TABLE, [sequence(2, 1.0), sequence(5, 2.0)], max_new_tokens=3, eos_ids=[])
        )


def test_a_growing_cache_has_no_limit():
    backend = ScriptedBackend([[5]])  # no kv_capacity: the concat layout
    assert len(list(generate(backend, EMBED_TABLE, [sequence(4, 1.0)], max_new_tokens=50, eos_ids=[]))) == 50
    assert np.array_equal(backend.calls[-1]["positions"], [[52]])


def test_a_fixed_cache_declared_in_the_limits_is_refused_before_any_decode_call():
    """Defect 2: the TensorRT backend's fixed cache was not declared, so generate started a
    request its cache could not finish (3 tokens, then the backend raised). Declared through
    its limits, as every backend now does, the request is refused before the first call, with
    the engine's rebuild command; what does fit runs to the last position."""
    engine = Limits(
        max_positions=256,
        kv_capacity=6,
        max_input=5,
        max_batch=1,
        owner="the TensorRT engine",
        resize="llava-export engine --artifacts DIR",
    )
    backend = ScriptedBackend([[5]], engine)
    steps = generate(backend, EMBED_TABLE, [sequence(4, 1.0)], max_new_tokens=8, eos_ids=[])
    with pytest.raises(
        PromptError,
        match="need 11 cache positions; the TensorRT engine holds 6: ask for at most 3 new tokens "
        "or resize the TensorRT engine: `llava-export engine --artifacts DIR --max-seq-len 11`",
    ):
        next(steps)
    assert backend.calls == []
    assert len(list(generate(backend, EMBED_TABLE, [sequence(4, 1.0)], max_new_tokens=3, eos_ids=[]))) == 3
    assert backend.calls[-1]["mask"].shape == (1, 6)


# -- the CLI ---------------------------------------------------------------------------------


def invoke(*args):
    from click.testing import CliRunner

    from exporter.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-seq-len", "64"], "--max-seq-len sizes the static KV cache: it takes --kv-cache static"),
        (
            ["--kv-cache", "static", "--max-seq-len", "257"],
            "--max-seq-len 257 must be from 2 .* to the model's 256 positions",
        ),
    ],
)
@pytest.mark.parametrize("command", ["decoder", "all"])
def test_bad_kv_cache_options_fail_before_any_export(workshop, tmp_path, command, options, message):
    out = tmp_path / "out"
    result = invoke(command, "--model", workshop.tiny()["hf"], "--out", out, "--quiet", *options)
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert not (out / contract.MANIFEST_FILE).exists() and not (out / contract.VISION_FILE).exists()
