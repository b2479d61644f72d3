"""decoder.onnx (+ embed_tokens.npy, + vision.onnx for the splice) against transformers.

The reference is transformers' LlavaForConditionalGeneration (float32, read from the HF
folder) run with its own DynamicCache; the graph is run as the runtime runs it: token
embeddings looked up in embed_tokens.npy, present fed back as past. Every step's logits and
every layer's cache are compared, and all figures are reported at once (assert_parity).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exporter.parity import OutputParity, assert_parity, compare  # noqa: E402
from exporter.source import SUPPORTED_FAMILIES  # noqa: E402
from exporter.testing.tiny import TinyConfig  # noqa: E402
from runtime import contract  # noqa: E402
from tests.support.graphs import (  # noqa: E402
    FP16_MIN_COSINE,
    FP32_ATOL,
    cache_tensors,
    embeddings,
    empty_past,
    float16_graph_problems,
    pixels,
    run_decoder,
    run_vision,
    token_ids,
)

DEFAULT = TinyConfig()  # llama, 4 heads sharing 2 KV heads (grouped-query)

# One tiny case per supported family, plus the attention/position variants a family can have.
CASES = {
    "llama_gqa": DEFAULT,
    "llama_mqa": TinyConfig(kv_heads=1),
    "llama_rope_linear": TinyConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": TinyConfig(family="mistral"),
    "qwen2_tied": TinyConfig(family="qwen2", tie_embeddings=True),
}
DECODE_STEPS = 8
PROMPT = 7
# float16 logits of the tiny models are off by ~0.01: a greedy pick is only comparable where
# the reference's top-2 margin exceeds this.
FP16_LOGITS_TOL = 0.05


def test_all_families_tested():
    tested = {config.family for config in CASES.values()}
    missing = sorted(set(SUPPORTED_FAMILIES) - tested)
    assert not missing, (
        f"exporter.source.SUPPORTED_FAMILIES has no tiny decoder case for {missing}: add one to CASES"
    )


def reference_step(model, embeds: torch.Tensor, mask: np.ndarray, positions: np.ndarray, cache=None):
    """One forward of transformers' model: (last-position logits [B,vocab], its cache)."""
    with torch.no_grad():
        out = model(
            inputs_embeds=embeds,
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
            cache=cache,
            use_cache=True,
        )
    return out.logits[:, -1].numpy(), out.cache


def positions_of(mask: np.ndarray, new: int) -> np.ndarray:
    """Position ids of the last `new` columns of a left-padded mask: 0 at the first real token."""
    return np.clip(np.cumsum(mask, -1) - 1, 0, None)[:, -new:].astype(np.int64)


