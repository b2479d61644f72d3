"""End to end: the runtime's greedy tokens equal `LlavaForConditionalGeneration.generate`.

Both sides get the same input. The token ids come from OUR tokenization (render_prompt +
tokenize_prompt with the exported tokenizer.json); for the reference each image's place
holds `config.image_token_index` repeated num_image_tokens times (transformers' Llava
splices its image features there; for the original format that index is 0, which our
prompts never produce). pixel_values come from runtime.preprocess, so both see the same
pixels. Batches of two prompts of different lengths are left-padded on both sides (pad id
from the manifest, attention_mask 0 on padding, positions counting real tokens).

EOS: the tiny model has random weights and may emit EOS (id 2) at any step. Stopping is
control flow, not arithmetic, so it is switched off on BOTH sides: the reference gets
`eos_token_id=None` (it then runs exactly max_new_tokens steps; no logits processor touches
the scores, so its tokens are the plain argmax of its logits), and the runtime's pipeline gets
an empty EOS list (`pipe.manifest.tokens.eos = []`, on a Pipeline loaded for this test only).
Every step's token, EOS or not, is then compared.

Near ties: random weights give near-tied logits, where float round-off may legitimately flip
the argmax. At every step we take the reference's top-2 logit margin (`output_logits`) and
compare tokens up to (not including) the first step whose margin is below MARGIN_TOL; a
difference before that step fails the test. MARGIN_TOL (1e-3) is far above the float32
export's logit error (~1e-5, see the manifest's parity figures). Each case must compare at
least MIN_STEPS steps; the prompts and images below give confident enough logits without
rescaling the tiny model's lm_head. The number of compared steps is printed.
"""

from __future__ import annotations

import pytest

from runtime.pipeline import Pipeline, Request
from tests.support.generation import NEW_TOKENS, ROWS, compare_greedy, reference_generate

MIN_STEPS = 16
MARGIN_TOL = 1e-3


@pytest.fixture(scope="module", params=["hf", "original"])
def fmt(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def artifacts(fmt, workshop):
    return workshop.artifacts(fmt=fmt)


@pytest.fixture(scope="module")
def reference(fmt, workshop):
    """The PyTorch reference (float32 LlavaForConditionalGeneration) for this source format."""
    from exporter.source import load_source

    return load_source(str(workshop.tiny()[fmt])).model


def compare(label: str, artifacts, model, images, batch: int, capsys) -> None:
    rows = ROWS[:batch]
    image_paths = [images[name] for _, name in rows]
    pipe = Pipeline.load(artifacts)
    pipe.manifest.tokens.eos = []  # no stopping: see the module docstring
    answers = pipe.generate_batch(
        [Request(prompt, [path]) for (prompt, _), path in zip(rows, image_paths)], max_new_tokens=NEW_TOKENS
    )
    ref_tokens, margins = reference_generate(model, pipe, rows, image_paths)
    assert ref_tokens.shape == (batch, NEW_TOKENS)

    assert all(len(answer.token_ids) == NEW_TOKENS for answer in answers)
    report, failures = compare_greedy(
        [a.token_ids for a in answers], ref_tokens, margins, MARGIN_TOL, MIN_STEPS
    )
    with capsys.disabled():
        print(f"\n[{label}, batch {batch}] " + "; ".join(report))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_match_transformers_generate(fmt, artifacts, reference, images, batch, capsys):
    """Artifacts exported from `fmt` against that format's reference (exporter.source)."""
    compare(f"{fmt} artifacts vs {fmt} reference", artifacts, reference, images, batch, capsys)


def test_original_format_artifacts_match_the_hf_reference(workshop, images, capsys):
    """The original-format reference is built by exporter.source's own weight mapping, the code
    that also feeds the export: a mapping bug would sit on both sides of the test above. The
    tiny hf and original folders hold the same weights, so the original-format artifacts must
    also match transformers' own from_pretrained of the hf folder."""
    import torch
    from transformers import LlavaForConditionalGeneration

    hf_folder = workshop.tiny()["hf"]
    model = LlavaForConditionalGeneration.from_pretrained(hf_folder, dtype=torch.float32).eval()
    compare(
        "original artifacts vs hf from_pretrained",
        workshop.artifacts(fmt="original"),
        model,
        images,
        2,
        capsys,
    )
