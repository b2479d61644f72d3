"""The two checkpoint formats: identical weights give identical artifacts.

write_tiny saves one random model as a Hugging Face Llava folder and in the original LLaVA
repo's layout (safetensors, or sharded .bin with an index, as the LoRA merge writes it). Both
exports must give the same graphs (same initializers, bit-identical outputs). The original
format also gets the independent second reference of the seed's test_llava.py: a plain
LlamaForCausalLM + CLIPVisionModel + a hand-built projector Sequential, spliced by hand.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from exporter.parity import assert_parity, compare  # noqa: E402
from exporter.testing.tiny import TinyConfig  # noqa: E402
from runtime import contract  # noqa: E402
from tests.support.graphs import FP32_ATOL, embeddings, empty_past, pixels, run_decoder, run_vision, token_ids  # noqa: E402

HF = TinyConfig()
ORIGINALS = {
    "original_safetensors": TinyConfig(),
    "original_bin_2_shards": TinyConfig(weights="bin", shards=2),  # same seed: same weights
}


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_bin_shards_fixture_is_what_it_claims(workshop):
    folder = workshop.tiny(ORIGINALS["original_bin_2_shards"])["original"]
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]
    assert not list(folder.glob("*.safetensors"))


@pytest.mark.parametrize("variant", list(ORIGINALS))
@pytest.mark.parametrize("graph", [contract.VISION_FILE, contract.DECODER_FILE])
def test_graphs_have_identical_initializers(workshop, variant, graph):
    hf = initializers(workshop.artifacts(HF, "hf") / graph)
    original = initializers(workshop.artifacts(ORIGINALS[variant], "original") / graph)
    assert sorted(hf) == sorted(original)
    different = [
        name
        for name in hf
        if hf[name].dtype != original[name].dtype or not np.array_equal(hf[name], original[name])
    ]
    assert not different, f"{graph}: initializers differ between the HF and {variant} exports: {different}"


@pytest.mark.parametrize("variant", list(ORIGINALS))
def test_outputs_are_identical(workshop, variant):
    hf = workshop.artifacts(HF, "hf")
    original = workshop.artifacts(ORIGINALS[variant], "original")
    pix = pixels(HF, 2, seed=11).numpy()
    results = [compare(contract.IMAGE_EMBEDS, run_vision(original, pix), run_vision(hf, pix), atol=0.0)]
    assert np.array_equal(embeddings(hf), embeddings(original))
    ids = token_ids(6, seed=12)
    embeds, mask, positions = embeddings(hf)[ids][None], np.ones((1, 6), np.int64), np.arange(6)[None]
    past_hf = past_original = empty_past(hf, 1)
    for step in range(3):
        logits_hf, past_hf = run_decoder(hf, embeds, mask, positions, past_hf)
        logits_original, past_original = run_decoder(original, embeds, mask, positions, past_original)
        results.append(compare(f"step {step} logits", logits_original, logits_hf, atol=0.0))
        results += [
            compare(f"step {step} present {i}", a, b, atol=0.0)
            for i, (a, b) in enumerate(zip(past_original, past_hf))
        ]
        token = int(logits_hf[0].argmax())
        embeds, positions = embeddings(hf)[[token]][None], np.array([[mask.shape[1]]])
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
    assert_parity(results, f"{variant} export vs HF export of the same weights")
    manifest_hf, manifest_original = contract.read_manifest(hf), contract.read_manifest(original)
    assert manifest_original.source["format"] == "original" and manifest_hf.source["format"] == "hf"
    for field in ("vision", "text", "preprocess", "tokens", "template"):
        assert getattr(manifest_original, field) == getattr(manifest_hf, field), field


# ---------------------------------------------------------------------------------------------
# The seed's manual composition (test_llava.py), an independent second reference


def original_state(folder) -> dict[str, torch.Tensor]:
    """Every tensor of an original-format checkpoint, whatever its file layout."""
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        from safetensors.torch import load_file

        state.update(load_file(str(file)))
    for file in sorted(folder.glob("pytorch_model*.bin")):
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def build_projected(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Sequential:
    """The seed's build_projected: linear, or Linear + (GELU, Linear) * (depth - 1)."""
    if projector_type == "linear":
        return nn.Sequential(nn.Linear(mm_hidden_size, hidden_size))
    depth = int(re.match(r"^mlp(\d+)x_gelu$", projector_type).group(1))
    modules = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(1, depth):
        modules += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*modules)


