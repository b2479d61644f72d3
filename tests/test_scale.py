"""exporter.testing.scale's tokenizer: the tiny one, with a piece for every other id of the
model's vocabulary, so that what a random 7B-shaped model generates decodes to text (a served
export streams it), while text tokenizes exactly as with the tiny tokenizer alone. And its
original-layout checkpoint and LoRA folder, at a tiny width: the loaders take them, and the
LoRA merges into exactly the modules LLaVA's training adapts. Its LLaVA-1.6 (`--anyres`): the
7B config (the full tower, ~0.6 GB of weights, is not written here) and, at a tiny width, the
HF folder the source reads as LLaVA-1.6."""

from __future__ import annotations

import json
import re

import pytest

from exporter.testing import scale
from exporter.testing.scale import (
    CLIP_L_336,
    DEFAULT_PINPOINTS,
    cover_vocabulary,
    llava_7b,
    llava_next_7b,
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


# ---------------------------------------------------------------------------------------------
# LLaVA-1.6 (--anyres)


def test_the_llava_16_config_is_llava_15s_model_tiled_at_the_default_pinpoints():
    """llava-hf/llava-v1.6-vicuna-7b-hf's shape: LLaVA-1.5-7B's tower, projector and decoder,
    LlavaNext, the pinpoints of 1x2, 2x1, 2x2, 3x1 and 1x3 tiles of 336 as (height, width)."""
    config, plain = llava_next_7b(2), llava_7b(2)
    assert config.model_type == "llava_next" and plain.model_type == "llava"
    assert config.image_grid_pinpoints == DEFAULT_PINPOINTS
    assert DEFAULT_PINPOINTS == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert config.vision_config.to_dict() == plain.vision_config.to_dict()
    assert config.text_config.to_dict() == plain.text_config.to_dict()
    assert (config.text_config.num_hidden_layers, config.vision_config.image_size) == (2, 336)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.image_token_index == plain.image_token_index == 32000


def test_the_anyres_flag_writes_the_llava_16_checkpoint_in_the_hf_layout_only(monkeypatch, tmp_path, capsys):
    out = tmp_path / "next"
    with pytest.raises(ValueError, match="HF layout only"):  # before any weight is made
        scale.write_checkpoint(out, 2, layout="original", anyres=True)
    written = []
    monkeypatch.setattr(scale, "write_checkpoint", lambda *args, **kwargs: written.append((args, kwargs)))
    assert scale.main(["checkpoint", "--out", str(out), "--text-layers", "2", "--anyres"]) == 0
    assert scale.main(["checkpoint", "--out", str(out), "--text-layers", "2"]) == 0
    assert written == [
        ((out, 2), {"layout": "hf", "anyres": True}),
        ((out, 2), {"layout": "hf", "anyres": False}),
    ]
    with pytest.raises(SystemExit) as refused:
        scale.main(["checkpoint", "--out", str(out), "--anyres", "--format", "original"])
    assert refused.value.code == 2 and "--anyres writes the HF layout only" in capsys.readouterr().err
    assert len(written) == 2 and not out.exists()


def test_a_tiny_width_llava_16_folder_loads_as_llava_16(tmp_path):
    """save_hf of a LlavaNext model: its weights with image_newline, a LlavaNextImageProcessor
    at the model's pinpoints that transformers reads, and the source's AnyresSpec from them."""
    import torch
    from transformers import AutoImageProcessor, LlavaNextConfig

    from exporter.source import load_source

    pinpoints = [[28, 56], [56, 28], [56, 56]]  # whole 28-pixel tiles of TINY_CLIP
    config = LlavaNextConfig(
        vision_config=TINY_CLIP, text_config=TINY_TEXT, image_token_index=383, image_grid_pinpoints=pinpoints
    )
    model = random_model(config)
    save_hf(model, tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__.startswith("LlavaNextImageProcessor")
    assert [list(point) for point in processor.image_grid_pinpoints] == pinpoints
    source = load_source(str(tmp_path), dtype=torch.float16)
    assert source.anyres is not None and source.anyres.grid_pinpoints == pinpoints
    assert source.anyres.tile_size == 28 and source.preprocess.crop_size == 28
    newline = source.model.model.image_newline
    assert newline.shape == (TINY_TEXT["hidden_size"],) and torch.equal(newline, model.model.image_newline)
    assert 0 < newline.float().std() < 0.05  # random, N(0, 0.02), not left uninitialised