def compare_cache(
    step: str, actual: list[np.ndarray], expected: list[np.ndarray], **tol
) -> list[OutputParity]:
    results = []
    for index, (act, exp) in enumerate(zip(actual, expected)):
        name = (contract.present_key_name if index % 2 == 0 else contract.present_value_name)(index // 2)
        results.append(compare(f"{step} {name}", act, exp, **tol))
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_decode(workshop, case):
    config = CASES[case]
    folder = workshop.artifacts(config, graphs=("decoder",))
    model = workshop.reference(config)
    text = contract.read_manifest(folder).text
    table = embeddings(folder)
    ids = token_ids(PROMPT, seed=1)
    mask = np.ones((1, PROMPT), np.int64)
    positions = np.arange(PROMPT)[None]
    embeds = table[ids][None]
    past = empty_past(folder, 1)
    cache = None
    reference_embeds = model.get_input_embeddings()(torch.tensor([ids]))
    results = []
    for step in range(DECODE_STEPS + 1):
        label = "prefill" if step == 0 else f"decode {step}"
        logits, presents = run_decoder(folder, embeds, mask, positions, past)
        expected, cache = reference_step(model, reference_embeds, mask, positions, cache)
        assert logits.shape == (1, text.vocab_size)
        assert presents[0].shape == (1, text.num_kv_heads, mask.shape[1], text.head_dim)
        results.append(compare(f"{label} logits", logits, expected, atol=FP32_ATOL))
        results += compare_cache(label, presents, cache_tensors(cache), atol=FP32_ATOL)
        # Both sides take the reference's greedy token: no divergence on near-tied logits.
        token = int(expected[0].argmax())
        embeds, reference_embeds = table[[token]][None], model.get_input_embeddings()(torch.tensor([[token]]))
        positions = np.array([[mask.shape[1]]])
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        past = presents
    assert_parity(results, f"{case}: decoder.onnx float32, prefill of {PROMPT} + {DECODE_STEPS} decode steps")


@pytest.mark.parametrize("case", list(CASES))
def test_left_padded_batch_equals_each_prompt_alone(workshop, case):
    """Batch 2, lengths 7 and 4, left-padded (pad slots hold garbage embeddings the mask must
    hide): each row's logits, and its cache at real positions, equal the prompt run alone,
    through prefill and 3 decode steps."""
    config = CASES[case]
    folder = workshop.artifacts(config, graphs=("decoder",))
    model = workshop.reference(config)
    table = embeddings(folder)
    lengths = (7, 4)
    width = max(lengths)
    prompts = [token_ids(n, seed=10 + row) for row, n in enumerate(lengths)]
    padded = [token_ids(width - len(p), seed=20) + p for p in prompts]  # garbage on the left
    mask = np.array([[0] * (width - n) + [1] * n for n in lengths], np.int64)
    embeds = table[np.array(padded)]
    past = empty_past(folder, 2)
    alone = [dict(ids=p, cache=None, length=0) for p in prompts]
    results = []
    for step in range(4):
        label = "prefill" if step == 0 else f"decode {step}"
        logits, presents = run_decoder(folder, embeds, mask, positions_of(mask, embeds.shape[1]), past)
        tokens = []
        for row, run in enumerate(alone):
            new = run["ids"]
            positions = np.arange(run["length"], run["length"] + len(new))[None]
            expected, run["cache"] = reference_step(
                model,
                model.get_input_embeddings()(torch.tensor([new])),
                np.ones((1, run["length"] + len(new)), np.int64),
                positions,
                run["cache"],
            )
            run["length"] += len(new)
            results.append(
                compare(f"{label} row {row} logits", logits[row : row + 1], expected, atol=FP32_ATOL)
            )
            real = [p[row : row + 1, :, -run["length"] :] for p in presents]
            results += compare_cache(f"{label} row {row}", real, cache_tensors(run["cache"]), atol=FP32_ATOL)
            run["ids"] = [int(expected[0].argmax())]
            tokens += run["ids"]
        embeds = table[np.array(tokens)][:, None]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        past = presents
    assert_parity(results, f"{case}: left-padded batch of 2 vs each prompt alone")


def test_rope_scaling_reaches_the_graph(workshop):
    """The rope-scaled graph differs from the unscaled model with the same weights (same seed)
    far beyond tolerance, so its parity above proves the scaling was exported, not dropped."""
    scaled = CASES["llama_rope_linear"]
    assert (scaled.family, scaled.heads, scaled.seed) == (DEFAULT.family, DEFAULT.heads, DEFAULT.seed)
    folder = workshop.artifacts(scaled, graphs=("decoder",))
    plain = workshop.reference(DEFAULT)
    ids = token_ids(PROMPT, seed=1)
    mask, positions = np.ones((1, PROMPT), np.int64), np.arange(PROMPT)[None]
    logits, _ = run_decoder(folder, embeddings(folder)[ids][None], mask, positions, empty_past(folder, 1))
    unscaled, _ = reference_step(plain, plain.get_input_embeddings()(torch.tensor([ids])), mask, positions)
    assert np.abs(logits - unscaled).max() > 100 * FP32_ATOL


# ---------------------------------------------------------------------------------------------
# float16


def test_fp16_top1_and_cosine_vs_fp32_reference(workshop):
    folder = workshop.artifacts(DEFAULT, fp16=True, graphs=("decoder",))
    model = workshop.reference(DEFAULT)
    table = embeddings(folder)
    assert table.dtype == np.float16
    ids = token_ids(PROMPT, seed=9)  # a prompt whose reference top-2 margins are all clear (> 0.08)
    mask, positions = np.ones((1, PROMPT), np.int64), np.arange(PROMPT)[None]
    embeds, reference_embeds = table[ids][None], model.get_input_embeddings()(torch.tensor([ids]))
    past, cache = empty_past(folder, 1), None
    results, checked, skipped = [], 0, []
    for step in range(DECODE_STEPS + 1):
        label = "prefill" if step == 0 else f"decode {step}"
        logits, presents = run_decoder(folder, embeds, mask, positions, past)
        expected, cache = reference_step(model, reference_embeds, mask, positions, cache)
        assert logits.dtype == np.float32 and presents[0].dtype == np.float16
        results.append(compare(f"{label} logits", logits, expected, min_cosine=FP16_MIN_COSINE))
        results += compare_cache(label, presents, cache_tensors(cache), min_cosine=FP16_MIN_COSINE)
        top2 = np.sort(expected[0])[-2:]
        if top2[1] - top2[0] > FP16_LOGITS_TOL:
            checked += 1
            agree = int(logits[0].argmax()) == int(expected[0].argmax())
            results.append(OutputParity(f"{label} top-1 (margin {top2[1] - top2[0]:.3f})", 0.0, 1.0, agree))
        else:
            skipped.append(f"{label} (reference top-2 margin {top2[1] - top2[0]:.4f} < {FP16_LOGITS_TOL})")
        token = int(expected[0].argmax())
        embeds, reference_embeds = table[[token]][None], model.get_input_embeddings()(torch.tensor([[token]]))
        positions = np.array([[mask.shape[1]]])
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        past = presents
    print(f"float16 top-1 compared at {checked} of {DECODE_STEPS + 1} steps; not at {skipped or 'none'}")
    assert_parity(
        results, f"decoder.onnx float16 vs float32 reference; top-1 not compared at {skipped or 'no step'}"
    )
    assert checked >= (DECODE_STEPS + 1) // 2, (
        f"too few steps with a clear reference top-1 to compare: skipped {skipped}"
    )