def load_projected_params(projector: nn.Sequential, checkpoint: dict) -> nn.Sequential:
    """The seed's load_projected_params, strict: every Linear must find its tensors."""
    for name, module in projector.named_modules():
        if isinstance(module, nn.Linear):
            module.weight.data = checkpoint[f"model.mm_projector.{name}.weight"].float()
            module.bias.data = checkpoint[f"model.mm_projector.{name}.bias"].float()
    return projector


class ManualLlava:
    """LlamaForCausalLM + CLIPVisionModel + projector, composed by hand from an original folder."""

    def __init__(self, folder, clip_folder):
        from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        config = json.loads((folder / "config.json").read_text())
        text = {
            k: v
            for k, v in config.items()
            if not k.startswith("mm_") and k not in ("model_type", "architectures", "transformers_version")
        }
        checkpoint = original_state(folder)
        self.llama = LlamaForCausalLM(LlamaConfig(**text)).eval()
        language = {k: v for k, v in checkpoint.items() if not k.startswith("model.mm_projector.")}
        missing, unexpected = self.llama.load_state_dict(language, strict=False)
        tied = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
        assert not unexpected and set(missing) <= tied, (missing, unexpected)
        self.tower = CLIPVisionModel.from_pretrained(clip_folder, dtype=torch.float32).eval()
        self.projector = load_projected_params(
            build_projected(config["mm_projector_type"], config["mm_hidden_size"], config["hidden_size"]),
            checkpoint,
        )
        self.select_layer = config["mm_vision_select_layer"]
        assert config["mm_vision_select_feature"] == "patch"

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(images, output_hidden_states=True).hidden_states[self.select_layer][:, 1:]
        return self.projector(hidden)

    @torch.no_grad()
    def spliced_logits(self, head: list[int], images: torch.Tensor, tail: list[int]) -> np.ndarray:
        embed = self.llama.get_input_embeddings()
        inputs = torch.cat(
            [embed(torch.tensor([head])), self.encode_image(images), embed(torch.tensor([tail]))], dim=1
        )
        return self.llama(inputs_embeds=inputs).logits[:, -1].numpy()


@pytest.mark.parametrize("variant", list(ORIGINALS))
def test_original_format_vs_manual_composition(workshop, variant):
    config = ORIGINALS[variant]
    tiny = workshop.tiny(config)
    folder = workshop.artifacts(config, "original")
    manual = ManualLlava(tiny["original"], tiny["clip"])
    pix = pixels(config, 2, seed=13)
    results = [
        compare(
            "image features",
            run_vision(folder, pix.numpy()),
            manual.encode_image(pix).numpy(),
            atol=FP32_ATOL,
        )
    ]
    head, tail = [1] + token_ids(4, seed=14), token_ids(5, seed=15)
    image = run_vision(folder, pix[:1].numpy())[0]
    table = embeddings(folder)
    spliced = np.concatenate([table[head], image, table[tail]])[None]
    length = spliced.shape[1]
    logits, _ = run_decoder(
        folder, spliced, np.ones((1, length), np.int64), np.arange(length)[None], empty_past(folder, 1)
    )
    results.append(
        compare("spliced prefill logits", logits, manual.spliced_logits(head, pix[:1], tail), atol=FP32_ATOL)
    )
    assert_parity(results, f"{variant} artifacts vs LlamaForCausalLM + CLIPVisionModel + projector")
