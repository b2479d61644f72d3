"""exporter.testing.scale's tokenizer: the tiny one, with a piece for every other id of the
model's vocabulary, so that what a random 7B-shaped model generates decodes to text (a served
export streams it), while text tokenizes exactly as with the tiny tokenizer alone. And its
original-layout checkpoint and LoRA folder, at a tiny width: the loaders take them, and the
LoRA merges into exactly the modules LLaVA's training adapts."""

from __future__ import annotations

import json
import re

import pytest

from exporter.testing.scale import (
    CLIP_L_336,
    cover_vocabulary,
    random_model,
    save_hf,
    save_original,
    vicuna_7b,
    write_lora,
    write_tokenizer,
)
from exporter.testing.tiny_tokenizer import DEFAULT_VOCAB_SIZE, build_tiny_tokenizer, default_corpus
from runtime.contract import TOKENIZER_FILE

VOCAB = vicuna_7b(2)["vocab_size"]  # 32064
TEXTS = [
    *default_corpus()[:5],
    "A chat between a curious human and an artificial intelligence assistant. USER: <image>\n"
    "describe the picture in detail w320 w32063 ▁w400 123 é ASSISTANT:",
]
# the 7B shapes, narrowed (and grouped-query attention, so k and v differ from q in width)
TINY_TEXT = {
    **vicuna_7b(2),
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 384,
}
TINY_CLIP = {
    **CLIP_L_336,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 28,
    "projection_dim": 16,
}
# what the LoRA folder changes: every decoder Linear and the projector (non_lora_trainables)
ADAPTED = re.compile(
    r"model\.(language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
    r"|multi_modal_projector\.linear_[12])\.(weight|bias)$"
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tiny, scale = tmp_path_factory.mktemp("tiny"), tmp_path_factory.mktemp("scale")
    build_tiny_tokenizer(tiny)
    write_tokenizer(scale, VOCAB)
    return tiny, scale


def test_every_id_of_the_model_has_a_piece_and_text_tokenizes_as_before(folders):
    import tokenizers

    tiny, scale = (tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_FILE)) for folder in folders)
    assert tiny.get_vocab_size() == DEFAULT_VOCAB_SIZE and scale.get_vocab_size() == VOCAB
    for text in TEXTS:
        assert scale.encode(text).ids == tiny.encode(text).ids, text
        assert max(scale.encode(text).ids) < DEFAULT_VOCAB_SIZE
    assert scale.decode([DEFAULT_VOCAB_SIZE, 5000, VOCAB - 1]) == "w320 w5000 w32063"
    assert tiny.decode([5000]) == ""  # what the tiny tokenizer alone gives a random model's ids


def test_the_export_keeps_the_pieces(folders, tmp_path):
    """llava-export writes the tokenizer transformers runs: the placeholders survive it."""
    import tokenizers

    from exporter.graphs.tokenizer import save_tokenizer

    save_tokenizer(folders[1], tmp_path)
    exported = tokenizers.Tokenizer.from_file(str(tmp_path / TOKENIZER_FILE))
    tiny = tokenizers.Tokenizer.from_file(str(folders[0] / TOKENIZER_FILE))
    assert exported.get_vocab_size() == VOCAB
    assert all(exported.encode(text).ids == tiny.encode(text).ids for text in TEXTS)
    assert exported.decode([12345]) == "w12345"


def test_cover_vocabulary_refuses_a_placeholder_that_is_already_a_piece(tmp_path):
    build_tiny_tokenizer(tmp_path)
    path = tmp_path / TOKENIZER_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"]["vocab"]["▁w999"] = data["model"]["vocab"].pop("<0xFF>")
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="already a piece"):
        cover_vocabulary(path, 1000)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny-width random model in both layouts, and a LoRA folder for the original one."""
    from transformers import LlavaConfig

    root = tmp_path_factory.mktemp("scale-checkpoints")
    config = LlavaConfig(vision_config=TINY_CLIP, text_config=TINY_TEXT, image_token_index=383)
    model = random_model(config)
    save_hf(model, root / "hf")
    tower = save_original(model, root / "base")
    write_lora(root / "base", root / "lora", r=8, alpha=16)
    return root, tower


def test_the_original_layout_holds_the_same_model_with_its_tower_beside_it(checkpoints):
    import torch

    from exporter.source import load_source

    root, tower = checkpoints
    config = json.loads((root / "base" / "config.json").read_text())
    assert config["mm_vision_tower"] == "../base-clip" and tower == root / "base-clip"
    hf = load_source(str(root / "hf"), dtype=torch.float16)
    original = load_source(str(root / "base"), dtype=torch.float16)
    assert original.format == "original" and original.preprocess == hf.preprocess
    expected = hf.model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in original.model.state_dict().items())


def test_the_lora_folder_merges_into_every_decoder_linear_and_the_projector_only(checkpoints):
    import torch

    from exporter.source import load_source

    root, _ = checkpoints
    adapter = json.loads((root / "lora" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and (adapter["r"], adapter["lora_alpha"]) == (8, 16)
    base = load_source(str(root / "base"), dtype=torch.float16).model.state_dict()
    merged = load_source(str(root / "lora"), model_base=str(root / "base"), dtype=torch.float16)
    changed = {
        name for name, tensor in merged.model.state_dict().items() if not torch.equal(tensor, base[name])
    }
    assert changed == {name for name in base if ADAPTED.match(name)}
    assert len(changed) == 7 * TINY_TEXT["num_hidden_layers"] + 4
    assert all(torch.isfinite(tensor).all() for tensor in merged.model.state_dict().values())