def test_fp16_decoder_graph_is_float16_with_float32_softmax(workshop):
    folder = workshop.artifacts(DEFAULT, fp16=True, graphs=("decoder",))
    model = onnx.load(str(folder / contract.DECODER_FILE))
    assert any(node.op_type == "Softmax" for node in model.graph.node)
    assert float16_graph_problems(model) == []


# ---------------------------------------------------------------------------------------------
# The splice


@pytest.mark.parametrize("before,after", [(5, 4), (0, 6)], ids=["image_mid", "image_first"])
def test_splice_matches_the_reference_llava(workshop, before, after):
    """Our splice (embed_tokens.npy rows + vision.onnx features at the placeholder) fed to
    decoder.onnx gives the logits transformers' Llava computes from input_ids + pixel_values,
    with config.image_token_index repeated num_image_tokens times at the placeholder."""
    folder = workshop.artifacts(DEFAULT)
    model = workshop.reference(DEFAULT)
    manifest = contract.read_manifest(folder)
    head = [1] + token_ids(before, seed=30)  # BOS only at the very start
    tail = token_ids(after, seed=31)
    pix = pixels(DEFAULT, 1, seed=5)
    image_tokens = manifest.vision.num_image_tokens
    input_ids = torch.tensor([head + [model.config.image_token_index] * image_tokens + tail])
    with torch.no_grad():
        expected = model(input_ids=input_ids, pixel_values=pix).logits[:, -1].numpy()
    table = embeddings(folder)
    image = run_vision(folder, pix.numpy())
    assert image.shape == (1, image_tokens, manifest.text.hidden_size)
    spliced = np.concatenate([table[head], image[0], table[tail]])[None]
    length = spliced.shape[1]
    logits, _ = run_decoder(
        folder, spliced, np.ones((1, length), np.int64), np.arange(length)[None], empty_past(folder, 1)
    )
    assert_parity(
        [compare("spliced prefill logits", logits, expected, atol=FP32_ATOL)],
        "our splice vs LlavaForConditionalGeneration",
    )
