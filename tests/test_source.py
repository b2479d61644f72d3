"""exporter/source.py: loading both checkpoint formats, and the errors that name what to fix."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exporter.source import SUPPORTED_FAMILIES, load_source  # noqa: E402
from exporter.testing.tiny import TinyConfig  # noqa: E402
from runtime.errors import SourceError  # noqa: E402
from tests.support.graphs import assert_same_weights, pixels, weights  # noqa: E402

DEFAULT = TinyConfig()


def edited_copy(folder, target, **config_changes):
    """A copy of a model folder whose config.json has `config_changes` (None deletes a key)."""
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


# ---------------------------------------------------------------------------------------------
# Both formats


@pytest.mark.parametrize(
    "config", [DEFAULT, TinyConfig(weights="bin", shards=2)], ids=["safetensors", "bin_2_shards"]
)
def test_original_loads_the_same_model_as_hf(workshop, config):
    hf = load_source(str(workshop.tiny(DEFAULT)["hf"]))
    original = load_source(str(workshop.tiny(config)["original"]))
    assert (hf.format, original.format) == ("hf", "original")
    assert_same_weights(hf.model, original.model)
    assert hf.vision == original.vision and hf.text == original.text and hf.preprocess == original.preprocess
    pix = pixels(DEFAULT, 1)
    with torch.no_grad():
        assert torch.equal(
            hf.model.get_image_features(pixel_values=pix).pooler_output[0],
            original.model.get_image_features(pixel_values=pix).pooler_output[0],
        )


def test_specs_describe_the_model(workshop):
    source = load_source(str(workshop.tiny(DEFAULT)["hf"]))
    assert source.vision.num_image_tokens == (DEFAULT.image_size // DEFAULT.patch_size) ** 2
    assert (source.vision.select_layer, source.vision.select_strategy, source.vision.projector) == (
        -2,
        "default",
        "mlp2x_gelu",
    )
    text = source.text
    assert (text.family, text.hidden_size, text.num_layers, text.num_heads, text.num_kv_heads) == (
        "llama",
        64,
        2,
        4,
        2,
    )
    assert text.head_dim == 16 and text.vocab_size == 320
    assert source.preprocess.aspect == "pad" and source.preprocess.crop_size == DEFAULT.image_size
    assert len(source.weights_sha256) == 64
    assert next(source.model.parameters()).dtype == torch.float32
    for fmt in ("hf", "original"):  # every tensor, the tower's too
        half = load_source(str(workshop.tiny(DEFAULT)[fmt]), dtype=torch.float16).model
        assert {p.dtype for p in half.parameters()} == {torch.float16}, fmt


def test_weights_digest_is_one_sha256_over_every_weight_file(workshop):
    """The manifest's model identity: the bytes of the checkpoint's files, then the tower's, in
    one running digest (as every manifest written so far has it)."""
    source = load_source(str(workshop.tiny(DEFAULT)["original"]))
    assert [file.resolve().parent.name for file in source.weight_files] == ["original", "clip"]
    whole = b"".join(file.read_bytes() for file in source.weight_files)
    assert source.weights_sha256 == hashlib.sha256(whole).hexdigest()


def test_original_keeps_rope_scaling(workshop):
    config = TinyConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})
    for fmt in ("hf", "original"):
        rope = load_source(str(workshop.tiny(config)[fmt])).model.config.text_config.rope_parameters
        assert (rope["rope_type"], rope["factor"]) == ("linear", 2.0), fmt


def test_families_load_from_the_original_format(workshop):
    for family in SUPPORTED_FAMILIES:
        config = TinyConfig(family=family, tie_embeddings=family == "qwen2")
        source = load_source(str(workshop.tiny(config)["original"]))
        assert source.text.family == family
        assert source.model.config.text_config.model_type == family


# ---------------------------------------------------------------------------------------------
# The vision tower of the original format


def test_vision_tower_overrides_mm_vision_tower(workshop, tmp_path):
    """--vision-tower wins over a loadable mm_vision_tower (here a CLIP with other weights)."""
    from transformers import CLIPVisionModel

    folders = workshop.tiny(DEFAULT)
    other = CLIPVisionModel.from_pretrained(folders["clip"])
    with torch.no_grad():
        other.post_layernorm.weight.add_(1.0)
        for parameter in other.encoder.layers[0].parameters():
            parameter.add_(0.5)
    other.save_pretrained(tmp_path / "other_clip")
    model = edited_copy(folders["original"], tmp_path / "model", mm_vision_tower=str(tmp_path / "other_clip"))
    named = load_source(str(model)).model.model.vision_tower
    overridden = load_source(str(model), vision_tower=str(folders["clip"])).model.model.vision_tower
    clip = CLIPVisionModel.from_pretrained(folders["clip"])
    assert_same_weights(overridden, clip)
    assert not torch.equal(
        weights(named)["encoder.layers.0.mlp.fc1.weight"], weights(clip)["encoder.layers.0.mlp.fc1.weight"]
    )


def test_unloadable_vision_tower_names_the_flag(workshop, tmp_path):
    model = edited_copy(
        workshop.tiny(DEFAULT)["original"],
        tmp_path / "model",
        mm_vision_tower=str(tmp_path / "gone" / "clip"),
    )
    with pytest.raises(SourceError, match="--vision-tower"):
        load_source(str(model))
    with pytest.raises(SourceError, match="--vision-tower"):
        load_source(str(model), vision_tower=str(tmp_path / "also-gone"))
    assert load_source(str(model), vision_tower=str(workshop.tiny(DEFAULT)["clip"])).format == "original"


def test_missing_mm_vision_tower_names_the_flag(workshop, tmp_path):
    model = edited_copy(workshop.tiny(DEFAULT)["original"], tmp_path / "model", mm_vision_tower=None)
    with pytest.raises(SourceError, match="--vision-tower"):
        load_source(str(model))


def test_tower_beside_the_model(workshop, tmp_path):
    """A relative mm_vision_tower resolves against the model folder (model and tower shipped together)."""
    folders = workshop.tiny(DEFAULT)
    shutil.copytree(folders["clip"], tmp_path / "clip")
    model = edited_copy(folders["original"], tmp_path / "model", mm_vision_tower="../clip")
    assert load_source(str(model)).format == "original"


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_source(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        load_source(str(tmp_path / "nowhere" / "model"))


def test_source_is_a_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(SourceError, match="is a file"):
        load_source(str(tmp_path / "model.bin"))


def test_folder_without_config(tmp_path):
    with pytest.raises(SourceError, match="config.json"):
        load_source(str(tmp_path))


def test_plain_llama_is_not_llava(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=320).save_pretrained(
        tmp_path
    )
    with pytest.raises(SourceError, match="not a LLaVA model"):
        load_source(str(tmp_path))


def test_unknown_projector_type(workshop, tmp_path):
    model = edited_copy(workshop.tiny(DEFAULT)["original"], tmp_path / "model", mm_projector_type="resampler")
    with pytest.raises(SourceError, match="unknown mm_projector_type 'resampler'"):
        load_source(str(model))


def test_unsupported_family(workshop, tmp_path):
    model = edited_copy(workshop.tiny(DEFAULT)["original"], tmp_path / "model", model_type="llava_gemma")
    with pytest.raises(SourceError, match="not supported"):
        load_source(str(model))


def test_missing_shard(workshop, tmp_path):
    model = edited_copy(workshop.tiny(TinyConfig(weights="bin", shards=2))["original"], tmp_path / "model")
    (model / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(SourceError, match="pytorch_model-00002-of-00002.bin"):
        load_source(str(model))


def test_weights_that_do_not_fit_the_config(workshop, tmp_path):
    model = edited_copy(workshop.tiny(DEFAULT)["original"], tmp_path / "model", intermediate_size=96)
    with pytest.raises(SourceError, match="shape"):
        load_source(str(model))
